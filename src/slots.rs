//! The global child limit: `max_children` slots shared by every process
//! dispatching from one database (a timer's run, a manual run, the daemon).
//! A slot is a lock file `<database>.slots/N` held with flock(2) by one child.
//! The parent takes the lock, forks, and closes its descriptor; the child
//! holds the lock through the inherited descriptor until it exits, however
//! it exits (the kernel drops the lock with the last descriptor), so a
//! killed child or parent can never leak a slot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{self, Sharing};

/// The slots of one database.
pub struct Slots {
    dir: PathBuf,
    count: usize,
    sharing: Sharing,
}

impl Slots {
    /// The `count` slots beside `database`; creates their directory. Slot
    /// files get the database's group and mode, so any process that may
    /// dispatch can take a slot, and nobody else can hold one.
    pub fn new(database: &Path, count: usize) -> Result<Slots> {
        let dir = files::with_suffix(database, ".slots");
        let sharing = Sharing::of_database(database)
            .map_err(|e| Error::io(format!("database {}", database.display()), e))?;
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
