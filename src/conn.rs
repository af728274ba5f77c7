//! fork mode: one child process per connection, serving it with blocking
//! I/O, as inetd and Apache's first servers did.
//!
//! Runs in: a connection child, forked by the master right after `accept`.
//!
//! Owns: the one connection. It closed the listeners and the master's signal
//! pipe just after `fork()` (see `Master::fork_connection`). Signals:
//! `SIGTERM` is ignored (the child has nothing to stop accepting, so a
//! graceful stop lets it finish its client; the master kills it after
//! `shutdown_timeout`); `SIGINT` and `SIGQUIT` end it at once; the
//! master's other signals (`SIGHUP`, `SIGUSR1`, ...) are ignored.
//!
//! Every wait (for input, or for room to write the echo) ends at the idle
//! deadline, `idle_timeout` after the last byte moved, however many
//! signals or partial writes come in between (see `BlockingIo`).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{send, MsgFlags};

use crate::acked::Activity;
use crate::config::Config;
use crate::echo::{Close, Echo, Next};
use crate::process::exit_code;

/// The connection, read and written by blocking calls bounded by the idle
/// timeout.
///
/// With an idle timeout, every wait ends at the last activity + idle: a wait
/// for input (`poll`), and a write that the client's full window holds up
/// (a non-blocking `send`, then `poll` for room). A byte moved in either
/// direction moves the deadline, as in the prefork worker, so a client
/// that reads its echo slowly keeps its connection, and one that stopped
/// reading loses it `idle_timeout` after the last byte it took. The bytes
/// it takes from what the socket already holds count too, looked at every
/// quarter of `idle_timeout` while a write waits for room (see
/// [`crate::acked`]): the kernel reports room only once a third of its
/// send buffer, megabytes, has gone. A wait interrupted by a signal resumes
/// for the time left, never longer.
struct BlockingIo<'a> {
    stream: &'a TcpStream,
    /// `None`: no timeout (`idle_timeout = 0`), plain blocking calls.
    idle: Option<Duration>,
    /// When the last byte moved, in either direction, counting the bytes
    /// the client took from the socket while a write waits.
    activity: Activity<Instant>,
}

/// How a bounded wait ended.
enum Waited {
    Ready,
    TimedOut,
}

impl BlockingIo<'_> {
    /// Waits until the socket is ready for `flags` or the idle deadline
    /// passes. Waiting for room (`POLLOUT`), it looks every quarter of
    /// `idle_timeout` (10 ms at least) whether the client took bytes since
    /// the last look, which moves the deadline.
    fn wait(&mut self, flags: PollFlags) -> io::Result<Waited> {
        let Some(idle) = self.idle else {
            return Ok(Waited::Ready);
        };
        let look = flags
            .contains(PollFlags::POLLOUT)
            .then(|| (idle / 4).max(Duration::from_millis(10)));
        loop {
            let mut left = (self.activity.last() + idle).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Waited::TimedOut);
            }
            if let Some(look) = look {
                left = left.min(look);
            }
            // Rounded up: a wait that ends early is only waited again.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => {
                    if look.is_some() {
                        self.activity.look(self.stream, Instant::now());
                    }
                }
                Err(Errno::EINTR) => continue,
                Ok(_) => return Ok(Waited::Ready),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl crate::echo::Io for BlockingIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = io::Read::read(&mut self.stream, buf)?;
        self.activity.moved(Instant::now());
        Ok(n)
    }

    /// Writes what the kernel takes at once, or waits for room until the
    /// idle deadline; `WouldBlock` once it has passed.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.idle.is_none() {
            return io::Write::write(&mut self.stream, buf);
        }
        loop {
            match send(
                self.stream.as_raw_fd(),
                buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => {
                    self.activity.moved(Instant::now());
                    return Ok(n);
                }
                Err(Errno::EAGAIN) => match self.wait(PollFlags::POLLOUT)? {
                    Waited::Ready => continue,
                    Waited::TimedOut => return Err(io::ErrorKind::WouldBlock.into()),
                },
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Serves one connection until the client closes it, it idles for
/// `idle_timeout`, or an error; returns the exit code.
pub fn serve(stream: TcpStream, peer: SocketAddr, config: &Config) -> i32 {
    reset_signals();
    crate::process::unblock_signals();
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("connection from {peer}: {e}");
        return exit_code::FAILURE;
    }
    crate::listener::tune_accepted(&stream);
    let idle = Some(config.idle_timeout).filter(|d| !d.is_zero());
    log::debug!("connection from {peer}");
    let mut buf = vec![0u8; config.buffer_size];
    let mut echo = Echo::new();
    let mut io = BlockingIo {
        stream: &stream,
        idle,
        activity: Activity::new(Instant::now()),
    };
    loop {
        match io.wait(PollFlags::POLLIN) {
            Ok(Waited::Ready) => {}
            Ok(Waited::TimedOut) => {
                log::debug!(
                    "connection from {peer} idle for {:?}; closing",
                    config.idle_timeout
                );
                return exit_code::OK;
            }
            Err(e) => {
                log::warn!("poll: {e}");
                return exit_code::FAILURE;
            }
        }
        // A write the client's window holds up waits for room until the
        // idle deadline (see BlockingIo); `on_writable` then answers
        // `Write` again.
        let mut next = echo.on_readable(&mut io, &mut buf);
        if next == Next::Write {
            next = echo.on_writable(&mut io);
        }
        match next {
            Next::Read => {}
            Next::Write => {
                log::debug!(
                    "connection from {peer} does not read its echo for {:?}; closing",
                    config.idle_timeout
                );
                return exit_code::OK;
            }
            Next::Close(Close::Done) | Next::Close(Close::Reset) => {
                log::debug!("connection from {peer} closed");
                return exit_code::OK;
            }
            Next::Close(Close::Error(errno)) => {
                log::info!(
                    "connection from {peer}: {}; closed",
                    io::Error::from_raw_os_error(errno)
                );
                return exit_code::OK;
            }
        }
    }
}

/// Sets the disposition of every signal the master catches, before the
/// child unblocks them. The master's handlers were unregistered when its
/// signal pipe was dropped, but the handler code stays installed with
/// nothing to do: a signal would still interrupt the child's `poll`
/// (`EINTR`). `SIGINT` and `SIGQUIT` take their default action (end the
/// child), and so does `SIGCHLD` (ignored: the child has no children);
/// every other one is ignored: `SIGTERM` (see the module header), and the
/// master's own (`SIGHUP`, `SIGUSR1`, `SIGUSR2`, `SIGTTIN`, `SIGTTOU`),
/// which mean nothing to one connection.
fn reset_signals() {
    for spec in crate::signals::MASTER_SIGNALS {
        let Ok(sig) = Signal::try_from(spec.signal) else {
            continue;
        };
        let handler = match sig {
            Signal::SIGINT | Signal::SIGQUIT | Signal::SIGCHLD => SigHandler::SigDfl,
            _ => SigHandler::SigIgn,
        };
        // SAFETY: setting a disposition to SIG_IGN or SIG_DFL installs no
        // handler code; the signal-hook handlers the master had for these
        // signals were unregistered when its signal pipe was dropped.
        let _ = unsafe { signal(sig, handler) };
    }
}
