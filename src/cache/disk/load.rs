//! Loading the index at start-up, in the background, and the snapshot a clean shutdown
//! leaves for the next start.
//!
//! # Serving while it loads
//!
//! [`start`] returns at once; a thread of its own loads the index while the store serves.
//! Until it is done ([`LoadState::is_loading`]):
//!
//! * a `get` of a key the index does not hold yet reads the key's file if there is one (the
//!   header's key and validator are checked as always) and indexes it;
//! * a `put` indexes its entry as always, and the load never replaces an indexed key (what is
//!   indexed since start is newer than what the load finds);
//! * a `remove` deletes the key's file even when it is not indexed yet, and `remove_object`
//!   deletes the object's metadata entry by name (chunks without it are never served, and are
//!   deleted as orphans at the end of the load);
//! * eviction works on what is indexed so far: the loaded objects go to the least recently
//!   used end, before every object used since start.
//!
//! # The snapshot (a clean shutdown) and the scan (anything else)
//!
//! A clean shutdown writes the index, objects in recency order, to `EDGESLICE-CACHE.index`
//! ([`save_snapshot`]): 12 bytes per object and 16 per entry, with a CRC-32 of the whole. A
//! start reads it, deletes it (a crash later must not find a list of files that has gone
//! stale), and indexes what it lists: a few hundred milliseconds for millions of entries. A
//! snapshot is trusted only if it carries the *generation* the directory had when this start
//! found it (`EDGESLICE-CACHE.generation`, counted up by every start): one left by an older
//! process that ran beside a newer one (a graceful upgrade) is stale and ignored.
//!
//! Without a valid snapshot (after a crash, a kill, a power loss) the load scans the files:
//! it reads each entry file's header (never its data), deletes temp files left by writes cut
//! short and files that fail their checks, and indexes the rest, one leaf directory at a time
//! (the index lock is taken once per directory). At the end the loaded objects are put in the
//! order of their newest file's modification time, objects with chunks but no metadata
//! (orphans) are deleted, and the tier is trimmed to its capacities.

use super::index::{stamp_of, VALIDATOR_MASK};
use super::{
    entry_path, hash64, hash_object, hash_validator, is_fanout_name, object_bytes,
    parse_entry_name, read_dir_logged, read_header_from, remove_file_logged, role_of, Cursor,
    Index, KeyHash, Recency, Role, Shared, MAGIC, TMP_MARKER,
};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime};

/// The snapshot file, beside the marker.
pub const SNAPSHOT: &str = "EDGESLICE-CACHE.index";
/// The generation file.
pub const GENERATION: &str = "EDGESLICE-CACHE.generation";
/// The first bytes of a snapshot.
const SNAPSHOT_MAGIC: [u8; 8] = *b"EDGSIDX1";
/// Entries indexed per lock of the index when loading a snapshot.
const BATCH: usize = 4096;

/// The progress of the start-up load.
#[derive(Debug)]
pub(super) struct LoadState {
    loading: AtomicBool,
    from_snapshot: AtomicBool,
    entries: AtomicU64,
    done: Mutex<bool>,
    signal: Condvar,
    /// The generation this start found: a snapshot must carry it to be trusted.
    found_generation: u64,
    /// This process's generation, written in its snapshot; `None` when the generation file
    /// could not be written (then no snapshot is written either).
    pub(super) generation: Option<u64>,
}

impl LoadState {
    pub fn new((found_generation, generation): (u64, Option<u64>)) -> LoadState {
        LoadState {
            loading: AtomicBool::new(true),
            from_snapshot: AtomicBool::new(false),
            entries: AtomicU64::new(0),
            done: Mutex::new(false),
            signal: Condvar::new(),
            found_generation,
            generation,
        }
    }

    pub fn is_loading(&self) -> bool {
        self.loading.load(Ordering::Acquire)
    }

    /// Whether the load read a snapshot (rather than scanning the files).
    pub fn read_a_snapshot(&self) -> bool {
        self.from_snapshot.load(Ordering::Relaxed)
    }

    /// Entries the load has indexed so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.signal.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self) {
        self.loading.store(false, Ordering::Release);
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.signal.notify_all();
    }
}

/// Read the directory's generation and write the next one: (found, this start's, if written).
pub(super) fn next_generation(dir: &Path) -> (u64, Option<u64>) {
    let path = dir.join(GENERATION);
    let found = fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let next = found.wrapping_add(1);
    let tmp = dir.join(format!(
        "{GENERATION}{TMP_MARKER}{:016x}",
        rand::random::<u64>()
    ));
    let written = fs::write(&tmp, format!("{next}\n")).and_then(|()| fs::rename(&tmp, &path));
    match written {
        Ok(()) => (found, Some(next)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            log::warn!(
                "disk cache {}: cannot write {GENERATION}: {e}; no index snapshot at shutdown",
                dir.display()
            );
            (found, None)
        }
    }
}

/// Start the load on a thread of its own.
pub(super) fn start(shared: &Arc<Shared>) -> io::Result<()> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("disk-index-load".into())
        .spawn(move || run(&shared))
        .map(|_| ())
}

fn run(shared: &Shared) {
    #[cfg(test)]
    shared.faults.load_gate.wait();
    let started = Instant::now();
    let (how, by_time) = match load_snapshot(shared) {
        Some(()) => {
            shared.load.from_snapshot.store(true, Ordering::Relaxed);
            ("its snapshot", false)
        }
        None => {
            scan(shared);
            ("a scan of the files", true)
        }
    };
    let orphans = shared.index().finish_load(by_time);
    let orphan_files = orphans.len();
    shared.delete_members(orphans);
    shared.evict();
    shared.load.finish();
    let index = shared.index();
    log::info!(
        "disk cache {}: index loaded from {how} in {:.2} s: {} objects, {} entries, {} of {} bytes, index {} bytes in memory; deleted {orphan_files} orphaned chunk files",
        shared.dir.display(),
        started.elapsed().as_secs_f64(),
        index.object_count(),
        index.entry_count(),
        index.used,
        shared.capacity,
        index.resident_bytes(),
    );
}

// ---- the snapshot -----------------------------------------------------------------------

/// Write the snapshot (see the module docs). Refused while the index loads.
pub(super) fn save_snapshot(shared: &Shared) -> io::Result<()> {
    if shared.load.is_loading() {
        return Err(io::Error::other("the index is still loading"));
    }
    let Some(generation) = shared.load.generation else {
        return Err(io::Error::other("no generation for this start"));
    };
    let started = Instant::now();
    let path = shared.dir.join(SNAPSHOT);
    let tmp = shared.dir.join(format!(
        "{SNAPSHOT}{TMP_MARKER}{:016x}",
        rand::random::<u64>()
    ));
    // Another process opened the directory since (a graceful upgrade): its generation is
    // newer, this snapshot would never be trusted.
    let current = fs::read_to_string(shared.dir.join(GENERATION))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    if current != Some(generation) {
        return Err(io::Error::other(
            "another process has opened the directory since this one",
        ));
    }
    let mut index = shared.index();
    if index.reserved_entries > 0 {
        return Err(io::Error::other(format!(
            "{} writes still in progress",
            index.reserved_entries
        )));
    }
    // From here no put starts: the snapshot stays what the files are.
    index.sealed = true;
    let written =
        write_snapshot(&index, generation, &tmp).and_then(|n| fs::rename(&tmp, &path).map(|()| n));
    drop(index);
    match written {
        Ok((entries, bytes)) => {
            log::info!(
                "disk cache {}: index snapshot written: {entries} entries, {bytes} bytes in {:.2} s",
                shared.dir.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A writer that keeps the CRC-32 of what passes through it.
struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Returns the entries and bytes written.
pub(super) fn write_snapshot(
    index: &Index,
    generation: u64,
    path: &Path,
) -> io::Result<(u64, u64)> {
    let file = File::create(path)?;
    let mut out = Crc {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        bytes: 0,
    };
    out.write_all(&SNAPSHOT_MAGIC)?;
    out.write_all(&generation.to_le_bytes())?;
    out.write_all(&(index.object_count() as u64).to_le_bytes())?;
    out.write_all(&(index.entry_count() as u64).to_le_bytes())?;
    let mut result = Ok(());
    let mut entries = 0u64;
    index.for_each_object(|object, members| {
        if result.is_err() {
            return;
        }
        let members: Vec<_> = members.collect();
        let mut record = Vec::with_capacity(12 + 16 * members.len());
        record.extend_from_slice(&object.to_le_bytes());
        record.extend_from_slice(&(members.len() as u32).to_le_bytes());
        for (key, size, validator, role) in &members {
            record.extend_from_slice(&key.to_le_bytes());
            record.extend_from_slice(&size.to_le_bytes());
            record.extend_from_slice(&(role.bits() << 30 | validator).to_le_bytes());
        }
        entries += members.len() as u64;
        result = out.write_all(&record);
    });
    result?;
    let crc = out.crc.clone().finalize();
    let mut inner = out.inner;
    inner.write_all(&crc.to_le_bytes())?;
    inner.flush()?;
    Ok((entries, out.bytes + 4))
}

/// An object of a snapshot: its key and its members (key, size, role and validator).
type SnapshotObject = (u64, Vec<(KeyHash, u32, u32)>);

/// Parse a snapshot: the objects, least recently used first. `None` if it is not one, of
/// another generation, or fails its checksum.
fn parse_snapshot(buf: &[u8], generation: u64) -> Result<Vec<SnapshotObject>, &'static str> {
    let body_len = buf.len().checked_sub(4).ok_or("truncated")?;
    let (body, crc) = buf.split_at(body_len);
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| "truncated")?);
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    let mut c = Cursor { buf: body, pos: 0 };
    let bad = |_| "truncated";
    if c.array::<8>().map_err(bad)? != SNAPSHOT_MAGIC {
        return Err("bad magic");
    }
    if c.u64().map_err(bad)? != generation {
        return Err("of another generation (a process ran since it was written)");
    }
    let objects = c.u64().map_err(bad)?;
    let entries = c.u64().map_err(bad)?;
    // Each object takes at least 28 bytes: the counts cannot ask for more than the file holds.
    if objects > body.len() as u64 / 28 || entries > body.len() as u64 / 16 {
        return Err("counts larger than the file");
    }
    let mut out = Vec::with_capacity(objects as usize);
    let mut seen = 0u64;
    for _ in 0..objects {
        let key = c.u64().map_err(bad)?;
        let n = c.u32().map_err(bad)?;
        if u64::from(n) > entries - seen {
            return Err("more members than entries");
        }
        let mut members = Vec::with_capacity(n as usize);
        for _ in 0..n {
            members.push((
                c.u64().map_err(bad)?,
                c.u32().map_err(bad)?,
                c.u32().map_err(bad)?,
            ));
        }
        seen += u64::from(n);
        out.push((key, members));
    }
    if seen != entries || c.pos != body.len() {
        return Err("counts do not match the contents");
    }
    Ok(out)
}

/// Index the snapshot if there is a valid one; it is deleted either way.
fn load_snapshot(shared: &Shared) -> Option<()> {
    let path = shared.dir.join(SNAPSHOT);
    // A snapshot takes less than the index it lists (16 bytes per entry and 12 per object,
    // against 36 and 36 charged): anything larger is not one of ours, and is not read whole.
    let limit = shared.index_capacity.saturating_add(1 << 20);
    if let Ok(m) = fs::metadata(&path) {
        if m.len() > limit {
            log::warn!(
                "disk cache: ignoring {}: {} bytes, more than an index of cache.disk.index_capacity could take; scanning the files",
                path.display(),
                m.len()
            );
            let _ = fs::remove_file(&path);
            return None;
        }
    }
    let buf = match fs::read(&path) {
        Ok(buf) => buf,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::info!(
                "disk cache {}: no index snapshot (a first start, or the last run did not shut down cleanly): scanning the files",
                shared.dir.display()
            );
            return None;
        }
        Err(e) => {
            log::warn!(
                "disk cache: cannot read {}: {e}; scanning the files",
                path.display()
            );
            return None;
        }
    };
    // Whatever it holds, it must not be trusted again: a crash later leaves it stale.
    if let Err(e) = fs::remove_file(&path) {
        log::warn!(
            "disk cache: cannot delete {}: {e}; not trusting it, scanning the files",
            path.display()
        );
        return None;
    }
    let objects = match parse_snapshot(&buf, shared.load.found_generation) {
        Ok(objects) => objects,
        Err(why) => {
            log::warn!(
                "disk cache: ignoring the index snapshot {}: {why}; scanning the files",
                path.display()
            );
            return None;
        }
    };
    drop(buf);
    // Newest first, each to the least recently used end: the oldest ends there.
    let mut batch = 0;
    let mut index = shared.index();
    for (object, members) in objects.iter().rev() {
        for &(key, size, role_validator) in members {
            let role = Role::from_bits(role_validator >> 30);
            let validator = u64::from(role_validator & VALIDATOR_MASK);
            if index.insert(
                key,
                *object,
                u64::from(size),
                validator,
                role,
                Recency::Loaded(0),
            ) {
                shared.load.entries.fetch_add(1, Ordering::Relaxed);
            }
            batch += 1;
        }
        if batch >= BATCH {
            batch = 0;
            drop(index);
            index = shared.index();
        }
    }
    Some(())
}

// ---- the scan ----------------------------------------------------------------------------

/// A valid entry found by the scan.
#[derive(Debug, Clone, Copy)]
struct Found {
    hash: KeyHash,
    object: u64,
    role: Role,
    size: u64,
    validator: u64,
    stamp: u32,
}

fn scan(shared: &Shared) {
    for l1 in read_dir_logged(&shared.dir) {
        let is_fanout = l1.file_name().to_str().is_some_and(is_fanout_name);
        if !is_fanout || !l1.file_type().is_ok_and(|t| t.is_dir()) {
            continue; // the marker, the snapshot, anything else: not entries
        }
        for l2 in read_dir_logged(&l1.path()) {
            let path = l2.path();
            let is_fanout = l2.file_name().to_str().is_some_and(is_fanout_name);
            if !is_fanout || !l2.file_type().is_ok_and(|t| t.is_dir()) {
                log::warn!("disk cache: ignoring {} (not ours)", path.display());
                continue;
            }
            let found = scan_leaf(&shared.dir, &path);
            let mut index = shared.index();
            for f in found {
                if index.insert(
                    f.hash,
                    f.object,
                    f.size,
                    f.validator,
                    f.role,
                    Recency::Loaded(f.stamp),
                ) {
                    shared.load.entries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `root/ab/cd` (`dir`): entry files and leftover temp files. Only regular files are ever
/// read or deleted, and only those that start with the entry magic.
fn scan_leaf(root: &Path, dir: &Path) -> Vec<Found> {
    let mut found = Vec::new();
    for entry in read_dir_logged(dir) {
        let mut path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            log::warn!(
                "disk cache: ignoring {} (not a regular file)",
                path.display()
            );
            continue;
        }
        let name = entry.file_name();
        let name = name.to_str().unwrap_or("");
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let mut magic = [0u8; MAGIC.len()];
        let ours = meta.len() >= MAGIC.len() as u64
            && file.read_exact(&mut magic).is_ok()
            && magic == MAGIC;
        if name.contains(TMP_MARKER) {
            // A write cut short; ours if it got as far as the magic (or wrote nothing at all).
            if ours || meta.len() == 0 {
                log::debug!("disk cache: deleting leftover temp file {}", path.display());
                remove_file_logged(&path);
            }
            continue;
        }
        if !ours {
            log::warn!(
                "disk cache: ignoring {} (not ours: no entry magic)",
                path.display()
            );
            continue;
        }
        if name.len() == 64 && parse_entry_name(&name[..16]).is_some() {
            // The layout before the 64-bit names: moved to its new name (same directory).
            let new = path.with_file_name(&name[..16]);
            if new.exists() || fs::rename(&path, &new).is_err() {
                remove_file_logged(&path);
                continue;
            }
            path = new;
        }
        match check_entry(&mut (&magic[..]).chain(&mut file), &meta, root, &path) {
            Ok(f) => found.push(f),
            Err(why) => {
                log::warn!("disk cache: deleting bad entry {}: {why}", path.display());
                remove_file_logged(&path);
            }
        }
    }
    found
}

/// Read the header of the entry file at `path` (`file`, of metadata `meta`) and check that it
/// is where its key puts it under `root`.
fn check_entry(
    file: &mut impl Read,
    meta: &fs::Metadata,
    root: &Path,
    path: &Path,
) -> Result<Found, String> {
    let header = read_header_from(file, meta.len())
        .map_err(|e| format!("cannot read the header: {e}"))?
        .map_err(|e| e.to_string())?;
    let hash = hash64(&header.key);
    if entry_path(root, hash) != path {
        return Err("not at the path of its key".to_owned());
    }
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(Found {
        hash,
        object: hash_object(object_bytes(&header.key)),
        role: role_of(&header.key),
        size: meta.len(),
        validator: hash_validator(&header.validator),
        stamp: stamp_of(modified),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_and_rejects_damage() {
        let mut index = Index::default();
        index.insert(1, 10, 100, 7, Role::Meta, Recency::Now);
        index.insert(2, 10, 200, 8, Role::Part, Recency::Now);
        index.insert(3, 20, 300, 9, Role::Whole, Recency::Now);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (entries, bytes) = write_snapshot(&index, 5, &path).unwrap();
        assert_eq!(entries, 3);
        let buf = fs::read(&path).unwrap();
        assert_eq!(buf.len() as u64, bytes);
        let objects = parse_snapshot(&buf, 5).unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].0, 10);
        let mut members = objects[0].1.clone();
        members.sort();
        assert_eq!(members, vec![(1, 100, 1 << 30 | 7), (2, 200, 2 << 30 | 8)]);
        assert_eq!(objects[1], (20, vec![(3, 300, 9)]));
        assert!(parse_snapshot(&buf, 4).is_err(), "another generation");
        for cut in [0, 3, 20, buf.len() - 1] {
            assert!(parse_snapshot(&buf[..cut], 5).is_err(), "cut at {cut}");
        }
        let mut flipped = buf.clone();
        flipped[40] ^= 1;
        assert!(parse_snapshot(&flipped, 5).is_err());
    }
}
