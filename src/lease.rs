//! Lease and acknowledgement: what an attempt's result means for its
//! delivery. Pure decisions, no I/O: a [`PostResult`] (or a child's death)
//! becomes one of the store's named transitions out of `leased`.
//!
//! - 2xx, or no answer in a fire-and-forget window: delivered.
//! - 408, 429, 5xx, connection refused or timed out, a broken connection:
//!   retry after exponential backoff with full jitter (Retry-After honoured,
//!   up to `max_retry_after`), dead once `max_attempts` attempts have failed.
//! - any other status (4xx, 3xx): dead at once, the endpoint refused it.

use std::time::Duration;

use rand::RngExt;

use crate::adaptive::RateChange;
use crate::config::{DeliveryMode, Endpoint};
use crate::delivery::PostResult;
use crate::store::{AttemptOutcome, EndpointSignal, FinishAttempt, Lease, ms, reason};

/// The transition for the result of one POST, with what it says about the
/// endpoint: 429/503, a confirm-mode timeout and a failed connection mean
/// saturation; any other answer means the endpoint is up.
pub fn decide(
    endpoint: &Endpoint,
    lease: &Lease,
    result: &PostResult,
    now: i64,
    duration_ms: i64,
) -> FinishAttempt {
    let healthy = EndpointSignal::Healthy;
    let saturated =
        |retry_after: Option<Duration>, slows: Option<RateChange>| EndpointSignal::Saturated {
            retry_after,
            limits: endpoint.limits(),
            slows,
        };
    let (failure, signal) = match result {
        PostResult::Answered { status, .. } if (200..300).contains(status) => {
            // A confirm-mode answer's time tells whether the receiver slows down.
            let signal = if endpoint.adaptive && endpoint.mode == DeliveryMode::Confirm {
                EndpointSignal::Answered {
                    answer_ms: duration_ms,
                    limits: endpoint.limits(),
                }
            } else {
                healthy
            };
            return FinishAttempt::delivered(lease, now, AttemptOutcome::Delivered)
                .with_answer(Some(*status), duration_ms)
                .with_signal(signal);
        }
        PostResult::NoAnswer if endpoint.mode == DeliveryMode::FireAndForget => {
            // Handed over; with slow_after, silence in a row is saturation too.
            let signal = match endpoint.slow_after {
                Some(_) => EndpointSignal::Silent {
                    limits: endpoint.limits(),
                },
                None => healthy,
            };
            return FinishAttempt::delivered(lease, now, AttemptOutcome::HandedOver)
                .with_answer(None, duration_ms)
                .with_signal(signal);
        }
        PostResult::Answered {
            status,
            retry_after,
        } if is_retryable(*status) => (
            Failure {
                error: format!("HTTP {status}"),
                status: Some(*status),
                at_least: *retry_after,
            },
            match status {
                429 => saturated(*retry_after, Some(RateChange::Http429)),
                503 => saturated(*retry_after, Some(RateChange::Http503)),
                _ => healthy,
            },
        ),
        PostResult::Answered { status, .. } => {
            let error = format!("HTTP {status}: permanent failure");
            return FinishAttempt::dead(lease, now, reason::REJECTED, error)
                .with_answer(Some(*status), duration_ms)
                .with_signal(healthy);
        }
        PostResult::NoAnswer => (
            Failure::new(format!(
                "no answer within {}",
                humantime::format_duration(endpoint.timeout)
            )),
            saturated(None, Some(RateChange::Timeout)),
        ),
        PostResult::ConnectFailed(e) => (
            Failure::new(format!("connect failed: {e}")),
            saturated(None, None),
        ),
        PostResult::Failed(e) => (Failure::new(e.clone()), EndpointSignal::Unknown),
    };
    retry_or_dead(endpoint, lease, now, failure.error, failure.at_least)
        .with_answer(failure.status, duration_ms)
        .with_signal(signal)
}

/// The transition for a delivery whose child died holding its lease: a failed
/// attempt like any other, so a message that kills its child cannot loop
/// forever. A child killed at its deadline waited too long on its endpoint:
/// that is saturation.
pub fn after_child_death(
    endpoint: &Endpoint,
    lease: &Lease,
    now: i64,
    how: &str,
    timed_out: bool,
) -> FinishAttempt {
    let signal = if timed_out {
        EndpointSignal::Saturated {
            retry_after: None,
            limits: endpoint.limits(),
            slows: Some(RateChange::Timeout),
        }
    } else {
        EndpointSignal::Unknown
    };
    retry_or_dead(
        endpoint,
        lease,
        now,
        format!("child {how} before it finished"),
        None,
    )
    .by_dead_child()
    .with_signal(signal)
}

struct Failure {
    error: String,
    status: Option<u16>,
    at_least: Option<Duration>,
}

impl Failure {
    /// A failure without an HTTP answer.
    fn new(error: String) -> Failure {
        Failure {
            error,
            status: None,
            at_least: None,
        }
    }
}

fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status)
}

fn retry_or_dead(
    endpoint: &Endpoint,
    lease: &Lease,
    now: i64,
    error: String,
    at_least: Option<Duration>,
) -> FinishAttempt {
    if lease.attempt >= endpoint.max_attempts {
        return FinishAttempt::dead(
            lease,
            now,
            reason::ATTEMPTS_EXHAUSTED,
            format!(
                "{error} (attempt {} of {})",
                lease.attempt, endpoint.max_attempts
            ),
        );
    }
    // Retry-After is honoured up to max_retry_after, as by the breaker.
    let delay = backoff(endpoint, lease.attempt)
        .max(at_least.unwrap_or_default().min(endpoint.max_retry_after));
    FinishAttempt::retry(lease, now, now + ms(delay).max(1), error)
}

/// The delay before retrying after failed attempt number `attempt`: full
/// jitter, uniform in [0, min(cap, base * 2^(attempt-1))].
pub fn backoff(endpoint: &Endpoint, attempt: u32) -> Duration {
    let exp = 2_u32.saturating_pow(attempt.saturating_sub(1));
    let ceiling = endpoint
        .backoff_base
        .saturating_mul(exp)
        .min(endpoint.backoff_cap);
    Duration::from_millis(rand::rng().random_range(0..=ms(ceiling) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::NextState;
    use std::path::Path;

    fn endpoint(mode: &str) -> Endpoint {
        let text = format!(
            "database = \"q.db\"\n[endpoints.e]\nurl = \"http://127.0.0.1:9/\"\ntopics = [\"t\"]\nsecret = \"s\"\nmode = \"{mode}\"\nmax_attempts = 3\nbackoff_base = \"1s\"\nbackoff_cap = \"10s\"\ntimeout = \"5s\"\n"
        );
        Config::parse(&text, Path::new("c.toml"))
            .unwrap()
            .endpoints
            .remove(0)
    }

    fn lease(attempt: u32) -> Lease {
        Lease {
            delivery_id: 1,
            attempt_id: 1,
            attempt,
            owner: "o".into(),
            endpoint: "e".into(),
            message_uid: "msg_1".into(),
            topic: "t".into(),
            account: "a".into(),
            payload: "{}".into(),
            ordering_key: None,
        }
    }

    fn answer(status: u16) -> PostResult {
        PostResult::Answered {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn outcomes_map_to_transitions() {
        let ff = endpoint("fire_and_forget");
        let confirm = endpoint("confirm");
        assert_eq!(
            decide(&ff, &lease(1), &answer(204), 0, 0).next,
            NextState::Delivered
        );
        assert_eq!(
            decide(&ff, &lease(1), &PostResult::NoAnswer, 0, 0).outcome,
            AttemptOutcome::HandedOver
        );
        assert!(matches!(
            decide(&confirm, &lease(1), &PostResult::NoAnswer, 0, 0).next,
            NextState::Retry { .. }
        ));
        assert_eq!(
            decide(&ff, &lease(1), &answer(404), 0, 0).next,
            NextState::Dead {
                reason: reason::REJECTED
            }
        );
        for status in [408, 429, 500, 503] {
            assert!(matches!(
                decide(&ff, &lease(1), &answer(status), 0, 0).next,
                NextState::Retry { .. }
            ));
        }
        assert_eq!(
            decide(&ff, &lease(3), &answer(500), 0, 0).next,
            NextState::Dead {
                reason: reason::ATTEMPTS_EXHAUSTED
            }
        );
        let refused = PostResult::ConnectFailed("refused".into());
        assert!(matches!(
            decide(&ff, &lease(2), &refused, 0, 0).next,
            NextState::Retry { .. }
        ));
        let died = after_child_death(&ff, &lease(3), 0, "was killed", false);
        assert_eq!(
            (died.outcome, died.signal),
            (AttemptOutcome::ChildDied, EndpointSignal::Unknown)
        );
        assert!(matches!(
            after_child_death(&ff, &lease(1), 0, "passed its deadline", true).signal,
            EndpointSignal::Saturated { .. }
        ));
        let signal = |r: &PostResult| decide(&ff, &lease(1), r, 0, 0).signal;
        assert_eq!(signal(&answer(500)), EndpointSignal::Healthy);
        assert_eq!(signal(&answer(404)), EndpointSignal::Healthy);
        assert!(matches!(
            signal(&answer(429)),
            EndpointSignal::Saturated { .. }
        ));
        assert!(matches!(
            signal(&answer(503)),
            EndpointSignal::Saturated { .. }
        ));
        assert!(matches!(signal(&refused), EndpointSignal::Saturated { .. }));
        assert_eq!(
            signal(&PostResult::Failed("reset".into())),
            EndpointSignal::Unknown
        );
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling_and_honours_retry_after() {
        let e = endpoint("fire_and_forget");
        for attempt in 1..=6 {
            let ceiling = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(10));
            assert!(backoff(&e, attempt) <= ceiling);
        }
        let slow = PostResult::Answered {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        };
        match decide(&e, &lease(1), &slow, 1_000, 0).next {
            NextState::Retry { not_before } => assert!(not_before >= 8_000),
            other => panic!("{other:?}"),
        }
    }
}
