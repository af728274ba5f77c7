//! A bounded soak of the prefork server under faults: client threads open
//! and close connections as fast as they can, each checking every byte it
//! gets back, while one thread SIGKILLs a random worker every ~2 s and
//! another reloads (SIGHUP) every ~3 s, alternating the pool between 3
//! and 2 workers. Afterwards echod must be exactly as it was: the right
//! number of workers, no zombie, the master's descriptors and memory back
//! to their start values.
//!
//! The duration comes from `ECHOD_SOAK_SECS` (default 20; CI sets 60).

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hostile::*;

/// Client threads; each has at most one connection open at a time, so a
/// killed worker can cut at most this many connections.
const THREADS: usize = 6;
/// A worker is only killed once it has run this long: younger deaths count
/// as a crash loop and delay the respawn (up to 10 s), which is tested
/// elsewhere and would only starve this test of workers.
const KILL_AGE: Duration = Duration::from_millis(1100);
/// The bound of any single read or write: a stall longer than this is a
/// failure, not a cut connection.
const IO_LIMIT: Duration = Duration::from_secs(10);

fn soak_secs() -> u64 {
    std::env::var("ECHOD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn soak_config(workers: usize) -> String {
    config(&format!(
        "workers = {workers}\nbuffer_size = 16384\nidle_timeout = \"30s\"\nshutdown_timeout = \"10s\""
    ))
}

/// How one connection ended. (Reads retry `EINTR`, which a socket with a
/// receive timeout returns after any stop of the test process: see
/// `common::roundtrip`.)
enum Outcome {
    /// Every byte came back, then end of stream.
    Exact,
    /// The connection broke (reset, early end of stream): what a SIGKILLed
    /// worker does to its connections.
    Cut(String),
    /// A byte came back wrong, or more bytes than were sent.
    Mismatch(String),
    /// Nothing happened for `IO_LIMIT`.
    Stall(String),
}

fn broken(e: std::io::Error, what: String) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Outcome::Stall(format!("{what}: {e}"))
        }
        _ => Outcome::Cut(format!("{what}: {e}")),
    }
}

/// One connection: 1 to 3 messages of 1 byte to 32 KiB, each read back and
/// compared as it arrives, then a half-close and end of stream.
fn converse(s: &mut TcpStream, rng: &mut Rng) -> Outcome {
    let mut buf = vec![0u8; 16 * 1024];
    for m in 0..rng.range(1, 4) {
        let p = payload(rng.next(), rng.range(1, 32 * 1024 + 1));
        if let Err(e) = s.write_all(&p) {
            return broken(e, format!("message {m}: write"));
        }
        let mut got = 0;
        while got < p.len() {
            let want = (p.len() - got).min(buf.len());
            match s.read(&mut buf[..want]) {
                Ok(0) => {
                    return Outcome::Cut(format!("message {m}: end of stream at {got}/{}", p.len()))
                }
                Ok(n) => {
                    if buf[..n] != p[got..got + n] {
                        let k = (0..n).find(|&k| buf[k] != p[got + k]).unwrap_or(0);
                        return Outcome::Mismatch(format!(
                            "message {m}: byte {} of {} differs",
                            got + k,
                            p.len()
                        ));
                    }
                    got += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return broken(e, format!("message {m}: read at {got}/{}", p.len())),
            }
        }
    }
    if let Err(e) = s.shutdown(std::net::Shutdown::Write) {
        return broken(e, "shutdown".into());
    }
    let end = loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    match end {
        Ok(0) => Outcome::Exact,
        Ok(n) => Outcome::Mismatch(format!("{n} bytes after the last echo")),
        Err(e) => broken(e, "waiting for end of stream".into()),
    }
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    exact: u64,
    cut: Vec<String>,
    mismatches: Vec<String>,
    stalls: Vec<String>,
    connect_errors: Vec<String>,
}

fn client(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut rng = Rng::new(seed);
    let mut t = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                t.connect_errors.push(e.to_string());
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        s.set_read_timeout(Some(IO_LIMIT)).unwrap();
        s.set_write_timeout(Some(IO_LIMIT)).unwrap();
        match converse(&mut s, &mut rng) {
            Outcome::Exact => t.exact += 1,
            Outcome::Cut(why) => t.cut.push(why),
            Outcome::Mismatch(why) => t.mismatches.push(format!("thread seed {seed}: {why}")),
            Outcome::Stall(why) => t.stalls.push(format!("thread seed {seed}: {why}")),
        }
    }
    t
}

/// Kills a random worker (of those older than `KILL_AGE`) every 1.7 to
/// 2.3 s; samples every worker's RSS meanwhile. Returns the kills and the
/// largest worker RSS seen (KiB).
fn killer(master: i32, stop: Arc<AtomicBool>) -> (usize, u64) {
    let mut rng = Rng::new(0x5eed);
    let mut first_seen = std::collections::HashMap::<i32, Instant>::new();
    let mut kills = 0;
    let mut max_rss = 0;
    let mut next = Instant::now() + Duration::from_millis(rng.range(1700, 2300) as u64);
    while !stop.load(Ordering::Relaxed) {
        let workers = live_children_named(master, "echod-worker");
        let now = Instant::now();
        first_seen.retain(|p, _| workers.contains(p));
        for &w in &workers {
            first_seen.entry(w).or_insert(now);
            max_rss = max_rss.max(rss_kib(w).unwrap_or(0));
        }
        if now >= next {
            let old: Vec<i32> = workers
                .iter()
                .copied()
                .filter(|w| now - first_seen[w] >= KILL_AGE)
                .collect();
            if !old.is_empty() {
                let victim = old[rng.range(0, old.len())];
                // Re-check right before the kill: still an echod worker of
                // this master (not a reused pid).
                if live_children_named(master, "echod-worker").contains(&victim) {
                    kill(victim, libc::SIGKILL);
                    kills += 1;
                }
                next = now + Duration::from_millis(rng.range(1700, 2300) as u64);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (kills, max_rss)
}

/// Every 3 s, rewrites the config with the other pool size (2 or 3) and
/// sends SIGHUP. Returns the reloads sent and the last pool size.
fn reloader(master: i32, config_path: std::path::PathBuf, stop: Arc<AtomicBool>) -> (usize, usize) {
    let mut workers = 3;
    let mut reloads = 0;
    let mut next = Instant::now() + Duration::from_secs(3);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            workers = if workers == 3 { 2 } else { 3 };
            std::fs::write(&config_path, soak_config(workers)).expect("write config");
            kill(master, libc::SIGHUP);
            reloads += 1;
            next += Duration::from_secs(3);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (reloads, workers)
}

/// `prefork_soak_under_kills_and_reloads`: for `ECHOD_SOAK_SECS` (20 by
/// default), six clients churn connections (1 to 3 messages of up to
/// 32 KiB each, checked byte by byte, then end of stream) while a worker is
/// SIGKILLed every ~2 s and the pool is reloaded every ~3 s (3 and 2
/// workers in turn). Pinned: no byte ever comes back wrong or extra; no
/// connect fails and no connection stalls; the only broken connections
/// are those a kill can cut (at most kills x clients); the service keeps a
/// minimum rate; afterwards the pool has the last config's size, no child
/// is a zombie, the master holds as many descriptors as at start and its
/// RSS is within 2 MiB of its start, and no worker's RSS ever exceeded its
/// start value by 8 MiB.
#[test]
fn prefork_soak_under_kills_and_reloads() {
    let secs = soak_secs();
    let e = Echod::start(&soak_config(3));
    assert!(e.wait_workers_up(3, Duration::from_secs(10)), "{}", e.log());
    let addr = e.addr();
    // The start values, once the pool has settled.
    std::thread::sleep(Duration::from_millis(300));
    let master = e.pid;
    let fds_start = fd_count(master);
    let rss_start = rss_kib(master).expect("master RSS");
    let worker_rss_start = e
        .workers()
        .iter()
        .filter_map(|&w| rss_kib(w))
        .max()
        .expect("worker RSS");

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..THREADS as u64)
        .map(|i| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || client(addr, 1000 + i, stop))
        })
        .collect();
    let killer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || killer(master, stop))
    };
    let reloader = {
        let stop = Arc::clone(&stop);
        let path = e.config_path.clone();
        std::thread::spawn(move || reloader(master, path, stop))
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let (kills, max_worker_rss) = killer.join().expect("killer thread");
    let (reloads, last_workers) = reloader.join().expect("reloader thread");
    let mut total = Tally::default();
    for c in clients {
        let t = c.join().expect("client thread");
        total.exact += t.exact;
        total.cut.extend(t.cut);
        total.mismatches.extend(t.mismatches);
        total.stalls.extend(t.stalls);
        total.connect_errors.extend(t.connect_errors);
    }
    eprintln!(
        "soak {secs} s: {} exact connections, {} cut, {} mismatches, {} stalls, {} connect errors; \
         {kills} kills, {reloads} reloads; worker RSS {worker_rss_start} KiB at start, {max_worker_rss} KiB at most",
        total.exact,
        total.cut.len(),
        total.mismatches.len(),
        total.stalls.len(),
        total.connect_errors.len()
    );

    // The clients.
    assert!(
        total.mismatches.is_empty(),
        "bytes came back wrong:\n{}",
        total.mismatches.join("\n")
    );
    assert!(
        total.stalls.is_empty(),
        "connections stalled:\n{}",
        total.stalls.join("\n")
    );
    assert!(
        total.connect_errors.is_empty(),
        "connects failed:\n{}",
        total.connect_errors.join("\n")
    );
    assert!(
        total.cut.len() <= kills * THREADS,
        "{} connections cut by {kills} kills of workers (at most {THREADS} each):\n{}",
        total.cut.len(),
        total.cut.join("\n")
    );
    assert!(
        total.exact >= secs * 20,
        "only {} connections completed in {secs} s",
        total.exact
    );
    // The faults really happened (kills fewer than one per 2 s: after each
    // reload the new workers are too young to kill for a while).
    assert!(kills as u64 >= secs / 3, "only {kills} kills in {secs} s");
    assert!(
        reloads as u64 + 1 >= secs / 3,
        "only {reloads} reloads in {secs} s"
    );

    // The server, once settled: every reload applied, the last pool size,
    // no old-generation worker left.
    assert!(
        wait_until(Duration::from_secs(5), || e.count_log("reload: generation")
            == reloads),
        "{} of {reloads} reloads logged:\n{}",
        e.count_log("reload: generation"),
        e.log()
    );
    assert!(
        wait_until(Duration::from_secs(15), || {
            live_children_named(master, "echod-worker").len() == last_workers
                && e.children().len() == last_workers
        }),
        "workers {:?} (children {:?}), expected {last_workers}:\n{}",
        live_children_named(master, "echod-worker"),
        e.children(),
        e.log()
    );
    assert!(
        wait_until(Duration::from_secs(2), || zombies_of(master).is_empty()),
        "zombies: {:?}",
        zombies_of(master)
    );
    echo_once(addr, b"still serving after the soak");
    assert!(
        wait_until(Duration::from_secs(3), || fd_count(master) == fds_start),
        "the master holds {} descriptors, {fds_start} at start: {:?}",
        fd_count(master),
        fd_targets(master)
    );
    let rss_end = rss_kib(master).expect("master RSS");
    eprintln!("master RSS {rss_start} KiB at start, {rss_end} KiB at the end");
    assert!(
        rss_end <= rss_start + 2048,
        "the master's RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    assert!(
        max_worker_rss <= worker_rss_start + 8 * 1024,
        "a worker's RSS reached {max_worker_rss} KiB ({worker_rss_start} KiB at start)"
    );
    for w in live_children_named(master, "echod-worker") {
        let rss = rss_kib(w).unwrap_or(0);
        assert!(
            rss <= worker_rss_start + 8 * 1024,
            "worker {w}: RSS {rss} KiB ({worker_rss_start} KiB at start)"
        );
    }
    assert!(
        e.error_lines().is_empty(),
        "errors:\n{}",
        e.error_lines().join("\n")
    );
}
