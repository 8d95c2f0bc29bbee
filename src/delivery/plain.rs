//! http:// endpoints: a minimal HTTP/1.1 client on a std `TcpStream`. A
//! child sends one request per connection with `connection: close`, reads
//! the answer's head until the answer window ends, then waits (briefly) for
//! the receiver to close first: the side that closes first holds the socket
//! in TIME_WAIT for a minute, and a client holding one per delivery would
//! run out of ephemeral ports towards a busy endpoint (~28,000 ports / 60 s
//! = ~470 deliveries/s). The body is only read to reuse a kept-alive
//! connection (the benchmark's no-fork harness), and then only when small.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{PostResult, parse_retry_after};
use crate::child::Step;
use crate::config::Endpoint;

/// The most of an answer's head (status line and headers) we read.
const MAX_HEAD: usize = 16 * 1024;
/// The most of an answer's body we read: to reuse a connection, or while
/// waiting for the receiver to close.
const MAX_BODY: usize = 64 * 1024;
/// How long, at most, we wait for the receiver to close after its answer.
const CLOSE_WAIT: Duration = Duration::from_millis(250);

/// A kept-alive connection and the `host:port` it goes to.
pub(super) struct Connection {
    to: String,
    stream: TcpStream,
}

/// What `read_answer` found after the head.
struct Answer {
    result: PostResult,
    /// The answer's Content-Length, when it has one.
    body_length: Option<usize>,
    /// Whether the answer says `connection: close`.
    closing: bool,
    /// Bytes read past the head.
    extra: Vec<u8>,
}

pub(super) fn post(
    kept: &mut Option<Connection>,
    keep_alive: bool,
    endpoint: &Endpoint,
    headers: &[(&'static str, String)],
    body: &[u8],
    mark: &mut dyn FnMut(Step),
) -> PostResult {
    let url = &endpoint.url;
    let to = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let reused = kept.take().filter(|c| c.to == to).map(|c| c.stream);
    let was_reused = reused.is_some();
    let mut stream = match reused.map_or_else(|| connect(endpoint), Ok) {
        Ok(stream) => stream,
        Err(e) => return PostResult::ConnectFailed(e),
    };
    mark(Step::Connected);
    let wait = endpoint.answer_wait();
    let _ = stream.set_nodelay(true);
    // A receiver that never reads must not hold a large body forever.
    let _ = stream.set_write_timeout(Some(wait.max(Duration::from_secs(1))));
    let mut target = url.path().to_string();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nhost: {to}\r\ncontent-length: {}\r\n{}",
        body.len(),
        if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        }
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
        if was_reused {
            // The receiver closed the idle connection: nothing was sent.
            return post(kept, keep_alive, endpoint, headers, body, mark);
        }
        return PostResult::Failed(format!("sending the request: {e}"));
    }
    let answer = read_answer(&mut stream, wait);
    let answered = matches!(answer.result, PostResult::Answered { .. });
    if keep_alive && answered && !answer.closing {
        if let Some(length) = answer.body_length.filter(|&n| n <= MAX_BODY)
            && read_body(&mut stream, answer.extra.len(), length, wait)
        {
            *kept = Some(Connection { to, stream });
        }
    } else if answered {
        await_close(&mut stream);
    }
    answer.result
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
fn read_answer(stream: &mut TcpStream, wait: Duration) -> Answer {
    let deadline = Instant::now() + wait;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let failed = |result| Answer {
        result,
        body_length: None,
        closing: true,
        extra: Vec::new(),
    };
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            match parse_head(&head[..end]) {
                // 1xx: an interim answer; the real one follows.
                Ok(parsed) if parsed.status < 200 => {
                    head.drain(..end + 4);
                    continue;
                }
                Ok(parsed) => {
                    return Answer {
                        result: PostResult::Answered {
                            status: parsed.status,
                            retry_after: parsed.retry_after,
                        },
                        body_length: parsed.body_length,
                        closing: parsed.closing,
                        extra: head.split_off(end + 4),
                    };
                }
                Err(e) => return failed(PostResult::Failed(e)),
            }
        }
        if head.len() > MAX_HEAD {
            return failed(PostResult::Failed(format!(
                "the answer's head is larger than {MAX_HEAD} bytes"
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return failed(PostResult::NoAnswer);
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) if head.is_empty() => {
                return failed(PostResult::Failed(
                    "connection closed without an answer".into(),
                ));
            }
            Ok(0) => {
                return failed(PostResult::Failed(
                    "connection closed in the middle of the answer".into(),
                ));
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return failed(PostResult::NoAnswer);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return failed(PostResult::Failed(format!("reading the answer: {e}"))),
        }
    }
}

/// Reads the rest of a `length`-byte body (`read` of it already in hand);
/// whether the connection is ready for the next request.
fn read_body(stream: &mut TcpStream, read: usize, length: usize, wait: Duration) -> bool {
    if read > length {
        return false; // more than the body: not a request-answer exchange
    }
    let _ = stream.set_read_timeout(Some(wait));
    let mut rest = vec![0u8; length - read];
    stream.read_exact(&mut rest).is_ok()
}

/// Waits, briefly and for a bounded number of bytes, for the receiver to
/// close after its answer, so that TIME_WAIT lands on its side.
fn await_close(stream: &mut TcpStream) {
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained <= MAX_BODY {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What an answer's head says.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    retry_after: Option<Duration>,
    body_length: Option<usize>,
    closing: bool,
}

/// The status line and the headers we use of an answer's head.
fn parse_head(head: &[u8]) -> Result<Head, String> {
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
    let mut head = Head {
        status,
        retry_after: None,
        body_length: None,
        // HTTP/1.0 closes unless it says keep-alive; we never ask it to.
        closing: status_line.starts_with("HTTP/1.0"),
    };
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after = parse_retry_after(value);
        } else if name.eq_ignore_ascii_case("content-length") {
            head.body_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            head.closing = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_or_refused() {
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\nServer: x\r\nContent-Length: 0"),
            Ok(Head {
                status: 204,
                retry_after: None,
                body_length: Some(0),
                closing: false
            })
        );
        assert_eq!(
            parse_head(b"HTTP/1.0 429 Too Many\r\nretry-AFTER:  3\r\n"),
            Ok(Head {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
                body_length: None,
                closing: true
            })
        );
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nConnection: close")
                .unwrap()
                .closing
        );
        assert!(
            parse_head(b"SSH-2.0-OpenSSH")
                .unwrap_err()
                .contains("not an HTTP answer")
        );
        assert!(parse_head(b"HTTP/1.1 abc").is_err());
    }
}
