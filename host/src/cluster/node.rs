//! One node of a cluster: the data group's Raft, and the broker it runs
//! while it leads.
//!
//! Every node holds the data group's log (`<data>/raft`) and applies it to
//! its local store (`<data>/store`). The node that leads a term opens a
//! [`Broker`] on a [`ReplicatedStore`] once its term's first entry is
//! applied (so its store holds everything committed before), and serves
//! clients with it; the others refuse clients with `not_leader`, naming
//! the leader's client address. When the term ends the broker stops: its
//! store refuses every later write and its connections are closed, and the
//! clients reconnect to the new leader, which redelivers whatever was not
//! acked and has every confirmed publish.
//!
//! Every node initializes the group with the same membership (the members
//! of its configuration) when its log is empty; openraft allows this, the
//! vote makes one of them leader. From then on the membership in the log
//! is the cluster's: a node started with `join` never initializes, it
//! waits until the leader adds it ([`ClusterControl::add`], as a learner
//! that catches up first, then a voter), and a member removed
//! ([`ClusterControl::remove`]) is no longer replicated to (a removed
//! leader hands its leadership to the most up-to-date voter).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, Raft};
use sluice_proto::{ClusterSummary, FollowerSummary};
use tokio::sync::watch;

use super::Peer;
use super::data::{DataGroup, DataState, StoreBatch};
use super::log::FileLog;
use super::net::{MAX_ENTRIES, QuicNetwork, serve};
use super::store::{
    DataRaft, PROPOSAL_BUCKETS_US, ProposalTimes, ReplicatedStore, client_of, leader_of, leads,
};
use crate::broker::{Broker, BrokerConfig, ClusterControl, ClusterFuture, NewMember};
use crate::server::Serving;
use crate::store::{MessageStore, Store, StoreConfig, StoreError};
use crate::tls::NodeTls;

/// How long a new leader waits for its term's first entry to apply
/// before it tries again.
const LEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Most nodes of a cluster, voters and learners.
pub const MAX_MEMBERS: usize = 7;

/// How long a node being added may go without catching up further
/// before it is left a learner (and the add reports why).
const CATCH_UP_STALL: Duration = Duration::from_secs(60);

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Where other nodes reach its Raft listener (node to node, QUIC with
    /// the cluster CA).
    pub raft: SocketAddr,
    /// Where that listener binds: `raft`, unless peers reach it through a
    /// proxy or a NAT.
    pub raft_listen: SocketAddr,
    /// Where its clients connect (told to clients in `not_leader`).
    pub client: SocketAddr,
}

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// This node's id (at least 1).
    pub id: u64,
    /// Every member, this node included (only this node's entry is read
    /// once the log holds a membership, or when `join` is set).
    pub members: BTreeMap<u64, Member>,
    /// This node joins a running cluster: it never forms a group of its
    /// own, it waits to be added (`sluice cluster add`).
    pub join: bool,
    /// The node identity folder (`sluice certs init --node N` writes
    /// `cluster/node-N/`).
    pub identity: PathBuf,
    /// The data directory (`raft/` and `store/` in it).
    pub dir: PathBuf,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout (the lower bound; the upper is twice it).
    pub election_timeout: Duration,
    /// Log entries between two snapshots of the store; the log before a
    /// snapshot is purged (but `log_kept` entries).
    pub snapshot_every: u64,
    /// Entries a snapshot covers that stay in the log, so a follower a
    /// little behind catches up from the log, not a snapshot.
    pub log_kept: u64,
}

impl NodeSettings {
    /// This node's own entry.
    fn me(&self) -> anyhow::Result<&Member> {
        self.members
            .get(&self.id)
            .with_context(|| format!("node {} is not among the cluster's members", self.id))
    }
}

/// What a new leader's broker must do before it serves (register the
/// configuration's tenants, say); runs on a blocking thread.
pub type OnLead = Arc<dyn Fn(&Broker) -> anyhow::Result<()> + Send + Sync>;

/// A running node.
pub struct Node {
    raft: DataRaft,
    state: DataState,
    endpoint: quinn::Endpoint,
    serving: watch::Receiver<Serving>,
    lead: tokio::task::JoinHandle<()>,
    measures: Arc<Measures>,
}

/// What a node counts about its group, for its metrics.
#[derive(Debug, Default)]
pub struct Measures {
    /// Proposals of this node's terms as leader, from proposing to applied.
    proposals: Arc<ProposalTimes>,
    /// Times this node saw the leader change (a new leader, or none).
    leader_changes: AtomicU64,
    /// Terms this node led and served clients in.
    terms_led: AtomicU64,
}

impl Node {
    /// Open the node's log and store, listen for its peers, join (or
    /// form) the group, and follow its leadership: `config` is the broker
    /// run while this node leads (its `store` is not used; its `cluster`
    /// is set to this node's status). Needs a tokio runtime.
    pub async fn start(
        settings: &NodeSettings,
        config: BrokerConfig,
        on_lead: OnLead,
    ) -> anyhow::Result<Node> {
        let me = settings.me()?.clone();
        let raft_config = openraft::Config {
            cluster_name: "sluice".into(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: settings.election_timeout.as_millis() as u64,
            election_timeout_max: 2 * settings.election_timeout.as_millis() as u64,
            max_payload_entries: MAX_ENTRIES,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.log_kept,
            // Purged a segment at a time by the log anyway.
            purge_batch_size: 256,
            // A node cut off and back does not disturb a healthy leader
            // with the terms it counted up alone.
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .context("cluster timings")?;
        let tls = NodeTls::from_dir(&settings.identity);
        let server = tls
            .server_config()
            .with_context(|| format!("node identity {}", settings.identity.display()))?;
        let endpoint = quinn::Endpoint::server(server, me.raft_listen)
            .with_context(|| format!("cannot listen for cluster peers on {}", me.raft_listen))?;
        let net = QuicNetwork::new(
            endpoint.clone(),
            tls.client_config()
                .with_context(|| format!("node identity {}", settings.identity.display()))?,
        );
        let raft_dir = settings.dir.join("raft");
        anyhow::ensure!(
            !raft_dir.join("db").exists(),
            "{}: a raft log in sled, an earlier format; start this node from an empty directory",
            raft_dir.display()
        );
        let log = FileLog::<DataGroup>::open(&raft_dir, "data").context("opening the raft log")?;
        let store_config = StoreConfig {
            dir: settings.dir.join("store"),
            // Applied from the log, which is the durable copy: what a crash
            // takes from the store is applied again (see DataState).
            atomic_batches: false,
            ..config.store.clone()
        };
        let store = Arc::new(Store::open(&store_config).context("opening the node's store")?);
        let state = DataState::open(store, &raft_dir.join("snapshots"))
            .context("opening the node's snapshots")?;
        let raft = Raft::new(settings.id, Arc::new(raft_config), net, log, state.clone())
            .await
            .context("starting raft")?;
        tokio::spawn(serve(endpoint.clone(), raft.clone(), state.spool()));
        let members: BTreeMap<u64, Peer> = settings
            .members
            .iter()
            .map(|(id, m)| (*id, peer(m)))
            .collect();
        let initialized = raft
            .is_initialized()
            .await
            .context("reading the raft log")?;
        if initialized {
            let known = raft.metrics().borrow_watched().membership_config.clone();
            let known: BTreeMap<u64, Peer> = known
                .membership()
                .nodes()
                .map(|(id, p)| (*id, p.clone()))
                .collect();
            if known != members && !settings.join {
                tracing::info!(
                    node = settings.id,
                    members = ?known.keys().collect::<Vec<_>>(),
                    "the log's membership differs from the configuration's members; the log's is the cluster's"
                );
            }
        } else if settings.join {
            tracing::info!(
                node = settings.id,
                "joining: waiting to be added by the leader (`sluice cluster add {} --raft {} --client {}`)",
                settings.id,
                me.raft,
                me.client
            );
        } else {
            // Every node with an empty log proposes the same membership.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "not initializing the group");
            }
        }
        let mut config = config;
        config.cluster = Some(ClusterControl {
            status: Arc::new(status_source(&raft)),
            transfer: Arc::new(transfer(&raft, settings.id)),
            add: Arc::new(add(&raft, settings.id)),
            remove: Arc::new(remove(&raft, settings.id)),
        });
        let (tx, serving) = watch::channel(Serving::NotLeader(None));
        let measures = Arc::new(Measures::default());
        let lead = tokio::spawn(lead(Leading {
            measures: measures.clone(),
            raft: raft.clone(),
            state: state.clone(),
            id: settings.id,
            config,
            on_lead,
            tx,
            lease: 2 * settings.election_timeout,
            heartbeat: settings.heartbeat,
        }));
        Ok(Node {
            raft,
            state,
            endpoint,
            serving,
            lead,
            measures,
        })
    }

    /// What serves this node's clients now, and as it changes.
    pub fn serving(&self) -> watch::Receiver<Serving> {
        self.serving.clone()
    }

    /// This node's group metrics in Prometheus text, read each time it is
    /// called (for the metrics endpoint).
    pub fn prometheus_source(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let (status, measures) = (status_source(&self.raft), self.measures.clone());
        move || prometheus(&status(), &measures)
    }

    /// Stop the broker (if leading) and the group on this node, and make
    /// what this node applied durable (so the next start applies less
    /// again; the log alone would do).
    pub async fn shutdown(self) {
        self.lead.abort();
        let _ = self.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"node shutting down");
        let store = self.state.store().clone();
        match tokio::task::spawn_blocking(move || store.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "syncing the node's store at shutdown"),
            Err(e) => tracing::warn!(error = %e, "syncing the node's store at shutdown"),
        }
    }
}

/// How a configured member is recorded in the membership.
fn peer(m: &Member) -> Peer {
    Peer {
        raft: m.raft.to_string(),
        client: m.client.to_string(),
    }
}

/// Hand the leadership of `raft` (led by node `id`) to a member, and wait
/// until it leads or the handover fails.
fn transfer(raft: &DataRaft, id: u64) -> impl Fn(u64) -> ClusterFuture + Send + Sync + 'static {
    let raft = raft.clone();
    move |to| {
        let raft = raft.clone();
        Box::pin(async move {
            let (term, leader, voter) = {
                let m = raft.metrics().borrow_watched().clone();
                let voter = m.membership_config.voter_ids().any(|v| v == to);
                (m.current_term, leader_of(&m), voter)
            };
            if leader != Some(id) {
                return Err(format!("node {id} is not the leader"));
            }
            if !voter {
                return Err(format!("node {to} is not a member of the cluster"));
            }
            if to == id {
                return Err(format!("node {to} leads already"));
            }
            raft.trigger()
                .transfer_leader(to)
                .await
                .map_err(|e| format!("transfer to node {to}: {e}"))?;
            // Handed over once a newer term has a leader: `to`, or (the
            // transfer raced an election) another node.
            let mut metrics = raft.metrics();
            let waited = tokio::time::timeout(TRANSFER_TIMEOUT, async {
                loop {
                    let now = {
                        let m = metrics.borrow_watched();
                        (m.current_term > term).then_some(leader_of(&m)).flatten()
                    };
                    if let Some(now) = now {
                        return now;
                    }
                    if metrics.changed().await.is_err() {
                        return id;
                    }
                }
            })
            .await;
            match waited {
                Ok(now) if now == to => Ok(()),
                Ok(now) => Err(format!(
                    "node {now} was elected instead of node {to}; ask again"
                )),
                Err(_) => Err(format!(
                    "node {to} did not take over within {} s (is it up and caught up?)",
                    TRANSFER_TIMEOUT.as_secs()
                )),
            }
        }) as ClusterFuture
    }
}

/// How long a leadership transfer may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuse a membership change asked of a node that does not lead.
fn leading(raft: &DataRaft, id: u64) -> Result<openraft::RaftMetrics<DataGroup>, String> {
    let m = raft.metrics().borrow_watched().clone();
    if leader_of(&m) != Some(id) {
        return Err(format!(
            "node {id} is not the leader{}",
            leader_of(&m).map_or(String::new(), |l| format!(" (node {l} is)"))
        ));
    }
    Ok(m)
}

/// A socket address as the membership records it.
fn address(what: &str, text: &str) -> Result<String, String> {
    text.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| format!("{what} address `{text}`: expected host-ip:port"))
}

/// Add a node to the group `raft` (led by node `id`): as a learner, and,
/// once it has caught up, as a voter (unless only a learner is asked).
fn add(raft: &DataRaft, id: u64) -> impl Fn(NewMember) -> ClusterFuture + Send + Sync + 'static {
    let raft = raft.clone();
    move |new| {
        let raft = raft.clone();
        Box::pin(async move {
            let node = new.node;
            if node == 0 {
                return Err("node ids start at 1".into());
            }
            let peer = Peer {
                raft: address("raft", &new.raft)?,
                client: address("client", &new.client)?,
            };
            let m = leading(&raft, id)?;
            let membership = m.membership_config.membership();
            let voter = m.membership_config.voter_ids().any(|v| v == node);
            match membership.get_node(&node) {
                Some(known) if *known != peer => {
                    return Err(format!(
                        "node {node} is a member already ({known}); remove it first to change its addresses"
                    ));
                }
                Some(_) if voter => return Err(format!("node {node} is a voter already")),
                // A learner: caught up and promoted below.
                Some(_) => {}
                None => {
                    if membership.nodes().count() >= MAX_MEMBERS {
                        return Err(format!(
                            "the cluster has {MAX_MEMBERS} nodes, the most it may have"
                        ));
                    }
                    if let Some((other, _)) = membership
                        .nodes()
                        .find(|(_, p)| p.raft == peer.raft || p.client == peer.client)
                    {
                        return Err(format!(
                            "node {other} has one of the addresses ({peer}) already"
                        ));
                    }
                    raft.add_learner(node, peer, false)
                        .await
                        .map_err(|e| format!("adding node {node}: {e}"))?;
                }
            }
            if new.learner {
                return Ok(());
            }
            caught_up(&raft, id, node).await?;
            raft.change_membership(ChangeMembers::AddVoterIds([node].into()), false)
                .await
                .map_err(|e| format!("making node {node} a voter: {e}"))?;
            Ok(())
        }) as ClusterFuture
    }
}

/// Wait until the learner `node` holds the log of leader `id` up to its
/// last entry as of now; fail if it stops catching up (for
/// [`CATCH_UP_STALL`]) or the leadership changes.
async fn caught_up(raft: &DataRaft, id: u64, node: u64) -> Result<(), String> {
    let mut metrics = raft.metrics();
    let target = metrics.borrow_watched().last_log_index.unwrap_or(0);
    let mut best = None;
    let mut since = tokio::time::Instant::now();
    loop {
        let (leads, matched) = {
            let m = metrics.borrow_watched();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&node))
                .and_then(|l| l.as_ref().map(|l| l.index()));
            (leader_of(&m) == Some(id), matched)
        };
        if !leads {
            return Err(format!(
                "node {id} stopped leading while node {node} caught up; it is a learner: add it again on the new leader"
            ));
        }
        if matched.is_some_and(|i| i >= target) {
            return Ok(());
        }
        if matched > best {
            (best, since) = (matched, tokio::time::Instant::now());
        }
        let left = CATCH_UP_STALL.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the node is shutting down".into()),
            Err(_) => {
                return Err(format!(
                    "node {node} is a learner but has not caught up (at {} of {target}) for {} s: is it running (`sluice serve --join`) and reachable at its raft address? `cluster add` it again to go on waiting, or `cluster remove` it",
                    best.map_or("nothing".into(), |b| b.to_string()),
                    CATCH_UP_STALL.as_secs()
                ));
            }
        }
    }
}

/// Remove a node from the group `raft` (led by node `id`): a voter (the
/// leader too, which then hands its leadership over) or a learner.
fn remove(raft: &DataRaft, id: u64) -> impl Fn(u64) -> ClusterFuture + Send + Sync + 'static {
    let raft = raft.clone();
    move |node| {
        let raft = raft.clone();
        Box::pin(async move {
            let m = leading(&raft, id)?;
            if m.membership_config.membership().get_node(&node).is_none() {
                return Err(format!("node {node} is not a member of the cluster"));
            }
            let voters: Vec<u64> = m.membership_config.voter_ids().collect();
            let change = if voters.contains(&node) {
                if voters.len() == 1 {
                    return Err(format!("node {node} is the cluster's last voter"));
                }
                ChangeMembers::RemoveVoters([node].into())
            } else {
                ChangeMembers::RemoveNodes([node].into())
            };
            raft.change_membership(change, false)
                .await
                .map_err(|e| format!("removing node {node}: {e}"))?;
            Ok(())
        }) as ClusterFuture
    }
}

/// Reads the data group as `raft`'s node sees it: the answer to
/// `cluster_status` (followers' lags are known on the leader only).
fn status_source(raft: &DataRaft) -> impl Fn() -> ClusterSummary + Send + Sync + 'static {
    let raft = raft.clone();
    move || {
        let m = raft.metrics();
        let m = m.borrow_watched();
        let index = |l: &Option<openraft::type_config::alias::LogIdOf<DataGroup>>| {
            l.as_ref().map_or(0, |l| l.index())
        };
        let last_log = m.last_log_index.unwrap_or(0);
        ClusterSummary {
            node: m.id,
            role: match m.state {
                openraft::ServerState::Leader => "leader",
                openraft::ServerState::Follower => "follower",
                openraft::ServerState::Candidate => "candidate",
                openraft::ServerState::Learner => "learner",
                openraft::ServerState::Shutdown => "shutdown",
            }
            .into(),
            term: m.current_term,
            leader: leader_of(&m),
            last_log,
            committed: index(&m.cluster_committed),
            applied: index(&m.last_applied),
            snapshot: index(&m.snapshot),
            purged: index(&m.purged),
            members: m.membership_config.voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            followers: m
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, l)| {
                    let matched = l.as_ref().map(|l| l.index());
                    FollowerSummary {
                        node: *id,
                        matched,
                        lag: last_log.saturating_sub(matched.unwrap_or(0)),
                    }
                })
                .collect(),
        }
    }
}

/// Prometheus text for a node's view of its group.
pub fn prometheus(s: &ClusterSummary, m: &Measures) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let metric = |out: &mut String, kind: &str, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let gauge =
        |out: &mut String, name: &str, help: &str, v: u64| metric(out, "gauge", name, help, v);
    let counter =
        |out: &mut String, name: &str, help: &str, v: u64| metric(out, "counter", name, help, v);
    counter(
        &mut out,
        "sluice_raft_leader_changes_total",
        "Times this node saw the data group's leader change (elections it lived through).",
        m.leader_changes.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "sluice_raft_terms_led_total",
        "Terms this node led and served clients in.",
        m.terms_led.load(Ordering::Relaxed),
    );
    let (counts, sum_us) = m.proposals.read();
    let _ = writeln!(
        out,
        "# HELP sluice_raft_proposal_seconds Time from proposing a log entry (a group commit of store writes) to its commit and apply on this leader.\n# TYPE sluice_raft_proposal_seconds histogram"
    );
    for (le, n) in PROPOSAL_BUCKETS_US.iter().zip(&counts) {
        let le = *le as f64 / 1e6;
        let _ = writeln!(
            out,
            "sluice_raft_proposal_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let total = counts.last().copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "sluice_raft_proposal_seconds_bucket{{le=\"+Inf\"}} {total}\nsluice_raft_proposal_seconds_sum {}\nsluice_raft_proposal_seconds_count {total}",
        sum_us as f64 / 1e6
    );
    gauge(
        &mut out,
        "sluice_raft_term",
        "Current Raft term of the data group (it grows with each election).",
        s.term,
    );
    gauge(
        &mut out,
        "sluice_raft_leader",
        "Node id of the leader this node knows (0: none).",
        s.leader.unwrap_or(0),
    );
    gauge(
        &mut out,
        "sluice_raft_is_leader",
        "1 if this node leads the data group.",
        u64::from(s.role == "leader"),
    );
    gauge(
        &mut out,
        "sluice_raft_last_log_index",
        "Index of the last entry in this node's log.",
        s.last_log,
    );
    gauge(
        &mut out,
        "sluice_raft_committed_index",
        "Index of the last entry this node knows committed.",
        s.committed,
    );
    gauge(
        &mut out,
        "sluice_raft_applied_index",
        "Index of the last entry applied to this node's store.",
        s.applied,
    );
    gauge(
        &mut out,
        "sluice_raft_snapshot_index",
        "Last log index this node's newest snapshot of its store covers (0: none).",
        s.snapshot,
    );
    gauge(
        &mut out,
        "sluice_raft_purged_index",
        "This node's log is purged up to this index (0: nothing purged).",
        s.purged,
    );
    gauge(
        &mut out,
        "sluice_raft_voters",
        "Voting members of the data group, as this node knows its membership.",
        s.members.len() as u64,
    );
    gauge(
        &mut out,
        "sluice_raft_learners",
        "Members replicated to that do not vote (nodes being added).",
        s.learners.len() as u64,
    );
    if !s.followers.is_empty() {
        let _ = writeln!(
            out,
            "# HELP sluice_raft_follower_lag Entries the leader has that a follower is not known to hold.\n# TYPE sluice_raft_follower_lag gauge"
        );
        for f in &s.followers {
            let (id, lag) = (f.node, f.lag);
            let _ = writeln!(out, "sluice_raft_follower_lag{{follower=\"{id}\"}} {lag}");
        }
    }
    out
}

/// The leadership follower's state.
struct Leading {
    measures: Arc<Measures>,
    raft: DataRaft,
    state: DataState,
    id: u64,
    config: BrokerConfig,
    on_lead: OnLead,
    tx: watch::Sender<Serving>,
    /// How long a leader serves without a quorum's acknowledgement
    /// (openraft's leader lease: the longest election timeout).
    lease: Duration,
    /// How often a leader looks at its lease.
    heartbeat: Duration,
}

/// A broker of one term.
struct Term {
    term: u64,
    broker: Broker,
    store: Arc<ReplicatedStore>,
}

/// Follow the group's leadership: run a broker while this node leads a
/// term and a quorum acknowledges it, refuse clients (naming the leader)
/// otherwise.
///
/// A leader cut off from its quorum keeps its term until it hears of a
/// newer one, but cannot commit: once its lease is over (openraft refuses
/// its proposals from then on) it closes its clients' connections and
/// refuses new ones, so they find the majority's leader instead of
/// waiting on confirms that cannot come. It serves again if the quorum
/// answers while the term lasts.
async fn lead(l: Leading) {
    let mut metrics = l.raft.metrics();
    let mut current: Option<Term> = None;
    let mut seen = None;
    loop {
        let (term, leader, quorum) = {
            let m = metrics.borrow_and_update();
            let alone = m.membership_config.voter_ids().count() <= 1;
            let since = m.last_quorum_acked.as_deref().map(|t| t.elapsed());
            let quorum = alone || since.is_none_or(|since| since < l.lease);
            (m.current_term, leader_of(&m), quorum)
        };
        if leader == Some(l.id) && !quorum && current.is_some() {
            tracing::warn!(
                node = l.id,
                term,
                "no quorum acknowledged this leader in time: refusing clients"
            );
        }
        if leader != seen {
            if seen.is_some() || leader.is_some() {
                l.measures.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            seen = leader;
        }
        let leading = leader == Some(l.id) && quorum;
        let leader_addr = leader
            .filter(|n| *n != l.id)
            .and_then(|n| client_of(&l.raft, n));
        if let Some(t) = current.take_if(|t| !leading || t.term != term) {
            // New clients are refused first, then the old ones closed.
            l.tx.send_replace(Serving::NotLeader(leader_addr.clone()));
            t.store.stop(StoreError::NotLeader {
                leader: leader_addr.clone(),
            });
            let closed = t.broker.close_all("this node is no longer the leader");
            tracing::info!(node = l.id, term = t.term, closed, "stopped leading");
        }
        if leading && current.is_none() {
            match open(&l, term).await {
                Ok(t) => {
                    if leads(&l.raft, l.id, term) {
                        tracing::info!(node = l.id, term, "leading: serving clients");
                        l.measures.terms_led.fetch_add(1, Ordering::Relaxed);
                        l.tx.send_replace(Serving::Broker(t.broker.clone()));
                        current = Some(t);
                    } else {
                        t.store.stop(StoreError::NotLeader { leader: None });
                        t.broker.close_all("this node is no longer the leader");
                    }
                }
                Err(e) => {
                    if !leads(&l.raft, l.id, term) {
                        // An election race: another node leads now.
                        tracing::debug!(node = l.id, term, error = %e, "the term ended before the broker opened");
                    } else {
                        tracing::warn!(node = l.id, term, error = %e, "cannot serve as leader yet");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            // Whatever happened meanwhile is read at the top.
            continue;
        }
        if current.is_none() {
            l.tx.send_if_modified(|s| match s {
                Serving::NotLeader(known) if *known == leader_addr => false,
                _ => {
                    *s = Serving::NotLeader(leader_addr.clone());
                    true
                }
            });
        }
        // A leader also looks at its lease now and then: a lost quorum
        // changes no metric.
        let lease_check = async {
            match current {
                Some(_) => tokio::time::sleep(l.heartbeat).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                break;
            },
            () = lease_check => {}
        }
    }
    if let Some(t) = current {
        l.tx.send_replace(Serving::NotLeader(None));
        t.store.stop(StoreError::Closed);
        t.broker.close_all("the node is shutting down");
    }
}

/// Open the broker of `term`: once this node's store has applied
/// everything in its log. An empty entry is proposed and waited for: a
/// leader's log may hold entries committed before a restart that are not
/// applied yet (a node restarted with its own committed vote leads the
/// same term again, without a new blank entry), and a broker opened before
/// they apply would hold a view of the queues they then change.
async fn open(l: &Leading, term: u64) -> anyhow::Result<Term> {
    tokio::time::timeout(LEAD_TIMEOUT, l.raft.client_write(StoreBatch::default()))
        .await
        .context("waiting for the log to apply")?
        .context("confirming leadership")?;
    let store = Arc::new(
        ReplicatedStore::new(l.raft.clone(), &l.state, l.measures.proposals.clone())
            .context("the replicated store")?,
    );
    let (config, on_lead, s) = (l.config.clone(), l.on_lead.clone(), store.clone());
    let opened = tokio::task::spawn_blocking(move || {
        let broker = Broker::open_with_store(config, s).context("opening the broker")?;
        on_lead(&broker)?;
        Ok::<_, anyhow::Error>(broker)
    })
    .await
    .context("opening the broker")?;
    match opened {
        Ok(broker) => Ok(Term {
            term,
            broker,
            store,
        }),
        Err(e) => {
            store.stop(StoreError::Closed);
            Err(e)
        }
    }
}
