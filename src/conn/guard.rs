//! The client connection as Pingora sees it: the accepted stream wrapped so that time and size
//! limits hold whatever Pingora's own reads and writes do.
//!
//! - Waiting for a request (a new connection, or keep-alive between requests): the connection
//!   ends quietly after `header_timeout` (new) or `keepalive_timeout` (idle), or as soon as the
//!   table reclaims it for a new client.
//! - While a request header arrives, it must be complete within `header_timeout` (408), its
//!   request line within `max_uri_size` (414) and the whole within `max_header_size` (431). The
//!   answer is written here, before Pingora has parsed (or buffered) the oversized header.
//! - A write that makes no progress for `send_timeout` fails: a client that stopped reading
//!   cannot hold a response (and its buffers) forever.
//! - A shaped response is paced here, at the write ([`super::pace`]): each write is accounted
//!   with the response's pacer just before it goes, in parts of at most
//!   [`super::pace::MAX_RESERVATION`], and waits until the pacer allows it. While a write waits,
//!   the client is watched: a client that is gone fails the write at once (and the bytes
//!   accounted for it are given back), so the response ends and frees its connection slot, its
//!   download (and share of `shaping.total_rate`) and its origin connection, instead of
//!   sleeping out a pacing delay nobody will read.
//!
//! "Gone" means the client's side of the connection ended: a FIN (read returns end of stream)
//! or a reset (read fails). As nginx (unless `proxy_ignore_client_abort`) and Pingora's own idle
//! probe do, a half-close counts as leaving: an HTTP/1.1 client that shuts down its sending side
//! while still reading a response is rare, and cannot be told apart from one that closed.
//! Bytes that arrive instead (a pipelined request) are kept, at most [`WATCH_STASH`], and handed
//! to the next reads as if they came from the socket then; past that the socket is polled for
//! a hang-up every [`WATCH_TICK`].
//!
//! Reads and writes that make progress pass straight through: no copy, no timer.

use super::header_scan::{HeaderLimits, HeaderScan, Scan};
use super::table::{Conn, ConnTable, Phase};
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// After answering 408/414/431, input is read and dropped for at most this long (or this many
/// bytes) before the connection closes, so that closing does not reset the answer away before
/// the client reads it (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 4 << 20;

/// Bytes the client watch of a paced wait reads ahead and keeps (a pipelined request), at most.
pub const WATCH_STASH: usize = 4096;
/// Once [`WATCH_STASH`] is full, how often a paced wait polls the socket for a hang-up instead.
pub const WATCH_TICK: Duration = Duration::from_millis(100);

/// The limits a guard enforces, shared by every connection of a service.
#[derive(Debug)]
pub struct GuardSettings {
    /// `None`: no keep-alive.
    pub keepalive_timeout: Option<Duration>,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
    pub limits: HeaderLimits,
    canned: Canned,
}

/// The complete answers a guard writes itself.
#[derive(Debug)]
struct Canned {
    timeout: Bytes,
    uri_too_long: Bytes,
    too_large: Bytes,
    busy: Bytes,
}

fn canned(status: &str, body: &str, extra: &str) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    ))
}

impl GuardSettings {
    pub fn new(
        keepalive_timeout: Option<Duration>,
        header_timeout: Duration,
        send_timeout: Duration,
        limits: HeaderLimits,
    ) -> GuardSettings {
        GuardSettings {
            keepalive_timeout,
            header_timeout,
            send_timeout,
            limits,
            canned: Canned {
                timeout: canned("408 Request Timeout", "request header timed out\n", ""),
                uri_too_long: canned("414 URI Too Long", "request target too long\n", ""),
                too_large: canned(
                    "431 Request Header Fields Too Large",
                    "request header too large\n",
                    "",
                ),
                busy: canned(
                    "503 Service Unavailable",
                    "too many connections\n",
                    "Retry-After: 1\r\n",
                ),
            },
        }
    }

    /// The answer to a connection refused at the cap.
    pub fn busy_response(&self) -> &Bytes {
        &self.canned.busy
    }
}

/// An answer being written by the guard, then the lingering close.
struct Reject {
    response: Bytes,
    /// When the lingering close ends, written or not.
    until: Instant,
    written: usize,
    shut: bool,
    drained: usize,
}

/// One client connection, guarded.
pub struct Guarded {
    inner: Stream,
    conn: Arc<Conn>,
    table: Arc<ConnTable>,
    settings: Arc<GuardSettings>,
    scan: HeaderScan,
    /// When the header now arriving must be complete.
    header_deadline: Option<Instant>,
    read_timer: Option<(Instant, Pin<Box<Sleep>>)>,
    /// When a write that has made no progress times out.
    write_deadline: Option<Instant>,
    write_timer: Option<(Instant, Pin<Box<Sleep>>)>,
    reject: Option<Reject>,
    /// Bytes read while waiting for a request ([`Guarded::poll_wait`]), or by the client watch
    /// of a paced wait, handed to the next reads before the socket's. Empty (unallocated)
    /// otherwise.
    stash: Vec<u8>,
    stash_pos: usize,
    /// Pingora holds bytes of the next request already (pipelined with the previous one): the
    /// next header is scanned from where those bytes end ([`HeaderScan::resumed`]).
    prefix_held: bool,
    /// The stash holds bytes kept back from Pingora after a line end that may have ended the
    /// header ([`Scan::Ambiguous`]): scanned before they go on if the header did not end there.
    probing: bool,
    /// The stash holds bytes of the client watch: not yet seen by the header limits, so the
    /// next reads treat them as if they came from the socket then.
    stash_unscanned: bool,
    /// The write gate's timer (shaped responses; see [`Conn::pace_response`]).
    gate_timer: Option<(Instant, Pin<Box<Sleep>>)>,
    /// The client watch's hang-up poll timer, once its stash is full.
    watch_timer: Option<(Instant, Pin<Box<Sleep>>)>,
    /// Small writes (a response header) held until the next write or flush, so that a header
    /// and a body piece leave in one `writev` rather than two `sendto`s. At most [`HOLD`]
    /// bytes; released (unallocated) while the connection waits for its next request.
    held: Vec<u8>,
}

/// The most bytes held back by [`Guarded::held`]: a response header and a little more. Pingora's
/// socket write buffer (1460 bytes) already holds writes this small until a flush; holding them
/// here instead lets the next, larger write carry them in the same system call.
const HOLD: usize = 2048;

/// What the guard does with header bytes it just scanned.
enum Verdict {
    /// They go on to Pingora.
    Pass,
    /// Over a limit: this answer instead.
    Reject(Bytes),
    /// The first this many go on; the rest wait until it is known whether the header ended
    /// there ([`Guarded::resolve_probe`]).
    HoldFrom(usize),
}

/// How waiting for a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Its first bytes arrived (kept for the next read).
    Request,
    /// The deadline passed.
    TimedOut,
    /// Reclaimed, or closed by the client.
    Ended,
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.conn.phase())
            .finish()
    }
}

/// Whether `deadline` has passed, arming `timer` for it (and waking `cx` then) if not.
fn expired(
    timer: &mut Option<(Instant, Pin<Box<Sleep>>)>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    let (at, sleep) = timer.get_or_insert_with(|| {
        (
            deadline,
            Box::pin(tokio::time::sleep_until(deadline.into())),
        )
    });
    if *at != deadline {
        sleep.as_mut().reset(deadline.into());
        *at = deadline;
    }
    sleep.as_mut().poll(cx).is_ready()
}

impl Guarded {
    pub fn new(
        inner: Stream,
        conn: Arc<Conn>,
        table: Arc<ConnTable>,
        settings: Arc<GuardSettings>,
    ) -> Guarded {
        Guarded {
            inner,
            conn,
            table,
            settings,
            scan: HeaderScan::default(),
            header_deadline: None,
            read_timer: None,
            write_deadline: None,
            write_timer: None,
            reject: None,
            stash: Vec::new(),
            held: Vec::new(),
            stash_pos: 0,
            prefix_held: false,
            probing: false,
            stash_unscanned: false,
            gate_timer: None,
            watch_timer: None,
        }
    }

    /// The first request's header is arriving already (a TLS connection's ClientHello came):
    /// it must be complete by `at`.
    pub fn set_header_deadline(&mut self, at: Instant) {
        self.header_deadline = Some(at);
    }

    /// Whether Pingora holds the start of the next request (bytes that came with the previous
    /// one): set by the keep-alive loop before each request.
    pub fn set_prefix_held(&mut self, held: bool) {
        self.prefix_held = held;
    }

    /// Wait for a request, holding only this stream: until its whole header has arrived (kept
    /// for the next reads, which Pingora parses at once), or the connection is to end. The wait
    /// for the first byte ends after `header_timeout` on a new connection and
    /// `keepalive_timeout` on an idle one; a header that arrives too slowly or too large is
    /// answered (408, 414, 431) here, before Pingora has seen a byte of it, so it neither holds
    /// Pingora's per-request state nor makes it log a broken request.
    pub fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Wait> {
        if self.held.is_empty() && self.held.capacity() > 0 {
            self.held = Vec::new();
        }
        loop {
            if self.reject.is_some() {
                return self.poll_reject(cx).map(|_| Wait::Ended);
            }
            let phase = self.conn.phase();
            match phase {
                Phase::Closing => {
                    if let Some(response) = self.reclaimed_mid_header() {
                        self.stash = Vec::new();
                        self.begin_reject(response);
                        continue;
                    }
                    return Poll::Ready(Wait::Ended);
                }
                Phase::Busy => return Poll::Ready(Wait::Request),
                Phase::Fresh | Phase::Idle | Phase::Header => {
                    self.conn.register_reader(cx.waker());
                    if self.conn.phase() == Phase::Closing {
                        continue;
                    }
                }
            }
            let mut scratch = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    if phase != Phase::Header && !self.header_arrived(phase) {
                        return Poll::Ready(Wait::Ended);
                    }
                    let start = self.stash.len();
                    self.stash.extend_from_slice(rb.filled());
                    if let Some(response) = self.scan_header(start) {
                        self.stash = Vec::new();
                        self.begin_reject(response);
                    }
                }
                Poll::Ready(_) => return Poll::Ready(Wait::Ended),
                Poll::Pending => {
                    let Some(deadline) = self.read_deadline(phase) else {
                        return Poll::Pending;
                    };
                    if !expired(&mut self.read_timer, deadline, cx) {
                        return Poll::Pending;
                    }
                    if phase != Phase::Header {
                        return Poll::Ready(Wait::TimedOut);
                    }
                    let response = self.header_timed_out();
                    self.stash = Vec::new();
                    self.begin_reject(response);
                }
            }
        }
    }

    /// The first bytes of a request header arrived in `phase` (`Fresh` or `Idle`): it must be
    /// complete within `header_timeout` (counted from the connection's start for its first
    /// request). `false`: the table reclaimed the connection just now; it ends (a client must
    /// retry a request raced with a keep-alive close).
    fn header_arrived(&mut self, phase: Phase) -> bool {
        if !self.conn.begin_header() {
            return false;
        }
        let start = if phase == Phase::Fresh {
            self.table.instant_at(self.conn.since_ms())
        } else {
            Instant::now()
        };
        self.header_deadline = Some(start + self.settings.header_timeout);
        // Bytes Pingora already holds may be the start of this header: the scan cannot know
        // where in it these bytes fall.
        self.scan = if std::mem::take(&mut self.prefix_held) {
            HeaderScan::resumed()
        } else {
            HeaderScan::default()
        };
        true
    }

    /// Scan header bytes that just arrived. At the header's end the request is busy (and bytes
    /// past it noted); over a limit, the answer to send.
    fn scan_header_bytes(&mut self, bytes: &[u8]) -> Verdict {
        let canned = &self.settings.canned;
        let response = match self.scan.feed(bytes, &self.settings.limits) {
            Scan::Partial => return Verdict::Pass,
            Scan::Complete(end) => {
                if end < bytes.len() {
                    self.conn.note_overread();
                }
                self.conn.begin_request();
                self.header_deadline = None;
                return Verdict::Pass;
            }
            Scan::Ambiguous(at) => return Verdict::HoldFrom(at),
            Scan::UriTooLong => canned.uri_too_long.clone(),
            Scan::TooLarge => canned.too_large.clone(),
        };
        self.table
            .stats
            .oversize_rejected
            .fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "client {}: request header over the limits (max_uri_size {}, max_header_size {}): {}",
            peer(&self.inner),
            self.settings.limits.max_uri,
            self.settings.limits.max_header,
            String::from_utf8_lossy(&response[9..12])
        );
        Verdict::Reject(response)
    }

    /// [`Guarded::scan_header_bytes`] over the stash from `start`. (Only a resumed scan holds
    /// bytes back, and those are never scanned while waiting for a request.)
    fn scan_header(&mut self, start: usize) -> Option<Bytes> {
        let stash = std::mem::take(&mut self.stash);
        let verdict = self.scan_header_bytes(&stash[start..]);
        self.stash = stash;
        match verdict {
            Verdict::Reject(response) => Some(response),
            Verdict::Pass | Verdict::HoldFrom(_) => None,
        }
    }

    /// Bytes were held back at a line end that may have ended the header. If Pingora reads
    /// again before it has parsed a request, the header goes on: scan the held bytes now (they
    /// are handed over next). `Some`: the answer to send.
    fn resolve_probe(&mut self) -> Option<Bytes> {
        if !std::mem::take(&mut self.probing) || self.conn.phase() != Phase::Header {
            return None;
        }
        self.scan.continues();
        let stash = std::mem::take(&mut self.stash);
        let verdict = self.scan_header_bytes(&stash[self.stash_pos..]);
        self.stash = stash;
        match verdict {
            Verdict::Reject(response) => {
                self.stash = Vec::new();
                self.stash_pos = 0;
                Some(response)
            }
            Verdict::Pass | Verdict::HoldFrom(_) => None,
        }
    }

    /// The table reclaimed the connection while a header was arriving (the longest-arriving
    /// header at the cap): the 408 to send, once.
    fn reclaimed_mid_header(&mut self) -> Option<Bytes> {
        self.header_deadline.take()?;
        self.table
            .stats
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "client {}: request header still arriving when the connection table was full: 408",
            peer(&self.inner)
        );
        Some(self.settings.canned.timeout.clone())
    }

    /// The header did not arrive within `header_timeout`: the 408 to send.
    fn header_timed_out(&mut self) -> Bytes {
        self.table
            .stats
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "client {}: request header not complete within header_timeout {:?}: 408",
            peer(&self.inner),
            self.settings.header_timeout
        );
        self.settings.canned.timeout.clone()
    }

    /// Hand stashed bytes to `buf`; whether there were any.
    fn take_stash(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.stash_pos >= self.stash.len() {
            return false;
        }
        let n = (self.stash.len() - self.stash_pos).min(buf.remaining());
        buf.put_slice(&self.stash[self.stash_pos..self.stash_pos + n]);
        self.stash_pos += n;
        if self.stash_pos == self.stash.len() {
            self.stash = Vec::new();
            self.stash_pos = 0;
            self.stash_unscanned = false;
        }
        true
    }

    /// A write of `want` bytes (> 0) is about to go: on a paced response, account it and wait
    /// until the pacer allows it (watching the client); how many of the bytes may go now.
    fn poll_pace(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let Some(allowed) = self.conn.reserve_write(want) else {
            return Poll::Ready(Ok(want));
        };
        ready!(self.poll_gate(cx))?;
        Poll::Ready(Ok(allowed))
    }

    /// After a paced write: what was written is settled; on a failure, what was accounted is
    /// given back.
    fn after_paced(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => self.conn.written(*n),
            Poll::Ready(Err(_)) => self.conn.refund_reserved(),
            Poll::Pending => {}
        }
    }

    /// Writes wait while the connection's write gate is closed (a shaped response's pacing),
    /// watching the client: `Ready(Ok)` once the gate passes, `Ready(Err)` at once if the client
    /// is gone.
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(at) = self.conn.write_gate() else {
            return Poll::Ready(Ok(()));
        };
        if expired(&mut self.gate_timer, at, cx) {
            self.conn.lift_write_gate(at);
            return Poll::Ready(Ok(()));
        }
        if self.client_gone(cx) {
            self.conn.refund_reserved();
            self.table
                .stats
                .paced_aborts
                .fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client closed the connection during a paced wait",
            )));
        }
        Poll::Pending
    }

    /// Whether the client has left (FIN or reset), arranging for `cx` to be woken when that
    /// may have changed: by the socket (a read is pending), or after [`WATCH_TICK`] once
    /// [`WATCH_STASH`] bytes sent ahead are kept. Bytes read are kept for the next reads.
    fn client_gone(&mut self, cx: &mut Context<'_>) -> bool {
        // A header the wait collected and Pingora has not taken yet: never mixed with these.
        let watchable = self.stash_unscanned || self.stash_pos >= self.stash.len();
        while watchable && self.stash.len() - self.stash_pos < WATCH_STASH {
            let mut scratch = [0u8; 1024];
            let room = (WATCH_STASH - (self.stash.len() - self.stash_pos)).min(scratch.len());
            let mut rb = ReadBuf::new(&mut scratch[..room]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return true,
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => {
                    if !self.stash_unscanned {
                        self.stash.clear();
                        self.stash_pos = 0;
                        self.stash_unscanned = true;
                    }
                    self.stash.extend_from_slice(rb.filled());
                    // Past the request's header: the next request may start here.
                    self.conn.note_overread();
                }
                Poll::Pending => return false,
            }
        }
        // No read can be left pending: look at the socket itself now and again.
        if hung_up(self.inner.id()) {
            return true;
        }
        let next = Instant::now() + WATCH_TICK;
        let due = self.watch_timer.as_ref().map(|(at, _)| *at);
        let deadline = match due {
            Some(at) if at > Instant::now() => at,
            _ => next,
        };
        // Armed for `deadline`; it has not passed, so the poll registers the wake-up.
        let _ = expired(&mut self.watch_timer, deadline, cx);
        false
    }

    /// When a read in `phase` gives up, if ever.
    fn read_deadline(&self, phase: Phase) -> Option<Instant> {
        let since = || self.table.instant_at(self.conn.since_ms());
        match phase {
            Phase::Fresh => Some(since() + self.settings.header_timeout),
            Phase::Idle => self.settings.keepalive_timeout.map(|k| since() + k),
            Phase::Header => self.header_deadline,
            Phase::Busy | Phase::Closing => None,
        }
    }

    /// Answer `response` and close: driven by [`Guarded::poll_reject`].
    fn begin_reject(&mut self, response: Bytes) {
        self.conn
            .answered_unparsed(status_of(&response).unwrap_or(0));
        self.reject = Some(Reject {
            response,
            until: Instant::now() + LINGER,
            written: 0,
            shut: false,
            drained: 0,
        });
        self.conn.begin_request();
        self.header_deadline = None;
    }

    /// Write the answer, half-close, then drop input until the client closes or the linger
    /// ends; then end of stream, so that Pingora drops the connection.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = self.reject.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let linger_end = r.until;
        while r.written < r.response.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &r.response[r.written..]) {
                Poll::Ready(Ok(n)) if n > 0 => r.written += n,
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    if expired(&mut self.read_timer, linger_end, cx) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
        if !r.shut {
            match Pin::new(&mut self.inner).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => r.shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if !sink.filled().is_empty() => {
                    r.drained += sink.filled().len();
                    if r.drained > LINGER_MAX_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    if expired(&mut self.read_timer, linger_end, cx) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Write out the held bytes (before a flush, a shutdown or a vectored write).
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let polled = Pin::new(&mut self.inner).poll_write(cx, &self.held);
            let n = ready!(self.after_write(polled, cx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// A write (or flush) was polled: progress clears the stall deadline; no progress for
    /// `send_timeout` fails it.
    fn after_write<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                if self.write_deadline.take().is_some() {
                    self.conn.write_progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.write_stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }

    /// A write made no progress: fail it once it has made none for `send_timeout`, or at once
    /// if the table has cut the connection to give its memory to responses waiting for it.
    fn write_stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.conn.write_stalled(cx.waker()) {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "cut: the client read nothing while other responses waited for the response budget",
            ));
        }
        let deadline = *self
            .write_deadline
            .get_or_insert_with(|| Instant::now() + self.settings.send_timeout);
        if expired(&mut self.write_timer, deadline, cx) {
            self.table
                .stats
                .send_timeouts
                .fetch_add(1, Ordering::Relaxed);
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "send_timeout: the client read nothing for {:?}",
                    self.settings.send_timeout
                ),
            ));
        }
        None
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reject.is_some() {
            return this.poll_reject(cx);
        }
        let phase = this.conn.phase();
        if phase == Phase::Closing {
            if let Some(response) = this.reclaimed_mid_header() {
                this.stash = Vec::new();
                this.stash_pos = 0;
                this.stash_unscanned = false;
                this.begin_reject(response);
                return this.poll_reject(cx);
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(response) = this.resolve_probe() {
            this.begin_reject(response);
            return this.poll_reject(cx);
        }
        // A header the wait collected, or bytes held back at a line end: scanned (or past the
        // header), handed over as they are. (Bytes the client watch kept are scanned below.)
        if !this.stash_unscanned && this.take_stash(buf) {
            return Poll::Ready(Ok(()));
        }
        // Otherwise Pingora reads the socket itself (it may hold the start of a pipelined
        // request): the same limits, applied as the bytes pass.
        let waiting = matches!(phase, Phase::Fresh | Phase::Idle);
        if waiting || phase == Phase::Header {
            // Woken if the table reclaims the connection.
            this.conn.register_reader(cx.waker());
        }
        let before = buf.filled().len();
        // Bytes the client watch kept go through the same limits as the socket's.
        let polled = if this.stash_unscanned && this.take_stash(buf) {
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if waiting && !this.header_arrived(phase) {
                    buf.set_filled(before);
                    return Poll::Ready(Ok(()));
                }
                match this.conn.phase() {
                    Phase::Header => match this.scan_header_bytes(&buf.filled()[before..]) {
                        Verdict::Pass => {}
                        Verdict::Reject(response) => {
                            buf.set_filled(before);
                            this.begin_reject(response);
                            return this.poll_reject(cx);
                        }
                        Verdict::HoldFrom(at) => {
                            // Held back, ahead of what the client watch kept and is not
                            // handed over yet (a scanned stash is handed over first).
                            let mut held = buf.filled()[before + at..].to_vec();
                            held.extend_from_slice(&this.stash[this.stash_pos..]);
                            this.stash = held;
                            this.stash_pos = 0;
                            this.stash_unscanned = false;
                            buf.set_filled(before + at);
                            this.probing = !this.stash.is_empty();
                        }
                    },
                    Phase::Busy => this.conn.note_overread(),
                    _ => {}
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                let Some(deadline) = this.read_deadline(phase) else {
                    return Poll::Pending;
                };
                if !expired(&mut this.read_timer, deadline, cx) {
                    return Poll::Pending;
                }
                if phase == Phase::Header {
                    let response = this.header_timed_out();
                    this.begin_reject(response);
                    return this.poll_reject(cx);
                }
                if phase == Phase::Idle {
                    this.table
                        .stats
                        .keepalive_closed
                        .fetch_add(1, Ordering::Relaxed);
                }
                // End of stream: Pingora closes a connection that sent nothing quietly.
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// The status of a response whose head starts `data` (`HTTP/1.x NNN`).
fn status_of(data: &[u8]) -> Option<u16> {
    let rest = data.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Whether the socket `fd` reports the client gone (its side closed, or an error), without
/// reading. `false` for a stream without a descriptor.
fn hung_up(fd: UniqueIDType) -> bool {
    if fd < 0 {
        return false;
    }
    #[cfg(target_os = "linux")]
    let events = libc::POLLRDHUP;
    #[cfg(not(target_os = "linux"))]
    let events = libc::POLLHUP;
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout: poll only reads and writes that struct.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (events | libc::POLLHUP | libc::POLLERR) != 0
}

fn peer(stream: &Stream) -> String {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().map(|a| a.to_string()))
        .unwrap_or_else(|| "-".into())
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.conn.app_has_request() {
            // Pingora answering a request it would not hand over (400 to a header it could not
            // parse): noted for the access log.
            if let Some(status) = status_of(data) {
                this.conn.answered_unparsed(status);
            }
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let allowed = ready!(this.poll_pace(cx, data.len()))?;
        let r = this.poll_write_allowed(cx, &data[..allowed]);
        this.after_paced(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.conn.app_has_request() {
            if let Some(status) = bufs.first().and_then(|b| status_of(b)) {
                this.conn.answered_unparsed(status);
            }
        }
        if this.conn.is_paced() {
            // Paced: one part at a time anyway.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        ready!(this.poll_write_held(cx))?;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Guarded {
    /// Write `data` (already allowed by the pacing): small writes are held, see [`HOLD`].
    fn poll_write_allowed(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
        if this.held.len() + data.len() <= HOLD {
            this.held.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        // The held bytes go first, with as much of `data` as the socket takes in the same call.
        while !this.held.is_empty() {
            let bufs = [io::IoSlice::new(&this.held), io::IoSlice::new(data)];
            let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs);
            let n = ready!(this.after_write(polled, cx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n <= this.held.len() {
                this.held.drain(..n);
                continue;
            }
            let of_data = n - this.held.len();
            this.held.clear();
            return Poll::Ready(Ok(of_data));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.after_write(polled, cx)
    }
}

impl Drop for Guarded {
    /// Pingora drops a connection it will not reuse without flushing it (a response that
    /// failed mid-body, say): held bytes — the header and the first bytes of a body a client
    /// can resume from — still go out if the socket takes them now. Best effort, never waits.
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !self.held.is_empty() {
            match Pin::new(&mut self.inner).poll_write(&mut cx, &self.held) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.held.drain(..n);
                }
                _ => return,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(&mut cx);
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        // Held bytes are part of what was written: they go before the close.
        if !self.held.is_empty() {
            let _ = std::future::poll_fn(|cx| self.poll_write_held(cx)).await;
        }
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// A socket that records each write call and what it carried; `budget` bytes per call at
    /// most (a socket buffer filling up). Its read side is what `input` says.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<Vec<u8>>>>,
        budget: usize,
        input: Arc<Mutex<Input>>,
    }

    /// Each write call's bytes, in order.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// What the client sends: bytes, then (maybe) its close or a reset.
    #[derive(Debug, Default)]
    struct Input {
        bytes: Vec<u8>,
        closed: bool,
        reset: bool,
        reader: Option<std::task::Waker>,
    }

    impl Input {
        fn send(this: &Arc<Mutex<Input>>, f: impl FnOnce(&mut Input)) {
            let mut i = this.lock().unwrap();
            f(&mut i);
            if let Some(w) = i.reader.take() {
                w.wake();
            }
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut i = self.input.lock().unwrap();
            if !i.bytes.is_empty() {
                let n = i.bytes.len().min(buf.remaining());
                buf.put_slice(&i.bytes[..n]);
                i.bytes.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if i.reset {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if i.closed {
                return Poll::Ready(Ok(()));
            }
            i.reader = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.budget);
            self.calls.lock().unwrap().push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            all.truncate(self.budget);
            let n = all.len();
            self.calls.lock().unwrap().push(all);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[async_trait]
    impl Shutdown for Recorder {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Recorder {
        fn id(&self) -> UniqueIDType {
            // No descriptor: the hang-up poll never looks at a real one.
            -1
        }
    }
    impl Ssl for Recorder {}
    impl GetTimingDigest for Recorder {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            vec![]
        }
    }
    impl GetProxyDigest for Recorder {
        fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Recorder {
        fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
            None
        }
    }
    impl Peek for Recorder {}

    fn guarded(budget: usize) -> (Guarded, Arc<Mutex<Vec<Vec<u8>>>>) {
        let (g, calls, _) = guarded_with_input(budget);
        (g, calls)
    }

    /// Ten-second timeouts and the default header limits, no send timeout.
    fn test_settings() -> Arc<GuardSettings> {
        Arc::new(GuardSettings::new(
            None,
            Duration::from_secs(10),
            Duration::from_secs(10),
            HeaderLimits {
                max_header: 64 << 10,
                max_uri: 8 << 10,
                max_fields: 256,
            },
        ))
    }

    /// A guarded connection serving a request (busy), the record of its writes and its
    /// client's input.
    fn guarded_with_input(budget: usize) -> (Guarded, Writes, Arc<Mutex<Input>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let input = Arc::new(Mutex::new(Input::default()));
        let table = ConnTable::new(4);
        let admission = table.admit().expect("admitted");
        let settings = test_settings();
        let inner: Stream = Box::new(Recorder {
            calls: calls.clone(),
            budget,
            input: input.clone(),
        });
        let conn = admission.conn().clone();
        conn.begin_header();
        conn.begin_request();
        // The admission stays with the table for the test's length.
        std::mem::forget(admission);
        (Guarded::new(inner, conn, table, settings), calls, input)
    }

    /// A pacer that asks each reservation to wait the next of `waits` (then none), and
    /// records what it accounted and what was given back.
    #[derive(Default, Clone)]
    struct Script {
        waits: Arc<Mutex<Vec<Duration>>>,
        paced: Arc<Mutex<Vec<usize>>>,
        refunded: Arc<Mutex<usize>>,
    }

    impl crate::conn::pace::BodyPacer for Script {
        fn pace(&mut self, n: usize) -> Duration {
            self.paced.lock().unwrap().push(n);
            let mut w = self.waits.lock().unwrap();
            if w.is_empty() {
                Duration::ZERO
            } else {
                w.remove(0)
            }
        }
        fn refund(&mut self, n: usize) {
            *self.refunded.lock().unwrap() += n;
        }
    }

    fn pace(g: &Guarded, waits: &[Duration]) -> Script {
        let s = Script::default();
        *s.waits.lock().unwrap() = waits.to_vec();
        g.conn.pace_response(Box::new(s.clone()));
        s
    }

    #[tokio::test]
    async fn a_paced_write_waits_at_the_gate_then_goes_out_in_parts() {
        let (mut g, calls, _input) = guarded_with_input(usize::MAX);
        let script = pace(&g, &[Duration::from_millis(150)]);
        let started = Instant::now();
        g.write_all(&[7u8; 40_000]).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(calls.lock().unwrap().concat(), vec![7u8; 40_000]);
        // Accounted part by part as the parts went, never more than one part ahead.
        let part = crate::conn::pace::MAX_RESERVATION;
        assert_eq!(
            *script.paced.lock().unwrap(),
            vec![part, part, 40_000 - 2 * part]
        );
        assert_eq!(g.conn.write_gate(), None, "lifted once passed");
        // The response ends: nothing is paced any more.
        g.conn.end_pacing();
        g.write_all(&[8u8; 4096]).await.unwrap();
        assert_eq!(script.paced.lock().unwrap().len(), 3);
        assert_eq!(*script.refunded.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_client_that_leaves_during_a_paced_wait_fails_the_write_at_once() {
        for how in ["close", "reset"] {
            let (mut g, calls, input) = guarded_with_input(usize::MAX);
            let script = pace(&g, &[Duration::from_secs(30)]);
            let leave = input.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Input::send(&leave, |i| match how {
                    "close" => i.closed = true,
                    _ => i.reset = true,
                });
            });
            let r = tokio::time::timeout(Duration::from_secs(5), g.write_all(&[1u8; 4096]))
                .await
                .expect("ended long before the gate");
            let e = r.expect_err("the write fails");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{how}");
            assert!(calls.lock().unwrap().is_empty(), "{how}: nothing written");
            assert_eq!(g.table.stats.paced_aborts.load(Ordering::Relaxed), 1);
            // What was accounted for the write is given back.
            assert_eq!(*script.refunded.lock().unwrap(), 4096, "{how}");
        }
    }

    #[tokio::test]
    async fn a_client_that_sent_more_than_is_kept_and_left_is_still_noticed() {
        // A real socket: past WATCH_STASH bytes the watch polls the descriptor for a hang-up.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let table = ConnTable::new(4);
        let admission = table.admit().expect("admitted");
        let conn = admission.conn().clone();
        conn.begin_header();
        conn.begin_request();
        let settings = test_settings();
        let inner: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(server));
        let mut g = Guarded::new(inner, conn.clone(), table.clone(), settings);
        let _script = pace(&g, &[Duration::from_secs(30)]);
        client.write_all(&[b'x'; 3 * WATCH_STASH]).await.unwrap();
        let leave = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Its own half-close; the bytes it sent stay unread on our side.
            client.shutdown().await.unwrap();
            client
        };
        let (r, _client) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), g.write_all(&[1u8; 4096])),
            leave
        );
        let e = r.expect("noticed long before the gate").expect_err("fails");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(
            g.stash.len() - g.stash_pos,
            WATCH_STASH,
            "kept no more than this"
        );
        drop(admission);
    }

    #[tokio::test]
    async fn bytes_sent_during_a_paced_wait_are_kept_for_the_next_reads() {
        let (mut g, calls, input) = guarded_with_input(usize::MAX);
        let _script = pace(&g, &[Duration::from_millis(100)]);
        let next = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        Input::send(&input, |i| i.bytes = next.clone());
        g.write_all(&[2u8; 4096]).await.unwrap();
        assert_eq!(calls.lock().unwrap().concat(), vec![2u8; 4096]);
        // A pipelined request is not a client leaving: kept, and the next request starts
        // from it (Pingora reads it next, the connection marked as having bytes past this
        // request).
        assert!(g.conn.take_overread());
        g.conn.set_idle(g.table.now_ms());
        let mut got = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut g, &mut got)
            .await
            .unwrap();
        assert_eq!(&got[..n], &next[..]);
        // It went through the header limits as socket bytes would: the request is busy.
        assert_eq!(g.conn.phase(), Phase::Busy);
    }

    #[tokio::test]
    async fn a_header_and_a_body_leave_in_one_write() {
        let (mut g, calls) = guarded(usize::MAX);
        let header = vec![b'h'; 400];
        let body = vec![b'b'; 4096];
        g.write_all(&header).await.unwrap();
        assert!(calls.lock().unwrap().is_empty(), "the header is held");
        g.write_all(&body).await.unwrap();
        g.flush().await.unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "one write call for header and body");
        assert_eq!(calls[0], [header, body].concat());
    }

    #[tokio::test]
    async fn held_bytes_go_out_on_flush_and_in_order_under_short_writes() {
        // A header-only response: written at the flush.
        let (mut g, calls) = guarded(usize::MAX);
        g.write_all(b"HTTP/1.1 304 Not Modified\r\n\r\n")
            .await
            .unwrap();
        g.flush().await.unwrap();
        assert_eq!(
            calls.lock().unwrap().concat(),
            b"HTTP/1.1 304 Not Modified\r\n\r\n"
        );

        // A socket taking 300 bytes per call: every byte arrives once, in order.
        let (mut g, calls) = guarded(300);
        let header: Vec<u8> = (0..700u32).map(|i| (i % 251) as u8).collect();
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
        g.write_all(&header).await.unwrap();
        g.write_all(&body).await.unwrap();
        g.write_all(b"tail").await.unwrap();
        AsyncWriteExt::shutdown(&mut g).await.unwrap();
        assert_eq!(
            calls.lock().unwrap().concat(),
            [header, body, b"tail".to_vec()].concat()
        );
    }

    #[tokio::test]
    async fn held_bytes_go_out_when_the_connection_is_dropped_unflushed() {
        // A response that fails after its header and a few body bytes: Pingora drops the
        // connection without a flush; the client still gets what was written.
        let (mut g, calls) = guarded(usize::MAX);
        g.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            .await
            .unwrap();
        g.write_all(b"first bytes").await.unwrap();
        assert!(calls.lock().unwrap().is_empty());
        drop(g);
        assert_eq!(
            calls.lock().unwrap().concat(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst bytes"
        );
    }
}
