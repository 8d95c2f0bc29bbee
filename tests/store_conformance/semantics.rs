//! Delivery semantics: expiry (a message's own, or its topic's max_age)
//! and ordering keys.

use super::*;

fn expire(store: &mut dyn Store, now: i64) -> ExpireReport {
    store
        .deliveries_expire(&ExpireParams { now, batch: 100 })
        .unwrap()
}

pub fn an_expired_delivery_is_never_leased_and_expires_dead_or_discarded(store: &mut dyn Store) {
    let mut subs = vec![Subscription {
        max_age_ms: Some(1_000),
        ..Subscription::new("t", "keep")
    }];
    subs.push(Subscription {
        max_age_ms: Some(1_000),
        discard_expired: true,
        ..Subscription::new("u", "drop")
    });
    store.subscriptions_replace(&subs).unwrap();
    let own = NewMessage {
        expires_at: Some(T0 + 500),
        ..message("t", 0)
    };
    store
        .messages_insert(&[own, message("t", 0), message("u", 0)])
        .unwrap();
    route(store, T0);
    let ids: Vec<i64> = (1..=3)
        .map(|m| store.deliveries_of_message(m).unwrap()[0].id)
        .collect();
    // Past its own expiry, the first is skipped: the second is leased.
    let l = lease(store, "a", T0 + 600).unwrap();
    assert_eq!(l.delivery_id, ids[1]);
    assert!(
        store
            .attempt_finish(&FinishAttempt::retry(
                &l,
                T0 + 600,
                T0 + 700,
                "HTTP 500".into()
            ))
            .unwrap()
    );
    let third = lease(store, "b", T0 + 600).unwrap();
    assert_eq!(third.delivery_id, ids[2]);
    assert!(
        store
            .attempt_finish(&FinishAttempt::retry(
                &third,
                T0 + 600,
                T0 + 700,
                "HTTP 500".into()
            ))
            .unwrap()
    );
    assert!(
        lease(store, "c", T0 + 600).is_none(),
        "only the expired one is left ready"
    );
    assert_eq!(
        expire(store, T0 + 600),
        ExpireReport {
            expired: 1,
            discarded: 0
        }
    );
    let d = state(store, ids[0]);
    assert_eq!(
        (d.state, d.reason.as_deref()),
        (DeliveryState::Dead, Some("expired"))
    );
    // The topic's max_age: created at T0, expired at T0 + 1,000, waiting
    // for a retry or not; one topic discards.
    assert!(
        lease(store, "d", T0 + 1_000).is_none(),
        "retries past max_age are not sent"
    );
    assert_eq!(
        expire(store, T0 + 1_000),
        ExpireReport {
            expired: 1,
            discarded: 1
        }
    );
    assert_eq!(state(store, ids[1]).reason.as_deref(), Some("expired"));
    assert!(store.delivery_get(ids[2]).unwrap().is_none(), "discarded");
    assert_eq!(expire(store, T0 + 2_000), ExpireReport::default());
    assert_eq!(
        store
            .message_get(&MessageKey::Id(1))
            .unwrap()
            .unwrap()
            .expires_at,
        Some(T0 + 500)
    );
}

pub fn expiry_goes_in_batches_earliest_first(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    let messages: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage {
            expires_at: Some(T0 + 100 - i),
            ..message("t", 0)
        })
        .collect();
    store.messages_insert(&messages).unwrap();
    route(store, T0);
    let batch = |store: &mut dyn Store| {
        store
            .deliveries_expire(&ExpireParams {
                now: T0 + 100,
                batch: 2,
            })
            .unwrap()
    };
    assert_eq!(batch(store).expired, 2);
    // The earliest to expire went first: messages 5 and 4.
    let dead: Vec<i64> = store
        .deliveries_list(
            &DeliveryFilter {
                state: Some(DeliveryState::Dead),
                ..DeliveryFilter::default()
            },
            10,
        )
        .unwrap()
        .iter()
        .map(|d| d.delivery.message_id)
        .collect();
    assert_eq!(dead, [4, 5]);
    assert_eq!(batch(store).expired, 2);
    assert_eq!(batch(store).expired, 1);
    assert_eq!(batch(store).expired, 0);
}

fn keyed(key: Option<&str>) -> NewMessage {
    NewMessage {
        ordering_key: key.map(String::from),
        ..message("t", 0)
    }
}

pub fn a_keys_deliveries_go_one_at_a_time_in_order_through_retries(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    let k = Some("customer-42");
    store
        .messages_insert(&[
            keyed(k),
            keyed(k),
            keyed(k),
            keyed(Some("other")),
            keyed(None),
        ])
        .unwrap();
    route(store, T0);
    let d: Vec<DeliveryRow> = (1..=5)
        .map(|m| store.deliveries_of_message(m).unwrap().remove(0))
        .collect();
    let states: Vec<(DeliveryState, Option<&str>)> =
        d.iter().map(|d| (d.state, d.reason.as_deref())).collect();
    let waiting = (DeliveryState::Delayed, Some("ordering"));
    let ready = (DeliveryState::Ready, None);
    assert_eq!(states, [ready, waiting, waiting, ready, ready]);
    // Other keys and unkeyed messages go in parallel; the key's later ones wait.
    let first = lease(store, "a", T0).unwrap();
    assert_eq!(first.delivery_id, d[0].id);
    let others = [
        lease(store, "b", T0).unwrap(),
        lease(store, "c", T0).unwrap(),
    ];
    assert_eq!(
        [others[0].delivery_id, others[1].delivery_id],
        [d[3].id, d[4].id]
    );
    assert!(lease(store, "d", T0).is_none());
    assert_eq!(store.leasable_count(T0, 100).unwrap(), 0);
    // A retry keeps the key: nothing is released while it waits.
    finish(
        store,
        FinishAttempt::retry(&first, T0, T0 + 100, "HTTP 500".into()),
    );
    assert_eq!(store.deliveries_release_keys(T0 + 1).unwrap(), 0);
    assert!(lease(store, "e", T0 + 1).is_none());
    let again = lease(store, "f", T0 + 100).unwrap();
    assert_eq!((again.delivery_id, again.attempt), (d[0].id, 2));
    finish(
        store,
        FinishAttempt::delivered(&again, T0 + 101, AttemptOutcome::Delivered),
    );
    // Delivered: its finish released the next of the key, and only it.
    assert_eq!(state(store, d[1].id).state, DeliveryState::Ready);
    assert_eq!(state(store, d[2].id).reason.as_deref(), Some("ordering"));
    assert_eq!(store.deliveries_release_keys(T0 + 102).unwrap(), 0);
    let second = lease(store, "g", T0 + 102).unwrap();
    assert_eq!(second.delivery_id, d[1].id);
    // A dead one releases its key (the default).
    finish(
        store,
        FinishAttempt::dead(&second, T0 + 103, reason::REJECTED, "HTTP 400".into()),
    );
    assert_eq!(lease(store, "h", T0 + 104).unwrap().delivery_id, d[2].id);
    // A new message of the key queues behind the one in flight.
    store.messages_insert(&[keyed(k)]).unwrap();
    route(store, T0 + 105);
    let late = store.deliveries_of_message(6).unwrap().remove(0);
    assert_eq!(late.reason.as_deref(), Some("ordering"));
    // Requeuing the waiting does not jump the line.
    let requeue = RequeueParams {
        filter: DeliveryFilter {
            state: Some(DeliveryState::Delayed),
            ..DeliveryFilter::default()
        },
        now: T0 + 106,
        limit: None,
        spacing_ms: 0,
        expired: false,
        dry_run: false,
    };
    assert_eq!(store.deliveries_requeue(&requeue).unwrap(), 0);
    assert_eq!(
        store
            .message_get(&MessageKey::Id(1))
            .unwrap()
            .unwrap()
            .ordering_key
            .as_deref(),
        k
    );
}

pub fn a_dead_delivery_blocks_its_key_where_the_endpoint_says_so_until_requeued(
    store: &mut dyn Store,
) {
    store
        .subscriptions_replace(&[Subscription {
            block_key_on_dead: true,
            ..Subscription::new("t", "strict")
        }])
        .unwrap();
    let k = Some("order-7");
    store.messages_insert(&[keyed(k), keyed(k)]).unwrap();
    route(store, T0);
    let first = lease(store, "a", T0).unwrap();
    finish(
        store,
        FinishAttempt::dead(&first, T0, reason::REJECTED, "HTTP 422".into()),
    );
    assert_eq!(store.deliveries_release_keys(T0 + 1).unwrap(), 0, "blocked");
    assert!(lease(store, "b", T0 + 1).is_none());
    // Routed while blocked: waits too.
    store.messages_insert(&[keyed(k)]).unwrap();
    route(store, T0 + 2);
    assert_eq!(
        store.deliveries_of_message(3).unwrap()[0].reason.as_deref(),
        Some("ordering")
    );
    // Requeued, the dead one rejoins the line at its place: first.
    let requeue = RequeueParams {
        filter: DeliveryFilter {
            ids: vec![first.delivery_id],
            ..DeliveryFilter::default()
        },
        now: T0 + 3,
        limit: None,
        spacing_ms: 0,
        expired: false,
        dry_run: false,
    };
    assert_eq!(store.deliveries_requeue(&requeue).unwrap(), 1);
    let again = lease(store, "c", T0 + 3).unwrap();
    assert_eq!(again.delivery_id, first.delivery_id);
    assert!(lease(store, "d", T0 + 3).is_none());
    finish(
        store,
        FinishAttempt::delivered(&again, T0 + 4, AttemptOutcome::Delivered),
    );
    assert_eq!(
        lease(store, "e", T0 + 5).unwrap().delivery_id,
        store.deliveries_of_message(2).unwrap()[0].id
    );
}

/// Ten messages of one key, routed two at a time, to two endpoints: each
/// endpoint has its own line (one in progress each), and only the finish
/// of an endpoint's delivery moves that endpoint's line on.
pub fn a_key_has_one_line_per_endpoint_across_routing_batches(store: &mut dyn Store) {
    subscribe(store, &[("t", "a"), ("t", "b")]);
    let k = Some("k");
    store.messages_insert(&vec![keyed(k); 10]).unwrap();
    route(store, T0);
    let ready = |store: &mut dyn Store| -> Vec<(String, i64)> {
        let listed = store
            .deliveries_list(
                &DeliveryFilter {
                    state: Some(DeliveryState::Ready),
                    ordering_key: Some("k".into()),
                    ..DeliveryFilter::default()
                },
                100,
            )
            .unwrap();
        listed
            .iter()
            .map(|l| (l.delivery.endpoint.clone(), l.delivery.message_id))
            .collect()
    };
    assert_eq!(ready(store), [("a".into(), 1), ("b".into(), 1)]);
    let first = lease(store, "x", T0).unwrap();
    let other = lease(store, "y", T0).unwrap();
    assert_ne!(
        first.endpoint, other.endpoint,
        "the endpoints go in parallel"
    );
    finish(
        store,
        FinishAttempt::delivered(&first, T0 + 1, AttemptOutcome::Delivered),
    );
    assert_eq!(ready(store), [(first.endpoint.clone(), 2)]);
    assert_eq!(first.ordering_key.as_deref(), k);
}

/// The delivery in progress keeps its key through a lost lease (reclaimed
/// to ready, still the one in progress) and a parked endpoint; its expiry
/// frees the key, which the next run step releases.
pub fn a_keys_delivery_in_progress_keeps_it_until_it_expires(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    let k = Some("k");
    let first = NewMessage {
        expires_at: Some(T0 + 50_000),
        ..keyed(k)
    };
    store.messages_insert(&[first, keyed(k)]).unwrap();
    route(store, T0);
    let ids: Vec<i64> = (1..=2)
        .map(|m| store.deliveries_of_message(m).unwrap()[0].id)
        .collect();
    lease(store, "lost", T0).unwrap();
    assert_eq!(reclaim(store, T0 + 10_000), 1);
    assert_eq!(store.deliveries_release_keys(T0 + 10_000).unwrap(), 0);
    assert_eq!(state(store, ids[1]).reason.as_deref(), Some("ordering"));
    // Parked while its endpoint is out of the config: still in progress.
    let removed = Policy {
        removed: vec!["e".into()],
        ..Policy::default()
    };
    assert!(lease_with(store, "p", T0 + 10_001, &removed).is_none());
    assert_eq!(
        state(store, ids[0]).reason.as_deref(),
        Some("endpoint_removed")
    );
    assert_eq!(store.deliveries_release_keys(T0 + 10_002).unwrap(), 0);
    assert_eq!(
        store
            .deliveries_restore_endpoints(&["e".into()], T0 + 10_003)
            .unwrap(),
        1
    );
    assert_eq!(state(store, ids[0]).state, DeliveryState::Ready);
    // Expired: dead, and the key moves on.
    assert_eq!(expire(store, T0 + 50_000).expired, 1);
    assert_eq!(store.deliveries_release_keys(T0 + 50_001).unwrap(), 1);
    assert_eq!(lease(store, "n", T0 + 50_001).unwrap().delivery_id, ids[1]);
}

/// `requeue` at a rate: keyed deliveries keep their slots through their
/// key's line, so the pace holds for them too; expired dead letters are
/// left alone unless asked for, and then their expiry is lifted.
pub fn requeue_at_a_rate_gives_keyed_deliveries_their_slots(store: &mut dyn Store) {
    subscribe(store, &[("t", "e")]);
    store
        .messages_insert(&[
            keyed(Some("k1")),
            keyed(Some("k1")),
            keyed(Some("k2")),
            keyed(None),
            NewMessage {
                expires_at: Some(T0 + 10),
                ..keyed(None)
            },
            NewMessage {
                expires_at: Some(T0 + 500),
                priority: 1,
                ..keyed(None)
            },
        ])
        .unwrap();
    route(store, T0);
    // All dead: five rejected (the last one's time to live runs out
    // later), one expired.
    for now in [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4] {
        let l = lease(store, "x", now).unwrap();
        finish(
            store,
            FinishAttempt::dead(&l, now, reason::REJECTED, "HTTP 400".into()),
        );
    }
    assert_eq!(expire(store, T0 + 10).expired, 1);
    let ids: Vec<i64> = (1..=6)
        .map(|m| store.deliveries_of_message(m).unwrap()[0].id)
        .collect();
    let requeue = |expired, now| RequeueParams {
        filter: DeliveryFilter {
            state: Some(DeliveryState::Dead),
            ..DeliveryFilter::default()
        },
        now,
        limit: None,
        spacing_ms: 100,
        expired,
        dry_run: false,
    };
    let t = T0 + 1_000;
    assert_eq!(store.deliveries_requeue(&requeue(false, t)).unwrap(), 4);
    assert_eq!(
        state(store, ids[4]).state,
        DeliveryState::Dead,
        "expired: left"
    );
    assert_eq!(
        state(store, ids[5]).state,
        DeliveryState::Dead,
        "its time to live ran out: left"
    );
    let at = |store: &mut dyn Store, i: usize| {
        let d = state(store, ids[i]);
        (d.state, d.reason, d.not_before)
    };
    let delayed = |why: &str, at| (DeliveryState::Delayed, Some(why.to_string()), at);
    assert_eq!(at(store, 0), (DeliveryState::Ready, None, t));
    assert_eq!(
        at(store, 1),
        delayed("ordering", PARKED_UNTIL),
        "behind k1's first"
    );
    assert_eq!(at(store, 2), delayed("scheduled", t + 200));
    assert_eq!(at(store, 3), delayed("scheduled", t + 300));
    // k1's first delivered early: its second still waits for its slot.
    let l = lease(store, "y", t).unwrap();
    assert_eq!(l.delivery_id, ids[0]);
    finish(
        store,
        FinishAttempt::delivered(&l, t + 10, AttemptOutcome::Delivered),
    );
    assert_eq!(at(store, 1), delayed("scheduled", t + 100));
    // Asked for by reason, the expired one goes, its expiry lifted.
    let expired_only = RequeueParams {
        filter: DeliveryFilter {
            state: Some(DeliveryState::Dead),
            reason: Some(reason::EXPIRED.into()),
            ..DeliveryFilter::default()
        },
        ..requeue(true, t + 20)
    };
    assert_eq!(store.deliveries_requeue(&expired_only).unwrap(), 1);
    let d = state(store, ids[4]);
    assert_eq!((d.state, d.expires_at), (DeliveryState::Ready, None));
    assert_eq!(lease(store, "z", t + 20).unwrap().delivery_id, ids[4]);
    // Named by id, the other goes too, its expiry lifted.
    let by_id = RequeueParams {
        filter: DeliveryFilter {
            ids: vec![ids[5]],
            ..DeliveryFilter::default()
        },
        ..requeue(true, t + 30)
    };
    assert_eq!(store.deliveries_requeue(&by_id).unwrap(), 1);
    let d = state(store, ids[5]);
    assert_eq!((d.state, d.expires_at), (DeliveryState::Ready, None));
}
