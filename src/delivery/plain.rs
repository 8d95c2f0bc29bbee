//! http:// endpoints: a minimal HTTP/1.1 client on a std `TcpStream`. One
//! request per connection (`connection: close`), written whole, then the
//! answer's head is read until the answer window ends; the body is never
//! read, so a huge or endless answer costs nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{PostResult, parse_retry_after};
use crate::config::Endpoint;

/// The most of an answer's head (status line and headers) we read.
const MAX_HEAD: usize = 16 * 1024;

pub(super) fn post(
    endpoint: &Endpoint,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> PostResult {
    let url = &endpoint.url;
    let mut stream = match connect(endpoint) {
        Ok(stream) => stream,
        Err(e) => return PostResult::ConnectFailed(e),
    };
    let wait = endpoint.answer_wait();
    let _ = stream.set_nodelay(true);
    // A receiver that never reads must not hold a large body forever.
    let _ = stream.set_write_timeout(Some(wait.max(Duration::from_secs(1))));
    let mut target = url.path().to_string();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(name);
        request.push_str(": ");
        request.push_str(value);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    if let Err(e) = stream.write_all(&bytes) {
        return PostResult::Failed(format!("sending the request: {e}"));
    }
    read_answer(&mut stream, wait)
}

fn connect(endpoint: &Endpoint) -> Result<TcpStream, String> {
    let addrs = endpoint.url.socket_addrs(|| Some(80)).map_err(|e| {
        format!(
            "cannot resolve {}: {e}",
            endpoint.url.host_str().unwrap_or_default()
        )
    })?;
    let mut last = format!(
        "{} resolves to no address",
        endpoint.url.host_str().unwrap_or_default()
    );
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, endpoint.connect_timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// Reads the answer's head within `wait`; no head in time is `NoAnswer`.
fn read_answer(stream: &mut TcpStream, wait: Duration) -> PostResult {
    let deadline = Instant::now() + wait;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            match parse_head(&head[..end]) {
                // 1xx: an interim answer; the real one follows.
                Ok((status, _)) if status < 200 => {
                    head.drain(..end + 4);
                    continue;
                }
                Ok((status, retry_after)) => {
                    return PostResult::Answered {
                        status,
                        retry_after,
                    };
                }
                Err(e) => return PostResult::Failed(e),
            }
        }
        if head.len() > MAX_HEAD {
            return PostResult::Failed(format!(
                "the answer's head is larger than {MAX_HEAD} bytes"
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return PostResult::NoAnswer;
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) if head.is_empty() => {
                return PostResult::Failed("connection closed without an answer".into());
            }
            Ok(0) => {
                return PostResult::Failed("connection closed in the middle of the answer".into());
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return PostResult::NoAnswer;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return PostResult::Failed(format!("reading the answer: {e}")),
        }
    }
}

/// The status and Retry-After of an answer's head.
fn parse_head(head: &[u8]) -> Result<(u16, Option<Duration>), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..1000).contains(code))
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                status_line.chars().take(60).collect::<String>()
            )
        })?;
    let retry_after = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, value)| parse_retry_after(value));
    Ok((status, retry_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_or_refused() {
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\nServer: x"),
            Ok((204, None))
        );
        assert_eq!(
            parse_head(b"HTTP/1.0 429 Too Many\r\nretry-AFTER:  3\r\n"),
            Ok((429, Some(Duration::from_secs(3))))
        );
        assert!(
            parse_head(b"SSH-2.0-OpenSSH")
                .unwrap_err()
                .contains("not an HTTP answer")
        );
        assert!(parse_head(b"HTTP/1.1 abc").is_err());
    }
}
