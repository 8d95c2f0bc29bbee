//! Learned rates in the store: what the lease and finish transactions of
//! both backends do with `adaptive`'s decisions, written once over the few
//! operations each backend provides ([`RateOps`]). The decisions are pure
//! (`adaptive`); these say which rows they move.

use super::candidate::{Health, cap};
use super::{EndpointLimits, FinishAttempt};
use crate::adaptive::{self, Latency, Learned, RateChange, Step};

/// What learning a rate asks of a backend, inside its transaction (on
/// PostgreSQL, under the endpoint's advisory lock).
pub(super) trait RateOps {
    /// The backend's error.
    type Error;

    /// Stores what `endpoint` has learned (None: nothing).
    fn set_learned(
        &mut self,
        endpoint: &str,
        learned: Option<&Learned>,
        now: i64,
    ) -> Result<(), Self::Error>;

    /// The earliest reserved slot of `endpoint` (of its delayed deliveries
    /// held by its rate), due or not.
    fn earliest_slot(&mut self, endpoint: &str) -> Result<Option<f64>, Self::Error>;

    /// Gives the first `limit` (None: all) reserved slots of `endpoint`, in
    /// their order, slots again `interval` apart from `first`; returns how
    /// many slots the numbering covered (a row a lease holds meanwhile keeps
    /// its slot and counts).
    fn respace(
        &mut self,
        endpoint: &str,
        first: f64,
        interval: f64,
        limit: Option<u64>,
        now: i64,
    ) -> Result<u64, Self::Error>;

    /// Moves every reserved slot of `endpoint` to the ready queue.
    fn release_slots(&mut self, endpoint: &str, now: i64) -> Result<(), Self::Error>;

    /// Sets the TAT of `endpoint`'s rate.
    fn set_tat(&mut self, endpoint: &str, tat: f64) -> Result<(), Self::Error>;

    /// How many deliveries `endpoint` took (delivered) in the second
    /// before `now`.
    fn took_last_second(&mut self, endpoint: &str, now: i64) -> Result<u64, Self::Error>;

    /// Whether `endpoint` has deliveries waiting for it (ready, or held by
    /// its rate or its cool-down): whether it was sent all it would take.
    fn has_backlog(&mut self, endpoint: &str) -> Result<bool, Self::Error>;

    /// Stores `endpoint`'s answer times.
    fn set_latency(
        &mut self,
        endpoint: &str,
        latency: &Latency,
        now: i64,
    ) -> Result<(), Self::Error>;
}

/// Applies a step of increase to `endpoint` (a lease of it went), while
/// deliveries wait for it (an endpoint sent all it gets shows nothing of
/// what it could take): its new rate, and its next reserved slots spaced
/// at it, from the earliest (a due slot a child was forked for stays due).
/// The next few seconds' worth of slots, since the next step reaches the
/// rest; all of them at the last step (the configured rate reached).
/// Forgotten, its slots go to the ready queue: nothing holds them any
/// more.
pub(super) fn grow<O: RateOps>(
    ops: &mut O,
    endpoint: &str,
    step: Step,
    now: i64,
) -> Result<(), O::Error> {
    if !ops.has_backlog(endpoint)? {
        return Ok(());
    }
    let Step::To { learned, last } = step else {
        ops.release_slots(endpoint, now)?;
        return ops.set_learned(endpoint, None, now);
    };
    if let Some(earliest) = ops.earliest_slot(endpoint)? {
        let interval = 1000.0 / learned.rate;
        let limit = (!last).then(|| adaptive::respace_ahead(learned.rate));
        let moved = ops.respace(endpoint, earliest, interval, limit, now)?;
        if limit.is_none_or(|limit| moved < limit) {
            // All of them, closer: the rate's next slot follows them, and
            // the one going now.
            let next = (earliest + moved as f64 * interval).max(now as f64 + interval);
            ops.set_tat(endpoint, next)?;
        }
    }
    ops.set_learned(endpoint, Some(&learned), now)
}

/// Lowers the learned rate of `f`'s endpoint on an overload signal `why`
/// (see `adaptive::slow_down`), and spaces all its reserved slots again at
/// the new rate from `start` (its cool-down's end), its rate's next slot
/// after them. Only while the endpoint has deliveries waiting: an endpoint
/// sent all it would take shows its capacity in what it took; one sent
/// little (a 503 while it deploys) shows only its traffic.
pub(super) fn slow_down<O: RateOps>(
    ops: &mut O,
    f: &FinishAttempt,
    limits: &EndpointLimits,
    health: &Health,
    why: RateChange,
    start: i64,
) -> Result<(), O::Error> {
    if !limits.adaptive {
        return Ok(());
    }
    let took = ops.took_last_second(&f.endpoint, f.now)?;
    let current = health.learned.as_ref();
    // Nothing learned and nothing taken: nothing to learn (and nothing
    // more to read before the breaker's commit).
    if (current.is_none() && took == 0) || !ops.has_backlog(&f.endpoint)? {
        return Ok(());
    }
    let started = f.now - f.duration_ms;
    let Some(l) = adaptive::slow_down(current, took, started, why, f.now, cap(limits)) else {
        return Ok(());
    };
    ops.set_learned(&f.endpoint, Some(&l), f.now)?;
    let interval = 1000.0 / l.rate;
    // From the cool-down's end, or the earliest slot if later.
    let start = start as f64;
    let first = ops
        .earliest_slot(&f.endpoint)?
        .map_or(start, |e| e.max(start));
    let moved = ops.respace(&f.endpoint, first, interval, None, f.now)?;
    ops.set_tat(&f.endpoint, first + moved as f64 * interval)
}

/// Records a confirm-mode answer's time, from the answer times before it
/// (`previous`, read without a lock); answers slowing down lower the rate
/// (`slow_down`), from the endpoint's state as `lock` reads it again under
/// the endpoint's lock, taken before any write of its row (the order
/// leases take them in).
pub(super) fn observe_answer<O: RateOps>(
    ops: &mut O,
    f: &FinishAttempt,
    limits: &EndpointLimits,
    previous: Option<Latency>,
    answer_ms: i64,
    lock: impl FnOnce(&mut O) -> Result<Health, O::Error>,
) -> Result<(), O::Error> {
    let latency = adaptive::observe(previous, answer_ms as f64);
    let locked = if adaptive::slowing(&latency) {
        Some(lock(ops)?)
    } else {
        None
    };
    ops.set_latency(&f.endpoint, &latency, f.now)?;
    match locked {
        Some(health) => slow_down(ops, f, limits, &health, RateChange::SlowAnswers, f.now),
        None => Ok(()),
    }
}
