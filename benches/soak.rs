//! The soak: the release binary for a while (10 minutes by default) against origins that lie
//! in every way HTTP permits, under many concurrent clients doing whole GETs and ranges, with
//! EVERY body verified, 64 KiB block by block, against the true content of one version.
//!
//! Origins (each its own upstream group, reached by `Host`):
//! * `flaky.test`: two in-process origins whose faults rotate every few seconds, each on its
//!   own: 503s, hangs, trickles, resets mid-body, or none; the object version (ETag and
//!   content) flips every 10 s on both; `max-age=5` so revalidations run all along.
//! * `chunked.test`: a Range-ignoring origin sending chunked bodies without a length
//!   (sometimes trickled), over a memory tier and a disk tier too small for its objects, so
//!   chunks are evicted and refetched.
//! * `ignore.test`: a Range-ignoring origin with lengths.
//! * `noval.test`: objects without a validator whose content changes every 7 s.
//! * `liar.test`: a raw origin whose 304s carry another ETag once the version changed, and
//!   whose 206 bodies are sometimes longer than their `Content-Range` (junk before or after).
//!
//! Some clients leave mid-body (fills that outlive their client). RSS and open fds of the proxy
//! are sampled every 3 s. The summary: requests, verified bodies, wrong/mixed/silently short
//! bodies (must be 0), client errors by kind, RSS and fds min/max. The exit status is 1 on any
//! wrong, mixed or silently short body.
//!
//! Run: `cargo bench --bench soak` (10 minutes); `SOAK_SECS=60 cargo bench --bench soak` for a
//! smoke run (or pass the seconds as the first free argument). Not part of `cargo test`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::origin::{content_byte, fill_content, Fault, Origin};
use common::proxy::Proxy;
use rand::Rng;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BLOCK: usize = 64 * 1024;
const CLIENTS: usize = 24;
const SIZES: [u64; 6] = [1_000, 100_000, 300_000, 1_000_000, 2_000_000, 3_000_000];
const OBJECTS_PER_GROUP: usize = 30;

/// The groups, by host; each knows its current version (content changes with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Flaky,
    Chunked,
    Ignore,
    NoVal,
    Liar,
}

impl Group {
    const ALL: [Group; 5] = [
        Group::Flaky,
        Group::Chunked,
        Group::Ignore,
        Group::NoVal,
        Group::Liar,
    ];
    fn host(self) -> &'static str {
        match self {
            Group::Flaky => "flaky.test",
            Group::Chunked => "chunked.test",
            Group::Ignore => "ignore.test",
            Group::NoVal => "noval.test",
            Group::Liar => "liar.test",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    verified: AtomicU64,
    verified_bytes: AtomicU64,
    abandoned: AtomicU64,
    wrong: AtomicU64,
    mixed: AtomicU64,
    short: AtomicU64,
    /// Client errors by kind ("status 502", "aborted body", "timeout", ...), and wrong bodies
    /// by group.
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn kind(&self, k: String) {
        *self.kinds.lock().unwrap().entry(k).or_default() += 1;
    }
}

/// The highest version each group has served so far (versions only grow).
struct Versions([AtomicU32; 5]);

impl Versions {
    fn max(&self, g: Group) -> u32 {
        self.0[g.index()].load(Ordering::SeqCst)
    }
}

/// What a block is: of which version, or of none.
fn version_of_block(path: &str, start: u64, block: &[u8], max: u32) -> Option<u32> {
    let mut buf = vec![0u8; block.len()];
    for v in (0..=max).rev() {
        // Cheap first look: the first bytes.
        let probe = block.len().min(8);
        if (0..probe).any(|i| content_byte(path, v, start + i as u64) != block[i]) {
            continue;
        }
        fill_content(path, v, start, &mut buf);
        if buf == block {
            return Some(v);
        }
    }
    None
}

enum Verdict {
    Good,
    Wrong,
    Mixed,
}

/// Every block of `body` (object bytes from `start`) of one and the same version.
fn verify(path: &str, start: u64, body: &[u8], max: u32) -> Verdict {
    let mut seen: Option<u32> = None;
    // Blocks at object offsets that are multiples of 64 KiB (so a chunk boundary never falls
    // inside one).
    let mut at = start;
    let mut rest = body;
    while !rest.is_empty() {
        let n = (BLOCK - (at % BLOCK as u64) as usize).min(rest.len());
        let (block, tail) = rest.split_at(n);
        let here = at;
        rest = tail;
        at += n as u64;
        match version_of_block(path, here, block, max) {
            None => return Verdict::Wrong,
            Some(v) => match seen {
                None => seen = Some(v),
                Some(s) if s != v => {
                    // A block can match several versions only by chance of 8+ bytes: none.
                    return Verdict::Mixed;
                }
                Some(_) => {}
            },
        }
    }
    Verdict::Good
}

fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, size.parse().ok()?))
}

async fn one_request(
    client: &reqwest::Client,
    proxy: SocketAddr,
    versions: &Versions,
    tally: &Tally,
    rng_seed: u64,
) {
    let (group, path, range, abandon) = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
        let group = Group::ALL[rng.random_range(0..Group::ALL.len())];
        let obj = rng.random_range(0..OBJECTS_PER_GROUP);
        let size = SIZES[obj % SIZES.len()];
        let path = format!("/obj/{size}/{}-{obj}.bin", group.host());
        let range = if rng.random_bool(0.5) {
            let a = rng.random_range(0..size);
            let len = rng.random_range(1..=512 * 1024u64);
            Some((a, (a + len - 1).min(size - 1)))
        } else {
            None
        };
        (group, path, range, rng.random_bool(0.04))
    };
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let mut req = client
        .get(format!("http://{proxy}{path}"))
        .header("host", group.host());
    if let Some((a, b)) = range {
        req = req.header("range", format!("bytes={a}-{b}"));
    }
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout (head)"
            } else {
                "no response"
            };
            tally.kind(format!("{kind} [{}]", group.host()));
            return;
        }
    };
    let status = resp.status().as_u16();
    let size: u64 = path
        .split('/')
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (start, expected_len) = match status {
        200 => (0, size),
        206 => {
            let cr = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match cr {
                Some((a, b, total)) if total == size && b >= a && b < size => {
                    if let Some((ra, rb)) = range {
                        if (a, b) != (ra, rb) {
                            tally.kind(format!("206 for another range [{}]", group.host()));
                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    (a, b - a + 1)
                }
                _ => {
                    tally.kind(format!("206 with a bad Content-Range [{}]", group.host()));
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        s => {
            tally.kind(format!("status {s} [{}]", group.host()));
            return;
        }
    };
    let mut body = Vec::with_capacity(expected_len.min(4 << 20) as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                if abandon {
                    tally.abandoned.fetch_add(1, Ordering::Relaxed);
                    // Verify what arrived, then leave.
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout (body)"
                } else {
                    "aborted body"
                };
                tally.kind(format!("{kind} [{}]", group.host()));
                // What arrived before the abort must still be right.
                if !matches!(
                    verify(&path, start, &body, versions.max(group)),
                    Verdict::Good
                ) {
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                    tally.kind(format!("WRONG bytes before an abort [{}]", group.host()));
                }
                return;
            }
        }
    }
    if !abandon && body.len() as u64 != expected_len {
        // A clean end before the last byte: the client cannot tell.
        tally.short.fetch_add(1, Ordering::Relaxed);
        tally.kind(format!(
            "SILENTLY SHORT ({status}, {} of {expected_len}) [{}]",
            body.len(),
            group.host()
        ));
    }
    if body.len() as u64 > expected_len {
        tally.wrong.fetch_add(1, Ordering::Relaxed);
        tally.kind(format!(
            "WRONG: body longer than declared [{}]",
            group.host()
        ));
        return;
    }
    match verify(&path, start, &body, versions.max(group)) {
        Verdict::Good => {
            if !abandon {
                tally.verified.fetch_add(1, Ordering::Relaxed);
                tally
                    .verified_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
            }
        }
        Verdict::Wrong => {
            tally.wrong.fetch_add(1, Ordering::Relaxed);
            tally.kind(format!("WRONG bytes ({status}) [{}]", group.host()));
        }
        Verdict::Mixed => {
            tally.mixed.fetch_add(1, Ordering::Relaxed);
            tally.kind(format!("MIXED versions ({status}) [{}]", group.host()));
        }
    }
}

// ---- the liar: a raw origin ------------------------------------------------------------------

/// A raw HTTP/1.1 origin (one request per connection): `GET /obj/<size>/...` with ETag
/// `"L<version>"` and `max-age=2`; a conditional request after a version change gets a 304
/// carrying the new ETag (not a 200); a third of the single-range requests get a 206 whose
/// body is 1,000 bytes longer than its Content-Range: junk first with a Content-Length
/// matching the longer body, or junk last in a close-delimited body (no Content-Length).
async fn liar(listener: tokio::net::TcpListener, version: Arc<AtomicU32>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok((mut sock, _))) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        else {
            continue;
        };
        let version = version.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let head_end = loop {
                let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(10), sock.read(&mut tmp)).await
                else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p;
                }
                if buf.len() > 64 * 1024 {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let target = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("/")
                .to_string();
            let mut range = None;
            let mut inm = None;
            let mut if_range = None;
            for l in lines {
                let Some((k, v)) = l.split_once(':') else {
                    continue;
                };
                let v = v.trim().to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(v),
                    "if-none-match" => inm = Some(v),
                    "if-range" => if_range = Some(v),
                    _ => {}
                }
            }
            let path = target.split('?').next().unwrap_or("/").to_string();
            let Some(size) = path
                .strip_prefix("/obj/")
                .and_then(|r| r.split('/').next())
                .and_then(|s| s.parse::<u64>().ok())
            else {
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                return;
            };
            let v = version.load(Ordering::SeqCst);
            let etag = format!("\"L{v}\"");
            let common = format!(
                "ETag: {etag}\r\nCache-Control: max-age=2\r\nAccept-Ranges: bytes\r\nDate: {}\r\nConnection: close\r\n",
                httpdate::fmt_http_date(std::time::SystemTime::now())
            );
            if inm.is_some() {
                // Honest when unchanged; after a change, a 304 with the new ETag: the lie.
                let head = format!("HTTP/1.1 304 Not Modified\r\n{common}\r\n");
                let _ = sock.write_all(head.as_bytes()).await;
                return;
            }
            let ranged = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    let a: u64 = a.parse().ok()?;
                    let b: u64 = if b.is_empty() {
                        size - 1
                    } else {
                        b.parse().ok()?
                    };
                    (a <= b && a < size).then_some((a, b.min(size - 1)))
                })
                .filter(|_| if_range.as_deref().is_none_or(|t| t == etag));
            let (head, pre_junk, from, len, post_junk) = match ranged {
                Some((a, b)) => {
                    let len = b - a + 1;
                    let lie = rand::rng().random_range(0..3);
                    let (pre, post) = match lie {
                        0 => (1000u64, 0u64),
                        1 => (0, 1000),
                        _ => (0, 0),
                    };
                    let length = if post > 0 {
                        String::new()
                    } else {
                        format!("Content-Length: {}\r\n", len + pre)
                    };
                    (
                        format!(
                            "HTTP/1.1 206 Partial Content\r\n{common}Content-Range: bytes {a}-{b}/{size}\r\n{length}\r\n"
                        ),
                        pre,
                        a,
                        len,
                        post,
                    )
                }
                None => (
                    format!("HTTP/1.1 200 OK\r\n{common}Content-Length: {size}\r\n\r\n"),
                    0,
                    0,
                    size,
                    0,
                ),
            };
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            if pre_junk > 0
                && sock
                    .write_all(&vec![0xAA; pre_junk as usize])
                    .await
                    .is_err()
            {
                return;
            }
            let mut pos = from;
            let end = from + len;
            let mut piece = vec![0u8; BLOCK];
            while pos < end {
                let n = ((end - pos) as usize).min(BLOCK);
                fill_content(&path, v, pos, &mut piece[..n]);
                if sock.write_all(&piece[..n]).await.is_err() {
                    return;
                }
                pos += n as u64;
            }
            if post_junk > 0 {
                let _ = sock.write_all(&vec![0x55; post_junk as usize]).await;
            }
            let _ = sock.shutdown().await;
        });
    }
}

// ---- the run ---------------------------------------------------------------------------------

fn config(
    flaky: [&Origin; 2],
    chunked: &Origin,
    ignore: &Origin,
    noval: &Origin,
    liar: SocketAddr,
) -> String {
    let group = |name: &str, servers: &[String]| {
        let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "  {name}:\n    servers: [{}]\n    connect_timeout: 500ms\n    read_timeout: 2s\n    deadline: 10s\n    retry:\n      attempts: 3\n      backoff: 20ms\n      max_backoff: 200ms\n",
            list.join(", ")
        )
    };
    let route = |host: &str, up: &str| {
        format!("  - host: {host}\n    path_prefix: /\n    upstream: {up}\n    cache: true\n")
    };
    format!(
        "cache:\n  chunk_size: 256KiB\n  memory:\n    capacity: 24MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 48MiB\n  stale_if_error: 1h\nupstreams:\n{}{}{}{}{}routes:\n{}{}{}{}{}",
        group(
            "flaky",
            &[flaky[0].addr().to_string(), flaky[1].addr().to_string()]
        ),
        group("chunked", &[chunked.addr().to_string()]),
        group("ignore", &[ignore.addr().to_string()]),
        group("noval", &[noval.addr().to_string()]),
        group("liar", &[liar.to_string()]),
        route("flaky.test", "flaky"),
        route("chunked.test", "chunked"),
        route("ignore.test", "ignore"),
        route("noval.test", "noval"),
        route("liar.test", "liar"),
    )
}

fn fds_of(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

use rand::SeedableRng;

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: no soak there.
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("SOAK_SECS").is_none() {
        println!("soak: skipped (run it with `cargo bench --bench soak`, or set SOAK_SECS)");
        return;
    }
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .or_else(|| std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()))
        .unwrap_or(600);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let failed = rt.block_on(run(Duration::from_secs(secs)));
    std::process::exit(i32::from(failed));
}

async fn run(duration: Duration) -> bool {
    let flaky = [Origin::start().await, Origin::start().await];
    let chunked = Origin::start().await;
    let ignore = Origin::start().await;
    let noval = Origin::start().await;
    for o in &flaky {
        o.set_cache_control(Some("max-age=5"));
    }
    chunked.set_fault(Fault::ChunkedNoLength);
    ignore.set_fault(Fault::IgnoreRange);
    noval.set_fault(Fault::NoValidators { size: None });
    noval.set_cache_control(Some("max-age=3"));
    let liar_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let liar_addr = liar_listener.local_addr().expect("addr");
    let liar_version = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(liar(liar_listener, liar_version.clone(), stop.clone()));

    let yaml = config([&flaky[0], &flaky[1]], &chunked, &ignore, &noval, liar_addr);
    let proxy = Proxy::start(&yaml);
    let pid = proxy.pid();
    println!(
        "soak: {duration:?}, {CLIENTS} clients, proxy pid {pid} at {}",
        proxy.addr
    );

    let versions = Arc::new(Versions(Default::default()));
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let end = start + duration;

    // Clients.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, versions, tally) = (client.clone(), versions.clone(), tally.clone());
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let seed = (c as u64) << 40 | n;
                one_request(&client, addr, &versions, &tally, seed).await;
                n += 1;
            }
        }));
    }

    // Faults, version flips and samples.
    let mut rss = (u64::MAX, 0u64);
    let mut fds = (u64::MAX, 0u64);
    let mut tick = 0u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if tick.is_multiple_of(3) {
            for o in &flaky {
                let f = match rng.random_range(0..100) {
                    0..50 => None,
                    50..65 => Some(Fault::Status(503)),
                    65..70 => Some(Fault::Hang),
                    70..80 => Some(Fault::Slow {
                        bytes_per_sec: 256 * 1024,
                    }),
                    _ => Some(Fault::ResetMidBody {
                        after: rng.random_range(10_000..1_500_000),
                    }),
                };
                match f {
                    Some(f) => o.set_fault(f),
                    None => o.clear_fault(),
                }
            }
            chunked.set_fault(if rng.random_bool(0.2) {
                Fault::SlowChunked {
                    bytes_per_sec: 512 * 1024,
                }
            } else {
                Fault::ChunkedNoLength
            });
            let v = rss_of(pid);
            rss = (rss.0.min(v), rss.1.max(v));
            let f = fds_of(pid);
            fds = (fds.0.min(f), fds.1.max(f));
        }
        // Versions only grow: the highest is published before any origin serves it.
        if tick.is_multiple_of(10) {
            let v = versions.max(Group::Flaky) + 1;
            versions.0[Group::Flaky.index()].store(v, Ordering::SeqCst);
            for o in &flaky {
                o.set_etag_version(v);
            }
        }
        if tick.is_multiple_of(7) {
            let v = versions.max(Group::NoVal) + 1;
            versions.0[Group::NoVal.index()].store(v, Ordering::SeqCst);
            noval.set_etag_version(v);
        }
        if tick.is_multiple_of(13) {
            let v = versions.max(Group::Liar) + 1;
            versions.0[Group::Liar.index()].store(v, Ordering::SeqCst);
            liar_version.store(v, Ordering::SeqCst);
        }
        if tick.is_multiple_of(30) {
            println!(
                "  {:>4}s: {} requests, {} verified, {} wrong, {} mixed, {} short; RSS {} MiB, fds {}",
                start.elapsed().as_secs(),
                tally.requests.load(Ordering::Relaxed),
                tally.verified.load(Ordering::Relaxed),
                tally.wrong.load(Ordering::Relaxed),
                tally.mixed.load(Ordering::Relaxed),
                tally.short.load(Ordering::Relaxed),
                rss_of(pid) / 1024,
                fds_of(pid),
            );
        }
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
    }
    stop.store(true, Ordering::Relaxed);
    let stats = proxy.stats().await;

    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (wrong, mixed, short) = (n(&tally.wrong), n(&tally.mixed), n(&tally.short));
    println!("\nsoak summary ({:?})", start.elapsed());
    println!("  requests            {}", n(&tally.requests));
    println!(
        "  verified bodies     {} ({} MiB)",
        n(&tally.verified),
        n(&tally.verified_bytes) >> 20
    );
    println!("  abandoned by client {}", n(&tally.abandoned));
    println!("  WRONG               {wrong}");
    println!("  MIXED               {mixed}");
    println!("  SILENTLY SHORT      {short}");
    println!("  client errors and failures by kind:");
    for (k, v) in tally.kinds.lock().unwrap().iter() {
        println!("    {v:>7}  {k}");
    }
    println!(
        "  RSS min/max         {} / {} MiB",
        rss.0 / 1024,
        rss.1 / 1024
    );
    println!("  open fds min/max    {} / {}", fds.0, fds.1);
    println!(
        "  origin requests     flaky {} + {}, chunked {}, ignore {}, noval {}",
        flaky[0].requests(),
        flaky[1].requests(),
        chunked.requests(),
        ignore.requests(),
        noval.requests()
    );
    for k in [
        "origin_resumes",
        "origin_retries",
        "cache_stale_served",
        "cache_disk_write_errors",
    ] {
        println!("  {k:<20} {}", stats.get(k).copied().unwrap_or(0));
    }
    let log = proxy.log();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("ERROR")) {
        // The message without its timestamp and request id.
        let msg = l.split("] ").nth(1).unwrap_or(l);
        let msg: String = msg
            .split_whitespace()
            .filter(|w| !w.starts_with("rid="))
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        *errors.entry(msg).or_default() += 1;
    }
    let mut errors: Vec<_> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    println!("  ERROR lines of the proxy, by message (top 8):");
    for (m, n) in errors.iter().take(8) {
        println!("    {n:>7}  {m}");
    }
    println!(
        "  log lines           {} ({} ERROR, {} 'failed to acquire reusable stream', {} panicked)",
        log.lines().count(),
        log.lines().filter(|l| l.contains("ERROR")).count(),
        log.matches("failed to acquire reusable stream").count(),
        log.matches("panicked").count()
    );
    wrong + mixed + short > 0
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}
