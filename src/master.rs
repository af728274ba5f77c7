//! The master: the supervisor loop and one handler per signal.
//!
//! Runs in: the master process, for its whole life. It never reads or
//! writes a client byte: in prefork mode the workers accept; in fork mode
//! the master accepts and hands each connection to a new child at once.
//!
//! Owns: the listeners (the reference copies every generation inherits),
//! the signal pipe, the scoreboard mapping and the pid file. Signals: the
//! whole table in [`crate::signals::MASTER_SIGNALS`].
//!
//! The loop (like gunicorn's `Arbiter.run`): wait on the signal pipe (and,
//! in fork mode, the listeners) with a tick; dispatch each signal to its
//! `handle_*` method; then reap, murder (missed heartbeats), recycle and
//! manage (converge the pool to the wanted size). Signal handlers only
//! record and wake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{Config, Mode, Overload};
use crate::daemon::Readiness;
use crate::listener::{self, Listener};
use crate::notify::Notifier;
use crate::pidfile::PidFile;
use crate::process::Credentials;
use crate::process::{self, exit_code, Exit, Fork};
use crate::scoreboard::{now_ms, Scoreboard};
use crate::signals::{self, Action, SignalPipe, MASTER_SIGNALS};
use crate::workers::{Backoff, Child, Kill, Phase, Role, WorkerTable};

/// The master's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Serving and supervising.
    Running,
    /// Listeners closed, children draining; exits when the last is reaped.
    Stopping {
        /// `false` after a fast stop (children were killed).
        graceful: bool,
    },
}

/// How long the master sleeps at most between two looks at its children.
const TICK: Duration = Duration::from_secs(1);
/// The shorter tick while a recycle or a new generation is coming up.
const BUSY_TICK: Duration = Duration::from_millis(50);
/// Accept pause in fork mode after `EMFILE`/`ENFILE` or a failed fork.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The signal handlers could not be installed.
    #[error("signal handlers: {0}")]
    Signals(std::io::Error),
    /// The shared scoreboard could not be mapped.
    #[error("scoreboard mmap: {0}")]
    Scoreboard(nix::Error),
}

/// The supervisor.
pub struct Master {
    /// The config in force (the current generation's).
    config: Config,
    /// The file named with `--config`, re-read at every reload.
    config_path: Option<PathBuf>,
    /// The current generation's listeners, in `config.listen` order.
    listeners: Vec<Listener>,
    /// The self-pipe; `None` only in a child, which dropped it after fork.
    signals: Option<SignalPipe>,
    board: Scoreboard,
    table: WorkerTable,
    /// The current generation: 1 at start, +1 per successful reload.
    generation: u64,
    /// Prefork pool size: `config.workers`, moved by `SIGTTIN`/`SIGTTOU`.
    wanted: usize,
    state: State,
    backoff: Backoff,
    pid: Pid,
    pidfile: Option<PidFile>,
    /// Fork mode: accepting is paused until then.
    accept_paused_until: Option<Instant>,
    /// The code to exit with once stopped.
    exit_code: i32,
    /// sd_notify, when a service manager listens.
    notifier: Notifier,
    /// The `--daemon` launcher waiting for "ready".
    readiness: Readiness,
    /// `READY=1` is owed: at start, and after a successful reload, until
    /// the current generation's pool is up.
    awaiting_ready: bool,
    /// The user/group children switch to (config `user`/`group`).
    credentials: Option<Credentials>,
    /// The listeners came from systemd (socket activation): `listen` in the
    /// config is not applied, at start or at reload.
    activated: bool,
    /// Whether the process detached at start.
    daemonized: bool,
    /// Fork mode: live connection children per source address.
    per_ip: HashMap<IpAddr, usize>,
    /// Fork mode: when each refused address was last logged.
    refusals_logged: HashMap<IpAddr, Instant>,
    /// A fast stop's listeners, kept until every child is reaped and then
    /// shut down (see [`Master::finished`]).
    unlisten_at_exit: Vec<Listener>,
}

/// Everything the launcher prepared for the master.
pub struct Setup {
    /// The validated config.
    pub config: Config,
    /// The file named with `--config`, re-read at every reload.
    pub config_path: Option<PathBuf>,
    /// The bound (or adopted) listeners.
    pub listeners: Vec<Listener>,
    /// Whether the listeners came from systemd.
    pub activated: bool,
    /// The daemon launcher's readiness pipe (`Readiness::none()` if not
    /// daemonized).
    pub readiness: Readiness,
    /// Resolved `user`/`group`.
    pub credentials: Option<Credentials>,
    /// Whether the launcher detached (`--daemon` or `daemon = true`): the
    /// `auto` log target means syslog then.
    pub daemonized: bool,
    /// The locked pid file, if configured.
    pub pidfile: Option<PidFile>,
}

impl Master {
    /// Takes the bound listeners and the pid file, installs the signal
    /// table and maps the scoreboard. Forks nothing yet.
    pub fn new(setup: Setup) -> Result<Master, MasterError> {
        let Setup {
            config,
            config_path,
            listeners,
            activated,
            readiness,
            credentials,
            daemonized,
            pidfile,
        } = setup;
        let sigs: Vec<i32> = MASTER_SIGNALS.iter().map(|s| s.signal).collect();
        let signals = SignalPipe::new(&sigs).map_err(MasterError::Signals)?;
        let board = Scoreboard::new(&config).map_err(MasterError::Scoreboard)?;
        let pid = nix::unistd::getpid();
        Ok(Master {
            wanted: config.workers,
            config,
            config_path,
            listeners,
            signals: Some(signals),
            board,
            table: WorkerTable::default(),
            generation: 1,
            state: State::Running,
            backoff: Backoff::default(),
            pid,
            pidfile,
            accept_paused_until: None,
            exit_code: exit_code::OK,
            notifier: Notifier::from_env(),
            readiness,
            awaiting_ready: true,
            credentials,
            activated,
            per_ip: HashMap::new(),
            refusals_logged: HashMap::new(),
            daemonized,
            unlisten_at_exit: Vec::new(),
        })
    }

    /// Runs until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        set_comm("echod-master");
        log::info!(
            "master (pid {}) starting generation 1: {} mode{}",
            self.pid,
            mode_name(self.config.mode),
            match self.config.mode {
                Mode::Prefork => format!(", {} workers", self.wanted),
                Mode::Fork => format!(
                    ", up to {} connection children",
                    self.config.max_connections
                ),
            }
        );
        loop {
            self.manage_workers();
            self.report_status();
            let accept = self.wait();
            let pending = self
                .signals
                .as_mut()
                .map(SignalPipe::pending)
                .unwrap_or_default();
            for sig in pending {
                self.handle_signal(sig);
            }
            if accept {
                self.accept_connections();
            }
            self.reap_children();
            self.murder_workers();
            self.recycle_workers();
            if let Some(code) = self.finished() {
                return code;
            }
        }
    }

    /// Polls the signal pipe (and, in fork mode with room for children, the
    /// listeners) until something happens or the next timer. Returns whether
    /// a listener is readable.
    fn wait(&mut self) -> bool {
        let now = Instant::now();
        let mut until = now + self.tick();
        if let Some(t) = self.table.next_deadline() {
            until = until.min(t);
        }
        if let Some(t) = self.backoff.not_before() {
            if t > now {
                until = until.min(t);
            }
        }
        if let Some(t) = self.accept_paused_until {
            until = until.min(t);
        }
        let timeout = until.saturating_duration_since(now);
        let accepting = self.fork_accepting();
        let Some(signals) = self.signals.as_ref() else {
            return false;
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if accepting {
            fds.extend(
                self.listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
        }
        let ms = timeout.as_millis().min(60_000) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {
                accepting
                    && fds[1..]
                        .iter()
                        .any(|f| f.revents().is_some_and(|r| !r.is_empty()))
            }
            Err(nix::errno::Errno::EINTR) => false,
            Err(e) => {
                log::error!("poll: {e}");
                false
            }
        }
    }

    /// The tick: short while workers of the current generation are coming
    /// up, `READY=1` is owed, or a worker is being recycled, so that those
    /// steps are not a second late.
    fn tick(&self) -> Duration {
        let starting = self
            .table
            .pool(self.generation)
            .any(|c| c.slot().is_some_and(|s| self.board.heartbeat(s) == 0));
        if starting || self.awaiting_ready || self.table.recycling() {
            BUSY_TICK
        } else {
            TICK
        }
    }

    /// Fork mode: whether the master should accept now (running, below the
    /// cap of live children, not paused).
    fn fork_accepting(&mut self) -> bool {
        if self.config.mode != Mode::Fork || self.state != State::Running {
            return false;
        }
        if let Some(t) = self.accept_paused_until {
            if Instant::now() < t {
                return false;
            }
            self.accept_paused_until = None;
        }
        self.config.overload == Overload::Reject
            || self.table.connection_children() < self.config.max_connections
    }

    fn handle_signal(&mut self, sig: i32) {
        let Some(spec) = signals::spec(sig) else {
            return;
        };
        match spec.action {
            // Both run every turn of the loop: the signal only wakes it.
            Action::Reap | Action::Recycle => {}
            Action::Reload => self.handle_reload(),
            Action::GracefulStop => self.handle_graceful_stop(),
            Action::FastStop => self.handle_fast_stop(spec.name),
            Action::ReopenLogs => self.handle_reopen_logs(),
            Action::AddWorker => self.handle_add_worker(),
            Action::RemoveWorker => self.handle_remove_worker(),
        }
    }

    /// `SIGHUP`: load and check the config file; bind the new addresses;
    /// start a new generation; tell the old one to drain. Any failure before
    /// the new generation starts leaves everything as it was.
    fn handle_reload(&mut self) {
        if self.state != State::Running {
            log::warn!("SIGHUP while stopping: ignored");
            return;
        }
        let source = self
            .config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
        log::info!("SIGHUP: reloading {}", source.display());
        self.notifier.reloading();
        if let Err(e) = self.reload() {
            log::error!(
                "reload failed, still serving generation {} with the old config: {e}",
                self.generation
            );
            let status = self.status_line();
            self.notifier.ready(&status);
        }
    }

    /// The body of a reload. Everything that can fail happens before the
    /// commit point, so an error leaves the running generation untouched.
    fn reload(&mut self) -> Result<(), String> {
        let (mut new, _) = Config::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        let credentials = Credentials::resolve(new.user.as_deref(), new.group.as_deref())?;
        if self.activated {
            if new.listen != self.config.listen {
                log::warn!(
                    "listen is managed by systemd (socket activation): keeping the sockets it passed"
                );
            }
            new.listen = self.listeners.iter().map(|l| l.configured).collect();
        }
        // Bind what is new before anything is closed; addresses that stay
        // keep their socket (and the connections queued on it).
        let fresh: Vec<SocketAddr> = new
            .listen
            .iter()
            .filter(|a| !self.listeners.iter().any(|l| l.configured == **a))
            .copied()
            .collect();
        let mut bound = listener::bind_all(&fresh, new.backlog).map_err(|e| e.to_string())?;
        let pidfile = if new.pid_file != self.config.pid_file {
            match new.pid_file.as_deref() {
                Some(p) => Some(Some(
                    PidFile::create(p, self.pid.as_raw() as u32).map_err(|e| e.to_string())?,
                )),
                None => Some(None),
            }
        } else {
            None
        };
        crate::logging::apply(&new.log, self.daemonized).map_err(|e| e.to_string())?;
        // Commit.
        let mut old = std::mem::take(&mut self.listeners);
        for addr in &new.listen {
            if let Some(i) = old.iter().position(|l| l.configured == *addr) {
                let l = old.remove(i);
                if new.backlog != self.config.backlog {
                    if let Err(e) = l.set_backlog(new.backlog) {
                        log::warn!("listen({}, backlog {}): {e}", l.local, new.backlog);
                    }
                }
                self.listeners.push(l);
            } else if let Some(i) = bound.iter().position(|l| l.configured == *addr) {
                let l = bound.remove(i);
                log::info!("listening on {}", l.local);
                self.listeners.push(l);
            }
        }
        if let Some(p) = pidfile {
            self.pidfile = p;
        }
        let changes = self.config.changes(&new);
        self.config = new;
        self.generation += 1;
        self.wanted = self.config.workers;
        self.backoff.reset();
        self.credentials = credentials;
        self.awaiting_ready = true;
        log::info!(
            "reload: generation {} starts ({}); generation {} drains",
            self.generation,
            if changes.is_empty() {
                "no changes".to_string()
            } else {
                changes.join(", ")
            },
            self.generation - 1
        );
        // The master's copies of removed listeners close before the new
        // generation is forked: fork() copies every descriptor, and the new
        // workers would hold these sockets (still listening, queueing
        // connections nobody accepts) for their whole life. The old workers
        // close theirs when they drain, and the port is free.
        for l in old {
            log::info!("no longer listening on {}", l.local);
        }
        // The new generation first, then the old one stops accepting: the
        // shared listeners keep queueing connections meanwhile.
        self.manage_workers();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        for pid in self.table.retire_older(self.generation, deadline) {
            signals::send(pid, Signal::SIGTERM);
        }
        Ok(())
    }

    /// `SIGTERM`: graceful stop; a second one stops at once.
    fn handle_graceful_stop(&mut self) {
        match self.state {
            State::Running => {
                log::info!(
                    "SIGTERM: graceful stop; closing listeners, {} children drain for up to {:?}",
                    self.table.len(),
                    self.config.shutdown_timeout
                );
                self.begin_stop(true);
            }
            State::Stopping { .. } => self.handle_fast_stop("second SIGTERM"),
        }
    }

    /// `SIGINT`/`SIGQUIT`: kill every child now.
    fn handle_fast_stop(&mut self, why: &str) {
        log::info!("{why}: fast stop; killing {} children", self.table.len());
        self.begin_stop(false);
    }

    /// Closes the listeners and tells every child to go: `SIGTERM` (drain,
    /// killed after `shutdown_timeout`) or, for a fast stop, `SIGKILL`.
    fn begin_stop(&mut self, graceful: bool) {
        self.state = State::Stopping { graceful };
        self.notifier.stopping();
        // The master's descriptors go now; the workers close theirs as
        // they drain or die. After a fast stop the sockets are also shut
        // down once the children are reaped; sockets systemd passed are
        // left listening (it keeps them for the next start).
        let listeners = std::mem::take(&mut self.listeners);
        if !graceful && !self.activated {
            self.unlisten_at_exit = listeners;
        }
        let now = Instant::now();
        if graceful {
            let deadline = now + self.config.shutdown_timeout;
            for pid in self.table.retire_older(u64::MAX, deadline) {
                signals::send(pid, Signal::SIGTERM);
            }
        } else {
            for pid in self.table.kill_all() {
                signals::send(pid, Signal::SIGKILL);
            }
        }
    }

    /// `SIGUSR1`: reopen the log file.
    fn handle_reopen_logs(&mut self) {
        match crate::logging::reopen() {
            Ok(()) => log::info!("SIGUSR1: log reopened"),
            Err(e) => log::error!("SIGUSR1: {e}"),
        }
        // Workers hold their own descriptor of the log file (inherited at
        // fork): each reopens it too, or it would go on writing to the
        // rotated file.
        for c in self.table.iter().filter(|c| c.is_worker()) {
            signals::send(c.pid, Signal::SIGUSR1);
        }
    }

    /// `SIGTTIN`: one worker more.
    fn handle_add_worker(&mut self) {
        if self.config.mode != Mode::Prefork || self.state != State::Running {
            return;
        }
        self.wanted += 1;
        log::info!("SIGTTIN: {} workers wanted", self.wanted);
    }

    /// `SIGTTOU`: one worker fewer, never below one.
    fn handle_remove_worker(&mut self) {
        if self.config.mode != Mode::Prefork || self.state != State::Running {
            return;
        }
        if self.wanted > 1 {
            self.wanted -= 1;
        }
        log::info!("SIGTTOU: {} workers wanted", self.wanted);
    }

    /// Converges the current generation's pool to the wanted size: spawns
    /// the missing workers (unless the crash-loop guard says wait), retires
    /// the extra ones.
    fn manage_workers(&mut self) {
        if self.state != State::Running {
            return;
        }
        let wanted = match self.config.mode {
            Mode::Prefork => self.wanted,
            Mode::Fork => 0,
        };
        let plan = self.table.plan(self.generation, wanted);
        let deadline = Instant::now() + self.config.shutdown_timeout;
        for pid in plan.retire {
            if let Some(c) = self.table.get_mut(pid) {
                log::info!("{c}: retiring (pool shrinks to {wanted})");
            }
            self.table.retire(pid, deadline);
            signals::send(pid, Signal::SIGTERM);
        }
        for id in plan.spawn {
            if !self.backoff.allows(Instant::now()) {
                return;
            }
            self.spawn_worker(id);
        }
    }

    /// Forks prefork worker `id` of the current generation.
    fn spawn_worker(&mut self, id: usize) {
        let Some(slot) = self.board.claim() else {
            log::error!(
                "scoreboard full ({} live workers): worker {id} not spawned",
                crate::scoreboard::SLOTS
            );
            let _ = self.backoff.record_failure(Duration::ZERO, Instant::now());
            return;
        };
        match process::fork() {
            Err(e) => {
                log::error!("fork: {e}; worker {id} not spawned");
                self.board.release(slot);
                let _ = self.backoff.record_failure(Duration::ZERO, Instant::now());
            }
            Ok(Fork::Parent(pid)) => {
                let child = Child {
                    pid,
                    role: Role::Worker {
                        id,
                        slot: Some(slot),
                    },
                    generation: self.generation,
                    spawned: Instant::now(),
                    phase: Phase::Serving,
                };
                log::info!("{child}: spawned");
                self.table.insert(child);
            }
            Ok(Fork::Child) => {
                // FORK (prefork worker):
                // - child closes: the master's signal pipe (its handlers are
                //   unregistered too, and the worker installs its own), the
                //   pid-file lock. It keeps the listeners (accepting on them
                //   is its job) and the doorbell of accept balancing, an
                //   eventfd that, like the listeners, every worker shares.
                // - parent closes: nothing; it keeps the listeners for the
                //   next workers and generations.
                // - copy-on-write shares: the config snapshot and the
                //   master's tables, read-only here. The worker's config is
                //   frozen at this fork, which is why a reload forks a new
                //   generation instead of telling workers to re-read. The
                //   scoreboard is MAP_SHARED: the one memory both sides
                //   really share.
                // - child resets: PR_SET_PDEATHSIG with a getppid() check,
                //   its signal handlers, its log role.
                self.become_child(
                    format!("worker {id} gen {}", self.generation),
                    "echod-worker",
                );
                let listeners = std::mem::take(&mut self.listeners);
                let seat = crate::worker::Seat {
                    board: &self.board,
                    slot,
                    master: Some(self.pid),
                };
                let code = crate::worker::run(listeners, &self.config, seat);
                std::process::exit(code);
            }
        }
    }

    /// Fork mode: accepts until the queue is empty or the cap is reached,
    /// forking one child per connection.
    fn accept_connections(&mut self) {
        for i in 0..self.listeners.len() {
            loop {
                let full = self.table.connection_children() >= self.config.max_connections;
                if full && self.config.overload == Overload::Wait {
                    // Clients wait in the backlog until a child exits.
                    return;
                }
                match self.listeners[i].accept() {
                    Ok((stream, peer)) if full => {
                        drop(stream);
                        self.log_refusal(peer, "max_connections reached (overload = \"reject\")");
                    }
                    Ok((stream, peer)) => {
                        let cap = self.config.max_connections_per_ip;
                        let count = self.per_ip.get(&peer.ip()).copied().unwrap_or(0);
                        if cap > 0 && count >= cap {
                            drop(stream);
                            self.log_refusal(peer, "max_connections_per_ip reached");
                        } else {
                            self.fork_connection(stream, peer);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        log::warn!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        return;
                    }
                    Err(e) => log::debug!("accept: {e}"),
                }
            }
        }
    }

    /// Logs a refused connection at most once a second per address.
    fn log_refusal(&mut self, peer: SocketAddr, why: &str) {
        let now = Instant::now();
        if self.refusals_logged.len() > 4096 {
            self.refusals_logged
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
        }
        let fresh = match self.refusals_logged.get(&peer.ip()) {
            Some(t) => now.duration_since(*t) >= Duration::from_secs(1),
            None => true,
        };
        if fresh {
            self.refusals_logged.insert(peer.ip(), now);
            log::warn!("{why}: refusing {peer}");
        }
    }

    /// Fork mode: one child for one connection.
    fn fork_connection(&mut self, stream: TcpStream, peer: SocketAddr) {
        match process::fork() {
            Err(e) => {
                log::error!("fork: {e}; closing the connection from {peer}");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            }
            Ok(Fork::Parent(pid)) => {
                // FORK (parent side): the connection belongs to the child
                // now; the master closes its descriptor at once, so it never
                // holds a client connection and no later child inherits it.
                drop(stream);
                let child = Child {
                    pid,
                    role: Role::Conn { peer },
                    generation: self.generation,
                    spawned: Instant::now(),
                    phase: Phase::Serving,
                };
                log::debug!("{child}: spawned");
                self.table.insert(child);
                *self.per_ip.entry(peer.ip()).or_insert(0) += 1;
            }
            Ok(Fork::Child) => {
                // FORK (connection child):
                // - child closes: every listener (close-after-fork: a child
                //   that held them would keep the ports open after the
                //   master closed them at a reload or stop, and could accept
                //   connections it must not serve), the master's signal
                //   pipe, the pid-file lock, the workers' doorbell. It keeps
                //   only its connection.
                // - parent closes: the connection (above).
                // - copy-on-write shares: the config snapshot, read-only;
                //   the master's tables, never read here.
                // - child resets: PR_SET_PDEATHSIG with a getppid() check,
                //   signal dispositions (see conn::serve), its log role.
                self.become_child(format!("conn gen {}", self.generation), "echod-conn");
                self.listeners.clear();
                self.board.close_doorbell();
                let code = crate::conn::serve(stream, peer, &self.config);
                std::process::exit(code);
            }
        }
    }

    /// The part of every child's start that concerns the master's own
    /// resources.
    fn become_child(&mut self, role: String, comm: &str) {
        // Privileges first: the credential change clears PR_SET_PDEATHSIG,
        // which after_fork_in_child then sets.
        if let Some(c) = &self.credentials {
            if let Err(e) = c.apply() {
                log::error!(
                    "cannot switch to user {} / gid {}: {e}",
                    c.user.as_deref().unwrap_or("(unchanged)"),
                    c.gid
                );
                std::process::exit(exit_code::FATAL);
            }
        }
        process::after_fork_in_child(self.pid);
        // Dropping the pipe unregisters the master's handlers.
        self.signals = None;
        if let Some(p) = self.pidfile.take() {
            p.close_in_child();
        }
        // Only the master may notify systemd (NotifyAccess=main) or the
        // daemon launcher.
        self.notifier = Notifier::default();
        self.readiness.close_in_child();
        crate::logging::set_role(role);
        set_comm(comm);
    }

    /// Reaps every exited child, logs why it ended, and arranges what
    /// follows: a respawn (with backoff if it died young) or nothing.
    fn reap_children(&mut self) {
        for (pid, exit) in process::reap() {
            let Some(child) = self.table.remove(pid) else {
                log::warn!("reaped unknown child pid {pid}: {exit}");
                continue;
            };
            if let Some(s) = child.slot() {
                self.board.release(s);
            }
            if let Role::Conn { peer } = child.role {
                if let Some(n) = self.per_ip.get_mut(&peer.ip()) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_ip.remove(&peer.ip());
                    }
                }
            }
            self.log_exit(&child, exit);
        }
    }

    fn log_exit(&mut self, child: &Child, exit: Exit) {
        let lived = child.spawned.elapsed();
        // A worker killed for a missed heartbeat is a failure to report and
        // replace; one that drained, or was killed at its drain deadline or
        // by a stop, ended as told.
        let expected = !matches!(
            child.phase,
            Phase::Serving | Phase::Recycling | Phase::Killed(Kill::Heartbeat)
        ) || self.state != State::Running;
        if !child.is_worker() {
            match (exit.is_clean(), expected) {
                (true, _) => log::debug!("{child}: {exit}"),
                (false, true) => log::info!("{child}: {exit}"),
                (false, false) => log::warn!("{child}: {exit}"),
            }
            return;
        }
        if exit == Exit::Code(exit_code::FATAL) {
            log::error!("{child}: cannot start ({exit}); stopping echod");
            self.exit_code = exit_code::FAILURE;
            if self.state == State::Running {
                self.begin_stop(true);
            }
            return;
        }
        if expected {
            let why = match child.phase {
                Phase::Killed(kill) => kill.describe(),
                _ => " after draining",
            };
            log::info!("{child}: {exit}{why}");
            return;
        }
        let respawn = child.generation == self.generation;
        let why = match child.phase {
            Phase::Killed(kill) => kill.describe(),
            _ => "",
        };
        match self.backoff.record_failure(lived, Instant::now()) {
            Some(delay) if respawn => log::warn!(
                "{child}: {exit}{why} {:.1?} after start; respawning in {delay:?} (crash-loop guard)",
                lived
            ),
            _ if respawn => log::warn!("{child}: {exit}{why}; respawning"),
            _ => log::warn!("{child}: {exit}{why}"),
        }
    }

    /// Kills workers whose heartbeat is older than `worker_timeout`, and
    /// retiring children past their drain deadline.
    fn murder_workers(&mut self) {
        for pid in self.table.overdue(Instant::now()) {
            if let Some(c) = self.table.get_mut(pid) {
                log::warn!("{c}: still running at its drain deadline; killing it");
            }
            signals::send(pid, Signal::SIGKILL);
        }
        let timeout = self.config.worker_timeout.as_millis() as u64;
        if timeout == 0 {
            return;
        }
        let now = now_ms();
        let mut late = Vec::new();
        for c in self.table.iter() {
            let Some(slot) = c.slot() else { continue };
            if matches!(c.phase, Phase::Killed(_)) {
                continue;
            }
            let beat = self.board.heartbeat(slot);
            let silent = if beat == 0 {
                c.spawned.elapsed().as_millis() as u64
            } else {
                now.saturating_sub(beat)
            };
            if silent > timeout {
                late.push((c.pid, silent));
            }
        }
        for (pid, silent) in late {
            if let Some(c) = self.table.get_mut(pid) {
                log::warn!(
                    "{c}: no heartbeat for {silent} ms (worker_timeout {timeout} ms); killing it"
                );
                c.phase = Phase::Killed(Kill::Heartbeat);
            }
            signals::send(pid, Signal::SIGKILL);
        }
    }

    /// `max_requests_per_worker`: one worker at a time is recycled. The one
    /// that asks is taken out of the pool (still accepting) so that
    /// `manage_workers` forks its replacement; once every worker of the pool
    /// is up, the old one is told to drain.
    fn recycle_workers(&mut self) {
        if self.state != State::Running || self.config.max_requests_per_worker == 0 {
            return;
        }
        let gen = self.generation;
        let retiring_now = self.table.iter().any(|c| {
            c.is_worker()
                && c.generation == gen
                && matches!(c.phase, Phase::Recycling | Phase::Retiring { .. })
        });
        let recycling = self
            .table
            .iter()
            .find(|c| c.phase == Phase::Recycling)
            .map(|c| c.pid);
        if let Some(old) = recycling {
            if self.pool_up() {
                let deadline = Instant::now() + self.config.shutdown_timeout;
                if let Some(c) = self.table.get_mut(old) {
                    log::info!("{c}: recycled; its replacement is up, draining it");
                }
                self.table.retire(old, deadline);
                signals::send(old, Signal::SIGTERM);
            }
            return;
        }
        if retiring_now {
            return;
        }
        let asking = self
            .table
            .pool(gen)
            .find(|c| c.slot().is_some_and(|s| self.board.wants_retire(s)))
            .map(|c| c.pid);
        if let Some(pid) = asking {
            if let Some(c) = self.table.get_mut(pid) {
                log::info!(
                    "{c}: served max_requests_per_worker ({}); forking its replacement",
                    self.config.max_requests_per_worker
                );
                c.phase = Phase::Recycling;
            }
            self.manage_workers();
        }
    }

    /// Whether the current generation is serving: every wanted worker is
    /// forked and has beaten once (it is in its epoll loop).
    fn pool_up(&self) -> bool {
        if self.config.mode == Mode::Fork {
            return true;
        }
        self.table.pool(self.generation).count() >= self.wanted
            && self
                .table
                .pool(self.generation)
                .all(|c| c.slot().is_none_or(|s| self.board.heartbeat(s) != 0))
    }

    /// Sends `READY=1` (and answers the daemon launcher) once the pool is
    /// up, and keeps `STATUS=` current.
    fn report_status(&mut self) {
        if self.state != State::Running {
            return;
        }
        if self.awaiting_ready && self.pool_up() {
            self.awaiting_ready = false;
            let status = self.status_line();
            log::info!("ready: {status}");
            self.notifier.ready(&status);
            self.readiness.ready();
        } else if self.notifier.enabled() {
            let status = self.status_line();
            self.notifier.status(&status);
        }
    }

    /// `generation 3: 4 workers, 12 connections`.
    fn status_line(&self) -> String {
        match self.config.mode {
            Mode::Prefork => {
                let workers = self.table.pool(self.generation).count();
                let conns: u64 = self
                    .table
                    .iter()
                    .filter_map(Child::slot)
                    .map(|s| u64::from(self.board.open(s)))
                    .sum();
                format!(
                    "generation {}: {workers} workers, {conns} connections",
                    self.generation
                )
            }
            Mode::Fork => format!(
                "generation {}: fork mode, {} connections",
                self.generation,
                self.table.connection_children()
            ),
        }
    }

    /// `Some(exit code)` once stopping and every child is reaped; removes
    /// the pid file.
    fn finished(&mut self) -> Option<i32> {
        if matches!(self.state, State::Stopping { .. }) && self.table.is_empty() {
            // A killed io_uring worker's accept requests can keep its
            // listening sockets open after it is reaped, and an immediate
            // restart would then fail with "Address already in use".
            for l in std::mem::take(&mut self.unlisten_at_exit) {
                if let Err(e) = l.stop_listening() {
                    log::debug!("shutdown {}: {e}", l.local);
                }
            }
            self.pidfile.take();
            log::info!("master (pid {}) exiting", self.pid);
            return Some(self.exit_code);
        }
        None
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Prefork => "prefork",
        Mode::Fork => "fork",
    }
}

/// Sets the process name shown by `ps -o comm`, `top` and
/// `/proc/PID/comm` (at most 15 bytes).
pub fn set_comm(name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
        // bytes (the kernel truncates longer ones); `c` lives for the call.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0);
        }
    }
}
