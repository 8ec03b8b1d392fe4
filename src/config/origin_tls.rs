//! How a group's servers are reached: `upstreams.<name>.host`, `.tls` {`sni`, `verify`, `ca`}
//! and `.http2`, validated into [`OriginTls`] and the `host` override.
//!
//! The CA file is read and parsed here, once per configuration (start, `-t`, each reload), so a
//! missing, unreadable or certificate-less file is an error naming `upstreams.<name>.tls.ca` and
//! its line, and the certificates are then shared by every connection of the group. Nothing
//! else here touches the file system; nothing panics on input.

use super::schema::RawUpstreamTls;
use super::{err_at, ConfigError};
use pingora_core::tls::x509::X509;
use serde_saphyr::Spanned;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// `upstreams.<name>.tls`: the group is HTTPS.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginTls {
    /// `tls.sni`: the name sent in SNI and verified against, for every server of the group.
    /// `None`: the default per server ([`OriginTls::sni_for`]).
    pub sni: Option<String>,
    /// Verify the server's certificate chain and name (default true).
    pub verify: bool,
    /// `tls.ca`: the only CAs trusted for this group; `None` = the system trust store.
    pub ca: Option<CaBundle>,
}

/// The certificates of a `tls.ca` file, read once per configuration.
#[derive(Debug, Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    /// In the shape Pingora's `PeerOptions::ca` takes, shared by every peer of the group.
    pub certs: Arc<Box<[X509]>>,
}

/// Same file, same certificates: a reload that finds a changed CA file rebuilds the group's
/// pool (and so its connections), one that finds it unchanged keeps them.
impl PartialEq for CaBundle {
    fn eq(&self, other: &CaBundle) -> bool {
        self.path == other.path && self.certs == other.certs
    }
}

impl OriginTls {
    /// The name a server is reached by: `tls.sni` if set, else the group's `host` (without its
    /// port), else the server's host name as written in `servers`; `None` for a server written
    /// as an IP address with neither set (no SNI is sent then, and the certificate is verified
    /// against the address itself: an IP entry of its subjectAltName).
    pub fn sni_for<'a>(
        &'a self,
        host: Option<&'a str>,
        server_name: Option<&'a str>,
    ) -> Option<&'a str> {
        self.sni
            .as_deref()
            .or_else(|| host.map(host_without_port))
            .or(server_name)
    }
}

/// `name` of `name:port` (`[v6]` of `[v6]:port`).
fn host_without_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    host.split(':').next().unwrap_or(host)
}

/// `upstreams.<name>.host`: a host name or address, with an optional port, as a `Host` field
/// carries it.
pub fn validate_host(base: &str, at: &Spanned<String>) -> Result<String, ConfigError> {
    let v = at.value.trim();
    match crate::proxy::canonical::host(v.as_bytes(), &[]) {
        Ok(_) => Ok(v.to_string()),
        Err(_) => Err(err_at(
            format!("{base}.host"),
            at,
            format!("invalid host {v:?}: a host name or address, with an optional port"),
        )),
    }
}

/// Validate `upstreams.<name>.tls` (`base` is `upstreams.<name>`), reading its `ca` file.
pub fn validate(
    base: &str,
    raw: &Spanned<Option<RawUpstreamTls>>,
) -> Result<OriginTls, ConfigError> {
    // `tls:` alone: HTTPS with every default.
    let defaults = RawUpstreamTls::default();
    let t = raw.value.as_ref().unwrap_or(&defaults);
    let sni = match &t.sni {
        None => None,
        Some(s) => {
            let v = s.value.trim();
            let ok = !v.is_empty()
                && (v.parse::<IpAddr>().is_ok()
                    || matches!(crate::proxy::canonical::host(v.as_bytes(), &[]),
                        Ok(h) if h.port.is_none()));
            if !ok {
                return Err(err_at(
                    format!("{base}.tls.sni"),
                    s,
                    format!("invalid sni {v:?}: a host name, without a port"),
                ));
            }
            Some(v.to_ascii_lowercase())
        }
    };
    let verify = t.verify.as_ref().is_none_or(|v| v.value);
    let ca =
        t.ca.as_ref()
            .map(|c| read_ca(&format!("{base}.tls.ca"), c))
            .transpose()?;
    Ok(OriginTls { sni, verify, ca })
}

/// Read the PEM certificates of a `tls.ca` file.
fn read_ca(path: &str, at: &Spanned<String>) -> Result<CaBundle, ConfigError> {
    let file = PathBuf::from(at.value.trim());
    if file.as_os_str().is_empty() {
        return Err(err_at(path, at, "empty path"));
    }
    let pem = std::fs::read(&file)
        .map_err(|e| err_at(path, at, format!("cannot read {}: {e}", file.display())))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        err_at(
            path,
            at,
            format!("{} is not a PEM certificate file: {e}", file.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(err_at(
            path,
            at,
            format!("{} holds no PEM certificate", file.display()),
        ));
    }
    Ok(CaBundle {
        path: file,
        certs: Arc::new(certs.into_boxed_slice()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(sni: Option<&str>) -> OriginTls {
        OriginTls {
            sni: sni.map(str::to_string),
            verify: true,
            ca: None,
        }
    }

    #[test]
    fn sni_defaults_to_host_then_the_server_name_then_none() {
        let t = tls(None);
        assert_eq!(t.sni_for(None, Some("a.example")), Some("a.example"));
        assert_eq!(
            t.sni_for(Some("b.example:8443"), Some("a.example")),
            Some("b.example")
        );
        assert_eq!(t.sni_for(Some("b.example"), None), Some("b.example"));
        assert_eq!(t.sni_for(None, None), None);
        let t = tls(Some("c.example"));
        assert_eq!(
            t.sni_for(Some("b.example"), Some("a.example")),
            Some("c.example")
        );
        assert_eq!(host_without_port("[::1]:443"), "[::1]");
    }
}
