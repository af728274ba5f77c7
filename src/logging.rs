//! echod's own `log::Log`: stderr (plain with timestamps, or with `<N>`
//! priority prefixes that journald reads), syslog, or a file.
//!
//! Runs in: every process. The master installs it once; children inherit it
//! through `fork()` and only change their role (`set_role`). Each record
//! carries the pid of the process that wrote it (the `syslog` crate's own
//! logger would stamp every worker's line with the master's pid).
//!
//! Owns: the syslog socket or the log file, when one is configured
//! (inherited by children: each record is one `write`, so lines from
//! different processes do not interleave).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::{KeyProblem, LogConfig, LogTarget};
use crate::process::Credentials;

/// Where records go.
enum Sink {
    /// Standard error; `journal` adds `<N>` priority prefixes.
    Stderr { journal: bool },
    /// The local syslog daemon.
    Syslog(syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>),
    /// A file opened for append, reopened on `SIGUSR1`.
    File { path: PathBuf, file: File },
}

/// The logger's mutable state. The `Mutex` is never contended: each echod
/// process is single-threaded, so it is never held across `fork()` either.
struct State {
    sink: Sink,
    role: String,
}

struct EchodLogger {
    state: Mutex<Option<State>>,
}

static LOGGER: EchodLogger = EchodLogger {
    state: Mutex::new(None),
};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The syslog socket could not be reached.
    #[error("syslog: {0}")]
    Syslog(String),
    /// The log file could not be opened.
    #[error("log file {path}: {source}")]
    File {
        /// The configured file.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
}

/// Whether stderr is a journald stream (systemd sets `JOURNAL_STREAM`).
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

fn open_sink(cfg: &LogConfig, daemonized: bool) -> Result<Sink, LogError> {
    let target = match cfg.target {
        LogTarget::Auto if under_journald() => return Ok(Sink::Stderr { journal: true }),
        // Detached, stderr is /dev/null: syslog, if a syslog daemon runs
        // (otherwise the records are lost, as any daemon's would be).
        LogTarget::Auto if daemonized => {
            return Ok(open_syslog(&cfg.facility).unwrap_or(Sink::Stderr { journal: false }));
        }
        LogTarget::Auto => LogTarget::Stderr,
        t => t,
    };
    match target {
        LogTarget::Syslog => open_syslog(&cfg.facility),
        LogTarget::File => {
            let path = cfg
                .file
                .clone()
                .unwrap_or_else(|| PathBuf::from("/dev/stderr"));
            let file = open_file(&path)?;
            Ok(Sink::File { path, file })
        }
        _ => Ok(Sink::Stderr {
            journal: under_journald(),
        }),
    }
}

fn open_syslog(facility: &str) -> Result<Sink, LogError> {
    let formatter = syslog::Formatter3164 {
        // The config loader accepts only valid facility names.
        facility: facility.parse().unwrap_or(syslog::Facility::LOG_DAEMON),
        hostname: None,
        process: "echod".into(),
        pid: std::process::id(),
    };
    syslog::unix(formatter)
        .map(Sink::Syslog)
        .map_err(|e| LogError::Syslog(e.to_string()))
}

fn open_file(path: &PathBuf) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::File {
            path: path.clone(),
            source,
        })
}

/// Checks that the configured sink can be opened, for a config check before
/// anything else is done: the file can be opened for appending (and is
/// created if absent, as the start would create it), or the syslog socket
/// answers. `auto` and `stderr` always can.
///
/// The sink opened here is closed again, and [`apply`] opens its own:
/// handing this one over would carry it out through
/// `process::check_system` and `Config::load_with` to the start and the
/// reload, to save one `open` (and only for `file` and `syslog`).
pub fn check(cfg: &LogConfig) -> Result<(), KeyProblem> {
    match cfg.target {
        LogTarget::File => match open_sink(cfg, false) {
            Ok(_) => Ok(()),
            Err(LogError::File { source, .. }) => Err(KeyProblem {
                key: "log.file",
                message: format!("cannot be opened for appending: {source}"),
            }),
            Err(e) => Err(KeyProblem {
                key: "log.file",
                message: e.to_string(),
            }),
        },
        LogTarget::Syslog => open_sink(cfg, false).map(drop).map_err(|e| KeyProblem {
            key: "log.target",
            message: format!("{e} (is a syslog daemon listening on /dev/log?)"),
        }),
        LogTarget::Auto | LogTarget::Stderr => Ok(()),
    }
}

/// Installs the logger (first call) or replaces its sink and level (a
/// reload). On error the previous sink stays in place.
pub fn apply(cfg: &LogConfig, daemonized: bool) -> Result<(), LogError> {
    let sink = open_sink(cfg, daemonized)?;
    let mut guard = lock();
    let role = guard
        .as_ref()
        .map(|s| s.role.clone())
        .unwrap_or_else(|| "master".into());
    *guard = Some(State { sink, role });
    drop(guard);
    // set_logger fails only when a logger is already installed: ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(cfg.level);
    Ok(())
}

/// Installs a plain stderr logger before the config is read, so that
/// config errors are reported the same way as everything else.
pub fn init_early(level: LevelFilter) {
    *lock() = Some(State {
        sink: Sink::Stderr {
            journal: under_journald(),
        },
        role: "master".into(),
    });
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Names this process in every record it writes, e.g. `worker 2 gen 3`.
pub fn set_role(role: impl Into<String>) {
    if let Some(state) = lock().as_mut() {
        state.role = role.into();
    }
}

/// Reopens the log file (after logrotate moved it). A no-op for other sinks.
///
/// `owner`: the credentials the workers run as, given by a root master.
/// The master reopens first and then tells the workers to; a worker that
/// is no longer root could not open a file the master just created, so
/// the master hands it to the workers' user and group first (as nginx
/// does), keeping its own descriptor, which still writes.
pub fn reopen(owner: Option<&Credentials>) -> Result<(), LogError> {
    let mut guard = lock();
    if let Some(State {
        sink: Sink::File { path, file },
        ..
    }) = guard.as_mut()
    {
        let new = open_file(path)?;
        if let Some(owner) = owner {
            nix::unistd::fchown(&new, owner.uid, Some(owner.gid)).map_err(|e| LogError::File {
                path: path.clone(),
                source: e.into(),
            })?;
        }
        *file = new;
    }
    Ok(())
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    // A poisoned lock only means a panic while logging: the state is still
    // usable, and losing the logger would hide the next error.
    LOGGER.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The syslog priority of a level, as journald's `<N>` prefix uses it.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for EchodLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pid = std::process::id();
        let mut guard = lock();
        let Some(state) = guard.as_mut() else { return };
        let msg = record.args();
        let role = &state.role;
        // Each record is formatted into one buffer and written with one
        // write(2), so concurrent processes do not interleave within a line.
        let line = match &mut state.sink {
            Sink::Stderr { journal: true } => {
                format!("<{}>echod[{pid}] {role}: {msg}\n", priority(record.level()))
            }
            Sink::Stderr { journal: false } | Sink::File { .. } => format!(
                "{} {:<5} echod[{pid}] {role}: {msg}\n",
                timestamp(std::time::SystemTime::now()),
                record.level()
            ),
            Sink::Syslog(logger) => {
                logger.formatter.pid = pid;
                let text = format!("{role}: {msg}");
                let _ = match record.level() {
                    Level::Error => logger.err(text),
                    Level::Warn => logger.warning(text),
                    Level::Info => logger.info(text),
                    Level::Debug | Level::Trace => logger.debug(text),
                };
                return;
            }
        };
        let _ = match &mut state.sink {
            Sink::File { file, .. } => file.write_all(line.as_bytes()),
            _ => std::io::stderr().lock().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// Formats a time as RFC 3339 UTC with milliseconds, without a date crate.
fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_549_800_123);
        assert_eq!(timestamp(t), "2026-11-24T19:50:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn priorities_match_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
    }
}
