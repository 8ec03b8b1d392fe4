//! A per-server circuit breaker: stop sending traffic to an origin server that keeps failing,
//! then carefully test whether it has recovered.
//!
//! States:
//! - `Closed` = traffic flows normally;
//! - `Open` = the server is ejected, no traffic;
//! - `HalfOpen` = a limited number of probe requests test the server.
//!
//! Transitions:
//! - `Closed → Open` after `failure_threshold` *consecutive* failures (any success resets the
//!   count). The server is ejected for the current ejection time. With
//!   [`Breaker::record_failure_gated`] the trip also needs the group's consent (its cap on
//!   ejected servers); refused, the breaker stays `Closed` and asks again on the next failure.
//!   What counts as a failure is decided by the caller (`origin::outcome`), not here.
//! - `Open → HalfOpen` lazily, when [`Breaker::try_acquire`] is called after the ejection has
//!   elapsed; that call is admitted as the first probe. Until then [`Breaker::state`] keeps
//!   reporting `Open` (it reports the stored state and never moves it); [`Breaker::allows`] is
//!   what server selection should look at, and it already returns true once the ejection has
//!   elapsed.
//! - `HalfOpen`: at most `half_open_probes` probes are outstanding at once. Any probe failure
//!   sends the breaker back to `Open`; `half_open_probes` probe successes (consecutive, since
//!   a single failure reopens) close it. A probe whose [`Admission`] is dropped unreported frees
//!   its slot without counting as either.
//! - Ejection time starts at `open_for`, doubles each time the breaker re-opens from
//!   `HalfOpen`, is capped at `max_open_for`, and resets to `open_for` once the breaker closes.
//!
//! Every admission remembers the *epoch* (the number of transitions so far) it was granted in.
//! Reports from an earlier epoch are stale and ignored: a request sent while `Closed` that fails
//! after the breaker already tripped does not count against the next `Closed` period, and a probe
//! of one `HalfOpen` period cannot close or reopen a later one.
//!
//! Hot-path reads ([`Breaker::state`], [`Breaker::allows`]) and failure counting while `Closed`
//! use atomics only; transitions and probe accounting take a short mutex, never held across an
//! `.await` or any I/O. Time comes from `tokio::time::Instant`, so tests run on the paused clock.
//!
//! This module must never panic on any input (zero thresholds or probe counts are treated as 1,
//! `max_open_for < open_for` as "never grow", durations saturate), never sleep, never do I/O and
//! never block beyond that short mutex.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Breaker tuning. Degenerate values are sanitised by [`Breaker::new`]: a zero
/// `failure_threshold` or `half_open_probes` means 1, and a `max_open_for` below `open_for`
/// means the ejection never grows beyond `open_for`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures while `Closed` that trip the breaker.
    pub failure_threshold: u32,
    /// Ejection time of the first trip (and after every recovery).
    pub open_for: Duration,
    /// Cap of the doubling ejection time.
    pub max_open_for: Duration,
    /// Probes allowed outstanding while `HalfOpen`; this many successes close the breaker.
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows normally.
    Closed,
    /// The server is ejected, no traffic.
    Open,
    /// A limited number of probe requests test the server.
    HalfOpen,
}

/// A state change, returned so that the caller can log and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

fn decode_state(code: u64) -> BreakerState {
    match code {
        OPEN => BreakerState::Open,
        HALF_OPEN => BreakerState::HalfOpen,
        _ => BreakerState::Closed,
    }
}

/// `(epoch << 2) | state`, so that one atomic load gives a consistent pair.
fn pack_phase(epoch: u64, state: u64) -> u64 {
    (epoch << 2) | state
}

/// The low 32 bits of an epoch, which tag the failure count. Tags repeat only every 2^32
/// transitions, far beyond the life of any stale admission.
fn epoch_tag(epoch: u64) -> u32 {
    epoch as u32
}

/// `epoch_tag(epoch) << 32 | consecutive failures`: the failure count of one `Closed` period.
fn pack_failures(epoch: u64, count: u32) -> u64 {
    (u64::from(epoch_tag(epoch)) << 32) | u64::from(count)
}

fn unpack_failures(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Shared {
    cfg: BreakerConfig,
    /// Time origin of `open_until`.
    base: Instant,
    /// Current epoch and state (see [`pack_phase`]). Only written with `inner` locked.
    phase: AtomicU64,
    /// End of the current ejection in nanoseconds since `base`; meaningful while `Open`.
    /// Written (with `inner` locked) before the `phase` store that publishes `Open`.
    open_until: AtomicU64,
    /// Consecutive failures of the current `Closed` period (see [`pack_failures`]). Counted
    /// lock-free; reset to the new epoch on every transition.
    closed_failures: AtomicU64,
    /// Probes admitted and not yet reported or dropped in the current `HalfOpen` period. Only
    /// written with `inner` locked; read lock-free by `allows`.
    probes_out: AtomicU32,
    trips: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Ejection time of the next trip (the one in force, while `Open`).
    ejection: Duration,
    /// Probe successes in the current `HalfOpen` period.
    probe_successes: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held, but never turn poisoning into a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_phase(&self) -> (u64, BreakerState) {
        let p = self.phase.load(Ordering::Acquire);
        (p >> 2, decode_state(p & 3))
    }

    fn now_nanos(&self) -> u64 {
        saturating_nanos(Instant::now().saturating_duration_since(self.base))
    }

    fn ejection_elapsed(&self) -> bool {
        self.now_nanos() >= self.open_until.load(Ordering::Acquire)
    }

    /// Move to `state` in a new epoch, resetting the per-period counters. Call with `inner`
    /// locked (the guard is the proof).
    fn enter(&self, inner: &mut Inner, state: u64) -> u64 {
        let epoch = (self.phase.load(Ordering::Acquire) >> 2).wrapping_add(1) & (u64::MAX >> 2);
        inner.probe_successes = 0;
        self.probes_out.store(0, Ordering::Release);
        self.closed_failures
            .store(pack_failures(epoch, 0), Ordering::Release);
        self.phase
            .store(pack_phase(epoch, state), Ordering::Release);
        epoch
    }

    /// Eject the server for `inner.ejection` (with `inner` locked).
    fn open(&self, inner: &mut Inner, from: BreakerState) -> Transition {
        let until = self
            .now_nanos()
            .saturating_add(saturating_nanos(inner.ejection));
        self.open_until.store(until, Ordering::Release);
        self.enter(inner, OPEN);
        self.trips.fetch_add(1, Ordering::Relaxed);
        Transition {
            from,
            to: BreakerState::Open,
        }
    }

    /// Report of a probe admitted in `epoch`: frees its slot and, unless merely dropped,
    /// counts its outcome. Stale probes (from an earlier epoch) are ignored.
    fn finish_probe(&self, epoch: u64, outcome: Option<bool>) -> Option<Transition> {
        let mut inner = self.lock();
        if self.load_phase() != (epoch, BreakerState::HalfOpen) {
            return None;
        }
        let out = self.probes_out.load(Ordering::Acquire);
        self.probes_out
            .store(out.saturating_sub(1), Ordering::Release);
        match outcome {
            None => None,
            Some(true) => {
                inner.probe_successes = inner.probe_successes.saturating_add(1);
                if inner.probe_successes < self.cfg.half_open_probes {
                    return None;
                }
                inner.ejection = self.cfg.open_for;
                self.enter(&mut inner, CLOSED);
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Closed,
                })
            }
            Some(false) => {
                inner.ejection = inner.ejection.saturating_mul(2).min(self.cfg.max_open_for);
                Some(self.open(&mut inner, BreakerState::HalfOpen))
            }
        }
    }
}

/// A circuit breaker for one origin server. `Send + Sync`; share it by reference or `Arc`.
pub struct Breaker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("trips", &self.trips())
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let cfg = BreakerConfig {
            failure_threshold: cfg.failure_threshold.max(1),
            open_for: cfg.open_for,
            max_open_for: cfg.max_open_for.max(cfg.open_for),
            half_open_probes: cfg.half_open_probes.max(1),
        };
        Breaker {
            shared: Arc::new(Shared {
                base: Instant::now(),
                phase: AtomicU64::new(pack_phase(0, CLOSED)),
                open_until: AtomicU64::new(0),
                closed_failures: AtomicU64::new(pack_failures(0, 0)),
                probes_out: AtomicU32::new(0),
                trips: AtomicU64::new(0),
                inner: Mutex::new(Inner {
                    ejection: cfg.open_for,
                    probe_successes: 0,
                }),
                cfg,
            }),
        }
    }

    /// The configuration in force (after sanitising).
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.cfg
    }

    /// Lock-free read of the stored state (atomics only). An `Open` breaker whose ejection has
    /// elapsed still reads `Open` until [`Breaker::try_acquire`] admits the first probe and moves
    /// it to `HalfOpen`; use [`Breaker::allows`] to decide whether to pick this server.
    pub fn state(&self) -> BreakerState {
        self.shared.load_phase().1
    }

    /// Lock-free pre-check for server selection: true if a request may be sent now (`Closed`,
    /// or `Open` with elapsed ejection, or `HalfOpen` with free probe slots). Reserves nothing:
    /// a following [`Breaker::try_acquire`] may still refuse.
    pub fn allows(&self) -> bool {
        let s = &self.shared;
        match s.load_phase().1 {
            BreakerState::Closed => true,
            BreakerState::Open => s.ejection_elapsed(),
            BreakerState::HalfOpen => s.probes_out.load(Ordering::Acquire) < s.cfg.half_open_probes,
        }
    }

    /// Reserve the right to send one request. `Closed` → `Some`. `Open` before the deadline →
    /// `None`. `Open` past the deadline → moves to `HalfOpen` and admits the probe (the
    /// admission's [`Admission::transition`] reports that move). `HalfOpen` → admits while fewer
    /// than `half_open_probes` probes are outstanding, else `None`.
    pub fn try_acquire(&self) -> Option<Admission> {
        let s = &self.shared;
        let (epoch, state) = s.load_phase();
        match state {
            BreakerState::Closed => {
                return Some(self.admission(AdmissionKind::Normal, epoch, None));
            }
            BreakerState::Open if !s.ejection_elapsed() => return None,
            BreakerState::HalfOpen
                if s.probes_out.load(Ordering::Acquire) >= s.cfg.half_open_probes =>
            {
                return None;
            }
            _ => {}
        }

        // Probe admission or the Open → HalfOpen move: re-check under the lock.
        let mut inner = s.lock();
        let (mut epoch, state) = s.load_phase();
        let mut transition = None;
        match state {
            BreakerState::Closed => {
                return Some(self.admission(AdmissionKind::Normal, epoch, None));
            }
            BreakerState::Open => {
                if !s.ejection_elapsed() {
                    return None;
                }
                epoch = s.enter(&mut inner, HALF_OPEN);
                transition = Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                });
            }
            BreakerState::HalfOpen => {}
        }
        let out = s.probes_out.load(Ordering::Acquire);
        if out >= s.cfg.half_open_probes {
            return None;
        }
        s.probes_out.store(out + 1, Ordering::Release);
        drop(inner);
        Some(self.admission(AdmissionKind::Probe, epoch, transition))
    }

    /// Report that an admitted request succeeded. Returns the transition it caused, if any
    /// (`HalfOpen → Closed`).
    pub fn record_success(&self, a: Admission) -> Option<Transition> {
        self.record(a, true, &mut || true)
    }

    /// Report that an admitted request failed. Returns the transition it caused, if any
    /// (`Closed → Open` or `HalfOpen → Open`).
    pub fn record_failure(&self, a: Admission) -> Option<Transition> {
        self.record(a, false, &mut || true)
    }

    /// [`Breaker::record_failure`], but a `Closed → Open` trip happens only if `may_eject`
    /// (asked under this breaker's lock, at the moment of tripping) says so. When it refuses, the
    /// breaker stays `Closed` with its streak at or above the threshold, so the next failure asks
    /// again. The group uses this to cap how many of its servers are ejected at once.
    pub fn record_failure_gated(
        &self,
        a: Admission,
        may_eject: &mut dyn FnMut() -> bool,
    ) -> Option<Transition> {
        self.record(a, false, may_eject)
    }

    /// Whether the server is out of normal rotation now: `Open` with its ejection still running,
    /// or `HalfOpen` (probes only). Lock-free.
    pub fn is_ejected(&self) -> bool {
        let s = &self.shared;
        match s.load_phase().1 {
            BreakerState::Closed => false,
            BreakerState::Open => !s.ejection_elapsed(),
            BreakerState::HalfOpen => true,
        }
    }

    /// Whether the server looks down: ejected, or `Closed` with a streak of failures that
    /// reached the threshold (a trip the group's ejection cap held back). Lock-free.
    pub fn is_failing(&self) -> bool {
        let s = &self.shared;
        match s.load_phase() {
            (epoch, BreakerState::Closed) => {
                let (tag, count) = unpack_failures(s.closed_failures.load(Ordering::Acquire));
                tag == epoch_tag(epoch) && count >= s.cfg.failure_threshold
            }
            _ => self.is_ejected(),
        }
    }

    /// Whether the server's last outcomes were all good: `Closed` with no failure since its
    /// last success. A retry prefers such a server (`origin::pool`). Lock-free.
    pub fn is_clean(&self) -> bool {
        let s = &self.shared;
        match s.load_phase() {
            (epoch, BreakerState::Closed) => {
                let (tag, count) = unpack_failures(s.closed_failures.load(Ordering::Acquire));
                tag != epoch_tag(epoch) || count == 0
            }
            _ => false,
        }
    }

    /// Number of times this breaker has tripped (`Closed`/`HalfOpen` → `Open`), for metrics.
    pub fn trips(&self) -> u64 {
        self.shared.trips.load(Ordering::Relaxed)
    }

    fn admission(
        &self,
        kind: AdmissionKind,
        epoch: u64,
        transition: Option<Transition>,
    ) -> Admission {
        Admission {
            shared: Arc::clone(&self.shared),
            kind,
            epoch,
            transition,
            pending: true,
        }
    }

    fn record(
        &self,
        mut a: Admission,
        success: bool,
        may_eject: &mut dyn FnMut() -> bool,
    ) -> Option<Transition> {
        if !Arc::ptr_eq(&a.shared, &self.shared) {
            log::warn!(
                "circuit breaker: outcome reported to a breaker that did not admit it; ignored"
            );
            // Dropping `a` releases its probe slot in the breaker that did admit it.
            return None;
        }
        // Reporting consumes the admission: Drop must not release anything again.
        a.pending = false;
        let s = &self.shared;
        match a.kind {
            AdmissionKind::Probe => s.finish_probe(a.epoch, Some(success)),
            AdmissionKind::Normal if success => {
                // Reset the consecutive-failure count of this Closed period; skip the write in the
                // common case where it is already zero (keeps the cache line shared).
                let zero = pack_failures(a.epoch, 0);
                if s.closed_failures.load(Ordering::Acquire) != zero {
                    let _ =
                        s.closed_failures
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                                (unpack_failures(w).0 == epoch_tag(a.epoch)).then_some(zero)
                            });
                }
                None
            }
            AdmissionKind::Normal => {
                let counted =
                    s.closed_failures
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                            let (tag, count) = unpack_failures(w);
                            (tag == epoch_tag(a.epoch))
                                .then(|| pack_failures(a.epoch, count.saturating_add(1)))
                        });
                let Ok(prev) = counted else {
                    return None; // stale: the breaker has moved on since this was admitted
                };
                if unpack_failures(prev).1.saturating_add(1) < s.cfg.failure_threshold {
                    return None;
                }
                let mut inner = s.lock();
                // Re-check under the lock: exactly one reporter trips, and only if the period
                // is still the one this request belonged to and the streak is unbroken.
                let still_failing = unpack_failures(s.closed_failures.load(Ordering::Acquire)).1
                    >= s.cfg.failure_threshold;
                if s.load_phase() != (a.epoch, BreakerState::Closed) || !still_failing {
                    return None;
                }
                if !may_eject() {
                    return None;
                }
                Some(s.open(&mut inner, BreakerState::Closed))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdmissionKind {
    /// Admitted while `Closed`.
    Normal,
    /// A `HalfOpen` probe, holding one probe slot.
    Probe,
}

/// Proof that a request was admitted by [`Breaker::try_acquire`]; report it with
/// [`Breaker::record_success`] or [`Breaker::record_failure`]. Dropping it unreported (e.g. the
/// client went away) releases a `HalfOpen` probe slot without counting success or failure.
/// `Send + Sync`, `'static`: it can live in a per-request context.
#[must_use = "report the outcome with Breaker::record_success / record_failure"]
pub struct Admission {
    shared: Arc<Shared>,
    kind: AdmissionKind,
    epoch: u64,
    transition: Option<Transition>,
    /// False once reported, so that Drop does not release the probe slot a second time.
    pending: bool,
}

impl Admission {
    /// True if this is a `HalfOpen` probe rather than a normal (`Closed`) admission.
    pub fn is_probe(&self) -> bool {
        self.kind == AdmissionKind::Probe
    }

    /// The transition that admitting this request caused (`Open → HalfOpen`), if any, so the
    /// caller can log and count it like the ones returned by the record functions.
    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("kind", &self.kind)
            .field("epoch", &self.epoch)
            .field("transition", &self.transition)
            .finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.pending && self.kind == AdmissionKind::Probe {
            self.pending = false;
            let _ = self.shared.finish_probe(self.epoch, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::time::advance;

    const SEC: Duration = Duration::from_secs(1);

    fn cfg(threshold: u32, probes: u32) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: threshold,
            open_for: SEC,
            max_open_for: SEC * 5,
            half_open_probes: probes,
        }
    }

    fn t(from: BreakerState, to: BreakerState) -> Option<Transition> {
        Some(Transition { from, to })
    }

    use BreakerState::{Closed, HalfOpen, Open};

    fn fail(b: &Breaker) -> Option<Transition> {
        let a = b.try_acquire().expect("admitted");
        b.record_failure(a)
    }

    fn succeed(b: &Breaker) -> Option<Transition> {
        let a = b.try_acquire().expect("admitted");
        b.record_success(a)
    }

    fn trip(b: &Breaker) {
        while b.state() == Closed {
            let _ = fail(b);
        }
    }

    /// The breaker is Open and admits nothing until exactly `d` has passed, then a probe.
    async fn assert_ejected_for(b: &Breaker, d: Duration) -> Admission {
        assert_eq!(b.state(), Open);
        advance(d - Duration::from_millis(1)).await;
        assert!(!b.allows());
        assert!(b.try_acquire().is_none());
        assert_eq!(b.state(), Open);
        advance(Duration::from_millis(1)).await;
        assert!(b.allows());
        let probe = b.try_acquire().expect("probe admitted after ejection");
        assert!(probe.is_probe());
        assert_eq!(probe.transition(), t(Open, HalfOpen));
        assert_eq!(b.state(), HalfOpen);
        probe
    }

    fn _assert_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Breaker>();
        check::<Admission>();
    }

    #[tokio::test(start_paused = true)]
    async fn trips_exactly_at_threshold() {
        let b = Breaker::new(cfg(3, 1));
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(b.state(), Closed);
        assert!(b.allows());
        assert_eq!(b.trips(), 0);
        assert_eq!(fail(&b), t(Closed, Open));
        assert_eq!(b.state(), Open);
        assert!(!b.allows());
        assert!(b.try_acquire().is_none());
        assert_eq!(b.trips(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn clean_until_a_failure_and_again_after_a_success() {
        let b = Breaker::new(cfg(3, 1));
        assert!(b.is_clean());
        assert_eq!(fail(&b), None);
        assert!(!b.is_clean());
        assert_eq!(succeed(&b), None);
        assert!(b.is_clean());
        trip(&b);
        assert!(!b.is_clean(), "ejected");
        let p = assert_ejected_for(&b, SEC).await;
        assert!(!b.is_clean(), "probing");
        assert_eq!(b.record_success(p), t(HalfOpen, Closed));
        assert!(b.is_clean(), "closed again");
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_count() {
        let b = Breaker::new(cfg(3, 1));
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(succeed(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), None);
        assert_eq!(b.state(), Closed);
        assert_eq!(fail(&b), t(Closed, Open));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_threshold_and_probes_mean_one() {
        let b = Breaker::new(cfg(0, 0));
        assert_eq!(fail(&b), t(Closed, Open));
        let p = assert_ejected_for(&b, SEC).await;
        assert!(b.try_acquire().is_none());
        assert_eq!(b.record_success(p), t(HalfOpen, Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn open_rejects_until_open_for_elapses() {
        let b = Breaker::new(cfg(1, 1));
        trip(&b);
        let probe = assert_ejected_for(&b, SEC).await;
        assert_eq!(b.record_success(probe), t(HalfOpen, Closed));
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_at_most_probes() {
        let b = Breaker::new(cfg(1, 3));
        trip(&b);
        let p1 = assert_ejected_for(&b, SEC).await;
        let p2 = b.try_acquire().expect("second probe");
        let p3 = b.try_acquire().expect("third probe");
        assert!(p2.is_probe() && p3.is_probe());
        assert_eq!(p2.transition(), None);
        assert!(!b.allows());
        assert!(b.try_acquire().is_none());
        // Completing a probe frees its slot.
        assert_eq!(b.record_success(p1), None);
        assert!(b.allows());
        let p4 = b.try_acquire().expect("slot freed");
        assert!(b.try_acquire().is_none());
        drop((p2, p3, p4));
    }

    #[tokio::test(start_paused = true)]
    async fn probe_successes_close() {
        let b = Breaker::new(cfg(1, 2));
        trip(&b);
        let p1 = assert_ejected_for(&b, SEC).await;
        let p2 = b.try_acquire().expect("second probe");
        assert_eq!(b.record_success(p1), None);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.record_success(p2), t(HalfOpen, Closed));
        assert_eq!(b.state(), Closed);
        assert!(b.allows());
        let a = b.try_acquire().expect("closed admits");
        assert!(!a.is_probe());
        assert_eq!(b.record_success(a), None);
        assert_eq!(b.trips(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_doubled_ejection() {
        let b = Breaker::new(cfg(1, 2));
        trip(&b);
        let p1 = assert_ejected_for(&b, SEC).await;
        let p2 = b.try_acquire().expect("second probe");
        assert_eq!(b.record_failure(p1), t(HalfOpen, Open));
        assert_eq!(b.trips(), 2);
        // The other probe of that HalfOpen period is stale now: ignored.
        assert_eq!(b.record_success(p2), None);
        let p = assert_ejected_for(&b, SEC * 2).await;
        assert_eq!(b.record_failure(p), t(HalfOpen, Open));
        let p = assert_ejected_for(&b, SEC * 4).await;
        drop(p);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_is_capped() {
        let b = Breaker::new(cfg(1, 1));
        trip(&b);
        for d in [1, 2, 4, 5, 5, 5] {
            let p = assert_ejected_for(&b, SEC * d).await;
            assert_eq!(b.record_failure(p), t(HalfOpen, Open));
        }
        assert_eq!(b.trips(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn max_below_open_for_never_grows() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            open_for: SEC * 3,
            max_open_for: SEC,
            half_open_probes: 1,
        });
        trip(&b);
        for _ in 0..3 {
            let p = assert_ejected_for(&b, SEC * 3).await;
            assert_eq!(b.record_failure(p), t(HalfOpen, Open));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_resets_after_closing() {
        let b = Breaker::new(cfg(2, 1));
        trip(&b);
        let p = assert_ejected_for(&b, SEC).await;
        assert_eq!(b.record_failure(p), t(HalfOpen, Open));
        let p = assert_ejected_for(&b, SEC * 2).await;
        assert_eq!(b.record_success(p), t(HalfOpen, Closed));
        // The failure count starts afresh too.
        assert_eq!(fail(&b), None);
        assert_eq!(fail(&b), t(Closed, Open));
        let p = assert_ejected_for(&b, SEC).await;
        drop(p);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_admission_frees_probe_slot_without_counting() {
        let b = Breaker::new(cfg(1, 2));
        trip(&b);
        let p1 = assert_ejected_for(&b, SEC).await;
        let p2 = b.try_acquire().expect("second probe");
        assert!(b.try_acquire().is_none());
        drop(p1);
        assert_eq!(b.state(), HalfOpen);
        assert!(b.allows());
        let p3 = b.try_acquire().expect("slot freed by drop");
        // The dropped probe counted as neither: two real successes are still needed.
        assert_eq!(b.record_success(p2), None);
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.record_success(p3), t(HalfOpen, Closed));
        assert_eq!(b.trips(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_trip_stays_closed_and_asks_again() {
        let b = Breaker::new(cfg(2, 1));
        let mut asked = 0;
        let mut refuse = || {
            asked += 1;
            false
        };
        for _ in 0..4 {
            let a = b.try_acquire().expect("admitted");
            assert_eq!(b.record_failure_gated(a, &mut refuse), None);
        }
        // Asked at the 2nd, 3rd and 4th failure (the streak stays at or above the threshold).
        assert_eq!(asked, 3);
        assert_eq!(b.state(), Closed);
        assert!(!b.is_ejected());
        assert!(b.is_failing(), "held back, but still failing");
        let a = b.try_acquire().expect("admitted");
        assert_eq!(b.record_failure_gated(a, &mut || true), t(Closed, Open));
        assert!(b.is_ejected() && b.is_failing());
        advance(SEC).await;
        assert!(!b.is_ejected(), "an elapsed ejection is ready for a probe");
        let p = b.try_acquire().expect("probe");
        assert!(b.is_ejected(), "HalfOpen takes probes only");
        assert_eq!(b.record_success(p), t(HalfOpen, Closed));
        assert!(!b.is_failing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_clears_failing() {
        let b = Breaker::new(cfg(2, 1));
        for _ in 0..3 {
            let a = b.try_acquire().expect("admitted");
            let _ = b.record_failure_gated(a, &mut || false);
        }
        assert!(b.is_failing());
        assert_eq!(succeed(&b), None);
        assert!(!b.is_failing());
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_normal_admission_counts_nothing() {
        let b = Breaker::new(cfg(2, 1));
        assert_eq!(fail(&b), None);
        for _ in 0..10 {
            drop(b.try_acquire());
        }
        assert_eq!(b.state(), Closed);
        assert_eq!(fail(&b), t(Closed, Open));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_admissions_are_ignored() {
        let b = Breaker::new(cfg(2, 1));
        let old_fail = b.try_acquire().expect("closed");
        let old_ok = b.try_acquire().expect("closed");
        trip(&b);
        // Late reports from before the trip change nothing while Open...
        assert_eq!(b.record_failure(old_fail), None);
        assert_eq!(b.trips(), 1);
        let p = assert_ejected_for(&b, SEC).await;
        assert!(b.try_acquire().is_none(), "the only probe slot is taken");
        assert_eq!(b.record_success(p), t(HalfOpen, Closed));
        // ...nor after the breaker has closed again.
        let a = b.try_acquire().expect("closed");
        assert_eq!(b.record_failure(a), None);
        assert_eq!(b.record_success(old_ok), None);
        assert_eq!(
            fail(&b),
            t(Closed, Open),
            "stale success must not reset the streak"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admission_from_another_breaker_is_ignored() {
        let a = Breaker::new(cfg(1, 1));
        let b = Breaker::new(cfg(1, 1));
        let adm = a.try_acquire().expect("closed");
        assert_eq!(b.record_failure(adm), None);
        assert_eq!(a.state(), Closed);
        assert_eq!(b.state(), Closed);
        // A foreign probe is dropped, freeing its slot in its own breaker.
        trip(&a);
        advance(SEC).await;
        let probe = a.try_acquire().expect("probe");
        assert!(!a.allows());
        assert_eq!(b.record_success(probe), None);
        assert!(a.allows());
        assert_eq!(a.state(), HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_and_huge_durations() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::ZERO,
            max_open_for: Duration::ZERO,
            half_open_probes: 1,
        });
        trip(&b);
        assert!(b.allows());
        let p = b.try_acquire().expect("no ejection");
        assert_eq!(b.record_failure(p), t(HalfOpen, Open));
        assert!(b.allows());

        let b = Breaker::new(BreakerConfig {
            failure_threshold: u32::MAX,
            open_for: Duration::MAX,
            max_open_for: Duration::MAX,
            half_open_probes: u32::MAX,
        });
        for _ in 0..100 {
            assert_eq!(fail(&b), None);
        }
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::MAX,
            max_open_for: Duration::MAX,
            half_open_probes: 1,
        });
        trip(&b);
        advance(Duration::from_secs(100 * 365 * 24 * 3600)).await;
        assert!(!b.allows());
        assert!(b.try_acquire().is_none());
    }

    #[test]
    fn concurrent_failures_trip_once() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 10,
            open_for: Duration::from_secs(3600),
            max_open_for: Duration::from_secs(3600),
            half_open_probes: 1,
        });
        let transitions: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        let mut seen = 0;
                        for _ in 0..1000 {
                            if let Some(a) = b.try_acquire() {
                                seen += usize::from(b.record_failure(a).is_some());
                            }
                            let _ = (b.allows(), b.state());
                        }
                        seen
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(usize::MAX / 32))
                .sum()
        });
        assert_eq!(transitions, 1);
        assert_eq!(b.trips(), 1);
        assert_eq!(b.state(), Open);
        assert!(!b.allows());
    }

    #[test]
    fn concurrent_mixed_outcomes_keep_invariants() {
        // Zero ejection: the breaker cycles through every state while threads race.
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::ZERO,
            max_open_for: Duration::ZERO,
            half_open_probes: 2,
        });
        std::thread::scope(|s| {
            for seed in 0..8u32 {
                let b = &b;
                s.spawn(move || {
                    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
                    for _ in 0..5000 {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        if let Some(a) = b.try_acquire() {
                            match x % 3 {
                                0 => drop(b.record_success(a)),
                                1 => drop(b.record_failure(a)),
                                _ => drop(a),
                            }
                        }
                        assert!(b.shared.probes_out.load(Ordering::Acquire) <= 2);
                    }
                });
            }
        });
        assert!(b.shared.probes_out.load(Ordering::Acquire) == 0 || b.state() == HalfOpen);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Success(usize),
        Failure(usize),
        Drop(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Acquire),
            2 => any::<usize>().prop_map(Op::Success),
            2 => any::<usize>().prop_map(Op::Failure),
            1 => any::<usize>().prop_map(Op::Drop),
            2 => (0u64..5_000).prop_map(Op::Advance),
        ]
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..4_000).prop_map(Duration::from_millis),
            Just(Duration::ZERO),
            Just(Duration::MAX),
        ]
    }

    proptest! {
        #[test]
        fn never_panics_and_keeps_invariants(
            threshold in 0u32..5,
            probes in 0u32..4,
            open_for in duration(),
            max_open_for in duration(),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(async {
                let b = Breaker::new(BreakerConfig {
                    failure_threshold: threshold,
                    open_for,
                    max_open_for,
                    half_open_probes: probes,
                });
                let probes = probes.max(1);
                let mut held: Vec<Admission> = Vec::new();
                let mut trips = 0;
                for op in ops {
                    let before = b.state();
                    let tr = match op {
                        Op::Acquire => {
                            let allowed = b.allows();
                            match b.try_acquire() {
                                Some(a) => {
                                    prop_assert!(allowed, "admitted although allows() was false");
                                    let tr = a.transition();
                                    held.push(a);
                                    tr
                                }
                                None => {
                                    prop_assert!(before != Closed);
                                    None
                                }
                            }
                        }
                        Op::Success(i) if !held.is_empty() => {
                            let a = held.swap_remove(i % held.len());
                            b.record_success(a)
                        }
                        Op::Failure(i) if !held.is_empty() => {
                            let a = held.swap_remove(i % held.len());
                            b.record_failure(a)
                        }
                        Op::Drop(i) if !held.is_empty() => {
                            drop(held.swap_remove(i % held.len()));
                            None
                        }
                        Op::Advance(ms) => {
                            advance(Duration::from_millis(ms)).await;
                            None
                        }
                        _ => None,
                    };
                    if let Some(tr) = tr {
                        prop_assert_eq!(tr.from, before);
                        prop_assert_eq!(tr.to, b.state());
                        prop_assert_ne!(tr.from, tr.to);
                        if tr.to == Open {
                            trips += 1;
                        }
                    } else {
                        prop_assert_eq!(b.state(), before);
                    }
                    prop_assert_eq!(b.trips(), trips);
                    let out = b.shared.probes_out.load(Ordering::Acquire);
                    prop_assert!(out <= probes);
                    let live_probes = held
                        .iter()
                        .filter(|a| a.is_probe() && b.shared.load_phase().0 == a.epoch)
                        .count();
                    if b.state() == HalfOpen {
                        prop_assert_eq!(out as usize, live_probes);
                    } else {
                        prop_assert_eq!(out, 0);
                    }
                }
                Ok(())
            })?;
        }
    }
}
