//! `cronpost daemon`: a long-lived parent that is always in a dispatcher
//! run. Each run lingers until the next time of the config's cron
//! `schedule` (or its `max_runtime`), delivering new work as it comes (the
//! keeper wakes it within milliseconds) and retries at their due time; that
//! time starts the next run, with its own record and metrics. Runs never
//! overlap within the daemon: a time that passes while a busy run goes is
//! skipped (and logged). Under systemd (Type=notify) it reports READY,
//! STATUS (the last run's summary), WATCHDOG while healthy, RELOADING and
//! STOPPING; without systemd those are no-ops. SIGTERM/SIGINT stop it after
//! the current run's grace period; SIGHUP ends a lingering run and reloads
//! the config, keeping the old one when the new one is bad.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Local;
use sd_notify::NotifyState;

use crate::config::Config;
use crate::dispatcher;
use crate::error::{Error, Result};
use crate::metrics;
use crate::signals::Signals;

/// Talks to systemd's notify socket; silent when there is none.
struct Notifier {
    watchdog: Option<Duration>,
    last_beat: Instant,
}

impl Notifier {
    fn new() -> Notifier {
        Notifier {
            watchdog: sd_notify::watchdog_enabled(),
            last_beat: Instant::now(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("cannot notify systemd: {e}");
        }
    }

    /// WATCHDOG=1, at twice the rate systemd asks for.
    fn beat(&mut self) {
        if let Some(interval) = self.watchdog
            && self.last_beat.elapsed() >= interval / 2
        {
            self.send(&[NotifyState::Watchdog]);
            self.last_beat = Instant::now();
        }
    }
}

/// Runs the daemon with `config` (read from `config_path`, read again on
/// SIGHUP) until SIGTERM/SIGINT.
pub fn run(config_path: &Path, config: Config) -> Result<()> {
    let mut config = with_schedule(config)?;
    // Create or migrate the database now, before READY: a long migration
    // then counts against the start timeout, not the watchdog.
    drop(crate::store::open(&config)?);
    let signals = Signals::install()?;
    let mut notifier = Notifier::new();
    log::info!(
        "daemon started: schedule {:?}, database {}",
        schedule_text(&config),
        config.database
    );
    notifier.send(&[
        NotifyState::Ready,
        NotifyState::Status("first run starting"),
    ]);
    loop {
        if signals.stop_requested() {
            break;
        }
        if signals.take_reload() {
            notifier.send(&reloading());
            let status = reload(config_path, &mut config);
            notifier.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
            continue;
        }
        // A run lingers until the next time of the schedule (or its
        // max_runtime), delivering work as it comes; that time starts the
        // next run.
        let next = next_fire(&config)?;
        let until = Instant::now() + (next - Local::now()).to_std().unwrap_or_default();
        let started = Instant::now();
        let status =
            match dispatcher::run_once(&config, &signals, &mut || notifier.beat(), Some(until)) {
                Ok(run) => {
                    let took = started.elapsed();
                    if let Err(e) = metrics::publish(&config, &run, took) {
                        log::error!("{e}");
                    }
                    dispatcher::summary(&run, took)
                }
                Err(e) => {
                    log::error!("run failed: {e}");
                    // Not again at once: at the next time of the schedule.
                    while !signals.stop_requested() && !signals.reload_requested() {
                        let left = (next - Local::now()).to_std().unwrap_or_default();
                        if left.is_zero() {
                            break;
                        }
                        notifier.beat();
                        signals.wait(left.min(Duration::from_secs(1)));
                    }
                    format!("last run failed: {e}")
                }
            };
        notifier.send(&[NotifyState::Status(&status)]);
        let skipped = fires_between(&config, next, Local::now());
        if skipped > 0 {
            log::warn!(
                "the run took {:.1}s: skipped {skipped} scheduled times",
                started.elapsed().as_secs_f64()
            );
        }
    }
    log::info!("daemon stopping");
    notifier.send(&[NotifyState::Stopping]);
    Ok(())
}

fn load(path: &Path) -> Result<Config> {
    with_schedule(Config::load(path)?)
}

fn with_schedule(config: Config) -> Result<Config> {
    if config.schedule.is_none() {
        return Err(Error::config(format!(
            "config {}: schedule is required for `cronpost daemon`, e.g. schedule = \"*/5 * * * * *\"",
            config.path.display()
        )));
    }
    Ok(config)
}

/// RELOADING=1, with the monotonic time systemd 253+ asks for.
fn reloading() -> Vec<NotifyState<'static>> {
    let mut states = vec![NotifyState::Reloading];
    states.extend(NotifyState::monotonic_usec_now().ok());
    states
}

/// Reloads the config from `path` into `config`, unless the new one is bad;
/// returns the status line for systemd.
fn reload(path: &Path, config: &mut Config) -> String {
    match load(path) {
        Ok(new) => {
            log::info!(
                "config reloaded from {}: schedule {:?}",
                path.display(),
                schedule_text(&new)
            );
            *config = new;
            "config reloaded".to_string()
        }
        Err(e) => {
            log::error!("config reload failed, keeping the old config: {e}");
            format!("config reload failed, kept the old config: {e}")
        }
    }
}

fn schedule_text(config: &Config) -> &str {
    config.schedule.as_ref().map_or("", |(_, text)| text)
}

fn next_fire(config: &Config) -> Result<chrono::DateTime<Local>> {
    let (schedule, text) = config.schedule.as_ref().expect("load checks the schedule");
    schedule
        .after(&Local::now())
        .next()
        .ok_or_else(|| Error::config(format!("schedule {text:?} has no time left to run")))
}

/// Scheduled times strictly after `from` and not after `to`.
fn fires_between(
    config: &Config,
    from: chrono::DateTime<Local>,
    to: chrono::DateTime<Local>,
) -> usize {
    let (schedule, _) = config.schedule.as_ref().expect("load checks the schedule");
    schedule
        .after(&from)
        .take_while(|t| *t <= to)
        .take(1_000_000)
        .count()
}
