//! Whether a client took bytes of its echo since the last look, by TCP's
//! count of the bytes it acknowledged (`tcpi_bytes_acked` of `TCP_INFO`,
//! Linux 4.1).
//!
//! Runs in: prefork workers (both loops) and fork-mode connection children.
//! Owns no descriptor.
//!
//! `idle_timeout` counts from the last byte moved in either direction. A
//! connection whose echo waits for room in its socket moves nothing as far
//! as echod's own calls see until the socket reports room (`EPOLLOUT`,
//! `POLLOUT`, a send that completes), and the kernel reports room only once
//! a third of the send buffer has gone, a buffer it grows to megabytes. A
//! client that reads its echo slowly, but reads, would take longer than
//! `idle_timeout` to empty that third, and be cut with a reset (its unread
//! bytes are still queued), the rest of its echo lost. The bytes it
//! acknowledges are bytes it took: each look that finds more of them
//! counts as activity. A client that stopped reading acknowledges nothing
//! new (its window is shut), so it still goes at `idle_timeout`.

use std::os::fd::{AsFd, AsRawFd};

/// When a connection last moved a byte, in either direction: what echod
/// moved itself ([`Self::moved`]), or bytes its client took from the
/// socket, seen at a look ([`Self::look`]). `T` is the caller's clock (the
/// workers' `now_ms`, fork mode's `Instant`).
#[derive(Debug)]
pub struct Activity<T> {
    last: T,
    /// The count of acknowledged bytes at the last look; `None` before the
    /// first look and after echod moved bytes itself.
    acked: Option<u64>,
}

impl<T: Copy> Activity<T> {
    /// A connection that moved its last byte `at`; no look taken yet.
    pub const fn new(at: T) -> Activity<T> {
        Activity {
            last: at,
            acked: None,
        }
    }

    /// echod moved bytes `at`. The acknowledgements of those bytes must not
    /// count again: the next look only takes the count.
    pub fn moved(&mut self, at: T) {
        self.last = at;
        self.acked = None;
    }

    /// Looks whether the peer of `socket` acknowledged bytes since the last
    /// look, and if so counts it as activity `at`. The first look after
    /// [`Self::new`] or [`Self::moved`] only takes the count and answers
    /// false, as does a look the kernel refuses.
    pub fn look(&mut self, socket: impl AsFd, at: T) -> bool {
        let Some(now) = bytes_acked(socket) else {
            return false;
        };
        let took = self.acked.replace(now).is_some_and(|before| before != now);
        if took {
            self.last = at;
        }
        took
    }

    /// When the last byte moved.
    pub fn last(&self) -> T {
        self.last
    }
}

/// `tcpi_bytes_acked` of `socket`, or `None` if `TCP_INFO` fails.
fn bytes_acked(socket: impl AsFd) -> Option<u64> {
    // SAFETY: `tcp_info` is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is open (borrowed for the call); the kernel
    // writes at most `len` bytes into `info`, which has that size, and a
    // kernel whose `tcp_info` is shorter leaves the rest zero.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(info.tcpi_bytes_acked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// Waits until the peer of `socket` acknowledged `n` bytes or more.
    fn until_acked(socket: &TcpStream, n: u64) {
        let end = Instant::now() + Duration::from_secs(5);
        while bytes_acked(socket).unwrap_or(0) < n {
            assert!(Instant::now() < end, "{n} bytes never acknowledged");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A look sees the bytes the peer took since the one before, not those
    /// before the first look or a `forget`, and nothing when the peer took
    /// nothing.
    #[test]
    fn a_look_sees_only_bytes_taken_since_the_last() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let mut acked = Activity::new(0u64);
        let mut exchange = |server: &mut TcpStream, n: u64| {
            let mut buf = [0u8; 1000];
            server.write_all(&buf).unwrap();
            client.read_exact(&mut buf).unwrap();
            until_acked(server, n);
        };
        exchange(&mut server, 1000);
        assert!(!acked.look(&server, 1), "the first look only counts");
        assert!(!acked.look(&server, 2), "nothing was sent since");
        assert_eq!(acked.last(), 0, "a look that saw nothing moves nothing");
        exchange(&mut server, 2000);
        assert!(acked.look(&server, 3), "1000 bytes taken, not seen");
        assert_eq!(acked.last(), 3, "bytes taken are activity");
        assert!(!acked.look(&server, 4), "nothing was sent since");
        exchange(&mut server, 3000);
        acked.moved(5);
        assert!(
            !acked.look(&server, 6),
            "the first look after moved only counts"
        );
        assert_eq!(acked.last(), 5);
    }
}
