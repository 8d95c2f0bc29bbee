//! `cronpost receive`: a small webhook receiver on 127.0.0.1 that prints each
//! request and whether its signature verifies, for testing an integration
//! (and for the demo). It is a tool for people, not part of dispatch.

use std::io::Write;

use crate::config::Secret;
use crate::delivery::{ACCOUNT_HEADER, ATTEMPT_HEADER, TOPIC_HEADER};
use crate::error::{Error, ExitCode, Result};
use crate::signature;

/// How far a `webhook-timestamp` may be from now: the Standard Webhooks
/// recommendation, against replays.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// What `serve` does.
pub struct Options {
    /// Port (0: any free port, printed first).
    pub port: u16,
    /// The secret signatures are checked with, when given.
    pub secret: Option<Secret>,
    /// Answer 401 to a request that does not verify.
    pub reject_invalid: bool,
    /// The status to answer everything else with.
    pub status: u16,
    /// Stop after this many requests (else serve forever).
    pub count: Option<u64>,
    /// Serve from a forked process once the port is bound, and return:
    /// the next shell command finds the receiver listening.
    pub detach: bool,
}

/// Whether a request's signature verifies: `valid`, `INVALID` (no
/// signature matches) or `STALE` (its timestamp is more than the tolerance
/// away from `now`, Unix seconds).
pub fn verdict(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: i64,
) -> &'static str {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return "INVALID";
    };
    if !signature::verify(secret, id, ts, body, signature) {
        "INVALID"
    } else if (now - ts).abs() > TIMESTAMP_TOLERANCE_SECS {
        "STALE"
    } else {
        "valid"
    }
}

/// Serves on 127.0.0.1, answering every request with `options.status` (401
/// to one that does not verify, with `reject_invalid`), until `count`
/// requests have come (or forever).
pub fn serve(options: Options) -> Result<()> {
    let port = options.port;
    let cannot = |e: std::io::Error| {
        Error::new(
            ExitCode::Unavailable,
            format!("cannot listen on 127.0.0.1:{port}: {e}"),
        )
    };
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).map_err(cannot)?;
    let addr = listener.local_addr().map_err(cannot)?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    }
    if options.detach {
        // SAFETY: this process has one thread (tiny_http starts its own
        // only below, in whichever process serves).
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Parent { .. }) => return Ok(()),
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = nix::unistd::setsid();
            }
            Err(e) => return Err(Error::new(ExitCode::OsErr, format!("cannot detach: {e}"))),
        }
    }
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| Error::new(ExitCode::Unavailable, format!("receiver: {e}")))?;
    let mut out = std::io::stdout().lock();
    let mut seen = 0;
    while options.count.is_none_or(|c| seen < c) {
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
        let now = crate::store::now_ms();
        let verdict = match &options.secret {
            None => "not checked",
            Some(secret) => verdict(secret, &id, &ts, &body, &sig, now / 1000),
        };
        let status = if options.reject_invalid && verdict != "valid" {
            401
        } else {
            options.status
        };
        let _ = writeln!(
            out,
            "{} {} id={id} topic={topic} account={account} attempt={attempt} signature={verdict} status={status} received_ms={now} body={}",
            request.method(),
            request.url(),
            String::from_utf8_lossy(&body)
        );
        let _ = out.flush();
        let _ = request.respond(tiny_http::Response::empty(status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_within_the_timestamp_tolerance() {
        let secret = Secret::parse("whsec_c2VjcmV0").unwrap();
        let sig = signature::sign(std::slice::from_ref(&secret), "msg_1", 1_000, b"{}");
        assert_eq!(
            verdict(&secret, "msg_1", "1000", b"{}", &sig, 1_000),
            "valid"
        );
        assert_eq!(
            verdict(&secret, "msg_1", "1000", b"{}", &sig, 1_000 + 300),
            "valid"
        );
        assert_eq!(
            verdict(&secret, "msg_1", "1000", b"{}", &sig, 1_000 + 301),
            "STALE"
        );
        assert_eq!(
            verdict(&secret, "msg_1", "1000", b"{}", &sig, 1_000 - 301),
            "STALE"
        );
        assert_eq!(
            verdict(&secret, "msg_2", "1000", b"{}", &sig, 1_000),
            "INVALID"
        );
        assert_eq!(
            verdict(&secret, "msg_1", "x", b"{}", &sig, 1_000),
            "INVALID"
        );
    }
}
