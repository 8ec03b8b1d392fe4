//! Who a client is, for shaping: the remote address (IPv6 grouped by prefix), a header set by a
//! trusted layer in front, or the last untrusted hop of `X-Forwarded-For` when the peer is a
//! trusted proxy.
//!
//! Pure functions over the peer address and the request headers; never panics on any header.

use std::net::IpAddr;
use std::sync::Arc;

/// A client as the shaper keys it. Header values are kept as given (bounded in length), IPv4
/// addresses whole, IPv6 addresses masked to the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Ip(IpAddr),
    Token(Arc<str>),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Ip(ip) => write!(f, "{ip}"),
            ClientKey::Token(t) => write!(f, "token:{t}"),
        }
    }
}

/// Longest header value used as a client key; longer values are cut (they still key apart
/// from everything that differs in the first bytes).
pub const MAX_TOKEN_LEN: usize = 256;

/// An address block, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The one address `ip`.
    pub fn host(ip: IpAddr) -> Cidr {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Cidr { addr: ip, prefix }
    }

    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (a, p) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("invalid address block {text:?}: expected a.b.c.d/n or ipv6/n"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid prefix length in {text:?} (0 to {max})"))?,
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 client they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `ip` with all but its first `prefix` bits zeroed.
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

/// How the client of a request is found (`shaping.client_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    RemoteAddr,
    /// A header a trusted layer in front sets; requests without it fall back to the address.
    Header(http::HeaderName),
    /// The last hop of `X-Forwarded-For` that is not a trusted proxy, when the peer is trusted.
    ForwardedFor {
        trusted: Vec<Cidr>,
    },
}

/// The client of a request from `peer` with `headers`.
pub fn client_key(
    source: &KeySource,
    ipv6_prefix: u8,
    peer: Option<IpAddr>,
    headers: &http::HeaderMap,
) -> ClientKey {
    let by_ip = |ip: IpAddr| {
        let ip = canonical(ip);
        ClientKey::Ip(if ip.is_ipv6() {
            mask(ip, ipv6_prefix)
        } else {
            ip
        })
    };
    let unknown = || ClientKey::Token(Arc::from("unknown"));
    match source {
        KeySource::RemoteAddr => peer.map_or_else(unknown, by_ip),
        KeySource::Header(name) => {
            let token = headers
                .get(name)
                .map(|v| v.as_bytes())
                .map(|b| &b[..b.len().min(MAX_TOKEN_LEN)])
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .filter(|t| !t.is_empty());
            match token {
                Some(t) => ClientKey::Token(Arc::from(t)),
                None => peer.map_or_else(unknown, by_ip),
            }
        }
        KeySource::ForwardedFor { trusted } => {
            let Some(peer) = peer else {
                return unknown();
            };
            let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
            if !is_trusted(peer) {
                return by_ip(peer);
            }
            // Walk the hops right to left (nearest first); the first one we do not trust is the
            // client. A hop that does not parse ends the walk: nothing left of it can be
            // believed, so the last trusted hop stands for the client.
            let client = vouched_hops(headers, is_trusted)
                .last()
                .map_or(peer, |(ip, _)| *ip);
            by_ip(client)
        }
    }
}

/// The `X-Forwarded-For` hops a trusted peer vouches for, from the right (the nearest first):
/// those its trusted proxies added, up to and including the first hop none of them is (the
/// client). An element that is not an address ends the walk. What a client wrote before its
/// own hop is never among them.
pub fn vouched_hops(
    headers: &http::HeaderMap,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> Vec<(IpAddr, &str)> {
    let mut hops = Vec::new();
    for hop in headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','))
    {
        let Some(ip) = parse_hop(hop) else { break };
        hops.push((ip, hop.trim()));
        if !is_trusted(ip) {
            break;
        }
    }
    hops
}

/// One `X-Forwarded-For` element: an address, possibly `[v6]:port` or `v4:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim();
    if let Ok(ip) = h.parse() {
        return Some(ip);
    }
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    h.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:1::5")));
        assert!(!c.contains(ip("2001:db9::5")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "::/129",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_addr_groups_ipv6_by_prefix() {
        let none = headers(&[]);
        let k = |p: &str, prefix| client_key(&KeySource::RemoteAddr, prefix, Some(ip(p)), &none);
        assert_eq!(k("2001:db8:1:2:aaaa::1", 64), k("2001:db8:1:2:bbbb::9", 64));
        assert_ne!(k("2001:db8:1:2::1", 64), k("2001:db8:1:3::1", 64));
        assert_ne!(k("2001:db8:1:2::1", 128), k("2001:db8:1:2::2", 128));
        assert_ne!(k("127.0.0.2", 64), k("127.0.0.3", 64));
        assert_eq!(k("::ffff:127.0.0.2", 64), k("127.0.0.2", 64));
    }

    #[test]
    fn header_keys_fall_back_to_the_address() {
        let src = KeySource::Header(http::HeaderName::from_static("x-client-id"));
        let peer = Some(ip("127.0.0.9"));
        assert_eq!(
            client_key(&src, 64, peer, &headers(&[("x-client-id", "alice")])),
            ClientKey::Token(Arc::from("alice"))
        );
        assert_eq!(
            client_key(&src, 64, peer, &headers(&[])),
            ClientKey::Ip(ip("127.0.0.9"))
        );
        let long = "x".repeat(10_000);
        match client_key(&src, 64, peer, &headers(&[("x-client-id", &long)])) {
            ClientKey::Token(t) => assert_eq!(t.len(), MAX_TOKEN_LEN),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forwarded_for_takes_the_last_untrusted_hop_from_a_trusted_peer() {
        let src = KeySource::ForwardedFor {
            trusted: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        };
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(
            client_key(&src, 64, Some(ip("10.0.0.1")), &xff),
            ClientKey::Ip(ip("1.2.3.4"))
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_key(&src, 64, Some(ip("9.9.9.9")), &xff),
            ClientKey::Ip(ip("9.9.9.9"))
        );
        // Several header lines read as one list; ports and brackets are understood.
        let xff = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "[2001:db8::1]:443, 10.0.0.7:80"),
        ]);
        assert_eq!(
            client_key(&src, 64, Some(ip("10.0.0.1")), &xff),
            ClientKey::Ip(ip("2001:db8::"))
        );
        // Garbage stops the walk at the last trusted hop.
        let xff = headers(&[("x-forwarded-for", "1.2.3.4, garbage, 10.0.0.7")]);
        assert_eq!(
            client_key(&src, 64, Some(ip("10.0.0.1")), &xff),
            ClientKey::Ip(ip("10.0.0.7"))
        );
        // No header: the trusted peer itself.
        assert_eq!(
            client_key(&src, 64, Some(ip("10.0.0.1")), &headers(&[])),
            ClientKey::Ip(ip("10.0.0.1"))
        );
    }

    proptest! {
        #[test]
        fn never_panics(xff in "\\PC{0,80}", peer in any::<u32>(), prefix in 0u8..=255) {
            let src = KeySource::ForwardedFor { trusted: vec![Cidr::parse("0.0.0.0/0").unwrap()] };
            let mut h = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&xff) {
                h.insert("x-forwarded-for", v);
            }
            let _ = client_key(&src, prefix, Some(IpAddr::V4(peer.into())), &h);
            let _ = Cidr::parse(&xff);
        }
    }
}
