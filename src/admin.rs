//! The admin endpoint (`admin.listen`): `GET /healthz` answers `ok` while the process serves;
//! `GET /stats` reports cache occupancy. Calls that change anything are `POST`s carrying
//! `Authorization: Bearer <admin.token>` (see [`AdminApp::authorize`]): `POST /reload` reads the
//! config file again (`crate::reload`).
//! It must stay cheap and never touch the data path's locks.

use crate::cache::store::ChunkCache;
use crate::conn::table::ConnTable;
use crate::origin::ResilienceStats;
use crate::reload::ReloadHandle;
use crate::runtime::Current;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use std::sync::Arc;

impl AdminApp {
    /// Cache occupancy, one `name value` per line.
    fn stats(&self) -> String {
        let c = &self.cache;
        let r = &self.stats;
        let n = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = format!(
            "cache_memory_bytes {}\ncache_memory_capacity_bytes {}\ncache_disk_bytes {}\ncache_disk_capacity_bytes {}\ncache_fills_in_flight {}\n\
             origin_retries {}\norigin_retries_over_budget {}\norigin_breaker_opened {}\norigin_breaker_half_opened {}\n\
             origin_breaker_closed {}\norigin_all_ejected {}\norigin_resumes {}\ncache_stale_served {}\n",
            c.memory_weight(),
            c.memory_capacity(),
            c.disk_used(),
            c.disk_capacity(),
            c.flights.len(),
            n(&r.retries),
            n(&r.retries_over_budget),
            n(&r.breaker_opened),
            n(&r.breaker_half_opened),
            n(&r.breaker_closed),
            n(&r.all_ejected),
            n(&r.resumes),
            n(&r.stale_served),
        );
        out.push_str(&format!(
            "cache_disk_write_errors {}\ncache_disk_writes_skipped {}\ncache_fill_slots_free {}\ncache_tasks_running {}\n",
            c.disk_write_errors(),
            c.disk_writes_skipped(),
            c.free_fill_slots(),
            c.running_tasks(),
        ));
        out.push_str(&format!(
            "origin_ejections_capped {}\norigin_gateway_uncharged {}\n",
            n(&r.ejections_capped),
            n(&r.gateway_uncharged),
        ));
        for class in crate::origin::outcome::FailureClass::ALL {
            out.push_str(&format!(
                "origin_failures_{} {}\n",
                class.as_str(),
                r.failures_of(class)
            ));
        }
        for (name, t) in [
            ("client", &self.connections),
            ("admin", &self.admin_connections),
        ] {
            let Some(t) = t else { continue };
            let st = &t.stats;
            out.push_str(&format!(
                "{name}_connections_open {}\n{name}_connections_max {}\n{name}_connections_accepted {}\n{name}_connections_reclaimed {}\n\
                 {name}_connections_refused {}\n{name}_keepalive_closed {}\n{name}_header_timeouts {}\n{name}_send_timeouts {}\n\
                 {name}_oversize_headers_rejected {}\n",
                t.open(),
                t.max(),
                n(&st.accepted),
                n(&st.reclaimed),
                n(&st.refused),
                n(&st.keepalive_closed),
                n(&st.header_timeouts),
                n(&st.send_timeouts),
                n(&st.oversize_rejected),
            ));
        }
        if let Some(d) = &self.access_log_dropped {
            out.push_str(&format!("access_log_dropped {}\n", n(d)));
        }
        let shaping_on = self.current.load().config.shaping.is_some();
        if let Some(sh) = self.shaping.as_ref().filter(|_| shaping_on) {
            out.push_str(&format!(
                "shaping_bytes {}\nshaping_delayed_us {}\nshaping_active_clients {}\nshaping_refused_downloads {}\nshaping_refused_connections {}\n",
                n(&sh.shaped_bytes),
                n(&sh.delayed_us),
                n(&sh.active_clients),
                n(&sh.refused_downloads),
                n(&sh.refused_connections),
            ));
        }
        out
    }
}

pub struct AdminApp {
    pub cache: Arc<ChunkCache>,
    pub stats: Arc<ResilienceStats>,
    /// Shaping counters (shown while `shaping` is configured).
    pub shaping: Option<Arc<crate::shaping::ShapingStats>>,
    /// The proxy listeners' connection table.
    pub connections: Option<Arc<ConnTable>>,
    /// The admin listener's own connection table.
    pub admin_connections: Option<Arc<ConnTable>>,
    /// Access-log lines dropped because the writer could not keep up.
    pub access_log_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The configuration in force: `admin.token` is read from it at each call, so a reload
    /// changes it.
    pub current: Current,
    /// Where `POST /reload` asks; `None`: not available.
    pub reload: Option<ReloadHandle>,
}

impl AdminApp {
    /// A mutating call is allowed only as a `POST` with `Authorization: Bearer <admin.token>`:
    /// `Err` is the answer otherwise (405, 401 without or with a wrong token, 403 when no token
    /// is configured).
    // The `Err` is the admin answer itself, built once per refused call: boxing it buys nothing.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, session: &ServerSession) -> Result<(), Response<Vec<u8>>> {
        let req = session.req_header();
        if req.method != http::Method::POST {
            let mut r = text(405, "use POST\n");
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Err(r);
        }
        let current = self.current.load();
        let Some(token) = current.config.admin_token.as_deref() else {
            return Err(text(
                403,
                "mutating admin calls are off: set admin.token in the config\n",
            ));
        };
        let given = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            _ => {
                let mut r = text(401, "admin.token required: Authorization: Bearer <token>\n");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"edgeslice admin\""),
                );
                Err(r)
            }
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` field (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without stopping at the first difference, so response time says nothing about how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: u16, body: &str) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body.as_bytes().to_vec())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => text(200, "ok\n"),
            "/stats" => text(200, &self.stats()),
            "/reload" => {
                if let Err(refused) = self.authorize(session) {
                    return refused;
                }
                match &self.reload {
                    Some(r) => match r.reload().await {
                        Ok(done) => text(200, &done.answer()),
                        Err(e) => text(e.status(), &e.answer()),
                    },
                    None => text(503, "reload is not available\n"),
                }
            }
            _ => text(404, "not found\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret-token", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret-token", b"s3cret-tokem"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret-token"));
    }
}
