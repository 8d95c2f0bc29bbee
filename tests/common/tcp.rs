//! TCP state from /proc, shared by the tests and the benchmark
//! (benches/dispatch.rs includes this file by path).

/// TIME_WAIT sockets of `port` on 127.0.0.1: (held by the side listening on
/// it, held by the side that connected to it).
pub fn time_wait(port: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).ok();
    let (mut server, mut client) = (0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 || fields[3] != "06" {
            continue;
        }
        if port_of(fields[1]) == Some(port) {
            server += 1;
        } else if port_of(fields[2]) == Some(port) {
            client += 1;
        }
    }
    (server, client)
}
