//! The memory tier: moka caches, sharded by key hash.
//!
//! moka takes no lock a reader waits on, but every hit records itself in one shared read log
//! per cache; with all hits going through a single cache, two cores contend on that log (the
//! `cache/memory_hit_contended` bench showed 2 threads no faster than 1). Independent shards,
//! each with its share of the capacity, let hits on different keys proceed in parallel; the
//! price is that eviction is least-recently-used per shard rather than across the whole tier.
//!
//! moka applies its evictions in maintenance passes, run once 64 writes are pending in a cache
//! (or after a while): between two passes a cache holds what was inserted on top of its
//! capacity. Counted in entries, that overshoot is as large as the entries are (64 chunks of
//! 1 MiB; 64 metadata entries of an origin's largest headers), so [`ShardedCache::insert_weighed`]
//! counts it in bytes instead and runs the pass itself once a shard has a sixteenth of its
//! capacity pending.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct ShardedCache<K, V> {
    shards: Vec<Shard<K, V>>,
    hasher: std::collections::hash_map::RandomState,
    /// Bytes inserted into a shard since its last maintenance pass that trigger the next one.
    slack: u64,
}

struct Shard<K, V> {
    cache: moka::sync::Cache<K, V>,
    /// Bytes inserted since the last maintenance pass this wrapper ran.
    pending: AtomicU64,
}

impl<K, V> ShardedCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `shards` caches built by `build(capacity_per_shard)`.
    pub fn new(
        shards: usize,
        capacity: u64,
        build: impl Fn(u64) -> moka::sync::Cache<K, V>,
    ) -> Self {
        let n = shards.max(1);
        let per_shard = (capacity / n as u64).max(1);
        ShardedCache {
            shards: (0..n)
                .map(|_| Shard {
                    cache: build(per_shard),
                    pending: AtomicU64::new(0),
                })
                .collect(),
            hasher: Default::default(),
            slack: per_shard / 16,
        }
    }

    fn shard_of(&self, key: &K) -> &Shard<K, V> {
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        &self.shards[i]
    }

    fn shard(&self, key: &K) -> &moka::sync::Cache<K, V> {
        &self.shard_of(key).cache
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.shard(key).get(key)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.shard(key).contains_key(key)
    }

    pub fn insert(&self, key: K, value: V) {
        self.shard(&key).insert(key, value)
    }

    /// Insert an entry of `weight` bytes (what the cache's weigher says); once a sixteenth of
    /// the shard's capacity was inserted since its last maintenance pass, run one now, so a
    /// shard never holds more than that beyond its capacity (see the module docs).
    pub fn insert_weighed(&self, key: K, value: V, weight: u64) {
        let shard = self.shard_of(&key);
        shard.cache.insert(key, value);
        let pending = shard.pending.fetch_add(weight, Ordering::AcqRel) + weight;
        if pending > self.slack {
            shard.pending.store(0, Ordering::Release);
            shard.cache.run_pending_tasks();
        }
    }

    /// The capacity of one shard.
    pub fn shard_capacity(&self) -> u64 {
        self.shards
            .first()
            .and_then(|s| s.cache.policy().max_capacity())
            .unwrap_or(0)
    }

    pub fn invalidate(&self, key: &K) {
        self.shard(key).invalidate(key)
    }

    /// Call `f` with every entry (a snapshot per shard as moka iterates it: entries inserted
    /// meanwhile may or may not be seen). For rare admin work, never the request path.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for shard in &self.shards {
            for (k, v) in shard.cache.iter() {
                f(&k, &v);
            }
        }
    }

    /// Entries held, after applying pending work.
    pub fn entry_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.cache.run_pending_tasks();
                s.cache.entry_count()
            })
            .sum()
    }

    /// Total weight, after applying pending evictions.
    pub fn weighted_size(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.cache.run_pending_tasks();
                s.cache.weighted_size()
            })
            .sum()
    }

    pub fn capacity(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.cache.policy().max_capacity())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_share_the_capacity_and_find_every_key() {
        let c: ShardedCache<u64, u64> = ShardedCache::new(4, 400, moka::sync::Cache::new);
        assert_eq!(c.capacity(), 400);
        for k in 0..50 {
            c.insert(k, k * 2);
        }
        for k in 0..50 {
            assert_eq!(c.get(&k), Some(k * 2));
            assert!(c.contains_key(&k));
        }
        c.invalidate(&7);
        assert_eq!(c.get(&7), None);
        assert!(c.weighted_size() <= 400);
    }
}
