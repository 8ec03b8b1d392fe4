//! edgeslice: an edge caching reverse proxy on Pingora.
//!
//! The data path, top to bottom:
//!
//! ```text
//! client ─► listener ─► conn (cap, timeouts, header limits) ─► pingora session ─► route (host, path prefix) ─► request id, forwarded headers
//!                                    │
//!             cacheable GET/HEAD ────┤──── everything else: pass-through proxy (pingora upstream path)
//!                                    ▼
//!                      range plan: Range header ─► byte ranges ─► chunk spans
//!                                    ▼
//!                 for each chunk: memory (moka) ─► disk ─► origin fetch (single-flight per chunk)
//!                                    ▼
//!               assemble: 200 / 206 / multipart, streamed as chunks arrive
//! ```
//!
//! Each request reads the configuration through the snapshot in force when it started
//! ([`runtime`]); SIGHUP and `POST /reload` swap in the next one ([`reload`]).
//!
//! The binary (`src/main.rs`) only parses the command line, loads the config and starts the
//! services built here; tests and benches use this library directly.

// A panic on a request takes the node down: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod admin;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod logging;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod range;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod shaping;
pub mod tls;
