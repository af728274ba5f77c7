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
//! - each connection has a **multishot receive** that picks a buffer from a
//!   **provided-buffer ring** (`buffer_size` bytes each) shared by all
//!   connections: one completion per message, no request per message;
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
//! completion and its send request ride on the loop turn's one
//! `io_uring_enter`, shared with every other connection that was busy.
//!
//! ## Backpressure
//! One send per connection is in flight at a time (two sends on one socket
//! may complete out of order). Data that arrives meanwhile waits, in ring
//! buffers, behind it; once `buffer_size` bytes wait, the connection's
//! receive is cancelled, and armed again once everything is sent. So a
//! client that does not read holds at most the in-flight buffer, the
//! queued `buffer_size` bytes and what the cancel lets through: about two
//! buffers, against one with epoll.
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

use crate::config::{Config, Overload};
use crate::echo::Close;
use crate::listener::Listener;
use crate::process::exit_code;
use crate::scoreboard::{now_ms, IpKey, Taking};
use crate::signals::SignalPipe;
use crate::worker::{
    on_signal, tick_ms, Accepting, Balance, BusyPoll, Gate, Seat, Signaled, PASS_MS,
};

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

/// The ring of buffers the kernel picks from for multishot receives.
///
/// Invariant: `entries` is a power of two; `data` holds `entries` buffers of
/// `buf_len` bytes; the kernel owns the buffers that are in the ring
/// (`free` of them), the worker owns the others (being sent or queued).
struct BufRing {
    ring: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    entries: u16,
    tail: u16,
    data: Vec<u8>,
    buf_len: usize,
    free: usize,
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
        };
        for bid in 0..entries as u16 {
            b.give(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Hands buffer `bid` back to the kernel (visible at [`Self::publish`]).
    fn give(&mut self, bid: u16) {
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
    /// multishot receives (6.0), which no setup flag or probe reports:
    /// the ring is built with `IORING_SETUP_SINGLE_ISSUER`, also 6.0, so
    /// that an older kernel refuses it here rather than fail every receive
    /// with `EINVAL` later. `IORING_SETUP_DEFER_TASKRUN` (6.1) is used
    /// where there is.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// The multishot receive is in flight.
    Armed,
    /// Cancelled; its last completion has not arrived yet.
    Stopping,
    /// Not in flight.
    Off,
}

/// One client connection.
///
/// Invariant: `queued` is the sum of the lengths in `queue`; `sending`
/// and `queue` hold ring buffers the worker owns.
struct Conn {
    stream: TcpStream,
    ip: IpKey,
    last_active: u64,
    recv: Recv,
    /// The send in flight: buffer id, bytes already sent, bytes in all.
    sending: Option<(u16, u32, u32)>,
    /// Buffers received while a send was in flight, in order.
    queue: VecDeque<(u16, u32)>,
    queued: usize,
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
    now: u64,
    busy: BusyPoll,
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
        now: now_ms(),
        busy: BusyPoll::new(config),
        signal_fd: signals.as_fd().as_raw_fd(),
    };
    log::debug!("io_uring worker: {} receive buffers", w.bufs.entries);
    w.arm_signals();
    w.arm_doorbell();
    w.resume_or_log();
    w.run(signals)
}

impl Worker<'_> {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every request points at memory that outlives it: ring
        // buffers (owned by `bufs`, alive as long as the ring) or nothing.
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
    /// and waits up to `wait_ms` for a completion, or, while busy polling,
    /// does not wait: `submit()` then asks the kernel to run the deferred
    /// completions (`IORING_ENTER_GETEVENTS`) when `IORING_SQ_TASKRUN`
    /// says there are some, and returns.
    fn enter(&mut self, wait_ms: u64) -> io::Result<usize> {
        if self.busy.polling() {
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
            match self.enter(self.accepting.wait_ms(self.now, next_scan)) {
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
                    KIND_RECV => self.on_recv(idx, res, flags),
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
                libc::EMFILE | libc::ENFILE => {
                    let pause = self.gate.out_of_descriptors(&e, self.now, self.open);
                    self.pause_accepting(pause);
                }
                libc::EINVAL | libc::EOPNOTSUPP => {
                    log::error!("accept: {e}; exiting");
                    return Err(exit_code::FAILURE);
                }
                _ => log::debug!("accept: {e}"),
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
    /// wait 10 s). epoll does not have that problem: its exclusive
    /// wake-ups only go to a worker blocked in `epoll_wait`. This bounds
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
        if self.open + self.parked.len() >= self.config.max_connections {
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
        if self.accepting == Accepting::On {
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
        let _ = stream.set_nodelay(true);
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
            last_active: self.now,
            recv: Recv::Off,
            sending: None,
            queue: VecDeque::new(),
            queued: 0,
            eof: false,
            closed: false,
        });
        self.open += 1;
        self.gate.cell().set_open(self.open);
        self.arm_recv(idx);
        self.gate.served();
    }

    // --- moving bytes ----------------------------------------------------

    fn arm_recv(&mut self, idx: usize) {
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        let fd = c.stream.as_raw_fd();
        c.recv = Recv::Armed;
        let e = opcode::RecvMulti::new(types::Fd(fd), BGID)
            .build()
            .user_data(ud(KIND_RECV, idx));
        self.push(e);
    }

    /// Arms the receive again if the connection is idle and reading is
    /// what it should do next; waits for buffers if the ring is empty.
    fn rearm(&mut self, idx: usize) {
        let Some(Some(c)) = self.conns.get(idx) else {
            return;
        };
        if c.closed || c.eof || c.recv != Recv::Off || c.sending.is_some() {
            return;
        }
        if self.bufs.free == 0 {
            self.starved.push(idx);
            return;
        }
        self.arm_recv(idx);
    }

    fn send(&mut self, idx: usize, bid: u16, off: u32, len: u32) {
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        c.sending = Some((bid, off, len));
        let fd = c.stream.as_raw_fd();
        let buf = &self.bufs.buf(bid)[off as usize..len as usize];
        let e = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(KIND_SEND, idx));
        self.push(e);
    }

    fn on_recv(&mut self, idx: usize, res: i32, flags: u32) {
        let now = self.now;
        let limit = self.config.buffer_size;
        // Whatever the result, a completion that names a buffer took it
        // out of the ring: it is the worker's now, to echo or give back.
        let picked = cqueue::buffer_select(flags);
        if picked.is_some() {
            self.bufs.free -= 1;
        }
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            if let Some(bid) = picked {
                self.bufs.give(bid);
            }
            return;
        };
        if !cqueue::more(flags) {
            c.recv = Recv::Off;
        }
        if res <= 0 {
            if let Some(bid) = picked {
                self.bufs.give(bid);
            }
        }
        if res > 0 {
            let Some(bid) = picked else {
                // A receive with buffer selection always names its buffer;
                // without one the bytes cannot be echoed: close (and go on
                // to `settle` below, which frees the slot once it can).
                if !c.closed {
                    self.close(idx, Close::Error(libc::EIO));
                }
                self.settle(idx);
                return;
            };
            if c.closed {
                self.bufs.give(bid);
            } else {
                c.last_active = now;
                if c.sending.is_none() {
                    self.send(idx, bid, 0, res as u32);
                } else {
                    c.queue.push_back((bid, res as u32));
                    c.queued += res as usize;
                    if c.queued >= limit && c.recv == Recv::Armed {
                        c.recv = Recv::Stopping;
                        let e = opcode::AsyncCancel::new(ud(KIND_RECV, idx))
                            .build()
                            .user_data(ud(KIND_IGNORE, 0));
                        self.push(e);
                    }
                }
            }
        } else if res == 0 {
            c.eof = true;
            if !c.closed && c.sending.is_none() {
                self.close(idx, Close::Done);
            }
        } else {
            match -res {
                libc::ECANCELED => {}
                // Out of ring buffers: the tail below arms it again once
                // some are back.
                libc::ENOBUFS => {}
                errno => {
                    if !c.closed {
                        self.close(idx, close_reason(errno));
                    }
                }
            }
        }
        // A receive that ended (cancelled for backpressure after the
        // queue drained, out of buffers, ended by the kernel) while the
        // connection is idle is armed again here.
        self.rearm(idx);
        self.settle(idx);
    }

    fn on_send(&mut self, idx: usize, res: i32) {
        let Some(Some(c)) = self.conns.get_mut(idx) else {
            return;
        };
        let Some((bid, off, len)) = c.sending.take() else {
            return;
        };
        if c.closed {
            self.bufs.give(bid);
            self.settle(idx);
            return;
        }
        if res < 0 && matches!(-res, libc::EINTR | libc::EAGAIN) {
            self.send(idx, bid, off, len);
            return;
        }
        if res <= 0 {
            self.bufs.give(bid);
            let why = if res == 0 {
                Close::Reset
            } else {
                close_reason(-res)
            };
            self.close(idx, why);
            self.settle(idx);
            return;
        }
        c.last_active = self.now;
        let off = off + res as u32;
        if off < len {
            self.send(idx, bid, off, len);
            return;
        }
        self.bufs.give(bid);
        if let Some((next, n)) = c.queue.pop_front() {
            c.queued -= n as usize;
            self.send(idx, next, 0, n);
        } else if c.eof {
            self.close(idx, Close::Done);
            self.settle(idx);
        } else {
            self.rearm(idx);
        }
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
        let recv = c.recv;
        let sending = c.sending.is_some();
        if sending {
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
        let queue = std::mem::take(&mut c.queue);
        c.queued = 0;
        if recv == Recv::Armed {
            c.recv = Recv::Stopping;
        }
        for (bid, _) in queue {
            self.bufs.give(bid);
        }
        if recv == Recv::Armed {
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
        if !(c.closed && c.recv == Recv::Off && c.sending.is_none()) {
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
            let Some(c) = self.conns[idx].as_ref() else {
                continue;
            };
            if !c.closed && self.now.saturating_sub(c.last_active) >= limit {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!(
                        "connection from {} idle for {} ms; closing",
                        peer_of(&c.stream),
                        self.now.saturating_sub(c.last_active)
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
