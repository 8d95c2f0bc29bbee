//! Statements both backends run as written, their parameters named by the
//! caller (`?N` for SQLite, `$N` for PostgreSQL): the routing of a batch
//! and a requeue's pick and move. The SQL of ordering keys is in
//! `ordering`.

use super::ordering;
use super::reason;

/// Routes a batch: one delivery per message that `batch` (a condition on
/// `m`) selects and endpoint subscribing to its topic, ready, or delayed
/// until its message's `available_at` (`scheduled`), or waiting for its
/// ordering key (`ordering`, parked at `parked`); with its expiry (its
/// message's own, or its topic's `max_age`). `waits` is decided once per
/// new delivery (materialized), not once per column that reads it.
pub(super) fn route_batch_sql(batch: &str, now: &str, parked: &str) -> String {
    format!(
        "WITH new AS MATERIALIZED (
           SELECT m.id AS message_id, s.endpoint, m.account, m.priority, m.available_at,
                  coalesce(m.expires_at, m.created_at + s.max_age_ms) AS expires_at,
                  m.ordering_key, {waits} AS waits
           FROM messages m JOIN subscriptions s ON s.topic = m.topic
           WHERE {batch})
         INSERT INTO deliveries
           (message_id, endpoint, account, state, priority, not_before, reason, created_at,
            updated_at, expires_at, ordering_key)
         SELECT message_id, endpoint, account,
                CASE WHEN waits OR available_at > {now} THEN 'delayed' ELSE 'ready' END,
                priority,
                CASE WHEN waits THEN {parked} WHEN available_at > {now} THEN available_at ELSE {now} END,
                CASE WHEN waits THEN '{ordering}' WHEN available_at > {now} THEN '{scheduled}' END,
                {now}, {now}, expires_at, ordering_key
         FROM new WHERE true ORDER BY message_id, endpoint
         ON CONFLICT (message_id, endpoint) DO NOTHING",
        waits = ordering::key_waits(),
        ordering = reason::ORDERING,
        scheduled = reason::SCHEDULED,
    )
}

/// What a requeue may pick, besides its filter: dead or delayed, not
/// waiting for its key, and not expired (by its reason, or its time to
/// live run out since) unless `expired`, an SQL boolean, says so.
pub(super) fn requeue_candidates_sql(expired: &str, now: &str) -> String {
    format!(
        "d.state IN ('dead', 'delayed') AND coalesce(d.reason, '') <> 'ordering'
         AND ({expired} OR (coalesce(d.reason, '') <> 'expired'
                            AND (d.expires_at IS NULL OR d.expires_at > {now})))"
    )
}

/// The UPDATE of a requeue, after `WITH picked (id, wait_ms)`: each picked
/// delivery back to the ready queue, or to the delayed one (`scheduled`)
/// until `now + wait_ms`; a keyed one to its key's line (`ordering`), its
/// slot kept in `release_at` for the release that follows, which moves
/// the line on in order; an expired one's expiry lifted (requeued by name,
/// it is sent late); attempts counted afresh. `now` is the backend's
/// parameter (SQLite's anonymous ones are given once per use).
pub(super) fn requeue_picked_sql(parked: &str, now: [&str; 4]) -> String {
    let [now1, now2, now3, now4] = now;
    format!(
        "UPDATE deliveries
         SET state = CASE WHEN ordering_key IS NOT NULL OR picked.wait_ms > 0 THEN 'delayed' ELSE 'ready' END,
             reason = CASE WHEN ordering_key IS NOT NULL THEN '{ordering}'
                           WHEN picked.wait_ms > 0 THEN '{scheduled}' END,
             not_before = CASE WHEN ordering_key IS NOT NULL THEN {parked} ELSE {now1} + picked.wait_ms END,
             release_at = CASE WHEN ordering_key IS NOT NULL THEN {now2} + picked.wait_ms END,
             expires_at = CASE WHEN reason = 'expired' OR expires_at <= {now3} THEN NULL ELSE expires_at END,
             attempts = 0, updated_at = {now4}
         FROM picked WHERE deliveries.id = picked.id",
        ordering = reason::ORDERING,
        scheduled = reason::SCHEDULED,
    )
}
