//! The admin side of the PostgreSQL store: what `stats`, `list`, `show`,
//! `requeue` and `purge` read and write, and the run totals for metrics.
//! (`backup` is pg_dump's job on PostgreSQL.)

use super::*;
use crate::store::candidate::{LEARNED_COLUMNS, learned};

impl PostgresStore {
    pub(super) fn deliveries_restore_endpoints(
        &mut self,
        endpoints: &[String],
        now: i64,
    ) -> Result<u64> {
        let endpoints = endpoints.to_vec();
        self.write(|tx| {
            tx.execute_typed(
                "UPDATE deliveries SET state = 'ready', reason = NULL, not_before = $2, updated_at = $2
                 WHERE reason = 'endpoint_removed' AND state = 'delayed' AND endpoint = ANY($1)",
                typed![endpoints => TEXT_ARRAY, now => INT8],
            )
        })
    }

    pub(super) fn deliveries_purge_orphaned(&mut self, p: &PurgeOrphanedParams) -> Result<u64> {
        let which = "reason IN ('endpoint_removed', 'ordering') AND state = 'delayed'
                     AND ($1::TEXT IS NULL OR endpoint = $1) AND endpoint <> ALL($2)";
        let configured = p.configured.clone();
        self.write(|tx| {
            let values = typed![p.endpoint => TEXT, configured => TEXT_ARRAY];
            if p.dry_run {
                let n: i64 = tx
                    .query_typed_one(
                        &format!("SELECT count(*) FROM deliveries WHERE {which}"),
                        values,
                    )?
                    .try_get(0)?;
                return Ok(n as u64);
            }
            tx.execute_typed(&format!("DELETE FROM deliveries WHERE {which}"), values)
        })
    }

    pub(super) fn run_totals(&mut self) -> Result<RunTotals> {
        self.read(|c| {
            let r = c.query_typed_one(
                "SELECT count(*), coalesce(sum(routed), 0)::BIGINT, coalesce(sum(reclaimed), 0)::BIGINT,
                        coalesce(sum(forked), 0)::BIGINT, coalesce(sum(delivered), 0)::BIGINT,
                        coalesce(sum(retried), 0)::BIGINT, coalesce(sum(dead), 0)::BIGINT,
                        coalesce(sum(failed), 0)::BIGINT, coalesce(sum(found_nothing), 0)::BIGINT,
                        coalesce(sum(expired), 0)::BIGINT, coalesce(sum(discarded), 0)::BIGINT
                 FROM runs",
                &[],
            )?;
            let n = |i: usize| r.try_get::<_, i64>(i).map(|n| n as u64);
            Ok(RunTotals {
                runs: n(0)?,
                sums: RunRecord {
                    routed: n(1)?,
                    reclaimed: n(2)?,
                    forked: n(3)?,
                    delivered: n(4)?,
                    retried: n(5)?,
                    dead: n(6)?,
                    failed: n(7)?,
                    found_nothing: n(8)?,
                    expired: n(9)?,
                    discarded: n(10)?,
                    ..RunRecord::default()
                },
            })
        })
    }

    pub(super) fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>> {
        self.read(|c| {
            c.query_typed_opt(
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.id = $1"),
                typed![id => INT8],
            )?
            .map(|r| delivery_row(&r))
            .transpose()
        })
    }

    pub(super) fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>> {
        self.read(|c| {
            c.query_typed(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.message_id = $1 ORDER BY d.endpoint"
                ),
                typed![message_id => INT8],
            )?
            .iter()
            .map(delivery_row)
            .collect()
        })
    }

    pub(super) fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>> {
        self.read(|c| {
            c.query_typed(
                "SELECT id, delivery_id, number, run_id, pid, started_at, finished_at, outcome, http_status,
                        error, duration_ms
                 FROM attempts WHERE delivery_id = $1 ORDER BY id",
                typed![delivery_id => INT8],
            )?
            .iter()
            .map(|r| {
                Ok(AttemptRow {
                    id: r.try_get(0)?,
                    delivery_id: r.try_get(1)?,
                    number: r.try_get::<_, i64>(2)? as u32,
                    run_id: r.try_get(3)?,
                    pid: r.try_get::<_, i64>(4)? as u32,
                    started_at: r.try_get(5)?,
                    finished_at: r.try_get(6)?,
                    outcome: r.try_get(7)?,
                    http_status: r.try_get::<_, Option<i64>>(8)?.map(|s| s as u16),
                    error: r.try_get(9)?,
                    duration_ms: r.try_get(10)?,
                })
            })
            .collect()
        })
    }

    pub(super) fn deliveries_list(
        &mut self,
        filter: &DeliveryFilter,
        limit: u64,
    ) -> Result<Vec<ListedDelivery>> {
        let (clause, values) = filter_clause(filter, 1);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS}, m.topic, d.created_at, m.uid
             FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE {clause} ORDER BY d.id LIMIT ${}",
            values.len() + 1
        );
        self.read(|c| {
            let mut params = typed_values(&values);
            params.push((&limit, Type::INT8));
            c.query_typed(&sql, &params)?
                .iter()
                .map(|r| {
                    Ok(ListedDelivery {
                        delivery: delivery_row(r)?,
                        topic: r.try_get(15)?,
                        created_at: r.try_get(16)?,
                        uid: r.try_get(17)?,
                    })
                })
                .collect()
        })
    }

    pub(super) fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>> {
        let (id, uid) = match key {
            MessageKey::Id(id) => (Some(*id), None),
            MessageKey::Uid(uid) => (None, Some(uid.as_str())),
        };
        self.read(|c| {
            c.query_typed_opt(
                "SELECT id, uid, topic, account, payload, priority, created_at, available_at, dedup_key, routed_at,
                        route_error, expires_at, ordering_key
                 FROM messages WHERE id = $1 OR uid = $2",
                typed![id => INT8, uid => TEXT],
            )?
            .map(|r| {
                Ok(MessageRow {
                    id: r.try_get(0)?,
                    uid: r.try_get(1)?,
                    topic: r.try_get(2)?,
                    account: r.try_get(3)?,
                    payload: r.try_get(4)?,
                    priority: r.try_get(5)?,
                    created_at: r.try_get(6)?,
                    available_at: r.try_get(7)?,
                    dedup_key: r.try_get(8)?,
                    routed_at: r.try_get(9)?,
                    route_error: r.try_get(10)?,
                    expires_at: r.try_get(11)?,
                    ordering_key: r.try_get(12)?,
                })
            })
            .transpose()
        })
    }

    pub(super) fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64> {
        self.write(|tx| {
            if dry_run {
                let n: i64 = tx
                    .query_typed_one(
                        "SELECT count(*) FROM messages WHERE route_error IS NOT NULL",
                        &[],
                    )?
                    .try_get(0)?;
                return Ok(n as u64);
            }
            tx.execute_typed(
                "UPDATE messages SET routed_at = NULL, route_error = NULL WHERE route_error IS NOT NULL",
                &[],
            )
        })
    }

    pub(super) fn deliveries_requeue(&mut self, p: &RequeueParams) -> Result<u64> {
        // $1: the limit, $2: the spacing, $3: expired too, $4: now, then
        // the filter's values, then parked (which a dry run leaves out).
        let (clause, values) = filter_clause(&p.filter, 5);
        let parked = values.len() + 5;
        let limit = p.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        // The n-th picked (from 0, oldest first) is due `wait_ms` = n *
        // spacing from now.
        let picked = format!(
            "SELECT id, (row_number() OVER (ORDER BY id) - 1) * $2 AS wait_ms FROM (
               SELECT d.id FROM deliveries d JOIN messages m ON m.id = d.message_id
               WHERE {} AND {clause}
               ORDER BY d.id LIMIT $1
               FOR UPDATE OF d) AS rows",
            shared::requeue_candidates_sql("$3", "$4")
        );
        self.write(|tx| {
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
                (&limit, Type::INT8),
                (&p.spacing_ms, Type::INT8),
                (&p.expired, Type::BOOL),
                (&p.now, Type::INT8),
            ];
            params.extend(typed_values(&values));
            if p.dry_run {
                let n: i64 = tx
                    .query_typed_one(&format!("SELECT count(*) FROM ({picked}) AS p"), &params)?
                    .try_get(0)?;
                return Ok(n as u64);
            }
            params.push((&PARKED_UNTIL, Type::INT8));
            let update = shared::requeue_picked_sql(&format!("${parked}"), ["$4"; 4]);
            let moved =
                tx.execute_typed(&format!("WITH picked AS ({picked}) {update}"), &params)?;
            super::release_keys(tx, p.now)?;
            Ok(moved)
        })
    }

    pub(super) fn history_purge(&mut self, p: &PurgeParams) -> Result<PurgeReport> {
        let batch = i64::try_from(p.batch).unwrap_or(i64::MAX);
        let before = p.delivered_before;
        self.write(|tx| {
            let dead = match p.dead_before {
                None => 0,
                Some(dead_before) => tx.execute_typed(
                    "DELETE FROM deliveries WHERE id IN
                       (SELECT id FROM deliveries
                        WHERE state = 'dead' AND updated_at < $1 ORDER BY updated_at LIMIT $2)",
                    typed![dead_before => INT8, batch => INT8],
                )?,
            };
            // Attempts go with their deliveries (ON DELETE CASCADE).
            let deliveries = tx.execute_typed(
                "DELETE FROM deliveries WHERE id IN
                   (SELECT id FROM deliveries
                    WHERE state = 'delivered' AND updated_at < $1 ORDER BY updated_at LIMIT $2)",
                typed![before => INT8, batch => INT8],
            )?;
            let messages = tx.execute_typed(
                "DELETE FROM messages WHERE id IN
                   (SELECT m.id FROM messages m
                    WHERE m.routed_at IS NOT NULL AND m.created_at < $1
                      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id)
                    LIMIT $2)",
                typed![before => INT8, batch => INT8],
            )?;
            let runs = tx.execute_typed(
                "DELETE FROM runs WHERE id IN
                   (SELECT id FROM runs WHERE started_at < $1 AND id < (SELECT max(id) FROM runs) LIMIT $2)",
                typed![before => INT8, batch => INT8],
            )?;
            Ok(PurgeReport {
                deliveries,
                dead,
                messages,
                runs,
            })
        })
    }

    pub(super) fn stats(&mut self, now: i64) -> Result<Stats> {
        self.read(|c| {
            let mut stats = Stats {
                now,
                ..Stats::default()
            };
            for r in c.query_typed(
                "SELECT endpoint, state, count(*) FROM deliveries GROUP BY endpoint, state ORDER BY endpoint",
                &[],
            )? {
                let endpoint: String = r.try_get(0)?;
                let state: String = r.try_get(1)?;
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
                    entry.by_state[i] = r.try_get::<_, i64>(2)? as u64;
                }
            }
            stats.oldest_ready_age_ms = c
                .query_typed_one(
                    "SELECT $1 - min(not_before) FROM deliveries WHERE state = 'ready'",
                    typed![now => INT8],
                )?
                .try_get(0)?;
            let count = |c: &mut Client, sql: &str| -> Result<u64, ::postgres::Error> {
                Ok(c.query_typed_one(sql, &[])?.try_get::<_, i64>(0)? as u64)
            };
            stats.unrouted_messages =
                count(c, "SELECT count(*) FROM messages WHERE routed_at IS NULL")?;
            stats.unroutable_messages =
                count(c, "SELECT count(*) FROM messages WHERE route_error IS NOT NULL")?;
            stats.last_run = c
                .query_typed_opt(
                    "SELECT id, pid, started_at, finished_at, routed, reclaimed, forked, delivered, retried, dead,
                            failed, found_nothing, host, expired, discarded
                     FROM runs ORDER BY id DESC LIMIT 1",
                    &[],
                )?
                .map(|r| run_row(&r))
                .transpose()?;
            if let Some(run) = &stats.last_run {
                stats.last_run_attempts = c
                    .query_typed(
                        "SELECT outcome, count(*) FROM attempts WHERE run_id = $1 GROUP BY outcome ORDER BY outcome",
                        typed![run.id => INT8],
                    )?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
                    .collect::<Result<_, ::postgres::Error>>()?;
            }
            stats.held_accounts = c
                .query_typed(
                    "SELECT account, count(*), max(not_before) FROM deliveries
                     WHERE state = 'delayed' AND reason = 'account_budget' GROUP BY account ORDER BY account",
                    &[],
                )?
                .iter()
                .map(|r| {
                    Ok(HeldAccount {
                        account: r.try_get(0)?,
                        delayed: r.try_get::<_, i64>(1)? as u64,
                        until: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, ::postgres::Error>>()?;
            stats.orphaned = c
                .query_typed(
                    "SELECT endpoint, count(*) FROM deliveries
                     WHERE reason = 'endpoint_removed' AND state = 'delayed' GROUP BY endpoint ORDER BY endpoint",
                    &[],
                )?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
                .collect::<Result<_, ::postgres::Error>>()?;
            stats.saturated_endpoints = c
                .query_typed(
                    "SELECT endpoint, saturated_until, failures, last_error FROM endpoint_health
                     WHERE failures > 0 OR saturated_until > $1 ORDER BY endpoint",
                    typed![now => INT8],
                )?
                .iter()
                .map(|r| {
                    Ok(EndpointHealth {
                        endpoint: r.try_get(0)?,
                        saturated_until: r.try_get(1)?,
                        failures: r.try_get::<_, i64>(2)? as u32,
                        last_error: r.try_get(3)?,
                    })
                })
                .collect::<Result<_, ::postgres::Error>>()?;
            stats.learned_rates = c
                .query_typed(
                    &format!(
                        "SELECT endpoint, {LEARNED_COLUMNS}
                         FROM endpoint_health WHERE learned_rate IS NOT NULL ORDER BY endpoint"
                    ),
                    &[],
                )?
                .iter()
                .map(|r| {
                    let learned = learned(
                        r.try_get(1)?,
                        r.try_get(2)?,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        r.try_get(5)?,
                    );
                    Ok(EndpointRate {
                        endpoint: r.try_get(0)?,
                        learned: learned.expect("learned_rate IS NOT NULL"),
                    })
                })
                .collect::<Result<_, ::postgres::Error>>()?;
            Ok(stats)
        })
    }
}
