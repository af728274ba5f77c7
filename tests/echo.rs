//! RFC 862 echo, end to end: every byte a client sends comes back, in
//! order, nothing more, over IPv4 and IPv6, in both serving modes, under
//! many concurrent connections; `--single-process` serves with no child at
//! all; `busy_poll` keeps a worker polling after traffic, then lets it
//! sleep; and large messages go through the worker's pipe (`splice`),
//! small ones do not.
//!
//! The test process never forks: each connection gets a writer thread and a
//! reader thread, so a large payload cannot deadlock on full socket buffers.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

/// Concurrent connections per mode.
const CONNECTIONS: usize = 200;
/// The largest payload.
const MAX_PAYLOAD: usize = 8 << 20;
/// No single read or write may stall longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A small deterministic generator (xorshift64*), so failures reproduce
/// from the seed printed in the message.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    /// Log-uniform-ish in `1..=max`: small sizes as likely as large ones,
    /// so both one-byte and 256 KiB chunks occur.
    fn chunk(&mut self, max: usize) -> usize {
        let bits = self.range(0, 18);
        self.range(1, (1usize << bits).min(max).max(1))
    }
}

/// Payload sizes for one run: skewed so most are small and the total stays
/// between 20 and 50 MiB. Always includes 1 byte and exactly 8 MiB.
fn sizes(seed: u64) -> Vec<usize> {
    let mut r = Rng::new(seed);
    let mut v = vec![1, MAX_PAYLOAD];
    v.extend((0..4).map(|_| r.range(1 << 20, MAX_PAYLOAD)));
    v.extend((0..8).map(|_| r.range(64 << 10, 1 << 20)));
    while v.len() < CONNECTIONS {
        let bits = r.range(0, 16);
        v.push(r.range(1, 1 << bits));
    }
    // Spread the big ones over both address families.
    let n = v.len();
    for i in 0..n {
        let j = r.range(0, n - 1);
        v.swap(i, j);
    }
    v
}

/// Sends `data` in random chunks, then half-closes.
fn writer(mut s: TcpStream, data: Arc<Vec<u8>>, seed: u64) -> Result<(), String> {
    let mut r = Rng::new(seed ^ 0xA5A5);
    let mut off = 0;
    while off < data.len() {
        let n = r.chunk(data.len() - off);
        s.write_all(&data[off..off + n])
            .map_err(|e| format!("write at {off} of {}: {e}", data.len()))?;
        off += n;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown(WR): {e}"))
}

/// Reads in random chunk sizes, comparing as it goes; then expects end of
/// stream (echod closes after the client's FIN, with nothing extra).
fn reader(mut s: TcpStream, data: Arc<Vec<u8>>, seed: u64) -> Result<(), String> {
    let mut r = Rng::new(seed ^ 0x5A5A);
    let mut buf = vec![0u8; 1 << 18];
    let mut got = 0;
    while got < data.len() {
        let want = r.chunk(buf.len());
        let n = s
            .read(&mut buf[..want])
            .map_err(|e| format!("read after {got} of {} bytes: {e}", data.len()))?;
        if n == 0 {
            return Err(format!("end of stream after {got} of {} bytes", data.len()));
        }
        if got + n > data.len() {
            return Err(format!("{} bytes more than sent", got + n - data.len()));
        }
        if buf[..n] != data[got..got + n] {
            let at = (0..n).find(|&i| buf[i] != data[got + i]).unwrap_or(0);
            return Err(format!("byte {} of {} differs", got + at, data.len()));
        }
        got += n;
    }
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes more than sent")),
        Err(e) => Err(format!("no end of stream after the echo: {e}")),
    }
}

/// Opens `CONNECTIONS` connections alternating over `addrs`, then runs
/// every transfer at once (one writer and one reader thread each); returns
/// the failures, named by connection, address, size and seed.
fn echo_everything(addrs: &[SocketAddr], seed: u64) -> Vec<String> {
    let sizes = sizes(seed);
    let conns: Vec<(TcpStream, SocketAddr)> = (0..CONNECTIONS)
        .map(|i| {
            let a = addrs[i % addrs.len()];
            let s = connect(a);
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            (s, a)
        })
        .collect();
    let start = Arc::new(Barrier::new(2 * CONNECTIONS));
    let mut threads = Vec::new();
    for (i, (s, a)) in conns.into_iter().enumerate() {
        let len = sizes[i];
        let cseed = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let data = Arc::new(payload(cseed, len));
        let what = format!("connection {i} via {a} ({len} bytes, seed {cseed})");
        let r = s.try_clone().expect("clone stream");
        for (half, s) in [("writer", s), ("reader", r)] {
            let (start, data, what) = (Arc::clone(&start), Arc::clone(&data), what.clone());
            let t = std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || {
                    start.wait();
                    let res = if half == "writer" {
                        writer(s, data, cseed)
                    } else {
                        reader(s, data, cseed)
                    };
                    res.map_err(|e| format!("{what}, {half}: {e}"))
                })
                .expect("spawn thread");
            threads.push(t);
        }
    }
    threads
        .into_iter()
        .filter_map(|t| match t.join() {
            Ok(r) => r.err(),
            Err(_) => Some("a client thread panicked".to_string()),
        })
        .collect()
}

/// Runs the whole echo check against a daemon started with `extra` config.
fn echo_is_byte_exact(mode: &str, extra: &str, seed: u64) {
    let e = Echod::start(&format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n{extra}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n"
    ));
    let addrs = e.addrs();
    assert_eq!(addrs.len(), 2, "two listeners expected:\n{}", e.log());
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
    let total: usize = sizes(seed).iter().sum();
    let t0 = Instant::now();
    let failures = echo_everything(&addrs, seed);
    let took = t0.elapsed();
    assert!(
        failures.is_empty(),
        "{mode}: {} of {CONNECTIONS} connections failed (after {took:?}):\n{}\n--- echod log ---\n{}",
        failures.len(),
        failures.join("\n"),
        e.log()
    );
    eprintln!("{mode}: {CONNECTIONS} connections, {total} bytes, echoed in {took:?}");
    // Every connection is closed now: fork mode's children exit; prefork's
    // pool is intact (no worker crashed on the way).
    if mode == "fork" {
        assert!(
            wait_until(Duration::from_secs(10), || e.children().is_empty()),
            "connection children left: {:?}",
            e.children()
        );
    } else {
        assert_eq!(
            e.count_log("): spawned"),
            2,
            "a worker was respawned:\n{}",
            e.log()
        );
        assert_eq!(e.workers().len(), 2);
    }
    e.assert_no_errors();
}

/// `prefork_echo_is_byte_exact`: in prefork mode, 200 concurrent
/// connections over IPv4 and IPv6, payloads from 1 byte to 8 MiB sent and
/// read in random chunk sizes, each get back exactly what they sent, then
/// end of stream.
#[test]
fn prefork_echo_is_byte_exact() {
    echo_is_byte_exact("prefork", "mode = \"prefork\"\nworkers = 2", 1);
}

/// `prefork_io_uring_echo_is_byte_exact`: the same with the io_uring
/// worker, with small buffers so that messages span many ring buffers and
/// short sends and backpressure happen often.
#[test]
fn prefork_io_uring_echo_is_byte_exact() {
    echo_is_byte_exact(
        "prefork io_uring",
        "mode = \"prefork\"\nworkers = 2\nio = \"io_uring\"\nbuffer_size = 1024",
        3,
    );
}

/// `io_uring_refused_falls_back_to_epoll`: where the kernel refuses
/// io_uring (simulated), each worker says so in one line and serves with
/// epoll.
#[test]
fn io_uring_refused_falls_back_to_epoll() {
    let e = Start::config(
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\nio = \"io_uring\"\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
    )
    .env("ECHOD_TEST_NO_IO_URING", "1")
    .spawn();
    assert!(
        wait_until(Duration::from_secs(5), || e
            .count_log("io_uring unavailable")
            == 2),
        "{}",
        e.log()
    );
    for i in 0..4 {
        echo_once(e.addr(), &vec![i as u8; 3000]);
    }
    e.assert_no_errors();
}

/// `fork_echo_is_byte_exact`: the same in fork mode, one child per
/// connection (200 live children at once).
#[test]
fn fork_echo_is_byte_exact() {
    echo_is_byte_exact("fork", "mode = \"fork\"\nmax_connections = 1024", 2);
}

/// `single_process_serves_without_children`: `--single-process` echoes on
/// both address families from the one foreground process, which forks no
/// child at any point.
#[test]
fn single_process_serves_without_children() {
    let e = Start::config(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
    )
    .arg("--single-process")
    .spawn();
    assert!(
        e.wait_log("--single-process", Duration::from_secs(5)),
        "{}",
        e.log()
    );
    assert!(e.children().is_empty(), "children: {:?}", e.children());
    let addrs = e.addrs();
    assert_eq!(addrs.len(), 2, "{}", e.log());
    // Several connections at once, one of them large, so the one process
    // really multiplexes them.
    let mut held: Vec<TcpStream> = addrs.iter().cycle().take(6).map(|&a| connect(a)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        let p = payload(100 + i as u64, if i == 0 { 1 << 20 } else { 1000 + i });
        assert!(
            roundtrip(s, &p).expect("echo") == p,
            "connection {i} echo differs"
        );
        assert!(e.children().is_empty(), "children: {:?}", e.children());
    }
    for &a in &addrs {
        echo_once(a, b"single process\r\n");
    }
    assert!(e.children().is_empty(), "children: {:?}", e.children());
    assert!(
        !e.log().contains("starting generation"),
        "a master started:\n{}",
        e.log()
    );
    e.assert_no_errors();
}

/// Waits (up to 10 s) until `pid` has used no CPU for half a second, and
/// returns its CPU ticks then; `None` if it never settles.
fn settled_ticks(pid: i32) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = hostile::cpu_ticks(pid)?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = hostile::cpu_ticks(pid)?;
        if now == last {
            return Some(now);
        }
        last = now;
    }
    None
}

/// How many times `pid`'s main thread gave up its CPU to wait
/// (`voluntary_ctxt_switches` in `/proc/PID/status`): each sleep in
/// `epoll_wait` or `io_uring_enter` counts; being preempted by a busy
/// machine does not (that is `nonvoluntary_ctxt_switches`).
fn voluntary_switches(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// Messages the busy-poll tests send on one connection, [`BUSY_POLL_GAP`]
/// apart: far inside the 1 s window, far longer than a round trip.
const BUSY_POLL_MESSAGES: u64 = 30;
const BUSY_POLL_GAP: Duration = Duration::from_millis(20);

/// With `busy_poll = "1s"` on `io`, one worker: a client that sends a
/// message every 20 ms finds the worker polling, never sleeping, between
/// the messages: the worker's voluntary context switches do not grow
/// (three at most, for a client held up past the window by a busy
/// machine). The worker of a twin echod without `busy_poll` sleeps between
/// the messages (at least once per two), which shows that the count sees
/// the sleeps. Once the client is gone and the window has passed, the
/// polling worker sleeps again: its CPU time stops growing.
fn busy_poll(io: &str) {
    let cfg = |extra: &str| config(&format!("workers = 1\nio = \"{io}\"\n{extra}"));
    let polling = Echod::start(&cfg("busy_poll = \"1s\""));
    let sleeping = Echod::start(&cfg(""));
    // How many times the worker of `e` sleeps while serving the messages.
    let sleeps = |e: &Echod| -> u64 {
        let worker = e.workers()[0];
        let mut s = connect(e.addr());
        // The first echo (and the accept before it) opens the window.
        let hello = b"busy poll\r\n";
        assert!(
            roundtrip(&mut s, hello).expect("first echo") == hello,
            "{io}: the first echo differs"
        );
        let before = voluntary_switches(worker).expect("the worker's /proc status");
        for i in 0..BUSY_POLL_MESSAGES {
            std::thread::sleep(BUSY_POLL_GAP);
            let p = payload(i, 64);
            let back = roundtrip(&mut s, &p).unwrap_or_else(|err| panic!("{io}: echo {i}: {err}"));
            assert!(back == p, "{io}: echo {i} differs");
        }
        voluntary_switches(worker).expect("the worker's /proc status") - before
    };
    let (busy, idle) = (sleeps(&polling), sleeps(&sleeping));
    eprintln!(
        "{io}: over {BUSY_POLL_MESSAGES} messages {BUSY_POLL_GAP:?} apart the worker slept \
         {busy} times with busy_poll, {idle} times without"
    );
    assert!(
        idle >= BUSY_POLL_MESSAGES / 2,
        "{io}: without busy_poll the worker slept only {idle} times between \
         {BUSY_POLL_MESSAGES} messages {BUSY_POLL_GAP:?} apart: the count misses its sleeps"
    );
    assert!(
        busy <= 3,
        "{io}: with busy_poll the worker slept {busy} times between {BUSY_POLL_MESSAGES} \
         messages {BUSY_POLL_GAP:?} apart (without: {idle}): it did not poll"
    );
    // The connection closed a moment ago: the window passes and the worker
    // sleeps.
    let worker = polling.workers()[0];
    assert!(
        settled_ticks(worker).is_some(),
        "{io}: the worker kept running 10 s after its last connection"
    );
    for e in [&polling, &sleeping] {
        echo_once(e.addr(), b"still serving\r\n");
        e.assert_no_errors();
    }
}

/// `busy_poll_runs_then_sleeps_on_epoll`: see [`busy_poll`].
#[test]
fn busy_poll_runs_then_sleeps_on_epoll() {
    busy_poll("epoll");
}

/// `busy_poll_runs_then_sleeps_on_io_uring`: the same on the io_uring
/// worker.
#[test]
fn busy_poll_runs_then_sleeps_on_io_uring() {
    busy_poll("io_uring");
}

/// The `(echoed, through the pipe)` byte counts of the connections the
/// log says were closed after their client's end of stream.
fn closed_counts(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("closed (Done); ").nth(1)?;
            let (echoed, rest) = rest.split_once(" bytes echoed, ")?;
            let (spliced, _) = rest.split_once(" through the pipe")?;
            Some((echoed.parse().ok()?, spliced.parse().ok()?))
        })
        .collect()
}

/// `large_messages_go_through_the_pipe`: with `splice` on (the default),
/// a connection that sends 64 KiB messages has them echoed through the
/// worker's pipe (the close line, at debug level, counts the bytes); one
/// that sends 64-byte messages has them read and written; with `splice =
/// false` nothing goes through a pipe. Every byte comes back either way.
#[test]
fn large_messages_go_through_the_pipe() {
    for splice in [true, false] {
        let e = Echod::start(&format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 1\nsplice = {splice}\n\
             [log]\ntarget = \"stderr\"\nlevel = \"debug\"\n"
        ));
        let large = payload(11, 4 << 20);
        echo_once(e.addr(), &large);
        let mut s = connect(e.addr());
        for i in 0..100u8 {
            let msg = [i; 64];
            assert_eq!(roundtrip(&mut s, &msg).expect("small echo"), msg);
        }
        drop(s);
        assert!(
            wait_until(Duration::from_secs(10), || closed_counts(&e.log()).len()
                == 2),
            "splice = {splice}: no two close lines\n{}",
            e.log()
        );
        let counts = closed_counts(&e.log());
        let big = counts.iter().find(|c| c.0 == large.len() as u64);
        let small = counts.iter().find(|c| c.0 == 6400);
        let (Some(&(_, big_spliced)), Some(&(_, small_spliced))) = (big, small) else {
            panic!("splice = {splice}: counts {counts:?}\n{}", e.log());
        };
        if splice {
            // All but the first message of each run of large ones (read
            // to learn the size) and the copies of short sends.
            assert!(
                big_spliced >= large.len() as u64 / 2,
                "only {big_spliced} of {} bytes through the pipe",
                large.len()
            );
        } else {
            assert_eq!(big_spliced, 0);
        }
        assert_eq!(small_spliced, 0, "64-byte messages went through the pipe");
        e.assert_no_errors();
    }
}

/// `prefork_echo_without_splice_is_byte_exact`: the byte-exact check of
/// `prefork_echo_is_byte_exact` with `splice = false`, where large
/// messages are read and written like small ones.
#[test]
fn prefork_echo_without_splice_is_byte_exact() {
    echo_is_byte_exact(
        "prefork without splice",
        "mode = \"prefork\"\nworkers = 2\nsplice = false",
        4,
    );
}
