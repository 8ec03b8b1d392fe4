//! The admin endpoint (`admin.listen`): `GET /healthz` answers `ok` while the process serves;
//! `GET /readyz` answers 200 once the disk index is loaded (503 while it loads);
//! `GET /stats` reports cache occupancy. Calls that change anything are `POST`s carrying
//! `Authorization: Bearer <admin.token>` (see [`AdminApp::authorize`]): `POST /purge` (see
//! `cache::purge`) and `POST /reload`, which reads the config file again (`crate::reload`).
//! It must stay cheap and never touch the data path's locks.

use crate::cache::purge::Purge;
use crate::cache::store::{ChunkCache, PurgeOutcome};
use crate::conn::table::ConnTable;
use crate::metrics::{one, AdminAction, AdminResult, Metrics, Pulled};
use crate::origin::outcome::FailureClass;
use crate::origin::ResilienceStats;
use crate::reload::ReloadHandle;
use crate::runtime::Current;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

impl AdminApp {
    /// 200 once the node serves everything it holds; 503 while the disk index loads (the node
    /// serves meanwhile, but misses what it has not indexed yet: a load balancer may prefer a
    /// ready peer) and from a graceful shutdown's start (`server.drain_delay` before the
    /// listeners close), so that a load balancer takes the node out first.
    fn readyz(&self) -> Response<Vec<u8>> {
        if self.draining.load(Ordering::Acquire) {
            text(503, "shutting down\n")
        } else if self.cache.disk_index_loading() {
            text(
                503,
                &format!(
                    "loading the disk index: {} entries so far\n",
                    self.cache.disk_index_loaded_entries()
                ),
            )
        } else {
            text(200, "ready\n")
        }
    }

    /// Cache occupancy, one `name value` per line.
    fn stats(&self) -> String {
        let c = &self.cache;
        let r = &self.stats;
        let n = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = format!(
            "cache_memory_bytes {}\ncache_memory_capacity_bytes {}\ncache_disk_bytes {}\ncache_disk_capacity_bytes {}\ncache_fills_in_flight {}\n\
             origin_retries {}\norigin_retries_over_budget {}\norigin_breaker_opened {}\norigin_breaker_half_opened {}\n\
             origin_breaker_closed {}\norigin_all_ejected {}\norigin_resumes {}\ncache_stale_served {}\n",
            c.memory_weight(),
            c.memory_capacity(),
            c.disk_used(),
            c.disk_capacity(),
            c.flights.len(),
            n(&r.retries),
            n(&r.retries_over_budget),
            n(&r.breaker_opened),
            n(&r.breaker_half_opened),
            n(&r.breaker_closed),
            n(&r.all_ejected),
            n(&r.resumes),
            n(&r.stale_served),
        );
        out.push_str(&format!(
            "cache_disk_write_errors {}\ncache_disk_writes_skipped {}\ncache_fill_slots_free {}\ncache_tasks_running {}\n",
            c.disk_write_errors(),
            c.disk_writes_skipped(),
            c.free_fill_slots(),
            c.running_tasks(),
        ));
        out.push_str(&format!(
            "cache_metadata_bytes {}\ncache_metadata_capacity_bytes {}\ncache_disk_index_bytes {}\ncache_disk_index_capacity_bytes {}\n",
            c.metadata_bytes(),
            c.metadata_capacity(),
            c.disk_index_bytes(),
            c.disk_index_capacity(),
        ));
        out.push_str(&format!(
            "purges_pending {}\npurge_passes {}\n",
            c.pending_purges().0,
            c.ban_passes(),
        ));
        out.push_str(&format!(
            "cache_response_bytes {}\ncache_response_budget_bytes {}\ncache_response_budget_waits {}\n",
            c.response_budget().held_bytes(),
            c.response_budget().limit(),
            c.response_budget().waits(),
        ));
        out.push_str(&format!(
            "cache_disk_entries {}\ncache_disk_index_resident_bytes {}\ncache_disk_index_loading {}\ncache_disk_index_loaded_entries {}\n",
            c.disk_entries(),
            c.disk_index_resident_bytes(),
            u8::from(c.disk_index_loading()),
            c.disk_index_loaded_entries(),
        ));
        out.push_str(&format!(
            "origin_ejections_capped {}\norigin_gateway_uncharged {}\norigin_retries_given_back {}\norigin_retries_skipped_failing_url {}\n",
            n(&r.ejections_capped),
            n(&r.gateway_uncharged),
            n(&r.retries_given_back),
            n(&r.retries_skipped_failing_url),
        ));
        for class in crate::origin::outcome::FailureClass::ALL {
            out.push_str(&format!(
                "origin_failures_{} {}\n",
                class.as_str(),
                r.failures_of(class)
            ));
        }
        for (name, t) in [
            ("client", &self.connections),
            ("admin", &self.admin_connections),
        ] {
            let Some(t) = t else { continue };
            let st = &t.stats;
            out.push_str(&format!(
                "{name}_connections_open {}\n{name}_connections_max {}\n{name}_connections_accepted {}\n{name}_connections_reclaimed {}\n\
                 {name}_connections_refused {}\n{name}_keepalive_closed {}\n{name}_header_timeouts {}\n{name}_send_timeouts {}\n\
                 {name}_oversize_headers_rejected {}\n{name}_paced_aborts {}\n{name}_stalled_cut {}\n",
                t.open(),
                t.max(),
                n(&st.accepted),
                n(&st.reclaimed),
                n(&st.refused),
                n(&st.keepalive_closed),
                n(&st.header_timeouts),
                n(&st.send_timeouts),
                n(&st.oversize_rejected),
                n(&st.paced_aborts),
                n(&st.stalled_cut),
            ));
        }
        if let Some(d) = &self.access_log_dropped {
            out.push_str(&format!("access_log_dropped {}\n", n(d)));
        }
        let shaping_on = self.current.load().config.shaping.is_some();
        if let Some(sh) = self.shaping.as_ref().filter(|_| shaping_on) {
            out.push_str(&format!(
                "shaping_bytes {}\nshaping_delayed_us {}\nshaping_active_clients {}\nshaping_refused_downloads {}\nshaping_refused_connections {}\n",
                n(&sh.shaped_bytes),
                n(&sh.delayed_us),
                n(&sh.active_clients),
                n(&sh.refused_downloads),
                n(&sh.refused_connections),
            ));
        }
        out
    }
}

pub struct AdminApp {
    pub cache: Arc<ChunkCache>,
    pub stats: Arc<ResilienceStats>,
    /// Shaping counters (shown while `shaping` is configured).
    pub shaping: Option<Arc<crate::shaping::ShapingStats>>,
    /// The proxy listeners' connection table.
    pub connections: Option<Arc<ConnTable>>,
    /// The admin listener's own connection table.
    pub admin_connections: Option<Arc<ConnTable>>,
    /// Access-log lines dropped because the writer could not keep up.
    pub access_log_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The configuration in force: `admin.token` is read from it at each call, so a reload
    /// changes it.
    pub current: Current,
    /// Where `POST /reload` asks; `None`: not available.
    pub reload: Option<ReloadHandle>,
    /// The registry `GET /metrics` renders.
    pub metrics: Arc<Metrics>,
    /// Set at a graceful shutdown (SIGTERM), before the listeners close: `/readyz` is 503.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

fn load(v: &AtomicU64) -> f64 {
    v.load(Ordering::Relaxed) as f64
}

/// A family of one unlabelled sample, `read` from `source` at scrape time (a counter, or a
/// gauge).
fn read_one<T: Send + Sync + 'static>(
    counter: bool,
    name: &str,
    help: &str,
    source: &Arc<T>,
    read: fn(&T) -> f64,
) -> Pulled {
    let source = source.clone();
    let samples = move || one(read(&source));
    if counter {
        Pulled::counter(name, help, &[], samples)
    } else {
        Pulled::gauge(name, help, &[], samples)
    }
}

impl AdminApp {
    /// Adds to the registry the figures read at scrape time from what this view holds: the
    /// same sources `/stats` prints, so the two never disagree.
    pub fn register_figures(&self) {
        let m = &self.metrics;
        let cache = self.cache.clone();
        m.register(Pulled::gauge(
            "edgeslice_cache_bytes",
            "Bytes stored in the cache, by tier; memory the metadata table and the disk index take; chunk bytes responses in flight hold (responses).",
            &["tier"],
            move || {
                vec![
                    (vec!["memory".into()], cache.memory_weight() as f64),
                    (vec!["disk".into()], cache.disk_used() as f64),
                    (vec!["metadata".into()], cache.metadata_bytes() as f64),
                    (vec!["disk_index".into()], cache.disk_index_bytes() as f64),
                    (
                        vec!["responses".into()],
                        cache.response_budget().held_bytes() as f64,
                    ),
                ]
            },
        ));
        let cache = self.cache.clone();
        m.register(Pulled::gauge(
            "edgeslice_cache_capacity_bytes",
            "Configured capacity of each cache tier and table (0: no disk tier).",
            &["tier"],
            move || {
                vec![
                    (vec!["memory".into()], cache.memory_capacity() as f64),
                    (vec!["disk".into()], cache.disk_capacity() as f64),
                    (vec!["metadata".into()], cache.metadata_capacity() as f64),
                    (
                        vec!["disk_index".into()],
                        cache.disk_index_capacity() as f64,
                    ),
                    (
                        vec!["responses".into()],
                        cache.response_budget().limit() as f64,
                    ),
                ]
            },
        ));
        let current = self.current.clone();
        m.register(Pulled::gauge(
            "edgeslice_cluster_peers",
            "The cluster's peers by state: up (this node, and peers that resolve and whose breaker admits requests), down (a name that does not resolve, or a breaker open). No samples without cluster.peers.",
            &["state"],
            move || match &current.load().cluster {
                Some(c) => {
                    let s = c.states();
                    vec![
                        (vec!["up".into()], s.up as f64),
                        (vec!["down".into()], s.down as f64),
                    ]
                }
                None => Vec::new(),
            },
        ));
        m.register(read_one(
            false,
            "edgeslice_purges_pending",
            "Purges not yet applied to every object of the disk tier (the objects they name are not served meanwhile).",
            &self.cache,
            |c| c.pending_purges().0 as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_purge_passes_total",
            "Background passes over the disk tier's metadata that applied pending purges (one pass applies every purge pending when it starts).",
            &self.cache,
            |c| c.ban_passes() as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_cache_response_budget_waits_total",
            "Times a response waited for cache.response_budget (the chunks responses hold were at the budget) before its next chunk.",
            &self.cache,
            |c| c.response_budget().waits() as f64,
        ));
        m.register(read_one(
            false,
            "edgeslice_cache_disk_index_loading",
            "1 while the disk tier's index is loading at start-up (the node serves meanwhile; keys not indexed yet are read from their files), 0 once loaded.",
            &self.cache,
            |c| f64::from(u8::from(c.disk_index_loading())),
        ));
        m.register(read_one(
            false,
            "edgeslice_cache_disk_index_loaded_entries",
            "Entry files the start-up load of the disk index has indexed so far.",
            &self.cache,
            |c| c.disk_index_loaded_entries() as f64,
        ));
        m.register(read_one(
            false,
            "edgeslice_cache_disk_entries",
            "Entry files (chunks and metadata) in the disk tier's index.",
            &self.cache,
            |c| c.disk_entries() as f64,
        ));
        m.register(read_one(
            false,
            "edgeslice_cache_disk_index_resident_bytes",
            "Bytes the disk tier's index has allocated (slabs and hash tables).",
            &self.cache,
            |c| c.disk_index_resident_bytes() as f64,
        ));
        m.register(read_one(
            false,
            "edgeslice_cache_fills_in_flight",
            "Chunk fills in progress or held by readers.",
            &self.cache,
            |x| x.flights.len() as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_cache_coalesced_total",
            "Chunk reads that joined a fetch already in flight instead of asking the origin.",
            &self.cache,
            |x| x.flights.coalesced() as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_cache_disk_write_errors_total",
            "Chunk writes to the disk tier that failed.",
            &self.cache,
            |x| x.disk_write_errors() as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_cache_disk_writes_skipped_total",
            "Chunk copies not written to disk because its queue was full or writes were paused.",
            &self.cache,
            |x| x.disk_writes_skipped() as f64,
        ));
        m.register(read_one(
            true,
            "edgeslice_cache_stale_served_total",
            "Responses served from an expired copy because every origin failed (stale-if-error).",
            &self.stats,
            |x| load(&x.stale_served),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_retries_over_budget_total",
            "Retries not made because the upstream's retry budget was spent.",
            &self.stats,
            |x| load(&x.retries_over_budget),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_retries_given_back_total",
            "Retries given back to the retry budget: their request was answered in the end, or their try could not connect.",
            &self.stats,
            |x| load(&x.retries_given_back),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_retries_skipped_failing_url_total",
            "Failed tries not retried because their URL had just failed on every server tried.",
            &self.stats,
            |x| load(&x.retries_skipped_failing_url),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_panic_routed_total",
            "Tries sent to an ejected server because every server of the group was ejected or down.",
            &self.stats,
            |x| load(&x.all_ejected),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_ejections_capped_total",
            "Breaker trips held back by max_ejected_percent.",
            &self.stats,
            |x| load(&x.ejections_capped),
        ));
        m.register(read_one(
            true,
            "edgeslice_origin_gateway_uncharged_total",
            "502/503/504 answers charged to no server (alone, or every server failed the request).",
            &self.stats,
            |x| load(&x.gateway_uncharged),
        ));
        let r = self.stats.clone();
        m.register(Pulled::counter(
            "edgeslice_origin_failures_charged_total",
            "Failures charged to servers' circuit breakers, by class.",
            &["class"],
            move || {
                FailureClass::ALL
                    .iter()
                    .map(|c| (vec![c.as_str().to_string()], r.failures_of(*c) as f64))
                    .collect()
            },
        ));
        let tables: Vec<(&'static str, Arc<ConnTable>)> = [
            ("client", &self.connections),
            ("admin", &self.admin_connections),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.clone().map(|t| (n, t)))
        .collect();
        let tables = Arc::new(tables);
        type ConnFigure = fn(&ConnTable) -> f64;
        let conn: [(&str, &str, bool, ConnFigure); 11] = [
            (
                "edgeslice_connections_open",
                "Client connections open, by listener.",
                false,
                |t| t.open() as f64,
            ),
            (
                "edgeslice_connections_max",
                "The cap of open connections (server.max_connections), by listener.",
                false,
                |t| t.max() as f64,
            ),
            (
                "edgeslice_connections_accepted_total",
                "Connections accepted.",
                true,
                |t| load(&t.stats.accepted),
            ),
            (
                "edgeslice_connections_reclaimed_total",
                "Idle keep-alive connections closed at the cap to admit new ones.",
                true,
                |t| load(&t.stats.reclaimed),
            ),
            (
                "edgeslice_connections_refused_total",
                "Connections refused with 503 at the cap.",
                true,
                |t| load(&t.stats.refused),
            ),
            (
                "edgeslice_keepalive_closed_total",
                "Idle keep-alive connections closed at keepalive_timeout.",
                true,
                |t| load(&t.stats.keepalive_closed),
            ),
            (
                "edgeslice_header_timeouts_total",
                "Connections closed (or answered 408) at header_timeout.",
                true,
                |t| load(&t.stats.header_timeouts),
            ),
            (
                "edgeslice_send_timeouts_total",
                "Responses cut because the client read nothing for send_timeout.",
                true,
                |t| load(&t.stats.send_timeouts),
            ),
            (
                "edgeslice_oversize_headers_rejected_total",
                "Requests answered 414 or 431 before parsing.",
                true,
                |t| load(&t.stats.oversize_rejected),
            ),
            (
                "edgeslice_paced_aborts_total",
                "Shaped responses ended because the client left while a paced write waited.",
                true,
                |t| load(&t.stats.paced_aborts),
            ),
            (
                "edgeslice_stalled_cut_total",
                "Responses cut because their client read nothing while other responses waited for cache.response_budget.",
                true,
                |t| load(&t.stats.stalled_cut),
            ),
        ];
        for (name, help, counter, read) in conn {
            let tables = tables.clone();
            let samples = move || {
                tables
                    .iter()
                    .map(|(n, t)| (vec![n.to_string()], read(t)))
                    .collect()
            };
            m.register(if counter {
                Pulled::counter(name, help, &["listener"], samples)
            } else {
                Pulled::gauge(name, help, &["listener"], samples)
            });
        }
        if let Some(d) = self.access_log_dropped.clone() {
            m.register(Pulled::counter(
                "edgeslice_access_log_dropped_total",
                "Access-log lines dropped because the log's sink could not keep up.",
                &[],
                move || one(load(&d)),
            ));
        }
        if let Some(sh) = self.shaping.clone() {
            m.register(read_one(
                true,
                "edgeslice_shaping_bytes_total",
                "Response body bytes paced by shaping.",
                &sh,
                |x| load(&x.shaped_bytes),
            ));
            m.register(read_one(
                true,
                "edgeslice_shaping_delay_seconds_total",
                "Total time response pieces were held back by shaping.",
                &sh,
                |x| load(&x.delayed_us) / 1e6,
            ));
            m.register(read_one(
                false,
                "edgeslice_shaping_active_clients",
                "Clients with a shaped response in progress.",
                &sh,
                |x| load(&x.active_clients),
            ));
            m.register(Pulled::counter(
                "edgeslice_shaping_refused_total",
                "Requests refused with 429 by a shaping class's cap, by reason.",
                &["reason"],
                move || {
                    vec![
                        (vec!["downloads".into()], load(&sh.refused_downloads)),
                        (vec!["connections".into()], load(&sh.refused_connections)),
                    ]
                },
            ));
        }
    }
}

impl AdminApp {
    /// A mutating call is allowed only as a `POST` with `Authorization: Bearer <admin.token>`:
    /// `Err` is the answer otherwise (405, 401 without or with a wrong token, 403 when no token
    /// is configured).
    // The refusal is the answer itself, built once per admin call: its size costs nothing.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, session: &ServerSession) -> Result<(), Response<Vec<u8>>> {
        let req = session.req_header();
        if req.method != http::Method::POST {
            let mut r = text(405, "use POST\n");
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Err(r);
        }
        let current = self.current.load();
        let Some(token) = current.config.admin_token.as_deref() else {
            return Err(text(
                403,
                "mutating admin calls are off: set admin.token in the config\n",
            ));
        };
        let given = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            _ => {
                let mut r = text(401, "admin.token required: Authorization: Bearer <token>\n");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"edgeslice admin\""),
                );
                Err(r)
            }
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` field (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without stopping at the first difference, so response time says nothing about how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: u16, body: &str) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body.as_bytes().to_vec())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => text(200, "ok\n"),
            "/readyz" => self.readyz(),
            "/stats" => text(200, &self.stats()),
            "/metrics" => {
                let body = self.metrics.render();
                Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("content-length", body.len())
                    .header("cache-control", "no-store")
                    .body(body.into_bytes())
                    .unwrap_or_else(|_| Response::new(Vec::new()))
            }
            "/purge" => self.purge(session).await,
            "/reload" => self.reload_config(session).await,
            _ => text(404, "not found\n"),
        }
    }
}

impl AdminApp {
    /// `POST /reload`: the config file read again and applied (`crate::reload`); 422 with the
    /// same text as `edgeslice -t` when it is invalid.
    async fn reload_config(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let count = |result| self.metrics.admin_call(AdminAction::Reload, result);
        if let Err(refused) = self.authorize(session) {
            count(AdminResult::Refused);
            return refused;
        }
        let Some(r) = &self.reload else {
            count(AdminResult::Error);
            return text(503, "reload is not available\n");
        };
        match r.reload().await {
            Ok(done) => {
                count(AdminResult::Ok);
                text(200, &done.answer())
            }
            Err(e) => {
                count(AdminResult::Error);
                text(e.status(), &e.answer())
            }
        }
    }

    /// `POST /purge?path=P[&host=H][&prefix=1][&soft=1]` or `?tag=T[&host=H][&soft=1]`:
    /// `purged N` (see [`ChunkCache::purge`] for what N counts), 400 naming a bad parameter.
    async fn purge(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let count = |result| self.metrics.admin_call(AdminAction::Purge, result);
        if let Err(refused) = self.authorize(session) {
            count(AdminResult::Refused);
            return refused;
        }
        let purge = match Purge::from_query(session.req_header().uri.query()) {
            Ok(p) => Arc::new(p),
            Err(why) => {
                count(AdminResult::Error);
                return text(400, &format!("bad purge: {why}\n"));
            }
        };
        let soft = purge.soft;
        match self.cache.purge(&purge, PURGE_WAIT).await {
            PurgeOutcome::Done(n) => {
                count(AdminResult::Ok);
                self.metrics.purged(soft, n);
                log::info!("admin purge {}: {n} objects", purge.describe());
                text(200, &format!("purged {n}\n"))
            }
            PurgeOutcome::Pending { so_far, ban } => {
                count(AdminResult::Ok);
                self.metrics.purged(soft, so_far);
                log::info!(
                    "admin purge {}: {so_far} objects so far, the disk tier's pass goes on",
                    purge.describe()
                );
                // The objects the pass takes after this answer are counted when it ends.
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    ban.retired().await;
                    metrics.purged(soft, ban.applied().saturating_sub(so_far));
                });
                text(
                    202,
                    &format!("purged {so_far} so far; the disk tier is still being searched in the background, and the objects named are not served meanwhile\n"),
                )
            }
            PurgeOutcome::Busy => {
                count(AdminResult::Error);
                let mut r = text(
                    503,
                    "too many purges are pending for the disk tier; retry once they are applied\n",
                );
                r.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("5"));
                r
            }
        }
    }
}

/// How long a purge's answer waits for the disk tier's pass before answering 202.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret-token", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret-token", b"s3cret-tokem"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret-token"));
    }
}
