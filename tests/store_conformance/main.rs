//! The store conformance suite: the behaviour every backend of
//! `cronpost::store::Store` must have, written once against the trait, by
//! area (insert, lease, finish, saturation, semantics, admin) as riverdrivertest is.
//! A backend joins by adding one `conformance!` line at the bottom; every
//! verb of the trait is called by some test here. PostgreSQL runs it twice:
//! connected directly, and through PgBouncer in transaction pooling (each
//! test with a fresh database of one server this binary starts).

mod admin;
mod finish;
mod insert;
mod lease;
#[path = "../common/postgres.rs"]
mod postgres_server;
mod saturation;
mod semantics;

use std::collections::HashMap;
use std::time::Duration;

pub use cronpost::saturation::Rate;
pub use cronpost::store::*;

pub const T0: i64 = 1_000_000;

/// Budgets and endpoint limits for a test; none by default.
#[derive(Default)]
pub struct Policy {
    pub accounts: HashMap<String, Rate>,
    pub endpoints: HashMap<String, EndpointLimits>,
    /// Endpoints no longer in the config.
    pub removed: Vec<String>,
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
pub fn reclaim(store: &mut dyn Store, now: i64) -> usize {
    store
        .leases_reclaim_expired(&ReclaimParams { now, boot: None })
        .unwrap()
}

pub fn boot(id: &str, ms: i64) -> Option<cronpost::clock::BootTime> {
    Some(cronpost::clock::BootTime {
        boot_id: id.into(),
        ms,
    })
}

pub fn message(topic: &str, priority: i64) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        account: "acme".into(),
        payload: r#"{"n":1}"#.into(),
        priority,
        created_at: T0,
        available_at: None,
        dedup_key: None,
        expires_at: None,
        ordering_key: None,
    }
}

pub fn subscribe(store: &mut dyn Store, pairs: &[(&str, &str)]) {
    let subs: Vec<Subscription> = pairs
        .iter()
        .map(|(topic, endpoint)| Subscription::new(topic, endpoint))
        .collect();
    store.subscriptions_replace(&subs).unwrap();
}

/// Routes everything, in batches of two (as `routing::route_all` does with
/// larger ones).
pub fn route(store: &mut dyn Store, now: i64) -> RouteReport {
    cronpost::routing::route_all_in_batches(store, now, 2, &mut || {}).unwrap()
}

pub fn lease_params<'a>(owner: &str, now: i64, policy: &'a Policy) -> LeaseParams<'a> {
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

pub fn lease(store: &mut dyn Store, owner: &str, now: i64) -> Option<Lease> {
    lease_with(store, owner, now, &Policy::default())
}

pub fn lease_with(store: &mut dyn Store, owner: &str, now: i64, policy: &Policy) -> Option<Lease> {
    store
        .delivery_lease_next(&lease_params(owner, now, policy))
        .unwrap()
}

pub fn endpoint_limits() -> EndpointLimits {
    EndpointLimits {
        max_in_flight: None,
        rate: None,
        cooldown_base: Duration::from_secs(1),
        cooldown_cap: Duration::from_secs(8),
        max_retry_after: Duration::from_secs(60),
        slow_after: None,
        adaptive: false,
    }
}

/// One message on `t`, routed to endpoint `e`, leased by "a".
pub fn one_leased(store: &mut dyn Store) -> Lease {
    subscribe(store, &[("t", "e")]);
    store.messages_insert(&[message("t", 0)]).unwrap();
    route(store, T0);
    lease(store, "a", T0).unwrap()
}

/// Finishes an attempt whose lease is still held.
pub fn finish(store: &mut dyn Store, f: FinishAttempt) {
    assert!(store.attempt_finish(&f).unwrap());
}

pub fn state(store: &mut dyn Store, delivery_id: i64) -> DeliveryRow {
    store.delivery_get(delivery_id).unwrap().unwrap()
}

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            conformance!(@areas $open;
            insert: [
                routing_fans_out_in_batches_and_marks_unroutable_messages_once,
                a_delayed_message_is_routed_to_the_delayed_queue,
                dedup_keys_skip_repeats_and_a_bad_batch_writes_nothing,
                dedup_keys_are_per_account,
                names_sort_byte_by_byte_whatever_the_locale,
            ];
            lease: [
                leases_go_highest_priority_first_then_oldest_and_never_twice,
                a_lease_carries_the_message_and_opens_an_attempt,
                a_child_preferring_the_delayed_queue_takes_a_due_delayed_delivery_first,
                an_expired_lease_is_reclaimed_and_its_late_owner_loses,
                a_lease_taken_on_this_boot_expires_by_the_boot_clock_not_the_wall_clock,
                the_next_due_time_is_the_earliest_delayed_delivery_or_lease_expiry,
                a_runs_attempts_in_flight_are_its_children_holding_a_lease,
            ];
            finish: [
                delivered_is_final_and_records_the_attempt,
                retry_waits_in_the_delayed_queue_until_its_time,
                dead_keeps_its_error_and_its_reason,
                a_dead_childs_lease_is_settled_by_its_owner_token,
                a_child_that_lost_its_lease_says_nothing_about_the_endpoint,
            ];
            saturation: [
                an_account_over_budget_is_rerouted_with_one_reserved_slot_per_delivery,
                a_saturated_endpoint_is_held_for_its_cool_down_then_probed_once,
                a_good_answer_sent_before_the_breaker_opened_does_not_close_it,
                an_endpoint_at_its_in_flight_cap_is_skipped_until_a_lease_ends,
                silent_answers_in_a_row_open_the_breaker_and_an_answer_resets_them,
                an_endpoint_over_its_rate_reroutes_with_reserved_slots,
                deliveries_of_a_removed_endpoint_are_parked_restored_or_purged,
                an_overload_signal_teaches_a_rate_from_what_the_endpoint_took,
                answers_slowing_down_lower_the_rate_of_an_adaptive_endpoint_only,
                a_learned_rate_moves_the_slots_it_holds,
                the_step_that_reaches_the_configured_rate_spaces_every_slot,
            ];
            semantics: [
                an_expired_delivery_is_never_leased_and_expires_dead_or_discarded,
                expiry_goes_in_batches_earliest_first,
                a_keys_deliveries_go_one_at_a_time_in_order_through_retries,
                a_dead_delivery_blocks_its_key_where_the_endpoint_says_so_until_requeued,
                a_key_has_one_line_per_endpoint_across_routing_batches,
                a_keys_delivery_in_progress_keeps_it_until_it_expires,
                requeue_at_a_rate_gives_keyed_deliveries_their_slots,
            ];
            admin: [
                stats_count_states_per_endpoint_and_report_the_last_run,
                deliveries_are_listed_by_filter_oldest_first_with_their_message,
                requeue_moves_only_dead_and_delayed_deliveries_and_restarts_their_attempts,
                requeue_at_a_rate_spreads_due_times_oldest_first_up_to_its_limit,
                requeue_picks_dead_letters_by_reason_and_by_when_they_died,
                retention_purges_old_delivered_history_and_dead_letters_in_batches_and_keeps_the_rest,
                run_totals_add_up_every_recorded_run,
            ];
            );
        }
    };
    (@areas $open:expr; $($area:ident: [$($name:ident),* $(,)?];)*) => {
        $(
            mod $area {
                $(
                    #[test]
                    fn $name() {
                        let (_guard, mut store) = $open;
                        crate::$area::$name(&mut store);
                    }
                )*
            }
        )*
    };
}

conformance!(on_sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = cronpost::store::SqliteStore::open(
        &dir.path().join("q.db"),
        None,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    (dir, store)
});

conformance!(on_postgres, {
    let db = crate::postgres_server::database();
    let store =
        cronpost::store::PostgresStore::open(&db.url, std::time::Duration::from_secs(5)).unwrap();
    (db, store)
});

conformance!(on_postgres_through_pgbouncer, {
    let db = crate::postgres_server::database();
    let store =
        cronpost::store::PostgresStore::open(&db.bouncer_url, std::time::Duration::from_secs(5))
            .unwrap();
    (db, store)
});
