//! The PostgreSQL backend of [`Store`], for several hosts dispatching from
//! one queue: the same verbs, transitions and meanings as the SQLite
//! backend (the conformance suite runs on both), with `lease` (the
//! children's path) and `admin` (reads and writes for people) beside it.
//!
//! One connection per process, made after fork, directly or through
//! PgBouncer in transaction pooling: every statement is sent unnamed with
//! its parameter types (`query_typed`: parse, bind and execute in one round
//! trip), so nothing relies on a server-side prepared statement outliving
//! its transaction. What SQLite's one write lock serialised, PostgreSQL
//! serialises where it matters and no further: a lease skips rows another
//! transaction holds (`FOR UPDATE SKIP LOCKED`), and the shared state of a
//! limited account or endpoint (its rate, breaker, in-flight count) is read
//! and written under a transaction-scoped advisory lock on its key.

mod admin;
mod lease;
mod migrations;

use ::postgres::types::{ToSql, Type};
use ::postgres::{Client, NoTls, Row, error::SqlState};

use super::*;
use super::{ordering, shared};
use crate::error::{Error, ExitCode};

/// Typed parameters for `query_typed`: `typed![x => INT8, name => TEXT]`.
macro_rules! typed {
    ($($value:expr => $ty:ident),* $(,)?) => {
        &[$((&$value as &(dyn ::postgres::types::ToSql + Sync), ::postgres::types::Type::$ty)),*]
    };
}
use typed;

/// A transaction is tried again this often when PostgreSQL aborts it for a
/// deadlock or a serialization failure (rare: two leases taking the locks of
/// two limited keys in opposite orders).
const TRIES: u32 = 8;

/// The PostgreSQL store.
pub struct PostgresStore {
    client: Client,
    /// What begins a write transaction.
    begin: String,
    /// The database, as errors name it (without a password).
    name: String,
}

impl PostgresStore {
    /// Connects and migrates: what the dispatcher parent, `enqueue` and
    /// admin commands do. Several hosts starting at once migrate one after
    /// another (an advisory lock), and each applies only what is missing.
    pub fn open(url: &str, busy_timeout: Duration) -> Result<PostgresStore> {
        let mut store = PostgresStore::open_existing(url, busy_timeout)?;
        migrations::apply(&mut store.client, &store.name)?;
        Ok(store)
    }

    /// Connects to a migrated database without migrating: a child's
    /// connection, made after fork. `busy_timeout` bounds the connect (unless
    /// the URL says otherwise) and every lock wait.
    pub fn open_existing(url: &str, busy_timeout: Duration) -> Result<PostgresStore> {
        let name = crate::config::redacted_database_url(url);
        let mut config: ::postgres::Config = url.parse().map_err(|e| {
            Error::config(format!(
                "database {name}: not a PostgreSQL connection URL: {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(busy_timeout);
        }
        if !url.contains("keepalives_idle") {
            // A connection that died silently (a NAT, a vanished host) is
            // seen within a minute, not two hours (TCP only).
            config.keepalives_idle(Duration::from_secs(30));
        }
        if config.get_application_name().is_none() {
            config.application_name("cronpost");
        }
        let client = config.connect(NoTls).map_err(|e| db_error(&name, &e))?;
        let begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {}",
            busy_timeout.as_millis().max(1)
        );
        Ok(PostgresStore {
            client,
            name,
            begin,
        })
    }

    /// Subscribes this connection to the notification every insert into
    /// `messages` sends (a session's state: made directly, not through
    /// PgBouncer in transaction pooling).
    pub fn listen_for_messages(&mut self) -> Result<()> {
        let name = self.name.clone();
        self.client
            .batch_execute("LISTEN cronpost_messages")
            .map_err(|e| db_error(&name, &e))
    }

    /// Waits up to `timeout` for a notification; whether one came (all that
    /// came are taken: one look serves them all).
    pub fn wait_for_notification(&mut self, timeout: Duration) -> Result<bool> {
        use ::postgres::fallible_iterator::FallibleIterator;
        let name = self.name.clone();
        let mut notifications = self.client.notifications();
        let came = notifications
            .timeout_iter(timeout)
            .next()
            .map_err(|e| db_error(&name, &e))?
            .is_some();
        if came {
            while let Ok(Some(_)) = notifications.iter().next() {}
        }
        Ok(came)
    }

    /// The schema version this build migrates to.
    pub fn latest_schema_version() -> i64 {
        migrations::latest_version()
    }

    /// Runs `f` in one transaction, committed if `f` succeeds, tried again
    /// when PostgreSQL aborts it for a deadlock or a serialization failure.
    /// A lock is waited for at most `busy_timeout`, as on SQLite (`SET
    /// LOCAL`: PgBouncer in transaction pooling keeps no session setting);
    /// the BEGIN and the SET go in one round trip. READ COMMITTED whatever
    /// the server's default: what a lease reads after taking an advisory
    /// lock (a rate, a breaker, an in-flight count) must be what the lock's
    /// last holder committed, not a snapshot from before.
    fn write<T>(
        &mut self,
        mut f: impl FnMut(&mut Client) -> Result<T, ::postgres::Error>,
    ) -> Result<T> {
        let begin = &self.begin;
        retried(&mut self.client, &self.name, |client| {
            let outcome = client.batch_execute(begin).and_then(|()| {
                let value = f(client)?;
                client.batch_execute("COMMIT").map(|()| value)
            });
            if outcome.is_err() && !client.is_closed() {
                // The transaction is aborted or was never begun: nothing of
                // it is kept.
                let _ = client.batch_execute("ROLLBACK");
            }
            outcome
        })
    }

    /// One writing statement in its own transaction (autocommit), tried
    /// again as [`PostgresStore::write`] is. It sets no lock_timeout (that
    /// would take a transaction of three round trips): what it waits for is
    /// a row another transaction holds, for long only when held by hand.
    fn write_one<T>(
        &mut self,
        f: impl FnMut(&mut Client) -> Result<T, ::postgres::Error>,
    ) -> Result<T> {
        retried(&mut self.client, &self.name, f)
    }

    /// One statement outside a transaction (autocommit): the reads.
    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, ::postgres::Error>,
    ) -> Result<T> {
        f(&mut self.client).map_err(|e| db_error(&self.name, &e))
    }
}

/// Whether `e` came from the connection rather than from the server or the
/// client's decoding: an I/O error underneath, or the client's own words
/// for a connect that failed or timed out.
fn is_connection_error(e: &::postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    let text = e.to_string();
    text.starts_with("error connecting") || text.contains("timed out") || text.contains("timeout")
}

/// Runs `once` until it succeeds, fails for good, or has been tried
/// [`TRIES`] times; PostgreSQL's error as `name`'s.
fn retried<T>(
    client: &mut Client,
    name: &str,
    mut once: impl FnMut(&mut Client) -> Result<T, ::postgres::Error>,
) -> Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        match once(client) {
            Err(e) if tries < TRIES && is_retryable(&e) => continue,
            other => return other.map_err(|e| db_error(name, &e)),
        }
    }
}

fn is_retryable(e: &::postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
    )
}

/// Maps a PostgreSQL error to a message naming the database and a sysexits
/// code, as the SQLite backend does for its file.
fn db_error(name: &str, e: &::postgres::Error) -> Error {
    let (code, hint) = match e.code().map(SqlState::code) {
        // Integrity constraint violations and data exceptions: bad input.
        Some(c) if c.starts_with("23") || c.starts_with("22") => (ExitCode::DataErr, ""),
        Some("40003") => (
            ExitCode::TempFail,
            " (the connection failed during COMMIT: whether it was written is unknown)",
        ),
        Some(c) if c.starts_with("40") || c == "55P03" || c == "57014" => {
            (ExitCode::TempFail, " (nothing was changed; try again)")
        }
        // A read-only transaction: a standby, after a failover.
        Some("25006") => (
            ExitCode::TempFail,
            " (the server is read-only, a standby? nothing was changed)",
        ),
        Some(c) if c.starts_with("58") => (ExitCode::IoErr, ""),
        Some(c) if c.starts_with("28") || c == "42501" => (ExitCode::NoPerm, ""),
        Some("53100") => (
            ExitCode::IoErr,
            " (the server's disk is full; the transaction was rolled back, nothing of it was written)",
        ),
        Some(c) if c.starts_with("53") => (
            ExitCode::TempFail,
            " (the server is out of a resource, such as connections; try again)",
        ),
        Some(c) if c.starts_with("08") || c.starts_with("57") || c == "3D000" => {
            (ExitCode::Unavailable, "")
        }
        Some(_) => (ExitCode::Software, ""),
        // No SQLSTATE: the connection could not be made or was lost (an I/O
        // error, a closed connection, a timeout), or the client could not
        // read what came back (a bug).
        None if e.to_string().starts_with("invalid configuration") => (ExitCode::Config, ""),
        None if e.to_string().contains("password") || e.to_string().contains("authentication") => {
            (ExitCode::NoPerm, "")
        }
        None if e.is_closed() || is_connection_error(e) => (
            ExitCode::Unavailable,
            " (is the server running, and the URL's host, port and database right?)",
        ),
        None => (ExitCode::Software, ""),
    };
    let detail = match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    };
    Error::new(code, format!("database {name}: {detail}{hint}"))
}

const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.endpoint, d.account, d.state, d.priority, \
     d.not_before, d.reason, d.lease_owner, d.lease_expires_at, d.attempts, d.last_status, d.last_error, \
     d.expires_at, d.ordering_key";

fn delivery_row(r: &Row) -> Result<DeliveryRow, ::postgres::Error> {
    let state: String = r.try_get(4)?;
    Ok(DeliveryRow {
        id: r.try_get(0)?,
        message_id: r.try_get(1)?,
        endpoint: r.try_get(2)?,
        account: r.try_get(3)?,
        // The column's CHECK allows only the five names.
        state: DeliveryState::parse(&state).unwrap_or(DeliveryState::Dead),
        priority: r.try_get(5)?,
        not_before: r.try_get(6)?,
        reason: r.try_get(7)?,
        lease_owner: r.try_get(8)?,
        lease_expires_at: r.try_get(9)?,
        attempts: r.try_get::<_, i64>(10)? as u32,
        last_status: r.try_get::<_, Option<i64>>(11)?.map(|s| s as u16),
        last_error: r.try_get(12)?,
        expires_at: r.try_get(13)?,
        ordering_key: r.try_get(14)?,
    })
}

fn run_row(r: &Row) -> Result<RunRecord, ::postgres::Error> {
    let count = |i: usize| r.try_get::<_, i64>(i).map(|n| n as u64);
    Ok(RunRecord {
        id: r.try_get(0)?,
        pid: r.try_get::<_, i64>(1)? as u32,
        started_at: r.try_get(2)?,
        finished_at: r.try_get(3)?,
        routed: count(4)?,
        reclaimed: count(5)?,
        forked: count(6)?,
        delivered: count(7)?,
        retried: count(8)?,
        dead: count(9)?,
        failed: count(10)?,
        found_nothing: count(11)?,
        host: r.try_get::<_, Option<String>>(12)?.unwrap_or_default(),
        expired: count(13)?,
        discarded: count(14)?,
    })
}

/// How the release of ordering keys is written for PostgreSQL.
const DIALECT: ordering::Dialect = ordering::Dialect {
    params: ["$1", "$2", "$3"],
    greatest: "greatest",
    waiting_index: "",
};

/// The advisory lock that releases of many keys take alone and routers of
/// keyed messages share (`pg_advisory_xact_lock[_shared]` of this).
const RELEASE_LOCK: &str = "hashtextextended('cronpost release keys', 0)";

/// The advisory lock of one (endpoint, key), from SQL expressions: routers
/// and finishes of the key take turns under it.
macro_rules! key_lock {
    ($endpoint:literal, $key:literal) => {
        concat!(
            "hashtextextended('cronpost key ' || ",
            $endpoint,
            " || ' ' || ",
            $key,
            ", 0)"
        )
    };
}

/// Releases the next delivery of every key that is not busy; returns how
/// many moved. Releases of many keys (a run's step, a requeue) hold the
/// release lock alone, taken before the statement's snapshot, and routers
/// of keyed messages share it: otherwise a requeue's release and a router
/// could each miss the other's uncommitted delivery of a key (the one
/// requeued to the key's line, the one routed ready) and both go, as could
/// two releases each seeing another earliest waiting delivery.
fn release_keys(tx: &mut Client, now: i64) -> Result<u64, ::postgres::Error> {
    tx.execute_typed(
        &format!("SELECT pg_advisory_xact_lock({RELEASE_LOCK})"),
        &[],
    )?;
    tx.execute_typed(
        &ordering::release_keys_sql(&DIALECT, false),
        typed![now => INT8],
    )
}

/// Releases the next delivery of one key, if it is not busy: what the
/// finish of a keyed delivery does, in its transaction, under the key's
/// lock (a router of the key may be parking a new delivery behind the one
/// finishing, which this release must see). Bounded by the transaction's
/// lock_timeout, in a savepoint: a release that cannot get the key's lock
/// or its row in time is left to the next run step, and the finish stands.
fn release_key(
    tx: &mut Client,
    endpoint: &str,
    key: &str,
    now: i64,
) -> Result<(), ::postgres::Error> {
    tx.batch_execute("SAVEPOINT release_key")?;
    let released = tx
        .execute_typed(
            concat!("SELECT pg_advisory_xact_lock(", key_lock!("$1", "$2"), ")"),
            typed![endpoint => TEXT, key => TEXT],
        )
        .and_then(|_| {
            tx.execute_typed(
                &ordering::release_keys_sql(&DIALECT, true),
                typed![now => INT8, endpoint => TEXT, key => TEXT],
            )
        });
    match released {
        Ok(_) => tx.batch_execute("RELEASE SAVEPOINT release_key"),
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
            log::warn!(
                "the release of ordering key {key:?} of {endpoint} waited too long; the next run step releases it"
            );
            tx.batch_execute("ROLLBACK TO SAVEPOINT release_key")
        }
        Err(e) => Err(e),
    }
}

/// The WHERE clause of a `DeliveryFilter` over `deliveries d JOIN messages
/// m`, its parameters numbered from `$first`, with their values in order.
fn filter_clause(f: &DeliveryFilter, first: usize) -> (String, Vec<TypedValue>) {
    let mut terms = vec!["true".to_string()];
    let mut values: Vec<TypedValue> = Vec::new();
    if !f.ids.is_empty() {
        terms.push(format!("d.id = ANY(${})", first));
        values.push((Box::new(f.ids.clone()), Type::INT8_ARRAY));
    }
    for (column, value) in [
        ("d.state", f.state.map(|s| s.as_str().to_string())),
        ("d.endpoint", f.endpoint.clone()),
        ("d.account", f.account.clone()),
        ("m.topic", f.topic.clone()),
        ("d.reason", f.reason.clone()),
        ("d.ordering_key", f.ordering_key.clone()),
    ] {
        if let Some(value) = value {
            terms.push(format!("{column} = ${}", first + values.len()));
            values.push((Box::new(value), Type::TEXT));
        }
    }
    if let Some(since) = f.since {
        terms.push(format!("d.updated_at >= ${}", first + values.len()));
        values.push((Box::new(since), Type::INT8));
    }
    (terms.join(" AND "), values)
}

/// A parameter value with its type, for `query_typed`.
type TypedValue = (Box<dyn ToSql + Sync>, Type);

/// The parameters of `filter_clause`, as `query_typed` takes them.
fn typed_values(values: &[TypedValue]) -> Vec<(&(dyn ToSql + Sync), Type)> {
    values
        .iter()
        .map(|(v, ty)| (v.as_ref(), ty.clone()))
        .collect()
}

/// The verbs of the trait: bookkeeping here, the rest in `lease` and
/// `admin` as inherent methods of the same names.
impl Store for PostgresStore {
    fn subscriptions_replace(&mut self, subscriptions: &[Subscription]) -> Result<()> {
        let wanted = sorted_subscriptions(subscriptions);
        let topics: Vec<&str> = wanted.iter().map(|s| s.topic.as_str()).collect();
        let endpoints: Vec<&str> = wanted.iter().map(|s| s.endpoint.as_str()).collect();
        let max_ages: Vec<Option<i64>> = wanted.iter().map(|s| s.max_age_ms).collect();
        let discards: Vec<bool> = wanted.iter().map(|s| s.discard_expired).collect();
        let blocks: Vec<bool> = wanted.iter().map(|s| s.block_key_on_dead).collect();
        self.write(|tx| {
            // Hosts starting at once rewrite the table one after another.
            tx.execute_typed("LOCK TABLE subscriptions IN EXCLUSIVE MODE", &[])?;
            let current: Vec<Subscription> = tx
                .query_typed(
                    "SELECT topic, endpoint, max_age_ms, discard_expired, ordering_on_dead = 'block'
                     FROM subscriptions ORDER BY topic, endpoint",
                    &[],
                )?
                .iter()
                .map(|r| {
                    Ok(Subscription {
                        topic: r.try_get(0)?,
                        endpoint: r.try_get(1)?,
                        max_age_ms: r.try_get(2)?,
                        discard_expired: r.try_get(3)?,
                        block_key_on_dead: r.try_get(4)?,
                    })
                })
                .collect::<Result<_, ::postgres::Error>>()?;
            if current == wanted {
                return Ok(());
            }
            tx.execute_typed("DELETE FROM subscriptions", &[])?;
            tx.execute_typed(
                "INSERT INTO subscriptions (topic, endpoint, max_age_ms, discard_expired, ordering_on_dead)
                 SELECT t, e, a, d, CASE WHEN b THEN 'block' ELSE 'release' END
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BOOLEAN[], $5::BOOLEAN[]) AS s (t, e, a, d, b)",
                typed![
                    topics => TEXT_ARRAY,
                    endpoints => TEXT_ARRAY,
                    max_ages => INT8_ARRAY,
                    discards => BOOL_ARRAY,
                    blocks => BOOL_ARRAY,
                ],
            )?;
            // A topic that has a subscriber now: its unroutable messages
            // are routed by this run after all.
            tx.execute_typed(
                "UPDATE messages SET routed_at = NULL, route_error = NULL
                 WHERE route_error IS NOT NULL AND topic IN (SELECT topic FROM subscriptions)",
                &[],
            )?;
            Ok(())
        })
    }

    fn messages_insert(&mut self, messages: &[NewMessage]) -> Result<InsertReport> {
        self.write(|tx| {
            let mut report = InsertReport::default();
            for m in messages {
                let inserted = tx.query_typed_opt(
                    "INSERT INTO messages (topic, account, payload, priority, created_at, available_at, dedup_key,
                                           expires_at, ordering_key)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (account, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
                     RETURNING id, uid",
                    typed![
                        m.topic => TEXT,
                        m.account => TEXT,
                        m.payload => TEXT,
                        m.priority => INT8,
                        m.created_at => INT8,
                        m.available_at => INT8,
                        m.dedup_key => TEXT,
                        m.expires_at => INT8,
                        m.ordering_key => TEXT,
                    ],
                )?;
                match inserted {
                    Some(r) => {
                        report.inserted += 1;
                        report.messages.push(InsertedMessage {
                            id: r.try_get(0)?,
                            uid: r.try_get(1)?,
                        });
                    }
                    None => report.duplicates += 1,
                }
            }
            Ok(report)
        })
    }

    fn messages_route(&mut self, params: RouteParams) -> Result<RouteReport> {
        let batch = params.batch_size as i64;
        let now = params.now;
        self.write(|tx| {
            // The subscriptions cannot change under the batch (a host
            // replacing them waits, as it would for SQLite's write lock):
            // each of the statements below sees the same ones.
            tx.execute_typed("LOCK TABLE subscriptions IN ROW SHARE MODE", &[])?;
            // The batch is locked, and others' batches skipped: hosts
            // routing at once route different messages.
            let ids: Vec<i64> = tx
                .query_typed(
                    "SELECT id FROM messages WHERE routed_at IS NULL ORDER BY id LIMIT $1
                     FOR UPDATE SKIP LOCKED",
                    typed![batch => INT8],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(RouteReport::default());
            }
            let unroutable_topics: Vec<String> = tx
                .query_typed(
                    "SELECT DISTINCT topic FROM messages
                     WHERE id = ANY($1) AND topic NOT IN (SELECT topic FROM subscriptions)
                     ORDER BY topic",
                    typed![ids => INT8_ARRAY],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            // Hosts routing messages of one ordering key at once decide
            // one after another whether theirs wait (in key order: no
            // deadlock); the INSERT's snapshot then sees the other's rows.
            // A batch with keyed messages shares the release lock first
            // (see `release_keys`).
            tx.execute_typed(
                &format!(
                    "SELECT pg_advisory_xact_lock_shared({RELEASE_LOCK})
                     WHERE EXISTS (SELECT 1 FROM messages WHERE id = ANY($1) AND ordering_key IS NOT NULL)"
                ),
                typed![ids => INT8_ARRAY],
            )?;
            tx.execute_typed(
                concat!(
                    "SELECT count(pg_advisory_xact_lock(",
                    key_lock!("endpoint", "ordering_key"),
                    "))
                     FROM (SELECT DISTINCT s.endpoint, m.ordering_key
                           FROM messages m JOIN subscriptions s ON s.topic = m.topic
                           WHERE m.id = ANY($1) AND m.ordering_key IS NOT NULL
                           ORDER BY 1, 2) AS keys"
                ),
                typed![ids => INT8_ARRAY],
            )?;
            let deliveries = tx.execute_typed(
                &shared::route_batch_sql("m.id = ANY($1)", "$2", "$3"),
                typed![ids => INT8_ARRAY, now => INT8, PARKED_UNTIL => INT8],
            )?;
            let unroutable = tx.execute_typed(
                "UPDATE messages SET routed_at = $2,
                        route_error = 'no endpoint subscribes to topic \"' || topic || '\"'
                 WHERE id = ANY($1) AND topic NOT IN (SELECT topic FROM subscriptions)",
                typed![ids => INT8_ARRAY, now => INT8],
            )?;
            let routed = tx.execute_typed(
                "UPDATE messages SET routed_at = $2 WHERE id = ANY($1) AND routed_at IS NULL",
                typed![ids => INT8_ARRAY, now => INT8],
            )?;
            Ok(RouteReport {
                messages: routed as usize,
                deliveries: deliveries as usize,
                unroutable: unroutable as usize,
                unroutable_topics: unroutable_topics.clone(),
                more: ids.len() == params.batch_size,
            })
        })
    }

    fn leases_reclaim_expired(&mut self, p: &ReclaimParams) -> Result<usize> {
        PostgresStore::leases_reclaim_expired(self, p)
    }

    fn deliveries_restore_endpoints(&mut self, endpoints: &[String], now: i64) -> Result<u64> {
        PostgresStore::deliveries_restore_endpoints(self, endpoints, now)
    }

    fn deliveries_expire(&mut self, p: &ExpireParams) -> Result<ExpireReport> {
        PostgresStore::deliveries_expire(self, p)
    }

    fn deliveries_release_keys(&mut self, now: i64) -> Result<u64> {
        let waiting: bool = self.read(|c| {
            c.query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE state = 'delayed' AND reason = 'ordering')",
                &[],
            )?
            .try_get(0)
        })?;
        if !waiting {
            return Ok(0);
        }
        self.write(|tx| release_keys(tx, now))
    }

    fn deliveries_purge_orphaned(&mut self, p: &PurgeOrphanedParams) -> Result<u64> {
        PostgresStore::deliveries_purge_orphaned(self, p)
    }

    fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64> {
        PostgresStore::leasable_count(self, now, limit)
    }

    fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>> {
        PostgresStore::deliveries_next_due(self, now)
    }

    fn attempts_in_flight(&mut self, run_id: i64) -> Result<u64> {
        PostgresStore::attempts_in_flight(self, run_id)
    }

    fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
        PostgresStore::delivery_lease_next(self, p)
    }

    fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>> {
        PostgresStore::lease_by_owner(self, owner)
    }

    fn attempt_finish(&mut self, f: &FinishAttempt) -> Result<bool> {
        PostgresStore::attempt_finish(self, f)
    }

    fn run_begin(&mut self, pid: u32, host: &str, now: i64) -> Result<i64> {
        let pid = i64::from(pid);
        self.write(|tx| {
            tx.query_typed_one(
                "INSERT INTO runs (pid, host, started_at) VALUES ($1, $2, $3) RETURNING id",
                typed![pid => INT8, host => TEXT, now => INT8],
            )?
            .try_get(0)
        })
    }

    fn run_finish(&mut self, run: &RunRecord) -> Result<()> {
        let counts: Vec<i64> = [
            run.routed,
            run.reclaimed,
            run.forked,
            run.delivered,
            run.retried,
            run.dead,
            run.failed,
            run.found_nothing,
            run.expired,
            run.discarded,
        ]
        .iter()
        .map(|&n| i64::try_from(n).unwrap_or(i64::MAX))
        .collect();
        self.write(|tx| {
            tx.execute_typed(
                "UPDATE runs SET finished_at = $2, routed = $3[1], reclaimed = $3[2], forked = $3[3],
                        delivered = $3[4], retried = $3[5], dead = $3[6], failed = $3[7],
                        found_nothing = $3[8], expired = $3[9], discarded = $3[10]
                 WHERE id = $1",
                typed![run.id => INT8, run.finished_at => INT8, counts => INT8_ARRAY],
            )
            .map(drop)
        })
    }

    fn run_totals(&mut self) -> Result<RunTotals> {
        PostgresStore::run_totals(self)
    }

    fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>> {
        PostgresStore::delivery_get(self, id)
    }

    fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>> {
        PostgresStore::deliveries_of_message(self, message_id)
    }

    fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>> {
        PostgresStore::attempts_of_delivery(self, delivery_id)
    }

    fn deliveries_list(
        &mut self,
        filter: &DeliveryFilter,
        limit: u64,
    ) -> Result<Vec<ListedDelivery>> {
        PostgresStore::deliveries_list(self, filter, limit)
    }

    fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>> {
        PostgresStore::message_get(self, key)
    }

    fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64> {
        PostgresStore::messages_reroute_unroutable(self, dry_run)
    }

    fn deliveries_requeue(&mut self, p: &RequeueParams) -> Result<u64> {
        PostgresStore::deliveries_requeue(self, p)
    }

    fn history_purge(&mut self, p: &PurgeParams) -> Result<PurgeReport> {
        PostgresStore::history_purge(self, p)
    }

    fn stats(&mut self, now: i64) -> Result<Stats> {
        PostgresStore::stats(self, now)
    }

    fn schema_version(&mut self) -> Result<i64> {
        self.read(migrations::current_version)
    }
}
