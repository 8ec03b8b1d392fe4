//! The real `edgeslice` binary on addresses the test chooses (any loopback address, e.g.
//! `127.0.0.12`), for clusters whose config must name every node before any starts: a peer list
//! holds the others' `host:port`, so the ports are picked for all nodes first
//! ([`free_addrs`]) and a start does not retry on new ports as [`super::proxy::Proxy`] does.
//! Stopped (SIGKILL) on drop, so also when the test panics.

use super::proxy::{healthy, listens_on};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// `n` distinct free ports on `ip`, held at once while picked (then released for the nodes).
pub fn free_addrs(ip: Ipv4Addr, n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).expect("bind port 0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr"))
        .collect()
}

impl Node {
    /// Start with its listener on `addr` and its admin listener on `admin`; `yaml` holds
    /// everything but `server`, `listen` and `admin`, with `{DIR}` replaced by the node's
    /// private temporary directory. Waits (at most 20 s) for `/healthz` and both listeners.
    pub fn start(addr: SocketAddr, admin: SocketAddr, yaml: &str) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let d = dir.display();
        let full = format!(
            "server:\n  threads: 2\n  pid_file: {d}/edgeslice.pid\n  upgrade_sock: {d}/upgrade.sock\n  graceful_shutdown_timeout: 1s\nlisten:\n  - {addr}\nadmin:\n  listen: {admin}\n{}",
            yaml.replace("{DIR}", &d.to_string())
        );
        let conf = dir.join("edgeslice.yaml");
        std::fs::write(&conf, &full).expect("write config");
        let log = std::fs::File::create(dir.join("edgeslice.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_edgeslice"))
            .arg("-c")
            .arg(&conf)
            .env(
                "RUST_LOG",
                std::env::var("EDGESLICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log)
            .spawn()
            .expect("spawn edgeslice");
        let mut n = Node {
            child: Some(child),
            addr,
            admin,
            dir,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = n.child.as_mut().map(|c| c.try_wait()) {
                panic!("edgeslice on {addr} exited ({status}); log:\n{}", n.log());
            }
            let pid = n.pid();
            if healthy(admin) && listens_on(pid, admin) && listens_on(pid, addr) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        n.kill();
        panic!("edgeslice on {addr} did not start; log:\n{}", n.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("edgeslice.log")).unwrap_or_default()
    }

    /// The admin endpoint's `GET /metrics` text; empty when the node does not answer.
    pub async fn metrics(&self) -> String {
        let Ok(resp) = super::client()
            .get(format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return String::new();
        };
        resp.text().await.unwrap_or_default()
    }

    /// SIGKILL, no goodbye: what a crash or an OOM kill looks like.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sum of the samples of metric `name` (Prometheus text format) whose labels include every
/// `(label, value)` of `labels`; `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.rfind('}') else { continue };
            (&r[..end], r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue; // another metric whose name starts with this one
        };
        let have = parse_labels(label_text);
        if labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        {
            let v: f64 = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// `k="v",k2="v2"` → pairs (escapes `\"`, `\\`, `\n` undone).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => break,
                },
                o => value.push(o),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}
