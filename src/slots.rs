//! The global child limit: `max_children` slots shared by every process
//! dispatching from one database (a timer's run, a manual run, the daemon).
//! A slot is a lock file `<database>.slots/N` held with flock(2) by one child.
//! The parent takes the lock, forks, and closes its descriptor; the child
//! holds the lock through the inherited descriptor until it exits, however
//! it exits (the kernel drops the lock with the last descriptor), so a
//! killed child or parent can never leak a slot.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The slots of one database.
pub struct Slots {
    dir: PathBuf,
    count: usize,
}

impl Slots {
    /// The `count` slots beside `database`; creates their directory.
    pub fn new(database: &Path, count: usize) -> Result<Slots> {
        let mut dir = database.as_os_str().to_owned();
        dir.push(".slots");
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("slot directory {}", dir.display()), e))?;
        Ok(Slots { dir, count })
    }

    /// A free slot, locked; None when all are taken. Keep the file open
    /// across fork and close it in the parent afterwards.
    pub fn try_acquire(&self) -> Result<Option<File>> {
        for n in 0..self.count {
            let path = self.dir.join(n.to_string());
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("slot {}", path.display()), e))?;
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
