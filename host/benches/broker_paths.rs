//! Hot-path pieces of the broker measured alone: matching a topic against
//! 10,000 bindings, and durable appends through the group commit (sled
//! batch + flush + fdatasync) at several batch sizes.
//!
//! Run: `cargo bench -p sluice --bench broker_paths`

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::broker::{BindingTrie, parse_pattern};
use sluice::store::{Append, MessageStore, Store, StoreConfig, StoredMessage};

fn bindings(c: &mut Criterion) {
    // 10,000 bindings of three shapes: literal, one-token and tail wildcards.
    let mut trie = BindingTrie::default();
    for i in 0..10_000 {
        let pattern = match i % 3 {
            0 => format!("orders.region{}.q{i}", i % 50),
            1 => format!("audit.*.q{i}"),
            _ => format!("logs.q{i}.>"),
        };
        trie.insert(&parse_pattern(&pattern).unwrap(), &format!("queue-{i}"));
    }
    assert_eq!(trie.len(), 10_000);
    let mut g = c.benchmark_group("bindings (10k)");
    g.throughput(Throughput::Elements(1));
    for (name, topic, hits) in [
        ("literal hit", "orders.region0.q3000", 1),
        ("wildcard hit", "audit.eu.q4", 1),
        ("tail hit", "logs.q5.a.b.c", 1),
        ("miss", "metrics.cpu.load", 0),
    ] {
        assert_eq!(trie.matches(topic).len(), hits, "{topic}");
        g.bench_function(name, |b| {
            b.iter(|| std::hint::black_box(trie.matches(topic)))
        });
    }
    g.finish();
}

fn store_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open store");
    let value = StoredMessage {
        topic: "orders.eu.created".into(),
        headers: vec![],
        payload: vec![b'x'; 100],
        publisher: "bench".into(),
        timestamp_ms: 1_700_000_000_000,
        expires_at_ms: 0,
    }
    .encode();
    let next = AtomicU64::new(0);
    let mut g = c.benchmark_group("store append (durable, 100 B)");
    g.sample_size(20);
    // `writers` appends of `per_append` messages submitted together: the
    // committer turns them into one sled batch and one fdatasync.
    for (writers, per_append) in [(1u64, 1u64), (1, 64), (16, 64), (4, 1024)] {
        g.throughput(Throughput::Elements(writers * per_append));
        g.bench_function(format!("{writers} x {per_append} per commit"), |b| {
            b.iter(|| {
                let commits: Vec<_> = (0..writers)
                    .map(|_| {
                        let items = (0..per_append)
                            .map(|_| Append {
                                queue: 1,
                                id: next.fetch_add(1, Ordering::Relaxed),
                                value: value.clone(),
                            })
                            .collect();
                        store.append(items, true)
                    })
                    .collect();
                for commit in commits {
                    commit.wait().expect("committed");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bindings, store_append);
criterion_main!(benches);
