//! What both backends read of a delivery a lease looks at (its row, its
//! endpoint's breaker and learned rate, the queue it came from) and of an
//! endpoint a finish reports on, with the decisions they share.

use super::{Queue, held_for};
use crate::adaptive::{self, Latency, Learned, RateChange};
use crate::saturation::{self, EndpointLimits, Hold, LeasePolicy, RateKind};

/// A delivery a lease transaction is looking at.
pub(super) struct Candidate {
    pub id: i64,
    pub endpoint: String,
    pub account: String,
    pub reason: Option<String>,
    pub not_before: i64,
    /// Its endpoint's breaker: saturated until, signals in a row.
    pub saturated_until: Option<i64>,
    pub failures: u32,
    /// Its endpoint's learned rate.
    pub learned: Option<Learned>,
    pub from: Queue,
}

impl Candidate {
    /// Its key of `kind`: its account or its endpoint.
    pub fn key(&self, kind: RateKind) -> &str {
        match kind {
            RateKind::Account => &self.account,
            RateKind::Endpoint => &self.endpoint,
        }
    }

    /// What `saturation::decide` looks at.
    pub fn view(&self) -> saturation::Candidate<'_> {
        saturation::Candidate {
            endpoint: &self.endpoint,
            account: &self.account,
            held_for: self.reason.as_deref().and_then(held_for),
            not_before: self.not_before,
            saturated_until: self.saturated_until,
            failures: self.failures,
            learned_rate: self.learned.map(|l| l.rate),
        }
    }

    /// The step of increase its endpoint's learned rate is due, if any:
    /// the endpoint learns its rate, has learned one, and its breaker is
    /// closed (deliveries go without a signal).
    pub fn growth_step(&self, policy: &dyn LeasePolicy, now: i64) -> Option<adaptive::Step> {
        let limits = policy.endpoint_limits(&self.endpoint)?;
        let closed = self.failures == 0 && self.saturated_until.is_none_or(|u| u <= now);
        if !limits.adaptive || !closed {
            return None;
        }
        adaptive::grow(self.learned.as_ref()?, now, cap(&limits))
    }
}

/// Slots from this time on are fresh, for a group held by its endpoint's
/// rate: they go when they come, uncharged. Held by its breaker, a group
/// moves whole (no slot can go while it is open).
pub(super) fn fresh_since(hold: &Hold, now: i64) -> i64 {
    match hold.rate {
        Some(_) => now - hold.slot_grace_ms as i64,
        None => i64::MAX,
    }
}

/// The configured rate a learned one never exceeds.
pub(super) fn cap(limits: &EndpointLimits) -> Option<f64> {
    limits.rate.map(|r| r.per_second)
}

/// The columns of `endpoint_health` that hold what an endpoint learned, in
/// [`learned`]'s order.
pub(super) const LEARNED_COLUMNS: &str =
    "learned_rate, rate_ceiling, rate_changed_at, rate_reason, rate_decreased_at";

/// The learned state stored in `endpoint_health` ([`LEARNED_COLUMNS`]), if
/// any.
pub(super) fn learned(
    rate: Option<f64>,
    ceiling: Option<f64>,
    changed_at: Option<i64>,
    reason: Option<String>,
    decreased_at: Option<i64>,
) -> Option<Learned> {
    Some(Learned {
        rate: rate?,
        ceiling: ceiling.unwrap_or(rate?),
        changed_at: changed_at.unwrap_or(0),
        reason: reason
            .as_deref()
            .and_then(RateChange::parse)
            .unwrap_or(RateChange::Increase),
        decreased_at: decreased_at.unwrap_or(0),
    })
}

/// The answer times stored in `endpoint_health` (`latency_ms`,
/// `latency_base_ms`), if any.
pub(super) fn latency(recent_ms: Option<f64>, base_ms: Option<f64>) -> Option<Latency> {
    Some(Latency {
        recent_ms: recent_ms?,
        base_ms: base_ms?,
    })
}

/// The columns of `endpoint_health` a finish reads, in [`Health`]'s order:
/// the breaker (3), [`LEARNED_COLUMNS`] (5), the answer times (2).
pub(super) const HEALTH_COLUMNS: &str = "saturated_until, failures, silent, learned_rate, \
     rate_ceiling, rate_changed_at, rate_reason, rate_decreased_at, latency_ms, latency_base_ms";

/// An endpoint's state as a finish reads it (a healthy endpoint has no row).
#[derive(Default)]
pub(super) struct Health {
    /// Its breaker: open until, signals in a row.
    pub saturated_until: Option<i64>,
    pub failures: u32,
    /// Fire-and-forget answers missing in a row.
    pub silent: u32,
    /// Its learned rate, and its confirm-mode answer times.
    pub learned: Option<Learned>,
    pub latency: Option<Latency>,
}

impl Health {
    /// Whether an overload signal at `now` lowers the learned rate: not
    /// while the breaker it opens was already open (children in flight
    /// when it opened add nothing to one signal, as they add no repeat to
    /// the breaker).
    pub fn slows_at(&self, now: i64) -> bool {
        self.saturated_until.is_none_or(|until| until <= now)
    }
}
