//! The signal table, as data, and the self-pipe that turns signals into
//! events a poll loop can wait on.
//!
//! Runs in: the master (its whole signal table) and every child (the
//! worker's short table, registered after the master's pipe is dropped).
//!
//! Also the master's **bell** ([`Bell`]): how a worker wakes the master,
//! which a signal cannot do once the worker has dropped privileges.
//!
//! Owns: one `UnixStream` pair per process (the self-pipe), and in the
//! master the bell. The signal
//! handlers that `signal-hook` installs only record the signal number and
//! write a byte to the pipe; everything else happens in the poll loop, where
//! any code may run. No thread is ever started: the master forks, and
//! `fork()` in a threaded process may leave the child holding a lock forever.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::sys::eventfd::{EfdFlags, EventFd};

use signal_hook::consts::signal::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

/// What a signal means to the master. The names say the intent; the table
/// [`MASTER_SIGNALS`] maps them to the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-read the config and start a new generation of workers.
    Reload,
    /// Stop accepting, let connections finish up to `shutdown_timeout`.
    GracefulStop,
    /// Kill the children now and exit.
    FastStop,
    /// Reap exited children.
    Reap,
    /// Reopen the log file (logrotate).
    ReopenLogs,
    /// One worker more (prefork).
    AddWorker,
    /// One worker fewer (prefork), never below one.
    RemoveWorker,
    /// Look at recycling now rather than at the next tick. Workers do not
    /// send it (they ring the master's [`Bell`]); it stays caught, and
    /// harmless, for whoever sends it.
    Recycle,
}

/// One row of the signal table.
#[derive(Debug, Clone, Copy)]
pub struct SignalSpec {
    /// The signal number.
    pub signal: i32,
    /// Its conventional name, for logs and `--help`.
    pub name: &'static str,
    /// What the master does with it.
    pub action: Action,
    /// One line for `--help` and the README.
    pub help: &'static str,
}

/// The master's signal table: registration, logging and `--help` all read it.
pub const MASTER_SIGNALS: &[SignalSpec] = &[
    SignalSpec {
        signal: SIGHUP,
        name: "SIGHUP",
        action: Action::Reload,
        help: "reload: re-read the config; on success start a new generation of workers and drain the old one; on error keep serving with the old config",
    },
    SignalSpec {
        signal: SIGTERM,
        name: "SIGTERM",
        action: Action::GracefulStop,
        help: "graceful stop: close the listeners, let connections finish up to shutdown_timeout, then kill what is left; a second SIGTERM stops at once",
    },
    SignalSpec {
        signal: SIGINT,
        name: "SIGINT",
        action: Action::FastStop,
        help: "fast stop: kill the children now, remove the pid file, exit 0",
    },
    SignalSpec {
        signal: SIGQUIT,
        name: "SIGQUIT",
        action: Action::FastStop,
        help: "fast stop, as SIGINT",
    },
    SignalSpec {
        signal: SIGTTIN,
        name: "SIGTTIN",
        action: Action::AddWorker,
        help: "one worker more (prefork)",
    },
    SignalSpec {
        signal: SIGTTOU,
        name: "SIGTTOU",
        action: Action::RemoveWorker,
        help: "one worker fewer (prefork), never below 1",
    },
    SignalSpec {
        signal: SIGUSR1,
        name: "SIGUSR1",
        action: Action::ReopenLogs,
        help: "reopen the log file (for logrotate)",
    },
    SignalSpec {
        signal: SIGUSR2,
        name: "SIGUSR2",
        action: Action::Recycle,
        help: "look at recycling now; harmless (a worker that reached max_requests_per_worker rings the master's bell, an eventfd, instead)",
    },
    SignalSpec {
        signal: SIGCHLD,
        name: "SIGCHLD",
        action: Action::Reap,
        help: "reap exited children; respawn what must be respawned",
    },
];

/// The signals a prefork worker listens to. `SIGTERM` means "stop accepting
/// and drain"; `SIGINT` and `SIGQUIT` mean "close everything and exit now";
/// `SIGUSR1` (relayed by the master) means "reopen the log file".
pub const WORKER_SIGNALS: &[i32] = &[SIGTERM, SIGINT, SIGQUIT, SIGUSR1];

/// Looks a signal number up in the master's table.
pub fn spec(signal: i32) -> Option<&'static SignalSpec> {
    MASTER_SIGNALS.iter().find(|s| s.signal == signal)
}

/// Puts one batch of pending signals in the order the master handles
/// them: the stops first (`SIGTERM` before `SIGINT`/`SIGQUIT`), then the
/// rest as they came.
///
/// A batch carries no arrival order. [`SignalPipe::pending`] lists its
/// signals by number, and the kernel itself delivers signals pending
/// together lowest number first, which happens whenever they arrive while
/// the master is stopped, busy, or forking (every signal is blocked across
/// a fork). `SIGHUP` (1) would thus always come before `SIGTERM` (15), and
/// a `SIGTERM` sent first would find a new generation just forked by the
/// `SIGHUP` sent after it. A stop overrules what else the batch asks: a
/// reload or a pool change handled after it is refused, as the master is
/// stopping, instead of forking workers only to drain or kill them.
pub fn in_handling_order(mut batch: Vec<i32>) -> Vec<i32> {
    batch.sort_by_key(|&sig| match spec(sig).map(|s| s.action) {
        Some(Action::GracefulStop) => 0,
        Some(Action::FastStop) => 1,
        _ => 2,
    });
    batch
}

/// The name of a signal number, such as `SIGKILL`, for log lines.
pub fn name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// A self-pipe fed by signal handlers.
///
/// Invariant: while it lives, every signal it was created with is caught and
/// recorded; dropping it unregisters the handlers and closes both ends of the
/// pipe (a signal left with no action afterwards is ignored, not defaulted:
/// `signal-hook` keeps its trampoline installed).
pub struct SignalPipe {
    delivery: SignalDelivery<UnixStream, SignalOnly>,
}

impl SignalPipe {
    /// Installs handlers for `signals`, each of which writes to a new
    /// non-blocking, close-on-exec socket pair.
    pub fn new(signals: &[i32]) -> std::io::Result<SignalPipe> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let delivery = SignalDelivery::with_pipe(read, write, SignalOnly, signals)?;
        Ok(SignalPipe { delivery })
    }

    /// Drains the pipe and returns the signals that arrived since the last
    /// call, each once however often it was sent (the kernel coalesces
    /// pending signals too; `SIGCHLD` handling therefore reaps in a loop).
    pub fn pending(&mut self) -> Vec<i32> {
        self.delivery.pending().collect()
    }
}

impl AsFd for SignalPipe {
    /// The read end, readable when a signal has arrived.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.delivery.get_read().as_fd()
    }
}

/// The master's bell: an `eventfd` the master makes before its first fork
/// and polls beside its signal pipe; every prefork worker inherits it and
/// rings it when it wants the master's attention now rather than at the
/// master's next tick (it reached `max_requests_per_worker`).
///
/// Why not a signal: a worker running as the configured `user` may not
/// signal a master that runs as root (kill(2) needs the sender's uid to
/// match the target's: `EPERM`). Writing to an inherited descriptor needs
/// no permission.
///
/// Invariant: non-blocking and close-on-exec; readable while rung and not
/// yet cleared.
pub struct Bell {
    fd: EventFd,
}

impl Bell {
    /// A new, silent bell.
    pub fn new() -> std::io::Result<Bell> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Bell { fd })
    }

    /// In the master, after a wake-up: silences the bell (reading an
    /// eventfd resets its counter).
    pub fn clear(&self) {
        let _ = self.fd.read();
    }

    /// In a worker: rings the bell whose descriptor it inherited. `EAGAIN`
    /// (the counter is full, which takes 2^64 - 1 rings) means the master
    /// has a wake-up waiting anyway.
    pub fn ring(fd: BorrowedFd<'_>) {
        match nix::unistd::write(fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => log::warn!("ringing the master's bell: {e}"),
        }
    }
}

impl AsFd for Bell {
    /// The descriptor: polled by the master, written by the workers.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sends `signal` to `pid`, ignoring `ESRCH` (the process already exited
/// and awaits reaping, or was reaped: either way there is nothing to do).
pub fn send(pid: nix::unistd::Pid, signal: nix::sys::signal::Signal) {
    match nix::sys::signal::kill(pid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => log::warn!("kill({pid}, {signal}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_master_signal_is_listed_once() {
        let mut seen: Vec<i32> = MASTER_SIGNALS.iter().map(|s| s.signal).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), MASTER_SIGNALS.len());
        assert_eq!(spec(SIGHUP).map(|s| s.action), Some(Action::Reload));
        assert_eq!(spec(SIGTERM).map(|s| s.action), Some(Action::GracefulStop));
        assert!(spec(libc::SIGKILL).is_none());
    }

    #[test]
    fn a_rung_bell_is_readable_until_cleared() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let bell = Bell::new().unwrap();
        let readable = |b: &Bell| {
            let mut fds = [PollFd::new(b.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
        };
        assert!(!readable(&bell));
        Bell::ring(bell.as_fd());
        Bell::ring(bell.as_fd());
        assert!(readable(&bell));
        bell.clear();
        assert!(!readable(&bell), "one clear silences every ring");
    }

    #[test]
    fn stops_are_handled_before_the_rest_of_a_batch() {
        assert_eq!(
            in_handling_order(vec![SIGHUP, SIGINT, SIGTERM, SIGCHLD, SIGTTIN]),
            vec![SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGTTIN]
        );
        assert_eq!(
            in_handling_order(vec![SIGHUP, SIGCHLD, SIGTTOU]),
            vec![SIGHUP, SIGCHLD, SIGTTOU]
        );
    }

    #[test]
    fn names_are_conventional() {
        assert_eq!(name(libc::SIGKILL), "SIGKILL");
        assert_eq!(name(SIGTERM), "SIGTERM");
    }
}
