//! Faults and bad input, done for real: database files that are missing,
//! read-only, not SQLite or full; endpoints that misbehave at the TCP level;
//! bad input of every kind; secrets kept out of every output.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------- database

#[test]
fn a_missing_database_is_created_private_and_a_missing_directory_is_a_clear_error() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    env.enqueue("t", "a", "{}");
    assert_eq!(mode(&env.db), 0o600, "only its owner reads the payloads");
    env.run();

    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&text.replace(
        "database = \"q.db\"",
        "database = \"shared.db\"\ndatabase_group = \"root\"",
    ));
    env.enqueue("t", "a", "{}");
    // Shared with the group: producers and admins in it read and write.
    assert_eq!(mode(&env.path().join("shared.db")), 0o660);

    env.write_config(&text.replace("database = \"q.db\"", "database = \"nowhere/q.db\""));
    let out = env.cronpost(&["enqueue", "--topic", "t", "--account", "a", "--data", "{}"]);
    assert_eq!(code(&out), 73, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("directory") && stderr(&out).contains("nowhere"),
        "{}",
        stderr(&out)
    );

    env.write_config(&text.replace(
        "database = \"q.db\"",
        "database = \"q.db\"\ndatabase_group = \"no-such-group\"",
    ));
    let out = env.cronpost(&["check-config"]);
    assert_eq!(code(&out), 78);
    assert!(
        stderr(&out).contains("database_group = \"no-such-group\": no such group"),
        "{}",
        stderr(&out)
    );
}

/// (group id, mode) of a file.
fn group_and_mode(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.gid(), meta.mode() & 0o7777)
}

#[test]
fn files_of_a_shared_database_take_its_group_and_mode_whatever_the_umask() {
    let rx = Receiver::start();
    let daemon_gid = 1; // group "daemon": not root's own
    let env = Env::new(
        "max_children = 2",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    env.prepend_config("database_group = \"daemon\"\nmetrics_file = \"m.prom\"");
    // As a producer or service with a strict umask would run it.
    let with_umask = |args: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 077; exec {} {args}",
                env!("CARGO_BIN_EXE_cronpost")
            ))
            .env("CRONPOST_CONFIG", &env.config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args}: {}", stderr(&out));
    };
    with_umask("enqueue --topic t --account a --data {}");
    with_umask("run");
    assert_eq!(group_and_mode(&env.db), (daemon_gid, 0o660));
    let slots = env.path().join("q.db.slots");
    assert_eq!(group_and_mode(&slots), (daemon_gid, 0o770));
    for slot in std::fs::read_dir(&slots).unwrap() {
        assert_eq!(group_and_mode(&slot.unwrap().path()), (daemon_gid, 0o660));
    }
    // node_exporter, another user, reads the metrics.
    assert_eq!(group_and_mode(&env.path().join("m.prom")).1, 0o644);
    assert_eq!(rx.received_on("/e").len(), 1);

    // A setgid directory shares a new database with its group, no
    // database_group needed (the package's /var/lib/cronpost is one).
    let shared = env.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    nix::unistd::chown(&shared, None, Some(nix::unistd::Gid::from_raw(daemon_gid))).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(
        &text
            .replace("database_group = \"daemon\"\n", "")
            .replace("database = \"q.db\"", "database = \"shared/q.db\""),
    );
    with_umask("enqueue --topic t --account a --data {}");
    assert_eq!(group_and_mode(&shared.join("q.db")), (daemon_gid, 0o660));
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let junk = b"this is a text file, not a database, and it must not be overwritten\n".repeat(100);
    std::fs::write(&env.db, &junk).unwrap();
    for args in [
        &["run"][..],
        &["enqueue", "--topic", "t", "--account", "a", "--data", "{}"],
        &["stats"],
    ] {
        let out = env.cronpost(args);
        assert_eq!(code(&out), 65, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("file is not a database"),
            "{}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("q.db"),
            "names the file: {}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read(&env.db).unwrap(), junk);
}

/// Runs the binary as user nobody, so file permissions apply. The binary is
/// copied beside the database, where nobody can reach it whatever the
/// permissions of the checkout's directories.
fn as_nobody(env: &Env, args: &[&str]) -> Output {
    let binary = env.path().join("cronpost");
    if !binary.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_cronpost"), &binary).unwrap();
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(args)
        .env("CRONPOST_CONFIG", &env.config)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn a_read_only_database_or_directory_is_a_clear_error_and_nothing_is_lost() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    env.enqueue("t", "a", r#"{"first":1}"#);
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&env.db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let enqueue = ["enqueue", "--topic", "t", "--account", "a", "--data", "{}"];
    // nobody may read the file but not write it, nor create files beside
    // it: one error naming the file, its owner and mode, and the fix.
    for args in [&enqueue[..], &["run"], &["stats"]] {
        let out = as_nobody(&env, args);
        assert_eq!(code(&out), 77, "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("q.db"), "{err}");
        assert!(
            err.contains("user nobody cannot read and write it: owner root:root, mode 0644"),
            "{err}"
        );
        assert!(err.contains("set database_group in the config"), "{err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("cronpost:")).count(),
            1,
            "{err}"
        );
    }
    // With database_group, the advice names that group.
    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&format!("database_group = \"daemon\"\n{text}"));
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = stderr(&as_nobody(&env, &enqueue));
    assert!(
        err.contains("to share it with group daemon (database_group): chgrp daemon")
            && err.contains("chmod g+rw")
            && err.contains("usermod -aG daemon nobody"),
        "{err}"
    );
    env.write_config(&text);
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Give nobody the file but not the directory: the WAL cannot be made.
    nix::unistd::chown(&env.db, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = as_nobody(&env, &enqueue);
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot create files in directory"),
        "{}",
        stderr(&out)
    );
    // Nothing was created on the way.
    let names: Vec<String> = std::fs::read_dir(env.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("-wal") || n.ends_with(".slots")),
        "{names:?}"
    );

    // The fault goes away: the message accepted before is delivered.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    env.run();
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        1,
        "nothing half-written"
    );
    assert_eq!(rx.received_on("/e").len(), 1);
}

#[test]
fn a_full_disk_during_enqueue_fails_cleanly_and_writes_nothing() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    env.enqueue("t", "a", "{}");
    env.run();
    let big: String = (0..2000)
        .map(|i| {
            format!(
                "{{\"topic\":\"t\",\"account\":\"a\",\"payload\":{{\"n\":{i},\"pad\":\"{}\"}}}}\n",
                "x".repeat(500)
            )
        })
        .collect();
    // Files may grow to 64 KiB: the batch (about 1 MiB) cannot fit.
    let mut child = Command::new("prlimit")
        .args([
            "--fsize=65536",
            env!("CARGO_BIN_EXE_cronpost"),
            "enqueue",
            "--ndjson",
        ])
        .env("CRONPOST_CONFIG", &env.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(big.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 74, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("q.db") && stderr(&out).contains("rolled back"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        1,
        "none of the batch was written"
    );

    // Room again: the same batch goes in and is delivered.
    env.enqueue_ndjson(&big);
    run_until(
        &env,
        Duration::from_secs(120),
        "the batch delivered",
        || env.count_state("delivered") == 2001,
    );
    let ok: String = env
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

// ---------------------------------------------------------------- endpoints

/// A raw TCP server on 127.0.0.1 that does `behave` with each connection.
struct RawServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RawServer {
    fn start(behave: fn(TcpStream)) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        held.push(std::thread::spawn(move || behave(stream)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.take().unwrap().join();
    }
}

fn read_request(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.read(&mut buf);
}

/// One message to a raw server; returns (the run's wall time, the delivery's
/// state, reason, last error, attempt outcome).
fn one_delivery(
    behave: fn(TcpStream),
    extra: &str,
) -> (Duration, String, Option<String>, Option<String>, String) {
    let server = RawServer::start(behave);
    one_delivery_to(&format!("http://127.0.0.1:{}/hook", server.port), extra)
}

/// One message to `url` (an endpoint with `extra` settings), as `one_delivery`.
fn one_delivery_to(
    url: &str,
    extra: &str,
) -> (Duration, String, Option<String>, Option<String>, String) {
    let env = Env::new(
        "max_messages = 1\nchild_deadline = \"5s\"\nlease_timeout = \"11s\"",
        &endpoint("raw", url, &["t"], extra),
    );
    env.enqueue("t", "a", r#"{"hello":"world"}"#);
    let started = Instant::now();
    env.run();
    let took = started.elapsed();
    let row = env
        .db()
        .query_row(
            "SELECT d.state, d.reason, d.last_error, a.outcome FROM deliveries d JOIN attempts a ON a.delivery_id = d.id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    (took, row.0, row.1, row.2, row.3)
}

#[test]
fn a_receiver_that_never_reads_is_handed_over_or_times_out_within_bounds() {
    fn never_read(stream: TcpStream) {
        std::thread::sleep(Duration::from_secs(15));
        drop(stream);
    }
    let (took, state, _, _, outcome) = one_delivery(never_read, "answer_window = \"300ms\"");
    assert_eq!(
        (state.as_str(), outcome.as_str()),
        ("delivered", "handed_over"),
        "fire-and-forget: written is handed over"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    let (took, state, reason, _, outcome) =
        one_delivery(never_read, "mode = \"confirm\"\ntimeout = \"1s\"");
    assert_eq!(
        (state.as_str(), reason.as_deref(), outcome.as_str()),
        ("delayed", Some("endpoint_saturated"), "retry")
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn garbage_and_resets_are_retried() {
    fn garbage(mut stream: TcpStream) {
        read_request(&mut stream);
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n\r\n");
    }
    fn reset(mut stream: TcpStream) {
        read_request(&mut stream);
        // SO_LINGER 0: close sends RST instead of FIN.
        use std::os::fd::AsRawFd;
        let linger = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger` for its size; the fd is ours.
        unsafe {
            nix::libc::setsockopt(
                stream.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_LINGER,
                (&linger as *const nix::libc::linger).cast(),
                std::mem::size_of::<nix::libc::linger>() as u32,
            );
        }
        drop(stream);
    }
    for behave in [garbage as fn(TcpStream), reset] {
        let (took, state, reason, error, outcome) = one_delivery(behave, "");
        assert_eq!(
            (state.as_str(), reason.as_deref(), outcome.as_str()),
            ("delayed", Some("retry_backoff"), "retry")
        );
        assert!(error.is_some_and(|e| !e.is_empty()));
        assert!(took < Duration::from_secs(4), "{took:?}");
    }
}

#[test]
fn a_huge_body_or_a_slow_trickle_never_hangs_a_child() {
    fn huge(mut stream: TcpStream) {
        read_request(&mut stream);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) && stream.write_all(&chunk).is_ok() {}
    }
    fn trickle(mut stream: TcpStream) {
        read_request(&mut stream);
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" {
            if stream.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (took, state, _, _, outcome) = one_delivery(huge, "");
    assert_eq!(
        (state.as_str(), outcome.as_str()),
        ("delivered", "delivered"),
        "the status is enough"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    let (took, state, reason, _, _) = one_delivery(trickle, "mode = \"confirm\"\ntimeout = \"1s\"");
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("delayed", Some("endpoint_saturated")),
        "a trickle is a timeout"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_rejected_naming_the_field_with_nothing_written() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&format!(
        "max_payload_bytes = 64\nrequire_object_payload = true\n{text}"
    ));
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100));
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--topic", "t", "--account", "a", "--data", "{\"a\":"],
            65,
            "payload is not valid JSON",
        ),
        (
            &["--topic", "t", "--account", "a", "--data", "[1,2]"],
            65,
            "payload must be a JSON object",
        ),
        (
            &["--topic", "t", "--account", "a", "--data", "\"text\""],
            65,
            "not a string",
        ),
        (
            &["--topic", "t", "--account", "a", "--data", &big],
            65,
            "over max_payload_bytes = 64",
        ),
        (
            &["--topic", "", "--account", "a", "--data", "{}"],
            65,
            "topic must not be empty",
        ),
        (
            &["--topic", "t", "--account", " ", "--data", "{}"],
            65,
            "account must not be empty",
        ),
        (
            &["--topic", "nope", "--account", "a", "--data", "{}"],
            65,
            "unknown topic \"nope\"",
        ),
        (
            &[
                "--topic",
                "t",
                "--account",
                "a",
                "--priority",
                "-5000",
                "--data",
                "{}",
            ],
            65,
            "priority -5000",
        ),
        (
            &[
                "--topic",
                "t",
                "--account",
                "a",
                "--delay",
                "1000d",
                "--data",
                "{}",
            ],
            65,
            "is longer than 30days",
        ),
        (
            &[
                "--topic",
                "t",
                "--account",
                "a",
                "--delay=-5s",
                "--data",
                "{}",
            ],
            65,
            "delay \"-5s\"",
        ),
        (
            &[
                "--topic",
                "t",
                "--account",
                "a",
                "--dedup-key",
                "",
                "--data",
                "{}",
            ],
            65,
            "dedup key must not be empty",
        ),
        (
            &[
                "--topic",
                "t",
                "--account",
                "a",
                "--priority",
                "high",
                "--data",
                "{}",
            ],
            64,
            "--priority",
        ),
    ];
    for (args, expected_code, text) in cases {
        let out = env.cronpost(&[&["enqueue"], *args].concat());
        assert_eq!(code(&out), *expected_code, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(text), "{args:?}: {}", stderr(&out));
    }
    let out = env.cronpost_with_stdin(
        &["enqueue", "--topic", "t", "--account", "a"],
        b"{\"a\":\"\xff\"}",
    );
    assert_eq!(code(&out), 65);
    assert!(stderr(&out).contains("not UTF-8"));
    let out = env.cronpost_with_stdin(
        &["enqueue", "--ndjson"],
        b"{\"topic\":\"t\",\"account\":\"a\",\"payload\":{}}\n\xff\n",
    );
    assert_eq!(code(&out), 65);
    assert!(
        stderr(&out).contains("line 2: not UTF-8"),
        "{}",
        stderr(&out)
    );
    let out = env.cronpost_with_stdin(
        &["enqueue", "--ndjson"],
        b"{\"topic\":\"t\",\"account\":\"a\",\"payload\":[1]}\n",
    );
    assert_eq!(code(&out), 65);
    assert!(
        stderr(&out).contains("line 1: payload must be a JSON object"),
        "{}",
        stderr(&out)
    );
    assert!(
        !env.db.exists() || env.query_i64("SELECT count(*) FROM messages") == 0,
        "nothing written"
    );
}

#[test]
fn bad_configs_name_the_key_for_urls_cron_and_unknown_keys() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let good = std::fs::read_to_string(&env.config).unwrap();
    for (text, expected) in [
        (good.replace(&rx.url("/e"), "http://"), "endpoints.e.url"),
        (
            good.replace(&rx.url("/e"), "mailto:ops@example.com"),
            "endpoints.e.url",
        ),
        (
            format!("schedule = \"61 * * * * *\"\n{good}"),
            "line 1: schedule",
        ),
        (
            format!("colour = \"blue\"\n{good}"),
            "unknown field `colour`",
        ),
        (good.replace("secret", "secrett"), "unknown field `secrett`"),
        (
            format!(
                "{good}\n[endpoints.e2]\nurl = \"http://127.0.0.1:1/\"\ntopics = []\nsecret = \"s\"\n"
            ),
            "endpoints.e2.topics must list at least one topic",
        ),
    ] {
        env.write_config(&text);
        let out = env.cronpost(&["check-config"]);
        assert_eq!(code(&out), 78, "{expected}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{expected}: {}",
            stderr(&out)
        );
    }
}

// ---------------------------------------------------------------- secrets

#[test]
fn secrets_never_appear_in_logs_stats_show_list_or_metrics() {
    let rx = Receiver::start();
    let secret_text = "cronpost-test-secret-0123456789";
    let env = Env::new(
        "",
        &endpoint("e", &rx.url("/e"), &["t"], "").replace(SECRET, secret_text),
    );
    env.prepend_config("metrics_file = \"m.prom\"");
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    rx.queue("/e", &[Reply::Status(500)]);
    env.enqueue("t", "a", "{}");
    let mut seen = String::new();
    for args in [
        &["run"][..],
        &["run"],
        &["stats"],
        &["stats", "--json"],
        &["show", "1"],
        &["show", "1", "--json"],
        &["list", "--json"],
        &["check-config"],
    ] {
        let out = env.command(args).env("RUST_LOG", "debug").output().unwrap();
        seen += &String::from_utf8_lossy(&out.stdout);
        seen += &stderr(&out);
    }
    seen += &std::fs::read_to_string(env.path().join("m.prom")).unwrap();
    assert!(!seen.contains(secret_text), "a secret leaked:\n{seen}");
    assert!(
        seen.contains("world-readable (mode 0644) and holds endpoint secrets"),
        "{seen}"
    );
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!stderr(&env.cronpost(&["check-config"])).contains("world-readable"));
    assert!(
        !rx.received_on("/e").is_empty(),
        "the secret was used all the same"
    );
}

#[test]
fn an_https_endpoint_that_does_not_speak_tls_is_retried_with_the_error() {
    let rx = Receiver::start();
    let (took, state, _, error, outcome) =
        one_delivery_to(&format!("https://127.0.0.1:{}/hook", rx.port), "");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!((state.as_str(), outcome.as_str()), ("delayed", "retry"));
    assert!(
        error.is_some_and(|e| !e.is_empty()),
        "the TLS failure is recorded"
    );
}

#[test]
fn a_killed_parent_leaves_neither_its_keeper_nor_its_children_behind() {
    let receiver = Receiver::start();
    receiver.set_default("/slow", Reply::Delayed(Duration::from_millis(500), 200));
    let env = Env::new(
        "max_children = 2\nmax_messages = 2",
        &endpoint("slow", &receiver.url("/slow"), &["t"], ""),
    );
    env.enqueue("t", "a", "{}");
    env.enqueue("t", "b", "{}");
    let mut run = env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap();
    let parent = run.id();
    let mut family = Vec::new();
    let limit = Duration::from_secs(60);
    wait_until(limit, "the keeper and two children", || {
        family = children_of(parent);
        family.len() >= 3
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    run.wait().unwrap();
    // The children finish their POST; the keeper leaves when they are gone.
    wait_until(limit, "the keeper and the children to exit", || {
        family.iter().all(|&pid| exited(pid))
    });
}
