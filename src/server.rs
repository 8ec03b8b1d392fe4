//! Builds the Pingora server from a validated config: the proxy service on every `listen`
//! address, the admin service on `admin.listen`, and the reload task (SIGHUP, `POST /reload`)
//! that swaps the configuration snapshot the proxy reads (`crate::runtime`).

use crate::admin::AdminApp;
use crate::cache::store::ChunkCache;
use crate::config::Config;
use crate::conn::limits;
use crate::conn::table::ConnTable;
use crate::conn::Front;
use crate::metrics::{Metrics, Pulled};
use crate::origin::resolve;
use crate::origin::ResilienceStats;
use crate::proxy::Edge;
use crate::reload::{ReloadService, Reloader};
use crate::runtime::{Runtime, Shared};
use crate::tls::ListenTable;
use arc_swap::ArcSwap;
use pingora_core::listeners::Listeners;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::server::{
    ShutdownSignal, ShutdownSignalWatch, ShutdownWatch, UnixShutdownSignalWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections the admin listener holds at once (it has its own cap, apart from the proxy's).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

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

/// A ready-to-run node: the Pingora server and the cache it serves from.
pub struct Node {
    server: Server,
    cache: Arc<ChunkCache>,
    /// Shown by `/readyz` from a graceful shutdown's start.
    draining: Arc<AtomicBool>,
    drain_delay: Duration,
}

impl Node {
    /// Serve until a signal ends it, then, the runtimes gone (every disk write finished or
    /// dropped), write the disk index's snapshot so the next start loads it instead of
    /// scanning the files; then exit. Pingora's `run_forever` exits the process as soon as its
    /// runtimes are down, and a task cannot do this: the runtimes are shut down right after
    /// the grace period, cancelling whatever still awaits.
    pub fn run_forever(self) -> ! {
        self.server.run(pingora_core::server::RunArgs {
            shutdown_signal: Box::new(DrainFirst {
                draining: self.draining.clone(),
                delay: self.drain_delay,
            }),
        });
        match self.cache.save_disk_index() {
            Ok(()) => {}
            Err(e) => log::warn!(
                "disk cache: no index snapshot written ({e}): the next start scans the files"
            ),
        }
        std::process::exit(0)
    }
}

/// Pingora's signals (SIGTERM graceful, SIGQUIT upgrade, SIGINT fast), with a drain first: on
/// SIGTERM the node turns not ready (`/readyz` 503) and keeps accepting and serving for
/// `server.drain_delay`, so that load balancers take it out before its listeners close (a
/// SIGINT meanwhile ends the wait).
struct DrainFirst {
    draining: Arc<AtomicBool>,
    delay: Duration,
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for DrainFirst {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
        if !matches!(signal, ShutdownSignal::GracefulTerminate) {
            return signal;
        }
        self.draining.store(true, Ordering::Release);
        if self.delay.is_zero() {
            return signal;
        }
        log::info!(
            "SIGTERM: not ready (/readyz 503), still serving for server.drain_delay {:?}",
            self.delay
        );
        let fast = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
        match fast {
            Ok(mut fast) => {
                tokio::select! {
                    _ = tokio::time::sleep(self.delay) => signal,
                    _ = fast.recv() => ShutdownSignal::FastShutdown,
                }
            }
            Err(_) => {
                tokio::time::sleep(self.delay).await;
                signal
            }
        }
    }
}

/// A ready-to-run node (call `run_forever`); `file` is where `config` was read from, read
/// again on each reload.
pub fn build(
    config: Config,
    tls: ListenTable,
    run: RunOptions,
    file: PathBuf,
) -> Result<Node, String> {
    crate::reload::ignore_sighup_until_listening();
    // An upgrade takes over the sockets of the running instance: they are in use by design.
    if !run.upgrade {
        check_listeners(&config)?;
    }
    let config = Arc::new(config);
    let opt = Opt {
        upgrade: run.upgrade,
        daemon: run.daemon,
        ..Opt::default()
    };
    let conf = server_conf(&config, run)
        .validate()
        .map_err(|e| e.to_string())?;
    let nofile = limits::raise_nofile_limit().map_err(|e| format!("reading RLIMIT_NOFILE: {e}"))?;
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let cache =
        Arc::new(ChunkCache::new(&config.cache).map_err(|e| format!("opening the cache: {e}"))?);
    let snapshot_cache = cache.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new());
    let tls = Arc::new(tls);
    tls.warn_expiring();
    let expiry = tls.clone();
    metrics.register(Pulled::gauge(
        "edgeslice_tls_certificate_expiry_seconds",
        "When each TLS listener's certificate expires (notAfter), Unix time; name: its first DNS name.",
        &["listener", "name"],
        move || expiry.expiry_samples(),
    ));
    let stats = Arc::new(ResilienceStats::new(metrics.clone()));
    let shared = Shared::new(stats.clone(), config.server.upstream_keepalive_pool_size);
    // Upstream server names, looked up once before anything serves (at most
    // resolve::LOOKUP_TIMEOUT); a name that does not resolve is a down server (the pool logs
    // it), looked up again every resolve_interval by the reload task's loops.
    let answers = resolve::resolve_now(&config, shared.resolver().clone());
    let (runtime, _) = Runtime::build(config.clone(), None, &shared, None, &answers)
        .map_err(|e| format!("building upstream pools: {e}"))?;
    let current = Arc::new(ArcSwap::from_pointee(runtime));
    let in_force = current.clone();
    metrics.register(Pulled::gauge(
        "edgeslice_upstream_servers",
        "Servers each upstream group has now: its IP addresses and every address its host names resolve to (0: none resolves, its requests get 502).",
        &["upstream"],
        move || {
            in_force
                .load()
                .pools
                .iter()
                .map(|(name, pool)| (vec![name.clone()], pool.server_count() as f64))
                .collect()
        },
    ));
    // Fails only on opening the access log (the message names server.access_log_path).
    let edge =
        Edge::new(current.clone(), cache.clone(), stats.clone()).map_err(|e| e.to_string())?;
    // The reload task also runs the pools' health checks, the first ones included.
    let (reload, reload_handle) = ReloadService::new(
        Reloader::new(file, current.clone(), shared, edge.shaper()).with_tls(tls.clone()),
    );
    let shaping = edge.shaping_stats();
    let access_log = edge.access_log_handles();
    let early_log = edge.access_log();
    let connections = &config.server.connections;
    let max_connections = connections
        .max_connections
        .unwrap_or_else(|| limits::default_max_connections(nofile));
    if max_connections as u64 + limits::RESERVED_FDS > nofile {
        log::warn!(
            "server.max_connections {max_connections} is over what the file-descriptor limit {nofile} allows; accept() may fail before the cap is reached"
        );
    }
    log::info!(
        "connections: at most {max_connections} clients (file-descriptor limit {nofile}), keepalive_timeout {:?}, header_timeout {:?}, body_timeout {:?}, send_timeout {:?}",
        connections.keepalive_timeout,
        connections.header_timeout,
        connections.body_timeout,
        connections.send_timeout
    );
    let front = Front::new(
        pingora_proxy::http_proxy(&server.configuration, edge),
        connections,
        max_connections,
    )
    .with_access_log(early_log)
    .with_listeners(tls);
    let client_table = front.table();
    // Responses waiting for the response budget cut the clients that stopped reading longest.
    snapshot_cache
        .response_budget()
        .set_relief(client_table.clone());
    let mut listeners = Listeners::new();
    for l in &config.listen {
        listeners.add_listener(crate::conn::listener(
            &l.address.to_string(),
            l.tls.is_some(),
        ));
    }
    let proxy = Service::with_listeners("edgeslice".to_string(), listeners, front);
    if let Some((reopen, _)) = &access_log {
        server.add_service(background_service(
            "access log reopen",
            ReopenOnSigusr1 {
                flag: reopen.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "memory trim",
        crate::conn::trim::MemoryTrim {
            tables: vec![client_table.clone()],
        },
    ));
    server.add_service(proxy);
    server.add_service(background_service(
        "cache drain",
        CacheDrain {
            cache: cache.clone(),
            timeout: config.server.graceful_shutdown_timeout,
        },
    ));
    server.add_service(background_service("config reload", reload));

    if let Some(addr) = config.admin_listen {
        // Its own runtime thread and connection cap: /healthz answers while the proxy is
        // saturated.
        let admin_table = ConnTable::new(ADMIN_MAX_CONNECTIONS);
        let app = AdminApp {
            cache,
            stats,
            shaping: Some(shaping),
            connections: Some(client_table),
            admin_connections: Some(admin_table.clone()),
            access_log_dropped: access_log.map(|(_, dropped)| dropped),
            current,
            reload: Some(reload_handle),
            metrics,
            draining: draining.clone(),
        };
        app.register_figures();
        let front = Front::with_table(app, connections, admin_table);
        let mut listeners = Listeners::new();
        listeners.add_listener(crate::conn::listener(&addr.to_string(), false));
        let mut admin = Service::with_listeners("edgeslice admin".to_string(), listeners, front);
        admin.threads = Some(1);
        server.add_service(admin);
    }
    Ok(Node {
        server,
        cache: snapshot_cache,
        draining,
        drain_delay: config.server.drain_delay,
    })
}

/// Every address this instance listens on (`listen`, `admin.listen`, which also serves
/// `/metrics`), each bound once and released, before Pingora starts a thread: Pingora binds
/// its listeners inside its service threads and panics there on a bind error, leaving a
/// process with no socket that never exits. Failing here makes an address in use (or not
/// ours to bind) a clear error naming the key and address, and exit status 1.
pub fn check_listeners(config: &Config) -> Result<(), String> {
    let all = config
        .listen
        .iter()
        .map(|l| ("listen", &l.address))
        .chain(config.admin_listen.iter().map(|a| ("admin.listen", a)));
    for (key, addr) in all {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return Err(format!("{key}: cannot listen on {addr}: {e}"));
        }
    }
    Ok(())
}

/// At a graceful shutdown, stops the cache from starting background work and waits (up to the
/// graceful shutdown timeout) for the fills and disk writes still running, so an object being
/// stored is finished rather than cut (within `server.grace_period`: the runtimes are shut
/// down after it).
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

/// SIGUSR1 has the access log reopen its file (logrotate's `postrotate`), as nginx does.
struct ReopenOnSigusr1 {
    flag: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl BackgroundService for ReopenOnSigusr1 {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("access log: cannot listen for SIGUSR1 ({e}); no reopen on signal");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = usr1.recv() => {
                    if got.is_none() {
                        return;
                    }
                    log::info!("SIGUSR1: reopening the access log");
                    self.flag.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
    }
}
