//! Stage 4: an origin body cut into the chunks of its run; a broken transfer resumed.

use super::run::Run;
use super::{
    fetch, if_range, same_version_offset, unknown_length, ObjectRequest, OriginAccess, OriginReply,
    Reply,
};
use crate::cache::flight::FillError;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::FillSlot;
use crate::range::plan::chunk_bounds;
use bytes::{Buf, BytesMut};
use std::sync::Arc;

/// Stream an origin body that starts at object offset `offset` into the fills of `run`
/// (sorted by index; gaps are skipped). Each completed chunk is stored, handed to its waiters
/// and let go of, so the transfer holds at most one chunk's pieces plus the chunk being
/// assembled; `slot` (a fill slot) is held until the transfer ends.
///
/// The origin is read as fast as it sends: waiters that fall behind read the finished chunk
/// later (a reference to the stored allocation), never a second copy.
///
/// When the origin fails mid-body, the transfer resumes from the next missing byte with a
/// `Range` request (and `If-Range` on the validator) preferably to another server, within the
/// group's attempts: waiters see one continuous stream, with no gap and no repeated byte. An
/// answer of another version ends the fill with `VersionChanged`.
///
/// Every answer is held to the length it promises (a 206 its `Content-Range`, a 200 the
/// object's length): a byte past it fails the fill and drops the object, and the run's last
/// chunk is completed only once the body is seen to end there, so a body longer than its range
/// is never stored and its readers end in an error, never a clean end. An answer that states
/// no length (a chunked or close-delimited 206) is read whole and checked before any byte of
/// it is used (see [`vet`]).
pub(super) async fn distribute(
    origin: OriginAccess,
    mut resp: Reply,
    offset: u64,
    meta: Arc<ObjectMeta>,
    obj: ObjectRequest,
    mut run: Run,
    _slot: Option<FillSlot>,
) {
    let cs = run.cache.chunk_size;
    let bounds_of = |run: &Run| {
        run.front()
            .and_then(|(i, _)| chunk_bounds(*i, cs, meta.size))
    };
    let run_end = run
        .flights
        .back()
        .and_then(|(i, _)| chunk_bounds(*i, cs, meta.size))
        .map(|b| b.end)
        .unwrap_or(0);
    let Some(mut bounds) = bounds_of(&run) else {
        resp.finish().await;
        return;
    };
    // `pos`: the next object byte the fills need; `body_pos`: the object offset of the next
    // byte the current response will deliver.
    let mut pos = bounds.start;
    let mut body_pos = offset;
    let mut acc = BytesMut::with_capacity(bounds.len() as usize);
    let mut resumes_left = origin.resumes();
    // Resumes share the group's deadline, counted from the start of this transfer: no resume
    // starts after it (a transfer that keeps streaming at min_rate or better is never cut).
    let until = tokio::time::Instant::now() + origin.deadline();
    let mut failed: Vec<std::net::SocketAddr> = Vec::new();
    // A whole 200 without a length: its length is checked as its bytes arrive.
    let mut open_ended = unknown_length(&*resp);
    // One past the last object byte the current answer promises.
    let mut reply_end = promised_end(&*resp, &meta);
    // The answer in hand has not been vetted yet (see `vet`); `reply_start`: `pos` when it
    // was asked for.
    let mut fresh_reply = true;
    let mut reply_start = pos;
    let outcome: Result<(), FillError> = 'body: loop {
        if std::mem::take(&mut fresh_reply) {
            match vet(
                &origin, &obj, &meta, resp, body_pos, pos, run_end, cs, until,
            )
            .await
            {
                Ok(Vetted::Use(r, start)) => {
                    resp = r;
                    body_pos = start;
                    reply_end = promised_end(&*resp, &meta);
                }
                Ok(Vetted::Broken(r, why)) => {
                    // Short, or broken off while it was being read whole: as a broken transfer
                    // (its next read is its end).
                    resp = r;
                    reply_end = u64::MAX;
                    log::warn!("rid={} {why}", obj.request_id);
                }
                Err(e) => return fail(&obj, &meta, &mut run, pos, e).await,
            }
        }
        let mut piece = match resp.next_piece().await {
            Ok(Some(p)) => p,
            Ok(None) if body_pos == reply_end && pos > reply_start => {
                // The answer held all it promised, short of the run (a shorter range than
                // asked, or a span asked for in parts): the rest is asked for, no resume spent.
                match resume(&origin, &obj, &meta, pos, run_end, &[], until).await {
                    Ok((next, next_offset)) => {
                        resp = next;
                        body_pos = next_offset;
                        reply_start = pos;
                        fresh_reply = true;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            Ok(None) if open_ended => {
                // A chunked body that ended (properly) before the object's end: another
                // length, so another version whatever its validator says.
                break Err(FillError::VersionChanged);
            }
            Ok(None) | Err(_) => {
                let why = "origin transfer broke off mid-body";
                if resumes_left == 0 {
                    break Err(FillError::Origin(why.into()));
                }
                resumes_left -= 1;
                failed.push(resp.server());
                match resume(&origin, &obj, &meta, pos, run_end, &failed, until).await {
                    Ok((next, next_offset)) => {
                        origin.count_resume();
                        log::warn!(
                            "rid={} {why} at byte {pos} of {}; resumed on {}",
                            obj.request_id,
                            obj.key.as_str(),
                            next.server()
                        );
                        resp = next;
                        open_ended = unknown_length(&*resp);
                        // Where the new answer starts (a server that ignores Range sends the
                        // object from byte 0): the bytes before `pos` are skipped below.
                        body_pos = next_offset;
                        reply_start = pos;
                        fresh_reply = true;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        if body_pos.saturating_add(piece.len() as u64) > reply_end {
            // More than the answer promised: which of its bytes are the object's is unknown.
            break 'body Err(longer_than_promised());
        }
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
            let Some((_, flight)) = run.front() else {
                break 'body Ok(());
            };
            if open_ended && pos == meta.size {
                // The object's last bytes reach no reader, and its last chunk is not stored,
                // until the body is seen to end exactly here.
                if let Err(e) = read_to_end(&mut resp, pos + piece.len() as u64, meta.size).await {
                    break 'body Err(e);
                }
                piece.clear();
            }
            flight.push(part);
            if pos == bounds.end + 1 {
                if run.flights.len() == 1 && body_pos == reply_end && !open_ended {
                    // The run's last chunk ends where the answer does: the body must end here
                    // too before the chunk is kept (one more read; none for a framed body).
                    if !piece.is_empty() || !ends_here(&mut resp).await {
                        break 'body Err(longer_than_promised());
                    }
                }
                run.complete_front(acc.split().freeze(), resp.keep());
                match bounds_of(&run) {
                    Some(b) => {
                        bounds = b;
                        pos = b.start;
                        acc.reserve(b.len() as usize);
                    }
                    None => {
                        body_pos += piece.len() as u64;
                        break 'body Ok(());
                    }
                }
            }
        }
    };
    // A length-less body whose run ended before the object's end (its last chunk was cached
    // already): read on to its end, so a body of another length does not go unnoticed.
    let outcome = match outcome {
        Ok(()) if open_ended && body_pos < meta.size => {
            read_to_end(&mut resp, body_pos, meta.size).await
        }
        other => other,
    };
    match outcome {
        Ok(()) => resp.finish().await,
        Err(e) => fail(&obj, &meta, &mut run, pos, e).await,
    }
}

/// The transfer failed at byte `pos`: every fill it still holds fails with `e`.
async fn fail(obj: &ObjectRequest, meta: &ObjectMeta, run: &mut Run, pos: u64, e: FillError) {
    log::warn!(
        "rid={} fill of {} failed at byte {pos}: {e}",
        obj.request_id,
        obj.key.as_str()
    );
    if e == longer_than_promised() {
        // What this transfer stored may not be the object's: none of it is kept.
        run.cache.discard(&obj.key, meta).await;
    } else if e == FillError::VersionChanged {
        run.cache.invalidate(&obj.key, meta).await;
    }
    run.fail_all(e);
}

/// Continue a broken transfer at byte `from` (through `to`), preferring servers not in
/// `failed`, and only from the same object version. Returns the answer and the object offset of
/// its first byte (at or before `from`).
async fn resume(
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &ObjectMeta,
    from: u64,
    to: u64,
    failed: &[std::net::SocketAddr],
    until: tokio::time::Instant,
) -> Result<(Reply, u64), FillError> {
    let req = obj.origin_request(Some((from, to)), if_range(meta));
    let resp = origin
        .open(&req, failed, Some(until))
        .await
        .map_err(|e| FillError::Origin(e.to_string()))?;
    let offset = same_version_offset(&*resp, meta, from, "resume")?;
    Ok((resp, offset))
}

/// Read a length-less body on from object offset `at` to its end, which must be `size`: a body
/// longer or shorter is another version (`VersionChanged`); a break leaves it unconfirmed (an
/// `Origin` error).
async fn read_to_end(resp: &mut Reply, mut at: u64, size: u64) -> Result<(), FillError> {
    loop {
        if at > size {
            return Err(FillError::VersionChanged);
        }
        match resp.next_piece().await {
            Ok(Some(p)) => at += p.len() as u64,
            Ok(None) if at == size => return Ok(()),
            Ok(None) => return Err(FillError::VersionChanged),
            Err(e) => {
                return Err(FillError::Origin(format!(
                    "origin body broke before its end could be checked: {e}"
                )))
            }
        }
    }
}

/// A body longer than its answer promised (`Content-Range`, or the object's length).
fn longer_than_promised() -> FillError {
    FillError::Origin("origin body longer than its range".into())
}

/// One past the last object byte an answer promises: a 206's `Content-Range` end, else (a 200)
/// the object's length.
fn promised_end(resp: &dyn OriginReply, meta: &ObjectMeta) -> u64 {
    if resp.status() == 206 {
        if let Some((Some((_, b)), _)) = resp
            .header_str("content-range")
            .and_then(fetch::parse_content_range)
        {
            return b.saturating_add(1).min(meta.size);
        }
    }
    meta.size
}

/// Whether the body of `resp` ends now: its next read is the end (or an error, which is a
/// broken connection after the last promised byte, not a byte too many).
async fn ends_here(resp: &mut Reply) -> bool {
    loop {
        match resp.next_piece().await {
            Ok(Some(p)) if p.is_empty() => continue,
            Ok(Some(_)) => return false,
            Ok(None) | Err(_) => return true,
        }
    }
}

/// Most chunks of an answer that states no length which a fill holds while checking it.
const UNFRAMED_HELD_CHUNKS: u64 = 2;

enum Vetted {
    /// Use this answer; its first byte is at this object offset.
    Use(Reply, u64),
    /// The answer broke off or came short while it was read whole: treat it as a broken
    /// transfer (nothing of it is used).
    Broken(Reply, String),
}

/// Make an answer fit to stream into the run. A framed answer (with `Content-Length`: its
/// length is enforced as it is read) is used as it is. A 206 without one (chunked or
/// close-delimited) can only be checked against its `Content-Range` at its end, and its bytes
/// must not reach a waiter before then: it is read whole, at most two chunks of it, and used
/// only when it holds exactly its range. One that promises more is closed unread and the same
/// bytes are asked for two chunks at a time (a fill's memory stays two chunks).
#[allow(clippy::too_many_arguments)]
async fn vet(
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &ObjectMeta,
    mut resp: Reply,
    mut start: u64,
    pos: u64,
    run_end: u64,
    cs: u64,
    until: tokio::time::Instant,
) -> Result<Vetted, FillError> {
    let mut asked_again = false;
    loop {
        if resp.status() != 206 || resp.header_str("content-length").is_some() {
            return Ok(Vetted::Use(resp, start));
        }
        let end = promised_end(&*resp, meta);
        if end.saturating_sub(start) > UNFRAMED_HELD_CHUNKS * cs {
            resp.finish().await;
            if std::mem::replace(&mut asked_again, true) {
                return Err(FillError::Origin(
                    "origin 206 without Content-Length for more than was asked".into(),
                ));
            }
            let to = run_end.min((pos / cs + UNFRAMED_HELD_CHUNKS) * cs - 1);
            let (next, offset) = resume(origin, obj, meta, pos, to, &[], until).await?;
            resp = next;
            start = offset;
            continue;
        }
        let mut body = BytesMut::with_capacity(end.saturating_sub(start) as usize);
        let complete = loop {
            match resp.next_piece().await {
                Ok(Some(p)) => {
                    if (body.len() + p.len()) as u64 > end - start {
                        resp.finish().await;
                        return Err(longer_than_promised());
                    }
                    body.extend_from_slice(&p);
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        if !complete || body.len() as u64 != end - start {
            let why = format!(
                "origin 206 without Content-Length ended at {} of {} bytes",
                body.len(),
                end - start
            );
            return Ok(Vetted::Broken(resp, why));
        }
        let header = resp.header().clone();
        let server = resp.server();
        resp.finish().await;
        return Ok(Vetted::Use(
            Box::new(Held {
                header,
                server,
                body: Some(body.freeze()),
            }),
            start,
        ));
    }
}

/// An answer read whole and checked (see [`vet`]), handed out as it was received.
struct Held {
    header: pingora_http::ResponseHeader,
    server: std::net::SocketAddr,
    body: Option<bytes::Bytes>,
}

#[async_trait::async_trait]
impl OriginReply for Held {
    fn header(&self) -> &pingora_http::ResponseHeader {
        &self.header
    }

    fn server(&self) -> std::net::SocketAddr {
        self.server
    }

    async fn next_piece(
        &mut self,
    ) -> Result<Option<bytes::Bytes>, crate::origin::fetch::FetchError> {
        Ok(self.body.take().filter(|b| !b.is_empty()))
    }

    async fn finish(self: Box<Self>) {}
}
