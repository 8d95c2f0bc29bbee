//! Finishing an attempt: each transition out of `leased`, and the owner rule.

use super::*;

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

pub fn dead_keeps_its_error_and_its_reason(store: &mut dyn Store) {
    let l = one_leased(store);
    assert!(
        store
            .attempt_finish(&FinishAttempt::dead(
                &l,
                T0,
                reason::REJECTED,
                "HTTP 404: permanent failure".into()
            ))
            .unwrap()
    );
    let d = state(store, l.delivery_id);
    assert_eq!(
        (d.state, d.reason.as_deref(), d.last_error.as_deref()),
        (
            DeliveryState::Dead,
            Some("rejected"),
            Some("HTTP 404: permanent failure")
        )
    );
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

pub fn a_child_that_lost_its_lease_says_nothing_about_the_endpoint(store: &mut dyn Store) {
    let l = one_leased(store);
    assert_eq!(reclaim(store, T0 + 10_000), 1);
    let second = lease(store, "b", T0 + 10_001).unwrap();
    // The second child's attempt opens the breaker...
    let saturated = EndpointSignal::Saturated {
        retry_after: Some(Duration::from_secs(30)),
        limits: endpoint_limits(),
        slows: None,
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
