//! Filling the cache from origins: discovering an object (its length, validator and freshness)
//! from the first chunk-aligned fetch, revalidating a stale one, and streaming runs of missing
//! chunks into their single-flight entries.
//!
//! Version rule: every fetch after discovery must come back with the same validator (ETag, else
//! Last-Modified + length); otherwise the old version is dropped and the fill fails with
//! `VersionChanged`, so a response never mixes bytes of two versions.

use super::flight::{FillError, Flight, FlightGuard, Joined};
use super::freshness::{self, Storability, StorePolicyInput};
use super::key::ObjectKey;
use super::meta::ObjectMeta;
use super::store::{ChunkCache, ChunkId, ObjectLock};
use crate::origin::fetch::{self, FetchError, OriginRequest, OriginResponse};
use crate::origin::pool::UpstreamPool;
use crate::range::plan::{chunk_bounds, chunk_count};
use bytes::{Buf, Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use std::sync::Arc;
use std::time::SystemTime;

/// Most chunks one origin request asks for.
pub const MAX_RUN_CHUNKS: u64 = 16;

/// How to reach the origins of one route.
#[derive(Clone)]
pub struct OriginAccess {
    pub connector: Arc<Connector>,
    pub pool: Arc<UpstreamPool>,
}

/// The object a request is about, and what is needed to ask an origin for it.
#[derive(Clone)]
pub struct ObjectRequest {
    pub key: ObjectKey,
    pub path_and_query: String,
    pub host: String,
    pub request_id: String,
}

impl ObjectRequest {
    fn origin_request(
        &self,
        range: Option<(u64, u64)>,
        headers: Vec<(&'static str, String)>,
    ) -> OriginRequest {
        OriginRequest {
            method: http::Method::GET,
            path_and_query: self.path_and_query.clone(),
            host: self.host.clone(),
            range,
            headers,
            request_id: self.request_id.clone(),
            hash_key: self.key.as_str().to_string(),
        }
    }
}

/// Where a chunk's bytes come from.
pub enum ChunkSource {
    Ready(Bytes),
    Filling(Arc<Flight>),
}

pub enum Discovery {
    Stored(Arc<ObjectMeta>),
    /// A body of unknown length, streamed as it arrives (and cached as it passes).
    Streaming {
        headers: http::HeaderMap,
        body: Arc<Flight>,
    },
    /// Not cacheable (reason): the request is passed through instead.
    Uncacheable(&'static str),
    /// Not cacheable, but the origin's answer to the discovery fetch is a whole answer to the
    /// request (an error or other non-2xx status, or a whole 200): pass it on as it is, so the
    /// origin sees one request. `remember`: later requests may go straight to pass-through.
    Relay {
        resp: Box<OriginResponse>,
        reason: &'static str,
        remember: bool,
    },
    Failed(FetchError),
}

pub enum Revalidation {
    /// Still the same version; freshness renewed (304, or same validator).
    Fresh(Arc<ObjectMeta>),
    /// A new version exists; the old one was dropped.
    Changed,
    Uncacheable(&'static str),
    Failed(FetchError),
}

fn chunk_len(cache: &ChunkCache, meta: &ObjectMeta, index: u64) -> u64 {
    chunk_bounds(index, cache.chunk_size, meta.size)
        .map(|b| b.len())
        .unwrap_or(0)
}

/// The request headers that make an origin refuse to mix versions: `If-Range` with a strong
/// ETag, or with the Last-Modified date.
fn if_range(meta: &ObjectMeta) -> Vec<(&'static str, String)> {
    match (&meta.etag, &meta.last_modified) {
        (Some(e), _) if !e.starts_with("W/") => vec![("if-range", e.clone())],
        (_, Some(lm)) => vec![("if-range", lm.clone())],
        _ => Vec::new(),
    }
}

/// The total length and first byte offset an origin response carries: 206 from Content-Range,
/// 200 from Content-Length (offset 0).
fn response_extent(resp: &OriginResponse) -> Option<(u64, Option<u64>)> {
    match resp.status() {
        206 => {
            let (range, total) = fetch::parse_content_range(resp.header_str("content-range")?)?;
            Some((range?.0, total))
        }
        200 => Some((
            0,
            resp.header_str("content-length")
                .and_then(|v| v.trim().parse().ok()),
        )),
        _ => None,
    }
}

fn response_validator(resp: &OriginResponse, size: u64) -> Option<String> {
    ObjectMeta::validator_of(
        resp.header_str("etag"),
        resp.header_str("last-modified"),
        size,
    )
}

/// Build metadata from an origin response, or say why it must not be stored.
fn meta_from(
    cache: &ChunkCache,
    resp_headers: &http::HeaderMap,
    status: u16,
    size: u64,
) -> Result<ObjectMeta, &'static str> {
    let now = SystemTime::now();
    let policy = freshness::store_policy(&StorePolicyInput {
        status,
        headers: resp_headers,
        // The cache's own origin requests never carry a client's credentials.
        request_has_authorization: false,
        default_ttl: cache.default_ttl,
        default_stale_if_error: cache.stale_if_error,
        now,
    });
    let (fresh_for, stale_if_error, must_revalidate) = match policy {
        Storability::Store {
            fresh_for,
            stale_if_error,
            must_revalidate,
        } => (fresh_for, stale_if_error, must_revalidate),
        Storability::NoStore(reason) => return Err(reason),
    };
    let text = |n: &str| {
        resp_headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = text("etag");
    let last_modified = text("last-modified");
    let validator = ObjectMeta::validator_of(etag.as_deref(), last_modified.as_deref(), size)
        .ok_or("no-validator")?;
    let headers = resp_headers
        .iter()
        .filter(|(n, _)| ObjectMeta::keep_header(n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    // RFC 9111 §4.2.3: the age it already had is the larger of its Age and its apparent age.
    let age_header: u64 = text("age").and_then(|a| a.trim().parse().ok()).unwrap_or(0);
    let apparent = text("date")
        .and_then(|d| httpdate::parse_http_date(&d).ok())
        .and_then(|d| now.duration_since(d).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let initial_age = age_header.max(apparent);
    Ok(ObjectMeta {
        size,
        validator,
        etag,
        last_modified,
        headers,
        stored_at: now,
        initial_age,
        fresh_until: now + fresh_for,
        stale_if_error,
        must_revalidate,
    })
}

/// Register fills for the missing chunks among `first..=last`; returns the ones this caller
/// now owns (others are already cached or being filled by someone else).
fn claim(
    cache: &ChunkCache,
    key: &ObjectKey,
    validator: &Arc<str>,
    first: u64,
    last: u64,
) -> Vec<(u64, Arc<Flight>)> {
    (first..=last)
        .filter_map(|index| {
            let id = ChunkId {
                key: key.clone(),
                validator: validator.clone(),
                index,
            };
            match cache.join_fill(&id) {
                Joined::Started(f) => Some((index, f)),
                Joined::Existing(_) | Joined::Ready(_) => None,
            }
        })
        .collect()
}

/// First fetch of an object: learn what it is from a chunk-aligned request for chunks
/// `first..=last`, store its metadata, and stream the body into those chunks' fills.
///
/// `lock` is the object's discovery lock: held until the metadata is published.
pub async fn discover(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    first: u64,
    last: u64,
    lock: ObjectLock,
) -> Discovery {
    let cs = cache.chunk_size;
    let last = last.min(first.saturating_add(MAX_RUN_CHUNKS - 1));
    let range = (
        first.saturating_mul(cs),
        last.saturating_add(1).saturating_mul(cs).saturating_sub(1),
    );
    let open = |range: Option<(u64, u64)>| async move {
        fetch::open(
            &origin.connector,
            &origin.pool,
            &obj.origin_request(range, Vec::new()),
            &[],
        )
        .await
    };
    let mut resp = match open(Some(range)).await {
        Ok(r) => r,
        Err(e) => return Discovery::Failed(e),
    };
    if resp.status() == 416 {
        // The client's first range lies past the end: learn the object from its start instead
        // (an empty object has no byte to ask for, so ask for all of it).
        let total = resp
            .header_str("content-range")
            .and_then(fetch::parse_content_range)
            .and_then(|(_, t)| t);
        let retry = match total {
            Some(0) => None,
            _ => Some((
                0,
                cs.saturating_mul(last.saturating_sub(first).saturating_add(1))
                    .saturating_sub(1),
            )),
        };
        resp = match open(retry).await {
            Ok(r) => r,
            Err(e) => return Discovery::Failed(e),
        };
    }
    let status = resp.status();
    let Some((offset, total)) = response_extent(&resp) else {
        // The origin's own answer (an error, a redirect, ...): the client gets it as it is. A
        // server error is not remembered: the next request asks again.
        let remember = status < 500;
        return Discovery::Relay {
            resp: Box::new(resp),
            reason: "status",
            remember,
        };
    };
    let Some(size) = total else {
        if status == 200 {
            return stream_unknown_length(cache, obj, resp, lock);
        }
        return Discovery::Uncacheable("no-length");
    };
    if status == 200 && size > cache.max_object_size {
        return Discovery::Relay {
            resp: Box::new(resp),
            reason: "too-large",
            remember: true,
        };
    }
    if offset % cs != 0 {
        return Discovery::Uncacheable("unaligned-range");
    }
    let meta = match meta_from(cache, &resp.header.headers, status, size) {
        Ok(m) => Arc::new(m),
        // A whole 200 answers any request: pass it on rather than asking again.
        Err(reason) if status == 200 => {
            return Discovery::Relay {
                resp: Box::new(resp),
                reason,
                remember: true,
            }
        }
        Err(reason) => return Discovery::Uncacheable(reason),
    };
    let validator: Arc<str> = meta.validator.as_str().into();
    let count = chunk_count(size, cs);
    let (claim_first, claim_last) = if status == 200 {
        (0, count.saturating_sub(1))
    } else {
        let end = resp
            .header_str("content-range")
            .and_then(fetch::parse_content_range)
            .and_then(|(r, _)| r)
            .map(|(_, b)| b)
            .unwrap_or(offset);
        (offset / cs, end / cs)
    };
    // Claim the fills before publishing the metadata: a request that finds the metadata must
    // also find these fills, or it would fetch the same chunks again.
    let flights = if count == 0 {
        Vec::new()
    } else {
        claim(cache, &obj.key, &validator, claim_first, claim_last)
    };
    cache.put_meta(&obj.key, meta.clone()).await;
    if flights.is_empty() {
        resp.finish().await;
    } else {
        tokio::spawn(distribute(
            cache.clone(),
            origin.clone(),
            resp,
            offset,
            meta.clone(),
            validator,
            obj.clone(),
            flights,
        ));
    }
    Discovery::Stored(meta)
}

/// An origin that answers 200 with no length (chunked): the body is streamed to the requesting
/// client through a fill of open length, and split into chunks as it passes. The metadata is
/// published once the length is known, at the end; until then the object stays locked, so
/// concurrent requests wait and are then served from the cache instead of fetching it again.
/// Needs an ETag (a Last-Modified validator includes the length). Past `max_object_size` the
/// client still gets the whole body, but nothing is kept.
fn stream_unknown_length(
    cache: &Arc<ChunkCache>,
    obj: &ObjectRequest,
    resp: OriginResponse,
    lock: ObjectLock,
) -> Discovery {
    let Some(etag) = resp.header_str("etag").map(str::to_string) else {
        return Discovery::Relay {
            resp: Box::new(resp),
            reason: "no-validator",
            remember: true,
        };
    };
    // Check storability before reading a byte (the length is a placeholder here).
    if let Err(reason) = meta_from(cache, &resp.header.headers, 200, 0) {
        return Discovery::Relay {
            resp: Box::new(resp),
            reason,
            remember: true,
        };
    }
    let flight = Arc::new(Flight::default());
    let headers = resp.header.headers.clone();
    tokio::spawn(split_unknown_length(
        cache.clone(),
        obj.clone(),
        resp,
        etag.as_str().into(),
        flight.clone(),
        lock,
    ));
    Discovery::Streaming {
        headers,
        body: flight,
    }
}

async fn split_unknown_length(
    cache: Arc<ChunkCache>,
    obj: ObjectRequest,
    mut resp: OriginResponse,
    validator: Arc<str>,
    body: Arc<Flight>,
    _lock: ObjectLock,
) {
    let guard = FlightGuard::new(body.clone());
    let cs = cache.chunk_size as usize;
    let mut acc = BytesMut::with_capacity(cs);
    let mut index = 0u64;
    let mut total = 0u64;
    let mut storing = true;
    let store = |acc: &mut BytesMut, index: &mut u64| {
        let id = ChunkId {
            key: obj.key.clone(),
            validator: validator.clone(),
            index: *index,
        };
        cache.store_chunk(&id, acc.split().freeze());
        *index += 1;
    };
    loop {
        match resp.next_piece().await {
            Ok(Some(piece)) => {
                total += piece.len() as u64;
                body.push(piece.clone());
                if storing && total > cache.max_object_size {
                    log::info!(
                        "rid={} {} passes max_object_size: not cached",
                        obj.request_id,
                        obj.key.as_str()
                    );
                    cache.mark_uncacheable(&obj.key, "too-large");
                    storing = false;
                }
                let mut piece = piece;
                while storing && !piece.is_empty() {
                    let take = (cs - acc.len()).min(piece.len());
                    acc.extend_from_slice(&piece[..take]);
                    piece.advance(take);
                    if acc.len() == cs {
                        store(&mut acc, &mut index);
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                body.finish(Err(FillError::Origin(e.to_string())));
                return;
            }
        }
    }
    if storing {
        if !acc.is_empty() {
            store(&mut acc, &mut index);
        }
        match meta_from(&cache, &resp.header.headers, 200, total) {
            Ok(meta) => cache.put_meta(&obj.key, Arc::new(meta)).await,
            Err(reason) => cache.mark_uncacheable(&obj.key, reason),
        }
    }
    resp.finish().await;
    body.finish(Ok(()));
    guard.disarm();
}

/// Ask the origin whether a stale object is still current (`If-None-Match` /
/// `If-Modified-Since`, one byte of body at most).
pub async fn revalidate(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
) -> Revalidation {
    let mut headers = Vec::new();
    if let Some(e) = &meta.etag {
        headers.push(("if-none-match", e.clone()));
    }
    if let Some(lm) = &meta.last_modified {
        headers.push(("if-modified-since", lm.clone()));
    }
    let req = obj.origin_request(Some((0, 0)), headers);
    let mut resp = match fetch::open(&origin.connector, &origin.pool, &req, &[]).await {
        Ok(r) => r,
        Err(e) => return Revalidation::Failed(e),
    };
    let status = resp.status();
    let merged = match status {
        304 => {
            let stored = stored_headers(meta);
            freshness::merge_304(&stored, &resp.header.headers)
        }
        200 | 206 => {
            let size = response_extent(&resp).and_then(|(_, t)| t);
            let same = size == Some(meta.size)
                && size.and_then(|s| response_validator(&resp, s)).as_deref()
                    == Some(meta.validator.as_str());
            if !same {
                cache.invalidate(&obj.key, meta).await;
                return Revalidation::Changed;
            }
            resp.header.headers.clone()
        }
        s if s >= 500 => {
            // A server error is no news about the object: keep it (stale-if-error may serve it).
            return Revalidation::Failed(FetchError {
                message: format!("origin answered {s} to a revalidation"),
                server: Some(resp.server),
                status: Some(s),
                timed_out: false,
                class: None,
            });
        }
        _ => {
            cache.invalidate(&obj.key, meta).await;
            return Revalidation::Uncacheable("status");
        }
    };
    // A 304 or a one-byte 206 is drained so the connection can be reused; a whole 200 from an
    // origin that ignores Range is not read (finish closes that connection).
    if status != 200 {
        while let Ok(Some(_)) = resp.next_piece().await {}
    }
    resp.finish().await;
    match meta_from(cache, &merged, 200, meta.size) {
        Ok(mut fresh) => {
            // Keep the version identity we hold chunks under.
            fresh.validator = meta.validator.clone();
            let fresh = Arc::new(fresh);
            cache.put_meta(&obj.key, fresh.clone()).await;
            Revalidation::Fresh(fresh)
        }
        Err(reason) => {
            cache.invalidate(&obj.key, meta).await;
            Revalidation::Uncacheable(reason)
        }
    }
}

fn stored_headers(meta: &ObjectMeta) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (n, v) in &meta.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(n.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// The source of chunk `index`: memory, a fill in progress, disk, or a new origin fill that
/// also takes the following missing chunks up to `last` (one request for the run).
pub async fn chunk_source(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
    validator: &Arc<str>,
    index: u64,
    last: u64,
) -> ChunkSource {
    let id = ChunkId {
        key: obj.key.clone(),
        validator: validator.clone(),
        index,
    };
    if let Some(b) = cache.memory_chunk(&id) {
        return ChunkSource::Ready(b);
    }
    let flight = match cache.join_fill(&id) {
        Joined::Ready(b) => return ChunkSource::Ready(b),
        Joined::Existing(f) => return ChunkSource::Filling(f),
        Joined::Started(f) => f,
    };
    if let Some(b) = cache.disk_chunk(&id, chunk_len(cache, meta, index)).await {
        flight.push(b.clone());
        flight.finish(Ok(()));
        cache.flights.remove(&id, &flight);
        return ChunkSource::Ready(b);
    }
    let mut run = vec![(index, flight.clone())];
    let last = last.min(index.saturating_add(MAX_RUN_CHUNKS - 1));
    for j in index.saturating_add(1)..=last {
        let idj = ChunkId {
            index: j,
            ..id.clone()
        };
        if cache.has_chunk(&idj) {
            break;
        }
        match cache.join_fill(&idj) {
            Joined::Started(f) => run.push((j, f)),
            Joined::Existing(_) | Joined::Ready(_) => break,
        }
    }
    tokio::spawn(fill_run(
        cache.clone(),
        origin.clone(),
        obj.clone(),
        meta.clone(),
        validator.clone(),
        run,
    ));
    ChunkSource::Filling(flight)
}

/// Fetch a run of consecutive chunks with one ranged request and stream it into their fills.
async fn fill_run(
    cache: Arc<ChunkCache>,
    origin: OriginAccess,
    obj: ObjectRequest,
    meta: Arc<ObjectMeta>,
    validator: Arc<str>,
    run: Vec<(u64, Arc<Flight>)>,
) {
    let guards: Vec<FlightGuard> = run
        .iter()
        .map(|(_, f)| FlightGuard::new(f.clone()))
        .collect();
    let (Some(first), Some(last)) = (run.first().map(|r| r.0), run.last().map(|r| r.0)) else {
        return;
    };
    let cs = cache.chunk_size;
    let start = first * cs;
    let end = chunk_bounds(last, cs, meta.size)
        .map(|b| b.end)
        .unwrap_or(start);
    let req = obj.origin_request(Some((start, end)), if_range(&meta));
    let fail = |cache: &ChunkCache, run: &[(u64, Arc<Flight>)], err: FillError| {
        for (index, f) in run {
            f.finish(Err(err.clone()));
            cache.flights.remove(
                &ChunkId {
                    key: obj.key.clone(),
                    validator: validator.clone(),
                    index: *index,
                },
                f,
            );
        }
    };
    let resp = match fetch::open(&origin.connector, &origin.pool, &req, &[]).await {
        Ok(r) => r,
        Err(e) => {
            log::warn!(
                "rid={} chunk fetch {}-{} failed: {e}",
                obj.request_id,
                first,
                last
            );
            return fail(&cache, &run, FillError::Origin(e.to_string()));
        }
    };
    let extent = response_extent(&resp);
    let same_version = extent.and_then(|(_, t)| t) == Some(meta.size)
        && response_validator(&resp, meta.size).as_deref() == Some(meta.validator.as_str());
    let offset = match extent {
        Some((offset, _)) if same_version && offset <= start => offset,
        Some(_) => {
            log::warn!(
                "rid={} object {} changed version during fill; dropping the old one",
                obj.request_id,
                obj.key.as_str()
            );
            cache.invalidate(&obj.key, &meta).await;
            return fail(&cache, &run, FillError::VersionChanged);
        }
        None => {
            let msg = format!("origin answered {} to a chunk fetch", resp.status());
            return fail(&cache, &run, FillError::Origin(msg));
        }
    };
    guards.into_iter().for_each(FlightGuard::disarm);
    distribute(cache, origin, resp, offset, meta, validator, obj, run).await;
}

/// Stream an origin body that starts at object offset `offset` into the fills of `flights`
/// (sorted by index; gaps are skipped). Each completed chunk is stored and its fill finished.
///
/// When the origin fails mid-body, the transfer resumes from the next missing byte with a
/// `Range` request (and `If-Range` on the validator) preferably to another server, within the
/// group's attempts: waiters see one continuous stream, with no gap and no repeated byte. An
/// answer of another version ends the fill with `VersionChanged`.
#[allow(clippy::too_many_arguments)]
async fn distribute(
    cache: Arc<ChunkCache>,
    origin: OriginAccess,
    mut resp: OriginResponse,
    offset: u64,
    meta: Arc<ObjectMeta>,
    validator: Arc<str>,
    obj: ObjectRequest,
    flights: Vec<(u64, Arc<Flight>)>,
) {
    let cs = cache.chunk_size;
    let guards: Vec<FlightGuard> = flights
        .iter()
        .map(|(_, f)| FlightGuard::new(f.clone()))
        .collect();
    let id = |index: u64| ChunkId {
        key: obj.key.clone(),
        validator: validator.clone(),
        index,
    };
    let bounds_of = |current: usize| {
        flights
            .get(current)
            .and_then(|(i, _)| chunk_bounds(*i, cs, meta.size))
    };
    let run_end = flights
        .last()
        .and_then(|(i, _)| chunk_bounds(*i, cs, meta.size))
        .map(|b| b.end)
        .unwrap_or(0);
    let mut current = 0usize;
    let Some(mut bounds) = bounds_of(0) else {
        resp.finish().await;
        return;
    };
    // `pos`: the next object byte the fills need; `body_pos`: the object offset of the next
    // byte the current response will deliver.
    let mut pos = bounds.start;
    let mut body_pos = offset;
    let mut acc = BytesMut::new();
    let mut resumes_left = origin.pool.settings.retry.attempts.saturating_sub(1);
    // Resumes share the group's deadline, counted from the start of this transfer: no resume
    // starts after it (a transfer that keeps streaming at min_rate or better is never cut).
    let until = tokio::time::Instant::now() + origin.pool.settings.deadline;
    let mut failed: Vec<std::net::SocketAddr> = Vec::new();
    let outcome: Result<(), FillError> = 'body: loop {
        let mut piece = match resp.next_piece().await {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => {
                let why = "origin transfer broke off mid-body";
                if resumes_left == 0 {
                    break Err(FillError::Origin(why.into()));
                }
                resumes_left -= 1;
                failed.push(resp.server);
                match resume(&origin, &obj, &meta, pos, run_end, &failed, until).await {
                    Ok(next) => {
                        origin
                            .pool
                            .stats
                            .resumes
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::warn!(
                            "rid={} {why} at byte {pos} of {}; resumed on {}",
                            obj.request_id,
                            obj.key.as_str(),
                            next.server
                        );
                        resp = next;
                        body_pos = pos;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        while !piece.is_empty() {
            if body_pos < pos {
                let skip = (pos - body_pos).min(piece.len() as u64) as usize;
                piece.advance(skip);
                body_pos += skip as u64;
                continue;
            }
            if body_pos > pos {
                break 'body Err(FillError::Origin("origin response skipped bytes".into()));
            }
            let take = (bounds.end + 1 - pos).min(piece.len() as u64) as usize;
            let part = piece.split_to(take);
            acc.extend_from_slice(&part);
            pos += take as u64;
            body_pos += take as u64;
            let Some((index, flight)) = flights.get(current) else {
                break 'body Ok(());
            };
            flight.push(part);
            if pos == bounds.end + 1 {
                cache.store_chunk(&id(*index), acc.split().freeze());
                flight.finish(Ok(()));
                cache.flights.remove(&id(*index), flight);
                current += 1;
                match bounds_of(current) {
                    Some(b) => {
                        bounds = b;
                        pos = b.start;
                    }
                    None => break 'body Ok(()),
                }
            }
        }
    };
    match outcome {
        Ok(()) => resp.finish().await,
        Err(e) => {
            log::warn!(
                "rid={} fill of {} failed at byte {pos}: {e}",
                obj.request_id,
                obj.key.as_str()
            );
            if e == FillError::VersionChanged {
                cache.invalidate(&obj.key, &meta).await;
            }
            for (i, f) in flights.iter().skip(current) {
                f.finish(Err(e.clone()));
                cache.flights.remove(&id(*i), f);
            }
        }
    }
    drop(guards);
}

/// Continue a broken transfer at byte `from` (through `to`), preferring servers not in
/// `failed`, and only from the same object version.
async fn resume(
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &ObjectMeta,
    from: u64,
    to: u64,
    failed: &[std::net::SocketAddr],
    until: tokio::time::Instant,
) -> Result<OriginResponse, FillError> {
    let req = obj.origin_request(Some((from, to)), if_range(meta));
    let resp = fetch::open_until(&origin.connector, &origin.pool, &req, failed, until)
        .await
        .map_err(|e| FillError::Origin(e.to_string()))?;
    let extent = response_extent(&resp);
    let same_version = extent.and_then(|(_, t)| t) == Some(meta.size)
        && response_validator(&resp, meta.size).as_deref() == Some(meta.validator.as_str());
    match extent {
        Some((offset, _)) if same_version && offset <= from => Ok(resp),
        Some(_) => Err(FillError::VersionChanged),
        None => Err(FillError::Origin(format!(
            "origin answered {} to a resume",
            resp.status()
        ))),
    }
}
