//! The configuration in force, as one immutable snapshot: the validated config with the upstream
//! pools, the cache's origin groups and the cache policy built from it.
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
//! breakers, retry budget and health survive a reload. Active health checks run as tasks owned
//! by the snapshots that hold their pool (`HealthCheck`): a pool replaced or removed stops
//! being checked once the last request using it has finished. This module must never hold a
//! lock a request waits on.

use crate::cache::fill::{OriginAccess, OriginGroup};
use crate::config::{CachePolicy, Config};
use crate::origin::pool::UpstreamPool;
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
    /// Running health-check loops, by upstream name (shared with the snapshots that have the
    /// same pool).
    health: HashMap<String, Arc<HealthCheck>>,
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
        }
    }

    /// Health-check loops running now (one per health-checked pool in use).
    pub fn health_checks_running(&self) -> usize {
        self.health_running.load(Ordering::Relaxed)
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
    /// (with their health-check loop); the others are built anew. With `health`, every pool
    /// with `health_check` and no loop yet gets one, spawned on the current tokio runtime and
    /// stopped at `health`'s shutdown or when no snapshot holds it any more.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Runtime>,
        shared: &Shared,
        health: Option<&ShutdownWatch>,
    ) -> std::io::Result<(Runtime, PoolChanges)> {
        let mut changes = PoolChanges::default();
        let mut pools = HashMap::new();
        let mut origins = HashMap::new();
        let mut checks = HashMap::new();
        for (name, settings) in &config.upstreams {
            let kept = previous
                .and_then(|p| Some((p.pools.get(name)?, p.origins.get(name)?)))
                .filter(|(pool, _)| *pool.settings == **settings);
            let (pool, origin) = match kept {
                Some((pool, origin)) => {
                    changes.reused += 1;
                    if let Some(h) = previous.and_then(|p| p.health.get(name)) {
                        checks.insert(name.clone(), h.clone());
                    }
                    (pool.clone(), origin.clone())
                }
                None => {
                    changes.created += 1;
                    let pool = Arc::new(UpstreamPool::new(settings.clone(), shared.stats.clone())?);
                    let origin: OriginAccess = Arc::new(OriginGroup {
                        connector: shared.connector.clone(),
                        pool: pool.clone(),
                    });
                    (pool, origin)
                }
            };
            if let (Some(shutdown), false) = (health, checks.contains_key(name)) {
                if let Some(h) = HealthCheck::spawn(&pool, shutdown, shared) {
                    checks.insert(name.clone(), Arc::new(h));
                }
            }
            pools.insert(name.clone(), pool);
            origins.insert(name.clone(), origin);
        }
        let cache_policy = Arc::new(config.cache.policy());
        let runtime = Runtime {
            config,
            pools,
            origins,
            cache_policy,
            health: checks,
        };
        Ok((runtime, changes))
    }

    /// Health-check loops this snapshot holds.
    pub fn health_checks(&self) -> usize {
        self.health.len()
    }
}

/// One pool's health-check loop; aborted when dropped (when the last snapshot holding it goes).
struct HealthCheck {
    task: tokio::task::JoinHandle<()>,
}

impl HealthCheck {
    fn spawn(pool: &UpstreamPool, shutdown: &ShutdownWatch, shared: &Shared) -> Option<Self> {
        let run = pool.health_checks(shutdown.clone())?;
        let running = Counted::new(shared.health_running.clone());
        let task = tokio::spawn(async move {
            let _running = running;
            run.await
        });
        Some(HealthCheck { task })
    }
}

impl Drop for HealthCheck {
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
        let (first, built) = Runtime::build(config("5s"), None, &shared, None).expect("build");
        assert_eq!(
            built,
            PoolChanges {
                reused: 0,
                created: 2
            }
        );
        let (second, built) =
            Runtime::build(config("5s"), Some(&first), &shared, None).expect("build");
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
            Runtime::build(config("6s"), Some(&second), &shared, None).expect("build");
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
        let (mut current, _) =
            Runtime::build(config("5s"), None, &shared, Some(&shutdown)).expect("build");
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
            let (next, _) =
                Runtime::build(config(&timeout), Some(&current), &shared, Some(&shutdown))
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
        let (next, _) =
            Runtime::build(same, Some(&current), &shared, Some(&shutdown)).expect("build");
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
}
