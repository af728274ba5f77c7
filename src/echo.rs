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
//!
//! ## Large messages go through a pipe
//! Where the caller has a pipe ([`Io::can_splice`]: the epoll worker, with
//! `splice = true`), a connection whose last message was at least
//! [`SPLICE_MIN`] bytes has its next one echoed with two `splice(2)` calls
//! instead: socket to pipe, pipe to the same socket. The kernel moves
//! references to the pages that hold the bytes (the receive queue's
//! pages go into the pipe, and from it into the send queue), so the bytes
//! are not copied into echod's buffer and back; measured side by side on
//! 4 streams of 64 KiB writes, that takes the server's CPU per GB to about
//! 0.6 x. Below about 4 KiB the copy is cheaper than the pipe (64-byte
//! messages cost about 1.07 x the CPU through it), hence the threshold,
//! judged on the message before: a stream's next read is large as its last
//! one was, and a ping-pong client's small. The same bound holds: a splice
//! takes at most `buffer_size` bytes, and what the socket does not take at
//! once is read out of the pipe into `pending` (the one copy, as above). A
//! splice that moves nothing hands that message to `read`, which alone
//! tells the end of the stream from TCP urgent data (`MSG_OOB`), a byte
//! `splice` never moves.
//! The pipe is the worker's, shared by all its connections, so it must be
//! empty whenever the worker turns to another connection: it is after
//! every call that returns [`Next::Read`] or [`Next::Write`]; after
//! [`Next::Close`] it may still hold bytes, which the caller discards.

use std::io;

/// The smallest message (bytes moved by one read) after which a connection
/// echoes through the pipe; one smaller moves it back to `read`/`write`.
pub const SPLICE_MIN: usize = 4096;

/// Reads and writes of one connection.
pub trait Io {
    /// `read(2)`: `Ok(0)` is end of stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// `write(2)`: may take fewer bytes than offered.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Whether the `splice_*` calls below are there (a pipe is).
    fn can_splice(&self) -> bool {
        false
    }
    /// `splice(2)` of at most `len` bytes from the socket into the empty
    /// pipe. `Ok(0)` and `WouldBlock` may also mean TCP urgent data next
    /// in the stream, with bytes after it: [`Echo`] then asks `read`.
    /// `Unsupported` where the kernel cannot splice the socket.
    fn splice_in(&mut self, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// `splice(2)` of at most `len` bytes from the pipe to the socket: may
    /// take fewer.
    fn splice_out(&mut self, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// `read(2)` from the pipe.
    fn read_pipe(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
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
    /// The last message moved at least [`SPLICE_MIN`] bytes: the next one
    /// goes through the pipe, where there is one.
    splicing: bool,
    /// Bytes echoed back so far, and how many of them went straight from
    /// the pipe (`spliced <= echoed`).
    echoed: u64,
    spliced: u64,
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

    /// Bytes echoed back so far, and how many of them through the pipe.
    pub fn echoed(&self) -> (u64, u64) {
        (self.echoed, self.spliced)
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
        if self.splicing && io.can_splice() {
            return self.splice_through(io, scratch);
        }
        let n = match io.read(scratch) {
            Ok(0) => {
                self.eof = true;
                return Next::Close(Close::Done);
            }
            Ok(n) => n,
            Err(e) => return on_error(e, Next::Read),
        };
        self.splicing = n >= SPLICE_MIN;
        let written = match write_retrying(io, &scratch[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return on_error(e, Next::Read),
        };
        self.echoed += written as u64;
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

    /// [`Self::on_readable`] through the pipe: one `splice` in, `splice`s
    /// out until the socket takes no more; the rest is read out of the
    /// pipe into `pending` (backpressure, as in `on_readable`).
    fn splice_through(&mut self, io: &mut impl Io, scratch: &mut [u8]) -> Next {
        let n = match io.splice_in(scratch.len()) {
            Ok(n) if n > 0 => n,
            // Nothing moved, and `splice` cannot tell why: Linux's moves no
            // TCP urgent data (`MSG_OOB`), and with that byte next answers
            // `EAGAIN` although the socket is readable (level-triggered,
            // the worker would be woken for it again and again), or 0 once
            // the client has shut its side although bytes follow. `read`
            // skips that byte and tells the end of the stream from an empty
            // queue, so this message goes by `read` and `write`; so does
            // every message where the kernel cannot splice the socket.
            Ok(_) => return self.read_instead(io, scratch),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Unsupported
                ) =>
            {
                return self.read_instead(io, scratch)
            }
            Err(e) => return on_error(e, Next::Read),
        };
        self.splicing = n >= SPLICE_MIN;
        let mut left = n;
        while left > 0 {
            match io.splice_out(left) {
                Ok(0) => break,
                Ok(w) => {
                    left -= w;
                    self.echoed += w as u64;
                    self.spliced += w as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // `left` bytes stay in the pipe: the caller discards them.
                Err(e) => return on_error(e, Next::Read),
            }
        }
        if left == 0 {
            return Next::Read;
        }
        // The socket is full: take the rest out of the pipe, which other
        // connections use next, and wait for room as `on_readable` does.
        self.pending.clear();
        self.pending.reserve_exact(left);
        self.pending.resize(left, 0);
        self.sent = 0;
        let mut got = 0;
        while got < left {
            match io.read_pipe(&mut self.pending[got..]) {
                Ok(r) if r > 0 => got += r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The pipe holds fewer bytes than it was given: cannot
                // happen; closing is all that is left.
                Ok(_) => return Next::Close(Close::Error(libc::EIO)),
                Err(e) => return Next::Close(Close::Error(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        Next::Write
    }

    /// [`Self::on_readable`] by `read` and `write`, for a message `splice`
    /// did not move.
    fn read_instead(&mut self, io: &mut impl Io, scratch: &mut [u8]) -> Next {
        self.splicing = false;
        self.on_readable(io, scratch)
    }

    /// The connection is writable: flush what is pending. Returns
    /// [`Next::Read`] once everything is written.
    pub fn on_writable(&mut self, io: &mut impl Io) -> Next {
        while self.sent < self.pending.len() {
            match write_retrying(io, &self.pending[self.sent..]) {
                Ok(0) => return Next::Close(Close::Reset),
                Ok(w) => {
                    self.sent += w;
                    self.echoed += w as u64;
                }
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
    /// writes in the given sizes (0 meaning `EAGAIN`); with a `pipe`, splices
    /// move bytes by the same scripts.
    struct Fake {
        input: Vec<u8>,
        at: usize,
        reads: Vec<usize>,
        writes: Vec<usize>,
        step: usize,
        output: Vec<u8>,
        pipe: Option<std::collections::VecDeque<u8>>,
    }

    impl Fake {
        fn new(input: Vec<u8>, reads: Vec<usize>, writes: Vec<usize>, pipe: bool) -> Fake {
            Fake {
                input,
                at: 0,
                reads,
                writes,
                step: 0,
                output: vec![],
                pipe: pipe.then(Default::default),
            }
        }

        fn piped(&self) -> usize {
            self.pipe.as_ref().map_or(0, |p| p.len())
        }
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
        fn can_splice(&self) -> bool {
            self.pipe.is_some()
        }
        fn splice_in(&mut self, len: usize) -> io::Result<usize> {
            self.step += 1;
            let pipe = self.pipe.as_mut().expect("splice without a pipe");
            if self.at == self.input.len() {
                return Ok(0);
            }
            let want = self.reads[self.step % self.reads.len()];
            if want == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = want.min(len).min(self.input.len() - self.at);
            pipe.extend(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
        fn splice_out(&mut self, len: usize) -> io::Result<usize> {
            self.step += 1;
            let pipe = self.pipe.as_mut().expect("splice without a pipe");
            let take = self.writes[self.step % self.writes.len()];
            if take == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = take.min(len).min(pipe.len());
            self.output.extend(pipe.drain(..n));
            Ok(n)
        }
        fn read_pipe(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let pipe = self.pipe.as_mut().expect("read from no pipe");
            let n = buf.len().min(pipe.len());
            for (b, p) in buf.iter_mut().zip(pipe.drain(..n)) {
                *b = p;
            }
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
            if !matches!(next, Next::Close(_)) {
                assert_eq!(fake.piped(), 0, "the pipe is empty between calls");
            }
            let (echoed, spliced) = echo.echoed();
            assert!(spliced <= echoed && echoed as usize == fake.output.len());
        }
        next
    }

    /// A chunk size for the scripts: `EAGAIN` (0) one time in four, so
    /// that backpressure is exercised, else 1 to `max` bytes.
    fn chunk(max: usize) -> impl Strategy<Value = usize> {
        prop_oneof![1 => Just(0usize), 3 => 1..max]
    }

    /// Runs `input` through a [`Fake`] with these scripts (each given a
    /// 1 at the end, so that there is progress) and checks that it all
    /// comes back, then end of stream.
    fn echoes_exactly(
        input: Vec<u8>,
        mut reads: Vec<usize>,
        mut writes: Vec<usize>,
        buffer: usize,
        pipe: bool,
    ) -> Result<(), TestCaseError> {
        reads.push(1);
        writes.push(1);
        let mut fake = Fake::new(input.clone(), reads, writes, pipe);
        let end = run(&mut fake, buffer);
        prop_assert_eq!(end, Next::Close(Close::Done));
        prop_assert_eq!(fake.output, input);
        Ok(())
    }

    proptest! {
        /// Any byte stream, read and written in any chunking, comes back
        /// exactly, and the pending buffer never outgrows `buffer_size`.
        #[test]
        fn echo_is_exact_under_any_chunking(
            input in proptest::collection::vec(any::<u8>(), 0..20_000),
            reads in proptest::collection::vec(chunk(5_000), 1..8),
            writes in proptest::collection::vec(chunk(5_000), 1..8),
            buffer in 1usize..4096,
        ) {
            echoes_exactly(input, reads, writes, buffer, false)?;
        }

        /// The same through the pipe: large messages switch a connection to
        /// `splice`, small ones back, and whatever the chunking the bytes
        /// come back exactly, `pending` stays within `buffer_size`, and
        /// the pipe is empty whenever the worker may turn to another
        /// connection.
        #[test]
        fn echo_through_the_pipe_is_exact_under_any_chunking(
            input in proptest::collection::vec(any::<u8>(), 0..60_000),
            reads in proptest::collection::vec(chunk(12_000), 1..8),
            writes in proptest::collection::vec(chunk(12_000), 1..8),
            buffer in 512usize..16_384,
        ) {
            echoes_exactly(input, reads, writes, buffer, true)?;
        }
    }

    /// A message of `SPLICE_MIN` bytes or more sends the next one through
    /// the pipe; a smaller one sends the next back to `read`/`write`.
    #[test]
    fn large_messages_switch_to_the_pipe_and_small_ones_back() {
        let sizes = [100, 5000, 6000, 200, 300];
        let input: Vec<u8> = (0..sizes.iter().sum::<usize>()).map(|i| i as u8).collect();
        let mut fake = Fake::new(input.clone(), vec![], vec![usize::MAX], true);
        let mut echo = Echo::new();
        let mut scratch = vec![0u8; 16_384];
        let mut through_pipe = vec![];
        for size in sizes {
            fake.reads = vec![size];
            let before = echo.echoed().1;
            assert_eq!(echo.on_readable(&mut fake, &mut scratch), Next::Read);
            through_pipe.push(echo.echoed().1 > before);
        }
        // 100: read; 5000: read (the first large one); 6000: spliced;
        // 200: spliced (predicted large), then 300 by read again.
        assert_eq!(through_pipe, [false, false, true, true, false]);
        assert_eq!(fake.output, input);
        assert_eq!(echo.echoed(), (input.len() as u64, 6200));
    }

    /// Where the caller has no pipe, large messages are read and written.
    #[test]
    fn without_a_pipe_nothing_is_spliced() {
        let input = vec![7u8; 50_000];
        let mut fake = Fake::new(input.clone(), vec![8192], vec![3000, 0], false);
        assert_eq!(run(&mut fake, 16_384), Next::Close(Close::Done));
        assert_eq!(fake.output, input);
    }

    /// A socket whose byte at `mark` is TCP urgent data (`MSG_OOB`) without
    /// `SO_OOBINLINE` (echod sets it, and then `read` returns that byte in
    /// line; `splice` stops before it either way), as Linux treats it:
    /// `read` skips that byte and goes on,
    /// `splice` stops before it and, with it next, moves nothing, answering
    /// `EAGAIN` while the connection is open (`shut` false) and 0 once the
    /// client has shut its side, though bytes follow.
    struct Urgent {
        input: Vec<u8>,
        at: usize,
        mark: Option<usize>,
        shut: bool,
        pipe: std::collections::VecDeque<u8>,
        output: Vec<u8>,
    }

    impl Urgent {
        /// The bytes from `at` that one call may move: up to the mark.
        fn span(&self, len: usize) -> usize {
            let end = self
                .mark
                .filter(|&m| m >= self.at)
                .unwrap_or(self.input.len());
            len.min(end - self.at)
        }

        /// `Ok(0)` at the end of the input once shut, else `EAGAIN`.
        fn nothing(&self) -> io::Result<usize> {
            if self.shut {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    impl Io for Urgent {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.mark == Some(self.at) {
                self.at += 1;
                self.mark = None;
            }
            let n = self.span(buf.len());
            if n == 0 {
                return self.nothing();
            }
            buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn can_splice(&self) -> bool {
            true
        }
        fn splice_in(&mut self, len: usize) -> io::Result<usize> {
            let n = self.span(len);
            if n == 0 {
                return self.nothing();
            }
            self.pipe.extend(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
        fn splice_out(&mut self, len: usize) -> io::Result<usize> {
            let n = len.min(self.pipe.len());
            self.output.extend(self.pipe.drain(..n));
            Ok(n)
        }
        fn read_pipe(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.pipe.len());
            for (b, p) in buf.iter_mut().zip(self.pipe.drain(..n)) {
                *b = p;
            }
            Ok(n)
        }
    }

    /// Urgent data next in a spliced stream neither stalls the connection
    /// (`splice` answers `EAGAIN` while the socket stays readable: under
    /// level-triggered epoll the worker would spin) nor ends it (`splice`
    /// answers 0 after the client's shutdown, though bytes follow): the
    /// bytes after it come back, as they do by `read`, then end of stream.
    #[test]
    fn urgent_data_neither_stalls_nor_ends_a_spliced_stream() {
        for shut in [false, true] {
            let mut input = vec![b'x'; 8192];
            input.push(b'!');
            input.extend([b'y'; 100]);
            let mut io = Urgent {
                input,
                at: 0,
                mark: Some(8192),
                shut,
                pipe: Default::default(),
                output: vec![],
            };
            let mut echo = Echo::new();
            let mut scratch = vec![0u8; 16_384];
            // The first message, 8192 bytes by `read`, up to the mark,
            // sends the next through the pipe.
            assert_eq!(echo.on_readable(&mut io, &mut scratch), Next::Read);
            let mut next = Next::Read;
            for _ in 0..10 {
                next = echo.on_readable(&mut io, &mut scratch);
                if next != Next::Read || io.output.len() == 8292 {
                    break;
                }
            }
            let mut want = vec![b'x'; 8192];
            want.extend([b'y'; 100]);
            assert!(
                io.output == want,
                "shut = {shut}: {} bytes back",
                io.output.len()
            );
            if shut {
                assert_eq!(
                    echo.on_readable(&mut io, &mut scratch),
                    Next::Close(Close::Done)
                );
            } else {
                assert_eq!(next, Next::Read);
            }
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
