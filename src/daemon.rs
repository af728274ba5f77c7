//! `--daemon`: detach from the terminal for machines without systemd.
//!
//! Runs in: the launcher (the process the user started), which forks, waits
//! on a readiness pipe, and exits with the daemon's verdict; and the
//! daemon (the grandchild), which becomes the master.
//!
//! Owns: the write end of the readiness pipe, in the daemon until it is
//! ready (then closed), and in no child.
//!
//! Why not the `daemonize` crate: it is unmaintained (RUSTSEC-2025-0069),
//! has undefined behaviour, and its launcher exits 0 even when the daemon
//! failed to start. Here the launcher exits 0 only once the daemon reported
//! that every listener is bound and its workers are up, and otherwise with
//! the daemon's own exit code and error message (for example a port in use).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::process::{self, Fork};

/// The daemon's end of the readiness pipe. Reports once: ready, or failed
/// with an exit code and a message. Dropping it unreported makes the
/// launcher say the daemon died before it was ready.
#[derive(Debug, Default)]
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// No launcher is waiting (not daemonized).
    pub fn none() -> Readiness {
        Readiness::default()
    }

    /// Tells the launcher to exit 0.
    pub fn ready(&mut self) {
        self.report("0 ready");
    }

    /// Tells the launcher to print `message` and exit with `code`.
    pub fn failed(&mut self, code: u8, message: &str) {
        self.report(&format!("{code} {message}"));
    }

    fn report(&mut self, line: &str) {
        if let Some(mut f) = self.pipe.take() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// In a child after `fork()`: closes the pipe without reporting.
    pub fn close_in_child(&mut self) {
        self.pipe = None;
    }
}

/// Detaches: fork, `setsid`, fork again, `chdir /`, `umask 022`, stdio to
/// `/dev/null`. Returns only in the daemon; the launcher waits for the
/// daemon's report and exits with it.
pub fn detach() -> std::io::Result<Readiness> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    match process::fork()? {
        Fork::Parent(child) => {
            drop(write);
            // The intermediate child exits at once; reap it.
            let _ = nix::sys::wait::waitpid(child, None);
            std::process::exit(wait_for_report(read));
        }
        Fork::Child => process::unblock_signals(),
    }
    drop(read);
    // A new session: no controlling terminal, no SIGHUP when the terminal
    // closes.
    nix::unistd::setsid()?;
    match process::fork()? {
        // The session leader exits, so the daemon can never reacquire a
        // controlling terminal by opening one.
        Fork::Parent(_) => std::process::exit(0),
        Fork::Child => process::unblock_signals(),
    }
    nix::unistd::chdir("/")?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(Readiness {
        pipe: Some(File::from(write)),
    })
}

/// The launcher: reads the daemon's report and turns it into an exit code,
/// printing the reason of a failure.
fn wait_for_report(read: OwnedFd) -> i32 {
    let mut text = String::new();
    let _ = File::from(read).read_to_string(&mut text);
    let (code, message) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    match code.parse::<i32>() {
        Ok(0) => 0,
        Ok(code) => {
            eprintln!("echod: {message}");
            code
        }
        Err(_) => {
            eprintln!("echod: the daemon exited before it was ready (see the system log)");
            1
        }
    }
}
