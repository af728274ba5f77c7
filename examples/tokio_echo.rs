//! The reference server of `make bench`: the usual tokio echo server.
//!
//! Runs in: its own process, started by `scripts/bench.sh`; never part of
//! echod. A multi-thread runtime (one worker thread per CPU), one task per
//! connection, `read` then `write_all` through an 8 KiB buffer, `TCP_NODELAY`
//! on every accepted socket. Owns the listener and the accepted sockets; no
//! signals handled (it is killed by PID).
//!
//! Usage: `tokio_echo [ADDR]` (default `127.0.0.1:0`). Prints
//! `listening on ADDR` with the bound address on stdout and stderr.

use std::io::Write;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo(mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        sock.write_all(&buf[..n]).await?;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    std::io::stdout().flush()?;
    eprintln!("listening on {local}");
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(conn) => conn,
            // EMFILE and friends: keep serving the connections we have.
            Err(e) => {
                eprintln!("accept: {e}");
                // No tokio timer (the `time` feature is off): pause on the
                // blocking pool rather than spin on the error.
                let pause = || std::thread::sleep(std::time::Duration::from_millis(10));
                let _ = tokio::task::spawn_blocking(pause).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let _ = echo(sock).await;
        });
    }
}
