//! Data-path benchmarks, in one process on loopback: a client, two weft nodes (one per side of
//! the tunnel) and an app server, all sharing the machine's cores. Each figure is taken three
//! ways: `direct` (client to app, no weft), `relay` (through weft's outbound listener to an
//! address outside the mesh: the plain TCP relay) and `hbone` (outbound → HBONE → inbound).
//!
//! - `throughput_256MiB/<via>/<n>`: 256 MiB sent to a sink over n parallel connections;
//!   criterion reports bytes per second.
//! - `latency_1KiB_echo/<via>`: one 1 KiB round trip on a warm connection; criterion reports the
//!   mean, and the p50 and p99 of every round trip measured are printed after the group.
//! - `new_connections/<kind>`: one new connection carrying a 64-byte request and its reply, 8 in
//!   flight; criterion reports connections per second. `hbone_pooled` rides the pooled tunnel
//!   connection; `hbone_fresh_mtls` does a TCP + TLS 1.3 mutual + HTTP/2 handshake each time.
//!
//! See BENCHMARKS.md for how to run it and what the figures mean.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

use support::{quantile, request_reply, run_concurrent, small_request, transfer, Lab, Via, Warm};

const TRANSFER: u64 = 256 * 1024 * 1024;
/// Connections in flight during the connection-rate benchmarks.
const CONCURRENCY: u64 = 8;

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| match Lab::start() {
        Ok(lab) => lab,
        Err(e) => panic!("starting the benchmark lab: {e:#}"),
    })
}

fn throughput(c: &mut Criterion) {
    let lab = lab();
    let mut g = c.benchmark_group("throughput_256MiB");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(TRANSFER));
    for via in Via::ALL {
        for conns in [1u64, 2, 8] {
            let target = lab.entry(via);
            g.bench_with_input(BenchmarkId::new(via.name(), conns), &conns, |b, &conns| {
                b.iter_custom(|iters| {
                    lab.rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            if let Err(e) = transfer(target, TRANSFER, conns).await {
                                panic!("{} transfer failed: {e:#}", via.name());
                            }
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    g.finish();
}

fn latency(c: &mut Criterion) {
    let lab = lab();
    let mut g = c.benchmark_group("latency_1KiB_echo");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut report = Vec::new();
    for via in Via::ALL {
        let mut warm = match lab.rt.block_on(Warm::connect(lab.entry(via))) {
            Ok(w) => w,
            Err(e) => panic!("{} echo connection: {e:#}", via.name()),
        };
        let mut samples: Vec<Duration> = Vec::with_capacity(1 << 17);
        g.bench_function(via.name(), |b| {
            b.iter_custom(|iters| {
                lab.rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        if let Err(e) = warm.round_trip().await {
                            panic!("{} round trip failed: {e}", via.name());
                        }
                        let d = t.elapsed();
                        total += d;
                        samples.push(d);
                    }
                    total
                })
            })
        });
        let n = samples.len();
        let p50 = quantile(&mut samples, 0.50);
        let p99 = quantile(&mut samples, 0.99);
        report.push((via, p50, p99, n));
    }
    g.finish();
    for (via, p50, p99, n) in report {
        println!(
            "latency_1KiB_echo/{}: p50 {:.1} µs, p99 {:.1} µs ({n} round trips, warm-up included)",
            via.name(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
        );
    }
}

fn connections(c: &mut Criterion) {
    let lab = lab();
    let mut g = c.benchmark_group("new_connections");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let request = small_request();
    for (name, via) in [
        ("direct", Via::Direct),
        ("relay", Via::Relay),
        ("hbone_pooled", Via::Hbone),
    ] {
        let target = lab.entry(via);
        let request = request.clone();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let request = request.clone();
                let op = move || {
                    let request = request.clone();
                    async move { request_reply(target, &request).await }
                };
                match lab.rt.block_on(run_concurrent(iters, CONCURRENCY, op)) {
                    Ok(d) => d,
                    Err(e) => panic!("{name}: {e:#}"),
                }
            })
        });
    }
    println!(
        "new_connections/hbone_pooled: node a held {} pooled tunnel connection(s) afterwards",
        lab.a.ctx.pool.connection_count()
    );

    let fresh = match lab.fresh_tunnel_client() {
        Ok(f) => Arc::new(f),
        Err(e) => panic!("fresh tunnel client: {e:#}"),
    };
    g.bench_function("hbone_fresh_mtls", |b| {
        b.iter_custom(|iters| {
            let (fresh, request) = (fresh.clone(), request.clone());
            let op = move || {
                let (fresh, request) = (fresh.clone(), request.clone());
                async move { fresh.request_reply(request).await }
            };
            match lab.rt.block_on(run_concurrent(iters, CONCURRENCY, op)) {
                Ok(d) => d,
                Err(e) => panic!("hbone_fresh_mtls: {e:#}"),
            }
        })
    });
    g.finish();
}

criterion_group!(dataplane, throughput, latency, connections);
criterion_main!(dataplane);
