//! The weights the cache's tables charge cover what their entries really take from the
//! allocator (issue 20, C.11): the metadata table (object metadata, hit-for-pass marks, Vary
//! markers), the chunks of the memory tier and the disk tier's index. Every allocation of this
//! test binary is counted, rounded up to jemalloc's size class (`cache::tables::alloc_size`,
//! the allocator the proxy runs on), so "what the table holds" is measured, not estimated.
//!
//! Each test fills a table far below its capacity (nothing evicted), then compares the bytes
//! still allocated with the sum of the weights charged. A weight below the real cost would let
//! a table hold more than its capacity in memory: the tests fail if any weight falls short, or
//! if the weights overcharge by more than half (a table holding far less than it may).
//!
//! Also the measurement behind the fixed overheads (`ENTRY_OVERHEAD`, `CHUNK_ENTRY_OVERHEAD`,
//! `INDEX_ENTRY_BYTES`, `INDEX_OBJECT_BYTES`): run with `--nocapture` to see the figures.

use bytes::{Bytes, BytesMut};
use edgeslice::cache::disk::DiskStore;
use edgeslice::cache::key::{ObjectKey, ObjectVersion};
use edgeslice::cache::meta::ObjectMeta;
use edgeslice::cache::store::{ChunkCache, VaryMarker};
use edgeslice::cache::tables::{alloc_size, chunk_weight, ObjectTables};
use edgeslice::config::CacheSettings;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The system allocator, counting the bytes live as jemalloc would allocate them.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

fn class(n: usize) -> i64 {
    alloc_size(n as u64) as i64
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(class(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(class(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(class(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(class(new_size) - class(layout.size()), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is process-wide: one measurement at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> i64 {
    LIVE.load(Ordering::SeqCst)
}

/// Checks `real` (bytes still allocated) against `charged` (the weights), and prints both.
fn assert_covered(what: &str, entries: u64, real: i64, charged: u64) {
    let real = real.max(0) as u64;
    eprintln!(
        "{what}: {entries} entries, {real} bytes allocated ({} per entry), {charged} charged ({} per entry), charged/real {:.2}",
        real / entries.max(1),
        charged / entries.max(1),
        charged as f64 / real.max(1) as f64
    );
    assert!(
        charged >= real,
        "{what}: {charged} bytes charged for {real} bytes allocated"
    );
    assert!(
        charged <= real + real / 2,
        "{what}: {charged} bytes charged for {real} bytes allocated: overcharged"
    );
}

/// A URL key of about `len` bytes, distinct for each `i`.
fn key(i: usize, len: usize) -> ObjectKey {
    let head = format!("origin|example.com|/v/{i}/");
    ObjectKey(format!("{head}{}", "p".repeat(len.saturating_sub(head.len()))).into())
}

/// Metadata with `fields` stored fields of about `field_len` bytes each.
fn meta(i: usize, fields: usize, field_len: usize) -> ObjectMeta {
    ObjectMeta {
        status: 200,
        size: 100,
        validator: format!("\"v{i}\""),
        etag: Some(format!("\"v{i}\"")),
        last_modified: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
        headers: (0..fields)
            .map(|f| (format!("x-field-{f}"), "v".repeat(field_len)))
            .collect(),
        stored_at: SystemTime::now(),
        initial_age: 0,
        fresh_until: SystemTime::now() + Duration::from_secs(3600),
        stale_if_error: Duration::ZERO,
        must_revalidate: false,
        stale_while_revalidate: Duration::ZERO,
        wire: Default::default(),
    }
}

/// What serving the object does to its metadata: the parsed fields are built and cloned
/// (a clone makes each `Bytes` allocate its shared header).
fn serve(meta: &ObjectMeta) {
    let wire = meta.wire();
    let fields: Vec<_> = wire.fields.to_vec();
    let length = wire.length.clone();
    drop((fields, length));
}

#[test]
fn metadata_weights_cover_keys_stored_headers_and_moka() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let table = ObjectTables::new(1 << 40);
    // Warm moka's shards (their first allocations are not per entry).
    for i in 0..1_000 {
        table.insert_meta(&key(i, 50), Arc::new(meta(i, 1, 10)));
    }
    table.weighted_size();
    let before = live();
    let mut charged = 0;
    let n = 6_000;
    for i in 0..n {
        // URLs from 60 bytes to 8 KiB, from no stored field to 64 fields of 120 bytes (8 KiB).
        let k = key(1_000 + i, 60 + (i * 37) % 8192);
        let m = Arc::new(meta(i, i % 65, 120));
        serve(&m);
        charged += ObjectTables::meta_weight(&k, &m);
        table.insert_meta(&k, m);
    }
    table.weighted_size();
    let real = live() - before;
    assert_eq!(table.entry_count(), 1_000 + n as u64, "nothing evicted");
    assert_covered("metadata", n as u64, real, charged);
}

#[test]
fn hit_for_pass_and_vary_weights_cover_what_they_hold() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let table = ObjectTables::new(1 << 40);
    for i in 0..1_000 {
        table.mark_pass(&key(i, 50));
    }
    table.weighted_size();
    let n = 40_000;

    let before = live();
    let mut charged = 0;
    for i in 0..n {
        let k = key(1_000 + i, 16 + (i * 53) % 4096);
        charged += ObjectTables::pass_weight(&k);
        table.mark_pass(&k);
    }
    table.weighted_size();
    assert_covered("hit-for-pass", n as u64, live() - before, charged);

    let before = live();
    let mut charged = 0;
    for i in 0..n {
        let k = key(100_000 + i, 16 + (i * 53) % 4096);
        let fields = (0..1 + i % 8).map(|f| format!("x-vary-{f}")).collect();
        let marker = Arc::new(VaryMarker::new(fields));
        charged += ObjectTables::vary_weight(&k, &marker);
        table.insert_vary(&k, marker);
    }
    table.weighted_size();
    assert_covered("vary", n as u64, live() - before, charged);
}

fn memory_only(capacity: u64) -> ChunkCache {
    ChunkCache::new(&CacheSettings {
        chunk_size: 1 << 20,
        max_object_size: 1 << 30,
        default_ttl: None,
        heuristic_fraction: 0.0,
        heuristic_max: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        max_ranges: 16,
        max_concurrent_fills: 4,
        memory_capacity: capacity,
        response_budget: 64 << 20,
        metadata_capacity: 1 << 20,
        disk: None,
    })
    .expect("a memory-only cache")
}

#[test]
fn chunk_weights_cover_tiny_chunks_and_their_bookkeeping() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cache = memory_only(1 << 40);
    let version = |i: usize| ObjectVersion::new(key(i, 40), "\"v\"".into());
    for i in 0..1_000 {
        cache.store_chunk(&version(i), 0, Bytes::from_static(b"warm"));
    }
    let held_before = cache.memory_weight();
    let versions: Vec<ObjectVersion> = (1_000..41_000).map(version).collect();
    let before = live();
    let mut charged = 0;
    for (i, v) in versions.iter().enumerate() {
        // As a fill assembles a chunk: a buffer of the chunk's size, frozen, one clone handed
        // to the flight.
        let len = 1 + (i * 31) % 2000;
        let mut acc = BytesMut::with_capacity(len);
        acc.extend_from_slice(&vec![7u8; len]);
        let chunk = acc.freeze();
        let flight_copy = chunk.clone();
        charged += chunk_weight(&chunk);
        cache.store_chunk(v, 0, chunk);
        drop(flight_copy);
    }
    let held = cache.memory_weight() - held_before;
    let real = live() - before;
    assert_eq!(held, charged, "the tier holds what was charged");
    assert_covered("memory-tier chunks", versions.len() as u64, real, charged);
}

#[test]
fn disk_index_weights_cover_entries_and_objects() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = DiskStore::open_bounded(&dir.path().join("cache"), 1 << 40, 1 << 40)
            .expect("disk tier");
        let data = Bytes::from_static(b"x");
        // Warm the blocking pool and the index.
        for i in 0..200 {
            store.put(&format!("w{i}\0meta"), None, data.clone()).await;
        }
        let index_before = store.index_bytes();
        let before = live();
        // Objects of one entry (metadata only) and of two to four (metadata and chunks).
        let n = 3_000;
        for i in 0..n {
            let object = format!("o|h|/{i}");
            store
                .put(&format!("{object}\0meta"), None, data.clone())
                .await;
            for c in 0..i % 4 {
                store
                    .put(&format!("{object}\0chunk\0{c}"), Some("v"), data.clone())
                    .await;
            }
        }
        let real = live() - before;
        let charged = store.index_bytes() - index_before;
        assert_covered("disk index", store.entry_count() as u64, real, charged);
    });
}

/// The measurement behind the fixed overheads (`cargo test --test table_weights
/// table_fixed -- --nocapture` prints it): what a table costs made empty, what it costs at
/// some sizes, and the cost of each entry from 10,000 to 100,000 of them (the
/// per-entry overhead; below that, moka's shards and the hash tables' first allocations add a
/// fixed part of about 1 MiB). Checked: that fixed part, for each table, is within
/// [`TABLE_FIXED`], which the README's memory bound counts.
#[test]
fn table_fixed_overheads_are_within_what_the_bound_counts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let n = 100_000;
    let keys: Vec<ObjectKey> = (0..n).map(|i| key(i, 40)).collect();
    let versions: Vec<ObjectVersion> = keys
        .iter()
        .map(|k| ObjectVersion::new(k.clone(), "\"v\"".into()))
        .collect();
    let chunks: Vec<Bytes> = (0..n).map(|_| Bytes::from(b"12345678".to_vec())).collect();
    let report = |what: &str, costs: &[(usize, i64)], fixed: i64| {
        let at = |n: usize| costs.iter().find(|(i, _)| *i == n).map_or(0, |(_, c)| *c);
        let marginal = (at(100_000) - at(10_000)) / 90_000;
        eprintln!("{what}: {fixed} B made empty, {costs:?} (entries, B); {marginal} B per entry from 10,000 to 100,000");
        // What the table costs beyond its entries: made empty, and at 10,000 entries less
        // their per-entry cost.
        let fixed_part = fixed.max(at(10_000) - 10_000 * marginal);
        assert!(
            fixed_part <= TABLE_FIXED,
            "{what}: a fixed part of {fixed_part} B, over the {TABLE_FIXED} B allowed for"
        );
    };

    let before = live();
    let table = ObjectTables::new(1 << 40);
    let fixed = live() - before;
    let mut costs = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        // The keys were allocated before: the table's own cost is what is left.
        table.mark_pass(k);
        if [1_000, 2_000, 5_000, 10_000, 100_000].contains(&(i + 1)) {
            table.weighted_size();
            costs.push((i + 1, live() - before));
        }
    }
    report("metadata table (pass marks)", &costs, fixed);
    drop(table);

    let before = live();
    let cache = memory_only(1 << 40);
    let fixed = live() - before;
    let mut costs = Vec::new();
    for (i, (v, c)) in versions.iter().zip(&chunks).enumerate() {
        // A clone, as the flight keeps one: the `Bytes` allocates its shared header.
        cache.store_chunk(v, 0, c.clone());
        if [1_000, 2_000, 5_000, 10_000, 100_000].contains(&(i + 1)) {
            cache.memory_weight();
            costs.push((i + 1, live() - before));
        }
    }
    report("memory tier (8-byte chunks)", &costs, fixed);
}

/// What a table costs besides its entries' weights, at most: moka's per-shard structures (its
/// logs, the first segments of its maps and deques, the keys of removed entries its map keeps
/// a while, the frequency sketch), about 1 MiB for the metadata table's 8 shards and 1.7 MiB
/// for the memory tier's 16 ([`table_fixed_overheads_are_within_what_the_bound_counts`]).
/// The README's memory bound counts it.
const TABLE_FIXED: i64 = 3 << 20;

#[test]
fn a_full_metadata_table_takes_its_capacity_and_no_more() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let capacity = 8 << 20;
    let before = live();
    let table = ObjectTables::new(capacity);
    // About 600 MiB of metadata offered to an 8 MiB table: URLs of 2 to 4 KiB, up to 8 KiB of
    // stored headers; hit-for-pass marks of URLs of up to 4 KiB.
    for i in 0..40_000 {
        let k = key(i, 2048 + (i * 37) % 2048);
        let m = Arc::new(meta(i, i % 65, 120));
        serve(&m);
        table.insert_meta(&k, m);
        table.mark_pass(&key(1_000_000 + i, 64 + (i * 53) % 4096));
    }
    let held = table.weighted_size();
    let real = live() - before;
    eprintln!(
        "full metadata table: {held} bytes held of {capacity}, {real} bytes allocated, {} entries",
        table.entry_count()
    );
    assert!(held <= capacity, "{held} bytes held");
    assert!(
        real <= capacity as i64 + TABLE_FIXED,
        "{real} bytes allocated for a table of {capacity}"
    );
}

#[test]
fn a_full_memory_tier_of_tiny_chunks_takes_its_capacity_and_no_more() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let capacity = 8 << 20;
    let versions: Vec<ObjectVersion> = (0..200_000)
        .map(|i| ObjectVersion::new(key(i, 40), "\"v\"".into()))
        .collect();
    let before = live();
    let cache = memory_only(capacity);
    // 200,000 chunks of 1 to 100 bytes: 10 MiB of data, 70 MiB with moka's bookkeeping.
    for (i, v) in versions.iter().enumerate() {
        let chunk = Bytes::from(vec![1u8; 1 + i % 100]);
        let flight_copy = chunk.clone();
        cache.store_chunk(v, 0, chunk);
        drop(flight_copy);
    }
    let held = cache.memory_weight();
    let real = live() - before;
    eprintln!("full memory tier: {held} bytes held of {capacity}, {real} bytes allocated");
    assert!(held <= capacity, "{held} bytes held");
    // Two tables: the tier, and the (empty) metadata table.
    assert!(
        real <= capacity as i64 + 2 * TABLE_FIXED,
        "{real} bytes allocated for a tier of {capacity}"
    );
}

/// What the shaper's client table takes per client, at most, with the longest client key (a
/// header value cut at 256 bytes): its entry in the table of known clients (key, pacer,
/// counters) and, while it has a response in progress, in the table of active ones. The
/// README's memory bound counts `shaping.max_clients` of them.
const CLIENT_BYTES: i64 = 1024;

#[test]
fn the_shapers_client_table_takes_max_clients_entries_of_bounded_size() {
    use edgeslice::config::{ShapingClass, ShapingSettings};
    use edgeslice::shaping::identity::ClientKey;
    use edgeslice::shaping::{Shaper, ShapingStats};
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let max_clients = 10_000;
    let class = Arc::new(ShapingClass {
        name: "video".into(),
        rate: 1 << 20,
        burst: 64 << 10,
        rate_after: 0,
        weight: 1,
        max_downloads: 4,
        max_connections: 0,
    });
    let before = live();
    let shaper = Shaper::new(
        Arc::new(ShapingSettings {
            max_clients,
            ..ShapingSettings::default()
        }),
        Arc::new(ShapingStats::default()),
    );
    // 100,000 distinct clients with 256-byte keys, ten times the table.
    for i in 0..100_000 {
        let token = format!("{i:0>256}");
        let download = shaper.admit(ClientKey::Token(token.into()), &class, None);
        drop(download);
    }
    let real = live() - before;
    let clients = shaper.tracked_clients() as i64;
    eprintln!(
        "shaper: {clients} clients tracked of {max_clients}, {real} bytes ({} per client)",
        real / clients.max(1)
    );
    assert!(clients <= max_clients as i64 + 16, "{clients} clients");
    assert!(
        real <= max_clients as i64 * CLIENT_BYTES,
        "{real} bytes for {max_clients} clients"
    );
}
