//! Raw-socket clients for tests that must see exactly what goes over the wire: one connection,
//! requests written as bytes, responses read one at a time (status, headers, body by
//! Content-Length), keeping whatever follows for the next.

use super::origin::Origin;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub fn routes(origin: &Origin, cache: bool) -> String {
    format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: {cache}\n",
        origin.addr()
    )
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// One response read off `s`: status, headers (lowercase names), body by Content-Length.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads responses off a connection, keeping bytes past the one returned.
pub struct Reader {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Reader {
    pub fn new(s: TcpStream) -> Reader {
        Reader { s, buf: Vec::new() }
    }

    pub fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    pub fn response(&mut self) -> Option<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let status = r.code.unwrap_or(0);
                let headers = super::owned_headers(r.headers);
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < n + len {
                    if !self.fill() {
                        return None;
                    }
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Some(Response {
                    status,
                    headers,
                    body,
                });
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Seconds until the peer closes (reads and drops anything sent meanwhile).
    pub fn wait_close(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        self.s.set_read_timeout(Some(limit)).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return Some(start.elapsed()),
            }
        }
    }
}

/// One request on a new connection; its response.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Response> {
    let mut s = connect(addr);
    s.write_all(request).ok()?;
    Reader::new(s).response()
}
