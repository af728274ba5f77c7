//! The launcher: parse the command line, load the config, set up logging,
//! bind the listeners, then hand over to the master (or, with
//! `--single-process`, serve right here). Exit codes follow sysexits(3).
//!
//! Runs in: the process the user (or systemd) started, which becomes the
//! master.

use std::process::ExitCode;

use echod::cli::{self, Cli};
use echod::config::{Config, Source};
use echod::{listener, logging, master, worker};

/// sysexits(3): the command line was wrong.
const EX_USAGE: u8 = 64;
/// sysexits(3): the config is wrong.
const EX_CONFIG: u8 = 78;
/// sysexits(3): an operating-system error, such as a port in use.
const EX_OSERR: u8 = 71;

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
    let (config, source) = match Config::load(cli.config.as_deref()) {
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
    if let Err(e) = logging::apply(&config.log, false) {
        eprintln!("echod: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    log::info!("echod {} using {origin}", env!("CARGO_PKG_VERSION"));
    let listeners = match listener::bind_all(&config.listen, config.backlog) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    for l in &listeners {
        log::info!("listening on {}", l.local);
    }
    if cli.single_process {
        log::warn!("--single-process: serving in this process, no workers, no supervision (debugging only)");
        let code = worker::run(listeners, &config, None);
        return ExitCode::from(code as u8);
    }
    let master = match master::Master::new(config, cli.config.clone(), listeners) {
        Ok(m) => m,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(master.run() as u8)
}
