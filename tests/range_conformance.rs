//! Randomized conformance of Range requests (RFC 9110 §14) answered through the proxy's chunk
//! cache, compared byte for byte against the origin's content, both cold (the object was never
//! requested) and warm (the identical request again, served from the cache).
//!
//! The expected answer is computed by an independent reference implementation of the proxy's
//! documented rules (see [`expected`]); the crate's own range code is not used.
//!
//! Reproducing a failure: cases are generated from a fixed seed, so case `i` is always the same.
//! `RANGE_CONFORMANCE_ONLY=17,42 cargo test --test range_conformance -- --nocapture` runs only
//! those cases (still cold then warm, on a fresh proxy); `RANGE_CONFORMANCE_CASES=n` changes the
//! number of generated cases.
//!
//! A second test checks that HEAD, with and without Range, answers the status and headers of
//! the matching GET, cold and warm, and sends no body.

mod common;

use common::origin::{content, etag, last_modified, Origin};
use common::proxy::Proxy;
use futures::stream::{self, StreamExt};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: u64 = 64 * 1024;
/// `cache.max_ranges` default.
const MAX_RANGES: usize = 16;
/// Default number of generated cases (each is requested twice: cold, then warm).
const CASES: usize = 1500;
/// Cases per batch: all of a batch's cold requests, then all of its warm ones.
const BATCH: usize = 100;
/// Requests in flight at once.
const CONCURRENCY: usize = 16;
/// Failures printed in full.
const MAX_PRINTED: usize = 40;

fn config(origin: &Origin) -> String {
    format!(
        "cache:\n  chunk_size: 64KiB\n  memory:\n    capacity: 256MiB\n  disk:\n    path: {{DIR}}/cache\n    capacity: 1GiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

// ---------------------------------------------------------------------------------------------
// Reference implementation of the proxy's documented Range rules
// ---------------------------------------------------------------------------------------------

/// What the proxy must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// 200 with the whole object.
    Whole,
    /// 416 with `Content-Range: bytes */<size>`.
    Unsatisfiable,
    /// 206 with these inclusive ranges, in request order (one: single part; several:
    /// multipart/byteranges).
    Partial(Vec<(u64, u64)>),
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    FromTo(u64, u64),
    From(u64),
    Suffix(u64),
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// `1*DIGIT` that fits in a u64 (`str::parse` alone would accept a leading `+`).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn spec(element: &str) -> Option<Spec> {
    let (first, last) = element.split_once('-')?;
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(Spec::Suffix(number(last)?)),
        (false, true) => Some(Spec::From(number(first)?)),
        (false, false) => {
            let (a, b) = (number(first)?, number(last)?);
            (a <= b).then_some(Spec::FromTo(a, b))
        }
    }
}

/// A syntactically valid `bytes=` range set, as written (empty list elements skipped); `None`
/// for no header, an unknown unit or invalid syntax.
fn byte_range_set(range: Option<&str>) -> Option<Vec<Spec>> {
    let value = range?.trim_matches(is_ows);
    let unit_ok = value
        .as_bytes()
        .get(..6)
        .is_some_and(|u| u.eq_ignore_ascii_case(b"bytes="));
    if !unit_ok {
        return None;
    }
    let mut specs = Vec::new();
    for element in value[6..].split(',') {
        let element = element.trim_matches(is_ows);
        if !element.is_empty() {
            specs.push(spec(element)?);
        }
    }
    (!specs.is_empty()).then_some(specs)
}

/// The proxy's rules: no Range, an unknown unit or a syntactically invalid `bytes=` value → 200
/// whole; more than `max_ranges` specs (as written; empty list elements are skipped) → 200
/// whole; no satisfiable spec → 416; resolved lengths summing to more than the size → 200 whole;
/// otherwise 206 with the satisfiable ranges in request order.
fn expected(range: Option<&str>, size: u64) -> Expected {
    let Some(specs) = byte_range_set(range) else {
        return Expected::Whole;
    };
    if specs.len() > MAX_RANGES {
        return Expected::Whole;
    }
    let last = size - 1; // sizes are >= 1
    let ranges: Vec<(u64, u64)> = specs
        .iter()
        .filter_map(|s| match *s {
            Spec::FromTo(a, b) => (a < size).then(|| (a, b.min(last))),
            Spec::From(a) => (a < size).then_some((a, last)),
            Spec::Suffix(n) => (n > 0).then(|| (size.saturating_sub(n), last)),
        })
        .collect();
    if ranges.is_empty() {
        return Expected::Unsatisfiable;
    }
    let total: u128 = ranges.iter().map(|&(a, b)| u128::from(b - a + 1)).sum();
    if total > u128::from(size) {
        return Expected::Whole;
    }
    Expected::Partial(ranges)
}

// ---------------------------------------------------------------------------------------------
// Case generation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    size: u64,
    range: Option<String>,
}

/// 1 byte to ~10 chunks, biased to exact chunk multiples ± 1.
fn size_strategy() -> BoxedStrategy<u64> {
    prop_oneof![
        4 => (1u64..=10, -1i64..=1).prop_map(|(k, d)| (k * CHUNK).saturating_add_signed(d)),
        3 => 1u64..=10 * CHUNK + 1,
        1 => 1u64..=300,
    ]
    .boxed()
}

/// A byte position: anywhere, near a chunk boundary, near the end (either side), or tiny.
fn position(size: u64) -> BoxedStrategy<u64> {
    prop_oneof![
        3 => 0..size,
        2 => (0..=size / CHUNK, -2i64..=2)
            .prop_map(|(k, d)| (k * CHUNK).saturating_add_signed(d)),
        1 => size.saturating_sub(3)..size + 3,
        1 => 0u64..4,
    ]
    .boxed()
}

/// A range length minus one (`b - a`).
fn span() -> BoxedStrategy<u64> {
    prop_oneof![
        3 => 0u64..4,
        3 => 0u64..2 * CHUNK,
        2 => (1u64..=4, -2i64..=1).prop_map(|(k, d)| (k * CHUNK).saturating_add_signed(d)),
        1 => 0u64..12 * CHUNK,
    ]
    .boxed()
}

/// One byte-range-spec, as text.
fn spec_strategy(size: u64) -> BoxedStrategy<String> {
    prop_oneof![
        // a-b, possibly past the end (over-long).
        5 => (position(size), span()).prop_map(|(a, n)| format!("{a}-{}", a + n)),
        // a-
        2 => position(size).prop_map(|a| format!("{a}-")),
        // -n: 0 (unsatisfiable), inside, exactly the size, longer than the object.
        2 => prop_oneof![
            1 => Just(0u64),
            5 => 1..=size,
            1 => Just(size),
            1 => size + 1..size + 2 * CHUNK,
        ]
        .prop_map(|n| format!("-{n}")),
        // Over-long with a huge end.
        1 => (position(size), prop_oneof![Just(u64::MAX), 1u64 << 40..1u64 << 50])
            .prop_map(|(a, b)| format!("{a}-{}", b.max(a))),
        // Unsatisfiable: starts at or past the end, sometimes chunks past it.
        1 => (size..size + 3 * CHUNK, 0u64..100).prop_map(|(a, n)| format!("{a}-{}", a + n)),
        1 => (size..size + 3 * CHUNK).prop_map(|a| format!("{a}-")),
    ]
    .boxed()
}

fn bytes_header(specs: Vec<String>) -> Option<String> {
    Some(format!("bytes={}", specs.join(",")))
}

/// A Range header (or none) for an object of `size` bytes.
fn header_strategy(size: u64) -> BoxedStrategy<Option<String>> {
    let invalid = prop_oneof![
        // a > b
        (1..size + 5, 1u64..100).prop_map(|(b, d)| format!("bytes={}-{b}", b + d)),
        // a valid spec followed by a bad one: the whole set is invalid.
        (spec_strategy(size), 1..size + 5, 1u64..100)
            .prop_map(|(s, b, d)| format!("bytes={s},{}-{b}", b + d)),
        Just("bytes=x-1".to_string()),
        Just("bytes=0-x".to_string()),
        Just("bytes=".to_string()),
        Just("bytes=-".to_string()),
        Just("bytes=,".to_string()),
        Just("bytes=1-2-3".to_string()),
        Just("bytes=0-1,x".to_string()),
        Just("bytes=1 -2".to_string()),
        Just("bytes=+1-2".to_string()),
        Just("bytes=--1".to_string()),
        Just("bytes=0x10-0x20".to_string()),
        Just("bytes=99999999999999999999-".to_string()),
        Just("bytes=0-99999999999999999999".to_string()),
    ];
    let unknown_unit = prop_oneof![
        Just("items=0-1".to_string()),
        Just("bits=0-7".to_string()),
        Just("byte=0-1".to_string()),
        Just("bytes 0-1".to_string()),
        Just("bytes:0-1".to_string()),
        Just("=0-1".to_string()),
        Just("none".to_string()),
        Just("bytes = 0-1".to_string()),
    ];
    // Spelling variants the proxy must accept: unit case, OWS, empty list elements.
    let variant = (
        vec(spec_strategy(size), 1..=4),
        prop_oneof![Just("bytes="), Just("BYTES="), Just("Bytes=")],
        prop_oneof![Just(","), Just(", "), Just(" ,\t"), Just(",,")],
        prop_oneof![Just(""), Just(" "), Just("\t ")],
    )
        .prop_map(|(specs, unit, sep, pad)| format!("{pad}{unit}{pad}{}{pad}", specs.join(sep)));
    // Many tiny ranges around max_ranges (16): one byte each, so the overlap rule rarely bites.
    let many = (14usize..=18).prop_flat_map(move |n| {
        vec(0..size, n).prop_map(|v| {
            let specs: Vec<String> = v.iter().map(|a| format!("{a}-{a}")).collect();
            format!("bytes={}", specs.join(","))
        })
    });
    // Heavy overlap: the same big range several times.
    let overlap = (position(size), 2usize..=4)
        .prop_map(|(a, k)| format!("bytes={}", vec![format!("{a}-"); k].join(",")));
    prop_oneof![
        1 => Just(None),
        10 => spec_strategy(size).prop_map(|s| bytes_header(vec![s])),
        8 => vec(spec_strategy(size), 2..=5).prop_map(bytes_header),
        1 => many.prop_map(Some),
        1 => overlap.prop_map(Some),
        1 => invalid.prop_map(Some),
        1 => unknown_unit.prop_map(Some),
        1 => variant.prop_map(Some),
    ]
    .boxed()
}

fn case_strategy() -> impl Strategy<Value = Case> {
    size_strategy()
        .prop_flat_map(|size| header_strategy(size).prop_map(move |range| Case { size, range }))
}

fn generate(n: usize) -> Vec<Case> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = case_strategy();
    (0..n)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("generate a case")
                .current()
        })
        .collect()
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Responses and checks
// ---------------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn get(client: &reqwest::Client, url: &str, range: Option<&str>) -> Result<Resp, String> {
    let mut req = client.get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("status {status}, body failed: {e}"))?
        .to_vec();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Where `got` first differs from `want` (or where the shorter one ends).
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    Some(
        got.iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len())),
    )
}

fn check_bytes(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    match first_difference(got, want) {
        None => Ok(()),
        Some(at) => Err(format!(
            "{what}: {} bytes, want {}; first differing byte at offset {at}",
            got.len(),
            want.len()
        )),
    }
}

/// `bytes a-b/size` → (a, b, size).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((number(a)?, number(b)?, number(size)?))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The boundary parameter of a `multipart/byteranges` Content-Type.
fn boundary_of(content_type: &str) -> Option<String> {
    let (media, params) = content_type.split_once(';')?;
    if !media.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Part {
    content_type: Option<String>,
    content_range: String,
    data: Vec<u8>,
}

/// A strict RFC 2046 multipart parser for byteranges: each part's length comes from its
/// Content-Range, so payload bytes cannot confuse it. A preamble and an epilogue are allowed.
fn parse_multipart(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut pos = if body.starts_with(delim) {
        0
    } else {
        let crlf_delim = [b"\r\n".as_slice(), delim].concat();
        find(body, &crlf_delim).ok_or("no opening boundary")? + 2
    };
    let mut parts = Vec::new();
    loop {
        pos += delim.len();
        let rest = body.get(pos..).ok_or("body ends in a boundary")?;
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then CRLF.
        while body.get(pos).is_some_and(|&b| b == b' ' || b == b'\t') {
            pos += 1;
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(format!("no CRLF after boundary at offset {pos}"));
        }
        pos += 2;
        let mut content_type = None;
        let mut content_range = None;
        loop {
            let end = find(&body[pos..], b"\r\n").ok_or("unterminated part header")?;
            let line = std::str::from_utf8(&body[pos..pos + end])
                .map_err(|_| "non-UTF-8 part header".to_string())?;
            pos += end + 2;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad part header line {line:?}"))?;
            if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.trim().to_string());
            } else if name.eq_ignore_ascii_case("content-range") {
                content_range = Some(value.trim().to_string());
            }
        }
        let content_range = content_range.ok_or("part without Content-Range")?;
        let (a, b, _) = parse_content_range(&content_range)
            .filter(|&(a, b, _)| a <= b)
            .ok_or_else(|| format!("bad part Content-Range {content_range:?}"))?;
        let len = usize::try_from(b - a + 1).map_err(|_| "huge part")?;
        let data = body
            .get(pos..pos + len)
            .ok_or_else(|| format!("part {content_range:?} is truncated"))?
            .to_vec();
        pos += len;
        let next = [b"\r\n".as_slice(), delim].concat();
        if !body[pos..].starts_with(&next) {
            return Err(format!(
                "part {content_range:?} is not followed by CRLF and the boundary"
            ));
        }
        pos += 2;
        parts.push(Part {
            content_type,
            content_range,
            data,
        });
    }
}

/// The parts of a response that must not change between a cold and a warm answer.
#[derive(Debug, PartialEq, Eq)]
struct Comparable {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Headers that legitimately differ between two answers.
const VOLATILE: &[&str] = &["date", "age", "cache-status", "x-request-id"];

fn comparable(resp: &Resp) -> Comparable {
    let boundary = resp.header("content-type").and_then(boundary_of);
    let mut headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .filter(|(n, _)| !VOLATILE.contains(&n.as_str()))
        .map(|(n, v)| {
            let v = String::from_utf8_lossy(v.as_bytes()).to_string();
            let v = match &boundary {
                Some(b) => v.replace(b.as_str(), "BOUNDARY"),
                None => v,
            };
            (n.as_str().to_string(), v)
        })
        .collect();
    headers.sort();
    let body = match &boundary {
        Some(b) if !b.is_empty() => {
            let mut out = Vec::with_capacity(resp.body.len());
            let mut rest = resp.body.as_slice();
            while let Some(i) = find(rest, b.as_bytes()) {
                out.extend_from_slice(&rest[..i]);
                out.extend_from_slice(b"BOUNDARY");
                rest = &rest[i + b.len()..];
            }
            out.extend_from_slice(rest);
            out
        }
        _ => resp.body.clone(),
    };
    Comparable {
        status: resp.status,
        headers,
        body,
    }
}

/// Check one answer against the reference.
fn check(path: &str, size: u64, want: &Expected, resp: &Resp) -> Result<(), String> {
    let content_length = resp
        .header("content-length")
        .ok_or("no Content-Length")?
        .parse::<u64>()
        .map_err(|_| "bad Content-Length")?;
    if content_length != resp.body.len() as u64 {
        return Err(format!(
            "Content-Length {content_length} but the body has {} bytes",
            resp.body.len()
        ));
    }
    let content_range = resp.header("content-range");
    let content_type = resp.header("content-type").unwrap_or("");
    if matches!(resp.status, 200 | 206) {
        if resp.header("etag") != Some(etag(path, 0).as_str()) {
            return Err(format!("ETag {:?}", resp.header("etag")));
        }
        if resp.header("last-modified") != Some(last_modified(0).as_str()) {
            return Err(format!("Last-Modified {:?}", resp.header("last-modified")));
        }
    }
    match want {
        Expected::Whole => {
            if resp.status != 200 {
                return Err(format!("status {}, want 200", resp.status));
            }
            if let Some(cr) = content_range {
                return Err(format!("200 with Content-Range {cr:?}"));
            }
            check_bytes("whole body", &resp.body, &content(path, 0, 0..size))
        }
        Expected::Unsatisfiable => {
            if resp.status != 416 {
                return Err(format!("status {}, want 416", resp.status));
            }
            let want_cr = format!("bytes */{size}");
            if content_range != Some(want_cr.as_str()) {
                return Err(format!(
                    "416 Content-Range {content_range:?}, want {want_cr:?}"
                ));
            }
            Ok(())
        }
        Expected::Partial(ranges) if ranges.len() == 1 => {
            let (a, b) = ranges[0];
            if resp.status != 206 {
                return Err(format!("status {}, want 206 for {a}-{b}", resp.status));
            }
            let want_cr = format!("bytes {a}-{b}/{size}");
            if content_range != Some(want_cr.as_str()) {
                return Err(format!("Content-Range {content_range:?}, want {want_cr:?}"));
            }
            if content_type != "application/octet-stream" {
                return Err(format!(
                    "single-part 206 with Content-Type {content_type:?}"
                ));
            }
            check_bytes(&want_cr, &resp.body, &content(path, 0, a..b + 1))
        }
        Expected::Partial(ranges) => {
            if resp.status != 206 {
                return Err(format!(
                    "status {}, want 206 multipart with {} parts",
                    resp.status,
                    ranges.len()
                ));
            }
            if let Some(cr) = content_range {
                return Err(format!(
                    "multipart 206 with a top-level Content-Range {cr:?}"
                ));
            }
            let boundary = boundary_of(content_type)
                .ok_or_else(|| format!("multipart 206 with Content-Type {content_type:?}"))?;
            let parts = parse_multipart(&resp.body, &boundary)?;
            if parts.len() != ranges.len() {
                let got: Vec<&str> = parts.iter().map(|p| p.content_range.as_str()).collect();
                return Err(format!(
                    "{} parts {got:?}, want {} {ranges:?}",
                    parts.len(),
                    ranges.len()
                ));
            }
            for (i, (part, &(a, b))) in parts.iter().zip(ranges).enumerate() {
                let want_cr = format!("bytes {a}-{b}/{size}");
                if part.content_range != want_cr {
                    return Err(format!(
                        "part {i}: Content-Range {:?}, want {want_cr:?}",
                        part.content_range
                    ));
                }
                if part.content_type.as_deref() != Some("application/octet-stream") {
                    return Err(format!("part {i}: Content-Type {:?}", part.content_type));
                }
                check_bytes(
                    &format!("part {i} ({want_cr})"),
                    &part.data,
                    &content(path, 0, a..b + 1),
                )?;
            }
            Ok(())
        }
    }
}

fn case_path(i: usize, size: u64) -> String {
    format!("/obj/{size}/case-{i}.bin")
}

fn describe(i: usize, case: &Case, status: Option<u16>) -> String {
    format!(
        "case {i}: size {} ({} chunks + {}), range {:?}, status {}",
        case.size,
        case.size / CHUNK,
        case.size % CHUNK,
        case.range,
        status.map_or("-".to_string(), |s| s.to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_match_origin_cold_and_warm() {
    let started = Instant::now();
    let n = env_usize("RANGE_CONFORMANCE_CASES").unwrap_or(CASES);
    let only: Option<Vec<usize>> = std::env::var("RANGE_CONFORMANCE_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let generate_n = only
        .as_ref()
        .and_then(|o| o.iter().max().map(|m| m + 1))
        .unwrap_or(n)
        .max(n);
    let all = generate(generate_n);
    let selected: Vec<usize> = match &only {
        Some(o) => o.clone(),
        None => (0..n).collect(),
    };
    // What the generator produced, by expected answer.
    let (mut no_range, mut too_many, mut overlap, mut unsat, mut single) = (0, 0, 0, 0, 0);
    let mut multipart = 0;
    let mut most_parts = 0;
    for &i in &selected {
        let c = &all[i];
        let specs = byte_range_set(c.range.as_deref());
        match expected(c.range.as_deref(), c.size) {
            Expected::Whole if specs.is_none() => no_range += 1,
            Expected::Whole if specs.is_some_and(|s| s.len() > MAX_RANGES) => too_many += 1,
            Expected::Whole => overlap += 1,
            Expected::Unsatisfiable => unsat += 1,
            Expected::Partial(r) if r.len() == 1 => single += 1,
            Expected::Partial(r) => {
                multipart += 1;
                most_parts = most_parts.max(r.len());
            }
        }
    }
    println!(
        "{} cases: 200 whole for {no_range} without a valid bytes range set, {too_many} with more \
         than {MAX_RANGES} specs, {overlap} overlapping beyond the size; {unsat} 416; {single} \
         single-range 206; {multipart} multipart 206 (up to {most_parts} parts)",
        selected.len()
    );

    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin));
    let client = common::client();
    let mut failures: Vec<String> = Vec::new();
    let mut warm_origin_requests = 0u64;
    let mut body_bytes = 0u64;
    let run_phase = |batch: &[usize]| {
        let client = client.clone();
        let requests: Vec<(usize, String, Option<String>)> = batch
            .iter()
            .map(|&i| {
                (
                    i,
                    proxy.url(&case_path(i, all[i].size)),
                    all[i].range.clone(),
                )
            })
            .collect();
        stream::iter(requests)
            .map(move |(i, url, range)| {
                let client = client.clone();
                async move { (i, get(&client, &url, range.as_deref()).await) }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
    };

    for batch in selected.chunks(BATCH) {
        // Cold: every object of the batch is requested for the first time.
        let cold = run_phase(batch).await;
        // Warm: the identical requests again; none may reach the origin.
        origin.reset_stats();
        let warm = run_phase(batch).await;
        if origin.requests() > 0 {
            warm_origin_requests += origin.requests();
            let mut paths: Vec<String> = origin
                .log()
                .iter()
                .map(|r| format!("{} range={:?}", r.path, r.header("range")))
                .collect();
            paths.sort();
            paths.dedup();
            for p in paths {
                let i = p
                    .strip_prefix("/obj/")
                    .and_then(|r| r.split_once("/case-"))
                    .and_then(|(_, r)| r.split_once('.'))
                    .and_then(|(i, _)| i.parse::<usize>().ok());
                let who = i.map_or(p.clone(), |i| describe(i, &all[i], None));
                failures.push(format!("{who}: the warm request reached the origin ({p})"));
            }
        }

        let mut cold: std::collections::HashMap<usize, Result<Resp, String>> =
            cold.into_iter().collect();
        for (i, warm) in warm {
            let case = &all[i];
            let path = case_path(i, case.size);
            let want = expected(case.range.as_deref(), case.size);
            let want_cold = want.clone();
            let cold = cold.remove(&i).expect("cold answer");
            let cold_status = cold.as_ref().ok().map(|r| r.status);
            let warm_status = warm.as_ref().ok().map(|r| r.status);
            let cold_ok = cold.and_then(|r| {
                body_bytes += r.body.len() as u64;
                check(&path, case.size, &want_cold, &r)?;
                let cs = r.header("cache-status").unwrap_or("");
                if !cs.starts_with("edgeslice; fwd=miss") {
                    return Err(format!("cold Cache-Status {cs:?}, want a miss"));
                }
                Ok(r)
            });
            let warm_ok = warm.and_then(|r| {
                body_bytes += r.body.len() as u64;
                check(&path, case.size, &want, &r)?;
                let cs = r.header("cache-status").unwrap_or("");
                if cs != "edgeslice; hit" {
                    return Err(format!("warm Cache-Status {cs:?}, want \"edgeslice; hit\""));
                }
                Ok(r)
            });
            match (cold_ok, warm_ok) {
                (Ok(c), Ok(w)) => {
                    let (c, w) = (comparable(&c), comparable(&w));
                    if c != w {
                        let diff = if c.status != w.status {
                            format!("status {} then {}", c.status, w.status)
                        } else if c.headers != w.headers {
                            let only_cold: Vec<_> = c
                                .headers
                                .iter()
                                .filter(|h| !w.headers.contains(h))
                                .collect();
                            let only_warm: Vec<_> = w
                                .headers
                                .iter()
                                .filter(|h| !c.headers.contains(h))
                                .collect();
                            format!("headers only cold {only_cold:?}, only warm {only_warm:?}")
                        } else {
                            format!(
                                "bodies differ at offset {:?}",
                                first_difference(&w.body, &c.body)
                            )
                        };
                        failures.push(format!(
                            "{}: cold and warm answers differ: {diff}",
                            describe(i, case, Some(c.status))
                        ));
                    }
                }
                (cold, warm) => {
                    if let Err(e) = cold {
                        failures.push(format!(
                            "{} COLD: {e} (expected {want_cold:?})",
                            describe(i, case, cold_status),
                        ));
                    }
                    if let Err(e) = warm {
                        failures.push(format!(
                            "{} WARM: {e} (expected {want:?})",
                            describe(i, case, warm_status)
                        ));
                    }
                }
            }
        }
    }

    println!(
        "{} cases x 2 requests, {:.1} MiB of bodies checked, {} warm requests reached the origin, {:.1} s",
        selected.len(),
        body_bytes as f64 / (1 << 20) as f64,
        warm_origin_requests,
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        for f in failures.iter().take(MAX_PRINTED) {
            println!("FAIL {f}");
        }
        if failures.len() > MAX_PRINTED {
            println!("... and {} more", failures.len() - MAX_PRINTED);
        }
        panic!(
            "{} range conformance failures (rerun one with RANGE_CONFORMANCE_ONLY=<case>)",
            failures.len()
        );
    }
}

/// On a cold object, a first range starting in a chunk past the end (the origin answers the
/// discovery fetch with 416) is still answered by the cache, and does not stop it caching the
/// object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_range_past_the_last_chunk_on_a_cold_object() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin));
    let client = common::client();
    let mut failures = Vec::new();
    let mut run = |what: &str, path: &str, size: u64, range: Option<&str>, r: &Resp| {
        let want = expected(range, size);
        if let Err(e) = check(path, size, &want, r) {
            failures.push(format!(
                "{what}: GET {path} Range {range:?}: {e} (expected {want:?}); Cache-Status {:?}",
                r.header("cache-status")
            ));
        }
    };

    // 1. Multi-range whose second spec is satisfiable: 206 with that one range is due.
    let size = 3 * CHUNK;
    let path = format!("/obj/{size}/multi.bin");
    let range = Some("bytes=225972-225984,2-");
    let r = get(&client, &proxy.url(&path), range).await.unwrap();
    run("multi-range, first unsatisfiable", &path, size, range, &r);

    // 2. Multi-range with no satisfiable spec: 416 is due.
    let size = 395_698;
    let path = format!("/obj/{size}/none.bin");
    let range = Some("bytes=570504-570590,547426-547524");
    let r = get(&client, &proxy.url(&path), range).await.unwrap();
    run("multi-range, all unsatisfiable", &path, size, range, &r);

    // 3. A single unsatisfiable range gets the right 416, but the object must stay cacheable:
    //    the same request again, then a whole GET twice, cost one origin request in all.
    let size = CHUNK;
    let path = format!("/obj/{size}/single.bin");
    let range = Some("bytes=143558-");
    let r = get(&client, &proxy.url(&path), range).await.unwrap();
    run("single unsatisfiable, cold", &path, size, range, &r);
    origin.reset_stats();
    let r = get(&client, &proxy.url(&path), range).await.unwrap();
    run("single unsatisfiable, again", &path, size, range, &r);
    let r = get(&client, &proxy.url(&path), None).await.unwrap();
    run("whole GET after it", &path, size, None, &r);
    let r = get(&client, &proxy.url(&path), None).await.unwrap();
    run("whole GET again", &path, size, None, &r);
    let cs = r.header("cache-status").unwrap_or("").to_string();
    if origin.requests() > 1 || cs != "edgeslice; hit" {
        failures.push(format!(
            "after Range {range:?} on the cold {size}-byte object {path}: the same Range again \
             and two whole GETs made {} origin requests (want at most 1); the last whole GET \
             has Cache-Status {cs:?} (want \"edgeslice; hit\")",
            origin.requests()
        ));
    }
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}

// ---------------------------------------------------------------------------------------------
// HEAD
// ---------------------------------------------------------------------------------------------

struct RawResp {
    status: u16,
    headers: Vec<(String, String)>,
    /// Everything after the head, read until the proxy closed the connection.
    rest: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection (`Connection: close`), read to EOF, so that any body
/// bytes sent after a HEAD response are seen.
async fn raw(proxy: &Proxy, method: &str, path: &str, range: Option<&str>) -> RawResp {
    let mut sock = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: edgeslice.test\r\nConnection: close\r\n");
    if let Some(r) = range {
        req.push_str(&format!("Range: {r}\r\n"));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut buf))
        .await
        .expect("response within 30 s")
        .expect("read");
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&buf).expect("parse response head") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("incomplete response head: {buf:?}"),
    };
    RawResp {
        status: parsed.code.expect("status"),
        headers: parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).to_string(),
                )
            })
            .collect(),
        rest: buf[head_len..].to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_matches_get_without_body() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(&origin));
    let sizes = [1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5];
    let mut failures = Vec::new();
    for size in sizes {
        let ranges = [
            None,
            Some("bytes=0-0".to_string()),
            Some("bytes=-10".to_string()),
            Some("bytes=5-".to_string()),
            Some(format!("bytes=0-{}", size + 100)),
            Some("bytes=0-0,-1".to_string()),
            Some(format!("bytes={size}-")),
            Some("bytes=0-,0-".to_string()),
            Some("items=0-1".to_string()),
            Some("bytes=5-2".to_string()),
        ];
        for (j, range) in ranges.iter().enumerate() {
            // Fresh object per request: HEAD cold, then GET, then HEAD warm.
            let path = format!("/obj/{size}/head-{j}.bin");
            let head_cold = raw(&proxy, "HEAD", &path, range.as_deref()).await;
            let get = raw(&proxy, "GET", &path, range.as_deref()).await;
            let head_warm = raw(&proxy, "HEAD", &path, range.as_deref()).await;
            let what = format!("size {size}, range {range:?}");
            // The GET itself is right (same rules as the randomized test).
            let resp = Resp {
                status: get.status,
                headers: get
                    .headers
                    .iter()
                    .filter_map(|(n, v)| {
                        Some((
                            reqwest::header::HeaderName::from_bytes(n.as_bytes()).ok()?,
                            reqwest::header::HeaderValue::from_str(v).ok()?,
                        ))
                    })
                    .collect(),
                body: get.rest.clone(),
            };
            if let Err(e) = check(&path, size, &expected(range.as_deref(), size), &resp) {
                failures.push(format!("{what}: GET: {e}"));
            }
            for (label, head) in [("cold HEAD", &head_cold), ("warm HEAD", &head_warm)] {
                if !head.rest.is_empty() {
                    failures.push(format!(
                        "{what}: {label} sent {} body bytes",
                        head.rest.len()
                    ));
                }
                if head.status != get.status {
                    failures.push(format!(
                        "{what}: {label} status {}, GET {}",
                        head.status, get.status
                    ));
                }
                for name in [
                    "content-length",
                    "content-range",
                    "etag",
                    "last-modified",
                    "accept-ranges",
                ] {
                    if head.header(name) != get.header(name) {
                        failures.push(format!(
                            "{what}: {label} {name} {:?}, GET {:?}",
                            head.header(name),
                            get.header(name)
                        ));
                    }
                }
                // The boundary is random per response; everything else must match.
                let media = |r: &RawResp| {
                    let ct = r.header("content-type").unwrap_or("").to_string();
                    match boundary_of(&ct) {
                        Some(b) => ct.replace(&b, "BOUNDARY"),
                        None => ct,
                    }
                };
                if media(head) != media(&get) {
                    failures.push(format!(
                        "{what}: {label} Content-Type {:?}, GET {:?}",
                        head.header("content-type"),
                        get.header("content-type")
                    ));
                }
            }
        }
    }
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} HEAD failures", failures.len());
}
