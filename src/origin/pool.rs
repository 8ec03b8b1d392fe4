//! An upstream group at run time: its servers behind Pingora's load balancer (round robin or
//! Ketama consistent hashing, both weighted), optional active health checks (Pingora's HTTP
//! check, run by its owner: [`UpstreamPool::health_checks`]), a circuit breaker per server
//! (passive health: failures seen on real traffic, attributed by `origin::outcome`), and the
//! retry budget and backoff shared by the group's requests.
//!
//! Selection reads breaker state with atomics only; it never waits.
//!
//! Each server's Pingora peer (plain or TLS, `origin::peer`) is built once with the pool and
//! used by every connection to it: fills, revalidations, resumes, pass-through, health checks.
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
use super::ResilienceStats;
use crate::config::{Balance, UpstreamSettings};
use crate::metrics::{OriginOutcome, UpstreamMetrics};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{discovery, Backend, Backends, LoadBalancer};
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
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Hash(Arc<LoadBalancer<Consistent>>),
}

pub struct UpstreamPool {
    pub settings: Arc<UpstreamSettings>,
    lb: Lb,
    /// Built once; read-only afterwards, so lookups take no lock.
    breakers: HashMap<SocketAddr, Arc<Breaker>>,
    /// What outcome reports need: stats, the trip lock and the ejection cap.
    group: Arc<GroupView>,
    pub budget: RetryBudget,
    /// URLs that just failed on every server: their gateway answers are not retried.
    pub failing_urls: FailingUrls,
    pub backoff: Backoff,
    pub stats: Arc<ResilienceStats>,
    /// This group's and its servers' figures for `/metrics`.
    pub metrics: Arc<UpstreamMetrics>,
    max_iterations: usize,
    /// Each server's peer (`origin::peer`), built once: TLS settings, CA, timeouts.
    peers: HashMap<SocketAddr, HttpPeer>,
    /// TLS failures already logged, per server and cause.
    pub tls_failures: TlsFailureLog,
}

/// A server chosen for one try, holding its breaker admission until the outcome is reported.
/// Dropping it unreported (see [`Selected::release`]) counts nothing.
pub struct Selected {
    pub addr: SocketAddr,
    breaker: Arc<Breaker>,
    admission: Option<Admission>,
    /// Chosen by panic routing (every server was ejected): no admission, nothing is reported.
    pub panic: bool,
    group: Arc<GroupView>,
}

/// What a [`Selected`] needs of its group to report an outcome.
struct GroupView {
    stats: Arc<ResilienceStats>,
    metrics: Arc<UpstreamMetrics>,
    /// Held while a failure is recorded, so that two servers tripping at once cannot both slip
    /// under the ejection cap. Taken only on failures, never on the success path.
    trip_lock: Arc<Mutex<()>>,
    /// Every server of the group, to count how many are ejected as outliers before a trip.
    members: Vec<Member>,
    /// Outlier ejections allowed at once (`max_ejected_percent` of the group, at least 1).
    max_ejected: usize,
}

/// A server's breaker and why it was last ejected.
struct Member {
    breaker: Arc<Breaker>,
    /// Its last trip was for being down (connect failures), not as an outlier: while ejected
    /// it does not count towards `max_ejected`. Written under `trip_lock`.
    down: AtomicBool,
}

impl Selected {
    /// The try worked: an answer that was not a gateway status, or a body read to its end.
    pub fn succeeded(mut self, request_id: &str) {
        if let Some(a) = self.admission.take() {
            let t = self.breaker.record_success(a);
            log_transition(&self.group, self.addr, t, None, request_id);
        }
    }

    /// The try failed by the server's own fault (see `origin::outcome`): charge its breaker.
    /// A `Closed → Open` trip for a down server ([`FailureClass::is_down`]) always happens; an
    /// outlier's only while fewer than `max_ejected` other servers are ejected as outliers.
    pub fn failed(mut self, class: FailureClass, request_id: &str) {
        self.group.stats.count_failure(class);
        let Some(a) = self.admission.take() else {
            return;
        };
        let g = &self.group;
        let _trip = g.trip_lock.lock().unwrap_or_else(|e| e.into_inner());
        let me = &self.breaker;
        let mut may_eject = || {
            if class.is_down() {
                return true;
            }
            let others = g
                .members
                .iter()
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
            if let Some(m) = g.members.iter().find(|m| Arc::ptr_eq(&m.breaker, me)) {
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
    group: &GroupView,
    addr: SocketAddr,
    t: Option<Transition>,
    class: Option<FailureClass>,
    request_id: &str,
) {
    let Some(t) = t else { return };
    let stats = &group.stats;
    if let Some(m) = group.metrics.server(&addr) {
        m.transition(t.to);
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

/// The group's active health check: one Pingora HTTP check per server, each made from that
/// server's peer.
struct PerServerCheck {
    checks: HashMap<SocketAddr, HttpHealthCheck>,
    healthy_after: usize,
    unhealthy_after: usize,
}

#[async_trait::async_trait]
impl pingora_load_balancing::health_check::HealthCheck for PerServerCheck {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        let check = target.addr.as_inet().and_then(|a| self.checks.get(a));
        match check {
            Some(c) => c.check(target).await,
            None => pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "health check of a server not in the group",
            ),
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.healthy_after
        } else {
            self.unhealthy_after
        }
    }
}

impl UpstreamPool {
    pub fn new(
        settings: Arc<UpstreamSettings>,
        stats: Arc<ResilienceStats>,
    ) -> std::io::Result<UpstreamPool> {
        let mut backends = BTreeSet::new();
        for s in &settings.servers {
            let b = Backend::new_with_weight(&s.addr.to_string(), s.weight as usize)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            backends.insert(b);
        }
        let mut discovered = Backends::new(discovery::Static::new(backends));
        let peers: HashMap<SocketAddr, HttpPeer> = settings
            .servers
            .iter()
            .map(|s| (s.addr, peer_for(&settings, s)))
            .collect();
        if let Some(hc) = &settings.health_check {
            // Pingora's HTTP check, one per server so that each is made from that server's own
            // peer (over TLS for an HTTPS group, with the server's SNI and verification).
            let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // The group's `host` when set; otherwise the upstream's name, as ever.
            let host = settings.host.as_deref().unwrap_or(settings.name.as_str());
            req.insert_header("host", host)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            req.insert_header("user-agent", "edgeslice-health-check")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let checks = peers
                .iter()
                .map(|(addr, peer)| {
                    let mut check = HttpHealthCheck::new(&settings.name, false);
                    check.consecutive_success = hc.healthy_after as usize;
                    check.consecutive_failure = hc.unhealthy_after as usize;
                    check.peer_template = peer.clone();
                    check.peer_template.options.connection_timeout = Some(hc.timeout);
                    check.peer_template.options.read_timeout = Some(hc.timeout);
                    check.peer_template.options.write_timeout = Some(hc.timeout);
                    check.req = req.clone();
                    (*addr, check)
                })
                .collect();
            discovered.set_health_check(Box::new(PerServerCheck {
                checks,
                healthy_after: hc.healthy_after as usize,
                unhealthy_after: hc.unhealthy_after as usize,
            }));
        }
        let interval = settings.health_check.as_ref().map(|h| h.interval);
        let lb = match settings.balance {
            Balance::RoundRobin => {
                let mut lb = LoadBalancer::<RoundRobin>::from_backends(discovered);
                lb.health_check_frequency = interval;
                lb.parallel_health_check = true;
                Lb::RoundRobin(Arc::new(lb))
            }
            Balance::ConsistentHash => {
                let mut lb = LoadBalancer::<Consistent>::from_backends(discovered);
                lb.health_check_frequency = interval;
                lb.parallel_health_check = true;
                Lb::Hash(Arc::new(lb))
            }
        };
        // Static discovery never blocks: load the backends into the selector now.
        use futures::FutureExt;
        let loaded = match &lb {
            Lb::RoundRobin(l) => l.update().now_or_never(),
            Lb::Hash(l) => l.update().now_or_never(),
        };
        if !matches!(loaded, Some(Ok(()))) {
            return Err(std::io::Error::other(
                "loading the static server list failed",
            ));
        }
        let breakers: HashMap<SocketAddr, Arc<Breaker>> = settings
            .servers
            .iter()
            .map(|s| (s.addr, Arc::new(Breaker::new(settings.breaker.clone()))))
            .collect();
        let n = settings.servers.len();
        let max_ejected = (n * settings.max_ejected_percent as usize / 100).max(1);
        let server_breakers: Vec<_> = settings
            .servers
            .iter()
            .filter_map(|s| breakers.get(&s.addr).map(|b| (s.addr, b)))
            .collect();
        let metrics = Arc::new(stats.metrics.upstream(&settings.name, &server_breakers));
        let group = Arc::new(GroupView {
            metrics: metrics.clone(),
            stats: stats.clone(),
            trip_lock: Arc::new(Mutex::new(())),
            members: breakers
                .values()
                .map(|b| Member {
                    breaker: b.clone(),
                    down: AtomicBool::new(false),
                })
                .collect(),
            max_ejected,
        });
        let retry = settings.retry;
        let weight_sum: usize = settings.servers.iter().map(|s| s.weight as usize).sum();
        Ok(UpstreamPool {
            budget: RetryBudget::new(retry.budget_percent, BUDGET_MIN_RETRIES, BUDGET_WINDOW),
            failing_urls: FailingUrls::new(),
            backoff: Backoff {
                base: retry.backoff,
                max: retry.max_backoff,
            },
            max_iterations: weight_sum + settings.servers.len() + 1,
            peers,
            tls_failures: TlsFailureLog::default(),
            metrics,
            settings,
            lb,
            breakers,
            group,
            stats,
        })
    }

    /// Count a try after the first (cache fetch or pass-through).
    pub fn count_retry(&self) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.retries.inc();
    }

    /// Count a try sent to `server` and what became of it.
    pub fn count_request(&self, server: SocketAddr, outcome: OriginOutcome) {
        if let Some(m) = self.metrics.server(&server) {
            m.request(outcome);
        }
    }

    /// The counter of body bytes `server` sends in an answer with `status`.
    pub fn body_bytes(&self, server: SocketAddr, status: u16) -> Option<IntCounter> {
        self.metrics.server(&server).map(|m| m.body_bytes(status))
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The active health-check loop (Pingora's, every `health_check.interval`) until `shutdown`
    /// turns true; `None` without `health_check`. Whoever runs it owns it: the reload module
    /// spawns one per pool and aborts it when no configuration snapshot holds the pool.
    pub fn health_checks(
        &self,
        shutdown: pingora_core::server::ShutdownWatch,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        use pingora_core::services::background::BackgroundService;
        self.settings.health_check.as_ref()?;
        Some(match &self.lb {
            Lb::RoundRobin(l) => {
                let l = l.clone();
                Box::pin(async move { l.start(shutdown).await })
            }
            Lb::Hash(l) => {
                let l = l.clone();
                Box::pin(async move { l.start(shutdown).await })
            }
        })
    }

    pub fn breaker(&self, addr: &SocketAddr) -> Option<&Arc<Breaker>> {
        self.breakers.get(addr)
    }

    /// Choose a server for `key` (the cache key under consistent hashing): healthy, admitted by
    /// its breaker, and not in `tried` when another such server exists (for a retry, preferably
    /// one whose last outcomes were all good: [`UpstreamPool::pick_retry`]). When no server is
    /// admitted (all ejected or marked down), panic routing picks one anyway, preferring one not
    /// yet tried; such a try carries no admission. Never fails: a group has at least one server.
    pub fn pick(&self, key: &[u8], tried: &[SocketAddr]) -> Selected {
        if let Some(sel) = self
            .pick_retry(key, tried)
            .or_else(|| self.pick_where(key, |a| !tried.contains(a)))
            .or_else(|| self.pick_where(key, |_| true))
        {
            return sel;
        }
        self.stats.all_ejected.fetch_add(1, Ordering::Relaxed);
        let addr = self
            .panic_pick(key, |a| !tried.contains(a))
            .or_else(|| self.panic_pick(key, |_| true))
            .or_else(|| self.settings.servers.first().map(|s| s.addr));
        let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        log::debug!(
            "{}: every server is ejected; panic routing to {addr}",
            self.name()
        );
        Selected {
            addr,
            breaker: self
                .breakers
                .get(&addr)
                .cloned()
                .unwrap_or_else(|| Arc::new(Breaker::new(self.settings.breaker.clone()))),
            admission: None,
            panic: true,
            group: self.group.clone(),
        }
    }

    /// A server not in `tried` that is in rotation (healthy, breaker admitting), if any: where
    /// a gateway answer (502/503/504) may be retried. Never a server already tried, and no
    /// panic routing: with none left, the gateway answer stands.
    pub fn pick_untried(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Selected> {
        self.pick_retry(key, tried)
            .or_else(|| self.pick_where(key, |a| !tried.contains(a)))
    }

    /// For a retry (`tried` not empty): an untried server whose last outcomes were all good
    /// ([`Breaker::is_clean`]), so that a retry after a failure does not land on a server that
    /// is failing too (a dead one not yet ejected, an outlier held back by the cap) while a
    /// clean one is there. First tries are never steered this way: they keep every server's
    /// record current.
    fn pick_retry(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Selected> {
        if tried.is_empty() {
            return None;
        }
        self.pick_where(key, |a| {
            !tried.contains(a) && self.breakers.get(a).is_some_and(|b| b.is_clean())
        })
    }

    /// Whether [`UpstreamPool::pick_untried`] would likely find a server: one not in `tried`
    /// whose breaker admits traffic. Reserves nothing and ignores active health checks (the
    /// pick itself has the last word); decides whether a gateway answer is worth a retry before
    /// the retry budget is asked.
    pub fn may_pick_untried(&self, tried: &[SocketAddr]) -> bool {
        self.settings.servers.iter().any(|s| {
            !tried.contains(&s.addr) && self.breakers.get(&s.addr).is_some_and(|b| b.allows())
        })
    }

    /// Whether the whole group looks down: every server ejected or failing (a streak the
    /// ejection cap held back). A request with a stale copy serves it at once instead of waiting
    /// on such a group.
    pub fn all_failing(&self) -> bool {
        self.breakers.values().all(|b| b.is_failing())
    }

    /// Any server in `want`, ignoring health and breakers (panic routing).
    fn panic_pick(&self, key: &[u8], want: impl Fn(&SocketAddr) -> bool) -> Option<SocketAddr> {
        let chosen: RefCell<Option<SocketAddr>> = RefCell::new(None);
        let accept = |b: &Backend, _healthy: bool| match b.addr.as_inet() {
            Some(a) if want(a) => {
                *chosen.borrow_mut() = Some(*a);
                true
            }
            _ => false,
        };
        let _ = match &self.lb {
            Lb::RoundRobin(l) => l.select_with(key, self.max_iterations, accept),
            Lb::Hash(l) => l.select_with(key, self.max_iterations, accept),
        };
        chosen.into_inner()
    }

    fn pick_where(&self, key: &[u8], want: impl Fn(&SocketAddr) -> bool) -> Option<Selected> {
        let admitted: RefCell<Option<(SocketAddr, Arc<Breaker>, Admission)>> = RefCell::new(None);
        let accept = |b: &Backend, healthy: bool| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            if !healthy || !want(addr) {
                return false;
            }
            let Some(breaker) = self.breakers.get(addr) else {
                return false;
            };
            if !breaker.allows() {
                return false;
            }
            match breaker.try_acquire() {
                Some(a) => {
                    *admitted.borrow_mut() = Some((*addr, breaker.clone(), a));
                    true
                }
                None => false,
            }
        };
        let _ = match &self.lb {
            Lb::RoundRobin(l) => l.select_with(key, self.max_iterations, accept),
            Lb::Hash(l) => l.select_with(key, self.max_iterations, accept),
        };
        let (addr, breaker, admission) = admitted.into_inner()?;
        log_transition(&self.group, addr, admission.transition(), None, "-");
        Some(Selected {
            addr,
            breaker,
            admission: Some(admission),
            panic: false,
            group: self.group.clone(),
        })
    }

    /// The Pingora peer for `addr` (see `origin::peer`): this group's timeouts
    /// (`connect_timeout` per connection attempt, the TLS handshake included; `read_timeout` as
    /// the idle time allowed between reads) and, for an HTTPS group, its TLS settings.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        match self.peers.get(&addr) {
            Some(p) => p.clone(),
            // Not one of ours (panic routing's last resort): plain, with the group's timeouts.
            None => peer_for(
                &self.settings,
                &crate::config::ServerSpec {
                    addr,
                    weight: 1,
                    name: None,
                },
            ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetrySettings, ServerSpec, DEFAULT_BREAKER};
    use crate::origin::breaker::BreakerConfig;
    use crate::origin::outcome::StatusEvidence;
    use tokio::time::advance;

    const SEC: Duration = Duration::from_secs(1);

    fn pool(n: u16, max_ejected_percent: u32) -> UpstreamPool {
        let settings = UpstreamSettings {
            name: "test".into(),
            servers: (0..n)
                .map(|i| ServerSpec {
                    addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + i)),
                    weight: 1,
                    name: None,
                })
                .collect(),
            balance: Balance::RoundRobin,
            connect_timeout: SEC,
            read_timeout: SEC,
            deadline: SEC * 5,
            min_rate: 0,
            max_ejected_percent,
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
        };
        UpstreamPool::new(Arc::new(settings), Arc::new(ResilienceStats::default())).expect("pool")
    }

    fn state(p: &UpstreamPool, addr: SocketAddr) -> BreakerState {
        p.breaker(&addr).expect("breaker").state()
    }

    fn addrs(p: &UpstreamPool) -> Vec<SocketAddr> {
        p.settings.servers.iter().map(|s| s.addr).collect()
    }

    /// One request whose every try gets a gateway answer, with `tries` tries.
    fn gateway_everywhere(p: &UpstreamPool, tries: usize) {
        let mut evidence = StatusEvidence::default();
        let mut tried = Vec::new();
        for _ in 0..tries {
            let sel = p.pick(b"/bad", &tried);
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
            p.pick(b"/good", &[]).succeeded("t");
        }
        for _ in 0..60 {
            gateway_everywhere(&p, 3);
        }
        assert_eq!(state(&p, a), BreakerState::Closed);
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 0);
        // Connection-level failures still eject it.
        for _ in 0..3 {
            p.pick(b"/x", &[]).failed(FailureClass::Connect, "t");
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
            let first = p.pick(b"/any", &[]);
            if first.addr == good {
                first.succeeded("t");
                continue;
            }
            evidence.hold(first);
            let retry = p.pick(b"/any", &[bad]);
            assert_eq!(retry.addr, good);
            evidence.answered_by(good, "t");
            retry.succeeded("t");
        }
        assert_eq!(state(&p, bad), BreakerState::Open);
        assert_eq!(state(&p, good), BreakerState::Closed);
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 3);
        // While ejected, every pick goes to the good server.
        for _ in 0..10 {
            assert_eq!(p.pick(b"/any", &[]).addr, good);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_answered_by_the_same_server_is_not_charged() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        let mut evidence = StatusEvidence::default();
        evidence.hold(p.pick(b"/x", &[]));
        evidence.answered_by(a, "t");
        assert_eq!(p.stats.failures_of(FailureClass::GatewayStatus), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_ejected_percent_is_ejected() {
        let p = pool(2, 50);
        // Both servers reset every request.
        for _ in 0..10 {
            for a in addrs(&p) {
                let sel = p.pick(b"/x", &[]);
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
            p.pick(b"/x", &[]).failed(FailureClass::Reset, "t");
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
            p.pick(b"/x", &[]).failed(FailureClass::ReadTimeout, "t");
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
            let sel = p.pick(b"/x", &[]);
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
            let sel = p.pick(b"/x", &[b]);
            assert_eq!(sel.addr, c);
            sel.succeeded("t");
            assert_eq!(p.pick_untried(b"/x", &[b]).map(|s| s.addr), Some(c));
        }
        // With no clean server untried, any untried one.
        assert_eq!(p.pick(b"/x", &[b, c]).addr, a);
        // First tries are not steered: a still gets its share.
        let firsts: Vec<SocketAddr> = (0..6).map(|_| p.pick(b"/x", &[]).addr).collect();
        assert!(firsts.contains(&a), "{firsts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_server_ejected_means_panic_routing_not_failure() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        for _ in 0..3 {
            p.pick(b"/x", &[]).failed(FailureClass::Connect, "t");
        }
        assert_eq!(state(&p, a), BreakerState::Open);
        assert!(p.all_failing());
        let sel = p.pick(b"/x", &[]);
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
        let probe = p.pick(b"/x", &[]);
        assert!(!probe.panic);
        probe.succeeded("t");
        assert_eq!(state(&p, a), BreakerState::Closed);
    }

    fn sel_ok(p: &UpstreamPool) {
        let s = p.pick(b"/x", &[]);
        assert!(s.panic);
        s.succeeded("t");
    }

    #[tokio::test(start_paused = true)]
    async fn client_side_endings_count_nothing() {
        let p = pool(1, 50);
        let a = addrs(&p)[0];
        for _ in 0..3 {
            p.pick(b"/x", &[]).failed(FailureClass::Connect, "t");
        }
        advance(SEC * 10).await;
        // HalfOpen: a released probe (the client went away) neither closes nor reopens.
        let probe = p.pick(b"/x", &[]);
        assert!(!probe.panic);
        assert_eq!(state(&p, a), BreakerState::HalfOpen);
        probe.release();
        assert_eq!(state(&p, a), BreakerState::HalfOpen);
        let probe = p.pick(b"/x", &[]);
        assert!(!probe.panic, "the released slot is free again");
        probe.succeeded("t");
        assert_eq!(state(&p, a), BreakerState::Closed);
        for _ in 0..100 {
            p.pick(b"/x", &[]).release();
        }
        assert_eq!(state(&p, a), BreakerState::Closed);
    }
}
