//! Codec cost: encoding and decoding the frames on the hot path (publishes
//! and deliveries of 100-byte messages), per frame and as the batches the
//! writers coalesce.
//!
//! Run: `cargo bench -p sluice-proto --bench codec`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_proto::{Decoder, Delivery, Frame, Limits, encode};

fn publish(seq: u64) -> Frame {
    Frame::Publish {
        seq,
        tenant: None,
        topic: "orders.eu.created".into(),
        headers: vec![("trace-id".into(), "4bf92f3577b34da6".into())],
        payload: vec![b'x'; 100],
    }
}

fn deliver(n: u64) -> Frame {
    Frame::Deliver {
        sub: 1,
        deliveries: (0..n)
            .map(|tag| Delivery {
                tag,
                topic: "orders.eu.created".into(),
                headers: vec![("trace-id".into(), "4bf92f3577b34da6".into())],
                payload: vec![b'x'; 100],
                redelivered: false,
            })
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let frames: Vec<Frame> = (0..64).map(publish).collect();
    let mut batch = Vec::new();
    for f in &frames {
        encode(f, &mut batch);
    }
    g.throughput(Throughput::Elements(64));
    g.bench_function("encode 64 publishes (100 B)", |b| {
        let mut out = Vec::with_capacity(batch.len());
        b.iter(|| {
            out.clear();
            for f in &frames {
                encode(f, &mut out);
            }
            std::hint::black_box(out.len())
        })
    });
    g.bench_function("decode 64 publishes (100 B)", |b| {
        b.iter(|| {
            let mut d = Decoder::new(Limits::default());
            d.push(&batch);
            let mut n = 0;
            while let Ok(Some(f)) = d.next_frame() {
                std::hint::black_box(&f);
                n += 1;
            }
            assert_eq!(n, 64);
        })
    });
    let big = deliver(256);
    let mut bytes = Vec::new();
    encode(&big, &mut bytes);
    g.throughput(Throughput::Elements(256));
    g.bench_function("encode deliver of 256 (100 B)", |b| {
        let mut out = Vec::with_capacity(bytes.len());
        b.iter(|| {
            out.clear();
            encode(&big, &mut out);
            std::hint::black_box(out.len())
        })
    });
    g.bench_function("decode deliver of 256 (100 B)", |b| {
        b.iter(|| {
            let mut d = Decoder::new(Limits::default());
            d.push(&bytes);
            std::hint::black_box(d.next_frame().unwrap().unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
