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
//! that every listener is bound and its workers are up, and otherwise:
//! - with the daemon's own exit code and error message when it reports a
//!   failure: a port in use, a bad log target, a worker that can never
//!   start (exit code 2: the master stops echod and reports it);
//! - with 1 and "the daemon exited before it was ready" when the daemon
//!   died without a report (killed, or stopped by a signal meanwhile);
//! - with 1 when no report comes within [`READY_TIMEOUT`] (60 s): workers
//!   that keep dying are respawned with a growing delay, and the pool may
//!   never come up. Like systemd at `TimeoutStartSec=`, the launcher then
//!   stops the daemon (`SIGTERM`), waits up to [`STOP_WAIT`] for it to
//!   exit, and says so: a failed start leaves no daemon behind.
//!
//! The pipe carries two lines: the daemon's pid, written as soon as it is
//! forked (so that the launcher can stop it), then its report.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

use crate::process::{self, Fork};

/// How long the launcher waits for the daemon's report.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the launcher waits for a daemon it stopped (at
/// [`READY_TIMEOUT`]) to exit.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

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
    let mut pipe = File::from(write);
    // The first line: who the launcher must stop if no report comes.
    let _ = writeln!(pipe, "pid {}", std::process::id());
    nix::unistd::chdir("/")?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(Readiness { pipe: Some(pipe) })
}

/// How long the launcher waits for the report: [`READY_TIMEOUT`], or, for
/// the integration tests only, `ECHOD_TEST_READY_TIMEOUT_MS` (a test hook,
/// not documented for users).
fn ready_timeout() -> Duration {
    std::env::var("ECHOD_TEST_READY_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(READY_TIMEOUT)
}

/// Reads from `pipe` into `text` until the end of the stream or `deadline`;
/// returns whether the end was reached.
fn read_until(pipe: &mut File, text: &mut Vec<u8>, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = left.as_millis().min(60_000) as u16;
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return true,
        }
        match pipe.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// The launcher: reads the daemon's report and turns it into an exit code,
/// printing the reason of a failure; stops a daemon that sends none in
/// time.
fn wait_for_report(read: OwnedFd) -> i32 {
    let mut pipe = File::from(read);
    let mut text = Vec::new();
    let limit = ready_timeout();
    let ended = read_until(&mut pipe, &mut text, Instant::now() + limit);
    let text = String::from_utf8_lossy(&text).into_owned();
    let (pid, report) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with("pid ") => (first[4..].parse::<i32>().ok(), rest),
        _ => (None, text.as_str()),
    };
    if !ended {
        return stop_unready(&mut pipe, pid, limit);
    }
    let (code, message) = report.split_once(' ').unwrap_or((report, ""));
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

/// The launcher, when the daemon (`pid`) sent no report within `limit`:
/// `SIGTERM` (a graceful stop; a pool that never came up has nothing to
/// drain), then waits up to [`STOP_WAIT`] for the pipe to close, which the
/// daemon's exit does (its children closed their copies at fork). The pid
/// is the daemon's as long as the pipe is open.
fn stop_unready(pipe: &mut File, pid: Option<i32>, limit: Duration) -> i32 {
    let Some(pid) = pid else {
        eprintln!(
            "echod: the daemon was not ready within {limit:?} and did not say its pid; it may still be running (see its log)"
        );
        return 1;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let mut rest = Vec::new();
    if read_until(pipe, &mut rest, Instant::now() + STOP_WAIT) {
        eprintln!(
            "echod: the daemon (pid {pid}) was not ready within {limit:?} (are its workers crash-looping? see its log); stopped it"
        );
    } else {
        eprintln!(
            "echod: the daemon (pid {pid}) was not ready within {limit:?} (see its log), and still runs {STOP_WAIT:?} after SIGTERM"
        );
    }
    1
}
