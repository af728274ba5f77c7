//! The epoll worker's pipe for `splice(2)`: large messages go from a
//! socket into it and from it back to the same socket, as page references,
//! without a copy through echod's memory (see [`crate::echo`] for when).
//!
//! Runs in: each prefork worker on the epoll loop with `splice = true`.
//!
//! Owns: the two ends of one pipe (`O_CLOEXEC`, `O_NONBLOCK`), made in the
//! worker after the fork, so neither the master nor any other worker holds
//! them. One pipe serves all the worker's connections in turn, which is
//! safe only while it is empty between them: [`Pipe`] counts the bytes it
//! holds, and the worker calls [`Pipe::discard`] after every echo call, so
//! that no connection can ever receive another's bytes.
//!
//! `splice` into a socket sends without `MSG_NOSIGNAL`: a peer that has
//! gone raises `SIGPIPE`, which echod ignores (the Rust runtime sets it to
//! `SIG_IGN` before `main`, and `fork` keeps that), so the call fails with
//! `EPIPE` as `write` does.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// A pipe and the number of bytes in it.
///
/// Invariant: `held` is exactly the number of bytes in the pipe: what
/// `splice` moved in, less what `splice` moved out and `read` took.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
    /// The size asked for at [`Pipe::new`], asked again for a replacement.
    bytes: usize,
    /// The kernel refused to splice a socket into it (`EINVAL`): echo with
    /// `read` and `write` from then on.
    refused: bool,
}

impl Pipe {
    /// A pipe that holds at least `bytes` where the kernel allows (the
    /// default is 64 KiB; `F_SETPIPE_SZ` above
    /// `/proc/sys/fs/pipe-max-size`, 1 MiB by default, fails without
    /// `CAP_SYS_RESOURCE`, and then the default stands: a splice just moves
    /// less at a time).
    pub fn new(bytes: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        if bytes > 64 * 1024 {
            let size = bytes.next_power_of_two().min(i32::MAX as usize) as i32;
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size));
        }
        Ok(Pipe {
            read,
            write,
            held: 0,
            bytes,
            refused: false,
        })
    }

    /// Whether the process can open one more descriptor beside the pipe:
    /// false only if duplicating one fails with `EMFILE` (every number
    /// below `RLIMIT_NOFILE` is taken). The duplicate is closed at once.
    pub fn descriptor_left(&self) -> bool {
        match self.read.try_clone() {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::EMFILE),
        }
    }

    /// Whether sockets can be spliced through it.
    pub fn usable(&self) -> bool {
        !self.refused
    }

    /// Moves at most `len` bytes from `socket` into the pipe, after what
    /// it holds (nothing, when a connection starts: see the module doc):
    /// `Ok(0)` at the end of the stream, and `EAGAIN` with nothing
    /// queued, but also either with TCP urgent data (`MSG_OOB`) next,
    /// which `splice` never moves (`tcp_splice_read` stops before it), so
    /// the caller asks `read` then; `Unsupported` if the kernel cannot
    /// splice the socket (it is then never asked again).
    pub fn fill_from(&mut self, socket: impl AsFd, len: usize) -> io::Result<usize> {
        match splice(
            socket,
            None,
            &self.write,
            None,
            len,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(n) => {
                self.held += n;
                Ok(n)
            }
            Err(Errno::EINVAL) => {
                self.refused = true;
                log::warn!("splice(2) from a socket refused (EINVAL); echoing with read and write");
                Err(io::ErrorKind::Unsupported.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves at most `len` bytes from the pipe to `socket`.
    pub fn drain_to(&mut self, socket: impl AsFd, len: usize) -> io::Result<usize> {
        let len = len.min(self.held);
        let n = splice(
            &self.read,
            None,
            socket,
            None,
            len,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.held -= n;
        Ok(n)
    }

    /// Reads from the pipe into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(self.held);
        let n = nix::unistd::read(&self.read, &mut buf[..len])?;
        self.held -= n;
        Ok(n)
    }

    /// Empties the pipe (what a connection that ended left in it). Should
    /// reading fail, the pipe is replaced: never is a byte of one
    /// connection left where the next one would send it.
    pub fn discard(&mut self) {
        let mut sink = [0u8; 4096];
        while self.held > 0 {
            match self.read(&mut sink) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                failed => {
                    log::warn!("emptying the splice pipe: {failed:?}; replacing it");
                    match Pipe::new(self.bytes) {
                        Ok(fresh) => *self = fresh,
                        // No descriptor for a new one: stop splicing (the
                        // old pipe, never used again, keeps what it holds).
                        Err(e) => {
                            log::warn!(
                                "cannot make a new splice pipe ({e}); echoing with read and write"
                            );
                            self.held = 0;
                            self.refused = true;
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Bytes in the pipe.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    /// Bytes go socket → pipe → socket unchanged, and the count follows.
    #[test]
    fn bytes_go_through_and_back() {
        let (mut client, server) = pair();
        let mut p = Pipe::new(16 * 1024).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        client.write_all(&data).unwrap();
        let mut moved = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while moved < data.len() && std::time::Instant::now() < deadline {
            match p.fill_from(&server, 16 * 1024) {
                Ok(n) => {
                    assert_eq!(p.held(), n);
                    while p.held() > 0 {
                        moved += p.drain_to(&server, usize::MAX).unwrap();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let mut back = vec![0; data.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    }

    /// What a connection leaves in the pipe is gone before the next one
    /// uses it.
    #[test]
    fn discard_empties_the_pipe() {
        let (mut client, server) = pair();
        let mut p = Pipe::new(0).unwrap();
        client.write_all(&[1; 3000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.held() < 3000 && std::time::Instant::now() < deadline {
            let _ = p.fill_from(&server, 3000 - p.held());
        }
        assert_eq!(p.held(), 3000);
        p.discard();
        assert_eq!(p.held(), 0);
        let mut buf = [0u8; 16];
        assert_eq!(
            nix::unistd::read(&p.read, &mut buf),
            Err(Errno::EAGAIN),
            "the pipe is really empty"
        );
        assert!(p.usable());
    }
}
