//! A TCP relay in front of an upstream: it counts what it forwards and can hold every piece of
//! bytes for a fixed delay in each direction, which puts an origin "20 ms away" on a kernel
//! without `sch_netem`. The delay is latency, not a rate limit: pieces are pipelined, each
//! written when its own delay is over.
//!
//! Counted: bytes forwarded upstream → client (response bytes, heads included), and the
//! requests sent client → upstream (each request head ends with an empty line; the requests a
//! cache sends have no bodies, so the count is exact for them). Everything runs on the test's
//! runtime and stops when the [`Relay`] is dropped (its connections with it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

#[derive(Default)]
struct Counts {
    /// Bytes written to clients (upstream → client).
    down: AtomicU64,
    /// Bytes written to the upstream (client → upstream).
    up: AtomicU64,
    /// Request heads seen client → upstream (`\r\n\r\n` sequences).
    requests: AtomicU64,
    connections: AtomicU64,
}

pub struct Relay {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listen on `bind` (e.g. `127.0.0.1:0`) and forward each connection to `upstream`, every
    /// piece of bytes held `delay` in each direction (zero: forwarded at once).
    pub async fn start(bind: &str, upstream: SocketAddr, delay: Duration) -> Relay {
        let listener = TcpListener::bind(bind).await.expect("relay bind");
        let addr = listener.local_addr().expect("relay addr");
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let accept = tokio::spawn(async move {
            // Owned by this task: aborting it drops the set, which aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(relay_one(client, upstream, delay, c.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Relay {
            addr,
            counts,
            accept,
        }
    }

    /// Bytes forwarded upstream → clients so far (heads and bodies).
    pub fn down_bytes(&self) -> u64 {
        self.counts.down.load(Ordering::Relaxed)
    }

    /// Bytes forwarded clients → upstream so far.
    pub fn up_bytes(&self) -> u64 {
        self.counts.up.load(Ordering::Relaxed)
    }

    /// Request heads forwarded clients → upstream so far.
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Relaxed)
    }

    /// Wait until nothing has been forwarded for `quiet`, within `limit`.
    pub async fn settle(&self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = (u64::MAX, u64::MAX);
        while Instant::now() < deadline {
            let now = (self.down_bytes(), self.up_bytes());
            if now == last {
                return;
            }
            last = now;
            tokio::time::sleep(quiet).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay_one(client: TcpStream, upstream: SocketAddr, delay: Duration, c: Arc<Counts>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees its connection closed, as with a refusal further on
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        pipe(cr, sw, delay, c.clone(), Direction::Up),
        pipe(sr, cw, delay, c, Direction::Down),
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Up,
    Down,
}

/// Copy `r` to `w`, each piece held `delay`; counts as it writes; half-closes `w` at the end.
async fn pipe(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    delay: Duration,
    c: Arc<Counts>,
    dir: Direction,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let counts = c.clone();
    let reader = async move {
        // The last three bytes of the previous piece, so a head end split across reads counts.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            if dir == Direction::Up {
                let mut seen = tail.clone();
                seen.extend_from_slice(&buf);
                let heads = seen.windows(4).filter(|w| *w == b"\r\n\r\n").count();
                counts.requests.fetch_add(heads as u64, Ordering::Relaxed);
                tail = seen[seen.len().saturating_sub(3)..].to_vec();
            }
            if tx.send((Instant::now() + delay, buf)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, piece)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&piece).await.is_err() {
                return;
            }
            let n = piece.len() as u64;
            match dir {
                Direction::Up => c.up.fetch_add(n, Ordering::Relaxed),
                Direction::Down => c.down.fetch_add(n, Ordering::Relaxed),
            };
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
