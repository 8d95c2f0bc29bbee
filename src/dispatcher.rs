//! The dispatcher parent: one run. It prepares the queue (migrate, route,
//! reclaim expired leases), then forks children, each delivering one
//! message, at most `max_children` alive across every process dispatching
//! from the database (see `slots`); it reaps them, kills any past its
//! deadline, and settles the leases of children that died. It stays
//! single-threaded and holds no database connection while it forks: it opens
//! one only for short bookkeeping steps between forks, and children open
//! their own. It sleeps in poll(2) on the signal pipe (see `signals`), never
//! blindly. SIGTERM/SIGINT stop the forking; children in flight get
//! `stop_grace` to finish before they are killed and their leases settled.

use std::collections::HashMap;
use std::fs::File;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::child::{self, ChildContext, ChildExit};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keeper::Keeper;
use crate::lease;
use crate::routing;
use crate::signals::Signals;
use crate::slots::Slots;
use crate::store::{ExpireParams, Queue, ReclaimParams, RunRecord, Store, now_ms};

/// Retention batches (of `retention::PURGE_BATCH`) at the end of each run.
const RETENTION_BATCHES_PER_RUN: usize = 5;
/// How long to wait before forking again when every slot was taken by
/// another process's children, and at most when the counted work was all
/// held back (see `pause_held_back`).
const HELD_BACK_PAUSE: Duration = Duration::from_millis(50);
/// The shortest such wait, when a delivery comes due sooner: each look
/// costs a child, which may find nothing again.
const HELD_BACK_MIN_PAUSE: Duration = Duration::from_millis(10);

/// Children that fail in a row (exit 70: a database error, a bug) before
/// the run stops forking: the cause is likely shared, and forking on would
/// only repeat it thousands of times.
const FAILURES_IN_A_ROW: u32 = 10;

struct Child {
    owner: String,
    started: Instant,
    killed: Option<Kill>,
}

/// Why the parent killed a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// It outlived `child_deadline`: its endpoint kept it waiting.
    Deadline,
    /// It was still running when a stop's grace period ended.
    StopGrace,
}

/// A child that died maybe holding a lease, to be settled.
struct DeadChild {
    /// Its lease token.
    owner: String,
    /// How it died, for the attempt's error.
    how: String,
    /// Whether it was stopped at its deadline (a saturation signal).
    timed_out: bool,
}

/// One dispatcher run, from preparation to the last reaped child.
/// `heartbeat` is called at least once a second while the run goes. With
/// `linger_until`, a run that runs out of work waits for more (new
/// messages, due retries and slots) until then or `max_runtime`, whichever
/// comes first, instead of ending; a SIGHUP ends the wait.
pub fn run_once(
    config: &Config,
    signals: &Signals,
    heartbeat: &mut dyn FnMut(),
    linger_until: Option<Instant>,
) -> Result<RunRecord> {
    let started = Instant::now();
    let deadline = started + config.run.max_runtime;
    let mut run = prepare(config, heartbeat)?;
    let keeper = Keeper::start(config);
    // Done once here, inherited by every child instead of done by each.
    crate::delivery::warm_up(config.endpoints.iter().any(|e| e.url.scheme() == "https"));
    let mut parent = Parent {
        config,
        signals,
        heartbeat,
        slots: Slots::new(config)?,
        run_id: run.id,
        token: rand::random(),
        boot_id: crate::clock::boot_id(),
        children: HashMap::new(),
        dead_children: Vec::new(),
        delayed_forks: 0,
        budget: 0,
        empty_at: None,
        routed_seen: 0,
        held_back: false,
        failed_in_a_row: 0,
        deadline,
        linger_until: linger_until.map(|until| until.min(deadline)),
        keeper: keeper.as_ref(),
        stopping_since: None,
    };
    let loop_result = parent.fork_until_done(&mut run);
    // Whatever happened, no child is left behind (the loop only returns
    // once its children are gone; this is the safety net).
    parent.kill_all_and_reap(&mut run, Kill::StopGrace);
    parent.settle_dead_children(&mut run)?;
    loop_result?;

    let Parent {
        heartbeat,
        failed_in_a_row,
        ..
    } = parent;
    run.routed += keeper.as_ref().map_or(0, Keeper::routed);
    run.finished_at = Some(now_ms());
    let mut store = crate::store::open(config)?;
    store.run_finish(&run)?;
    purge_history(config, store.as_mut(), heartbeat)?;
    drop(store);
    // Last to close, the keeper checkpoints the WAL into the file.
    drop(keeper);
    // A run that found nothing to do is news only when debugging (a timer
    // or daemon makes one every few seconds).
    let idle = run.forked == 0 && run.routed == 0 && run.reclaimed == 0;
    let level = if idle {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    log::log!(level, "{}", summary(&run, started.elapsed()));
    if failed_in_a_row >= FAILURES_IN_A_ROW {
        return Err(Error::software(format!(
            "stopped forking after {FAILURES_IN_A_ROW} children in a row failed (their errors are logged above)"
        )));
    }
    Ok(run)
}

/// The one-line summary of a run, with the peak memory of this process and
/// of its largest child so far.
pub fn summary(run: &RunRecord, took: Duration) -> String {
    let expired = if run.expired + run.discarded > 0 {
        format!(
            ", {} expired ({} discarded)",
            run.expired + run.discarded,
            run.discarded
        )
    } else {
        String::new()
    };
    format!(
        "run {}: routed {} messages, reclaimed {} leases, forked {} children: {} delivered, {} retried, {} dead, {} failed, {} found nothing to lease{expired} in {:.2}s; peak RSS {:.1} MiB parent, {:.1} MiB child",
        run.id,
        run.routed,
        run.reclaimed,
        run.forked,
        run.delivered,
        run.retried,
        run.dead,
        run.failed,
        run.found_nothing,
        took.as_secs_f64(),
        peak_rss_kib() as f64 / 1024.0,
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .map_or(0, |u| u.max_rss()) as f64
            / 1024.0,
    )
}

/// This process's peak RSS in KiB: VmHWM, which starts afresh at exec
/// (getrusage's maxrss would carry over the RSS of the process that
/// spawned us, from before the exec).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Retention, bounded per run: a few small batches of delivered history
/// older than `retention` and dead letters older than `dead_retention`, so
/// the database does not grow forever and no run spends long on it;
/// `between` is called after each batch.
fn purge_history(config: &Config, store: &mut dyn Store, between: &mut dyn FnMut()) -> Result<()> {
    let now = now_ms();
    let (purged, _) = crate::retention::purge(
        store,
        now - crate::store::ms(config.retention),
        Some(now - crate::store::ms(config.dead_retention)),
        Some(RETENTION_BATCHES_PER_RUN),
        between,
    )?;
    if purged.deliveries > 0 {
        log::info!(
            "retention: purged {} older than {}",
            crate::words::plural(
                purged.deliveries,
                "delivered delivery",
                "delivered deliveries"
            ),
            humantime::format_duration(config.retention)
        );
    }
    if purged.dead > 0 {
        log::info!(
            "retention: purged {} older than {} (dead_retention)",
            crate::words::plural(purged.dead, "dead letter", "dead letters"),
            humantime::format_duration(config.dead_retention)
        );
    }
    Ok(())
}

/// Migrates, routes new messages, takes back expired leases and opens the
/// run record; the connection is closed on return. `between` is called
/// between routing batches.
fn prepare(config: &Config, between: &mut dyn FnMut()) -> Result<RunRecord> {
    let mut store = crate::store::open(config)?;
    let now = now_ms();
    store.subscriptions_replace(&routing::subscriptions(config))?;
    let routed = routing::route_all(store.as_mut(), now, between)?;
    let restored = store.deliveries_restore_endpoints(
        &config
            .endpoints
            .iter()
            .map(|e| e.name.clone())
            .collect::<Vec<_>>(),
        now,
    )?;
    if restored > 0 {
        log::info!(
            "{restored} deliveries parked for a removed endpoint are ready again: it is back in the config"
        );
    }
    let reclaimed = store.leases_reclaim_expired(&reclaim_params(now))?;
    if reclaimed > 0 {
        log::warn!(
            "{reclaimed} expired leases returned to the queue (their children died or hung)"
        );
    }
    let pid = std::process::id();
    let mut run = RunRecord {
        id: store.run_begin(pid, &config.host_name, now)?,
        pid,
        host: config.host_name.clone(),
        started_at: now,
        routed: routed.messages as u64,
        reclaimed: reclaimed as u64,
        ..RunRecord::default()
    };
    expire(store.as_mut(), now, &mut run, between)?;
    store.deliveries_release_keys(now)?;
    Ok(run)
}

/// Deliveries expired per transaction.
const EXPIRE_BATCH: u64 = 2_000;

/// Makes the deliveries whose time to live ran out dead letters (or
/// removes them: `discard_expired`), counting them into `run`; `between`
/// is called between batches.
fn expire(
    store: &mut dyn Store,
    now: i64,
    run: &mut RunRecord,
    between: &mut dyn FnMut(),
) -> Result<()> {
    let params = ExpireParams {
        now,
        batch: EXPIRE_BATCH,
    };
    loop {
        let batch = store.deliveries_expire(&params)?;
        run.expired += batch.expired;
        run.discarded += batch.discarded;
        if batch.expired + batch.discarded < EXPIRE_BATCH {
            break;
        }
        between();
    }
    Ok(())
}

/// What `leases_reclaim_expired` needs now: the wall clock, and the boot
/// clock that decides for leases taken on this boot.
fn reclaim_params(now: i64) -> ReclaimParams {
    ReclaimParams {
        now,
        boot: crate::clock::boot_id().and_then(|id| crate::clock::boot_time(&id)),
    }
}

struct Parent<'c> {
    config: &'c Config,
    signals: &'c Signals,
    heartbeat: &'c mut dyn FnMut(),
    slots: Slots,
    run_id: i64,
    token: u64,
    /// The kernel's boot id, read once, for the children's leases.
    boot_id: Option<String>,
    children: HashMap<Pid, Child>,
    /// Children that died holding (maybe) a lease.
    dead_children: Vec<DeadChild>,
    /// Children forked that take from the delayed queue first.
    delayed_forks: u64,
    /// Children to fork before the queue is checked again: the leasable count
    /// seen at the last check, less the children forked since. Zero too when
    /// a child found nothing to lease.
    budget: u64,
    /// When a child last found nothing it could lease although work was
    /// counted: the work is held back (in-flight caps, probes), maybe by
    /// another run. Cleared once the run paused for it.
    empty_at: Option<Instant>,
    /// The keeper's count of routed messages at the last wake-up.
    routed_seen: u64,
    /// A child found nothing to lease, and none that leased has ended
    /// since: until one does, the budget is at most one, so that work held
    /// back costs one empty child per look, not `max_children`.
    held_back: bool,
    /// Children that failed (exit 70) one after another, up to now.
    failed_in_a_row: u32,
    deadline: Instant,
    /// Until when the run waits for new work once it has none.
    linger_until: Option<Instant>,
    /// The keeper, whose wake pipe says when new work came.
    keeper: Option<&'c Keeper>,
    /// When SIGTERM/SIGINT came.
    stopping_since: Option<Instant>,
}

impl Parent<'_> {
    /// Forks while there is work and the limits allow, and returns once
    /// every child is reaped. A bookkeeping error stops the forking but not
    /// the children in flight: they finish (or meet their deadline) first,
    /// then the error is returned.
    fn fork_until_done(&mut self, run: &mut RunRecord) -> Result<()> {
        self.count_ready(crate::store::open(self.config)?.as_mut(), run)?;
        let mut failure: Option<Error> = None;
        loop {
            (self.heartbeat)();
            self.reap(run);
            // After a failure, settling waits for the end of the run: each
            // try could block for busy_timeout while children need reaping.
            if failure.is_none()
                && let Err(e) = self.settle_dead_children(run)
            {
                failure = Some(self.failed(e));
            }
            self.notice_stop();
            self.kill_overdue();
            let may_fork = failure.is_none()
                && self.failed_in_a_row < FAILURES_IN_A_ROW
                && self.stopping_since.is_none()
                && run.forked < self.config.run.max_messages
                && Instant::now() < self.deadline;
            if may_fork && self.budget > 0 && self.children.len() < self.config.run.max_children {
                match self.slots.try_acquire() {
                    Ok(Some(slot)) => {
                        if let Err(e) = self.fork_child(run, slot) {
                            failure = Some(self.failed(e));
                        }
                        continue;
                    }
                    // Another process's children hold every slot.
                    Ok(None) if self.children.is_empty() => {
                        self.signals.wait(HELD_BACK_PAUSE);
                        continue;
                    }
                    // Wait for one of ours, or for the keeper to see any
                    // commit (another process's child ending frees a slot).
                    Ok(None) => {
                        if let Some(keeper) = self.keeper {
                            keeper.set_waiting(true);
                        }
                    }
                    Err(e) => {
                        failure = Some(self.failed(e));
                        continue;
                    }
                }
            }
            if self.children.is_empty() {
                if let Some(e) = failure {
                    return Err(e);
                }
                if may_fork && self.empty_at.take().is_some() {
                    self.pause_held_back();
                }
                if !may_fork {
                    return Ok(());
                }
                if self.more_work(run)? {
                    continue;
                }
                match self.lingering() {
                    Some(until) => self.wait_for_work(until)?,
                    None => return Ok(()),
                }
                continue;
            }
            self.wait(run);
        }
    }

    /// Until when the run may still wait for work: while it lingers, is not
    /// stopping and no reload is asked for.
    fn lingering(&self) -> Option<Instant> {
        self.linger_until.filter(|&until| {
            Instant::now() < until
                && self.stopping_since.is_none()
                && !self.signals.stop_requested()
                && !self.signals.reload_requested()
        })
    }

    /// With nothing leasable now: sleeps until the keeper says new work
    /// came, the earliest delayed delivery (a retry, a reserved slot, a
    /// cool-down's end) or lease comes due, a signal, or `until`; at most a
    /// second, so the heartbeat beats.
    fn wait_for_work(&mut self, until: Instant) -> Result<()> {
        let due = self.next_due_in()?.map(|left| Instant::now() + left);
        let wake_at = due.map_or(until, |due| due.min(until));
        let left = wake_at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        self.signals.wait_or(left, self.keeper.map(Keeper::wake_fd));
        if let Some(keeper) = self.keeper {
            keeper.take_wake();
        }
        Ok(())
    }

    /// After a child found nothing although work was counted: waits
    /// [`HELD_BACK_PAUSE`] (not to spin on work held by an in-flight cap or
    /// a probe, maybe of another run), or less when a delivery comes due
    /// sooner, down to [`HELD_BACK_MIN_PAUSE`]. Work held by a rate was
    /// given reserved slots, and a pause past them would send the slots
    /// missed meanwhile together, a burst on top of the rate (after a
    /// breaker's probe, such a burst crossed a receiver's limit again).
    /// A store that cannot be read only loses the shorter pause (the
    /// count that follows reports it).
    fn pause_held_back(&mut self) {
        let pause = self
            .next_due_in()
            .ok()
            .flatten()
            .map_or(HELD_BACK_PAUSE, |left| {
                left.clamp(HELD_BACK_MIN_PAUSE, HELD_BACK_PAUSE)
            });
        self.signals.wait(pause);
    }

    /// How long until the next delayed delivery or lease comes due
    /// (`Store::deliveries_next_due`), timed from after the store's open;
    /// None: nothing will.
    fn next_due_in(&self) -> Result<Option<Duration>> {
        let mut store = crate::store::open(self.config)?;
        let now = now_ms();
        Ok(store
            .deliveries_next_due(now)?
            .map(|at| Duration::from_millis((at - now).max(0) as u64)))
    }

    /// Logs a bookkeeping error as it happens (the run ends with it once
    /// the children in flight are done) and returns it.
    fn failed(&self, e: Error) -> Error {
        log::error!(
            "{e}; forking no more: the {} in flight finish first",
            crate::words::plural(self.children.len() as u64, "child", "children")
        );
        e
    }

    fn more_work(&mut self, run: &mut RunRecord) -> Result<bool> {
        let mut store = crate::store::open(self.config)?;
        let now = now_ms();
        // The keeper routes what comes as it comes; this catches what it
        // missed (or all, without a keeper). Nothing to route is one read.
        run.routed +=
            routing::route_all(store.as_mut(), now, &mut *self.heartbeat)?.messages as u64;
        run.reclaimed += store.leases_reclaim_expired(&reclaim_params(now))? as u64;
        expire(store.as_mut(), now, run, &mut *self.heartbeat)?;
        store.deliveries_release_keys(now)?;
        self.count_ready(store.as_mut(), run)?;
        Ok(self.budget > 0)
    }

    /// Counts the leasable work into the budget. The keeper hears that the
    /// parent waits before the count (see `keeper`: work committed after
    /// the count then wakes it).
    fn count_ready(&mut self, store: &mut dyn Store, run: &RunRecord) -> Result<()> {
        self.set_budget(0);
        let count = store.leasable_count(now_ms(), self.config.run.max_messages - run.forked)?;
        self.set_budget(if self.held_back { count.min(1) } else { count });
        Ok(())
    }

    /// Sets the budget; with none, the keeper wakes us when work comes.
    fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
        if let Some(keeper) = self.keeper {
            keeper.set_waiting(budget == 0);
        }
    }

    fn fork_child(&mut self, run: &mut RunRecord, slot: File) -> Result<()> {
        // The host first: an admin sees which host holds a lease.
        let owner = format!(
            "{}.{:016x}.{}",
            self.config.host_name, self.token, run.forked
        );
        // Every 1/delayed_share-th child takes eligible delayed deliveries
        // first, so a continuous ready backlog cannot starve them.
        let prefer = if ((run.forked + 1) as f64 * self.config.run.delayed_share).floor()
            > self.delayed_forks as f64
        {
            Queue::Delayed
        } else {
            Queue::Ready
        };
        // SAFETY: the parent is single-threaded and holds no database
        // connection, HTTP client or lock here; the child only calls
        // `child::main` and then `_exit`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                crate::forking::after_fork(Some(self.config.run.child_deadline));
                let ctx = ChildContext {
                    owner,
                    run_id: self.run_id,
                    prefer,
                    boot_id: self.boot_id.clone(),
                    deadline: Instant::now() + self.config.run.child_deadline,
                };
                // A panic must not unwind into the parent's frames (and run
                // their destructors here): it ends the child as a failure.
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    child::main(self.config, &ctx) as i32
                }))
                .unwrap_or(ChildExit::Failed as i32);
                // The slot's lock goes with the process. _exit: no destructors
                // or atexit handlers of the parent's state.
                let _slot = slot;
                unsafe { nix::libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                // Closing our descriptor leaves the lock to the child.
                drop(slot);
                run.forked += 1;
                // At zero, work committed from now on wakes us; the child
                // just forked commits after this, so the keeper looks again.
                self.set_budget(self.budget - 1);
                self.delayed_forks += u64::from(prefer == Queue::Delayed);
                self.children.insert(
                    child,
                    Child {
                        owner,
                        started: Instant::now(),
                        killed: None,
                    },
                );
                Ok(())
            }
            Err(e) if self.children.is_empty() => Err(Error::new(
                crate::error::ExitCode::Unavailable,
                format!("cannot fork a child: {e}"),
            )),
            Err(e) => {
                // Out of processes: finish with the children we have.
                log::warn!("cannot fork a child ({e}); waiting for those alive");
                self.set_budget(0);
                Ok(())
            }
        }
    }

    fn notice_stop(&mut self) {
        if self.stopping_since.is_none() && self.signals.stop_requested() {
            log::info!(
                "stop requested: forking no more; {} children get up to {} to finish",
                self.children.len(),
                humantime::format_duration(self.config.run.stop_grace)
            );
            self.stopping_since = Some(Instant::now());
        }
    }

    /// Reaps every child that has exited, without blocking.
    fn reap(&mut self, run: &mut RunRecord) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    return;
                }
                Ok(status) => status,
            };
            self.record_exit(status, run);
        }
    }

    fn record_exit(&mut self, status: WaitStatus, run: &mut RunRecord) {
        let (pid, exit) = match status {
            WaitStatus::Exited(pid, code) => (pid, Ok(ChildExit::from_code(code))),
            WaitStatus::Signaled(pid, signal, _) => (pid, Err(signal)),
            _ => return,
        };
        let Some(child) = self.children.remove(&pid) else {
            return;
        };
        if exit != Ok(ChildExit::Failed) {
            self.failed_in_a_row = 0;
        }
        // A child that had leased: work is no longer held back.
        if matches!(
            exit,
            Ok(ChildExit::Delivered | ChildExit::Retry | ChildExit::Dead | ChildExit::LeaseLost)
        ) {
            self.held_back = false;
        }
        match exit {
            Ok(ChildExit::Delivered) => run.delivered += 1,
            Ok(ChildExit::Retry) => run.retried += 1,
            Ok(ChildExit::Dead) => run.dead += 1,
            // Another run took what we counted: check again once ours are done.
            Ok(ChildExit::Empty) => {
                run.found_nothing += 1;
                self.set_budget(0);
                self.empty_at = Some(Instant::now());
                self.held_back = true;
            }
            Ok(ChildExit::LeaseLost) => run.failed += 1,
            Ok(ChildExit::Failed) => {
                run.failed += 1;
                self.failed_in_a_row += 1;
                if self.failed_in_a_row == FAILURES_IN_A_ROW {
                    log::error!(
                        "{FAILURES_IN_A_ROW} children in a row failed (see their errors above): forking no more in this run"
                    );
                }
                self.dead_children.push(DeadChild {
                    owner: child.owner,
                    how: "failed".into(),
                    timed_out: false,
                });
            }
            Err(signal) => {
                run.failed += 1;
                // SIGALRM: the child's own alarm at its deadline.
                let (how, timed_out) = match (child.killed, signal) {
                    (Some(Kill::Deadline), _) | (None, Signal::SIGALRM) => {
                        ("was killed past its deadline".to_string(), true)
                    }
                    (Some(Kill::StopGrace), _) => (
                        "was killed at the end of the stop grace period".to_string(),
                        false,
                    ),
                    (None, signal) => (format!("was killed by {signal}"), false),
                };
                log::warn!("child {pid} {how}");
                self.dead_children.push(DeadChild {
                    owner: child.owner,
                    how,
                    timed_out,
                });
            }
        }
    }

    /// A child that died may still hold a lease: count the attempt as failed
    /// now (retry after backoff, or dead) instead of waiting for the lease to
    /// expire.
    fn settle_dead_children(&mut self, run: &mut RunRecord) -> Result<()> {
        if self.dead_children.is_empty() {
            return Ok(());
        }
        let mut store = crate::store::open(self.config)?;
        // One at a time, so those not settled when an error comes stay for
        // the run's last try (or their leases expire).
        while let Some(dead) = self.dead_children.first() {
            if let Some(lease) = store.lease_by_owner(&dead.owner)?
                // An endpoint gone from the config: the lease expires and is retried.
                && let Some(endpoint) = self.config.endpoint(&lease.endpoint)
            {
                let finish =
                    lease::after_child_death(endpoint, &lease, now_ms(), &dead.how, dead.timed_out);
                if store.attempt_finish(&finish)?
                    && matches!(finish.next, crate::store::NextState::Dead { .. })
                {
                    run.dead += 1;
                }
            }
            self.dead_children.remove(0);
        }
        Ok(())
    }

    /// Kills children past their deadline, and every child once a stop's
    /// grace period is over.
    fn kill_overdue(&mut self) {
        let deadline = self.config.run.child_deadline;
        let grace_over = self
            .stopping_since
            .is_some_and(|since| since.elapsed() >= self.config.run.stop_grace);
        for (pid, child) in &mut self.children {
            if child.killed.is_some() {
                continue;
            }
            let kill_for = if child.started.elapsed() >= deadline {
                log::warn!("child {pid} passed its deadline of {deadline:?}; killing it");
                Kill::Deadline
            } else if grace_over {
                log::warn!(
                    "child {pid} still running at the end of the stop grace period; killing it"
                );
                Kill::StopGrace
            } else {
                continue;
            };
            let _ = kill(*pid, Signal::SIGKILL);
            child.killed = Some(kill_for);
        }
    }

    /// Sleeps until a signal (a child exits, a stop) or the next child
    /// deadline, the stop's grace end or the run's deadline.
    fn wait(&mut self, run: &RunRecord) {
        let grace_end = self
            .stopping_since
            .map(|since| since + self.config.run.stop_grace);
        let next = self
            .children
            .values()
            .filter(|c| c.killed.is_none())
            .map(|c| c.started + self.config.run.child_deadline)
            .chain([self.deadline])
            .chain(grace_end)
            .min()
            .unwrap_or(self.deadline);
        // Capped, so the heartbeat beats and a lost wake-up only delays us.
        self.signals.wait_or(
            next.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
            self.keeper.map(Keeper::wake_fd),
        );
        // New work while children run: counted now, so it need not wait
        // for them (when the budget still holds, children find it anyway).
        // A child alive that holds no lease may still take one of those
        // counted: those are not counted twice. Just after a child found
        // nothing, what is counted is likely held back (the count does not
        // know in-flight caps or probes): only new messages count then, or
        // each commit of another child would fork one more that finds
        // nothing (the children exiting count it again anyway).
        let woken = self.keeper.is_some_and(Keeper::take_wake);
        let routed = self.keeper.map_or(0, Keeper::routed);
        let new_messages = woken && std::mem::replace(&mut self.routed_seen, routed) < routed;
        let held_back = self
            .empty_at
            .is_some_and(|at| at.elapsed() < HELD_BACK_PAUSE);
        if woken
            && (new_messages || !held_back)
            && self.budget == 0
            && let Ok(mut store) = crate::store::open(self.config)
            // Counted first, in a read of its own: a child that leases or
            // finishes between the two reads (or has exited, not yet
            // reaped) makes the budget one short, never one too many; the
            // keeper's next look corrects it.
            && let Ok(holding) = store.attempts_in_flight(self.run_id)
            && self.count_ready(store.as_mut(), run).is_ok()
        {
            let about_to_lease = (self.children.len() as u64).saturating_sub(holding);
            self.set_budget(self.budget.saturating_sub(about_to_lease));
        }
    }

    fn kill_all_and_reap(&mut self, run: &mut RunRecord, why: Kill) {
        for (pid, child) in &mut self.children {
            if child.killed.is_none() {
                let _ = kill(*pid, Signal::SIGKILL);
                child.killed = Some(why);
            }
        }
        while !self.children.is_empty() {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(status) => self.record_exit(status, run),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}
