//! HTTP caching policy for a shared cache (RFC 9111, RFC 9213 targeted fields, plus RFC 5861
//! `stale-if-error` / `stale-while-revalidate`).
//!
//! This module decides, from headers alone:
//!
//! * what a `Cache-Control` field says ([`parse_cache_control`]), and which directives this
//!   cache obeys: `Edgeslice-Cache-Control`, else `CDN-Cache-Control`, else `Cache-Control`
//!   ([`response_cache_control`]; a valid targeted field also silences `Expires`);
//! * whether a response may be stored, for how long it is fresh (explicit, else the
//!   Last-Modified heuristic, else the operator's `default_ttl`), and whether and how long it
//!   may be served stale ([`store_policy`]); which statuses need no explicit freshness
//!   ([`heuristically_cacheable`]); how old a response is on receipt ([`initial_age`]);
//! * how a stored response's headers are updated by a `304 Not Modified` or a `HEAD`
//!   ([`merge_304`]); the caller then runs [`store_policy`] again on the merged map;
//! * what a request's directives say ([`request_directives`]) and whether a stored response
//!   may answer it fresh, stale, or only after revalidation ([`reuse`]).
//!
//! `Vary` lives beside it in [`crate::cache::vary`]: only `Vary: *` prevents storage here.
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
//!   unqualified (stronger) directive, a status outside the heuristically cacheable set needs
//!   explicit freshness, and `Vary: *` (or a `Vary` element that is no field name) prevents
//!   storage. On the request side an invalid `max-age` means 0, an invalid `min-fresh` means
//!   "never fresh enough" and an invalid `max-stale` is ignored: each forces revalidation
//!   rather than serving something the client may not accept.
//!
//! Age on receipt follows RFC 9111 §4.2.3 ([`initial_age`]); [`store_policy`] measures it with
//! `request_time = response_time = now`: `max(now − Date, Age)`.

use http::header::{
    HeaderName, AGE, CACHE_CONTROL, CONNECTION, DATE, EXPIRES, LAST_MODIFIED, PRAGMA, SET_COOKIE,
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

/// Heuristic freshness settings (RFC 9111 §4.2.2): a response without explicit freshness but
/// with `Last-Modified` is fresh for `fraction × (Date − Last-Modified)`, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heuristic {
    /// Share of the time since last modification; `0` (or negative, NaN, infinite) = off.
    /// 0.1 is the value RFC 9111 §4.2.2 mentions as typical.
    pub fraction: f64,
    /// Upper bound of a heuristic lifetime.
    pub max: Duration,
}

impl Heuristic {
    /// No heuristic freshness: responses without explicit freshness fall back to `default_ttl`.
    pub const OFF: Heuristic = Heuristic {
        fraction: 0.0,
        max: Duration::ZERO,
    };

    fn enabled(&self) -> bool {
        self.fraction.is_finite() && self.fraction > 0.0 && !self.max.is_zero()
    }
}

/// What a shared cache may do with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storability {
    /// Store; fresh for `fresh_for` from `now` (already reduced by the response's current age;
    /// may be zero, e.g. no-cache: stored but must be revalidated before each use), may be
    /// served stale on origin errors for `stale_if_error` past expiry (the origin's
    /// stale-if-error directive if present, else the operator default passed in), may be
    /// served stale while a background revalidation runs for `stale_while_revalidate` past
    /// expiry (RFC 5861 §3; the directive, else zero), and `must_revalidate` forbids any stale
    /// serving (then both stale windows are zero). `heuristic` says the lifetime was not given
    /// by the origin (Last-Modified heuristic or the operator's `default_ttl`, §4.2.2).
    Store {
        fresh_for: Duration,
        stale_if_error: Duration,
        stale_while_revalidate: Duration,
        must_revalidate: bool,
        heuristic: bool,
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
    /// The response status: 1xx and 304 are never stored; statuses outside
    /// [`heuristically_cacheable`] need explicit freshness.
    pub status: u16,
    /// The response headers.
    pub headers: &'a HeaderMap,
    pub request_has_authorization: bool,
    /// Operator fallback when the response has no explicit freshness and the Last-Modified
    /// heuristic gives nothing; applies to heuristically cacheable statuses only. `None` =
    /// don't store such responses.
    pub default_ttl: Option<Duration>,
    /// Stale-if-error window used when the response has no `stale-if-error` directive.
    pub default_stale_if_error: Duration,
    /// Last-Modified heuristic ([`Heuristic::OFF`] to disable).
    pub heuristic: Heuristic,
    pub now: SystemTime,
}

/// Whether a status is heuristically cacheable (RFC 9110 §15.1): storable without explicit
/// freshness. Any other status is stored only with `s-maxage`, `max-age` or `Expires`.
pub fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Targeted cache-control fields for this cache, highest precedence first (RFC 9213 §2.1).
pub const TARGETED_FIELDS: [&str; 2] = ["edgeslice-cache-control", "cdn-cache-control"];

/// The cache-control directives this cache obeys for a response, and whether they came from a
/// targeted field (RFC 9213).
///
/// The first field of [`TARGETED_FIELDS`] present with at least one valid directive (a
/// directive whose name is a token) wins; then `Cache-Control` and `Expires` are ignored for
/// this cache (§2.1). A targeted field present but without any valid directive is skipped.
/// Targeted fields are Structured-Field dictionaries (§2.2); they are parsed leniently with the
/// `Cache-Control` parser, plus the SF boolean forms: `name=?1` is `name`, `name=?0` is absent.
pub fn response_cache_control(headers: &HeaderMap) -> (CacheControl, bool) {
    for field in TARGETED_FIELDS {
        let mut joined = Vec::new();
        for value in headers.get_all(field) {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
        }
        // RFC 9213 §2.1: a targeted field is a Structured Field Dictionary; one that does not
        // parse is ignored (the next field decides), and a directive whose value has the
        // wrong type is ignored.
        let Some(members) = sf::dictionary(&joined).filter(|m| !m.is_empty()) else {
            continue;
        };
        let mut cc = CacheControl::default();
        for (name, item) in members {
            let numeric = matches!(
                name,
                b"max-age" | b"s-maxage" | b"stale-if-error" | b"stale-while-revalidate"
            );
            let arg = match item {
                sf::Item::Integer(n) if numeric && n >= 0 => Arg::Value(n.to_string().into_bytes()),
                sf::Item::Boolean(true) if !numeric => Arg::None,
                // A qualified form of a restricting directive restricts all the same (as for
                // Cache-Control: the stricter reading wins).
                sf::Item::Other if matches!(name, b"private" | b"no-cache" | b"no-store") => {
                    Arg::None
                }
                _ => continue,
            };
            apply_directive(&mut cc, name, arg);
        }
        return (cc, true);
    }
    (parse_cache_control(headers), false)
}

/// Just enough of RFC 8941 (Structured Field Values) to validate a Dictionary and read its
/// integers and booleans; anything that is not valid RFC 8941 makes the whole field invalid.
mod sf {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Item {
        Integer(i64),
        Boolean(bool),
        /// A decimal, string, token or byte sequence: valid, but never a directive's type here.
        Other,
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl<'a> Parser<'a> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn skip(&mut self, set: &[u8]) {
            while self.peek().is_some_and(|b| set.contains(&b)) {
                self.i += 1;
            }
        }
        fn key(&mut self) -> Option<&'a [u8]> {
            let start = self.i;
            match self.peek() {
                Some(b) if b.is_ascii_lowercase() || b == b'*' => self.i += 1,
                _ => return None,
            }
            while self.peek().is_some_and(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b)
            }) {
                self.i += 1;
            }
            Some(&self.s[start..self.i])
        }
        fn bare_item(&mut self) -> Option<Item> {
            match self.peek()? {
                b'-' | b'0'..=b'9' => self.number(),
                b'"' => {
                    self.i += 1;
                    loop {
                        match self.peek()? {
                            b'"' => {
                                self.i += 1;
                                return Some(Item::Other);
                            }
                            b'\\' => {
                                self.i += 1;
                                if !matches!(self.peek()?, b'"' | b'\\') {
                                    return None;
                                }
                                self.i += 1;
                            }
                            0x20..=0x7e => self.i += 1,
                            _ => return None,
                        }
                    }
                }
                b':' => {
                    self.i += 1;
                    while self
                        .peek()
                        .is_some_and(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                    {
                        self.i += 1;
                    }
                    (self.peek()? == b':').then(|| {
                        self.i += 1;
                        Item::Other
                    })
                }
                b'?' => {
                    self.i += 1;
                    let v = self.peek()?;
                    self.i += 1;
                    match v {
                        b'0' => Some(Item::Boolean(false)),
                        b'1' => Some(Item::Boolean(true)),
                        _ => None,
                    }
                }
                b if b.is_ascii_alphabetic() || b == b'*' => {
                    self.i += 1;
                    while self
                        .peek()
                        .is_some_and(|b| super::is_tchar(b) || b == b':' || b == b'/')
                    {
                        self.i += 1;
                    }
                    Some(Item::Other)
                }
                _ => None,
            }
        }
        fn number(&mut self) -> Option<Item> {
            let neg = self.peek() == Some(b'-');
            if neg {
                self.i += 1;
            }
            let start = self.i;
            self.skip(b"0123456789");
            let digits = self.i - start;
            if digits == 0 || digits > 15 {
                return None;
            }
            if self.peek() == Some(b'.') {
                self.i += 1;
                let frac = self.i;
                self.skip(b"0123456789");
                let f = self.i - frac;
                return (digits <= 12 && (1..=3).contains(&f)).then_some(Item::Other);
            }
            let n: i64 = std::str::from_utf8(&self.s[start..self.i])
                .ok()?
                .parse()
                .ok()?;
            Some(Item::Integer(if neg { -n } else { n }))
        }
        fn params(&mut self) -> Option<()> {
            while self.peek() == Some(b';') {
                self.i += 1;
                self.skip(b" ");
                self.key()?;
                if self.peek() == Some(b'=') {
                    self.i += 1;
                    self.bare_item()?;
                }
            }
            Some(())
        }
    }

    /// The members of a Dictionary (keys and their bare items; inner lists and parameters are
    /// validated and skipped), or `None` when the text is not a valid Dictionary.
    pub fn dictionary(text: &[u8]) -> Option<Vec<(&[u8], Item)>> {
        let mut p = Parser { s: text, i: 0 };
        p.skip(b" ");
        let mut out = Vec::new();
        while p.peek().is_some() {
            let key = p.key()?;
            let item = if p.peek() == Some(b'=') {
                p.i += 1;
                if p.peek() == Some(b'(') {
                    p.i += 1;
                    loop {
                        p.skip(b" ");
                        if p.peek()? == b')' {
                            p.i += 1;
                            break;
                        }
                        p.bare_item()?;
                        p.params()?;
                        if !matches!(p.peek()?, b' ' | b')') {
                            return None;
                        }
                    }
                    Item::Other
                } else {
                    p.bare_item()?
                }
            } else {
                Item::Boolean(true)
            };
            p.params()?;
            out.push((key, item));
            p.skip(b" \t");
            if p.peek().is_none() {
                break;
            }
            if p.peek()? != b',' {
                return None;
            }
            p.i += 1;
            p.skip(b" \t");
            p.peek()?;
        }
        Some(out)
    }
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decide whether and how a shared cache may store a response (RFC 9111 §3, §4.2, §5.2;
/// RFC 9213 targeted fields).
///
/// The directives are those of [`response_cache_control`] (a targeted field replaces
/// `Cache-Control` and `Expires`). Checked in this order, the first match deciding:
///
/// 1. status 1xx, 304 or outside 100..=599 → `NoStore("status")`;
/// 2. `no-store` → `NoStore("no-store")`; `private` (qualified or not) → `NoStore("private")`;
/// 3. any `Set-Cookie` → `NoStore("set-cookie")`;
/// 4. `Vary: *` → `NoStore("vary")` (any other `Vary` is stored; the caller keys variants
///    with [`crate::cache::vary`]);
/// 5. request had `Authorization` and the response has none of `public`, `s-maxage`,
///    `must-revalidate` (§3.5) → `NoStore("authorization")`;
/// 6. explicit freshness (§4.2.1): `s-maxage`, else `max-age`, else (untargeted only)
///    `Expires − Date` (Date absent or invalid → `now`; invalid `Expires` → 0);
/// 7. without explicit freshness the status must be [`heuristically_cacheable`] or the
///    response `public` (§3, §4.2.2), else `NoStore("status")`;
/// 8. `no-cache` → `Store` with `fresh_for = 0` and `must_revalidate = true` (§4.2.4 forbids
///    serving it stale, so no stale windows either);
/// 9. without explicit freshness: the Last-Modified heuristic (§4.2.2, [`heuristic_lifetime`]),
///    else `default_ttl` for heuristically cacheable statuses, else `NoStore("status")` for
///    other statuses (public ones) and `NoStore("no-freshness")`; `heuristic = true` then;
/// 10. `fresh_for = lifetime − current age` (saturating), current age `max(now − Date, Age)`;
/// 11. `must-revalidate`, `proxy-revalidate` or `s-maxage` (§5.2.2.8: implies
///     proxy-revalidate for a shared cache) → `must_revalidate = true` and both stale windows
///     zero; otherwise `stale_if_error` is the directive, else `default_stale_if_error`, and
///     `stale_while_revalidate` the directive, else zero.
///
/// After a `304 Not Modified`, pass [`merge_304`]'s result here again to get the new freshness.
pub fn store_policy(input: &StorePolicyInput) -> Storability {
    let status = input.status;
    if !(200..=599).contains(&status) || status == 304 {
        return Storability::NoStore("status");
    }
    let headers = input.headers;
    let (cc, targeted) = response_cache_control(headers);
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
    let explicit = explicit_lifetime(&cc, headers, targeted, input.now);
    let default_cacheable = heuristically_cacheable(status);
    if explicit.is_none() && !default_cacheable && !cc.public {
        return Storability::NoStore("status");
    }
    if cc.no_cache {
        return Storability::Store {
            fresh_for: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            must_revalidate: true,
            heuristic: false,
        };
    }
    let (lifetime, heuristic) = match explicit {
        Some(l) => (l, false),
        None => match heuristic_lifetime(headers, input.heuristic, input.now) {
            Some(l) => (l, true),
            None => match input.default_ttl {
                Some(l) if default_cacheable => (l, true),
                _ if !default_cacheable => return Storability::NoStore("status"),
                _ => return Storability::NoStore("no-freshness"),
            },
        },
    };
    let fresh_for = lifetime.saturating_sub(current_age(headers, input.now));
    let must_revalidate = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let (stale_if_error, stale_while_revalidate) = if must_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            cc.stale_if_error
                .map(Duration::from_secs)
                .unwrap_or(input.default_stale_if_error),
            cc.stale_while_revalidate
                .map(Duration::from_secs)
                .unwrap_or(Duration::ZERO),
        )
    };
    Storability::Store {
        fresh_for,
        stale_if_error,
        stale_while_revalidate,
        must_revalidate,
        heuristic,
    }
}

/// Whether the response's `Vary` prevents storage: only `Vary: *` (or an element that is not
/// a field name) does; see [`crate::cache::vary::parse_vary`].
pub fn vary_prevents_storage(headers: &HeaderMap) -> bool {
    crate::cache::vary::parse_vary(headers) == crate::cache::vary::Vary::Star
}

/// The response's explicit freshness lifetime for a shared cache (RFC 9111 §4.2.1):
/// `s-maxage`, else `max-age`, else `Expires − Date` (Date absent or invalid → `now`; invalid
/// Expires → 0). With `targeted` directives (RFC 9213 §2.1) `Expires` is ignored. `None` when
/// the origin gave no explicit freshness.
pub fn explicit_lifetime(
    cc: &CacheControl,
    headers: &HeaderMap,
    targeted: bool,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(secs.min(MAX_DELTA_SECONDS)));
    }
    if targeted {
        return None;
    }
    let expires = headers.get(EXPIRES)?;
    let Some(expires) = parse_date(expires.as_bytes()) else {
        return Some(Duration::ZERO);
    };
    let date = header_date(headers).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// The Last-Modified heuristic lifetime (RFC 9111 §4.2.2): `min(fraction × (Date −
/// Last-Modified), max)` when `Last-Modified` is valid and earlier than `Date` (Date absent or
/// invalid → `now`). `None` when the heuristic is off or there is nothing to go on.
pub fn heuristic_lifetime(
    headers: &HeaderMap,
    heuristic: Heuristic,
    now: SystemTime,
) -> Option<Duration> {
    if !heuristic.enabled() {
        return None;
    }
    let last_modified = parse_date(headers.get(LAST_MODIFIED)?.as_bytes())?;
    let date = header_date(headers).unwrap_or(now);
    let since = date.duration_since(last_modified).ok()?;
    if since.is_zero() {
        return None;
    }
    // Saturates instead of panicking when the product overflows a Duration.
    let lifetime = Duration::try_from_secs_f64(since.as_secs_f64() * heuristic.fraction)
        .unwrap_or(heuristic.max);
    Some(lifetime.min(heuristic.max))
}

/// The response's current age when received at `now` with no transit delay: [`initial_age`]
/// with `request_time = response_time = now`, i.e. `max(now − Date, Age)`.
pub fn current_age(headers: &HeaderMap, now: SystemTime) -> Duration {
    initial_age(headers, now, now)
}

/// The age a response already has on receipt (RFC 9111 §4.2.3):
///
/// ```text
/// apparent_age          = max(0, response_time − date_value)
/// response_delay        = response_time − request_time
/// corrected_age_value   = age_value + response_delay
/// corrected_initial_age = max(apparent_age, corrected_age_value)
/// ```
///
/// `Date` absent or invalid → apparent age 0; `Age` absent or invalid → 0; a `response_time`
/// before `request_time` (clock step) → delay 0. All arithmetic saturates.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent = header_date(headers)
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    // The first line's first element: `Age: 7200, 0` is 7200 old (a list is not valid, but
    // its first value is the one that was meant when lines were folded together).
    let age_value = headers
        .get(AGE)
        .and_then(|v| v.as_bytes().split(|&b| b == b',').next())
        .and_then(|v| parse_delta_seconds(trim_ows(v)))
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent.max(age_value.saturating_add(delay))
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
/// The same merge updates a stored response from the headers of a `200` answering a `HEAD`
/// with the same validator (§4.3.5); `Content-Length` is kept from the stored response there
/// too.
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

/// The request's cache directives (RFC 9111 §5.2.1), for [`reuse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_cache: bool,
    /// Reported for the caller: do not store the response to this request (§5.2.1.5); it does
    /// not stop a stored response from answering.
    pub no_store: bool,
    /// Reported for the caller: answer from cache or with 504 (§5.2.1.7).
    pub only_if_cached: bool,
    /// Seconds; invalid → `Some(0)` (the stricter reading: revalidate anything aged).
    pub max_age: Option<u64>,
    /// Seconds; invalid → `Some(MAX_DELTA_SECONDS)` (the stricter reading: revalidate).
    pub min_fresh: Option<u64>,
    /// `Some(None)` = any staleness; `Some(Some(n))` = at most `n` seconds stale; invalid →
    /// `None` (the stricter reading: no stale serving).
    pub max_stale: Option<Option<u64>>,
}

/// Parse a request's cache directives (RFC 9111 §5.2.1). `Pragma: no-cache` counts as
/// `no-cache` only when the request has no `Cache-Control` field at all (§5.4).
pub fn request_directives(req_headers: &HeaderMap) -> RequestDirectives {
    if !req_headers.contains_key(CACHE_CONTROL) {
        let no_cache = req_headers.get_all(PRAGMA).iter().any(|v| {
            Directives::new(v.as_bytes()).any(|(name, _)| name.eq_ignore_ascii_case(b"no-cache"))
        });
        return RequestDirectives {
            no_cache,
            ..Default::default()
        };
    }
    let cc = parse_cache_control(req_headers);
    let min_fresh_present = req_headers.get_all(CACHE_CONTROL).iter().any(|v| {
        Directives::new(v.as_bytes()).any(|(name, _)| name.eq_ignore_ascii_case(b"min-fresh"))
    });
    RequestDirectives {
        no_cache: cc.no_cache,
        no_store: cc.no_store,
        only_if_cached: cc.only_if_cached,
        max_age: cc.max_age,
        min_fresh: cc
            .min_fresh
            .or(min_fresh_present.then_some(MAX_DELTA_SECONDS)),
        max_stale: cc.max_stale,
    }
}

/// What [`reuse`] knows about a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Current age now (§4.2.3).
    pub age: Duration,
    /// Freshness lifetime (§4.2.1).
    pub lifetime: Duration,
    /// `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` on the response: never
    /// served stale without revalidation.
    pub must_revalidate: bool,
    /// Response `no-cache`: never reused without revalidation, even fresh (§5.2.2.4).
    pub no_cache: bool,
}

/// Whether a stored response may answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh and acceptable to the request: serve as is.
    Fresh,
    /// Stale, but the request's `max-stale` accepts it: serve without revalidation.
    Stale,
    /// Ask the origin first (conditional request).
    Revalidate,
}

/// Decide whether a stored response may answer a request (RFC 9111 §4, §5.2.1, §5.2.2), the
/// first match deciding:
///
/// 1. response `no-cache` (§5.2.2.4) or request `no-cache` (§5.2.1.4) → `Revalidate`;
/// 2. request `max-age=N` and age > N (§5.2.1.1) → `Revalidate`, fresh or not;
/// 3. request `min-fresh=N` and `lifetime − age < N` (§5.2.1.3) → `Revalidate`;
/// 4. stale (`age ≥ lifetime`, §4.2): `Stale` if the request's `max-stale` accepts the
///    staleness `age − lifetime` (§5.2.1.2) and the response allows stale serving
///    (§4.2.4, §5.2.2.2), else `Revalidate`;
/// 5. `Fresh`.
///
/// `only-if-cached` and `no-store` do not change this answer; the caller reads them from
/// [`RequestDirectives`].
pub fn reuse(req: &RequestDirectives, stored: &Stored) -> Reuse {
    if stored.no_cache || req.no_cache {
        return Reuse::Revalidate;
    }
    if let Some(max_age) = req.max_age {
        if stored.age > Duration::from_secs(max_age) {
            return Reuse::Revalidate;
        }
    }
    if let Some(min_fresh) = req.min_fresh {
        if stored.lifetime.saturating_sub(stored.age) < Duration::from_secs(min_fresh) {
            return Reuse::Revalidate;
        }
    }
    if stored.age >= stored.lifetime {
        let staleness = stored.age - stored.lifetime;
        let accepted = match req.max_stale {
            Some(None) => true,
            Some(Some(n)) => staleness <= Duration::from_secs(n),
            None => false,
        };
        return if accepted && !stored.must_revalidate {
            Reuse::Stale
        } else {
            Reuse::Revalidate
        };
    }
    Reuse::Fresh
}

/// Whether a request's own headers forbid answering it from cache without revalidation:
/// [`request_directives`]' `no_cache` (request `no-cache`, or `Pragma: no-cache` without
/// `Cache-Control`, §5.4). For the other request directives use [`reuse`].
pub fn request_requires_revalidation(req_headers: &HeaderMap) -> bool {
    request_directives(req_headers).no_cache
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderValue, CONTENT_LENGTH, VARY};
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
            stale_while_revalidate: Duration::ZERO,
            must_revalidate,
            heuristic: false,
        }
    }

    /// A store whose lifetime was not given by the origin (§4.2.2).
    fn heuristic_store(fresh: u64, sie: u64) -> Storability {
        Storability::Store {
            fresh_for: Duration::from_secs(fresh),
            stale_if_error: Duration::from_secs(sie),
            stale_while_revalidate: Duration::ZERO,
            must_revalidate: false,
            heuristic: true,
        }
    }

    fn with_swr(s: Storability, swr: u64) -> Storability {
        match s {
            Storability::Store {
                fresh_for,
                stale_if_error,
                must_revalidate,
                heuristic,
                ..
            } => Storability::Store {
                fresh_for,
                stale_if_error,
                stale_while_revalidate: Duration::from_secs(swr),
                must_revalidate,
                heuristic,
            },
            other => other,
        }
    }

    /// 10% of the time since modification, at most one day.
    const HEUR: Heuristic = Heuristic {
        fraction: 0.1,
        max: Duration::from_secs(86_400),
    };

    struct Case {
        name: &'static str,
        status: u16,
        headers: Vec<(&'static str, String)>,
        auth: bool,
        default_ttl: Option<u64>,
        heuristic: Heuristic,
        want: Storability,
    }

    fn case(name: &'static str, headers: &[(&'static str, &str)], want: Storability) -> Case {
        Case {
            name,
            status: 200,
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            auth: false,
            default_ttl: None,
            heuristic: Heuristic::OFF,
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
                "RFC 9111 §4.1: vary cookie is stored (the caller keys variants)",
                &[("cache-control", "max-age=60"), ("vary", "Cookie")],
                store(60, 300, false),
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
                store(60, 300, false),
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
                    "RFC 9110 §15.1: 404 with max-age",
                    &[("cache-control", "max-age=60")],
                    store(60, 300, false),
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
                    "RFC 9110 §15.1: 204 with max-age",
                    &[("cache-control", "max-age=60")],
                    store(60, 300, false),
                )
            },
            // default_ttl fallback
            Case {
                default_ttl: Some(90),
                ..case("default ttl", &[], heuristic_store(90, 300))
            },
            Case {
                default_ttl: Some(90),
                ..case(
                    "default ttl reduced by age",
                    &[("age", "30")],
                    heuristic_store(60, 300),
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
                heuristic: c.heuristic,
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
            heuristic: Heuristic::OFF,
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
            heuristic: Heuristic::OFF,
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
            heuristic: Heuristic::OFF,
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

    fn run(c: &Case) -> Storability {
        let pairs: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let headers = hm(&pairs);
        store_policy(&StorePolicyInput {
            status: c.status,
            headers: &headers,
            request_has_authorization: c.auth,
            default_ttl: c.default_ttl.map(Duration::from_secs),
            default_stale_if_error: SIE,
            heuristic: c.heuristic,
            now: now(),
        })
    }

    fn with_status(status: u16, c: Case) -> Case {
        Case { status, ..c }
    }

    fn with_heur(c: Case) -> Case {
        Case {
            heuristic: HEUR,
            ..c
        }
    }

    fn with_ttl(ttl: u64, c: Case) -> Case {
        Case {
            default_ttl: Some(ttl),
            ..c
        }
    }

    /// RFC 9111 §4.2.2 heuristic freshness, RFC 9110 §15.1 statuses, RFC 9213 targeted fields,
    /// RFC 5861 stale-while-revalidate.
    #[test]
    fn store_policy_rfc_table() {
        let d0 = date(0);
        let lm = date(-1000);
        let cases = vec![
            // §4.2.2: 10% of Date − Last-Modified.
            with_heur(case(
                "RFC 9111 §4.2.2 heuristic 10% of Date - Last-Modified",
                &[("date", &d0), ("last-modified", &lm)],
                heuristic_store(100, 300),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 heuristic reduced by age",
                &[("date", &date(-40)), ("last-modified", &date(-1040))],
                heuristic_store(60, 300),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 heuristic capped by max",
                &[("date", &d0), ("last-modified", &date(-10_000_000))],
                heuristic_store(86_400, 300),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 heuristic without Date measures from now",
                &[("last-modified", &lm)],
                heuristic_store(100, 300),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 Last-Modified not before Date: no heuristic",
                &[("date", &d0), ("last-modified", &date(10))],
                Storability::NoStore("no-freshness"),
            )),
            with_ttl(
                90,
                with_heur(case(
                    "RFC 9111 §4.2.2 Last-Modified after Date: default_ttl",
                    &[("date", &d0), ("last-modified", &date(10))],
                    heuristic_store(90, 300),
                )),
            ),
            with_ttl(
                90,
                with_heur(case(
                    "RFC 9111 §4.2.2 invalid Last-Modified: default_ttl",
                    &[("last-modified", "yesterday")],
                    heuristic_store(90, 300),
                )),
            ),
            with_ttl(
                90,
                case(
                    "RFC 9111 §4.2.2 heuristic off: default_ttl",
                    &[("last-modified", &lm)],
                    heuristic_store(90, 300),
                ),
            ),
            with_ttl(
                90,
                with_heur(case(
                    "RFC 9111 §4.2.2 heuristic beats default_ttl",
                    &[("last-modified", &lm)],
                    heuristic_store(100, 300),
                )),
            ),
            with_heur(case(
                "RFC 9111 §4.2.2 max-age beats heuristic",
                &[("cache-control", "max-age=10"), ("last-modified", &lm)],
                store(10, 300, false),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 Expires beats heuristic",
                &[
                    ("date", &d0),
                    ("expires", &date(20)),
                    ("last-modified", &lm),
                ],
                store(20, 300, false),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 invalid Expires (explicit, expired) beats heuristic",
                &[("expires", "0"), ("last-modified", &lm)],
                store(0, 300, false),
            )),
            with_heur(case(
                "RFC 9111 §4.2.2 no-cache beats heuristic",
                &[("cache-control", "no-cache"), ("last-modified", &lm)],
                store(0, 0, true),
            )),
            // RFC 9110 §15.1: other statuses need explicit freshness.
            with_status(
                500,
                with_ttl(
                    90,
                    with_heur(case(
                        "RFC 9110 §15.1 500 not heuristically cacheable",
                        &[("last-modified", &lm)],
                        Storability::NoStore("status"),
                    )),
                ),
            ),
            with_status(
                302,
                with_ttl(
                    90,
                    case(
                        "RFC 9110 §15.1 302 no default_ttl",
                        &[],
                        Storability::NoStore("status"),
                    ),
                ),
            ),
            with_status(
                500,
                case(
                    "RFC 9111 §3 500 with max-age stored",
                    &[("cache-control", "max-age=60")],
                    store(60, 300, false),
                ),
            ),
            with_status(
                503,
                case(
                    "RFC 9111 §3 503 with Expires stored",
                    &[("date", &d0), ("expires", &date(30))],
                    store(30, 300, false),
                ),
            ),
            with_status(
                302,
                case(
                    "RFC 9111 §3 302 with s-maxage stored",
                    &[("cache-control", "s-maxage=30")],
                    store(30, 0, true),
                ),
            ),
            with_status(
                500,
                with_heur(case(
                    "RFC 9111 §4.2.2 public 500 gets heuristic",
                    &[("cache-control", "public"), ("last-modified", &lm)],
                    heuristic_store(100, 300),
                )),
            ),
            with_status(
                500,
                with_ttl(
                    90,
                    case(
                        "RFC 9111 §4.2.2 public 500: no default_ttl",
                        &[("cache-control", "public")],
                        Storability::NoStore("status"),
                    ),
                ),
            ),
            with_status(
                500,
                case(
                    "RFC 9111 §3 500 with only no-cache not stored",
                    &[("cache-control", "no-cache")],
                    Storability::NoStore("status"),
                ),
            ),
            with_status(
                500,
                case(
                    "RFC 9111 §3 public 500 with no-cache stored for revalidation",
                    &[("cache-control", "public, no-cache")],
                    store(0, 0, true),
                ),
            ),
            // RFC 9213 targeted fields.
            case(
                "RFC 9213 §2.1 CDN-Cache-Control over Cache-Control",
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "max-age=30"),
                ],
                store(30, 300, false),
            ),
            case(
                "RFC 9213 §2.1 Cache-Control private ignored under a targeted field",
                &[
                    ("cache-control", "private, no-store"),
                    ("cdn-cache-control", "max-age=30"),
                ],
                store(30, 300, false),
            ),
            case(
                "RFC 9213 §2.1 targeted no-store",
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-store"),
                ],
                Storability::NoStore("no-store"),
            ),
            case(
                "RFC 9213 §2.1 Edgeslice-Cache-Control over CDN-Cache-Control",
                &[
                    ("edgeslice-cache-control", "max-age=5"),
                    ("cdn-cache-control", "max-age=30"),
                    ("cache-control", "max-age=600"),
                ],
                store(5, 300, false),
            ),
            case(
                "RFC 9213 §2.1 invalid Edgeslice-Cache-Control falls back to CDN",
                &[
                    ("edgeslice-cache-control", " , ,"),
                    ("cdn-cache-control", "max-age=30"),
                ],
                store(30, 300, false),
            ),
            case(
                "RFC 9213 §2.1 invalid targeted fields fall back to Cache-Control",
                &[
                    ("edgeslice-cache-control", "=5"),
                    ("cdn-cache-control", "(x)"),
                    ("cache-control", "max-age=600"),
                ],
                store(600, 300, false),
            ),
            case(
                "RFC 9213 §2.1 targeted field silences Expires",
                &[
                    ("cdn-cache-control", "public"),
                    ("date", &d0),
                    ("expires", &date(500)),
                ],
                Storability::NoStore("no-freshness"),
            ),
            case(
                "RFC 9213 §2.1 Expires used without a targeted field",
                &[("date", &d0), ("expires", &date(500))],
                store(500, 300, false),
            ),
            case(
                "RFC 9213 §2.1 targeted s-maxage implies proxy-revalidate",
                &[("cdn-cache-control", "s-maxage=30")],
                store(30, 0, true),
            ),
            case(
                "RFC 9213 §2.2 SF booleans: ?0 absent, ?1 present",
                &[(
                    "cdn-cache-control",
                    "max-age=60, private=?0, must-revalidate=?1",
                )],
                store(60, 0, true),
            ),
            case(
                "RFC 9213 §2.1 targeted no-cache",
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-cache"),
                ],
                store(0, 0, true),
            ),
            // RFC 5861 §3 stale-while-revalidate.
            case(
                "RFC 5861 §3 stale-while-revalidate",
                &[("cache-control", "max-age=60, stale-while-revalidate=30")],
                with_swr(store(60, 300, false), 30),
            ),
            case(
                "RFC 5861 §3 invalid stale-while-revalidate is zero",
                &[("cache-control", "max-age=60, stale-while-revalidate=x")],
                store(60, 300, false),
            ),
            case(
                "RFC 9111 §5.2.2.2 must-revalidate zeroes stale-while-revalidate",
                &[(
                    "cache-control",
                    "max-age=60, stale-while-revalidate=30, must-revalidate",
                )],
                store(60, 0, true),
            ),
            case(
                "RFC 9111 §5.2.2.4 no-cache zeroes stale-while-revalidate",
                &[("cache-control", "no-cache, stale-while-revalidate=30")],
                store(0, 0, true),
            ),
            case(
                "RFC 9111 §5.2.2.10 s-maxage zeroes stale-while-revalidate",
                &[("cache-control", "s-maxage=60, stale-while-revalidate=30")],
                store(60, 0, true),
            ),
            // RFC 9111 §4.1 Vary.
            case(
                "RFC 9111 §4.1 Vary star",
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", "Accept-Encoding, *"),
                ],
                Storability::NoStore("vary"),
            ),
            case(
                "RFC 9111 §4.1 Vary star in a second line",
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", "Accept"),
                    ("vary", " * "),
                ],
                Storability::NoStore("vary"),
            ),
            case(
                "RFC 9111 §4.1 Vary with several fields stored",
                &[
                    ("cache-control", "max-age=60"),
                    ("vary", "Accept, Accept-Language"),
                ],
                store(60, 300, false),
            ),
        ];
        for c in &cases {
            assert_eq!(run(c), c.want, "case {:?}", c.name);
        }
    }

    /// RFC 9110 §15.1 and RFC 9111 §3: the heuristically cacheable statuses, and the ones
    /// never stored (1xx, 304).
    #[test]
    fn rfc9110_15_1_statuses() {
        let cacheable = [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];
        for status in 0..=1000u16 {
            assert_eq!(
                heuristically_cacheable(status),
                cacheable.contains(&status),
                "{status}"
            );
            let defaulted = run(&with_status(
                status,
                with_ttl(90, case("", &[], store(0, 0, false))),
            ));
            let explicit = run(&with_status(
                status,
                case("", &[("cache-control", "max-age=60")], store(0, 0, false)),
            ));
            if cacheable.contains(&status) {
                assert_eq!(defaulted, heuristic_store(90, 300), "{status}");
            } else {
                assert_eq!(defaulted, Storability::NoStore("status"), "{status}");
            }
            let never = status < 200 || status == 304 || status > 599;
            if never {
                assert_eq!(explicit, Storability::NoStore("status"), "{status}");
            } else {
                assert_eq!(explicit, store(60, 300, false), "{status}");
            }
        }
    }

    /// RFC 9213 §2.1: which field wins and whether it is targeted.
    #[test]
    fn rfc9213_response_cache_control() {
        let (cc, targeted) = response_cache_control(&hm(&[("cache-control", "max-age=1")]));
        assert!(!targeted);
        assert_eq!(cc.max_age, Some(1));
        let (cc, targeted) = response_cache_control(&hm(&[
            ("cache-control", "max-age=1"),
            ("CDN-Cache-Control", "max-age=2"),
            ("cdn-cache-control", "s-maxage=3"),
        ]));
        assert!(targeted);
        assert_eq!((cc.max_age, cc.s_maxage), (Some(2), Some(3)));
        let (cc, targeted) = response_cache_control(&hm(&[
            ("edgeslice-cache-control", "x-unknown"),
            ("cdn-cache-control", "max-age=2"),
        ]));
        assert!(
            targeted,
            "an unknown but valid directive still selects the field"
        );
        assert_eq!(cc, CacheControl::default());
        let mut h = HeaderMap::new();
        h.append(
            HeaderName::from_static("edgeslice-cache-control"),
            HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        h.append(CACHE_CONTROL, HeaderValue::from_static("max-age=9"));
        assert_eq!(response_cache_control(&h), (cc_of(9), false));
    }

    fn cc_of(max_age: u64) -> CacheControl {
        CacheControl {
            max_age: Some(max_age),
            ..Default::default()
        }
    }

    /// RFC 9111 §4.2.3 age calculation.
    #[test]
    fn rfc9111_4_2_3_initial_age() {
        let t = now();
        let secs = Duration::from_secs;
        // apparent_age = response_time - date_value
        assert_eq!(initial_age(&hm(&[("date", &date(-30))]), t, t), secs(30));
        // corrected_age_value = age_value + response_delay
        assert_eq!(initial_age(&hm(&[("age", "10")]), t - secs(5), t), secs(15));
        // max(apparent_age, corrected_age_value)
        let h = hm(&[("date", &date(-30)), ("age", "10")]);
        assert_eq!(initial_age(&h, t - secs(5), t), secs(30));
        assert_eq!(initial_age(&h, t - secs(25), t), secs(35));
        // Date in the future: apparent age 0; the delay still counts.
        assert_eq!(
            initial_age(&hm(&[("date", &date(100))]), t - secs(2), t),
            secs(2)
        );
        // Invalid Age and Date are ignored; response before request (clock step) is delay 0.
        let h = hm(&[("date", "garbage"), ("age", "1.5")]);
        assert_eq!(initial_age(&h, t + secs(9), t), Duration::ZERO);
        // Huge Age clamps, nothing overflows.
        let h = hm(&[("age", "99999999999999999999999")]);
        assert_eq!(
            initial_age(&h, UNIX_EPOCH, t),
            secs(MAX_DELTA_SECONDS) + t.duration_since(UNIX_EPOCH).unwrap()
        );
        // current_age is initial_age without transit delay.
        let h = hm(&[("date", &date(-30)), ("age", "45")]);
        assert_eq!(current_age(&h, t), secs(45));
    }

    /// RFC 9111 §4.2.2: the heuristic never exceeds its max and never panics on odd fractions.
    #[test]
    fn rfc9111_4_2_2_heuristic_lifetime() {
        let h = hm(&[("date", &date(0)), ("last-modified", &date(-1000))]);
        let secs = Duration::from_secs;
        assert_eq!(heuristic_lifetime(&h, HEUR, now()), Some(secs(100)));
        assert_eq!(heuristic_lifetime(&h, Heuristic::OFF, now()), None);
        for fraction in [f64::NAN, f64::INFINITY, -0.5, 0.0] {
            let hx = Heuristic {
                fraction,
                max: secs(60),
            };
            assert_eq!(heuristic_lifetime(&h, hx, now()), None, "{fraction}");
        }
        let huge = Heuristic {
            fraction: f64::MAX,
            max: secs(60),
        };
        assert_eq!(heuristic_lifetime(&h, huge, now()), Some(secs(60)));
        let zero_max = Heuristic {
            fraction: 0.1,
            max: Duration::ZERO,
        };
        assert_eq!(heuristic_lifetime(&h, zero_max, now()), None);
    }

    /// RFC 9111 §5.2.1 request directives, §5.4 Pragma.
    #[test]
    fn rfc9111_5_2_1_request_directives() {
        let rd = |pairs: &[(&str, &str)]| request_directives(&hm(pairs));
        assert_eq!(rd(&[]), RequestDirectives::default());
        let got = rd(&[(
            "cache-control",
            "no-cache, no-store, only-if-cached, max-age=5, min-fresh=6, max-stale=7",
        )]);
        assert_eq!(
            got,
            RequestDirectives {
                no_cache: true,
                no_store: true,
                only_if_cached: true,
                max_age: Some(5),
                min_fresh: Some(6),
                max_stale: Some(Some(7)),
            }
        );
        assert_eq!(rd(&[("cache-control", "max-stale")]).max_stale, Some(None));
        // Invalid arguments: the stricter reading (§5.2.1 leaves it open).
        assert_eq!(rd(&[("cache-control", "max-age=x")]).max_age, Some(0));
        assert_eq!(
            rd(&[("cache-control", "min-fresh=x")]).min_fresh,
            Some(MAX_DELTA_SECONDS)
        );
        assert_eq!(rd(&[("cache-control", "max-stale=x")]).max_stale, None);
        // §5.4: Pragma only without Cache-Control.
        assert!(rd(&[("pragma", "no-cache")]).no_cache);
        assert!(rd(&[("pragma", "x, No-Cache")]).no_cache);
        assert!(!rd(&[("pragma", "no-cache"), ("cache-control", "max-age=9")]).no_cache);
        assert!(!rd(&[("pragma", "no-cache"), ("cache-control", "")]).no_cache);
        assert!(!rd(&[("pragma", "nothing")]).no_cache);
    }

    /// RFC 9111 §4, §5.2.1, §5.2.2: may a stored response answer this request?
    #[test]
    fn rfc9111_5_2_reuse() {
        let stored = |age: u64, lifetime: u64| Stored {
            age: Duration::from_secs(age),
            lifetime: Duration::from_secs(lifetime),
            must_revalidate: false,
            no_cache: false,
        };
        let req = |cc: &str| request_directives(&hm(&[("cache-control", cc)]));
        let none = RequestDirectives::default();
        use Reuse::*;
        let cases: &[(&str, RequestDirectives, Stored, Reuse)] = &[
            ("§4.2 fresh", none.clone(), stored(10, 60), Fresh),
            (
                "§4.2 age = lifetime is stale",
                none.clone(),
                stored(60, 60),
                Revalidate,
            ),
            (
                "§4.2 zero lifetime is stale",
                none.clone(),
                stored(0, 0),
                Revalidate,
            ),
            (
                "§5.2.2.4 response no-cache, even fresh",
                none.clone(),
                Stored {
                    no_cache: true,
                    ..stored(0, 60)
                },
                Revalidate,
            ),
            (
                "§5.2.1.4 request no-cache",
                req("no-cache"),
                stored(0, 60),
                Revalidate,
            ),
            (
                "§5.2.1.1 max-age exceeded",
                req("max-age=5"),
                stored(10, 60),
                Revalidate,
            ),
            (
                "§5.2.1.1 max-age = age ok",
                req("max-age=10"),
                stored(10, 60),
                Fresh,
            ),
            (
                "§5.2.1.1 max-age=0 at age 0",
                req("max-age=0"),
                stored(0, 60),
                Fresh,
            ),
            (
                "§5.2.1.1 invalid max-age is 0",
                req("max-age=x"),
                stored(1, 60),
                Revalidate,
            ),
            (
                "§5.2.1.3 min-fresh met",
                req("min-fresh=50"),
                stored(10, 60),
                Fresh,
            ),
            (
                "§5.2.1.3 min-fresh not met",
                req("min-fresh=51"),
                stored(10, 60),
                Revalidate,
            ),
            (
                "§5.2.1.3 invalid min-fresh",
                req("min-fresh=?"),
                stored(0, 60),
                Revalidate,
            ),
            (
                "§5.2.1.2 max-stale any",
                req("max-stale"),
                stored(1000, 60),
                Stale,
            ),
            (
                "§5.2.1.2 max-stale within",
                req("max-stale=40"),
                stored(100, 60),
                Stale,
            ),
            (
                "§5.2.1.2 max-stale exceeded",
                req("max-stale=39"),
                stored(100, 60),
                Revalidate,
            ),
            (
                "§5.2.1.2 max-stale on fresh",
                req("max-stale"),
                stored(10, 60),
                Fresh,
            ),
            (
                "§5.2.1.2 invalid max-stale",
                req("max-stale=x"),
                stored(100, 60),
                Revalidate,
            ),
            (
                "§5.2.2.2 must-revalidate beats max-stale",
                req("max-stale"),
                Stored {
                    must_revalidate: true,
                    ..stored(100, 60)
                },
                Revalidate,
            ),
            (
                "§5.2.2.2 must-revalidate fresh is fresh",
                none.clone(),
                Stored {
                    must_revalidate: true,
                    ..stored(10, 60)
                },
                Fresh,
            ),
            (
                "§5.2.1.1 max-age beats max-stale",
                req("max-age=50, max-stale"),
                stored(100, 60),
                Revalidate,
            ),
            (
                "§5.2.1.5 no-store does not stop reuse",
                req("no-store"),
                stored(0, 60),
                Fresh,
            ),
            (
                "§5.2.1.7 only-if-cached does not change reuse",
                req("only-if-cached"),
                stored(100, 60),
                Revalidate,
            ),
        ];
        for (name, rd, st, want) in cases {
            assert_eq!(reuse(rd, st), *want, "{name}");
        }
    }

    /// RFC 9111 §4.3.5: a 200 to HEAD updates the stored response like a 304 does.
    #[test]
    fn rfc9111_4_3_5_merge_from_head() {
        let stored = hm(&[
            ("content-type", "text/plain"),
            ("content-length", "100"),
            ("etag", "\"v1\""),
            ("cache-control", "max-age=10"),
            ("date", &date(-1000)),
        ]);
        let head = hm(&[
            ("content-type", "text/plain"),
            ("content-length", "100"),
            ("etag", "\"v1\""),
            ("cache-control", "max-age=300"),
            ("x-new", "1"),
            ("connection", "close"),
            ("date", &date(0)),
        ]);
        let merged = merge_304(&stored, &head);
        assert_eq!(merged.get("cache-control").unwrap(), "max-age=300");
        assert_eq!(merged.get("x-new").unwrap(), "1");
        assert_eq!(merged.get("content-length").unwrap(), "100");
        assert_eq!(merged.get(DATE).unwrap(), date(0).as_str());
        assert!(merged.get(CONNECTION).is_none());
        assert_eq!(merged, merge_304(&stored, &head), "deterministic");
        let again = store_policy(&StorePolicyInput {
            status: 200,
            headers: &merged,
            request_has_authorization: false,
            default_ttl: None,
            default_stale_if_error: SIE,
            heuristic: Heuristic::OFF,
            now: now(),
        });
        assert_eq!(again, store(300, 300, false));
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
            frac in prop_oneof![Just(0.0f64), Just(0.1f64), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0f64), any::<f64>()],
            hmax in any::<u64>(),
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
                heuristic: Heuristic { fraction: frac, max: Duration::from_secs(hmax) },
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
                heuristic: HEUR,
                now: now(),
            });
            prop_assert!(!got.is_store());
        }
    }

    proptest! {
        /// RFC 9111 §4, §5.2: reuse never serves what a directive forbids.
        #[test]
        fn reuse_respects_directives(
            age in 0u64..1000,
            lifetime in 0u64..1000,
            must_revalidate in any::<bool>(),
            no_cache_resp in any::<bool>(),
            fields in proptest::collection::vec(grammar_value(), 0..3),
            pragma in any::<bool>(),
        ) {
            let mut headers = HeaderMap::new();
            for v in fields {
                headers.append(CACHE_CONTROL, v);
            }
            if pragma {
                headers.append(PRAGMA, HeaderValue::from_static("no-cache"));
            }
            let req = request_directives(&headers);
            let st = Stored {
                age: Duration::from_secs(age),
                lifetime: Duration::from_secs(lifetime),
                must_revalidate,
                no_cache: no_cache_resp,
            };
            let got = reuse(&req, &st);
            if no_cache_resp || req.no_cache {
                prop_assert_eq!(got, Reuse::Revalidate);
            }
            if let Some(n) = req.max_age {
                if age > n {
                    prop_assert_eq!(got, Reuse::Revalidate);
                }
            }
            match got {
                Reuse::Fresh => prop_assert!(age < lifetime),
                Reuse::Stale => {
                    prop_assert!(age >= lifetime && !must_revalidate);
                    prop_assert!(req.max_stale.is_some());
                }
                Reuse::Revalidate => {}
            }
        }

        /// RFC 9111 §4.2.2: a heuristic lifetime never exceeds its max; RFC 9213: targeted
        /// parsing never panics; only stored responses carry stale windows when allowed.
        #[test]
        fn heuristic_bounded(
            fields in proptest::collection::vec(
                (prop_oneof![
                    Just(HeaderName::from_static("last-modified")),
                    Just(HeaderName::from_static("cdn-cache-control")),
                    Just(HeaderName::from_static("edgeslice-cache-control")),
                    Just(DATE),
                    Just(CACHE_CONTROL),
                    Just(EXPIRES),
                ], prop_oneof![raw_value(), grammar_value()]), 0..8),
            lm_offset in -100_000_000i64..100_000_000,
            frac in 0.0f64..2.0,
            max in 0u64..1_000_000,
        ) {
            let mut headers = HeaderMap::new();
            headers.append(LAST_MODIFIED, HeaderValue::from_str(&date(lm_offset)).unwrap());
            for (n, v) in fields {
                headers.append(n, v);
            }
            let h = Heuristic { fraction: frac, max: Duration::from_secs(max) };
            if let Some(l) = heuristic_lifetime(&headers, h, now()) {
                prop_assert!(l <= h.max);
            }
            let _ = response_cache_control(&headers);
            let got = store_policy(&StorePolicyInput {
                status: 200,
                headers: &headers,
                request_has_authorization: false,
                default_ttl: None,
                default_stale_if_error: SIE,
                heuristic: h,
                now: now(),
            });
            if let Storability::Store { fresh_for, heuristic: true, .. } = got {
                prop_assert!(fresh_for <= h.max);
            }
            if let Storability::Store { must_revalidate: true, stale_while_revalidate, stale_if_error, .. } = got {
                prop_assert!(stale_while_revalidate.is_zero() && stale_if_error.is_zero());
            }
        }
    }

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn rfc9213_targeted_field_that_is_not_a_structured_dictionary_is_ignored() {
        // Invalid member: the field is ignored, Cache-Control decides.
        let h = map(&[
            ("cdn-cache-control", "max-age=10000, &&&&&"),
            ("cache-control", "no-store"),
        ]);
        let (cc, targeted) = response_cache_control(&h);
        assert!(!targeted && cc.no_store);
        // A string where an integer belongs: that directive is ignored.
        let h = map(&[
            ("cdn-cache-control", "max-age=\"10000\""),
            ("cache-control", "no-store"),
        ]);
        let (cc, targeted) = response_cache_control(&h);
        assert!(targeted && cc.max_age.is_none() && !cc.no_store);
        // Valid: integers, booleans, parameters, a second line.
        let h = map(&[
            ("cdn-cache-control", "max-age=60;foo=bar, must-revalidate"),
            ("cdn-cache-control", "stale-if-error=5, no-cache=?0"),
        ]);
        let (cc, targeted) = response_cache_control(&h);
        assert!(targeted);
        assert_eq!((cc.max_age, cc.stale_if_error), (Some(60), Some(5)));
        assert!(cc.must_revalidate && !cc.no_cache);
        // Upper case keys are not RFC 8941 keys.
        let h = map(&[("cdn-cache-control", "Max-Age=60")]);
        assert!(!response_cache_control(&h).1);
        // A qualified restricting directive still restricts.
        let h = map(&[("cdn-cache-control", "max-age=60, private=\"set-cookie\"")]);
        assert!(response_cache_control(&h).0.private);
    }

    #[test]
    fn rfc8941_dictionaries_never_panic_and_reject_garbage() {
        for bad in [
            &b"a=("[..],
            b"a=\"x",
            b"a=?2",
            b"a=1.2345",
            b"a=1,",
            b",a",
            b"A",
            b"a=:x",
        ] {
            assert!(
                sf::dictionary(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(sf::dictionary(b"").map(|m| m.len()), Some(0));
        assert!(sf::dictionary(b"a=(1 2);x, b=:aGk=:, c=tok/x, d=-1.5").is_some());
    }

    proptest! {
        #[test]
        fn rfc8941_dictionary_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = sf::dictionary(&bytes);
        }
    }

    #[test]
    fn rfc9111_4_2_3_age_list_uses_its_first_value() {
        let now = SystemTime::now();
        let age = |v: &str| current_age(&map(&[("age", v)]), now).as_secs();
        assert_eq!(age("7200, 0"), 7200);
        assert_eq!(age("0, 7200"), 0);
        assert_eq!(age("old"), 0);
    }
}
