//! Inserting and routing: fan-out, delays, dedup keys, unroutable messages.

use super::*;

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

/// Names compare and sort byte by byte ("B" before "a"), whatever the
/// database's locale: lists come in the same order from every backend.
pub fn names_sort_byte_by_byte_whatever_the_locale(store: &mut dyn Store) {
    subscribe(store, &[("t", "a"), ("t", "B"), ("U", "a")]);
    let mut unrouted = message("t", 0);
    unrouted.topic = "v".into();
    let mut second = message("U", 0);
    second.account = "Acme".into();
    store
        .messages_insert(&[message("t", 0), second, unrouted.clone(), unrouted])
        .unwrap();
    let mut nobody = message("Z", 0);
    nobody.topic = "W".into();
    store.messages_insert(&[nobody]).unwrap();
    let report = route(store, T0);
    assert_eq!(report.unroutable_topics, ["W", "v"]);
    let endpoints: Vec<String> = store
        .deliveries_of_message(1)
        .unwrap()
        .into_iter()
        .map(|d| d.endpoint)
        .collect();
    assert_eq!(endpoints, ["B", "a"]);
    let stats = store.stats(T0).unwrap();
    let names: Vec<&str> = stats
        .endpoints
        .iter()
        .map(|e| e.endpoint.as_str())
        .collect();
    assert_eq!(names, ["B", "a"]);
}
