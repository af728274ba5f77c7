//! Hostile clients and faults, against the real binary over loopback: a
//! client that sends without reading, one that reads its echo slowly, idle
//! and chatty connections, the connection caps (`max_connections` with
//! `overload = "wait"` and `"reject"`, `max_connections_per_ip` across
//! workers), storms of reset connections and a worker killed under them
//! (nothing may leak), descriptor exhaustion, connection children that
//! outlive a stop or exit in hundreds, configuration files that are
//! wrong in every way we could think of (a table, and a property test over
//! arbitrary bytes), and the worker loops' own paths: the cap on accepts
//! per call under a queued flood, a full worker's resume under `"reject"`,
//! a resume that fails half-way, and the splice pipe after a reset.
//!
//! The client-facing tests run on the io_uring worker too (`io_uring_*`:
//! `mode = "prefork"` with `io = "io_uring"`), since it keeps the same
//! contract with other code.
//!
//! The config parser is also fuzzed (`fuzz/`, cargo-fuzz: `fuzz/run.sh`).
//! The soak under kills and reloads is `tests/soak.rs`.
//!
//! Every wait is bounded, every process is killed by pid when its handle
//! drops, and every test names the behaviour it pins in its doc comment.
//! Timing bounds are loose enough for a shared 2-core machine and tight
//! enough that the broken behaviour (a blocked worker, a spinning loop, a
//! refused instead of queued client) fails them by far.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use hostile::*;

/// The bound of one wait for something echod should do at once.
const LIMIT: Duration = Duration::from_secs(10);

/// The loopback source addresses of the per-address tests.
fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A config in `mode` with `extra` keys (stderr logging at info, port 0).
/// `mode` is "prefork", "fork", or "io_uring": prefork workers on the
/// io_uring backend.
fn mode_config(mode: &str, extra: &str) -> String {
    if mode == "io_uring" {
        config(&format!("mode = \"prefork\"\nio = \"io_uring\"\n{extra}"))
    } else {
        config(&format!("mode = \"{mode}\"\n{extra}"))
    }
}

/// Whether `mode` runs a pool of prefork workers (either backend).
fn prefork_like(mode: &str) -> bool {
    mode != "fork"
}

/// Starts echod and, in prefork mode, waits for all the workers it
/// reported at ready to be in their event loops.
fn start(mode: &str, extra: &str) -> Echod {
    let e = Echod::start(&mode_config(mode, extra));
    if prefork_like(mode) {
        let n = e
            .ready_workers()
            .unwrap_or_else(|| panic!("no pool size in the ready line:\n{}", e.log()));
        assert!(e.wait_workers_up(n, LIMIT), "workers not up:\n{}", e.log());
    }
    e
}

/// One echo of `payload` on an open connection, with a bound; panics with
/// `what` on any difference or error.
fn echo_on(s: &mut TcpStream, payload: &[u8], what: &str) {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let back = roundtrip(s, payload).unwrap_or_else(|e| panic!("{what}: echo failed: {e}"));
    assert!(back == payload, "{what}: the echo differs");
}

/// Connects and echoes `payload` once, retrying for up to `limit` while
/// the connection is closed at once (a refusal that is about to stop: the
/// server has not yet seen a close that frees a slot). Returns the open
/// connection and how many attempts were refused first.
fn connect_when_admitted(
    from: IpAddr,
    addr: SocketAddr,
    limit: Duration,
) -> Result<(TcpStream, usize), String> {
    let end = Instant::now() + limit;
    let mut refused = 0;
    loop {
        let mut s = connect_from(from, addr, LIMIT).map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"admitted?")
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 9];
        match s.read_exact(&mut buf) {
            Ok(()) if &buf == b"admitted?" => return Ok((s, refused)),
            Ok(()) => return Err(format!("wrong echo {buf:?}")),
            Err(_) if Instant::now() < end => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("still refused after {refused} attempts: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. A client that sends without reading.
// ---------------------------------------------------------------------------

/// The period of the slow client's byte stream: a prime, so that a lost,
/// repeated or reordered block shows as a mismatch.
const PERIOD: usize = 1_000_003;
/// The most the slow client tries to send before concluding that its
/// writes never block.
const SEND_CAP: u64 = 256 << 20;

/// Compares `got`, received at stream offset `pos`, with the pattern;
/// returns the offset of the first difference.
fn first_difference(pattern: &[u8], pos: u64, got: &[u8]) -> Option<u64> {
    let mut done = 0;
    while done < got.len() {
        let at = ((pos + done as u64) % PERIOD as u64) as usize;
        let n = (PERIOD - at).min(got.len() - done);
        if got[done..done + n] != pattern[at..at + n] {
            let k = (0..n)
                .find(|&k| got[done + k] != pattern[at + k])
                .unwrap_or(0);
            return Some(pos + (done + k) as u64);
        }
        done += n;
    }
    None
}

/// Three other connections each echo 4 KiB twenty times; returns the
/// slowest round trip.
fn others_echo(addr: SocketAddr) -> Duration {
    let mut conns: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    let mut worst = Duration::ZERO;
    for round in 0..20u64 {
        for (i, c) in conns.iter_mut().enumerate() {
            let p = payload(round * 10 + i as u64, 4096);
            let t = Instant::now();
            echo_on(c, &p, &format!("other connection {i}, round {round}"));
            worst = worst.max(t.elapsed());
        }
    }
    worst
}

/// Makes `s` non-blocking and sends `pattern` on it, over and over, without
/// ever reading, until its writes have stayed blocked for `quiet` (or
/// `SEND_CAP` bytes, or 30 s). Returns the bytes sent and whether the
/// writes blocked.
fn send_until_blocked(s: &mut TcpStream, pattern: &[u8], quiet: Duration) -> (u64, bool) {
    s.set_nonblocking(true).unwrap();
    let mut sent: u64 = 0;
    let mut blocked_since: Option<Instant> = None;
    let start = Instant::now();
    while sent < SEND_CAP && start.elapsed() < Duration::from_secs(30) {
        let at = (sent % pattern.len() as u64) as usize;
        match s.write(&pattern[at..]) {
            Ok(n) => {
                sent += n as u64;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("slow client: write after {sent} bytes: {e}"),
        }
    }
    (sent, blocked_since.is_some())
}

/// The body of the non-reading-client tests; `mode` is "prefork" or
/// "io_uring" (one worker, which must keep serving others) or "fork".
fn non_reading_client(mode: &str) {
    let e = start(
        mode,
        "workers = 1\nbuffer_size = 65536\nidle_timeout = 0\nmax_connections = 100",
    );
    let addr = e.addr();
    // Warm the server up with 1 MiB, so that its scratch buffer and
    // allocator are already touched when the "before" RSS is read.
    echo_once(addr, &payload(1, 1 << 20));

    let pattern = payload(7, PERIOD);
    let mut slow = connect(addr);
    let slow_peer = slow.local_addr().unwrap();
    // The process that serves the slow client, and the RSS to compare with.
    let (server, rss_before) = if prefork_like(mode) {
        let w = e.workers();
        assert_eq!(w.len(), 1, "{w:?}");
        (w[0], rss_kib(w[0]).expect("worker RSS"))
    } else {
        let mut child = Vec::new();
        assert!(
            wait_until(LIMIT, || {
                child = live_children_named(e.pid, "echod-conn");
                child.len() == 1
            }),
            "no connection child for the slow client: {child:?}"
        );
        // A fresh child shares the master's pages: its own growth is what
        // exceeds the master's RSS.
        (child[0], rss_kib(e.pid).expect("master RSS"))
    };

    // Send without reading until the writes stay blocked for 500 ms.
    let (sent, blocked) = send_until_blocked(&mut slow, &pattern, Duration::from_millis(500));
    assert!(
        blocked,
        "the slow client's writes never blocked ({sent} bytes sent): echod reads without bound"
    );
    eprintln!("{mode}: the slow client's writes block after {sent} bytes");

    // echod stopped reading: its side of the connection has unread bytes,
    // and they stay unread.
    let (_, rx1) = tcp_queues(addr.port(), slow_peer).expect("server side in /proc/net/tcp");
    let cpu0 = cpu_time(server).expect("server CPU");
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_time(server).expect("server CPU") - cpu0;
    let (_, rx2) = tcp_queues(addr.port(), slow_peer).expect("server side in /proc/net/tcp");
    assert!(rx1 > 0, "echod's receive queue is empty: it reads on");
    assert_eq!(rx1, rx2, "echod's receive queue moved: it reads on");
    assert!(
        cpu < Duration::from_millis(300),
        "the server spun for {cpu:?} in 1 s while its client was blocked"
    );

    // Its memory stays bounded: at most one buffer for this client.
    let rss_after = rss_kib(server).expect("server RSS");
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!("{mode}: server RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        growth < 8 * 1024,
        "the server's RSS grew by {growth} KiB holding a non-reading client"
    );

    // Meanwhile others are served promptly (by the same and only worker in
    // prefork mode): a worker blocked on the slow client would not answer
    // at all (10 s timeouts); a free one answers in microseconds.
    let worst = others_echo(addr);
    eprintln!("{mode}: slowest echo of the others: {worst:?}");
    assert!(
        worst < Duration::from_secs(2),
        "an echo took {worst:?} while a client did not read"
    );
    if prefork_like(mode) {
        assert_eq!(e.workers(), vec![server], "the worker changed");
    }

    // The slow client reads at last, and gets exactly its bytes back.
    read_back_exactly(&mut slow, &pattern, sent, "the slow client");
    e.assert_no_errors();
}

/// `prefork_non_reading_client_is_backpressured`: with one worker and
/// `buffer_size = 65536`, a client that sends megabytes without reading
/// makes its writes block (echod stops reading it: the server side's
/// receive queue holds still, the worker does not spin, and its RSS grows
/// by far less than 8 MiB), while three other connections on the same
/// worker keep echoing (each echo within 2 s; microseconds in fact); when
/// the client reads at last, it gets exactly the bytes it sent, then end
/// of stream.
#[test]
fn prefork_non_reading_client_is_backpressured() {
    non_reading_client("prefork");
}

/// `io_uring_non_reading_client_is_backpressured`: the same with the
/// io_uring worker (`io = "io_uring"`), whose backpressure arms the
/// client's next receive only while nothing waits behind the send in
/// flight.
#[test]
fn io_uring_non_reading_client_is_backpressured() {
    non_reading_client("io_uring");
}

/// `fork_non_reading_client_is_backpressured`: the same in fork mode,
/// where the connection child blocks in its write: bounded memory, no
/// spinning, others served, exact bytes back.
#[test]
fn fork_non_reading_client_is_backpressured() {
    non_reading_client("fork");
}

/// The body of the stuck-send tests: a client that sends without reading
/// until its writes block, so that the worker's echo to it cannot be
/// written, then falls silent. `idle_timeout` must close it all the same:
/// the worker gives its descriptor up (its count is back to what it was
/// before the client came) and serves the next client.
fn stuck_send_is_closed_at_idle_timeout(mode: &str) {
    let e = start(
        mode,
        "workers = 1\nbuffer_size = 65536\nidle_timeout = \"1s\"",
    );
    let addr = e.addr();
    let w = e.workers();
    assert_eq!(w.len(), 1, "{w:?}");
    let worker = w[0];
    // Counted before any client came (a client that just left may not be
    // closed by the worker yet).
    let fds_before = fd_count(worker);

    let pattern = payload(11, PERIOD);
    let mut slow = connect(addr);
    let (sent, blocked) = send_until_blocked(&mut slow, &pattern, Duration::from_millis(300));
    assert!(
        blocked,
        "the slow client's writes never blocked ({sent} bytes sent)"
    );
    assert!(
        fd_count(worker) > fds_before,
        "the worker holds no descriptor for the slow client"
    );
    // Silent from here on: closed between 1 s and 1.25 s later.
    assert!(
        wait_until(Duration::from_secs(5), || fd_count(worker) == fds_before),
        "the worker still holds the stuck client's descriptor 5 s later ({} fds, {fds_before} before)\n{}",
        fd_count(worker),
        e.log()
    );
    echo_once(addr, b"the next client");
    assert_eq!(e.workers(), vec![worker], "the worker changed");
    e.assert_no_errors();
}

/// `prefork_stuck_send_is_closed_at_idle_timeout`: a connection whose echo
/// cannot be written (its client does not read) and that is silent is
/// closed at `idle_timeout` like any idle one.
#[test]
fn prefork_stuck_send_is_closed_at_idle_timeout() {
    stuck_send_is_closed_at_idle_timeout("prefork");
}

/// `io_uring_stuck_send_is_closed_at_idle_timeout`: the same with the
/// io_uring worker, where the send stuck in the ring must be made to fail
/// (the socket is shut down) before the descriptor can be closed.
#[test]
fn io_uring_stuck_send_is_closed_at_idle_timeout() {
    stuck_send_is_closed_at_idle_timeout("io_uring");
}

/// The body of the slow-reader tests: a client sends until its writes
/// block (the server's echo to it waits for room, its unread bytes wait in
/// the server's receive queue), shuts its side (`shut`) or not, then reads
/// its echo slowly, 16 KiB every 50 ms, for three times `idle_timeout`,
/// and the rest at once. It takes bytes all along, so it keeps its
/// connection: exactly the bytes it sent come back, then end of stream.
fn slow_reader_keeps_its_connection(mode: &str) {
    let e = start(mode, "workers = 1\nidle_timeout = \"1s\"");
    let pattern = payload(13, PERIOD);
    for shut in [true, false] {
        let what = format!("{mode}, {}", if shut { "half-closed" } else { "open" });
        let mut s = connect(e.addr());
        let (sent, blocked) = send_until_blocked(&mut s, &pattern, Duration::from_millis(100));
        assert!(
            blocked,
            "{what}: the client's writes never blocked ({sent} bytes sent)"
        );
        s.set_nonblocking(false).unwrap();
        if shut {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let slow = Instant::now();
        let mut got: u64 = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let reading_slowly = slow.elapsed() < Duration::from_secs(3);
            if !reading_slowly && !shut && got == sent {
                s.shutdown(std::net::Shutdown::Write).unwrap();
            }
            let len = if reading_slowly { 16 << 10 } else { buf.len() };
            match s.read(&mut buf[..len]) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(
                        got + n as u64 <= sent,
                        "{what}: got more than the {sent} bytes it sent"
                    );
                    if let Some(at) = first_difference(&pattern, got, &buf[..n]) {
                        panic!("{what}: the echo differs at byte {at} of {sent}");
                    }
                    got += n as u64;
                    if reading_slowly {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => panic!(
                    "{what}: read failed after {got} of {sent} bytes, {:?} into reading: {err}\n{}",
                    slow.elapsed(),
                    e.log()
                ),
            }
        }
        assert_eq!(got, sent, "{what}: got {got} of its {sent} bytes");
    }
    e.assert_no_errors();
}

/// `prefork_slow_reader_keeps_its_connection`: with `idle_timeout = "1s"`,
/// a client whose echo is held up by its full window and that then reads
/// it at about 320 KiB/s for 3 s, with its side shut or open, gets every
/// byte it sent, then end of stream. The server's send buffer holds
/// megabytes and reports room only once a third of it has gone, which
/// takes such a client longer than `idle_timeout`: the worker must count
/// the bytes the client takes from it (its acknowledgements) as activity,
/// not only its own writes, or it cuts a client that reads (a reset, with
/// the rest of the echo lost).
#[test]
fn prefork_slow_reader_keeps_its_connection() {
    slow_reader_keeps_its_connection("prefork");
}

/// `io_uring_slow_reader_keeps_its_connection`: the same with the io_uring
/// worker, whose send stays in flight while the client reads slowly.
#[test]
fn io_uring_slow_reader_keeps_its_connection() {
    slow_reader_keeps_its_connection("io_uring");
}

/// `fork_slow_reader_keeps_its_connection`: the same in fork mode, where
/// the connection child waits for room to write.
#[test]
fn fork_slow_reader_keeps_its_connection() {
    slow_reader_keeps_its_connection("fork");
}

// ---------------------------------------------------------------------------
// 2. idle_timeout.
// ---------------------------------------------------------------------------

/// Echoes 16 bytes every 200 ms, 17 times (3.4 s), on one connection. On
/// failure, says whether the client itself had been silent for 900 ms or
/// more before the failing echo (so that an idle close was legitimate).
fn stay_active(addr: SocketAddr) -> Result<(), (bool, String)> {
    let mut s = connect(addr);
    let mut last = Instant::now();
    for n in 0..17 {
        std::thread::sleep(Duration::from_millis(200));
        let quiet = last.elapsed();
        let p = payload(n, 16);
        match roundtrip(&mut s, &p) {
            Ok(back) if back == p => last = Instant::now(),
            Ok(_) => return Err((false, format!("echo {n} differs"))),
            Err(e) => {
                let why = format!("echo {n}, {quiet:?} after the previous one: {e}");
                return Err((quiet >= Duration::from_millis(900), why));
            }
        }
    }
    Ok(())
}

/// The body of the idle-timeout tests.
fn idle_timeout(mode: &str) {
    let e = start(mode, "workers = 1\nidle_timeout = \"1s\"");
    let never = start(mode, "workers = 1\nidle_timeout = 0");
    let (addr, never_addr) = (e.addr(), never.addr());

    let idle = std::thread::spawn(move || {
        let mut s = connect(addr);
        echo_on(&mut s, b"idle", "idle connection");
        wait_closed(&mut s, Duration::from_secs(5))
    });
    let active = std::thread::spawn(move || {
        // A close is legitimate if this client itself was held up for
        // about a second (a loaded machine, a stopped test process): then
        // the check is repeated, three times at most.
        let mut stalls = Vec::new();
        for _ in 0..3 {
            match stay_active(addr) {
                Ok(()) => return Ok(stalls),
                Err((true, why)) => stalls.push(why),
                Err((false, why)) => return Err(why),
            }
        }
        Err(format!("the client stalled in every try: {stalls:?}"))
    });
    let quiet = std::thread::spawn(move || {
        let mut s = connect(never_addr);
        echo_on(&mut s, b"quiet", "connection with idle_timeout = 0");
        std::thread::sleep(Duration::from_secs(3));
        let still = read_end(&mut s, Duration::from_millis(100));
        echo_on(&mut s, b"still here", "connection with idle_timeout = 0");
        still
    });

    let closed = idle.join().expect("idle thread");
    let active = active.join().expect("active thread");
    let still = quiet.join().expect("quiet thread");
    eprintln!("{mode}: the idle connection was closed after {closed:?}");
    let closed = closed.expect("the idle connection was not closed within 5 s");
    assert!(
        closed >= Duration::from_millis(800),
        "the idle connection was closed after only {closed:?} (idle_timeout 1s)"
    );
    // A worker scans for idle connections every quarter of idle_timeout:
    // the close comes between 1 s and 1.25 s (bounded looser for a loaded
    // machine).
    assert!(
        closed <= Duration::from_millis(1600),
        "the idle connection was closed only after {closed:?} (idle_timeout 1s)"
    );
    match active {
        Ok(stalls) if !stalls.is_empty() => eprintln!("{mode}: client stalls retried: {stalls:?}"),
        Ok(_) => {}
        Err(why) => panic!("the active connection was closed: {why}\n{}", e.log()),
    }
    assert_eq!(
        still,
        ReadEnd::TimedOut,
        "idle_timeout = 0 closed an idle connection"
    );
}

/// `prefork_idle_timeout_closes_only_idle_connections`: with
/// `idle_timeout = "1s"`, a silent connection is closed after 1 to 2 s
/// (never before 0.8 s), one that echoes every 200 ms survives past 3 s,
/// and with `idle_timeout = 0` a silent connection is still open and
/// echoing after 3 s.
#[test]
fn prefork_idle_timeout_closes_only_idle_connections() {
    idle_timeout("prefork");
}

/// `io_uring_idle_timeout_closes_only_idle_connections`: the same with the
/// io_uring worker.
#[test]
fn io_uring_idle_timeout_closes_only_idle_connections() {
    idle_timeout("io_uring");
}

/// `fork_idle_timeout_closes_only_idle_connections`: the same in fork mode.
#[test]
fn fork_idle_timeout_closes_only_idle_connections() {
    idle_timeout("fork");
}

/// `prefork_idle_timeout_is_honoured_within_a_quarter`: with
/// `idle_timeout = "1s"`, four silent connections that last spoke 250 ms
/// apart (so that one of them falls just after any periodic scan) are each
/// closed between 0.8 s and 1.6 s after their last byte: the worker scans
/// every quarter of idle_timeout (a close 1 s to 1.25 s after the last
/// byte; the rest is room for a loaded machine, as in the idle-timeout
/// tests above), not once a second (which closes one of the four 1.75 s or
/// more after its last byte).
#[test]
fn prefork_idle_timeout_is_honoured_within_a_quarter() {
    let e = start("prefork", "workers = 1\nidle_timeout = \"1s\"");
    let addr = e.addr();
    let idle: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(250 * i));
                let mut s = connect(addr);
                echo_on(&mut s, b"idle", &format!("idle connection {i}"));
                wait_closed(&mut s, Duration::from_secs(5))
            })
        })
        .collect();
    let closed: Vec<Option<Duration>> = idle
        .into_iter()
        .map(|t| t.join().expect("idle thread"))
        .collect();
    eprintln!("idle connections closed after {closed:?}");
    for (i, c) in closed.iter().enumerate() {
        let c = c.unwrap_or_else(|| panic!("idle connection {i} was never closed"));
        assert!(
            c >= Duration::from_millis(800) && c <= Duration::from_millis(1600),
            "idle connection {i} was closed after {c:?} (idle_timeout 1s): {closed:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Connection caps.
// ---------------------------------------------------------------------------

/// The body of the `overload = "wait"` tests.
fn overload_wait(mode: &str) {
    let e = start(
        mode,
        "workers = 1\nmax_connections = 2\noverload = \"wait\"\nidle_timeout = 0",
    );
    let addr = e.addr();
    let mut c1 = connect(addr);
    echo_on(&mut c1, b"one", "1st connection");
    let mut c2 = connect(addr);
    echo_on(&mut c2, b"two", "2nd connection");
    // The third is queued by the kernel (connect succeeds), not served...
    let mut c3 = connect(addr);
    c3.write_all(b"three").unwrap();
    let waiting = read_end(&mut c3, Duration::from_millis(800));
    assert_eq!(
        waiting,
        ReadEnd::TimedOut,
        "the 3rd connection was not left waiting at max_connections = 2"
    );
    // ...until one closes: then it is served, with what it sent meanwhile.
    drop(c1);
    let t = Instant::now();
    let mut buf = [0u8; 5];
    c3.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c3.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("the waiting connection was not served once one closed: {e}"));
    assert_eq!(&buf, b"three");
    eprintln!(
        "{mode}: the waiting connection was served {:?} after a close",
        t.elapsed()
    );
    echo_on(&mut c3, b"and more", "3rd connection");
    echo_on(&mut c2, b"two again", "2nd connection");
    assert!(!e.log().contains("refusing"), "{}", e.log());
}

/// `prefork_overload_wait_queues_until_a_slot_frees`: one worker with
/// `max_connections = 2` and `overload = "wait"`: a 3rd connection gets no
/// echo (it is neither served nor closed) until one of the first two
/// closes; then it is served, with the bytes it sent while waiting.
#[test]
fn prefork_overload_wait_queues_until_a_slot_frees() {
    overload_wait("prefork");
}

/// `io_uring_overload_wait_queues_until_a_slot_frees`: the same with the
/// io_uring worker.
#[test]
fn io_uring_overload_wait_queues_until_a_slot_frees() {
    overload_wait("io_uring");
}

/// `fork_overload_wait_queues_until_a_slot_frees`: the same in fork mode
/// (`max_connections` live children).
#[test]
fn fork_overload_wait_queues_until_a_slot_frees() {
    overload_wait("fork");
}

/// The body of the `overload = "reject"` tests.
fn overload_reject(mode: &str, logged: &str) {
    let e = start(
        mode,
        "workers = 1\nmax_connections = 2\noverload = \"reject\"\nidle_timeout = 0",
    );
    let addr = e.addr();
    let mut c1 = connect(addr);
    echo_on(&mut c1, b"one", "1st connection");
    let mut c2 = connect(addr);
    echo_on(&mut c2, b"two", "2nd connection");
    for i in 0..3 {
        let mut c3 = connect(addr);
        let closed = wait_closed(&mut c3, Duration::from_secs(3));
        assert!(
            closed.is_some_and(|d| d < Duration::from_secs(2)),
            "extra connection {i} at max_connections was not closed at once: {closed:?}"
        );
    }
    assert!(e.wait_log(logged, LIMIT), "no {logged:?} in:\n{}", e.log());
    echo_on(&mut c1, b"one again", "1st connection");
    echo_on(&mut c2, b"two again", "2nd connection");
    // A slot frees: a new connection is served again.
    drop(c1);
    connect_when_admitted(ip(1), addr, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("no connection admitted after a close: {e}"));
}

/// `prefork_overload_reject_closes_extra_connections_at_once`: one worker
/// with `max_connections = 2` and `overload = "reject"`: further
/// connections are accepted and closed at once (end of stream or
/// reset, no waiting), logged as `max_connections (2) reached`; the two
/// served connections are unaffected, and once one closes a new one is
/// served.
#[test]
fn prefork_overload_reject_closes_extra_connections_at_once() {
    overload_reject("prefork", "max_connections (2) reached: refusing");
}

/// `io_uring_overload_reject_closes_extra_connections_at_once`: the same
/// with the io_uring worker.
#[test]
fn io_uring_overload_reject_closes_extra_connections_at_once() {
    overload_reject("io_uring", "max_connections (2) reached: refusing");
}

/// `fork_overload_reject_closes_extra_connections_at_once`: the same in
/// fork mode.
#[test]
fn fork_overload_reject_closes_extra_connections_at_once() {
    overload_reject(
        "fork",
        "max_connections reached (overload = \"reject\"): refusing",
    );
}

/// The body of the per-address cap tests. `cap` is the configured
/// `max_connections_per_ip`; `refusal` the log line's fixed part.
fn per_ip_cap(mode: &str, extra: &str, cap: usize, others: usize, refusal: &str, loggers: usize) {
    let e = start(
        mode,
        &format!("max_connections_per_ip = {cap}\nidle_timeout = 0\n{extra}"),
    );
    let addr = e.addr();
    // 127.0.0.2 gets exactly `cap` connections...
    let mut mine: Vec<TcpStream> = (0..cap)
        .map(|i| {
            let mut s = connect_from(ip(2), addr, LIMIT).expect("connect from 127.0.0.2");
            echo_on(
                &mut s,
                &payload(i as u64, 100),
                &format!("127.0.0.2 connection {i}"),
            );
            s
        })
        .collect();
    if prefork_like(mode) {
        // The cap is counted across workers: this test only means something
        // if the address's connections are spread over both.
        let peers: Vec<SocketAddr> = mine.iter().map(|s| s.local_addr().unwrap()).collect();
        let workers = e.workers();
        let holding = tcp_sockets_of_each(&workers)
            .values()
            .filter(|socks| socks.iter().any(|s| peers.contains(&s.remote)))
            .count();
        assert_eq!(
            holding, 2,
            "127.0.0.2's connections are not spread over both workers"
        );
    }
    // ...the next ones are accepted and closed at once, and logged at most
    // about once a second (per worker) however many there are.
    let needle = refusal.replace("ADDR", "127.0.0.2");
    let logged_before = e.count_log(&needle);
    let t = Instant::now();
    for i in 0..50 {
        let mut s = connect_from(ip(2), addr, LIMIT).expect("connect from 127.0.0.2");
        let closed = wait_closed(&mut s, Duration::from_secs(3));
        assert!(
            closed.is_some_and(|d| d < Duration::from_secs(2)),
            "127.0.0.2's connection {} over the cap was not closed at once: {closed:?}",
            cap + 1 + i
        );
        std::thread::sleep(Duration::from_millis(40));
    }
    let secs = t.elapsed().as_secs_f64().ceil() as usize;
    std::thread::sleep(Duration::from_millis(100));
    let logged = e.count_log(&needle) - logged_before;
    eprintln!(
        "{mode}: 50 refusals in {:?} logged {logged} times",
        t.elapsed()
    );
    assert!(logged >= 1, "no {needle:?} in:\n{}", e.log());
    assert!(
        logged <= loggers * (secs + 1),
        "50 refusals in {secs} s were logged {logged} times:\n{}",
        e.log()
    );
    // 127.0.0.3 is not affected by 127.0.0.2's count.
    let _theirs: Vec<TcpStream> = (0..others)
        .map(|i| {
            let mut s = connect_from(ip(3), addr, LIMIT).expect("connect from 127.0.0.3");
            echo_on(
                &mut s,
                &payload(100 + i as u64, 100),
                &format!("127.0.0.3 connection {i}"),
            );
            s
        })
        .collect();
    // 127.0.0.2's connections still echo; once one closes, a new one is
    // admitted.
    for (i, s) in mine.iter_mut().enumerate() {
        echo_on(s, b"still", &format!("127.0.0.2 connection {i}"));
    }
    drop(mine.remove(0));
    let (mut again, refused) = connect_when_admitted(ip(2), addr, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("127.0.0.2 not admitted after closing one: {e}"));
    eprintln!("{mode}: readmitted after {refused} refusals");
    echo_on(&mut again, b"back", "127.0.0.2 readmitted");
    e.assert_no_errors();
}

/// `prefork_per_ip_cap_counts_across_workers`: two workers with
/// `max_connections = 3` each and `max_connections_per_ip = 4`, so that
/// 127.0.0.2's four connections must sit on both workers: a fifth is
/// accepted and closed at once, and so are fifty more, logged as
/// `127.0.0.2 has max_connections_per_ip (4) connections: refusing
/// 127.0.0.2:PORT` at most once a second per worker; 127.0.0.3 is served
/// meanwhile; after 127.0.0.2 closes one, a new one is admitted.
#[test]
fn prefork_per_ip_cap_counts_across_workers() {
    per_ip_cap(
        "prefork",
        "workers = 2\nmax_connections = 3\noverload = \"wait\"",
        4,
        2,
        "ADDR has max_connections_per_ip (4) connections: refusing ADDR:",
        2,
    );
}

/// `io_uring_per_ip_cap_counts_across_workers`: the same with the io_uring
/// worker.
#[test]
fn io_uring_per_ip_cap_counts_across_workers() {
    per_ip_cap(
        "io_uring",
        "workers = 2\nmax_connections = 3\noverload = \"wait\"",
        4,
        2,
        "ADDR has max_connections_per_ip (4) connections: refusing ADDR:",
        2,
    );
}

/// `fork_per_ip_cap_is_counted_by_the_master`: the same in fork mode with
/// `max_connections_per_ip = 3` (the master counts live children per
/// address): 127.0.0.2 gets exactly 3, the next 50 are closed at once and
/// logged as `max_connections_per_ip reached: refusing` at most once a
/// second; 127.0.0.3 gets 3 of its own; after a close, 127.0.0.2 is
/// admitted again.
#[test]
fn fork_per_ip_cap_is_counted_by_the_master() {
    per_ip_cap(
        "fork",
        "",
        3,
        3,
        "max_connections_per_ip reached: refusing ADDR:",
        1,
    );
}

/// Closes `s` abortively: `SO_LINGER` 0, so the close sends a reset.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// The body of the reset-storm tests.
fn reset_storm(mode: &str) {
    let e = start(
        mode,
        "workers = 2\nmax_connections_per_ip = 3\nidle_timeout = 0",
    );
    let addr = e.addr();
    let workers = e.workers();
    let baseline: Vec<usize> = workers.iter().map(|&w| fd_count(w)).collect();
    let storm: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..75u64 {
                    let Ok(mut s) = connect_from(ip(2), addr, LIMIT) else {
                        continue;
                    };
                    match i % 3 {
                        // Reset at once.
                        0 => {}
                        // Reset while the server is echoing a burst.
                        1 => {
                            let _ = s.write_all(&payload(t * 100 + i, 100_000));
                        }
                        // Half-close, then reset before reading the echo.
                        _ => {
                            let _ = s.write_all(b"bye");
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                    }
                    reset(s);
                }
            })
        })
        .collect();
    for t in storm {
        t.join().expect("storm thread");
    }
    // The server closes its side of each: no descriptor is left behind...
    let settled = wait_until(Duration::from_secs(5), || {
        if prefork_like(mode) {
            workers.iter().map(|&w| fd_count(w)).collect::<Vec<_>>() == baseline
        } else {
            live_children_named(e.pid, "echod-conn").is_empty()
        }
    });
    assert!(
        settled,
        "connections left open after 300 resets: workers' descriptors {:?} (at start {baseline:?}), \
         connection children {:?}",
        workers.iter().map(|&w| fd_count(w)).collect::<Vec<_>>(),
        live_children_named(e.pid, "echod-conn")
    );
    // ...and no count: 127.0.0.2 gets exactly its 3 connections again.
    let _mine: Vec<TcpStream> = (0..3)
        .map(|i| {
            connect_when_admitted(ip(2), addr, Duration::from_secs(3))
                .unwrap_or_else(|err| panic!("127.0.0.2 connection {i} after the storm: {err}"))
                .0
        })
        .collect();
    let mut over = connect_from(ip(2), addr, LIMIT).expect("connect from 127.0.0.2");
    assert!(
        wait_closed(&mut over, Duration::from_secs(3)).is_some(),
        "a 4th connection from 127.0.0.2 was admitted after the storm"
    );
    assert_eq!(e.workers(), workers, "a worker died:\n{}", e.log());
    e.assert_no_errors();
}

/// `prefork_reset_storm_leaks_nothing`: 300 clients from 127.0.0.2 (with
/// `max_connections_per_ip = 3`, so most are refused) reset their
/// connections at once, or while a 100 kB burst is being echoed, or after
/// a half-close. Afterwards every worker holds exactly the descriptors it
/// held before, 127.0.0.2 is admitted exactly 3 times again (no count
/// leaked), no worker died and nothing was logged as an error.
#[test]
fn prefork_reset_storm_leaks_nothing() {
    reset_storm("prefork");
}

/// `io_uring_reset_storm_leaks_nothing`: the same with the io_uring worker.
#[test]
fn io_uring_reset_storm_leaks_nothing() {
    reset_storm("io_uring");
}

/// `fork_reset_storm_leaks_nothing`: the same in fork mode: every
/// connection child exits, and the master's per-address count is back to
/// zero.
#[test]
fn fork_reset_storm_leaks_nothing() {
    reset_storm("fork");
}

/// Sends `byte` as TCP urgent data (`send` with `MSG_OOB`).
fn send_urgent(s: &TcpStream, byte: u8) {
    use std::os::fd::AsRawFd;
    // SAFETY: the buffer is one valid byte for the length given, and the
    // descriptor is the open socket `s` borrows.
    let n = unsafe { libc::send(s.as_raw_fd(), [byte].as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "send(MSG_OOB): {}", std::io::Error::last_os_error());
}

/// One connection of the urgent-data tests: large messages (which a
/// worker with a pipe echoes through it next), then 8192 bytes, one byte
/// of urgent data and 100 bytes more, which must all come back in order,
/// the urgent byte in line (echod sets `SO_OOBINLINE`); with `shut`, the
/// client then shuts its side and must get end of stream right after
/// them.
fn urgent_round(e: &Echod, shut: bool, what: &str) {
    let mut s = connect(e.addr());
    for _ in 0..3 {
        echo_on(&mut s, &[b'a'; 8192], what);
    }
    s.write_all(&[b'x'; 8192]).unwrap();
    send_urgent(&s, b'!');
    s.write_all(&[b'y'; 100]).unwrap();
    let mut want = vec![b'x'; 8192];
    want.push(b'!');
    want.extend([b'y'; 100]);
    let mut got = vec![];
    let ended = if shut {
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.read_to_end(&mut got).map(|_| ())
    } else {
        let mut buf = [0u8; 16_384];
        let mut ended = Ok(());
        while got.len() < want.len() {
            match s.read(&mut buf) {
                Ok(0) => {
                    ended = Err(std::io::ErrorKind::UnexpectedEof.into());
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    ended = Err(e);
                    break;
                }
            }
        }
        ended
    };
    assert!(
        ended.is_ok() && got == want,
        "{what}: {ended:?} after {} bytes back of {}\n{}",
        got.len(),
        want.len(),
        e.log()
    );
}

/// `prefork_urgent_data_neither_stalls_nor_cuts_a_spliced_stream`: a
/// client that sends large messages (so that the worker echoes its next
/// one through its pipe), then 8192 bytes, one byte of urgent data
/// (`MSG_OOB`) and 100 bytes more gets every byte back, the urgent one in
/// line (`SO_OOBINLINE`), then end of stream once it shuts its side; with
/// `splice = true` as with `false`. Linux's `splice` stops before urgent
/// data: with that byte next it answers `EAGAIN` while the socket stays
/// readable, and 0 once the client has shut its side, though bytes
/// follow; neither may stall the connection (a worker spinning on a
/// level-triggered event) or end it early (a reset, with the rest
/// unread).
#[test]
fn prefork_urgent_data_neither_stalls_nor_cuts_a_spliced_stream() {
    for splice in [true, false] {
        let e = start("prefork", &format!("workers = 1\nsplice = {splice}"));
        for shut in [false, true] {
            urgent_round(&e, shut, &format!("splice = {splice}, shut = {shut}"));
        }
        e.assert_no_errors();
    }
}

/// `io_uring_and_fork_urgent_data_is_echoed_in_line`: the io_uring worker
/// and a fork-mode child, which receive with `recv` and `read` (never
/// `splice`), echo a byte of urgent data in line as the epoll worker does:
/// every byte comes back in order, then end of stream (see
/// `urgent_round`). An urgent byte alone, then silence: it comes back,
/// the serving process does not spin (under 100 CPU ticks over the 1 s
/// `idle_timeout`; none in fact), and the connection is closed at
/// `idle_timeout`. An urgent byte alone, then a shutdown: the byte, then
/// end of stream.
#[test]
fn io_uring_and_fork_urgent_data_is_echoed_in_line() {
    for mode in ["io_uring", "fork"] {
        let e = start(mode, "workers = 1\nidle_timeout = \"1s\"");
        for shut in [false, true] {
            urgent_round(&e, shut, &format!("{mode}, shut = {shut}"));
        }

        let mut s = connect(e.addr());
        echo_on(&mut s, b"abc", &format!("{mode}, before the urgent byte"));
        send_urgent(&s, b'!');
        let server = if mode == "fork" {
            let mut child = Vec::new();
            wait_until(LIMIT, || {
                child = live_children_named(e.pid, "echod-conn");
                child.len() == 1
            });
            child.first().copied()
        } else {
            e.workers().first().copied()
        };
        let server = server.unwrap_or_else(|| panic!("{mode}: no serving process"));
        let ticks0 = cpu_ticks(server).unwrap_or(0);
        let closed = wait_closed(&mut s, Duration::from_secs(5));
        // A child that exited has no ticks left to read: it did not spin.
        let spun = cpu_ticks(server).map_or(0, |t| t.saturating_sub(ticks0));
        assert!(
            closed.is_some(),
            "{mode}: a connection with only an urgent byte unread was not closed at idle_timeout\n{}",
            e.log()
        );
        assert!(
            spun < 100,
            "{mode}: the serving process spun ({spun} ticks) on an unread urgent byte"
        );

        let mut s = connect(e.addr());
        send_urgent(&s, b'!');
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = vec![];
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let ended = s.read_to_end(&mut back);
        assert!(
            ended.is_ok() && back == b"!",
            "{mode}: an urgent byte alone, then a shutdown: {ended:?}, {back:?} back"
        );
        e.assert_no_errors();
    }
}

/// `prefork_killed_workers_per_ip_counts_are_released`: two workers with
/// `max_connections = 2` and `max_connections_per_ip = 3`, so 127.0.0.2's
/// three connections sit on both. SIGKILL to the worker holding the most of
/// them cuts those (the client sees the close) and its counts in the shared
/// scoreboard must go with it: 127.0.0.2 is admitted exactly as many times
/// again as it lost, and then refused at the cap.
#[test]
fn prefork_killed_workers_per_ip_counts_are_released() {
    let e = start(
        "prefork",
        "workers = 2\nmax_connections = 2\nmax_connections_per_ip = 3\noverload = \"wait\"\nidle_timeout = 0",
    );
    let addr = e.addr();
    let mut mine: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = connect_from(ip(2), addr, LIMIT).expect("connect from 127.0.0.2");
            echo_on(&mut s, b"mine", &format!("127.0.0.2 connection {i}"));
            s
        })
        .collect();
    let peers: Vec<SocketAddr> = mine.iter().map(|s| s.local_addr().unwrap()).collect();
    let held = tcp_sockets_of_each(&e.workers());
    let (victim, cut_peers) = held
        .iter()
        .map(|(w, socks)| {
            let p: Vec<SocketAddr> = socks
                .iter()
                .map(|s| s.remote)
                .filter(|p| peers.contains(p))
                .collect();
            (*w, p)
        })
        .max_by_key(|(_, p)| p.len())
        .expect("workers");
    assert!(!cut_peers.is_empty(), "no worker holds 127.0.0.2: {held:?}");
    kill(victim, libc::SIGKILL);
    let (cut, kept): (Vec<TcpStream>, Vec<TcpStream>) = mine
        .drain(..)
        .partition(|s| cut_peers.contains(&s.local_addr().unwrap()));
    for mut s in cut {
        assert!(
            wait_closed(&mut s, Duration::from_secs(3)).is_some(),
            "a connection of the killed worker is still open"
        );
    }
    let mut again = Vec::new();
    for i in 0..cut_peers.len() {
        let (s, _) =
            connect_when_admitted(ip(2), addr, Duration::from_secs(5)).unwrap_or_else(|err| {
                panic!(
                    "127.0.0.2 not readmitted ({i} of {}) after its worker was killed: {err}\n{}",
                    cut_peers.len(),
                    e.log()
                )
            });
        again.push(s);
    }
    let mut over = connect_from(ip(2), addr, LIMIT).expect("connect from 127.0.0.2");
    assert!(
        wait_closed(&mut over, Duration::from_secs(3)).is_some(),
        "127.0.0.2 got more than 3 connections after a worker was killed"
    );
    for (i, mut s) in kept.into_iter().chain(again).enumerate() {
        echo_on(&mut s, b"still", &format!("127.0.0.2 connection {i}"));
    }
}

// ---------------------------------------------------------------------------
// 4. Descriptor exhaustion.
// ---------------------------------------------------------------------------

/// `prefork_worker_survives_descriptor_exhaustion`: under `RLIMIT_NOFILE`
/// 64, 120 clients connect to one worker. The worker accepts until
/// `accept` fails with `EMFILE`, logs `pausing accepts for 100 ms` (at
/// most about once a second), and during two seconds of exhaustion uses
/// less than 30% of a CPU (it does not spin on the readable listener) and
/// neither it nor the master dies. The clients it accepted are echoed;
/// as they close, the ones that waited in the backlog are accepted and
/// echoed in turn, and then a new client is served, by the same worker.
#[test]
fn prefork_worker_survives_descriptor_exhaustion() {
    worker_survives_descriptor_exhaustion("prefork");
}

/// `io_uring_worker_survives_descriptor_exhaustion`: the same with the
/// io_uring worker, whose accept requests complete with `EMFILE` at once
/// (io_uring reserves the descriptor before it waits for a connection):
/// it must pause rather than submit the next one at once, and resume as
/// its connections close.
#[test]
fn io_uring_worker_survives_descriptor_exhaustion() {
    worker_survives_descriptor_exhaustion("io_uring");
}

/// The body of the descriptor-exhaustion tests.
fn worker_survives_descriptor_exhaustion(mode: &str) {
    const CLIENTS: usize = 120;
    let d = Start::config(&mode_config(
        mode,
        "workers = 1\nidle_timeout = 0\nbacklog = 511",
    ))
    .nofile(64)
    .spawn();
    let addr = d.addr();
    let mut worker = Vec::new();
    assert!(
        wait_until(LIMIT, || {
            worker = d.workers();
            worker.len() == 1
        }),
        "no worker: {worker:?}\n{}",
        d.log()
    );
    let worker = worker[0];

    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(&[i as u8]).expect("write one byte");
            s
        })
        .collect();
    let needle = "pausing accepts for 100 ms";
    assert!(
        wait_until(LIMIT, || d.log().contains(needle)),
        "no {needle:?} in:\n{}",
        d.log()
    );
    let exhausted = Instant::now();

    // Two seconds of exhaustion: the listener stays readable all along.
    let (w0, m0) = (cpu_time(worker), cpu_time(d.pid));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let wall = t0.elapsed();
    let (w1, m1) = (cpu_time(worker), cpu_time(d.pid));
    let worker_cpu = w1.expect("worker alive") - w0.expect("worker alive");
    let master_cpu = m1.expect("master alive") - m0.expect("master alive");
    eprintln!("exhausted for {wall:?}: worker CPU {worker_cpu:?}, master CPU {master_cpu:?}");
    assert!(
        worker_cpu < wall * 3 / 10,
        "the worker used {worker_cpu:?} of CPU in {wall:?} of descriptor exhaustion"
    );
    assert!(
        master_cpu < wall * 3 / 10,
        "the master used {master_cpu:?} of CPU in {wall:?}"
    );
    assert!(alive(worker), "the worker died:\n{}", d.log());
    assert_eq!(
        d.workers(),
        vec![worker],
        "the worker was replaced:\n{}",
        d.log()
    );
    let pauses = d.log().matches(needle).count();
    let secs = exhausted.elapsed().as_secs() as usize;
    assert!(
        pauses <= secs + 2,
        "the pause was logged {pauses} times in {secs} s:\n{}",
        d.log()
    );

    // Which clients were accepted (their byte is back) and which wait.
    let mut waiting = Vec::new();
    let mut served = 0;
    for (i, mut s) in clients.drain(..).enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => {
                assert_eq!(b[0], i as u8, "client {i} got another client's byte");
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.set_nonblocking(false).unwrap();
                waiting.push((i, s));
            }
            other => panic!("client {i}: {other:?}\n{}", d.log()),
        }
        // Served clients close here, freeing descriptors for the others.
    }
    eprintln!("{served} clients served at once, {} waited", waiting.len());
    assert!(
        served >= 20,
        "only {served} clients were served under nofile 64"
    );
    assert!(
        !waiting.is_empty(),
        "every client was served: the limit of 64 descriptors was never hit"
    );
    // In connection order, each waiting client is accepted and echoed once
    // the earlier ones have closed.
    for (i, mut s) in waiting {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("waiting client {i} was never served: {e}\n{}", d.log()));
        assert_eq!(b[0], i as u8, "client {i} got another client's byte");
        echo_on(&mut s, b"after the wait", &format!("waiting client {i}"));
    }
    echo_once(addr, b"a new client");
    assert_eq!(
        d.workers(),
        vec![worker],
        "the worker was replaced:\n{}",
        d.log()
    );
    assert!(
        !d.log().contains(" ERROR "),
        "errors under descriptor exhaustion:\n{}",
        d.log()
    );
}

/// The lowest descriptor number `pid` does not hold: with no gap below it,
/// as in a freshly started echod process, how many it holds.
fn lowest_free_fd(pid: i32) -> u64 {
    (0..)
        .find(|n| std::fs::symlink_metadata(format!("/proc/{pid}/fd/{n}")).is_err())
        .unwrap()
}

/// Sets the soft `RLIMIT_NOFILE` of the running process `pid` (the hard
/// limit stays, so that the soft one can be raised again).
fn set_nofile(pid: i32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) on a process this test started, reading into a
    // local rlimit.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above, with a local rlimit to set.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
}

/// `prefork_splice_pipe_never_takes_the_last_descriptors`: a worker whose
/// `RLIMIT_NOFILE` leaves room for its splice pipe but then for no
/// connection starts without the pipe (saying why) and serves, echoing
/// with read and write.
///
/// Before, the pipe took the last two descriptors: the worker was ready
/// but failed every accept with `EMFILE` and served no one.
#[test]
fn prefork_splice_pipe_never_takes_the_last_descriptors() {
    let text = config("workers = 1\nidle_timeout = 0\nsplice = true");
    // How many descriptors a worker holds, its pipe included.
    let held = {
        let probe = start("prefork", "workers = 1\nidle_timeout = 0\nsplice = true");
        let worker = probe.workers()[0];
        lowest_free_fd(worker)
    };
    let e = Start::config(&text).nofile(held).spawn();
    assert!(e.wait_workers_up(1, LIMIT), "workers not up:\n{}", e.log());
    let mut s = connect(e.addr());
    echo_on(
        &mut s,
        b"served at the limit",
        "a client of a worker at its limit",
    );
    let mut big = vec![0u8; 64 * 1024];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    echo_on(&mut s, &big, "a large message without the pipe");
    assert!(
        e.log()
            .contains("would leave no descriptor for a connection"),
        "{}",
        e.log()
    );
    assert!(!e.log().contains(" ERROR "), "{}", e.log());
}

/// `fork_mode_accept_pause_is_logged_at_most_once_a_second`: a fork-mode
/// master out of descriptors (its soft `RLIMIT_NOFILE` lowered to what it
/// holds, while it runs) leaves the clients in the backlog, pauses
/// accepting without spinning and logs the pause at most once a second;
/// once the limit is raised again every waiting client is served.
///
/// Before, each 100 ms pause was logged: ten lines a second.
#[test]
fn fork_mode_accept_pause_is_logged_at_most_once_a_second() {
    let e = start("fork", "idle_timeout = 0");
    let addr = e.addr();
    echo_once(addr, b"before");
    set_nofile(e.pid, lowest_free_fd(e.pid));
    let needle = "pausing accepts for";
    let mut clients: Vec<TcpStream> = (0..3u8)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(&[i]).unwrap();
            s
        })
        .collect();
    assert!(
        wait_until(LIMIT, || e.log().contains(needle)),
        "{}",
        e.log()
    );
    let t0 = Instant::now();
    let c0 = cpu_time(e.pid).expect("master alive");
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_time(e.pid).expect("master alive") - c0;
    let wall = t0.elapsed();
    assert!(
        cpu < wall * 3 / 10,
        "the master used {cpu:?} of CPU in {wall:?}"
    );
    let pauses = e.log().matches(needle).count();
    assert!(
        pauses <= 5,
        "the pause was logged {pauses} times in {wall:?}:\n{}",
        e.log()
    );
    set_nofile(e.pid, 1024);
    for (i, s) in clients.iter_mut().enumerate() {
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap_or_else(|err| {
            panic!("waiting client {i} was never served: {err}\n{}", e.log())
        });
        assert_eq!(b[0], i as u8);
    }
}

// ---------------------------------------------------------------------------
// 5. Children that misbehave.
// ---------------------------------------------------------------------------

/// `fork_child_outliving_a_stop_is_killed_after_shutdown_timeout`: in fork
/// mode with `shutdown_timeout = "1s"`, a connection child whose client
/// never closes ignores SIGTERM and keeps echoing during the grace period
/// while new connections are refused; after about a second the master kills
/// it (logging `still running at its drain deadline`), the client sees
/// its connection closed, and the master exits 0 with the child reaped.
#[test]
fn fork_child_outliving_a_stop_is_killed_after_shutdown_timeout() {
    let mut e = start("fork", "shutdown_timeout = \"1s\"\nidle_timeout = 0");
    let addr = e.addr();
    let mut c = connect(addr);
    echo_on(&mut c, b"before", "the held connection");
    let mut child = Vec::new();
    assert!(
        wait_until(LIMIT, || {
            child = live_children_named(e.pid, "echod-conn");
            child.len() == 1
        }),
        "no connection child: {child:?}"
    );
    let child = child[0];

    let t0 = Instant::now();
    e.signal(libc::SIGTERM);
    // Graceful: the client is still served while the stop waits for it.
    std::thread::sleep(Duration::from_millis(100));
    echo_on(&mut c, b"during the grace period", "the held connection");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "too slow to test the grace period"
    );
    assert!(alive(child), "the child did not survive SIGTERM");
    assert!(
        wait_until(Duration::from_millis(700), || TcpStream::connect(addr)
            .is_err()),
        "new connections are still accepted while stopping"
    );

    let status = e
        .wait_exit(LIMIT)
        .unwrap_or_else(|| panic!("the master did not exit:\n{}", e.log()));
    let took = t0.elapsed();
    eprintln!("the master exited {status:?} {took:?} after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", e.log());
    assert!(
        took >= Duration::from_millis(900),
        "the child was not given its shutdown_timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the child was killed only after {took:?} (shutdown_timeout 1s)"
    );
    assert!(!alive(child), "the connection child survived the master");
    assert!(
        wait_closed(&mut c, Duration::from_secs(2)).is_some(),
        "the held connection is still open"
    );
    assert!(
        e.log()
            .contains("still running at its drain deadline; killing it"),
        "{}",
        e.log()
    );
}

/// `fork_mode_leaves_no_zombies`: 400 short connections in fork mode (four
/// clients at once) leave no zombie behind: sampled every 2 ms meanwhile,
/// no exited child stays unreaped for half a second (the master reaps on
/// SIGCHLD, not at its next tick), and afterwards the master has no child
/// at all, zombie or not.
#[test]
fn fork_mode_leaves_no_zombies() {
    let e = start("fork", "max_connections = 64");
    let addr = e.addr();
    let master = e.pid;
    // Stops the sampler when the test ends, also by a failed assertion or
    // a client's panic.
    let done = SetOnDrop::new();
    let sampler = {
        let done = done.flag();
        std::thread::spawn(move || {
            let mut first_seen = std::collections::HashMap::<i32, Instant>::new();
            let (mut worst_age, mut most, mut samples) = (Duration::ZERO, 0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let z = zombies_of(master);
                most = most.max(z.len());
                let now = Instant::now();
                first_seen.retain(|p, _| z.contains(p));
                for p in z {
                    let seen = *first_seen.entry(p).or_insert(now);
                    worst_age = worst_age.max(now - seen);
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (worst_age, most, samples)
        })
    };
    let clients: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    echo_once(addr, &payload(t * 1000 + i, 1 + (i as usize * 37) % 2000));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    // The children of the last connections exit just now.
    let settled = wait_until(Duration::from_secs(2), || e.children().is_empty());
    drop(done);
    let (worst_age, most, samples) = sampler.join().expect("sampler");
    eprintln!(
        "400 connections: at most {most} zombies at once, the oldest {worst_age:?}, {samples} samples"
    );
    assert!(samples >= 10, "the sampler did not run");
    assert!(
        settled,
        "children left after the last connection: {:?} (zombies {:?})",
        e.children(),
        zombies_of(e.pid)
    );
    // A master that reaped only at its 1 s tick would leave zombies for up
    // to a second. (How many exist at once, printed above, says little: a
    // busy master forks a batch of children per turn and reaps them in a
    // batch too.)
    assert!(
        worst_age < Duration::from_millis(500),
        "a zombie stayed unreaped for {worst_age:?}"
    );
    assert!(zombies_of(e.pid).is_empty());
    e.assert_no_errors();
}

// ---------------------------------------------------------------------------
// 6. Configuration input.
// ---------------------------------------------------------------------------

/// sysexits(3) `EX_CONFIG`, echod's exit code for a bad config.
const EX_CONFIG: i32 = 78;

/// What `echod -t` must make of a file.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Exit 78 with one line `echod: FILE:LINE:COL: KEY: ...` (or
    /// `echod: FILE:LINE:COL: ...` when the problem has no key, as a TOML
    /// syntax error) that contains the needle.
    At(usize, usize, Option<&'static str>, &'static str),
    /// The same, with the column left to the TOML parser.
    Line(usize, &'static str),
    /// Exit 0: a valid config.
    Valid,
}

/// The table of bad (and a few surprising but valid) files.
fn config_cases() -> Vec<(&'static str, Vec<u8>, Want)> {
    use Want::*;
    let c = |name, text: &str, want| (name, text.as_bytes().to_vec(), want);
    let b = |name, bytes: &[u8], want| (name, bytes.to_vec(), want);
    let long_mode = format!("mode = \"{}\"\n", "x".repeat(100_000));
    vec![
        c(
            "unknown key",
            "listen = [\"127.0.0.1:0\"]\nworkerz = 2\n",
            At(2, 1, Some("workerz"), "did you mean workers?"),
        ),
        c(
            "unknown key in [log]",
            "[log]\ncolour = true\n",
            At(2, 1, Some("log.colour"), "unknown key"),
        ),
        c(
            "unknown key with a control character",
            "\"a\\u0007b\" = 1\n",
            At(1, 1, Some("\"a\\u0007b\""), "unknown key"),
        ),
        c(
            "string for an integer",
            "workers = \"4\"\n",
            At(1, 11, Some("workers"), "found a string"),
        ),
        c(
            "float for an integer",
            "workers = 2.5\n",
            At(1, 11, Some("workers"), "found a float"),
        ),
        c(
            "table for an integer",
            "workers = { n = 1 }\n",
            At(1, 11, Some("workers"), "found a table"),
        ),
        c(
            "string for a boolean",
            "daemon = \"yes\"\n",
            At(1, 10, Some("daemon"), "expected true or false"),
        ),
        c(
            "zero workers",
            "workers = 0\n",
            At(1, 11, Some("workers"), "from 1 to 512, found 0"),
        ),
        c(
            "buffer below 512",
            "buffer_size = 511\n",
            At(1, 15, Some("buffer_size"), "from 512 to 16777216"),
        ),
        c(
            "buffer above 16 MiB",
            "buffer_size = 16777217\n",
            At(1, 15, Some("buffer_size"), "found 16777217"),
        ),
        c(
            "max_connections above the range",
            "max_connections = 1_000_001\n",
            At(1, 19, Some("max_connections"), "found 1000001"),
        ),
        c(
            "negative backlog",
            "backlog = -1\n",
            At(1, 11, Some("backlog"), "found -1"),
        ),
        c(
            "negative per-ip cap",
            "max_connections_per_ip = -3\n",
            At(1, 26, Some("max_connections_per_ip"), "found -3"),
        ),
        c(
            "negative duration",
            "idle_timeout = -5\n",
            At(1, 16, Some("idle_timeout"), "negative"),
        ),
        c(
            "negative duration string",
            "shutdown_timeout = \"-1s\"\n",
            At(1, 20, Some("shutdown_timeout"), "negative"),
        ),
        c(
            "huge integer",
            "max_connections = 99999999999999999999999999\n",
            At(
                1,
                19,
                Some("max_connections"),
                "found 99999999999999999999999999",
            ),
        ),
        c(
            "u64::MAX + 1",
            "max_requests_per_worker = 18446744073709551616\n",
            At(
                1,
                27,
                Some("max_requests_per_worker"),
                "non-negative integer",
            ),
        ),
        c(
            "huge duration",
            "worker_timeout = 99999999999\n",
            At(
                1,
                18,
                Some("worker_timeout"),
                "longer than the limit of one year",
            ),
        ),
        c(
            "busy poll over a second",
            "busy_poll = \"1.5s\"\n",
            At(1, 13, Some("busy_poll"), "longer than the limit of 1s"),
        ),
        c(
            "busy poll in an unknown unit",
            "busy_poll = \"50ns\"\n",
            At(1, 13, Some("busy_poll"), "unknown unit \"ns\""),
        ),
        c(
            "duration over a year",
            "idle_timeout = \"8761h\"\n",
            At(1, 16, Some("idle_timeout"), "longer than the limit"),
        ),
        c(
            "infinite duration",
            "idle_timeout = inf\n",
            At(1, 16, Some("idle_timeout"), "longer than the limit"),
        ),
        c(
            "NaN duration",
            "idle_timeout = nan\n",
            At(1, 16, Some("idle_timeout"), "not a number of seconds"),
        ),
        c(
            "date for a duration",
            "idle_timeout = 1979-05-27\n",
            At(1, 16, Some("idle_timeout"), "found a date-time"),
        ),
        c(
            "duration in words",
            "idle_timeout = \"5 minutes\"\n",
            At(1, 16, Some("idle_timeout"), "\"5 minutes\""),
        ),
        c(
            "unknown duration unit",
            "worker_timeout = \"10x\"\n",
            At(1, 18, Some("worker_timeout"), "unknown unit \"x\""),
        ),
        c(
            "two decimal points",
            "idle_timeout = \"1..5s\"\n",
            At(1, 16, Some("idle_timeout"), "is not a duration"),
        ),
        c(
            "host name for an address",
            "listen = [\"localhost:7\"]\n",
            At(1, 11, Some("listen"), "\"localhost:7\" is not an address"),
        ),
        c(
            "port out of range",
            "listen = [\"127.0.0.1:99999\"]\n",
            At(1, 11, Some("listen"), "is not an address"),
        ),
        c(
            "address without a port",
            "listen = [\"0.0.0.0\"]\n",
            At(1, 11, Some("listen"), "is not an address"),
        ),
        c(
            "duplicate address",
            "listen = [\"127.0.0.1:7\", \"127.0.0.1:7\"]\n",
            At(1, 26, Some("listen"), "listed twice"),
        ),
        c(
            "duplicate address, spelt differently",
            "listen = [\"[::1]:7\", \"[::1]:07\"]\n",
            At(1, 22, Some("listen"), "[::1]:7 is listed twice"),
        ),
        c(
            "empty listen",
            "listen = []\n",
            At(1, 10, Some("listen"), "empty"),
        ),
        c(
            "string for listen",
            "listen = \"127.0.0.1:7\"\n",
            At(1, 10, Some("listen"), "expected an array"),
        ),
        c(
            "integer in listen",
            "listen = [7]\n",
            At(1, 11, Some("listen"), "expected an address in quotes"),
        ),
        c(
            "bad mode",
            "mode = \"threads\"\n",
            At(
                1,
                8,
                Some("mode"),
                "expected \"prefork\" or \"fork\", found \"threads\"",
            ),
        ),
        c(
            "bad overload",
            "overload = \"drop\"\n",
            At(1, 12, Some("overload"), "found \"drop\""),
        ),
        c(
            "bad log level",
            "[log]\nlevel = \"verbose\"\n",
            At(2, 9, Some("log.level"), "found \"verbose\""),
        ),
        c(
            "bad log target",
            "[log]\ntarget = \"journal\"\n",
            At(2, 10, Some("log.target"), "found \"journal\""),
        ),
        c(
            "bad facility",
            "[log]\nfacility = \"local8\"\n",
            At(2, 12, Some("log.facility"), "found \"local8\""),
        ),
        c(
            "file target without a file",
            "[log]\ntarget = \"file\"\n",
            At(2, 10, Some("log.target"), "needs log.file"),
        ),
        c(
            "relative log file",
            "[log]\ntarget = \"file\"\nfile = \"echod.log\"\n",
            At(3, 8, Some("log.file"), "not an absolute path"),
        ),
        c(
            "log file without the file target",
            "[log]\nfile = \"/var/log/echod.log\"\n",
            At(
                2,
                8,
                Some("log.file"),
                "only used with log.target = \"file\"",
            ),
        ),
        c(
            "log as an integer",
            "log = 3\n",
            At(1, 7, Some("log"), "expected a table"),
        ),
        c(
            "log as an array of tables",
            "[[log]]\nlevel = \"info\"\n",
            At(1, 1, Some("log"), "found an array"),
        ),
        c(
            "log.level as a table",
            "log.level.x = 1\n",
            At(1, 5, Some("log.level"), "found a table"),
        ),
        c(
            "empty user",
            "user = \"\"\n",
            At(1, 8, Some("user"), "must not be empty"),
        ),
        c(
            "NUL in a user name",
            "user = \"a\\u0000b\"\n",
            At(1, 8, Some("user"), "contains a NUL character"),
        ),
        c(
            "relative pid file",
            "pid_file = \"run/echod.pid\"\n",
            At(1, 12, Some("pid_file"), "not an absolute path"),
        ),
        c(
            "control characters are escaped",
            "mode = \"\\u001b[31mred\"\n",
            At(1, 8, Some("mode"), "\"\\u001B[31mred\""),
        ),
        c(
            "a 100 kB value is cut",
            &long_mode,
            At(1, 8, Some("mode"), "xxx\"..."),
        ),
        c(
            "value missing",
            "workers = \n",
            At(1, 11, None, "invalid TOML"),
        ),
        c(
            "unterminated string",
            "mode = \"fork\n",
            At(1, 13, None, "invalid TOML"),
        ),
        c("key missing", "= 3\n", At(1, 1, None, "invalid TOML")),
        c(
            "duplicate key",
            "workers = 1\nworkers = 2\n",
            At(2, 1, None, "duplicate key \"workers\""),
        ),
        c(
            "duplicate table",
            "[log]\nlevel = \"info\"\n[log]\n",
            At(3, 2, None, "duplicate key \"log\""),
        ),
        b("NUL byte", b"workers = 2\n\x00\n", Line(2, "invalid TOML")),
        b(
            "Latin-1 in a comment",
            b"workers = 2\n# caf\xe9\n",
            At(2, 6, None, "not valid UTF-8"),
        ),
        b(
            "invalid UTF-8 in a value",
            b"user = \"\xff\"\n",
            At(1, 9, None, "not valid UTF-8"),
        ),
        b(
            "UTF-16",
            b"\xfe\xff\x00w\x00o\x00r",
            At(1, 1, None, "not valid UTF-8"),
        ),
        c("empty file", "", Valid),
        c("only a comment", "# nothing here\n", Valid),
        c("only a [log] header", "[log]\n", Valid),
        c(
            "CRLF line ends",
            "workers = 2\r\nmode = \"fork\"\r\n",
            Valid,
        ),
        c("UTF-8 byte order mark", "\u{feff}workers = 2\n", Valid),
        c("hexadecimal integer", "workers = 0x10\n", Valid),
    ]
}

/// Checks one `echod -t` outcome against `want`; returns the failure.
fn check_outcome(name: &str, path: &str, run: &Check, want: Want) -> Result<(), String> {
    let err = run.stderr.trim_end_matches('\n');
    let show = || format!("{name}: status {:?}, stderr {:?}", run.status, run.stderr);
    let located = |line: usize, col: Option<usize>, key: Option<&str>, needle: &str| {
        if run.status.code() != Some(EX_CONFIG) {
            return Err(format!("{}: expected exit {EX_CONFIG}", show()));
        }
        let mut prefix = format!("echod: {path}:{line}:");
        if let Some(col) = col {
            prefix.push_str(&format!("{col}: "));
            if let Some(key) = key {
                prefix.push_str(&format!("{key}: "));
            }
        }
        if !err.starts_with(&prefix) {
            return Err(format!("{}: expected it to start with {prefix:?}", show()));
        }
        if !err.contains(needle) {
            return Err(format!("{}: expected {needle:?}", show()));
        }
        if err.contains('\n') || err.chars().any(|c| c.is_control()) {
            return Err(format!("{}: not one clean line", show()));
        }
        if err.len() > 600 {
            return Err(format!("{name}: a {} byte message", err.len()));
        }
        if !run.stdout.is_empty() {
            return Err(format!("{}: printed a config {:?}", show(), run.stdout));
        }
        Ok(())
    };
    match want {
        Want::At(line, col, key, needle) => located(line, Some(col), key, needle),
        Want::Line(line, needle) => located(line, None, None, needle),
        Want::Valid if run.status.code() == Some(0) => Ok(()),
        Want::Valid => Err(format!("{}: expected a valid config", show())),
    }
}

/// `bad_config_files_exit_78_naming_file_line_column_and_key`: `echod -t`
/// on each file of a table of wrong configs (unknown keys, wrong types,
/// out-of-range, negative and huge numbers, bad and duplicate addresses,
/// bad durations and enum values, TOML syntax errors, duplicate keys and
/// tables, invalid UTF-8, NUL bytes, control characters, a 100 kB value)
/// exits 78 with one line that names the file, the line, the column and
/// the key, and prints no config; the empty file, a comment, CRLF line
/// ends and a byte order mark are valid.
#[test]
fn bad_config_files_exit_78_naming_file_line_column_and_key() {
    let dir = TempDir::new("hostile-cfg");
    let mut failures = Vec::new();
    for (i, (name, bytes, want)) in config_cases().into_iter().enumerate() {
        let path = dir.path(&format!("case{i}.toml"));
        std::fs::write(&path, &bytes).expect("write config");
        let run = check_config(&path, false, LIMIT);
        if let Err(e) = check_outcome(name, &path.display().to_string(), &run, want) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `unreadable_config_files_exit_78_naming_the_file`: a directory, a file
/// without read permission (checked as user 65534 when the test runs as
/// root), a kernel file even root may not read, `/dev/zero`, a file over
/// 1 MiB, a missing file and a dangling symlink each exit 78 with one line
/// `echod: PATH: reason`. (A user or group that does not exist is named
/// with its position: `config_errors::what_the_system_refuses_...`.)
#[test]
fn unreadable_config_files_exit_78_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("hostile-unreadable");
    let no_read = dir.path("no-read.toml");
    std::fs::write(&no_read, "workers = 2\n").unwrap();
    std::fs::set_permissions(&no_read, std::fs::Permissions::from_mode(0o000)).unwrap();
    let big = dir.path("big.toml");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
    let dangling = dir.path("dangling.toml");
    std::os::unix::fs::symlink(dir.path("nowhere"), &dangling).unwrap();
    let mut cases = vec![
        (dir.0.clone(), false, "Is a directory"),
        (no_read, true, "Permission denied"),
        (
            std::path::PathBuf::from("/dev/zero"),
            false,
            "larger than 1024 KiB",
        ),
        (big, false, "larger than 1024 KiB"),
        (dir.path("missing.toml"), false, "No such file or directory"),
        (dangling, false, "No such file or directory"),
    ];
    // Mode 0200: the kernel refuses to open it for reading, even to root.
    let write_only = std::path::PathBuf::from("/proc/sys/vm/drop_caches");
    if write_only.exists() {
        cases.push((write_only, false, "Permission denied"));
    }
    let mut failures = Vec::new();
    for (path, nobody, needle) in cases {
        let run = check_config(&path, nobody, LIMIT);
        let err = run.stderr.trim_end_matches('\n');
        let prefix = format!("echod: {}: ", path.display());
        if run.status.code() != Some(EX_CONFIG)
            || !err.starts_with(&prefix)
            || !err.contains(needle)
            || err.contains('\n')
            || !run.stdout.is_empty()
        {
            failures.push(format!(
                "{}: status {:?}, stderr {:?}; expected {EX_CONFIG} and {prefix:?}...{needle:?}",
                path.display(),
                run.status,
                run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

mod arbitrary_files {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::process::ExitStatusExt;

    /// `key = value` lines of known (and one misspelt) keys with values of
    /// every type, sometimes a `[log]` header.
    fn a_line() -> impl Strategy<Value = String> {
        // Every key echod knows (`log` as a table header), one misspelt.
        let mut keys: Vec<String> = echod::config::TOP_KEYS
            .iter()
            .filter(|k| **k != "log")
            .map(|k| (*k).to_owned())
            .collect();
        keys.extend(echod::config::LOG_KEYS.iter().map(|k| format!("log.{k}")));
        keys.push("workerz".into());
        keys.push("[log]".into());
        let key = prop::sample::select(keys);
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            (0i64..70_000).prop_map(|n| n.to_string()),
            "\"[a-z0-9.:/\\[\\] -]{0,12}\"",
            prop::sample::select(vec![
                "\"prefork\"",
                "\"fork\"",
                "\"epoll\"",
                "\"io_uring\"",
                "\"wait\"",
                "\"reject\"",
                "\"250ms\"",
                "\"1h\"",
                "1.5",
                "true",
                "[\"127.0.0.1:0\"]",
                "[\"[::1]:0\", \"[::1]:0\"]",
                "[]",
                "{ level = \"debug\" }",
                "\"root\"",
                "\"/tmp/echod-x\"",
                "\"file\"",
                "\"stderr\"",
                "nan",
                "1e400",
                "1979-05-27T07:32:00Z",
            ])
            .prop_map(str::to_owned),
        ];
        (key, value).prop_map(|(k, v)| {
            if k == "[log]" {
                k
            } else {
                format!("{k} = {v}")
            }
        })
    }

    /// Arbitrary bytes, plausible documents, and the sample config with a
    /// few bytes overwritten.
    fn a_file() -> impl Strategy<Value = Vec<u8>> {
        let sample = include_bytes!("../etc/echod.toml").to_vec();
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(a_line(), 0..10).prop_map(|l| l.join("\n").into_bytes()),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6).prop_map(
                move |edits| {
                    let mut text = sample.clone();
                    for (at, byte) in edits {
                        let i = at.index(text.len());
                        text[i] = byte;
                    }
                    text
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 32,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// `echod_never_crashes_on_any_config_file`: whatever bytes the
        /// file holds, `echod -t` exits by itself with 0 or 78, never by a
        /// signal; a refusal is one line naming the file; an accepted file
        /// prints an effective config that `echod -t` accepts again and
        /// prints identically.
        #[test]
        fn echod_never_crashes_on_any_config_file(bytes in a_file()) {
            let dir = TempDir::new("hostile-prop");
            let path = dir.path("echod.toml");
            std::fs::write(&path, &bytes).unwrap();
            let run = check_config(&path, false, LIMIT);
            prop_assert!(
                run.status.signal().is_none(),
                "echod died of signal {:?} on {:?}\n{}", run.status.signal(), bytes, run.stderr
            );
            let code = run.status.code();
            prop_assert!(
                code == Some(0) || code == Some(EX_CONFIG),
                "exit {:?}: {}", code, run.stderr
            );
            if code == Some(EX_CONFIG) {
                let err = run.stderr.trim_end_matches('\n');
                let prefix = format!("echod: {}", path.display());
                prop_assert!(err.starts_with(&prefix), "{:?}", err);
                prop_assert!(!err.contains('\n'), "{:?}", err);
                prop_assert!(run.stdout.is_empty());
            } else {
                let again = dir.path("again.toml");
                std::fs::write(&again, &run.stdout).unwrap();
                let second = check_config(&again, false, LIMIT);
                prop_assert_eq!(second.status.code(), Some(0), "{}", second.stderr);
                let body = |s: &str| {
                    s.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
                };
                prop_assert_eq!(body(&second.stdout), body(&run.stdout));
            }
        }
    }
}

/// Takes a copy of descriptor `fd` of process `pid` (`pidfd_getfd`: the
/// same open file description, as `dup` would give; allowed to the parent
/// that started it).
fn steal_fd(pid: i32, fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of
    // ours; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd reads only its integer arguments; the pidfd is
    // ours and closed right after.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: pidfd is a descriptor this function opened and owns.
    unsafe { libc::close(pidfd as i32) };
    if got < 0 {
        return Err(err);
    }
    // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(got as i32) })
}

/// `prefork_worker_survives_a_listener_that_stops_listening`: when the
/// shared listening socket stops listening (`shutdown(SHUT_RD)` on it, done
/// here through a copy of the master's descriptor), `accept` fails with
/// `EINVAL` without taking anything off a queue, and the listener stays
/// readable. The worker logs `accept: Invalid argument ...; pausing
/// accepts for 100 ms` and goes on serving the connection it holds (its
/// echo comes back), instead of retrying `accept` forever; after the
/// client leaves, SIGTERM stops echod within 10 s.
#[test]
fn prefork_worker_survives_a_listener_that_stops_listening() {
    worker_survives_a_listener_that_stops_listening("prefork");
}

/// `io_uring_worker_survives_a_listener_that_stops_listening`: the same
/// with the io_uring worker, whose accept request completes with `EINVAL`
/// (it used to exit, and be respawned into the same error).
#[test]
fn io_uring_worker_survives_a_listener_that_stops_listening() {
    worker_survives_a_listener_that_stops_listening("io_uring");
}

fn worker_survives_a_listener_that_stops_listening(mode: &str) {
    let mut e = start(mode, "workers = 1\nidle_timeout = 0");
    let addr = e.addr();
    let mut held = connect(addr);
    echo_on(&mut held, b"before", "the held connection");
    let inode = tcp_sockets()
        .values()
        .find(|s| s.listening() && s.local_port == addr.port())
        .map(|s| s.inode)
        .expect("the listening socket in /proc/net/tcp");
    let fd = std::fs::read_dir(format!("/proc/{}/fd", e.pid))
        .expect("the master's descriptors")
        .flatten()
        .find(|d| {
            std::fs::read_link(d.path())
                .is_ok_and(|t| t.to_string_lossy() == format!("socket:[{inode}]"))
        })
        .and_then(|d| d.file_name().to_str()?.parse::<i32>().ok())
        .expect("the master's descriptor of the listening socket");
    let listener = steal_fd(e.pid, fd).expect("pidfd_getfd");
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a descriptor this test owns.
    let rc = unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) };
    assert_eq!(rc, 0, "shutdown: {}", std::io::Error::last_os_error());
    assert!(
        e.wait_log("pausing accepts for 100 ms", LIMIT),
        "no pause after the failed accept:\n{}",
        e.log()
    );
    // Several pauses later, the worker still serves what it holds.
    std::thread::sleep(Duration::from_millis(350));
    echo_on(&mut held, b"after", "the held connection");
    drop(held);
    e.signal(libc::SIGTERM);
    assert!(
        e.wait_exit(LIMIT).is_some(),
        "echod did not stop after SIGTERM:\n{}",
        e.log()
    );
    assert!(e.log().contains("accept: Invalid argument"), "{}", e.log());
    assert!(
        !e.log().contains("respawning"),
        "a worker exited:\n{}",
        e.log()
    );
}

/// `fork_child_keeps_its_idle_timeout_after_a_sighup`: in fork mode with
/// `idle_timeout = "1s"`, a connection child sent `SIGHUP` (and `SIGUSR1`,
/// `SIGTTIN`: signals only the master acts on) while it waits for its
/// client lives on, and still closes the silent connection between 0.8 s
/// and 1.6 s after its last echo, as without the signals (not never: a
/// signal that interrupts the wait must not leave the child in a read
/// with no timeout).
#[test]
fn fork_child_keeps_its_idle_timeout_after_a_sighup() {
    let e = start("fork", "idle_timeout = \"1s\"");
    let mut s = connect(e.addr());
    echo_on(&mut s, b"one echo", "the connection");
    let last_echo = Instant::now();
    let mut children = Vec::new();
    assert!(
        wait_until(LIMIT, || {
            children = live_children_named(e.pid, "echod-conn");
            !children.is_empty()
        }),
        "no connection child"
    );
    assert_eq!(children.len(), 1, "{children:?}");
    let child = children[0];
    std::thread::sleep(Duration::from_millis(100));
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGTTIN] {
        kill(child, sig);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        alive(child) && state(child) != Some('T'),
        "the child did not survive the signals: {:?}",
        state(child)
    );
    let closed = wait_closed(&mut s, Duration::from_secs(5)).map(|_| last_echo.elapsed());
    eprintln!("closed {closed:?} after the last echo");
    let closed = closed.expect("the connection was still open 5 s after the signals");
    assert!(
        closed >= Duration::from_millis(800) && closed <= Duration::from_millis(1600),
        "closed {closed:?} after the last echo (idle_timeout 1s)"
    );
    e.assert_no_errors();
}

/// `fork_stuck_send_is_closed_at_idle_timeout`: in fork mode with
/// `idle_timeout = "1s"`, a client that sends without reading until its
/// writes block, then falls silent, loses its connection child about 1 s
/// after the last byte the child moved: within 1.25 s of the client seeing
/// its writes blocked for 300 ms, not the 2 s that one full send timeout
/// per write would take (a first write that moves a part, then a second
/// that moves nothing).
#[test]
fn fork_stuck_send_is_closed_at_idle_timeout() {
    let e = start("fork", "buffer_size = 65536\nidle_timeout = \"1s\"");
    let pattern = payload(11, PERIOD);
    let mut slow = connect(e.addr());
    let (sent, blocked) = send_until_blocked(&mut slow, &pattern, Duration::from_millis(300));
    let since = Instant::now();
    assert!(
        blocked,
        "the slow client's writes never blocked ({sent} bytes sent)"
    );
    let gone = wait_until(Duration::from_secs(5), || {
        live_children_named(e.pid, "echod-conn").is_empty()
    });
    let took = since.elapsed();
    eprintln!("the connection child exited {took:?} after the client's writes blocked for 300 ms");
    assert!(gone, "the connection child still runs 5 s later");
    assert!(
        took <= Duration::from_millis(1250),
        "the connection child exited {took:?} after the client's writes blocked for 300 ms"
    );
    drop(slow);
    echo_once(e.addr(), b"the next client");
    e.assert_no_errors();
}

/// The body of the many-addresses tests: with two workers and
/// `max_connections_per_ip = 1`, 2048 distinct loopback addresses
/// (127.0.8.0 and up) each open one connection and hold it; then 100 more
/// addresses come. Every one of them holds nothing, so every one must be
/// admitted (an estimate of the per-address counts, a count-min sketch of
/// 1024 buckets per worker, refused about 780 of the 2048, and most of the
/// 100). A second connection from a held address is still refused.
fn per_ip_cap_admits_every_new_address(mode: &str) {
    let e = start(
        mode,
        "workers = 2\nmax_connections = 2048\nmax_connections_per_ip = 1\nidle_timeout = 0",
    );
    let addr = e.addr();
    let source = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0800 + i));
    // Opens one connection from each of `sources`, then checks that each
    // echoes; returns the connections and the refused sources.
    let open = |sources: std::ops::Range<u32>| {
        let mut conns: Vec<(u32, TcpStream)> = sources
            .map(|i| {
                let s = connect_from(source(i), addr, LIMIT)
                    .unwrap_or_else(|e| panic!("connect from {}: {e}", source(i)));
                (i, s)
            })
            .collect();
        for (_, s) in &mut conns {
            s.write_all(b"mine?").expect("write");
        }
        let mut refused = Vec::new();
        for (i, s) in &mut conns {
            let mut buf = [0u8; 5];
            match s.read_exact(&mut buf) {
                Ok(()) if &buf == b"mine?" => {}
                Ok(()) => panic!("{}: wrong echo {buf:?}", source(*i)),
                Err(_) => refused.push(source(*i)),
            }
        }
        (conns, refused)
    };
    let (held, refused) = open(0..2048);
    assert!(
        refused.is_empty(),
        "{} of 2048 addresses holding nothing were refused, first {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    // The cap is counted across both workers, so both must hold some.
    let holding = tcp_sockets_of_each(&e.workers())
        .values()
        .filter(|socks| socks.len() > 100)
        .count();
    assert_eq!(
        holding, 2,
        "the connections are not spread over both workers"
    );
    let (more, refused) = open(2048..2148);
    assert!(
        refused.is_empty(),
        "{} of 100 new addresses were refused, first {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    // The cap itself still holds: a second connection from a held
    // address is refused.
    let mut second = connect_from(source(7), addr, LIMIT).expect("connect");
    let closed = wait_closed(&mut second, Duration::from_secs(3));
    assert!(
        closed.is_some(),
        "{}'s second connection was admitted",
        source(7)
    );
    drop((held, more));
    e.assert_no_errors();
}

/// `prefork_per_ip_cap_admits_every_new_address`: see
/// [`per_ip_cap_admits_every_new_address`].
#[test]
fn prefork_per_ip_cap_admits_every_new_address() {
    per_ip_cap_admits_every_new_address("prefork");
}

/// `io_uring_per_ip_cap_admits_every_new_address`: the same with the
/// io_uring worker.
#[test]
fn io_uring_per_ip_cap_admits_every_new_address() {
    per_ip_cap_admits_every_new_address("io_uring");
}

// ---------------------------------------------------------------------------
// The io_uring worker's shared receive buffers.
// ---------------------------------------------------------------------------

/// The bound of one echo to a well-behaved client while others misbehave:
/// microseconds in fact; a worker whose buffers are all taken does not
/// answer at all.
const FAIR_ECHO: Duration = Duration::from_secs(2);

/// Starts one io_uring worker with `extra` keys, logging at debug level
/// (for the buffer pool's reclaim line), and checks that it really runs
/// io_uring.
fn start_io_uring_debug(extra: &str) -> Echod {
    let e = Echod::start(&format!(
        "listen = [\"127.0.0.1:0\"]\nmode = \"prefork\"\nio = \"io_uring\"\nworkers = 1\n\
         {extra}\n[log]\ntarget = \"stderr\"\nlevel = \"debug\"\n"
    ));
    assert!(e.wait_workers_up(1, LIMIT), "workers not up:\n{}", e.log());
    assert_runs_io_uring(&e);
    e
}

/// Fails unless every worker runs the io_uring loop: none logged the
/// fallback to epoll, and each holds an io_uring descriptor and no epoll
/// one.
fn assert_runs_io_uring(e: &Echod) {
    assert!(
        !e.log().contains("io_uring unavailable"),
        "a worker fell back to epoll:\n{}",
        e.log()
    );
    for w in e.workers() {
        let fds = fd_targets(w);
        assert!(
            fds.iter().any(|t| t.contains("[io_uring]"))
                && !fds.iter().any(|t| t.contains("eventpoll")),
            "worker {w} does not run io_uring: {fds:?}"
        );
    }
}

/// One echo of 64 bytes on `s` within [`FAIR_ECHO`]; panics naming `what`
/// and the log otherwise.
fn fair_echo(e: &Echod, s: &mut TcpStream, round: u64, what: &str) {
    s.set_read_timeout(Some(FAIR_ECHO)).unwrap();
    let p = payload(round, 64);
    let t = Instant::now();
    match roundtrip(s, &p) {
        Ok(back) if back == p => {}
        Ok(_) => panic!("{what}: the echo differs"),
        Err(err) => panic!(
            "{what}: no echo within {FAIR_ECHO:?} ({err}, after {:?}): the worker starves \
             its other clients\n{}",
            t.elapsed(),
            e.log()
        ),
    }
}

/// Reads everything `s` gets until end of stream and checks that it is
/// exactly the `sent` bytes of `pattern` (as [`PERIOD`] repeats it).
fn read_back_exactly(s: &mut TcpStream, pattern: &[u8], sent: u64, what: &str) {
    s.set_nonblocking(false).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                assert!(
                    got + n as u64 <= sent,
                    "{what}: got more than the {sent} bytes it sent"
                );
                if let Some(at) = first_difference(pattern, got, &buf[..n]) {
                    panic!("{what}: the echo differs at byte {at} of {sent}");
                }
                got += n as u64;
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => panic!("{what}: read failed after {got} of {sent} bytes: {err}"),
        }
    }
    assert_eq!(got, sent, "{what}: got {got} of its {sent} bytes");
}

/// Sends `pattern` from offset `*sent` on the non-blocking `s` in chunks
/// of `chunk` bytes, each once the server's echo of the previous one has
/// gone into its socket (its send queue, seen from `/proc/net/tcp`, grew
/// by half a chunk at least), until that stops happening for 500 ms: the
/// server's send to `s` is then stuck (the client does not read, and its
/// small receive buffer is full), with at most a chunk and a half (96 KiB)
/// waiting behind it in the server. The server's send buffer takes a few
/// MB first: some 50 chunks, seconds alone, much longer when the rest of
/// the suite loads the CPUs and fills `/proc/net/tcp` (bounded at 120 s).
fn stick_the_echo(s: &mut TcpStream, server: SocketAddr, pattern: &[u8], sent: &mut u64) {
    let me = s.local_addr().unwrap();
    let chunk = 65536;
    let tx = || tcp_queues(server.port(), me).map_or(0, |(tx, _)| tx);
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the server's echo to a non-reading client never got stuck"
        );
        let before = tx();
        let at = (*sent % PERIOD as u64) as usize;
        let n = chunk.min(PERIOD - at);
        let k = match s.write(&pattern[at..at + n]) {
            Ok(k) => k as u64,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(err) => panic!("stuck client: write after {sent} bytes: {err}"),
        };
        *sent += k;
        if !wait_until(Duration::from_millis(500), || {
            tx() >= before + k.div_ceil(2)
        }) {
            return;
        }
    }
}

/// `io_uring_tiny_segments_from_a_stuck_client_starve_no_one`: with one
/// io_uring worker (`buffer_size = 65536`: 128 shared receive buffers), a
/// client with a small receive buffer that never reads first gets the
/// worker's echo to it stuck, then sends 1000 segments of 8 bytes, 2 ms
/// apart (each arrives alone, and a receive takes a whole buffer for
/// it). Meanwhile another connection echoes every 40 segments, each echo
/// within 2 s, and a new connection is served at the end: the stuck client
/// holds two buffers at most, not one per segment. When the client reads
/// at last it gets exactly its bytes. (Before the fix, about 128 segments
/// emptied the pool and every other connection waited for the stuck
/// client or `idle_timeout`.)
#[test]
fn io_uring_tiny_segments_from_a_stuck_client_starve_no_one() {
    let e = start_io_uring_debug("buffer_size = 65536\nidle_timeout = 0");
    let addr = e.addr();
    let mut other = connect(addr);
    fair_echo(&e, &mut other, 0, "the other connection, before");

    // The stuck client: a small receive buffer, set before connecting.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_tcp_nodelay(true).unwrap();
    sock.connect_timeout(&addr.into(), LIMIT).unwrap();
    let mut stuck: TcpStream = sock.into();
    stuck.set_nonblocking(true).unwrap();
    let pattern = payload(11, PERIOD);
    let mut sent: u64 = 0;
    let t = Instant::now();
    stick_the_echo(&mut stuck, addr, &pattern, &mut sent);
    eprintln!(
        "the echo to the stuck client is stuck after {sent} bytes ({:?})",
        t.elapsed()
    );

    for i in 0..1000u64 {
        let at = (sent % PERIOD as u64) as usize;
        match stuck.write(&pattern[at..(at + 8).min(PERIOD)]) {
            Ok(k) => sent += k as u64,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("stuck client: write after {sent} bytes: {err}"),
        }
        std::thread::sleep(Duration::from_millis(2));
        if i % 40 == 39 {
            fair_echo(
                &e,
                &mut other,
                i,
                &format!("the other connection, after {i} segments"),
            );
        }
    }
    let mut fresh = connect(addr);
    fair_echo(&e, &mut fresh, 1, "a new connection");
    assert_runs_io_uring(&e);

    read_back_exactly(&mut stuck, &pattern, sent, "the stuck client");
    e.assert_no_errors();
}

/// `io_uring_non_reading_clients_cannot_drain_the_buffer_pool`: with one
/// io_uring worker and `buffer_size = 524288` (the fewest shared receive
/// buffers: 16), twenty ordinary clients each send without reading until
/// their writes block. After each, another connection still echoes within
/// 2 s: the blocked clients' buffers are taken back (copied into memory of
/// their own; the worker logs "receive buffers low") instead of stalling
/// everyone; the worker's RSS grows by less than the buffers (8 MiB), two
/// buffers' worth per blocked client (20 MiB) and 20 MiB of slack. Then
/// each client reads and gets exactly its bytes, then end of stream.
/// (Before the fix, three such clients stalled the worker.)
#[test]
fn io_uring_non_reading_clients_cannot_drain_the_buffer_pool() {
    const CLIENTS: u64 = 20;
    let e = start_io_uring_debug("buffer_size = 524288\nidle_timeout = 0");
    let addr = e.addr();
    let worker = e.workers()[0];
    let mut other = connect(addr);
    fair_echo(&e, &mut other, 0, "the other connection, before");
    let rss_before = rss_kib(worker).expect("worker RSS");

    let mut hogs = Vec::new();
    for i in 0..CLIENTS {
        let pattern = payload(100 + i, PERIOD);
        let mut s = connect(addr);
        let (sent, blocked) = send_until_blocked(&mut s, &pattern, Duration::from_millis(200));
        assert!(
            blocked,
            "client {i}: its writes never blocked ({sent} bytes sent)"
        );
        fair_echo(
            &e,
            &mut other,
            i + 1,
            &format!("the other connection, {} blocked", i + 1),
        );
        hogs.push((s, pattern, sent));
    }
    let mut fresh = connect(addr);
    fair_echo(&e, &mut fresh, 99, "a new connection");
    assert_runs_io_uring(&e);
    assert!(
        e.log().contains("receive buffers low"),
        "the worker never took buffers back, so this test did not test it:\n{}",
        e.log()
    );
    let growth = rss_kib(worker)
        .expect("worker RSS")
        .saturating_sub(rss_before);
    eprintln!("worker RSS grew by {growth} KiB holding {CLIENTS} blocked clients");
    assert!(
        growth < (8 + 20 + 20) * 1024,
        "the worker's RSS grew by {growth} KiB holding {CLIENTS} blocked clients"
    );

    for (i, (mut s, pattern, sent)) in hogs.into_iter().enumerate() {
        read_back_exactly(&mut s, &pattern, sent, &format!("client {i}"));
    }
    e.assert_no_errors();
}

// ---------------------------------------------------------------------------
// 7. The worker loops' own paths: the accept cap, a full worker's resume
//    after a pause, the pipe after a failed splice.
// ---------------------------------------------------------------------------

/// A config with one worker, logging at debug level (for the per-connection
/// lines), plus `extra` keys.
fn debug_config(mode: &str, extra: &str) -> String {
    let io = if mode == "io_uring" {
        "mode = \"prefork\"\nio = \"io_uring\""
    } else {
        "mode = \"prefork\""
    };
    format!(
        "listen = [\"127.0.0.1:0\"]\n{io}\nworkers = 1\n{extra}\n\
         [log]\ntarget = \"stderr\"\nlevel = \"debug\"\n"
    )
}

/// The only worker of `e`, once it is in its event loop.
fn only_worker(e: &Echod) -> i32 {
    assert!(e.wait_workers_up(1, LIMIT), "workers not up:\n{}", e.log());
    e.workers()[0]
}

/// Stops `pid` with `SIGSTOP` and waits until it is stopped.
fn stop(pid: i32) {
    kill(pid, libc::SIGSTOP);
    assert!(
        wait_until(LIMIT, || state(pid) == Some('T')),
        "{pid} did not stop: {:?}",
        state(pid)
    );
}

/// `prefork_accept_flood_yields_to_connections_and_signals`: 600
/// connections queue up while the one epoll worker is stopped; then an
/// established client sends a message and shuts its side, and the worker
/// gets `SIGUSR1`, both behind the flood in epoll's ready list. Once the
/// worker is continued, the client's echo and end of stream, and the
/// signal, are handled after at most three accept calls' worth of
/// connections (64 each, `ACCEPTS_PER_CALL`), not after the whole queue:
/// the order of the worker's own log lines shows it, with no clock
/// involved. Every queued connection is still accepted, and served.
///
/// Without the cap the worker accepts until `EAGAIN`: all 600 lines come
/// first (a flood that keeps the queue full would keep it there for good).
#[test]
fn prefork_accept_flood_yields_to_connections_and_signals() {
    const FLOOD: usize = 600;
    const CAP: usize = 64;
    // worker_timeout = 0: the master must not take the stopped worker for
    // a hung one.
    let e = Echod::start(&debug_config(
        "prefork",
        "idle_timeout = 0\nworker_timeout = 0\nbacklog = 1024\nbalance = false",
    ));
    let worker = only_worker(&e);
    let addr = e.addr();
    // The established client, from its own address so its lines stand out.
    let mut client = connect_from(ip(2), addr, LIMIT).expect("connect the client");
    echo_on(&mut client, b"before the flood", "the established client");
    let client_port = client.local_addr().unwrap().port();

    stop(worker);
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            connect_from(ip(1), addr, LIMIT)
                .unwrap_or_else(|err| panic!("flood connection {i}: {err}"))
        })
        .collect();
    client.write_all(b"after the flood").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    kill(worker, libc::SIGUSR1);
    kill(worker, libc::SIGCONT);

    let mut back = Vec::new();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    client
        .read_to_end(&mut back)
        .unwrap_or_else(|err| panic!("the established client's echo: {err}\n{}", e.log()));
    assert_eq!(back, b"after the flood");

    let client_closed = format!("connection from 127.0.0.2:{client_port} closed");
    let reopened = "SIGUSR1: log reopened";
    let accepted = |log: &str| log.matches("connection from 127.0.0.1:").count();
    assert!(
        wait_until(LIMIT, || {
            let log = e.log();
            accepted(&log) >= FLOOD && log.contains(&client_closed) && log.contains(reopened)
        }),
        "not every line came: {} of {FLOOD} accepted\n{}",
        accepted(&e.log()),
        e.log()
    );
    // The flood's accept lines before the client's close and the signal.
    let log = e.log();
    let before = |needle: &str| accepted(&log[..log.find(needle).unwrap()]);
    let (before_close, before_signal) = (before(&client_closed), before(reopened));
    eprintln!(
        "{before_close} of {FLOOD} queued connections accepted before the client's close, \
         {before_signal} before SIGUSR1"
    );
    assert!(
        before_close <= 3 * CAP && before_signal <= 3 * CAP,
        "the worker accepted {before_close} queued connections before it served the \
         established client, {before_signal} before it handled SIGUSR1 (at most {} expected)",
        3 * CAP
    );
    // And the flood is served in turn.
    for (i, mut s) in flood.into_iter().enumerate().step_by(50) {
        echo_on(&mut s, b"flooded", &format!("flood connection {i}"));
    }
    assert_eq!(e.workers(), vec![worker], "{}", e.log());
    e.assert_no_errors();
}

/// The body of the reject-resume tests: one worker with `max_connections =
/// 2` and `overload = "reject"` holds two connections, and its soft
/// `RLIMIT_NOFILE` is lowered (while it runs) to what it holds: a third
/// client makes `accept` fail with `EMFILE`, and the worker pauses
/// accepting, at the cap. The limit is raised again: at the end of the
/// pause the worker must listen again and refuse the waiting client at
/// once (it is full, and `"reject"` says so), not stop accepting as an
/// `overload = "wait"` worker does, which would leave the client waiting
/// until a connection closes. The two connections keep echoing, and once
/// one closes a new client is served again.
fn full_worker_under_reject_resumes_after_a_pause(mode: &str) {
    let e = Echod::start(&debug_config(
        mode,
        "max_connections = 2\noverload = \"reject\"\nidle_timeout = 0\nsplice = false",
    ));
    let worker = only_worker(&e);
    let addr = e.addr();
    let mut c1 = connect(addr);
    echo_on(&mut c1, b"one", "1st connection");
    let mut c2 = connect(addr);
    echo_on(&mut c2, b"two", "2nd connection");
    set_nofile(worker, lowest_free_fd(worker));
    // The epoll worker's accept of this client fails. (The io_uring
    // worker's accept request in flight took its descriptor limit when it
    // was submitted: it takes this client and refuses it, and the next
    // request fails at once, since io_uring reserves the descriptor before
    // it waits for a connection.)
    let mut c3 = connect(addr);
    let paused = "pausing accepts for 100 ms (2 connections open)";
    assert!(e.wait_log(paused, LIMIT), "no {paused:?} in:\n{}", e.log());
    // A client that comes during the pause waits in the backlog.
    let mut c4 = connect(addr);
    set_nofile(worker, 1024);
    for (name, c) in [("3rd", &mut c3), ("4th", &mut c4)] {
        let closed = wait_closed(c, LIMIT);
        assert!(
            closed.is_some(),
            "{mode}: the {name} client, which waited through a pause at max_connections, \
             was never refused (the worker stopped accepting instead of listening on under \
             \"reject\"):\n{}",
            e.log()
        );
    }
    assert!(
        e.log().contains("max_connections (2) reached: refusing"),
        "{}",
        e.log()
    );
    echo_on(&mut c1, b"one again", "1st connection");
    echo_on(&mut c2, b"two again", "2nd connection");
    drop(c1);
    connect_when_admitted(ip(1), addr, LIMIT)
        .unwrap_or_else(|err| panic!("no connection admitted after a close: {err}\n{}", e.log()));
    assert_eq!(e.workers(), vec![worker], "{}", e.log());
    e.assert_no_errors();
}

/// `prefork_full_worker_under_reject_resumes_after_a_pause`: see
/// [`full_worker_under_reject_resumes_after_a_pause`], on the epoll worker.
#[test]
fn prefork_full_worker_under_reject_resumes_after_a_pause() {
    full_worker_under_reject_resumes_after_a_pause("prefork");
}

/// `io_uring_full_worker_under_reject_resumes_after_a_pause`: the same on
/// the io_uring worker, whose accept completes with `EMFILE`.
#[test]
fn io_uring_full_worker_under_reject_resumes_after_a_pause() {
    full_worker_under_reject_resumes_after_a_pause("io_uring");
}

/// `prefork_a_reset_between_the_two_splices_leaks_no_bytes`: a client
/// whose messages go through the worker's pipe (its last one was 4 KiB or
/// more) sends 16 KiB and resets the connection while the worker is
/// stopped. Continued, the worker splices the 16 KiB (still queued after
/// the reset) into its pipe and fails to splice them back out (the peer is
/// gone): the bytes left in the pipe must be discarded. The next client
/// whose message goes through the pipe gets exactly its own bytes back,
/// not the other client's.
#[test]
fn prefork_a_reset_between_the_two_splices_leaks_no_bytes() {
    let e = Echod::start(&debug_config(
        "prefork",
        "splice = true\nbuffer_size = 65536\nidle_timeout = 0\nworker_timeout = 0",
    ));
    let worker = only_worker(&e);
    let addr = e.addr();
    // A's first large message goes by read and write, and makes its next
    // one go through the pipe.
    let mut a = connect(addr);
    echo_on(&mut a, &[b'a'; 8192], "A's first large message");
    stop(worker);
    a.write_all(&[b'A'; 16384]).unwrap();
    reset(a);
    kill(worker, libc::SIGCONT);
    let gone = "closed (Reset); 8192 bytes echoed";
    assert!(
        e.wait_log(gone, LIMIT),
        "no {gone:?}: the worker did not fail on A's second message as this test \
         needs:\n{}",
        e.log()
    );
    // B: one large message by read and write, then two through the pipe.
    let mut b = connect(addr);
    echo_on(&mut b, &payload(1, 8192), "B's first large message");
    for i in 0..2 {
        let msg = payload(2 + i, 16384);
        let back = roundtrip(&mut b, &msg).unwrap_or_else(|err| panic!("B: {err}"));
        let foreign = back.iter().filter(|&&c| c == b'A').count();
        assert!(
            back == msg,
            "B's spliced message {i} came back with other bytes ({foreign} of A's \
             'A's among them)\n{}",
            e.log()
        );
    }
    drop(b);
    let spliced = "bytes echoed, 32768 through the pipe";
    assert!(
        e.wait_log(spliced, LIMIT),
        "B's messages did not go through the pipe, so this test did not test it:\n{}",
        e.log()
    );
    assert!(!e.log().contains("emptying the splice pipe"), "{}", e.log());
    e.assert_no_errors();
}

/// The descriptors of `pid`, by number, with their targets.
fn fds_by_number(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let (Some(n), Ok(t)) = (
                e.file_name().to_str().and_then(|n| n.parse().ok()),
                std::fs::read_link(e.path()),
            ) else {
                continue;
            };
            out.push((n, t.to_string_lossy().into_owned()));
        }
    }
    out
}

/// The descriptor numbers registered in `pid`'s epoll instance (the `tfd:`
/// lines of its `/proc/PID/fdinfo`).
fn epoll_registered(pid: i32) -> Vec<i32> {
    let (epfd, _) = fds_by_number(pid)
        .into_iter()
        .find(|(_, t)| t.contains("eventpoll"))
        .unwrap_or_else(|| panic!("{pid} has no epoll descriptor"));
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("tfd:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `prefork_a_resume_that_fails_half_way_registers_no_listener`: a worker
/// with two listeners pauses accepting (`EMFILE`), and when it resumes,
/// registering the second listener fails (a test hook,
/// `ECHOD_TEST_FAIL_LISTENER_ADD`, does what `fs.epoll.max_user_watches`
/// would do machine-wide). The first one, registered just before, must be
/// taken out again: while the failure lasts, the worker's epoll set
/// (`/proc/PID/fdinfo`) holds neither listener, and the failure is logged
/// and retried after a pause. Once registering works again, the worker
/// listens on both: the client that waited on the first listener is
/// served, and so is a new one on the second.
///
/// Without the rollback the first listener stays registered, the worker
/// is woken for it while it does not accept, and every later resume fails
/// with `EEXIST` on it: the worker never accepts again.
#[test]
fn prefork_a_resume_that_fails_half_way_registers_no_listener() {
    let dir = TempDir::new("resume");
    let flag = dir.path("fail");
    let text = "listen = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\nmode = \"prefork\"\nworkers = 1\n\
                idle_timeout = 0\nsplice = false\nworker_timeout = 0\n\
                [log]\ntarget = \"stderr\"\nlevel = \"info\"\n";
    let e = Start::config(text)
        .env("ECHOD_TEST_FAIL_LISTENER_ADD", flag.to_str().unwrap())
        .spawn();
    let worker = only_worker(&e);
    let addrs = e.addrs();
    assert_eq!(addrs.len(), 2, "{}", e.log());
    for &a in &addrs {
        echo_once(a, b"both listeners");
    }
    // The worker's listener descriptors, by the port they listen on.
    let sockets = tcp_sockets();
    let listener_fds: Vec<i32> = fds_by_number(worker)
        .into_iter()
        .filter(|(_, t)| {
            t.strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']')?.parse::<u64>().ok())
                .and_then(|inode| sockets.get(&inode))
                .is_some_and(|s| s.listening() && addrs.iter().any(|a| a.port() == s.local_port))
        })
        .map(|(n, _)| n)
        .collect();
    assert_eq!(listener_fds.len(), 2, "{:?}", fds_by_number(worker));
    let registered = |fds: &[i32]| {
        let set = epoll_registered(worker);
        fds.iter().filter(|f| set.contains(f)).count()
    };
    assert_eq!(
        registered(&listener_fds),
        2,
        "the listeners are not both in epoll"
    );

    // A pause: no descriptor for the next connection.
    set_nofile(worker, lowest_free_fd(worker));
    std::fs::write(&flag, b"").unwrap();
    let mut waiting = connect(addrs[0]);
    waiting.write_all(b"waited").unwrap();
    assert!(
        e.wait_log("pausing accepts for 100 ms", LIMIT),
        "{}",
        e.log()
    );
    set_nofile(worker, 1024);
    // The resume fails half-way, over and over (the line comes at most once
    // a second; without the rollback the retries fail with `EEXIST`).
    let failed = "epoll_ctl(ADD) of a listener: ";
    assert!(e.wait_log(failed, LIMIT), "no {failed:?} in:\n{}", e.log());
    // Neither listener is registered in between (a sample may, rarely,
    // fall within a retry, between its add and its rollback).
    let mut seen = 0;
    for _ in 0..5 {
        seen += usize::from(registered(&listener_fds[..]) > 0);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(
        seen <= 1,
        "a listener stayed in epoll after a resume failed half-way ({seen} of 5 samples)\n{}",
        e.log()
    );
    assert!(
        e.log()
            .contains("epoll_ctl(ADD) of a listener: No space left on device"),
        "{}",
        e.log()
    );
    std::fs::remove_file(&flag).unwrap();
    let mut buf = [0u8; 6];
    waiting.set_read_timeout(Some(LIMIT)).unwrap();
    waiting.read_exact(&mut buf).unwrap_or_else(|err| {
        panic!(
            "the client that waited on the first listener was never served: {err}\n{}",
            e.log()
        )
    });
    assert_eq!(&buf, b"waited");
    echo_once(addrs[1], b"the second listener");
    assert_eq!(
        registered(&listener_fds),
        2,
        "the listeners are not both back"
    );
    assert_eq!(e.workers(), vec![worker], "{}", e.log());
    e.assert_no_errors();
}
