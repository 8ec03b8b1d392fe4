//! The chunk cache's own origin client: one HTTP/1.1 GET (usually a chunk-aligned `Range`) to a
//! server of an upstream group, over Pingora's pooled connector, with the group's per-try
//! timeouts, retries (backoff, budget, deadline) and circuit breakers.

use super::pool::{PickError, Selected, UpstreamPool};
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
    pub request_id: String,
    /// What consistent hashing hashes (the cache key).
    pub hash_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    pub message: String,
    /// The last server tried, if any.
    pub server: Option<SocketAddr>,
    /// An HTTP status that made the attempt fail (e.g. 503), if any.
    pub status: Option<u16>,
    pub timed_out: bool,
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
}

impl OriginResponse {
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next body piece; `Ok(None)` at the end of the body.
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        let Some(s) = self.session.as_mut() else {
            return Ok(None);
        };
        match s.read_response_body().await {
            Ok(piece) => Ok(piece),
            Err(e) => {
                if let Some(sel) = self.selected.take() {
                    sel.failed(&self.request_id);
                }
                Err(FetchError {
                    message: format!("reading body: {e}"),
                    server: Some(self.server),
                    status: None,
                    timed_out: matches!(e.etype(), pingora_error::ErrorType::ReadTimedout),
                })
            }
        }
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

/// Whether a try that got this status is retried on another server.
pub fn is_retry_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Send `req` to the group: pick a server (healthy, breaker closed, not yet tried when another
/// is available, and preferably not one in `avoid`), and on connect errors, timeouts and 502/503/504 retry on
/// another after an exponential backoff with full jitter, within the group's attempts, retry
/// budget and deadline. A group whose servers are all ejected fails at once.
pub async fn open(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    req: &OriginRequest,
    avoid: &[SocketAddr],
) -> Result<OriginResponse, FetchError> {
    let started = tokio::time::Instant::now();
    let deadline = pool.settings.deadline;
    pool.budget.record_request();
    let mut tried: Vec<SocketAddr> = avoid.to_vec();
    let mut last = FetchError {
        message: "no server available".into(),
        server: None,
        status: Some(503),
        timed_out: false,
    };
    for attempt in 0..pool.settings.retry.attempts {
        if attempt > 0 {
            if !pool.budget.try_retry() {
                pool.stats
                    .retries_over_budget
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "rid={} retry budget of {} spent; not retrying",
                    req.request_id,
                    pool.name()
                );
                break;
            }
            let delay = pool.backoff.delay(attempt, &mut rand::rng());
            if started.elapsed() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            pool.stats.retries.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "rid={} retry {attempt} of {} after {delay:?}: {last}",
                req.request_id,
                req.path_and_query
            );
        }
        let sel = match pool.pick(req.hash_key.as_bytes(), &tried) {
            Ok(s) => s,
            Err(PickError::AllEjected) => {
                pool.stats.all_ejected.fetch_add(1, Ordering::Relaxed);
                last = FetchError {
                    message: format!(
                        "every server of {} is ejected or already failed",
                        pool.name()
                    ),
                    server: None,
                    status: Some(503),
                    timed_out: false,
                };
                break;
            }
        };
        let addr = sel.addr;
        tried.push(addr);
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, try_server(connector, pool, addr, req)).await {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                if status >= 500 {
                    sel.failed(&req.request_id);
                } else {
                    resp.selected = Some(sel);
                }
                if !is_retry_status(status) {
                    return Ok(resp);
                }
                last = FetchError {
                    message: format!("origin answered {status}"),
                    server: Some(addr),
                    status: Some(status),
                    timed_out: false,
                };
                resp.finish().await;
            }
            Ok(Err(e)) => {
                sel.failed(&req.request_id);
                log::warn!("rid={} origin {addr} failed: {e}", req.request_id);
                last = e;
            }
            Err(_) => {
                sel.failed(&req.request_id);
                last = FetchError {
                    message: format!("deadline of {deadline:?} exceeded"),
                    server: Some(addr),
                    status: None,
                    timed_out: true,
                };
                break;
            }
        }
    }
    Err(last)
}

async fn try_server(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    addr: SocketAddr,
    req: &OriginRequest,
) -> Result<OriginResponse, FetchError> {
    let fail = |message: String, timed_out: bool| FetchError {
        message,
        server: Some(addr),
        status: None,
        timed_out,
    };
    let peer = pool.peer(addr);
    let (mut session, _reused) = connector.get_http_session(&peer).await.map_err(|e| {
        let timed_out = matches!(e.etype(), pingora_error::ErrorType::ConnectTimedout);
        fail(format!("connect: {e}"), timed_out)
    })?;
    session.set_read_timeout(Some(pool.settings.read_timeout));
    let mut head = RequestHeader::build(req.method.clone(), req.path_and_query.as_bytes(), Some(8))
        .map_err(|e| fail(format!("building request: {e}"), false))?;
    let set = |head: &mut RequestHeader, n: &'static str, v: &str| {
        head.insert_header(n, v)
            .map_err(|e| fail(format!("header {n}: {e}"), false))
    };
    set(&mut head, "host", &req.host)?;
    if let Some((a, b)) = req.range {
        set(&mut head, "range", &format!("bytes={a}-{b}"))?;
    }
    for (n, v) in &req.headers {
        set(&mut head, n, v)?;
    }
    set(&mut head, "via", super::super::proxy::headers::VIA_VALUE)?;
    set(&mut head, "x-request-id", &req.request_id)?;
    session
        .write_request_header(Box::new(head))
        .await
        .map_err(|e| fail(format!("sending request: {e}"), false))?;
    session
        .finish_request_body()
        .await
        .map_err(|e| fail(format!("sending request: {e}"), false))?;
    session.read_response_header().await.map_err(|e| {
        let timed_out = matches!(e.etype(), pingora_error::ErrorType::ReadTimedout);
        fail(format!("reading response header: {e}"), timed_out)
    })?;
    let header = session
        .response_header()
        .cloned()
        .ok_or_else(|| fail("no response header".into(), false))?;
    Ok(OriginResponse {
        session: Some(session),
        peer,
        connector: connector.clone(),
        header,
        server: addr,
        selected: None,
        request_id: req.request_id.clone(),
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
