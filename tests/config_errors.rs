//! Start-up failures and the informational flags, run against the real
//! binary: each bad config exits non-zero before anything is bound or
//! forked, with one message naming the file, line, column and key (or the
//! address) at fault; `-t`, `--help` and `--version` exit 0.
//!
//! None of these runs starts a master: `run_echod` waits (bounded) for the
//! launcher to exit by itself.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;

/// sysexits(3) codes echod documents in `--help`.
const EX_USAGE: i32 = 64;
const EX_OSERR: i32 = 71;
const EX_CONFIG: i32 = 78;

const LIMIT: Duration = Duration::from_secs(10);

/// Writes `text` as a config file and runs `echod --config FILE`.
fn run_config(dir: &TempDir, text: &str, extra_args: &[&str]) -> (Run, String) {
    let path = dir.path("echod.toml");
    std::fs::write(&path, text).expect("write config");
    let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
    args.push("--config".into());
    args.push(path.display().to_string());
    (run_echod(&args, LIMIT), path.display().to_string())
}

/// Asserts a start-up failure: the exit code, one `echod: ...` message that
/// contains every needle, and no sign that echod started serving.
fn assert_fails(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(
        run.code(),
        Some(code),
        "exit status {:?}, expected {code}; stderr:\n{}",
        run.status,
        run.stderr
    );
    for n in needles {
        assert!(
            run.stderr.contains(n),
            "stderr does not contain {n:?}:\n{}",
            run.stderr
        );
    }
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(!all.contains("listening on"), "echod bound anyway:\n{all}");
    assert!(
        !all.contains("starting generation"),
        "echod started anyway:\n{all}"
    );
}

/// `unknown_key_is_named_with_its_position`: a misspelt key is refused
/// (not ignored), and the message names the file, the line and column of
/// the key, and the key's dotted path, at top level and inside `[log]`.
#[test]
fn unknown_key_is_named_with_its_position() {
    let dir = TempDir::new("cfg-unknown");
    let (run, path) = run_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\nworkerz = 3\n",
        &[],
    );
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("{path}:3:1: workerz:"), "unknown key"],
    );

    let (run, path) = run_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\n[log]\nlevel = \"info\"\n  colour = true\n",
        &[],
    );
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("{path}:4:3: log.colour:"), "unknown key"],
    );
}

/// `wrong_type_is_named_with_key_and_expected_type`: a value of the wrong
/// TOML type names the key, its position and what was expected instead of
/// what was found.
#[test]
fn wrong_type_is_named_with_key_and_expected_type() {
    let dir = TempDir::new("cfg-type");
    let (run, path) = run_config(&dir, "listen = [\"127.0.0.1:0\"]\nworkers = \"4\"\n", &[]);
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("{path}:2:11: workers:"), "integer", "string"],
    );

    let (run, path) = run_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nmode = \"fork\"\n\n[log]\nlevel = 3\n",
        &[],
    );
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("{path}:5:9: log.level:"), "integer"],
    );

    let (run, path) = run_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nidle_timeout = true\n",
        &[],
    );
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("{path}:2:16: idle_timeout:"), "boolean"],
    );
}

/// `what_the_system_refuses_is_named_with_its_position`: mistakes that only
/// the system can tell (a user or group that does not exist, a log file
/// that cannot be opened, a log on stderr with `--daemon`) are reported
/// like parse errors, at the key's line and column, with exit 78, by a
/// start and by `-t` alike.
#[test]
fn what_the_system_refuses_is_named_with_its_position() {
    let dir = TempDir::new("cfg-system");
    let listen = "listen = [\"127.0.0.1:0\"]\n";
    let cases: &[(String, &[&str], &str, &str)] = &[
        (
            format!("{listen}user = \"echod-no-such-user\"\n"),
            &[],
            "2:8: user:",
            "\"echod-no-such-user\" does not exist",
        ),
        (
            format!("{listen}group = \"echod-no-such-group\"\n"),
            &[],
            "2:9: group:",
            "\"echod-no-such-group\" does not exist",
        ),
        (
            format!("{listen}[log]\ntarget = \"file\"\nfile = \"/nonexistent/echod/x.log\"\n"),
            &[],
            "4:8: log.file:",
            "cannot be opened for appending",
        ),
        (
            format!("{listen}[log]\ntarget = \"stderr\"\n"),
            &["--daemon"],
            "3:10: log.target:",
            "/dev/null once echod detaches",
        ),
    ];
    for (text, flags, at, why) in cases {
        for check in [true, false] {
            let mut args = flags.to_vec();
            if check {
                args.push("-t");
            }
            let (run, path) = run_config(&dir, text, &args);
            assert_fails(&run, EX_CONFIG, &[&format!("{path}:{at}"), why]);
        }
    }
    assert!(
        !std::path::Path::new("/nonexistent/echod").exists(),
        "a check created the log's directory"
    );
}

/// `bad_address_is_quoted_with_its_position`: an address that is not
/// `IP:PORT` (a host name, no port, an impossible IP) is refused with the
/// offending string quoted and the element's own line and column.
#[test]
fn bad_address_is_quoted_with_its_position() {
    let dir = TempDir::new("cfg-addr");
    let cases: &[(&str, &str, &str)] = &[
        (
            "listen = [\"127.0.0.1:0\",\n          \"localhost:x\"]\n",
            "2:11: listen:",
            "\"localhost:x\"",
        ),
        (
            "listen = [\"127.0.0.1\"]\n",
            "1:11: listen:",
            "\"127.0.0.1\"",
        ),
        (
            "\nlisten = [\"999.0.0.1:7\"]\n",
            "2:11: listen:",
            "\"999.0.0.1:7\"",
        ),
    ];
    for (text, at, quoted) in cases {
        let (run, path) = run_config(&dir, text, &[]);
        assert_fails(
            &run,
            EX_CONFIG,
            &[&format!("{path}:{at}"), quoted, "not an address"],
        );
    }
}

/// `port_in_use_exits_71_naming_the_address`: when one of the listen
/// addresses is taken, echod exits 71 (EX_OSERR) with
/// `bind ADDR: Address already in use` naming that address (here the
/// second, IPv6 one, after the first bound fine), and forks nothing.
#[test]
fn port_in_use_exits_71_naming_the_address() {
    let taken = TcpListener::bind("[::1]:0").expect("bind [::1]:0");
    let addr = taken.local_addr().unwrap();
    let dir = TempDir::new("cfg-inuse");
    let (run, _) = run_config(
        &dir,
        &format!(
            "listen = [\"127.0.0.1:0\", \"{addr}\"]\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n"
        ),
        &[],
    );
    assert_eq!(run.code(), Some(EX_OSERR), "stderr:\n{}", run.stderr);
    let needle = format!("bind {addr}: Address already in use");
    assert!(
        run.stderr.contains(&needle),
        "no {needle:?} in:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("starting generation"),
        "{}",
        run.stderr
    );
    // The one error is the one provoked.
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.starts_with("<3>"))
        .collect();
    assert!(
        errors.iter().all(|l| l.contains(&needle)),
        "unexpected errors:\n{}",
        run.stderr
    );
    drop(taken);
}

/// `missing_explicit_config_file_is_an_error`: a `--config` file that does
/// not exist is an error naming it (no silent fall-back to the built-in
/// defaults, which only apply to the default path).
#[test]
fn missing_explicit_config_file_is_an_error() {
    let dir = TempDir::new("cfg-missing");
    let path = dir.path("nope/echod.toml");
    let run = run_echod(&["--config".to_string(), path.display().to_string()], LIMIT);
    assert_fails(
        &run,
        EX_CONFIG,
        &[&format!("echod: {}", path.display()), "No such file"],
    );
}

/// `check_config_prints_the_effective_config`: `-t` validates, prints the
/// effective config (the file's values plus every default) as TOML on
/// stdout and exits 0 without binding; the printed config is itself a valid
/// config that prints the same; and `-t` on a bad file exits 78.
#[test]
fn check_config_prints_the_effective_config() {
    let dir = TempDir::new("cfg-check");
    // A port that is taken proves `-t` does not bind.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = format!(
        "listen = [\"127.0.0.1:{port}\", \"[::1]:0\"]\nmode = \"fork\"\nworkers = 3\nidle_timeout = \"500ms\"\n[log]\nlevel = \"debug\"\n"
    );
    let (run, path) = run_config(&dir, &text, &["-t"]);
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains(&path),
        "the source file is not named:\n{}",
        run.stdout
    );
    let doc: toml::Table = run
        .stdout
        .parse()
        .unwrap_or_else(|e| panic!("-t output is not TOML ({e}):\n{}", run.stdout));
    let listen: Vec<&str> = doc["listen"]
        .as_array()
        .expect("listen is an array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(listen, [format!("127.0.0.1:{port}").as_str(), "[::1]:0"]);
    assert_eq!(doc["mode"].as_str(), Some("fork"));
    assert_eq!(doc["workers"].as_integer(), Some(3));
    assert_eq!(doc["idle_timeout"].as_str(), Some("500ms"));
    // Defaults are filled in.
    for key in [
        "backlog",
        "max_connections",
        "buffer_size",
        "shutdown_timeout",
        "worker_timeout",
    ] {
        assert!(
            doc.contains_key(key),
            "-t does not show the default of {key}:\n{}",
            run.stdout
        );
    }
    assert_eq!(doc["log"]["level"].as_str(), Some("debug"));
    assert!(!run.stdout.contains("listening on"));

    // Round trip: the printed config is a config, and prints the same.
    let body = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let dir2 = TempDir::new("cfg-check2");
    let (again, _) = run_config(&dir2, &run.stdout, &["-t"]);
    assert_eq!(again.code(), Some(0), "stderr:\n{}", again.stderr);
    assert_eq!(body(&again.stdout), body(&run.stdout));

    // And a bad file fails the check.
    let (bad, path) = run_config(&dir, "workers = 0\n", &["-t"]);
    assert_fails(&bad, EX_CONFIG, &[&format!("{path}:1:11: workers:")]);
    drop(taken);
}

/// `help_lists_the_signals`: `--help` exits 0 and documents every signal
/// the master handles and the flags.
#[test]
fn help_lists_the_signals() {
    for flag in ["--help", "-h"] {
        let run = run_echod(&[flag], LIMIT);
        assert_eq!(run.code(), Some(0), "{flag}: {}", run.stderr);
        for needle in [
            "SIGHUP",
            "SIGTERM",
            "SIGINT",
            "SIGQUIT",
            "SIGTTIN",
            "SIGTTOU",
            "SIGUSR1",
            "--config",
            "--check-config",
            "--single-process",
        ] {
            assert!(
                run.stdout.contains(needle),
                "{flag} lacks {needle}:\n{}",
                run.stdout
            );
        }
    }
}

/// `version_prints_the_package_version`: `--version` and `-V` print
/// `echod VERSION` and exit 0.
#[test]
fn version_prints_the_package_version() {
    for flag in ["--version", "-V"] {
        let run = run_echod(&[flag], LIMIT);
        assert_eq!(run.code(), Some(0), "{flag}: {}", run.stderr);
        assert_eq!(run.stdout, format!("echod {}\n", env!("CARGO_PKG_VERSION")));
    }
}

/// `unknown_flag_is_a_usage_error`: an unknown command-line argument exits
/// 64 (EX_USAGE) and names it.
#[test]
fn unknown_flag_is_a_usage_error() {
    let run = run_echod(&["--bogus"], LIMIT);
    assert_eq!(run.code(), Some(EX_USAGE), "{}", run.stderr);
    assert!(run.stderr.contains("'--bogus'"), "{}", run.stderr);
}
