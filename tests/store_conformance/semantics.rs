//! Delivery semantics: expiry (a message's own, or its topic's max_age)
//! and, later, ordering keys.

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
