//! `Vary` for a shared cache (RFC 9111 §4.1): which request fields select a stored variant, and
//! the normalised key of a request's values for those fields.
//!
//! Pure and panic-free on arbitrary header bytes. It must never let two requests whose named
//! fields differ (after the documented normalisation) share a variant key: the key encoding is
//! length-prefixed and escapes every byte outside printable ASCII, so it is injective.

use http::header::VARY;
use http::HeaderMap;

/// What a response's `Vary` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No `Vary` (or only empty elements): one variant.
    None,
    /// `Vary: *` (§4.1: never matches a later request), or an element that is not a field
    /// name (which no request field could match reliably): not stored.
    Star,
    /// The named request fields, lowercase, sorted and deduplicated.
    Fields(Vec<String>),
}

/// Parse all `Vary` lines of a response: comma-separated lists with optional whitespace, field
/// names case-insensitive. `*` anywhere (in any line or position) → [`Vary::Star`]; an element
/// that is not a token (RFC 9110 §5.6.2), e.g. non-ASCII bytes, is treated like `*` (the
/// stricter reading: such a response is not stored).
pub fn parse_vary(resp_headers: &HeaderMap) -> Vary {
    let mut fields: Vec<String> = Vec::new();
    for value in resp_headers.get_all(VARY) {
        for element in value.as_bytes().split(|&b| b == b',') {
            let element = trim_ows(element);
            if element.is_empty() {
                continue;
            }
            if element == b"*" || !element.iter().copied().all(is_tchar) {
                return Vary::Star;
            }
            // All tchars are ASCII, so this is valid UTF-8.
            fields.push(String::from_utf8_lossy(element).to_ascii_lowercase());
        }
    }
    if fields.is_empty() {
        return Vary::None;
    }
    fields.sort();
    fields.dedup();
    Vary::Fields(fields)
}

/// The variant key of a request for the response's `Vary` fields (in the order given; pass
/// [`Vary::Fields`] as is for a canonical order).
///
/// Each field's value is normalised (RFC 9111 §4.1 allows normalising "in a way that is known
/// to have identical semantics"):
///
/// * all lines of the field are joined with `", "` into one comma-separated list (the
///   combined field value, RFC 9110 §5.3); each element (split on commas outside
///   quoted strings) is trimmed of whitespace, runs of SP/HTAB outside quoted strings become
///   one space, and empty elements are dropped; elements are joined with `", "`;
/// * `accept-encoding` elements are also lowercased and sorted (codings and `q` are
///   case-insensitive and the list is unordered);
/// * an absent field is distinct from a present, empty one.
///
/// Encoding, per field: `<name>=<len>:<value>;` when present, `<name>!;` when absent, where
/// `<value>` has `%` and every byte outside printable ASCII written as `%XX` and `<len>` is the
/// byte length of that escaped value. Field names are tokens (no `=`, `;`) in practice; a name
/// is escaped the same way and length-prefixed too, so the key is injective for any input.
pub fn variant_key(fields: &[String], req_headers: &HeaderMap) -> String {
    let mut key = String::new();
    for name in fields {
        let name_lc = name.to_ascii_lowercase();
        let escaped_name = escape(name_lc.as_bytes());
        key.push_str(&format!("{}:{}", escaped_name.len(), escaped_name));
        let lines: Vec<&[u8]> = req_headers
            .get_all(name_lc.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if lines.is_empty() {
            key.push_str("!;");
            continue;
        }
        // The combined field value (RFC 9110 §5.3), so a quoted string may span lines.
        let mut elements = split_elements(&lines.join(&b", "[..]));
        if name_lc == "accept-encoding" {
            for e in &mut elements {
                e.make_ascii_lowercase();
            }
            elements.sort();
        }
        let value = escape(&elements.join(&b", "[..]));
        key.push_str(&format!("={}:{};", value.len(), value));
    }
    key
}

/// Split one field line into normalised list elements (see [`variant_key`]).
fn split_elements(line: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    for &b in line {
        if quoted {
            cur.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
            continue;
        }
        match b {
            b',' => out.push(std::mem::take(&mut cur)),
            b' ' | b'\t' => {
                if cur.last() != Some(&b' ') {
                    cur.push(b' ');
                }
            }
            b'"' => {
                quoted = true;
                cur.push(b);
            }
            _ => cur.push(b),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|e| trim_ows(&e).to_vec())
        .filter(|e| !e.is_empty())
        .collect()
}

/// `%` and bytes outside printable ASCII as `%XX`.
fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn fields(names: &[&str]) -> Vary {
        Vary::Fields(names.iter().map(|s| s.to_string()).collect())
    }

    /// RFC 9111 §4.1 and RFC 9110 §12.5.5: the Vary field value.
    #[test]
    fn rfc9110_12_5_5_parse_vary() {
        let cases: &[(&[&str], Vary)] = &[
            (&[], Vary::None),
            (&[""], Vary::None),
            (&[" , ,"], Vary::None),
            (&["Accept-Encoding"], fields(&["accept-encoding"])),
            (
                &["User-Agent, accept-encoding", "ACCEPT-ENCODING ,Accept"],
                fields(&["accept", "accept-encoding", "user-agent"]),
            ),
            (&["*"], Vary::Star),
            (&["Accept, *"], Vary::Star),
            (&["Accept", " * "], Vary::Star),
            (&["Accept Language"], Vary::Star),
            (&["\"accept\""], Vary::Star),
        ];
        for (lines, want) in cases {
            let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("vary", *l)).collect();
            assert_eq!(&parse_vary(&hm(&pairs)), want, "{lines:?}");
        }
        let mut h = HeaderMap::new();
        h.append(VARY, HeaderValue::from_bytes(b"accept, \xffx").unwrap());
        assert_eq!(parse_vary(&h), Vary::Star, "non-token element");
    }

    fn key(names: &[&str], req: &[(&str, &str)]) -> String {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        variant_key(&names, &hm(req))
    }

    /// RFC 9111 §4.1: a stored variant matches when the nominated fields match after
    /// normalisation.
    #[test]
    fn rfc9111_4_1_variant_key() {
        let f = &["accept", "accept-language"];
        // Same semantics, same key: lines vs commas, OWS, whitespace runs, empty elements.
        let a = key(
            f,
            &[
                ("accept", "text/html,  application/json"),
                ("accept-language", "en"),
            ],
        );
        let b = key(
            f,
            &[
                ("accept", "text/html"),
                ("accept", " application/json ,"),
                ("Accept-Language", "en"),
            ],
        );
        assert_eq!(a, b);
        assert_eq!(
            key(&["x"], &[("x", "a  \t b")]),
            key(&["x"], &[("x", "a b")])
        );
        // Order of list elements matters (not a known-unordered field).
        assert_ne!(
            key(&["accept"], &[("accept", "a, b")]),
            key(&["accept"], &[("accept", "b, a")])
        );
        // Absent differs from empty; empty lines are an empty value.
        assert_ne!(key(&["x"], &[]), key(&["x"], &[("x", "")]));
        assert_eq!(key(&["x"], &[("x", "")]), key(&["x"], &[("x", " , ")]));
        // Quoted strings keep their commas and spaces.
        assert_ne!(
            key(&["x"], &[("x", "\"a,b\"")]),
            key(&["x"], &[("x", "\"a, b\"")])
        );
        assert_ne!(
            key(&["x"], &[("x", "\"a  b\"")]),
            key(&["x"], &[("x", "\"a b\"")])
        );
        // Values that could be mistaken for the encoding do not collide.
        assert_ne!(
            key(&["a", "b"], &[("a", "1;b=1:2;")]),
            key(&["a", "b"], &[("a", "1"), ("b", "2")])
        );
        // The encoding itself.
        assert_eq!(key(&["x", "y"], &[("x", "a, b")]), "1:x=4:a, b;1:y!;");
        assert_eq!(key(&["X"], &[("x", "1")]), key(&["x"], &[("x", "1")]));
    }

    /// Accept-Encoding (RFC 9110 §12.5.3): codings are case-insensitive and the list is
    /// unordered, so elements are lowercased and sorted.
    #[test]
    fn rfc9110_12_5_3_accept_encoding_normalised() {
        let f = &["accept-encoding"];
        assert_eq!(
            key(f, &[("accept-encoding", "GZIP, br")]),
            key(f, &[("accept-encoding", "br"), ("accept-encoding", "gzip")])
        );
        assert_ne!(
            key(f, &[("accept-encoding", "gzip")]),
            key(f, &[("accept-encoding", "gzip, br")])
        );
        assert_ne!(key(f, &[]), key(f, &[("accept-encoding", "")]));
    }

    fn raw_value() -> impl Strategy<Value = HeaderValue> {
        proptest::collection::vec(
            prop_oneof![
                Just(b' '),
                Just(b','),
                Just(b'"'),
                Just(b'\\'),
                Just(b'\t'),
                Just(b'a'),
                Just(b'%'),
                Just(b'='),
                Just(b';'),
                Just(b':'),
                0x80u8..=0xff,
                0x20u8..0x7f,
            ],
            0..24,
        )
        .prop_map(|b| HeaderValue::from_bytes(&b).unwrap())
    }

    fn name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            Just(HeaderName::from_static("accept")),
            Just(HeaderName::from_static("accept-encoding")),
            Just(HeaderName::from_static("x")),
        ]
    }

    /// The normalised elements of one field, as variant_key defines them (None = absent).
    fn normalised(h: &HeaderMap, n: &str) -> Option<Vec<Vec<u8>>> {
        let lines: Vec<&[u8]> = h.get_all(n).iter().map(|v| v.as_bytes()).collect();
        if lines.is_empty() {
            return None;
        }
        let mut e = split_elements(&lines.join(&b", "[..]));
        if n == "accept-encoding" {
            e.iter_mut().for_each(|x| x.make_ascii_lowercase());
            e.sort();
        }
        Some(e)
    }

    proptest! {
        /// RFC 9111 §4.1: two requests share a key exactly when their normalised values of the
        /// nominated fields are equal (no collisions), and nothing panics.
        #[test]
        fn key_injective(
            a in proptest::collection::vec((name(), raw_value()), 0..5),
            b in proptest::collection::vec((name(), raw_value()), 0..5),
            vary in proptest::collection::vec(raw_value(), 0..3),
        ) {
            let build = |pairs: Vec<(HeaderName, HeaderValue)>| {
                let mut h = HeaderMap::new();
                for (n, v) in pairs {
                    h.append(n, v);
                }
                h
            };
            let (ha, hb) = (build(a), build(b));
            let mut resp = HeaderMap::new();
            for v in vary {
                resp.append(VARY, v);
            }
            let _ = parse_vary(&resp);
            let names: Vec<String> = ["accept", "accept-encoding", "x"].iter().map(|s| s.to_string()).collect();
            let joined = |h: &HeaderMap, n: &str| normalised(h, n).map(|e| e.join(&b", "[..]));
            let same = names.iter().all(|n| joined(&ha, n) == joined(&hb, n));
            prop_assert_eq!(variant_key(&names, &ha) == variant_key(&names, &hb), same);
        }
    }
}
