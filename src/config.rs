//! The configuration file: the typed [`Config`], its built-in defaults, the
//! parser that turns `/etc/echod.toml` into it, and the list of what a reload
//! changes.
//!
//! **Runs in the master**: once at start (in the launcher, before it becomes
//! the master or daemonizes, so that a bad file fails the start loudly), and
//! again at every `SIGHUP` reload, where an error keeps the running
//! configuration and is logged instead of killing the master. `echod
//! --check-config` runs the same parser and prints [`Config::to_toml`].
//! Workers never parse: each one reads the snapshot it inherited,
//! copy-on-write, at fork, which is why a reload forks a new generation.
//!
//! **Descriptors and signals:** none owned. [`Config::load_with`] opens the file,
//! reads at most [`MAX_FILE_SIZE`] bytes and closes it before returning, so
//! no descriptor outlives the call and none can leak into a forked worker.
//!
//! # Why the document is walked by hand instead of `#[derive(Deserialize)]`
//!
//! The file is parsed by `toml` into its spanned document tree
//! ([`toml::de::DeTable`], where every key and value is a [`toml::Spanned`]),
//! and this module walks that tree key by key. A serde derive over a raw
//! struct would be shorter, but `toml::de::Error` keeps the path of the
//! failing key private, and serde's type errors name Rust types
//! ("invalid type: string, expected usize") rather than what a sysadmin must
//! write. Walking the tree gives, for every problem, the dotted key path, the
//! span of the offending key or value, and a message phrased in the file's
//! own terms:
//!
//! ```text
//! /etc/echod.toml:3:11: workers: expected an integer from 1 to 512, found a string
//! ```
//!
//! The walker indexes nothing and unwraps nothing, so no input can make it
//! panic (property-tested below over arbitrary text and over plausible
//! documents): a master that re-reads its file at `SIGHUP` must survive any
//! file an operator can save.

use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use toml::de::{DeInteger, DeTable, DeValue};
use toml::Spanned;

/// Where the installed service reads its configuration when `--config` is not
/// given. If this file does not exist, echod runs on [`Config::default`].
pub const DEFAULT_PATH: &str = "/etc/echod.toml";

/// The largest configuration file echod reads. A real file is a few KiB; the
/// cap keeps a mistaken `--config /dev/zero` (or a huge file) from making the
/// master allocate without bound at a reload.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// The longest duration any timeout accepts: one year. Anything longer is a
/// typo (a unit forgotten or mistaken), and the bound keeps deadline
/// arithmetic (`Instant + Duration`) far away from overflow.
const MAX_DURATION_SECS: u64 = 365 * 24 * 60 * 60;

/// The longest string value quoted back in an error message; longer values are
/// cut so that one pasted blob cannot flood the log.
const MAX_QUOTED_CHARS: usize = 64;

/// How connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A fixed pool of `workers` processes, each accepting on the shared
    /// listeners and serving many connections from one epoll loop.
    Prefork,
    /// The master accepts and forks one child per connection; the child serves
    /// it with blocking I/O and exits.
    Fork,
}

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    /// Standard error, with `<N>` priority prefixes that journald understands.
    Stderr,
    /// The local syslog socket, with the configured facility.
    Syslog,
    /// Standard error (which systemd connects to the journal), except syslog
    /// once daemonized with `daemon = true`, when standard error is closed.
    Auto,
    /// Append to `log.file`, reopened on `SIGUSR1` for log rotation.
    File,
}

/// What a prefork worker does with a new connection while it already serves
/// `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overload {
    /// Stop accepting: the connection waits in the kernel's backlog until a
    /// slot frees up (or another worker takes it).
    Wait,
    /// Accept and close at once, so the client learns immediately instead of
    /// waiting.
    Reject,
}

/// How a prefork worker waits for and moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// One level-triggered epoll loop, a `read` and a `write` per message.
    Epoll,
    /// An `io_uring`: multishot accept and receive into a provided-buffer
    /// ring, sends as submissions, one `io_uring_enter` per loop turn. Falls
    /// back to epoll (with one log line) where the kernel refuses it.
    IoUring,
}

/// Whether a prefork worker keeps the kernel's wake-up preemption.
///
/// A task woken by a client's data normally preempts the task running on
/// its CPU; a `SCHED_BATCH` task waits for the next tick or a free CPU
/// instead, and then finds more ready connections per wake-up. See
/// `src/sched.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedPolicy {
    /// `SCHED_BATCH` while the worker's wake-ups each bring several ready
    /// connections, `SCHED_OTHER` while they bring one or two.
    Auto,
    /// Always `SCHED_OTHER`, the kernel's normal policy.
    Other,
    /// Always `SCHED_BATCH`.
    Batch,
}

/// The whole configuration of one generation, as parsed and validated.
///
/// Every value that [`Config::parse`] returns satisfies the invariants stated
/// on the fields; code that builds a `Config` by hand must keep them too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The addresses to listen on. Never empty, no address twice. Port 0 asks
    /// the kernel for an ephemeral port (used by tests).
    pub listen: Vec<SocketAddr>,
    /// The `listen(2)` backlog, 1..=65535. The kernel silently caps it at
    /// `net.core.somaxconn`.
    pub backlog: i32,
    /// Prefork pool or fork per connection.
    pub mode: Mode,
    /// The number of prefork workers, 1..=512. Unused in fork mode.
    pub workers: usize,
    /// The prefork workers' I/O backend. Unused in fork mode.
    pub io: IoBackend,
    /// How long a prefork worker keeps polling without sleeping after a
    /// loop turn that brought events, 0..=1 s; zero never polls. Unused in
    /// fork mode.
    #[serde(serialize_with = "serialize_duration")]
    pub busy_poll: Duration,
    /// The prefork workers' scheduling policy. Unused in fork mode.
    pub sched_policy: SchedPolicy,
    /// Whether a prefork worker that holds more connections than the least
    /// loaded accepting worker leaves new ones to it. Unused in fork mode.
    pub balance: bool,
    /// The connection cap, 1..=1_000_000: per worker in prefork mode, live
    /// children in fork mode.
    pub max_connections: usize,
    /// The most connections one client IP may hold at once, counted across
    /// all workers (all connection children in fork mode), 0..=1_000_000; 0
    /// means no cap.
    pub max_connections_per_ip: usize,
    /// What a full prefork worker does with new connections.
    pub overload: Overload,
    /// The bytes of the per-connection echo buffer, 512..=16 MiB.
    pub buffer_size: usize,
    /// Whether the epoll worker echoes large messages with `splice(2)`
    /// through a pipe instead of copying them through its buffer. Unused by
    /// the io_uring worker and in fork mode.
    pub splice: bool,
    /// How long a connection may stay silent before it is closed; zero means
    /// never. At most one year.
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// How long a graceful stop (or the retirement of an old generation)
    /// waits for connections to finish before the workers are killed; zero
    /// kills at once. At most one year.
    #[serde(serialize_with = "serialize_duration")]
    pub shutdown_timeout: Duration,
    /// How long a worker may miss its heartbeat before the master kills and
    /// respawns it; zero disables the check. Otherwise at least
    /// [`MIN_WORKER_TIMEOUT`] (a worker beats every 10 ms at the fastest, and
    /// a loaded machine delays a beat by more) and at most one year.
    #[serde(serialize_with = "serialize_duration")]
    pub worker_timeout: Duration,
    /// Connections a worker serves before it retires and is replaced (a guard
    /// against slow leaks); 0 means never.
    pub max_requests_per_worker: u64,
    /// Where to write the master's pid; absolute when set. `None` writes none.
    pub pid_file: Option<PathBuf>,
    /// The user the workers run as after the master drops privileges;
    /// non-empty when set. `None` keeps the user echod was started as.
    pub user: Option<String>,
    /// The group the workers run as; non-empty when set. `None` uses the
    /// user's primary group when `user` is set, else keeps the current group.
    pub group: Option<String>,
    /// Whether to detach (double fork) when not run by systemd. Not with
    /// `log.target = "stderr"`, which is `/dev/null` once detached.
    pub daemon: bool,
    /// The `[log]` table.
    pub log: LogConfig,
}

/// The `[log]` table: how much is logged and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogConfig {
    /// The most verbose level that is emitted.
    #[serde(serialize_with = "serialize_level")]
    pub level: log::LevelFilter,
    /// Where records go.
    pub target: LogTarget,
    /// The syslog facility name; always one of [`FACILITIES`].
    pub facility: String,
    /// The log file; set (and absolute) exactly when `target` is
    /// [`LogTarget::File`].
    pub file: Option<PathBuf>,
}

/// The syslog facility names `log.facility` accepts, as in `syslog.conf(5)`.
pub const FACILITIES: &[&str] = &[
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
];

/// Where a loaded configuration came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No `--config` was given and [`DEFAULT_PATH`] does not exist: the
    /// built-in defaults are in effect.
    BuiltIn,
    /// The configuration was read from this file.
    File(PathBuf),
}

/// Why a configuration could not be loaded. Both variants name the file, and
/// `Invalid` names the line, column and key, so the message alone tells the
/// operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, a directory, too
    /// large).
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file was read but is not a valid configuration: a TOML syntax
    /// error, an unknown key, a wrong type, a value out of range.
    #[error(
        "{}:{}:{}: {}{}",
        .path.display(),
        .line,
        .column,
        key_prefix(.key),
        .message
    )]
    Invalid {
        /// The file the text came from.
        path: PathBuf,
        /// The 1-based line of the offending key or value.
        line: usize,
        /// The 1-based column, counted in characters, of the offending key or
        /// value.
        column: usize,
        /// The dotted path of the key (`workers`, `log.level`), when the
        /// problem belongs to one; a syntax error may not.
        key: Option<String>,
        /// What is wrong and what is expected, in the file's terms.
        message: String,
    },
    /// A check against the system (see [`Config::load_with`]) found a
    /// problem with a key the file does not set: a default, or an option
    /// given on the command line.
    #[error("{origin}: {key}: {message}")]
    Checked {
        /// Where the configuration came from (a path, or "built-in
        /// defaults").
        origin: String,
        /// The dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A problem that a check of a parsed configuration against the system
/// found with one key: a user that does not exist, a log file that cannot
/// be opened. [`Config::load_with`] reports it at the key's place in the
/// file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// The dotted path of the key (`user`, `log.file`).
    pub key: &'static str,
    /// What is wrong, in the file's terms.
    pub message: String,
}

/// Formats the `key: ` part of an `Invalid` message, or nothing.
fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) => format!("{key}: "),
        None => String::new(),
    }
}

impl Mode {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Prefork => "prefork",
            Mode::Fork => "fork",
        }
    }
}

impl LogTarget {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogTarget::Stderr => "stderr",
            LogTarget::Syslog => "syslog",
            LogTarget::Auto => "auto",
            LogTarget::File => "file",
        }
    }
}

impl Overload {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Overload::Wait => "wait",
            Overload::Reject => "reject",
        }
    }
}

impl SchedPolicy {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedPolicy::Auto => "auto",
            SchedPolicy::Other => "other",
            SchedPolicy::Batch => "batch",
        }
    }
}

impl IoBackend {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Epoll => "epoll",
            IoBackend::IoUring => "io_uring",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for LogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Overload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Source {
    /// Writes "built-in defaults" or the file's path, for the line that says
    /// where the configuration came from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::BuiltIn => f.write_str("built-in defaults"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The name of a level as the file spells it (`log`'s own `Display` is
/// upper-case).
fn level_name(level: log::LevelFilter) -> &'static str {
    match level {
        log::LevelFilter::Off => "off",
        log::LevelFilter::Error => "error",
        log::LevelFilter::Warn => "warn",
        log::LevelFilter::Info => "info",
        log::LevelFilter::Debug => "debug",
        log::LevelFilter::Trace => "trace",
    }
}

/// Serializes a duration as the string [`Config::to_toml`] writes ("30s"), so
/// that serde output and `to_toml` agree and both parse back.
fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Serializes a level filter lower-case, as the file spells it.
fn serialize_level<S: Serializer>(level: &log::LevelFilter, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(level_name(*level))
}

impl Default for LogConfig {
    /// `info` to `auto` with facility `daemon`, no file.
    fn default() -> Self {
        LogConfig {
            level: log::LevelFilter::Info,
            target: LogTarget::Auto,
            facility: "daemon".to_owned(),
            file: None,
        }
    }
}

impl Default for Config {
    /// The built-in defaults: loopback only on port 7007 (safe to run
    /// unprivileged and unconfigured; the installed file opens port 7), one
    /// worker per CPU, no privilege drop, no pid file.
    fn default() -> Self {
        Config {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 7007)),
                SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 7007)),
            ],
            backlog: 511,
            mode: Mode::Prefork,
            workers: default_workers(),
            io: IoBackend::Epoll,
            busy_poll: Duration::ZERO,
            sched_policy: SchedPolicy::Auto,
            balance: true,
            max_connections: 1024,
            max_connections_per_ip: 0,
            overload: Overload::Wait,
            buffer_size: 16 * 1024,
            splice: true,
            idle_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(30),
            max_requests_per_worker: 0,
            pid_file: None,
            user: None,
            group: None,
            daemon: false,
            log: LogConfig::default(),
        }
    }
}

/// One worker per CPU the process may run on (which respects cgroup quotas and
/// affinity masks), 1 if that is unknown, and never more than the 512 the file
/// itself may ask for.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(WORKERS.1 as usize)
}

impl Config {
    /// Loads the configuration for a start, a reload or `--check-config`,
    /// then `check`s it against the system (does the user exist, can the
    /// log file be opened). A problem the check finds is reported as parse
    /// errors are: the file, line, column and key.
    ///
    /// With `path` `None`, reads [`DEFAULT_PATH`]; if that file does not exist
    /// (`ENOENT`), the configuration is [`Config::default`] with
    /// [`Source::BuiltIn`], so that echod runs unconfigured. Any other
    /// failure to read it is an error: a file that exists but cannot be read
    /// must not be silently ignored. With `Some(path)`, the file must exist:
    /// the operator named it, and falling back to defaults would hide a typo
    /// in the path.
    pub fn load_with<T>(
        path: Option<&Path>,
        check: impl FnOnce(&Config) -> Result<T, KeyProblem>,
    ) -> Result<(Config, Source, T), ConfigError> {
        load_checked_from(Path::new(DEFAULT_PATH), path, check)
    }

    /// Parses `text` as the contents of the file at `path` (which only names
    /// the file in error messages; nothing is read from it).
    ///
    /// Keys that are absent keep their defaults. Returns the first problem in
    /// file order. Never panics, whatever `text` holds.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse_document(text).map_err(|fault| fault.locate(text, path))
    }

    /// Writes the configuration as TOML that [`Config::parse`] reads back to
    /// an equal `Config`, for `echod --check-config`.
    ///
    /// Every key is written, in the order of the sample file, except unset
    /// optional keys (TOML has no null). Durations are written as strings in
    /// the largest unit that is exact ("5m", "30s", "250ms"). A path that is
    /// not UTF-8 (never the case for a parsed `Config`) is written lossily.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (key, value) in self.entries() {
            if key == "log.level" {
                out.push_str("\n[log]\n");
            }
            if let Some(value) = value {
                let key = key.strip_prefix("log.").unwrap_or(key);
                out.push_str(key);
                out.push_str(" = ");
                out.push_str(&value);
                out.push('\n');
            }
        }
        out
    }

    /// Lists what differs from `self` to `new`, one `key old -> new` string
    /// per changed key in file order, values written as in the file
    /// (`workers 2 -> 4`, `mode "prefork" -> "fork"`, `user (unset) ->
    /// "echod"`; `daemon false -> true (at the next start)`, the one key a
    /// reload does not apply). Empty when nothing changed. Used for the
    /// reload log line.
    pub fn changes(&self, new: &Config) -> Vec<String> {
        self.entries()
            .into_iter()
            .zip(new.entries())
            .filter(|((_, old), (_, new))| old != new)
            .map(|((key, old), (_, new))| {
                let unset = || "(unset)".to_owned();
                // A running master has detached or not: a reload cannot
                // change that.
                let when = if key == "daemon" {
                    " (at the next start)"
                } else {
                    ""
                };
                format!(
                    "{key} {} -> {}{when}",
                    old.unwrap_or_else(unset),
                    new.unwrap_or_else(unset)
                )
            })
            .collect()
    }

    /// Every key, dotted, in file order, with its value rendered as TOML
    /// (`None` for an unset optional key). The one place that names the keys
    /// for output, shared by [`Config::to_toml`] and [`Config::changes`].
    fn entries(&self) -> Vec<(&'static str, Option<String>)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| quote(&p.to_string_lossy()));
        let addrs: Vec<String> = self.listen.iter().map(|a| quote(&a.to_string())).collect();
        vec![
            ("listen", Some(format!("[{}]", addrs.join(", ")))),
            ("backlog", Some(self.backlog.to_string())),
            ("mode", Some(quote(self.mode.as_str()))),
            ("workers", Some(self.workers.to_string())),
            ("io", Some(quote(self.io.as_str()))),
            ("busy_poll", Some(quote(&format_duration(self.busy_poll)))),
            ("sched_policy", Some(quote(self.sched_policy.as_str()))),
            ("balance", Some(self.balance.to_string())),
            ("max_connections", Some(self.max_connections.to_string())),
            (
                "max_connections_per_ip",
                Some(self.max_connections_per_ip.to_string()),
            ),
            ("overload", Some(quote(self.overload.as_str()))),
            ("buffer_size", Some(self.buffer_size.to_string())),
            ("splice", Some(self.splice.to_string())),
            (
                "idle_timeout",
                Some(quote(&format_duration(self.idle_timeout))),
            ),
            (
                "shutdown_timeout",
                Some(quote(&format_duration(self.shutdown_timeout))),
            ),
            (
                "worker_timeout",
                Some(quote(&format_duration(self.worker_timeout))),
            ),
            (
                "max_requests_per_worker",
                Some(self.max_requests_per_worker.to_string()),
            ),
            ("pid_file", path(&self.pid_file)),
            ("user", self.user.as_deref().map(quote)),
            ("group", self.group.as_deref().map(quote)),
            ("daemon", Some(self.daemon.to_string())),
            ("log.level", Some(quote(level_name(self.log.level)))),
            ("log.target", Some(quote(self.log.target.as_str()))),
            ("log.facility", Some(quote(&self.log.facility))),
            ("log.file", path(&self.log.file)),
        ]
    }
}

/// [`Config::load_with`] with the default path as a parameter, so that tests can
/// exercise the "default file absent" case without touching `/etc`.
/// Returns the text read too, for [`Config::load_with`].
fn load_from(
    default_path: &Path,
    explicit: Option<&Path>,
) -> Result<(Config, Source, Option<String>), ConfigError> {
    let path = match explicit {
        Some(path) => path,
        None => default_path,
    };
    let text = match read_file(path) {
        Ok(text) => text,
        Err(ConfigError::Read { source, .. })
            if explicit.is_none() && source.kind() == io::ErrorKind::NotFound =>
        {
            return Ok((Config::default(), Source::BuiltIn, None));
        }
        Err(e) => return Err(e),
    };
    let config = Config::parse(&text, path)?;
    Ok((config, Source::File(path.to_path_buf()), Some(text)))
}

/// [`Config::load_with`] with the default path as a parameter, for tests.
fn load_checked_from<T>(
    default_path: &Path,
    explicit: Option<&Path>,
    check: impl FnOnce(&Config) -> Result<T, KeyProblem>,
) -> Result<(Config, Source, T), ConfigError> {
    let (config, source, text) = load_from(default_path, explicit)?;
    match check(&config) {
        Ok(checked) => Ok((config, source, checked)),
        Err(problem) => Err(locate_problem(problem, &source, text.as_deref())),
    }
}

/// Turns a problem a check found into an error at the key's place in the
/// file, or, when the file does not set the key, an error that names the
/// key and where the configuration came from.
fn locate_problem(problem: KeyProblem, source: &Source, text: Option<&str>) -> ConfigError {
    if let (Source::File(path), Some(text)) = (source, text) {
        let span = DeTable::parse(text)
            .ok()
            .and_then(|document| value_span(document.get_ref(), problem.key));
        if let Some(span) = span {
            let fault = Fault {
                span,
                key: Some(problem.key.to_owned()),
                message: problem.message,
            };
            return fault.locate(text, path);
        }
    }
    ConfigError::Checked {
        origin: source.to_string(),
        key: problem.key.to_owned(),
        message: problem.message,
    }
}

/// Reads the whole file as UTF-8, refusing more than [`MAX_FILE_SIZE`] bytes.
/// Bad UTF-8 is reported as `Invalid` at the line and column of the first bad
/// byte, since that is a problem in the file rather than in reading it.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    // Read one byte past the cap, so that "exactly at the cap" and "over it"
    // can be told apart without trusting a size from fstat (which /dev/zero
    // and pipes do not give).
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(read_error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the file is larger than {} KiB, which no echod configuration is",
                MAX_FILE_SIZE / 1024
            ),
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid_up_to = e.utf8_error().valid_up_to();
        let bytes = e.into_bytes();
        // The prefix up to `valid_up_to` is valid UTF-8 by definition of
        // `valid_up_to`, so the lossy conversion changes nothing before the
        // bad byte and the line and column stay exact.
        let text = String::from_utf8_lossy(&bytes);
        Fault {
            span: valid_up_to..valid_up_to,
            key: None,
            message: "the file is not valid UTF-8 text".to_owned(),
        }
        .locate(&text, path)
    })
}

/// A problem found in the text, before it is turned into a
/// [`ConfigError::Invalid`] by [`Fault::locate`].
#[derive(Debug)]
struct Fault {
    /// The byte span of the offending key or value in the text.
    span: Range<usize>,
    /// The dotted key path, when known.
    key: Option<String>,
    /// What is wrong.
    message: String,
}

impl Fault {
    /// A problem with the key or value `at`, under the dotted key path `key`.
    fn at<T>(at: &Spanned<T>, key: &str, message: impl Into<String>) -> Fault {
        Fault {
            span: at.span(),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }

    /// Attaches the file's path and converts the span to a line and column.
    fn locate(self, text: &str, path: &Path) -> ConfigError {
        let (line, column) = line_column(text, self.span.start);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            key: self.key,
            message: self.message,
        }
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
/// An offset past the end, or inside a character, is moved back to the
/// nearest character boundary rather than trusted.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1; // Stops at 0 at the latest: 0 is always a boundary.
    }
    let before = text.get(..offset).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let line = before.matches('\n').count() + 1;
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// The walker: from the spanned TOML document to a validated `Config`.
// ---------------------------------------------------------------------------

/// The top-level keys, in file order.
pub const TOP_KEYS: &[&str] = &[
    "listen",
    "backlog",
    "mode",
    "workers",
    "io",
    "busy_poll",
    "sched_policy",
    "balance",
    "max_connections",
    "max_connections_per_ip",
    "overload",
    "buffer_size",
    "splice",
    "idle_timeout",
    "shutdown_timeout",
    "worker_timeout",
    "max_requests_per_worker",
    "pid_file",
    "user",
    "group",
    "daemon",
    "log",
];

/// The keys of the `[log]` table, in file order.
pub const LOG_KEYS: &[&str] = &["level", "target", "facility", "file"];

/// Inclusive ranges of the integer keys. Shared by the parser, the messages
/// and the tests.
const BACKLOG: (i128, i128) = (1, 65535);
const WORKERS: (i128, i128) = (1, 512);
const MAX_CONNECTIONS: (i128, i128) = (1, 1_000_000);
const MAX_CONNECTIONS_PER_IP: (i128, i128) = (0, 1_000_000);
const BUFFER_SIZE: (i128, i128) = (512, 16 * 1024 * 1024);
const MAX_REQUESTS: (i128, i128) = (0, u64::MAX as i128);
/// The longest `busy_poll`: polling is for gaps of microseconds between
/// messages; a longer window only burns CPU.
const MAX_BUSY_POLL: Duration = Duration::from_secs(1);
/// The shortest `worker_timeout` other than 0 (off).
pub const MIN_WORKER_TIMEOUT: Duration = Duration::from_secs(1);

/// A key and its value as they appear in the document.
type Entry<'a, 'i> = (&'a Spanned<Cow<'i>>, &'a Spanned<DeValue<'i>>);
type Cow<'i> = std::borrow::Cow<'i, str>;

/// The entries of a table in the order they appear in the file (the document
/// map is sorted by name), so that the first problem reported is the first
/// one the reader meets.
fn in_file_order<'a, 'i>(table: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<Entry<'a, 'i>> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// Parses and validates a whole document.
fn parse_document(text: &str) -> Result<Config, Fault> {
    let document = DeTable::parse(text).map_err(|e| syntax_fault(text, &e))?;
    let mut config = Config::default();
    for (key, value) in in_file_order(document.get_ref()) {
        match key.get_ref().as_ref() {
            "listen" => config.listen = parse_listen(value)?,
            "backlog" => config.backlog = integer(value, "backlog", BACKLOG)?,
            "mode" => {
                config.mode = choice(
                    value,
                    "mode",
                    &[("prefork", Mode::Prefork), ("fork", Mode::Fork)],
                )?;
            }
            "workers" => config.workers = integer(value, "workers", WORKERS)?,
            "io" => {
                config.io = choice(
                    value,
                    "io",
                    &[
                        ("epoll", IoBackend::Epoll),
                        ("io_uring", IoBackend::IoUring),
                    ],
                )?;
            }
            "busy_poll" => config.busy_poll = busy_poll(value)?,
            "sched_policy" => {
                config.sched_policy = choice(
                    value,
                    "sched_policy",
                    &[
                        ("auto", SchedPolicy::Auto),
                        ("other", SchedPolicy::Other),
                        ("batch", SchedPolicy::Batch),
                    ],
                )?;
            }
            "balance" => config.balance = boolean(value, "balance")?,
            "splice" => config.splice = boolean(value, "splice")?,
            "max_connections" => {
                config.max_connections = integer(value, "max_connections", MAX_CONNECTIONS)?;
            }
            "max_connections_per_ip" => {
                config.max_connections_per_ip =
                    integer(value, "max_connections_per_ip", MAX_CONNECTIONS_PER_IP)?;
            }
            "overload" => {
                config.overload = choice(
                    value,
                    "overload",
                    &[("wait", Overload::Wait), ("reject", Overload::Reject)],
                )?;
            }
            "buffer_size" => config.buffer_size = integer(value, "buffer_size", BUFFER_SIZE)?,
            "idle_timeout" => config.idle_timeout = duration(value, "idle_timeout")?,
            "shutdown_timeout" => config.shutdown_timeout = duration(value, "shutdown_timeout")?,
            "worker_timeout" => config.worker_timeout = worker_timeout(value)?,
            "max_requests_per_worker" => {
                config.max_requests_per_worker =
                    integer(value, "max_requests_per_worker", MAX_REQUESTS)?;
            }
            "pid_file" => config.pid_file = Some(absolute_path(value, "pid_file")?),
            "user" => config.user = Some(name(value, "user")?),
            "group" => config.group = Some(name(value, "group")?),
            "daemon" => config.daemon = boolean(value, "daemon")?,
            "log" => config.log = parse_log(value)?,
            _ => return Err(unknown_key(key, "", TOP_KEYS)),
        }
    }
    if config.daemon && config.log.target == LogTarget::Stderr {
        // Only an explicit `target = "stderr"` gets here (the default is
        // "auto"), so the key is in the file.
        let span = value_span(document.get_ref(), "log.target").unwrap_or(0..0);
        return Err(Fault {
            span,
            key: Some("log.target".to_owned()),
            message: STDERR_WHEN_DETACHED.to_owned(),
        });
    }
    Ok(config)
}

/// Why `log.target = "stderr"` and detaching do not go together.
pub const STDERR_WHEN_DETACHED: &str =
    "\"stderr\" is /dev/null once echod detaches (daemon = true, \
     or --daemon): every record would be lost; use \"auto\" (syslog once detached), \
     \"syslog\" or \"file\"";

/// The span of the value of the dotted key `key` (`user`, `log.file`) in a
/// parsed document, if the document has it.
fn value_span(table: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    let (head, rest) = match key.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (key, None),
    };
    let value = table.get(head)?;
    match (rest, value.get_ref()) {
        (None, _) => Some(value.span()),
        (Some(rest), DeValue::Table(inner)) => value_span(inner, rest),
        (Some(_), _) => None,
    }
}

/// `worker_timeout`: a duration that is 0 (off) or at least
/// [`MIN_WORKER_TIMEOUT`].
fn worker_timeout(value: &Spanned<DeValue<'_>>) -> Result<Duration, Fault> {
    let timeout = duration(value, "worker_timeout")?;
    if !timeout.is_zero() && timeout < MIN_WORKER_TIMEOUT {
        return Err(Fault::at(
            value,
            "worker_timeout",
            format!(
                "{} is shorter than {}: a busy but healthy worker could miss it and be \
                 killed again and again; use at least \"{}\", or 0 to turn the check off",
                format_duration(timeout),
                format_duration(MIN_WORKER_TIMEOUT),
                format_duration(MIN_WORKER_TIMEOUT),
            ),
        ));
    }
    Ok(timeout)
}

/// Parses the `[log]` table, including the rule that ties `file` to
/// `target = "file"`.
fn parse_log(value: &Spanned<DeValue<'_>>) -> Result<LogConfig, Fault> {
    let DeValue::Table(table) = value.get_ref() else {
        return Err(Fault::at(
            value,
            "log",
            format!(
                "expected a table of log settings ([log] with level, target, facility, file), found {}",
                type_name(value.get_ref())
            ),
        ));
    };
    let mut log = LogConfig::default();
    let mut target_at = None;
    let mut file_at = None;
    for (key, value) in in_file_order(table) {
        match key.get_ref().as_ref() {
            "level" => {
                log.level = choice(
                    value,
                    "log.level",
                    &[
                        ("error", log::LevelFilter::Error),
                        ("warn", log::LevelFilter::Warn),
                        ("info", log::LevelFilter::Info),
                        ("debug", log::LevelFilter::Debug),
                        ("trace", log::LevelFilter::Trace),
                        ("off", log::LevelFilter::Off),
                    ],
                )?;
            }
            "target" => {
                log.target = choice(
                    value,
                    "log.target",
                    &[
                        ("stderr", LogTarget::Stderr),
                        ("syslog", LogTarget::Syslog),
                        ("auto", LogTarget::Auto),
                        ("file", LogTarget::File),
                    ],
                )?;
                target_at = Some(value);
            }
            "facility" => {
                let facilities: Vec<(&str, &str)> = FACILITIES.iter().map(|f| (*f, *f)).collect();
                log.facility = choice(value, "log.facility", &facilities)?.to_owned();
            }
            "file" => {
                log.file = Some(absolute_path(value, "log.file")?);
                file_at = Some(value);
            }
            _ => return Err(unknown_key(key, "log.", LOG_KEYS)),
        }
    }
    match (log.target, target_at, file_at) {
        (LogTarget::File, Some(target_at), None) => Err(Fault::at(
            target_at,
            "log.target",
            "\"file\" needs log.file, the absolute path of the file to log to",
        )),
        (target, _, Some(file_at)) if target != LogTarget::File => Err(Fault::at(
            file_at,
            "log.file",
            format!(
                "is only used with log.target = \"file\", but log.target is \"{target}\"; \
                 set log.target = \"file\" or remove log.file"
            ),
        )),
        _ => Ok(log),
    }
}

/// Turns a TOML syntax error into a fault at its span. The key path is not
/// known at that point; a duplicate key is at least named.
fn syntax_fault(text: &str, error: &toml::de::Error) -> Fault {
    let span = error.span().unwrap_or(0..0);
    let mut message = error.message().trim().replace('\n', "; ");
    if message == "duplicate key" {
        if let Some(name) = text.get(span.clone()) {
            message = format!(
                "duplicate key {}: a key or table may be defined only once",
                quote_short(name)
            );
        }
    }
    Fault {
        span,
        key: None,
        message: format!("invalid TOML: {message}"),
    }
}

/// A fault for a key that this table does not have, with a suggestion when
/// the key looks like a misspelling of a known one.
fn unknown_key(key: &Spanned<Cow<'_>>, prefix: &str, known: &[&str]) -> Fault {
    let name = key.get_ref().as_ref();
    let message = match known.iter().find(|k| edit_distance(name, k) <= 2) {
        Some(close) => format!("unknown key; did you mean {close}?"),
        None => {
            let table = if prefix.is_empty() {
                "at the top level"
            } else {
                "in [log]"
            };
            format!("unknown key; the keys {table} are {}", known.join(", "))
        }
    };
    Fault::at(key, &format!("{prefix}{}", key_name(name)), message)
}

/// The Levenshtein distance between two short strings, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for j in 0..b.len() {
            let above = row.get(j + 1).copied().unwrap_or(0);
            let left = row.get(j).copied().unwrap_or(0);
            let cost = usize::from(b.get(j) != Some(&ca));
            let best = (above + 1).min(left + 1).min(diagonal + cost);
            diagonal = above;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = best;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// A key as written in a message: bare when TOML allows it bare, quoted (with
/// control characters escaped) otherwise, so that a strange key cannot break
/// the log line it appears in.
fn key_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.to_owned()
    } else {
        quote_short(name)
    }
}

/// "a string", "an integer", ...: what the file holds, for "found ..." in
/// type errors.
fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The value of a TOML integer, or `None` when it does not fit in an `i128`
/// (TOML itself allows only 64 bits, but the parser hands over the digits
/// unchecked, so an absurd literal must not wrap).
fn integer_value(int: &DeInteger<'_>) -> Option<i128> {
    i128::from_str_radix(int.as_str(), int.radix()).ok()
}

/// An integer key within `range` (inclusive), converted to its field's type.
fn integer<T: TryFrom<i128>>(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    (min, max): (i128, i128),
) -> Result<T, Fault> {
    let expected = if max >= i128::from(u64::MAX) {
        "expected a non-negative integer".to_owned()
    } else {
        format!("expected an integer from {min} to {max}")
    };
    let found = match value.get_ref() {
        DeValue::Integer(int) => {
            if let Some(n) = integer_value(int).filter(|n| (min..=max).contains(n)) {
                // The range fits every field type it is used with, so this
                // conversion succeeds; a failure falls through to the
                // out-of-range message rather than a panic.
                if let Ok(n) = T::try_from(n) {
                    return Ok(n);
                }
            }
            int.to_string()
        }
        other => type_name(other).to_owned(),
    };
    Err(Fault::at(value, key, format!("{expected}, found {found}")))
}

/// A boolean key.
fn boolean(value: &Spanned<DeValue<'_>>, key: &str) -> Result<bool, Fault> {
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        other => Err(Fault::at(
            value,
            key,
            format!("expected true or false, found {}", type_name(other)),
        )),
    }
}

/// A string key whose value is one of a fixed set of names.
fn choice<T: Copy>(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    options: &[(&str, T)],
) -> Result<T, Fault> {
    let names: Vec<String> = options.iter().map(|(name, _)| quote(name)).collect();
    let expected = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    };
    let found = match value.get_ref() {
        DeValue::String(s) => {
            if let Some((_, choice)) = options.iter().find(|(name, _)| *name == s.as_ref()) {
                return Ok(*choice);
            }
            quote_short(s)
        }
        other => type_name(other).to_owned(),
    };
    Err(Fault::at(
        value,
        key,
        format!("expected {expected}, found {found}"),
    ))
}

/// A string key that must be a non-empty name without NUL (a user or group
/// name, which goes to `getpwnam(3)` as a C string).
fn name(value: &Spanned<DeValue<'_>>, key: &str) -> Result<String, Fault> {
    match value.get_ref() {
        DeValue::String(s) if s.is_empty() => Err(Fault::at(
            value,
            key,
            "must not be empty; remove the key to keep the user and group echod starts as",
        )),
        DeValue::String(s) if s.contains('\0') => Err(Fault::at(
            value,
            key,
            format!("{} contains a NUL character", quote_short(s)),
        )),
        DeValue::String(s) => Ok(s.to_string()),
        other => Err(Fault::at(
            value,
            key,
            format!("expected a name in quotes, found {}", type_name(other)),
        )),
    }
}

/// A string key that must be an absolute path. Relative paths are refused
/// because they would depend on the working directory the daemon happens to
/// be started in, and on whether it has changed it since.
fn absolute_path(value: &Spanned<DeValue<'_>>, key: &str) -> Result<PathBuf, Fault> {
    match value.get_ref() {
        DeValue::String(s) if s.contains('\0') => Err(Fault::at(
            value,
            key,
            format!("{} contains a NUL character", quote_short(s)),
        )),
        DeValue::String(s) if s.starts_with('/') => Ok(PathBuf::from(s.as_ref())),
        DeValue::String(s) => Err(Fault::at(
            value,
            key,
            format!(
                "{} is not an absolute path; write the full path starting with /",
                quote_short(s)
            ),
        )),
        other => Err(Fault::at(
            value,
            key,
            format!(
                "expected an absolute path in quotes, found {}",
                type_name(other)
            ),
        )),
    }
}

/// The `listen` array: a non-empty list of distinct `IP:PORT` strings.
fn parse_listen(value: &Spanned<DeValue<'_>>) -> Result<Vec<SocketAddr>, Fault> {
    const EXAMPLE: &str = "expected IP:PORT such as \"127.0.0.1:7\" or \"[::1]:7\"";
    let DeValue::Array(items) = value.get_ref() else {
        return Err(Fault::at(
            value,
            "listen",
            format!(
                "expected an array of addresses such as [\"0.0.0.0:7\", \"[::]:7\"], found {}",
                type_name(value.get_ref())
            ),
        ));
    };
    if items.is_empty() {
        return Err(Fault::at(
            value,
            "listen",
            "the list is empty; echod needs at least one address to listen on",
        ));
    }
    let mut addrs: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for item in items.iter() {
        let DeValue::String(text) = item.get_ref() else {
            return Err(Fault::at(
                item,
                "listen",
                format!(
                    "expected an address in quotes, found {}; {EXAMPLE}",
                    type_name(item.get_ref())
                ),
            ));
        };
        let addr: SocketAddr = text.trim().parse().map_err(|_| {
            Fault::at(
                item,
                "listen",
                format!("{} is not an address: {EXAMPLE}", quote_short(text)),
            )
        })?;
        if addrs.contains(&addr) {
            return Err(Fault::at(
                item,
                "listen",
                format!("{addr} is listed twice; each address can be bound only once"),
            ));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

/// A duration key: a number of seconds (integer or float) or a string with a
/// unit, see [`parse_duration`].
fn duration(value: &Spanned<DeValue<'_>>, key: &str) -> Result<Duration, Fault> {
    let result = match value.get_ref() {
        DeValue::String(s) => parse_duration(s),
        DeValue::Integer(int) => match integer_value(int) {
            Some(n) if n < 0 => Err(format!("{int} is negative; a duration is 0 or more")),
            Some(n) if n <= i128::from(MAX_DURATION_SECS) => {
                // Within 0..=MAX_DURATION_SECS, so it fits a u64.
                u64::try_from(n)
                    .map(Duration::from_secs)
                    .map_err(|_| too_long(&int.to_string()))
            }
            _ => Err(too_long(&int.to_string())),
        },
        DeValue::Float(float) => {
            let text = float.as_str();
            match text.parse::<f64>() {
                Ok(secs) if secs.is_nan() => Err(format!("{text} is not a number of seconds")),
                Ok(secs) if secs < 0.0 => {
                    Err(format!("{text} is negative; a duration is 0 or more"))
                }
                Ok(secs) if secs > MAX_DURATION_SECS as f64 => Err(too_long(text)),
                Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| format!("{text}: {e}")),
                Err(_) => Err(format!("{text} is not a number of seconds")),
            }
        }
        other => Err(format!(
            "expected a duration such as \"30s\", \"250ms\", \"5m\", \"1h\" \
             or a number of seconds, found {}",
            type_name(other)
        )),
    };
    result.map_err(|message| Fault::at(value, key, message))
}

/// The `busy_poll` key: a duration of at most [`MAX_BUSY_POLL`].
fn busy_poll(value: &Spanned<DeValue<'_>>) -> Result<Duration, Fault> {
    let d = duration(value, "busy_poll")?;
    if d > MAX_BUSY_POLL {
        return Err(Fault::at(
            value,
            "busy_poll",
            format!(
                "\"{}\" is longer than the limit of {}; a busy poll waits for \
                 the next message for microseconds, such as \"50us\"",
                format_duration(d),
                format_duration(MAX_BUSY_POLL)
            ),
        ));
    }
    Ok(d)
}

/// The message for a duration over the one-year limit.
fn too_long(shown: &str) -> String {
    format!("{shown} is longer than the limit of one year (8760h)")
}

/// Parses a duration written as a string: a non-negative decimal number with
/// an optional unit, `us`, `ms`, `s`, `m` or `h` (seconds when there is
/// none), for example "50us", "250ms", "30s", "1.5s", "5m", "1h", "30". At
/// most one year.
///
/// The decimal is converted exactly, in integer nanoseconds (digits below a
/// nanosecond are dropped), so that what [`Config::to_toml`] writes reads
/// back to the very same `Duration`. The error is a complete sentence
/// fragment that quotes the input, to follow `key: ` in a message.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const FORMS: &str = "write a number with an optional unit us, ms, s, m or h, \
                         such as \"50us\", \"250ms\", \"30s\", \"1.5s\", \"5m\" or \"1h\"";
    let shown = quote_short(s);
    let trimmed = s.trim();
    if trimmed.starts_with('-') {
        return Err(format!("{shown} is negative; a duration is 0 or more"));
    }
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let nanos_per_unit: u128 = match unit.trim_start() {
        "" | "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "us" => 1_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ if number.is_empty() => return Err(format!("{shown} is not a duration; {FORMS}")),
        other => {
            return Err(format!(
                "{shown} has an unknown unit {}; {FORMS}",
                quote_short(other)
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(format!("{shown} is not a duration; {FORMS}"));
    }
    // Twenty whole digits already exceed a year in any unit; refusing longer
    // ones keeps the arithmetic below inside u128.
    if whole.len() > 20 {
        return Err(too_long(&shown));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| format!("{shown} is not a duration; {FORMS}"))?
    };
    // Digits past the eighteenth are below a nanosecond even for hours.
    let fraction = fraction.get(..fraction.len().min(18)).unwrap_or("");
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        let digits: u128 = fraction
            .parse()
            .map_err(|_| format!("{shown} is not a duration; {FORMS}"))?;
        let scale = 10u128.pow(fraction.len() as u32); // len <= 18: no overflow.
        digits * nanos_per_unit / scale
    };
    let nanos = whole * nanos_per_unit + fraction_nanos;
    if nanos > u128::from(MAX_DURATION_SECS) * 1_000_000_000 {
        return Err(too_long(&shown));
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long(&shown))?;
    let subsec = u32::try_from(nanos % 1_000_000_000).map_err(|_| too_long(&shown))?;
    Ok(Duration::new(secs, subsec))
}

/// Writes a duration in the largest unit that represents it exactly: "1h",
/// "5m", "30s", "250ms", "50us", or seconds with a decimal fraction ("1.000000001s")
/// when nothing coarser is exact. [`parse_duration`] reads every output back
/// to the same value.
fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        if secs != 0 && secs % 3600 == 0 {
            format!("{}h", secs / 3600)
        } else if secs != 0 && secs % 60 == 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else if nanos % 1_000 == 0 {
        format!("{}us", d.as_micros())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{secs}.{}s", fraction.trim_end_matches('0'))
    }
}

/// Writes `s` as a TOML basic string: quoted, with backslash, quote and every
/// control character escaped, so the output is valid TOML and a single line.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// [`quote`] for echoing a value in an error message, cut after
/// [`MAX_QUOTED_CHARS`] characters.
fn quote_short(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}...", quote(s.get(..cut).unwrap_or(""))),
        None => quote(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PATH: &str = "/tmp/x.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(PATH))
    }

    /// The Display of the error `text` produces; fails the test if it parses.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn a_full_config() -> Config {
        Config {
            listen: vec![
                "0.0.0.0:7".parse().unwrap(),
                "[::]:7".parse().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
            ],
            backlog: 4096,
            mode: Mode::Fork,
            workers: 7,
            io: IoBackend::IoUring,
            busy_poll: Duration::from_micros(50),
            sched_policy: SchedPolicy::Batch,
            balance: false,
            max_connections: 10_000,
            max_connections_per_ip: 16,
            overload: Overload::Reject,
            buffer_size: 65536,
            splice: false,
            idle_timeout: Duration::from_millis(1500),
            shutdown_timeout: Duration::ZERO,
            worker_timeout: Duration::from_secs(3600),
            max_requests_per_worker: 1_000_000,
            pid_file: Some(PathBuf::from("/run/echod.pid")),
            user: Some("echod".to_owned()),
            group: Some("nogroup".to_owned()),
            daemon: true,
            log: LogConfig {
                level: log::LevelFilter::Trace,
                target: LogTarget::File,
                facility: "local3".to_owned(),
                file: Some(PathBuf::from("/var/log/echod \"x\".log")),
            },
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(
            c.listen,
            vec![
                "127.0.0.1:7007".parse::<SocketAddr>().unwrap(),
                "[::1]:7007".parse().unwrap()
            ]
        );
        assert_eq!(c.backlog, 511);
        assert_eq!(c.mode, Mode::Prefork);
        assert!((1..=512).contains(&c.workers));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.workers, cpus.min(512));
        assert_eq!(c.io, IoBackend::Epoll);
        assert_eq!(c.busy_poll, Duration::ZERO);
        assert_eq!(c.sched_policy, SchedPolicy::Auto);
        assert!(c.balance);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.max_connections_per_ip, 0);
        assert_eq!(c.overload, Overload::Wait);
        assert_eq!(c.buffer_size, 16384);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.worker_timeout, Duration::from_secs(30));
        assert_eq!(c.max_requests_per_worker, 0);
        assert_eq!(c.pid_file, None);
        assert_eq!(c.user, None);
        assert_eq!(c.group, None);
        assert!(!c.daemon);
        assert_eq!(c.log.level, log::LevelFilter::Info);
        assert_eq!(c.log.target, LogTarget::Auto);
        assert_eq!(c.log.facility, "daemon");
        assert_eq!(c.log.file, None);
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("# only a comment\n\n").unwrap(), Config::default());
        assert_eq!(parse("[log]\n").unwrap(), Config::default());
    }

    #[test]
    fn every_key_is_parsed() {
        let text = r#"
            listen = ["0.0.0.0:7", "[::]:7", "127.0.0.1:0"]
            backlog = 4096
            mode = "fork"
            workers = 7
            io = "io_uring"
            busy_poll = "50us"
            sched_policy = "batch"
            balance = false
            max_connections = 10_000
            max_connections_per_ip = 16
            overload = "reject"
            buffer_size = 65536
            splice = false
            idle_timeout = 1.5
            shutdown_timeout = 0
            worker_timeout = "1h"
            max_requests_per_worker = 1000000
            pid_file = "/run/echod.pid"
            user = "echod"
            group = "nogroup"
            daemon = true

            [log]
            level = "trace"
            target = "file"
            facility = "local3"
            file = '/var/log/echod "x".log'
        "#;
        assert_eq!(parse(text).unwrap(), a_full_config());
    }

    #[test]
    fn log_keys_may_be_dotted_or_inline() {
        let dotted = parse("log.level = \"debug\"\nlog.target = \"syslog\"\n").unwrap();
        let inline = parse("log = { level = \"debug\", target = \"syslog\" }\n").unwrap();
        assert_eq!(dotted.log.level, log::LevelFilter::Debug);
        assert_eq!(dotted.log.target, LogTarget::Syslog);
        assert_eq!(dotted, inline);
    }

    #[test]
    fn every_level_target_and_facility_is_accepted() {
        for (name, level) in [
            ("error", log::LevelFilter::Error),
            ("warn", log::LevelFilter::Warn),
            ("info", log::LevelFilter::Info),
            ("debug", log::LevelFilter::Debug),
            ("trace", log::LevelFilter::Trace),
            ("off", log::LevelFilter::Off),
        ] {
            let c = parse(&format!("log.level = \"{name}\"")).unwrap();
            assert_eq!(c.log.level, level);
            assert_eq!(level_name(level), name);
        }
        for target in ["stderr", "syslog", "auto"] {
            let c = parse(&format!("log.target = \"{target}\"")).unwrap();
            assert_eq!(c.log.target.as_str(), target);
        }
        for facility in FACILITIES {
            let c = parse(&format!("log.facility = \"{facility}\"")).unwrap();
            assert_eq!(c.log.facility, *facility);
        }
    }

    #[test]
    fn durations_take_numbers_and_units() {
        let cases = [
            ("0", Duration::ZERO),
            ("30", Duration::from_secs(30)),
            ("30s", Duration::from_secs(30)),
            ("30 s", Duration::from_secs(30)),
            (" 5m ", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("250ms", Duration::from_millis(250)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2.", Duration::from_secs(2)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("0.0000000019s", Duration::from_nanos(1)),
            ("1.5ms", Duration::from_micros(1500)),
            ("50us", Duration::from_micros(50)),
            ("2.5us", Duration::from_nanos(2500)),
            ("0.25h", Duration::from_secs(900)),
            ("8760h", Duration::from_secs(MAX_DURATION_SECS)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "s",
            ".",
            "1..5s",
            "-1s",
            "1x",
            "5 minutes",
            "1e3",
            "8761h",
            "nan",
            "inf",
            "1,5s",
        ] {
            assert!(parse_duration(text).is_err(), "{text} must be refused");
        }
        let c =
            parse("idle_timeout = 2\nshutdown_timeout = 0.25\nworker_timeout = \"90\"").unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.shutdown_timeout, Duration::from_millis(250));
        assert_eq!(c.worker_timeout, Duration::from_secs(90));
    }

    #[test]
    fn durations_are_written_in_the_largest_exact_unit() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(61_500), "61500ms"),
            (Duration::new(1, 1), "1.000000001s"),
            (Duration::new(0, 1_500), "0.0000015s"),
            (Duration::from_micros(50), "50us"),
            (Duration::from_micros(1_000_001), "1000001us"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want), Ok(d));
        }
    }

    #[test]
    fn to_toml_round_trips_the_defaults() {
        let c = Config::default();
        let text = c.to_toml();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        // Unset optional keys are left out; every other key is present.
        for key in TOP_KEYS
            .iter()
            .filter(|k| !["pid_file", "user", "group", "log"].contains(k))
        {
            assert!(
                text.contains(&format!("\n{key} = ")) || text.starts_with(&format!("{key} = ")),
                "{key}"
            );
        }
        assert!(!text.contains("pid_file"));
        assert!(
            text.contains("\n[log]\nlevel = \"info\"\ntarget = \"auto\"\nfacility = \"daemon\"\n")
        );
        assert!(text.contains("idle_timeout = \"5m\"\n"));
        assert!(text.contains("shutdown_timeout = \"30s\"\n"));
    }

    #[test]
    fn to_toml_round_trips_a_full_config() {
        let c = a_full_config();
        let text = c.to_toml();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        assert!(text.contains("listen = [\"0.0.0.0:7\", \"[::]:7\", \"127.0.0.1:0\"]\n"));
        assert!(text.contains("idle_timeout = \"1500ms\"\n"));
        assert!(text.contains("file = \"/var/log/echod \\\"x\\\".log\"\n"));
    }

    #[test]
    fn serde_output_matches_and_parses_back() {
        for c in [Config::default(), a_full_config()] {
            let text = toml::to_string(&c).unwrap();
            assert_eq!(parse(&text).unwrap(), c, "{text}");
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_position() {
        assert_eq!(
            error("workers = 2\nworkerz = 3\n"),
            "/tmp/x.toml:2:1: workerz: unknown key; did you mean workers?"
        );
        assert_eq!(
            error("[log]\nlevel = \"info\"\n  colour = true\n"),
            "/tmp/x.toml:3:3: log.colour: unknown key; the keys in [log] are level, target, facility, file"
        );
        let e = error("frobnicate = 1\n");
        assert!(
            e.starts_with("/tmp/x.toml:1:1: frobnicate: unknown key; the keys at the top level are listen, backlog,"),
            "{e}"
        );
        assert_eq!(
            error("\"a b\\n\" = 1\n"),
            "/tmp/x.toml:1:1: \"a b\\n\": unknown key; the keys at the top level are listen, backlog, mode, workers, io, busy_poll, sched_policy, balance, max_connections, max_connections_per_ip, overload, buffer_size, splice, idle_timeout, shutdown_timeout, worker_timeout, max_requests_per_worker, pid_file, user, group, daemon, log"
        );
        assert_eq!(
            error("[log.rotate]\nsize = 1\n"),
            "/tmp/x.toml:1:6: log.rotate: unknown key; the keys in [log] are level, target, facility, file"
        );
    }

    #[test]
    fn wrong_types_are_named_with_their_position() {
        assert_eq!(
            error("\n\nworkers = \"4\"\n"),
            "/tmp/x.toml:3:11: workers: expected an integer from 1 to 512, found a string"
        );
        assert_eq!(
            error("daemon = 1"),
            "/tmp/x.toml:1:10: daemon: expected true or false, found an integer"
        );
        assert_eq!(
            error("[log]\nlevel = 3"),
            "/tmp/x.toml:2:9: log.level: expected \"error\", \"warn\", \"info\", \"debug\", \"trace\" or \"off\", found an integer"
        );
        assert_eq!(
            error("log = \"debug\""),
            "/tmp/x.toml:1:7: log: expected a table of log settings ([log] with level, target, facility, file), found a string"
        );
        assert_eq!(
            error("listen = \"0.0.0.0:7\""),
            "/tmp/x.toml:1:10: listen: expected an array of addresses such as [\"0.0.0.0:7\", \"[::]:7\"], found a string"
        );
        assert_eq!(
            error("idle_timeout = true"),
            "/tmp/x.toml:1:16: idle_timeout: expected a duration such as \"30s\", \"250ms\", \"5m\", \"1h\" or a number of seconds, found a boolean"
        );
        assert_eq!(
            error("buffer_size = 1.5"),
            "/tmp/x.toml:1:15: buffer_size: expected an integer from 512 to 16777216, found a float"
        );
        assert_eq!(
            error("user = 1000"),
            "/tmp/x.toml:1:8: user: expected a name in quotes, found an integer"
        );
        assert_eq!(
            error("pid_file = 1979-05-27"),
            "/tmp/x.toml:1:12: pid_file: expected an absolute path in quotes, found a date-time"
        );
        assert_eq!(
            error("[[log]]\nlevel = \"info\""),
            "/tmp/x.toml:1:1: log: expected a table of log settings ([log] with level, target, facility, file), found an array"
        );
    }

    #[test]
    fn integers_out_of_range_never_wrap() {
        assert_eq!(
            error("workers = 0"),
            "/tmp/x.toml:1:11: workers: expected an integer from 1 to 512, found 0"
        );
        assert_eq!(
            error("workers = -1"),
            "/tmp/x.toml:1:11: workers: expected an integer from 1 to 512, found -1"
        );
        assert_eq!(
            error("workers = 1180591620717411303424"),
            "/tmp/x.toml:1:11: workers: expected an integer from 1 to 512, found 1180591620717411303424"
        );
        assert_eq!(
            error("backlog = 0x10000"),
            "/tmp/x.toml:1:11: backlog: expected an integer from 1 to 65535, found 0x10000"
        );
        assert_eq!(
            error("max_requests_per_worker = -1"),
            "/tmp/x.toml:1:27: max_requests_per_worker: expected a non-negative integer, found -1"
        );
        let e = error(&format!("max_connections = 1{}", "0".repeat(60)));
        assert!(e.starts_with("/tmp/x.toml:1:19: max_connections: expected an integer from 1 to 1000000, found 1000"), "{e}");
        assert_eq!(
            parse("max_requests_per_worker = 18446744073709551615")
                .unwrap()
                .max_requests_per_worker,
            u64::MAX
        );
        assert!(parse("max_requests_per_worker = 18446744073709551616").is_err());
        assert_eq!(
            parse("max_connections_per_ip = 1_000_000")
                .unwrap()
                .max_connections_per_ip,
            1_000_000
        );
        assert_eq!(parse("buffer_size = 0o1000").unwrap().buffer_size, 512);
        assert_eq!(parse("backlog = 65535").unwrap().backlog, 65535);
        assert_eq!(parse("workers = 512").unwrap().workers, 512);
        assert!(parse("buffer_size = 16777217").is_err());
        assert!(parse("max_connections = 0").is_err());
    }

    #[test]
    fn bad_names_are_named_with_their_position() {
        assert_eq!(
            error("mode = \"Fork\""),
            "/tmp/x.toml:1:8: mode: expected \"prefork\" or \"fork\", found \"Fork\""
        );
        assert_eq!(
            error("overload = \"drop\""),
            "/tmp/x.toml:1:12: overload: expected \"wait\" or \"reject\", found \"drop\""
        );
        assert_eq!(
            error("workers = 2\nio = \"uring\""),
            "/tmp/x.toml:2:6: io: expected \"epoll\" or \"io_uring\", found \"uring\""
        );
        assert_eq!(
            error("busy_poll = \"2s\""),
            "/tmp/x.toml:1:13: busy_poll: \"2s\" is longer than the limit of 1s; a busy poll waits for the next message for microseconds, such as \"50us\""
        );
        assert_eq!(
            error("sched_policy = \"fifo\""),
            "/tmp/x.toml:1:16: sched_policy: expected \"auto\", \"other\" or \"batch\", found \"fifo\""
        );
        assert_eq!(
            error("io = 1"),
            "/tmp/x.toml:1:6: io: expected \"epoll\" or \"io_uring\", found an integer"
        );
        assert_eq!(
            error("[log]\ntarget = \"journal\""),
            "/tmp/x.toml:2:10: log.target: expected \"stderr\", \"syslog\", \"auto\" or \"file\", found \"journal\""
        );
        let e = error("[log]\nfacility = \"local8\"");
        assert!(
            e.starts_with("/tmp/x.toml:2:12: log.facility: expected \"kern\", \"user\","),
            "{e}"
        );
        assert!(
            e.ends_with("\"local6\" or \"local7\", found \"local8\""),
            "{e}"
        );
        assert_eq!(
            error("[log]\nlevel = \"verbose\""),
            "/tmp/x.toml:2:9: log.level: expected \"error\", \"warn\", \"info\", \"debug\", \"trace\" or \"off\", found \"verbose\""
        );
    }

    #[test]
    fn bad_durations_are_named_with_their_position() {
        assert_eq!(
            error("idle_timeout = \"5x\""),
            "/tmp/x.toml:1:16: idle_timeout: \"5x\" has an unknown unit \"x\"; write a number with an optional unit us, ms, s, m or h, such as \"50us\", \"250ms\", \"30s\", \"1.5s\", \"5m\" or \"1h\""
        );
        assert_eq!(
            error("shutdown_timeout = -1"),
            "/tmp/x.toml:1:20: shutdown_timeout: -1 is negative; a duration is 0 or more"
        );
        assert_eq!(
            error("shutdown_timeout = \"-1s\""),
            "/tmp/x.toml:1:20: shutdown_timeout: \"-1s\" is negative; a duration is 0 or more"
        );
        assert_eq!(
            error("worker_timeout = nan"),
            "/tmp/x.toml:1:18: worker_timeout: nan is not a number of seconds"
        );
        assert_eq!(
            error("worker_timeout = -0.5"),
            "/tmp/x.toml:1:18: worker_timeout: -0.5 is negative; a duration is 0 or more"
        );
        assert_eq!(
            error("worker_timeout = inf"),
            "/tmp/x.toml:1:18: worker_timeout: inf is longer than the limit of one year (8760h)"
        );
        assert_eq!(
            error("idle_timeout = 31536001"),
            "/tmp/x.toml:1:16: idle_timeout: 31536001 is longer than the limit of one year (8760h)"
        );
        assert_eq!(
            error("idle_timeout = \"2y\""),
            "/tmp/x.toml:1:16: idle_timeout: \"2y\" has an unknown unit \"y\"; write a number with an optional unit us, ms, s, m or h, such as \"50us\", \"250ms\", \"30s\", \"1.5s\", \"5m\" or \"1h\""
        );
        assert_eq!(
            error("idle_timeout = \"\""),
            "/tmp/x.toml:1:16: idle_timeout: \"\" is not a duration; write a number with an optional unit us, ms, s, m or h, such as \"50us\", \"250ms\", \"30s\", \"1.5s\", \"5m\" or \"1h\""
        );
        assert_eq!(
            parse("idle_timeout = -0.0").unwrap().idle_timeout,
            Duration::ZERO
        );
    }

    #[test]
    fn bad_addresses_are_named_at_the_element() {
        assert_eq!(
            error("listen = [\"127.0.0.1:7\",\n          \"localhost:x\"]"),
            "/tmp/x.toml:2:11: listen: \"localhost:x\" is not an address: expected IP:PORT such as \"127.0.0.1:7\" or \"[::1]:7\""
        );
        assert_eq!(
            error("listen = [\"127.0.0.1\"]"),
            "/tmp/x.toml:1:11: listen: \"127.0.0.1\" is not an address: expected IP:PORT such as \"127.0.0.1:7\" or \"[::1]:7\""
        );
        assert_eq!(
            error("listen = [7]"),
            "/tmp/x.toml:1:11: listen: expected an address in quotes, found an integer; expected IP:PORT such as \"127.0.0.1:7\" or \"[::1]:7\""
        );
        assert_eq!(
            error("listen = []"),
            "/tmp/x.toml:1:10: listen: the list is empty; echod needs at least one address to listen on"
        );
        assert_eq!(
            error("listen = [\"[::1]:7\", \"0.0.0.0:7\", \"[0::1]:7\"]"),
            "/tmp/x.toml:1:35: listen: [::1]:7 is listed twice; each address can be bound only once"
        );
        let c = parse("listen = [\"0.0.0.0:7\", \"[::]:7\", \"127.0.0.1:0\"]").unwrap();
        assert_eq!(c.listen.len(), 3);
        assert_eq!(c.listen[2].port(), 0);
    }

    #[test]
    fn paths_must_be_absolute() {
        assert_eq!(
            error("pid_file = \"run/echod.pid\""),
            "/tmp/x.toml:1:12: pid_file: \"run/echod.pid\" is not an absolute path; write the full path starting with /"
        );
        assert_eq!(
            error("pid_file = \"\""),
            "/tmp/x.toml:1:12: pid_file: \"\" is not an absolute path; write the full path starting with /"
        );
        assert_eq!(
            error("[log]\ntarget = \"file\"\nfile = \"echod.log\""),
            "/tmp/x.toml:3:8: log.file: \"echod.log\" is not an absolute path; write the full path starting with /"
        );
        assert_eq!(
            error("pid_file = \"/run/a\\u0000b\""),
            "/tmp/x.toml:1:12: pid_file: \"/run/a\\u0000b\" contains a NUL character"
        );
    }

    #[test]
    fn log_file_goes_with_target_file() {
        assert_eq!(
            error("[log]\ntarget = \"file\"\n"),
            "/tmp/x.toml:2:10: log.target: \"file\" needs log.file, the absolute path of the file to log to"
        );
        assert_eq!(
            error("[log]\nfile = \"/var/log/echod.log\"\n"),
            "/tmp/x.toml:2:8: log.file: is only used with log.target = \"file\", but log.target is \"auto\"; set log.target = \"file\" or remove log.file"
        );
        assert_eq!(
            error("[log]\nfile = \"/var/log/echod.log\"\ntarget = \"syslog\"\n"),
            "/tmp/x.toml:2:8: log.file: is only used with log.target = \"file\", but log.target is \"syslog\"; set log.target = \"file\" or remove log.file"
        );
        let c = parse("[log]\nfile = \"/var/log/echod.log\"\ntarget = \"file\"\n").unwrap();
        assert_eq!(c.log.file, Some(PathBuf::from("/var/log/echod.log")));
    }

    #[test]
    fn names_must_not_be_empty() {
        assert_eq!(
            error("user = \"\""),
            "/tmp/x.toml:1:8: user: must not be empty; remove the key to keep the user and group echod starts as"
        );
        assert_eq!(
            error("\ngroup = \"\""),
            "/tmp/x.toml:2:9: group: must not be empty; remove the key to keep the user and group echod starts as"
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        assert_eq!(
            error("workers = 2\nworkers = 3\n"),
            "/tmp/x.toml:2:1: invalid TOML: duplicate key \"workers\": a key or table may be defined only once"
        );
        let e = error("backlog = 10\nmode = \"fork\n");
        assert!(e.starts_with("/tmp/x.toml:2:13: invalid TOML: "), "{e}");
        let e = error("wörkers 5\n");
        assert!(e.starts_with("/tmp/x.toml:1:"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(line_column("é = 1", 4), (1, 4));
        assert_eq!(line_column("a\nbé", 4), (2, 2)); // Inside 'é': moved back.
        assert_eq!(line_column("ab", 99), (1, 3));
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(
            error("user = \"é\" # ü\nworkers = \"ß\""),
            "/tmp/x.toml:2:11: workers: expected an integer from 1 to 512, found a string"
        );
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(1000);
        let e = error(&format!("mode = \"{long}\""));
        assert!(e.len() < 200, "{e}");
        assert!(
            e.ends_with(&format!("found \"{}\"...", "x".repeat(MAX_QUOTED_CHARS))),
            "{e}"
        );
    }

    #[test]
    fn the_first_problem_in_file_order_is_reported() {
        // "backlog" sorts before "workers" but comes second in the file.
        assert_eq!(
            error("workers = 0\nbacklog = 0\n"),
            "/tmp/x.toml:1:11: workers: expected an integer from 1 to 512, found 0"
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("echod-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_missing_default_file_means_built_in_defaults() {
        let dir = temp_dir("builtin");
        let (c, source, _) = load_from(&dir.join("absent.toml"), None).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(source, Source::BuiltIn);
        assert_eq!(source.to_string(), "built-in defaults");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_problem_a_check_finds_is_reported_at_its_key() {
        let dir = temp_dir("checked");
        let path = dir.join("echod.toml");
        std::fs::write(
            &path,
            "workers = 2\n\n[log]\nlevel = \"info\"\n  file = \"/x/y\"\ntarget = \"file\"\n",
        )
        .unwrap();
        let problem = |key| {
            move |_: &Config| -> Result<(), KeyProblem> {
                Err(KeyProblem {
                    key,
                    message: "cannot be opened".to_owned(),
                })
            }
        };
        let e = load_checked_from(&dir.join("absent.toml"), Some(&path), problem("log.file"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}:5:10: log.file: cannot be opened", path.display())
        );
        // A key the file does not set: named, with where the config came from.
        let e =
            load_checked_from(&dir.join("absent.toml"), Some(&path), problem("user")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: user: cannot be opened", path.display())
        );
        let e =
            load_checked_from(&dir.join("absent.toml"), None, problem("log.target")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "built-in defaults: log.target: cannot be opened"
        );
        let (c, _, checked) =
            load_checked_from(&dir.join("absent.toml"), Some(&path), |c| Ok(c.workers)).unwrap();
        assert_eq!((c.workers, checked), (2, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn worker_timeout_is_off_or_at_least_a_second() {
        assert_eq!(
            parse("worker_timeout = 0").unwrap().worker_timeout,
            Duration::ZERO
        );
        assert_eq!(
            parse("worker_timeout = \"1s\"").unwrap().worker_timeout,
            MIN_WORKER_TIMEOUT
        );
        for short in ["\"5ms\"", "0.5", "\"999ms\""] {
            let e = parse(&format!("worker_timeout = {short}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("/tmp/x.toml:1:18: worker_timeout: ")
                    && e.contains("use at least \"1s\", or 0"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_detached_echod_does_not_log_to_stderr() {
        let e = parse("daemon = true\n[log]\ntarget = \"stderr\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "/tmp/x.toml:3:10: log.target: \"stderr\" is /dev/null once echod detaches"
            ),
            "{e}"
        );
        // The order in the file does not matter, nor does a dotted key.
        let e = parse("log.target = \"stderr\"\ndaemon = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/tmp/x.toml:1:14: log.target: "), "{e}");
        for target in ["auto", "syslog"] {
            let c = parse(&format!("daemon = true\nlog.target = \"{target}\"\n")).unwrap();
            assert!(c.daemon);
        }
        assert!(!parse("log.target = \"stderr\"").unwrap().daemon);
    }

    #[test]
    fn the_default_file_is_read_when_present() {
        let dir = temp_dir("default");
        let path = dir.join("echod.toml");
        std::fs::write(&path, "workers = 3\n").unwrap();
        let (c, source, _) = load_from(&path, None).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(source, Source::File(path.clone()));
        assert_eq!(source.to_string(), path.display().to_string());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let dir = temp_dir("explicit");
        let default = dir.join("default.toml");
        std::fs::write(&default, "workers = 3\n").unwrap();
        let absent = dir.join("absent.toml");
        let e = load_from(&default, Some(&absent)).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{}: No such file or directory (os error 2)",
                absent.display()
            )
        );
        // Load through the public entry point too: an explicit path never
        // falls back, whatever exists at DEFAULT_PATH.
        assert!(Config::load_with(Some(&absent), |_| Ok(())).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_explicit_file_is_read_and_its_errors_name_it() {
        let dir = temp_dir("errors");
        let path = dir.join("bad.toml");
        std::fs::write(&path, "# comment\nworkers = 0\n").unwrap();
        let e = load_from(&dir.join("absent.toml"), Some(&path)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2:11: workers: expected an integer from 1 to 512, found 0",
                path.display()
            )
        );
        std::fs::write(&path, b"workers = 2\n# caf\xe9\n").unwrap();
        let e = load_from(&dir.join("absent.toml"), Some(&path)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}:2:6: the file is not valid UTF-8 text", path.display())
        );
        let e = load_from(&dir.join("absent.toml"), Some(&dir)).unwrap_err();
        assert!(
            matches!(e, ConfigError::Read { .. }),
            "a directory is not a file"
        );
        std::fs::write(&path, vec![b'#'; MAX_FILE_SIZE as usize + 1]).unwrap();
        let e = load_from(&dir.join("absent.toml"), Some(&path)).unwrap_err();
        assert!(e.to_string().contains("larger than 1024 KiB"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn changes_lists_what_differs() {
        let old = Config::default();
        assert!(old.changes(&old.clone()).is_empty());
        let mut new = old.clone();
        new.workers = old.workers + 2;
        new.listen = vec!["0.0.0.0:7".parse().unwrap()];
        new.mode = Mode::Fork;
        new.io = IoBackend::IoUring;
        new.busy_poll = Duration::from_micros(50);
        new.sched_policy = SchedPolicy::Other;
        new.balance = false;
        new.user = Some("echod".to_owned());
        new.idle_timeout = Duration::from_secs(30);
        new.daemon = true;
        new.log.level = log::LevelFilter::Debug;
        assert_eq!(
            old.changes(&new),
            vec![
                "listen [\"127.0.0.1:7007\", \"[::1]:7007\"] -> [\"0.0.0.0:7\"]".to_owned(),
                "mode \"prefork\" -> \"fork\"".to_owned(),
                format!("workers {} -> {}", old.workers, new.workers),
                "io \"epoll\" -> \"io_uring\"".to_owned(),
                "busy_poll \"0s\" -> \"50us\"".to_owned(),
                "sched_policy \"auto\" -> \"other\"".to_owned(),
                "balance true -> false".to_owned(),
                "idle_timeout \"5m\" -> \"30s\"".to_owned(),
                "user (unset) -> \"echod\"".to_owned(),
                "daemon false -> true (at the next start)".to_owned(),
                "log.level \"info\" -> \"debug\"".to_owned(),
            ]
        );
        assert_eq!(new.changes(&old).len(), 11);
    }

    #[test]
    fn the_installed_sample_file_parses() {
        let text = include_str!("../etc/echod.toml");
        let c = Config::parse(text, Path::new("etc/echod.toml")).unwrap();
        assert!(!c.listen.is_empty());
        assert!(c.listen.iter().all(|a| a.port() == 7), "{:?}", c.listen);
        assert_eq!(
            c.listen,
            vec![
                "0.0.0.0:7".parse::<SocketAddr>().unwrap(),
                "[::]:7".parse().unwrap()
            ]
        );
        let defaults = Config {
            listen: c.listen.clone(),
            ..Config::default()
        };
        assert_eq!(c, defaults, "{:?}", c.changes(&defaults));
        // Every `#key = value` line shows the default: uncommented, they
        // change nothing. The keys without a default show examples.
        let examples = ["workers", "pid_file", "user", "group", "file"];
        let mut shown = 0;
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|ch: char| ch.is_ascii_lowercase()) => {
                    let key = rest.split(" = ").next().unwrap_or("");
                    if examples.contains(&key) {
                        line.to_owned()
                    } else {
                        shown += 1;
                        rest.to_owned()
                    }
                }
                _ => line.to_owned(),
            })
            .map(|line| line + "\n")
            .collect();
        assert_eq!(shown, TOP_KEYS.len() + LOG_KEYS.len() - examples.len() - 2);
        let all = Config::parse(&uncommented, Path::new("etc/echod.toml")).unwrap();
        assert_eq!(all, defaults, "{:?}", all.changes(&defaults));
    }

    #[test]
    fn the_sample_file_shows_every_key() {
        let text = include_str!("../etc/echod.toml");
        for key in TOP_KEYS.iter().chain(LOG_KEYS) {
            let shown = text.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ']);
                line.starts_with(&format!("{key} =")) || line.starts_with(&format!("[{key}]"))
            });
            assert!(shown, "{key} is not shown in etc/echod.toml");
        }
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("workers", "workers"), 0);
        assert_eq!(edit_distance("workerz", "workers"), 1);
        assert_eq!(edit_distance("wrokers", "workers"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
    }

    /// Values a plausible document might give any key: right and wrong types,
    /// edge numbers, odd strings, nested structures.
    fn a_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            (0i64..2000).prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("nan".to_owned()),
            Just("-inf".to_owned()),
            Just("99999999999999999999999999999999999999999".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("1979-05-27T07:32:00Z".to_owned()),
            "[0-9.]{0,6}(us|ms|s|m|h|x| s)?".prop_map(|s| quote(&s)),
            any::<String>().prop_map(|s| quote(&s)),
            prop::sample::select(vec![
                "prefork",
                "fork",
                "wait",
                "reject",
                "info",
                "off",
                "file",
                "syslog",
                "local7",
                "/run/echod.pid",
                "relative",
                "",
                "127.0.0.1:7",
                "[::1]:0",
                "localhost:7",
            ])
            .prop_map(quote),
            prop::collection::vec(
                prop::sample::select(vec!["\"0.0.0.0:7\"", "\"[::]:7\"", "\"x\"", "7", "[]"]),
                0..4
            )
            .prop_map(|items| format!("[{}]", items.join(", "))),
            Just("{ level = \"debug\", file = \"/x\" }".to_owned()),
        ]
    }

    fn a_key() -> impl Strategy<Value = String> {
        let mut keys: Vec<String> = TOP_KEYS.iter().map(|k| (*k).to_owned()).collect();
        keys.extend(LOG_KEYS.iter().map(|k| format!("log.{k}")));
        keys.extend(["workerz", "log.colour", "\"quoted key\"", "log.level.x"].map(String::from));
        prop::sample::select(keys)
    }

    /// A document of key = value lines, sometimes with a `[log]` header in
    /// the middle.
    fn a_document() -> impl Strategy<Value = String> {
        (
            prop::collection::vec((a_key(), a_value()), 0..12),
            prop::option::of(0usize..12),
            prop::collection::vec((prop::sample::select(LOG_KEYS.to_vec()), a_value()), 0..4),
        )
            .prop_map(|(lines, header_at, log_lines)| {
                let mut text = String::new();
                for (i, (key, value)) in lines.iter().enumerate() {
                    if header_at == Some(i) {
                        break;
                    }
                    text.push_str(&format!("{key} = {value}\n"));
                }
                if header_at.is_some() {
                    text.push_str("[log]\n");
                    for (key, value) in &log_lines {
                        text.push_str(&format!("{key} = {value}\n"));
                    }
                }
                text
            })
    }

    /// Any config that satisfies the field invariants.
    fn a_config() -> impl Strategy<Value = Config> {
        let addr =
            (any::<bool>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(v4, octets, port)| {
                if v4 {
                    SocketAddr::from(([octets[0], octets[1], octets[2], octets[3]], port))
                } else {
                    SocketAddr::from((std::net::Ipv6Addr::from(octets), port))
                }
            });
        let nanos = 0..=MAX_DURATION_SECS * 1_000_000_000;
        let duration = prop_oneof![
            nanos.prop_map(Duration::from_nanos),
            (0..=MAX_DURATION_SECS).prop_map(Duration::from_secs),
            (0u64..100_000).prop_map(Duration::from_millis),
        ];
        let busy_poll = prop_oneof![
            Just(Duration::ZERO),
            (0..=MAX_BUSY_POLL.as_micros() as u64).prop_map(Duration::from_micros),
            (0..=MAX_BUSY_POLL.as_nanos() as u64).prop_map(Duration::from_nanos),
        ];
        let name = "[^\u{0}]{1,12}";
        let abs = "/[^\u{0}]{0,20}".prop_map(PathBuf::from);
        let level = prop::sample::select(log::LevelFilter::iter().collect::<Vec<_>>());
        let log = (
            level,
            prop::sample::select(vec![
                LogTarget::Stderr,
                LogTarget::Syslog,
                LogTarget::Auto,
                LogTarget::File,
            ]),
            prop::sample::select(FACILITIES.to_vec()),
            abs.clone(),
        )
            .prop_map(|(level, target, facility, file)| LogConfig {
                level,
                target,
                facility: facility.to_owned(),
                file: (target == LogTarget::File).then_some(file),
            });
        (
            (
                prop::collection::hash_set(addr, 1..4),
                1..=65535i32,
                prop::sample::select(vec![Mode::Prefork, Mode::Fork]),
                1..=512usize,
                prop::sample::select(vec![IoBackend::Epoll, IoBackend::IoUring]),
                busy_poll,
                any::<bool>(),
                1..=1_000_000usize,
                0..=1_000_000usize,
                prop::sample::select(vec![Overload::Wait, Overload::Reject]),
                512..=16_777_216usize,
            ),
            (
                any::<bool>(),
                prop::sample::select(vec![
                    SchedPolicy::Auto,
                    SchedPolicy::Other,
                    SchedPolicy::Batch,
                ]),
                duration.clone(),
                duration.clone(),
                duration,
                any::<u64>(),
                prop::option::of(abs),
                prop::option::of(name),
                prop::option::of(name),
                any::<bool>(),
                log,
            ),
        )
            .prop_map(
                |(
                    (
                        listen,
                        backlog,
                        mode,
                        workers,
                        io,
                        busy_poll,
                        balance,
                        max_connections,
                        max_connections_per_ip,
                        overload,
                        buffer_size,
                    ),
                    (
                        splice,
                        sched_policy,
                        idle_timeout,
                        shutdown_timeout,
                        worker_timeout,
                        max_requests_per_worker,
                        pid_file,
                        user,
                        group,
                        daemon,
                        log,
                    ),
                )| Config {
                    listen: listen.into_iter().collect(),
                    backlog,
                    mode,
                    workers,
                    io,
                    busy_poll,
                    sched_policy,
                    balance,
                    max_connections,
                    max_connections_per_ip,
                    overload,
                    buffer_size,
                    splice,
                    idle_timeout,
                    shutdown_timeout,
                    // 0 (off) or at least MIN_WORKER_TIMEOUT.
                    worker_timeout: match worker_timeout {
                        Duration::ZERO => Duration::ZERO,
                        d => d.max(MIN_WORKER_TIMEOUT),
                    },
                    max_requests_per_worker,
                    pid_file,
                    user,
                    group,
                    // Not detached with its log on stderr.
                    daemon: daemon && log.target != LogTarget::Stderr,
                    log,
                },
            )
    }

    /// Every error names the file and a position; every success round-trips.
    fn check_outcome(text: &str) {
        match parse(text) {
            Ok(config) => {
                let again = config.to_toml();
                assert_eq!(parse(&again).unwrap(), config, "{again}");
            }
            Err(e) => {
                let shown = e.to_string();
                assert!(shown.starts_with("/tmp/x.toml:"), "{shown}");
                assert!(!shown.contains('\n'), "one line: {shown}");
                match e {
                    ConfigError::Invalid { line, column, .. } => {
                        assert!(line >= 1 && column >= 1, "{shown}");
                        assert!(line <= text.lines().count().max(1) + 1, "{shown}");
                    }
                    ConfigError::Read { .. } => panic!("parse never reads: {shown}"),
                    ConfigError::Checked { .. } => panic!("parse never checks: {shown}"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_any_string(text in any::<String>()) {
            check_outcome(&text);
        }

        #[test]
        fn parse_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check_outcome(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn parse_never_panics_on_plausible_documents(text in a_document()) {
            check_outcome(&text);
        }

        #[test]
        fn parse_duration_never_panics(text in any::<String>()) {
            let _ = parse_duration(&text);
        }

        #[test]
        fn every_valid_config_round_trips(config in a_config()) {
            let text = config.to_toml();
            prop_assert_eq!(parse(&text).unwrap(), config.clone(), "{}", text);
            prop_assert!(config.changes(&config).is_empty());
        }

        #[test]
        fn every_duration_round_trips(nanos in 0..=MAX_DURATION_SECS * 1_000_000_000) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
