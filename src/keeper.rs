//! The keeper: a process forked at the start of a run that holds one
//! database connection open until the run ends, routes new messages as
//! they arrive, and tells the parent when there is work.
//!
//! Holding the connection: the parent may not hold one across fork
//! (SQLite's per-process lock bookkeeping would be copied into every
//! child), yet without any connection open between two children each child
//! would be the file's first and last connection: it would rebuild the WAL
//! index on open, and checkpoint, fsync and delete the WAL on close;
//! measured, that made a child 2.5 times slower. With the keeper open, a
//! child's open maps the existing index, and a child leaves with nothing to
//! write (it does not even close: its exit releases all).
//!
//! Routing and waking: it watches the database for writes (`watch`); after
//! one it routes what is unrouted (a producer's new message becomes
//! deliveries at once, even in the middle of a long drain, so a message of
//! a higher priority is leased next). While the parent knows of no work
//! (it lingers idle, or forked all it counted), the keeper also checks
//! whether something is leasable now and, if so, writes a byte to the
//! parent's wake pipe, so the parent forks within a millisecond. While the
//! parent has work, it checks nothing and wakes no one: during a drain,
//! those checks and wake-ups took a fifth of the throughput (measured).
//! The parent says which it is through a page both share (`Shared`);
//! setting it before counting the work closes the race: work committed
//! after the count finds the flag set. It looks at most every
//! [`LOOK_INTERVAL`], and a few more times, further and further apart,
//! after the last write (a commit's last WAL write comes a moment, up to an
//! fsync, before other connections can see it).
//!
//! It needs no signal: it blocks reading a pipe whose write end the parent
//! and its children hold, so it leaves once they are all gone, even when the
//! parent is killed. Only its last close checkpoints the WAL into the file.

use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe};

use crate::config::{Config, Database};
use crate::store::{PostgresStore, SqliteStore, Store, now_ms};
use crate::watch::DbWatch;

/// The shortest time between two looks at the queue: during a busy run the
/// children write all the time, and a look per write would cost CPU.
pub const LOOK_INTERVAL: Duration = Duration::from_millis(2);

/// What the parent and its keeper share: atomics in an anonymous page
/// mapped MAP_SHARED before the fork (zeroed: false, 0).
struct Shared {
    /// Whether the parent wants to hear of leasable work.
    parent_waiting: AtomicBool,
    /// Messages the keeper routed in this run.
    routed: AtomicU64,
}

/// The mapping that holds [`Shared`]; unmapped on drop (a daemon makes a
/// run, and a keeper, every few seconds).
struct SharedPage(NonNull<Shared>);

impl SharedPage {
    fn map() -> nix::Result<SharedPage> {
        let length = NonZeroUsize::new(size_of::<Shared>()).expect("not zero-sized");
        // SAFETY: a fresh anonymous mapping, zero-filled: a valid Shared.
        let page = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(SharedPage(page.cast()))
    }
}

impl std::ops::Deref for SharedPage {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        // SAFETY: mapped until drop; only atomics, shared by design.
        unsafe { self.0.as_ref() }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows it past self.
        let _ = unsafe { munmap(self.0.cast(), size_of::<Shared>()) };
    }
}

/// A running keeper.
pub struct Keeper {
    pid: Pid,
    /// The write end of its alive pipe: closed, the keeper leaves.
    alive: Option<OwnedFd>,
    /// The read end of its wake pipe (non-blocking).
    wake: std::fs::File,
    shared: SharedPage,
}

impl Keeper {
    /// Forks the keeper. It only saves work and time, so a failure is a
    /// warning. Call it while the process holds no database connection.
    pub fn start(config: &Config) -> Option<Keeper> {
        let pipes = pipe().and_then(|alive| pipe().map(|wake| (alive, wake)));
        let shared = SharedPage::map();
        let ((alive_read, alive_write), (wake_read, wake_write), shared) = match (pipes, shared) {
            (Ok((alive, wake)), Ok(shared)) => (alive, wake, shared),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("cannot start the database keeper: {e}");
                return None;
            }
        };
        // SAFETY: the caller is single-threaded and holds no database
        // connection; the keeper opens its own and _exits.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(alive_write);
                drop(wake_read);
                crate::forking::after_fork(None);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    keep(config, alive_read, wake_write, &shared)
                }));
                unsafe { nix::libc::_exit(0) }
            }
            Ok(ForkResult::Parent { child }) => {
                let wake = std::fs::File::from(wake_read);
                let _ = nix::fcntl::fcntl(
                    &wake,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                Some(Keeper {
                    pid: child,
                    alive: Some(alive_write),
                    wake,
                    shared,
                })
            }
            Err(e) => {
                log::warn!("cannot start the database keeper: {e}");
                None
            }
        }
    }

    /// The wake pipe, for poll(2).
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Tells the keeper whether the parent wants to hear of leasable work:
    /// set it before counting the work, so that nothing committed after the
    /// count goes unheard.
    pub fn set_waiting(&self, waiting: bool) {
        self.shared.parent_waiting.store(waiting, Ordering::SeqCst);
    }

    /// Whether the keeper said there is work since the last call.
    pub fn take_wake(&self) -> bool {
        let mut buf = [0u8; 64];
        let mut woken = false;
        while let Ok(n) = (&self.wake).read(&mut buf) {
            if n == 0 {
                break;
            }
            woken = true;
        }
        woken
    }

    /// How many messages the keeper routed so far.
    pub fn routed(&self) -> u64 {
        self.shared.routed.load(Ordering::SeqCst)
    }
}

impl Drop for Keeper {
    /// Lets the keeper go and reaps it; it leaves once the children still
    /// holding its pipe are gone too.
    fn drop(&mut self) {
        drop(self.alive.take());
        // ECHILD: a waitpid(-1) reaped it already.
        let _ = waitpid(self.pid, None);
    }
}

fn keep(config: &Config, alive: OwnedFd, wake: OwnedFd, shared: &Shared) {
    // A SIGINT from the terminal is for the parent, which stops the run.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    let mut wake = std::fs::File::from(wake);
    // The parent drains the pipe; a full one is a wake-up already.
    let _ = nix::fcntl::fcntl(
        &wake,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let alive = std::fs::File::from(alive);
    match &config.database {
        Database::Sqlite(path) => keep_sqlite(config, path, alive, &mut wake, shared),
        Database::Postgres(_) => keep_postgres(config, alive, &mut wake, shared),
    }
}

/// How long the PostgreSQL keeper waits for a notification before it
/// checks whether its run is still there.
const NOTIFICATION_WAIT: Duration = Duration::from_millis(100);

/// With no notification for this long, the PostgreSQL keeper looks anyway:
/// a connection that died silently (a NAT dropping an idle one) then fails
/// and is made again, instead of waiting for notifications forever.
const QUIET_LOOK: Duration = Duration::from_secs(30);

/// The keeper of a PostgreSQL queue: LISTENs for new messages (a trigger
/// notifies every host's keeper once per inserting transaction; a
/// notification comes after the commit, so what it announces is visible),
/// and looks when one comes. A lost connection is made again, with a look. Delayed deliveries coming due and leases
/// expiring are the parent's own timer, as on SQLite.
fn keep_postgres(
    config: &Config,
    mut alive: std::fs::File,
    wake: &mut std::fs::File,
    shared: &Shared,
) {
    let _ = nix::fcntl::fcntl(
        &alive,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    // The listening connection; None: lost, made again at the next turn.
    let mut store: Option<PostgresStore> = None;
    // Whether to look at the next turn: at the start (messages inserted
    // before the LISTEN took effect), after a notification, and after any
    // failure (what was announced may not have been looked at).
    let mut look = true;
    // Failures in a row: the next turn comes later and later (up to 1.6 s),
    // the warning only now and then.
    let mut errors: u32 = 0;
    let mut last_look = Instant::now();
    fn fail(errors: &mut u32, e: crate::error::Error) {
        if errors.is_power_of_two() || *errors == 0 {
            log::warn!("database keeper: {e} (failed {} in a row)", *errors + 1);
        }
        *errors += 1;
    }
    loop {
        let mut buf = [0u8; 1];
        match alive.read(&mut buf) {
            Ok(0) => break,
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted =>
            {
                break;
            }
            _ => {}
        }
        let wait = NOTIFICATION_WAIT * (1 << errors.min(4));
        if store.is_none() {
            match PostgresStore::open_existing(config.listen_url(), config.busy_timeout)
                .and_then(|mut s| s.listen_for_messages().map(|()| s))
            {
                Ok(s) => store = Some(s),
                Err(e) => {
                    fail(&mut errors, e);
                    std::thread::sleep(wait);
                    continue;
                }
            }
        }
        let Some(listening) = store.as_mut() else {
            continue;
        };
        if look {
            last_look = Instant::now();
            match look_for_work(listening, shared) {
                Ok(found) => {
                    errors = 0;
                    look = false;
                    if found {
                        let _ = wake.write(&[1]);
                    }
                }
                Err(e) => fail(&mut errors, e),
            }
        }
        match listening.wait_for_notification(wait) {
            Ok(false) if last_look.elapsed() >= QUIET_LOOK => look = true,
            Ok(notified) => look |= notified,
            Err(e) => {
                fail(&mut errors, e);
                store = None;
                look = true;
                std::thread::sleep(wait);
            }
        }
    }
}

fn keep_sqlite(
    config: &Config,
    path: &std::path::Path,
    mut alive: std::fs::File,
    wake: &mut std::fs::File,
    shared: &Shared,
) {
    let mut store = match SqliteStore::open_existing(path, config.busy_timeout)
        .and_then(|mut store| store.schema_version().map(|_| store))
    {
        Ok(store) => store,
        Err(e) => {
            log::warn!("database keeper: {e}");
            return;
        }
    };
    if let Err(e) = store.wait_for_locks_eagerly(config.busy_timeout) {
        log::warn!("database keeper: {e}");
    }
    let watch = DbWatch::new(path)
        .inspect_err(|e| log::warn!("database keeper: {e}; new work waits for the next check"))
        .ok();
    let mut last_look = Instant::now();
    // When to look next (None: nothing written since the last look),
    // whether a write came since the last look, and how many looks found
    // no write since the last one that did.
    let mut look_at: Option<Instant> = None;
    let mut written = false;
    let mut quiet_looks = 0;
    // Looks that failed in a row: retried further and further apart (a
    // full disk fails at once, every time), the warning only now and then.
    let mut errors: u32 = 0;
    loop {
        let timeout = look_at.map_or(PollTimeout::NONE, |at| {
            let left = at.saturating_duration_since(Instant::now());
            PollTimeout::try_from(left.as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = vec![PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
        // With a look due within the interval, more writes change nothing
        // until then: the watch is read at the look, not on each of a
        // drain's WAL writes. A later follow-up must not delay a new write.
        let look_soon = look_at.is_some_and(|at| at <= last_look + LOOK_INTERVAL);
        if let Some(watch) = watch.as_ref().filter(|_| !look_soon) {
            fds.push(PollFd::new(watch.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let alive_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let watch_ready = fds
            .get(1)
            .and_then(|fd| fd.revents())
            .is_some_and(|r| !r.is_empty());
        if alive_ready {
            let mut buf = [0u8; 1];
            match alive.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() != std::io::ErrorKind::Interrupted => break,
                _ => {}
            }
        }
        if watch_ready && watch.as_ref().is_some_and(DbWatch::drain) {
            // Now, or as soon as the interval allows.
            let soon = (last_look + LOOK_INTERVAL).max(Instant::now());
            look_at = Some(look_at.map_or(soon, |at| at.min(soon)));
            written = true;
        }
        if look_at.is_some_and(|at| Instant::now() >= at) {
            written |= watch.as_ref().is_some_and(DbWatch::drain);
            last_look = Instant::now();
            quiet_looks = if std::mem::take(&mut written) {
                0
            } else {
                quiet_looks + 1
            };
            look_at = follow_up(last_look, quiet_looks);
            match look_for_work(&mut store, shared) {
                Ok(found) => {
                    errors = 0;
                    if found {
                        let _ = wake.write(&[1]);
                    }
                }
                Err(e) => {
                    // What was written still needs a look.
                    if errors.is_power_of_two() || errors == 0 {
                        log::warn!("database keeper: {e} (failed {} in a row)", errors + 1);
                    }
                    errors += 1;
                    quiet_looks = 0;
                    look_at = Some(last_look + LOOK_INTERVAL * (1 << errors.min(9)));
                }
            }
        }
    }
    drop(store);
}

/// When to look again after a look, `quiet_looks` looks after the last one
/// that followed a write. A write's commit becomes visible a moment after
/// its last WAL write (the one inotify reports): after the fsync of a
/// `synchronous=FULL` commit, which can take milliseconds, or tens on a
/// busy disk, the wal-index in shared memory is updated, and that makes no
/// event. So the looks go on every [`LOOK_INTERVAL`] for the first 16 ms,
/// then at doubling intervals, about half a second in all, before the
/// keeper waits for the next write (the parent, lingering, also routes once
/// a second: a safety net, not the path).
fn follow_up(last_look: Instant, quiet_looks: u32) -> Option<Instant> {
    const EVERY_INTERVAL: u32 = 8;
    const DOUBLING: u32 = 7;
    (quiet_looks < EVERY_INTERVAL + DOUBLING)
        .then(|| last_look + LOOK_INTERVAL * (1 << quiet_looks.saturating_sub(EVERY_INTERVAL - 1)))
}

/// Routes what is unrouted; whether to wake the parent: it is waiting,
/// and messages were routed (a delayed one changes when it should look
/// next) or something is leasable now.
fn look_for_work(store: &mut dyn Store, shared: &Shared) -> crate::error::Result<bool> {
    let now = now_ms();
    let routed = crate::routing::route_all(store, now, &mut || {})?;
    shared
        .routed
        .fetch_add(routed.messages as u64, Ordering::SeqCst);
    Ok(shared.parent_waiting.load(Ordering::SeqCst)
        && (routed.messages > 0 || store.leasable_count(now, 1)? > 0))
}
