//! The disk tier of the chunk cache: a bounded, crash-safe store of opaque blobs (chunks and
//! object metadata), one file per cache key, grouped by *object* and evicted whole objects at a
//! time, least-recently-used first, down to a byte capacity.
//!
//! # What it must never do
//!
//! * **Never serve a torn or corrupt entry.** Every file carries its key, its validator, its
//!   data length and a CRC-32 of the data and of the header. A file that fails any check is
//!   deleted and reported as a miss; a file for another key or another object version is a
//!   plain miss (it will be overwritten by the next `put` of that key). A read that fails with
//!   an I/O error is a miss.
//! * **Never block an async worker.** All file I/O of [`DiskStore::get`], [`DiskStore::put`],
//!   [`DiskStore::put_in_background`], [`DiskStore::remove`] and [`DiskStore::remove_object`]
//!   runs in `tokio::task::spawn_blocking`. The in-memory index is a `std::sync::Mutex` held
//!   only for short map operations, never across I/O or an `.await` (the snapshot, written
//!   once at exit, excepted). The index loads on a thread of its own (see `load`): opening
//!   returns at once.
//! * **Never panic on file contents.** Decoding is bounds-checked everywhere (key and validator
//!   lengths are capped at [`MAX_NAME_LEN`], the data length must match the file size exactly);
//!   a bad file is an error value, never an index out of range or an allocation of a length
//!   read from disk.
//! * **Never delete what it does not own.** The tier keeps its files in a directory it marks
//!   as its own when it creates it (the [`MARKER`] file, with the format version). It refuses a
//!   non-empty directory without that marker (see [`check_dir`]), never deletes a file that
//!   does not start with its [`MAGIC`], and never follows a symbolic link in its tree.
//! * **Never flood the log or queue without bound.** A failing disk (full, over quota, I/O
//!   errors) costs at most one warning per cause per [`WARN_EVERY`]; every failure is counted
//!   ([`DiskStore::write_errors`], [`DiskStore::writes_skipped`]). Background writes are
//!   bounded ([`WRITE_QUEUE_BYTES`], [`WRITE_QUEUE_WRITES`]): past the bound a write is
//!   skipped, not queued.
//!
//! # Objects: the unit of recency and eviction
//!
//! An entry key names its object by convention: the object is the part of the key **before the
//! first NUL byte** (the whole key if it has none), see [`object_of`]. The chunk cache names
//! its entries `"<object>\0meta"` (the object's metadata, the one member whose name after the
//! NUL is exactly `meta`) and `"<object>\0chunk\0<index>"` (see `cache::key`), so an object's
//! metadata and all its chunks form one group. The index keeps recency per object: a `get` hit
//! or a `put` of any member makes the whole object the most recently used, and eviction removes
//! the least recently used object *whole* (every member file, metadata included). So eviction
//! never leaves chunks without their metadata, and after a restart the objects that fit are
//! the most recently used ones, complete. [`DiskStore::remove_object`] drops every member at
//! once (a dropped version's chunks go promptly). An object larger than the whole capacity
//! cannot be kept: it evicts itself as it is written.
//!
//! When the start-up load ends, a group it found with chunks but no metadata entry (an
//! *orphan*: a fill cut short, or a crash between deletions) can never be served: its files
//! are deleted (they carry our magic) and counted in the load's log line. The recency of the
//! objects a scan found is the modification time of their newest member; a snapshot keeps the
//! order the index had.
//!
//! # The index in memory
//!
//! The index holds a fixed-size record per entry and per object (hashes, sizes, recency),
//! never keys: what it takes in memory is [`INDEX_ENTRY_BYTES`] per entry plus
//! [`INDEX_OBJECT_BYTES`] per object (measured, worst case of the hash tables' load). That is
//! bounded like the files are: besides the byte capacity of the files, the tier has an
//! *index capacity* (`cache.disk.index_capacity`), and evicts least recently used objects
//! while either is exceeded. Without it, objects of a few bytes (their files charged a few
//! hundred bytes each) would let the index take several times the disk capacity in memory.
//!
//! # Write failures
//!
//! When a write fails the temp file is deleted and the tier stops writing for
//! [`WRITE_ERROR_PAUSE`] (writes in that time are skipped and counted, reads go on). What
//! happens next depends on the cause ([`WriteFailure`]):
//!
//! * **No room** (ENOSPC, EDQUOT): the file system holds less than the configured capacity, so
//!   the tier reclaims room: least recently used objects are evicted until it uses at most 90%
//!   of what it believed it used. Then writes resume.
//! * **Not writable** (EROFS, EACCES, EPERM, EIO and any other error): deleting would fail as
//!   writing did, so **nothing is evicted**: the index keeps every file it holds and reads go
//!   on serving them. The tier is *unwritable* ([`DiskStore::is_writable`]) until a probe (a
//!   temp file created and deleted in the directory, one at a time, at most once per pause)
//!   succeeds; the write that finds the pause over runs the probe, and writes resume when it
//!   succeeds.
//!
//! A file that cannot be deleted (an entry replaced, purged or found corrupt while the disk is
//! read-only) leaves the index all the same, so it is never served, and is remembered as
//! *untracked* (at most [`MAX_UNTRACKED`] of them; past that, the whole tree is marked for a
//! sweep). When writes resume, the remembered files are deleted (the sweep deletes every entry
//! file the index does not hold), so the index stays true to the files: what is indexed
//! exists, and what exists is indexed or removed, without a restart.
//!
//! # Layout
//!
//! The file of a key is `dir/ab/cd/<hex>`, where `<hex>` is the first 8 bytes of the BLAKE3
//! hash of the key in 16 hex digits and `ab`, `cd` are its first two bytes (two levels of
//! fan-out). The raw key never reaches a file name. (Files named by the whole hash, 64 digits,
//! are from the layout before: the scan renames them.) One key maps to one file, so a new version (validator) of a key replaces the old
//! file.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! magic "EDGSLC01" (8) | format version u16 | key length u32 | key | validator length u32 |
//! validator | data length u64 | crc32 of data u32 | crc32 of all preceding header bytes u32 |
//! data
//! ```
//!
//! # Crash safety
//!
//! A `put` writes `<final>.tmp.<random>` in the same directory and renames it over the final
//! path. There is deliberately **no fsync**: the rename is atomic, so after a SIGKILL a reader
//! sees the old complete file or the new complete file, never a mix; after a power loss the
//! file system may keep a renamed file whose data never reached the disk, and the CRC catches
//! that (the entry is deleted on read). Leftover temp files are deleted by the next `open`.
//! This is a cache: losing entries is fine, serving wrong bytes is not.
//!
//! # Concurrency
//!
//! File mutations (rename, delete) of one key happen under a striped lock together with the
//! matching index update, so the index and the files stay consistent under concurrent puts,
//! removes and evictions: two puts of one key race only on the rename (last one wins, each
//! temp file has a random suffix), and a `get` reads through an open file descriptor, so it
//! sees either the old or the new complete file. Eviction and [`DiskStore::remove_object`]
//! take an object's entries out of the index first, then delete each file under its stripe
//! unless the key was put again meanwhile (that newer file stays, indexed).
//!
//! Background writes ([`DiskStore::put_in_background`], the chunk cache's writes) each run in
//! one `spawn_blocking` task, admitted by a counter of writes and bytes in flight and released
//! by a ticket dropped when the task ends (also on a panic); [`DiskStore::drain`] waits for the
//! count to reach zero, so shutdown can let the admitted writes finish.
//!
//! Recency survives a clean restart exactly (the snapshot), a crash approximately: the scan
//! orders the objects it finds by the modification time of their newest file (that is, by when
//! they were last written).

use crate::config::default_index_capacity;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The first eight bytes of every entry file.
pub const MAGIC: [u8; 8] = *b"EDGSLC01";
/// The file that marks a directory as an edgeslice disk tier.
pub const MARKER: &str = "EDGESLICE-CACHE";
/// What the marker says: who wrote the directory, and in which layout version.
const MARKER_TEXT: &str = "edgeslice disk cache\nformat 1\n";
/// The format version written after the magic. Files of any other version are deleted at open.
pub const FORMAT_VERSION: u16 = 1;
/// The longest key or validator accepted (longer ones are never stored, and a header claiming
/// more is corrupt).
pub const MAX_NAME_LEN: usize = 64 * 1024;

/// magic, version, key length.
const PREFIX_LEN: usize = 8 + 2 + 4;
/// Every header field but the key and validator bytes.
const FIXED_HEADER_LEN: usize = PREFIX_LEN + 4 + 8 + 4 + 4;
/// The longest possible valid header.
const MAX_HEADER_LEN: usize = FIXED_HEADER_LEN + 2 * MAX_NAME_LEN;
/// How much of a file the start-up scan reads at first (most headers fit).
const SCAN_FIRST_READ: u64 = 4096;
/// Marker in the names of temporary files: `<hex>.tmp.<random>`.
const TMP_MARKER: &str = ".tmp.";
/// Number of per-key lock stripes serialising file mutations with their index updates.
const STRIPES: usize = 64;

mod index;
mod load;

use index::{Index, KeyHash, ObjectHash, Recency, Role};
pub use index::{INDEX_ENTRY_BYTES, INDEX_OBJECT_BYTES};

/// The first 8 bytes of a BLAKE3 hash, big-endian: the index key, and in 16 hex digits the
/// file name (see the module docs, "Layout").
fn hash64(bytes: &[u8]) -> u64 {
    let h = blake3::hash(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

fn hash_key(key: &str) -> KeyHash {
    hash64(key.as_bytes())
}

/// A short digest of a validator, kept in the index so that misses on another version need no
/// I/O. The header in the file stays authoritative.
fn hash_validator(validator: &[u8]) -> u64 {
    let h = blake3::hash(validator);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

// ---- encoding and decoding ------------------------------------------------------------------

/// The parsed header of an entry; key and validator borrow the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header<'a> {
    key: &'a [u8],
    validator: &'a [u8],
    data_len: u64,
    data_crc: u32,
}

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DecodeError {
    /// The buffer ends before the header does; `need` bytes would be required to go on.
    Short { need: usize },
    /// The bytes can never be a valid entry.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { need } => write!(f, "truncated header (needs {need} bytes)"),
            DecodeError::Invalid(why) => f.write_str(why),
        }
    }
}

/// A panic-free reader over a byte slice.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub(super) fn rest(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Invalid("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Short { need: end })?;
        self.pos = end;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        <[u8; N]>::try_from(self.take(N)?).map_err(|_| DecodeError::Invalid("short field"))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A u32 length prefix followed by that many bytes, at most [`MAX_NAME_LEN`].
    fn name(&mut self, too_long: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32()?).map_err(|_| DecodeError::Invalid(too_long))?;
        if len > MAX_NAME_LEN {
            return Err(DecodeError::Invalid(too_long));
        }
        self.take(len)
    }
}

/// Parse the header at the start of `buf`; returns it and its length in bytes. Checks the
/// magic, the version, the length bounds and the header CRC, not the data.
fn parse_header(buf: &[u8]) -> Result<(Header<'_>, usize), DecodeError> {
    let mut c = Cursor { buf, pos: 0 };
    if c.array::<8>()? != MAGIC {
        return Err(DecodeError::Invalid("bad magic"));
    }
    if c.u16()? != FORMAT_VERSION {
        return Err(DecodeError::Invalid("unknown format version"));
    }
    let key = c.name("key too long")?;
    let validator = c.name("validator too long")?;
    let data_len = c.u64()?;
    let data_crc = c.u32()?;
    let covered = c.pos;
    let header_crc = c.u32()?;
    let fields = buf
        .get(..covered)
        .ok_or(DecodeError::Short { need: covered })?;
    if crc32fast::hash(fields) != header_crc {
        return Err(DecodeError::Invalid("header checksum mismatch"));
    }
    Ok((
        Header {
            key,
            validator,
            data_len,
            data_crc,
        },
        c.pos,
    ))
}

/// Decode a whole entry file: the header, then exactly `data_len` bytes of data whose CRC
/// matches. Returns the header and the range of the data within `buf`.
fn decode_entry(buf: &[u8]) -> Result<(Header<'_>, Range<usize>), DecodeError> {
    let (header, header_len) = match parse_header(buf) {
        Ok(parsed) => parsed,
        Err(DecodeError::Short { .. }) => return Err(DecodeError::Invalid("truncated header")),
        Err(e) => return Err(e),
    };
    let data = buf
        .get(header_len..)
        .ok_or(DecodeError::Invalid("truncated header"))?;
    if data.len() as u64 != header.data_len {
        return Err(DecodeError::Invalid(
            "data length does not match the file size",
        ));
    }
    if crc32fast::hash(data) != header.data_crc {
        return Err(DecodeError::Invalid("data checksum mismatch"));
    }
    Ok((header, header_len..buf.len()))
}

/// The header of an entry holding `data`; `None` when the key or validator is too long.
fn encode_header(key: &[u8], validator: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    if key.len() > MAX_NAME_LEN || validator.len() > MAX_NAME_LEN {
        return None;
    }
    let mut h = Vec::with_capacity(FIXED_HEADER_LEN + key.len() + validator.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&u32::try_from(key.len()).ok()?.to_le_bytes());
    h.extend_from_slice(key);
    h.extend_from_slice(&u32::try_from(validator.len()).ok()?.to_le_bytes());
    h.extend_from_slice(validator);
    h.extend_from_slice(&(data.len() as u64).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    let header_crc = crc32fast::hash(&h);
    h.extend_from_slice(&header_crc.to_le_bytes());
    Some(h)
}

/// What the start-up scan keeps of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScannedHeader {
    key: Vec<u8>,
    validator: Vec<u8>,
}

/// Read only the header of an entry file of `file_len` bytes and check that the data length it
/// declares matches the file size. The outer error is I/O, the inner one the contents.
fn read_header_from(
    file: &mut impl Read,
    file_len: u64,
) -> io::Result<Result<ScannedHeader, DecodeError>> {
    let mut buf = Vec::new();
    let mut want = file_len.min(SCAN_FIRST_READ) as usize;
    loop {
        let have = buf.len();
        buf.resize(want, 0);
        file.read_exact(&mut buf[have..])?;
        match parse_header(&buf) {
            Ok((h, header_len)) => {
                if (header_len as u64).checked_add(h.data_len) != Some(file_len) {
                    return Ok(Err(DecodeError::Invalid(
                        "data length does not match the file size",
                    )));
                }
                return Ok(Ok(ScannedHeader {
                    key: h.key.to_vec(),
                    validator: h.validator.to_vec(),
                }));
            }
            Err(DecodeError::Short { need })
                if need > buf.len() && need <= MAX_HEADER_LEN && need as u64 <= file_len =>
            {
                want = need;
            }
            Err(DecodeError::Short { .. }) => {
                return Ok(Err(DecodeError::Invalid("truncated header")));
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// What identifies one file (not its path): a corrupt file is deleted only if the path still
/// names the very file that was read, not a newer one renamed over it meanwhile.
#[cfg(unix)]
fn file_identity(m: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_identity(m: &Metadata) -> (u64, u64) {
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    (m.len(), modified)
}

// ---- objects --------------------------------------------------------------------------------

/// The object an entry key belongs to: the part before the first NUL byte, or the whole key.
pub fn object_of(key: &str) -> &str {
    key.split('\0').next().unwrap_or(key)
}

fn object_bytes(key: &[u8]) -> &[u8] {
    key.split(|&b| b == 0).next().unwrap_or(key)
}

/// The key of an object name ([`object_of`]) in the index.
fn hash_object(object: &[u8]) -> ObjectHash {
    hash64(object)
}

fn role_of(key: &[u8]) -> Role {
    match key.iter().position(|&b| b == 0) {
        None => Role::Whole,
        Some(i) if key.get(i + 1..) == Some(&b"meta"[..]) => Role::Meta,
        Some(_) => Role::Part,
    }
}

// ---- write failures and the write queue -----------------------------------------------------

/// How long the tier stops writing after a write error.
pub const WRITE_ERROR_PAUSE: Duration = Duration::from_secs(10);
/// At most one warning per cause in this time; the failures in between are counted.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// Background writes ([`DiskStore::put_in_background`]) pending or running hold at most this
/// many bytes of data (a single larger write is admitted when nothing else is pending): past it
/// the disk is behind the origin, and a write is skipped rather than queued. 32 MiB is 32
/// chunks of the default size, far more than a healthy disk ever has in flight.
pub const WRITE_QUEUE_BYTES: u64 = 32 << 20;
/// ... and at most this many writes (each occupies a blocking thread while it runs).
pub const WRITE_QUEUE_WRITES: usize = 64;

/// Files remembered for deletion once the disk is writable again (32 bytes each): past this
/// many, the tree is swept instead (see the module docs, "Write failures").
pub const MAX_UNTRACKED: usize = 4096;

/// What a failed write says about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// ENOSPC, EDQUOT: the file system holds less than the capacity; evicting makes room.
    NoRoom,
    /// EROFS, EACCES, EPERM, EIO and anything else: evicting cannot help (a delete would fail
    /// too); stop writing, keep the index, probe.
    NotWritable,
}

impl WriteFailure {
    pub fn of(e: &io::Error) -> WriteFailure {
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => WriteFailure::NoRoom,
            _ => WriteFailure::NotWritable,
        }
    }
}

/// Entry files dropped from the index but not deleted (the deletion failed): deleted once the
/// disk is writable again. Bounded: past [`MAX_UNTRACKED`] the tree is swept instead.
#[derive(Debug, Default)]
struct Untracked {
    files: HashSet<KeyHash>,
    sweep: bool,
}

/// A short name for the cause of an I/O error, the unit of warning rate limits.
fn cause_of(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::StorageFull => "no space",
        io::ErrorKind::QuotaExceeded => "quota exceeded",
        io::ErrorKind::ReadOnlyFilesystem => "read-only file system",
        io::ErrorKind::PermissionDenied => "permission denied",
        _ if e.raw_os_error() == Some(5) => "I/O error", // EIO
        _ => "other error",
    }
}

/// One warning per cause per period; the occurrences in between are counted and reported with
/// the next line. Pure: the clock is passed in.
#[derive(Debug)]
struct WarnLimiter {
    every: Duration,
    causes: HashMap<&'static str, (Instant, u64)>,
}

impl WarnLimiter {
    fn new(every: Duration) -> WarnLimiter {
        WarnLimiter {
            every,
            causes: HashMap::new(),
        }
    }

    /// Whether to write a line for `cause` at `now`: `Some(n)` with the number of occurrences
    /// not reported since the last line, or `None` (this one is counted for later).
    fn check(&mut self, cause: &'static str, now: Instant) -> Option<u64> {
        match self.causes.get_mut(cause) {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < self.every => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.causes.insert(cause, (now, 0));
                Some(0)
            }
        }
    }
}

/// What background writes hold: admitted while under both bounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pending {
    writes: usize,
    bytes: u64,
}

impl Pending {
    fn try_admit(&mut self, len: u64, max_writes: usize, max_bytes: u64) -> bool {
        let fits = self.writes == 0
            || (self.writes < max_writes && self.bytes.saturating_add(len) <= max_bytes);
        if fits {
            self.writes += 1;
            self.bytes = self.bytes.saturating_add(len);
        }
        fits
    }

    fn release(&mut self, len: u64) {
        self.writes = self.writes.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len);
    }
}

/// Background writes in flight, and a signal for [`DiskStore::drain`] when there are none.
#[derive(Debug, Default)]
struct WriteQueue {
    pending: Mutex<Pending>,
    idle: tokio::sync::Notify,
}

/// A write admitted to the queue; dropping it (also on a panic) frees its place.
struct QueueTicket {
    shared: Arc<Shared>,
    len: u64,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        let queue = &self.shared.queue;
        let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.release(self.len);
        if pending.writes == 0 {
            queue.idle.notify_waiters();
        }
    }
}

// ---- the store ------------------------------------------------------------------------------

/// Whole-file reads ([`DiskStore::get`], [`DiskStore::scan_metas`]) running at once. A read
/// holds its file's buffer (up to a chunk) until it returns, so this bounds read buffers to
/// 32 chunks (32 MiB with 1 MiB chunks, as the write queue's [`WRITE_QUEUE_BYTES`]) instead of
/// Tokio's 512 blocking threads; 32 is also the queue depth at which SATA (NCQ) and most NVMe
/// drives reach their bandwidth, so a burst of hits waits here rather than on the device.
pub const MAX_CONCURRENT_READS: usize = 32;

/// The disk tier: see the module docs. Cheap to share as `Arc<DiskStore>`.
pub struct DiskStore {
    shared: Arc<Shared>,
    /// Permits for whole-file reads ([`MAX_CONCURRENT_READS`]).
    reads: Arc<tokio::sync::Semaphore>,
    /// Reads running and their peak, and a delay added to each (tests).
    #[cfg(test)]
    read_watch: Arc<ReadWatch>,
}

#[cfg(test)]
#[derive(Default)]
struct ReadWatch {
    running: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    delay_ms: AtomicU64,
    /// A read waits while a test closes this.
    gate: tests::Gate,
}

#[cfg(test)]
impl ReadWatch {
    /// Run `read` counted as running, after the gate and the delay set.
    fn watch<T>(&self, read: impl FnOnce() -> T) -> T {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.gate.wait();
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        let out = read();
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

struct Shared {
    dir: PathBuf,
    capacity: u64,
    /// What the index may take in memory (see [`Index::memory_bytes`]).
    index_capacity: u64,
    index: Mutex<Index>,
    /// Held (in blocking threads only) around every rename or delete of an entry file together
    /// with its index update. Lock order: stripe, then index; never the reverse.
    stripes: Box<[Mutex<()>]>,
    /// How long writes stop after a write error ([`WRITE_ERROR_PAUSE`]; shorter in tests).
    error_pause: Duration,
    /// The origin of the millisecond clock below.
    epoch: Instant,
    /// Writes are skipped until this many milliseconds after `epoch` (0: never paused).
    paused_until_ms: AtomicU64,
    write_errors: AtomicU64,
    writes_skipped: AtomicU64,
    /// A write failed with [`WriteFailure::NotWritable`] and no probe has succeeded since.
    unwritable: AtomicBool,
    /// Held by the write that probes; the writes arriving meanwhile wait for its verdict
    /// rather than being skipped (a probe is one small file created and deleted).
    probing: Mutex<()>,
    untracked: Mutex<Untracked>,
    warnings: Mutex<WarnLimiter>,
    queue: WriteQueue,
    /// The start-up load of the index: progress, and a signal when it is over.
    load: load::LoadState,
    #[cfg(test)]
    faults: tests::Faults,
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStore")
            .field("dir", &self.shared.dir)
            .field("capacity", &self.shared.capacity)
            .field("used", &self.used_bytes())
            .field("entries", &self.entry_count())
            .finish()
    }
}

impl DiskStore {
    /// Open (creating the directory if needed) and load the index, waiting for the load:
    /// see [`DiskStore::open_bounded`]. For tools and tests; the proxy does not wait.
    ///
    /// The index is bounded by the default `cache.disk.index_capacity`
    /// ([`default_index_capacity`]).
    pub fn open(dir: &Path, capacity: u64) -> io::Result<DiskStore> {
        let store = DiskStore::open_bounded(dir, capacity, default_index_capacity(capacity))?;
        store.wait_loaded();
        Ok(store)
    }

    /// Open (creating the directory if needed) and start loading the index in the background
    /// (a thread of its own, see `load`): from the snapshot a clean shutdown wrote
    /// ([`DiskStore::save_snapshot`]), else by scanning the files, which reads headers only.
    /// Returns at once: the store serves while it loads. Meanwhile a key not yet indexed is
    /// read from its file if there is one (and then indexed), puts and removes work as
    /// always, and [`DiskStore::is_loading`] says so.
    ///
    /// The index is bounded to `index_capacity` bytes of memory (`cache.disk.index_capacity`):
    /// objects are evicted, least recently used first, while the index would take more. At
    /// the end of the load too: a directory holding more objects than the index may keep is
    /// trimmed to the most recent ones.
    ///
    /// Only the two-hex-digit fan-out directories are scanned: anything else directly in `dir`
    /// is left alone, so a misconfigured path does not wipe unrelated files.
    pub fn open_bounded(dir: &Path, capacity: u64, index_capacity: u64) -> io::Result<DiskStore> {
        DiskStore::open_with(dir, capacity, index_capacity, WRITE_ERROR_PAUSE)
    }

    fn open_with(
        dir: &Path,
        capacity: u64,
        index_capacity: u64,
        error_pause: Duration,
    ) -> io::Result<DiskStore> {
        let store = DiskStore::open_unloaded(dir, capacity, index_capacity, error_pause)?;
        load::start(&store.shared)?;
        Ok(store)
    }

    /// The store before its load starts (then [`load::start`]).
    fn open_unloaded(
        dir: &Path,
        capacity: u64,
        index_capacity: u64,
        error_pause: Duration,
    ) -> io::Result<DiskStore> {
        check_dir(dir).map_err(io::Error::other)?;
        fs::create_dir_all(dir)?;
        let marker = dir.join(MARKER);
        if !marker.exists() {
            let tmp = dir.join(format!(
                "{MARKER}{TMP_MARKER}{:016x}",
                rand::random::<u64>()
            ));
            fs::write(&tmp, MARKER_TEXT)?;
            fs::rename(&tmp, &marker)?;
        }
        let generation = load::next_generation(dir);
        let shared = Shared {
            dir: dir.to_path_buf(),
            capacity,
            index_capacity,
            index: Mutex::new(Index::default()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            error_pause,
            epoch: Instant::now(),
            paused_until_ms: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            writes_skipped: AtomicU64::new(0),
            unwritable: AtomicBool::new(false),
            probing: Mutex::new(()),
            untracked: Mutex::new(Untracked::default()),
            warnings: Mutex::new(WarnLimiter::new(WARN_EVERY)),
            queue: WriteQueue::default(),
            load: load::LoadState::new(generation),
            #[cfg(test)]
            faults: tests::Faults::default(),
        };
        Ok(DiskStore {
            shared: Arc::new(shared),
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS)),
            #[cfg(test)]
            read_watch: Default::default(),
        })
    }

    /// Whether the index is still loading (see [`DiskStore::open_bounded`]).
    pub fn is_loading(&self) -> bool {
        self.shared.load.is_loading()
    }

    /// Whether the index was loaded from a snapshot (a clean shutdown), not by a scan.
    pub fn loaded_from_snapshot(&self) -> bool {
        self.shared.load.read_a_snapshot()
    }

    /// Entry files the load has indexed so far (all of them once it is over).
    pub fn loaded_entries(&self) -> u64 {
        self.shared.load.entries()
    }

    /// Block until the index is loaded.
    pub fn wait_loaded(&self) {
        self.shared.load.wait();
    }

    /// Wait until the index is loaded (on a blocking thread: rare callers, the admin's).
    pub async fn loaded(&self) {
        if !self.is_loading() {
            return;
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.load.wait()).await;
    }

    /// Write the index to a snapshot file beside the entries, so that the next start loads it
    /// instead of scanning every file. For a clean shutdown, after the writes are drained:
    /// writes that land after it are indexed by nobody at the next start (they are found by
    /// the next scan). Nothing is written while the index is still loading (it is partial).
    /// Blocking; holds the index lock while it writes (at shutdown nothing else runs).
    pub fn save_snapshot(&self) -> io::Result<()> {
        load::save_snapshot(&self.shared)
    }

    /// Read an entry. `validator` names the entry's version; `None` for an unversioned entry
    /// (an object's metadata), stored as an empty validator in the file format. The same holds
    /// for `put`, `put_in_background` and `contains`.
    ///
    /// A miss (`None`) when absent, or when the file's key or validator differ
    /// from the ones asked for (another object version: the file is left, it will be
    /// overwritten), or when the file is corrupt (bad header, wrong length, checksum mismatch),
    /// in which case it is deleted and dropped from the index, or on an I/O error. A hit makes
    /// the entry's object the most recently used. File I/O runs in `spawn_blocking`; a miss
    /// known to the index needs none.
    pub async fn get(&self, key: &str, validator: Option<&str>) -> Option<Bytes> {
        let validator = validator.unwrap_or("");
        let hash = hash_key(key);
        // While the index loads, a key it does not hold yet may still have its file.
        if !self.shared.load.is_loading()
            && !self
                .shared
                .indexed(&hash, hash_validator(validator.as_bytes()))
        {
            return None;
        }
        let shared = self.shared.clone();
        let key = key.to_owned();
        let validator = validator.to_owned();
        // Held by the read itself until its buffer is back, even if this future is dropped
        // meanwhile (see [`MAX_CONCURRENT_READS`]).
        let permit = self.reads.clone().acquire_owned().await.ok()?;
        #[cfg(test)]
        let watch = self.read_watch.clone();
        let read = move || {
            #[cfg(test)]
            let found = watch.watch(|| shared.get_blocking(&hash, &key, &validator));
            #[cfg(not(test))]
            let found = shared.get_blocking(&hash, &key, &validator);
            drop(permit);
            found
        };
        match tokio::task::spawn_blocking(read).await {
            Ok(found) => found,
            Err(e) => {
                log::warn!("disk cache: read task failed: {e}");
                None
            }
        }
    }

    /// Store an entry atomically: write `<final>.tmp.<random>` next to the final path, then
    /// rename it over the final path (no fsync: see the module docs), then index it. Room is
    /// made first by evicting least-recently-used objects (never the entry's own object, which
    /// a put makes the most recently used, unless it alone exceeds the capacity), so that
    /// `used_bytes() <= capacity()` always.
    ///
    /// An entry that cannot be stored (larger than the capacity, key or validator longer than
    /// [`MAX_NAME_LEN`], an I/O error, or writes paused after an error) is not stored, and any
    /// older entry of the same key is removed, so a stale version can never outlive a newer
    /// one. Errors are counted and logged (rate-limited) and swallowed: the cache is best
    /// effort. The work runs in `spawn_blocking` and completes even if this future is dropped.
    pub async fn put(&self, key: &str, validator: Option<&str>, data: Bytes) {
        let validator = validator.unwrap_or("");
        let shared = self.shared.clone();
        let key = key.to_owned();
        let validator = validator.to_owned();
        let task =
            tokio::task::spawn_blocking(move || shared.put_blocking(&key, &validator, &data));
        if let Err(e) = task.await {
            log::warn!("disk cache: write task failed: {e}");
        }
    }

    /// [`DiskStore::put`] without waiting, through the bounded write queue: the write is
    /// admitted while background writes pending or running hold under [`WRITE_QUEUE_WRITES`]
    /// writes and [`WRITE_QUEUE_BYTES`] bytes, and while writes are not paused after an
    /// error; otherwise it is skipped (counted in [`DiskStore::writes_skipped`]) and `false`
    /// returned. A skipped write leaves any older entry of the key in place: use this for
    /// entries whose validator identifies their content (chunks), which another version can
    /// never be mistaken for. [`DiskStore::drain`] waits for the admitted writes.
    pub fn put_in_background(&self, key: String, validator: Option<&str>, data: Bytes) -> bool {
        let validator = validator.unwrap_or("");
        if self.shared.writes_paused() {
            self.shared.writes_skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.writes_skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let len = data.len() as u64;
        let admitted = self
            .shared
            .queue
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_admit(len, WRITE_QUEUE_WRITES, WRITE_QUEUE_BYTES);
        if !admitted {
            self.shared.writes_skipped.fetch_add(1, Ordering::Relaxed);
            self.shared.warn_limited("write queue full", || {
                format!(
                    "disk cache: the disk is behind ({WRITE_QUEUE_WRITES} writes or {WRITE_QUEUE_BYTES} bytes pending): writes skipped"
                )
            });
            return false;
        }
        let ticket = QueueTicket {
            shared: self.shared.clone(),
            len,
        };
        let validator = validator.to_owned();
        runtime.spawn_blocking(move || {
            #[cfg(test)]
            ticket.shared.faults.write_gate.wait();
            ticket.shared.put_blocking(&key, &validator, &data);
            drop(ticket);
        });
        true
    }

    /// Wait until no background write is pending or running, at most `timeout`. Returns
    /// whether the queue is empty. Writes admitted meanwhile are waited for too.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut notified = std::pin::pin!(self.shared.queue.idle.notified());
            notified.as_mut().enable();
            if self.pending_writes() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pending_writes() == 0;
            }
        }
    }

    /// Delete an entry (if present). The index is authoritative: a key it does not hold costs
    /// no I/O.
    pub async fn remove(&self, key: &str) {
        let hash = hash_key(key);
        // While the index loads, the file may be there unindexed: delete it all the same.
        if !self.shared.load.is_loading() && !self.shared.index().contains(hash) {
            return;
        }
        let shared = self.shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.remove_blocking(&hash)).await {
            log::warn!("disk cache: remove task failed: {e}");
        }
    }

    /// Delete every entry of an object (`object` as [`object_of`] names it): its metadata and
    /// all its chunks, whatever their version. An object the index does not hold costs no I/O.
    pub async fn remove_object(&self, object: &str) {
        let loading = self.shared.load.is_loading();
        // While the index loads, members not indexed yet cannot be listed; the metadata entry
        // is deleted by its name, and chunks without it are never served (the load deletes
        // them as orphans).
        let meta = loading.then(|| hash_key(&format!("{object}\0meta")));
        let object = hash_object(object.as_bytes());
        if !loading && !self.shared.index().has_object(object) {
            return;
        }
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            let members = shared.index().take_object(object);
            shared.delete_members(members);
            if let Some(meta) = meta {
                shared.remove_blocking(&meta);
            }
        });
        if let Err(e) = task.await {
            log::warn!("disk cache: remove task failed: {e}");
        }
    }

    /// Pass the key and data of every object's metadata entry (`"<object>\0meta"`) to `visit`
    /// and collect what it returns: the admin's purge finds the objects that live only on
    /// disk this way. One blocking task reads one small file per object, in no particular
    /// order; the index lock is held only to list them, never across I/O, and recency is not
    /// touched. An entry gone or unreadable meanwhile is skipped, a corrupt one deleted as
    /// [`DiskStore::get`] would.
    pub async fn scan_metas<T, F>(&self, visit: F) -> Vec<T>
    where
        T: Send + 'static,
        F: FnMut(&str, &[u8]) -> Option<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        // One file read at a time, under one read permit (see [`MAX_CONCURRENT_READS`]).
        let Ok(permit) = self.reads.clone().acquire_owned().await else {
            return Vec::new();
        };
        let scan = move || {
            let found = shared.scan_metas_blocking(visit);
            drop(permit);
            found
        };
        match tokio::task::spawn_blocking(scan).await {
            Ok(found) => found,
            Err(e) => {
                log::warn!("disk cache: scan task failed: {e}");
                Vec::new()
            }
        }
    }

    /// Whether the index holds `key` at `validator`, without any I/O. A `get` may still miss
    /// (the file turns out corrupt, or was evicted meanwhile).
    pub fn contains(&self, key: &str, validator: Option<&str>) -> bool {
        let validator = validator.unwrap_or("");
        self.shared
            .indexed(&hash_key(key), hash_validator(validator.as_bytes()))
    }

    /// Sum of the sizes (header and data) of the indexed files.
    pub fn used_bytes(&self) -> u64 {
        self.shared.index().used
    }

    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// What the index takes in memory now ([`INDEX_ENTRY_BYTES`] per entry,
    /// [`INDEX_OBJECT_BYTES`] per object).
    pub fn index_bytes(&self) -> u64 {
        self.shared.index().memory_bytes(false)
    }

    /// What the index has allocated now (slab pages and hash tables): its resident bytes.
    pub fn index_resident_bytes(&self) -> u64 {
        self.shared.index().resident_bytes()
    }

    /// What the index may take in memory.
    pub fn index_capacity(&self) -> u64 {
        self.shared.index_capacity
    }

    pub fn entry_count(&self) -> usize {
        self.shared.index().entry_count()
    }

    /// Number of objects (groups of entries) indexed.
    pub fn object_count(&self) -> usize {
        self.shared.index().object_count()
    }

    /// Writes that failed with an I/O error since open.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Writes not attempted since open: the write queue was full, or writes were paused after
    /// an error.
    pub fn writes_skipped(&self) -> u64 {
        self.shared.writes_skipped.load(Ordering::Relaxed)
    }

    /// Whether writes are attempted: `false` after a write failed because the disk is not
    /// writable (read-only, permission, I/O error) until a probe succeeds.
    pub fn is_writable(&self) -> bool {
        !self.shared.unwritable.load(Ordering::Relaxed)
    }

    /// Entry files dropped from the index whose deletion failed, waiting for the disk to be
    /// writable again (a pending sweep counts as one more).
    pub fn untracked_files(&self) -> usize {
        let u = self.shared.untracked();
        u.files.len() + usize::from(u.sweep)
    }

    /// Background writes pending or running now.
    pub fn pending_writes(&self) -> usize {
        self.shared
            .queue
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writes
    }

    /// The directory the entries live in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn untracked(&self) -> MutexGuard<'_, Untracked> {
        self.untracked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stripe(&self, hash: &KeyHash) -> MutexGuard<'_, ()> {
        let i = (*hash % self.stripes.len() as u64) as usize;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn indexed(&self, hash: &KeyHash, validator: u64) -> bool {
        self.index().has(*hash, validator)
    }

    fn path_for(&self, hash: &KeyHash) -> PathBuf {
        entry_path(&self.dir, *hash)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn writes_paused(&self) -> bool {
        self.now_ms() < self.paused_until_ms.load(Ordering::Relaxed)
    }

    /// Log `message` as a warning unless `cause` had its line within [`WARN_EVERY`]; then it is
    /// counted, and the count goes with the next line.
    fn warn_limited(&self, cause: &'static str, message: impl FnOnce() -> String) {
        let verdict = self
            .warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(cause, Instant::now());
        #[cfg(test)]
        if verdict.is_some() {
            self.faults.count_warning();
        }
        match verdict {
            Some(0) => log::warn!("{}", message()),
            Some(n) => log::warn!(
                "{} ({n} more of this kind since the last report)",
                message()
            ),
            None => {}
        }
    }

    fn get_blocking(&self, hash: &KeyHash, key: &str, validator: &str) -> Option<Bytes> {
        let path = self.path_for(hash);
        let (buf, identity) = self.read_file(hash, &path)?;
        let (same_version, data) = match decode_entry(&buf) {
            Ok((h, data)) => (
                h.key == key.as_bytes() && h.validator == validator.as_bytes(),
                data,
            ),
            Err(e) => {
                self.discard_corrupt(hash, &path, identity, &e.to_string());
                return None;
            }
        };
        if !same_version {
            return None;
        }
        if self.load.is_loading() {
            // Found before the load reached it: index it now (a put since is newer: kept,
            // and touched). An insert makes its object the most recently used.
            let _stripe = self.stripe(hash);
            let mut index = self.index();
            if index.contains(*hash) {
                index.touch(*hash);
            } else {
                index.insert(
                    *hash,
                    hash_object(object_bytes(key.as_bytes())),
                    buf.len() as u64,
                    hash_validator(validator.as_bytes()),
                    role_of(key.as_bytes()),
                    Recency::Now,
                );
            }
        } else {
            self.index().touch(*hash);
        }
        Some(exact_data(buf, data))
    }

    /// Every metadata entry's key and data passed to `visit`; see [`DiskStore::scan_metas`].
    fn scan_metas_blocking<T>(&self, mut visit: impl FnMut(&str, &[u8]) -> Option<T>) -> Vec<T> {
        // Listed first, so the index lock is never held across file I/O.
        let metas: Vec<KeyHash> = self.index().meta_hashes();
        let mut found = Vec::new();
        for hash in metas {
            let path = self.path_for(&hash);
            let Some((buf, identity)) = self.read_file(&hash, &path) else {
                continue;
            };
            match decode_entry(&buf) {
                Ok((h, data)) if role_of(h.key) == Role::Meta => {
                    let Ok(key) = std::str::from_utf8(h.key) else {
                        continue;
                    };
                    found.extend(visit(key, &buf[data]));
                }
                Ok(_) => {}
                Err(e) => self.discard_corrupt(&hash, &path, identity, &e.to_string()),
            }
        }
        found
    }

    /// The whole file of an entry and its identity; `None` if it is gone (then forgotten),
    /// unreadable, or larger than the capacity (then deleted as corrupt).
    fn read_file(&self, hash: &KeyHash, path: &Path) -> Option<(Vec<u8>, (u64, u64))> {
        let read_failed = |what: &str, e: io::Error| {
            self.warn_limited("read", || {
                format!("disk cache: cannot {what} {}: {e}", path.display())
            });
        };
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_if_missing(hash, path);
                return None;
            }
            Err(e) => {
                read_failed("open", e);
                return None;
            }
        };
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                read_failed("stat", e);
                return None;
            }
        };
        let identity = file_identity(&meta);
        let len = match usize::try_from(meta.len()) {
            Ok(len) if meta.len() <= self.capacity => len,
            _ => {
                self.discard_corrupt(hash, path, identity, "larger than the capacity");
                return None;
            }
        };
        let mut buf = Vec::with_capacity(len);
        if let Err(e) = (&mut file).take(meta.len()).read_to_end(&mut buf) {
            read_failed("read", e);
            return None;
        }
        Some((buf, identity))
    }

    /// Delete a corrupt entry file, unless the path names another file by now (a fresh `put`).
    fn discard_corrupt(&self, hash: &KeyHash, path: &Path, identity: (u64, u64), why: &str) {
        // A disk returning garbage must not flood the log either.
        self.warn_limited("corrupt entry", || {
            format!(
                "disk cache: discarding corrupt entry {}: {why}",
                path.display()
            )
        });
        let _stripe = self.stripe(hash);
        let same_file = fs::symlink_metadata(path).is_ok_and(|m| file_identity(&m) == identity);
        if same_file {
            self.index().remove(*hash);
            // Only a file that is ours (it starts with the entry magic) is deleted; anything
            // else found at an entry's path is dropped from the index and left alone.
            if has_magic(path) {
                self.remove_file(hash, path);
            }
        }
    }

    /// The index lists an entry whose file is gone (deleted behind our back): forget it.
    fn forget_if_missing(&self, hash: &KeyHash, path: &Path) {
        let _stripe = self.stripe(hash);
        let missing =
            matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound);
        if missing {
            self.index().remove(*hash);
        }
    }

    fn put_blocking(&self, key: &str, validator: &str, data: &Bytes) {
        let hash = hash_key(key);
        if self.writes_paused() || !self.writable_after_probe() {
            self.writes_skipped.fetch_add(1, Ordering::Relaxed);
            self.remove_blocking(&hash);
            return;
        }
        let Some(header) = encode_header(key.as_bytes(), validator.as_bytes(), data) else {
            log::warn!("disk cache: key or validator too long, not stored");
            self.remove_blocking(&hash);
            return;
        };
        let size = (header.len() as u64).saturating_add(data.len() as u64);
        if size > self.capacity || size > index::MAX_ENTRY_SIZE {
            log::debug!("disk cache: entry of {size} bytes exceeds the capacity, not stored");
            self.remove_blocking(&hash);
            return;
        }
        let path = self.path_for(&hash);
        let object = hash_object(object_bytes(key.as_bytes()));
        let validator = hash_validator(validator.as_bytes());
        // Make room first, so the new file never takes the tier past its capacity; the
        // entry's own object is the most recently used, so it is the last one evicted.
        {
            let mut index = self.index();
            if index.sealed {
                // Shutting down, the snapshot written: a file now would be missing from it.
                // The older entry goes, as for any write not made.
                drop(index);
                self.writes_skipped.fetch_add(1, Ordering::Relaxed);
                self.remove_blocking(&hash);
                return;
            }
            index.reserved += size;
            index.reserved_entries += 1;
            index.touch_object(object);
        }
        self.evict();
        let role = role_of(key.as_bytes());
        let entry = (object, size, validator, role);
        if let Err(e) = self.install(&hash, entry, &path, &header, data) {
            {
                let mut index = self.index();
                index.reserved -= size;
                index.reserved_entries -= 1;
            }
            self.remove_blocking(&hash);
            self.write_failed(&path, &e);
        }
    }

    /// Write a temp file, rename it over `path` and index it. The temp file is deleted on any
    /// error.
    fn install(
        &self,
        hash: &KeyHash,
        (object, size, validator, role): (ObjectHash, u64, u64, Role),
        path: &Path,
        header: &[u8],
        data: &[u8],
    ) -> io::Result<()> {
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::other("entry path has no parent"))?;
        fs::create_dir_all(parent)?;
        let tmp = tmp_path(path);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(header)?;
                #[cfg(test)]
                self.faults.injected_write_error()?;
                f.write_all(data)
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let _stripe = self.stripe(hash);
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let mut index = self.index();
        index.reserved -= size;
        index.reserved_entries -= 1;
        index.insert(*hash, object, size, validator, role, Recency::Now);
        Ok(())
    }

    /// Pause writes for [`Shared::error_pause`]; whether they were running until now.
    fn pause_writes(&self) -> bool {
        let now = self.now_ms();
        let until = now.saturating_add(u64::try_from(self.error_pause.as_millis()).unwrap_or(0));
        self.paused_until_ms.fetch_max(until, Ordering::Relaxed) <= now
    }

    /// Whether a write may be attempted now: always while the disk is writable; after a
    /// [`WriteFailure::NotWritable`], only once a probe succeeds. One probe runs at a time (a
    /// write arriving meanwhile waits for its verdict); a failed probe pauses writes again. A successful
    /// one resumes writing and deletes the files left untracked meanwhile.
    fn writable_after_probe(&self) -> bool {
        if !self.unwritable.load(Ordering::Relaxed) {
            return true;
        }
        {
            let _probing = self.probing.lock().unwrap_or_else(|p| p.into_inner());
            // Decided while we waited: resumed, or paused again by a failed probe.
            if !self.unwritable.load(Ordering::Relaxed) {
                return true;
            }
            if self.writes_paused() {
                return false;
            }
            if let Err(e) = self.probe() {
                self.pause_writes();
                log::debug!("disk cache: probe failed: {e}");
                return false;
            }
            self.unwritable.store(false, Ordering::Relaxed);
        }
        log::warn!(
            "disk cache {}: writable again, writes resumed",
            self.dir.display()
        );
        // Outside the probe lock: the writes waiting on it go on meanwhile.
        self.delete_untracked();
        true
    }

    /// Create, write and delete a temp file in the directory.
    fn probe(&self) -> io::Result<()> {
        let path = self.dir.join(format!(
            "{MARKER}{TMP_MARKER}probe{:016x}",
            rand::random::<u64>()
        ));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| {
                #[cfg(test)]
                self.faults.injected_write_error()?;
                f.write_all(b"probe")
            });
        let removed = fs::remove_file(&path);
        written.and(removed)
    }

    /// Delete the entry files dropped from the index while they could not be deleted (or, past
    /// [`MAX_UNTRACKED`], every entry file the index does not hold). Those that still cannot
    /// be deleted stay remembered.
    fn delete_untracked(&self) {
        let (files, sweep) = {
            let mut u = self.untracked();
            (std::mem::take(&mut u.files), std::mem::take(&mut u.sweep))
        };
        for hash in files {
            let _stripe = self.stripe(&hash);
            if !self.index().contains(hash) {
                self.remove_file(&hash, &self.path_for(&hash));
            }
        }
        if sweep {
            self.sweep_unindexed();
        }
    }

    /// Delete every entry file (ours: magic, not a temp file) that the index does not hold.
    fn sweep_unindexed(&self) {
        let mut deleted = 0u64;
        for l1 in read_dir_logged(&self.dir) {
            let is_fanout = l1.file_name().to_str().is_some_and(is_fanout_name);
            if !is_fanout || !l1.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for l2 in read_dir_logged(&l1.path()) {
                let is_fanout = l2.file_name().to_str().is_some_and(is_fanout_name);
                if !is_fanout || !l2.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                for f in read_dir_logged(&l2.path()) {
                    let name = f.file_name();
                    let Some(hash) = name.to_str().and_then(parse_entry_name) else {
                        continue; // temp files and anything not named like an entry
                    };
                    if !f.file_type().is_ok_and(|t| t.is_file()) {
                        continue;
                    }
                    let path = f.path();
                    let _stripe = self.stripe(&hash);
                    if !self.index().contains(hash) && has_magic(&path) {
                        self.remove_file(&hash, &path);
                        deleted += 1;
                    }
                }
            }
        }
        log::info!("disk cache: swept {deleted} entry files the index did not hold");
    }

    /// A write failed: count it, pause writes and say so at most once per cause per
    /// [`WARN_EVERY`]. Out of room, reclaim room (the file system holds less than we thought);
    /// not writable, evict nothing (nothing could be deleted) and probe before writing again.
    fn write_failed(&self, path: &Path, e: &io::Error) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        let first = self.pause_writes();
        if WriteFailure::of(e) == WriteFailure::NotWritable {
            self.unwritable.store(true, Ordering::Relaxed);
            let cause = cause_of(e);
            self.warn_limited(cause, || {
                format!(
                    "disk cache: cannot write {}: {e}; the disk is not writable: writes stop (reads go on) until a probe every {:?} succeeds ({} write errors so far)",
                    path.display(),
                    self.error_pause,
                    self.write_errors.load(Ordering::Relaxed),
                )
            });
            return;
        }
        // The first failure of a burst reclaims; the writes failing with it do not.
        let freed = if first {
            let used = self.index().used;
            let target = used / 10 * 9;
            self.evict_to(target, false);
            used.saturating_sub(self.index().used)
        } else {
            0
        };
        let cause = cause_of(e);
        self.warn_limited(cause, || {
            format!(
                "disk cache: cannot write {}: {e}; writes paused for {:?}, {freed} bytes reclaimed ({} write errors so far)",
                path.display(),
                self.error_pause,
                self.write_errors.load(Ordering::Relaxed),
            )
        });
    }

    fn remove_blocking(&self, hash: &KeyHash) {
        let path = self.path_for(hash);
        let _stripe = self.stripe(hash);
        // While the index loads, the file may be there unindexed: it goes all the same.
        if self.index().remove(*hash).is_some() || self.load.is_loading() {
            self.remove_file(hash, &path);
        }
    }

    /// Delete the files of entries taken out of the index, unless put again meanwhile (that
    /// newer file is indexed: keep it).
    fn delete_members(&self, members: Vec<KeyHash>) {
        for hash in members {
            let _stripe = self.stripe(&hash);
            let back = self.index().contains(hash);
            if !back {
                self.remove_file(&hash, &self.path_for(&hash));
            }
        }
    }

    /// Evict least-recently-used objects until `used + reserved <= capacity` and the index,
    /// with room for the puts in progress, fits its capacity.
    fn evict(&self) {
        self.evict_to(self.capacity, true);
    }

    /// Evict least-recently-used objects, whole, until the bytes held are at most `limit`.
    fn evict_to(&self, limit: u64, with_reserved: bool) {
        loop {
            // The index guard must not live into the loop body (lock order: stripe, index).
            let victim = self
                .index()
                .pop_lru_above(limit, self.index_capacity, with_reserved);
            let Some(members) = victim else { break };
            self.delete_members(members);
        }
    }

    /// Delete the file of an entry already out of the index (the caller holds its stripe).
    /// A failure is logged rate-limited and the file remembered as untracked, deleted when the
    /// disk is writable again.
    fn remove_file(&self, hash: &KeyHash, path: &Path) {
        #[cfg(test)]
        let removed = self
            .faults
            .injected_delete_error()
            .and_then(|()| fs::remove_file(path));
        #[cfg(not(test))]
        let removed = fs::remove_file(path);
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                {
                    let mut u = self.untracked();
                    if u.files.len() < MAX_UNTRACKED {
                        u.files.insert(*hash);
                    } else {
                        u.sweep = true;
                    }
                }
                self.warn_limited("delete", || {
                    format!(
                        "disk cache: cannot delete {}: {e}; deleted when the disk is writable again",
                        path.display()
                    )
                })
            }
        }
    }
}

/// The data of an entry file read whole into `buf`, as `Bytes` that hold little more than the
/// data: the memory tier weighs a chunk by its length, so a small chunk must not keep its
/// file's header (and the key in it, up to 64 KiB) alive behind it. When the header is more
/// than a sixteenth of the buffer the data is copied out (at most 15 times the header: small),
/// otherwise the buffer is kept and sliced (no copy of a large chunk).
fn exact_data(buf: Vec<u8>, data: Range<usize>) -> Bytes {
    if data.start.saturating_mul(16) > buf.len() {
        Bytes::copy_from_slice(buf.get(data).unwrap_or_default())
    } else {
        Bytes::from(buf).slice(data)
    }
}

/// `<final>.tmp.<random>` in the directory of `path`.
pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TMP_MARKER}{:016x}", rand::random::<u64>()));
    path.with_file_name(name)
}

fn remove_file_logged(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("disk cache: cannot delete {}: {e}", path.display()),
    }
}

/// Whether `dir` may serve as the disk tier: absent (it will be created), empty, or marked by
/// edgeslice with a layout version this build reads. Never writes anything. The error says
/// why, for `edgeslice -t` and for the start-up failure.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    match fs::read_to_string(dir.join(MARKER)) {
        Ok(text) if text == MARKER_TEXT => Ok(()),
        Ok(text) if text.starts_with("edgeslice disk cache") => Err(format!(
            "{} holds an edgeslice disk cache of another format ({:?}); point cache.disk.path at a new directory",
            dir.display(),
            text.lines().nth(1).unwrap_or("")
        )),
        Ok(_) => Err(format!(
            "{}/{MARKER} was not written by edgeslice",
            dir.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut entries =
                fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(format!(
                    "{} is not empty and has no {MARKER} marker: edgeslice keeps its cache only in a directory it created (or an empty one), so that it never deletes files it does not own",
                    dir.display()
                ))
            }
        }
        Err(e) => Err(format!("cannot read {}/{MARKER}: {e}", dir.display())),
    }
}

/// Whether the file at `path` starts with the entry magic (so it is ours to delete).
fn has_magic(path: &Path) -> bool {
    let mut head = [0u8; MAGIC.len()];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == MAGIC)
}

fn is_fanout_name(name: &str) -> bool {
    name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file of an entry: `dir/ab/cd/<16 hex digits of its key hash>`.
fn entry_path(dir: &Path, hash: KeyHash) -> PathBuf {
    let hex = format!("{hash:016x}");
    dir.join(&hex[..2]).join(&hex[2..4]).join(&hex)
}

/// The key hash an entry file's name says: 16 lower-case hex digits.
fn parse_entry_name(name: &str) -> Option<KeyHash> {
    let hex = name.len() == 16
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

fn read_dir_logged(dir: &Path) -> Vec<fs::DirEntry> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| {
                e.map_err(|e| log::warn!("disk cache: cannot list {}: {e}", dir.display()))
                    .ok()
            })
            .collect(),
        Err(e) => {
            log::warn!("disk cache: cannot list {}: {e}", dir.display());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod read_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicI32;
    use std::sync::Condvar;

    /// Test-only fault injection, reached from the write path.
    #[derive(Debug, Default)]
    pub(super) struct Faults {
        /// Raw OS error every write fails with after its header is written (0: none).
        fail_with: AtomicI32,
        /// Raw OS error every entry-file deletion fails with (0: none).
        fail_deletes_with: AtomicI32,
        /// While closed, background writes wait before writing.
        pub(super) write_gate: Gate,
        /// Warning lines written.
        warnings: AtomicU64,
        /// While closed, the start-up load waits before it begins.
        pub(super) load_gate: Gate,
    }

    /// Where a test holds a thread back: open by default.
    #[derive(Debug, Default)]
    pub(super) struct Gate {
        closed: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        /// Wait while the gate is closed.
        pub(super) fn wait(&self) {
            let mut closed = self.closed.lock().unwrap();
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
        }

        pub(super) fn set(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }
    }

    impl Faults {
        pub(super) fn injected_write_error(&self) -> io::Result<()> {
            match self.fail_with.load(Ordering::SeqCst) {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(code)),
            }
        }

        pub(super) fn injected_delete_error(&self) -> io::Result<()> {
            match self.fail_deletes_with.load(Ordering::SeqCst) {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(code)),
            }
        }

        fn fail_deletes_with(&self, code: i32) {
            self.fail_deletes_with.store(code, Ordering::SeqCst);
        }

        pub(super) fn count_warning(&self) {
            self.warnings.fetch_add(1, Ordering::SeqCst);
        }

        fn warnings(&self) -> u64 {
            self.warnings.load(Ordering::SeqCst)
        }

        fn fail_writes_with(&self, code: i32) {
            self.fail_with.store(code, Ordering::SeqCst);
        }
    }

    /// A store whose index is loaded.
    fn loaded(store: DiskStore) -> DiskStore {
        store.wait_loaded();
        store
    }

    fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() && !e.file_name().to_string_lossy().starts_with(MARKER) {
                    out.push((e.path(), e.metadata().unwrap().len()));
                }
            }
        }
        out
    }

    fn disk_bytes(dir: &Path) -> u64 {
        files_under(dir).iter().map(|(_, len)| len).sum()
    }

    fn entry_path(store: &DiskStore, key: &str) -> PathBuf {
        store.shared.path_for(&hash_key(key))
    }

    fn entry_size(key: &str, validator: &str, data_len: usize) -> u64 {
        (FIXED_HEADER_LEN + key.len() + validator.len() + data_len) as u64
    }

    fn encode(key: &[u8], validator: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = encode_header(key, validator, data).unwrap();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<DiskStore>();
        check::<Arc<DiskStore>>();
    }

    #[tokio::test]
    async fn round_trip_and_version_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.get("obj/1", Some("v1")).await, None);
        store
            .put("obj/1", Some("v1"), Bytes::from_static(b"hello chunk"))
            .await;
        assert_eq!(
            store.get("obj/1", Some("v1")).await.as_deref(),
            Some(&b"hello chunk"[..])
        );
        assert!(store.contains("obj/1", Some("v1")));
        assert!(!store.contains("obj/1", Some("v2")));
        assert_eq!(store.get("obj/1", Some("v2")).await, None);
        assert_eq!(store.get("obj/2", Some("v1")).await, None);
        assert_eq!(store.entry_count(), 1);
        assert_eq!(store.used_bytes(), entry_size("obj/1", "v1", 11));
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
        // The file name is the key's hash, never the key.
        let files = files_under(dir.path());
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, entry_path(&store, "obj/1"));
        assert!(!files[0].0.to_string_lossy().contains("obj"));

        // A new version overwrites the old file.
        store
            .put("obj/1", Some("v2"), Bytes::from_static(b"second"))
            .await;
        assert_eq!(store.get("obj/1", Some("v1")).await, None);
        assert_eq!(
            store.get("obj/1", Some("v2")).await.as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(store.entry_count(), 1);
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());

        // Empty data and an empty validator are fine.
        store.put("meta", None, Bytes::new()).await;
        assert_eq!(store.get("meta", None).await.as_deref(), Some(&b""[..]));

        store.remove("obj/1").await;
        store.remove("absent").await;
        assert_eq!(store.get("obj/1", Some("v2")).await, None);
        assert!(!entry_path(&store, "obj/1").exists());
        assert_eq!(store.entry_count(), 1);
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test]
    async fn a_file_for_another_version_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store.put("k", Some("v1"), Bytes::from_static(b"one")).await;
        // Another process (or a past life) wrote v2 at the same path: the index still says v1.
        let path = entry_path(&store, "k");
        fs::write(&path, encode(b"k", b"v2", b"two")).unwrap();
        assert_eq!(store.get("k", Some("v1")).await, None);
        assert!(
            path.exists(),
            "a valid file of another version is not deleted"
        );
        assert_eq!(store.entry_count(), 1);
    }

    #[tokio::test]
    async fn reopen_serves_entries_and_deletes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store
            .put("a", Some("1"), Bytes::from(vec![1u8; 5000]))
            .await;
        store.put("b", Some("2"), Bytes::from(vec![2u8; 10])).await;
        let path_a = entry_path(&store, "a");
        let used = store.used_bytes();
        drop(store);

        let tmp = path_a.with_file_name(format!(
            "{}.tmp.0123456789abcdef",
            path_a.file_name().unwrap().to_str().unwrap()
        ));
        let mut half = MAGIC.to_vec();
        half.extend_from_slice(b"half a write");
        fs::write(&tmp, &half).unwrap();
        // The same name pattern on a file that is not ours: left alone.
        let foreign_tmp = path_a.with_file_name("notes.tmp.txt");
        fs::write(&foreign_tmp, b"not a cache write").unwrap();

        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        assert!(!tmp.exists(), "leftover temp file deleted at open");
        assert!(foreign_tmp.exists(), "a foreign file is never deleted");
        assert_eq!(store.entry_count(), 2);
        assert_eq!(store.used_bytes(), used);
        assert!(store.contains("a", Some("1")));
        assert_eq!(store.get("a", Some("1")).await.unwrap(), vec![1u8; 5000]);
        assert_eq!(store.get("b", Some("2")).await.unwrap(), vec![2u8; 10]);
        assert_eq!(store.get("b", Some("1")).await, None);
        assert_eq!(
            disk_bytes(dir.path()),
            store.used_bytes() + b"not a cache write".len() as u64
        );
    }

    #[tokio::test]
    async fn reopen_with_a_smaller_capacity_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10 {
            store
                .put(
                    &format!("k{i}"),
                    Some("v"),
                    Bytes::from(vec![i as u8; 1000]),
                )
                .await;
        }
        drop(store);
        let cap = 3 * entry_size("k0", "v", 1000);
        let store = DiskStore::open(dir.path(), cap).unwrap();
        assert_eq!(store.entry_count(), 3);
        assert!(store.used_bytes() <= cap);
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    /// `key=length` of every metadata entry (NUL shown as `/`).
    async fn scan(store: &DiskStore) -> Vec<String> {
        let mut found = store
            .scan_metas(|key, data| Some(format!("{}={}", key.replace('\0', "/"), data.len())))
            .await;
        found.sort();
        found
    }

    #[tokio::test]
    async fn scan_metas_reads_only_metadata_entries_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
            store.put("a\0meta", None, Bytes::from_static(b"aa")).await;
            store
                .put("a\0chunk\x000", Some("v"), Bytes::from(vec![1u8; 100]))
                .await;
            store.put("b\0meta", None, Bytes::from_static(b"bbb")).await;
            store.put("whole", None, Bytes::from_static(b"w")).await;
            assert_eq!(scan(&store).await, ["a/meta=2", "b/meta=3"]);
        }
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            scan(&store).await,
            ["a/meta=2", "b/meta=3"],
            "roles rebuilt at open"
        );
        // A corrupt metadata file is skipped and deleted, as a read would.
        let path = entry_path(&store, "b\0meta");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(scan(&store).await, ["a/meta=2"]);
        assert!(!path.exists());
        store.remove_object("a").await;
        assert!(scan(&store).await.is_empty());
        assert_eq!(store.object_count(), 1, "the whole-key entry stays");
    }

    #[tokio::test]
    async fn corrupt_data_byte_is_a_miss_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store
            .put("k", Some("v"), Bytes::from(vec![7u8; 4096]))
            .await;
        let path = entry_path(&store, "k");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(store.get("k", Some("v")).await, None);
        assert!(!path.exists());
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.used_bytes(), 0);
    }

    #[tokio::test]
    async fn corrupt_header_byte_is_a_miss_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store
            .put("key", Some("validator"), Bytes::from(vec![7u8; 100]))
            .await;
        let path = entry_path(&store, "key");
        let mut bytes = fs::read(&path).unwrap();
        bytes[PREFIX_LEN + 1] ^= 0x20; // inside the key
        fs::write(&path, &bytes).unwrap();
        assert_eq!(store.get("key", Some("validator")).await, None);
        assert!(!path.exists());
        assert_eq!(store.entry_count(), 0);
    }

    #[tokio::test]
    async fn truncated_file_is_a_miss_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store
            .put("k", Some("v"), Bytes::from(vec![7u8; 4096]))
            .await;
        let path = entry_path(&store, "k");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(2000).unwrap();
        drop(f);
        assert_eq!(store.get("k", Some("v")).await, None);
        assert!(!path.exists());
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.used_bytes(), 0);
    }

    #[tokio::test]
    async fn a_file_deleted_behind_our_back_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store.put("k", Some("v"), Bytes::from_static(b"x")).await;
        fs::remove_file(entry_path(&store, "k")).unwrap();
        assert_eq!(store.get("k", Some("v")).await, None);
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.used_bytes(), 0);
    }

    #[tokio::test]
    async fn bad_entries_are_deleted_and_foreign_files_left_alone_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        store
            .put("good", Some("v"), Bytes::from_static(b"good data"))
            .await;
        store
            .put("moved", Some("v"), Bytes::from_static(b"moved data"))
            .await;
        let good = entry_path(&store, "good");
        let moved = entry_path(&store, "moved");
        drop(store);

        let hex = blake3::hash(b"some other key").to_hex();
        let sub = dir.path().join(&hex[..2]).join(&hex[2..4]);
        fs::create_dir_all(&sub).unwrap();
        let garbage = sub.join(hex.as_str());
        fs::write(&garbage, b"\x00\x01 definitely not an entry").unwrap();
        let empty = sub.join("0000");
        fs::write(&empty, b"").unwrap();
        let stray = dir.path().join(&hex[..2]).join("stray.txt");
        fs::write(&stray, b"stray").unwrap();
        // A valid entry at another key's path is deleted too.
        let misplaced = sub.join("ffff");
        fs::copy(&moved, &misplaced).unwrap();
        // A long header claiming a huge key: rejected without allocating it.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let huge_path = sub.join("eeee");
        fs::write(&huge_path, &huge).unwrap();
        // Not ours: left alone.
        let unrelated = dir.path().join("README");
        fs::write(&unrelated, b"hands off").unwrap();

        // A symbolic link in the tree, to a file outside it.
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        fs::write(&target, b"precious").unwrap();
        let link = sub.join("dddd");
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        // Ours (they start with the entry magic) but bad: deleted.
        for p in [&misplaced, &huge_path] {
            assert!(!p.exists(), "{} should be deleted", p.display());
        }
        // Not ours: left exactly as they were.
        for (p, content) in [
            (&garbage, &b"\x00\x01 definitely not an entry"[..]),
            (&empty, &b""[..]),
            (&stray, &b"stray"[..]),
            (&unrelated, &b"hands off"[..]),
        ] {
            assert_eq!(fs::read(p).unwrap(), content, "{} untouched", p.display());
        }
        assert!(fs::symlink_metadata(&link).is_ok(), "the link is left");
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert!(good.exists() && moved.exists());
        assert_eq!(store.entry_count(), 2);
        assert_eq!(
            store.get("good", Some("v")).await.as_deref(),
            Some(&b"good data"[..])
        );
        assert_eq!(
            store.get("moved", Some("v")).await.as_deref(),
            Some(&b"moved data"[..])
        );
        let foreign = [&garbage, &empty, &stray, &unrelated]
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum::<u64>();
        assert_eq!(disk_bytes(dir.path()), store.used_bytes() + foreign);
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("notes.txt");
        fs::write(&top, b"mine").unwrap();
        let nested = dir.path().join("ab").join("cd");
        fs::create_dir_all(&nested).unwrap();
        fs::write(dir.path().join("ab").join("x"), b"one").unwrap();
        fs::write(nested.join("y"), b"two").unwrap();
        for _ in 0..2 {
            let err = DiskStore::open(dir.path(), 1 << 20)
                .unwrap_err()
                .to_string();
            assert!(err.contains("not empty") && err.contains(MARKER), "{err}");
            assert!(check_dir(dir.path()).is_err());
        }
        assert_eq!(fs::read(&top).unwrap(), b"mine");
        assert_eq!(fs::read(dir.path().join("ab").join("x")).unwrap(), b"one");
        assert_eq!(fs::read(nested.join("y")).unwrap(), b"two");
        assert!(!dir.path().join(MARKER).exists(), "nothing written");
    }

    #[test]
    fn a_file_or_another_format_is_refused_an_empty_or_new_directory_is_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(check_dir(&file).unwrap_err().contains("not a directory"));
        assert!(DiskStore::open(&file, 1 << 20).is_err());

        let fresh = dir.path().join("new");
        assert!(check_dir(&fresh).is_ok());
        DiskStore::open(&fresh, 1 << 20).unwrap();
        assert_eq!(fs::read_to_string(fresh.join(MARKER)).unwrap(), MARKER_TEXT);
        // Marked: opens again, with foreign files added since left alone.
        fs::write(fresh.join("later.txt"), b"later").unwrap();
        DiskStore::open(&fresh, 1 << 20).unwrap();
        assert_eq!(fs::read(fresh.join("later.txt")).unwrap(), b"later");

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        DiskStore::open(&empty, 1 << 20).unwrap();
        assert!(empty.join(MARKER).exists());

        fs::write(empty.join(MARKER), "edgeslice disk cache\nformat 9\n").unwrap();
        assert!(check_dir(&empty).unwrap_err().contains("another format"));
    }

    #[tokio::test]
    async fn recently_read_entries_survive_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let one = entry_size("k00", "v", 1000);
        let store = DiskStore::open(dir.path(), 4 * one).unwrap();
        for i in 0..4 {
            store
                .put(
                    &format!("k{i:02}"),
                    Some("v"),
                    Bytes::from(vec![i as u8; 1000]),
                )
                .await;
        }
        assert_eq!(store.used_bytes(), 4 * one);
        assert!(store.get("k00", Some("v")).await.is_some());
        store
            .put("k04", Some("v"), Bytes::from(vec![4u8; 1000]))
            .await;
        assert!(store.contains("k00", Some("v")), "recently read entry kept");
        assert!(
            !store.contains("k01", Some("v")),
            "least recently used entry evicted"
        );
        assert!(!entry_path(&store, "k01").exists());
        for k in ["k00", "k02", "k03", "k04"] {
            assert!(store.get(k, Some("v")).await.is_some(), "{k}");
        }
        assert_eq!(store.used_bytes(), 4 * one);
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test]
    async fn capacity_is_never_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 64 * 1024;
        let store = DiskStore::open(dir.path(), cap).unwrap();
        store
            .put("hot", Some("v"), Bytes::from(vec![0xAA; 3000]))
            .await;
        let mut written = 0;
        let mut i = 0u64;
        while written < 4 * cap {
            let len = 1000 + (i as usize * 731) % 6000;
            store
                .put(
                    &format!("chunk-{i}"),
                    Some("etag"),
                    Bytes::from(vec![i as u8; len]),
                )
                .await;
            written += len as u64;
            i += 1;
            assert!(
                store.get("hot", Some("v")).await.is_some(),
                "hot entry evicted after {i} puts"
            );
            assert!(store.used_bytes() <= cap);
            assert!(disk_bytes(dir.path()) <= cap);
        }
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        // The newest entry is there, the oldest ones are gone.
        let last = format!("chunk-{}", i - 1);
        assert!(store.get(&last, Some("etag")).await.is_some());
        assert!(store.get("chunk-0", Some("etag")).await.is_none());
    }

    #[tokio::test]
    async fn an_entry_larger_than_capacity_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1000).unwrap();
        store.put("k", Some("v"), Bytes::from(vec![0u8; 100])).await;
        assert!(store.contains("k", Some("v")));
        store
            .put("k", Some("v2"), Bytes::from(vec![0u8; 1000]))
            .await;
        // Neither the new version nor the stale old one is kept.
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.get("k", Some("v")).await, None);
        assert_eq!(store.get("k", Some("v2")).await, None);
        assert_eq!(disk_bytes(dir.path()), 0);

        let store = DiskStore::open(dir.path(), 0).unwrap();
        store.put("k", None, Bytes::new()).await;
        assert_eq!(store.entry_count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_puts_of_one_key_never_tear() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path(), 1 << 24).unwrap());
        let mut tasks = Vec::new();
        for round in 0..20u8 {
            for w in 0..4u8 {
                let writer = store.clone();
                let byte = round.wrapping_mul(4).wrapping_add(w);
                tasks.push(tokio::spawn(async move {
                    let len = 10_000 + usize::from(byte) * 97;
                    writer
                        .put("same", Some("v"), Bytes::from(vec![byte; len]))
                        .await;
                }));
                let reader = store.clone();
                tasks.push(tokio::spawn(async move {
                    if let Some(data) = reader.get("same", Some("v")).await {
                        let byte = data[0];
                        assert_eq!(data.len(), 10_000 + usize::from(byte) * 97);
                        assert!(data.iter().all(|&b| b == byte), "torn entry");
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let files = files_under(dir.path());
        assert_eq!(files.len(), 1, "one file, no temp files left: {files:?}");
        assert_eq!(store.entry_count(), 1);
        assert_eq!(store.used_bytes(), files[0].1);
        let data = store.get("same", Some("v")).await.unwrap();
        assert!(data.iter().all(|&b| b == data[0]));
    }

    /// The index holds exactly the files on disk, their sizes add up to what it believes it
    /// uses, and that is within the capacity. Returns the files.
    fn assert_index_matches_files(store: &DiskStore, dir: &Path, cap: u64) -> Vec<(PathBuf, u64)> {
        let files = files_under(dir);
        assert!(store.used_bytes() <= cap);
        assert_eq!(files.len(), store.entry_count());
        assert_eq!(
            files.iter().map(|(_, l)| l).sum::<u64>(),
            store.used_bytes()
        );
        files
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn index_matches_files_after_concurrent_churn() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 20_000;
        let store = Arc::new(DiskStore::open(dir.path(), cap).unwrap());
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..60u64 {
                    let k = format!("key-{}", (w * 7 + i * 13) % 17);
                    match (w + i) % 5 {
                        0 => store.remove(&k).await,
                        1 | 2 => {
                            let _ = store.get(&k, Some("v")).await;
                        }
                        _ => {
                            let len = 500 + ((w * 31 + i * 17) % 3000) as usize;
                            store
                                .put(&k, Some("v"), Bytes::from(vec![i as u8; len]))
                                .await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let files = assert_index_matches_files(&store, dir.path(), cap);
        for (path, _) in files {
            let bytes = fs::read(&path).unwrap();
            assert!(decode_entry(&bytes).is_ok(), "{}", path.display());
        }
    }

    const ENOSPC: i32 = 28;

    fn meta_key(object: &str) -> String {
        format!("{object}\0meta")
    }

    fn chunk_key(object: &str, i: u64) -> String {
        format!("{object}\0chunk\0{i}")
    }

    /// Metadata first, then `chunks` chunks of `len` bytes: the order the chunk cache writes.
    async fn put_object(store: &DiskStore, object: &str, chunks: u64, len: usize) {
        store
            .put(&meta_key(object), None, Bytes::from_static(b"meta"))
            .await;
        for i in 0..chunks {
            store
                .put(
                    &chunk_key(object, i),
                    Some("v"),
                    Bytes::from(vec![i as u8; len]),
                )
                .await;
        }
    }

    /// How many of the object's entries (metadata, chunks) the index holds.
    fn held(store: &DiskStore, object: &str, chunks: u64) -> (bool, u64) {
        let meta = store.contains(&meta_key(object), None);
        let parts = (0..chunks)
            .filter(|&i| store.contains(&chunk_key(object, i), Some("v")))
            .count() as u64;
        (meta, parts)
    }

    fn object_size(object: &str, chunks: u64, len: usize) -> u64 {
        entry_size(&meta_key(object), "", 4)
            + (0..chunks)
                .map(|i| entry_size(&chunk_key(object, i), "v", len))
                .sum::<u64>()
    }

    #[test]
    fn entry_keys_of_the_chunk_cache_group_by_object() {
        let key = crate::cache::key::ObjectKey("origin|host|/a/b?x=1".into());
        for entry in [key.meta_entry(), key.chunk_entry(0), key.chunk_entry(12345)] {
            assert_eq!(object_of(&entry), key.as_str());
            assert_eq!(object_bytes(entry.as_bytes()), key.as_str().as_bytes());
        }
        assert_eq!(role_of(key.meta_entry().as_bytes()), Role::Meta);
        assert_eq!(role_of(key.chunk_entry(7).as_bytes()), Role::Part);
        assert_eq!(role_of(b"plain"), Role::Whole);
        assert_eq!(role_of(b"o\0metadata"), Role::Part);
        assert_eq!(object_of("plain"), "plain");
    }

    #[tokio::test]
    async fn eviction_removes_whole_objects_never_metadata_before_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (chunks, len) = (4, 1000);
        let one = object_size("obj-0", chunks, len);
        // Room for three objects and a bit, not four.
        let store = DiskStore::open(dir.path(), 3 * one + one / 2).unwrap();
        for n in 0..8 {
            put_object(&store, &format!("obj-{n}"), chunks, len).await;
            for m in 0..=n {
                let (meta, parts) = held(&store, &format!("obj-{m}"), chunks);
                assert!(
                    meta || parts == 0,
                    "obj-{m} has {parts} chunks without metadata after obj-{n}"
                );
                assert!(parts == 0 || parts == chunks || m == n, "obj-{m} torn");
            }
        }
        // The three most recent, whole; the rest gone, files and all.
        for n in 0..5 {
            assert_eq!(held(&store, &format!("obj-{n}"), chunks), (false, 0));
        }
        for n in 5..8 {
            assert_eq!(held(&store, &format!("obj-{n}"), chunks), (true, chunks));
        }
        assert_eq!(store.object_count(), 3);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());

        // Reading one chunk of the oldest object makes the whole object recent, its metadata
        // included: the next object evicts obj-6 instead.
        assert!(store.get(&chunk_key("obj-5", 2), Some("v")).await.is_some());
        put_object(&store, "obj-8", chunks, len).await;
        assert_eq!(held(&store, "obj-5", chunks), (true, chunks));
        assert_eq!(held(&store, "obj-6", chunks), (false, 0));
        assert_eq!(held(&store, "obj-7", chunks), (true, chunks));
        assert_eq!(held(&store, "obj-8", chunks), (true, chunks));
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test]
    async fn the_index_is_bounded_in_memory_by_evicting_whole_objects() {
        let dir = tempfile::tempdir().unwrap();
        // Objects of a metadata entry and two one-byte chunks: 3 entries and 1 object each,
        // 1,320 bytes of index for about 200 bytes of files.
        let per_object = 3 * INDEX_ENTRY_BYTES + INDEX_OBJECT_BYTES;
        let index_capacity = 20 * per_object + per_object / 2;
        let store = loaded(DiskStore::open_bounded(dir.path(), 1 << 30, index_capacity).unwrap());
        assert_eq!(store.index_capacity(), index_capacity);
        for n in 0..200 {
            put_object(&store, &format!("obj-{n}"), 2, 1).await;
            assert!(
                store.index_bytes() <= index_capacity,
                "{} bytes of index after obj-{n}",
                store.index_bytes()
            );
        }
        // The bytes were never the limit: the index was. The 20 most recent objects, whole.
        assert!(store.used_bytes() < 1 << 20);
        assert_eq!(store.object_count(), 20);
        assert_eq!(store.index_bytes(), 20 * per_object);
        for n in 0..180 {
            assert_eq!(held(&store, &format!("obj-{n}"), 2), (false, 0), "obj-{n}");
        }
        for n in 180..200 {
            assert_eq!(held(&store, &format!("obj-{n}"), 2), (true, 2), "obj-{n}");
        }
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
        drop(store);

        // Reopened with a smaller index: the most recent objects that fit.
        let store = loaded(DiskStore::open_bounded(dir.path(), 1 << 30, 5 * per_object).unwrap());
        assert_eq!(store.object_count(), 5);
        assert!(store.index_bytes() <= 5 * per_object);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
    }

    #[test]
    fn small_data_read_from_disk_does_not_keep_its_files_header() {
        // 4 bytes behind an 8 KiB header (a long key): copied out, so the 8 KiB buffer goes.
        let buf = vec![0u8; 8004];
        let base = buf.as_ptr() as usize;
        let small = exact_data(buf, 8000..8004);
        assert_eq!(small.len(), 4);
        assert_ne!(small.as_ptr() as usize, base + 8000, "copied out");
        // A large chunk behind a small header: a slice of the buffer, no copy.
        let buf = vec![7u8; 100_000];
        let base = buf.as_ptr() as usize;
        let big = exact_data(buf, 100..100_000);
        assert_eq!(big.len(), 99_900);
        assert_eq!(big.as_ptr() as usize, base + 100, "sliced in place");
    }

    #[tokio::test]
    async fn after_a_restart_the_most_recent_objects_are_kept_and_orphans_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        put_object(&store, "old", 3, 500).await;
        put_object(&store, "new", 3, 500).await;
        // An orphan: chunks of an object whose metadata entry is missing (a fill cut short).
        for i in 0..3 {
            store
                .put(
                    &chunk_key("orphan", i),
                    Some("v"),
                    Bytes::from(vec![9u8; 500]),
                )
                .await;
        }
        // A lone metadata entry and a plain key are objects too, never orphans.
        store
            .put(&meta_key("meta-only"), None, Bytes::from_static(b"m"))
            .await;
        store
            .put("plain", Some("v"), Bytes::from_static(b"p"))
            .await;
        let orphan_files: Vec<_> = (0..3)
            .map(|i| entry_path(&store, &chunk_key("orphan", i)))
            .collect();
        // Recency at open is the newest member's mtime: "new" has the oldest metadata file of
        // the two but the newest file of all (its chunk 1), so it is the more recent object.
        let t0 = std::time::SystemTime::now() - Duration::from_secs(3600);
        let set = |key: &str, secs: u64| {
            let f = File::options()
                .write(true)
                .open(entry_path(&store, key))
                .unwrap();
            f.set_modified(t0 + Duration::from_secs(secs)).unwrap();
        };
        set(&meta_key("new"), 10); // "new": metadata old, but one chunk newest of all
        for i in 0..3 {
            set(&chunk_key("new", i), 20);
            set(&chunk_key("old", i), 50);
        }
        set(&chunk_key("new", 1), 100);
        set(&meta_key("old"), 60);
        set(&meta_key("meta-only"), 1);
        set("plain", 2);
        let one = object_size("new", 3, 500);
        let tiny = entry_size(&meta_key("meta-only"), "", 1) + entry_size("plain", "v", 1);
        drop(store);

        // Reopen with room for what is left: "old" (newest member at 60) is older than "new"
        // (newest member at 100); the tiny ones are older still.
        let store = DiskStore::open(dir.path(), 2 * one + tiny).unwrap();
        for f in &orphan_files {
            assert!(!f.exists(), "orphan {} deleted", f.display());
        }
        assert_eq!(held(&store, "orphan", 3), (false, 0));
        assert_eq!(held(&store, "new", 3), (true, 3));
        assert_eq!(held(&store, "old", 3), (true, 3));
        assert_eq!(store.object_count(), 4);
        store
            .put(&meta_key("third"), None, Bytes::from(vec![0u8; 600]))
            .await;
        // Evicted oldest first: the tiny ones, then "old"; "new" stays whole.
        assert!(!store.contains("plain", Some("v")));
        assert!(!store.contains(&meta_key("meta-only"), None));
        assert_eq!(held(&store, "old", 3), (false, 0));
        assert_eq!(held(&store, "new", 3), (true, 3));
        assert_eq!(
            store.get(&chunk_key("new", 2), Some("v")).await.as_deref(),
            Some(&[2u8; 500][..])
        );
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test]
    async fn remove_object_removes_every_member_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        put_object(&store, "a", 5, 100).await;
        put_object(&store, "ab", 2, 100).await; // a prefix of its name is another object
                                                // A chunk of another version of "a" is a member too.
        store
            .put(&chunk_key("a", 9), Some("old"), Bytes::from_static(b"x"))
            .await;
        let files: Vec<_> = (0..5)
            .map(|i| entry_path(&store, &chunk_key("a", i)))
            .chain([entry_path(&store, &meta_key("a"))])
            .collect();
        store.remove_object("a").await;
        assert_eq!(held(&store, "a", 5), (false, 0));
        assert!(!store.contains(&chunk_key("a", 9), Some("old")));
        assert!(files.iter().all(|f| !f.exists()));
        assert_eq!(held(&store, "ab", 2), (true, 2));
        assert_eq!(store.object_count(), 1);
        store.remove_object("a").await; // absent: nothing to do
        store.remove_object("nothing").await;
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
        assert_eq!(files_under(dir.path()).len(), 3);
    }

    #[test]
    fn warn_limiter_reports_once_per_period_per_cause_and_counts_the_rest() {
        let mut w = WarnLimiter::new(Duration::from_secs(10));
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_millis(s);
        assert_eq!(w.check("no space", at(0)), Some(0));
        assert_eq!(w.check("no space", at(1)), None);
        assert_eq!(
            w.check("I/O error", at(2)),
            Some(0),
            "causes are independent"
        );
        for ms in 3..1000 {
            assert_eq!(w.check("no space", at(ms)), None);
        }
        assert_eq!(w.check("no space", at(9_999)), None);
        assert_eq!(w.check("no space", at(10_000)), Some(999));
        assert_eq!(w.check("no space", at(10_001)), None);
        assert_eq!(w.check("no space", at(30_000)), Some(1));
    }

    #[tokio::test]
    async fn a_failing_disk_pauses_reclaims_counts_and_warns_rarely() {
        let dir = tempfile::tempdir().unwrap();
        let pause = Duration::from_millis(300);
        let store = loaded(DiskStore::open_with(dir.path(), 1 << 20, 16 << 20, pause).unwrap());
        for n in 0..10 {
            put_object(&store, &format!("obj-{n}"), 2, 1000).await;
        }
        let used = store.used_bytes();
        store.shared.faults.fail_writes_with(ENOSPC);
        store
            .put(
                &chunk_key("new", 0),
                Some("v"),
                Bytes::from(vec![1u8; 1000]),
            )
            .await;
        assert_eq!(store.write_errors(), 1);
        assert!(!store.contains(&chunk_key("new", 0), Some("v")));
        // Reclaimed down to 90% of what it used, oldest objects first, whole.
        assert!(
            store.used_bytes() <= used / 10 * 9,
            "{used} -> {}",
            store.used_bytes()
        );
        assert_eq!(held(&store, "obj-0", 2), (false, 0));
        assert_eq!(held(&store, "obj-9", 2), (true, 2));
        // No temp file left behind; the index matches the files.
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());

        // Paused: writes are skipped without touching the disk, and counted.
        for i in 0..50 {
            store
                .put(&chunk_key("new", i), Some("v"), Bytes::from(vec![1u8; 10]))
                .await;
            assert!(!store.put_in_background(
                chunk_key("bg", i),
                Some("v"),
                Bytes::from_static(b"x")
            ));
        }
        assert_eq!(store.write_errors(), 1);
        assert_eq!(store.writes_skipped(), 100);
        // Reads go on.
        assert!(store.get(&chunk_key("obj-9", 1), Some("v")).await.is_some());

        // After the pause the tier tries again: still failing, counted; one warning so far.
        tokio::time::sleep(pause + Duration::from_millis(50)).await;
        for round in 0..3 {
            store
                .put(
                    &chunk_key("again", round),
                    Some("v"),
                    Bytes::from(vec![1u8; 10]),
                )
                .await;
            tokio::time::sleep(pause + Duration::from_millis(50)).await;
        }
        assert_eq!(store.write_errors(), 4);
        assert_eq!(
            store.shared.faults.warnings(),
            1,
            "one warning per cause per {WARN_EVERY:?}"
        );
        assert_eq!(files_under(dir.path()).len(), store.entry_count());

        // The disk recovers: writes succeed again.
        store.shared.faults.fail_writes_with(0);
        store
            .put(
                &chunk_key("new", 0),
                Some("v"),
                Bytes::from(vec![1u8; 1000]),
            )
            .await;
        assert!(store.contains(&chunk_key("new", 0), Some("v")));
        assert_eq!(store.write_errors(), 4);
    }

    #[tokio::test]
    async fn a_read_only_disk_evicts_nothing_keeps_serving_and_resumes_after_a_probe() {
        const EROFS: i32 = 30;
        let dir = tempfile::tempdir().unwrap();
        let pause = Duration::from_millis(200);
        let store = loaded(DiskStore::open_with(dir.path(), 1 << 20, 16 << 20, pause).unwrap());
        for n in 0..10 {
            put_object(&store, &format!("obj-{n}"), 2, 1000).await;
        }
        let (used, entries) = (store.used_bytes(), store.entry_count());
        assert_eq!(
            WriteFailure::of(&io::Error::from_raw_os_error(EROFS)),
            WriteFailure::NotWritable
        );
        assert_eq!(
            WriteFailure::of(&io::Error::from_raw_os_error(ENOSPC)),
            WriteFailure::NoRoom
        );
        assert_eq!(
            WriteFailure::of(&io::Error::from_raw_os_error(122)),
            WriteFailure::NoRoom
        ); // EDQUOT
        for code in [13, 1, 5] {
            // EACCES, EPERM, EIO
            assert_eq!(
                WriteFailure::of(&io::Error::from_raw_os_error(code)),
                WriteFailure::NotWritable
            );
        }

        // The file system goes read-only: writes and deletions fail.
        store.shared.faults.fail_writes_with(EROFS);
        store.shared.faults.fail_deletes_with(EROFS);
        for round in 0..5u64 {
            store
                .put(
                    &chunk_key("new", round),
                    Some("v"),
                    Bytes::from(vec![1u8; 1000]),
                )
                .await;
            tokio::time::sleep(pause + Duration::from_millis(30)).await;
        }
        assert!(!store.is_writable());
        // One failed write, then one failed probe per pause: every failure counted...
        assert_eq!(store.write_errors(), 1);
        assert_eq!(store.writes_skipped(), 4);
        // ...and nothing evicted: every object is still indexed and served.
        assert_eq!((store.used_bytes(), store.entry_count()), (used, entries));
        for n in 0..10 {
            let object = format!("obj-{n}");
            assert_eq!(held(&store, &object, 2), (true, 2), "{object}");
            let chunk = store.get(&chunk_key(&object, 1), Some("v")).await;
            assert_eq!(chunk.as_deref(), Some(&[1u8; 1000][..]), "{object}");
        }
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());

        // A new version of an entry cannot be written: the old one leaves the index (it must
        // never be served as the newer one) although its file cannot be deleted yet.
        tokio::time::sleep(pause + Duration::from_millis(30)).await;
        store
            .put(&meta_key("obj-3"), None, Bytes::from_static(b"meta v2"))
            .await;
        assert!(!store.contains(&meta_key("obj-3"), None));
        assert!(store.get(&meta_key("obj-3"), None).await.is_none());
        assert_eq!(store.untracked_files(), 1);
        assert_eq!(files_under(dir.path()).len(), store.entry_count() + 1);

        // Writable again: the next write probes, resumes, and the untracked file goes.
        store.shared.faults.fail_writes_with(0);
        store.shared.faults.fail_deletes_with(0);
        tokio::time::sleep(pause + Duration::from_millis(30)).await;
        store
            .put(
                &chunk_key("new", 0),
                Some("v"),
                Bytes::from(vec![7u8; 1000]),
            )
            .await;
        assert!(store.is_writable());
        assert!(store.contains(&chunk_key("new", 0), Some("v")));
        assert_eq!(store.untracked_files(), 0);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test]
    async fn past_the_untracked_bound_the_tree_is_swept_when_writable_again() {
        const EROFS: i32 = 30;
        let dir = tempfile::tempdir().unwrap();
        let pause = Duration::from_millis(100);
        let store = loaded(DiskStore::open_with(dir.path(), 1 << 30, 1 << 30, pause).unwrap());
        let n = MAX_UNTRACKED as u64 + 10;
        for i in 0..n {
            store
                .put(&chunk_key("o", i), Some("v"), Bytes::from_static(b"x"))
                .await;
        }
        store.shared.faults.fail_deletes_with(EROFS);
        store.remove_object("o").await;
        assert_eq!(store.entry_count(), 0);
        assert_eq!(
            store.untracked_files(),
            MAX_UNTRACKED + 1,
            "bounded, then a sweep"
        );
        assert_eq!(files_under(dir.path()).len() as u64, n);
        // A write fails as not writable; the probe after the pause succeeds and sweeps.
        store.shared.faults.fail_writes_with(EROFS);
        store
            .put(&chunk_key("p", 0), Some("v"), Bytes::from_static(b"y"))
            .await;
        assert!(!store.is_writable());
        store.shared.faults.fail_writes_with(0);
        store.shared.faults.fail_deletes_with(0);
        tokio::time::sleep(pause + Duration::from_millis(30)).await;
        store
            .put(&chunk_key("p", 0), Some("v"), Bytes::from_static(b"y"))
            .await;
        assert!(store.is_writable());
        assert_eq!(store.untracked_files(), 0);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(store.entry_count(), 1);
    }

    #[test]
    fn the_write_queue_admits_within_its_bounds() {
        let mut p = Pending::default();
        // One write larger than the byte bound is admitted when nothing is pending...
        assert!(p.try_admit(100, 3, 50));
        // ...but nothing else until it is done.
        assert!(!p.try_admit(1, 3, 50));
        p.release(100);
        assert_eq!(p, Pending::default());
        assert!(p.try_admit(20, 3, 50));
        assert!(p.try_admit(30, 3, 50));
        assert!(!p.try_admit(1, 3, 50), "byte bound");
        p.release(30);
        assert!(p.try_admit(10, 3, 50));
        assert!(p.try_admit(10, 3, 50));
        assert!(!p.try_admit(0, 3, 50), "count bound");
        assert_eq!(
            p,
            Pending {
                writes: 3,
                bytes: 40
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_writes_past_the_bound_are_skipped_and_drain_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 26).unwrap();
        // A disk that does not keep up: the writes wait at the gate.
        store.shared.faults.write_gate.set(true);
        for i in 0..WRITE_QUEUE_WRITES as u64 {
            assert!(store.put_in_background(
                chunk_key("o", i),
                Some("v"),
                Bytes::from_static(b"data")
            ));
        }
        assert_eq!(store.pending_writes(), WRITE_QUEUE_WRITES);
        assert!(!store.put_in_background(
            chunk_key("o", 999),
            Some("v"),
            Bytes::from_static(b"data")
        ));
        assert_eq!(store.writes_skipped(), 1);
        assert!(
            !store.drain(Duration::from_millis(100)).await,
            "still pending"
        );
        store.shared.faults.write_gate.set(false);
        assert!(store.drain(Duration::from_secs(10)).await);
        assert_eq!(store.pending_writes(), 0);
        assert_eq!(store.entry_count(), WRITE_QUEUE_WRITES);
        assert!(!store.contains(&chunk_key("o", 999), Some("v")));
        assert_eq!(
            store.get(&chunk_key("o", 3), Some("v")).await.as_deref(),
            Some(&b"data"[..])
        );
        assert!(store.drain(Duration::ZERO).await, "empty: returns at once");
        // The byte bound: a write that would take the queue past it is skipped.
        store.shared.faults.write_gate.set(true);
        let big = Bytes::from(vec![0u8; (WRITE_QUEUE_BYTES / 2) as usize]);
        assert!(store.put_in_background("big-1".into(), Some("v"), big.clone()));
        assert!(store.put_in_background("big-2".into(), Some("v"), big.clone()));
        assert!(!store.put_in_background("big-3".into(), Some("v"), Bytes::from_static(b"x")));
        assert_eq!(store.writes_skipped(), 2);
        store.shared.faults.write_gate.set(false);
        assert!(store.drain(Duration::from_secs(10)).await);
        assert!(store.contains("big-2", Some("v")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn objects_stay_whole_and_the_index_matches_files_under_concurrent_churn() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 60_000;
        let store = Arc::new(DiskStore::open(dir.path(), cap).unwrap());
        let mut tasks = Vec::new();
        for w in 0..6u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..40u64 {
                    let object = format!("obj-{}", (w * 5 + i * 7) % 11);
                    match (w + i) % 6 {
                        0 => store.remove_object(&object).await,
                        1 => {
                            let _ = store.get(&chunk_key(&object, i % 4), Some("v")).await;
                        }
                        2 => {
                            store.put_in_background(
                                chunk_key(&object, i % 4),
                                Some("v"),
                                Bytes::from(vec![i as u8; 700]),
                            );
                        }
                        _ => put_object(&store, &object, 4, 1500).await,
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(store.drain(Duration::from_secs(10)).await);
        assert_index_matches_files(&store, dir.path(), cap);
        // A reopen finds the same files, minus orphans, and never more than it had.
        let entries = store.entry_count();
        drop(store);
        let store = DiskStore::open(dir.path(), cap).unwrap();
        assert!(store.entry_count() <= entries);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        for n in 0..11 {
            let (meta, parts) = held(&store, &format!("obj-{n}"), 4);
            assert!(
                meta || parts == 0,
                "obj-{n}: {parts} chunks without metadata"
            );
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let bytes = encode(b"key", b"etag", b"payload");
        let (h, range) = decode_entry(&bytes).unwrap();
        assert_eq!(h.key, b"key");
        assert_eq!(h.validator, b"etag");
        assert_eq!(h.data_len, 7);
        assert_eq!(&bytes[range], b"payload");
        let scanned = read_header_from(&mut &bytes[..], bytes.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(
            scanned,
            ScannedHeader {
                key: b"key".to_vec(),
                validator: b"etag".to_vec()
            }
        );
        assert!(encode_header(&vec![b'k'; MAX_NAME_LEN + 1], b"", b"").is_none());
        // A header longer than the scan's first read is still read.
        let long_key = vec![b'k'; 10_000];
        let bytes = encode(&long_key, b"v", b"d");
        let scanned = read_header_from(&mut &bytes[..], bytes.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(scanned.key, long_key);
        // The scan checks the declared data length against the file size.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read_header_from(&mut &longer[..], longer.len() as u64)
            .unwrap()
            .is_err());
        assert!(read_header_from(&mut &bytes[..], bytes.len() as u64 - 1)
            .unwrap()
            .is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoding_random_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            valid_prefix in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if valid_prefix {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
                b.extend_from_slice(&bytes);
                bytes = b;
            }
            let _ = parse_header(&bytes);
            prop_assert!(decode_entry(&bytes).is_err());
            let _ = read_header_from(&mut &bytes[..], bytes.len() as u64);
            let _ = read_header_from(&mut &bytes[..], u64::MAX);
        }

        #[test]
        fn any_single_byte_change_or_truncation_is_detected(
            key in proptest::collection::vec(any::<u8>(), 0..64),
            validator in proptest::collection::vec(any::<u8>(), 0..32),
            data in proptest::collection::vec(any::<u8>(), 0..512),
            pos in any::<usize>(),
            flip in 1u8..=255,
            cut in any::<usize>(),
        ) {
            let bytes = encode(&key, &validator, &data);
            let (h, range) = decode_entry(&bytes).unwrap();
            prop_assert_eq!(h.key, &key[..]);
            prop_assert_eq!(h.validator, &validator[..]);
            prop_assert_eq!(&bytes[range], &data[..]);

            let mut changed = bytes.clone();
            let pos = pos % changed.len();
            changed[pos] ^= flip;
            prop_assert!(decode_entry(&changed).is_err());

            let cut = cut % bytes.len();
            prop_assert!(decode_entry(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(decode_entry(&longer).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn random_file_contents_never_panic_and_only_ours_are_deleted(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
                store.put("a", Some("v"), Bytes::from_static(b"valid")).await;
                store.put("b", Some("v"), Bytes::from_static(b"valid")).await;
                // Read path: the indexed file's contents replaced by random bytes.
                let path_a = entry_path(&store, "a");
                fs::write(&path_a, &bytes).unwrap();
                assert_eq!(store.get("a", Some("v")).await, None);
                // Deleted only if it still starts with the entry magic (ours); else left alone.
                assert_eq!(path_a.exists(), !bytes.starts_with(&MAGIC));
                // Scan path: the same bytes found at open.
                let path_b = entry_path(&store, "b");
                drop(store);
                fs::write(&path_b, &bytes).unwrap();
                let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
                assert_eq!(store.entry_count(), 0);
                assert_eq!(path_b.exists(), !bytes.starts_with(&MAGIC));
            });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_index_loads_reads_puts_and_removes_are_right() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
            for n in 0..10 {
                put_object(&store, &format!("obj-{n}"), 2, 1000).await;
            }
            // Chunks without their metadata: a fill cut short.
            store
                .put(
                    &chunk_key("orphan", 0),
                    Some("v"),
                    Bytes::from(vec![9u8; 10]),
                )
                .await;
            // Dropped without a snapshot: a crash.
        }
        let store =
            DiskStore::open_unloaded(dir.path(), 1 << 30, 1 << 30, WRITE_ERROR_PAUSE).unwrap();
        store.shared.faults.load_gate.set(true);
        load::start(&store.shared).unwrap();
        assert!(store.is_loading());
        assert_eq!(store.entry_count(), 0);
        assert!(
            store.save_snapshot().is_err(),
            "no snapshot of a partial index"
        );
        // A key the index does not hold yet is read from its file: exact bytes, then indexed.
        assert!(!store.contains(&chunk_key("obj-0", 1), Some("v")));
        let got = store.get(&chunk_key("obj-0", 1), Some("v")).await;
        assert_eq!(got.as_deref(), Some(&[1u8; 1000][..]));
        assert!(store.contains(&chunk_key("obj-0", 1), Some("v")));
        // Another version, or a key never stored: a miss, never other bytes.
        assert_eq!(store.get(&chunk_key("obj-1", 1), Some("w")).await, None);
        assert_eq!(store.get(&chunk_key("none", 0), Some("v")).await, None);
        // A put meanwhile is indexed, and the load keeps it (it is newer than the load).
        store
            .put(
                &chunk_key("obj-2", 0),
                Some("v2"),
                Bytes::from_static(b"new"),
            )
            .await;
        // Removes of keys not indexed yet delete their files: the load cannot bring them back.
        store.remove(&chunk_key("obj-3", 0)).await;
        store.remove_object("obj-4").await;
        store.shared.faults.load_gate.set(false);
        store.wait_loaded();
        assert!(!store.is_loading());
        assert!(!store.loaded_from_snapshot());
        let got = store.get(&chunk_key("obj-2", 0), Some("v2")).await;
        assert_eq!(got.as_deref(), Some(&b"new"[..]));
        assert!(!store.contains(&chunk_key("obj-2", 0), Some("v")));
        assert_eq!(held(&store, "obj-3", 2), (true, 1));
        // Its metadata gone, obj-4's chunks were orphans: deleted with the cut fill's.
        assert_eq!(held(&store, "obj-4", 2), (false, 0));
        assert_eq!(held(&store, "orphan", 1), (false, 0));
        for n in [0, 1, 5, 6, 7, 8, 9] {
            assert_eq!(held(&store, &format!("obj-{n}"), 2), (true, 2), "obj-{n}");
        }
        // 31 files; 2 deleted meanwhile, 2 indexed before the load reached them.
        assert_eq!(store.loaded_entries(), 31 - 2 - 2);
        assert_eq!(files_under(dir.path()).len(), store.entry_count());
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_restores_the_index_in_recency_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let (order, used, entries) = {
            let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
            for n in 0..6 {
                put_object(&store, &format!("obj-{n}"), 3, 100 + n).await;
            }
            assert!(store.get(&chunk_key("obj-1", 0), Some("v")).await.is_some());
            let order = store.shared.index().lru_order();
            store.save_snapshot().unwrap();
            assert!(dir.path().join(load::SNAPSHOT).exists());
            // Sealed: a put now would be missing from the snapshot, so none is written.
            put_object(&store, "too-late", 1, 10).await;
            assert_eq!(held(&store, "too-late", 1), (false, 0));
            (order, store.used_bytes(), store.entry_count())
        };
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        assert!(store.loaded_from_snapshot());
        assert_eq!(store.shared.index().lru_order(), order);
        assert_eq!((store.used_bytes(), store.entry_count()), (used, entries));
        assert!(!dir.path().join(load::SNAPSHOT).exists(), "trusted once");
        for n in 0..6usize {
            for i in 0..3u64 {
                let got = store
                    .get(&chunk_key(&format!("obj-{n}"), i), Some("v"))
                    .await;
                assert_eq!(
                    got.as_deref(),
                    Some(&vec![i as u8; 100 + n][..]),
                    "obj-{n} {i}"
                );
            }
        }
        drop(store);
        // That run ended without a snapshot: the next start scans, and finds the same.
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        assert!(!store.loaded_from_snapshot());
        assert_eq!((store.used_bytes(), store.entry_count()), (used, entries));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_of_an_older_generation_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let old = DiskStore::open(dir.path(), 1 << 30).unwrap();
        put_object(&old, "x", 2, 10).await;
        // A newer process opens the same directory (a graceful upgrade) and writes more...
        let new = DiskStore::open(dir.path(), 1 << 30).unwrap();
        put_object(&new, "y", 2, 10).await;
        // ...then the old one exits cleanly: it writes no snapshot (it would not know "y")...
        assert!(old.save_snapshot().is_err());
        assert!(!dir.path().join(load::SNAPSHOT).exists());
        // ...or, had it checked just before the new one opened, a snapshot of its generation,
        // which the next start does not trust. The new one crashes.
        let generation = old.shared.load.generation.unwrap();
        load::write_snapshot(
            &old.shared.index(),
            generation,
            &dir.path().join(load::SNAPSHOT),
        )
        .unwrap();
        drop(old);
        drop(new);
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        assert!(!store.loaded_from_snapshot());
        assert_eq!(held(&store, "x", 2), (true, 2));
        assert_eq!(held(&store, "y", 2), (true, 2));
        assert_eq!(disk_bytes(dir.path()), store.used_bytes());
    }

    #[test]
    fn entry_names_are_16_hex_digits_and_old_names_move_in_place() {
        let dir = tempfile::tempdir().unwrap();
        // A whole entry (an object of one): a chunk alone would be an orphan.
        let key = "moved".to_owned();
        let full = blake3::hash(key.as_bytes()).to_hex();
        let path = super::entry_path(dir.path(), hash_key(&key));
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), &full[..16]);
        assert_eq!(parse_entry_name(&full[..16]), Some(hash_key(&key)));
        assert_eq!(parse_entry_name(&full), None);
        assert_eq!(parse_entry_name("0123456789ABCDEF"), None);
        // A file at its old, full-hash name is renamed by the scan and served.
        drop(DiskStore::open(dir.path(), 1 << 30).unwrap());
        let header = encode_header(key.as_bytes(), b"v", b"data").unwrap();
        let old = path.with_file_name(full.as_str());
        fs::create_dir_all(old.parent().unwrap()).unwrap();
        fs::write(&old, [&header[..], b"data"].concat()).unwrap();
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        assert!(store.contains(&key, Some("v")));
        assert!(path.exists() && !old.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loaded_returns_once_the_load_is_over() {
        let dir = tempfile::tempdir().unwrap();
        drop(DiskStore::open(dir.path(), 1 << 30).unwrap());
        let store = Arc::new(
            DiskStore::open_unloaded(dir.path(), 1 << 30, 1 << 30, WRITE_ERROR_PAUSE).unwrap(),
        );
        store.shared.faults.load_gate.set(true);
        load::start(&store.shared).unwrap();
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.loaded().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "returned while the index loads");
        store.shared.faults.load_gate.set(false);
        waiter.await.unwrap();
        assert!(!store.is_loading());
    }

    #[test]
    fn a_snapshot_larger_than_the_index_could_be_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        drop(DiskStore::open(dir.path(), 1 << 30).unwrap());
        // Where a snapshot goes, 2 MiB of something else, with a 64 KiB index capacity.
        fs::write(dir.path().join(load::SNAPSHOT), vec![0u8; 2 << 20]).unwrap();
        let store = loaded(DiskStore::open_bounded(dir.path(), 1 << 30, 64 << 10).unwrap());
        assert!(!store.loaded_from_snapshot());
        assert!(!dir.path().join(load::SNAPSHOT).exists());
    }
}
