//! The request target and Host, checked and made canonical before routing (RFC 9112 §3.2–3.3,
//! RFC 9110 §7.2, RFC 3986 §6.2.2).
//!
//! - Only origin-form (`/path?q`) and absolute-form (`http://host/path`) targets are served,
//!   and asterisk-form (`*`) for OPTIONS; anything else (`GET foo`) is 400, never a guess.
//! - An absolute-form target's authority is the request's host (§3.2.2): it replaces `Host`,
//!   and the target becomes origin-form, so routing, the cache key and the origin request all
//!   see one host.
//! - A request without `Host`, HTTP/1.0 included, or with more than one, is 400 (§3.2; nginx
//!   answers the same); so is a `Host` that is not a valid host (`canonical::host`).
//! - The `Host` field and the target are rewritten to their canonical forms ([`canonical`]):
//!   whatever spelling a client uses, routing, shaping, the cache key, fills and pass-through
//!   all see the same host, path and query.
//! - A target over `server.max_uri_size` is 414, and a header over `server.max_header_size`
//!   431 (the guard refuses longer request lines and headers before they are parsed; this
//!   catches the rest exactly, such as a pipelined header whose start the guard did not see).

use super::canonical::{self, Host};
use http::{HeaderValue, Method, Uri};
use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};
use pingora_http::RequestHeader;

/// The scheme a request came by: its listener's (`https` on a TLS listener), or what a
/// trusted proxy in front asserts (`X-Forwarded-Proto`). It is forwarded as
/// `X-Forwarded-Proto` and is part of the cache key (see `cache::key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// As `X-Forwarded-Proto` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The port a host of this scheme defaults to.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: neither origin-form nor absolute-form (nor `OPTIONS *`).
    BadTarget,
    /// 400: no Host.
    MissingHost,
    /// 400: more than one Host field.
    DuplicateHost,
    /// 400: a Host that is not a host.
    BadHost,
    /// 400: a path with a malformed escape or an encoded NUL.
    BadPath,
    /// 400: a `Connection` field Pingora would refuse to forward ([`check_connection`]).
    BadConnection,
    /// 414.
    TooLong,
    /// 431.
    HeaderTooLarge,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::TooLong => 414,
            Refusal::HeaderTooLarge => 431,
            _ => 400,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadTarget => "request target is neither origin-form nor absolute-form",
            Refusal::MissingHost => "request without Host",
            Refusal::DuplicateHost => "more than one Host field",
            Refusal::BadHost => "invalid Host",
            Refusal::BadPath => "malformed percent-escape or NUL in the path",
            Refusal::BadConnection => {
                "Connection names a protected field, a malformed token, or too many"
            }
            Refusal::TooLong => "request target over server.max_uri_size",
            Refusal::HeaderTooLarge => "request header over server.max_header_size",
        }
    }
}

/// The parsed header's size (request line, fields and line ends, as received) against
/// `max_header`.
pub fn check_header_size(raw_len: usize, max_header: usize) -> Result<(), Refusal> {
    if raw_len > max_header {
        return Err(Refusal::HeaderTooLarge);
    }
    Ok(())
}

/// Most `Connection` options a request may carry (Pingora's bound).
const MAX_CONNECTION_OPTIONS: usize = 10;

/// The `Connection` field as Pingora's upstream request sanitising accepts it (pingora-proxy
/// `ConnectionNominations`): fewer than ten options, each a token, none naming `Host`,
/// `X-Forwarded-For`, `-Host`, `-Proto` or a pseudo-header. Checked on arrival, so a request
/// Pingora would refuse is refused alike on every route, before the cache or an origin
/// connection is involved (it used to take a pooled origin connection on pass-through and
/// pass on cached routes).
pub fn check_connection(req: &RequestHeader) -> Result<(), Refusal> {
    let mut options = 0;
    for token in req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        options += 1;
        let token_chars = token
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        let protected = [
            "host",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
        ]
        .iter()
        .any(|p| token.eq_ignore_ascii_case(p.as_bytes()));
        if options >= MAX_CONNECTION_OPTIONS || !token_chars || protected {
            return Err(Refusal::BadConnection);
        }
    }
    Ok(())
}

/// Check the request line and Host, and rewrite both to their canonical forms (an
/// absolute-form request becomes origin-form with its authority as Host). `local_port`: the
/// port the request arrived on, a default port of its host like the listener's `scheme`'s
/// (80, or 443 on a TLS connection). Returns the host.
pub fn normalize(
    req: &mut RequestHeader,
    max_uri: usize,
    merge_slashes: bool,
    local_port: Option<u16>,
    scheme: Scheme,
) -> Result<Host, Refusal> {
    let raw = req.raw_path();
    if raw.len() > max_uri {
        return Err(Refusal::TooLong);
    }
    check_connection(req)?;
    let asterisk = raw == b"*" && req.method == Method::OPTIONS;
    let origin_form = raw.first() == Some(&b'/') || asterisk;
    if !origin_form {
        let RawTargetAuthority::Absolute {
            scheme,
            authority,
            path_and_query,
        } = raw_target_authority(raw)
        else {
            return Err(Refusal::BadTarget);
        };
        if !is_http_family_scheme(scheme) || authority.is_empty() || authority.contains(&b'@') {
            return Err(Refusal::BadTarget);
        }
        let host = HeaderValue::from_bytes(authority).map_err(|_| Refusal::BadHost)?;
        // `http://host` has an empty path: "/"; `http://host?q` keeps its query after it.
        let uri = match path_and_query.first() {
            Some(b'/') => Uri::try_from(path_and_query),
            _ => Uri::try_from([b"/", path_and_query].concat()),
        }
        .map_err(|_| Refusal::BadTarget)?;
        req.set_uri(uri);
        req.insert_header(http::header::HOST, host)
            .map_err(|_| Refusal::BadTarget)?;
    } else if !req.headers.contains_key(http::header::HOST) {
        // HTTP/2 carries the authority in `:authority` (RFC 9113 §8.3.1), most often without
        // a Host field: it is the host (Pingora refused a request where both disagree).
        if let Some(a) = req.uri.authority() {
            let v = HeaderValue::from_str(a.as_str()).map_err(|_| Refusal::BadHost)?;
            req.insert_header(http::header::HOST, v)
                .map_err(|_| Refusal::BadHost)?;
        }
    }
    let host = {
        let mut fields = req.headers.get_all(http::header::HOST).iter();
        let (Some(value), None) = (fields.next(), fields.next()) else {
            return Err(if req.headers.contains_key(http::header::HOST) {
                Refusal::DuplicateHost
            } else {
                Refusal::MissingHost
            });
        };
        let defaults = [
            scheme.default_port(),
            local_port.unwrap_or(scheme.default_port()),
        ];
        canonical::host(value.as_bytes(), &defaults).map_err(|_| Refusal::BadHost)?
    };
    let authority = host.authority();
    if req.headers.get(http::header::HOST).map(|v| v.as_bytes()) != Some(authority.as_bytes()) {
        let v = HeaderValue::from_str(&authority).map_err(|_| Refusal::BadHost)?;
        req.insert_header(http::header::HOST, v)
            .map_err(|_| Refusal::BadHost)?;
    }
    if !asterisk {
        canonical_target(req, merge_slashes)?;
    }
    Ok(host)
}

/// Rewrite the origin-form target to its canonical path and query (no change, no copy, when
/// it already is).
fn canonical_target(req: &mut RequestHeader, merge_slashes: bool) -> Result<(), Refusal> {
    let raw = req.raw_path();
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(q) => (&raw[..q], Some(&raw[q + 1..])),
        None => (raw, None),
    };
    let path = canonical::path(path, merge_slashes).map_err(|_| Refusal::BadPath)?;
    let query = query.map(String::from_utf8_lossy);
    let canonical_query = query.as_deref().map(canonical::query);
    let unchanged = matches!(path, std::borrow::Cow::Borrowed(_))
        && matches!(canonical_query, None | Some(std::borrow::Cow::Borrowed(_)))
        && std::str::from_utf8(raw).is_ok();
    if unchanged {
        return Ok(());
    }
    let mut target = path.into_owned();
    if let Some(q) = canonical_query {
        target.push('?');
        target.push_str(&q);
    }
    let uri = Uri::try_from(target).map_err(|_| Refusal::BadPath)?;
    req.set_uri(uri);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;

    fn req(method: &str, target: &[u8], host: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build(method, target, None).expect("build");
        if let Some(h) = host {
            r.insert_header("host", h).unwrap();
        }
        r
    }

    fn host(r: &RequestHeader) -> &str {
        r.headers.get("host").unwrap().to_str().unwrap()
    }

    fn norm(r: &mut RequestHeader) -> Result<Host, Refusal> {
        normalize(r, 8192, true, None, Scheme::Http)
    }

    #[test]
    fn origin_form_passes_unchanged() {
        let mut r = req("GET", b"/a/b?c=1", Some("example.com"));
        let h = norm(&mut r).unwrap();
        assert_eq!((h.name.as_str(), h.port), ("example.com", None));
        assert_eq!(r.raw_path(), b"/a/b?c=1");
        assert_eq!(host(&r), "example.com");
    }

    #[test]
    fn a_target_of_another_form_is_400() {
        for t in [
            &b"foo"[..],
            b"foo/bar",
            b"*",
            b"example.com:80",
            b"http:foo",
            b"ftp://x/y",
        ] {
            let mut r = req("GET", t, Some("example.com"));
            assert_eq!(
                norm(&mut r),
                Err(Refusal::BadTarget),
                "{}",
                String::from_utf8_lossy(t)
            );
        }
        let mut r = req("OPTIONS", b"*", Some("example.com"));
        assert!(norm(&mut r).is_ok());
        assert_eq!(r.raw_path(), b"*");
    }

    #[test]
    fn absolute_form_sets_host_and_becomes_origin_form() {
        let mut r = req("GET", b"http://Media.Example.com:8080/v/seg.ts?x=1", None);
        let h = norm(&mut r).unwrap();
        assert_eq!((h.name.as_str(), h.port), ("media.example.com", Some(8080)));
        assert_eq!(host(&r), "media.example.com:8080");
        assert_eq!(r.raw_path(), b"/v/seg.ts?x=1");
        assert_eq!(r.uri.path(), "/v/seg.ts");
        // No path: "/"; a query without a path keeps the query.
        let mut r = req("GET", b"http://example.com", None);
        assert!(norm(&mut r).is_ok());
        assert_eq!(r.raw_path(), b"/");
        let mut r = req("GET", b"http://example.com?q=2", None);
        assert!(norm(&mut r).is_ok());
        assert_eq!(r.raw_path(), b"/?q=2");
        // Userinfo is refused; so is an authority that is not a host.
        let mut r = req("GET", b"http://user@example.com/", None);
        assert_eq!(norm(&mut r), Err(Refusal::BadTarget));
        let mut r = req("GET", b"http://example.com:evil.net/", None);
        assert_eq!(norm(&mut r), Err(Refusal::BadHost));
    }

    #[test]
    fn every_version_needs_exactly_one_valid_host() {
        let mut r = req("GET", b"/", None);
        assert_eq!(norm(&mut r), Err(Refusal::MissingHost));
        let mut r = req("GET", b"/", None);
        r.set_version(Version::HTTP_10);
        assert_eq!(norm(&mut r), Err(Refusal::MissingHost));
        let mut r = req("GET", b"/", Some("a.example"));
        r.append_header("host", "b.example").unwrap();
        assert_eq!(norm(&mut r), Err(Refusal::DuplicateHost));
        for bad in ["www.example.com:evil.net", "x evil", "a..b", "h:99999"] {
            let mut r = req("GET", b"/", Some(bad));
            assert_eq!(norm(&mut r), Err(Refusal::BadHost), "{bad}");
        }
    }

    #[test]
    fn the_port_a_request_arrived_on_is_a_default_port() {
        let mut r = req("GET", b"/", Some("Example.com:8080"));
        let h = normalize(&mut r, 8192, true, Some(8080), Scheme::Http).unwrap();
        assert_eq!((h.name.as_str(), h.port), ("example.com", None));
        assert_eq!(host(&r), "example.com");
        let mut r = req("GET", b"/", Some("example.com:6666"));
        let h = normalize(&mut r, 8192, true, Some(8080), Scheme::Http).unwrap();
        assert_eq!(h.port, Some(6666));
        assert_eq!(host(&r), "example.com:6666");
        // Over TLS the scheme's port is 443: `:443` is dropped, `:80` is not a default.
        let mut r = req("GET", b"/", Some("example.com:443"));
        let h = normalize(&mut r, 8192, true, Some(8443), Scheme::Https).unwrap();
        assert_eq!(h.port, None);
        let mut r = req("GET", b"/", Some("example.com:80"));
        let h = normalize(&mut r, 8192, true, Some(8443), Scheme::Https).unwrap();
        assert_eq!(h.port, Some(80));
    }

    #[test]
    fn host_and_target_are_rewritten_canonical() {
        let mut r = req(
            "GET",
            b"/x/../%73//big?%76=1",
            Some("Media.Example.COM.:80"),
        );
        let h = norm(&mut r).unwrap();
        assert_eq!(h.name, "media.example.com");
        assert_eq!(host(&r), "media.example.com");
        assert_eq!(r.raw_path(), b"/s/big?v=1");
        assert_eq!(r.uri.path(), "/s/big");
        assert_eq!(r.uri.query(), Some("v=1"));
        // Without merging, a double slash stays.
        let mut r = req("GET", b"//s/big", Some("h"));
        normalize(&mut r, 8192, false, None, Scheme::Http).unwrap();
        assert_eq!(r.raw_path(), b"//s/big");
        let mut r = req("GET", b"/a%zz", Some("h"));
        assert_eq!(norm(&mut r), Err(Refusal::BadPath));
    }

    #[test]
    fn connection_fields_pingora_would_refuse_are_400() {
        for bad in [
            "Host",
            "close, X-Forwarded-For",
            "x-forwarded-host",
            "X-Forwarded-Proto",
            ":authority",
            "\"x-a\"",
            "a, b, c, d, e, f, g, h, i, j",
        ] {
            let mut r = req("GET", b"/", Some("h"));
            r.insert_header("connection", bad).unwrap();
            assert_eq!(norm(&mut r), Err(Refusal::BadConnection), "{bad}");
        }
        for good in [
            "close",
            "keep-alive, x-private-hop",
            "a, b, c, d, e, f, g, h, i",
        ] {
            let mut r = req("GET", b"/", Some("h"));
            r.insert_header("connection", good).unwrap();
            assert!(norm(&mut r).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_long_target_is_414() {
        let long = format!("/{}", "a".repeat(300));
        let mut r = req("GET", long.as_bytes(), Some("h"));
        assert_eq!(
            normalize(&mut r, 256, true, None, Scheme::Http),
            Err(Refusal::TooLong)
        );
        assert!(normalize(&mut r, 301, true, None, Scheme::Http).is_ok());
    }
}
