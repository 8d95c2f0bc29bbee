//! The keeper: a process forked at the start of a run that holds one
//! database connection open until the run ends. The parent may not hold a
//! connection across fork (SQLite's per-process lock bookkeeping would be
//! copied into every child), yet without any connection open between two
//! children each child would be the file's first and last connection: it
//! would rebuild the WAL index on open, and checkpoint, fsync and delete the
//! WAL on close; measured, that made a child 2.5 times slower. With the
//! keeper open, a child's open maps the existing index, and a child leaves
//! with nothing to write (it does not even close: its exit releases all).
//!
//! It needs no signal: it blocks reading a pipe whose write end the parent
//! and its children hold, so it leaves once they are all gone, even when the
//! parent is killed. Only its last close checkpoints the WAL into the file.

use std::io::Read;
use std::os::fd::OwnedFd;

use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe};

use crate::config::Config;
use crate::store::SqliteStore;

/// A running keeper.
pub struct Keeper {
    pid: Pid,
    /// The write end of its pipe: closed, the keeper leaves.
    alive: Option<OwnedFd>,
}

impl Keeper {
    /// Forks the keeper. It only saves work, so a failure is a warning.
    /// Call it while the process holds no database connection.
    pub fn start(config: &Config) -> Option<Keeper> {
        let (read_end, write_end) = match pipe() {
            Ok(ends) => ends,
            Err(e) => {
                log::warn!("cannot start the database keeper: {e}");
                return None;
            }
        };
        // SAFETY: the caller is single-threaded and holds no database
        // connection; the keeper opens its own and _exits.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(write_end);
                crate::forking::after_fork(None);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    keep(config, read_end)
                }));
                unsafe { nix::libc::_exit(0) }
            }
            Ok(ForkResult::Parent { child }) => Some(Keeper {
                pid: child,
                alive: Some(write_end),
            }),
            Err(e) => {
                log::warn!("cannot start the database keeper: {e}");
                None
            }
        }
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

fn keep(config: &Config, alive: OwnedFd) {
    // A SIGINT from the terminal is for the parent, which stops the run.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    let store = match SqliteStore::open_existing(&config.database, config.busy_timeout)
        .and_then(|store| store.schema_version().map(|_| store))
    {
        Ok(store) => store,
        Err(e) => {
            log::warn!("database keeper: {e}");
            return;
        }
    };
    let mut pipe = std::fs::File::from(alive);
    let mut buf = [0u8; 1];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => break,
            _ => {}
        }
    }
    drop(store);
}
