//! One HTTP/1.1 exchange on a connection, plain or TLS: the whole request
//! written (that, and only that, is "handed over" in fire-and-forget), then
//! the answer's head read until the answer window ends (httparse: a strict
//! status line, header limits, one Content-Length), then a short wait for
//! the receiver to close first: the side that closes first holds the socket
//! in TIME_WAIT for a minute, and a client holding one per delivery would
//! run out of ephemeral ports towards a busy endpoint (~28,000 ports / 60 s
//! = ~470 deliveries/s). The body is only read to reuse a kept-alive
//! connection (the benchmark's no-fork harness), and then only when small.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use super::connect::{Stream, Target};
use super::{PostResult, parse_retry_after};

/// The most of an answer's head (status line and headers) we read.
const MAX_HEAD: usize = 16 * 1024;
/// The most headers an answer may have.
const MAX_HEADERS: usize = 64;
/// The most of an answer's body we read: to reuse a connection, or while
/// waiting for the receiver to close.
const MAX_BODY: usize = 64 * 1024;
/// How long, at most, we wait for the receiver to close after its answer.
const CLOSE_WAIT: Duration = Duration::from_millis(250);
/// How long one write may make no progress: a receiver that stops reading
/// fails the attempt this soon, one that reads slowly gets until the deadline.
const WRITE_STALL: Duration = Duration::from_secs(1);
/// Bytes per write, so the deadline is checked between them.
const WRITE_CHUNK: usize = 64 * 1024;

/// The request bytes: head and body.
pub(super) fn request(
    target: &Target,
    headers: &[(&'static str, String)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n{}",
        target.path,
        target.authority,
        body.len(),
        if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        }
    );
    if let Some(credentials) = &target.credentials {
        use base64::Engine;
        head.push_str("authorization: Basic ");
        head.push_str(&base64::engine::general_purpose::STANDARD.encode(credentials));
        head.push_str("\r\n");
    }
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// What came of an exchange, and whether the connection can carry another.
pub(super) struct Exchange {
    pub result: PostResult,
    /// Nothing of the request was written (a kept-alive connection the
    /// receiver had closed): safe to send again on a new one.
    pub unsent: bool,
    /// The connection is ready for the next request.
    pub reusable: bool,
}

/// Sends `request` and reads the answer within `wait`, all before `deadline`.
pub(super) fn exchange(
    stream: &mut Stream,
    request: &[u8],
    wait: Duration,
    keep_alive: bool,
    deadline: Instant,
) -> Exchange {
    let failed = |result, unsent| Exchange {
        result,
        unsent,
        reusable: false,
    };
    match send(stream, request, wait, deadline) {
        Ok(()) => {}
        Err((sent, e)) => {
            return failed(
                PostResult::Failed(format!(
                    "sending the request ({sent} of {} bytes): {e}",
                    request.len()
                )),
                sent == 0,
            );
        }
    }
    let answer = read_answer(stream, wait.min(until(deadline)));
    let answered = matches!(answer.result, PostResult::Answered { .. });
    let mut reusable = false;
    if keep_alive && answered && !answer.closing {
        reusable = answer
            .body_length
            .filter(|&n| n <= MAX_BODY)
            .is_some_and(|length| read_body(stream, answer.extra.len(), length, wait));
    } else if answered {
        await_close(stream, deadline);
    }
    Exchange {
        result: answer.result,
        unsent: false,
        reusable,
    }
}

fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Writes all of `request` and flushes it to the socket, before `deadline`
/// and with no write stalling longer than [`WRITE_STALL`]; on failure, how
/// many bytes went and why.
fn send(
    stream: &mut Stream,
    request: &[u8],
    wait: Duration,
    deadline: Instant,
) -> Result<(), (usize, String)> {
    let stall = wait.max(WRITE_STALL);
    let mut sent = 0;
    for chunk in request.chunks(WRITE_CHUNK) {
        let left = until(deadline);
        if left.is_zero() {
            return Err((sent, "not fully written before the child's deadline".into()));
        }
        let _ = stream.tcp().set_write_timeout(Some(stall.min(left)));
        stream.write_all(chunk).map_err(|e| (sent, e.to_string()))?;
        sent += chunk.len();
    }
    let _ = stream.tcp().set_write_timeout(Some(
        stall.min(until(deadline)).max(Duration::from_millis(1)),
    ));
    stream.flush().map_err(|e| (sent, e.to_string()))
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

/// Reads the answer's head within `wait`; no head in time is `NoAnswer`.
fn read_answer(stream: &mut Stream, wait: Duration) -> Answer {
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
        match parse_head(&head) {
            Ok(Some((parsed, end))) if parsed.status < 200 => {
                // 1xx: an interim answer; the real one follows.
                head.drain(..end);
                continue;
            }
            Ok(Some((parsed, end))) => {
                return Answer {
                    result: PostResult::Answered {
                        status: parsed.status,
                        retry_after: parsed.retry_after,
                    },
                    body_length: parsed.body_length,
                    closing: parsed.closing,
                    extra: head.split_off(end),
                };
            }
            Ok(None) => {}
            Err(e) => return failed(PostResult::Failed(e)),
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
        let _ = stream.tcp().set_read_timeout(Some(left));
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
fn read_body(stream: &mut Stream, read: usize, length: usize, wait: Duration) -> bool {
    if read > length {
        return false; // more than the body: not a request-answer exchange
    }
    let _ = stream.tcp().set_read_timeout(Some(wait));
    let mut rest = vec![0u8; length - read];
    stream.read_exact(&mut rest).is_ok()
}

/// Waits, briefly and for a bounded number of bytes, for the receiver to
/// close after its answer, so that TIME_WAIT lands on its side.
fn await_close(stream: &mut Stream, deadline: Instant) {
    let until_close = (Instant::now() + CLOSE_WAIT).min(deadline);
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained <= MAX_BODY {
        let left = until_close.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.tcp().set_read_timeout(Some(left)).is_err() {
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

/// Parses one answer, so that httparse's SIMD detection runs (see
/// [`super::warm_up`]).
pub(super) fn warm_up() {
    let _ = parse_head(b"HTTP/1.1 204 No Content\r\nserver: warm-up\r\n\r\n");
}

/// What an answer's head says.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    retry_after: Option<Duration>,
    body_length: Option<usize>,
    closing: bool,
}

/// The answer's head at the start of `bytes`, with its length; None until
/// it is all there; an error when it is not HTTP/1.x.
fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let end = match answer.parse(bytes) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            let first_line =
                String::from_utf8_lossy(bytes.split(|&b| b == b'\n').next().unwrap_or_default());
            return Err(format!(
                "not an HTTP/1.x answer ({e}): {:?}",
                first_line.trim_end().chars().take(60).collect::<String>()
            ));
        }
    };
    let status = answer.code.expect("a complete head has a status");
    let mut head = Head {
        status,
        retry_after: None,
        body_length: None,
        // HTTP/1.0 closes unless it says keep-alive; we never ask it to.
        closing: answer.version == Some(0),
    };
    for header in answer.headers.iter() {
        let value = std::str::from_utf8(header.value).map(str::trim);
        if header.name.eq_ignore_ascii_case("retry-after") {
            head.retry_after = value.ok().and_then(parse_retry_after);
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let length = value
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| "the answer has an invalid Content-Length".to_string())?;
            if head.body_length.is_some_and(|seen| seen != length) {
                return Err("the answer has two different Content-Lengths".into());
            }
            head.body_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("connection") {
            head.closing = value.is_ok_and(|v| v.eq_ignore_ascii_case("close"));
        }
    }
    Ok(Some((head, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> Result<Head, String> {
        parse_head(bytes).map(|h| h.expect("complete").0)
    }

    #[test]
    fn heads_are_parsed_strictly_or_refused() {
        assert_eq!(
            parsed(b"HTTP/1.1 204 No Content\r\nServer: x\r\nContent-Length: 0\r\n\r\n"),
            Ok(Head {
                status: 204,
                retry_after: None,
                body_length: Some(0),
                closing: false
            })
        );
        assert_eq!(
            parsed(b"HTTP/1.0 429 Too Many\r\nretry-AFTER:  3\r\n\r\n"),
            Ok(Head {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
                body_length: None,
                closing: true
            })
        );
        assert!(
            parsed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .unwrap()
                .closing
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nServer"),
            Ok(None),
            "partial"
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.7 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect();
        assert!(parse_head(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()).is_err());
    }
}
