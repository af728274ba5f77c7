//! The prefork worker on `io_uring` (`io = "io_uring"`): the same contract
//! as [`crate::worker`] (inherited listeners, scoreboard heartbeat and
//! counts, `SIGTERM` drain, `SIGINT`/`SIGQUIT` exit, `idle_timeout`,
//! `max_connections` with `overload`, `max_connections_per_ip`, recycling,
//! backpressure), with fewer syscalls per message.
//!
//! Runs in: each prefork worker whose config says `io = "io_uring"` and
//! whose kernel accepts the ring (else [`crate::worker::run`] logs one line
//! and runs the epoll loop).
//!
//! ## One `io_uring_enter` per loop turn
//! Everything is a request in the ring, submitted in one batch by the
//! `io_uring_enter` that also waits for the next completions (with the
//! heartbeat tick as its timeout):
//! - each listener has an **accept** in flight, armed again after each
//!   connection (not multishot: see [`MULTISHOT_ACCEPT`]);
//! - each connection has a **receive** in flight that picks a buffer from a
//!   **provided-buffer ring** (`buffer_size` bytes each) shared by all
//!   connections, so an idle connection holds no buffer; one-shot, armed
//!   again after each message (not multishot: see Backpressure);
//! - the echo is a **send** straight from that buffer (no copy); a short
//!   send is followed by a send of the rest from the same buffer; the
//!   buffer goes back to the ring when all of it was sent;
//! - the signal pipe and, with `balance`, the scoreboard's doorbell have a
//!   multishot poll each (edge-triggered: one completion per ring).
//!
//! Accept balancing follows the epoll worker's rule (see [`crate::worker`]):
//! after an accepted connection, a worker that is ahead cancels its accept
//! requests instead of arming them again, and rings the doorbell; hearing
//! it, an accepting worker takes what is queued with plain `accept4`. It
//! rings at every pass, where the epoll worker rings only when no other
//! worker listens: an accept request takes its connection's wake-up
//! whether or not it is then cancelled.
//!
//! A ping-pong message therefore costs no syscall of its own: its receive
//! completion, its send request and the next receive request ride on the
//! loop turn's one `io_uring_enter`, shared with every other connection
//! that was busy. A receive that follows one that left the socket empty
//! (a client waiting for its echo) arms its poll first
//! (`IORING_RECVSEND_POLL_FIRST`) instead of trying a read that would fail.
//!
//! ## Backpressure, and a pool no client can drain
//! One send per connection is in flight at a time (two sends on one socket
//! may complete out of order); what arrives meanwhile waits behind it. The
//! ring's buffers are shared by all connections, so each connection is
//! bounded in buffers as well as bytes, and the pool is protected:
//! - A connection has a receive in flight only while nothing waits behind
//!   its send and at most `buffer_size` bytes are unsent; a receive takes
//!   one buffer. So a connection holds at most two buffers, `2 *
//!   buffer_size` bytes: the echo being sent and one message behind it
//!   (the epoll worker holds one), whatever its client does: one that
//!   does not read, or that sends many tiny segments, gets no further.
//! - Receives are one-shot, not multishot, because the kernel runs a
//!   multishot receive in a loop while the socket has data, and takes a
//!   buffer per round before the worker can stop it: measured, a client
//!   that sent megabytes without reading got 64 buffers of 16 KiB before
//!   the cancel took effect, or all 16 buffers of 512 KiB, so a cancel
//!   cannot bound a connection. Side by side with multishot receives,
//!   two runs, medians (8 rounds of 64 B x 50 ping-pong, 5 and 6 of 4 x
//!   64 KiB streams, order rotated): one-shot receives with the poll
//!   first cost 0.90 x and 1.01 x the CPU per message, 1.15 x and 1.10 x
//!   the CPU per GB of a stream, for the same rates.
//! - When fewer than a quarter of the buffers are free after a loop turn,
//!   the worker takes buffers back ([`Worker::reclaim`]): what waits behind
//!   a send is copied into memory of the connection's own, and a send
//!   that has been in flight for [`STUCK_SEND_MS`] or more (its client
//!   does not read, or reads slowly) is cancelled and what it had left
//!   copied too; the connection goes on from its copy, with the same
//!   bound. So blocked clients hold no ring buffer for long, whatever
//!   their number, and another connection waits for a buffer some
//!   milliseconds at most. A connection whose sends complete within that
//!   time never has them cancelled; none copies while the pool is not
//!   low.
//!
//! ## Closing
//! A connection's descriptor is closed only once none of its requests is in
//! flight (a close request in the ring), so that no request can ever reach
//! a newer connection that reuses the descriptor number or the slot. Closing
//! cancels its receive and, if a send is stuck on a client that does not
//! read, shuts the socket down so the send fails.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::acked::Activity;
use crate::config::{Config, Overload};
use crate::echo::Close;
use crate::listener::{accept_error_consumes_a_connection, Listener};
use crate::process::exit_code;
use crate::sched::Preemption;
use crate::scoreboard::{now_ms, IpKey, Taking};
use crate::signals::SignalPipe;
use crate::worker::{
    on_signal, tick_ms, waits_when_full, Accepting, Balance, BusyPoll, Gate, Seat, Signaled,
    PASS_MS,
};

/// How long a send from a ring buffer may be in flight before
/// [`Worker::reclaim`], when the pool runs low, takes its buffer back.
const STUCK_SEND_MS: u64 = 10;

/// Whether listeners get a multishot accept (one request for every
/// connection) or a one-shot accept armed again after each connection.
///
/// One-shot, measured: a multishot accept stays registered on the shared
/// listening socket at the same place in its wait queue, so the kernel
/// hands every new connection to the same worker, busy or not (the
/// supervision test `prefork_pool_is_exactly_workers_...` saw 160 of 160
/// connections go to one of two workers). A one-shot accept, armed again
/// after each completion, goes to the back of the queue, so connections
/// rotate between workers. It costs one submission per connection, no
/// syscall (it rides on the loop turn's `io_uring_enter`), and it keeps
/// `max_connections` exact: at most one accept per listener is in flight.
const MULTISHOT_ACCEPT: bool = false;

/// Submission queue entries (the completion queue is four times larger).
const SQ_ENTRIES: u32 = 1024;
/// The provided-buffer group of the receive ring.
const BGID: u16 = 0;
/// Most buffers in the receive ring.
const MAX_BUFFERS: usize = 256;
/// Fewest buffers in the receive ring.
const MIN_BUFFERS: usize = 16;
/// How much memory the ring's buffers may take together, unless that is
/// less than [`MIN_BUFFERS`] buffers.
const BUFFER_BUDGET: usize = 8 << 20;
/// When fewer than `1 / RESERVE_DIVISOR` of the ring's buffers are free
/// after a loop turn, the worker takes buffers back from the connections
/// that hold them (see [`Worker::reclaim`]).
const RESERVE_DIVISOR: usize = 4;
/// [`BufRing::owner`] of a buffer no connection holds.
const NO_OWNER: usize = usize::MAX;
/// A receive's `ioprio` flag: arm the poll first instead of trying at once
/// (Linux 5.19; the `io-uring` crate does not export it).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// What a completion is about: the low 8 bits of its `user_data`; the rest
/// is the listener or connection slot index.
const KIND_IGNORE: u64 = 0;
const KIND_SIGNAL: u64 = 1;
const KIND_ACCEPT: u64 = 2;
const KIND_RECV: u64 = 3;
const KIND_SEND: u64 = 4;
const KIND_DOORBELL: u64 = 5;

fn ud(kind: u64, idx: usize) -> u64 {
    kind | (idx as u64) << 8
}

/// The ring of buffers the kernel picks from for receives.
///
/// Invariant: `entries` is a power of two; `data` holds `entries` buffers of
/// `buf_len` bytes; the kernel owns the buffers that are in the ring
/// (`free` of them), the worker owns the others (being sent or waiting),
/// each held by the connection slot `owner[bid]`.
struct BufRing {
    ring: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    entries: u16,
    tail: u16,
    data: Vec<u8>,
    buf_len: usize,
    free: usize,
    owner: Vec<usize>,
}

impl BufRing {
    fn new(buffer_size: usize) -> io::Result<BufRing> {
        let entries = (BUFFER_BUDGET / buffer_size)
            .clamp(MIN_BUFFERS, MAX_BUFFERS)
            .next_power_of_two()
            .min(MAX_BUFFERS);
        let layout = std::alloc::Layout::from_size_align(
            entries * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size; zeroed entries are valid.
        let ring = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut b = BufRing {
            ring,
            layout,
            entries: entries as u16,
            tail: 0,
            data: vec![0; entries * buffer_size],
            buf_len: buffer_size,
            free: 0,
            owner: vec![NO_OWNER; entries],
        };
        for bid in 0..entries as u16 {
            b.give(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Takes note that a completion for connection slot `idx` took buffer
    /// `bid` out of the ring.
    fn take(&mut self, bid: u16, idx: usize) {
        debug_assert!(self.free > 0 && self.owner[bid as usize] == NO_OWNER);
        self.free = self.free.saturating_sub(1);
        self.owner[bid as usize] = idx;
    }

    /// Hands the ring buffer of `chunk`, if it has one, back to the kernel.
    fn give_chunk(&mut self, chunk: &Chunk) {
        if let Chunk::Ring { bid, .. } = *chunk {
            self.give(bid);
        }
    }

    /// Appends the bytes of `chunk` from `from` on to `to`, and hands its
    /// ring buffer, if it has one, back to the kernel.
    fn copy_out(&mut self, chunk: Chunk, from: usize, to: &mut Vec<u8>) {
        match chunk {
            Chunk::Ring { bid, len } => {
                to.extend_from_slice(&self.buf(bid)[from..len as usize]);
                self.give(bid);
            }
            Chunk::Own(v) => to.extend_from_slice(&v[from..]),
        }
    }

    /// Hands buffer `bid` back to the kernel (visible at [`Self::publish`]).
    fn give(&mut self, bid: u16) {
        self.owner[bid as usize] = NO_OWNER;
        let i = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `i < entries`, inside the allocation; the kernel reads
        // entries only up to the published tail, which is behind this one.
        let e = unsafe { &mut *self.ring.add(i) };
        e.set_addr(self.buf(bid).as_ptr() as u64);
        e.set_len(self.buf_len as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.free += 1;
    }

    /// Makes the buffers given back so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail is a u16 inside the first entry, 2-byte aligned,
        // shared with the kernel, which only reads it.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.ring) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    fn buf(&self, bid: u16) -> &[u8] {
        let at = bid as usize * self.buf_len;
        &self.data[at..at + self.buf_len]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The ring that used it
        // is dropped first (field order of `Ring`).
        unsafe { std::alloc::dealloc(self.ring as *mut u8, self.layout) }
    }
}

/// An `io_uring` and its buffer ring, set up. [`Ring::new`] failing means
/// "use epoll".
pub struct Ring {
    ring: IoUring,
    bufs: BufRing,
}

impl Ring {
    /// Sets up the ring and registers the buffer ring; fails where the
    /// kernel lacks what the worker needs: io_uring itself, the wait
    /// timeout argument (5.11), registered buffer rings (5.19), and
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0: the worker is the ring's only
    /// submitter), which also keeps out the kernels before 6.0 that echod
    /// is not documented for (echod.toml(5)); an older kernel is refused
    /// here, never half-way through serving. `IORING_SETUP_DEFER_TASKRUN`
    /// (6.1) is used where there is.
    pub fn new(config: &Config) -> io::Result<Ring> {
        // Test hook, not documented for users: act as if the kernel
        // refused io_uring, so the tests can watch the fallback.
        if std::env::var_os("ECHOD_TEST_NO_IO_URING").is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let mut deferred = IoUring::builder();
        deferred
            .setup_cqsize(SQ_ENTRIES * 4)
            .setup_single_issuer()
            .setup_defer_taskrun();
        if !config.busy_poll.is_zero() {
            // IORING_SQ_TASKRUN tells a busy-polling `submit()` that
            // completions wait to be run (see `Worker::enter`); without
            // busy polling nobody reads it.
            deferred.setup_taskrun_flag();
        }
        let ring = deferred.build(SQ_ENTRIES).or_else(|_| {
            IoUring::builder()
                .setup_cqsize(SQ_ENTRIES * 4)
                .setup_single_issuer()
                .build(SQ_ENTRIES)
        })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::other("the kernel lacks IORING_FEAT_EXT_ARG"));
        }
        let bufs = BufRing::new(config.buffer_size)?;
        // SAFETY: the buffer ring memory lives as long as `Ring` and is
        // dropped after the io_uring (field order).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                bufs.entries,
                BGID,
                0,
            )?;
        }
        Ok(Ring { ring, bufs })
    }
}

/// Bytes to echo, in the order they arrived.
enum Chunk {
    /// `len` bytes in ring buffer `bid`, echoed from where the kernel put
    /// them.
    Ring { bid: u16, len: u32 },
    /// A copy in the connection's own memory, made to give ring buffers
    /// back (see [`Worker::spill`]).
    Own(Vec<u8>),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Ring { len, .. } => *len as usize,
            Chunk::Own(v) => v.len(),
        }
    }
}

/// One client connection.
///
/// Invariants: a send of `front[sent..]` is in flight exactly when `front`
/// is `Some`, and the memory it reads (a ring buffer or `Own` bytes) is not
/// touched until its completion; `waiting` is `None` when `front` is
/// `None`; each ring buffer in `front` or `waiting` has this slot as its
/// [`BufRing::owner`].
struct Conn {
    stream: TcpStream,
    ip: IpKey,
    /// `now_ms()` of the last byte moved, counting the bytes the client
    /// took from the socket while a send waits for room, seen at the idle
    /// scans (see [`crate::acked`]).
    activity: Activity<u64>,
    /// The connection's receive (one-shot: at most one buffer) is in
    /// flight, cancelled or not: its completion has not arrived yet.
    recv_armed: bool,
    front: Option<Chunk>,
    /// Bytes of `front` already sent.
    sent: usize,
    /// What arrived while a send was in flight: one chunk at most, since
    /// a receive is armed only when nothing waits.
    waiting: Option<Chunk>,
    /// The last receive left the socket empty: the next one waits for
    /// data before it tries (`IORING_RECVSEND_POLL_FIRST`), as with a
    /// client that sends its next message only once it has its echo.
    drained: bool,
    /// When the send in flight was issued (`now_ms`).
    send_at: u64,
    /// The send in flight was cancelled to take its ring buffer back: at
    /// its completion what it has left is copied (see [`Worker::reclaim`]).
    reclaim: bool,
    /// The client closed its side: close once everything is sent.
    eof: bool,
    /// Closed as far as the worker is concerned; the descriptor is closed
    /// when nothing is in flight any more.
    closed: bool,
}

struct Worker<'a> {
    ring: IoUring,
    bufs: BufRing,
    config: &'a Config,
    gate: Gate<'a>,
    balance: Balance<'a>,
    /// The listeners; each is closed, when draining, once its accept is no
    /// longer in flight (so no queued accept request can meet a closed or
    /// reused descriptor number).
    listeners: Vec<Option<Listener>>,
    /// Whether listener `i`'s accept is in flight.
    accept_armed: Vec<bool>,
    accepting: Accepting,
    /// Connections accepted while full with `overload = "wait"`: the
    /// kernel took them off the queue before the worker could stop it; they
    /// wait here, unserved, for a free slot, as they would in the backlog.
    parked: VecDeque<TcpStream>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    /// Connections whose receive stopped for want of buffers.
    starved: Vec<usize>,
    /// Free buffers below which [`Worker::reclaim`] runs.
    reserve: usize,
    /// `now` at the last [`Worker::reclaim`], as long as no receive has
    /// taken a ring buffer since: until the clock moves, another would find
    /// nothing to do (what waited then is copied, the sends stuck then are
    /// marked, and a send issued since started at `now`).
    reclaimed: Option<u64>,
    now: u64,
    busy: BusyPoll,
    preemption: Preemption,
    signal_fd: i32,
}

/// Runs the worker on `ring` until it has drained or is told to exit;
/// returns the process exit code.
pub fn run(
    ring: Ring,
    listeners: Vec<Listener>,
    config: &Config,
    seat: Seat<'_>,
    signals: &mut SignalPipe,
) -> i32 {
    let n = listeners.len();
    let reserve = ring.bufs.entries as usize / RESERVE_DIVISOR;
    let mut w = Worker {
        ring: ring.ring,
        bufs: ring.bufs,
        config,
        gate: Gate::new(config, seat),
        balance: Balance::new(config, seat),
        listeners: listeners.into_iter().map(Some).collect(),
        accept_armed: vec![false; n],
        accepting: Accepting::Full,
        parked: VecDeque::new(),
        conns: Vec::new(),
        free: Vec::new(),
        open: 0,
        starved: Vec::new(),
        reserve,
        reclaimed: None,
        now: now_ms(),
        busy: BusyPoll::new(config),
        preemption: Preemption::new(config, now_ms()),
        signal_fd: signals.as_fd().as_raw_fd(),
    };
    log::debug!("io_uring worker: {} receive buffers", w.bufs.entries);
    w.arm_signals();
    w.arm_doorbell();
    w.resume_or_log();
    let code = w.run(signals);
    // Sends may still be in flight; the kernel cancels them when the
    // process exits, which follows. Until then the memory they read stays
    // where it is: the buffers and the connections' own copies are left to
    // the exit, not freed under them.
    std::mem::forget(w.bufs);
    std::mem::forget(w.conns);
    code
}

impl Worker<'_> {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every request points at memory that outlives it: ring
        // buffers (owned by `bufs`, alive as long as the ring), a
        // connection's own copy (kept in its `front` until the send's
        // completion, see `Conn`), or nothing.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            if let Err(e) = self.ring.submit() {
                log::warn!("io_uring_enter: {e}");
            }
        }
    }

    /// Submits everything queued; false if some requests are still in the
    /// submission queue after a few tries (the kernel refused the call or
    /// took only part of the queue).
    fn submit_all(&mut self) -> bool {
        for _ in 0..8 {
            if self.ring.submission().is_empty() {
                return true;
            }
            if let Err(e) = self.ring.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    log::warn!("io_uring_enter: {e}");
                    return false;
                }
            }
        }
        self.ring.submission().is_empty()
    }

    fn arm_signals(&mut self) {
        let e = opcode::PollAdd::new(types::Fd(self.signal_fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(ud(KIND_SIGNAL, 0));
        self.push(e);
    }

    /// A multishot poll on the doorbell: edge-triggered (the io_uring
    /// default for multishot polls), one completion per ring.
    fn arm_doorbell(&mut self) {
        let Some(doorbell) = self.balance.doorbell() else {
            return;
        };
        let e = opcode::PollAdd::new(types::Fd(doorbell.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(ud(KIND_DOORBELL, 0));
        self.push(e);
    }

    /// The loop turn's one `io_uring_enter`: submits the queued requests
    /// and waits up to `wait_ms` for a completion, or, while busy polling
    /// (`polled`: [`BusyPoll::polling`] said so), does not wait: `submit()`
    /// then asks the kernel to run the deferred completions
    /// (`IORING_ENTER_GETEVENTS`) when `IORING_SQ_TASKRUN` says there are
    /// some, and returns.
    fn enter(&mut self, polled: bool, wait_ms: u64) -> io::Result<usize> {
        if polled {
            return self.ring.submit();
        }
        let ts = types::Timespec::new()
            .sec(wait_ms / 1000)
            .nsec((wait_ms % 1000) as u32 * 1_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.ring.submitter().submit_with_args(1, &args)
    }

    fn run(&mut self, signals: &mut SignalPipe) -> i32 {
        let tick = tick_ms(self.config);
        let mut next_scan = self.now + tick;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(256);
        loop {
            self.gate.cell().beat(self.now, self.open);
            self.bufs.publish();
            let polled = self.busy.polling();
            match self.enter(polled, self.accepting.wait_ms(self.now, next_scan)) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    log::error!("io_uring_enter: {e}; exiting");
                    return exit_code::FAILURE;
                }
            }
            self.now = now_ms();
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            self.busy.after_wait(cqes.len());
            let mut ready = 0;
            for &(data, res, flags) in &cqes {
                let idx = (data >> 8) as usize;
                match data & 0xff {
                    KIND_SIGNAL => {
                        if !cqueue::more(flags) {
                            self.arm_signals();
                        }
                        for sig in signals.pending() {
                            match on_signal(sig, self.open + self.parked.len()) {
                                Signaled::Drain => self.start_draining(),
                                Signaled::Exit => return exit_code::OK,
                                Signaled::Done => {}
                            }
                        }
                    }
                    KIND_ACCEPT => {
                        if let Err(code) = self.on_accept(idx, res, flags) {
                            return code;
                        }
                    }
                    KIND_RECV => {
                        ready += 1;
                        self.on_recv(idx, res, flags);
                    }
                    KIND_SEND => self.on_send(idx, res),
                    KIND_DOORBELL => {
                        if self.accepting == Accepting::Closed {
                            continue;
                        }
                        if !cqueue::more(flags) {
                            self.arm_doorbell();
                        }
                        self.on_doorbell();
                    }
                    _ => {}
                }
            }
            self.preemption
                .after_wait(ready, cqes.len(), polled, self.now);
            if self.bufs.free < self.reserve && self.reclaimed != Some(self.now) {
                self.reclaim();
            }
            if !self.starved.is_empty() && self.bufs.free > 0 {
                for idx in std::mem::take(&mut self.starved) {
                    self.rearm(idx);
                }
            }
            match self.accepting {
                Accepting::Starved(until) if self.now >= until => self.resume_or_log(),
                Accepting::Passing(until) if self.now >= until => {
                    // Nobody took the queue over: take what is queued,
                    // whoever is ahead (as the epoll worker does).
                    self.resume_or_log();
                    self.rescue_accepts(false);
                }
                _ => {}
            }
            if self.now >= next_scan {
                self.rescue_accepts(true);
                self.close_idle();
                next_scan = self.now + tick;
            }
            if self.accepting == Accepting::Closed
                && self.open == 0
                && self.parked.is_empty()
                && !self.accept_armed.contains(&true)
            {
                log::info!("drained; exiting");
                return exit_code::OK;
            }
        }
    }

    // --- accepting -------------------------------------------------------

    fn on_accept(&mut self, i: usize, res: i32, flags: u32) -> Result<(), i32> {
        let more = cqueue::more(flags);
        if !more {
            if let Some(a) = self.accept_armed.get_mut(i) {
                *a = false;
            }
        }
        if res >= 0 {
            // SAFETY: the kernel just made this descriptor for us.
            self.accepted(unsafe { TcpStream::from_raw_fd(res) }, true);
        } else {
            let e = io::Error::from_raw_os_error(-res);
            match -res {
                libc::ECANCELED => {}
                // One connection failed (a reset while it was queued...):
                // the next one may not.
                _ if accept_error_consumes_a_connection(&e) => log::debug!("accept: {e}"),
                // The queue is as it was (out of descriptors or memory, a
                // listener that no longer listens): pause, as the epoll
                // worker does, rather than re-arm into the same error or
                // exit and be respawned into it.
                _ => {
                    let pause = self.gate.accept_failed(&e, self.now, self.open);
                    self.pause_accepting(pause);
                }
            }
        }
        if !more && self.accepting == Accepting::On {
            self.arm_accept(i);
        }
        if !more && self.accepting == Accepting::Closed {
            if let Some(l) = self.listeners.get_mut(i) {
                *l = None;
            }
        }
        Ok(())
    }

    /// Once a tick (and when the doorbell rings, or a pass ends), takes
    /// with plain `accept4` what waits in the listen queues. An accept
    /// request in io_uring is an exclusive waiter on the shared listening
    /// socket: a worker that is stopped (`SIGSTOP`) or being torn down can
    /// take the wake-up for a connection and never accept it, and the
    /// connection then waits for the next wake-up (measured: the
    /// supervision test that kills a stopped worker saw its next client
    /// wait 10 s). A stopped epoll worker is not woken in its place (epoll
    /// wakes a waiter blocked in `epoll_wait`), though a busy one may find
    /// the listener ready at its next wait. This bounds
    /// the wait to one tick; it costs one `accept4` per listener per tick.
    /// `balanced`: stop once this worker is ahead (not at the end of a
    /// pass, which takes what is queued whoever is ahead).
    fn rescue_accepts(&mut self, balanced: bool) {
        for i in 0..self.listeners.len() {
            for _ in 0..64 {
                if self.accepting != Accepting::On {
                    return;
                }
                let Some(Some(l)) = self.listeners.get(i) else {
                    break;
                };
                match l.accept() {
                    Ok((stream, _)) => self.accepted(stream, balanced),
                    Err(_) => break,
                }
            }
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(Some(l)) = self.listeners.get(i) else {
            return;
        };
        if self.accept_armed[i] {
            return;
        }
        let fd = types::Fd(l.as_fd().as_raw_fd());
        let e = if MULTISHOT_ACCEPT {
            opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        }
        .user_data(ud(KIND_ACCEPT, i));
        self.accept_armed[i] = true;
        self.push(e);
    }

    fn resume_or_log(&mut self) {
        if matches!(self.accepting, Accepting::On | Accepting::Closed) {
            return;
        }
        if waits_when_full(self.open + self.parked.len(), self.config) {
            self.pause_accepting(Accepting::Full);
            return;
        }
        self.accepting = Accepting::On;
        self.gate.cell().set_taking(Taking::Listening);
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
    }

    /// The doorbell rang: another worker passed on connections, or one
    /// that was ahead is no longer (see the epoll worker's twin).
    fn on_doorbell(&mut self) {
        match self.accepting {
            Accepting::Passing(_) if !self.balance.ahead(self.open, self.now) => {
                self.resume_or_log();
            }
            // The queue may hold connections whose wake-up went to the
            // worker that passed, not to this worker's armed accept.
            Accepting::On => self.rescue_accepts(true),
            _ => {}
        }
    }

    fn pause_accepting(&mut self, why: Accepting) {
        // Draining is for good: an accept completion handled after the
        // signal in the same batch (an error, or a connection that fills
        // the worker) must not reopen it.
        if self.accepting == Accepting::Closed {
            return;
        }
        let was_listening = self.accepting == Accepting::On;
        if was_listening {
            for i in 0..self.listeners.len() {
                if self.accept_armed[i] {
                    let e = opcode::AsyncCancel::new(ud(KIND_ACCEPT, i))
                        .build()
                        .user_data(ud(KIND_IGNORE, 0));
                    self.push(e);
                }
            }
        }
        self.accepting = why;
        self.gate.cell().set_taking(why.taking());
        // Full, out of descriptors: bring back a worker that passes (the
        // epoll worker's rule).
        if was_listening && why.taking() == Taking::No {
            self.balance.ring_if_last_listener(self.now);
        }
    }

    fn start_draining(&mut self) {
        if self.accepting == Accepting::Closed {
            return;
        }
        // Stop accepting before saying so, as the epoll worker does: the
        // accepts still queued are submitted, then cancelled synchronously,
        // so the listeners can be closed now and a client that connects
        // after the "draining" line is refused (once the master and the
        // other workers closed theirs too). Where the synchronous cancel is
        // not available (before 6.0), the accept is cancelled like any
        // request and its listener closed at its last completion.
        let submitted = self.submit_all();
        let was = self.accepting;
        self.accepting = Accepting::Closed;
        self.gate.cell().set_taking(Taking::No);
        if self.balance.doorbell().is_some() {
            let e = opcode::AsyncCancel::new(ud(KIND_DOORBELL, 0))
                .build()
                .user_data(ud(KIND_IGNORE, 0));
            self.push(e);
        }
        for i in 0..self.listeners.len() {
            if !self.accept_armed[i] {
                self.listeners[i] = None;
                continue;
            }
            let timeout = types::Timespec::new().sec(1);
            let cancel = types::CancelBuilder::user_data(ud(KIND_ACCEPT, i));
            match self
                .ring
                .submitter()
                .register_sync_cancel(Some(timeout), cancel)
            {
                Ok(()) => self.listeners[i] = None,
                // Not in flight: it has completed (its completion, still to
                // be handled, needs no listener). Only if nothing is left
                // unsubmitted: an accept still in the submission queue is
                // not found either, and would run later on a closed
                // descriptor, or on a new socket that reuses the number; it
                // is then left to end like any request (cancelled below,
                // or already by the pause), its listener closed at its last
                // completion.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && submitted => {
                    self.listeners[i] = None;
                }
                Err(e) => {
                    log::debug!("synchronous cancel: {e}");
                    if was == Accepting::On {
                        let e = opcode::AsyncCancel::new(ud(KIND_ACCEPT, i))
                            .build()
                            .user_data(ud(KIND_IGNORE, 0));
                        self.push(e);
                    }
                }
            }
        }
        log::info!("draining {} connections", self.open + self.parked.len());
    }

    /// Takes a connection the kernel accepted (by a request or by the
    /// rescue): served if there is room; at `max_connections` refused or
    /// parked as `overload` says, and accepting paused for `"wait"`.
    /// `balanced`: pass if this worker is now ahead.
    fn accepted(&mut self, stream: TcpStream, balanced: bool) {
        if self.open < self.config.max_connections {
            self.admit(stream);
            if balanced
                && self.accepting == Accepting::On
                && self.balance.ahead(self.open, self.now)
            {
                // Leave the next ones to the others (see the epoll
                // worker's accept_from), and always ring, unlike the epoll
                // worker: an accept request cancelled by the pass may have
                // taken the wake-up of a connection that is still queued,
                // and the others would hear of it only at their next
                // accept or tick.
                self.pause_accepting(Accepting::Passing(self.now + PASS_MS));
                self.balance.ring();
                return;
            }
        } else if self.config.overload == Overload::Reject {
            self.gate.refuse_overload(stream, self.now);
        } else {
            self.parked.push_back(stream);
        }
        if self.open >= self.config.max_connections && self.config.overload == Overload::Wait {
            self.pause_accepting(Accepting::Full);
        }
    }

    /// Applies the admission rules (see [`Gate`]), then serves the
    /// connection or closes it at once.
    fn admit(&mut self, stream: TcpStream) {
        if let Some(key) = self.gate.admit(&stream, None, self.now) {
            self.add_conn(stream, key);
        }
    }

    fn add_conn(&mut self, stream: TcpStream, ip: IpKey) {
        crate::listener::tune_accepted(&stream);
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("connection from {}", peer_of(&stream));
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        self.conns[idx] = Some(Conn {
            stream,
            ip,
            activity: Activity::new(self.now),
            recv_armed: false,
            front: None,
            sent: 0,
            waiting: None,
            drained: false,
            send_at: 0,
            reclaim: false,
            eof: false,
            closed: false,
        });
        self.open += 1;
        self.gate.cell().set_open(self.open);
        self.arm_recv(idx);
        self.gate.served();
    }

    // --- moving bytes ----------------------------------------------------

    /// Arms connection `idx`'s receive: one request, one buffer at most.
    fn arm_recv(&mut self, idx: usize) {
        let buf_len = self.bufs.buf_len as u32;
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        c.recv_armed = true;
        let poll_first = if c.drained {
            IORING_RECVSEND_POLL_FIRST
        } else {
            0
        };
        let e = opcode::Recv::new(
            types::Fd(c.stream.as_raw_fd()),
            std::ptr::null_mut(),
            buf_len,
        )
        .buf_group(BGID)
        .ioprio(poll_first)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(ud(KIND_RECV, idx));
        self.push(e);
    }

    /// Arms the receive again if none is in flight and the connection may
    /// take more: while nothing waits behind the send in flight and at
    /// most `buffer_size` bytes are unsent, so that it holds two buffers'
    /// worth at most; else nothing until a send completes. Waits for
    /// buffers if the ring is empty.
    fn rearm(&mut self, idx: usize) {
        let Some(Some(c)) = self.conns.get(idx) else {
            return;
        };
        if c.closed || c.eof || c.recv_armed {
            return;
        }
        let unsent = c.front.as_ref().map_or(0, |f| f.len() - c.sent);
        if c.waiting.is_some() || unsent > self.config.buffer_size {
            return;
        }
        if self.bufs.free == 0 {
            self.starved.push(idx);
            return;
        }
        self.arm_recv(idx);
    }

    /// Sends what is left of connection `idx`'s front chunk.
    fn send_front(&mut self, idx: usize) {
        let now = self.now;
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        let buf = match &c.front {
            Some(Chunk::Ring { bid, len }) => &self.bufs.buf(*bid)[c.sent..*len as usize],
            Some(Chunk::Own(v)) => &v[c.sent..],
            None => return,
        };
        // At most `2 * buffer_size` (an own copy, see `spill`): far below
        // 4 GiB.
        let e = opcode::Send::new(
            types::Fd(c.stream.as_raw_fd()),
            buf.as_ptr(),
            buf.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(KIND_SEND, idx));
        c.send_at = now;
        self.push(e);
    }

    fn on_recv(&mut self, idx: usize, res: i32, flags: u32) {
        // Whatever the result, a completion that names a buffer took it
        // out of the ring: it is the worker's now, to echo or give back.
        let picked = cqueue::buffer_select(flags);
        if let Some(bid) = picked {
            self.bufs.take(bid, idx);
            self.reclaimed = None;
        }
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            if let Some(bid) = picked {
                self.bufs.give(bid);
            }
            return;
        };
        // One-shot: this completion is the receive's last.
        c.recv_armed = false;
        match (res, picked) {
            (1.., Some(bid)) if !c.closed => {
                c.activity.moved(self.now);
                c.drained = (res as usize) < self.bufs.buf_len && !cqueue::sock_nonempty(flags);
                let chunk = Chunk::Ring {
                    bid,
                    len: res as u32,
                };
                if c.front.is_none() {
                    // The hot path: echoed straight from the ring buffer.
                    c.front = Some(chunk);
                    c.sent = 0;
                    self.send_front(idx);
                } else {
                    // `rearm` armed this receive only with nothing waiting.
                    debug_assert!(c.waiting.is_none());
                    c.waiting = Some(chunk);
                }
            }
            (1.., None) => {
                // A receive with buffer selection always names its buffer;
                // without one the bytes cannot be echoed: close (and go on
                // to `settle` below, which frees the slot once it can).
                if !c.closed {
                    self.close(idx, Close::Error(libc::EIO));
                }
            }
            _ => {
                if let Some(bid) = picked {
                    self.bufs.give(bid);
                }
                if res == 0 {
                    c.eof = true;
                    if !c.closed && c.front.is_none() {
                        self.close(idx, Close::Done);
                    }
                } else if res < 0 {
                    match -res {
                        libc::ECANCELED => {}
                        // Out of ring buffers: armed again once some are
                        // back (the tail below, or the loop's `starved`).
                        libc::ENOBUFS => {}
                        errno => {
                            if !c.closed {
                                self.close(idx, close_reason(errno));
                            }
                        }
                    }
                }
            }
        }
        // The receive ended: armed again here if the connection may take
        // more (else when a send completes, or, out of buffers, when some
        // are back).
        self.rearm(idx);
        self.settle(idx);
    }

    fn on_send(&mut self, idx: usize, res: i32) {
        let now = self.now;
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        let Some(front) = c.front.take() else {
            return;
        };
        let reclaim = std::mem::take(&mut c.reclaim);
        let done = match res {
            1.. => res as usize,
            // Nothing sent: interrupted, or cancelled by `reclaim` (a send
            // without MSG_WAITALL that sent part completes with that part
            // at once, so a cancelled one sent nothing).
            _ if matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) => 0,
            _ => {
                self.bufs.give_chunk(&front);
                if !c.closed {
                    let why = if res == 0 {
                        Close::Reset
                    } else {
                        close_reason(-res)
                    };
                    self.close(idx, why);
                }
                self.settle(idx);
                return;
            }
        };
        if c.closed {
            self.bufs.give_chunk(&front);
            self.settle(idx);
            return;
        }
        if done > 0 {
            c.activity.moved(now);
        }
        c.sent += done;
        if c.sent < front.len() {
            c.front = Some(front);
        } else {
            self.bufs.give_chunk(&front);
            c.sent = 0;
            c.front = c.waiting.take();
        }
        if reclaim {
            self.spill(idx, true);
        }
        let Some(Some(c)) = self.conns.get(idx) else {
            return;
        };
        if c.front.is_some() {
            self.send_front(idx);
        } else if c.eof {
            self.close(idx, Close::Done);
            self.settle(idx);
        } else {
            self.rearm(idx);
        }
    }

    /// Copies what connection `idx` holds in ring buffers into memory of
    /// its own, and gives the ring buffers back: the chunk that waits
    /// behind the send in flight, and with `front` (whose send must not be
    /// in flight) what is left of the front chunk too, joined with the
    /// waiting chunk into one. The copy goes where the data was: at the
    /// front, or behind the send in flight.
    fn spill(&mut self, idx: usize, front: bool) {
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        if !front {
            if let Some(Chunk::Ring { bid, len }) = c.waiting {
                c.waiting = Some(Chunk::Own(self.bufs.buf(bid)[..len as usize].to_vec()));
                self.bufs.give(bid);
            }
            return;
        }
        // Nothing waits behind an empty front.
        let Some(head) = c.front.take() else {
            return;
        };
        let from = std::mem::take(&mut c.sent);
        let tail = c.waiting.take();
        let mut own = Vec::with_capacity(head.len() - from + tail.as_ref().map_or(0, Chunk::len));
        self.bufs.copy_out(head, from, &mut own);
        if let Some(tail) = tail {
            self.bufs.copy_out(tail, 0, &mut own);
        }
        // A front chunk always has bytes left to send (see `on_send`).
        debug_assert!(!own.is_empty());
        c.front = Some(Chunk::Own(own));
    }

    /// Takes ring buffers back when few are free, so that connections that
    /// hold them (clients that do not read) cannot starve the others: what
    /// waits behind a send is copied now ([`Self::spill`]); a send from a
    /// ring buffer that has been in flight for [`STUCK_SEND_MS`] (its
    /// client is not reading, or slowly) is cancelled, and what it has
    /// left is copied at its completion. (Counted in loop turns, a bulk
    /// stream whose client reads would be cancelled too: a turn ends at
    /// the first completion of any connection.)
    fn reclaim(&mut self) {
        let (mut spilled, mut cancelled) = (0, 0);
        // By buffer: a connection that holds two comes up twice, and the
        // second time finds nothing left to do (what waited is copied
        // already; its send was marked the first time, or is not stuck).
        for bid in 0..self.bufs.owner.len() {
            let idx = self.bufs.owner[bid];
            if idx == NO_OWNER {
                continue;
            }
            let Some(Some(c)) = self.conns.get_mut(idx) else {
                continue;
            };
            if c.closed {
                // Its send fails at once (shut down); nothing waits.
                continue;
            }
            if matches!(c.waiting, Some(Chunk::Ring { .. })) {
                spilled += 1;
                self.spill(idx, false);
            }
            let Some(Some(c)) = self.conns.get_mut(idx) else {
                continue;
            };
            let stuck = self.now.saturating_sub(c.send_at) >= STUCK_SEND_MS;
            if matches!(c.front, Some(Chunk::Ring { .. })) && !c.reclaim && stuck {
                c.reclaim = true;
                cancelled += 1;
                let e = opcode::AsyncCancel::new(ud(KIND_SEND, idx))
                    .build()
                    .user_data(ud(KIND_IGNORE, 0));
                self.push(e);
            }
        }
        if spilled + cancelled > 0 {
            log::debug!(
                "receive buffers low ({} of {} free after copying): copied what waited \
                 on {spilled} connections, cancelled {cancelled} stuck sends",
                self.bufs.free,
                self.bufs.entries,
            );
        }
        self.reclaimed = Some(self.now);
    }

    /// Closes connection `idx` as far as the client is concerned: its
    /// receive is cancelled, a stuck send is made to fail, its slot in the
    /// count is released; the descriptor goes once nothing is in flight.
    fn close(&mut self, idx: usize, why: Close) {
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        if c.closed {
            return;
        }
        c.closed = true;
        match why {
            Close::Error(errno) => log::info!(
                "connection from {}: {}; closed",
                peer_of(&c.stream),
                io::Error::from_raw_os_error(errno)
            ),
            _ => {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!("connection from {} closed ({why:?})", peer_of(&c.stream));
                }
            }
        }
        let ip = c.ip;
        if c.front.is_some() {
            // A plain shutdown(2), not a ring request. The kernel always
            // runs a shutdown request on an io-wq thread, later; before
            // 6.10 it took its reference to the socket at submission, but
            // since 6.10 it looks the descriptor number up only when the
            // io-wq thread runs (measured on 6.18: submit a shutdown, close
            // the descriptor, open a socket that gets the same number: the
            // new socket was the one shut down in 31 of 200 tries). By then
            // the send could have completed, the descriptor been closed and
            // its number reused by a new connection, which the late
            // shutdown would cut. shutdown(2) acts at once, on this socket,
            // and costs no io-wq thread.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(chunk) = c.waiting.take() {
            self.bufs.give_chunk(&chunk);
        }
        if c.recv_armed {
            let e = opcode::AsyncCancel::new(ud(KIND_RECV, idx))
                .build()
                .user_data(ud(KIND_IGNORE, 0));
            self.push(e);
        }
        self.gate.release(ip);
        self.open -= 1;
        self.gate.cell().set_open(self.open);
        while self.open < self.config.max_connections {
            let Some(s) = self.parked.pop_front() else {
                break;
            };
            self.admit(s);
        }
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

    /// Frees the slot of a closed connection once none of its requests is
    /// in flight, closing its descriptor through the ring.
    fn settle(&mut self, idx: usize) {
        let Some(Some(c)) = self.conns.get(idx) else {
            return;
        };
        if !(c.closed && !c.recv_armed && c.front.is_none()) {
            return;
        }
        let Some(c) = self.conns[idx].take() else {
            return;
        };
        let fd = c.stream.into_raw_fd();
        let e = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(ud(KIND_IGNORE, 0));
        self.push(e);
        self.free.push(idx);
    }

    fn close_idle(&mut self) {
        let limit = self.config.idle_timeout.as_millis() as u64;
        if limit == 0 {
            return;
        }
        for idx in 0..self.conns.len() {
            let Some(c) = self.conns[idx].as_mut() else {
                continue;
            };
            // A send in flight: its client may be taking what the socket
            // holds, slowly, with the send not completing for longer than
            // idle_timeout. The bytes it took since the last scan are
            // activity (see crate::acked).
            if !c.closed && c.front.is_some() {
                c.activity.look(&c.stream, self.now);
            }
            if !c.closed && self.now.saturating_sub(c.activity.last()) >= limit {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!(
                        "connection from {} idle for {} ms; closing",
                        peer_of(&c.stream),
                        self.now.saturating_sub(c.activity.last())
                    );
                }
                self.close(idx, Close::Done);
                self.settle(idx);
            }
        }
    }
}

fn close_reason(errno: i32) -> Close {
    match errno {
        libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED | libc::ETIMEDOUT => Close::Reset,
        e => Close::Error(e),
    }
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

    #[test]
    fn copy_out_takes_the_rest_of_a_chunk_and_gives_its_buffer_back() {
        let mut bufs = BufRing::new(1024).unwrap();
        let entries = bufs.entries as usize;
        assert_eq!(bufs.free, entries);
        bufs.take(3, 7);
        let at = 3 * bufs.buf_len;
        bufs.data[at..at + 5].copy_from_slice(b"hello");
        let mut own = Vec::new();
        bufs.copy_out(Chunk::Ring { bid: 3, len: 5 }, 2, &mut own);
        assert_eq!(own, b"llo");
        assert_eq!(bufs.owner[3], NO_OWNER);
        assert_eq!(bufs.free, entries);
        bufs.copy_out(Chunk::Own(b"abc".to_vec()), 1, &mut own);
        assert_eq!(own, b"llobc");
        assert_eq!(bufs.free, entries);
    }
}
