//! The `shaping` section: client identity, the node-wide rate and the shaping classes that
//! routes name. Validated here into the types the shaper uses; errors name key path and line.

use super::schema::{RawClientKey, RawShaping};
use super::{err_at, ConfigError};
use crate::shaping::identity::{Cidr, KeySource};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ShapingSettings {
    pub client_key: KeySource,
    /// IPv6 clients are grouped by this prefix length.
    pub ipv6_prefix: u8,
    /// Node-wide cap in bytes/s shared by active clients by weight; 0 = none.
    pub total_rate: u64,
    /// Entries the client table keeps before evicting idle clients.
    pub max_clients: usize,
    pub classes: BTreeMap<String, Arc<ShapingClass>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapingClass {
    pub name: Arc<str>,
    /// Per client, bytes/s, shared by all its connections and responses; 0 = not paced.
    pub rate: u64,
    /// Bytes that may go at once after a quiet spell.
    pub burst: u64,
    /// Bytes of each response sent unpaced first.
    pub rate_after: u64,
    /// Share under `total_rate` relative to other classes.
    pub weight: u32,
    /// Concurrent responses per client; 0 = unlimited.
    pub max_downloads: u32,
    /// Concurrent connections per client; 0 = unlimited.
    pub max_connections: u32,
}

/// No shaping: no classes, no node-wide rate, the default client table (what runs without a
/// `shaping` section, so a reload can add one).
impl Default for ShapingSettings {
    fn default() -> Self {
        ShapingSettings {
            client_key: KeySource::RemoteAddr,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            total_rate: 0,
            max_clients: DEFAULT_MAX_CLIENTS,
            classes: BTreeMap::new(),
        }
    }
}

pub const DEFAULT_BURST: u64 = 64 * 1024;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;

pub(super) fn validate(raw: &Spanned<RawShaping>) -> Result<ShapingSettings, ConfigError> {
    let r = &raw.value;
    let client_key = match r.client_key.as_ref() {
        None => KeySource::RemoteAddr,
        Some(k) => match &k.value {
            RawClientKey::RemoteAddr => KeySource::RemoteAddr,
            RawClientKey::Header(name) => KeySource::Header(
                http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                    err_at(
                        "shaping.client_key.header",
                        k,
                        format!("{name:?} is not a valid header name"),
                    )
                })?,
            ),
            RawClientKey::ForwardedFor(f) => {
                let trusted = f
                    .trusted_proxies
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Cidr::parse(c).map_err(|e| {
                            err_at(
                                format!("shaping.client_key.forwarded_for.trusted_proxies[{i}]"),
                                k,
                                e,
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                KeySource::ForwardedFor { trusted }
            }
        },
    };
    let ipv6_prefix = match &r.ipv6_prefix {
        None => DEFAULT_IPV6_PREFIX,
        Some(p) if p.value > 128 => {
            return Err(err_at(
                "shaping.ipv6_prefix",
                p,
                "a prefix length: 0 to 128",
            ))
        }
        Some(p) => p.value as u8,
    };
    let max_clients = match &r.max_clients {
        None => DEFAULT_MAX_CLIENTS,
        Some(m) if m.value == 0 => {
            return Err(err_at("shaping.max_clients", m, "must be at least 1"))
        }
        Some(m) => m.value,
    };
    let mut classes = BTreeMap::new();
    if let Some(raw_classes) = &r.classes {
        for (name, c) in &raw_classes.value {
            let base = format!("shaping.classes.{name}");
            let weight = match &c.weight {
                None => 1,
                Some(w) if w.value == 0 => {
                    return Err(err_at(format!("{base}.weight"), w, "must be at least 1"))
                }
                Some(w) => w.value,
            };
            let burst = match &c.burst {
                None => DEFAULT_BURST,
                Some(b) if b.value.0 == 0 => {
                    return Err(err_at(
                        format!("{base}.burst"),
                        b,
                        "must be greater than zero",
                    ))
                }
                Some(b) => b.value.0,
            };
            classes.insert(
                name.clone(),
                Arc::new(ShapingClass {
                    name: Arc::from(name.as_str()),
                    rate: c.rate.as_ref().map_or(0, |v| v.value.0),
                    burst,
                    rate_after: c.rate_after.as_ref().map_or(0, |v| v.value.0),
                    weight,
                    max_downloads: c.max_downloads.as_ref().map_or(0, |v| v.value),
                    max_connections: c.max_connections.as_ref().map_or(0, |v| v.value),
                }),
            );
        }
    }
    Ok(ShapingSettings {
        client_key,
        ipv6_prefix,
        total_rate: r.total_rate.as_ref().map_or(0, |v| v.value.0),
        max_clients,
        classes,
    })
}
