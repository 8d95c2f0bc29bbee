//! Leasing: order, what a lease carries, the delayed queue, expiry and the clocks.

use super::*;

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

pub fn the_next_due_time_is_the_earliest_delayed_delivery_or_lease_expiry(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    assert_eq!(
        store.deliveries_next_due(T0).unwrap(),
        None,
        "nothing at all"
    );
    let at = |delay| NewMessage {
        available_at: Some(T0 + delay),
        ..message("t", 0)
    };
    store.messages_insert(&[at(9_000), at(4_000)]).unwrap();
    route(store, T0);
    assert_eq!(store.deliveries_next_due(T0).unwrap(), Some(T0 + 4_000));
    // A lease (10 s) expiring before the delayed ones come due.
    store.messages_insert(&[message("t", 0)]).unwrap();
    route(store, T0);
    lease(store, "a", T0 - 7_000).unwrap();
    assert_eq!(store.deliveries_next_due(T0).unwrap(), Some(T0 + 3_000));
}

pub fn a_runs_attempts_in_flight_are_its_children_holding_a_lease(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    store
        .messages_insert(&[message("t", 0), message("t", 0), message("t", 0)])
        .unwrap();
    route(store, T0);
    let run = store.run_begin(1, "h", T0).unwrap();
    let other = store.run_begin(2, "h", T0).unwrap();
    let policy = Policy::default();
    let mut leases = Vec::new();
    for (owner, run_id) in [("a", run), ("b", run), ("c", other)] {
        let mut params = lease_params(owner, T0, &policy);
        params.run_id = Some(run_id);
        leases.push(store.delivery_lease_next(&params).unwrap().unwrap());
    }
    assert_eq!(store.attempts_in_flight(run).unwrap(), 2);
    let done = FinishAttempt::delivered(&leases[0], T0 + 1, AttemptOutcome::Delivered);
    assert!(store.attempt_finish(&done).unwrap());
    assert_eq!(store.attempts_in_flight(run).unwrap(), 1);
    assert_eq!(store.attempts_in_flight(other).unwrap(), 1);
    assert_eq!(store.attempts_in_flight(other + 1).unwrap(), 0);
}
