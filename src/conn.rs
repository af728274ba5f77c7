//! fork mode: one child process per connection, serving it with blocking
//! I/O, as inetd and Apache's first servers did.
//!
//! Runs in: a connection child, forked by the master right after `accept`.
//!
//! Owns: the one connection. It closed the listeners and the master's signal
//! pipe just after `fork()` (see `Master::fork_connection`). Signals:
//! `SIGTERM` is ignored (the child has nothing to stop accepting, so a
//! graceful stop lets it finish its client; the master kills it after
//! `shutdown_timeout`); `SIGINT` and `SIGQUIT` end it at once.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, Signal};

use crate::config::Config;
use crate::echo::{Close, Echo, Next};
use crate::process::exit_code;

/// Blocking reads and writes on the connection.
struct BlockingIo<'a>(&'a TcpStream);

impl crate::echo::Io for BlockingIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.0, buf)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut self.0, buf)
    }
}

/// Serves one connection until the client closes it, it idles for
/// `idle_timeout`, or an error; returns the exit code.
pub fn serve(stream: TcpStream, peer: SocketAddr, config: &Config) -> i32 {
    // SAFETY: setting a disposition to SIG_IGN or SIG_DFL installs no
    // handler code; the signal-hook handlers the master had for these
    // signals were unregistered when its signal pipe was dropped.
    unsafe {
        let _ = signal(Signal::SIGTERM, SigHandler::SigIgn);
        let _ = signal(Signal::SIGINT, SigHandler::SigDfl);
        let _ = signal(Signal::SIGQUIT, SigHandler::SigDfl);
    }
    crate::process::unblock_signals();
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("connection from {peer}: {e}");
        return exit_code::FAILURE;
    }
    let _ = stream.set_nodelay(true);
    let idle = config.idle_timeout;
    // A client that sends but does not read would block a write forever:
    // SO_SNDTIMEO bounds it by the idle timeout (the write then fails with
    // EAGAIN, which `on_writable` reports as still waiting to write).
    if !idle.is_zero() {
        let _ = stream.set_write_timeout(Some(idle));
    }
    log::debug!("connection from {peer}");
    let mut buf = vec![0u8; config.buffer_size];
    let mut echo = Echo::new();
    let mut io = BlockingIo(&stream);
    loop {
        if !idle.is_zero() {
            let ms = idle.as_millis().min(i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => {
                    log::debug!("connection from {peer} idle for {idle:?}; closing");
                    return exit_code::OK;
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::warn!("poll: {e}");
                    return exit_code::FAILURE;
                }
            }
        }
        // A blocking write returns short only when interrupted or timed
        // out; `on_writable` retries until everything is written or the
        // send timeout expires (it then answers `Write` again).
        let mut next = echo.on_readable(&mut io, &mut buf);
        if next == Next::Write {
            next = echo.on_writable(&mut io);
        }
        match next {
            Next::Read => {}
            Next::Write => {
                log::debug!("connection from {peer} does not read its echo for {idle:?}; closing");
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
