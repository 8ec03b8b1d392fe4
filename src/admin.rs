//! The admin endpoint (`admin.listen`): `GET /healthz` answers `ok` while the process serves;
//! `GET /stats` reports cache occupancy.
//! It must stay cheap and never touch the data path's locks.

use crate::cache::store::ChunkCache;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use std::sync::Arc;

impl AdminApp {
    /// Cache occupancy, one `name value` per line.
    fn stats(&self) -> String {
        let c = &self.cache;
        format!(
            "cache_memory_bytes {}\ncache_memory_capacity_bytes {}\ncache_disk_bytes {}\ncache_disk_capacity_bytes {}\ncache_fills_in_flight {}\n",
            c.memory_weight(),
            c.memory_capacity(),
            c.disk_used(),
            c.disk_capacity(),
            c.flights.len(),
        )
    }
}

pub struct AdminApp {
    pub cache: Arc<ChunkCache>,
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
            _ => text(404, "not found\n"),
        }
    }
}
