//! Shared integration-test harness: in-process origins ([`origin`]) and the real edgeslice
//! binary started on loopback ports ([`proxy`]).
#![allow(dead_code)]

pub mod nginx;
pub mod origin;
pub mod proxy;
pub mod raw;
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
        !n.contains(".tmp") && n != edgeslice::cache::disk::MARKER
    })
}

/// Temporary files a disk tier left behind.
pub fn temp_files(dir: &std::path::Path) -> usize {
    files_under(dir, |n| n.contains(".tmp.")).len()
}
