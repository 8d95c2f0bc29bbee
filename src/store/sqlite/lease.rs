//! The children's path of the SQLite store: picking the next delivery
//! (ready or due delayed, by priority, past held-back accounts and
//! endpoints), leasing it with its attempt, finishing the attempt with its
//! endpoint signal, reclaiming expired leases, and what a run counts.

use std::cell::Cell;
use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::*;
use crate::adaptive::{Latency, Learned, RateChange};
use crate::saturation::{self, Decision, Hold, RateKind};
use crate::store::candidate::{self, Candidate, HEALTH_COLUMNS, Health};
use crate::store::learning::{self, RateOps};

/// Picks the next ready delivery: a seek on `deliveries_queue`
/// (state, priority DESC, id), highest priority first, then oldest,
/// skipping the endpoints listed in ?1 (a JSON array), those with a probe
/// in flight at ?2 and expired deliveries, with its endpoint's breaker (one statement where there
/// were three: each child compiles every statement it runs).
const PICK_READY_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0),
       h.learned_rate, h.rate_ceiling, h.rate_changed_at, h.rate_reason, h.rate_decreased_at
FROM deliveries d LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'ready' AND d.endpoint NOT IN (SELECT value FROM json_each(?1))
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > ?2, 0)
  AND (d.expires_at IS NULL OR d.expires_at > ?2)
ORDER BY d.priority DESC, d.id LIMIT 1";

/// Picks the next delayed delivery whose time (?2) has come, by priority,
/// then the longest eligible, skipping as [`PICK_READY_SQL`] does. The index
/// is named: left to itself the planner seeks `deliveries_queue` and sorts
/// every delayed delivery of the top priority by not_before.
const PICK_DELAYED_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0),
       h.learned_rate, h.rate_ceiling, h.rate_changed_at, h.rate_reason, h.rate_decreased_at
FROM deliveries d INDEXED BY deliveries_delayed LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'delayed' AND d.not_before <= ?2 AND d.endpoint NOT IN (SELECT value FROM json_each(?1))
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > ?2, 0)
  AND (d.expires_at IS NULL OR d.expires_at > ?2)
ORDER BY d.priority DESC, d.not_before LIMIT 1";

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
    "SELECT uid, topic, account, payload, ordering_key FROM messages WHERE id = ?1";

/// A good answer: it closes the endpoint's breaker when it answers the
/// breaker's probe (`?3`, the owner), and ends a row of silences. An
/// answer to a request sent before the breaker opened closes nothing: under
/// a flood, children in flight answered after the 429 and closed the
/// breaker it had just opened, and the flood went on.
const ENDPOINT_HEALTHY_SQL: &str = "\
UPDATE endpoint_health
SET failures = 0, saturated_until = NULL, probe_owner = NULL, probe_expires_at = NULL, silent = 0,
    updated_at = ?2
WHERE endpoint = ?1 AND (probe_owner = ?3 OR (failures = 0 AND silent > 0))";

const SET_LATENCY_SQL: &str = "\
INSERT INTO endpoint_health (endpoint, latency_ms, latency_base_ms, updated_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (endpoint) DO UPDATE SET latency_ms = excluded.latency_ms,
    latency_base_ms = excluded.latency_base_ms, updated_at = excluded.updated_at";

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
                ordering_key: r.get(4)?,
            })
        })
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
        match saturation::decide(p.policy, &c.view(), p.now, |kind| {
            tat(tx, kind, c.key(kind))
        })? {
            Decision::Go { probe, charges } => {
                for charge in charges {
                    set_tat(tx, charge.kind, c.key(charge.kind), charge.tat)?;
                }
                // Deliveries go: a step up of its learned rate, when due.
                if let Some(step) = c.growth_step(p.policy, p.now) {
                    learning::grow(&mut Ops(tx), &c.endpoint, step, p.now)?;
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
            learned: candidate::learned(r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
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

/// An endpoint's breaker, learned rate and answer times (a healthy
/// endpoint has no row).
static ENDPOINT_HEALTH_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {HEALTH_COLUMNS} FROM endpoint_health WHERE endpoint = ?1")
});

/// An endpoint's breaker, learned rate and answer times.
fn endpoint_health(tx: &Connection, endpoint: &str) -> rusqlite::Result<Health> {
    tx.prepare_cached(&ENDPOINT_HEALTH_SQL)?
        .query_row([endpoint], |r| {
            Ok(Health {
                saturated_until: r.get(0)?,
                failures: r.get(1)?,
                silent: r.get(2)?,
                learned: candidate::learned(r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?),
                latency: candidate::latency(r.get(8)?, r.get(9)?),
            })
        })
        .optional()
        .map(Option::unwrap_or_default)
}

/// The learned-rate operations (`learning`) in a SQLite transaction.
struct Ops<'a>(&'a Connection);

impl RateOps for Ops<'_> {
    type Error = rusqlite::Error;

    fn set_learned(
        &mut self,
        endpoint: &str,
        learned: Option<&Learned>,
        now: i64,
    ) -> rusqlite::Result<()> {
        self.0
            .prepare_cached(
                "INSERT INTO endpoint_health (endpoint, learned_rate, rate_ceiling, rate_changed_at, rate_reason,
                                              rate_decreased_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (endpoint) DO UPDATE SET
                     learned_rate = excluded.learned_rate, rate_ceiling = excluded.rate_ceiling,
                     rate_changed_at = excluded.rate_changed_at, rate_reason = excluded.rate_reason,
                     rate_decreased_at = excluded.rate_decreased_at, updated_at = excluded.updated_at",
            )?
            .execute(params![
                endpoint,
                learned.map(|l| l.rate),
                learned.map(|l| l.ceiling),
                learned.map(|l| l.changed_at),
                learned.map(|l| l.reason.as_str()),
                learned.map(|l| l.decreased_at),
                now
            ])
            .map(drop)
    }

    fn earliest_slot(&mut self, endpoint: &str) -> rusqlite::Result<Option<f64>> {
        self.0
            .prepare_cached(
                "SELECT min(not_before) FROM deliveries INDEXED BY deliveries_held_endpoint
                 WHERE endpoint = ?1 AND state = 'delayed' AND reason = 'endpoint_rate'",
            )?
            .query_row([endpoint], |r| r.get(0))
    }

    fn respace(
        &mut self,
        endpoint: &str,
        first: f64,
        interval: f64,
        limit: Option<u64>,
        now: i64,
    ) -> rusqlite::Result<u64> {
        let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        self.0
            .prepare_cached(
                "UPDATE deliveries SET not_before = CAST(?2 + r.k * ?3 AS INTEGER) + 1, updated_at = ?4
                 FROM (SELECT id, row_number() OVER (ORDER BY not_before, id) - 1 AS k
                       FROM deliveries INDEXED BY deliveries_held_endpoint
                       WHERE endpoint = ?1 AND state = 'delayed' AND reason = 'endpoint_rate'
                       ORDER BY not_before, id LIMIT ?5) AS r
                 WHERE deliveries.id = r.id",
            )?
            .execute(params![endpoint, first, interval, now, limit])
            .map(|n| n as u64)
    }

    fn release_slots(&mut self, endpoint: &str, now: i64) -> rusqlite::Result<()> {
        self.0
            .prepare_cached(
                "UPDATE deliveries SET state = 'ready', reason = NULL, not_before = ?2, updated_at = ?2
                 WHERE endpoint = ?1 AND state = 'delayed' AND reason = 'endpoint_rate'",
            )?
            .execute(params![endpoint, now])
            .map(drop)
    }

    fn set_tat(&mut self, endpoint: &str, tat: f64) -> rusqlite::Result<()> {
        set_tat(self.0, RateKind::Endpoint, endpoint, tat)
    }

    fn took_last_second(&mut self, endpoint: &str, now: i64) -> rusqlite::Result<u64> {
        self.0
            .prepare_cached(
                "SELECT count(*) FROM deliveries INDEXED BY deliveries_delivered
                 WHERE state = 'delivered' AND updated_at > ?2 - 1000 AND endpoint = ?1",
            )?
            .query_row(params![endpoint, now], |r| r.get(0))
    }

    fn has_backlog(&mut self, endpoint: &str) -> rusqlite::Result<bool> {
        self.0
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE endpoint = ?1 AND state = 'ready')
                     OR EXISTS (SELECT 1 FROM deliveries INDEXED BY deliveries_held_endpoint
                                WHERE endpoint = ?1 AND state = 'delayed'
                                  AND reason IN ('endpoint_rate', 'endpoint_saturated'))",
            )?
            .query_row([endpoint], |r| r.get(0))
    }

    fn set_latency(&mut self, endpoint: &str, latency: &Latency, now: i64) -> rusqlite::Result<()> {
        self.0
            .prepare_cached(SET_LATENCY_SQL)?
            .execute(params![endpoint, latency.recent_ms, latency.base_ms, now])
            .map(drop)
    }
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

/// Moves a held candidate to the delayed queue, with the rest of its group,
/// each with its own slot `first + k * interval` in priority order: from
/// the ready queue, every ready delivery of its account or endpoint; from
/// the delayed queue, when its endpoint is held, every delivery of the
/// endpoint that came due with it (the deliveries a cool-down held come
/// due together), but those holding a slot still fresh (of its rate, or,
/// held by its rate, of their account's budget: charged already).
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
        Queue::Delayed if hold.group == RateKind::Endpoint => tx
            .prepare_cached(
                "UPDATE deliveries
                 SET reason = ?2, not_before = CAST(?3 + r.k * ?4 AS INTEGER) + 1, updated_at = ?5
                 FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, not_before, id) - 1 AS k
                       FROM deliveries INDEXED BY deliveries_held_endpoint
                       WHERE endpoint = ?1 AND state = 'delayed' AND not_before <= ?5
                         AND NOT (coalesce(reason, '') = 'endpoint_rate' AND not_before >= ?6)
                         AND (?8 OR coalesce(reason, '') <> 'account_budget' OR id = ?7)) AS r
                 WHERE deliveries.id = r.id",
            )?
            .execute(params![
                c.endpoint,
                reason,
                hold.first,
                hold.interval,
                now,
                candidate::fresh_since(hold, now),
                c.id,
                hold.rate.is_none()
            ])?,
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
        EndpointSignal::Answered { answer_ms, limits } if limits.adaptive => {
            tx.prepare_cached(ENDPOINT_HEALTHY_SQL)?
                .execute(params![f.endpoint, f.now, f.owner])?;
            let health = endpoint_health(tx, &f.endpoint)?;
            learning::observe_answer(&mut Ops(tx), f, &limits, health.latency, answer_ms, |_| {
                Ok(health)
            })?;
            Ok(None)
        }
        EndpointSignal::Healthy | EndpointSignal::Answered { .. } => {
            tx.prepare_cached(ENDPOINT_HEALTHY_SQL)?
                .execute(params![f.endpoint, f.now, f.owner])?;
            Ok(None)
        }
        EndpointSignal::Saturated {
            retry_after,
            limits,
            slows,
        } => {
            let health = endpoint_health(tx, &f.endpoint)?;
            let error = f.error.as_deref();
            let until = open_breaker(tx, f, &limits, retry_after, &health, error)?;
            if let Some(why) = slows
                && health.slows_at(f.now)
            {
                learning::slow_down(&mut Ops(tx), f, &limits, &health, why, until)?;
            }
            Ok(Some(until))
        }
        EndpointSignal::Silent { limits } => {
            let health = endpoint_health(tx, &f.endpoint)?;
            let slow_after = limits.slow_after.unwrap_or(1);
            if saturation::silence_opens(slow_after, health.failures, health.silent) {
                let error = saturation::silence_error(slow_after);
                let until = open_breaker(tx, f, &limits, None, &health, Some(&error))?;
                if health.slows_at(f.now) {
                    let why = RateChange::Silent;
                    learning::slow_down(&mut Ops(tx), f, &limits, &health, why, until)?;
                }
                return Ok(Some(until));
            }
            tx.prepare_cached(
                "INSERT INTO endpoint_health (endpoint, silent, updated_at) VALUES (?1, 1, ?2)
                 ON CONFLICT (endpoint) DO UPDATE SET silent = silent + 1, updated_at = excluded.updated_at",
            )?
            .execute(params![f.endpoint, f.now])?;
            Ok(None)
        }
    }
}

/// Opens (or keeps open) an endpoint's breaker on a saturation signal, from
/// its state, recording `error`; returns the time it is saturated until.
fn open_breaker(
    tx: &Connection,
    f: &FinishAttempt,
    limits: &EndpointLimits,
    retry_after: Option<Duration>,
    health: &Health,
    error: Option<&str>,
) -> rusqlite::Result<i64> {
    let (until, failures) = saturation::open_breaker(
        limits,
        retry_after,
        f.now,
        health.saturated_until,
        health.failures,
    );
    tx.prepare_cached(
        "INSERT INTO endpoint_health (endpoint, saturated_until, failures, last_error, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (endpoint) DO UPDATE SET
             saturated_until = excluded.saturated_until, failures = excluded.failures,
             last_error = excluded.last_error, probe_owner = NULL, probe_expires_at = NULL,
             silent = 0, updated_at = excluded.updated_at",
    )?
    .execute(params![f.endpoint, until, failures, error, f.now])?;
    Ok(until)
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

impl SqliteStore {
    /// Dead-letters delivery `id`, whose row (or its message's) cannot be
    /// decoded.
    fn dead_letter_undecodable(&mut self, id: i64, error: &str, now: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE deliveries
                 SET state = 'dead', reason = ?4, lease_owner = NULL, lease_expires_at = NULL,
                     lease_boot_id = NULL, lease_boot_expires_at = NULL,
                     last_error = 'cannot be decoded (a column written with plain SQL holds the wrong type): ' || ?2,
                     updated_at = ?3
                 WHERE id = ?1 AND state IN ('ready', 'delayed')",
                params![id, error, now, reason::UNDECODABLE],
            )
            .map(drop)
        })
    }

    pub(super) fn leases_reclaim_expired(&mut self, p: &ReclaimParams) -> Result<usize> {
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

    pub(super) fn deliveries_expire(&mut self, p: &ExpireParams) -> Result<ExpireReport> {
        // The batch: the earliest expired, by the partial index.
        const EXPIRED: &str = "id IN (SELECT id FROM deliveries
             WHERE expires_at IS NOT NULL AND state IN ('ready', 'delayed') AND expires_at <= ?1
             ORDER BY expires_at LIMIT ?2)";
        let batch = i64::try_from(p.batch).unwrap_or(i64::MAX);
        self.write(|tx| {
            let discarded = tx.execute(
                &format!(
                    "DELETE FROM deliveries WHERE {EXPIRED} AND EXISTS (
                       SELECT 1 FROM messages m JOIN subscriptions s ON s.topic = m.topic
                       WHERE m.id = deliveries.message_id AND s.endpoint = deliveries.endpoint
                         AND s.discard_expired)"
                ),
                params![p.now, batch],
            )?;
            let expired = tx.execute(
                &format!(
                    "UPDATE deliveries
                     SET state = 'dead', reason = ?3, not_before = ?1, updated_at = ?1,
                         last_error = 'its time to live ran out before it was delivered'
                     WHERE {EXPIRED}"
                ),
                params![p.now, batch - discarded as i64, reason::EXPIRED],
            )?;
            Ok(ExpireReport {
                expired: expired as u64,
                discarded: discarded as u64,
            })
        })
    }

    pub(super) fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                               WHERE state = 'ready' AND (expires_at IS NULL OR expires_at > ?1)
                                               LIMIT ?2))
                      + (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                               WHERE state = 'delayed' AND not_before <= ?1
                                                 AND (expires_at IS NULL OR expires_at > ?1) LIMIT ?2))",
                params![now, limit],
                |r| r.get::<_, u64>(0),
            )
            .map(|n| n.min(limit))
            .map_err(|e| self.err(e))
    }

    pub(super) fn attempts_in_flight(&mut self, run_id: i64) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM attempts WHERE run_id = ?1 AND outcome = ?2",
                params![run_id, outcome::IN_FLIGHT],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    pub(super) fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>> {
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

    pub(super) fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
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

    pub(super) fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>> {
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

    pub(super) fn attempt_finish(&mut self, f: &FinishAttempt) -> Result<bool> {
        self.prepare_ahead(&FINISH_STATEMENTS)?;
        if f.releases_key().is_some() {
            self.prepare_ahead(&[&super::RELEASE_KEY_SQL])?;
        }
        if matches!(f.signal, EndpointSignal::Answered { .. }) {
            self.prepare_ahead(&[&ENDPOINT_HEALTH_SQL, SET_LATENCY_SQL])?;
        }
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
                let (state, not_before, reason) = f.moves_to(saturated_until);
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
            if moved && let Some(key) = f.releases_key() {
                super::release_key(tx, &f.endpoint, key, f.now)?;
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query plan of `sql` on a migrated database.
    pub(super) fn plan(sql: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("q.db"), None, Duration::from_secs(5)).unwrap();
        let mut stmt = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let params: [&dyn rusqlite::ToSql; 2] = [&"[]", &0];
        let rows: Vec<String> = stmt
            .query_map(&params[..stmt.parameter_count()], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        rows.join("\n")
    }

    #[test]
    fn the_picks_seek_their_indexes_without_a_sort() {
        // The ready queue: a seek to state = 'ready', first entry in (priority DESC, id).
        let ready = plan(PICK_READY_SQL);
        assert!(
            ready.contains("SEARCH d USING INDEX deliveries_queue (state=?)"),
            "{ready}"
        );
        assert!(!ready.contains("TEMP B-TREE"), "no sort: {ready}");
        assert!(
            !ready.lines().any(|l| l == "SCAN d"),
            "no scan of the table: {ready}"
        );
        // The breaker of the picked delivery's endpoint: a lookup, not a scan.
        assert!(
            ready.contains("SEARCH h USING PRIMARY KEY (endpoint=?)"),
            "{ready}"
        );
        // The delayed queue: its partial index, in (priority DESC, not_before) order.
        let delayed = plan(PICK_DELAYED_SQL);
        assert!(
            delayed.contains("USING INDEX deliveries_delayed"),
            "{delayed}"
        );
        assert!(!delayed.contains("TEMP B-TREE"), "no sort: {delayed}");
    }
}

#[cfg(test)]
mod key_plan_tests {
    use super::super::{DIALECT, ordering};
    use super::tests::plan;

    /// Every lookup of a key seeks its index by (endpoint, key, state) or
    /// walks only the waiting deliveries: never a key's history, never
    /// the whole delayed queue.
    fn assert_key_lookups_seek(plan: &str) {
        for line in plan
            .lines()
            .filter(|l| l.contains(" o ") || l.contains(" o USING"))
        {
            assert!(
                line.contains("deliveries_keys (endpoint=? AND ordering_key=? AND state=?)"),
                "{plan}"
            );
        }
        assert!(!plan.contains("deliveries_queue"), "{plan}");
        assert!(!plan.lines().any(|l| l == "SCAN deliveries"), "{plan}");
    }

    #[test]
    fn releasing_keys_walks_the_waiting_deliveries_only() {
        let release = plan(&ordering::release_keys_sql(&DIALECT, false));
        assert_key_lookups_seek(&release);
        assert!(
            release.contains("USING COVERING INDEX deliveries_waiting"),
            "{release}"
        );
    }

    #[test]
    fn a_new_delivery_looks_its_key_up_by_index() {
        let waits = plan(&format!(
            "SELECT {} FROM messages m JOIN subscriptions s ON s.topic = m.topic",
            ordering::key_waits()
        ));
        assert_key_lookups_seek(&waits);
        assert!(
            waits.contains("SEARCH w USING COVERING INDEX deliveries_waiting"),
            "{waits}"
        );
        assert!(waits.contains("messages_unrouted_keys"), "{waits}");
    }
}
