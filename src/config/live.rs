//! What a reload (SIGHUP, `POST /reload`) may change in a running process, and what it may not.
//!
//! Live: routes, upstreams (servers, balance, timeouts, `resolve_interval`, health checks,
//! breakers, retries; a changed group gets a new pool, whose server names start from what the
//! old pool's resolved to),
//! shaping classes and client identity, the cache's per-request policy ([`CachePolicy`]:
//! `default_ttl`, `stale_if_error`, `heuristic_fraction`, `heuristic_max`, `max_ranges`),
//! `admin.token` and `cluster.cdn_id` (read per request), and `cluster`'s peer keys (the ring,
//! the peer group and the routes' fills are built with each snapshot: a peer list that
//! changes moves only the shards of the peers that came or went).
//!
//! Fixed for the life of the process (bound sockets, sized tables, Pingora's server
//! configuration, the cache tiers): `listen`, `admin.listen`, every `server.*` key, `cache.chunk_size`
//! (it names the stored chunks), `cache.max_object_size` and `cache.max_concurrent_fills` (the
//! cache holds them), `cache.memory.capacity`, `cache.response_budget`, `cache.metadata_capacity`, `cache.disk.*`, `shaping.max_clients`. A reload names those that changed and keeps them as
//! they are; a graceful upgrade (`-u`, then SIGQUIT to the old process) applies them.
//!
//! [`CachePolicy`]: super::CachePolicy

use super::shaping::DEFAULT_MAX_CLIENTS;
use super::{Config, ShapingSettings};
use std::sync::Arc;

/// `new` as it can be put in force over `old`, and the keys that changed but cannot change live
/// (`server.*` first, then in the order of the sections below it). Those keys keep `old`'s values in the returned config,
/// so it says what really runs.
pub fn apply(old: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut fixed = Vec::new();
    let mut differ = |changed: bool, key: &'static str| {
        if changed {
            fixed.push(key);
        }
    };
    let (o, n) = (&old.server, &new.server);
    differ(o.threads != n.threads, "server.threads");
    differ(o.pid_file != n.pid_file, "server.pid_file");
    differ(o.upgrade_sock != n.upgrade_sock, "server.upgrade_sock");
    differ(o.error_log != n.error_log, "server.error_log");
    differ(o.user != n.user, "server.user");
    differ(o.group != n.group, "server.group");
    differ(o.grace_period != n.grace_period, "server.grace_period");
    differ(o.drain_delay != n.drain_delay, "server.drain_delay");
    differ(
        o.graceful_shutdown_timeout != n.graceful_shutdown_timeout,
        "server.graceful_shutdown_timeout",
    );
    differ(
        o.upstream_keepalive_pool_size != n.upstream_keepalive_pool_size,
        "server.upstream_keepalive_pool_size",
    );
    differ(o.access_log != n.access_log, "server.access_log");
    differ(
        o.access_log_format != n.access_log_format,
        "server.access_log_format",
    );
    differ(
        o.access_log_path != n.access_log_path,
        "server.access_log_path",
    );
    let (oc, nc) = (&o.connections, &n.connections);
    differ(
        oc.keepalive_timeout != nc.keepalive_timeout,
        "server.keepalive_timeout",
    );
    differ(
        oc.header_timeout != nc.header_timeout,
        "server.header_timeout",
    );
    differ(oc.body_timeout != nc.body_timeout, "server.body_timeout");
    differ(oc.body_min_rate != nc.body_min_rate, "server.body_min_rate");
    differ(oc.send_timeout != nc.send_timeout, "server.send_timeout");
    differ(
        oc.max_connections != nc.max_connections,
        "server.max_connections",
    );
    differ(
        oc.max_header_size != nc.max_header_size,
        "server.max_header_size",
    );
    differ(oc.max_uri_size != nc.max_uri_size, "server.max_uri_size");
    differ(
        oc.http2_max_streams != nc.http2_max_streams,
        "server.http2_max_streams",
    );
    differ(old.listen != new.listen, "listen");
    differ(old.admin_listen != new.admin_listen, "admin.listen");
    let (oc, nc) = (&old.cache, &new.cache);
    differ(oc.chunk_size != nc.chunk_size, "cache.chunk_size");
    differ(
        oc.max_object_size != nc.max_object_size,
        "cache.max_object_size",
    );
    differ(
        oc.max_concurrent_fills != nc.max_concurrent_fills,
        "cache.max_concurrent_fills",
    );
    differ(
        oc.memory_capacity != nc.memory_capacity,
        "cache.memory.capacity",
    );
    differ(
        oc.response_budget != nc.response_budget,
        "cache.response_budget",
    );
    differ(
        oc.metadata_capacity != nc.metadata_capacity,
        "cache.metadata_capacity",
    );
    match (&oc.disk, &nc.disk) {
        (Some(a), Some(b)) => {
            differ(a.path != b.path, "cache.disk.path");
            differ(a.capacity != b.capacity, "cache.disk.capacity");
            differ(
                a.index_capacity != b.index_capacity,
                "cache.disk.index_capacity",
            );
        }
        (None, None) => {}
        _ => differ(true, "cache.disk"),
    }
    // The shaper's client table is sized once; without a `shaping` section it has the default.
    let max_clients = |s: &Option<Arc<ShapingSettings>>| {
        s.as_ref().map_or(DEFAULT_MAX_CLIENTS, |s| s.max_clients)
    };
    let running_max_clients = max_clients(&old.shaping);
    differ(
        running_max_clients != max_clients(&new.shaping),
        "shaping.max_clients",
    );
    new.server = old.server.clone();
    new.listen = old.listen.clone();
    new.admin_listen = old.admin_listen;
    new.cache.chunk_size = old.cache.chunk_size;
    new.cache.max_object_size = old.cache.max_object_size;
    new.cache.max_concurrent_fills = old.cache.max_concurrent_fills;
    new.cache.memory_capacity = old.cache.memory_capacity;
    new.cache.response_budget = old.cache.response_budget;
    new.cache.disk = old.cache.disk.clone();
    if let Some(s) = new
        .shaping
        .as_mut()
        .filter(|s| s.max_clients != running_max_clients)
    {
        let mut kept = (**s).clone();
        kept.max_clients = running_max_clients;
        *s = Arc::new(kept);
    }
    (new, fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BASE: &str = "\
server:
  threads: 2
  header_timeout: 10s
listen:
  - 127.0.0.1:8080
admin:
  listen: 127.0.0.1:9180
  token: first-token
cache:
  chunk_size: 1MiB
  default_ttl: 60s
  memory:
    capacity: 256MiB
upstreams:
  origin:
    servers: [\"10.0.0.1:80\"]
routes:
  - path_prefix: /a/
    upstream: origin
";

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).expect("valid config")
    }

    #[test]
    fn the_same_file_changes_nothing_fixed() {
        let (applied, fixed) = apply(&config(BASE), config(BASE));
        assert!(fixed.is_empty(), "{fixed:?}");
        assert_eq!(applied.routes.len(), 1);
    }

    fn edited(edits: &[(&str, &str)]) -> Config {
        let mut y = BASE.to_string();
        for (from, to) in edits {
            assert!(y.contains(from), "{from:?} not in the config");
            y = y.replacen(from, to, 1);
        }
        config(&y)
    }

    #[test]
    fn live_keys_are_taken_and_not_named() {
        let old = config(BASE);
        let new = edited(&[
            ("  default_ttl: 60s", "  default_ttl: 5s\n  max_ranges: 3"),
            ("first-token", "second-token"),
            ("\"10.0.0.1:80\"", "\"10.0.0.2:80\""),
            (
                "    upstream: origin\n",
                "    upstream: origin\n  - path_prefix: /b/\n    upstream: origin\n    cache: false\n",
            ),
        ]);
        let (applied, fixed) = apply(&old, new);
        assert!(fixed.is_empty(), "{fixed:?}");
        assert_eq!(applied.routes.len(), 2);
        assert!(applied.route("x", "/b/1").is_some_and(|r| !r.cache));
        assert_eq!(applied.cache.default_ttl, Some(Duration::from_secs(5)));
        assert_eq!(applied.cache.max_ranges, 3);
        assert_eq!(applied.admin_token.as_deref(), Some("second-token"));
        assert_eq!(
            applied.upstreams["origin"].servers[0].target,
            crate::config::ServerTarget::Addr("10.0.0.2:80".parse().unwrap())
        );
    }

    #[test]
    fn http2_max_streams_and_listen_entries_are_fixed() {
        let old = config(BASE);
        let new = edited(&[
            (
                "  header_timeout: 10s",
                "  header_timeout: 10s\n  http2_max_streams: 64",
            ),
            (
                "  - 127.0.0.1:8080",
                "  - address: 127.0.0.1:8080\n    h2c: true",
            ),
        ]);
        let (applied, fixed) = apply(&old, new);
        assert_eq!(fixed, ["server.http2_max_streams", "listen"]);
        assert_eq!(applied.server.connections.http2_max_streams, 128);
        assert!(!applied.listen[0].h2c);
    }

    #[test]
    fn fixed_keys_are_named_and_kept() {
        let old = config(BASE);
        let new = edited(&[
            ("threads: 2", "threads: 4"),
            ("header_timeout: 10s", "header_timeout: 3s"),
            ("127.0.0.1:8080", "127.0.0.1:8081"),
            ("127.0.0.1:9180", "127.0.0.1:9181"),
            ("chunk_size: 1MiB", "chunk_size: 2MiB"),
            ("capacity: 256MiB", "capacity: 128MiB"),
            ("default_ttl: 60s", "default_ttl: 30s"),
        ]);
        let (applied, fixed) = apply(&old, new);
        assert_eq!(
            fixed,
            [
                "server.threads",
                "server.header_timeout",
                "listen",
                "admin.listen",
                "cache.chunk_size",
                "cache.memory.capacity",
                // Its default is a quarter of the memory tier: it changed with it.
                "cache.metadata_capacity",
            ]
        );
        // Kept as they run...
        assert_eq!(applied.server.threads, 2);
        assert_eq!(
            applied.server.connections.header_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(applied.listen, old.listen);
        assert_eq!(applied.admin_listen, old.admin_listen);
        assert_eq!(applied.cache.chunk_size, 1 << 20);
        assert_eq!(applied.cache.memory_capacity, 256 << 20);
        // ...while the live key beside them is taken.
        assert_eq!(applied.cache.default_ttl, Some(Duration::from_secs(30)));
    }

    #[test]
    fn cdn_id_and_peers_are_live() {
        let old = config(BASE);
        let new = config(&format!("{BASE}cluster:\n  cdn_id: shield\n"));
        let (applied, fixed) = apply(&old, new);
        assert!(fixed.is_empty(), "{fixed:?}");
        assert_eq!(applied.cluster.cdn_id, "shield");

        let peers = |names: &str| {
            config(&format!(
                "{BASE}cluster:\n  self: a:8080\n  peers: [{names}]\n  cdn_id: edge\n"
            ))
        };
        let (applied, fixed) = apply(&old, peers("a:8080"));
        assert!(fixed.is_empty(), "{fixed:?}");
        assert!(applied.cluster.peers.is_some());
        assert_eq!(applied.cluster.cdn_id, "edge");
        let (applied, fixed) = apply(&peers("a:8080"), peers("a:8080, b:8080"));
        assert!(fixed.is_empty(), "{fixed:?}");
        assert_eq!(
            applied.cluster.peers.expect("new").peers,
            ["a:8080", "b:8080"]
        );
    }

    #[test]
    fn disk_tier_and_shaper_table_are_fixed() {
        let old = config(BASE);
        let new = edited(&[(
            "  memory:\n",
            "  disk:\n    path: /tmp/x\n    capacity: 1GiB\n  memory:\n",
        )]);
        let (applied, fixed) = apply(&old, new);
        assert_eq!(fixed, ["cache.disk"]);
        assert!(applied.cache.disk.is_none());

        let with_shaping = |max_clients: &str| {
            config(&format!(
                "{BASE}shaping:\n  {max_clients}classes:\n    std:\n      rate: 1MiB/s\n"
            ))
        };
        // A shaping section that leaves the table size alone is live.
        let (_, fixed) = apply(&old, with_shaping(""));
        assert!(fixed.is_empty(), "{fixed:?}");
        let (applied, fixed) = apply(&old, with_shaping("max_clients: 10\n  "));
        assert_eq!(fixed, ["shaping.max_clients"]);
        let shaping = applied.shaping.expect("shaping taken");
        assert_eq!(shaping.max_clients, DEFAULT_MAX_CLIENTS);
        assert!(shaping.classes.contains_key("std"));
    }
}
