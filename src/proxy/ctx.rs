//! The per-request context, split by concern so each phase touches only what it owns.

use crate::cache::key::Scheme;
use crate::config::Route;
use crate::conn::h2::StreamTicket;
use crate::conn::table::Conn;
use crate::conn::Protocol;
use crate::origin::budget::RequestRetries;
use crate::origin::failing::UrlMark;
use crate::origin::outcome::StatusEvidence;
use crate::origin::pool::Selected;
use crate::runtime::Runtime;
use crate::shaping::Download;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub struct RequestCtx {
    /// The configuration in force when the request started: every phase, retry and cache
    /// fill of the request uses it, whatever reloads happen meanwhile.
    pub runtime: Arc<Runtime>,
    pub request_id: String,
    pub started: Instant,
    pub route: Option<Arc<Route>>,
    pub upstream: UpstreamCtx,
    /// What the cache did (`Cache-Status` header and access log); `None`: not involved.
    pub cache_status: Option<super::cache_status::CacheStatus>,
    /// The cache layer declined the request: proxy it upstream.
    pub pass_through: bool,
    /// The client connection: a shaped response's download is handed to it, and paces its
    /// writes ([`Conn::pace_response`]) until the response ends.
    pub connection: Option<Arc<Conn>>,
    /// The HTTP/2 stream the request came on (`None`: HTTP/1.x): its shaped download is paced
    /// at the stream's body writes, and it is told whether the response went out whole.
    pub stream: Option<StreamTicket>,
    /// A shaped download held here instead, unpaced, when the connection is unknown (never for
    /// the proxy's guarded listeners); dropped with the context, which ends the download.
    pub download: Option<Download>,
    /// The request body's time bound, once a body is being read for the origin.
    pub body: Option<super::body::BodyClock>,
    /// We answered the client's `Expect: 100-continue` ourselves (to admit its body).
    pub continue_sent: bool,
    /// The scheme the request is forwarded as (`X-Forwarded-Proto`), part of its cache key.
    pub scheme: Scheme,
    /// A peer of the cluster asked (its mark, from a peer's address): filled here, never
    /// asked of another peer, not shaped, and its `CDN-Loop` passed on as it came.
    pub from_peer: bool,
}

#[derive(Default)]
pub struct UpstreamCtx {
    /// Servers tried so far for this request, in order; the last is the current one.
    pub tried: Vec<SocketAddr>,
    /// The current try's server and breaker admission, until its outcome is reported.
    pub current: Option<Selected>,
    /// A retry already decided for a 502/503/504 answer (see `upstream_response_filter`).
    pub status_retry: bool,
    /// Tries that got a gateway answer, charged only if a peer then answers (outcome.rs).
    pub evidence: StatusEvidence,
    /// The current try was counted in `edgeslice_origin_requests_total` (it answered).
    pub counted: bool,
    /// Counts the current answer's body bytes (`edgeslice_origin_response_bytes_total`).
    pub body_bytes: Option<prometheus::IntCounter>,
    /// The retries this request charged to the group's budget (given back if it is answered).
    pub retries: RequestRetries,
    /// The request was counted in the group's retry budget (once it reached the origin side:
    /// a request refused before it was sent, for the client's doing, is never counted).
    pub budget_counted: bool,
    /// The request's URL in the group's table of URLs failing everywhere (`origin::failing`).
    pub url: Option<UrlMark>,
}

impl RequestCtx {
    /// The HTTP version the request came in.
    pub fn protocol(&self) -> Protocol {
        match self.stream {
            Some(_) => Protocol::H2,
            None => Protocol::Http1,
        }
    }

    pub fn new(runtime: Arc<Runtime>) -> Self {
        RequestCtx {
            runtime,
            request_id: String::new(),
            started: Instant::now(),
            route: None,
            upstream: UpstreamCtx::default(),
            cache_status: None,
            pass_through: false,
            connection: None,
            stream: None,
            download: None,
            body: None,
            continue_sent: false,
            scheme: Scheme::Http,
            from_peer: false,
        }
    }
}
