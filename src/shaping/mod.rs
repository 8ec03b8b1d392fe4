//! Per-client bandwidth shaping and download caps.
//!
//! ```text
//! request ─► client key (identity.rs) ─► (client, class) entry (table.rs, bounded)
//!               │                                    │
//!               │                 max_downloads ─► 429 + Retry-After at once
//!               ▼
//!        Download ticket, handed to the client connection (conn::pace)
//!               │
//!        every write, just before it goes: pace(n ≤ MAX_PIECE) ─► wait (bucket.rs, GCRA)
//!               │        in the connection's guard, watching the client: gone ─► the write
//!               │        fails at once and the n bytes are given back (Download::refund)
//!              total_rate: active clients share it by weight, max-min fair (fair.rs),
//!              rebalanced every REBALANCE and whenever a client starts or stops
//! ```
//!
//! A client's connections and responses share one pacer, so together they get the client's
//! rate and each an even part of it. Nothing is buffered to shape: the writer waits before it
//! writes, so backpressure reaches whatever produces the bytes. Bytes are accounted when they
//! are about to be written, not when they are handed over (Pingora hands a proxied body over
//! in batches): what was never written is never charged, and use (what `total_rate` measures
//! demand by) is measured as the bytes go. The bytes paced are those the connection writes for
//! the response: its header and framing with its body.
//!
//! Locks: a shard of the client table on admission and release (never global); the client's
//! own pacer per body piece; a rebalance takes a try-lock, so at most one thread does it and no
//! other ever waits for it. Never panics on input.
//!
//! Reload: [`Shaper::update`] swaps the settings (`total_rate`) and the client table stays, so
//! clients keep their downloads in progress and connection counts. A client's next request on a
//! class whose limits changed moves the client's entry to them; a response already running
//! keeps its own class's `rate_after` and `burst`, and shares the client's rate.

pub mod bucket;
pub mod fair;
pub mod identity;
pub mod table;

use crate::config::{ShapingClass, ShapingSettings};
use arc_swap::ArcSwap;
use bucket::Pacer;
use fair::{water_fill, Claim};
use identity::ClientKey;
use std::any::Any;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use table::Table;
use tokio::time::Instant;

/// How often the node-wide share is recomputed from what clients actually used (also the window
/// over which a client's use is measured).
pub const REBALANCE: Duration = Duration::from_millis(250);
/// Largest piece accounted at once on a shaped response: the connection writes bigger pieces
/// in parts of this size, each paced, so that pacing is smooth rather than one burst per chunk.
pub const MAX_PIECE: usize = crate::conn::pace::MAX_RESERVATION;
/// A client seen using less than its share is still given at least this much headroom.
const MIN_DEMAND: u64 = 16 * 1024;

/// Counters of what shaping did (exposed on `/stats`; the metrics issue exports them).
#[derive(Debug, Default)]
pub struct ShapingStats {
    /// Body bytes that went through a pacer (after `rate_after`).
    pub shaped_bytes: AtomicU64,
    /// Total time body pieces were held back, in microseconds.
    pub delayed_us: AtomicU64,
    /// Requests refused with 429 because the client was at `max_downloads`.
    pub refused_downloads: AtomicU64,
    /// Connections refused because the client was at `max_connections`.
    pub refused_connections: AtomicU64,
    /// Clients with a response in progress now.
    pub active_clients: AtomicU64,
}

/// The key of a pacer: one per (client, class).
type EntryKey = (ClientKey, Arc<str>);

struct Client {
    /// The class as of the client's latest admission (a reload may have changed it since).
    class: ArcSwap<ShapingClass>,
    pacer: Mutex<Pacer>,
    /// Responses in progress.
    downloads: AtomicU32,
    /// Rate in force now, bytes/s: the class rate, or the node-wide allocation.
    rate: AtomicU64,
    /// Bytes sent since the last rebalance (the client's observed demand).
    sent: AtomicU64,
    /// The allocation of the last rebalance (0 = none yet).
    allocated: AtomicU64,
    /// What the client would use, bytes/s, as last measured (`u64::MAX` = its cap).
    demand: AtomicU64,
    /// Microseconds since the shaper started, at the last use (for LRU eviction).
    last_used: AtomicU64,
    /// The client's connections seen on this class's routes, as weak handles to a per-connection
    /// object: a connection that closed drops it, so dead ones are pruned when next looked at.
    /// At most `max_connections` live ones (only kept when that cap is set).
    connections: Mutex<Vec<Weak<dyn Any + Send + Sync>>>,
}

impl Client {
    /// Whether `conn` may carry requests: it is one of the client's known connections, or the
    /// client has fewer than `max` live ones (then it is recorded).
    fn admit_connection(&self, conn: &ConnectionHandle, max: u32) -> bool {
        let mut conns = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|w| w.strong_count() > 0);
        let me = Arc::downgrade(conn);
        if conns.iter().any(|w| w.ptr_eq(&me)) {
            return true;
        }
        if conns.len() >= max as usize {
            return false;
        }
        conns.push(me);
        true
    }
}

impl table::Entry for Client {
    fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

struct Inner {
    settings: ArcSwap<ShapingSettings>,
    clients: Table<EntryKey, Client>,
    /// Clients with a response in progress: what a rebalance looks at.
    active: Table<EntryKey, Client>,
    stats: Arc<ShapingStats>,
    base: Instant,
    /// Microseconds since `base` when the next periodic rebalance is due.
    next_rebalance: AtomicU64,
    /// Microseconds since `base` of the last periodic rebalance (start of the use window).
    last_measured: AtomicU64,
    rebalancing: Mutex<()>,
}

/// The shaper of a node, shared by all requests.
#[derive(Clone)]
pub struct Shaper {
    inner: Arc<Inner>,
}

/// Why a request of a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client has `max_downloads` responses in progress.
    Downloads { max: u32 },
    /// The request came on a new connection of a client that has `max_connections` open.
    Connections { max: u32 },
}

/// A handle that lives exactly as long as the client's connection (Pingora's per-connection
/// socket digest): compared by identity, held weakly.
pub type ConnectionHandle = Arc<dyn Any + Send + Sync>;

impl Shaper {
    pub fn new(settings: Arc<ShapingSettings>, stats: Arc<ShapingStats>) -> Shaper {
        Shaper {
            inner: Arc::new(Inner {
                clients: Table::new(settings.max_clients),
                active: Table::new(settings.max_clients),
                settings: ArcSwap::new(settings),
                stats,
                base: Instant::now(),
                next_rebalance: AtomicU64::new(0),
                last_measured: AtomicU64::new(0),
                rebalancing: Mutex::new(()),
            }),
        }
    }

    pub fn settings(&self) -> Arc<ShapingSettings> {
        self.inner.settings.load_full()
    }

    /// Put reloaded settings in force. The client table is kept (its size,
    /// `shaping.max_clients`, is not changed by this); clients move to their class's new limits
    /// at their next request.
    pub fn update(&self, settings: Arc<ShapingSettings>) {
        self.inner.settings.store(settings);
        self.inner.rebalance(true);
    }

    pub fn stats(&self) -> &Arc<ShapingStats> {
        &self.inner.stats
    }

    /// Entries in the client table (bounded by `shaping.max_clients` plus clients in use).
    pub fn tracked_clients(&self) -> usize {
        self.inner.clients.len()
    }

    /// Start a response for `client` in `class`: refused when the client is at its
    /// `max_downloads`, or when `connection` is a new one and the client already has
    /// `max_connections` open; otherwise a ticket that paces the body and ends the download when
    /// dropped.
    pub fn admit(
        &self,
        client: ClientKey,
        class: &Arc<ShapingClass>,
        connection: Option<&ConnectionHandle>,
    ) -> Result<Download, Refused> {
        let inner = &self.inner;
        let key: EntryKey = (client, class.name.clone());
        let now = inner.micros(Instant::now());
        let entry = inner.clients.get_or_insert_with(&key, || Client {
            class: ArcSwap::new(class.clone()),
            pacer: Mutex::new(Pacer::default()),
            downloads: AtomicU32::new(0),
            rate: AtomicU64::new(class.rate),
            sent: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            demand: AtomicU64::new(u64::MAX),
            last_used: AtomicU64::new(now),
            connections: Mutex::new(Vec::new()),
        });
        entry.last_used.store(now, Ordering::Relaxed);
        if **entry.class.load() != **class {
            // The class was reloaded with other limits: the client follows them from now on
            // (a node-wide share is recomputed at the next rebalance).
            entry.class.store(class.clone());
            entry.rate.store(class.rate, Ordering::Relaxed);
        }
        if let (max, Some(conn)) = (class.max_connections, connection) {
            if max > 0 && !entry.admit_connection(conn, max) {
                inner
                    .stats
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Connections { max });
            }
        }
        let max = class.max_downloads;
        let admitted = entry
            .downloads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (max == 0 || d < max).then_some(d + 1)
            });
        match admitted {
            Err(_) => {
                inner
                    .stats
                    .refused_downloads
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Downloads { max });
            }
            Ok(0) => {
                // The active table holds the same entry as the client table.
                inner.active.insert(&key, entry.clone());
                inner.stats.active_clients.fetch_add(1, Ordering::Relaxed);
                inner.rebalance(true);
            }
            Ok(_) => {}
        }
        Ok(Download {
            shaper: inner.clone(),
            key,
            class: class.clone(),
            client: entry,
            own: Pacer::default(),
            sent: 0,
        })
    }
}

impl Inner {
    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    /// Recompute every active client's rate under `total_rate`: at once when `force` (a client
    /// started or stopped), else when the period is due. Never waits: if another thread is
    /// rebalancing, it does the work.
    fn rebalance(&self, force: bool) {
        let total = self.settings.load().total_rate;
        if total == 0 {
            return;
        }
        let now = Instant::now();
        let now_us = self.micros(now);
        if !force && now_us < self.next_rebalance.load(Ordering::Relaxed) {
            return;
        }
        let Ok(_guard) = self.rebalancing.try_lock() else {
            return;
        };
        // A periodic rebalance measures what each client used since the last one; a forced one
        // (a client came or went) reuses the last measurement.
        let measure = !force || now_us >= self.next_rebalance.load(Ordering::Relaxed);
        let window_us = if measure {
            self.next_rebalance
                .store(now_us + REBALANCE.as_micros() as u64, Ordering::Release);
            now_us
                .saturating_sub(self.last_measured.swap(now_us, Ordering::AcqRel))
                .max(1)
        } else {
            0
        };
        let mut clients: Vec<Arc<Client>> = Vec::new();
        self.active.for_each(|c| clients.push(c.clone()));
        let claims: Vec<Claim> = clients
            .iter()
            .map(|c| {
                let class = c.class.load();
                let cap = if class.rate == 0 {
                    u64::MAX
                } else {
                    class.rate
                };
                if measure {
                    let used =
                        c.sent.swap(0, Ordering::AcqRel).saturating_mul(1_000_000) / window_us;
                    let had = c.allocated.load(Ordering::Relaxed);
                    // Demand follows use, with hysteresis: a client using (nearly) all it was
                    // given may want more, so it asks for twice as much; one using clearly less
                    // (a slow client) asks for what it uses plus headroom, leaving the rest to
                    // the others; in between it keeps what it has. New clients ask for their cap.
                    let demand = if had == 0 {
                        u64::MAX
                    } else if used >= had / 10 * 9 {
                        had.saturating_mul(2)
                    } else if used < had / 10 * 7 {
                        (used / 4 * 5).max(MIN_DEMAND)
                    } else {
                        had
                    };
                    c.demand.store(demand, Ordering::Relaxed);
                }
                Claim {
                    weight: class.weight,
                    demand: c.demand.load(Ordering::Relaxed).min(cap),
                }
            })
            .collect();
        let alloc = water_fill(total, &claims);
        for (c, a) in clients.iter().zip(alloc) {
            c.allocated.store(a.max(1), Ordering::Relaxed);
            c.rate.store(a.max(1), Ordering::Relaxed);
        }
    }
}

/// One shaped response in progress. Dropping it ends the download (frees a `max_downloads`
/// slot and, for the client's last one, its share of `total_rate`).
pub struct Download {
    shaper: Arc<Inner>,
    key: EntryKey,
    /// The class this response was admitted in (its `rate_after` and `burst` hold to its end).
    class: Arc<ShapingClass>,
    client: Arc<Client>,
    /// This response's own pacer, at the client's rate divided by its downloads in progress:
    /// it makes the split even whatever the piece sizes of each response.
    own: Pacer,
    /// Body bytes of this response accounted so far.
    sent: u64,
}

impl Download {
    /// Account `n` body bytes about to be written; returns how long to wait before writing
    /// them. The first `rate_after` bytes of each response are not paced.
    pub fn pace(&mut self, n: usize) -> Duration {
        let n = n as u64;
        let class = &self.class;
        let free = class.rate_after.saturating_sub(self.sent).min(n);
        self.sent = self.sent.saturating_add(n);
        self.client.sent.fetch_add(n, Ordering::Relaxed);
        let paced = n - free;
        let rate = self.client.rate.load(Ordering::Relaxed);
        if paced == 0 || rate == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        // Two pacers: the client's (all its responses together stay within its rate and
        // burst) and this response's (an even part of it).
        let k = self.split();
        let own = self
            .own
            .reserve(now, paced, (rate / k).max(1), (class.burst / k).max(1));
        let shared = self
            .client
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(now, paced, rate, class.burst);
        let wait = own.max(shared);
        let stats = &self.shaper.stats;
        stats.shaped_bytes.fetch_add(paced, Ordering::Relaxed);
        if !wait.is_zero() {
            let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
            stats.delayed_us.fetch_add(us, Ordering::Relaxed);
        }
        self.client
            .last_used
            .store(self.shaper.micros(now), Ordering::Relaxed);
        self.shaper.rebalance(false);
        wait
    }

    /// The last `n` bytes accounted by [`Download::pace`] were never written (the client left
    /// during the wait, or the write failed): given back to the client's pacer, so that they do
    /// not delay its other responses, and to its measured use, so that they do not count as
    /// demand under `total_rate`.
    pub fn refund(&mut self, n: u64) {
        let n = n.min(self.sent);
        if n == 0 {
            return;
        }
        // The refunded bytes are the last accounted; the first `rate_after` went unpaced.
        let paced = self.sent - self.class.rate_after.min(self.sent);
        let refund = n.min(paced);
        self.sent -= n;
        let _ = self
            .client
            .sent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(s.saturating_sub(n))
            });
        if refund == 0 {
            return;
        }
        let _ =
            self.shaper
                .stats
                .shaped_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    Some(s.saturating_sub(refund))
                });
        let rate = self.client.rate.load(Ordering::Relaxed);
        let now = Instant::now();
        self.own.refund(now, refund, (rate / self.split()).max(1));
        self.client
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refund(now, refund, rate);
    }

    /// How many ways the client's rate is split now (its responses in progress).
    fn split(&self) -> u64 {
        u64::from(self.client.downloads.load(Ordering::Relaxed).max(1))
    }

    /// The rate in force for this client now, bytes/s (0 = unpaced).
    pub fn rate(&self) -> u64 {
        self.client.rate.load(Ordering::Relaxed)
    }
}

/// A shaped response is paced at its connection's writes ([`crate::conn::pace`]).
impl crate::conn::pace::BodyPacer for Download {
    fn pace(&mut self, n: usize) -> Duration {
        Download::pace(self, n)
    }

    fn refund(&mut self, n: usize) {
        Download::refund(self, n as u64)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let before = self.client.downloads.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            let inner = &self.shaper;
            inner
                .active
                .remove_if(&self.key, |c| c.downloads.load(Ordering::Acquire) == 0);
            inner.stats.active_clients.fetch_sub(1, Ordering::Relaxed);
            // The class rate again, until the next allocation.
            self.client
                .rate
                .store(self.client.class.load().rate, Ordering::Relaxed);
            self.client.allocated.store(0, Ordering::Relaxed);
            inner.rebalance(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::identity::KeySource;
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use tokio::time::advance;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn class(rate: u64, max_downloads: u32, rate_after: u64) -> Arc<ShapingClass> {
        Arc::new(ShapingClass {
            name: Arc::from("standard"),
            rate,
            burst: 64 * KIB,
            rate_after,
            weight: 1,
            max_downloads,
            max_connections: 0,
        })
    }

    fn shaper(total_rate: u64) -> Shaper {
        Shaper::new(
            Arc::new(ShapingSettings {
                client_key: KeySource::RemoteAddr,
                ipv6_prefix: 64,
                total_rate,
                max_clients: 1000,
                classes: BTreeMap::new(),
            }),
            Arc::new(ShapingStats::default()),
        )
    }

    fn client(n: u8) -> ClientKey {
        ClientKey::Ip(IpAddr::from([127, 0, 0, n]))
    }

    /// Run `downloads` side by side for `secs` of paused time, each sending 16 KiB pieces as
    /// fast as its pacing allows; returns the bytes each sent.
    async fn run(downloads: &mut [Download], secs: u64) -> Vec<u64> {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut ready: Vec<Instant> = vec![Instant::now(); downloads.len()];
        let mut sent = vec![0u64; downloads.len()];
        loop {
            let (i, at) = ready
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, t)| *t)
                .expect("downloads");
            if at >= end {
                return sent;
            }
            advance(at.saturating_duration_since(Instant::now())).await;
            let wait = downloads[i].pace(16 * KIB as usize);
            sent[i] += 16 * KIB;
            ready[i] = Instant::now() + wait;
        }
    }

    fn near(got: u64, want: u64, tolerance: f64) -> bool {
        (got as f64 - want as f64).abs() <= want as f64 * tolerance
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_downloads_share_its_rate_evenly() {
        let s = shaper(0);
        let c = class(MIB, 0, 0);
        let mut d = vec![
            s.admit(client(2), &c, None).expect("first"),
            s.admit(client(2), &c, None).expect("second"),
        ];
        let sent = run(&mut d, 10).await;
        let total: u64 = sent.iter().sum();
        assert!(near(total, 10 * MIB + 64 * KIB, 0.02), "{sent:?}");
        assert!(near(sent[0], sent[1], 0.05), "{sent:?}");
    }

    /// Run two downloads whose pieces differ in size (as a cached and a pass-through response
    /// of one client would) for `secs`; returns the bytes each sent.
    async fn run_uneven(a: &mut Download, b: &mut Download, secs: u64) -> [u64; 2] {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut ready = [Instant::now(); 2];
        let mut sent = [0u64; 2];
        let sizes = [16 * KIB, 64 * KIB];
        loop {
            let i = usize::from(ready[1] < ready[0]);
            if ready[i] >= end {
                return sent;
            }
            advance(ready[i].saturating_duration_since(Instant::now())).await;
            let d = if i == 0 { &mut *a } else { &mut *b };
            let wait = d.pace(sizes[i] as usize);
            sent[i] += sizes[i];
            ready[i] = Instant::now() + wait;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_split_is_even_whatever_the_piece_sizes() {
        let s = shaper(0);
        let c = class(MIB, 0, 0);
        let mut a = s.admit(client(2), &c, None).expect("a");
        let mut b = s.admit(client(2), &c, None).expect("b");
        let sent = run_uneven(&mut a, &mut b, 20).await;
        assert!(near(sent[0], sent[1], 0.10), "{sent:?}");
        assert!(near(sent[0] + sent[1], 20 * MIB, 0.05), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reloaded_class_applies_from_the_clients_next_request_and_keeps_its_state() {
        let s = shaper(0);
        let before = class(MIB, 2, 0);
        let running = s.admit(client(2), &before, None).expect("first");
        // A reload halves the class's rate and allows one download per client.
        let after = class(MIB / 2, 1, 0);
        // The client's download in progress still counts against the new cap...
        assert_eq!(
            s.admit(client(2), &after, None).err(),
            Some(Refused::Downloads { max: 1 })
        );
        // ...and the client now has the new rate, shared with the download in progress.
        assert_eq!(running.rate(), MIB / 2);
        drop(running);
        let mut d = vec![s
            .admit(client(2), &after, None)
            .expect("after the first ended")];
        let sent = run(&mut d, 10).await;
        assert!(near(sent[0], 5 * MIB + 64 * KIB, 0.02), "{sent:?}");
        assert_eq!(s.tracked_clients(), 1, "the client's entry was kept");
    }

    #[tokio::test(start_paused = true)]
    async fn different_clients_each_get_their_rate() {
        let s = shaper(0);
        let c = class(MIB, 0, 0);
        let mut d = vec![
            s.admit(client(2), &c, None).expect("a"),
            s.admit(client(3), &c, None).expect("b"),
        ];
        let sent = run(&mut d, 10).await;
        for x in &sent {
            assert!(near(*x, 10 * MIB + 64 * KIB, 0.02), "{sent:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn total_rate_is_shared_by_active_clients() {
        let s = shaper(3 * MIB / 2);
        let c = class(MIB, 0, 0);
        let mut d: Vec<Download> = (2..5)
            .map(|n| s.admit(client(n), &c, None).expect("admitted"))
            .collect();
        let sent = run(&mut d, 10).await;
        let total: u64 = sent.iter().sum();
        assert!(near(total, 15 * MIB, 0.05), "at the cap: {sent:?}");
        for x in &sent {
            assert!(near(*x, 5 * MIB, 0.10), "a third each: {sent:?}");
        }
        assert_eq!(s.stats().active_clients.load(Ordering::Relaxed), 3);
        drop(d);
        assert_eq!(s.stats().active_clients.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_gives_its_share_back() {
        let s = shaper(2 * MIB);
        let c = class(4 * MIB, 0, 0);
        let a = s.admit(client(2), &c, None).expect("a");
        let b = s.admit(client(3), &c, None).expect("b");
        assert_eq!(a.rate(), MIB);
        drop(b);
        assert_eq!(a.rate(), 2 * MIB, "rebalanced at once");
    }

    #[tokio::test(start_paused = true)]
    async fn after_many_clients_leave_the_one_left_gets_the_whole_rate() {
        let s = shaper(MIB);
        let c = class(MIB, 0, 0);
        let mut all: Vec<Download> = (2..23)
            .map(|n| s.admit(client(n), &c, None).expect("admitted"))
            .collect();
        run(&mut all, 3).await;
        let mut left = all.split_off(20);
        drop(all);
        // Its share went from a 21st to the whole: within a few rebalances it uses it all.
        let sent = run(&mut left, 10).await;
        assert!(sent[0] > 8 * MIB, "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_leaves_its_unused_share_to_the_others() {
        let s = shaper(3 * MIB);
        let c = class(10 * MIB, 0, 0);
        let mut fast: Vec<Download> = (2..4)
            .map(|n| s.admit(client(n), &c, None).expect("fast"))
            .collect();
        let mut slow = s.admit(client(9), &c, None).expect("slow");
        // The slow client reads 100 KiB/s whatever its share; the others as fast as allowed.
        let end = Instant::now() + Duration::from_secs(10);
        let mut ready = [Instant::now(); 2];
        let mut slow_next = Instant::now();
        let mut sent = [0u64; 2];
        while Instant::now() < end {
            let (i, at) = if ready[0] <= ready[1] {
                (0, ready[0])
            } else {
                (1, ready[1])
            };
            let next = at.min(slow_next);
            advance(next.saturating_duration_since(Instant::now())).await;
            if slow_next <= at {
                let _ = slow.pace(10 * KIB as usize);
                slow_next = Instant::now() + Duration::from_millis(100);
                continue;
            }
            let wait = fast[i].pace(16 * KIB as usize);
            sent[i] += 16 * KIB;
            ready[i] = Instant::now() + wait;
        }
        // Each fast client ends up well above a third of the total.
        for x in sent {
            assert!(x > 13 * MIB, "{sent:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_downloads_refuses_at_once_and_frees_on_drop() {
        let s = shaper(0);
        let c = class(MIB, 2, 0);
        let a = s.admit(client(2), &c, None).expect("1");
        let _b = s.admit(client(2), &c, None).expect("2");
        assert_eq!(
            s.admit(client(2), &c, None).err(),
            Some(Refused::Downloads { max: 2 })
        );
        // Another client is unaffected.
        assert!(s.admit(client(3), &c, None).is_ok());
        drop(a);
        assert!(s.admit(client(2), &c, None).is_ok());
        assert_eq!(s.stats().refused_downloads.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_connections_counts_live_connections_only() {
        let s = shaper(0);
        let c = Arc::new(ShapingClass {
            max_connections: 2,
            ..(*class(MIB, 0, 0)).clone()
        });
        let conn = || -> ConnectionHandle { Arc::new(()) };
        let (one, two, three) = (conn(), conn(), conn());
        let _a = s
            .admit(client(2), &c, Some(&one))
            .expect("first connection");
        let _b = s
            .admit(client(2), &c, Some(&two))
            .expect("second connection");
        // More requests on known connections are fine; a third connection is not.
        let _a2 = s.admit(client(2), &c, Some(&one)).expect("same connection");
        assert_eq!(
            s.admit(client(2), &c, Some(&three)).err(),
            Some(Refused::Connections { max: 2 })
        );
        // Other clients are unaffected.
        assert!(s.admit(client(3), &c, Some(&three)).is_ok());
        // Once a connection closes (its handle dropped), a new one is admitted.
        drop(two);
        let four = conn();
        assert!(s.admit(client(2), &c, Some(&four)).is_ok());
        assert_eq!(s.stats().refused_connections.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_paced_but_never_written_are_given_back() {
        let s = shaper(0);
        let c = class(MIB, 0, 0);
        // A download that accounted 1 MiB and wrote only the first 64 KiB (its client left):
        // refunded, the client's next download is not held behind the rest.
        let mut ghost = s.admit(client(2), &c, None).expect("ghost");
        for _ in 0..16 {
            let _ = ghost.pace(64 * KIB as usize);
        }
        ghost.refund(15 * 64 * KIB);
        drop(ghost);
        let mut next = s.admit(client(2), &c, None).expect("next");
        // The ghost's 64 KiB written used the burst; the next piece waits its own time only.
        let wait = next.pace(64 * KIB as usize);
        assert!(wait <= Duration::from_millis(63), "{wait:?}");
        assert_eq!(s.stats().shaped_bytes.load(Ordering::Relaxed), 128 * KIB);
        // Not refunded, the same ghost would have held it back about a second.
        let s = shaper(0);
        let mut ghost = s.admit(client(2), &c, None).expect("ghost");
        for _ in 0..16 {
            let _ = ghost.pace(64 * KIB as usize);
        }
        drop(ghost);
        let mut next = s.admit(client(2), &c, None).expect("next");
        assert!(next.pace(64 * KIB as usize) > Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_after_goes_unpaced() {
        let s = shaper(0);
        let c = class(100 * KIB, 0, MIB);
        let mut d = s.admit(client(2), &c, None).expect("admitted");
        for _ in 0..64 {
            assert_eq!(d.pace(16 * KIB as usize), Duration::ZERO);
        }
        // Past rate_after (and the burst) the pacing starts.
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited += d.pace(16 * KIB as usize);
        }
        assert!(waited > Duration::from_millis(500), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_under_many_clients() {
        let s = shaper(0);
        let c = class(MIB, 0, 0);
        for i in 0..100_000u32 {
            let key = ClientKey::Ip(IpAddr::from(i.to_be_bytes()));
            drop(s.admit(key, &c, None).expect("admitted"));
        }
        assert!(s.tracked_clients() <= 1000 + 16, "{}", s.tracked_clients());
    }
}
