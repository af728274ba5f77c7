//! Runs the real `echod-bench` binary, briefly in every mode, against a tiny
//! echo server inside the test process (std threads on 127.0.0.1:0),
//! against servers that corrupt, refuse or close, and against the real
//! echod (both worker backends, and fork mode).
//!
//! Every child is bounded: it is killed by PID when it outlives its limit.
//! The in-process servers serve each connection with a thread whose reads
//! time out, so nothing here waits forever.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

mod common;

/// What the test server does to the bytes it echoes.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Flips the lowest bit of the byte at this offset of every connection.
    FlipByteAt(u64),
    /// Closes each connection after echoing this many bytes.
    CloseAfter(u64),
}

fn serve(mut sock: TcpStream, fault: Fault) {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf = [0u8; 16384];
    let mut offset = 0u64;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match fault {
            Fault::None => {}
            Fault::FlipByteAt(at) => {
                if (offset..offset + n as u64).contains(&at) {
                    chunk[(at - offset) as usize] ^= 1;
                }
            }
            Fault::CloseAfter(limit) => {
                if offset + n as u64 > limit {
                    let keep = (limit - offset) as usize;
                    let _ = sock.write_all(&chunk[..keep]);
                    return;
                }
            }
        }
        offset += n as u64;
        if sock.write_all(chunk).is_err() {
            return;
        }
    }
}

/// Starts an echo server with a thread per connection; it lives as long as
/// the test process.
fn echo_server(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            thread::spawn(move || serve(sock, fault));
        }
    });
    addr
}

/// Runs echod-bench with `args`, killing it by PID past `limit`.
fn bench(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn echod-bench");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "echod-bench {args:?} outlived {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait_with_output")
}

/// The raw text of a top-level field of the flat JSON object.
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let start = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    let rest = &json[start..];
    if let Some(s) = rest.strip_prefix('"') {
        let end = s.find('"').unwrap_or(s.len());
        return &s[..end];
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    &rest[..end]
}

fn num(json: &str, key: &str) -> f64 {
    field(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

/// Runs a mode that must succeed and returns its JSON.
fn run_ok(args: &[&str]) -> String {
    let out = bench(args, Duration::from_secs(20));
    let json = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "echod-bench {args:?} failed ({}): {json}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    assert_eq!(json.lines().count(), 1, "{json}");
    assert_eq!(field(&json, "ok"), "true", "{json}");
    assert_eq!(num(&json, "mismatches"), 0.0, "{json}");
    assert_eq!(num(&json, "errors"), 0.0, "{json}");
    json
}

/// pingpong verifies every round trip, reports percentiles, and meters the
/// server's CPU time (the server here is this very process).
#[test]
fn pingpong_verifies_and_meters_the_server() {
    let addr = echo_server(Fault::None).to_string();
    let me = std::process::id().to_string();
    let json = run_ok(&[
        "pingpong",
        "-a",
        &addr,
        "-c",
        "4",
        "-t",
        "2",
        "-d",
        "0.6",
        "--warmup",
        "0.2",
        "--server-pid",
        &me,
        "--json",
    ]);
    assert_eq!(field(&json, "mode"), "pingpong");
    assert!(num(&json, "messages") > 0.0, "{json}");
    assert!(num(&json, "msgs_per_s") > 0.0, "{json}");
    assert!(num(&json, "rtt_p50_us") > 0.0, "{json}");
    assert!(
        num(&json, "rtt_p999_us") >= num(&json, "rtt_p50_us"),
        "{json}"
    );
    assert!(num(&json, "server_processes") >= 1.0, "{json}");
    // Present even if the clock ticks (10 ms) saw no CPU time.
    assert!(num(&json, "server_cpu_us_per_msg") >= 0.0, "{json}");
    // Present; the count itself is checked against echod below (this
    // server's threads end with their connections, and take their counts
    // with them).
    assert!(num(&json, "server_switches") >= 0.0, "{json}");
}

/// Every load of `echod-bench` against echod started with `extra` config
/// (two prefork workers, or fork mode): all verified with no mismatch or
/// error, the server metered.
fn every_load_against_echod(extra: &str, prefork: bool) {
    let processes = if prefork { 3.0 } else { 1.0 };
    let e = common::Echod::start(&common::config(extra));
    let addr = e.addr().to_string();
    let pid = e.pid.to_string();
    let timed = |mode: &str, c: &str, l: &str| {
        run_ok(&[
            mode,
            "-a",
            &addr,
            "-c",
            c,
            "-l",
            l,
            "-t",
            "2",
            "-d",
            "0.5",
            "--warmup",
            "0.2",
            "--server-pid",
            &pid,
            "--json",
        ])
    };
    for (mode, c, l) in [
        ("pingpong", "20", "64"),
        ("pingpong", "1", "1000"),
        ("stream", "3", "65536"),
        ("connrate", "4", "100"),
    ] {
        let json = timed(mode, c, l);
        assert!(num(&json, "messages") + num(&json, "bytes") > 0.0, "{json}");
        assert!(num(&json, "server_cpu_s") >= 0.0, "{json}");
        // Master and workers (fork mode: the master, and whatever
        // connection children were alive at the end sample).
        assert!(num(&json, "server_processes") >= processes, "{json}");
        if prefork && mode == "pingpong" && c == "1" {
            // One connection: the worker serving it sleeps until the
            // client's next message, which cannot come before the echo.
            // (Not in fork mode: a connection child's count leaves with
            // it when it exits.)
            assert!(num(&json, "server_switches_per_msg") > 0.5, "{json}");
        }
    }
    let json = run_ok(&[
        "hold",
        "-a",
        &addr,
        "-n",
        "200",
        "-d",
        "0.3",
        "--server-pid",
        &pid,
        "--json",
    ]);
    assert_eq!(num(&json, "held"), 200.0, "{json}");
    e.assert_no_errors();
}

/// `echod_prefork_passes_every_load`: echod-bench against echod's epoll
/// workers: ping-pong (20 and 1 connections), stream, connection rate and
/// hold, every byte verified; one connection costs its worker a context
/// switch per message.
#[test]
fn echod_prefork_passes_every_load() {
    every_load_against_echod("workers = 2", true);
}

/// `echod_io_uring_passes_every_load`: the same with the io_uring workers.
#[test]
fn echod_io_uring_passes_every_load() {
    every_load_against_echod("workers = 2\nio = \"io_uring\"", true);
}

/// `echod_fork_mode_passes_every_load`: the same in fork mode, a child per
/// connection.
#[test]
fn echod_fork_mode_passes_every_load() {
    every_load_against_echod("mode = \"fork\"\nmax_connections = 1024", false);
}

/// stream echoes verified bytes in both directions at once.
#[test]
fn stream_verifies_bytes() {
    let addr = echo_server(Fault::None).to_string();
    let json = run_ok(&[
        "stream", "-a", &addr, "-c", "2", "-l", "16k", "-d", "0.6", "--warmup", "0.2", "--json",
    ]);
    assert!(num(&json, "bytes") > 0.0, "{json}");
    assert!(num(&json, "mb_per_s") > 0.0, "{json}");
}

/// connrate opens, proves and closes connections over and over.
#[test]
fn connrate_counts_connections() {
    let addr = echo_server(Fault::None).to_string();
    let json = run_ok(&[
        "connrate", "-a", &addr, "-c", "2", "-d", "0.6", "--warmup", "0.2", "--json",
    ]);
    assert!(num(&json, "messages") > 0.0, "{json}");
    assert!(num(&json, "conns_per_s") > 0.0, "{json}");
}

/// hold opens N connections, keeps them idle, and proves each again; with
/// --server-pid it reports memory per connection.
#[test]
fn hold_keeps_every_connection() {
    let addr = echo_server(Fault::None).to_string();
    let me = std::process::id().to_string();
    let json = run_ok(&[
        "hold",
        "-a",
        &addr,
        "-n",
        "60",
        "-t",
        "2",
        "-d",
        "0.3",
        "--server-pid",
        &me,
        "--json",
    ]);
    assert_eq!(num(&json, "hold_requested"), 60.0, "{json}");
    assert_eq!(num(&json, "hold_proven"), 60.0, "{json}");
    assert_eq!(num(&json, "held"), 60.0, "{json}");
    assert!(num(&json, "server_rss_kib_held") > 0.0, "{json}");
    assert!(field(&json, "pss_kib_per_conn") != "null", "{json}");
}

/// A server that flips one byte makes the run fail with mismatches counted.
#[test]
fn corrupted_echo_fails_the_run() {
    let addr = echo_server(Fault::FlipByteAt(100)).to_string();
    for mode in ["pingpong", "stream"] {
        let out = bench(
            &[
                mode, "-a", &addr, "-c", "2", "-d", "0.5", "--warmup", "0.1", "--json",
            ],
            Duration::from_secs(20),
        );
        let json = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{mode}: {json}");
        assert_eq!(field(&json, "ok"), "false", "{json}");
        assert!(num(&json, "mismatches") > 0.0, "{json}");
        assert!(field(&json, "first_error").contains("differs"), "{json}");
    }
}

/// A server that stops echoing mid-message is a short echo: counted as
/// closed early, and the run fails.
#[test]
fn short_echo_fails_the_run() {
    let addr = echo_server(Fault::CloseAfter(1000)).to_string();
    let out = bench(
        &[
            "pingpong", "-a", &addr, "-c", "2", "-l", "300", "-d", "0.5", "--warmup", "0", "--json",
        ],
        Duration::from_secs(20),
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert!(num(&json, "closed") > 0.0, "{json}");
    assert_eq!(num(&json, "mismatches"), 0.0, "{json}");
}

/// Nothing listening: connect errors, exit status 1, and no hang.
#[test]
fn refused_connections_fail_the_run() {
    // A socket bound but never listening, kept for the whole test: a SYN to
    // its port finds no listener and is answered with a reset (connects are
    // refused), and without SO_REUSEADDR or SO_REUSEPORT on it no other
    // socket can bind the port meanwhile (a port bound and dropped could be
    // taken by another test's listener).
    let unheard = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let any_port: SocketAddr = "127.0.0.1:0".parse().expect("address");
    unheard.bind(&any_port.into()).expect("bind 127.0.0.1:0");
    let addr = unheard
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an inet address")
        .to_string();
    let out = bench(
        &[
            "connrate", "-a", &addr, "-d", "0.3", "--warmup", "0", "--json",
        ],
        Duration::from_secs(20),
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert!(num(&json, "connect_errors") > 0.0, "{json}");
    assert_eq!(num(&json, "messages"), 0.0, "{json}");
    drop(unheard);
}

/// A server that accepts but never answers: the echo times out, bounded by
/// --timeout, and the error says how far the connection got.
#[test]
fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    // Accepted connections are held open, unread, until the test ends.
    thread::spawn(move || {
        let held: Vec<TcpStream> = listener.incoming().take(2).flatten().collect();
        thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let started = Instant::now();
    let out = bench(
        &[
            "hold",
            "-a",
            &addr,
            "-n",
            "2",
            "-d",
            "0.1",
            "--timeout",
            "0.5",
            "--json",
        ],
        Duration::from_secs(20),
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(num(&json, "timeouts"), 2.0, "{json}");
    // The error says where the bytes stood: sent, none echoed, and the
    // client's send queue (the server accepted but never read).
    assert!(json.contains("bytes sent, 0 echoed, "), "{json}");
    assert!(json.contains("in its send queue"), "{json}");
    assert!(started.elapsed() < Duration::from_secs(10), "{json}");
}

/// Serves one connection of [`going_silent_server`]: echoes until
/// `silent_from`, then holds the connection open, reading and echoing
/// nothing, for longer than any run here.
fn echo_until(mut sock: TcpStream, silent_from: Instant) {
    let _ = sock.set_nodelay(true);
    let mut buf = [0u8; 16384];
    loop {
        let left = silent_from.saturating_duration_since(Instant::now());
        // A zero read timeout is refused by set_read_timeout: check first.
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match sock.read(&mut buf) {
            Ok(0) => return,
            // Bytes read once silent are kept, never echoed.
            Ok(_) if Instant::now() >= silent_from => break,
            Ok(n) => {
                if sock.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => return,
        }
    }
    thread::sleep(Duration::from_secs(20));
    drop(sock);
}

/// An echo server that goes silent `after` from now: every connection, old
/// or new, stays open but is neither read nor echoed any more.
fn going_silent_server(after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let silent_from = Instant::now() + after;
    thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            thread::spawn(move || echo_until(sock, silent_from));
        }
    });
    addr
}

/// `a_server_gone_silent_near_the_end_fails_the_run`: a server that
/// echoes, then holds its connections silently less than the timeout before
/// the end of the measured interval. The run does not stop at the end of
/// the interval with bytes unverified: it waits for what is in flight,
/// counts a timeout per stuck connection (connrate: per connection in
/// flight) and fails, within the timeout of the end.
#[test]
fn a_server_gone_silent_near_the_end_fails_the_run() {
    for mode in ["pingpong", "stream", "connrate"] {
        // Silent from 0.6 s; the interval ends at 1.2 s; a connection stuck
        // since 0.6 s times out at 2.1 s at the earliest, after the end.
        let addr = going_silent_server(Duration::from_millis(600)).to_string();
        let started = Instant::now();
        let out = bench(
            &[
                mode,
                "-a",
                &addr,
                "-c",
                "2",
                "-t",
                "1",
                "-d",
                "1",
                "--warmup",
                "0.2",
                "--timeout",
                "1.5",
                "--json",
            ],
            Duration::from_secs(20),
        );
        let elapsed = started.elapsed();
        let json = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{mode}: {json}");
        assert_eq!(field(&json, "ok"), "false", "{mode}: {json}");
        assert_eq!(num(&json, "timeouts"), 2.0, "{mode}: {json}");
        assert_eq!(num(&json, "errors"), 2.0, "{mode}: {json}");
        assert!(
            field(&json, "first_error").starts_with("echo timed out"),
            "{mode}: {json}"
        );
        assert_eq!(field(&json, "deadline_hit"), "false", "{mode}: {json}");
        // The end (1.2 s) plus the timeout, and some slack for a loaded
        // machine; the hard deadline is 15.7 s.
        assert!(elapsed < Duration::from_secs(7), "{mode}: {elapsed:?}");
    }
}

/// A client that is not run for a while (here stopped with `SIGSTOP`, as a
/// frozen or overloaded machine would) does not blame the server: the time
/// is reported as a stall and left out of the echo timeouts.
#[test]
fn a_stopped_client_reports_a_stall_not_a_timeout() {
    // An echo server that says when the first bytes arrive: the client is
    // then in its loop, where a stall is measured.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut first = [0u8; 1];
            if sock.read_exact(&mut first).is_err() || sock.write_all(&first).is_err() {
                continue;
            }
            let _ = tx.send(());
            thread::spawn(move || serve(sock, Fault::None));
        }
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod-bench"))
        .args([
            "pingpong",
            "-a",
            &addr,
            "-c",
            "2",
            "-t",
            "1",
            "-d",
            "3",
            "--warmup",
            "0",
            "--timeout",
            "1",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn echod-bench");
    let pid = child.id() as libc::pid_t;
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("echod-bench sent nothing within 10 s");
    }
    thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the PID of our own child, which has not been
    // waited for, so the PID cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    thread::sleep(Duration::from_millis(1500));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("echod-bench outlived 20 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait_with_output");
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(num(&json, "timeouts"), 0.0, "{json}");
    assert!(num(&json, "client_stalls") >= 1.0, "{json}");
    assert!(num(&json, "client_stall_max_s") >= 1.2, "{json}");
}

/// --help documents every mode and flag; a bad flag is a usage error.
#[test]
fn help_and_usage_errors() {
    let out = bench(&["--help"], Duration::from_secs(10));
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "pingpong",
        "stream",
        "connrate",
        "hold",
        "--addr",
        "--connections",
        "--length",
        "--threads",
        "--duration",
        "--warmup",
        "--count",
        "--timeout",
        "--server-pid",
        "--json",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
    let out = bench(&["pingpong", "--no-such-flag"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    let out = bench(&[], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
}
