//! What the cache knows about one object version: its length, validator, the response headers
//! to replay, and its freshness. Serialized for the disk tier in a small line format whose
//! decoder rejects (never panics on) anything malformed.

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Response headers that are not replayed from the cache: per-hop or per-response fields and
/// the ones edgeslice computes itself.
const NOT_STORED: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-range",
    "date",
    "age",
    "set-cookie",
    "via",
    "x-request-id",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Total length in bytes.
    pub size: u64,
    /// The version's identity: the strong ETag as sent, else `lm:<Last-Modified>;<size>`.
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
}

impl ObjectMeta {
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
        for line in lines {
            let (k, v) = line.split_once(' ')?;
            match k {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ObjectMeta {
        ObjectMeta {
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
