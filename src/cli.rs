//! Command-line flags.
//!
//! Runs in: the launcher (the process the user started, before anything is
//! forked). Owns nothing.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::signals::MASTER_SIGNALS;

/// What the user asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cli {
    /// `--config PATH`; `None` means the default path, falling back to the
    /// built-in defaults when that file does not exist.
    pub config: Option<PathBuf>,
    /// `--check-config` / `-t`.
    pub check_config: bool,
    /// `--single-process`.
    pub single_process: bool,
    /// `--daemon`.
    pub daemon: bool,
    /// `--help`.
    pub help: bool,
    /// `--version`.
    pub version: bool,
}

/// A command line echod does not understand.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}\nTry 'echod --help'.")]
pub struct UsageError(String);

impl Cli {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, UsageError> {
        let mut cli = Cli::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let arg = arg
                .into_string()
                .map_err(|a| UsageError(format!("argument is not UTF-8: {a:?}")))?;
            match arg.as_str() {
                "-c" | "--config" => {
                    let path = args
                        .next()
                        .ok_or_else(|| UsageError(format!("{arg} needs a file name")))?;
                    cli.config = Some(PathBuf::from(path));
                }
                s if s.starts_with("--config=") => {
                    cli.config = Some(PathBuf::from(&s["--config=".len()..]));
                }
                "-t" | "--check-config" => cli.check_config = true,
                "--single-process" => cli.single_process = true,
                "-d" | "--daemon" => cli.daemon = true,
                "-h" | "--help" => cli.help = true,
                "-V" | "--version" => cli.version = true,
                other => return Err(UsageError(format!("unknown argument '{other}'"))),
            }
        }
        Ok(cli)
    }
}

/// The `--help` text, with the signal table.
pub fn help() -> String {
    let mut s = format!(
        "echod {} - a multi-process pre-fork TCP echo daemon (RFC 862)

Usage: echod [OPTIONS]

Options:
  -c, --config PATH     read the config from PATH (default {}; when that
                        file does not exist, built-in defaults are used:
                        127.0.0.1:7007 and [::1]:7007)
  -t, --check-config    validate the config, print the effective config, exit
                        (0 if valid, 78 if not)
      --single-process  serve in this one process with the worker loop and no
                        fork, for gdb and strace; NOT for production (no
                        supervision, no reload)
  -d, --daemon          detach from the terminal (for machines without
                        systemd; under systemd run in the foreground)
  -h, --help            print this help
  -V, --version         print the version

Signals to the master:
",
        env!("CARGO_PKG_VERSION"),
        crate::config::DEFAULT_PATH
    );
    for spec in MASTER_SIGNALS {
        s.push_str(&format!("  {:<8} {}\n", spec.name, spec.help));
    }
    s.push_str(
        "
Exit status: 0 stopped cleanly; 1 failure; 64 bad command line;
78 bad config; 71 cannot bind a listening address.
",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, UsageError> {
        Cli::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn flags_parse() {
        let c = parse(&["--config", "/x.toml", "-t", "--single-process"]).unwrap();
        assert_eq!(c.config, Some(PathBuf::from("/x.toml")));
        assert!(c.check_config && c.single_process && !c.daemon);
        assert_eq!(
            parse(&["--config=/y"]).unwrap().config,
            Some(PathBuf::from("/y"))
        );
        assert_eq!(parse(&[]).unwrap(), Cli::default());
    }

    #[test]
    fn mistakes_are_usage_errors() {
        assert!(parse(&["--config"])
            .unwrap_err()
            .to_string()
            .contains("needs a file"));
        assert!(parse(&["--bogus"])
            .unwrap_err()
            .to_string()
            .contains("'--bogus'"));
    }

    #[test]
    fn help_lists_every_signal() {
        let h = help();
        for spec in MASTER_SIGNALS {
            assert!(h.contains(spec.name), "{}", spec.name);
        }
    }
}
