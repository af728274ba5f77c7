//! The command line of `echod-bench`: modes, flags, defaults, `--help`.
//!
//! Runs in: the main thread, once, before anything else. Owns no descriptors
//! and no signals; pure, unit-tested below.

use std::time::Duration;

use thiserror::Error;

pub const HELP: &str = "\
echod-bench: load generator and meter for TCP echo servers (RFC 862)

USAGE:
    echod-bench MODE [-a HOST:PORT] [FLAGS]

MODES:
    pingpong   C connections each send an L-byte message, wait for its whole
               echo, then send the next (one message in flight per
               connection). Reports messages/s and the round-trip time
               p50/p90/p99/p99.9 (HDR histogram, 0.1 % precision).
               Defaults: -c 50, -l 64.
    stream     C connections each write continuously in L-byte chunks while
               reading the echo back. Reports echoed MB/s (10^6 bytes, one
               direction). Defaults: -c 4, -l 65536.
    connrate   C workers each repeat: connect, send L bytes, read the echo,
               close. Reports connections/s and the connect-to-echo time
               percentiles. Defaults: -c 8, -l 64.
    hold       Opens N connections, proves each with one L-byte echo, keeps
               them idle for the duration, then proves each again. Reports
               how many were held; with --server-pid, the server's RSS and
               PSS per held connection. Defaults: -n 10000, -l 64, -d 2.

FLAGS:
    -a, --addr HOST:PORT    Server address (default 127.0.0.1:7). A name is
                            resolved and its first address used.
    -c, --connections N     Concurrent connections (pingpong, stream) or
                            workers (connrate).
    -l, --length BYTES      Message length (pingpong, connrate, hold) or write
                            chunk (stream). Suffix k or m for KiB or MiB.
    -t, --threads N         Client threads, each running its own epoll loop
                            over its share of the connections (default: one
                            per CPU; never more than the connections).
    -d, --duration SECS     Measured interval (default 5), or idle time in
                            hold mode (default 2). Fractions allowed.
        --warmup SECS       Load before measuring starts (default 1; not used
                            by hold).
    -n, --count N           Connections to open and hold (hold mode).
        --timeout SECS      Limit on every connect and on every wait for an
                            echo (default 5). A connection that times out is
                            closed and counted. Time the client itself was
                            not run (a loop turn 200 ms late: the machine
                            frozen or overloaded, the process stopped) is
                            left out and reported as a stall.
        --server-pid PID    Server to meter: CPU time (utime+stime, plus the
                            reaped children's) of PID and all its descendants
                            at the start and the end of the measured interval,
                            reported as server µs per message (pingpong,
                            connrate) or s per GB (stream), and the context
                            switches of the tree's threads (per message in
                            pingpong and connrate); in hold mode, RSS and PSS
                            of the tree before and while holding.
        --json              Print one JSON object on stdout instead of the
                            text report (keys always present; null when not
                            applicable).
    -h, --help              This text.
    -V, --version           The version.

Every echoed byte is checked against the byte sent at that offset (each
connection sends its own pseudo-random stream), so corruption, loss and
cross-talk between connections are caught, not only wrong lengths.
A live progress line goes to stderr when it is a terminal.

At the end of the measured interval no new message, stream write or
connection starts, and the run waits until every byte already sent has been
echoed and verified, or its connection has timed out (counted as a timeout:
a server that stops echoing near the end fails the run). What completes
after the interval is checked but not counted: rates are what completed
inside the interval over its length, and the latency percentiles are of the
same messages or connections. The run ends at a hard deadline (warm-up +
duration + 3 x timeout + 10 s, plus 1 s per 1000 held connections) whatever
the server does.

EXIT STATUS:
    0  every echo verified, no errors, something measured
    1  mismatches, resets, early closes, timeouts or connect errors, or
       nothing completed
    2  bad command line
    3  could not run (address, /proc, threads) or hit the hard deadline
";

/// What the benchmark does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    PingPong,
    Stream,
    ConnRate,
    Hold,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::PingPong => "pingpong",
            Mode::Stream => "stream",
            Mode::ConnRate => "connrate",
            Mode::Hold => "hold",
        }
    }

    fn parse(word: &str) -> Option<Mode> {
        [Mode::PingPong, Mode::Stream, Mode::ConnRate, Mode::Hold]
            .into_iter()
            .find(|m| m.name() == word)
    }
}

/// A validated run request. Invariants: every count is at least 1,
/// `threads <= slots()`, durations are finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// As given; resolved by the caller.
    pub addr: String,
    /// Concurrent connections (pingpong, stream) or workers (connrate).
    pub connections: usize,
    /// Message length or stream chunk, in bytes.
    pub length: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Connections to hold (hold mode).
    pub count: usize,
    pub timeout: Duration,
    pub json: bool,
    pub server_pid: Option<i32>,
}

impl Settings {
    /// The connections the threads divide among themselves.
    pub fn slots(&self) -> usize {
        match self.mode {
            Mode::Hold => self.count,
            _ => self.connections,
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Settings),
    Help,
    Version,
}

#[derive(Debug, Error, PartialEq)]
pub enum CliError {
    #[error("no mode given (pingpong, stream, connrate or hold); see --help")]
    NoMode,
    #[error("unknown mode {0:?} (pingpong, stream, connrate or hold)")]
    UnknownMode(String),
    #[error("unknown flag {0:?}; see --help")]
    UnknownFlag(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{flag}: {value:?} is not {want}")]
    BadValue {
        flag: String,
        value: String,
        want: &'static str,
    },
    #[error("unexpected argument {0:?}")]
    Extra(String),
}

/// The flags that take a value, short and long.
const VALUE_FLAGS: &[&str] = &[
    "-a",
    "--addr",
    "-c",
    "--connections",
    "-l",
    "--length",
    "-t",
    "--threads",
    "-d",
    "--duration",
    "--warmup",
    "-n",
    "--count",
    "--timeout",
    "--server-pid",
];

const MAX_COUNT: usize = 1_000_000;
const MAX_LENGTH: usize = 64 << 20;
const MAX_THREADS: usize = 1024;
const MAX_SECONDS: f64 = 86_400.0;

fn bad(flag: &str, value: &str, want: &'static str) -> CliError {
    CliError::BadValue {
        flag: flag.to_string(),
        value: value.to_string(),
        want,
    }
}

fn parse_count(flag: &str, value: &str) -> Result<usize, CliError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        _ => Err(bad(flag, value, "a count from 1 to 1000000")),
    }
}

fn parse_length(flag: &str, value: &str) -> Result<usize, CliError> {
    let (digits, unit) = match value.char_indices().last() {
        Some((i, 'k' | 'K')) => (&value[..i], 1024),
        Some((i, 'm' | 'M')) => (&value[..i], 1024 * 1024),
        _ => (value, 1),
    };
    match digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
    {
        Some(n) if (1..=MAX_LENGTH).contains(&n) => Ok(n),
        _ => Err(bad(flag, value, "a length from 1 byte to 64m")),
    }
}

fn parse_seconds(flag: &str, value: &str, zero_ok: bool) -> Result<Duration, CliError> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s <= MAX_SECONDS && (s > 0.0 || (zero_ok && s == 0.0)) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(bad(
            flag,
            value,
            if zero_ok {
                "a number of seconds from 0 to 86400"
            } else {
                "a number of seconds above 0, to 86400"
            },
        )),
    }
}

/// Parses the arguments after the program name.
pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = String>,
{
    let mut args = args.into_iter();
    let mut mode = None;
    let mut addr = "127.0.0.1:7".to_string();
    let (mut connections, mut length, mut threads) = (None, None, None);
    let (mut duration, mut warmup, mut count_n) = (None, None, None);
    let mut timeout = Duration::from_secs(5);
    let mut json = false;
    let mut server_pid = None;

    while let Some(arg) = args.next() {
        // `--flag=value`, `-c50` and `-c 50` all work.
        let (flag, inline) = if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((f, v)) => (format!("--{f}"), Some(v.to_string())),
                None => (arg.clone(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 2 && arg.is_char_boundary(2) {
            (arg[..2].to_string(), Some(arg[2..].to_string()))
        } else {
            (arg.clone(), None)
        };
        let takes_value = match flag.as_str() {
            "--json" | "-h" | "--help" | "-V" | "--version" => false,
            f if VALUE_FLAGS.contains(&f) => true,
            f if f.starts_with('-') && f.len() > 1 => return Err(CliError::UnknownFlag(arg)),
            _ => false,
        };
        let value = match (takes_value, inline) {
            (true, Some(v)) => v,
            (true, None) => args
                .next()
                .ok_or_else(|| CliError::MissingValue(flag.clone()))?,
            (false, None) => String::new(),
            (false, Some(_)) => return Err(CliError::UnknownFlag(arg)),
        };
        let v = value.as_str();
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--json" => json = true,
            "-a" | "--addr" => {
                if !v.contains(':') {
                    return Err(bad(&flag, v, "HOST:PORT"));
                }
                addr = v.to_string();
            }
            "-c" | "--connections" => connections = Some(parse_count(&flag, v)?),
            "-l" | "--length" => length = Some(parse_length(&flag, v)?),
            "-t" | "--threads" => {
                let n = parse_count(&flag, v)?;
                if n > MAX_THREADS {
                    return Err(bad(&flag, v, "a thread count from 1 to 1024"));
                }
                threads = Some(n);
            }
            "-d" | "--duration" => duration = Some(parse_seconds(&flag, v, false)?),
            "--warmup" => warmup = Some(parse_seconds(&flag, v, true)?),
            "-n" | "--count" => count_n = Some(parse_count(&flag, v)?),
            "--timeout" => timeout = parse_seconds(&flag, v, false)?,
            "--server-pid" => match v.parse::<i32>() {
                Ok(pid) if pid > 0 => server_pid = Some(pid),
                _ => return Err(bad(&flag, v, "a process id")),
            },
            _ if mode.is_none() => {
                mode = Some(Mode::parse(&arg).ok_or_else(|| CliError::UnknownMode(arg.clone()))?)
            }
            _ => return Err(CliError::Extra(arg)),
        }
    }

    let mode = mode.ok_or(CliError::NoMode)?;
    let (default_connections, default_length) = match mode {
        Mode::PingPong => (50, 64),
        Mode::Stream => (4, 64 * 1024),
        Mode::ConnRate => (8, 64),
        Mode::Hold => (1, 64),
    };
    let default_duration = match mode {
        Mode::Hold => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    };
    let mut settings = Settings {
        mode,
        addr,
        connections: connections.unwrap_or(default_connections),
        length: length.unwrap_or(default_length),
        threads: threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        duration: duration.unwrap_or(default_duration),
        warmup: match mode {
            Mode::Hold => Duration::ZERO,
            _ => warmup.unwrap_or(Duration::from_secs(1)),
        },
        count: count_n.unwrap_or(10_000),
        timeout,
        json,
        server_pid,
    };
    settings.threads = settings.threads.min(settings.slots());
    Ok(Command::Run(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Settings, CliError> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(s) => Ok(s),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn defaults_depend_on_the_mode() {
        let p = run(&["pingpong"]).unwrap();
        assert_eq!(
            (p.connections, p.length, p.addr.as_str()),
            (50, 64, "127.0.0.1:7")
        );
        assert!(p.threads >= 1);
        assert_eq!(p.duration, Duration::from_secs(5));
        assert_eq!(p.warmup, Duration::from_secs(1));
        assert!(!p.json && p.server_pid.is_none());
        let s = run(&["stream"]).unwrap();
        assert_eq!((s.connections, s.length), (4, 65536));
        let c = run(&["connrate"]).unwrap();
        assert_eq!((c.connections, c.length), (8, 64));
        let h = run(&["hold"]).unwrap();
        assert_eq!((h.count, h.slots()), (10_000, 10_000));
        assert_eq!(h.duration, Duration::from_secs(2));
        assert_eq!(h.warmup, Duration::ZERO);
    }

    #[test]
    fn every_flag_in_every_form() {
        let s = run(&[
            "-a",
            "[::1]:7007",
            "stream",
            "-c",
            "3",
            "--length=16k",
            "-t2",
            "--duration",
            "0.5",
            "--warmup=0",
            "--timeout",
            "2",
            "--json",
            "--server-pid",
            "42",
        ])
        .unwrap();
        assert_eq!(s.mode, Mode::Stream);
        assert_eq!(s.addr, "[::1]:7007");
        assert_eq!((s.connections, s.length, s.threads), (3, 16384, 2));
        assert_eq!(s.duration, Duration::from_millis(500));
        assert_eq!(s.warmup, Duration::ZERO);
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert!(s.json);
        assert_eq!(s.server_pid, Some(42));
        let h = run(&["hold", "-n", "300", "--addr=localhost:9", "-l", "1m"]).unwrap();
        assert_eq!(
            (h.count, h.length, h.addr.as_str()),
            (300, 1 << 20, "localhost:9")
        );
    }

    #[test]
    fn threads_never_exceed_connections() {
        assert_eq!(run(&["stream", "-c", "2", "-t", "8"]).unwrap().threads, 2);
        assert_eq!(run(&["hold", "-n", "3", "-t", "8"]).unwrap().threads, 3);
    }

    #[test]
    fn help_and_version() {
        let p = |a: &[&str]| parse(a.iter().map(|s| s.to_string()));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["pingpong", "-h"]), Ok(Command::Help));
        assert_eq!(p(&["-V"]), Ok(Command::Version));
        for word in [
            "pingpong",
            "stream",
            "connrate",
            "hold",
            "--server-pid",
            "--json",
        ] {
            assert!(HELP.contains(word), "{word}");
        }
    }

    #[test]
    fn mistakes_are_reported() {
        assert_eq!(run(&[]), Err(CliError::NoMode));
        assert_eq!(
            run(&["ping"]),
            Err(CliError::UnknownMode("ping".to_string()))
        );
        assert_eq!(
            run(&["pingpong", "--bogus"]),
            Err(CliError::UnknownFlag("--bogus".to_string()))
        );
        assert_eq!(
            run(&["pingpong", "-c"]),
            Err(CliError::MissingValue("-c".to_string()))
        );
        assert_eq!(
            run(&["pingpong", "stream"]),
            Err(CliError::Extra("stream".to_string()))
        );
        assert!(run(&["pingpong", "--json=1"]).is_err());
        for bad_args in [
            ["pingpong", "-c", "0"],
            ["pingpong", "-c", "x"],
            ["pingpong", "-l", "0"],
            ["pingpong", "-l", "65m"],
            ["pingpong", "-d", "0"],
            ["pingpong", "-d", "nan"],
            ["pingpong", "--warmup", "-1"],
            ["pingpong", "-a", "nohost"],
            ["pingpong", "--server-pid", "0"],
            ["pingpong", "-t", "5000"],
        ] {
            assert!(
                matches!(run(&bad_args), Err(CliError::BadValue { .. })),
                "{bad_args:?}"
            );
        }
    }
}
