//! The client table: one entry per (client, class), sharded so that requests of different
//! clients rarely meet on a lock, and bounded: when a shard is full, entries that nobody holds
//! (no response in progress) are evicted, least recently used first. An entry in use is never
//! evicted, so its counters stay true; those are bounded by the connections the node admits.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 16;

/// Something the table can tell is idle and how recently it was used.
pub trait Entry {
    /// A monotonic stamp of the last use (larger = more recent).
    fn last_used(&self) -> u64;
}

pub struct Table<K, V> {
    shards: Vec<Mutex<HashMap<K, Arc<V>>>>,
    hasher: RandomState,
    /// Entries per shard before idle ones are evicted.
    shard_capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Entry> Table<K, V> {
    /// A table of about `capacity` entries (at least one per shard).
    pub fn new(capacity: usize) -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, k: &K) -> MutexGuard<'_, HashMap<K, Arc<V>>> {
        let i = (self.hasher.hash_one(k) as usize) % self.shards.len();
        // No code panics while a shard is locked; never turn poisoning into a panic.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `k`, made with `make` if absent. May evict idle entries of the same shard.
    pub fn get_or_insert_with(&self, k: &K, make: impl FnOnce() -> V) -> Arc<V> {
        let mut shard = self.shard(k);
        if let Some(v) = shard.get(k) {
            return v.clone();
        }
        if shard.len() >= self.shard_capacity {
            evict_idle(&mut shard, self.shard_capacity);
        }
        let v = Arc::new(make());
        shard.insert(k.clone(), v.clone());
        v
    }

    /// Insert or replace the entry for `k`.
    pub fn insert(&self, k: &K, v: Arc<V>) {
        let mut shard = self.shard(k);
        if shard.len() >= self.shard_capacity && !shard.contains_key(k) {
            evict_idle(&mut shard, self.shard_capacity);
        }
        shard.insert(k.clone(), v);
    }

    pub fn get(&self, k: &K) -> Option<Arc<V>> {
        self.shard(k).get(k).cloned()
    }

    pub fn remove_if(&self, k: &K, pred: impl FnOnce(&Arc<V>) -> bool) {
        let mut shard = self.shard(k);
        if shard.get(k).is_some_and(pred) {
            shard.remove(k);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, shard by shard (each shard locked briefly, never two at once).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<V>)) {
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(|e| e.into_inner());
            shard.values().for_each(&mut f);
        }
    }
}

/// Drop entries held by nobody else, least recently used first, until the shard is below
/// three quarters of `capacity` (so that eviction is not paid on every insert).
fn evict_idle<K: Hash + Eq + Clone, V: Entry>(shard: &mut HashMap<K, Arc<V>>, capacity: usize) {
    let target = capacity - capacity / 4;
    let mut idle: Vec<(u64, K)> = shard
        .iter()
        .filter(|(_, v)| Arc::strong_count(v) == 1)
        .map(|(k, v)| (v.last_used(), k.clone()))
        .collect();
    idle.sort_unstable_by_key(|(t, _)| *t);
    for (_, k) in idle {
        if shard.len() < target {
            break;
        }
        shard.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct E(AtomicU64);
    impl Entry for E {
        fn last_used(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn a_hundred_thousand_clients_stay_bounded() {
        let t: Table<u64, E> = Table::new(1024);
        for i in 0..100_000u64 {
            let e = t.get_or_insert_with(&i, || E(AtomicU64::new(i)));
            assert_eq!(e.last_used(), i);
        }
        assert!(t.len() <= 1024 + SHARDS, "{}", t.len());
        // The most recent clients are still there.
        assert!(t.get(&99_999).is_some());
    }

    #[test]
    fn entries_in_use_are_never_evicted() {
        let t: Table<u64, E> = Table::new(16);
        let held: Vec<Arc<E>> = (0..64u64)
            .map(|i| t.get_or_insert_with(&i, || E(AtomicU64::new(i))))
            .collect();
        for i in 64..10_000u64 {
            t.get_or_insert_with(&i, || E(AtomicU64::new(i)));
        }
        for i in 0..64u64 {
            let e = t.get(&i).expect("held entry kept");
            assert!(Arc::ptr_eq(&e, &held[i as usize]));
        }
        drop(held);
        for i in 10_000..20_000u64 {
            t.get_or_insert_with(&i, || E(AtomicU64::new(i)));
        }
        assert!(t.len() <= 16 + SHARDS, "released entries go: {}", t.len());
    }
}
