//! Cache keys. An object is named by its route's upstream group, host and path, plus the part
//! of the query string the route keeps (`routes[].cache_key.query`). Keys never become file
//! names directly: the disk tier hashes them.
//!
//! The disk-tier entries of an object are named `"<object key>\0meta"` (its metadata) and
//! `"<object key>\0chunk\0<index>"` (its chunks). The disk tier groups entries by the part
//! before the first NUL (`cache::disk::object_of`) and evicts and removes objects whole, so
//! every entry of an object must start with the object key and a NUL, only the metadata entry
//! may be `\0meta`, and an object key never contains NUL itself (HTTP forbids NUL in hosts and
//! paths, so a request cannot produce one; if one did, its entries would only be grouped
//! wrongly, never served wrongly: entries are looked up by their full key and validator).

use crate::config::QueryKey;
use std::sync::Arc;

/// The name of a cached object; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(pub Arc<str>);

impl ObjectKey {
    /// `upstream` group name, lower-case `host`, `path`, optional `query` (without `?`).
    pub fn new(
        upstream: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
        mode: &QueryKey,
    ) -> ObjectKey {
        let q = normalize_query(query, mode);
        let key = if q.is_empty() {
            format!("{upstream}|{host}|{path}")
        } else {
            format!("{upstream}|{host}|{path}?{q}")
        };
        ObjectKey(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The disk-tier key of chunk `index` of this object.
    pub fn chunk_entry(&self, index: u64) -> String {
        format!("{}\0chunk\0{index}", self.0)
    }

    /// The disk-tier key of this object's metadata.
    pub fn meta_entry(&self) -> String {
        format!("{}\0meta", self.0)
    }
}

/// `all`: the query as sent; `ignore`: nothing; `keep`: only the listed parameters, in name
/// order (so `?b=2&a=1` and `?a=1&b=2` share an entry).
pub fn normalize_query(query: Option<&str>, mode: &QueryKey) -> String {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return String::new();
    };
    match mode {
        QueryKey::All => q.to_string(),
        QueryKey::Ignore => String::new(),
        QueryKey::Keep(names) => {
            let mut kept: Vec<&str> = q
                .split('&')
                .filter(|pair| {
                    let name = pair.split('=').next().unwrap_or("");
                    names.iter().any(|n| n == name)
                })
                .collect();
            kept.sort();
            kept.join("&")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_modes() {
        let keep = QueryKey::Keep(vec!["a".into(), "b".into()]);
        assert_eq!(normalize_query(Some("b=2&x=9&a=1"), &keep), "a=1&b=2");
        assert_eq!(normalize_query(Some("x=9"), &keep), "");
        assert_eq!(normalize_query(Some("x=9"), &QueryKey::Ignore), "");
        assert_eq!(normalize_query(Some("x=9&a=1"), &QueryKey::All), "x=9&a=1");
        assert_eq!(normalize_query(None, &QueryKey::All), "");
    }

    #[test]
    fn keys_differ_by_query_only_when_kept() {
        let k1 = ObjectKey::new("o", "h", "/p", Some("v=1"), &QueryKey::All);
        let k2 = ObjectKey::new("o", "h", "/p", Some("v=2"), &QueryKey::All);
        assert_ne!(k1, k2);
        let k3 = ObjectKey::new("o", "h", "/p", Some("v=1"), &QueryKey::Ignore);
        let k4 = ObjectKey::new("o", "h", "/p", Some("v=2"), &QueryKey::Ignore);
        assert_eq!(k3, k4);
        assert_ne!(k1.chunk_entry(1), k1.chunk_entry(2));
    }
}
