//! `listen` entries: a bare address (plain HTTP/1.1), or an address with TLS (certificates
//! chosen by SNI, a version floor), HTTP/2 by ALPN, and h2c. Pure data: the certificate files
//! are read by [`crate::tls`], which reports its errors with the key paths and lines kept here.

use super::schema::{RawListen, RawListenEntry};
use super::{err_at, parse_addr, ConfigError};
use serde_saphyr::Spanned;
use std::net::SocketAddr;
use std::path::PathBuf;

/// One `listen` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSettings {
    /// The address as written (the `listener` label of the TLS metrics).
    pub name: String,
    pub address: SocketAddr,
    /// `tls`: present, this listener speaks TLS only.
    pub tls: Option<TlsListenSettings>,
    /// `http2`: ALPN offers `h2` (TLS listeners only; default true there).
    pub http2: bool,
    /// `h2c`: prior-knowledge cleartext HTTP/2 beside HTTP/1.1 (default false).
    pub h2c: bool,
}

impl ListenSettings {
    /// A plain HTTP/1.1 listener on `address`.
    pub fn plain(address: SocketAddr) -> ListenSettings {
        ListenSettings {
            name: address.to_string(),
            address,
            tls: None,
            http2: false,
            h2c: false,
        }
    }
}

/// `listen[N].tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenSettings {
    /// In order: the first is the default (no SNI, or a name no certificate has).
    pub certificates: Vec<CertificatePaths>,
    pub min_version: TlsVersion,
}

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

/// Where a key was written, for errors found after validation (reading the files).
#[derive(Debug, Clone)]
pub struct KeyAt {
    pub path: String,
    pub line: u64,
    pub column: u64,
}

impl KeyAt {
    fn of<T>(path: String, at: &Spanned<T>) -> KeyAt {
        KeyAt {
            path,
            line: at.referenced.line(),
            column: at.referenced.column(),
        }
    }

    /// An error about the value of this key.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: Some(self.line),
            column: Some(self.column),
            message: message.into(),
        }
    }
}

/// `listen[N].tls.certificates[M]`: PEM files, read at start and on each reload.
#[derive(Debug, Clone)]
pub struct CertificatePaths {
    /// The certificate, then its chain.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_at: KeyAt,
    pub key_at: KeyAt,
}

/// The same files, wherever in the file they were written.
impl PartialEq for CertificatePaths {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key
    }
}

impl Eq for CertificatePaths {}

pub(super) fn listen_entry(
    i: usize,
    raw: &Spanned<RawListen>,
) -> Result<ListenSettings, ConfigError> {
    let path = format!("listen[{i}]");
    match &raw.value {
        RawListen::Address(a) => {
            let at = Spanned {
                value: a.clone(),
                referenced: raw.referenced,
                defined: raw.defined,
            };
            let address = parse_addr(&path, &at)?;
            Ok(ListenSettings {
                name: a.trim().to_string(),
                ..ListenSettings::plain(address)
            })
        }
        RawListen::Entry(e) => entry(&path, e),
    }
}

fn entry(path: &str, e: &RawListenEntry) -> Result<ListenSettings, ConfigError> {
    let address = parse_addr(&format!("{path}.address"), &e.address)?;
    let tls = match &e.tls {
        None => None,
        Some(at) => {
            let tls_path = format!("{path}.tls");
            // `tls:` alone: a TLS listener without certificates, not a plain one.
            let Some(t) = at.value.as_ref() else {
                return Err(err_at(
                    format!("{tls_path}.certificates"),
                    at,
                    "at least one certificate is required",
                ));
            };
            if t.certificates.value.is_empty() {
                return Err(err_at(
                    format!("{tls_path}.certificates"),
                    &t.certificates,
                    "at least one certificate is required",
                ));
            }
            let certificates = t
                .certificates
                .value
                .iter()
                .enumerate()
                .map(|(m, c)| {
                    let at = format!("{tls_path}.certificates[{m}]");
                    let file = |s: &Spanned<String>, key: &str| {
                        let v = s.value.trim();
                        if v.is_empty() {
                            return Err(err_at(format!("{at}.{key}"), s, "must not be empty"));
                        }
                        Ok(PathBuf::from(v))
                    };
                    Ok(CertificatePaths {
                        cert: file(&c.value.cert, "cert")?,
                        key: file(&c.value.key, "key")?,
                        cert_at: KeyAt::of(format!("{at}.cert"), &c.value.cert),
                        key_at: KeyAt::of(format!("{at}.key"), &c.value.key),
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            let min_version = match &t.min_version {
                None => TlsVersion::default(),
                Some(v) => match v.value.0.as_str() {
                    "1.2" => TlsVersion::Tls12,
                    "1.3" => TlsVersion::Tls13,
                    other => {
                        return Err(err_at(
                            format!("{tls_path}.min_version"),
                            v,
                            format!("unknown TLS version {other:?} (use \"1.2\" or \"1.3\")"),
                        ))
                    }
                },
            };
            Some(TlsListenSettings {
                certificates,
                min_version,
            })
        }
    };
    Ok(ListenSettings {
        name: e.address.value.trim().to_string(),
        address,
        // ALPN is a TLS extension: without TLS there is nothing to offer h2 by.
        http2: tls.is_some() && e.http2.unwrap_or(true),
        tls,
        h2c: e.h2c.unwrap_or(false),
    })
}
