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

use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};
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

/// The in-flight fills, sharded so registration never takes a global lock.
pub struct FlightMap<K> {
    shards: Vec<Mutex<HashMap<K, Arc<Flight>>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// What `join_or_start` found.
pub enum Joined {
    /// Another request is filling this chunk: read from it.
    Existing(Arc<Flight>),
    /// The caller registered a new fill and must complete it (then call `remove`).
    Started(Arc<Flight>),
    /// `check` found the data (e.g. in memory) while the shard was locked.
    Ready(Bytes),
}

impl<K: Hash + Eq + Clone> FlightMap<K> {
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(HashMap::new()))
            .collect();
        FlightMap {
            shards,
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, HashMap<K, Arc<Flight>>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the fill of `key`, or — after `check` (run under the shard lock, so a fill that
    /// completes concurrently is never missed) finds nothing — register a new one.
    pub fn join_or_start(&self, key: &K, check: impl FnOnce() -> Option<Bytes>) -> Joined {
        let mut shard = self.shard(key);
        if let Some(f) = shard.get(key) {
            return Joined::Existing(f.clone());
        }
        if let Some(b) = check() {
            return Joined::Ready(b);
        }
        let f = Arc::new(Flight::default());
        shard.insert(key.clone(), f.clone());
        Joined::Started(f)
    }

    /// Remove `key`'s fill if it is `flight` (a newer fill under the same key is left alone).
    pub fn remove(&self, key: &K, flight: &Arc<Flight>) {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
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
}
