//! `multipart/byteranges` framing (RFC 9110 §14.6) for 206 responses with several ranges.
//!
//! The whole layout (every part header and the trailer) is computed up front, so the exact
//! `Content-Length` is known before a single chunk is read; the proxy then streams
//! `part_header, range bytes, part_header, range bytes, …, trailer`.
//!
//! Framing, the same as nginx's: every part starts with `CRLF--BOUNDARY CRLF` (the first one
//! too; the leading CRLF is then just an empty preamble line), then an optional
//! `Content-Type:` line, a `Content-Range:` line and an empty line; the body ends with
//! `CRLF--BOUNDARY--CRLF`.
//!
//! Pure logic, no I/O; this module must **never panic** on any input (lengths are summed with
//! saturating arithmetic) and must never let caller-supplied text inject header lines: a
//! content type containing control characters is left out rather than written.

use super::parse::ByteRange;
use bytes::Bytes;
use rand::Rng;

/// Length of the boundaries [`new_boundary`] makes (alphanumeric, ~190 bits of randomness).
pub const BOUNDARY_LEN: usize = 32;

/// The framing of a multipart/byteranges body, computed up front so Content-Length is known
/// before any chunk is read. The body is: for each part, `part_header` then the range's bytes;
/// then `trailer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartLayout {
    /// The boundary, without the leading `--`.
    pub boundary: String,
    /// Per part, in order: the header bytes to send, then the range whose bytes follow it.
    pub parts: Vec<(Bytes, ByteRange)>,
    /// The closing delimiter, sent after the last part's bytes.
    pub trailer: Bytes,
}

/// A header value is safe to write verbatim if it has no control characters except HTAB.
fn is_safe_field_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl MultipartLayout {
    /// Lay out a body for `ranges` (in the given order) of an object of `total_len` bytes whose
    /// own media type is `content_type` (omitted from the part headers when `None`, empty, or
    /// containing control characters). `boundary` should come from [`new_boundary`]; it is
    /// used verbatim and must be a valid RFC 2046 boundary that does not need quoting.
    pub fn new(
        ranges: &[ByteRange],
        content_type: Option<&str>,
        total_len: u64,
        boundary: String,
    ) -> Self {
        let content_type = content_type
            .map(str::trim)
            .filter(|ct| !ct.is_empty() && is_safe_field_value(ct));
        let parts = ranges
            .iter()
            .map(|range| {
                let mut header = format!("\r\n--{boundary}\r\n");
                if let Some(ct) = content_type {
                    header.push_str("Content-Type: ");
                    header.push_str(ct);
                    header.push_str("\r\n");
                }
                header.push_str("Content-Range: ");
                header.push_str(&range.content_range(total_len));
                header.push_str("\r\n\r\n");
                (Bytes::from(header), *range)
            })
            .collect();
        let trailer = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        MultipartLayout {
            boundary,
            parts,
            trailer,
        }
    }

    /// The response's `Content-Type`: `multipart/byteranges; boundary=...`.
    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }

    /// Exact length of the whole body (part headers, range bytes and trailer); saturates at
    /// `u64::MAX`, which no real body reaches.
    pub fn body_len(&self) -> u64 {
        self.parts
            .iter()
            .fold(byte_len(&self.trailer), |acc, (header, range)| {
                acc.saturating_add(byte_len(header))
                    .saturating_add(range.len())
            })
    }
}

fn byte_len(b: &Bytes) -> u64 {
    u64::try_from(b.len()).unwrap_or(u64::MAX)
}

/// A random boundary ([`BOUNDARY_LEN`] alphanumeric characters) that cannot occur by accident.
pub fn new_boundary() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(BOUNDARY_LEN)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn br(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    /// Build the body the way the proxy streams it.
    fn assemble(layout: &MultipartLayout, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (header, range) in &layout.parts {
            body.extend_from_slice(header);
            body.extend_from_slice(&data[range.start as usize..=range.end as usize]);
        }
        body.extend_from_slice(&layout.trailer);
        body
    }

    #[derive(Debug, PartialEq)]
    struct Part {
        content_type: Option<String>,
        content_range: String,
        data: Vec<u8>,
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// A small, strict multipart/byteranges parser: relies on Content-Range for each part's
    /// length (so payload bytes that look like boundaries cannot confuse it) and then checks
    /// that the delimiter follows.
    fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
        let delim = format!("\r\n--{boundary}");
        let mut rest = body;
        let mut parts = Vec::new();
        loop {
            rest = rest
                .strip_prefix(delim.as_bytes())
                .ok_or_else(|| format!("expected delimiter at {}", body.len() - rest.len()))?;
            if let Some(after) = rest.strip_prefix(b"--\r\n") {
                if !after.is_empty() {
                    return Err("bytes after the close delimiter".into());
                }
                return Ok(parts);
            }
            rest = rest
                .strip_prefix(b"\r\n")
                .ok_or("no CRLF after delimiter")?;
            let end = find(rest, b"\r\n\r\n").ok_or("unterminated part headers")?;
            let headers = std::str::from_utf8(&rest[..end]).map_err(|e| e.to_string())?;
            rest = &rest[end + 4..];
            let mut content_type = None;
            let mut content_range = None;
            for line in headers.split("\r\n") {
                let (name, value) = line.split_once(": ").ok_or("bad header line")?;
                match name {
                    "Content-Type" => content_type = Some(value.to_string()),
                    "Content-Range" => content_range = Some(value.to_string()),
                    other => return Err(format!("unexpected header {other}")),
                }
            }
            let content_range = content_range.ok_or("no Content-Range")?;
            let spec = content_range.strip_prefix("bytes ").ok_or("bad unit")?;
            let (span, _total) = spec.split_once('/').ok_or("no total")?;
            let (a, b) = span.split_once('-').ok_or("no dash")?;
            let a: usize = a.parse().map_err(|_| "bad start")?;
            let b: usize = b.parse().map_err(|_| "bad end")?;
            let n = b - a + 1;
            if rest.len() < n {
                return Err("truncated part".into());
            }
            parts.push(Part {
                content_type,
                content_range,
                data: rest[..n].to_vec(),
            });
            rest = &rest[n..];
        }
    }

    #[test]
    fn exact_framing() {
        let data: Vec<u8> = (0u8..100).collect();
        let layout = MultipartLayout::new(
            &[br(0, 1), br(98, 99)],
            Some("text/plain"),
            100,
            "B".to_string(),
        );
        let body = assemble(&layout, &data);
        let expected: &[u8] =
            b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/100\r\n\r\n\x00\x01\
            \r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 98-99/100\r\n\r\n\x62\x63\
            \r\n--B--\r\n";
        assert_eq!(body, expected);
        assert_eq!(layout.body_len(), expected.len() as u64);
        assert_eq!(layout.content_type(), "multipart/byteranges; boundary=B");
    }

    #[test]
    fn content_type_omitted_when_absent_or_unsafe() {
        for ct in [
            None,
            Some(""),
            Some("  "),
            Some("text/plain\r\nX-Evil: 1"),
            Some("a\nb"),
        ] {
            let layout = MultipartLayout::new(&[br(0, 0)], ct, 1, "B".to_string());
            assert_eq!(
                &layout.parts[0].0[..],
                b"\r\n--B\r\nContent-Range: bytes 0-0/1\r\n\r\n",
                "{ct:?}"
            );
        }
        let layout = MultipartLayout::new(&[br(0, 0)], Some(" a/b; x=\"y\" "), 1, "B".into());
        assert_eq!(
            &layout.parts[0].0[..],
            b"\r\n--B\r\nContent-Type: a/b; x=\"y\"\r\nContent-Range: bytes 0-0/1\r\n\r\n"
        );
    }

    #[test]
    fn no_ranges_and_huge_ranges_do_not_panic() {
        let layout = MultipartLayout::new(&[], None, 0, new_boundary());
        assert!(layout.parts.is_empty());
        assert_eq!(layout.body_len(), layout.trailer.len() as u64);
        let layout = MultipartLayout::new(
            &[br(0, u64::MAX - 1), br(0, u64::MAX - 1)],
            None,
            u64::MAX,
            new_boundary(),
        );
        assert_eq!(layout.body_len(), u64::MAX);
    }

    #[test]
    fn boundaries_are_alphanumeric_and_distinct() {
        let a = new_boundary();
        let b = new_boundary();
        assert_eq!(a.len(), BOUNDARY_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    proptest! {
        #[test]
        fn assembled_body_parses_back(
            (data, ranges) in proptest::collection::vec(any::<u8>(), 1..2000).prop_flat_map(|data| {
                let len = data.len() as u64;
                let range = (0..len, 0..len).prop_map(|(a, b)| br(a.min(b), a.max(b)));
                (Just(data), proptest::collection::vec(range, 0..12))
            }),
            content_type in proptest::option::of("[a-z]{1,8}/[a-z0-9.+-]{1,12}"),
            random_boundary in any::<bool>(),
        ) {
            // A short, fixed boundary makes accidental occurrences in the data more likely;
            // the framing must not care.
            let boundary = if random_boundary { new_boundary() } else { "ab".to_string() };
            let total = data.len() as u64;
            let layout = MultipartLayout::new(&ranges, content_type.as_deref(), total, boundary.clone());
            prop_assert_eq!(layout.parts.len(), ranges.len());
            let body = assemble(&layout, &data);
            prop_assert_eq!(layout.body_len(), body.len() as u64);
            let parts = parse(&body, &boundary).map_err(TestCaseError::fail)?;
            prop_assert_eq!(parts.len(), ranges.len());
            for (part, range) in parts.iter().zip(&ranges) {
                prop_assert_eq!(&part.content_type, &content_type);
                prop_assert_eq!(
                    &part.content_range,
                    &format!("bytes {}-{}/{}", range.start, range.end, total)
                );
                prop_assert_eq!(
                    &part.data[..],
                    &data[range.start as usize..=range.end as usize]
                );
            }
        }
    }
}
