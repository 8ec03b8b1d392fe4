//! Memory stays bounded by the configuration, never by traffic: many concurrent cold fills and
//! clients that stall mid-body leave the proxy's peak RSS within the memory tier's capacity
//! plus a fixed overhead (64 MiB tier + 192 MiB, see `OVERHEAD_MIB`).
//!
//! The same for what the cache knows about objects (issue 20, C.11): floods of distinct long
//! URLs (hit-for-pass, cached tiny objects, on a disk tier) and an origin sending large
//! headers leave the peak within the tier, `cache.metadata_capacity` (and
//! `cache.disk.index_capacity`) plus a fixed overhead, flat as the flood goes on.
//!
//! The proxy runs as its own process (the real binary), so its `VmHWM` is its own peak.

mod common;

use common::origin::{content_crc, Origin};
use common::proxy::Proxy;
use futures::StreamExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// The memory tier of these tests, and the overhead allowed on top of it.
const TIER_MIB: u64 = 64;
///
/// Issue 8 set 192 MiB; it had been raised to 256 MiB when the same build peaked at 221–280 MiB
/// on the CI machines. Back to 192 (issue 23): the chunks kept reachable ahead of slow readers
/// are bounded at 16 MiB (`cache::flight::RETAIN_LIMIT`, 64 MiB before), and disk reads at 32
/// at once (`cache::disk::MAX_CONCURRENT_READS`).
const OVERHEAD_MIB: u64 = 192;

fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: {TIER_MIB}MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 256MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 1s\n    read_timeout: 20s\n    deadline: 60s\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    )
}

fn assert_bounded(proxy: &Proxy, what: &str) {
    let peak = proxy.peak_rss_kib() / 1024;
    let bound = TIER_MIB + OVERHEAD_MIB;
    eprintln!("{what}: peak RSS {peak} MiB (bound {bound} MiB)");
    assert!(peak > 0, "could not read the proxy's peak RSS");
    assert!(
        peak <= bound,
        "{what}: peak RSS {peak} MiB is over the {TIER_MIB} MiB memory tier + {OVERHEAD_MIB} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_cold_fills_stay_within_the_bound() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin));
    let size = 4 * MIB;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let client = client.clone();
            let url = proxy.url(&format!("/obj/{size}/cold-{i}"));
            let path = format!("/obj/{size}/cold-{i}");
            tokio::spawn(async move {
                let resp = client.get(url).send().await.expect("request");
                assert_eq!(resp.status(), 200, "{path}");
                let mut crc = crc32fast::Hasher::new();
                let mut len = 0u64;
                let mut body = resp.bytes_stream();
                while let Some(piece) = body.next().await {
                    let piece = piece.expect("body");
                    len += piece.len() as u64;
                    crc.update(&piece);
                }
                assert_eq!(len, size, "{path}: length");
                assert_eq!(
                    crc.finalize(),
                    content_crc(&path, 0, 0..size),
                    "{path}: bytes"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    assert_bounded(&proxy, "300 concurrent cold 4 MiB fills");
    let stats = proxy.stats().await;
    // Each object was fetched once (one discovery request covering its 4 chunks).
    assert!(
        origin.requests() <= 305,
        "origin saw {} requests for 300 objects",
        origin.requests()
    );
    eprintln!("origin requests: {}; stats: {stats:?}", origin.requests());
}

/// A client that sends a GET and reads `first` bytes of the response (head included), then
/// stops reading with the connection open.
/// A client at 127.0.0.`host` that reads the first `first` bytes of `path`, then stops reading.
async fn stall_after(proxy: &Proxy, path: &str, first: usize, host: u8) -> tokio::net::TcpStream {
    let mut s = silent_reader_from(proxy, path, host).await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < first {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "{path}: closed after {got} bytes");
        got += n;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_stalled_readers_stay_within_the_bound() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin));
    let size = 64 * MIB;
    let mut stalled = Vec::new();
    // Forty clients, each from its own address: one client's many stalled responses wait on
    // its own share of the response budget (tested below), which would serialise them here.
    for i in 0..40u8 {
        let path = format!("/obj/{size}/stall-{i}");
        stalled.push(stall_after(&proxy, &path, MIB as usize, 10 + i).await);
    }
    // Let the fills run as far as they will while every client sits still.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_bounded(&proxy, "40 readers stalled after 1 MiB of 64 MiB");
    // The stalled clients leave; a fresh client still gets an exact object.
    drop(stalled);
    let path = format!("/obj/{}/after", 8 * MIB);
    let body = common::client()
        .get(proxy.url(&path))
        .send()
        .await
        .expect("request")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len() as u64, 8 * MIB);
    assert_eq!(
        crc32fast::hash(&body),
        content_crc(&path, 0, 0..8 * MIB),
        "bytes after the stalls"
    );
    assert_bounded(&proxy, "after the stalled readers left");
}

// ---- the response budget (issue 23) --------------------------------------------------------

/// A client that sends a GET and then reads nothing: its response stalls once the socket
/// buffers are full, holding the chunk it was writing from.
async fn silent_reader(proxy: &Proxy, path: &str) -> tokio::net::TcpStream {
    silent_reader_from(proxy, path, 1).await
}

/// The same from the loopback address 127.0.0.`host`: another client, for the budget's shares.
async fn silent_reader_from(proxy: &Proxy, path: &str, host: u8) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = proxy
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("proxy address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
        .expect("bind");
    let mut s = socket.connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    s
}

/// Whether a response has begun on `s` (some bytes are waiting to be read), without reading
/// them all.
async fn has_begun(s: &tokio::net::TcpStream) -> bool {
    let mut one = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), s.peek(&mut one)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// GET `url` whole from the loopback address 127.0.0.`host` and check its bytes.
async fn fetch_exact_from(url: &str, path: &str, size: u64, host: u8) {
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, host]))
        .build()
        .expect("client");
    let body = client
        .get(url)
        .send()
        .await
        .expect("request")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len() as u64, size, "{path}: length");
    assert_eq!(
        crc32fast::hash(&body),
        content_crc(path, 0, 0..size),
        "{path}: bytes"
    );
}

/// Wait until `stat` of `/stats` is at least `want` (at most 30 s), and return it.
async fn stat_reaches(proxy: &Proxy, stat: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = proxy.stats().await.get(stat).copied().unwrap_or(0);
        if v >= want || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const BUDGET_TIER_MIB: u64 = 16;
const BUDGET_MIB: u64 = 8;
/// What the process takes besides the tier and the budget in these tests (the base process,
/// 16 fills of two chunks, the 16 MiB of chunks kept ahead of readers). Measured: 108 MiB at
/// the peak in all, 84 of them this part (debug build). Without the budget the 150 stalled
/// readers below hold 150 chunks (157 MB charged with a 1 GiB budget): about 250 MiB.
const BUDGET_OVERHEAD_MIB: u64 = 112;

fn budget_config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 1MiB\n  response_budget: {BUDGET_MIB}MiB\n  memory:\n    capacity: {BUDGET_TIER_MIB}MiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 1s\n    read_timeout: 20s\n    deadline: 60s\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    )
}

/// 150 requests from 8 clients ask for distinct objects and read nothing: only as many
/// responses as the budget has room for hold a chunk (the others wait for it, holding none,
/// once the socket buffers took what they could); the peak stays within the tier + the budget + a fixed part;
/// when the stalled clients leave, the waiting clients are served, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_budget_bounds_what_stalled_readers_hold() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&budget_config(&origin));
    let size = 8 * MIB;
    let mut stalled = Vec::new();
    for i in 0..150 {
        let path = format!("/obj/{size}/silent-{i}");
        stalled.push(silent_reader_from(&proxy, &path, 1 + (i % 8) as u8).await);
    }
    // Readers beyond the budget wait for it (one wait each at least).
    let waits = stat_reaches(&proxy, "cache_response_budget_waits", 100).await;
    assert!(waits >= 100, "only {waits} responses waited for the budget");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = proxy.stats().await;
    let held = stats["cache_response_bytes"];
    assert!(
        held <= BUDGET_MIB * MIB,
        "responses hold {held} bytes, over the {BUDGET_MIB} MiB budget"
    );
    assert_eq!(stats["cache_response_budget_bytes"], BUDGET_MIB * MIB);
    let peak = proxy.peak_rss_kib() / 1024;
    let bound = BUDGET_TIER_MIB + BUDGET_MIB + BUDGET_OVERHEAD_MIB;
    eprintln!("150 silent readers, {waits} waits, {held} bytes held: peak RSS {peak} MiB (bound {bound} MiB)");
    assert!(peak > 0, "could not read the proxy's peak RSS");
    assert!(
        peak <= bound,
        "peak RSS {peak} MiB over the {BUDGET_TIER_MIB} MiB tier + {BUDGET_MIB} MiB budget + {BUDGET_OVERHEAD_MIB} MiB"
    );

    // Patient clients queue behind the silent ones, then get every byte once they leave.
    let patient: Vec<_> = (0..3)
        .map(|i| {
            let url = proxy.url(&format!("/obj/{size}/patient-{i}"));
            let path = format!("/obj/{size}/patient-{i}");
            tokio::spawn(async move {
                fetch_exact_from(&url, &path, size, 9).await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        patient.iter().all(|p| !p.is_finished()),
        "a patient client was served while the budget was spent"
    );
    drop(stalled);
    for p in patient {
        tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .expect("patient client served once the stalled clients left")
            .expect("patient client");
    }
    let held = stat_reaches(&proxy, "cache_response_bytes", 0).await;
    assert_eq!(
        proxy.stats().await["cache_response_bytes"],
        0,
        "every charge given back ({held})"
    );
}

/// Clients that stop reading cannot keep the budget from those that read: 40 silent readers of
/// distinct objects from 20 addresses (each within its share) take all of it, and another
/// client still gets a whole object long before `server.send_timeout` (120 s here) would free
/// anything: a response that waits for the budget has the client that has read nothing for
/// longest cut (found by an outside run: 200 silent readers from 100 addresses held a 64 MiB
/// budget until their send_timeout, and another client's 64 MiB download took 86 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_give_way_to_those_waiting() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with_server(&budget_config(&origin), "  send_timeout: 120s\n");
    let size = 8 * MIB;
    let mut silent = Vec::new();
    for i in 0..40 {
        let path = format!("/obj/{size}/stopped-{i}");
        silent.push(silent_reader_from(&proxy, &path, 10 + (i % 20) as u8).await);
    }
    stat_reaches(&proxy, "cache_response_budget_waits", 20).await;
    let held = proxy.stats().await["cache_response_bytes"];
    assert!(held <= BUDGET_MIB * MIB, "{held} bytes held");
    let path = format!("/obj/{size}/reads-on");
    tokio::time::timeout(
        Duration::from_secs(60),
        fetch_exact_from(&proxy.url(&path), &path, size, 2),
    )
    .await
    .expect("a reading client is served while silent ones hold the budget");
    let stats = proxy.stats().await;
    assert!(stats["client_stalled_cut"] >= 1, "{stats:?}");
    assert_eq!(stats["client_send_timeouts"], 0, "{stats:?}");
    assert!(stats["cache_response_bytes"] <= BUDGET_MIB * MIB);
    drop(silent);
}

/// One client (an address) that opens many slow responses holds at most its share of the
/// budget (an eighth, at least two chunks): another client is served at once, every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_the_response_budget_from_the_others() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&budget_config(&origin));
    let size = 8 * MIB;
    let mut greedy = Vec::new();
    for i in 0..40 {
        greedy.push(silent_reader(&proxy, &format!("/obj/{size}/greedy-{i}")).await);
    }
    stat_reaches(&proxy, "cache_response_budget_waits", 30).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = proxy.stats().await["cache_response_bytes"];
    // Its share: two chunks of 1 MiB (an eighth of 8 MiB is less), with their bookkeeping.
    assert!(
        held <= 2 * (MIB + 256),
        "one client's 40 stalled responses hold {held} bytes"
    );
    let path = format!("/obj/{size}/other-client");
    // Within 20 s, while the greedy client stalls.
    tokio::time::timeout(
        Duration::from_secs(20),
        fetch_exact_from(&proxy.url(&path), &path, size, 2),
    )
    .await
    .expect("another client is answered while the greedy client stalls");
    drop(greedy);
}

/// 100 clients of one hot object share its chunks: with room for 16 chunks in the budget,
/// none of them waits, and every one of them gets its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_one_hot_object_share_the_charge_of_its_chunks() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &budget_config(&origin).replace("response_budget: 8MiB", "response_budget: 16MiB"),
    );
    let path = format!("/obj/{}/hot", 64 * MIB);
    // The object's metadata and first chunks are in the cache before the crowd comes.
    let mut first = silent_reader(&proxy, &path).await;
    let mut head = [0u8; 1];
    first
        .read_exact(&mut head)
        .await
        .expect("first reader's response");
    // A hundred clients: a hundred addresses (one client's share would hold two chunks).
    let mut crowd = Vec::new();
    for i in 0..100u8 {
        crowd.push(silent_reader_from(&proxy, &path, 10 + i).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut begun = 0;
    while std::time::Instant::now() < deadline {
        begun = 0;
        for s in &crowd {
            begun += usize::from(has_begun(s).await);
        }
        if begun == crowd.len() {
            break;
        }
    }
    let stats = proxy.stats().await;
    eprintln!(
        "hot object: {begun} of 100 begun, {} bytes held, {} waits",
        stats["cache_response_bytes"], stats["cache_response_budget_waits"]
    );
    assert_eq!(begun, 100, "every reader of the hot object is answered");
    assert_eq!(
        stats["cache_response_budget_waits"], 0,
        "a reader of a chunk others hold never waits"
    );
    assert!(stats["cache_response_bytes"] <= 16 * MIB);
}

// ---- tables bounded in bytes (issue 20, C.11) ----------------------------------------------

/// The memory tier of the table tests and their metadata budget (small, so the bounds bite
/// quickly), and the overhead allowed on top of them: the process at rest (about 16 MiB), the
/// tables' fixed part (about 3 MiB), the flood's connections and the allocator's slack.
/// Before the tables were bounded in bytes, the same floods took 200 MiB to 2 GiB.
const TABLES_TIER_MIB: u64 = 4;
const TABLES_META_MIB: u64 = 8;
const TABLES_OVERHEAD_MIB: u64 = 48;

fn tables_config(origin: &Origin, disk: &str) -> String {
    format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: {TABLES_TIER_MIB}MiB\n  metadata_capacity: {TABLES_META_MIB}MiB\n{disk}upstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n",
        origin.addr()
    )
}

/// `n` GETs of distinct paths made by `path(i)`, 32 at a time on keep-alive connections,
/// each answered `status`. Returns the proxy's RSS (MiB) after each quarter of them.
async fn flood(
    proxy: &Proxy,
    n: usize,
    status: u16,
    path: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Vec<u64> {
    const TASKS: usize = 32;
    let path = std::sync::Arc::new(path);
    let mut rss = Vec::new();
    for quarter in 0..4 {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let client = common::client();
                let base = proxy.url("");
                let path = path.clone();
                tokio::spawn(async move {
                    let mut i = quarter * n / 4 + t;
                    while i < (quarter + 1) * n / 4 {
                        let p = path(i);
                        let resp = client.get(format!("{base}{p}")).send().await.expect("GET");
                        assert_eq!(resp.status(), status, "{}", &p[..p.len().min(64)]);
                        resp.bytes().await.expect("body");
                        i += TASKS;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("flood task");
        }
        rss.push(proxy.rss_kib() / 1024);
    }
    rss
}

/// A path of about `len` bytes, distinct for each `i`.
fn long_path(prefix: &str, i: usize, len: usize) -> String {
    let head = format!("{prefix}{i}-");
    format!("{head}{}", "x".repeat(len.saturating_sub(head.len())))
}

/// The proxy's peak stays within the tier, the metadata budget, `extra_mib` (the disk index)
/// and the overhead; the tables hold at most their capacities; and RSS plateaus: the second
/// half of the flood adds little (tables that grew with distinct inputs grew linearly).
async fn assert_tables_bounded(proxy: &Proxy, what: &str, rss: &[u64], extra_mib: u64) {
    let peak = proxy.peak_rss_kib() / 1024;
    let bound = TABLES_TIER_MIB + TABLES_META_MIB + extra_mib + TABLES_OVERHEAD_MIB;
    let stats = proxy.stats().await;
    let figure = |k: &str| stats.get(k).copied().unwrap_or(u64::MAX);
    eprintln!(
        "{what}: RSS by quarter {rss:?} MiB, peak {peak} MiB (bound {bound} MiB); metadata {} of {}, disk index {} of {}",
        figure("cache_metadata_bytes"),
        figure("cache_metadata_capacity_bytes"),
        figure("cache_disk_index_bytes"),
        figure("cache_disk_index_capacity_bytes"),
    );
    assert!(peak > 0, "could not read the proxy's peak RSS");
    assert!(
        peak <= bound,
        "{what}: peak RSS {peak} MiB over the {TABLES_TIER_MIB} MiB tier + {TABLES_META_MIB} MiB metadata + {extra_mib} MiB + {TABLES_OVERHEAD_MIB} MiB"
    );
    assert_eq!(
        figure("cache_metadata_capacity_bytes"),
        TABLES_META_MIB << 20
    );
    assert!(figure("cache_metadata_bytes") <= TABLES_META_MIB << 20);
    assert!(figure("cache_disk_index_bytes") <= figure("cache_disk_index_capacity_bytes"));
    assert!(figure("cache_memory_bytes") <= TABLES_TIER_MIB << 20);
    let (half, end) = (rss[1], rss[3]);
    assert!(
        end <= half + 8,
        "{what}: RSS grew from {half} to {end} MiB over the second half of the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_long_urls_marked_hit_for_pass_stay_within_the_bound() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&tables_config(&origin, ""));
    // Every answer is `no-store`: each URL is discovered once and marked hit-for-pass.
    let rss = flood(&proxy, 100_000, 200, |i| {
        long_path("/download/16/", i, 2048 + i % 2048)
    })
    .await;
    assert_tables_bounded(
        &proxy,
        "100,000 distinct 2-4 KiB hit-for-pass URLs",
        &rss,
        0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tiny_objects_with_long_urls_stay_within_the_bound() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&tables_config(&origin, ""));
    let rss = flood(&proxy, 100_000, 200, |i| {
        long_path("/obj/100/", i, 2048 + i % 2048)
    })
    .await;
    let what = "100,000 cached 100-byte objects, 2-4 KiB URLs";
    assert_tables_bounded(&proxy, what, &rss, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_objects_on_disk_keep_the_disk_index_within_its_capacity() {
    let origin = Origin::start().await;
    // Each object is two files of a few KiB (its metadata and its one chunk, with the URL in
    // each): the 256 MiB disk would hold all of them, the 128 KiB index about 1,200 (108
    // bytes each: two files and an object).
    // On tmpfs when there is one: the test is about the index, not the disk's speed.
    let shm = std::path::Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let disk = format!(
        "  disk:\n    path: {}/cache\n    capacity: 256MiB\n    index_capacity: 128KiB\n",
        tmp.path().display()
    );
    let proxy = Proxy::start(&tables_config(&origin, &disk));
    let rss = flood(&proxy, 20_000, 200, |i| long_path("/obj/100/", i, 1024)).await;
    // Besides the index: the disk tier's blocking threads (about 60 while the flood runs,
    // each with its stack and allocator cache: some 12 MiB against the memory-only floods).
    let what = "20,000 cached 100-byte objects on disk, 1 KiB URLs";
    assert_tables_bounded(&proxy, what, &rss, 1 + 16).await;
    let stats = proxy.stats().await;
    assert!(
        stats["cache_disk_index_bytes"] > 64 << 10,
        "the index filled up: {stats:?}"
    );
    // The first objects were evicted from the index, and so from disk (the bytes of the disk
    // had room for all): the first URL is fetched again, and served right.
    let before = origin.requests();
    let first = common::client()
        .get(proxy.url(&long_path("/obj/100/", 0, 1024)))
        .send()
        .await
        .expect("GET");
    assert_eq!(first.status(), 200);
    assert_eq!(first.bytes().await.expect("body").len(), 100);
    assert_eq!(origin.requests(), before + 1, "evicted: fetched again");
    assert!(stats["cache_disk_bytes"] < 16 << 20, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_sending_large_headers_stays_within_the_bound() {
    let origin = Origin::start().await;
    // 8 KiB of response header in 64 fields, on every object.
    for f in 0..64 {
        origin.set_extra_header(&format!("x-pad-{f}"), &"h".repeat(120));
    }
    let proxy = Proxy::start(&tables_config(&origin, ""));
    let rss = flood(&proxy, 40_000, 200, |i| long_path("/obj/100/", i, 2048)).await;
    let what = "40,000 objects with 8 KiB of headers, 2 KiB URLs";
    assert_tables_bounded(&proxy, what, &rss, 0).await;
    // Stored headers are still replayed whole.
    let resp = common::client()
        .get(proxy.url(&long_path("/obj/100/", 39_999, 2048)))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.headers()["x-pad-63"], "h".repeat(120).as_str());
}
