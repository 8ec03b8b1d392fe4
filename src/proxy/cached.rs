//! Answering a cacheable GET/HEAD from the chunk cache, in `request_filter`.
//!
//! ```text
//! key ─► metadata: fresh in memory/disk? ──yes──────────────────────────┐
//!              │ no (missing or stale): per-object lock                 │
//!              ├─ missing: discover (first chunk-aligned fetch)         │
//!              └─ stale:   revalidate (304 keeps the chunks)            │
//!                          all origins failed: stale-if-error           │
//! conditional (If-None-Match / If-Modified-Since) ─► 304               ◄┘
//! Range (+ If-Range) ─► 200 / 206 / multipart / 416
//! for each span: memory ─► fill in flight ─► disk ─► origin run, streamed as it arrives
//! ```
//! One discovery or revalidation per object runs at a time (the object lock). Requests that
//! wait on it are answered by what it brings, even when that is already stale on receipt, so
//! they never queue revalidations of their own; within `stale-while-revalidate` they do not
//! wait at all.
//!
//! The response header is written only once the first byte is in hand, so a request whose
//! origins all fail gets a 5xx, not a truncated 200. A fill that fails after the header is out
//! aborts the response (the client sees a short body), never a wrong byte.

use super::cache_status::CacheStatus;
use super::ctx::RequestCtx;
use super::framing::{self, frame_unknown_length};
use super::headers::{hop_by_hop_names, via, VIA_VALUE, X_REQUEST_ID};
use super::respond;
use crate::cache::fill::{
    self, BodyStep, ChunkSource, Discovery, ObjectRequest, OriginAccess, Reply, Revalidation,
};
use crate::cache::flight::{FillError, FlightReader};
use crate::cache::freshness;
use crate::cache::held::{Anchor, ClientTag, Held};
use crate::cache::key::{ObjectKey, ObjectVersion};
use crate::cache::meta::ObjectMeta;
use crate::cache::store::ChunkCache;
use crate::config::Route;
use crate::range::multipart::{new_boundary, MultipartLayout};
use crate::range::parse::{
    if_range_holds, parse_range, resolve, ByteRange, RangeDecision, RangeRequest, RangeSpec,
};
use crate::range::plan::spans;
use bytes::Bytes;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::SystemTime;

/// What the cache layer did with the request.
pub enum Outcome {
    /// A response was written.
    Served,
    /// Not for the cache: let Pingora proxy it.
    PassThrough,
}

/// How the metadata for this response was obtained (for `Cache-Status`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Fresh,
    Discovered,
    Revalidated,
    /// Fresh, but revalidated because the request asked (`Cache-Control: no-cache`).
    RequestRevalidated,
    StaleIfError,
    StaleWhileRevalidate,
    StaleAccepted,
    /// Answered by a discovery or revalidation another request made while this one waited
    /// on the object (the response just received, even if already stale on receipt);
    /// `stale`: this request had found a stale copy, not none.
    Collapsed {
        stale: bool,
    },
}

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a [u8]> {
    session.req_header().headers.get(name).map(|v| v.as_bytes())
}

/// The chunk indices a request needs first, for the discovery fetch: from the start of its
/// first range (chunk 0 when the length is needed to place it, as for `-n`) to its end.
fn discovery_span(req: &RangeRequest, chunk_size: u64) -> (u64, u64) {
    match req {
        RangeRequest::Bytes(specs) => match specs.first() {
            Some(RangeSpec::FromTo(a, b)) => (a / chunk_size, b / chunk_size),
            Some(RangeSpec::From(a)) => (a / chunk_size, u64::MAX),
            _ => (0, u64::MAX),
        },
        RangeRequest::Whole => (0, u64::MAX),
    }
}

/// `Cache-Status` detail of a request passed through because the URL's responses vary on a
/// field fills do not forward.
const UNFORWARDED_VARY: &str = "vary-unforwarded";

/// The credentials a request carries: fills never forward them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    None,
    /// `Cookie` (and no `Authorization`): fills never carry it. A stored response whose
    /// variant it selects answers (one that does not vary on Cookie); anything else a fill
    /// brings is not for it, and it is asked for with the cookie, as pass-through.
    Cookie,
    /// `Authorization`: a stored response answers only when it allows that (RFC 9111 §3.5);
    /// a miss is the request's own, and its fill carries the credentials (the answer is
    /// stored only when it allows sharing).
    Authorization,
}

impl Credentials {
    fn of(headers: &http::HeaderMap) -> Credentials {
        if headers.contains_key(http::header::AUTHORIZATION) {
            Credentials::Authorization
        } else if headers.contains_key(http::header::COOKIE) {
            Credentials::Cookie
        } else {
            Credentials::None
        }
    }

    /// Whether a stored response may answer a request with these credentials.
    fn may_use(self, meta: &ObjectMeta) -> bool {
        self != Credentials::Authorization || allows_authorized(meta)
    }

    fn detail(self) -> &'static str {
        match self {
            Credentials::Authorization => "authorization",
            _ => "cookie",
        }
    }
}

/// Whether a stored response may answer a request with `Authorization` (RFC 9111 §3.5).
fn allows_authorized(meta: &ObjectMeta) -> bool {
    let mut map = http::HeaderMap::new();
    if let Some(cc) = meta
        .header("cache-control")
        .and_then(|v| http::HeaderValue::from_str(v).ok())
    {
        map.insert(http::header::CACHE_CONTROL, cc);
    }
    let cc = freshness::parse_cache_control(&map);
    cc.public || cc.s_maxage.is_some() || cc.must_revalidate
}

/// `If-None-Match` (weak comparison) or, without it, `If-Modified-Since`: true when the client's
/// copy is current and a 304 is due.
fn not_modified(session: &Session, meta: &ObjectMeta) -> bool {
    if let Some(inm) = header(session, "if-none-match").and_then(|v| std::str::from_utf8(v).ok()) {
        let Some(etag) = meta.etag.as_deref() else {
            return false;
        };
        let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm.trim() == "*" || inm.split(',').any(|t| bare(t) == bare(etag));
    }
    let ims = header(session, "if-modified-since")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let lm = meta
        .last_modified
        .as_deref()
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((ims, lm), (Some(ims), Some(lm)) if lm <= ims)
}

pub struct CacheLayer {
    pub cache: Arc<ChunkCache>,
    pub stats: Arc<crate::origin::ResilienceStats>,
}

impl CacheLayer {
    /// Answer a GET or HEAD on a cached route from the cache; `host` is the request's host as
    /// [`super::request_host`] gives it (computed once, for routing).
    pub async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Arc<Route>,
        host: &str,
        origin: OriginAccess,
    ) -> Result<Outcome> {
        let req = session.req_header();
        let base = super::object_key_at(route, ctx.scheme, host, req);
        let credentials = Credentials::of(&req.headers);
        let mut forward = super::headers::fill_request_headers(
            &req.headers,
            &super::forwarded(session, ctx),
            &ctx.runtime.config.cluster.cdn_id,
            !ctx.from_peer,
        );
        if credentials == Credentials::Authorization {
            // A miss of a request with Authorization is that request's own: its fill carries
            // the credentials, and what it brings is stored only if the response allows
            // sharing it (RFC 9111 §3.5: `public`, `s-maxage`, `must-revalidate`).
            for v in req.headers.get_all(http::header::AUTHORIZATION) {
                forward.append(http::header::AUTHORIZATION, v.clone());
            }
        }
        let forward = Arc::new(forward);
        // The variant this request selects, by its own fields (RFC 9111 §4.1).
        let (key, fill_key) = self.cache.variants(&base, &req.headers, &forward);
        if self.cache.is_marked_uncacheable(&key) {
            ctx.cache_status = Some(CacheStatus::Bypass("uncacheable"));
            return Ok(Outcome::PassThrough);
        }
        if key != fill_key {
            // The URL's responses vary on a field fills do not forward (credentials, a
            // forwarding or override field): no fill can fetch this request's variant.
            ctx.cache_status = Some(CacheStatus::Bypass(UNFORWARDED_VARY));
            return Ok(Outcome::PassThrough);
        }
        // What the origin is asked for is what the key holds: the canonical path and the
        // keyed part of the query, nothing else (`cache_key.query`).
        let keyed_query = crate::cache::key::normalize_query(req.uri.query(), &route.query_key);
        let mut path_and_query =
            String::with_capacity(req.uri.path().len() + keyed_query.len() + 1);
        path_and_query.push_str(req.uri.path());
        if !keyed_query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&keyed_query);
        }
        let mut obj = ObjectRequest {
            key,
            base,
            path_and_query,
            host: host.to_string(),
            request_id: ctx.request_id.clone(),
            forward,
            policy: ctx.runtime.cache_policy.clone(),
        };
        let is_head = req.method == http::Method::HEAD;
        let range_req = header(session, "range")
            .map(parse_range)
            .unwrap_or(RangeRequest::Whole);
        let directives = freshness::request_directives(&req.headers);
        // The chunks a first fetch asks for; a HEAD needs the metadata only: one chunk.
        let discovery = match discovery_span(&range_req, self.cache.chunk_size) {
            (first, _) if is_head => (first, first),
            span => span,
        };
        if directives.no_store {
            // RFC 9111 §5.2.1.5: nothing of this exchange may be stored.
            ctx.cache_status = Some(CacheStatus::Request("no-store"));
            return Ok(Outcome::PassThrough);
        }
        if credentials == Credentials::Authorization {
            if let Some(m) = self.cache.meta(&obj.key).await {
                if !allows_authorized(&m) {
                    // Stored from a request without credentials and not shareable with one
                    // that has them: the client's own request goes to the origin.
                    ctx.cache_status = Some(CacheStatus::Request("authorization"));
                    return Ok(Outcome::PassThrough);
                }
            }
        }
        let mut looked = 0;
        let (meta, lookup) = loop {
            let found = match self
                .lookup(
                    session,
                    ctx,
                    &mut obj,
                    &origin,
                    &directives,
                    discovery,
                    &range_req,
                    credentials,
                )
                .await?
            {
                Some(found) => found,
                None if ctx.pass_through => return Ok(Outcome::PassThrough),
                None => return Ok(Outcome::Served),
            };
            looked += 1;
            // A version without a validator is served only from the one fetch that brought
            // it: when part of it is gone, it is dropped and fetched whole again.
            let (m, _) = &found;
            if looked == 1 && m.is_ranged() && !m.has_validator() {
                let version = ObjectVersion::new(obj.key.clone(), m.validator.as_str().into());
                if !fill::whole_from_one_fetch(&self.cache, m, &version) {
                    self.cache.invalidate(&obj.key, m).await;
                    continue;
                }
            }
            break found;
        };
        self.respond(session, ctx, &obj, &origin, meta, lookup, range_req)
            .await?;
        Ok(Outcome::Served)
    }

    /// Metadata for the object, from the cache or the origins (a discovery fetch asks for the
    /// chunks `first..=last`). `Ok(None)` when there is none to serve: either an error
    /// response was written, or `ctx.pass_through` is set.
    #[allow(clippy::too_many_arguments)]
    async fn lookup(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        obj: &mut ObjectRequest,
        origin: &OriginAccess,
        directives: &freshness::RequestDirectives,
        (first, last): (u64, u64),
        range_req: &RangeRequest,
        credentials: Credentials,
    ) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        let mut seen_stale = false;
        if let Some(m) = self.cache.meta(&obj.key).await {
            seen_stale = true;
            if !credentials.may_use(&m) {
                return self.credentials_pass(ctx, credentials);
            }
            if let Some(usable) = self.usable(&m, directives) {
                if usable == Lookup::StaleWhileRevalidate {
                    // One background revalidation per object: started unless another
                    // discovery or revalidation holds the object (then that one is it).
                    if let Some(lock) = self.cache.try_lock_object(&obj.key) {
                        self.revalidate_in_background(lock, obj, origin, &m);
                    }
                }
                return Ok(Some((m, usable)));
            }
        }
        if directives.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable stored, and the origin is not to be asked.
            ctx.cache_status = Some(CacheStatus::Request("only-if-cached"));
            send_failure(session, ctx, 504).await?;
            return Ok(None);
        }
        // A response the origin gave for this object from now on (a discovery or revalidation
        // by whoever holds the object while this request waits) answers this request, even if
        // it is already stale on receipt (a slow revalidation, a Date in the past): RFC 9111
        // lets a cache use a response just received, as Varnish's and nginx's waiting lists
        // do. So requests that wait on one revalidation share its answer and never queue
        // revalidations of their own, one after another.
        let waited_since = SystemTime::now();
        // Waits on other fills and on the origin watch the client: one that leaves frees its
        // slot now, and never sets off an origin fetch nobody will read.
        // A peer's request never waits behind a discovery that waits on a peer (it may be
        // waiting on this one): `ChunkCache::lock_object_for_peer`.
        let lock = if ctx.from_peer {
            unless_client_left(session, self.cache.lock_object_for_peer(&obj.key)).await?
        } else {
            unless_client_left(session, self.cache.lock_object(&obj.key)).await?
        };
        // Whoever held the lock may have learnt that the URL's responses vary.
        obj.key = self.cache.variant(&obj.base, &obj.forward);
        if !self.fill_answers(session, obj) {
            return self.unforwarded_vary(ctx);
        }
        if self.cache.is_marked_uncacheable(&obj.key) {
            // Whoever held the lock found it not to be kept (a streamed body too large to
            // stage): pass through rather than fetch it into the cache again.
            ctx.cache_status = Some(CacheStatus::Bypass("uncacheable"));
            ctx.pass_through = true;
            return Ok(None);
        }
        let mut stale = None;
        // A stale copy that cannot be revalidated, kept to serve if fetching it again fails.
        let mut fallback = None;
        if let Some(m) = self.cache.meta(&obj.key).await {
            if !credentials.may_use(&m) {
                return self.credentials_pass(ctx, credentials);
            }
            if let Some(usable) = self.usable(&m, directives) {
                // Someone else discovered or revalidated it while we waited.
                if usable == Lookup::StaleWhileRevalidate {
                    // This request holds the object: its revalidation runs in the background.
                    self.revalidate_in_background(lock, obj, origin, &m);
                }
                return Ok(Some((m, usable)));
            }
            if m.stored_at >= waited_since {
                // Received while this request waited: its answer, whatever its age.
                return Ok(Some((m, Lookup::Collapsed { stale: seen_stale })));
            }
            stale = Some(m);
        }
        if let Some(old) = stale {
            if origin.all_failing() && old.within_stale_if_error(SystemTime::now()) {
                // Every server of the group is ejected or failing: serve the stale copy now
                // rather than wait on tries that will most likely fail.
                log::warn!(
                    "rid={} every server of {} is failing: serving stale {} without asking",
                    ctx.request_id,
                    origin.name(),
                    obj.key.as_str()
                );
                self.stats
                    .stale_served
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Some((old, Lookup::StaleIfError)));
            }
            // Fresh, but the request asked for revalidation (`no-cache`): RFC 9211 `fwd=request`.
            let forced = old.is_fresh(SystemTime::now());
            let revalidation = if old.has_validator() && old.is_ranged() {
                unless_client_left(session, fill::revalidate(&self.cache, origin, obj, &old))
                    .await?
            } else {
                // Nothing to ask the origin with (no validator), or a small response kept
                // whole: fetched again.
                self.cache.invalidate(&obj.key, &old).await;
                fallback = Some(old.clone());
                Revalidation::Changed(None)
            };
            match revalidation {
                Revalidation::Fresh(m) if forced => {
                    return Ok(Some((m, Lookup::RequestRevalidated)))
                }
                Revalidation::Fresh(m) => return Ok(Some((m, Lookup::Revalidated))),
                Revalidation::Changed(None) => {}
                Revalidation::Changed(Some(resp)) => {
                    // The revalidation's answer is the new object: no second request.
                    let found = unless_client_left(session, async {
                        let slot = self.cache.fill_slot().await;
                        fill::discover_from(
                            &self.cache,
                            origin,
                            obj,
                            lock,
                            resp,
                            Some((0, 0)),
                            slot,
                        )
                        .await
                    })
                    .await?;
                    return self
                        .discovered(
                            session,
                            ctx,
                            obj,
                            origin,
                            range_req,
                            found,
                            None,
                            credentials,
                        )
                        .await;
                }
                Revalidation::Uncacheable(reason) => return self.pass(ctx, &obj.key, reason),
                Revalidation::Failed(e) => {
                    if old.within_stale_if_error(SystemTime::now()) {
                        log::warn!(
                            "rid={} serving stale {} after origin failure: {e}",
                            ctx.request_id,
                            obj.key.as_str()
                        );
                        self.stats
                            .stale_served
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Ok(Some((old, Lookup::StaleIfError)));
                    }
                    return self.fail(session, ctx, e.client_status(), &e).await;
                }
            }
        }
        let found = unless_client_left(
            session,
            fill::discover(&self.cache, origin, obj, first, last, lock),
        )
        .await?;
        self.discovered(
            session,
            ctx,
            obj,
            origin,
            range_req,
            found,
            fallback,
            credentials,
        )
        .await
    }

    /// Whether a stored response answers this request without asking the origin first
    /// (RFC 9111 §4.2, §5.2.1: the request's max-age, min-fresh, max-stale and no-cache), or,
    /// expired within its `stale-while-revalidate`, while one background revalidation runs
    /// (`Lookup::StaleWhileRevalidate`: the caller starts it, or finds one running).
    fn usable(
        &self,
        m: &Arc<ObjectMeta>,
        directives: &freshness::RequestDirectives,
    ) -> Option<Lookup> {
        let now = SystemTime::now();
        // The age to the nanosecond: a request's `max-age=0` revalidates a copy stored a
        // moment ago too.
        let age = std::time::Duration::from_secs(m.initial_age)
            + now.duration_since(m.stored_at).unwrap_or_default();
        let stored = freshness::Stored {
            age,
            lifetime: m.lifetime(),
            must_revalidate: m.must_revalidate,
            no_cache: false,
        };
        match freshness::reuse(directives, &stored) {
            freshness::Reuse::Fresh => Some(Lookup::Fresh),
            freshness::Reuse::Stale => Some(Lookup::StaleAccepted),
            freshness::Reuse::Revalidate => {
                let only_expired = !directives.no_cache
                    && directives.max_age.is_none()
                    && directives.min_fresh.is_none();
                (only_expired
                    && !m.is_fresh(now)
                    && m.has_validator()
                    && m.is_ranged()
                    && m.within_stale_while_revalidate(now))
                .then_some(Lookup::StaleWhileRevalidate)
            }
        }
    }

    /// Revalidate `old` in the background, holding the object's `lock` until it ends (so it is
    /// the only one, and requests that need an answer from the origin wait on it and share
    /// it). It is owned: a tracked task that ends with the origin's timeouts, holding a fill
    /// slot from the start, so at most `cache.max_concurrent_fills` run at once; with none free
    /// it does not start (the stale copy is served all the same, and a later request tries).
    fn revalidate_in_background(
        &self,
        lock: crate::cache::store::ObjectLock,
        obj: &ObjectRequest,
        origin: &OriginAccess,
        old: &Arc<ObjectMeta>,
    ) {
        let Some(slot) = self.cache.try_fill_slot() else {
            log::debug!(
                "no fill slot free: background revalidation of {} left to a later request",
                obj.key.as_str()
            );
            return;
        };
        let (cache, origin, obj, old) =
            (self.cache.clone(), origin.clone(), obj.clone(), old.clone());
        self.cache.spawn(async move {
            let outcome = fill::revalidate(&cache, &origin, &obj, &old).await;
            if let Revalidation::Changed(Some(resp)) = outcome {
                let _ = fill::discover_from(
                    &cache,
                    &origin,
                    &obj,
                    lock,
                    resp,
                    Some((0, 0)),
                    Some(slot),
                )
                .await;
            }
        });
    }

    /// Act on what discovery found: metadata to serve from, or an answer already written
    /// (relayed, streamed, sliced or an error), or pass-through.
    #[allow(clippy::too_many_arguments)]
    async fn discovered(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        obj: &mut ObjectRequest,
        origin: &OriginAccess,
        range_req: &RangeRequest,
        found: Discovery,
        fallback: Option<Arc<ObjectMeta>>,
        credentials: Credentials,
    ) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        // Stored (or marked) under the variant the response selected, if it varies.
        obj.key = self.cache.variant(&obj.base, &obj.forward);
        let stored = matches!(found, Discovery::Stored(_) | Discovery::Streaming { .. });
        if stored && !self.fill_answers(session, obj) {
            // Stored for the requests it answers; not this one, which selects another variant.
            return self.unforwarded_vary(ctx);
        }
        if credentials == Credentials::Cookie && !stored && !matches!(found, Discovery::Failed(_)) {
            // The fill asked without the client's credentials, and what it got is not a
            // stored response usable for this request (relayed, sliced, uncacheable): the
            // client's own request goes to the origin, credentials and all. What later
            // requests may skip is remembered as it would have been.
            match &found {
                Discovery::Relay {
                    reason,
                    remember: true,
                    ..
                }
                | Discovery::Slice { reason, .. }
                | Discovery::Uncacheable(reason) => self.cache.mark_uncacheable(&obj.key, reason),
                _ => {}
            }
            return self.credentials_pass(ctx, credentials);
        }
        match found {
            Discovery::Stored(m) => Ok(Some((m, Lookup::Discovered))),
            Discovery::Streaming { headers, body } => {
                self.stream_whole(session, ctx, &headers, body).await?;
                Ok(None)
            }
            Discovery::Uncacheable(reason) => self.pass(ctx, &obj.key, reason),
            Discovery::Slice { resp, reason } => {
                self.cache.mark_uncacheable(&obj.key, reason);
                let max_ranges = obj.policy.max_ranges;
                super::slices::relay_slices(
                    session, ctx, origin, obj, resp, range_req, max_ranges, reason,
                )
                .await?;
                Ok(None)
            }
            Discovery::Relay {
                resp,
                reason,
                remember,
            } => {
                if remember {
                    self.cache.mark_uncacheable(&obj.key, reason);
                }
                self.relay(session, ctx, resp, reason).await?;
                Ok(None)
            }
            Discovery::Failed(e) => match fallback {
                Some(old) if old.within_stale_if_error(SystemTime::now()) => {
                    log::warn!(
                        "rid={} serving stale {} after origin failure: {e}",
                        ctx.request_id,
                        obj.key.as_str()
                    );
                    self.stats
                        .stale_served
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(Some((old, Lookup::StaleIfError)))
                }
                _ => self.fail(session, ctx, e.client_status(), &e).await,
            },
        }
    }

    /// Relay a body of unknown length as it arrives from the origin (200, whole: its length,
    /// hence any range, is unknown until the end), while the cache stores it in passing.
    async fn stream_whole(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        headers: &http::HeaderMap,
        mut body: tokio::sync::mpsc::Receiver<BodyStep>,
    ) -> Result<()> {
        let status = CacheStatus::Miss;
        ctx.cache_status = Some(status);
        let mut h = ResponseHeader::build(200, Some(headers.len() + 4))?;
        for (n, v) in headers
            .iter()
            .filter(|(n, _)| ObjectMeta::keep_header(n.as_str()))
        {
            h.append_header(n.clone(), v.clone())?;
        }
        h.insert_header("via", VIA_VALUE)?;
        h.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        status.set_on(&mut h, &ctx.runtime.config.cluster.cdn_id)?;
        // The length is known only at the end: chunked (or close-delimited to HTTP/1.0), so
        // that a break shows.
        let framing = frame_unknown_length(session, &mut h)?;
        let is_head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), is_head).await?;
        if is_head {
            return Ok(());
        }
        let broke = |session: &Session, e: &dyn std::fmt::Display| {
            framing::abort(session, framing);
            Error::explain(
                ErrorType::HTTPStatus(502),
                format!("origin body failed mid-response: {e}"),
            )
        };
        loop {
            match unless_client_left(session, body.recv()).await? {
                Some(BodyStep::Piece(piece)) => write_body(session, piece).await?,
                Some(BodyStep::End) => break,
                Some(BodyStep::Failed(e)) => return Err(broke(session, &e)),
                None => return Err(broke(session, &FillError::Abandoned)),
            }
        }
        session.write_response_body(None, true).await
    }

    /// Pass the origin's answer to the discovery fetch on as it is (hop-by-hop fields removed,
    /// `Via`, `X-Request-Id` and `Cache-Status` added), streaming its body.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut resp: Reply,
        reason: &'static str,
    ) -> Result<()> {
        let cache_status = CacheStatus::Relayed {
            status: resp.status(),
            reason,
        };
        ctx.cache_status = Some(cache_status);
        let mut h = resp.header().clone();
        for name in hop_by_hop_names(&h.headers, false) {
            h.remove_header(&name);
        }
        let via = via(h.headers.get("via").map(|v| v.as_bytes()));
        h.insert_header("via", via)?;
        h.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        cache_status.set_on(&mut h, &ctx.runtime.config.cluster.cdn_id)?;
        // A body without a length (the origin's was chunked: Transfer-Encoding is hop-by-hop)
        // is framed so that a break shows.
        let framing = frame_unknown_length(session, &mut h)?;
        let is_head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), is_head).await?;
        if is_head {
            resp.finish().await;
            return Ok(());
        }
        loop {
            match unless_client_left(session, resp.next_piece()).await? {
                Ok(Some(piece)) => write_body(session, piece).await?,
                Ok(None) => break,
                Err(e) => {
                    framing::abort(session, framing);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(502),
                        format!("origin body failed mid-response: {e}"),
                    ));
                }
            }
        }
        resp.finish().await;
        session.write_response_body(None, true).await
    }

    /// Whether what a fill fetches (the variant its forwarded fields select) is the variant
    /// this client's own fields select.
    fn fill_answers(&self, session: &Session, obj: &ObjectRequest) -> bool {
        self.cache.variant(&obj.base, &session.req_header().headers) == obj.key
    }

    /// Pass a request through to be asked with its credentials.
    fn credentials_pass(
        &self,
        ctx: &mut RequestCtx,
        credentials: Credentials,
    ) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        ctx.cache_status = Some(CacheStatus::Request(credentials.detail()));
        ctx.pass_through = true;
        Ok(None)
    }

    /// Pass a request through because its variant is not one a fill can fetch.
    fn unforwarded_vary(&self, ctx: &mut RequestCtx) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        ctx.cache_status = Some(CacheStatus::Bypass(UNFORWARDED_VARY));
        ctx.pass_through = true;
        Ok(None)
    }

    fn pass(
        &self,
        ctx: &mut RequestCtx,
        key: &ObjectKey,
        reason: &'static str,
    ) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        self.cache.mark_uncacheable(key, reason);
        ctx.cache_status = Some(CacheStatus::Bypass(reason));
        ctx.pass_through = true;
        Ok(None)
    }

    async fn fail(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        why: &crate::origin::fetch::FetchError,
    ) -> Result<Option<(Arc<ObjectMeta>, Lookup)>> {
        // A TLS failure was logged once for its server and cause (`UpstreamPool::tls_failed`),
        // a group without a server when its names stopped resolving: not again per request.
        let level = if why.tls.is_some() || why.is_no_server() {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "rid={} cache fill failed, answering {status}: {why}",
            ctx.request_id
        );
        ctx.cache_status = Some(CacheStatus::Failed {
            status,
            detail: None,
        });
        send_failure(session, ctx, status).await?;
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        obj: &ObjectRequest,
        origin: &OriginAccess,
        meta: Arc<ObjectMeta>,
        lookup: Lookup,
        range_req: RangeRequest,
    ) -> Result<()> {
        let now = SystemTime::now();
        let is_head = session.req_header().method == http::Method::HEAD;
        // The chunks' names, computed once for the whole response.
        let version = ObjectVersion::new(obj.key.clone(), meta.validator.as_str().into());

        if !meta.is_ranged() {
            // A response with a status of its own, kept whole: replayed as it is.
            return self
                .replay_whole(session, ctx, obj, origin, &meta, &version, lookup, now)
                .await;
        }
        if not_modified(session, &meta) {
            ctx.cache_status = Some(cache_status(lookup, true));
            let mut h = self.base_header(304, &meta, ctx, now)?;
            h.remove_header("content-length");
            return session.write_response_header(Box::new(h), true).await;
        }

        let if_range_ok = match header(session, "if-range") {
            None => true,
            Some(v) => {
                let lm = meta
                    .last_modified
                    .as_deref()
                    .and_then(|v| httpdate::parse_http_date(v).ok());
                if_range_holds(v, meta.etag.as_deref(), lm)
            }
        };
        let decision = if if_range_ok {
            resolve(&range_req, meta.size, obj.policy.max_ranges)
        } else {
            RangeDecision::Whole
        };

        // What the body is: (part header, range) pairs, then a trailer.
        let (parts, trailer, mut head) = match decision {
            RangeDecision::Unsatisfiable => {
                ctx.cache_status = Some(cache_status(lookup, true));
                let body = Bytes::from_static(b"416 range not satisfiable\n");
                let mut h = self.base_header(416, &meta, ctx, now)?;
                h.insert_header("content-range", meta.wire().unsatisfied_range())?;
                h.insert_header("content-type", "text/plain; charset=utf-8")?;
                h.insert_header("content-length", body.len().to_string())?;
                session.write_response_header(Box::new(h), is_head).await?;
                if !is_head {
                    session.write_response_body(Some(body), true).await?;
                }
                return Ok(());
            }
            RangeDecision::Whole => {
                let whole = if meta.size == 0 {
                    Vec::new()
                } else {
                    vec![(
                        Bytes::new(),
                        ByteRange {
                            start: 0,
                            end: meta.size - 1,
                        },
                    )]
                };
                let mut h = self.base_header(200, &meta, ctx, now)?;
                h.insert_header("content-length", meta.wire().length.clone())?;
                (whole, Bytes::new(), h)
            }
            RangeDecision::Partial(ranges) if ranges.len() == 1 => {
                let r = ranges[0];
                let mut h = self.base_header(206, &meta, ctx, now)?;
                h.insert_header("content-range", meta.wire().content_range(r.start, r.end))?;
                h.insert_header("content-length", http::HeaderValue::from(r.len()))?;
                (vec![(Bytes::new(), r)], Bytes::new(), h)
            }
            RangeDecision::Partial(ranges) => {
                let layout = MultipartLayout::new(
                    &ranges,
                    meta.header("content-type"),
                    meta.size,
                    new_boundary(),
                );
                let mut h = self.base_header(206, &meta, ctx, now)?;
                h.insert_header("content-type", layout.content_type())?;
                h.insert_header("content-length", http::HeaderValue::from(layout.body_len()))?;
                (layout.parts, layout.trailer, h)
            }
        };

        let all_cached = parts.iter().all(|(_, r)| {
            let first = r.start / self.cache.chunk_size;
            let last = r.end / self.cache.chunk_size;
            (first..=last).all(|index| self.cache.has_chunk(&version, index))
        });
        let status = cache_status(lookup, all_cached);
        ctx.cache_status = Some(status);
        status.set_on(&mut head, &ctx.runtime.config.cluster.cdn_id)?;
        if is_head || parts.is_empty() {
            return session.write_response_header(Box::new(head), true).await;
        }

        // Hold the header until the first byte is in hand: an origin failure now is a clean 5xx.
        // A peer asks for many clients at once (each shaped and shared on its own node): no
        // one client's share of the budget applies to it, only the budget itself.
        let client = if ctx.from_peer {
            0
        } else {
            self.cache
                .response_budget()
                .tag(&super::client_of(session, ctx))
        };
        let mut body = BodyPlan::new(parts, client);
        // While it may hold budget, the response's connection is marked: a client that stops
        // reading may then be cut for responses waiting for the budget (`cache::held`).
        let _holding = ctx.connection.as_ref().map(|c| c.holding_memory());
        let first =
            match unless_client_left(session, body.next_piece(self, obj, origin, &meta, &version))
                .await?
            {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("rid={} first chunk failed: {e}", ctx.request_id);
                    ctx.cache_status = Some(CacheStatus::Failed {
                        status: 502,
                        detail: Some(detail(&e)),
                    });
                    send_failure(session, ctx, 502).await?;
                    return Ok(());
                }
            };
        session.write_response_header(Box::new(head), false).await?;
        let mut piece = first;
        loop {
            match piece {
                Some(p) => write_body(session, p).await?,
                None => break,
            }
            piece = match unless_client_left(
                session,
                body.next_piece(self, obj, origin, &meta, &version),
            )
            .await?
            {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("rid={} aborting response mid-body: {e}", ctx.request_id);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(502),
                        format!("cache fill failed mid-response: {e}"),
                    ));
                }
            };
        }
        if !trailer.is_empty() {
            write_body(session, trailer).await?;
        }
        session.write_response_body(None, true).await
    }

    /// Replay a small response kept whole with its own status (a redirect, a 404, ...).
    #[allow(clippy::too_many_arguments)]
    async fn replay_whole(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        obj: &ObjectRequest,
        origin: &OriginAccess,
        meta: &Arc<ObjectMeta>,
        version: &ObjectVersion,
        lookup: Lookup,
        now: SystemTime,
    ) -> Result<()> {
        let is_head = session.req_header().method == http::Method::HEAD;
        let body = if meta.size == 0 {
            Bytes::new()
        } else {
            let source = fill::chunk_source(&self.cache, origin, obj, meta, version, 0, 0).await;
            let chunk = match source {
                ChunkSource::Ready(b) => Ok(b),
                ChunkSource::Filling(f) => {
                    let mut reader = f.reader(0, meta.size);
                    let mut whole = bytes::BytesMut::new();
                    loop {
                        match reader.next().await {
                            Some(Ok(p)) => whole.extend_from_slice(&p),
                            Some(Err(e)) => break Err(e),
                            None => break Ok(whole.freeze()),
                        }
                    }
                }
            };
            match chunk {
                Ok(b) if b.len() as u64 == meta.size => b,
                other => {
                    let e = other.err().unwrap_or(FillError::Abandoned);
                    log::warn!("rid={} stored response unreadable: {e}", ctx.request_id);
                    self.cache.forget(&obj.key).await;
                    ctx.cache_status = Some(CacheStatus::Failed {
                        status: 502,
                        detail: Some(detail(&e)),
                    });
                    return send_failure(session, ctx, 502).await;
                }
            }
        };
        let status = cache_status(lookup, true);
        ctx.cache_status = Some(status);
        let mut h = self.base_header(meta.status, meta, ctx, now)?;
        h.remove_header("accept-ranges");
        if meta.status != 204 {
            h.insert_header("content-length", meta.wire().length.clone())?;
        }
        session
            .write_response_header(Box::new(h), is_head || body.is_empty())
            .await?;
        if !is_head && !body.is_empty() {
            write_body(session, body).await?;
            session.write_response_body(None, true).await?;
        }
        Ok(())
    }

    fn base_header(
        &self,
        status: u16,
        meta: &ObjectMeta,
        ctx: &RequestCtx,
        now: SystemTime,
    ) -> Result<ResponseHeader> {
        hit_header(
            status,
            meta,
            &ctx.request_id,
            ctx.cache_status,
            &ctx.runtime.config.cluster.cdn_id,
            now,
        )
    }
}

/// The response header of an answer from the cache: the stored fields plus `Accept-Ranges`,
/// `Age`, `Date` (only when the origin sent none), `Via`, `X-Request-Id` and `Cache-Status`.
/// The caller adds the framing (`Content-Length`, `Content-Range`).
///
/// Built as `http` parts, without Pingora's header-case map: the stored fields are already
/// parsed (`ObjectMeta::wire`), so a hit clones refcounted values instead of parsing and
/// allocating each one. Standard names go out title-cased, others in lower case (as the
/// origin's were stored).
pub fn hit_header(
    status: u16,
    meta: &ObjectMeta,
    request_id: &str,
    cache_status: Option<CacheStatus>,
    cdn_id: &str,
    now: SystemTime,
) -> Result<ResponseHeader> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status)
        .map_err(|e| Error::because(ErrorType::InternalError, "stored status", e))?;
    let wire = &meta.wire().fields;
    parts.headers.reserve(wire.len() + 8);
    for (n, v) in wire.iter() {
        parts.headers.append(n.clone(), v.clone());
    }
    let h = &mut parts.headers;
    h.insert(
        http::header::ACCEPT_RANGES,
        http::HeaderValue::from_static("bytes"),
    );
    h.insert(http::header::AGE, http::HeaderValue::from(meta.age(now)));
    // The stored Date is the origin's, kept as it was (RFC 9111 §4: a cache does not
    // update it); one is added only when the origin sent none.
    if !h.contains_key(http::header::DATE) {
        if let Ok(v) = http::HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
            h.insert(http::header::DATE, v);
        }
    }
    h.insert(http::header::VIA, http::HeaderValue::from_static(VIA_VALUE));
    if let Ok(v) = http::HeaderValue::from_str(request_id) {
        h.insert(X_REQUEST_ID, v);
    }
    if let Some(status) = cache_status {
        let upstream = h.get("cache-status").map(|v| v.as_bytes());
        let v = match status.field(cdn_id, upstream) {
            std::borrow::Cow::Borrowed(s) => Ok(http::HeaderValue::from_static(s)),
            std::borrow::Cow::Owned(s) => http::HeaderValue::try_from(s),
        };
        if let Ok(v) = v {
            h.insert("cache-status", v);
        }
    }
    Ok(ResponseHeader::from(parts))
}

/// An error answer with the `Cache-Status` already decided in `ctx`.
async fn send_failure(session: &mut Session, ctx: &RequestCtx, status: u16) -> Result<()> {
    let cache_status = CacheStatus::log_field(ctx.cache_status);
    respond::send_cache_error(session, status, &ctx.request_id, &cache_status).await
}

/// Write a body piece. A shaped response is paced at the connection's writes (`conn::pace`);
/// on an HTTP/2 stream, whose connection is shared, here: each part of at most
/// `conn::pace::MAX_RESERVATION` is accounted, then waited for while the stream is watched (a
/// reset ends the wait and the response at once).
pub(super) async fn write_body(session: &mut Session, piece: Bytes) -> Result<()> {
    let stream = match crate::conn::h2::StreamTicket::of(session.req_header()) {
        Some(s) if s.is_paced() => s.clone(),
        _ => return session.write_response_body(Some(piece), false).await,
    };
    let mut at = 0;
    while at < piece.len() {
        let Some((n, wait)) = stream.reserve(piece.len() - at) else {
            return session
                .write_response_body(Some(piece.slice(at..)), false)
                .await;
        };
        if !wait.is_zero() {
            if let Err(e) = unless_client_left(session, tokio::time::sleep(wait)).await {
                stream.refund_reserved();
                return Err(e);
            }
        }
        if let Err(e) = session
            .write_response_body(Some(piece.slice(at..at + n)), false)
            .await
        {
            stream.refund_reserved();
            return Err(e);
        }
        stream.written(n);
        at += n;
    }
    Ok(())
}

/// Await `next` (a response's next body piece) unless the client leaves first: a response
/// whose client is gone ends now, not when its next piece arrives from a slow fill or origin.
/// The watch is Pingora's idle probe on the client connection: a FIN or a reset ends the
/// response; bytes of a pipelined request are kept for it; a request body (a GET may carry
/// one) is read and dropped, as the cache never forwards it. A piece already in hand is taken
/// without touching the socket.
pub(super) async fn unless_client_left<T>(
    session: &mut Session,
    next: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::pin!(next);
    loop {
        tokio::select! {
            biased;
            v = &mut next => return Ok(v),
            r = session.as_mut().read_body_or_idle(false) => {
                if let Err(e) = r {
                    // Logged as the client's doing (499), as a write to a gone client is.
                    return Err(Error::because(
                        ErrorType::WriteError,
                        "the client left while its response waited for the next piece",
                        e,
                    )
                    .into_down());
                }
            }
        }
    }
}

fn detail(e: &FillError) -> &'static str {
    match e {
        FillError::Origin(_) => "origin-error",
        FillError::VersionChanged => "version-changed",
        FillError::Abandoned => "abandoned",
    }
}

/// RFC 9211 `Cache-Status` for a response served from the cache.
fn cache_status(lookup: Lookup, all_chunks_cached: bool) -> CacheStatus {
    match (lookup, all_chunks_cached) {
        (Lookup::Fresh, true) => CacheStatus::Hit,
        (Lookup::Fresh, false) => CacheStatus::Partial,
        (Lookup::Discovered, _) => CacheStatus::Miss,
        (Lookup::Revalidated, _) => CacheStatus::Revalidated,
        (Lookup::RequestRevalidated, _) => CacheStatus::RequestRevalidated,
        (Lookup::StaleIfError, _) => CacheStatus::StaleIfError,
        (Lookup::StaleWhileRevalidate, _) => CacheStatus::StaleWhileRevalidate,
        (Lookup::StaleAccepted, _) => CacheStatus::StaleAccepted,
        (Lookup::Collapsed { stale }, _) => CacheStatus::Collapsed { stale },
    }
}

/// Walks the body's parts and their chunk spans, yielding pieces as they become available.
struct BodyPlan {
    parts: Vec<(Bytes, ByteRange)>,
    next_part: usize,
    spans: Vec<crate::range::plan::ChunkSpan>,
    next_span: usize,
    current: Option<FlightReader>,
    /// This response's hold on the chunk it writes from, within `cache.response_budget`
    /// (see `cache::held`).
    held: Option<Held>,
    /// Whose share of the budget it takes.
    client: ClientTag,
}

impl BodyPlan {
    fn new(parts: Vec<(Bytes, ByteRange)>, client: ClientTag) -> BodyPlan {
        BodyPlan {
            client,
            parts,
            next_part: 0,
            spans: Vec::new(),
            next_span: 0,
            current: None,
            held: None,
        }
    }

    async fn next_piece(
        &mut self,
        layer: &CacheLayer,
        obj: &ObjectRequest,
        origin: &OriginAccess,
        meta: &Arc<ObjectMeta>,
        version: &ObjectVersion,
    ) -> Result<Option<Bytes>, FillError> {
        // The chunk just read stays held until the next one is found: holding it keeps the
        // rest of its run findable though the memory tier let go of it (see cache::flight).
        let mut _previous = None;
        loop {
            if let Some(reader) = self.current.as_mut() {
                match reader.next().await {
                    Some(piece) => return piece.map(Some),
                    None => _previous = self.current.take(),
                }
            }
            if let Some(span) = self.spans.get(self.next_span).copied() {
                self.next_span += 1;
                // The chunk written last is let go: its charge goes back to the budget once
                // no response holds it.
                self.held = None;
                let last_needed = self.spans.last().map(|s| s.index).unwrap_or(span.index);
                let cache = &layer.cache;
                let budget = cache.response_budget();
                let len = fill::chunk_len(cache, meta, span.index);
                // A chunk at hand (filling, or in the memory tier) is held if another response
                // holds it already (free) or the budget has room.
                let at_hand = fill::chunk_in_hand(cache, version, span.index).map(|src| {
                    budget
                        .try_hold(anchor(&src), len, self.client)
                        .map(|held| (held, src))
                });
                let src = match at_hand {
                    Some(Ok((held, src))) => {
                        self.held = Some(held);
                        src
                    }
                    refused => {
                        // Room first, then the chunk: a response never starts a fill it
                        // cannot hold. Waiting, it lets go of every chunk in hand (it holds
                        // no memory), and takes its turn.
                        drop(refused);
                        let room = match budget.try_reserve(len, self.client) {
                            Some(room) => room,
                            None => {
                                drop(_previous.take());
                                match budget.reserve(len, self.client).await {
                                    Some(room) => room,
                                    None => return Err(FillError::Abandoned),
                                }
                            }
                        };
                        let src = fill::chunk_source(
                            cache,
                            origin,
                            obj,
                            meta,
                            version,
                            span.index,
                            last_needed,
                        )
                        .await;
                        self.held = Some(budget.hold_reserved(anchor(&src), room));
                        src
                    }
                };
                match src {
                    ChunkSource::Ready(b) => {
                        let (from, to) = (span.offset as usize, (span.offset + span.len) as usize);
                        match b.get(from..to) {
                            Some(_) => return Ok(Some(b.slice(from..to))),
                            None => {
                                return Err(FillError::Origin(
                                    "cached chunk shorter than expected".into(),
                                ))
                            }
                        }
                    }
                    ChunkSource::Filling(f) => {
                        self.current = Some(f.reader(span.offset, span.len));
                        continue;
                    }
                }
            }
            let Some((part_header, range)) = self.parts.get(self.next_part).cloned() else {
                return Ok(None);
            };
            self.next_part += 1;
            self.spans = spans(range, layer.cache.chunk_size).collect();
            self.next_span = 0;
            if !part_header.is_empty() {
                return Ok(Some(part_header));
            }
        }
    }
}

/// What names a chunk to the response budget, and keeps it alive while held: a finished
/// chunk by its allocation (shared by the memory tier, its flight and every reader), a chunk
/// still being filled by its flight.
fn anchor(src: &ChunkSource) -> Anchor {
    match src {
        ChunkSource::Ready(b) => Anchor::Chunk(b.clone()),
        ChunkSource::Filling(f) => match f.whole() {
            Some(b) => Anchor::Chunk(b),
            None => Anchor::Flight(f.clone()),
        },
    }
}
