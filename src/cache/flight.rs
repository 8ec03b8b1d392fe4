//! Single-flight for chunk fills: at most one origin fetch per missing chunk, however many
//! requests need it. The fetcher appends body pieces as they arrive; every waiter reads them as
//! they come (zero-copy `Bytes` slices), so a client's first byte never waits for a whole chunk.
//! A failed fill wakes every waiter with the error and leaves no entry behind: the next request
//! starts a new fill.
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
    pieces: Vec<Bytes>,
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
            to_end: false,
        }
    }

    /// A reader of everything pushed until the fill finishes, however long (a body of unknown
    /// length).
    pub fn reader_to_end(self: &Arc<Self>) -> FlightReader {
        FlightReader {
            flight: self.clone(),
            next_piece: 0,
            pos: 0,
            start: 0,
            end: u64::MAX,
            to_end: true,
        }
    }
}

/// Finishes its flight with `Abandoned` if the fetcher is dropped (an error path, a cancelled
/// task) before finishing it, so no waiter hangs on a fill nobody will complete. Finishing is
/// first-outcome-wins, so dropping the guard after a normal finish changes nothing.
pub struct FlightGuard(Option<Arc<Flight>>);

impl FlightGuard {
    pub fn new(flight: Arc<Flight>) -> Self {
        FlightGuard(Some(flight))
    }

    /// Hand responsibility for the flight to someone else.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.finish(Err(FillError::Abandoned));
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
    /// The window is "until the fill finishes": a clean finish ends it.
    to_end: bool,
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
                    Some(Ok(())) if self.to_end => return None,
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
    async fn reader_to_end_ends_with_the_fill() {
        let f = Arc::new(Flight::default());
        let all = tokio::spawn(read_all(f.reader_to_end()));
        f.push(Bytes::from_static(b"ab"));
        f.push(Bytes::from_static(b"c"));
        f.finish(Ok(()));
        assert_eq!(all.await.unwrap().unwrap(), b"abc");
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

    #[tokio::test]
    async fn dropped_guard_abandons() {
        let f = Arc::new(Flight::default());
        let r = tokio::spawn(read_all(f.reader(0, 4)));
        drop(FlightGuard::new(f.clone()));
        assert_eq!(r.await.unwrap(), Err(FillError::Abandoned));
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
