//! The one `fork()`, the child's resets, and reaping into typed exits.
//!
//! Runs in: the master (fork, reap) and, for the few instructions after
//! `fork()` returns, in the new child (`after_fork_in_child`).
//!
//! Owns no descriptor. Every caller of [`fork`] writes a `// FORK:` block
//! saying what each side closes and what copy-on-write shares.

use nix::errno::Errno;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{Config, KeyProblem, LogTarget, STDERR_WHEN_DETACHED};

/// Exit codes a child uses to tell the master what to do next.
pub mod exit_code {
    /// Normal end (drained, recycled, or told to stop).
    pub const OK: i32 = 0;
    /// Something went wrong that a fresh process may not hit again: respawn.
    pub const FAILURE: i32 = 1;
    /// The child can never start with this config (for example it cannot
    /// switch to the configured user, though the master found that user at
    /// start): respawning would loop, so the master stops, like nginx's
    /// exit code 2.
    pub const FATAL: i32 = 2;
    /// The child found its master gone right after fork (the race that
    /// `PR_SET_PDEATHSIG` alone does not close).
    pub const ORPHANED: i32 = 3;
}

/// How a child ended, as the master logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal; `true` if it dumped core.
    Signaled(Signal, bool),
}

impl Exit {
    /// Whether this exit is the normal end of a child's life.
    pub fn is_clean(self) -> bool {
        self == Exit::Code(exit_code::OK)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(0) => write!(f, "exited normally"),
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signaled(s, true) => write!(f, "killed by {} (core dumped)", s.as_str()),
            Exit::Signaled(s, false) => write!(f, "killed by {}", s.as_str()),
        }
    }
}

/// Which side of a `fork()` we are on.
pub enum Fork {
    /// The parent, with the child's pid.
    Parent(Pid),
    /// The new child.
    Child,
}

/// Forks the process.
///
/// The caller's `// FORK:` block says what each side closes. The child must
/// call [`after_fork_in_child`] first, and must end in `std::process::exit`
/// (never by returning into the parent's stack, whose destructors would, for
/// example, remove the master's pid file).
///
/// Every signal is blocked across the fork, and stays blocked in the child
/// until it has installed its own handlers and calls
/// [`unblock_signals`]: a `SIGTERM` sent to a brand-new worker (a reload
/// storm retires workers milliseconds old) then waits as pending and reaches
/// the worker's handler, instead of landing in the gap where the master's
/// handlers are gone and the worker's are not yet installed (and being
/// ignored). The parent's mask is restored before this returns.
pub fn fork() -> nix::Result<Fork> {
    debug_assert_single_threaded();
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))?;
    // SAFETY: echod never starts a thread in a process that forks (asserted
    // above in debug builds), so no lock can be held by another thread at
    // the moment of fork, and the child may run any code, not only
    // async-signal-safe functions.
    let result = unsafe { nix::unistd::fork() };
    match result {
        Ok(nix::unistd::ForkResult::Child) => Ok(Fork::Child),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Ok(Fork::Parent(child))
        }
        Err(e) => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Err(e)
        }
    }
}

/// In a child, once its signal handlers are in place: lets the signals
/// that [`fork`] blocked (and any that arrived meanwhile) through.
pub fn unblock_signals() {
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        log::error!("sigprocmask: {e}");
    }
}

/// What every child does first: die with the master, and close the race.
///
/// `PR_SET_PDEATHSIG(SIGKILL)` makes the kernel kill this child when the
/// thread that forked it (the master's only thread) exits. If the master
/// died between `fork()` and this call, the signal will never come: the
/// `getppid()` check catches that case (the child was reparented). It must
/// be set again after a `setuid()`, which clears it.
pub fn after_fork_in_child(master: Pid) {
    die_with_parent(master);
}

/// Sets `PR_SET_PDEATHSIG(SIGKILL)` and checks that `master` is still the
/// parent; exits with [`exit_code::ORPHANED`] if it is not.
pub fn die_with_parent(master: Pid) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no
    // memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if rc != 0 {
        log::error!("prctl(PR_SET_PDEATHSIG): {}", Errno::last());
    }
    if nix::unistd::getppid() != master {
        std::process::exit(exit_code::ORPHANED);
    }
}

/// Checks a parsed configuration against the system, as a start, a reload
/// and `--check-config` all do (through [`Config::load_with`]): the log
/// sink can be opened, and `user` and `group` exist and can be switched to.
/// `detach`: echod will detach (`daemon = true` or `--daemon`). Returns the
/// credentials to switch the children to.
pub fn check_system(config: &Config, detach: bool) -> Result<Option<Credentials>, KeyProblem> {
    if detach && config.log.target == LogTarget::Stderr {
        return Err(KeyProblem {
            key: "log.target",
            message: STDERR_WHEN_DETACHED.to_owned(),
        });
    }
    crate::logging::check(&config.log)?;
    Credentials::resolve(config.user.as_deref(), config.group.as_deref())
}

/// The user and group children run as (config `user` / `group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name, for logs.
    pub user: Option<String>,
    /// The uid to switch to, if a user is configured.
    pub uid: Option<nix::unistd::Uid>,
    /// The gid to switch to.
    pub gid: nix::unistd::Gid,
}

impl Credentials {
    /// Looks up `user` and `group` in the user database. With only a user,
    /// the group is the user's primary group. `Ok(None)`: nothing to drop.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Option<Credentials>, KeyProblem> {
        let problem = |key, message| KeyProblem { key, message };
        let pw = match user {
            Some(name) => Some(
                nix::unistd::User::from_name(name)
                    .map_err(|e| problem("user", format!("looking up {name:?}: {e}")))?
                    .ok_or_else(|| problem("user", format!("{name:?} does not exist")))?,
            ),
            None => None,
        };
        let gid = match group {
            Some(name) => {
                nix::unistd::Group::from_name(name)
                    .map_err(|e| problem("group", format!("looking up {name:?}: {e}")))?
                    .ok_or_else(|| problem("group", format!("{name:?} does not exist")))?
                    .gid
            }
            None => match &pw {
                Some(pw) => pw.gid,
                None => return Ok(None),
            },
        };
        let creds = Credentials {
            user: user.map(str::to_string),
            uid: pw.map(|p| p.uid),
            gid,
        };
        // Switching user or group takes root (CAP_SETUID/CAP_SETGID): say
        // so now, rather than let every child fail at its first fork. Under
        // the systemd unit, which starts echod unprivileged, leave
        // user/group unset.
        let euid = nix::unistd::geteuid();
        let same = creds.uid.is_none_or(|u| u == euid) && creds.gid == nix::unistd::getegid();
        if same && !euid.is_root() {
            // Already this user and group: nothing to switch.
            return Ok(None);
        }
        if !euid.is_root() {
            return Err(problem(
                if user.is_some() { "user" } else { "group" },
                format!(
                    "echod runs as uid {euid}, not root, and cannot switch users or groups: \
                     leave them unset (under systemd, the unit chooses the user)"
                ),
            ));
        }
        Ok(Some(creds))
    }

    /// Tries the switch in a child that does nothing else, for a reload
    /// that changes `user` or `group`: being root (what [`Credentials::resolve`]
    /// checks) is not always enough, as a root echod may lack `CAP_SETUID`
    /// or `CAP_SETGID`, or run in a user namespace that does not map the
    /// user. A new generation whose workers cannot switch would exit with
    /// [`exit_code::FATAL`] and stop echod; found here, the reload fails
    /// instead and the running generation keeps serving. The error names
    /// the key to blame.
    ///
    /// The master waits for the child, which only makes three system calls,
    /// for at most a second; one that takes longer (stopped from outside)
    /// is killed and the switch counted as failed.
    pub fn try_switch(&self) -> Result<(), KeyProblem> {
        let key = if self.uid.is_some() { "user" } else { "group" };
        let failed = |why: String| KeyProblem {
            key,
            message: format!(
                "cannot switch to user {} / gid {}: {why}",
                self.user.as_deref().unwrap_or("(unchanged)"),
                self.gid
            ),
        };
        let pid = match fork().map_err(|e| failed(format!("fork to try it: {e}")))? {
            Fork::Child => {
                // FORK (credential probe):
                // - child closes: nothing by hand; it ends at once with
                //   _exit, and the kernel closes every descriptor it
                //   inherited. It runs no destructor and flushes nothing of
                //   the master's, and with every signal still blocked (see
                //   `fork`) it runs none of the master's handlers.
                // - parent closes: nothing.
                // - copy-on-write shares: `self`, read here.
                // - child resets: its credentials, which is the test.
                let code = match self.apply() {
                    Ok(()) => 0,
                    Err(e) => e as i32,
                };
                // SAFETY: _exit(2) ends the process at once; nothing of the
                // master's (buffers, locks, the pid file) is touched.
                unsafe { libc::_exit(code) }
            }
            Fork::Parent(pid) => pid,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
                Ok(WaitStatus::Exited(_, errno)) => {
                    return Err(failed(Errno::from_raw(errno).to_string()))
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Err(failed(format!("the trial child was killed by {sig}")))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(failed(format!("waitpid: {e}"))),
                Ok(_) if std::time::Instant::now() >= deadline => {
                    crate::signals::send(pid, Signal::SIGKILL);
                    // A killed child is reaped at once (SIGKILL ends even a
                    // stopped process).
                    let _ = waitpid(pid, None);
                    return Err(failed("the trial child did not finish".to_owned()));
                }
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }

    /// Switches this process to the credentials: supplementary groups
    /// cleared, then the gid, then the uid (last: after it, the others can
    /// no longer be changed). Clears `PR_SET_PDEATHSIG` as a side effect of
    /// the kernel's credential change: set it again afterwards.
    pub fn apply(&self) -> nix::Result<()> {
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(self.gid)?;
        if let Some(uid) = self.uid {
            nix::unistd::setuid(uid)?;
        }
        Ok(())
    }
}

/// Collects every child that has exited, without blocking: `waitpid(-1,
/// WNOHANG)` in a loop until none is left, because one `SIGCHLD` may stand
/// for many exits (pending signals coalesce).
pub fn reap() -> Vec<(Pid, Exit)> {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, core)) => out.push((pid, Exit::Signaled(sig, core))),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(_) => continue, // stopped/continued: not an exit
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitpid: {e}");
                break;
            }
        }
    }
    out
}

/// In debug builds, checks from `/proc/self/task` that this process has a
/// single thread, the precondition of every `fork()` here.
pub fn debug_assert_single_threaded() {
    #[cfg(debug_assertions)]
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let n = tasks.count();
        debug_assert_eq!(n, 1, "fork() with {n} threads");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_log_phrases() {
        assert_eq!(Exit::Code(0).to_string(), "exited normally");
        assert_eq!(Exit::Code(3).to_string(), "exited with code 3");
        assert_eq!(
            Exit::Signaled(Signal::SIGKILL, false).to_string(),
            "killed by SIGKILL"
        );
        assert!(Exit::Code(0).is_clean());
        assert!(!Exit::Signaled(Signal::SIGTERM, false).is_clean());
    }
}
