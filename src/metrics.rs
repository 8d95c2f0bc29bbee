//! Metrics: after each run, a Prometheus text file for node_exporter's
//! textfile collector, written to a temporary file and renamed over the old
//! one, so the collector never reads half a file. Gauges describe the queue
//! and the last run; `_total` counters add up every run in the database.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{DeliveryState, RunRecord, RunTotals, Stats, now_ms};

/// Renders the metrics text.
pub fn render(stats: &Stats, run: &RunRecord, took: Duration, totals: &RunTotals) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let deliveries: Vec<(String, f64)> = stats
        .endpoints
        .iter()
        .flat_map(|e| {
            DeliveryState::ALL.iter().zip(e.by_state).map(|(state, n)| {
                (
                    format!(
                        "{{endpoint=\"{}\",state=\"{}\"}}",
                        escape(&e.endpoint),
                        state.as_str()
                    ),
                    n as f64,
                )
            })
        })
        .collect();
    metric(
        "cronpost_deliveries",
        "gauge",
        "Deliveries by endpoint and state.",
        &deliveries,
    );
    let age = stats
        .oldest_ready_age_ms
        .map_or(0.0, |ms| ms as f64 / 1000.0);
    metric(
        "cronpost_oldest_ready_age_seconds",
        "gauge",
        "How long the oldest ready delivery has waited (0: none ready).",
        &[(String::new(), age)],
    );
    metric(
        "cronpost_unrouted_messages",
        "gauge",
        "Messages no run has routed yet.",
        &[(String::new(), stats.unrouted_messages as f64)],
    );
    metric(
        "cronpost_unroutable_messages",
        "gauge",
        "Messages no endpoint subscribes to (kept for retention).",
        &[(String::new(), stats.unroutable_messages as f64)],
    );
    let orphaned: Vec<(String, f64)> = stats
        .orphaned
        .iter()
        .map(|(endpoint, n)| (format!("{{endpoint=\"{}\"}}", escape(endpoint)), *n as f64))
        .collect();
    metric(
        "cronpost_orphaned_deliveries",
        "gauge",
        "Deliveries parked because their endpoint left the config.",
        &orphaned,
    );
    let saturated: Vec<(String, f64)> = stats
        .saturated_endpoints
        .iter()
        .map(|h| {
            let left = h.saturated_until.map_or(0, |u| (u - stats.now).max(0));
            (
                format!("{{endpoint=\"{}\"}}", escape(&h.endpoint)),
                left as f64 / 1000.0,
            )
        })
        .collect();
    metric(
        "cronpost_endpoint_cooldown_seconds",
        "gauge",
        "Cool-down left of endpoints whose circuit breaker is open or half-open.",
        &saturated,
    );
    let learned: Vec<(String, f64)> = stats
        .learned_rates
        .iter()
        .map(|r| {
            (
                format!(
                    "{{endpoint=\"{}\",reason=\"{}\"}}",
                    escape(&r.endpoint),
                    r.learned.reason.as_str()
                ),
                r.learned.rate,
            )
        })
        .collect();
    metric(
        "cronpost_endpoint_learned_rate",
        "gauge",
        "Deliveries a second an endpoint is sent at, as learned from its answers; reason: why it last changed.",
        &learned,
    );
    let held: Vec<(String, f64)> = stats
        .held_accounts
        .iter()
        .map(|h| {
            (
                format!("{{account=\"{}\"}}", escape(&h.account)),
                h.delayed as f64,
            )
        })
        .collect();
    metric(
        "cronpost_account_budget_delayed",
        "gauge",
        "Deliveries delayed by their account's budget.",
        &held,
    );
    let outcomes = |r: &RunRecord| -> Vec<(String, f64)> {
        [
            ("delivered", r.delivered),
            ("retried", r.retried),
            ("dead", r.dead),
            ("failed", r.failed),
            ("found_nothing", r.found_nothing),
            ("expired", r.expired),
            ("discarded", r.discarded),
        ]
        .iter()
        .map(|(kind, n)| (format!("{{outcome=\"{kind}\"}}"), *n as f64))
        .collect()
    };
    metric(
        "cronpost_last_run_outcomes",
        "gauge",
        "Outcomes of the last run by kind.",
        &outcomes(run),
    );
    metric(
        "cronpost_last_run_duration_seconds",
        "gauge",
        "Wall time of the last run.",
        &[(String::new(), took.as_secs_f64())],
    );
    metric(
        "cronpost_last_run_children_forked",
        "gauge",
        "Children the last run forked.",
        &[(String::new(), run.forked as f64)],
    );
    metric(
        "cronpost_last_run_timestamp_seconds",
        "gauge",
        "When the last run finished, in Unix seconds.",
        &[(
            String::new(),
            run.finished_at.unwrap_or(stats.now) as f64 / 1000.0,
        )],
    );
    metric(
        "cronpost_runs_total",
        "counter",
        "Runs recorded in the database.",
        &[(String::new(), totals.runs as f64)],
    );
    metric(
        "cronpost_outcomes_total",
        "counter",
        "Outcomes of every recorded run by kind.",
        &outcomes(&totals.sums),
    );
    metric(
        "cronpost_children_forked_total",
        "counter",
        "Children forked by every recorded run.",
        &[(String::new(), totals.sums.forked as f64)],
    );
    out
}

/// Writes the metrics file after a run, when the config names one.
pub fn publish(config: &Config, run: &RunRecord, took: Duration) -> Result<()> {
    let Some(path) = &config.metrics_file else {
        return Ok(());
    };
    let mut store = crate::store::open(config)?;
    let mut stats = store.stats(now_ms())?;
    rates_in_force(config, &mut stats);
    let text = render(&stats, run, took, &store.run_totals()?);
    write_atomically(path, &text)
}

/// Keeps, of the learned rates the database holds, those in force: of
/// endpoints in the config that learn their rate, each at most the
/// configured rate (a stored rate of an endpoint switched to `adaptive =
/// false`, or since removed, is not what it is sent at).
pub fn rates_in_force(config: &Config, stats: &mut Stats) {
    stats.learned_rates.retain_mut(|r| {
        let Some(endpoint) = config.endpoint(&r.endpoint).filter(|e| e.adaptive) else {
            return false;
        };
        if let Some(rate) = endpoint.rate {
            r.learned.rate = r.learned.rate.min(rate.per_second);
        }
        true
    });
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `text` to `path` atomically: a temporary file beside it, renamed
/// over the old one. The temporary file has an unguessable name and is
/// created with O_EXCL|O_NOFOLLOW, so a symlink planted beside it cannot
/// redirect the write; it is 0644 whatever the umask, so node_exporter (another
/// user) can read it: it holds counts, no payloads or secrets.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = crate::files::with_suffix(path, &format!(".{:016x}.tmp", rand::random::<u64>()));
    let fail = |e| Error::io(format!("metrics file {}", path.display()), e);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
