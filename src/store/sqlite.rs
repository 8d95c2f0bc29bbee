//! The SQLite backend of [`Store`]: the only module that speaks SQL.
//!
//! One connection per process (children open their own after fork). WAL lets
//! admins read while children write; every write is one short IMMEDIATE
//! transaction, so writers queue on the lock (bounded by busy_timeout)
//! instead of deadlocking on a read-to-write upgrade.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
    params_from_iter,
};

use super::*;
use crate::error::{Error, ExitCode};
use crate::files::{self, Sharing};
use crate::saturation::{self, Decision, Hold, RateKind};

/// Picks the next ready delivery: a seek on `deliveries_queue`
/// (state, priority DESC, id), highest priority first, then oldest,
/// skipping the endpoints listed in ?1 (a JSON array) and those with a probe
/// in flight at ?2, with its endpoint's breaker (one statement where there
/// were three: each child compiles every statement it runs).
pub const PICK_READY_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0)
FROM deliveries d LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'ready' AND d.endpoint NOT IN (SELECT value FROM json_each(?1))
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > ?2, 0)
ORDER BY d.priority DESC, d.id LIMIT 1";

/// Picks the next delayed delivery whose time (?2) has come, by priority,
/// then the longest eligible, skipping as [`PICK_READY_SQL`] does. The index
/// is named: left to itself the planner seeks `deliveries_queue` and sorts
/// every delayed delivery of the top priority by not_before.
pub const PICK_DELAYED_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0)
FROM deliveries d INDEXED BY deliveries_delayed LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'delayed' AND d.not_before <= ?2 AND d.endpoint NOT IN (SELECT value FROM json_each(?1))
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > ?2, 0)
ORDER BY d.priority DESC, d.not_before LIMIT 1";

const ENDPOINT_HEALTH_SQL: &str =
    "SELECT saturated_until, failures FROM endpoint_health WHERE endpoint = ?1";

const LEASE_DELIVERY_SQL: &str = "\
UPDATE deliveries
SET state = 'leased', reason = NULL, lease_owner = ?2, lease_expires_at = ?3,
    attempts = attempts + 1, updated_at = ?4, lease_boot_id = ?5, lease_boot_expires_at = ?6
WHERE id = ?1
RETURNING id, message_id, endpoint, attempts";

const INSERT_ATTEMPT_SQL: &str = "\
INSERT INTO attempts (delivery_id, number, run_id, pid, lease_owner, started_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const MESSAGE_OF_LEASE_SQL: &str =
    "SELECT uid, topic, account, payload FROM messages WHERE id = ?1";

const ENDPOINT_HEALTHY_SQL: &str = "\
UPDATE endpoint_health
SET failures = 0, saturated_until = NULL, probe_owner = NULL, probe_expires_at = NULL, updated_at = ?2
WHERE endpoint = ?1 AND (failures > 0 OR probe_owner IS NOT NULL)";

const FINISH_DELIVERY_SQL: &str = "\
UPDATE deliveries
SET state = ?3, not_before = ?4, reason = ?5, lease_owner = NULL, lease_expires_at = NULL,
    lease_boot_id = NULL, lease_boot_expires_at = NULL,
    last_status = coalesce(?6, last_status), last_error = ?7, updated_at = ?8
WHERE id = ?1 AND state = 'leased' AND lease_owner = ?2";

const STILL_OWNER_SQL: &str =
    "SELECT 1 FROM deliveries WHERE id = ?1 AND state = 'leased' AND lease_owner = ?2";

const FINISH_ATTEMPT_SQL: &str = "\
UPDATE attempts SET finished_at = ?2, outcome = ?3, http_status = ?4, error = ?5, duration_ms = ?6
WHERE id = ?1";

/// The statements of a plain lease and of a plain finish, prepared before
/// their transaction begins: a child's connection is new, so each statement
/// is compiled once per child, and compiling inside the transaction would
/// hold the write lock that every other child waits for.
const LEASE_STATEMENTS: [&str; 4] = [
    PICK_READY_SQL,
    LEASE_DELIVERY_SQL,
    INSERT_ATTEMPT_SQL,
    MESSAGE_OF_LEASE_SQL,
];
const FINISH_STATEMENTS: [&str; 4] = [
    STILL_OWNER_SQL,
    ENDPOINT_HEALTHY_SQL,
    FINISH_DELIVERY_SQL,
    FINISH_ATTEMPT_SQL,
];

/// How many deliveries one lease transaction may reroute before it gives up
/// (the next child goes on where it stopped).
const MAX_REROUTES: usize = 64;

/// How many undecodable deliveries one lease may dead-letter on its way.
const MAX_UNDECODABLE: usize = 16;

const DELIVERY_COLUMNS: &str = "id, message_id, endpoint, account, state, priority, not_before, reason, \
     lease_owner, lease_expires_at, attempts, last_status, last_error";

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

    /// Dead-letters delivery `id`, whose row (or its message's) cannot be
    /// decoded.
    fn dead_letter_undecodable(&mut self, id: i64, error: &str, now: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE deliveries
                 SET state = 'dead', reason = NULL, lease_owner = NULL, lease_expires_at = NULL,
                     lease_boot_id = NULL, lease_boot_expires_at = NULL,
                     last_error = 'cannot be decoded (a column written with plain SQL holds the wrong type): ' || ?2,
                     updated_at = ?3
                 WHERE id = ?1 AND state IN ('ready', 'delayed')",
                params![id, error, now],
            )
            .map(drop)
        })
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
    ] {
        if let Some(value) = value {
            terms.push(format!("{column} = ?"));
            values.push(Value::Text(value));
        }
    }
    (terms.join(" AND "), values)
}

/// Whether `e` says a column's value could not be read as its Rust type.
fn is_undecodable(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    )
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
    })
}

/// Reads the message half of a lease.
fn complete_lease(
    tx: &Connection,
    (delivery_id, message_id, endpoint, attempt): (i64, i64, String, u32),
    attempt_id: i64,
    owner: &str,
) -> rusqlite::Result<Lease> {
    tx.prepare_cached(MESSAGE_OF_LEASE_SQL)?
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

/// A delivery a lease transaction is looking at.
struct Candidate {
    id: i64,
    endpoint: String,
    account: String,
    reason: Option<String>,
    not_before: i64,
    /// Its endpoint's breaker: saturated until, signals in a row.
    saturated_until: Option<i64>,
    failures: u32,
    from: Queue,
}

impl Candidate {
    /// Its key of `kind`: its account or its endpoint.
    fn key(&self, kind: RateKind) -> &str {
        match kind {
            RateKind::Account => &self.account,
            RateKind::Endpoint => &self.endpoint,
        }
    }
}

fn lease_next(
    tx: &Connection,
    p: &LeaseParams,
    looking_at: &Cell<Option<i64>>,
) -> rusqlite::Result<Option<Lease>> {
    let blocked = endpoints_at_cap(tx, p)?;
    let order = match p.prefer {
        Queue::Ready => [Queue::Ready, Queue::Delayed],
        Queue::Delayed => [Queue::Delayed, Queue::Ready],
    };
    for _ in 0..MAX_REROUTES {
        let mut candidate = None;
        for queue in order {
            candidate = pick(tx, queue, &blocked, p.now, looking_at)?;
            if candidate.is_some() {
                break;
            }
        }
        let Some(c) = candidate else {
            return Ok(None);
        };
        let view = saturation::Candidate {
            endpoint: &c.endpoint,
            account: &c.account,
            held_for: c.reason.as_deref().and_then(held_for),
            not_before: c.not_before,
            saturated_until: c.saturated_until,
            failures: c.failures,
        };
        match saturation::decide(p.policy, &view, p.now, |kind| tat(tx, kind, c.key(kind)))? {
            Decision::Go { probe, charges } => {
                for charge in charges {
                    set_tat(tx, charge.kind, c.key(charge.kind), charge.tat)?;
                }
                return lease_candidate(tx, p, &c, probe).map(Some);
            }
            Decision::Hold(hold) => reroute(tx, &c, &hold, p.now)?,
        }
    }
    Ok(None)
}

/// Endpoints at their in-flight cap, where no child may start now. As a
/// JSON array, for `json_each`.
fn endpoints_at_cap(tx: &Connection, p: &LeaseParams) -> rusqlite::Result<String> {
    let mut blocked: Vec<String> = Vec::new();
    let caps = p.policy.endpoints_with_in_flight_caps();
    if !caps.is_empty() {
        let in_flight: HashMap<String, u32> = tx
            .prepare_cached("SELECT endpoint, count(*) FROM deliveries WHERE state = 'leased' GROUP BY endpoint")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (endpoint, cap) in caps {
            if in_flight.get(&endpoint).is_some_and(|&n| n >= cap) {
                blocked.push(endpoint);
            }
        }
    }
    Ok(serde_json::to_string(&blocked).expect("strings serialize"))
}

fn pick(
    tx: &Connection,
    queue: Queue,
    blocked: &str,
    now: i64,
    looking_at: &Cell<Option<i64>>,
) -> rusqlite::Result<Option<Candidate>> {
    let row = |r: &Row| {
        // The id first (an INTEGER PRIMARY KEY always decodes): if another
        // column does not, the caller knows which delivery to dead-letter.
        let id = r.get(0)?;
        looking_at.set(Some(id));
        Ok(Candidate {
            id,
            endpoint: r.get(1)?,
            account: r.get(2)?,
            reason: r.get(3)?,
            not_before: r.get(4)?,
            saturated_until: r.get(5)?,
            failures: r.get(6)?,
            from: queue,
        })
    };
    match queue {
        Queue::Ready => tx
            .prepare_cached(PICK_READY_SQL)?
            .query_row(params![blocked, now], row),
        Queue::Delayed => tx
            .prepare_cached(PICK_DELAYED_SQL)?
            .query_row(params![blocked, now], row),
    }
    .optional()
}

fn tat(tx: &Connection, kind: RateKind, key: &str) -> rusqlite::Result<Option<f64>> {
    tx.prepare_cached("SELECT tat FROM rate_limits WHERE kind = ?1 AND key = ?2")?
        .query_row([kind.as_str(), key], |r| r.get(0))
        .optional()
}

fn set_tat(tx: &Connection, kind: RateKind, key: &str, tat: f64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO rate_limits (kind, key, tat) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind, key) DO UPDATE SET tat = excluded.tat",
    )?
    .execute(params![kind.as_str(), key, tat])
    .map(drop)
}

/// An endpoint's breaker: saturated until, and signals in a row (a healthy
/// endpoint has no row).
fn endpoint_health(tx: &Connection, endpoint: &str) -> rusqlite::Result<(Option<i64>, u32)> {
    tx.prepare_cached(ENDPOINT_HEALTH_SQL)?
        .query_row([endpoint], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map(|found| found.unwrap_or((None, 0)))
}

/// Reroutes every ready delivery whose `$column` is ?1 to the delayed queue
/// (reason ?2), the k-th in priority order at ?3 + k * ?4. Slots are rounded
/// up by a millisecond: never earlier than the rate allows.
macro_rules! reroute_ready_sql {
    ($column:literal) => {
        concat!(
            "UPDATE deliveries
             SET state = 'delayed', reason = ?2, not_before = CAST(?3 + r.k * ?4 AS INTEGER) + 1, updated_at = ?5
             FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, id) - 1 AS k
                   FROM deliveries WHERE state = 'ready' AND ",
            $column,
            " = ?1) AS r
             WHERE deliveries.id = r.id"
        )
    };
}

/// Moves a held candidate to the delayed queue; from the ready queue, with
/// every other ready delivery of its account or endpoint, each with its own
/// slot `first + k * interval` in priority order.
fn reroute(tx: &Connection, c: &Candidate, hold: &Hold, now: i64) -> rusqlite::Result<()> {
    let reason = hold_reason(hold.reason);
    let moved = match c.from {
        Queue::Ready => {
            let sql = match hold.group {
                RateKind::Account => reroute_ready_sql!("account"),
                RateKind::Endpoint => reroute_ready_sql!("endpoint"),
            };
            tx.prepare_cached(sql)?.execute(params![
                c.key(hold.group),
                reason,
                hold.first,
                hold.interval,
                now
            ])?
        }
        Queue::Delayed => tx
            .prepare_cached(
                "UPDATE deliveries SET reason = ?2, not_before = CAST(?3 AS INTEGER) + 1, updated_at = ?4
                 WHERE id = ?1",
            )?
            .execute(params![c.id, reason, hold.first, now])?,
    };
    if let Some((kind, rate, tat)) = hold.rate {
        let (_, new_tat) = saturation::reserve(rate, tat, moved as u64);
        set_tat(tx, kind, c.key(kind), new_tat)?;
    }
    Ok(())
}

fn lease_candidate(
    tx: &Connection,
    p: &LeaseParams,
    c: &Candidate,
    probe: bool,
) -> rusqlite::Result<Lease> {
    let expires = p.now + p.lease_timeout_ms;
    let (boot_id, boot_expires) = match &p.boot {
        Some(boot) => (
            Some(boot.boot_id.as_str()),
            Some(boot.ms + p.lease_timeout_ms),
        ),
        None => (None, None),
    };
    let leased: (i64, i64, String, u32) = tx.prepare_cached(LEASE_DELIVERY_SQL)?.query_row(
        params![c.id, p.owner, expires, p.now, boot_id, boot_expires],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    tx.prepare_cached(INSERT_ATTEMPT_SQL)?
        .execute(params![leased.0, leased.3, p.run_id, p.pid, p.owner, p.now])?;
    let attempt_id = tx.last_insert_rowid();
    if probe {
        // Half-open: this is the one request the endpoint gets until it answers.
        tx.prepare_cached(
            "UPDATE endpoint_health SET probe_owner = ?2, probe_expires_at = ?3, updated_at = ?4 WHERE endpoint = ?1",
        )?
        .execute(params![c.endpoint, p.owner, expires, p.now])?;
    }
    complete_lease(tx, leased, attempt_id, &p.owner)
}

/// Applies what an attempt says about its endpoint; returns the time the
/// endpoint is saturated until, when it is.
fn record_signal(tx: &Connection, f: &FinishAttempt) -> rusqlite::Result<Option<i64>> {
    match f.signal {
        EndpointSignal::Unknown => {
            tx.prepare_cached("UPDATE endpoint_health SET probe_owner = NULL WHERE endpoint = ?1 AND probe_owner = ?2")?
                .execute(params![f.endpoint, f.owner])?;
            Ok(None)
        }
        EndpointSignal::Healthy => {
            tx.prepare_cached(ENDPOINT_HEALTHY_SQL)?
                .execute(params![f.endpoint, f.now])?;
            Ok(None)
        }
        EndpointSignal::Saturated {
            retry_after,
            limits,
        } => {
            let (until, failures) = endpoint_health(tx, &f.endpoint)?;
            // Children already in flight when the breaker opened do not count
            // as repeats: the cool-down grows once per probe, not per child.
            let already_open = until.is_some_and(|u| u > f.now);
            let failures = if already_open {
                failures.max(1)
            } else {
                failures + 1
            };
            let wait = saturation::cooldown(&limits, failures, retry_after);
            let until = until.unwrap_or(0).max(f.now + ms(wait));
            tx.prepare_cached(
                "INSERT INTO endpoint_health (endpoint, saturated_until, failures, last_error, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (endpoint) DO UPDATE SET
                     saturated_until = excluded.saturated_until, failures = excluded.failures,
                     last_error = excluded.last_error, probe_owner = NULL, probe_expires_at = NULL,
                     updated_at = excluded.updated_at",
            )?
            .execute(params![f.endpoint, until, failures, f.error, f.now])?;
            Ok(Some(until))
        }
    }
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
                "INSERT INTO messages (topic, account, payload, priority, created_at, available_at, dedup_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
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
                            m.dedup_key
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
                "INSERT OR IGNORE INTO deliveries
                   (message_id, endpoint, account, state, priority, not_before, reason, created_at, updated_at)
                 SELECT m.id, s.endpoint, m.account,
                        CASE WHEN m.available_at > ?2 THEN 'delayed' ELSE 'ready' END,
                        m.priority,
                        CASE WHEN m.available_at > ?2 THEN m.available_at ELSE ?2 END,
                        CASE WHEN m.available_at > ?2 THEN 'scheduled' END,
                        ?2, ?2
                 FROM messages m JOIN subscriptions s ON s.topic = m.topic
                 WHERE m.routed_at IS NULL AND m.id <= ?1
                 ORDER BY m.id, s.endpoint",
                params![upper, params.now],
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
        // On the boot that took it, the boot clock says when a lease
        // expired; otherwise (another boot, no boot clock) the wall clock.
        const EXPIRED: &str = "state = 'leased' AND CASE WHEN lease_boot_id = ?2 \
             THEN lease_boot_expires_at <= ?3 ELSE lease_expires_at <= ?1 END";
        let (boot_id, boot_now) = match &p.boot {
            Some(boot) => (Some(boot.boot_id.as_str()), Some(boot.ms)),
            None => (None, None),
        };
        self.write(|tx| {
            tx.execute(
                &format!(
                    "UPDATE attempts SET outcome = ?4, finished_at = ?1, error = 'lease expired before the child finished'
                     WHERE outcome = ?5 AND delivery_id IN (SELECT id FROM deliveries WHERE {EXPIRED})"
                ),
                params![p.now, boot_id, boot_now, outcome::LEASE_EXPIRED, outcome::IN_FLIGHT],
            )?;
            tx.execute(
                &format!(
                    "UPDATE deliveries
                     SET state = 'ready', lease_owner = NULL, lease_expires_at = NULL, lease_boot_id = NULL,
                         lease_boot_expires_at = NULL, reason = NULL, not_before = ?1, updated_at = ?1,
                         last_error = 'lease expired'
                     WHERE {EXPIRED}"
                ),
                params![p.now, boot_id, boot_now],
            )
        })
    }

    fn deliveries_restore_endpoints(&mut self, endpoints: &[String], now: i64) -> Result<u64> {
        let endpoints = serde_json::to_string(endpoints).expect("strings serialize");
        self.write(|tx| {
            tx.execute(
                "UPDATE deliveries SET state = 'ready', reason = NULL, not_before = ?2, updated_at = ?2
                 WHERE reason = 'endpoint_removed' AND state = 'delayed'
                   AND endpoint IN (SELECT value FROM json_each(?1))",
                params![endpoints, now],
            )
            .map(|n| n as u64)
        })
    }

    fn deliveries_purge_orphaned(&mut self, p: &PurgeOrphanedParams) -> Result<u64> {
        let which =
            "reason = 'endpoint_removed' AND state = 'delayed' AND (?1 IS NULL OR endpoint = ?1)
                     AND endpoint NOT IN (SELECT value FROM json_each(?2))";
        let configured = serde_json::to_string(&p.configured).expect("strings serialize");
        let values = params![p.endpoint, configured];
        self.write(|tx| {
            if p.dry_run {
                return tx.query_row(
                    &format!("SELECT count(*) FROM deliveries WHERE {which}"),
                    values,
                    |r| r.get(0),
                );
            }
            tx.execute(&format!("DELETE FROM deliveries WHERE {which}"), values)
                .map(|n| n as u64)
        })
    }

    fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE state = 'ready' LIMIT ?2))
                      + (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                               WHERE state = 'delayed' AND not_before <= ?1 LIMIT ?2))",
                params![now, limit],
                |r| r.get::<_, u64>(0),
            )
            .map(|n| n.min(limit))
            .map_err(|e| self.err(e))
    }

    fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>> {
        self.conn
            .query_row(
                "SELECT min(t) FROM (
                   SELECT min(not_before) AS t FROM deliveries INDEXED BY deliveries_due
                   WHERE state = 'delayed' AND not_before > ?1 AND not_before < ?2
                   UNION ALL
                   SELECT min(lease_expires_at) FROM deliveries WHERE state = 'leased')",
                params![now, PARKED_UNTIL],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
        self.prepare_ahead(&LEASE_STATEMENTS)?;
        for _ in 0..MAX_UNDECODABLE {
            let looking_at = Cell::new(None);
            match self.write_raw(|tx| lease_next(tx, p, &looking_at)) {
                Err(e) if is_undecodable(&e) && looking_at.get().is_some() => {
                    // A row written with plain SQL that cannot be read as a
                    // delivery: dead-letter it in its own transaction (the
                    // lease's rolled back), or it would stay at the head of
                    // the queue and stop all delivery.
                    let id = looking_at.get().expect("checked");
                    log::error!("delivery {id} cannot be decoded, dead-lettered: {e}");
                    self.dead_letter_undecodable(id, &e.to_string(), p.now)?;
                }
                other => return other.map_err(|e| self.err(e)),
            }
        }
        Ok(None)
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
        self.prepare_ahead(&FINISH_STATEMENTS)?;
        self.write(|tx| {
            // A child that lost its lease says nothing about the endpoint any
            // more: its signal could close a breaker another child opened,
            // or clear another child's probe.
            let owner = tx
                .prepare_cached(STILL_OWNER_SQL)?
                .query_row(params![f.delivery_id, f.owner], |_| Ok(()))
                .optional()?
                .is_some();
            let moved = owner && {
                let saturated_until = record_signal(tx, f)?;
                let (state, not_before, reason) = match (f.next, saturated_until) {
                    (NextState::Delivered, _) => (DeliveryState::Delivered, f.now, None),
                    (NextState::Retry { not_before }, None) => (
                        DeliveryState::Delayed,
                        not_before,
                        Some(reason::RETRY_BACKOFF),
                    ),
                    (NextState::Retry { not_before }, Some(until)) => (
                        DeliveryState::Delayed,
                        not_before.max(until),
                        Some(reason::ENDPOINT_SATURATED),
                    ),
                    (NextState::Dead, _) => (DeliveryState::Dead, f.now, None),
                };
                tx.prepare_cached(FINISH_DELIVERY_SQL)?.execute(params![
                    f.delivery_id,
                    f.owner,
                    state.as_str(),
                    not_before,
                    reason,
                    f.http_status,
                    f.error,
                    f.now
                ])? == 1
            };
            let outcome = if moved {
                f.outcome.as_str()
            } else {
                outcome::LEASE_LOST
            };
            tx.prepare_cached(FINISH_ATTEMPT_SQL)?.execute(params![
                f.attempt_id,
                f.now,
                outcome,
                f.http_status,
                f.error,
                f.duration_ms
            ])?;
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
                        retried = ?7, dead = ?8, failed = ?9, found_nothing = ?10
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
                    run.found_nothing
                ],
            )
            .map(drop)
        })
    }

    fn run_totals(&mut self) -> Result<RunTotals> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(routed), 0), coalesce(sum(reclaimed), 0), coalesce(sum(forked), 0),
                        coalesce(sum(delivered), 0), coalesce(sum(retried), 0), coalesce(sum(dead), 0),
                        coalesce(sum(failed), 0), coalesce(sum(found_nothing), 0)
                 FROM runs",
                [],
                |r| {
                    Ok(RunTotals {
                        runs: r.get(0)?,
                        sums: RunRecord {
                            routed: r.get(1)?,
                            reclaimed: r.get(2)?,
                            forked: r.get(3)?,
                            delivered: r.get(4)?,
                            retried: r.get(5)?,
                            dead: r.get(6)?,
                            failed: r.get(7)?,
                            found_nothing: r.get(8)?,
                            ..RunRecord::default()
                        },
                    })
                },
            )
            .map_err(|e| self.err(e))
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

    fn deliveries_list(
        &mut self,
        filter: &DeliveryFilter,
        limit: u64,
    ) -> Result<Vec<ListedDelivery>> {
        let (clause, mut values) = filter_clause(filter);
        values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        let columns = DELIVERY_COLUMNS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns}, m.topic, d.created_at, m.uid FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE {clause} ORDER BY d.id LIMIT ?"
        );
        self.conn
            .prepare(&sql)
            .and_then(|mut s| {
                s.query_map(params_from_iter(values), |r| {
                    Ok(ListedDelivery {
                        delivery: delivery_row(r)?,
                        topic: r.get(13)?,
                        created_at: r.get(14)?,
                        uid: r.get(15)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>> {
        let (id, uid) = match key {
            MessageKey::Id(id) => (Some(*id), None),
            MessageKey::Uid(uid) => (None, Some(uid.as_str())),
        };
        self.conn
            .query_row(
                "SELECT id, uid, topic, account, payload, priority, created_at, available_at, dedup_key, routed_at,
                        route_error
                 FROM messages WHERE id = ?1 OR uid = ?2",
                params![id, uid],
                |r| {
                    Ok(MessageRow {
                        id: r.get(0)?,
                        uid: r.get(1)?,
                        topic: r.get(2)?,
                        account: r.get(3)?,
                        payload: r.get(4)?,
                        priority: r.get(5)?,
                        created_at: r.get(6)?,
                        available_at: r.get(7)?,
                        dedup_key: r.get(8)?,
                        routed_at: r.get(9)?,
                        route_error: r.get(10)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64> {
        self.write(|tx| {
            if dry_run {
                return tx.query_row(
                    "SELECT count(*) FROM messages WHERE route_error IS NOT NULL",
                    [],
                    |r| r.get(0),
                );
            }
            tx.execute(
                "UPDATE messages SET routed_at = NULL, route_error = NULL WHERE route_error IS NOT NULL",
                [],
            )
            .map(|n| n as u64)
        })
    }

    fn deliveries_requeue(&mut self, p: &RequeueParams) -> Result<u64> {
        let (clause, filter_values) = filter_clause(&p.filter);
        let target = format!(
            "SELECT d.id FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE d.state IN ('dead', 'delayed') AND {clause}"
        );
        self.write(|tx| {
            if p.dry_run {
                let count = format!("SELECT count(*) FROM ({target})");
                return tx.query_row(&count, params_from_iter(filter_values), |r| r.get(0));
            }
            // Anonymous parameters number in text order: the times come first.
            let mut values = vec![Value::Integer(p.now), Value::Integer(p.now)];
            values.extend(filter_values);
            tx.execute(
                &format!(
                    "UPDATE deliveries SET state = 'ready', reason = NULL, not_before = ?, attempts = 0, updated_at = ?
                     WHERE id IN ({target})"
                ),
                params_from_iter(values),
            )
            .map(|n| n as u64)
        })
    }

    fn delivered_purge(&mut self, before: i64, batch: u64) -> Result<PurgeReport> {
        self.write(|tx| {
            let batch = i64::try_from(batch).unwrap_or(i64::MAX);
            // Attempts go with their deliveries (ON DELETE CASCADE).
            let deliveries = tx.execute(
                "DELETE FROM deliveries WHERE id IN
                   (SELECT id FROM deliveries INDEXED BY deliveries_delivered
                    WHERE state = 'delivered' AND updated_at < ?1 ORDER BY updated_at LIMIT ?2)",
                params![before, batch],
            )?;
            let messages = tx.execute(
                "DELETE FROM messages WHERE id IN
                   (SELECT m.id FROM messages m
                    WHERE m.routed_at IS NOT NULL AND m.created_at < ?1
                      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id)
                    LIMIT ?2)",
                params![before, batch],
            )?;
            let runs = tx.execute(
                "DELETE FROM runs WHERE id IN
                   (SELECT id FROM runs WHERE started_at < ?1 AND id < (SELECT max(id) FROM runs) LIMIT ?2)",
                params![before, batch],
            )?;
            Ok(PurgeReport {
                deliveries: deliveries as u64,
                messages: messages as u64,
                runs: runs as u64,
            })
        })
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
                            failed, found_nothing
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
            stats.held_accounts = conn
                .prepare(
                    "SELECT account, count(*), max(not_before) FROM deliveries
                     WHERE state = 'delayed' AND reason = 'account_budget' GROUP BY account ORDER BY account",
                )?
                .query_map([], |r| {
                    Ok(HeldAccount {
                        account: r.get(0)?,
                        delayed: r.get(1)?,
                        until: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            stats.orphaned = conn
                .prepare(
                    "SELECT endpoint, count(*) FROM deliveries
                     WHERE reason = 'endpoint_removed' AND state = 'delayed' GROUP BY endpoint ORDER BY endpoint",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            stats.unroutable_messages = conn.query_row(
                "SELECT count(*) FROM messages WHERE route_error IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            stats.saturated_endpoints = conn
                .prepare(
                    "SELECT endpoint, saturated_until, failures, last_error FROM endpoint_health
                     WHERE failures > 0 OR saturated_until > ?1 ORDER BY endpoint",
                )?
                .query_map([now], |r| {
                    Ok(EndpointHealth {
                        endpoint: r.get(0)?,
                        saturated_until: r.get(1)?,
                        failures: r.get(2)?,
                        last_error: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(stats)
        };
        read().map_err(|e| self.err(e))
    }
}
