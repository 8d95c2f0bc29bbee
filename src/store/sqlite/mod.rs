//! The SQLite backend of [`Store`], with `lease` (picking, leasing,
//! finishing, reclaiming: the children's path) and `admin` (reads and
//! writes for people); together the only code that speaks SQL.
//!
//! One connection per process (children open their own after fork). WAL lets
//! admins read while children write; every write is one short IMMEDIATE
//! transaction, so writers queue on the lock (bounded by busy_timeout)
//! instead of deadlocking on a read-to-write upgrade.

mod admin;
mod lease;
mod migrations;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};

use super::*;
use super::{ordering, shared};
use crate::error::{Error, ExitCode};
use crate::files::{self, Sharing};

const DELIVERY_COLUMNS: &str = "id, message_id, endpoint, account, state, priority, not_before, reason, \
     lease_owner, lease_expires_at, attempts, last_status, last_error, expires_at, ordering_key";

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating it if missing) and migrates the database: what the
    /// dispatcher parent, `enqueue` and admin commands do. A new file is
    /// shared as [`Sharing::for_new_database`] says (`database_group`: its
    /// group); a file this process cannot read and write is an error that
    /// names its owner, mode and the fix.
    pub fn open(
        path: &Path,
        database_group: Option<u32>,
        busy_timeout: Duration,
    ) -> Result<SqliteStore> {
        let dir = files::parent_dir(path);
        if !dir.is_dir() {
            return Err(Error::new(
                ExitCode::CantCreate,
                format!(
                    "database {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                ),
            ));
        }
        Sharing::for_new_database(path, database_group)
            .create_new(path)
            .map_err(|e| {
                Error::io(format!("database {}", path.display()), e).with_code_for_create()
            })?;
        files::check_read_write(path, database_group)?;
        let mut store = SqliteStore::connect(path, busy_timeout, OpenFlags::SQLITE_OPEN_CREATE)?;
        // WAL is persistent in the file; setting it again is a cheap no-op.
        store
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(|e| store.err(e))?;
        migrations::apply(&mut store.conn).map_err(|e| {
            Error::new(
                ExitCode::Software,
                format!("database {}: migration failed: {e}", path.display()),
            )
        })?;
        Ok(store)
    }

    /// Opens an existing, migrated database without checks or migrations: a
    /// child's connection, made after fork, as cheaply as possible.
    pub fn open_existing(path: &Path, busy_timeout: Duration) -> Result<SqliteStore> {
        SqliteStore::connect(path, busy_timeout, OpenFlags::empty())
    }

    fn connect(path: &Path, busy_timeout: Duration, extra: OpenFlags) -> Result<SqliteStore> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, e))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
        };
        store
            .conn
            .set_transaction_behavior(TransactionBehavior::Immediate);
        store
            .conn
            .busy_timeout(busy_timeout)
            .and_then(|()| {
                store
                    .conn
                    .execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
            })
            .map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Waits for another connection's lock in steps of 100 µs instead of
    /// SQLite's 1, 2, 5 ... 100 ms, for at most `limit` (this process's
    /// connections all get the last limit set): for the keeper, whose
    /// routing must not lose the lock to a stream of children for tens of
    /// milliseconds (a new message would wait that long).
    pub fn wait_for_locks_eagerly(&mut self, limit: Duration) -> Result<()> {
        static LIMIT_STEPS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
        const STEP: Duration = Duration::from_micros(100);
        fn eager(tries: i32) -> bool {
            if tries >= LIMIT_STEPS.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(STEP);
            true
        }
        let steps = (limit.as_micros() / STEP.as_micros()).min(i32::MAX as u128) as i32;
        LIMIT_STEPS.store(steps.max(1), std::sync::atomic::Ordering::Relaxed);
        self.conn.busy_handler(Some(eager)).map_err(|e| self.err(e))
    }

    /// Every commit from now on is on disk before it returns
    /// (synchronous=FULL: the WAL is synced at each commit).
    pub fn make_durable(&mut self) -> Result<()> {
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.err(e))
    }

    /// The schema version this build migrates to.
    pub fn latest_schema_version() -> i64 {
        migrations::latest_version()
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        db_error(&self.path, e)
    }

    /// Compiles `statements` into the statement cache, outside any transaction.
    fn prepare_ahead(&self, statements: &[&str]) -> Result<()> {
        for sql in statements {
            self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Runs `f` in one IMMEDIATE transaction, committed if `f` succeeds.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.write_raw(f).map_err(|e| self.err(e))
    }

    /// [`SqliteStore::write`], with SQLite's error as it came.
    fn write_raw<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let tx = self.conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

/// How the release of ordering keys is written for SQLite.
const DIALECT: ordering::Dialect = ordering::Dialect {
    params: ["?1", "?2", "?3"],
    greatest: "max",
    waiting_index: "INDEXED BY deliveries_waiting",
};

/// Releases the next delivery of every key that is not busy; returns how
/// many moved.
fn release_keys(tx: &Connection, now: i64) -> rusqlite::Result<u64> {
    tx.prepare_cached(&ordering::release_keys_sql(&DIALECT, false))?
        .execute([now])
        .map(|n| n as u64)
}

/// The release of one key's next delivery.
static RELEASE_KEY_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| ordering::release_keys_sql(&DIALECT, true));

/// Releases the next delivery of one key, if it is not busy: what the
/// finish of a keyed delivery does, in its transaction.
fn release_key(tx: &Connection, endpoint: &str, key: &str, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(&RELEASE_KEY_SQL)?
        .execute(params![now, endpoint, key])
        .map(drop)
}

/// The WHERE clause of a `DeliveryFilter` over `deliveries d JOIN messages m`,
/// with its values in order.
fn filter_clause(f: &DeliveryFilter) -> (String, Vec<Value>) {
    let mut terms = vec!["1".to_string()];
    let mut values = Vec::new();
    if !f.ids.is_empty() {
        terms.push(format!("d.id IN ({})", vec!["?"; f.ids.len()].join(", ")));
        values.extend(f.ids.iter().map(|&id| Value::Integer(id)));
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
            terms.push(format!("{column} = ?"));
            values.push(Value::Text(value));
        }
    }
    if let Some(since) = f.since {
        terms.push("d.updated_at >= ?".to_string());
        values.push(Value::Integer(since));
    }
    (terms.join(" AND "), values)
}

/// Maps a SQLite error to a message naming the file and a sysexits code.
fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    let code = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ExitCode::TempFail,
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen) => ExitCode::CantCreate,
        Some(ErrorCode::PermissionDenied) => ExitCode::NoPerm,
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure) => ExitCode::IoErr,
        Some(ErrorCode::NotADatabase) => ExitCode::DataErr,
        Some(ErrorCode::ConstraintViolation) => ExitCode::DataErr,
        _ => ExitCode::Software,
    };
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure) => {
            " (the disk may be full or over a file-size limit; the transaction was rolled back, nothing of it was written)"
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            " (another process holds the lock longer than busy_timeout; nothing was changed, try again)"
        }
        _ => "",
    };
    Error::new(code, format!("database {}: {e}{hint}", path.display()))
}

fn delivery_row(r: &Row) -> rusqlite::Result<DeliveryRow> {
    let state: String = r.get(4)?;
    Ok(DeliveryRow {
        id: r.get(0)?,
        message_id: r.get(1)?,
        endpoint: r.get(2)?,
        account: r.get(3)?,
        state: DeliveryState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                4,
                rusqlite::types::Type::Text,
                format!("unknown state {state}").into(),
            )
        })?,
        priority: r.get(5)?,
        not_before: r.get(6)?,
        reason: r.get(7)?,
        lease_owner: r.get(8)?,
        lease_expires_at: r.get(9)?,
        attempts: r.get(10)?,
        last_status: r.get(11)?,
        last_error: r.get(12)?,
        expires_at: r.get(13)?,
        ordering_key: r.get(14)?,
    })
}

fn run_row(r: &Row) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        pid: r.get(1)?,
        started_at: r.get(2)?,
        finished_at: r.get(3)?,
        routed: r.get(4)?,
        reclaimed: r.get(5)?,
        forked: r.get(6)?,
        delivered: r.get(7)?,
        retried: r.get(8)?,
        dead: r.get(9)?,
        failed: r.get(10)?,
        found_nothing: r.get(11)?,
        host: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
        expired: r.get(13)?,
        discarded: r.get(14)?,
    })
}

/// The verbs of the trait: bookkeeping here, the rest in `lease` and
/// `admin` as inherent methods of the same names (which a path call such as
/// `SqliteStore::stats` resolves to before the trait's).
impl Store for SqliteStore {
    fn subscriptions_replace(&mut self, subscriptions: &[Subscription]) -> Result<()> {
        self.write(|tx| {
            let current: Vec<Subscription> = tx
                .prepare(
                    "SELECT topic, endpoint, max_age_ms, discard_expired, ordering_on_dead = 'block'
                     FROM subscriptions ORDER BY topic, endpoint",
                )?
                .query_map([], |r| {
                    Ok(Subscription {
                        topic: r.get(0)?,
                        endpoint: r.get(1)?,
                        max_age_ms: r.get(2)?,
                        discard_expired: r.get(3)?,
                        block_key_on_dead: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let wanted = sorted_subscriptions(subscriptions);
            if current == wanted {
                return Ok(());
            }
            tx.execute("DELETE FROM subscriptions", [])?;
            let mut insert = tx.prepare(
                "INSERT INTO subscriptions (topic, endpoint, max_age_ms, discard_expired, ordering_on_dead)
                 VALUES (?1, ?2, ?3, ?4, CASE WHEN ?5 THEN 'block' ELSE 'release' END)",
            )?;
            for s in &wanted {
                insert.execute(params![
                    s.topic,
                    s.endpoint,
                    s.max_age_ms,
                    s.discard_expired,
                    s.block_key_on_dead
                ])?;
            }
            // A topic that has a subscriber now: its unroutable messages
            // are routed by this run after all.
            tx.execute(
                "UPDATE messages SET routed_at = NULL, route_error = NULL
                 WHERE route_error IS NOT NULL AND topic IN (SELECT topic FROM subscriptions)",
                [],
            )?;
            Ok(())
        })
    }

    fn messages_insert(&mut self, messages: &[NewMessage]) -> Result<InsertReport> {
        self.write(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (topic, account, payload, priority, created_at, available_at, dedup_key,
                                       expires_at, ordering_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (account, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
                 RETURNING id, uid",
            )?;
            let mut report = InsertReport::default();
            for m in messages {
                let inserted = insert
                    .query_row(
                        params![
                            m.topic,
                            m.account,
                            m.payload,
                            m.priority,
                            m.created_at,
                            m.available_at,
                            m.dedup_key,
                            m.expires_at,
                            m.ordering_key
                        ],
                        |r| {
                            Ok(InsertedMessage {
                                id: r.get(0)?,
                                uid: r.get(1)?,
                            })
                        },
                    )
                    .optional()?;
                match inserted {
                    Some(message) => {
                        report.inserted += 1;
                        report.messages.push(message);
                    }
                    None => report.duplicates += 1,
                }
            }
            Ok(report)
        })
    }

    fn messages_route(&mut self, params: RouteParams) -> Result<RouteReport> {
        // Most calls (the keeper's looks during a drain) find nothing: a
        // read says so without queueing for the write lock.
        let unrouted: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM messages WHERE routed_at IS NULL)")
            .and_then(|mut query| query.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        if !unrouted {
            return Ok(RouteReport::default());
        }
        // One batch per transaction: the write lock is never held for long.
        self.write(|tx| {
            let (upper, count): (Option<i64>, usize) = tx.query_row(
                "SELECT max(id), count(*) FROM
                   (SELECT id FROM messages WHERE routed_at IS NULL ORDER BY id LIMIT ?1)",
                [params.batch_size as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let Some(upper) = upper else {
                return Ok(RouteReport::default());
            };
            let unroutable_topics: Vec<String> = tx
                .prepare(
                    "SELECT DISTINCT topic FROM messages
                     WHERE routed_at IS NULL AND id <= ?1 AND topic NOT IN (SELECT topic FROM subscriptions)
                     ORDER BY topic",
                )?
                .query_map([upper], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let deliveries = tx.execute(
                &shared::route_batch_sql("m.routed_at IS NULL AND m.id <= ?1", "?2", "?3"),
                params![upper, params.now, PARKED_UNTIL],
            )?;
            let unroutable = tx.execute(
                "UPDATE messages SET routed_at = ?2,
                        route_error = 'no endpoint subscribes to topic \"' || topic || '\"'
                 WHERE routed_at IS NULL AND id <= ?1 AND topic NOT IN (SELECT topic FROM subscriptions)",
                params![upper, params.now],
            )?;
            let routed = tx.execute(
                "UPDATE messages SET routed_at = ?2 WHERE routed_at IS NULL AND id <= ?1",
                params![upper, params.now],
            )?;
            Ok(RouteReport {
                messages: routed,
                deliveries,
                unroutable,
                unroutable_topics,
                more: count == params.batch_size,
            })
        })
    }

    fn leases_reclaim_expired(&mut self, p: &ReclaimParams) -> Result<usize> {
        SqliteStore::leases_reclaim_expired(self, p)
    }

    fn deliveries_restore_endpoints(&mut self, endpoints: &[String], now: i64) -> Result<u64> {
        SqliteStore::deliveries_restore_endpoints(self, endpoints, now)
    }

    fn deliveries_purge_orphaned(&mut self, p: &PurgeOrphanedParams) -> Result<u64> {
        SqliteStore::deliveries_purge_orphaned(self, p)
    }

    fn deliveries_expire(&mut self, p: &ExpireParams) -> Result<ExpireReport> {
        SqliteStore::deliveries_expire(self, p)
    }

    fn deliveries_release_keys(&mut self, now: i64) -> Result<u64> {
        // Most calls find no waiting delivery: a read says so.
        let waiting: bool = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE state = 'delayed' AND reason = 'ordering')",
            )
            .and_then(|mut query| query.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        if !waiting {
            return Ok(0);
        }
        self.write(|tx| release_keys(tx, now))
    }

    fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64> {
        SqliteStore::leasable_count(self, now, limit)
    }

    fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>> {
        SqliteStore::deliveries_next_due(self, now)
    }

    fn attempts_in_flight(&mut self, run_id: i64) -> Result<u64> {
        SqliteStore::attempts_in_flight(self, run_id)
    }

    fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
        SqliteStore::delivery_lease_next(self, p)
    }

    fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>> {
        SqliteStore::lease_by_owner(self, owner)
    }

    fn attempt_finish(&mut self, f: &FinishAttempt) -> Result<bool> {
        SqliteStore::attempt_finish(self, f)
    }

    fn run_begin(&mut self, pid: u32, host: &str, now: i64) -> Result<i64> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runs (pid, host, started_at) VALUES (?1, ?2, ?3)",
                params![pid, host, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    fn run_finish(&mut self, run: &RunRecord) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET finished_at = ?2, routed = ?3, reclaimed = ?4, forked = ?5, delivered = ?6,
                        retried = ?7, dead = ?8, failed = ?9, found_nothing = ?10, expired = ?11,
                        discarded = ?12
                 WHERE id = ?1",
                params![
                    run.id,
                    run.finished_at,
                    run.routed,
                    run.reclaimed,
                    run.forked,
                    run.delivered,
                    run.retried,
                    run.dead,
                    run.failed,
                    run.found_nothing,
                    run.expired,
                    run.discarded
                ],
            )
            .map(drop)
        })
    }

    fn run_totals(&mut self) -> Result<RunTotals> {
        SqliteStore::run_totals(self)
    }

    fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>> {
        SqliteStore::delivery_get(self, id)
    }

    fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>> {
        SqliteStore::deliveries_of_message(self, message_id)
    }

    fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>> {
        SqliteStore::attempts_of_delivery(self, delivery_id)
    }

    fn deliveries_list(
        &mut self,
        filter: &DeliveryFilter,
        limit: u64,
    ) -> Result<Vec<ListedDelivery>> {
        SqliteStore::deliveries_list(self, filter, limit)
    }

    fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>> {
        SqliteStore::message_get(self, key)
    }

    fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64> {
        SqliteStore::messages_reroute_unroutable(self, dry_run)
    }

    fn deliveries_requeue(&mut self, p: &RequeueParams) -> Result<u64> {
        SqliteStore::deliveries_requeue(self, p)
    }

    fn history_purge(&mut self, p: &PurgeParams) -> Result<PurgeReport> {
        SqliteStore::history_purge(self, p)
    }

    fn stats(&mut self, now: i64) -> Result<Stats> {
        SqliteStore::stats(self, now)
    }

    fn close_at_exit(self: Box<Self>) {
        // The process's exit releases the locks and closes the files;
        // sqlite3_close would only free memory first.
        std::mem::forget(self);
    }

    fn schema_version(&mut self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }
}
