//! The integration-test harness: starts the real `echod` binary on a
//! temporary config, reads its log, and inspects its processes in `/proc`.
//! Every wait is bounded; every process a test starts is killed by PID when
//! the [`Echod`] handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const ECHOD: &str = env!("CARGO_BIN_EXE_echod");

/// The echod binary with stdin closed, stdout and stderr piped, and none
/// of the service manager's variables (the test run may itself be under
/// systemd) inherited.
pub fn echod_command() -> Command {
    let mut cmd = Command::new(ECHOD);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("JOURNAL_STREAM");
    cmd
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "echod-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running echod master started by a test.
pub struct Echod {
    pub child: Child,
    pub pid: i32,
    log: Arc<Mutex<String>>,
    pub dir: TempDir,
    pub config_path: PathBuf,
    exited: Option<ExitStatus>,
}

/// How to start echod.
pub struct Start<'a> {
    pub config: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Wait for the master's `ready:` line.
    pub wait_ready: bool,
    /// `RLIMIT_NOFILE` (soft and hard) for echod, as `prlimit --nofile`.
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC` (soft and hard) for echod, as `prlimit --nproc`.
    pub nproc: Option<u64>,
    /// Start echod as this uid and gid (needs root).
    pub uid: Option<u32>,
    /// Start echod without `CAP_SETUID` and `CAP_SETGID` (needs root): a
    /// root echod whose config checks pass and whose children cannot
    /// switch users.
    pub without_setuid_caps: bool,
    /// Start echod under this scheduling policy (with priority 0), as
    /// `chrt` would: `SCHED_IDLE`, or `SCHED_OTHER | SCHED_RESET_ON_FORK`
    /// (`chrt --reset-on-fork --other 0`).
    pub sched_policy: Option<libc::c_int>,
}

impl<'a> Start<'a> {
    pub fn config(config: &'a str) -> Start<'a> {
        Start {
            config,
            args: vec![],
            env: vec![],
            wait_ready: true,
            nofile: None,
            nproc: None,
            uid: None,
            without_setuid_caps: false,
            sched_policy: None,
        }
    }
    pub fn sched_idle(self) -> Self {
        self.sched_policy(libc::SCHED_IDLE)
    }
    pub fn sched_policy(mut self, policy: libc::c_int) -> Self {
        self.sched_policy = Some(policy);
        self
    }
    pub fn without_setuid_caps(mut self) -> Self {
        self.without_setuid_caps = true;
        self
    }
    pub fn nproc(mut self, n: u64) -> Self {
        self.nproc = Some(n);
        self
    }
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }
    pub fn spawn(self) -> Echod {
        Echod::spawn(self)
    }
}

impl Echod {
    /// Starts echod on `config` (TOML text) and waits until it is serving.
    pub fn start(config: &str) -> Echod {
        Start::config(config).spawn()
    }

    fn spawn(s: Start) -> Echod {
        let dir = TempDir::new("echod");
        let config_path = dir.path("echod.toml");
        std::fs::write(&config_path, s.config).expect("write config");
        let mut cmd = echod_command();
        cmd.arg("--config").arg(&config_path).args(&s.args);
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        if let Some(uid) = s.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let limits = [
            (libc::RLIMIT_NOFILE, s.nofile),
            (libc::RLIMIT_NPROC, s.nproc),
        ];
        if limits.iter().any(|(_, n)| n.is_some()) {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only calls setrlimit(2), which is
            // async-signal-safe, between fork and exec (after the uid
            // change, which it follows); so the limits are echod's own
            // and its pid is the one we hold.
            unsafe {
                cmd.pre_exec(move || {
                    for (resource, n) in limits {
                        let Some(n) = n else { continue };
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(resource, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if s.without_setuid_caps {
            without_setuid_caps(&mut cmd);
        }
        if let Some(policy) = s.sched_policy {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and
            // only calls sched_setscheduler(2) (a plain syscall, so
            // async-signal-safe) on the child itself, with a `sched_param`
            // that lives through the call.
            unsafe {
                cmd.pre_exec(move || {
                    let param = libc::sched_param { sched_priority: 0 };
                    if libc::sched_setscheduler(0, policy, &param) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn echod");
        let pid = child.id() as i32;
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    log.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        }
        let mut e = Echod {
            child,
            pid,
            log,
            dir,
            config_path,
            exited: None,
        };
        if s.wait_ready {
            // `ready:` is logged once every worker of the first generation
            // is in its epoll loop (when systemd would get READY=1).
            let ok = wait_until(Duration::from_secs(10), || {
                e.log().contains("master: ready: generation")
                    || e.log().contains("--single-process")
                    || e.try_exit().is_some()
            });
            assert!(
                ok && e.exited.is_none(),
                "echod did not start:\n{}",
                e.log()
            );
            // A worker that the kernel refuses io_uring runs epoll (and
            // says so before it is ready): a test of the io_uring worker
            // would then pass while testing the other one.
            let refusal_simulated = s.env.iter().any(|(k, _)| k == "ECHOD_TEST_NO_IO_URING");
            assert!(
                refusal_simulated
                    || !(s.config.contains("io = \"io_uring\"")
                        && e.log().contains("io_uring unavailable")),
                "the io_uring worker fell back to epoll, so this test cannot test it:\n{}",
                e.log()
            );
        }
        e
    }

    /// Everything echod wrote to stderr and stdout so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// How many times `needle` appears in the log.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The addresses echod reported as bound (`listening on ADDR`), in
    /// order, latest reload included.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        listening_addrs(&self.log())
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        *self
            .addrs()
            .first()
            .expect("echod reported no listening address")
    }

    /// The first bound IPv6 address.
    pub fn addr6(&self) -> SocketAddr {
        *self
            .addrs()
            .iter()
            .find(|a| a.is_ipv6())
            .expect("echod reported no IPv6 listening address")
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we started and still own.
        unsafe {
            libc::kill(self.pid, sig);
        }
    }

    /// The master's direct children.
    pub fn children(&self) -> Vec<i32> {
        children_of(self.pid)
    }

    /// The master's children whose `comm` is `echod-worker`.
    pub fn workers(&self) -> Vec<i32> {
        self.children()
            .into_iter()
            .filter(|&p| comm(p).as_deref() == Some("echod-worker"))
            .collect()
    }

    /// Waits until the master has exactly `n` workers (at least one) and
    /// each is in its event loop (its scoreboard heartbeat is not visible
    /// here, so: each has an epoll or io_uring descriptor).
    pub fn wait_workers_up(&self, n: usize, timeout: Duration) -> bool {
        assert!(n > 0, "wait_workers_up: a pool has at least one worker");
        wait_until(timeout, || {
            let w = self.workers();
            w.len() == n && w.iter().all(|&p| has_epoll(p))
        })
    }

    /// The pool size the master reported when it became ready (`ready:
    /// generation G: N workers`, prefork mode).
    pub fn ready_workers(&self) -> Option<usize> {
        let log = self.log();
        let rest = log.split("ready: generation ").nth(1)?;
        let (_, rest) = rest.split_once(": ")?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// Replaces the config file (for a reload).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).expect("write config");
    }

    /// The exit status, if the master has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Log lines at error level, for the "nothing unexpected" checks.
    pub fn error_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.starts_with("<3>"))
            .map(str::to_string)
            .collect()
    }

    /// Fails the test, showing the whole log, if echod logged an error.
    #[track_caller]
    pub fn assert_no_errors(&self) {
        assert!(
            self.error_lines().is_empty(),
            "errors in the log:\n{}",
            self.log()
        );
    }
}

impl Drop for Echod {
    /// Kills the master and every descendant, by PID, and reaps the master.
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let all = descendants(self.pid);
            // SAFETY: kill(2) on pids this test started (the master) and
            // their descendants found in /proc.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                for p in &all {
                    libc::kill(*p, libc::SIGKILL);
                }
            }
            let _ = self.child.wait();
        }
    }
}

/// The addresses an echod log reports as bound (`listening on ADDR`), in
/// order, latest reload included.
pub fn listening_addrs(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter(|l| !l.contains("no longer listening on"))
        .filter_map(|l| l.split("listening on ").nth(1))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// Whether a test that needs root must be skipped: it says so on stderr
/// (`SKIP: name needs root`) and returns true when the tests do not run as
/// root.
pub fn skip_unless_root(name: &str) -> bool {
    // SAFETY: geteuid(2) takes no argument and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIP: {name} needs root");
    }
    !root
}

/// The cleanup of a process tree a test started other than through
/// [`Echod`] (an activator that execs echod, a daemon that detached):
/// unless the process has exited, dropping the guard kills it and every
/// descendant by PID with `SIGKILL`, and reaps it if it is this test's
/// child.
pub struct KillTree {
    pid: i32,
    /// The process's start time when the guard was made: a pid that names
    /// another process by the time of the drop (the daemon exited and the
    /// pid was reused) is left alone.
    start: Option<u64>,
    /// Set when the process is this test's child: it is reaped here.
    child: Option<Child>,
}

impl KillTree {
    /// Guards a child of this test.
    pub fn child(child: Child) -> KillTree {
        let pid = child.id() as i32;
        KillTree {
            pid,
            start: start_time(pid),
            child: Some(child),
        }
    }

    /// Guards a process that is not this test's child (a detached daemon).
    pub fn pid(pid: i32) -> KillTree {
        KillTree {
            pid,
            start: start_time(pid),
            child: None,
        }
    }

    pub fn id(&self) -> i32 {
        self.pid
    }

    /// The child's stdout and stderr pipes, if they were piped.
    pub fn take_output(&mut self) -> (Option<ChildStdout>, Option<ChildStderr>) {
        match &mut self.child {
            Some(c) => (c.stdout.take(), c.stderr.take()),
            None => (None, None),
        }
    }

    /// The child's exit status, reaping it, if it has exited; `None` while
    /// it runs (and always for a guard made with [`KillTree::pid`]).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status
    }
}

impl Drop for KillTree {
    fn drop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        if self.start.is_none() || start_time(self.pid) != self.start {
            // Gone already (the pid no longer names the process the guard
            // was made for).
            if let Some(c) = &mut self.child {
                let _ = c.wait();
            }
            return;
        }
        let all = descendants(self.pid);
        // SAFETY: kill(2) on a process this test started, still the same
        // process (same start time), and its descendants found in /proc.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            for p in &all {
                libc::kill(*p, libc::SIGKILL);
            }
        }
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
    }
}

/// The start time of `pid` (field 22 of `/proc/PID/stat`, in clock ticks
/// since boot), which with the pid names one process.
fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Sets its flag when dropped: a sampler thread that loops until the flag
/// is set stops when the test ends, whether it passes or an assertion (or
/// a client thread) panics first.
pub struct SetOnDrop(pub Arc<AtomicBool>);

impl SetOnDrop {
    pub fn new() -> SetOnDrop {
        SetOnDrop(Arc::new(AtomicBool::new(false)))
    }

    /// The flag, for the sampler thread.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What a child writes to one pipe, collected by a thread as it comes, so
/// the child never blocks on a full pipe and the test can read the text
/// while the child runs.
pub struct Capture {
    text: Arc<Mutex<Vec<u8>>>,
    /// Set at the end of the stream (every holder of the write end closed
    /// it).
    eof: Arc<AtomicBool>,
}

impl Capture {
    pub fn start(mut r: impl Read + Send + 'static) -> Capture {
        let text = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (t, e) = (Arc::clone(&text), Arc::clone(&eof));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => t.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            e.store(true, Ordering::SeqCst);
        });
        Capture { text, eof }
    }

    /// The text so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }

    /// Waits up to `timeout` for the end of the stream, then returns the
    /// text. A descendant that still holds the write end (a daemon that kept
    /// its parent's stderr) cannot hold the test beyond `timeout`.
    pub fn finish(&self, timeout: Duration) -> String {
        wait_until(timeout, || self.eof.load(Ordering::SeqCst));
        self.text()
    }
}

/// Direct children of `pid`, from `/proc/PID/task/*/children`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// Every descendant of `pid`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// `/proc/PID/comm`, trimmed.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether `pid` is alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The targets of `/proc/PID/fd/*` (e.g. `socket:[123]`, `pipe:[4]`).
pub fn fd_targets(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                out.push(t.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// How many descriptors `pid` holds.
pub fn fd_count(pid: i32) -> usize {
    fd_targets(pid).len()
}

fn has_epoll(pid: i32) -> bool {
    fd_targets(pid)
        .iter()
        .any(|t| t.contains("eventpoll") || t.contains("[io_uring]"))
}

/// The socket inodes `pid` holds.
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    fd_targets(pid)
        .iter()
        .filter_map(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// A TCP socket as `/proc/net/tcp{,6}` lists it.
#[derive(Debug, Clone)]
pub struct TcpSocket {
    pub inode: u64,
    /// `0A` is LISTEN, `01` ESTABLISHED.
    pub state: String,
    pub local_port: u16,
    /// The peer's full address: a port alone does not name a connection
    /// (an IPv4 and an IPv6 client, or 127.0.0.1 and 127.0.0.2, may share
    /// one).
    pub remote: SocketAddr,
    /// Bytes sent and not yet acknowledged, and bytes received and not yet
    /// read (`tx_queue:rx_queue`).
    pub tx_queue: u64,
    pub rx_queue: u64,
}

impl TcpSocket {
    pub fn listening(&self) -> bool {
        self.state == "0A"
    }
}

/// Every TCP socket of this network namespace, by inode.
pub fn tcp_sockets() -> std::collections::HashMap<u64, TcpSocket> {
    let mut out = std::collections::HashMap::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let port = |s: &str| {
                s.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let Ok(inode) = cols[9].parse::<u64>() else {
                continue;
            };
            if inode == 0 {
                continue;
            }
            let Some(remote) = proc_net_addr(cols[2]) else {
                continue;
            };
            let queue = |q: Option<&str>| q.and_then(|q| u64::from_str_radix(q, 16).ok());
            let (tx, rx) = cols[4].split_once(':').unzip();
            let (Some(tx_queue), Some(rx_queue)) = (queue(tx), queue(rx)) else {
                continue;
            };
            out.insert(
                inode,
                TcpSocket {
                    inode,
                    state: cols[3].to_string(),
                    local_port: port(cols[1]),
                    remote,
                    tx_queue,
                    rx_queue,
                },
            );
        }
    }
    out
}

/// Parses an address of `/proc/net/tcp{,6}`: `0100007F:1F90` or 32 hex
/// digits, a colon and the port. The address is printed as 32-bit words in
/// the host's byte order, each word holding four bytes of the address as
/// they lie in memory (network order).
fn proc_net_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..host.len()).step_by(8) {
        let word = u32::from_str_radix(host.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The TCP sockets `pid` holds.
pub fn tcp_sockets_of(pid: i32) -> Vec<TcpSocket> {
    let all = tcp_sockets();
    socket_inodes(pid)
        .into_iter()
        .filter_map(|i| all.get(&i).cloned())
        .collect()
}

/// Connects with a bounded timeout and sets read/write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `payload` and reads back exactly as many bytes (writing and
/// reading in turns of at most 64 KiB, so neither side's buffers fill).
pub fn roundtrip(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len());
    let mut buf = vec![0u8; 65536];
    for chunk in payload.chunks(65536) {
        stream.write_all(chunk)?;
        let mut got = 0;
        while got < chunk.len() {
            // A blocked read with a timeout fails with EINTR after any
            // stop/continue of this process, even with no handler
            // (signal(7)): retry it.
            let n = match stream.read(&mut buf[..chunk.len() - got]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            out.extend_from_slice(&buf[..n]);
            got += n;
        }
    }
    Ok(out)
}

/// One connection, one message, one echo: panics unless the echo matches.
pub fn echo_once(addr: SocketAddr, payload: &[u8]) {
    let mut s = connect(addr);
    let back = roundtrip(&mut s, payload).unwrap_or_else(|e| panic!("echo via {addr}: {e}"));
    assert!(back == payload, "echo via {addr} differs");
}

/// A deterministic pseudo-random payload (xorshift), so failures reproduce.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `cmd` as root without `CAP_SETUID` and `CAP_SETGID`: both are dropped
/// from the bounding set before `exec`, so the exec'd echod (uid 0, file
/// capabilities "all" for root) is left without them. Its config checks
/// pass (it is root), and its workers then fail to switch users.
pub fn without_setuid_caps(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes prctl(2) calls, which are async-signal-safe, on the child's own
    // capability bounding set.
    unsafe {
        cmd.pre_exec(|| {
            // CAP_SETGID = 6, CAP_SETUID = 7 (linux/capability.h).
            for cap in [6, 7] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A minimal config: loopback, port 0, stderr logging at `level`, plus
/// `extra` top-level keys.
pub fn config(extra: &str) -> String {
    format!("listen = [\"127.0.0.1:0\"]\n{extra}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n")
}

/// What a short echod run that exits by itself printed, and how it ended.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs echod with `args` (no config is implied) and waits at most
/// `timeout` for it to exit by itself; on timeout it is killed by PID and
/// the call panics. For `--help`, `-t` and the start-up failures.
pub fn run_echod<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Run {
    let mut cmd = echod_command();
    cmd.args(args);
    run_bounded(cmd, timeout, || {})
}

/// Runs `cmd` with its stdout and stderr piped, calling `tick` every 10 ms
/// while it runs, and waits at most `timeout` for it to exit; on timeout it
/// and its descendants are killed by PID and the call panics. The output
/// is collected by threads, for at most a second after the exit.
pub fn run_bounded(mut cmd: Command, timeout: Duration, mut tick: impl FnMut()) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut child = KillTree::child(child);
    let (out, err) = child.take_output();
    let out = Capture::start(out.expect("piped stdout"));
    let err = Capture::start(err.expect("piped stderr"));
    let end = Instant::now() + timeout;
    let status = loop {
        tick();
        if let Some(s) = child.try_wait() {
            break s;
        }
        if Instant::now() >= end {
            drop(child);
            panic!(
                "{cmd:?} did not exit within {timeout:?}; stderr:\n{}",
                err.text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out.finish(Duration::from_secs(1)),
        stderr: err.finish(Duration::from_secs(1)),
    }
}

/// The TCP sockets each of `pids` holds, from a single reading of
/// `/proc/net/tcp{,6}`: consistent across the processes, and much cheaper
/// than one `tcp_sockets_of` per process when the machine holds many
/// sockets (other tests and benchmarks leave thousands in `TIME_WAIT`).
pub fn tcp_sockets_of_each(pids: &[i32]) -> std::collections::HashMap<i32, Vec<TcpSocket>> {
    let all = tcp_sockets();
    pids.iter()
        .map(|&p| {
            let socks = socket_inodes(p)
                .into_iter()
                .filter_map(|i| all.get(&i).cloned())
                .collect();
            (p, socks)
        })
        .collect()
}
