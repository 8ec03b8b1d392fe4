//! The on-disk YAML schema, exactly as operators write it. Every struct denies unknown keys so a
//! misspelt key is an error, not a silent default. Values that need checks beyond their type keep
//! their source location (`Spanned`) so the validator can name the line.
//!
//! These types never leave the config module: the rest of the program sees only the validated
//! [`crate::config::Config`].

use super::units::{Dur, Size};
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
    pub listen: Option<Vec<Spanned<String>>>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub cache: RawCache,
    pub upstreams: Option<Spanned<BTreeMap<String, RawUpstream>>>,
    pub routes: Option<Spanned<Vec<RawRoute>>>,
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
    pub graceful_shutdown_timeout: Option<Dur>,
    pub upstream_keepalive_pool_size: Option<usize>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub chunk_size: Option<Spanned<Size>>,
    pub max_object_size: Option<Spanned<Size>>,
    pub default_ttl: Option<Dur>,
    pub max_ranges: Option<Spanned<usize>>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub servers: Spanned<Vec<Spanned<String>>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub read_timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
    pub cache: Option<bool>,
    pub cache_key: Option<RawCacheKey>,
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
