//! `compare`: Sluice, NATS JetStream and RabbitMQ side by side, one run, on
//! loopback. Starts each broker in a temporary directory, runs the same
//! workloads against each (the workload of `sluice bench`), and prints a
//! Markdown table with Sluice/peer ratios (or JSON).
//!
//! `cargo build --release && cargo build --release --manifest-path
//! tests/compare/Cargo.toml --target-dir target && target/release/compare`
//! (its own workspace: see Cargo.toml).

mod harness;
mod nats;
mod rabbit;
mod sluice;
mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use harness::Spec;
use stats::{Report, Row};

/// Side-by-side benchmark of Sluice, NATS JetStream and RabbitMQ.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The sluice binary (broker and `sluice bench`).
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Router component for workload e.
    #[arg(
        long,
        default_value = "target/wasm-plugins/wasm32-unknown-unknown/plugin/topic_router.wasm"
    )]
    router: PathBuf,
    /// Filter component for workload e (loaded on every queue).
    #[arg(
        long,
        default_value = "target/wasm-plugins/wasm32-unknown-unknown/plugin/header_filter.wasm"
    )]
    filter: PathBuf,
    /// A nats-server to compare with:
    /// `PATH[,sync=always][,count=N][,replicas=N]`; `sync=always` sets
    /// `jetstream { sync_interval: always }` (nats-server ≥ 2.10),
    /// `count=N` runs at most N deliveries per workload on it, `replicas=3`
    /// runs a cluster of three servers with R3 streams. Repeatable.
    #[arg(long = "jetstream", value_parser = nats::Flavor::parse, default_value = "nats-server")]
    jetstream: Vec<nats::Flavor>,
    /// rabbitmq-server (started detached as a node of its own).
    #[arg(long, default_value = "/usr/lib/rabbitmq/bin/rabbitmq-server")]
    rabbitmq_server: PathBuf,
    /// rabbitmqctl.
    #[arg(long, default_value = "/usr/lib/rabbitmq/bin/rabbitmqctl")]
    rabbitmqctl: PathBuf,
    /// Use this running RabbitMQ instead of starting one (loopback only).
    #[arg(long)]
    rabbitmq_url: Option<String>,
    /// Systems to run: sluice, sluice-cluster (three nodes on loopback),
    /// nats, rabbitmq (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "sluice,nats,rabbitmq")]
    systems: Vec<String>,
    /// Workloads: a (1/1), b (4/4), c (fan-out), d (fixed rate), e (1/1,
    /// Sluice with router + filter). Comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    workloads: Vec<String>,
    /// Messages published per throughput run (fan-out: divided by the
    /// number of queues, so that deliveries are the same).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Unconfirmed publishes per producer.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 256)]
    prefetch: u32,
    /// Publish rate of workload d (msg/s).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Duration of workload d (seconds).
    #[arg(long, default_value_t = 5)]
    rate_secs: u64,
    /// Queues of workload c.
    #[arg(long, default_value_t = 10)]
    fanout_queues: u32,
    /// Runs per cell; the median (by msgs/s) is reported.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Give up on one run after this many seconds.
    #[arg(long, default_value_t = 300)]
    run_timeout: u64,
    /// Run Sluice's workloads through the Rust client (the harness the
    /// peers use) instead of `sluice bench`.
    #[arg(long)]
    sluice_client: bool,
    /// Keep the brokers' temporary directory (logs, data).
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run nothing: print the table of a saved `--json` output.
    #[arg(long, value_name = "FILE.json")]
    render: Option<PathBuf>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A number unique within this process (queue names of successive runs).
pub fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free UDP port on loopback (QUIC).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Workload {
    key: &'static str,
    title: String,
    spec: Spec,
}

fn workloads(args: &Args) -> Vec<Workload> {
    let base = Spec {
        producers: 1,
        consumers: 1,
        count: args.count,
        size: args.size,
        window: args.window,
        prefetch: args.prefetch,
        rate: None,
        queues: 1,
        fanout: false,
        plugins: false,
    };
    let q = args.fanout_queues.max(1);
    let all = vec![
        Workload {
            key: "a",
            title: "1 producer, 1 consumer".into(),
            spec: base.clone(),
        },
        Workload {
            key: "b",
            title: "4 producers, 4 consumers, 4 queues".into(),
            spec: Spec {
                producers: 4,
                consumers: 4,
                queues: 4,
                ..base.clone()
            },
        },
        Workload {
            key: "c",
            title: format!("fan-out to {q} queues (1 producer, {q} consumers)"),
            spec: Spec {
                consumers: q,
                queues: q,
                fanout: true,
                count: (args.count / u64::from(q)).max(1),
                ..base.clone()
            },
        },
        Workload {
            key: "d",
            title: format!("fixed rate {} msg/s, 1/1", args.rate),
            spec: Spec {
                rate: Some(args.rate),
                count: args.rate * args.rate_secs,
                ..base.clone()
            },
        },
        Workload {
            key: "e",
            title: "1/1, Sluice with router + filter".into(),
            spec: Spec {
                plugins: true,
                ..base
            },
        },
    ];
    all.into_iter()
        .filter(|w| args.workloads.iter().any(|k| k == w.key))
        .collect()
}

/// One system, running.
enum System {
    Sluice(sluice::Server),
    Nats(nats::Server),
    Rabbit(rabbit::Server),
}

struct Running {
    label: String,
    system: System,
    /// At most this many messages per run (see `nats::Flavor::max_count`).
    max_count: Option<u64>,
}

/// `spec` with at most `cap` deliveries (fan-out: `cap` / queues publishes).
fn capped(spec: &Spec, cap: Option<u64>) -> Spec {
    let mut s = spec.clone();
    if let Some(cap) = cap {
        let per_message = s.expected(1).max(1);
        s.count = s.count.min((cap / per_message).max(1));
    }
    s
}

async fn run_one(
    args: &Args,
    plugins: &sluice::Plugins,
    sys: &Running,
    spec: &Spec,
) -> anyhow::Result<Report> {
    match &sys.system {
        System::Sluice(server) => {
            if args.sluice_client || spec.fanout {
                harness::run(&mut sluice::Native::new(server, plugins), spec).await
            } else {
                sluice::bench(&args.sluice, server, spec, plugins).await
            }
        }
        System::Nats(server) => harness::run(&mut nats::Nats::new(server), spec).await,
        System::Rabbit(server) => harness::run(&mut rabbit::Rabbit::new(server), spec).await,
    }
}

async fn start_systems(args: &Args, dir: &std::path::Path) -> anyhow::Result<Vec<Running>> {
    let mut running = Vec::new();
    let wants = |s: &str| args.systems.iter().any(|x| x == s);
    // First: with both, the table's ratios are against the cluster.
    if wants("sluice-cluster") {
        let d = dir.join("sluice-cluster");
        std::fs::create_dir_all(&d)?;
        eprintln!(
            "starting a 3-node sluice cluster ({})",
            args.sluice.display()
        );
        running.push(Running {
            label: "Sluice, 3-node cluster".into(),
            system: System::Sluice(sluice::Server::start_cluster(&args.sluice, &d, 3).await?),
            max_count: None,
        });
    }
    if wants("sluice") {
        let d = dir.join("sluice");
        std::fs::create_dir_all(&d)?;
        eprintln!("starting sluice ({})", args.sluice.display());
        running.push(Running {
            label: "Sluice".into(),
            system: System::Sluice(sluice::Server::start(&args.sluice, &d).await?),
            max_count: None,
        });
    }
    if wants("nats") {
        for (i, flavor) in args.jetstream.iter().enumerate() {
            let d = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&d)?;
            let label = flavor.label();
            eprintln!("starting {label} ({})", flavor.bin.display());
            running.push(Running {
                label,
                system: System::Nats(nats::Server::start(flavor, &d).await?),
                max_count: flavor.max_count,
            });
        }
    }
    if wants("rabbitmq") {
        let tools = rabbit::Tools {
            server: args.rabbitmq_server.clone(),
            ctl: args.rabbitmqctl.clone(),
        };
        let server = match &args.rabbitmq_url {
            Some(url) => rabbit::Server::existing(url),
            None => {
                let d = dir.join("rabbitmq");
                std::fs::create_dir_all(&d)?;
                eprintln!("starting rabbitmq ({})", tools.server.display());
                rabbit::Server::start(&tools, &d).await?
            }
        };
        running.push(Running {
            label: format!("RabbitMQ {}", rabbit::version(&tools)),
            system: System::Rabbit(server),
            max_count: None,
        });
    }
    Ok(running)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.render {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let saved: serde_json::Value = serde_json::from_str(&text)?;
        let rows: Vec<Row> = serde_json::from_value(saved["rows"].clone())
            .context("no `rows` in the file (output of --json?)")?;
        print!("{}", stats::render_table(&rows));
        return Ok(());
    }
    let plugins = sluice::Plugins {
        router: args.router.clone(),
        filter: args.filter.clone(),
    };
    let tmp = tempfile::Builder::new()
        .prefix("sluice-compare-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let systems = start_systems(&args, tmp.path()).await?;
    let mut versions = serde_json::Map::new();
    for s in &systems {
        let v = match &s.system {
            System::Sluice(_) => sluice::version(&args.sluice),
            _ => s.label.clone(),
        };
        versions.insert(s.label.clone(), v.into());
    }

    let mut rows = Vec::new();
    for w in workloads(&args) {
        for sys in &systems {
            let is_sluice = matches!(sys.system, System::Sluice(_));
            let label = if is_sluice && w.spec.plugins {
                format!("{} (router + filter)", sys.label)
            } else if is_sluice && (args.sluice_client || w.spec.fanout) {
                format!("{} (Rust client)", sys.label)
            } else {
                sys.label.clone()
            };
            let spec = capped(&w.spec, sys.max_count);
            let mut reports = Vec::new();
            let mut error = None;
            for _ in 0..args.repeat.max(1) {
                eprint!("{} {} / {label} ... ", w.key, w.title);
                let r = tokio::time::timeout(
                    Duration::from_secs(args.run_timeout),
                    run_one(&args, &plugins, sys, &spec),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {} s", args.run_timeout)));
                match r {
                    Ok(r) => {
                        eprintln!(
                            "{:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
                            r.msgs_per_s, r.p50_ms, r.p99_ms
                        );
                        reports.push(r);
                    }
                    Err(e) => {
                        eprintln!("failed: {e:#}");
                        error = Some(format!("{e:#}"));
                    }
                }
                // Let the broker finish deleting the run's queues.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let result = stats::median_by_throughput(reports)
                .ok_or_else(|| error.unwrap_or_else(|| "no run".into()));
            let mut note = result
                .as_ref()
                .ok()
                .and_then(|r| r.incomplete(spec.expected(r.sent)));
            if spec.count < w.spec.count {
                let capped = format!(
                    "{} messages published instead of {}",
                    spec.count, w.spec.count
                );
                note = Some(match note {
                    Some(n) => format!("{n}; {capped}"),
                    None => capped,
                });
            }
            rows.push(Row {
                workload: w.key.into(),
                title: w.title.clone(),
                system: label,
                sluice: is_sluice,
                result,
                note,
            });
        }
    }
    drop(systems);
    if args.keep {
        eprintln!("kept {}", tmp.keep().display());
    }

    if args.json {
        let out = serde_json::json!({
            "count": args.count,
            "size": args.size,
            "window": args.window,
            "prefetch": args.prefetch,
            "rate": args.rate,
            "rate_secs": args.rate_secs,
            "fanout_queues": args.fanout_queues,
            "repeat": args.repeat,
            "versions": versions,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} B messages, window {}, prefetch {}, {} messages per throughput run, median of {}\n",
            args.size,
            args.window,
            args.prefetch,
            args.count,
            args.repeat.max(1)
        );
        print!("{}", stats::render_table(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_workloads() {
        let args = Args::parse_from(["compare"]);
        let w = workloads(&args);
        let keys: Vec<&str> = w.iter().map(|w| w.key).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
        let (a, b, c, d, e) = (&w[0].spec, &w[1].spec, &w[2].spec, &w[3].spec, &w[4].spec);
        assert_eq!(
            (a.producers, a.consumers, a.queues, a.count),
            (1, 1, 1, 100_000)
        );
        assert_eq!((b.producers, b.consumers, b.queues), (4, 4, 4));
        // Fan-out: as many deliveries as the other throughput runs.
        assert!(c.fanout);
        assert_eq!((c.queues, c.consumers, c.count), (10, 10, 10_000));
        assert_eq!(c.expected(c.count), 100_000);
        assert_eq!((d.rate, d.count), (Some(20_000), 100_000));
        assert!(e.plugins && !a.plugins);
        assert!(
            [a, b, c, d, e]
                .iter()
                .all(|s| s.size == 100 && s.window == 256 && s.prefetch == 256)
        );
        assert_eq!(args.jetstream.len(), 1);
        assert_eq!(args.systems, ["sluice", "nats", "rabbitmq"]);

        let only = Args::parse_from(["compare", "--workloads", "c,a", "--count", "5000"]);
        let w = workloads(&only);
        assert_eq!(w.iter().map(|w| w.key).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(w[1].spec.count, 500);
    }

    #[test]
    fn capped_counts_deliveries() {
        let args = Args::parse_from(["compare"]);
        let w = workloads(&args);
        assert_eq!(capped(&w[0].spec, None).count, 100_000);
        assert_eq!(capped(&w[0].spec, Some(5_000)).count, 5_000);
        // Fan-out: 5,000 deliveries are 500 publishes to 10 queues.
        assert_eq!(capped(&w[2].spec, Some(5_000)).count, 500);
        assert_eq!(capped(&w[2].spec, Some(5)).count, 1);
        assert_eq!(capped(&w[0].spec, Some(1_000_000)).count, 100_000);
    }
}
