//! Purges of objects that live only on disk, as lazy bans (Varnish's ban list and lurker).
//!
//! A purge is answered from what is in memory at once; the objects it names that only the disk
//! tier holds are not looked for by a scan per call. The purge becomes a *ban*: "objects stored
//! at or before `at` that this purge names". From then on:
//!
//! - an object's metadata read from disk is checked against the pending bans before it is
//!   used (`ChunkCache::meta`), so a banned object is never served, whether or not anything
//!   has looked for it yet;
//! - one background pass over the disk tier's metadata (the lurker) applies every ban pending
//!   when it starts and then retires them: a hundred purges in a row cost one pass, not a
//!   hundred. Bans added during a pass wait for the next one.
//!
//! Bans are kept in a file of the disk tier's directory until retired, so a restart does not
//! bring banned objects back. They are bounded in bytes ([`MAX_BAN_BYTES`]): a purge that
//! would exceed it is refused until a pass retires some.
//!
//! Times: an object's `stored_at` is kept on disk in whole seconds, so an object stored in the
//! second of a ban, after it, may be taken by it too (fetched again once): a ban errs towards
//! purging.

use super::disk::Cursor;
use super::meta::ObjectMeta;
use super::purge::{Purge, Selector};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most bytes pending bans may take (their selectors, hosts and bookkeeping).
pub const MAX_BAN_BYTES: u64 = 1 << 20;

/// What a ban is charged besides its selector and host.
const BAN_OVERHEAD: u64 = 160;

/// One pending purge.
pub struct Ban {
    pub purge: Arc<Purge>,
    /// Objects stored at or before this are named.
    pub at: SystemTime,
    /// Objects it purged (hard) or made stale (soft) so far.
    applied: AtomicU64,
    retired: tokio::sync::watch::Sender<bool>,
}

impl Ban {
    fn new(purge: Arc<Purge>, at: SystemTime) -> Ban {
        Ban {
            purge,
            at,
            applied: AtomicU64::new(0),
            retired: tokio::sync::watch::channel(false).0,
        }
    }

    /// A ban in no list: a purge of a cache without a disk tier, applied to memory only.
    pub fn unlisted(purge: Arc<Purge>, at: SystemTime) -> Ban {
        Ban::new(purge, at)
    }

    /// Whether the ban takes this stored object (stored at or before it, and named by it).
    pub fn names(&self, key: &str, meta: &ObjectMeta) -> bool {
        meta.stored_at <= self.at && self.purge.matches(key, meta)
    }

    /// Count an object it took.
    pub fn count(&self) {
        self.applied.fetch_add(1, Ordering::Relaxed);
    }

    /// Objects it took so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Wait until a pass has applied it to every object on disk.
    pub async fn retired(&self) {
        let mut rx = self.retired.subscribe();
        // The sender lives as long as the ban: an error cannot happen while `self` is held.
        let _ = rx.wait_for(|r| *r).await;
    }

    fn bytes(&self) -> u64 {
        ban_bytes(&self.purge)
    }
}

fn ban_bytes(p: &Purge) -> u64 {
    let selector = match &p.selector {
        Selector::Path(v) | Selector::Prefix(v) => v.len(),
        Selector::Tag(t) => t.len(),
    };
    (selector + p.host.as_ref().map_or(0, String::len)) as u64 + BAN_OVERHEAD
}

/// The ban list would go over [`MAX_BAN_BYTES`].
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default)]
struct Inner {
    bans: Vec<Arc<Ban>>,
    bytes: u64,
    /// A pass is running (or about to): no second one starts.
    passing: bool,
}

/// The pending bans.
#[derive(Default)]
pub struct BanList {
    inner: Mutex<Inner>,
    /// Whether any ban is pending: read without the lock on every metadata read from disk.
    any: AtomicBool,
}

impl BanList {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere mid-update; the list is still whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a ban of `purge` at `at`, unless the list is full.
    pub fn add(&self, purge: Arc<Purge>, at: SystemTime) -> Result<Arc<Ban>, Full> {
        let ban = Arc::new(Ban::new(purge, at));
        let mut inner = self.lock();
        if inner.bytes + ban.bytes() > MAX_BAN_BYTES {
            return Err(Full);
        }
        inner.bytes += ban.bytes();
        inner.bans.push(ban.clone());
        self.any.store(true, Ordering::Release);
        Ok(ban)
    }

    /// The pending bans (none: empty, without taking the lock).
    pub fn pending(&self) -> Vec<Arc<Ban>> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.lock().bans.clone()
    }

    pub fn len(&self) -> usize {
        self.lock().bans.len()
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Claim the right to run passes: `true` for the one caller that must start them (bans
    /// are pending and no pass runs).
    pub fn claim_pass(&self) -> bool {
        let mut inner = self.lock();
        if inner.passing || inner.bans.is_empty() {
            return false;
        }
        inner.passing = true;
        true
    }

    /// The bans the next pass applies (every pending one); `None` ends the passes (nothing is
    /// pending: the claim is given up under the same lock, so a ban added after this starts
    /// its own).
    pub fn next_batch(&self) -> Option<Vec<Arc<Ban>>> {
        let mut inner = self.lock();
        if inner.bans.is_empty() {
            inner.passing = false;
            return None;
        }
        Some(inner.bans.clone())
    }

    /// Give the claim up without a pass (the pass could not run: retried by the next claim).
    pub fn release_pass(&self) {
        self.lock().passing = false;
    }

    /// A pass applied `batch` to every object on disk: retire those bans.
    pub fn retire(&self, batch: &[Arc<Ban>]) {
        let mut inner = self.lock();
        inner
            .bans
            .retain(|b| !batch.iter().any(|r| Arc::ptr_eq(b, r)));
        inner.bytes = inner.bans.iter().map(|b| b.bytes()).sum();
        self.any.store(!inner.bans.is_empty(), Ordering::Release);
        drop(inner);
        for b in batch {
            b.retired.send_replace(true);
        }
    }

    /// The pending bans as a file (see [`BanList::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let bans = self.lock().bans.clone();
        let mut out = Vec::with_capacity(64 + bans.len() * 64);
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&(bans.len() as u32).to_le_bytes());
        for b in &bans {
            let at = b.at.duration_since(UNIX_EPOCH).unwrap_or_default();
            out.extend_from_slice(&at.as_secs().to_le_bytes());
            out.extend_from_slice(&at.subsec_nanos().to_le_bytes());
            let (kind, selector) = match &b.purge.selector {
                Selector::Path(v) => (0u8, v.as_slice()),
                Selector::Prefix(v) => (1, v.as_slice()),
                Selector::Tag(t) => (2, t.as_bytes()),
            };
            out.push(kind);
            out.push(u8::from(b.purge.soft));
            put_bytes(&mut out, selector);
            match &b.purge.host {
                Some(h) => {
                    out.push(1);
                    put_bytes(&mut out, h.as_bytes());
                }
                None => out.push(0),
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// A list of the bans in `data` (a file [`BanList::encode`] wrote); `None` when it is not
    /// one (wrong magic, cut short, CRC mismatch, over the bound).
    pub fn decode(data: &[u8]) -> Option<BanList> {
        let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
        if crc32fast::hash(body).to_le_bytes() != crc {
            return None;
        }
        let mut r = Cursor::new(body.strip_prefix(FILE_MAGIC)?);
        let n = r.u32().ok()?;
        let list = BanList::default();
        for _ in 0..n {
            let secs = r.u64().ok()?;
            let nanos = r.u32().ok()?;
            let at = UNIX_EPOCH.checked_add(Duration::new(secs, nanos.min(999_999_999)))?;
            let [kind, soft] = r.array::<2>().ok()?;
            let selector = bytes(&mut r)?.to_vec();
            let host = match r.array::<1>().ok()? {
                [0] => None,
                _ => Some(String::from_utf8(bytes(&mut r)?.to_vec()).ok()?),
            };
            let selector = match kind {
                0 => Selector::Path(selector),
                1 => Selector::Prefix(selector),
                2 => Selector::Tag(String::from_utf8(selector).ok()?),
                _ => return None,
            };
            let purge = Purge {
                selector,
                host,
                soft: soft != 0,
            };
            list.add(Arc::new(purge), at).ok()?;
        }
        (r.rest() == 0).then_some(list)
    }
}

const FILE_MAGIC: &[u8; 8] = b"EDGSBAN1";

/// A u32 length prefix and that many bytes (what [`put_bytes`] wrote).
fn bytes<'a>(r: &mut Cursor<'a>) -> Option<&'a [u8]> {
    let n = r.u32().ok()?;
    r.take(n as usize).ok()
}

/// The file of pending bans in the disk tier's directory (beside its marker; not an entry).
pub const FILE: &str = "EDGESLICE-CACHE.bans";

impl BanList {
    /// The bans kept in `dir` (none if there is no file). A file that is not a whole ban list
    /// is logged and set aside (renamed `.bad`): its bans are lost, the cache is kept.
    pub fn load(dir: &std::path::Path) -> BanList {
        let path = dir.join(FILE);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BanList::default(),
            Err(e) => {
                log::error!(
                    "disk cache: cannot read {}: {e}; pending purges are lost",
                    path.display()
                );
                return BanList::default();
            }
        };
        match BanList::decode(&data) {
            Some(list) => {
                if !list.is_empty() {
                    log::info!(
                        "disk cache: {} purges still to apply to the disk tier",
                        list.len()
                    );
                }
                list
            }
            None => {
                log::error!(
                    "disk cache: {} is not a list of purges; set aside as .bad, its purges are lost",
                    path.display()
                );
                let _ = std::fs::rename(&path, path.with_extension("bans.bad"));
                BanList::default()
            }
        }
    }

    /// Write the pending bans to `dir` (a new file renamed over the old one, synced), or
    /// remove the file when none is pending. Blocking.
    pub fn save(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let path = dir.join(FILE);
        if self.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = super::disk::tmp_path(&path);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn purge(query: &str) -> Arc<Purge> {
        Arc::new(Purge::from_query(Some(query)).unwrap())
    }

    fn meta(stored_at: SystemTime, headers: Vec<(String, String)>) -> ObjectMeta {
        ObjectMeta {
            status: 200,
            size: 10,
            validator: "v".into(),
            etag: Some("\"v\"".into()),
            last_modified: None,
            headers,
            stored_at,
            initial_age: 0,
            fresh_until: stored_at + Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            stale_while_revalidate: Duration::ZERO,
            wire: Default::default(),
        }
    }

    const KEY: &str = "origin|example.com|/v/a.bin?x=1";

    #[test]
    fn a_ban_takes_objects_stored_at_or_before_it_and_named_by_it() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let list = BanList::default();
        let ban = list.add(purge("path=/v/&prefix=1"), at).unwrap();
        assert!(ban.names(KEY, &meta(at, vec![])));
        assert!(ban.names(KEY, &meta(at - Duration::from_secs(5), vec![])));
        assert!(!ban.names(KEY, &meta(at + Duration::from_millis(1), vec![])));
        assert!(!ban.names("origin|example.com|/w/a.bin", &meta(at, vec![])));
        let tag = list.add(purge("tag=red"), at).unwrap();
        let tagged = meta(at, vec![("cache-tag".into(), "Red, blue".into())]);
        assert!(tag.names("origin|example.com|/z", &tagged));
        assert!(!tag.names("origin|example.com|/z", &meta(at, vec![])));
    }

    #[test]
    fn the_list_is_bounded_in_bytes_and_retiring_frees_it() {
        let list = BanList::default();
        let long = format!("path=/{}&prefix=1", "a".repeat(8000));
        let mut added = Vec::new();
        while let Ok(b) = list.add(purge(&long), SystemTime::now()) {
            added.push(b);
        }
        assert_eq!(added.len() as u64, MAX_BAN_BYTES / (8001 + BAN_OVERHEAD));
        assert!(list.bytes() <= MAX_BAN_BYTES);
        list.retire(&added[..10]);
        assert_eq!(list.len(), added.len() - 10);
        assert!(list.add(purge(&long), SystemTime::now()).is_ok());
    }

    #[tokio::test]
    async fn a_pass_is_claimed_once_and_retiring_wakes_the_waiters() {
        let list = Arc::new(BanList::default());
        assert!(!list.claim_pass(), "nothing pending");
        let ban = list.add(purge("tag=a"), SystemTime::now()).unwrap();
        assert!(list.claim_pass());
        assert!(!list.claim_pass(), "one pass at a time");
        let batch = list.next_batch().unwrap();
        let late = list.add(purge("tag=b"), SystemTime::now()).unwrap();
        let waiter = {
            let ban = ban.clone();
            tokio::spawn(async move { ban.retired().await })
        };
        list.retire(&batch);
        waiter.await.unwrap();
        // The ban added during the pass is still pending, for the next batch.
        assert_eq!(list.len(), 1);
        let next = list.next_batch().unwrap();
        assert!(Arc::ptr_eq(&next[0], &late));
        list.retire(&next);
        assert!(list.next_batch().is_none(), "the claim ends with the list");
        assert!(list.is_empty());
        assert!(list.pending().is_empty());
        assert!(!list.claim_pass());
    }

    #[test]
    fn bans_are_kept_in_the_directory_until_none_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let list = BanList::default();
        assert_eq!(BanList::load(dir.path()).len(), 0, "no file");
        let ban = list
            .add(purge("path=/a&soft=1"), SystemTime::now())
            .unwrap();
        list.save(dir.path()).unwrap();
        let back = BanList::load(dir.path());
        assert_eq!(back.len(), 1);
        assert!(back.pending()[0].purge.soft);
        list.retire(&[ban]);
        list.save(dir.path()).unwrap();
        assert!(
            !dir.path().join(FILE).exists(),
            "removed once none is pending"
        );
        std::fs::write(dir.path().join(FILE), b"not bans").unwrap();
        assert_eq!(BanList::load(dir.path()).len(), 0);
        assert!(
            dir.path().join("EDGESLICE-CACHE.bans.bad").exists(),
            "set aside"
        );
    }

    #[test]
    fn a_file_that_is_not_a_whole_ban_list_is_refused() {
        let list = BanList::default();
        list.add(purge("path=/a"), SystemTime::now()).unwrap();
        let data = list.encode();
        assert!(BanList::decode(&data).is_some());
        for cut in 0..data.len() {
            assert!(BanList::decode(&data[..cut]).is_none(), "cut at {cut}");
        }
        let mut flipped = data.clone();
        flipped[12] ^= 1;
        assert!(BanList::decode(&flipped).is_none());
    }

    fn selector() -> impl Strategy<Value = Selector> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Selector::Path),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Selector::Prefix),
            "[ -~]{0,20}".prop_map(Selector::Tag),
        ]
    }

    proptest! {
        #[test]
        fn bans_survive_the_file(
            bans in proptest::collection::vec(
                (selector(), proptest::option::of("[a-z.]{1,20}"), any::<bool>(), 0u64..4_000_000_000, 0u32..1_000_000_000),
                0..20,
            )
        ) {
            let list = BanList::default();
            for (selector, host, soft, secs, nanos) in &bans {
                let p = Purge { selector: selector.clone(), host: host.clone(), soft: *soft };
                list.add(Arc::new(p), UNIX_EPOCH + Duration::new(*secs, *nanos)).unwrap();
            }
            let back = BanList::decode(&list.encode()).expect("decodes");
            let (a, b) = (list.pending(), back.pending());
            prop_assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                prop_assert_eq!(&*x.purge, &*y.purge);
                prop_assert_eq!(x.at, y.at);
            }
        }

        #[test]
        fn decoding_any_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BanList::decode(&data);
        }
    }
}
