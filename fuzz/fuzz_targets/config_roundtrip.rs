//! Fuzz target `config_roundtrip`: the fuzzer's bytes choose a valid
//! `echod::config::Config` field by field (each within the invariant its
//! field documents), and `Config::to_toml` must print it as a file that
//! `Config::parse` reads back to the very same value.
//!
//! The `config` target explores the syntax a file may have; this one
//! explores the values a config may hold. A printing bug that only shows
//! for some values (a number above 100, a duration with a fraction of a
//! millisecond, a quote in a path) changes no code path that coverage
//! guidance could see, so byte-level fuzzing of the text finds it only by
//! luck; here every value is one draw away.

#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use echod::config::{
    Config, IoBackend, LogConfig, LogTarget, Mode, Overload, SchedPolicy, FACILITIES,
    MIN_WORKER_TIMEOUT,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// The longest duration a config accepts: one year.
const MAX_DURATION_SECS: u64 = 365 * 24 * 60 * 60;

fn addr(u: &mut Unstructured) -> Result<SocketAddr> {
    let ip = if u.arbitrary()? {
        IpAddr::from(u.arbitrary::<[u8; 4]>()?)
    } else {
        IpAddr::from(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?))
    };
    Ok(SocketAddr::new(ip, u.arbitrary()?))
}

fn duration(u: &mut Unstructured) -> Result<Duration> {
    Ok(match u.int_in_range(0..=4)? {
        0 => Duration::from_secs(u.int_in_range(0..=MAX_DURATION_SECS)?),
        1 => Duration::from_millis(u.int_in_range(0..=100_000)?),
        2 => Duration::from_nanos(u.int_in_range(0..=10_000_000_000)?),
        3 => Duration::from_micros(u.int_in_range(0..=100_000_000)?),
        _ => Duration::from_nanos(u.int_in_range(0..=MAX_DURATION_SECS * 1_000_000_000)?),
    })
}

/// A non-empty string without NUL (a user or group name).
fn name(u: &mut Unstructured) -> Result<String> {
    let s: String = u.arbitrary()?;
    let s: String = s.chars().filter(|&c| c != '\0').collect();
    Ok(if s.is_empty() { "x".to_owned() } else { s })
}

/// An absolute path without NUL.
fn path(u: &mut Unstructured) -> Result<PathBuf> {
    Ok(PathBuf::from(format!("/{}", name(u)?)))
}

fn config(u: &mut Unstructured) -> Result<Config> {
    let mut listen = Vec::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let a = addr(u)?;
        if !listen.contains(&a) {
            listen.push(a);
        }
    }
    let target = *u.choose(&[
        LogTarget::Stderr,
        LogTarget::Syslog,
        LogTarget::Auto,
        LogTarget::File,
    ])?;
    Ok(Config {
        listen,
        backlog: u.int_in_range(1..=65535)?,
        mode: *u.choose(&[Mode::Prefork, Mode::Fork])?,
        workers: u.int_in_range(1..=512)?,
        io: *u.choose(&[IoBackend::Epoll, IoBackend::IoUring])?,
        // 0 to 1 s, in microseconds or nanoseconds.
        busy_poll: if u.arbitrary()? {
            Duration::from_micros(u.int_in_range(0..=1_000_000)?)
        } else {
            Duration::from_nanos(u.int_in_range(0..=1_000_000_000)?)
        },
        sched_policy: *u.choose(&[SchedPolicy::Auto, SchedPolicy::Other, SchedPolicy::Batch])?,
        balance: u.arbitrary()?,
        max_connections: u.int_in_range(1..=1_000_000)?,
        max_connections_per_ip: u.int_in_range(0..=1_000_000)?,
        overload: *u.choose(&[Overload::Wait, Overload::Reject])?,
        buffer_size: u.int_in_range(512..=16 << 20)?,
        splice: u.arbitrary()?,
        idle_timeout: duration(u)?,
        shutdown_timeout: duration(u)?,
        // 0 (off) or at least MIN_WORKER_TIMEOUT.
        worker_timeout: match duration(u)? {
            Duration::ZERO => Duration::ZERO,
            d => d.max(MIN_WORKER_TIMEOUT),
        },
        max_requests_per_worker: u.arbitrary()?,
        pid_file: if u.arbitrary()? { Some(path(u)?) } else { None },
        user: if u.arbitrary()? { Some(name(u)?) } else { None },
        group: if u.arbitrary()? { Some(name(u)?) } else { None },
        // Not detached with its log on stderr.
        daemon: target != LogTarget::Stderr && u.arbitrary()?,
        log: LogConfig {
            level: *u.choose(&log::LevelFilter::iter().collect::<Vec<_>>())?,
            target,
            facility: (*u.choose(FACILITIES)?).to_owned(),
            file: if target == LogTarget::File {
                Some(path(u)?)
            } else {
                None
            },
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(config) = config(&mut Unstructured::new(data)) else {
        return;
    };
    let printed = config.to_toml();
    match Config::parse(&printed, Path::new("/fuzz/printed.toml")) {
        Ok(again) => assert_eq!(
            again, config,
            "to_toml does not round-trip; it printed:\n{printed}"
        ),
        Err(e) => panic!("to_toml printed a config that does not parse ({e}):\n{printed}"),
    }
});
