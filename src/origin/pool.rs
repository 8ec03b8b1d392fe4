//! An upstream group at run time: its servers behind Pingora's load balancer (round robin or
//! Ketama consistent hashing, both weighted), optional active health checks (Pingora's HTTP
//! check, run by its owner: [`UpstreamPool::health_checks`]), a circuit breaker per server
//! (passive health: failures seen on real traffic, attributed by `origin::outcome`), and the
//! retry budget and backoff shared by the group's requests.
//!
//! The servers are one immutable [`ServerSet`] (load balancer, breakers, peers, per-server
//! figures) behind an `ArcSwap`: selection loads it once and reads breaker state with atomics
//! only; it never waits. A group's servers are its IP entries and the addresses its host names
//! resolve to now (`origin::resolve`); when a round of lookups changes them,
//! [`UpstreamPool::set_servers`] builds the next set and swaps it in whole. A server that stays
//! keeps its breaker, figures and health (the health state lives in a registry the sets share),
//! so a re-resolution with the same answer changes nothing at all. Rebuilding a set (a few
//! dozen servers at most) is cheaper to read about than a load balancer, breaker table and
//! peer table each updated in place and kept in step: a pick sees one set from start to end,
//! and a [`Selected`] keeps the set it came from.
//!
//! Each server's Pingora peer (plain or TLS, `origin::peer`) is built once with its set and
//! used by every connection to it: fills, revalidations, resumes, pass-through, health checks.
//!
//! A group may have no server at all (its names do not resolve): then there is nothing to pick
//! and its requests fail at once ([`UpstreamPool::pick`] is `None`).
//!
//! Never a self-made outage:
//! - at most `max_ejected_percent` of the group's servers are ejected at once as *outliers*
//!   (for their answers: gateway statuses, resets, read timeouts, broken framing, trickling
//!   bodies; at least one may always be): a trip beyond that is held back and the server stays
//!   in rotation. A server that cannot be connected to at all is *down*
//!   ([`FailureClass::is_down`]), as an active health check would find: its ejection takes no
//!   capacity that was serving, so it neither counts towards the cap nor is held back by it
//!   (otherwise a dead server would keep a failing one in rotation);
//! - when every server is ejected anyway (breakers `Open`/`HalfOpen` with no probe slot, or
//!   marked down by active health checks), selection enters *panic routing*: it picks a server
//!   regardless, as Envoy does below its panic threshold, so requests still reach a server that
//!   might answer instead of getting a 503 made up here. Panic tries carry no breaker admission.

use super::backoff::Backoff;
use super::breaker::{Admission, Breaker, BreakerState, Transition};
use super::budget::RetryBudget;
use super::failing::FailingUrls;
use super::outcome::FailureClass;
use super::peer::{peer_for, TlsCause, TlsFailureLog};
use super::resolve::{Answer, HostPort, Names};
use super::ResilienceStats;
use crate::config::{Balance, ServerSpec, UpstreamSettings};
use crate::metrics::{OriginOutcome, ServerMetrics, UpstreamMetrics};
use arc_swap::ArcSwap;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{
    discovery, Backend, Backends, HealthCheckService, HealthRegistry, LoadBalancer,
};
use prometheus::IntCounter;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Retries are budgeted over this sliding window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per window, so a quiet group can still retry a lone request.
pub const BUDGET_MIN_RETRIES: u32 = 10;

enum Lb {
    RoundRobin(LoadBalancer<RoundRobin>),
    Hash(LoadBalancer<Consistent>),
}

pub struct UpstreamPool {
    pub settings: Arc<UpstreamSettings>,
    /// The servers in force; swapped whole by [`UpstreamPool::set_servers`].
    servers: ArcSwap<ServerSet>,
    /// What the group's names resolve to; only its resolve loop and a new pool's seeding touch
    /// it, never a request.
    names: Mutex<Names>,
    /// The active health check: one registry (health by server) shared by every set, and the
    /// service that checks its servers. `None` without `health_check`.
    health: Option<Health>,
    /// Held while a failure is recorded, so that two servers tripping at once cannot both slip
    /// under the ejection cap. Taken only on failures, never on the success path.
    trip_lock: Arc<Mutex<()>>,
    pub budget: RetryBudget,
    /// URLs that just failed on every server: their gateway answers are not retried.
    pub failing_urls: FailingUrls,
    pub backoff: Backoff,
    pub stats: Arc<ResilienceStats>,
    /// This group's figures for `/metrics` (its servers' are in their set).
    pub metrics: Arc<UpstreamMetrics>,
    /// TLS failures already logged, per server and cause.
    pub tls_failures: TlsFailureLog,
}

struct Health {
    registry: Arc<HealthRegistry>,
    service: Arc<HealthCheckService>,
    check: Arc<PerServerCheck>,
}

/// The group's servers at one moment: immutable, shared by the picks and [`Selected`]s made
/// from it.
pub struct ServerSet {
    servers: Vec<ServerSpec>,
    lb: Lb,
    members: HashMap<SocketAddr, Arc<Member>>,
    /// Outlier ejections allowed at once (`max_ejected_percent` of the set, at least 1).
    max_ejected: usize,
    max_iterations: usize,
    stats: Arc<ResilienceStats>,
    trip_lock: Arc<Mutex<()>>,
}

/// One server: carried from set to set while its address stays in the group.
struct Member {
    spec: ServerSpec,
    breaker: Arc<Breaker>,
    /// Its last trip was for being down (connect failures), not as an outlier: while ejected
    /// it does not count towards `max_ejected`. Written under `trip_lock`.
    down: AtomicBool,
    metrics: Arc<ServerMetrics>,
    /// Its Pingora peer (`origin::peer`): TLS settings, SNI, CA, timeouts.
    peer: HttpPeer,
}

/// A server chosen for one try, holding its breaker admission until the outcome is reported.
/// Dropping it unreported (see [`Selected::release`]) counts nothing.
pub struct Selected {
    pub addr: SocketAddr,
    breaker: Arc<Breaker>,
    admission: Option<Admission>,
    /// Chosen by panic routing (every server was ejected): no admission, nothing is reported.
    pub panic: bool,
    /// The set it was chosen from (its peers' breakers for the ejection cap).
    set: Arc<ServerSet>,
    /// The Pingora peer to reach it with, from that set: a re-resolution meanwhile cannot
    /// change its SNI or TLS settings.
    pub peer: HttpPeer,
}

impl Selected {
    /// The try worked: an answer that was not a gateway status, or a body read to its end.
    pub fn succeeded(mut self, request_id: &str) {
        if let Some(a) = self.admission.take() {
            let t = self.breaker.record_success(a);
            log_transition(&self.set, self.addr, t, None, request_id);
        }
    }

    /// The try failed by the server's own fault (see `origin::outcome`): charge its breaker.
    /// A `Closed → Open` trip for a down server ([`FailureClass::is_down`]) always happens; an
    /// outlier's only while fewer than `max_ejected` other servers are ejected as outliers.
    pub fn failed(mut self, class: FailureClass, request_id: &str) {
        self.set.stats.count_failure(class);
        let Some(a) = self.admission.take() else {
            return;
        };
        let g = &self.set;
        let _trip = g.trip_lock.lock().unwrap_or_else(|e| e.into_inner());
        let me = &self.breaker;
        let mut may_eject = || {
            if class.is_down() {
                return true;
            }
            let others = g
                .members
                .values()
                .filter(|m| {
                    !Arc::ptr_eq(&m.breaker, me)
                        && !m.down.load(Ordering::Relaxed)
                        && m.breaker.is_ejected()
                })
                .count();
            let ok = others < g.max_ejected;
            if !ok {
                g.stats.ejections_capped.fetch_add(1, Ordering::Relaxed);
                // Counted on every failure past the threshold; logged at debug so a storm of
                // failures cannot flood the log (the trips themselves are WARN lines).
                log::debug!(
                    "rid={request_id} origin {} failing ({class}) but {others} of {} servers are already ejected as outliers (max_ejected_percent): kept in rotation",
                    self.addr,
                    g.members.len()
                );
            }
            ok
        };
        let t = me.record_failure_gated(a, &mut may_eject);
        if t.is_some_and(|t| t.to == BreakerState::Open) {
            if let Some(m) = g.members.get(&self.addr) {
                m.down.store(class.is_down(), Ordering::Relaxed);
            }
        }
        log_transition(g, self.addr, t, Some(class), request_id);
    }

    /// The try ended without saying anything about the server (the client went away, our own
    /// error, a gateway answer that no peer contradicted): report nothing. A `HalfOpen` probe
    /// slot is freed.
    pub fn release(self) {}
}

fn log_transition(
    set: &ServerSet,
    addr: SocketAddr,
    t: Option<Transition>,
    class: Option<FailureClass>,
    request_id: &str,
) {
    let Some(t) = t else { return };
    let stats = &set.stats;
    if let Some(m) = set.members.get(&addr) {
        m.metrics.transition(t.to);
    }
    let counter = match t.to {
        BreakerState::Open => &stats.breaker_opened,
        BreakerState::HalfOpen => &stats.breaker_half_opened,
        BreakerState::Closed => &stats.breaker_closed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let why = match (t.to, class) {
        (BreakerState::Open, Some(c)) => format!(" after {c} failure"),
        (BreakerState::HalfOpen, _) => " (ejection over, probing)".to_string(),
        (BreakerState::Closed, _) => " (probes succeeded)".to_string(),
        _ => String::new(),
    };
    log::warn!(
        "rid={request_id} circuit breaker of {addr}: {:?} -> {:?}{why}",
        t.from,
        t.to
    );
}

/// The group's active health check: Pingora's HTTP check per server, each made from that
/// server's peer (over TLS for an HTTPS group, with the server's SNI and verification) on its
/// first check, and forgotten when the server leaves the group.
struct PerServerCheck {
    settings: Arc<UpstreamSettings>,
    req: RequestHeader,
    timeout: Duration,
    healthy_after: usize,
    unhealthy_after: usize,
    checks: Mutex<HashMap<SocketAddr, Arc<HttpHealthCheck>>>,
}

impl PerServerCheck {
    fn check_of(&self, target: &Backend) -> Option<Arc<HttpHealthCheck>> {
        let addr = *target.addr.as_inet()?;
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let check = checks.entry(addr).or_insert_with(|| {
            // The server as its set made it (its name for TLS), carried by the backend.
            let spec = target
                .ext
                .get::<ServerSpec>()
                .cloned()
                .unwrap_or(ServerSpec {
                    addr,
                    weight: 1,
                    name: None,
                });
            let mut check = HttpHealthCheck::new(&self.settings.name, false);
            check.consecutive_success = self.healthy_after;
            check.consecutive_failure = self.unhealthy_after;
            check.peer_template = peer_for(&self.settings, &spec);
            check.peer_template.options.connection_timeout = Some(self.timeout);
            check.peer_template.options.read_timeout = Some(self.timeout);
            check.peer_template.options.write_timeout = Some(self.timeout);
            check.req = self.req.clone();
            Arc::new(check)
        });
        Some(check.clone())
    }

    /// Drop the checks of servers not in `keep`.
    fn retain(&self, keep: &HashMap<SocketAddr, Arc<Member>>) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.retain(|a, _| keep.contains_key(a));
    }
}

/// What the registry holds: the pool keeps the check too, to forget servers that leave.
struct SharedCheck(Arc<PerServerCheck>);

#[async_trait::async_trait]
impl pingora_load_balancing::health_check::HealthCheck for SharedCheck {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        match self.0.check_of(target) {
            Some(c) => c.check(target).await,
            None => pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "health check of a server without an IP address",
            ),
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.0.healthy_after
        } else {
            self.0.unhealthy_after
        }
    }
}

impl ServerSet {
    /// The set of `servers`, carrying over from `previous` every server that stays (breaker,
    /// down mark, figures; its peer too unless its name changed).
    fn build(
        pool: &UpstreamPool,
        servers: Vec<ServerSpec>,
        previous: Option<&ServerSet>,
    ) -> ServerSet {
        let settings = &pool.settings;
        let mut members = HashMap::with_capacity(servers.len());
        for s in &servers {
            let kept = previous.and_then(|p| p.members.get(&s.addr));
            let member = match kept {
                Some(m) if m.spec == *s => m.clone(),
                Some(m) => Arc::new(Member {
                    spec: s.clone(),
                    breaker: m.breaker.clone(),
                    down: AtomicBool::new(m.down.load(Ordering::Relaxed)),
                    metrics: m.metrics.clone(),
                    peer: peer_for(settings, s),
                }),
                None => {
                    let breaker = Arc::new(Breaker::new(settings.breaker.clone()));
                    let metrics = pool.stats.metrics.server(&settings.name, s.addr, &breaker);
                    Arc::new(Member {
                        spec: s.clone(),
                        breaker,
                        down: AtomicBool::new(false),
                        metrics,
                        peer: peer_for(settings, s),
                    })
                }
            };
            members.insert(s.addr, member);
        }
        let backends: BTreeSet<Backend> = servers
            .iter()
            .map(|s| {
                let mut b = Backend {
                    addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(s.addr),
                    weight: s.weight as usize,
                    ext: Default::default(),
                };
                b.ext.insert(s.clone());
                b
            })
            .collect();
        let discovered = discovery::Static::new(backends);
        let view = match &pool.health {
            Some(h) => Backends::new_with_health_registry(discovered, h.registry.clone()),
            None => Backends::new(discovered),
        };
        let lb = match settings.balance {
            Balance::RoundRobin => Lb::RoundRobin(LoadBalancer::from_backends(view)),
            Balance::ConsistentHash => Lb::Hash(LoadBalancer::from_backends(view)),
        };
        // Static discovery never blocks: load the backends into the selector now.
        use futures::FutureExt;
        let loaded = match &lb {
            Lb::RoundRobin(l) => l.update().now_or_never(),
            Lb::Hash(l) => l.update().now_or_never(),
        };
        if !matches!(loaded, Some(Ok(()))) {
            // Not reachable with static discovery; said should it ever be.
            log::error!(
                "upstream {}: loading {} servers into the load balancer failed",
                settings.name,
                servers.len()
            );
        }
        let n = servers.len();
        let weight_sum: usize = servers.iter().map(|s| s.weight as usize).sum();
        ServerSet {
            max_ejected: (n * settings.max_ejected_percent as usize / 100).max(1),
            max_iterations: weight_sum + n + 1,
            members,
            servers,
            lb,
            stats: pool.stats.clone(),
            trip_lock: pool.trip_lock.clone(),
        }
    }

    pub fn servers(&self) -> &[ServerSpec] {
        &self.servers
    }

    fn select_with(&self, key: &[u8], accept: impl Fn(&Backend, bool) -> bool) {
        let _ = match &self.lb {
            Lb::RoundRobin(l) => l.select_with(key, self.max_iterations, accept),
            Lb::Hash(l) => l.select_with(key, self.max_iterations, accept),
        };
    }
}

impl UpstreamPool {
    /// The pool of `settings` with its IP servers; its names have no server until
    /// [`UpstreamPool::resolved`] is given what they resolve to.
    pub fn new(
        settings: Arc<UpstreamSettings>,
        stats: Arc<ResilienceStats>,
    ) -> std::io::Result<UpstreamPool> {
        let health = match &settings.health_check {
            None => None,
            Some(hc) => {
                let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                // The group's `host` when set; otherwise the upstream's name, as ever.
                let host = settings.host.as_deref().unwrap_or(settings.name.as_str());
                req.insert_header("host", host)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                req.insert_header("user-agent", "edgeslice-health-check")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let check = Arc::new(PerServerCheck {
                    settings: settings.clone(),
                    req,
                    timeout: hc.timeout,
                    healthy_after: hc.healthy_after as usize,
                    unhealthy_after: hc.unhealthy_after as usize,
                    checks: Mutex::default(),
                });
                let registry = Arc::new(HealthRegistry::new());
                registry.set_health_check(Box::new(SharedCheck(check.clone())));
                let mut service = HealthCheckService::new(registry.clone());
                service.health_check_frequency = Some(hc.interval);
                service.parallel_health_check = true;
                Some(Health {
                    registry,
                    service: Arc::new(service),
                    check,
                })
            }
        };
        let retry = settings.retry;
        let metrics = Arc::new(stats.metrics.upstream(&settings.name));
        let mut pool = UpstreamPool {
            budget: RetryBudget::new(retry.budget_percent, BUDGET_MIN_RETRIES, BUDGET_WINDOW),
            failing_urls: FailingUrls::new(),
            backoff: Backoff {
                base: retry.backoff,
                max: retry.max_backoff,
            },
            servers: ArcSwap::from_pointee(ServerSet::empty(&stats)),
            names: Mutex::default(),
            health,
            trip_lock: Arc::default(),
            tls_failures: TlsFailureLog::default(),
            metrics,
            settings,
            stats,
        };
        let first = ServerSet::build(
            &pool,
            Names::default().servers(&pool.settings.servers),
            None,
        );
        pool.servers = ArcSwap::from_pointee(first);
        Ok(pool)
    }

    /// The servers in force now.
    pub fn server_set(&self) -> Arc<ServerSet> {
        self.servers.load_full()
    }

    /// How many servers the group has now.
    pub fn server_count(&self) -> usize {
        self.servers.load().servers.len()
    }

    /// Put `servers` in force, unless they are the servers in force already (then nothing
    /// changes). Servers that stay keep their breaker, figures and health.
    pub fn set_servers(&self, servers: Vec<ServerSpec>) {
        let now = self.servers.load_full();
        if now.servers == servers {
            return;
        }
        let next = ServerSet::build(self, servers, Some(&now));
        if let Some(h) = &self.health {
            h.check.retain(&next.members);
        }
        self.tls_failures.retain(|a| next.members.contains_key(a));
        self.servers.store(Arc::new(next));
    }

    /// A round of lookups of the group's names (`origin::resolve`): take the answers (logging
    /// what changed, counting the failures) and put the servers they make in force.
    pub fn resolved(&self, answers: &[(HostPort, Answer)]) {
        let servers = {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            let failed = names.observe_all(self.name(), answers);
            self.metrics.resolve_failures.inc_by(failed);
            names.servers(&self.settings.servers)
        };
        self.set_servers(servers);
    }

    /// Start from what `previous` (the pool this one replaces) knows of the names both have,
    /// so that a reload does not take a name's servers away until its next lookup.
    pub fn adopt_names(&self, previous: &UpstreamPool) {
        let servers = {
            let theirs = previous
                .names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.adopt(&theirs, &self.settings);
            names.servers(&self.settings.servers)
        };
        self.set_servers(servers);
    }

    /// Count a try after the first (cache fetch or pass-through).
    pub fn count_retry(&self) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.retries.inc();
    }

    /// Count a try sent to `server` and what became of it.
    pub fn count_request(&self, server: SocketAddr, outcome: OriginOutcome) {
        if let Some(m) = self.servers.load().members.get(&server) {
            m.metrics.request(outcome);
        }
    }

    /// The counter of body bytes `server` sends in an answer with `status`.
    pub fn body_bytes(&self, server: SocketAddr, status: u16) -> Option<IntCounter> {
        self.servers
            .load()
            .members
            .get(&server)
            .map(|m| m.metrics.body_bytes(status))
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The active health-check loop (Pingora's, every `health_check.interval`, over every
    /// server of the sets in use) until `shutdown` turns true; `None` without `health_check`.
    /// Whoever runs it owns it: the reload module spawns one per pool and aborts it when no
    /// configuration snapshot holds the pool.
    pub fn health_checks(
        &self,
        shutdown: pingora_core::server::ShutdownWatch,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        use pingora_core::services::background::BackgroundService;
        let service = self.health.as_ref()?.service.clone();
        Some(Box::pin(async move { service.start(shutdown).await }))
    }

    pub fn breaker(&self, addr: &SocketAddr) -> Option<Arc<Breaker>> {
        self.servers
            .load()
            .members
            .get(addr)
            .map(|m| m.breaker.clone())
    }

    /// Choose a server for `key` (the cache key under consistent hashing): healthy, admitted by
    /// its breaker, and not in `tried` when another such server exists (for a retry, preferably
    /// one whose last outcomes were all good: [`UpstreamPool::pick_retry`]). When no server is
    /// admitted (all ejected or marked down), panic routing picks one anyway, preferring one not
    /// yet tried; such a try carries no admission. `None` only when the group has no server
    /// (its names do not resolve).
    pub fn pick(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Selected> {
        let set = self.servers.load_full();
        if set.servers.is_empty() {
            return None;
        }
        if let Some(sel) = Self::pick_retry(&set, key, tried)
            .or_else(|| Self::pick_where(&set, key, |a| !tried.contains(a)))
            .or_else(|| Self::pick_where(&set, key, |_| true))
        {
            return Some(sel);
        }
        self.stats.all_ejected.fetch_add(1, Ordering::Relaxed);
        let member = Self::panic_pick(&set, key, |a| !tried.contains(a))
            .or_else(|| Self::panic_pick(&set, key, |_| true))
            .or_else(|| set.servers.first().and_then(|s| set.members.get(&s.addr)))
            .cloned()?;
        log::debug!(
            "{}: every server is ejected; panic routing to {}",
            self.name(),
            member.spec.addr
        );
        Some(Selected {
            addr: member.spec.addr,
            breaker: member.breaker.clone(),
            admission: None,
            panic: true,
            set,
            peer: member.peer.clone(),
        })
    }

    /// The server at `addr` when it is in the group and its breaker admits a try now (a peer
    /// the cluster's ring chose, not the group's balancer); no panic routing.
    pub fn pick_server(&self, addr: SocketAddr) -> Option<Selected> {
        let set = self.servers.load_full();
        let member = set.members.get(&addr)?;
        if !member.breaker.allows() {
            return None;
        }
        let admission = member.breaker.try_acquire()?;
        Some(Self::admitted(&set, member, admission))
    }

    /// A server not in `tried` that is in rotation (healthy, breaker admitting), if any: where
    /// a gateway answer (502/503/504) may be retried. Never a server already tried, and no
    /// panic routing: with none left, the gateway answer stands.
    pub fn pick_untried(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Selected> {
        let set = self.servers.load_full();
        Self::pick_retry(&set, key, tried)
            .or_else(|| Self::pick_where(&set, key, |a| !tried.contains(a)))
    }

    /// For a retry (`tried` not empty): an untried server whose last outcomes were all good
    /// ([`Breaker::is_clean`]), so that a retry after a failure does not land on a server that
    /// is failing too (a dead one not yet ejected, an outlier held back by the cap) while a
    /// clean one is there. First tries are never steered this way: they keep every server's
    /// record current.
    fn pick_retry(set: &Arc<ServerSet>, key: &[u8], tried: &[SocketAddr]) -> Option<Selected> {
        if tried.is_empty() {
            return None;
        }
        Self::pick_where(set, key, |a| {
            !tried.contains(a) && set.members.get(a).is_some_and(|m| m.breaker.is_clean())
        })
    }

    /// Whether [`UpstreamPool::pick_untried`] would likely find a server: one not in `tried`
    /// whose breaker admits traffic. Reserves nothing and ignores active health checks (the
    /// pick itself has the last word); decides whether a gateway answer is worth a retry before
    /// the retry budget is asked.
    pub fn may_pick_untried(&self, tried: &[SocketAddr]) -> bool {
        self.servers
            .load()
            .members
            .values()
            .any(|m| !tried.contains(&m.spec.addr) && m.breaker.allows())
    }

    /// Whether the whole group looks down: every server ejected or failing (a streak the
    /// ejection cap held back), or no server at all. A request with a stale copy serves it at
    /// once instead of waiting on such a group.
    pub fn all_failing(&self) -> bool {
        self.servers
            .load()
            .members
            .values()
            .all(|m| m.breaker.is_failing())
    }

    /// Any server in `want`, ignoring health and breakers (panic routing).
    fn panic_pick<'s>(
        set: &'s ServerSet,
        key: &[u8],
        want: impl Fn(&SocketAddr) -> bool,
    ) -> Option<&'s Arc<Member>> {
        let chosen: RefCell<Option<SocketAddr>> = RefCell::new(None);
        set.select_with(key, |b: &Backend, _healthy: bool| match b.addr.as_inet() {
            Some(a) if want(a) => {
                *chosen.borrow_mut() = Some(*a);
                true
            }
            _ => false,
        });
        let addr = chosen.into_inner()?;
        set.members.get(&addr)
    }

    fn pick_where(
        set: &Arc<ServerSet>,
        key: &[u8],
        want: impl Fn(&SocketAddr) -> bool,
    ) -> Option<Selected> {
        let admitted: RefCell<Option<(&Member, Admission)>> = RefCell::new(None);
        set.select_with(key, |b: &Backend, healthy: bool| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            if !healthy || !want(addr) {
                return false;
            }
            let Some(member) = set.members.get(addr) else {
                return false;
            };
            if !member.breaker.allows() {
                return false;
            }
            match member.breaker.try_acquire() {
                Some(a) => {
                    *admitted.borrow_mut() = Some((member, a));
                    true
                }
                None => false,
            }
        });
        let (member, admission) = admitted.into_inner()?;
        Some(Self::admitted(set, member, admission))
    }

    /// `member` of `set`, chosen with its breaker's `admission` (a transition it makes logged).
    fn admitted(set: &Arc<ServerSet>, member: &Member, admission: Admission) -> Selected {
        let addr = member.spec.addr;
        log_transition(set, addr, admission.transition(), None, "-");
        Selected {
            addr,
            breaker: member.breaker.clone(),
            admission: Some(admission),
            panic: false,
            set: set.clone(),
            peer: member.peer.clone(),
        }
    }

    /// A connection to `server` failed with `e`: when it is a TLS failure, log it if it is the
    /// first of its cause since the server last connected well, and return its cause.
    pub fn tls_failed(
        &self,
        server: SocketAddr,
        e: &pingora_error::Error,
        request_id: &str,
    ) -> Option<TlsCause> {
        let cause = TlsCause::of(e.etype())?;
        if self.tls_failures.first(server, cause) {
            log::error!(
                "rid={request_id} upstream {}: TLS to {server} failed ({cause:?}): {e}; charged as a connect failure, logged once until it connects again",
                self.name()
            );
        }
        Some(cause)
    }
}

impl ServerSet {
    /// A set with no server (only while a pool is being made).
    fn empty(stats: &Arc<ResilienceStats>) -> ServerSet {
        ServerSet {
            servers: Vec::new(),
            lb: Lb::RoundRobin(LoadBalancer::from_backends(Backends::new(
                discovery::Static::new(BTreeSet::new()),
            ))),
            members: HashMap::new(),
            max_ejected: 1,
            max_iterations: 1,
            stats: stats.clone(),
            trip_lock: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetrySettings, ServerEntry, ServerTarget, DEFAULT_BREAKER};
    use crate::origin::breaker::BreakerConfig;
    use crate::origin::outcome::StatusEvidence;
    use tokio::time::advance;

    const SEC: Duration = Duration::from_secs(1);

    fn pool(n: u16, max_ejected_percent: u32) -> UpstreamPool {
        let servers = (0..n)
            .map(|i| ServerEntry {
                target: ServerTarget::Addr(SocketAddr::from(([127, 0, 0, 1], 10_000 + i))),
                weight: 1,
            })
            .collect();
        pool_of(servers, max_ejected_percent)
    }

    fn pool_of(servers: Vec<ServerEntry>, max_ejected_percent: u32) -> UpstreamPool {
        let settings = UpstreamSettings {
            name: "test".into(),
            servers,
            balance: Balance::RoundRobin,
            connect_timeout: SEC,
            read_timeout: SEC,
            deadline: SEC * 5,
            min_rate: 0,
            max_ejected_percent,
            resolve_interval: SEC,
            health_check: None,
            breaker: BreakerConfig {
                failure_threshold: 3,
                open_for: SEC * 10,
                ..DEFAULT_BREAKER
            },
            retry: RetrySettings {
                attempts: 3,
                backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
                budget_percent: 100,
            },
            host: None,
            tls: None,
            http2: false,
            source: None,
        };
        UpstreamPool::new(Arc::new(settings), Arc::new(ResilienceStats::default())).expect("pool")
    }

    fn state(p: &UpstreamPool, addr: SocketAddr) -> BreakerState {
        p.breaker(&addr).expect("breaker").state()
    }

    fn addrs(p: &UpstreamPool) -> Vec<SocketAddr> {
        p.server_set().servers().iter().map(|s| s.addr).collect()
    }

    /// A pick from a group that has servers.
    fn pick(p: &UpstreamPool, key: &[u8], tried: &[SocketAddr]) -> Selected {
        p.pick(key, tried).expect("a group with servers")
    }

    /// One request whose every try gets a gateway answer, with `tries` tries.
    fn gateway_everywhere(p: &UpstreamPool, tries: usize) {
        let mut evidence = StatusEvidence::default();
        let mut tried = Vec::new();
        for _ in 0..tries {
            let sel = pick(p, b"/bad", &tried);
            tried.push(sel.addr);
            evidence.hold(sel);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_server_is_never_ejected_for_statuses() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        for _ in 0..60 {
            gateway_everywhere(&p, 3);
            // Other URLs in between work.
            pick(&p, b"/good", &[]).succeeded("t");
        }
        for _ in 0..60 {
            gateway_everywhere(&p, 3);
        }
        assert_eq!(state(&p, a), BreakerState::Closed);
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 0);
        // Connection-level failures still eject it.
        for _ in 0..3 {
            pick(&p, b"/x", &[]).failed(FailureClass::Connect, "t");
        }
        assert_eq!(state(&p, a), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_url_failing_on_every_server_charges_nobody() {
        let p = pool(2, 50);
        for _ in 0..60 {
            gateway_everywhere(&p, 2);
        }
        for a in addrs(&p) {
            assert_eq!(state(&p, a), BreakerState::Closed, "{a}");
        }
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outlier_is_ejected_once_peers_answer_the_same_requests() {
        let p = pool(2, 50);
        let [bad, good] = [addrs(&p)[0], addrs(&p)[1]];
        let mut requests = 0;
        while state(&p, bad) == BreakerState::Closed {
            requests += 1;
            assert!(requests <= 10, "ejected within a handful of requests");
            let mut evidence = StatusEvidence::default();
            let first = pick(&p, b"/any", &[]);
            if first.addr == good {
                first.succeeded("t");
                continue;
            }
            evidence.hold(first);
            let retry = pick(&p, b"/any", &[bad]);
            assert_eq!(retry.addr, good);
            evidence.answered_by(good, "t");
            retry.succeeded("t");
        }
        assert_eq!(state(&p, bad), BreakerState::Open);
        assert_eq!(state(&p, good), BreakerState::Closed);
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 3);
        // While ejected, every pick goes to the good server.
        for _ in 0..10 {
            assert_eq!(pick(&p, b"/any", &[]).addr, good);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_answered_by_the_same_server_is_not_charged() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        let mut evidence = StatusEvidence::default();
        evidence.hold(pick(&p, b"/x", &[]));
        evidence.answered_by(a, "t");
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_ejected_percent_is_ejected() {
        let p = pool(2, 50);
        // Both servers reset every request.
        for _ in 0..10 {
            for a in addrs(&p) {
                let sel = pick(&p, b"/x", &[]);
                let _ = a;
                sel.failed(FailureClass::Reset, "t");
            }
        }
        let open: Vec<_> = addrs(&p)
            .into_iter()
            .filter(|a| state(&p, *a) == BreakerState::Open)
            .collect();
        assert_eq!(open.len(), 1, "one of two may be ejected");
        assert!(p.stats.ejections_capped.load(Ordering::Relaxed) >= 1);
        assert!(p.all_failing(), "both look down");

        // With four servers and 50%, two may be ejected, never three.
        let p = pool(4, 50);
        for _ in 0..40 {
            pick(&p, b"/x", &[]).failed(FailureClass::Reset, "t");
        }
        let ejected = addrs(&p)
            .iter()
            .filter(|a| p.breaker(a).is_some_and(|b| b.is_ejected()))
            .count();
        assert_eq!(ejected, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_percent_still_lets_one_server_go() {
        let p = pool(3, 0);
        for _ in 0..30 {
            pick(&p, b"/x", &[]).failed(FailureClass::ReadTimeout, "t");
        }
        let ejected = addrs(&p)
            .iter()
            .filter(|a| p.breaker(a).is_some_and(|b| b.is_ejected()))
            .count();
        assert_eq!(ejected, 1);
    }

    fn ejected(p: &UpstreamPool) -> Vec<SocketAddr> {
        addrs(p)
            .into_iter()
            .filter(|a| p.breaker(a).is_some_and(|b| b.is_ejected()))
            .collect()
    }

    /// Charge `class` to `addr` until its breaker has seen `n` failures.
    fn charge_n(p: &UpstreamPool, addr: SocketAddr, class: FailureClass, n: usize) {
        let mut charged = 0;
        while charged < n {
            let sel = pick(p, b"/x", &[]);
            if sel.addr == addr {
                sel.failed(class, "t");
                charged += 1;
            } else {
                sel.succeeded("t");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_server_neither_fills_nor_is_held_by_the_cap() {
        // Three servers, 50 %: one outlier ejection at a time.
        for max in [0, 50] {
            let p = pool(3, max);
            let [dead, failing, _good] = [addrs(&p)[0], addrs(&p)[1], addrs(&p)[2]];
            charge_n(&p, dead, FailureClass::Connect, 3);
            assert_eq!(ejected(&p), vec![dead]);
            // The dead server's ejection leaves room for the outlier.
            charge_n(&p, failing, FailureClass::GatewayStatus, 3);
            assert_eq!(
                ejected(&p).len(),
                2,
                "max {max}: the outlier is ejected too"
            );
            assert_eq!(state(&p, failing), BreakerState::Open);
            assert_eq!(p.stats.ejections_capped.load(Ordering::Relaxed), 0);
        }

        // The other way round: an outlier fills the cap, a down server is ejected anyway.
        let p = pool(3, 0);
        let [a, b, c] = [addrs(&p)[0], addrs(&p)[1], addrs(&p)[2]];
        charge_n(&p, a, FailureClass::Reset, 3);
        charge_n(&p, b, FailureClass::ConnectTimeout, 3);
        assert_eq!(ejected(&p).len(), 2);
        // A second outlier is held back: only one outlier ejection at a time.
        charge_n(&p, c, FailureClass::TooSlow, 3);
        assert_eq!(state(&p, c), BreakerState::Closed);
        assert!(p.stats.ejections_capped.load(Ordering::Relaxed) >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_server_probed_back_into_an_outlier_counts_as_one() {
        let p = pool(3, 0);
        let [a, b, _c] = [addrs(&p)[0], addrs(&p)[1], addrs(&p)[2]];
        charge_n(&p, a, FailureClass::Connect, 3);
        advance(SEC * 10).await;
        // Its probe now connects but resets: ejected again, as an outlier this time.
        let probe = p.pick_untried(b"/x", &[b, _c]).expect("the probe");
        assert_eq!(probe.addr, a);
        probe.failed(FailureClass::Reset, "t");
        assert_eq!(state(&p, a), BreakerState::Open);
        // So the cap (one outlier) is full: b is held back.
        charge_n(&p, b, FailureClass::GatewayStatus, 3);
        assert_eq!(state(&p, b), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_prefers_a_server_whose_last_outcomes_were_good() {
        let p = pool(3, 50);
        let [a, b, c] = [addrs(&p)[0], addrs(&p)[1], addrs(&p)[2]];
        // a failed once (below the threshold): still in rotation, but not clean.
        charge_n(&p, a, FailureClass::Connect, 1);
        assert_eq!(state(&p, a), BreakerState::Closed);
        for _ in 0..20 {
            // A retry after b failed goes to c, never to a, whatever the rotation.
            let sel = pick(&p, b"/x", &[b]);
            assert_eq!(sel.addr, c);
            sel.succeeded("t");
            assert_eq!(p.pick_untried(b"/x", &[b]).map(|s| s.addr), Some(c));
        }
        // With no clean server untried, any untried one.
        assert_eq!(pick(&p, b"/x", &[b, c]).addr, a);
        // First tries are not steered: a still gets its share.
        let firsts: Vec<SocketAddr> = (0..6).map(|_| pick(&p, b"/x", &[]).addr).collect();
        assert!(firsts.contains(&a), "{firsts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_server_ejected_means_panic_routing_not_failure() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        for _ in 0..3 {
            pick(&p, b"/x", &[]).failed(FailureClass::Connect, "t");
        }
        assert_eq!(state(&p, a), BreakerState::Open);
        assert!(p.all_failing());
        let sel = pick(&p, b"/x", &[]);
        assert_eq!(sel.addr, a);
        assert!(sel.panic, "routed in panic mode");
        // A panic try reports nothing to the breaker.
        sel.failed(FailureClass::Connect, "t");
        sel_ok(&p);
        assert_eq!(state(&p, a), BreakerState::Open);
        assert!(p.stats.all_ejected.load(Ordering::Relaxed) >= 2);
        // After the ejection, a normal probe.
        advance(SEC * 10).await;
        assert!(!p.all_failing());
        let probe = pick(&p, b"/x", &[]);
        assert!(!probe.panic);
        probe.succeeded("t");
        assert_eq!(state(&p, a), BreakerState::Closed);
    }

    fn sel_ok(p: &UpstreamPool) {
        let s = pick(p, b"/x", &[]);
        assert!(s.panic);
        s.succeeded("t");
    }

    #[tokio::test(start_paused = true)]
    async fn client_side_endings_count_nothing() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        for _ in 0..3 {
            pick(&p, b"/x", &[]).failed(FailureClass::Connect, "t");
        }
        advance(SEC * 10).await;
        // HalfOpen: a released probe (the client went away) neither closes nor reopens.
        let probe = pick(&p, b"/x", &[]);
        assert!(!probe.panic);
        assert_eq!(state(&p, a), BreakerState::HalfOpen);
        probe.release();
        assert_eq!(state(&p, a), BreakerState::HalfOpen);
        let probe = pick(&p, b"/x", &[]);
        assert!(!probe.panic, "the released slot is free again");
        probe.succeeded("t");
        assert_eq!(state(&p, a), BreakerState::Closed);
        for _ in 0..100 {
            pick(&p, b"/x", &[]).release();
        }
        assert_eq!(state(&p, a), BreakerState::Closed);
    }

    fn at(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 80))
    }

    /// A group of one IP server and the name `origin`, weight 2.
    fn named_pool() -> UpstreamPool {
        pool_of(
            vec![
                ServerEntry {
                    target: ServerTarget::Addr(at(9)),
                    weight: 1,
                },
                ServerEntry {
                    target: ServerTarget::Name {
                        host: "origin".into(),
                        port: 80,
                    },
                    weight: 2,
                },
            ],
            50,
        )
    }

    fn origin_is(p: &UpstreamPool, answer: crate::origin::resolve::Answer) {
        p.resolved(&[(("origin".to_string(), 80), answer)]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_address_of_a_name_is_a_server_and_the_set_follows_dns() {
        let p = named_pool();
        assert_eq!(addrs(&p), vec![at(9)], "the name has no server yet");
        origin_is(&p, Ok(vec![at(2), at(1)]));
        assert_eq!(addrs(&p), vec![at(9), at(1), at(2)]);
        let set = p.server_set();
        assert_eq!(set.servers()[1].weight, 2);
        assert_eq!(set.servers()[1].name.as_deref(), Some("origin"));
        // Round robin reaches every address.
        let picked: BTreeSet<SocketAddr> = (0..10).map(|_| pick(&p, b"/x", &[]).addr).collect();
        assert_eq!(picked, [at(1), at(2), at(9)].into_iter().collect());

        // The same answer in another order changes nothing at all: the very same set.
        origin_is(&p, Ok(vec![at(1), at(2)]));
        assert!(Arc::ptr_eq(&set, &p.server_set()));

        // A server that stays keeps its breaker (ejected here); one that goes is forgotten.
        charge_n(&p, at(1), FailureClass::Connect, 3);
        let breaker = p.breaker(&at(1)).expect("breaker");
        assert_eq!(breaker.state(), BreakerState::Open);
        origin_is(&p, Ok(vec![at(1), at(3)]));
        assert_eq!(addrs(&p), vec![at(9), at(1), at(3)]);
        assert!(Arc::ptr_eq(&breaker, &p.breaker(&at(1)).expect("kept")));
        assert!(p.breaker(&at(2)).is_none());
        assert_eq!(state(&p, at(3)), BreakerState::Closed);
        // A selection made before the change still reports to the server it chose.
        let before = pick(&p, b"/y", &[at(1), at(9)]);
        assert_eq!(before.addr, at(3));
        origin_is(&p, Ok(vec![at(4)]));
        assert_eq!(
            before.peer._address.as_inet(),
            Some(&at(3)),
            "it keeps the peer of the server it chose, gone from the group"
        );
        before.succeeded("t");

        // DNS says the name is gone: only the IP server is left.
        origin_is(
            &p,
            Err(crate::origin::resolve::ResolveError::NoAddress(
                "NXDOMAIN".into(),
            )),
        );
        assert_eq!(addrs(&p), vec![at(9)]);
        assert_eq!(p.metrics.resolve_failures.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_without_a_server_picks_nothing_and_looks_down() {
        let p = pool_of(
            vec![ServerEntry {
                target: ServerTarget::Name {
                    host: "late".into(),
                    port: 80,
                },
                weight: 1,
            }],
            50,
        );
        assert_eq!(p.server_count(), 0);
        assert!(p.pick(b"/x", &[]).is_none());
        assert!(p.pick_untried(b"/x", &[]).is_none());
        assert!(!p.may_pick_untried(&[]));
        assert!(p.all_failing());
        p.resolved(&[(("late".to_string(), 80), Ok(vec![at(5)]))]);
        assert_eq!(pick(&p, b"/x", &[]).addr, at(5));
        assert!(!p.all_failing());
    }
}
