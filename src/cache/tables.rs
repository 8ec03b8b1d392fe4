//! What the cache knows about objects, in memory: each object version's metadata, the
//! hit-for-pass marks and the Vary markers, in one table bounded in **bytes**
//! (`cache.metadata_capacity`), not in entries. Keys are URLs a client chooses (up to
//! `server.max_uri_size`) and stored headers are what an origin sends (up to 1 MiB): a count of
//! entries bounds nothing.
//!
//! # Weights
//!
//! Every entry is charged what it takes from the allocator: its key, its value and everything
//! they own (stored header fields twice: as text, and as the parsed fields every response
//! replays, [`ObjectMeta::wire`]), each allocation rounded up to the allocator's size class
//! ([`alloc_size`]), plus [`ENTRY_OVERHEAD`], moka's own bookkeeping per entry, measured
//! (tests/table_weights.rs checks the weights against jemalloc's own count). The chunks of the
//! memory tier are weighed the same way ([`chunk_weight`]), so a tier of tiny objects cannot
//! hold a million entries' worth of bookkeeping for free.
//!
//! # Eviction
//!
//! One table for the three kinds of entry, so that one number bounds them all and none has a
//! share that sits idle while another is starved. Eviction is moka's (TinyLFU: an entry seen
//! once does not push out entries in use, so a flood of distinct URLs churns through the table
//! without evicting the metadata of the objects being served). Metadata evicted from memory is
//! read again from the disk tier when the object is there ([`ChunkCache::meta`]); without a disk
//! tier the object is fetched again. Only memory is lost, never correctness.
//!
//! # What it must never do
//!
//! * Hold more than its capacity beyond moka's pending writes (at most 64 entries per shard
//!   between two maintenance passes), whatever the keys and headers.
//! * Be read in a way that copies stored headers: lookups hand out `Arc`s.
//!
//! [`ChunkCache::meta`]: super::store::ChunkCache::meta

use super::key::ObjectKey;
use super::memory::ShardedCache;
use super::meta::ObjectMeta;
use super::store::{VaryMarker, HIT_FOR_PASS_TTL};
use bytes::Bytes;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Arc;
use std::time::Instant;

/// What moka keeps per entry besides the key and value we weigh (its hash-map bucket, the
/// reference-counted wrappers of key and value, the access-order node, the frequency sketch's
/// share) and the `Arc` around our entry. Measured with every allocation counted
/// (tests/table_weights.rs, `measure_fixed_overheads`): 287 bytes per entry, plus up to 16
/// bytes of frequency sketch once the table is full; charged with some margin.
pub const ENTRY_OVERHEAD: u64 = 320;

/// The same for a chunk of the memory tier (an LRU cache: no sketch, no timers), with the
/// shared header a `Bytes` allocates when it is first cloned: measured 313 bytes.
pub const CHUNK_ENTRY_OVERHEAD: u64 = 352;

/// The size jemalloc really allocates for a request of `n` bytes: its size classes are 8, then
/// multiples of 16 up to 128, then four classes between consecutive powers of two (160, 192,
/// 224, 256, 320, ...). A 8,193-byte URL takes 10,240 bytes.
pub fn alloc_size(n: u64) -> u64 {
    match n {
        0 => 0,
        1..=8 => 8,
        9..=128 => n.div_ceil(16) * 16,
        _ => {
            let step = n.checked_next_power_of_two().map_or(u64::MAX, |p| p / 8);
            n.div_ceil(step).saturating_mul(step)
        }
    }
}

/// What an `Arc<T>` of `size` bytes of `T` allocates (two counters and the value).
pub fn arc_size(size: usize) -> u64 {
    alloc_size(16 + size as u64)
}

/// A chunk of the memory tier: its bytes and the entry's bookkeeping.
pub fn chunk_weight(data: &Bytes) -> u64 {
    alloc_size(data.len() as u64).saturating_add(CHUNK_ENTRY_OVERHEAD)
}

/// moka takes weights as `u32`; an entry heavier than that is charged `u32::MAX` (more than
/// any table's capacity share, so it is evicted at once).
pub fn weight_u32(w: u64) -> u32 {
    u32::try_from(w).unwrap_or(u32::MAX)
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Meta,
    Pass,
    Vary,
}

/// The key moka holds: a keyed 64-bit digest (SipHash, a random key per process) of the kind
/// and the object key, never the object key itself. moka's map keeps a removed entry's key
/// until it next tidies that part of the map (up to 26 removed entries per segment, 64
/// segments per shard); with URLs as keys that was up to 8 KiB per removed entry, held outside
/// any weight. A digest is 8 bytes. The object key is kept in the entry and compared on every
/// lookup, so two keys with one digest (which no client can aim for without the process's key)
/// only take each other's place, a miss: never an answer for the wrong URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot(u64);

/// An entry: the object key it is for, and what is known.
#[derive(Debug)]
struct Held {
    key: ObjectKey,
    known: Known,
}

#[derive(Debug)]
enum Known {
    Meta(Arc<ObjectMeta>),
    /// Not cacheable, until this instant (checked on lookup: moka's per-entry expiry costs
    /// every hit of the table about 100 ns; an expired mark waits for eviction in the table's
    /// budget, or is dropped when looked up).
    Pass(Instant),
    Vary(Arc<VaryMarker>),
}

impl Known {
    fn kind(&self) -> Kind {
        match self {
            Known::Meta(_) => Kind::Meta,
            Known::Pass(_) => Kind::Pass,
            Known::Vary(_) => Kind::Vary,
        }
    }

    /// What the value owns.
    fn bytes(&self) -> u64 {
        match self {
            Known::Meta(m) => m.memory_bytes(),
            Known::Pass(_) => 0,
            Known::Vary(v) => v.memory_bytes(),
        }
    }
}

/// The weight of an entry of this table: the object key, the value, and [`ENTRY_OVERHEAD`]
/// (which covers the digest and the `Arc` around [`Held`]).
fn weight(held: &Held) -> u64 {
    ENTRY_OVERHEAD
        .saturating_add(held.key.memory_bytes())
        .saturating_add(held.known.bytes())
}

/// Shards of the table: enough that two cores seldom meet on one shard's read log, few
/// enough that moka's fixed cost per shard (its logs, its map's 64 segments and the removed
/// keys they hold) stays small.
const SHARDS: u64 = 8;

/// The table; see the module docs.
pub struct ObjectTables {
    table: ShardedCache<Slot, Arc<Held>>,
    /// The key of the [`Slot`] digests, random per process.
    digest: RandomState,
}

impl ObjectTables {
    /// A table of at most `capacity` bytes, in up to [`SHARDS`] shards of at least 256 KiB.
    pub fn new(capacity: u64) -> ObjectTables {
        let shards = (capacity / (256 << 10)).clamp(1, SHARDS) as usize;
        ObjectTables {
            table: ShardedCache::new(shards, capacity, |cap| {
                moka::sync::Cache::builder()
                    .max_capacity(cap)
                    .weigher(|_: &Slot, held: &Arc<Held>| weight_u32(weight(held)))
                    .build()
            }),
            digest: RandomState::new(),
        }
    }

    fn slot(&self, kind: Kind, key: &ObjectKey) -> Slot {
        let mut h = self.digest.build_hasher();
        kind.hash(&mut h);
        key.as_str().hash(&mut h);
        Slot(h.finish())
    }

    /// The entry of `kind` for `key`, if held (and really for `key`: see [`Slot`]).
    fn get(&self, kind: Kind, key: &ObjectKey) -> Option<Arc<Held>> {
        self.table
            .get(&self.slot(kind, key))
            .filter(|held| held.known.kind() == kind && held.key == *key)
    }

    /// Insert, unless the entry is heavier than an eighth of a shard (metadata with hundreds
    /// of KiB of headers, in a small table): such an entry would push out dozens of others and
    /// be pushed out itself at once; it is left to the disk tier, or fetched again. What is
    /// already stored under the slot goes (it is outdated).
    fn insert(&self, key: &ObjectKey, known: Known) {
        let slot = self.slot(known.kind(), key);
        let held = Held {
            key: key.clone(),
            known,
        };
        let w = weight(&held);
        if w > self.table.shard_capacity() / 8 {
            self.table.invalidate(&slot);
            return;
        }
        self.table.insert_weighed(slot, Arc::new(held), w);
    }

    fn remove(&self, kind: Kind, key: &ObjectKey) {
        self.table.invalidate(&self.slot(kind, key));
    }

    pub fn meta(&self, key: &ObjectKey) -> Option<Arc<ObjectMeta>> {
        match &self.get(Kind::Meta, key)?.known {
            Known::Meta(m) => Some(m.clone()),
            _ => None,
        }
    }

    pub fn insert_meta(&self, key: &ObjectKey, meta: Arc<ObjectMeta>) {
        self.insert(key, Known::Meta(meta));
    }

    pub fn remove_meta(&self, key: &ObjectKey) {
        self.remove(Kind::Meta, key);
    }

    /// Every object's metadata held now (admin work, never the request path).
    pub fn for_each_meta(&self, mut f: impl FnMut(&ObjectKey, &ObjectMeta)) {
        self.table.for_each(|_, held| {
            if let Known::Meta(m) = &held.known {
                f(&held.key, m);
            }
        });
    }

    /// Remember for [`HIT_FOR_PASS_TTL`] that `key` is not cacheable.
    pub fn mark_pass(&self, key: &ObjectKey) {
        self.insert(key, Known::Pass(Instant::now() + HIT_FOR_PASS_TTL));
    }

    pub fn is_pass(&self, key: &ObjectKey) -> bool {
        match self.get(Kind::Pass, key).map(|held| match held.known {
            Known::Pass(until) => until > Instant::now(),
            _ => false,
        }) {
            Some(true) => true,
            Some(false) => {
                self.remove(Kind::Pass, key);
                false
            }
            None => false,
        }
    }

    pub fn remove_pass(&self, key: &ObjectKey) {
        self.remove(Kind::Pass, key);
    }

    pub fn vary(&self, key: &ObjectKey) -> Option<Arc<VaryMarker>> {
        match &self.get(Kind::Vary, key)?.known {
            Known::Vary(v) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn insert_vary(&self, key: &ObjectKey, marker: Arc<VaryMarker>) {
        self.insert(key, Known::Vary(marker));
    }

    pub fn remove_vary(&self, key: &ObjectKey) {
        self.remove(Kind::Vary, key);
    }

    /// Bytes held, after moka's pending work.
    pub fn weighted_size(&self) -> u64 {
        self.table.weighted_size()
    }

    pub fn capacity(&self) -> u64 {
        self.table.capacity()
    }

    /// Entries held (tests).
    pub fn entry_count(&self) -> u64 {
        self.table.entry_count()
    }

    /// What one metadata entry is charged (tests and measurements).
    pub fn meta_weight(key: &ObjectKey, meta: &Arc<ObjectMeta>) -> u64 {
        weight(&Held {
            key: key.clone(),
            known: Known::Meta(meta.clone()),
        })
    }

    /// What one hit-for-pass mark is charged.
    pub fn pass_weight(key: &ObjectKey) -> u64 {
        weight(&Held {
            key: key.clone(),
            known: Known::Pass(Instant::now()),
        })
    }

    /// What one Vary marker is charged.
    pub fn vary_weight(key: &ObjectKey, marker: &Arc<VaryMarker>) -> u64 {
        weight(&Held {
            key: key.clone(),
            known: Known::Vary(marker.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn alloc_sizes_are_jemallocs_classes() {
        let cases = [
            (0, 0),
            (1, 8),
            (8, 8),
            (9, 16),
            (17, 32),
            (100, 112),
            (128, 128),
            (129, 160),
            (257, 320),
            (1025, 1280),
            (4096, 4096),
            (8193, 10240),
            (16385, 20480),
            (1 << 20, 1 << 20),
            ((1 << 20) + 1, (1 << 20) + (1 << 18)),
        ];
        for (n, want) in cases {
            assert_eq!(alloc_size(n), want, "alloc_size({n})");
        }
        for n in 1..100_000u64 {
            let a = alloc_size(n);
            assert!(a >= n && a <= n + n / 4 + 16, "{n} -> {a}");
        }
        assert_eq!(alloc_size(u64::MAX), u64::MAX);
    }

    fn key(len: usize) -> ObjectKey {
        ObjectKey("k".repeat(len).into())
    }

    fn meta(fields: usize, field_len: usize) -> Arc<ObjectMeta> {
        Arc::new(ObjectMeta {
            status: 200,
            size: 100,
            validator: "\"v1\"".into(),
            etag: Some("\"v1\"".into()),
            last_modified: None,
            headers: (0..fields)
                .map(|i| (format!("x-f{i}"), "v".repeat(field_len)))
                .collect(),
            stored_at: SystemTime::UNIX_EPOCH,
            initial_age: 0,
            fresh_until: SystemTime::UNIX_EPOCH,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            stale_while_revalidate: Duration::ZERO,
            wire: Default::default(),
        })
    }

    #[test]
    fn weights_count_keys_headers_and_overhead() {
        let short = ObjectTables::pass_weight(&key(10));
        let long = ObjectTables::pass_weight(&key(8192));
        assert!(short >= ENTRY_OVERHEAD + 10, "{short}");
        assert!(long >= ENTRY_OVERHEAD + 8192, "{long}");
        assert_eq!(long - short, alloc_size(16 + 8192) - alloc_size(16 + 10));

        // Stored headers count twice (text and parsed), each field with its own overhead.
        let k = key(100);
        let bare = ObjectTables::meta_weight(&k, &meta(0, 0));
        let one_big = ObjectTables::meta_weight(&k, &meta(1, 8000));
        let many_small = ObjectTables::meta_weight(&k, &meta(200, 1));
        assert!(one_big - bare >= 2 * 8000, "{bare} {one_big}");
        assert!(
            many_small - bare >= 200 * (48 + 72),
            "per-field overhead: {bare} {many_small}"
        );
        assert!(bare >= ENTRY_OVERHEAD + 100 + std::mem::size_of::<ObjectMeta>() as u64);

        let marker = Arc::new(VaryMarker::new(vec!["accept-encoding".into(); 100]));
        let vary = ObjectTables::vary_weight(&k, &marker);
        assert!(vary >= ENTRY_OVERHEAD + 100 + 100 * (24 + 15), "{vary}");

        let chunk = chunk_weight(&Bytes::from(vec![0u8; 100]));
        assert_eq!(chunk, 112 + CHUNK_ENTRY_OVERHEAD);
    }

    #[test]
    fn the_table_holds_its_capacity_in_bytes_not_entries() {
        let t = ObjectTables::new(1 << 20);
        let m = meta(8, 1000);
        let w = ObjectTables::meta_weight(&key(4096), &m);
        for i in 0..2_000 {
            let k = ObjectKey(format!("{i}-{}", "u".repeat(4090)).into());
            t.insert_meta(&k, m.clone());
            t.mark_pass(&ObjectKey(format!("p{i}-{}", "u".repeat(4090)).into()));
        }
        let held = t.weighted_size();
        assert!(held <= 1 << 20, "{held} bytes held");
        assert!(held > 0);
        // The entries are heavy (about 20 KiB each): far fewer than were inserted remain.
        let entries = t.entry_count();
        assert!(
            entries * w.min(ObjectTables::pass_weight(&key(4096))) <= 1 << 20,
            "{entries}"
        );
        assert!(entries < 1_000, "{entries}");
    }

    #[test]
    fn hit_for_pass_marks_expire() {
        let t = ObjectTables::new(1 << 20);
        let (fresh, old) = (key(10), key(11));
        t.mark_pass(&fresh);
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        t.insert(&old, Known::Pass(past));
        assert!(t.is_pass(&fresh));
        assert!(!t.is_pass(&old), "expired");
        assert_eq!(
            t.entry_count(),
            1,
            "the expired mark is dropped when looked up"
        );
    }

    #[test]
    fn kinds_of_one_key_are_apart() {
        let t = ObjectTables::new(1 << 20);
        let k = key(10);
        t.mark_pass(&k);
        assert!(t.is_pass(&k));
        assert!(t.meta(&k).is_none());
        assert!(t.vary(&k).is_none());
        t.insert_meta(&k, meta(1, 1));
        t.insert_vary(&k, Arc::new(VaryMarker::new(vec!["accept".into()])));
        assert!(t.meta(&k).is_some() && t.vary(&k).is_some() && t.is_pass(&k));
        t.remove_pass(&k);
        assert!(!t.is_pass(&k));
        assert!(t.meta(&k).is_some());
        t.remove_meta(&k);
        t.remove_vary(&k);
        assert!(t.meta(&k).is_none() && t.vary(&k).is_none());
        let mut n = 0;
        t.for_each_meta(|_, _| n += 1);
        assert_eq!(n, 0);
    }
}
