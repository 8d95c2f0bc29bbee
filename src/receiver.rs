//! `cronpost receive`: a small webhook receiver on 127.0.0.1 that prints each
//! request and whether its signature verifies, for testing an integration
//! (and for the demo). It is a tool for people, not part of dispatch.

use std::io::Write;

use crate::config::Secret;
use crate::delivery::{ACCOUNT_HEADER, ATTEMPT_HEADER, TOPIC_HEADER};
use crate::error::{Error, ExitCode, Result};
use crate::signature;

/// Serves on 127.0.0.1:`port` (0: any free port, printed first), answering
/// every request with `status`, until `count` requests have come (or forever).
pub fn serve(port: u16, secret: Option<&Secret>, status: u16, count: Option<u64>) -> Result<()> {
    let server = tiny_http::Server::http(("127.0.0.1", port)).map_err(|e| {
        Error::new(
            ExitCode::Unavailable,
            format!("cannot listen on 127.0.0.1:{port}: {e}"),
        )
    })?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::software("receiver has no IP address"))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let mut request = server.recv().map_err(|e| Error::io("receiver", e))?;
        seen += 1;
        let header = |name: &str| {
            request
                .headers()
                .iter()
                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str().to_string())
                .unwrap_or_default()
        };
        let (id, ts, sig) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let (topic, account, attempt) = (
            header(TOPIC_HEADER),
            header(ACCOUNT_HEADER),
            header(ATTEMPT_HEADER),
        );
        let mut body = Vec::new();
        let _ = request.as_reader().read_to_end(&mut body);
        let verdict = match (secret, ts.parse::<i64>()) {
            (None, _) => "not checked",
            (Some(secret), Ok(ts)) if signature::verify(secret, &id, ts, &body, &sig) => "valid",
            (Some(_), _) => "INVALID",
        };
        let _ = writeln!(
            out,
            "{} {} id={id} topic={topic} account={account} attempt={attempt} signature={verdict} received_ms={} body={}",
            request.method(),
            request.url(),
            crate::store::now_ms(),
            String::from_utf8_lossy(&body)
        );
        let _ = out.flush();
        let _ = request.respond(tiny_http::Response::empty(status));
    }
    Ok(())
}
