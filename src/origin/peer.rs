//! How one server of a group is reached: the Pingora peer every connection to it is made from
//! (fills, revalidations, resumes, pass-through and health checks alike), with the group's
//! timeouts and, for an HTTPS group (`upstreams.<name>.tls`), its SNI, verification, CA and ALPN.
//!
//! Connection reuse: Pingora's connector pools idle connections by the peer's hash, which covers
//! the address, scheme, SNI and the verify flags but not the CA or ALPN. Those go into
//! `group_key` (also hashed), so two groups that reach one address with different trust never
//! share a connection that only one of them verified.
//!
//! Certificate failures are logged once per server and cause ([`TlsFailureLog`]), never per
//! request: a wrong CA under load would otherwise write a line per request.

use crate::config::{ServerSpec, UpstreamSettings};
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The peer for `server` of the group `settings`: its timeouts, and TLS as the group says.
/// The name verified is [`UpstreamSettings::sni_for`]; a server with none (an IP address, no
/// `sni` nor `host`) is verified against its address.
pub fn peer_for(settings: &UpstreamSettings, server: &ServerSpec) -> HttpPeer {
    let Some(tls) = &settings.tls else {
        return with_timeouts(HttpPeer::new(server.addr, false, String::new()), settings);
    };
    // Pingora turns verification off for an empty SNI (as nginx does): never leave it empty.
    // An address is not sent as SNI (the openssl connector skips it) and is verified as an
    // address (vendor patch, see vendor/README.md).
    let name = settings
        .sni_for(server)
        .map(|n| n.trim_start_matches('[').trim_end_matches(']').to_string())
        .unwrap_or_else(|| server.addr.ip().to_string());
    let mut peer = HttpPeer::new(server.addr, true, name);
    let o = &mut peer.options;
    o.verify_cert = tls.verify;
    o.verify_hostname = tls.verify;
    o.ca = tls.ca.as_ref().map(|c| c.certs.clone());
    o.alpn = if settings.http2 { ALPN::H2H1 } else { ALPN::H1 };
    let mut h = fixed_hasher();
    if let Some(ca) = &tls.ca {
        for c in ca.certs.iter() {
            c.to_der().unwrap_or_default().hash(&mut h);
        }
    }
    settings.http2.hash(&mut h);
    peer.group_key = h.finish();
    with_timeouts(peer, settings)
}

/// A hasher with fixed keys: `group_key` must be the same for every peer of one group.
fn fixed_hasher() -> std::collections::hash_map::DefaultHasher {
    std::collections::hash_map::DefaultHasher::new()
}

/// `connect_timeout` per connection attempt (the TLS handshake included), `read_timeout` as
/// the idle time allowed between reads and writes.
fn with_timeouts(mut peer: HttpPeer, settings: &UpstreamSettings) -> HttpPeer {
    if let Some(ip) = settings.source {
        let mut bind = pingora_core::connectors::l4::BindTo::default();
        bind.addr = Some(std::net::SocketAddr::new(ip, 0));
        peer.options.bind_to = Some(bind);
    }
    peer.options.connection_timeout = Some(settings.connect_timeout);
    peer.options.read_timeout = Some(settings.read_timeout);
    peer.options.write_timeout = Some(settings.read_timeout);
    peer
}

/// Why a TLS connection to a server failed, as far as the log line is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsCause {
    /// The certificate did not verify (unknown CA, wrong name, expired, ...).
    InvalidCert,
    /// The handshake failed otherwise (no common protocol or cipher, reset mid-handshake).
    Handshake,
}

impl TlsCause {
    pub fn of(etype: &pingora_error::ErrorType) -> Option<TlsCause> {
        use pingora_error::ErrorType::*;
        match etype {
            InvalidCert => Some(TlsCause::InvalidCert),
            TLSHandshakeFailure | HandshakeError => Some(TlsCause::Handshake),
            _ => None,
        }
    }
}

/// The (server, cause) pairs already logged: a certificate failure is logged on its first
/// occurrence, and again only after that server connected fine in between. Bounded by the
/// group's servers times the two causes (entries are never made for other addresses, and a
/// server's go when it leaves the group: [`TlsFailureLog::retain`]).
#[derive(Debug, Default)]
pub struct TlsFailureLog {
    logged: Mutex<HashMap<SocketAddr, u8>>,
    /// Something is in `logged`: while not, a connect that went well takes no lock.
    any: AtomicBool,
}

impl TlsFailureLog {
    /// Record a TLS failure of `server`: `true` when it is the first of this cause since the
    /// server last connected well (the caller logs it then), `false` when already logged.
    pub fn first(&self, server: SocketAddr, cause: TlsCause) -> bool {
        let bit = match cause {
            TlsCause::InvalidCert => 1,
            TlsCause::Handshake => 2,
        };
        let mut m = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let seen = m.entry(server).or_insert(0);
        let first = *seen & bit == 0;
        *seen |= bit;
        self.any.store(true, Ordering::Release);
        first
    }

    /// Forget the servers `keep` says no: they left the group (a name resolved elsewhere), so
    /// the log stays bounded by the servers the group has.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|a, _| keep(a));
        if m.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }

    /// `server` connected: its next failure is news again. Lock-free when nothing is logged.
    pub fn recovered(&self, server: SocketAddr) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if m.remove(&server).is_some() {
            log::info!("origin {server}: TLS connection established again");
        }
        if m.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_logged_once_per_server_and_cause_until_the_server_recovers() {
        let log = TlsFailureLog::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(log.first(a, TlsCause::InvalidCert));
        for _ in 0..100 {
            assert!(!log.first(a, TlsCause::InvalidCert));
        }
        assert!(log.first(a, TlsCause::Handshake));
        assert!(log.first(b, TlsCause::InvalidCert));
        log.recovered(a);
        assert!(log.first(a, TlsCause::InvalidCert));
        assert!(!log.first(b, TlsCause::InvalidCert));
    }
}
