//! Where a route's fills go, tier by tier: the shard's owner among the cluster's peers, then
//! the route's parent tier, then its upstream (the origin).
//!
//! ```text
//!  open(req) ─► peers in ring order (owner first), up to this node's own place
//!                 answer ─► use it (its chunks kept as cluster.keep_copies says)
//!                 refused / silent past peer_timeout / ejected ─► next peer
//!            ─► parent group (its own retries and deadline)
//!                 answer other than 502/503/504 ─► use it
//!                 failed, or a gateway answer ─► the upstream
//!            ─► upstream group
//! ```
//! A broken transfer resumes through the same walk with the servers that broke avoided
//! (`distribute`): a peer that broke mid-body is passed over and the next node of the ring, or
//! this node's own parent or origin, goes on from the next byte. Each tier charges its own
//! failures to its own breakers: a peer's never reach an origin's.
//!
//! A request a peer sent this node ([`crate::cluster::PEER_HEADER`]) is filled here: its
//! [`Tiered`] has no peers, so a request crosses at most one peer hop.

use super::origin::{Origin, OriginAccess, OriginReply, Reply};
use crate::cache::store::Keep;
use crate::config::cluster::KeepCopies;
use crate::metrics::{FillMetrics, FillTarget};
use crate::origin::fetch::{FetchError, OriginRequest};
use async_trait::async_trait;
use bytes::Bytes;
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The cluster's peers, as the fills need them.
#[async_trait]
pub trait Peers: Send + Sync {
    /// The peers to ask for the shard holding byte `offset` of the object keyed `object`, owner
    /// first, up to this node's own place on the ring.
    fn ask_order(&self, object: &str, offset: u64) -> Vec<SocketAddr>;
    /// One try of `req` (marked as a peer's) on the peer at `addr`.
    async fn open(
        &self,
        addr: SocketAddr,
        req: &OriginRequest,
        until: Instant,
    ) -> Result<Reply, FetchError>;
    /// This node's name (the value of the peer mark).
    fn self_name(&self) -> &str;
    fn keep_copies(&self) -> KeepCopies;
    /// How long a transfer from a peer may take in all.
    fn deadline(&self) -> Duration;
    /// How many peers there are besides this node.
    fn others(&self) -> u32;
}

/// A route's fills: peers (when clustered and this is not a peer's request), parent (when the
/// route has one), upstream.
pub struct Tiered {
    pub peers: Option<Arc<dyn Peers>>,
    /// `cluster.shard_size` when the node has peers (even for a peer's request, whose runs
    /// must not cross into another owner's shard either).
    pub shard_size: Option<u64>,
    pub parent: Option<OriginAccess>,
    pub upstream: OriginAccess,
    pub metrics: Arc<FillMetrics>,
}

impl Tiered {
    async fn open_peers(
        &self,
        peers: &Arc<dyn Peers>,
        req: &OriginRequest,
        avoid: &[SocketAddr],
        until: Option<Instant>,
    ) -> Option<Reply> {
        let offset = req.range.map_or(0, |r| r.0);
        let order = peers.ask_order(&req.hash_key, offset);
        if order.iter().all(|a| avoid.contains(a)) {
            return None;
        }
        let until = until.unwrap_or_else(|| Instant::now() + peers.deadline());
        let mut marked = req.clone();
        marked
            .headers
            .push((crate::cluster::PEER_HEADER, peers.self_name().to_string()));
        let _asking = req.asking_peer.as_deref().map(AskingPeer::new);
        for addr in order.into_iter().filter(|a| !avoid.contains(a)) {
            self.metrics.requests(FillTarget::Peer).inc();
            match peers.open(addr, &marked, until).await {
                Ok(reply) if reply.status() == 508 => log::warn!(
                    "rid={} peer {addr} saw a loop (508) for {}: its shard goes to the next node",
                    req.request_id,
                    req.hash_key
                ),
                Ok(reply) => {
                    let keep = match peers.keep_copies() {
                        KeepCopies::Memory => Keep::Memory,
                        KeepCopies::None => Keep::Nothing,
                    };
                    return Some(self.counted(reply, FillTarget::Peer, keep));
                }
                Err(e) => log::warn!(
                    "rid={} peer {addr} failed ({e}); its shard of {} goes to the next node",
                    req.request_id,
                    req.hash_key
                ),
            }
        }
        None
    }

    fn counted(&self, reply: Reply, to: FillTarget, keep: Keep) -> Reply {
        Box::new(Counted {
            reply,
            bytes: self.metrics.bytes(to).clone(),
            keep,
        })
    }
}

#[async_trait]
impl Origin for Tiered {
    async fn open(
        &self,
        req: &OriginRequest,
        avoid: &[SocketAddr],
        until: Option<Instant>,
    ) -> Result<Reply, FetchError> {
        if let Some(peers) = &self.peers {
            if let Some(reply) = self.open_peers(peers, req, avoid, until).await {
                return Ok(reply);
            }
        }
        if let Some(parent) = &self.parent {
            self.metrics.requests(FillTarget::Parent).inc();
            match parent.open(req, avoid, None).await {
                Ok(reply) if !matches!(reply.status(), 502..=504) => {
                    return Ok(self.counted(reply, FillTarget::Parent, Keep::All));
                }
                Ok(reply) => log::warn!(
                    "rid={} parent {} answered {}: asking upstream {}",
                    req.request_id,
                    parent.name(),
                    reply.status(),
                    self.upstream.name()
                ),
                Err(e) => log::warn!(
                    "rid={} parent {} failed ({e}): asking upstream {}",
                    req.request_id,
                    parent.name(),
                    self.upstream.name()
                ),
            }
        }
        self.metrics.requests(FillTarget::Origin).inc();
        let reply = self.upstream.open(req, avoid, until).await?;
        Ok(self.counted(reply, FillTarget::Origin, Keep::All))
    }

    fn resumes(&self) -> u32 {
        self.upstream.resumes()
            + self.peers.as_ref().map_or(0, |p| p.others())
            + u32::from(self.parent.is_some())
    }

    fn deadline(&self) -> Duration {
        self.upstream.deadline()
    }

    fn count_resume(&self) {
        self.upstream.count_resume()
    }

    fn all_failing(&self) -> bool {
        self.parent.as_ref().is_none_or(|p| p.all_failing()) && self.upstream.all_failing()
    }

    fn name(&self) -> &str {
        self.upstream.name()
    }

    fn run_limit(&self, index: u64, chunk_size: u64) -> u64 {
        match self.shard_size {
            // The shard's chunks: `shard_size` is a multiple of `chunk_size`.
            Some(shard) if chunk_size > 0 => {
                let per_shard = (shard / chunk_size).max(1);
                (index / per_shard + 1) * per_shard - 1
            }
            _ => u64::MAX,
        }
    }
}

/// Marks a discovery lock's holder as waiting on a peer until dropped (the wait ends, or the
/// fetch is cancelled).
struct AskingPeer<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> AskingPeer<'a> {
    fn new(flag: &'a std::sync::atomic::AtomicBool) -> AskingPeer<'a> {
        flag.store(true, std::sync::atomic::Ordering::Release);
        AskingPeer(flag)
    }
}

impl Drop for AskingPeer<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// An answer whose body bytes are counted by where they came from, and kept as `keep` says.
struct Counted {
    reply: Reply,
    bytes: prometheus::IntCounter,
    keep: Keep,
}

#[async_trait]
impl OriginReply for Counted {
    fn header(&self) -> &ResponseHeader {
        self.reply.header()
    }

    fn server(&self) -> SocketAddr {
        self.reply.server()
    }

    async fn next_piece(&mut self) -> Result<Option<Bytes>, FetchError> {
        let piece = self.reply.next_piece().await?;
        if let Some(p) = &piece {
            self.bytes.inc_by(p.len() as u64);
        }
        Ok(piece)
    }

    async fn finish(self: Box<Self>) {
        self.reply.finish().await
    }

    fn keep(&self) -> Keep {
        self.keep
    }
}

/// The real peers: the cluster's ring and its group's connections.
pub struct ClusterPeers {
    pub cluster: Arc<crate::cluster::Cluster>,
    pub connector: Arc<pingora_core::connectors::http::Connector>,
}

#[async_trait]
impl Peers for ClusterPeers {
    fn ask_order(&self, object: &str, offset: u64) -> Vec<SocketAddr> {
        self.cluster.ask_order(object, offset)
    }

    async fn open(
        &self,
        addr: SocketAddr,
        req: &OriginRequest,
        until: Instant,
    ) -> Result<Reply, FetchError> {
        let resp =
            crate::origin::fetch::open_on(&self.connector, &self.cluster.pool, addr, req, until)
                .await?;
        Ok(Box::new(resp))
    }

    fn self_name(&self) -> &str {
        self.cluster.self_name()
    }

    fn keep_copies(&self) -> KeepCopies {
        self.cluster.keep_copies()
    }

    fn deadline(&self) -> Duration {
        self.cluster.pool.settings.deadline
    }

    fn others(&self) -> u32 {
        self.cluster.settings.peers.len().saturating_sub(1) as u32
    }
}
