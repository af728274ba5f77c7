//! Helpers of the lifecycle tests: a load generator whose every byte is
//! checked, the parsing of echod's log (which pid belongs to which
//! generation, when each line was written) and a few `/proc` readings
//! (CPU time, who holds a listening socket).
//!
//! Runs in: the test process (threads of the test harness); it only talks
//! to echod over loopback TCP and reads `/proc` and the log text.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common;

/// What the clients saw. Every field but `connections`, `completed` and
/// `bytes` must stay zero in a test that promises no client notices
/// anything.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Connections attempted.
    pub connections: u64,
    /// Connections whose whole payload came back intact, then EOF.
    pub completed: u64,
    /// Bytes echoed and verified.
    pub bytes: u64,
    /// `connect` failed (refused, timed out).
    pub connect_failures: u64,
    /// The server reset or closed the connection early (ECONNRESET, EPIPE,
    /// EOF before the whole echo).
    pub resets: u64,
    /// A byte came back different from the one sent, or extra bytes came.
    pub mismatches: u64,
    /// A read or write timed out (the echo stalled).
    pub timeouts: u64,
    /// Anything else.
    pub other: u64,
    /// The first few failures, for the assertion message.
    pub samples: Vec<String>,
}

impl Stats {
    /// Every kind of failure, summed.
    pub fn failures(&self) -> u64 {
        self.connect_failures + self.resets + self.mismatches + self.timeouts + self.other
    }

    fn add(&mut self, o: Stats) {
        self.connections += o.connections;
        self.completed += o.completed;
        self.bytes += o.bytes;
        self.connect_failures += o.connect_failures;
        self.resets += o.resets;
        self.mismatches += o.mismatches;
        self.timeouts += o.timeouts;
        self.other += o.other;
        for s in o.samples {
            if self.samples.len() < 10 {
                self.samples.push(s);
            }
        }
    }

    fn fail(&mut self, what: String) {
        if self.samples.len() < 10 {
            self.samples.push(what);
        }
    }
}

/// The shape of one client thread's connections.
#[derive(Debug, Clone, Copy)]
pub enum Client {
    /// Many short connections: one message of 1..4 KiB, echoed, closed.
    Short,
    /// Longer streams: 32..160 KiB in chunks of 1..16 KiB, with a pause of
    /// `pause_ms` between chunks, so each connection lives across reloads.
    Stream { pause_ms: u64 },
}

/// Running client threads; [`Load::stop`] joins them and sums their stats.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stats>>,
}

impl Load {
    /// Starts one thread per entry of `clients`, all against `addr`.
    pub fn start(addr: SocketAddr, clients: &[Client]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = clients
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || client_loop(addr, i as u64, kind, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    /// Tells every thread to finish its current connection, waits for them,
    /// and returns the sum of what they saw.
    pub fn stop(mut self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Stats::default();
        for t in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(s) => total.add(s),
                Err(_) => {
                    total.other += 1;
                    total.fail("a client thread panicked".into());
                }
            }
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A small deterministic generator (splitmix64), so that a failing
/// connection can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_F42D_4C95_7F2D)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn client_loop(addr: SocketAddr, thread: u64, kind: Client, stop: &AtomicBool) -> Stats {
    let mut stats = Stats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let seed = (thread << 32) | n;
        stats.connections += 1;
        one_connection(addr, seed, kind, &mut stats);
    }
    stats
}

/// One client connection with seed `seed`: connect, stream the payload,
/// compare every byte that comes back, half-close, expect EOF.
fn one_connection(addr: SocketAddr, seed: u64, kind: Client, stats: &mut Stats) {
    let mut rng = Rng::new(seed);
    let (len, pause_ms) = match kind {
        Client::Short => (rng.range(1, 4096) as usize, 0),
        Client::Stream { pause_ms } => (rng.range(32 << 10, 160 << 10) as usize, pause_ms),
    };
    let data = common::payload(seed, len);
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            stats.connect_failures += 1;
            stats.fail(format!("connection {seed:#x}: connect {addr}: {e}"));
            return;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut back = vec![0u8; 16 << 10];
    let mut sent = 0;
    while sent < len {
        let chunk = match kind {
            Client::Short => len,
            Client::Stream { .. } => (rng.range(1, 16 << 10) as usize).min(len - sent),
        };
        if let Err(e) = s.write_all(&data[sent..sent + chunk]) {
            classify(stats, seed, "write", sent, e);
            return;
        }
        // Read the whole chunk back before sending more: neither side's
        // buffers can fill, and every byte is checked where it belongs.
        let mut got = 0;
        while got < chunk {
            let want = (chunk - got).min(back.len());
            match s.read(&mut back[..want]) {
                Ok(0) => {
                    stats.resets += 1;
                    stats.fail(format!(
                        "connection {seed:#x}: EOF after {} of {len} bytes",
                        sent + got
                    ));
                    return;
                }
                Ok(k) => {
                    let at = sent + got;
                    if back[..k] != data[at..at + k] {
                        stats.mismatches += 1;
                        let off = (0..k).find(|&i| back[i] != data[at + i]).unwrap_or(0);
                        stats.fail(format!(
                            "connection {seed:#x}: byte {} differs (sent {:#04x}, got {:#04x})",
                            at + off,
                            data[at + off],
                            back[off]
                        ));
                        return;
                    }
                    got += k;
                    stats.bytes += k as u64;
                }
                Err(e) => {
                    classify(stats, seed, "read", sent + got, e);
                    return;
                }
            }
        }
        sent += chunk;
        if pause_ms > 0 && sent < len {
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
    }
    // Half-close: the server must echo nothing more and close its side.
    if let Err(e) = s.shutdown(Shutdown::Write) {
        classify(stats, seed, "shutdown", len, e);
        return;
    }
    match s.read(&mut back) {
        Ok(0) => stats.completed += 1,
        Ok(k) => {
            stats.mismatches += 1;
            stats.fail(format!("connection {seed:#x}: {k} bytes more than sent"));
        }
        Err(e) => classify(stats, seed, "final read", len, e),
    }
}

fn classify(stats: &mut Stats, seed: u64, op: &str, at: usize, e: std::io::Error) {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            stats.resets += 1
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => stats.timeouts += 1,
        _ => stats.other += 1,
    }
    stats.fail(format!("connection {seed:#x}: {op} at byte {at}: {e}"));
}

// ---------------------------------------------------------------------------
// The log.

/// Milliseconds since midnight (UTC) of a log line, from its RFC 3339
/// timestamp (`2026-11-24T20:37:35.650Z ...`).
pub fn line_ms(line: &str) -> Option<u64> {
    let t = line.get(11..23)?; // HH:MM:SS.mmm
    let h: u64 = t.get(0..2)?.parse().ok()?;
    let m: u64 = t.get(3..5)?.parse().ok()?;
    let s: u64 = t.get(6..8)?.parse().ok()?;
    let ms: u64 = t.get(9..12)?.parse().ok()?;
    Some(((h * 60 + m) * 60 + s) * 1000 + ms)
}

/// `(pid, generation)` of a master line `worker 1 (pid 8304, gen 1): ...`.
pub fn worker_id(line: &str) -> Option<(i32, u64)> {
    let rest = line.split("(pid ").nth(1)?;
    let (pid, rest) = rest.split_once(", gen ")?;
    let (gen, _) = rest.split_once(')')?;
    Some((pid.trim().parse().ok()?, gen.trim().parse().ok()?))
}

/// Every worker the master logged as spawned: pid → generation.
pub fn spawned(log: &str) -> HashMap<i32, u64> {
    log.lines()
        .filter(|l| l.contains(" master: ") && l.ends_with("): spawned"))
        .filter_map(worker_id)
        .collect()
}

/// The timestamps (ms since midnight) of the `spawned` lines, in order.
pub fn spawn_times(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(" master: ") && l.ends_with("): spawned"))
        .filter_map(line_ms)
        .collect()
}

/// The latest generation the master started (1 before any reload).
pub fn last_generation(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("reload: generation ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------
// /proc.

/// `utime + stime` of `pid`, in clock ticks (`/proc/PID/stat` fields 14
/// and 15).
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    // After the comm: field 3 (state) is f[0], so field N is f[N - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// When `pid` started, in clock ticks after boot (`/proc/PID/stat` field
/// 22): with the pid, it names one process, even if the pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    f.get(19)?.parse().ok()
}

/// The process state letter of `pid` (`R`, `S`, `T`, `Z`...).
pub fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `pid` is a live echod process (alive, not a zombie, and its
/// `comm` is one of echod's, so a recycled pid does not count).
pub fn echod_alive(pid: i32) -> bool {
    common::alive(pid) && common::comm(pid).is_some_and(|c| c.starts_with("echod"))
}

/// The master's live workers: pid → generation (from the log; 0 if the
/// `spawned` line is not written yet).
pub fn live_workers(e: &common::Echod) -> BTreeMap<i32, u64> {
    let gens = spawned(&e.log());
    e.workers()
        .into_iter()
        .filter(|&p| common::alive(p))
        .map(|p| (p, gens.get(&p).copied().unwrap_or(0)))
        .collect()
}

/// The inode of the socket of `pid` listening on TCP `port`.
pub fn listener_inode(pid: i32, port: u16) -> Option<u64> {
    common::tcp_sockets_of(pid)
        .into_iter()
        .find(|s| s.listening() && s.local_port == port)
        .map(|s| s.inode)
}

/// Every process (any pid in `pids`) holding a descriptor of socket
/// `inode`.
pub fn holders(pids: &[i32], inode: u64) -> Vec<i32> {
    pids.iter()
        .copied()
        .filter(|&p| common::socket_inodes(p).contains(&inode))
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns
/// how long it took.
pub fn wait_for(timeout: Duration, cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    common::wait_until(timeout, cond).then(|| t0.elapsed())
}

/// Writes `bytes` on `s` and reads them back, in one piece.
pub fn echo_on(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let back = common::roundtrip(s, bytes)?;
    if back != bytes {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}
