//! The disk tier under pressure, seen from outside: after more objects than the disk holds and a
//! restart, the most recently used objects are served whole from disk; a disk that fills up
//! (a small tmpfs under a large configured capacity) costs no wrong byte and few log lines.

mod common;

use common::origin::{content, Origin};
use common::proxy::Proxy;
use common::{cache_files, temp_files};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn config(origin: &Origin, memory: &str, disk_path: &str, disk_capacity: &str) -> String {
    format!(
        "cache:\n  chunk_size: 1MiB\n  memory:\n    capacity: {memory}\n  disk:\n    path: {disk_path}\n    capacity: {disk_capacity}\nupstreams:\n  origin:\n    servers: [\"{}\"]\n    connect_timeout: 500ms\n    read_timeout: 5s\nroutes:\n  - path_prefix: /\n    upstream: origin\n    cache: true\n",
        origin.addr()
    )
}

/// A whole GET: status and body.
async fn get(proxy: &Proxy, path: &str) -> (u16, Vec<u8>) {
    let resp = common::client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    (status, body)
}

/// Wait (disk writes are asynchronous) until the disk tier holds exactly `n` entry files.
fn wait_for_exactly(dir: &Path, n: usize, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cache_files(dir).len() == n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "after {after}: the disk tier holds {} entry files, expected {n}",
        cache_files(dir).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_disk_pressure_and_a_restart_the_most_recent_objects_are_served_from_disk() {
    let origin = Origin::start().await;
    // 16 MiB of disk holds three 4 MiB objects (4 chunks and a metadata entry each, a few
    // hundred bytes of headers over 12 MiB), never four.
    let mut proxy = Proxy::start(&config(&origin, "4MiB", "{DIR}/cache", "16MiB"));
    let dir = proxy.dir.join("cache");
    let size = 4 * MIB;
    let paths: Vec<String> = (0..8)
        .map(|i| format!("/obj/{size}/pressure-{i}.bin"))
        .collect();
    for (i, path) in paths.iter().enumerate() {
        let (status, body) = get(&proxy, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(body == content(path, 0, 0..size), "{path}: wrong bytes");
        // Whole objects only: never a chunk file without its object's metadata and siblings.
        wait_for_exactly(&dir, 5 * (i + 1).min(3), path);
    }
    proxy.restart(); // SIGKILL, then start over the same directory
    origin.reset_stats();
    for path in &paths[5..] {
        let (status, body) = get(&proxy, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(body == content(path, 0, 0..size), "{path}: wrong bytes");
    }
    assert_eq!(
        origin.requests(),
        0,
        "the three most recent objects come from disk: {:?}",
        origin.log()
    );
    // The older ones are gone (whole): asking for one costs the origin.
    let (status, body) = get(&proxy, &paths[4]).await;
    assert_eq!(status, 200);
    assert!(body == content(&paths[4], 0, 0..size));
    assert!(origin.requests() > 0);
}

/// A tmpfs mounted for the length of a test on a fresh directory; unmounted on drop, also when
/// the test fails (before its parent directory goes).
struct TmpfsMount {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl TmpfsMount {
    /// A tmpfs of `size` at a new directory `name`. Mounting needs root (CAP_SYS_ADMIN), which
    /// the suite has (`.ci/run` runs as root): without it the test fails rather than skips.
    fn mount(name: &str, size: &str) -> TmpfsMount {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join(name);
        std::fs::create_dir(&dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the disk tests need root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        TmpfsMount {
            dir,
            _parent: parent,
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process not yet gone): detach it now, it goes when released.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_costs_no_wrong_byte_and_few_log_lines() {
    let mount = TmpfsMount::mount("small-disk", "24m");
    let mnt = mount.dir.clone();
    let origin = Origin::start().await;
    let cache_dir = mnt.join("cache");
    // The configured capacity is far beyond what the file system holds.
    let proxy = Proxy::start(&config(
        &origin,
        "4MiB",
        &cache_dir.display().to_string(),
        "512MiB",
    ));
    // 64 MiB of distinct objects through a 24 MiB file system (one warning per failed write
    // would be some 40 lines).
    let size = 2 * MIB;
    for i in 0..32 {
        let path = format!("/obj/{size}/full-{i}.bin");
        let (status, body) = get(&proxy, &path).await;
        assert_eq!(status, 200, "{path}");
        assert!(body == content(&path, 0, 0..size), "{path}: wrong bytes");
    }
    // Let the writes in flight finish or fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = proxy.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        log.contains("writes paused"),
        "the disk did fill up and the tier noticed:\n{log}"
    );
    assert!(
        warnings.len() <= 20,
        "{} warning lines:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    // Room was reclaimed and no temp file is left behind.
    let stats = proxy.stats().await;
    assert!(
        stats["cache_disk_bytes"] < 24 * MIB,
        "the tier believes it holds {} bytes",
        stats["cache_disk_bytes"]
    );
    assert_eq!(temp_files(&cache_dir), 0);
    // Each failure is counted, even those whose warning was held back.
    assert!(
        stats["cache_disk_write_errors"] >= 1,
        "write errors counted: {stats:?}"
    );
    // What the tier kept is served exactly, from the cache.
    origin.reset_stats();
    for i in 0..32 {
        let path = format!("/obj/{size}/full-{i}.bin");
        let (status, body) = get(&proxy, &path).await;
        assert_eq!(status, 200, "{path}");
        assert!(body == content(&path, 0, 0..size), "{path}: wrong bytes");
    }
    eprintln!(
        "full disk: {} warning lines, {} bytes on disk, {} origin requests on the second pass\n{}",
        warnings.len(),
        stats["cache_disk_bytes"],
        origin.requests(),
        warnings.join("\n")
    );
}

/// Files the tier did not write, placed in the directory it owns (at the top level, in a
/// fan-out directory `ab/`, and in `ab/cd/` next to real entries, including names that look
/// like entries and temp files), survive two starts untouched, and the cache still works.
#[tokio::test]
async fn foreign_files_in_the_owned_directory_survive_two_starts_untouched() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(&config(&origin, "4MiB", "{DIR}/cache", "16MiB"));
    let path = "/obj/100000/foreign-test";
    let (status, body) = get(&proxy, path).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..100_000));
    let cache_dir = proxy.dir.join("cache");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Its metadata and its one chunk, both written (writes are asynchronous).
    while cache_files(&cache_dir).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let entry = cache_files(&cache_dir)
        .into_iter()
        .next()
        .expect("an entry on disk");
    let entry_dir = entry.parent().expect("entry dir").to_path_buf();
    let hex = "ab".repeat(32);
    let foreign: Vec<(PathBuf, &[u8])> = vec![
        (cache_dir.join("notes.txt"), b"top level"),
        (cache_dir.join("ab").join("notes"), b"in ab/"),
        (cache_dir.join("ab").join("cd").join("notes"), b"in ab/cd/"),
        (
            cache_dir.join("ab").join("cd").join(&hex),
            b"named like an entry",
        ),
        (
            entry_dir.join(format!("{hex}.tmp.0123")),
            b"named like a temp file",
        ),
        (
            entry_dir.join("beside-a-real-entry"),
            b"beside a real entry",
        ),
    ];
    for (p, data) in &foreign {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    for start in 0..2 {
        proxy.restart();
        for (p, data) in &foreign {
            assert_eq!(
                std::fs::read(p).ok().as_deref(),
                Some(*data),
                "start {start}: {} was touched",
                p.display()
            );
        }
        origin.reset_stats();
        let (status, body) = get(&proxy, path).await;
        assert_eq!(status, 200);
        assert!(body == content(path, 0, 0..100_000));
        assert_eq!(
            origin.requests(),
            0,
            "start {start}: still served from disk"
        );
    }
}

/// `mount -o remount,<opts>` of a mount point; whether it worked.
fn remount(dir: &Path, opts: &str) -> bool {
    Command::new("mount")
        .args(["-o", &format!("remount,{opts}")])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// Bytes of the entry files under `dir`.
fn file_bytes(dir: &Path) -> u64 {
    cache_files(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Issue 21, point 9: a cache directory remounted read-only evicts nothing (every write fails
/// with EROFS, and nothing could be deleted anyway): what it holds keeps being served from disk
/// with no origin request, and the tier's size stays what the files are. Remounted read-write,
/// the tier probes, resumes writing, and tracks its new files without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_cache_directory_keeps_its_index_and_resumes_when_writable() {
    let mount = TmpfsMount::mount("ro-disk", "64m");
    let mnt = mount.dir.clone();
    /// Remounts read-write on drop, so the tmpfs can be unmounted whatever happens.
    struct Writable<'a>(&'a Path);
    impl Drop for Writable<'_> {
        fn drop(&mut self) {
            remount(self.0, "rw");
        }
    }
    let _rw = Writable(&mnt);
    let origin = Origin::start().await;
    let cache_dir = mnt.join("cache");
    // The memory tier holds two of the 2 MiB objects: the others are hits only from disk.
    let proxy = Proxy::start(&config(
        &origin,
        "4MiB",
        &cache_dir.display().to_string(),
        "48MiB",
    ));
    let size = 2 * MIB;
    let path_of = |name: &str, i: usize| format!("/obj/{size}/{name}-{i}.bin");
    let check = |path: &str, (status, body): (u16, Vec<u8>)| {
        assert_eq!(status, 200, "{path}");
        assert!(body == content(path, 0, 0..size), "{path}: wrong bytes");
    };
    for i in 0..8 {
        let path = path_of("kept", i);
        check(&path, get(&proxy, &path).await);
    }
    wait_for_exactly(&cache_dir, 8 * 3, "filling");
    let before = proxy.stats().await["cache_disk_bytes"];
    assert_eq!(before, file_bytes(&cache_dir));

    assert!(remount(&mnt, "ro"), "remount read-only");
    // New objects: every write fails (read-only file system); the bytes are right all the same.
    for i in 0..6 {
        let path = path_of("new", i);
        check(&path, get(&proxy, &path).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = proxy.stats().await;
    assert!(during["cache_disk_write_errors"] >= 1, "{during:?}");
    // Nothing evicted: the index is what it was, and is what the files are.
    assert_eq!(during["cache_disk_bytes"], before, "{during:?}");
    assert_eq!(file_bytes(&cache_dir), before);
    // Every kept object is still a hit, from disk: no origin request.
    origin.reset_stats();
    for round in 0..2 {
        for i in 0..8 {
            let path = path_of("kept", i);
            check(&path, get(&proxy, &path).await);
        }
        assert_eq!(origin.requests(), 0, "round {round}: {:?}", origin.log());
    }
    assert_eq!(proxy.stats().await["cache_disk_bytes"], before);

    // Writable again: after the pause (10 s) a probe succeeds and writes resume.
    assert!(remount(&mnt, "rw"), "remount read-write");
    tokio::time::sleep(edgeslice::cache::disk::WRITE_ERROR_PAUSE + Duration::from_millis(500))
        .await;
    for i in 0..4 {
        let path = path_of("later", i);
        check(&path, get(&proxy, &path).await);
    }
    // The four new objects (3 entries each) are written and tracked, without a restart: the
    // tier's size is what the files are.
    let deadline = Instant::now() + Duration::from_secs(10);
    // The count and the bytes come from one listing: listed apart, a background write landing
    // between the two (the last chunk is written after its response ends) made a stale sum
    // look complete.
    let listing = |dir: &Path| {
        let files = cache_files(dir);
        let bytes: u64 = files
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        (files.len(), bytes)
    };
    let mut after = 0;
    let mut on_disk = (0, 0);
    while Instant::now() < deadline {
        after = proxy.stats().await["cache_disk_bytes"];
        on_disk = listing(&cache_dir);
        if after > before && on_disk == (8 * 3 + 4 * 3, after) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(after > before, "nothing written after the remount: {after}");
    assert_eq!(
        on_disk,
        (8 * 3 + 4 * 3, after),
        "every new entry written, and index and files agree:\n{}",
        proxy.log()
    );
    // Settled: nothing more is written, and the two still agree.
    assert_eq!(
        proxy.stats().await["cache_disk_bytes"],
        file_bytes(&cache_dir)
    );
    assert!(
        proxy.log_contains("writable again"),
        "the tier said it resumed:\n{}",
        proxy.log()
    );
    // The kept objects were never lost.
    origin.reset_stats();
    for i in 0..8 {
        let path = path_of("kept", i);
        check(&path, get(&proxy, &path).await);
    }
    assert_eq!(origin.requests(), 0, "{:?}", origin.log());
    eprintln!(
        "read-only disk: {} bytes indexed before, during and after; {} after the remount rw; {} write errors",
        before,
        after,
        during["cache_disk_write_errors"]
    );
}
