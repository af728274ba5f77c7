//! The echo state machine: what to do when a connection is readable or
//! writable. Pure logic over an [`Io`] trait, property-tested without
//! sockets.
//!
//! Runs in: prefork workers (non-blocking sockets under epoll) and fork-mode
//! connection children (blocking sockets). Owns no descriptor.
//!
//! One message costs one `read` and one `write`: bytes are read into the
//! worker's shared scratch buffer and written straight back. Only when the
//! kernel takes fewer bytes than were read (the client is not reading) are
//! the rest copied, once, into the connection's own `pending` buffer; the
//! connection then stops reading until that buffer is flushed. That is the
//! backpressure: memory per connection never exceeds one `buffer_size`, and
//! an idle connection holds no buffer at all.

use std::io;

/// Reads and writes of one connection.
pub trait Io {
    /// `read(2)`: `Ok(0)` is end of stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// `write(2)`: may take fewer bytes than offered.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// What the connection waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait until readable (nothing is pending).
    Read,
    /// Wait until writable (bytes are pending; reading is paused).
    Write,
    /// Close the connection.
    Close(Close),
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client closed its side and got every byte back.
    Done,
    /// The peer reset the connection or vanished (`ECONNRESET`, `EPIPE`):
    /// an ordinary event for an echo server, closed quietly.
    Reset,
    /// Any other error, worth a log line.
    Error(i32),
}

/// The per-connection state.
///
/// Invariants: `sent <= pending.len() <= buffer_size`; `pending` is empty
/// whenever the connection is reading; after `eof`, no read happens again.
#[derive(Debug, Default)]
pub struct Echo {
    pending: Vec<u8>,
    sent: usize,
    eof: bool,
}

impl Echo {
    /// A connection with nothing in flight and no buffer allocated.
    pub fn new() -> Echo {
        Echo::default()
    }

    /// Bytes read but not yet written back.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Bytes of heap this connection holds (its pending buffer's capacity).
    pub fn heap_bytes(&self) -> usize {
        self.pending.capacity()
    }

    /// Releases the pending buffer's memory if nothing is in flight (for
    /// connections that went idle after a burst).
    pub fn shrink(&mut self) {
        if self.pending_len() == 0 {
            self.pending = Vec::new();
            self.sent = 0;
        }
    }

    /// The connection is readable: one `read` into `scratch`, one `write`
    /// of what came in. Must only be called when [`Next::Read`] was the
    /// last answer.
    pub fn on_readable(&mut self, io: &mut impl Io, scratch: &mut [u8]) -> Next {
        debug_assert_eq!(self.pending_len(), 0);
        let n = match io.read(scratch) {
            Ok(0) => {
                self.eof = true;
                return Next::Close(Close::Done);
            }
            Ok(n) => n,
            Err(e) => return on_error(e, Next::Read),
        };
        let written = match write_retrying(io, &scratch[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return on_error(e, Next::Read),
        };
        if written == n {
            return Next::Read;
        }
        // Backpressure: keep the rest (the one copy echod ever makes) and
        // stop reading until it is flushed.
        // Exactly what is left: `extend_from_slice` alone would round a
        // first allocation up (to 8 bytes at least), past a tiny buffer.
        self.pending.clear();
        self.pending.reserve_exact(n - written);
        self.pending.extend_from_slice(&scratch[written..n]);
        self.sent = 0;
        Next::Write
    }

    /// The connection is writable: flush what is pending. Returns
    /// [`Next::Read`] once everything is written.
    pub fn on_writable(&mut self, io: &mut impl Io) -> Next {
        while self.sent < self.pending.len() {
            match write_retrying(io, &self.pending[self.sent..]) {
                Ok(0) => return Next::Close(Close::Reset),
                Ok(w) => self.sent += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Write,
                Err(e) => return on_error(e, Next::Write),
            }
        }
        self.pending.clear();
        self.sent = 0;
        if self.eof {
            Next::Close(Close::Done)
        } else {
            Next::Read
        }
    }
}

/// `write`, retried on `EINTR`.
fn write_retrying(io: &mut impl Io, buf: &[u8]) -> io::Result<usize> {
    loop {
        match io.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Maps an I/O error to the next step: spurious wake-ups and interrupts
/// keep waiting for the same readiness (`still`); a vanished peer closes
/// quietly; anything else closes with the error kept for the log.
fn on_error(e: io::Error, still: Next) -> Next {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => still,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::TimedOut => Next::Close(Close::Reset),
        _ => Next::Close(Close::Error(e.raw_os_error().unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A scripted peer: delivers `input` in the given read sizes and accepts
    /// writes in the given sizes (0 meaning `EAGAIN`).
    struct Fake {
        input: Vec<u8>,
        at: usize,
        reads: Vec<usize>,
        writes: Vec<usize>,
        step: usize,
        output: Vec<u8>,
    }

    impl Io for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.step += 1;
            if self.at == self.input.len() {
                return Ok(0);
            }
            let want = self.reads[self.step % self.reads.len()];
            if want == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = want.min(buf.len()).min(self.input.len() - self.at);
            buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.step += 1;
            let take = self.writes[self.step % self.writes.len()];
            if take == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = take.min(buf.len());
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn run(fake: &mut Fake, buffer: usize) -> Next {
        let mut scratch = vec![0u8; buffer];
        let mut echo = Echo::new();
        let mut next = Next::Read;
        for _ in 0..1_000_000 {
            next = match next {
                Next::Read => echo.on_readable(fake, &mut scratch),
                Next::Write => echo.on_writable(fake),
                Next::Close(_) => return next,
            };
            assert!(echo.pending_len() <= buffer);
            assert!(echo.heap_bytes() <= buffer);
        }
        next
    }

    proptest! {
        /// Any byte stream, read and written in any chunking, comes back
        /// exactly, and the pending buffer never outgrows `buffer_size`.
        #[test]
        fn echo_is_exact_under_any_chunking(
            input in proptest::collection::vec(any::<u8>(), 0..20_000),
            reads in proptest::collection::vec(0usize..5_000, 1..8),
            writes in proptest::collection::vec(0usize..5_000, 1..8),
            buffer in 1usize..4096,
        ) {
            let mut reads = reads;
            let mut writes = writes;
            reads.push(1); // guarantee progress
            writes.push(1);
            let mut fake = Fake { input: input.clone(), at: 0, reads, writes, step: 0, output: vec![] };
            let end = run(&mut fake, buffer);
            prop_assert_eq!(end, Next::Close(Close::Done));
            prop_assert_eq!(fake.output, input);
        }
    }

    struct Broken(io::ErrorKind);
    impl Io for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf[0] = 1;
            Ok(1)
        }
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
    }

    #[test]
    fn a_vanished_peer_closes_quietly() {
        for kind in [io::ErrorKind::BrokenPipe, io::ErrorKind::ConnectionReset] {
            let mut e = Echo::new();
            assert_eq!(
                e.on_readable(&mut Broken(kind), &mut [0; 8]),
                Next::Close(Close::Reset)
            );
        }
    }

    #[test]
    fn a_full_peer_pauses_reading_and_holds_one_buffer() {
        let mut e = Echo::new();
        let mut io = Broken(io::ErrorKind::WouldBlock);
        assert_eq!(e.on_readable(&mut io, &mut [0; 8]), Next::Write);
        assert_eq!(e.pending_len(), 1);
        assert_eq!(e.on_writable(&mut io), Next::Write);
        e.shrink();
        assert_eq!(e.pending_len(), 1, "shrink keeps bytes in flight");
    }
}
