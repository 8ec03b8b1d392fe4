//! One cache across the nodes of a site (`cluster.peers`): each shard of an object (its cache
//! key and a `cluster.shard_size` window) has an owner on a Ketama ring of the peers' names
//! ([`ring`]); a node asks the owner for the chunks it lacks, and only the owner fills from the
//! parent tier or the origin.
//!
//! ```text
//!  client ─► node ──(chunk-aligned Range, x-edgeslice-peer)──► owner ─► parent ─► origin
//!              │ owner down, refusing, silent past peer_timeout,         (or origin)
//!              │ or broken mid-body: the next node of the ring, and
//!              └─ when this node's own place comes first: its parent / origin itself
//! ```
//!
//! The other peers are an upstream group of their own ([`PEER_GROUP`]): their names are
//! resolved every `cluster.resolve_interval` like any group's, each has a breaker, and a
//! peer's failures are charged to it, never to an origin. A peer's request is marked with
//! [`PEER_HEADER`]; the mark is believed only from an address a peer name resolves to, and a
//! marked request is never asked of another peer (it is filled where it lands), so a request
//! crosses at most one peer hop.

pub mod ring;

use crate::config::cluster::{KeepCopies, PeerSettings};
use crate::config::ServerTarget;
use crate::origin::pool::{ServerSet, UpstreamPool};
use ring::Ring;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use crate::config::cluster::PEER_GROUP;

/// The request field that marks a request from a peer (its value: the asking node's name).
pub const PEER_HEADER: &str = "x-edgeslice-peer";

/// The cluster as one configuration snapshot sees it.
pub struct Cluster {
    pub settings: PeerSettings,
    ring: Ring,
    self_index: usize,
    /// The other peers.
    pub pool: Arc<UpstreamPool>,
}

/// How the peers look now, for the `edgeslice_cluster_peers` gauge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerStates {
    /// This node, and peers that resolve and whose breaker admits requests.
    pub up: usize,
    /// Peers that do not resolve, or whose breaker is open.
    pub down: usize,
}

impl Cluster {
    pub fn new(settings: &PeerSettings, pool: Arc<UpstreamPool>) -> Cluster {
        let self_index = settings
            .peers
            .iter()
            .position(|p| *p == settings.self_name)
            .unwrap_or(0);
        Cluster {
            ring: Ring::new(&settings.peers),
            self_index,
            settings: settings.clone(),
            pool,
        }
    }

    /// Where ring node `node` is in `set` (the peer group's servers now): the first address
    /// its name resolves to; `None` for this node and for a name that does not resolve.
    fn address(&self, set: &ServerSet, node: usize) -> Option<SocketAddr> {
        if node == self.self_index {
            return None;
        }
        let target = &self.settings.targets[node];
        let found = set.servers().iter().find(|s| match target {
            ServerTarget::Addr(a) => s.addr == *a,
            ServerTarget::Name { host, port } => {
                s.name.as_deref() == Some(host.as_str()) && s.addr.port() == *port
            }
        });
        found.map(|s| s.addr)
    }

    /// The peers to ask for the shard holding byte `offset` of the object keyed `object`, in
    /// ring order: its owner, then the nodes its shard moves to when the ones before fail,
    /// up to this node's own place (from there on this node fills it itself). Peers that do
    /// not resolve now are left out.
    pub fn ask_order(&self, object: &str, offset: u64) -> Vec<SocketAddr> {
        let key = ring::shard_key(object, offset, self.settings.shard_size);
        let set = self.pool.server_set();
        self.ring
            .walk(&key)
            .into_iter()
            .take_while(|&n| n != self.self_index)
            .filter_map(|n| self.address(&set, n))
            .collect()
    }

    /// Whether `ip` is an address a peer's name resolves to now (a request from it may carry
    /// [`PEER_HEADER`]).
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.pool
            .server_set()
            .servers()
            .iter()
            .any(|s| s.addr.ip() == ip)
    }

    pub fn self_name(&self) -> &str {
        &self.settings.self_name
    }

    pub fn keep_copies(&self) -> KeepCopies {
        self.settings.keep_copies
    }

    pub fn states(&self) -> PeerStates {
        let set = self.pool.server_set();
        let mut s = PeerStates { up: 1, down: 0 };
        for node in (0..self.settings.peers.len()).filter(|&n| n != self.self_index) {
            let up = self
                .address(&set, node)
                .and_then(|a| self.pool.breaker(&a))
                .is_some_and(|b| b.allows());
            if up {
                s.up += 1;
            } else {
                s.down += 1;
            }
        }
        s
    }
}
