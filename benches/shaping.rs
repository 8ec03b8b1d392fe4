//! The shaper's cost per body piece, next to an unshaped run.
//!
//! - `shaping/unshaped`: what the writer does per 64 KiB piece without shaping (split into
//!   16 KiB slices, no copy).
//! - `shaping/paced`: the same with `Download::pace` on every slice (one client, its own and
//!   its client's pacer), at a rate so high that no wait is ever due: the arithmetic and the
//!   client lock only.
//! - `shaping/paced_total_rate`: the same under a node-wide `total_rate` with 64 active
//!   clients, so the periodic rebalance (water-filling) is included in the cost.
//!
//! Short runs (20 samples, 2 s); `cargo test --bench shaping` runs each routine once.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use edgeslice::config::{ShapingClass, ShapingSettings};
use edgeslice::shaping::identity::{ClientKey, KeySource};
use edgeslice::shaping::{Download, Shaper, ShapingStats, MAX_PIECE};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

const PIECE: usize = 64 * 1024;

fn shaper(total_rate: u64) -> (Shaper, Arc<ShapingClass>) {
    let class = Arc::new(ShapingClass {
        name: Arc::from("bench"),
        rate: 1 << 50,
        burst: 1 << 40,
        rate_after: 0,
        weight: 1,
        max_downloads: 0,
        max_connections: 0,
    });
    let settings = ShapingSettings {
        client_key: KeySource::RemoteAddr,
        ipv6_prefix: 64,
        total_rate,
        max_clients: 10_000,
        classes: BTreeMap::new(),
    };
    (
        Shaper::new(Arc::new(settings), Arc::new(ShapingStats::default())),
        class,
    )
}

fn client(n: u32) -> ClientKey {
    ClientKey::Ip(IpAddr::from(n.to_be_bytes()))
}

/// What the writer does for one shaped piece: split it into slices and pace each.
fn pace_piece(d: &mut Download, piece: &Bytes) -> Duration {
    let mut p = piece.clone();
    let mut wait = Duration::ZERO;
    while !p.is_empty() {
        let part = p.split_to(p.len().min(MAX_PIECE));
        wait += d.pace(part.len());
        black_box(part);
    }
    wait
}

fn bench_pace(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let piece = Bytes::from(vec![7u8; PIECE]);
    let mut g = c.benchmark_group("shaping");
    g.throughput(Throughput::Bytes(PIECE as u64));

    g.bench_function("unshaped", |b| {
        b.iter(|| {
            let mut p = piece.clone();
            let mut n = 0;
            while !p.is_empty() {
                let part = p.split_to(p.len().min(MAX_PIECE));
                n += black_box(part).len();
            }
            n
        })
    });

    let (s, class) = shaper(0);
    let mut d = s.admit(client(1), &class, None).expect("admitted");
    g.bench_function("paced", |b| {
        b.iter(|| assert!(pace_piece(&mut d, &piece).is_zero()))
    });

    let (s, class) = shaper(1 << 50);
    let _others: Vec<_> = (2..66)
        .map(|n| s.admit(client(n), &class, None).expect("admitted"))
        .collect();
    let mut d = s.admit(client(1), &class, None).expect("admitted");
    g.bench_function("paced_total_rate", |b| {
        b.iter(|| black_box(pace_piece(&mut d, &piece)))
    });
    g.finish();
}

criterion_group! {
    name = shaping;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bench_pace
}
criterion_main!(shaping);
