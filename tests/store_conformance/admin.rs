//! What admins read and change: stats, listings, requeue, purge, run records.

use super::*;

pub fn stats_count_states_per_endpoint_and_report_the_last_run(store: &mut dyn Store) {
    subscribe(store, &[("t", "a"), ("t", "b")]);
    store
        .messages_insert(&[message("t", 0), message("t", 0)])
        .unwrap();
    route(store, T0);
    let run = store.run_begin(99, "h", T0).unwrap();
    let policy = Policy::default();
    let mut params = lease_params("x", T0, &policy);
    params.run_id = Some(run);
    let l = store.delivery_lease_next(&params).unwrap().unwrap();
    store
        .attempt_finish(&FinishAttempt::dead(
            &l,
            T0,
            reason::ATTEMPTS_EXHAUSTED,
            "gone".into(),
        ))
        .unwrap();
    let record = RunRecord {
        id: run,
        pid: 99,
        host: "h".into(),
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

/// Two endpoints, three messages (accounts acme/globex), routed at T0: six
/// deliveries; the first of each endpoint leased and dead, one delivered.
fn a_small_history(store: &mut dyn Store) -> (Lease, Lease) {
    subscribe(store, &[("t", "a"), ("t", "b")]);
    let globex = NewMessage {
        account: "globex".into(),
        ..message("t", 0)
    };
    store
        .messages_insert(&[message("t", 0), message("t", 0), globex])
        .unwrap();
    route(store, T0);
    let dead = lease(store, "x", T0).unwrap();
    store
        .attempt_finish(&FinishAttempt::dead(
            &dead,
            T0,
            reason::REJECTED,
            "HTTP 410: permanent failure".into(),
        ))
        .unwrap();
    let delivered = lease(store, "y", T0).unwrap();
    store
        .attempt_finish(&FinishAttempt::delivered(
            &delivered,
            T0,
            AttemptOutcome::Delivered,
        ))
        .unwrap();
    (dead, delivered)
}

pub fn deliveries_are_listed_by_filter_oldest_first_with_their_message(store: &mut dyn Store) {
    let (dead, _) = a_small_history(store);
    let all = store
        .deliveries_list(&DeliveryFilter::default(), 100)
        .unwrap();
    assert_eq!(all.len(), 6);
    let ids: Vec<i64> = all.iter().map(|l| l.delivery.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "oldest first");
    assert!(
        all.iter()
            .all(|l| l.topic == "t" && l.uid.starts_with("msg_"))
    );
    let mut filter = |f: DeliveryFilter| store_len(store, &f);
    fn store_len(store: &mut dyn Store, f: &DeliveryFilter) -> usize {
        store.deliveries_list(f, 100).unwrap().len()
    }
    assert_eq!(
        filter(DeliveryFilter {
            state: Some(DeliveryState::Dead),
            ..DeliveryFilter::default()
        }),
        1
    );
    assert_eq!(
        filter(DeliveryFilter {
            endpoint: Some("b".into()),
            ..DeliveryFilter::default()
        }),
        3
    );
    assert_eq!(
        filter(DeliveryFilter {
            account: Some("globex".into()),
            ..DeliveryFilter::default()
        }),
        2
    );
    assert_eq!(
        filter(DeliveryFilter {
            ids: vec![dead.delivery_id, 999],
            ..DeliveryFilter::default()
        }),
        1
    );
    assert_eq!(
        filter(DeliveryFilter {
            topic: Some("other".into()),
            ..DeliveryFilter::default()
        }),
        0
    );
    assert_eq!(
        store
            .deliveries_list(&DeliveryFilter::default(), 2)
            .unwrap()
            .len(),
        2
    );
}

pub fn requeue_moves_only_dead_and_delayed_deliveries_and_restarts_their_attempts(
    store: &mut dyn Store,
) {
    let (dead, delivered) = a_small_history(store);
    let params = |ids: Vec<i64>, dry_run| RequeueParams {
        filter: DeliveryFilter {
            ids,
            ..DeliveryFilter::default()
        },
        now: T0 + 1,
        limit: None,
        spacing_ms: 0,
        expired: false,
        dry_run,
    };
    // A delivered one does not move.
    assert_eq!(
        store
            .deliveries_requeue(&params(vec![delivered.delivery_id], false))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .deliveries_requeue(&params(vec![dead.delivery_id], true))
            .unwrap(),
        1
    );
    assert_eq!(
        state(store, dead.delivery_id).state,
        DeliveryState::Dead,
        "a dry run"
    );
    assert_eq!(
        store
            .deliveries_requeue(&params(vec![dead.delivery_id], false))
            .unwrap(),
        1
    );
    let d = state(store, dead.delivery_id);
    assert_eq!(
        (d.state, d.attempts, d.reason),
        (DeliveryState::Ready, 0, None)
    );
    assert_eq!(lease(store, "z", T0 + 2).unwrap().attempt, 1);
}

pub fn requeue_picks_dead_letters_by_reason_and_by_when_they_died(store: &mut dyn Store) {
    subscribe(store, &[("t", "a")]);
    store
        .messages_insert(&(0..3).map(|_| message("t", 0)).collect::<Vec<_>>())
        .unwrap();
    route(store, T0);
    // One rejected early, one exhausted early, one exhausted late.
    let died = [
        (T0, reason::REJECTED),
        (T0 + 1, reason::ATTEMPTS_EXHAUSTED),
        (T0 + 5_000, reason::ATTEMPTS_EXHAUSTED),
    ];
    let mut ids = Vec::new();
    for (at, why) in died {
        let l = lease(store, "x", at).unwrap();
        let finish = FinishAttempt::dead(&l, at, why, "failed".into());
        assert!(store.attempt_finish(&finish).unwrap());
        ids.push(l.delivery_id);
    }
    let count = |store: &mut dyn Store, reason: Option<&str>, since: Option<i64>| {
        let params = RequeueParams {
            filter: DeliveryFilter {
                state: Some(DeliveryState::Dead),
                reason: reason.map(String::from),
                since,
                ..DeliveryFilter::default()
            },
            now: T0 + 6_000,
            limit: None,
            spacing_ms: 0,
            expired: false,
            dry_run: true,
        };
        store.deliveries_requeue(&params).unwrap()
    };
    assert_eq!(count(store, None, None), 3);
    assert_eq!(count(store, Some("rejected"), None), 1);
    assert_eq!(count(store, Some("attempts_exhausted"), None), 2);
    assert_eq!(
        count(store, Some("attempts_exhausted"), Some(T0 + 1_000)),
        1
    );
    assert_eq!(count(store, None, Some(T0 + 1)), 2, "since is inclusive");
    let listed = store
        .deliveries_list(
            &DeliveryFilter {
                reason: Some("rejected".into()),
                ..DeliveryFilter::default()
            },
            10,
        )
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].delivery.id, ids[0]);
    assert_eq!(listed[0].delivery.reason.as_deref(), Some("rejected"));
}

pub fn requeue_at_a_rate_spreads_due_times_oldest_first_up_to_its_limit(store: &mut dyn Store) {
    subscribe(store, &[("t", "a")]);
    store
        .messages_insert(&(0..5).map(|_| message("t", 0)).collect::<Vec<_>>())
        .unwrap();
    route(store, T0);
    let mut dead = Vec::new();
    while let Some(l) = lease(store, "x", T0) {
        store
            .attempt_finish(&FinishAttempt::dead(
                &l,
                T0,
                reason::REJECTED,
                "HTTP 410".into(),
            ))
            .unwrap();
        dead.push(l.delivery_id);
    }
    dead.sort();
    assert_eq!(dead.len(), 5);
    let params = |limit, dry_run| RequeueParams {
        filter: DeliveryFilter {
            state: Some(DeliveryState::Dead),
            ..DeliveryFilter::default()
        },
        now: T0 + 100,
        limit,
        spacing_ms: 20,
        expired: false,
        dry_run,
    };
    assert_eq!(store.deliveries_requeue(&params(Some(3), true)).unwrap(), 3);
    assert_eq!(
        state(store, dead[0]).state,
        DeliveryState::Dead,
        "a dry run"
    );
    assert_eq!(
        store.deliveries_requeue(&params(Some(3), false)).unwrap(),
        3
    );
    // The oldest ready now, the next two 20 and 40 ms later; the rest dead.
    let rows: Vec<_> = dead.iter().map(|&id| state(store, id)).collect();
    let seen: Vec<_> = rows
        .iter()
        .map(|d| (d.state, d.reason.clone(), d.not_before, d.attempts))
        .collect();
    let scheduled = || Some("scheduled".to_string());
    assert_eq!(
        seen[..3],
        [
            (DeliveryState::Ready, None, T0 + 100, 0),
            (DeliveryState::Delayed, scheduled(), T0 + 120, 0),
            (DeliveryState::Delayed, scheduled(), T0 + 140, 0),
        ]
    );
    assert!(rows[3..].iter().all(|d| d.state == DeliveryState::Dead));
    // Leased in that order, each at its time.
    assert_eq!(lease(store, "y", T0 + 100).unwrap().delivery_id, dead[0]);
    assert!(lease(store, "y", T0 + 119).is_none());
    assert_eq!(lease(store, "y", T0 + 120).unwrap().delivery_id, dead[1]);
}

pub fn retention_purges_old_delivered_history_and_dead_letters_in_batches_and_keeps_the_rest(
    store: &mut dyn Store,
) {
    let (dead, delivered) = a_small_history(store);
    let first = store.run_begin(1, "h", T0).unwrap();
    let second = store.run_begin(1, "h", T0 + 1).unwrap();
    // Nothing is old enough yet.
    assert_eq!(
        store.history_purge(&purge_params(T0, None)).unwrap(),
        PurgeReport::default()
    );
    let report = store.history_purge(&purge_params(T0 + 10, None)).unwrap();
    assert_eq!(report.deliveries, 1, "the delivered one");
    assert_eq!(report.runs, 1, "the older run; the latest stays");
    assert!(store.delivery_get(delivered.delivery_id).unwrap().is_none());
    assert!(
        store
            .attempts_of_delivery(delivered.delivery_id)
            .unwrap()
            .is_empty()
    );
    assert!(
        store.delivery_get(dead.delivery_id).unwrap().is_some(),
        "dead letters stay"
    );
    let totals = store.run_totals().unwrap();
    assert_eq!(totals.runs, 1);
    assert!(second > first);
    // The message of the delivered one keeps its other (dead) delivery: it stays.
    assert_eq!(state(store, dead.delivery_id).message_id, 1);
    assert!(store.message_get(&MessageKey::Id(1)).unwrap().is_some());

    // Dead letters have a retention of their own: not yet, then gone, and
    // their message with them.
    let report = store
        .history_purge(&purge_params(T0 + 10, Some(T0)))
        .unwrap();
    assert_eq!(report.dead, 0);
    assert!(store.delivery_get(dead.delivery_id).unwrap().is_some());
    let report = store
        .history_purge(&purge_params(T0 + 10, Some(T0 + 1)))
        .unwrap();
    assert_eq!((report.dead, report.messages), (1, 1));
    assert!(store.delivery_get(dead.delivery_id).unwrap().is_none());
    assert!(
        store
            .attempts_of_delivery(dead.delivery_id)
            .unwrap()
            .is_empty()
    );
    assert!(store.message_get(&MessageKey::Id(1)).unwrap().is_none());
    // Ready and other deliveries are never purged.
    assert_eq!(
        store
            .stats(T0)
            .unwrap()
            .endpoints
            .iter()
            .map(|e| e.by_state[0])
            .sum::<u64>(),
        4
    );
}

fn purge_params(delivered_before: i64, dead_before: Option<i64>) -> PurgeParams {
    PurgeParams {
        delivered_before,
        dead_before,
        batch: 10,
    }
}

pub fn run_totals_add_up_every_recorded_run(store: &mut dyn Store) {
    assert_eq!(store.run_totals().unwrap(), RunTotals::default());
    for (delivered, failed) in [(3, 1), (4, 0)] {
        let id = store.run_begin(7, "h", T0).unwrap();
        store
            .run_finish(&RunRecord {
                id,
                pid: 7,
                started_at: T0,
                finished_at: Some(T0 + 5),
                forked: delivered + failed,
                delivered,
                failed,
                found_nothing: 1,
                ..RunRecord::default()
            })
            .unwrap();
    }
    let totals = store.run_totals().unwrap();
    assert_eq!(totals.runs, 2);
    assert_eq!(
        (
            totals.sums.forked,
            totals.sums.delivered,
            totals.sums.failed,
            totals.sums.found_nothing
        ),
        (8, 7, 1, 2)
    );
    let last = store.stats(T0).unwrap().last_run.unwrap();
    assert_eq!((last.delivered, last.found_nothing), (4, 1));
}
