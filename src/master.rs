//! The master: the supervisor loop and one handler per signal.
//!
//! Runs in: the master process, for its whole life. It never reads or
//! writes a client byte: in prefork mode the workers accept; in fork mode
//! the master accepts and hands each connection to a new child at once.
//!
//! Owns: the listeners (the reference copies every generation inherits),
//! the signal pipe, the bell workers ring ([`crate::signals::Bell`]), the
//! scoreboard mapping and the pid file. Signals: the
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
use crate::signals::{self, Action, Bell, SignalPipe, MASTER_SIGNALS};
use crate::worker::RefusalLog;
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
/// Accept pause in fork mode after `EMFILE`/`ENFILE`, another failed
/// `accept`, or a failed fork.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Fork mode: at most this many connections are accepted from one
/// listener per wake-up. The listeners are polled level-triggered, so what
/// is left in a queue wakes the next poll at once; in between, the master
/// looks at its signals and reaps, and a busy listener cannot starve the
/// others.
const ACCEPT_BATCH: usize = 64;

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The signal handlers could not be installed.
    #[error("signal handlers: {0}")]
    Signals(std::io::Error),
    /// The bell workers ring could not be made.
    #[error("bell eventfd: {0}")]
    Bell(std::io::Error),
    /// The shared scoreboard could not be mapped.
    #[error("scoreboard mmap: {0}")]
    Scoreboard(nix::Error),
}

/// Fork mode: an accepted connection whose fork failed.
///
/// A failed fork (`EAGAIN` at a process limit, `ENOMEM`) is usually short
/// lived, and the client has done nothing wrong: the master keeps the
/// connection and forks for it again after [`ACCEPT_PAUSE`], accepting
/// nothing meanwhile (the next clients wait in the listen backlog, as at
/// `max_connections`). It is closed only when the master stops, or when a
/// reload switches to prefork mode.
struct Held {
    stream: TcpStream,
    peer: SocketAddr,
    /// How many forks failed for it so far (at least 1).
    failures: u32,
}

/// The supervisor.
pub struct Master {
    /// The config in force (the current generation's).
    config: Config,
    /// The file the start read (absolute), re-read at every reload; `None`
    /// when the start found no file and ran on the built-in defaults (a
    /// reload then reads the default path, if it has appeared).
    config_path: Option<PathBuf>,
    /// The current generation's listeners, in `config.listen` order.
    listeners: Vec<Listener>,
    /// The self-pipe; `None` only in a child, which dropped it after fork.
    signals: Option<SignalPipe>,
    /// The bell a worker rings to ask for recycling: made before the first
    /// fork, polled here, inherited by every worker. `None` only in a
    /// connection child, which closes it after fork.
    bell: Option<Bell>,
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
    /// Fork mode: accepting is paused until then (after `EMFILE`, a failed
    /// fork...). It means something only while it lies ahead and the
    /// master accepts (see [`Master::accept_pause`]): a pause that is over,
    /// or that a stop interrupted, is left here unread. A reload clears it.
    accept_paused_until: Option<Instant>,
    /// Fork mode: when (`now_ms()`) an accept error that pauses accepting
    /// was last logged, and how many such pauses went unlogged since: a listener
    /// that keeps failing pauses every 100 ms, but is logged at most once
    /// a second.
    accept_pause_logged: u64,
    unlogged_accept_pauses: u32,
    /// Fork mode: the connection whose child could not be forked, tried
    /// again when the accept pause is over (see [`Held`]). Invariant:
    /// `Some` only while running in fork mode; nothing else is accepted
    /// meanwhile, and no child inherits it.
    held: Option<Held>,
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
    /// Fork mode: the rate limit of the refusal lines (each address once a
    /// second, a bounded number of addresses a second).
    refusals: RefusalLog,
    /// A fast stop's listeners, kept until every child is reaped and then
    /// shut down (see [`Master::finished`]).
    unlisten_at_exit: Vec<Listener>,
}

/// Everything the launcher prepared for the master.
pub struct Setup {
    /// The validated config.
    pub config: Config,
    /// The file the start read (absolute), re-read at every reload; `None`
    /// for the built-in defaults.
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
            mut readiness,
            credentials,
            daemonized,
            pidfile,
        } = setup;
        let sigs: Vec<i32> = MASTER_SIGNALS.iter().map(|s| s.signal).collect();
        let resources = || -> Result<_, MasterError> {
            let signals = SignalPipe::new(&sigs).map_err(MasterError::Signals)?;
            let bell = Bell::new().map_err(MasterError::Bell)?;
            let board = Scoreboard::new(&config).map_err(MasterError::Scoreboard)?;
            Ok((signals, bell, board))
        };
        let (signals, bell, board) = match resources() {
            Ok(r) => r,
            Err(e) => {
                // A waiting `--daemon` launcher prints this and exits 1.
                readiness.failed(1, &e.to_string());
                return Err(e);
            }
        };
        let pid = nix::unistd::getpid();
        Ok(Master {
            wanted: config.workers,
            config,
            config_path,
            listeners,
            signals: Some(signals),
            bell: Some(bell),
            board,
            table: WorkerTable::default(),
            generation: 1,
            state: State::Running,
            backoff: Backoff::default(),
            pid,
            pidfile,
            accept_paused_until: None,
            held: None,
            accept_pause_logged: 0,
            unlogged_accept_pauses: 0,
            exit_code: exit_code::OK,
            notifier: Notifier::from_env(),
            readiness,
            awaiting_ready: true,
            credentials,
            activated,
            per_ip: HashMap::new(),
            refusals: RefusalLog::default(),
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
            for sig in signals::in_handling_order(pending) {
                self.handle_signal(sig);
            }
            // Asked again after the signals: a stop, or a reload to prefork
            // mode, handled just now must stop the accepting that `wait`
            // decided on (a listener and the signal pipe ready in the same
            // poll), or a connection child would be forked while stopping,
            // or under a prefork config.
            if accept && self.fork_accepting(Instant::now()) {
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
    /// to accept: a listener is readable, or a held connection is due.
    fn wait(&mut self) -> bool {
        let now = Instant::now();
        let accepting = self.fork_accepting(now);
        // A held connection is forked for again as soon as accepting
        // resumes: the poll only looks at the signals then.
        let retry = accepting && self.held.is_some();
        let mut until = now + self.tick();
        if let Some(t) = self.table.next_deadline() {
            until = until.min(t);
        }
        if let Some(t) = self.backoff.not_before() {
            if t > now {
                until = until.min(t);
            }
        }
        if let Some(t) = self.accept_pause(now) {
            until = until.min(t);
        }
        let timeout = if retry {
            Duration::ZERO
        } else {
            until.saturating_duration_since(now)
        };
        let Some(signals) = self.signals.as_ref() else {
            return false;
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if let Some(bell) = &self.bell {
            fds.push(PollFd::new(bell.as_fd(), PollFlags::POLLIN));
        }
        let first_listener = fds.len();
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
                let rung = first_listener > 1 && fds[1].revents().is_some_and(|r| !r.is_empty());
                let readable = fds[first_listener..]
                    .iter()
                    .any(|f| f.revents().is_some_and(|r| !r.is_empty()));
                if rung {
                    // recycle_workers runs every turn of the loop: the
                    // bell only woke it.
                    if let Some(bell) = &self.bell {
                        bell.clear();
                    }
                }
                retry || accepting && readable
            }
            Err(nix::errno::Errno::EINTR) => retry,
            Err(e) => {
                log::error!("poll: {e}");
                retry
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
    fn fork_accepting(&self, now: Instant) -> bool {
        self.config.mode == Mode::Fork
            && self.state == State::Running
            && self.accept_pause(now).is_none()
            && self.room_for_a_connection()
    }

    /// Fork mode: when the accept pause in force ends; `None` if accepting
    /// is not paused. A pause that is over, or any pause once the master
    /// accepts nothing (stopping, prefork mode), is none: as a poll
    /// deadline, a past instant would make every poll return at once (a
    /// master spinning at 100% CPU through a whole drain), and a pause
    /// that a stop interrupted would wake it for nothing.
    fn accept_pause(&self, now: Instant) -> Option<Instant> {
        let master_accepts = self.config.mode == Mode::Fork && self.state == State::Running;
        self.accept_paused_until
            .filter(|&t| master_accepts && t > now)
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
        let detached = self.daemonized;
        let current = &self.credentials;
        let (mut new, _, credentials) = Config::load_with(self.config_path.as_deref(), |c| {
            let credentials = crate::process::check_system(c, detached)?;
            // New credentials are tried before anything is committed: a
            // generation that cannot switch to them would stop echod (see
            // `Credentials::try_switch`). Unchanged ones work: the running
            // generation switched to them.
            if credentials != *current {
                if let Some(c) = &credentials {
                    c.try_switch()?;
                }
            }
            Ok(credentials)
        })
        .map_err(|e| e.to_string())?;
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
        // A new generation starts accepting afresh, without the old one's
        // pause (a reload to prefork mode accepts nothing in the master).
        // A held connection is tried again at once in fork mode; in prefork
        // mode the master has no way to hand it over, and it would be
        // inherited by every worker forked next.
        self.accept_paused_until = None;
        if self.config.mode != Mode::Fork {
            self.drop_held("the new config is prefork mode");
        }
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
        // Nothing is accepted any more; a held connection goes as the
        // queued ones do.
        self.drop_held("the master stops");
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
        match crate::logging::reopen(self.credentials.as_ref()) {
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

    /// Forks prefork worker `id` of the current generation. Spawns nothing
    /// while the scoreboard is full: a worker without a slot could be
    /// neither supervised nor recycled, so the master logs it and backs off
    /// as after a failed fork.
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
                        slot,
                        timeout: self.config.worker_timeout,
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
                //   pid-file lock, a client connection held for a fork retry
                //   (never there in prefork mode: see `held`). It keeps the
                //   listeners (accepting on them is its job), the doorbell
                //   of accept balancing, an eventfd that, like the
                //   listeners, every worker shares, and the master's bell,
                //   an eventfd it rings to ask for recycling (a signal would
                //   need the master's uid: see signals::Bell).
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
                    bell: self.bell.as_ref().map(AsFd::as_fd),
                };
                let code = crate::worker::run(listeners, &self.config, seat);
                std::process::exit(code);
            }
        }
    }

    /// Fork mode: forks for the held connection, if any; then accepts
    /// until each queue is empty, [`ACCEPT_BATCH`] connections from each
    /// listener, the cap, or an error or failed fork that pauses accepting;
    /// forks one child per connection.
    fn accept_connections(&mut self) {
        if !self.room_for_a_connection() {
            // At the cap with overload = "wait": a held connection waits
            // until a child exits, as the queued ones do.
            return;
        }
        if let Some(Held {
            stream,
            peer,
            failures,
        }) = self.held.take()
        {
            if !self.dispatch(stream, peer, failures) {
                return;
            }
        }
        for i in 0..self.listeners.len() {
            for _ in 0..ACCEPT_BATCH {
                if !self.room_for_a_connection() {
                    // Clients wait in the backlog until a child exits.
                    return;
                }
                match self.listeners[i].accept() {
                    Ok((stream, peer)) => {
                        if !self.dispatch(stream, peer, 0) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // That one connection is gone (reset before it was
                    // accepted, or a network error accept(2) passes on for
                    // it): the queue may hold more.
                    Err(e) if crate::listener::accept_error_consumes_a_connection(&e) => {
                        log::debug!("accept: {e}")
                    }
                    // Out of descriptors (EMFILE, ENFILE) or kernel memory
                    // (ENOBUFS, ENOMEM), or anything unexpected: the next
                    // accept would fail the same way, and the level-triggered
                    // poll would report the listener readable at once.
                    Err(e) => {
                        if crate::worker::once_a_second(&mut self.accept_pause_logged, now_ms()) {
                            let unlogged = std::mem::take(&mut self.unlogged_accept_pauses);
                            let more = if unlogged > 0 {
                                format!(
                                    " ({unlogged} more pauses not logged since the last such line)"
                                )
                            } else {
                                String::new()
                            };
                            log::warn!(
                                "accept on {}: {e}; pausing accepts for {ACCEPT_PAUSE:?}{more}",
                                self.listeners[i].local
                            );
                        } else {
                            self.unlogged_accept_pauses += 1;
                        }
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        return;
                    }
                }
            }
        }
    }

    /// Fork mode: whether a connection may be taken now (accepted, or the
    /// held one forked for): below `max_connections`, or at it with
    /// `overload = "reject"`, which takes a connection to close it.
    fn room_for_a_connection(&self) -> bool {
        self.config.overload == Overload::Reject
            || self.table.connection_children() < self.config.max_connections
    }

    /// Fork mode: one connection, just accepted (`failures` 0) or held
    /// after `failures` failed forks, is refused at a cap or given a child.
    /// Returns whether to go on accepting: not after a failed fork, which
    /// holds the connection.
    fn dispatch(&mut self, stream: TcpStream, peer: SocketAddr, failures: u32) -> bool {
        if self.table.connection_children() >= self.config.max_connections {
            // overload = "reject" (see `room_for_a_connection`); for a held
            // connection, a reload lowered max_connections meanwhile.
            drop(stream);
            self.log_refusal(peer, "max_connections reached (overload = \"reject\")");
            return true;
        }
        // The per-address cap is checked at accept: a held connection
        // passed it then.
        let cap = self.config.max_connections_per_ip;
        let count = self.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        if failures == 0 && cap > 0 && count >= cap {
            drop(stream);
            self.log_refusal(peer, "max_connections_per_ip reached");
            return true;
        }
        self.fork_connection(stream, peer, failures);
        // A failed fork: nothing more is accepted until the held
        // connection has its child.
        self.held.is_none()
    }

    /// Closes the held connection, if any, saying why.
    fn drop_held(&mut self, why: &str) {
        if let Some(h) = self.held.take() {
            log::warn!(
                "closing the connection from {}, which waited for a child after {} failed forks: {why}",
                h.peer,
                h.failures
            );
        }
    }

    /// Logs a refused connection at most once a second per address.
    fn log_refusal(&mut self, peer: SocketAddr, why: &str) {
        match self.refusals.note(peer.ip(), now_ms()) {
            Some(0) => log::warn!("{why}: refusing {peer}"),
            Some(unlogged) => log::warn!(
                "{why}: refusing {peer} ({unlogged} more refusals not logged since the last such line)"
            ),
            None => {}
        }
    }

    /// Fork mode: one child for one connection. `failures`: how many forks
    /// already failed for it. On failure the connection is held (see
    /// [`Held`]) and accepting pauses.
    fn fork_connection(&mut self, stream: TcpStream, peer: SocketAddr, failures: u32) {
        match process::fork() {
            Err(e) => {
                let failures = failures + 1;
                if failures == 1 {
                    log::error!(
                        "fork: {e}; holding the connection from {peer} to try again in {ACCEPT_PAUSE:?}, accepting none meanwhile"
                    );
                } else if failures % 10 == 0 {
                    log::warn!(
                        "fork: {e}; the connection from {peer} still waits for a child ({failures} tries)"
                    );
                } else {
                    log::debug!("fork: {e}; the connection from {peer} waits ({failures} tries)");
                }
                self.held = Some(Held {
                    stream,
                    peer,
                    failures,
                });
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            }
            Ok(Fork::Parent(pid)) => {
                // FORK (parent side): the connection belongs to the child
                // now; the master closes its descriptor at once, so no later
                // child inherits it. The only client connection the master
                // ever holds longer is one whose fork failed (`held`), and
                // it forks nothing else meanwhile.
                drop(stream);
                let child = Child {
                    pid,
                    role: Role::Conn { peer },
                    generation: self.generation,
                    spawned: Instant::now(),
                    phase: Phase::Serving,
                };
                if failures > 0 {
                    log::info!("{child}: spawned after {failures} failed forks");
                } else {
                    log::debug!("{child}: spawned");
                }
                self.table.insert(child);
                *self.per_ip.entry(peer.ip()).or_insert(0) += 1;
            }
            Ok(Fork::Child) => {
                // FORK (connection child):
                // - child closes: every listener (close-after-fork: a child
                //   that held them would keep the ports open after the
                //   master closed them at a reload or stop, and could accept
                //   connections it must not serve), the master's signal
                //   pipe, the pid-file lock, the workers' doorbell, the
                //   master's bell, a client connection held for a fork retry
                //   (never another than its own: see `held`). It keeps only
                //   its connection.
                // - parent closes: the connection (above).
                // - copy-on-write shares: the config snapshot, read-only;
                //   the master's tables, never read here.
                // - child resets: PR_SET_PDEATHSIG with a getppid() check,
                //   signal dispositions (see conn::serve), its log role.
                self.become_child(format!("conn gen {}", self.generation), "echod-conn");
                self.listeners.clear();
                self.board.close_doorbell();
                self.bell = None;
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
        // A connection held for a fork retry is never there at a fork (the
        // master forks nothing else while it holds one, and a reload to
        // prefork mode closes it); closing it here keeps that true for any
        // future caller.
        self.held = None;
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
            let message = format!("{child}: cannot start ({exit}); stopping echod");
            log::error!("{message}");
            // A `--daemon` launcher still waiting for "ready" prints this
            // and exits 1 (after "ready", the report is spent: no-op).
            self.readiness.failed(exit_code::FAILURE as u8, &message);
            self.exit_code = exit_code::FAILURE;
            if self.state == State::Running {
                self.begin_stop(true);
            }
            return;
        }
        if expected {
            // Told to go: a kill the master sent, or a drain. A drain ends
            // in exit(0); anything else (a crash while draining, a kill from
            // outside) is a failure to report, not the drain's end. No
            // respawn either way: the worker was leaving.
            match child.phase {
                Phase::Killed(kill) => log::info!("{child}: {exit}{}", kill.describe()),
                _ if exit.is_clean() => log::info!("{child}: {exit} after draining"),
                _ => log::warn!("{child}: {exit} while draining"),
            }
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

    /// Kills workers whose heartbeat is older than their `worker_timeout`,
    /// and retiring children past their drain deadline.
    ///
    /// Each worker is judged by the `worker_timeout` it was forked with (see
    /// [`Role::Worker`]): its heartbeat period is a third of that timeout at
    /// most, frozen at fork, so a reload that shortens `worker_timeout` must
    /// not hold an old-generation worker, still draining at its old period,
    /// to the new one.
    fn murder_workers(&mut self) {
        for pid in self.table.overdue(Instant::now()) {
            if let Some(c) = self.table.get_mut(pid) {
                log::warn!("{c}: still running at its drain deadline; killing it");
            }
            signals::send(pid, Signal::SIGKILL);
        }
        let now = now_ms();
        let mut late = Vec::new();
        for c in self.table.iter() {
            let (Some(slot), Some(timeout)) = (c.slot(), c.heartbeat_timeout()) else {
                continue;
            };
            if matches!(c.phase, Phase::Killed(_)) {
                continue;
            }
            let timeout = timeout.as_millis() as u64;
            let beat = self.board.heartbeat(slot);
            let silent = if beat == 0 {
                c.spawned.elapsed().as_millis() as u64
            } else {
                now.saturating_sub(beat)
            };
            if silent > timeout {
                late.push((c.pid, silent, timeout));
            }
        }
        for (pid, silent, timeout) in late {
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
    /// forked and has beaten once (it is in its epoll loop). Every worker
    /// has a scoreboard slot (see [`Master::spawn_worker`]).
    fn pool_up(&self) -> bool {
        if self.config.mode == Mode::Fork {
            return true;
        }
        self.table.pool(self.generation).count() >= self.wanted
            && self
                .table
                .pool(self.generation)
                .all(|c| c.slot().is_some_and(|s| self.board.heartbeat(s) != 0))
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
