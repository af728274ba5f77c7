//! The prefork worker: one epoll loop over the inherited listeners, a
//! signal pipe, and every connection the worker accepted.
//!
//! Runs in: each prefork worker (and, with `--single-process`, in the
//! foreground process itself, for gdb and strace).
//!
//! Owns: its epoll instance, its signal pipe, its splice pipe (with
//! `splice = true`), its connections, and its copies of the listeners,
//! which it closes when it drains. It also holds the master's bell
//! ([`crate::signals::Bell`]), which it only rings. Signals: `SIGTERM` =
//! stop accepting and drain; `SIGINT`/`SIGQUIT` = close everything and
//! exit now.
//!
//! ## Level-triggered, on purpose
//! Every descriptor is registered level-triggered. Echo is read-then-write:
//! one `read` of up to `buffer_size` bytes and one `write` per wake-up. With
//! edge triggering a connection would have to be read until `EAGAIN` (one
//! extra, empty `read` per message, or a lost wake-up), and a worker that
//! stops reading on backpressure would have to remember to come back.
//! Level triggering reports again whatever is left, so the loop can stop
//! early (a cap on accepts, a full client) and lose nothing.
//!
//! ## The thundering herd
//! All workers share each listening socket (inherited, not `SO_REUSEPORT`)
//! and register it with `EPOLLEXCLUSIVE`: the kernel wakes one waiting
//! worker per new connection instead of all of them. The wake-up walks the
//! listener's wait queue and stops at the first worker blocked in
//! `epoll_wait`; every worker it passes on the way (busy elsewhere) gets
//! the listener put on its ready list all the same (`ep_poll_callback`
//! queues the item before it looks for a waiter), and finds it readable at
//! its next `epoll_wait`. So a busy worker can still take a connection an
//! idle one was woken for; the woken one then finds `EAGAIN`, and
//! `balance` (below) evens out the counts. `SO_REUSEPORT` would spread
//! connections by hash, but each worker would need its own socket, and
//! closing one (a reload, a recycled worker) resets the connections waiting
//! in its queue: a shared queue loses nothing when a worker goes away, which
//! is what a reload with zero dropped connections needs. Measured
//! (docs/BENCHMARKS.md): the same CPU per message and per connection as
//! `SO_REUSEPORT` and as the plain herd; the price is placement, which
//! `balance` pays back (below).
//!
//! ## Balancing accepts (`balance`, on by default)
//! Left alone, the kernel places long-lived connections badly: it wakes
//! the first idle worker in the listener's wait queue, the same one every
//! time, and the woken worker accepts the whole burst. Four streams land on
//! one worker (one CPU) in most tries, and 50 ping-pong connections split
//! 50/0 or 46/4, where the worker with a handful sleeps and wakes for
//! nearly every message (docs/BENCHMARKS.md). So each worker publishes its
//! open connections in the scoreboard at every accept and close, and after
//! each accept compares itself with the other workers that take
//! connections: when it holds more than `f + 1 + f / 8`, `f` being the
//! fewest any of them holds, it **passes**: it takes its listeners out of
//! epoll, so that new connections wake the others. It comes back as soon as
//! it is no longer ahead (one of its connections closes, or the doorbell
//! below rings and the others have caught up), or after [`PASS_MS`] at the
//! latest, and then takes whatever is queued, ahead or not: a worker that
//! stopped or hangs delays a connection by a few milliseconds at most, and
//! is not counted at all once its heartbeat is two ticks old. The
//! connection that shows a worker is ahead is still served by it:
//! balancing never adds a hop.
//!
//! Nothing needs telling the others of the connections already queued:
//! the wake-up that brought this worker removed it from epoll's wait queue,
//! so every later connection's wake-up went to another waiting worker (or,
//! if all were busy, onto their ready lists). What needs telling is the
//! case where every other worker is passing too (each was ahead when it
//! last accepted, and connections have closed since): then nobody would
//! hear of the next connection until a pass ends, so the worker rings the
//! scoreboard's **doorbell**, an `eventfd` every worker waits on
//! (edge-triggered, never read), and the passing workers that are no
//! longer ahead come back. A listening worker that hears it looks at the
//! queues. Ringing only then matters with many workers: a ring wakes every
//! idle worker. A worker that stops listening altogether (full, out of
//! descriptors, draining) rings in the same case, when the others all
//! pass: it may have been the last one listening.
//!
//! The margin keeps churn (many short connections, counts moving by one
//! all the time) from passing back and forth: measured, connections per
//! second are the same with and without. Spreading has a price where
//! workers outnumber free CPUs: one worker serving everything batches
//! more per wake-up (docs/BENCHMARKS.md, "Balancing accepts"). Workers
//! that are full, out of descriptors or draining are not candidates;
//! during a reload the old generation, which still holds its connections,
//! leaves new ones to the new generation until it drains.
//!
//! ## Large messages through a pipe (`splice`, on by default)
//! A connection whose last message was 4 KiB or more has its next one
//! echoed with two `splice(2)` calls through the worker's one pipe
//! ([`crate::splice::Pipe`]), so the bytes never enter the scratch buffer;
//! the state machine decides ([`crate::echo`]), and [`Worker::drive`]
//! empties the pipe after any call that left bytes in it (a connection
//! that failed half-way), so that no connection sends another's bytes.
//!
//! ## Busy polling (`busy_poll`, off by default)
//! A worker that sleeps in `epoll_wait` between two messages of a
//! connection pays for the sleep twice: the kernel's wake-up (a context
//! switch, often an inter-processor interrupt, and the idle CPU's way back
//! from its idle state, which on a virtual machine is an exit to the
//! hypervisor) lengthens the round trip, and its CPU time is charged to the
//! worker. With `busy_poll` set, a loop turn that brought events is
//! followed by waits that do not sleep (`epoll_wait` with a zero timeout),
//! until `busy_poll` passes without an event; then the worker sleeps as
//! usual. It is the user-space form of the kernel's `net.core.busy_poll`
//! (which needs a device with NAPI and does nothing on loopback or most
//! virtual NICs), and like it trades a CPU for latency: a worker whose
//! connections keep sending with gaps shorter than the window runs all the
//! time; an idle one costs nothing. See [`BusyPoll`].

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::acked::Activity;
use crate::config::{Config, Overload};
use crate::echo::{Close, Echo, Next};
use crate::listener::{accept_error_consumes_a_connection, Listener};
use crate::process::exit_code;
use crate::sched::Preemption;
use crate::scoreboard::{now_ms, IpKey, Others, Scoreboard, Taking};
use crate::signals::{SignalPipe, WORKER_SIGNALS};
use crate::splice::Pipe;

/// epoll token of the signal pipe.
const TOKEN_SIGNALS: u64 = 0;
/// epoll token of listener `i` is `TOKEN_LISTENER + i`.
const TOKEN_LISTENER: u64 = 1;
/// epoll token of connection slot `i` is `TOKEN_CONN + i`.
const TOKEN_CONN: u64 = 1 << 32;
/// epoll token of the scoreboard's doorbell (between the listeners and the
/// connections).
const TOKEN_DOORBELL: u64 = TOKEN_CONN - 1;
/// How long accepting pauses after `EMFILE`/`ENFILE`, or any `accept`
/// error that leaves the connection queued (see
/// [`accept_error_consumes_a_connection`]), so that a listener that stays
/// readable does not spin the CPU (nginx pauses for 500 ms).
const ACCEPT_PAUSE_MS: u64 = 100;
/// The most connections [`Worker::accept_from`] takes from one listener in
/// one call. A flood (at worst `overload = "reject"` at `max_connections`:
/// accept and close, over and over) must not keep the worker from
/// `epoll_wait`, and so from its connections, its heartbeat and its
/// signals; the listener is level-triggered, so what is left is reported
/// again at the next turn. The io_uring worker accepts one connection per
/// request and caps its rescue accepts alike.
const ACCEPTS_PER_CALL: usize = 64;
/// Longest sleep in `epoll_wait`: the heartbeat and idle-scan period
/// (shorter when `worker_timeout` is short: see [`Worker::tick_ms`]).
const TICK_MS: u64 = 1000;

/// One client connection.
///
/// Invariant: `waiting` is what the connection is registered for in epoll
/// (`Read` → `EPOLLIN`, `Write` → `EPOLLOUT`).
struct Conn {
    stream: TcpStream,
    echo: Echo,
    waiting: Next,
    /// `now_ms()` of the last byte moved in either direction, counting
    /// the bytes the client took from the socket while its echo waits for
    /// room, seen at the idle scans (see [`crate::acked`]).
    activity: Activity<u64>,
    /// Where this connection is counted for `max_connections_per_ip`.
    ip: IpKey,
}

/// A worker's place in the scoreboard.
#[derive(Clone, Copy)]
pub struct Seat<'a> {
    /// The shared table.
    pub board: &'a Scoreboard,
    /// This worker's slot in it.
    pub slot: usize,
    /// The master's bell, rung when recycling is due (`None` with
    /// `--single-process`, where there is no master and no recycling).
    pub bell: Option<std::os::fd::BorrowedFd<'a>>,
}

/// The socket as the echo state machine sees it, with the worker's pipe
/// where there is one.
struct SocketIo<'a> {
    stream: &'a TcpStream,
    pipe: Option<&'a mut Pipe>,
}

impl crate::echo::Io for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.stream, buf)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut self.stream, buf)
    }
    fn can_splice(&self) -> bool {
        self.pipe.as_ref().is_some_and(|p| p.usable())
    }
    fn splice_in(&mut self, len: usize) -> io::Result<usize> {
        let stream = self.stream;
        self.pipe()?.fill_from(stream, len)
    }
    fn splice_out(&mut self, len: usize) -> io::Result<usize> {
        let stream = self.stream;
        self.pipe()?.drain_to(stream, len)
    }
    fn read_pipe(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.pipe()?.read(buf)
    }
}

impl SocketIo<'_> {
    /// The worker's pipe (`Unsupported` without one, as the trait's
    /// defaults answer).
    fn pipe(&mut self) -> io::Result<&mut Pipe> {
        self.pipe
            .as_deref_mut()
            .ok_or_else(|| io::ErrorKind::Unsupported.into())
    }
}

/// Whether a line logged at most once a second may go out at `now` (ms):
/// at least a second after the last, which `last` records when it may.
pub(crate) fn once_a_second(last: &mut u64, now: u64) -> bool {
    if *last != 0 && now.saturating_sub(*last) < 1000 {
        return false;
    }
    *last = now;
    true
}

/// The admission rules both worker loops (epoll here, io_uring in
/// [`crate::uring`]) apply to an accepted connection, with their
/// rate-limited log lines: `overload = "reject"`, `max_connections_per_ip`
/// (counted across every worker in the scoreboard), and the served count
/// behind recycling.
pub(crate) struct Gate<'a> {
    config: &'a Config,
    seat: Seat<'a>,
    /// The rate limit of the `max_connections_per_ip` refusal lines.
    refusals: RefusalLog,
    last_overload_log: u64,
    last_starved_log: u64,
    last_table_full_log: u64,
}

impl<'a> Gate<'a> {
    pub(crate) fn new(config: &'a Config, seat: Seat<'a>) -> Gate<'a> {
        Gate {
            config,
            seat,
            refusals: RefusalLog::default(),
            last_overload_log: 0,
            last_starved_log: 0,
            last_table_full_log: 0,
        }
    }

    /// `accept` failed and the connection, if any, is still queued
    /// (`EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`, `EINVAL` on a socket that
    /// no longer listens...): logs it (at most once a second) and returns
    /// the pause the worker takes before accepting again, so that a
    /// listener that stays readable does not spin it.
    pub(crate) fn accept_failed(&mut self, e: &io::Error, now: u64, open: usize) -> Accepting {
        self.pause_after("accept", e, now, open)
    }

    /// `what` failed in a way that a pause may cure (descriptors or memory
    /// run short): logs it (at most once a second) and returns the pause
    /// the worker takes before accepting again.
    pub(crate) fn pause_after(
        &mut self,
        what: &str,
        e: &io::Error,
        now: u64,
        open: usize,
    ) -> Accepting {
        if once_a_second(&mut self.last_starved_log, now) {
            log::warn!(
                "{what}: {e}; pausing accepts for {ACCEPT_PAUSE_MS} ms ({open} connections open)"
            );
        }
        Accepting::Starved(now + ACCEPT_PAUSE_MS)
    }

    /// `overload = "reject"` at `max_connections`: the connection is
    /// accepted and closed at once, so the client learns right away instead
    /// of waiting in the backlog.
    pub(crate) fn refuse_overload(&mut self, stream: TcpStream, now: u64) {
        if once_a_second(&mut self.last_overload_log, now) {
            log::warn!(
                "max_connections ({}) reached: refusing {} (overload = \"reject\")",
                self.config.max_connections,
                peer_of(&stream)
            );
        }
    }

    /// Applies `max_connections_per_ip` to a connection from `peer` (asked
    /// of the socket if not given). `Some(key)`: admitted and counted under
    /// `key`; `None`: refused (the caller drops it, which closes it) and
    /// logged at most once a second per address.
    pub(crate) fn admit(
        &mut self,
        stream: &TcpStream,
        peer: Option<SocketAddr>,
        now: u64,
    ) -> Option<IpKey> {
        let cap = self.config.max_connections_per_ip;
        if cap == 0 {
            return Some(IpKey::default());
        }
        let peer = match peer.map_or_else(|| stream.peer_addr(), Ok) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("getpeername: {e}");
                return None;
            }
        };
        let board = self.seat.board;
        let key = board.ip_key(peer.ip());
        if board.ip_add(self.seat.slot, key) {
            // Counted first, then checked: of two workers admitting the
            // same address at once, at least one sees the other's count
            // (see Scoreboard::ip_add), so they cannot both let the address
            // past its cap (at worst both refuse).
            if board.ip_total(key) as usize <= cap {
                return Some(key);
            }
            board.ip_sub(self.seat.slot, key);
        } else {
            // This worker's table has no room for another address (the
            // scoreboard was sized at start, and a reload raised
            // max_connections or set max_connections_per_ip since): the
            // cap still holds against what the workers counted, and this
            // connection is not counted.
            if once_a_second(&mut self.last_table_full_log, now) {
                log::warn!(
                    "max_connections_per_ip: this worker counts at most {} distinct addresses \
                     (the scoreboard was sized at start); {peer} is not counted; \
                     restart echod to count more",
                    board.ip_addresses()
                );
            }
            if (board.ip_total(key) as usize) < cap {
                return Some(IpKey::default());
            }
        }
        match self.refusals.note(peer.ip(), now) {
            Some(0) => log::warn!(
                "{} has max_connections_per_ip ({cap}) connections: refusing {peer}",
                peer.ip()
            ),
            Some(unlogged) => log::warn!(
                "{} has max_connections_per_ip ({cap}) connections: refusing {peer} \
                 ({unlogged} more refusals not logged since the last such line)",
                peer.ip()
            ),
            None => {}
        }
        None
    }

    /// Takes a closed connection out of the per-address count (if it was
    /// counted).
    pub(crate) fn release(&self, key: IpKey) {
        if key.is_counted() {
            self.seat.board.ip_sub(self.seat.slot, key);
        }
    }

    /// Counts a served connection; at `max_requests_per_worker`, asks the
    /// master to recycle this worker and wakes it.
    pub(crate) fn served(&self) {
        let cell = self.cell();
        let served = cell.served_one();
        let max = self.config.max_requests_per_worker;
        if let (true, Some(bell)) = (max > 0 && served == max, self.seat.bell) {
            log::info!("served {served} connections; asking to be recycled");
            cell.ask_retire();
            // Wake the master now rather than at its next tick (a bell, not
            // a signal: see signals::Bell).
            crate::signals::Bell::ring(bell);
        }
    }

    /// This worker's scoreboard cell.
    pub(crate) fn cell(&self) -> &'a crate::scoreboard::Cell {
        self.seat.board.cell(self.seat.slot)
    }
}

/// How many refused addresses a worker names in its log per second.
const REFUSALS_LOGGED_PER_SEC: usize = 16;

/// The rate limit of the `max_connections_per_ip` refusal lines: each
/// address at most once per one-second window, and at most
/// [`REFUSALS_LOGGED_PER_SEC`] addresses per window; the refusals not
/// logged are counted, and the next line says how many. Its memory is
/// fixed whatever the flood (a map of every refused address, pruned as it
/// grows, would be scanned whole at every refusal once more addresses than
/// its bound were refused within a second).
/// The master uses it too, for fork mode's refusals.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// `now_ms()` at the start of the current window.
    window: u64,
    /// The addresses logged in the current window: at most
    /// [`REFUSALS_LOGGED_PER_SEC`].
    logged: Vec<std::net::IpAddr>,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

impl RefusalLog {
    /// Notes a refusal of `ip` at `now`: `Some(n)` if it is to be logged,
    /// `n` being the refusals not logged since the previous line; `None` if
    /// not (it is counted).
    pub(crate) fn note(&mut self, ip: std::net::IpAddr, now: u64) -> Option<u64> {
        if self.logged.is_empty() || now.saturating_sub(self.window) >= 1000 {
            self.window = now;
            self.logged.clear();
        }
        if self.logged.len() >= REFUSALS_LOGGED_PER_SEC || self.logged.contains(&ip) {
            self.unlogged += 1;
            return None;
        }
        self.logged.push(ip);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The heartbeat and idle-scan period: a second, or a third of
/// `worker_timeout`, or a quarter of `idle_timeout`, whichever is shortest
/// (at least 10 ms): an idle but healthy worker always beats well within
/// its timeout, and an idle connection is closed at most a quarter of
/// `idle_timeout` late.
pub(crate) fn tick_ms(config: &Config) -> u64 {
    let mut tick = TICK_MS;
    let heartbeat = config.worker_timeout.as_millis() as u64;
    if heartbeat > 0 {
        tick = tick.min(heartbeat / 3);
    }
    let idle = config.idle_timeout.as_millis() as u64;
    if idle > 0 {
        tick = tick.min(idle / 4);
    }
    tick.clamp(10, TICK_MS)
}

/// What a worker loop does after a signal (see [`on_signal`]).
pub(crate) enum Signaled {
    /// `SIGTERM`: stop accepting and finish the open connections.
    Drain,
    /// `SIGINT`/`SIGQUIT`: close everything and exit now.
    Exit,
    /// Handled here (`SIGUSR1`: the log file was reopened).
    Done,
}

/// The meaning of a signal to a worker, the same for both loops (epoll
/// here, io_uring in [`crate::uring`]); `open` is for the exit log line.
pub(crate) fn on_signal(sig: i32, open: usize) -> Signaled {
    match sig {
        libc::SIGTERM => Signaled::Drain,
        libc::SIGUSR1 => {
            match crate::logging::reopen(None) {
                Ok(()) => log::info!("SIGUSR1: log reopened"),
                Err(e) => log::error!("SIGUSR1: {e}"),
            }
            Signaled::Done
        }
        _ => {
            log::info!(
                "{}: closing {open} connections and exiting",
                crate::signals::name(sig)
            );
            Signaled::Exit
        }
    }
}

/// Why accepting is off (both worker loops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepting {
    /// Listeners are registered (in epoll, or an accept is in the ring).
    On,
    /// `max_connections` reached: resume when a connection closes.
    Full,
    /// `EMFILE`/`ENFILE`, or another `accept` error that leaves the queue
    /// as it was: resume at this `now_ms()`, or when a connection closes
    /// and frees a descriptor (and memory).
    Starved(u64),
    /// Ahead of the accepting worker with the fewest connections
    /// (`balance`): the listeners are out until this `now_ms()`, or until
    /// the doorbell rings and this worker is no longer ahead.
    Passing(u64),
    /// Draining: the listeners are closed for good.
    Closed,
}

impl Accepting {
    /// What the others see of this state when they balance: a worker that
    /// passes still counts, it only waits for them to catch up.
    pub(crate) fn taking(self) -> Taking {
        match self {
            Accepting::On => Taking::Listening,
            Accepting::Passing(_) => Taking::Passing,
            Accepting::Full | Accepting::Starved(_) | Accepting::Closed => Taking::No,
        }
    }

    /// Milliseconds from `now` until a worker loop's next timer (both
    /// loops): the idle scan / heartbeat tick at `next_scan`, or the end of
    /// an accept pause; at most [`TICK_MS`].
    pub(crate) fn wait_ms(self, now: u64, next_scan: u64) -> u64 {
        let mut until = next_scan;
        if let Accepting::Starved(t) | Accepting::Passing(t) = self {
            until = until.min(t);
        }
        until.saturating_sub(now).min(TICK_MS)
    }
}

/// The `busy_poll` window of a worker loop (both loops): after a wait that
/// returned events, the waits do not sleep until the window has passed
/// without any.
pub(crate) struct BusyPoll {
    window: Duration,
    /// Until when the waits do not sleep; `None` when the worker sleeps.
    until: Option<Instant>,
}

impl BusyPoll {
    pub(crate) fn new(config: &Config) -> BusyPoll {
        BusyPoll {
            window: config.busy_poll,
            until: None,
        }
    }

    /// Whether the next wait must return at once instead of sleeping.
    pub(crate) fn polling(&mut self) -> bool {
        match self.until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.until = None;
                false
            }
            None => false,
        }
    }

    /// Records a wait that returned `events` events.
    pub(crate) fn after_wait(&mut self, events: usize) {
        if events > 0 && !self.window.is_zero() {
            self.until = Some(Instant::now() + self.window);
        }
    }
}

/// How long a worker that is ahead (`balance`) leaves new connections to
/// the others before it takes what is queued itself; the doorbell usually
/// ends a pass sooner.
pub(crate) const PASS_MS: u64 = 5;

/// Accept balancing (`balance`, both loops): whether this worker should
/// leave the next connection to a worker that holds fewer.
pub(crate) struct Balance<'a> {
    seat: Seat<'a>,
    on: bool,
    /// A worker whose heartbeat is older than this many milliseconds is
    /// stopped or hung, and is not waited for.
    stale_ms: u64,
}

impl<'a> Balance<'a> {
    pub(crate) fn new(config: &Config, seat: Seat<'a>) -> Balance<'a> {
        Balance {
            seat,
            on: config.balance && seat.board.doorbell().is_some(),
            stale_ms: 2 * tick_ms(config) + 10,
        }
    }

    /// The doorbell to wait on, if balancing is on.
    pub(crate) fn doorbell(&self) -> Option<std::os::fd::BorrowedFd<'a>> {
        if self.on {
            self.seat.board.doorbell()
        } else {
            None
        }
    }

    /// Whether a worker holding `open` connections is ahead: it holds more
    /// than `f + 1 + f / 8`, where `f` is the fewest any other accepting
    /// worker holds. Small counts end up within two of each other, large
    /// ones within an eighth; the one spare connection keeps churn (many
    /// short connections, counts moving by one all the time) from passing
    /// back and forth.
    pub(crate) fn ahead(&self, open: usize, now: u64) -> bool {
        if !self.on {
            return false;
        }
        match self.others(now).fewest {
            Some(f) => open as u64 > u64::from(f) + 1 + u64::from(f) / 8,
            None => false,
        }
    }

    /// The other workers that take connections, stopped or hung ones left
    /// out.
    fn others(&self, now: u64) -> Others {
        let fresh_since = now.saturating_sub(self.stale_ms);
        self.seat.board.others(self.seat.slot, fresh_since)
    }

    /// Rings the doorbell for a worker that just passed if no other worker
    /// listens: they all pass, and the ring brings back those no longer
    /// ahead. Otherwise a listening worker already heard of every
    /// connection in the queue (see "Balancing accepts" above), and a ring
    /// would only wake every idle worker for nothing: with many workers
    /// and many short connections, that is most passes.
    pub(crate) fn ring_if_alone(&self, now: u64) {
        if !self.others_after_my_change(now).listening {
            self.seat.board.ring();
        }
    }

    /// Rings the doorbell for a worker that stopped listening altogether
    /// (full, out of descriptors, draining) if no other worker listens and
    /// some pass: this worker may have been the last one listening, and
    /// without a ring the passing ones would hear of the next connection
    /// only when their pass ends ([`PASS_MS`]). A worker that does not
    /// balance leaves this to the others, like everything about balancing.
    pub(crate) fn ring_if_last_listener(&self, now: u64) {
        if !self.on {
            return;
        }
        let others = self.others_after_my_change(now);
        if !others.listening && others.fewest.is_some() {
            self.seat.board.ring();
        }
    }

    /// [`Balance::others`], for a worker that has just published a change
    /// of its own `taking`. The store and these loads are Relaxed; the
    /// SeqCst fence between them makes the pair a Dekker handshake: of two
    /// workers that change at once (both pass, or one passes as the other
    /// stops listening), at least one sees the other's new state, so they
    /// cannot both believe the other is still listening and both skip the
    /// ring.
    fn others_after_my_change(&self, now: u64) -> Others {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.others(now)
    }

    /// Rings the doorbell whoever listens (the io_uring worker: see
    /// [`crate::uring`]).
    pub(crate) fn ring(&self) {
        self.seat.board.ring();
    }
}

/// The worker's whole state.
struct Worker<'a> {
    config: &'a Config,
    epoll: Epoll,
    listeners: Vec<Listener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    scratch: Vec<u8>,
    accepting: Accepting,
    gate: Gate<'a>,
    balance: Balance<'a>,
    busy: BusyPoll,
    preemption: Preemption,
    now: u64,
    /// The pipe large messages are echoed through (`splice = true`); empty
    /// whenever [`Worker::drive`] returns.
    pipe: Option<Pipe>,
}

/// Runs the worker until it has drained or is told to exit; returns the
/// process exit code. `seat` is its scoreboard slot.
pub fn run(listeners: Vec<Listener>, config: &Config, seat: Seat<'_>) -> i32 {
    // Test hook, not documented for users: a worker that dies at start, so
    // the integration tests can watch the master's crash-loop backoff.
    if std::env::var_os("ECHOD_TEST_WORKER_CRASH").is_some() {
        return exit_code::FAILURE;
    }
    let mut signals = match SignalPipe::new(WORKER_SIGNALS) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return exit_code::FAILURE;
        }
    };
    // Signals were blocked since fork(); what arrived meanwhile (a SIGTERM
    // from a quick reload) is delivered now, to the handlers just set.
    crate::process::unblock_signals();
    if config.io == crate::config::IoBackend::IoUring {
        match crate::uring::Ring::new(config) {
            Ok(ring) => return crate::uring::run(ring, listeners, config, seat, &mut signals),
            Err(e) => log::warn!("io_uring unavailable ({e}); using epoll"),
        }
    }
    let mut worker = match Worker::new(listeners, config, seat, &signals) {
        Ok(w) => w,
        Err(e) => {
            log::error!("cannot set up epoll: {e}");
            return exit_code::FAILURE;
        }
    };
    worker.run(&mut signals)
}

impl<'a> Worker<'a> {
    fn new(
        listeners: Vec<Listener>,
        config: &'a Config,
        seat: Seat<'a>,
        signals: &SignalPipe,
    ) -> nix::Result<Worker<'a>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(signals, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNALS))?;
        let balance = Balance::new(config, seat);
        if let Some(doorbell) = balance.doorbell() {
            // Edge-triggered: one event per ring, and the counter is never
            // read (level-triggered, it would stay readable for good).
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
            epoll.add(doorbell, EpollEvent::new(flags, TOKEN_DOORBELL))?;
        }
        let mut w = Worker {
            config,
            epoll,
            listeners,
            conns: Vec::new(),
            free: Vec::new(),
            open: 0,
            scratch: vec![0; config.buffer_size],
            accepting: Accepting::Full,
            gate: Gate::new(config, seat),
            balance,
            busy: BusyPoll::new(config),
            preemption: Preemption::new(config, now_ms()),
            now: now_ms(),
            pipe: None,
        };
        if config.splice {
            match Pipe::new(config.buffer_size) {
                // The pipe only saves copies: it must not take the last
                // descriptors `RLIMIT_NOFILE` leaves the worker, which
                // would then fail every accept with `EMFILE` and serve no
                // one, where without the pipe it serves.
                Ok(p) if !p.descriptor_left() => log::warn!(
                    "the splice pipe would leave no descriptor for a connection \
                     (RLIMIT_NOFILE too low); echoing with read and write"
                ),
                Ok(p) => w.pipe = Some(p),
                Err(e) => {
                    log::warn!("cannot make the splice pipe ({e}); echoing with read and write")
                }
            }
        }
        w.resume_accepting()?;
        Ok(w)
    }

    fn run(&mut self, signals: &mut SignalPipe) -> i32 {
        let mut events = vec![EpollEvent::empty(); 256];
        let tick = tick_ms(self.config);
        let mut next_scan = self.now + tick;
        loop {
            self.gate.cell().beat(self.now, self.open);
            let polled = self.busy.polling();
            let timeout = if polled {
                0
            } else {
                self.accepting.wait_ms(self.now, next_scan) as u16
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    log::error!("epoll_wait: {e}; exiting");
                    return exit_code::FAILURE;
                }
            };
            self.now = now_ms();
            self.busy.after_wait(n);
            let mut ready = 0;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_SIGNALS => {
                        for sig in signals.pending() {
                            match on_signal(sig, self.open) {
                                Signaled::Drain => self.start_draining(),
                                Signaled::Exit => return exit_code::OK,
                                Signaled::Done => {}
                            }
                        }
                    }
                    t if t >= TOKEN_CONN => {
                        ready += 1;
                        self.drive((t - TOKEN_CONN) as usize, ev.events());
                    }
                    TOKEN_DOORBELL => self.on_doorbell(),
                    t => self.accept_from((t - TOKEN_LISTENER) as usize, true),
                }
            }
            self.preemption.after_wait(ready, n, polled, self.now);
            match self.accepting {
                Accepting::Starved(until) if self.now >= until => self.resume_or_log(),
                Accepting::Passing(until) if self.now >= until => {
                    // Nobody took the queue over (a worker that stopped
                    // before its heartbeat went stale, or that is busy):
                    // take what is queued, whoever is ahead.
                    self.resume_or_log();
                    self.accept_all(false);
                }
                _ => {}
            }
            if self.now >= next_scan {
                self.close_idle();
                next_scan = self.now + tick;
            }
            if self.accepting == Accepting::Closed && self.open == 0 {
                log::info!("drained; exiting");
                return exit_code::OK;
            }
        }
    }

    /// Accepts from listener `i` until `EAGAIN`, the connection cap, an
    /// error that leaves the queue as it was (a descriptor shortage...),
    /// [`ACCEPTS_PER_CALL`] connections, or (when `balanced`) until this
    /// worker is ahead of another.
    fn accept_from(&mut self, i: usize, balanced: bool) {
        for _ in 0..ACCEPTS_PER_CALL {
            if self.accepting != Accepting::On {
                return;
            }
            let full = self.open >= self.config.max_connections;
            if waits_when_full(self.open, self.config) {
                // Clients wait in the backlog until a connection closes.
                self.pause_accepting(Accepting::Full);
                return;
            }
            let Some(listener) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) if full => self.gate.refuse_overload(stream, self.now),
                Ok((stream, peer)) => {
                    if let Some(key) = self.gate.admit(&stream, Some(peer), self.now) {
                        self.add_conn(stream, peer, key);
                    }
                    if balanced && self.balance.ahead(self.open, self.now) {
                        // Leave the next ones to the others: out of epoll,
                        // so that new connections wake them.
                        self.pause_accepting(Accepting::Passing(self.now + PASS_MS));
                        self.balance.ring_if_alone(self.now);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // That one connection is gone; the queue may hold more.
                Err(e) if accept_error_consumes_a_connection(&e) => log::debug!("accept: {e}"),
                // Nothing was taken off the queue: trying again at once
                // would fail the same way, forever, and this loop would
                // never get back to epoll_wait.
                Err(e) => {
                    let pause = self.gate.accept_failed(&e, self.now, self.open);
                    self.pause_accepting(pause);
                    return;
                }
            }
        }
    }

    /// [`Worker::accept_from`] every listener.
    fn accept_all(&mut self, balanced: bool) {
        for i in 0..self.listeners.len() {
            self.accept_from(i, balanced);
        }
    }

    fn add_conn(&mut self, stream: TcpStream, peer: SocketAddr, ip: IpKey) {
        crate::listener::tune_accepted(&stream);
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let ev = EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONN + idx as u64);
        if let Err(e) = self.epoll.add(stream.as_fd(), ev) {
            log::warn!("epoll_ctl(ADD) for {peer}: {e}; closing it");
            self.free.push(idx);
            self.gate.release(ip);
            return;
        }
        log::debug!("connection from {peer}");
        self.conns[idx] = Some(Conn {
            stream,
            echo: Echo::new(),
            waiting: Next::Read,
            activity: Activity::new(self.now),
            ip,
        });
        self.open += 1;
        self.gate.cell().set_open(self.open);
        self.gate.served();
    }

    /// Moves bytes on connection `idx` according to its readiness.
    fn drive(&mut self, idx: usize, events: EpollFlags) {
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        let mut io = SocketIo {
            stream: &conn.stream,
            pipe: self.pipe.as_mut(),
        };
        let next = match conn.waiting {
            Next::Read => conn.echo.on_readable(&mut io, &mut self.scratch),
            Next::Write
                if events.intersects(
                    EpollFlags::EPOLLOUT | EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP,
                ) =>
            {
                conn.echo.on_writable(&mut io)
            }
            _ => return,
        };
        // What a connection that ended left in the pipe must not reach the
        // next one (nothing to do, and no call, when the pipe is empty).
        if let Some(p) = self.pipe.as_mut() {
            p.discard();
        }
        conn.activity.moved(self.now);
        if next == conn.waiting {
            return;
        }
        match next {
            Next::Close(why) => self.close(idx, why),
            Next::Read | Next::Write => {
                // A backpressure transition: the only epoll_ctl on the data
                // path.
                let flags = if next == Next::Read {
                    EpollFlags::EPOLLIN
                } else {
                    EpollFlags::EPOLLOUT
                };
                let mut ev = EpollEvent::new(flags, TOKEN_CONN + idx as u64);
                if let Err(e) = self.epoll.modify(conn.stream.as_fd(), &mut ev) {
                    log::warn!("epoll_ctl(MOD): {e}; closing the connection");
                    self.close(idx, Close::Error(e as i32));
                    return;
                }
                conn.waiting = next;
            }
        }
    }

    /// Closes connection `idx`. Closing the socket also removes it from
    /// epoll: the worker holds the only descriptor of an accepted socket,
    /// so no `EPOLL_CTL_DEL` is needed.
    fn close(&mut self, idx: usize, why: Close) {
        let Some(conn) = self.conns.get_mut(idx).and_then(Option::take) else {
            return;
        };
        match why {
            Close::Error(errno) => log::info!(
                "connection from {}: {}; closed",
                peer_of(&conn.stream),
                io::Error::from_raw_os_error(errno)
            ),
            _ => {
                let (echoed, spliced) = conn.echo.echoed();
                log::debug!(
                    "connection from {} closed ({why:?}); {echoed} bytes echoed, {spliced} through the pipe",
                    peer_of(&conn.stream)
                );
            }
        }
        self.gate.release(conn.ip);
        drop(conn);
        self.free.push(idx);
        self.open -= 1;
        self.gate.cell().set_open(self.open);
        match self.accepting {
            Accepting::Full | Accepting::Starved(_) => self.resume_or_log(),
            // Many short connections: back as soon as it is level again,
            // rather than at the end of the pass.
            Accepting::Passing(_) if !self.balance.ahead(self.open, self.now) => {
                self.resume_or_log();
            }
            _ => {}
        }
    }

    /// Closes connections idle for `idle_timeout` (0 = never), and returns
    /// the buffers of connections that went quiet after a burst.
    fn close_idle(&mut self) {
        let limit = self.config.idle_timeout.as_millis() as u64;
        for idx in 0..self.conns.len() {
            let Some(conn) = self.conns[idx].as_mut() else {
                continue;
            };
            // An echo that waits for room: the client may be taking what
            // the socket holds, slowly, with no room reported for longer
            // than idle_timeout. The bytes it took since the last scan are
            // activity (see crate::acked).
            if limit > 0 && conn.waiting == Next::Write {
                conn.activity.look(&conn.stream, self.now);
            }
            let quiet = self.now.saturating_sub(conn.activity.last());
            if limit > 0 && quiet >= limit {
                log::debug!(
                    "connection from {} idle for {quiet} ms; closing",
                    peer_of(&conn.stream)
                );
                self.close(idx, Close::Done);
            } else if quiet >= TICK_MS {
                conn.echo.shrink();
            }
        }
    }

    /// Registers the listeners again after a pause, unless this worker is
    /// full and `overload = "wait"`. A full worker under `"reject"` listens
    /// on: it accepts and closes what comes (see [`Worker::accept_from`]),
    /// so that clients learn at once instead of waiting in the backlog.
    fn resume_or_log(&mut self) {
        if waits_when_full(self.open, self.config) {
            self.pause_accepting(Accepting::Full);
            return;
        }
        if let Err(e) = self.resume_accepting() {
            // Try again after a pause rather than at every loop turn (a
            // pause whose end has passed would make epoll_wait return at
            // once, over and over).
            let e = io::Error::from(e);
            let pause =
                self.gate
                    .pause_after("epoll_ctl(ADD) of a listener", &e, self.now, self.open);
            self.pause_accepting(pause);
        }
    }

    /// Registers every listener in epoll again: all of them, or none (the
    /// ones added before a failure are deleted again, so that no listener
    /// is registered while `accepting` says it is not: its level-triggered
    /// events would wake the worker for nothing, and the next resume would
    /// fail with `EEXIST`).
    fn resume_accepting(&mut self) -> nix::Result<()> {
        if matches!(self.accepting, Accepting::On | Accepting::Closed) {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let ev = EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
                TOKEN_LISTENER + i as u64,
            );
            if let Err(e) = injected_add_failure(i).map_or_else(|| self.epoll.add(l, ev), Err) {
                for added in &self.listeners[..i] {
                    let _ = self.epoll.delete(added);
                }
                return Err(e);
            }
        }
        self.accepting = Accepting::On;
        self.gate.cell().set_taking(Taking::Listening);
        Ok(())
    }

    /// The doorbell rang: another worker passed on connections, or one
    /// that was ahead is no longer.
    fn on_doorbell(&mut self) {
        match self.accepting {
            Accepting::Passing(_) if !self.balance.ahead(self.open, self.now) => {
                self.resume_or_log();
            }
            // A ring from an io_uring worker (whose cancelled accept may
            // have taken a wake-up), or one that crossed this worker's
            // coming back: look at the queues.
            Accepting::On => self.accept_all(true),
            _ => {}
        }
    }

    /// Takes the listeners out of epoll. `EPOLLEXCLUSIVE` registrations
    /// cannot be modified, only deleted and added again.
    ///
    /// A worker that stops listening for good or for a while (not a pass:
    /// its caller rings as balancing says) rings the doorbell if the others
    /// all pass (see [`Balance::ring_if_last_listener`]).
    fn pause_accepting(&mut self, why: Accepting) {
        let was_listening = self.accepting == Accepting::On;
        if was_listening {
            for l in &self.listeners {
                let _ = self.epoll.delete(l);
            }
        }
        self.accepting = why;
        self.gate.cell().set_taking(why.taking());
        if was_listening && why.taking() == Taking::No {
            self.balance.ring_if_last_listener(self.now);
        }
    }

    /// `SIGTERM`: stop accepting for good and finish the open connections.
    ///
    /// The listeners are deleted from epoll before they are closed: the
    /// listening socket is shared with the master and the other workers, so
    /// closing this worker's descriptor does not close the socket, and epoll
    /// would go on reporting it (an epoll registration lives as long as the
    /// open file description, not the descriptor).
    fn start_draining(&mut self) {
        if self.accepting == Accepting::Closed {
            return;
        }
        self.pause_accepting(Accepting::Closed);
        self.listeners.clear();
        if let Some(doorbell) = self.balance.doorbell() {
            // Shared with the other workers, like the listeners.
            let _ = self.epoll.delete(doorbell);
        }
        log::info!("draining {} connections", self.open);
    }
}

/// Test hook, not documented for users: while the file named by
/// `ECHOD_TEST_FAIL_LISTENER_ADD` exists, registering any listener but the
/// first in epoll fails with `ENOSPC` (as at `fs.epoll.max_user_watches`),
/// so the integration tests can watch a resume that fails half-way, which
/// nothing else makes happen to one process alone. Asked only when a
/// worker registers its listeners (at start and at each resume).
fn injected_add_failure(i: usize) -> Option<Errno> {
    let flag = std::env::var_os("ECHOD_TEST_FAIL_LISTENER_ADD")?;
    (i > 0 && std::path::Path::new(&flag).exists()).then_some(Errno::ENOSPC)
}

/// Whether a worker holding `open` connections stops accepting: at
/// `max_connections` with `overload = "wait"` (with `"reject"` it goes on
/// accepting, to close at once what it cannot serve).
pub(crate) fn waits_when_full(open: usize, config: &Config) -> bool {
    open >= config.max_connections && config.overload == Overload::Wait
}

fn peer_of(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a client".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(window: Duration) -> BusyPoll {
        BusyPoll::new(&Config {
            busy_poll: window,
            ..Config::default()
        })
    }

    #[test]
    fn a_worker_is_ahead_by_two_connections_or_an_eighth() {
        let mut board = Scoreboard::new(&Config::default()).unwrap();
        let (me, other) = (board.claim().unwrap(), board.claim().unwrap());
        let config = Config::default();
        assert!(config.balance, "balance is on by default");
        let seat = Seat {
            board: &board,
            slot: me,
            bell: None,
        };
        let balance = Balance::new(&config, seat);
        let now = 100_000;
        let cell = board.cell(other);
        // The other worker is not up yet (no heartbeat, not accepting):
        // nobody to leave connections to.
        assert!(!balance.ahead(50, now));
        cell.beat(now, 0);
        assert!(!balance.ahead(50, now), "not accepting: not counted");
        cell.set_taking(Taking::Listening);
        // Small counts: ahead with two more than the other.
        assert!(!balance.ahead(1, now));
        assert!(balance.ahead(2, now));
        cell.set_open(3);
        assert!(!balance.ahead(4, now));
        assert!(balance.ahead(5, now));
        // Large counts: an eighth more (80 + 1 + 10).
        cell.set_open(80);
        assert!(!balance.ahead(91, now));
        assert!(balance.ahead(92, now));
        // Full, starved or draining: not a candidate.
        cell.set_taking(Taking::No);
        assert!(!balance.ahead(1000, now));
        // Passing: still a candidate.
        cell.set_taking(Taking::Passing);
        assert!(balance.ahead(92, now));
        // Stopped or hung (heartbeat older than two ticks): not waited for.
        cell.set_taking(Taking::Listening);
        let stale = 2 * tick_ms(&config) + 10;
        cell.beat(now - stale, 0);
        assert!(balance.ahead(2, now));
        cell.beat(now - stale - 1, 0);
        assert!(!balance.ahead(2, now));
        // balance = false never passes.
        cell.beat(now, 0);
        let off = Config {
            balance: false,
            ..Config::default()
        };
        let unbalanced = Balance::new(&off, seat);
        assert!(!unbalanced.ahead(1000, now));
        assert!(unbalanced.doorbell().is_none());
        assert!(balance.doorbell().is_some());
    }

    /// Slot `me`'s balancing, with the default config, and an epoll set
    /// that waits on the doorbell as a worker does (edge-triggered).
    fn watching_the_doorbell(board: &Scoreboard, me: usize) -> (Balance<'_>, Epoll) {
        let seat = Seat {
            board,
            slot: me,
            bell: None,
        };
        let balance = Balance::new(&Config::default(), seat);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll
            .add(balance.doorbell().unwrap(), EpollEvent::new(flags, 1))
            .unwrap();
        (balance, epoll)
    }

    #[test]
    fn a_worker_that_passes_rings_only_when_nobody_else_listens() {
        let mut board = Scoreboard::new(&Config::default()).unwrap();
        let (me, other) = (board.claim().unwrap(), board.claim().unwrap());
        let (balance, epoll) = watching_the_doorbell(&board, me);
        let mut events = [EpollEvent::empty(); 2];
        let mut rang = || epoll.wait(&mut events, 0u16).unwrap() == 1;
        let now = 100_000;
        board.cell(other).beat(now, 0);
        board.cell(other).set_taking(Taking::Listening);
        balance.ring_if_alone(now);
        assert!(!rang(), "the listening worker hears of new connections");
        board.cell(other).set_taking(Taking::Passing);
        balance.ring_if_alone(now);
        assert!(rang(), "everybody passes: bring back who can take");
        board.cell(other).set_taking(Taking::No);
        balance.ring_if_alone(now);
        assert!(rang(), "nobody else takes connections");
    }

    #[test]
    fn a_worker_that_stops_listening_rings_only_for_passing_workers() {
        let mut board = Scoreboard::new(&Config::default()).unwrap();
        let (me, other) = (board.claim().unwrap(), board.claim().unwrap());
        let (balance, epoll) = watching_the_doorbell(&board, me);
        let mut events = [EpollEvent::empty(); 2];
        let mut rang = || epoll.wait(&mut events, 0u16).unwrap() == 1;
        let now = 100_000;
        board.cell(other).beat(now, 0);
        board.cell(other).set_taking(Taking::Passing);
        balance.ring_if_last_listener(now);
        assert!(rang(), "the other passes: bring it back");
        board.cell(other).set_taking(Taking::Listening);
        balance.ring_if_last_listener(now);
        assert!(!rang(), "the other listens already");
        board.cell(other).set_taking(Taking::No);
        balance.ring_if_last_listener(now);
        assert!(!rang(), "nobody to bring back");
        board.cell(other).set_taking(Taking::Passing);
        let off = Config {
            balance: false,
            ..Config::default()
        };
        let seat = Seat {
            board: &board,
            slot: me,
            bell: None,
        };
        Balance::new(&off, seat).ring_if_last_listener(now);
        assert!(!rang(), "a worker that does not balance does not ring");
    }

    #[test]
    fn refusals_are_logged_once_a_second_per_address_and_sixteen_addresses_at_most() {
        let ip = |i: u32| std::net::IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + i));
        let mut log = RefusalLog::default();
        let t = 100_000;
        assert_eq!(log.note(ip(1), t), Some(0));
        assert_eq!(log.note(ip(1), t + 10), None, "once a second per address");
        assert_eq!(log.note(ip(2), t + 20), Some(1), "the repeat was counted");
        for i in 3..=REFUSALS_LOGGED_PER_SEC as u32 {
            assert_eq!(log.note(ip(i), t + 20), Some(0));
        }
        // Past the bound, whatever the flood: counted, not logged, and
        // the memory stays the same.
        for i in 0..10_000 {
            assert_eq!(log.note(ip(1000 + i), t + 30), None);
        }
        assert_eq!(log.logged.len(), REFUSALS_LOGGED_PER_SEC);
        // The next window: the next line tells what was not logged.
        assert_eq!(log.note(ip(1), t + 1000), Some(10_000));
        assert_eq!(log.note(ip(2), t + 1001), Some(0));
        assert_eq!(log.note(ip(1), t + 1500), None);
    }

    #[test]
    fn only_a_full_worker_under_overload_wait_stops_accepting() {
        let wait = Config {
            max_connections: 2,
            overload: Overload::Wait,
            ..Config::default()
        };
        let reject = Config {
            overload: Overload::Reject,
            ..wait.clone()
        };
        assert!(!waits_when_full(1, &wait));
        assert!(waits_when_full(2, &wait));
        assert!(waits_when_full(3, &wait));
        // A full worker under "reject" resumes listening after a pause (a
        // pass, a descriptor shortage) and closes what it cannot serve.
        assert!(!waits_when_full(2, &reject));
        assert!(!waits_when_full(3, &reject));
    }

    #[test]
    fn without_a_window_a_worker_never_polls() {
        let mut b = busy(Duration::ZERO);
        b.after_wait(10);
        assert!(!b.polling());
    }

    #[test]
    fn events_open_the_window_and_quiet_closes_it() {
        // A window far longer than any pause of this test's thread.
        let mut b = busy(Duration::from_secs(60));
        assert!(!b.polling(), "no event yet");
        b.after_wait(0);
        assert!(!b.polling(), "a timeout is not an event");
        b.after_wait(1);
        assert!(b.polling());
        assert!(b.polling(), "still within the window");
        // And a short one, waited out.
        let mut b = busy(Duration::from_millis(20));
        b.after_wait(1);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!b.polling(), "the window passed without an event");
        b.after_wait(3);
        assert!(b.until.is_some(), "a new event opens it again");
    }
}
