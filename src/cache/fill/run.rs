//! Stage 3: where each chunk comes from, and the runs of missing chunks fetched together.

use super::distribute::distribute;
use super::{
    chunk_len, if_range, same_version_offset, unknown_length, ChunkSource, ObjectRequest,
    OriginAccess, MAX_RUN_CHUNKS,
};
use crate::cache::flight::{FillError, Flight, Joined};
use crate::cache::key::ObjectVersion;
use crate::cache::meta::ObjectMeta;
use crate::cache::store::{ChunkCache, Keep};
use crate::range::plan::chunk_bounds;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

/// The fills one origin transfer owns, in index order (gaps allowed). Completing the first
/// one stores its chunk and lets go of it at once, so a transfer holds the pieces of one chunk
/// at a time. Dropping a `Run` (an error path, a cancelled task) finishes the fills it still
/// holds with `Abandoned`, so no waiter hangs on a fill nobody will complete.
pub(super) struct Run {
    pub(super) cache: Arc<ChunkCache>,
    pub(super) version: ObjectVersion,
    pub(super) flights: VecDeque<(u64, Arc<Flight>)>,
}

impl Run {
    /// A run of `flights` (in index order): each flight holds the next one, so a request
    /// reading any chunk of the run keeps the rest of it findable (see [`crate::cache::flight`]).
    pub(super) fn new(
        cache: &Arc<ChunkCache>,
        version: &ObjectVersion,
        flights: VecDeque<(u64, Arc<Flight>)>,
    ) -> Run {
        let mut run = Run {
            cache: cache.clone(),
            version: version.clone(),
            flights: VecDeque::new(),
        };
        for (index, flight) in flights {
            run.push(index, flight);
        }
        run
    }

    /// Add the next fill of the run.
    fn push(&mut self, index: u64, flight: Arc<Flight>) {
        if let Some((_, last)) = self.flights.back() {
            self.cache
                .flights
                .link(last, &flight, self.cache.chunk_size);
        }
        self.flights.push_back((index, flight));
    }

    pub(super) fn front(&self) -> Option<&(u64, Arc<Flight>)> {
        self.flights.front()
    }

    pub(super) fn first_and_last(&self) -> Option<(u64, u64)> {
        Some((self.flights.front()?.0, self.flights.back()?.0))
    }

    /// The first fill is complete: keep the chunk as `keep` says, hand it to the waiters, let
    /// go of it.
    pub(super) fn complete_front(&mut self, chunk: Bytes, keep: Keep) {
        if let Some((index, flight)) = self.flights.pop_front() {
            self.cache
                .keep_chunk(&self.version, index, chunk.clone(), keep);
            flight.complete(chunk);
            self.cache
                .flights
                .remove(&self.version.chunk(index), &flight);
        }
    }

    /// The first fill is complete with a chunk that is already stored (read from disk): hand it
    /// to the waiters, let go of it.
    fn complete_front_stored(&mut self, chunk: Bytes) {
        if let Some((index, flight)) = self.flights.pop_front() {
            flight.complete(chunk);
            self.cache
                .flights
                .remove(&self.version.chunk(index), &flight);
        }
    }

    /// Every fill still held fails with `err`.
    pub(super) fn fail_all(&mut self, err: FillError) {
        while let Some((index, flight)) = self.flights.pop_front() {
            flight.finish(Err(err.clone()));
            self.cache
                .flights
                .remove(&self.version.chunk(index), &flight);
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.fail_all(FillError::Abandoned);
    }
}

/// Register fills for the missing chunks among `first..=last`; returns the ones this caller
/// now owns (others are already cached or being filled by someone else).
pub(super) fn claim(
    cache: &Arc<ChunkCache>,
    version: &ObjectVersion,
    first: u64,
    last: u64,
) -> Run {
    let flights = (first..=last)
        .filter_map(|index| match cache.join_fill(&version.chunk(index)) {
            Joined::Started(f) => Some((index, f)),
            Joined::Existing(_) | Joined::Ready(_) => None,
        })
        .collect();
    Run::new(cache, version, flights)
}

/// The source of chunk `index`: memory, a fill in progress, disk, or a new origin fill that
/// also takes the following missing chunks up to `last` (one request for the run). A version
/// without a validator is never filled by a range: its missing chunk fails with
/// `VersionChanged` and the object is dropped (see [`whole_from_one_fetch`]).
pub async fn chunk_source(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
    version: &ObjectVersion,
    index: u64,
    last: u64,
) -> ChunkSource {
    let id = version.chunk(index);
    // The fill map first: a chunk filled a moment ago whose flight is still held (by a request
    // reading an earlier chunk of its run) is read from that flight, and holding it keeps the
    // rest of its run findable even if the memory tier lets go of it.
    let flight = match cache.join_fill(&id) {
        Joined::Ready(b) => return ChunkSource::Ready(b),
        Joined::Existing(f) => return ChunkSource::Filling(f),
        Joined::Started(f) => f,
    };
    // From here the fill is ours: held by `run`, so if this request goes away while the disk
    // is read (a client that disconnects), the fill ends `Abandoned` and leaves the map
    // rather than keeping every later request waiting on a fill nobody completes.
    let mut run = Run::new(cache, version, VecDeque::from([(index, flight.clone())]));
    // The run goes on from where another one ends (a run stops before a chunk in flight, and
    // readers catch up from behind): the chunk before keeps this one reachable too, so a
    // reader coming from behind finds the whole stretch.
    if let Some(before) = index
        .checked_sub(1)
        .and_then(|i| cache.flights.find(&version.chunk(i)))
    {
        cache.flights.link(&before, &flight, cache.chunk_size);
    }
    if let Some(b) = cache
        .disk_chunk(version, index, chunk_len(cache, meta, index))
        .await
    {
        run.complete_front_stored(b.clone());
        return ChunkSource::Ready(b);
    }
    if !meta.has_validator() {
        // A version without a validator is only ever what one fetch brought: a chunk of it
        // that is gone cannot be fetched again as a range (nothing would tell whether the
        // answer is the same version). The object is dropped; the next request fetches it
        // whole again.
        log::info!(
            "rid={} chunk {index} of {} (no validator) is gone: dropping the object",
            obj.request_id,
            obj.key.as_str()
        );
        cache.invalidate(&obj.key, meta).await;
        run.fail_all(FillError::VersionChanged);
        return ChunkSource::Filling(flight);
    }
    let last = last
        .min(index.saturating_add(MAX_RUN_CHUNKS - 1))
        .min(origin.run_limit(index, cache.chunk_size));
    for j in index.saturating_add(1)..=last {
        if cache.has_chunk(version, j) {
            break;
        }
        match cache.join_fill(&version.chunk(j)) {
            Joined::Started(f) => run.push(j, f),
            Joined::Existing(_) | Joined::Ready(_) => break,
        }
    }
    cache.spawn(fill_run(origin.clone(), obj.clone(), meta.clone(), run));
    ChunkSource::Filling(flight)
}

/// The chunk if it is at hand without any work: being filled (or filled and still held), or
/// in the memory tier. Starts nothing: a response that must wait for the response budget
/// looks here first, so that waiting never starts a fill.
pub fn chunk_in_hand(
    cache: &ChunkCache,
    version: &ObjectVersion,
    index: u64,
) -> Option<ChunkSource> {
    let id = version.chunk(index);
    if let Some(f) = cache.flights.join_existing(&id) {
        return Some(ChunkSource::Filling(f));
    }
    cache.memory_chunk(&id).map(ChunkSource::Ready)
}

/// Fetch a run of consecutive chunks with one ranged request and stream it into their fills.
async fn fill_run(origin: OriginAccess, obj: ObjectRequest, meta: Arc<ObjectMeta>, mut run: Run) {
    let Some((first, last)) = run.first_and_last() else {
        return;
    };
    let slot = run.cache.fill_slot().await;
    let cs = run.cache.chunk_size;
    let start = first * cs;
    let end = chunk_bounds(last, cs, meta.size)
        .map(|b| b.end)
        .unwrap_or(start);
    let req = obj.origin_request(Some((start, end)), if_range(&meta));
    let resp = match origin.open(&req, &[], None).await {
        Ok(r) => r,
        Err(e) => {
            log::warn!(
                "rid={} chunk fetch {}-{} failed: {e}",
                obj.request_id,
                first,
                last
            );
            return run.fail_all(FillError::Origin(e.to_string()));
        }
    };
    let offset = match same_version_offset(&*resp, &meta, start, "chunk fetch") {
        Ok(offset) => offset,
        Err(FillError::VersionChanged) => {
            log::warn!(
                "rid={} object {} changed version during fill; dropping the old one",
                obj.request_id,
                obj.key.as_str()
            );
            run.cache.invalidate(&obj.key, &meta).await;
            return run.fail_all(FillError::VersionChanged);
        }
        Err(e) => return run.fail_all(e),
    };
    if unknown_length(&*resp) {
        // The whole object, of a length told only by its end: the run takes every missing
        // chunk to the end, so that the end is reached and the length checked (see
        // `distribute`), and the bytes the origin sends anyway fill what is missing.
        let count = crate::range::plan::chunk_count(meta.size, cs);
        for j in last.saturating_add(1)..count {
            if run.cache.has_chunk(&run.version, j) {
                continue;
            }
            if let Joined::Started(f) = run.cache.join_fill(&run.version.chunk(j)) {
                run.push(j, f);
            }
        }
    }
    distribute(origin, resp, offset, meta, obj, run, slot).await;
}

/// Whether every chunk of a version is held by a tier or being filled: for a version without a
/// validator, whether it can still be served from the one fetch that brought it. The cost is
/// one lookup per chunk, paid only by validator-less objects.
pub fn whole_from_one_fetch(
    cache: &ChunkCache,
    meta: &ObjectMeta,
    version: &ObjectVersion,
) -> bool {
    let count = crate::range::plan::chunk_count(meta.size, cache.chunk_size);
    (0..count)
        .all(|i| cache.has_chunk(version, i) || cache.flights.find(&version.chunk(i)).is_some())
}
