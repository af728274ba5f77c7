//! Listening sockets: bound by the master before any fork, inherited by
//! every worker.
//!
//! Runs in: the master (bind, re-listen, close). Workers only borrow the
//! descriptors they inherited and close them when they drain.
//!
//! Owns: one TCP listening socket per configured address. Each is
//! non-blocking, and that flag lives on the open file description, shared by
//! every process that inherits it: it is set once, here, before forking.

use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A descriptor passed by systemd is not a usable TCP listener.
    #[error("socket activation: descriptor {fd}: {reason}")]
    Activation {
        /// The descriptor number (3 and up).
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// `socket`, `setsockopt`, `bind` or `listen` failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The system's reason (e.g. address in use).
        source: std::io::Error,
    },
}

/// A bound, listening, non-blocking TCP socket.
///
/// Invariant: `local` is the address the kernel actually bound (with the
/// real port when `configured` asked for port 0).
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// The address as written in the config; reloads match on it.
    pub configured: SocketAddr,
    /// The address actually bound.
    pub local: SocketAddr,
}

impl Listener {
    /// Binds `addr` with `SO_REUSEADDR` (so a restart does not wait for old
    /// connections in `TIME_WAIT`), `IPV6_V6ONLY` on IPv6 (so `0.0.0.0:7` and
    /// `[::]:7` can both be listed, as nginx does), and listens with
    /// `backlog` (the kernel caps it at `net.core.somaxconn`).
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Listener, ListenError> {
        let err = |source| ListenError::Bind { addr, source };
        // socket2 creates the socket with SOCK_CLOEXEC: echod never execs a
        // program that should inherit it.
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true).map_err(err)?;
        }
        socket.bind(&addr.into()).map_err(err)?;
        socket.listen(backlog).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        let local = socket
            .local_addr()
            .map_err(err)?
            .as_socket()
            .ok_or_else(|| err(std::io::Error::other("bound address is not an IP address")))?;
        Ok(Listener {
            socket,
            configured: addr,
            local,
        })
    }

    /// Accepts one connection without blocking: `accept4` with
    /// `SOCK_NONBLOCK | SOCK_CLOEXEC` (one syscall; on Linux an accepted
    /// socket does not inherit the listener's `O_NONBLOCK`). Returns
    /// `WouldBlock` when the queue is empty.
    pub fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        // SAFETY: sockaddr_storage is plain old data, valid when zeroed.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the pointers refer to `storage` and `len`, which live for
        // the call, and `len` holds the size of `storage`.
        let fd = unsafe {
            libc::accept4(
                self.socket.as_raw_fd(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        Ok((stream, peer_addr(&storage)))
    }

    /// Changes the accept-queue length of a socket that stays across a
    /// reload: Linux accepts `listen()` again on a listening socket and only
    /// updates the backlog, with no moment without a listener.
    pub fn set_backlog(&self, backlog: i32) -> std::io::Result<()> {
        self.socket.listen(backlog)
    }

    /// Stops listening now, for every process that shares the socket:
    /// `shutdown(SHUT_RD)` on a listening TCP socket resets what waits in
    /// its queue and takes it out of the listening table, so the port can be
    /// bound again (with `SO_REUSEADDR`) even while some reference to the
    /// socket lives on. Closing a descriptor does not do that while another
    /// one is open: a killed worker's `io_uring` is torn down by the kernel
    /// after the process is gone, and an accept request still in it keeps
    /// the socket listening meanwhile.
    pub fn stop_listening(&self) -> std::io::Result<()> {
        self.socket.shutdown(std::net::Shutdown::Read)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Adopts the listening sockets systemd passed (socket activation), or
/// returns `None` when this process was not socket-activated.
///
/// The protocol: `LISTEN_PID` is our pid and `LISTEN_FDS` counts the
/// descriptors starting at 3. The variables are removed so that no child
/// takes them for its own. Each descriptor must be a listening TCP socket;
/// it is made non-blocking (once, for every process that inherits it) and
/// close-on-exec.
pub fn from_systemd() -> Result<Option<Vec<Listener>>, ListenError> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (true, Some(count)) = (pid_matches, count) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let bad = |reason: String| ListenError::Activation { fd, reason };
        // SAFETY: by the socket-activation protocol these descriptors were
        // opened for this process (LISTEN_PID matched) and nothing in it
        // owns them yet; each is wrapped exactly once.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        match (socket.r#type(), socket.is_listener()) {
            (Ok(Type::STREAM), Ok(true)) => {}
            (Err(e), _) | (_, Err(e)) => return Err(bad(e.to_string())),
            _ => return Err(bad("not a listening stream socket".into())),
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| bad(e.to_string()))?;
        socket.set_cloexec(true).map_err(|e| bad(e.to_string()))?;
        let local = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| bad("not a TCP/IP socket".into()))?;
        out.push(Listener {
            socket,
            configured: local,
            local,
        });
    }
    Ok(Some(out))
}

/// Reads the peer address accept4 filled in (IPv4 or IPv6; any other
/// family, impossible on a TCP socket, reads as 0.0.0.0:0).
fn peer_addr(storage: &libc::sockaddr_storage) -> SocketAddr {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for any sockaddr.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port))
        }
        _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    }
}

/// Binds every address, or none: on the first failure the sockets bound so
/// far are closed (dropped) and the error returned, so a failed reload
/// leaves nothing behind.
pub fn bind_all(addrs: &[SocketAddr], backlog: i32) -> Result<Vec<Listener>, ListenError> {
    addrs.iter().map(|&a| Listener::bind(a, backlog)).collect()
}

/// Sets the options every accepted connection gets, in every serving path
/// (both worker loops, fork mode's child):
/// - `TCP_NODELAY`: echo is latency-bound; Nagle must never hold back a
///   short echo.
/// - `SO_OOBINLINE`: TCP urgent data (`MSG_OOB`) stays in the stream, so
///   it is echoed like every other byte (RFC 862: whatever is received is
///   sent back). Without it Linux takes the urgent byte out of the stream
///   and `read` skips it; RFC 6093 advises applications that must receive
///   urgent data to set this option. (`splice` stops before an urgent byte
///   either way; see [`crate::echo`].)
///
/// Failures are ignored: the connection is served without the option.
pub fn tune_accepted(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_out_of_band_inline(true);
}

/// Whether an `accept` error used up one queued connection, so that the
/// next `accept` may succeed: `ECONNABORTED` (the client reset it while it
/// was queued), `EPERM` (a firewall rule refused it), and the network
/// errors that Linux reports on the new connection through `accept` itself
/// (accept(2), "Error handling": `EPROTO`, `ENETDOWN`, `ENOPROTOOPT`,
/// `EHOSTDOWN`, `ENONET`, `EHOSTUNREACH`, `EOPNOTSUPP`, `ENETUNREACH`).
/// Any other error (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `EINVAL` on a
/// socket that stopped listening...) leaves the queue as it was. The
/// workers and fork mode's master both go on accepting after the first
/// kind, and pause after the second.
pub fn accept_error_consumes_a_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_reports_the_real_port() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        assert_ne!(l.local.port(), 0);
        assert_eq!(l.configured.port(), 0);
    }

    #[test]
    fn a_port_in_use_names_the_address() {
        let a = Listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let e = Listener::bind(a.local, 16).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("bind {}:", a.local)),
            "{e}"
        );
    }

    #[test]
    fn accept_reports_the_peer_and_would_block_when_empty() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let l = Listener::bind(addr.parse().unwrap(), 16).unwrap();
            let e = l.accept().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            let c = TcpStream::connect(l.local).unwrap();
            let mut accepted = None;
            for _ in 0..1000 {
                match l.accept() {
                    Ok(x) => {
                        accepted = Some(x);
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            }
            let (_s, peer) = accepted.expect("connection accepted");
            assert_eq!(peer, c.local_addr().unwrap());
        }
    }

    #[test]
    fn bind_all_is_all_or_nothing() {
        let a = Listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let free = Listener::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let free_addr = free.local;
        drop(free);
        assert!(bind_all(&[free_addr, a.local], 16).is_err());
        // The first address was released again when the second failed.
        assert!(Listener::bind(free_addr, 16).is_ok());
    }
}
