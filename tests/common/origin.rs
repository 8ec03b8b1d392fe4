//! An in-process HTTP/1.1 origin server for integration tests of the caching proxy.
//!
//! [`Origin::start`] binds `127.0.0.1:0` and serves, on a tokio task per connection:
//!
//! * `GET`/`HEAD /obj/<size>[/<anything>]`: a deterministic object of `<size>` bytes whose
//!   byte `i` is [`content_byte`]`(path, version, i)` (the query string is ignored for the
//!   content), with `ETag: "v<version>-<hash of path>"`, `Last-Modified` (2015-10-21 07:28:00
//!   GMT plus `version` seconds), `Content-Type: application/octet-stream`, `Cache-Control`
//!   as set (default `max-age=3600`), `Accept-Ranges: bytes` and `Date`. A single
//!   `bytes=a-b` / `a-` / `-n` range gives 206 with `Content-Range`; a multi-range or an
//!   invalid range gives 200 with the whole object; an unsatisfiable one gives 416 with
//!   `Content-Range: bytes */<size>`. `If-None-Match` matching the current ETag (or
//!   `If-Modified-Since` not older than `Last-Modified`) gives 304; `If-Range` that does not
//!   match gives 200 with the whole object.
//! * `GET`/`HEAD /download/<size>`: the same content, always 200 with the whole object and
//!   `Cache-Control: no-store` (Range and conditionals are ignored).
//! * `GET`/`HEAD /status/<code>[/<anything>]`: that status (100–599, not 1xx) with a short body
//!   `status <code> for <path>\n` and no cache headers: one URL's application error.
//! * `GET`/`HEAD /echo-headers`: 200 with the request headers as the body, one
//!   `name: value` line each, in the order received.
//! * `GET`/`HEAD /reflect[/<anything>]`: a naive application that trusts what it is sent, for
//!   cache-poisoning tests: 200 with `target: <request target>` and then every request header
//!   (`name: value` lines) as the body, with `Cache-Control` as set (default `max-age=3600`)
//!   and no `Vary`. Under `/reflect/redirect[...]` it answers `301` instead, with `Location:
//!   <X-Forwarded-Proto or http>://<X-Forwarded-Host or Host><path>` (cacheable the same way).
//! * `GET`/`HEAD /session[/<anything>]`: an application with logins: `Authorization: Bearer
//!   good` gets 200 `secret\n` (`Cache-Control: private`), any other `Authorization` 401; a
//!   `Cookie` with `session=<user>` gets 200 `hello <user>\n` (private); no credentials get
//!   200 `anonymous\n` with `Set-Cookie: session=; Max-Age=0` (a logout), or, on a path
//!   containing `cacheable`, with `Cache-Control: max-age=3600` instead. Every answer says
//!   `Vary: Cookie, Authorization`.
//! * `POST`/`PUT` to any path: the body (Content-Length or chunked) is read streaming and
//!   only its length and CRC-32 are kept; the answer is 200 with body `len=<n> crc=<08x>`.
//! * anything else: 404 (other paths) or 405 (other methods), with a short body.
//!
//! Bodies are generated in 64 KiB pieces as they are written, so objects of several GiB cost
//! no memory. Connections are persistent (`Connection: close` and HTTP/1.0 are honoured);
//! malformed requests get 400 and the connection is closed.
//!
//! Timing and clock faults beside [`Fault`]: [`Origin::set_conditional_delay`] answers
//! conditional requests late (with a `Date` from their arrival),
//! [`Origin::set_date_offset`] shifts `Date`, and [`Origin::peak_conditional_in_flight`] says
//! how many conditional requests were answered at once.
//!
//! Every request whose head was read is counted ([`Origin::requests`]) and logged
//! ([`Origin::log`], the last [`LOG_CAPACITY`]). [`Fault`]s are injected with
//! [`Origin::set_fault`]; the server is hand-written on tokio + httparse so that faults such as
//! a reset after exactly `n` body bytes are exact. Everything is bounded: the read buffer is
//! 64 KiB, the log is capped, and dropping the [`Origin`] ends the accept task and every
//! connection task (including hung ones).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many [`RequestRecord`]s [`Origin::log`] keeps (the most recent ones).
pub const LOG_CAPACITY: usize = 10_000;
/// Size of the pieces bodies are generated and written in.
pub const PIECE: usize = 64 * 1024;
/// `Last-Modified` of version 0: Wed, 21 Oct 2015 07:28:00 GMT.
pub const LAST_MODIFIED_BASE: u64 = 1_445_412_480;
/// The default `Cache-Control` of object responses.
pub const DEFAULT_CACHE_CONTROL: &str = "max-age=3600";

/// Read buffer per connection; a request head must fit in it.
const BUF_SIZE: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line accepted in a chunked request body.
const MAX_LINE: usize = 4096;
const MAX_TRAILER_LINES: usize = 64;
/// How long a closing connection waits for the client's FIN after ours (lingering close).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: u64 = 1 << 20;
/// How long [`Fault::ResetMidBody`] waits for the sent bytes to be acknowledged before the RST.
const RESET_DRAIN: Duration = Duration::from_secs(2);

/// A fault injected into every request that starts (its head is read) after
/// [`Origin::set_fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer every request (after reading its body) with this status and a short body
    /// `fault status <code>\n` (no body for HEAD, 1xx, 204 and 304), without cache headers.
    Status(u16),
    /// Send the head at once, then pace the body at about this rate (in pieces of a tenth of
    /// a second's worth, at most 64 KiB).
    Slow { bytes_per_sec: u64 },
    /// Read the request head, then never answer: the request body and anything else the client
    /// sends is read and discarded until the client closes or the [`Origin`] drops.
    Hang,
    /// Send the head (with the full framing) and `min(after, body length)` body bytes, wait
    /// for them to be acknowledged, then close with SO_LINGER 0 so the client gets a RST.
    /// Applies to every response, also bodiless ones (head, then RST).
    ResetMidBody { after: u64 },
    /// Answer 200 with the whole object even when `Range` is sent.
    IgnoreRange,
    /// Answer 200 with the whole object (ignoring `Range`) with `Transfer-Encoding: chunked`
    /// and no `Content-Length`. Every other response with a body is chunked too. (HTTP/1.0
    /// requests get a close-delimited body instead.)
    ChunkedNoLength,
    /// [`Fault::ChunkedNoLength`], paced like [`Fault::Slow`].
    SlowChunked { bytes_per_sec: u64 },
    /// [`Fault::ChunkedNoLength`], cut like [`Fault::ResetMidBody`]: `min(after, body length)`
    /// body bytes, no terminating chunk, then a RST (an application server that dies while
    /// streaming).
    ChunkedCut { after: u64 },
    /// Wait this long before sending the response head.
    DelayHeaders(Duration),
    /// Send an interim answer with this 1xx status before every response head, e.g. 103:
    /// `HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n` (other codes: no field).
    Interim(u16),
    /// Object responses carry no `ETag` and no `Last-Modified` (conditionals are ignored);
    /// `size: Some(n)` also makes every object `n` bytes long, whatever its path says.
    NoValidators { size: Option<u64> },
    /// A single-range request on an object gets 206 with the right `Content-Range` but only
    /// (at most) 100 body bytes, `Content-Length` matching the bytes sent.
    Broken206,
    /// Every object GET (with or without `Range`) gets 206 `bytes 0-99/<size>` with 100 bytes.
    Always206,
    /// A conditional request on an object (`If-None-Match` or `If-Modified-Since`) gets 304
    /// with the current version's validators, whatever version the request named: after
    /// [`Origin::set_etag_version`], a 304 naming another version than the one asked about.
    NotModifiedAnyway,
    /// A single-range request on an object gets 206 with the right `Content-Range`, chunked
    /// (no `Content-Length`), and a body that is the whole object from byte 0: longer than
    /// its range, and (for a range not at 0) the wrong bytes.
    Overlong206,
}

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// The request target as received, including any query string.
    pub path: String,
    /// Headers in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// Length of the request body (0 when none, or when the fault was [`Fault::Hang`]).
    pub body_len: u64,
    /// CRC-32 (crc32fast) of the request body.
    pub body_crc: u32,
    /// Serial number of the connection the request came on (1 for the first accepted), for
    /// checking connection reuse.
    pub conn: u64,
}

impl RequestRecord {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Every value of headers named `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Settings {
    fault: Option<Fault>,
    /// Requests left for `fault` (then it is cleared); `None`: every request.
    fault_times: Option<u32>,
    version: u32,
    cache_control: Option<String>,
    extra: Vec<(String, String)>,
    /// How long an answer to a conditional request waits before its head (see
    /// [`Origin::set_conditional_delay`]).
    conditional_delay: Duration,
    /// Seconds added to the `Date` of every response (negative: behind).
    date_offset: i64,
}

struct Shared {
    settings: Mutex<Settings>,
    requests: AtomicU64,
    body_bytes_sent: AtomicU64,
    connections: AtomicU64,
    /// Connections open now.
    open: Arc<AtomicU64>,
    log: Mutex<VecDeque<RequestRecord>>,
    /// Conditional requests (`If-None-Match` / `If-Modified-Since`) being answered now, and
    /// the most there ever were at once.
    conditional_now: AtomicU64,
    conditional_peak: AtomicU64,
}

impl Shared {
    /// The settings a request starts with; a fault set for a number of requests counts it.
    fn snapshot(&self) -> Settings {
        let mut s = lock(&self.settings);
        let snap = s.clone();
        if let Some(n) = s.fault_times.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.fault = None;
                s.fault_times = None;
            }
        }
        snap
    }

    fn record(&self, rec: RequestRecord) {
        let mut log = lock(&self.log);
        while log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(rec);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test origin. Dropping it stops the server: the listener closes and every open
/// connection is dropped.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
    /// Never sent on; dropping it (with the `Origin`) ends every connection task.
    shutdown: watch::Sender<()>,
}

impl Origin {
    /// Bind `127.0.0.1:0` and start serving.
    pub async fn start() -> Origin {
        let listener =
            bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("origin: bind 127.0.0.1:0");
        Origin::serve(listener)
    }

    /// Bind `addr` (another loopback address, a port another origin has on its own) and start
    /// serving; `None` when the address is taken.
    pub async fn start_at(addr: SocketAddr) -> Option<Origin> {
        Some(Origin::serve(bind(addr).ok()?))
    }

    fn serve(listener: TcpListener) -> Origin {
        let addr = listener.local_addr().expect("origin: local addr");
        let shared = Arc::new(Shared {
            settings: Mutex::new(Settings {
                fault: None,
                fault_times: None,
                version: 0,
                cache_control: Some(DEFAULT_CACHE_CONTROL.to_string()),
                extra: Vec::new(),
                conditional_delay: Duration::ZERO,
                date_offset: 0,
            }),
            requests: AtomicU64::new(0),
            body_bytes_sent: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: Arc::new(AtomicU64::new(0)),
            log: Mutex::new(VecDeque::new()),
            conditional_now: AtomicU64::new(0),
            conditional_peak: AtomicU64::new(0),
        });
        let (shutdown, _) = watch::channel(());
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), shutdown.subscribe()));
        Origin {
            addr,
            shared,
            accept: Mutex::new(Some(accept)),
            shutdown,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Inject `f` into every request that starts after this call (replacing any other fault).
    pub fn set_fault(&self, f: Fault) {
        let mut s = lock(&self.shared.settings);
        s.fault = Some(f);
        s.fault_times = None;
    }

    /// Inject `f` into the next `n` requests only; later ones are served normally.
    pub fn set_fault_times(&self, f: Fault, n: u32) {
        let mut s = lock(&self.shared.settings);
        s.fault = Some(f);
        s.fault_times = Some(n.max(1));
    }

    pub fn clear_fault(&self) {
        let mut s = lock(&self.shared.settings);
        s.fault = None;
        s.fault_times = None;
    }

    /// Change the ETag, Last-Modified and the content of every object (default 0).
    pub fn set_etag_version(&self, v: u32) {
        lock(&self.shared.settings).version = v;
    }

    pub fn etag_version(&self) -> u32 {
        lock(&self.shared.settings).version
    }

    /// `Cache-Control` of object (and 404) responses; `None` sends none.
    pub fn set_cache_control(&self, v: Option<&str>) {
        lock(&self.shared.settings).cache_control = v.map(str::to_string);
    }

    /// Add a header to every response, replacing an extra header of the same name.
    pub fn set_extra_header(&self, name: &str, value: &str) {
        let mut s = lock(&self.shared.settings);
        s.extra.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        s.extra.push((name.to_string(), value.to_string()));
    }

    pub fn remove_extra_header(&self, name: &str) {
        lock(&self.shared.settings)
            .extra
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn clear_extra_headers(&self) {
        lock(&self.shared.settings).extra.clear();
    }

    /// Answer every conditional request (one with `If-None-Match` or `If-Modified-Since`)
    /// that starts after this call `d` late: its head waits `d` after the request was read.
    /// Its `Date` is taken when the request was read, before the wait, as application servers
    /// stamp it, so a `max-age` shorter than `d` makes the answer stale on receipt.
    pub fn set_conditional_delay(&self, d: Duration) {
        lock(&self.shared.settings).conditional_delay = d;
    }

    /// Shift the `Date` of every response that starts after this call by `secs` seconds
    /// (negative: the origin's clock is behind).
    pub fn set_date_offset(&self, secs: i64) {
        lock(&self.shared.settings).date_offset = secs;
    }

    /// The most conditional requests that were being answered at once.
    pub fn peak_conditional_in_flight(&self) -> u64 {
        self.shared.conditional_peak.load(Ordering::SeqCst)
    }

    /// Requests whose head was read (malformed ones are not counted).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Response body bytes written to sockets (payload only, not chunk framing).
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes_sent.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The last [`LOG_CAPACITY`] requests, oldest first. A request is logged once its body was
    /// read, before its response is sent.
    pub fn log(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// Zero the counters (requests, body bytes, connections) and clear the log.
    pub fn reset_stats(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.body_bytes_sent.store(0, Ordering::SeqCst);
        self.shared.connections.store(0, Ordering::SeqCst);
        lock(&self.shared.log).clear();
    }

    /// Wait until at least `n` requests were counted, for at most `within`; true if they were.
    pub async fn wait_requests(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.requests() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Refuse connections: close the listener so connects get ECONNREFUSED. Connections
    /// already accepted are still served.
    pub async fn refuse(&self) {
        let handle = lock(&self.accept).take();
        if let Some(h) = handle {
            h.abort();
            // Once the aborted task is reaped its future (owning the listener) is dropped.
            let _ = h.await;
        }
    }

    /// Listen again on the same port after [`Origin::refuse`] (no-op when listening).
    pub async fn resume(&self) {
        if lock(&self.accept).is_some() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match bind(self.addr) {
                Ok(l) => break l,
                Err(e) if tries >= 100 => panic!("origin: re-bind {}: {e}", self.addr),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let h = tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            self.shutdown.subscribe(),
        ));
        *lock(&self.accept) = Some(h);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.accept).take() {
            h.abort();
        }
        // `shutdown` is dropped right after this, which ends every connection task.
    }
}

/// Counts an open connection for as long as it lives.
struct OpenGuard(Arc<AtomicU64>);

impl OpenGuard {
    fn new(open: Arc<AtomicU64>) -> OpenGuard {
        open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<()>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let conn = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let open = OpenGuard::new(shared.open.clone());
                let shared = shared.clone();
                let mut shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _open = open;
                    tokio::select! {
                        _ = serve_connection(sock, conn, shared) => {}
                        // Nothing is ever sent: this resolves when the Origin drops.
                        _ = shutdown.changed() => {}
                    }
                });
            }
            // E.g. out of file descriptors: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------------

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn seed(path: &str, version: u32) -> u64 {
    mix64(fnv1a(path.as_bytes()) ^ (version as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The 8 bytes at `8 * w ..` of an object. A bijection of `w` for a given seed, so no two
/// words of one object are equal: any shifted, duplicated or missing byte is detected.
fn word(seed: u64, w: u64) -> u64 {
    mix64(seed ^ w.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// Byte `i` of object `path` (without query string) at `version`.
pub fn content_byte(path: &str, version: u32, i: u64) -> u8 {
    (word(seed(path, version), i >> 3) >> ((i & 7) * 8)) as u8
}

/// Fill `out` with the bytes of object `path` at `version` starting at offset `start`.
pub fn fill_content(path: &str, version: u32, start: u64, out: &mut [u8]) {
    let s = seed(path, version);
    let mut pos = start;
    let mut rest = out;
    // Unaligned head.
    while pos & 7 != 0 && !rest.is_empty() {
        rest[0] = (word(s, pos >> 3) >> ((pos & 7) * 8)) as u8;
        pos += 1;
        rest = &mut rest[1..];
    }
    let mut words = rest.chunks_exact_mut(8);
    for chunk in &mut words {
        chunk.copy_from_slice(&word(s, pos >> 3).to_le_bytes());
        pos += 8;
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let w = word(s, pos >> 3).to_le_bytes();
        tail.copy_from_slice(&w[..tail.len()]);
    }
}

/// Bytes `range` of object `path` (without query string) at `version`.
pub fn content(path: &str, version: u32, range: Range<u64>) -> Vec<u8> {
    let len = range.end.saturating_sub(range.start);
    let mut v = vec![0u8; usize::try_from(len).expect("content range fits in memory")];
    fill_content(path, version, range.start, &mut v);
    v
}

/// CRC-32 of bytes `range` of an object, computed piecewise (for checking large bodies).
pub fn content_crc(path: &str, version: u32, range: Range<u64>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; PIECE];
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(PIECE as u64) as usize;
        fill_content(path, version, pos, &mut buf[..n]);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize()
}

/// The ETag of object `path` at `version`, quotes included.
pub fn etag(path: &str, version: u32) -> String {
    format!("\"v{version}-{:016x}\"", fnv1a(path.as_bytes()))
}

/// The `Last-Modified` value at `version`.
pub fn last_modified(version: u32) -> String {
    http_date(LAST_MODIFIED_BASE + version as u64)
}

// ---------------------------------------------------------------------------------------------
// HTTP dates
// ---------------------------------------------------------------------------------------------

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// IMF-fixdate of `secs` since the Unix epoch, e.g. `Wed, 21 Oct 2015 07:28:00 GMT`.
pub fn http_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parse an IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`) into seconds since the epoch.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let (_, rest) = s.trim().split_once(", ")?;
    let mut it = rest.split(' ');
    let d: i64 = it.next()?.parse().ok()?;
    let mon = it.next()?;
    let m = MONTHS.iter().position(|x| *x == mon)? as i64 + 1;
    let y: i64 = it.next()?.parse().ok()?;
    let hms: Vec<u64> = it
        .next()?
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if it.next()? != "GMT" || it.next().is_some() || hms.len() != 3 || !(1..=31).contains(&d) {
        return None;
    }
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    Some(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Connection handling
// ---------------------------------------------------------------------------------------------

struct Conn {
    sock: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Conn {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Read more bytes into the buffer; Ok(0) at EOF. Errors when the buffer is full.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "read buffer full",
            ));
        }
        let n = self.sock.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Pass the next `n` bytes to `f`, in pieces.
    async fn read_exact_with(&mut self, mut n: u64, f: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.pos == self.end && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = ((self.end - self.pos) as u64).min(n) as usize;
            f(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            n -= take as u64;
        }
        Ok(())
    }

    /// A line without its CRLF (or LF), at most [`MAX_LINE`] bytes.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buffered().iter().position(|&b| b == b'\n') {
                let mut line = self.buffered()[..i].to_vec();
                self.pos += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.end - self.pos > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Read and discard until EOF or an error; bounded by the peer (used by [`Fault::Hang`],
    /// which holds the socket until the client or the Origin goes away).
    async fn discard_until_eof(&mut self) {
        self.pos = 0;
        self.end = 0;
        while let Ok(n) = self.sock.read(&mut self.buf).await {
            if n == 0 {
                return;
            }
        }
    }

    /// Send FIN, then read (and discard) for a while so the client gets our last response
    /// rather than a RST caused by unread data.
    async fn graceful_close(mut self) {
        let _ = self.sock.shutdown().await;
        let mut total = 0u64;
        let _ = tokio::time::timeout(LINGER, async {
            while total < LINGER_MAX_BYTES {
                match self.sock.read(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n as u64,
                }
            }
        })
        .await;
    }
}

struct Request {
    method: String,
    target: String,
    /// Minor HTTP version: 0 or 1.
    minor: u8,
    headers: Vec<(String, String)>,
}

enum Head {
    /// The client closed (or sent a partial head and closed).
    Eof,
    Bad,
    Req(Request),
}

async fn read_head(c: &mut Conn) -> io::Result<Head> {
    loop {
        if c.pos < c.end {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(c.buffered()) {
                Ok(httparse::Status::Complete(n)) => {
                    let parsed = Request {
                        method: req.method.unwrap_or_default().to_string(),
                        target: req.path.unwrap_or_default().to_string(),
                        minor: req.version.unwrap_or(1),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                    };
                    c.pos += n;
                    return Ok(Head::Req(parsed));
                }
                Ok(httparse::Status::Partial) => {
                    if c.end - c.pos >= c.buf.len() {
                        return Ok(Head::Bad); // head larger than the buffer
                    }
                }
                Err(_) => return Ok(Head::Bad),
            }
        }
        if c.fill().await? == 0 {
            return Ok(Head::Eof);
        }
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn header_tokens<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

enum ReqBody {
    Length(u64),
    Chunked,
}

/// The request body framing, or Err for a malformed/ambiguous one (→ 400).
fn request_framing(headers: &[(String, String)]) -> Result<ReqBody, ()> {
    let te: Vec<&str> = header_tokens(headers, "transfer-encoding").collect();
    let cl: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim())
        .collect();
    if !te.is_empty() {
        // Both is a smuggling vector: reject. Only chunked (last) is understood.
        if !cl.is_empty() || !te.last().is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            return Err(());
        }
        return Ok(ReqBody::Chunked);
    }
    let mut len = None;
    for v in cl {
        for part in v.split(',').map(str::trim) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = part.parse().map_err(|_| ())?;
            if len.is_some_and(|l| l != n) {
                return Err(());
            }
            len = Some(n);
        }
    }
    Ok(ReqBody::Length(len.unwrap_or(0)))
}

/// Read the request body, returning its length and CRC-32. InvalidData means malformed.
async fn read_body(c: &mut Conn, framing: ReqBody) -> io::Result<(u64, u32)> {
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    let mut sink = |b: &[u8]| {
        crc.update(b);
        len += b.len() as u64;
    };
    match framing {
        ReqBody::Length(n) => c.read_exact_with(n, &mut sink).await?,
        ReqBody::Chunked => loop {
            let line = c.read_line().await?;
            let size_part = line.split(|&b| b == b';').next().unwrap_or_default();
            let size_str = std::str::from_utf8(size_part)
                .map_err(|_| bad("chunk size"))?
                .trim();
            if size_str.is_empty() || size_str.len() > 16 {
                return Err(bad("chunk size"));
            }
            let size = u64::from_str_radix(size_str, 16).map_err(|_| bad("chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                for _ in 0..MAX_TRAILER_LINES {
                    if c.read_line().await?.is_empty() {
                        return Ok((len, crc.finalize()));
                    }
                }
                return Err(bad("too many trailers"));
            }
            c.read_exact_with(size, &mut sink).await?;
            if !c.read_line().await?.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
        },
    }
    Ok((len, crc.finalize()))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

enum Next {
    KeepAlive,
    /// Close after a lingering FIN.
    Close,
    /// Drop the socket at once (EOF seen, I/O error, or an abortive close was set up).
    Drop,
}

async fn serve_connection(sock: TcpStream, conn: u64, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let mut c = Conn {
        sock,
        buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
        pos: 0,
        end: 0,
    };
    loop {
        match handle_one(&mut c, conn, &shared).await {
            Ok(Next::KeepAlive) => {}
            Ok(Next::Close) => return c.graceful_close().await,
            Ok(Next::Drop) | Err(_) => return,
        }
    }
}

async fn handle_one(c: &mut Conn, conn: u64, shared: &Shared) -> io::Result<Next> {
    let req = match read_head(c).await? {
        Head::Eof => return Ok(Next::Drop),
        Head::Bad => return bad_request(c).await,
        Head::Req(r) => r,
    };
    let Ok(framing) = request_framing(&req.headers) else {
        return bad_request(c).await;
    };
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let settings = shared.snapshot();
    let mut record = RequestRecord {
        method: req.method.clone(),
        path: req.target.clone(),
        headers: req.headers.clone(),
        body_len: 0,
        body_crc: 0,
        conn,
    };
    if settings.fault == Some(Fault::Hang) {
        shared.record(record);
        c.discard_until_eof().await;
        return Ok(Next::Drop);
    }
    let has_body = match framing {
        ReqBody::Chunked => true,
        ReqBody::Length(n) => n > 0,
    };
    if has_body
        && req.minor >= 1
        && header_tokens(&req.headers, "expect").any(|t| t.eq_ignore_ascii_case("100-continue"))
    {
        c.sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let (len, crc) = match read_body(c, framing).await {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return bad_request(c).await,
        Err(e) => return Err(e),
    };
    record.body_len = len;
    record.body_crc = crc;
    shared.record(record);

    let connection: Vec<&str> = header_tokens(&req.headers, "connection").collect();
    let keep_alive = if req.minor >= 1 {
        !connection.iter().any(|t| t.eq_ignore_ascii_case("close"))
    } else {
        connection
            .iter()
            .any(|t| t.eq_ignore_ascii_case("keep-alive"))
    };
    let resp = build_response(&req, &settings, len, crc);
    let conditional = find_header(&req.headers, "if-none-match").is_some()
        || find_header(&req.headers, "if-modified-since").is_some();
    if !conditional {
        return write_response(c, &req, resp, &settings, shared, keep_alive).await;
    }
    let now = shared.conditional_now.fetch_add(1, Ordering::SeqCst) + 1;
    shared.conditional_peak.fetch_max(now, Ordering::SeqCst);
    // Counted down however the answer ends (written, failed, or its task dropped).
    struct InFlight<'a>(&'a AtomicU64);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _in_flight = InFlight(&shared.conditional_now);
    write_response(c, &req, resp, &settings, shared, keep_alive).await
}

async fn bad_request(c: &mut Conn) -> io::Result<Next> {
    let body = "bad request\n";
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\nDate: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        http_date(now_secs()),
        body.len()
    );
    c.sock.write_all(head.as_bytes()).await?;
    Ok(Next::Close)
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

enum Body {
    Bytes(Vec<u8>),
    Object {
        key: String,
        version: u32,
        start: u64,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::Object { len, .. } => *len,
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

/// `/reflect`: see the module doc.
fn reflect(req: &Request, s: &Settings, path: &str) -> Response {
    let cc = s
        .cache_control
        .clone()
        .unwrap_or_else(|| DEFAULT_CACHE_CONTROL.to_string());
    let mut r = if path.starts_with("/reflect/redirect") {
        let proto = find_header(&req.headers, "x-forwarded-proto").unwrap_or("http");
        let host = find_header(&req.headers, "x-forwarded-host")
            .or_else(|| find_header(&req.headers, "host"))
            .unwrap_or("");
        let mut r = text(301, "moved\n");
        r.headers
            .push(("Location".into(), format!("{proto}://{host}{path}")));
        r
    } else {
        let mut body = format!("target: {}\n", req.target);
        for (n, v) in &req.headers {
            body.push_str(&format!("{n}: {v}\n"));
        }
        text(200, body)
    };
    r.headers.push(("Cache-Control".into(), cc));
    r
}

/// `/session`: see the module doc.
fn session(req: &Request, path: &str) -> Response {
    let mut r = match (
        find_header(&req.headers, "authorization"),
        find_header(&req.headers, "cookie"),
    ) {
        (Some("Bearer good"), _) => {
            let mut r = text(200, "secret\n");
            r.headers.push(("Cache-Control".into(), "private".into()));
            r
        }
        (Some(_), _) => {
            let mut r = text(401, "unauthorized\n");
            r.headers.push(("WWW-Authenticate".into(), "Bearer".into()));
            r
        }
        (None, Some(cookie)) => {
            let user = cookie
                .split(';')
                .filter_map(|c| c.trim().strip_prefix("session="))
                .next()
                .unwrap_or("nobody");
            let mut r = text(200, format!("hello {user}\n"));
            r.headers.push(("Cache-Control".into(), "private".into()));
            r
        }
        (None, None) if path.contains("cacheable") => {
            let mut r = text(200, "anonymous\n");
            r.headers
                .push(("Cache-Control".into(), "max-age=3600".into()));
            r
        }
        (None, None) => {
            let mut r = text(200, "anonymous\n");
            r.headers
                .push(("Set-Cookie".into(), "session=; Max-Age=0".into()));
            r
        }
    };
    r.headers
        .push(("Vary".into(), "Cookie, Authorization".into()));
    r
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: Body::Bytes(body.into().into_bytes()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The path used for routing and content: no query, no scheme/authority (absolute form).
fn route_path(target: &str) -> &str {
    let t = target.split(['?', '#']).next().unwrap_or("");
    match t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => t,
    }
}

fn build_response(req: &Request, s: &Settings, up_len: u64, up_crc: u32) -> Response {
    if let Some(Fault::Status(code)) = s.fault {
        return text(code, format!("fault status {code}\n"));
    }
    let path = route_path(&req.target);
    match req.method.as_str() {
        "GET" | "HEAD" => {}
        "POST" | "PUT" => {
            let mut r = text(200, format!("len={up_len} crc={up_crc:08x}"));
            r.headers.push(("Cache-Control".into(), "no-store".into()));
            return r;
        }
        _ => {
            let mut r = text(405, "method not allowed\n");
            r.headers
                .push(("Allow".into(), "GET, HEAD, POST, PUT".into()));
            return r;
        }
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (200..=599).contains(c))
    {
        return text(code, format!("status {code} for {path}\n"));
    }
    if path == "/reflect" || path.starts_with("/reflect/") {
        return reflect(req, s, path);
    }
    if path == "/session" || path.starts_with("/session/") {
        return session(req, path);
    }
    if path == "/echo-headers" {
        let mut body = String::new();
        for (n, v) in &req.headers {
            body.push_str(&format!("{n}: {v}\n"));
        }
        let mut r = text(200, body);
        r.headers.push(("Cache-Control".into(), "no-store".into()));
        return r;
    }
    let size_of = |rest: &str| -> Option<u64> {
        let seg = rest.split('/').next()?;
        if seg.is_empty() || !seg.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        seg.parse().ok()
    };
    if let Some(size) = path.strip_prefix("/download/").and_then(size_of) {
        return object_response(req, s, path, size, true);
    }
    if let Some(size) = path.strip_prefix("/obj/").and_then(size_of) {
        return object_response(req, s, path, size, false);
    }
    let mut r = text(404, "not found\n");
    if let Some(cc) = &s.cache_control {
        r.headers.push(("Cache-Control".into(), cc.clone()));
    }
    r
}

enum RangeSpec {
    /// No usable range: answer 200 with the whole object.
    Ignore,
    Unsatisfiable,
    /// Half-open byte range.
    Range(u64, u64),
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only overflow can fail, and a huge position means "to the end".
    Some(s.parse().unwrap_or(u64::MAX))
}

fn parse_range(value: &str, size: u64) -> RangeSpec {
    let v = value.trim();
    if v.len() < 6 || !v[..6].eq_ignore_ascii_case("bytes=") {
        return RangeSpec::Ignore;
    }
    let spec = v[6..].trim();
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Some(n) = digits(b) else {
            return RangeSpec::Ignore;
        };
        if n == 0 || size == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Range(size - n.min(size), size);
    }
    let Some(start) = digits(a) else {
        return RangeSpec::Ignore;
    };
    let last = if b.is_empty() {
        None
    } else {
        match digits(b) {
            Some(l) if l >= start => Some(l),
            _ => return RangeSpec::Ignore,
        }
    };
    if start >= size {
        return RangeSpec::Unsatisfiable;
    }
    let end = last.map_or(size, |l| l.min(size - 1) + 1);
    RangeSpec::Range(start, end)
}

fn etag_matches_weak(list: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    list.split(',')
        .any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

fn object_response(req: &Request, s: &Settings, key: &str, size: u64, download: bool) -> Response {
    let no_validators = matches!(s.fault, Some(Fault::NoValidators { .. }));
    let size = match s.fault {
        Some(Fault::NoValidators { size: Some(n) }) => n,
        _ => size,
    };
    let tag = etag(key, s.version);
    let lm_secs = LAST_MODIFIED_BASE + s.version as u64;
    let mut headers = vec![
        (
            "Content-Type".to_string(),
            "application/octet-stream".to_string(),
        ),
        ("ETag".to_string(), tag.clone()),
        ("Last-Modified".to_string(), http_date(lm_secs)),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    if no_validators {
        headers.retain(|(n, _)| n != "ETag" && n != "Last-Modified");
    }
    if download {
        headers.push(("Cache-Control".into(), "no-store".into()));
    } else if let Some(cc) = &s.cache_control {
        headers.push(("Cache-Control".into(), cc.clone()));
    }
    let hdr = |n: &str| find_header(&req.headers, n);
    let whole = |headers| Response {
        status: 200,
        headers,
        body: Body::Object {
            key: key.to_string(),
            version: s.version,
            start: 0,
            len: size,
        },
    };
    if download {
        return whole(headers);
    }
    let not_modified = match (hdr("if-none-match"), hdr("if-modified-since")) {
        (Some(inm), _) => etag_matches_weak(inm, &tag),
        (None, Some(ims)) => parse_http_date(ims).is_some_and(|t| lm_secs <= t),
        (None, None) => false,
    } && !no_validators;
    if s.fault == Some(Fault::Always206) && req.method == "GET" {
        let n = size.min(100);
        headers.push((
            "Content-Range".into(),
            format!("bytes 0-{}/{size}", n.saturating_sub(1)),
        ));
        return Response {
            status: 206,
            headers,
            body: Body::Object {
                key: key.to_string(),
                version: s.version,
                start: 0,
                len: n,
            },
        };
    }
    let conditional = hdr("if-none-match").is_some() || hdr("if-modified-since").is_some();
    if not_modified || (s.fault == Some(Fault::NotModifiedAnyway) && conditional) {
        return Response {
            status: 304,
            headers,
            body: Body::Bytes(Vec::new()),
        };
    }
    let ignore_range = matches!(
        s.fault,
        Some(Fault::IgnoreRange)
            | Some(Fault::ChunkedNoLength)
            | Some(Fault::SlowChunked { .. })
            | Some(Fault::ChunkedCut { .. })
    );
    let Some(range) = hdr("range").filter(|_| !ignore_range) else {
        return whole(headers);
    };
    let if_range_ok = match hdr("if-range").map(str::trim) {
        None => true,
        // Strong comparison for an entity tag, exact match for a date.
        Some(v) if v.starts_with('"') || v.starts_with("W/") => v == tag,
        Some(v) => parse_http_date(v) == Some(lm_secs),
    };
    if !if_range_ok {
        return whole(headers);
    }
    match parse_range(range, size) {
        RangeSpec::Ignore => whole(headers),
        RangeSpec::Unsatisfiable => {
            headers[0].1 = "text/plain".into();
            headers.push(("Content-Range".into(), format!("bytes */{size}")));
            Response {
                status: 416,
                headers,
                body: Body::Bytes(b"range not satisfiable\n".to_vec()),
            }
        }
        RangeSpec::Range(a, b) => {
            headers.push((
                "Content-Range".into(),
                format!("bytes {a}-{}/{size}", b - 1),
            ));
            Response {
                status: 206,
                headers,
                body: Body::Object {
                    key: key.to_string(),
                    version: s.version,
                    start: if s.fault == Some(Fault::Overlong206) {
                        0
                    } else {
                        a
                    },
                    len: match s.fault {
                        Some(Fault::Broken206) => (b - a).min(100),
                        Some(Fault::Overlong206) => size,
                        _ => b - a,
                    },
                },
            }
        }
    }
}

#[derive(PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    CloseDelimited,
}

async fn write_response(
    c: &mut Conn,
    req: &Request,
    resp: Response,
    s: &Settings,
    shared: &Shared,
    keep_alive: bool,
) -> io::Result<Next> {
    let bodiless = resp.status < 200 || resp.status == 204 || resp.status == 304;
    let framing = if bodiless {
        Framing::None
    } else if matches!(
        s.fault,
        Some(Fault::ChunkedNoLength)
            | Some(Fault::SlowChunked { .. })
            | Some(Fault::ChunkedCut { .. })
    ) || (s.fault == Some(Fault::Overlong206) && resp.status == 206)
    {
        if req.minor >= 1 {
            Framing::Chunked
        } else {
            Framing::CloseDelimited
        }
    } else {
        Framing::Length(resp.body.len())
    };
    let close = !keep_alive || framing == Framing::CloseDelimited;

    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    let mut push = |n: &str, v: &str| {
        head.push_str(n);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    };
    push(
        "Date",
        &http_date(now_secs().saturating_add_signed(s.date_offset)),
    );
    push("Server", "edgeslice-test-origin");
    for (n, v) in resp.headers.iter().chain(s.extra.iter()) {
        push(n, v);
    }
    match framing {
        Framing::Length(n) => push("Content-Length", &n.to_string()),
        Framing::Chunked => push("Transfer-Encoding", "chunked"),
        Framing::None | Framing::CloseDelimited => {}
    }
    if close {
        push("Connection", "close");
    }
    head.push_str("\r\n");

    if let Some(Fault::DelayHeaders(d)) = s.fault {
        tokio::time::sleep(d).await;
    }
    let conditional = find_header(&req.headers, "if-none-match").is_some()
        || find_header(&req.headers, "if-modified-since").is_some();
    if conditional && !s.conditional_delay.is_zero() {
        tokio::time::sleep(s.conditional_delay).await;
    }
    if let Some(Fault::Interim(code)) = s.fault {
        let interim = match code {
            103 => "HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n".to_string(),
            _ => format!("HTTP/1.1 {code} {}\r\n\r\n", reason(code)),
        };
        c.sock.write_all(interim.as_bytes()).await?;
    }
    c.sock.write_all(head.as_bytes()).await?;

    let send_body = req.method != "HEAD" && framing != Framing::None;
    let total = if send_body { resp.body.len() } else { 0 };
    let reset_after = match s.fault {
        Some(Fault::ResetMidBody { after }) | Some(Fault::ChunkedCut { after }) => Some(after),
        _ => None,
    };
    let limit = reset_after.map_or(total, |a| a.min(total));
    let pace = match s.fault {
        Some(Fault::Slow { bytes_per_sec }) | Some(Fault::SlowChunked { bytes_per_sec }) => {
            Some(bytes_per_sec.max(1))
        }
        _ => None,
    };
    let piece = pace.map_or(PIECE as u64, |bps| (bps / 10).clamp(1, PIECE as u64));
    let chunked = framing == Framing::Chunked;
    let started = Instant::now();
    let mut scratch = Vec::new();
    let mut sent = 0u64;
    while sent < limit {
        if let Some(bps) = pace {
            let due = started + Duration::from_secs_f64(sent as f64 / bps as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let n = (limit - sent).min(piece) as usize;
        let data: &[u8] = match &resp.body {
            Body::Bytes(b) => &b[sent as usize..sent as usize + n],
            Body::Object {
                key,
                version,
                start,
                ..
            } => {
                scratch.resize(n, 0);
                fill_content(key, *version, start + sent, &mut scratch);
                &scratch
            }
        };
        if chunked {
            c.sock.write_all(format!("{n:x}\r\n").as_bytes()).await?;
        }
        c.sock.write_all(data).await?;
        if chunked {
            c.sock.write_all(b"\r\n").await?;
        }
        sent += n as u64;
        shared.body_bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
    }
    if reset_after.is_some() {
        abortive_close(&c.sock).await;
        return Ok(Next::Drop);
    }
    if chunked && send_body {
        c.sock.write_all(b"0\r\n\r\n").await?;
    }
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Wait (bounded) until everything written was acknowledged by the peer, so that the RST does
/// not discard bytes still in our send queue, then set SO_LINGER 0: dropping the socket sends
/// a RST.
async fn abortive_close(sock: &TcpStream) {
    let deadline = Instant::now() + RESET_DRAIN;
    while unacked_bytes(sock) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = sock.set_zero_linger();
}

#[cfg(target_os = "linux")]
fn unacked_bytes(sock: &TcpStream) -> i64 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int; the fd is valid while `sock` is borrowed.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n as i64
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn unacked_bytes(_sock: &TcpStream) -> i64 {
    0
}
