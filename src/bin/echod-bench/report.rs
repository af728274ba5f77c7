//! The result of a run, as text for people or as one JSON object for
//! scripts.
//!
//! Runs in: the main thread, once, after the client threads have ended. Owns
//! no descriptors and no signals. The JSON is formatted by hand (a flat
//! object, every key present in every mode, `null` where a figure does not
//! apply) so that a shell script can pick a field with `grep`/`sed`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cli::Mode;
use crate::client::Stalls;
use crate::procfs::TreeSample;
use crate::stats::{per_second, ratio, Percentiles, Tally};

/// The server's CPU time over the measured interval.
#[derive(Clone, Copy, Debug)]
pub struct ServerCpu {
    /// Processes in the tree at the end sample.
    pub processes: usize,
    pub cpu_s: f64,
    /// Context switches of the tree's threads over the interval.
    pub switches: u64,
}

/// The hold sequence's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldFigures {
    pub requested: u64,
    /// Connections proven with one echo when opened.
    pub proven: u64,
    /// Connections proven again after the idle time.
    pub held: u64,
    /// Time to open and prove them all.
    pub open_s: f64,
    /// The server tree before any connection, and at the end of the idle
    /// time (with `--server-pid`).
    pub before: Option<TreeSample>,
    pub during: Option<TreeSample>,
}

impl HoldFigures {
    /// KiB per proven connection of the growth from `before` to `during`.
    fn per_conn(&self, field: impl Fn(&TreeSample) -> Option<u64>) -> Option<f64> {
        let grown = field(&self.during?)? as f64 - field(&self.before?)? as f64;
        ratio(grown, self.proven)
    }
}

pub struct Report {
    pub mode: Mode,
    pub addr: SocketAddr,
    /// Connections (pingpong, stream), workers (connrate) or count (hold).
    pub connections: usize,
    pub length: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    pub tally: Tally,
    /// Round trips (pingpong) or connect-to-echo times (connrate).
    pub latency: Option<Percentiles>,
    pub client_cpu_s: Option<f64>,
    /// `--server-pid`.
    pub server_pid: Option<i32>,
    /// Set in the timed modes with `--server-pid`.
    pub server: Option<ServerCpu>,
    pub hold: Option<HoldFigures>,
    pub first_error: Option<String>,
    pub deadline_hit: bool,
    pub fatal: Option<String>,
    /// Turns of the client's loop that came round late (not counted
    /// against the server's timeouts).
    pub stalls: Stalls,
}

impl Report {
    /// The run verified every echo, had no error, and measured something.
    pub fn ok(&self) -> bool {
        let measured = match (&self.hold, self.mode) {
            (Some(h), _) => h.requested > 0 && h.held == h.requested,
            (None, Mode::Stream) => self.tally.bytes > 0,
            (None, _) => self.tally.messages > 0,
        };
        self.fatal.is_none() && !self.deadline_hit && self.tally.errors() == 0 && measured
    }

    fn timed(&self) -> bool {
        self.mode != Mode::Hold
    }

    fn msgs_per_s(&self) -> Option<f64> {
        matches!(self.mode, Mode::PingPong | Mode::ConnRate)
            .then(|| per_second(self.tally.messages, self.duration))
    }

    fn mb_per_s(&self) -> Option<f64> {
        self.timed()
            .then(|| per_second(self.tally.bytes, self.duration) / 1e6)
    }

    /// `total` per message (pingpong, connrate; `None` in the other modes).
    fn per_msg(&self, total: Option<f64>) -> Option<f64> {
        if !matches!(self.mode, Mode::PingPong | Mode::ConnRate) {
            return None;
        }
        ratio(total?, self.tally.messages)
    }

    /// CPU seconds per message in µs (pingpong, connrate).
    fn us_per_msg(&self, cpu_s: Option<f64>) -> Option<f64> {
        self.per_msg(cpu_s.map(|s| s * 1e6))
    }

    /// Context switches per message (pingpong, connrate).
    fn switches_per_msg(&self) -> Option<f64> {
        self.per_msg(self.server.map(|s| s.switches as f64))
    }

    /// CPU seconds per GB (10^9 echoed bytes) in stream mode: also ms/MB.
    fn s_per_gb(&self, cpu_s: Option<f64>) -> Option<f64> {
        if self.mode != Mode::Stream || self.tally.bytes == 0 {
            return None;
        }
        Some(cpu_s? / (self.tally.bytes as f64 / 1e9))
    }

    pub fn json(&self) -> String {
        let t = &self.tally;
        let lat = self.latency;
        let pick = |f: fn(&Percentiles) -> f64| lat.as_ref().map(f);
        let server_cpu = self.server.map(|s| s.cpu_s);
        let hold = self.hold.unwrap_or_default();
        let held = self.hold.is_some();
        let sample =
            |s: Option<TreeSample>, f: fn(&TreeSample) -> Option<u64>| s.as_ref().and_then(f);
        let mut j = Json::new();
        j.bool("ok", self.ok());
        j.str("mode", Some(self.mode.name()));
        j.str("addr", Some(&self.addr.to_string()));
        j.uint("connections", Some(self.connections as u64));
        j.uint("length", Some(self.length as u64));
        j.uint("threads", Some(self.threads as u64));
        j.num("duration_s", Some(self.duration.as_secs_f64()));
        j.num("warmup_s", Some(self.warmup.as_secs_f64()));
        j.num("timeout_s", Some(self.timeout.as_secs_f64()));
        j.uint("messages", Some(t.messages));
        j.uint("bytes", Some(t.bytes));
        j.num("msgs_per_s", self.msgs_per_s());
        j.num(
            "conns_per_s",
            self.msgs_per_s().filter(|_| self.mode == Mode::ConnRate),
        );
        j.num("mb_per_s", self.mb_per_s());
        j.num("rtt_p50_us", pick(|p| p.p50));
        j.num("rtt_p90_us", pick(|p| p.p90));
        j.num("rtt_p99_us", pick(|p| p.p99));
        j.num("rtt_p999_us", pick(|p| p.p999));
        j.num("rtt_max_us", pick(|p| p.max));
        j.num("rtt_mean_us", pick(|p| p.mean));
        j.uint("errors", Some(t.errors()));
        j.uint("mismatches", Some(t.mismatches));
        j.uint("resets", Some(t.resets));
        j.uint("closed", Some(t.closed));
        j.uint("timeouts", Some(t.timeouts));
        j.uint("connect_errors", Some(t.connect_errors));
        j.str("first_error", self.first_error.as_deref());
        j.bool("deadline_hit", self.deadline_hit);
        j.str("fatal", self.fatal.as_deref());
        j.uint("client_stalls", Some(self.stalls.count));
        j.num(
            "client_stall_max_s",
            Some(self.stalls.longest.as_secs_f64()),
        );
        j.num("client_cpu_s", self.client_cpu_s);
        j.num("client_cpu_us_per_msg", self.us_per_msg(self.client_cpu_s));
        j.uint("server_pid", self.server_pid.map(|p| p as u64));
        j.uint("server_processes", self.server.map(|s| s.processes as u64));
        j.num("server_cpu_s", server_cpu);
        j.num("server_cpu_us_per_msg", self.us_per_msg(server_cpu));
        j.num("server_cpu_s_per_gb", self.s_per_gb(server_cpu));
        j.uint("server_switches", self.server.map(|s| s.switches));
        j.num("server_switches_per_msg", self.switches_per_msg());
        j.uint("hold_requested", held.then_some(hold.requested));
        j.uint("hold_proven", held.then_some(hold.proven));
        j.uint("held", held.then_some(hold.held));
        j.num("hold_open_s", held.then_some(hold.open_s));
        j.uint(
            "server_rss_kib_before",
            sample(hold.before, |s| Some(s.rss_kib)),
        );
        j.uint(
            "server_rss_kib_held",
            sample(hold.during, |s| Some(s.rss_kib)),
        );
        j.uint("server_pss_kib_before", sample(hold.before, |s| s.pss_kib));
        j.uint("server_pss_kib_held", sample(hold.during, |s| s.pss_kib));
        j.num("rss_kib_per_conn", hold.per_conn(|s| Some(s.rss_kib)));
        j.num("pss_kib_per_conn", hold.per_conn(|s| s.pss_kib));
        j.finish()
    }

    pub fn text(&self) -> String {
        let mut o = String::new();
        let t = &self.tally;
        let what = match self.mode {
            Mode::ConnRate => "workers",
            _ => "connections",
        };
        let _ = write!(
            o,
            "echod-bench {} {}: {} {what} x {} B, {} thread{}",
            self.mode.name(),
            self.addr,
            self.connections,
            self.length,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
        );
        if self.timed() {
            let _ = writeln!(
                o,
                "; {:.1} s measured after {:.1} s warm-up",
                self.duration.as_secs_f64(),
                self.warmup.as_secs_f64()
            );
        } else {
            let _ = writeln!(o, "; idle {:.1} s", self.duration.as_secs_f64());
        }
        match self.mode {
            Mode::PingPong => {
                let _ = writeln!(
                    o,
                    "  completed   {} round trips: {:.0} msgs/s, {:.2} MB/s each way",
                    t.messages,
                    self.msgs_per_s().unwrap_or(0.0),
                    self.mb_per_s().unwrap_or(0.0)
                );
            }
            Mode::ConnRate => {
                let _ = writeln!(
                    o,
                    "  completed   {} connections: {:.0} conn/s",
                    t.messages,
                    self.msgs_per_s().unwrap_or(0.0)
                );
            }
            Mode::Stream => {
                let _ = writeln!(
                    o,
                    "  echoed      {} bytes: {:.1} MB/s",
                    t.bytes,
                    self.mb_per_s().unwrap_or(0.0)
                );
            }
            Mode::Hold => {}
        }
        if let Some(p) = &self.latency {
            let label = match self.mode {
                Mode::ConnRate => "connect+echo",
                _ => "round trip ",
            };
            let _ = writeln!(
                o,
                "  {label} p50 {:.1} us  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
                p.p50, p.p90, p.p99, p.p999, p.max, p.mean
            );
        }
        if let Some(h) = &self.hold {
            let _ = writeln!(
                o,
                "  held        {} of {} (proven on open: {}, opened in {:.2} s)",
                h.held, h.requested, h.proven, h.open_s
            );
            if let (Some(b), Some(d)) = (h.before, h.during) {
                let _ = writeln!(
                    o,
                    "  server RSS  {} KiB -> {} KiB: {} KiB per connection",
                    b.rss_kib,
                    d.rss_kib,
                    fmt_opt(h.per_conn(|s| Some(s.rss_kib)), 2)
                );
                let _ = writeln!(
                    o,
                    "  server PSS  {} KiB -> {} KiB: {} KiB per connection ({} processes)",
                    fmt_opt(b.pss_kib.map(|v| v as f64), 0),
                    fmt_opt(d.pss_kib.map(|v| v as f64), 0),
                    fmt_opt(h.per_conn(|s| s.pss_kib), 2),
                    d.processes
                );
            }
        }
        if let Some(s) = &self.server {
            let per = match self.mode {
                Mode::Stream => format!("{} s/GB", fmt_opt(self.s_per_gb(Some(s.cpu_s)), 3)),
                _ => format!(
                    "{} us/msg; {} context switches = {}/msg",
                    fmt_opt(self.us_per_msg(Some(s.cpu_s)), 2),
                    s.switches,
                    fmt_opt(self.switches_per_msg(), 3)
                ),
            };
            let _ = writeln!(
                o,
                "  server      pid {} ({} processes): {:.2} s CPU = {per}",
                self.server_pid.unwrap_or(0),
                s.processes,
                s.cpu_s
            );
        }
        if let Some(c) = self.client_cpu_s.filter(|_| self.timed()) {
            let per = match self.mode {
                Mode::Stream => format!("{} s/GB", fmt_opt(self.s_per_gb(Some(c)), 3)),
                _ => format!("{} us/msg", fmt_opt(self.us_per_msg(Some(c)), 2)),
            };
            let _ = writeln!(o, "  client      {c:.2} s CPU = {per}");
        }
        if t.errors() == 0 {
            let _ = writeln!(o, "  errors      none");
        } else {
            let _ = writeln!(
                o,
                "  errors      mismatches {}, resets {}, closed early {}, timeouts {}, connect errors {}",
                t.mismatches, t.resets, t.closed, t.timeouts, t.connect_errors
            );
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(o, "  first error {e}");
        }
        if self.deadline_hit {
            let _ = writeln!(o, "  stopped at the hard deadline");
        }
        if self.stalls.count > 0 {
            let _ = writeln!(
                o,
                "  stalls      the client was not run for up to {:.2} s ({} times); timeouts leave that out",
                self.stalls.longest.as_secs_f64(),
                self.stalls.count
            );
        }
        if let Some(e) = &self.fatal {
            let _ = writeln!(o, "  fatal       {e}");
        }
        let _ = writeln!(
            o,
            "  result      {}",
            if self.ok() { "OK" } else { "FAILED" }
        );
        o
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "n/a".to_string(),
    }
}

/// A flat JSON object written field by field.
pub struct Json {
    out: String,
}

impl Json {
    pub fn new() -> Json {
        Json {
            out: String::from("{"),
        }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        self.out.push_str(&escape(key));
        self.out.push(':');
    }

    pub fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(v) => self.out.push_str(&escape(v)),
            None => self.out.push_str("null"),
        }
    }

    pub fn uint(&mut self, key: &str, value: Option<u64>) {
        self.key(key);
        match value {
            Some(v) => {
                let _ = write!(self.out, "{v}");
            }
            None => self.out.push_str("null"),
        }
    }

    /// A number with 3 decimals; NaN and infinities (not JSON) are `null`.
    pub fn num(&mut self, key: &str, value: Option<f64>) {
        self.key(key);
        match value {
            Some(v) if v.is_finite() => {
                let _ = write!(self.out, "{v:.3}");
            }
            _ => self.out.push_str("null"),
        }
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
    }

    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// A JSON string literal (RFC 8259 §7).
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_and_escapes() {
        let mut j = Json::new();
        j.str("s", Some("a\"b\\c\nd\u{1}é"));
        j.uint("n", Some(42));
        j.uint("none", None);
        j.num("x", Some(1.5));
        j.num("nan", Some(f64::NAN));
        j.bool("ok", true);
        assert_eq!(
            j.finish(),
            r#"{"s":"a\"b\\c\nd\u0001é","n":42,"none":null,"x":1.500,"nan":null,"ok":true}"#
        );
        assert_eq!(Json::new().finish(), "{}");
    }

    fn report(mode: Mode) -> Report {
        Report {
            mode,
            addr: "127.0.0.1:7".parse().unwrap(),
            connections: 2,
            length: 64,
            threads: 1,
            duration: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            tally: Tally {
                messages: 1000,
                bytes: 64_000,
                ..Tally::default()
            },
            latency: None,
            client_cpu_s: Some(0.5),
            server_pid: Some(9),
            server: Some(ServerCpu {
                processes: 3,
                cpu_s: 0.006,
                switches: 250,
            }),
            hold: None,
            first_error: None,
            deadline_hit: false,
            fatal: None,
            stalls: Stalls::default(),
        }
    }

    #[test]
    fn derived_figures() {
        let r = report(Mode::PingPong);
        assert!(r.ok());
        let j = r.json();
        assert!(j.contains(r#""msgs_per_s":500.000"#), "{j}");
        assert!(j.contains(r#""server_cpu_us_per_msg":6.000"#), "{j}");
        assert!(j.contains(r#""server_cpu_s_per_gb":null"#), "{j}");
        assert!(j.contains(r#""server_switches":250"#), "{j}");
        assert!(j.contains(r#""server_switches_per_msg":0.250"#), "{j}");
        assert!(j.contains(r#""held":null"#), "{j}");
        let s = report(Mode::Stream);
        let j = s.json();
        // 0.006 s over 64 000 bytes = 93.75 s per 10^9 bytes.
        assert!(j.contains(r#""server_cpu_s_per_gb":93.750"#), "{j}");
        assert!(j.contains(r#""msgs_per_s":null"#), "{j}");
        assert!(j.contains(r#""server_switches_per_msg":null"#), "{j}");
    }

    #[test]
    fn errors_fail_the_run() {
        let mut r = report(Mode::PingPong);
        r.tally.mismatches = 1;
        assert!(!r.ok());
        assert!(r.json().starts_with(r#"{"ok":false"#));
        assert!(r.text().contains("FAILED"));
        let mut r = report(Mode::PingPong);
        r.tally.messages = 0;
        assert!(!r.ok());
    }

    #[test]
    fn hold_memory_per_connection() {
        let mut r = report(Mode::Hold);
        r.server = None;
        let sample = |rss, pss| TreeSample {
            processes: 2,
            cpu_ticks: 0,
            rss_kib: rss,
            pss_kib: Some(pss),
        };
        r.hold = Some(HoldFigures {
            requested: 100,
            proven: 100,
            held: 100,
            open_s: 0.1,
            before: Some(sample(1000, 800)),
            during: Some(sample(1500, 850)),
        });
        assert!(r.ok());
        let j = r.json();
        assert!(j.contains(r#""rss_kib_per_conn":5.000"#), "{j}");
        assert!(j.contains(r#""pss_kib_per_conn":0.500"#), "{j}");
        r.hold.as_mut().unwrap().held = 99;
        assert!(!r.ok());
    }
}
