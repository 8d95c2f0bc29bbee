//! The admin side of the SQLite store: what `stats`, `list`, `show`,
//! `requeue`, `purge` and `backup` read and write, and the run totals for
//! metrics.

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params, params_from_iter};

use super::*;
use crate::store::candidate::{LEARNED_COLUMNS, learned};

impl SqliteStore {
    /// Writes a consistent copy of the database into `target`, an empty
    /// file: `VACUUM INTO` reads one snapshot (a read transaction, which in
    /// WAL mode holds up no writer) and writes it compacted. Chosen over the
    /// online backup API, which restarts its copy whenever another
    /// connection writes, so it might never finish during a busy run.
    pub fn vacuum_into(&mut self, target: &Path) -> Result<()> {
        let target_text = target.to_str().ok_or_else(|| {
            Error::usage(format!(
                "backup path {} is not valid UTF-8",
                target.display()
            ))
        })?;
        self.conn
            .execute("VACUUM INTO ?1", [target_text])
            .map(|_| ())
            .map_err(|e| {
                self.err(e)
                    .context(format!("backup into {}", target.display()))
            })
    }

    pub(super) fn deliveries_restore_endpoints(
        &mut self,
        endpoints: &[String],
        now: i64,
    ) -> Result<u64> {
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

    pub(super) fn deliveries_purge_orphaned(&mut self, p: &PurgeOrphanedParams) -> Result<u64> {
        let which =
            "reason IN ('endpoint_removed', 'ordering') AND state = 'delayed' AND (?1 IS NULL OR endpoint = ?1)
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

    pub(super) fn run_totals(&mut self) -> Result<RunTotals> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(routed), 0), coalesce(sum(reclaimed), 0), coalesce(sum(forked), 0),
                        coalesce(sum(delivered), 0), coalesce(sum(retried), 0), coalesce(sum(dead), 0),
                        coalesce(sum(failed), 0), coalesce(sum(found_nothing), 0),
                        coalesce(sum(expired), 0), coalesce(sum(discarded), 0)
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
                            expired: r.get(9)?,
                            discarded: r.get(10)?,
                            ..RunRecord::default()
                        },
                    })
                },
            )
            .map_err(|e| self.err(e))
    }

    pub(super) fn delivery_get(&mut self, id: i64) -> Result<Option<DeliveryRow>> {
        self.conn
            .query_row(
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?1"),
                [id],
                delivery_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub(super) fn deliveries_of_message(&mut self, message_id: i64) -> Result<Vec<DeliveryRow>> {
        self.conn
            .prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE message_id = ?1 ORDER BY endpoint"
            ))
            .and_then(|mut s| s.query_map([message_id], delivery_row)?.collect())
            .map_err(|e| self.err(e))
    }

    pub(super) fn attempts_of_delivery(&mut self, delivery_id: i64) -> Result<Vec<AttemptRow>> {
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

    pub(super) fn deliveries_list(
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
                        topic: r.get(15)?,
                        created_at: r.get(16)?,
                        uid: r.get(17)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    pub(super) fn message_get(&mut self, key: &MessageKey) -> Result<Option<MessageRow>> {
        let (id, uid) = match key {
            MessageKey::Id(id) => (Some(*id), None),
            MessageKey::Uid(uid) => (None, Some(uid.as_str())),
        };
        self.conn
            .query_row(
                "SELECT id, uid, topic, account, payload, priority, created_at, available_at, dedup_key, routed_at,
                        route_error, expires_at, ordering_key
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
                        expires_at: r.get(11)?,
                        ordering_key: r.get(12)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub(super) fn messages_reroute_unroutable(&mut self, dry_run: bool) -> Result<u64> {
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

    pub(super) fn deliveries_requeue(&mut self, p: &RequeueParams) -> Result<u64> {
        let (clause, filter_values) = filter_clause(&p.filter);
        // The n-th picked (from 0, oldest first) is due `wait_ms` = n *
        // spacing from now. Anonymous parameters number in text order.
        let picked = format!(
            "SELECT d.id, (row_number() OVER (ORDER BY d.id) - 1) * ? AS wait_ms
             FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE {} AND {clause}
             ORDER BY d.id LIMIT ?",
            shared::requeue_candidates_sql("?", "?")
        );
        let limit = p.limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let now = Value::Integer(p.now);
        let mut values = vec![
            Value::Integer(p.spacing_ms),
            Value::Integer(i64::from(p.expired)),
            now.clone(),
        ];
        values.extend(filter_values);
        values.push(Value::Integer(limit));
        self.write(|tx| {
            if p.dry_run {
                let count = format!("SELECT count(*) FROM ({picked})");
                return tx.query_row(&count, params_from_iter(values), |r| r.get(0));
            }
            values.push(Value::Integer(PARKED_UNTIL));
            values.extend(std::iter::repeat_n(now, 4));
            let update = shared::requeue_picked_sql("?", ["?"; 4]);
            let moved = tx.execute(
                &format!("WITH picked AS ({picked}) {update}"),
                params_from_iter(values),
            )?;
            super::release_keys(tx, p.now)?;
            Ok(moved as u64)
        })
    }

    pub(super) fn history_purge(&mut self, p: &PurgeParams) -> Result<PurgeReport> {
        let before = p.delivered_before;
        self.write(|tx| {
            let batch = i64::try_from(p.batch).unwrap_or(i64::MAX);
            let dead = match p.dead_before {
                None => 0,
                Some(dead_before) => tx.execute(
                    "DELETE FROM deliveries WHERE id IN
                       (SELECT id FROM deliveries INDEXED BY deliveries_dead
                        WHERE state = 'dead' AND updated_at < ?1 ORDER BY updated_at LIMIT ?2)",
                    params![dead_before, batch],
                )?,
            };
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
                dead: dead as u64,
                messages: messages as u64,
                runs: runs as u64,
            })
        })
    }

    pub(super) fn stats(&mut self, now: i64) -> Result<Stats> {
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
                            failed, found_nothing, host, expired, discarded
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
            stats.learned_rates = conn
                .prepare(&format!(
                    "SELECT endpoint, {LEARNED_COLUMNS}
                     FROM endpoint_health WHERE learned_rate IS NOT NULL ORDER BY endpoint"
                ))?
                .query_map([], |r| {
                    let learned = learned(r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
                    Ok(EndpointRate {
                        endpoint: r.get(0)?,
                        learned: learned.expect("learned_rate IS NOT NULL"),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(stats)
        };
        read().map_err(|e| self.err(e))
    }
}
