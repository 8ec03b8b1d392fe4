//! The `Range` request header (RFC 9110 §14.1-14.2), its resolution against an object length,
//! and the `If-Range` precondition (RFC 9110 §13.1.5).
//!
//! Pure functions over bytes: no I/O, no allocation proportional to anything but the header, and
//! this module must **never panic** on any input (no `unwrap`, no fallible indexing, no
//! overflowing arithmetic). Everything a client can send is hostile.
//!
//! Decisions:
//! - A missing header, an unknown range unit (`items=0-5`) or a syntactically invalid `bytes=`
//!   value is **ignored**: the request is served as if it had no `Range` header (200 with the
//!   whole object), the way nginx treats most garbage. Only a *valid* byte range set that has
//!   no satisfiable range yields 416.
//! - Invalid includes: `a-b` with `a > b`, a number that does not fit in a `u64`, anything other
//!   than digits / `-` / `,` / optional whitespace (SP, HTAB) around the list elements, an empty
//!   range set (`bytes=`, `bytes= , `), and more than [`MAX_SPECS`] range specs.
//! - Empty list elements are allowed and skipped (`bytes=0-1,,2-3`), as RFC 9110 §5.6.1 asks.
//! - [`resolve`] never reorders or merges ranges; it answers `Whole` instead when the request
//!   asks for more than `max_ranges` ranges or for more bytes in total than the object has
//!   (range amplification defence, CVE-2011-3192; nginx's rule).
//! - `If-Range` uses strong comparison only; a date must equal `Last-Modified` to the second
//!   (HTTP dates have one-second resolution). Anything unparsable means "the condition fails",
//!   i.e. serve the whole object.

use std::time::{SystemTime, UNIX_EPOCH};

/// Upper bound on the number of range specs [`parse_range`] accepts; a header with more is
/// ignored (treated as [`RangeRequest::Whole`]).
pub const MAX_SPECS: usize = 1000;

/// One byte-range-spec as written by the client, before the object length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `a-b`: bytes `a` through `b` inclusive (`a <= b` is guaranteed by the parser).
    FromTo(u64, u64),
    /// `a-`: bytes from `a` to the end.
    From(u64),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// The meaning of a request's Range header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// No Range header, an unknown range unit (e.g. `items=0-5`), or a syntactically invalid
    /// `bytes=` value: serve the whole object (200).
    Whole,
    /// A valid `bytes=` range set: between 1 and [`MAX_SPECS`] specs, in request order.
    Bytes(Vec<RangeSpec>),
}

/// Optional whitespace (RFC 9110 §5.6.3).
fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ows(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ows(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// `1*DIGIT` as a `u64`; `None` when empty, not all digits, or overflowing.
fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// One non-empty list element: `a-b`, `a-` or `-n`, no inner whitespace.
fn parse_spec(s: &[u8]) -> Option<RangeSpec> {
    let dash = s.iter().position(|&b| b == b'-')?;
    let (first, rest) = s.split_at(dash);
    let last = rest.get(1..)?;
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix(parse_u64(last)?)),
        (false, true) => Some(RangeSpec::From(parse_u64(first)?)),
        (false, false) => {
            let a = parse_u64(first)?;
            let b = parse_u64(last)?;
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
    }
}

/// Parse a `Range` header value (RFC 9110 §14.2). See the module docs for what counts as
/// invalid; invalid and non-`bytes` values yield [`RangeRequest::Whole`].
pub fn parse_range(value: &[u8]) -> RangeRequest {
    parse_bytes_ranges(value).map_or(RangeRequest::Whole, RangeRequest::Bytes)
}

fn parse_bytes_ranges(value: &[u8]) -> Option<Vec<RangeSpec>> {
    const UNIT: &[u8] = b"bytes=";
    let value = trim_ows(value);
    let unit = value.get(..UNIT.len())?;
    if !unit.eq_ignore_ascii_case(UNIT) {
        return None;
    }
    let set = value.get(UNIT.len()..)?;
    let mut specs = Vec::new();
    for element in set.split(|&b| b == b',') {
        let element = trim_ows(element);
        if element.is_empty() {
            continue;
        }
        if specs.len() >= MAX_SPECS {
            return None;
        }
        specs.push(parse_spec(element)?);
    }
    (!specs.is_empty()).then_some(specs)
}

/// A satisfiable, resolved range: `start..=end` inside an object of known length.
///
/// Invariant (upheld by [`resolve`] and [`crate::range::plan`]): `start <= end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte, inclusive.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range (`end - start + 1`); 0 if `start > end`, saturating at
    /// `u64::MAX` for the (unrepresentable) full `0..=u64::MAX` range.
    pub fn len(&self) -> u64 {
        if self.end < self.start {
            0
        } else {
            (self.end - self.start).saturating_add(1)
        }
    }

    /// True only for a malformed range with `start > end`.
    pub fn is_empty(&self) -> bool {
        self.end < self.start
    }

    /// The `Content-Range` field value for this range of an object of `total` bytes:
    /// `bytes start-end/total`.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, total)
    }
}

/// The `Content-Range` field value of a 416 response: `bytes */total`.
pub fn unsatisfied_content_range(total: u64) -> String {
    format!("bytes */{total}")
}

/// What to send for a request, once the object length is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeDecision {
    /// 200 with the whole object.
    Whole,
    /// 206: one range (single part) or several (multipart/byteranges), in request order.
    Partial(Vec<ByteRange>),
    /// 416 Range Not Satisfiable.
    Unsatisfiable,
}

/// One spec against an object of `len` bytes; `None` when unsatisfiable.
fn resolve_spec(spec: RangeSpec, len: u64) -> Option<ByteRange> {
    let last = len.checked_sub(1)?;
    match spec {
        RangeSpec::FromTo(a, b) => (a < len).then(|| ByteRange {
            start: a,
            end: b.min(last),
        }),
        RangeSpec::From(a) => (a < len).then_some(ByteRange {
            start: a,
            end: last,
        }),
        RangeSpec::Suffix(n) => (n > 0).then(|| ByteRange {
            start: len.saturating_sub(n),
            end: last,
        }),
    }
}

/// Resolve against the object length. Rules:
/// - Whole request → Whole.
/// - More specs in the request than `max_ranges` (counted before resolution, satisfiable or
///   not) → Whole (CVE-2011-3192 range amplification defence). `max_ranges == 0` therefore
///   disables range responses entirely.
/// - Each spec is resolved: FromTo(a,b): satisfiable iff a < len, end clamped to len-1.
///   From(a): a < len → a..=len-1. Suffix(n): n > 0 and len > 0 → max(0,len-n)..=len-1.
///   Unsatisfiable specs are dropped.
/// - No satisfiable spec → Unsatisfiable (zero-length objects: every range is unsatisfiable
///   → 416, per RFC 9110).
/// - Sum of the resolved lengths greater than len (heavy overlap) → Whole (nginx's rule).
/// - Otherwise Partial, in request order (not reordered, not merged).
pub fn resolve(req: &RangeRequest, len: u64, max_ranges: usize) -> RangeDecision {
    let specs = match req {
        RangeRequest::Whole => return RangeDecision::Whole,
        RangeRequest::Bytes(specs) => specs,
    };
    if specs.len() > max_ranges {
        return RangeDecision::Whole;
    }
    let ranges: Vec<ByteRange> = specs
        .iter()
        .filter_map(|&spec| resolve_spec(spec, len))
        .collect();
    if ranges.is_empty() {
        return RangeDecision::Unsatisfiable;
    }
    let total = ranges
        .iter()
        .try_fold(0u64, |acc, r| acc.checked_add(r.len()));
    match total {
        Some(total) if total <= len => RangeDecision::Partial(ranges),
        _ => RangeDecision::Whole,
    }
}

/// `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`; returns `(weak, whole tag)` if well-formed.
fn parse_entity_tag(s: &[u8]) -> Option<(bool, &[u8])> {
    let (weak, opaque) = match s.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let inner = opaque.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    // etagc = %x21 / %x23-7E / obs-text
    let ok = inner
        .iter()
        .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80);
    ok.then_some((weak, opaque))
}

/// If-Range (RFC 9110 §13.1.5): true when the condition holds, i.e. the Range header applies.
/// `value` is an entity-tag or an HTTP-date. An entity-tag matches only by STRONG comparison
/// (a weak tag `W/"x"` never matches, and a weak current etag never matches). An HTTP-date
/// matches only if it equals the object's Last-Modified exactly, at the one-second resolution
/// of HTTP dates (any of the three formats httpdate parses). Anything unparsable → false.
///
/// `etag` is the full quoted etag as the origin sent it, e.g. `"abc"` or `W/"abc"`; a
/// malformed one never matches.
pub fn if_range_holds(value: &[u8], etag: Option<&str>, last_modified: Option<SystemTime>) -> bool {
    let value = trim_ows(value);
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        let Some((false, tag)) = parse_entity_tag(value) else {
            return false;
        };
        let current = etag.and_then(|e| parse_entity_tag(trim_ows(e.as_bytes())));
        return matches!(current, Some((false, cur)) if cur == tag);
    }
    let Some(last_modified) = last_modified else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let Ok(date) = httpdate::parse_http_date(text) else {
        return false;
    };
    match (
        date.duration_since(UNIX_EPOCH),
        last_modified.duration_since(UNIX_EPOCH),
    ) {
        (Ok(d), Ok(lm)) => d.as_secs() == lm.as_secs(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;
    use RangeSpec::*;

    fn bytes(specs: &[RangeSpec]) -> RangeRequest {
        RangeRequest::Bytes(specs.to_vec())
    }

    fn br(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse_range(b"bytes=0-499"), bytes(&[FromTo(0, 499)]));
        assert_eq!(parse_range(b"bytes=500-"), bytes(&[From(500)]));
        assert_eq!(parse_range(b"bytes=-500"), bytes(&[Suffix(500)]));
        assert_eq!(parse_range(b"bytes=-0"), bytes(&[Suffix(0)]));
        assert_eq!(parse_range(b"bytes=7-7"), bytes(&[FromTo(7, 7)]));
        assert_eq!(
            parse_range(b"bytes=0-0,-1,5-"),
            bytes(&[FromTo(0, 0), Suffix(1), From(5)])
        );
    }

    #[test]
    fn unit_is_case_insensitive_and_ows_is_allowed() {
        assert_eq!(parse_range(b"BYTES=0-1"), bytes(&[FromTo(0, 1)]));
        assert_eq!(parse_range(b"Bytes=0-1"), bytes(&[FromTo(0, 1)]));
        assert_eq!(
            parse_range(b"  bytes= 0-1 ,\t2-3\t, -4 "),
            bytes(&[FromTo(0, 1), FromTo(2, 3), Suffix(4)])
        );
    }

    #[test]
    fn empty_elements_are_skipped() {
        assert_eq!(
            parse_range(b"bytes=0-1,,2-3"),
            bytes(&[FromTo(0, 1), FromTo(2, 3)])
        );
        assert_eq!(parse_range(b"bytes=,0-1,"), bytes(&[FromTo(0, 1)]));
        assert_eq!(parse_range(b"bytes= , ,5-"), bytes(&[From(5)]));
    }

    #[test]
    fn invalid_is_whole() {
        for v in [
            &b""[..],
            b"bytes",
            b"bytes=",
            b"bytes=,",
            b"bytes= , ",
            b"bytes=-",
            b"bytes=5-4",
            b"bytes=a-b",
            b"bytes=0-1,x",
            b"bytes=0 -1",
            b"bytes=0- 1",
            b"bytes=--1",
            b"bytes=0-1-2",
            b"bytes=+1-2",
            b"bytes=0x1-2",
            b"bytes =0-1",
            b"bytes=0-1;",
            b"items=0-5",
            b"byte=0-5",
            b"bytesX0-5",
            b"bytes=18446744073709551616-",
            b"bytes=-18446744073709551616",
            b"bytes=0-18446744073709551616",
            b"bytes=0-1\r\n",
            b"bytes=\xff-1",
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_range(v),
                RangeRequest::Whole,
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn u64_max_is_fine() {
        assert_eq!(
            parse_range(b"bytes=18446744073709551615-"),
            bytes(&[From(u64::MAX)])
        );
        assert_eq!(
            parse_range(b"bytes=0-18446744073709551615"),
            bytes(&[FromTo(0, u64::MAX)])
        );
        assert_eq!(parse_range(b"bytes=0007-0010"), bytes(&[FromTo(7, 10)]));
    }

    #[test]
    fn spec_count_is_capped() {
        let at_cap = format!("bytes={}", vec!["0-0"; MAX_SPECS].join(","));
        match parse_range(at_cap.as_bytes()) {
            RangeRequest::Bytes(v) => assert_eq!(v.len(), MAX_SPECS),
            RangeRequest::Whole => panic!("at cap must parse"),
        }
        // Empty elements do not count.
        let with_empties = format!("bytes={},,,", vec!["0-0"; MAX_SPECS].join(",,"));
        assert!(matches!(
            parse_range(with_empties.as_bytes()),
            RangeRequest::Bytes(_)
        ));
        let over = format!("bytes={}", vec!["0-0"; MAX_SPECS + 1].join(","));
        assert_eq!(parse_range(over.as_bytes()), RangeRequest::Whole);
    }

    #[test]
    fn byte_range_len() {
        assert_eq!(br(0, 0).len(), 1);
        assert_eq!(br(5, 9).len(), 5);
        assert_eq!(br(9, 5).len(), 0);
        assert!(br(9, 5).is_empty());
        assert!(!br(5, 5).is_empty());
        assert_eq!(br(0, u64::MAX).len(), u64::MAX);
        assert_eq!(br(1, u64::MAX).len(), u64::MAX);
        assert_eq!(br(0, 499).content_range(1000), "bytes 0-499/1000");
        assert_eq!(unsatisfied_content_range(1000), "bytes */1000");
    }

    #[test]
    fn resolve_rules() {
        let r = |specs: &[RangeSpec], len| resolve(&bytes(specs), len, 10);
        assert_eq!(resolve(&RangeRequest::Whole, 100, 10), RangeDecision::Whole);
        assert_eq!(resolve(&RangeRequest::Whole, 0, 10), RangeDecision::Whole);
        assert_eq!(
            r(&[FromTo(0, 9)], 100),
            RangeDecision::Partial(vec![br(0, 9)])
        );
        assert_eq!(
            r(&[FromTo(90, 200)], 100),
            RangeDecision::Partial(vec![br(90, 99)])
        );
        assert_eq!(r(&[FromTo(100, 200)], 100), RangeDecision::Unsatisfiable);
        assert_eq!(
            r(&[From(99)], 100),
            RangeDecision::Partial(vec![br(99, 99)])
        );
        assert_eq!(r(&[From(100)], 100), RangeDecision::Unsatisfiable);
        assert_eq!(
            r(&[Suffix(10)], 100),
            RangeDecision::Partial(vec![br(90, 99)])
        );
        assert_eq!(
            r(&[Suffix(1000)], 100),
            RangeDecision::Partial(vec![br(0, 99)])
        );
        assert_eq!(
            r(&[Suffix(u64::MAX)], 100),
            RangeDecision::Partial(vec![br(0, 99)])
        );
        assert_eq!(r(&[Suffix(0)], 100), RangeDecision::Unsatisfiable);
        assert_eq!(r(&[From(u64::MAX)], u64::MAX), RangeDecision::Unsatisfiable);
        assert_eq!(
            r(&[FromTo(0, u64::MAX)], u64::MAX),
            RangeDecision::Partial(vec![br(0, u64::MAX - 1)])
        );
        // Unsatisfiable specs are dropped, order is kept, nothing is merged.
        assert_eq!(
            r(
                &[
                    FromTo(50, 59),
                    From(500),
                    FromTo(0, 9),
                    Suffix(0),
                    FromTo(5, 14)
                ],
                100
            ),
            RangeDecision::Partial(vec![br(50, 59), br(0, 9), br(5, 14)])
        );
    }

    #[test]
    fn zero_length_object_is_always_unsatisfiable() {
        for spec in [FromTo(0, 0), FromTo(0, 10), From(0), Suffix(1), Suffix(0)] {
            assert_eq!(
                resolve(&bytes(&[spec]), 0, 10),
                RangeDecision::Unsatisfiable
            );
        }
    }

    #[test]
    fn too_many_ranges_is_whole() {
        let specs = vec![FromTo(0, 0); 5];
        assert!(matches!(
            resolve(&bytes(&specs), 100, 5),
            RangeDecision::Partial(_)
        ));
        assert_eq!(resolve(&bytes(&specs), 100, 4), RangeDecision::Whole);
        assert_eq!(
            resolve(&bytes(&[FromTo(0, 0)]), 100, 0),
            RangeDecision::Whole
        );
        // Counted before resolution: unsatisfiable specs count too.
        let specs = [FromTo(0, 0), From(1000), From(1000)];
        assert_eq!(resolve(&bytes(&specs), 100, 2), RangeDecision::Whole);
    }

    #[test]
    fn heavy_overlap_is_whole() {
        assert_eq!(
            resolve(&bytes(&[From(0), FromTo(0, 0)]), 100, 10),
            RangeDecision::Whole
        );
        assert_eq!(
            resolve(&bytes(&[FromTo(0, 49), FromTo(0, 49)]), 100, 10),
            RangeDecision::Partial(vec![br(0, 49), br(0, 49)])
        );
        assert_eq!(
            resolve(&bytes(&[FromTo(0, 50), FromTo(0, 49)]), 100, 10),
            RangeDecision::Whole
        );
        // The sum would overflow a u64.
        let specs = vec![From(0); 3];
        assert_eq!(resolve(&bytes(&specs), u64::MAX, 10), RangeDecision::Whole);
    }

    fn lm() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777) // Sun, 06 Nov 1994 08:49:37 GMT
    }

    #[test]
    fn if_range_etag_strong_comparison() {
        assert!(if_range_holds(b"\"abc\"", Some("\"abc\""), None));
        assert!(if_range_holds(b" \"abc\" ", Some("\"abc\""), Some(lm())));
        assert!(if_range_holds(b"\"\"", Some("\"\""), None));
        assert!(!if_range_holds(b"\"abc\"", Some("\"abd\""), None));
        assert!(!if_range_holds(b"\"abc\"", None, Some(lm())));
        assert!(!if_range_holds(b"W/\"abc\"", Some("W/\"abc\""), None));
        assert!(!if_range_holds(b"W/\"abc\"", Some("\"abc\""), None));
        assert!(!if_range_holds(b"\"abc\"", Some("W/\"abc\""), None));
        assert!(!if_range_holds(b"\"abc", Some("\"abc"), None));
        assert!(!if_range_holds(b"\"a\"bc\"", Some("\"a\"bc\""), None));
        assert!(!if_range_holds(b"\"a c\"", Some("\"a c\""), None));
        assert!(!if_range_holds(b"abc", Some("abc"), None));
        assert!(!if_range_holds(b"\"", Some("\""), None));
        assert!(!if_range_holds(b"", Some("\"\""), None));
        // obs-text is allowed inside the opaque tag.
        assert!(if_range_holds(
            "\"\u{e9}t\u{e9}\"".as_bytes(),
            Some("\"\u{e9}t\u{e9}\""),
            None
        ));
    }

    #[test]
    fn if_range_date_exact_match() {
        let d = b"Sun, 06 Nov 1994 08:49:37 GMT";
        assert!(if_range_holds(d, None, Some(lm())));
        assert!(if_range_holds(d, Some("\"abc\""), Some(lm())));
        assert!(if_range_holds(
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            None,
            Some(lm())
        ));
        assert!(if_range_holds(
            b"Sun Nov  6 08:49:37 1994",
            None,
            Some(lm())
        ));
        // Sub-second precision of the stored time is not representable in the header.
        assert!(if_range_holds(
            d,
            None,
            Some(lm() + Duration::from_millis(300))
        ));
        assert!(!if_range_holds(
            d,
            None,
            Some(lm() + Duration::from_secs(1))
        ));
        assert!(!if_range_holds(
            d,
            None,
            Some(lm() - Duration::from_secs(1))
        ));
        assert!(!if_range_holds(d, None, None));
        assert!(!if_range_holds(
            d,
            None,
            Some(UNIX_EPOCH - Duration::from_secs(5))
        ));
        assert!(!if_range_holds(b"yesterday", None, Some(lm())));
        assert!(!if_range_holds(
            b"Sun, 06 Nov 1994 08:49:37 GMT\xff",
            None,
            Some(lm())
        ));
    }

    fn spec_strategy() -> impl Strategy<Value = RangeSpec> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| FromTo(a.min(b), a.max(b))),
            any::<u64>().prop_map(From),
            any::<u64>().prop_map(Suffix),
            (0u64..200, 0u64..200).prop_map(|(a, b)| FromTo(a.min(b), a.max(b))),
            (0u64..200).prop_map(From),
            (0u64..200).prop_map(Suffix),
        ]
    }

    fn format_spec(s: &RangeSpec) -> String {
        match s {
            FromTo(a, b) => format!("{a}-{b}"),
            From(a) => format!("{a}-"),
            Suffix(n) => format!("-{n}"),
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_range(&v);
            let _ = if_range_holds(&v, Some("\"abc\""), Some(lm()));
        }

        #[test]
        fn parse_never_panics_on_near_miss(
            tail in proptest::collection::vec(
                prop_oneof![Just(b'0'), Just(b'9'), Just(b'-'), Just(b','), Just(b' '), Just(b'x')],
                0..40,
            )
        ) {
            let mut v = b"bytes=".to_vec();
            v.extend_from_slice(&tail);
            if let RangeRequest::Bytes(specs) = parse_range(&v) {
                prop_assert!(!specs.is_empty() && specs.len() <= MAX_SPECS);
                for s in specs {
                    if let FromTo(a, b) = s {
                        prop_assert!(a <= b);
                    }
                }
            }
        }

        #[test]
        fn format_then_parse_round_trips(
            specs in proptest::collection::vec(spec_strategy(), 1..20),
            sep in prop_oneof![Just(","), Just(", "), Just(" ,\t"), Just(",,")],
        ) {
            let text = format!(
                "bytes={}",
                specs.iter().map(format_spec).collect::<Vec<_>>().join(sep)
            );
            prop_assert_eq!(parse_range(text.as_bytes()), RangeRequest::Bytes(specs));
        }

        #[test]
        fn resolve_invariants(
            specs in proptest::collection::vec(spec_strategy(), 1..20),
            len in prop_oneof![0u64..300, any::<u64>()],
            max_ranges in 0usize..25,
        ) {
            let req = RangeRequest::Bytes(specs.clone());
            match resolve(&req, len, max_ranges) {
                RangeDecision::Whole => {}
                RangeDecision::Unsatisfiable => {
                    prop_assert!(specs.len() <= max_ranges);
                    prop_assert!(specs.iter().all(|&s| resolve_spec(s, len).is_none()));
                }
                RangeDecision::Partial(ranges) => {
                    prop_assert!(!ranges.is_empty());
                    prop_assert!(ranges.len() <= max_ranges);
                    let mut sum = 0u64;
                    for r in &ranges {
                        prop_assert!(r.start <= r.end && r.end < len);
                        sum = sum.checked_add(r.len()).unwrap();
                    }
                    prop_assert!(sum <= len);
                    let expected: Vec<_> =
                        specs.iter().filter_map(|&s| resolve_spec(s, len)).collect();
                    prop_assert_eq!(ranges, expected);
                }
            }
        }
    }
}
