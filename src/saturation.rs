//! Saturation policy: who is held back, and until when. Pure decisions the
//! store applies inside its lease and finish transactions.
//!
//! - Rates (per account, per endpoint) are GCRA, the token bucket written as
//!   one "theoretical arrival time" (TAT) per key: a delivery may go at `now`
//!   when `tat <= now + tolerance`, which advances `tat` by one interval.
//!   Deliveries over the rate are rerouted to the delayed queue, each with a
//!   slot of its own reserved in the future (`tat` advances once per slot), so
//!   a flood drains at exactly the rate instead of thrashing in and out.
//! - Endpoint health is a circuit breaker: a saturation signal (429, 503,
//!   timeout, refused connection) opens it for a cool-down (Retry-After when
//!   given, else doubling per repeat up to a cap); when the cool-down ends one
//!   half-open probe may go; any unsaturated answer closes it.

use std::time::Duration;

use crate::config::{Config, Endpoint};
use crate::store::{EndpointLimits, LeasePolicy};

/// A rate with a burst: `per_second` on average, `burst` back to back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Deliveries per second, > 0.
    pub per_second: f64,
    /// Deliveries allowed back to back, >= 1.
    pub burst: u32,
}

impl Rate {
    /// Milliseconds between two deliveries at this rate.
    pub fn interval_ms(&self) -> f64 {
        1000.0 / self.per_second
    }

    /// How far ahead of `now` the TAT may run: the burst.
    pub fn tolerance_ms(&self) -> f64 {
        f64::from(self.burst.saturating_sub(1)) * self.interval_ms()
    }
}

/// What the GCRA says about one delivery at `now`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admit {
    /// It may go now; store `tat`.
    Now {
        /// The new TAT.
        tat: f64,
    },
    /// It may go at `at` (ms) at the earliest.
    Later {
        /// The earliest time.
        at: f64,
    },
}

/// The GCRA decision for a key whose TAT is `tat` (None: never used).
pub fn admit(rate: Rate, tat: Option<f64>, now: f64) -> Admit {
    let tat = tat.unwrap_or(now).max(now);
    if tat <= now + rate.tolerance_ms() {
        Admit::Now {
            tat: tat + rate.interval_ms(),
        }
    } else {
        Admit::Later {
            at: tat - rate.tolerance_ms(),
        }
    }
}

/// Reserves `count` slots from a TAT that is over the burst: the k-th
/// delivery (from 0) may go at `first + k * interval`; returns (first, new TAT).
pub fn reserve(rate: Rate, tat: f64, count: u64) -> (f64, f64) {
    let first = tat - rate.tolerance_ms();
    (first, tat + count as f64 * rate.interval_ms())
}

/// How long an endpoint stays saturated after its `failures`-th signal in a
/// row (1 for the first): Retry-After when it gave one (up to
/// `max_retry_after`), else `cooldown_base` doubling per repeat up to `cooldown_cap`.
pub fn cooldown(limits: &EndpointLimits, failures: u32, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(wait) => wait.min(limits.max_retry_after),
        None => {
            let exp = 2_u32.saturating_pow(failures.saturating_sub(1));
            limits
                .cooldown_base
                .saturating_mul(exp)
                .min(limits.cooldown_cap)
        }
    }
}

impl Endpoint {
    /// The endpoint's limits as the store applies them.
    pub fn limits(&self) -> EndpointLimits {
        EndpointLimits {
            max_in_flight: self.max_in_flight,
            rate: self.rate,
            cooldown_base: self.cooldown_base,
            cooldown_cap: self.cooldown_cap,
            max_retry_after: self.max_retry_after,
        }
    }
}

impl LeasePolicy for Config {
    fn account_rate(&self, account: &str) -> Option<Rate> {
        self.account_budget
            .overrides
            .get(account)
            .copied()
            .or(self.account_budget.default)
    }

    fn endpoint_limits(&self, endpoint: &str) -> Option<EndpointLimits> {
        self.endpoint(endpoint).map(Endpoint::limits)
    }

    fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)> {
        self.endpoints
            .iter()
            .filter_map(|e| e.max_in_flight.map(|cap| (e.name.clone(), cap)))
            .collect()
    }

    fn endpoint_known(&self, endpoint: &str) -> bool {
        self.endpoint(endpoint).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIFTY: Rate = Rate {
        per_second: 50.0,
        burst: 5,
    };

    #[test]
    fn gcra_allows_the_burst_then_spaces_at_the_rate() {
        let mut tat = None;
        for _ in 0..5 {
            match admit(FIFTY, tat, 1000.0) {
                Admit::Now { tat: t } => tat = Some(t),
                other => panic!("burst refused: {other:?}"),
            }
        }
        assert_eq!(tat, Some(1100.0));
        assert_eq!(admit(FIFTY, tat, 1000.0), Admit::Later { at: 1020.0 });
        assert!(matches!(admit(FIFTY, tat, 1020.0), Admit::Now { tat: t } if t == 1120.0));
        // Reserving three slots: at 1020, 1040, 1060; the TAT moves past them.
        assert_eq!(reserve(FIFTY, 1100.0, 3), (1020.0, 1160.0));
    }

    #[test]
    fn cooldown_doubles_to_its_cap_and_honours_retry_after_up_to_its_cap() {
        let limits = EndpointLimits {
            max_in_flight: None,
            rate: None,
            cooldown_base: Duration::from_secs(1),
            cooldown_cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        };
        let waits: Vec<u64> = (1..=5)
            .map(|n| cooldown(&limits, n, None).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        assert_eq!(
            cooldown(&limits, 1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            cooldown(&limits, 1, Some(Duration::from_secs(600))),
            Duration::from_secs(60)
        );
    }
}
