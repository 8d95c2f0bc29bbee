//! The children's path of the PostgreSQL store: picking the next delivery
//! (ready or due delayed, by priority, past held-back accounts and
//! endpoints), leasing it with its attempt, finishing the attempt with its
//! endpoint signal, reclaiming expired leases, and what a run counts.
//!
//! Children of every host lease at once. A pick locks its row and skips
//! rows others hold (`FOR UPDATE SKIP LOCKED`), so two children never wait
//! for or take the same delivery. A candidate whose account or endpoint is
//! limited (a rate, an in-flight cap, an open breaker) is decided under an
//! advisory lock on that key, with the key's state read again under it, so
//! budgets, caps and probes hold across hosts as they do under SQLite's one
//! write lock.

use super::*;
use crate::adaptive::{Latency, Learned, RateChange};
use crate::saturation::{self, Decision, Hold, RateKind};
use crate::store::candidate::{self, Candidate, HEALTH_COLUMNS, Health, LEARNED_COLUMNS};
use crate::store::learning::{self, RateOps};

/// The next ready delivery, highest priority first, then oldest, skipping
/// the endpoints in $1 and those with a probe in flight at $2, expired
/// deliveries, and rows another transaction holds.
const PICK_READY_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0),
       h.learned_rate, h.rate_ceiling, h.rate_changed_at, h.rate_reason, h.rate_decreased_at
FROM deliveries d LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'ready' AND d.endpoint <> ALL($1)
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > $2, false)
  AND (d.expires_at IS NULL OR d.expires_at > $2)
ORDER BY d.priority DESC, d.id LIMIT 1
FOR UPDATE OF d SKIP LOCKED";

/// The next delayed delivery whose time ($2) has come, by priority, then
/// the longest eligible, skipping as [`PICK_READY_SQL`] does.
const PICK_DELAYED_SQL: &str = "\
SELECT d.id, d.endpoint, d.account, d.reason, d.not_before, h.saturated_until, coalesce(h.failures, 0),
       h.learned_rate, h.rate_ceiling, h.rate_changed_at, h.rate_reason, h.rate_decreased_at
FROM deliveries d LEFT JOIN endpoint_health h ON h.endpoint = d.endpoint
WHERE d.state = 'delayed' AND d.not_before <= $2 AND d.endpoint <> ALL($1)
  AND NOT coalesce(h.probe_owner IS NOT NULL AND h.probe_expires_at > $2, false)
  AND (d.expires_at IS NULL OR d.expires_at > $2)
ORDER BY d.priority DESC, d.not_before LIMIT 1
FOR UPDATE OF d SKIP LOCKED";

/// A leased delivery's move out of `leased` ($1 delivery, $2 owner, $3
/// state, $4 not_before, $5 reason, $6 HTTP status, $7 error, $8 now), only
/// while the lease is still the owner's: a finish's, in a transaction or in
/// one statement.
macro_rules! finish_delivery_sql {
    () => {
        "UPDATE deliveries
         SET state = $3, not_before = $4, reason = $5, lease_owner = NULL, lease_expires_at = NULL,
             lease_boot_id = NULL, lease_boot_expires_at = NULL,
             last_status = coalesce($6, last_status), last_error = $7, updated_at = $8
         WHERE id = $1 AND state = 'leased' AND lease_owner = $2"
    };
}

/// A good answer: it closes the endpoint's breaker when it answers the
/// breaker's probe (`$3`, the owner), and ends a row of silences. An
/// answer to a request sent before the breaker opened closes nothing: under
/// a flood, children in flight answered after the 429 and closed the
/// breaker it had just opened, and the flood went on.
const ENDPOINT_HEALTHY_SQL: &str = "\
UPDATE endpoint_health
SET failures = 0, saturated_until = NULL, probe_owner = NULL, probe_expires_at = NULL, silent = 0,
    updated_at = $2
WHERE endpoint = $1 AND (probe_owner = $3 OR (failures = 0 AND silent > 0))";

/// How many candidates one lease may reroute or skip before it gives up
/// (the next child goes on where it stopped).
const MAX_REROUTES: usize = 64;

/// Waits for the transaction-scoped advisory lock on a limited key.
fn lock_key(tx: &mut Client, kind: RateKind, key: &str) -> Result<(), ::postgres::Error> {
    let name = format!("cronpost {} {key}", kind.as_str());
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        typed![name => TEXT],
    )
    .map(drop)
}

/// What one lease transaction did with the candidate it looked at.
enum Step {
    /// Leased it.
    Leased(Lease),
    /// Held it (and its group) back in the delayed queue; when its endpoint
    /// was held, the endpoint, whose other deliveries this lease skips
    /// (they would be held one transaction each).
    Rerouted(Option<String>),
    /// Its endpoint cannot take a child now (a probe went, or the cap
    /// filled, since the pick): skip the endpoint, look further.
    Skipped(String),
    /// Nothing to lease.
    Empty,
}

/// One candidate, in one transaction: picked, decided under the advisory
/// locks of its keys (at most two, always the account's before the
/// endpoint's, so two leases cannot deadlock on them), then leased or
/// rerouted. A transaction per candidate holds no key longer than that
/// candidate needs it.
fn lease_step(
    tx: &mut Client,
    p: &LeaseParams,
    blocked: &[String],
) -> Result<Step, ::postgres::Error> {
    let order = match p.prefer {
        Queue::Ready => [Queue::Ready, Queue::Delayed],
        Queue::Delayed => [Queue::Delayed, Queue::Ready],
    };
    let mut candidate = None;
    for queue in order {
        candidate = pick(tx, queue, blocked, p.now)?;
        if candidate.is_some() {
            break;
        }
    }
    let Some(mut c) = candidate else {
        return Ok(Step::Empty);
    };
    if !lock_and_recheck(tx, p, &mut c)? {
        return Ok(Step::Skipped(c.endpoint));
    }
    let decision = saturation::decide(p.policy, &c.view(), p.now, |kind| {
        tat(tx, kind, c.key(kind))
    })?;
    match decision {
        Decision::Go { probe, charges } => {
            for charge in charges {
                set_tat(tx, charge.kind, c.key(charge.kind), charge.tat)?;
            }
            // Deliveries go: a step up of its learned rate, when due.
            if let Some(step) = c.growth_step(p.policy, p.now) {
                learning::grow(&mut Ops(tx), &c.endpoint, step, p.now)?;
            }
            lease_candidate(tx, p, &c, probe).map(Step::Leased)
        }
        Decision::Hold(hold) => {
            reroute(tx, &c, &hold, p.now)?;
            Ok(Step::Rerouted(
                (hold.group == RateKind::Endpoint).then(|| c.endpoint.clone()),
            ))
        }
    }
}

/// Takes the advisory locks a limited candidate is decided under (its
/// account's, then its endpoint's) and reads its endpoint's breaker and
/// in-flight count again under them. False: its endpoint cannot take a
/// child now (a probe is in flight, or the cap is full).
fn lock_and_recheck(
    tx: &mut Client,
    p: &LeaseParams,
    c: &mut Candidate,
) -> Result<bool, ::postgres::Error> {
    if p.policy.account_rate(&c.account).is_some() {
        lock_key(tx, RateKind::Account, &c.account)?;
    }
    let limits = p.policy.endpoint_limits(&c.endpoint);
    let cap = limits.and_then(|l| l.max_in_flight);
    let rated = limits.is_some_and(|l| l.rate.is_some() || l.adaptive && c.learned.is_some());
    let breaker = c.saturated_until.is_some() || c.failures > 0;
    if !(cap.is_some() || rated || breaker) {
        return Ok(true);
    }
    lock_key(tx, RateKind::Endpoint, &c.endpoint)?;
    let health = tx.query_typed_opt(
        &format!(
            "SELECT saturated_until, failures, probe_owner IS NOT NULL AND probe_expires_at > $2,
                    {LEARNED_COLUMNS}
             FROM endpoint_health WHERE endpoint = $1 FOR UPDATE"
        ),
        typed![c.endpoint => TEXT, p.now => INT8],
    )?;
    if let Some(h) = health {
        if h.try_get::<_, Option<bool>>(2)?.unwrap_or(false) {
            return Ok(false);
        }
        c.saturated_until = h.try_get(0)?;
        c.failures = h.try_get::<_, i64>(1)? as u32;
        c.learned = candidate::learned(
            h.try_get(3)?,
            h.try_get(4)?,
            h.try_get(5)?,
            h.try_get(6)?,
            h.try_get(7)?,
        );
    } else {
        (c.saturated_until, c.failures, c.learned) = (None, 0, None);
    }
    if let Some(cap) = cap {
        let in_flight: i64 = tx
            .query_typed_one(
                "SELECT count(*) FROM deliveries WHERE endpoint = $1 AND state = 'leased'",
                typed![c.endpoint => TEXT],
            )?
            .try_get(0)?;
        if in_flight >= i64::from(cap) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Endpoints at their in-flight cap (leases of every host), where no child
/// may start now: a first filter, read once per lease outside its
/// transactions, checked again under the endpoint's lock.
fn endpoints_at_cap(tx: &mut Client, p: &LeaseParams) -> Result<Vec<String>, ::postgres::Error> {
    let caps = p.policy.endpoints_with_in_flight_caps();
    if caps.is_empty() {
        return Ok(Vec::new());
    }
    let in_flight: std::collections::HashMap<String, i64> = tx
        .query_typed(
            "SELECT endpoint, count(*) FROM deliveries WHERE state = 'leased' GROUP BY endpoint",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, ::postgres::Error>>()?;
    Ok(caps
        .into_iter()
        .filter(|(endpoint, cap)| {
            in_flight
                .get(endpoint)
                .is_some_and(|&n| n >= i64::from(*cap))
        })
        .map(|(endpoint, _)| endpoint)
        .collect())
}

fn pick(
    tx: &mut Client,
    queue: Queue,
    blocked: &[String],
    now: i64,
) -> Result<Option<Candidate>, ::postgres::Error> {
    let sql = match queue {
        Queue::Ready => PICK_READY_SQL,
        Queue::Delayed => PICK_DELAYED_SQL,
    };
    let blocked = blocked.to_vec();
    tx.query_typed_opt(sql, typed![blocked => TEXT_ARRAY, now => INT8])?
        .map(|r| {
            Ok(Candidate {
                id: r.try_get(0)?,
                endpoint: r.try_get(1)?,
                account: r.try_get(2)?,
                reason: r.try_get(3)?,
                not_before: r.try_get(4)?,
                saturated_until: r.try_get(5)?,
                failures: r.try_get::<_, i64>(6)? as u32,
                learned: candidate::learned(
                    r.try_get(7)?,
                    r.try_get(8)?,
                    r.try_get(9)?,
                    r.try_get(10)?,
                    r.try_get(11)?,
                ),
                from: queue,
            })
        })
        .transpose()
}

fn tat(tx: &mut Client, kind: RateKind, key: &str) -> Result<Option<f64>, ::postgres::Error> {
    tx.query_typed_opt(
        "SELECT tat FROM rate_limits WHERE kind = $1 AND key = $2",
        typed![kind.as_str() => TEXT, key => TEXT],
    )?
    .map(|r| r.try_get(0))
    .transpose()
}

fn set_tat(tx: &mut Client, kind: RateKind, key: &str, tat: f64) -> Result<(), ::postgres::Error> {
    tx.execute_typed(
        "INSERT INTO rate_limits (kind, key, tat) VALUES ($1, $2, $3)
         ON CONFLICT (kind, key) DO UPDATE SET tat = excluded.tat",
        typed![kind.as_str() => TEXT, key => TEXT, tat => FLOAT8],
    )
    .map(drop)
}

/// Reroutes every ready delivery whose `$column` is $1 to the delayed queue
/// (reason $2), the k-th in priority order at $3 + k * $4, rounded up by a
/// millisecond (never earlier than the rate allows). Rows another
/// transaction holds are being leased or rerouted there: skipped.
macro_rules! reroute_ready_sql {
    ($column:literal) => {
        concat!(
            "UPDATE deliveries
             SET state = 'delayed', reason = $2, not_before = CAST(floor($3 + r.k * $4) AS BIGINT) + 1,
                 updated_at = $5
             FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, id) - 1 AS k
                   FROM (SELECT id, priority FROM deliveries WHERE state = 'ready' AND ",
            $column,
            " = $1 FOR UPDATE SKIP LOCKED) AS held) AS r
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
/// held by its rate, of their account's budget: charged already). Rows another
/// transaction holds are being leased or rerouted there: skipped.
fn reroute(tx: &mut Client, c: &Candidate, hold: &Hold, now: i64) -> Result<(), ::postgres::Error> {
    let reason = hold_reason(hold.reason);
    let moved = match c.from {
        Queue::Ready => {
            let sql = match hold.group {
                RateKind::Account => reroute_ready_sql!("account"),
                RateKind::Endpoint => reroute_ready_sql!("endpoint"),
            };
            tx.execute_typed(
                sql,
                typed![
                    c.key(hold.group) => TEXT,
                    reason => TEXT,
                    hold.first => FLOAT8,
                    hold.interval => FLOAT8,
                    now => INT8,
                ],
            )?
        }
        Queue::Delayed if hold.group == RateKind::Endpoint => tx.execute_typed(
            "UPDATE deliveries
             SET reason = $2, not_before = CAST(floor($3 + r.k * $4) AS BIGINT) + 1, updated_at = $5
             FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, not_before, id) - 1 AS k
                   FROM (SELECT id, priority, not_before FROM deliveries
                         WHERE endpoint = $1 AND state = 'delayed' AND not_before <= $5
                           AND NOT (coalesce(reason, '') = 'endpoint_rate' AND not_before >= $6)
                           AND ($8 OR coalesce(reason, '') <> 'account_budget' OR id = $7)
                         FOR UPDATE SKIP LOCKED) AS due) AS r
             WHERE deliveries.id = r.id",
            typed![
                c.endpoint => TEXT,
                reason => TEXT,
                hold.first => FLOAT8,
                hold.interval => FLOAT8,
                now => INT8,
                candidate::fresh_since(hold, now) => INT8,
                c.id => INT8,
                hold.rate.is_none() => BOOL,
            ],
        )?,
        Queue::Delayed => tx.execute_typed(
            "UPDATE deliveries SET reason = $2, not_before = CAST(floor($3) AS BIGINT) + 1, updated_at = $4
             WHERE id = $1",
            typed![c.id => INT8, reason => TEXT, hold.first => FLOAT8, now => INT8],
        )?,
    };
    if let Some((kind, rate, tat)) = hold.rate {
        let (_, new_tat) = saturation::reserve(rate, tat, moved);
        set_tat(tx, kind, c.key(kind), new_tat)?;
    }
    Ok(())
}

fn lease_candidate(
    tx: &mut Client,
    p: &LeaseParams,
    c: &Candidate,
    probe: bool,
) -> Result<Lease, ::postgres::Error> {
    let expires = p.now + p.lease_timeout_ms;
    let (boot_id, boot_expires) = match &p.boot {
        Some(boot) => (
            Some(boot.boot_id.as_str()),
            Some(boot.ms + p.lease_timeout_ms),
        ),
        None => (None, None),
    };
    // The delivery, its attempt and its message in one statement: one round
    // trip where SQLite's path takes three.
    let r = tx.query_typed_one(
        "WITH leased AS (
           UPDATE deliveries
           SET state = 'leased', reason = NULL, lease_owner = $2, lease_expires_at = $3,
               attempts = attempts + 1, updated_at = $4, lease_boot_id = $5, lease_boot_expires_at = $6
           WHERE id = $1
           RETURNING id, message_id, endpoint, attempts),
         attempt AS (
           INSERT INTO attempts (delivery_id, number, run_id, pid, lease_owner, started_at)
           SELECT id, attempts, $7, $8, $2, $4 FROM leased
           RETURNING id)
         SELECT leased.id, attempt.id, leased.attempts, leased.endpoint, m.uid, m.topic, m.account, m.payload,
                m.ordering_key
         FROM leased, attempt, messages m WHERE m.id = leased.message_id",
        typed![
            c.id => INT8,
            p.owner => TEXT,
            expires => INT8,
            p.now => INT8,
            boot_id => TEXT,
            boot_expires => INT8,
            p.run_id => INT8,
            i64::from(p.pid) => INT8,
        ],
    )?;
    if probe {
        // Half-open: this is the one request the endpoint gets until it answers.
        tx.execute_typed(
            "UPDATE endpoint_health SET probe_owner = $2, probe_expires_at = $3, updated_at = $4
             WHERE endpoint = $1",
            typed![c.endpoint => TEXT, p.owner => TEXT, expires => INT8, p.now => INT8],
        )?;
    }
    lease_from_row(&r, &p.owner)
}

/// A lease from (delivery id, attempt id, attempt number, endpoint, uid,
/// topic, account, payload, ordering key).
fn lease_from_row(r: &Row, owner: &str) -> Result<Lease, ::postgres::Error> {
    Ok(Lease {
        delivery_id: r.try_get(0)?,
        attempt_id: r.try_get(1)?,
        attempt: r.try_get::<_, i64>(2)? as u32,
        owner: owner.to_string(),
        endpoint: r.try_get(3)?,
        message_uid: r.try_get(4)?,
        topic: r.try_get(5)?,
        account: r.try_get(6)?,
        payload: r.try_get(7)?,
        ordering_key: r.try_get(8)?,
    })
}

/// Applies what an attempt says about its endpoint; returns the time the
/// endpoint is saturated until, when it is.
fn record_signal(tx: &mut Client, f: &FinishAttempt) -> Result<Option<i64>, ::postgres::Error> {
    match f.signal {
        EndpointSignal::Unknown => {
            tx.execute_typed(
                "UPDATE endpoint_health SET probe_owner = NULL WHERE endpoint = $1 AND probe_owner = $2",
                typed![f.endpoint => TEXT, f.owner => TEXT],
            )?;
            Ok(None)
        }
        EndpointSignal::Answered { answer_ms, limits } if limits.adaptive => {
            // The answer times without the endpoint's lock (every answer
            // of every host would wait on it; a lost update of an average
            // is harmless); lowering the rate takes it, and reads again.
            let previous = endpoint_health(tx, &f.endpoint, false)?.latency;
            learning::observe_answer(&mut Ops(tx), f, &limits, previous, answer_ms, |ops| {
                endpoint_health(ops.0, &f.endpoint, true)
            })?;
            tx.execute_typed(
                ENDPOINT_HEALTHY_SQL,
                typed![f.endpoint => TEXT, f.now => INT8, f.owner => TEXT],
            )?;
            Ok(None)
        }
        EndpointSignal::Healthy | EndpointSignal::Answered { .. } => {
            tx.execute_typed(
                ENDPOINT_HEALTHY_SQL,
                typed![f.endpoint => TEXT, f.now => INT8, f.owner => TEXT],
            )?;
            Ok(None)
        }
        EndpointSignal::Saturated {
            retry_after,
            limits,
            slows,
        } => {
            let health = endpoint_health(tx, &f.endpoint, true)?;
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
            let health = endpoint_health(tx, &f.endpoint, true)?;
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
            tx.execute_typed(
                "INSERT INTO endpoint_health (endpoint, silent, updated_at) VALUES ($1, 1, $2)
                 ON CONFLICT (endpoint) DO UPDATE
                 SET silent = endpoint_health.silent + 1, updated_at = excluded.updated_at",
                typed![f.endpoint => TEXT, f.now => INT8],
            )?;
            Ok(None)
        }
    }
}

/// An endpoint's breaker, learned rate and answer times; `locked`, under
/// its advisory lock and with its row locked: children of every host
/// finishing at once count their signals one after another.
fn endpoint_health(
    tx: &mut Client,
    endpoint: &str,
    locked: bool,
) -> Result<Health, ::postgres::Error> {
    if locked {
        lock_key(tx, RateKind::Endpoint, endpoint)?;
    }
    let lock = if locked { "FOR UPDATE" } else { "" };
    tx.query_typed_opt(
        &format!("SELECT {HEALTH_COLUMNS} FROM endpoint_health WHERE endpoint = $1 {lock}"),
        typed![endpoint => TEXT],
    )?
    .map(|r| {
        Ok::<_, ::postgres::Error>(Health {
            saturated_until: r.try_get(0)?,
            failures: r.try_get::<_, i64>(1)? as u32,
            silent: r.try_get::<_, i64>(2)? as u32,
            learned: candidate::learned(
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
                r.try_get(6)?,
                r.try_get(7)?,
            ),
            latency: candidate::latency(r.try_get(8)?, r.try_get(9)?),
        })
    })
    .transpose()
    .map(Option::unwrap_or_default)
}

/// Opens (or keeps open) an endpoint's breaker on a saturation signal, from
/// its state, recording `error`; returns the time it is saturated until.
fn open_breaker(
    tx: &mut Client,
    f: &FinishAttempt,
    limits: &EndpointLimits,
    retry_after: Option<Duration>,
    health: &Health,
    error: Option<&str>,
) -> Result<i64, ::postgres::Error> {
    let (until, failures) = saturation::open_breaker(
        limits,
        retry_after,
        f.now,
        health.saturated_until,
        health.failures,
    );
    tx.execute_typed(
        "INSERT INTO endpoint_health (endpoint, saturated_until, failures, last_error, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (endpoint) DO UPDATE SET
             saturated_until = excluded.saturated_until, failures = excluded.failures,
             last_error = excluded.last_error, probe_owner = NULL, probe_expires_at = NULL,
             silent = 0, updated_at = excluded.updated_at",
        typed![
            f.endpoint => TEXT,
            until => INT8,
            i64::from(failures) => INT8,
            error => TEXT,
            f.now => INT8,
        ],
    )?;
    Ok(until)
}

/// The learned-rate operations (`learning`) in a PostgreSQL transaction,
/// under the endpoint's advisory lock.
struct Ops<'a>(&'a mut Client);

impl RateOps for Ops<'_> {
    type Error = ::postgres::Error;

    fn set_learned(
        &mut self,
        endpoint: &str,
        learned: Option<&Learned>,
        now: i64,
    ) -> Result<(), ::postgres::Error> {
        self.0
            .execute_typed(
                "INSERT INTO endpoint_health (endpoint, learned_rate, rate_ceiling, rate_changed_at, rate_reason,
                                              rate_decreased_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (endpoint) DO UPDATE SET
                     learned_rate = excluded.learned_rate, rate_ceiling = excluded.rate_ceiling,
                     rate_changed_at = excluded.rate_changed_at, rate_reason = excluded.rate_reason,
                     rate_decreased_at = excluded.rate_decreased_at, updated_at = excluded.updated_at",
                typed![
                    endpoint => TEXT,
                    learned.map(|l| l.rate) => FLOAT8,
                    learned.map(|l| l.ceiling) => FLOAT8,
                    learned.map(|l| l.changed_at) => INT8,
                    learned.map(|l| l.reason.as_str()) => TEXT,
                    learned.map(|l| l.decreased_at) => INT8,
                    now => INT8,
                ],
            )
            .map(drop)
    }

    fn earliest_slot(&mut self, endpoint: &str) -> Result<Option<f64>, ::postgres::Error> {
        self.0
            .query_typed_one(
                "SELECT min(not_before)::float8 FROM deliveries
                 WHERE endpoint = $1 AND state = 'delayed' AND reason = 'endpoint_rate'",
                typed![endpoint => TEXT],
            )?
            .try_get(0)
    }

    fn respace(
        &mut self,
        endpoint: &str,
        first: f64,
        interval: f64,
        limit: Option<u64>,
        now: i64,
    ) -> Result<u64, ::postgres::Error> {
        // Rows another transaction holds are being leased: they keep
        // their slots, and count in the numbering of the others (which
        // would otherwise take the same slots).
        let limit = limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let last = self.0.query_typed_one(
            "WITH moved AS (
             UPDATE deliveries SET not_before = CAST(floor($2 + r.k * $3) AS BIGINT) + 1, updated_at = $4
             FROM (SELECT id, row_number() OVER (ORDER BY not_before, id) - 1 AS k
                   FROM deliveries
                   WHERE endpoint = $1 AND state = 'delayed' AND reason = 'endpoint_rate'
                   ORDER BY not_before, id LIMIT $5) AS r
             WHERE deliveries.id = r.id
               AND deliveries.id IN (SELECT id FROM deliveries
                                     WHERE endpoint = $1 AND state = 'delayed' AND reason = 'endpoint_rate'
                                     FOR UPDATE SKIP LOCKED)
             RETURNING r.k)
             SELECT max(k) FROM moved",
            typed![endpoint => TEXT, first => FLOAT8, interval => FLOAT8, now => INT8, limit => INT8],
        )?;
        // How many slots the numbering covered (up to the last moved).
        Ok(last
            .try_get::<_, Option<i64>>(0)?
            .map_or(0, |k| k as u64 + 1))
    }

    fn release_slots(&mut self, endpoint: &str, now: i64) -> Result<(), ::postgres::Error> {
        self.0
            .execute_typed(
                "UPDATE deliveries SET state = 'ready', reason = NULL, not_before = $2, updated_at = $2
                 WHERE id IN (SELECT id FROM deliveries
                              WHERE endpoint = $1 AND state = 'delayed' AND reason = 'endpoint_rate'
                              FOR UPDATE SKIP LOCKED)",
                typed![endpoint => TEXT, now => INT8],
            )
            .map(drop)
    }

    fn set_tat(&mut self, endpoint: &str, tat: f64) -> Result<(), ::postgres::Error> {
        set_tat(self.0, RateKind::Endpoint, endpoint, tat)
    }

    fn took_last_second(&mut self, endpoint: &str, now: i64) -> Result<u64, ::postgres::Error> {
        self.0
            .query_typed_one(
                "SELECT count(*) FROM deliveries
                 WHERE state = 'delivered' AND updated_at > $2 - 1000 AND endpoint = $1",
                typed![endpoint => TEXT, now => INT8],
            )?
            .try_get::<_, i64>(0)
            .map(|n| n as u64)
    }

    fn has_backlog(&mut self, endpoint: &str) -> Result<bool, ::postgres::Error> {
        self.0
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE endpoint = $1 AND state = 'ready')
                     OR EXISTS (SELECT 1 FROM deliveries
                                WHERE endpoint = $1 AND state = 'delayed'
                                  AND reason IN ('endpoint_rate', 'endpoint_saturated'))",
                typed![endpoint => TEXT],
            )?
            .try_get(0)
    }

    fn set_latency(
        &mut self,
        endpoint: &str,
        latency: &Latency,
        now: i64,
    ) -> Result<(), ::postgres::Error> {
        self.0
            .execute_typed(
                "INSERT INTO endpoint_health (endpoint, latency_ms, latency_base_ms, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (endpoint) DO UPDATE SET latency_ms = excluded.latency_ms,
                     latency_base_ms = excluded.latency_base_ms, updated_at = excluded.updated_at",
                typed![
                    endpoint => TEXT,
                    latency.recent_ms => FLOAT8,
                    latency.base_ms => FLOAT8,
                    now => INT8,
                ],
            )
            .map(drop)
    }
}

impl PostgresStore {
    pub(super) fn leases_reclaim_expired(&mut self, p: &ReclaimParams) -> Result<usize> {
        // On the boot (host) that took it, the boot clock says when a lease
        // expired; otherwise (another host, no boot clock) the wall clock.
        const EXPIRED: &str = "state = 'leased' AND CASE WHEN lease_boot_id = $2 \
             THEN lease_boot_expires_at <= $3 ELSE lease_expires_at <= $1 END";
        let (boot_id, boot_now) = match &p.boot {
            Some(boot) => (Some(boot.boot_id.clone()), Some(boot.ms)),
            None => (None, None),
        };
        let now = p.now;
        self.write(|tx| {
            // The expired leases, locked: hosts reclaiming at once each take
            // their own, and a finishing child's row is not waited for.
            let ids: Vec<i64> = tx
                .query_typed(
                    &format!("SELECT id FROM deliveries WHERE {EXPIRED} FOR UPDATE SKIP LOCKED"),
                    typed![now => INT8, boot_id => TEXT, boot_now => INT8],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(0);
            }
            tx.execute_typed(
                "UPDATE attempts SET outcome = $2, finished_at = $1, error = 'lease expired before the child finished'
                 WHERE outcome = $3 AND delivery_id = ANY($4)",
                typed![
                    now => INT8,
                    outcome::LEASE_EXPIRED => TEXT,
                    outcome::IN_FLIGHT => TEXT,
                    ids => INT8_ARRAY,
                ],
            )?;
            tx.execute_typed(
                "UPDATE deliveries
                 SET state = 'ready', lease_owner = NULL, lease_expires_at = NULL, lease_boot_id = NULL,
                     lease_boot_expires_at = NULL, reason = NULL, not_before = $1, updated_at = $1,
                     last_error = 'lease expired'
                 WHERE id = ANY($2)",
                typed![now => INT8, ids => INT8_ARRAY],
            )
            .map(|n| n as usize)
        })
    }

    pub(super) fn deliveries_expire(&mut self, p: &ExpireParams) -> Result<ExpireReport> {
        let batch = i64::try_from(p.batch).unwrap_or(i64::MAX);
        self.write(|tx| {
            // The batch: the earliest expired, by the partial index, locked
            // (a child leasing one of them meanwhile is skipped, and skips it).
            let r = tx.query_typed_one(
                "WITH batch AS (
                   SELECT d.id, coalesce(s.discard_expired, false) AS discard
                   FROM deliveries d JOIN messages m ON m.id = d.message_id
                   LEFT JOIN subscriptions s ON s.topic = m.topic AND s.endpoint = d.endpoint
                   WHERE d.expires_at IS NOT NULL AND d.state IN ('ready', 'delayed') AND d.expires_at <= $1
                   ORDER BY d.expires_at LIMIT $2
                   FOR UPDATE OF d SKIP LOCKED),
                 discarded AS (
                   DELETE FROM deliveries WHERE id IN (SELECT id FROM batch WHERE discard) RETURNING 1),
                 expired AS (
                   UPDATE deliveries
                   SET state = 'dead', reason = $3, not_before = $1, updated_at = $1,
                       last_error = 'its time to live ran out before it was delivered'
                   WHERE id IN (SELECT id FROM batch WHERE NOT discard) RETURNING 1)
                 SELECT (SELECT count(*) FROM expired), (SELECT count(*) FROM discarded)",
                typed![p.now => INT8, batch => INT8, reason::EXPIRED => TEXT],
            )?;
            Ok(ExpireReport {
                expired: r.try_get::<_, i64>(0)? as u64,
                discarded: r.try_get::<_, i64>(1)? as u64,
            })
        })
    }

    pub(super) fn leasable_count(&mut self, now: i64, limit: u64) -> Result<u64> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            c.query_typed_one(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                               WHERE state = 'ready' AND (expires_at IS NULL OR expires_at > $1)
                                               LIMIT $2) r)
                      + (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                               WHERE state = 'delayed' AND not_before <= $1
                                                 AND (expires_at IS NULL OR expires_at > $1) LIMIT $2) d)",
                typed![now => INT8, limit => INT8],
            )?
            .try_get::<_, i64>(0)
        })
        .map(|n| (n as u64).min(limit as u64))
    }

    pub(super) fn attempts_in_flight(&mut self, run_id: i64) -> Result<u64> {
        self.read(|c| {
            c.query_typed_one(
                "SELECT count(*) FROM attempts WHERE run_id = $1 AND outcome = $2",
                typed![run_id => INT8, outcome::IN_FLIGHT => TEXT],
            )?
            .try_get::<_, i64>(0)
        })
        .map(|n| n as u64)
    }

    pub(super) fn deliveries_next_due(&mut self, now: i64) -> Result<Option<i64>> {
        self.read(|c| {
            c.query_typed_one(
                "SELECT least(
                   (SELECT min(not_before) FROM deliveries
                    WHERE state = 'delayed' AND not_before > $1 AND not_before < $2),
                   (SELECT min(lease_expires_at) FROM deliveries WHERE state = 'leased'))",
                typed![now => INT8, PARKED_UNTIL => INT8],
            )?
            .try_get(0)
        })
    }

    pub(super) fn delivery_lease_next(&mut self, p: &LeaseParams) -> Result<Option<Lease>> {
        // Columns are typed here: no row can be undecodable, as a row
        // written with plain SQL into SQLite can.
        let mut blocked = if p.policy.endpoints_with_in_flight_caps().is_empty() {
            Vec::new()
        } else {
            self.read(|c| endpoints_at_cap(c, p))?
        };
        for _ in 0..MAX_REROUTES {
            match self.write(|tx| lease_step(tx, p, &blocked))? {
                Step::Leased(lease) => return Ok(Some(lease)),
                Step::Empty => return Ok(None),
                Step::Skipped(endpoint) | Step::Rerouted(Some(endpoint)) => blocked.push(endpoint),
                Step::Rerouted(None) => {}
            }
        }
        Ok(None)
    }

    pub(super) fn lease_by_owner(&mut self, owner: &str) -> Result<Option<Lease>> {
        self.read(|c| {
            c.query_typed_opt(
                "SELECT d.id, a.id, d.attempts, d.endpoint, m.uid, m.topic, m.account, m.payload,
                        m.ordering_key
                 FROM deliveries d JOIN attempts a ON a.delivery_id = d.id JOIN messages m ON m.id = d.message_id
                 WHERE d.state = 'leased' AND d.lease_owner = $1 AND a.lease_owner = $1",
                typed![owner => TEXT],
            )?
            .map(|r| lease_from_row(&r, owner))
            .transpose()
        })
    }

    pub(super) fn attempt_finish(&mut self, f: &FinishAttempt) -> Result<bool> {
        if matches!(f.signal, EndpointSignal::Healthy | EndpointSignal::Unknown)
            && f.releases_key().is_none()
        {
            return self.attempt_finish_in_one_statement(f);
        }
        let http_status = f.http_status.map(i64::from);
        self.write(|tx| {
            // A child that lost its lease says nothing about the endpoint any
            // more: its signal could close a breaker another child opened,
            // or clear another child's probe. The row stays locked until
            // the end, so its lease cannot be reclaimed meanwhile.
            let owner = tx
                .query_typed_opt(
                    "SELECT 1 FROM deliveries WHERE id = $1 AND state = 'leased' AND lease_owner = $2
                     FOR UPDATE",
                    typed![f.delivery_id => INT8, f.owner => TEXT],
                )?
                .is_some();
            let moved = owner && {
                let saturated_until = record_signal(tx, f)?;
                let (state, not_before, reason) = f.moves_to(saturated_until);
                tx.execute_typed(
                    finish_delivery_sql!(),
                    typed![
                        f.delivery_id => INT8,
                        f.owner => TEXT,
                        state.as_str() => TEXT,
                        not_before => INT8,
                        reason => TEXT,
                        http_status => INT8,
                        f.error => TEXT,
                        f.now => INT8,
                    ],
                )? == 1
            };
            if moved && let Some(key) = f.releases_key() {
                super::release_key(tx, &f.endpoint, key, f.now)?;
            }
            let outcome = if moved {
                f.outcome.as_str()
            } else {
                outcome::LEASE_LOST
            };
            tx.execute_typed(
                "UPDATE attempts SET finished_at = $2, outcome = $3, http_status = $4, error = $5, duration_ms = $6
                 WHERE id = $1",
                typed![
                    f.attempt_id => INT8,
                    f.now => INT8,
                    outcome => TEXT,
                    http_status => INT8,
                    f.error => TEXT,
                    f.duration_ms => INT8,
                ],
            )?;
            Ok(moved)
        })
    }

    /// [`PostgresStore::attempt_finish`] of an attempt whose endpoint is
    /// not saturated (nearly all): the move, the breaker's close or the
    /// probe's release, and the attempt, in one statement (one round trip,
    /// its own transaction). Each part happens only if the lease was still
    /// the owner's, as in the transaction above. Without a transaction it
    /// has no lock_timeout: only a lock held by hand on its delivery or
    /// breaker row makes it wait, and the child is killed at its deadline;
    /// its server backend may then still run it (a backend notices a gone
    /// client only between statements), so it leaves an attempt the parent
    /// settled (`child_died`) as it is; a late child's own finish still
    /// records `lease_lost` over `lease_expired`, as on SQLite.
    fn attempt_finish_in_one_statement(&mut self, f: &FinishAttempt) -> Result<bool> {
        let http_status = f.http_status.map(i64::from);
        let (state, not_before, reason) = f.moves_to(None);
        let healthy = matches!(f.signal, EndpointSignal::Healthy);
        self.write_one(|c| {
            c.query_typed_one(
                concat!(
                    "WITH moved AS (",
                    finish_delivery_sql!(),
                    " RETURNING id),
                 closed AS (
                   UPDATE endpoint_health
                   SET failures = 0, saturated_until = NULL, probe_owner = NULL, probe_expires_at = NULL,
                       silent = 0, updated_at = $8
                   WHERE $9 AND endpoint = $10 AND (probe_owner = $2 OR (failures = 0 AND silent > 0))
                     AND EXISTS (SELECT 1 FROM moved)),
                 released AS (
                   UPDATE endpoint_health SET probe_owner = NULL
                   WHERE NOT $9 AND endpoint = $10 AND probe_owner = $2 AND EXISTS (SELECT 1 FROM moved)),
                 attempt AS (
                   UPDATE attempts
                   SET finished_at = $8, http_status = $6, error = $7, duration_ms = $13,
                       outcome = CASE WHEN EXISTS (SELECT 1 FROM moved) THEN $11 ELSE $12 END
                   WHERE id = $14 AND outcome IN ('in_flight', 'lease_expired'))
                 SELECT EXISTS (SELECT 1 FROM moved)"
                ),
                typed![
                    f.delivery_id => INT8,
                    f.owner => TEXT,
                    state.as_str() => TEXT,
                    not_before => INT8,
                    reason => TEXT,
                    http_status => INT8,
                    f.error => TEXT,
                    f.now => INT8,
                    healthy => BOOL,
                    f.endpoint => TEXT,
                    f.outcome.as_str() => TEXT,
                    outcome::LEASE_LOST => TEXT,
                    f.duration_ms => INT8,
                    f.attempt_id => INT8,
                ],
            )?
            .try_get(0)
        })
    }
}
