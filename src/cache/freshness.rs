//! HTTP caching policy for a shared cache (RFC 9111, plus RFC 5861 `stale-if-error`).
//!
//! This module decides, from headers alone:
//!
//! * what a `Cache-Control` field says ([`parse_cache_control`]);
//! * whether a response may be stored, for how long it is fresh, and whether and how long it
//!   may be served stale when the origin fails ([`store_policy`]);
//! * how a stored response's headers are updated by a `304 Not Modified` ([`merge_304`]);
//!   the caller then runs [`store_policy`] again on the merged map to get the new freshness;
//! * whether a request demands revalidation ([`request_requires_revalidation`]).
//!
//! It is pure: no I/O and no clock. The current time is always a `now: SystemTime` parameter,
//! so every decision is reproducible in tests.
//!
//! Two invariants hold for every input:
//!
//! * **It never panics on header input.** Header values are arbitrary bytes from the network
//!   (non-UTF-8, unterminated quotes, huge numbers, dates far in the past or future); they are
//!   parsed leniently and all time arithmetic saturates. A property test feeds it random bytes.
//! * **It never stores what the origin forbids.** When a header is ambiguous the stricter
//!   reading wins: an invalid `max-age`/`s-maxage` means "already stale", an invalid `Expires`
//!   means "already expired", a qualified `no-cache="…"`/`private="…"` is treated as the
//!   unqualified (stronger) directive, and any `Vary` other than `Accept-Encoding` prevents
//!   storage.
//!
//! Age is computed for a cache that receives the response at `now` (RFC 9111 §4.2.3 with
//! `response_time = now` and no request delay): `max(now − Date, Age)`.

use http::header::{
    HeaderName, AGE, CACHE_CONTROL, CONNECTION, DATE, EXPIRES, PRAGMA, SET_COOKIE, VARY,
};
use http::HeaderMap;
use std::time::{Duration, SystemTime};

/// Largest delta-seconds value kept: RFC 9111 §1.2.2 lets a cache treat anything larger
/// (including values that overflow) as 2^31 seconds (~68 years).
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The directives of all `Cache-Control` fields of a message (RFC 9111 §5.2).
///
/// Response directives and request directives share the struct; each side ignores the ones
/// that do not apply to it. Unknown extensions are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    /// `no-cache`, also in its qualified form `no-cache="field"` (treated as unqualified).
    pub no_cache: bool,
    /// `private`, also in its qualified form `private="field"` (treated as unqualified).
    pub private: bool,
    pub public: bool,
    /// Seconds; an invalid value is recorded as `Some(0)` (stale).
    pub max_age: Option<u64>,
    /// Seconds; an invalid value is recorded as `Some(0)` (stale).
    pub s_maxage: Option<u64>,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_if_error: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    /// Request directive.
    pub only_if_cached: bool,
    /// Request directive: `Some(None)` for a bare `max-stale` (any staleness), `Some(Some(n))`
    /// for `max-stale=n`.
    pub max_stale: Option<Option<u64>>,
    /// Request directive.
    pub min_fresh: Option<u64>,
}

/// Parse all `Cache-Control` field values of a header map.
///
/// * Values are comma-separated lists, possibly spread over several field lines; empty list
///   elements are skipped. Directive names are case-insensitive. Arguments may be tokens or
///   quoted strings (with `\` escapes); commas inside quoted strings do not split. An
///   unterminated quoted string runs to the end of its field line.
/// * Qualified forms `no-cache="Set-Cookie"` and `private="Set-Cookie"` are treated as the
///   unqualified directive: this cache does not strip individual fields, so it takes the
///   stronger meaning (revalidate every use / do not store). Likewise `no-store`,
///   `must-revalidate`, `proxy-revalidate` and `only-if-cached` are honoured whatever argument
///   they carry. `public` with an argument is malformed and, being a permission, is ignored.
/// * Duplicate directives: the first occurrence wins.
/// * Numeric arguments (delta-seconds) must be one or more ASCII digits, quoted or not; values
///   above 2^31 are clamped to 2^31 ([`MAX_DELTA_SECONDS`]). An invalid number makes the
///   directive ignored (as if absent, so a later valid occurrence may still apply) — except
///   `max-age` and `s-maxage`, where an invalid or missing value means "stale" and is
///   recorded as `Some(0)` (and, being the first occurrence, wins).
/// * Non-UTF-8 bytes are tolerated: they can only make a name unknown or a number invalid.
pub fn parse_cache_control(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    for value in headers.get_all(CACHE_CONTROL) {
        for (name, arg) in Directives::new(value.as_bytes()) {
            apply_directive(&mut cc, name, arg);
        }
    }
    cc
}

/// A directive's argument: absent, present and well-formed, or present but malformed
/// (unterminated quoted string).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    None,
    Value(Vec<u8>),
    Malformed,
}

fn apply_directive(cc: &mut CacheControl, name: &[u8], arg: Arg) {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    // A stale-meaning number: invalid → 0.
    let stale_num = |arg: &Arg| delta_seconds_arg(arg).unwrap_or(0);
    if is("no-store") {
        cc.no_store = true;
    } else if is("no-cache") {
        cc.no_cache = true;
    } else if is("private") {
        cc.private = true;
    } else if is("public") {
        if arg == Arg::None {
            cc.public = true;
        }
    } else if is("must-revalidate") {
        cc.must_revalidate = true;
    } else if is("proxy-revalidate") {
        cc.proxy_revalidate = true;
    } else if is("only-if-cached") {
        cc.only_if_cached = true;
    } else if is("max-age") {
        if cc.max_age.is_none() {
            cc.max_age = Some(stale_num(&arg));
        }
    } else if is("s-maxage") {
        if cc.s_maxage.is_none() {
            cc.s_maxage = Some(stale_num(&arg));
        }
    } else if is("stale-if-error") {
        if cc.stale_if_error.is_none() {
            cc.stale_if_error = delta_seconds_arg(&arg);
        }
    } else if is("stale-while-revalidate") {
        if cc.stale_while_revalidate.is_none() {
            cc.stale_while_revalidate = delta_seconds_arg(&arg);
        }
    } else if is("min-fresh") {
        if cc.min_fresh.is_none() {
            cc.min_fresh = delta_seconds_arg(&arg);
        }
    } else if is("max-stale") && cc.max_stale.is_none() {
        cc.max_stale = match arg {
            Arg::None => Some(None),
            ref a => delta_seconds_arg(a).map(Some),
        };
    }
}

fn delta_seconds_arg(arg: &Arg) -> Option<u64> {
    match arg {
        Arg::Value(v) => parse_delta_seconds(v),
        Arg::None | Arg::Malformed => None,
    }
}

/// `delta-seconds = 1*DIGIT`, clamped to [`MAX_DELTA_SECONDS`]. Surrounding whitespace is
/// tolerated; signs, decimals and anything else are not.
pub fn parse_delta_seconds(bytes: &[u8]) -> Option<u64> {
    let bytes = trim_ows(bytes);
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if n > MAX_DELTA_SECONDS {
            return Some(MAX_DELTA_SECONDS);
        }
    }
    Some(n)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_ows(*first) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if is_ows(*last) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Iterator over the `name[=arg]` elements of one comma-separated field line.
struct Directives<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Directives<'a> {
    fn new(s: &'a [u8]) -> Self {
        Directives { s, i: 0 }
    }
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a [u8], Arg);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.s;
        loop {
            // Skip separators and whitespace between elements.
            while self.i < s.len() && (s[self.i] == b',' || is_ows(s[self.i])) {
                self.i += 1;
            }
            if self.i >= s.len() {
                return None;
            }
            let start = self.i;
            while self.i < s.len() && s[self.i] != b',' && s[self.i] != b'=' {
                self.i += 1;
            }
            let name = trim_ows(&s[start..self.i]);
            let arg = if self.i < s.len() && s[self.i] == b'=' {
                self.i += 1;
                while self.i < s.len() && is_ows(s[self.i]) {
                    self.i += 1;
                }
                if self.i < s.len() && s[self.i] == b'"' {
                    self.i += 1;
                    let mut out = Vec::new();
                    let mut closed = false;
                    while self.i < s.len() {
                        let b = s[self.i];
                        self.i += 1;
                        match b {
                            b'"' => {
                                closed = true;
                                break;
                            }
                            b'\\' if self.i < s.len() => {
                                out.push(s[self.i]);
                                self.i += 1;
                            }
                            _ => out.push(b),
                        }
                    }
                    // Anything between the closing quote and the next comma is junk; skip it.
                    while self.i < s.len() && s[self.i] != b',' {
                        self.i += 1;
                    }
                    if closed {
                        Arg::Value(out)
                    } else {
                        Arg::Malformed
                    }
                } else {
                    let vstart = self.i;
                    while self.i < s.len() && s[self.i] != b',' {
                        self.i += 1;
                    }
                    Arg::Value(trim_ows(&s[vstart..self.i]).to_vec())
                }
            } else {
                Arg::None
            };
            if name.is_empty() {
                // e.g. "=5": no directive name, nothing to apply.
                continue;
            }
            return Some((name, arg));
        }
    }
}

/// What a shared cache may do with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storability {
    /// Store; fresh for `fresh_for` from `now` (already reduced by the response's current age;
    /// may be zero, e.g. no-cache: stored but must be revalidated before each use), may be
    /// served stale on origin errors for `stale_if_error` past expiry (the origin's
    /// stale-if-error directive if present, else the operator default passed in), and
    /// `must_revalidate` forbids any stale serving (then stale_if_error is zero).
    Store {
        fresh_for: Duration,
        stale_if_error: Duration,
        must_revalidate: bool,
    },
    /// Not stored; the reason is a short static string for logs/Cache-Status detail:
    /// "status", "no-store", "private", "set-cookie", "vary", "authorization", "no-freshness".
    NoStore(&'static str),
}

impl Storability {
    pub fn is_store(&self) -> bool {
        matches!(self, Storability::Store { .. })
    }
}

/// Everything [`store_policy`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct StorePolicyInput<'a> {
    /// 200 or 206 are storable for a chunk cache; anything else → `NoStore("status")`.
    pub status: u16,
    /// The response headers.
    pub headers: &'a HeaderMap,
    pub request_has_authorization: bool,
    /// Operator fallback when the response has no explicit freshness; `None` = don't store
    /// such responses.
    pub default_ttl: Option<Duration>,
    /// Stale-if-error window used when the response has no `stale-if-error` directive.
    pub default_stale_if_error: Duration,
    pub now: SystemTime,
}

/// Decide whether and how a shared cache may store a response (RFC 9111 §3, §4.2, §5.2).
///
/// Checked in this order, the first match deciding:
///
/// 1. status other than 200/206 → `NoStore("status")`;
/// 2. `no-store` → `NoStore("no-store")`; `private` (qualified or not) → `NoStore("private")`;
/// 3. any `Set-Cookie` → `NoStore("set-cookie")`;
/// 4. `Vary` naming anything but `Accept-Encoding` (including `*`) → `NoStore("vary")`
///    (`Vary: Accept-Encoding` is stored; the caller must keep encodings apart, e.g. by
///    normalising the request's `Accept-Encoding` or keying on it);
/// 5. request had `Authorization` and the response has none of `public`, `s-maxage`,
///    `must-revalidate` (§3.5) → `NoStore("authorization")`;
/// 6. `no-cache` → `Store` with `fresh_for = 0` and `must_revalidate = true` (§4.2.4 forbids
///    serving a `no-cache` response stale, so no stale-if-error either);
/// 7. freshness lifetime: `s-maxage`, else `max-age`, else `Expires − Date` (Date absent or
///    invalid → `now`; invalid `Expires` → 0), else `default_ttl`, else
///    `NoStore("no-freshness")`; `fresh_for = lifetime − current age`, saturating at 0, where
///    current age is `max(now − Date, Age)`;
/// 8. `must-revalidate`, `proxy-revalidate` or `s-maxage` → `must_revalidate = true` and
///    `stale_if_error = 0`; otherwise `stale_if_error` is the response's `stale-if-error`
///    directive, else `default_stale_if_error`.
///
/// After a `304 Not Modified`, pass [`merge_304`]'s result here again to get the new freshness.
pub fn store_policy(input: &StorePolicyInput) -> Storability {
    if input.status != 200 && input.status != 206 {
        return Storability::NoStore("status");
    }
    let headers = input.headers;
    let cc = parse_cache_control(headers);
    if cc.no_store {
        return Storability::NoStore("no-store");
    }
    if cc.private {
        return Storability::NoStore("private");
    }
    if headers.contains_key(SET_COOKIE) {
        return Storability::NoStore("set-cookie");
    }
    if vary_prevents_storage(headers) {
        return Storability::NoStore("vary");
    }
    if input.request_has_authorization
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Storability::NoStore("authorization");
    }
    if cc.no_cache {
        return Storability::Store {
            fresh_for: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: true,
        };
    }
    let Some(lifetime) = freshness_lifetime(&cc, headers, input.default_ttl, input.now) else {
        return Storability::NoStore("no-freshness");
    };
    let fresh_for = lifetime.saturating_sub(current_age(headers, input.now));
    let must_revalidate = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let stale_if_error = if must_revalidate {
        Duration::ZERO
    } else {
        cc.stale_if_error
            .map(Duration::from_secs)
            .unwrap_or(input.default_stale_if_error)
    };
    Storability::Store {
        fresh_for,
        stale_if_error,
        must_revalidate,
    }
}

/// Whether the response's `Vary` names any field other than `Accept-Encoding` (`*` included).
/// Non-UTF-8 or otherwise odd elements count as "other". Empty elements are ignored.
pub fn vary_prevents_storage(headers: &HeaderMap) -> bool {
    headers.get_all(VARY).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(trim_ows)
            .filter(|f| !f.is_empty())
            .any(|f| !f.eq_ignore_ascii_case(b"accept-encoding"))
    })
}

/// The response's freshness lifetime for a shared cache (RFC 9111 §4.2.1): `s-maxage`, else
/// `max-age`, else `Expires − Date` (Date absent or invalid → `now`; invalid Expires → 0),
/// else `default_ttl`. `None` when there is nothing to go on.
pub fn freshness_lifetime(
    cc: &CacheControl,
    headers: &HeaderMap,
    default_ttl: Option<Duration>,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(secs.min(MAX_DELTA_SECONDS)));
    }
    if let Some(expires) = headers.get(EXPIRES) {
        let Some(expires) = parse_date(expires.as_bytes()) else {
            return Some(Duration::ZERO);
        };
        let date = header_date(headers).unwrap_or(now);
        return Some(expires.duration_since(date).unwrap_or(Duration::ZERO));
    }
    default_ttl
}

/// The response's current age when received at `now` (RFC 9111 §4.2.3, with no transit
/// delay): the larger of `now − Date` (0 when Date is absent, invalid or in the future) and
/// the `Age` header (ignored when invalid).
pub fn current_age(headers: &HeaderMap, now: SystemTime) -> Duration {
    let apparent = header_date(headers)
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let age = headers
        .get(AGE)
        .and_then(|v| parse_delta_seconds(v.as_bytes()))
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO);
    apparent.max(age)
}

/// The first `Date` header, if it parses as an HTTP-date.
fn header_date(headers: &HeaderMap) -> Option<SystemTime> {
    headers.get(DATE).and_then(|v| parse_date(v.as_bytes()))
}

fn parse_date(bytes: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(trim_ows(bytes)).ok()?;
    httpdate::parse_http_date(s).ok()
}

/// Fields never taken from a 304: framing of the stored body and hop-by-hop fields.
const NOT_UPDATED: [&str; 11] = [
    "content-length",
    "content-range",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Update a stored response's headers with those of a `304 Not Modified` (RFC 9111 §3.2,
/// §4.3.4).
///
/// Every field present in the 304 replaces all stored lines of that field, except
/// `Content-Length`, `Content-Range`, `Transfer-Encoding`, hop-by-hop fields (`Connection`,
/// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`,
/// `Trailer`, `Upgrade`) and any field the 304's `Connection` nominates. Fields absent from
/// the 304 are kept — with one exception: `Date` and `Age` always come from the 304, and are
/// dropped when it lacks them, because the stored ones describe the old response and would
/// make the just-validated response look old. (With `Date` absent [`store_policy`] measures
/// from `now`; the caller may add its own `Date` for the client.)
///
/// The caller passes the result to [`store_policy`] again (status of the stored response,
/// `now` of the 304's receipt) to get the new freshness; the 304 may also have made the
/// response unstorable (e.g. it now carries `no-store` or `Set-Cookie`).
pub fn merge_304(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let nominated: Vec<HeaderName> = not_modified
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim_ows)
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    let mut out = stored.clone();
    out.remove(DATE);
    out.remove(AGE);
    for name in not_modified.keys() {
        if NOT_UPDATED.contains(&name.as_str()) || nominated.contains(name) {
            continue;
        }
        out.remove(name);
        for value in not_modified.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Whether a request's own headers forbid answering it from cache without revalidation:
/// request `Cache-Control: no-cache`, or `Pragma: no-cache` when the request has no
/// `Cache-Control` at all (RFC 9111 §5.4: Pragma is ignored when Cache-Control is present).
///
/// Other request directives (`max-age=0`, `min-fresh`, ...) are not considered here; see
/// [`parse_cache_control`] if the caller wants to honour them.
pub fn request_requires_revalidation(req_headers: &HeaderMap) -> bool {
    if req_headers.contains_key(CACHE_CONTROL) {
        return parse_cache_control(req_headers).no_cache;
    }
    req_headers.get_all(PRAGMA).iter().any(|v| {
        Directives::new(v.as_bytes()).any(|(name, _)| name.eq_ignore_ascii_case(b"no-cache"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderValue, CONTENT_LENGTH};
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// An HTTP-date `offset` seconds from `now()` (negative = past).
    fn date(offset: i64) -> String {
        let t = if offset >= 0 {
            now() + Duration::from_secs(offset as u64)
        } else {
            now() - Duration::from_secs(offset.unsigned_abs())
        };
        httpdate::fmt_http_date(t)
    }

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

    fn cc(values: &[&str]) -> CacheControl {
        let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("cache-control", *v)).collect();
        parse_cache_control(&hm(&pairs))
    }

    const SIE: Duration = Duration::from_secs(300);

    fn store(fresh: u64, sie: u64, must_revalidate: bool) -> Storability {
        Storability::Store {
            fresh_for: Duration::from_secs(fresh),
            stale_if_error: Duration::from_secs(sie),
            must_revalidate,
        }
    }

    struct Case {
        name: &'static str,
        status: u16,
        headers: Vec<(&'static str, String)>,
        auth: bool,
        default_ttl: Option<u64>,
        want: Storability,
    }

    fn case(name: &'static str, headers: &[(&'static str, &str)], want: Storability) -> Case {
        Case {
            name,
            status: 200,
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            auth: false,
            default_ttl: None,
            want,
        }
    }

    #[test]
    fn store_policy_table() {
        let d0 = date(0);
        let cases = vec![
            // max-age
            case(
                "max-age",
                &[("cache-control", "max-age=60")],
                store(60, 300, false),
            ),
            case(
                "max-age=0",
                &[("cache-control", "max-age=0")],
                store(0, 300, false),
            ),
            case(
                "invalid max-age is stale",
                &[("cache-control", "max-age=abc")],
                store(0, 300, false),
            ),
            case(
                "quoted max-age accepted",
                &[("cache-control", "max-age=\"60\"")],
                store(60, 300, false),
            ),
            case(
                "first max-age wins",
                &[("cache-control", "max-age=60, max-age=10")],
                store(60, 300, false),
            ),
            case(
                "huge max-age clamped",
                &[("cache-control", "max-age=99999999999999999999999")],
                store(MAX_DELTA_SECONDS, 300, false),
            ),
            // s-maxage precedence
            case(
                "s-maxage over max-age",
                &[("cache-control", "max-age=60, s-maxage=120")],
                store(120, 0, true),
            ),
            case(
                "s-maxage over Expires",
                &[
                    ("cache-control", "s-maxage=5"),
                    ("date", &d0),
                    ("expires", &date(600)),
                ],
                store(5, 0, true),
            ),
            case(
                "max-age over Expires",
                &[("cache-control", "max-age=5"), ("expires", &date(600))],
                store(5, 300, false),
            ),
            // Expires / Date
            case(
                "Expires - Date",
                &[("date", &date(-100)), ("expires", &date(500))],
                store(500, 300, false),
            ),
            case(
                "Expires without Date uses now",
                &[("expires", &date(500))],
                store(500, 300, false),
            ),
            case(
                "Expires in the past",
                &[("date", &d0), ("expires", &date(-10))],
                store(0, 300, false),
            ),
            case(
                "invalid Expires is expired",
                &[("expires", "0")],
                store(0, 300, false),
            ),
            case(
                "invalid Date treated as absent",
                &[("date", "nope"), ("expires", &date(50))],
                store(50, 300, false),
            ),
            // Age
            case(
                "Age reduces fresh_for",
                &[("cache-control", "max-age=60"), ("age", "20")],
                store(40, 300, false),
            ),
            case(
                "Date reduces fresh_for",
                &[("cache-control", "max-age=60"), ("date", &date(-30))],
                store(30, 300, false),
            ),
            case(
                "max of Age and now-Date",
                &[
                    ("cache-control", "max-age=60"),
                    ("date", &date(-30)),
                    ("age", "10"),
                ],
                store(30, 300, false),
            ),
            case(
                "Age larger than Date age",
                &[
                    ("cache-control", "max-age=60"),
                    ("date", &date(-5)),
                    ("age", "45"),
                ],
                store(15, 300, false),
            ),
            case(
                "Age beyond lifetime saturates",
                &[("cache-control", "max-age=60"), ("age", "600")],
                store(0, 300, false),
            ),
            case(
                "future Date is age 0",
                &[("cache-control", "max-age=60"), ("date", &date(1000))],
                store(60, 300, false),
            ),
            case(
                "invalid Age ignored",
                &[("cache-control", "max-age=60"), ("age", "-5")],
                store(60, 300, false),
            ),
            // no-cache
            case(
                "no-cache",
                &[("cache-control", "no-cache, max-age=60")],
                store(0, 0, true),
            ),
            case(
                "no-cache qualified",
                &[("cache-control", "no-cache=\"Set-Cookie, X\", max-age=60")],
                store(0, 0, true),
            ),
            case(
                "no-cache without freshness still stored",
                &[("cache-control", "no-cache")],
                store(0, 0, true),
            ),
            // private / no-store / Set-Cookie / Vary
            case(
                "private",
                &[("cache-control", "private, max-age=60")],
                Storability::NoStore("private"),
            ),
            case(
                "private qualified",
                &[("cache-control", "max-age=60, private=\"X-Foo\"")],
                Storability::NoStore("private"),
            ),
            case(
                "no-store",
                &[("cache-control", "max-age=60, NO-STORE")],
                Storability::NoStore("no-store"),
            ),
            case(
                "no-store in second field line",
                &[
                    ("cache-control", "max-age=60"),
                    ("cache-control", "no-store"),
                ],
                Storability::NoStore("no-store"),
            ),
            case(
                "set-cookie",
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "a=b"),
                ],
                Storability::NoStore("set-cookie"),
            ),
            case(
                "vary accept-encoding",
                &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
                store(60, 300, false),
            ),
            case(
                "vary accept-encoding lists",
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", " accept-encoding , ACCEPT-ENCODING,"),
                    ("vary", ""),
                ],
                store(60, 300, false),
            ),
            case(
                "vary cookie",
                &[("cache-control", "max-age=60"), ("vary", "Cookie")],
                Storability::NoStore("vary"),
            ),
            case(
                "vary star",
                &[("cache-control", "max-age=60"), ("vary", "*")],
                Storability::NoStore("vary"),
            ),
            case(
                "vary mixed",
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", "Accept-Encoding, User-Agent"),
                ],
                Storability::NoStore("vary"),
            ),
            // stale-if-error
            case(
                "stale-if-error directive",
                &[("cache-control", "max-age=60, stale-if-error=86400")],
                store(60, 86400, false),
            ),
            case(
                "invalid stale-if-error uses default",
                &[("cache-control", "max-age=60, stale-if-error=x")],
                store(60, 300, false),
            ),
            case(
                "must-revalidate zeroes stale",
                &[(
                    "cache-control",
                    "max-age=60, stale-if-error=86400, must-revalidate",
                )],
                store(60, 0, true),
            ),
            case(
                "proxy-revalidate zeroes stale",
                &[("cache-control", "max-age=60, proxy-revalidate")],
                store(60, 0, true),
            ),
            // no freshness
            case(
                "no freshness, no default",
                &[("content-type", "text/plain")],
                Storability::NoStore("no-freshness"),
            ),
            case(
                "public alone, no default",
                &[("cache-control", "public")],
                Storability::NoStore("no-freshness"),
            ),
        ];
        let mut cases = cases;
        cases.extend([
            Case {
                status: 206,
                ..case(
                    "max-age with 206",
                    &[("cache-control", "max-age=60")],
                    store(60, 300, false),
                )
            },
            Case {
                default_ttl: Some(90),
                ..case(
                    "invalid Expires beats default_ttl",
                    &[("expires", "garbage")],
                    store(0, 300, false),
                )
            },
            Case {
                status: 404,
                ..case(
                    "404",
                    &[("cache-control", "max-age=60")],
                    Storability::NoStore("status"),
                )
            },
            Case {
                status: 304,
                ..case(
                    "304",
                    &[("cache-control", "max-age=60")],
                    Storability::NoStore("status"),
                )
            },
            Case {
                status: 204,
                ..case(
                    "204",
                    &[("cache-control", "max-age=60")],
                    Storability::NoStore("status"),
                )
            },
            // default_ttl fallback
            Case {
                default_ttl: Some(90),
                ..case("default ttl", &[], store(90, 300, false))
            },
            Case {
                default_ttl: Some(90),
                ..case(
                    "default ttl reduced by age",
                    &[("age", "30")],
                    store(60, 300, false),
                )
            },
            Case {
                default_ttl: Some(90),
                ..case(
                    "explicit beats default",
                    &[("cache-control", "max-age=10")],
                    store(10, 300, false),
                )
            },
            Case {
                default_ttl: Some(90),
                ..case(
                    "default never overrides private",
                    &[("cache-control", "private")],
                    Storability::NoStore("private"),
                )
            },
            // Authorization (§3.5)
            Case {
                auth: true,
                ..case(
                    "auth without public",
                    &[("cache-control", "max-age=60")],
                    Storability::NoStore("authorization"),
                )
            },
            Case {
                auth: true,
                default_ttl: Some(90),
                ..case(
                    "auth with default ttl only",
                    &[],
                    Storability::NoStore("authorization"),
                )
            },
            Case {
                auth: true,
                ..case(
                    "auth with public",
                    &[("cache-control", "public, max-age=60")],
                    store(60, 300, false),
                )
            },
            Case {
                auth: true,
                ..case(
                    "auth with s-maxage",
                    &[("cache-control", "s-maxage=60")],
                    store(60, 0, true),
                )
            },
            Case {
                auth: true,
                ..case(
                    "auth with must-revalidate",
                    &[("cache-control", "must-revalidate, max-age=60")],
                    store(60, 0, true),
                )
            },
            Case {
                auth: true,
                ..case(
                    "auth with proxy-revalidate is not enough",
                    &[("cache-control", "proxy-revalidate, max-age=60")],
                    Storability::NoStore("authorization"),
                )
            },
            Case {
                auth: true,
                ..case(
                    "auth with public=arg is not public",
                    &[("cache-control", "public=x, max-age=60")],
                    Storability::NoStore("authorization"),
                )
            },
        ]);
        for c in &cases {
            let pairs: Vec<(&str, &str)> =
                c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let headers = hm(&pairs);
            let got = store_policy(&StorePolicyInput {
                status: c.status,
                headers: &headers,
                request_has_authorization: c.auth,
                default_ttl: c.default_ttl.map(Duration::from_secs),
                default_stale_if_error: SIE,
                now: now(),
            });
            assert_eq!(got, c.want, "case {:?}", c.name);
        }
    }

    #[test]
    fn parse_cache_control_table() {
        let cases: Vec<(&[&str], CacheControl)> = vec![
            (&[""], CacheControl::default()),
            (&[" , ,, "], CacheControl::default()),
            (
                &["Max-Age=60, S-MAXAGE=30, PUBLIC"],
                CacheControl {
                    max_age: Some(60),
                    s_maxage: Some(30),
                    public: true,
                    ..Default::default()
                },
            ),
            (
                &["max-age = 60"],
                CacheControl {
                    max_age: Some(60),
                    ..Default::default()
                },
            ),
            (
                &["max-age"],
                CacheControl {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=-1"],
                CacheControl {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=1.5"],
                CacheControl {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=\"60"],
                CacheControl {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=x", "max-age=60"],
                CacheControl {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=60", "max-age=x"],
                CacheControl {
                    max_age: Some(60),
                    ..Default::default()
                },
            ),
            (
                &["s-maxage=\"\""],
                CacheControl {
                    s_maxage: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["stale-if-error=x, stale-if-error=30"],
                CacheControl {
                    stale_if_error: Some(30),
                    ..Default::default()
                },
            ),
            (
                &["stale-while-revalidate=10, stale-if-error=20"],
                CacheControl {
                    stale_while_revalidate: Some(10),
                    stale_if_error: Some(20),
                    ..Default::default()
                },
            ),
            (
                &["no-cache=\"set-cookie,x-foo\", max-age=5"],
                CacheControl {
                    no_cache: true,
                    max_age: Some(5),
                    ..Default::default()
                },
            ),
            (
                &["private=\"a\\\"b, c\", must-revalidate"],
                CacheControl {
                    private: true,
                    must_revalidate: true,
                    ..Default::default()
                },
            ),
            (
                &["no-store, proxy-revalidate, only-if-cached"],
                CacheControl {
                    no_store: true,
                    proxy_revalidate: true,
                    only_if_cached: true,
                    ..Default::default()
                },
            ),
            (
                &["max-stale"],
                CacheControl {
                    max_stale: Some(None),
                    ..Default::default()
                },
            ),
            (
                &["max-stale=30"],
                CacheControl {
                    max_stale: Some(Some(30)),
                    ..Default::default()
                },
            ),
            (&["max-stale=z"], CacheControl::default()),
            (
                &["min-fresh=10"],
                CacheControl {
                    min_fresh: Some(10),
                    ..Default::default()
                },
            ),
            (&["public=\"x\""], CacheControl::default()),
            (&["=5, foo=bar, x-ext"], CacheControl::default()),
            (
                &["max-age=\"60\"junk, public"],
                CacheControl {
                    max_age: Some(60),
                    public: true,
                    ..Default::default()
                },
            ),
        ];
        for (values, want) in cases {
            assert_eq!(cc(values), want, "values {values:?}");
        }
        // Non-UTF-8 bytes do not disturb the directives around them.
        let mut h = HeaderMap::new();
        h.append(
            CACHE_CONTROL,
            HeaderValue::from_bytes(b"max-age=7, \xff\xfe, no-cache").unwrap(),
        );
        let got = parse_cache_control(&h);
        assert_eq!(
            got,
            CacheControl {
                max_age: Some(7),
                no_cache: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(parse_delta_seconds(b"0"), Some(0));
        assert_eq!(parse_delta_seconds(b" 42 "), Some(42));
        assert_eq!(parse_delta_seconds(b"2147483648"), Some(MAX_DELTA_SECONDS));
        assert_eq!(parse_delta_seconds(b"2147483649"), Some(MAX_DELTA_SECONDS));
        assert_eq!(parse_delta_seconds(&[b'9'; 100]), Some(MAX_DELTA_SECONDS));
        for bad in [&b""[..], b"+1", b"-1", b"1e3", b"0x10", b"1 2", b"\xff"] {
            assert_eq!(parse_delta_seconds(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn merge_304_replaces_and_keeps() {
        let stored = hm(&[
            ("content-type", "text/plain"),
            ("content-length", "100"),
            ("content-range", "bytes 0-99/1000"),
            ("etag", "\"v1\""),
            ("cache-control", "max-age=10"),
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("x-keep", "k"),
            ("date", &date(-1000)),
            ("age", "500"),
        ]);
        let not_modified = hm(&[
            ("cache-control", "max-age=600"),
            ("etag", "\"v1\""),
            ("x-multi", "c"),
            ("content-length", "0"),
            ("content-range", "bytes */1000"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive, X-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("upgrade", "h2c"),
            ("date", &date(0)),
        ]);
        let merged = merge_304(&stored, &not_modified);
        let all = |n: &str| -> Vec<&str> {
            merged
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("cache-control"), ["max-age=600"]);
        assert_eq!(all("content-length"), ["100"]);
        assert_eq!(all("content-range"), ["bytes 0-99/1000"]);
        assert_eq!(all("content-type"), ["text/plain"]);
        assert_eq!(all("x-multi"), ["c"]);
        assert_eq!(all("x-keep"), ["k"]);
        assert_eq!(all("date"), [date(0).as_str()]);
        assert!(all("age").is_empty(), "stale Age dropped");
        for hop in [
            "transfer-encoding",
            "connection",
            "keep-alive",
            "x-hop",
            "upgrade",
        ] {
            assert!(all(hop).is_empty(), "{hop} must not be merged");
        }
        // The caller re-runs store_policy on the merged headers: fresh for the 304's max-age.
        let again = store_policy(&StorePolicyInput {
            status: 206,
            headers: &merged,
            request_has_authorization: false,
            default_ttl: None,
            default_stale_if_error: SIE,
            now: now(),
        });
        assert_eq!(again, store(600, 300, false));

        // A 304 without Date/Age: the stored ones are dropped, freshness measured from now.
        let merged = merge_304(&stored, &hm(&[("cache-control", "max-age=60")]));
        assert!(merged.get(DATE).is_none() && merged.get(AGE).is_none());
        let again = store_policy(&StorePolicyInput {
            status: 200,
            headers: &merged,
            request_has_authorization: false,
            default_ttl: None,
            default_stale_if_error: SIE,
            now: now(),
        });
        assert_eq!(again, store(60, 300, false));

        // A 304 that now forbids storage wins.
        let merged = merge_304(&stored, &hm(&[("cache-control", "no-store")]));
        let again = store_policy(&StorePolicyInput {
            status: 200,
            headers: &merged,
            request_has_authorization: false,
            default_ttl: Some(Duration::from_secs(60)),
            default_stale_if_error: SIE,
            now: now(),
        });
        assert_eq!(again, Storability::NoStore("no-store"));
    }

    #[test]
    fn request_revalidation() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("cache-control", "no-cache")], true),
            (&[("cache-control", "max-age=0, No-Cache")], true),
            (&[("cache-control", "max-age=0")], false),
            (&[("pragma", "no-cache")], true),
            (&[("pragma", "x, NO-CACHE")], true),
            (&[("pragma", "nothing")], false),
            (
                &[("pragma", "no-cache"), ("cache-control", "max-age=10")],
                false,
            ),
            (&[("pragma", "no-cache"), ("cache-control", "")], false),
        ];
        for (headers, want) in cases {
            assert_eq!(
                request_requires_revalidation(&hm(headers)),
                *want,
                "{headers:?}"
            );
        }
    }

    fn header_name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            Just(CACHE_CONTROL),
            Just(EXPIRES),
            Just(DATE),
            Just(AGE),
            Just(VARY),
            Just(SET_COOKIE),
            Just(PRAGMA),
            Just(CONNECTION),
            Just(CONTENT_LENGTH),
            Just(HeaderName::from_static("x-other")),
        ]
    }

    /// Arbitrary bytes mapped into what `HeaderValue` accepts (no controls but HTAB).
    fn raw_value() -> impl Strategy<Value = HeaderValue> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|bytes| {
            let bytes: Vec<u8> = bytes
                .into_iter()
                .map(|b| {
                    if (b < 0x20 && b != b'\t') || b == 0x7f {
                        b' '
                    } else {
                        b
                    }
                })
                .collect();
            HeaderValue::from_bytes(&bytes).unwrap()
        })
    }

    /// Values built from cache-control-ish fragments, to reach the parser's corners.
    fn grammar_value() -> impl Strategy<Value = HeaderValue> {
        let piece = prop_oneof![
            Just("max-age".to_string()),
            Just("s-maxage".to_string()),
            Just("no-cache".to_string()),
            Just("private".to_string()),
            Just("stale-if-error".to_string()),
            Just("max-stale".to_string()),
            Just("accept-encoding".to_string()),
            Just("=".to_string()),
            Just("\"".to_string()),
            Just("\\".to_string()),
            Just(",".to_string()),
            Just(" ".to_string()),
            Just("Thu, 01 Jan 1970 00:00:00 GMT".to_string()),
            Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
            "[0-9]{1,25}",
        ];
        proptest::collection::vec(piece, 0..12)
            .prop_map(|p| HeaderValue::from_str(&p.concat()).unwrap())
    }

    proptest! {
        #[test]
        fn never_panics(
            fields in proptest::collection::vec(
                (header_name(), prop_oneof![raw_value(), grammar_value()]), 0..10),
            status in prop_oneof![Just(200u16), Just(206u16), any::<u16>()],
            auth in any::<bool>(),
            ttl in proptest::option::of(any::<u64>()),
            sie in any::<u64>(),
            now_secs in prop_oneof![Just(0u64), Just(1_700_000_000u64), 0u64..400_000_000_000u64],
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in fields {
                headers.append(name, value);
            }
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            let _ = parse_cache_control(&headers);
            let _ = request_requires_revalidation(&headers);
            let input = StorePolicyInput {
                status,
                headers: &headers,
                request_has_authorization: auth,
                default_ttl: ttl.map(Duration::from_secs),
                default_stale_if_error: Duration::from_secs(sie),
                now,
            };
            if let Storability::Store { stale_if_error, must_revalidate, .. } = store_policy(&input) {
                prop_assert!(!must_revalidate || stale_if_error.is_zero());
            }
            let merged = merge_304(&headers, &headers);
            let _ = store_policy(&StorePolicyInput { headers: &merged, ..input });
        }

        /// Whatever else the headers say, no-store and private are never stored.
        #[test]
        fn forbidden_never_stored(
            extra in proptest::collection::vec((header_name(), grammar_value()), 0..6),
            forbid in prop_oneof![Just("no-store"), Just("private"), Just("PRIVATE=\"x\"")],
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in extra {
                headers.append(name, value);
            }
            headers.append(CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
            headers.append(CACHE_CONTROL, HeaderValue::from_str(forbid).unwrap());
            let got = store_policy(&StorePolicyInput {
                status: 200,
                headers: &headers,
                request_has_authorization: false,
                default_ttl: Some(Duration::from_secs(60)),
                default_stale_if_error: Duration::from_secs(60),
                now: now(),
            });
            prop_assert!(!got.is_store());
        }
    }
}
