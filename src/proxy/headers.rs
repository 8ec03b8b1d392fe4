//! Header rules for forwarding (RFC 9110 §7.6): hop-by-hop fields are removed in both
//! directions, `X-Forwarded-For`, `X-Forwarded-Proto` and `Via` are added, and every request
//! carries an `X-Request-Id` (the client's, when it is sane, else a new one).

use http::header::{HeaderMap, HeaderName, CONNECTION, HOST, UPGRADE};
use rand::RngCore;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const VIA_VALUE: &str = "1.1 edgeslice";

/// Fields that are always hop-by-hop. `Transfer-Encoding` and `Content-Length` are left to
/// Pingora, which re-frames bodies on each hop.
const HOP_BY_HOP: [&str; 4] = ["keep-alive", "proxy-connection", "te", "trailer"];

/// The hop-by-hop fields present in `headers`: the fixed list, `Connection` itself, and every
/// field it names, except `Host`: the request's host routes and keys it, so a client naming it
/// in `Connection` never removes it (Pingora refuses such a request on pass-through). `Upgrade`
/// (and `Connection`) stay only when `keep_upgrade` (a protocol upgrade Pingora is proxying).
/// Pingora's header types keep a case map, so callers remove the names through their own API.
pub fn hop_by_hop_names(headers: &HeaderMap, keep_upgrade: bool) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == UPGRADE) && n != HOST)
        .collect();
    names.extend(HOP_BY_HOP.iter().map(|n| HeaderName::from_static(n)));
    if !keep_upgrade {
        names.push(UPGRADE);
        names.push(CONNECTION);
    }
    names.retain(|n| headers.contains_key(n));
    names.dedup();
    names
}

/// Remove hop-by-hop fields from a plain header map (see [`hop_by_hop_names`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for name in hop_by_hop_names(headers, keep_upgrade) {
        headers.remove(&name);
    }
}

/// Request fields a cache fill never forwards: the cache manages ranges and validators
/// itself, the message framing and routing fields are set per fetch, and credentials never
/// reach an origin on a fetch whose answer is shared (RFC 9111 §3.5).
const NOT_FORWARDED_ON_FILLS: [&str; 15] = [
    "host",
    "range",
    "if-range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "authorization",
    "proxy-authorization",
    "cookie",
    "content-length",
    "expect",
    "transfer-encoding",
    "via",
    "x-request-id",
];

/// Whether a cache fill forwards the client's field `name` (lower case) when it is
/// end-to-end: not one of [`NOT_FORWARDED_ON_FILLS`].
pub fn forwarded_on_fills(name: &str) -> bool {
    !NOT_FORWARDED_ON_FILLS.contains(&name)
}

/// The client's end-to-end request fields a cache fill forwards to the origin (so a response
/// that varies on them is the one this client asked for): all but hop-by-hop fields and
/// [`NOT_FORWARDED_ON_FILLS`].
pub fn fill_request_headers(client: &HeaderMap) -> HeaderMap {
    let hop = hop_by_hop_names(client, false);
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        if !hop.contains(name) && forwarded_on_fills(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The client's request id if it is a reasonable token (printable ASCII, at most 128 bytes),
/// otherwise a fresh random one (32 hex digits).
pub fn request_id(incoming: Option<&[u8]>) -> String {
    if let Some(v) = incoming {
        if !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic()) {
            if let Ok(s) = std::str::from_utf8(v) {
                return s.to_string();
            }
        }
    }
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    crate::cache::key::lower_hex(&bytes)
}

/// `X-Forwarded-For` value: the existing list with the client appended.
pub fn forwarded_for(existing: Option<&[u8]>, client_ip: &str) -> String {
    match existing
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
    {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip.to_string(),
    }
}

/// `Via` value: the existing chain with this hop appended.
pub fn via(existing: Option<&[u8]>) -> String {
    match existing
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
    {
        Some(prev) if !prev.is_empty() => format!("{prev}, {VIA_VALUE}"),
        _ => VIA_VALUE.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_named_fields() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("trailer", "x".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn host_named_in_connection_is_never_stripped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Host, x-secret".parse().unwrap());
        h.insert("host", "media.example".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["host"], "media.example");
    }

    #[test]
    fn fills_forward_end_to_end_fields_only() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("range", "bytes=0-1"),
            ("if-range", "\"e\""),
            ("if-none-match", "\"e\""),
            ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("authorization", "Basic x"),
            ("cookie", "a=b"),
            ("host", "example.test"),
            ("accept-encoding", "gzip"),
            ("accept-language", "fr"),
            ("user-agent", "curl"),
        ] {
            h.append(HeaderName::from_static(n), v.parse().unwrap());
        }
        h.append("accept-language", "de".parse().unwrap());
        let out = fill_request_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept-encoding", "accept-language", "user-agent"]);
        assert_eq!(out.get_all("accept-language").iter().count(), 2);
    }

    #[test]
    fn request_ids() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        let fresh = request_id(None);
        assert_eq!(fresh.len(), 32);
        assert!(fresh
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(fresh, request_id(None));
        assert_eq!(request_id(Some(b"has space")).len(), 32);
        assert_eq!(request_id(Some(&[b'a'; 200])).len(), 32);
    }

    #[test]
    fn forwarded_chains() {
        assert_eq!(forwarded_for(None, "1.2.3.4"), "1.2.3.4");
        assert_eq!(
            forwarded_for(Some(b"5.6.7.8"), "1.2.3.4"),
            "5.6.7.8, 1.2.3.4"
        );
        assert_eq!(via(Some(b"1.1 other")), "1.1 other, 1.1 edgeslice");
    }
}
