//! The on-disk YAML schema, exactly as operators write it. Every struct denies unknown keys so a
//! misspelt key is an error, not a silent default. Values that need checks beyond their type keep
//! their source location (`Spanned`) so the validator can name the line.
//!
//! These types never leave the config module: the rest of the program sees only the validated
//! [`crate::config::Config`].

use super::units::{Dur, Fraction, Rate, Size};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub listen: Option<Vec<Spanned<RawListen>>>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub cache: RawCache,
    pub upstreams: Option<Spanned<BTreeMap<String, RawUpstream>>>,
    pub routes: Option<Spanned<Vec<RawRoute>>>,
    pub shaping: Option<Spanned<RawShaping>>,
    pub cluster: Option<Spanned<RawCluster>>,
}

/// `cluster`: peers sharding one cache, and this tier's `CDN-Loop` id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    #[serde(rename = "self")]
    pub self_name: Option<Spanned<String>>,
    pub peers: Option<Spanned<Vec<Spanned<String>>>>,
    pub resolve_interval: Option<Spanned<Dur>>,
    pub shard_size: Option<Spanned<Size>>,
    pub keep_copies: Option<Spanned<RawKeepCopies>>,
    pub peer_timeout: Option<Spanned<Dur>>,
    pub cdn_id: Option<Spanned<String>>,
}

/// `keep_copies`: what a node that does not own a shard keeps of the chunks it served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawKeepCopies {
    Memory,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShaping {
    pub client_key: Option<Spanned<RawClientKey>>,
    pub ipv6_prefix: Option<Spanned<u32>>,
    pub total_rate: Option<Spanned<Rate>>,
    pub max_clients: Option<Spanned<usize>>,
    pub classes: Option<Spanned<BTreeMap<String, RawShapingClass>>>,
}

/// `remote_addr`, `{header: NAME}` or `{forwarded_for: {trusted_proxies: [CIDR, ...]}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawClientKey {
    RemoteAddr,
    Header(String),
    ForwardedFor(RawForwardedFor),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForwardedFor {
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShapingClass {
    pub rate: Option<Spanned<Rate>>,
    pub burst: Option<Spanned<Size>>,
    pub rate_after: Option<Spanned<Size>>,
    pub weight: Option<Spanned<u32>>,
    pub max_downloads: Option<Spanned<u32>>,
    pub max_connections: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub threads: Option<Spanned<usize>>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub grace_period: Option<Dur>,
    pub drain_delay: Option<Dur>,
    pub graceful_shutdown_timeout: Option<Dur>,
    pub upstream_keepalive_pool_size: Option<usize>,
    pub access_log: Option<bool>,
    pub access_log_format: Option<Spanned<String>>,
    pub access_log_path: Option<String>,
    pub keepalive_timeout: Option<Spanned<Dur>>,
    pub header_timeout: Option<Spanned<Dur>>,
    pub body_timeout: Option<Spanned<Dur>>,
    pub body_min_rate: Option<Spanned<Rate>>,
    pub send_timeout: Option<Spanned<Dur>>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_header_size: Option<Spanned<Size>>,
    pub max_uri_size: Option<Spanned<Size>>,
    pub merge_slashes: Option<bool>,
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
    pub http2_max_streams: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
    pub token: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub chunk_size: Option<Spanned<Size>>,
    pub max_object_size: Option<Spanned<Size>>,
    pub default_ttl: Option<Dur>,
    pub stale_if_error: Option<Dur>,
    pub heuristic_fraction: Option<Fraction>,
    pub heuristic_max: Option<Dur>,
    pub max_ranges: Option<Spanned<usize>>,
    pub max_concurrent_fills: Option<Spanned<usize>>,
    pub metadata_capacity: Option<Spanned<Size>>,
    pub response_budget: Option<Spanned<Size>>,
    pub memory: Option<RawMemory>,
    pub disk: Option<RawDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMemory {
    pub capacity: Spanned<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDisk {
    pub path: Spanned<String>,
    pub capacity: Spanned<Size>,
    pub index_capacity: Option<Spanned<Size>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub servers: Spanned<Vec<Spanned<RawServerEntry>>>,
    pub balance: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub read_timeout: Option<Spanned<Dur>>,
    pub deadline: Option<Spanned<Dur>>,
    pub min_rate: Option<Spanned<Rate>>,
    /// How often the servers written as host names are resolved again.
    pub resolve_interval: Option<Spanned<Dur>>,
    pub health_check: Option<RawHealthCheck>,
    pub circuit_breaker: Option<RawBreaker>,
    pub retry: Option<RawRetry>,
    /// `Host` sent to this group (default: the client's).
    pub host: Option<Spanned<String>>,
    /// Present: the group is HTTPS. `tls:` with nothing under it (null) is HTTPS with the
    /// defaults, not its absence.
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<Spanned<Option<RawUpstreamTls>>>,
    /// HTTP/2 to this group (offered by ALPN, HTTP/1.1 as the fallback).
    pub http2: Option<Spanned<bool>>,
}

/// Deserialize a field whose `null` is a value, not its absence (an absent field is `None`
/// through `#[serde(default)]`): `tls:` with every key under it commented out still says TLS.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub sni: Option<Spanned<String>>,
    pub verify: Option<Spanned<bool>>,
    pub ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<Dur>>,
    pub timeout: Option<Spanned<Dur>>,
    pub healthy_after: Option<Spanned<u32>>,
    pub unhealthy_after: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failure_threshold: Option<Spanned<u32>>,
    pub open_for: Option<Spanned<Dur>>,
    pub max_open_for: Option<Spanned<Dur>>,
    pub half_open_probes: Option<Spanned<u32>>,
    pub max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<Spanned<u32>>,
    pub backoff: Option<Spanned<Dur>>,
    pub max_backoff: Option<Spanned<Dur>>,
    pub budget: Option<Spanned<u32>>,
}

/// A server: `"host:port"`, `"host:port weight=N"`, or `{address: "host:port", weight: N}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawServerEntry {
    pub address: String,
    pub weight: Option<u32>,
    /// Set when the string form carried something we could not read (reported with the line).
    pub error: Option<String>,
}

impl<'de> Deserialize<'de> for RawServerEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"host:port\", \"host:port weight=N\" or {address: \"host:port\", weight: N}",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawServerEntry, E> {
                let mut words = v.split_whitespace();
                let address = words.next().unwrap_or("").to_string();
                let mut entry = RawServerEntry {
                    address,
                    weight: None,
                    error: None,
                };
                for w in words {
                    match w.strip_prefix("weight=").map(str::parse::<u32>) {
                        Some(Ok(n)) => entry.weight = Some(n),
                        _ => {
                            entry.error = Some(format!(
                                "unexpected {w:?} after the address (only `weight=N` may follow)"
                            ))
                        }
                    }
                }
                Ok(entry)
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawServerEntry, A::Error> {
                let mut address = None;
                let mut weight = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "address" => address = Some(map.next_value::<String>()?),
                        "weight" => weight = Some(map.next_value::<u32>()?),
                        other => {
                            return Err(de::Error::unknown_field(other, &["address", "weight"]))
                        }
                    }
                }
                let address = address.ok_or_else(|| de::Error::missing_field("address"))?;
                Ok(RawServerEntry {
                    address,
                    weight,
                    error: None,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
    pub cache: Option<bool>,
    pub cache_key: Option<RawCacheKey>,
    pub shaping: Option<Spanned<String>>,
    /// An upstream group (another edgeslice tier) misses go to before `upstream`.
    pub parent: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheKey {
    pub query: Spanned<RawQueryKey>,
}

/// `query: all` (default), `query: ignore`, or `query: [param, ...]` (keep only these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawQueryKey {
    All,
    Ignore,
    Keep(Vec<String>),
}

impl<'de> Deserialize<'de> for RawQueryKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawQueryKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all`, `ignore`, or a list of query parameter names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawQueryKey, E> {
                match v {
                    "all" => Ok(RawQueryKey::All),
                    "ignore" => Ok(RawQueryKey::Ignore),
                    other => Err(E::custom(format!(
                        "invalid query key mode {other:?}: use `all`, `ignore`, or a list of parameter names"
                    ))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawQueryKey, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(RawQueryKey::Keep(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `listen` entry: a bare `"host:port"` (plain HTTP/1.1), or
/// `{address, tls: {certificates, min_version}, http2, h2c}`.
#[derive(Debug)]
pub enum RawListen {
    Address(String),
    Entry(Box<RawListenEntry>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenEntry {
    pub address: Spanned<String>,
    /// `tls:` with nothing under it (null) is an error (no certificates), not a plain listener.
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<Spanned<Option<RawListenTls>>>,
    pub http2: Option<bool>,
    pub h2c: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenTls {
    pub certificates: Spanned<Vec<Spanned<RawCertificate>>>,
    pub min_version: Option<Spanned<RawTlsVersion>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// `min_version`: `"1.2"`, or a bare YAML number `1.2`; kept as written for the validator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTlsVersion(pub String);

impl<'de> Deserialize<'de> for RawTlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTlsVersion;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a TLS version: \"1.2\" or \"1.3\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTlsVersion, E> {
                Ok(RawTlsVersion(v.trim().to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawTlsVersion, E> {
                Ok(RawTlsVersion(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawTlsVersion, E> {
                Ok(RawTlsVersion(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawTlsVersion, E> {
                Ok(RawTlsVersion(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"host:port\" or {address: \"host:port\", tls: ..., http2: ..., h2c: ...}",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen::Address(v.to_string()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawListen, A::Error> {
                RawListenEntry::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|e| RawListen::Entry(Box::new(e)))
            }
        }
        d.deserialize_any(V)
    }
}
