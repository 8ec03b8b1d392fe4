//! Canonical forms of the request's host, path and query: what routing, the cache key, shaping
//! and every origin request (fills and pass-through alike) see. One spelling of a resource is
//! one route and one cache object; what is forwarded is what was keyed.
//!
//! - **Host** (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name of letters, digits, `-`, `_` and
//!   dots, an IPv4 address or a bracketed IPv6 literal, then an optional port of digits. Case is
//!   folded, one trailing dot and a default port are dropped (`Example.COM.:80` →
//!   `example.com`): the scheme's, and the port the request arrived on (a client of a listener
//!   on `:8080` names it `host:8080`; it is the same site as `host`, and one object). Anything else (`a:b:c`, `x evil`, `h:port`, `a..b`, percent signs, non-ASCII)
//!   is refused: the caller answers 400.
//! - **Path** (RFC 3986 §6.2.2): percent-encoded unreserved characters and `%2F` are decoded,
//!   other escapes get upper-case hex digits, bytes that may not appear raw are escaped, runs of
//!   `/` become one (when `merge_slashes`), and `.`/`..` segments are resolved, never above the
//!   root. A malformed escape (`%zz`) or an encoded NUL is refused. `\` is not a separator
//!   (origins on Linux do not treat it as one) and `;` parameters are left as they are.
//! - **Query**: escapes of unreserved characters decoded, hex upper-cased, raw bytes outside the
//!   query set escaped; `+`, `&`, `=` and `;` are left as they are. A malformed escape is kept
//!   as sent (query strings carry many home-made encodings).
//!
//! Pure functions, no I/O; each borrows its input back when it is already canonical, so a
//! well-formed request costs a scan and no allocation.

use std::borrow::Cow;

/// A request's host, canonical: the name routes match, and the authority keys and origin
/// requests carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Lower case, without trailing dot or port (`example.com`, `10.0.0.1`, `[2001:db8::1]`).
    pub name: String,
    /// The port, when it is not the scheme's default.
    pub port: Option<u16>,
}

impl Host {
    /// `name[:port]`: the `Host` field sent to origins and the host part of cache keys.
    pub fn authority(&self) -> Cow<'_, str> {
        match self.port {
            None => Cow::Borrowed(&self.name),
            Some(p) => Cow::Owned(format!("{}:{p}", self.name)),
        }
    }
}

/// Why a host was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    Empty,
    /// A character a host name may not contain (space, `%`, `@`, non-ASCII, ...).
    Char,
    /// An empty label (`a..b`, `.a`) or a name over 253 characters / a label over 63.
    Label,
    /// A bracketed literal that is not an IPv6 address.
    Literal,
    /// A port that is not 1–65535 in digits.
    Port,
}

/// Parse and normalise a `Host` field value (or an absolute-form authority); a port among
/// `default_ports` is dropped.
pub fn host(raw: &[u8], default_ports: &[u16]) -> Result<Host, BadHost> {
    let raw = trim_ows(raw);
    if raw.is_empty() {
        return Err(BadHost::Empty);
    }
    let (name, rest) = if raw[0] == b'[' {
        let end = raw
            .iter()
            .position(|&b| b == b']')
            .ok_or(BadHost::Literal)?;
        let inner = std::str::from_utf8(&raw[1..end]).map_err(|_| BadHost::Literal)?;
        let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| BadHost::Literal)?;
        (format!("[{ip}]"), &raw[end + 1..])
    } else {
        let end = raw.iter().position(|&b| b == b':').unwrap_or(raw.len());
        (reg_name(&raw[..end])?, &raw[end..])
    };
    let port = match rest {
        [] | [b':'] => None,
        [b':', digits @ ..] => {
            if digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(BadHost::Port);
            }
            let p: u32 = digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'));
            match u16::try_from(p) {
                Ok(0) | Err(_) => return Err(BadHost::Port),
                Ok(p) if default_ports.contains(&p) => None,
                Ok(p) => Some(p),
            }
        }
        _ => return Err(BadHost::Char),
    };
    Ok(Host { name, port })
}

/// A reg-name (or IPv4 address), lower-cased, without one trailing dot.
fn reg_name(raw: &[u8]) -> Result<String, BadHost> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() {
        return Err(BadHost::Empty);
    }
    if name.len() > 253 {
        return Err(BadHost::Label);
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 {
            return Err(BadHost::Label);
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(BadHost::Char);
        }
    }
    // Only ASCII letters, digits, '-', '_' and '.' are left: valid UTF-8.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// `%` not followed by two hex digits.
    Escape,
    /// `%00`.
    Nul,
}

/// RFC 3986 unreserved characters.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters that may appear raw in a path segment (pchar less `%`) or as `/`.
fn path_char(b: u8) -> bool {
    unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
        || b == b'/'
}

/// Characters that may appear raw in a query (pchar, `/`, `?`) less `%`.
fn query_char(b: u8) -> bool {
    path_char(b) || b == b'?'
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
}

/// Percent-decode what `decode` says may be decoded, upper-case the hex of other escapes and
/// escape bytes `raw_ok` refuses. `strict`: a malformed escape or `%00` is an error; otherwise
/// a malformed `%` is escaped itself (`%25`), so the result is still well-formed.
fn canonical_escapes(
    input: &[u8],
    decode: fn(u8) -> bool,
    raw_ok: fn(u8) -> bool,
    strict: bool,
) -> Result<Vec<u8>, BadPath> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex_val);
            let lo = input.get(i + 2).copied().and_then(hex_val);
            match (hi, lo) {
                (Some(h), Some(l)) => {
                    let v = h << 4 | l;
                    if v == 0 && strict {
                        return Err(BadPath::Nul);
                    }
                    if decode(v) {
                        out.push(v);
                    } else {
                        push_escaped(&mut out, v);
                    }
                    i += 3;
                }
                _ if strict => return Err(BadPath::Escape),
                _ => {
                    push_escaped(&mut out, b'%');
                    i += 1;
                }
            }
            continue;
        }
        if raw_ok(b) {
            out.push(b);
        } else {
            push_escaped(&mut out, b);
        }
        i += 1;
    }
    Ok(out)
}

/// Whether `path` is canonical already (the common case: no escapes, no empty, `.` or `..`
/// segments, only raw-allowed bytes).
fn path_is_canonical(path: &[u8], merge_slashes: bool) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    let last = rest.iter().filter(|&&b| b == b'/').count();
    for (i, seg) in rest.split(|&b| b == b'/').enumerate() {
        // An empty segment is a run of slashes, except the last (a trailing slash).
        if seg == b"." || seg == b".." || (merge_slashes && seg.is_empty() && i != last) {
            return false;
        }
    }
    path.iter().all(|&b| path_char(b))
}

/// The canonical form of a request path (see the module doc). The result starts with `/`.
pub fn path(raw: &[u8], merge_slashes: bool) -> Result<Cow<'_, str>, BadPath> {
    if path_is_canonical(raw, merge_slashes) {
        // Only ASCII path characters: valid UTF-8.
        if let Ok(s) = std::str::from_utf8(raw) {
            return Ok(Cow::Borrowed(s));
        }
    }
    // Unreserved characters and `/` decoded: `%2F` is a separator here as it is for the
    // common origins (nginx, Python's http.server, object stores), so a route cannot be
    // stepped around by escaping one.
    let decoded = canonical_escapes(raw, |b| unreserved(b) || b == b'/', path_char, true)?;
    let mut segments: Vec<&[u8]> = Vec::new();
    let body = decoded.strip_prefix(b"/").unwrap_or(&decoded);
    let parts: Vec<&[u8]> = body.split(|&b| b == b'/').collect();
    let last = parts.len().saturating_sub(1);
    // Whether the result ends with `/` (a directory): a trailing empty, `.` or `..` segment.
    let mut trailing_slash = false;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            b"." => trailing_slash = i == last,
            b".." => {
                segments.pop();
                trailing_slash = i == last;
            }
            b"" if merge_slashes || i == last => trailing_slash = i == last,
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    // Only path characters and `%XX` escapes remain: ASCII.
    Ok(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

/// The canonical form of a query string (without `?`): see the module doc.
pub fn query(raw: &str) -> Cow<'_, str> {
    let canonical = raw.bytes().all(query_char);
    if canonical {
        return Cow::Borrowed(raw);
    }
    match canonical_escapes(raw.as_bytes(), unreserved, query_char, false) {
        // Only query characters and escapes remain: ASCII.
        Ok(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
        // Not strict: cannot fail; keep the query as sent if it ever did.
        Err(_) => Cow::Borrowed(raw),
    }
}

/// A query parameter's name as applications read it: percent-decoded, `+` as a space.
/// Undecodable bytes are kept as they are.
pub fn param_name(raw: &str) -> Cow<'_, str> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                b.get(i + 1).copied().and_then(hex_val),
                b.get(i + 2).copied().and_then(hex_val),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Result<(String, Option<u16>), BadHost> {
        host(s.as_bytes(), &[80]).map(|h| (h.name, h.port))
    }

    #[test]
    fn hosts_are_folded_and_default_ports_dropped() {
        assert_eq!(
            h("Media.Example.COM"),
            Ok(("media.example.com".into(), None))
        );
        assert_eq!(
            h("media.example.com."),
            Ok(("media.example.com".into(), None))
        );
        assert_eq!(
            h("media.example.com:80"),
            Ok(("media.example.com".into(), None))
        );
        assert_eq!(
            h("media.example.com.:80"),
            Ok(("media.example.com".into(), None))
        );
        assert_eq!(
            h("media.example.com:"),
            Ok(("media.example.com".into(), None))
        );
        assert_eq!(
            h("media.example.com:8080"),
            Ok(("media.example.com".into(), Some(8080)))
        );
        assert_eq!(
            h("media.example.com:08080"),
            Ok(("media.example.com".into(), Some(8080)))
        );
        assert_eq!(h("10.0.0.1:81"), Ok(("10.0.0.1".into(), Some(81))));
        assert_eq!(h("[2001:DB8::1]:80"), Ok(("[2001:db8::1]".into(), None)));
        assert_eq!(
            h("[2001:db8:0::1]:443"),
            Ok(("[2001:db8::1]".into(), Some(443)))
        );
        assert_eq!(h("in_ternal-host"), Ok(("in_ternal-host".into(), None)));
        assert_eq!(host(b"a.b:443", &[443]).map(|h| h.port), Ok(None));
        // The port the request arrived on is a default too.
        assert_eq!(host(b"a.b:8080", &[80, 8080]).map(|h| h.port), Ok(None));
        assert_eq!(
            host(b"a.b:8081", &[80, 8080]).map(|h| h.port),
            Ok(Some(8081))
        );
    }

    #[test]
    fn bad_hosts_are_refused() {
        for bad in [
            "",
            " ",
            "www.example.com:evil.net",
            "x evil",
            "a..b",
            ".a",
            "..",
            "a@b",
            "a%2eb",
            "a/b",
            "a\\b",
            "h:port",
            "h:0",
            "h:65536",
            "h:123456",
            "h:-1",
            "h:80:80",
            "[::1",
            "[nothost]",
            "[::1]x",
            "[::1]:x",
            "caf\u{e9}.fr",
            "a,b",
        ] {
            assert!(h(bad).is_err(), "{bad:?} accepted as {:?}", h(bad));
        }
        let long = format!("{}.com", "a".repeat(64));
        assert_eq!(h(&long), Err(BadHost::Label));
    }

    #[test]
    fn authority_carries_a_non_default_port() {
        let x = host(b"Example.com:8080", &[80]).unwrap();
        assert_eq!(x.authority(), "example.com:8080");
        let y = host(b"Example.com:80", &[80]).unwrap();
        assert_eq!(y.authority(), "example.com");
    }

    fn p(s: &str) -> String {
        path(s.as_bytes(), true).unwrap().into_owned()
    }

    #[test]
    fn paths_resolve_to_one_spelling() {
        for (raw, want) in [
            ("/s/big", "/s/big"),
            ("/x/../s/big", "/s/big"),
            ("//s/big", "/s/big"),
            ("/%73/big", "/s/big"),
            ("/s//big", "/s/big"),
            ("/./s/./big", "/s/big"),
            ("/s/big/.", "/s/big/"),
            ("/s/big/..", "/s/"),
            ("/../../s/big", "/s/big"),
            ("/s%2Fbig", "/s/big"),
            ("/s%2fbig", "/s/big"),
            ("/x/%2E%2E/s/big", "/s/big"),
            ("/x/.%2e/s/big", "/s/big"),
            ("/x/..%2Fs/big", "/s/big"),
            ("/a%2fb", "/a/b"),
            ("/a%7eb", "/a~b"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a b", "/a%20b"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a\\b", "/a%5Cb"),
            ("/a;b=c/d", "/a;b=c/d"),
            ("/", "/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/dir/", "/dir/"),
        ] {
            assert_eq!(p(raw), want, "{raw}");
        }
    }

    #[test]
    fn slashes_are_kept_when_not_merged() {
        let q = |s: &str| path(s.as_bytes(), false).unwrap().into_owned();
        assert_eq!(q("//s/big"), "//s/big");
        assert_eq!(q("/a//b/../c"), "/a//c");
        assert_eq!(q("/a/b/"), "/a/b/");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for s in ["/", "/a/b.ts", "/v/seg-1_2~x.ts", "/a;p=1/b"] {
            assert!(
                matches!(path(s.as_bytes(), true), Ok(Cow::Borrowed(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn bad_escapes_and_nul_are_refused() {
        assert_eq!(path(b"/a%zz", true), Err(BadPath::Escape));
        assert_eq!(path(b"/a%4", true), Err(BadPath::Escape));
        assert_eq!(path(b"/a%00b", true), Err(BadPath::Nul));
    }

    #[test]
    fn queries() {
        assert_eq!(query("v=1&w=2"), "v=1&w=2");
        assert_eq!(query("%76=EVIL"), "v=EVIL");
        assert_eq!(query("v=%45VIL"), "v=EVIL");
        assert_eq!(query("v=a%2fb"), "v=a%2Fb");
        assert_eq!(query("v=a b"), "v=a%20b");
        assert_eq!(query("v=%zz"), "v=%25zz");
        assert_eq!(query("v=1+2"), "v=1+2");
        assert_eq!(param_name("%76"), "v");
        assert_eq!(param_name("v%20"), "v ");
        assert_eq!(param_name("v+"), "v ");
        assert_eq!(param_name("V"), "V");
    }

    proptest! {
        #[test]
        fn canonical_paths_are_fixed_points(raw in "/[a-zA-Z0-9%./_~ -]{0,40}", merge in any::<bool>()) {
            if let Ok(once) = path(raw.as_bytes(), merge) {
                let once = once.into_owned();
                prop_assert!(once.starts_with('/'));
                let twice = path(once.as_bytes(), merge).unwrap().into_owned();
                prop_assert_eq!(&twice, &once);
                // No dot segments survive.
                prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "{}", once);
            }
        }

        #[test]
        fn canonical_queries_are_fixed_points(raw in "[a-zA-Z0-9%=&+ ;/?._~-]{0,40}") {
            let once = query(&raw).into_owned();
            prop_assert_eq!(query(&once).into_owned(), once);
        }

        #[test]
        fn host_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = host(&raw, &[80]);
        }

        #[test]
        fn canonical_hosts_are_fixed_points(raw in "[a-zA-Z0-9._-]{1,20}(:[0-9]{1,5})?") {
            if let Ok(x) = host(raw.as_bytes(), &[80]) {
                let again = host(x.authority().as_bytes(), &[80]).unwrap();
                prop_assert_eq!(again, x);
            }
        }
    }
}
