//! The store conformance suite: the behaviour every backend of
//! `cronpost::store::Store` must have, written once against the trait.
//! A backend joins by adding one `conformance!` line at the bottom.

use cronpost::store::*;

const T0: i64 = 1_000_000;

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

fn route(store: &mut dyn Store, now: i64) -> RouteReport {
    store
        .messages_route(RouteParams { now, batch_size: 2 })
        .unwrap()
}

fn lease_params(owner: &str, now: i64) -> LeaseParams {
    LeaseParams {
        owner: owner.into(),
        pid: 4242,
        run_id: None,
        now,
        lease_timeout_ms: 10_000,
    }
}

fn lease(store: &mut dyn Store, owner: &str, now: i64) -> Option<Lease> {
    store
        .delivery_lease_next(&lease_params(owner, now))
        .unwrap()
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

pub fn routing_fans_out_in_batches_and_leaves_unroutable_messages_waiting(store: &mut dyn Store) {
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
    assert_eq!(
        report,
        InsertReport {
            inserted: 5,
            duplicates: 0
        }
    );
    let report = route(store, T0);
    assert_eq!(
        (report.messages, report.deliveries, report.unroutable),
        (4, 7, 1)
    );
    assert_eq!(report.unroutable_topics, ["nobody"]);
    let deliveries = store.deliveries_of_message(1).unwrap();
    let endpoints: Vec<&str> = deliveries.iter().map(|d| d.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["billing", "crm"]);
    assert!(
        deliveries
            .iter()
            .all(|d| d.state == DeliveryState::Ready && d.account == "acme")
    );
    // Routing again creates nothing; a new subscriber picks up the waiting message.
    assert_eq!(route(store, T0).deliveries, 0);
    subscribe(store, &[("t", "crm"), ("nobody", "crm")]);
    let report = route(store, T0);
    assert_eq!(
        (report.messages, report.deliveries, report.unroutable),
        (1, 1, 0)
    );
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
    assert_eq!(store.delayed_promote_due(T0 + 4_999).unwrap(), 0);
    assert_eq!(store.delayed_promote_due(T0 + 5_000).unwrap(), 1);
    assert_eq!(state(store, 1).state, DeliveryState::Ready);
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
    assert_eq!(store.ready_count(100).unwrap(), 4);
    assert_eq!(store.ready_count(2).unwrap(), 2);
    let order: Vec<i64> = ["a", "b", "c", "d"]
        .iter()
        .map(|owner| lease(store, owner, T0).unwrap().delivery_id)
        .collect();
    assert_eq!(order, [2, 3, 4, 1]);
    assert!(
        lease(store, "e", T0).is_none(),
        "every delivery is leased once"
    );
    assert_eq!(store.ready_count(100).unwrap(), 0);
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
    assert_eq!(store.delayed_promote_due(T0 + 1_999).unwrap(), 0);
    assert_eq!(store.delayed_promote_due(T0 + 2_000).unwrap(), 1);
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
    assert_eq!(store.leases_reclaim_expired(T0 + 9_999).unwrap(), 0);
    assert_eq!(store.leases_reclaim_expired(T0 + 10_000).unwrap(), 1);
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
    let mut params = lease_params("x", T0);
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

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $open;
                routing_fans_out_in_batches_and_leaves_unroutable_messages_waiting,
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
    let store =
        SqliteStore::open(&dir.path().join("q.db"), std::time::Duration::from_secs(5)).unwrap();
    (dir, store)
});
