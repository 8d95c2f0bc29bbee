//! The HTTP POST of one delivery, and what came of it. The request carries
//! the payload byte for byte and the Standard Webhooks headers; the answer is
//! reduced to a [`PostResult`] that `lease` turns into a state transition.
//!
//! `http://` endpoints get a minimal HTTP/1.1 client on a std `TcpStream`
//! (`plain`): a child posts once and exits, and reqwest's set-up (a tokio
//! runtime thread, a connection pool, TLS) cost more than the post itself.
//! It also makes fire-and-forget exact: the delivery is handed over once the
//! whole request is written, and only then does the answer window start.
//! `https://` endpoints go through reqwest with rustls (`https`).

mod https;
mod plain;

use std::time::Duration;

use crate::child::Step;
use crate::config::Endpoint;
use crate::signature;
use crate::store::Lease;

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
    /// The request was sent on a connected socket; no answer came in time.
    NoAnswer,
    /// No connection: refused, unreachable or timed out connecting.
    ConnectFailed(String),
    /// The connection broke, or the answer was not HTTP.
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
/// connections alive across deliveries.
pub struct Client {
    keep_alive: bool,
    plain: Option<plain::Connection>,
    /// The https client and the endpoint it was built for.
    https: Option<(String, https::Client)>,
}

impl Client {
    /// A client for one POST: what a child uses.
    pub fn one_shot() -> Client {
        Client {
            keep_alive: false,
            plain: None,
            https: None,
        }
    }

    /// A client that keeps its connection open between POSTs.
    pub fn keep_alive() -> Client {
        Client {
            keep_alive: true,
            ..Client::one_shot()
        }
    }

    /// POSTs `lease` to `endpoint`; `timestamp` (Unix seconds) is signed.
    /// Calls `mark` as the request is prepared, connected and answered.
    pub fn post(
        &mut self,
        endpoint: &Endpoint,
        lease: &Lease,
        timestamp: i64,
        mark: &mut dyn FnMut(Step),
    ) -> PostResult {
        let headers = headers(endpoint, lease, timestamp);
        let body = lease.payload.as_bytes();
        let result = match endpoint.url.scheme() {
            "http" => {
                mark(Step::Prepared);
                plain::post(
                    &mut self.plain,
                    self.keep_alive,
                    endpoint,
                    &headers,
                    body,
                    mark,
                )
            }
            _ => {
                let client = match &self.https {
                    Some((name, client)) if *name == endpoint.name => client,
                    _ => match https::client(endpoint) {
                        Ok(client) => &self.https.insert((endpoint.name.clone(), client)).1,
                        Err(failed) => return failed,
                    },
                };
                mark(Step::Prepared);
                let result = https::post(client, endpoint, &headers, body);
                if !self.keep_alive {
                    self.https = None;
                }
                result
            }
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
        &endpoint.secret,
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
