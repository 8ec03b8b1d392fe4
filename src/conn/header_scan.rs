//! Watches the bytes of a request header as they arrive, before Pingora parses them: where the
//! header ends, and whether it is over the limits (a request line too long → 414; the whole
//! header too large or too many fields → 431). Pure: it keeps a few counters and never buffers,
//! so a client cannot make it hold more than the bytes Pingora already holds.
//!
//! A header can also be watched from its middle ([`HeaderScan::resumed`]): when pipelined
//! requests came in one write, Pingora may already hold the start of the next header (bytes
//! the guard saw go by as part of the previous request). The scan then does not know where it
//! is in that header until the first line end: it neither takes that line for the request line
//! (the exact 414 check is made once Pingora has parsed the line) nor decides alone whether an
//! empty first segment ends the header ([`Scan::Ambiguous`]).

/// What one header may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Request line plus fields plus line ends, in bytes.
    pub max_header: usize,
    /// The request target, in bytes (the request line may be this plus [`REQUEST_LINE_SLACK`]).
    pub max_uri: usize,
    /// Header field lines.
    pub max_fields: usize,
}

/// Room on the request line for the method, two spaces and the version around the target.
pub const REQUEST_LINE_SLACK: usize = 64;

/// Pingora parses at most this many header fields (`MAX_HEADERS`); past it, 431 rather than
/// Pingora's bare 400.
pub const MAX_FIELDS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// More header bytes are expected.
    Partial,
    /// The header ended inside the bytes just fed, this many bytes into them.
    Complete(usize),
    UriTooLong,
    TooLarge,
    /// A resumed scan met a line end with nothing before it, this many bytes into the bytes
    /// just fed: the end of the header if the bytes before the scan ended a line, else the
    /// end of that line. Whoever holds those bytes decides: [`HeaderScan::continues`] if the
    /// header goes on.
    Ambiguous(usize),
}

/// The state of one header's scan. Start a new one for each request.
#[derive(Debug, Default, Clone)]
pub struct HeaderScan {
    /// Bytes of this header so far, empty lines before the request line included.
    total: usize,
    /// Bytes of the current, unfinished line.
    line: usize,
    /// Whether the last byte fed was a CR.
    cr: bool,
    /// Finished non-empty lines: the request line, then fields.
    lines: usize,
    /// A resumed scan that has not yet seen a line end: where it is in the header is unknown.
    unknown_line: bool,
}

impl HeaderScan {
    /// A scan of a header whose first bytes went by unseen (held by Pingora from an earlier
    /// read): the request line is taken as past, and the size counts from here.
    pub fn resumed() -> HeaderScan {
        HeaderScan {
            lines: 1,
            unknown_line: true,
            ..HeaderScan::default()
        }
    }

    /// After [`Scan::Ambiguous`]: the header did not end there; feed the bytes after it.
    pub fn continues(&mut self) {
        self.unknown_line = false;
    }

    /// Feed the next bytes received. After anything but `Partial` the scan is over.
    pub fn feed(&mut self, data: &[u8], limits: &HeaderLimits) -> Scan {
        let mut start = 0;
        for lf in memchr::memchr_iter(b'\n', data) {
            let seg = &data[start..lf];
            let ends_cr = seg.last().map_or(self.cr, |&b| b == b'\r');
            let content = self.line + seg.len() - usize::from(ends_cr);
            self.total += self.line + seg.len() + 1;
            self.line = 0;
            self.cr = false;
            start = lf + 1;
            if std::mem::take(&mut self.unknown_line) {
                if content == 0 {
                    return Scan::Ambiguous(start);
                }
                // The tail of a line begun before the scan: a field (or the request line).
                if self.total > limits.max_header {
                    return Scan::TooLarge;
                }
                continue;
            }
            if content == 0 {
                if self.lines > 0 {
                    return Scan::Complete(start);
                }
                // RFC 9112 §2.2: empty lines before the request line are ignored (but counted).
            } else {
                self.lines += 1;
                if self.lines == 1 && content > limits.max_uri + REQUEST_LINE_SLACK {
                    return Scan::UriTooLong;
                }
                if self.lines > limits.max_fields + 1 {
                    return Scan::TooLarge;
                }
            }
            if self.total > limits.max_header {
                return Scan::TooLarge;
            }
        }
        let rest = &data[start..];
        if let Some(&last) = rest.last() {
            self.line += rest.len();
            self.cr = last == b'\r';
        }
        // A CR that may end the line is not counted yet: the verdict must not depend on where
        // the bytes were split.
        let pending = self.line - usize::from(self.cr);
        if self.lines == 0 && pending > limits.max_uri + REQUEST_LINE_SLACK {
            return Scan::UriTooLong;
        }
        if self.total + pending > limits.max_header {
            return Scan::TooLarge;
        }
        Scan::Partial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: HeaderLimits = HeaderLimits {
        max_header: 1024,
        max_uri: 256,
        max_fields: 8,
    };

    fn scan_all(parts: &[&[u8]]) -> Scan {
        feed_all(HeaderScan::default(), parts)
    }

    /// Feed `parts` to `s` in turn: its first answer that is not `Partial`.
    fn feed_all(mut s: HeaderScan, parts: &[&[u8]]) -> Scan {
        for p in parts {
            match s.feed(p, &LIMITS) {
                Scan::Partial => continue,
                other => return other,
            }
        }
        Scan::Partial
    }

    #[test]
    fn finds_the_end_of_a_header_and_where_it_is() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(scan_all(&[req]), Scan::Complete(req.len() - 4));
        // Bare LF line ends, as httparse accepts them.
        assert_eq!(
            scan_all(&[b"GET / HTTP/1.1\nHost: a\n\nX"]),
            Scan::Complete(24)
        );
    }

    #[test]
    fn the_end_is_found_across_any_split() {
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
        for cut in 0..=req.len() {
            for cut2 in cut..=req.len() {
                let (a, rest) = req.split_at(cut);
                let (b, c) = rest.split_at(cut2 - cut);
                let mut s = HeaderScan::default();
                let mut got = Scan::Partial;
                let mut offset = 0;
                for part in [a, b, c] {
                    match s.feed(part, &LIMITS) {
                        Scan::Partial => offset += part.len(),
                        Scan::Complete(n) => {
                            got = Scan::Complete(offset + n);
                            break;
                        }
                        other => panic!("{other:?}"),
                    }
                }
                assert_eq!(got, Scan::Complete(req.len()), "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn empty_lines_before_the_request_line_are_skipped() {
        assert_eq!(
            scan_all(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]),
            Scan::Complete(22)
        );
    }

    #[test]
    fn a_long_request_line_is_414_even_before_it_ends() {
        // The scan allows REQUEST_LINE_SLACK around the target (the exact check is made once
        // the line is parsed): 256 + 64 is the most a line may be.
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(360));
        assert_eq!(scan_all(&[long.as_bytes()]), Scan::UriTooLong);
        let unfinished = format!("GET /{}", "a".repeat(400));
        assert_eq!(scan_all(&[unfinished.as_bytes()]), Scan::UriTooLong);
        // Just under the limit is fine.
        let ok = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(255));
        assert!(matches!(scan_all(&[ok.as_bytes()]), Scan::Complete(_)));
    }

    #[test]
    fn a_large_header_is_431_before_it_ends() {
        let big = format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(2000));
        assert_eq!(scan_all(&[big.as_bytes()]), Scan::TooLarge);
        let many: String = (0..9).map(|i| format!("F{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(scan_all(&[req.as_bytes()]), Scan::TooLarge);
        let eight: String = (0..8).map(|i| format!("F{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{eight}\r\n");
        assert!(matches!(scan_all(&[req.as_bytes()]), Scan::Complete(_)));
    }

    #[test]
    fn a_flood_of_empty_lines_is_bounded() {
        let flood = b"\r\n".repeat(600);
        assert_eq!(scan_all(&[&flood]), Scan::TooLarge);
    }

    fn resumed_all(parts: &[&[u8]]) -> Scan {
        feed_all(HeaderScan::resumed(), parts)
    }

    #[test]
    fn a_resumed_scan_takes_no_line_for_the_request_line() {
        // The tail of a long field (a Cookie whose start Pingora holds) is not a request line:
        // no 414, and the header is accepted up to max_header_size counted from here.
        let tail = format!("{}\r\nAccept: */*\r\n\r\nNEXT", "c".repeat(600));
        let want = tail.len() - 4;
        assert_eq!(resumed_all(&[tail.as_bytes()]), Scan::Complete(want));
        // Over max_header_size from here: 431.
        let big = format!("{}\r\n", "c".repeat(1100));
        assert_eq!(resumed_all(&[big.as_bytes()]), Scan::TooLarge);
        let unfinished = "c".repeat(1100);
        assert_eq!(resumed_all(&[unfinished.as_bytes()]), Scan::TooLarge);
        // Fields are still counted.
        let many: String = (0..9).map(|i| format!("F{i}: v\r\n")).collect();
        let req = format!("ookie: a\r\n{many}\r\n");
        assert_eq!(resumed_all(&[req.as_bytes()]), Scan::TooLarge);
    }

    #[test]
    fn a_resumed_scan_leaves_an_empty_first_line_to_the_holder() {
        // "\r\n" first: the end of the header if the unseen bytes ended a line, else the end
        // of their last line. The holder decides.
        let mut s = HeaderScan::resumed();
        assert_eq!(
            s.feed(b"\r\nAccept: x\r\n\r\n", &LIMITS),
            Scan::Ambiguous(2)
        );
        s.continues();
        assert_eq!(s.feed(b"Accept: x\r\n\r\n", &LIMITS), Scan::Complete(13));
        // A bare LF (the unseen bytes ended with CR) too.
        assert_eq!(resumed_all(&[b"\nBODY"]), Scan::Ambiguous(1));
        // Split anywhere, the same.
        let mut s = HeaderScan::resumed();
        assert_eq!(s.feed(b"\r", &LIMITS), Scan::Partial);
        assert_eq!(s.feed(b"\nX", &LIMITS), Scan::Ambiguous(1));
        // Only the first line is ambiguous: after a seen line end, the empty line ends it.
        assert_eq!(resumed_all(&[b"e: 1\r\n", b"\r\nBODY"]), Scan::Complete(2));
    }

    proptest! {
        /// However the bytes are split, the verdict is the same as for one piece.
        #[test]
        fn splitting_never_changes_the_verdict(
            bytes in proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b' ')
            ], 0..1500),
            cuts in proptest::collection::vec(0usize..1500, 0..6),
        ) {
            let whole = scan_all(&[&bytes]);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= bytes.len()).collect();
            cuts.sort_unstable();
            let mut s = HeaderScan::default();
            let mut prev = 0;
            let mut got = Scan::Partial;
            for c in cuts.into_iter().chain([bytes.len()]) {
                match s.feed(&bytes[prev..c], &LIMITS) {
                    Scan::Partial => {}
                    Scan::Complete(n) => { got = Scan::Complete(prev + n); break; }
                    other => { got = other; break; }
                }
                prev = c;
            }
            prop_assert_eq!(got, whole);
        }
    }
}
