//! The pid file: created and locked by the master, removed at its exit.
//!
//! Runs in: the master. Owns: the pid file's descriptor, which carries an
//! exclusive `flock`. `flock` locks belong to the open file description, so
//! a child that kept the descriptor would keep the lock after the master
//! died: every child closes it right after `fork()` ([`PidFile::close_in_child`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the pid file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Another process holds the lock.
    #[error(
        "{path} is locked by a running echod (pid {pid}); refusing to start a second instance"
    )]
    Locked {
        /// The pid file.
        path: PathBuf,
        /// What the file says.
        pid: String,
    },
    /// The file could not be opened or written.
    #[error("pid file {path}: {source}")]
    Io {
        /// The pid file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
}

/// A locked pid file holding this process's pid.
///
/// Invariant: while it lives, `file` holds an exclusive `flock` on `path`
/// and the file contains the pid of the process that created it.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: Option<File>,
}

impl PidFile {
    /// Opens (creating it, mode 0644), locks, truncates and writes `pid`.
    ///
    /// A master that exits removes the file while it still holds the lock,
    /// then closes it (see `Drop`). A master starting at that moment may
    /// have opened the file just before the removal and then lock the
    /// removed inode once the old lock goes: it would hold a lock no later
    /// start can see, and a third instance would start beside it. So after
    /// locking, the path must still name the locked file (same device and
    /// inode, `fstat` against `stat`); if not, the lock is dropped and the
    /// file opened again (the classic pattern of lock files that are
    /// removed at exit).
    pub fn create(path: &Path, pid: u32) -> Result<PidFile, PidFileError> {
        let io = |source| PidFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Each retry means another master removed the file between our
        // open and our lock; a handful of them in a row means something
        // keeps replacing it.
        for _ in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io)?;
            let Some(mut file) = lock(file, path)? else {
                continue;
            };
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            writeln!(file, "{pid}").map_err(io)?;
            return Ok(PidFile {
                path: path.to_path_buf(),
                file: Some(file),
            });
        }
        Err(io(std::io::Error::other(
            "the file was removed or replaced each time it was locked (10 tries)",
        )))
    }

    /// The pid file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// In a child after `fork()`: closes the descriptor (releasing nothing:
    /// the master's descriptor still holds the lock) without removing the
    /// file.
    pub fn close_in_child(mut self) {
        // Drop sees no file and leaves the path alone.
        self.file.take();
    }
}

/// Takes the exclusive lock on `file`, opened from `path`: `Some(file)`
/// once locked and still named by `path`; `None` if `path` no longer names
/// it (removed or replaced meanwhile: open it again).
fn lock(mut file: File, path: &Path) -> Result<Option<File>, PidFileError> {
    let io = |source| PidFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut held = String::new();
            let _ = file.read_to_string(&mut held);
            return Err(PidFileError::Locked {
                path: path.to_path_buf(),
                pid: held.trim().to_string(),
            });
        }
        return Err(io(err));
    }
    let locked = file.metadata().map_err(io)?;
    match std::fs::metadata(path) {
        Ok(named) if named.dev() == locked.dev() && named.ino() == locked.ino() => Ok(Some(file)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

impl Drop for PidFile {
    /// Removes the file, then releases the lock by closing it. In this
    /// order no process can lock the path's file without the lock being
    /// ours: one that opened it before the removal finds, once it has the
    /// lock, that the path no longer names it, and starts again.
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_the_file_goes_at_drop() {
        let dir = std::env::temp_dir().join(format!("echod-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("echod.pid");
        let first = PidFile::create(&path, 1234).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234\n");
        let err = PidFile::create(&path, 99).unwrap_err();
        assert!(err.to_string().contains("pid 1234"), "{err}");
        drop(first);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_on_a_removed_pid_file_is_not_taken_for_the_pid_file() {
        let dir = std::env::temp_dir().join(format!("echod-pidfile-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("echod.pid");
        let exiting = PidFile::create(&path, 1234).unwrap();
        // A starting master opened the file before the exiting one
        // removed it, and locks it after the exiting one closed it.
        let opened_early = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        drop(exiting);
        assert!(lock(opened_early, &path).unwrap().is_none());
        // A replaced file is no better.
        std::fs::write(&path, "").unwrap();
        let stale = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "").unwrap();
        assert!(lock(stale, &path).unwrap().is_none());
        // Opened afresh, the path's own file is locked.
        let second = PidFile::create(&path, 99).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "99\n");
        drop(second);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
