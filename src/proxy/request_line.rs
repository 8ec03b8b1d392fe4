//! The request target and Host, checked before routing (RFC 9112 §3.2–3.3).
//!
//! - Only origin-form (`/path?q`) and absolute-form (`http://host/path`) targets are served,
//!   and asterisk-form (`*`) for OPTIONS; anything else (`GET foo`) is 400, never a guess.
//! - An absolute-form target's authority is the request's host (§3.2.2): it replaces `Host`,
//!   and the target becomes origin-form, so routing, the cache key and the origin request all
//!   see one host.
//! - An HTTP/1.1 request without `Host` is 400 (§3.2).
//! - A target over `server.max_uri_size` is 414, and a header over `server.max_header_size`
//!   431 (the guard refuses longer request lines and headers before they are parsed; this
//!   catches the rest exactly, such as a pipelined header whose start the guard did not see).

use http::{HeaderValue, Method, Uri, Version};
use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};
use pingora_http::RequestHeader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: neither origin-form nor absolute-form (nor `OPTIONS *`).
    BadTarget,
    /// 400: HTTP/1.1 without Host.
    MissingHost,
    /// 414.
    TooLong,
    /// 431.
    HeaderTooLarge,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadTarget | Refusal::MissingHost => 400,
            Refusal::TooLong => 414,
            Refusal::HeaderTooLarge => 431,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadTarget => "request target is neither origin-form nor absolute-form",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
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

/// Check the request line and bring an absolute-form request to origin-form with its authority
/// as Host.
pub fn normalize(req: &mut RequestHeader, max_uri: usize) -> Result<(), Refusal> {
    let raw = req.raw_path();
    if raw.len() > max_uri {
        return Err(Refusal::TooLong);
    }
    let origin_form = raw.first() == Some(&b'/') || (raw == b"*" && req.method == Method::OPTIONS);
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
        let host = HeaderValue::from_bytes(authority).map_err(|_| Refusal::BadTarget)?;
        // `http://host` has an empty path: "/"; `http://host?q` keeps its query after it.
        let uri = match path_and_query.first() {
            Some(b'/') => Uri::try_from(path_and_query),
            _ => Uri::try_from([b"/", path_and_query].concat()),
        }
        .map_err(|_| Refusal::BadTarget)?;
        req.set_uri(uri);
        req.insert_header(http::header::HOST, host)
            .map_err(|_| Refusal::BadTarget)?;
        return Ok(());
    }
    if req.version == Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
        return Err(Refusal::MissingHost);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn origin_form_passes_unchanged() {
        let mut r = req("GET", b"/a/b?c=1", Some("example.com"));
        assert_eq!(normalize(&mut r, 8192), Ok(()));
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
                normalize(&mut r, 8192),
                Err(Refusal::BadTarget),
                "{}",
                String::from_utf8_lossy(t)
            );
        }
        let mut r = req("OPTIONS", b"*", Some("example.com"));
        assert_eq!(normalize(&mut r, 8192), Ok(()));
    }

    #[test]
    fn absolute_form_sets_host_and_becomes_origin_form() {
        let mut r = req("GET", b"http://Media.Example.com:8080/v/seg.ts?x=1", None);
        assert_eq!(normalize(&mut r, 8192), Ok(()));
        assert_eq!(host(&r), "Media.Example.com:8080");
        assert_eq!(r.raw_path(), b"/v/seg.ts?x=1");
        assert_eq!(r.uri.path(), "/v/seg.ts");
        // No path: "/"; a query without a path keeps the query.
        let mut r = req("GET", b"http://example.com", None);
        assert_eq!(normalize(&mut r, 8192), Ok(()));
        assert_eq!(r.raw_path(), b"/");
        let mut r = req("GET", b"http://example.com?q=2", None);
        assert_eq!(normalize(&mut r, 8192), Ok(()));
        assert_eq!(r.raw_path(), b"/?q=2");
        // Userinfo is refused.
        let mut r = req("GET", b"http://user@example.com/", None);
        assert_eq!(normalize(&mut r, 8192), Err(Refusal::BadTarget));
    }

    #[test]
    fn http_11_needs_a_host_and_http_10_does_not() {
        let mut r = req("GET", b"/", None);
        assert_eq!(normalize(&mut r, 8192), Err(Refusal::MissingHost));
        let mut r = req("GET", b"/", None);
        r.set_version(Version::HTTP_10);
        assert_eq!(normalize(&mut r, 8192), Ok(()));
    }

    #[test]
    fn a_long_target_is_414() {
        let long = format!("/{}", "a".repeat(300));
        let mut r = req("GET", long.as_bytes(), Some("h"));
        assert_eq!(normalize(&mut r, 256), Err(Refusal::TooLong));
        assert_eq!(normalize(&mut r, 301), Ok(()));
    }
}
