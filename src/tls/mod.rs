//! TLS listeners' certificates: read from the configured PEM files at start and on each reload,
//! chosen per handshake by SNI ([`sni`]), served with Mozilla's "intermediate" profile.
//!
//! Each TLS listener holds its current [`CertSet`] behind an `ArcSwap`: a handshake takes the
//! set in force when it starts and its connection keeps it (OpenSSL counts its references), so
//! a reload changes what new handshakes see and nothing else. A reload reads every file first
//! and swaps only when all of them loaded: a bad file keeps every old certificate.
//!
//! One `SslAcceptor` per set, shared by every worker thread: its session cache and its session
//! ticket keys are the acceptor's, so a client resumes whichever thread it lands on. Each
//! certificate has its own context, switched to in OpenSSL's servername callback (called in the
//! ClientHello, before the certificate is chosen, synchronously: no extra round through the
//! runtime as Pingora's async `certificate_callback` takes, and the session cache and ticket
//! keys stay the acceptor's, which OpenSSL keeps as the session context across the switch).
//!
//! Never here: the handshake itself (that runs in [`crate::conn`], under admission and the
//! header deadline), or any file read on a worker thread during traffic.

pub mod sni;

use crate::config::{CertificatePaths, ConfigError, ListenSettings, TlsListenSettings, TlsVersion};
use arc_swap::ArcSwap;
use openssl::asn1::Asn1Time;
use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    select_next_proto, AlpnError, NameType, SslAcceptor, SslAcceptorBuilder, SslMethod, SslOptions,
    SslSessionCacheMode, SslVersion,
};
use openssl::x509::X509;
use sni::SniIndex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate expiring sooner than this is a warning at start and at each reload.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Mozilla's "intermediate" elliptic curves, in preference order.
const GROUPS: &str = "X25519:prime256v1:secp384r1";
/// ALPN in wire format, in the server's preference order.
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";
const ALPN_H1: &[u8] = b"\x08http/1.1";

/// What a served certificate says about itself (logs, the expiry gauge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The first DNS name (SAN dNSName; the CN when there is none); empty if neither.
    pub name: String,
    /// Every DNS name it answers for.
    pub names: Vec<String>,
    /// notAfter, Unix time.
    pub not_after: i64,
    /// The certificate file, for messages.
    pub file: String,
}

/// One listener's certificates, ready for handshakes.
pub struct CertSet {
    acceptor: SslAcceptor,
    info: Vec<CertificateInfo>,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet").field("info", &self.info).finish()
    }
}

impl CertSet {
    pub fn acceptor(&self) -> &SslAcceptor {
        &self.acceptor
    }

    pub fn certificates(&self) -> &[CertificateInfo] {
        &self.info
    }

    /// Read every certificate of `tls` and build the acceptor; errors name the key and line.
    pub fn load(tls: &TlsListenSettings, http2: bool) -> Result<CertSet, ConfigError> {
        let loaded = tls
            .certificates
            .iter()
            .map(read_certificate)
            .collect::<Result<Vec<_>, _>>()?;
        let build_error = |c: &CertificatePaths, e: ErrorStack| {
            c.key_at.error(format!(
                "cannot use {} with {}: {e}",
                c.cert.display(),
                c.key.display()
            ))
        };
        // The other certificates' contexts, switched to by SNI (the first is the acceptor's own).
        let mut others = Vec::with_capacity(loaded.len().saturating_sub(1));
        for (l, paths) in loaded.iter().zip(&tls.certificates).skip(1) {
            let ctx = builder(l, tls.min_version, http2).map_err(|e| build_error(paths, e))?;
            others.push(ctx.build().into_context());
        }
        let (first, first_paths) = match (loaded.first(), tls.certificates.first()) {
            (Some(l), Some(p)) => (l, p),
            // Validation requires one at least.
            _ => {
                return Err(ConfigError {
                    path: "listen".into(),
                    line: None,
                    column: None,
                    message: "a TLS listener needs at least one certificate".into(),
                })
            }
        };
        let mut b =
            builder(first, tls.min_version, http2).map_err(|e| build_error(first_paths, e))?;
        let index = SniIndex::new(
            &loaded
                .iter()
                .map(|l| l.info.names.clone())
                .collect::<Vec<_>>(),
        );
        b.set_servername_callback(move |ssl, _alert| {
            let chosen = ssl
                .servername(NameType::HOST_NAME)
                .and_then(|name| index.lookup(name));
            if let Some(ctx) = chosen.and_then(|i| others.get(i.checked_sub(1)?)) {
                // Fails only on OpenSSL's allocation failure: the default certificate then.
                let _ = ssl.set_ssl_context(ctx);
            }
            Ok(())
        });
        Ok(CertSet {
            acceptor: b.build(),
            info: loaded.into_iter().map(|l| l.info).collect(),
        })
    }
}

struct Loaded {
    chain: Vec<X509>,
    key: PKey<Private>,
    info: CertificateInfo,
}

fn read_certificate(c: &CertificatePaths) -> Result<Loaded, ConfigError> {
    let pem = std::fs::read(&c.cert).map_err(|e| {
        c.cert_at
            .error(format!("cannot read {}: {e}", c.cert.display()))
    })?;
    let chain = X509::stack_from_pem(&pem).map_err(|e| {
        c.cert_at.error(format!(
            "{} is not a PEM certificate: {e}",
            c.cert.display()
        ))
    })?;
    let Some(leaf) = chain.first() else {
        return Err(c
            .cert_at
            .error(format!("no certificate in {}", c.cert.display())));
    };
    let key_pem = std::fs::read(&c.key).map_err(|e| {
        c.key_at
            .error(format!("cannot read {}: {e}", c.key.display()))
    })?;
    let key = PKey::private_key_from_pem(&key_pem).map_err(|e| {
        c.key_at
            .error(format!("no PEM private key in {}: {e}", c.key.display()))
    })?;
    let matches = leaf
        .public_key()
        .map(|public| public.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(c.key_at.error(format!(
            "the key in {} does not match the certificate in {}",
            c.key.display(),
            c.cert.display()
        )));
    }
    let names = dns_names(leaf);
    let not_after = unix_time(leaf.not_after()).ok_or_else(|| {
        c.cert_at
            .error(format!("unreadable notAfter in {}", c.cert.display()))
    })?;
    let info = CertificateInfo {
        name: names.first().cloned().unwrap_or_default(),
        names,
        not_after,
        file: c.cert.display().to_string(),
    };
    Ok(Loaded { chain, key, info })
}

/// SAN dNSName entries, lower case; the subject CN only when there is none.
fn dns_names(cert: &X509) -> Vec<String> {
    let san: Vec<String> = cert
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.dnsname().map(|d| d.to_ascii_lowercase()))
                .collect()
        })
        .unwrap_or_default();
    if !san.is_empty() {
        return san;
    }
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|e| e.data().to_string().ok().map(|s| s.to_ascii_lowercase()))
        .take(1)
        .collect()
}

fn unix_time(t: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// A context for one certificate: the "intermediate" profile (TLS 1.2 and 1.3, its cipher list
/// and curves, the client's cipher preference), session resumption (cache and tickets), ALPN.
fn builder(
    cert: &Loaded,
    min_version: TlsVersion,
    http2: bool,
) -> Result<SslAcceptorBuilder, ErrorStack> {
    // TLS 1.0/1.1 off, the intermediate cipher list and TLS 1.3 suites, ffdhe2048 for DHE.
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(match min_version {
        TlsVersion::Tls12 => SslVersion::TLS1_2,
        TlsVersion::Tls13 => SslVersion::TLS1_3,
    }))?;
    b.set_groups_list(GROUPS)?;
    // "intermediate": the client's order (it knows whether it has AES hardware).
    b.clear_options(SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_session_cache_mode(SslSessionCacheMode::SERVER);
    b.set_session_id_context(b"edgeslice")?;
    let mut chain = cert.chain.iter();
    if let Some(leaf) = chain.next() {
        b.set_certificate(leaf)?;
    }
    for c in chain {
        b.add_extra_chain_cert(c.clone())?;
    }
    b.set_private_key(&cert.key)?;
    b.check_private_key()?;
    let offer: &'static [u8] = if http2 { ALPN_H2_H1 } else { ALPN_H1 };
    b.set_alpn_select_callback(move |_, client| {
        select_next_proto(offer, client).ok_or(AlpnError::NOACK)
    });
    Ok(b)
}

/// A TLS listener: its settings (fixed until a restart) and the certificates in force.
pub struct TlsListener {
    /// The listen address as written (the `listener` label).
    pub name: String,
    pub http2: bool,
    current: ArcSwap<CertSet>,
}

impl TlsListener {
    /// The certificate set for a handshake starting now.
    pub fn current(&self) -> Arc<CertSet> {
        self.current.load_full()
    }
}

/// One `listen` entry as a connection needs it.
pub struct ListenEntry {
    pub address: SocketAddr,
    pub h2c: bool,
    pub tls: Option<Arc<TlsListener>>,
}

/// Every `listen` entry, in order, for the connections to find theirs by local address.
#[derive(Default)]
pub struct ListenTable {
    list: Vec<ListenEntry>,
}

impl std::fmt::Debug for ListenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.list
                    .iter()
                    .map(|l| (l.address, l.tls.is_some(), l.h2c)),
            )
            .finish()
    }
}

/// Certificate sets read for a reload, not yet in force.
pub struct Reread(Vec<(usize, CertSet)>);

impl ListenTable {
    /// Read every TLS listener's certificates (start, `-t`).
    pub fn load(listen: &[ListenSettings]) -> Result<ListenTable, ConfigError> {
        let mut list = Vec::with_capacity(listen.len());
        for l in listen {
            let tls = match &l.tls {
                Some(t) => Some(Arc::new(TlsListener {
                    name: l.name.clone(),
                    http2: l.http2,
                    current: ArcSwap::from_pointee(CertSet::load(t, l.http2)?),
                })),
                None => None,
            };
            list.push(ListenEntry {
                address: l.address,
                h2c: l.h2c,
                tls,
            });
        }
        Ok(ListenTable { list })
    }

    /// Whether a connection must look its listener up (some listener is not plain HTTP/1.1).
    pub fn needs_lookup(&self) -> bool {
        self.list.iter().any(|l| l.tls.is_some() || l.h2c)
    }

    /// The listener a connection accepted on `local` came in by: the entry with that exact
    /// address, else the one on the unspecified address (`0.0.0.0`, `[::]`, which also
    /// accepts IPv4-mapped clients) with its port, else any with its port.
    pub fn for_local(&self, local: SocketAddr) -> Option<&ListenEntry> {
        let port = |l: &&ListenEntry| l.address.port() == local.port();
        self.list
            .iter()
            .find(|l| l.address == local)
            .or_else(|| {
                self.list
                    .iter()
                    .filter(port)
                    .find(|l| l.address.ip().is_unspecified())
            })
            .or_else(|| self.list.iter().find(port))
    }

    /// Every TLS listener.
    pub fn tls(&self) -> impl Iterator<Item = &Arc<TlsListener>> {
        self.list.iter().filter_map(|l| l.tls.as_ref())
    }

    /// Read the certificates again for a reload, from `listen` (the running `listen` entries,
    /// as written in the new file). Nothing changes until [`ListenTable::install`].
    pub fn read_again(&self, listen: &[ListenSettings]) -> Result<Reread, ConfigError> {
        let mut sets = Vec::new();
        for (i, l) in self.list.iter().enumerate() {
            let (Some(tls), Some(settings)) = (&l.tls, listen.get(i).and_then(|s| s.tls.as_ref()))
            else {
                continue;
            };
            sets.push((i, CertSet::load(settings, tls.http2)?));
        }
        Ok(Reread(sets))
    }

    /// Put certificates read by [`ListenTable::read_again`] in force for new handshakes.
    pub fn install(&self, reread: Reread) {
        for (i, set) in reread.0 {
            if let Some(tls) = self.list.get(i).and_then(|l| l.tls.as_ref()) {
                tls.current.store(Arc::new(set));
            }
        }
    }

    /// Log a warning for each certificate in force that expires within [`EXPIRY_WARNING`].
    pub fn warn_expiring(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for tls in self.tls() {
            for c in tls.current().certificates() {
                let left = c.not_after - now;
                if left < EXPIRY_WARNING.as_secs() as i64 {
                    let when = if left <= 0 {
                        "has expired".to_string()
                    } else {
                        format!("expires in {:.1} days", left as f64 / 86_400.0)
                    };
                    log::warn!(
                        "tls: listener {}: certificate {:?} ({}) {when} (notAfter {} Unix time)",
                        tls.name,
                        c.name,
                        c.file,
                        c.not_after
                    );
                }
            }
        }
    }

    /// `edgeslice_tls_certificate_expiry_seconds{listener,name}`, read at scrape time from the
    /// certificates in force (so a reload replaces the series, stale ones included).
    pub fn expiry_samples(&self) -> crate::metrics::Samples {
        self.tls()
            .flat_map(|tls| {
                let set = tls.current();
                set.certificates()
                    .iter()
                    .map(|c| (vec![tls.name.clone(), c.name.clone()], c.not_after as f64))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: &str, h2c: bool) -> ListenSettings {
        ListenSettings {
            h2c,
            ..ListenSettings::plain(addr.parse().unwrap())
        }
    }

    #[test]
    fn a_connection_finds_its_listener_by_local_address() {
        let table = ListenTable::load(&[
            entry("127.0.0.1:8080", false),
            entry("0.0.0.0:8081", true),
            entry("[::]:8082", true),
            entry("10.0.0.1:8083", true),
        ])
        .unwrap();
        assert!(table.needs_lookup());
        let find = |a: &str| {
            table
                .for_local(a.parse().unwrap())
                .map(|l| l.address.port())
        };
        assert_eq!(find("127.0.0.1:8080"), Some(8080));
        assert_eq!(
            find("192.168.1.5:8081"),
            Some(8081),
            "the unspecified address"
        );
        assert_eq!(find("[::ffff:127.0.0.1]:8082"), Some(8082), "IPv4-mapped");
        assert_eq!(find("10.0.0.1:8083"), Some(8083));
        assert_eq!(find("127.0.0.1:9999"), None);
        let plain = ListenTable::load(&[entry("127.0.0.1:8080", false)]).unwrap();
        assert!(
            !plain.needs_lookup(),
            "plain listeners only: no lookup per connection"
        );
    }
}
