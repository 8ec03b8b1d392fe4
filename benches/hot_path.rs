//! Micro-benchmarks of the cache hit path, through the public library API only.
//!
//! Groups:
//! - `range/parse+resolve`: `parse_range` + `resolve` of a single, a suffix and a 5-range
//!   header against a 1 GiB object; `range/multipart_layout`: the framing of the 5-range answer.
//!   In-run peer `naive_numbers`: reading the same headers' numbers with `split` and
//!   `str::parse` and no validation at all (the floor: what any parser pays to read them).
//! - `range/spans`: collecting the chunk spans of a 16 MiB range over 1 MiB chunks, next to
//!   `naive_loop`: the same spans from a plain index loop (no overflow checks, no iterator).
//! - `cache/memory_hit`: `ChunkCache::memory_chunk` of a present 1 MiB chunk, next to its in-run
//!   peers: a plain `Bytes::clone` of the same chunk (what a zero-copy hit should cost, plus a
//!   lookup) and a 1 MiB copy (`memcpy_1mib` into a reused buffer, `to_vec_1mib` with a fresh
//!   allocation), which a hit must never pay. `join_fill_ready` is the second check the miss
//!   path makes (shard lock + memory lookup) when a fill completed meanwhile.
//! - `cache/meta_hit`: `ObjectTables::meta` of a stored object whose key is a 110-byte URL, and
//!   `is_pass` of the same key (a miss): lookups every cached request makes before its chunks.
//!   The table is keyed by a keyed 64-bit digest of the URL, with the URL compared in the
//!   entry. In-run peer `moka_by_url`: the metadata table as it was before it was bounded in
//!   bytes (16 moka caches keyed by the URL itself, a shard picked by hashing the URL).
//! - `cache/memory_hit_contended`: lookups on 1 vs 2 threads at once, each on its own chunk of
//!   one shared cache. The reported time is wall-clock per lookup *per thread* (equal times
//!   for 1 and 2 threads mean perfect scaling); the throughput line is lookups/s over all
//!   threads. `private_control` runs 2 threads on 2 separate caches (no shared state at all):
//!   the scaling this machine allows at that moment, to compare `shared/threads/2` against.
//! - `flight/stream_1mib`: a `FlightReader` reading a 1 MiB chunk pushed as 16 pieces, either
//!   all pushed before reading (`prefilled`) or pushed while the reader waits (`live`), on a
//!   current-thread tokio runtime.
//!
//! - `header/206_hit`: the response header of a 4 KiB range hit on a stored object with 8
//!   origin fields, built (`hit_header` + `Content-Range` + `Content-Length`) and serialized to
//!   HTTP/1 bytes. In-run peers: `pingora_build_from_strings` builds the same header the plain
//!   Pingora way (`ResponseHeader::build`, each stored field inserted from its strings, the
//!   framing `format!`ted: what a hit paid before the stored fields were parsed once per
//!   version), and `serialize_only` writes an already built header: the floor.
//! - `disk/read_1mib`: `DiskStore::get` of a 1 MiB chunk whose file is in the page cache (index
//!   lookup, `spawn_blocking`, open, read, header and CRC check), on a 2-worker tokio runtime.
//!   In-run peers: `tokio_fs_read` (the same size file read through tokio's blocking pool, no
//!   index, no check) and `std_fs_read` (a plain synchronous read).
//!
//! Each benchmark is short (20 samples, 1 s warm-up, 2 s measurement) so the whole run takes
//! about a minute; `cargo test --bench hot_path` runs each routine once as a smoke test.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use edgeslice::cache::disk::DiskStore;
use edgeslice::cache::flight::{Flight, FlightReader, Joined};
use edgeslice::cache::key::{ChunkKey, ObjectVersion};
use edgeslice::cache::key::{ObjectKey, Scheme};
use edgeslice::cache::memory::ShardedCache;
use edgeslice::cache::meta::ObjectMeta;
use edgeslice::cache::store::ChunkCache;
use edgeslice::cache::tables::ObjectTables;
use edgeslice::config::{CacheSettings, QueryKey, DEFAULT_MAX_RANGES};
use edgeslice::proxy::cache_status::CacheStatus;
use edgeslice::proxy::cached::hit_header;
use edgeslice::range::{
    parse_range, resolve, spans, ByteRange, ChunkSpan, MultipartLayout, RangeDecision,
};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Pieces a 1 MiB chunk arrives in for the flight benchmarks (64 KiB each).
const PIECES: u64 = 16;

/// A memory-only cache (no disk tier, so no tokio runtime is needed to store chunks).
fn memory_only_cache() -> ChunkCache {
    let settings = CacheSettings {
        chunk_size: MIB,
        max_object_size: GIB,
        default_ttl: None,
        heuristic_fraction: 0.0,
        heuristic_max: Duration::ZERO,
        stale_if_error: Duration::from_secs(60),
        max_ranges: DEFAULT_MAX_RANGES,
        max_concurrent_fills: edgeslice::config::DEFAULT_MAX_CONCURRENT_FILLS,
        memory_capacity: 64 * MIB,
        response_budget: edgeslice::config::default_response_budget(MIB),
        metadata_capacity: 16 * MIB,
        disk: None,
    };
    ChunkCache::new(&settings).expect("a memory-only cache never fails to open")
}

fn version() -> ObjectVersion {
    ObjectVersion::new(
        ObjectKey::new(
            "origin",
            Scheme::Http,
            "media.example.com",
            "/videos/big.mp4",
            None,
            &QueryKey::Ignore,
        ),
        "\"v1\"".into(),
    )
}

/// A 1 MiB chunk with non-trivial contents.
fn chunk_1mib() -> Bytes {
    Bytes::from((0..MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

// ---- range ------------------------------------------------------------------------------

const SINGLE: &[u8] = b"bytes=1048576-2097151";
const SUFFIX: &[u8] = b"bytes=-65536";
const MULTI5: &[u8] = b"bytes=0-99, 1048576-2097151, 10485760-10485859, 536870912-537919487, -1024";

fn parse_and_resolve(header: &[u8]) -> RangeDecision {
    resolve(&parse_range(header), GIB, DEFAULT_MAX_RANGES)
}

fn partial_count(d: &RangeDecision) -> usize {
    match d {
        RangeDecision::Partial(r) => r.len(),
        other => panic!("expected a partial answer, got {other:?}"),
    }
}

/// The floor of reading a Range header: its numbers, split and parsed, nothing checked.
fn naive_numbers(header: &[u8]) -> Vec<(Option<u64>, Option<u64>)> {
    let text = std::str::from_utf8(header).unwrap_or("");
    text.trim_start_matches("bytes=")
        .split(',')
        .filter_map(|r| r.trim().split_once('-'))
        .map(|(a, b)| (a.parse().ok(), b.parse().ok()))
        .collect()
}

fn bench_range(c: &mut Criterion) {
    let mut g = c.benchmark_group("range/parse+resolve");
    for (name, header, parts) in [
        ("single", SINGLE, 1),
        ("suffix", SUFFIX, 1),
        ("multi5", MULTI5, 5),
    ] {
        assert_eq!(partial_count(&parse_and_resolve(header)), parts, "{name}");
        assert_eq!(naive_numbers(header).len(), parts, "{name}");
        g.bench_function(name, |b| b.iter(|| parse_and_resolve(black_box(header))));
        g.bench_function(format!("naive_numbers/{name}"), |b| {
            b.iter(|| naive_numbers(black_box(header)))
        });
    }
    g.finish();

    let RangeDecision::Partial(ranges) = parse_and_resolve(MULTI5) else {
        unreachable!("checked above")
    };
    let mut g = c.benchmark_group("range/multipart_layout");
    g.bench_function("5_parts", |b| {
        b.iter(|| {
            let layout = MultipartLayout::new(
                black_box(&ranges),
                Some("video/mp4"),
                GIB,
                // Fixed, so the random generator is not part of the measurement.
                "3d6b6a416f9b5c1e8a2f4d7c9e0b1a2c".to_string(),
            );
            black_box(layout.body_len());
            layout
        })
    });
    g.finish();

    let mut g = c.benchmark_group("range/spans");
    // Unaligned on purpose: 16 MiB starting 4 KiB into chunk 5 touches 17 chunks.
    let start = 5 * MIB + 4096;
    let range = ByteRange {
        start,
        end: start + 16 * MIB - 1,
    };
    let collected: Vec<ChunkSpan> = spans(range, MIB).collect();
    assert_eq!(collected.len(), 17);
    assert_eq!(collected.iter().map(|s| s.len).sum::<u64>(), 16 * MIB);
    assert_eq!(naive_spans(range, MIB), collected);
    g.bench_function("16mib_over_1mib_chunks", |b| {
        b.iter(|| spans(black_box(range), black_box(MIB)).collect::<Vec<ChunkSpan>>())
    });
    g.bench_function("naive_loop", |b| {
        b.iter(|| naive_spans(black_box(range), black_box(MIB)))
    });
    g.finish();
}

/// The same spans from a plain loop over chunk indexes (no checks: the floor of planning).
fn naive_spans(range: ByteRange, chunk: u64) -> Vec<ChunkSpan> {
    let (first, last) = (range.start / chunk, range.end / chunk);
    let mut out = Vec::with_capacity((last - first + 1) as usize);
    for index in first..=last {
        let from = (index * chunk).max(range.start);
        let to = ((index + 1) * chunk - 1).min(range.end);
        out.push(ChunkSpan {
            index,
            offset: from - index * chunk,
            len: to - from + 1,
        });
    }
    out
}

// ---- cache ------------------------------------------------------------------------------

fn bench_memory_hit(c: &mut Criterion) {
    let cache = memory_only_cache();
    let version = version();
    let id = version.chunk(0);
    let chunk = chunk_1mib();
    cache.store_chunk(&version, 0, chunk.clone());
    cache.memory_weight(); // flush moka's pending writes before measuring
    let hit = cache.memory_chunk(&id).expect("the chunk was just stored");
    // The design constraint this group measures: a hit hands out the stored bytes, not a copy.
    assert_eq!(hit.as_ptr(), chunk.as_ptr(), "a memory hit must not copy");
    assert!(matches!(cache.join_fill(&id), Joined::Ready(b) if b.as_ptr() == chunk.as_ptr()));

    let mut g = c.benchmark_group("cache/memory_hit");
    g.bench_function("memory_chunk", |b| {
        b.iter(|| cache.memory_chunk(black_box(&id)))
    });
    g.bench_function("join_fill_ready", |b| {
        b.iter(|| match cache.join_fill(black_box(&id)) {
            Joined::Ready(b) => b,
            _ => unreachable!("the chunk is in memory and no fill is registered"),
        })
    });
    g.bench_function("bytes_clone", |b| b.iter(|| black_box(&chunk).clone()));
    let mut dst = vec![0u8; MIB as usize];
    g.bench_function("memcpy_1mib", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&chunk[..]));
            black_box(&dst);
        })
    });
    g.bench_function("to_vec_1mib", |b| b.iter(|| black_box(&chunk[..]).to_vec()));
    g.finish();
}

fn bench_meta_hit(c: &mut Criterion) {
    let key = ObjectKey::new(
        "origin",
        Scheme::Http,
        "media.example.com",
        "/videos/2026/12/some-series/season-1/episode-04/segment-000123.m4s",
        Some("token=abcdef"),
        &QueryKey::All,
    );
    let meta = Arc::new(ObjectMeta {
        status: 200,
        size: GIB,
        validator: "\"v1\"".into(),
        etag: Some("\"v1\"".into()),
        last_modified: None,
        headers: vec![("content-type".into(), "video/mp4".into())],
        stored_at: SystemTime::now(),
        initial_age: 0,
        fresh_until: SystemTime::now() + Duration::from_secs(3600),
        stale_if_error: Duration::ZERO,
        must_revalidate: false,
        stale_while_revalidate: Duration::ZERO,
        wire: Default::default(),
    });
    let tables = ObjectTables::new(64 * MIB);
    tables.insert_meta(&key, meta.clone());
    assert!(tables.meta(&key).is_some());
    // The metadata table before: 16 moka caches keyed by the URL, 200,000 entries.
    let by_url: ShardedCache<ObjectKey, Arc<ObjectMeta>> =
        ShardedCache::new(16, 200_000, moka::sync::Cache::new);
    by_url.insert(key.clone(), meta);

    let mut g = c.benchmark_group("cache/meta_hit");
    g.bench_function("meta", |b| b.iter(|| tables.meta(black_box(&key))));
    g.bench_function("is_pass_miss", |b| {
        b.iter(|| tables.is_pass(black_box(&key)))
    });
    g.bench_function("moka_by_url", |b| b.iter(|| by_url.get(black_box(&key))));
    g.finish();
}

/// Wall-clock time for every thread (one per `(cache, id)` pair) to make `iters` lookups of
/// its chunk, all starting together.
fn lookups_on_threads(work: &[(&ChunkCache, &ChunkKey)], iters: u64) -> Duration {
    let start_line = Barrier::new(work.len() + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = work
            .iter()
            .map(|&(cache, id)| {
                let start_line = &start_line;
                s.spawn(move || {
                    start_line.wait();
                    for _ in 0..iters {
                        black_box(cache.memory_chunk(black_box(id)));
                    }
                })
            })
            .collect();
        start_line.wait();
        let started = Instant::now();
        for w in workers {
            w.join().expect("lookup thread panicked");
        }
        started.elapsed()
    })
}

fn bench_memory_hit_contended(c: &mut Criterion) {
    let chunk = chunk_1mib();
    let version = version();
    let ids: Vec<ChunkKey> = (0..2).map(|i| version.chunk(i)).collect();
    let shared = memory_only_cache();
    // One private cache per thread: the control, what scaling looks like with no shared state
    // at all on this machine right now (other load on the cores shows up here too).
    let private: Vec<ChunkCache> = (0..2).map(|_| memory_only_cache()).collect();
    for (id, own) in ids.iter().zip(&private) {
        // Distinct chunks (not just distinct keys to one buffer), like two clients on two chunks.
        shared.store_chunk(&version, id.index, Bytes::copy_from_slice(&chunk));
        own.store_chunk(&version, id.index, Bytes::copy_from_slice(&chunk));
    }
    for cache in std::iter::once(&shared).chain(&private) {
        cache.memory_weight();
    }
    assert!(ids.iter().all(|id| shared.memory_chunk(id).is_some()));
    assert!(ids
        .iter()
        .zip(&private)
        .all(|(id, c)| c.memory_chunk(id).is_some()));

    let shared_work: Vec<(&ChunkCache, &ChunkKey)> = ids.iter().map(|id| (&shared, id)).collect();
    let private_work: Vec<(&ChunkCache, &ChunkKey)> = private.iter().zip(&ids).collect();

    let mut g = c.benchmark_group("cache/memory_hit_contended");
    for (name, work) in [
        ("shared/threads/1", &shared_work[..1]),
        ("shared/threads/2", &shared_work[..]),
        ("private_control/threads/2", &private_work[..]),
    ] {
        g.throughput(Throughput::Elements(work.len() as u64));
        g.bench_with_input(name, work, |b, work| {
            b.iter_custom(|iters| lookups_on_threads(work, iters))
        });
    }
    g.finish();
}

// ---- header -----------------------------------------------------------------------------

/// A stored 16 MiB object with the fields a typical origin sends.
fn stored_meta() -> ObjectMeta {
    let now = SystemTime::now();
    let headers: Vec<(String, String)> = [
        ("content-type", "video/mp4"),
        ("etag", "\"5f3c2a1b-1000000\""),
        ("last-modified", "Wed, 21 Oct 2025 07:28:00 GMT"),
        ("cache-control", "public, max-age=3600"),
        ("date", "Mon, 30 Nov 2026 12:00:00 GMT"),
        ("server", "nginx/1.22.1"),
        ("x-content-type-options", "nosniff"),
        ("access-control-allow-origin", "*"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    ObjectMeta {
        status: 200,
        size: 16 * MIB,
        validator: "\"5f3c2a1b-1000000\"".into(),
        etag: Some("\"5f3c2a1b-1000000\"".into()),
        last_modified: Some("Wed, 21 Oct 2025 07:28:00 GMT".into()),
        headers,
        stored_at: now,
        initial_age: 0,
        fresh_until: now + Duration::from_secs(3600),
        stale_if_error: Duration::ZERO,
        must_revalidate: false,
        stale_while_revalidate: Duration::ZERO,
        wire: Default::default(),
    }
}

const RID: &str = "0123456789abcdef0123456789abcdef";

fn edgeslice_206(meta: &ObjectMeta, now: SystemTime) -> pingora_http::ResponseHeader {
    let mut h = hit_header(206, meta, RID, Some(CacheStatus::Hit), "edgeslice", now)
        .expect("a valid status");
    h.insert_header("content-range", meta.wire().content_range(0, 4095))
        .expect("a valid value");
    h.insert_header("content-length", http::HeaderValue::from(4096u64))
        .expect("a valid value");
    h
}

/// The same header built the plain Pingora way, from the stored strings.
fn pingora_206(meta: &ObjectMeta, now: SystemTime) -> pingora_http::ResponseHeader {
    let mut h = pingora_http::ResponseHeader::build(206, Some(meta.headers.len() + 8))
        .expect("a valid status");
    for (n, v) in &meta.headers {
        h.append_header(n.clone(), v.as_str()).expect("valid field");
    }
    h.insert_header("accept-ranges", "bytes").expect("valid");
    h.insert_header("age", meta.age(now).to_string())
        .expect("valid");
    h.insert_header("via", "1.1 edgeslice").expect("valid");
    h.insert_header("x-request-id", RID).expect("valid");
    h.insert_header("cache-status", "edgeslice; hit")
        .expect("valid");
    h.insert_header(
        "content-range",
        format!("bytes {}-{}/{}", 0, 4095, meta.size),
    )
    .expect("valid");
    h.insert_header("content-length", 4096u64.to_string())
        .expect("valid");
    h
}

fn wire_text(h: &pingora_http::ResponseHeader) -> Vec<String> {
    let mut buf = bytes::BytesMut::new();
    h.header_to_h1_wire(&mut buf);
    let mut lines: Vec<String> = String::from_utf8(buf.to_vec())
        .expect("ASCII")
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    lines.sort();
    lines
}

fn bench_header(c: &mut Criterion) {
    let meta = stored_meta();
    let now = SystemTime::now();
    // Both ways write the same fields and values (name case aside): the comparison is fair.
    let ours = wire_text(&edgeslice_206(&meta, now));
    assert_eq!(ours, wire_text(&pingora_206(&meta, now)));
    assert!(
        ours.contains(&"content-range: bytes 0-4095/16777216".to_string()),
        "{ours:?}"
    );
    assert_eq!(ours.len(), meta.headers.len() + 7, "{ours:?}");

    let mut buf = bytes::BytesMut::with_capacity(4096);
    let mut g = c.benchmark_group("header/206_hit");
    g.bench_function("edgeslice", |b| {
        b.iter(|| {
            buf.clear();
            edgeslice_206(black_box(&meta), now).header_to_h1_wire(&mut buf);
            black_box(buf.len())
        })
    });
    g.bench_function("pingora_build_from_strings", |b| {
        b.iter(|| {
            buf.clear();
            pingora_206(black_box(&meta), now).header_to_h1_wire(&mut buf);
            black_box(buf.len())
        })
    });
    let built = edgeslice_206(&meta, now);
    g.bench_function("serialize_only", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&built).header_to_h1_wire(&mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

// ---- disk -------------------------------------------------------------------------------

fn bench_disk_read(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = DiskStore::open(&dir.path().join("cache"), GIB).expect("the disk tier opens");
    let version = version();
    let entry = version.key.chunk_entry(0);
    let chunk = chunk_1mib();
    rt.block_on(store.put(&entry, Some(&version.validator), chunk.clone()));
    let read = rt
        .block_on(store.get(&entry, Some(&version.validator)))
        .expect("the chunk was just stored");
    assert_eq!(read, chunk, "the disk tier returns the stored bytes");
    let plain = dir.path().join("plain.bin");
    std::fs::write(&plain, &chunk).expect("a plain file");

    let mut g = c.benchmark_group("disk/read_1mib");
    g.throughput(Throughput::Bytes(MIB));
    g.bench_function("disk_store_get", |b| {
        b.to_async(&rt).iter(|| async {
            let got = store.get(&entry, Some(&version.validator)).await;
            assert_eq!(got.map(|b| b.len() as u64), Some(MIB));
        })
    });
    g.bench_function("tokio_fs_read", |b| {
        b.to_async(&rt).iter(|| async {
            let got = tokio::fs::read(&plain).await.expect("readable");
            assert_eq!(got.len() as u64, MIB);
        })
    });
    g.bench_function("std_fs_read", |b| {
        b.iter(|| {
            let got = std::fs::read(black_box(&plain)).expect("readable");
            assert_eq!(got.len() as u64, MIB);
        })
    });
    g.finish();
}

// ---- flight -----------------------------------------------------------------------------

/// Read a window to the end; returns the number of bytes read.
async fn drain(mut reader: FlightReader) -> u64 {
    let mut n = 0;
    while let Some(piece) = reader.next().await {
        n += piece.expect("the fill succeeds").len() as u64;
    }
    n
}

fn bench_flight(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let chunk = chunk_1mib();
    let piece_len = MIB / PIECES;
    let pieces: Vec<Bytes> = (0..PIECES)
        .map(|i| chunk.slice((i * piece_len) as usize..((i + 1) * piece_len) as usize))
        .collect();
    let pieces = &pieces;

    let mut g = c.benchmark_group("flight/stream_1mib");
    g.throughput(Throughput::Bytes(MIB));
    g.bench_function("prefilled", |b| {
        b.to_async(&rt).iter(|| async move {
            let flight = Arc::new(Flight::default());
            for p in pieces {
                flight.push(p.clone());
            }
            flight.finish(Ok(()));
            let n = drain(flight.reader(0, MIB)).await;
            assert_eq!(n, MIB);
        })
    });
    g.bench_function("live", |b| {
        b.to_async(&rt).iter(|| async move {
            let flight = Arc::new(Flight::default());
            let reader = flight.reader(0, MIB);
            let producer = async {
                for p in pieces {
                    flight.push(p.clone());
                    // Let the reader take each piece as it arrives.
                    tokio::task::yield_now().await;
                }
                flight.finish(Ok(()));
            };
            let ((), n) = tokio::join!(producer, drain(reader));
            assert_eq!(n, MIB);
        })
    });
    g.finish();
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bench_range, bench_header, bench_memory_hit, bench_meta_hit, bench_memory_hit_contended,
        bench_disk_read, bench_flight
}
criterion_main!(hot_path);
