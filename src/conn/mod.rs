//! Client connections, before and around Pingora's HTTP/1.1 session: admission under
//! `server.max_connections` (reclaiming idle connections, else refusing with 503 at once), the
//! per-connection time and size limits ([`guard`]), the pacing of a shaped response at its
//! writes with the client watched meanwhile ([`pace`]), and the keep-alive loop that hands each
//! request to the HTTP application with pipelining on.
//!
//! ```text
//!  accept ─► ConnTable::admit ──none idle at the cap──► 503, close (TLS: close)
//!               │ (oldest idle connections reclaimed to make room)
//!               ▼
//!   TLS listener? ─► tls::accept: ClientHello + handshake by accept + header_timeout
//!               ▼
//!   Guarded stream ─► loop { wait for a request's whole header (only the stream held: ~12 KiB;
//!                              408/414/431 answered here)
//!                            HttpServerApp::process_new_http(session) ─► kept alive? ─► Idle }
//! ```
//!
//! The wait is skipped when Pingora may already hold the next request (bytes arrived past the
//! header: a body or pipelined requests); Pingora's own read then waits, under the guard.
//!
//! Every answer given before the HTTP application has a request (the guard's 408/414/431,
//! Pingora's 400 to a header it cannot parse, the 503 at the cap) gets its access-log line
//! here, with `-` for what was never parsed.
//!
//! It replaces the keep-alive loop of Pingora's blanket `ServerApp for HttpServerApp` (which
//! would impose its fixed 60 s keep-alive) with the same steps plus ours. The listeners are
//! plain TCP: a TLS listener's handshake runs here, after admission ([`tls`]), and the guard
//! wraps the TLS stream, so the header limits see decrypted bytes. Each connection finds its
//! `listen` entry by its local address (one service for every listener: one runtime, one
//! connection table, one application). A connection that speaks HTTP/2 (`h2` chosen by ALPN on
//! a TLS listener; the HTTP/2 preface first on a listener with `h2c`, read after admission
//! within `header_timeout` of accept) is served by [`h2::serve`] instead, one slot in the same
//! table.

pub mod guard;
pub mod h2;
pub mod header_scan;
pub mod limits;
pub mod pace;
pub mod table;
pub mod tls;
pub mod trim;

use async_trait::async_trait;
use guard::{GuardSettings, Guarded, Wait};
use header_scan::{HeaderLimits, MAX_FIELDS};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;
use table::{Conn, ConnTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access_log::{AccessLog, Entry as AccessEntry};
use crate::config::ConnectionSettings;
use crate::tls::{ListenEntry, ListenTable};
use pingora_core::protocols::{Ssl, ALPN};
use std::net::IpAddr;
use std::time::Instant;

/// The read buffer of each client connection's socket. Pingora's default is 64 KiB, zeroed on
/// allocation: 35 KiB of RSS per idle connection measured with it. A request header rarely
/// needs more than one 4 KiB read, and larger reads (bodies) bypass the buffer.
pub const READ_BUFFER: usize = 4096;

/// The write buffer under a TLS listener's connections, below OpenSSL. Pingora's default
/// (1,460 bytes) holds a response header's TLS record but not a small body's after it, so each
/// small response went out in two `send`s (measured: 2.0 per 4 KiB hit); with 8 KiB both
/// records of a response up to about 7.5 KiB leave in one, at the flush that ends the
/// response. Larger records (bodies are written 16 KiB at a time) bypass the buffer. nginx's
/// `ssl_buffer_size` (16k) does the same for nginx.
pub const TLS_WRITE_BUFFER: usize = 8192;

/// A listener on `addr` with [`READ_BUFFER`], and [`TLS_WRITE_BUFFER`] when it speaks `tls`.
pub fn listener(addr: &str, tls: bool) -> pingora_core::listeners::ListenerConfig {
    use pingora_core::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
    let write = if tls {
        TLS_WRITE_BUFFER
    } else {
        DEFAULT_L4_WRITE_BUFFER_SIZE
    };
    pingora_core::listeners::ListenerConfig::tcp(addr)
        .l4_buffer(L4BufferSettings::new(READ_BUFFER, write))
}

/// The HTTP version a request came in (the access log's `protocol` field and the request
/// metrics' `protocol` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::H2];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How long a refused connection is kept to deliver its 503 before the close.
const REFUSE_LINGER: Duration = Duration::from_millis(200);

/// Handed to the HTTP application with each request (as Pingora's connection user context), so
/// that it can mark the connection busy once the request header is parsed: see
/// [`request_started`].
pub struct RequestTicket(Arc<Conn>);

/// Call from `ProxyHttp::on_connection_reuse` with its `prev_ctx`: the request has started, so
/// its connection is no longer idle (this matters for a pipelined request Pingora parsed from
/// bytes it already held, which the guard never saw arrive). Returns the connection, for a
/// shaped response's pacing ([`Conn::pace_response`]).
pub fn request_started(ctx: Box<dyn Any + Send + Sync>) -> Option<Arc<Conn>> {
    let ticket = ctx.downcast::<RequestTicket>().ok()?;
    ticket.0.request_parsed();
    Some(ticket.0)
}

/// A listener's HTTP application behind admission control and connection guards.
pub struct Front<A> {
    app: Arc<A>,
    table: Arc<ConnTable>,
    guard: Arc<GuardSettings>,
    body_timeout: Duration,
    /// Where answers given before the application had a request are logged.
    access_log: Option<Arc<AccessLog>>,
    /// The `listen` entries, when some are not plain HTTP/1.1 (TLS, h2c): each connection
    /// finds its own by its local address.
    listeners: Option<Arc<ListenTable>>,
    /// How HTTP/2 connections are served.
    h2: Arc<h2::H2Settings>,
}

impl<A> Front<A> {
    pub fn new(app: A, settings: &ConnectionSettings, max_connections: usize) -> Front<A> {
        Self::with_table(app, settings, ConnTable::new(max_connections))
    }

    /// As [`Front::new`], on a table made beforehand.
    pub fn with_table(app: A, settings: &ConnectionSettings, table: Arc<ConnTable>) -> Front<A> {
        let keepalive =
            (!settings.keepalive_timeout.is_zero()).then_some(settings.keepalive_timeout);
        Front {
            app: Arc::new(app),
            table,
            guard: Arc::new(GuardSettings::new(
                keepalive,
                settings.header_timeout,
                settings.send_timeout,
                HeaderLimits {
                    max_header: settings.max_header_size,
                    max_uri: settings.max_uri_size,
                    max_fields: MAX_FIELDS,
                },
            )),
            body_timeout: settings.body_timeout,
            access_log: None,
            listeners: None,
            h2: Arc::new(h2::H2Settings::new(settings)),
        }
    }

    /// Serve the `listen` entries `listeners` (TLS, h2c); plain HTTP/1.1 without.
    pub fn with_listeners(mut self, listeners: Arc<ListenTable>) -> Front<A> {
        self.listeners = Some(listeners).filter(|l| l.needs_lookup());
        self
    }

    /// Serve an HTTP/2 connection (its TLS handshake done, or its h2c preface seen) until it
    /// ends, its streams with it.
    async fn serve_h2(
        &self,
        stream: Stream,
        conn: &Arc<Conn>,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) where
        A: HttpServerApp + Send + Sync + 'static,
    {
        h2::serve(
            &self.app,
            stream,
            conn,
            &self.table,
            &self.h2,
            accepted,
            shutdown,
        )
        .await;
    }

    /// Log answers given before the application had a request to `log`.
    pub fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Front<A> {
        self.access_log = log;
        self
    }

    /// One access-log line for an answer given before a request was parsed.
    fn log_unparsed(&self, status: u16, client: Option<IpAddr>, since: Instant) {
        let Some(log) = self.access_log.as_ref() else {
            return;
        };
        log.log(&AccessEntry {
            ts_ms: AccessEntry::now_ms(),
            method: "-",
            path: "-",
            status,
            bytes: 0,
            duration_ms: since.elapsed().as_millis() as u64,
            cache: "-",
            upstream: None,
            request_id: "-",
            client,
            protocol: Protocol::Http1,
        });
    }

    /// The connection table, for counters.
    pub fn table(&self) -> Arc<ConnTable> {
        self.table.clone()
    }

    /// The `listen` entry `stream` was accepted by, when any is not plain HTTP/1.1.
    fn listener_of(&self, stream: &Stream) -> Option<&ListenEntry> {
        let listeners = self.listeners.as_ref()?;
        let local = stream
            .get_socket_digest()?
            .local_addr()?
            .as_inet()
            .copied()?;
        listeners.for_local(local)
    }
}

/// Logs, when the connection ends, an answer given before the application had a request.
struct Logged<'a, A> {
    front: &'a Front<A>,
    conn: Arc<Conn>,
    client: Option<IpAddr>,
    since: Instant,
}

impl<A> Drop for Logged<'_, A> {
    fn drop(&mut self) {
        if let Some(status) = self.conn.take_unparsed_answer() {
            self.front.log_unparsed(status, self.client, self.since);
        }
    }
}

/// Answer 503 to a connection over the cap and close it, within a bounded time.
async fn refuse(mut stream: Stream, guard: &GuardSettings) {
    let response = guard.busy_response().clone();
    let _ = tokio::time::timeout(REFUSE_LINGER, async move {
        stream.write_all(&response).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(&mut stream).await?;
        // Read what the client sent so that the close does not reset the answer away.
        let mut sink = [0u8; 2048];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// End a TLS connection with its close_notify, within a bounded time (as Pingora's own close
/// after a response does): OpenSSL drops the session of a connection freed without one from its
/// session cache, and its client could not resume it.
async fn close_tls(stream: &mut Guarded, tls: bool) {
    if tls {
        let _ = tokio::time::timeout(REFUSE_LINGER, AsyncWriteExt::shutdown(stream)).await;
    }
}

/// Wait until a request starts to arrive on an idle (or new) connection, holding only the
/// stream. Its first bytes stay in the stream for Pingora. A shutdown reclaims idle
/// connections through the table ([`Front`]'s `cleanup`), so no shutdown watch is polled here:
/// it would take the watch's lock, shared by every connection, once per request.
async fn wait_for_request(stream: &mut Guarded, shutdown: &ShutdownWatch) -> Wait {
    if *shutdown.borrow() {
        return Wait::Ended;
    }
    std::future::poll_fn(|cx| stream.poll_wait(cx)).await
}

/// The guarded stream back from Pingora (it is always ours).
fn guarded(stream: Stream) -> Option<Box<Guarded>> {
    stream.into_any().downcast::<Guarded>().ok()
}

#[async_trait]
impl<A> ServerApp for Front<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let started = Instant::now();
        // Only wanted for an access-log line.
        let client = self.access_log.as_ref().and_then(|_| {
            stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        });
        let listener = self.listener_of(&stream);
        let tls = listener.and_then(|l| l.tls.as_ref());
        let Some(admission) = self.table.admit() else {
            if tls.is_none() {
                refuse(stream, &self.guard).await;
            }
            self.log_unparsed(503, client, started);
            return None;
        };
        let _logged = Logged {
            front: self,
            conn: admission.conn().clone(),
            client,
            since: started,
        };
        let conn = admission.conn().clone();
        let accepted = self.table.instant_at(conn.since_ms());
        // The handshake and the first request's header, together, by this.
        let header_deadline = accepted + self.guard.header_timeout;
        let stream: Stream = match tls {
            None if listener.is_some_and(|l| l.h2c) => {
                let (stream, sniffed) = h2::read_preface(stream, &conn, header_deadline).await?;
                if sniffed == h2::Sniff::H2 {
                    self.serve_h2(stream, &conn, accepted, shutdown).await;
                    return None;
                }
                stream
            }
            None => stream,
            Some(tls) => {
                let stream = match tls::accept(stream, &tls.current(), &conn, header_deadline).await
                {
                    Ok(s) => s,
                    Err(failed) => {
                        if failed == tls::Failed::TimedOut {
                            // The handshake is part of the first header's time.
                            self.table
                                .stats
                                .header_timeouts
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        return None;
                    }
                };
                if stream.selected_alpn_proto() == Some(ALPN::H2) {
                    self.serve_h2(Box::new(stream), &conn, accepted, shutdown)
                        .await;
                    return None;
                }
                Box::new(stream)
            }
        };
        let mut stream = Box::new(Guarded::new(
            stream,
            conn.clone(),
            self.table.clone(),
            self.guard.clone(),
        ));
        if tls.is_some() {
            // The ClientHello started the first request's arrival (`Phase::Header`).
            stream.set_header_deadline(header_deadline);
        }
        if wait_for_request(&mut stream, shutdown).await != Wait::Request {
            close_tls(&mut stream, tls.is_some()).await;
            return None;
        }
        let mut session = ServerSession::new_http1(stream);
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                // Keep-alive without Pingora's own per-read timeout: the guard times the wait.
                None => session.set_keepalive(self.guard.keepalive_timeout.map(|_| 0)),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            // RFC 9112 §9.3.2: pipelined requests are answered in order, one after another.
            session.set_pipelining_enabled(true);
            session.set_read_timeout(Some(self.body_timeout));
            session.set_connection_user_context(Some(Box::new(RequestTicket(conn.clone()))));
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (stream, next) = reused.consume();
            conn.set_idle(self.table.now_ms());
            // Unless the next request may already be in Pingora's hands (bytes came past the
            // header: a body or a pipelined request), wait for it here, holding only the
            // stream, not Pingora's per-request state (about 14 KiB less per idle connection).
            let mut stream = guarded(stream)?;
            let stream: Stream = if conn.take_overread() {
                // What Pingora holds may be the first part of the next header.
                stream.set_prefix_held(true);
                stream
            } else {
                stream.set_prefix_held(false);
                // Without keep-alive Pingora does not reuse; never wait forever here.
                self.guard.keepalive_timeout?;
                match wait_for_request(&mut stream, shutdown).await {
                    Wait::Request => stream,
                    Wait::TimedOut => {
                        self.table
                            .stats
                            .keepalive_closed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        close_tls(&mut stream, tls.is_some()).await;
                        return None;
                    }
                    Wait::Ended => {
                        close_tls(&mut stream, tls.is_some()).await;
                        return None;
                    }
                }
            };
            session = ServerSession::new_http1(stream);
            settings = next;
        }
    }

    async fn cleanup(&self) {
        // The listeners are closed: idle connections end now, busy ones after their request.
        self.table.close_idle();
        self.app.http_cleanup().await
    }
}
