//! The launcher: parse the command line, load the config, detach (with
//! `--daemon`), set up logging, bind (or adopt systemd's) listeners, then
//! hand over to the master (or, with `--single-process`, serve right here).
//! Exit codes follow sysexits(3).
//!
//! Runs in: the process the user (or systemd) started, which becomes the
//! master (with `--daemon`, its grandchild does).

use std::process::ExitCode;

use echod::cli::{self, Cli};
use echod::config::{Config, Source};
use echod::daemon::{self, Readiness};
use echod::master::{Master, Setup};
use echod::pidfile::PidFile;
use echod::process;
use echod::{listener, logging, worker};

/// sysexits(3): the command line was wrong.
const EX_USAGE: u8 = 64;
/// sysexits(3): an operating-system error, such as a port in use.
const EX_OSERR: u8 = 71;
/// sysexits(3): the config is wrong.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = match Cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("echod: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.help {
        print!("{}", cli::help());
        return ExitCode::SUCCESS;
    }
    if cli.version {
        println!("echod {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // Parsed, then checked against the system (the log sink opens, the
    // user exists): a mistake in either names the file, line and key.
    let loaded = Config::load_with(cli.config.as_deref(), |c| {
        process::check_system(c, cli.daemon || c.daemon)
    });
    let (config, source, credentials) = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("echod: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let origin = match &source {
        Source::File(p) => p.display().to_string(),
        Source::BuiltIn => format!(
            "built-in defaults ({} does not exist)",
            echod::config::DEFAULT_PATH
        ),
    };
    if cli.check_config {
        print!("# effective config, from {origin}\n{}", config.to_toml());
        eprintln!("echod: config OK ({origin})");
        return ExitCode::SUCCESS;
    }
    let daemonize = cli.daemon || config.daemon;
    // The file this start read, absolute: a reload re-reads that very
    // file, even after `--daemon` changed the working directory to /, and
    // fails if it has gone rather than fall back to the defaults.
    let config_path = match &source {
        Source::File(p) => match std::path::absolute(p) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("echod: {}: {e}", p.display());
                return ExitCode::from(EX_CONFIG);
            }
        },
        Source::BuiltIn => None,
    };
    let mut readiness = Readiness::none();
    if daemonize {
        // Returns in the daemon only; the launcher exits with its report.
        match daemon::detach() {
            Ok(r) => readiness = r,
            Err(e) => {
                eprintln!("echod: cannot detach: {e}");
                return ExitCode::from(EX_OSERR);
            }
        }
    }
    // From here on, a failure is also reported to a waiting launcher.
    let fail = |readiness: &mut Readiness, code: u8, message: String| {
        log::error!("{message}");
        readiness.failed(code, &message);
        ExitCode::from(code)
    };
    if let Err(e) = logging::apply(&config.log, daemonize) {
        eprintln!("echod: {e}");
        return fail(&mut readiness, EX_CONFIG, e.to_string());
    }
    log::info!("echod {} using {origin}", env!("CARGO_PKG_VERSION"));
    // The pid file before the sockets: a second instance is refused for
    // what it is, not for the port the first one holds.
    let pidfile = match &config.pid_file {
        Some(p) => match PidFile::create(p, std::process::id()) {
            Ok(f) => Some(f),
            Err(e) => return fail(&mut readiness, 1, e.to_string()),
        },
        None => None,
    };
    let (listeners, activated) = match listener::from_systemd() {
        Ok(Some(l)) => {
            log::info!("using {} sockets from systemd (socket activation)", l.len());
            (l, true)
        }
        Ok(None) => match listener::bind_all(&config.listen, config.backlog) {
            Ok(l) => (l, false),
            Err(e) => return fail(&mut readiness, EX_OSERR, e.to_string()),
        },
        Err(e) => return fail(&mut readiness, EX_OSERR, e.to_string()),
    };
    for l in &listeners {
        log::info!("listening on {}", l.local);
    }
    if cli.single_process {
        log::warn!(
            "--single-process: serving in this process, no workers, no supervision (debugging only)"
        );
        readiness.ready();
        // The same scoreboard a pool would use, with one slot: the worker
        // loop is the same code either way.
        let mut board = match echod::scoreboard::Scoreboard::new(&config) {
            Ok(b) => b,
            Err(e) => return fail(&mut readiness, 1, format!("scoreboard mmap: {e}")),
        };
        let Some(slot) = board.claim() else {
            return fail(&mut readiness, 1, "scoreboard: no slot".into());
        };
        let seat = worker::Seat {
            board: &board,
            slot,
            bell: None,
        };
        let code = worker::run(listeners, &config, seat);
        return ExitCode::from(code as u8);
    }
    let setup = Setup {
        config,
        config_path,
        listeners,
        activated,
        readiness,
        credentials,
        daemonized: daemonize,
        pidfile,
    };
    match Master::new(setup) {
        Ok(master) => ExitCode::from(master.run() as u8),
        Err(e) => {
            // Master::new reported it to a waiting launcher; say why here
            // too.
            log::error!("{e}");
            eprintln!("echod: {e}");
            ExitCode::from(1)
        }
    }
}
