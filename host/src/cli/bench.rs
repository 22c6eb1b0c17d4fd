//! `sluice bench`: load against a running broker, end-to-end latency.

use super::out;
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sluice_client::QueueSpec;

use super::remote::Conn;

/// `sluice bench` flags (defaults: the workload of our peer comparison).
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Consumer connections.
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// Messages published in total.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Publish for this many seconds instead of `--count` messages.
    #[arg(long)]
    duration: Option<f64>,
    /// Payload bytes (at least 16: send time and sequence).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Unconfirmed publishes per producer.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 256)]
    prefetch: u32,
    /// Total publish rate in msg/s (default: as fast as confirms allow).
    #[arg(long)]
    rate: Option<u64>,
    /// Queues (messages are spread over them; each is consumed).
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Fan-out: every message is routed to this many queues (each of the
    /// `--queues` becomes a group of that many queues bound to one topic);
    /// msgs/s counts deliveries.
    #[arg(long, default_value_t = 1)]
    fanout: u32,
    /// Load this router for the run (tenant-wide; unloaded at the end).
    #[arg(long)]
    router: Option<PathBuf>,
    /// Load this filter on every bench queue.
    #[arg(long)]
    filter: Option<PathBuf>,
    /// Transient queues (no fsync).
    #[arg(long)]
    transient: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

struct Counters {
    confirmed: AtomicU64,
    refused: AtomicU64,
    received: AtomicU64,
    /// How many messages consumers wait for: unknown (`u64::MAX`) until
    /// every producer is done, then the number confirmed.
    target: AtomicU64,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let size = args.size.max(16);
    let admin = args.conn.connect().await?;
    let run_id = std::process::id();
    let fanout = args.fanout.max(1);
    // Topics, one per group; each group's queues are all bound to it.
    let names: Vec<String> = (0..args.queues.max(1))
        .map(|i| format!("bench-{run_id}-{i}"))
        .collect();
    let mut queues: Vec<String> = Vec::new();
    for group in &names {
        for copy in 0..fanout {
            let q = if fanout == 1 {
                group.clone()
            } else {
                format!("{group}-{copy}")
            };
            let mut spec = QueueSpec::new(&q);
            if args.transient {
                spec = spec.transient();
            }
            admin
                .declare(spec)
                .await
                .with_context(|| format!("declaring {q}"))?;
            admin.bind(&q, &format!("bench.{group}")).await?;
            queues.push(q);
        }
    }
    let router = format!("bench-router-{run_id}");
    if let Some(path) = &args.router {
        let wasm =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        admin
            .load_plugin(&router, "router", None, wasm, vec![])
            .await?;
    }
    if let Some(path) = &args.filter {
        let wasm =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        for (i, q) in queues.iter().enumerate() {
            admin
                .load_plugin(
                    &format!("bench-filter-{run_id}-{i}"),
                    "filter",
                    Some(q),
                    wasm.clone(),
                    vec![],
                )
                .await?;
        }
    }

    let counters = Arc::new(Counters {
        confirmed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        received: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
    });
    let epoch = Instant::now();
    let producers = args.producers.max(1) as u64;
    let deadline = args
        .duration
        .map(|s| epoch + Duration::from_secs_f64(s.max(0.0)));
    let count = if deadline.is_some() {
        u64::MAX
    } else {
        args.count
    };

    // Consumers first, so nothing waits in the queues longer than needed.
    let mut consumers = Vec::new();
    for c in 0..args.consumers.max(1) {
        let client = args.conn.connect().await?;
        let mut subs = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            if i % args.consumers.max(1) as usize == c as usize
                || args.consumers as usize > queues.len()
            {
                subs.push((i, client.subscribe(q, args.prefetch).await?));
            }
        }
        let counters = counters.clone();
        consumers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seen = HashSet::new();
            let mut dups = 0u64;
            let mut streams: futures::stream::SelectAll<_> =
                futures::stream::select_all(subs.into_iter().map(|(queue, s)| {
                    Box::pin(futures::stream::unfold(s, move |mut s| async move {
                        let d = s.next().await?;
                        s.ack(d.tag);
                        Some(((queue, d), s))
                    }))
                }));
            let mut idle = Instant::now();
            while counters.received.load(Relaxed) < counters.target.load(Relaxed)
                && idle.elapsed() < Duration::from_secs(10)
            {
                let (queue, d) =
                    match tokio::time::timeout(Duration::from_millis(50), streams.next()).await {
                        Ok(Some(d)) => d,
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                idle = Instant::now();
                let now = epoch.elapsed().as_nanos() as u64;
                let sent = u64::from_be_bytes(d.payload[..8].try_into().unwrap_or([0; 8]));
                let seq = u64::from_be_bytes(d.payload[8..16].try_into().unwrap_or([0; 8]));
                lat.push(now.saturating_sub(sent));
                if !seen.insert((queue, seq)) {
                    dups += 1;
                }
                counters.received.fetch_add(1, Relaxed);
            }
            drop(streams);
            client.close();
            (lat, dups)
        }));
    }

    let mut tasks = Vec::new();
    for p in 0..producers {
        let client = args.conn.connect().await?;
        let counters = counters.clone();
        let names = names.clone();
        let per = count / producers + u64::from(p < count % producers);
        let window = args.window.max(1);
        let rate = args.rate.map(|r| (r as f64 / producers as f64).max(1e-3));
        tasks.push(tokio::spawn(async move {
            let mut inflight = FuturesUnordered::new();
            let start = Instant::now();
            for i in 0..per {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(r) = rate {
                    tokio::time::sleep_until(
                        (start + Duration::from_secs_f64(i as f64 / r)).into(),
                    )
                    .await;
                }
                let mut payload = vec![b'.'; size];
                payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
                payload[8..16].copy_from_slice(&((p << 40) | i).to_be_bytes());
                let q = &names[(i % names.len() as u64) as usize];
                inflight.push(client.publish(&format!("bench.{q}"), vec![], payload));
                while inflight.len() >= window {
                    match inflight.next().await {
                        Some(Ok(_)) => counters.confirmed.fetch_add(1, Relaxed),
                        _ => counters.refused.fetch_add(1, Relaxed),
                    };
                }
            }
            while let Some(r) = inflight.next().await {
                match r {
                    Ok(_) => counters.confirmed.fetch_add(1, Relaxed),
                    Err(_) => counters.refused.fetch_add(1, Relaxed),
                };
            }
            client
        }));
    }
    let progress = std::io::stderr().is_terminal() && !args.json;
    let ticker = {
        let counters = counters.clone();
        // Of how many, when known in advance.
        let of = match deadline {
            Some(_) => String::new(),
            None => format!("/{}", args.count),
        };
        let of_deliveries = match deadline {
            Some(_) => String::new(),
            None => format!("/{}", args.count * u64::from(fanout)),
        };
        tokio::spawn(async move {
            if !progress {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (c, r) = (
                    counters.confirmed.load(Relaxed),
                    counters.received.load(Relaxed),
                );
                eprint!(
                    "\r  confirmed {c:>9}{of}  received {r:>9}{of_deliveries}  {:>5.1} s",
                    epoch.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut producer_clients = Vec::new();
    for t in tasks {
        producer_clients.push(t.await?);
    }
    let publish_secs = epoch.elapsed().as_secs_f64();
    let confirmed = counters.confirmed.load(Relaxed);
    let sent = confirmed + counters.refused.load(Relaxed);
    // Every confirmed message is delivered once per queue of its group.
    counters
        .target
        .store(confirmed * u64::from(fanout), Relaxed);
    let mut lat: Vec<u64> = Vec::new();
    let mut dups = 0;
    for c in consumers {
        let (l, d) = c.await?;
        lat.extend(l);
        dups += d;
    }
    let total_secs = epoch.elapsed().as_secs_f64();
    let received = counters.received.load(Relaxed);
    ticker.abort();
    if progress {
        eprintln!();
    }
    for q in &queues {
        let _ = admin.delete(q).await;
    }
    if args.router.is_some() {
        let _ = admin.unload_plugin(&router).await;
    }
    for c in producer_clients {
        c.close();
    }
    admin.close();

    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1e6)
    };
    let msgs_per_s = received as f64 / total_secs;
    let report = serde_json::json!({
        "msgs_per_s": msgs_per_s.round(),
        "publish_msgs_per_s": (confirmed as f64 / publish_secs).round(),
        "mb_per_s": (msgs_per_s * size as f64 / 1e6 * 100.0).round() / 100.0,
        "p50_ms": (pct(0.5) * 1000.0).round() / 1000.0,
        "p99_ms": (pct(0.99) * 1000.0).round() / 1000.0,
        "p999_ms": (pct(0.999) * 1000.0).round() / 1000.0,
        "sent": sent,
        "confirmed": confirmed,
        "received": received,
        "duplicates": dups,
    });
    if args.json {
        out!("{report}");
    } else {
        out!(
            "{} producer(s), {} consumer(s), {} queue(s){}, {} B messages, window {}, prefetch {}{}{}{}",
            args.producers.max(1),
            args.consumers.max(1),
            queues.len(),
            if fanout > 1 {
                format!(" (fan-out {fanout})")
            } else {
                String::new()
            },
            size,
            args.window,
            args.prefetch,
            if args.transient {
                ", transient"
            } else {
                ", durable (confirm after fsync)"
            },
            if args.router.is_some() {
                ", router"
            } else {
                ""
            },
            if args.filter.is_some() {
                ", filter"
            } else {
                ""
            },
        );
        out!(
            "  end to end: {:.0} msg/s ({:.2} MB/s); publish: {:.0} msg/s",
            msgs_per_s,
            msgs_per_s * size as f64 / 1e6,
            confirmed as f64 / publish_secs
        );
        out!(
            "  latency publish→deliver: p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms",
            pct(0.5),
            pct(0.99),
            pct(0.999)
        );
        out!("  sent {sent}  confirmed {confirmed}  received {received}  duplicates {dups}");
    }
    Ok(
        if received >= confirmed * u64::from(fanout) && confirmed == sent {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
