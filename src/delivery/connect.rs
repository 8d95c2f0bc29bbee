//! Getting a connection to an endpoint within its `connect_timeout`, all of
//! it: name resolution (on a helper thread, abandoned when it takes too
//! long: getaddrinfo has no timeout of its own), a TCP connect per address
//! with what is left of the budget, and for https the TLS handshake.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use url::{Host, Url};

use super::{PostResult, tls};

/// Where a request goes, from an endpoint's URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    /// The host, as the URL names it (no userinfo).
    pub host: String,
    /// The port (the scheme's default when the URL has none).
    pub port: u16,
    /// https.
    pub tls: bool,
    /// The `host` header value: host, and the port unless the default.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// `user:password` from the URL, percent-decoded, sent as Basic auth.
    pub credentials: Option<String>,
}

impl Target {
    /// The target of `url` (an http or https URL with a host: the config
    /// checked that).
    pub fn of(url: &Url) -> Target {
        let tls = url.scheme() == "https";
        let host = match url.host() {
            Some(Host::Ipv6(ip)) => format!("[{ip}]"),
            Some(host) => host.to_string(),
            None => String::new(),
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let mut path = url.path().to_string();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned()
        };
        let credentials = (!url.username().is_empty() || url.password().is_some()).then(|| {
            format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or(""))
            )
        });
        Target {
            host,
            port,
            tls,
            authority,
            path,
            credentials,
        }
    }

    /// `host:port`, as errors name the target (never its credentials or query).
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A connection to an endpoint: plain TCP, or TLS over TCP.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// The TCP socket under it, for timeouts.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            // A peer that closes without close_notify has still closed.
            Stream::Tls(tls) => match tls.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    /// For TLS: every record written to the socket, not just encrypted.
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Connects to `target`: resolution, TCP and TLS, all within
/// `connect_timeout` (and before `deadline`).
pub(super) fn open(
    target: &Target,
    connect_timeout: Duration,
    deadline: Instant,
) -> Result<Stream, PostResult> {
    let until = (Instant::now() + connect_timeout).min(deadline);
    let addrs = resolve(target, until).map_err(PostResult::ConnectFailed)?;
    let tcp = connect_any(&addrs, until).map_err(PostResult::ConnectFailed)?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return Ok(Stream::Plain(tcp));
    }
    handshake(target, tcp, until)
}

fn left(until: Instant) -> Option<Duration> {
    Some(until.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

/// The addresses of `target`; a name is resolved on a helper thread that
/// is abandoned at `until` (the child exits soon after either way).
fn resolve(target: &Target, until: Instant) -> Result<Vec<SocketAddr>, String> {
    let ip = target.host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = ip.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let (tx, rx) = mpsc::channel();
    let (host, port) = (target.host.clone(), target.port);
    std::thread::spawn(move || {
        let _ = tx.send((host.as_str(), port).to_socket_addrs().map(Vec::from_iter));
    });
    let wait = left(until).unwrap_or_default();
    match rx.recv_timeout(wait) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(format!("{} resolves to no address", target.host)),
        Ok(Err(e)) => Err(format!("cannot resolve {}: {e}", target.host)),
        Err(_) => Err(format!(
            "resolving {} took longer than connect_timeout",
            target.host
        )),
    }
}

/// A TCP connection to the first address that answers before `until`.
fn connect_any(addrs: &[SocketAddr], until: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        let Some(wait) = left(until) else {
            return Err(format!("{last}; connect_timeout reached"));
        };
        match TcpStream::connect_timeout(addr, wait) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// The TLS handshake, before `until`. A failed handshake (a timeout, not
/// TLS, a certificate that does not verify) is a failed connection: the
/// endpoint cannot be reached as configured, so its breaker opens and one
/// probe per cool-down tries again, instead of every delivery hammering it.
fn handshake(target: &Target, mut tcp: TcpStream, until: Instant) -> Result<Stream, PostResult> {
    let config = tls::config().map_err(PostResult::Failed)?;
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| PostResult::Failed(format!("{host} is not a TLS server name: {e}")))?;
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| PostResult::Failed(format!("TLS set-up for {}: {e}", target.name())))?;
    while conn.is_handshaking() {
        let Some(wait) = left(until) else {
            return Err(PostResult::ConnectFailed(format!(
                "TLS handshake with {} took longer than connect_timeout",
                target.name()
            )));
        };
        let _ = tcp.set_read_timeout(Some(wait));
        let _ = tcp.set_write_timeout(Some(wait));
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    PostResult::ConnectFailed(format!(
                        "TLS handshake with {} took longer than connect_timeout",
                        target.name()
                    ))
                }
                _ => PostResult::ConnectFailed(format!(
                    "TLS handshake with {} failed: {e}",
                    target.name()
                )),
            });
        }
    }
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}
