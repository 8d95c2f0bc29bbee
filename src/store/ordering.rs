//! The SQL of ordering keys, written once for both backends: whether a key
//! is busy, whether a new delivery waits for its key, and the release of a
//! key's next delivery. Only one delivery per (endpoint, key) is in
//! progress; the others wait (delayed, reason `ordering`, parked) in
//! publication order. Each lookup names its states, so it seeks the
//! partial indexes `deliveries_keys` and `deliveries_waiting` and never
//! walks a key's delivered history.

/// Whether key `key` of endpoint `endpoint` (SQL expressions) is busy: a
/// delivery of it is in progress (ready, leased, delayed for anything but
/// its key), or a dead one blocks it where the endpoint says
/// `on_dead = "block"`.
pub(super) fn key_busy(endpoint: &str, key: &str) -> String {
    let of_key = format!(
        "o.endpoint = {endpoint} AND o.ordering_key = {key} AND o.ordering_key IS NOT NULL
         AND coalesce(o.reason, '') <> 'ordering'"
    );
    // The endpoint's setting first: where dead releases (the default), a
    // key's dead letters are never looked at.
    format!(
        "(EXISTS (SELECT 1 FROM deliveries o WHERE {of_key} AND o.state IN ('ready', 'delayed', 'leased'))
          OR (EXISTS (SELECT 1 FROM subscriptions b
                      WHERE b.endpoint = {endpoint} AND b.ordering_on_dead = 'block')
              AND EXISTS (SELECT 1 FROM deliveries o WHERE {of_key} AND o.state = 'dead')))"
    )
}

/// Whether a new delivery (of message `m` to `s.endpoint`) waits for its
/// ordering key: the key is busy, has deliveries waiting already, or an
/// earlier message of the key that the endpoint subscribes to is not
/// routed yet (on PostgreSQL, another host may be routing it).
pub(super) fn key_waits() -> String {
    format!(
        "(m.ordering_key IS NOT NULL AND ({busy}
           OR EXISTS (SELECT 1 FROM deliveries w
                      WHERE w.endpoint = s.endpoint AND w.ordering_key = m.ordering_key
                        AND w.state = 'delayed' AND w.reason = 'ordering')
           OR EXISTS (SELECT 1 FROM messages p JOIN subscriptions ps ON ps.topic = p.topic
                      WHERE p.ordering_key = m.ordering_key AND p.routed_at IS NULL AND p.id < m.id
                        AND ps.endpoint = s.endpoint)))",
        busy = key_busy("s.endpoint", "m.ordering_key")
    )
}

/// How a backend writes what the release statement needs.
pub(super) struct Dialect {
    /// The parameters: now, then (for one key) the endpoint and the key.
    pub params: [&'static str; 3],
    /// The larger of two values (`max` in SQLite, `greatest` in PostgreSQL).
    pub greatest: &'static str,
    /// What makes the scan of waiting keys use `deliveries_waiting`
    /// (SQLite's planner prefers `deliveries_queue`, which walks every
    /// delayed delivery, held-back backlogs too).
    pub waiting_index: &'static str,
}

/// Moves the earliest waiting delivery of each key that is not busy (of
/// one key, with `one_key`) out of `ordering`: to the ready queue, or to
/// the delayed one (`scheduled`) while its own `release_at` (a requeue's
/// slot), or else its message's `available_at`, is ahead. The row is
/// checked again as it is updated: one another transaction moved meanwhile
/// (expired it, say) is left as it is. (Only `ordering` rows are
/// `ordering`, and are delayed; the check is an expression so that
/// SQLite's planner does not drive the update from an index on state.)
pub(super) fn release_keys_sql(d: &Dialect, one_key: bool) -> String {
    let [now, endpoint, key] = d.params;
    let (greatest, waiting_index) = (d.greatest, d.waiting_index);
    let only = if one_key {
        format!("AND endpoint = {endpoint} AND ordering_key = {key}")
    } else {
        String::new()
    };
    format!(
        "UPDATE deliveries
         SET state = CASE WHEN r.due > {now} THEN 'delayed' ELSE 'ready' END,
             reason = CASE WHEN r.due > {now} THEN 'scheduled' END,
             not_before = {greatest}({now}, r.due), release_at = NULL, updated_at = {now}
         FROM (SELECT w.id, coalesce(w.release_at, m.available_at, 0) AS due
               FROM (SELECT DISTINCT endpoint, ordering_key FROM deliveries {waiting_index}
                     WHERE state = 'delayed' AND reason = 'ordering' {only}) AS k
               JOIN deliveries w ON w.id = (SELECT f.id FROM deliveries f
                                            WHERE f.endpoint = k.endpoint AND f.ordering_key = k.ordering_key
                                              AND f.state = 'delayed' AND f.reason = 'ordering'
                                            ORDER BY f.message_id LIMIT 1)
               JOIN messages m ON m.id = w.message_id
               WHERE NOT {busy}) AS r
         WHERE deliveries.id = r.id AND coalesce(deliveries.reason, '') = 'ordering'",
        busy = key_busy("k.endpoint", "k.ordering_key")
    )
}
