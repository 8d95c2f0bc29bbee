//! Noticing writes to the queue as they happen, whoever makes them: an
//! inotify watch on the database's directory. Every commit writes the
//! database's -wal file (or creates it, when no connection had it open),
//! so a message from `cronpost enqueue`, an INSERT from any producer's own
//! SQLite, an admin's requeue: each is an event here within microseconds,
//! with no polling and no cooperation from the writer (a wake-up message
//! from `enqueue` would miss plain-SQL producers, and polling costs CPU
//! when idle). The event only says "something was written": the keeper
//! looks at the queue to see whether it is work (`keeper.rs`).

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::error::{Error, Result};

/// A watch on the files of one database.
pub struct DbWatch {
    inotify: Inotify,
    /// The file names that matter: the database and its -wal.
    names: [OsString; 2],
}

impl DbWatch {
    /// Watches the directory of `database`.
    pub fn new(database: &Path) -> Result<DbWatch> {
        let fail = |e: nix::Error| {
            Error::io(
                format!("cannot watch {} for writes", database.display()),
                std::io::Error::from(e),
            )
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(fail)?;
        inotify
            .add_watch(
                crate::files::parent_dir(database),
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .map_err(fail)?;
        let name = database.file_name().unwrap_or_default().to_owned();
        let mut wal = name.clone();
        wal.push("-wal");
        Ok(DbWatch {
            inotify,
            names: [name, wal],
        })
    }

    /// Reads the pending events; whether one was a write to the database.
    pub fn drain(&self) -> bool {
        let mut written = false;
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            written |= events
                .iter()
                .any(|e| e.name.as_ref().is_some_and(|n| self.names.contains(n)));
        }
        written
    }
}

impl AsFd for DbWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}
