//! The Pingora `ProxyHttp` implementation: each phase is a few lines that delegate below.
//!
//! ```text
//!  new_ctx ── the configuration snapshot in force (crate::runtime): the request keeps it
//!  request_filter ── request id ── route? ──no──► 404
//!        │                           │
//!        │           cacheable GET/HEAD ──► chunk cache answers here (Ok(true))
//!        ▼
//!  proxy_upstream_filter ── a request body arrives (whole up to 64 KiB) before any origin
//!        │                  connection; its total time bounded by body_min_rate (body.rs)
//!  upstream_peer ── pick a server of the route's group (called again on each retry)
//!  upstream_request_filter ── strip hop-by-hop, add X-Forwarded-*, Via, X-Request-Id
//!  response_filter ── strip hop-by-hop, add Via, X-Request-Id
//!  fail_to_proxy ── 502 / 504 / 400 with a short body
//!  logging ── one access-log line
//! ```

pub mod body;
pub mod cache_status;
pub mod cached;
pub mod canonical;
pub mod cdn_loop;
pub mod ctx;
pub mod framing;
pub mod headers;
pub mod request_line;
pub mod respond;
pub mod slices;

use crate::access_log::{AccessLog, Entry as AccessEntry};
use crate::cache::key::{ObjectKey, Scheme};
use crate::cache::store::ChunkCache;
use crate::config::{Route, ShapingSettings};
use crate::metrics::OriginOutcome;
use crate::origin::budget::{RequestRetries, RetryBudget};
use crate::origin::outcome::{classify_error, status_verdict, StatusVerdict};
use crate::origin::pool::{Selected, UpstreamPool};
use crate::origin::ResilienceStats;
use crate::runtime::{Current, Runtime};
use crate::shaping::identity::client_key;
use crate::shaping::{ConnectionHandle, Refused, Shaper, ShapingStats};
use async_trait::async_trait;
use cache_status::CacheStatus;
use cached::{CacheLayer, Outcome};
use ctx::RequestCtx;
use log::warn;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The proxy: routing, pass-through and the cache, shared by all requests. What a reload
/// changes lives in the snapshot `runtime` holds; the rest (the cache, the shaper's client
/// table, the access log) lives as long as the process.
pub struct Edge {
    runtime: Current,
    pub stats: Arc<ResilienceStats>,
    cache: CacheLayer,
    /// Always present, so shaping can be configured by a reload; without a `shaping` section
    /// no route names a class and it is never asked.
    shaper: Shaper,
    access_log: Option<Arc<AccessLog>>,
    /// `server.body_timeout` and `server.body_min_rate` as started with (`server.*` keys do
    /// not reload).
    body_timeout: std::time::Duration,
    body_min_rate: u64,
}

impl Edge {
    pub fn new(
        runtime: Current,
        cache: Arc<ChunkCache>,
        stats: Arc<ResilienceStats>,
    ) -> std::io::Result<Edge> {
        let config = runtime.load_full().config.clone();
        let cache = CacheLayer {
            cache,
            stats: stats.clone(),
        };
        let shaper = Shaper::new(
            config.shaping.clone().unwrap_or_default(),
            Arc::new(ShapingStats::default()),
        );
        let access_log = if config.server.access_log {
            let s = &config.server;
            Some(Arc::new(
                AccessLog::start(s.access_log_format, s.access_log_path.clone()).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "server.access_log_path {}: {e}",
                            s.access_log_path
                                .as_deref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "stderr".into())
                        ),
                    )
                })?,
            ))
        } else {
            None
        };
        Ok(Edge {
            runtime,
            stats,
            cache,
            shaper,
            access_log,
            body_timeout: config.server.connections.body_timeout,
            body_min_rate: config.server.connections.body_min_rate,
        })
    }

    /// The access log, for answers given before a request reaches the proxy (`conn`).
    pub fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access_log.clone()
    }

    /// The access log's reopen flag and dropped-line counter, when the access log is on.
    pub fn access_log_handles(
        &self,
    ) -> Option<(
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicU64>,
    )> {
        self.access_log
            .as_ref()
            .map(|l| (l.reopen_flag(), l.dropped_counter()))
    }

    /// Shaping counters.
    pub fn shaping_stats(&self) -> Arc<ShapingStats> {
        self.shaper.stats().clone()
    }

    /// The shaper, whose settings a reload updates (its client table is kept).
    pub fn shaper(&self) -> Shaper {
        self.shaper.clone()
    }

    /// Start a shaped download for this request when its route has a shaping class: `Ok(false)`
    /// when the client is at its `max_downloads` (a 429 was written), `Ok(true)` otherwise.
    async fn admit_download(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
    ) -> Result<bool> {
        let Some(class) = route.shaping.as_ref() else {
            return Ok(true);
        };
        let shaper = &self.shaper;
        // Who the client is, by the settings the request started with.
        let s: &ShapingSettings = match ctx.runtime.config.shaping.as_deref() {
            Some(s) => s,
            None => return Ok(true),
        };
        let key = client_key(
            &s.client_key,
            s.ipv6_prefix,
            client_addr(session),
            &session.req_header().headers,
        );
        // The socket digest lives exactly as long as the client's connection.
        let connection: Option<ConnectionHandle> = session
            .digest()
            .and_then(|d| d.socket_digest.clone())
            .map(|d| d as ConnectionHandle);
        match shaper.admit(key, class, connection.as_ref()) {
            Ok(d) => {
                // Paced at the client connection's writes, which watch the client while a
                // write waits (conn::pace); an HTTP/2 stream at its own body writes, as its
                // connection is shared (cached::write_body, response_body_filter). Every
                // listener's connections are guarded, so the connection is known; were it
                // not, the download would still hold its caps.
                match (ctx.stream.as_ref(), ctx.connection.as_ref()) {
                    (Some(s), _) => s.pace_response(Box::new(d)),
                    (None, Some(c)) => c.pace_response(Box::new(d)),
                    (None, None) => ctx.download = Some(d),
                }
                Ok(true)
            }
            Err(refused) => {
                log::info!(
                    "rid={} client refused ({refused:?}) by class {}: 429",
                    ctx.request_id,
                    class.name
                );
                if matches!(refused, Refused::Connections { .. }) {
                    // A connection over the client's cap is refused: answered, then closed.
                    session.set_keepalive(None);
                }
                respond::send_too_many(session, &ctx.request_id).await?;
                Ok(false)
            }
        }
    }

    /// The pool of the request's route, in the snapshot the request started with.
    fn pool<'c>(&self, ctx: &'c RequestCtx) -> Option<&'c Arc<UpstreamPool>> {
        pool_of(&ctx.runtime, ctx.route.as_ref())
    }

    /// Give back to the budget the retries `give_back` returns (from the request's
    /// [`RequestRetries`]), and count them.
    fn give_back_retries(
        ctx: &mut RequestCtx,
        give_back: impl FnOnce(&mut RequestRetries, &RetryBudget) -> u64,
    ) {
        let RequestCtx {
            runtime,
            route,
            upstream,
            ..
        } = ctx;
        let Some(pool) = pool_of(runtime, route.as_ref()) else {
            return;
        };
        let n = give_back(&mut upstream.retries, &pool.budget);
        pool.stats
            .retries_given_back
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Count a pass-through try that failed before its answer was counted, when the failure was
    /// the server's (a client's abort or our own error says nothing about it).
    fn count_failed_try(
        &self,
        ctx: &RequestCtx,
        addr: std::net::SocketAddr,
        e: &Error,
        request_body_done: bool,
    ) {
        if ctx.upstream.counted {
            return;
        }
        if let (Some(pool), Some(class)) = (self.pool(ctx), classify_error(e, request_body_done)) {
            pool.count_request(addr, OriginOutcome::Failed(class));
        }
    }

    /// RFC 9111 §4.4: a non-error response to an unsafe request (PUT, POST, DELETE, ...) on a
    /// cached route invalidates the stored object at that URI.
    async fn invalidate_after_unsafe(
        &self,
        session: &Session,
        status: http::StatusCode,
        ctx: &RequestCtx,
    ) {
        let req = session.req_header();
        if req.method.is_safe() || !(status.is_success() || status.is_redirection()) {
            return;
        }
        let Some(route) = ctx.route.as_ref().filter(|r| r.cache) else {
            return;
        };
        self.cache
            .cache
            .forget(&object_key(route, req, ctx.scheme))
            .await;
    }

    /// What consistent hashing hashes for a pass-through request: its cache key.
    fn hash_key(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        match &ctx.route {
            Some(r) => object_key(r, req, ctx.scheme).0.to_string(),
            None => req.uri.path().to_string(),
        }
    }

    /// Count the request in its group's retry budget, once: when it is sent to an origin, or
    /// when connecting for it failed by the server's fault. A request refused before it was
    /// sent (by Pingora or by us, for what the client sent) never reaches the budget.
    fn count_in_budget(&self, ctx: &mut RequestCtx) {
        if ctx.upstream.budget_counted {
            return;
        }
        if let Some(pool) = self.pool(ctx) {
            pool.budget.record_request();
            ctx.upstream.budget_counted = true;
        }
    }

    /// Whether a failed pass-through try may be retried: only for a failure of the server's own
    /// (the callers check `classify_error`) or a gateway answer; within the group's attempts,
    /// deadline and retry budget; before any response byte went to the client; for a method
    /// that is not idempotent, only when the request provably never reached an origin
    /// (`Cause::Connect`). After a gateway answer a retry goes only to a server that has not
    /// seen the request (`UpstreamPool::pick_untried`), and never for a URL that just failed on
    /// every server (`origin::failing`). The retry's budget ticket is kept in the context.
    fn may_retry(&self, session: &Session, ctx: &mut RequestCtx, cause: Cause) -> bool {
        let Some(pool) = self.pool(ctx).cloned() else {
            return false;
        };
        let req = session.req_header();
        if cause != Cause::Connect && !req.method.is_idempotent() {
            return false;
        }
        if session.response_written().is_some() || session.as_ref().retry_buffer_truncated() {
            return false;
        }
        if ctx.upstream.tried.len() as u32 >= pool.settings.retry.attempts
            || ctx.started.elapsed() >= pool.settings.deadline
        {
            return false;
        }
        // A URL that just failed on every server gets one try (unless this request is the one
        // finding out).
        if !ctx.upstream.evidence.failed_everywhere()
            && ctx
                .upstream
                .url
                .is_some_and(|u| pool.failing_urls.is_failing(u))
        {
            pool.stats
                .retries_skipped_failing_url
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let after_gateway =
            cause == Cause::Gateway || ctx.upstream.evidence.held().next().is_some();
        if after_gateway && !pool.may_pick_untried(&ctx.upstream.tried) {
            return false;
        }
        let Some(ticket) = pool.budget.try_retry() else {
            pool.stats
                .retries_over_budget
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                "rid={} retry budget of {} spent; not retrying",
                ctx.request_id,
                pool.name()
            );
            return false;
        };
        ctx.upstream.retries.admitted(ticket);
        true
    }
}

/// A pass-through request to a group with no server (answered 502, as any upstream failure).
const NO_SERVER: ErrorType = ErrorType::Custom("NoServer");

/// What a pass-through retry would follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Connecting failed by the server's fault: nothing reached an origin.
    Connect,
    /// The server failed after the request was sent (reset, timeout, broken framing).
    Failed,
    /// The server answered 502/503/504.
    Gateway,
}

/// The pool of `route`'s group in the configuration snapshot `runtime`.
fn pool_of<'a>(runtime: &'a Runtime, route: Option<&Arc<Route>>) -> Option<&'a Arc<UpstreamPool>> {
    route.and_then(|r| runtime.pools.get(&r.upstream.name))
}

/// The cache key of a request on `route`.
pub(crate) fn object_key(route: &Route, req: &RequestHeader, scheme: Scheme) -> ObjectKey {
    object_key_at(route, scheme, request_host(req), req)
}

/// [`object_key`] with the request's host (its canonical authority) already in hand.
pub(crate) fn object_key_at(
    route: &Route,
    scheme: Scheme,
    host: &str,
    req: &RequestHeader,
) -> ObjectKey {
    ObjectKey::new(
        &route.upstream.name,
        scheme,
        host,
        req.uri.path(),
        req.uri.query(),
        &route.query_key,
    )
}

/// The request's host as keys and origin requests carry it: the `Host` field, which
/// `request_filter` made canonical (lower case, no trailing dot, a port only when it is not
/// the default; see [`canonical`]).
pub(crate) fn request_host(req: &RequestHeader) -> &str {
    req.headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Report a try that ended in `e`: charged to the server only when the error is its own
/// (`origin::outcome`); a client's abort, timeout or malformed body, or our own error, is not.
fn charge(sel: Selected, e: &Error, request_body_done: bool, request_id: &str) {
    match classify_error(e, request_body_done) {
        Some(class) => sel.failed(class, request_id),
        None => sel.release(),
    }
}

/// The client's IP address; `None` when it has none (a Unix-socket client).
/// Who the client of this request is, as the shaper would key it (by address, IPv6 by a /64,
/// when no `shaping` section says otherwise): the response budget's shares are per client.
pub(crate) fn client_of(
    session: &Session,
    ctx: &RequestCtx,
) -> crate::shaping::identity::ClientKey {
    use crate::shaping::identity::KeySource;
    let (source, prefix) = match ctx.runtime.config.shaping.as_deref() {
        Some(s) => (&s.client_key, s.ipv6_prefix),
        None => (&KeySource::RemoteAddr, 64),
    };
    client_key(
        source,
        prefix,
        client_addr(session),
        &session.req_header().headers,
    )
}

fn client_addr(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// What the proxy asserts about who sent this request (`X-Forwarded-For`, `-Proto`), by the
/// `server.trusted_proxies` the request started with.
pub(crate) fn forwarded(session: &Session, ctx: &RequestCtx) -> headers::Forwarded {
    headers::Forwarded::of(
        &session.req_header().headers,
        client_addr(session),
        &ctx.runtime.config.server.trusted_proxies,
        listener_scheme(session),
    )
}

/// [`forwarded`]'s `X-Forwarded-Proto` alone (no `X-Forwarded-For` chain built).
fn forwarded_proto(session: &Session, ctx: &RequestCtx) -> Scheme {
    headers::Forwarded::proto_of(
        &session.req_header().headers,
        client_addr(session),
        &ctx.runtime.config.server.trusted_proxies,
        listener_scheme(session),
    )
}

/// The scheme of the listener the request came in by: `https` over TLS.
fn listener_scheme(session: &Session) -> Scheme {
    if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
        Scheme::Https
    } else {
        Scheme::Http
    }
}

/// [`client_addr`] as text, `unknown` when there is none.
fn client_ip(session: &Session) -> String {
    client_addr(session).map_or_else(|| "unknown".into(), |ip| ip.to_string())
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.runtime.load_full())
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        prev_ctx: Box<dyn std::any::Any + Send + Sync>,
    ) {
        ctx.connection = crate::conn::request_started(prev_ctx);
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // `fail_to_proxy` logs every failure itself, once, with the request id, the status and
        // the server tried: at debug when the client caused it (left mid-response, aborted an
        // upload, sent a bad chunked body, trickled its body: any client could flood the log
        // otherwise), at warn when an origin did. Pingora's own ERROR line would say it twice
        // (the soak counted 2,021 "Fail to filter request: ... cache fill failed mid-response"
        // lines beside the warnings for the same aborts).
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        // A try (or a cache fill) that ended through the client's doing: not a warning either.
        respond::client_fault(error).is_some()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.stream = crate::conn::h2::StreamTicket::of(req).cloned();
        ctx.request_id =
            headers::request_id(req.headers.get(headers::X_REQUEST_ID).map(|v| v.as_bytes()));
        let server = &ctx.runtime.config.server;
        let limits = &server.connections;
        let (max_uri, max_header) = (limits.max_uri_size, limits.max_header_size);
        let merge_slashes = server.merge_slashes;
        let raw_header = session
            .as_http1()
            .map_or(0, |h1| h1.get_headers_raw_bytes().len());
        let local_port = session
            .digest()
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.local_addr())
            .and_then(|a| a.as_inet())
            .map(|a| a.port());
        let checked = request_line::check_header_size(raw_header, max_header).and_then(|()| {
            let scheme = listener_scheme(session);
            request_line::normalize(
                session.req_header_mut(),
                max_uri,
                merge_slashes,
                local_port,
                scheme,
            )
        });
        let host = match checked {
            Ok(host) => host,
            Err(refused) => {
                // The client's doing: counted, and at debug (any client could flood the log).
                self.stats.metrics.client_error(match refused {
                    request_line::Refusal::TooLong | request_line::Refusal::HeaderTooLarge => {
                        respond::ClientFault::TooLarge
                    }
                    _ => respond::ClientFault::Malformed,
                });
                log::debug!(
                    "rid={} client {}: {}: {}",
                    ctx.request_id,
                    client_ip(session),
                    refused.reason(),
                    refused.status()
                );
                // The rest of the connection cannot be trusted to be framed as the client meant.
                session.set_keepalive(None);
                respond::send_error(session, refused.status(), &ctx.request_id).await?;
                return Ok(true);
            }
        };
        let req = session.req_header();
        // A peer's request (its mark, from an address a peer name resolves to): filled here,
        // as the asking node's client asked it (its scheme), and not shaped (the client the
        // asking node serves is shaped there).
        ctx.from_peer = req.headers.contains_key(crate::cluster::PEER_HEADER)
            && ctx.runtime.is_peer(client_addr(session));
        let cdn_id = &ctx.runtime.config.cluster.cdn_id;
        let looped = if ctx.from_peer {
            cdn_loop::is_loop_from_peer(&req.headers, cdn_id)
        } else {
            cdn_loop::is_loop(&req.headers, cdn_id)
        };
        if looped {
            // This request has passed through this tier twice already (RFC 8586): answering
            // it is the only way the loop ends. Not the client's fault as such (a
            // misconfigured tier is), so it is logged, at a bounded rate by the metric.
            self.stats.metrics.loops_detected.inc();
            log::debug!(
                "rid={} client {}: CDN-Loop holds {:?} twice: 508",
                ctx.request_id,
                client_ip(session),
                ctx.runtime.config.cluster.cdn_id
            );
            respond::send_error(session, 508, &ctx.request_id).await?;
            return Ok(true);
        }
        let Some(route) = ctx
            .runtime
            .config
            .route(&host.name, req.uri.path())
            .cloned()
        else {
            respond::send_error(session, 404, &ctx.request_id).await?;
            return Ok(true);
        };
        ctx.route = Some(route.clone());
        ctx.scheme = match client_addr(session).filter(|_| ctx.from_peer) {
            Some(peer) => headers::Forwarded::proto_of(
                &req.headers,
                Some(peer),
                &[crate::shaping::identity::Cidr::host(peer)],
                listener_scheme(session),
            ),
            None => forwarded_proto(session, ctx),
        };
        if !ctx.from_peer && !self.admit_download(session, ctx, &route).await? {
            return Ok(true);
        }
        let method = &session.req_header().method;
        if !route.cache || !(method == http::Method::GET || method == http::Method::HEAD) {
            return Ok(false);
        }
        let Some(origin) = ctx.runtime.fill_origin(&route, ctx.from_peer) else {
            return Ok(false);
        };
        match self
            .cache
            .serve(session, ctx, &route, &host.authority(), origin)
            .await?
        {
            Outcome::Served => Ok(true),
            Outcome::PassThrough => Ok(false),
        }
    }

    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        // Admission before the origin connection: the body first (body.rs).
        let mut clock = body::BodyClock::new(ctx.started, self.body_timeout, self.body_min_rate);
        let admitted = body::admit(session, &mut clock).await?;
        ctx.continue_sent = admitted.continue_sent;
        ctx.body = Some(clock);
        Ok(true)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Each piece sets the wait for the next one: the body's total bound (body.rs).
        match ctx.body.as_mut() {
            Some(clock) => body::pace(session, clock),
            None => Ok(()),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pool = self
            .pool(ctx)
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        let attempt = ctx.upstream.tried.len() as u32;
        ctx.upstream.counted = false;
        ctx.upstream.body_bytes = None;
        if attempt > 0 {
            // A retry that fail_to_connect / error_while_proxy decided: back off first, never
            // past the request's deadline.
            let remaining = pool.settings.deadline.saturating_sub(ctx.started.elapsed());
            let delay = pool.backoff.delay(attempt, &mut rand::rng()).min(remaining);
            tokio::time::sleep(delay).await;
            pool.count_retry();
            warn!(
                "rid={} retry {attempt} after {delay:?} (tried {:?})",
                ctx.request_id, ctx.upstream.tried
            );
        }
        let key = self.hash_key(session, ctx);
        if attempt == 0 {
            ctx.upstream.url = Some(pool.failing_urls.mark(key.as_bytes()));
        }
        // After a gateway answer only a server that has not seen the request (may_retry checked
        // there is one; should it have left rotation since, any server). Never a 503 of our
        // own: with every server ejected, panic routing still picks one.
        let untried = if ctx.upstream.evidence.held().next().is_some() {
            pool.pick_untried(key.as_bytes(), &ctx.upstream.tried)
        } else {
            None
        };
        let Some(sel) = untried.or_else(|| pool.pick(key.as_bytes(), &ctx.upstream.tried)) else {
            // No server at all (its names do not resolve): 502 at once, nothing to retry.
            return Err(Error::create(
                NO_SERVER,
                pingora_error::ErrorSource::Upstream,
                Some(crate::origin::fetch::no_server(&pool).into()),
                None,
            ));
        };
        ctx.upstream.retries.start_try();
        let addr = sel.addr;
        ctx.upstream.tried.push(addr);
        let mut peer = sel.peer.clone();
        ctx.upstream.current = Some(sel);
        // Connecting never runs past the deadline either.
        let remaining = pool.settings.deadline.saturating_sub(ctx.started.elapsed());
        if let Some(t) = peer.options.connection_timeout.as_mut() {
            *t = (*t).min(remaining.max(std::time::Duration::from_millis(1)));
        }
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !reused {
            if let (Some(pool), Some(addr)) = (self.pool(ctx), peer._address.as_inet()) {
                pool.tls_failures.recovered(*addr);
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(sel) = ctx.upstream.current.take() {
            self.count_failed_try(ctx, sel.addr, &e, true);
            // A certificate or handshake failure: logged once per server and cause.
            if let Some(pool) = self.pool(ctx) {
                pool.tls_failed(sel.addr, &e, &ctx.request_id);
            }
            charge(sel, &e, true, &ctx.request_id);
        }
        // Retried only when the failure is the server's own (the same rule that charges it).
        // Nothing reached the origin: any method may go to another server.
        let class = classify_error(&e, true);
        if class.is_some_and(|c| c.is_down()) {
            // A retry that could not connect put no load on an origin.
            Self::give_back_retries(ctx, RequestRetries::not_connected);
        }
        let retry = class.is_some() && {
            self.count_in_budget(ctx);
            self.may_retry(session, ctx, Cause::Connect)
        };
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let body_done = session.as_mut().is_body_done();
        if let Some(sel) = ctx.upstream.current.take() {
            self.count_failed_try(ctx, sel.addr, &e, body_done);
            charge(sel, &e, body_done, &ctx.request_id);
        }
        // A gateway answer's retry was decided in upstream_response_filter. Otherwise only a
        // failure of the server's own is retried: never one the client caused (a request
        // Pingora refused, a broken or short request body, a client gone) nor our own error.
        let retry = std::mem::take(&mut ctx.upstream.status_retry)
            || (classify_error(&e, body_done).is_some()
                && self.may_retry(session, ctx, Cause::Failed));
        e.set_retry(retry);
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if let (Some(pool), Some(&addr)) = (self.pool(ctx), ctx.upstream.tried.last()) {
            pool.count_request(addr, OriginOutcome::Answered(status));
            ctx.upstream.body_bytes = pool.body_bytes(addr, status);
            ctx.upstream.counted = true;
        }
        match status_verdict(status) {
            StatusVerdict::Answered => {
                if ctx.upstream.tried.len() > 1 {
                    // The request is answered: its retries were failover, not a storm, and are
                    // given back to the budget.
                    Self::give_back_retries(ctx, RequestRetries::answered);
                }
                if let (Some(pool), Some(url)) = (self.pool(ctx), ctx.upstream.url) {
                    pool.failing_urls.answered(url);
                }
                // Any earlier gateway answers to this request were outliers: charge them.
                if let Some(addr) = ctx.upstream.current.as_ref().map(|s| s.addr) {
                    ctx.upstream.evidence.answered_by(addr, &ctx.request_id);
                }
            }
            StatusVerdict::Gateway => {
                if let Some(sel) = ctx.upstream.current.take() {
                    ctx.upstream.evidence.hold(sel);
                }
                if ctx.upstream.evidence.failed_everywhere() {
                    // Two servers failed this URL: the next requests for it get one try for a
                    // while (this one goes on, should a third server answer it).
                    if let (Some(pool), Some(url)) = (self.pool(ctx), ctx.upstream.url) {
                        pool.failing_urls.failed_everywhere(url);
                    }
                }
                if self.may_retry(session, ctx, Cause::Gateway) {
                    ctx.upstream.status_retry = true;
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(status),
                        format!("origin answered {status}; retrying"),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The request goes out now: it counts in the group's retry budget.
        self.count_in_budget(ctx);
        let keep_upgrade = session.is_upgrade_req();
        for name in headers::hop_by_hop_names(&upstream_request.headers, keep_upgrade) {
            upstream_request.remove_header(&name);
        }
        let asserted = forwarded(session, ctx);
        if !asserted.peer_trusted {
            let claims: Vec<_> = upstream_request
                .headers
                .keys()
                .filter(|n| headers::is_forwarding_field(n.as_str()))
                .cloned()
                .collect();
            for name in claims {
                upstream_request.remove_header(&name);
            }
        }
        upstream_request.insert_header("x-forwarded-for", asserted.for_chain.as_str())?;
        upstream_request.insert_header("x-forwarded-proto", asserted.proto.as_str())?;
        let via = headers::via(upstream_request.headers.get("via").map(|v| v.as_bytes()));
        upstream_request.insert_header("via", via)?;
        upstream_request.insert_header(headers::X_REQUEST_ID, ctx.request_id.as_str())?;
        // The list the client sent, and this tier's id (RFC 8586); a peer's list holds it.
        let cdn_id = &ctx.runtime.config.cluster.cdn_id;
        upstream_request.remove_header(crate::cluster::PEER_HEADER);
        match cdn_loop::outgoing(&upstream_request.headers, cdn_id, !ctx.from_peer) {
            Some(v) => upstream_request.insert_header(cdn_loop::CDN_LOOP, v)?,
            None => {
                upstream_request.remove_header(cdn_loop::CDN_LOOP);
            }
        }
        // The group's `host` replaces the client's (routing and the cache key used the client's).
        if let Some(host) = self.pool(ctx).and_then(|p| p.settings.host.as_deref()) {
            upstream_request.insert_header(http::header::HOST, host)?;
        }
        if ctx.continue_sent {
            // The client has had its 100 and sent the body; another would reach it as noise.
            upstream_request.remove_header(&http::header::EXPECT);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let keep_upgrade = upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && session.is_upgrade_req();
        for name in headers::hop_by_hop_names(&upstream_response.headers, keep_upgrade) {
            upstream_response.remove_header(&name);
        }
        let via = headers::via(upstream_response.headers.get("via").map(|v| v.as_bytes()));
        upstream_response.insert_header("via", via)?;
        upstream_response.insert_header(headers::X_REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(status) = ctx.cache_status {
            status.set_on(upstream_response, &ctx.runtime.config.cluster.cdn_id)?;
        }
        self.invalidate_after_unsafe(session, upstream_response.status, ctx)
            .await;
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if let (Some(c), Some(b)) = (&ctx.upstream.body_bytes, body.as_ref()) {
            c.inc_by(b.len() as u64);
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        // A shaped pass-through response on an HTTP/2 stream: each piece (at most 16 KiB, as
        // Pingora reads them) is accounted and waited for before it is written. (HTTP/1.x is
        // paced at the socket's writes instead.)
        let (Some(stream), Some(b)) = (ctx.stream.as_ref(), body.as_ref()) else {
            return Ok(None);
        };
        let mut wait = std::time::Duration::ZERO;
        let mut left = b.len();
        while left > 0 {
            let Some((n, w)) = stream.reserve(left) else {
                return Ok(None);
            };
            stream.written(n);
            left -= n;
            wait = wait.max(w);
        }
        Ok((!wait.is_zero()).then_some(wait))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = respond::status_for_error(e);
        // Whatever a client did is routine (aborted downloads and uploads, players seeking,
        // broken or trickled bodies): counted, and not a warning, or any client could flood
        // the log.
        let fault = respond::client_fault(e);
        if let Some(f) = fault {
            self.stats.metrics.client_error(f);
        }
        // A TLS failure of a server is logged once per server and cause when it happens
        // (`UpstreamPool::tls_failed`), not once per request.
        let tls = crate::origin::peer::TlsCause::of(e.etype()).is_some()
            && matches!(e.esource(), pingora_error::ErrorSource::Upstream);
        // A group with no server was logged when its names stopped resolving, not per request.
        let no_server = e.etype() == &NO_SERVER;
        let level = if fault.is_some() || status == respond::CLIENT_CLOSED || tls || no_server {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "request failed: rid={} status={} upstream={} error={}",
            ctx.request_id,
            status,
            ctx.upstream
                .tried
                .last()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            e
        );
        // Nothing can be written once the response has started or the client is gone.
        let can_write = session.response_written().is_none()
            && !matches!(e.esource(), pingora_error::ErrorSource::Downstream)
            || matches!(status, 400 | 408);
        if can_write && session.response_written().is_none() {
            if let Err(we) = respond::send_error(session, status, &ctx.request_id).await {
                log::log!(
                    level,
                    "rid={} could not send error response: {we}",
                    ctx.request_id
                );
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The shaped download ends with the response (bytes it accounted but did not write
        // are given back to the client's pacer).
        if let Some(c) = ctx.connection.as_ref() {
            c.end_pacing();
        }
        if let Some(s) = ctx.stream.as_ref() {
            s.end_pacing();
            // The rapid-reset accounting (conn::h2::Calm): a response that ended through the
            // client's doing (a reset stream, a client gone) was abandoned.
            let abandoned = e.is_some_and(|e| {
                matches!(e.esource(), pingora_error::ErrorSource::Downstream)
                    || respond::client_fault(e).is_some()
            });
            if !abandoned {
                s.completed();
            }
        }
        if let Some(sel) = ctx.upstream.current.take() {
            match e {
                Some(e) => charge(sel, e, session.as_mut().is_body_done(), &ctx.request_id),
                None => sel.succeeded(&ctx.request_id),
            }
        }
        if ctx.upstream.evidence.held().next().is_some() {
            // Gateway answers no peer contradicted: the URL failed, not a server.
            if let Some(pool) = self.pool(ctx) {
                pool.stats.gateway_uncharged.fetch_add(1, Ordering::Relaxed);
            }
        }
        ctx.upstream.evidence = Default::default();
        if !ctx.upstream.tried.is_empty() {
            // A retry admitted but never started is given back.
            Self::give_back_retries(ctx, RequestRetries::finish);
        }
        let req = session.req_header();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let bytes = session.body_bytes_sent() as u64;
        let elapsed = ctx.started.elapsed();
        let metrics = &self.stats.metrics;
        let route = match &ctx.route {
            Some(r) => r.metrics.get_or_init(|| metrics.route(&r.label)),
            None => metrics.unrouted(),
        };
        route.observe(
            &req.method,
            status,
            CacheStatus::result(ctx.cache_status),
            ctx.protocol(),
            bytes,
            elapsed.as_secs_f64(),
        );
        let Some(log) = self.access_log.as_ref() else {
            return;
        };
        log.log(&AccessEntry {
            ts_ms: AccessEntry::now_ms(),
            method: req.method.as_str(),
            path: req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            status,
            bytes,
            duration_ms: elapsed.as_millis() as u64,
            cache: &CacheStatus::log_field(ctx.cache_status),
            upstream: ctx.upstream.tried.last().copied(),
            request_id: &ctx.request_id,
            client: client_addr(session),
            protocol: ctx.protocol(),
        });
    }
}
