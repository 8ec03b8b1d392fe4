//! What the cache knows about one object version: its length, validator, the response headers
//! to replay, and its freshness. Serialized for the disk tier in a small line format whose
//! decoder rejects (never panics on) anything malformed.

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Response headers that are not replayed from the cache: per-hop or per-response fields and
/// the ones edgeslice computes itself.
const NOT_STORED: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-range",
    "age",
    "set-cookie",
    "via",
    "x-request-id",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The status to answer with: 200 for an object served in ranges from its chunks; any
    /// other cacheable status (301, 404, ...) is a small response kept whole (in chunk 0) and
    /// replayed as it was, Range ignored, as its origin did.
    pub status: u16,
    /// Total length in bytes.
    pub size: u64,
    /// The version's identity, naming its chunks: the ETag as sent, else
    /// `lm:<Last-Modified>;<size>`, else (no validator at all) a name unique to the fetch that
    /// stored it, `u:<nanoseconds>`, so two validator-less versions never share chunks.
    pub validator: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Headers to replay on every response (see `NOT_STORED`), in origin order.
    pub headers: Vec<(String, String)>,
    /// When the response was received, and the age it already had then (seconds).
    pub stored_at: SystemTime,
    pub initial_age: u64,
    /// Fresh until this instant; after it the object must be revalidated.
    pub fresh_until: SystemTime,
    /// How long past `fresh_until` a stale copy may be served when every origin fails.
    pub stale_if_error: Duration,
    pub must_revalidate: bool,
    /// `stale-while-revalidate`: how long past `fresh_until` a stale copy may be served while
    /// one background revalidation runs.
    pub stale_while_revalidate: Duration,
    /// `headers`, parsed once for the responses that replay them (see [`ObjectMeta::wire`]).
    pub wire: WireHeaders,
}

/// The stored headers as validated names and values, built on the first response of a version
/// and shared by all the others (a hit then clones refcounted values instead of parsing and
/// allocating each field). Derived from `headers`: not stored, never compared, and not carried
/// by a clone (a clone may change its headers; it builds its own on first use).
#[derive(Default)]
pub struct WireHeaders(std::sync::OnceLock<Wire>);

/// What every response of one version shares, computed on its first response: the stored
/// fields, the `Content-Length` of the whole object, and the `/<size>` tail of every
/// `Content-Range` (so a hit formats only the numbers its own range adds).
#[derive(Debug)]
pub struct Wire {
    pub fields: Box<[(http::HeaderName, http::HeaderValue)]>,
    pub length: http::HeaderValue,
    pub range_tail: Box<str>,
}

impl Wire {
    /// `Content-Range: bytes <first>-<last>/<size>` without intermediate strings.
    pub fn content_range(&self, first: u64, last: u64) -> http::HeaderValue {
        let mut a = itoa::Buffer::new();
        let mut b = itoa::Buffer::new();
        let (first, last) = (a.format(first), b.format(last));
        let mut v =
            bytes::BytesMut::with_capacity(7 + first.len() + last.len() + self.range_tail.len());
        for part in ["bytes ", first, "-", last, &self.range_tail] {
            v.extend_from_slice(part.as_bytes());
        }
        // Digits, '-', '/' and ASCII letters only: always a valid value.
        http::HeaderValue::from_maybe_shared(v.freeze())
            .unwrap_or_else(|_| http::HeaderValue::from_static("bytes */0"))
    }

    /// `Content-Range: bytes */<size>` (a 416's).
    pub fn unsatisfied_range(&self) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!("bytes *{}", self.range_tail))
            .unwrap_or_else(|_| http::HeaderValue::from_static("bytes */0"))
    }
}

impl Clone for WireHeaders {
    fn clone(&self) -> Self {
        WireHeaders::default()
    }
}

impl PartialEq for WireHeaders {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for WireHeaders {}

impl std::fmt::Debug for WireHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireHeaders")
    }
}

impl ObjectMeta {
    /// The stored headers, parsed (once per version). A field that is not a valid name or value
    /// (a damaged cache file) is left out rather than failing the response.
    pub fn wire(&self) -> &Wire {
        self.wire.0.get_or_init(|| Wire {
            fields: self
                .headers
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        http::HeaderName::from_bytes(n.as_bytes()).ok()?,
                        http::HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            length: http::HeaderValue::from(self.size),
            range_tail: format!("/{}", self.size).into(),
        })
    }

    /// What this version takes from the allocator, once shared by an `Arc`: the struct, its
    /// strings, the stored fields as text and (built on the first response, counted from the
    /// start) as the parsed fields every response replays ([`ObjectMeta::wire`]). Each
    /// allocation is rounded up to the allocator's size class. What the metadata table charges
    /// (see `cache::tables`).
    pub fn memory_bytes(&self) -> u64 {
        use super::tables::{alloc_size, arc_size};
        use std::mem::size_of;
        let text = |s: &String| alloc_size(s.capacity() as u64);
        let optional = |s: &Option<String>| s.as_ref().map_or(0, text);
        let fields = self.headers.len() as u64;
        let stored: u64 = self
            .headers
            .iter()
            .map(|(n, v)| text(n) + text(v))
            .sum::<u64>()
            + alloc_size((self.headers.capacity() * size_of::<(String, String)>()) as u64);
        // Parsed: each name and value in its own buffer, and the shared header a `Bytes`
        // allocates when first cloned (every response clones them); the slice of pairs; the
        // length value and the `Content-Range` tail.
        let parsed: u64 = self
            .headers
            .iter()
            .map(|(n, v)| alloc_size(n.len() as u64) + alloc_size(v.len() as u64) + 2 * 32)
            .sum::<u64>()
            + alloc_size(fields * size_of::<(http::HeaderName, http::HeaderValue)>() as u64)
            + 2 * 32
            + 32;
        arc_size(size_of::<ObjectMeta>())
            + text(&self.validator)
            + optional(&self.etag)
            + optional(&self.last_modified)
            + stored
            + parsed
    }

    /// The validator for a response: the ETag when there is one, else Last-Modified plus size.
    /// `None` when the response has neither (it cannot be kept consistent across fetches).
    pub fn validator_of(
        etag: Option<&str>,
        last_modified: Option<&str>,
        size: u64,
    ) -> Option<String> {
        match (etag, last_modified) {
            (Some(e), _) if !e.is_empty() => Some(e.to_string()),
            (_, Some(lm)) if !lm.is_empty() => Some(format!("lm:{lm};{size}")),
            _ => None,
        }
    }

    /// The identity of a version without any validator: unique to the fetch (`now`).
    pub fn unvalidated_identity(now: SystemTime) -> String {
        let nanos = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("u:{nanos}")
    }

    /// Whether an origin response (its headers, and the object length it states) is this
    /// version: the same length and ETag; without an ETag, the same Last-Modified; without
    /// any validator, also the same `Cache-Control` (the freshness period), since the length
    /// is all else that can be checked.
    pub fn same_version(&self, headers: &http::HeaderMap, size: u64) -> bool {
        let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        if size != self.size || text("etag") != self.etag.as_deref() {
            return false;
        }
        if self.etag.is_some() {
            return true;
        }
        if text("last-modified") != self.last_modified.as_deref() {
            return false;
        }
        self.last_modified.is_some() || text("cache-control") == self.header("cache-control")
    }

    /// Whether a 304 (its header fields) identifies this stored response for update, by RFC
    /// 9111 §4.3.4's selection: an ETag in the 304 must be this version's (a strong one
    /// exactly, a weak one by weak comparison); without an ETag, a Last-Modified must be this
    /// version's. A 304 with neither answers the conditional built from this version's own
    /// validators, so it names this version. A 304 that names another version selects no
    /// stored response: it must not update this one.
    pub fn identified_by_304(&self, not_modified: &http::HeaderMap) -> bool {
        let text = |n: &str| {
            not_modified
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        if let Some(etag) = text("etag") {
            let Some(stored) = self.etag.as_deref().map(str::trim) else {
                return false;
            };
            let weak = |t: &str| t.strip_prefix("W/").unwrap_or(t).to_string();
            return if etag.starts_with("W/") {
                weak(etag) == weak(stored)
            } else {
                etag == stored
            };
        }
        match text("last-modified") {
            Some(lm) => self.last_modified.as_deref().map(str::trim) == Some(lm),
            None => true,
        }
    }

    /// Whether the origin can be asked if this version is still current (ETag or
    /// Last-Modified). Without a validator, an expired object is fetched again.
    pub fn has_validator(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    /// Whether the object is served in ranges from its chunks (a 200), rather than replayed
    /// whole with its own status.
    pub fn is_ranged(&self) -> bool {
        self.status == 200
    }

    /// Whether a stale copy may be served at `now` while one background revalidation runs.
    pub fn within_stale_while_revalidate(&self, now: SystemTime) -> bool {
        !self.must_revalidate && now < self.fresh_until + self.stale_while_revalidate
    }

    /// The freshness lifetime (RFC 9111 §4.2.1) the object was stored with.
    pub fn lifetime(&self) -> Duration {
        self.fresh_until
            .duration_since(self.stored_at)
            .unwrap_or_default()
            + Duration::from_secs(self.initial_age)
    }

    pub fn keep_header(name: &str) -> bool {
        !NOT_STORED.contains(&name)
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.fresh_until
    }

    /// Whether a stale copy may still be served on origin errors at `now`.
    pub fn within_stale_if_error(&self, now: SystemTime) -> bool {
        !self.must_revalidate && now < self.fresh_until + self.stale_if_error
    }

    /// The `Age` to send at `now` (RFC 9111 §4.2.3).
    pub fn age(&self, now: SystemTime) -> u64 {
        let resident = now
            .duration_since(self.stored_at)
            .unwrap_or_default()
            .as_secs();
        self.initial_age.saturating_add(resident)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn encode(&self) -> Bytes {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut out = String::from("edgeslice-meta 1\n");
        out.push_str(&format!("status {}\n", self.status));
        out.push_str(&format!("size {}\n", self.size));
        out.push_str(&format!("validator {}\n", self.validator));
        if let Some(e) = &self.etag {
            out.push_str(&format!("etag {e}\n"));
        }
        if let Some(lm) = &self.last_modified {
            out.push_str(&format!("last-modified {lm}\n"));
        }
        out.push_str(&format!("stored-at {}\n", secs(self.stored_at)));
        out.push_str(&format!("initial-age {}\n", self.initial_age));
        out.push_str(&format!("fresh-until {}\n", secs(self.fresh_until)));
        out.push_str(&format!(
            "stale-if-error {}\n",
            self.stale_if_error.as_secs()
        ));
        out.push_str(&format!(
            "must-revalidate {}\n",
            u8::from(self.must_revalidate)
        ));
        out.push_str(&format!("swr {}\n", self.stale_while_revalidate.as_secs()));
        for (n, v) in &self.headers {
            // Header values cannot contain CR/LF, so a line per header is unambiguous.
            out.push_str(&format!("h {n}: {v}\n"));
        }
        Bytes::from(out)
    }

    pub fn decode(data: &[u8]) -> Option<ObjectMeta> {
        let text = std::str::from_utf8(data).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "edgeslice-meta 1" {
            return None;
        }
        let time = |s: &str| {
            s.parse::<u64>()
                .ok()
                .map(|v| UNIX_EPOCH + Duration::from_secs(v))
        };
        let (mut size, mut validator, mut etag, mut lm) = (None, None, None, None);
        let (mut stored_at, mut initial_age, mut fresh_until, mut sie, mut mr) =
            (None, None, None, None, None);
        let mut headers = Vec::new();
        // Written by every version since they were added; absent in older entries.
        let (mut status, mut swr) = (200, Duration::ZERO);
        for line in lines {
            let (k, v) = line.split_once(' ')?;
            match k {
                "status" => status = v.parse().ok().filter(|s| (200..600).contains(s))?,
                "swr" => swr = Duration::from_secs(v.parse().ok()?),
                "size" => size = Some(v.parse().ok()?),
                "validator" => validator = Some(v.to_string()),
                "etag" => etag = Some(v.to_string()),
                "last-modified" => lm = Some(v.to_string()),
                "stored-at" => stored_at = Some(time(v)?),
                "initial-age" => initial_age = Some(v.parse().ok()?),
                "fresh-until" => fresh_until = Some(time(v)?),
                "stale-if-error" => sie = Some(Duration::from_secs(v.parse().ok()?)),
                "must-revalidate" => mr = Some(v == "1"),
                "h" => {
                    let (n, val) = v.split_once(": ")?;
                    headers.push((n.to_string(), val.to_string()));
                }
                _ => return None,
            }
        }
        Some(ObjectMeta {
            status,
            size: size?,
            validator: validator?,
            etag,
            last_modified: lm,
            headers,
            stored_at: stored_at?,
            initial_age: initial_age?,
            fresh_until: fresh_until?,
            stale_if_error: sie?,
            must_revalidate: mr?,
            stale_while_revalidate: swr,
            wire: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ObjectMeta {
        ObjectMeta {
            status: 200,
            size: 123_456,
            validator: "\"v1\"".into(),
            etag: Some("\"v1\"".into()),
            last_modified: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
            headers: vec![
                ("content-type".into(), "video/mp2t".into()),
                ("cache-control".into(), "max-age=60".into()),
            ],
            stored_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            initial_age: 3,
            fresh_until: UNIX_EPOCH + Duration::from_secs(1_700_000_060),
            stale_if_error: Duration::from_secs(86400),
            must_revalidate: false,
            stale_while_revalidate: Duration::from_secs(30),
            wire: Default::default(),
        }
    }

    #[test]
    fn a_304_updates_only_the_version_its_validators_name() {
        let m = sample();
        let h = |fields: &[(&'static str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (n, v) in fields {
                map.insert(*n, http::HeaderValue::from_str(v).unwrap());
            }
            map
        };
        let lm = "Wed, 21 Oct 2015 07:28:00 GMT";
        let other_lm = "Thu, 22 Oct 2015 07:28:00 GMT";
        // The same strong ETag (whatever its Last-Modified says), or its weak form.
        assert!(m.identified_by_304(&h(&[("etag", "\"v1\"")])));
        assert!(m.identified_by_304(&h(&[("etag", "\"v1\""), ("last-modified", other_lm)])));
        assert!(m.identified_by_304(&h(&[("etag", "W/\"v1\"")])));
        // Another ETag names another version, strong or weak, even with the same date.
        assert!(!m.identified_by_304(&h(&[("etag", "\"v2\"")])));
        assert!(!m.identified_by_304(&h(&[("etag", "W/\"v2\""), ("last-modified", lm)])));
        // No ETag: the Last-Modified decides.
        assert!(m.identified_by_304(&h(&[("last-modified", lm)])));
        assert!(!m.identified_by_304(&h(&[("last-modified", other_lm)])));
        // No validator at all: the answer to the conditional this version's validators made.
        assert!(m.identified_by_304(&h(&[("cache-control", "max-age=5")])));
        // A stored response without an ETag is not the one a 304 with an ETag names; a weak
        // stored ETag is not the one a strong ETag names.
        let mut no_etag = sample();
        no_etag.etag = None;
        assert!(!no_etag.identified_by_304(&h(&[("etag", "\"v1\"")])));
        assert!(no_etag.identified_by_304(&h(&[("last-modified", lm)])));
        let mut weak = sample();
        weak.etag = Some("W/\"v1\"".into());
        assert!(!weak.identified_by_304(&h(&[("etag", "\"v1\"")])));
        assert!(weak.identified_by_304(&h(&[("etag", "W/\"v1\"")])));
    }

    #[test]
    fn wire_precomputes_lengths_and_range_tails() {
        let m = sample();
        let w = m.wire();
        assert_eq!(w.length, "123456");
        assert_eq!(w.content_range(0, 4095), "bytes 0-4095/123456");
        assert_eq!(
            w.content_range(123_455, 123_455),
            "bytes 123455-123455/123456"
        );
        assert_eq!(w.unsatisfied_range(), "bytes */123456");
        assert_eq!(w.fields.len(), 2);
        // A clone (whose size may change) builds its own.
        let mut c = m.clone();
        c.size = 7;
        assert_eq!(c.wire().content_range(0, 6), "bytes 0-6/7");
    }

    proptest! {
        #[test]
        fn content_range_matches_format(first in any::<u64>(), last in any::<u64>(), size in any::<u64>()) {
            let mut m = sample();
            m.size = size;
            let v = m.wire().content_range(first, last);
            prop_assert_eq!(v.to_str().unwrap(), format!("bytes {first}-{last}/{size}"));
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(ObjectMeta::decode(&m.encode()), Some(m));
    }

    #[test]
    fn freshness_and_age() {
        let m = sample();
        assert!(m.is_fresh(m.stored_at));
        assert!(!m.is_fresh(m.fresh_until));
        assert!(m.within_stale_if_error(m.fresh_until + Duration::from_secs(10)));
        assert!(!m.within_stale_if_error(m.fresh_until + Duration::from_secs(86401)));
        assert_eq!(m.age(m.stored_at + Duration::from_secs(10)), 13);
    }

    #[test]
    fn validators() {
        assert_eq!(
            ObjectMeta::validator_of(Some("\"a\""), Some("x"), 1).as_deref(),
            Some("\"a\"")
        );
        assert_eq!(
            ObjectMeta::validator_of(None, Some("x"), 5).as_deref(),
            Some("lm:x;5")
        );
        assert_eq!(ObjectMeta::validator_of(None, None, 5), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn same_version_by_etag_then_last_modified_then_length_and_freshness() {
        let m = sample();
        let lm = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert!(m.same_version(&headers(&[("etag", "\"v1\"")]), 123_456));
        assert!(!m.same_version(&headers(&[("etag", "\"v2\"")]), 123_456));
        assert!(!m.same_version(&headers(&[("etag", "\"v1\"")]), 123_457));
        assert!(!m.same_version(&headers(&[("last-modified", lm)]), 123_456));

        let by_date = ObjectMeta {
            etag: None,
            ..sample()
        };
        assert!(by_date.same_version(&headers(&[("last-modified", lm)]), 123_456));
        assert!(!by_date.same_version(&headers(&[("last-modified", "x")]), 123_456));
        assert!(!by_date.same_version(&headers(&[]), 123_456));

        // No validator: the length and the freshness period are all there is to compare.
        let bare = ObjectMeta {
            etag: None,
            last_modified: None,
            validator: ObjectMeta::unvalidated_identity(SystemTime::now()),
            ..sample()
        };
        assert!(!bare.has_validator());
        assert!(bare.same_version(&headers(&[("cache-control", "max-age=60")]), 123_456));
        assert!(!bare.same_version(&headers(&[("cache-control", "max-age=61")]), 123_456));
        assert!(!bare.same_version(&headers(&[("cache-control", "max-age=60")]), 1));
        assert!(!bare.same_version(
            &headers(&[("cache-control", "max-age=60"), ("etag", "\"e\"")]),
            123_456
        ));
    }

    #[test]
    fn unvalidated_identities_differ_per_fetch() {
        let t = UNIX_EPOCH + Duration::from_secs(5);
        assert_ne!(
            ObjectMeta::unvalidated_identity(t),
            ObjectMeta::unvalidated_identity(t + Duration::from_nanos(1))
        );
    }

    #[test]
    fn entries_written_before_status_and_swr_decode_as_200() {
        let m = sample();
        let old: String = String::from_utf8(m.encode().to_vec())
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("status ") && !l.starts_with("swr "))
            .map(|l| format!("{l}\n"))
            .collect();
        let back = ObjectMeta::decode(old.as_bytes()).unwrap();
        assert_eq!(back.status, 200);
        assert_eq!(back.stale_while_revalidate, Duration::ZERO);
        let s404 = ObjectMeta {
            status: 404,
            ..sample()
        };
        assert_eq!(ObjectMeta::decode(&s404.encode()), Some(s404));
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ObjectMeta::decode(&data);
        }

        #[test]
        fn truncated_encodings_never_panic(cut in 0usize..400) {
            let e = sample().encode();
            let _ = ObjectMeta::decode(&e[..cut.min(e.len())]);
        }
    }
}
