//! Stage 1: the first fetch of an object.

use super::distribute::distribute;
use super::run::claim;
use super::{
    fetch, response_extent, BodyStep, Discovery, ObjectRequest, OriginAccess, Reply, MAX_RUN_CHUNKS,
};
use crate::cache::flight::FillError;
use crate::cache::freshness::{self, Heuristic, Storability, StorePolicyInput};
use crate::cache::key::ObjectVersion;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::{ChunkCache, ObjectLock};
use crate::cache::vary::{self, Vary};
use crate::range::plan::chunk_count;
use bytes::{Buf, BytesMut};
use std::sync::Arc;
use std::time::SystemTime;

/// Build metadata from an origin response, or say why it must not be stored.
pub(super) fn meta_from(
    cache: &ChunkCache,
    resp_headers: &http::HeaderMap,
    status: u16,
    size: u64,
) -> Result<ObjectMeta, &'static str> {
    // Chunk objects are whole or partial 200s, and variants are not keyed yet: store_policy
    // allows more (other statuses, any Vary but '*'), this caller does not.
    if status != 200 && status != 206 {
        return Err("status");
    }
    let vary_refused = match vary::parse_vary(resp_headers) {
        Vary::None => false,
        Vary::Fields(names) => names.iter().any(|n| n != "accept-encoding"),
        Vary::Star => true,
    };
    let now = SystemTime::now();
    let policy = freshness::store_policy(&StorePolicyInput {
        status,
        headers: resp_headers,
        // The cache's own origin requests never carry a client's credentials.
        request_has_authorization: false,
        default_ttl: cache.default_ttl,
        default_stale_if_error: cache.stale_if_error,
        heuristic: Heuristic::OFF,
        now,
    });
    let (fresh_for, stale_if_error, must_revalidate) = match policy {
        Storability::Store {
            fresh_for,
            stale_if_error,
            must_revalidate,
            ..
        } => (fresh_for, stale_if_error, must_revalidate),
        // Same reason as before store_policy allowed Vary: the ones it checks first win.
        Storability::NoStore(reason @ ("no-store" | "private" | "set-cookie" | "vary")) => {
            return Err(reason)
        }
        _ if vary_refused => return Err("vary"),
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
    // A slot bounds the memory of cache fills (see `ChunkCache::fill_slot`); it travels with
    // the transfer and is released when the transfer ends.
    let slot = cache.fill_slot().await;
    let open = |range: Option<(u64, u64)>| async move {
        origin
            .open(&obj.origin_request(range, Vec::new()), &[], None)
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
    let Some((offset, total)) = response_extent(&*resp) else {
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
    if status == 200 && size > cache.max_object_size {
        return Discovery::Relay {
            resp,
            reason: "too-large",
            remember: true,
        };
    }
    if offset % cs != 0 {
        return Discovery::Uncacheable("unaligned-range");
    }
    let meta = match meta_from(cache, &resp.header().headers, status, size) {
        Ok(m) => Arc::new(m),
        // A whole 200 answers any request: pass it on rather than asking again.
        Err(reason) if status == 200 => {
            return Discovery::Relay {
                resp,
                reason,
                remember: true,
            }
        }
        Err(reason) => return Discovery::Uncacheable(reason),
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

/// Pieces a streamed body of unknown length may have waiting for its client: the origin read
/// waits while the client is this far behind (nothing but the client takes those bytes).
const STREAM_QUEUE_PIECES: usize = 8;

/// An origin that answers 200 with no length (chunked): the body is streamed to the requesting
/// client through a bounded queue, and split into chunks as it passes. The metadata is
/// published once the length is known, at the end; until then the object stays locked, so
/// concurrent requests wait and are then served from the cache instead of fetching it again.
/// Needs an ETag (a Last-Modified validator includes the length). Past `max_object_size` the
/// client still gets the whole body, but nothing is kept. Memory: the queue plus the chunk
/// being assembled, whatever the body's length.
fn stream_unknown_length(
    cache: &Arc<ChunkCache>,
    obj: &ObjectRequest,
    resp: Reply,
    lock: ObjectLock,
) -> Discovery {
    let Some(etag) = resp.header_str("etag").map(str::to_string) else {
        return Discovery::Relay {
            resp,
            reason: "no-validator",
            remember: true,
        };
    };
    // Check storability before reading a byte (the length is a placeholder here).
    if let Err(reason) = meta_from(cache, &resp.header().headers, 200, 0) {
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
        ObjectVersion::new(obj.key.clone(), etag.as_str().into()),
        tx,
        lock,
    ));
    Discovery::Streaming { headers, body: rx }
}

async fn split_unknown_length(
    cache: Arc<ChunkCache>,
    obj: ObjectRequest,
    mut resp: Reply,
    version: ObjectVersion,
    body: tokio::sync::mpsc::Sender<BodyStep>,
    _lock: ObjectLock,
) {
    let cs = cache.chunk_size as usize;
    let mut acc = BytesMut::with_capacity(cs);
    let mut index = 0u64;
    let mut total = 0u64;
    let mut storing = true;
    // The client is still reading: once it has gone and nothing is being stored, stop.
    let mut client = true;
    let store = |acc: &mut BytesMut, index: &mut u64| {
        cache.store_chunk(&version, *index, acc.split().freeze());
        acc.reserve(cs);
        *index += 1;
    };
    loop {
        match resp.next_piece().await {
            Ok(Some(piece)) => {
                total += piece.len() as u64;
                if storing && total > cache.max_object_size {
                    log::info!(
                        "rid={} {} passes max_object_size: not cached",
                        obj.request_id,
                        obj.key.as_str()
                    );
                    cache.mark_uncacheable(&obj.key, "too-large");
                    storing = false;
                    acc = BytesMut::new();
                }
                let mut rest = piece.clone();
                while storing && !rest.is_empty() {
                    let take = (cs - acc.len()).min(rest.len());
                    acc.extend_from_slice(&rest[..take]);
                    rest.advance(take);
                    if acc.len() == cs {
                        store(&mut acc, &mut index);
                    }
                }
                if client && body.send(BodyStep::Piece(piece)).await.is_err() {
                    client = false;
                }
                if !client && !storing {
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
    if storing {
        if !acc.is_empty() {
            store(&mut acc, &mut index);
        }
        match meta_from(&cache, &resp.header().headers, 200, total) {
            Ok(meta) => cache.put_meta(&obj.key, Arc::new(meta)).await,
            Err(reason) => cache.mark_uncacheable(&obj.key, reason),
        }
    }
    resp.finish().await;
    if client {
        // Ignored when the client has gone meanwhile.
        let _ = body.send(BodyStep::End).await;
    }
}
