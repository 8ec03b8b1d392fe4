//! The memory tier: moka caches, sharded by key hash.
//!
//! moka takes no lock a reader waits on, but every hit records itself in one shared read log
//! per cache; with all hits going through a single cache, two cores contend on that log (the
//! `cache/memory_hit_contended` bench showed 2 threads no faster than 1). Independent shards,
//! each with its share of the capacity, let hits on different keys proceed in parallel; the
//! price is that eviction is least-recently-used per shard rather than across the whole tier.

use std::hash::{BuildHasher, Hash};

pub struct ShardedCache<K, V> {
    shards: Vec<moka::sync::Cache<K, V>>,
    hasher: std::collections::hash_map::RandomState,
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
            shards: (0..n).map(|_| build(per_shard)).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &K) -> &moka::sync::Cache<K, V> {
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        &self.shards[i]
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

    pub fn invalidate(&self, key: &K) {
        self.shard(key).invalidate(key)
    }

    /// Call `f` with every entry (a snapshot per shard as moka iterates it: entries inserted
    /// meanwhile may or may not be seen). For rare admin work, never the request path.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for shard in &self.shards {
            for (k, v) in shard.iter() {
                f(&k, &v);
            }
        }
    }

    /// Total weight, after applying pending evictions.
    pub fn weighted_size(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.run_pending_tasks();
                s.weighted_size()
            })
            .sum()
    }

    pub fn capacity(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.policy().max_capacity())
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
