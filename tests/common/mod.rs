//! Shared integration-test harness: in-process origins ([`origin`]) and the real edgeslice
//! binary started on loopback ports ([`proxy`]), or on addresses the test chooses ([`node`]), and a
//! counting, delaying TCP relay ([`relay`]).
#![allow(dead_code)]

pub mod nginx;
pub mod node;
pub mod origin;
pub mod proxy;
pub mod raw;
pub mod relay;
pub mod reply;
pub mod tls;

/// A parsed response head's fields as (lower-case name, value) pairs, for raw-socket tests.
pub fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// The value of the field `name` as text, empty when absent or not visible ASCII.
pub fn header_text(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A reqwest client that never uses a system proxy and does not pool across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// Every file under `dir` (recursively) whose name passes `keep`.
fn files_under(dir: &std::path::Path, keep: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| keep(n.to_string_lossy().as_ref()))
            {
                out.push(p);
            }
        }
    }
    out
}

/// Entry files of a disk tier: not temporary files, not the directory's ownership marker.
pub fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    files_under(dir, |n| {
        // The marker, the generation and the index snapshot are not entries.
        !n.contains(".tmp") && !n.starts_with(edgeslice::cache::disk::MARKER)
    })
}

/// Temporary files a disk tier left behind.
pub fn temp_files(dir: &std::path::Path) -> usize {
    files_under(dir, |n| n.contains(".tmp.")).len()
}

/// The parts of a `multipart/byteranges` body: (Content-Range, data) each, data taken by the
/// length its Content-Range gives.
pub fn multipart_parts(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delim = format!("--{boundary}").into_bytes();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut pos = find(body, &delim, 0).expect("opening boundary") + delim.len();
    loop {
        if body[pos..].starts_with(b"--") {
            return parts;
        }
        let head_end = find(body, b"\r\n\r\n", pos).expect("part header end");
        let head = std::str::from_utf8(&body[pos..head_end]).expect("utf-8 part header");
        let range = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-range")
                    .then(|| v.trim().to_string())
            })
            .expect("part Content-Range");
        let (a, b) = range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
            .expect("a byte range");
        let data_at = head_end + 4;
        let data = body[data_at..data_at + (b - a + 1)].to_vec();
        pos = data_at + data.len();
        assert!(body[pos..].starts_with(b"\r\n"), "CRLF after part data");
        pos += 2;
        assert!(body[pos..].starts_with(&delim), "boundary after part");
        pos += delim.len();
        parts.push((range, data));
    }
}

/// Raise this test process's soft descriptor limit to its hard one (tests that hold thousands
/// of connections need more than a default soft limit of 1024); the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}
