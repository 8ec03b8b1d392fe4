//! Stage 2: is a stale object still current?

use super::discover::meta_from;
use super::{same_version_offset, ObjectRequest, OriginAccess, Revalidation};
use crate::cache::freshness;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::ChunkCache;
use crate::origin::fetch::FetchError;
use std::sync::Arc;

/// Ask the origin whether a stale object is still current (`If-None-Match` /
/// `If-Modified-Since`, one byte of body at most). A 304 renews the object only when its
/// validators name the version held ([`ObjectMeta::identified_by_304`]); a 304 naming another
/// version, like a 200/206 of another version, drops the object (`Changed`): discovery asks
/// for it afresh. Every revalidation (foreground, stale-if-error, stale-while-revalidate in
/// the background, HEAD) comes through here.
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
    let mut resp = match origin.open(&req, &[], None).await {
        Ok(r) => r,
        Err(e) => return Revalidation::Failed(e),
    };
    let status = resp.status();
    let merged = match status {
        304 => {
            if !meta.identified_by_304(&resp.header().headers) {
                // RFC 9111 §4.3.4: a 304 naming another version selects no stored response
                // and updates none. The version held is no longer current: drop it, and
                // discovery fetches the object afresh, unconditionally.
                log::warn!(
                    "rid={} origin answered 304 naming another version of {}; fetching it again",
                    obj.request_id,
                    obj.key.as_str()
                );
                while let Ok(Some(_)) = resp.next_piece().await {}
                resp.finish().await;
                cache.invalidate(&obj.key, meta).await;
                return Revalidation::Changed(None);
            }
            // Its validators identified the version held; they update nothing (a weak form
            // of the same ETag must not replace the strong one If-Range is sent with).
            let mut update = resp.header().headers.clone();
            update.remove(http::header::ETAG);
            update.remove(http::header::LAST_MODIFIED);
            freshness::merge_304(&stored_headers(meta), &update)
        }
        200 | 206 => {
            // Wherever the answer starts, it must be the version held.
            if same_version_offset(&*resp, meta, u64::MAX, "revalidation").is_err() {
                cache.invalidate(&obj.key, meta).await;
                if status == 200 {
                    // The whole new version: discovery takes it from here.
                    return Revalidation::Changed(Some(resp));
                }
                // One byte of the new version: let go of it, discovery asks afresh.
                while let Ok(Some(_)) = resp.next_piece().await {}
                resp.finish().await;
                return Revalidation::Changed(None);
            }
            resp.header().headers.clone()
        }
        s if s >= 500 => {
            // A server error is no news about the object: keep it (stale-if-error may serve it).
            return Revalidation::Failed(FetchError {
                message: format!("origin answered {s} to a revalidation"),
                server: Some(resp.server()),
                status: Some(s),
                timed_out: false,
                class: None,
                tls: None,
            });
        }
        _ => {
            // An answer of its own (a 404, a redirect, ...): the object as it is now.
            cache.invalidate(&obj.key, meta).await;
            return Revalidation::Changed(Some(resp));
        }
    };
    // A 304 or a one-byte 206 is drained so the connection can be reused; a whole 200 from an
    // origin that ignores Range is not read (finish closes that connection).
    if status != 200 {
        while let Ok(Some(_)) = resp.next_piece().await {}
    }
    resp.finish().await;
    match meta_from(obj, &merged, 200, meta.size) {
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
