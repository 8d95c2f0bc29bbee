//! Holding back: budgets, rates, breakers, in-flight caps, removed endpoints.

use super::*;

fn messages_of(store: &mut dyn Store, pairs: &[(&str, &str)]) {
    let messages: Vec<NewMessage> = pairs
        .iter()
        .map(|(topic, account)| NewMessage {
            account: account.to_string(),
            ..message(topic, 0)
        })
        .collect();
    store.messages_insert(&messages).unwrap();
    route(store, T0);
}

pub fn an_account_over_budget_is_rerouted_with_one_reserved_slot_per_delivery(
    store: &mut dyn Store,
) {
    subscribe(store, &[("t", "e")]);
    messages_of(
        store,
        &[
            ("t", "noisy"),
            ("t", "noisy"),
            ("t", "noisy"),
            ("t", "noisy"),
            ("t", "noisy"),
            ("t", "quiet"),
        ],
    );
    let mut policy = Policy::default();
    policy.accounts.insert(
        "noisy".into(),
        Rate {
            per_second: 1.0,
            burst: 2,
        },
    );
    // The burst goes at once; the third noisy delivery reroutes all noisy
    // ones left, and the quiet account's delivery goes next.
    let leased: Vec<i64> = ["a", "b", "c"]
        .iter()
        .map(|o| lease_with(store, o, T0, &policy).unwrap().delivery_id)
        .collect();
    assert_eq!(leased, [1, 2, 6]);
    let slots: Vec<(DeliveryState, Option<String>, i64)> = (3..=5)
        .map(|id| {
            let d = state(store, id);
            (d.state, d.reason, d.not_before - T0)
        })
        .collect();
    let budget = Some(reason::ACCOUNT_BUDGET.to_string());
    assert_eq!(
        slots,
        [
            (DeliveryState::Delayed, budget.clone(), 1_001),
            (DeliveryState::Delayed, budget.clone(), 2_001),
            (DeliveryState::Delayed, budget.clone(), 3_001)
        ]
    );
    assert!(lease_with(store, "d", T0 + 1_000, &policy).is_none());
    // Each slot is its delivery's own: they go at their times, one by one.
    assert_eq!(
        lease_with(store, "d", T0 + 1_001, &policy)
            .unwrap()
            .delivery_id,
        3
    );
    assert!(lease_with(store, "e", T0 + 1_002, &policy).is_none());
    assert_eq!(
        lease_with(store, "e", T0 + 2_001, &policy)
            .unwrap()
            .delivery_id,
        4
    );
    let held = store.stats(T0 + 2_002).unwrap().held_accounts;
    assert_eq!(
        held,
        [HeldAccount {
            account: "noisy".into(),
            delayed: 1,
            until: T0 + 3_001
        }]
    );
    // A new noisy message queues behind the reserved slots.
    messages_of(store, &[("t", "noisy")]);
    assert!(lease_with(store, "f", T0 + 2_002, &policy).is_none());
    assert_eq!(state(store, 7).not_before, T0 + 4_001);
}

pub fn a_saturated_endpoint_is_held_for_its_cool_down_then_probed_once(store: &mut dyn Store) {
    subscribe(store, &[("t", "slow"), ("u", "fast")]);
    messages_of(store, &[("t", "a"), ("t", "a"), ("t", "a"), ("u", "a")]);
    let first = lease(store, "a", T0).unwrap();
    let saturated = EndpointSignal::Saturated {
        retry_after: Some(Duration::from_secs(2)),
        limits: endpoint_limits(),
        slows: None,
    };
    let finish =
        FinishAttempt::retry(&first, T0, T0 + 10, "HTTP 429".into()).with_signal(saturated);
    assert!(store.attempt_finish(&finish).unwrap());
    let d = state(store, first.delivery_id);
    assert_eq!(
        (d.state, d.reason.as_deref(), d.not_before),
        (
            DeliveryState::Delayed,
            Some("endpoint_saturated"),
            T0 + 2_000
        )
    );
    // While it cools down, its deliveries move to the delayed queue untried; others flow.
    assert_eq!(lease(store, "b", T0 + 1).unwrap().endpoint, "fast");
    assert!(lease(store, "c", T0 + 1).is_none());
    assert!((2..=3).all(|id| state(store, id).reason.as_deref() == Some("endpoint_saturated")));
    let health = store.stats(T0 + 1).unwrap().saturated_endpoints;
    assert_eq!(
        (
            health[0].endpoint.as_str(),
            health[0].saturated_until,
            health[0].failures
        ),
        ("slow", Some(T0 + 2_000), 1)
    );
    // Cool-down over: one probe goes, the others wait for its answer.
    let probe = lease(store, "d", T0 + 2_000).unwrap();
    assert_eq!(probe.endpoint, "slow");
    assert!(
        lease(store, "e", T0 + 2_000).is_none(),
        "one half-open probe at a time"
    );
    // The probe fails again: the cool-down doubles (no Retry-After this time).
    let again = EndpointSignal::Saturated {
        retry_after: None,
        limits: endpoint_limits(),
        slows: None,
    };
    store
        .attempt_finish(
            &FinishAttempt::retry(&probe, T0 + 2_010, T0 + 2_011, "refused".into())
                .with_signal(again),
        )
        .unwrap();
    assert!(lease(store, "f", T0 + 3_999).is_none());
    assert_eq!(
        store.stats(T0 + 2_011).unwrap().saturated_endpoints[0].saturated_until,
        Some(T0 + 4_010)
    );
    // The next probe succeeds: the breaker closes and the rest flow.
    let probe = lease(store, "g", T0 + 4_010).unwrap();
    store
        .attempt_finish(
            &FinishAttempt::delivered(&probe, T0 + 4_011, AttemptOutcome::Delivered)
                .with_signal(EndpointSignal::Healthy),
        )
        .unwrap();
    assert!(
        store
            .stats(T0 + 4_011)
            .unwrap()
            .saturated_endpoints
            .is_empty()
    );
    assert!(lease(store, "h", T0 + 4_012).is_some());
    assert!(
        lease(store, "i", T0 + 4_012).is_some(),
        "no probe limit once closed"
    );
}

/// Children in flight when a 429 opened the breaker answer 200 after it:
/// the breaker stays open (under a flood, such answers closed it and the
/// flood went on), and one answering while the probe is out leaves the
/// probe alone; the probe's answer closes it.
pub fn a_good_answer_sent_before_the_breaker_opened_does_not_close_it(store: &mut dyn Store) {
    subscribe(store, &[("t", "slow")]);
    messages_of(store, &[("t", "a"); 5]);
    let refused = lease(store, "a", T0).unwrap();
    let in_flight = lease(store, "b", T0).unwrap();
    let late = lease(store, "c", T0).unwrap();
    let saturated = EndpointSignal::Saturated {
        retry_after: Some(Duration::from_secs(2)),
        limits: endpoint_limits(),
        slows: None,
    };
    let finish =
        FinishAttempt::retry(&refused, T0 + 10, T0 + 11, "HTTP 429".into()).with_signal(saturated);
    assert!(store.attempt_finish(&finish).unwrap());
    let good = |l: &Lease, now| {
        FinishAttempt::delivered(l, now, AttemptOutcome::Delivered)
            .with_signal(EndpointSignal::Healthy)
    };
    // (A confirm-mode answer of an adaptive endpoint: its answer time is
    // recorded, the breaker left alone.)
    let answered = FinishAttempt::delivered(&in_flight, T0 + 12, AttemptOutcome::Delivered)
        .with_signal(EndpointSignal::Answered {
            answer_ms: 2,
            limits: EndpointLimits {
                adaptive: true,
                ..endpoint_limits()
            },
        });
    assert!(store.attempt_finish(&answered).unwrap());
    let open = |store: &mut dyn Store, now| -> Vec<_> {
        (store.stats(now).unwrap().saturated_endpoints)
            .into_iter()
            .map(|h| (h.endpoint, h.saturated_until, h.failures))
            .collect()
    };
    assert_eq!(open(store, T0 + 12), [("slow".into(), Some(T0 + 2_010), 1)]);
    assert!(
        lease(store, "d", T0 + 13).is_none(),
        "held while it cools down"
    );
    // Everything held is due: one probe goes; a child in flight since
    // before the 429 answering now leaves it the only one.
    let probe = lease(store, "e", T0 + 2_011).unwrap();
    for id in 4..=5 {
        let d = state(store, id);
        assert!(
            d.state == DeliveryState::Delayed && d.not_before <= T0 + 2_012,
            "the others are due too: {d:?}"
        );
    }
    assert!(store.attempt_finish(&good(&late, T0 + 2_012)).unwrap());
    assert!(lease(store, "f", T0 + 2_012).is_none(), "one probe");
    assert_eq!(open(store, T0 + 2_012).len(), 1);
    // The probe's good answer closes it.
    assert!(store.attempt_finish(&good(&probe, T0 + 2_013)).unwrap());
    assert!(open(store, T0 + 2_013).is_empty());
    assert!(lease(store, "g", T0 + 2_014).is_some());
    assert!(
        lease(store, "h", T0 + 2_014).is_some(),
        "no probe limit once closed"
    );
}

pub fn silent_answers_in_a_row_open_the_breaker_and_an_answer_resets_them(store: &mut dyn Store) {
    subscribe(store, &[("t", "quiet")]);
    messages_of(store, &[("t", "a"); 6]);
    let silent = EndpointSignal::Silent {
        limits: EndpointLimits {
            slow_after: Some(2),
            ..endpoint_limits()
        },
    };
    let handed_over = |store: &mut dyn Store, owner: &str, now: i64, signal: EndpointSignal| {
        let lease = lease(store, owner, now).unwrap();
        let finish =
            FinishAttempt::delivered(&lease, now, AttemptOutcome::HandedOver).with_signal(signal);
        assert!(store.attempt_finish(&finish).unwrap());
        assert_eq!(
            state(store, lease.delivery_id).state,
            DeliveryState::Delivered
        );
    };
    // One silence, then an answer: the count starts again.
    handed_over(store, "a", T0, silent);
    handed_over(store, "b", T0 + 1, EndpointSignal::Healthy);
    handed_over(store, "c", T0 + 2, silent);
    assert!(store.stats(T0 + 2).unwrap().saturated_endpoints.is_empty());
    // The second silence in a row opens the breaker, as a 429 would.
    handed_over(store, "d", T0 + 3, silent);
    let health = store.stats(T0 + 3).unwrap().saturated_endpoints;
    assert_eq!(
        (health[0].saturated_until, health[0].failures),
        (Some(T0 + 1_003), 1)
    );
    assert!(
        health[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("slow_after")
    );
    assert!(
        lease(store, "e", T0 + 4).is_none(),
        "held while it cools down"
    );
    // The probe (its slot a millisecond after the cool-down) goes
    // unanswered too: open again at once, twice as long.
    handed_over(store, "f", T0 + 1_004, silent);
    let health = store.stats(T0 + 1_004).unwrap().saturated_endpoints;
    assert_eq!(
        (health[0].saturated_until, health[0].failures),
        (Some(T0 + 3_004), 2)
    );
    // The probe's answer closes it.
    handed_over(store, "g", T0 + 3_005, EndpointSignal::Healthy);
    assert!(
        store
            .stats(T0 + 3_005)
            .unwrap()
            .saturated_endpoints
            .is_empty()
    );
}

pub fn an_endpoint_at_its_in_flight_cap_is_skipped_until_a_lease_ends(store: &mut dyn Store) {
    subscribe(store, &[("t", "capped"), ("u", "free")]);
    messages_of(store, &[("t", "a"), ("t", "a"), ("u", "a")]);
    let mut policy = Policy::default();
    policy.endpoints.insert(
        "capped".into(),
        EndpointLimits {
            max_in_flight: Some(1),
            ..endpoint_limits()
        },
    );
    let first = lease_with(store, "a", T0, &policy).unwrap();
    assert_eq!(first.endpoint, "capped");
    assert_eq!(
        lease_with(store, "b", T0, &policy).unwrap().endpoint,
        "free"
    );
    assert!(lease_with(store, "c", T0, &policy).is_none());
    assert_eq!(
        state(store, 2).state,
        DeliveryState::Ready,
        "skipped, not rerouted"
    );
    store
        .attempt_finish(&FinishAttempt::delivered(
            &first,
            T0,
            AttemptOutcome::Delivered,
        ))
        .unwrap();
    assert_eq!(lease_with(store, "c", T0, &policy).unwrap().delivery_id, 2);
}

pub fn an_endpoint_over_its_rate_reroutes_with_reserved_slots(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    messages_of(store, &[("t", "a"), ("t", "b"), ("t", "c")]);
    let mut policy = Policy::default();
    policy.endpoints.insert(
        "e".into(),
        EndpointLimits {
            rate: Some(Rate {
                per_second: 10.0,
                burst: 1,
            }),
            ..endpoint_limits()
        },
    );
    assert_eq!(lease_with(store, "a", T0, &policy).unwrap().delivery_id, 1);
    assert!(lease_with(store, "b", T0, &policy).is_none());
    let slots: Vec<(Option<String>, i64)> = (2..=3)
        .map(|id| {
            let d = state(store, id);
            (d.reason, d.not_before - T0)
        })
        .collect();
    let rate = Some(reason::ENDPOINT_RATE.to_string());
    assert_eq!(slots, [(rate.clone(), 101), (rate.clone(), 201)]);
    assert_eq!(
        lease_with(store, "b", T0 + 101, &policy)
            .unwrap()
            .delivery_id,
        2
    );
}

pub fn deliveries_of_a_removed_endpoint_are_parked_restored_or_purged(store: &mut dyn Store) {
    subscribe(store, &[("t", "gone"), ("t", "kept")]);
    store
        .messages_insert(&[message("t", 5), message("t", 0), message("t", 0)])
        .unwrap();
    route(store, T0);
    let policy = Policy {
        removed: vec!["gone".into()],
        ..Policy::default()
    };
    // Never leased: parked, every ready one of it, and the others flow.
    for owner in ["a", "b", "c"] {
        let l = lease_with(store, owner, T0, &policy).unwrap();
        assert_eq!(l.endpoint, "kept");
    }
    assert!(lease_with(store, "d", T0, &policy).is_none());
    let parked: Vec<DeliveryRow> = (1..=6)
        .map(|id| state(store, id))
        .filter(|d| d.endpoint == "gone")
        .collect();
    assert_eq!(parked.len(), 3);
    for d in &parked {
        assert_eq!(
            (d.state, d.reason.as_deref(), d.not_before),
            (
                DeliveryState::Delayed,
                Some(reason::ENDPOINT_REMOVED),
                PARKED_UNTIL
            )
        );
        assert_eq!(d.attempts, 0, "nothing was tried");
    }
    let stats = store.stats(T0).unwrap();
    assert_eq!(stats.orphaned, [("gone".to_string(), 3)]);
    assert_eq!(store.leasable_count(T0, 100).unwrap(), 0);
    // The endpoint comes back: its deliveries are ready again.
    assert_eq!(
        store
            .deliveries_restore_endpoints(&["gone".into()], T0 + 1)
            .unwrap(),
        3
    );
    assert_eq!(lease(store, "e", T0 + 1).unwrap().endpoint, "gone");
    // Or an admin purges what is parked.
    let policy = Policy {
        removed: vec!["gone".into()],
        ..Policy::default()
    };
    assert!(lease_with(store, "f", T0 + 2, &policy).is_none());
    let purge = |endpoint: Option<&str>, configured: &[&str], dry_run| PurgeOrphanedParams {
        endpoint: endpoint.map(str::to_string),
        configured: configured.iter().map(|e| e.to_string()).collect(),
        dry_run,
    };
    let mut purged = |p: PurgeOrphanedParams| store.deliveries_purge_orphaned(&p).unwrap();
    assert_eq!(purged(purge(Some("kept"), &["kept"], false)), 0);
    // Back in the config, not restored yet (no run since): kept.
    assert_eq!(purged(purge(None, &["kept", "gone"], false)), 0);
    assert_eq!(purged(purge(None, &["kept"], true)), 2);
    assert_eq!(purged(purge(None, &["kept"], false)), 2);
    assert!(store.stats(T0).unwrap().orphaned.is_empty());
}

/// Endpoint `e` learning its rate (`adaptive`), with no configured rate.
fn adaptive_policy() -> Policy {
    let mut policy = Policy::default();
    policy.endpoints.insert(
        "e".into(),
        EndpointLimits {
            adaptive: true,
            ..endpoint_limits()
        },
    );
    policy
}

fn learned_rate_of(store: &mut dyn Store, endpoint: &str, now: i64) -> Option<EndpointRate> {
    store
        .stats(now)
        .unwrap()
        .learned_rates
        .into_iter()
        .find(|r| r.endpoint == endpoint)
}

fn not_befores(store: &mut dyn Store, why: &str) -> Vec<i64> {
    let mut held: Vec<i64> = store
        .deliveries_list(
            &DeliveryFilter {
                reason: Some(why.into()),
                ..DeliveryFilter::default()
            },
            10_000,
        )
        .unwrap()
        .iter()
        .map(|l| l.delivery.not_before)
        .collect();
    held.sort();
    held
}

/// A 429 teaches the endpoint's rate: 95% of what it took in the second
/// before; its deliveries then go at that rate from the end of the
/// cool-down, in reserved slots; children in flight when it came teach
/// nothing more; the rate holds for 30 s, then a second of good answers
/// raises it a step and spaces the next slots at it.
pub fn an_overload_signal_teaches_a_rate_from_what_the_endpoint_took(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    // Enough that slots remain past the hold.
    store.messages_insert(&vec![message("t", 0); 200]).unwrap();
    route(store, T0);
    let policy = adaptive_policy();
    for i in 0..4 {
        let l = lease_with(store, "a", T0 + i, &policy).unwrap();
        finish(
            store,
            FinishAttempt::delivered(&l, T0 + i, AttemptOutcome::Delivered)
                .with_signal(EndpointSignal::Healthy),
        );
    }
    assert!(
        learned_rate_of(store, "e", T0).is_none(),
        "nothing learned yet"
    );
    let refused = lease_with(store, "b", T0 + 10, &policy).unwrap();
    let in_flight = lease_with(store, "c", T0 + 10, &policy).unwrap();
    let too_much = |l: &Lease, now| {
        FinishAttempt::retry(l, now, now + 1, "HTTP 429".into())
            .with_answer(Some(429), 5)
            .with_signal(EndpointSignal::Saturated {
                retry_after: Some(Duration::from_secs(1)),
                limits: policy.endpoints["e"],
                slows: Some(cronpost::adaptive::RateChange::Http429),
            })
    };
    finish(store, too_much(&refused, T0 + 20));
    let learned = learned_rate_of(store, "e", T0 + 20).unwrap().learned;
    assert_eq!(learned.ceiling, 4.0, "it took four in the second before");
    assert!((learned.rate - 3.8).abs() < 1e-9, "{learned:?}");
    assert_eq!(learned.reason.as_str(), "http_429");
    finish(store, too_much(&in_flight, T0 + 21));
    assert_eq!(
        learned_rate_of(store, "e", T0 + 21).unwrap().learned,
        learned,
        "a child in flight adds nothing"
    );
    // The cool-down's end (the last Retry-After's): the probe goes, then
    // the rest wait at 3.8/s.
    let until = T0 + 21 + 1_000;
    let probe = lease_with(store, "p", until, &policy).unwrap();
    finish(
        store,
        FinishAttempt::delivered(&probe, until + 1, AttemptOutcome::Delivered)
            .with_signal(EndpointSignal::Healthy),
    );
    let next = lease_with(store, "n", until + 2, &policy);
    let slots = not_befores(store, reason::ENDPOINT_RATE);
    assert!(next.is_none() && !slots.is_empty(), "{slots:?}");
    // The rate holds: five seconds on, a lease at a slot takes no step.
    let rate = learned_rate_of(store, "e", until + 2).unwrap().learned.rate;
    assert_eq!(rate, learned.rate);
    for pair in slots.windows(2) {
        let gap = (pair[1] - pair[0]) as f64;
        assert!((gap - 1000.0 / rate).abs() <= 1.0, "{slots:?}");
    }
    let held = deliver_at_next_slot(store, until + 5_000, &policy);
    assert_eq!(learned_rate_of(store, "e", held).unwrap().learned, learned);
    // After the hold (30 s from the 429) and a second: a step up, and the
    // next slots spaced at it.
    let after = T0 + 20 + cronpost::adaptive::HOLD_MS + cronpost::adaptive::STEP_MS;
    let later = deliver_at_next_slot(store, after, &policy);
    let grown = learned_rate_of(store, "e", later).unwrap().learned;
    assert_eq!(grown.reason.as_str(), "increase");
    assert!(grown.rate > rate, "{grown:?}");
    let spaced = not_befores(store, reason::ENDPOINT_RATE);
    // (The step spaced the next few seconds' worth from the slot leased.)
    let ahead = cronpost::adaptive::respace_ahead(grown.rate) as usize - 1;
    for pair in spaced[..ahead].windows(2) {
        let gap = (pair[1] - pair[0]) as f64;
        assert!((gap - 1000.0 / grown.rate).abs() <= 1.0, "{spaced:?}");
    }
}

/// Leases and delivers the delivery of the first reserved slot at or after
/// `at`, at its time; returns the slot. The slots missed meanwhile are
/// queued again first (a PostgreSQL lease then leaves the endpoint to the
/// next lease).
fn deliver_at_next_slot(store: &mut dyn Store, at: i64, policy: &Policy) -> i64 {
    let slot = *not_befores(store, reason::ENDPOINT_RATE)
        .iter()
        .find(|&&s| s >= at)
        .unwrap();
    let l = lease_with(store, "s", slot, policy)
        .or_else(|| lease_with(store, "t", slot, policy))
        .unwrap();
    finish(
        store,
        FinishAttempt::delivered(&l, slot, AttemptOutcome::Delivered),
    );
    slot
}

/// Confirm-mode answers that take much longer than they used to lower the
/// rate too (reason slow_answers); a non-adaptive endpoint learns nothing.
pub fn answers_slowing_down_lower_the_rate_of_an_adaptive_endpoint_only(store: &mut dyn Store) {
    subscribe(store, &[("t", "e"), ("t", "fixed")]);
    store.messages_insert(&vec![message("t", 0); 30]).unwrap();
    route(store, T0);
    let mut policy = adaptive_policy();
    policy.endpoints.insert("fixed".into(), endpoint_limits());
    let mut now = T0;
    for i in 0..30 {
        let l = lease_with(store, "a", now, &policy).unwrap();
        let answer_ms = if i < 20 { 10 } else { 300 };
        now += answer_ms;
        let limits = policy.endpoints[&l.endpoint];
        finish(
            store,
            FinishAttempt::delivered(&l, now, AttemptOutcome::Delivered)
                .with_answer(Some(200), answer_ms)
                .with_signal(EndpointSignal::Answered { answer_ms, limits }),
        );
    }
    let learned = learned_rate_of(store, "e", now).unwrap().learned;
    assert_eq!(learned.reason.as_str(), "slow_answers");
    assert!(learned_rate_of(store, "fixed", now).is_none());
    // An overload signal on the endpoint that does not learn: the breaker
    // opens, nothing is learned.
    store.messages_insert(&[message("t", 0)]).unwrap();
    route(store, now);
    let fixed = loop {
        let l = lease_with(store, "f", now, &policy).unwrap();
        if l.endpoint == "fixed" {
            break l;
        }
        finish(
            store,
            FinishAttempt::delivered(&l, now, AttemptOutcome::Delivered),
        );
    };
    finish(
        store,
        FinishAttempt::retry(&fixed, now + 1, now + 2, "HTTP 429".into()).with_signal(
            EndpointSignal::Saturated {
                retry_after: None,
                limits: endpoint_limits(),
                slows: Some(cronpost::adaptive::RateChange::Http429),
            },
        ),
    );
    assert!(learned_rate_of(store, "fixed", now + 1).is_none());
    assert!(store.stats(now + 1).unwrap().saturated_endpoints.len() == 1);
}

/// A 429 (Retry-After 1 s) at `now` for `l`, from an attempt `took_ms` long.
fn refused_429(l: &Lease, now: i64, limits: EndpointLimits) -> FinishAttempt {
    FinishAttempt::retry(l, now, now + 1, "HTTP 429".into())
        .with_answer(Some(429), 5)
        .with_signal(EndpointSignal::Saturated {
            retry_after: Some(Duration::from_secs(1)),
            limits,
            slows: Some(cronpost::adaptive::RateChange::Http429),
        })
}

fn gaps(slots: &[i64]) -> Vec<i64> {
    slots.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A learned rate moves the slots it holds: a second decrease spaces them
/// all again from its cool-down's end; with `adaptive = false` the stored
/// rate neither holds (a lease goes) nor steps; a 429 from an endpoint
/// with nothing waiting for it teaches nothing.
pub fn a_learned_rate_moves_the_slots_it_holds(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    store.messages_insert(&vec![message("t", 0); 20]).unwrap();
    route(store, T0);
    let mut policy = adaptive_policy();
    let limits = policy.endpoints["e"];
    for i in 0..4 {
        let l = lease_with(store, "a", T0 + i, &policy).unwrap();
        finish(
            store,
            FinishAttempt::delivered(&l, T0 + i, AttemptOutcome::Delivered),
        );
    }
    let refused = lease_with(store, "b", T0 + 10, &policy).unwrap();
    finish(store, refused_429(&refused, T0 + 20, limits));
    let until = T0 + 20 + 1_000;
    let probe = lease_with(store, "p", until, &policy).unwrap();
    finish(
        store,
        FinishAttempt::delivered(&probe, until + 1, AttemptOutcome::Delivered)
            .with_signal(EndpointSignal::Healthy),
    );
    // (A PostgreSQL lease skips an endpoint it held back; the next one
    // meets the delivery the cool-down held.)
    assert!(lease_with(store, "h", until + 2, &policy).is_none());
    assert!(lease_with(store, "i", until + 3, &policy).is_none());
    let slots = not_befores(store, reason::ENDPOINT_RATE);
    assert_eq!(slots.len(), 15, "the rest hold slots at 3.8/s: {slots:?}");
    // The first slot goes; its 429 (it started after the first decrease)
    // lowers the rate from what the endpoint took (the probe: one), and
    // every slot moves after the new cool-down, a second apart or more.
    let first = lease_with(store, "f", slots[0], &policy).unwrap();
    let second_until = slots[0] + 10 + 1_000;
    finish(store, refused_429(&first, slots[0] + 10, limits));
    let lowered = learned_rate_of(store, "e", slots[0] + 10).unwrap().learned;
    assert_eq!(lowered.ceiling, 1.0, "{lowered:?}");
    let moved = not_befores(store, reason::ENDPOINT_RATE);
    assert_eq!(moved.len(), 14);
    assert!(moved[0] >= second_until, "{moved:?} after {second_until}");
    assert!(
        gaps(&moved)
            .iter()
            .all(|&g| (g as f64 - 1000.0 / 0.95).abs() <= 1.0),
        "{moved:?}"
    );

    // Switched off: the stored rate holds nothing, steps nothing.
    policy.endpoints.insert("e".into(), endpoint_limits());
    let later = moved[0] + 5_000;
    let off = lease_with(store, "o", later, &policy).unwrap();
    assert_eq!(learned_rate_of(store, "e", later).unwrap().learned, lowered);
    finish(
        store,
        FinishAttempt::delivered(&off, later, AttemptOutcome::Delivered),
    );

    // Another endpoint, sent all it gets: two delivered, then a 429 with
    // nothing left waiting for it. Its breaker opens; it learns nothing
    // (what it took was its traffic).
    subscribe(store, &[("t", "e"), ("u", "quiet")]);
    policy.endpoints.insert("quiet".into(), limits);
    store.messages_insert(&vec![message("u", 0); 3]).unwrap();
    route(store, later);
    let mut quiet = 0;
    let last = loop {
        let l = lease_with(store, "q", later + 1, &policy).unwrap();
        if l.endpoint == "quiet" {
            quiet += 1;
            if quiet == 3 {
                break l;
            }
        }
        finish(
            store,
            FinishAttempt::delivered(&l, later + 1, AttemptOutcome::Delivered),
        );
    };
    finish(store, refused_429(&last, later + 2, limits));
    assert!(learned_rate_of(store, "quiet", later + 2).is_none());
}

/// The step that reaches the configured rate spaces every slot at it (no
/// step follows to reach the later ones).
pub fn the_step_that_reaches_the_configured_rate_spaces_every_slot(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    // Enough held back that a step's few seconds of slots are not all.
    store
        .messages_insert(&vec![message("t", 0); 4_000])
        .unwrap();
    route(store, T0);
    let mut policy = adaptive_policy();
    let cap = 78.0;
    policy.endpoints.get_mut("e").unwrap().rate = Some(Rate {
        per_second: cap,
        burst: 1,
    });
    let limits = policy.endpoints["e"];
    // A hundred go 13 ms apart (under the configured rate), then a 429:
    // it took 76 in the second before, so 72.2/s is learned.
    for i in 0..100 {
        let l = lease_with(store, "a", T0 + i * 13, &policy).unwrap();
        finish(
            store,
            FinishAttempt::delivered(&l, T0 + i * 13, AttemptOutcome::Delivered),
        );
    }
    let now = T0 + 1_300;
    let refused = lease_with(store, "r", now, &policy).unwrap();
    finish(store, refused_429(&refused, now, limits));
    let learned = learned_rate_of(store, "e", now).unwrap().learned;
    assert_eq!(learned.ceiling, 76.0, "{learned:?}");
    let until = now + 1_000;
    let probe = lease_with(store, "p", until, &policy).unwrap();
    finish(
        store,
        FinishAttempt::delivered(&probe, until, AttemptOutcome::Delivered)
            .with_signal(EndpointSignal::Healthy),
    );
    assert!(lease_with(store, "h", until + 1, &policy).is_none());
    assert!(not_befores(store, reason::ENDPOINT_RATE).len() > 3_800);
    // Leases five seconds apart, each at a slot: the rate holds for 30 s,
    // then steps of five seconds climb back to 76/s in six (30 s), then
    // past it to 78/s.
    let mut at = until;
    for step in 1.. {
        at += 5_000;
        let slot = deliver_at_next_slot(store, at, &policy);
        if learned_rate_of(store, "e", slot).unwrap().learned.rate >= cap {
            break;
        }
        assert!(step < 18, "never reached the configured rate");
    }
    // Every slot left at the configured rate, however far out.
    let slots = not_befores(store, reason::ENDPOINT_RATE);
    let interval = 1000.0 / cap;
    for (k, &slot) in slots.iter().enumerate() {
        let due = slots[0] as f64 + k as f64 * interval;
        assert!(
            (slot as f64 - due).abs() <= 2.0,
            "slot {k} at {slot}, not {due}"
        );
    }
}
