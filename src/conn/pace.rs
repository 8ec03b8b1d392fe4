//! Pacing at the socket: a shaped response hands its pacer to its connection, and the
//! connection's guard accounts each write just before it goes out, then holds it until the
//! pacer allows it while watching the client (see [`super::guard`]).
//!
//! Why at the write rather than before it (where the response's code, or Pingora's
//! `response_body_filter` sleep, would pace): a wait that sits in the write can end the moment
//! the client leaves, and bytes are accounted only when they are about to be sent, at most
//! [`MAX_RESERVATION`] ahead. Pingora hands the body of a proxied response over in batches of up
//! to five 64 KiB pieces; accounting them when they are handed over would take tokens for bytes
//! that sit in a queue, and bunch the accounting that `shaping.total_rate` measures use by.
//!
//! Never blocks: the pacer answers how long to wait, the guard's timer does the waiting.

use std::time::Duration;

/// The most bytes accounted at once: a write larger than this goes out in parts of this size,
/// each paced (smooth pacing whatever size the pieces were handed over in).
pub const MAX_RESERVATION: usize = 16 * 1024;

/// What paces a response's bytes (a shaped download).
pub trait BodyPacer: Send {
    /// Account `n` bytes about to be written; how long to wait before writing them.
    fn pace(&mut self, n: usize) -> Duration;
    /// `n` bytes accounted were never written (the response ended first): give them back.
    fn refund(&mut self, n: usize);
}

/// A response's pacer and the bytes it has accounted that are not written yet.
pub struct PacedWrites {
    pacer: Box<dyn BodyPacer>,
    /// Accounted, not yet written: the next writes may send this much without asking again.
    reserved: usize,
}

impl std::fmt::Debug for PacedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacedWrites")
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl PacedWrites {
    pub fn new(pacer: Box<dyn BodyPacer>) -> PacedWrites {
        PacedWrites { pacer, reserved: 0 }
    }

    /// A write of `want` bytes (> 0) is about to go: how many of them may go (at least one, at
    /// most [`MAX_RESERVATION`]) and, when new bytes were just accounted, how long to wait
    /// before they go.
    pub fn reserve(&mut self, want: usize) -> (usize, Duration) {
        let mut wait = Duration::ZERO;
        if self.reserved == 0 {
            let n = want.clamp(1, MAX_RESERVATION);
            wait = self.pacer.pace(n);
            self.reserved = n;
        }
        (want.min(self.reserved), wait)
    }

    /// `n` bytes of what [`PacedWrites::reserve`] allowed were written.
    pub fn written(&mut self, n: usize) {
        self.reserved = self.reserved.saturating_sub(n);
    }

    /// Bytes accounted are not going to be written: give them back.
    pub fn refund_reserved(&mut self) {
        if self.reserved > 0 {
            self.pacer.refund(self.reserved);
            self.reserved = 0;
        }
    }
}

impl Drop for PacedWrites {
    fn drop(&mut self) {
        self.refund_reserved();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what it was asked; every piece waits `wait`.
    struct Fake {
        paced: Arc<Mutex<Vec<usize>>>,
        refunded: Arc<Mutex<usize>>,
        wait: Duration,
    }

    impl BodyPacer for Fake {
        fn pace(&mut self, n: usize) -> Duration {
            self.paced.lock().unwrap().push(n);
            self.wait
        }
        fn refund(&mut self, n: usize) {
            *self.refunded.lock().unwrap() += n;
        }
    }

    type Record<T> = Arc<Mutex<T>>;

    fn fake(wait: Duration) -> (PacedWrites, Record<Vec<usize>>, Record<usize>) {
        let paced = Arc::new(Mutex::new(Vec::new()));
        let refunded = Arc::new(Mutex::new(0));
        let p = PacedWrites::new(Box::new(Fake {
            paced: paced.clone(),
            refunded: refunded.clone(),
            wait,
        }));
        (p, paced, refunded)
    }

    #[test]
    fn large_writes_are_accounted_in_parts_as_they_go() {
        let (mut p, paced, _) = fake(Duration::from_millis(5));
        // A 64 KiB piece: four parts, each accounted only once the one before is written.
        let mut left = 64 * 1024;
        while left > 0 {
            let (allowed, wait) = p.reserve(left);
            assert_eq!(allowed, MAX_RESERVATION.min(left));
            assert_eq!(wait, Duration::from_millis(5));
            // Asking again before writing accounts nothing more, and waits no more.
            assert_eq!(p.reserve(left), (allowed, Duration::ZERO));
            p.written(allowed);
            left -= allowed;
        }
        assert_eq!(*paced.lock().unwrap(), vec![MAX_RESERVATION; 4]);
    }

    #[test]
    fn a_short_write_uses_the_rest_of_its_reservation_next() {
        let (mut p, paced, _) = fake(Duration::ZERO);
        let (allowed, _) = p.reserve(10_000);
        assert_eq!(allowed, 10_000);
        // The socket took 4,000 bytes: the other 6,000 go without a new reservation.
        p.written(4_000);
        assert_eq!(p.reserve(10_000).0, 6_000);
        p.written(6_000);
        assert_eq!(*paced.lock().unwrap(), vec![10_000]);
    }

    #[test]
    fn bytes_accounted_but_never_written_are_given_back() {
        let (mut p, _, refunded) = fake(Duration::from_secs(1));
        p.reserve(100_000);
        p.written(1_000);
        p.refund_reserved();
        assert_eq!(*refunded.lock().unwrap(), MAX_RESERVATION - 1_000);
        // Dropped with a reservation in hand (the response ended): given back too.
        p.reserve(500);
        drop(p);
        assert_eq!(*refunded.lock().unwrap(), MAX_RESERVATION - 1_000 + 500);
    }
}
