//! sd_notify: tells systemd (or any supervisor that sets `NOTIFY_SOCKET`)
//! when echod is ready, reloading and stopping, and a one-line status.
//!
//! Runs in: the master only. systemd's default `NotifyAccess=main` accepts
//! messages from the main pid alone, so children never notify: the master
//! takes `NOTIFY_SOCKET` out of the environment at start, and every child
//! drops the master's notify socket right after `fork()`.
//!
//! Owns: one unbound `AF_UNIX` datagram socket, when `NOTIFY_SOCKET` was set.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to the service manager's notification socket, or nothing.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    last_status: String,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for the abstract
    /// namespace) and removes it from the environment. A no-op notifier
    /// when the variable is absent or unusable.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        // Changing the environment is sound here: the process is
        // single-threaded (echod starts no thread), so no other thread reads
        // it concurrently.
        std::env::remove_var("NOTIFY_SOCKET");
        let path = path.to_string_lossy().into_owned();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            SocketAddr::from_pathname(&path)
        };
        match (UnixDatagram::unbound(), addr) {
            (Ok(sock), Ok(addr)) => Notifier {
                target: Some((sock, addr)),
                last_status: String::new(),
            },
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("NOTIFY_SOCKET={path}: {e}; not notifying");
                Notifier::default()
            }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1` with a status line.
    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (newer systemd's
    /// `Type=notify-reload` wants the timestamp; older ones ignore it).
    pub fn reloading(&mut self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&mut self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// `STATUS=...`, sent only when it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.last_status = status.to_string();
            self.send(&format!("STATUS={status}"));
        }
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                log::warn!("sd_notify: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_datagram_socket_and_status_is_deduplicated() {
        let dir = std::env::temp_dir().join(format!("echod-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            last_status: String::new(),
        };
        let mut buf = [0u8; 256];
        n.ready("generation 1");
        let got = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1\nSTATUS=generation 1");
        n.status("generation 1");
        n.status("generation 2");
        let got = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..got],
            b"STATUS=generation 2",
            "unchanged status not resent"
        );
        n.reloading();
        let got = rx.recv(&mut buf).unwrap();
        assert!(buf[..got].starts_with(b"RELOADING=1\nMONOTONIC_USEC="));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
