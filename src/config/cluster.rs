//! The `cluster` section: this tier's `CDN-Loop` id, and the peers that shard one cache
//! (`crate::cluster`). Validated here into [`ClusterSettings`]; errors name key path and line.
//!
//! Peer names are never resolved here: the ring is keyed by the names as written, and a name
//! that does not resolve is a down peer, not a config error. The other peers become an
//! upstream group of their own ([`PEER_GROUP`]), resolved and broken like any group.

use super::schema::{RawCluster, RawKeepCopies};
use super::{err_at, ConfigError};
use super::{ServerEntry, ServerTarget, UpstreamSettings};
use serde_saphyr::Spanned;
use std::sync::Arc;
use std::time::Duration;

/// `cluster.*`, validated. Without a `cluster` section: the default id and no peers (a single
/// node, as before the section existed).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// `cluster.cdn_id`: the token this tier adds to `CDN-Loop` (RFC 8586).
    pub cdn_id: String,
    /// `cluster.self` and `cluster.peers` and the keys that tune them; `None`: no peers.
    pub peers: Option<PeerSettings>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            cdn_id: DEFAULT_CDN_ID.to_string(),
            peers: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    /// This node as its peers name it: one of `peers`.
    pub self_name: String,
    /// `host:port` names, canonical (host case folded, one trailing dot dropped), unique, in
    /// the order written; never resolved here.
    pub peers: Vec<String>,
    /// What each of `peers` is, in the same order: an address, or a name to resolve.
    pub targets: Vec<ServerTarget>,
    pub resolve_interval: Duration,
    /// Consecutive bytes of an object owned by one peer: a multiple of `cache.chunk_size`.
    pub shard_size: u64,
    pub keep_copies: KeepCopies,
    pub peer_timeout: Duration,
    /// The other peers as an upstream group ([`PEER_GROUP`]): their names resolved every
    /// `resolve_interval`, `peer_timeout` to connect and between reads, one try each (the ring
    /// walk is the retry), a breaker each. Built here so the run time treats it as any group.
    pub group: Arc<UpstreamSettings>,
}

/// The name the peer group goes by in metrics, `/stats` and logs (a name no `upstreams` key
/// may take).
pub const PEER_GROUP: &str = "cluster.peers";

impl PeerSettings {
    /// The group of the peers other than `self_name` (`peers` and `targets` in step).
    fn group(
        peers: &[String],
        targets: &[ServerTarget],
        self_name: &str,
        peer_timeout: Duration,
        resolve_interval: Duration,
    ) -> UpstreamSettings {
        let mut source = None;
        let mut servers = Vec::with_capacity(peers.len());
        for (name, target) in peers.iter().zip(targets) {
            if name != self_name {
                servers.push(ServerEntry {
                    target: target.clone(),
                    weight: 1,
                });
            } else if let ServerTarget::Addr(a) = target {
                source = Some(a.ip());
            }
        }
        UpstreamSettings {
            name: PEER_GROUP.to_string(),
            servers,
            balance: super::Balance::RoundRobin,
            connect_timeout: peer_timeout,
            read_timeout: peer_timeout,
            deadline: super::DEFAULT_DEADLINE,
            min_rate: super::DEFAULT_MIN_RATE,
            max_ejected_percent: 100,
            resolve_interval,
            health_check: None,
            // Two failures in a row eject a peer (an origin takes five): a peer is on the
            // site's own network, a false ejection costs only fills its next node makes, and
            // each failure of a silent peer costs a client `peer_timeout`.
            breaker: crate::origin::breaker::BreakerConfig {
                failure_threshold: PEER_FAILURES_TO_EJECT,
                ..super::DEFAULT_BREAKER
            },
            retry: super::RetrySettings {
                attempts: 1,
                ..super::DEFAULT_RETRY
            },
            host: None,
            tls: None,
            http2: false,
            // This node's address when its name is one: the peers believe the peer mark from
            // the addresses their peer names resolve to, and a host with several addresses
            // (loopback aliases, a multi-homed node) would otherwise pick the source itself.
            source,
        }
    }
}

/// What a node that does not own a shard keeps of the chunks it served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepCopies {
    /// In the memory tier (hot objects on every node, no disk duplication).
    Memory,
    /// Nothing.
    None,
}

pub const DEFAULT_CDN_ID: &str = "edgeslice";
/// The environment variable that names this node in place of `cluster.self` (Kubernetes:
/// `$(POD_NAME).edges.cdn.svc.cluster.local:8080` from the downward API).
pub const SELF_ENV: &str = "EDGESLICE_CLUSTER_SELF";
/// The longest `cluster.cdn_id`: it is sent on every origin request.
pub const MAX_CDN_ID_LEN: usize = 64;
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_SHARD_SIZE: u64 = 16 << 20;
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failures that open a peer's breaker.
pub const PEER_FAILURES_TO_EJECT: u32 = 2;

/// A token (RFC 9110 §5.6.2 `tchar`): what a `CDN-Loop` pseudonym is (RFC 8586 §2).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

impl ClusterSettings {
    /// These settings with `name` as `cluster.self` (from [`SELF_ENV`]): one of the peers.
    pub fn with_self(&self, name: &str) -> Result<ClusterSettings, String> {
        let Some(p) = &self.peers else {
            return Err(format!(
                "{SELF_ENV} is set ({name:?}) but the file has no cluster.peers"
            ));
        };
        let self_name = canonical_peer(name).map_err(|m| format!("{SELF_ENV}: {m}"))?;
        if !p.peers.contains(&self_name) {
            return Err(format!(
                "{SELF_ENV}: {self_name:?} is not one of cluster.peers {:?}",
                p.peers
            ));
        }
        let group = Arc::new(PeerSettings::group(
            &p.peers,
            &p.targets,
            &self_name,
            p.peer_timeout,
            p.resolve_interval,
        ));
        Ok(ClusterSettings {
            cdn_id: self.cdn_id.clone(),
            peers: Some(PeerSettings {
                self_name,
                group,
                ..p.clone()
            }),
        })
    }
}

/// A peer name: `host:port` with the port required, in canonical form.
fn peer_name(path: &str, at: &Spanned<String>) -> Result<String, ConfigError> {
    canonical_peer(&at.value).map_err(|m| err_at(path, at, m))
}

/// `text` as a canonical peer name, or why it is none.
fn canonical_peer(text: &str) -> Result<String, String> {
    let text = text.trim();
    match crate::proxy::canonical::host(text.as_bytes(), &[]) {
        Ok(h) => match h.port {
            Some(p) => Ok(format!("{}:{p}", h.name)),
            None => Err(format!(
                "invalid peer {text:?}: expected host:port (the port is required)"
            )),
        },
        Err(_) => Err(format!("invalid peer {text:?}: expected host:port")),
    }
}

pub(super) fn validate(
    raw: &Spanned<RawCluster>,
    chunk_size: u64,
) -> Result<ClusterSettings, ConfigError> {
    let r = &raw.value;
    let cdn_id = match &r.cdn_id {
        None => DEFAULT_CDN_ID.to_string(),
        Some(id) => {
            let v = id.value.trim();
            if !is_token(v) || v.len() > MAX_CDN_ID_LEN {
                return Err(err_at(
                    "cluster.cdn_id",
                    id,
                    format!(
                        "must be a token of 1 to {MAX_CDN_ID_LEN} characters (letters, digits and !#$%&'*+-.^_`|~; it is sent in CDN-Loop)"
                    ),
                ));
            }
            v.to_string()
        }
    };
    let peers = match (&r.self_name, &r.peers) {
        (None, None) => {
            // The tuning keys mean nothing without peers: say so rather than ignore them.
            let stray = [
                r.resolve_interval
                    .as_ref()
                    .map(|s| ("resolve_interval", s.referenced)),
                r.shard_size.as_ref().map(|s| ("shard_size", s.referenced)),
                r.keep_copies
                    .as_ref()
                    .map(|s| ("keep_copies", s.referenced)),
                r.peer_timeout
                    .as_ref()
                    .map(|s| ("peer_timeout", s.referenced)),
            ];
            if let Some((key, at)) = stray.into_iter().flatten().next() {
                return Err(ConfigError {
                    path: format!("cluster.{key}"),
                    line: Some(at.line()),
                    column: Some(at.column()),
                    message:
                        "needs cluster.self and cluster.peers (only cdn_id may be given alone)"
                            .into(),
                });
            }
            None
        }
        (Some(s), None) => {
            return Err(err_at(
                "cluster.self",
                s,
                "needs cluster.peers (the list this node is one of)",
            ))
        }
        (None, Some(p)) => {
            return Err(err_at(
                "cluster.peers",
                p,
                "needs cluster.self (which of the peers this node is)",
            ))
        }
        (Some(s), Some(list)) => {
            if list.value.is_empty() {
                return Err(err_at("cluster.peers", list, "the peer list is empty"));
            }
            let mut peers: Vec<String> = Vec::with_capacity(list.value.len());
            let mut targets = Vec::with_capacity(list.value.len());
            for (i, p) in list.value.iter().enumerate() {
                let path = format!("cluster.peers[{i}]");
                let name = peer_name(&path, p)?;
                targets.push(ServerTarget::parse(&name).map_err(|m| err_at(&path, p, m))?);
                if let Some(j) = peers.iter().position(|q| *q == name) {
                    return Err(err_at(
                        path,
                        p,
                        format!("{name:?} is already cluster.peers[{j}]"),
                    ));
                }
                peers.push(name);
            }
            let self_name = peer_name("cluster.self", s)?;
            if !peers.contains(&self_name) {
                return Err(err_at(
                    "cluster.self",
                    s,
                    format!("{self_name:?} is not one of cluster.peers"),
                ));
            }
            let shard_size = match &r.shard_size {
                None => DEFAULT_SHARD_SIZE.max(chunk_size).div_ceil(chunk_size) * chunk_size,
                Some(v) if v.value.0 == 0 || v.value.0 % chunk_size != 0 => {
                    return Err(err_at(
                        "cluster.shard_size",
                        v,
                        format!(
                            "must be a positive multiple of cache.chunk_size ({chunk_size} bytes)"
                        ),
                    ))
                }
                Some(v) => v.value.0,
            };
            let resolve_interval = super::positive_duration(
                "cluster.resolve_interval",
                &r.resolve_interval,
                DEFAULT_RESOLVE_INTERVAL,
            )?;
            let peer_timeout = super::positive_duration(
                "cluster.peer_timeout",
                &r.peer_timeout,
                DEFAULT_PEER_TIMEOUT,
            )?;
            let group = Arc::new(PeerSettings::group(
                &peers,
                &targets,
                &self_name,
                peer_timeout,
                resolve_interval,
            ));
            Some(PeerSettings {
                self_name,
                peers,
                targets,
                resolve_interval,
                shard_size,
                keep_copies: match r.keep_copies.as_ref().map(|k| k.value) {
                    None | Some(RawKeepCopies::Memory) => KeepCopies::Memory,
                    Some(RawKeepCopies::None) => KeepCopies::None,
                },
                peer_timeout,
                group,
            })
        }
    };
    Ok(ClusterSettings { cdn_id, peers })
}
