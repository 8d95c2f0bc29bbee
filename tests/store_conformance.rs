//! The store conformance suite: the behaviour every backend of
//! `cronpost::store::Store` must have, written once against the trait.
//! A backend joins by adding one `conformance!` line at the bottom.

use std::collections::HashMap;
use std::time::Duration;

use cronpost::saturation::Rate;
use cronpost::store::*;

const T0: i64 = 1_000_000;

/// Budgets and endpoint limits for a test; none by default.
#[derive(Default)]
struct Policy {
    accounts: HashMap<String, Rate>,
    endpoints: HashMap<String, EndpointLimits>,
    /// Endpoints no longer in the config.
    removed: Vec<String>,
}

impl LeasePolicy for Policy {
    fn account_rate(&self, account: &str) -> Option<Rate> {
        self.accounts.get(account).copied()
    }
    fn endpoint_limits(&self, endpoint: &str) -> Option<EndpointLimits> {
        self.endpoints.get(endpoint).copied()
    }
    fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)> {
        self.endpoints
            .iter()
            .filter_map(|(name, l)| l.max_in_flight.map(|cap| (name.clone(), cap)))
            .collect()
    }
    fn endpoint_known(&self, endpoint: &str) -> bool {
        !self.removed.iter().any(|e| e == endpoint)
    }
}

/// The wall clock decides (no boot clock).
fn reclaim(store: &mut dyn Store, now: i64) -> usize {
    store
        .leases_reclaim_expired(&ReclaimParams { now, boot: None })
        .unwrap()
}

fn boot(id: &str, ms: i64) -> Option<cronpost::clock::BootTime> {
    Some(cronpost::clock::BootTime {
        boot_id: id.into(),
        ms,
    })
}

fn message(topic: &str, priority: i64) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        account: "acme".into(),
        payload: r#"{"n":1}"#.into(),
        priority,
        created_at: T0,
        available_at: None,
        dedup_key: None,
    }
}

fn subscribe(store: &mut dyn Store, pairs: &[(&str, &str)]) {
    let subs: Vec<Subscription> = pairs
        .iter()
        .map(|(topic, endpoint)| Subscription {
            topic: topic.to_string(),
            endpoint: endpoint.to_string(),
        })
        .collect();
    store.subscriptions_replace(&subs).unwrap();
}

/// Routes everything, in batches of two (as `routing::route_all` does with
/// larger ones).
fn route(store: &mut dyn Store, now: i64) -> RouteReport {
    cronpost::routing::route_all_in_batches(store, now, 2, &mut || {}).unwrap()
}

fn lease_params<'a>(owner: &str, now: i64, policy: &'a Policy) -> LeaseParams<'a> {
    LeaseParams {
        owner: owner.into(),
        pid: 4242,
        run_id: None,
        now,
        lease_timeout_ms: 10_000,
        prefer: Queue::Ready,
        policy,
        boot: None,
    }
}

fn lease(store: &mut dyn Store, owner: &str, now: i64) -> Option<Lease> {
    lease_with(store, owner, now, &Policy::default())
}

fn lease_with(store: &mut dyn Store, owner: &str, now: i64, policy: &Policy) -> Option<Lease> {
    store
        .delivery_lease_next(&lease_params(owner, now, policy))
        .unwrap()
}

fn endpoint_limits() -> EndpointLimits {
    EndpointLimits {
        max_in_flight: None,
        rate: None,
        cooldown_base: Duration::from_secs(1),
        cooldown_cap: Duration::from_secs(8),
        max_retry_after: Duration::from_secs(60),
    }
}

/// One message on `t`, routed to endpoint `e`, leased by "a".
fn one_leased(store: &mut dyn Store) -> Lease {
    subscribe(store, &[("t", "e")]);
    store.messages_insert(&[message("t", 0)]).unwrap();
    route(store, T0);
    lease(store, "a", T0).unwrap()
}

fn state(store: &mut dyn Store, delivery_id: i64) -> DeliveryRow {
    store.delivery_get(delivery_id).unwrap().unwrap()
}

pub fn routing_fans_out_in_batches_and_marks_unroutable_messages_once(store: &mut dyn Store) {
    subscribe(store, &[("t", "crm"), ("t", "billing"), ("u", "crm")]);
    let report = store
        .messages_insert(&[
            message("t", 0),
            message("nobody", 0),
            message("u", 0),
            message("t", 0),
            message("t", 0),
        ])
        .unwrap();
    assert_eq!((report.inserted, report.duplicates), (5, 0));
    let ids: Vec<i64> = report.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert!(report.messages.iter().all(|m| m.uid.starts_with("msg_")));
    // One batch of two: more to come.
    let first = store
        .messages_route(RouteParams {
            now: T0,
            batch_size: 2,
        })
        .unwrap();
    assert_eq!(
        (
            first.messages,
            first.deliveries,
            first.unroutable,
            first.more
        ),
        (1, 2, 1, true)
    );
    assert_eq!(first.unroutable_topics, ["nobody"]);
    let report = route(store, T0);
    assert_eq!(
        (report.messages, report.deliveries, report.unroutable),
        (3, 5, 0)
    );
    let deliveries = store.deliveries_of_message(1).unwrap();
    let endpoints: Vec<&str> = deliveries.iter().map(|d| d.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["billing", "crm"]);
    assert!(
        deliveries
            .iter()
            .all(|d| d.state == DeliveryState::Ready && d.account == "acme")
    );
    // The unroutable message is marked once: routing again finds nothing.
    assert_eq!(route(store, T0), RouteReport::default());
    let unroutable = store.message_get(&MessageKey::Id(2)).unwrap().unwrap();
    assert!(unroutable.routed_at.is_some());
    assert_eq!(
        unroutable.route_error.as_deref(),
        Some("no endpoint subscribes to topic \"nobody\"")
    );
    let by_uid = store
        .message_get(&MessageKey::Uid(unroutable.uid.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(by_uid.id, 2);
    assert!(store.deliveries_of_message(2).unwrap().is_empty());
    // A subscriber appears: it is routed after all.
    subscribe(store, &[("t", "crm"), ("nobody", "crm")]);
    let report = route(store, T0);
    assert_eq!((report.messages, report.deliveries), (1, 1));
    assert_eq!(store.deliveries_of_message(2).unwrap().len(), 1);
    // And an admin can ask for it too.
    store.messages_insert(&[message("gone", 0)]).unwrap();
    assert_eq!(route(store, T0).unroutable, 1);
    assert_eq!(store.messages_reroute_unroutable(true).unwrap(), 1);
    assert_eq!(store.messages_reroute_unroutable(false).unwrap(), 1);
    assert_eq!(store.stats(T0).unwrap().unroutable_messages, 0);
}

pub fn a_delayed_message_is_routed_to_the_delayed_queue(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    let mut later = message("t", 0);
    later.available_at = Some(T0 + 5_000);
    store.messages_insert(&[later]).unwrap();
    route(store, T0);
    let d = state(store, 1);
    assert_eq!(
        (d.state, d.not_before, d.reason.as_deref()),
        (DeliveryState::Delayed, T0 + 5_000, Some("scheduled"))
    );
    assert!(lease(store, "a", T0).is_none());
    assert_eq!(store.leasable_count(T0 + 4_999, 10).unwrap(), 0);
    assert!(lease(store, "a", T0 + 4_999).is_none());
    assert_eq!(store.leasable_count(T0 + 5_000, 10).unwrap(), 1);
    assert_eq!(
        lease(store, "a", T0 + 5_000).unwrap().delivery_id,
        1,
        "leased straight from the delayed queue"
    );
}

pub fn dedup_keys_skip_repeats_and_a_bad_batch_writes_nothing(store: &mut dyn Store) {
    let mut keyed = message("t", 0);
    keyed.dedup_key = Some("k".into());
    assert_eq!(
        store
            .messages_insert(&[keyed.clone(), keyed.clone()])
            .unwrap()
            .duplicates,
        1
    );
    let mut bad = message("t", 0);
    bad.payload = "{not json".into();
    assert!(store.messages_insert(&[message("t", 0), bad]).is_err());
    assert_eq!(
        store.stats(T0).unwrap().unrouted_messages,
        1,
        "only the first good insert"
    );
}

pub fn leases_go_highest_priority_first_then_oldest_and_never_twice(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    store
        .messages_insert(&[
            message("t", 0),
            message("t", 5),
            message("t", 5),
            message("t", 1),
        ])
        .unwrap();
    route(store, T0);
    assert_eq!(store.leasable_count(T0, 100).unwrap(), 4);
    assert_eq!(store.leasable_count(T0, 2).unwrap(), 2);
    let order: Vec<i64> = ["a", "b", "c", "d"]
        .iter()
        .map(|owner| lease(store, owner, T0).unwrap().delivery_id)
        .collect();
    assert_eq!(order, [2, 3, 4, 1]);
    assert!(
        lease(store, "e", T0).is_none(),
        "every delivery is leased once"
    );
    assert_eq!(store.leasable_count(T0, 100).unwrap(), 0);
    let d = state(store, 2);
    assert_eq!(
        (
            d.state,
            d.lease_owner.as_deref(),
            d.lease_expires_at,
            d.attempts
        ),
        (DeliveryState::Leased, Some("a"), Some(T0 + 10_000), 1)
    );
}

pub fn a_lease_carries_the_message_and_opens_an_attempt(store: &mut dyn Store) {
    let l = one_leased(store);
    assert_eq!(
        (
            l.attempt,
            l.endpoint.as_str(),
            l.topic.as_str(),
            l.account.as_str()
        ),
        (1, "e", "t", "acme")
    );
    assert_eq!(l.payload, r#"{"n":1}"#);
    assert!(l.message_uid.starts_with("msg_"));
    let attempts = store.attempts_of_delivery(l.delivery_id).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (
            attempts[0].id,
            attempts[0].pid,
            attempts[0].outcome.as_str()
        ),
        (l.attempt_id, 4242, "in_flight")
    );
    assert_eq!(store.lease_by_owner("a").unwrap(), Some(l.clone()));
    assert_eq!(store.lease_by_owner("zz").unwrap(), None);
}

pub fn delivered_is_final_and_records_the_attempt(store: &mut dyn Store) {
    let l = one_leased(store);
    let finish =
        FinishAttempt::delivered(&l, T0 + 7, AttemptOutcome::Delivered).with_answer(Some(204), 7);
    assert!(store.attempt_finish(&finish).unwrap());
    let d = state(store, l.delivery_id);
    assert_eq!(
        (d.state, d.lease_owner, d.last_status),
        (DeliveryState::Delivered, None, Some(204))
    );
    let a = &store.attempts_of_delivery(l.delivery_id).unwrap()[0];
    assert_eq!(
        (
            a.outcome.as_str(),
            a.http_status,
            a.finished_at,
            a.duration_ms
        ),
        ("delivered", Some(204), Some(T0 + 7), Some(7))
    );
    assert_eq!(store.lease_by_owner("a").unwrap(), None);
    assert!(lease(store, "b", T0 + 8).is_none());
}

pub fn retry_waits_in_the_delayed_queue_until_its_time(store: &mut dyn Store) {
    let l = one_leased(store);
    let finish =
        FinishAttempt::retry(&l, T0, T0 + 2_000, "HTTP 503".into()).with_answer(Some(503), 3);
    assert!(store.attempt_finish(&finish).unwrap());
    let d = state(store, l.delivery_id);
    assert_eq!(
        (
            d.state,
            d.not_before,
            d.reason.as_deref(),
            d.last_error.as_deref()
        ),
        (
            DeliveryState::Delayed,
            T0 + 2_000,
            Some("retry_backoff"),
            Some("HTTP 503")
        )
    );
    assert!(lease(store, "b", T0 + 1_000).is_none());
    assert!(lease(store, "b", T0 + 1_999).is_none());
    let again = lease(store, "b", T0 + 2_000).unwrap();
    assert_eq!(
        (again.delivery_id, again.attempt, again.message_uid),
        (l.delivery_id, 2, l.message_uid)
    );
}

pub fn dead_keeps_its_error(store: &mut dyn Store) {
    let l = one_leased(store);
    assert!(
        store
            .attempt_finish(&FinishAttempt::dead(
                &l,
                T0,
                "HTTP 404: permanent failure".into()
            ))
            .unwrap()
    );
    let d = state(store, l.delivery_id);
    assert_eq!(
        (d.state, d.last_error.as_deref()),
        (DeliveryState::Dead, Some("HTTP 404: permanent failure"))
    );
}

pub fn an_expired_lease_is_reclaimed_and_its_late_owner_loses(store: &mut dyn Store) {
    let l = one_leased(store);
    assert_eq!(reclaim(store, T0 + 9_999), 0);
    assert_eq!(reclaim(store, T0 + 10_000), 1);
    let d = state(store, l.delivery_id);
    assert_eq!((d.state, d.lease_owner), (DeliveryState::Ready, None));
    assert_eq!(
        store.attempts_of_delivery(l.delivery_id).unwrap()[0].outcome,
        outcome::LEASE_EXPIRED
    );
    let second = lease(store, "b", T0 + 10_001).unwrap();
    // The first owner comes back late: its outcome does not move the delivery.
    let late = FinishAttempt::delivered(&l, T0 + 10_002, AttemptOutcome::Delivered);
    assert!(!store.attempt_finish(&late).unwrap());
    assert_eq!(
        state(store, l.delivery_id).lease_owner.as_deref(),
        Some("b")
    );
    assert_eq!(
        store.attempts_of_delivery(l.delivery_id).unwrap()[0].outcome,
        outcome::LEASE_LOST
    );
    assert!(
        store
            .attempt_finish(&FinishAttempt::delivered(
                &second,
                T0 + 10_003,
                AttemptOutcome::HandedOver
            ))
            .unwrap()
    );
    let outcomes: Vec<String> = store
        .attempts_of_delivery(l.delivery_id)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["lease_lost", "handed_over"]);
}

pub fn a_dead_childs_lease_is_settled_by_its_owner_token(store: &mut dyn Store) {
    let l = one_leased(store);
    let found = store.lease_by_owner("a").unwrap().unwrap();
    let finish =
        FinishAttempt::retry(&found, T0, T0 + 5, "child was killed".into()).by_dead_child();
    assert!(store.attempt_finish(&finish).unwrap());
    assert_eq!(
        store.attempts_of_delivery(l.delivery_id).unwrap()[0].outcome,
        "child_died"
    );
    assert_eq!(state(store, l.delivery_id).state, DeliveryState::Delayed);
}

pub fn stats_count_states_per_endpoint_and_report_the_last_run(store: &mut dyn Store) {
    subscribe(store, &[("t", "a"), ("t", "b")]);
    store
        .messages_insert(&[message("t", 0), message("t", 0)])
        .unwrap();
    route(store, T0);
    let run = store.run_begin(99, T0).unwrap();
    let policy = Policy::default();
    let mut params = lease_params("x", T0, &policy);
    params.run_id = Some(run);
    let l = store.delivery_lease_next(&params).unwrap().unwrap();
    store
        .attempt_finish(&FinishAttempt::dead(&l, T0, "gone".into()))
        .unwrap();
    let record = RunRecord {
        id: run,
        pid: 99,
        started_at: T0,
        finished_at: Some(T0 + 50),
        forked: 1,
        dead: 1,
        ..RunRecord::default()
    };
    store.run_finish(&record).unwrap();

    let stats = store.stats(T0 + 1_500).unwrap();
    let by_endpoint: Vec<(&str, [u64; 5])> = stats
        .endpoints
        .iter()
        .map(|e| (e.endpoint.as_str(), e.by_state))
        .collect();
    assert_eq!(
        by_endpoint,
        [("a", [1, 0, 0, 0, 1]), ("b", [2, 0, 0, 0, 0])]
    );
    assert_eq!(stats.oldest_ready_age_ms, Some(1_500));
    assert_eq!(stats.last_run, Some(record));
    assert_eq!(stats.last_run_attempts, [("dead".to_string(), 1)]);
}

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

pub fn a_child_preferring_the_delayed_queue_takes_a_due_delayed_delivery_first(
    store: &mut dyn Store,
) {
    subscribe(store, &[("t", "e")]);
    let mut later = message("t", 0);
    later.available_at = Some(T0 + 10);
    store.messages_insert(&[message("t", 0), later]).unwrap();
    route(store, T0);
    let policy = Policy::default();
    let mut params = lease_params("d", T0 + 10, &policy);
    params.prefer = Queue::Delayed;
    assert_eq!(
        store
            .delivery_lease_next(&params)
            .unwrap()
            .unwrap()
            .delivery_id,
        2
    );
    params.owner = "d2".into();
    assert_eq!(
        store
            .delivery_lease_next(&params)
            .unwrap()
            .unwrap()
            .delivery_id,
        1,
        "falls back to ready"
    );
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

pub fn a_lease_taken_on_this_boot_expires_by_the_boot_clock_not_the_wall_clock(
    store: &mut dyn Store,
) {
    subscribe(store, &[("t", "e")]);
    store
        .messages_insert(&[message("t", 0), message("t", 0)])
        .unwrap();
    route(store, T0);
    let policy = Policy::default();
    let mut params = lease_params("a", T0, &policy);
    params.boot = boot("boot-1", 5_000);
    let first = store.delivery_lease_next(&params).unwrap().unwrap();
    // The wall clock jumps a day ahead: on the same boot, 1 s later by the
    // boot clock, the lease (10 s) holds: its child may still be posting.
    let day_later = T0 + 86_400_000;
    let jumped = |ms| ReclaimParams {
        now: day_later,
        boot: boot("boot-1", ms),
    };
    assert_eq!(store.leases_reclaim_expired(&jumped(6_000)).unwrap(), 0);
    assert_eq!(store.leases_reclaim_expired(&jumped(15_000)).unwrap(), 1);
    assert_eq!(state(store, first.delivery_id).state, DeliveryState::Ready);
    // A lease from another boot: its child is gone; the wall clock decides.
    let mut params = lease_params("b", T0, &policy);
    params.boot = boot("boot-0", 5_000);
    let second = store.delivery_lease_next(&params).unwrap().unwrap();
    let after_reboot = |now| ReclaimParams {
        now,
        boot: boot("boot-1", 1),
    };
    assert_eq!(
        store
            .leases_reclaim_expired(&after_reboot(T0 + 9_999))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .leases_reclaim_expired(&after_reboot(T0 + 10_000))
            .unwrap(),
        1
    );
    assert_eq!(state(store, second.delivery_id).state, DeliveryState::Ready);
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

pub fn dedup_keys_are_per_account(store: &mut dyn Store) {
    let keyed = |account: &str| NewMessage {
        account: account.into(),
        dedup_key: Some("k1".into()),
        ..message("t", 0)
    };
    let report = store
        .messages_insert(&[keyed("acme"), keyed("globex"), keyed("acme")])
        .unwrap();
    assert_eq!((report.inserted, report.duplicates), (2, 1));
    let ids: Vec<i64> = report.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2], "the ids of what was written, in order");
}

pub fn a_child_that_lost_its_lease_says_nothing_about_the_endpoint(store: &mut dyn Store) {
    let l = one_leased(store);
    assert_eq!(reclaim(store, T0 + 10_000), 1);
    let second = lease(store, "b", T0 + 10_001).unwrap();
    // The second child's attempt opens the breaker...
    let saturated = EndpointSignal::Saturated {
        retry_after: Some(Duration::from_secs(30)),
        limits: endpoint_limits(),
    };
    let retry = FinishAttempt::retry(&second, T0 + 10_002, T0 + 10_003, "HTTP 429".into())
        .with_signal(saturated);
    assert!(store.attempt_finish(&retry).unwrap());
    // ... and the first, late, cannot close it.
    let late = FinishAttempt::delivered(&l, T0 + 10_004, AttemptOutcome::Delivered)
        .with_signal(EndpointSignal::Healthy);
    assert!(!store.attempt_finish(&late).unwrap());
    let health = store.stats(T0 + 10_005).unwrap().saturated_endpoints;
    assert_eq!(health.len(), 1, "still open: {health:?}");
    assert!(health[0].saturated_until.unwrap() >= T0 + 10_002 + 30_000);
}

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $open;
                routing_fans_out_in_batches_and_marks_unroutable_messages_once,
                a_delayed_message_is_routed_to_the_delayed_queue,
                dedup_keys_skip_repeats_and_a_bad_batch_writes_nothing,
                leases_go_highest_priority_first_then_oldest_and_never_twice,
                a_lease_carries_the_message_and_opens_an_attempt,
                delivered_is_final_and_records_the_attempt,
                retry_waits_in_the_delayed_queue_until_its_time,
                dead_keeps_its_error,
                an_expired_lease_is_reclaimed_and_its_late_owner_loses,
                a_dead_childs_lease_is_settled_by_its_owner_token,
                stats_count_states_per_endpoint_and_report_the_last_run,
                a_child_preferring_the_delayed_queue_takes_a_due_delayed_delivery_first,
                an_account_over_budget_is_rerouted_with_one_reserved_slot_per_delivery,
                a_saturated_endpoint_is_held_for_its_cool_down_then_probed_once,
                an_endpoint_at_its_in_flight_cap_is_skipped_until_a_lease_ends,
                an_endpoint_over_its_rate_reroutes_with_reserved_slots,
                a_lease_taken_on_this_boot_expires_by_the_boot_clock_not_the_wall_clock,
                deliveries_of_a_removed_endpoint_are_parked_restored_or_purged,
                dedup_keys_are_per_account,
                a_child_that_lost_its_lease_says_nothing_about_the_endpoint,
            );
        }
    };
    (@tests $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let (_guard, mut store) = $open;
                super::$name(&mut store);
            }
        )*
    };
}

conformance!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        &dir.path().join("q.db"),
        None,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    (dir, store)
});
