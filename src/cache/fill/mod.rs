//! Filling the cache from origins, one stage per module in data-path order:
//!
//! 1. [`discover`]: the first fetch of an object learns its length, validator and freshness
//!    from a chunk-aligned request, publishes its metadata and streams the body into the fills
//!    it claimed (or relays / streams an answer that cannot be cached in chunks);
//! 2. [`revalidate`]: a stale object is checked with a conditional request;
//! 3. [`run`]: a chunk is taken from memory, a fill in progress, disk, or a new fill that also
//!    takes the following missing chunks (one origin request per run);
//! 4. [`distribute`]: an origin body is cut into the chunks of its run, each stored and handed
//!    to its waiters as it completes; a broken transfer resumes elsewhere.
//!
//! Which tier a fill asks (the shard's owner among the cluster's peers, the parent tier, the
//! origin) is [`tiered`]'s choice, behind the same trait.
//!
//! Origin access goes through the [`origin::Origin`] trait, so each stage is unit-tested
//! against an in-memory fake origin (`tests.rs`).
//!
//! Version rule: every fetch after discovery must come back with the same validator (ETag, else
//! Last-Modified + length); otherwise the old version is dropped and the fill fails with
//! `VersionChanged`, so a response never mixes bytes of two versions. An object without a
//! validator has nothing such a check could compare: it is fetched whole and served only from
//! that one fetch; a chunk of it that is gone drops the object, and it is fetched whole again.
//!
//! Length rule: every answer is held to the length it promises (a 206 its Content-Range, a 200
//! the object's length), counted on the bytes actually read: a body longer or shorter than
//! promised is a failed fetch, and what it brought is not kept (`distribute`).

mod discover;
mod distribute;
pub mod origin;
mod revalidate;
mod run;
#[cfg(test)]
mod tests;
pub mod tiered;

pub use discover::{discover, discover_from};
pub use origin::{Origin, OriginAccess, OriginGroup, OriginReply, Reply};
pub use revalidate::revalidate;
pub use run::{chunk_in_hand, chunk_source, whole_from_one_fetch};

use super::flight::{FillError, Flight};
use super::key::ObjectKey;
use super::meta::ObjectMeta;
use super::store::ChunkCache;
use crate::config::CachePolicy;
use crate::origin::fetch::{self, FetchError, OriginRequest};
use crate::range::plan::chunk_bounds;
use bytes::Bytes;
use std::sync::Arc;

/// Most chunks one origin request asks for.
pub const MAX_RUN_CHUNKS: u64 = 16;

/// The object a request is about, and what is needed to ask an origin for it.
#[derive(Clone)]
pub struct ObjectRequest {
    /// Where the response is stored: `base`, or a variant of it when its responses vary.
    pub key: ObjectKey,
    /// The URL's key (locks, invalidation and what the URL's responses vary on hang off it).
    pub base: ObjectKey,
    pub path_and_query: String,
    pub host: String,
    pub request_id: String,
    /// The client's end-to-end request fields, forwarded on every fetch for this request.
    pub forward: Arc<http::HeaderMap>,
    /// How what the fetches bring is judged fresh: the policy in force when the request
    /// started (a reload meanwhile does not change it).
    pub policy: Arc<CachePolicy>,
}

impl ObjectRequest {
    pub fn origin_request(
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
            forward: self.forward.clone(),
            hash_key: self.key.as_str().to_string(),
            asking_peer: None,
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
        body: tokio::sync::mpsc::Receiver<BodyStep>,
    },
    /// Not cacheable (reason): the request is passed through instead.
    Uncacheable(&'static str),
    /// Not cacheable (reason), but the origin's 206 to the discovery fetch holds the start of
    /// the answer: the client is answered from it, and the rest of its range from further
    /// range fetches, none of it kept (as nginx's slice module does). The origin sends no
    /// byte twice for the request.
    Slice {
        resp: Reply,
        reason: &'static str,
    },
    /// Not cacheable, but the origin's answer to the discovery fetch is a whole answer to the
    /// request (an error or other non-2xx status, or a whole 200): pass it on as it is, so the
    /// origin sees one request. `remember`: later requests may go straight to pass-through.
    Relay {
        resp: Reply,
        reason: &'static str,
        remember: bool,
    },
    Failed(FetchError),
}

/// One step of a streamed body. A stream that closes without `End` broke off.
pub enum BodyStep {
    Piece(Bytes),
    End,
    Failed(FillError),
}

pub enum Revalidation {
    /// Still the same version; freshness renewed (304, or same validator).
    Fresh(Arc<ObjectMeta>),
    /// A new version exists; the old one was dropped. The origin's answer when it is one that
    /// discovery can take as it is (a whole 200 from an origin ignoring Range, or an answer
    /// with a status of its own), so the object is not asked for twice.
    Changed(Option<Reply>),
    Uncacheable(&'static str),
    Failed(FetchError),
}

pub fn chunk_len(cache: &ChunkCache, meta: &ObjectMeta, index: u64) -> u64 {
    chunk_bounds(index, cache.chunk_size, meta.size)
        .map(|b| b.len())
        .unwrap_or(0)
}

/// The request headers that make an origin refuse to mix versions: `If-Range` with a strong
/// ETag, or with the Last-Modified date.
pub(super) fn if_range(meta: &ObjectMeta) -> Vec<(&'static str, String)> {
    match (&meta.etag, &meta.last_modified) {
        (Some(e), _) if !e.starts_with("W/") => vec![("if-range", e.clone())],
        (_, Some(lm)) => vec![("if-range", lm.clone())],
        _ => Vec::new(),
    }
}

/// Whether `resp` is a whole 200 whose length is unknown until its end (chunked).
pub(super) fn unknown_length(resp: &dyn OriginReply) -> bool {
    resp.status() == 200 && resp.header_str("content-length").is_none()
}

/// The total length and first byte offset an origin response carries: 206 from Content-Range,
/// 200 from Content-Length (offset 0).
fn response_extent(resp: &dyn OriginReply) -> Option<(u64, Option<u64>)> {
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

/// Where an answer to a ranged fetch of `meta`'s version starting at `from` begins: `Ok(offset)`
/// when it is that version (same length and validator) and starts at or before `from`;
/// `VersionChanged` otherwise; an `Origin` error naming `what` when its status carries no part
/// of the object.
pub(super) fn same_version_offset(
    resp: &dyn OriginReply,
    meta: &ObjectMeta,
    from: u64,
    what: &str,
) -> Result<u64, FillError> {
    let Some((offset, total)) = response_extent(resp) else {
        return Err(FillError::Origin(format!(
            "origin answered {} to a {what}",
            resp.status()
        )));
    };
    if resp.status() == 206 {
        // A partial answer whose length contradicts its Content-Range (e.g. a range compressed
        // on the fly) is no part of the object, whatever its validator says.
        if let Some(why) = discover::partial_contradiction(resp, Some((offset, u64::MAX))) {
            return Err(FillError::Origin(format!(
                "origin sent a broken 206 to a {what}: {why}"
            )));
        }
    }
    // The same representation: an answer in another Content-Encoding is another version.
    fn encoding(v: Option<&str>) -> Option<&str> {
        v.map(str::trim)
            .filter(|e| !e.eq_ignore_ascii_case("identity"))
    }
    if encoding(resp.header_str("content-encoding")) != encoding(meta.header("content-encoding")) {
        return Err(FillError::VersionChanged);
    }
    let same_version = match total {
        Some(t) => meta.same_version(&resp.header().headers, t),
        // A whole 200 without a length (a chunked body, as from nginx with gzip, which ignores
        // Range): the same version when its validator says so; its length is checked as the
        // bytes arrive (`distribute`: a body longer or shorter than the object fails the
        // fetch). Without a validator there is nothing to name the version by.
        None => {
            resp.status() == 200
                && meta.has_validator()
                && meta.same_version(&resp.header().headers, meta.size)
        }
    };
    if same_version && offset <= from {
        Ok(offset)
    } else {
        Err(FillError::VersionChanged)
    }
}
