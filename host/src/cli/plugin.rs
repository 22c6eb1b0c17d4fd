//! `sluice plugin ...`: offline plugin testing.

use super::out;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::plugins::{
    Action, Decision, FilterVerdict, Message, PluginKind, PluginRuntime, PluginSpec, Principal,
    Resource, SandboxConfig,
};

/// `sluice plugin ...`
#[derive(Debug, clap::Args)]
pub(crate) struct PluginArgs {
    #[command(flatten)]
    pub(crate) conn: super::remote::Conn,
    #[command(subcommand)]
    pub(crate) cmd: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PluginCommand {
    /// Create a plugin crate from a template (inside a Sluice checkout's
    /// `plugins/` folder it joins the workspace).
    New {
        /// Folder to create; its name is the crate name.
        path: PathBuf,
        /// router, filter or authorizer.
        #[arg(long)]
        kind: PluginKind,
        /// The `sdk/plugin` folder of a Sluice checkout [default: the one this binary was built from].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Load (or hot-swap) a plugin into the running broker.
    Load {
        /// The component (.wasm).
        file: PathBuf,
        /// router, filter or authorizer.
        #[arg(long)]
        kind: PluginKind,
        /// Queue a filter is attached to.
        #[arg(long)]
        queue: Option<String>,
        /// Name inside the tenant [default: the file name].
        #[arg(long)]
        name: Option<String>,
        /// Configuration passed to init (repeatable).
        #[arg(long = "config", value_name = "K=V", value_parser = super::parse_kv)]
        config: Vec<(String, String)>,
    },
    /// List the tenant's plugins.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Unload a plugin.
    Unload {
        /// Plugin name.
        name: String,
    },
    /// Run a plugin offline on one sample message and report its verdict,
    /// time and failures (no broker needed).
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// router, filter or authorizer.
        #[arg(long)]
        kind: PluginKind,
        /// Topic of the sample message.
        #[arg(long, default_value = "test.topic")]
        topic: String,
        /// Header of the sample message (repeatable).
        #[arg(long = "header", value_name = "K=V", value_parser = super::parse_kv)]
        headers: Vec<(String, String)>,
        /// Payload text, or @FILE to read it from a file.
        #[arg(long, default_value = "")]
        payload: String,
        /// Configuration passed to init (repeatable).
        #[arg(long = "config", value_name = "K=V", value_parser = super::parse_kv)]
        config: Vec<(String, String)>,
        /// Candidate queues given to a router (repeatable).
        #[arg(long = "candidate", value_name = "QUEUE")]
        candidates: Vec<String>,
        /// For an authorizer: the client asking.
        #[arg(long, default_value = "client")]
        client: String,
        /// For an authorizer: the action (connect, publish, subscribe, declare, bind, delete, purge, admin, manage-policy).
        #[arg(long, default_value = "publish")]
        action: String,
        /// The call's deadline in CPU time, as `plugin_deadline_ms` gives
        /// it in the broker.
        #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        deadline_ms: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    conn: &super::remote::Conn,
    cmd: PluginCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginCommand::New { path, kind, sdk } => {
            out!(
                "{}",
                super::scaffold::new_plugin(&path, kind, sdk.as_deref())?
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Load {
            file,
            kind,
            queue,
            name,
            config,
        } => {
            let wasm =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let name = name.unwrap_or_else(|| default_name(&file));
            let client = conn.connect().await?;
            client
                .load_plugin(&name, kind.as_str(), queue.as_deref(), wasm, config)
                .await?;
            out!(
                "plugin `{name}` loaded ({kind}{})",
                queue
                    .map(|q| format!(" on queue `{q}`"))
                    .unwrap_or_default()
            );
            client.close();
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::List { json } => {
            let client = conn.connect().await?;
            let plugins = client.list_plugins().await?;
            if json {
                for p in plugins {
                    out!(
                        "{}",
                        serde_json::json!({"name": p.name, "kind": p.kind, "queue": p.queue, "abi": p.abi, "state": p.state,
                            "calls": p.calls, "errors": p.errors, "traps": p.traps, "mean_ns": p.mean_ns})
                    );
                }
            } else {
                out!(
                    "{:<20} {:<10} {:<16} {:<6} {:>8} {:>7} {:>6} {:>9}  state",
                    "plugin",
                    "kind",
                    "queue",
                    "abi",
                    "calls",
                    "errors",
                    "traps",
                    "mean µs"
                );
                for p in plugins {
                    out!(
                        "{:<20} {:<10} {:<16} {:<6} {:>8} {:>7} {:>6} {:>9.2}  {}",
                        p.name,
                        p.kind,
                        p.queue.unwrap_or_default(),
                        p.abi,
                        p.calls,
                        p.errors,
                        p.traps,
                        p.mean_ns as f64 / 1000.0,
                        p.state
                    );
                }
            }
            client.close();
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Unload { name } => {
            let client = conn.connect().await?;
            client.unload_plugin(&name).await?;
            out!("plugin `{name}` unloaded");
            client.close();
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test {
            file,
            kind,
            topic,
            headers,
            payload,
            config,
            candidates,
            client,
            action,
            deadline_ms,
            json,
        } => {
            let wasm =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let payload = match payload.strip_prefix('@') {
                Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
                None => payload.into_bytes(),
            };
            let runtime = PluginRuntime::new(SandboxConfig {
                call_deadline: std::time::Duration::from_millis(deadline_ms),
                // One call, alone: its time is what the author measures, so
                // the broker's throttle of long calls (fairness between
                // tenants) stays off.
                throttle_percent: 100,
                ..SandboxConfig::default()
            })?;
            let name = default_name(&file);
            let plugin = runtime.load(PluginSpec {
                tenant: "test".into(),
                name,
                kind,
                wasm,
                config,
            })?;
            let msg = Message {
                topic: topic.clone(),
                headers,
                payload,
                tenant: "test".into(),
                client: client.clone(),
                timestamp_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                redelivery_count: 0,
            };
            let start = Instant::now();
            let (verdict, detail) = match kind {
                PluginKind::Router => {
                    let targets = plugin.route(&msg, &candidates)?;
                    ("route", serde_json::json!({ "targets": targets }))
                }
                PluginKind::Filter => match plugin.filter(&msg)? {
                    FilterVerdict::Accept => ("accept", serde_json::json!({})),
                    FilterVerdict::Drop(reason) => {
                        ("drop", serde_json::json!({ "reason": reason }))
                    }
                    FilterVerdict::Replace(r) => (
                        "replace",
                        serde_json::json!({
                            "headers": r.headers,
                            "payload": String::from_utf8_lossy(&r.payload),
                        }),
                    ),
                },
                PluginKind::Authorizer => {
                    let who = Principal {
                        tenant: "test".into(),
                        client: client.clone(),
                        subject: format!("CN={client},O=test"),
                        sans: vec![],
                        admin: false,
                    };
                    let action = parse_action(&action)?;
                    match plugin.authorize(&who, action, &Resource::Topic(topic))? {
                        Decision::Allow => ("allow", serde_json::json!({})),
                        Decision::Deny(reason) => ("deny", serde_json::json!({ "reason": reason })),
                    }
                }
            };
            let micros = start.elapsed().as_secs_f64() * 1e6;
            let memory_kib = plugin.metrics().peak_memory_bytes / 1024;
            if json {
                out!(
                    "{}",
                    serde_json::json!({ "verdict": verdict, "detail": detail, "micros": micros, "memory_kib": memory_kib })
                );
            } else {
                out!("verdict: {verdict}");
                if detail.as_object().is_some_and(|o| !o.is_empty()) {
                    out!("detail:  {detail}");
                }
                out!("time:    {micros:.1} µs");
                out!("memory:  {memory_kib} KiB (linear memory, peak)");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A plugin's default name: its file name without `.wasm`, `_` as `-`.
fn default_name(file: &std::path::Path) -> String {
    file.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .replace('_', "-")
}

fn parse_action(s: &str) -> anyhow::Result<Action> {
    Ok(match s {
        "connect" => Action::Connect,
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "declare" => Action::Declare,
        "bind" => Action::Bind,
        "delete" => Action::Delete,
        "purge" => Action::Purge,
        "admin" => Action::Admin,
        "manage-policy" => Action::ManagePolicy,
        other => bail!("unknown action `{other}`"),
    })
}
