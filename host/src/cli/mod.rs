//! The `sluice` command line. Every error is printed as one readable line on
//! stderr with a non-zero exit code.

mod bench;
mod cluster;
mod demo;
mod plugin;
mod remote;
mod scaffold;
mod serve;
mod tenant;

pub use serve::{Running, start};

/// Print a line on stdout. A closed stdout (`sluice consume ... | head -2`)
/// ends the command quietly: the error unwinds to [`main`], which closes
/// the broker connections and exits with 141, as a Unix tool killed by
/// SIGPIPE would, without a message.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            return Err($crate::cli::StdoutClosed(e).into());
        }
    }};
}
pub(crate) use out;

/// Print a line on stdout, ignoring a closed stdout (for `serve`, whose job
/// is not its output).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use say;

/// stdout was closed by the reader.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed: {0}")]
pub(crate) struct StdoutClosed(std::io::Error);

/// Every broker connection the command opened, closed (and the close sent)
/// on any exit path, so the broker requeues what they held at once.
static OPEN: std::sync::Mutex<Vec<sluice_client::Client>> = std::sync::Mutex::new(Vec::new());

/// Remember `client` for [`close_all`].
pub(crate) fn track(client: &sluice_client::Client) {
    OPEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(client.clone());
}

async fn close_all() {
    let clients: Vec<_> = std::mem::take(&mut *OPEN.lock().unwrap_or_else(|p| p.into_inner()));
    for c in clients {
        c.shutdown().await;
    }
}

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sluice: a message broker with sandboxed wasm policies.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Create development certificates and client identities.
    #[command(subcommand)]
    Certs(serve::CertsCommand),
    /// Run an in-process broker with two tenants and show each policy at work.
    Demo,
    /// Manage queues.
    Queue(remote::QueueArgs),
    /// Publish messages.
    Publish(remote::PublishArgs),
    /// Consume messages (each is acked unless --nack or --reject).
    Consume(remote::ConsumeArgs),
    /// Work with policy plugins.
    Plugin(plugin::PluginArgs),
    /// Per-tenant usage.
    Stats(remote::StatsArgs),
    /// Manage tenants and their quotas (admin identities).
    Tenant(tenant::TenantArgs),
    /// Load a running broker and report throughput and end-to-end latency.
    Bench(bench::BenchArgs),
    /// A replicated cluster's state (admin identities).
    Cluster(cluster::ClusterArgs),
}

/// Parse the arguments, run the command, and turn any error into one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo provokes plugin failures on purpose; its table reports them.
    // `plugin test` shows the plugin's own log lines.
    init_tracing(match &cli.command {
        Command::Demo => "error",
        Command::Plugin(p) if matches!(p.cmd, plugin::PluginCommand::Test { .. }) => {
            "warn,sluice::plugin=trace"
        }
        // openraft warns at every failed heartbeat (ten a second while a
        // peer is down); a node's own lines say when it leads or stops.
        _ => "warn,openraft=error,sluice::cluster=info",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let result = match cli.command {
            Command::Serve(args) => serve::serve(args).await.map(|()| ExitCode::SUCCESS),
            Command::Certs(cmd) => serve::certs(cmd).map(|()| ExitCode::SUCCESS),
            Command::Demo => demo::run().await,
            Command::Queue(args) => remote::queue(&args.conn, args.cmd).await,
            Command::Publish(args) => remote::publish(args).await,
            Command::Consume(args) => remote::consume(args).await,
            Command::Plugin(args) => plugin::run(&args.conn, args.cmd).await,
            Command::Stats(args) => remote::stats(&args.conn, args.json, args.watch).await,
            Command::Tenant(args) => tenant::run(&args.conn, args.cmd).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Cluster(args) => cluster::run(&args.conn, args.cmd).await,
        };
        close_all().await;
        result
    });
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A `K=V` command-line argument (headers, plugin config).
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected K=V, got `{s}`"))
}
