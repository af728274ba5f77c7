//! `echod-bench`: a load generator and meter for TCP echo servers (RFC 862),
//! the benchmark tool of echod. `scripts/bench.sh` (`make bench`) runs it
//! against echod and a tokio reference; `--help` explains the modes.
//!
//! Runs in: its own process, never inside echod. Threads: the main thread
//! (parses, samples the server's /proc, draws the progress line, reports),
//! the `-t` client threads (`client.rs`, one epoll loop each) and a watchdog
//! that ends the process if the hard deadline passes anyway. Descriptors: the
//! client sockets and one epoll descriptor per client thread; the soft
//! `RLIMIT_NOFILE` is raised to the hard limit first. Signals: none handled
//! (the Rust runtime ignores `SIGPIPE`; `SIGINT` ends the run at once).
//!
//! Modules: `cli` (flags), `payload` (the byte streams and their exact
//! check), `stats` (tallies, latency histogram), `procfs` (the server's CPU
//! and memory), `client` (the epoll loop), `report` (text and JSON).

mod cli;
mod client;
mod payload;
mod procfs;
mod report;
mod stats;

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};

use cli::{Command, Mode, Settings};
use client::{Outcome, Plan, Shared, Stalls};
use report::{HoldFigures, Report, ServerCpu};
use stats::{Latency, Tally};

/// Descriptors kept free beyond the connections (epoll, stdio, /proc).
const SPARE_FDS: u64 = 64;

fn main() -> ExitCode {
    let settings = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(s)) => s,
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("echod-bench {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("echod-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&settings) {
        Ok(report) => {
            if settings.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else if report.fatal.is_some() || report.deadline_hit {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("echod-bench: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("resolve {addr}: no address"))
}

/// Raises the soft descriptor limit to the hard one (hold mode needs one
/// descriptor per connection) and warns when even that is too few.
fn raise_nofile(connections: usize) -> anyhow::Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                eprintln!("echod-bench: setrlimit(RLIMIT_NOFILE, {hard}): {e}; staying at {soft}");
                soft
            }
        }
    } else {
        soft
    };
    if connections as u64 + SPARE_FDS > limit {
        eprintln!(
            "echod-bench: warning: {connections} connections need more than the {limit} \
             descriptors allowed; connects will fail"
        );
    }
    Ok(())
}

/// This process's CPU time (all threads), in seconds.
fn own_cpu_seconds() -> Option<f64> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some(secs(usage.user_time()) + secs(usage.system_time()))
}

/// Splits `total` connections over `threads` as evenly as possible.
fn shares(total: usize, threads: usize) -> Vec<usize> {
    (0..threads)
        .map(|i| total / threads + usize::from(i < total % threads))
        .collect()
}

/// The live progress line on stderr, drawn only when stderr is a terminal.
struct ProgressLine<'a> {
    enabled: bool,
    mode: Mode,
    shared: &'a Shared,
    started: Instant,
    last: Instant,
    last_done: u64,
}

impl<'a> ProgressLine<'a> {
    fn new(mode: Mode, shared: &'a Shared) -> Self {
        let now = Instant::now();
        ProgressLine {
            enabled: std::io::stderr().is_terminal(),
            mode,
            shared,
            started: now,
            last: now,
            last_done: 0,
        }
    }

    fn tick(&mut self, phase: &str) {
        let now = Instant::now();
        let dt = now.duration_since(self.last);
        if !self.enabled || dt < Duration::from_millis(500) {
            return;
        }
        let sum = |f: fn(&client::Progress) -> u64| self.shared.progress.iter().map(f).sum::<u64>();
        let done = sum(|p| p.done.load(Ordering::Relaxed));
        let errors = sum(|p| p.errors.load(Ordering::Relaxed));
        let open = sum(|p| p.open.load(Ordering::Relaxed));
        let rate = stats::per_second(done.saturating_sub(self.last_done), dt);
        let rate = match self.mode {
            Mode::Stream => format!("{:.1} MB/s", rate / 1e6),
            Mode::PingPong => format!("{rate:.0} msgs/s"),
            Mode::ConnRate => format!("{rate:.0} conn/s"),
            Mode::Hold => format!("{done} echoes"),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{} {phase} {:.1} s: {open} open, {rate}, {errors} errors",
            self.mode.name(),
            now.duration_since(self.started).as_secs_f64()
        );
        let _ = err.flush();
        self.last = now;
        self.last_done = done;
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[K");
        }
    }
}

/// Sleeps until `until`, drawing progress; false when every client thread
/// ended first.
fn wait_until(
    until: Instant,
    shared: &Shared,
    threads: usize,
    line: &mut ProgressLine,
    phase: &str,
) -> bool {
    loop {
        let now = Instant::now();
        if now >= until {
            return true;
        }
        if shared.finished.load(Ordering::Acquire) >= threads {
            return false;
        }
        line.tick(phase);
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// What the main thread measured while the clients ran.
#[derive(Default)]
struct Meter {
    server: Option<ServerCpu>,
    client_cpu_s: Option<f64>,
    hold: Option<HoldFigures>,
    warning: Option<String>,
}

/// One sample of the server tree by `f`; a failure is kept as the run's
/// warning.
fn sample<T>(
    pid: Option<i32>,
    meter: &mut Meter,
    f: impl FnOnce(i32) -> Result<T, procfs::ProcError>,
) -> Option<T> {
    match f(pid?) {
        Ok(s) => Some(s),
        Err(e) => {
            meter.warning.get_or_insert(format!("server sample: {e}"));
            None
        }
    }
}

/// Samples CPU time and context switches at the edges of the measured
/// interval.
fn meter_timed(
    s: &Settings,
    plan: &Plan,
    shared: &Shared,
    line: &mut ProgressLine,
    mut m: Meter,
) -> Meter {
    if !wait_until(plan.measure_start, shared, s.threads, line, "warm-up") {
        return m;
    }
    let (c0, s0) = (
        own_cpu_seconds(),
        sample(s.server_pid, &mut m, procfs::sample_timed),
    );
    // Threads that all failed early end the interval early: sample then.
    wait_until(plan.measure_end, shared, s.threads, line, "measuring");
    let (c1, s1) = (
        own_cpu_seconds(),
        sample(s.server_pid, &mut m, procfs::sample_timed),
    );
    m.client_cpu_s = c0.zip(c1).map(|(a, b)| b - a);
    let hz = procfs::clock_ticks_per_second() as f64;
    m.server = s0.zip(s1).map(|((a, wa), (b, wb))| ServerCpu {
        processes: b.processes,
        cpu_s: b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / hz,
        switches: wb.since(&wa),
    });
    m
}

/// Drives the hold sequence: wait for every thread to have opened its
/// share, idle, memory while holding, then release the re-check. `m` comes
/// with the memory before, sampled before the client threads started (see
/// `run`).
fn meter_hold(
    s: &Settings,
    plan: &Plan,
    shared: &Shared,
    line: &mut ProgressLine,
    mut m: Meter,
    before: Option<procfs::TreeSample>,
) -> Meter {
    let t0 = Instant::now();
    loop {
        let opened = shared.opened.load(Ordering::Acquire);
        let finished = shared.finished.load(Ordering::Acquire);
        if opened + finished >= s.threads || Instant::now() >= plan.deadline {
            break;
        }
        line.tick("opening");
        thread::sleep(Duration::from_millis(10));
    }
    let open_s = t0.elapsed().as_secs_f64();
    wait_until(Instant::now() + s.duration, shared, s.threads, line, "idle");
    let during = sample(s.server_pid, &mut m, |p| procfs::sample_tree(p, true));
    shared.recheck.store(true, Ordering::Release);
    m.hold = Some(HoldFigures {
        requested: s.count as u64,
        open_s,
        before,
        during,
        ..HoldFigures::default()
    });
    m
}

fn run(s: &Settings) -> anyhow::Result<Report> {
    let addr = resolve(&s.addr)?;
    raise_nofile(s.slots())?;
    if let Some(pid) = s.server_pid {
        procfs::sample_tree(pid, false).with_context(|| format!("--server-pid {pid}"))?;
    }
    // Hold mode's memory before any connection: sampled here, before the
    // client threads exist and before the clock of the run starts (a
    // tree's PSS takes a while to read), so that no connection of the run
    // is in it.
    let mut meter = Meter::default();
    let before = match s.mode {
        Mode::Hold => sample(s.server_pid, &mut meter, |p| procfs::sample_tree(p, true)),
        _ => None,
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    let start = Instant::now();
    let measure_start = start + s.warmup;
    let measure_end = measure_start + s.duration;
    // The drain after the measured interval (see `client`) needs one
    // timeout past the end when a connection is stuck, two in connrate (a
    // connect begun just before the end, then its echo); a server that
    // trickles a byte per timeout is stopped here.
    let mut slack = 3 * s.timeout + Duration::from_secs(10);
    if s.mode == Mode::Hold {
        slack += Duration::from_millis(s.count as u64);
    }
    let plan = Plan {
        mode: s.mode,
        addr,
        length: s.length,
        timeout: s.timeout,
        seed,
        threads: s.threads,
        measure_start,
        measure_end,
        deadline: measure_end + slack,
    };
    // The client loops stop at the deadline by themselves; this is the
    // backstop should anything block regardless.
    let backstop = plan.deadline + Duration::from_secs(5);
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            thread::sleep(backstop.saturating_duration_since(Instant::now()));
            eprintln!("echod-bench: hard deadline passed; giving up");
            std::process::exit(3);
        })
        .context("spawn watchdog thread")?;

    let shared = Shared::new(s.threads);
    let mut line = ProgressLine::new(s.mode, &shared);
    let (outcomes, meter) = thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, share) in shares(s.slots(), s.threads).into_iter().enumerate() {
            let (plan, shared) = (&plan, &shared);
            let spawned = thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn_scoped(scope, move || client::run_thread(plan, shared, i, share));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The thread never ran: count it as finished so the main
                    // thread does not wait for it.
                    shared.finished.fetch_add(1, Ordering::AcqRel);
                    eprintln!("echod-bench: spawn client thread {i}: {e}");
                }
            }
        }
        let meter = match s.mode {
            Mode::Hold => meter_hold(s, &plan, &shared, &mut line, meter, before),
            _ => meter_timed(s, &plan, &shared, &mut line, meter),
        };
        if s.mode != Mode::Hold {
            // The threads drain what is in flight: up to a timeout, and
            // the progress line says why the run has not ended yet.
            wait_until(plan.deadline, &shared, s.threads, &mut line, "draining");
        }
        let outcomes: Vec<Outcome> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Outcome::failed("client thread panicked".to_string()))
            })
            .collect();
        (outcomes, meter)
    });
    line.clear();

    let mut tally = Tally::default();
    let mut latency = Latency::new();
    let mut first_error = None;
    let mut fatal = None;
    let mut deadline_hit = false;
    let mut stalls = Stalls::default();
    let mut hold = meter.hold;
    if outcomes.len() < s.threads {
        fatal = Some(format!(
            "only {} of {} client threads ran",
            outcomes.len(),
            s.threads
        ));
    }
    for o in &outcomes {
        tally.add(&o.tally);
        latency.merge(&o.latency);
        if first_error.is_none() {
            first_error.clone_from(&o.first_error);
        }
        if fatal.is_none() {
            fatal.clone_from(&o.fatal);
        }
        deadline_hit |= o.deadline_hit;
        stalls.merge(&o.stalls);
        if let Some(h) = hold.as_mut() {
            h.proven += o.proven;
            h.held += o.held;
        }
    }
    if let Some(w) = &meter.warning {
        eprintln!("echod-bench: warning: {w}");
    }
    Ok(Report {
        mode: s.mode,
        addr,
        connections: s.slots(),
        length: s.length,
        threads: s.threads,
        duration: s.duration,
        warmup: s.warmup,
        timeout: s.timeout,
        tally,
        latency: latency.summary(),
        client_cpu_s: meter.client_cpu_s,
        server_pid: s.server_pid,
        server: meter.server,
        hold,
        first_error,
        deadline_hit,
        fatal,
        stalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_complete() {
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(2, 2), vec![1, 1]);
        assert_eq!(shares(10_000, 1), vec![10_000]);
        assert_eq!(shares(7, 7).iter().sum::<usize>(), 7);
    }
}
