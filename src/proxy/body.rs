//! A pass-through request's body: admitted before an origin connection is taken, and bounded
//! in total time, not only per read.
//!
//! - Admission (nginx reads a body before it connects upstream): a request with a body is sent
//!   to no origin until the body has arrived, when it is at most [`WHOLE_BODY`] (what Pingora
//!   replays from its retry buffer), or else its first piece. A client that sends a header and
//!   then trickles or stalls holds no origin connection; it holds only its own.
//! - The bound ([`BodyClock`]): each read waits at most `server.body_timeout` (its meaning is
//!   unchanged), and the body as a whole must keep up `server.body_min_rate` after a grace of
//!   `body_timeout`: it must be complete by `start + body_timeout + received / body_min_rate`
//!   (Apache's `RequestReadTimeout body=…,MinRate=…`). Before each read Pingora's read timeout
//!   is set to whichever ends first, so a body trickling a byte every few seconds ends with 408
//!   whatever each read's wait. A large upload at a reasonable rate earns its time as it goes.
//!
//! Never reads more than the request declared; never holds more than Pingora's retry buffer.

use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::Session;
use std::time::{Duration, Instant};

/// The largest body read whole before an origin connection is taken: Pingora's retry buffer
/// (`BODY_BUF_LIMIT`), which replays it to the origin. Larger bodies are streamed once their
/// first piece is in.
pub const WHOLE_BODY: u64 = 64 << 10;

/// The total time bound of one request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyClock {
    start: Instant,
    received: u64,
    /// `server.body_timeout`: the grace before the rate counts, and the longest single wait.
    timeout: Duration,
    /// `server.body_min_rate`, bytes per second; 0: no total bound.
    min_rate: u64,
}

impl BodyClock {
    pub fn new(start: Instant, timeout: Duration, min_rate: u64) -> BodyClock {
        BodyClock {
            start,
            received: 0,
            timeout,
            min_rate,
        }
    }

    /// Body bytes received so far (the total, not an increment).
    pub fn set_received(&mut self, received: u64) {
        self.received = received;
    }

    /// When the whole body must be in, given what has arrived; `None`: no total bound.
    pub fn deadline(&self) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        self.start.checked_add(self.timeout.saturating_add(earned))
    }

    /// How long the next read may wait at `now`; `None`: the body is late, end it.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        match self.deadline() {
            None => Some(self.timeout),
            Some(d) if d <= now => None,
            Some(d) => Some(self.timeout.min(d - now)),
        }
    }

    /// The error for a body that missed its bound: the client's (408, never the origin's).
    pub fn late(&self) -> Box<Error> {
        let mut e = Error::explain(
            ErrorType::ReadTimedout,
            format!(
                "request body: {} bytes after {:?}, under server.body_min_rate {} B/s past server.body_timeout {:?}",
                self.received,
                self.start.elapsed(),
                self.min_rate,
                self.timeout
            ),
        );
        e.as_down();
        e
    }
}

/// Whether the request asks for `100 Continue` before it sends its body.
fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The declared body length, when there is one (and no Transfer-Encoding, which overrides it).
fn content_length(session: &Session) -> Option<u64> {
    let h = &session.req_header().headers;
    if h.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Set Pingora's wait for the next body read from `clock`; the error when the body is late
/// (and not yet complete).
pub fn pace(session: &mut Session, clock: &mut BodyClock) -> Result<()> {
    clock.set_received(session.body_bytes_read() as u64);
    match clock.next_wait(Instant::now()) {
        Some(wait) => {
            session.set_read_timeout(Some(wait));
            Ok(())
        }
        None if session.is_body_done() => Ok(()),
        None => Err(clock.late()),
    }
}

/// What admission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// `100 Continue` was sent by us: the origin must not be asked for another.
    pub continue_sent: bool,
}

/// Read the body (whole up to [`WHOLE_BODY`], else its first piece) before an origin is chosen,
/// under `clock`. What was read stays in Pingora's retry buffer, which it sends first.
pub async fn admit(session: &mut Session, clock: &mut BodyClock) -> Result<Admitted> {
    let mut admitted = Admitted {
        continue_sent: false,
    };
    if session.is_upgrade_req() || session.is_body_empty() || session.is_body_done() {
        return Ok(admitted);
    }
    let whole = content_length(session).is_some_and(|n| n <= WHOLE_BODY);
    if expects_continue(session) {
        // The client waits for this before it sends the body we wait for.
        session.write_continue_response().await?;
        admitted.continue_sent = true;
    }
    session.enable_retry_buffering();
    loop {
        pace(session, clock)?;
        let piece = session
            .read_request_body()
            .await
            .map_err(|e| e.into_down())?;
        if piece.is_none() || session.is_body_done() || !whole {
            break;
        }
    }
    pace(session, clock)?;
    Ok(admitted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_is_body_timeout_and_bytes_earn_time_at_the_min_rate() {
        let t0 = Instant::now();
        let mut c = BodyClock::new(t0, Duration::from_secs(10), 1000);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(10)));
        // Early on, a read waits body_timeout at most.
        assert_eq!(c.next_wait(t0), Some(Duration::from_secs(10)));
        // 5,000 bytes earn 5 s.
        c.set_received(5000);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(15)));
        // Near the deadline a read waits only what is left.
        assert_eq!(
            c.next_wait(t0 + Duration::from_secs(13)),
            Some(Duration::from_secs(2))
        );
        // Past it: late, whatever each read's wait.
        assert_eq!(c.next_wait(t0 + Duration::from_secs(15)), None);
    }

    #[test]
    fn a_trickle_runs_out_and_a_steady_upload_does_not() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(60);
        // One byte every 3 s (the clients): late after about a minute (60 s of grace
        // and the few milliseconds their bytes earned).
        let mut trickle = BodyClock::new(t0, timeout, 500);
        let mut late_at = None;
        for i in 1..100u64 {
            let now = t0 + Duration::from_secs(3 * i);
            trickle.set_received(i);
            if trickle.next_wait(now).is_none() {
                late_at = Some(3 * i);
                break;
            }
        }
        assert_eq!(late_at, Some(63));
        // 1 GiB at 10 MiB/s: never late.
        let mut steady = BodyClock::new(t0, timeout, 500);
        for s in 1..=100u64 {
            steady.set_received(s * (10 << 20));
            assert!(steady
                .next_wait(t0 + Duration::from_secs(s))
                .is_some_and(|w| w == timeout));
        }
    }

    #[test]
    fn a_zero_rate_bounds_each_read_only() {
        let t0 = Instant::now();
        let c = BodyClock::new(t0, Duration::from_secs(5), 0);
        assert_eq!(c.deadline(), None);
        assert_eq!(
            c.next_wait(t0 + Duration::from_secs(3600)),
            Some(Duration::from_secs(5))
        );
        let e = BodyClock::new(t0, Duration::from_secs(5), 100).late();
        assert_eq!(super::super::respond::status_for_error(&e), 408);
    }
}
