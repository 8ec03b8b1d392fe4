//! What an admin purge names (`POST /purge?path=P[&host=H][&prefix=1][&soft=1]` or
//! `?tag=T`), parsed from the query string, and whether a stored object is one of them.
//! Pure: no I/O, no clock; [`ChunkCache::purge`](super::store::ChunkCache::purge) does the
//! work. Nothing here may panic on what an admin sends or a cache file holds.
//!
//! Matching reads what every stored object already carries, so objects stored before purge
//! existed are found too:
//! * the path is the one in the object's key (see `cache::key`: `upstream|host|path?query`,
//!   the host `https://host` for HTTPS requests, Vary variants `...#vary-...`): every query
//!   string, every variant, both schemes and every upstream of a path match. The `path` parameter is a URL path, as in a request line or a log; once the
//!   query string's own encoding is undone, it and the stored path are both compared
//!   percent-decoded. So `path=/a%20b`, `path=/a b` and `path=%2Fa%2520b` (the stored path
//!   encoded as a parameter) all name the object requested as `/a%20b`.
//! * tags come from the stored response headers: `Surrogate-Key` (space-separated, Fastly)
//!   and `Cache-Tag` (comma-separated, Cloudflare), compared ignoring ASCII case.

use super::meta::ObjectMeta;
use std::borrow::Cow;

/// Which objects a purge names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Objects whose percent-decoded path is exactly this.
    Path(Vec<u8>),
    /// Objects whose percent-decoded path starts with this.
    Prefix(Vec<u8>),
    /// Objects carrying this tag.
    Tag(String),
}

/// One purge request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purge {
    pub selector: Selector,
    /// Only objects of this host (lower case, no port).
    pub host: Option<String>,
    /// Expire the objects (keep them for stale-if-error) instead of deleting them.
    pub soft: bool,
}

impl Purge {
    /// Parse the query string of `POST /purge`. The error names the parameter at fault, for a
    /// 400 answer.
    pub fn from_query(query: Option<&str>) -> Result<Purge, String> {
        let (mut path, mut tag, mut host, mut prefix, mut soft) = (None, None, None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "path" => &mut path,
                "tag" => &mut tag,
                "host" => &mut host,
                "prefix" => &mut prefix,
                "soft" => &mut soft,
                _ => {
                    let shown: String = name.chars().take(64).collect();
                    return Err(format!(
                        "unknown parameter {shown:?} (use path, host, prefix, tag, soft)"
                    ));
                }
            };
            if slot.is_some() {
                return Err(format!("{name}: given twice"));
            }
            let decoded =
                percent_decode(value).ok_or_else(|| format!("{name}: bad percent-encoding"))?;
            *slot = Some(decoded);
        }
        let flag = |name: &str, v: Option<Vec<u8>>| match v.as_deref() {
            None | Some(b"0") | Some(b"false") => Ok(false),
            Some(b"1") | Some(b"true") => Ok(true),
            Some(_) => Err(format!("{name}: use 1 or 0")),
        };
        let prefix = flag("prefix", prefix)?;
        let soft = flag("soft", soft)?;
        let text = |name: &str, v: Vec<u8>| {
            String::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("{name}: must be non-empty UTF-8"))
        };
        let host = host
            .map(|h| text("host", h).map(|h| host_without_port(&h)))
            .transpose()?;
        let selector = match (path, tag) {
            (Some(_), Some(_)) => return Err("path and tag: give one of them".into()),
            (None, None) => return Err("path or tag required".into()),
            (Some(p), None) => {
                if p.first() != Some(&b'/') {
                    return Err("path: must start with /".into());
                }
                let p = decode_lossy(&p).into_owned();
                if prefix {
                    Selector::Prefix(p)
                } else {
                    Selector::Path(p)
                }
            }
            (None, Some(t)) => {
                if prefix {
                    return Err("prefix: only with path".into());
                }
                let t = text("tag", t)?;
                if t.contains(|c: char| c == ',' || c.is_ascii_whitespace()) {
                    return Err("tag: one tag, without spaces or commas".into());
                }
                Selector::Tag(t)
            }
        };
        Ok(Purge {
            selector,
            host,
            soft,
        })
    }

    /// Whether the object stored under `key` (an `ObjectKey` string) with `meta` is named.
    pub fn matches(&self, key: &str, meta: &ObjectMeta) -> bool {
        let Some(parts) = KeyParts::of(key) else {
            return false;
        };
        if let Some(h) = &self.host {
            // Keys carry a port only when it is not the default one; a purge by host names
            // the host on every port.
            if !host_name(parts.host).eq_ignore_ascii_case(h) {
                return false;
            }
        }
        match &self.selector {
            Selector::Path(p) => decode_lossy(parts.path.as_bytes()).as_ref() == p.as_slice(),
            Selector::Prefix(p) => decode_lossy(parts.path.as_bytes()).starts_with(p),
            Selector::Tag(t) => tags(&meta.headers).any(|x| x.eq_ignore_ascii_case(t)),
        }
    }

    /// For the log line: what was asked.
    pub fn describe(&self) -> String {
        let what = match &self.selector {
            Selector::Path(p) => format!("path={}", String::from_utf8_lossy(p)),
            Selector::Prefix(p) => format!("prefix={}", String::from_utf8_lossy(p)),
            Selector::Tag(t) => format!("tag={t}"),
        };
        let host = self
            .host
            .as_deref()
            .map(|h| format!(" host={h}"))
            .unwrap_or_default();
        let mode = if self.soft { "soft" } else { "hard" };
        format!("{what}{host} ({mode})")
    }
}

/// A key's host without its port (`example.com:8080` → `example.com`, `[::1]:81` → `[::1]`).
fn host_name(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') && !authority[..i].contains(':') => {
            &authority[..i]
        }
        Some(i) if authority.starts_with('[') && authority[..i].ends_with(']') => &authority[..i],
        _ => authority,
    }
}

/// The parts of an object key (`upstream|host|path[?query][#vary-...]`) a purge looks at.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub upstream: &'a str,
    pub host: &'a str,
    pub path: &'a str,
}

impl<'a> KeyParts<'a> {
    /// `None` for a key not of that shape. A request path never holds `?` or `#` (the query
    /// and fragment are apart in a URI), so both end it unambiguously.
    pub fn of(key: &'a str) -> Option<KeyParts<'a>> {
        let (upstream, rest) = key.split_once('|')?;
        let (host, rest) = rest.split_once('|')?;
        // Both schemes of a host are its objects.
        let host = host
            .strip_prefix(super::key::HTTPS_HOST_PREFIX)
            .unwrap_or(host);
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        Some(KeyParts {
            upstream,
            host,
            path: &rest[..end],
        })
    }
}

/// The tags of a stored response: every `Surrogate-Key` (space-separated) and `Cache-Tag`
/// (comma-separated) value, split, empty ones skipped.
pub fn tags(headers: &[(String, String)]) -> impl Iterator<Item = &str> {
    headers.iter().flat_map(|(name, value)| {
        let parts: Box<dyn Iterator<Item = &str>> = if name.eq_ignore_ascii_case("surrogate-key") {
            Box::new(value.split_ascii_whitespace())
        } else if name.eq_ignore_ascii_case("cache-tag") {
            Box::new(value.split(',').map(str::trim).filter(|t| !t.is_empty()))
        } else {
            Box::new(std::iter::empty())
        };
        parts
    })
}

/// The host as request keys hold it: lower case, without a port (`[v6]` kept whole).
fn host_without_port(h: &str) -> String {
    let h = h.trim();
    let host = if h.starts_with('[') {
        h.split_inclusive(']').next().unwrap_or(h)
    } else {
        h.split(':').next().unwrap_or(h)
    };
    host.to_ascii_lowercase()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 percent-decoding; `None` for a `%` not followed by two hex digits. `+` stays `+`
/// (this is a URI, not a form).
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A path decoded for comparison; a malformed escape stays as it is.
fn decode_lossy(b: &[u8]) -> Cow<'_, [u8]> {
    if !b.contains(&b'%') {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| Some((hex(*b.get(i + 1)?)? << 4) | hex(*b.get(i + 2)?)?))
            .flatten();
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn meta(headers: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            status: 200,
            size: 1,
            validator: "\"v\"".into(),
            etag: Some("\"v\"".into()),
            last_modified: None,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            stored_at: UNIX_EPOCH,
            initial_age: 0,
            fresh_until: UNIX_EPOCH + Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            stale_while_revalidate: Duration::ZERO,
            wire: Default::default(),
        }
    }

    fn purge(q: &str) -> Purge {
        Purge::from_query(Some(q)).unwrap()
    }

    #[test]
    fn tag_headers_split_as_fastly_and_cloudflare_do() {
        let m = meta(&[
            ("surrogate-key", "  video  season-1\tep-3 "),
            ("content-type", "a, b"),
            ("Cache-Tag", "red, blue ,,green"),
            ("cache-tag", "late"),
        ]);
        let got: Vec<&str> = tags(&m.headers).collect();
        assert_eq!(
            got,
            ["video", "season-1", "ep-3", "red", "blue", "green", "late"]
        );
        assert_eq!(tags(&meta(&[("etag", "x")]).headers).count(), 0);
    }

    #[test]
    fn query_parsing() {
        assert_eq!(
            purge("path=/a/b"),
            Purge {
                selector: Selector::Path(b"/a/b".to_vec()),
                host: None,
                soft: false
            }
        );
        assert_eq!(
            purge("path=%2Fa%20b&prefix=1&host=Example.COM:8080&soft=1"),
            Purge {
                selector: Selector::Prefix(b"/a b".to_vec()),
                host: Some("example.com".into()),
                soft: true
            }
        );
        assert_eq!(purge("tag=s%C3%A9rie&prefix=0").selector, {
            Selector::Tag("série".into())
        });
        assert_eq!(
            purge("path=/a+b").selector,
            Selector::Path(b"/a+b".to_vec())
        );
        assert_eq!(purge("host=[::1]:80&path=/").host.as_deref(), Some("[::1]"));
    }

    #[test]
    fn key_hosts_lose_their_port_for_matching() {
        assert_eq!(host_name("example.com:8080"), "example.com");
        assert_eq!(host_name("example.com"), "example.com");
        assert_eq!(host_name("[::1]:81"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("10.0.0.1:81"), "10.0.0.1");
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        let err = |q: Option<&str>| Purge::from_query(q).unwrap_err();
        assert!(err(None).contains("path or tag"));
        assert!(err(Some("")).contains("path or tag"));
        assert!(err(Some("host=a")).contains("path or tag"));
        assert!(err(Some("path=/a&tag=b")).contains("give one"));
        assert!(err(Some("path=a")).starts_with("path:"));
        assert!(err(Some("path=%2")).starts_with("path:"));
        assert!(err(Some("path=%zz")).starts_with("path:"));
        assert!(err(Some("path=/a&path=/b")).starts_with("path:"));
        assert!(err(Some("path=/a&soft=yes")).starts_with("soft:"));
        assert!(err(Some("path=/a&prefix=2")).starts_with("prefix:"));
        assert!(err(Some("tag=a&prefix=1")).starts_with("prefix:"));
        assert!(err(Some("tag=")).starts_with("tag:"));
        assert!(err(Some("tag=a%20b")).starts_with("tag:"));
        assert!(err(Some("tag=a,b")).starts_with("tag:"));
        assert!(err(Some("tag=%FF")).starts_with("tag:"));
        assert!(err(Some("path=/&host=")).starts_with("host:"));
        assert!(err(Some("path=/&paht=/x")).contains("\"paht\""));
    }

    #[test]
    fn key_parts() {
        let p = KeyParts::of("origin|example.com|/v/a.ts?x=1#vary-1f-abc").unwrap();
        assert_eq!(
            p,
            KeyParts {
                upstream: "origin",
                host: "example.com",
                path: "/v/a.ts"
            }
        );
        assert_eq!(KeyParts::of("o|h|/p").unwrap().path, "/p");
        assert_eq!(KeyParts::of("o|h|/p#vary-1-2").unwrap().path, "/p");
        assert_eq!(KeyParts::of("o|h").map(|p| p.path), None);
    }

    #[test]
    fn path_prefix_host_and_tag_matching() {
        let plain = meta(&[]);
        let by_path = purge("path=/v/a.ts");
        assert!(by_path.matches("o|h|/v/a.ts", &plain));
        assert!(by_path.matches("o|h|/v/a.ts?q=1", &plain), "any query");
        assert!(
            by_path.matches("o|h|/v/a.ts#vary-7-ab", &plain),
            "any variant"
        );
        assert!(
            by_path.matches("other|h2|/v/a.ts", &plain),
            "any upstream and host"
        );
        assert!(!by_path.matches("o|h|/v/a.tsx", &plain));
        assert!(!by_path.matches("o|h|/v/a", &plain));
        assert!(!by_path.matches("garbage", &plain));

        // As typed, and as a script encodes the stored path into a parameter.
        for q in [
            "path=/v/a%20b.ts",
            "path=%2Fv%2Fa%2520b.ts",
            "path=/v/a b.ts",
        ] {
            assert!(purge(q).matches("o|h|/v/a%20b.ts", &plain), "{q}");
            assert!(purge(q).matches("o|h|/v/a b.ts", &plain), "{q}");
            assert!(!purge(q).matches("o|h|/v/a%2520b.ts", &plain), "{q}");
        }
        assert!(purge("path=/100%2525").matches("o|h|/100%25", &plain));
        assert!(purge("path=/100%25").matches("o|h|/100%25", &plain));
        assert!(
            purge("path=/x%25zz").matches("o|h|/x%zz", &plain),
            "bad escapes kept"
        );

        let prefix = purge("path=/v/&prefix=1");
        assert!(prefix.matches("o|h|/v/a.ts", &plain));
        assert!(prefix.matches("o|h|/v/", &plain));
        assert!(!prefix.matches("o|h|/v", &plain));
        assert!(!prefix.matches("o|h|/w/v/a", &plain));
        assert!(
            !prefix.matches("o|h|/w?p=/v/", &plain),
            "the query is not the path"
        );

        let hosted = purge("path=/v/a.ts&host=Example.com");
        assert!(hosted.matches("o|example.com|/v/a.ts", &plain));
        assert!(!hosted.matches("o|other.com|/v/a.ts", &plain));
        // Both schemes of the host (an HTTPS request's key writes its host `https://host`).
        assert!(hosted.matches("o|https://example.com|/v/a.ts", &plain));
        assert!(hosted.matches("o|https://example.com:8443|/v/a.ts", &plain));
        assert!(!hosted.matches("o|https://other.com|/v/a.ts", &plain));
        assert!(by_path.matches("o|https://h|/v/a.ts", &plain));

        let tagged = meta(&[("surrogate-key", "Video ep-3"), ("cache-tag", "red,blue")]);
        assert!(
            purge("tag=video").matches("o|h|/x", &tagged),
            "case ignored"
        );
        assert!(purge("tag=ep-3").matches("o|h|/x", &tagged));
        assert!(purge("tag=blue").matches("o|h|/x", &tagged));
        assert!(
            !purge("tag=ep").matches("o|h|/x", &tagged),
            "whole tags only"
        );
        assert!(!purge("tag=red").matches("o|h|/x", &plain));
        assert!(!purge("tag=red&host=a").matches("o|b|/x", &tagged));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2fb%2F%41").unwrap(), b"a/b/A");
        assert_eq!(percent_decode("%").as_deref(), None);
        assert_eq!(percent_decode("%4").as_deref(), None);
        assert_eq!(percent_decode("%g0").as_deref(), None);
        assert_eq!(decode_lossy(b"/a%2").as_ref(), b"/a%2");
        assert_eq!(decode_lossy(b"/a%20%zz").as_ref(), b"/a %zz");
    }

    proptest! {
        #[test]
        fn parsing_and_matching_never_panic(q in ".{0,80}", key in ".{0,80}") {
            if let Ok(p) = Purge::from_query(Some(&q)) {
                let _ = p.matches(&key, &meta(&[("surrogate-key", &q)]));
                let _ = p.describe();
            }
            let _ = decode_lossy(key.as_bytes());
        }
    }
}
