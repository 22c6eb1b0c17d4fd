//! Client commands: queue, publish, consume, stats, and plugin load/list/unload.

use super::out;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_client::{Client, ConnectOptions, QueueSpec};

/// Where and as whom to connect.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Conn {
    /// Broker address; a cluster's nodes as a comma-separated list (the
    /// leader among them is found and followed).
    #[arg(
        long,
        env = "SLUICE_SERVER",
        default_value = "127.0.0.1:7600",
        global = true
    )]
    server: String,
    /// Identity folder (cert.pem, key.pem, ca.pem).
    #[arg(long, env = "SLUICE_IDENTITY", global = true)]
    identity: Option<PathBuf>,
    /// Tenant to act on (admin identities).
    #[arg(long, global = true)]
    tenant: Option<String>,
}

impl Conn {
    /// The addresses of `--server` (one, or a cluster's nodes).
    async fn servers(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let mut servers = Vec::new();
        for name in self.server.split(',').map(str::trim) {
            if name.is_empty() {
                bail!("--server `{}`: an empty address in the list", self.server);
            }
            let addr = tokio::net::lookup_host(name)
                .await
                .with_context(|| format!("cannot resolve server address `{name}`"))?
                .next()
                .with_context(|| format!("no address for `{name}`"))?;
            servers.push(addr);
        }
        Ok(servers)
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        self.connect_to(false).await
    }

    /// Connect to a cluster's leader, even through a single `--server`
    /// (following its `not_leader` answer).
    pub(crate) async fn connect_leader(&self) -> anyhow::Result<Client> {
        self.connect_to(true).await
    }

    async fn connect_to(&self, leader: bool) -> anyhow::Result<Client> {
        let identity = self
            .identity
            .as_ref()
            .context("no identity: pass --identity DIR (or set SLUICE_IDENTITY) with cert.pem, key.pem and ca.pem")?;
        let servers = self.servers().await?;
        let opts = ConnectOptions {
            tenant: self.tenant.clone(),
            ..ConnectOptions::default()
        };
        let client = if let ([addr], false) = (&servers[..], leader) {
            Client::connect_with(*addr, identity, opts).await?
        } else {
            Client::connect_any(&servers, identity, opts).await?
        };
        super::track(&client);
        Ok(client)
    }
}

/// `sluice queue ...`
#[derive(Debug, clap::Args)]
pub(crate) struct QueueArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(subcommand)]
    pub(crate) cmd: QueueCommand,
}

/// `sluice stats`
#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    /// One JSON object per line.
    #[arg(long)]
    pub(crate) json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub(crate) watch: Option<f64>,
}

/// Queue subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum QueueCommand {
    /// Declare a queue (idempotent with the same options).
    Declare {
        /// Queue name.
        name: String,
        /// Skip fsync; the queue is deleted when the broker restarts.
        #[arg(long)]
        transient: bool,
        /// Hold at most N messages (then refuse publishes).
        #[arg(long)]
        max_length: Option<u64>,
        /// At max-length drop the oldest message instead of refusing.
        #[arg(long)]
        drop_head: bool,
        /// Message time-to-live in seconds.
        #[arg(long)]
        ttl: Option<f64>,
        /// Dead-letter queue.
        #[arg(long)]
        dead_letter: Option<String>,
        /// Deliveries after which a message is dead-lettered.
        #[arg(long)]
        delivery_limit: Option<u32>,
    },
    /// Bind a queue to a topic pattern (`*` one token, `>` the rest).
    Bind {
        /// Queue.
        name: String,
        /// Pattern.
        pattern: String,
    },
    /// List queues.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete a queue and its messages.
    Delete {
        /// Queue.
        name: String,
    },
    /// Drop a queue's ready messages.
    Purge {
        /// Queue.
        name: String,
    },
}

pub(crate) async fn queue(conn: &Conn, cmd: QueueCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    match cmd {
        QueueCommand::Declare {
            name,
            transient,
            max_length,
            drop_head,
            ttl,
            dead_letter,
            delivery_limit,
        } => {
            let mut spec = QueueSpec::new(&name);
            if transient {
                spec = spec.transient();
            }
            if let Some(n) = max_length {
                spec = spec.max_length(n);
            }
            if drop_head {
                spec = spec.drop_head();
            }
            if let Some(t) = ttl {
                if !(t > 0.0 && t.is_finite()) {
                    bail!("--ttl must be a positive number of seconds");
                }
                spec = spec.ttl(Duration::from_secs_f64(t));
            }
            if let Some(d) = &dead_letter {
                spec = spec.dead_letter(d);
            }
            if let Some(n) = delivery_limit {
                spec = spec.delivery_limit(n);
            }
            client.declare(spec).await?;
            out!(
                "queue `{name}` declared{}",
                if transient {
                    " (transient: not fsynced, deleted at restart)"
                } else {
                    ""
                }
            );
        }
        QueueCommand::Bind { name, pattern } => {
            client.bind(&name, &pattern).await?;
            out!("queue `{name}` bound to `{pattern}`");
        }
        QueueCommand::List { json } => {
            let queues = client.list_queues().await?;
            if json {
                for q in queues {
                    out!(
                        "{}",
                        serde_json::json!({"name": q.name, "durable": q.durable, "ready": q.ready, "unacked": q.unacked,
                            "bytes": q.bytes, "consumers": q.consumers, "published": q.published,
                            "dead_lettered": q.dead_lettered, "filters": q.filters})
                    );
                }
            } else {
                out!(
                    "{:<24} {:>8} {:>8} {:>10} {:>9} {:>9}  filters",
                    "queue",
                    "ready",
                    "unacked",
                    "bytes",
                    "consumers",
                    "durable"
                );
                for q in queues {
                    out!(
                        "{:<24} {:>8} {:>8} {:>10} {:>9} {:>9}  {}",
                        q.name,
                        q.ready,
                        q.unacked,
                        q.bytes,
                        q.consumers,
                        q.durable,
                        q.filters.join(",")
                    );
                }
            }
        }
        QueueCommand::Delete { name } => {
            client.delete(&name).await?;
            out!("queue `{name}` deleted");
        }
        QueueCommand::Purge { name } => {
            let n = client.purge(&name).await?;
            out!("purged {n} messages from `{name}`");
        }
    }
    client.close();
    Ok(ExitCode::SUCCESS)
}

/// `sluice publish`
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    conn: Conn,
    /// Topic.
    topic: String,
    /// Body (default: empty, or with --count the message number).
    body: Option<String>,
    /// Header (repeatable).
    #[arg(long = "header", value_name = "K=V", value_parser = super::parse_kv)]
    headers: Vec<(String, String)>,
    /// Publish N messages.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Pad generated payloads to this many bytes.
    #[arg(long)]
    size: Option<usize>,
    /// At most N messages per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Print one JSON line per confirmed message: {"n":i,"queues":k}.
    #[arg(long)]
    json: bool,
}

/// Times `sluice publish` reconnects to a new leader and publishes again
/// what was not confirmed.
const FAILOVERS: u32 = 5;

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.conn.connect().await?;
    // With several servers (a cluster), what a failover left unconfirmed
    // is published again on the new leader (at-least-once).
    let cluster = args.conn.server.contains(',');
    const WINDOW: usize = 256;
    let (mut confirmed, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    let start = std::time::Instant::now();
    let payload = |i: u64| {
        let mut payload = match (&args.body, args.count > 1 || args.size.is_some()) {
            (Some(b), _) => b.clone().into_bytes(),
            (None, true) => i.to_string().into_bytes(),
            (None, false) => Vec::new(),
        };
        if let Some(size) = args.size
            && payload.len() < size
        {
            payload.resize(size, b'.');
        }
        payload
    };
    let mut todo: Vec<u64> = (0..args.count).collect();
    let mut failovers = 0;
    loop {
        let mut again = Vec::new();
        let mut pending = FuturesOrdered::new();
        let mut handle =
            |n: u64, r: Result<u32, sluice_client::ClientError>| -> anyhow::Result<()> {
                match r {
                    Ok(q) => {
                        confirmed += 1;
                        if args.json {
                            out!("{}", serde_json::json!({"n": n, "queues": q}));
                        } else if args.count == 1 {
                            out!("confirmed: stored in {q} queue(s)");
                        }
                    }
                    Err(e) if cluster && failovers < FAILOVERS && e.failed_over() => again.push(n),
                    Err(e) => {
                        failed += 1;
                        if first_error.is_none() {
                            first_error = Some(e.to_string());
                        }
                    }
                }
                Ok(())
            };
        for &i in &todo {
            if let Some(rate) = args.rate.filter(|r| *r > 0) {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let fut = client.publish(&args.topic, args.headers.clone(), payload(i));
            pending.push_back(async move { (i, fut.await) });
            while pending.len() >= WINDOW {
                if let Some((n, r)) = pending.next().await {
                    handle(n, r)?;
                }
            }
        }
        while let Some((n, r)) = pending.next().await {
            handle(n, r)?;
        }
        if again.is_empty() {
            break;
        }
        failovers += 1;
        eprintln!(
            "connection to the leader lost: publishing {} unconfirmed message(s) again",
            again.len()
        );
        client = args.conn.connect().await?;
        todo = again;
    }
    client.close();
    if !args.json && args.count > 1 {
        let secs = start.elapsed().as_secs_f64();
        out!(
            "published {} messages: {confirmed} confirmed, {failed} refused ({:.0} msg/s)",
            args.count,
            confirmed as f64 / secs.max(1e-9)
        );
    }
    if let Some(e) = first_error {
        eprintln!("error: {failed} message(s) not confirmed; first: {e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice consume`
#[derive(Debug, clap::Args)]
pub(crate) struct ConsumeArgs {
    #[command(flatten)]
    conn: Conn,
    /// Queue.
    queue: String,
    /// Stop after N messages.
    #[arg(long)]
    count: Option<u64>,
    /// Most unacked deliveries.
    #[arg(long, default_value_t = 64)]
    prefetch: u32,
    /// Stop when no message arrived for SECS.
    #[arg(long)]
    timeout: Option<f64>,
    /// Requeue each message instead of acking it.
    #[arg(long, conflicts_with = "reject")]
    nack: bool,
    /// Dead-letter each message instead of acking it.
    #[arg(long)]
    reject: bool,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect().await?;
    let mut sub = client.subscribe(&args.queue, args.prefetch).await?;
    let mut got = 0u64;
    let idle = args.timeout.map(Duration::from_secs_f64);
    while args.count.is_none_or(|c| got < c) {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, sub.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => sub.next().await,
        };
        let Some(d) = next else {
            bail!("the subscription ended (queue deleted or connection lost)")
        };
        got += 1;
        if args.json {
            let headers: serde_json::Map<String, serde_json::Value> = d
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            out!(
                "{}",
                serde_json::json!({"topic": d.topic, "headers": headers, "payload": String::from_utf8_lossy(&d.payload), "redelivered": d.redelivered})
            );
        } else {
            out!(
                "{}: {}{}",
                d.topic,
                String::from_utf8_lossy(&d.payload),
                if d.redelivered { " (redelivered)" } else { "" }
            );
        }
        if args.nack {
            sub.nack(d.tag);
        } else if args.reject {
            sub.reject(d.tag);
        } else {
            sub.ack(d.tag);
        }
    }
    drop(sub);
    // Closed after the broker handled the acks (see `cli::main`).
    match args.count {
        Some(c) if got < c => {
            eprintln!("error: received {got} of {c} messages before the idle timeout");
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Run `sluice stats` (once, or every `watch` seconds).
pub(crate) async fn stats(conn: &Conn, json: bool, watch: Option<f64>) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let Some(every) = watch else {
        print_stats(&client, json).await?;
        client.close();
        return Ok(ExitCode::SUCCESS);
    };
    if !(every > 0.0 && every.is_finite()) {
        bail!("--watch must be a positive number of seconds");
    }
    loop {
        if !json {
            {
                use std::io::Write as _;
                if let Err(e) = write!(std::io::stdout().lock(), "\x1b[2J\x1b[H") {
                    return Err(super::StdoutClosed(e).into());
                }
            }
        }
        print_stats(&client, json).await?;
        tokio::time::sleep(Duration::from_secs_f64(every)).await;
    }
}

async fn print_stats(client: &Client, json: bool) -> anyhow::Result<()> {
    let stats = client.stats().await?;
    if json {
        for s in stats {
            out!(
                "{}",
                serde_json::json!({"tenant": s.tenant, "queues": s.queues, "ready": s.ready, "unacked": s.unacked,
                    "bytes": s.bytes, "published": s.published, "delivered": s.delivered, "plugins": s.plugins,
                    "plugins_not_running": s.plugins_not_running})
            );
        }
    } else {
        out!(
            "{:<16} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10} {:>7} {:>11}",
            "tenant",
            "queues",
            "ready",
            "unacked",
            "bytes",
            "published",
            "delivered",
            "plugins",
            "not-running"
        );
        for s in stats {
            out!(
                "{:<16} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10} {:>7} {:>11}",
                s.tenant,
                s.queues,
                s.ready,
                s.unacked,
                s.bytes,
                s.published,
                s.delivered,
                s.plugins,
                s.plugins_not_running
            );
        }
    }
    Ok(())
}
