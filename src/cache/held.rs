//! The response budget (`cache.response_budget`): the bytes of chunks that responses in flight
//! hold, bounded.
//!
//! A response writes one chunk at a time and holds it while the client takes it. Held chunks
//! are memory beyond the memory tier whenever the tier has let go of them (a tier smaller than
//! what is being read, a chunk read from disk or filled and not kept): without a bound, N
//! stalled clients hold N chunks. So a response *holds* its current chunk through this budget:
//!
//! - a chunk is charged once, however many responses hold it: its identity is its allocation
//!   (the `Bytes` of a stored chunk, or the flight filling it), and a hot chunk read by a
//!   thousand clients costs one chunk (they share the allocation);
//! - a chunk nobody holds yet is charged its length plus [`HOLD_OVERHEAD`]; when the budget
//!   cannot take it, the response first lets go of every chunk it has in hand, then waits its
//!   turn (first come, first served) — it never copies or buffers more meanwhile;
//! - the charge is given back when the last holder lets go.
//!
//! So what responses hold, over what the tier holds, is at most the budget: a node's memory is
//! bounded by the tier plus `cache.response_budget` whatever the number of clients or how slow
//! they read. A chunk both in the tier and held is counted in both (the bound errs high).
//!
//! One client cannot take the budget from the others: the chunks a client's responses charge
//! are at most its share ([`ResponseBudget::new`]: an eighth of the budget, at least two
//! chunks), so a client that opens many connections and reads them slowly (or not at all)
//! waits on its own responses, not everyone else's. Clients are keyed as the shaper keys them
//! (by address, IPv6 by prefix, or what `shaping.client_key` says).
//!
//! Nor can clients that stop reading hold it from those that read: a response that has waited
//! [`RELIEF_AFTER`] for the budget asks its [`Relief`] (the connection table) to cut the
//! connection whose response holds budget and whose client has read nothing for longest (at
//! least [`RELIEF_MIN_STALL`]), and again each [`RELIEF_AFTER`] it still waits (all waiters
//! together at most one cut per [`RELIEF_SPACING`]): the stalled response ends and gives back its
//! chunk, as `server.send_timeout` would end it later.
//!
//! The holders of a chunk are found by its allocation's address: a holder keeps the allocation
//! alive (its [`Anchor`]), so an address cannot be reused while it is registered.

use super::flight::Flight;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Charged with every held chunk's length: its registry entry, the holders' guards and the
/// allocator's share of the chunk's allocation.
pub const HOLD_OVERHEAD: u64 = 256;

/// How long a response waits for the budget before it asks for a stalled response to be cut.
pub const RELIEF_AFTER: Duration = Duration::from_secs(1);
/// A response is cut for the budget only once its client has read nothing for this long.
pub const RELIEF_MIN_STALL: Duration = Duration::from_secs(5);
/// Responses ask for a cut at most this often, all together: a cut looks through the
/// connection table, and a thousand waiters must not make a thousand looks a second.
pub const RELIEF_SPACING: Duration = Duration::from_millis(100);

/// What the budget asks when responses have waited for it a while: end one response that holds
/// budget and whose client has stopped reading (the longest stalled), so that what it holds
/// goes to those waiting. Whether one was ended.
pub trait Relief: Send + Sync {
    fn relieve(&self, min_stall: Duration) -> bool;
}

/// What keeps a held chunk's allocation alive, and names it.
#[derive(Clone)]
pub enum Anchor {
    /// A chunk in hand (from the memory tier, the disk, or a finished fill).
    Chunk(Bytes),
    /// A chunk being filled: its pieces, then the finished chunk, are the flight's.
    Flight(Arc<Flight>),
}

impl Anchor {
    /// The allocation's address: the same for every clone of the chunk.
    fn id(&self) -> usize {
        match self {
            Anchor::Chunk(b) => b.as_ptr() as usize,
            Anchor::Flight(f) => Arc::as_ptr(f) as usize,
        }
    }
}

/// Who asks, for the shares: a digest of the client's key ([`ResponseBudget::tag`]); 0 for
/// none (no share applies).
pub type ClientTag = u64;

struct Entry {
    holders: u64,
    _charge: Charge,
}

/// Bytes taken from a client's share and from the budget, given back together on drop.
struct Charge {
    _share: Option<SharePermit>,
    _global: OwnedSemaphorePermit,
}

/// The clients' shares of the budget: a semaphore of `share` bytes per client, kept while any
/// of its responses holds or waits for part of it (so the table holds at most the clients
/// with a response holding or waiting for a chunk).
struct Shares {
    share: u64,
    shards: Vec<Mutex<HashMap<ClientTag, Arc<Semaphore>>>>,
}

impl Shares {
    fn shard(
        &self,
        client: ClientTag,
    ) -> std::sync::MutexGuard<'_, HashMap<ClientTag, Arc<Semaphore>>> {
        // A poisoned shard only means a panic elsewhere mid-update; the table is still whole.
        self.shards[(client % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The client's semaphore (made if it has none); the clone counts as a use.
    fn of(&self, client: ClientTag) -> Arc<Semaphore> {
        self.shard(client)
            .entry(client)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share as usize)))
            .clone()
    }

    /// Drop a use of the client's semaphore (a clone, or a permit, which holds one) and
    /// forget the semaphore once the table's reference is the last.
    fn release<T>(&self, client: ClientTag, used: T) {
        let mut shard = self.shard(client);
        drop(used);
        if shard
            .get(&client)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            shard.remove(&client);
        }
    }

    /// Clients with a share in use.
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// Bytes of a client's share, given back on drop (and the share forgotten if unused).
struct SharePermit {
    shares: Arc<Shares>,
    client: ClientTag,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for SharePermit {
    fn drop(&mut self) {
        self.shares.release(self.client, self.permit.take());
    }
}

/// The budget of chunk bytes held by responses (see the module doc).
pub struct ResponseBudget {
    limit: u64,
    /// What each client's responses may charge at most.
    shares: Arc<Shares>,
    /// Keys client tags (random per process: a client cannot aim its tag at another's).
    tags: std::collections::hash_map::RandomState,
    /// Free bytes (one permit a byte).
    free: Arc<Semaphore>,
    shards: Vec<Mutex<HashMap<usize, Entry>>>,
    /// Responses that waited for the budget.
    waits: AtomicU64,
    /// Responses waiting now: while any does, a new chunk is not charged without waiting
    /// (no one jumps the queue; joining a chunk already charged costs nothing and is allowed).
    waiting: AtomicU64,
    /// Asked to end a stalled response when one has waited [`RELIEF_AFTER`].
    relief: OnceLock<Arc<dyn Relief>>,
    /// When relief was last asked for, in ms since `epoch` ([`RELIEF_SPACING`]).
    last_relief_ms: AtomicU64,
    epoch: std::time::Instant,
}

const SHARDS: usize = 64;

/// Bytes waited for, given to a chunk by [`ResponseBudget::hold_reserved`].
pub struct Reservation(Charge);

impl ResponseBudget {
    /// A budget of `limit` bytes (at most what a semaphore counts), of which one client takes
    /// at most an eighth, or two chunks of `chunk_size` if that is more (all of it at most).
    pub fn new(limit: u64, chunk_size: u64) -> Arc<ResponseBudget> {
        let limit = limit.min(Semaphore::MAX_PERMITS as u64);
        let two_chunks = chunk_size.saturating_add(HOLD_OVERHEAD).saturating_mul(2);
        let share = (limit / 8).max(two_chunks).min(limit);
        Arc::new(ResponseBudget {
            limit,
            shares: Arc::new(Shares {
                share,
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            }),
            tags: Default::default(),
            free: Arc::new(Semaphore::new(limit as usize)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            waits: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            relief: OnceLock::new(),
            last_relief_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        })
    }

    /// Who ends stalled responses for waiting ones (set once, by the server; none: waiters
    /// wait until stalled responses end by `server.send_timeout`).
    pub fn set_relief(&self, relief: Arc<dyn Relief>) {
        let _ = self.relief.set(relief);
    }

    /// A response has waited [`RELIEF_AFTER`]: ask for a stalled one to be cut, unless another
    /// waiter did within [`RELIEF_SPACING`].
    fn ask_relief(&self) {
        let Some(relief) = self.relief.get() else {
            return;
        };
        let now = self.epoch.elapsed().as_millis() as u64 + RELIEF_SPACING.as_millis() as u64;
        let last = self.last_relief_ms.load(Ordering::Relaxed);
        if now < last + RELIEF_SPACING.as_millis() as u64 {
            return;
        }
        if self
            .last_relief_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            relief.relieve(RELIEF_MIN_STALL);
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most one client's responses may charge.
    pub fn client_share(&self) -> u64 {
        self.shares.share
    }

    /// The tag of a client key (never 0).
    pub fn tag(&self, client: &impl std::hash::Hash) -> ClientTag {
        use std::hash::BuildHasher;
        self.tags.hash_one(client) | 1
    }

    /// Bytes charged now (with what waiters have been given of their charge so far).
    pub fn held_bytes(&self) -> u64 {
        self.limit
            .saturating_sub(self.free.available_permits() as u64)
    }

    /// How many times a response waited for the budget.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Clients with a share in use.
    pub fn clients(&self) -> usize {
        self.shares.len()
    }

    /// What a chunk of `len` bytes is charged, in permits (never more than the whole budget,
    /// so even an oversized chunk is served, alone).
    fn charge(&self, len: u64) -> u32 {
        len.saturating_add(HOLD_OVERHEAD)
            .min(self.limit)
            .min(u64::from(u32::MAX)) as u32
    }

    fn shard(&self, id: usize) -> std::sync::MutexGuard<'_, HashMap<usize, Entry>> {
        // Addresses are aligned: mix the bits above the alignment.
        let i = ((id >> 4) ^ (id >> 12)) % SHARDS;
        // A poisoned shard only means a panic elsewhere mid-update; the counts are still whole.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take `charge` bytes of the client's share: now (`wait` false) or once they are free.
    async fn take_share(&self, client: ClientTag, charge: u32, wait: bool) -> Option<SharePermit> {
        let sem = self.shares.of(client);
        let n = u64::from(charge).min(self.shares.share) as u32;
        let permit = if wait {
            sem.clone().acquire_many_owned(n).await.ok()
        } else {
            sem.clone().try_acquire_many_owned(n).ok()
        };
        self.shares.release(client, sem);
        Some(SharePermit {
            shares: self.shares.clone(),
            client,
            permit: Some(permit?),
        })
    }

    /// Hold `anchor` (a chunk of `len` bytes) for `client`: joins its holders if it is charged
    /// already, else charges it if the budget and the client's share have room now. `Err`
    /// gives the anchor back: let go of every chunk in hand, then [`ResponseBudget::reserve`].
    pub fn try_hold(
        self: &Arc<Self>,
        anchor: Anchor,
        len: u64,
        client: ClientTag,
    ) -> Result<Held, Anchor> {
        let id = anchor.id();
        let mut shard = self.shard(id);
        if let Some(e) = shard.get_mut(&id) {
            e.holders += 1;
        } else {
            let Some(Reservation(charge)) = self.try_reserve(len, client) else {
                return Err(anchor);
            };
            shard.insert(
                id,
                Entry {
                    holders: 1,
                    _charge: charge,
                },
            );
        }
        drop(shard);
        Ok(Held {
            budget: self.clone(),
            id,
            _anchor: anchor,
        })
    }

    /// Room for a chunk of `len` bytes if there is some now, in the client's share and in the
    /// budget (see [`ResponseBudget::reserve`]).
    pub fn try_reserve(&self, len: u64, client: ClientTag) -> Option<Reservation> {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        let charge = self.charge(len);
        let share = match client {
            0 => None,
            // Not waiting: ready at its first poll.
            c => Some(futures::FutureExt::now_or_never(
                self.take_share(c, charge, false),
            )??),
        };
        let global = self.free.clone().try_acquire_many_owned(charge).ok()?;
        Some(Reservation(Charge {
            _share: share,
            _global: global,
        }))
    }

    /// Wait until a chunk of `len` bytes fits, holding nothing meanwhile (first come, first
    /// served): the client's share first (its own responses give it back as its client reads
    /// them), then the budget. Cancel-safe: dropping the future gives back what it took.
    /// `None` only if the budget were closed (it never is).
    pub async fn reserve(&self, len: u64, client: ClientTag) -> Option<Reservation> {
        self.waits.fetch_add(1, Ordering::Relaxed);
        let charge = self.charge(len);
        let share = match client {
            0 => None,
            c => Some(self.take_share(c, charge, true).await?),
        };
        let _waiting = Waiting::new(&self.waiting);
        let acquire = self.free.clone().acquire_many_owned(charge);
        tokio::pin!(acquire);
        let global = loop {
            tokio::select! {
                permit = &mut acquire => break permit.ok()?,
                _ = tokio::time::sleep(RELIEF_AFTER) => self.ask_relief(),
            }
        };
        Some(Reservation(Charge {
            _share: share,
            _global: global,
        }))
    }

    /// Hold `anchor` with bytes reserved for it; if it is charged already (another response
    /// took it meanwhile), the reservation is given back.
    pub fn hold_reserved(self: &Arc<Self>, anchor: Anchor, reserved: Reservation) -> Held {
        let id = anchor.id();
        let mut shard = self.shard(id);
        let unused = match shard.get_mut(&id) {
            Some(e) => {
                e.holders += 1;
                Some(reserved)
            }
            None => {
                shard.insert(
                    id,
                    Entry {
                        holders: 1,
                        _charge: reserved.0,
                    },
                );
                None
            }
        };
        drop(shard);
        // Given back outside the lock.
        drop(unused);
        Held {
            budget: self.clone(),
            id,
            _anchor: anchor,
        }
    }
}

/// Counts a waiter for as long as it waits (a cancelled wait included).
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicU64) -> Waiting<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response's hold on a chunk: the chunk's charge is given back when its last holder drops.
pub struct Held {
    budget: Arc<ResponseBudget>,
    id: usize,
    /// Keeps the allocation (and so its address) alive while registered.
    _anchor: Anchor,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut shard = self.budget.shard(self.id);
        let Some(e) = shard.get_mut(&self.id) else {
            return;
        };
        e.holders -= 1;
        if e.holders == 0 {
            // The charge goes back (before the anchor goes), outside the shard's lock.
            let entry = shard.remove(&self.id);
            drop(shard);
            drop(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(n: usize) -> Anchor {
        Anchor::Chunk(Bytes::from(vec![7u8; n]))
    }

    #[test]
    fn a_chunk_is_charged_once_however_many_hold_it() {
        let b = ResponseBudget::new(10_000, 0);
        let a = chunk(1000);
        let h: Vec<Held> = (0..100)
            .map(|_| b.try_hold(a.clone(), 1000, 0).ok().unwrap())
            .collect();
        assert_eq!(b.held_bytes(), 1000 + HOLD_OVERHEAD);
        drop(h);
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn slices_of_one_chunk_are_one_chunk_and_distinct_chunks_are_charged_each() {
        let b = ResponseBudget::new(10_000, 0);
        let bytes = Bytes::from(vec![1u8; 1000]);
        let h1 = b
            .try_hold(Anchor::Chunk(bytes.clone()), 1000, 0)
            .ok()
            .unwrap();
        let h2 = b.try_hold(Anchor::Chunk(bytes), 1000, 0).ok().unwrap();
        let h3 = b.try_hold(chunk(1000), 1000, 0).ok().unwrap();
        assert_eq!(b.held_bytes(), 2 * (1000 + HOLD_OVERHEAD));
        drop(h1);
        assert_eq!(b.held_bytes(), 2 * (1000 + HOLD_OVERHEAD));
        drop(h2);
        assert_eq!(b.held_bytes(), 1000 + HOLD_OVERHEAD);
        drop(h3);
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn a_spent_budget_refuses_a_new_chunk_but_not_a_held_one() {
        let b = ResponseBudget::new(2 * (1000 + HOLD_OVERHEAD), 0);
        let (x, y) = (chunk(1000), chunk(1000));
        let _hx = b.try_hold(x.clone(), 1000, 0).ok().unwrap();
        let _hy = b.try_hold(y, 1000, 0).ok().unwrap();
        assert!(b.try_hold(chunk(1000), 1000, 0).is_err());
        // Joining a chunk already charged costs nothing.
        assert!(b.try_hold(x, 1000, 0).is_ok());
    }

    #[test]
    fn an_oversized_chunk_takes_the_whole_budget_and_is_still_served() {
        let b = ResponseBudget::new(500, 0);
        let h = b.try_hold(chunk(1000), 1000, 0).ok().unwrap();
        assert_eq!(b.held_bytes(), 500);
        drop(h);
        assert_eq!(b.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_budget_when_a_holder_lets_go_and_joins_a_chunk_charged_meanwhile() {
        let b = ResponseBudget::new(1000 + HOLD_OVERHEAD, 0);
        let first = b.try_hold(chunk(1000), 1000, 0).ok().unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let r = b.reserve(1000, 0).await.unwrap();
                b.hold_reserved(chunk(1000), r)
            })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the budget is spent: the waiter waits"
        );
        drop(first);
        let held = waiter.await.unwrap();
        assert_eq!(b.held_bytes(), 1000 + HOLD_OVERHEAD);
        assert_eq!(b.waits(), 1);
        // A reservation for a chunk someone already holds is given back.
        let shared = chunk(10);
        drop(held);
        let h1 = b.try_hold(shared.clone(), 10, 0).ok().unwrap();
        let r = b.reserve(10, 0).await.unwrap();
        let h2 = b.hold_reserved(shared, r);
        assert_eq!(b.held_bytes(), 10 + HOLD_OVERHEAD);
        drop((h1, h2));
        assert_eq!(b.held_bytes(), 0);
    }

    #[tokio::test]
    async fn nobody_jumps_the_queue_but_a_chunk_already_held_is_joined() {
        let b = ResponseBudget::new(2 * (1000 + HOLD_OVERHEAD), 0);
        let shared = chunk(1000);
        let first = b.try_hold(shared.clone(), 1000, 0).ok().unwrap();
        let second = b.try_hold(chunk(1000), 1000, 0).ok().unwrap();
        // A waiter for a large chunk queues; the space freed is smaller than it needs.
        let big = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(2000, 0).await.map(|_| ()) })
        };
        while b.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        drop(second);
        assert!(
            b.try_reserve(1000, 0).is_none(),
            "a small chunk must not jump the queue"
        );
        assert!(b.try_hold(chunk(1000), 1000, 0).is_err());
        assert!(b.try_hold(shared, 1000, 0).is_ok(), "joining costs nothing");
        drop(first);
        big.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_client_takes_at_most_its_share_and_others_still_get_room() {
        // A share of an eighth: 4 chunks of 1,000 bytes here.
        let b = ResponseBudget::new(32 * (1000 + HOLD_OVERHEAD), 1000);
        assert_eq!(b.client_share(), 4 * (1000 + HOLD_OVERHEAD));
        let (greedy, other) = (b.tag(&"10.0.0.1"), b.tag(&"10.0.0.2"));
        assert_ne!(greedy, other);
        let mut held: Vec<Held> = (0..4)
            .map(|_| b.try_hold(chunk(1000), 1000, greedy).ok().unwrap())
            .collect();
        assert!(
            b.try_hold(chunk(1000), 1000, greedy).is_err(),
            "over its share"
        );
        assert!(b.try_reserve(1000, greedy).is_none());
        // Its fifth response waits on its own share, not on the others.
        let fifth = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(1000, greedy).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert!(!fifth.is_finished());
        let mine = b.try_hold(chunk(1000), 1000, other);
        assert!(mine.is_ok(), "another client is not held up by it");
        // One of its chunks let go: its waiting response goes first.
        drop(held.pop());
        fifth.await.unwrap().unwrap();
        // A chunk the greedy client holds is joined for free by anyone.
        let shared = chunk(10);
        let s1 = b.try_hold(shared.clone(), 10, greedy).ok().unwrap();
        let before = b.held_bytes();
        let s2 = b.try_hold(shared, 10, other).ok().unwrap();
        assert_eq!(b.held_bytes(), before);
        drop(held);
        drop((s1, s2, mine));
        assert_eq!(b.held_bytes(), 0);
        assert_eq!(b.clients(), 0, "shares nobody uses are forgotten");
    }

    #[tokio::test]
    async fn a_share_waited_for_and_given_up_is_forgotten() {
        let b = ResponseBudget::new(8 * (1000 + HOLD_OVERHEAD), 1000);
        let c = b.tag(&"2001:db8::/64");
        let h: Vec<Held> = (0..2)
            .map(|_| b.try_hold(chunk(1000), 1000, c).ok().unwrap())
            .collect();
        let wait = tokio::time::timeout(std::time::Duration::from_millis(10), b.reserve(1000, c));
        assert!(wait.await.is_err(), "its share is spent");
        assert_eq!(b.clients(), 1);
        drop(h);
        assert_eq!(b.clients(), 0);
        let r = b.try_reserve(1000, c).unwrap();
        assert_eq!(b.clients(), 1);
        drop(r);
        assert_eq!(
            b.clients(),
            0,
            "a reservation dropped unused gives its share back"
        );
        assert_eq!(b.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_takes_nothing() {
        let b = ResponseBudget::new(1000 + HOLD_OVERHEAD, 0);
        let held = b.try_hold(chunk(1000), 1000, 0).ok().unwrap();
        let wait = tokio::time::timeout(std::time::Duration::from_millis(10), b.reserve(1000, 0));
        assert!(wait.await.is_err());
        assert_eq!(b.waiting.load(Ordering::Acquire), 0);
        drop(held);
        assert_eq!(b.held_bytes(), 0);
        assert!(b.try_hold(chunk(1000), 1000, 0).is_ok());
    }

    proptest! {
        /// Against a model: the charge is the sum over distinct held chunks, never above the
        /// limit, and everything is given back at the end.
        #[test]
        fn charges_follow_the_distinct_chunks_held(
            ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..200)
        ) {
            let limit = 3 * (100 + HOLD_OVERHEAD);
            let b = ResponseBudget::new(limit, 0);
            let chunks: Vec<Anchor> = (0..6).map(|_| chunk(100)).collect();
            let mut holds: Vec<Vec<Held>> = (0..6).map(|_| Vec::new()).collect();
            for (i, take) in ops {
                if take {
                    match b.try_hold(chunks[i].clone(), 100, 0) {
                        Ok(h) => holds[i].push(h),
                        Err(_) => {
                            let distinct = holds.iter().filter(|h| !h.is_empty()).count() as u64;
                            prop_assert!(holds[i].is_empty());
                            prop_assert_eq!(distinct, 3);
                        }
                    }
                } else {
                    holds[i].pop();
                }
                let distinct = holds.iter().filter(|h| !h.is_empty()).count() as u64;
                prop_assert_eq!(b.held_bytes(), distinct * (100 + HOLD_OVERHEAD));
                prop_assert!(b.held_bytes() <= limit);
            }
            drop(holds);
            prop_assert_eq!(b.held_bytes(), 0);
        }
    }
}
