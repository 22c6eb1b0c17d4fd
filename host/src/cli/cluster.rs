//! `sluice cluster ...` (admin identities).

use super::out;
use std::process::ExitCode;

use super::remote::Conn;

/// `sluice cluster ...`
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(subcommand)]
    pub(crate) cmd: ClusterCommand,
}

/// Cluster subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClusterCommand {
    /// The replicated group as its leader sees it: members, leader and
    /// term, commit and applied index, each follower's lag (give every
    /// node in --server: the leader is found).
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Hand the leadership to node N (e.g. before restarting the leader):
    /// waits until N leads, then says so.
    Transfer {
        /// The member to lead next.
        #[arg(value_name = "N")]
        to: u64,
    },
}

pub(crate) async fn run(conn: &Conn, cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    match cmd {
        ClusterCommand::Transfer { to } => {
            match client.transfer_leadership(to).await {
                Ok(()) => {}
                // The old leader's term ended while it answered.
                Err(e) if e.failed_over() => {}
                Err(e) => return Err(e.into()),
            }
            client.close();
            let client = conn.connect_leader().await?;
            let s = client.cluster_status().await?;
            client.close();
            anyhow::ensure!(
                s.leader == Some(to),
                "node {} leads (term {}), not node {to}",
                s.leader.map_or("none".into(), |l| l.to_string()),
                s.term
            );
            out!("node {to} leads (term {})", s.term);
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::Status { json } => {
            let s = client.cluster_status().await?;
            if json {
                let followers: Vec<_> = s
                    .followers
                    .iter()
                    .map(
                        |f| serde_json::json!({"node": f.node, "matched": f.matched, "lag": f.lag}),
                    )
                    .collect();
                out!(
                    "{}",
                    serde_json::json!({
                        "node": s.node, "role": s.role, "term": s.term, "leader": s.leader,
                        "last_log": s.last_log, "committed": s.committed, "applied": s.applied,
                        "snapshot": s.snapshot, "purged": s.purged,
                        "members": s.members, "followers": followers,
                    })
                );
            } else {
                out!(
                    "node {} ({}) term {}, leader {}, members {}",
                    s.node,
                    s.role,
                    s.term,
                    s.leader.map_or("none".into(), |l| l.to_string()),
                    s.members
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                out!(
                    "log {}, committed {}, applied {}, snapshot {}, purged {}",
                    s.last_log,
                    s.committed,
                    s.applied,
                    s.snapshot,
                    s.purged
                );
                out!("{:<8} {:>12} {:>10}", "follower", "matched", "lag");
                for f in &s.followers {
                    out!(
                        "{:<8} {:>12} {:>10}",
                        f.node,
                        f.matched.map_or("none".into(), |m| m.to_string()),
                        f.lag
                    );
                }
            }
        }
    }
    client.close();
    Ok(ExitCode::SUCCESS)
}
