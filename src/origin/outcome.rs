//! Who is to blame for a try that went wrong: the rules that decide what counts against an
//! origin server's circuit breaker.
//!
//! Only the server's own failures count:
//! - connection-level: connect refused or timed out, a read timeout or reset while the server
//!   still owed response bytes, an answer that breaks HTTP framing, a body that trickles below
//!   `min_rate`. These are charged at once, even to a lone server.
//! - gateway answers (502, 503, 504): charged only as an *outlier*, that is when another server
//!   of the group answered the same request without a gateway status ([`StatusEvidence`]). If
//!   every server fails the same URL, or the server is alone in its group, nobody is charged:
//!   the URL is broken, not the server.
//!
//! Never charged: anything the client did (disconnects, timeouts, malformed requests or request
//! bodies: Pingora tags those `Downstream`), our own internal errors, any 4xx, and the other
//! 5xx (500, 501, 505, ...), which are the application's answer: passed on unchanged, never
//! retried, and counted as a working server.
//!
//! Pure functions and a small holder type: no I/O, no clock, no panics.

use super::pool::Selected;
use pingora_error::{Error, ErrorSource, ErrorType};
use std::net::SocketAddr;

/// A failure that is the origin server's own, as charged to its breaker and counted in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Connection refused, no route, or another connect-time error.
    Connect,
    /// Connecting took longer than `connect_timeout`.
    ConnectTimeout,
    /// The server went silent for `read_timeout` while it owed bytes (or the request deadline
    /// passed while waiting for its answer).
    ReadTimeout,
    /// The connection was reset or closed while the server owed bytes.
    Reset,
    /// The answer broke HTTP framing (unparsable head, bad chunking).
    Framing,
    /// The body trickled below `min_rate` for `read_timeout`.
    TooSlow,
    /// 502, 503 or 504, confirmed as an outlier by a peer's good answer to the same request.
    GatewayStatus,
}

impl FailureClass {
    pub const ALL: [FailureClass; 7] = [
        FailureClass::Connect,
        FailureClass::ConnectTimeout,
        FailureClass::ReadTimeout,
        FailureClass::Reset,
        FailureClass::Framing,
        FailureClass::TooSlow,
        FailureClass::GatewayStatus,
    ];

    /// A short stable name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Connect => "connect",
            FailureClass::ConnectTimeout => "connect_timeout",
            FailureClass::ReadTimeout => "read_timeout",
            FailureClass::Reset => "reset",
            FailureClass::Framing => "framing",
            FailureClass::TooSlow => "too_slow",
            FailureClass::GatewayStatus => "gateway_status",
        }
    }

    /// Index into [`FailureClass::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A failure to connect at all (refused, unreachable, timed out): the server is *down*, as
    /// an active health check would find, rather than an outlier among servers that answer. Its
    /// ejection neither counts towards nor is held back by `max_ejected_percent` (see
    /// `origin::pool`): it serves nothing either way.
    pub fn is_down(self) -> bool {
        matches!(self, FailureClass::Connect | FailureClass::ConnectTimeout)
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an answer's status says about the server that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVerdict {
    /// Any answer below 500, and the application's own 5xx (500, 501, 505, ...): the server
    /// works. Passed to the client; never retried.
    Answered,
    /// 502, 503, 504: the server (or something behind it) could not serve. Retried on another
    /// server; charged only as an outlier.
    Gateway,
}

pub fn status_verdict(status: u16) -> StatusVerdict {
    match status {
        502..=504 => StatusVerdict::Gateway,
        _ => StatusVerdict::Answered,
    }
}

/// Classify a Pingora error seen while talking to an origin. `None`: not the origin server's
/// fault (the client's doing, or ours), so nothing is charged, and nothing is retried either:
/// a retry is for a failure of the server's own (the same rule decides both).
///
/// `request_body_done`: whether the client had sent its whole request body. A server that times
/// out or closes while it is still owed request bytes is waiting on the client, not failing.
pub fn classify_error(e: &Error, request_body_done: bool) -> Option<FailureClass> {
    if !matches!(e.esource(), ErrorSource::Upstream) {
        return None;
    }
    classify_type(e.etype(), request_body_done)
}

/// Classify an error type from the origin side (the source is known to be the origin).
pub fn classify_type(etype: &ErrorType, request_body_done: bool) -> Option<FailureClass> {
    use ErrorType::*;
    let class = match etype {
        ConnectTimedout => FailureClass::ConnectTimeout,
        ConnectRefused | ConnectNoRoute | ConnectError | SocketError | TLSHandshakeFailure
        | TLSHandshakeTimedout | HandshakeError | InvalidCert | ConnectProxyFailure => {
            FailureClass::Connect
        }
        ReadTimedout | WriteTimedout => FailureClass::ReadTimeout,
        ConnectionClosed | ReadError | WriteError => FailureClass::Reset,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => FailureClass::Framing,
        _ => return None,
    };
    // Connect-time failures happen before any request byte: the client cannot have caused them.
    let after_connect = !matches!(class, FailureClass::Connect | FailureClass::ConnectTimeout);
    if after_connect && !request_body_done {
        return None;
    }
    Some(class)
}

/// Gateway answers (502/503/504) waiting for evidence about who is to blame.
///
/// Each held try keeps its breaker admission. When a *different* server then answers the same
/// request without a gateway status, the held servers were outliers: each is charged a
/// [`FailureClass::GatewayStatus`] failure. When a different server also answers with a gateway
/// status, the URL fails everywhere: the earlier holds are released uncharged (the newest is
/// held in turn). Whatever is still held when the request ends is released uncharged, so a lone
/// server, or a request whose retries ran out, charges nobody for statuses.
///
/// When gateway answers came from two servers or more and none answered, the URL failed
/// everywhere it was tried ([`StatusEvidence::failed_everywhere`]): `origin::failing`
/// remembers it for a while.
#[derive(Default)]
pub struct StatusEvidence {
    held: Vec<Selected>,
    /// Gateway answers came from more than one server, and no server answered since.
    several: bool,
}

impl StatusEvidence {
    /// Hold a try that got a gateway status. Tries held earlier from other servers are released:
    /// this server failed the same request too.
    pub fn hold(&mut self, sel: Selected) {
        let addr = sel.addr;
        let before = self.held.len();
        self.held.retain(|h| h.addr == addr);
        self.several |= self.held.len() < before;
        self.held.push(sel);
    }

    /// A server answered the request without a gateway status: charge every held try of the
    /// *other* servers; release the ones of `addr` itself (the same server answered well, so
    /// its gateway answer was a blip, not evidence).
    pub fn answered_by(&mut self, addr: SocketAddr, request_id: &str) {
        self.several = false;
        for sel in self.held.drain(..) {
            if sel.addr != addr {
                sel.failed(FailureClass::GatewayStatus, request_id);
            }
        }
    }

    /// Whether the request got gateway answers from two servers or more and no answer: the URL
    /// fails everywhere it was tried.
    pub fn failed_everywhere(&self) -> bool {
        self.several && !self.held.is_empty()
    }

    /// Servers currently held (for tests and logs).
    pub fn held(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.held.iter().map(|s| s.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for s in [502, 503, 504] {
            assert_eq!(status_verdict(s), StatusVerdict::Gateway, "{s}");
        }
        for s in [200, 206, 304, 400, 404, 429, 500, 501, 505, 599] {
            assert_eq!(status_verdict(s), StatusVerdict::Answered, "{s}");
        }
    }

    #[test]
    fn client_side_errors_are_never_charged() {
        for etype in [
            ErrorType::ReadTimedout,
            ErrorType::ConnectionClosed,
            ErrorType::InvalidHTTPHeader,
            ErrorType::ReadError,
            ErrorType::WriteError,
        ] {
            let mut e = Error::new(etype.clone());
            e.as_down();
            assert_eq!(classify_error(&e, true), None, "{etype:?} from downstream");
            e.as_in();
            assert_eq!(classify_error(&e, true), None, "{etype:?} internal");
        }
    }

    #[test]
    fn origin_errors_by_type() {
        let up = |t: ErrorType, done: bool| {
            let mut e = Error::new(t);
            e.as_up();
            classify_error(&e, done)
        };
        assert_eq!(
            up(ErrorType::ConnectRefused, true),
            Some(FailureClass::Connect)
        );
        assert_eq!(
            up(ErrorType::ConnectTimedout, false),
            Some(FailureClass::ConnectTimeout)
        );
        assert_eq!(
            up(ErrorType::ReadTimedout, true),
            Some(FailureClass::ReadTimeout)
        );
        assert_eq!(
            up(ErrorType::ConnectionClosed, true),
            Some(FailureClass::Reset)
        );
        assert_eq!(
            up(ErrorType::InvalidHTTPHeader, true),
            Some(FailureClass::Framing)
        );
        // Our own filters' status errors and internal errors are not the server's failures.
        assert_eq!(up(ErrorType::HTTPStatus(503), true), None);
        assert_eq!(up(ErrorType::InternalError, true), None);
    }

    #[test]
    fn a_server_still_owed_request_bytes_is_not_charged_after_connecting() {
        let mut e = Error::new(ErrorType::ReadTimedout);
        e.as_up();
        assert_eq!(classify_error(&e, false), None);
        let mut e = Error::new(ErrorType::ConnectionClosed);
        e.as_up();
        assert_eq!(classify_error(&e, false), None);
        // Connecting is not waiting on the client.
        let mut e = Error::new(ErrorType::ConnectRefused);
        e.as_up();
        assert_eq!(classify_error(&e, false), Some(FailureClass::Connect));
    }

    #[test]
    fn class_names_are_distinct_and_indexed() {
        let names: std::collections::HashSet<_> =
            FailureClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), FailureClass::ALL.len());
        for (i, c) in FailureClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
