//! The chunk cache's own origin client: one GET (HTTP/1.1, or HTTP/2 to a group with `http2`) (usually a chunk-aligned `Range`) to a
//! server of an upstream group, over Pingora's pooled connector, with the group's per-try
//! timeouts, retries (backoff, budget, deadline), circuit breakers and minimum body rate.
//!
//! Blame follows `origin::outcome`: connection-level failures are charged to the server at
//! once and retried; a 502/503/504 is retried only on another server that has not seen the
//! request (never on the same one: with none left it is the answer; nor for a URL that just
//! failed on every server, `origin::failing`) and charged only when a peer then answers the
//! same request; 500 and every other answer are the application's, returned as they are. A
//! request's retries are given back to the retry budget when it is answered in the end, or
//! when their try could not connect (`origin::budget`).

use super::budget::RequestRetries;
use super::outcome::{classify_type, status_verdict, FailureClass, StatusEvidence, StatusVerdict};
use super::pool::{Selected, UpstreamPool};
use crate::metrics::OriginOutcome;
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What to ask an origin for.
#[derive(Debug, Clone)]
pub struct OriginRequest {
    pub method: http::Method,
    /// Path and query as the client sent them.
    pub path_and_query: String,
    /// The client's `Host`, passed through.
    pub host: String,
    /// Inclusive byte range to ask for, if any.
    pub range: Option<(u64, u64)>,
    /// Extra request headers (validators: `If-Range`, `If-None-Match`, ...).
    pub headers: Vec<(&'static str, String)>,
    /// The client's end-to-end fields, sent first (the fields above and the fetch's own
    /// `Host`, `Range`, `Via` and `X-Request-Id` replace any of the same name).
    pub forward: std::sync::Arc<http::HeaderMap>,
    pub request_id: String,
    /// What consistent hashing hashes (the cache key).
    pub hash_key: String,
    /// Set while this fetch waits on a peer of the cluster, when it holds its object's
    /// discovery lock (`ChunkCache::lock_object_for_peer`).
    pub asking_peer: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    pub message: String,
    /// The last server tried, if any.
    pub server: Option<SocketAddr>,
    /// An HTTP status that made the attempt fail (e.g. 503), if any.
    pub status: Option<u16>,
    pub timed_out: bool,
    /// What the failure was charged as, when it was the server's own.
    pub class: Option<FailureClass>,
    /// A TLS failure (a certificate that did not verify, a failed handshake): logged once per
    /// server and cause by the pool ([`super::peer::TlsFailureLog`]), not per request.
    pub tls: Option<super::peer::TlsCause>,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.server {
            Some(s) => write!(f, "{} (server {s})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl FetchError {
    /// Nothing was tried (no server to try, or `server` not admitted): nobody is charged.
    fn untried(message: String, server: Option<SocketAddr>) -> FetchError {
        FetchError {
            message,
            server,
            status: None,
            timed_out: false,
            class: None,
            tls: None,
        }
    }

    /// The fetch's deadline passed while `server` was being tried.
    pub fn deadline(server: SocketAddr) -> FetchError {
        FetchError {
            message: "request deadline exceeded".into(),
            server: Some(server),
            status: None,
            timed_out: true,
            class: Some(FailureClass::ReadTimeout),
            tls: None,
        }
    }

    /// The status a client should see when this was the final failure.
    pub fn client_status(&self) -> u16 {
        if self.timed_out {
            504
        } else {
            match self.status {
                Some(503) => 503,
                Some(504) => 504,
                _ => 502,
            }
        }
    }
}

/// An origin response whose header has been read; the body is read piece by piece. It holds
/// the server's breaker admission: a body read to its end reports success, a body error reports
/// failure.
pub struct OriginResponse {
    session: Option<HttpSession>,
    peer: HttpPeer,
    connector: Arc<Connector>,
    pub header: ResponseHeader,
    pub server: SocketAddr,
    selected: Option<Selected>,
    request_id: String,
    rate: RateCheck,
    /// Counts the body bytes as they arrive (`edgeslice_origin_response_bytes_total`).
    body_bytes: Option<prometheus::IntCounter>,
}

/// The origin body's throughput, measured over the time spent *waiting on the origin* only (not
/// the time the consumer took between reads, so a slow client never makes the origin look slow).
/// Judged once per `window` of waiting: below `min_rate` the transfer is abandoned.
#[derive(Debug, Clone, Copy)]
pub struct RateCheck {
    /// Bytes per second; 0 = off.
    pub min_rate: u64,
    pub window: Duration,
    waited: Duration,
    bytes: u64,
}

impl RateCheck {
    pub fn new(min_rate: u64, window: Duration) -> RateCheck {
        RateCheck {
            min_rate,
            window,
            waited: Duration::ZERO,
            bytes: 0,
        }
    }

    /// Account `bytes` that took `waited` to arrive. `Err(observed rate)` when a full window of
    /// waiting brought less than `min_rate`; the window restarts after each judgement.
    pub fn record(&mut self, bytes: u64, waited: Duration) -> Result<(), u64> {
        if self.min_rate == 0 || self.window.is_zero() {
            return Ok(());
        }
        self.waited += waited;
        self.bytes = self.bytes.saturating_add(bytes);
        if self.waited < self.window {
            return Ok(());
        }
        let secs = self.waited.as_secs_f64();
        let observed = (self.bytes as f64 / secs) as u64;
        self.waited = Duration::ZERO;
        self.bytes = 0;
        if observed < self.min_rate {
            Err(observed)
        } else {
            Ok(())
        }
    }
}

impl OriginResponse {
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next body piece; `Ok(None)` at the end of the body. A read error, a timeout, or a
    /// body slower than the group's `min_rate` is charged to the server and ends the response.
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        let Some(s) = self.session.as_mut() else {
            return Ok(None);
        };
        let started = Instant::now();
        let read = s.read_response_body().await;
        let waited = started.elapsed();
        let (class, message) = match read {
            Ok(piece) => {
                let n = piece.as_ref().map_or(0, |p| p.len() as u64);
                if let Some(c) = &self.body_bytes {
                    c.inc_by(n);
                }
                match self.rate.record(n, waited) {
                    Ok(()) => return Ok(piece),
                    Err(observed) => (
                        FailureClass::TooSlow,
                        format!(
                            "origin body at {observed} B/s, below min_rate {} B/s",
                            self.rate.min_rate
                        ),
                    ),
                }
            }
            Err(e) => (
                // The request was sent whole before the response was read.
                classify_type(e.etype(), true).unwrap_or(FailureClass::Reset),
                format!("reading body: {e}"),
            ),
        };
        if let Some(sel) = self.selected.take() {
            sel.failed(class, &self.request_id);
        }
        // The connection is unusable now (a partial body, or one we give up on).
        if let Some(mut s) = self.session.take() {
            s.shutdown().await;
        }
        Err(FetchError {
            message,
            server: Some(self.server),
            status: None,
            timed_out: class == FailureClass::ReadTimeout,
            class: Some(class),
            tls: None,
        })
    }

    /// Done with this response: report success, and return the connection to the pool when
    /// the body was read to its end (otherwise close it).
    pub async fn finish(mut self) {
        if let Some(sel) = self.selected.take() {
            sel.succeeded(&self.request_id);
        }
        if let Some(mut s) = self.session.take() {
            if s.response_done() {
                self.connector
                    .release_http_session(s, &self.peer, None)
                    .await;
            } else {
                s.shutdown().await;
            }
        }
    }

    /// Set aside an answer that will not be used (a gateway answer superseded by a retry): close
    /// its connection without reading the body.
    async fn discard(mut self) {
        if let Some(sel) = self.selected.take() {
            sel.release();
        }
        if let Some(mut s) = self.session.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for OriginResponse {
    /// A response set aside without a body error (not cacheable, not needed) still showed a
    /// working server.
    fn drop(&mut self) {
        if let Some(sel) = self.selected.take() {
            sel.succeeded(&self.request_id);
        }
    }
}

/// Whether a try that got this status is retried on another server: 502, 503 and 504 only.
pub fn is_retry_status(status: u16) -> bool {
    status_verdict(status) == StatusVerdict::Gateway
}

/// Send `req` to the group within the group's `deadline` from now. See [`open_until`].
pub async fn open(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    req: &OriginRequest,
    avoid: &[SocketAddr],
) -> Result<OriginResponse, FetchError> {
    let until = Instant::now() + pool.settings.deadline;
    open_until(connector, pool, req, avoid, until).await
}

/// Send `req` to the group: pick a server (healthy, breaker closed, not yet tried when another
/// is available, and preferably not one in `avoid`; panic routing when every server is
/// ejected). `avoid` (the servers a resumed transfer broke on) is a preference, never a ban:
/// those servers come after the others, and remain candidates (a 503 from the only other
/// server is not final while an avoided one has not been asked), and on the server's own failures (`origin::outcome`) retry after an exponential
/// backoff with full jitter, within the group's attempts and retry budget. A failure that is
/// not the server's (a request we could not even build) is neither charged nor retried. No try
/// or backoff starts after `until`, and a try still waiting for its answer at `until` is
/// abandoned.
///
/// A 502/503/504 answer is retried only on a *different* server: one of the group not yet
/// tried for this request (nor in `avoid`) and in rotation (as nginx's `proxy_next_upstream
/// http_50x`, never the same server twice). When none is left, that answer is final: a server
/// that answered is never asked the same request again. A URL that failed on every server
/// moments ago gets one try (`origin::failing`). Retries are given back to the budget when the
/// request is answered in the end, or when their try could not connect (`origin::budget`).
///
/// `Ok` is any answer with a status, including the last 502/503/504 when no other server was
/// left or the tries ran out, so that the caller can pass the origin's own answer on; `Err`
/// means no server answered at all.
pub async fn open_until(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    req: &OriginRequest,
    avoid: &[SocketAddr],
    until: Instant,
) -> Result<OriginResponse, FetchError> {
    pool.budget.record_request();
    let url = pool.failing_urls.mark(req.hash_key.as_bytes());
    let mut tried: Vec<SocketAddr> = Vec::new();
    // Tried or avoided: the servers picked last.
    let mut shunned: Vec<SocketAddr> = avoid.to_vec();
    let mut evidence = StatusEvidence::default();
    let mut gateway_answer: Option<OriginResponse> = None;
    let mut last = FetchError::untried("no server answered".into(), None);
    let mut retries = RequestRetries::default();
    for attempt in 0..pool.settings.retry.attempts {
        if attempt > 0 {
            // A URL that just failed on every server gets one try (unless this request is the
            // one finding out).
            if !evidence.failed_everywhere() && pool.failing_urls.is_failing(url) {
                pool.stats
                    .retries_skipped_failing_url
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
            // The gateway answer in hand is final when no server that has not seen this
            // request may take it.
            if gateway_answer.is_some() && !pool.may_pick_untried(&tried) {
                break;
            }
            let Some(t) = pool.budget.try_retry() else {
                pool.stats
                    .retries_over_budget
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "rid={} retry budget of {} spent; not retrying",
                    req.request_id,
                    pool.name()
                );
                break;
            };
            retries.admitted(t);
            let delay = pool.backoff.delay(attempt, &mut rand::rng());
            if Instant::now() + delay >= until {
                break;
            }
            tokio::time::sleep(delay).await;
        }
        if Instant::now() >= until {
            break;
        }
        let key = req.hash_key.as_bytes();
        let sel = if gateway_answer.is_some() {
            // After a gateway answer, only a server that has not seen this request (one
            // avoided last).
            match pool
                .pick_untried(key, &shunned)
                .or_else(|| pool.pick_untried(key, &tried))
            {
                Some(sel) => sel,
                None => break,
            }
        } else {
            let picked = if avoid.is_empty() {
                pool.pick(key, &tried)
            } else {
                pool.pick_untried(key, &shunned)
                    .or_else(|| pool.pick_untried(key, &tried))
                    .or_else(|| pool.pick(key, &shunned))
            };
            match picked {
                Some(sel) => sel,
                // No server at all (its names do not resolve): nothing to try or retry.
                None => {
                    last = FetchError::no_server(pool);
                    break;
                }
            }
        };
        retries.start_try();
        let addr = sel.addr;
        if attempt > 0 {
            pool.count_retry();
            log::warn!(
                "rid={} retry {attempt} of {} on {addr}: {last}",
                req.request_id,
                req.path_and_query
            );
        }
        tried.push(addr);
        shunned.push(addr);
        let peer = sel.peer.clone();
        let tried = try_until(connector, pool, addr, peer, req, until).await;
        match tried {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                if status_verdict(status) == StatusVerdict::Answered {
                    // Failover, not a storm: the request's retries cost the budget nothing.
                    let n = retries.answered(&pool.budget);
                    pool.stats
                        .retries_given_back
                        .fetch_add(n, Ordering::Relaxed);
                    evidence.answered_by(addr, &req.request_id);
                    pool.failing_urls.answered(url);
                    resp.selected = Some(sel);
                    if let Some(old) = gateway_answer.take() {
                        old.discard().await;
                    }
                    return Ok(resp);
                }
                // 502/503/504: charged only if a peer answers this request (see outcome.rs).
                evidence.hold(sel);
                last = FetchError {
                    message: format!("origin answered {status}"),
                    server: Some(addr),
                    status: Some(status),
                    timed_out: false,
                    class: None,
                    tls: None,
                };
                if let Some(old) = gateway_answer.replace(resp) {
                    old.discard().await;
                }
                if evidence.failed_everywhere() {
                    // Two servers failed this URL: the next requests for it get one try for a
                    // while (this one goes on, should a third server answer it).
                    pool.failing_urls.failed_everywhere(url);
                }
            }
            Ok(Err(e)) => {
                if e.tls.is_none() {
                    log::warn!("rid={} origin {addr} failed: {e}", req.request_id);
                }
                let Some(class) = e.class else {
                    // Not the server's failure (ours): nothing to charge, nothing to retry.
                    sel.release();
                    last = e;
                    break;
                };
                if class.is_down() {
                    let n = retries.not_connected(&pool.budget);
                    pool.stats
                        .retries_given_back
                        .fetch_add(n, Ordering::Relaxed);
                }
                sel.failed(class, &req.request_id);
                last = e;
            }
            Err(_) => {
                sel.failed(FailureClass::ReadTimeout, &req.request_id);
                last = FetchError::deadline(addr);
                break;
            }
        }
    }
    let n = retries.finish(&pool.budget);
    pool.stats
        .retries_given_back
        .fetch_add(n, Ordering::Relaxed);
    if evidence.held().next().is_some() {
        pool.stats.gateway_uncharged.fetch_add(1, Ordering::Relaxed);
    }
    drop(evidence);
    match gateway_answer {
        Some(resp) => Ok(resp),
        None => Err(last),
    }
}

/// One try of `req` on the server at `addr` of `pool`, chosen by the caller (a peer the
/// cluster's ring chose): not tried when its breaker does not admit it; a failure is charged
/// to it; any answer is returned as it is (no retry: the caller walks on to its next choice).
pub async fn open_on(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    addr: SocketAddr,
    req: &OriginRequest,
    until: Instant,
) -> Result<OriginResponse, FetchError> {
    let Some(sel) = pool.pick_server(addr) else {
        return Err(FetchError::untried(
            format!("{} {addr} is ejected or gone", pool.name()),
            Some(addr),
        ));
    };
    let tried = try_until(connector, pool, addr, sel.peer.clone(), req, until).await;
    match tried {
        Ok(Ok(mut resp)) => {
            resp.selected = Some(sel);
            Ok(resp)
        }
        Ok(Err(e)) => {
            match e.class {
                Some(class) => sel.failed(class, &req.request_id),
                None => sel.release(),
            }
            Err(e)
        }
        Err(_) => {
            sel.failed(FailureClass::ReadTimeout, &req.request_id);
            Err(FetchError::deadline(addr))
        }
    }
}

/// Why a request to `pool` was not even tried: the group has no server now.
pub fn no_server(pool: &UpstreamPool) -> String {
    format!(
        "{NO_SERVER}: upstream {} (its names do not resolve; see the log)",
        pool.name()
    )
}

const NO_SERVER: &str = "no server to try";

impl FetchError {
    /// The group had no server to try: nothing was sent, nobody is charged.
    pub fn no_server(pool: &UpstreamPool) -> FetchError {
        FetchError::untried(no_server(pool), None)
    }

    /// Whether this is [`FetchError::no_server`]: logged once by the pool when its names
    /// stopped resolving, so not again per request.
    pub fn is_no_server(&self) -> bool {
        self.server.is_none() && self.message.starts_with(NO_SERVER)
    }
}

/// Interim (1xx) answers skipped before a final one; more is a broken server.
const MAX_INTERIM_RESPONSES: u32 = 16;

/// [`try_server`] within `until`, its outcome counted for `addr` (a deadline passed counts as
/// a read timeout); `Err` when the deadline passed.
async fn try_until(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    addr: SocketAddr,
    peer: pingora_core::upstreams::peer::HttpPeer,
    req: &OriginRequest,
    until: Instant,
) -> Result<Result<OriginResponse, FetchError>, tokio::time::error::Elapsed> {
    let tried = tokio::time::timeout_at(until, try_server(connector, pool, addr, peer, req)).await;
    let outcome = match &tried {
        Ok(Ok(resp)) => Some(OriginOutcome::Answered(resp.status())),
        Ok(Err(e)) => e.class.map(OriginOutcome::Failed),
        Err(_) => Some(OriginOutcome::Failed(FailureClass::ReadTimeout)),
    };
    if let Some(o) = outcome {
        pool.count_request(addr, o);
    }
    tried
}

async fn try_server(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    addr: SocketAddr,
    peer: pingora_core::upstreams::peer::HttpPeer,
    req: &OriginRequest,
) -> Result<OriginResponse, FetchError> {
    let fail = |message: String, class: FailureClass| FetchError {
        message,
        server: Some(addr),
        status: None,
        timed_out: matches!(
            class,
            FailureClass::ConnectTimeout | FailureClass::ReadTimeout
        ),
        class: Some(class),
        tls: None,
    };
    let classify =
        |e: &pingora_error::Error| classify_type(e.etype(), true).unwrap_or(FailureClass::Connect);
    let (mut session, _reused) = match connector.get_http_session(&peer).await {
        Ok(s) => s,
        Err(e) => {
            let mut err = fail(format!("connect: {e}"), classify(&e));
            err.tls = pool.tls_failed(addr, &e, &req.request_id);
            return Err(err);
        }
    };
    pool.tls_failures.recovered(addr);
    session.set_read_timeout(Some(pool.settings.read_timeout));
    // A request we cannot even build is our problem, not the server's: no class.
    let ours = |message: String| FetchError {
        message,
        server: Some(addr),
        status: None,
        timed_out: false,
        class: None,
        tls: None,
    };
    let mut head = RequestHeader::build(
        req.method.clone(),
        req.path_and_query.as_bytes(),
        Some(8 + req.forward.len()),
    )
    .map_err(|e| ours(format!("building request: {e}")))?;
    for (n, v) in req.forward.iter() {
        head.append_header(n.clone(), v.clone())
            .map_err(|e| ours(format!("header {n}: {e}")))?;
    }
    let set = |head: &mut RequestHeader, n: &'static str, v: &str| {
        head.insert_header(n, v)
            .map_err(|e| ours(format!("header {n}: {e}")))
    };
    // The group's `host` when set (the cache key keeps the client's).
    set(
        &mut head,
        "host",
        pool.settings.host.as_deref().unwrap_or(&req.host),
    )?;
    if let Some((a, b)) = req.range {
        set(&mut head, "range", &format!("bytes={a}-{b}"))?;
    }
    for (n, v) in &req.headers {
        set(&mut head, n, v)?;
    }
    set(&mut head, "via", super::super::proxy::headers::VIA_VALUE)?;
    set(&mut head, "x-request-id", &req.request_id)?;
    if matches!(session, HttpSession::H2(_)) {
        // HTTP/2 carries the host as `:authority`, not as a Host field (RFC 9113 §8.3.1; nginx
        // refuses both as a duplicate Host), as Pingora's own proxy does.
        if let Some(host) = head.remove_header(&http::header::HOST) {
            let authority = http::uri::Authority::try_from(host.as_bytes())
                .map_err(|e| ours(format!("host {host:?} as :authority: {e}")))?;
            let uri = http::Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query(req.path_and_query.as_str())
                .build()
                .map_err(|e| ours(format!("building the HTTP/2 request: {e}")))?;
            head.set_uri(uri);
        }
    }
    session
        .write_request_header(Box::new(head))
        .await
        .map_err(|e| fail(format!("sending request: {e}"), classify(&e)))?;
    session
        .finish_request_body()
        .await
        .map_err(|e| fail(format!("sending request: {e}"), classify(&e)))?;
    // Interim answers (`100 Continue`, `103 Early Hints`, ...) come before the final one: Pingora
    // returns each as the response header, with no body reader behind it, so read on until the
    // final header (RFC 9110 §15.2). A `101` to a request that asked for no upgrade, or an
    // endless stream of interim answers, breaks the exchange: the server's fault.
    let mut interim = 0;
    let header = loop {
        session
            .read_response_header()
            .await
            .map_err(|e| fail(format!("reading response header: {e}"), classify(&e)))?;
        let header = session
            .response_header()
            .cloned()
            .ok_or_else(|| fail("no response header".into(), FailureClass::Framing))?;
        match header.status.as_u16() {
            101 => {
                return Err(fail(
                    "origin answered 101 Switching Protocols to a request without Upgrade".into(),
                    FailureClass::Framing,
                ))
            }
            // An HTTP/2 stream carries one final header (the h2 layer drops interim ones): a
            // second read would be a misuse of the session.
            s @ 100..=199 if matches!(session, HttpSession::H2(_)) => {
                return Err(fail(
                    format!("origin answered {s} as the final HTTP/2 response"),
                    FailureClass::Framing,
                ))
            }
            100..=199 if interim < MAX_INTERIM_RESPONSES => interim += 1,
            s @ 100..=199 => {
                return Err(fail(
                    format!(
                        "origin sent more than {MAX_INTERIM_RESPONSES} interim answers (last {s})"
                    ),
                    FailureClass::Framing,
                ))
            }
            _ => break header,
        }
    };
    let body_bytes = pool.body_bytes(addr, header.status.as_u16());
    Ok(OriginResponse {
        session: Some(session),
        peer,
        connector: connector.clone(),
        header,
        server: addr,
        selected: None,
        request_id: req.request_id.clone(),
        rate: RateCheck::new(pool.settings.min_rate, pool.settings.read_timeout),
        body_bytes,
    })
}

/// A parsed `Content-Range`: the inclusive byte range (`None` for `*`) and the complete
/// length (`None` for `*`).
pub type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parse `Content-Range: bytes a-b/len`, `bytes a-b/*` or `bytes */len`.
pub fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    if range.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if a > b || total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((Some((a, b)), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rate_check_judges_each_window_of_waiting() {
        let mut r = RateCheck::new(16 << 10, 400 * MS);
        // A trickle: 10 bytes every 100 ms of waiting, judged once 400 ms were spent waiting.
        assert_eq!(r.record(10, 100 * MS), Ok(()));
        assert_eq!(r.record(10, 100 * MS), Ok(()));
        assert_eq!(r.record(10, 100 * MS), Ok(()));
        assert_eq!(r.record(10, 100 * MS), Err(100));
        // A fast body passes every window; the window restarts after each judgement.
        let mut r = RateCheck::new(16 << 10, 400 * MS);
        for _ in 0..100 {
            assert_eq!(r.record(64 << 10, 50 * MS), Ok(()));
        }
    }

    #[test]
    fn time_not_spent_waiting_on_the_origin_does_not_count() {
        // Pieces that arrive at once (the consumer was the slow one) never trip the check,
        // however long the transfer takes in wall-clock time.
        let mut r = RateCheck::new(16 << 10, 400 * MS);
        for _ in 0..10_000 {
            assert_eq!(r.record(1024, Duration::ZERO), Ok(()));
        }
    }

    #[test]
    fn rate_check_off() {
        let mut r = RateCheck::new(0, 400 * MS);
        assert_eq!(r.record(0, Duration::from_secs(100)), Ok(()));
        let mut r = RateCheck::new(100, Duration::ZERO);
        assert_eq!(r.record(0, Duration::from_secs(100)), Ok(()));
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((Some((0, 99)), Some(1000)))
        );
        assert_eq!(
            parse_content_range("bytes 0-99/*"),
            Some((Some((0, 99)), None))
        );
        assert_eq!(
            parse_content_range("bytes */1000"),
            Some((None, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-4/1000"), None);
        assert_eq!(parse_content_range("bytes 0-1000/1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }
}
