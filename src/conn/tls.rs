//! The TLS handshake of a client connection, run by the connection's own task after admission
//! (so a TLS connection counts against `server.max_connections` from accept) and under the
//! same deadline as the first request's header: the handshake and that header together must
//! arrive within `server.header_timeout` of accept. Pingora's own TLS listener is not used: it
//! handshakes for up to 60 s before the application sees the connection.
//!
//! ```text
//!  admitted (Fresh: reclaimable at the cap like an idle connection)
//!     ─► first byte (the ClientHello) ─► Header: reclaimable as a header arriving
//!     ─► handshake ─► Guarded(SslStream): the HTTP/1 header is scanned decrypted
//! ```
//!
//! While it waits for the ClientHello and while it handshakes, the connection ends at the
//! deadline, when its client leaves, or as soon as the table reclaims it for a new client.
//! Never here: anything per request.

use super::table::Conn;
use crate::tls::CertSet;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::SslStream;
use pingora_core::protocols::Stream;
use std::time::Instant;

/// How a handshake ended without a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// `header_timeout` passed since accept.
    TimedOut,
    /// Reclaimed at the cap.
    Reclaimed,
    /// The client left, or the handshake failed (no common version or cipher, not TLS...).
    Ended,
}

/// Handshake on `stream` with `certs` by `deadline` (accept + `header_timeout`). The
/// connection is `Fresh` until its first byte, then a header arriving (`Phase::Header`).
pub async fn accept(
    mut stream: Stream,
    certs: &CertSet,
    conn: &Conn,
    deadline: Instant,
) -> Result<SslStream<L4Stream>, Failed> {
    let until = tokio::time::sleep_until(deadline.into());
    tokio::pin!(until);
    // The first byte stays in the stream (Pingora's rewind buffer) for the handshake.
    let mut first = [0u8; 1];
    tokio::select! {
        biased;
        _ = conn.reclaimed() => return Err(Failed::Reclaimed),
        _ = &mut until => return Err(Failed::TimedOut),
        peeked = stream.try_peek(&mut first) => match peeked {
            Ok(true) => {}
            _ => return Err(Failed::Ended),
        },
    }
    if !conn.begin_header() {
        return Err(Failed::Reclaimed);
    }
    // The TLS layer goes over the socket itself, as in Pingora's own listener.
    let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
        log::error!("tls: a listener's connection is not a TCP stream");
        return Err(Failed::Ended);
    };
    tokio::select! {
        biased;
        _ = conn.reclaimed() => Err(Failed::Reclaimed),
        _ = &mut until => Err(Failed::TimedOut),
        done = pingora_core::protocols::tls::server::handshake(certs.acceptor(), *tcp) => {
            done.map_err(|e| {
                log::debug!("tls: handshake failed: {e}");
                Failed::Ended
            })
        }
    }
}
