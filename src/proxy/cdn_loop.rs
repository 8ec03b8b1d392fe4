//! `CDN-Loop` (RFC 8586): each CDN a request passes through adds its id to the list, and one
//! that finds its own id in what it received knows the request is coming round again.
//!
//! edgeslice refuses a request whose list holds its own id (`cluster.cdn_id`) **twice or
//! more** with `508 Loop Detected`: once is the normal edge → shield path, even when both
//! tiers keep the default id. Every request edgeslice sends upstream (fills, revalidations,
//! resumes, pass-through) carries the list it received with its id appended once
//! ([`outgoing`]); the peer hop of a cluster will forward the list unchanged (`add_ours:
//! false`), since the cluster's id is in it already.
//!
//! `CDN-Loop` is hop metadata: never in the cache key, never stored with a response. Parsing
//! never panics and reads each field line once; the whole header is already bounded by
//! `server.max_header_size`.

use http::header::{HeaderMap, HeaderValue};

pub const CDN_LOOP: &str = "cdn-loop";

/// One element of a `CDN-Loop` list: its `cdn-id`, and the whole element as received (id and
/// parameters, without surrounding whitespace and commas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element<'a> {
    pub id: &'a [u8],
    pub text: &'a [u8],
    /// Its last quoted string is closed. An element that is not would swallow everything
    /// after it once lines are joined (the id we append included): it is never forwarded.
    pub complete: bool,
}

/// The elements of one `CDN-Loop` field line (`cdn-id *( OWS ";" OWS parameter )`, separated
/// by commas); a quoted-string parameter may hold commas and semicolons. Empty elements (`a, ,
/// b`) and elements with no id are skipped, as RFC 9110 §5.6.1 asks of a recipient. A
/// malformed line yields what could be read of it.
pub fn elements(line: &[u8]) -> impl Iterator<Item = Element<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || loop {
        // Skip separators and whitespace before an element.
        while at < line.len() && matches!(line[at], b',' | b' ' | b'\t') {
            at += 1;
        }
        if at >= line.len() {
            return None;
        }
        let start = at;
        while at < line.len() && !matches!(line[at], b',' | b';' | b' ' | b'\t') {
            at += 1;
        }
        let id = &line[start..at];
        // The rest of the element: parameters, up to a comma outside a quoted string.
        let mut quoted = false;
        while at < line.len() {
            match line[at] {
                b'"' => quoted = !quoted,
                b'\\' if quoted => at += 1,
                b',' if !quoted => break,
                _ => {}
            }
            at += 1;
        }
        let end = at.min(line.len());
        if !id.is_empty() {
            return Some(Element {
                id,
                text: line[start..end].trim_ascii_end(),
                complete: !quoted,
            });
        }
    })
}

/// The `cdn-id` of each element of one field line (see [`elements`]).
pub fn ids(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    elements(line).map(|e| e.id)
}

/// How many elements of every `CDN-Loop` field line in `headers` carry `id` (compared without
/// regard to ASCII case, as hosts are), counting no further than `stop_at`.
pub fn count(headers: &HeaderMap, id: &str, stop_at: usize) -> usize {
    let mut n = 0;
    for line in headers.get_all(CDN_LOOP) {
        for seen in ids(line.as_bytes()) {
            if seen.eq_ignore_ascii_case(id.as_bytes()) {
                n += 1;
                if n >= stop_at {
                    return n;
                }
            }
        }
    }
    n
}

/// Whether a request with `headers` has already passed through a tier with `id` twice: it is
/// in a loop and gets 508.
pub fn is_loop(headers: &HeaderMap, id: &str) -> bool {
    count(headers, id, 2) >= 2
}

/// [`is_loop`] for a request a peer of the cluster sent: it carries the cluster's id once more
/// than the client's request it serves (the asking node added it), so it is a loop from three
/// times on. A client that writes the id into its own list once (as a request that really
/// passed the tier once does) thus gets the same answer from the owner as from the node it
/// asked, instead of a 508 on the peer hop that would send every shard to its origin.
pub fn is_loop_from_peer(headers: &HeaderMap, id: &str) -> bool {
    count(headers, id, 3) >= 3
}

/// The `CDN-Loop` a request sends upstream: the field lines received (`incoming`), combined as
/// one list in order, then `id` when `add_ours` (every hop out of this tier: to an origin or a
/// parent). A peer hop inside one cluster passes `false`: the list already holds the
/// cluster's id once. `None` when there is nothing to send.
pub fn outgoing(incoming: &HeaderMap, id: &str, add_ours: bool) -> Option<HeaderValue> {
    let mut list: Vec<u8> = Vec::new();
    let mut push = |text: &[u8]| {
        if !list.is_empty() {
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(text);
    };
    for line in incoming.get_all(CDN_LOOP) {
        // Element by element, so that an unclosed quote in one cannot hide what follows it.
        for e in elements(line.as_bytes()).filter(|e| e.complete) {
            push(e.text);
        }
    }
    if add_ours {
        push(id.as_bytes());
    }
    if list.is_empty() {
        return None;
    }
    // Pieces of received field values and a token, joined by ", ": a valid field value.
    HeaderValue::from_bytes(&list).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(CDN_LOOP, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    fn list(line: &str) -> Vec<&str> {
        ids(line.as_bytes())
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect()
    }

    #[test]
    fn elements_are_ids_with_parameters_skipped() {
        assert_eq!(
            list("foo123.foocdn.example, barcdn; host=\"foo.bar.example\""),
            ["foo123.foocdn.example", "barcdn"]
        );
        assert_eq!(list("AnotherCDN; abc=123; def=\"456\""), ["AnotherCDN"]);
        assert_eq!(list(" ,, a ,b;x=1,,\tc\t, "), ["a", "b", "c"]);
        assert_eq!(
            list("[2001:db8::1]:8080, edge:443"),
            ["[2001:db8::1]:8080", "edge:443"]
        );
        // A comma inside a quoted parameter does not start an element.
        assert_eq!(list("a; p=\"edgeslice, edgeslice\", b"), ["a", "b"]);
        assert_eq!(list("a; p=\"x\\\", edgeslice\", b"), ["a", "b"]);
        assert!(list("").is_empty());
        assert!(list(" , ;x=1").is_empty());
    }

    #[test]
    fn a_peers_request_is_a_loop_from_three_times_on() {
        // The asking node added the cluster's id to its client's list.
        assert!(!is_loop_from_peer(&headers(&["edge"]), "edge"));
        assert!(!is_loop_from_peer(&headers(&["edge, edge"]), "edge"));
        assert!(is_loop_from_peer(&headers(&["edge, Edge", "EDGE"]), "edge"));
        assert!(!is_loop_from_peer(
            &headers(&["shield, edge, shield"]),
            "edge"
        ));
    }

    #[test]
    fn our_id_twice_is_a_loop_once_is_not() {
        let id = "edgeslice";
        assert!(!is_loop(&HeaderMap::new(), id));
        assert!(!is_loop(&headers(&["edgeslice"]), id));
        assert!(!is_loop(&headers(&["other, edgeslice; x=1, other"]), id));
        assert!(is_loop(&headers(&["edgeslice, EdgeSlice"]), id));
        // Across field lines too.
        assert!(is_loop(&headers(&["a, edgeslice", "b, edgeslice"]), id));
        // Another id with ours as a prefix, or inside a parameter, is not ours.
        assert!(!is_loop(
            &headers(&["edgeslice2, edgeslice.x, edgeslice"]),
            id
        ));
        assert!(!is_loop(&headers(&["a; via=\"edgeslice, edgeslice\""]), id));
        assert_eq!(count(&headers(&["e, e, e, e"]), "e", 2), 2);
        assert_eq!(count(&headers(&["e, e, e, e"]), "e", usize::MAX), 4);
    }

    #[test]
    fn outgoing_appends_our_id_once_to_the_combined_list() {
        let out = |lines: &[&str], add| {
            outgoing(&headers(lines), "edge", add).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(out(&[], true).as_deref(), Some("edge"));
        assert_eq!(out(&[], false), None);
        assert_eq!(out(&["a"], true).as_deref(), Some("a, edge"));
        assert_eq!(
            out(&["a, b;x=\"1,2\"", " ,c, "], true).as_deref(),
            Some("a, b;x=\"1,2\", c, edge")
        );
        assert_eq!(out(&["a", ""], false).as_deref(), Some("a"));
        assert_eq!(out(&[" , "], false), None);
        // An unclosed quote would hide our id from the next tier: that element is dropped.
        assert_eq!(
            out(&["a; x=\"open, edgeslice", "b"], true).as_deref(),
            Some("b, edge")
        );
        assert_eq!(out(&[";x=1, ,"], true).as_deref(), Some("edge"));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(
            lines in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![
                        Just(b','), Just(b';'), Just(b'"'), Just(b'\\'), Just(b' '),
                        Just(b'\t'), Just(b'='), Just(b'e'), Just(b'E'), 0x21u8..0x7f, 0x80u8..=0xff
                    ],
                    0..64,
                ),
                0..4,
            ),
            add in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for l in &lines {
                if let Ok(v) = HeaderValue::from_bytes(l) {
                    h.append(CDN_LOOP, v);
                }
            }
            let n = count(&h, "e", usize::MAX);
            prop_assert_eq!(is_loop(&h, "e"), n >= 2);
            // What we send parses to what we received (its complete elements), plus ours.
            let n = h
                .get_all(CDN_LOOP)
                .iter()
                .flat_map(|l| elements(l.as_bytes()))
                .filter(|e| e.complete && e.id.eq_ignore_ascii_case(b"e"))
                .count();
            let sent = outgoing(&h, "e", add);
            let after = sent.map_or(0, |v| {
                let mut m = HeaderMap::new();
                m.insert(CDN_LOOP, v);
                count(&m, "e", usize::MAX)
            });
            prop_assert_eq!(after, n + usize::from(add));
        }
    }
}
