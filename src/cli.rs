//! The `cronpost` command line: parses arguments with clap, runs one command,
//! and turns its outcome into output and a sysexits exit code. The commands
//! that read the config take `--config` (or CRONPOST_CONFIG); `receive` and
//! `demo` do not read one, so they do not take it.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Config, Secret};
use crate::error::{Error, ExitCode, Result};
use crate::ids::{DeliveryId, MessageRef};
use crate::signals::Signals;
use crate::store::{DeliveryFilter, DeliveryState, ms, now_ms, reason};
use crate::{admin, daemon, demo, dispatcher, enqueue, metrics, preflight, receiver};

/// cronpost: a SQLite-backed webhook dispatcher.
#[derive(Parser, Debug)]
#[command(name = "cronpost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The config file, for the commands that read one.
#[derive(Args, Debug)]
struct ConfigArg {
    /// The config file.
    #[arg(
        long,
        env = "CRONPOST_CONFIG",
        default_value = config::DEFAULT_PATH,
        value_name = "PATH"
    )]
    config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        Config::load(&self.config)
    }
}

/// `--json`, for the commands that print something for scripts.
#[derive(Args, Debug)]
struct JsonArg {
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One dispatcher run: route, fork children, deliver, exit (for a timer).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Once out of work, wait for more until run.max_runtime instead of
        /// ending (new messages leave within milliseconds).
        #[arg(long)]
        linger: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Start a run at each time of the config's cron `schedule` (systemd Type=notify).
    Daemon {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Publish one message (payload from --data or stdin), or many with --ndjson.
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        args: EnqueueArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Queue depth per endpoint and state, held accounts, saturated and
    /// removed endpoints, the last run.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List deliveries, oldest first, with their delivery id (d..), message
    /// id and uid.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: ListFilter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show one message, its deliveries and every attempt: by message id
    /// (42), uid (msg_...) or delivery id (d58, as `list` prints it).
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// A message id, a uid or a delivery id (d58).
        id: MessageRef,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Put dead (or delayed) deliveries back in the ready queue, by delivery
    /// id or by filter; or route unroutable messages again.
    Requeue {
        #[command(flatten)]
        config: ConfigArg,
        /// Delivery ids (17 or d17); else every delivery the filters match.
        ids: Vec<DeliveryId>,
        #[command(flatten)]
        filter: RequeueFilter,
        /// The messages marked unroutable (no endpoint subscribed to their
        /// topic): routed again by the next run.
        #[arg(long, conflicts_with_all = ["ids", "state", "endpoint", "account", "topic", "reason", "since", "ordering_key"])]
        unroutable: bool,
        /// Spread them out: this many a second (50/s; also /m, /h), the
        /// first now, so a recovered endpoint is not hit by all at once.
        #[arg(long, value_parser = parse_rate, value_name = "N/s", conflicts_with = "unroutable")]
        rate: Option<u64>,
        /// At most this many, oldest first.
        #[arg(long, conflicts_with = "unroutable")]
        limit: Option<u64>,
        /// Count what would be requeued; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Delete delivered history older than a duration, in small batches; or
    /// the deliveries parked because their endpoint left the config.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["older_than", "orphaned"])))]
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// How old delivered history must be, e.g. 7d, 12h.
        #[arg(long, value_parser = parse_age, conflicts_with = "orphaned")]
        older_than: Option<std::time::Duration>,
        /// The deliveries of endpoints no longer in the config.
        #[arg(long)]
        orphaned: bool,
        /// With --orphaned: only those of this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// With --orphaned: count what would be purged; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Write a consistent copy of the queue to PATH while runs go on (the
    /// database's group and mode; never overwrites).
    Backup {
        #[command(flatten)]
        config: ConfigArg,
        /// Where the copy goes; must not exist.
        path: PathBuf,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Check the config file and what a run will need (directories, group,
    /// schedule); exit non-zero naming each problem.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Print a config with every key and its default, and exit.
        #[arg(long)]
        print_defaults: bool,
    },
    /// Create or migrate the database and exit.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// A webhook receiver on 127.0.0.1 that prints what arrives.
    Receive {
        /// Port (0: any free port; the address is printed first).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Verify signatures with the secret in this file (whsec_... or raw;
        /// or set CRONPOST_RECEIVE_SECRET). Not on the command line, where
        /// every local user can read it.
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
        /// Answer 401 to a request whose signature or timestamp (more than
        /// 5 minutes off) does not verify.
        #[arg(long)]
        reject_invalid: bool,
        /// The status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Exit after this many requests.
        #[arg(long)]
        count: Option<u64>,
        /// Return once listening and serve in the background (its output
        /// still goes where stdout goes).
        #[arg(long)]
        detach: bool,
    },
    /// A demo in a temporary directory: receiver, config, messages, one run.
    Demo,
}

/// The filters of `list`.
#[derive(Args, Debug)]
struct ListFilter {
    /// Only deliveries in this state.
    #[arg(long, value_parser = ["ready", "delayed", "leased", "delivered", "dead"])]
    state: Option<String>,
    #[command(flatten)]
    common: CommonFilter,
}

/// The filters of `requeue`: only dead and delayed deliveries move.
#[derive(Args, Debug)]
struct RequeueFilter {
    /// Only deliveries in this state (by filter alone: dead).
    #[arg(long, value_parser = ["dead", "delayed"])]
    state: Option<String>,
    #[command(flatten)]
    common: CommonFilter,
}

/// Filters shared by `list` and `requeue`.
#[derive(Args, Debug)]
struct CommonFilter {
    /// Only deliveries to this endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// Only deliveries of this account.
    #[arg(long)]
    account: Option<String>,
    /// Only deliveries of this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only deliveries delayed, or dead, for this reason.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::store::reason::ALL))]
    reason: Option<String>,
    /// Only deliveries that changed (dead letters: died) in the last AGE,
    /// e.g. 2h.
    #[arg(long, value_parser = parse_age, value_name = "AGE")]
    since: Option<std::time::Duration>,
    /// Only deliveries of messages with this ordering key.
    #[arg(long, value_name = "KEY")]
    ordering_key: Option<String>,
}

impl CommonFilter {
    fn into_filter(self, ids: Vec<i64>, state: Option<String>) -> DeliveryFilter {
        DeliveryFilter {
            ids,
            state: state.as_deref().and_then(DeliveryState::parse),
            endpoint: self.endpoint,
            account: self.account,
            topic: self.topic,
            reason: self.reason,
            since: self.since.map(|age| now_ms().saturating_sub(ms(age))),
            ordering_key: self.ordering_key,
        }
    }
}

/// A rate such as `50/s`, `600/m` or `100/h` (a bare number: per second),
/// as the milliseconds between two deliveries (at least 1).
fn parse_rate(text: &str) -> std::result::Result<u64, String> {
    let (count, per_ms) = match text.split_once('/') {
        None => (text, 1_000.0),
        Some((count, "s")) => (count, 1_000.0),
        Some((count, "m")) => (count, 60_000.0),
        Some((count, "h")) => (count, 3_600_000.0),
        Some((_, unit)) => return Err(format!("unknown unit /{unit} (like 50/s, 600/m, 100/h)")),
    };
    match count.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(((per_ms / n).round() as u64).max(1)),
        _ => Err(format!(
            "{text:?} is not a positive rate (like 50/s, 600/m, 100/h)"
        )),
    }
}

/// A duration with its unit; a bare number is refused with an example.
fn parse_age(text: &str) -> std::result::Result<std::time::Duration, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text} needs a unit, like {text}d or {text}h"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (like 7d or 12h)"))
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
    /// A second message of the account with this key is skipped.
    #[arg(long)]
    dedup_key: Option<String>,
    /// Never delivered after this long (e.g. 10m): it expires instead
    /// (default: its topic's max_age, else never).
    #[arg(long, conflicts_with = "expires_at")]
    ttl: Option<String>,
    /// Never delivered after this time (RFC 3339, e.g. 2026-12-24T18:00:00Z).
    #[arg(long)]
    expires_at: Option<String>,
    /// Messages with one ordering key reach each endpoint one at a time, in
    /// publication order (e.g. the id of the customer they are about).
    #[arg(long)]
    ordering_key: Option<String>,
    /// The JSON payload (else read from stdin).
    #[arg(long)]
    data: Option<String>,
    /// Read many messages from stdin, one JSON object per line:
    /// {"topic":..,"account":..,"payload":..,"priority":..,"delay":"30s","dedup_key":..,
    /// "ttl":"10m" or "expires_at":"2026-12-24T18:00:00Z","ordering_key":..}.
    #[arg(long, conflicts_with_all = ["topic", "account", "priority", "delay", "dedup_key", "data", "ttl", "expires_at", "ordering_key"])]
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
    match execute(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cronpost: {e}");
            e.code as i32
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            linger,
            json,
        } => {
            let config = config.load()?;
            preflight::check_for_run(&config)?;
            let signals = Signals::install()?;
            let started = std::time::Instant::now();
            let started_at = std::time::Instant::now();
            let linger = linger.then(|| started_at + config.run.max_runtime);
            let run = dispatcher::run_once(&config, &signals, &mut || {}, linger)?;
            metrics::publish(&config, &run, started.elapsed())?;
            if json.json {
                print_line(&admin::run_json(&run))?;
            }
            Ok(())
        }
        Command::Daemon { config } => {
            let path = config.config.clone();
            let config = config.load()?;
            preflight::check_for_run(&config)?;
            daemon::run(&path, config)
        }
        Command::Enqueue { config, args, json } => enqueue(&config.load()?, args, json.json),
        Command::Stats { config, json } => admin::stats(&config.load()?, json.json),
        Command::List {
            config,
            filter,
            limit,
            json,
        } => admin::list(
            &config.load()?,
            &filter.common.into_filter(Vec::new(), filter.state),
            limit,
            json.json,
        ),
        Command::Show { config, id, json } => admin::show(&config.load()?, &id, json.json),
        Command::Requeue {
            config,
            ids,
            filter,
            unroutable,
            rate,
            limit,
            dry_run,
            json,
        } => {
            let config = config.load()?;
            if unroutable {
                return admin::requeue_unroutable(&config, dry_run, json.json);
            }
            let ids = ids.into_iter().map(|id| id.0).collect();
            let mut filter = filter.common.into_filter(ids, filter.state);
            if filter.ids.is_empty() && filter.state.is_none() {
                // By filter alone, the dead-letter queue is what an admin
                // means, or the state its reason names.
                filter.state = Some(
                    filter
                        .reason
                        .as_deref()
                        .map_or(DeliveryState::Dead, reason::state_of),
                );
            }
            let how = admin::Requeue {
                limit,
                spacing_ms: rate.map_or(0, |ms| ms as i64),
                dry_run,
            };
            admin::requeue(&config, filter, how, json.json)
        }
        Command::Purge {
            config,
            older_than,
            orphaned,
            endpoint,
            dry_run,
            json,
        } => match older_than {
            Some(_) if dry_run || endpoint.is_some() => Err(Error::usage(
                "--dry-run and --endpoint go with --orphaned; delivered history is purged by age alone",
            )),
            Some(age) if !orphaned => admin::purge(&config.load()?, age, json.json),
            _ => admin::purge_orphaned(&config.load()?, endpoint.as_deref(), dry_run, json.json),
        },
        Command::Backup { config, path, json } => admin::backup(&config.load()?, &path, json.json),
        Command::CheckConfig {
            config,
            print_defaults,
        } => {
            if print_defaults {
                return print_line(preflight::DEFAULTS.trim_end());
            }
            preflight::check_config(&config.load()?)
        }
        Command::Migrate { config } => {
            let config = config.load()?;
            let mut store = crate::store::open(&config)?;
            print_line(&format!(
                "database {} is at schema version {}",
                config.database,
                store.schema_version()?
            ))
        }
        Command::Receive {
            port,
            secret_file,
            reject_invalid,
            status,
            count,
            detach,
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
                detach,
            })
        }
        Command::Demo => demo::run(),
    }
}

fn print_line(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").map_err(|e| Error::io("stdout", e))
}

fn enqueue(config: &Config, args: EnqueueArgs, as_json: bool) -> Result<()> {
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
            expiry: enqueue::Expiry::from_parts(args.ttl.as_deref(), args.expires_at.as_deref())?,
            ordering_key: args.ordering_key,
        };
        vec![draft.validate(config, now)?]
    };
    let mut store = crate::store::open_durable(config)?;
    let report = store.messages_insert(&messages)?;
    if as_json {
        let ids: Vec<_> = report
            .messages
            .iter()
            .map(|m| json!({"id": m.id, "uid": m.uid}))
            .collect();
        return print_line(
            &json!({"inserted": report.inserted, "duplicates": report.duplicates, "messages": ids})
                .to_string(),
        );
    }
    let mut text = format!(
        "enqueued {}",
        crate::words::plural(report.inserted as u64, "message", "messages")
    );
    match report.messages.as_slice() {
        [] => {}
        [one] => text += &format!(": id {} (uid {})", one.id, one.uid),
        [first, .., last] => text += &format!(": ids {} to {}", first.id, last.id),
    }
    if report.duplicates > 0 {
        text += &format!(
            " ({} skipped: the account's dedup key was enqueued already)",
            report.duplicates
        );
    }
    print_line(&text)
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
