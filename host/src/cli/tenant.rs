//! `sluice tenant ...` (admin identities).

use super::out;
use std::process::ExitCode;

use sluice_client::TenantQuota;

use super::remote::Conn;

/// Quota flags.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct QuotaArgs {
    /// Concurrent connections.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Queues.
    #[arg(long)]
    max_queues: Option<u32>,
    /// Bytes stored across the tenant's queues.
    #[arg(long)]
    max_bytes: Option<u64>,
    /// Published messages per second.
    #[arg(long)]
    max_rate: Option<u32>,
    /// Largest message, bytes.
    #[arg(long)]
    max_message_bytes: Option<u32>,
}

impl QuotaArgs {
    fn quota(&self) -> TenantQuota {
        TenantQuota {
            max_connections: self.max_connections,
            max_queues: self.max_queues,
            max_stored_bytes: self.max_bytes,
            max_publish_rate: self.max_rate,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// `sluice tenant ...`
#[derive(Debug, clap::Args)]
pub(crate) struct TenantArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(subcommand)]
    pub(crate) cmd: TenantCommand,
}

/// Tenant subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantCommand {
    /// Register a tenant (or replace its limits).
    Create {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List registered tenants with usage.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete a tenant: closes its connections, removes its queues, messages and plugins.
    Delete {
        /// Tenant name.
        name: String,
    },
    /// Replace a tenant's limits (unset flags mean unlimited).
    Limits {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
}

fn show(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub(crate) async fn run(conn: &Conn, cmd: TenantCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    match cmd {
        TenantCommand::Create { name, quota } => {
            client.create_tenant(&name, quota.quota()).await?;
            out!("tenant `{name}` registered");
        }
        TenantCommand::Limits { name, quota } => {
            client.set_tenant_limits(&name, quota.quota()).await?;
            out!("tenant `{name}` limits updated");
        }
        TenantCommand::Delete { name } => {
            client.delete_tenant(&name).await?;
            out!("tenant `{name}` deleted");
        }
        TenantCommand::List { json } => {
            let tenants = client.list_tenants().await?;
            if json {
                for t in tenants {
                    let l = &t.limits;
                    out!(
                        "{}",
                        serde_json::json!({"tenant": t.name, "connections": t.connections, "queues": t.queues, "bytes": t.bytes,
                            "limits": {"max_connections": l.max_connections, "max_queues": l.max_queues,
                                "max_bytes": l.max_stored_bytes, "max_rate": l.max_publish_rate, "max_message_bytes": l.max_message_bytes}})
                    );
                }
            } else {
                out!(
                    "{:<16} {:>6} {:>7} {:>12}  limits (conn/queues/bytes/rate/msg)",
                    "tenant",
                    "conns",
                    "queues",
                    "bytes"
                );
                for t in tenants {
                    let l = &t.limits;
                    out!(
                        "{:<16} {:>6} {:>7} {:>12}  {}/{}/{}/{}/{}",
                        t.name,
                        t.connections,
                        t.queues,
                        t.bytes,
                        show(l.max_connections),
                        show(l.max_queues),
                        show(l.max_stored_bytes),
                        show(l.max_publish_rate),
                        show(l.max_message_bytes)
                    );
                }
            }
        }
    }
    client.close();
    Ok(ExitCode::SUCCESS)
}
