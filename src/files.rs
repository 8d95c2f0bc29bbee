//! The modes of the files that every process touching the queue shares.
//!
//! Three kinds of processes open the database: the service (user
//! `cronpost`), producers (application users in its group) and admins (root,
//! or group members with `sqlite3`). Whoever comes first creates a file, with
//! its own uid, primary group and umask. So cronpost never leaves a mode to
//! the umask: a new database is 0660 with its group when the database is
//! shared (`database_group`, or a setgid directory such as the package's
//! /var/lib/cronpost), else 0600; every file it creates beside the database
//! (slot files) takes the database's group and mode. SQLite makes the -wal
//! and -shm files itself, with the database's mode; they get the database's
//! group from a setgid directory, which sharing therefore needs (the
//! package's /var/lib/cronpost is one; `check-config` says when it is not).
//! cronpost does not fix their group afterwards: that would mean opening
//! them (and closing any descriptor of a file drops every POSIX lock this
//! process holds on it, SQLite's too: another process would then take the
//! -shm file for its own, truncate it, and crash us with SIGBUS on the next
//! write to its mapping) or changing them by path (a symlink race). A
//! process that cannot read and write the files gets one error naming the
//! file, its owner and mode, and the fix.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, Gid, Group, Uid, User};

use crate::error::{Error, ExitCode, Result};

/// Who may use the files of one database: its group, and the mode of its
/// files (0660 when shared with the group, 0600 when private).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharing {
    /// The group files are given; None: whatever the creator's is.
    pub gid: Option<u32>,
    /// The mode of regular files (directories add the matching x bits).
    pub mode: u32,
}

impl Sharing {
    /// How a database that does not exist yet will be shared: with
    /// `database_group` when set, else with the group of a setgid directory
    /// (its files inherit that group), else not at all.
    pub fn for_new_database(database: &Path, database_group: Option<u32>) -> Sharing {
        let dir = parent_dir(database);
        let setgid_group = std::fs::metadata(dir)
            .ok()
            .filter(|m| m.mode() & 0o2000 != 0)
            .map(|m| m.gid());
        match database_group.or(setgid_group) {
            Some(gid) => Sharing {
                gid: Some(gid),
                mode: 0o660,
            },
            None => Sharing {
                gid: None,
                mode: 0o600,
            },
        }
    }

    /// How an existing database is shared: its group, and its owner's and
    /// group's read and write bits.
    pub fn of_database(database: &Path) -> std::io::Result<Sharing> {
        let meta = std::fs::metadata(database)?;
        let mode = meta.mode() & 0o660;
        Ok(Sharing {
            gid: (mode & 0o060 != 0).then_some(meta.gid()),
            mode,
        })
    }

    /// The mode of a directory of such files.
    pub fn dir_mode(&self) -> u32 {
        let mut mode = self.mode;
        if mode & 0o600 != 0 {
            mode |= 0o100;
        }
        if mode & 0o060 != 0 {
            mode |= 0o010;
        }
        mode
    }

    /// Gives an open file this sharing's group and `mode`, whatever the
    /// creator's umask and primary group were.
    fn apply(&self, file: &File, mode: u32) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let meta = file.metadata()?;
        if let Some(gid) = self.gid
            && meta.gid() != gid
        {
            nix::unistd::fchown(file.as_fd(), None, Some(Gid::from_raw(gid)))?;
        }
        // Only when it differs: a chmod that names a setgid bit, even one
        // the file has, is refused under systemd's RestrictSUIDSGID=.
        if meta.mode() & 0o7777 != mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    /// Creates `path` as a new, empty file with this sharing; Ok(None) if it
    /// exists already. A file that cannot be given its group or mode is
    /// removed again, never left half-made.
    pub fn create_new(&self, path: &Path) -> std::io::Result<Option<File>> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Err(e) = self.apply(&file, self.mode) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Some(file))
    }

    /// Creates the directory `path` with this sharing unless it exists; an
    /// existing one must be a directory, not a symlink (in a group-writable
    /// directory another member could have planted one).
    pub fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::DirBuilder::new()
            .mode(self.dir_mode())
            .create(path)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return if std::fs::symlink_metadata(path)?.file_type().is_dir() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("exists and is not a directory"))
                };
            }
            Err(e) => return Err(e),
        }
        let dir = File::open(path)?;
        // Keeps a setgid bit the directory inherited: changing it needs a
        // privilege (and systemd's RestrictSUIDSGID= forbids setting it).
        let inherited = dir.metadata()?.mode() & 0o2000;
        self.apply(&dir, self.dir_mode() | inherited)
    }

    /// Opens an existing file made with this sharing, for reading: never
    /// through a symlink, never blocking on a FIFO, and only a regular file
    /// (in a group-writable directory another member could plant either).
    pub fn open_existing(&self, path: &Path) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)?;
        if !file.metadata()?.file_type().is_file() {
            return Err(std::io::Error::other("is not a regular file"));
        }
        Ok(file)
    }

    /// Gives an existing file this sharing's group and mode when this
    /// process owns it and either differs (a file made by an older version).
    /// Never as root, and never a file with another name (a hard link):
    /// root must not be talked into changing the mode of a file of its own
    /// that another user linked here.
    pub fn fix_if_owned(&self, file: &File) -> std::io::Result<()> {
        let meta = file.metadata()?;
        let me = Uid::effective();
        let wrong_group = self.gid.is_some_and(|gid| meta.gid() != gid);
        if !me.is_root()
            && meta.uid() == me.as_raw()
            && meta.nlink() == 1
            && (wrong_group || meta.mode() & 0o777 != self.mode)
        {
            self.apply(file, self.mode)?;
        }
        Ok(())
    }
}

/// Whether files made in the directory of `database` get the group `gid`
/// (a setgid directory of that group): then SQLite's -wal and -shm files,
/// made by whichever process comes first, are shared like the database.
pub fn directory_shares_group(database: &Path, gid: u32) -> bool {
    std::fs::metadata(parent_dir(database)).is_ok_and(|m| m.mode() & 0o2000 != 0 && m.gid() == gid)
}

/// `path` with `suffix` appended to its file name (`q.db` → `q.db-wal`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory holding `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Checks that this process can read and write the existing `database` and
/// the files SQLite keeps beside it, and create those in its directory; the
/// error names the file, its owner and mode, and the fix (exit 77).
pub fn check_read_write(database: &Path, group: Option<u32>) -> Result<()> {
    let rw = AccessFlags::R_OK | AccessFlags::W_OK;
    let mut to_check = vec![(database.to_path_buf(), rw, false)];
    let mut any_missing = false;
    for suffix in ["-wal", "-shm"] {
        let companion = with_suffix(database, suffix);
        if companion.exists() {
            to_check.push((companion, rw, false));
        } else {
            any_missing = true;
        }
    }
    if any_missing {
        // SQLite creates them: the directory must let us.
        let dir = parent_dir(database).to_path_buf();
        to_check.push((dir, AccessFlags::W_OK | AccessFlags::X_OK, true));
    }
    for (path, flags, is_dir) in to_check {
        match nix::unistd::access(&path, flags) {
            Ok(()) => {}
            Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => {
                return Err(permission_error(database, &path, is_dir, group));
            }
            // A read-only file system and the like are SQLite's to report.
            Err(_) => {}
        }
    }
    Ok(())
}

fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// Whether this process is in group `gid`.
fn in_group(gid: u32) -> bool {
    Gid::effective().as_raw() == gid
        || nix::unistd::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

fn permission_error(database: &Path, path: &Path, is_dir: bool, group: Option<u32>) -> Error {
    let me = user_name(Uid::effective().as_raw());
    let Ok(meta) = std::fs::metadata(path) else {
        return Error::new(
            ExitCode::NoPerm,
            format!("database {}: permission denied", database.display()),
        );
    };
    let (owner, file_group) = (user_name(meta.uid()), group_name(meta.gid()));
    let what = if is_dir {
        format!(
            "cannot create files in directory {} (SQLite keeps -wal and -shm files beside the database)",
            path.display()
        )
    } else if path == database {
        "cannot read and write it".to_string()
    } else {
        format!("cannot read and write {}", path.display())
    };
    let bits = if is_dir { "g+rwx" } else { "g+rw" };
    let wanted = if is_dir { 0o070 } else { 0o060 };
    let fix = match group {
        // The config names the group to share with.
        Some(gid) => {
            let name = group_name(gid);
            let mut fixes = Vec::new();
            if meta.gid() != gid {
                fixes.push(format!("chgrp {name} {}", path.display()));
            }
            if meta.mode() & wanted != wanted {
                fixes.push(format!("chmod {bits} {}", path.display()));
            }
            if !in_group(gid) {
                fixes.push(format!(
                    "add {me} to group {name} (usermod -aG {name} {me}, then log in again)"
                ));
            }
            format!(
                "to share it with group {name} (database_group): {}",
                fixes.join(" and ")
            )
        }
        None => format!(
            "to share it, set database_group in the config to a group {me} is in, and chgrp that group and chmod {bits} {}",
            path.display()
        ),
    };
    Error::new(
        ExitCode::NoPerm,
        format!(
            "database {}: user {me} {what}: owner {owner}:{file_group}, mode {:04o}; {fix}",
            database.display(),
            meta.mode() & 0o7777,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_get_the_x_bits_of_their_read_write_bits() {
        let shared = Sharing {
            gid: Some(1),
            mode: 0o660,
        };
        assert_eq!(shared.dir_mode(), 0o770);
        let private = Sharing {
            gid: None,
            mode: 0o600,
        };
        assert_eq!(private.dir_mode(), 0o700);
    }

    #[test]
    fn new_files_get_their_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let path = dir.path().join("f");
        let sharing = Sharing {
            gid: Some(Gid::effective().as_raw()),
            mode: 0o660,
        };
        let created = sharing.create_new(&path).unwrap();
        nix::sys::stat::umask(old);
        assert!(created.is_some());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        assert!(sharing.create_new(&path).unwrap().is_none(), "exists");
    }
}
