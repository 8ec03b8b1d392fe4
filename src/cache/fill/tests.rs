//! Unit tests of the fill stages against [`FakeOrigin`], an in-memory origin with scripted
//! faults: discovery, revalidation, runs, resume, version changes and abandoned fills, each
//! checked for the exact bytes its readers get and the exact origin requests it cost.
//!
//! The cache is memory-only with 1000-byte chunks. Every read goes through a timeout, so a
//! fill that leaves a waiter hanging fails the test instead of hanging it.

use super::run::claim;
use super::*;
use crate::cache::key::ObjectVersion;
use crate::config::{CachePolicy, CacheSettings};
use async_trait::async_trait;
use pingora_http::ResponseHeader;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

const CHUNK: u64 = 1000;
/// Longest any read may take before the test calls it a hang.
const WAIT: Duration = Duration::from_secs(2);
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

/// The version `validator` of `key`, as the fill stages name its chunks.
fn version_of(key: &ObjectKey, validator: &str) -> ObjectVersion {
    ObjectVersion::new(key.clone(), validator.into())
}

/// The fake origin's servers: the first one not in `avoid` answers.
const SERVERS: [SocketAddr; 2] = [
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1)),
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 2)),
];

/// Bytes that differ from offset to offset and from seed to seed (no short period, so a byte
/// served from the wrong offset or the wrong version is noticed).
fn pattern(len: usize, seed: u32) -> Bytes {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// One version of the fake origin's object.
#[derive(Clone)]
struct Version {
    body: Bytes,
    etag: String,
    last_modified: String,
}

fn version(len: usize, seed: u32, etag: &str) -> Version {
    Version {
        body: pattern(len, seed),
        etag: etag.into(),
        last_modified: if seed == 1 {
            LAST_MODIFIED.into()
        } else {
            format!("Thu, 22 Oct 2015 07:28:{:02} GMT", seed % 60)
        },
    }
}

/// How the fake origin answers one request (in request order; `Answer::default()` is a
/// correct HTTP answer from the current version).
#[derive(Clone, Default)]
struct Answer {
    /// Answer this status with an empty body instead of the object.
    status: Option<u16>,
    /// `open` fails (every server failing).
    refuse: bool,
    /// The body breaks off with an error after this many bytes.
    reset_after: Option<usize>,
    /// The body ends early, cleanly, after this many bytes.
    end_after: Option<usize>,
    /// Answer 200 with the whole object, whatever the Range.
    ignore_range: bool,
    /// A 206 carries at most this many bytes (an origin that shortens ranges).
    max_range: Option<u64>,
    /// Ignore If-None-Match / If-Modified-Since.
    ignore_conditionals: bool,
    /// A chunked 200 of the whole object: no Content-Length.
    chunked: bool,
    /// From this request on the object is this version.
    new_version: Option<Version>,
    /// `open` waits for a permit of this semaphore before answering.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Reading the body panics (the fill task dies).
    panic_in_body: bool,
    /// Answer 304 whatever the request (with the current version's validators).
    force_304: bool,
    /// Bytes sent after the body the answer promises (a body longer than its range).
    extra: Option<Bytes>,
    /// A 206 without Content-Length (chunked or close-delimited): its length is known only
    /// at its end.
    unframed: bool,
}

/// What the fake origin was asked, and how it answered.
#[derive(Clone, Debug)]
struct Seen {
    range: Option<(u64, u64)>,
    headers: Vec<(&'static str, String)>,
    avoid: Vec<SocketAddr>,
    until: Option<Instant>,
    server: SocketAddr,
    status: u16,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct FakeOrigin {
    object: Mutex<Version>,
    cache_control: String,
    script: Mutex<VecDeque<Answer>>,
    piece_size: usize,
    resumes: u32,
    seen: Mutex<Vec<Seen>>,
    body_bytes: Arc<AtomicU64>,
    resumes_counted: AtomicU32,
    /// Answers carry ETag and Last-Modified (false: an object without a validator).
    validators: bool,
}

impl FakeOrigin {
    fn new(object: Version) -> FakeOrigin {
        FakeOrigin {
            object: Mutex::new(object),
            cache_control: "max-age=3600".into(),
            script: Mutex::new(VecDeque::new()),
            piece_size: 300,
            resumes: 2,
            seen: Mutex::new(Vec::new()),
            body_bytes: Arc::new(AtomicU64::new(0)),
            resumes_counted: AtomicU32::new(0),
            validators: true,
        }
    }

    fn without_validators(mut self) -> FakeOrigin {
        self.validators = false;
        self
    }

    fn script(self, answers: Vec<Answer>) -> FakeOrigin {
        *self.script.lock().unwrap() = answers.into();
        self
    }

    /// The next answer a chunked 200 without a length.
    fn chunked(self) -> FakeOrigin {
        self.script(vec![Answer {
            chunked: true,
            ..Answer::default()
        }])
    }

    fn cache_control(mut self, value: &str) -> FakeOrigin {
        self.cache_control = value.into();
        self
    }

    fn build(self) -> (Arc<FakeOrigin>, OriginAccess) {
        let fake = Arc::new(self);
        (fake.clone(), fake)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }

    fn resumes_counted(&self) -> u32 {
        self.resumes_counted.load(Ordering::Relaxed)
    }

    /// Status, extra headers and body of a correct answer to `req` from `v`.
    fn answer(
        &self,
        req: &OriginRequest,
        v: &Version,
        a: &Answer,
    ) -> (u16, Vec<(&'static str, String)>, Option<Bytes>) {
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let total = v.body.len() as u64;
        if let Some(status) = a.status {
            return (status, vec![("content-length", "0".into())], None);
        }
        let not_modified = match (header("if-none-match"), header("if-modified-since")) {
            (Some(inm), _) => inm == v.etag,
            (None, Some(ims)) => ims == v.last_modified,
            (None, None) => false,
        };
        if a.force_304 || (not_modified && !a.ignore_conditionals) {
            return (304, Vec::new(), None);
        }
        let whole = |v: &Version| {
            let mut h = Vec::new();
            if !a.chunked {
                h.push(("content-length", total.to_string()));
            }
            (200, h, Some(v.body.clone()))
        };
        let Some((first, last)) = req.range.filter(|_| !a.ignore_range && !a.chunked) else {
            return whole(v);
        };
        if header("if-range").is_some_and(|ir| ir != v.etag && ir != v.last_modified) {
            return whole(v);
        }
        if first >= total {
            return (
                416,
                vec![
                    ("content-range", format!("bytes */{total}")),
                    ("content-length", "0".into()),
                ],
                None,
            );
        }
        let mut last = last.min(total - 1);
        if let Some(max) = a.max_range {
            last = last.min(first + max - 1);
        }
        let body = v.body.slice(first as usize..=last as usize);
        let mut fields = vec![("content-range", format!("bytes {first}-{last}/{total}"))];
        if !a.unframed {
            fields.push(("content-length", body.len().to_string()));
        }
        (206, fields, Some(body))
    }
}

#[async_trait]
impl Origin for FakeOrigin {
    async fn open(
        &self,
        req: &OriginRequest,
        avoid: &[SocketAddr],
        until: Option<Instant>,
    ) -> Result<Reply, FetchError> {
        let a = self.script.lock().unwrap().pop_front().unwrap_or_default();
        if let Some(gate) = &a.gate {
            gate.acquire().await.unwrap().forget();
        }
        let v = {
            let mut object = self.object.lock().unwrap();
            if let Some(new) = &a.new_version {
                *object = new.clone();
            }
            object.clone()
        };
        let server = *SERVERS
            .iter()
            .find(|s| !avoid.contains(s))
            .unwrap_or(&SERVERS[0]);
        let (status, mut fields, body) = if a.refuse {
            (0, Vec::new(), None)
        } else {
            self.answer(req, &v, &a)
        };
        self.seen.lock().unwrap().push(Seen {
            range: req.range,
            headers: req.headers.clone(),
            avoid: avoid.to_vec(),
            until,
            server,
            status,
        });
        if a.refuse {
            return Err(FetchError {
                message: "fake origin refused".into(),
                server: Some(server),
                status: None,
                timed_out: false,
                class: None,
                tls: None,
            });
        }
        if matches!(status, 200 | 206 | 304) {
            if self.validators {
                fields.push(("etag", v.etag.clone()));
                fields.push(("last-modified", v.last_modified.clone()));
            }
            fields.push(("cache-control", self.cache_control.clone()));
        }
        let mut header = ResponseHeader::build(status, None).unwrap();
        for (name, value) in fields {
            header.insert_header(name, value).unwrap();
        }
        let mut body = body.unwrap_or_default();
        if let Some(extra) = &a.extra {
            let mut longer = bytes::BytesMut::from(&body[..]);
            longer.extend_from_slice(extra);
            body = longer.freeze();
        }
        let mut reset = false;
        if let Some(n) = a.reset_after {
            body.truncate(n);
            reset = true;
        }
        if let Some(n) = a.end_after {
            body.truncate(n);
        }
        let mut pieces = VecDeque::new();
        while !body.is_empty() {
            pieces.push_back(body.split_to(self.piece_size.min(body.len())));
        }
        Ok(Box::new(FakeReply {
            header,
            server,
            pieces,
            reset,
            panic: a.panic_in_body,
            sent: self.body_bytes.clone(),
        }))
    }

    fn resumes(&self) -> u32 {
        self.resumes
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn count_resume(&self) {
        self.resumes_counted.fetch_add(1, Ordering::Relaxed);
    }

    fn all_failing(&self) -> bool {
        false
    }

    fn name(&self) -> &str {
        "fake"
    }
}

struct FakeReply {
    header: ResponseHeader,
    server: SocketAddr,
    pieces: VecDeque<Bytes>,
    /// After the pieces, an error instead of the end of the body.
    reset: bool,
    panic: bool,
    sent: Arc<AtomicU64>,
}

#[async_trait]
impl OriginReply for FakeReply {
    fn header(&self) -> &ResponseHeader {
        &self.header
    }

    fn server(&self) -> SocketAddr {
        self.server
    }

    async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        assert!(!self.panic, "fake origin: the fill task dies");
        if let Some(piece) = self.pieces.pop_front() {
            self.sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            return Ok(Some(piece));
        }
        if std::mem::take(&mut self.reset) {
            return Err(FetchError {
                message: "fake origin: connection reset".into(),
                server: Some(self.server),
                status: None,
                timed_out: false,
                class: None,
                tls: None,
            });
        }
        Ok(None)
    }

    async fn finish(self: Box<Self>) {}
}

// ---- harness ------------------------------------------------------------------------------

fn cache() -> Arc<ChunkCache> {
    cache_keeping(1 << 20)
}

/// A cache that keeps objects of at most `max_object_size` bytes from origins that send them
/// whole.
fn cache_keeping(max_object_size: u64) -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::new(&CacheSettings {
            chunk_size: CHUNK,
            max_object_size,
            default_ttl: None,
            heuristic_fraction: 0.0,
            heuristic_max: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            max_ranges: 16,
            max_concurrent_fills: 4,
            memory_capacity: 1 << 20,
            response_budget: 64 << 20,
            metadata_capacity: 1 << 20,
            disk: None,
        })
        .unwrap(),
    )
}

fn request(path: &str) -> ObjectRequest {
    ObjectRequest {
        key: ObjectKey(format!("fake|example.test|{path}").into()),
        base: ObjectKey(format!("fake|example.test|{path}").into()),
        path_and_query: path.into(),
        host: "example.test".into(),
        request_id: "test".into(),
        forward: Default::default(),
        policy: Arc::new(CachePolicy {
            default_ttl: None,
            stale_if_error: Duration::ZERO,
            heuristic_fraction: 0.0,
            heuristic_max: Duration::ZERO,
            max_ranges: 16,
        }),
    }
}

/// Metadata as discovery would have stored it for `v`.
fn meta_of(v: &Version, fresh_until: SystemTime) -> Arc<ObjectMeta> {
    Arc::new(ObjectMeta {
        status: 200,
        size: v.body.len() as u64,
        validator: v.etag.clone(),
        etag: Some(v.etag.clone()),
        last_modified: Some(v.last_modified.clone()),
        headers: vec![
            ("etag".into(), v.etag.clone()),
            ("last-modified".into(), v.last_modified.clone()),
            ("cache-control".into(), "max-age=3600".into()),
        ],
        stored_at: SystemTime::now(),
        initial_age: 0,
        fresh_until,
        stale_if_error: Duration::ZERO,
        must_revalidate: false,
        stale_while_revalidate: Duration::ZERO,
        wire: Default::default(),
    })
}

/// A known, fresh object `v` whose metadata is in the cache (and none of its chunks).
/// Discovery as a request runs it: under the object's lock.
/// Discover `obj` on a cold cache, expecting a streamed answer (a body of unknown length).
async fn stream_cold(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
) -> tokio::sync::mpsc::Receiver<BodyStep> {
    let Discovery::Streaming { body, .. } = discover_cold(cache, origin, obj, 0, 0).await else {
        panic!("streamed");
    };
    body
}

async fn discover_cold(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    first: u64,
    last: u64,
) -> Discovery {
    let lock = cache.lock_object(&obj.key).await;
    discover(cache, origin, obj, first, last, lock).await
}

async fn known(cache: &ChunkCache, obj: &ObjectRequest, v: &Version) -> Arc<ObjectMeta> {
    let meta = meta_of(v, SystemTime::now() + Duration::from_secs(3600));
    cache.put_meta(&obj.key, meta.clone()).await;
    meta
}

fn chunk_of(v: &Version, index: u64) -> &[u8] {
    let start = (index * CHUNK) as usize;
    let end = (start + CHUNK as usize).min(v.body.len());
    &v.body[start..end]
}

/// Everything a reader of a whole chunk gets from a flight: the bytes, then how it ended.
async fn read_flight(f: &Arc<Flight>, len: u64) -> (Vec<u8>, Result<(), FillError>) {
    let mut reader = f.reader(0, len);
    let mut out = Vec::new();
    let read = async {
        while let Some(piece) = reader.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(())
    };
    let end = tokio::time::timeout(WAIT, read)
        .await
        .expect("a reader hung on its fill");
    (out, end)
}

async fn read_source(src: ChunkSource, len: u64) -> (Vec<u8>, Result<(), FillError>) {
    match src {
        ChunkSource::Ready(b) => (b.to_vec(), Ok(())),
        ChunkSource::Filling(f) => read_flight(&f, len).await,
    }
}

/// Chunk `index` as a client reads it that needs chunks up to `last`.
async fn read_chunk(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
    index: u64,
    last: u64,
) -> Result<Vec<u8>, FillError> {
    let validator = version_of(&obj.key, meta.validator.as_str());
    let src = chunk_source(cache, origin, obj, meta, &validator, index, last).await;
    let (bytes, end) = read_source(src, chunk_len(cache, meta, index)).await;
    end.map(|()| bytes)
}

/// Wait for the cache's background tasks (fills) to end.
async fn settle(cache: &ChunkCache) {
    tokio::time::timeout(WAIT, async {
        while cache.running_tasks() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("a fill task never ended");
}

async fn read_reply(resp: &mut Reply) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(piece) = resp.next_piece().await.unwrap() {
        out.extend_from_slice(&piece);
    }
    out
}

// ---- discovery ----------------------------------------------------------------------------

#[tokio::test]
async fn discovery_of_a_cold_object_asks_one_aligned_range_and_fills_the_claimed_chunks() {
    let cache = cache();
    let v = version(3500, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/cold");
    let meta = match discover_cold(&cache, &origin, &obj, 1, 2).await {
        Discovery::Stored(m) => m,
        _ => panic!("a cacheable 206 is stored"),
    };
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].range, Some((1000, 2999)), "chunk-aligned");
    assert!(seen[0].headers.is_empty() && seen[0].avoid.is_empty());
    assert_eq!(meta.size, 3500);
    assert_eq!(meta.validator, "\"v1\"");
    assert!(meta.fresh_until > SystemTime::now() + Duration::from_secs(3500));
    assert_eq!(
        cache.meta(&obj.key).await.as_deref(),
        Some(&*meta),
        "published"
    );

    for index in [1, 2] {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(
        fake.requests(),
        1,
        "the claimed chunks came with the discovery"
    );
    settle(&cache).await;
    assert_eq!(fake.body_bytes(), 2000);

    // A second read of the same chunks is served from memory.
    for index in [1, 2] {
        let validator = version_of(&obj.key, meta.validator.as_str());
        let src = chunk_source(&cache, &origin, &obj, &meta, &validator, index, 2).await;
        assert!(matches!(src, ChunkSource::Ready(ref b) if b[..] == *chunk_of(&v, index)));
    }
    assert_eq!(fake.requests(), 1);

    // The rest of the object: one run each side, the short last chunk exact.
    assert_eq!(
        read_chunk(&cache, &origin, &obj, &meta, 0, 0)
            .await
            .unwrap(),
        chunk_of(&v, 0)
    );
    assert_eq!(
        read_chunk(&cache, &origin, &obj, &meta, 3, 3)
            .await
            .unwrap(),
        chunk_of(&v, 3)
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].range, Some((0, 999)));
    assert_eq!(seen[2].range, Some((3000, 3499)));
    assert_eq!(seen[2].header("if-range"), Some("\"v1\""));
}

#[tokio::test]
async fn discovery_past_the_end_learns_the_object_from_its_start() {
    let cache = cache();
    let v = version(2500, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/short");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 5, 6).await else {
        panic!("stored after the 416");
    };
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].range, seen[0].status), (Some((5000, 6999)), 416));
    assert_eq!((seen[1].range, seen[1].status), (Some((0, 1999)), 206));
    assert_eq!(meta.size, 2500);
    for index in 0..3 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 3, "chunk 2 was not part of the discovery");
}

#[tokio::test]
async fn discovery_from_an_origin_that_ignores_range_fills_every_chunk_from_one_200() {
    let cache = cache();
    let v = version(3200, 1, "\"v1\"");
    let answer = Answer {
        ignore_range: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/whole");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 2, 2).await else {
        panic!("a cacheable 200 is stored");
    };
    assert_eq!(meta.size, 3200);
    for index in 0..4 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 3).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 1);
    assert_eq!(fake.seen()[0].status, 200);
}

#[tokio::test]
async fn discovery_relays_error_statuses_and_uncacheable_whole_answers() {
    for (status, remembered) in [(404, true), (500, false), (503, false)] {
        let cache = cache();
        let answer = Answer {
            status: Some(status),
            ..Answer::default()
        };
        let (fake, origin) = FakeOrigin::new(version(3000, 1, "\"v1\""))
            .script(vec![answer])
            .build();
        let obj = request("/error");
        match discover_cold(&cache, &origin, &obj, 0, 0).await {
            Discovery::Relay {
                resp,
                reason,
                remember,
            } => {
                assert_eq!(resp.status(), status);
                assert_eq!(reason, "status");
                assert_eq!(remember, remembered, "{status}");
            }
            _ => panic!("{status} is relayed"),
        }
        assert_eq!(fake.requests(), 1, "{status}: the origin is asked once");
        assert!(cache.meta(&obj.key).await.is_none());
    }

    // A whole 200 that must not be stored answers the request as it is.
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        ignore_range: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone())
        .cache_control("no-store")
        .script(vec![answer])
        .build();
    let obj = request("/no-store");
    match discover_cold(&cache, &origin, &obj, 0, 0).await {
        Discovery::Relay {
            mut resp,
            reason,
            remember,
        } => {
            assert_eq!(resp.status(), 200);
            assert_eq!((reason, remember), ("no-store", true));
            assert_eq!(read_reply(&mut resp).await, v.body[..]);
        }
        _ => panic!("an uncacheable 200 is relayed"),
    }
    assert_eq!(fake.requests(), 1);
    assert!(cache.meta(&obj.key).await.is_none());

    // The same as a 206 answers part of the request: handed on to answer it from there.
    let (fake, origin) = FakeOrigin::new(v).cache_control("no-store").build();
    let got = discover_cold(&cache, &origin, &obj, 0, 0).await;
    assert!(matches!(
        got,
        Discovery::Slice {
            reason: "no-store",
            ..
        }
    ));
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn discovery_streams_a_body_of_unknown_length_then_publishes_its_metadata() {
    let cache = cache();
    let v = version(2500, 1, "\"v1\"");
    let answer = Answer {
        chunked: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/chunked");
    let Discovery::Streaming { headers, mut body } =
        discover_cold(&cache, &origin, &obj, 0, 0).await
    else {
        panic!("a chunked 200 with an ETag is streamed");
    };
    assert_eq!(headers.get("etag").unwrap(), "\"v1\"");
    let mut got = Vec::new();
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match body.recv().await {
                Some(BodyStep::Piece(p)) => got.extend_from_slice(&p),
                Some(BodyStep::End) => return true,
                Some(BodyStep::Failed(e)) => panic!("stream failed: {e}"),
                None => return false,
            }
        }
    })
    .await
    .expect("the stream hung");
    assert!(ended, "the stream ends with End");
    assert_eq!(got, v.body[..]);
    assert!(body.recv().await.is_none(), "nothing after End");

    let meta = cache
        .meta(&obj.key)
        .await
        .expect("metadata published at the end");
    assert_eq!((meta.size, meta.validator.as_str()), (2500, "\"v1\""));
    // The chunks were kept as the body passed: reading them costs no request.
    for index in 0..3 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_streamed_body_that_breaks_reports_failure_and_publishes_nothing() {
    let cache = cache();
    let v = version(2500, 1, "\"v1\"");
    let answer = Answer {
        chunked: true,
        reset_after: Some(1500),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/chunked-broken");
    let mut body = stream_cold(&cache, &origin, &obj).await;
    let mut got = Vec::new();
    let failed = tokio::time::timeout(WAIT, async {
        loop {
            match body.recv().await {
                Some(BodyStep::Piece(p)) => got.extend_from_slice(&p),
                Some(BodyStep::End) => return false,
                Some(BodyStep::Failed(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the stream hung");
    assert!(failed, "the client is told the body broke off");
    assert_eq!(got, v.body[..1500]);
    settle(&cache).await;
    assert!(cache.meta(&obj.key).await.is_none());
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn discovery_of_an_empty_object_stores_it_without_chunks() {
    let cache = cache();
    let (fake, origin) = FakeOrigin::new(version(0, 1, "\"v1\"")).build();
    let obj = request("/empty");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 0, 0).await else {
        panic!("an empty object is stored");
    };
    assert_eq!(meta.size, 0);
    let seen = fake.seen();
    assert_eq!((seen[0].range, seen[0].status), (Some((0, 999)), 416));
    assert_eq!((seen[1].range, seen[1].status), (None, 200), "asked whole");
    assert_eq!(seen.len(), 2);
    settle(&cache).await;
    assert!(cache.flights.is_empty(), "no fill claimed");
}

#[tokio::test]
async fn discovery_answered_with_a_shorter_range_completes_its_last_claimed_chunk() {
    let cache = cache();
    let v = version(5000, 1, "\"v1\"");
    // The origin sends 1500 of the 4000 bytes asked: chunk 1 is claimed but half sent.
    let answer = Answer {
        max_range: Some(1500),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/shortened");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 0, 3).await else {
        panic!("stored");
    };
    for index in 0..5 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 4).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let ranges: Vec<_> = fake.seen().iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        [Some((0, 3999)), Some((1500, 1999)), Some((2000, 4999))],
        "the rest of chunk 1, then a run for the chunks never claimed"
    );
}

#[tokio::test]
async fn discovery_skips_a_chunk_another_fill_already_owns() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/gap-in-discovery");
    let validator = version_of(&obj.key, v.etag.as_str());
    // Someone else is filling chunk 1.
    let mut other = claim(&cache, &validator, 1, 1);
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 0, 2).await else {
        panic!("stored");
    };
    for index in [0, 2] {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let ChunkSource::Filling(f) =
        chunk_source(&cache, &origin, &obj, &meta, &validator, 1, 1).await
    else {
        panic!("chunk 1 is still the other fill's");
    };
    assert!(
        !f.is_done(),
        "discovery did not complete a fill it does not own"
    );
    other.complete_front(
        Bytes::copy_from_slice(chunk_of(&v, 1)),
        crate::cache::store::Keep::All,
    );
    assert_eq!(
        read_flight(&f, CHUNK).await,
        (chunk_of(&v, 1).to_vec(), Ok(()))
    );
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_streamed_body_is_kept_after_its_client_has_gone() {
    let cache = cache();
    let v = version(4200, 1, "\"v1\"");
    let answer = Answer {
        chunked: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/chunked-client-gone");
    let Discovery::Streaming { body, .. } = discover_cold(&cache, &origin, &obj, 0, 0).await else {
        panic!("streamed");
    };
    drop(body);
    settle(&cache).await;
    let meta = cache
        .meta(&obj.key)
        .await
        .expect("stored for later requests");
    assert_eq!(meta.size, 4200);
    for index in 0..5 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 4).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn whole_bodies_past_max_object_size_reach_the_client_but_are_not_kept() {
    let v = version(2500, 1, "\"v1\"");
    // Known length: relayed at once.
    let cache = cache_keeping(2000);
    let answer = Answer {
        ignore_range: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/large");
    match discover_cold(&cache, &origin, &obj, 0, 0).await {
        Discovery::Relay {
            mut resp,
            reason,
            remember,
        } => {
            assert_eq!((reason, remember), ("too-large", true));
            assert_eq!(read_reply(&mut resp).await, v.body[..]);
        }
        _ => panic!("too large to keep: relayed"),
    }
    assert_eq!(fake.requests(), 1);

    // Unknown length: streamed whole, then marked uncacheable, no metadata.
    let cache = cache_keeping(2000);
    let answer = Answer {
        chunked: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let mut body = stream_cold(&cache, &origin, &obj).await;
    let mut got = Vec::new();
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(step) = body.recv().await {
            match step {
                BodyStep::Piece(p) => got.extend_from_slice(&p),
                BodyStep::End => return true,
                BodyStep::Failed(e) => panic!("stream failed: {e}"),
            }
        }
        false
    })
    .await
    .expect("the stream hung");
    assert!(ended);
    assert_eq!(got, v.body[..], "the client gets the whole body");
    settle(&cache).await;
    assert!(cache.meta(&obj.key).await.is_none());
    assert!(cache.is_marked_uncacheable(&obj.key));
    assert_eq!(fake.requests(), 1);
}

// ---- runs ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_chunk_fetches_its_run_with_one_request_of_at_most_16_chunks() {
    let cache = cache();
    let v = version(20_500, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/run");
    let meta = known(&cache, &obj, &v).await;

    for index in 2..=17 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 20).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "one request for the run");
    assert_eq!(seen[0].range, Some((2000, 17_999)), "16 chunks");
    assert_eq!(seen[0].header("if-range"), Some("\"v1\""));

    for index in 18..=20 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 20).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].range,
        Some((18_000, 20_499)),
        "to the end of the object"
    );
    settle(&cache).await;
    assert_eq!(fake.body_bytes(), 18_500, "no byte fetched twice");
}

#[tokio::test]
async fn a_run_stops_before_a_chunk_already_cached() {
    let cache = cache();
    let v = version(10_000, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/gap");
    let meta = known(&cache, &obj, &v).await;
    cache.store_chunk(
        &version_of(&obj.key, &v.etag),
        7,
        Bytes::copy_from_slice(chunk_of(&v, 7)),
    );

    for index in 4..=9 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 9).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let ranges: Vec<_> = fake.seen().iter().map(|s| s.range).collect();
    assert_eq!(ranges, [Some((4000, 6999)), Some((8000, 9999))]);
}

#[tokio::test]
async fn concurrent_requests_for_a_chunk_share_one_fill() {
    let cache = cache();
    let v = version(4000, 1, "\"v1\"");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let answer = Answer {
        gate: Some(gate.clone()),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/shared");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, v.etag.as_str());

    let source = || chunk_source(&cache, &origin, &obj, &meta, &validator, 1, 3);
    let (ChunkSource::Filling(a), ChunkSource::Filling(b)) = (source().await, source().await)
    else {
        panic!("both wait on a fill");
    };
    assert!(Arc::ptr_eq(&a, &b), "one flight for both");
    // A later chunk of the same run is joined too, not fetched again.
    let ChunkSource::Filling(c) =
        chunk_source(&cache, &origin, &obj, &meta, &validator, 3, 3).await
    else {
        panic!("chunk 3 is part of the run in flight");
    };
    let readers = [(a, 1), (b, 1), (c, 3)]
        .map(|(f, index)| tokio::spawn(async move { (index, read_flight(&f, CHUNK).await) }));
    gate.add_permits(1);
    for reader in readers {
        let (index, (bytes, end)) = reader.await.unwrap();
        assert_eq!(end, Ok(()));
        assert_eq!(bytes, chunk_of(&v, index), "chunk {index}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].range, Some((1000, 3999)));
}

#[tokio::test]
async fn a_refused_run_fails_its_waiters_and_the_next_request_starts_afresh() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        refuse: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/refused");
    let meta = known(&cache, &obj, &v).await;

    let got = read_chunk(&cache, &origin, &obj, &meta, 0, 2).await;
    assert!(matches!(got, Err(FillError::Origin(_))), "{got:?}");
    settle(&cache).await;
    assert!(cache.flights.is_empty(), "no fill left behind");
    for index in 0..3 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 2);
    assert!(
        cache.meta(&obj.key).await.is_some(),
        "an origin error keeps the object"
    );
}

#[tokio::test]
async fn a_run_from_an_origin_that_ignores_range_skips_to_its_first_byte() {
    let cache = cache();
    let v = version(5000, 1, "\"v1\"");
    let answer = Answer {
        ignore_range: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/no-ranges");
    let meta = known(&cache, &obj, &v).await;

    for index in 2..5 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 4).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].range, seen[0].status), (Some((2000, 4999)), 200));
}

// ---- resume -------------------------------------------------------------------------------

/// A resume answered by a server that ignores Range (a 200 with the whole, same-version object)
/// is cut at the resume point: the bytes before it are skipped, never taken as the next ones.
#[tokio::test]
async fn a_resume_answered_with_the_whole_object_delivers_the_right_bytes() {
    let cache = cache();
    let v = version(5000, 1, "\"v1\"");
    let (_fake, origin) = FakeOrigin::new(v.clone())
        .script(vec![
            Answer {
                reset_after: Some(2500),
                ..Answer::default()
            },
            Answer {
                ignore_range: true,
                ..Answer::default()
            },
        ])
        .build();
    let obj = request("/resume-whole");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, v.etag.as_str());
    let mut sources = Vec::new();
    for index in 0..5 {
        sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 4).await);
    }
    for (index, src) in (0..).zip(sources) {
        let (bytes, end) = read_source(src, CHUNK).await;
        assert_eq!(end, Ok(()), "chunk {index}");
        assert!(bytes == chunk_of(&v, index), "chunk {index}: wrong bytes");
        let stored = cache.memory_chunk(&validator.chunk(index));
        assert_eq!(
            stored.as_deref(),
            Some(chunk_of(&v, index)),
            "chunk {index} stored"
        );
    }
}

#[tokio::test]
async fn a_broken_transfer_resumes_at_the_next_missing_byte_on_another_server() {
    // Resets mid-piece, at a chunk boundary, after the first byte and before the last.
    for reset in [1, 999, 1000, 2000, 2500, 4999] {
        let cache = cache();
        let v = version(5000, 1, "\"v1\"");
        let answer = Answer {
            reset_after: Some(reset),
            ..Answer::default()
        };
        let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
        let obj = request("/resume");
        let meta = known(&cache, &obj, &v).await;
        let validator = version_of(&obj.key, v.etag.as_str());

        let mut sources = Vec::new();
        for index in 0..5 {
            sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 4).await);
        }
        for (index, src) in (0..).zip(sources) {
            let (bytes, end) = read_source(src, CHUNK).await;
            assert_eq!(end, Ok(()), "reset at {reset}, chunk {index}");
            assert_eq!(
                bytes,
                chunk_of(&v, index),
                "reset at {reset}, chunk {index}"
            );
        }
        settle(&cache).await;
        let seen = fake.seen();
        assert_eq!(seen.len(), 2, "reset at {reset}");
        assert_eq!(seen[0].range, Some((0, 4999)));
        assert_eq!(seen[0].server, SERVERS[0]);
        assert_eq!(
            seen[1].range,
            Some((reset as u64, 4999)),
            "resumed at the next missing byte"
        );
        assert_eq!(seen[1].avoid, [SERVERS[0]], "the failed server is avoided");
        assert_eq!(seen[1].server, SERVERS[1]);
        assert_eq!(seen[1].header("if-range"), Some("\"v1\""));
        assert!(
            seen[1].until.is_some(),
            "the resume keeps the transfer's deadline"
        );
        assert_eq!(fake.resumes_counted(), 1);
        assert_eq!(
            fake.body_bytes(),
            5000,
            "reset at {reset}: no byte fetched twice"
        );
    }
}

#[tokio::test]
async fn a_body_that_ends_early_resumes_like_a_reset() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        end_after: Some(1234),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/short-body");
    let meta = known(&cache, &obj, &v).await;

    for index in 0..3 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].range, Some((1234, 2999)));
    assert_eq!(fake.resumes_counted(), 1);
}

#[tokio::test]
async fn a_transfer_that_keeps_breaking_fails_after_the_groups_resumes() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let reset = |n| Answer {
        reset_after: Some(n),
        ..Answer::default()
    };
    // resumes() is 2: the first request and two resumes, each breaking 500 bytes further on.
    let (fake, origin) = FakeOrigin::new(v.clone())
        .script(vec![reset(500), reset(500), reset(500)])
        .build();
    let obj = request("/flaky");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, v.etag.as_str());

    let mut sources = Vec::new();
    for index in 0..3 {
        sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 2).await);
    }
    let mut ends = Vec::new();
    for (index, src) in (0..).zip(sources) {
        let (bytes, end) = read_source(src, CHUNK).await;
        assert_eq!(bytes, chunk_of(&v, index)[..bytes.len()], "a prefix, exact");
        ends.push(end);
    }
    assert_eq!(ends[0], Ok(()), "chunk 0 completed before the third break");
    assert!(
        matches!(ends[1], Err(FillError::Origin(_))),
        "{:?}",
        ends[1]
    );
    assert!(
        matches!(ends[2], Err(FillError::Origin(_))),
        "{:?}",
        ends[2]
    );
    settle(&cache).await;
    let ranges: Vec<_> = fake.seen().iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        [Some((0, 2999)), Some((500, 2999)), Some((1000, 2999))]
    );
    assert_eq!(fake.resumes_counted(), 2);
    assert!(cache.flights.is_empty());
    assert!(cache.meta(&obj.key).await.is_some(), "the object is kept");
}

// ---- version changes ----------------------------------------------------------------------

#[tokio::test]
async fn a_version_change_on_resume_fails_the_fill_without_mixing_bytes() {
    let cache = cache();
    let v1 = version(5000, 1, "\"v1\"");
    let v2 = version(5000, 2, "\"v2\"");
    let (fake, origin) = FakeOrigin::new(v1.clone())
        .script(vec![
            Answer {
                reset_after: Some(1500),
                ..Answer::default()
            },
            Answer {
                new_version: Some(v2.clone()),
                ..Answer::default()
            },
        ])
        .build();
    let obj = request("/changed-on-resume");
    let meta = known(&cache, &obj, &v1).await;
    let validator = version_of(&obj.key, v1.etag.as_str());

    let mut sources = Vec::new();
    for index in 0..5 {
        sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 4).await);
    }
    let mut results = Vec::new();
    for src in sources {
        results.push(read_source(src, CHUNK).await);
    }
    assert_eq!(results[0], (chunk_of(&v1, 0).to_vec(), Ok(())));
    assert_eq!(
        results[1],
        (v1.body[1000..1500].to_vec(), Err(FillError::VersionChanged)),
        "the old version's bytes, then the error: never a byte of v2"
    );
    for (bytes, end) in &results[2..] {
        assert!(bytes.is_empty());
        assert_eq!(*end, Err(FillError::VersionChanged));
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].range, Some((1500, 4999)));
    assert_eq!(seen[1].status, 200, "If-Range did not match");
    assert!(
        cache.meta(&obj.key).await.is_none(),
        "the old version is dropped"
    );
    settle(&cache).await;
    assert!(cache.flights.is_empty());
}

#[tokio::test]
async fn a_run_answered_with_another_version_fails_with_version_changed() {
    for same_length in [true, false] {
        let cache = cache();
        let v1 = version(3000, 1, "\"v1\"");
        let v2 = version(if same_length { 3000 } else { 4500 }, 2, "\"v2\"");
        let (fake, origin) = FakeOrigin::new(v2).build();
        let obj = request("/changed");
        let meta = known(&cache, &obj, &v1).await;

        let validator = version_of(&obj.key, v1.etag.as_str());
        let mut sources = Vec::new();
        for index in 0..3 {
            sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 2).await);
        }
        for (index, src) in sources.into_iter().enumerate() {
            let (bytes, end) = read_source(src, CHUNK).await;
            assert!(bytes.is_empty(), "chunk {index}: no byte of either version");
            assert_eq!(end, Err(FillError::VersionChanged), "chunk {index}");
        }
        assert!(cache.meta(&obj.key).await.is_none(), "old version dropped");
        assert_eq!(fake.requests(), 1);
        assert!(
            cache.memory_chunk(&validator.chunk(0)).is_none(),
            "nothing stored under the old version"
        );
    }
}

// ---- revalidation -------------------------------------------------------------------------

/// A stale copy of `v` in the cache, and the fake origin serving `answers`.
async fn stale(
    v: &Version,
    answers: Vec<Answer>,
) -> (
    Arc<ChunkCache>,
    Arc<FakeOrigin>,
    OriginAccess,
    ObjectRequest,
    Arc<ObjectMeta>,
) {
    let cache = cache();
    let (fake, origin) = FakeOrigin::new(v.clone()).script(answers).build();
    let obj = request("/stale");
    let meta = meta_of(v, SystemTime::now() - Duration::from_secs(10));
    cache.put_meta(&obj.key, meta.clone()).await;
    (cache, fake, origin, obj, meta)
}

#[tokio::test]
async fn revalidation_304_renews_freshness() {
    let v = version(3000, 1, "\"v1\"");
    let (cache, fake, origin, obj, meta) = stale(&v, Vec::new()).await;

    let Revalidation::Fresh(fresh) = revalidate(&cache, &origin, &obj, &meta).await else {
        panic!("304 is fresh");
    };
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 304);
    assert_eq!(seen[0].range, Some((0, 0)));
    assert_eq!(seen[0].header("if-none-match"), Some("\"v1\""));
    assert_eq!(seen[0].header("if-modified-since"), Some(LAST_MODIFIED));
    assert!(fresh.fresh_until > SystemTime::now() + Duration::from_secs(3500));
    assert_eq!((fresh.size, fresh.validator.as_str()), (3000, "\"v1\""));
    let stored = cache.meta(&obj.key).await.unwrap();
    assert_eq!(
        stored.fresh_until, fresh.fresh_until,
        "renewed in the cache"
    );
}

#[tokio::test]
async fn revalidation_with_the_same_validator_is_fresh() {
    for ignore_range in [false, true] {
        let v = version(3000, 1, "\"v1\"");
        let answer = Answer {
            ignore_conditionals: true,
            ignore_range,
            ..Answer::default()
        };
        let (cache, fake, origin, obj, meta) = stale(&v, vec![answer]).await;
        let got = revalidate(&cache, &origin, &obj, &meta).await;
        let Revalidation::Fresh(fresh) = got else {
            panic!("same validator is fresh (ignore_range {ignore_range})");
        };
        assert_eq!(fake.seen()[0].status, if ignore_range { 200 } else { 206 });
        assert!(fresh.fresh_until > SystemTime::now() + Duration::from_secs(3500));
        assert_eq!(fresh.validator, "\"v1\"");
        assert!(cache
            .meta(&obj.key)
            .await
            .unwrap()
            .is_fresh(SystemTime::now()));
    }
}

#[tokio::test]
async fn revalidation_finding_another_version_drops_the_old_one() {
    let v1 = version(3000, 1, "\"v1\"");
    let answer = Answer {
        new_version: Some(version(3000, 2, "\"v2\"")),
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v1, vec![answer]).await;
    let got = revalidate(&cache, &origin, &obj, &meta).await;
    // A 206 of the new version's first byte: discovery asks afresh.
    assert!(matches!(got, Revalidation::Changed(None)));
    assert_eq!(fake.requests(), 1);
    assert!(cache.meta(&obj.key).await.is_none());
}

#[tokio::test]
async fn a_new_version_answered_whole_to_a_revalidation_is_discovered_from_that_answer() {
    let v1 = version(3000, 1, "\"v1\"");
    let v2 = version(3000, 2, "\"v2\"");
    let answer = Answer {
        new_version: Some(v2.clone()),
        ignore_range: true,
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v1, vec![answer]).await;
    let Revalidation::Changed(Some(resp)) = revalidate(&cache, &origin, &obj, &meta).await else {
        panic!("a whole 200 of a new version is handed to discovery");
    };
    let lock = cache.lock_object(&obj.key).await;
    let slot = cache.fill_slot().await;
    let Discovery::Stored(m) =
        discover_from(&cache, &origin, &obj, lock, resp, Some((0, 0)), slot).await
    else {
        panic!("the new version is stored from the revalidation's answer");
    };
    assert_eq!(m.etag.as_deref(), Some("\"v2\""));
    assert!(cache.drain(Duration::from_secs(5)).await);
    let version = ObjectVersion::new(obj.key.clone(), m.validator.as_str().into());
    for index in 0..3 {
        assert!(cache.has_chunk(&version, index), "chunk {index}");
    }
    assert_eq!(
        fake.requests(),
        1,
        "one origin request for revalidation and refill"
    );
}

#[tokio::test]
async fn revalidation_server_error_keeps_the_object_and_other_statuses_drop_it() {
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        status: Some(503),
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v, vec![answer]).await;
    match revalidate(&cache, &origin, &obj, &meta).await {
        Revalidation::Failed(e) => {
            assert_eq!(e.status, Some(503));
            assert_eq!(e.server, Some(SERVERS[0]));
        }
        _ => panic!("503 is a failure"),
    }
    assert_eq!(fake.requests(), 1);
    assert_eq!(
        cache.meta(&obj.key).await,
        Some(meta),
        "kept for stale-if-error"
    );

    let answer = Answer {
        status: Some(404),
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v, vec![answer]).await;
    let got = revalidate(&cache, &origin, &obj, &meta).await;
    // The origin's own answer is the object now: handed to discovery, not asked for again.
    match got {
        Revalidation::Changed(Some(resp)) => assert_eq!(resp.status(), 404),
        _ => panic!("a 404 is the object's new answer"),
    }
    assert_eq!(fake.requests(), 1);
    assert!(cache.meta(&obj.key).await.is_none());
}

// ---- abandoned fills and memory -----------------------------------------------------------

#[tokio::test]
async fn dropping_a_run_fails_its_fills_with_abandoned() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/dropped");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, v.etag.as_str());

    let run = claim(&cache, &validator, 0, 2);
    assert_eq!(run.flights.len(), 3);
    let flights: Vec<_> = run.flights.iter().map(|(_, f)| f.clone()).collect();
    flights[1].push(Bytes::copy_from_slice(&chunk_of(&v, 1)[..10]));
    let readers: Vec<_> = flights
        .into_iter()
        .map(|f| tokio::spawn(async move { read_flight(&f, CHUNK).await }))
        .collect();
    tokio::task::yield_now().await;
    drop(run);
    for (index, reader) in readers.into_iter().enumerate() {
        let (_, end) = reader.await.unwrap();
        assert_eq!(end, Err(FillError::Abandoned), "chunk {index}");
    }
    assert!(cache.flights.is_empty(), "no fill left registered");
    // The next reader starts a new fill.
    let got = read_chunk(&cache, &origin, &obj, &meta, 1, 1).await;
    assert_eq!(got.unwrap(), chunk_of(&v, 1));
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_fill_task_that_dies_leaves_no_waiter_hanging() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        panic_in_body: true,
        ..Answer::default()
    };
    let (_fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/died");
    let meta = known(&cache, &obj, &v).await;

    let got = read_chunk(&cache, &origin, &obj, &meta, 0, 2).await;
    assert_eq!(got, Err(FillError::Abandoned));
    settle(&cache).await;
    assert!(cache.flights.is_empty());
}

#[tokio::test]
async fn a_completed_chunk_holds_only_its_bytes() {
    let cache = cache();
    let v = version(2500, 1, "\"v1\"");
    let (_fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/memory");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, v.etag.as_str());

    let mut flights = Vec::new();
    for index in 0..3 {
        match chunk_source(&cache, &origin, &obj, &meta, &validator, index, 2).await {
            ChunkSource::Filling(f) => flights.push((index, f)),
            ChunkSource::Ready(_) => panic!("chunk {index} is not cached yet"),
        }
    }
    for (index, f) in flights {
        let len = chunk_len(&cache, &meta, index);
        let (bytes, end) = read_flight(&f, len).await;
        assert_eq!((bytes.as_slice(), end), (chunk_of(&v, index), Ok(())));
        assert!(f.is_done());
        assert_eq!(f.held_bytes() as u64, len, "chunk {index}: pieces released");
        let stored = cache.memory_chunk(&validator.chunk(index));
        assert_eq!(stored.as_deref(), Some(chunk_of(&v, index)));
    }
}

/// A cache whose memory tier holds only `chunks` chunks.
fn cache_with_memory_for(chunks: u64) -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::new(&CacheSettings {
            chunk_size: CHUNK,
            max_object_size: 1 << 20,
            default_ttl: None,
            heuristic_fraction: 0.0,
            heuristic_max: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            max_ranges: 16,
            max_concurrent_fills: 4,
            memory_capacity: chunks * CHUNK,
            response_budget: 64 << 20,
            metadata_capacity: 1 << 20,
            disk: None,
        })
        .unwrap(),
    )
}

/// A client reading chunks `first..=last` in order as the proxy does: the chunk just read is
/// held until the next one is found.
async fn read_in_order(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
    first: u64,
    last: u64,
) -> Vec<u8> {
    let version = version_of(&obj.key, meta.validator.as_str());
    let mut out = Vec::new();
    let mut _previous = None;
    for index in first..=last {
        let src = chunk_source(cache, origin, obj, meta, &version, index, last).await;
        let (bytes, end) = match src {
            ChunkSource::Ready(b) => (b.to_vec(), Ok(())),
            ChunkSource::Filling(f) => {
                let got = read_flight(&f, chunk_len(cache, meta, index)).await;
                _previous = Some(f);
                got
            }
        };
        assert_eq!(end, Ok(()), "chunk {index}");
        out.extend_from_slice(&bytes);
    }
    out
}

#[tokio::test]
async fn a_run_filled_ahead_of_its_reader_is_not_fetched_again_when_memory_lets_go_of_it() {
    // Memory for 2 chunks, a run of 8: by the time the reader gets to chunk 1, the memory
    // tier has let go of it (a lagging client; a disk that skipped the write).
    let cache = cache_with_memory_for(2);
    let v = version(8000, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/lagging");
    let meta = known(&cache, &obj, &v).await;
    let version = version_of(&obj.key, v.etag.as_str());

    let first = chunk_source(&cache, &origin, &obj, &meta, &version, 0, 7).await;
    let ChunkSource::Filling(first) = first else {
        panic!("chunk 0 is not cached yet");
    };
    let (mut got, end) = read_flight(&first, CHUNK).await;
    assert_eq!(end, Ok(()));
    // The run has been read from the origin meanwhile (at origin speed).
    settle(&cache).await;
    let _ = cache.memory_weight();
    assert!(
        !cache.has_chunk(&version, 1),
        "the memory tier let go of chunk 1 before its reader came"
    );
    got.extend(read_in_order(&cache, &origin, &obj, &meta, 1, 7).await);
    drop(first);
    assert!(got == v.body[..], "exact bytes");
    settle(&cache).await;
    assert_eq!(fake.seen().len(), 1, "one request: {:?}", fake.seen());
    assert_eq!(fake.body_bytes(), 8000, "no byte fetched twice");
}

#[tokio::test]
async fn a_reader_that_joins_a_run_late_keeps_its_rest_findable() {
    // A second client joins chunk 2 of a run filled for a first one; memory lets go of the
    // run's chunks; the second still reads 3..=7 without another origin request.
    let cache = cache_with_memory_for(2);
    let v = version(8000, 2, "\"v2\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).build();
    let obj = request("/joined");
    let meta = known(&cache, &obj, &v).await;
    let version = version_of(&obj.key, v.etag.as_str());

    let first = chunk_source(&cache, &origin, &obj, &meta, &version, 0, 7).await;
    let joined = chunk_source(&cache, &origin, &obj, &meta, &version, 2, 7).await;
    let ChunkSource::Filling(joined) = joined else {
        panic!("chunk 2 is being filled by the first client's run");
    };
    let _ = read_source(first, CHUNK).await;
    settle(&cache).await;
    let _ = cache.memory_weight();
    let (bytes, end) = read_flight(&joined, CHUNK).await;
    assert_eq!((bytes.as_slice(), end), (chunk_of(&v, 2), Ok(())));
    let rest = read_in_order(&cache, &origin, &obj, &meta, 3, 7).await;
    drop(joined);
    assert!(rest == v.body[3000..], "exact bytes");
    assert_eq!(fake.seen().len(), 1, "one request: {:?}", fake.seen());
    assert_eq!(fake.body_bytes(), 8000, "no byte fetched twice");
    // Nobody holds the run any more: nothing of it is left in the fill map.
    assert!(cache.flights.is_empty());
    assert_eq!(
        cache.flights.retained_bytes(),
        0,
        "links gave their budget back"
    );
}

// ---- answers that are no part of the stored object -----------------------------------------

/// A reply that is only a header (enough for the checks made before any body byte).
struct HeaderOnly(ResponseHeader);

#[async_trait]
impl OriginReply for HeaderOnly {
    fn header(&self) -> &ResponseHeader {
        &self.0
    }
    fn server(&self) -> SocketAddr {
        SERVERS[0]
    }
    async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        Ok(None)
    }
    async fn finish(self: Box<Self>) {}
}

fn partial(v: &Version, range: &str, extra: &[(&'static str, &str)]) -> HeaderOnly {
    let mut h = ResponseHeader::build(206, None).unwrap();
    h.insert_header("etag", v.etag.as_str()).unwrap();
    h.insert_header("content-range", range).unwrap();
    for (n, val) in extra {
        h.insert_header(*n, *val).unwrap();
    }
    HeaderOnly(h)
}

#[test]
fn a_partial_answer_in_another_encoding_or_of_contradicting_length_is_not_the_object() {
    let v = version(3000, 1, "\"v1\"");
    let meta = meta_of(&v, SystemTime::now() + Duration::from_secs(60));
    let ok = partial(&v, "bytes 1000-1999/3000", &[("content-length", "1000")]);
    assert_eq!(
        same_version_offset(&ok, &meta, 1000, "chunk fetch"),
        Ok(1000)
    );
    // The same range compressed on the fly: shorter than its Content-Range says.
    let short = partial(
        &v,
        "bytes 1000-1999/3000",
        &[("content-length", "312"), ("content-encoding", "gzip")],
    );
    assert!(matches!(
        same_version_offset(&short, &meta, 1000, "chunk fetch"),
        Err(FillError::Origin(_))
    ));
    // Another encoding of the same validator is another representation.
    let gzip = partial(&v, "bytes 1000-1999/3000", &[("content-encoding", "gzip")]);
    assert_eq!(
        same_version_offset(&gzip, &meta, 1000, "chunk fetch"),
        Err(FillError::VersionChanged)
    );
    let identity = partial(
        &v,
        "bytes 1000-1999/3000",
        &[("content-encoding", "identity")],
    );
    assert_eq!(
        same_version_offset(&identity, &meta, 1000, "chunk fetch"),
        Ok(1000)
    );
}

// ---- chunked bodies without a length (issue 21, points 5 and 6) ---------------------------

/// Stream a chunked discovery of `v` to its end, as its client reads it.
async fn stream_to_end(cache: &Arc<ChunkCache>, origin: &OriginAccess, obj: &ObjectRequest) {
    let Discovery::Streaming { mut body, .. } = discover_cold(cache, origin, obj, 0, 0).await
    else {
        panic!("a chunked 200 with an ETag is streamed");
    };
    tokio::time::timeout(WAIT, async {
        while let Some(step) = body.recv().await {
            if let BodyStep::Failed(e) = step {
                panic!("stream failed: {e}");
            }
        }
    })
    .await
    .expect("the stream hung");
    settle(cache).await;
}

#[tokio::test]
async fn an_evicted_chunk_refetched_as_a_chunked_200_of_the_same_version_is_served() {
    // An origin that ignores Range and sends chunked bodies (nginx with gzip): the refetch of
    // a missing chunk is a whole 200 without a length, with the same validator.
    let cache = cache();
    let v = version(4500, 1, "W/\"v1\"");
    let chunked = || Answer {
        chunked: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone())
        .script(vec![chunked(), chunked(), chunked()])
        .build();
    let obj = request("/chunked-evicted");
    stream_to_end(&cache, &origin, &obj).await;
    let meta = cache.meta(&obj.key).await.expect("stored");
    let version = version_of(&obj.key, meta.validator.as_str());
    // Chunks 1 and 2 go (evicted); 0, 3 and 4 stay.
    cache.forget_chunk_for_test(&version, 1);
    cache.forget_chunk_for_test(&version, 2);
    assert!(!cache.has_chunk(&version, 1) && cache.has_chunk(&version, 3));
    let got = read_chunk(&cache, &origin, &obj, &meta, 1, 1).await;
    assert_eq!(
        got.unwrap(),
        chunk_of(&v, 1),
        "the refetched chunk is the object's"
    );
    settle(&cache).await;
    let kept = cache
        .meta(&obj.key)
        .await
        .expect("the object is not dropped");
    assert_eq!(kept.validator, meta.validator);
    // The fetch took the following missing chunk too, and read on to the object's end.
    assert!(
        cache.has_chunk(&version, 2),
        "chunk 2 filled by the same fetch"
    );
    for index in 0..5 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 4).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 2, "one discovery, one refetch");
    assert_eq!(fake.seen()[1].range, Some((1000, 1999)));
}

#[tokio::test]
async fn a_chunked_refetch_longer_or_shorter_than_the_object_stores_nothing() {
    for (what, answer) in [
        (
            "longer",
            Answer {
                chunked: true,
                // Same validator, 300 bytes more.
                new_version: Some(version(4800, 1, "\"v1\"")),
                ..Answer::default()
            },
        ),
        (
            "shorter",
            Answer {
                chunked: true,
                end_after: Some(4400),
                ..Answer::default()
            },
        ),
    ] {
        let cache = cache();
        let v = version(4500, 1, "\"v1\"");
        let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
        let obj = request("/chunked-lies");
        let meta = known(&cache, &obj, &v).await;
        let version = version_of(&obj.key, meta.validator.as_str());
        // The last chunk: its bytes are right either way, but the body's end is not.
        let got = read_chunk(&cache, &origin, &obj, &meta, 4, 4).await;
        assert!(got.is_err(), "{what}: the fetch fails, got {got:?}");
        settle(&cache).await;
        assert!(!cache.has_chunk(&version, 4), "{what}: nothing stored");
        assert!(
            cache.meta(&obj.key).await.is_none(),
            "{what}: the version is dropped"
        );
        assert_eq!(fake.requests(), 1, "{what}");
    }
}

#[tokio::test]
async fn a_chunked_refetch_without_a_validator_is_not_taken_as_the_same_version() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let (_fake, origin) = FakeOrigin::new(v.clone()).chunked().build();
    let obj = request("/chunked-no-validator");
    let mut meta = (*meta_of(&v, SystemTime::now() + Duration::from_secs(3600))).clone();
    meta.etag = None;
    meta.last_modified = None;
    meta.validator = ObjectMeta::unvalidated_identity(SystemTime::now());
    let meta = Arc::new(meta);
    cache.put_meta(&obj.key, meta.clone()).await;
    let got = read_chunk(&cache, &origin, &obj, &meta, 1, 1).await;
    assert_eq!(got, Err(FillError::VersionChanged));
}

#[tokio::test]
async fn an_oversized_streamed_body_nobody_reads_stops_and_stores_nothing() {
    // 200 chunks from an origin with no length; at most 10 may be kept.
    let cache = cache_keeping(10 * CHUNK);
    let v = version(200 * CHUNK as usize, 1, "\"v1\"");
    let (fake, origin) = FakeOrigin::new(v.clone()).chunked().build();
    let obj = request("/chunked-endless");
    let mut body = stream_cold(&cache, &origin, &obj).await;
    // The client reads a little, then leaves.
    let mut got = Vec::new();
    while got.len() < 2 * CHUNK as usize {
        match tokio::time::timeout(WAIT, body.recv()).await.expect("hung") {
            Some(BodyStep::Piece(p)) => got.extend_from_slice(&p),
            _ => panic!("the stream ended early"),
        }
    }
    assert_eq!(got, v.body[..got.len()]);
    // Staged, not admitted: nothing is in the tiers before the object is known storable.
    let version = version_of(&obj.key, "\"v1\"");
    assert!(
        !cache.has_chunk(&version, 0),
        "chunk 0 admitted before the end"
    );
    drop(body);
    settle(&cache).await;
    let pulled = fake.body_bytes();
    assert!(
        pulled <= 10 * CHUNK + 300,
        "the fill went on after its client left: {pulled} bytes pulled"
    );
    assert!(
        (0..200).all(|i| !cache.has_chunk(&version, i)),
        "no chunk kept"
    );
    assert!(cache.meta(&obj.key).await.is_none());
    assert!(cache.is_marked_uncacheable(&obj.key), "later requests pass");
    assert_eq!(cache.staged_bytes(), 0, "the staging budget is given back");
    assert!(
        cache.try_lock_object(&obj.key).is_some(),
        "the lock is free"
    );
}

#[tokio::test]
async fn an_oversized_streamed_body_lets_go_of_the_lock_while_its_client_reads_on() {
    let cache = cache_keeping(10 * CHUNK);
    let v = version(30 * CHUNK as usize, 1, "\"v1\"");
    let (_fake, origin) = FakeOrigin::new(v.clone()).chunked().build();
    let obj = request("/chunked-big");
    let mut body = stream_cold(&cache, &origin, &obj).await;
    let mut got = Vec::new();
    let mut lock_seen_free = false;
    tokio::time::timeout(WAIT, async {
        loop {
            match body.recv().await {
                Some(BodyStep::Piece(p)) => got.extend_from_slice(&p),
                Some(BodyStep::End) => break,
                _ => panic!("the stream failed"),
            }
            if got.len() as u64 > 12 * CHUNK && !lock_seen_free {
                // Past the bound: nothing will be stored, so nobody need wait for it.
                lock_seen_free = cache.try_lock_object(&obj.key).is_some();
            }
        }
    })
    .await
    .expect("hung");
    assert!(got == v.body[..], "the client gets the whole body");
    assert!(lock_seen_free, "the lock was held past the bound");
    settle(&cache).await;
    assert!(cache.meta(&obj.key).await.is_none());
    assert_eq!(cache.staged_bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_fill_holds_the_object_lock_for_a_bounded_time() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let (_fake, origin) = FakeOrigin::new(v.clone()).chunked().build();
    let obj = request("/chunked-slow-client");
    let mut body = stream_cold(&cache, &origin, &obj).await;
    // The client reads one piece and stalls; another request waits for the lock.
    assert!(matches!(body.recv().await, Some(BodyStep::Piece(_))));
    let waited = tokio::time::timeout(
        discover::STREAM_LOCK_HOLD + Duration::from_secs(1),
        cache.lock_object(&obj.key),
    )
    .await;
    assert!(waited.is_ok(), "a second request waited past the hold time");
    drop(waited);
    // The stalled client reads on: the body is whole, and still stored.
    let mut got = Vec::new();
    while got.len() < 2700 {
        match body.recv().await {
            Some(BodyStep::Piece(p)) => got.extend_from_slice(&p),
            _ => panic!("the stream failed"),
        }
    }
    assert!(matches!(body.recv().await, Some(BodyStep::End)));
    assert!(got == v.body[300..]);
    settle(&cache).await;
    assert_eq!(cache.meta(&obj.key).await.map(|m| m.size), Some(3000));
}

// ---- version and length guards (issue 21, points 2-4) --------------------------------------

#[tokio::test]
async fn a_304_naming_another_version_updates_nothing_and_the_object_is_fetched_afresh() {
    let v1 = version(3000, 1, "\"v1\"");
    let v2 = version(3000, 2, "\"v2\"");
    // The origin now holds v2 and answers the conditional with a 304 carrying v2's ETag.
    let answer = Answer {
        new_version: Some(v2.clone()),
        force_304: true,
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v1, vec![answer]).await;
    cache.store_chunk(
        &version_of(&obj.key, "\"v1\""),
        0,
        Bytes::copy_from_slice(chunk_of(&v1, 0)),
    );
    let got = revalidate(&cache, &origin, &obj, &meta).await;
    assert!(
        matches!(got, Revalidation::Changed(None)),
        "a 304 for another version selects no stored response"
    );
    assert_eq!(fake.requests(), 1);
    assert_eq!(fake.seen()[0].status, 304);
    assert!(cache.meta(&obj.key).await.is_none(), "v1 dropped");

    // Discovery asks again, unconditionally, and every chunk is v2's.
    let Discovery::Stored(fresh) = discover_cold(&cache, &origin, &obj, 0, 2).await else {
        panic!("v2 is stored");
    };
    assert_eq!(fresh.validator, "\"v2\"");
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), None, "unconditional");
    for index in 0..3 {
        let got = read_chunk(&cache, &origin, &obj, &fresh, index, 2).await;
        assert_eq!(got.unwrap(), chunk_of(&v2, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 2);
}

#[tokio::test]
async fn a_304_naming_the_version_held_renews_it_and_keeps_its_validator() {
    let v1 = version(3000, 1, "\"v1\"");
    let answer = Answer {
        force_304: true,
        ..Answer::default()
    };
    let (cache, fake, origin, obj, meta) = stale(&v1, vec![answer]).await;
    let Revalidation::Fresh(fresh) = revalidate(&cache, &origin, &obj, &meta).await else {
        panic!("its own ETag renews it");
    };
    assert_eq!(fake.requests(), 1);
    assert_eq!(fresh.etag.as_deref(), Some("\"v1\""));
    assert!(fresh.is_fresh(SystemTime::now()));
}

/// Chunk `index` of `meta` read by a client needing up to `last`: its bytes and how it ended.
async fn read_chunk_whole(
    cache: &Arc<ChunkCache>,
    origin: &OriginAccess,
    obj: &ObjectRequest,
    meta: &Arc<ObjectMeta>,
    index: u64,
    last: u64,
) -> (Vec<u8>, Result<(), FillError>) {
    let validator = version_of(&obj.key, meta.validator.as_str());
    let src = chunk_source(cache, origin, obj, meta, &validator, index, last).await;
    read_source(src, chunk_len(cache, meta, index)).await
}

#[tokio::test]
async fn a_206_longer_than_its_range_is_neither_used_nor_kept() {
    // Framed (its Content-Length agrees with the range; more bytes follow) and unframed
    // (chunked: the length shows only at the end); the extra bytes before or after the range.
    for unframed in [false, true] {
        for run_of in [1u64, 2] {
            let cache = cache();
            let v = version(3000, 1, "\"v1\"");
            let answer = Answer {
                unframed,
                extra: Some(pattern(347, 9)),
                ..Answer::default()
            };
            let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
            let obj = request("/longer");
            let meta = known(&cache, &obj, &v).await;
            let last = run_of;
            let case = format!("unframed {unframed}, run of {run_of}");
            let validator = version_of(&obj.key, "\"v1\"");
            let mut sources = Vec::new();
            for index in 1..=last {
                sources.push(
                    chunk_source(&cache, &origin, &obj, &meta, &validator, index, last).await,
                );
            }
            for (index, src) in (1..=last).zip(sources) {
                let (bytes, end) = read_source(src, CHUNK).await;
                assert!(
                    chunk_of(&v, index).starts_with(&bytes),
                    "{case}: a reader of chunk {index} gets no wrong byte"
                );
                if unframed {
                    assert!(
                        bytes.is_empty(),
                        "{case}: nothing reaches a reader before the end"
                    );
                }
                if unframed || index == last {
                    // The run's last chunk waits for the body's end, which is not there.
                    assert!(end.is_err(), "{case}: chunk {index} fails");
                }
            }
            settle(&cache).await;
            let validator = version_of(&obj.key, "\"v1\"");
            for index in 1..=last {
                assert!(
                    !cache.has_chunk(&validator, index),
                    "{case}: chunk {index} not kept"
                );
            }
            assert!(
                cache.meta(&obj.key).await.is_none(),
                "{case}: object dropped"
            );
            assert_eq!(fake.requests(), 1, "{case}");
        }
    }
}

#[tokio::test]
async fn a_200_longer_than_the_object_is_neither_used_nor_kept() {
    let cache = cache();
    let v = version(2500, 1, "\"v1\"");
    let answer = Answer {
        ignore_range: true,
        extra: Some(pattern(100, 5)),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/longer-200");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 0, 2).await else {
        panic!("published before the body is read");
    };
    let (bytes, end) = read_chunk_whole(&cache, &origin, &obj, &meta, 2, 2).await;
    assert!(
        end.is_err(),
        "the last chunk fails: the body did not end there"
    );
    assert!(chunk_of(&v, 2).starts_with(&bytes), "no wrong byte");
    settle(&cache).await;
    let validator = version_of(&obj.key, "\"v1\"");
    for index in 0..3 {
        assert!(
            !cache.has_chunk(&validator, index),
            "chunk {index} not kept"
        );
    }
    assert!(cache.meta(&obj.key).await.is_none());
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_206_short_of_its_range_without_a_length_resumes_and_keeps_only_the_right_bytes() {
    let cache = cache();
    let v = version(3000, 1, "\"v1\"");
    let answer = Answer {
        unframed: true,
        end_after: Some(600),
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone()).script(vec![answer]).build();
    let obj = request("/short-unframed");
    let meta = known(&cache, &obj, &v).await;
    let (bytes, end) = read_chunk_whole(&cache, &origin, &obj, &meta, 1, 1).await;
    assert_eq!(end, Ok(()));
    assert_eq!(bytes, chunk_of(&v, 1));
    assert_eq!(fake.requests(), 2, "the short answer, then its resume");
}

#[tokio::test]
async fn an_unframed_206_for_a_long_run_is_asked_for_two_chunks_at_a_time() {
    let cache = cache();
    let v = version(5500, 1, "\"v1\"");
    let unframed = Answer {
        unframed: true,
        ..Answer::default()
    };
    let (fake, origin) = FakeOrigin::new(v.clone())
        .script(vec![unframed.clone(); 8])
        .build();
    let obj = request("/unframed-run");
    let meta = known(&cache, &obj, &v).await;
    let validator = version_of(&obj.key, "\"v1\"");
    let mut sources = Vec::new();
    for index in 0..6 {
        sources.push(chunk_source(&cache, &origin, &obj, &meta, &validator, index, 5).await);
    }
    for (index, src) in sources.into_iter().enumerate() {
        let (bytes, end) = read_source(src, chunk_len(&cache, &meta, index as u64)).await;
        assert_eq!(end, Ok(()), "chunk {index}");
        assert_eq!(bytes, chunk_of(&v, index as u64), "chunk {index}");
    }
    let ranges: Vec<_> = fake.seen().iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        [
            Some((0, 5499)),
            Some((0, 1999)),
            Some((2000, 5499)),
            Some((2000, 3999)),
            Some((4000, 5499)),
        ],
        "the long answer closed unread, then spans of two chunks each"
    );
    assert_eq!(fake.body_bytes(), 5500, "no byte sent twice");
}

#[tokio::test]
async fn an_object_without_a_validator_is_fetched_whole_and_never_by_a_range() {
    let cache = cache();
    let v = version(3500, 1, "unused");
    let (fake, origin) = FakeOrigin::new(v.clone()).without_validators().build();
    let obj = request("/no-validator");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 2, 2).await else {
        panic!("stored");
    };
    assert!(!meta.has_validator());
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].range, seen[0].status), (Some((2000, 2999)), 206));
    assert_eq!(
        (seen[1].range, seen[1].status),
        (None, 200),
        "then the whole object"
    );
    for index in 0..4 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 3).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 2, "every chunk from the one whole fetch");
    settle(&cache).await;
    let version = version_of(&obj.key, meta.validator.as_str());
    assert!(whole_from_one_fetch(&cache, &meta, &version));

    // A chunk of it gone: no range is asked for; the object is dropped instead.
    cache.evict_memory_chunk(&version.chunk(1));
    assert!(!whole_from_one_fetch(&cache, &meta, &version));
    let (bytes, end) = read_chunk_whole(&cache, &origin, &obj, &meta, 1, 3).await;
    assert!(bytes.is_empty());
    assert_eq!(end, Err(FillError::VersionChanged));
    assert_eq!(fake.requests(), 2, "no range fetch");
    assert!(
        cache.meta(&obj.key).await.is_none(),
        "dropped, to be fetched whole again"
    );
}

#[tokio::test]
async fn a_whole_206_without_a_validator_is_kept_from_that_one_fetch() {
    let cache = cache();
    let v = version(1500, 1, "unused");
    let (fake, origin) = FakeOrigin::new(v.clone()).without_validators().build();
    let obj = request("/no-validator-small");
    let Discovery::Stored(meta) = discover_cold(&cache, &origin, &obj, 0, 1).await else {
        panic!("stored");
    };
    for index in 0..2 {
        let got = read_chunk(&cache, &origin, &obj, &meta, index, 1).await;
        assert_eq!(got.unwrap(), chunk_of(&v, index), "chunk {index}");
    }
    assert_eq!(fake.requests(), 1, "the 206 held the whole object");
}

#[tokio::test]
async fn a_validatorless_object_too_large_to_fetch_whole_is_not_kept() {
    let cache = cache_keeping(2000);
    let v = version(3500, 1, "unused");
    let (fake, origin) = FakeOrigin::new(v.clone()).without_validators().build();
    let obj = request("/no-validator-large");
    // Not sliced either: a slice's second fetch could be another version. The client's own
    // request goes to the origin (pass-through), one answer from one fetch.
    let Discovery::Uncacheable(reason) = discover_cold(&cache, &origin, &obj, 1, 1).await else {
        panic!("passed through: neither kept nor sliced");
    };
    assert_eq!(reason, "too-large");
    assert!(cache.meta(&obj.key).await.is_none());
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_validatorless_partial_answer_not_to_be_kept_is_not_sliced() {
    let cache = cache_keeping(1 << 20);
    let v = version(3500, 1, "unused");
    let (fake, origin) = FakeOrigin::new(v.clone())
        .without_validators()
        .cache_control("no-store")
        .build();
    let obj = request("/no-validator-no-store");
    let Discovery::Uncacheable(reason) = discover_cold(&cache, &origin, &obj, 1, 1).await else {
        panic!("passed through: not sliced from two fetches");
    };
    assert!(!reason.is_empty());
    assert!(cache.meta(&obj.key).await.is_none());
    assert_eq!(fake.requests(), 1);
}
