//! The global child limit: `max_children` slots shared by every process
//! dispatching from one database (a timer's run, a manual run, the daemon).
//! A slot is a lock file `N` in `slots_dir` (for SQLite `<database>.slots`
//! by default) held with flock(2) by one child. The directory is local: on
//! a PostgreSQL queue each host has its own limit.
//! The parent takes the lock, forks, and closes its descriptor; the child
//! holds the lock through the inherited descriptor until it exits, however
//! it exits (the kernel drops the lock with the last descriptor), so a
//! killed child or parent can never leak a slot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::config::{Config, Database};
use crate::error::{Error, Result};
use crate::files::Sharing;

/// The slots of one database.
pub struct Slots {
    dir: PathBuf,
    count: usize,
    sharing: Sharing,
}

impl Slots {
    /// The `max_children` slots of `config`; creates their directory. Slot
    /// files get the SQLite database's group and mode (on PostgreSQL:
    /// `database_group`'s, or the setgid directory's), so any process that
    /// may dispatch can take a slot, and nobody else can hold one.
    pub fn new(config: &Config) -> Result<Slots> {
        let dir = config.slots_dir.clone();
        let sharing = match &config.database {
            Database::Sqlite(path) => Sharing::of_database(path)
                .map_err(|e| Error::io(format!("database {}", path.display()), e))?,
            Database::Postgres(_) => {
                Sharing::for_new_database(&dir.join("0"), config.database_group)
            }
        };
        let count = config.run.max_children;
        sharing
            .create_dir(&dir)
            .map_err(|e| Error::io(format!("slot directory {}", dir.display()), e))?;
        Ok(Slots {
            dir,
            count,
            sharing,
        })
    }

    /// A free slot, locked; None when all are taken. Keep the file open
    /// across fork and close it in the parent afterwards.
    pub fn try_acquire(&self) -> Result<Option<File>> {
        for n in 0..self.count {
            let path = self.dir.join(n.to_string());
            let fail = |e| Error::io(format!("slot {}", path.display()), e);
            let file = match self.sharing.create_new(&path).map_err(fail)? {
                Some(created) => created,
                None => {
                    let file = self.sharing.open_existing(&path).map_err(fail)?;
                    // A world-readable slot, left by an older version, could
                    // be locked by anyone.
                    if let Err(e) = self.sharing.fix_if_owned(&file) {
                        log::warn!("slot {}: cannot tighten its mode: {e}", path.display());
                    }
                    file
                }
            };
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let locked = unsafe {
                nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB)
            };
            if locked == 0 {
                return Ok(Some(file));
            }
        }
        Ok(None)
    }
}
