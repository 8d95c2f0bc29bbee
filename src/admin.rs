//! Admin commands over the queue: `stats`, `list`, `show`, `requeue`,
//! `purge`. Each prints text for people by default and stable JSON with
//! `--json`. Ids as `list` prints them (d58 for a delivery, 42 for a message,
//! msg_... for its uid) are what `show` and `requeue` take (see `ids`).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{Error, ExitCode, Result};
use crate::files::Sharing;
use crate::ids::MessageRef;
use crate::store::{
    AttemptRow, DeliveryFilter, DeliveryRow, DeliveryState, ListedDelivery, MessageKey, MessageRow,
    RequeueParams, RunRecord, SqliteStore, Stats, Store, ms, now_ms, reason,
};

pub use crate::words::plural;

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("stdout", e))
}

fn print_json(value: &Value) -> Result<()> {
    print(&format!("{value}\n"))
}

/// A time in ms as RFC 3339 (UTC, seconds).
fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// A run's counters as JSON (`run --json`, `stats --json`).
pub fn run_json(r: &RunRecord) -> String {
    json!({
        "id": r.id, "pid": r.pid, "started_at_ms": r.started_at, "finished_at_ms": r.finished_at,
        "routed": r.routed, "reclaimed": r.reclaimed, "forked": r.forked, "delivered": r.delivered,
        "retried": r.retried, "dead": r.dead, "failed": r.failed, "found_nothing": r.found_nothing,
        "expired": r.expired, "discarded": r.discarded,
    })
    .to_string()
}

fn delivery_json(d: &DeliveryRow) -> Value {
    json!({
        "id": d.id, "message_id": d.message_id, "endpoint": d.endpoint, "account": d.account,
        "state": d.state.as_str(), "priority": d.priority, "not_before_ms": d.not_before, "reason": d.reason,
        "lease_owner": d.lease_owner, "lease_expires_at_ms": d.lease_expires_at, "attempts": d.attempts,
        "last_status": d.last_status, "last_error": d.last_error, "expires_at_ms": d.expires_at,
        "ordering_key": d.ordering_key,
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
        "dedup_key": m.dedup_key, "routed_at_ms": m.routed_at, "route_error": m.route_error,
        "expires_at_ms": m.expires_at, "ordering_key": m.ordering_key,
    })
}

/// What a delivery waits for, in a few words.
fn waiting(d: &DeliveryRow, now: i64) -> String {
    match d.state {
        DeliveryState::Delayed if d.reason.as_deref() == Some(crate::store::reason::ORDERING) => {
            "ordering: behind an earlier message of its key".into()
        }
        DeliveryState::Delayed if d.not_before == crate::store::PARKED_UNTIL => {
            "endpoint not in the config".into()
        }
        DeliveryState::Delayed => format!(
            "{} for {:.1}s",
            d.reason.as_deref().unwrap_or("delayed"),
            seconds((d.not_before - now).max(0))
        ),
        DeliveryState::Leased => d.lease_owner.clone().unwrap_or_default(),
        DeliveryState::Dead => d.reason.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// An endpoint filter must name an endpoint of the config, or one that
/// left it but still has deliveries (parked, or history).
fn check_endpoint(config: &Config, store: &mut dyn Store, endpoint: Option<&str>) -> Result<()> {
    let Some(name) = endpoint else {
        return Ok(());
    };
    if config.endpoint(name).is_some() {
        return Ok(());
    }
    let filter = DeliveryFilter {
        endpoint: Some(name.to_string()),
        ..DeliveryFilter::default()
    };
    if !store.deliveries_list(&filter, 1)?.is_empty() {
        return Ok(());
    }
    let known: Vec<&str> = config.endpoints.iter().map(|e| e.name.as_str()).collect();
    Err(Error::data(format!(
        "unknown endpoint {name:?}: {} defines {}, and no delivery was ever made to it",
        config.path.display(),
        known.join(", ")
    )))
}

/// `cronpost stats`.
pub fn stats(config: &Config, as_json: bool) -> Result<()> {
    let mut stats = crate::store::open(config)?.stats(now_ms())?;
    crate::metrics::rates_in_force(config, &mut stats);
    if as_json {
        return print_json(&stats_json(&stats));
    }
    print(&stats_text(config, &stats))
}

fn stats_json(stats: &Stats) -> Value {
    let endpoints: Vec<_> = stats
        .endpoints
        .iter()
        .map(|e| {
            let mut row = serde_json::Map::new();
            row.insert("endpoint".into(), json!(e.endpoint));
            for (state, n) in DeliveryState::ALL.iter().zip(e.by_state) {
                row.insert(state.as_str().into(), json!(n));
            }
            Value::Object(row)
        })
        .collect();
    let last_run = stats
        .last_run
        .as_ref()
        .map(|r| serde_json::from_str::<Value>(&run_json(r)).expect("run_json is JSON"));
    let attempts: serde_json::Map<_, _> = stats
        .last_run_attempts
        .iter()
        .map(|(outcome, n)| (outcome.clone(), json!(n)))
        .collect();
    let held_accounts: Vec<_> = stats
        .held_accounts
        .iter()
        .map(|h| json!({"account": h.account, "delayed": h.delayed, "until_ms": h.until}))
        .collect();
    let saturated: Vec<_> = stats
        .saturated_endpoints
        .iter()
        .map(|h| {
            json!({
                "endpoint": h.endpoint, "saturated_until_ms": h.saturated_until,
                "cooldown_left_seconds": h.saturated_until.map(|u| seconds((u - stats.now).max(0))),
                "failures": h.failures, "last_error": h.last_error,
            })
        })
        .collect();
    let orphaned: Vec<_> = stats
        .orphaned
        .iter()
        .map(|(endpoint, n)| json!({"endpoint": endpoint, "deliveries": n}))
        .collect();
    let learned: Vec<_> = stats
        .learned_rates
        .iter()
        .map(|r| {
            json!({
                "endpoint": r.endpoint, "rate_per_second": r.learned.rate,
                "ceiling_per_second": r.learned.ceiling, "reason": r.learned.reason.as_str(),
                "changed_at_ms": r.learned.changed_at,
            })
        })
        .collect();
    json!({
        "held_accounts": held_accounts,
        "saturated_endpoints": saturated,
        "learned_rates": learned,
        "orphaned": orphaned,
        "endpoints": endpoints,
        "oldest_ready_age_seconds": stats.oldest_ready_age_ms.map(seconds),
        "unrouted_messages": stats.unrouted_messages,
        "unroutable_messages": stats.unroutable_messages,
        "last_run": last_run,
        "last_run_attempts": attempts,
    })
}

fn stats_text(config: &Config, stats: &Stats) -> String {
    let mut out = format!("{:<20}", "endpoint");
    for state in DeliveryState::ALL {
        out += &format!(" {:>10}", state.as_str());
    }
    out += "\n";
    for e in &stats.endpoints {
        out += &format!("{:<20}", e.endpoint);
        for n in e.by_state {
            out += &format!(" {n:>10}");
        }
        out += "\n";
    }
    out += &match stats.oldest_ready_age_ms {
        Some(age) => format!("oldest ready: {:.1}s old\n", seconds(age)),
        None => "oldest ready: none ready\n".to_string(),
    };
    out += &format!("unrouted messages: {}\n", stats.unrouted_messages);
    if stats.unroutable_messages > 0 {
        out += &format!(
            "unroutable messages: {} (no endpoint subscribes to their topic; see the unroutable_messages view, `cronpost requeue --unroutable`)\n",
            stats.unroutable_messages
        );
    }
    for (endpoint, n) in &stats.orphaned {
        let parked = plural(*n, "delivery", "deliveries");
        out += &if config.endpoint(endpoint).is_some() {
            format!(
                "endpoint {endpoint} is back in the config: {parked} parked, ready at the next run\n"
            )
        } else {
            format!(
                "endpoint {endpoint} is not in the config: {parked} parked (ready again when it returns; `cronpost purge --orphaned` removes them)\n"
            )
        };
    }
    for h in &stats.held_accounts {
        out += &format!(
            "account {} held back by its budget: {} delayed, the last until {:.1}s from now\n",
            h.account,
            plural(h.delayed, "delivery", "deliveries"),
            seconds((h.until - stats.now).max(0))
        );
    }
    for h in &stats.saturated_endpoints {
        let state = match h.saturated_until {
            Some(until) if until > stats.now => {
                format!(
                    "saturated, cool-down {:.1}s left",
                    seconds(until - stats.now)
                )
            }
            _ => "cool-down over, waiting for a probe to succeed".to_string(),
        };
        out += &format!(
            "endpoint {} {state} ({} in a row; last: {})\n",
            h.endpoint,
            plural(u64::from(h.failures), "signal", "signals"),
            h.last_error.as_deref().unwrap_or("-")
        );
    }
    for r in &stats.learned_rates {
        let l = &r.learned;
        let configured = config
            .endpoint(&r.endpoint)
            .and_then(|e| e.rate)
            .map_or(String::new(), |rate| {
                format!(", configured {}/s", rate.per_second)
            });
        out += &format!(
            "endpoint {} learned rate {:.1}/s ({} {:.1}s ago; it took {:.1}/s when it last pushed back{configured})\n",
            r.endpoint,
            l.rate,
            l.reason.describe(),
            seconds((stats.now - l.changed_at).max(0)),
            l.ceiling,
        );
    }
    if let Some(r) = &stats.last_run {
        let took = r.finished_at.map_or("still running".to_string(), |f| {
            format!("{:.2}s", seconds(f - r.started_at))
        });
        out += &format!(
            "last run {} (host {}, pid {}, {took}): forked {}: {} delivered, {} retried, {} dead, {} failed, {} found nothing to lease\n",
            r.id,
            r.host,
            r.pid,
            r.forked,
            r.delivered,
            r.retried,
            r.dead,
            r.failed,
            r.found_nothing
        );
        let attempts: Vec<String> = stats
            .last_run_attempts
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        out += &format!(
            "attempts in last run: {}\n",
            if attempts.is_empty() {
                "none".into()
            } else {
                attempts.join(", ")
            }
        );
    }
    out
}

/// `cronpost list`.
pub fn list(config: &Config, filter: &DeliveryFilter, limit: u64, as_json: bool) -> Result<()> {
    let mut store = crate::store::open(config)?;
    check_endpoint(config, store.as_mut(), filter.endpoint.as_deref())?;
    let rows = store.deliveries_list(filter, limit)?;
    if as_json {
        let items: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut v = delivery_json(&r.delivery);
                v["topic"] = json!(r.topic);
                v["uid"] = json!(r.uid);
                v["created_at_ms"] = json!(r.created_at);
                v
            })
            .collect();
        return print_json(&Value::Array(items));
    }
    print(&list_table(&rows, now_ms()))
}

fn list_table(rows: &[ListedDelivery], now: i64) -> String {
    let line = |cells: [&str; 10]| {
        format!(
            "{:>8} {:>8} {:<28} {:<16} {:<16} {:<20} {:<9} {:>8} {:<28} {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9]
        )
    };
    let mut out = line([
        "delivery",
        "message",
        "uid",
        "endpoint",
        "account",
        "topic",
        "state",
        "attempts",
        "waiting",
        "last error",
    ]);
    for r in rows {
        let d = &r.delivery;
        out += &line([
            &format!("d{}", d.id),
            &d.message_id.to_string(),
            &r.uid,
            &d.endpoint,
            &d.account,
            &r.topic,
            d.state.as_str(),
            &d.attempts.to_string(),
            &waiting(d, now),
            d.last_error.as_deref().unwrap_or(""),
        ]);
    }
    out += &format!(
        "({}; `cronpost show` takes a delivery id, a message id or a uid)\n",
        plural(rows.len() as u64, "delivery", "deliveries")
    );
    out
}

/// `cronpost show ID`: a message (by id, uid, or one of its delivery ids),
/// its deliveries and their attempts.
pub fn show(config: &Config, key: &MessageRef, as_json: bool) -> Result<()> {
    let mut store = crate::store::open(config)?;
    let not_found = || Error::data(format!("no {key} in {}", config.database));
    let (message_key, found_by) = match key {
        MessageRef::Message(id) => (MessageKey::Id(*id), "its message id".to_string()),
        MessageRef::Uid(uid) => (MessageKey::Uid(uid.clone()), "its uid".to_string()),
        MessageRef::Delivery(id) => {
            let delivery = store.delivery_get(*id)?.ok_or_else(not_found)?;
            (
                MessageKey::Id(delivery.message_id),
                format!("its delivery d{id} to {}", delivery.endpoint),
            )
        }
    };
    let message = store.message_get(&message_key)?.ok_or_else(not_found)?;
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
        v["found_by"] = json!(found_by);
        v["deliveries"] = Value::Array(items);
        return print_json(&v);
    }
    let now = now_ms();
    let mut out = format!(
        "message {} ({}), found by {found_by}\n  topic {}, account {}, priority {}\n  created {}{}{}{}\n  payload {}\n",
        message.id,
        message.uid,
        message.topic,
        message.account,
        message.priority,
        time(message.created_at),
        message
            .available_at
            .map_or(String::new(), |t| format!(", not before {}", time(t))),
        message
            .expires_at
            .map_or(String::new(), |t| format!(", expires {}", time(t))),
        message
            .ordering_key
            .as_ref()
            .map_or(String::new(), |k| format!(", ordering key {k:?}")),
        message.payload
    );
    if let Some(why) = &message.route_error {
        out += &format!("  unroutable: {why}\n");
    } else if deliveries.is_empty() {
        out += "  no deliveries yet (routed by the next run)\n";
    }
    for (d, attempts) in &deliveries {
        // Its expiry may come from its topic's max_age, not the message.
        let expires = match d.expires_at {
            Some(t) if matches!(d.state, DeliveryState::Ready | DeliveryState::Delayed) => {
                format!(", expires {}", time(t))
            }
            _ => String::new(),
        };
        out += &format!(
            "delivery d{} to {}: {} {}({}){expires}\n",
            d.id,
            d.endpoint,
            d.state.as_str(),
            match waiting(d, now) {
                w if w.is_empty() => String::new(),
                w => format!("[{w}] "),
            },
            plural(u64::from(d.attempts), "attempt", "attempts")
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

/// How `cronpost requeue` requeues what it selects.
#[derive(Clone, Copy, Debug, Default)]
pub struct Requeue {
    /// At most this many, oldest first.
    pub limit: Option<u64>,
    /// Milliseconds between two requeued deliveries' due times (0: all now).
    pub spacing_ms: i64,
    /// Count, change nothing.
    pub dry_run: bool,
}

/// `cronpost requeue`: dead (or delayed) deliveries back to ready, all at
/// once or spread out (`how`). Ids that name no delivery, or one that is
/// neither dead nor delayed, are an error naming them, and nothing changes.
pub fn requeue(config: &Config, filter: DeliveryFilter, how: Requeue, as_json: bool) -> Result<()> {
    let Requeue { dry_run, .. } = how;
    if filter.reason.as_deref() == Some(reason::ORDERING) {
        return Err(Error::usage(
            "deliveries waiting for their ordering key are not requeued: each goes when the key's \
             earlier delivery is done (requeue that one if it is dead)",
        ));
    }
    let mut store = crate::store::open(config)?;
    check_endpoint(config, store.as_mut(), filter.endpoint.as_deref())?;
    let (mut missing, mut unmovable) = (Vec::new(), Vec::new());
    for &id in &filter.ids {
        match store.delivery_get(id)? {
            None => missing.push(format!("d{id}")),
            Some(d) if !matches!(d.state, DeliveryState::Dead | DeliveryState::Delayed) => {
                unmovable.push(format!("d{id} ({})", d.state.as_str()))
            }
            Some(d) if d.reason.as_deref() == Some(reason::ORDERING) => unmovable.push(format!(
                "d{id} (waiting for its ordering key: it goes when the key's earlier delivery is done)"
            )),
            Some(_) => {}
        }
    }
    if !missing.is_empty() || !unmovable.is_empty() {
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!("no delivery {}", missing.join(", ")));
        }
        if !unmovable.is_empty() {
            why.push(format!(
                "only dead or delayed deliveries are requeued: {}",
                unmovable.join(", ")
            ));
        }
        return Err(Error::data(format!("{}; nothing changed", why.join("; "))));
    }
    // Expired dead letters are requeued only when named (by id, or by
    // their reason): a sweep of the dead-letter queue would send them late.
    let expired = !filter.ids.is_empty() || filter.reason.as_deref() == Some(reason::EXPIRED);
    let params = RequeueParams {
        filter,
        now: now_ms(),
        limit: how.limit,
        spacing_ms: how.spacing_ms,
        expired,
        dry_run,
    };
    let n = store.deliveries_requeue(&params)?;
    // The last is due (n - 1) spacings from now.
    let over = Duration::from_millis((n.saturating_sub(1) as i64 * how.spacing_ms) as u64);
    if as_json {
        return print_json(&json!({
            "requeued": n, "dry_run": dry_run, "spread_seconds": over.as_secs_f64()
        }));
    }
    let deliveries = plural(n, "delivery", "deliveries");
    let spread = if how.spacing_ms > 0 && n > 1 {
        format!(
            ", spread over {}",
            humantime::format_duration(Duration::from_secs(over.as_secs().max(1)))
        )
    } else {
        String::new()
    };
    print(&if dry_run {
        format!("would requeue {deliveries}{spread} (dry run: nothing changed)\n")
    } else {
        format!("requeued {deliveries}{spread}\n")
    })
}

/// `cronpost requeue --unroutable`: unroutable messages, routed again by
/// the next run (after a subscriber was added to the config).
pub fn requeue_unroutable(config: &Config, dry_run: bool, as_json: bool) -> Result<()> {
    let n = crate::store::open(config)?.messages_reroute_unroutable(dry_run)?;
    if as_json {
        return print_json(&json!({"requeued": n, "dry_run": dry_run}));
    }
    let messages = plural(n, "unroutable message", "unroutable messages");
    print(&if dry_run {
        format!("would route {messages} again (dry run: nothing changed)\n")
    } else {
        format!("{messages} will be routed again by the next run\n")
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
    let params = crate::store::PurgeOrphanedParams {
        endpoint: endpoint.map(str::to_string),
        configured: config.endpoints.iter().map(|e| e.name.clone()).collect(),
        dry_run,
    };
    let n = crate::store::open(config)?.deliveries_purge_orphaned(&params)?;
    if as_json {
        return print_json(&json!({"purged": n, "dry_run": dry_run}));
    }
    let deliveries = plural(n, "orphaned delivery", "orphaned deliveries");
    print(&if dry_run {
        format!("would purge {deliveries} (dry run: nothing changed)\n")
    } else {
        format!("purged {deliveries}\n")
    })
}

/// `cronpost purge --older-than D`: delivered history, in batches.
pub fn purge(config: &Config, older_than: Duration, as_json: bool) -> Result<()> {
    let mut store = crate::store::open(config)?;
    let before = now_ms() - ms(older_than);
    let (purged, batches) =
        crate::retention::purge(store.as_mut(), before, None, None, &mut || {})?;
    if as_json {
        return print_json(&json!({
            "deliveries": purged.deliveries, "messages": purged.messages, "runs": purged.runs,
            "batches": batches
        }));
    }
    print(&format!(
        "purged {}, {} and {} older than {} in {}\n",
        plural(
            purged.deliveries,
            "delivered delivery",
            "delivered deliveries"
        ),
        plural(purged.messages, "message", "messages"),
        plural(purged.runs, "run record", "run records"),
        humantime::format_duration(older_than),
        plural(batches as u64, "batch", "batches")
    ))
}

/// `cronpost backup PATH`: a consistent copy of the queue, taken while runs
/// go on, with the database's group and mode. It never overwrites: the copy
/// is written to a temporary name beside PATH, synced, then linked to PATH
/// (which fails if PATH exists), so PATH is whole or absent.
pub fn backup(config: &Config, path: &Path, as_json: bool) -> Result<()> {
    let Some(database) = config.database.sqlite_path() else {
        return Err(Error::usage(format!(
            "backup copies a SQLite queue; {} is PostgreSQL: back it up with pg_dump (README, \"Outgrowing one host\")",
            config.database
        )));
    };
    if !database.exists() {
        return Err(Error::new(
            ExitCode::NoInput,
            format!(
                "database {} does not exist: nothing to back up",
                database.display()
            ),
        ));
    }
    let exists = || {
        Error::new(
            ExitCode::CantCreate,
            format!(
                "backup {} exists: a backup never overwrites; remove it or choose another name",
                path.display()
            ),
        )
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    // Opened as it is, not migrated: a backup copies the database, it does
    // not upgrade it first.
    crate::files::check_read_write(database, config.database_group)?;
    let mut store = SqliteStore::open_existing(database, config.busy_timeout)?;
    let sharing = Sharing::of_database(database)
        .map_err(|e| Error::io(format!("database {}", database.display()), e))?;
    let temporary = crate::files::with_suffix(path, &format!(".tmp-{}", std::process::id()));
    let busy = || {
        Error::new(
            ExitCode::CantCreate,
            format!(
                "{} exists: another backup to {} is under way, or one was interrupted (remove it)",
                temporary.display(),
                path.display()
            ),
        )
    };
    let file = sharing
        .create_new(&temporary)
        .map_err(|e| {
            Error::io(format!("backup {}", temporary.display()), e).with_code_for_create()
        })?
        .ok_or_else(busy)?;
    let written = store
        .vacuum_into(&temporary)
        .and_then(|()| {
            file.sync_all()
                .map_err(|e| Error::io(format!("backup {}", temporary.display()), e))
        })
        .and_then(|()| {
            std::fs::hard_link(&temporary, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => exists(),
                _ => Error::io(format!("backup {}", path.display()), e).with_code_for_create(),
            })
        });
    let _ = std::fs::remove_file(&temporary);
    written?;
    if let Ok(dir) = std::fs::File::open(crate::files::parent_dir(path)) {
        let _ = dir.sync_all();
    }
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if as_json {
        return print_json(&json!({
            "database": database, "backup": path, "bytes": bytes,
            "schema_version": store.schema_version()?
        }));
    }
    print(&format!(
        "backed up {} to {} ({} bytes, schema version {})\n",
        database.display(),
        path.display(),
        bytes,
        store.schema_version()?
    ))
}
