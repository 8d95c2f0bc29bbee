//! The HTTP POST of one delivery, and what came of it. The request carries
//! the payload byte for byte and the Standard Webhooks headers; the answer is
//! reduced to a [`PostResult`] that `lease` turns into a state transition.
//!
//! Fire-and-forget: the child waits for an answer only `answer_window` after
//! connecting. reqwest reports a connect failure (refused, or connect
//! timeout) as such, so a timeout that is not a connect error means the
//! request went out on a connected socket and no answer came in the window.

use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};

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

/// Builds the HTTP client of one child: no redirects (a 3xx is an answer).
pub fn client(endpoint: &Endpoint) -> Result<Client, String> {
    let mut builder = Client::builder()
        .connect_timeout(endpoint.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cronpost/", env!("CARGO_PKG_VERSION")));
    if endpoint.url.scheme() == "http" {
        // Loading the system's CA certificates costs a child several ms, and
        // a plain-http client with redirects off never makes a TLS connection.
        builder = builder.tls_certs_only([]);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// POSTs `lease` to `endpoint`; `timestamp` (Unix seconds) is signed.
pub fn post(client: &Client, endpoint: &Endpoint, lease: &Lease, timestamp: i64) -> PostResult {
    let body = lease.payload.as_bytes();
    let request = client
        .post(endpoint.url.clone())
        .timeout(endpoint.connect_timeout + endpoint.answer_wait())
        .header(CONTENT_TYPE, "application/json")
        .header("webhook-id", &lease.message_uid)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            signature::sign(&endpoint.secret, &lease.message_uid, timestamp, body),
        )
        .header(ATTEMPT_HEADER, lease.attempt.to_string())
        .header(TOPIC_HEADER, &lease.topic)
        .header(ACCOUNT_HEADER, &lease.account)
        .body(lease.payload.clone());
    match request.send() {
        Ok(response) => PostResult::Answered {
            status: response.status().as_u16(),
            retry_after: retry_after(response.headers()),
        },
        Err(e) if e.is_connect() => PostResult::ConnectFailed(error_chain(&e)),
        Err(e) if e.is_timeout() => PostResult::NoAnswer,
        Err(e) => PostResult::Failed(error_chain(&e)),
    }
}

/// Retry-After as delta-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The error and its causes on one line (reqwest's Display names only the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
