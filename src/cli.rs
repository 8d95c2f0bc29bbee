//! The `cronpost` command line: parses arguments with clap, runs one command,
//! and turns its outcome into output and a sysexits exit code.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Config, Secret};
use crate::error::{Error, ExitCode, Result};
use crate::signals::Signals;
use crate::store::{DeliveryFilter, DeliveryState, Stats, Store, now_ms};
use crate::{admin, daemon, demo, dispatcher, enqueue, metrics, receiver};

/// cronpost: a SQLite-backed webhook dispatcher.
#[derive(Parser, Debug)]
#[command(name = "cronpost", version, about)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "CRONPOST_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One dispatcher run: route, fork children, deliver, exit (for a timer).
    Run,
    /// Start a run at each time of the config's cron `schedule` (systemd Type=notify).
    Daemon,
    /// Publish one message (payload from --data or stdin), or many with --ndjson.
    Enqueue(EnqueueArgs),
    /// Queue depth per endpoint and state, oldest ready age, the last run.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List deliveries, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message (by id or msg_... uid), its deliveries and every attempt.
    Show {
        /// The message id or uid.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead (or delayed) deliveries back in the ready queue, by id or by filter.
    Requeue {
        /// Delivery ids (else every delivery the filters match).
        ids: Vec<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Count what would be requeued; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete delivered history older than a duration, in small batches; or
    /// the deliveries parked because their endpoint left the config.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["older_than", "orphaned"])))]
    Purge {
        /// e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// The deliveries of endpoints no longer in the config.
        #[arg(long)]
        orphaned: bool,
        /// With --orphaned: only those of this endpoint.
        #[arg(long, requires = "orphaned")]
        endpoint: Option<String>,
        /// Count what would be purged; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config file and exit.
    CheckConfig,
    /// Create or migrate the database and exit.
    Migrate,
    /// A webhook receiver on 127.0.0.1 that prints what arrives.
    Receive {
        /// Port (0: any free port; the address is printed first).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Verify signatures with the secret in this file (whsec_... or raw;
        /// or set CRONPOST_RECEIVE_SECRET). Not on the command line, where
        /// every local user can read it.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Answer 401 to a request whose signature or timestamp (more than
        /// 5 minutes off) does not verify.
        #[arg(long, requires = "secret_file")]
        reject_invalid: bool,
        /// The status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Exit after this many requests.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A demo in a temporary directory: receiver, config, messages, one run.
    Demo,
}

/// Filters shared by `list` and `requeue`.
#[derive(Args, Debug)]
struct FilterArgs {
    /// ready, delayed, leased, delivered or dead.
    #[arg(long, value_parser = parse_state)]
    state: Option<DeliveryState>,
    /// Only deliveries to this endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// Only deliveries of this account.
    #[arg(long)]
    account: Option<String>,
    /// Only deliveries of this topic.
    #[arg(long)]
    topic: Option<String>,
}

impl FilterArgs {
    fn into_filter(self, ids: Vec<i64>) -> DeliveryFilter {
        DeliveryFilter {
            ids,
            state: self.state,
            endpoint: self.endpoint,
            account: self.account,
            topic: self.topic,
        }
    }
}

fn parse_state(text: &str) -> std::result::Result<DeliveryState, String> {
    DeliveryState::parse(text)
        .ok_or_else(|| format!("{text:?} is not one of ready, delayed, leased, delivered, dead"))
}

#[derive(Args, Debug)]
struct EnqueueArgs {
    /// Topic (routed to the endpoints subscribing to it).
    #[arg(long, required_unless_present = "ndjson")]
    topic: Option<String>,
    /// The account publishing it.
    #[arg(long, required_unless_present = "ndjson")]
    account: Option<String>,
    /// Priority, higher first (-1000..=1000).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// Do not deliver before this delay, e.g. 30s, 5m.
    #[arg(long)]
    delay: Option<String>,
    /// A message with a key already enqueued is skipped.
    #[arg(long)]
    dedup_key: Option<String>,
    /// The JSON payload (else read from stdin).
    #[arg(long)]
    data: Option<String>,
    /// Read many messages from stdin, one JSON object per line:
    /// {"topic":..,"account":..,"payload":..,"priority":..,"delay":"30s","dedup_key":..}.
    #[arg(long, conflicts_with_all = ["topic", "account", "priority", "delay", "dedup_key", "data"])]
    ndjson: bool,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    // A file-size limit (RLIMIT_FSIZE) must fail a write with EFBIG, which
    // SQLite reports and rolls back, not kill us halfway through a commit.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    // rusqlite_migration logs every open at info; its news is in `migrate`.
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,rusqlite_migration=warn"),
    );
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald stamps every line itself.
        logger.format_timestamp(None);
    }
    logger.init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::Usage as i32
            } else {
                0
            };
        }
    };
    match execute(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cronpost: {e}");
            e.code as i32
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Receive {
            port,
            secret_file,
            reject_invalid,
            status,
            count,
        } => {
            let secret = receiver_secret(secret_file.as_deref())?;
            if reject_invalid && secret.is_none() {
                return Err(Error::usage(
                    "--reject-invalid needs a secret: --secret-file or CRONPOST_RECEIVE_SECRET",
                ));
            }
            receiver::serve(receiver::Options {
                port,
                secret,
                reject_invalid,
                status,
                count,
            })
        }
        Command::Demo => demo::run(),
        command => {
            let config = Config::load(&cli.config)?;
            match command {
                Command::Run => {
                    let signals = Signals::install()?;
                    let started = std::time::Instant::now();
                    let run = dispatcher::run_once(&config, &signals, &mut || {})?;
                    metrics::publish(&config, &run, started.elapsed())
                }
                Command::Daemon => daemon::run(&cli.config, config),
                Command::Enqueue(args) => enqueue(&config, args),
                Command::Stats { json } => stats(&config, json),
                Command::CheckConfig => check_config(&config),
                Command::List {
                    filter,
                    limit,
                    json,
                } => admin::list(&config, &filter.into_filter(Vec::new()), limit, json),
                Command::Show { id, json } => admin::show(&config, &id, json),
                Command::Requeue {
                    ids,
                    filter,
                    dry_run,
                    json,
                } => {
                    let mut filter = filter.into_filter(ids);
                    if filter.ids.is_empty() && filter.state.is_none() {
                        // By filter alone, the dead-letter queue is what an admin means.
                        filter.state = Some(DeliveryState::Dead);
                    }
                    admin::requeue(&config, filter, dry_run, json)
                }
                Command::Purge {
                    older_than,
                    orphaned,
                    endpoint,
                    dry_run,
                    json,
                } => match older_than {
                    Some(older_than) if !orphaned => {
                        admin::purge(&config, older_than, dry_run, json)
                    }
                    _ => admin::purge_orphaned(&config, endpoint.as_deref(), dry_run, json),
                },
                Command::Migrate => {
                    let store = crate::store::open(&config)?;
                    println!(
                        "database {} is at schema version {}",
                        config.database.display(),
                        store.schema_version()?
                    );
                    Ok(())
                }
                Command::Receive { .. } | Command::Demo => unreachable!("handled above"),
            }
        }
    }
}

fn enqueue(config: &Config, args: EnqueueArgs) -> Result<()> {
    let now = now_ms();
    let messages = if args.ndjson {
        enqueue::read_ndjson(config, std::io::stdin().lock(), now)?
    } else {
        let payload = match args.data {
            Some(data) => data,
            None => enqueue::read_payload(std::io::stdin().lock(), config.max_payload_bytes)?,
        };
        let draft = enqueue::Draft {
            topic: args.topic.unwrap_or_default(),
            account: args.account.unwrap_or_default(),
            payload,
            priority: args.priority,
            delay: args
                .delay
                .as_deref()
                .map(enqueue::parse_delay)
                .transpose()?,
            dedup_key: args.dedup_key,
        };
        vec![draft.validate(config, now)?]
    };
    let mut store = crate::store::open_durable(config)?;
    let report = store.messages_insert(&messages)?;
    println!(
        "enqueued {} message{}{}",
        report.inserted,
        if report.inserted == 1 { "" } else { "s" },
        if report.duplicates > 0 {
            format!(
                " ({} skipped: dedup key already enqueued)",
                report.duplicates
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The receiver's secret: from `--secret-file`, else from the environment.
fn receiver_secret(file: Option<&std::path::Path>) -> Result<Option<Secret>> {
    let (text, origin) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("--secret-file {}", path.display()), e))?,
            format!("--secret-file {}", path.display()),
        ),
        None => match std::env::var("CRONPOST_RECEIVE_SECRET") {
            Ok(text) => (text, "CRONPOST_RECEIVE_SECRET".to_string()),
            Err(_) => return Ok(None),
        },
    };
    Secret::parse(text.trim())
        .map(Some)
        .map_err(|e| Error::usage(format!("{origin}: the secret {e}")))
}

fn check_config(config: &Config) -> Result<()> {
    println!("config {} is valid", config.path.display());
    println!("database: {}", config.database.display());
    for e in &config.endpoints {
        println!(
            "endpoint {}: {} ({}), topics: {}",
            e.name,
            config::redacted(&e.url),
            e.mode.as_str(),
            e.topics.join(", ")
        );
    }
    Ok(())
}

fn stats(config: &Config, as_json: bool) -> Result<()> {
    let mut store = crate::store::open(config)?;
    let stats = store.stats(now_ms())?;
    let mut out = std::io::stdout().lock();
    let written = if as_json {
        writeln!(out, "{}", stats_json(&stats))
    } else {
        write_stats_table(&mut out, &stats)
    };
    written.map_err(|e| Error::io("stdout", e))
}

fn stats_json(stats: &Stats) -> serde_json::Value {
    let endpoints: Vec<_> = stats
        .endpoints
        .iter()
        .map(|e| {
            let mut row = serde_json::Map::new();
            row.insert("endpoint".into(), json!(e.endpoint));
            for (state, n) in DeliveryState::ALL.iter().zip(e.by_state) {
                row.insert(state.as_str().into(), json!(n));
            }
            serde_json::Value::Object(row)
        })
        .collect();
    let last_run = stats.last_run.as_ref().map(|r| {
        json!({
            "id": r.id, "pid": r.pid, "started_at_ms": r.started_at, "finished_at_ms": r.finished_at,
            "routed": r.routed, "reclaimed": r.reclaimed, "forked": r.forked, "delivered": r.delivered,
            "retried": r.retried, "dead": r.dead, "failed": r.failed,
        })
    });
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
                "cooldown_left_seconds": h.saturated_until.map(|u| ((u - stats.now).max(0)) as f64 / 1000.0),
                "failures": h.failures, "last_error": h.last_error,
            })
        })
        .collect();
    let orphaned: Vec<_> = stats
        .orphaned
        .iter()
        .map(|(endpoint, n)| json!({"endpoint": endpoint, "deliveries": n}))
        .collect();
    json!({
        "held_accounts": held_accounts,
        "saturated_endpoints": saturated,
        "orphaned": orphaned,
        "unroutable_messages": stats.unroutable_messages,
        "endpoints": endpoints,
        "oldest_ready_age_seconds": stats.oldest_ready_age_ms.map(|ms| ms as f64 / 1000.0),
        "unrouted_messages": stats.unrouted_messages,
        "last_run": last_run,
        "last_run_attempts": attempts,
    })
}

fn write_stats_table(out: &mut impl Write, stats: &Stats) -> std::io::Result<()> {
    write!(out, "{:<20}", "endpoint")?;
    for state in DeliveryState::ALL {
        write!(out, " {:>10}", state.as_str())?;
    }
    writeln!(out)?;
    for e in &stats.endpoints {
        write!(out, "{:<20}", e.endpoint)?;
        for n in e.by_state {
            write!(out, " {n:>10}")?;
        }
        writeln!(out)?;
    }
    match stats.oldest_ready_age_ms {
        Some(age) => writeln!(out, "oldest ready: {:.1}s old", age as f64 / 1000.0)?,
        None => writeln!(out, "oldest ready: none ready")?,
    }
    writeln!(out, "unrouted messages: {}", stats.unrouted_messages)?;
    if stats.unroutable_messages > 0 {
        writeln!(
            out,
            "unroutable messages: {} (no endpoint subscribes to their topic; see the unroutable_messages view)",
            stats.unroutable_messages
        )?;
    }
    for (endpoint, n) in &stats.orphaned {
        writeln!(
            out,
            "endpoint {endpoint} is not in the config: {n} deliveries parked (back when it returns; `cronpost purge --orphaned` removes them)"
        )?;
    }
    for h in &stats.held_accounts {
        writeln!(
            out,
            "account {} held back by its budget: {} deliveries delayed, the last until {:.1}s from now",
            h.account,
            h.delayed,
            (h.until - stats.now).max(0) as f64 / 1000.0
        )?;
    }
    for h in &stats.saturated_endpoints {
        let state = match h.saturated_until {
            Some(until) if until > stats.now => {
                format!(
                    "saturated, cool-down {:.1}s left",
                    (until - stats.now) as f64 / 1000.0
                )
            }
            _ => "cool-down over, waiting for a probe to succeed".to_string(),
        };
        writeln!(
            out,
            "endpoint {} {state} ({} signals in a row; last: {})",
            h.endpoint,
            h.failures,
            h.last_error.as_deref().unwrap_or("-")
        )?;
    }
    if let Some(r) = &stats.last_run {
        let took = r.finished_at.map_or("still running".to_string(), |f| {
            format!("{:.2}s", (f - r.started_at) as f64 / 1000.0)
        });
        writeln!(
            out,
            "last run {} (pid {}, {took}): forked {}, delivered {}, retried {}, dead {}, failed {}",
            r.id, r.pid, r.forked, r.delivered, r.retried, r.dead, r.failed
        )?;
        let attempts: Vec<String> = stats
            .last_run_attempts
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        writeln!(
            out,
            "attempts in last run: {}",
            if attempts.is_empty() {
                "none".into()
            } else {
                attempts.join(", ")
            }
        )?;
    }
    Ok(())
}
