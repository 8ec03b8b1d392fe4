//! Prometheus metrics: one [`Registry`] made at start and passed in (no globals), rendered on
//! the admin listener's `GET /metrics` in the text format.
//!
//! Two kinds of figures:
//! - counted where they happen, through handles looked up once and kept where the work is
//!   (a route's [`RouteMetrics`], an upstream's [`UpstreamMetrics`]), so a request pays an
//!   atomic add per figure, never a label lookup or a lock;
//! - read when scraped ([`Pulled`]): occupancy, connections, shaping, and the counters other
//!   modules keep as plain atomics (also shown by `/stats`), so nothing is counted twice.
//!
//! Label values are bounded by the configuration: routes, upstreams, servers, methods folded to
//! a fixed set, status classes, cache results. Never a URL or a client address.

use crate::conn::Protocol;
use crate::origin::breaker::{Breaker, BreakerState};
use crate::origin::outcome::FailureClass;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Where a cache fill went, as a label (`to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillTarget {
    /// The shard's owner, another node of the cluster.
    Peer,
    /// The route's parent tier.
    Parent,
    /// The route's upstream.
    Origin,
}

impl FillTarget {
    pub const ALL: [FillTarget; 3] = [FillTarget::Peer, FillTarget::Parent, FillTarget::Origin];

    pub fn label(self) -> &'static str {
        match self {
            FillTarget::Peer => "peer",
            FillTarget::Parent => "parent",
            FillTarget::Origin => "origin",
        }
    }
}

/// `edgeslice_fill_requests_total` and `edgeslice_fill_bytes_total`, by [`FillTarget`].
pub struct FillMetrics {
    requests: [IntCounter; 3],
    bytes: [IntCounter; 3],
}

impl FillMetrics {
    pub fn requests(&self, to: FillTarget) -> &IntCounter {
        &self.requests[to as usize]
    }

    pub fn bytes(&self, to: FillTarget) -> &IntCounter {
        &self.bytes[to as usize]
    }
}

/// What the cache did for a request, as a label (`cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache, fresh.
    Hit,
    /// Served from the cache, expired (stale-if-error, stale-while-revalidate, max-stale).
    Stale,
    /// Expired or asked to revalidate, and the origin said 304.
    Revalidated,
    /// Fresh metadata, some chunks fetched.
    Partial,
    /// Fetched from the origin (stored, relayed, or failed).
    Miss,
    /// Not cacheable or the request forbade the cache: passed through.
    Pass,
    /// The cache was not involved (uncached route, other method, refused request).
    None,
}

impl CacheResult {
    pub const ALL: [CacheResult; 7] = [
        CacheResult::Hit,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Partial,
        CacheResult::Miss,
        CacheResult::Pass,
        CacheResult::None,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Stale => "stale",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Partial => "partial",
            CacheResult::Miss => "miss",
            CacheResult::Pass => "pass",
            CacheResult::None => "none",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a client made its request fail (`edgeslice_client_errors_total{kind}`). Never the
/// origin's fault, never logged above debug: any client could otherwise flood the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// It closed or reset the connection before the exchange was over (an aborted upload or
    /// download).
    Closed,
    /// Its body came too slowly (`body_timeout`, `body_min_rate`), or it stopped reading
    /// (`send_timeout`).
    Timeout,
    /// Its request could not be understood: bad chunked framing, a bad request line or target.
    Malformed,
    /// Its header was over `max_uri_size` or `max_header_size` once parsed.
    TooLarge,
}

impl ClientFault {
    pub const ALL: [ClientFault; 4] = [
        ClientFault::Closed,
        ClientFault::Timeout,
        ClientFault::Malformed,
        ClientFault::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ClientFault::Closed => "closed",
            ClientFault::Timeout => "timeout",
            ClientFault::Malformed => "malformed",
            ClientFault::TooLarge => "too_large",
        }
    }
}

/// Methods as a label: the registered ones, everything else `other` (a client must not be able
/// to mint label values).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "other",
];
/// Status classes as a label; `none` when no response was written (the client left first).
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

fn method_index(m: &http::Method) -> usize {
    METHODS
        .iter()
        .position(|n| *n == m.as_str())
        .unwrap_or(METHODS.len() - 1)
}

fn status_index(status: u16) -> usize {
    match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => STATUS_CLASSES.len() - 1,
    }
}

/// Latency buckets (seconds): from a memory hit (~100 µs) to a long download.
const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

/// The registry and the families counted on the data path.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    response_bytes: IntCounterVec,
    origin_requests: IntCounterVec,
    origin_bytes: IntCounterVec,
    origin_retries: IntCounterVec,
    origin_resumes: IntCounterVec,
    breaker_transitions: IntCounterVec,
    resolve_failures: IntCounterVec,
    /// Every origin server's figures, once per (upstream, server): a pool rebuilt by a reload or
    /// a re-resolution shares them, and the last one to go takes its series with it.
    servers: Arc<Mutex<ServerTable>>,
    admin_calls: IntCounterVec,
    purged: IntCounterVec,
    reloads: IntCounterVec,
    /// Requests that failed through their client's doing, by [`ClientFault`].
    client_errors: [IntCounter; ClientFault::ALL.len()],
    /// Requests answered 508 because their `CDN-Loop` held this tier's id twice.
    pub loops_detected: IntCounter,
    /// Cache fills by where they went.
    pub fills: Arc<FillMetrics>,
    last_reload: prometheus::Gauge,
    breakers: Arc<BreakerStates>,
    /// Requests no route matched.
    unrouted: OnceLock<Arc<RouteMetrics>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The families' names and labels are constants, checked by the unit tests below: building and
/// registering them cannot fail on anything a user or a client sends.
#[allow(clippy::expect_used)]
fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

#[allow(clippy::expect_used)]
fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a constant metric name"),
    )
}

impl Metrics {
    // The names and labels are constants checked by the unit tests (see `register`).
    #[allow(clippy::expect_used)]
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "edgeslice_http_request_duration_seconds",
                "Time from the request's start to its response's last byte.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "cache"],
        );
        let duration = register(r, duration.expect("a constant metric name"));
        let breakers = Arc::new(BreakerStates::default());
        registry
            .register(Box::new(BreakerCollector(breakers.clone())))
            .expect("metric names are unique");
        let build = Pulled::gauge(
            "edgeslice_build_info",
            "Always 1; the version as a label.",
            &["version"],
            || vec![(vec![env!("CARGO_PKG_VERSION").to_string()], 1.0)],
        );
        let m = Metrics {
            requests: counter_vec(
                r,
                "edgeslice_http_requests_total",
                "Client requests answered, by route, method, status class, cache result and protocol (http1, h2).",
                &["route", "method", "status_class", "cache", "protocol"],
            ),
            duration,
            response_bytes: counter_vec(
                r,
                "edgeslice_http_response_bytes_total",
                "Response body bytes sent to clients.",
                &["route", "cache"],
            ),
            origin_requests: counter_vec(
                r,
                "edgeslice_origin_requests_total",
                "Requests sent to origin servers (each try), by outcome: the answer's status class, or the failure's class.",
                &["upstream", "server", "outcome"],
            ),
            origin_bytes: counter_vec(
                r,
                "edgeslice_origin_response_bytes_total",
                "Response body bytes received from origin servers, by the answer's status class.",
                &["upstream", "server", "outcome"],
            ),
            origin_retries: counter_vec(
                r,
                "edgeslice_origin_retries_total",
                "Tries after the first, for cache fetches and pass-through requests.",
                &["upstream"],
            ),
            origin_resumes: counter_vec(
                r,
                "edgeslice_origin_resumes_total",
                "Origin transfers broken mid-body and resumed (on another server when there is one).",
                &["upstream"],
            ),
            breaker_transitions: counter_vec(
                r,
                "edgeslice_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered.",
                &["upstream", "server", "to"],
            ),
            resolve_failures: counter_vec(
                r,
                "edgeslice_upstream_resolve_failures_total",
                "Lookups of an upstream's server names that gave no address (no such name, or no answer), every resolve_interval per name.",
                &["upstream"],
            ),
            servers: Arc::default(),
            admin_calls: counter_vec(
                r,
                "edgeslice_admin_calls_total",
                "Mutating admin calls, by action (purge, reload) and result (ok, refused, error).",
                &["action", "result"],
            ),
            purged: counter_vec(
                r,
                "edgeslice_purged_objects_total",
                "Cached objects purged through the admin listener, by mode (hard, soft).",
                &["mode"],
            ),
            reloads: counter_vec(
                r,
                "edgeslice_config_reloads_total",
                "Configuration reloads (SIGHUP or POST /reload), by result (ok, error: the old configuration kept serving).",
                &["result"],
            ),
            last_reload: register(
                r,
                prometheus::Gauge::new(
                    "edgeslice_config_last_reload_success_timestamp_seconds",
                    "When the configuration in force was loaded (start or last successful reload), Unix time.",
                )
                .expect("a constant metric name"),
            ),
            client_errors: {
                let family = counter_vec(
                    r,
                    "edgeslice_client_errors_total",
                    "Requests that failed through their client's doing (logged at debug only), by kind: closed (left or reset mid-request), timeout (body_timeout, body_min_rate, send_timeout), malformed (bad framing or request line), too_large (header over the limits after parsing).",
                    &["kind"],
                );
                ClientFault::ALL.map(|k| family.with_label_values(&[k.label()]))
            },
            loops_detected: register(
                r,
                IntCounter::new(
                    "edgeslice_loops_detected_total",
                    "Requests answered 508 Loop Detected: their CDN-Loop held this tier's cluster.cdn_id twice or more.",
                )
                .expect("a constant metric name"),
            ),
            fills: {
                let requests = counter_vec(
                    r,
                    "edgeslice_fill_requests_total",
                    "Requests the cache's fills sent (discoveries, runs of chunks, resumes, revalidations), by where they went: peer (the shard's owner in the cluster), parent (the route's parent tier), origin (the route's upstream).",
                    &["to"],
                );
                let bytes = counter_vec(
                    r,
                    "edgeslice_fill_bytes_total",
                    "Body bytes the cache's fills received, by where they came from: peer, parent, origin.",
                    &["to"],
                );
                Arc::new(FillMetrics {
                    requests: FillTarget::ALL.map(|t| requests.with_label_values(&[t.label()])),
                    bytes: FillTarget::ALL.map(|t| bytes.with_label_values(&[t.label()])),
                })
            },
            breakers,
            unrouted: OnceLock::new(),
            registry,
        };
        m.register(build);
        m.last_reload.set(unix_now());
        m.reloads.with_label_values(&["ok"]);
        m.reloads.with_label_values(&["error"]);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        if let Err(e) = m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            log::error!("metrics: {e}");
        }
        m
    }

    /// Add a family read at scrape time. A name already registered is refused (logged): the
    /// first family of a name stays.
    pub fn register(&self, pulled: Pulled) {
        if let Err(e) = self.registry.register(Box::new(pulled)) {
            log::error!("metrics: {e}");
        }
    }

    /// Everything, in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// Count a request that failed through its client's doing.
    pub fn client_error(&self, fault: ClientFault) {
        self.client_errors[fault as usize].inc();
    }

    /// Count a mutating admin call.
    pub fn admin_call(&self, action: AdminAction, result: AdminResult) {
        self.admin_calls
            .with_label_values(&[action.label(), result.label()])
            .inc();
    }

    /// Count a reload; a successful one also sets the time the configuration in force was
    /// loaded.
    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.last_reload.set(unix_now());
        }
    }

    /// Count objects purged.
    pub fn purged(&self, soft: bool, objects: u64) {
        self.purged
            .with_label_values(&[if soft { "soft" } else { "hard" }])
            .inc_by(objects);
    }

    /// The request figures of one route (labelled `label`); the caller keeps the handle.
    pub fn route(&self, label: &str) -> Arc<RouteMetrics> {
        Arc::new(RouteMetrics::new(self, label))
    }

    /// The figures of requests no route matched.
    pub fn unrouted(&self) -> &Arc<RouteMetrics> {
        self.unrouted.get_or_init(|| self.route("none"))
    }

    /// The figures of one upstream group (its servers': [`Metrics::server`]).
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            retries: self.origin_retries.with_label_values(&[name]),
            resumes: self.origin_resumes.with_label_values(&[name]),
            resolve_failures: self.resolve_failures.with_label_values(&[name]),
        }
    }

    /// The figures of the server `addr` of `upstream`, shared by every pool that has it;
    /// `breaker` is shown as `edgeslice_breaker_state` for as long as it lives. When the last
    /// holder drops them (the server left its group for good), their series are removed, so the
    /// series follow the servers a group has, not every address its names ever resolved to.
    pub fn server(
        &self,
        upstream: &str,
        addr: SocketAddr,
        breaker: &Arc<Breaker>,
    ) -> Arc<ServerMetrics> {
        self.breakers.add(upstream, addr, breaker);
        let key = (upstream.to_string(), addr);
        let mut table = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = table.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        let m = Arc::new(ServerMetrics::new(self, upstream, addr));
        table.insert(key, Arc::downgrade(&m));
        m
    }
}

type ServerTable = std::collections::HashMap<(String, SocketAddr), Weak<ServerMetrics>>;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A mutating admin call (the `action` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Purge,
    Reload,
}

impl AdminAction {
    fn label(self) -> &'static str {
        match self {
            AdminAction::Purge => "purge",
            AdminAction::Reload => "reload",
        }
    }
}

/// How a mutating admin call ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminResult {
    Ok,
    /// Not authorized (401/403/405).
    Refused,
    /// Bad request or a failure (400, 5xx, an invalid config).
    Error,
}

impl AdminResult {
    fn label(self) -> &'static str {
        match self {
            AdminResult::Ok => "ok",
            AdminResult::Refused => "refused",
            AdminResult::Error => "error",
        }
    }
}

/// One route's request figures, each label combination looked up on its first use.
pub struct RouteMetrics {
    route: String,
    requests: IntCounterVec,
    duration: HistogramVec,
    response_bytes: IntCounterVec,
    request_slots: Box<[OnceLock<IntCounter>]>,
    duration_slots: [OnceLock<Histogram>; CacheResult::ALL.len()],
    bytes_slots: [OnceLock<IntCounter>; CacheResult::ALL.len()],
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteMetrics({})", self.route)
    }
}

impl RouteMetrics {
    fn new(m: &Metrics, route: &str) -> RouteMetrics {
        let n = METHODS.len() * STATUS_CLASSES.len() * CacheResult::ALL.len() * Protocol::ALL.len();
        RouteMetrics {
            route: route.to_string(),
            requests: m.requests.clone(),
            duration: m.duration.clone(),
            response_bytes: m.response_bytes.clone(),
            request_slots: (0..n).map(|_| OnceLock::new()).collect(),
            duration_slots: Default::default(),
            bytes_slots: Default::default(),
        }
    }

    /// One finished request.
    pub fn observe(
        &self,
        method: &http::Method,
        status: u16,
        cache: CacheResult,
        protocol: Protocol,
        body_bytes: u64,
        seconds: f64,
    ) {
        let (mi, si, ci) = (method_index(method), status_index(status), cache.index());
        let slot = ((mi * STATUS_CLASSES.len() + si) * CacheResult::ALL.len() + ci)
            * Protocol::ALL.len()
            + protocol.index();
        if let Some(s) = self.request_slots.get(slot) {
            s.get_or_init(|| {
                self.requests.with_label_values(&[
                    self.route.as_str(),
                    METHODS[mi],
                    STATUS_CLASSES[si],
                    cache.label(),
                    protocol.as_str(),
                ])
            })
            .inc();
        }
        self.duration_slots[ci]
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[self.route.as_str(), cache.label()])
            })
            .observe(seconds);
        self.bytes_slots[ci]
            .get_or_init(|| {
                self.response_bytes
                    .with_label_values(&[self.route.as_str(), cache.label()])
            })
            .inc_by(body_bytes);
    }
}

/// What became of one try sent to an origin server (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginOutcome {
    /// It answered with this status.
    Answered(u16),
    /// It failed by its own fault, so classified.
    Failed(FailureClass),
}

impl OriginOutcome {
    fn index(self) -> usize {
        match self {
            OriginOutcome::Answered(s) => status_index(s).min(4),
            OriginOutcome::Failed(c) => 5 + c.index(),
        }
    }

    fn label(index: usize) -> &'static str {
        match index {
            0..=4 => STATUS_CLASSES[index],
            i => FailureClass::ALL
                .get(i - 5)
                .map(|c| c.as_str())
                .unwrap_or("other"),
        }
    }
}

const OUTCOMES: usize = 5 + FailureClass::ALL.len();

/// One upstream group's figures.
pub struct UpstreamMetrics {
    pub retries: IntCounter,
    pub resumes: IntCounter,
    /// Lookups of its names that gave no address.
    pub resolve_failures: IntCounter,
}

/// One origin server's figures within its group.
pub struct ServerMetrics {
    requests: [IntCounter; OUTCOMES],
    bytes: [OnceLock<IntCounter>; OUTCOMES],
    bytes_vec: IntCounterVec,
    labels: [String; 2],
    transitions: [IntCounter; 3],
    /// To remove its series when it goes (see [`Metrics::server`]).
    addr: SocketAddr,
    table: Arc<Mutex<ServerTable>>,
    requests_vec: IntCounterVec,
    transitions_vec: IntCounterVec,
}

impl Drop for ServerMetrics {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let key = (std::mem::take(&mut self.labels[0]), self.addr);
        match table.get(&key) {
            // A newer holder of the same server took the series over: they stay.
            Some(w) if !std::ptr::eq(w.as_ptr(), self) => return,
            Some(_) => {
                table.remove(&key);
            }
            None => {}
        }
        let (upstream, server) = (key.0.as_str(), self.labels[1].as_str());
        for i in 0..OUTCOMES {
            let outcome = OriginOutcome::label(i);
            let _ = self
                .requests_vec
                .remove_label_values(&[upstream, server, outcome]);
            if self.bytes[i].get().is_some() {
                let _ = self
                    .bytes_vec
                    .remove_label_values(&[upstream, server, outcome]);
            }
        }
        for s in [
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::Closed,
        ] {
            let _ = self
                .transitions_vec
                .remove_label_values(&[upstream, server, state_label(s)]);
        }
    }
}

impl ServerMetrics {
    fn new(m: &Metrics, upstream: &str, addr: SocketAddr) -> ServerMetrics {
        let server = addr.to_string();
        ServerMetrics {
            addr,
            table: m.servers.clone(),
            requests_vec: m.origin_requests.clone(),
            transitions_vec: m.breaker_transitions.clone(),
            requests: std::array::from_fn(|i| {
                m.origin_requests
                    .with_label_values(&[upstream, &server, OriginOutcome::label(i)])
            }),
            bytes: Default::default(),
            bytes_vec: m.origin_bytes.clone(),
            transitions: [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed,
            ]
            .map(|s| {
                m.breaker_transitions
                    .with_label_values(&[upstream, &server, state_label(s)])
            }),
            labels: [upstream.to_string(), server],
        }
    }

    /// Count one try.
    pub fn request(&self, outcome: OriginOutcome) {
        if let Some(c) = self.requests.get(outcome.index()) {
            c.inc();
        }
    }

    /// The counter of body bytes of an answer with `status`.
    pub fn body_bytes(&self, status: u16) -> IntCounter {
        let i = OriginOutcome::Answered(status).index();
        self.bytes[i]
            .get_or_init(|| {
                self.bytes_vec.with_label_values(&[
                    self.labels[0].as_str(),
                    self.labels[1].as_str(),
                    OriginOutcome::label(i),
                ])
            })
            .clone()
    }

    /// Count a breaker entering `to`.
    pub fn transition(&self, to: BreakerState) {
        let i = match to {
            BreakerState::Open => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Closed => 2,
        };
        self.transitions[i].inc();
    }
}

fn state_label(s: BreakerState) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half_open",
        BreakerState::Open => "open",
    }
}

/// `edgeslice_breaker_state` values.
pub fn state_value(s: BreakerState) -> f64 {
    match s {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

/// The breakers of every live pool, read at scrape time. A pool replaced by a reload drops its
/// breakers; their entries go with them.
#[derive(Default)]
struct BreakerStates {
    entries: Mutex<Vec<(String, SocketAddr, Weak<Breaker>)>>,
}

impl BreakerStates {
    fn add(&self, upstream: &str, addr: SocketAddr, b: &Arc<Breaker>) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|(_, _, w)| w.strong_count() > 0);
        e.push((upstream.to_string(), addr, Arc::downgrade(b)));
    }
}

struct BreakerCollector(Arc<BreakerStates>);

static BREAKER_DESC: OnceLock<Option<Desc>> = OnceLock::new();

fn breaker_desc() -> Option<&'static Desc> {
    BREAKER_DESC
        .get_or_init(|| {
            Desc::new(
                "edgeslice_breaker_state".into(),
                "Circuit breaker state per origin server: 0 closed, 1 half-open (probing), 2 open (ejected).".into(),
                vec!["upstream".into(), "server".into()],
                Default::default(),
            )
            .ok()
        })
        .as_ref()
}

impl Collector for BreakerCollector {
    fn desc(&self) -> Vec<&Desc> {
        breaker_desc().into_iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(desc) = breaker_desc() else {
            return Vec::new();
        };
        let entries = self.0.entries.lock().unwrap_or_else(|p| p.into_inner());
        // The newest pool of a name wins (a reload's old pool may live on for a moment).
        let mut seen = std::collections::HashSet::new();
        let mut samples = Vec::new();
        for (upstream, addr, weak) in entries.iter().rev() {
            let Some(b) = weak.upgrade() else { continue };
            if seen.insert((upstream.as_str(), *addr)) {
                samples.push((
                    vec![upstream.clone(), addr.to_string()],
                    state_value(b.state()),
                ));
            }
        }
        drop(entries);
        samples.reverse();
        vec![family(desc, MetricType::GAUGE, samples)]
    }
}

/// Samples: label values (in the family's label order) and a value.
pub type Samples = Vec<(Vec<String>, f64)>;

/// A family whose samples are read at scrape time from figures kept elsewhere.
pub struct Pulled {
    desc: Desc,
    kind: MetricType,
    read: Box<dyn Fn() -> Samples + Send + Sync>,
}

impl Pulled {
    pub fn counter(
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn() -> Samples + Send + Sync + 'static,
    ) -> Pulled {
        Pulled::new(name, help, labels, MetricType::COUNTER, Box::new(read))
    }

    pub fn gauge(
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn() -> Samples + Send + Sync + 'static,
    ) -> Pulled {
        Pulled::new(name, help, labels, MetricType::GAUGE, Box::new(read))
    }

    fn new(
        name: &str,
        help: &str,
        labels: &[&str],
        kind: MetricType,
        read: Box<dyn Fn() -> Samples + Send + Sync>,
    ) -> Pulled {
        let desc = Desc::new(
            name.into(),
            help.into(),
            labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )
        .unwrap_or_else(|e| {
            log::error!("metrics: {name}: {e}");
            invalid_desc()
        });
        Pulled { desc, kind, read }
    }
}

#[allow(clippy::expect_used)]
fn invalid_desc() -> Desc {
    Desc::new(
        "edgeslice_invalid".into(),
        "invalid".into(),
        vec![],
        Default::default(),
    )
    .expect("a valid constant desc")
}

impl Collector for Pulled {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![family(&self.desc, self.kind, (self.read)())]
    }
}

fn family(desc: &Desc, kind: MetricType, samples: Samples) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(kind);
    let metrics = samples
        .into_iter()
        .map(|(values, v)| {
            let mut labels: Vec<proto::LabelPair> = desc
                .variable_labels
                .iter()
                .zip(values)
                .map(|(name, value)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(name.clone());
                    l.set_value(value);
                    l
                })
                .collect();
            // In name order, as the crate's own families print them.
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            let mut m = proto::Metric::from_label(labels);
            match kind {
                MetricType::COUNTER => {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                }
                _ => {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
            }
            m
        })
        .collect();
    f.set_metric(metrics);
    f
}

/// One sample without labels.
pub fn one(v: f64) -> Samples {
    vec![(Vec::new(), v)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::breaker::BreakerConfig;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn request_figures_by_label() {
        let m = Metrics::new();
        let r = m.route("example.com/video/");
        let h1 = Protocol::Http1;
        r.observe(&http::Method::GET, 206, CacheResult::Hit, h1, 4096, 0.0002);
        r.observe(&http::Method::GET, 206, CacheResult::Hit, h1, 4096, 0.0003);
        r.observe(
            &http::Method::GET,
            206,
            CacheResult::Hit,
            Protocol::H2,
            4096,
            0.0003,
        );
        r.observe(
            &http::Method::from_bytes(b"BREW").unwrap(),
            404,
            CacheResult::None,
            h1,
            10,
            0.01,
        );
        r.observe(&http::Method::GET, 0, CacheResult::Miss, h1, 0, 1.0);
        let text = m.render();
        assert!(text.contains(
            "edgeslice_http_requests_total{cache=\"hit\",method=\"GET\",protocol=\"http1\",route=\"example.com/video/\",status_class=\"2xx\"} 2"
        ), "{text}");
        assert!(text.contains(
            "edgeslice_http_requests_total{cache=\"hit\",method=\"GET\",protocol=\"h2\",route=\"example.com/video/\",status_class=\"2xx\"} 1"
        ), "{text}");
        assert!(text.contains(
            "edgeslice_http_requests_total{cache=\"none\",method=\"other\",protocol=\"http1\",route=\"example.com/video/\",status_class=\"4xx\"} 1"
        ));
        assert!(text.contains("status_class=\"none\"} 1"));
        assert!(text.contains(
            "edgeslice_http_response_bytes_total{cache=\"hit\",route=\"example.com/video/\"} 12288"
        ));
        assert!(text.contains(
            "edgeslice_http_request_duration_seconds_bucket{cache=\"hit\",route=\"example.com/video/\",le=\"0.00025\"} 1"
        ));
        assert!(text.contains(
            "edgeslice_http_request_duration_seconds_count{cache=\"hit\",route=\"example.com/video/\"} 3"
        ));
    }

    #[test]
    fn origin_figures_and_breaker_state() {
        let m = Metrics::new();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b = Arc::new(Breaker::new(BreakerConfig {
            failure_threshold: 5,
            open_for: std::time::Duration::from_secs(1),
            max_open_for: std::time::Duration::from_secs(1),
            half_open_probes: 1,
        }));
        let u = m.upstream("origin");
        let s = m.server("origin", a, &b);
        s.request(OriginOutcome::Answered(206));
        s.request(OriginOutcome::Failed(FailureClass::Reset));
        s.body_bytes(206).inc_by(1000);
        s.body_bytes(200).inc_by(24);
        u.retries.inc();
        let text = m.render();
        for want in [
            "edgeslice_origin_requests_total{outcome=\"2xx\",server=\"10.0.0.1:80\",upstream=\"origin\"} 1",
            "edgeslice_origin_requests_total{outcome=\"reset\",server=\"10.0.0.1:80\",upstream=\"origin\"} 1",
            "edgeslice_origin_requests_total{outcome=\"5xx\",server=\"10.0.0.1:80\",upstream=\"origin\"} 0",
            "edgeslice_origin_response_bytes_total{outcome=\"2xx\",server=\"10.0.0.1:80\",upstream=\"origin\"} 1024",
            "edgeslice_origin_retries_total{upstream=\"origin\"} 1",
            "edgeslice_breaker_state{server=\"10.0.0.1:80\",upstream=\"origin\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // A pool rebuilt for the same server shares its figures: they go on.
        let again = m.server("origin", a, &b);
        assert!(Arc::ptr_eq(&again, &s));
        drop(again);
        assert!(m.render().contains("server=\"10.0.0.1:80\""));
        u.resolve_failures.inc();
        assert!(m
            .render()
            .contains("edgeslice_upstream_resolve_failures_total{upstream=\"origin\"} 1"));
        // A server that leaves its group takes its series with it, the breaker's included.
        drop(s);
        drop(b);
        let text = m.render();
        assert!(line(&text, "edgeslice_breaker_state{").is_none());
        assert!(!text.contains("server=\"10.0.0.1:80\""), "{text}");
        // And comes back from zero should its address return.
        let b = Arc::new(Breaker::new(BreakerConfig {
            failure_threshold: 5,
            open_for: std::time::Duration::from_secs(1),
            max_open_for: std::time::Duration::from_secs(1),
            half_open_probes: 1,
        }));
        let s = m.server("origin", a, &b);
        s.request(OriginOutcome::Answered(206));
        assert!(m.render().contains(
            "edgeslice_origin_requests_total{outcome=\"2xx\",server=\"10.0.0.1:80\",upstream=\"origin\"} 1"
        ));
    }

    #[test]
    fn pulled_families_render_with_their_type() {
        let m = Metrics::new();
        m.register(Pulled::counter(
            "edgeslice_test_total",
            "A test counter.",
            &["tier"],
            || vec![(vec!["disk".into()], 7.0)],
        ));
        m.register(Pulled::gauge(
            "edgeslice_test_open",
            "A gauge.",
            &[],
            || one(3.0),
        ));
        let text = m.render();
        assert!(text.contains("# TYPE edgeslice_test_total counter"));
        assert!(text.contains("edgeslice_test_total{tier=\"disk\"} 7"));
        assert!(text.contains("# TYPE edgeslice_test_open gauge"));
        assert!(text.contains("edgeslice_test_open 3"));
        assert!(text.contains("edgeslice_build_info{version="));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        assert!(text.contains("process_open_fds "));
    }

    #[test]
    fn label_folding_is_bounded() {
        assert_eq!(method_index(&http::Method::GET), 0);
        assert_eq!(
            method_index(&http::Method::from_bytes(b"X-ANYTHING").unwrap()),
            7
        );
        assert_eq!(status_index(100), 0);
        assert_eq!(status_index(599), 4);
        assert_eq!(status_index(0), 5);
        assert_eq!(status_index(999), 5);
        for i in 0..OUTCOMES {
            assert!(!OriginOutcome::label(i).is_empty());
        }
        assert_eq!(OriginOutcome::Answered(503).index(), 4);
    }
}
