//! The prefork workers' scheduling policy (`sched_policy`), read from
//! `/proc/PID/stat`: `"batch"` and `"other"` fix it, `"auto"` (the
//! default) turns a worker to `SCHED_BATCH` while its wake-ups each bring
//! many ready connections and back once they bring one, on both io
//! backends; the master keeps its own; a policy echod inherits outside the
//! normal class is left alone.
//!
//! The crowd is made deterministic: the worker is stopped (`SIGSTOP`), a
//! message goes out on each of [`CROWD`] connections, and the worker is
//! continued, so that its next wait returns every one of them at once,
//! whatever the machine's load.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const SCHED_OTHER: i32 = libc::SCHED_OTHER;
const SCHED_BATCH: i32 = libc::SCHED_BATCH;
const SCHED_IDLE: i32 = libc::SCHED_IDLE;

/// Connections in a crowd: far above the 2.5 per wait that turn `auto`.
const CROWD: usize = 16;
/// How long a test drives load while waiting for a policy to change.
const PATIENCE: Duration = Duration::from_secs(10);

fn policy(pid: i32) -> i32 {
    hostile::sched_policy(pid).expect("the worker's /proc stat")
}

/// The policy of this test's thread, which the echod it starts inherits.
fn own_policy() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("own /proc stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    after_comm
        .split(' ')
        .nth(41 - 3)
        .and_then(|f| f.parse().ok())
        .expect("policy field")
}

fn one_worker(io: &str, policy: Option<&str>) -> Echod {
    let key = policy.map_or(String::new(), |p| format!("sched_policy = \"{p}\""));
    Echod::start(&config(&format!("workers = 1\nio = \"{io}\"\n{key}")))
}

/// One round of the crowd: with the worker stopped, a message on every
/// connection; then the worker runs and every echo is read back.
fn crowd_round(worker: i32, conns: &mut [TcpStream], round: u64) {
    use std::io::{Read, Write};
    // SAFETY: kill(2) on a pid this test's echod forked and that is alive
    // (its master has not reaped it: the test holds connections to it).
    assert_eq!(unsafe { libc::kill(worker, libc::SIGSTOP) }, 0);
    // Stopped for real before the messages go out (the state is `T`).
    assert!(
        wait_until(Duration::from_secs(5), || hostile::state(worker)
            == Some('T')),
        "the worker did not stop"
    );
    let msgs: Vec<Vec<u8>> = (0..conns.len())
        .map(|i| payload(round * 1000 + i as u64, 64))
        .collect();
    for (c, m) in conns.iter_mut().zip(&msgs) {
        c.write_all(m).expect("send to a stopped worker");
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGCONT) }, 0);
    for (c, m) in conns.iter_mut().zip(&msgs) {
        let mut back = vec![0; m.len()];
        c.read_exact(&mut back).expect("read an echo of the crowd");
        assert!(back == *m, "an echo of the crowd differs");
    }
}

/// Drives crowd rounds until the worker's policy is `want` or
/// [`PATIENCE`] has passed; returns the policy seen last.
fn crowd_until(worker: i32, conns: &mut [TcpStream], want: i32) -> i32 {
    let deadline = Instant::now() + PATIENCE;
    let mut round = 0;
    loop {
        crowd_round(worker, conns, round);
        round += 1;
        let p = policy(worker);
        if p == want || Instant::now() > deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `auto`: an idle worker runs `SCHED_OTHER`; a crowd on every wake-up
/// turns it to `SCHED_BATCH`; one connection at a time turns it back.
fn auto_follows_the_load(io: &str) {
    let e = one_worker(io, None);
    let worker = e.workers()[0];
    assert_eq!(policy(worker), SCHED_OTHER, "{io}: an idle auto worker");
    let mut conns: Vec<TcpStream> = (0..CROWD).map(|_| connect(e.addr())).collect();
    let seen = crowd_until(worker, &mut conns, SCHED_BATCH);
    assert_eq!(
        seen, SCHED_BATCH,
        "{io}: {CROWD} ready connections per wake-up for {PATIENCE:?} did not turn the worker to SCHED_BATCH"
    );
    assert_eq!(
        policy(e.pid),
        own_policy(),
        "{io}: the master's policy is not the one it was started with"
    );
    // One connection, one message at a time: one ready connection per
    // wake-up.
    let deadline = Instant::now() + PATIENCE;
    let mut i = 0;
    while policy(worker) != SCHED_OTHER && Instant::now() < deadline {
        let p = payload(i, 64);
        assert!(roundtrip(&mut conns[0], &p).expect("echo") == p);
        i += 1;
    }
    assert_eq!(
        policy(worker),
        SCHED_OTHER,
        "{io}: one message at a time for {PATIENCE:?} did not turn the worker back"
    );
    e.assert_no_errors();
}

#[test]
fn auto_follows_the_load_on_epoll() {
    auto_follows_the_load("epoll");
}

#[test]
fn auto_follows_the_load_on_io_uring() {
    auto_follows_the_load("io_uring");
}

/// `"other"` keeps a worker `SCHED_OTHER` under the crowd that turns
/// `auto` (a fixed number of rounds, each a wake-up with every connection
/// ready, over more than three of `auto`'s windows); `"batch"` makes it
/// `SCHED_BATCH` from the start, and one connection does not change that.
#[test]
fn other_and_batch_fix_the_policy() {
    for io in ["epoll", "io_uring"] {
        let e = one_worker(io, Some("other"));
        let worker = e.workers()[0];
        let mut conns: Vec<TcpStream> = (0..CROWD).map(|_| connect(e.addr())).collect();
        let start = Instant::now();
        let mut round = 0;
        while start.elapsed() < Duration::from_millis(400) || round < 20 {
            crowd_round(worker, &mut conns, round);
            round += 1;
        }
        assert_eq!(policy(worker), SCHED_OTHER, "{io}: \"other\" under a crowd");
        e.assert_no_errors();

        let e = one_worker(io, Some("batch"));
        let worker = e.workers()[0];
        assert_eq!(policy(worker), SCHED_BATCH, "{io}: \"batch\"");
        assert_eq!(policy(e.pid), own_policy(), "{io}: the master's policy");
        let mut c = connect(e.addr());
        for i in 0..50 {
            let p = payload(i, 64);
            assert!(roundtrip(&mut c, &p).expect("echo") == p);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            policy(worker),
            SCHED_BATCH,
            "{io}: \"batch\" after one connection"
        );
        e.assert_no_errors();
    }
}

/// A worker that inherits a policy outside the normal class keeps it: under
/// `SCHED_IDLE` (as `chrt --idle 0` or systemd's `CPUSchedulingPolicy=idle`
/// would start echod), `"batch"` is not applied, and a line says so.
#[test]
fn an_inherited_idle_policy_is_kept() {
    let e = Start::config(&config("workers = 1\nsched_policy = \"batch\""))
        .sched_idle()
        .spawn();
    let worker = e.workers()[0];
    assert_eq!(
        policy(worker),
        SCHED_IDLE,
        "the worker's policy was changed"
    );
    assert!(
        e.wait_log(
            "scheduling policy SCHED_IDLE inherited; sched_policy = \"batch\" not applied",
            Duration::from_secs(5)
        ),
        "no line says the key was not applied:\n{}",
        e.log()
    );
    echo_once(e.addr(), b"idle but serving\r\n");
    e.assert_no_errors();
}

/// `auto` with `busy_poll`: the polls that return at once with nothing
/// while the worker spins are not wake-ups, and must not count as the waits
/// of a quiet worker; a crowd on every wake-up turns a busy-polling worker
/// to `SCHED_BATCH` as it does one that sleeps. (They did count: a window
/// of a few crowds and hundreds of empty polls averaged far below 2.5, so
/// `auto` never left `SCHED_OTHER` with `busy_poll` set.)
fn auto_with_busy_poll(io: &str) {
    let e = Echod::start(&config(&format!(
        "workers = 1\nio = \"{io}\"\nbusy_poll = \"200us\""
    )));
    let worker = e.workers()[0];
    let mut conns: Vec<TcpStream> = (0..CROWD).map(|_| connect(e.addr())).collect();
    let seen = crowd_until(worker, &mut conns, SCHED_BATCH);
    assert_eq!(
        seen, SCHED_BATCH,
        "{io}, busy_poll = \"200us\": {CROWD} ready connections per wake-up for {PATIENCE:?} did not turn the worker to SCHED_BATCH"
    );
    e.assert_no_errors();
}

#[test]
fn auto_with_busy_poll_on_epoll() {
    auto_with_busy_poll("epoll");
}

#[test]
fn auto_with_busy_poll_on_io_uring() {
    auto_with_busy_poll("io_uring");
}

/// `--single-process` started unprivileged under `SCHED_OTHER` with
/// `SCHED_RESET_ON_FORK` (as `chrt --reset-on-fork --other 0`, or systemd's
/// `CPUSchedulingResetOnFork=yes`, would): the process manages its own
/// policy, and the flag, which an unprivileged process may not clear, is
/// kept across the switch. (It was dropped from the call, so the kernel
/// refused every switch with EPERM: a warning, and `auto` gave up.)
#[test]
fn single_process_keeps_reset_on_fork() {
    let reset = libc::SCHED_RESET_ON_FORK;
    let text = config("workers = 1");
    let mut start = Start::config(&text)
        .arg("--single-process")
        .sched_policy(SCHED_OTHER | reset);
    // SAFETY: geteuid(2) takes no argument and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Unprivileged, as a user nothing else runs as: root (with
        // CAP_SYS_NICE) would be allowed to clear the flag.
        start = start.uid(27_000 + std::process::id() % 10_000);
    }
    let e = start.spawn();
    // SAFETY: sched_getscheduler(2) on the pid this test started; no
    // pointer is passed.
    let full = || unsafe { libc::sched_getscheduler(e.pid) };
    assert_eq!(full(), SCHED_OTHER | reset, "echod's policy at start");
    let mut conns: Vec<TcpStream> = (0..CROWD).map(|_| connect(e.addr())).collect();
    let seen = crowd_until(e.pid, &mut conns, SCHED_BATCH);
    assert_eq!(
        seen,
        SCHED_BATCH,
        "a crowd did not turn the --single-process echod to SCHED_BATCH:\n{}",
        e.log()
    );
    assert_eq!(
        full(),
        SCHED_BATCH | reset,
        "SCHED_RESET_ON_FORK was lost in the switch"
    );
    assert!(
        !e.log().contains("cannot set scheduling policy"),
        "a switch was refused:\n{}",
        e.log()
    );
    e.assert_no_errors();
}
