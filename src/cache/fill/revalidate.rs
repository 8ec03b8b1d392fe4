//! Stage 2: is a stale object still current?

use super::discover::meta_from;
use super::{same_version_offset, ObjectRequest, OriginAccess, Revalidation};
use crate::cache::freshness;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::ChunkCache;
use crate::origin::fetch::FetchError;
use std::sync::Arc;

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
    let mut resp = match origin.open(&req, &[], None).await {
        Ok(r) => r,
        Err(e) => return Revalidation::Failed(e),
    };
    let status = resp.status();
    let merged = match status {
        304 => {
            let stored = stored_headers(meta);
            freshness::merge_304(&stored, &resp.header().headers)
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
