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
//!   half-open probe may go; its unsaturated answer closes it (answers to
//!   requests sent before it opened close nothing).

use std::time::Duration;

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

/// Where an endpoint's breaker goes on a saturation signal at `now`, from
/// `until` (saturated until) and `failures` (signals in a row): returns the
/// new (until, failures). Children already in flight when the breaker
/// opened do not count as repeats: the cool-down grows once per probe, not
/// per child.
pub fn open_breaker(
    limits: &EndpointLimits,
    retry_after: Option<Duration>,
    now: i64,
    until: Option<i64>,
    failures: u32,
) -> (i64, u32) {
    let already_open = until.is_some_and(|u| u > now);
    let failures = if already_open {
        failures.max(1)
    } else {
        failures + 1
    };
    let wait = cooldown(limits, failures, retry_after);
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    (
        until.unwrap_or(0).max(now.saturating_add(wait_ms)),
        failures,
    )
}

/// Whether one more answer that did not come within a fire-and-forget
/// window opens the breaker, after `silent` such answers in a row: at the
/// `slow_after`-th, or at once when the breaker is already open or probing
/// (`failures` > 0: the probe itself went unanswered).
pub fn silence_opens(slow_after: u32, failures: u32, silent: u32) -> bool {
    failures > 0 || silent.saturating_add(1) >= slow_after
}

/// The breaker's `last_error` when silence opened it.
pub fn silence_error(slow_after: u32) -> String {
    format!("no answer within the answer window {slow_after} times in a row (slow_after)")
}

/// An endpoint's limits, as the lease and finish transactions apply them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EndpointLimits {
    /// Leased deliveries at once, across all runs.
    pub max_in_flight: Option<u32>,
    /// Its rate.
    pub rate: Option<Rate>,
    /// Cool-down after a first saturation signal.
    pub cooldown_base: Duration,
    /// Longest cool-down without Retry-After.
    pub cooldown_cap: Duration,
    /// Longest Retry-After honoured.
    pub max_retry_after: Duration,
    /// Fire-and-forget answers missing in a row that open the breaker, as
    /// a 429 would (None: off).
    pub slow_after: Option<u32>,
    /// Whether its rate is learned (`adaptive`): overload signals lower
    /// it, good answers raise it, never above `rate`.
    pub adaptive: bool,
}

impl EndpointLimits {
    /// The rate a lease applies, and whether it is the learned one: the
    /// learned one when the endpoint is adaptive and has learned one below
    /// its configured rate (with no burst: a learned limit is kept evenly),
    /// else the configured one.
    pub fn rate_in_force(&self, learned: Option<f64>) -> Option<(Rate, bool)> {
        match (self.rate, learned.filter(|_| self.adaptive)) {
            (Some(rate), Some(l)) if l >= rate.per_second => Some((rate, false)),
            (_, Some(l)) => Some((
                Rate {
                    per_second: l,
                    burst: 1,
                },
                true,
            )),
            (rate, None) => rate.map(|r| (r, false)),
        }
    }
}

/// The limits a lease must respect, looked up as the lease goes.
pub trait LeasePolicy {
    /// The budget of `account` (None: unlimited).
    fn account_rate(&self, account: &str) -> Option<Rate>;
    /// The limits of `endpoint` (None: none).
    fn endpoint_limits(&self, endpoint: &str) -> Option<EndpointLimits>;
    /// Endpoints with a `max_in_flight`, and their caps.
    fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)>;
    /// Whether `endpoint` is configured; deliveries of one that is not are
    /// parked instead of leased.
    fn endpoint_known(&self, endpoint: &str) -> bool {
        let _ = endpoint;
        true
    }
}

/// Which kind of key a rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKind {
    /// An account's budget.
    Account,
    /// An endpoint's rate.
    Endpoint,
}

impl RateKind {
    /// The name a store keeps the kind's state under.
    pub fn as_str(self) -> &'static str {
        match self {
            RateKind::Account => "account",
            RateKind::Endpoint => "endpoint",
        }
    }
}

/// Why a delivery is held back (a store writes it as the delivery's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldReason {
    /// Its endpoint is not in the config: parked.
    EndpointRemoved,
    /// Its endpoint's breaker is open.
    EndpointSaturated,
    /// Its endpoint is over its rate: a reserved slot.
    EndpointRate,
    /// Its account is over its budget: a reserved slot.
    AccountBudget,
}

/// What the policy needs to know of the delivery a lease looks at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate<'a> {
    /// Its endpoint.
    pub endpoint: &'a str,
    /// Its account.
    pub account: &'a str,
    /// What it was held back for last, when it waits in the delayed queue.
    pub held_for: Option<HoldReason>,
    /// Its `not_before`: the slot it holds, when it holds one.
    pub not_before: i64,
    /// Its endpoint's breaker: open until (None: closed).
    pub saturated_until: Option<i64>,
    /// Its endpoint's saturation signals in a row (> 0: this is a probe).
    pub failures: u32,
    /// Its endpoint's learned rate, if it has one (see `adaptive`).
    pub learned_rate: Option<f64>,
}

/// Why a candidate cannot go now, and when its kind may.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hold {
    /// Why.
    pub reason: HoldReason,
    /// Reroute every ready delivery of the candidate's account, or of its
    /// endpoint.
    pub group: RateKind,
    /// When the first rerouted delivery may go (ms).
    pub first: f64,
    /// Between two rerouted deliveries (0: all at `first`).
    pub interval: f64,
    /// The rate whose TAT advances by one interval per rerouted delivery,
    /// and the TAT to advance from.
    pub rate: Option<(RateKind, Rate, f64)>,
    /// How late a slot of that rate may be taken (see [`slot_grace_ms`]).
    pub slot_grace_ms: f64,
}

/// A rate the lease consumes: store `tat` for the candidate's key of `kind`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Charge {
    /// Which key.
    pub kind: RateKind,
    /// Its new TAT.
    pub tat: f64,
}

/// What to do with a candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Lease it, charging these rates; a probe when its endpoint's breaker
    /// is half-open.
    Go {
        /// Whether it is its endpoint's one half-open probe.
        probe: bool,
        /// The rates it consumes.
        charges: Vec<Charge>,
    },
    /// Hold it (and its group) back.
    Hold(Hold),
}

/// The last millisecond that `not_before` of a parked delivery may hold
/// (year 9999): later than any time a run looks at.
pub const PARKED_UNTIL: i64 = 253_402_300_799_999;

/// Whether a candidate still holds the slot it was given when rerouted for
/// `reason`, taken at most `grace_ms` late ([`slot_grace_ms`]). A slot
/// older was missed (no run was there): the delivery queues again, so
/// missed slots never add a burst on top of the rate.
pub fn holds_fresh_slot(c: &Candidate, reason: HoldReason, grace_ms: f64, now: f64) -> bool {
    c.held_for == Some(reason) && c.not_before as f64 >= now - grace_ms
}

/// How late a reserved slot of `rate` may be taken before it counts as
/// missed: its burst window; for a learned rate (no burst),
/// [`LEARNED_SLOT_GRACE_MS`]. A learned rate's slots are most of its
/// endpoint's traffic, and one a moment late because every child was busy
/// would otherwise be queued at the end and its time lost; but slots taken
/// late go together, and a learned rate (95% of a limit) leaves 5% of a
/// second for such a burst: with 200 ms, the slots that came due while a
/// breaker's probe was out went at once after it and crossed the limit
/// again.
pub fn slot_grace_ms(rate: Rate, learned: bool) -> f64 {
    let window = rate.tolerance_ms() + rate.interval_ms();
    if learned {
        window.max(LEARNED_SLOT_GRACE_MS)
    } else {
        window
    }
}

/// See [`slot_grace_ms`]: the `1 - BACKOFF` share of a second that a
/// learned rate leaves below the limit it was learned from.
pub const LEARNED_SLOT_GRACE_MS: f64 = 50.0;

/// The decision for `c` at `now` under `policy`, reading the TAT of the
/// candidate's key of each kind through `tat`. Both rates are checked
/// before either is charged: a held delivery costs nothing, so an account
/// over its budget does not eat its endpoint's rate.
pub fn decide<E>(
    policy: &dyn LeasePolicy,
    c: &Candidate,
    now: i64,
    mut tat: impl FnMut(RateKind) -> Result<Option<f64>, E>,
) -> Result<Decision, E> {
    let hold = |reason, first| {
        Decision::Hold(Hold {
            reason,
            group: RateKind::Endpoint,
            first,
            interval: 0.0,
            rate: None,
            slot_grace_ms: 0.0,
        })
    };
    if !policy.endpoint_known(c.endpoint) {
        // Parked, with every ready delivery of the endpoint: leasing them
        // would only fail, forever, and eat the forks of the others.
        return Ok(hold(HoldReason::EndpointRemoved, (PARKED_UNTIL - 1) as f64));
    }
    if let Some(until) = c.saturated_until.filter(|&u| u > now) {
        return Ok(hold(HoldReason::EndpointSaturated, until as f64));
    }
    let now_f = now as f64;
    let limits = [
        (
            RateKind::Endpoint,
            policy
                .endpoint_limits(c.endpoint)
                .and_then(|l| l.rate_in_force(c.learned_rate)),
            HoldReason::EndpointRate,
        ),
        (
            RateKind::Account,
            policy.account_rate(c.account).map(|r| (r, false)),
            HoldReason::AccountBudget,
        ),
    ];
    let mut charges = Vec::new();
    for (kind, rate, why) in limits {
        let Some((rate, learned)) = rate else {
            continue;
        };
        let grace = slot_grace_ms(rate, learned);
        if holds_fresh_slot(c, why, grace, now_f) {
            continue;
        }
        let current = tat(kind)?;
        match admit(rate, current, now_f) {
            Admit::Now { tat } => charges.push(Charge { kind, tat }),
            Admit::Later { at } => {
                return Ok(Decision::Hold(Hold {
                    reason: why,
                    group: kind,
                    first: at,
                    interval: rate.interval_ms(),
                    rate: Some((kind, rate, current.unwrap_or(now_f).max(now_f))),
                    slot_grace_ms: grace,
                }));
            }
        }
    }
    Ok(Decision::Go {
        probe: c.failures > 0,
        charges,
    })
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

    /// An account at FIFTY, an endpoint at FIFTY, everything else open.
    struct Both;
    impl LeasePolicy for Both {
        fn account_rate(&self, _: &str) -> Option<Rate> {
            Some(FIFTY)
        }
        fn endpoint_limits(&self, _: &str) -> Option<EndpointLimits> {
            Some(EndpointLimits {
                max_in_flight: None,
                rate: Some(FIFTY),
                cooldown_base: Duration::from_secs(1),
                cooldown_cap: Duration::from_secs(5),
                max_retry_after: Duration::from_secs(60),
                slow_after: None,
                adaptive: false,
            })
        }
        fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)> {
            Vec::new()
        }
    }

    fn ready() -> Candidate<'static> {
        Candidate {
            endpoint: "e",
            account: "a",
            held_for: None,
            not_before: 0,
            saturated_until: None,
            failures: 0,
            learned_rate: None,
        }
    }

    #[test]
    fn both_rates_are_checked_before_either_is_charged() {
        // The endpoint has room, the account has none: held by the
        // account, and the endpoint's rate is not charged.
        let tats = |kind| -> Result<Option<f64>, ()> {
            Ok(match kind {
                RateKind::Endpoint => None,
                RateKind::Account => Some(10_000.0),
            })
        };
        match decide(&Both, &ready(), 1_000, tats).unwrap() {
            Decision::Hold(hold) => {
                assert_eq!(
                    (hold.reason, hold.group),
                    (HoldReason::AccountBudget, RateKind::Account)
                );
                assert_eq!(hold.first, 10_000.0 - FIFTY.tolerance_ms());
            }
            other => panic!("{other:?}"),
        }
        // Both have room: both charged, one interval each.
        let open = |_| -> Result<Option<f64>, ()> { Ok(None) };
        match decide(&Both, &ready(), 1_000, open).unwrap() {
            Decision::Go { probe, charges } => {
                assert!(!probe);
                let kinds: Vec<RateKind> = charges.iter().map(|c| c.kind).collect();
                assert_eq!(kinds, [RateKind::Endpoint, RateKind::Account]);
                assert!(charges.iter().all(|c| c.tat == 1_020.0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fresh_slot_goes_uncharged_and_a_missed_one_queues_again() {
        let full = |_| -> Result<Option<f64>, ()> { Ok(Some(1_000_000.0)) };
        // Its slot (not_before) has just come: it goes, charging nothing.
        let slot = Candidate {
            held_for: Some(HoldReason::AccountBudget),
            not_before: 5_000,
            ..ready()
        };
        let endpoint_only = |kind| -> Result<Option<f64>, ()> {
            Ok(match kind {
                RateKind::Endpoint => None,
                RateKind::Account => Some(1_000_000.0),
            })
        };
        match decide(&Both, &slot, 5_010, endpoint_only).unwrap() {
            Decision::Go { charges, .. } => {
                assert_eq!(charges.len(), 1, "only the endpoint: {charges:?}");
                assert_eq!(charges[0].kind, RateKind::Endpoint);
            }
            other => panic!("{other:?}"),
        }
        // Missed by more than the burst window: it queues again.
        assert!(matches!(
            decide(&Both, &slot, 5_000 + 101, full).unwrap(),
            Decision::Hold(_)
        ));
    }

    #[test]
    fn an_open_breaker_or_a_removed_endpoint_holds_before_any_rate() {
        struct Removed;
        impl LeasePolicy for Removed {
            fn account_rate(&self, _: &str) -> Option<Rate> {
                None
            }
            fn endpoint_limits(&self, _: &str) -> Option<EndpointLimits> {
                None
            }
            fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)> {
                Vec::new()
            }
            fn endpoint_known(&self, _: &str) -> bool {
                false
            }
        }
        let never = |_| -> Result<Option<f64>, ()> { panic!("no rate is read") };
        match decide(&Removed, &ready(), 0, never).unwrap() {
            Decision::Hold(hold) => assert_eq!(hold.reason, HoldReason::EndpointRemoved),
            other => panic!("{other:?}"),
        }
        let open = Candidate {
            saturated_until: Some(9_000),
            failures: 2,
            ..ready()
        };
        match decide(&Both, &open, 1_000, never).unwrap() {
            Decision::Hold(hold) => assert_eq!(
                (hold.reason, hold.first),
                (HoldReason::EndpointSaturated, 9_000.0)
            ),
            other => panic!("{other:?}"),
        }
        let half_open = Candidate {
            saturated_until: Some(500),
            failures: 2,
            ..ready()
        };
        let room = |_| -> Result<Option<f64>, ()> { Ok(None) };
        assert!(matches!(
            decide(&Both, &half_open, 1_000, room).unwrap(),
            Decision::Go { probe: true, .. }
        ));
    }

    #[test]
    fn cooldown_doubles_to_its_cap_and_honours_retry_after_up_to_its_cap() {
        let limits = EndpointLimits {
            max_in_flight: None,
            rate: None,
            cooldown_base: Duration::from_secs(1),
            cooldown_cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
            slow_after: None,
            adaptive: false,
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

    #[test]
    fn silence_opens_at_the_kth_answer_missing_or_at_a_silent_probe() {
        assert!(!silence_opens(3, 0, 0));
        assert!(!silence_opens(3, 0, 1));
        assert!(silence_opens(3, 0, 2));
        assert!(silence_opens(1, 0, 0));
        assert!(silence_opens(3, 1, 0), "the probe went unanswered");
    }

    #[test]
    fn a_breaker_opened_while_open_does_not_count_a_repeat() {
        let limits = EndpointLimits {
            max_in_flight: None,
            rate: None,
            cooldown_base: Duration::from_secs(1),
            cooldown_cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
            slow_after: None,
            adaptive: false,
        };
        assert_eq!(open_breaker(&limits, None, 1_000, None, 0), (2_000, 1));
        // Open until 2,000: a child in flight since reports; no repeat.
        assert_eq!(
            open_breaker(&limits, None, 1_500, Some(2_000), 1),
            (2_500, 1)
        );
        // The probe after the cool-down: a repeat, twice as long.
        assert_eq!(
            open_breaker(&limits, None, 3_000, Some(2_000), 1),
            (5_000, 2)
        );
    }
}
