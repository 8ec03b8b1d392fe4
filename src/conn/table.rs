//! Every open client connection of a listener service, so that at `max_connections` the idle
//! ones can be closed, oldest first, to admit new clients (nginx's reusable connections); with
//! none idle, the connections whose request header has been arriving longest (each is
//! answered 408), so that clients that never finish a header cannot hold the cap for
//! `header_timeout` at a time; past that new connections are refused at once rather than left
//! to hang.
//!
//! Each connection's [`Phase`] is an atomic that its stream guard, its request loop and the
//! reclaimer move forward; the table's lock is taken only when a connection opens, closes or
//! must be reclaimed, never per request.

use super::pace::{BodyPacer, PacedWrites};
use futures::task::AtomicWaker;
use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a connection is in its life. `Fresh` and `Idle` connections are reclaimed first, then
/// `Header` ones; never `Busy` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Accepted; not a byte of its first request yet.
    Fresh = 0,
    /// A keep-alive connection between requests.
    Idle = 1,
    /// A request header is arriving.
    Header = 2,
    /// A request is being served.
    Busy = 3,
    /// Reclaimed: its next read ends the connection. Final.
    Closing = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Fresh,
            1 => Phase::Idle,
            2 => Phase::Header,
            3 => Phase::Busy,
            _ => Phase::Closing,
        }
    }
}

/// What the table and a connection's guard share.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    phase: AtomicU8,
    /// When it became `Fresh` or `Idle`, in ms since the table's epoch: reclaim order.
    since_ms: AtomicU64,
    /// The task reading the connection, woken when it is reclaimed.
    reader: AtomicWaker,
    /// Bytes arrived past the current request's header (a body, or pipelined requests):
    /// Pingora may hold the start of the next request already.
    overread: AtomicBool,
    /// The HTTP application has the current request (its header parsed and handed over).
    app_request: AtomicBool,
    /// The status of an answer written before the application had a request (the guard's
    /// 408/414/431, Pingora's 400 to a header it could not parse), until the access log takes
    /// it; 0: none.
    unparsed_answer: AtomicU16,
    /// The pacer of the response in progress, when it is shaped ([`Conn::pace_response`]).
    paced: Mutex<Option<PacedWrites>>,
    /// Whether `paced` holds one (read per write, without the lock).
    pacing: AtomicBool,
    /// Writes on the connection wait until this instant, in µs since `epoch` (0: no gate):
    /// what the pacer asked, enforced by the connection's guard, which watches for the client
    /// leaving meanwhile.
    write_gate_us: AtomicU64,
    /// Responses on the connection that may hold chunks of the response budget
    /// ([`Conn::holding_memory`]).
    holding: AtomicU32,
    /// Since when its write has made no progress, in ms since `epoch`, plus 1 (0: none stalled).
    stalled_ms: AtomicU64,
    /// The task writing the connection, woken when it is cut ([`ConnTable::cut_longest_stalled`]).
    writer: AtomicWaker,
    /// Cut to give its memory to responses that wait for it: its next write fails.
    cut: AtomicBool,
    /// The table's epoch.
    epoch: Instant,
}

impl Conn {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn advance(&self, from: &[Phase], to: Phase) -> bool {
        let mut cur = self.phase.load(Ordering::Acquire);
        loop {
            if !from.contains(&Phase::from_u8(cur)) {
                return false;
            }
            match self.phase.compare_exchange_weak(
                cur,
                to as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The first byte of a request arrived.
    pub fn begin_header(&self) -> bool {
        self.advance(&[Phase::Fresh, Phase::Idle], Phase::Header)
    }

    /// A request header has been read: serving it.
    pub fn begin_request(&self) -> bool {
        self.advance(&[Phase::Fresh, Phase::Idle, Phase::Header], Phase::Busy)
    }

    /// Pingora parsed a request header (its hook). Unless the guard saw that header end
    /// (`Busy`), it came at least in part from bytes Pingora already held (a pipelined
    /// request), which may hold more: the next wait must be Pingora's own read.
    pub fn request_parsed(&self) {
        if self.phase() != Phase::Busy {
            self.note_overread();
        }
        self.app_request.store(true, Ordering::Relaxed);
        self.begin_request();
    }

    /// Whether the application has the current request.
    pub fn app_has_request(&self) -> bool {
        self.app_request.load(Ordering::Relaxed)
    }

    /// An answer with `status` was written to a request the application never had.
    pub fn answered_unparsed(&self, status: u16) {
        self.unparsed_answer.store(status, Ordering::Relaxed);
    }

    /// The status of such an answer since the last call, if any.
    pub fn take_unparsed_answer(&self) -> Option<u16> {
        match self.unparsed_answer.swap(0, Ordering::Relaxed) {
            0 => None,
            s => Some(s),
        }
    }

    /// The response is done and the connection kept alive.
    pub fn set_idle(&self, since_ms: u64) {
        self.app_request.store(false, Ordering::Relaxed);
        self.since_ms.store(since_ms, Ordering::Relaxed);
        self.end_pacing();
        self.advance(&[Phase::Busy, Phase::Header], Phase::Idle);
    }

    /// Bytes arrived past a request header.
    pub fn note_overread(&self) {
        self.overread.store(true, Ordering::Relaxed);
    }

    /// Whether bytes arrived past the header since the last call.
    pub fn take_overread(&self) -> bool {
        self.overread.swap(false, Ordering::Relaxed)
    }

    /// When the connection last became reclaimable, in ms since the table's epoch.
    pub fn since_ms(&self) -> u64 {
        self.since_ms.load(Ordering::Relaxed)
    }

    /// Pace the response in progress with `pacer`: from now on its writes are accounted just
    /// before they go out and wait, in the connection's guard, until the pacer allows them,
    /// while the guard watches the client: one that leaves (FIN or reset) fails the write at
    /// once, which ends the response and frees what it holds. Ends with the response
    /// ([`Conn::end_pacing`], or the next [`Conn::set_idle`]).
    pub fn pace_response(&self, pacer: Box<dyn BodyPacer>) {
        *self.lock_paced() = Some(PacedWrites::new(pacer));
        self.pacing.store(true, Ordering::Release);
    }

    /// The response's pacing ends: bytes accounted but not written are given back, and the
    /// pacer is dropped (for a shaped download, that ends it).
    pub fn end_pacing(&self) {
        self.write_gate_us.store(0, Ordering::Relaxed);
        if self.pacing.swap(false, Ordering::AcqRel) {
            let ended = self.lock_paced().take();
            drop(ended);
        }
    }

    /// Whether the response in progress is paced.
    pub fn is_paced(&self) -> bool {
        self.pacing.load(Ordering::Acquire)
    }

    fn lock_paced(&self) -> std::sync::MutexGuard<'_, Option<PacedWrites>> {
        // Only this connection's task takes it; a panic cannot leave it inconsistent.
        self.paced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write of `want` bytes is about to go: `None` when the response is not paced, else how
    /// many of them may go once the write gate (set here when bytes were just accounted) has
    /// passed.
    pub(super) fn reserve_write(&self, want: usize) -> Option<usize> {
        if !self.pacing.load(Ordering::Acquire) {
            return None;
        }
        let (allowed, wait) = self.lock_paced().as_mut()?.reserve(want);
        if !wait.is_zero() {
            self.hold_writes_until(Instant::now() + wait);
        }
        Some(allowed)
    }

    /// `n` bytes allowed by [`Conn::reserve_write`] were written.
    pub(super) fn written(&self, n: usize) {
        if self.pacing.load(Ordering::Acquire) {
            if let Some(p) = self.lock_paced().as_mut() {
                p.written(n);
            }
        }
    }

    /// The bytes allowed will not be written (the client left, or the write failed).
    pub(super) fn refund_reserved(&self) {
        if self.pacing.load(Ordering::Acquire) {
            if let Some(p) = self.lock_paced().as_mut() {
                p.refund_reserved();
            }
        }
    }

    fn hold_writes_until(&self, at: Instant) {
        self.write_gate_us
            .fetch_max(self.micros(at), Ordering::AcqRel);
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// When writes may go on, if they are held.
    pub(super) fn write_gate(&self) -> Option<Instant> {
        match self.write_gate_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(self.epoch + Duration::from_micros(us)),
        }
    }

    /// The gate `at` (from [`Conn::write_gate`]) has passed: lift it, unless a later one was
    /// set meanwhile.
    pub(super) fn lift_write_gate(&self, at: Instant) {
        let _ = self.write_gate_us.compare_exchange(
            self.micros(at),
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// A response on this connection may hold chunks of the response budget until the mark
    /// drops: if its client then reads nothing while other responses wait for the budget, the
    /// connection may be cut ([`ConnTable::cut_longest_stalled`]).
    pub fn holding_memory(self: &Arc<Self>) -> HoldingMemory {
        self.holding.fetch_add(1, Ordering::AcqRel);
        HoldingMemory(self.clone())
    }

    /// A write made no progress (the guard calls it on every stalled poll of a write): noted
    /// from its first call until [`Conn::write_progressed`]; `waker` is woken if the connection
    /// is cut. Whether it has been cut (the write must fail).
    pub(super) fn write_stalled(&self, waker: &std::task::Waker) -> bool {
        if self.stalled_ms.load(Ordering::Relaxed) == 0 {
            let ms = (self.epoch.elapsed().as_millis() as u64).saturating_add(1);
            self.stalled_ms.store(ms, Ordering::Relaxed);
        }
        self.writer.register(waker);
        self.cut.load(Ordering::Acquire)
    }

    /// A write made progress.
    pub(super) fn write_progressed(&self) {
        if self.stalled_ms.load(Ordering::Relaxed) != 0 {
            self.stalled_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Register the task that reads the connection (called while it waits for a request).
    pub fn register_reader(&self, waker: &std::task::Waker) {
        self.reader.register(waker);
    }

    /// Resolves once the table has reclaimed this connection (for a task that holds it
    /// outside the guard: a TLS handshake, an h2c preface, an HTTP/2 connection).
    pub async fn reclaimed(&self) {
        std::future::poll_fn(|cx| {
            self.register_reader(cx.waker());
            if self.phase() == Phase::Closing {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl crate::cache::held::Relief for ConnTable {
    fn relieve(&self, min_stall: Duration) -> bool {
        self.cut_longest_stalled(min_stall)
    }
}

/// A response's mark on its connection ([`Conn::holding_memory`]); removed when dropped.
pub struct HoldingMemory(Arc<Conn>);

impl Drop for HoldingMemory {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connection counters, for `/stats` (and the metrics issue).
#[derive(Debug, Default)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    pub reclaimed: AtomicU64,
    pub refused: AtomicU64,
    pub keepalive_closed: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub send_timeouts: AtomicU64,
    /// Requests answered 414 or 431 before Pingora parsed them.
    pub oversize_rejected: AtomicU64,
    /// Responses ended because their client left while a paced write waited.
    pub paced_aborts: AtomicU64,
    /// Connections cut because their client read nothing while other responses waited for the
    /// response budget ([`ConnTable::cut_longest_stalled`]).
    pub stalled_cut: AtomicU64,
}

/// How many idle connections one reclaim closes at most (nginx drains up to 32): enough that
/// a burst of new clients does not rescan the table for each one.
const RECLAIM_BATCH: usize = 16;

#[derive(Debug)]
pub struct ConnTable {
    max: usize,
    epoch: Instant,
    open: AtomicUsize,
    /// Reclaimed connections not yet gone: they no longer count against `max`.
    closing: AtomicUsize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    pub stats: ConnStats,
}

impl ConnTable {
    pub fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max: max.max(1),
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            stats: ConnStats::default(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now (reclaimed ones still closing included).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Milliseconds since the table's epoch.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The instant `ms` after the epoch.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Admit a new connection: under the cap; or at it, after closing the oldest idle ones.
    /// `None`: at the cap with nothing idle; the caller refuses the connection.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let closing = self.closing.load(Ordering::Acquire);
        if open.saturating_sub(closing) > self.max && self.reclaim(RECLAIM_BATCH) == 0 {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            phase: AtomicU8::new(Phase::Fresh as u8),
            since_ms: AtomicU64::new(self.now_ms()),
            reader: AtomicWaker::new(),
            overread: AtomicBool::new(false),
            app_request: AtomicBool::new(false),
            unparsed_answer: AtomicU16::new(0),
            paced: Mutex::new(None),
            pacing: AtomicBool::new(false),
            write_gate_us: AtomicU64::new(0),
            holding: AtomicU32::new(0),
            stalled_ms: AtomicU64::new(0),
            writer: AtomicWaker::new(),
            cut: AtomicBool::new(false),
            epoch: self.epoch,
        });
        self.lock().insert(id, conn.clone());
        Some(Admission {
            table: self.clone(),
            conn,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A panic while holding it cannot leave the map inconsistent (single inserts/removes).
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close every idle (and not yet used) connection: the service is shutting down.
    pub fn close_idle(&self) -> usize {
        self.reclaim(usize::MAX)
    }

    /// Cut the connection whose response holds chunks of the response budget and whose client
    /// has read nothing for longest, at least `min_stall`: its pending write fails, which ends
    /// the response and gives back what it holds. Whether one was cut. Called when responses
    /// have waited for the budget a while (`cache::held`): the clients that stopped reading
    /// longest give way to those waiting, as idle connections give way to new ones at the cap.
    pub fn cut_longest_stalled(&self, min_stall: Duration) -> bool {
        let now = self.now_ms().saturating_add(1);
        let min = min_stall.as_millis() as u64;
        let victim = {
            let conns = self.lock();
            conns
                .values()
                .filter(|c| !c.cut.load(Ordering::Relaxed))
                .filter(|c| c.holding.load(Ordering::Relaxed) > 0)
                .filter_map(|c| match c.stalled_ms.load(Ordering::Relaxed) {
                    0 => None,
                    at if now.saturating_sub(at) >= min => Some((at, c)),
                    _ => None,
                })
                .min_by_key(|(at, _)| *at)
                .map(|(_, c)| c.clone())
        };
        let Some(c) = victim else {
            return false;
        };
        if c.cut.swap(true, Ordering::AcqRel) {
            return false;
        }
        c.writer.wake();
        self.stats.stalled_cut.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Close up to `n` of the longest-idle reclaimable connections; how many were. When none is
    /// idle (and this is not a shutdown), the one whose header has been arriving longest.
    fn reclaim(&self, n: usize) -> usize {
        let closed = self.reclaim_in(&[Phase::Fresh, Phase::Idle], n);
        if closed > 0 || n == usize::MAX {
            return closed;
        }
        // A header that has been arriving since before every other is the likeliest to be a
        // client that never finishes one; one is enough to admit the newcomer.
        self.reclaim_in(&[Phase::Header], 1)
    }

    /// Close up to `n` connections in `phases`, those there longest first.
    fn reclaim_in(&self, phases: &[Phase], n: usize) -> usize {
        // Chosen and moved to `Closing` under the lock: two admissions at the cap at once then
        // close different connections, instead of racing for the same ones and the loser
        // finding none to close (and refusing its client).
        let victims: Vec<Arc<Conn>> = {
            let conns = self.lock();
            let mut idle: Vec<&Arc<Conn>> = conns
                .values()
                .filter(|c| phases.contains(&c.phase()))
                .collect();
            let n = n.min(idle.len());
            if n == 0 {
                return 0;
            }
            if n < idle.len() {
                idle.select_nth_unstable_by_key(n - 1, |c| c.since_ms());
            }
            idle[..n]
                .iter()
                .filter(|c| c.advance(phases, Phase::Closing))
                .map(|c| (*c).clone())
                .collect()
        };
        let mut closed = 0;
        for c in victims {
            self.closing.fetch_add(1, Ordering::AcqRel);
            c.reader.wake();
            closed += 1;
        }
        self.stats
            .reclaimed
            .fetch_add(closed as u64, Ordering::Relaxed);
        closed
    }
}

/// An admitted connection: removed from the table when dropped.
#[derive(Debug)]
pub struct Admission {
    table: Arc<ConnTable>,
    conn: Arc<Conn>,
}

impl Admission {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub fn table(&self) -> &Arc<ConnTable> {
        &self.table
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.table.lock().remove(&self.conn.id);
        if self.conn.phase() == Phase::Closing {
            self.table.closing.fetch_sub(1, Ordering::AcqRel);
        }
        self.table.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_stalled_response_holding_memory_is_cut_first() {
        let t = ConnTable::new(8);
        let held: Vec<_> = (0..4).map(|_| t.admit().unwrap()).collect();
        let marks: Vec<_> = [0, 1, 3]
            .iter()
            .map(|&i| held[i].conn().holding_memory())
            .collect();
        // 1 stalled first, then 2 (holding nothing), then 0; 3 holds but writes on.
        held[0].conn().stalled_ms.store(30, Ordering::Relaxed);
        held[1].conn().stalled_ms.store(10, Ordering::Relaxed);
        held[2].conn().stalled_ms.store(20, Ordering::Relaxed);
        let waker = futures::task::noop_waker();
        assert!(
            !t.cut_longest_stalled(Duration::from_secs(3600)),
            "none stalled that long"
        );
        assert!(t.cut_longest_stalled(Duration::ZERO));
        assert!(
            held[1].conn().write_stalled(&waker),
            "the longest stalled is cut"
        );
        assert!(!held[0].conn().write_stalled(&waker));
        assert!(t.cut_longest_stalled(Duration::ZERO));
        assert!(held[0].conn().write_stalled(&waker), "then the next");
        assert!(
            !t.cut_longest_stalled(Duration::ZERO),
            "one holding nothing, or writing, is never cut"
        );
        assert!(!held[2].conn().write_stalled(&waker));
        assert_eq!(t.stats.stalled_cut.load(Ordering::Relaxed), 2);
        // A write that progresses is no longer stalled; the mark goes with the response.
        held[3].conn().stalled_ms.store(5, Ordering::Relaxed);
        held[3].conn().write_progressed();
        assert!(!t.cut_longest_stalled(Duration::ZERO));
        drop(marks);
        assert!(held
            .iter()
            .all(|a| a.conn().holding.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn admits_up_to_the_cap_then_refuses_when_nothing_is_idle() {
        let t = ConnTable::new(3);
        let held: Vec<_> = (0..3).map(|_| t.admit().expect("under the cap")).collect();
        for a in &held {
            assert!(a.conn().begin_header());
            assert!(a.conn().begin_request());
        }
        assert!(t.admit().is_none(), "all busy: refused");
        assert_eq!(t.stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(t.open(), 3);
        drop(held);
        assert_eq!(t.open(), 0);
        assert!(t.admit().is_some());
    }

    #[test]
    fn at_the_cap_the_longest_idle_connections_are_reclaimed_first() {
        let t = ConnTable::new(4);
        let held: Vec<_> = (0..4).map(|_| t.admit().expect("under the cap")).collect();
        // 0 and 2 are busy; 3 went idle before 1.
        for a in &held {
            a.conn().begin_request();
        }
        held[3].conn().set_idle(10);
        held[1].conn().set_idle(20);
        let new = t.admit().expect("an idle connection makes room");
        // A batch closes every idle one there is (two here), never a busy one.
        assert_eq!(held[3].conn().phase(), Phase::Closing);
        assert_eq!(held[1].conn().phase(), Phase::Closing);
        assert_eq!(held[0].conn().phase(), Phase::Busy);
        assert_eq!(held[2].conn().phase(), Phase::Busy);
        // The closing ones no longer count: one more fits without reclaiming.
        let another = t.admit().expect("room left by the second reclaimed");
        new.conn().begin_request();
        another.conn().begin_request();
        assert!(t.admit().is_none(), "now full of busy connections");
        drop((new, another));
        drop(held);
        assert_eq!(t.open(), 0);
        assert_eq!(t.closing.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_oldest_of_many_idle_are_chosen() {
        let t = ConnTable::new(40);
        let held: Vec<_> = (0..40).map(|_| t.admit().unwrap()).collect();
        for (i, a) in held.iter().enumerate() {
            a.conn().begin_request();
            // Reverse order: the last admitted went idle first.
            a.conn().set_idle(1000 - i as u64);
        }
        let _new = t.admit().unwrap();
        let closed: Vec<usize> = (0..40)
            .filter(|&i| held[i].conn().phase() == Phase::Closing)
            .collect();
        assert_eq!(closed, (40 - RECLAIM_BATCH..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_request_parsed_from_held_bytes_marks_the_connection_overread() {
        let t = ConnTable::new(4);
        let a = t.admit().unwrap();
        // Seen arriving and ending by the guard: nothing held past it.
        a.conn().begin_header();
        a.conn().begin_request();
        a.conn().request_parsed();
        assert!(!a.conn().take_overread());
        // Parsed while idle: it came from Pingora's pipelined prefix.
        a.conn().set_idle(1);
        a.conn().request_parsed();
        assert_eq!(a.conn().phase(), Phase::Busy);
        assert!(a.conn().take_overread());
        assert!(!a.conn().take_overread(), "taken once");
    }

    #[test]
    fn with_none_idle_the_longest_arriving_header_makes_room() {
        let t = ConnTable::new(3);
        let held: Vec<_> = (0..3).map(|_| t.admit().unwrap()).collect();
        held[0].conn().begin_request();
        held[1].conn().since_ms.store(50, Ordering::Relaxed);
        held[1].conn().begin_header();
        held[2].conn().since_ms.store(10, Ordering::Relaxed);
        held[2].conn().begin_header();
        let _new = t.admit().expect("a stalled header makes room");
        assert_eq!(held[2].conn().phase(), Phase::Closing, "the oldest header");
        assert_eq!(held[1].conn().phase(), Phase::Header, "one at a time");
        assert_eq!(held[0].conn().phase(), Phase::Busy, "never a busy one");
        // A shutdown closes idle connections only.
        assert_eq!(t.close_idle(), 1, "only the new, not yet used one");
        assert_eq!(held[1].conn().phase(), Phase::Header);
    }

    #[test]
    fn a_connection_serving_a_request_is_never_reclaimed() {
        let t = ConnTable::new(1);
        let a = t.admit().unwrap();
        a.conn().begin_request();
        assert!(t.admit().is_none(), "a request is being served: not idle");
        assert_eq!(a.conn().phase(), Phase::Busy);
        // Reclaimed while idle, it stays closing whatever else happens to it.
        a.conn().set_idle(5);
        let _b = t.admit().unwrap();
        assert_eq!(a.conn().phase(), Phase::Closing);
        assert!(!a.conn().begin_header());
        assert!(!a.conn().begin_request());
        a.conn().set_idle(6);
        assert_eq!(a.conn().phase(), Phase::Closing);
    }
}
