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
    /// Add node N, started with `sluice serve --join`: it is replicated
    /// to as a learner, and votes once it has caught up (waits for that).
    Add {
        /// The new node's id (its certificate: `sluice certs issue --node N`).
        #[arg(value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        node: u64,
        /// Where the other nodes reach its Raft listener (`ip:port`).
        #[arg(long)]
        raft: std::net::SocketAddr,
        /// Where its clients connect (`ip:port`).
        #[arg(long)]
        client: std::net::SocketAddr,
        /// Keep it a learner: replicated to, not voting.
        #[arg(long)]
        learner: bool,
    },
    /// Remove node N (a voter or a learner; the leader hands its
    /// leadership over first). Stop it afterwards; to bring it back, wipe
    /// its directory, start it with --join and add it again.
    Remove {
        /// The member to remove.
        #[arg(value_name = "N")]
        node: u64,
    },
}

/// The members as the leader sees them now, for a line of output.
async fn members(conn: &Conn) -> anyhow::Result<String> {
    let client = conn.connect_leader().await?;
    let s = client.cluster_status().await?;
    client.close();
    Ok(format!("members {}", member_list(&s)))
}

/// `1, 2, 3` (and `learners 4` when there are).
fn member_list(s: &sluice_proto::ClusterSummary) -> String {
    let ids = |ids: &[u64]| {
        ids.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = ids(&s.members);
    if !s.learners.is_empty() {
        text += &format!(", learners {}", ids(&s.learners));
    }
    text
}

pub(crate) async fn run(conn: &Conn, cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    match cmd {
        ClusterCommand::Add {
            node,
            raft,
            client: at,
            learner,
        } => {
            client
                .add_node(node, &raft.to_string(), &at.to_string(), learner)
                .await?;
            client.close();
            let s = members(conn).await?;
            out!(
                "node {node} added as a {}; {s}",
                if learner { "learner" } else { "voter" }
            );
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::Remove { node } => {
            match client.remove_node(node).await {
                Ok(()) => {}
                // The removed leader handed its leadership over.
                Err(e) if e.failed_over() => {}
                Err(e) => return Err(e.into()),
            }
            client.close();
            let s = members(conn).await?;
            out!("node {node} removed; {s}");
            return Ok(ExitCode::SUCCESS);
        }
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
                        "members": s.members, "learners": s.learners, "followers": followers,
                    })
                );
            } else {
                out!(
                    "node {} ({}) term {}, leader {}, members {}",
                    s.node,
                    s.role,
                    s.term,
                    s.leader.map_or("none".into(), |l| l.to_string()),
                    member_list(&s)
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
