//! Single-flight for chunk fills: at most one origin fetch per missing chunk, however many
//! requests need it. The fetcher appends body pieces as they arrive; every waiter reads them as
//! they come (zero-copy `Bytes` slices), so a client's first byte never waits for a whole chunk.
//! A failed fill wakes every waiter with the error and leaves no entry behind: the next request
//! starts a new fill.
//!
//! # Memory
//!
//! A flight holds the pieces of *one* chunk only while that chunk is being filled. When the
//! chunk is complete ([`Flight::complete`]) the pieces are released and the flight keeps the
//! finished chunk instead — the very allocation the memory tier stores, so a waiter that is
//! still behind holds no second copy. A flight lives as long as its fetcher or a waiter holds
//! it; a waiter holds at most one flight at a time.
//!
//! Locks here are per flight (pieces) and per map shard (registration), never global, and are
//! never held across an await.
//!
//! # A chunk just fetched is not fetched again while a request still needs it
//!
//! A completed fill stays findable in the map (weakly) as long as anyone holds its flight, and
//! each flight of a run holds the next flight of the same run ([`FlightMap::link`]). So a
//! request reading chunk `i` of a run keeps the rest of that run (at most one run, 16 chunks)
//! reachable: if the memory tier evicts those chunks before the request gets to them (a tier
//! smaller than the object, a disk write skipped because the disk is behind), the request
//! still finds them here instead of asking the origin again. Nobody holding them, they go.
//! What chains may keep beyond the memory tier is bounded: at most [`RETAIN_LIMIT`] bytes of
//! chunks are linked at any time, whatever the number of requests (a stalled client holds at
//! most its share of that, never memory without bound).

use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;

/// Why a fill failed, as its waiters see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillError {
    /// Every origin attempt failed (message for logs).
    Origin(String),
    /// The object changed version mid-fill; the bytes would mix versions.
    VersionChanged,
    /// The fill was abandoned (fetcher gone).
    Abandoned,
}

impl std::fmt::Display for FillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillError::Origin(m) => write!(f, "origin fetch failed: {m}"),
            FillError::VersionChanged => f.write_str("object version changed during fetch"),
            FillError::Abandoned => f.write_str("fetch abandoned"),
        }
    }
}

#[derive(Default)]
struct State {
    /// The pieces received so far, while the chunk is being filled.
    pieces: Vec<Bytes>,
    /// The finished chunk (then `pieces` is empty).
    whole: Option<Bytes>,
    done: Option<Result<(), FillError>>,
}

/// One chunk being filled.
#[derive(Default)]
pub struct Flight {
    state: Mutex<State>,
    notify: Notify,
    /// The next flight of the same run, kept reachable while this one is held.
    next: Mutex<Option<Hold>>,
}

/// A link to the next flight of a run, with its share of the retention budget.
struct Hold {
    next: Arc<Flight>,
    _ticket: RetainTicket,
}

/// Bytes of the retention budget, given back on drop.
struct RetainTicket {
    budget: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for RetainTicket {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Most bytes of chunks that links between flights keep reachable at once.
///
/// 16 MiB: sixteen chunks of the default size, ahead of every slow reader together. At 64 MiB
/// it was most of what 40 readers stalled mid-object added to the memory tier (196 MiB over a
/// 64 MiB tier, measured by tests/memory_bound.rs; 147 MiB at 16 MiB).
pub const RETAIN_LIMIT: u64 = 16 << 20;

impl Drop for Flight {
    /// Let go of the chain of following flights iteratively (a long chain must not recurse).
    fn drop(&mut self) {
        let mut hold = self.next.get_mut().ok().and_then(Option::take);
        while let Some(h) = hold {
            hold = Arc::into_inner(h.next)
                .and_then(|mut f| f.next.get_mut().ok().and_then(Option::take));
        }
    }
}

impl Flight {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere mid-update; the pieces are still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append a body piece (ignored once finished).
    pub fn push(&self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        let mut s = self.lock();
        if s.done.is_none() {
            s.pieces.push(piece);
        }
        drop(s);
        self.notify.notify_waiters();
    }

    /// Finish the fill; the first outcome wins.
    pub fn finish(&self, outcome: Result<(), FillError>) {
        let mut s = self.lock();
        if s.done.is_none() {
            s.done = Some(outcome);
        }
        drop(s);
        self.notify.notify_waiters();
    }

    /// Finish the fill with the complete chunk: the pieces are released, waiters read the rest
    /// of their window from `chunk`. Ignored once finished.
    pub fn complete(&self, chunk: Bytes) {
        let mut s = self.lock();
        if s.done.is_none() {
            s.pieces = Vec::new();
            s.whole = Some(chunk);
            s.done = Some(Ok(()));
        }
        drop(s);
        self.notify.notify_waiters();
    }

    fn hold_next(&self, hold: Hold) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
    }

    /// The finished chunk (the allocation the memory tier stores), once the fill completed.
    pub fn whole(&self) -> Option<Bytes> {
        self.lock().whole.clone()
    }

    /// Whether the fill completed with its chunk.
    pub fn is_complete(&self) -> bool {
        self.lock().whole.is_some()
    }

    /// Bytes held by this flight (pieces or the finished chunk).
    pub fn held_bytes(&self) -> usize {
        let s = self.lock();
        s.whole.as_ref().map_or(0, Bytes::len) + s.pieces.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_done(&self) -> bool {
        self.lock().done.is_some()
    }

    /// A reader of bytes `offset .. offset + len` of this chunk.
    pub fn reader(self: &Arc<Self>, offset: u64, len: u64) -> FlightReader {
        FlightReader {
            flight: self.clone(),
            next_piece: 0,
            pos: 0,
            start: offset,
            end: offset.saturating_add(len),
        }
    }
}

/// Reads a byte window of a chunk as it is filled.
pub struct FlightReader {
    flight: Arc<Flight>,
    next_piece: usize,
    /// Chunk offset of the start of `next_piece`.
    pos: u64,
    start: u64,
    end: u64,
}

impl FlightReader {
    /// The next piece of the window, `None` once the window is complete, or the fill's error.
    pub async fn next(&mut self) -> Option<Result<Bytes, FillError>> {
        loop {
            if self.pos >= self.end {
                return None;
            }
            let notified = self.flight.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.flight.lock();
                if let Some(whole) = &s.whole {
                    let from = self.pos.max(self.start);
                    let to = self.end.min(whole.len() as u64);
                    self.pos = self.pos.max(to);
                    if from < to {
                        return Some(Ok(whole.slice(from as usize..to as usize)));
                    }
                    if to < self.end {
                        return Some(Err(FillError::Origin(
                            "fill ended short of the requested bytes".into(),
                        )));
                    }
                    return None;
                }
                while let Some(piece) = s.pieces.get(self.next_piece) {
                    let piece_start = self.pos;
                    let piece_end = piece_start + piece.len() as u64;
                    self.next_piece += 1;
                    self.pos = piece_end;
                    if piece_end <= self.start {
                        continue;
                    }
                    let from = self.start.saturating_sub(piece_start) as usize;
                    let to = (self.end.min(piece_end) - piece_start) as usize;
                    return Some(Ok(piece.slice(from..to)));
                }
                match &s.done {
                    Some(Err(e)) => return Some(Err(e.clone())),
                    // Finished, yet short of the window: the fill ended early.
                    Some(Ok(())) => {
                        return Some(Err(FillError::Origin(
                            "fill ended short of the requested bytes".into(),
                        )))
                    }
                    None => {}
                }
            }
            notified.await;
        }
    }
}

/// The in-flight fills, sharded so registration never takes a global lock. A completed fill
/// stays as a weak entry while its flight is held elsewhere (see the module doc).
pub struct FlightMap<K> {
    shards: Vec<Mutex<Shard<K>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Bytes of chunks linked from one flight to the next (see [`RETAIN_LIMIT`]).
    retained: Arc<AtomicU64>,
    /// Joins of a fill still in progress: origin fetches saved by coalescing.
    coalesced: AtomicU64,
}

enum Entry {
    Filling(Arc<Flight>),
    Done(Weak<Flight>),
}

struct Shard<K> {
    map: HashMap<K, Entry>,
    /// Size at which dead `Done` entries are next swept out.
    sweep_at: usize,
}

/// Entries a shard may hold before its first sweep of dead ones.
const SWEEP_MIN: usize = 64;

/// What `join_or_start` found.
pub enum Joined {
    /// Another request is filling this chunk, or filled it and its flight is still held: read
    /// from it.
    Existing(Arc<Flight>),
    /// The caller registered a new fill and must complete it (then call `remove`).
    Started(Arc<Flight>),
    /// `check` found the data (e.g. in memory) while the shard was locked.
    Ready(Bytes),
}

impl<K: Hash + Eq + Clone> FlightMap<K> {
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    sweep_at: SWEEP_MIN,
                })
            })
            .collect();
        FlightMap {
            shards,
            hasher: Default::default(),
            retained: Arc::new(AtomicU64::new(0)),
            coalesced: AtomicU64::new(0),
        }
    }

    /// How many times a chunk was waited for on a fill already in progress instead of fetched.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Let `prev` (a fill of a run) keep `next` (the run's following fill, of `bytes` bytes)
    /// reachable while `prev` is held, within [`RETAIN_LIMIT`]; `false` when the budget is
    /// spent (then `next` is not linked).
    pub fn link(&self, prev: &Flight, next: &Arc<Flight>, bytes: u64) -> bool {
        let reserved = self
            .retained
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let total = used.checked_add(bytes)?;
                (total <= RETAIN_LIMIT).then_some(total)
            })
            .is_ok();
        if reserved {
            prev.hold_next(Hold {
                next: next.clone(),
                _ticket: RetainTicket {
                    budget: self.retained.clone(),
                    bytes,
                },
            });
        }
        reserved
    }

    /// Bytes of chunks kept reachable by links right now.
    pub fn retained_bytes(&self) -> u64 {
        self.retained.load(Ordering::Acquire)
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, Shard<K>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the fill of `key` (in progress, or completed and still held), or — after `check`
    /// (run under the shard lock, so a fill that completes concurrently is never missed) finds
    /// nothing — register a new one.
    pub fn join_or_start(&self, key: &K, check: impl FnOnce() -> Option<Bytes>) -> Joined {
        let mut shard = self.shard(key);
        match shard.map.get(key) {
            Some(Entry::Filling(f)) => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                return Joined::Existing(f.clone());
            }
            Some(Entry::Done(w)) => match w.upgrade() {
                Some(f) => return Joined::Existing(f),
                None => {
                    shard.map.remove(key);
                }
            },
            None => {}
        }
        if let Some(b) = check() {
            return Joined::Ready(b);
        }
        let f = Arc::new(Flight::default());
        shard.map.insert(key.clone(), Entry::Filling(f.clone()));
        if shard.map.len() >= shard.sweep_at {
            shard
                .map
                .retain(|_, e| !matches!(e, Entry::Done(w) if w.strong_count() == 0));
            shard.sweep_at = (shard.map.len() * 2).max(SWEEP_MIN);
        }
        Joined::Started(f)
    }

    /// The fill of `key` in progress, or completed and still held, to read from: joining one
    /// in progress counts as coalesced, as [`FlightMap::join_or_start`] does.
    pub fn join_existing(&self, key: &K) -> Option<Arc<Flight>> {
        match self.shard(key).map.get(key)? {
            Entry::Filling(f) => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                Some(f.clone())
            }
            Entry::Done(w) => w.upgrade(),
        }
    }

    /// The fill of `key` in progress, or completed and still held.
    pub fn find(&self, key: &K) -> Option<Arc<Flight>> {
        match self.shard(key).map.get(key)? {
            Entry::Filling(f) => Some(f.clone()),
            Entry::Done(w) => w.upgrade(),
        }
    }

    /// The fill of `key` by `flight` has ended (a newer fill under the same key is left alone):
    /// a completed one stays findable while its flight is held, a failed one goes.
    pub fn remove(&self, key: &K, flight: &Arc<Flight>) {
        let mut shard = self.shard(key);
        if shard
            .map
            .get(key)
            .is_some_and(|e| matches!(e, Entry::Filling(f) if Arc::ptr_eq(f, flight)))
        {
            if flight.is_complete() {
                shard
                    .map
                    .insert(key.clone(), Entry::Done(Arc::downgrade(flight)));
            } else {
                shard.map.remove(key);
            }
        }
    }

    /// Fills in progress (completed fills still held are not counted).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock().map_or(0, |m| {
                    m.map
                        .values()
                        .filter(|e| matches!(e, Entry::Filling(_)))
                        .count()
                })
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(mut r: FlightReader) -> Result<Vec<u8>, FillError> {
        let mut out = Vec::new();
        while let Some(p) = r.next().await {
            out.extend_from_slice(&p?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn waiters_get_pieces_as_they_stream_and_windows_are_exact() {
        let f = Arc::new(Flight::default());
        let whole = tokio::spawn(read_all(f.reader(0, 10)));
        let window = tokio::spawn(read_all(f.reader(3, 5)));
        f.push(Bytes::from_static(b"0123"));
        tokio::task::yield_now().await;
        f.push(Bytes::from_static(b"456"));
        f.push(Bytes::from_static(b"789"));
        f.finish(Ok(()));
        assert_eq!(whole.await.unwrap().unwrap(), b"0123456789");
        assert_eq!(window.await.unwrap().unwrap(), b"34567");
    }

    #[tokio::test]
    async fn completing_releases_the_pieces_and_waiters_finish_from_the_chunk() {
        let f = Arc::new(Flight::default());
        let mut behind = f.reader(2, 6);
        let mut ahead = f.reader(0, 10);
        f.push(Bytes::from_static(b"0123"));
        assert_eq!(ahead.next().await.unwrap().unwrap(), &b"0123"[..]);
        f.push(Bytes::from_static(b"45"));
        let chunk = Bytes::from_static(b"0123456789");
        f.complete(chunk.clone());
        assert_eq!(
            f.held_bytes(),
            10,
            "pieces released, only the chunk is held"
        );
        // The reader that already had 4 bytes gets exactly the rest, from the chunk.
        assert_eq!(ahead.next().await.unwrap().unwrap(), &b"456789"[..]);
        assert!(ahead.next().await.is_none());
        assert_eq!(read_all(behind).await.unwrap(), b"234567");
        // A chunk shorter than a window is an error, never a silent short body.
        let g = Arc::new(Flight::default());
        g.complete(Bytes::from_static(b"abc"));
        assert!(read_all(g.reader(1, 5)).await.is_err());
        behind = g.reader(0, 3);
        assert_eq!(read_all(behind).await.unwrap(), b"abc");
    }

    #[tokio::test]
    async fn failure_wakes_every_waiter() {
        let f = Arc::new(Flight::default());
        let readers: Vec<_> = (0..8)
            .map(|_| tokio::spawn(read_all(f.reader(0, 100))))
            .collect();
        f.push(Bytes::from_static(b"abc"));
        f.finish(Err(FillError::Origin("boom".into())));
        for r in readers {
            assert_eq!(r.await.unwrap(), Err(FillError::Origin("boom".into())));
        }
    }

    #[test]
    fn map_joins_checks_and_removes() {
        let m: FlightMap<u64> = FlightMap::new(4);
        let Joined::Started(f) = m.join_or_start(&1, || None) else {
            panic!("expected start")
        };
        assert!(matches!(m.join_or_start(&1, || None), Joined::Existing(_)));
        assert!(matches!(
            m.join_or_start(&2, || Some(Bytes::from_static(b"x"))),
            Joined::Ready(_)
        ));
        let other = Arc::new(Flight::default());
        m.remove(&1, &other);
        assert_eq!(m.len(), 1, "a different flight is not removed");
        m.remove(&1, &f);
        assert!(m.is_empty());
    }

    #[test]
    fn completed_fills_stay_findable_while_held_and_links_are_bounded() {
        let m: FlightMap<u64> = FlightMap::new(4);
        let Joined::Started(a) = m.join_or_start(&1, || None) else {
            panic!("expected start")
        };
        let Joined::Started(b) = m.join_or_start(&2, || None) else {
            panic!("expected start")
        };
        assert!(m.link(&a, &b, 10));
        assert_eq!(m.retained_bytes(), 10);
        b.complete(Bytes::from_static(b"bb"));
        m.remove(&2, &b);
        drop(b);
        assert_eq!(m.len(), 1, "a completed fill is not counted as in progress");
        // `a` holds `b`: a request for chunk 2 finds it, though nothing else holds it.
        match m.join_or_start(&2, || None) {
            Joined::Existing(f) => assert!(f.is_complete()),
            _ => panic!("the held, completed fill of 2 was not found"),
        }
        a.finish(Err(FillError::Abandoned));
        m.remove(&1, &a);
        drop(a);
        assert_eq!(m.retained_bytes(), 0, "the link gave its budget back");
        assert!(matches!(m.join_or_start(&2, || None), Joined::Started(_)));
        // Past the limit, nothing is linked.
        let (c, d) = (Arc::new(Flight::default()), Arc::new(Flight::default()));
        assert!(!m.link(&c, &d, RETAIN_LIMIT + 1));
        assert_eq!(m.retained_bytes(), 0);
    }
}
