//! Stage 4: an origin body cut into the chunks of its run; a broken transfer resumed.

use super::run::Run;
use super::{if_range, same_version_offset, unknown_length, ObjectRequest, OriginAccess, Reply};
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
    let outcome: Result<(), FillError> = 'body: loop {
        let mut piece = match resp.next_piece().await {
            Ok(Some(p)) => p,
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
                run.complete_front(acc.split().freeze());
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
        Err(e) => {
            log::warn!(
                "rid={} fill of {} failed at byte {pos}: {e}",
                obj.request_id,
                obj.key.as_str()
            );
            if e == FillError::VersionChanged {
                run.cache.invalidate(&obj.key, &meta).await;
            }
            run.fail_all(e);
        }
    }
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
