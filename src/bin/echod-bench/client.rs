//! One client thread: an epoll loop over its share of the connections.
//!
//! Runs in: each of the `-t` client threads of `echod-bench`. Owns one epoll
//! descriptor and the sockets of its connections (non-blocking, close-on-exec,
//! `TCP_NODELAY`); no signals (the Rust runtime ignores `SIGPIPE`, so a write
//! to a reset connection returns `EPIPE`).
//!
//! Level-triggered on purpose: a connection stays registered for `EPOLLIN`
//! for its whole life and gains `EPOLLOUT` only while a write is incomplete
//! (in stream mode, which always has more to write, for its whole life). With
//! level triggering one read per wake-up is enough, since data left in the
//! socket reports again at the next `epoll_wait`: no connection starves the
//! others and no read is spent just to see `EAGAIN`, the one extra syscall per
//! echo that edge triggering would cost. Closing a socket removes it from the
//! epoll set (its only descriptor goes), so retiring costs no `epoll_ctl`.
//!
//! Connection `k` of thread `i` is number `i + k·threads` of the run: its
//! byte stream (see `payload`) differs from every other's.
//!
//! The end of a timed run (pingpong, stream, connrate) is a drain: at
//! `measure_end` no message, stream write or connection starts any more,
//! but the loop goes on until every byte already sent has been echoed and
//! verified, or its connection has timed out (and is counted as a timeout).
//! Without it, a server that stops echoing less than the timeout before the
//! end would pass with its last bytes never checked. What completes during
//! the drain is verified but not counted: the rate is the work completed
//! inside the interval over the interval, and the latency histogram holds
//! exactly the messages (connections) the rate counts. A window of
//! completions is, in a steady run, as representative as a window of
//! starts: it leaves out the messages sent before the end that finish
//! after it, and takes in those sent before the start that finish inside.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cli::Mode;
use crate::payload::{EchoCheck, Pattern, Violation};
use crate::stats::{Latency, Tally};

/// What every thread of one run shares read-only.
pub struct Plan {
    pub mode: Mode,
    pub addr: SocketAddr,
    pub length: usize,
    pub timeout: Duration,
    pub seed: u64,
    pub threads: usize,
    /// Work completed in `[measure_start, measure_end)` is counted; at
    /// `measure_end` the timed modes stop starting work and drain (see the
    /// module header).
    pub measure_start: Instant,
    pub measure_end: Instant,
    /// Past this instant every thread stops, whatever is still in flight.
    /// Later than `measure_end` by more than the drain needs.
    pub deadline: Instant,
}

/// A thread's live counters for the progress line; one cache line each, so
/// threads never write to a line another thread writes.
#[repr(align(64))]
#[derive(Default)]
pub struct Progress {
    /// Measured messages (bytes in stream mode).
    pub done: AtomicU64,
    pub errors: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

/// Coordination between the client threads and the main thread.
pub struct Shared {
    pub progress: Vec<Progress>,
    /// Threads whose loop has ended.
    pub finished: AtomicUsize,
    /// Hold mode: threads that have opened and proven their whole share.
    pub opened: AtomicUsize,
    /// Hold mode: set by the main thread when the idle time is over.
    pub recheck: AtomicBool,
}

impl Shared {
    pub fn new(threads: usize) -> Shared {
        Shared {
            progress: (0..threads).map(|_| Progress::default()).collect(),
            finished: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            recheck: AtomicBool::new(false),
        }
    }
}

/// What one thread hands back.
pub struct Outcome {
    pub tally: Tally,
    pub latency: Latency,
    /// Hold mode: connections proven when opened, and proven again after
    /// the idle time.
    pub proven: u64,
    pub held: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// The thread stopped at the hard deadline with work in flight.
    pub deadline_hit: bool,
    /// The loop itself failed (epoll); the counts are partial.
    pub fatal: Option<String>,
    pub stalls: Stalls,
}

/// Turns of the client's own loop that came round late: the thread was not
/// run (the machine was frozen or overloaded, or the process was stopped).
/// The time is not counted against the server: a connection's timeout
/// leaves it out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stalls {
    pub count: u64,
    pub longest: Duration,
}

impl Stalls {
    pub fn add(&mut self, d: Duration) {
        self.count += 1;
        self.longest = self.longest.max(d);
    }

    pub fn merge(&mut self, o: &Stalls) {
        self.count += o.count;
        self.longest = self.longest.max(o.longest);
    }
}

/// Connects in flight per thread while opening hold connections: enough to
/// keep the server busy, few enough not to overflow its accept backlog (a
/// dropped SYN is retried only after a second).
const HOLD_CONNECT_WINDOW: usize = 128;
/// How often timeouts are checked and progress is published.
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// The longest `epoll_wait`, so the loop notices the end of the interval.
const WAIT_MS: u16 = 10;
/// A loop turn longer than `WAIT_MS` by this much is a stall (see
/// [`Stalls`]): the turn's own work takes microseconds to milliseconds.
const STALL_MIN: Duration = Duration::from_millis(200);
/// Reads and writes move at most this much per syscall.
const MAX_IO: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A non-blocking connect is in progress (registered for `EPOLLOUT`).
    Connecting,
    /// Bytes are in flight: a message (pingpong, connrate, hold) or the
    /// stream.
    Echoing,
    /// Hold mode: proven and parked; nothing in flight.
    Idle,
    /// Hold mode: proven again after the idle time; finished.
    Held,
}

/// Why a connection was closed before its time.
#[derive(Debug)]
enum Failure {
    Connect(io::Error),
    Reset(io::Error),
    Closed {
        missing: u64,
    },
    Mismatch(Violation),
    /// No progress for the timeout; `detail` says where the bytes stood.
    Timeout {
        connecting: bool,
        detail: String,
    },
}

/// What happens to a connection after an event.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Keep,
    /// Its work is done (connrate): close it.
    Close,
}

struct Conn {
    stream: TcpStream,
    /// Its index in `Client::slots`, the epoll data of its events.
    slot: usize,
    check: EchoCheck,
    state: State,
    /// Stream offset where the current message ends: bytes below it are
    /// sent or to be sent, and the message is echoed when `received` reaches
    /// it. Unused in stream mode.
    msg_end: u64,
    /// When the connection (connrate) or the current message (pingpong,
    /// hold) began: the start of the latency recorded.
    began: Instant,
    /// The last progress (connect started or done, bytes read, message
    /// started); a connection waiting longer than the timeout fails.
    last: Instant,
    /// The events it is registered for now.
    interest: EpollFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldPhase {
    Opening,
    Idle,
    Recheck,
    Done,
}

pub struct Client<'a> {
    plan: &'a Plan,
    shared: &'a Shared,
    index: usize,
    /// Connections this thread keeps (pingpong, stream, connrate) or opens
    /// (hold).
    share: usize,
    epoll: Epoll,
    /// Connections by slot; `None` once retired.
    slots: Vec<Option<Conn>>,
    /// Connections started so far, for numbering.
    started: u64,
    /// Hold mode: connections in `Connecting` or `Echoing`.
    in_flight: usize,
    /// Connrate mode: slots whose connection has closed, to reconnect from
    /// the loop (not from `retire`, which would recurse).
    reopen: Vec<usize>,
    open: usize,
    hold: HoldPhase,
    /// A timed mode's interval is over: nothing new starts (in stream mode,
    /// no more writes), and the loop ends once nothing is outstanding.
    draining: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    tally: Tally,
    latency: Latency,
    proven: u64,
    held: u64,
    first_error: Option<String>,
    deadline_hit: bool,
    stalls: Stalls,
}

/// The failure of a connection that made no progress for the timeout, with
/// where its bytes stood: enough to tell a server that stopped reading (the
/// client's send queue is full) from one that read and did not echo.
fn timed_out(conn: &Conn) -> Failure {
    let connecting = conn.state == State::Connecting;
    let local = conn
        .stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut unsent: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int, the bytes in the socket's
    // send queue, to a valid pointer; the descriptor is the live socket.
    let rc = unsafe { libc::ioctl(conn.stream.as_raw_fd(), libc::TIOCOUTQ, &mut unsent) };
    let queued = if rc == 0 {
        format!("{unsent} in its send queue")
    } else {
        "send queue unknown".into()
    };
    let detail = format!(
        "{local}: {} bytes sent, {} echoed, {queued}",
        conn.check.sent(),
        conn.check.received()
    );
    Failure::Timeout { connecting, detail }
}

fn start_connect(addr: &SocketAddr) -> io::Result<(TcpStream, bool)> {
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    // Echo is latency-bound: a small message must leave at once.
    sock.set_tcp_nodelay(true)?;
    let connected = match sock.connect(&(*addr).into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((sock.into(), connected))
}

impl Outcome {
    /// The outcome of a thread that could not run its loop.
    pub fn failed(fatal: String) -> Outcome {
        Outcome {
            tally: Tally::default(),
            latency: Latency::new(),
            proven: 0,
            held: 0,
            first_error: None,
            deadline_hit: false,
            fatal: Some(fatal),
            stalls: Stalls::default(),
        }
    }
}

/// The body of client thread `index`, which drives `share` connections.
pub fn run_thread(plan: &Plan, shared: &Shared, index: usize, share: usize) -> Outcome {
    match Client::new(plan, shared, index, share) {
        Ok(client) => client.run(),
        Err(e) => {
            shared.finished.fetch_add(1, Ordering::AcqRel);
            Outcome::failed(format!("epoll_create1: {e}"))
        }
    }
}

impl<'a> Client<'a> {
    fn new(plan: &'a Plan, shared: &'a Shared, index: usize, share: usize) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let io_len = plan.length.clamp(1, MAX_IO);
        Ok(Client {
            plan,
            shared,
            index,
            share,
            epoll,
            slots: Vec::with_capacity(share),
            started: 0,
            in_flight: 0,
            reopen: Vec::new(),
            open: 0,
            hold: HoldPhase::Opening,
            draining: false,
            inbuf: vec![0; io_len.max(64 * 1024)],
            outbuf: vec![0; io_len],
            tally: Tally::default(),
            latency: Latency::new(),
            proven: 0,
            held: 0,
            first_error: None,
            deadline_hit: false,
            stalls: Stalls::default(),
        })
    }

    /// Runs the loop to the end of the interval (or of the hold sequence)
    /// and returns the counts.
    pub fn run(mut self) -> Outcome {
        let fatal = self.run_loop().err().map(|e| format!("epoll: {e}"));
        // Closing the sockets here, not at process exit, keeps the server's
        // view of the end of the run tidy.
        self.slots.clear();
        self.publish();
        self.shared.finished.fetch_add(1, Ordering::AcqRel);
        Outcome {
            tally: self.tally,
            latency: self.latency,
            proven: self.proven,
            held: self.held,
            first_error: self.first_error,
            deadline_hit: self.deadline_hit,
            fatal,
            stalls: self.stalls,
        }
    }

    fn run_loop(&mut self) -> nix::Result<()> {
        if self.plan.mode != Mode::Hold {
            for _ in 0..self.share {
                self.open(None, Instant::now());
            }
        }
        let mut events = vec![EpollEvent::empty(); 256];
        let mut next_scan = Instant::now();
        let wait = Duration::from_millis(WAIT_MS.into());
        let mut alive = Instant::now();
        loop {
            let n = match self.epoll.wait(&mut events, WAIT_MS) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(e),
            };
            alive = self.ran(alive, wait);
            for ev in &events[..n] {
                self.on_event(ev.data() as usize, ev.events());
            }
            // Checked again here, just before timeouts are judged, in case
            // the stall fell in the handling of the events.
            alive = self.ran(alive, Duration::ZERO);
            let now = alive;
            if now < self.plan.measure_end {
                // Taken, so a connect that fails at once waits for the next
                // round instead of spinning here.
                for slot in std::mem::take(&mut self.reopen) {
                    self.open(Some(slot), now);
                }
            }
            if !self.draining && self.plan.mode != Mode::Hold && now >= self.plan.measure_end {
                self.begin_drain();
            }
            if now >= self.plan.deadline {
                self.expire_all();
                return Ok(());
            }
            if now >= next_scan {
                self.expire(now);
                self.publish();
                next_scan = now + SCAN_EVERY;
            }
            let done = match self.plan.mode {
                Mode::Hold => self.step_hold(now),
                // Nothing left to drive once every connection has failed
                // (connrate reconnects instead, until the end).
                Mode::PingPong | Mode::Stream if self.open == 0 => true,
                Mode::PingPong | Mode::Stream | Mode::ConnRate => {
                    self.draining && !self.any_outstanding()
                }
            };
            if done {
                return Ok(());
            }
        }
    }

    fn publish(&self) {
        let p = &self.shared.progress[self.index];
        let done = match self.plan.mode {
            Mode::Stream => self.tally.bytes,
            _ => self.tally.messages,
        };
        p.done.store(done, Ordering::Relaxed);
        p.errors.store(self.tally.errors(), Ordering::Relaxed);
        p.open.store(self.open as u64, Ordering::Relaxed);
    }

    fn measuring(&self, now: Instant) -> bool {
        now >= self.plan.measure_start && now < self.plan.measure_end
    }

    /// Whether `conn` waits on the server: to finish its connect, or to
    /// echo bytes sent or still to send (the rest of a message begun). A
    /// connection that waits makes no progress for the timeout fails.
    fn outstanding(&self, conn: &Conn) -> bool {
        match conn.state {
            State::Connecting => true,
            State::Echoing if self.plan.mode == Mode::Stream => conn.check.outstanding() > 0,
            State::Echoing => conn.check.received() < conn.msg_end,
            State::Idle | State::Held => false,
        }
    }

    fn any_outstanding(&self) -> bool {
        self.slots.iter().flatten().any(|c| self.outstanding(c))
    }

    /// The end of the interval (timed modes): from now on no message,
    /// stream write or connection starts. Stream connections stop writing
    /// here (their `EPOLLOUT` goes); the others finish the message they
    /// have begun. The loop then runs until nothing is outstanding.
    fn begin_drain(&mut self) {
        self.draining = true;
        if self.plan.mode != Mode::Stream {
            return;
        }
        for slot in 0..self.slots.len() {
            let Some(mut conn) = self.slots[slot].take() else {
                continue;
            };
            let next = match conn.state {
                State::Echoing => self.write_pending(&mut conn).map(|()| Next::Keep),
                _ => Ok(Next::Keep),
            };
            self.settle(conn, next);
        }
    }

    /// Starts a connection in `slot` (a new slot when `None`).
    fn open(&mut self, slot: Option<usize>, now: Instant) {
        let number = self.index as u64 + self.started * self.plan.threads as u64;
        self.started += 1;
        let slot = slot.unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let (stream, connected) = match start_connect(&self.plan.addr) {
            Ok(s) => s,
            Err(e) => return self.open_failed(slot, e),
        };
        let mut conn = Conn {
            stream,
            slot,
            check: EchoCheck::new(Pattern::new(self.plan.seed, number)),
            state: State::Connecting,
            msg_end: 0,
            began: now,
            last: now,
            interest: EpollFlags::EPOLLOUT,
        };
        if let Err(e) = self
            .epoll
            .add(&conn.stream, EpollEvent::new(conn.interest, slot as u64))
        {
            return self.open_failed(slot, e.into());
        }
        self.open += 1;
        if self.plan.mode == Mode::Hold {
            self.in_flight += 1;
        }
        let next = if connected {
            self.connected(&mut conn, now)
        } else {
            Ok(Next::Keep)
        };
        self.settle(conn, next);
    }

    fn open_failed(&mut self, slot: usize, e: io::Error) {
        self.count_failure(Failure::Connect(e));
        if self.plan.mode == Mode::ConnRate {
            self.reopen.push(slot);
        }
    }

    /// Puts a connection back in its slot, or retires it.
    fn settle(&mut self, conn: Conn, next: Result<Next, Failure>) {
        match next {
            Ok(Next::Keep) => {
                let slot = conn.slot;
                self.slots[slot] = Some(conn);
            }
            Ok(Next::Close) => self.retire(conn, None),
            Err(f) => self.retire(conn, Some(f)),
        }
    }

    fn on_event(&mut self, slot: usize, flags: EpollFlags) {
        let Some(mut conn) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let next = self.serve(&mut conn, flags);
        self.settle(conn, next);
    }

    fn serve(&mut self, conn: &mut Conn, flags: EpollFlags) -> Result<Next, Failure> {
        if conn.state == State::Connecting {
            // EPOLLOUT, EPOLLERR or EPOLLHUP: the connect has finished, and
            // SO_ERROR says how (connect(2), EINPROGRESS).
            return match conn.stream.take_error() {
                Ok(None) if !flags.contains(EpollFlags::EPOLLHUP) => {
                    self.connected(conn, Instant::now())
                }
                Ok(None) => Err(Failure::Connect(io::Error::from(
                    io::ErrorKind::ConnectionRefused,
                ))),
                Ok(Some(e)) | Err(e) => Err(Failure::Connect(e)),
            };
        }
        let readable = EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        if flags.intersects(readable) && self.read_ready(conn)? == Next::Close {
            return Ok(Next::Close);
        }
        if flags.contains(EpollFlags::EPOLLOUT) && conn.state == State::Echoing {
            self.write_pending(conn)?;
        }
        Ok(Next::Keep)
    }

    fn connected(&mut self, conn: &mut Conn, now: Instant) -> Result<Next, Failure> {
        conn.state = State::Echoing;
        conn.last = now;
        match self.plan.mode {
            Mode::Stream => {}
            // The connection time counts from the connect.
            Mode::ConnRate => conn.msg_end = self.plan.length as u64,
            Mode::Hold => self.begin_message(conn, now),
            Mode::PingPong if now < self.plan.measure_end => self.begin_message(conn, now),
            // Connected during the drain: nothing to send, nothing awaited.
            Mode::PingPong => {}
        }
        self.write_pending(conn)?;
        Ok(Next::Keep)
    }

    fn begin_message(&self, conn: &mut Conn, now: Instant) {
        conn.msg_end += self.plan.length as u64;
        conn.began = now;
        conn.last = now;
    }

    /// Writes what is due: the rest of the current message, or one chunk of
    /// the stream (none once draining); then registers for `EPOLLOUT`
    /// exactly when something is left.
    fn write_pending(&mut self, conn: &mut Conn) -> Result<(), Failure> {
        let stream_mode = self.plan.mode == Mode::Stream;
        // A stream always has more to write, until the drain.
        let streaming = stream_mode && !self.draining;
        loop {
            let due = match (stream_mode, streaming) {
                (true, true) => self.outbuf.len(),
                (true, false) => 0,
                // `msg_end >= sent` (a message is never sent past its end).
                (false, _) => {
                    (conn.msg_end - conn.check.sent()).min(self.outbuf.len() as u64) as usize
                }
            };
            if due == 0 {
                break;
            }
            let buf = &mut self.outbuf[..due];
            conn.check.fill_next(buf);
            match (&conn.stream).write(buf) {
                Ok(0) => return Err(Failure::Reset(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    conn.check.record_sent(n);
                    // A short write means the send buffer is full; in stream
                    // mode one chunk per wake-up keeps reads interleaved.
                    if n < due || stream_mode {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Reset(e)),
            }
        }
        // In stream mode `msg_end` stays 0: nothing is unsent once draining.
        let unsent = streaming || conn.check.sent() < conn.msg_end;
        let mut want = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        if unsent {
            want |= EpollFlags::EPOLLOUT;
        }
        if want != conn.interest {
            conn.interest = want;
            let mut ev = EpollEvent::new(want, conn.slot as u64);
            self.epoll
                .modify(&conn.stream, &mut ev)
                .map_err(|e| Failure::Reset(e.into()))?;
        }
        Ok(())
    }

    /// Reads once (again while a read fills the whole buffer) and verifies.
    fn read_ready(&mut self, conn: &mut Conn) -> Result<Next, Failure> {
        loop {
            let n = match (&conn.stream).read(&mut self.inbuf) {
                // We never shut down our side, so an end of stream is always
                // the server's doing: early if anything was outstanding.
                Ok(0) => {
                    let missing = match conn.check.finish() {
                        Err(Violation::Short { missing }) => missing,
                        _ => 0,
                    };
                    return Err(Failure::Closed { missing });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Reset(e)),
            };
            conn.check
                .record_received(&self.inbuf[..n])
                .map_err(Failure::Mismatch)?;
            let now = Instant::now();
            conn.last = now;
            if self.plan.mode == Mode::Stream {
                if self.measuring(now) {
                    self.tally.bytes += n as u64;
                }
            } else if conn.check.received() == conn.msg_end {
                return self.echoed(conn, now);
            }
            if n < self.inbuf.len() {
                return Ok(Next::Keep);
            }
        }
    }

    /// A whole message has come back.
    fn echoed(&mut self, conn: &mut Conn, now: Instant) -> Result<Next, Failure> {
        let counted = self.plan.mode == Mode::Hold || self.measuring(now);
        if counted {
            self.tally.messages += 1;
            self.tally.bytes += self.plan.length as u64;
            if self.plan.mode != Mode::Hold {
                self.latency.record(now - conn.began);
            }
        }
        match self.plan.mode {
            Mode::ConnRate => Ok(Next::Close),
            Mode::Hold => {
                self.in_flight -= 1;
                match self.hold {
                    HoldPhase::Recheck => {
                        self.held += 1;
                        conn.state = State::Held;
                    }
                    _ => {
                        self.proven += 1;
                        conn.state = State::Idle;
                    }
                }
                Ok(Next::Keep)
            }
            _ => {
                if now < self.plan.measure_end {
                    self.begin_message(conn, now);
                    self.write_pending(conn)?;
                }
                Ok(Next::Keep)
            }
        }
    }

    fn count_failure(&mut self, failure: Failure) {
        let t = &mut self.tally;
        let text = match &failure {
            Failure::Connect(e) => {
                t.connect_errors += 1;
                format!("connect {}: {e}", self.plan.addr)
            }
            Failure::Reset(e) => {
                t.resets += 1;
                format!("connection failed: {e}")
            }
            Failure::Closed { missing } => {
                t.closed += 1;
                format!("server closed the connection ({missing} sent bytes not echoed)")
            }
            Failure::Mismatch(v) => {
                t.mismatches += 1;
                match v {
                    Violation::Mismatch { offset } => {
                        format!("echoed byte at stream offset {offset} differs from the byte sent")
                    }
                    Violation::Excess { offset } => {
                        format!("server sent bytes never sent to it (from stream offset {offset})")
                    }
                    Violation::Short { missing } => format!("{missing} bytes missing"),
                }
            }
            Failure::Timeout { connecting, detail } => {
                t.timeouts += 1;
                let what = if *connecting { "connect" } else { "echo" };
                format!("{what} timed out after {:?} ({detail})", self.plan.timeout)
            }
        };
        self.first_error.get_or_insert(text);
    }

    /// Closes a connection (dropping the socket removes it from epoll); in
    /// connrate mode its slot is queued for the next connection.
    fn retire(&mut self, conn: Conn, failure: Option<Failure>) {
        let slot = conn.slot;
        let was_waiting = matches!(conn.state, State::Connecting | State::Echoing);
        drop(conn);
        self.open -= 1;
        if let Some(f) = failure {
            self.count_failure(f);
        }
        match self.plan.mode {
            Mode::Hold if was_waiting => self.in_flight -= 1,
            Mode::ConnRate => self.reopen.push(slot),
            _ => {}
        }
    }

    /// Notes that the loop runs now, `since` being the last time it was
    /// known to run and `allowed` what it may legitimately have waited
    /// meanwhile; a gap longer than that by [`STALL_MIN`] was the client
    /// not running, not the server not answering: a stall. Returns now.
    fn ran(&mut self, since: Instant, allowed: Duration) -> Instant {
        let now = Instant::now();
        let gap = now.duration_since(since);
        if gap > allowed + STALL_MIN {
            self.stalled(gap - allowed);
        }
        now
    }

    /// Records a stall of `d` and moves every connection's last progress
    /// forward by it, so that the timeout counts only time the client ran.
    fn stalled(&mut self, d: Duration) {
        self.stalls.add(d);
        for c in self.slots.iter_mut().flatten() {
            c.last += d;
        }
    }

    /// Fails the connections that have waited longer than the timeout.
    fn expire(&mut self, now: Instant) {
        for slot in 0..self.slots.len() {
            let overdue = matches!(
                &self.slots[slot],
                Some(c) if self.outstanding(c)
                    && now.duration_since(c.last) > self.plan.timeout
            );
            if overdue {
                if let Some(conn) = self.slots[slot].take() {
                    let failure = timed_out(&conn);
                    self.retire(conn, Some(failure));
                }
            }
        }
    }

    /// At the hard deadline: whatever still waits has timed out.
    fn expire_all(&mut self) {
        for slot in 0..self.slots.len() {
            let waiting = matches!(&self.slots[slot], Some(c) if self.outstanding(c));
            if waiting {
                if let Some(conn) = self.slots[slot].take() {
                    self.deadline_hit = true;
                    let failure = timed_out(&conn);
                    self.retire(conn, Some(failure));
                }
            }
        }
        if self.plan.mode == Mode::Hold && self.hold != HoldPhase::Done {
            self.deadline_hit = true;
        }
    }

    /// Advances the hold sequence; true when it is over.
    fn step_hold(&mut self, now: Instant) -> bool {
        match self.hold {
            HoldPhase::Opening => {
                while self.in_flight < HOLD_CONNECT_WINDOW && (self.started as usize) < self.share {
                    self.open(None, now);
                }
                if self.started as usize == self.share && self.in_flight == 0 {
                    self.hold = HoldPhase::Idle;
                    self.publish();
                    self.shared.opened.fetch_add(1, Ordering::AcqRel);
                }
            }
            HoldPhase::Idle => {
                if self.shared.recheck.load(Ordering::Acquire) {
                    self.hold = HoldPhase::Recheck;
                    for slot in 0..self.slots.len() {
                        let Some(mut conn) = self.slots[slot].take() else {
                            continue;
                        };
                        if conn.state != State::Idle {
                            self.slots[slot] = Some(conn);
                            continue;
                        }
                        conn.state = State::Echoing;
                        self.in_flight += 1;
                        self.begin_message(&mut conn, now);
                        let next = self.write_pending(&mut conn).map(|()| Next::Keep);
                        self.settle(conn, next);
                    }
                }
            }
            HoldPhase::Recheck => {
                if self.in_flight == 0 {
                    self.hold = HoldPhase::Done;
                }
            }
            HoldPhase::Done => {}
        }
        self.hold == HoldPhase::Done
    }
}
