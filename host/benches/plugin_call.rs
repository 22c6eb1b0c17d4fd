//! Cost of a plugin call: 100 B and 4 KiB messages, on a reused (warm)
//! instance and on a fresh instance per call, and per message in a batch.
//!
//! Run: `cargo bench -p sluice --bench plugin_call`

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice::plugins::{
    Message, PluginKind, PluginRuntime, PluginSpec, RouteRequest, SandboxConfig,
};

fn message(size: usize) -> Message {
    Message {
        topic: "orders.eu.created".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("trace-id".into(), "4bf92f3577b34da6".into()),
        ],
        payload: vec![b'x'; size],
        tenant: "acme".into(),
        client: "bench".into(),
        timestamp_ms: 1_700_000_000_000,
        redelivery_count: 0,
    }
}

fn load(
    rt: &PluginRuntime,
    name: &str,
    kind: PluginKind,
    config: &[(&str, &str)],
) -> sluice::plugins::Plugin {
    let wasm = sluice::bundled::wasm(name)
        .expect("bundled plugin")
        .to_vec();
    rt.load(PluginSpec {
        tenant: "acme".into(),
        name: name.into(),
        kind,
        wasm,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .expect("load plugin")
}

fn bench(c: &mut Criterion) {
    // The deadline is wall-clock: a generous one keeps a descheduled sample
    // from being killed; epoch interruption is still on, as in production.
    let sandbox = SandboxConfig {
        call_deadline: Duration::from_secs(1),
        ..SandboxConfig::default()
    };
    let warm_rt = PluginRuntime::new(sandbox.clone()).expect("runtime");
    // No warm instances kept: every call instantiates a new Store and runs init.
    let fresh_rt = PluginRuntime::new(SandboxConfig {
        warm_instances_per_plugin: 0,
        ..sandbox
    })
    .expect("runtime");
    let filter_cfg = [("drop", "level=debug"), ("require", "trace-id")];
    let warm = load(&warm_rt, "header-filter", PluginKind::Filter, &filter_cfg);
    let fresh = load(&fresh_rt, "header-filter", PluginKind::Filter, &filter_cfg);
    let router = load(
        &warm_rt,
        "topic-router",
        PluginKind::Router,
        &[("add.audit", "header:x-audit=1")],
    );

    let mut g = c.benchmark_group("filter");
    for size in [100usize, 4096] {
        let msg = message(size);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("reused", size), &msg, |b, m| {
            b.iter(|| warm.filter(m).expect("filter"))
        });
        g.bench_with_input(BenchmarkId::new("fresh", size), &msg, |b, m| {
            b.iter(|| fresh.filter(m).expect("filter"))
        });
        let batch: Vec<Message> = (0..64).map(|_| message(size)).collect();
        g.throughput(Throughput::Elements(batch.len() as u64));
        g.bench_with_input(BenchmarkId::new("batch64", size), &batch, |b, ms| {
            b.iter(|| warm.filter_batch(ms).expect("filter batch"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("route");
    let candidates = vec!["main".to_string(), "bulk".to_string()];
    for size in [100usize, 4096] {
        let msg = message(size);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("reused", size), &msg, |b, m| {
            b.iter(|| router.route(m, &candidates).expect("route"))
        });
        let reqs: Vec<RouteRequest> = (0..64)
            .map(|_| RouteRequest {
                msg: message(size),
                candidates: candidates.clone(),
            })
            .collect();
        g.throughput(Throughput::Elements(reqs.len() as u64));
        g.bench_with_input(BenchmarkId::new("batch64", size), &reqs, |b, r| {
            b.iter_batched(
                || r,
                |r| router.route_batch(r).expect("route batch"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
