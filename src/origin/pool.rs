//! An upstream group at run time: its servers behind Pingora's load balancer (round robin or
//! Ketama consistent hashing, both weighted), optional active health checks (Pingora's HTTP
//! check, run as a background service), a circuit breaker per server (passive health: failures
//! seen on real traffic), and the retry budget and backoff shared by the group's requests.
//!
//! Selection reads breaker state with atomics only; it never waits. When every server is
//! ejected, selection fails at once, so the request fails fast instead of waiting on timeouts.

use super::backoff::Backoff;
use super::breaker::{Admission, Breaker, BreakerState, Transition};
use super::budget::RetryBudget;
use super::ResilienceStats;
use crate::config::{Balance, UpstreamSettings};
use pingora_core::services::background::GenBackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{discovery, Backend, Backends, LoadBalancer};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
    pub budget: RetryBudget,
    pub backoff: Backoff,
    pub stats: Arc<ResilienceStats>,
    max_iterations: usize,
}

/// A server chosen for one try, holding its breaker admission until the outcome is reported.
pub struct Selected {
    pub addr: SocketAddr,
    breaker: Arc<Breaker>,
    admission: Option<Admission>,
    stats: Arc<ResilienceStats>,
}

impl Selected {
    /// The try worked (a response below 500, or a body read to its end).
    pub fn succeeded(mut self, request_id: &str) {
        if let Some(a) = self.admission.take() {
            let t = self.breaker.record_success(a);
            log_transition(&self.stats, self.addr, t, request_id);
        }
    }

    /// The try failed: connect error, timeout, 5xx, or a reset mid-body.
    pub fn failed(mut self, request_id: &str) {
        if let Some(a) = self.admission.take() {
            let t = self.breaker.record_failure(a);
            log_transition(&self.stats, self.addr, t, request_id);
        }
    }
}

fn log_transition(
    stats: &ResilienceStats,
    addr: SocketAddr,
    t: Option<Transition>,
    request_id: &str,
) {
    let Some(t) = t else { return };
    let counter = match t.to {
        BreakerState::Open => &stats.breaker_opened,
        BreakerState::HalfOpen => &stats.breaker_half_opened,
        BreakerState::Closed => &stats.breaker_closed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    log::warn!(
        "rid={request_id} circuit breaker of {addr}: {:?} -> {:?}",
        t.from,
        t.to
    );
}

/// Why no server could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// Every server's breaker is open (or health checks mark it down).
    AllEjected,
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
        if let Some(hc) = &settings.health_check {
            let mut check = HttpHealthCheck::new(&settings.name, false);
            check.consecutive_success = hc.healthy_after as usize;
            check.consecutive_failure = hc.unhealthy_after as usize;
            check.peer_template.options.connection_timeout = Some(hc.timeout);
            check.peer_template.options.read_timeout = Some(hc.timeout);
            let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            req.insert_header("host", settings.name.as_str())
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            req.insert_header("user-agent", "edgeslice-health-check")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            check.req = req;
            discovered.set_health_check(Box::new(check));
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
        let breakers = settings
            .servers
            .iter()
            .map(|s| (s.addr, Arc::new(Breaker::new(settings.breaker.clone()))))
            .collect();
        let retry = settings.retry;
        let weight_sum: usize = settings.servers.iter().map(|s| s.weight as usize).sum();
        Ok(UpstreamPool {
            budget: RetryBudget::new(retry.budget_percent, BUDGET_MIN_RETRIES, BUDGET_WINDOW),
            backoff: Backoff {
                base: retry.backoff,
                max: retry.max_backoff,
            },
            max_iterations: weight_sum + settings.servers.len() + 1,
            settings,
            lb,
            breakers,
            stats,
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The background service that runs active health checks, if configured.
    pub fn health_service(&self) -> Option<Box<dyn pingora_core::services::ServiceWithDependents>> {
        self.settings.health_check.as_ref()?;
        let name = format!("health check {}", self.settings.name);
        Some(match &self.lb {
            Lb::RoundRobin(l) => Box::new(GenBackgroundService::new(name, l.clone()))
                as Box<dyn pingora_core::services::ServiceWithDependents>,
            Lb::Hash(l) => Box::new(GenBackgroundService::new(name, l.clone())),
        })
    }

    pub fn breaker(&self, addr: &SocketAddr) -> Option<&Arc<Breaker>> {
        self.breakers.get(addr)
    }

    /// Choose a server for `key` (the cache key under consistent hashing): healthy, admitted by
    /// its breaker, and not in `tried` when another such server exists.
    pub fn pick(&self, key: &[u8], tried: &[SocketAddr]) -> Result<Selected, PickError> {
        self.pick_where(key, |a| !tried.contains(a))
            .or_else(|_| self.pick_where(key, |_| true))
    }

    fn pick_where(
        &self,
        key: &[u8],
        want: impl Fn(&SocketAddr) -> bool,
    ) -> Result<Selected, PickError> {
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
        let Some((addr, breaker, admission)) = admitted.into_inner() else {
            return Err(PickError::AllEjected);
        };
        log_transition(&self.stats, addr, admission.transition(), "-");
        Ok(Selected {
            addr,
            breaker,
            admission: Some(admission),
            stats: self.stats.clone(),
        })
    }

    /// A Pingora peer for `addr` with this group's timeouts: `connect_timeout` per connection
    /// attempt, `read_timeout` as the idle time allowed between reads.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
        peer.options.write_timeout = Some(self.settings.read_timeout);
        peer
    }
}
