//! Tenant B's publish→deliver latency with and without tenant A abusing its
//! plugins. Starts an in-process broker on loopback with fresh certificates.
//!
//! Run: `cargo run --release -p sluice --example noisy_neighbour`

use std::time::{Duration, Instant};

use sluice::broker::BrokerConfig;
use sluice::tls::ServerTlsFiles;
use sluice_client::{Client, QueueSpec};

const RATE: u64 = 1000; // B's messages per second
const SECONDS: u64 = 3;

async fn measure_b(b: &Client, queue: &str) -> (f64, f64, f64) {
    b.declare(QueueSpec::new(queue)).await.expect("declare");
    b.bind(queue, queue).await.expect("bind");
    let mut sub = b.subscribe(queue, 256).await.expect("subscribe");
    let epoch = Instant::now();
    let total = RATE * SECONDS;
    let publisher = {
        let b = b.clone();
        let queue = queue.to_string();
        tokio::spawn(async move {
            let mut confirms = Vec::new();
            for i in 0..total {
                tokio::time::sleep_until(
                    (epoch + Duration::from_micros(i * 1_000_000 / RATE)).into(),
                )
                .await;
                let sent = epoch.elapsed().as_nanos() as u64;
                confirms.push(b.publish(&queue, vec![], sent.to_be_bytes().to_vec()));
            }
            for c in confirms {
                c.await.expect("confirm");
            }
        })
    };
    let mut lat = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let d = sub.next().await.expect("delivery");
        let sent = u64::from_be_bytes(d.payload[..8].try_into().expect("8 bytes"));
        lat.push((epoch.elapsed().as_nanos() as u64 - sent) as f64 / 1e6);
        sub.ack(d.tag);
    }
    publisher.await.expect("publisher");
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (q(0.5), q(0.99), q(0.999))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    sluice::tls::init_dev_certs(&certs, &["a".into(), "b".into()], "sluice")?;
    let mut config = BrokerConfig::new(dir.path());
    config.sandbox.trap_threshold = u32::MAX; // keep A trapping for the whole run
    let running = sluice::cli::start(
        "127.0.0.1:0".parse()?,
        dir.path(),
        &ServerTlsFiles::from_dir(&certs),
        config,
        Default::default(),
    )
    .await?;
    let addr = running.addr;
    let b = Client::connect(addr, &certs.join("b")).await?;
    // B routes through a filter plugin too, so both tenants need plugin workers.
    let filter = sluice::bundled::wasm("header-filter")
        .expect("bundled")
        .to_vec();
    b.declare(QueueSpec::new("calm")).await?;
    b.declare(QueueSpec::new("noisy")).await?;
    b.load_plugin(
        "pass",
        "filter",
        Some("calm"),
        filter.clone(),
        vec![("drop".into(), "never".into())],
    )
    .await?;
    b.load_plugin(
        "pass2",
        "filter",
        Some("noisy"),
        filter,
        vec![("drop".into(), "never".into())],
    )
    .await?;

    let quiet = measure_b(&b, "calm").await;

    let a = Client::connect(addr, &certs.join("a")).await?;
    a.declare(QueueSpec::new("q")).await?;
    a.bind("q", "t").await?;
    a.load_plugin(
        "spin",
        "filter",
        Some("q"),
        sluice::bundled::wasm("hostile").expect("bundled").to_vec(),
        vec![],
    )
    .await?;
    let stop = Instant::now() + Duration::from_secs(SECONDS + 2);
    let mut abusers = Vec::new();
    for _ in 0..4 {
        let a = a.clone();
        abusers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                let batch: Vec<_> = (0..16)
                    .map(|i| {
                        a.publish(
                            "t",
                            vec![(
                                "hostile".into(),
                                if i % 2 == 0 {
                                    "loop".into()
                                } else {
                                    "alloc".into()
                                },
                            )],
                            vec![],
                        )
                    })
                    .collect();
                for f in batch {
                    let _ = f.await;
                    n += 1;
                }
            }
            n
        }));
    }
    let noisy = measure_b(&b, "noisy").await;
    let mut abused = 0;
    for h in abusers {
        abused += h.await?;
    }
    println!(
        "B at {RATE} msg/s for {SECONDS} s, 100-byte-ish messages, filter plugin on its queue:"
    );
    println!(
        "  alone:                 p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
        quiet.0, quiet.1, quiet.2
    );
    println!(
        "  A spinning/bombing:    p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  ({abused} of A's messages trapped)",
        noisy.0, noisy.1, noisy.2
    );
    running.server.close();
    Ok(())
}
