//! A test certificate authority made at test time: a self-signed CA and leaf certificates it
//! issues for given DNS names (and 127.0.0.1), written as PEM files in a temporary directory.
//! Real clients trust it by `ca_path()` (curl `--cacert`, nghttp `--cacert` is not supported:
//! use `-k` there and check the certificate with `openssl s_client -CAfile`).

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509};
use std::path::{Path, PathBuf};

/// A certificate and key written as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate itself, for comparing with what a handshake presented.
    pub pem: Vec<u8>,
}

/// A CA that signs leaf certificates, with its files in its own temporary directory.
pub struct TestCa {
    dir: tempfile::TempDir,
    key: PKey<Private>,
    cert: X509,
    ca_path: PathBuf,
    serial: u32,
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("pkey")
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().expect("name");
    n.append_entry_by_text("CN", cn).expect("CN");
    n.build()
}

fn random_serial() -> Asn1Integer {
    let mut bn = BigNum::new().expect("bn");
    bn.rand(64, MsbOption::MAYBE_ZERO, false).expect("rand");
    bn.to_asn1_integer().expect("serial")
}

impl TestCa {
    /// A fresh CA named `cn`, valid for ten years.
    pub fn new(cn: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = new_key();
        let mut b = X509::builder().expect("builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&random_serial()).expect("serial");
        b.set_subject_name(&name(cn)).expect("subject");
        b.set_issuer_name(&name(cn)).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&Asn1Time::days_from_now(0).expect("t"))
            .expect("nb");
        b.set_not_after(&Asn1Time::days_from_now(3650).expect("t"))
            .expect("na");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
            .expect("ext");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .expect("ku"),
        )
        .expect("ext");
        b.sign(&key, MessageDigest::sha256()).expect("sign");
        let cert = b.build();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, cert.to_pem().expect("pem")).expect("write ca");
        TestCa {
            dir,
            key,
            cert,
            ca_path,
            serial: 0,
        }
    }

    /// The CA certificate's PEM file (what clients and `upstreams.*.tls.ca` trust).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The directory the files are written in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A leaf certificate for `dns_names` (the first is its CN) and 127.0.0.1, valid for
    /// `days` days from now (a small number makes a certificate about to expire).
    pub fn issue(&mut self, dns_names: &[&str], days: u32) -> CertFiles {
        self.serial += 1;
        let key = new_key();
        let cn = dns_names.first().copied().unwrap_or("localhost");
        let mut b = X509::builder().expect("builder");
        b.set_version(2).expect("version");
        b.set_serial_number(&random_serial()).expect("serial");
        b.set_subject_name(&name(cn)).expect("subject");
        b.set_issuer_name(self.cert.subject_name()).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&Asn1Time::days_from_now(0).expect("t"))
            .expect("nb");
        b.set_not_after(&Asn1Time::days_from_now(days).expect("t"))
            .expect("na");
        let mut san = SubjectAlternativeName::new();
        for n in dns_names {
            san.dns(n);
        }
        san.ip("127.0.0.1");
        let ctx = b.x509v3_context(Some(&self.cert), None);
        let san = san.build(&ctx).expect("san");
        b.append_extension(san).expect("ext");
        b.append_extension(BasicConstraints::new().build().expect("bc"))
            .expect("ext");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .expect("ku"),
        )
        .expect("ext");
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .expect("eku"),
        )
        .expect("ext");
        b.sign(&self.key, MessageDigest::sha256()).expect("sign");
        let cert = b.build();
        let pem = cert.to_pem().expect("pem");
        let stem = format!("{}-{}", cn.replace('*', "star"), self.serial);
        let cert_path = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert_path, &pem).expect("write cert");
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().expect("key pem"))
            .expect("write key");
        CertFiles {
            cert: cert_path,
            key: key_path,
            pem,
        }
    }
}

/// A TLS front for an in-process origin (tests/common/origin.rs speaks plain HTTP/1.1): it
/// terminates TLS with a certificate and relays each connection to `backend` over TCP, byte
/// for byte. When the backend cuts a response (a fault), the TLS connection is dropped at that
/// point, without close_notify: the client sees the cut over TLS. Dropping the front stops it
/// and every relayed connection.
pub struct TlsFront {
    pub addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(backend: std::net::SocketAddr, cert: &CertFiles) -> TlsFront {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
        use std::sync::atomic::Ordering;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).expect("acceptor");
        b.set_certificate_chain_file(&cert.cert).expect("cert");
        b.set_private_key_file(&cert.key, SslFiletype::PEM)
            .expect("key");
        let acceptor = std::sync::Arc::new(b.build());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
                        return;
                    };
                    let Ok(mut tls) = pingora_core::tls::tokio_ssl::SslStream::new(ssl, tcp) else {
                        return;
                    };
                    if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TlsFront {
            addr,
            accepted,
            task,
        }
    }

    /// TLS connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response as curl got it, with the HTTP version it negotiated (`1.1`, `2`).
pub struct Got {
    pub version: String,
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

/// `curl --cacert CA https://{host}:{port}{path}` (`host` resolved to 127.0.0.1), over HTTP/2
/// when ALPN offers it and `http2`, else HTTP/1.1, with `extra` args.
pub fn curl(
    ca: &Path,
    tls: std::net::SocketAddr,
    host: &str,
    path: &str,
    http2: bool,
    extra: &[&str],
) -> Result<Got, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (head, body) = (dir.path().join("h"), dir.path().join("b"));
    let url = format!("https://{host}:{}{path}", tls.port());
    let resolve = format!("{host}:{}:127.0.0.1", tls.port());
    let out = std::process::Command::new("curl")
        .args(["-sS", if http2 { "--http2" } else { "--http1.1" }])
        .args(["--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &resolve, "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_version} %{http_code}"])
        .args(extra)
        .arg(&url)
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Err(format!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tail = String::from_utf8_lossy(&out.stdout).into_owned();
    let (version, status) = tail.trim().split_once(' ').unwrap_or(("", ""));
    Ok(Got {
        version: version.to_string(),
        status: status.parse().unwrap_or(0),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    })
}
