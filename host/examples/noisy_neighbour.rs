//! Tenant B's publish→deliver latency with and without tenant A abusing its
//! plugins. Starts an in-process broker on loopback with fresh certificates.
//!
//! Run: `cargo run --release -p sluice --example noisy_neighbour`
//!
//! B's queues are transient by default, so the figures show how B shares
//! the CPU with A's plugins, not the disk's fsync latency (which on a busy
//! VM varies by tens of milliseconds between runs); `SLUICE_NOISY_DURABLE=1`
//! makes them durable. `SLUICE_NOISY_MODES=loop,alloc,slow` picks what A's plugin
//! does, `SLUICE_NOISY_CPU_SHARE=inf` turns the CPU-share demotion off and
//! `SLUICE_NOISY_THROTTLE_PERCENT=100` the throttle of long calls.

use std::time::{Duration, Instant};

use sluice::broker::BrokerConfig;
use sluice::tls::ServerTlsFiles;
use sluice_client::{Client, QueueSpec};

const RATE: u64 = 1000; // B's messages per second
const SECONDS: u64 = 3;

fn spec(queue: &str) -> QueueSpec {
    let spec = QueueSpec::new(queue);
    if std::env::var_os("SLUICE_NOISY_DURABLE").is_some() {
        spec
    } else {
        spec.transient()
    }
}

async fn measure_b(b: &Client, queue: &str) -> (f64, f64, f64) {
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
    // SLUICE_NOISY_CPU_SHARE=inf turns the CPU-share demotion off (for comparison).
    if let Some(share) = std::env::var("SLUICE_NOISY_CPU_SHARE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.plugin_cpu_share = share;
    }
    // SLUICE_NOISY_THROTTLE_PERCENT=100 turns the throttle of long calls off.
    if let Some(pct) = std::env::var("SLUICE_NOISY_THROTTLE_PERCENT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.sandbox.throttle_percent = pct;
    }
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
    b.declare(spec("calm")).await?;
    b.declare(spec("noisy")).await?;
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
    // What A's plugin does: spin to its deadline, bomb its memory cap (and,
    // with SLUICE_NOISY_MODES=slow, burn ~7 ms per call without trapping).
    let modes: Vec<String> = std::env::var("SLUICE_NOISY_MODES")
        .unwrap_or_else(|_| "loop,alloc".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let mut abusers = Vec::new();
    for _ in 0..4 {
        let a = a.clone();
        let modes = modes.clone();
        abusers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                let batch: Vec<_> = (0..16)
                    .map(|i| {
                        a.publish(
                            "t",
                            vec![
                                ("hostile".into(), modes[i % modes.len()].clone()),
                                // `slow`: busy for ~7 ms, under the deadline.
                                ("ms".into(), "150".into()),
                            ],
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
