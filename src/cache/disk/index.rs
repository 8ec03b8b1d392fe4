//! The disk tier's index in memory: every entry file by key hash, grouped into objects, the
//! objects in recency order. Pure data, no I/O.
//!
//! # What it costs
//!
//! Millions of entries must fit a node's memory, so nothing here is allocated per entry: the
//! records live in two paged slabs ([`Slab`], pages of [`PAGE`] records, free slots reused)
//! and the hash tables hold only `u32` slot numbers (`hashbrown::HashTable`, 4 bytes and a
//! control byte per bucket). An entry is a 24-byte record plus its bucket share; an object
//! (one per group of entries) the same. An object's members are a singly linked list through
//! its entries, and recency is a doubly linked list through the objects (least recently used
//! at the head), so a touch, an insert and an eviction are O(1) and removing one entry is
//! O(members of its object).
//!
//! Keys are 64-bit prefixes of BLAKE3 hashes (the file name says the same 64 bits). Two keys
//! sharing them share a file and an index slot: the key and validator in the file's header
//! are checked on every read, so such a collision (about one in 10^6 at 4 million entries) can
//! only cost a miss, never a wrong byte.

use hashbrown::HashTable;

/// The index key of an entry: the first 8 bytes of the BLAKE3 hash of its key, big-endian
/// (so its 16 hex digits are the first 16 of the full hash).
pub(super) type KeyHash = u64;
/// The same for an object name.
pub(super) type ObjectHash = u64;

/// No slot: the end of a list.
const NONE: u32 = u32::MAX;
/// Records per slab page: 24 KiB pages, so a slab wastes at most one page.
pub(super) const PAGE: usize = 1024;

/// What an entry is to its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// A key without NUL: an object of one entry.
    Whole,
    /// `"<object>\0meta"`: the object's metadata.
    Meta,
    /// Anything else after the NUL (`"<object>\0chunk\0<n>"`): useless without the metadata.
    Part,
}

impl Role {
    pub(super) fn bits(self) -> u32 {
        match self {
            Role::Whole => 0,
            Role::Meta => 1,
            Role::Part => 2,
        }
    }

    pub(super) fn from_bits(bits: u32) -> Role {
        match bits {
            1 => Role::Meta,
            2 => Role::Part,
            _ => Role::Whole,
        }
    }
}

/// The validator digest kept in the index: 30 bits (a false match costs one read that misses).
pub(super) const VALIDATOR_MASK: u32 = (1 << 30) - 1;

/// The largest entry the index records (a larger one is never stored).
pub(super) const MAX_ENTRY_SIZE: u64 = u32::MAX as u64;

/// An entry file: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: KeyHash,
    /// Slot of its object.
    object: u32,
    /// File size: header and data.
    size: u32,
    /// Role (top 2 bits) and validator digest (30 bits).
    role_validator: u32,
    /// Next member of the same object, or the next free slot.
    next: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            key: 0,
            object: NONE,
            size: 0,
            role_validator: 0,
            next: NONE,
        }
    }
}

impl Entry {
    fn role(&self) -> Role {
        Role::from_bits(self.role_validator >> 30)
    }

    fn validator(&self) -> u32 {
        self.role_validator & VALIDATOR_MASK
    }
}

/// Set in [`Object::stamp`] while the object is known only from the start-up load (never
/// touched since): it sits in the loaded prefix of the recency list.
const LOADED: u32 = 1 << 31;

/// A group of entries: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Object {
    key: ObjectHash,
    /// First member, [`NONE`] never (an object goes with its last member).
    first: u32,
    /// Neighbours in the recency list (towards the least recently used, towards the most),
    /// or the next free slot in `next`.
    prev: u32,
    next: u32,
    /// [`LOADED`], and the newest modification time of its files in seconds since
    /// [`STAMP_EPOCH`] (31 bits: until 2092), the recency order of a loaded object.
    stamp: u32,
}

impl Default for Object {
    fn default() -> Self {
        Object {
            key: 0,
            first: NONE,
            prev: NONE,
            next: NONE,
            stamp: 0,
        }
    }
}

/// Unix time of stamp 0 (2024-01-01).
pub(super) const STAMP_EPOCH: u64 = 1_704_067_200;

/// A file's modification time (Unix seconds) as an object stamp.
pub(super) fn stamp_of(unix_secs: u64) -> u32 {
    u32::try_from(unix_secs.saturating_sub(STAMP_EPOCH))
        .unwrap_or(u32::MAX)
        .min(LOADED - 1)
}

/// Records in pages that never move; freed slots are reused (linked through `link`).
#[derive(Debug)]
struct Slab<T> {
    pages: Vec<Box<[T]>>,
    /// Slots ever handed out.
    len: u32,
    /// Head of the free list.
    free: u32,
}

trait Linked: Copy + Default {
    fn link(&self) -> u32;
    fn set_link(&mut self, next: u32);
}

impl Linked for Entry {
    fn link(&self) -> u32 {
        self.next
    }
    fn set_link(&mut self, next: u32) {
        self.next = next;
    }
}

impl Linked for Object {
    fn link(&self) -> u32 {
        self.next
    }
    fn set_link(&mut self, next: u32) {
        self.next = next;
    }
}

impl<T: Linked> Slab<T> {
    fn new() -> Slab<T> {
        Slab {
            pages: Vec::new(),
            len: 0,
            free: NONE,
        }
    }

    fn get(&self, i: u32) -> &T {
        &self.pages[i as usize / PAGE][i as usize % PAGE]
    }

    fn get_mut(&mut self, i: u32) -> &mut T {
        &mut self.pages[i as usize / PAGE][i as usize % PAGE]
    }

    /// A slot holding `value`; `None` past 2^32 - 1 slots.
    fn alloc(&mut self, value: T) -> Option<u32> {
        if self.free != NONE {
            let i = self.free;
            self.free = self.get(i).link();
            *self.get_mut(i) = value;
            return Some(i);
        }
        if self.len == NONE {
            return None;
        }
        let i = self.len;
        if i as usize / PAGE == self.pages.len() {
            self.pages.push(vec![T::default(); PAGE].into_boxed_slice());
        }
        self.len += 1;
        *self.get_mut(i) = value;
        Some(i)
    }

    fn release(&mut self, i: u32) {
        let mut empty = T::default();
        empty.set_link(self.free);
        *self.get_mut(i) = empty;
        self.free = i;
    }

    fn bytes(&self) -> u64 {
        (self.pages.len() * PAGE * std::mem::size_of::<T>()) as u64
            + (self.pages.capacity() * std::mem::size_of::<Box<[T]>>()) as u64
    }
}

/// Bytes a `HashTable<u32>` of this capacity allocates: 4-byte buckets, a control byte each,
/// and a group of trailing control bytes.
fn table_bytes(capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    (buckets * 5 + 16) as u64
}

/// Worst case per entry, for the index capacity: its record and, right after its table grew
/// (load 7/16), 5 / (7/16) bytes of buckets.
pub const INDEX_ENTRY_BYTES: u64 = 36;
/// ... and per object, the same.
pub const INDEX_OBJECT_BYTES: u64 = 36;

/// Entries by key hash, grouped into objects, and the objects ordered by recency.
#[derive(Debug)]
pub(super) struct Index {
    entries: Slab<Entry>,
    entry_table: HashTable<u32>,
    objects: Slab<Object>,
    object_table: HashTable<u32>,
    entry_count: usize,
    object_count: usize,
    /// Least and most recently used objects.
    head: u32,
    tail: u32,
    pub used: u64,
    /// Bytes of puts in progress (temp files being written): room is made for an entry before
    /// it is written, so `used + reserved` — everything on disk — never exceeds the capacity.
    pub reserved: u64,
    /// Puts in progress, which will each add an entry and maybe an object to the index: room
    /// is made for them in the index capacity too.
    pub reserved_entries: u64,
    /// A snapshot was written: no put may start (it would be missing from the snapshot).
    pub sealed: bool,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            entries: Slab::new(),
            entry_table: HashTable::new(),
            objects: Slab::new(),
            object_table: HashTable::new(),
            entry_count: 0,
            object_count: 0,
            head: NONE,
            tail: NONE,
            used: 0,
            reserved: 0,
            reserved_entries: 0,
            sealed: false,
        }
    }
}

/// How an entry reaches the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recency {
    /// Written or read now: replaces any entry of its key, and its object becomes the most
    /// recently used.
    Now,
    /// Found by the start-up load (a snapshot or a scan) with its file's modification time:
    /// skipped if its key is already indexed (what is indexed is newer), and a new object
    /// goes to the least recently used end, before every object used since start.
    Loaded(u32),
}

impl Index {
    fn entry_slot(&self, hash: KeyHash) -> Option<u32> {
        let entries = &self.entries;
        self.entry_table
            .find(hash, |&i| entries.get(i).key == hash)
            .copied()
    }

    fn object_slot(&self, object: ObjectHash) -> Option<u32> {
        let objects = &self.objects;
        self.object_table
            .find(object, |&i| objects.get(i).key == object)
            .copied()
    }

    pub fn contains(&self, hash: KeyHash) -> bool {
        self.entry_slot(hash).is_some()
    }

    pub fn has_object(&self, object: ObjectHash) -> bool {
        self.object_slot(object).is_some()
    }

    /// Whether `hash` is indexed at this validator digest.
    pub fn has(&self, hash: KeyHash, validator: u64) -> bool {
        self.entry_slot(hash)
            .is_some_and(|i| self.entries.get(i).validator() == validator as u32 & VALIDATOR_MASK)
    }

    pub fn entry_count(&self) -> usize {
        self.entry_count
    }

    pub fn object_count(&self) -> usize {
        self.object_count
    }

    // ---- the recency list ---------------------------------------------------------------

    fn unlink(&mut self, o: u32) {
        let Object { prev, next, .. } = *self.objects.get(o);
        if prev == NONE {
            self.head = next;
        } else {
            self.objects.get_mut(prev).next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.objects.get_mut(next).prev = prev;
        }
        let rec = self.objects.get_mut(o);
        rec.prev = NONE;
        rec.next = NONE;
    }

    /// Link `o` between `prev` and `next` (neighbours in the list, or [`NONE`] at its ends).
    fn link_between(&mut self, o: u32, prev: u32, next: u32) {
        {
            let rec = self.objects.get_mut(o);
            rec.prev = prev;
            rec.next = next;
        }
        if prev == NONE {
            self.head = o;
        } else {
            self.objects.get_mut(prev).next = o;
        }
        if next == NONE {
            self.tail = o;
        } else {
            self.objects.get_mut(next).prev = o;
        }
    }

    fn push_back(&mut self, o: u32) {
        self.link_between(o, self.tail, NONE);
    }

    fn push_front(&mut self, o: u32) {
        self.link_between(o, NONE, self.head);
    }

    fn touch_slot(&mut self, o: u32) {
        self.objects.get_mut(o).stamp &= !LOADED;
        if self.tail != o {
            self.unlink(o);
            self.push_back(o);
        }
    }

    /// Make an object the most recently used.
    pub fn touch_object(&mut self, object: ObjectHash) {
        if let Some(o) = self.object_slot(object) {
            self.touch_slot(o);
        }
    }

    /// Make the object of an entry the most recently used.
    pub fn touch(&mut self, hash: KeyHash) {
        if let Some(i) = self.entry_slot(hash) {
            let o = self.entries.get(i).object;
            self.touch_slot(o);
        }
    }

    // ---- insert and remove ----------------------------------------------------------------

    /// Index an entry; see [`Recency`]. Returns whether it was indexed (`false`: a loaded
    /// entry whose key is indexed already, an entry larger than [`MAX_ENTRY_SIZE`], or no
    /// slot left).
    pub fn insert(
        &mut self,
        hash: KeyHash,
        object: ObjectHash,
        size: u64,
        validator: u64,
        role: Role,
        recency: Recency,
    ) -> bool {
        if recency != Recency::Now && self.contains(hash) {
            return false;
        }
        let Ok(size32) = u32::try_from(size) else {
            self.remove(hash);
            return false;
        };
        self.remove(hash);
        let o = match self.object_slot(object) {
            Some(o) => o,
            None => {
                let Some(o) = self.objects.alloc(Object {
                    key: object,
                    ..Object::default()
                }) else {
                    return false;
                };
                let objects = &self.objects;
                self.object_table
                    .insert_unique(object, o, |&i| objects.get(i).key);
                self.object_count += 1;
                match recency {
                    Recency::Now => self.push_back(o),
                    Recency::Loaded(_) => {
                        self.objects.get_mut(o).stamp = LOADED;
                        self.push_front(o);
                    }
                }
                o
            }
        };
        let first = self.objects.get(o).first;
        let Some(i) = self.entries.alloc(Entry {
            key: hash,
            object: o,
            size: size32,
            role_validator: (role.bits() << 30) | (validator as u32 & VALIDATOR_MASK),
            next: first,
        }) else {
            if first == NONE {
                self.drop_object_slot(o);
            }
            return false;
        };
        let entries = &self.entries;
        self.entry_table
            .insert_unique(hash, i, |&j| entries.get(j).key);
        self.entry_count += 1;
        self.objects.get_mut(o).first = i;
        self.used = self.used.saturating_add(size);
        match recency {
            Recency::Now => self.touch_slot(o),
            Recency::Loaded(stamp) => {
                let rec = self.objects.get_mut(o);
                if rec.stamp & LOADED != 0 {
                    rec.stamp = LOADED | (rec.stamp & !LOADED).max(stamp & !LOADED);
                }
            }
        }
        true
    }

    fn drop_object_slot(&mut self, o: u32) {
        let key = self.objects.get(o).key;
        self.unlink(o);
        if let Ok(found) = self.object_table.find_entry(key, |&i| i == o) {
            found.remove();
        }
        self.objects.release(o);
        self.object_count -= 1;
    }

    /// Drop one entry; its object goes with its last member. Returns its size.
    pub fn remove(&mut self, hash: KeyHash) -> Option<u64> {
        let i = {
            let entries = &self.entries;
            let found = self
                .entry_table
                .find_entry(hash, |&i| entries.get(i).key == hash)
                .ok()?;
            found.remove().0
        };
        let Entry {
            object: o,
            size,
            next,
            ..
        } = *self.entries.get(i);
        // Unlink from the member list.
        let first = self.objects.get(o).first;
        if first == i {
            self.objects.get_mut(o).first = next;
        } else {
            let mut at = first;
            while at != NONE {
                let after = self.entries.get(at).next;
                if after == i {
                    self.entries.get_mut(at).next = next;
                    break;
                }
                at = after;
            }
        }
        self.entries.release(i);
        self.entry_count -= 1;
        self.used = self.used.saturating_sub(u64::from(size));
        if self.objects.get(o).first == NONE {
            self.drop_object_slot(o);
        }
        Some(u64::from(size))
    }

    /// Take a whole object out of the index; returns its members.
    pub fn take_object(&mut self, object: ObjectHash) -> Vec<KeyHash> {
        match self.object_slot(object) {
            Some(o) => self.take_slot(o),
            None => Vec::new(),
        }
    }

    fn take_slot(&mut self, o: u32) -> Vec<KeyHash> {
        let mut members = Vec::new();
        let mut at = self.objects.get(o).first;
        while at != NONE {
            let Entry {
                key, size, next, ..
            } = *self.entries.get(at);
            if let Ok(found) = self.entry_table.find_entry(key, |&j| j == at) {
                found.remove();
            }
            self.entries.release(at);
            self.entry_count -= 1;
            self.used = self.used.saturating_sub(u64::from(size));
            members.push(key);
            at = next;
        }
        self.objects.get_mut(o).first = NONE;
        self.drop_object_slot(o);
        members
    }

    /// The key hashes of every metadata entry.
    pub fn meta_hashes(&self) -> Vec<KeyHash> {
        let mut out = Vec::new();
        for i in 0..self.entries.len {
            let e = self.entries.get(i);
            if e.object != NONE && e.role() == Role::Meta {
                out.push(e.key);
            }
        }
        out
    }

    // ---- memory and eviction --------------------------------------------------------------

    /// What the index takes in memory by the worst-case weights ([`INDEX_ENTRY_BYTES`],
    /// [`INDEX_OBJECT_BYTES`]), counting the room reserved for puts in progress if
    /// `with_reserved`: what `cache.disk.index_capacity` bounds.
    pub fn memory_bytes(&self, with_reserved: bool) -> u64 {
        let reserved = if with_reserved {
            self.reserved_entries
                .saturating_mul(INDEX_ENTRY_BYTES + INDEX_OBJECT_BYTES)
        } else {
            0
        };
        (self.entry_count as u64)
            .saturating_mul(INDEX_ENTRY_BYTES)
            .saturating_add((self.object_count as u64).saturating_mul(INDEX_OBJECT_BYTES))
            .saturating_add(reserved)
    }

    /// What the index has allocated now: slab pages and hash tables.
    pub fn resident_bytes(&self) -> u64 {
        self.entries.bytes()
            + self.objects.bytes()
            + table_bytes(self.entry_table.capacity())
            + table_bytes(self.object_table.capacity())
    }

    /// When the bytes held (counting reserved room if `with_reserved`) exceed `limit`, or what
    /// the index takes in memory exceeds `index_limit`, take the least recently used object
    /// out of the index and return its members.
    pub fn pop_lru_above(
        &mut self,
        limit: u64,
        index_limit: u64,
        with_reserved: bool,
    ) -> Option<Vec<KeyHash>> {
        let held = if with_reserved {
            self.used.saturating_add(self.reserved)
        } else {
            self.used
        };
        if held <= limit && self.memory_bytes(with_reserved) <= index_limit {
            return None;
        }
        if self.head == NONE {
            return None;
        }
        Some(self.take_slot(self.head))
    }

    // ---- the start-up load ----------------------------------------------------------------

    /// The load is over: the loaded objects nobody used since start are put in the order of
    /// their newest file's modification time (if `by_time`; a snapshot is in order already),
    /// before every object used since; and those with parts but no metadata entry (orphans:
    /// a fill cut short) are taken out. Returns the orphans' members, for deletion.
    pub fn finish_load(&mut self, by_time: bool) -> Vec<KeyHash> {
        let mut loaded = Vec::new();
        let mut at = self.head;
        while at != NONE {
            let rec = *self.objects.get(at);
            if rec.stamp & LOADED == 0 {
                break;
            }
            loaded.push((rec.stamp & !LOADED, at));
            at = rec.next;
        }
        let mut orphans = Vec::new();
        let mut kept = Vec::with_capacity(loaded.len());
        for (stamp, o) in loaded {
            let (mut meta, mut parts) = (false, false);
            let mut m = self.objects.get(o).first;
            while m != NONE {
                let e = self.entries.get(m);
                match e.role() {
                    Role::Meta => meta = true,
                    Role::Part => parts = true,
                    Role::Whole => {}
                }
                m = e.next;
            }
            if parts && !meta {
                orphans.extend(self.take_slot(o));
            } else {
                self.objects.get_mut(o).stamp = stamp;
                kept.push((stamp, o));
            }
        }
        if by_time {
            for &(_, o) in &kept {
                self.unlink(o);
            }
            kept.sort_by_key(|&(stamp, _)| std::cmp::Reverse(stamp));
            for &(_, o) in &kept {
                self.push_front(o);
            }
        }
        orphans
    }

    /// Every object, least recently used first, with its members (key, size, validator
    /// digest, role): what a snapshot holds.
    pub fn for_each_object(
        &self,
        mut visit: impl FnMut(ObjectHash, &mut dyn Iterator<Item = (KeyHash, u32, u32, Role)>),
    ) {
        let mut at = self.head;
        while at != NONE {
            let rec = self.objects.get(at);
            let mut m = rec.first;
            let entries = &self.entries;
            let mut members = std::iter::from_fn(|| {
                if m == NONE {
                    return None;
                }
                let e = entries.get(m);
                m = e.next;
                Some((e.key, e.size, e.validator(), e.role()))
            });
            visit(rec.key, &mut members);
            at = rec.next;
        }
    }

    /// Objects from the least recently used (tests).
    #[cfg(test)]
    pub fn lru_order(&self) -> Vec<ObjectHash> {
        let mut out = Vec::new();
        let mut at = self.head;
        while at != NONE {
            out.push(self.objects.get(at).key);
            at = self.objects.get(at).next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn records_are_24_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        assert_eq!(std::mem::size_of::<Object>(), 24);
    }

    #[test]
    fn insert_touch_evict_in_recency_order() {
        let mut ix = Index::default();
        ix.insert(1, 10, 100, 7, Role::Meta, Recency::Now);
        ix.insert(2, 10, 100, 7, Role::Part, Recency::Now);
        ix.insert(3, 20, 50, 7, Role::Meta, Recency::Now);
        ix.insert(4, 30, 50, 7, Role::Whole, Recency::Now);
        assert_eq!(ix.lru_order(), vec![10, 20, 30]);
        ix.touch(2);
        assert_eq!(ix.lru_order(), vec![20, 30, 10]);
        assert_eq!(ix.used, 300);
        let first = ix.pop_lru_above(200, u64::MAX, false).unwrap();
        assert_eq!(first, vec![3]);
        let second = ix.pop_lru_above(250, u64::MAX, false);
        assert_eq!(second, None);
        assert_eq!(ix.used, 250);
        let mut members = ix.pop_lru_above(100, u64::MAX, false).unwrap();
        members.sort();
        assert_eq!(members, vec![4]);
        let mut members = ix.pop_lru_above(100, u64::MAX, false).unwrap();
        members.sort();
        assert_eq!(members, vec![1, 2]);
        assert_eq!((ix.entry_count(), ix.object_count(), ix.used), (0, 0, 0));
    }

    #[test]
    fn validator_and_replacement() {
        let mut ix = Index::default();
        ix.insert(1, 10, 100, 0xdead_beef, Role::Part, Recency::Now);
        assert!(ix.has(1, 0xdead_beef));
        assert!(!ix.has(1, 0xdead_bee0));
        ix.insert(1, 10, 40, 5, Role::Part, Recency::Now);
        assert!(ix.has(1, 5));
        assert_eq!((ix.entry_count(), ix.used), (1, 40));
    }

    #[test]
    fn loaded_entries_never_replace_and_go_before_live_objects() {
        let mut ix = Index::default();
        ix.insert(1, 10, 100, 1, Role::Meta, Recency::Now);
        // A loaded copy of a key written since start is older: skipped.
        assert!(!ix.insert(1, 10, 999, 2, Role::Meta, Recency::Loaded(5)));
        assert!(ix.has(1, 1));
        ix.insert(2, 20, 10, 1, Role::Meta, Recency::Loaded(300));
        ix.insert(3, 30, 10, 1, Role::Meta, Recency::Loaded(100));
        ix.insert(4, 40, 10, 1, Role::Meta, Recency::Loaded(200));
        // Joining a live object leaves its recency alone.
        ix.insert(5, 10, 10, 1, Role::Part, Recency::Loaded(50));
        assert_eq!(ix.lru_order()[3], 10);
        ix.touch_object(40);
        assert!(ix.finish_load(true).is_empty());
        assert_eq!(ix.lru_order(), vec![30, 20, 10, 40]);
    }

    #[test]
    fn orphans_of_the_load_are_taken_out() {
        let mut ix = Index::default();
        ix.insert(1, 10, 100, 1, Role::Part, Recency::Loaded(1));
        ix.insert(2, 10, 100, 1, Role::Part, Recency::Loaded(1));
        ix.insert(3, 20, 100, 1, Role::Part, Recency::Loaded(1));
        ix.insert(4, 20, 100, 1, Role::Meta, Recency::Loaded(1));
        ix.insert(5, 30, 100, 1, Role::Whole, Recency::Loaded(1));
        // A fill in progress since start: chunks first, not an orphan.
        ix.insert(6, 40, 100, 1, Role::Part, Recency::Now);
        let mut orphans = ix.finish_load(true);
        orphans.sort();
        assert_eq!(orphans, vec![1, 2]);
        assert_eq!(ix.object_count(), 3);
        assert_eq!(ix.used, 400);
    }

    #[test]
    fn resident_bytes_per_entry_at_a_million() {
        let mut ix = Index::default();
        let n = 1_000_000u64;
        for i in 0..n {
            // Two entries per object: a metadata entry and one chunk (the worst case).
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let object = (i / 2).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            ix.insert(h, object, 1000, 1, Role::Part, Recency::Now);
        }
        let per_entry = ix.resident_bytes() as f64 / n as f64;
        eprintln!(
            "{} entries, {} objects: {} bytes resident, {per_entry:.1} per entry",
            ix.entry_count(),
            ix.object_count(),
            ix.resident_bytes()
        );
        assert!(per_entry <= 64.0, "{per_entry} bytes per entry");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8, u16),
        Remove(u8),
        Take(u8),
        Touch(u8),
        Pop(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u8>(), 0u8..16, any::<u16>()).prop_map(|(k, o, s)| Op::Insert(k, o, s)),
            1 => any::<u8>().prop_map(Op::Remove),
            1 => (0u8..16).prop_map(Op::Take),
            1 => any::<u8>().prop_map(Op::Touch),
            1 => any::<u16>().prop_map(Op::Pop),
        ]
    }

    proptest! {
        /// The index agrees with a plain model (maps and a recency list) under any sequence of
        /// operations: members, sizes, used bytes, counts and eviction order.
        #[test]
        fn agrees_with_a_model(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ix = Index::default();
            // key -> (object, size); object -> recency stamp.
            let mut keys: HashMap<u64, (u64, u64)> = HashMap::new();
            let mut stamps: HashMap<u64, u64> = HashMap::new();
            let mut clock = 0u64;
            for op in ops {
                match op {
                    Op::Insert(k, o, s) => {
                        let (k, o, s) = (u64::from(k), u64::from(o) + 1000, u64::from(s));
                        // A key moves object only by being removed first.
                        if let Some((old_o, _)) = keys.remove(&k) {
                            if !keys.values().any(|(oo, _)| *oo == old_o) {
                                stamps.remove(&old_o);
                            }
                        }
                        ix.insert(k, o, s, 1, Role::Part, Recency::Now);
                        keys.insert(k, (o, s));
                        clock += 1;
                        stamps.insert(o, clock);
                    }
                    Op::Remove(k) => {
                        let k = u64::from(k);
                        let got = ix.remove(k);
                        let want = keys.remove(&k);
                        prop_assert_eq!(got, want.map(|(_, s)| s));
                        if let Some((o, _)) = want {
                            if !keys.values().any(|(oo, _)| *oo == o) {
                                stamps.remove(&o);
                            }
                        }
                    }
                    Op::Take(o) => {
                        let o = u64::from(o) + 1000;
                        let mut got = ix.take_object(o);
                        got.sort();
                        let mut want: Vec<u64> =
                            keys.iter().filter(|(_, v)| v.0 == o).map(|(k, _)| *k).collect();
                        want.sort();
                        prop_assert_eq!(got, want);
                        keys.retain(|_, v| v.0 != o);
                        stamps.remove(&o);
                    }
                    Op::Touch(k) => {
                        let k = u64::from(k);
                        ix.touch(k);
                        if let Some((o, _)) = keys.get(&k) {
                            clock += 1;
                            stamps.insert(*o, clock);
                        }
                    }
                    Op::Pop(limit) => {
                        let limit = u64::from(limit) * 4;
                        let used: u64 = keys.values().map(|v| v.1).sum();
                        let got = ix.pop_lru_above(limit, u64::MAX, false);
                        if used > limit && !stamps.is_empty() {
                            let (&o, _) = stamps.iter().min_by_key(|(_, s)| **s).unwrap();
                            let mut got = got.unwrap();
                            got.sort();
                            let mut want: Vec<u64> =
                                keys.iter().filter(|(_, v)| v.0 == o).map(|(k, _)| *k).collect();
                            want.sort();
                            prop_assert_eq!(got, want);
                            keys.retain(|_, v| v.0 != o);
                            stamps.remove(&o);
                        } else {
                            prop_assert!(got.is_none());
                        }
                    }
                }
                prop_assert_eq!(ix.entry_count(), keys.len());
                prop_assert_eq!(ix.object_count(), stamps.len());
                prop_assert_eq!(ix.used, keys.values().map(|v| v.1).sum::<u64>());
                let by_stamp: BTreeMap<u64, u64> = stamps.iter().map(|(o, s)| (*s, *o)).collect();
                prop_assert_eq!(ix.lru_order(), by_stamp.values().copied().collect::<Vec<_>>());
            }
        }
    }
}
