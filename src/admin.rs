//! Admin commands over the queue: `list`, `show`, `requeue`, `purge`. Each
//! prints a human table by default and stable JSON with `--json`.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{
    AttemptRow, DeliveryFilter, DeliveryRow, DeliveryState, ListedDelivery, MessageRow,
    RequeueParams, Store, ms, now_ms,
};

/// Rows removed per purge transaction: small enough that a run waiting for
/// the write lock waits milliseconds, not seconds.
pub const PURGE_BATCH: u64 = 2_000;

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("stdout", e))
}

/// A time in ms as RFC 3339 (UTC, seconds).
fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn delivery_json(d: &DeliveryRow) -> Value {
    json!({
        "id": d.id, "message_id": d.message_id, "endpoint": d.endpoint, "account": d.account,
        "state": d.state.as_str(), "priority": d.priority, "not_before_ms": d.not_before, "reason": d.reason,
        "lease_owner": d.lease_owner, "lease_expires_at_ms": d.lease_expires_at, "attempts": d.attempts,
        "last_status": d.last_status, "last_error": d.last_error,
    })
}

fn attempt_json(a: &AttemptRow) -> Value {
    json!({
        "id": a.id, "number": a.number, "run_id": a.run_id, "pid": a.pid, "started_at_ms": a.started_at,
        "finished_at_ms": a.finished_at, "outcome": a.outcome, "http_status": a.http_status, "error": a.error,
        "duration_ms": a.duration_ms,
    })
}

fn message_json(m: &MessageRow) -> Value {
    json!({
        "id": m.id, "uid": m.uid, "topic": m.topic, "account": m.account,
        "payload": serde_json::from_str::<Value>(&m.payload).unwrap_or(Value::Null),
        "priority": m.priority, "created_at_ms": m.created_at, "available_at_ms": m.available_at,
        "dedup_key": m.dedup_key, "routed_at_ms": m.routed_at,
    })
}

/// What a delivery waits for, in a few words.
fn waiting(d: &DeliveryRow, now: i64) -> String {
    match d.state {
        DeliveryState::Delayed => format!(
            "{} for {:.1}s",
            d.reason.as_deref().unwrap_or("delayed"),
            (d.not_before - now).max(0) as f64 / 1000.0
        ),
        DeliveryState::Leased => d.lease_owner.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// `cronpost list`.
pub fn list(config: &Config, filter: &DeliveryFilter, limit: u64, as_json: bool) -> Result<()> {
    let rows = crate::store::open(config)?.deliveries_list(filter, limit)?;
    if as_json {
        let items: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut v = delivery_json(&r.delivery);
                v["topic"] = json!(r.topic);
                v["created_at_ms"] = json!(r.created_at);
                v
            })
            .collect();
        return print(&format!("{}\n", Value::Array(items)));
    }
    print(&list_table(&rows, now_ms()))
}

fn list_table(rows: &[ListedDelivery], now: i64) -> String {
    let mut out = format!(
        "{:>8} {:>8} {:<16} {:<16} {:<20} {:<9} {:>8} {:<28} {}\n",
        "id",
        "message",
        "endpoint",
        "account",
        "topic",
        "state",
        "attempts",
        "waiting",
        "last error"
    );
    for r in rows {
        let d = &r.delivery;
        out += &format!(
            "{:>8} {:>8} {:<16} {:<16} {:<20} {:<9} {:>8} {:<28} {}\n",
            d.id,
            d.message_id,
            d.endpoint,
            d.account,
            r.topic,
            d.state.as_str(),
            d.attempts,
            waiting(d, now),
            d.last_error.as_deref().unwrap_or("")
        );
    }
    out += &format!("({} deliveries)\n", rows.len());
    out
}

/// `cronpost show ID`: a message (by id or uid), its deliveries and attempts.
pub fn show(config: &Config, key: &str, as_json: bool) -> Result<()> {
    let mut store = crate::store::open(config)?;
    let message = store.message_get(key)?.ok_or_else(|| {
        Error::data(format!(
            "no message {key:?} (give a message id or its msg_... uid)"
        ))
    })?;
    let mut deliveries = Vec::new();
    for d in store.deliveries_of_message(message.id)? {
        let attempts = store.attempts_of_delivery(d.id)?;
        deliveries.push((d, attempts));
    }
    if as_json {
        let items: Vec<Value> = deliveries
            .iter()
            .map(|(d, attempts)| {
                let mut v = delivery_json(d);
                v["attempts_log"] = Value::Array(attempts.iter().map(attempt_json).collect());
                v
            })
            .collect();
        let mut v = message_json(&message);
        v["deliveries"] = Value::Array(items);
        return print(&format!("{v}\n"));
    }
    let now = now_ms();
    let mut out = format!(
        "message {} ({})\n  topic {}, account {}, priority {}\n  created {}{}\n  payload {}\n",
        message.id,
        message.uid,
        message.topic,
        message.account,
        message.priority,
        time(message.created_at),
        message
            .available_at
            .map_or(String::new(), |t| format!(", not before {}", time(t))),
        message.payload
    );
    if deliveries.is_empty() {
        out += "  no deliveries yet (routed by the next run, if an endpoint subscribes to its topic)\n";
    }
    for (d, attempts) in &deliveries {
        out += &format!(
            "delivery {} to {}: {} {}(attempts {})\n",
            d.id,
            d.endpoint,
            d.state.as_str(),
            match waiting(d, now) {
                w if w.is_empty() => String::new(),
                w => format!("[{w}] "),
            },
            d.attempts
        );
        for a in attempts {
            out += &format!(
                "  #{} {} pid {} {}{}{}{}\n",
                a.number,
                time(a.started_at),
                a.pid,
                a.outcome,
                a.http_status
                    .map_or(String::new(), |s| format!(" HTTP {s}")),
                a.duration_ms
                    .map_or(String::new(), |ms| format!(" in {ms} ms")),
                a.error
                    .as_deref()
                    .map_or(String::new(), |e| format!(": {e}"))
            );
        }
    }
    print(&out)
}

/// `cronpost requeue`: dead (or delayed) deliveries back to ready.
pub fn requeue(
    config: &Config,
    filter: DeliveryFilter,
    dry_run: bool,
    as_json: bool,
) -> Result<()> {
    if let Some(endpoint) = &filter.endpoint
        && config.endpoint(endpoint).is_none()
    {
        let known: Vec<&str> = config.endpoints.iter().map(|e| e.name.as_str()).collect();
        return Err(Error::data(format!(
            "unknown endpoint {endpoint:?}: {} defines {}",
            config.path.display(),
            known.join(", ")
        )));
    }
    if let Some(state) = filter.state
        && !matches!(state, DeliveryState::Dead | DeliveryState::Delayed)
    {
        return Err(Error::usage(format!(
            "--state {}: only dead or delayed deliveries are requeued",
            state.as_str()
        )));
    }
    let params = RequeueParams {
        filter,
        now: now_ms(),
        dry_run,
    };
    let n = crate::store::open(config)?.deliveries_requeue(&params)?;
    if as_json {
        return print(&format!("{}\n", json!({"requeued": n, "dry_run": dry_run})));
    }
    print(&if dry_run {
        format!("would requeue {n} deliveries (dry run: nothing changed)\n")
    } else {
        format!("requeued {n} deliveries\n")
    })
}

/// `cronpost purge --orphaned`: deliveries parked because their endpoint
/// left the config.
pub fn purge_orphaned(
    config: &Config,
    endpoint: Option<&str>,
    dry_run: bool,
    as_json: bool,
) -> Result<()> {
    if let Some(name) = endpoint
        && config.endpoint(name).is_some()
    {
        return Err(Error::usage(format!(
            "--endpoint {name:?} is in {}: its deliveries are not orphaned",
            config.path.display()
        )));
    }
    let n = crate::store::open(config)?.deliveries_purge_orphaned(endpoint, dry_run)?;
    if as_json {
        return print(&format!("{}\n", json!({"purged": n, "dry_run": dry_run})));
    }
    print(&if dry_run {
        format!("would purge {n} orphaned deliveries (dry run: nothing changed)\n")
    } else {
        format!("purged {n} orphaned deliveries\n")
    })
}

/// `cronpost purge --older-than D`: delivered history, in batches.
pub fn purge(config: &Config, older_than: Duration, dry_run: bool, as_json: bool) -> Result<()> {
    if dry_run {
        return Err(Error::usage(
            "--dry-run goes with --orphaned; delivered history is purged by age only",
        ));
    }
    let mut store = crate::store::open(config)?;
    let before = now_ms() - ms(older_than);
    let (mut deliveries, mut messages, mut runs, mut batches) = (0, 0, 0, 0);
    loop {
        let report = store.delivered_purge(before, PURGE_BATCH)?;
        batches += 1;
        deliveries += report.deliveries;
        messages += report.messages;
        runs += report.runs;
        if report.deliveries + report.messages + report.runs == 0 {
            break;
        }
    }
    if as_json {
        return print(&format!(
            "{}\n",
            json!({"deliveries": deliveries, "messages": messages, "runs": runs, "batches": batches})
        ));
    }
    print(&format!(
        "purged {deliveries} delivered deliveries, {messages} messages and {runs} run records older than {} in {batches} batches\n",
        humantime::format_duration(older_than)
    ))
}
