//! The queue's storage, behind one trait. Every storage operation is a named
//! verb taking a params value, and every state change of a delivery is one of
//! the transitions below, applied atomically. Two backends implement it, the
//! only code that speaks SQL: SQLite (one file, the embedded default) and
//! PostgreSQL (one database several hosts dispatch from); both pass the one
//! conformance suite (tests/store_conformance/).
//!
//! Times are Unix epoch milliseconds (`i64`), the unit the schema stores.

mod candidate;
mod learning;
mod ordering;
pub mod postgres;
mod shared;
pub mod sqlite;
mod vocabulary;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Database};
use crate::error::Result;
pub use crate::saturation::{EndpointLimits, LeasePolicy, PARKED_UNTIL};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use vocabulary::*;

/// The storage operations of the queue.
pub trait Store {
    /// Replaces the topic → endpoint subscriptions; messages marked
    /// unroutable whose topic now has a subscriber become unrouted again.
    fn subscriptions_replace(&mut self, subscriptions: &[Subscription]) -> Result<()>;

    /// Inserts messages in one transaction: all or none.
    fn messages_insert(&mut self, messages: &[NewMessage]) -> Result<InsertReport>;

    /// Gives the oldest `batch_size` unrouted messages one delivery per
    /// subscribed endpoint, in one transaction; a message whose topic no
    /// endpoint subscribes to is marked unroutable instead (routed, with a
    /// `route_error`), so it is reported once, not at every run. A
    /// delivery whose ordering key has an earlier one not finished (or an
    /// earlier message not routed) waits: delayed, reason `ordering`.
    fn messages_route(&mut self, params: RouteParams) -> Result<RouteReport>;

    /// leased (lease expired) → ready; the open attempt becomes
    /// `lease_expired`. A lease taken on the boot `params.boot` names has
    /// expired when the boot clock says so; any other, when the wall clock
    /// does.
    fn leases_reclaim_expired(&mut self, params: &ReclaimParams) -> Result<usize>;

    /// delayed (`endpoint_removed`) → ready, for the deliveries of these
    /// endpoints, which are in the config again; returns how many.
    fn deliveries_restore_endpoints(&mut self, endpoints: &[String], now: i64) -> Result<u64>;

    /// Removes the deliveries parked because their endpoint left the config
    /// (of `params.endpoint` only, when given; their attempts go with them),
    /// except those of endpoints in the config again (a run restores them);
    /// returns how many (would) go.
    fn deliveries_purge_orphaned(&mut self, params: &PurgeOrphanedParams) -> Result<u64>;

    /// ready or delayed → dead (reason `expired`), for at most
    /// `params.batch` deliveries whose time to live has run out; those whose
    /// subscription says `discard_expired` are removed instead. A lease
    /// never takes an expired delivery, whether or not this ran.
    fn deliveries_expire(&mut self, params: &ExpireParams) -> Result<ExpireReport>;

    /// delayed (`ordering`) → ready, for the earliest waiting delivery (by
    /// message id) of each endpoint's ordering key that has none in
    /// progress (ready, leased, delayed for another reason; dead too where
    /// the subscription says `block_key_on_dead`); one whose message is
    /// scheduled later, or that holds a requeue's slot (`release_at`), goes
    /// to the delayed queue until then. Returns how many moved. The finish
    /// of a keyed delivery releases its own key at once; this catches the
    /// other ways out of progress (expiry, purges, requeues).
    fn deliveries_release_keys(&mut self, now: i64) -> Result<u64>;

    /// How many deliveries could be leased now (ready, and delayed whose
    /// time has come, not expired), counting no further than `limit`.
    fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64>;

    /// When the next delivery that is not leasable now becomes so: the
    /// earliest `not_before` of the delayed queue after `now` (a retry, a
    /// reserved slot, a cool-down's end; parked ones never), or an expiring
    /// lease. None: nothing will.
    fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>>;

    /// How many attempts of run `run_id` are in flight: its children that
    /// hold a lease (the others alive may still take one).
    fn attempts_in_flight(&mut self, run_id: i64) -> Result<u64>;

    /// ready or delayed (time has come) → leased, for the next delivery of
    /// the preferred queue (highest priority first, then oldest), opening its
    /// attempt; atomically, so two children never get the same one. On the
    /// way it reroutes to the delayed queue every delivery it meets whose
    /// account or endpoint is held back, and skips endpoints at their
    /// in-flight cap or with a probe in flight.
    fn delivery_lease_next(&mut self, params: &LeaseParams) -> Result<Option<Lease>>;

    /// The delivery currently leased by `owner`.
    fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>>;

    /// Applies a transition out of `leased`; a keyed delivery leaving
    /// progress releases its key's next delivery in the same transaction.
    /// Returns false, and records the attempt as `lease_lost`, when the
    /// lease is no longer held by its owner.
    fn attempt_finish(&mut self, finish: &FinishAttempt) -> Result<bool>;

    /// Opens a run record; returns its id.
    fn run_begin(&mut self, pid: u32, host: &str, now: i64) -> Result<i64>;

    /// Writes a run's final counters.
    fn run_finish(&mut self, run: &RunRecord) -> Result<()>;

    /// Every recorded run added up.
    fn run_totals(&mut self) -> Result<RunTotals>;

    /// One delivery.
    fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>>;

    /// The deliveries of one message, by endpoint name.
    fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>>;

    /// The attempts of one delivery, oldest first.
    fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>>;

    /// Counts for `cronpost stats`.
    fn stats(&mut self, now: i64) -> Result<Stats>;

    /// Deliveries matching `filter`, oldest first, at most `limit`.
    fn deliveries_list(
        &mut self,
        filter: &DeliveryFilter,
        limit: u64,
    ) -> Result<Vec<ListedDelivery>>;

    /// One message, by id or by uid (`msg_...`).
    fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>>;

    /// Unroutable messages (`route_error` set) become unrouted again, so the
    /// next run routes them (after a subscriber was added); returns how many
    /// (would) change.
    fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64>;

    /// dead or delayed → ready, for the deliveries matching the filter
    /// (not those waiting for their key; expired dead letters only with
    /// `params.expired`), with a fresh count of attempts, spread out by
    /// `params.spacing_ms`; a keyed one rejoins its key's line with its
    /// slot. Returns how many (would) move.
    fn deliveries_requeue(&mut self, params: &RequeueParams) -> Result<u64>;

    /// The schema version the database records.
    fn schema_version(&mut self) -> Result<i64>;

    /// Closes the connection of a process about to exit.
    fn close_at_exit(self: Box<Self>) {}

    /// One bounded batch of retention: removes delivered deliveries and
    /// dead letters past their times (their attempts go with them), then
    /// routed messages left with no delivery and old run records, as
    /// `params` says. Call again until it removes nothing.
    fn history_purge(&mut self, params: &PurgeParams) -> Result<PurgeReport>;
}

/// Opens the configured database and migrates it. A SQLite file is created
/// when missing: shared with `database_group` (or the group of a setgid
/// directory) as 0660, else readable by its owner only, since it holds every
/// payload (see `files`).
pub fn open(config: &Config) -> Result<Box<dyn Store>> {
    Ok(match &config.database {
        Database::Sqlite(path) => Box::new(SqliteStore::open(
            path,
            config.database_group,
            config.busy_timeout,
        )?),
        Database::Postgres(url) => Box::new(PostgresStore::open(url, config.busy_timeout)?),
    })
}

/// Connects to the configured, migrated database without checks or
/// migrations: a child's connection, made after fork, as cheaply as possible.
pub fn open_existing(config: &Config) -> Result<Box<dyn Store>> {
    Ok(match &config.database {
        Database::Sqlite(path) => Box::new(SqliteStore::open_existing(path, config.busy_timeout)?),
        Database::Postgres(url) => {
            Box::new(PostgresStore::open_existing(url, config.busy_timeout)?)
        }
    })
}

/// [`open`], for producers: a commit survives an OS crash or a power loss
/// (SQLite's synchronous=FULL; PostgreSQL's commits are durable unless its
/// server is set otherwise), since a producer told "enqueued" forgets the
/// message. The dispatcher's SQLite connections keep synchronous=NORMAL: a
/// commit lost there is an attempt recorded again, a redelivery at worst.
pub fn open_durable(config: &Config) -> Result<Box<dyn Store>> {
    match &config.database {
        Database::Sqlite(path) => {
            let mut store = SqliteStore::open(path, config.database_group, config.busy_timeout)?;
            store.make_durable()?;
            Ok(Box::new(store))
        }
        Database::Postgres(_) => open(config),
    }
}

/// The schema version this build migrates the configured database to.
pub fn latest_schema_version(config: &Config) -> i64 {
    match config.database {
        Database::Sqlite(_) => SqliteStore::latest_schema_version(),
        Database::Postgres(_) => PostgresStore::latest_schema_version(),
    }
}

/// Subscriptions in the order both backends compare them, one per (topic,
/// endpoint).
fn sorted_subscriptions(subscriptions: &[Subscription]) -> Vec<Subscription> {
    let mut sorted = subscriptions.to_vec();
    sorted.sort_by(|a, b| (&a.topic, &a.endpoint).cmp(&(&b.topic, &b.endpoint)));
    sorted.dedup_by(|a, b| (&a.topic, &a.endpoint) == (&b.topic, &b.endpoint));
    sorted
}

/// Now, in Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A duration in milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A backend's migration files: every `.sql` file in `migrations/<dir>` is
/// in `files`, in order, numbered from 0001.
#[cfg(test)]
fn assert_migrations_listed_in_order(dir: &str, files: &[(&str, &str)]) {
    let path = format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut on_disk: Vec<String> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sql"))
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = files.iter().map(|(name, _)| *name).collect();
    assert_eq!(on_disk, listed);
    for (i, name) in listed.iter().enumerate() {
        assert!(
            name.starts_with(&format!("{:04}_", i + 1)),
            "{name} is number {}",
            i + 1
        );
    }
}
