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
use crate::proxy::canonical::param_name;
pub use crate::proxy::request_line::Scheme;
use std::borrow::Cow;
use std::sync::Arc;

/// What an `https` key's host starts with. An `http` key's host has no prefix, as before HTTPS
/// existed, so objects stored then are still found. The scheme is in the key because an
/// origin may answer `http` and `https` differently (most often a redirect to `https`, which
/// served to an HTTPS client would loop); nginx (`$scheme` in its default `proxy_cache_key`),
/// ATS and Cloudflare key by it too.
pub const HTTPS_HOST_PREFIX: &str = "https://";

/// The name of a cached object; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(pub Arc<str>);

impl ObjectKey {
    /// `upstream` group name, `scheme`, lower-case `host`, `path`, optional `query` (without
    /// `?`): `upstream|host|path?query`, the host written `https://host` for `https`.
    pub fn new(
        upstream: &str,
        scheme: Scheme,
        host: &str,
        path: &str,
        query: Option<&str>,
        mode: &QueryKey,
    ) -> ObjectKey {
        let q = normalize_query(query, mode);
        let prefix = match scheme {
            Scheme::Http => "",
            Scheme::Https => HTTPS_HOST_PREFIX,
        };
        let mut key = String::with_capacity(
            upstream.len() + prefix.len() + host.len() + path.len() + q.len() + 3,
        );
        for part in [upstream, "|", prefix, host, "|", path] {
            key.push_str(part);
        }
        if !q.is_empty() {
            key.push('?');
            key.push_str(&q);
        }
        ObjectKey(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the key's allocation takes (the string and the `Arc`'s counters, rounded up to the
    /// allocator's size class): what a table holding it is charged for the key.
    pub fn memory_bytes(&self) -> u64 {
        super::tables::arc_size(self.0.len())
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

/// One version of one object: its key, its validator, and a digest of both, computed once per
/// request. Chunks are named from it ([`ObjectVersion::chunk`]), so the memory tier and the
/// fills never hash or compare strings per chunk, and a version's chunks can never be mistaken
/// for another version's.
#[derive(Debug, Clone)]
pub struct ObjectVersion {
    pub key: ObjectKey,
    pub validator: Arc<str>,
    digest: [u8; 16],
}

impl ObjectVersion {
    pub fn new(key: ObjectKey, validator: Arc<str>) -> ObjectVersion {
        let mut h = blake3::Hasher::new();
        h.update(key.as_str().as_bytes());
        // The key cannot contain NUL (it is built from a URL), so the split is unambiguous.
        h.update(&[0]);
        h.update(validator.as_bytes());
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&h.finalize().as_bytes()[..16]);
        ObjectVersion {
            key,
            validator,
            digest,
        }
    }

    /// The key of chunk `index` of this version.
    pub fn chunk(&self, index: u64) -> ChunkKey {
        ChunkKey {
            version: self.digest,
            index,
        }
    }
}

/// A chunk of one object version: the version's digest and the chunk's index. Copied, hashed
/// and compared as 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    version: [u8; 16],
    pub index: u64,
}

/// `bytes` as lower-case hex digits (request ids, variant keys), without `fmt`.
pub fn lower_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

/// The part of a (canonical) query string that is keyed, which is also exactly what a fill
/// forwards: a parameter the origin sees is always in the key. `all`: the query; `ignore`:
/// nothing; `keep`: the parameters whose name, read as applications read it (percent-decoded,
/// `+` as a space: `canonical::param_name`), is one of the listed names exactly, ordered by
/// name with repeated names kept in the order sent (so `?b=2&a=1` and `?a=1&b=2` share an
/// entry, while `?v=1&v=2` and `?v=2&v=1`, which origins read differently, do not).
pub fn normalize_query<'q>(query: Option<&'q str>, mode: &QueryKey) -> Cow<'q, str> {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return Cow::Borrowed("");
    };
    match mode {
        QueryKey::All => Cow::Borrowed(q),
        QueryKey::Ignore => Cow::Borrowed(""),
        QueryKey::Keep(names) => {
            let mut kept: Vec<(Cow<str>, &str)> = q
                .split('&')
                .filter_map(|pair| {
                    let name = param_name(pair.split('=').next().unwrap_or(""));
                    names.iter().any(|n| *n == name).then_some((name, pair))
                })
                .collect();
            // Stable: repeated names keep the order they came in.
            kept.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = String::with_capacity(q.len());
            for (i, (_, pair)) in kept.iter().enumerate() {
                if i > 0 {
                    out.push('&');
                }
                out.push_str(pair);
            }
            Cow::Owned(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_hex_matches_format() {
        let bytes: Vec<u8> = (0..=255).collect();
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(lower_hex(&bytes), want);
        assert_eq!(lower_hex(&[]), "");
    }

    #[test]
    fn kept_parameters_are_matched_as_origins_read_their_names() {
        let keep = QueryKey::Keep(vec!["v".into()]);
        // A name spelled another way is the same parameter to an origin: kept (and so
        // forwarded, in the spelling that was keyed).
        assert_eq!(normalize_query(Some("%76=EVIL"), &keep), "%76=EVIL");
        // Names that differ once decoded are other parameters: neither keyed nor forwarded.
        assert_eq!(normalize_query(Some("V=EVIL"), &keep), "");
        assert_eq!(normalize_query(Some("v%20=EVIL"), &keep), "");
        assert_eq!(normalize_query(Some("v+=EVIL"), &keep), "");
        // Repeats keep their order: origins take the first or the last.
        assert_eq!(normalize_query(Some("v=EVIL&v=1"), &keep), "v=EVIL&v=1");
        assert_eq!(normalize_query(Some("v=1&v=EVIL"), &keep), "v=1&v=EVIL");
        assert_ne!(
            ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=EVIL&v=1"), &keep),
            ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=1"), &keep)
        );
        assert_eq!(normalize_query(Some("w=1&v=2&&v"), &keep), "v=2&v");
    }

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
        let k1 = ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=1"), &QueryKey::All);
        let k2 = ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=2"), &QueryKey::All);
        assert_ne!(k1, k2);
        let k3 = ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=1"), &QueryKey::Ignore);
        let k4 = ObjectKey::new("o", Scheme::Http, "h", "/p", Some("v=2"), &QueryKey::Ignore);
        assert_eq!(k3, k4);
        assert_ne!(k1.chunk_entry(1), k1.chunk_entry(2));
    }

    #[test]
    fn keys_differ_by_scheme_and_http_keys_keep_their_earlier_form() {
        let http = ObjectKey::new("o", Scheme::Http, "h", "/p", None, &QueryKey::All);
        let https = ObjectKey::new("o", Scheme::Https, "h", "/p", None, &QueryKey::All);
        assert_ne!(http, https);
        assert_eq!(http.as_str(), "o|h|/p");
        assert_eq!(https.as_str(), "o|https://h|/p");
    }

    #[test]
    fn chunk_keys_name_one_version_and_index() {
        let k = ObjectKey::new("o", Scheme::Http, "h", "/p", None, &QueryKey::All);
        let v1 = ObjectVersion::new(k.clone(), "\"a\"".into());
        let v1_again = ObjectVersion::new(k.clone(), "\"a\"".into());
        let v2 = ObjectVersion::new(k, "\"b\"".into());
        assert_eq!(v1.chunk(3), v1_again.chunk(3));
        assert_ne!(v1.chunk(3), v1.chunk(4));
        assert_ne!(v1.chunk(3), v2.chunk(3));
        // Key and validator are not confused by where one ends and the other starts.
        let a = ObjectVersion::new(ObjectKey("ab".into()), "c".into());
        let b = ObjectVersion::new(ObjectKey("a".into()), "bc".into());
        assert_ne!(a.chunk(0), b.chunk(0));
    }
}
