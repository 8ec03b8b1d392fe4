//! HTTP/2 toward clients: one connection's streams, each handed to the HTTP application as its
//! own session, under the same protections as an HTTP/1.1 connection.
//!
//! ```text
//!  admitted stream (h2c preface seen, or TLS with ALPN h2)
//!     ─► handshake (preface + SETTINGS), within header_timeout of accept
//!     ─► loop { accept a stream ─► spawned, tracked: process_new_http(ServerSession::new_http2)
//!               a stream task ends ─► completed or abandoned: the rapid-reset accounting
//!               no stream for keepalive_timeout (header_timeout before the first) ─► GOAWAY
//!               reclaimed by the ConnTable at the cap ─► GOAWAY
//!               shutdown ─► graceful GOAWAY, streams finish }
//!     ─► the connection ends: every stream task still running is aborted
//! ```
//!
//! Accounting: the connection is one slot of the [`ConnTable`](super::table::ConnTable), `Busy`
//! while any stream task runs and `Idle` otherwise, so idle HTTP/2 connections are reclaimed at
//! the cap like idle HTTP/1.1 ones.
//!
//! Limits, all per connection (memory bounded by configuration):
//! - `server.http2_max_streams` concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS; h2 refuses
//!   streams past it with REFUSED_STREAM);
//! - a decoded header list of at most `server.max_header_size` per stream (h2 answers a larger
//!   one 431 itself, and bounds CONTINUATION frames: a flood of them gets GOAWAY
//!   ENHANCE_YOUR_CALM); a `:path` over `server.max_uri_size` is answered 414 by the proxy's
//!   request checks, as for HTTP/1.1;
//! - receive windows of [`STREAM_WINDOW`] per stream and [`CONNECTION_WINDOW`] per connection,
//!   and a send buffer of [`SEND_BUFFER`] per stream: a connection holds at most
//!   `http2_max_streams × (STREAM_WINDOW + SEND_BUFFER)` of body bytes, and never more than
//!   `CONNECTION_WINDOW` of request body in all;
//! - rapid reset (CVE-2023-44487) and abandoned streams: see [`Calm`].
//!
//! Never does: read or write a stream's bytes itself (h2 and the application do), or keep a
//! stream's task alive past its connection.

use super::table::{Conn, ConnTable};
use h2::Reason;
use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::v2::server::{self as v2, H2Accept, H2Options, HttpSession};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Digest, Stream};
use pingora_core::server::ShutdownWatch;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

use super::pace::{BodyPacer, PacedWrites};
use crate::config::ConnectionSettings;

/// The initial receive window of each stream: a stream's request body held unread is at most
/// this (Pingora reads request bodies in pieces of at most 64 KiB too).
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// The connection's receive window: all its streams' unread request bodies together.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The most response bytes h2 buffers per stream before the writer waits for the client.
pub const SEND_BUFFER: usize = 64 * 1024;
/// Streams the client resets before we accept them, per connection, before GOAWAY
/// ENHANCE_YOUR_CALM (h2's own rapid-reset defence; its default is 20).
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams we reset for the client's protocol errors, per connection, before GOAWAY
/// ENHANCE_YOUR_CALM (h2's own; its default is 1024).
pub const MAX_LOCAL_ERROR_RESETS: usize = 128;
/// Requests refused before they reached the application (a forbidden byte in `:path`, a bad
/// authority, conflicting Content-Length), per connection, before the connection is closed:
/// Pingora's own per-connection budget.
pub const MAX_MALFORMED_STREAMS: usize = 32;
/// How long a connection being closed (GOAWAY sent) is driven to flush it, at most.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What an HTTP/2 connection is served with (`server.*` keys; shared by a service's
/// connections).
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// `server.http2_max_streams`.
    pub max_streams: u32,
    /// `server.max_header_size`: the decoded header list of one stream.
    pub max_header_list: u32,
    /// The preface and the first request must arrive within this of accept.
    pub header_timeout: Duration,
    /// An idle connection (no stream) is closed after this; `None`: at once.
    pub keepalive_timeout: Option<Duration>,
    /// A response write that makes no progress fails after this.
    pub send_timeout: Duration,
}

impl H2Settings {
    pub fn new(c: &ConnectionSettings) -> H2Settings {
        H2Settings {
            max_streams: c.http2_max_streams.max(1),
            max_header_list: u32::try_from(c.max_header_size).unwrap_or(u32::MAX),
            header_timeout: c.header_timeout,
            keepalive_timeout: (!c.keepalive_timeout.is_zero()).then_some(c.keepalive_timeout),
            send_timeout: c.send_timeout,
        }
    }

    /// The h2 options every connection is served with.
    pub fn options(&self) -> H2Options {
        let mut o = v2::default_h2_options();
        o.max_concurrent_streams(self.max_streams)
            .max_header_list_size(self.max_header_list)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(SEND_BUFFER)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            // Streams we reset, remembered to ignore their late frames: bounded too.
            .max_concurrent_reset_streams(self.max_streams as usize);
        o
    }

    /// In-flight stream tasks past which the client must have reset streams it did not wait
    /// for (h2 counts a reset stream out of `http2_max_streams` at once, while its task may
    /// still be working): [`Calm`]'s hard bound.
    fn max_in_flight(&self) -> usize {
        2 * self.max_streams as usize
    }
}

/// The rapid-reset accounting of one connection (CVE-2023-44487), and its thresholds.
///
/// A stream is *completed* when its whole response went out, *abandoned* when the client
/// reset it or left before that. A client that abandons streams faster than it completes them
/// gets GOAWAY ENHANCE_YOUR_CALM and the connection is closed when either holds:
/// - abandoned > completed + [`Calm::ALLOWANCE`] (h2o's reset budget and Envoy's premature
///   reset ratio in one rule: a browser cancelling a page's worth of requests stays well
///   under it, a client looping open+RST crosses it after ~100 streams);
/// - more stream tasks in flight than 2 × `http2_max_streams` (nginx closes a connection
///   opening more than twice its concurrency in one read; Go queues handlers past its
///   concurrency): h2 counts a reset stream out of the concurrency limit at once, so only
///   resets can get there, and the work a client can start is bounded by it.
///
/// Resets of streams not yet accepted are h2's own (`max_pending_accept_reset_streams`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Calm {
    pub completed: u64,
    pub abandoned: u64,
}

impl Calm {
    /// Abandoned streams allowed beyond the completed ones.
    pub const ALLOWANCE: u64 = 100;

    /// A stream task ended.
    pub fn ended(&mut self, completed: bool) {
        if completed {
            self.completed += 1;
        } else {
            self.abandoned += 1;
        }
    }

    /// Whether the client abandons streams faster than it completes them.
    pub fn exceeded(&self) -> bool {
        self.abandoned > self.completed + Self::ALLOWANCE
    }
}

/// One HTTP/2 stream as the application sees it: its connection, how it ended and, when it is
/// shaped, its pacer. Carried in the request header's extensions
/// ([`StreamTicket::of`]); the proxy marks the response complete ([`StreamTicket::completed`]).
#[derive(Clone)]
pub struct StreamTicket(Arc<StreamState>);

struct StreamState {
    conn: Arc<Conn>,
    completed: AtomicBool,
    /// This stream's shaped download: h2 streams share the socket, so each is paced at its own
    /// body writes rather than at the socket's ([`super::pace`]).
    paced: Mutex<Option<PacedWrites>>,
}

impl std::fmt::Debug for StreamTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTicket")
            .field("completed", &self.0.completed.load(Ordering::Relaxed))
            .finish()
    }
}

impl StreamTicket {
    fn new(conn: Arc<Conn>) -> StreamTicket {
        StreamTicket(Arc::new(StreamState {
            conn,
            completed: AtomicBool::new(false),
            paced: Mutex::new(None),
        }))
    }

    /// The ticket of an HTTP/2 request, if it is one.
    pub fn of(req: &pingora_http::RequestHeader) -> Option<&StreamTicket> {
        req.extensions.get::<StreamTicket>()
    }

    /// The client connection the stream belongs to.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.0.conn
    }

    /// The stream's response went out whole (or was answered by us, the client still there).
    pub fn completed(&self) {
        self.0.completed.store(true, Ordering::Relaxed);
    }

    fn is_completed(&self) -> bool {
        self.0.completed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PacedWrites>> {
        // Only the stream's own task takes it.
        self.0.paced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pace this stream's body writes with `pacer` until [`StreamTicket::end_pacing`].
    pub fn pace_response(&self, pacer: Box<dyn BodyPacer>) {
        *self.lock() = Some(PacedWrites::new(pacer));
    }

    /// Whether the stream's response is paced.
    pub fn is_paced(&self) -> bool {
        self.lock().is_some()
    }

    /// Account `want` bytes about to be written: `None` when not paced, else how many may go
    /// (at most [`super::pace::MAX_RESERVATION`]) once the returned wait has passed.
    pub fn reserve(&self, want: usize) -> Option<(usize, Duration)> {
        self.lock().as_mut().map(|p| p.reserve(want))
    }

    /// `n` bytes allowed by [`StreamTicket::reserve`] were written.
    pub fn written(&self, n: usize) {
        if let Some(p) = self.lock().as_mut() {
            p.written(n);
        }
    }

    /// The bytes reserved will not be written.
    pub fn refund_reserved(&self) {
        if let Some(p) = self.lock().as_mut() {
            p.refund_reserved();
        }
    }

    /// The response ends: its pacer (the shaped download) is dropped, what it reserved given
    /// back.
    pub fn end_pacing(&self) {
        let ended = self.lock().take();
        drop(ended);
    }
}

/// Why a connection's accept loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it, or it failed.
    Closed,
    /// The handshake did not complete within `header_timeout`.
    HandshakeTimeout,
    /// No stream for the idle timeout: GOAWAY.
    Idle,
    /// Reclaimed at the cap: GOAWAY.
    Reclaimed,
    /// Abandoned streams or too many malformed ones: GOAWAY ENHANCE_YOUR_CALM.
    Calm,
}

/// Serve HTTP/2 on `stream` (its preface, or ALPN `h2`, already established) until the
/// connection ends; every stream task is ended with it. `accepted`: when the connection was
/// accepted (the handshake and the first request are timed from it).
pub async fn serve<A>(
    app: &Arc<A>,
    stream: Stream,
    conn: &Arc<Conn>,
    table: &ConnTable,
    settings: &H2Settings,
    accepted: Instant,
    shutdown: &ShutdownWatch,
) -> Ended
where
    A: HttpServerApp + Send + Sync + 'static,
{
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let first_deadline = accepted + settings.header_timeout;
    let handshake = v2::handshake(stream, Some(settings.options()));
    let mut h2 = match tokio::time::timeout_at(first_deadline.into(), handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::debug!("h2 handshake failed: {e}");
            return Ended::Closed;
        }
        Err(_) => {
            table.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
            return Ended::HandshakeTimeout;
        }
    };
    let mut shutdown = shutdown.clone();
    let mut shutting_down = *shutdown.borrow();
    if shutting_down {
        h2.graceful_shutdown();
    }
    let mut streams: JoinSet<bool> = JoinSet::new();
    let mut calm = Calm::default();
    let mut malformed = 0usize;
    // When the connection may be closed for having no stream.
    let mut idle_deadline = Some(first_deadline);
    let ended = loop {
        let idle_sleep = async {
            match idle_deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            changed = shutdown.changed(), if !shutting_down => match changed {
                // No sender any more: nothing will ever announce a shutdown.
                Err(_) => shutting_down = true,
                Ok(()) => {
                    if *shutdown.borrow_and_update() {
                        shutting_down = true;
                        h2.graceful_shutdown();
                    }
                }
            },
            _ = conn.reclaimed() => break Ended::Reclaimed,
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                calm.ended(matches!(done, Ok(true)));
                if calm.exceeded() {
                    log::info!(
                        "client {}: {} HTTP/2 streams abandoned, {} completed: GOAWAY ENHANCE_YOUR_CALM",
                        peer(&digest), calm.abandoned, calm.completed
                    );
                    break Ended::Calm;
                }
                if streams.is_empty() {
                    conn.set_idle(table.now_ms());
                    idle_deadline = Some(match settings.keepalive_timeout {
                        Some(k) => Instant::now() + k,
                        None => Instant::now(),
                    });
                }
            }
            _ = idle_sleep => break Ended::Idle,
            accepted = HttpSession::from_h2_conn(&mut h2, digest.clone()) => match accepted {
                Err(e) => {
                    log::debug!("client {}: h2 connection ended: {e}", peer(&digest));
                    break Ended::Closed;
                }
                Ok(None) => break Ended::Closed,
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_STREAMS {
                        break Ended::Calm;
                    }
                }
                Ok(Some(H2Accept::Session(mut session))) => {
                    if streams.len() >= settings.max_in_flight() {
                        log::info!(
                            "client {}: {} HTTP/2 streams in flight over {} allowed (streams reset and reopened): GOAWAY ENHANCE_YOUR_CALM",
                            peer(&digest), streams.len() + 1, settings.max_streams
                        );
                        session.shutdown_with_reason(Reason::REFUSED_STREAM);
                        break Ended::Calm;
                    }
                    if streams.is_empty() && !conn.begin_request() {
                        // Reclaimed just now: the stream is refused, the client may retry it.
                        session.shutdown_with_reason(Reason::REFUSED_STREAM);
                        break Ended::Reclaimed;
                    }
                    idle_deadline = None;
                    let ticket = StreamTicket::new(conn.clone());
                    session.req_header_mut().extensions_mut().insert(ticket.clone());
                    session.set_write_timeout(Some(settings.send_timeout));
                    let app = app.clone();
                    let shutdown = shutdown.clone();
                    streams.spawn(async move {
                        app.process_new_http(ServerSession::new_http2(session), &shutdown)
                            .await;
                        ticket.end_pacing();
                        ticket.is_completed()
                    });
                }
            },
        }
    };
    log::debug!(
        "client {}: h2 connection ends ({ended:?}); {} streams completed, {} abandoned, {} in flight",
        peer(&digest),
        calm.completed,
        calm.abandoned,
        streams.len()
    );
    let reason = match ended {
        Ended::Calm => Reason::ENHANCE_YOUR_CALM,
        _ => Reason::NO_ERROR,
    };
    if ended != Ended::Closed {
        // GOAWAY, then the connection is driven (for at most CLOSE_LINGER) until it has
        // flushed it: streams still in flight end with it.
        streams.abort_all();
        h2.abrupt_shutdown(reason);
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Ok(Some(_)) = HttpSession::from_h2_conn(&mut h2, digest.clone()).await {}
        })
        .await;
    }
    // Dropping the set aborts whatever still runs: a connection's streams end with it.
    drop(streams);
    ended
}

fn peer(digest: &Digest) -> String {
    digest
        .socket_digest
        .as_ref()
        .and_then(|d| d.peer_addr().map(|a| a.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection on an h2c listener say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// The whole HTTP/2 preface.
    H2,
    /// Something else: HTTP/1.x.
    Http1,
    /// Not enough bytes yet to tell.
    More,
}

/// Whether `first` (the connection's first bytes) begin the HTTP/2 preface.
pub fn sniff(first: &[u8]) -> Sniff {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Sniff::Http1
    } else if n == PREFACE.len() {
        Sniff::H2
    } else {
        Sniff::More
    }
}

/// Read a connection's first bytes until they tell HTTP/2 from HTTP/1.x, then put them back
/// for whoever reads next. `None`: the client left, the table reclaimed the connection, or
/// `deadline` passed first. A stream that is not plain TCP is not sniffed (on TLS, ALPN
/// chooses): HTTP/1.x.
pub async fn read_preface(
    stream: Stream,
    conn: &Conn,
    deadline: Instant,
) -> Option<(Stream, Sniff)> {
    use pingora_core::protocols::l4::stream::Stream as L4;
    use tokio::io::AsyncReadExt;
    if !stream.as_any().is::<L4>() {
        return Some((stream, Sniff::Http1));
    }
    let mut l4 = stream.into_any().downcast::<L4>().ok()?;
    let mut first = Vec::with_capacity(PREFACE.len());
    let verdict = loop {
        match sniff(&first) {
            Sniff::More => {}
            v => break v,
        }
        let mut buf = [0u8; PREFACE.len()];
        let room = PREFACE.len() - first.len();
        let read = tokio::select! {
            r = l4.read(&mut buf[..room]) => r,
            _ = conn.reclaimed() => return None,
            _ = tokio::time::sleep_until(deadline.into()) => return None,
        };
        match read {
            Ok(0) | Err(_) => return None,
            Ok(n) => first.extend_from_slice(&buf[..n]),
        }
    };
    l4.rewind(&first);
    let stream: Stream = l4;
    Some((stream, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_told_from_http1_as_soon_as_a_byte_differs() {
        assert_eq!(sniff(b""), Sniff::More);
        assert_eq!(sniff(b"PRI * HTTP/2"), Sniff::More);
        assert_eq!(sniff(PREFACE), Sniff::H2);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"P"), Sniff::More);
        assert_eq!(sniff(b"PUT"), Sniff::Http1);
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniff::Http1);
    }

    #[test]
    fn abandoning_more_streams_than_completing_them_trips_past_the_allowance() {
        let mut c = Calm::default();
        for _ in 0..Calm::ALLOWANCE {
            c.ended(false);
        }
        assert!(!c.exceeded(), "a burst of cancels is allowed");
        c.ended(false);
        assert!(c.exceeded());
        // A client completing as many as it abandons stays under it.
        let mut c = Calm::default();
        for _ in 0..10_000 {
            c.ended(true);
            c.ended(false);
        }
        assert!(!c.exceeded());
    }

    #[test]
    fn options_follow_the_settings() {
        let s = H2Settings::new(&ConnectionSettings {
            http2_max_streams: 7,
            ..Default::default()
        });
        assert_eq!(s.max_streams, 7);
        assert_eq!(s.max_header_list, 64 << 10);
        assert_eq!(s.max_in_flight(), 14);
        let s = H2Settings::new(&ConnectionSettings {
            keepalive_timeout: Duration::ZERO,
            http2_max_streams: 0,
            ..Default::default()
        });
        assert_eq!(s.max_streams, 1, "never zero");
        assert_eq!(s.keepalive_timeout, None);
    }
}
