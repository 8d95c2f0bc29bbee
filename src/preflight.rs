//! What a valid config still needs from the host before a run can work:
//! the database's directory (there, and writable by this user), the
//! database itself (readable and writable), the metrics directory, and for
//! the daemon a `schedule`. `check-config` reports every problem, each with
//! its key; `run` checks the same before it does anything, so it fails at
//! once instead of after delivering (`config` checks the file itself).

use std::path::Path;

use nix::unistd::AccessFlags;

use crate::config::{self, Config, Database};
use crate::error::{Error, ExitCode, Result};

/// Every key of a config with its default (`check-config --print-defaults`);
/// a unit test parses it and compares it with the built-in defaults.
pub const DEFAULTS: &str = r#"# Every key of a cronpost config, with its default. Keys marked REQUIRED
# have none; commented keys are optional and off unless set.
database = "/var/lib/cronpost/cronpost.db"  # REQUIRED; relative paths are relative to the config file
# database_group = "cronpost"  # a new database is 0660 with this group (else 0600)
# listen_database = "postgres://..."  # PostgreSQL: a direct URL for LISTEN (default: database)
# slots_dir = "/run/cronpost"  # default: DATABASE.slots; /run/cronpost for PostgreSQL
# host_name = "web1"           # default: the machine's name; in runs and lease owners
busy_timeout = "5s"
max_payload_bytes = 262144
require_object_payload = false
# schedule = "*/5 * * * * *"   # REQUIRED for `cronpost daemon` (cron with seconds)
# metrics_file = "/var/lib/prometheus/node-exporter/cronpost.prom"
retention = "7d"
dead_retention = "30d"

[run]
max_children = 4
max_messages = 10000
max_runtime = "50s"
lease_timeout = "60s"
child_deadline = "30s"
delayed_share = 0.2
stop_grace = "10s"

[account_budget]
# rate = 100                   # deliveries per second per account (default: unlimited)
# burst = 100                  # default: the rate, rounded up
# [account_budget.overrides]
# noisy-tenant = { rate = 5, burst = 10 }

[endpoints.example]            # at least one endpoint is REQUIRED
url = "https://hooks.example.com/cronpost"  # REQUIRED
topics = ["customer.updated"]  # REQUIRED
secret = "whsec_c2VjcmV0"      # REQUIRED; or a list while rotating
mode = "fire_and_forget"       # or "confirm"
answer_window = "200ms"
timeout = "10s"
connect_timeout = "2s"
max_attempts = 8
backoff_base = "1s"
backoff_cap = "1h"
# max_in_flight = 3            # default: no cap
# rate = 20                    # default: unlimited
# burst = 20                   # default: the rate, rounded up
cooldown_base = "1s"
cooldown_cap = "5m"
max_retry_after = "1h"
# slow_after = 3               # fire_and_forget: silent answers in a row that hold it (default: off)
on_dead = "release"            # or "block": a dead delivery holds the later ones of its ordering key
adaptive = true                # learn its rate from 429/503, timeouts and slowing answers (never above `rate`)

# [topics."otp.issued"]        # settings of one topic (default: none)
# max_age = "5m"               # its messages expire this long after publication
# discard_expired = false      # true: drop expired deliveries instead of keeping dead letters
"#;

/// One thing a run would trip on: the key, what is wrong, its exit code.
struct Problem {
    key: &'static str,
    message: String,
    code: ExitCode,
}

fn user() -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::Uid::effective().to_string(), |u| u.name)
}

fn writable_dir(dir: &Path) -> std::result::Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    nix::unistd::access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|_| {
        format!(
            "directory {} is not writable by user {}",
            dir.display(),
            user()
        )
    })
}

fn problems(config: &Config) -> Vec<Problem> {
    let mut found = Vec::new();
    match config.database.sqlite_path() {
        Some(db) => sqlite_problems(config, db, &mut found),
        None if !config.slots_dir.is_dir() => {
            // A run creates it (one level), as it creates `<database>.slots`.
            if let Err(why) = writable_dir(crate::files::parent_dir(&config.slots_dir)) {
                found.push(Problem {
                    key: "slots_dir",
                    message: format!("{} cannot be created: {why}", config.slots_dir.display()),
                    code: ExitCode::CantCreate,
                });
            }
        }
        None => {}
    }
    if let Some(metrics) = &config.metrics_file
        && let Err(why) = writable_dir(crate::files::parent_dir(metrics))
    {
        found.push(Problem {
            key: "metrics_file",
            message: format!("{} cannot be written: {why}", metrics.display()),
            code: ExitCode::CantCreate,
        });
    }
    found
}

fn sqlite_problems(config: &Config, db: &Path, found: &mut Vec<Problem>) {
    let dir = crate::files::parent_dir(db);
    if !dir.is_dir() {
        found.push(Problem {
            key: "database",
            message: format!(
                "{}: directory {} does not exist",
                db.display(),
                dir.display()
            ),
            code: ExitCode::CantCreate,
        });
    } else if db.exists() {
        if let Err(e) = crate::files::check_read_write(db, config.database_group) {
            found.push(Problem {
                key: "database",
                message: e.message,
                code: e.code,
            });
        }
    } else if let Err(why) = writable_dir(dir) {
        found.push(Problem {
            key: "database",
            message: format!("{} cannot be created: {why}", db.display()),
            code: ExitCode::CantCreate,
        });
    }
}

fn as_error(config: &Config, problem: &Problem) -> Error {
    Error::new(
        problem.code,
        format!(
            "config {}: {} = {}",
            config.path.display(),
            problem.key,
            problem.message
        ),
    )
}

/// With `database_group`, the database's directory must be setgid and of
/// that group: SQLite makes the -wal and -shm files with the database's
/// mode, and only such a directory gives them its group, whoever makes them.
fn sharing_warning(config: &Config) -> Option<String> {
    let gid = config.database_group?;
    let db = config.database.sqlite_path()?;
    let dir = crate::files::parent_dir(db);
    if !dir.is_dir() || crate::files::directory_shares_group(db, gid) {
        return None;
    }
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name);
    Some(format!(
        "database_group = {group:?}, but directory {} is not setgid group {group}: the -wal and -shm files SQLite makes there get their creator's group, and the other users cannot open the database (chgrp {group} {} && chmod g+s {})",
        dir.display(),
        dir.display(),
        dir.display()
    ))
}

/// Before a run: the first problem a run would trip on, as an error; a
/// sharing that will not work for the group is a warning.
pub fn check_for_run(config: &Config) -> Result<()> {
    if let Some(warning) = sharing_warning(config) {
        log::warn!("{warning}");
    }
    match problems(config).first() {
        Some(problem) => Err(as_error(config, problem)),
        None => Ok(()),
    }
}

/// `cronpost check-config`: the config is valid (else loading it failed),
/// then every problem a run would trip on, one line each; the exit code is
/// the first problem's.
pub fn check_config(config: &Config) -> Result<()> {
    let mut out = format!("config {} is valid\n", config.path.display());
    let mut found = Vec::new();
    match &config.database {
        Database::Sqlite(db) => {
            out += &format!(
                "database: {}{}\n",
                db.display(),
                if db.exists() {
                    ""
                } else {
                    " (created by the first command that opens it)"
                }
            )
        }
        Database::Postgres(url) => {
            match crate::store::PostgresStore::open_existing(url, config.busy_timeout)
                .and_then(|mut store| crate::store::Store::schema_version(&mut store))
            {
                Ok(version) => {
                    out += &format!(
                        "database: {} (PostgreSQL, schema version {version} of {}; slots in {})\n",
                        config.database,
                        crate::store::PostgresStore::latest_schema_version(),
                        config.slots_dir.display()
                    )
                }
                Err(e) => found.push(Problem {
                    key: "database",
                    message: e.message,
                    code: e.code,
                }),
            }
        }
    }
    for e in &config.endpoints {
        out += &format!(
            "endpoint {}: {} ({}), topics: {}\n",
            e.name,
            config::redacted(&e.url),
            e.mode.as_str(),
            e.topics.join(", ")
        );
        if !e.url.username().is_empty() {
            out += &format!(
                "endpoint {}: the URL's user and password are sent as Basic auth\n",
                e.name
            );
        }
    }
    if config.schedule.is_none() {
        out +=
            "warning: schedule is not set: `cronpost daemon` needs it (`cronpost run` does not)\n";
    }
    if let Some(warning) = sharing_warning(config) {
        out += &format!("warning: {warning}\n");
    }
    for warning in &config.warnings {
        out += &format!("warning: {warning}\n");
    }
    print!("{out}");
    found.extend(problems(config));
    for problem in found.iter().skip(1) {
        eprintln!("cronpost: {}", as_error(config, problem));
    }
    match found.first() {
        Some(problem) => Err(as_error(config, problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_defaults_are_the_defaults() {
        let printed = Config::parse(DEFAULTS, Path::new("/etc/cronpost/cronpost.toml")).unwrap();
        let minimal = Config::parse(
            "database = \"/var/lib/cronpost/cronpost.db\"\n[endpoints.example]\nurl = \"https://hooks.example.com/cronpost\"\ntopics = [\"customer.updated\"]\nsecret = \"whsec_c2VjcmV0\"\n",
            Path::new("/etc/cronpost/cronpost.toml"),
        )
        .unwrap();
        assert_eq!(format!("{:?}", printed.run), format!("{:?}", minimal.run));
        assert_eq!(
            format!("{:?}", printed.endpoints),
            format!("{:?}", minimal.endpoints)
        );
        assert_eq!(printed.account_budget, minimal.account_budget);
        assert_eq!(
            (
                printed.busy_timeout,
                printed.max_payload_bytes,
                printed.require_object_payload,
                printed.retention
            ),
            (
                minimal.busy_timeout,
                minimal.max_payload_bytes,
                minimal.require_object_payload,
                minimal.retention
            )
        );
    }
}
