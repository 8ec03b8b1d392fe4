//! Stage 1: the first fetch of an object.

use super::distribute::distribute;
use super::run::claim;
use super::{
    fetch, response_extent, BodyStep, Discovery, ObjectRequest, OriginAccess, OriginReply, Reply,
    MAX_RUN_CHUNKS,
};
use crate::cache::flight::FillError;
use crate::cache::freshness::{self, Heuristic, Storability, StorePolicyInput};
use crate::cache::key::ObjectVersion;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::{ChunkCache, FillSlot, ObjectLock};
use crate::cache::vary::{self, Vary};
use crate::config::CachePolicy;
use crate::origin::fetch::FetchError;
use crate::range::plan::chunk_count;
use bytes::{Buf, BytesMut};
use std::sync::Arc;
use std::time::SystemTime;

/// Build metadata from an origin response, or say why it must not be stored
/// ([`freshness::store_policy`]: statuses, directives, targeted fields, heuristics).
pub(super) fn meta_from(
    obj: &ObjectRequest,
    resp_headers: &http::HeaderMap,
    status: u16,
    size: u64,
) -> Result<ObjectMeta, &'static str> {
    let now = SystemTime::now();
    let policy: &CachePolicy = &obj.policy;
    let policy = freshness::store_policy(&StorePolicyInput {
        status,
        headers: resp_headers,
        // A fill carries a client's Authorization only for that client's own miss; what it
        // brings is stored only when the response allows it (RFC 9111 §3.5).
        request_has_authorization: obj.forward.contains_key(http::header::AUTHORIZATION),
        default_ttl: policy.default_ttl,
        default_stale_if_error: policy.stale_if_error,
        heuristic: Heuristic {
            fraction: policy.heuristic_fraction,
            max: policy.heuristic_max,
        },
        now,
    });
    let (fresh_for, stale_if_error, stale_while_revalidate, must_revalidate) = match policy {
        Storability::Store {
            fresh_for,
            stale_if_error,
            stale_while_revalidate,
            must_revalidate,
            ..
        } => (
            fresh_for,
            stale_if_error,
            stale_while_revalidate,
            must_revalidate,
        ),
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
    // Without a validator the version is named by this fetch alone (RFC 9111 lets such a
    // response be stored; later fetches of its chunks are checked by length and freshness).
    let validator = ObjectMeta::validator_of(etag.as_deref(), last_modified.as_deref(), size)
        .unwrap_or_else(|| ObjectMeta::unvalidated_identity(now));
    let nominated = crate::proxy::headers::hop_by_hop_names(resp_headers, false);
    let headers = resp_headers
        .iter()
        // Fields the response's Connection names are hop-by-hop too (RFC 9110 §7.6.1).
        .filter(|(n, _)| ObjectMeta::keep_header(n.as_str()) && !nominated.contains(*n))
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    // RFC 9111 §4.2.3: the age it already had is the larger of its Age and its apparent age.
    let initial_age = freshness::current_age(resp_headers, now).as_secs();
    Ok(ObjectMeta {
        status: if status == 206 { 200 } else { status },
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
        stale_while_revalidate,
        wire: Default::default(),
    })
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
    let last = last
        .min(first.saturating_add(MAX_RUN_CHUNKS - 1))
        .min(origin.run_limit(first, cs));
    let range = (
        first.saturating_mul(cs),
        last.saturating_add(1).saturating_mul(cs).saturating_sub(1),
    );
    // A slot bounds the memory of cache fills (see `ChunkCache::fill_slot`); it travels with
    // the transfer and is released when the transfer ends.
    let slot = cache.fill_slot().await;
    let asking_peer = lock.asking_peer();
    let open = |range: Option<(u64, u64)>| {
        let mut req = obj.origin_request(range, Vec::new());
        req.asking_peer = Some(asking_peer.clone());
        async move { origin.open(&req, &[], None).await }
    };
    let mut asked = Some(range);
    let mut resp = match open(asked).await {
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
        asked = retry;
        resp = match open(retry).await {
            Ok(r) => r,
            Err(e) => return Discovery::Failed(e),
        };
    }
    if let Some(whole) = needs_one_fetch(cache, obj, &*resp) {
        // No validator: chunks of two fetches could be two versions that nothing tells apart.
        // The object is fetched whole, and every chunk filled from that one answer.
        resp.finish().await;
        log::debug!(
            "rid={} {} has no validator: fetching its {whole} bytes whole",
            obj.request_id,
            obj.key.as_str()
        );
        asked = None;
        resp = match open(None).await {
            Ok(r) => r,
            Err(e) => return Discovery::Failed(e),
        };
    }
    discover_from(cache, origin, obj, lock, resp, asked, slot).await
}

/// The object's length when `resp` is a partial answer that would be kept but names no
/// version (no ETag, no Last-Modified) and holds less than the whole object: such an object
/// is filled from one whole fetch, never assembled from several ([`ObjectMeta::validator`]).
fn needs_one_fetch(cache: &ChunkCache, obj: &ObjectRequest, resp: &dyn OriginReply) -> Option<u64> {
    if resp.status() != 206
        || ObjectMeta::validator_of(resp.header_str("etag"), resp.header_str("last-modified"), 0)
            .is_some()
    {
        return None;
    }
    let (Some((a, b)), Some(total)) = resp
        .header_str("content-range")
        .and_then(fetch::parse_content_range)?
    else {
        return None;
    };
    let whole = a == 0 && b.saturating_add(1) == total;
    // Too large to keep: answered in slices, as any object that is not kept.
    let keep = total <= cache.max_object_size
        && meta_from(obj, &resp.header().headers, 206, total).is_ok();
    (!whole && keep).then_some(total)
}

/// Discovery from an origin answer already in hand (`asked`: the range it answers; `None` =
/// the whole object): from the discovery fetch, or a revalidation the origin answered with
/// the whole object.
#[allow(clippy::too_many_arguments)]
pub async fn discover_from(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    lock: ObjectLock,
    resp: Reply,
    asked: Option<(u64, u64)>,
    slot: Option<FillSlot>,
) -> Discovery {
    let cs = cache.chunk_size;
    let status = resp.status();
    if let Some(why) = (status == 206)
        .then(|| partial_contradiction(&*resp, asked))
        .flatten()
    {
        resp.finish().await;
        return Discovery::Failed(broken(status, why));
    }
    // A response that varies is stored as the variant the fill's own fields select (RFC 9111
    // §4.1); `Vary: *` is never stored (store_policy refuses it). When it varies on a field
    // fills never send (credentials, forwarding and override fields), that is the variant
    // for "absent": the cache layer serves it only to requests without the field, and passes
    // the others through (`proxy::cached`).
    let variant;
    let obj = match stored_vary(&resp.header().headers) {
        Vary::Fields(fields) => {
            variant = ObjectRequest {
                key: cache.learn_vary(&obj.base, fields, &obj.forward),
                ..obj.clone()
            };
            &variant
        }
        Vary::None | Vary::Star => obj,
    };
    let Some((offset, total)) = response_extent(&*resp) else {
        if status == 304 || status == 206 {
            // No conditional was sent, or no usable Content-Range came back: the answer is
            // not one to the request made, and must not reach the client as if it were.
            resp.finish().await;
            return Discovery::Failed(broken(status, "answer to a chunk fetch"));
        }
        if let Some(meta) = whole_small_response(cache, obj, &resp, status) {
            return keep_whole(cache, obj, resp, meta).await;
        }
        // The origin's own answer (an error, a redirect, ...): the client gets it as it is. A
        // server error is not remembered: the next request asks again.
        let remember = status < 500;
        return Discovery::Relay {
            resp,
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
    let validatorless =
        ObjectMeta::validator_of(resp.header_str("etag"), resp.header_str("last-modified"), 0)
            .is_none();
    if status == 206 && size > cache.max_object_size && validatorless {
        // No validator and too large to fetch whole: never assembled from several fetches,
        // neither kept nor sliced (a slice's second fetch could be another version): the
        // client's own request goes to the origin, one answer from one fetch.
        resp.finish().await;
        return Discovery::Uncacheable("too-large");
    }
    if status == 200 && size > cache.max_object_size {
        return Discovery::Relay {
            resp,
            reason: "too-large",
            remember: true,
        };
    }
    let meta = match meta_from(obj, &resp.header().headers, status, size) {
        Ok(m) => Arc::new(m),
        // A whole 200 answers any request: pass it on rather than asking again.
        Err(reason) if status == 200 => {
            return Discovery::Relay {
                resp,
                reason,
                remember: true,
            }
        }
        // Part of a validator-less object, not to be kept: slices of it from two fetches
        // could be two versions, so the client's own request goes to the origin.
        Err(reason) if validatorless => {
            resp.finish().await;
            return Discovery::Uncacheable(reason);
        }
        // Part of the object, not to be kept: it still answers (part of) the request.
        Err(reason) => return Discovery::Slice { resp, reason },
    };
    let version = ObjectVersion::new(obj.key.clone(), meta.validator.as_str().into());
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
    let run = (count > 0).then(|| claim(cache, &version, claim_first, claim_last));
    cache.put_meta(&obj.key, meta.clone()).await;
    match run {
        Some(run) if !run.flights.is_empty() => {
            cache.spawn(distribute(
                origin.clone(),
                resp,
                offset,
                meta.clone(),
                obj.clone(),
                run,
                slot,
            ));
        }
        _ => resp.finish().await,
    }
    Discovery::Stored(meta)
}

/// What a response varies on, as stored: its `Vary`, and `Accept-Encoding` too when it is in
/// a content coding. nginx with `gzip on` sends no `Vary` unless `gzip_vary` is set (off by
/// default): its gzip bytes, fetched for a client that accepts them, must not answer one that
/// does not.
fn stored_vary(headers: &http::HeaderMap) -> Vary {
    let encoded = headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
    const AE: &str = "accept-encoding";
    match vary::parse_vary(headers) {
        Vary::None if encoded => Vary::Fields(vec![AE.to_string()]),
        Vary::Fields(mut fields) if encoded && !fields.iter().any(|f| f == AE) => {
            fields.push(AE.to_string());
            fields.sort();
            Vary::Fields(fields)
        }
        other => other,
    }
}

/// An origin answer that is not the object's bytes: a 304 nobody asked for, a 206 without a
/// usable `Content-Range`, a body that contradicts its own length.
fn broken(status: u16, what: &str) -> FetchError {
    FetchError {
        message: format!("origin sent a broken {status} {what}"),
        server: None,
        status: None,
        timed_out: false,
        class: None,
        tls: None,
    }
}

/// Why a 206 is not an answer to the range `asked` (`None` = no Range was sent), if it is not:
/// it must start where asked, and its length must agree with its `Content-Range`.
pub(super) fn partial_contradiction(
    resp: &dyn OriginReply,
    asked: Option<(u64, u64)>,
) -> Option<&'static str> {
    let Some((start, _)) = asked else {
        return Some("partial answer to a request without Range");
    };
    let Some((Some((a, b)), _)) = resp
        .header_str("content-range")
        .and_then(fetch::parse_content_range)
    else {
        return Some("partial answer without a usable Content-Range");
    };
    if a != start {
        return Some("partial answer to another range");
    }
    let length = resp
        .header_str("content-length")
        .map(|v| v.trim().parse::<u64>());
    match length {
        Some(Ok(n)) if n != b - a + 1 => {
            Some("partial answer whose length contradicts its Content-Range")
        }
        Some(Err(_)) => Some("partial answer with an invalid Content-Length"),
        _ => None,
    }
}

/// A cacheable response with a status of its own (a redirect, a 404, ...) and a body of known
/// length that fits one chunk: kept whole and replayed as it is.
fn whole_small_response(
    cache: &ChunkCache,
    obj: &ObjectRequest,
    resp: &Reply,
    status: u16,
) -> Option<ObjectMeta> {
    let len = if status == 204 {
        0
    } else {
        resp.header_str("content-length")?.trim().parse().ok()?
    };
    if len > cache.chunk_size {
        return None;
    }
    meta_from(obj, &resp.header().headers, status, len).ok()
}

/// Read a small response whole, keep it in chunk 0 and publish it.
async fn keep_whole(
    cache: &Arc<ChunkCache>,
    obj: &ObjectRequest,
    mut resp: Reply,
    meta: ObjectMeta,
) -> Discovery {
    let mut body = BytesMut::with_capacity(meta.size as usize);
    loop {
        match resp.next_piece().await {
            Ok(Some(piece)) if (body.len() + piece.len()) as u64 <= meta.size => {
                body.extend_from_slice(&piece)
            }
            Ok(Some(_)) => return Discovery::Failed(broken(meta.status, "body past its length")),
            Ok(None) => break,
            Err(e) => return Discovery::Failed(e),
        }
    }
    if body.len() as u64 != meta.size {
        return Discovery::Failed(broken(meta.status, "body short of its length"));
    }
    let keep = resp.keep();
    resp.finish().await;
    let meta = Arc::new(meta);
    if meta.size > 0 {
        let version = ObjectVersion::new(obj.key.clone(), meta.validator.as_str().into());
        cache.keep_chunk(&version, 0, body.freeze(), keep);
    }
    cache.put_meta(&obj.key, meta.clone()).await;
    Discovery::Stored(meta)
}

/// Pieces a streamed body of unknown length may have waiting for its client: the origin read
/// waits while the client is this far behind (nothing but the client takes those bytes).
const STREAM_QUEUE_PIECES: usize = 8;

/// Longest a streamed fill keeps the object locked: requests that arrive meanwhile wait for it
/// (and are then served from the cache) at most this long, then ask the origin themselves
/// (nginx's `proxy_cache_lock_timeout`, 5 s). The lock is let go at once when the body will
/// not be stored.
pub(crate) const STREAM_LOCK_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// An origin that answers 200 with no length (chunked): the body is streamed to the requesting
/// client through a bounded queue, and split into chunks as it passes. The chunks are staged,
/// not admitted to the tiers, until the end shows the object storable; they are then stored
/// and the metadata published. The version is named by its ETag, else by this fetch alone (a
/// Last-Modified validator includes the length, unknown until the end).
///
/// Staging is bounded in bytes: an object is cached only up to `max_object_size` and the
/// staging budget ([`ChunkCache::stage_capacity`], a quarter of the memory tier, shared by
/// all streamed fills). Past either the client still gets the whole body, nothing is kept, and
/// the fill stops as soon as its client is gone too: a fill nobody reads, of an object that
/// will not be stored, pulls nothing more. An object longer than its bound is marked
/// uncacheable (later requests pass through); a budget spent by other fills is not marked.
fn stream_unknown_length(
    cache: &Arc<ChunkCache>,
    obj: &ObjectRequest,
    resp: Reply,
    lock: ObjectLock,
) -> Discovery {
    let identity = resp
        .header_str("etag")
        .map(str::to_string)
        .unwrap_or_else(|| ObjectMeta::unvalidated_identity(SystemTime::now()));
    // Check storability before reading a byte (the length is a placeholder here).
    if let Err(reason) = meta_from(obj, &resp.header().headers, 200, 0) {
        return Discovery::Relay {
            resp,
            reason,
            remember: true,
        };
    }
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE_PIECES);
    let headers = resp.header().headers.clone();
    cache.spawn(split_unknown_length(
        cache.clone(),
        obj.clone(),
        resp,
        ObjectVersion::new(obj.key.clone(), identity.as_str().into()),
        tx,
        lock,
    ));
    Discovery::Streaming { headers, body: rx }
}

/// The chunks of a streamed body, held until the object is known to be storable; their bytes
/// are charged to the cache's staging budget until dropped.
struct Staged {
    chunks: Vec<bytes::Bytes>,
    acc: BytesMut,
    charged: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Staged {
    fn new() -> Staged {
        Staged {
            chunks: Vec::new(),
            acc: BytesMut::new(),
            charged: None,
        }
    }
}

/// Wait for `next` (a read or a send of the streamed fill) and let go of the object lock when
/// its hold time is up meanwhile, without cancelling `next`.
async fn holding<T>(
    lock: &mut Option<ObjectLock>,
    until: tokio::time::Instant,
    next: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(next);
    loop {
        tokio::select! {
            biased;
            v = &mut next => return v,
            _ = tokio::time::sleep_until(until), if lock.is_some() => *lock = None,
        }
    }
}

async fn split_unknown_length(
    cache: Arc<ChunkCache>,
    obj: ObjectRequest,
    mut resp: Reply,
    version: ObjectVersion,
    body: tokio::sync::mpsc::Sender<BodyStep>,
    lock: ObjectLock,
) {
    let cs = cache.chunk_size as usize;
    let bound = cache.max_object_size.min(cache.stage_capacity());
    let mut lock = Some(lock);
    let lock_until = tokio::time::Instant::now() + STREAM_LOCK_HOLD;
    let mut staged = Some(Staged::new());
    let mut total = 0u64;
    // The client is still reading: once it has gone and nothing is being stored, stop.
    let mut client = true;
    loop {
        match holding(&mut lock, lock_until, resp.next_piece()).await {
            Ok(Some(piece)) => {
                total += piece.len() as u64;
                if let Some(stage) = staged.as_mut() {
                    let why = if total > bound {
                        // Too large to stage: later requests pass through.
                        cache.mark_uncacheable(&obj.key, "too-large");
                        Some("passes its staging bound (max_object_size, a quarter of the memory tier)")
                    } else if !cache.stage(&mut stage.charged, piece.len() as u64) {
                        Some("finds the staging budget spent by other streamed fills")
                    } else {
                        None
                    };
                    match why {
                        Some(why) => {
                            log::info!(
                                "rid={} {} {why}: not cached",
                                obj.request_id,
                                obj.key.as_str()
                            );
                            // Staged bytes and the lock go now: waiters need not wait for a
                            // body that will not be stored.
                            staged = None;
                            lock = None;
                        }
                        None => {
                            let mut rest = piece.clone();
                            while !rest.is_empty() {
                                if stage.acc.capacity() == 0 {
                                    stage.acc.reserve(cs);
                                }
                                let take = (cs - stage.acc.len()).min(rest.len());
                                stage.acc.extend_from_slice(&rest[..take]);
                                rest.advance(take);
                                if stage.acc.len() == cs {
                                    stage.chunks.push(stage.acc.split().freeze());
                                }
                            }
                        }
                    }
                }
                if client
                    && holding(&mut lock, lock_until, body.send(BodyStep::Piece(piece)))
                        .await
                        .is_err()
                {
                    client = false;
                }
                if !client && staged.is_none() {
                    // Nobody reads it and it will not be stored: stop pulling.
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                // Ignored when the client has gone: nobody is left to tell.
                let _ = body
                    .send(BodyStep::Failed(FillError::Origin(e.to_string())))
                    .await;
                return;
            }
        }
    }
    if let Some(mut stage) = staged {
        if !stage.acc.is_empty() {
            stage.chunks.push(stage.acc.split().freeze());
        }
        match meta_from(&obj, &resp.header().headers, 200, total) {
            Ok(mut meta) => {
                // Storable: the chunks are admitted to the tiers, then the metadata published.
                let keep = resp.keep();
                for (index, chunk) in stage.chunks.drain(..).enumerate() {
                    cache.keep_chunk(&version, index as u64, chunk, keep);
                }
                // The chunks were stored under the name chosen before the length was known.
                meta.validator = version.validator.to_string();
                cache.put_meta(&obj.key, Arc::new(meta)).await
            }
            Err(reason) => cache.mark_uncacheable(&obj.key, reason),
        }
    }
    drop(lock);
    resp.finish().await;
    if client {
        // Ignored when the client has gone meanwhile.
        let _ = body.send(BodyStep::End).await;
    }
}
