//! Sharding among peers (`cluster.peers`), against the real binary and the in-process origin
//! (for faults a real server cannot make): each shard is filled from the origin once by its
//! owner however many nodes serve it; a peer that is dead or breaks mid-body hands its shards
//! on with every byte exact and nothing fetched twice; a peer's failures are charged to it
//! (`upstream="cluster.peers"`), never to the origin; the peer mark is believed only from a
//! peer's address; the peer hop adds nothing to `CDN-Loop`; a parent tier that fails leaves
//! the route's upstream to answer. The three-process test with nginx, a shield and 200
//! clients is tests/cluster.rs.

mod common;

use common::origin::{content, Fault, Origin};
use common::proxy::{free_port, Proxy};
use std::net::SocketAddr;
use std::time::Duration;

const SIZE: u64 = 2 << 20;

fn node_config(origin: SocketAddr, me: SocketAddr, peers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "cache:\n  chunk_size: 64KiB\nupstreams:\n  origin:\n    servers: [\"{origin}\"]\n    connect_timeout: 500ms\n    read_timeout: 2s\nroutes:\n  - path_prefix: /\n    upstream: origin\ncluster:\n  self: \"{me}\"\n  peers: [{}]\n  shard_size: 256KiB\n  peer_timeout: 1s\n  cdn_id: edge\n{extra}",
        list.join(", ")
    )
}

fn addrs(n: usize) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    while out.len() < n {
        let a: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `n` nodes on free ports of 127.0.0.1, each started with `config(itself, every node)`.
fn cluster(
    n: usize,
    config: impl Fn(SocketAddr, &[SocketAddr]) -> String,
) -> (Vec<SocketAddr>, Vec<Proxy>) {
    let peers = addrs(n);
    let nodes = peers
        .iter()
        .map(|me| Proxy::start_at(*me, &config(*me, &peers)))
        .collect();
    (peers, nodes)
}

async fn get(node: &Proxy, path: &str) -> (u16, Vec<u8>, String) {
    get_with(node, path, &[]).await
}

/// [`get`] with request fields.
async fn get_with(node: &Proxy, path: &str, fields: &[(&str, &str)]) -> (u16, Vec<u8>, String) {
    let req = fields
        .iter()
        .fold(common::client().get(node.url(path)), |r, (n, v)| {
            r.header(*n, *v)
        });
    let resp = tokio::time::timeout(Duration::from_secs(20), req.send())
        .await
        .expect("answered within 20 s")
        .expect("request");
    let status = resp.status().as_u16();
    let cs = common::header_text(resp.headers(), "cache-status");
    let body = resp.bytes().await.expect("body").to_vec();
    (status, body, cs)
}

async fn fetch_exact(node: &Proxy, path: &str) {
    fetch_exact_with(node, path, &[]).await
}

/// [`fetch_exact`] with request fields.
async fn fetch_exact_with(node: &Proxy, path: &str, fields: &[(&str, &str)]) {
    let (status, body, _) = get_with(node, path, fields).await;
    assert_eq!(status, 200, "{path} through {}", node.addr);
    assert!(
        body == content(path, 0, 0..SIZE),
        "{path} through {}: {} bytes, not the object's",
        node.addr,
        body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_comes_from_the_origin_once_however_many_nodes_serve_it() {
    let origin = Origin::start().await;
    let (_, nodes) = cluster(3, |me, peers| node_config(origin.addr(), me, peers, ""));
    let path = "/obj/2097152/shared";
    for node in &nodes {
        fetch_exact(node, path).await;
    }
    // Every byte once: the shards' owners filled them, the others asked the owners.
    assert_eq!(
        origin.body_bytes_sent(),
        SIZE,
        "{:?}",
        common::reply::describe(&origin.log())
    );
    let mut asked_peers = 0.0;
    for node in &nodes {
        let m = node.metrics().await;
        asked_peers += metric(&m, "edgeslice_fill_requests_total", &["to=\"peer\""]);
        assert_eq!(
            metric(&m, "edgeslice_cluster_peers", &["state=\"up\""]),
            3.0,
            "{m}"
        );
        assert_eq!(
            metric(&m, "edgeslice_cluster_peers", &["state=\"down\""]),
            0.0
        );
        // A peer's fill is counted as one.
        assert!(metric(&m, "edgeslice_fill_bytes_total", &[]) >= 0.0);
    }
    assert!(
        asked_peers >= 8.0,
        "the nodes asked their peers {asked_peers} times"
    );
    // The peer hop adds nothing to CDN-Loop: the origin sees the cluster's id once.
    for r in origin.log() {
        assert_eq!(r.header_all("cdn-loop"), ["edge"], "{:?}", r.headers);
        assert!(r.header("x-edgeslice-peer").is_none(), "{:?}", r.headers);
    }
    // A second round is served by the nodes alone.
    for node in nodes.iter().rev() {
        fetch_exact(node, path).await;
    }
    assert_eq!(origin.body_bytes_sent(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peers_shards_move_to_the_next_node_and_are_charged_to_it() {
    let origin = Origin::start().await;
    let (peers, mut nodes) = cluster(3, |me, peers| node_config(origin.addr(), me, peers, ""));
    nodes[2].kill();
    let mut objects = 0;
    let mut down = 0.0;
    for i in 0..12 {
        let path = format!("/obj/2097152/moved-{i}");
        let before = origin.body_bytes_sent();
        fetch_exact(&nodes[0], &path).await;
        fetch_exact(&nodes[1], &path).await;
        objects += 1;
        // The dead node's shards went to one survivor: still each byte once.
        assert_eq!(origin.body_bytes_sent() - before, SIZE, "{path}");
        down = metric(
            &nodes[0].metrics().await,
            "edgeslice_cluster_peers",
            &["state=\"down\""],
        );
        if down == 1.0 {
            break;
        }
    }
    assert_eq!(down, 1.0, "the dead peer is down after {objects} objects");
    let m = nodes[0].metrics().await;
    // Its failures are the peer group's; the origin's server has none.
    let peer_failures = metric(
        &m,
        "edgeslice_origin_requests_total",
        &[
            "upstream=\"cluster.peers\"",
            &format!("server=\"{}\"", peers[2]),
        ],
    );
    assert!(peer_failures >= 1.0, "{m}");
    for line in m.lines().filter(|l| {
        l.starts_with("edgeslice_origin_requests_total") && l.contains("upstream=\"origin\"")
    }) {
        assert!(
            line.contains("outcome=\"2xx\"") || line.ends_with(" 0"),
            "an origin failure was counted: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_breaks_mid_body_is_resumed_from_the_next_byte() {
    let origin = Origin::start().await;
    // The "peer" is a second in-process origin (same bytes and validators) that resets every
    // answer after 100 000 body bytes.
    let broken = Origin::start().await;
    broken.set_fault(Fault::ResetMidBody { after: 100_000 });
    let me: SocketAddr = addrs(1)[0];
    let node = Proxy::start_at(
        me,
        &node_config(origin.addr(), me, &[me, broken.addr()], ""),
    );
    let path = "/obj/2097152/broken";
    fetch_exact(&node, path).await;
    // What the broken peer delivered was used, and the origin sent the rest, each byte once.
    let from_peer = metric(
        &node.metrics().await,
        "edgeslice_fill_bytes_total",
        &["to=\"peer\""],
    );
    let from_origin = origin.body_bytes_sent();
    assert!(from_peer > 0.0, "the peer was asked");
    assert!(
        from_origin <= SIZE && from_origin as f64 + from_peer >= SIZE as f64,
        "origin {from_origin} + peer {from_peer} for an object of {SIZE}"
    );
    let m = node.metrics().await;
    assert!(
        metric(
            &m,
            "edgeslice_origin_requests_total",
            &["upstream=\"cluster.peers\"", "outcome=\"2xx\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "edgeslice_origin_resumes_total", &[]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_mark_is_believed_only_from_a_peers_address() {
    let origin = Origin::start().await;
    // The other peer is the in-process origin on 127.0.0.2: it owns about half the shards,
    // and records what it is asked.
    let other = Origin::start_at("127.0.0.2:0".parse().unwrap())
        .await
        .expect("an origin on 127.0.0.2");
    let me: SocketAddr = addrs(1)[0];
    let node = Proxy::start_at(me, &node_config(origin.addr(), me, &[me, other.addr()], ""));
    // A client on 127.0.0.1 (not a peer's address) forging the mark: its request is a
    // client's, asked of the shards' owners as any other.
    let path = "/obj/2097152/forged";
    fetch_exact_with(&node, path, &[("x-edgeslice-peer", "127.0.0.9:1")]).await;
    let asked: Vec<_> = other.log().into_iter().filter(|r| r.path == path).collect();
    assert!(!asked.is_empty(), "the owner peer was not asked");
    // Asked as a peer, by this node's name; and the mark never reaches the origin.
    for r in &asked {
        assert_eq!(r.header("x-edgeslice-peer"), Some(me.to_string().as_str()));
    }
    for r in origin.log() {
        assert!(r.header("x-edgeslice-peer").is_none(), "{:?}", r.headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_a_peer_is_filled_where_it_lands() {
    let origin = Origin::start().await;
    // This node's only peer is 127.0.0.1 on another port, so the test client (127.0.0.1)
    // is at a peer's address: its marked request is a peer's.
    let peers = addrs(2);
    let node = Proxy::start_at(peers[0], &node_config(origin.addr(), peers[0], &peers, ""));
    let path = "/obj/2097152/marked";
    let asker = peers[1].to_string();
    fetch_exact_with(
        &node,
        path,
        &[("x-edgeslice-peer", &asker), ("cdn-loop", "edge")],
    )
    .await;
    // Never asked of the (absent) other peer: every shard from the origin, the list as it came.
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, "edgeslice_fill_requests_total", &["to=\"peer\""]),
        0.0
    );
    assert_eq!(origin.body_bytes_sent(), SIZE);
    for r in origin.log() {
        assert_eq!(r.header_all("cdn-loop"), ["edge"], "{:?}", r.headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_tier_answers_misses_and_the_upstream_takes_over_when_it_fails() {
    let origin = Origin::start().await;
    let shield = Proxy::start(&format!(
        "cache:\n  chunk_size: 64KiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\nroutes:\n  - path_prefix: /\n    upstream: origin\ncluster:\n  cdn_id: shield\n",
        origin.addr()
    ));
    let edge = Proxy::start(&format!(
        "cache:\n  chunk_size: 64KiB\nupstreams:\n  origin:\n    servers: [\"{}\"]\n  shield:\n    servers: [\"{}\"]\n    balance: consistent_hash\n    connect_timeout: 300ms\n    retry: {{attempts: 1}}\nroutes:\n  - path_prefix: /\n    upstream: origin\n    parent: shield\ncluster:\n  cdn_id: edge\n",
        origin.addr(),
        shield.addr
    ));
    let path = "/obj/2097152/tiered";
    let (status, body, cache_status) = get(&edge, path).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..SIZE));
    // Each tier's entry, the shield's first (RFC 9211).
    assert!(
        cache_status.starts_with("shield; fwd=miss") && cache_status.contains(", edge; fwd="),
        "{cache_status}"
    );
    // Both tiers' ids on the origin's requests, in path order.
    for r in origin.log() {
        assert_eq!(
            r.header_all("cdn-loop"),
            ["edge, shield"],
            "{:?}",
            r.headers
        );
    }
    let m = edge.metrics().await;
    assert!(metric(&m, "edgeslice_fill_requests_total", &["to=\"parent\""]) >= 1.0);
    assert_eq!(
        metric(&m, "edgeslice_fill_requests_total", &["to=\"origin\""]),
        0.0
    );
    assert_eq!(
        metric(&m, "edgeslice_fill_bytes_total", &["to=\"parent\""]),
        SIZE as f64
    );
    // The shield gone: the edge goes to the origin itself.
    drop(shield);
    let path = "/obj/2097152/direct";
    let (status, body, _) = get(&edge, path).await;
    assert_eq!(status, 200);
    assert!(body == content(path, 0, 0..SIZE));
    let m = edge.metrics().await;
    assert!(metric(&m, "edgeslice_fill_requests_total", &["to=\"origin\""]) >= 1.0);
    assert_eq!(
        metric(&m, "edgeslice_fill_bytes_total", &["to=\"origin\""]),
        SIZE as f64
    );
}

fn disk(extra_keep: &str) -> String {
    format!("  keep_copies: {extra_keep}\n")
}

/// `node_config` with a disk tier in the node's directory.
fn disk_node_config(
    origin: SocketAddr,
    me: SocketAddr,
    peers: &[SocketAddr],
    keep: &str,
) -> String {
    node_config(origin, me, peers, &disk(keep)).replace(
        "cache:\n  chunk_size: 64KiB\n",
        "cache:\n  chunk_size: 64KiB\n  disk:\n    path: {DIR}/cache\n    capacity: 64MiB\n",
    )
}

fn entries(node: &Proxy) -> usize {
    common::cache_files(&node.dir.join("cache")).len()
}

async fn peer_requests(node: &Proxy) -> f64 {
    metric(
        &node.metrics().await,
        "edgeslice_fill_requests_total",
        &["to=\"peer\""],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_owners_keep_chunks_on_disk_and_a_restart_keeps_its_shards() {
    let origin = Origin::start().await;
    let (_, mut nodes) = cluster(3, |me, peers| {
        disk_node_config(origin.addr(), me, peers, "memory")
    });
    let path = "/obj/2097152/on-disk";
    for node in &nodes {
        fetch_exact(node, path).await;
    }
    // Each chunk on one disk (its owner's), plus each node's metadata entry: 32 chunks of
    // 64 KiB, not 3 × 32. Disk writes are in the background: wait for them.
    let chunks = (SIZE / (64 << 10)) as usize;
    let mut total = 0;
    for _ in 0..100 {
        total = nodes.iter().map(entries).sum::<usize>();
        if total >= chunks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        (chunks..=chunks + 3).contains(&total),
        "{total} disk entries for {chunks} chunks on 3 nodes"
    );
    // Non-owners keep their copies in memory: a second round asks no peer.
    let asked: f64 = {
        let mut n = 0.0;
        for node in &nodes {
            n += peer_requests(node).await;
        }
        n
    };
    for node in &nodes {
        fetch_exact(node, path).await;
    }
    let mut again = 0.0;
    for node in &nodes {
        again += peer_requests(node).await;
    }
    assert_eq!(again, asked, "a second round asked peers again");
    // A node restarted under the same name keeps its shards: served from its disk, its
    // peers' from theirs; the origin is not asked again.
    nodes[1].restart();
    fetch_exact(&nodes[1], path).await;
    fetch_exact(&nodes[0], path).await;
    assert_eq!(origin.body_bytes_sent(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_copies_none_keeps_nothing_of_a_peers_shards() {
    let origin = Origin::start().await;
    let (_, nodes) = cluster(2, |me, peers| {
        disk_node_config(origin.addr(), me, peers, "none")
    });
    let path = "/obj/2097152/not-kept";
    fetch_exact(&nodes[0], path).await;
    let first = peer_requests(&nodes[0]).await;
    assert!(first >= 1.0);
    // Asked again for every shard it does not own: nothing of them was kept.
    fetch_exact(&nodes[0], path).await;
    assert!(
        peer_requests(&nodes[0]).await >= 2.0 * first,
        "kept a peer's chunks"
    );
    assert_eq!(origin.body_bytes_sent(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_peer_list() {
    let origin = Origin::start().await;
    let other = Origin::start().await;
    let me: SocketAddr = addrs(1)[0];
    let node = Proxy::start_at(me, &node_config(origin.addr(), me, &[me], ""));
    fetch_exact(&node, "/obj/2097152/alone").await;
    assert_eq!(peer_requests(&node).await, 0.0);
    // Reloaded with a second peer (the in-process origin standing in for it): it is asked.
    let conf = node.dir.join("edgeslice.yaml");
    let text = std::fs::read_to_string(&conf).expect("config");
    let listed = format!("peers: [\"{me}\"]");
    assert!(text.contains(&listed), "{text}");
    std::fs::write(
        &conf,
        text.replace(&listed, &format!("peers: [\"{me}\", \"{}\"]", other.addr())),
    )
    .expect("write config");
    node.signal(libc::SIGHUP);
    let mut reloaded = false;
    for _ in 0..100 {
        let m = node.metrics().await;
        if metric(&m, "edgeslice_config_reloads_total", &["result=\"ok\""]) >= 1.0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "{}", node.log());
    fetch_exact(&node, "/obj/2097152/shared-now").await;
    assert!(peer_requests(&node).await >= 1.0);
    assert!(other
        .log()
        .iter()
        .any(|r| r.path == "/obj/2097152/shared-now"));
    assert_eq!(
        metric(
            &node.metrics().await,
            "edgeslice_cluster_peers",
            &["state=\"up\""]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_naming_the_cluster_in_cdn_loop_is_served_by_the_owners() {
    // A request that really passed this tier once (edge → shield → edge would be a loop, but
    // one pass is not) names the cluster's id: the node asks the owner with the id twice, and
    // the owner judges it as the node did, instead of a 508 that sends the shard to its origin.
    let origin = Origin::start().await;
    let (_, nodes) = cluster(2, |me, peers| node_config(origin.addr(), me, peers, ""));
    let path = "/obj/2097152/named";
    for node in &nodes {
        fetch_exact_with(node, path, &[("cdn-loop", "edge")]).await;
    }
    assert_eq!(origin.body_bytes_sent(), SIZE);
    for node in &nodes {
        let m = node.metrics().await;
        assert_eq!(
            metric(&m, "edgeslice_loops_detected_total", &[]),
            0.0,
            "{m}"
        );
    }
    // Twice from the client is a loop, answered at once by the node it reached.
    let (status, _, _) = get_with(&nodes[0], path, &[("cdn-loop", "edge, edge")]).await;
    assert_eq!(status, 508);
}
