//! Answering a request from an origin object that may not be kept: the discovery fetch's 206
//! holds the start of the answer; the rest of the client's range comes from one more range
//! fetch, checked to be the same version, nothing of it stored (as nginx's slice module does
//! for uncacheable slices). The origin sends each byte of the answer once, and no byte the
//! answer does not need past the first fetch's own span.

use super::cache_status::CacheStatus;
use super::cached::{unless_client_left, write_body};
use super::ctx::RequestCtx;
use super::headers::{hop_by_hop_names, via, X_REQUEST_ID};
use crate::cache::fill::{ObjectRequest, OriginAccess, OriginReply, Reply};
use crate::origin::fetch::parse_content_range;
use crate::range::parse::{if_range_holds, resolve, RangeDecision, RangeRequest};
use bytes::Bytes;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::Session;

/// Which version an answer is: its ETag, Last-Modified and total length.
#[derive(PartialEq, Eq)]
struct Identity {
    etag: Option<String>,
    last_modified: Option<String>,
    total: u64,
}

fn identity(resp: &dyn OriginReply) -> Option<(Identity, (u64, u64))> {
    let (range, total) = parse_content_range(resp.header_str("content-range")?)?;
    let text = |n: &str| resp.header_str(n).map(str::to_string);
    Some((
        Identity {
            etag: text("etag"),
            last_modified: text("last-modified"),
            total: total?,
        },
        range?,
    ))
}

fn failed(what: String) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(502), what)
}

/// Answer the client from `first` (a 206 to the discovery fetch, starting at a chunk boundary)
/// and, when its range reaches further, one more range fetch.
#[allow(clippy::too_many_arguments)]
pub async fn relay_slices(
    session: &mut Session,
    ctx: &mut RequestCtx,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    mut first: Reply,
    range_req: &RangeRequest,
    max_ranges: usize,
    reason: &'static str,
) -> Result<()> {
    let Some((id, (start, end))) = identity(&*first) else {
        first.finish().await;
        return Err(failed("origin 206 without a usable Content-Range".into()));
    };
    let cache_status = CacheStatus::Bypass(reason);
    ctx.cache_status = Some(cache_status);
    let if_range_ok = match session.req_header().headers.get("if-range") {
        None => true,
        Some(v) => {
            let lm = id
                .last_modified
                .as_deref()
                .and_then(|v| httpdate::parse_http_date(v).ok());
            if_range_holds(v.as_bytes(), id.etag.as_deref(), lm)
        }
    };
    let decision = if if_range_ok {
        resolve(range_req, id.total, max_ranges)
    } else {
        RangeDecision::Whole
    };
    let (status, want) = match decision {
        RangeDecision::Partial(r) if r.len() == 1 => (206, (r[0].start, r[0].end)),
        RangeDecision::Unsatisfiable => {
            first.finish().await;
            let body = Bytes::from_static(b"416 range not satisfiable\n");
            let mut h = pingora_http::ResponseHeader::build(416, Some(6))?;
            h.insert_header("content-range", format!("bytes */{}", id.total))?;
            h.insert_header("content-type", "text/plain; charset=utf-8")?;
            h.insert_header("content-length", body.len().to_string())?;
            h.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
            cache_status.set_on(&mut h, &ctx.runtime.config.cluster.cdn_id)?;
            session.write_response_header(Box::new(h), false).await?;
            return session.write_response_body(Some(body), true).await;
        }
        // The whole object; several ranges of an object that is not kept are answered whole
        // too (RFC 9110 §14.2 lets a server ignore Range).
        _ => (200, (0, id.total.saturating_sub(1))),
    };
    let mut h = first.header().clone();
    for name in hop_by_hop_names(&h.headers, false) {
        h.remove_header(&name);
    }
    h.set_status(status)?;
    h.remove_header("content-range");
    h.remove_header("transfer-encoding");
    let len = if id.total == 0 {
        0
    } else {
        want.1 - want.0 + 1
    };
    h.insert_header("content-length", len.to_string())?;
    if status == 206 {
        h.insert_header(
            "content-range",
            format!("bytes {}-{}/{}", want.0, want.1, id.total),
        )?;
    }
    let via = via(h.headers.get("via").map(|v| v.as_bytes()));
    h.insert_header("via", via)?;
    h.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
    cache_status.set_on(&mut h, &ctx.runtime.config.cluster.cdn_id)?;
    let is_head = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), is_head || len == 0)
        .await?;
    if is_head || len == 0 {
        first.finish().await;
        return Ok(());
    }
    // The part of the first answer the client needs, if any.
    let mut next = want.0;
    if want.0 >= start && want.0 <= end {
        let mut at = start;
        let stop = want.1.min(end);
        while at <= stop {
            let piece = match unless_client_left(session, first.next_piece()).await? {
                Ok(Some(p)) => p,
                Ok(None) => return Err(failed("origin 206 ended early".into())),
                Err(e) => return Err(failed(format!("origin body failed mid-response: {e}"))),
            };
            let (p_start, p_end) = (at, at + piece.len() as u64);
            at = p_end;
            let from = want.0.max(p_start);
            let to = (stop + 1).min(p_end);
            if from < to {
                write_body(
                    session,
                    piece.slice((from - p_start) as usize..(to - p_start) as usize),
                )
                .await?;
            }
        }
        next = stop + 1;
        if stop == end {
            first.finish().await;
        }
        // Otherwise the rest of the first answer is not needed: dropping it closes that
        // connection rather than reading bytes nobody uses.
    }
    if next <= want.1 {
        // The rest, in one fetch, which must be the same version.
        let mut headers = Vec::new();
        match (&id.etag, &id.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => headers.push(("if-range", e.clone())),
            (_, Some(lm)) => headers.push(("if-range", lm.clone())),
            _ => {}
        }
        let req = obj.origin_request(Some((next, want.1)), headers);
        let mut rest = origin
            .open(&req, &[], None)
            .await
            .map_err(|e| failed(format!("origin fetch for the rest failed: {e}")))?;
        match identity(&*rest) {
            Some((same, (a, _))) if rest.status() == 206 && same == id && a == next => {}
            _ => {
                return Err(failed(format!(
                    "origin answered {} for the rest of a changed or broken object",
                    rest.status()
                )))
            }
        }
        let mut at = next;
        while at <= want.1 {
            match unless_client_left(session, rest.next_piece()).await? {
                Ok(Some(p)) => {
                    let take = (want.1 + 1 - at).min(p.len() as u64) as usize;
                    at += take as u64;
                    write_body(session, p.slice(..take)).await?;
                }
                Ok(None) => return Err(failed("origin 206 ended early".into())),
                Err(e) => return Err(failed(format!("origin body failed mid-response: {e}"))),
            }
        }
        rest.finish().await;
    }
    session.write_response_body(None, true).await
}
