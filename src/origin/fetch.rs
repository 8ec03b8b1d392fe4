//! The chunk cache's own origin client: one HTTP/1.1 GET (usually a chunk-aligned `Range`) to a
//! server of an upstream group, over Pingora's pooled connector, with the group's timeouts.
//! Connect failures and 502/503/504 answers fail over to the next server before any byte of the
//! response is used.

use super::pool::UpstreamPool;
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use std::net::SocketAddr;
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

/// An origin response whose header has been read; the body is read piece by piece.
pub struct OriginResponse {
    session: Option<HttpSession>,
    peer: HttpPeer,
    connector: Arc<Connector>,
    pub header: ResponseHeader,
    pub server: SocketAddr,
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
        s.read_response_body().await.map_err(|e| FetchError {
            message: format!("reading body: {e}"),
            server: Some(self.server),
            status: None,
            timed_out: matches!(e.etype(), pingora_error::ErrorType::ReadTimedout),
        })
    }

    /// Return the connection to the pool when the body was read to its end; otherwise drop it.
    pub async fn finish(mut self) {
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

fn is_failover_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Send `req` to a server of `pool`, failing over to the next one on connect errors, timeouts
/// and 502/503/504, each server at most once.
pub async fn open(
    connector: &Arc<Connector>,
    pool: &UpstreamPool,
    req: &OriginRequest,
) -> Result<OriginResponse, FetchError> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = FetchError {
        message: "no server available".into(),
        server: None,
        status: None,
        timed_out: false,
    };
    for _ in 0..pool.settings.servers.len() {
        let Some(addr) = pool.select(req.path_and_query.as_bytes(), |a| tried.contains(a)) else {
            break;
        };
        if tried.contains(&addr) {
            break;
        }
        tried.push(addr);
        match try_server(connector, pool, addr, req).await {
            Ok(resp) if is_failover_status(resp.status()) => {
                last = FetchError {
                    message: format!("origin answered {}", resp.status()),
                    server: Some(addr),
                    status: Some(resp.status()),
                    timed_out: false,
                };
                log::warn!(
                    "rid={} origin {addr} answered {}, failing over",
                    req.request_id,
                    resp.status()
                );
                resp.finish().await;
            }
            Ok(resp) => return Ok(resp),
            Err(e) => {
                log::warn!("rid={} origin {addr} failed: {e}", req.request_id);
                last = e;
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
