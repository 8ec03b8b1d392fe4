//! The configuration in force, as one immutable snapshot: the validated config with the upstream
//! pools (the cluster's peer group among them), the cache's origin groups, the cluster's ring,
//! each route's fill tiers (`cache::fill::tiered`: peers, parent, upstream) and the cache
//! policy built from it.
//!
//! ```text
//!  reload ─► Runtime::build(new config, previous) ─► Current (ArcSwap) ─► store
//!                                                        │ load, once per request (new_ctx)
//!                                                        ▼
//!             RequestCtx.runtime: Arc<Runtime> ─► route, upstream_peer, retries, cache fill, logging
//! ```
//! A request keeps the snapshot it started with to its end, whatever reloads happen meanwhile;
//! loading it is one atomic read and a reference count, no lock.
//!
//! A pool whose settings did not change is carried into the next snapshot as it is, so its
//! breakers, retry budget, health and resolved names survive a reload. Active health checks and
//! the resolution of a group's server names (`origin::resolve`, every `resolve_interval`) run
//! as tasks owned by the snapshots that hold their pool (`Owned`): a pool replaced or removed
//! stops being checked and resolved once the last request using it has finished. A new pool
//! starts from what its predecessor's names resolved to and from the answers the caller looked
//! up for it (at start and on reload), so a reload never leaves a name without servers until
//! its next round. This module must never hold a lock a request waits on.

use crate::cache::fill::tiered::{ClusterPeers, Peers, Tiered};
use crate::cache::fill::{OriginAccess, OriginGroup};
use crate::cluster::Cluster;
use crate::config::{CachePolicy, Config, Route};
use crate::origin::pool::UpstreamPool;
use crate::origin::resolve::{self, Answers, Resolve, SystemResolver};
use crate::origin::ResilienceStats;
use arc_swap::ArcSwap;
use pingora_core::connectors::http::Connector;
use pingora_core::server::ShutdownWatch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The snapshot in force; swapped whole by a reload.
pub type Current = Arc<ArcSwap<Runtime>>;

pub struct Runtime {
    pub config: Arc<Config>,
    pub pools: HashMap<String, Arc<UpstreamPool>>,
    /// The same groups as the cache's fill stages reach them.
    pub origins: HashMap<String, OriginAccess>,
    pub cache_policy: Arc<CachePolicy>,
    /// The cluster's ring and peer group, when `cluster.peers` is set.
    pub cluster: Option<Arc<Cluster>>,
    /// Where each route's fills go (parallel to `config.routes`): for a client's request, and
    /// for a peer's (filled here, never asked of another peer).
    fills: Vec<RouteFills>,
    /// Running health-check loops, by upstream name (shared with the snapshots that have the
    /// same pool).
    health: HashMap<String, Arc<Owned>>,
    /// Running resolve loops of the groups with server names, likewise.
    resolving: HashMap<String, Arc<Owned>>,
}

/// Where one route's fills go ([`Tiered`]).
struct RouteFills {
    client: OriginAccess,
    peer: OriginAccess,
}

/// What every snapshot shares for the life of the process.
#[derive(Clone)]
pub struct Shared {
    /// Process-wide counters every pool reports to.
    pub stats: Arc<ResilienceStats>,
    /// One connector for the cache's origin fetches, so its connection pool outlives reloads.
    connector: Arc<Connector>,
    /// Health-check loops running now, all snapshots together.
    health_running: Arc<AtomicUsize>,
    /// Resolve loops running now, all snapshots together.
    resolve_running: Arc<AtomicUsize>,
    /// What upstream server names are looked up with.
    resolver: Arc<dyn Resolve>,
}

impl Shared {
    /// `keepalive_pool_size`: idle origin connections the cache's connector keeps
    /// (`server.upstream_keepalive_pool_size`, as Pingora's own for pass-through).
    pub fn new(stats: Arc<ResilienceStats>, keepalive_pool_size: usize) -> Shared {
        Shared {
            stats,
            connector: Arc::new(Connector::new(Some(
                pingora_core::connectors::ConnectorOptions::new(keepalive_pool_size),
            ))),
            health_running: Arc::new(AtomicUsize::new(0)),
            resolve_running: Arc::new(AtomicUsize::new(0)),
            resolver: Arc::new(SystemResolver),
        }
    }

    /// Look names up with `resolver` instead of the system's (tests).
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Shared {
        self.resolver = resolver;
        self
    }

    pub fn resolver(&self) -> &Arc<dyn Resolve> {
        &self.resolver
    }

    /// Health-check loops running now (one per health-checked pool in use).
    pub fn health_checks_running(&self) -> usize {
        self.health_running.load(Ordering::Relaxed)
    }

    /// Resolve loops running now (one per pool in use with server names).
    pub fn resolve_loops_running(&self) -> usize {
        self.resolve_running.load(Ordering::Relaxed)
    }
}

/// How many pools a build reused and created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolChanges {
    pub reused: usize,
    pub created: usize,
}

impl Runtime {
    /// The snapshot for `config`. Pools of `previous` whose settings are unchanged are reused
    /// (with their loops); the others are built anew, from what the previous pool of their name
    /// knew of its server names and from `answers` (lookups the caller made for them). With
    /// `tasks`, every pool with `health_check` and no loop yet gets one, and so does every pool
    /// with server names (its resolve loop): spawned on the current tokio runtime and stopped at
    /// `tasks`' shutdown or when no snapshot holds them any more.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Runtime>,
        shared: &Shared,
        tasks: Option<&ShutdownWatch>,
        answers: &Answers,
    ) -> std::io::Result<(Runtime, PoolChanges)> {
        let mut changes = PoolChanges::default();
        let mut pools = HashMap::new();
        let mut origins = HashMap::new();
        let mut checks = HashMap::new();
        let mut resolving = HashMap::new();
        for (name, settings) in config.upstream_groups() {
            let kept = previous
                .and_then(|p| Some((p.pools.get(name)?, p.origins.get(name)?)))
                .filter(|(pool, _)| *pool.settings == **settings);
            let (pool, origin) = match kept {
                Some((pool, origin)) => {
                    changes.reused += 1;
                    if let Some(p) = previous {
                        if let Some(h) = p.health.get(name) {
                            checks.insert(name.clone(), h.clone());
                        }
                        if let Some(r) = p.resolving.get(name) {
                            resolving.insert(name.clone(), r.clone());
                        }
                    }
                    (pool.clone(), origin.clone())
                }
                None => {
                    changes.created += 1;
                    let pool = Arc::new(UpstreamPool::new(settings.clone(), shared.stats.clone())?);
                    if let Some(before) = previous.and_then(|p| p.pools.get(name)) {
                        pool.adopt_names(before);
                    }
                    let looked_up: Vec<_> = resolve::names_of([&**settings])
                        .into_iter()
                        .filter_map(|n| Some((n.clone(), answers.get(&n)?.clone())))
                        .collect();
                    if !looked_up.is_empty() {
                        pool.resolved(&looked_up);
                    }
                    let origin: OriginAccess = Arc::new(OriginGroup {
                        connector: shared.connector.clone(),
                        pool: pool.clone(),
                    });
                    (pool, origin)
                }
            };
            if let Some(shutdown) = tasks {
                if !checks.contains_key(name) {
                    if let Some(run) = pool.health_checks(shutdown.clone()) {
                        let h = Owned::spawn(run, &shared.health_running);
                        checks.insert(name.clone(), Arc::new(h));
                    }
                }
                if !resolving.contains_key(name) {
                    if let Some(run) = resolve_loop(&pool, shutdown, shared) {
                        let r = Owned::spawn(run, &shared.resolve_running);
                        resolving.insert(name.clone(), Arc::new(r));
                    }
                }
            }
            pools.insert(name.clone(), pool);
            origins.insert(name.clone(), origin);
        }
        let cache_policy = Arc::new(config.cache.policy());
        let cluster = config.cluster.peers.as_ref().and_then(|p| {
            let pool = pools.get(&p.group.name)?.clone();
            Some(Arc::new(Cluster::new(p, pool)))
        });
        if let Some(c) = &cluster {
            let changed = previous
                .and_then(|p| p.cluster.as_ref())
                .is_none_or(|before| before.settings.peers != c.settings.peers);
            if changed {
                log::info!(
                    "cluster: ring of {} peers {:?}; this node is {}; shards of {} bytes",
                    c.settings.peers.len(),
                    c.settings.peers,
                    c.self_name(),
                    c.settings.shard_size
                );
            }
        }
        let peers: Option<Arc<dyn Peers>> = cluster.as_ref().map(|c| {
            Arc::new(ClusterPeers {
                cluster: c.clone(),
                connector: shared.connector.clone(),
            }) as Arc<dyn Peers>
        });
        let fills = config
            .routes
            .iter()
            .map(|r| {
                let upstream = origins.get(&r.upstream.name).cloned();
                let parent = r
                    .parent
                    .as_ref()
                    .and_then(|p| origins.get(&p.name).cloned());
                let tiered = |peers: Option<Arc<dyn Peers>>| -> Option<OriginAccess> {
                    Some(Arc::new(Tiered {
                        peers,
                        shard_size: cluster.as_ref().map(|c| c.settings.shard_size),
                        parent: parent.clone(),
                        upstream: upstream.clone()?,
                        metrics: shared.stats.metrics.fills.clone(),
                    }))
                };
                Some(RouteFills {
                    client: tiered(peers.clone())?,
                    peer: tiered(None)?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| std::io::Error::other("a route names an upstream group with no pool"))?;
        let runtime = Runtime {
            config,
            pools,
            origins,
            cache_policy,
            cluster,
            fills,
            health: checks,
            resolving,
        };
        Ok((runtime, changes))
    }

    /// Where `route`'s fills go: through the cluster's peers for a client's request, straight
    /// to the parent or upstream for a peer's (`from_peer`). `None` for a route not of this
    /// snapshot.
    pub fn fill_origin(&self, route: &Arc<Route>, from_peer: bool) -> Option<OriginAccess> {
        let i = self
            .config
            .routes
            .iter()
            .position(|r| Arc::ptr_eq(r, route))?;
        let f = &self.fills[i];
        Some(if from_peer {
            f.peer.clone()
        } else {
            f.client.clone()
        })
    }

    /// Whether a request from `ip` carrying the peer mark is a peer's.
    pub fn is_peer(&self, ip: Option<std::net::IpAddr>) -> bool {
        match (&self.cluster, ip) {
            (Some(c), Some(ip)) => c.is_peer(ip),
            _ => false,
        }
    }

    /// Health-check loops this snapshot holds.
    pub fn health_checks(&self) -> usize {
        self.health.len()
    }

    /// The upstream groups of `config` that a build over this snapshot would make anew (their
    /// names are worth looking up first: see [`Runtime::build`]).
    pub fn new_groups<'c>(&self, config: &'c Config) -> Vec<&'c crate::config::UpstreamSettings> {
        config
            .upstream_groups()
            .filter(|(name, u)| self.pools.get(*name).is_none_or(|p| *p.settings != ***u))
            .map(|(_, u)| &**u)
            .collect()
    }
}

/// A group's resolve loop: every `resolve_interval`, look each of its names up (one lookup per
/// name at a time, each bounded by `resolve::LOOKUP_TIMEOUT`) and put the servers they make in
/// force. `None` for a group of IP addresses only.
fn resolve_loop(
    pool: &Arc<UpstreamPool>,
    shutdown: &ShutdownWatch,
    shared: &Shared,
) -> Option<futures::future::BoxFuture<'static, ()>> {
    let names = resolve::names_of([&*pool.settings]);
    if names.is_empty() {
        return None;
    }
    let (pool, resolver, mut shutdown) = (pool.clone(), shared.resolver.clone(), shutdown.clone());
    Some(Box::pin(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pool.settings.resolve_interval) => {}
                _ = shutdown.changed() => return,
            }
            let answers = resolve::lookup_all(&*resolver, &names).await;
            pool.resolved(&answers);
        }
    }))
}

/// A loop owned by the snapshots holding its pool; aborted when dropped (when the last
/// snapshot holding it goes).
struct Owned {
    task: tokio::task::JoinHandle<()>,
}

impl Owned {
    fn spawn(run: futures::future::BoxFuture<'static, ()>, count: &Arc<AtomicUsize>) -> Owned {
        let running = Counted::new(count.clone());
        let task = tokio::spawn(async move {
            let _running = running;
            run.await
        });
        Owned { task }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts itself in while it lives (inside the task, so an aborted task counts itself out).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: Arc<AtomicUsize>) -> Counted {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(read_timeout: &str) -> Arc<Config> {
        let yaml = format!(
            "upstreams:\n  checked:\n    servers: [\"127.0.0.1:9\"]\n    read_timeout: {read_timeout}\n    health_check:\n      interval: 1h\n  plain:\n    servers: [\"127.0.0.1:9\"]\nroutes:\n  - upstream: plain\n"
        );
        Arc::new(Config::from_yaml(&yaml).expect("valid config"))
    }

    #[test]
    fn unchanged_pools_are_reused_changed_ones_rebuilt() {
        let shared = Shared::new(Arc::default(), 16);
        let (first, built) =
            Runtime::build(config("5s"), None, &shared, None, &Answers::new()).expect("build");
        assert_eq!(
            built,
            PoolChanges {
                reused: 0,
                created: 2
            }
        );
        let (second, built) =
            Runtime::build(config("5s"), Some(&first), &shared, None, &Answers::new())
                .expect("build");
        assert_eq!(
            built,
            PoolChanges {
                reused: 2,
                created: 0
            }
        );
        assert!(Arc::ptr_eq(
            &first.pools["checked"],
            &second.pools["checked"]
        ));
        let (third, built) =
            Runtime::build(config("6s"), Some(&second), &shared, None, &Answers::new())
                .expect("build");
        assert_eq!(
            built,
            PoolChanges {
                reused: 1,
                created: 1
            }
        );
        assert!(!Arc::ptr_eq(
            &second.pools["checked"],
            &third.pools["checked"]
        ));
        assert!(Arc::ptr_eq(&second.pools["plain"], &third.pools["plain"]));
        assert!(Arc::ptr_eq(
            &second.origins["plain"],
            &third.origins["plain"]
        ));
    }

    #[tokio::test]
    async fn health_checks_follow_the_pools_in_use() {
        let shared = Shared::new(Arc::default(), 16);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let (mut current, _) = Runtime::build(
            config("5s"),
            None,
            &shared,
            Some(&shutdown),
            &Answers::new(),
        )
        .expect("build");
        assert_eq!(
            current.health_checks(),
            1,
            "only `checked` has health_check"
        );
        assert_eq!(shared.health_checks_running(), 1);
        // Many reloads, each changing the checked group: one loop at a time, none left over.
        let mut in_flight = None;
        for i in 0..50 {
            let timeout = format!("{}s", 5 + i % 2 + 1);
            let (next, _) = Runtime::build(
                config(&timeout),
                Some(&current),
                &shared,
                Some(&shutdown),
                &Answers::new(),
            )
            .expect("build");
            // A request still holding the previous snapshot keeps its pool checked.
            in_flight = Some(std::mem::replace(&mut current, next));
            tokio::task::yield_now().await;
            assert!(shared.health_checks_running() <= 2);
        }
        drop(in_flight);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.health_checks_running(), 1);
        // An unchanged reload keeps the very same loop.
        let same = current.config.clone();
        let (next, _) = Runtime::build(
            same,
            Some(&current),
            &shared,
            Some(&shutdown),
            &Answers::new(),
        )
        .expect("build");
        assert!(Arc::ptr_eq(
            &current.health["checked"],
            &next.health["checked"]
        ));
        drop(current);
        tokio::task::yield_now().await;
        assert_eq!(shared.health_checks_running(), 1);
        drop(next);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.health_checks_running(), 0);
    }

    use std::time::Duration;

    /// Answers set by the test; counts lookups.
    #[derive(Default)]
    struct FakeDns {
        answers: std::sync::Mutex<HashMap<String, resolve::Answer>>,
        lookups: AtomicUsize,
    }

    impl FakeDns {
        fn set(&self, host: &str, answer: resolve::Answer) {
            self.answers
                .lock()
                .unwrap()
                .insert(host.to_string(), answer);
        }
    }

    #[async_trait::async_trait]
    impl Resolve for FakeDns {
        async fn resolve(&self, host: &str, port: u16) -> resolve::Answer {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            let answer = self.answers.lock().unwrap().get(host).cloned();
            answer
                .unwrap_or(Err(resolve::ResolveError::NoAddress("NXDOMAIN".into())))
                .map(|ips| {
                    ips.into_iter()
                        .map(|a| std::net::SocketAddr::new(a.ip(), port))
                        .collect()
                })
        }
    }

    fn ip(last: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, last], 0))
    }

    fn named(interval: &str, extra: &str) -> Arc<Config> {
        let yaml = format!(
            "upstreams:\n  o:\n    servers: [\"origin:80\", \"127.0.0.9:80\"]\n    resolve_interval: {interval}\n{extra}  ips:\n    servers: [\"127.0.0.1:9\"]\nroutes:\n  - upstream: o\n"
        );
        Arc::new(Config::from_yaml(&yaml).expect("valid config"))
    }

    fn servers(r: &Runtime) -> Vec<u8> {
        let mut v: Vec<u8> = r.pools["o"]
            .server_set()
            .servers()
            .iter()
            .map(|s| match s.addr.ip() {
                std::net::IpAddr::V4(a) => a.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_name_is_resolved_every_interval_and_followed() {
        let dns = Arc::new(FakeDns::default());
        let shared = Shared::new(Arc::default(), 16).with_resolver(dns.clone());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let config = named("1s", "");
        // At start the name does not resolve: only the IP server.
        let answers: Answers = resolve::lookup_all(&*dns, &[("origin".to_string(), 80)])
            .await
            .into_iter()
            .collect();
        let (current, _) =
            Runtime::build(config, None, &shared, Some(&shutdown), &answers).expect("build");
        assert_eq!(servers(&current), vec![9]);
        assert_eq!(shared.resolve_loops_running(), 1, "only `o` has a name");
        dns.set("origin", Ok(vec![ip(1)]));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(servers(&current), vec![1, 9]);
        // It moves, then fans out.
        dns.set("origin", Ok(vec![ip(2)]));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(servers(&current), vec![2, 9]);
        dns.set("origin", Ok(vec![ip(2), ip(3)]));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(servers(&current), vec![2, 3, 9]);
        // DNS stops answering: the addresses stay.
        dns.set(
            "origin",
            Err(resolve::ResolveError::Failed("timed out".into())),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(servers(&current), vec![2, 3, 9]);
        // One lookup per interval, never more.
        let n = dns.lookups.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(dns.lookups.load(Ordering::Relaxed), n + 10);
        drop(current);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.resolve_loops_running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_what_names_resolved_to() {
        let dns = Arc::new(FakeDns::default());
        dns.set("origin", Ok(vec![ip(1), ip(2)]));
        let shared = Shared::new(Arc::default(), 16).with_resolver(dns.clone());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let answers: Answers = resolve::lookup_all(&*dns, &[("origin".to_string(), 80)])
            .await
            .into_iter()
            .collect();
        let (first, _) = Runtime::build(named("1h", ""), None, &shared, Some(&shutdown), &answers)
            .expect("build");
        assert_eq!(servers(&first), vec![1, 2, 9]);
        // An unchanged reload keeps the pool and its loop.
        let (same, built) = Runtime::build(
            named("1h", ""),
            Some(&first),
            &shared,
            Some(&shutdown),
            &Answers::new(),
        )
        .expect("build");
        assert_eq!(built.created, 0);
        assert!(Arc::ptr_eq(&first.resolving["o"], &same.resolving["o"]));
        // A changed group gets a new pool: its name starts where the old pool's was, even
        // while DNS does not answer, and no second loop is left running once the old goes.
        dns.set(
            "origin",
            Err(resolve::ResolveError::Failed("timed out".into())),
        );
        let (next, built) = Runtime::build(
            named("1h", "    read_timeout: 9s\n"),
            Some(&same),
            &shared,
            Some(&shutdown),
            &Answers::new(),
        )
        .expect("build");
        assert_eq!(built.created, 1);
        assert_eq!(servers(&next), vec![1, 2, 9]);
        assert!(same.new_groups(&next.config).iter().any(|u| u.name == "o"));
        assert!(next.new_groups(&next.config).is_empty());
        drop((first, same));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.resolve_loops_running(), 1);
    }
}
