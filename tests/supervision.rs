//! The process tree under supervision, checked from `/proc`: the pool size
//! and the respawn of a killed worker, the fork-mode cap on live children,
//! nothing left behind when the master is killed, who holds which
//! descriptor after each fork (close-after-fork verified, not assumed), and
//! which worker holds which connection (`balance`).
//!
//! Connections are attributed to processes through their socket inodes:
//! `/proc/PID/fd` gives a process's `socket:[INODE]`s and `/proc/net/tcp{,6}`
//! gives each inode's state and ports.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

fn config_both(extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n{extra}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n"
    )
}

fn ports(addrs: &[SocketAddr]) -> Vec<u16> {
    addrs.iter().map(|a| a.port()).collect()
}

/// Opens `n` connections at once (one thread each, released together), so
/// that several prefork workers are woken while others are busy accepting,
/// and echoes once on each: when this returns, every one is accepted and
/// held by the process serving it.
fn open_burst(addrs: &[SocketAddr], n: usize, seed: u64) -> Vec<TcpStream> {
    let go = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let a = addrs[i % addrs.len()];
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                go.wait();
                let mut s = connect(a);
                let p = payload(seed * 1000 + i as u64, 100 + i);
                let back = roundtrip(&mut s, &p).unwrap_or_else(|e| panic!("echo via {a}: {e}"));
                assert!(back == p, "echo via {a} differs");
                s
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect()
}

/// Which process holds each client connection, by the client's address:
/// every established socket on a server port held by one of `pids`.
fn holders(pids: &[i32], server_ports: &[u16]) -> HashMap<SocketAddr, Vec<i32>> {
    let mut out: HashMap<SocketAddr, Vec<i32>> = HashMap::new();
    for (p, socks) in tcp_sockets_of_each(pids) {
        for s in socks {
            if s.state == "01" && server_ports.contains(&s.local_port) {
                out.entry(s.remote).or_default().push(p);
            }
        }
    }
    out
}

fn client_addr(s: &TcpStream) -> SocketAddr {
    s.local_addr().unwrap()
}

/// Asserts the connection was closed by the server side: end of stream or
/// a reset, within `limit` (a timeout means some process still holds it).
fn assert_closed_by_server(s: &mut TcpStream, limit: Duration, what: &str) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected end of stream or reset, got {other:?}"),
    }
}

/// Whether `pid` is still an echod process (guards against pid reuse).
fn echod_alive(pid: i32) -> bool {
    alive(pid) && comm(pid).is_some_and(|c| c.starts_with("echod"))
}

/// `prefork_pool_is_exactly_workers_and_a_killed_worker_is_replaced`: the
/// master has exactly `workers` children, all `echod-worker`; a worker
/// killed with SIGKILL is replaced within 3 s (a new pid, the count back
/// to `workers`; the master respawns it 100 ms after the death, its
/// crash-loop delay for a worker that died young, and the bound leaves room
/// for a busy CI machine); its own connections are closed; the connections held
/// by the surviving workers keep echoing; new connections are served.
#[test]
fn prefork_pool_is_exactly_workers_and_a_killed_worker_is_replaced() {
    const WORKERS: usize = 3;
    let e = Echod::start(&config_both(&format!("workers = {WORKERS}")));
    let addrs = e.addrs();
    let server_ports = ports(&addrs);
    assert!(
        wait_until(Duration::from_secs(5), || e.workers().len() == WORKERS),
        "workers: {:?}\n{}",
        e.workers(),
        e.log()
    );
    // Exactly `workers`, and no other child, and it stays so.
    for _ in 0..10 {
        let kids = e.children();
        assert_eq!(kids.len(), WORKERS, "children {kids:?}");
        for &k in &kids {
            assert_eq!(comm(k).as_deref(), Some("echod-worker"), "child {k}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = e.workers();

    // Open connections until at least two workers hold some, so that
    // killing one leaves survivors with connections to check.
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut held = HashMap::new();
    for round in 0..20 {
        conns.extend(open_burst(&addrs, 8, round));
        held = holders(&before, &server_ports);
        let distinct: HashSet<i32> = held.values().flatten().copied().collect();
        if distinct.len() >= 2 {
            break;
        }
    }
    for s in &conns {
        let h = held.get(&client_addr(s)).cloned().unwrap_or_default();
        assert_eq!(h.len(), 1, "connection {:?} held by {h:?}", s.local_addr());
    }
    let mut per_worker: HashMap<i32, usize> = HashMap::new();
    for h in held.values() {
        *per_worker.entry(h[0]).or_default() += 1;
    }
    assert!(
        per_worker.len() >= 2,
        "after {} connections only {per_worker:?} hold any: cannot check survivors",
        conns.len()
    );
    let victim = *per_worker.keys().next().unwrap();

    let t0 = Instant::now();
    // SAFETY: kill(2) on a worker of the echod this test started.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    let replaced = wait_until(Duration::from_secs(3), || {
        let w = e.workers();
        !echod_alive(victim)
            && w.len() == WORKERS
            && !w.contains(&victim)
            && w.iter().filter(|p| !before.contains(p)).count() == 1
    });
    let took = t0.elapsed();
    assert!(
        replaced,
        "no replacement within 3 s: workers {:?} (before {before:?}, killed {victim})\n{}",
        e.workers(),
        e.log()
    );
    let after = e.workers();
    let fresh = *after.iter().find(|p| !before.contains(p)).unwrap();
    // `...: killed by SIGKILL; respawning`, or, for a worker younger than
    // a second, `...: killed by SIGKILL 650ms after start; respawning in
    // 100ms (crash-loop guard)`.
    let killed_line = format!("(pid {victim}, gen 1): killed by SIGKILL");
    assert!(
        wait_until(Duration::from_secs(2), || e
            .log()
            .lines()
            .any(|l| l.contains(&killed_line) && l.contains("; respawning"))),
        "no '{killed_line} ... respawning' line:\n{}",
        e.log()
    );
    assert!(
        e.wait_log(
            &format!("(pid {fresh}, gen 1): spawned"),
            Duration::from_secs(2)
        ),
        "{}",
        e.log()
    );
    assert!(
        e.wait_workers_up(WORKERS, Duration::from_secs(5)),
        "{}",
        e.log()
    );
    eprintln!("worker {victim} replaced by {fresh} in {took:?}");

    for (i, s) in conns.iter_mut().enumerate() {
        let addr = client_addr(s);
        if held[&addr][0] == victim {
            assert_closed_by_server(
                s,
                Duration::from_secs(3),
                &format!("killed worker's connection {addr}"),
            );
        } else {
            let p = payload(7000 + i as u64, 5000);
            let back = roundtrip(s, &p).unwrap_or_else(|err| {
                panic!(
                    "surviving connection {addr} (worker {}): {err}",
                    held[&addr][0]
                )
            });
            assert!(back == p, "surviving connection {addr} echo differs");
        }
    }
    for (i, &a) in addrs.iter().cycle().take(6).enumerate() {
        echo_once(a, &payload(9000 + i as u64, 3000));
    }
    assert_eq!(e.workers().len(), WORKERS);
    assert_eq!(e.children().len(), WORKERS);
    e.assert_no_errors();
}

/// `fork_mode_caps_live_children_at_max_connections`: with
/// `max_connections = 4` and 10 clients arriving at once, each holding its
/// connection a while, every client is served, and the master never has
/// more than 4 children at once (it leaves the rest in the backlog).
#[test]
fn fork_mode_caps_live_children_at_max_connections() {
    const CAP: usize = 4;
    const CLIENTS: usize = 10;
    let e = Echod::start(&config(&format!(
        "mode = \"fork\"\nmax_connections = {CAP}"
    )));
    let addr = e.addr();
    let master = e.pid;
    // Stops the sampler when the test ends, also by a failed assertion.
    let stop = SetOnDrop::new();
    let max_children = Arc::new(AtomicUsize::new(0));
    let max_conn = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, max_children, max_conn, samples) = (
            stop.flag(),
            max_children.clone(),
            max_conn.clone(),
            samples.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Every child counts, zombies and just-forked ones too: the
                // master counts a child until it has reaped it.
                let kids = children_of(master);
                let conn = kids
                    .iter()
                    .filter(|&&k| comm(k).as_deref() == Some("echod-conn"))
                    .count();
                max_children.fetch_max(kids.len(), Ordering::Relaxed);
                max_conn.fetch_max(conn, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let go = Arc::new(Barrier::new(CLIENTS));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let go = go.clone();
            std::thread::spawn(move || -> Result<Duration, String> {
                go.wait();
                let t = Instant::now();
                let mut s = connect(addr);
                let p = payload(i as u64, 2000 + i);
                let back = roundtrip(&mut s, &p).map_err(|e| format!("client {i}: {e}"))?;
                if back != p {
                    return Err(format!("client {i}: echo differs"));
                }
                let served_after = t.elapsed();
                std::thread::sleep(Duration::from_millis(250));
                // Still served after holding.
                let back = roundtrip(&mut s, b"again").map_err(|e| format!("client {i}: {e}"))?;
                if back != b"again" {
                    return Err(format!("client {i}: second echo differs"));
                }
                Ok(served_after)
            })
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let took = t0.elapsed();
    drop(stop);
    sampler.join().unwrap();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "clients failed: {failed:?}\n{}", e.log());
    let (max_children, max_conn) = (
        max_children.load(Ordering::Relaxed),
        max_conn.load(Ordering::Relaxed),
    );
    eprintln!(
        "10 clients served in {took:?}; at most {max_children} children ({max_conn} echod-conn) over {} samples",
        samples.load(Ordering::Relaxed)
    );
    assert!(
        max_children <= CAP,
        "{max_children} children at once, cap {CAP}\n{}",
        e.log()
    );
    // The cap was reached (so the sampling saw the children at all), and
    // some clients waited for a slot: the last to be served waited at
    // least one hold period.
    assert_eq!(max_conn, CAP, "the cap was never reached");
    let slowest = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .max()
        .unwrap();
    assert!(
        *slowest >= Duration::from_millis(200),
        "no client waited: {slowest:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || e.children().is_empty()),
        "children left: {:?}",
        e.children()
    );
    e.assert_no_errors();
}

/// Kills the master with SIGKILL and checks that within 2 s none of
/// `pids` is left, the held connections are closed, and the ports are free.
fn assert_nothing_survives_master(mut e: Echod, pids: Vec<i32>, mut conns: Vec<TcpStream>) {
    let addrs = e.addrs();
    let t0 = Instant::now();
    e.signal(libc::SIGKILL);
    let gone = wait_until(Duration::from_secs(2), || {
        pids.iter().all(|&p| !echod_alive(p))
    });
    let left: Vec<(i32, Option<String>)> = pids
        .iter()
        .filter(|&&p| echod_alive(p))
        .map(|&p| (p, comm(p)))
        .collect();
    if !gone {
        // Do not leak them past the test: the harness finds descendants
        // through the master, which is gone.
        for &(p, _) in &left {
            // SAFETY: kill(2) on a child of the echod this test started,
            // checked above to still be an echod process.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        panic!("left after 2 s: {left:?}\n{}", e.log());
    }
    eprintln!(
        "{} children gone {:?} after the master's SIGKILL",
        pids.len(),
        t0.elapsed()
    );
    assert!(
        e.wait_exit(Duration::from_secs(1)).is_some(),
        "master not reaped"
    );
    for (i, s) in conns.iter_mut().enumerate() {
        assert_closed_by_server(s, Duration::from_secs(1), &format!("connection {i}"));
    }
    // No process holds a listener any more.
    for a in addrs {
        TcpListener::bind(a)
            .unwrap_or_else(|err| panic!("{a} still bound after the master died: {err}"));
    }
    e.assert_no_errors();
}

/// `sigkill_to_master_leaves_no_prefork_worker`: SIGKILL to the master of a
/// prefork pool (workers holding connections) leaves no echod process
/// behind within 2 seconds (PR_SET_PDEATHSIG).
#[test]
fn sigkill_to_master_leaves_no_prefork_worker() {
    let e = Echod::start(&config_both("workers = 3"));
    assert!(
        wait_until(Duration::from_secs(5), || e.workers().len() == 3),
        "{}",
        e.log()
    );
    let conns = open_burst(&e.addrs(), 6, 1);
    let pids = descendants(e.pid);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_nothing_survives_master(e, pids, conns);
}

/// `sigkill_to_master_leaves_no_connection_child`: the same in fork mode,
/// with live connection children.
#[test]
fn sigkill_to_master_leaves_no_connection_child() {
    let e = Echod::start(&config_both("mode = \"fork\""));
    let conns = open_burst(&e.addrs(), 4, 2);
    assert!(
        wait_until(Duration::from_secs(5), || e.children().len() == 4),
        "children {:?}",
        e.children()
    );
    let pids = descendants(e.pid);
    assert!(
        pids.iter()
            .all(|&p| comm(p).as_deref() == Some("echod-conn")),
        "{pids:?}"
    );
    assert_nothing_survives_master(e, pids, conns);
}

/// `fork_mode_child_holds_only_its_own_connection`: close-after-fork,
/// verified in `/proc`. Each connection child holds exactly one socket of
/// any kind: its own connection, established, to its client's port (not
/// a listener, not the master's signal pipe, not another client). The
/// master holds no client connection: its only TCP sockets are the
/// listeners.
#[test]
fn fork_mode_child_holds_only_its_own_connection() {
    let e = Echod::start(&config_both("mode = \"fork\""));
    let addrs = e.addrs();
    let server_ports = ports(&addrs);
    let conns = open_burst(&addrs, 5, 3);
    let mut clients: Vec<SocketAddr> = conns.iter().map(client_addr).collect();
    clients.sort_unstable();
    assert!(
        wait_until(Duration::from_secs(5), || e.children().len() == conns.len()),
        "children {:?}",
        e.children()
    );
    let kids = e.children();
    let mut all = kids.clone();
    all.push(e.pid);
    let mut tcp_of = tcp_sockets_of_each(&all);
    let mut served = Vec::new();
    for &k in &kids {
        assert_eq!(comm(k).as_deref(), Some("echod-conn"), "child {k}");
        let tcp = tcp_of.remove(&k).unwrap_or_default();
        assert_eq!(
            tcp.len(),
            1,
            "child {k} holds TCP sockets {tcp:?}; fds {:?}",
            fd_targets(k)
        );
        let s = &tcp[0];
        assert_eq!(
            s.state, "01",
            "child {k}'s socket is not established: {s:?}"
        );
        assert!(server_ports.contains(&s.local_port), "child {k}: {s:?}");
        assert!(
            clients.contains(&s.remote),
            "child {k} serves no client of ours: {s:?}"
        );
        let sockets = socket_inodes(k);
        assert_eq!(
            sockets,
            vec![s.inode],
            "child {k} holds other sockets; fds {:?}",
            fd_targets(k)
        );
        let targets = fd_targets(k);
        assert!(
            !targets.iter().any(|t| t.contains("eventfd")),
            "child {k} holds the workers' doorbell: {targets:?}"
        );
        served.push(s.remote);
    }
    served.sort_unstable();
    assert_eq!(served, clients, "each client served by exactly one child");

    let master = tcp_of.remove(&e.pid).unwrap_or_default();
    assert!(
        master.iter().all(TcpSocket::listening),
        "the master holds a non-listening TCP socket: {master:?}"
    );
    let mut listen_ports: Vec<u16> = master.iter().map(|s| s.local_port).collect();
    listen_ports.sort_unstable();
    let mut want = server_ports.clone();
    want.sort_unstable();
    assert_eq!(listen_ports, want, "the master's listeners");
    drop(conns);
    assert!(wait_until(Duration::from_secs(5), || e
        .children()
        .is_empty()));
    e.assert_no_errors();
}

/// `prefork_worker_holds_no_other_workers_descriptors`: every descriptor of
/// a prefork worker, except `anon_inode:*` (its own epoll), is either also
/// held by the master (listeners, stdio) or by no other worker; each client
/// connection is held by exactly one process; the master holds only
/// listening TCP sockets.
#[test]
fn prefork_worker_holds_no_other_workers_descriptors() {
    const WORKERS: usize = 3;
    let e = Echod::start(&config_both(&format!("workers = {WORKERS}")));
    let addrs = e.addrs();
    let server_ports = ports(&addrs);
    assert!(wait_until(Duration::from_secs(5), || e.workers().len() == WORKERS));
    let workers = e.workers();
    let mut conns = Vec::new();
    for round in 0..10 {
        conns.extend(open_burst(&addrs, 8, 10 + round));
        let held = holders(&workers, &server_ports);
        let distinct: HashSet<i32> = held.values().flatten().copied().collect();
        if distinct.len() >= 2 {
            break;
        }
    }
    let master_fds: HashSet<String> = fd_targets(e.pid).into_iter().collect();
    let fds: HashMap<i32, Vec<String>> = workers.iter().map(|&w| (w, fd_targets(w))).collect();
    for (&w, targets) in &fds {
        assert!(!targets.is_empty(), "cannot read worker {w}'s fds");
        for t in targets {
            if t.starts_with("anon_inode:") || master_fds.contains(t) {
                continue;
            }
            let others: Vec<i32> = fds
                .iter()
                .filter(|(&o, ts)| o != w && ts.contains(t))
                .map(|(&o, _)| o)
                .collect();
            assert!(
                others.is_empty(),
                "worker {w}'s {t} is also held by workers {others:?}"
            );
        }
    }
    let mut all = workers.clone();
    all.push(e.pid);
    let held = holders(&all, &server_ports);
    for s in &conns {
        let h = held.get(&client_addr(s)).cloned().unwrap_or_default();
        assert_eq!(h.len(), 1, "connection {:?} held by {h:?}", s.local_addr());
        assert_ne!(h[0], e.pid, "the master holds a client connection");
    }
    let master = tcp_sockets_of(e.pid);
    assert!(
        master.iter().all(TcpSocket::listening),
        "the master holds a non-listening TCP socket: {master:?}"
    );
    assert_eq!(master.len(), addrs.len(), "{master:?}");
    let distinct: HashSet<i32> = held.values().flatten().copied().collect();
    eprintln!("{} connections over workers {distinct:?}", conns.len());
    e.assert_no_errors();
}

/// How many of `conns` each of `workers` holds, in the order of `workers`.
fn split(workers: &[i32], server_ports: &[u16], conns: &[TcpStream]) -> Vec<usize> {
    let held = holders(workers, server_ports);
    workers
        .iter()
        .map(|w| {
            conns
                .iter()
                .filter(|s| held.get(&client_addr(s)).is_some_and(|h| h.contains(w)))
                .count()
        })
        .collect()
}

/// Opens `n` connections one after another, each accepted and echoed
/// before the next connects.
fn open_one_by_one(addrs: &[SocketAddr], n: usize, seed: u64) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(addrs[i % addrs.len()]);
            let p = payload(seed * 1000 + i as u64, 64);
            assert_eq!(roundtrip(&mut s, &p).unwrap(), p);
            s
        })
        .collect()
}

/// `balance` (on by default) with 2 workers. A worker passes on new
/// connections once it holds 2 more than the other; it takes one more only
/// when the other has not taken the queue over within the pass (5 ms),
/// which a loaded machine allows, hence the slack in the bounds.
/// - 16 connections one after another: epoll's exclusive wake-up hands
///   each to the same idle worker (the first in the listener's wait queue),
///   16/0 without balancing; spread with it.
/// - Then the clients of the first worker hang up, and 16 more connect one
///   after another: io_uring's one-shot accepts take turns (8 each, 8/16
///   in the end without balancing); with it, the emptied worker catches
///   up.
/// - Then a burst of 20 clients released together is spread too.
fn balance_spreads_connections(extra: &str) {
    let e = Echod::start(&config_both(&format!("workers = 2\n{extra}")));
    let addrs = e.addrs();
    let server_ports = ports(&addrs);
    assert!(wait_until(Duration::from_secs(5), || e.workers().len() == 2));
    assert!(e.wait_workers_up(2, Duration::from_secs(5)), "{}", e.log());
    let workers = e.workers();
    // Every one of `conns` is held by a worker, each worker holding at
    // least `least`.
    let assert_spread = |conns: &[TcpStream], least: usize, what: &str| {
        let counts = split(&workers, &server_ports, conns);
        assert_eq!(counts.iter().sum::<usize>(), conns.len(), "{counts:?}");
        assert!(
            counts.iter().all(|&n| n >= least),
            "{what} split {counts:?}"
        );
    };

    let conns = open_one_by_one(&addrs, 16, 50);
    assert_spread(&conns, 5, "16 connections one after another");

    let held = holders(&workers, &server_ports);
    let (gone, mut conns): (Vec<TcpStream>, Vec<TcpStream>) = conns.into_iter().partition(|s| {
        held.get(&client_addr(s))
            .is_some_and(|h| h.contains(&workers[0]))
    });
    drop(gone);
    assert!(
        wait_until(Duration::from_secs(5), || tcp_sockets_of(workers[0])
            .iter()
            .all(TcpSocket::listening)),
        "worker {} did not close its connections",
        workers[0]
    );
    conns.extend(open_one_by_one(&addrs, 16, 51));
    let counts = split(&workers, &server_ports, &conns);
    assert_eq!(counts.iter().sum::<usize>(), conns.len(), "{counts:?}");
    assert!(
        counts[0].abs_diff(counts[1]) <= 5,
        "after the first worker's clients left and 16 more came: {counts:?}"
    );

    let burst = open_burst(&addrs, 20, 52);
    assert_spread(&burst, 4, "a burst of 20");
    conns.extend(burst);
    let all = split(&workers, &server_ports, &conns);
    eprintln!("balance: {} connections held {all:?}", conns.len());
    e.assert_no_errors();
}

#[test]
fn balance_spreads_connections_over_epoll_workers() {
    balance_spreads_connections("");
}

#[test]
fn balance_spreads_connections_over_io_uring_workers() {
    balance_spreads_connections("io = \"io_uring\"");
}

/// Reads one byte from `s` within `limit`: `Ok(Some(b))`, `Ok(None)` at
/// the end of the stream, `Err` on a timeout or a reset.
fn read_byte(s: &mut TcpStream, limit: Duration) -> std::io::Result<Option<u8>> {
    s.set_read_timeout(Some(limit))?;
    let mut b = [0u8; 1];
    Ok((s.read(&mut b)? == 1).then_some(b[0]))
}

/// `fork_failure_holds_the_connection`: in fork mode, a connection whose
/// child cannot be forked (here the master runs as an unused uid with
/// `RLIMIT_NPROC = 2`: itself and one connection child) is neither closed
/// nor followed by more accepts that would close others: the master holds
/// it, logs one `ERROR`, leaves the next client in the listen backlog, and
/// forks for the held one as soon as a child exits (it is echoed then),
/// then serves the waiting one the same way. A `SIGTERM` while it holds a
/// connection closes that one, and the master exits 0 once its last child
/// is done.
///
/// Before the master held the connection, it closed it and every
/// connection queued behind it, each with a failed fork.
///
/// Needs root (to start echod as another user: root ignores
/// `RLIMIT_NPROC`); skipped otherwise.
#[test]
fn fork_failure_holds_the_connection() {
    use std::io::Write;
    if skip_unless_root("fork_failure_holds_the_connection") {
        return;
    }
    // A uid nothing else runs as, so that the process count is echod's.
    let uid = 47_000 + std::process::id() % 10_000;
    // RLIMIT_NPROC = 2: the master and one connection child.
    let mut e = Start::config(
        "listen = [\"127.0.0.1:0\"]\nmode = \"fork\"\nshutdown_timeout = \"20s\"\n\
         [log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
    )
    .uid(uid)
    .nproc(2)
    .spawn();
    let step = Duration::from_secs(10);
    let addr = e.addr();
    // A: the one connection child the limit allows.
    let mut a = connect(addr);
    assert_eq!(roundtrip(&mut a, b"a").unwrap(), b"a", "{}", e.log());
    // B and C queue together while the master is stopped, so that it finds
    // both at one wake-up.
    // SAFETY: kill(2) on the master this test started.
    unsafe { libc::kill(e.pid, libc::SIGSTOP) };
    let mut b = connect(addr);
    let mut c = connect(addr);
    b.write_all(b"b").unwrap();
    c.write_all(b"c").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(e.pid, libc::SIGCONT) };
    assert!(
        e.wait_log("holding the connection from", step),
        "{}",
        e.log()
    );
    // Several retries fail meanwhile (one every 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    for (name, s) in [("B", &mut b), ("C", &mut c)] {
        match read_byte(s, Duration::from_millis(200)) {
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!(
                "client {name} while A's child lives: {other:?}\n{}",
                e.log()
            ),
        }
    }
    assert_eq!(
        e.log().matches("holding the connection from").count(),
        1,
        "one connection held, the other left in the backlog\n{}",
        e.log()
    );
    // A's child exits: B gets its child and its echo, then C likewise.
    drop(a);
    assert_eq!(read_byte(&mut b, step).unwrap(), Some(b'b'), "{}", e.log());
    assert!(e.wait_log("failed forks", step), "{}", e.log());
    drop(b);
    assert_eq!(read_byte(&mut c, step).unwrap(), Some(b'c'), "{}", e.log());
    // D is held (C's child uses the second process) when SIGTERM comes.
    let held = e.log().matches("holding the connection from").count() + 1;
    let mut d = connect(addr);
    d.write_all(b"d").unwrap();
    assert!(
        wait_until(step, || e
            .log()
            .matches("holding the connection from")
            .count()
            == held),
        "{}",
        e.log()
    );
    // SAFETY: as above.
    unsafe { libc::kill(e.pid, libc::SIGTERM) };
    assert!(e.wait_log("the master stops", step), "{}", e.log());
    match read_byte(&mut d, step) {
        Ok(None) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the held client D after SIGTERM: {other:?}\n{}", e.log()),
    }
    // C still echoes: its child drains.
    assert_eq!(
        roundtrip(&mut c, b"still").unwrap(),
        b"still",
        "{}",
        e.log()
    );
    drop(c);
    assert!(
        e.wait_exit(step).is_some(),
        "the master did not exit\n{}",
        e.log()
    );
    let status = e.wait_exit(step).unwrap();
    assert!(status.success(), "{status:?}\n{}", e.log());
    let log = e.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") && !l.contains("holding the connection from"))
        .collect();
    assert!(errors.is_empty(), "unexpected errors {errors:#?}\n{log}");
}
