//! Header rules for forwarding, for fills and pass-through alike (RFC 9110 §7.6): hop-by-hop
//! fields are removed in both directions, `Via` is added, every request carries an
//! `X-Request-Id` (the client's, when it is sane, else a new one), and what the origin learns
//! about *who* asked and *how* the request arrived is what the proxy asserts ([`Forwarded`]),
//! never a client's claim.
//!
//! - Forwarding fields (`Forwarded`, `X-Forwarded-*`, `X-Real-IP` and its kin: see
//!   [`is_forwarding_field`]) from a peer outside `server.trusted_proxies` are removed, and
//!   `X-Forwarded-For` (the peer) and `X-Forwarded-Proto` (the listener's scheme) are set. From
//!   a trusted peer the `X-Forwarded-For` chain is kept from the last hop it does not vouch for
//!   (the client; forged hops before it are dropped) with the peer appended, and a valid
//!   `X-Forwarded-Proto` is kept.
//! - A fill's answer is shared, so a fill forwards no client field that could change the
//!   origin's answer without being in the key: besides credentials, validators and framing
//!   ([`NOT_FORWARDED_ON_FILLS`]), no forwarding field even from a trusted peer, and no field
//!   that overrides the URL, host, scheme or method ([`is_override_field`]). The other
//!   end-to-end fields are forwarded: content negotiation (`Accept*`), `User-Agent`,
//!   `Cache-Control` and the like; an origin whose answer depends on one says so in `Vary`,
//!   and the cache keys the variant on it (RFC 9111 §4.1); a request whose variant a fill
//!   cannot fetch (it varies on a field fills do not forward) is passed through instead.

use super::request_line::Scheme;
use crate::shaping::identity::Cidr;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use rand::RngCore;
use std::net::IpAddr;

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
        .filter(|n| !(keep_upgrade && n == UPGRADE))
        // A client cannot make the request lose its Host by naming it in Connection.
        .filter(|n| n != HOST)
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
const NOT_FORWARDED_ON_FILLS: [&str; 17] = [
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
    // Set by the fill itself: the list received with our id appended (`cdn_loop`).
    "cdn-loop",
    // The peer mark: set by a fill that asks a peer, never passed on (`cluster`).
    crate::cluster::PEER_HEADER,
];

/// Fields that say who asked or how the request arrived: the proxy's to assert
/// ([`Forwarded`]); from an untrusted peer they are dropped on every path, on fills always.
pub fn is_forwarding_field(name: &str) -> bool {
    name.starts_with("x-forwarded-")
        || matches!(
            name,
            "forwarded"
                | "x-real-ip"
                | "x-client-ip"
                | "client-ip"
                | "true-client-ip"
                | "x-cluster-client-ip"
                | "x-originating-ip"
                | "x-remote-ip"
                | "x-remote-addr"
                | "x-proxyuser-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "x-scheme"
                | "x-url-scheme"
                | "front-end-https"
        )
}

/// Fields that tell an origin to act on another URL, host or method than the request's own
/// (`X-Original-URL`, `X-Rewrite-URL`, `X-Host`, `X-HTTP-Method-Override`, ...). Origins act on
/// them without a `Vary`: a fill never forwards them. Pass-through does (the answer is the
/// client's alone; some APIs take method overrides from clients).
pub fn is_override_field(name: &str) -> bool {
    name.starts_with("x-original-")
        || name.starts_with("x-rewrite-")
        || name.starts_with("x-override-")
        || name.contains("method-override")
        || matches!(name, "x-http-method" | "x-host" | "x-http-host-override")
}

/// Whether a cache fill forwards the client's field `name` (lower case) when it is
/// end-to-end: not one of [`NOT_FORWARDED_ON_FILLS`], not a forwarding field (the fill
/// carries the proxy's own), not an override.
pub fn forwarded_on_fills(name: &str) -> bool {
    !NOT_FORWARDED_ON_FILLS.contains(&name)
        && !is_forwarding_field(name)
        && !is_override_field(name)
}

/// The request fields a cache fill sends the origin: the client's end-to-end fields that
/// [`forwarded_on_fills`] allows (so a response that varies on them is the one this client
/// asked for), then what the proxy asserts ([`Forwarded`]), and `CDN-Loop`: the list the
/// request arrived with and `cdn_id` (RFC 8586; a loop through caches must be seen too),
/// unless `add_ours` is false (a peer's request: the cluster's id is in its list already).
pub fn fill_request_headers(
    client: &HeaderMap,
    asserted: &Forwarded,
    cdn_id: &str,
    add_ours: bool,
) -> HeaderMap {
    let hop = hop_by_hop_names(client, false);
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if !hop.contains(name) && forwarded_on_fills(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    asserted.insert_into(&mut out);
    if let Some(v) = super::cdn_loop::outgoing(client, cdn_id, add_ours) {
        out.insert(super::cdn_loop::CDN_LOOP, v);
    }
    out
}

/// What the proxy asserts about a request's origin: `X-Forwarded-For` and
/// `X-Forwarded-Proto`, and whether the peer is a trusted proxy (whose forwarding fields pass
/// on pass-through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub for_chain: String,
    pub proto: Scheme,
    pub peer_trusted: bool,
}

impl Forwarded {
    /// For a request with `incoming` fields from `peer` on a listener of `scheme`.
    pub fn of(
        incoming: &HeaderMap,
        peer: Option<IpAddr>,
        trusted: &[Cidr],
        scheme: Scheme,
    ) -> Forwarded {
        let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
        let Some(peer) = peer else {
            return Forwarded {
                for_chain: "unknown".into(),
                proto: scheme,
                peer_trusted: false,
            };
        };
        if !is_trusted(peer) {
            return Forwarded {
                for_chain: peer.to_string(),
                proto: scheme,
                peer_trusted: false,
            };
        }
        // The hops the trusted proxies vouch for, ending with the client's; what a client
        // wrote before its own hop is dropped.
        let hops = crate::shaping::identity::vouched_hops(incoming, is_trusted);
        let mut for_chain = String::new();
        for (_, hop) in hops.iter().rev() {
            for_chain.push_str(hop);
            for_chain.push_str(", ");
        }
        for_chain.push_str(&peer.to_string());
        Forwarded {
            for_chain,
            proto: trusted_proto(incoming, scheme),
            peer_trusted: true,
        }
    }

    /// [`Forwarded::of`]'s `proto` alone: the listener's `scheme`, or what a trusted proxy
    /// in front says (`X-Forwarded-Proto: http` or `https`).
    pub fn proto_of(
        incoming: &HeaderMap,
        peer: Option<IpAddr>,
        trusted: &[Cidr],
        scheme: Scheme,
    ) -> Scheme {
        match peer {
            Some(ip) if trusted.iter().any(|c| c.contains(ip)) => trusted_proto(incoming, scheme),
            _ => scheme,
        }
    }

    /// Set `X-Forwarded-For` and `X-Forwarded-Proto` in `headers`.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.for_chain) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(self.proto.as_str()),
        );
    }
}

/// The scheme a trusted proxy's `X-Forwarded-Proto` gives, else the listener's `scheme`.
fn trusted_proto(incoming: &HeaderMap, scheme: Scheme) -> Scheme {
    match incoming
        .get("x-forwarded-proto")
        .map(|v| v.as_bytes().trim_ascii())
    {
        Some(p) if p.eq_ignore_ascii_case(b"https") => Scheme::Https,
        Some(p) if p.eq_ignore_ascii_case(b"http") => Scheme::Http,
        _ => scheme,
    }
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
        for (n, v) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "javascript"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-scheme", "https"),
            ("x-forwarded-port", "6666"),
            ("x-forwarded-prefix", "/evil"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-host", "evil.example"),
            ("connection", "host"),
        ] {
            h.append(HeaderName::from_static(n), v.parse().unwrap());
        }
        let asserted = Forwarded::of(&h, Some("127.0.0.1".parse().unwrap()), &[], Scheme::Http);
        let out = fill_request_headers(&h, &asserted, "edgeslice", true);
        let mut names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "accept-encoding",
                "accept-language",
                "cdn-loop",
                "user-agent",
                "x-forwarded-for",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(out.get_all("accept-language").iter().count(), 2);
        // The list received (none here) with our id: one line, set by the fill.
        assert_eq!(out["cdn-loop"], "edgeslice");
        h.append("cdn-loop", "a, b".parse().unwrap());
        h.append("cdn-loop", "c".parse().unwrap());
        let out = fill_request_headers(&h, &asserted, "edge", true);
        assert_eq!(out.get_all("cdn-loop").iter().count(), 1);
        assert_eq!(out["cdn-loop"], "a, b, c, edge");
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "http");
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
    fn an_untrusted_peer_is_the_whole_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 7.7.7.7".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let f = Forwarded::of(&h, Some("203.0.113.9".parse().unwrap()), &[], Scheme::Http);
        assert_eq!(f.for_chain, "203.0.113.9");
        assert_eq!(f.proto, Scheme::Http);
        assert!(!f.peer_trusted);
        assert_eq!(
            Forwarded::of(&h, None, &[], Scheme::Http).for_chain,
            "unknown"
        );
        assert_eq!(via(Some(b"1.1 other")), "1.1 other, 1.1 edgeslice");
    }

    #[test]
    fn a_trusted_peer_vouches_for_its_hops_up_to_the_client() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        // A forged hop, the client, then a trusted hop.
        h.append("x-forwarded-for", "6.6.6.6, 198.51.100.4".parse().unwrap());
        h.append("x-forwarded-for", "10.1.2.3".parse().unwrap());
        h.insert("x-forwarded-proto", "HTTPS".parse().unwrap());
        let f = Forwarded::of(
            &h,
            Some("10.0.0.7".parse().unwrap()),
            &trusted,
            Scheme::Http,
        );
        assert_eq!(f.for_chain, "198.51.100.4, 10.1.2.3, 10.0.0.7");
        assert_eq!(f.proto, Scheme::Https);
        assert!(f.peer_trusted);
        // A garbage hop ends the walk; a bad proto falls back to the listener's scheme.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, garbage, 10.1.1.1".parse().unwrap(),
        );
        h.insert("x-forwarded-proto", "javascript".parse().unwrap());
        let f = Forwarded::of(
            &h,
            Some("10.0.0.7".parse().unwrap()),
            &trusted,
            Scheme::Http,
        );
        assert_eq!(f.for_chain, "10.1.1.1, 10.0.0.7");
        assert_eq!(f.proto, Scheme::Http);
    }
}
