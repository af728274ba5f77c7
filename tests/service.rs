//! echod as a service: sd_notify, socket activation, `--daemon`, and the
//! privilege drop. The real binary, loopback only, every wait bounded.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The bound of every wait here.
const LIMIT: Duration = Duration::from_secs(10);

/// Receives the next notification, closing any descriptor that came with
/// it (none is expected from echod, which never sends `BARRIER=1`).
fn next_message(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = rx
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Plays systemd: `READY=1` once the workers are up, `RELOADING=1` (with
/// `MONOTONIC_USEC`) then `READY=1` around a SIGHUP, `STOPPING=1` on
/// SIGTERM.
#[test]
fn sd_notify_ready_reloading_stopping() {
    let dir = TempDir::new("notify");
    let sock = dir.path("notify.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut e = Start::config(&config("workers = 2"))
        .env("NOTIFY_SOCKET", sock.to_str().unwrap())
        .no_wait()
        .spawn();
    let mut m = next_message(&rx);
    while !m.contains("READY=1") {
        assert!(m.starts_with("STATUS="), "before READY only STATUS: {m:?}");
        m = next_message(&rx);
    }
    assert!(m.contains("STATUS=generation 1: 2 workers"), "{m:?}");
    // READY means serving: the workers are up and echo works right away.
    assert_eq!(e.workers().len(), 2);
    // The address is read from the log, which a thread of the harness
    // collects: it may lag behind the READY message.
    assert!(
        e.wait_log("listening on", Duration::from_secs(10)),
        "{}",
        e.log()
    );
    echo_once(e.addr(), b"ready means serving");
    e.signal(libc::SIGHUP);
    let m = next_message(&rx);
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m:?}");
    let mut m = next_message(&rx);
    while !m.contains("READY=1") {
        m = next_message(&rx);
    }
    assert!(m.contains("generation 2"), "{m:?}");

    e.signal(libc::SIGTERM);
    let mut m = next_message(&rx);
    while !m.contains("STOPPING=1") {
        m = next_message(&rx);
    }
    assert_eq!(
        e.wait_exit(Duration::from_secs(10)).map(|s| s.code()),
        Some(Some(0))
    );
    e.assert_no_errors();
}

/// Whether `name` is an executable file in one of the `PATH` directories.
fn in_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Socket activation through `systemd-socket-activate`: echod serves the
/// passed socket instead of binding, says so, and echoes.
#[test]
fn socket_activation_serves_the_passed_socket() {
    if !in_path("systemd-socket-activate") {
        eprintln!("SKIP: systemd-socket-activate is not installed");
        return;
    }
    let dir = TempDir::new("activate");
    let cfg = dir.path("echod.toml");
    // The config's own listen address must be ignored in favour of the
    // passed socket: point it at something that would fail to bind.
    std::fs::write(
        &cfg,
        "listen = [\"192.0.2.1:7\"]\nworkers = 2\n[log]\ntarget = \"stderr\"\n",
    )
    .unwrap();
    // systemd-socket-activate rejects port 0: take a port the kernel says
    // is free and hand it over. Another test may bind it in between (they
    // all use port 0, which can return it); then the activator fails to
    // listen, and the test tries again with a new port.
    let (mut activator, log, port) = (0..5)
        .find_map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("systemd-socket-activate")
                .args(["-l", &format!("127.0.0.1:{port}"), ECHOD, "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .env_remove("NOTIFY_SOCKET")
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID")
                .spawn()
                .expect("spawn systemd-socket-activate");
            // The guard kills the activator (echod's master once it execs)
            // and the workers, whatever happens below.
            let mut activator = KillTree::child(child);
            // stderr is the activator's, then echod's log: read as it comes.
            let log = Capture::start(activator.take_output().1.expect("piped stderr"));
            let listening = format!("Listening on 127.0.0.1:{port} ");
            let settled = wait_until(LIMIT, || {
                log.text().contains(&listening) || activator.try_wait().is_some()
            });
            let text = log.text();
            if text.contains(&listening) {
                return Some((activator, log, port));
            }
            assert!(
                settled,
                "the activator neither listened nor exited:\n{text}"
            );
            assert!(
                text.contains("Address already in use"),
                "the activator failed:\n{text}"
            );
            eprintln!("port {port} was taken meanwhile; trying another");
            None
        })
        .expect("5 ports in a row were taken before the activator could listen");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // The activator execs echod on the first connection; echod then
    // accepts it from the queue.
    for i in 0..20u8 {
        echo_once(addr, &payload(u64::from(i), 1000 + usize::from(i) * 100));
    }
    let pid = activator.id();
    assert_eq!(
        comm(pid).as_deref(),
        Some("echod-master"),
        "the activator execs echod in place"
    );
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = activator.wait_exit(LIMIT);
    // The workers, which hold the pipe too, exit before the master does.
    let log = log.finish(LIMIT);
    let status = status.unwrap_or_else(|| panic!("echod did not stop on SIGTERM:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("using 1 sockets from systemd (socket activation)"),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{port}")),
        "{log}"
    );
}

/// Runs `echod --daemon --config cfg`, bounded by [`LIMIT`] (the launcher
/// is killed by PID and the test fails if it does not return). While it
/// runs and once it has returned, every new pid the pid file names that is
/// an echod gets a cleanup guard in `daemons`, so a daemon dies with the
/// test whatever happens next.
fn launch_daemon(cfg: &Path, pidfile: &Path, daemons: &mut Vec<KillTree>) -> Run {
    let mut cmd = echod_command();
    cmd.arg("--daemon").arg("--config").arg(cfg);
    launch(cmd, pidfile, daemons)
}

/// [`launch_daemon`] with a command of the test's making (other flags, a
/// working directory, environment).
fn launch(cmd: Command, pidfile: &Path, daemons: &mut Vec<KillTree>) -> Run {
    let mut adopt = || {
        let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return;
        };
        if !daemons.iter().any(|d| d.id() == pid)
            && comm(pid).is_some_and(|c| c.starts_with("echod"))
        {
            daemons.push(KillTree::pid(pid));
        }
    };
    let run = run_bounded(cmd, LIMIT, &mut adopt);
    adopt();
    run
}

/// `--daemon`: the launcher returns 0 only once the daemon serves; the pid
/// file holds the master's pid and is locked; a second start fails with a
/// clear message; SIGTERM removes the pid file.
#[test]
fn daemon_detaches_with_a_locked_pid_file() {
    let dir = TempDir::new("daemon");
    let pidfile = dir.path("echod.pid");
    let logfile = dir.path("echod.log");
    let cfg = dir.path("echod.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\npid_file = \"{}\"\n[log]\ntarget = \"file\"\nfile = \"{}\"\n",
            pidfile.display(),
            logfile.display()
        ),
    )
    .unwrap();
    let mut daemons = Vec::new();
    let first = launch_daemon(&cfg, &pidfile, &mut daemons);
    assert!(first.status.success(), "{}", first.stderr);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        daemons.iter().map(KillTree::id).collect::<Vec<_>>(),
        [pid],
        "the daemon's pid"
    );
    assert_eq!(comm(pid).as_deref(), Some("echod-master"));
    // Detached: a new session, re-parented away from this test.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let (ppid, sid): (i32, i32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(ppid, std::process::id() as i32);
    // SAFETY: getsid(2) of this process takes no pointer and cannot fail.
    assert_ne!(sid, unsafe { libc::getsid(0) }, "a new session");
    // Serving already when the launcher returned, on the port its log
    // names (port 0 in the config: the kernel chose it).
    let log = || std::fs::read_to_string(&logfile).unwrap_or_default();
    assert!(
        wait_until(LIMIT, || !listening_addrs(&log()).is_empty()),
        "no 'listening on' in the daemon's log:\n{}",
        log()
    );
    echo_once(listening_addrs(&log())[0], b"daemonized");
    // The pid file is locked.
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks
            .lines()
            .any(|l| l.contains("FLOCK") && l.contains(&format!(" {pid} "))),
        "no flock held by {pid}:\n{locks}"
    );
    // A second instance is refused, clearly, before it binds (with port 0
    // it could bind, so the pid file alone refuses it).
    let second = launch_daemon(&cfg, &pidfile, &mut daemons);
    assert!(!second.status.success());
    assert!(
        second.stderr.contains("locked by a running echod")
            && second.stderr.contains(&pid.to_string()),
        "{}",
        second.stderr
    );
    assert_eq!(daemons.len(), 1, "a second daemon started");
    // SIGTERM: the daemon exits and removes its pid file.
    // SAFETY: kill(2) on the daemon this test started, alive as checked
    // above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_until(LIMIT, || !alive(pid)));
    assert!(!pidfile.exists());
    assert!(log().contains("ready: generation 1"), "{}", log());
}

/// `--daemon` whose port is taken: the launcher exits non-zero with the
/// daemon's reason, instead of 0 as `daemonize` would.
#[test]
fn daemon_launcher_reports_a_failed_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = TempDir::new("daemon-fail");
    let cfg = dir.path("echod.toml");
    // The pid file only lets the test find (and kill) a daemon that
    // wrongly stayed up.
    let pidfile = dir.path("echod.pid");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:{port}\"]\npid_file = \"{}\"\n",
            pidfile.display()
        ),
    )
    .unwrap();
    let mut daemons = Vec::new();
    let out = launch_daemon(&cfg, &pidfile, &mut daemons);
    assert_eq!(out.code(), Some(71), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("bind 127.0.0.1:{port}")) && out.stderr.contains("in use"),
        "{}",
        out.stderr
    );
}

/// With `user`/`group` set (and echod started as root), workers serve as
/// that user and group, with no supplementary groups; the master keeps
/// root to bind new addresses at a reload.
#[test]
fn workers_drop_privileges() {
    if skip_unless_root("workers_drop_privileges") {
        return;
    }
    let e = Echod::start(&config(
        "workers = 2\nuser = \"nobody\"\ngroup = \"nogroup\"",
    ));
    let workers = e.workers();
    assert_eq!(workers.len(), 2);
    let id_line = |pid: i32, key: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .to_string()
    };
    for w in &workers {
        assert_eq!(
            id_line(*w, "Uid:").split_whitespace().nth(1),
            Some("65534"),
            "worker {w}"
        );
        assert!(id_line(*w, "Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == "65534"));
        assert!(id_line(*w, "Gid:")
            .split_whitespace()
            .skip(1)
            .all(|g| g == "65534"));
        assert_eq!(id_line(*w, "Groups:").trim(), "Groups:");
    }
    assert_eq!(id_line(e.pid, "Uid:").split_whitespace().nth(1), Some("0"));
    echo_once(e.addr(), b"as nobody");
    e.assert_no_errors();
}

/// `user`/`group` that echod, started unprivileged, cannot switch to: a
/// config error at start (exit 78, saying why), not a crash loop of
/// children.
#[test]
fn user_switch_without_root_is_a_config_error() {
    if skip_unless_root("user_switch_without_root_is_a_config_error") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("nonroot");
    let cfg = dir.path("echod.toml");
    std::fs::write(&cfg, "listen = [\"127.0.0.1:0\"]\nuser = \"root\"\n").unwrap();
    let mut cmd = echod_command();
    cmd.arg("--config").arg(&cfg).uid(65534).gid(65534);
    let out = run_bounded(cmd, LIMIT, || {});
    assert_eq!(out.code(), Some(78), "{}", out.stderr);
    assert!(
        out.stderr.contains("not root") && out.stderr.contains("leave them unset"),
        "{}",
        out.stderr
    );
}

/// `SIGUSR1` after logrotate moved the log file: the master and the
/// workers, which run as `nobody`, all reopen it. The master creates the
/// new file as root and hands it to the workers' user and group before it
/// tells them, so a worker that is no longer root can open it too.
#[test]
fn sigusr1_reopens_the_log_in_unprivileged_workers() {
    use std::os::unix::fs::MetadataExt;
    if skip_unless_root("sigusr1_reopens_the_log_in_unprivileged_workers") {
        return;
    }
    let dir = TempDir::new("usr1");
    let log = dir.path("echod.log");
    let rotated = dir.path("echod.log.1");
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\nuser = \"nobody\"\ngroup = \"nogroup\"\n\
         [log]\ntarget = \"file\"\nfile = \"{}\"\n",
        log.display()
    );
    let e = Start::config(&text).no_wait().spawn();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || read(&log)
            .contains("master: ready: generation")),
        "echod did not start:\n{}{}",
        read(&log),
        e.log()
    );
    std::fs::rename(&log, &rotated).unwrap();
    e.signal(libc::SIGUSR1);
    let reopened = wait_until(Duration::from_secs(10), || {
        read(&log).matches("SIGUSR1: log reopened").count() == 3
    });
    assert!(
        reopened,
        "the master and both workers did not reopen; new file:\n{}\nrotated file:\n{}",
        read(&log),
        read(&rotated)
    );
    assert!(
        !read(&rotated).contains("SIGUSR1"),
        "a record of the reopen went to the rotated file:\n{}",
        read(&rotated)
    );
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let addr: std::net::SocketAddr = read(&rotated)
        .lines()
        .find_map(|l| l.split("listening on ").nth(1))
        .expect("a listening line")
        .trim()
        .parse()
        .unwrap();
    echo_once(addr, b"after the rotation");
    assert!(
        !read(&log).contains("ERROR") && !read(&rotated).contains("ERROR"),
        "{}{}",
        read(&rotated),
        read(&log)
    );
}

/// `daemon_reloads_a_config_given_by_a_relative_path`: `echod --daemon -c
/// echod.toml`, started in the config's directory, reloads on `SIGHUP`
/// although the daemon works in `/`: the launcher resolved the path before
/// detaching. Then `SIGTERM` stops it and removes its pid file.
///
/// Before, every reload of such a daemon failed with "echod.toml: No such
/// file or directory".
#[test]
fn daemon_reloads_a_config_given_by_a_relative_path() {
    let dir = TempDir::new("daemon-relative");
    let pidfile = dir.path("echod.pid");
    let logfile = dir.path("echod.log");
    let text = |workers: usize| {
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = {workers}\npid_file = \"{}\"\n\
             [log]\ntarget = \"file\"\nfile = \"{}\"\nlevel = \"info\"\n",
            pidfile.display(),
            logfile.display()
        )
    };
    std::fs::write(dir.path("echod.toml"), text(1)).unwrap();
    let mut cmd = echod_command();
    cmd.args(["--daemon", "-c", "echod.toml"])
        .current_dir(&dir.0);
    let mut daemons = Vec::new();
    let run = launch(cmd, &pidfile, &mut daemons);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let pid = daemons.first().expect("the daemon's pid file").id();
    let log = || std::fs::read_to_string(&logfile).unwrap_or_default();
    std::fs::write(dir.path("echod.toml"), text(2)).unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    assert!(
        wait_until(LIMIT, || log().contains("reload: generation 2 starts")
            || log().contains("reload failed")),
        "{}",
        log()
    );
    assert!(log().contains("reload: generation 2 starts"), "{}", log());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_until(LIMIT, || !alive(pid)), "{}", log());
    assert!(!pidfile.exists(), "{}", log());
    assert!(!log().contains(" ERROR "), "{}", log());
}

/// `daemon_launcher_gives_up_on_a_pool_that_never_comes_up`: workers that
/// die at start (test hook `ECHOD_TEST_WORKER_CRASH`) keep a daemon from
/// ever being ready; the launcher does not wait forever: at its limit
/// (shortened to 1.5 s by the test hook `ECHOD_TEST_READY_TIMEOUT_MS`; 60 s
/// otherwise) it stops the daemon, exits 1 saying it was not ready, and
/// leaves no echod process and no pid file behind.
///
/// Before, the launcher waited on the readiness pipe with no limit.
#[test]
fn daemon_launcher_gives_up_on_a_pool_that_never_comes_up() {
    let dir = TempDir::new("daemon-unready");
    let pidfile = dir.path("echod.pid");
    let logfile = dir.path("echod.log");
    let cfg = dir.path("echod.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 1\npid_file = \"{}\"\n\
             [log]\ntarget = \"file\"\nfile = \"{}\"\nlevel = \"info\"\n",
            pidfile.display(),
            logfile.display()
        ),
    )
    .unwrap();
    let mut cmd = echod_command();
    cmd.args(["--daemon", "--config"])
        .arg(&cfg)
        .env("ECHOD_TEST_WORKER_CRASH", "1")
        .env("ECHOD_TEST_READY_TIMEOUT_MS", "1500");
    let t0 = std::time::Instant::now();
    let mut daemons = Vec::new();
    let run = launch(cmd, &pidfile, &mut daemons);
    let took = t0.elapsed();
    let err = &run.stderr;
    let log = std::fs::read_to_string(&logfile).unwrap_or_default();
    assert_eq!(run.code(), Some(1), "{err}\n{log}");
    assert!(
        err.contains("was not ready within 1.5s") && err.contains("stopped it"),
        "{err}\n{log}"
    );
    assert!(took >= Duration::from_millis(1500), "{took:?}: {err}");
    let pid: i32 = err
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next()?.parse().ok())
        .expect("the daemon's pid in the message");
    assert!(!alive(pid), "the daemon {pid} still runs\n{log}");
    assert!(!pidfile.exists(), "{log}");
    assert!(log.contains("respawning in"), "no crash loop?\n{log}");
}

/// `a_worker_that_cannot_start_stops_echod`: a worker that cannot switch
/// to `user` exits with the fatal code (2), and the master, instead of
/// respawning it in a loop, logs why and stops with exit 1 (nginx does the
/// same with its fatal code); with `--daemon`, the launcher prints that
/// reason and exits 1, leaving no process and no pid file behind. Made
/// real by starting echod as root without `CAP_SETUID`/`CAP_SETGID`.
#[test]
fn a_worker_that_cannot_start_stops_echod() {
    if skip_unless_root("a_worker_that_cannot_start_stops_echod") {
        return;
    }
    let dir = TempDir::new("fatal-worker");
    let cfg = dir.path("echod.toml");
    let pidfile = dir.path("echod.pid");
    let logfile = dir.path("echod.log");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\nuser = \"nobody\"\npid_file = \"{}\"\n\
             [log]\ntarget = \"file\"\nfile = \"{}\"\nlevel = \"info\"\n",
            pidfile.display(),
            logfile.display()
        ),
    )
    .unwrap();
    let log = || std::fs::read_to_string(&logfile).unwrap_or_default();

    // In the foreground.
    let mut cmd = echod_command();
    cmd.arg("--config").arg(&cfg);
    without_setuid_caps(&mut cmd);
    let run = run_bounded(cmd, LIMIT, || {});
    assert_eq!(run.code(), Some(1), "{}\n{}", run.stderr, log());
    let text = log();
    assert!(
        text.contains("cannot switch to user nobody")
            && text.contains("cannot start (exited with code 2); stopping echod"),
        "{text}"
    );
    assert!(
        !text.contains("respawning in"),
        "a fatal worker was respawned\n{text}"
    );
    assert!(!pidfile.exists(), "{text}");

    // Detached: the launcher reports the reason.
    std::fs::remove_file(&logfile).unwrap();
    let mut cmd = echod_command();
    cmd.args(["--daemon", "--config"]).arg(&cfg);
    without_setuid_caps(&mut cmd);
    let mut daemons = Vec::new();
    let run = launch(cmd, &pidfile, &mut daemons);
    assert_eq!(run.code(), Some(1), "{}\n{}", run.stderr, log());
    assert!(
        run.stderr
            .contains("cannot start (exited with code 2); stopping echod"),
        "{}\n{}",
        run.stderr,
        log()
    );
    for d in &daemons {
        assert!(
            wait_until(LIMIT, || !alive(d.id())),
            "the daemon {} still runs\n{}",
            d.id(),
            log()
        );
    }
    assert!(wait_until(LIMIT, || !pidfile.exists()), "{}", log());
}
