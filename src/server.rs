//! Builds the Pingora server from a validated config: the proxy service on every `listen`
//! address and the admin service on `admin.listen`.

use crate::admin::AdminApp;
use crate::cache::store::ChunkCache;
use crate::config::Config;
use crate::origin::ResilienceStats;
use crate::proxy::Edge;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// Process-level options from the command line (Pingora's own flags).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions {
    pub daemon: bool,
    pub upgrade: bool,
}

pub fn server_conf(config: &Config, run: RunOptions) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        daemon: run.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        error_log: s.error_log.clone(),
        user: s.user.clone(),
        group: s.group.clone(),
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout.as_secs()),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        ..ServerConf::default()
    }
}

/// A ready-to-run Pingora server (call `run_forever`).
pub fn build(config: Config, run: RunOptions) -> Result<Server, String> {
    let config = Arc::new(config);
    let opt = Opt {
        upgrade: run.upgrade,
        daemon: run.daemon,
        ..Opt::default()
    };
    let conf = server_conf(&config, run)
        .validate()
        .map_err(|e| e.to_string())?;
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let cache =
        Arc::new(ChunkCache::new(&config.cache).map_err(|e| format!("opening the cache: {e}"))?);
    let stats = Arc::new(ResilienceStats::default());
    let edge = Edge::new(config.clone(), cache.clone(), stats.clone())
        .map_err(|e| format!("building upstream pools: {e}"))?;
    let health_checks: Vec<_> = edge.pools().filter_map(|p| p.health_service()).collect();
    let shaping = edge.shaping_stats();
    let mut proxy =
        pingora_proxy::http_proxy_service_with_name(&server.configuration, edge, "edgeslice");
    for addr in &config.listen {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "cache drain",
        CacheDrain {
            cache: cache.clone(),
            timeout: config.server.graceful_shutdown_timeout,
        },
    ));
    for hc in health_checks {
        server.add_boxed_service(hc);
    }

    if let Some(addr) = config.admin_listen {
        let mut admin = Service::new(
            "edgeslice admin".to_string(),
            AdminApp {
                cache,
                stats,
                shaping,
            },
        );
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
    }
    Ok(server)
}

/// At a graceful shutdown, stops the cache from starting background work and waits (up to the
/// graceful shutdown timeout) for the fills and disk writes still running, so an object being
/// stored is finished rather than cut.
struct CacheDrain {
    cache: Arc<ChunkCache>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl BackgroundService for CacheDrain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Also ends when the server drops the sender: shutting down either way.
        let _ = shutdown.changed().await;
        let running = self.cache.running_tasks();
        if self.cache.drain(self.timeout).await {
            log::info!("cache: {running} background tasks finished before shutdown");
        } else {
            log::warn!(
                "cache: {} of {running} background tasks still running after {:?}; left to the runtime's shutdown",
                self.cache.running_tasks(),
                self.timeout
            );
        }
    }
}
