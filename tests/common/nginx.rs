//! A real nginx (Debian `nginx-light`) serving a temporary docroot as a static origin on a free
//! loopback port: what the proxy meets in production (sendfile, ETag + Last-Modified, ranges).
//! Origin traffic is counted from nginx's own access log. Stopped (SIGKILL) on drop.
//!
//! A test that needs nginx fails when the binary is missing (CI installs it): it never skips.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// The TLS side of an HTTPS nginx origin: its certificate and whether it offers HTTP/2.
#[derive(Debug, Clone)]
pub struct TlsOrigin {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub http2: bool,
    /// `keepalive_requests` of the server: `Some(1)` closes every connection after one
    /// request, so each request needs a new TLS handshake (full or resumed).
    pub keepalive_requests: Option<u32>,
}

/// One request as the TLS server logged it.
#[derive(Debug, Clone)]
pub struct TlsAccess {
    /// nginx's connection serial number: requests on one connection share it.
    pub connection: u64,
    /// The TLS session was resumed (`$ssl_session_reused` = `r`).
    pub session_reused: bool,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    pub method: String,
    /// `$host`: the Host header (or :authority) the request carried.
    pub host: String,
    /// `$ssl_server_name`: the SNI the client sent (empty for none).
    pub sni: String,
    pub user_agent: String,
    pub status: u16,
}

/// One line of the access log.
#[derive(Debug, Clone)]
pub struct Access {
    pub status: u16,
    pub body_bytes: u64,
    pub range: String,
}

/// The nginx binary: `nginx` on PATH, else Debian's `/usr/sbin/nginx`.
fn nginx_binary() -> PathBuf {
    for p in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nginx")
}

impl Nginx {
    pub fn start() -> Nginx {
        Nginx::start_with("")
    }

    /// As [`Nginx::start`], with `http_extra` (directives, e.g. `gzip on;`) in the `http` block.
    pub fn start_with(http_extra: &str) -> Nginx {
        Nginx::start_server(http_extra, None)
    }

    /// An HTTPS origin: the server block listens with TLS only (`ssl`, and `http2` when
    /// `tls.http2`), with `tls.cert` and `tls.key`. Besides the counted log, every request is
    /// logged with its connection, TLS session reuse, `$host` and SNI ([`Nginx::tls_accesses`]).
    pub fn start_tls(tls: &TlsOrigin) -> Nginx {
        Nginx::start_server("", Some(tls))
    }

    fn start_server(http_extra: &str, tls: Option<&TlsOrigin>) -> Nginx {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("root")).expect("docroot");
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx temp dir");
        let bin = nginx_binary();
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = super::proxy::free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let d = dir.display();
            let server_tls = match tls {
                None => String::new(),
                Some(t) => format!(
                    "    ssl_certificate {};\n    ssl_certificate_key {};\n    \
                     ssl_session_cache shared:tls:1m;\n    ssl_session_tickets on;\n    \
                     access_log {d}/tls.log detailed;\n{}",
                    t.cert.display(),
                    t.key.display(),
                    t.keepalive_requests
                        .map(|n| format!("    keepalive_requests {n};\n"))
                        .unwrap_or_default()
                ),
            };
            let listen_opts = match tls {
                None => "",
                Some(t) if t.http2 => " ssl http2",
                Some(_) => " ssl",
            };
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
                 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  \
                 scgi_temp_path {d}/tmp/scgi;\n  \
                 log_format counted '$status $body_bytes_sent \"$http_range\"';\n  \
                 log_format detailed '$connection $ssl_session_reused $server_protocol \
                 $request_method \"$host\" \"$ssl_server_name\" \"$http_user_agent\" $status';\n  \
                 access_log {d}/access.log counted;\n  sendfile on;\n  tcp_nopush on;\n  \
                 etag on;\n  keepalive_requests 100000;\n  keepalive_timeout 60s;\n  \
                 default_type application/octet-stream;\n  {http_extra}\n  \
                 server {{\n    listen 127.0.0.1:{port}{listen_opts};\n    root {d}/root;\n\
                 {server_tls}    access_log {d}/access.log counted;\n  }}\n}}\n"
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let log = std::fs::File::create(dir.join("stderr.log")).expect("nginx stderr log");
            let child = Command::new(&bin)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {} ({e}): install nginx-light (apt-get install nginx-light)",
                        bin.display()
                    )
                });
            let mut n = Nginx {
                child: Some(child),
                addr,
                dir: dir.clone(),
                _tmp: None,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(Ok(Some(_))) = n.child.as_mut().map(|c| c.try_wait()) {
                    break; // exited: most likely lost the port race
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    n._tmp = Some(tmp);
                    return n;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_err = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                + &std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            n.kill();
        }
        panic!("nginx did not start; error log:\n{last_err}");
    }

    /// Write `size` deterministic bytes at `path` (e.g. `/big.bin`) under the docroot; returns
    /// the content.
    pub fn put_file(&self, path: &str, size: usize) -> Vec<u8> {
        let data = content(path, size);
        self.put_bytes(path, &data);
        data
    }

    /// Write `data` at `path` under the docroot.
    pub fn put_bytes(&self, path: &str, data: &[u8]) {
        let file = self.dir.join("root").join(path.trim_start_matches('/'));
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).expect("docroot dir");
        }
        std::fs::write(&file, data).expect("write docroot file");
    }

    /// Make the file at `path` look `age` old (its Last-Modified), as files on a real origin
    /// usually are: heuristic freshness (RFC 9111 §4.2.2) counts from it.
    pub fn age_file(&self, path: &str, age: Duration) {
        let file = self.dir.join("root").join(path.trim_start_matches('/'));
        let f = std::fs::File::options()
            .write(true)
            .open(&file)
            .expect("docroot file");
        f.set_modified(std::time::SystemTime::now() - age)
            .expect("set mtime");
    }

    /// Every request logged so far (nginx writes a line when the response is done).
    pub fn accesses(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some(Access {
                    status: it.next()?.parse().ok()?,
                    body_bytes: it.next()?.parse().ok()?,
                    range: it.next()?.trim_matches('"').to_string(),
                })
            })
            .collect()
    }

    /// Every request the TLS server logged so far (see [`Nginx::start_tls`]).
    pub fn tls_accesses(&self) -> Vec<TlsAccess> {
        let text = std::fs::read_to_string(self.dir.join("tls.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let q: Vec<&str> = l.split('"').collect();
                // conn reused proto method "host" "sni" "ua" status
                if q.len() < 7 {
                    return None;
                }
                let head: Vec<&str> = q[0].split_whitespace().collect();
                Some(TlsAccess {
                    connection: head.first()?.parse().ok()?,
                    session_reused: *head.get(1)? == "r",
                    protocol: head.get(2)?.to_string(),
                    method: head.get(3)?.to_string(),
                    host: q[1].to_string(),
                    sni: q[3].to_string(),
                    user_agent: q[5].to_string(),
                    status: q[6].trim().parse().ok()?,
                })
            })
            .collect()
    }

    /// nginx's error log (at `info`: it says why a request was refused).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Body bytes nginx sent, over every logged request.
    pub fn body_bytes_sent(&self) -> u64 {
        self.accesses().iter().map(|a| a.body_bytes).sum()
    }

    pub fn requests(&self) -> usize {
        self.accesses().len()
    }

    /// Wait until the access log stops growing for a moment (responses still streaming when a
    /// client finished are logged when nginx completes them), within `limit`.
    pub fn settle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = (usize::MAX, u64::MAX);
        while Instant::now() < deadline {
            let now = (self.requests(), self.body_bytes_sent());
            if now == last {
                return;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The deterministic content of a file: a xorshift stream seeded by the path, so no two offsets
/// (and no two files) look alike.
pub fn content(path: &str, size: usize) -> Vec<u8> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in path.bytes() {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = Vec::with_capacity(size + 8);
    let mut x = seed | 1;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}
