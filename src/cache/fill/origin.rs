//! What the fill stages need of an origin group, as two small traits: [`Origin`] opens a GET
//! (with its retries, backoff and deadline) and [`OriginReply`] is the answer being read. The
//! real implementation is [`OriginGroup`] (Pingora's connector and the group's pool); the unit
//! tests of the fill stages use an in-memory fake, so discovery, revalidation, runs, resume and
//! distribution are tested without sockets.

use crate::cache::store::Keep;
use crate::origin::fetch::{self, FetchError, OriginRequest, OriginResponse};
use crate::origin::pool::UpstreamPool;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// An origin answer whose body is being read.
#[async_trait]
pub trait OriginReply: Send {
    fn header(&self) -> &ResponseHeader;
    /// The server that answered.
    fn server(&self) -> SocketAddr;
    /// The next body piece; `Ok(None)` at its end. An error ends the reply (and is charged to
    /// the server by the real implementation).
    async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError>;
    /// Done with the reply: report success; the connection is reused when the body was read
    /// whole.
    async fn finish(self: Box<Self>);

    fn status(&self) -> u16 {
        self.header().status.as_u16()
    }

    /// Which tiers keep what this answer brings: all of them, unless it came from a peer
    /// that owns it (`cluster.keep_copies`).
    fn keep(&self) -> Keep {
        Keep::All
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header()
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
    }
}

/// An open origin answer.
pub type Reply = Box<dyn OriginReply>;

/// One origin group, as the fill stages use it.
#[async_trait]
pub trait Origin: Send + Sync {
    /// Open `req` within the group's retries and its deadline from now, or by `until`;
    /// servers in `avoid` are tried last.
    async fn open(
        &self,
        req: &OriginRequest,
        avoid: &[SocketAddr],
        until: Option<Instant>,
    ) -> Result<Reply, FetchError>;
    /// How many times a broken body transfer may be resumed (the group's attempts less one).
    fn resumes(&self) -> u32;
    /// The group's per-fetch deadline.
    fn deadline(&self) -> Duration;
    /// Count a resumed transfer.
    fn count_resume(&self);
    /// Every server of a group of several is failing right now, or the group has no server
    /// (then a stale copy is served at once).
    fn all_failing(&self) -> bool;
    /// The group's name, for logs.
    fn name(&self) -> &str;
    /// The last chunk one request may ask for when it starts at chunk `index`: a run never
    /// crosses a shard's end when shards have owners (`cluster.shard_size`), so each of its
    /// chunks is asked of its shard's owner.
    fn run_limit(&self, index: u64, chunk_size: u64) -> u64 {
        let _ = chunk_size;
        let _ = index;
        u64::MAX
    }
}

/// How the fill stages reach the origins of one route; cheap to clone.
pub type OriginAccess = Arc<dyn Origin>;

/// The real origin group: Pingora's connector and the group's pool (retries, breakers).
pub struct OriginGroup {
    pub connector: Arc<Connector>,
    pub pool: Arc<UpstreamPool>,
}

#[async_trait]
impl OriginReply for OriginResponse {
    fn header(&self) -> &ResponseHeader {
        &self.header
    }

    fn server(&self) -> SocketAddr {
        self.server
    }

    async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        OriginResponse::next_piece(self).await
    }

    async fn finish(self: Box<Self>) {
        OriginResponse::finish(*self).await
    }
}

#[async_trait]
impl Origin for OriginGroup {
    async fn open(
        &self,
        req: &OriginRequest,
        avoid: &[SocketAddr],
        until: Option<Instant>,
    ) -> Result<Reply, FetchError> {
        let until = until.unwrap_or_else(|| Instant::now() + self.pool.settings.deadline);
        let resp = fetch::open_until(&self.connector, &self.pool, req, avoid, until).await?;
        Ok(Box::new(resp))
    }

    fn resumes(&self) -> u32 {
        self.pool.settings.retry.attempts.saturating_sub(1)
    }

    fn deadline(&self) -> Duration {
        self.pool.settings.deadline
    }

    fn count_resume(&self) {
        self.pool
            .stats
            .resumes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pool.metrics.resumes.inc();
    }

    fn all_failing(&self) -> bool {
        // A sole server is never taken for down here (as nginx never marks the only server of
        // a group unavailable): its breaker may open on a burst of failures, but the stale copy
        // is only served after it has really been asked. A group with no server (its names do
        // not resolve) has nobody to ask.
        match self.pool.server_count() {
            0 => true,
            1 => false,
            _ => self.pool.all_failing(),
        }
    }

    fn name(&self) -> &str {
        self.pool.name()
    }
}
