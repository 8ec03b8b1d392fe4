//! Configuration: the YAML file operators write, checked once at load.
//!
//! [`Config::from_yaml`] parses the on-disk schema ([`schema`]), then validates it into the types
//! below, which are what the rest of the program uses. Every error names the key path and the
//! line (`upstreams.origin.servers[1] (line 12, column 7): ...`). Nothing here panics on input.

pub mod cluster;
pub mod listen;
pub mod live;
pub mod origin_tls;
mod schema;
mod shaping;
pub mod units;

pub use cluster::{ClusterSettings, KeepCopies, PeerSettings};
pub use listen::{CertificatePaths, KeyAt, ListenSettings, TlsListenSettings, TlsVersion};
pub use origin_tls::{CaBundle, OriginTls};
pub use shaping::{ShapingClass, ShapingSettings};

use crate::origin::breaker::BreakerConfig;
use schema::{RawConfig, RawQueryKey, RawServerEntry};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A configuration error: which key, where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `upstreams.origin.servers[1]`; empty for whole-document errors.
    pub path: String,
    /// 1-based line and column, when known.
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<document>"
        } else {
            &self.path
        };
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{path} (line {l}, column {c}): {}", self.message),
            (Some(l), None) => write!(f, "{path} (line {l}): {}", self.message),
            _ => write!(f, "{path}: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn err_at<T>(path: impl Into<String>, at: &Spanned<T>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        line: Some(at.referenced.line()),
        column: Some(at.referenced.column()),
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub listen: Vec<ListenSettings>,
    pub admin_listen: Option<SocketAddr>,
    /// `admin.token`: the bearer token every mutating admin call must carry; `None` = such
    /// calls are refused.
    pub admin_token: Option<String>,
    pub cache: CacheSettings,
    pub upstreams: BTreeMap<String, Arc<UpstreamSettings>>,
    pub routes: Vec<Arc<Route>>,
    /// `shaping`, when configured.
    pub shaping: Option<Arc<ShapingSettings>>,
    /// `cluster`: this tier's `CDN-Loop` id, and the peers it shards its cache with.
    pub cluster: ClusterSettings,
    /// What is allowed but unsafe (`upstreams.<name>.tls.verify: false`), one line each with
    /// its key path and line: logged at start and on reload, printed by `-t`.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub grace_period: Duration,
    /// On SIGTERM, how long `/readyz` answers 503 while the listeners still accept and serve,
    /// before they close and `grace_period` starts: a load balancer takes the node out first.
    pub drain_delay: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub upstream_keepalive_pool_size: usize,
    pub access_log: bool,
    pub access_log_format: crate::access_log::Format,
    /// `None` = stderr.
    pub access_log_path: Option<PathBuf>,
    pub connections: ConnectionSettings,
    /// Runs of `/` in request paths become one before routing and keying.
    pub merge_slashes: bool,
    /// Peers whose `X-Forwarded-*` fields are believed (load balancers in front).
    pub trusted_proxies: Vec<crate::shaping::identity::Cidr>,
}

/// How client connections are bounded in time, number and request size (`server.*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// An idle keep-alive connection is closed after this; zero turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// The whole request header must arrive within this (from the connection's start for its
    /// first request, from the first byte for later ones).
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// The slowest a request body may arrive on average, in bytes per second, after a grace of
    /// `body_timeout`: the whole body must be in by `body_timeout + received / body_min_rate`
    /// from its start. Zero: no bound but `body_timeout` per read.
    pub body_min_rate: u64,
    /// Longest a response write may make no progress (a client that stopped reading).
    pub send_timeout: Duration,
    /// Open client connections; `None` = derived from the file-descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Request line plus header fields, in bytes: larger is answered 431.
    pub max_header_size: usize,
    /// Request target, in bytes: longer is answered 414.
    pub max_uri_size: usize,
    /// `server.http2_max_streams`: concurrent streams per HTTP/2 connection.
    pub http2_max_streams: u32,
}

/// `server.http2_max_streams` when absent (nginx's `http2_max_concurrent_streams`).
pub const DEFAULT_HTTP2_MAX_STREAMS: u32 = 128;
/// The most `server.http2_max_streams` may be: each stream may hold a request's state and a
/// response's send buffer, so this bounds one connection's memory.
pub const MAX_HTTP2_MAX_STREAMS: u32 = 1024;

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            keepalive_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            body_min_rate: 500,
            send_timeout: Duration::from_secs(60),
            max_connections: None,
            max_header_size: 64 << 10,
            max_uri_size: 8 << 10,
            http2_max_streams: DEFAULT_HTTP2_MAX_STREAMS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub chunk_size: u64,
    pub max_object_size: u64,
    pub default_ttl: Option<Duration>,
    /// How long past expiry a cached object may be served when every origin fails.
    pub stale_if_error: Duration,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses with Last-Modified and no explicit
    /// freshness: this fraction of their age at the time (0 = off), at most `heuristic_max`.
    pub heuristic_fraction: f64,
    pub heuristic_max: Duration,
    pub max_ranges: usize,
    /// Origin transfers into the cache that may run at once; each holds at most two chunks of
    /// memory.
    pub max_concurrent_fills: usize,
    pub memory_capacity: u64,
    /// Bytes of chunks that responses in flight may hold beyond what the memory tier holds
    /// (see `cache::held`).
    pub response_budget: u64,
    /// Bytes of memory for what the cache knows about objects: metadata, hit-for-pass marks
    /// and Vary markers (see `cache::tables`).
    pub metadata_capacity: u64,
    pub disk: Option<DiskSettings>,
}

/// The per-request part of `cache.*`: how long responses stay fresh and how ranges are served,
/// not how the tiers are sized or what they admit. A request keeps the policy it started with
/// (its fills too) across a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    pub default_ttl: Option<Duration>,
    pub stale_if_error: Duration,
    pub heuristic_fraction: f64,
    pub heuristic_max: Duration,
    pub max_ranges: usize,
}

impl CacheSettings {
    pub fn policy(&self) -> CachePolicy {
        CachePolicy {
            default_ttl: self.default_ttl,
            stale_if_error: self.stale_if_error,
            heuristic_fraction: self.heuristic_fraction,
            heuristic_max: self.heuristic_max,
            max_ranges: self.max_ranges,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiskSettings {
    pub path: PathBuf,
    pub capacity: u64,
    /// Bytes of memory the disk tier's index may take (see `cache::disk`).
    pub index_capacity: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub name: String,
    /// As written; names are resolved at run time (`origin::resolve`).
    pub servers: Vec<ServerEntry>,
    pub balance: Balance,
    /// Per try: connecting, and the longest silence while reading.
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Per origin fetch: every try, backoff and resume starts within this of the fetch's start
    /// (see README, "Resilience").
    pub deadline: Duration,
    /// Slowest acceptable origin body, bytes per second of waiting on the origin, judged over
    /// each `read_timeout`; 0 = off.
    pub min_rate: u64,
    /// Most of the group ejected at once, in percent (at least one server may always be).
    pub max_ejected_percent: u32,
    /// How often the host names in `servers` are resolved again.
    pub resolve_interval: Duration,
    pub health_check: Option<HealthCheckSettings>,
    pub breaker: BreakerConfig,
    pub retry: RetrySettings,
    /// `host`: the `Host` sent to this group (fills, revalidations, pass-through, health
    /// checks); `None` = the client's. The cache key keeps the client's host.
    pub host: Option<String>,
    /// `tls`: present, the group is HTTPS.
    pub tls: Option<OriginTls>,
    /// `http2`: offer HTTP/2 by ALPN (HTTP/1.1 stays the fallback). Needs `tls`.
    pub http2: bool,
    /// The local address connections to the group leave from; `None`: the kernel's choice.
    /// Not a configuration key: the cluster's peer group leaves from this node's own address
    /// when `cluster.self` is one, so that its peers know its requests as a peer's.
    pub source: Option<std::net::IpAddr>,
}

impl UpstreamSettings {
    /// The name `server` is reached by over TLS (SNI, and what its certificate is verified
    /// against): see [`OriginTls::sni_for`]. `None` without `tls`, or for an IP server with no
    /// name configured.
    pub fn sni_for<'a>(&'a self, server: &'a ServerSpec) -> Option<&'a str> {
        self.tls
            .as_ref()?
            .sni_for(self.host.as_deref(), server.name.as_deref())
    }

    /// The host names of `servers` and their ports, each once, in the order written.
    pub fn names(&self) -> Vec<(&str, u16)> {
        let mut names: Vec<(&str, u16)> = Vec::new();
        for s in &self.servers {
            if let ServerTarget::Name { host, port } = &s.target {
                if !names.contains(&(host.as_str(), *port)) {
                    names.push((host.as_str(), *port));
                }
            }
        }
        names
    }
}

/// One entry of `servers`, as written: an address, or a host name resolved at run time (see
/// `origin::resolve`) into as many servers as it has addresses, each with the entry's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub target: ServerTarget,
    /// Relative share of traffic of each of its servers (default 1).
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServerTarget {
    /// An IP address: one server, never resolved.
    Addr(SocketAddr),
    /// A host name, lower case, as written (a trailing dot kept: the name is then not searched
    /// under resolv.conf's `search` domains), and the port.
    Name { host: String, port: u16 },
}

impl ServerTarget {
    /// `host:port` as written (an upstream's server, a cluster's peer): an IP address, or a
    /// host name (lower case) to resolve at run time; the port is required.
    pub fn parse(text: &str) -> Result<ServerTarget, String> {
        let text = text.trim();
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Ok(ServerTarget::Addr(a));
        }
        let expected = || format!("invalid address {text:?}: expected host:port");
        let (host, port) = text.rsplit_once(':').ok_or_else(expected)?;
        let port = port.parse::<u16>().map_err(|_| expected())?;
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(ServerTarget::Addr(SocketAddr::new(ip, port))),
            Err(_) if is_host_name(host) => Ok(ServerTarget::Name {
                host: host.to_ascii_lowercase(),
                port,
            }),
            Err(_) => Err(format!(
                "invalid address {text:?}: {host:?} is neither an IP address nor a host name"
            )),
        }
    }
}

impl ServerEntry {
    /// The name for TLS (SNI, verification): the host as written without a trailing dot;
    /// `None` for an IP address.
    pub fn name(&self) -> Option<&str> {
        match &self.target {
            ServerTarget::Addr(_) => None,
            ServerTarget::Name { host, .. } => Some(host.trim_end_matches('.')),
        }
    }

    /// The server this entry makes at `addr` (its own address, or one its name resolved to).
    pub fn at(&self, addr: SocketAddr) -> ServerSpec {
        ServerSpec {
            addr,
            weight: self.weight,
            name: self.name().map(str::to_string),
        }
    }
}

/// One server of a group at run time: an address, with the weight and name of the entry it
/// comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub addr: SocketAddr,
    /// Relative share of traffic (default 1).
    pub weight: u32,
    /// The host name as written (`objects.example.net` of `objects.example.net:443`), lower
    /// case; `None` for a server written as an IP address. Every address the name resolves to
    /// is reached with it (SNI, verification).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// Ketama over the cache key: one object's chunks meet the same origin.
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Tries per request, the first included.
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries allowed as a percentage of requests over a 10 s sliding window.
    pub budget_percent: u32,
}

pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);
pub const DEFAULT_MIN_RATE: u64 = 16 << 10;
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// `upstreams.NAME.resolve_interval` when absent (Envoy's `dns_refresh_rate` is 5 s; a
/// Kubernetes Service's record changes far less often than its pods' health).
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(86_400);
/// Heuristic freshness: 10% of the time since Last-Modified (RFC 9111 §4.2.2 suggests it),
/// at most a day.
pub const DEFAULT_HEURISTIC_FRACTION: f64 = 0.1;
pub const DEFAULT_HEURISTIC_MAX: Duration = Duration::from_secs(86_400);
pub const DEFAULT_RETRY: RetrySettings = RetrySettings {
    attempts: 3,
    backoff: Duration::from_millis(25),
    max_backoff: Duration::from_secs(1),
    budget_percent: 20,
};
pub const DEFAULT_BREAKER: BreakerConfig = BreakerConfig {
    failure_threshold: 5,
    open_for: Duration::from_secs(10),
    max_open_for: Duration::from_secs(300),
    half_open_probes: 1,
};

/// Which part of the query string goes into the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryKey {
    All,
    Ignore,
    Keep(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Route {
    /// `None` matches any host; `Exact("a.b")`; `Suffix(".example.com")` for `*.example.com`.
    pub host: HostMatch,
    pub path_prefix: String,
    pub upstream: Arc<UpstreamSettings>,
    pub cache: bool,
    pub query_key: QueryKey,
    /// The shaping class of this route's responses; `None` = not shaped.
    pub shaping: Option<Arc<ShapingClass>>,
    /// `parent`: the group misses will go to before `upstream` (another edgeslice tier).
    /// Parsed and checked; not used yet: misses go to `upstream`.
    pub parent: Option<Arc<UpstreamSettings>>,
    /// The route's `route` label in metrics: its host pattern and path prefix
    /// (`*.example.com/video/`, or `/video/` for any host).
    pub label: String,
    /// Its request figures, looked up on its first request (kept here so that a request finds
    /// them without a lookup; a reloaded route looks them up again).
    pub metrics: std::sync::OnceLock<Arc<crate::metrics::RouteMetrics>>,
}

impl Route {
    fn label_of(host: &HostMatch, path_prefix: &str) -> String {
        match host {
            HostMatch::Any => path_prefix.to_string(),
            HostMatch::Exact(h) => format!("{h}{path_prefix}"),
            HostMatch::Suffix(s) => format!("*{s}{path_prefix}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// Matches hosts ending with this suffix (which starts with a dot), not the bare domain.
    Suffix(String),
}

impl HostMatch {
    /// `host` is the request's host without port, lower case.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
pub const DEFAULT_MEMORY_CAPACITY: u64 = 256 << 20;
/// The smallest `cache.metadata_capacity` and `cache.disk.index_capacity`: a few hundred
/// entries.
pub const MIN_TABLE_CAPACITY: u64 = 64 << 10;

/// The default `cache.metadata_capacity`: a quarter of the memory tier, at least 1 MiB.
pub fn default_metadata_capacity(memory_capacity: u64) -> u64 {
    (memory_capacity / 4).max(1 << 20)
}

/// The default `cache.disk.index_capacity` of a disk tier of `capacity` bytes: 0.1 % of it
/// (the index of a disk full of files of about 400 KiB and up: chunks of the default size),
/// at least 16 MiB (about 20,000 small objects).
pub fn default_index_capacity(capacity: u64) -> u64 {
    (capacity / 1024).max(16 << 20)
}
/// The default `cache.response_budget`: 64 MiB, and room for at least 8 chunks.
pub fn default_response_budget(chunk_size: u64) -> u64 {
    chunk_size.saturating_mul(8).max(64 << 20)
}

pub const DEFAULT_MAX_OBJECT_SIZE: u64 = 1 << 30;
pub const DEFAULT_MAX_RANGES: usize = 16;
/// Origin transfers into the cache at once, by default: with 1 MiB chunks, at most 32 MiB of
/// fill buffers.
pub const DEFAULT_MAX_CONCURRENT_FILLS: usize = 16;
pub const MAX_CONCURRENT_FILLS_LIMIT: usize = 4096;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `edgeslice -t` prints for a file that does not load; a reload answers the same text.
pub fn error_report(file: &Path, e: &ConfigError) -> String {
    format!("edgeslice: configuration error in {}: {e}", file.display())
}

impl Config {
    /// Every upstream group the node reaches: `upstreams`, and the cluster's peer group
    /// ([`cluster::PEER_GROUP`]) when it has peers.
    pub fn upstream_groups(&self) -> impl Iterator<Item = (&String, &Arc<UpstreamSettings>)> {
        self.upstreams.iter().chain(
            self.cluster
                .peers
                .as_ref()
                .map(|p| (&p.group.name, &p.group)),
        )
    }

    /// Read and validate a config file, with the checks that need the file system
    /// ([`Config::check_paths`]): what `-t`, the start and a reload all run.
    pub fn load_checked(path: &Path) -> Result<Config, ConfigError> {
        let c = Config::load(path)?;
        c.check_paths()?;
        Ok(c)
    }

    /// Read and validate a config file; `cluster.self` from [`cluster::SELF_ENV`] when it is
    /// set (one file for every node of a StatefulSet, each naming itself from its pod name).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        let mut c = Config::from_yaml(&text)?;
        if let Some(name) = std::env::var(cluster::SELF_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            c.cluster = c.cluster.with_self(&name).map_err(|message| ConfigError {
                path: "cluster.self".into(),
                line: None,
                column: None,
                message,
            })?;
        }
        Ok(c)
    }

    /// Parse and validate YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(text)?;
        validate(raw)
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message: "the config file is empty".into(),
        });
    }
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let loc = e.location();
        // `Spanned` adds a `.value` step that operators never wrote.
        let path = path
            .replace(".value.", ".")
            .replace(".value[", "[")
            .trim_end_matches(".value")
            .trim_start_matches('.')
            .to_string();
        let mut message = e.to_string();
        // serde-saphyr renders a source snippet after the first line; keep the first line, minus
        // its own location prefix (we print ours).
        if let Some(first) = message.lines().next() {
            message = first.to_string();
        }
        if let Some(rest) = message.strip_prefix("error: ") {
            message = rest.to_string();
        }
        if let Some(idx) = message.find(": ").filter(|_| message.starts_with("line ")) {
            message = message[idx + 2..].to_string();
        }
        ConfigError {
            path,
            line: loc.map(|l| l.line()),
            column: loc.map(|l| l.column()),
            message,
        }
    })
}

fn parse_addr(path: &str, at: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    let text = at.value.trim();
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(err_at(
            path,
            at,
            format!("invalid address {text:?}: expected host:port"),
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(err_at(
            path,
            at,
            format!("invalid address {text:?}: expected host:port"),
        ));
    }
    match text.to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(a)) => Ok(a),
        Ok(None) | Err(_) => Err(err_at(
            path,
            at,
            format!("invalid address {text:?}: cannot resolve host {host:?}"),
        )),
    }
}

/// A `servers` entry: `host:port` where host is an IP address (`10.0.0.1`, `[::1]`, `::1`) or
/// a host name. A name is not resolved here: a name that does not resolve where the file is
/// checked (or not yet at start) is a down server until it does, not an error.
fn parse_server(path: &str, at: &Spanned<RawServerEntry>) -> Result<ServerEntry, ConfigError> {
    let entry = &at.value;
    if let Some(e) = &entry.error {
        return Err(err_at(path, at, e.clone()));
    }
    let target = ServerTarget::parse(&entry.address).map_err(|m| err_at(path, at, m))?;
    let weight = entry.weight.unwrap_or(1);
    if weight == 0 {
        return Err(err_at(path, at, "weight must be at least 1"));
    }
    Ok(ServerEntry { target, weight })
}

/// A DNS host name: dot-separated labels of letters, digits, `-` and `_` (1 to 63 bytes each),
/// at most 253 bytes, a trailing dot allowed.
fn is_host_name(host: &str) -> bool {
    let bare = host.strip_suffix('.').unwrap_or(host);
    !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn nonzero_size(path: &str, at: &Spanned<units::Size>) -> Result<u64, ConfigError> {
    if at.value.0 == 0 {
        return Err(err_at(path, at, "must be greater than zero"));
    }
    Ok(at.value.0)
}

/// The byte capacity of a table: at least [`MIN_TABLE_CAPACITY`].
fn table_size(path: &str, at: &Spanned<units::Size>) -> Result<u64, ConfigError> {
    if at.value.0 < MIN_TABLE_CAPACITY {
        return Err(err_at(
            path,
            at,
            format!("must be at least 64KiB (got {} bytes)", at.value.0),
        ));
    }
    Ok(at.value.0)
}

/// A duration that must not be zero, `default` when absent.
fn positive_duration(
    path: &str,
    t: &Option<Spanned<units::Dur>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match t {
        Some(v) if v.value.0.is_zero() => Err(err_at(path, v, "must be greater than zero")),
        Some(v) => Ok(v.value.0),
        None => Ok(default),
    }
}

fn connection_settings(s: &schema::RawServer) -> Result<ConnectionSettings, ConfigError> {
    let d = ConnectionSettings::default();
    let positive = |t: &Option<Spanned<units::Dur>>, key: &str, default: Duration| {
        positive_duration(&format!("server.{key}"), t, default)
    };
    // The header limits bound what one connection may make the proxy buffer; past 1 MiB
    // Pingora itself refuses the header.
    let header_size =
        |t: &Option<Spanned<units::Size>>, key: &str, min: u64, default: usize| match t {
            Some(v) if v.value.0 < min || v.value.0 > 1 << 20 => Err(err_at(
                format!("server.{key}"),
                v,
                format!("must be between {min} bytes and 1MiB"),
            )),
            Some(v) => Ok(v.value.0 as usize),
            None => Ok(default),
        };
    Ok(ConnectionSettings {
        // Zero is allowed here: no keep-alive, as nginx's `keepalive_timeout 0`.
        keepalive_timeout: s
            .keepalive_timeout
            .as_ref()
            .map(|v| v.value.0)
            .unwrap_or(d.keepalive_timeout),
        header_timeout: positive(&s.header_timeout, "header_timeout", d.header_timeout)?,
        body_timeout: positive(&s.body_timeout, "body_timeout", d.body_timeout)?,
        body_min_rate: match &s.body_min_rate {
            // Past this every upload would be cut: surely a slip of the unit.
            Some(v) if v.value.0 > 1 << 30 => {
                return Err(err_at(
                    "server.body_min_rate",
                    v,
                    "must be at most 1GiB/s (0 turns the bound off)",
                ))
            }
            Some(v) => v.value.0,
            None => d.body_min_rate,
        },
        send_timeout: positive(&s.send_timeout, "send_timeout", d.send_timeout)?,
        max_connections: match &s.max_connections {
            Some(v) if v.value == 0 => {
                return Err(err_at("server.max_connections", v, "must be at least 1"))
            }
            Some(v) => Some(v.value),
            None => None,
        },
        max_header_size: header_size(
            &s.max_header_size,
            "max_header_size",
            1024,
            d.max_header_size,
        )?,
        max_uri_size: header_size(&s.max_uri_size, "max_uri_size", 256, d.max_uri_size)?,
        http2_max_streams: match &s.http2_max_streams {
            Some(v) if v.value == 0 || v.value > MAX_HTTP2_MAX_STREAMS => {
                return Err(err_at(
                    "server.http2_max_streams",
                    v,
                    format!("must be between 1 and {MAX_HTTP2_MAX_STREAMS}"),
                ))
            }
            Some(v) => v.value,
            None => d.http2_max_streams,
        },
    })
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let s = raw.server;
    let threads = match &s.threads {
        Some(t) if t.value == 0 => return Err(err_at("server.threads", t, "must be at least 1")),
        Some(t) => t.value,
        None => 1,
    };
    let access_log_format = match &s.access_log_format {
        None => crate::access_log::Format::Text,
        Some(f) => match f.value.trim() {
            "text" => crate::access_log::Format::Text,
            "json" => crate::access_log::Format::Json,
            other => {
                return Err(err_at(
                    "server.access_log_format",
                    f,
                    format!("unknown format {other:?} (use text or json)"),
                ))
            }
        },
    };
    let connections = connection_settings(&s)?;
    let mut trusted_proxies = Vec::new();
    if let Some(list) = &s.trusted_proxies {
        for (i, block) in list.value.iter().enumerate() {
            let cidr = crate::shaping::identity::Cidr::parse(block)
                .map_err(|e| err_at(format!("server.trusted_proxies[{i}]"), list, e))?;
            trusted_proxies.push(cidr);
        }
    }
    let server = ServerSettings {
        threads,
        pid_file: s.pid_file.unwrap_or_else(|| "/tmp/edgeslice.pid".into()),
        upgrade_sock: s
            .upgrade_sock
            .unwrap_or_else(|| "/tmp/edgeslice_upgrade.sock".into()),
        error_log: s.error_log,
        user: s.user,
        group: s.group,
        grace_period: s
            .grace_period
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(0)),
        drain_delay: s.drain_delay.map(|d| d.0).unwrap_or(Duration::ZERO),
        graceful_shutdown_timeout: s
            .graceful_shutdown_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5)),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size.unwrap_or(128),
        access_log: s.access_log.unwrap_or(true),
        access_log_format,
        access_log_path: s.access_log_path.map(PathBuf::from),
        connections,
        merge_slashes: s.merge_slashes.unwrap_or(true),
        trusted_proxies,
    };

    let listen = match raw.listen {
        None => vec![ListenSettings::plain(SocketAddr::from((
            [0, 0, 0, 0],
            8080,
        )))],
        Some(list) => {
            if list.is_empty() {
                return Err(ConfigError {
                    path: "listen".into(),
                    line: None,
                    column: None,
                    message: "at least one listen address is required".into(),
                });
            }
            list.iter()
                .enumerate()
                .map(|(i, a)| listen::listen_entry(i, a))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let admin_listen = match &raw.admin {
        Some(a) => Some(parse_addr("admin.listen", &a.listen)?),
        None => None,
    };
    let admin_token = match raw.admin.as_ref().and_then(|a| a.token.as_ref()) {
        Some(t) => {
            let v = t.value.trim();
            if v.len() < 8 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err_at(
                    "admin.token",
                    t,
                    "must be at least 8 visible ASCII characters (no spaces)",
                ));
            }
            Some(v.to_string())
        }
        None => None,
    };

    let c = raw.cache;
    let chunk_size = match &c.chunk_size {
        Some(v) => nonzero_size("cache.chunk_size", v)?,
        None => DEFAULT_CHUNK_SIZE,
    };
    let max_object_size = match &c.max_object_size {
        Some(v) => nonzero_size("cache.max_object_size", v)?,
        None => DEFAULT_MAX_OBJECT_SIZE,
    };
    let max_ranges = match &c.max_ranges {
        Some(v) if v.value == 0 => return Err(err_at("cache.max_ranges", v, "must be at least 1")),
        Some(v) => v.value,
        None => DEFAULT_MAX_RANGES,
    };
    let max_concurrent_fills = match &c.max_concurrent_fills {
        Some(v) if v.value == 0 || v.value > MAX_CONCURRENT_FILLS_LIMIT => {
            return Err(err_at(
                "cache.max_concurrent_fills",
                v,
                format!("must be between 1 and {MAX_CONCURRENT_FILLS_LIMIT}"),
            ))
        }
        Some(v) => v.value,
        None => DEFAULT_MAX_CONCURRENT_FILLS,
    };
    let memory_capacity = match &c.memory {
        Some(m) => nonzero_size("cache.memory.capacity", &m.capacity)?,
        None => DEFAULT_MEMORY_CAPACITY,
    };
    let response_budget = match &c.response_budget {
        Some(v) if v.value.0 < chunk_size => {
            return Err(err_at(
                "cache.response_budget",
                v,
                format!(
                    "must be at least cache.chunk_size ({chunk_size} bytes): a response holds a chunk at a time"
                ),
            ))
        }
        Some(v) => v.value.0,
        None => default_response_budget(chunk_size),
    };
    let metadata_capacity = match &c.metadata_capacity {
        Some(v) => table_size("cache.metadata_capacity", v)?,
        None => default_metadata_capacity(memory_capacity),
    };
    let disk = match &c.disk {
        Some(d) => {
            if d.path.value.trim().is_empty() {
                return Err(err_at("cache.disk.path", &d.path, "must not be empty"));
            }
            let capacity = nonzero_size("cache.disk.capacity", &d.capacity)?;
            let index_capacity = match &d.index_capacity {
                Some(v) => table_size("cache.disk.index_capacity", v)?,
                None => default_index_capacity(capacity),
            };
            Some(DiskSettings {
                path: PathBuf::from(&d.path.value),
                capacity,
                index_capacity,
            })
        }
        None => None,
    };
    let cache = CacheSettings {
        chunk_size,
        max_object_size,
        default_ttl: c.default_ttl.map(|d| d.0).filter(|d| !d.is_zero()),
        stale_if_error: c
            .stale_if_error
            .map(|d| d.0)
            .unwrap_or(DEFAULT_STALE_IF_ERROR),
        heuristic_fraction: c
            .heuristic_fraction
            .map(|f| f.0)
            .unwrap_or(DEFAULT_HEURISTIC_FRACTION),
        heuristic_max: c
            .heuristic_max
            .map(|d| d.0)
            .unwrap_or(DEFAULT_HEURISTIC_MAX),
        max_ranges,
        max_concurrent_fills,
        memory_capacity,
        response_budget,
        metadata_capacity,
        disk,
    };

    let Some(raw_upstreams) = raw.upstreams else {
        return Err(ConfigError {
            path: "upstreams".into(),
            line: None,
            column: None,
            message: "at least one upstream group is required".into(),
        });
    };
    if raw_upstreams.value.is_empty() {
        return Err(err_at(
            "upstreams",
            &raw_upstreams,
            "at least one upstream group is required",
        ));
    }
    let mut upstreams = BTreeMap::new();
    let mut warnings = Vec::new();
    for (name, u) in &raw_upstreams.value {
        let base = format!("upstreams.{name}");
        if name == cluster::PEER_GROUP {
            return Err(err_at(
                base,
                &u.servers,
                "this name is the cluster's peer group: choose another",
            ));
        }
        if u.servers.value.is_empty() {
            return Err(err_at(
                format!("{base}.servers"),
                &u.servers,
                "the server list is empty",
            ));
        }
        let servers = u
            .servers
            .value
            .iter()
            .enumerate()
            .map(|(i, s)| parse_server(&format!("{base}.servers[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let positive = |t: &Option<Spanned<units::Dur>>, key: &str, default| {
            positive_duration(&format!("{base}.{key}"), t, default)
        };
        let at_least_one = |t: &Option<Spanned<u32>>, key: &str, default: u32| match t {
            Some(v) if v.value == 0 => {
                Err(err_at(format!("{base}.{key}"), v, "must be at least 1"))
            }
            Some(v) => Ok(v.value),
            None => Ok(default),
        };
        let connect_timeout = positive(
            &u.connect_timeout,
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let read_timeout = positive(&u.read_timeout, "read_timeout", DEFAULT_READ_TIMEOUT)?;
        let deadline = positive(&u.deadline, "deadline", DEFAULT_DEADLINE)?;
        let resolve_interval = positive(
            &u.resolve_interval,
            "resolve_interval",
            DEFAULT_RESOLVE_INTERVAL,
        )?;
        let balance = match &u.balance {
            None => Balance::RoundRobin,
            Some(b) => match b.value.as_str() {
                "round_robin" => Balance::RoundRobin,
                "consistent_hash" => Balance::ConsistentHash,
                other => {
                    return Err(err_at(
                        format!("{base}.balance"),
                        b,
                        format!("unknown balance {other:?} (use round_robin or consistent_hash)"),
                    ))
                }
            },
        };
        let health_check = match &u.health_check {
            None => None,
            Some(h) => {
                let path = match &h.path {
                    Some(p) if !p.value.starts_with('/') => {
                        return Err(err_at(
                            format!("{base}.health_check.path"),
                            p,
                            "must start with `/`",
                        ))
                    }
                    Some(p) => p.value.clone(),
                    None => "/".into(),
                };
                Some(HealthCheckSettings {
                    path,
                    interval: positive(
                        &h.interval,
                        "health_check.interval",
                        Duration::from_secs(5),
                    )?,
                    timeout: positive(&h.timeout, "health_check.timeout", Duration::from_secs(1))?,
                    healthy_after: at_least_one(&h.healthy_after, "health_check.healthy_after", 2)?,
                    unhealthy_after: at_least_one(
                        &h.unhealthy_after,
                        "health_check.unhealthy_after",
                        3,
                    )?,
                })
            }
        };
        let min_rate = u.min_rate.as_ref().map_or(DEFAULT_MIN_RATE, |r| r.value.0);
        let max_ejected_percent = match u
            .circuit_breaker
            .as_ref()
            .and_then(|b| b.max_ejected_percent.as_ref())
        {
            Some(p) if p.value > 100 => {
                return Err(err_at(
                    format!("{base}.circuit_breaker.max_ejected_percent"),
                    p,
                    "a percentage: 0 to 100",
                ))
            }
            Some(p) => p.value,
            None => DEFAULT_MAX_EJECTED_PERCENT,
        };
        let breaker = match &u.circuit_breaker {
            None => DEFAULT_BREAKER,
            Some(b) => {
                let open_for = positive(
                    &b.open_for,
                    "circuit_breaker.open_for",
                    DEFAULT_BREAKER.open_for,
                )?;
                let max_open_for = positive(
                    &b.max_open_for,
                    "circuit_breaker.max_open_for",
                    DEFAULT_BREAKER.max_open_for.max(open_for),
                )?;
                if max_open_for < open_for {
                    if let Some(m) = &b.max_open_for {
                        return Err(err_at(
                            format!("{base}.circuit_breaker.max_open_for"),
                            m,
                            "must not be shorter than open_for",
                        ));
                    }
                }
                BreakerConfig {
                    failure_threshold: at_least_one(
                        &b.failure_threshold,
                        "circuit_breaker.failure_threshold",
                        DEFAULT_BREAKER.failure_threshold,
                    )?,
                    open_for,
                    max_open_for,
                    half_open_probes: at_least_one(
                        &b.half_open_probes,
                        "circuit_breaker.half_open_probes",
                        DEFAULT_BREAKER.half_open_probes,
                    )?,
                }
            }
        };
        let retry = match &u.retry {
            None => DEFAULT_RETRY,
            Some(r) => {
                let backoff = match &r.backoff {
                    Some(b) => b.value.0,
                    None => DEFAULT_RETRY.backoff,
                };
                let max_backoff = match &r.max_backoff {
                    Some(m) if m.value.0 < backoff => {
                        return Err(err_at(
                            format!("{base}.retry.max_backoff"),
                            m,
                            "must not be shorter than backoff",
                        ))
                    }
                    Some(m) => m.value.0,
                    None => DEFAULT_RETRY.max_backoff.max(backoff),
                };
                let budget_percent = match &r.budget {
                    Some(b) if b.value > 100 => {
                        return Err(err_at(
                            format!("{base}.retry.budget"),
                            b,
                            "a percentage: 0 to 100",
                        ))
                    }
                    Some(b) => b.value,
                    None => DEFAULT_RETRY.budget_percent,
                };
                RetrySettings {
                    attempts: at_least_one(&r.attempts, "retry.attempts", DEFAULT_RETRY.attempts)?,
                    backoff,
                    max_backoff,
                    budget_percent,
                }
            }
        };
        let host = u
            .host
            .as_ref()
            .map(|h| origin_tls::validate_host(&base, h))
            .transpose()?;
        let tls = u
            .tls
            .as_ref()
            .map(|t| origin_tls::validate(&base, t))
            .transpose()?;
        if let Some(v) = u
            .tls
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .and_then(|t| t.verify.as_ref())
        {
            if !v.value {
                warnings.push(format!(
                    "{base}.tls.verify (line {}): false: the certificates of this group's servers are not verified; anyone on the path can impersonate them",
                    v.referenced.line()
                ));
            }
        }
        let http2 = match &u.http2 {
            Some(h) if h.value && tls.is_none() => {
                return Err(err_at(
                    format!("{base}.http2"),
                    h,
                    "HTTP/2 to a group is negotiated by TLS (ALPN): it needs `tls`",
                ))
            }
            Some(h) => h.value,
            None => false,
        };
        upstreams.insert(
            name.clone(),
            Arc::new(UpstreamSettings {
                name: name.clone(),
                servers,
                balance,
                connect_timeout,
                read_timeout,
                deadline,
                min_rate,
                max_ejected_percent,
                resolve_interval,
                health_check,
                breaker,
                retry,
                host,
                tls,
                http2,
                source: None,
            }),
        );
    }

    let Some(raw_routes) = raw.routes else {
        return Err(ConfigError {
            path: "routes".into(),
            line: None,
            column: None,
            message: "at least one route is required".into(),
        });
    };
    if raw_routes.value.is_empty() {
        return Err(err_at(
            "routes",
            &raw_routes,
            "at least one route is required",
        ));
    }
    let shaping = raw.shaping.as_ref().map(shaping::validate).transpose()?;
    let cluster = match &raw.cluster {
        Some(c) => cluster::validate(c, chunk_size)?,
        None => ClusterSettings::default(),
    };
    let s_merge_slashes = server.merge_slashes;
    let mut routes = Vec::new();
    for (i, r) in raw_routes.value.iter().enumerate() {
        let base = format!("routes[{i}]");
        let upstream = upstreams.get(&r.upstream.value).cloned().ok_or_else(|| {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            err_at(
                format!("{base}.upstream"),
                &r.upstream,
                format!(
                    "unknown upstream {:?} (defined: {})",
                    r.upstream.value,
                    known.join(", ")
                ),
            )
        })?;
        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => {
                let v = h.value.trim().to_ascii_lowercase();
                if v.is_empty() || v == "*" {
                    HostMatch::Any
                } else if let Some(rest) = v.strip_prefix("*.") {
                    if rest.is_empty() || rest.contains('*') {
                        return Err(err_at(format!("{base}.host"), h, "invalid wildcard host"));
                    }
                    HostMatch::Suffix(format!(".{rest}"))
                } else if v.contains('*') {
                    return Err(err_at(
                        format!("{base}.host"),
                        h,
                        "only a leading wildcard is supported (`*.example.com`)",
                    ));
                } else {
                    // Requests are matched by their canonical host name: a route's is written
                    // the same way (no trailing dot, no port).
                    match crate::proxy::canonical::host(v.as_bytes(), &[]) {
                        Ok(c) if c.port.is_none() => HostMatch::Exact(c.name),
                        _ => {
                            return Err(err_at(
                                format!("{base}.host"),
                                h,
                                format!("invalid host {v:?}: a host name, without a port"),
                            ))
                        }
                    }
                }
            }
        };
        let path_prefix = match &r.path_prefix {
            None => "/".to_string(),
            Some(p) if !p.value.starts_with('/') => {
                return Err(err_at(
                    format!("{base}.path_prefix"),
                    p,
                    "must start with `/`",
                ))
            }
            Some(p) => {
                // Requests are routed by their canonical path, so a prefix in another spelling
                // (`/a/../b/`, `/%62/`, `//b/`) would never match.
                let merge = s_merge_slashes;
                match crate::proxy::canonical::path(p.value.as_bytes(), merge) {
                    Ok(c) if c == p.value.as_str() => p.value.clone(),
                    Ok(c) => {
                        return Err(err_at(
                            format!("{base}.path_prefix"),
                            p,
                            format!(
                                "{:?} is not in canonical form (requests are routed by their normalised path): write {c:?}",
                                p.value
                            ),
                        ))
                    }
                    Err(_) => {
                        return Err(err_at(
                            format!("{base}.path_prefix"),
                            p,
                            "malformed percent-escape or NUL",
                        ))
                    }
                }
            }
        };
        let query_key = match &r.cache_key {
            None => QueryKey::All,
            Some(k) => match &k.query.value {
                RawQueryKey::All => QueryKey::All,
                RawQueryKey::Ignore => QueryKey::Ignore,
                RawQueryKey::Keep(names) => {
                    let mut names = names.clone();
                    names.sort();
                    names.dedup();
                    QueryKey::Keep(names)
                }
            },
        };
        let route_shaping = match &r.shaping {
            None => None,
            Some(name) => {
                let class = shaping
                    .as_ref()
                    .and_then(|s| s.classes.get(name.value.trim()))
                    .cloned();
                let Some(class) = class else {
                    let known: Vec<&str> = shaping
                        .as_ref()
                        .map(|s| s.classes.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return Err(err_at(
                        format!("{base}.shaping"),
                        name,
                        format!(
                            "unknown shaping class {:?} (defined under shaping.classes: {})",
                            name.value,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                };
                Some(class)
            }
        };
        let parent = match &r.parent {
            None => None,
            Some(p) => {
                let name = p.value.trim();
                let Some(group) = upstreams.get(name).cloned() else {
                    let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                    return Err(err_at(
                        format!("{base}.parent"),
                        p,
                        format!("unknown upstream {name:?} (defined: {})", known.join(", ")),
                    ));
                };
                if group.name == upstream.name {
                    return Err(err_at(
                        format!("{base}.parent"),
                        p,
                        format!(
                            "{name:?} is the route's own upstream: a parent is another tier, tried before `upstream`"
                        ),
                    ));
                }
                Some(group)
            }
        };
        routes.push(Arc::new(Route {
            label: Route::label_of(&host, &path_prefix),
            metrics: Default::default(),
            host,
            path_prefix,
            upstream,
            cache: r.cache.unwrap_or(true),
            query_key,
            shaping: route_shaping,
            parent,
        }));
    }

    Ok(Config {
        server,
        listen,
        admin_listen,
        admin_token,
        cache,
        upstreams,
        routes,
        shaping: shaping.map(Arc::new),
        cluster,
        warnings,
    })
}

impl Config {
    /// Checks that need the file system, for `-t` and before starting: the disk tier's
    /// directory must be absent, empty, or one edgeslice marked as its own.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        if let Some(d) = &self.cache.disk {
            crate::cache::disk::check_dir(&d.path).map_err(|message| ConfigError {
                path: "cache.disk.path".into(),
                line: None,
                column: None,
                message,
            })?;
        }
        Ok(())
    }

    /// The first route matching `host` (without port, any case) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        // Callers pass the request's host already in lower case: no copy then.
        let host: std::borrow::Cow<str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        self.routes
            .iter()
            .find(|r| r.host.matches(&host) && path.starts_with(r.path_prefix.as_str()))
    }
}

#[cfg(test)]
mod tests;
