//! The chunk cache facade: object metadata and chunks in memory (moka, weighed in bytes), then
//! on disk, with single-flight fills from the origins.
//!
//! Chunks are keyed by object, *validator* and index, so a lookup for one object version can
//! never return another version's bytes. A memory hit is a `Bytes` clone (a reference count), no
//! copy and no syscall; the hit path takes no global lock and shares no single structure: the
//! memory tier is split into independent moka caches by key hash, flights are sharded too.

use super::bans::{Ban, BanList};
use super::disk::DiskStore;
use super::flight::{FlightMap, Joined};
use super::held::ResponseBudget;
use super::key::{ChunkKey, ObjectKey, ObjectVersion};
use super::memory::ShardedCache;
use super::meta::ObjectMeta;
use super::purge::Purge;
use super::tables::{self, ObjectTables};
use super::vary;
use crate::config::CacheSettings;
use crate::range::plan::chunk_count;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Held by an origin transfer into the cache; see [`ChunkCache::fill_slot`].
pub type FillSlot = tokio::sync::OwnedSemaphorePermit;

/// How long an object found uncacheable is sent straight to pass-through (Varnish's
/// "hit-for-pass"), so every request for it does not pay a discovery fetch first.
pub const HIT_FOR_PASS_TTL: Duration = Duration::from_secs(30);

/// Which tiers keep a chunk a fill brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Memory, and disk in the background: what this node fetched for itself.
    All,
    /// The memory tier only (a chunk a peer owns, with `keep_copies: memory`).
    Memory,
    /// Neither: handed to its readers and let go (`keep_copies: none`).
    Nothing,
}

pub struct ChunkCache {
    pub chunk_size: u64,
    pub max_object_size: u64,
    memory: ShardedCache<ChunkKey, Bytes>,
    /// Object metadata, hit-for-pass marks and, for URLs whose responses carry `Vary`, the
    /// fields named (see [`ChunkCache::variant`]): bounded in bytes by
    /// `cache.metadata_capacity`.
    tables: ObjectTables,
    disk: Option<Arc<DiskStore>>,
    /// Purges still to apply to objects only the disk tier holds (see `cache::bans`).
    bans: Arc<BanList>,
    /// Passes over the disk tier's metadata that applied bans.
    ban_passes: std::sync::atomic::AtomicU64,
    pub flights: FlightMap<ChunkKey>,
    /// Chunk bytes that responses in flight hold (`cache.response_budget`).
    responses: Arc<ResponseBudget>,
    /// Origin transfers into the cache that may run at once (see [`ChunkCache::fill_slot`]).
    fill_slots: Arc<tokio::sync::Semaphore>,
    /// Bytes that streamed fills (bodies of unknown length) may hold staged until their
    /// object is known to be storable: a quarter of `cache.memory.capacity`, shared (see
    /// [`ChunkCache::stage`]).
    stage: Arc<tokio::sync::Semaphore>,
    stage_capacity: u64,
    /// Every task the cache spawns (fills, disk work): bounded by the fill slots and the disk
    /// queue, and waited for at shutdown.
    tasks: tokio_util::task::TaskTracker,
    object_locks: Vec<Mutex<HashMap<ObjectKey, ObjectSlot>>>,
}

/// One object's discovery lock, whether its holder is waiting on a peer of the cluster, and
/// the lane of the peers' requests that go on meanwhile (see
/// [`ChunkCache::lock_object_for_peer`]).
#[derive(Clone, Default)]
struct ObjectSlot {
    mutex: Arc<tokio::sync::Mutex<()>>,
    asking_peer: Arc<AtomicBool>,
    peer_lane: Arc<tokio::sync::Mutex<()>>,
}

/// How often a peer's request waiting for an object's lock looks whether the holder has
/// turned to a peer meanwhile.
const PEER_LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// What a URL's responses vary on, and a name for this learning of it: variants stored under
/// an earlier marker (forgotten by an invalidation) are never found again.
#[derive(Debug)]
pub struct VaryMarker {
    fields: Vec<String>,
    nonce: u64,
}

impl VaryMarker {
    /// A marker for `fields` with a new nonce.
    pub fn new(fields: Vec<String>) -> VaryMarker {
        VaryMarker {
            fields,
            nonce: rand::random(),
        }
    }

    /// What the marker takes from the allocator (see `cache::tables`).
    pub fn memory_bytes(&self) -> u64 {
        tables::arc_size(std::mem::size_of::<VaryMarker>())
            + tables::alloc_size((self.fields.capacity() * std::mem::size_of::<String>()) as u64)
            + self
                .fields
                .iter()
                .map(|f| tables::alloc_size(f.capacity() as u64))
                .sum::<u64>()
    }
}

/// What a purge did (see [`ChunkCache::purge`]).
#[derive(Clone)]
pub enum PurgeOutcome {
    /// Every object it names was handled: how many it purged (or made stale).
    Done(u64),
    /// Handled in memory, and on disk so far (`so_far` objects); the disk pass goes on in the
    /// background (the objects named are not served meanwhile) and `ban` counts the rest.
    Pending { so_far: u64, ban: Arc<Ban> },
    /// Too many purges are pending for the disk tier: none was made.
    Busy,
}

/// The staging budget of streamed fills is this share of the memory tier's capacity.
const STAGE_SHARE: u64 = 4;

impl ChunkCache {
    /// Build the tiers. The disk tier's index loads in the background (see `DiskStore::open_bounded`).
    pub fn new(settings: &CacheSettings) -> std::io::Result<ChunkCache> {
        // Up to 16 shards, each able to hold at least 8 chunks.
        let shards = (settings.memory_capacity / settings.chunk_size.saturating_mul(8).max(1))
            .clamp(1, 16) as usize;
        let memory = ShardedCache::new(shards, settings.memory_capacity, |cap| {
            moka::sync::Cache::builder()
                .max_capacity(cap)
                .weigher(|_k: &ChunkKey, v: &Bytes| tables::weight_u32(tables::chunk_weight(v)))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build()
        });
        let disk = match &settings.disk {
            Some(d) => Some(Arc::new(
                DiskStore::open_bounded(&d.path, d.capacity, d.index_capacity)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("cache.disk.path: {e}")))?,
            )),
            None => None,
        };
        let bans = Arc::new(
            disk.as_ref()
                .map_or_else(BanList::default, |d| BanList::load(d.dir())),
        );
        let stage_capacity = (settings.memory_capacity / STAGE_SHARE)
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64);
        Ok(ChunkCache {
            chunk_size: settings.chunk_size,
            max_object_size: settings.max_object_size,
            memory,
            tables: ObjectTables::new(settings.metadata_capacity),
            disk,
            bans,
            ban_passes: Default::default(),
            flights: FlightMap::new(64),
            responses: ResponseBudget::new(settings.response_budget, settings.chunk_size),
            fill_slots: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent_fills)),
            stage: Arc::new(tokio::sync::Semaphore::new(stage_capacity as usize)),
            stage_capacity,
            tasks: tokio_util::task::TaskTracker::new(),
            object_locks: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    // ---- metadata -------------------------------------------------------------------------

    /// The object's metadata: memory, else disk (promoted to memory).
    pub async fn meta(self: &Arc<Self>, key: &ObjectKey) -> Option<Arc<ObjectMeta>> {
        if let Some(m) = self.tables.meta(key) {
            return Some(m);
        }
        let disk = self.disk.as_ref()?;
        let data = disk.get(&key.meta_entry(), None).await?;
        let Some(meta) = ObjectMeta::decode(&data) else {
            // Chunks are useless without their metadata: the object goes whole.
            disk.remove_object(key.as_str()).await;
            return None;
        };
        let meta = Arc::new(meta);
        // A purge still to be applied to the disk tier may name it: never served then.
        let bans = self.bans.pending();
        let meta = if bans.is_empty() {
            meta
        } else {
            self.start_ban_passes();
            self.enforce_bans(&bans, key, meta).await?
        };
        self.tables.insert_meta(key, meta.clone());
        Some(meta)
    }

    pub async fn put_meta(&self, key: &ObjectKey, meta: Arc<ObjectMeta>) {
        self.tables.remove_pass(key);
        self.tables.insert_meta(key, meta.clone());
        if let Some(disk) = &self.disk {
            disk.put(&key.meta_entry(), None, meta.encode()).await;
        }
    }

    /// Drop an object version: its metadata in memory (if it is still that version), and the
    /// object on disk, metadata and chunks at once. Its memory chunks are unreachable from then
    /// on (they are keyed by validator) and age out.
    pub async fn invalidate(&self, key: &ObjectKey, old: &ObjectMeta) {
        if self
            .tables
            .meta(key)
            .is_some_and(|m| m.validator == old.validator)
        {
            self.tables.remove_meta(key);
        }
        if let Some(disk) = &self.disk {
            disk.remove_object(key.as_str()).await;
        }
    }

    /// Drop an object version whose stored bytes may be wrong (a fill whose answer broke its
    /// promised length): as [`ChunkCache::invalidate`], and its chunks leave memory now, so a
    /// later discovery of the same validator cannot find them.
    pub async fn discard(&self, key: &ObjectKey, meta: &ObjectMeta) {
        self.invalidate(key, meta).await;
        self.drop_memory_chunks(key, meta);
    }

    /// Take every chunk of the version `meta` describes out of the memory tier.
    fn drop_memory_chunks(&self, key: &ObjectKey, meta: &ObjectMeta) {
        let version = ObjectVersion::new(key.clone(), meta.validator.as_str().into());
        let chunks = chunk_count(meta.size, self.chunk_size)
            .min(chunk_count(self.max_object_size, self.chunk_size))
            .max(1);
        for index in 0..chunks {
            self.memory.invalidate(&version.chunk(index));
        }
    }

    /// Forget an object whatever its version (RFC 9111 §4.4: a successful unsafe request
    /// invalidates the target URI): its metadata, and on disk the whole object. Its memory
    /// chunks become unreachable with its metadata and age out.
    pub async fn forget(&self, key: &ObjectKey) {
        // Its variants become unreachable with the marker that named them.
        self.tables.remove_vary(key);
        self.tables.remove_meta(key);
        self.tables.remove_pass(key);
        if let Some(disk) = &self.disk {
            disk.remove_object(key.as_str()).await;
        }
    }

    /// Purge the objects `purge` names (see [`Purge`]). Each one is handled under its object
    /// lock (after any discovery or revalidation in progress):
    ///
    /// * hard: its metadata goes from memory, the whole object from disk, and its chunks from
    ///   memory, so the next request fetches it from the origin even if the origin still
    ///   has the same version (same ETag): a purge often follows wrong bytes behind a right
    ///   validator.
    /// * soft: it is made stale (kept, chunks too), so the next request revalidates it and
    ///   stale-if-error (and stale-while-revalidate) can still serve it.
    ///
    /// The objects whose metadata is in memory are handled now (one pass over the metadata
    /// table). With a disk tier the purge is also a ban (see `cache::bans`): an object only
    /// the disk holds is checked against it whenever its metadata is read, so it is never
    /// served, and one background pass over the disk tier's metadata applies every ban pending
    /// when it starts. The answer waits up to `wait` for that pass. Nothing is added to the
    /// request path but the check of metadata read from disk while bans are pending. Not
    /// atomic with fills: a fill whose origin answer was on its way before the purge can store
    /// it after.
    pub async fn purge(self: &Arc<Self>, purge: &Arc<Purge>, wait: Duration) -> PurgeOutcome {
        let ban = match &self.disk {
            Some(disk) => {
                let Ok(ban) = self.bans.add(purge.clone(), SystemTime::now()) else {
                    return PurgeOutcome::Busy;
                };
                self.save_bans(disk).await;
                ban
            }
            None => Arc::new(Ban::unlisted(purge.clone(), SystemTime::now())),
        };
        let mut keys = BTreeSet::new();
        self.tables.for_each_meta(|key, meta| {
            if ban.names(key.as_str(), meta) {
                keys.insert(key.clone());
            }
        });
        for key in keys {
            let _lock = self.lock_object(&key).await;
            if let Some(meta) = self.meta(&key).await {
                // Checked again: replaced meanwhile by a version the purge does not name.
                self.enforce_bans(std::slice::from_ref(&ban), &key, meta)
                    .await;
            }
        }
        if self.disk.is_none() {
            return PurgeOutcome::Done(ban.applied());
        }
        self.start_ban_passes();
        match tokio::time::timeout(wait, ban.retired()).await {
            Ok(()) => PurgeOutcome::Done(ban.applied()),
            Err(_) => PurgeOutcome::Pending {
                so_far: ban.applied(),
                ban,
            },
        }
    }

    /// Apply `bans` to an object's metadata just read: `None` if a hard one took it (the
    /// object is gone), else the metadata to use (made stale by a soft one). Each ban counts
    /// what it took; applying a ban twice changes nothing the second time.
    async fn enforce_bans(
        &self,
        bans: &[Arc<Ban>],
        key: &ObjectKey,
        mut meta: Arc<ObjectMeta>,
    ) -> Option<Arc<ObjectMeta>> {
        for ban in bans {
            if !ban.names(key.as_str(), &meta) {
                continue;
            }
            if ban.purge.soft {
                if meta.fresh_until > ban.at {
                    meta = Arc::new(ObjectMeta {
                        fresh_until: ban.at,
                        ..(*meta).clone()
                    });
                    self.put_meta(key, meta.clone()).await;
                    ban.count();
                }
            } else {
                self.tables.remove_meta(key);
                self.drop_memory_chunks(key, &meta);
                if let Some(disk) = &self.disk {
                    disk.remove_object(key.as_str()).await;
                }
                ban.count();
                return None;
            }
        }
        Some(meta)
    }

    /// Start the background passes that apply pending bans to the disk tier, unless they run.
    fn start_ban_passes(self: &Arc<Self>) {
        if self.disk.is_some() && self.bans.claim_pass() {
            let cache = self.clone();
            tokio::spawn(async move { cache.run_ban_passes().await });
        }
    }

    /// The lurker: while bans are pending, one pass over the disk tier's metadata applies all
    /// of those pending when it starts, then retires them (and forgets them on disk).
    async fn run_ban_passes(self: Arc<Self>) {
        let Some(disk) = self.disk.clone() else {
            self.bans.release_pass();
            return;
        };
        disk.loaded().await;
        while let Some(batch) = self.bans.next_batch() {
            let named = batch.clone();
            let found = disk
                .scan_metas(move |entry, data| {
                    let key = entry.strip_suffix("\0meta")?;
                    let meta = ObjectMeta::decode(data)?;
                    named
                        .iter()
                        .any(|b| b.names(key, &meta))
                        .then(|| ObjectKey(key.into()))
                })
                .await;
            for key in found {
                let _lock = self.lock_object(&key).await;
                // Read from disk, the metadata meets every pending ban; from memory (read
                // from disk before the ban), it meets this batch here.
                if let Some(meta) = self.meta(&key).await {
                    self.enforce_bans(&batch, &key, meta).await;
                }
            }
            self.bans.retire(&batch);
            self.ban_passes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.save_bans(&disk).await;
            log::info!(
                "disk cache: {} purges applied to the disk tier ({} objects)",
                batch.len(),
                batch.iter().map(|b| b.applied()).sum::<u64>()
            );
        }
    }

    /// Keep the pending bans in the disk tier's directory (logged if that fails: they still
    /// apply until this process ends).
    async fn save_bans(&self, disk: &Arc<DiskStore>) {
        let bans = self.bans.clone();
        let dir = disk.dir().to_path_buf();
        match tokio::task::spawn_blocking(move || bans.save(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("disk cache: cannot keep the pending purges: {e}"),
            Err(e) => log::error!("disk cache: cannot keep the pending purges: {e}"),
        }
    }

    /// Passes over the disk tier that applied purges.
    pub fn ban_passes(&self) -> u64 {
        self.ban_passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Purges pending for the disk tier, and the bytes they take.
    pub fn pending_purges(&self) -> (usize, u64) {
        (self.bans.len(), self.bans.bytes())
    }

    /// The key a request's response is stored under: the URL key itself, or, when that URL's
    /// responses vary (RFC 9111 §4.1), the variant named by the request's values of the
    /// fields they vary on (normalised by [`vary::variant_key`]).
    pub fn variant(&self, base: &ObjectKey, request: &http::HeaderMap) -> ObjectKey {
        match self.tables.vary(base) {
            Some(marker) => Self::variant_of(base, &marker, request),
            None => base.clone(),
        }
    }

    /// The variant a request selects by its own fields, and the one its fill fetches (by the
    /// fields the fill forwards), with one lookup: the same key unless the URL's responses
    /// vary on a field fills do not send.
    pub fn variants(
        &self,
        base: &ObjectKey,
        request: &http::HeaderMap,
        forwarded: &http::HeaderMap,
    ) -> (ObjectKey, ObjectKey) {
        match self.tables.vary(base) {
            Some(marker) => (
                Self::variant_of(base, &marker, request),
                Self::variant_of(base, &marker, forwarded),
            ),
            None => (base.clone(), base.clone()),
        }
    }

    fn variant_of(base: &ObjectKey, marker: &VaryMarker, request: &http::HeaderMap) -> ObjectKey {
        let values = vary::variant_key(&marker.fields, request);
        let digest = blake3::hash(values.as_bytes());
        let hex = super::key::lower_hex(&digest.as_bytes()[..12]);
        ObjectKey(format!("{}#vary-{:x}-{hex}", base.as_str(), marker.nonce).into())
    }

    /// A response for `base` varies on `fields`: remember it (keeping the marker when the
    /// fields are the same) and return the variant key for `request`.
    pub fn learn_vary(
        &self,
        base: &ObjectKey,
        fields: Vec<String>,
        request: &http::HeaderMap,
    ) -> ObjectKey {
        let marker = match self.tables.vary(base) {
            Some(m) if m.fields == fields => m,
            _ => {
                let m = Arc::new(VaryMarker::new(fields));
                self.tables.insert_vary(base, m.clone());
                m
            }
        };
        Self::variant_of(base, &marker, request)
    }

    /// Remember for a while that `key` is not cacheable (`reason` for logs).
    pub fn mark_uncacheable(&self, key: &ObjectKey, reason: &'static str) {
        log::debug!(
            "{}: not cacheable ({reason}), passed for a while",
            key.as_str()
        );
        self.tables.mark_pass(key);
    }

    pub fn is_marked_uncacheable(&self, key: &ObjectKey) -> bool {
        self.tables.is_pass(key)
    }

    /// The shard of the object-lock map holding `key`'s mutex.
    fn object_lock_shard(
        &self,
        key: &ObjectKey,
    ) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, ObjectSlot>> {
        let i = (self.flights_hash(key) as usize) % self.object_locks.len();
        self.object_locks[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The lock of one object, made on first use (its `ObjectLock` removes it when unused).
    fn object_slot(&self, key: &ObjectKey) -> ObjectSlot {
        self.object_lock_shard(key)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    fn object_lock(
        self: &Arc<Self>,
        key: &ObjectKey,
        slot: ObjectSlot,
        guard: Option<tokio::sync::OwnedMutexGuard<()>>,
        lane: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> ObjectLock {
        ObjectLock {
            cache: self.clone(),
            key: key.clone(),
            lock: slot.mutex,
            asking_peer: slot.asking_peer,
            _guard: guard,
            _lane: lane,
        }
    }

    /// The object's lock once taken: first wait for the peers' requests that went on while
    /// the previous holder waited on a peer, so that what they learn (the metadata, and the
    /// fills they claimed) is found rather than fetched again.
    async fn locked(
        self: &Arc<Self>,
        key: &ObjectKey,
        slot: ObjectSlot,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) -> ObjectLock {
        drop(slot.peer_lane.lock().await);
        self.object_lock(key, slot, Some(guard), None)
    }

    /// Serialise discovery and revalidation of one object, so concurrent cold requests make
    /// one origin request for its metadata.
    pub async fn lock_object(self: &Arc<Self>, key: &ObjectKey) -> ObjectLock {
        let slot = self.object_slot(key);
        let guard = slot.mutex.clone().lock_owned().await;
        self.locked(key, slot, guard).await
    }

    /// The object's lock for a request a peer of the cluster sent: as [`lock_object`], except
    /// that while the holder waits on a peer, the request goes on without the lock (the
    /// returned lock holds nothing). The holder may be waiting on this very request, or on
    /// one waiting on it (node A discovering an object asks B for a shard B owns, while B
    /// discovering it asks A): waiting would end only at `cluster.peer_timeout`. The two
    /// discoveries then ask for different shards, each of its own owner.
    ///
    /// The peers' requests that go on so take the object's peer lane, one at a time (a
    /// request filled here never waits on a peer, so the lane is always let go), and whoever
    /// takes the lock next waits for the lane: two peers asking for the same shard, or this
    /// node's own waiting requests, find what the first one learnt instead of fetching the
    /// same chunks again.
    ///
    /// [`lock_object`]: ChunkCache::lock_object
    pub async fn lock_object_for_peer(self: &Arc<Self>, key: &ObjectKey) -> ObjectLock {
        let slot = self.object_slot(key);
        loop {
            if let Ok(guard) = slot.mutex.clone().try_lock_owned() {
                return self.locked(key, slot, guard).await;
            }
            if slot.asking_peer.load(Ordering::Acquire) {
                let lane = slot.peer_lane.clone().lock_owned().await;
                return self.object_lock(key, slot, None, Some(lane));
            }
            if let Ok(guard) =
                tokio::time::timeout(PEER_LOCK_POLL, slot.mutex.clone().lock_owned()).await
            {
                return self.locked(key, slot, guard).await;
            }
        }
    }

    /// The object's lock if nobody holds it (a background revalidation runs only when no
    /// other discovery or revalidation of the object does).
    pub fn try_lock_object(self: &Arc<Self>, key: &ObjectKey) -> Option<ObjectLock> {
        let slot = self.object_slot(key);
        let guard = slot.mutex.clone().try_lock_owned().ok();
        // Built even when the lock is taken, so its Drop tidies the map entry made above.
        let held = self.object_lock(key, slot, guard, None);
        held._guard.is_some().then_some(held)
    }

    fn flights_hash(&self, key: &ObjectKey) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
    }

    // ---- chunks ---------------------------------------------------------------------------

    pub fn memory_chunk(&self, id: &ChunkKey) -> Option<Bytes> {
        self.memory.get(id)
    }

    /// Let go of a chunk in memory, as the tier's eviction does (tests).
    #[cfg(test)]
    pub fn evict_memory_chunk(&self, id: &ChunkKey) {
        self.memory.invalidate(id);
    }

    /// Whether the chunk is held by a tier (memory, or the disk index) without reading it.
    pub fn has_chunk(&self, version: &ObjectVersion, index: u64) -> bool {
        self.memory.contains_key(&version.chunk(index))
            || self.disk.as_ref().is_some_and(|d| {
                d.contains(&version.key.chunk_entry(index), Some(&version.validator))
            })
    }

    /// Read a chunk from disk; a hit is promoted to memory. `expected_len` guards against a
    /// file of the right version but wrong size (never served).
    pub async fn disk_chunk(
        &self,
        version: &ObjectVersion,
        index: u64,
        expected_len: u64,
    ) -> Option<Bytes> {
        let disk = self.disk.as_ref()?;
        let entry = version.key.chunk_entry(index);
        let data = disk.get(&entry, Some(&version.validator)).await?;
        if data.len() as u64 != expected_len {
            disk.remove(&entry).await;
            return None;
        }
        self.insert_chunk(version.chunk(index), data.clone());
        Some(data)
    }

    /// Evict a chunk from the memory tier (tests: an eviction on demand).
    #[cfg(test)]
    pub fn forget_chunk_for_test(&self, version: &ObjectVersion, index: u64) {
        self.memory.invalidate(&version.chunk(index));
    }

    fn insert_chunk(&self, id: ChunkKey, data: Bytes) {
        let weight = tables::chunk_weight(&data);
        self.memory.insert_weighed(id, data, weight);
    }

    /// Keep a completed chunk: memory now, disk in the background through the disk tier's
    /// bounded write queue. When the disk is behind (or paused after a write error) the disk
    /// copy is skipped and counted, never queued without bound: see
    /// [`DiskStore::put_in_background`].
    pub fn store_chunk(&self, version: &ObjectVersion, index: u64, data: Bytes) {
        self.keep_chunk(version, index, data, Keep::All);
    }

    /// Keep a completed chunk in the tiers `keep` names (a chunk a peer owns is kept as
    /// `cluster.keep_copies` says).
    pub fn keep_chunk(&self, version: &ObjectVersion, index: u64, data: Bytes, keep: Keep) {
        if keep == Keep::Nothing {
            return;
        }
        self.insert_chunk(version.chunk(index), data.clone());
        if keep == Keep::Memory {
            return;
        }
        if let Some(disk) = &self.disk {
            disk.put_in_background(
                version.key.chunk_entry(index),
                Some(&version.validator),
                data,
            );
        }
    }

    /// Wait for a fill slot. An origin transfer into the cache holds one from before its
    /// request until its last byte: at most the pieces of one chunk plus the chunk being
    /// assembled, so fills hold at most `cache.max_concurrent_fills` × 2 × `chunk_size` of
    /// memory however many run or wait. `None` only if the slots were closed (never).
    pub async fn fill_slot(&self) -> Option<FillSlot> {
        self.fill_slots.clone().acquire_owned().await.ok()
    }

    /// A fill slot if one is free now, without waiting: a background revalidation takes one
    /// or does not start, so at most `cache.max_concurrent_fills` of them run at once.
    pub fn try_fill_slot(&self) -> Option<FillSlot> {
        self.fill_slots.clone().try_acquire_owned().ok()
    }

    /// Charge `bytes` more to the staging budget of streamed fills (see
    /// `fill::discover`), added to `held`; `false` (nothing charged) when the budget is spent.
    /// The bytes are given back when `held` is dropped.
    pub fn stage(&self, held: &mut Option<tokio::sync::OwnedSemaphorePermit>, bytes: u64) -> bool {
        let Ok(n) = u32::try_from(bytes) else {
            return false;
        };
        match self.stage.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The staging budget of streamed fills, in bytes: the most one such object may be to be
    /// cached (with `max_object_size`).
    pub fn stage_capacity(&self) -> u64 {
        self.stage_capacity
    }

    /// Bytes staged by streamed fills right now.
    pub fn staged_bytes(&self) -> u64 {
        self.stage_capacity
            .saturating_sub(self.stage.available_permits() as u64)
    }

    /// Fill slots not taken right now.
    pub fn free_fill_slots(&self) -> usize {
        self.fill_slots.available_permits()
    }

    /// Run a cache task in the background, tracked so shutdown can wait for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Background cache tasks still running.
    pub fn running_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// At shutdown: let running fills finish, then the disk writes they queued, within
    /// `timeout` in all. Returns whether everything finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        self.tasks.close();
        if tokio::time::timeout_at(until, self.tasks.wait())
            .await
            .is_err()
        {
            return false;
        }
        match &self.disk {
            Some(disk) => {
                disk.drain(until.saturating_duration_since(tokio::time::Instant::now()))
                    .await
            }
            None => true,
        }
    }

    /// Join or start the fill of a chunk; see [`FlightMap::join_or_start`].
    pub fn join_fill(&self, id: &ChunkKey) -> Joined {
        self.flights.join_or_start(id, || self.memory.get(id))
    }

    // ---- introspection (tests, metrics) ---------------------------------------------------

    pub fn memory_weight(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// The budget of chunk bytes held by responses in flight (see `cache::held`).
    pub fn response_budget(&self) -> &Arc<ResponseBudget> {
        &self.responses
    }

    pub fn memory_capacity(&self) -> u64 {
        self.memory.capacity()
    }

    /// Bytes held by the metadata table (metadata, hit-for-pass marks, Vary markers).
    pub fn metadata_bytes(&self) -> u64 {
        self.tables.weighted_size()
    }

    pub fn metadata_capacity(&self) -> u64 {
        self.tables.capacity()
    }

    /// Bytes the disk tier's index takes in memory (0 without a disk tier).
    pub fn disk_index_bytes(&self) -> u64 {
        self.disk.as_ref().map(|d| d.index_bytes()).unwrap_or(0)
    }

    /// What the disk index has allocated (0 without a disk tier).
    pub fn disk_index_resident_bytes(&self) -> u64 {
        self.disk
            .as_ref()
            .map(|d| d.index_resident_bytes())
            .unwrap_or(0)
    }

    /// Entries in the disk index.
    pub fn disk_entries(&self) -> u64 {
        self.disk
            .as_ref()
            .map(|d| d.entry_count() as u64)
            .unwrap_or(0)
    }

    /// Whether the disk index is still loading (false without a disk tier).
    pub fn disk_index_loading(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.is_loading())
    }

    /// Entries the disk index load has indexed so far.
    pub fn disk_index_loaded_entries(&self) -> u64 {
        self.disk.as_ref().map(|d| d.loaded_entries()).unwrap_or(0)
    }

    /// At a clean shutdown, after [`ChunkCache::drain`]: write the disk index's snapshot
    /// (blocking; see [`DiskStore::save_snapshot`]). Nothing without a disk tier.
    pub fn save_disk_index(&self) -> std::io::Result<()> {
        match &self.disk {
            Some(d) => d.save_snapshot(),
            None => Ok(()),
        }
    }

    pub fn disk_index_capacity(&self) -> u64 {
        self.disk.as_ref().map(|d| d.index_capacity()).unwrap_or(0)
    }

    pub fn disk_capacity(&self) -> u64 {
        self.disk.as_ref().map(|d| d.capacity()).unwrap_or(0)
    }

    pub fn disk_used(&self) -> u64 {
        self.disk.as_ref().map(|d| d.used_bytes()).unwrap_or(0)
    }

    /// Disk writes that failed with an I/O error (see [`DiskStore::write_errors`]).
    pub fn disk_write_errors(&self) -> u64 {
        self.disk.as_ref().map(|d| d.write_errors()).unwrap_or(0)
    }

    /// Disk writes skipped: queue full or writes paused (see [`DiskStore::writes_skipped`]).
    pub fn disk_writes_skipped(&self) -> u64 {
        self.disk.as_ref().map(|d| d.writes_skipped()).unwrap_or(0)
    }
}

/// Held while discovering or revalidating an object; on drop the per-object entry is removed
/// when nobody else waits on it.
pub struct ObjectLock {
    cache: Arc<ChunkCache>,
    key: ObjectKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    asking_peer: Arc<AtomicBool>,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Held by a peer's request that went on while the holder waited on a peer.
    _lane: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ObjectLock {
    /// Set while the holder's fetch waits on a peer (see
    /// [`ChunkCache::lock_object_for_peer`]).
    pub fn asking_peer(&self) -> Arc<AtomicBool> {
        self.asking_peer.clone()
    }
}

impl Drop for ObjectLock {
    fn drop(&mut self) {
        self._guard.take();
        self._lane.take();
        let mut shard = self.cache.object_lock_shard(&self.key);
        // Two references: the map's and ours. More means someone else waits: leave it.
        if Arc::strong_count(&self.lock) <= 2 {
            shard.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskSettings;

    fn cache_on_disk(dir: &std::path::Path) -> ChunkCache {
        cache_with_metadata(dir, 1 << 20)
    }

    fn cache_with_metadata(dir: &std::path::Path, metadata_capacity: u64) -> ChunkCache {
        ChunkCache::new(&CacheSettings {
            chunk_size: 1000,
            max_object_size: 1 << 20,
            default_ttl: None,
            heuristic_fraction: 0.0,
            heuristic_max: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            max_ranges: 16,
            max_concurrent_fills: 4,
            memory_capacity: 1 << 20,
            response_budget: 64 << 20,
            metadata_capacity,
            disk: Some(DiskSettings {
                path: dir.join("cache"),
                capacity: 1 << 20,
                index_capacity: 1 << 20,
            }),
        })
        .unwrap()
    }

    fn meta(validator: &str) -> Arc<ObjectMeta> {
        Arc::new(ObjectMeta {
            status: 200,
            size: 3000,
            validator: validator.into(),
            etag: Some(validator.into()),
            last_modified: None,
            headers: Vec::new(),
            stored_at: SystemTime::now(),
            initial_age: 0,
            fresh_until: SystemTime::now() + Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            stale_while_revalidate: Duration::ZERO,
            wire: Default::default(),
        })
    }

    async fn store_object(cache: &ChunkCache, key: &ObjectKey, meta: &Arc<ObjectMeta>) {
        cache.put_meta(key, meta.clone()).await;
        let version = ObjectVersion::new(key.clone(), meta.validator.as_str().into());
        for index in 0..3 {
            cache.store_chunk(&version, index, Bytes::from(vec![index as u8; 1000]));
        }
        assert!(cache.drain(Duration::from_secs(10)).await);
    }

    fn tagged(validator: &str, surrogate_key: &str) -> Arc<ObjectMeta> {
        let mut m = (*meta(validator)).clone();
        m.headers = vec![("surrogate-key".into(), surrogate_key.into())];
        Arc::new(m)
    }

    fn purge(q: &str) -> Arc<Purge> {
        Arc::new(Purge::from_query(Some(q)).unwrap())
    }

    /// Purge `q` and wait for the disk tier's pass: how many objects it took.
    async fn purged(cache: &Arc<ChunkCache>, q: &str) -> u64 {
        match cache.purge(&purge(q), Duration::from_secs(30)).await {
            PurgeOutcome::Done(n) => n,
            PurgeOutcome::Pending { .. } => panic!("{q}: the pass did not end"),
            PurgeOutcome::Busy => panic!("{q}: busy"),
        }
    }

    /// Purge `q` while no pass can run (the test holds the claim): the ban is pending.
    async fn banned(cache: &Arc<ChunkCache>, q: &str) -> Arc<Ban> {
        match cache.purge(&purge(q), Duration::ZERO).await {
            PurgeOutcome::Pending { ban, .. } => ban,
            _ => panic!("{q}: not pending"),
        }
    }

    #[tokio::test]
    async fn a_pending_ban_keeps_a_disk_only_object_from_being_served_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            ObjectKey("o|h|/v/a.ts".into()),
            ObjectKey("o|h|/w/b.ts".into()),
        );
        {
            let cache = cache_on_disk(dir.path());
            store_object(&cache, &a, &tagged("\"a\"", "red")).await;
            store_object(&cache, &b, &tagged("\"b\"", "blue")).await;
        }
        {
            let cache = Arc::new(cache_on_disk(dir.path()));
            // Nothing in memory: the purge's answer finds nothing yet, the ban is pending.
            assert!(cache.bans.is_empty());
            cache
                .bans
                .add(purge("tag=none"), SystemTime::now())
                .unwrap();
            assert!(cache.bans.claim_pass(), "the test holds the pass");
            let ban = banned(&cache, "path=/v/&prefix=1").await;
            assert_eq!(ban.applied(), 0, "a is only on disk");
            assert!(dir
                .path()
                .join("cache")
                .join(super::super::bans::FILE)
                .exists());
        }
        // A restart: the ban is read back, and a lookup of a meets it before any pass.
        let cache = Arc::new(cache_on_disk(dir.path()));
        assert_eq!(cache.bans.len(), 2);
        assert!(cache.bans.claim_pass(), "the test holds the pass");
        assert!(cache.meta(&a).await.is_none(), "banned: never served");
        assert!(cache.meta(&b).await.is_some(), "not named");
        // Objects stored after the ban are not its business.
        let fresh = tagged("\"a2\"", "red");
        let mut later = (*fresh).clone();
        later.stored_at = SystemTime::now() + Duration::from_secs(2);
        store_object(&cache, &a, &Arc::new(later)).await;
        cache.tables.remove_meta(&a);
        assert!(cache.meta(&a).await.is_some(), "stored after the ban");
        // The pass runs: every ban retires, the file goes.
        cache.bans.release_pass();
        cache.start_ban_passes();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cache.bans.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the pass did not end");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!dir
            .path()
            .join("cache")
            .join(super::super::bans::FILE)
            .exists());
    }

    #[tokio::test]
    async fn purges_made_while_a_pass_runs_share_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<ObjectKey> = (0..40)
            .map(|i| ObjectKey(format!("o|h|/p/{i}").into()))
            .collect();
        {
            let cache = cache_on_disk(dir.path());
            for k in &keys {
                store_object(&cache, k, &meta("\"v\"")).await;
            }
        }
        let cache = Arc::new(cache_on_disk(dir.path()));
        cache
            .bans
            .add(purge("tag=none"), SystemTime::now())
            .unwrap();
        assert!(cache.bans.claim_pass(), "the test holds the pass");
        let bans: Vec<Arc<Ban>> = {
            let mut v = Vec::new();
            for i in 0..20 {
                v.push(banned(&cache, &format!("path=/p/{i}")).await);
            }
            v
        };
        cache.bans.release_pass();
        cache.start_ban_passes();
        for b in &bans {
            tokio::time::timeout(Duration::from_secs(10), b.retired())
                .await
                .expect("retired");
            assert_eq!(b.applied(), 1);
        }
        assert_eq!(
            cache.ban_passes(),
            1,
            "twenty purges, one pass over the disk"
        );
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(cache.meta(k).await.is_some(), i >= 20, "{k:?}");
        }
    }

    #[tokio::test]
    async fn a_full_ban_list_refuses_a_purge_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache_on_disk(dir.path()));
        let a = ObjectKey("o|h|/v/a.ts".into());
        store_object(&cache, &a, &meta("\"a\"")).await;
        cache
            .bans
            .add(purge("tag=none"), SystemTime::now())
            .unwrap();
        assert!(cache.bans.claim_pass(), "the test holds the pass");
        let long = format!("path=/{}&prefix=1", "x".repeat(60_000));
        while cache.bans.add(purge(&long), SystemTime::now()).is_ok() {}
        while cache
            .bans
            .add(purge("path=/v/a.ts"), SystemTime::now())
            .is_ok()
        {}
        assert!(matches!(
            cache.purge(&purge("path=/v/a.ts"), Duration::ZERO).await,
            PurgeOutcome::Busy
        ));
        assert!(
            cache.meta(&a).await.is_some(),
            "a busy purge purges nothing"
        );
    }

    #[tokio::test]
    async fn hard_purge_drops_metadata_disk_object_and_memory_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache_on_disk(dir.path()));
        let a = ObjectKey("o|h|/v/a.ts".into());
        let b = ObjectKey("o|h|/v/b.ts".into());
        let m = meta("\"v1\"");
        store_object(&cache, &a, &m).await;
        store_object(&cache, &b, &m).await;
        let b_bytes = cache.disk_used() / 2;
        assert_eq!(purged(&cache, "path=/v/a.ts").await, 1);
        assert!(cache.meta(&a).await.is_none());
        let version = ObjectVersion::new(a.clone(), m.validator.as_str().into());
        for index in 0..3 {
            assert!(!cache.has_chunk(&version, index), "chunk {index} of a");
        }
        assert_eq!(cache.disk_used(), b_bytes, "a's files gone, b's kept");
        let kept = ObjectVersion::new(b.clone(), m.validator.as_str().into());
        assert!(cache.memory_chunk(&kept.chunk(2)).is_some());
        assert!(cache.meta(&b).await.is_some());
        assert_eq!(purged(&cache, "path=/v/a.ts").await, 0, "nothing left");
    }

    #[tokio::test]
    async fn purge_finds_objects_only_on_disk_and_counts_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            ObjectKey("o|h|/v/a.ts".into()),
            ObjectKey("o|h|/v/b.ts?x=1#vary-1-ab".into()),
            ObjectKey("o|h2|/w/c".into()),
        );
        {
            let cache = cache_on_disk(dir.path());
            store_object(&cache, &a, &tagged("\"a\"", "video ep-1")).await;
            store_object(&cache, &b, &tagged("\"b\"", "video")).await;
            store_object(&cache, &c, &tagged("\"c\"", "other")).await;
        }
        // Over the same directory, as after a restart: nothing in memory but what is read.
        let cache = Arc::new(cache_on_disk(dir.path()));
        assert!(cache.meta(&b).await.is_some(), "b in memory and on disk");
        let now = SystemTime::now();

        assert_eq!(purged(&cache, "path=/v/&prefix=1&soft=1").await, 2);
        for key in [&a, &b] {
            let m = cache.meta(key).await.expect("soft purge keeps the object");
            assert!(!m.is_fresh(SystemTime::now()), "{key:?} stale");
            assert!(m.fresh_until >= now - Duration::from_secs(1));
        }
        assert!(cache.meta(&c).await.unwrap().is_fresh(SystemTime::now()));

        assert_eq!(purged(&cache, "tag=VIDEO&host=h").await, 2);
        assert!(cache.meta(&a).await.is_none());
        assert!(cache.meta(&b).await.is_none());
        assert_eq!(purged(&cache, "tag=ep-1").await, 0);
        assert_eq!(purged(&cache, "path=/w/c&host=h").await, 0, "other host");
        assert_eq!(purged(&cache, "path=/w/c&host=H2").await, 1);
        assert_eq!(cache.disk_used(), 0, "every file gone");
    }

    #[tokio::test]
    async fn metadata_evicted_from_memory_is_found_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB of metadata table; 300 objects of about 1.5 KiB of metadata each.
        let cache = Arc::new(cache_with_metadata(dir.path(), 64 << 10));
        let keys: Vec<ObjectKey> = (0..300)
            .map(|i| ObjectKey(format!("o|h|/many/{i}/{}", "u".repeat(200)).into()))
            .collect();
        let mut metas = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let mut m = (*meta(&format!("\"v{i}\""))).clone();
            m.headers = vec![
                ("x-pad".into(), "p".repeat(300)),
                ("x-n".into(), i.to_string()),
            ];
            let m = Arc::new(m);
            cache.put_meta(key, m.clone()).await;
            metas.push(m);
        }
        assert!(
            cache.metadata_bytes() <= 64 << 10,
            "{}",
            cache.metadata_bytes()
        );
        let in_memory = keys
            .iter()
            .filter(|k| cache.tables.meta(k).is_some())
            .count();
        assert!(in_memory < 100, "{in_memory} of 300 in memory");
        // Every object is still known, from disk, exactly as stored.
        for (key, m) in keys.iter().zip(&metas) {
            let found = cache.meta(key).await.expect("found on disk");
            assert_eq!(found.validator, m.validator);
            assert_eq!(found.headers, m.headers);
        }
    }

    #[tokio::test]
    async fn invalidate_and_forget_drop_the_whole_object_on_disk_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache_on_disk(dir.path()));
        let key = ObjectKey("o|h|/a".into());
        let other = ObjectKey("o|h|/b".into());
        let v1 = meta("\"v1\"");
        store_object(&cache, &other, &v1).await;
        let other_bytes = cache.disk_used();
        store_object(&cache, &key, &v1).await;
        assert!(cache.disk_used() > other_bytes);

        cache.invalidate(&key, &v1).await;
        assert_eq!(cache.disk_used(), other_bytes, "metadata and chunks gone");
        assert!(cache.meta(&key).await.is_none());
        let version = ObjectVersion::new(key.clone(), v1.validator.as_str().into());
        assert!(cache.disk_chunk(&version, 1, 1000).await.is_none());

        store_object(&cache, &key, &meta("\"v2\"")).await;
        cache.forget(&key).await;
        assert_eq!(cache.disk_used(), other_bytes);
        assert!(cache.meta(&other).await.is_some(), "other objects stay");
        assert_eq!(cache.disk_write_errors(), 0);
        assert_eq!(cache.disk_writes_skipped(), 0);
    }

    /// A peer's request goes on while the holder waits on a peer (or the two nodes would wait
    /// on each other until `peer_timeout`), but peers' requests that go on take the lane one
    /// at a time, and whoever takes the lock next waits for the lane: none of them fetches
    /// again what the one before is learning.
    #[tokio::test]
    async fn peer_requests_pass_a_holder_asking_a_peer_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache_on_disk(dir.path()));
        let key = ObjectKey("http://h/obj".into());
        let holder = cache.lock_object(&key).await;
        let short = Duration::from_millis(100);

        // The holder does not wait on a peer: a peer's request waits for it.
        assert!(
            tokio::time::timeout(short, cache.lock_object_for_peer(&key))
                .await
                .is_err()
        );

        // It does: the first peer's request goes on, in the lane.
        holder.asking_peer().store(true, Ordering::Release);
        let first = tokio::time::timeout(short, cache.lock_object_for_peer(&key))
            .await
            .expect("a peer's request passes a holder asking a peer");
        // A second one waits for the first.
        let second = tokio::spawn({
            let (cache, key) = (cache.clone(), key.clone());
            async move { cache.lock_object_for_peer(&key).await }
        });
        tokio::time::sleep(short).await;
        assert!(
            !second.is_finished(),
            "two peers' requests in the lane at once"
        );

        // The holder lets go: the next holder (this node's own waiting request) waits for the
        // lane too.
        holder.asking_peer().store(false, Ordering::Release);
        drop(holder);
        let next = tokio::spawn({
            let (cache, key) = (cache.clone(), key.clone());
            async move { cache.lock_object(&key).await }
        });
        tokio::time::sleep(short).await;
        assert!(
            !next.is_finished(),
            "the lock was taken while a peer's request was in the lane"
        );

        drop(first);
        // The second peer's request (lane, or the lock now free) and then the next holder.
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second peer's request goes on once the first is done")
            .unwrap();
        drop(second);
        let next = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the next holder goes on once the lane is free")
            .unwrap();
        drop(next);
        // Everything let go: the object's entry is gone from the map.
        assert!(cache.object_lock_shard(&key).get(&key).is_none());
    }
}
