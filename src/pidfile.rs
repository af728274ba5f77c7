//! The pid file: created and locked by the master, removed at its exit.
//!
//! Runs in: the master. Owns: the pid file's descriptor, which carries an
//! exclusive `flock`. `flock` locks belong to the open file description, so
//! a child that kept the descriptor would keep the lock after the master
//! died: every child closes it right after `fork()` ([`PidFile::close_in_child`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
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
    pub fn create(path: &Path, pid: u32) -> Result<PidFile, PidFileError> {
        let io = |source| PidFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
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
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{pid}").map_err(io)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file: Some(file),
        })
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

impl Drop for PidFile {
    /// Removes the file, then releases the lock by closing it.
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
}
