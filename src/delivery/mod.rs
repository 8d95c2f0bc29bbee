//! The HTTP POST of one delivery, and what came of it. The request carries
//! the payload byte for byte and the Standard Webhooks headers; the answer is
//! reduced to a [`PostResult`] that `lease` turns into a state transition.
//!
//! A minimal HTTP/1.1 client of our own, on a std `TcpStream` (`connect`,
//! `http`), with rustls for https (`tls`): a child posts once and exits,
//! and a general client's set-up (a runtime thread, a pool, per-child CA
//! loading) cost more than the post itself. It also makes fire-and-forget
//! exact, over TLS as over plain TCP: the delivery is handed over once the
//! whole request is written to the socket, and only then does the answer
//! window start. Every step is bounded: resolution and connect by
//! `connect_timeout`, writing by the child's deadline (and a stall limit),
//! the answer by the window.

mod connect;
mod http;
mod tls;

use std::time::{Duration, Instant};

use crate::config::Endpoint;
use crate::signature;
use crate::steps::Step;
use crate::store::Lease;

/// Does now, in the parent, what every child forked afterwards would
/// otherwise repeat: the CPU feature detection of SHA-256 and of httparse
/// (CPUID traps to the hypervisor on a VM: measured, 44 µs a child), and,
/// when an endpoint is https, loading the CA certificates.
pub fn warm_up(https: bool) {
    signature::warm_up();
    http::warm_up();
    if https {
        tls::warm_up();
    }
}

/// What a POST came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostResult {
    /// An HTTP answer.
    Answered {
        /// Its status code.
        status: u16,
        /// Its Retry-After, when it gave one.
        retry_after: Option<Duration>,
    },
    /// The whole request was written on a connected socket; no answer came
    /// in time.
    NoAnswer,
    /// No connection: unresolvable, refused, unreachable or timed out
    /// connecting (TLS handshake included).
    ConnectFailed(String),
    /// The request could not be written whole, the connection broke, or
    /// the answer was not HTTP.
    Failed(String),
}

/// Header with the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "cronpost-attempt";
/// Header with the message's topic.
pub const TOPIC_HEADER: &str = "cronpost-topic";
/// Header with the message's account.
pub const ACCOUNT_HEADER: &str = "cronpost-account";

/// An HTTP client for deliveries. A child makes a one-shot client and posts
/// once on a fresh connection (`connection: close`, and the receiver closes
/// first); the benchmark's no-fork harness keeps one client and its
/// connection alive across deliveries.
pub struct Client {
    keep_alive: bool,
    kept: Option<(connect::Target, connect::Stream)>,
}

impl Client {
    /// A client for one POST: what a child uses.
    pub fn one_shot() -> Client {
        Client {
            keep_alive: false,
            kept: None,
        }
    }

    /// A client that keeps its connection open between POSTs.
    pub fn keep_alive() -> Client {
        Client {
            keep_alive: true,
            kept: None,
        }
    }

    /// POSTs `lease` to `endpoint`; `timestamp` (Unix seconds) is signed.
    /// Everything is over by `deadline`. Calls `mark` as the request is
    /// prepared, connected and answered.
    pub fn post(
        &mut self,
        endpoint: &Endpoint,
        lease: &Lease,
        timestamp: i64,
        deadline: Instant,
        mark: &mut dyn FnMut(Step),
    ) -> PostResult {
        let target = connect::Target::of(&endpoint.url);
        let request = http::request(
            &target,
            &headers(endpoint, lease, timestamp),
            lease.payload.as_bytes(),
            self.keep_alive,
        );
        mark(Step::Prepared);
        let result = loop {
            let kept = self.kept.take().filter(|(to, _)| *to == target);
            let reused = kept.is_some();
            let mut stream = match kept {
                Some((_, stream)) => stream,
                None => match connect::open(&target, endpoint.connect_timeout, deadline) {
                    Ok(stream) => stream,
                    Err(failed) => break failed,
                },
            };
            mark(Step::Connected);
            let done = http::exchange(
                &mut stream,
                &request,
                endpoint.answer_wait(),
                self.keep_alive,
                deadline,
            );
            if reused && done.unsent {
                // The receiver closed the idle connection: nothing was sent.
                continue;
            }
            if done.reusable {
                self.kept = Some((target, stream));
            }
            break done.result;
        };
        mark(Step::Answered);
        result
    }
}

/// The request's headers besides Host and Content-Length. Values are
/// visible ASCII: anything else (a topic or account written with plain SQL
/// could hold a newline) is percent-encoded, so no value can inject a header.
fn headers(endpoint: &Endpoint, lease: &Lease, timestamp: i64) -> Vec<(&'static str, String)> {
    let signature = signature::sign(
        &endpoint.secrets,
        &lease.message_uid,
        timestamp,
        lease.payload.as_bytes(),
    );
    vec![
        (
            "user-agent",
            concat!("cronpost/", env!("CARGO_PKG_VERSION")).to_string(),
        ),
        ("content-type", "application/json".to_string()),
        ("webhook-id", header_value(&lease.message_uid)),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
        (ATTEMPT_HEADER, lease.attempt.to_string()),
        (TOPIC_HEADER, header_value(&lease.topic)),
        (ACCOUNT_HEADER, header_value(&lease.account)),
    ]
}

fn header_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Retry-After as delta-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_cannot_inject_headers() {
        assert_eq!(header_value("acme"), "acme");
        assert_eq!(header_value("a\r\nx-evil: 1"), "a%0D%0Ax-evil: 1");
        assert_eq!(header_value("Zoë 100%"), "Zo%C3%AB 100%25");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
