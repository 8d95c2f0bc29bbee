//! The SQLite backend of [`Store`]: the only module that speaks SQL.
//!
//! One connection per process (children open their own after fork). WAL lets
//! admins read while children write; every write is one short IMMEDIATE
//! transaction, so writers queue on the lock (bounded by busy_timeout)
//! instead of deadlocking on a read-to-write upgrade.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};

use super::*;
use crate::error::{Error, ExitCode};

/// Leases the next ready delivery: a seek on `deliveries_queue`
/// (state, priority DESC, id), highest priority first, then oldest.
pub const LEASE_NEXT_SQL: &str = "\
UPDATE deliveries
SET state = 'leased', lease_owner = ?1, lease_expires_at = ?2, attempts = attempts + 1, updated_at = ?3
WHERE id = (SELECT id FROM deliveries WHERE state = 'ready' ORDER BY priority DESC, id LIMIT 1)
RETURNING id, message_id, endpoint, attempts";

const DELIVERY_COLUMNS: &str = "id, message_id, endpoint, account, state, priority, not_before, reason, \
     lease_owner, lease_expires_at, attempts, last_status, last_error";

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating it if missing) and migrates the database: what the
    /// dispatcher parent, `enqueue` and admin commands do.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(Error::new(
                ExitCode::CantCreate,
                format!(
                    "database {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                ),
            ));
        }
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

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// The schema version this build migrates to.
    pub fn latest_schema_version() -> i64 {
        migrations::latest_version()
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        db_error(&self.path, e)
    }

    /// Runs `f` in one IMMEDIATE transaction, committed if `f` succeeds.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_error(&path, e))?;
        let value = f(&tx).map_err(|e| db_error(&path, e))?;
        tx.commit().map_err(|e| db_error(&path, e))?;
        Ok(value)
    }
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
    Error::new(code, format!("database {}: {e}", path.display()))
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
    })
}

/// Reads the message half of a lease.
fn complete_lease(
    tx: &Connection,
    (delivery_id, message_id, endpoint, attempt): (i64, i64, String, u32),
    attempt_id: i64,
    owner: &str,
) -> rusqlite::Result<Lease> {
    tx.prepare_cached("SELECT uid, topic, account, payload FROM messages WHERE id = ?1")?
        .query_row([message_id], |r| {
            Ok(Lease {
                delivery_id,
                attempt_id,
                attempt,
                owner: owner.to_string(),
                endpoint,
                message_uid: r.get(0)?,
                topic: r.get(1)?,
                account: r.get(2)?,
                payload: r.get(3)?,
            })
        })
}

impl Store for SqliteStore {
    fn subscriptions_replace(&mut self, subscriptions: &[Subscription]) -> Result<()> {
        self.write(|tx| {
            let current: Vec<(String, String)> = tx
                .prepare("SELECT topic, endpoint FROM subscriptions ORDER BY topic, endpoint")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut wanted: Vec<(String, String)> = subscriptions
                .iter()
                .map(|s| (s.topic.clone(), s.endpoint.clone()))
                .collect();
            wanted.sort();
            wanted.dedup();
            if current == wanted {
                return Ok(());
            }
            tx.execute("DELETE FROM subscriptions", [])?;
            let mut insert =
                tx.prepare("INSERT INTO subscriptions (topic, endpoint) VALUES (?1, ?2)")?;
            for (topic, endpoint) in &wanted {
                insert.execute([topic, endpoint])?;
            }
            Ok(())
        })
    }

    fn messages_insert(&mut self, messages: &[NewMessage]) -> Result<InsertReport> {
        self.write(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (topic, account, payload, priority, created_at, available_at, dedup_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
            )?;
            let mut report = InsertReport::default();
            for m in messages {
                let n = insert.execute(params![
                    m.topic,
                    m.account,
                    m.payload,
                    m.priority,
                    m.created_at,
                    m.available_at,
                    m.dedup_key
                ])?;
                if n == 1 {
                    report.inserted += 1;
                } else {
                    report.duplicates += 1;
                }
            }
            Ok(report)
        })
    }

    fn messages_route(&mut self, params: RouteParams) -> Result<RouteReport> {
        let mut report = RouteReport::default();
        let mut after = 0_i64;
        loop {
            // One batch per transaction: the write lock is never held for long.
            let batch = self.write(|tx| {
                let (upper, count): (Option<i64>, usize) = tx.query_row(
                    "SELECT max(id), count(*) FROM
                       (SELECT id FROM messages WHERE routed_at IS NULL AND id > ?1 ORDER BY id LIMIT ?2)",
                    params![after, params.batch_size as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let Some(upper) = upper else {
                    return Ok(None);
                };
                let deliveries = tx.execute(
                    "INSERT OR IGNORE INTO deliveries
                       (message_id, endpoint, account, state, priority, not_before, reason, created_at, updated_at)
                     SELECT m.id, s.endpoint, m.account,
                            CASE WHEN m.available_at > ?3 THEN 'delayed' ELSE 'ready' END,
                            m.priority,
                            CASE WHEN m.available_at > ?3 THEN m.available_at ELSE ?3 END,
                            CASE WHEN m.available_at > ?3 THEN 'scheduled' END,
                            ?3, ?3
                     FROM messages m JOIN subscriptions s ON s.topic = m.topic
                     WHERE m.routed_at IS NULL AND m.id > ?1 AND m.id <= ?2
                     ORDER BY m.id, s.endpoint",
                    params![after, upper, params.now],
                )?;
                let routed = tx.execute(
                    "UPDATE messages SET routed_at = ?3
                     WHERE routed_at IS NULL AND id > ?1 AND id <= ?2
                       AND topic IN (SELECT topic FROM subscriptions)",
                    params![after, upper, params.now],
                )?;
                Ok(Some((upper, count, routed, deliveries)))
            })?;
            let Some((upper, count, routed, deliveries)) = batch else {
                break;
            };
            report.messages += routed;
            report.deliveries += deliveries;
            report.unroutable += count - routed;
            after = upper;
        }
        if report.unroutable > 0 {
            report.unroutable_topics = self
                .conn
                .prepare(
                    "SELECT DISTINCT topic FROM messages WHERE routed_at IS NULL
                     AND topic NOT IN (SELECT topic FROM subscriptions) ORDER BY topic",
                )
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(|e| self.err(e))?;
        }
        Ok(report)
    }

    fn leases_reclaim_expired(&mut self, now: i64) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "UPDATE attempts SET outcome = ?2, finished_at = ?1, error = 'lease expired before the child finished'
                 WHERE outcome = ?3 AND delivery_id IN
                   (SELECT id FROM deliveries WHERE state = 'leased' AND lease_expires_at <= ?1)",
                params![now, outcome::LEASE_EXPIRED, outcome::IN_FLIGHT],
            )?;
            tx.execute(
                "UPDATE deliveries
                 SET state = 'ready', lease_owner = NULL, lease_expires_at = NULL, reason = NULL,
                     not_before = ?1, updated_at = ?1, last_error = 'lease expired'
                 WHERE state = 'leased' AND lease_expires_at <= ?1",
                [now],
            )
        })
    }

    fn delayed_promote_due(&mut self, now: i64) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "UPDATE deliveries SET state = 'ready', reason = NULL, updated_at = ?1
                 WHERE state = 'delayed' AND not_before <= ?1",
                [now],
            )
        })
    }

    fn ready_count(&mut self, limit: u64) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'ready' LIMIT ?1)",
                [limit],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
        self.write(|tx| {
            let leased: Option<(i64, i64, String, u32)> = tx
                .prepare_cached(LEASE_NEXT_SQL)?
                .query_row(params![p.owner, p.now + p.lease_timeout_ms, p.now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            let Some(leased) = leased else {
                return Ok(None);
            };
            tx.prepare_cached(
                "INSERT INTO attempts (delivery_id, number, run_id, pid, lease_owner, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![leased.0, leased.3, p.run_id, p.pid, p.owner, p.now])?;
            let attempt_id = tx.last_insert_rowid();
            complete_lease(tx, leased, attempt_id, &p.owner).map(Some)
        })
    }

    fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>> {
        self.write(|tx| {
            let found: Option<((i64, i64, String, u32), i64)> = tx
                .query_row(
                    "SELECT d.id, d.message_id, d.endpoint, d.attempts, a.id
                     FROM deliveries d JOIN attempts a ON a.delivery_id = d.id
                     WHERE d.state = 'leased' AND d.lease_owner = ?1 AND a.lease_owner = ?1",
                    [owner],
                    |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), r.get(4)?)),
                )
                .optional()?;
            found
                .map(|(leased, attempt_id)| complete_lease(tx, leased, attempt_id, owner))
                .transpose()
        })
    }

    fn attempt_finish(&mut self, f: &FinishAttempt) -> Result<bool> {
        let (state, not_before, reason) = match f.next {
            NextState::Delivered => (DeliveryState::Delivered, f.now, None),
            NextState::Retry { not_before } => (
                DeliveryState::Delayed,
                not_before,
                Some(reason::RETRY_BACKOFF),
            ),
            NextState::Dead => (DeliveryState::Dead, f.now, None),
        };
        self.write(|tx| {
            let moved = tx.prepare_cached(
                "UPDATE deliveries
                 SET state = ?3, not_before = ?4, reason = ?5, lease_owner = NULL, lease_expires_at = NULL,
                     last_status = coalesce(?6, last_status), last_error = ?7, updated_at = ?8
                 WHERE id = ?1 AND state = 'leased' AND lease_owner = ?2",
            )?
            .execute(params![
                f.delivery_id,
                f.owner,
                state.as_str(),
                not_before,
                reason,
                f.http_status,
                f.error,
                f.now
            ])? == 1;
            let outcome = if moved { f.outcome.as_str() } else { outcome::LEASE_LOST };
            tx.prepare_cached(
                "UPDATE attempts SET finished_at = ?2, outcome = ?3, http_status = ?4, error = ?5, duration_ms = ?6
                 WHERE id = ?1",
            )?
            .execute(params![f.attempt_id, f.now, outcome, f.http_status, f.error, f.duration_ms])?;
            Ok(moved)
        })
    }

    fn run_begin(&mut self, pid: u32, now: i64) -> Result<i64> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runs (pid, started_at) VALUES (?1, ?2)",
                params![pid, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    fn run_finish(&mut self, run: &RunRecord) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET finished_at = ?2, routed = ?3, reclaimed = ?4, forked = ?5, delivered = ?6,
                        retried = ?7, dead = ?8, failed = ?9
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
                    run.failed
                ],
            )
            .map(drop)
        })
    }

    fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>> {
        self.conn
            .query_row(
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?1"),
                [id],
                delivery_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>> {
        self.conn
            .prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE message_id = ?1 ORDER BY endpoint"
            ))
            .and_then(|mut s| s.query_map([message_id], delivery_row)?.collect())
            .map_err(|e| self.err(e))
    }

    fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>> {
        self.conn
            .prepare(
                "SELECT id, delivery_id, number, run_id, pid, started_at, finished_at, outcome, http_status,
                        error, duration_ms
                 FROM attempts WHERE delivery_id = ?1 ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([delivery_id], |r| {
                    Ok(AttemptRow {
                        id: r.get(0)?,
                        delivery_id: r.get(1)?,
                        number: r.get(2)?,
                        run_id: r.get(3)?,
                        pid: r.get(4)?,
                        started_at: r.get(5)?,
                        finished_at: r.get(6)?,
                        outcome: r.get(7)?,
                        http_status: r.get(8)?,
                        error: r.get(9)?,
                        duration_ms: r.get(10)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    fn stats(&mut self, now: i64) -> Result<Stats> {
        let conn = &self.conn;
        let read = || -> rusqlite::Result<Stats> {
            let mut stats = Stats {
                now,
                ..Stats::default()
            };
            let mut counts = conn.prepare(
                "SELECT endpoint, state, count(*) FROM deliveries GROUP BY endpoint, state ORDER BY endpoint",
            )?;
            let mut rows = counts.query([])?;
            while let Some(r) = rows.next()? {
                let endpoint: String = r.get(0)?;
                let state: String = r.get(1)?;
                if stats
                    .endpoints
                    .last()
                    .is_none_or(|e| e.endpoint != endpoint)
                {
                    stats.endpoints.push(EndpointCounts {
                        endpoint,
                        by_state: [0; 5],
                    });
                }
                if let Some(i) = DeliveryState::ALL.iter().position(|s| s.as_str() == state)
                    && let Some(entry) = stats.endpoints.last_mut()
                {
                    entry.by_state[i] = r.get(2)?;
                }
            }
            stats.oldest_ready_age_ms = conn.query_row(
                "SELECT ?1 - min(not_before) FROM deliveries WHERE state = 'ready'",
                [now],
                |r| r.get(0),
            )?;
            stats.unrouted_messages = conn.query_row(
                "SELECT count(*) FROM messages WHERE routed_at IS NULL",
                [],
                |r| r.get(0),
            )?;
            stats.last_run = conn
                .query_row(
                    "SELECT id, pid, started_at, finished_at, routed, reclaimed, forked, delivered, retried, dead,
                            failed
                     FROM runs ORDER BY id DESC LIMIT 1",
                    [],
                    run_row,
                )
                .optional()?;
            if let Some(run) = &stats.last_run {
                stats.last_run_attempts = conn
                    .prepare(
                        "SELECT outcome, count(*) FROM attempts WHERE run_id = ?1 GROUP BY outcome ORDER BY outcome",
                    )?
                    .query_map([run.id], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            Ok(stats)
        };
        read().map_err(|e| self.err(e))
    }
}
