//! # echod: a multi-process pre-fork TCP echo daemon (RFC 862)
//!
//! ## Process tree
//! ```text
//! echod-master             binds listeners, reads config, handles signals,
//!  │                       forks and reaps; never touches a client byte
//!  ├── echod-worker        (prefork) accepts on the inherited listeners,
//!  ├── echod-worker         serves many connections with one epoll loop
//!  └── echod-conn          (fork mode) one child per accepted connection
//! ```
//! The names are the processes' `comm` (`ps -o comm`, `/proc/PID/comm`);
//! log lines name each process by role, number, generation and pid
//! (`worker 0 gen 3`). A reload that changes `user` or `group` also forks
//! a child (still named `echod-master`) that only tries the switch and
//! exits at once; the master waits for it before it commits the reload.
//!
//! ## Modules
//! | module | role | runs in |
//! | --- | --- | --- |
//! | `main.rs` | parse → config → logging → bind → `Master::run` → exit code | launcher |
//! | [`cli`] | command-line flags, `--help` | launcher |
//! | [`config`] | serde structs, defaults, validation, what a reload changes | master |
//! | [`listener`] | bind (`SO_REUSEADDR`, backlog), non-blocking `accept4` | master, workers |
//! | [`signals`] | the signal table as data; the self-pipe | all |
//! | [`process`] | the one `fork()`; pdeathsig; reaping into typed exits | master / child |
//! | [`pidfile`] | the locked pid file | master |
//! | [`master`] | the supervisor loop and one handler per signal | master |
//! | [`workers`] | the table of children, generations, phases, backoff (pure) | master |
//! | [`scoreboard`] | `MAP_SHARED` heartbeats and counters; the doorbell | master, workers |
//! | [`worker`] | the prefork worker's epoll loop | worker |
//! | [`uring`] | the prefork worker's loop on io_uring (`io = "io_uring"`) | worker |
//! | [`splice`] | the epoll worker's pipe for echoing large messages with `splice(2)` | worker |
//! | [`sched`] | the worker's scheduling policy (`sched_policy`: wake-up preemption) | worker |
//! | [`conn`] | fork mode: serve one connection | connection child |
//! | [`echo`] | the echo state machine over a buffer (pure) | worker, child |
//! | [`acked`] | when a connection last moved a byte, counting the bytes its client took (`TCP_INFO`) | worker, child |
//! | [`logging`] | our `log::Log`: stderr, `<N>` prefixes, syslog, file | all |
//! | [`notify`] | sd_notify: ready, reloading, stopping, status | master |
//! | [`daemon`] | `--daemon`: double fork, readiness pipe | launcher |
//!
//! ## Who holds which descriptor
//! | descriptor | master | prefork worker | connection child |
//! | --- | --- | --- | --- |
//! | listening sockets | yes (the reference copies) | yes, until it drains | closed after fork |
//! | master's signal pipe | yes | closed after fork | closed after fork |
//! | worker's signal pipe + epoll | — | its own | — |
//! | worker's splice pipe (`splice = true`, epoll worker) | — | its own, made after the fork | — |
//! | doorbell of accept balancing (an `eventfd`) | yes (made before the first fork) | yes, until it drains | closed after fork |
//! | master's bell (an `eventfd` a worker rings to ask for recycling; a signal would need the master's uid) | yes (made before the first fork; polled) | yes (only rings it) | closed after fork |
//! | client connections | fork mode: each closed right after its fork; one whose fork failed is held until a retry forks for it, accepting nothing meanwhile | its own only | its own only |
//! | pid file (flock) | yes | closed after fork | closed after fork |
//! | sd_notify socket, daemon readiness pipe | yes | closed after fork | closed after fork |
//! | log file / syslog socket | yes | inherited (one `write` per line) | inherited |
//!
//! ## Signals
//! The master's table is [`signals::MASTER_SIGNALS`]: `HUP` reload, `TERM`
//! graceful stop (a second one stops at once), `INT`/`QUIT` fast stop,
//! `TTIN`/`TTOU` one worker more/fewer, `USR1` reopen logs, `CHLD` reap.
//! A prefork worker takes `TERM` as "stop accepting and drain", `INT` and
//! `QUIT` as "exit now". A connection child ignores `TERM` (it has nothing
//! to stop accepting; the master kills it after `shutdown_timeout`).
//!
//! ## No threads
//! Every process that forks stays single-threaded for its whole life:
//! `fork()` copies only the calling thread, and a lock held by another
//! thread at that moment would stay locked forever in the child.

pub mod acked;
pub mod cli;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod echo;
pub mod listener;
pub mod logging;
pub mod master;
pub mod notify;
pub mod pidfile;
pub mod process;
pub mod sched;
pub mod scoreboard;
pub mod signals;
pub mod splice;
pub mod uring;
pub mod worker;
pub mod workers;
