//! Helpers of the hostile-client, fault and soak tests: per-process
//! memory, CPU and state from `/proc`, connections from a chosen loopback
//! source address, prompt-close and still-waiting checks, the kernel's
//! queues of one connection, and an echod started under a descriptor limit
//! (which [`crate::common::Start`] cannot set).
//!
//! Included by `tests/hostile.rs` and `tests/soak.rs` with
//! `#[path = "common/hostile.rs"] mod hostile;`, next to `mod common;`.

#![allow(dead_code)]

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::common::{children_of, comm};

/// The fields of `/proc/PID/stat` after the `(comm)` field, which may
/// itself hold spaces and parentheses: index 0 is the state (field 3).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process state letter (`R`, `S`, `Z`, ...), `None` once reaped.
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The scheduling policy of `pid` (field 41 of `/proc/PID/stat`):
/// 0 `SCHED_OTHER`, 3 `SCHED_BATCH`, 5 `SCHED_IDLE`...
pub fn sched_policy(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(41 - 3)?.parse().ok()
}

/// CPU time (user + system) of `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15: indexes 11 and 12 here.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU time of `pid` as a `Duration`.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let ticks = cpu_ticks(pid)?;
    Some(Duration::from_millis(ticks * 1000 / ticks_per_sec()))
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The children of `pid` that are zombies (exited, not yet reaped).
pub fn zombies_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|&c| state(c) == Some('Z'))
        .collect()
}

/// The children of `pid` whose `comm` is `name`, zombies excluded.
pub fn live_children_named(pid: i32, name: &str) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|&c| comm(c).as_deref() == Some(name) && state(c).is_some_and(|s| s != 'Z'))
        .collect()
}

/// Connects to `addr` from the loopback source address `from` (any port),
/// with read and write timeouts of `timeout`.
pub fn connect_from(
    from: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// How a read on a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// End of stream: the server closed (FIN).
    Eof,
    /// The server reset the connection (RST).
    Reset,
    /// Nothing arrived within the timeout: the connection is still open.
    TimedOut,
    /// Bytes arrived.
    Data(usize),
    /// Any other error.
    Other(std::io::ErrorKind),
}

impl ReadEnd {
    /// Whether the server closed the connection (FIN or RST).
    pub fn closed(self) -> bool {
        matches!(self, ReadEnd::Eof | ReadEnd::Reset)
    }
}

/// One `read` with `timeout` (retried after `EINTR`, see [`roundtrip`]),
/// classified.
pub fn read_end(s: &mut TcpStream, timeout: Duration) -> ReadEnd {
    s.set_read_timeout(Some(timeout)).expect("set_read_timeout");
    let mut buf = [0u8; 4096];
    let read = loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    match read {
        Ok(0) => ReadEnd::Eof,
        Ok(n) => ReadEnd::Data(n),
        Err(e) => match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ReadEnd::TimedOut,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                ReadEnd::Reset
            }
            k => ReadEnd::Other(k),
        },
    }
}

/// Waits up to `limit` for the server to close `s` (reading and dropping
/// any bytes first); returns how long it took, or `None` if it stayed open.
pub fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return None;
        }
        match read_end(s, left) {
            e if e.closed() => return Some(start.elapsed()),
            ReadEnd::Data(_) => continue,
            ReadEnd::Other(_) => return Some(start.elapsed()),
            _ => return None,
        }
    }
}

/// The send and receive queues (`tx_queue`, `rx_queue`, in bytes) that
/// `/proc/net/tcp{,6}` shows for the connection on local port
/// `local_port` from `peer` (seen from the `local_port` side).
pub fn tcp_queues(local_port: u16, peer: SocketAddr) -> Option<(u64, u64)> {
    crate::common::tcp_sockets()
        .into_values()
        .find(|s| s.local_port == local_port && s.remote == peer)
        .map(|s| (s.tx_queue, s.rx_queue))
}

/// Kills `pid` with `sig` (a process the test started or one of its
/// descendants, found in `/proc`).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started or found as a descendant
    // of one it started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// What `echod -t --config FILE` did.
pub struct Check {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `echod -t --config path` (as user and group 65534 when `nobody`
/// is set and the test runs as root, so that file permissions apply), and
/// waits for it at most `limit`; on timeout it is killed by pid and the
/// call panics.
pub fn check_config(path: &std::path::Path, nobody: bool, limit: Duration) -> Check {
    let mut cmd = crate::common::echod_command();
    cmd.arg("-t").arg("--config").arg(path);
    // SAFETY: geteuid has no preconditions.
    if nobody && unsafe { libc::geteuid() } == 0 {
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn echod -t");
    let pipe = |r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut r = r;
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr")));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for echod -t") {
            break s;
        }
        if Instant::now() >= end {
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            panic!(
                "echod -t --config {} did not exit within {limit:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Check {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A small deterministic generator (xorshift64*), so failures reproduce
/// from a printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            lo
        } else {
            lo + (self.next() % (hi - lo) as u64) as usize
        }
    }
}
