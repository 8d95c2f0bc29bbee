//! Adaptive endpoint rates: what cronpost learns of a receiver's rate limit,
//! which its users seldom know and which changes. Pure decisions, AIMD as
//! TCP does for a congestion window:
//!
//! - Multiplicative decrease: an overload signal (429, 503, a confirm-mode
//!   timeout, `slow_after` silences, answers slowing down) sets the rate to
//!   [`BACKOFF`] times what the endpoint took in the second before (or the
//!   rate in force, if lower): a limit of 100/s is learned from one 429 as
//!   95/s, not halved. The decrease starts from what was measured, not from
//!   what was sent, so it needs no deep cut to land below the limit.
//! - Hold, then additive increase: the rate a decrease set holds for
//!   [`HOLD_MS`] (what the endpoint just took is the likeliest limit, and
//!   sending at 95% of it is as close as the sending's own jitter allows:
//!   a climb to 97–98% crossed a limit counted per second again, each
//!   crossing costing a Retry-After's pause; CUBIC likewise dwells by its
//!   last maximum). Then, while deliveries go without a signal, it climbs
//!   back linearly to what the endpoint took, in [`RECOVERY_MS`], a step
//!   at a time (at most one a second, each worth at most [`MAX_STEP_MS`]
//!   of climbing, so a quiet endpoint does not grow; the store takes
//!   steps only while deliveries wait for the endpoint); past it, the
//!   climb speeds up (the excess doubles each `RECOVERY_MS`, as CUBIC
//!   probes past its last maximum), so a limit that was raised is found
//!   within minutes. A fixed limit is crossed again about once a minute
//!   (BENCHMARKS.md, "Learned rates"). A rate grown to [`FORGET_FACTOR`]
//!   times what the endpoint took is forgotten: nothing is learned any
//!   more.
//!
//! Never above a configured `rate`. The store keeps the state (shared by
//! overlapping runs and hosts) and applies these in its transactions.

/// Why an endpoint's learned rate last changed (stored as `rate_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateChange {
    /// A step of additive increase.
    Increase,
    /// The endpoint answered 429.
    Http429,
    /// The endpoint answered 503.
    Http503,
    /// No answer within a confirm-mode timeout (or a child killed at its
    /// deadline waiting on it).
    Timeout,
    /// `slow_after` fire-and-forget answers missing in a row.
    Silent,
    /// Its confirm-mode answers took much longer than they used to.
    SlowAnswers,
}

impl RateChange {
    /// Every reason, as stored.
    pub const ALL: [RateChange; 6] = [
        RateChange::Increase,
        RateChange::Http429,
        RateChange::Http503,
        RateChange::Timeout,
        RateChange::Silent,
        RateChange::SlowAnswers,
    ];

    /// The name stored in `endpoint_health.rate_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateChange::Increase => "increase",
            RateChange::Http429 => "http_429",
            RateChange::Http503 => "http_503",
            RateChange::Timeout => "timeout",
            RateChange::Silent => "silent",
            RateChange::SlowAnswers => "slow_answers",
        }
    }

    /// The reason stored as `name`.
    pub fn parse(name: &str) -> Option<RateChange> {
        RateChange::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// How `stats` says it.
    pub fn describe(self) -> &'static str {
        match self {
            RateChange::Increase => "raised while answers were good",
            RateChange::Http429 => "lowered on HTTP 429",
            RateChange::Http503 => "lowered on HTTP 503",
            RateChange::Timeout => "lowered on a timeout",
            RateChange::Silent => "lowered on answers missing (slow_after)",
            RateChange::SlowAnswers => "lowered as answers slowed down",
        }
    }
}

/// What an endpoint has learned of its rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Learned {
    /// Deliveries a second now in force.
    pub rate: f64,
    /// What the endpoint took (a second) when it last pushed back: the
    /// rate climbs back to it slowly and past it faster.
    pub ceiling: f64,
    /// When `rate` last changed (ms).
    pub changed_at: i64,
    /// Why.
    pub reason: RateChange,
    /// When it was last lowered (ms): signals from attempts that started
    /// before then are already counted.
    pub decreased_at: i64,
}

/// The factor of a decrease.
pub const BACKOFF: f64 = 0.95;
/// How long the rate a decrease set holds before it climbs (ms).
pub const HOLD_MS: i64 = 30_000;
/// How long the climb back to the ceiling takes (ms).
pub const RECOVERY_MS: f64 = 30_000.0;
/// Steps of increase are at least this far apart (ms).
pub const STEP_MS: i64 = 1_000;
/// One step climbs at most this long's worth (ms): growth happens while
/// deliveries go, not while the endpoint is quiet.
pub const MAX_STEP_MS: i64 = 5_000;
/// The lowest rate learned (a second).
pub const MIN_RATE: f64 = 0.1;
/// A rate grown this many times past the ceiling without a signal is
/// forgotten.
pub const FORGET_FACTOR: f64 = 8.0;

/// What a step of increase does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// The new state; `last` when it reached the configured rate (no step
    /// follows it).
    To {
        /// The new state.
        learned: Learned,
        /// Whether it reached the configured rate.
        last: bool,
    },
    /// Nothing learned any more: the limit is gone or far above.
    Forget,
}

/// The step of additive increase due at `now`, if one is: at least
/// [`STEP_MS`] after the last change and after the [`HOLD_MS`] that
/// follows a decrease, never above `cap` (a configured rate).
pub fn grow(l: &Learned, now: i64, cap: Option<f64>) -> Option<Step> {
    let elapsed = now - l.changed_at.max(l.decreased_at + HOLD_MS);
    if elapsed < STEP_MS {
        return None;
    }
    let cap = cap.unwrap_or(f64::INFINITY);
    if l.rate >= cap {
        return None;
    }
    let seconds = elapsed.min(MAX_STEP_MS) as f64 / 1000.0;
    let recovery = RECOVERY_MS / 1000.0;
    let additive = l.ceiling * (1.0 - BACKOFF) / recovery;
    let rate = if l.rate < l.ceiling {
        (l.rate + additive * seconds).min(l.ceiling)
    } else {
        let excess = l.rate - l.ceiling;
        l.rate + (additive + excess * std::f64::consts::LN_2 / recovery) * seconds
    };
    if rate >= FORGET_FACTOR * l.ceiling && cap.is_infinite() {
        return Some(Step::Forget);
    }
    Some(Step::To {
        learned: Learned {
            rate: rate.min(cap),
            changed_at: now,
            reason: RateChange::Increase,
            ..*l
        },
        last: rate >= cap,
    })
}

/// The decrease an overload signal `why` at `now` makes, from the state
/// `current` and `took`, the deliveries the endpoint accepted in the
/// second before; None when it makes none: the attempt started before the
/// last decrease (children in flight then add nothing to one signal), or
/// answers slowed down within [`STEP_MS`] of it (answer times are smoothed:
/// they show a decrease late), or nothing is learned and nothing was taken
/// (a refusal from the first request says nothing of a rate).
pub fn slow_down(
    current: Option<&Learned>,
    took: u64,
    attempt_started: i64,
    why: RateChange,
    now: i64,
    cap: Option<f64>,
) -> Option<Learned> {
    if let Some(l) = current
        && (attempt_started <= l.decreased_at
            || why == RateChange::SlowAnswers && now - l.decreased_at < STEP_MS)
    {
        return None;
    }
    let took = took as f64;
    let ceiling = match current {
        Some(l) if took > 0.0 => l.rate.min(took),
        Some(l) => l.rate,
        None if took > 0.0 => took,
        None => return None,
    };
    let ceiling = ceiling.min(cap.unwrap_or(f64::INFINITY));
    Some(Learned {
        rate: (ceiling * BACKOFF).max(MIN_RATE),
        ceiling,
        changed_at: now,
        reason: why,
        decreased_at: now,
    })
}

/// An endpoint's confirm-mode answer times, smoothed twice: `recent`
/// follows them closely (the last ten or so), `base` slowly (the last
/// hundred or so), as Netflix's Gradient2 limiter compares a short and a
/// long average: a receiver whose answers merely vary keeps the two close,
/// one that slows down under load pulls `recent` away; a lasting change
/// becomes the new `base` in a few hundred answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    /// The recent answer time (ms, exponentially smoothed).
    pub recent_ms: f64,
    /// The baseline (ms).
    pub base_ms: f64,
}

/// The answer times after one more answer that took `sample_ms`. An
/// answer counts as at most [`OUTLIER_FACTOR`] times the baseline (or
/// three times [`SLOWER_BY_MS`] over it, for fast receivers): one slow
/// answer (a new connection's handshake, a pause) is not a slowdown; it
/// takes about five in a row to make a signal.
pub fn observe(previous: Option<Latency>, sample_ms: f64) -> Latency {
    match previous {
        None => Latency {
            recent_ms: sample_ms,
            base_ms: sample_ms,
        },
        Some(l) => {
            let clip = (OUTLIER_FACTOR * l.base_ms).max(l.base_ms + 3.0 * SLOWER_BY_MS);
            let sample = sample_ms.min(clip);
            Latency {
                recent_ms: l.recent_ms + (sample - l.recent_ms) * 0.1,
                base_ms: l.base_ms + (sample - l.base_ms) * 0.01,
            }
        }
    }
}

/// See [`observe`].
pub const OUTLIER_FACTOR: f64 = 3.0;

/// Whether answers have slowed down enough to be an overload signal: the
/// recent answer time over twice the baseline, and by more than
/// [`SLOWER_BY_MS`] (a receiver answering in 1 ms that now takes 3 is
/// not overloaded).
pub fn slowing(l: &Latency) -> bool {
    l.recent_ms > 2.0 * l.base_ms && l.recent_ms - l.base_ms > SLOWER_BY_MS
}

/// See [`slowing`].
pub const SLOWER_BY_MS: f64 = 20.0;

/// How far ahead a step of increase spaces an endpoint's reserved slots
/// again at its new rate (ms): the later ones keep theirs (further apart)
/// until a later step reaches them (steps come a second apart), so a
/// step's work stays a few seconds' worth of rows.
pub const RESPACE_AHEAD_MS: f64 = 3_000.0;

/// How many reserved slots a step of increase spaces again at `rate`.
pub fn respace_ahead(rate: f64) -> u64 {
    (rate * RESPACE_AHEAD_MS / 1000.0).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned(rate: f64, ceiling: f64, changed_at: i64, reason: RateChange) -> Learned {
        Learned {
            rate,
            ceiling,
            changed_at,
            reason,
            decreased_at: changed_at,
        }
    }

    /// The next step's state, which must be one.
    fn step(l: &Learned, now: i64, cap: Option<f64>) -> Learned {
        match grow(l, now, cap) {
            Some(Step::To { learned, .. }) => learned,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_signal_learns_ninety_five_percent_of_what_the_endpoint_took() {
        // Nothing learned, flooding: it took 100 in the last second.
        let l = slow_down(None, 100, 500, RateChange::Http429, 1_000, None).unwrap();
        assert_eq!((l.rate, l.ceiling), (95.0, 100.0));
        // Children in flight before it add nothing, even after a step up.
        assert_eq!(
            slow_down(Some(&l), 100, 900, RateChange::Http429, 1_010, None),
            None
        );
        let stepped = step(&l, 1_000 + HOLD_MS + 1_000, None);
        assert_eq!(
            slow_down(Some(&stepped), 100, 900, RateChange::Timeout, 60_000, None),
            None
        );
        // A later one: from the lower of the rate and what it took.
        let again = slow_down(Some(&l), 20, 1_500, RateChange::Http429, 2_000, None).unwrap();
        assert_eq!((again.rate, again.ceiling), (19.0, 20.0));
        // Answers slowing down lower it at most once a second.
        assert_eq!(
            slow_down(
                Some(&again),
                20,
                2_500,
                RateChange::SlowAnswers,
                2_900,
                None
            ),
            None
        );
        // Nothing learned, nothing taken: no rate from a first refusal.
        assert_eq!(slow_down(None, 0, 0, RateChange::Http503, 10, None), None);
        // Never above a configured rate.
        let capped = slow_down(None, 500, 0, RateChange::Timeout, 10, Some(50.0)).unwrap();
        assert_eq!(capped.ceiling, 50.0);
    }

    #[test]
    fn the_rate_holds_then_climbs_back_in_thirty_seconds_then_probes_faster() {
        let mut l = learned(95.0, 100.0, 0, RateChange::Http429);
        assert_eq!(grow(&l, HOLD_MS + 999, None), None, "it holds first");
        let mut now = HOLD_MS;
        while l.rate < 100.0 - 1e-9 {
            now += 1_000;
            l = step(&l, now, None);
        }
        assert_eq!(now, HOLD_MS + 30_000);
        assert_eq!(l.decreased_at, 0, "steps keep when it was lowered");
        // Past the ceiling, each second climbs more than the one before.
        let steps: Vec<f64> = (0..40)
            .map(|_| {
                now += 1_000;
                let before = l.rate;
                l = step(&l, now, None);
                l.rate - before
            })
            .collect();
        assert!(steps.windows(2).all(|w| w[1] > w[0]), "{steps:?}");
        assert!(l.rate > 105.0 && l.rate < 130.0, "{}", l.rate);
        // A long quiet is worth one step of five seconds.
        let after = step(&l, now + 3_600_000, None);
        assert!(after.rate - l.rate < 10.0 * steps[39]);
    }

    #[test]
    fn a_cap_ends_the_climb_and_a_rate_far_past_its_ceiling_is_forgotten() {
        let l = learned(49.45, 50.0, 0, RateChange::Http429);
        match grow(&l, HOLD_MS + 5_000, Some(49.5)) {
            Some(Step::To { learned, last }) => {
                assert_eq!((learned.rate, last), (49.5, true));
                assert_eq!(grow(&learned, HOLD_MS + 10_000, Some(49.5)), None);
            }
            other => panic!("{other:?}"),
        }
        let far = learned(390.0, 50.0, 0, RateChange::Increase);
        assert_eq!(grow(&far, HOLD_MS + 5_000, None), Some(Step::Forget));
    }

    #[test]
    fn answers_slowing_under_load_are_a_signal_and_answers_that_vary_are_not() {
        let mut l = observe(None, 10.0);
        for _ in 0..50 {
            l = observe(Some(l), 10.0);
        }
        assert!(!slowing(&l));
        // One slow answer, even a very slow one, is not a signal; a few in
        // a row are.
        let once = observe(Some(l), 500.0);
        assert!(!slowing(&once), "{once:?}");
        for _ in 0..5 {
            l = observe(Some(l), 80.0);
        }
        assert!(slowing(&l), "{l:?}");
        // Answers anywhere between 20 and 100 ms (a fixed pseudo-random
        // sequence): a signal on hardly any of them.
        let mut noisy = observe(None, 60.0);
        let mut signals = 0;
        for i in 0..2_000_u64 {
            let sample = 20.0 + (i.wrapping_mul(2_654_435_761) % 81) as f64;
            noisy = observe(Some(noisy), sample);
            signals += usize::from(slowing(&noisy));
        }
        assert!(signals < 20, "{signals} of 2000");
        // A lasting change, 10 to 50 ms: a signal for a while, then the
        // new normal.
        let mut shifted = l;
        for _ in 0..500 {
            shifted = observe(Some(shifted), 50.0);
        }
        assert!(!slowing(&shifted), "{shifted:?}");
        // Fast receivers' jitter is not a signal.
        let mut fast = observe(None, 1.0);
        for _ in 0..20 {
            fast = observe(Some(fast), 5.0);
        }
        assert!(!slowing(&fast), "{fast:?}");
    }
}
