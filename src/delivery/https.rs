//! https:// endpoints: reqwest (blocking, rustls), one client per child.
//! reqwest reports a connect failure (refused, or connect timeout) as such,
//! so a timeout that is not a connect error means the request went out on a
//! connected socket and no answer came in the window.

pub(super) use reqwest::blocking::Client;
use reqwest::header::RETRY_AFTER;

use super::{PostResult, parse_retry_after};
use crate::config::Endpoint;

/// A client for `endpoint`, or the failure to report.
pub(super) fn client(endpoint: &Endpoint) -> Result<Client, PostResult> {
    Client::builder()
        .connect_timeout(endpoint.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            PostResult::Failed(format!("cannot build the HTTP client: {}", error_chain(&e)))
        })
}

pub(super) fn post(
    client: &Client,
    endpoint: &Endpoint,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> PostResult {
    let mut request = client
        .post(endpoint.url.clone())
        .timeout(endpoint.connect_timeout + endpoint.answer_wait())
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    match request.send() {
        Ok(response) => PostResult::Answered {
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after),
        },
        Err(e) if e.is_connect() => PostResult::ConnectFailed(error_chain(&e)),
        Err(e) if e.is_timeout() => PostResult::NoAnswer,
        Err(e) => PostResult::Failed(error_chain(&e)),
    }
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
