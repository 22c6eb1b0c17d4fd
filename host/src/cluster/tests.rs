//! The storage against openraft's conformance suite, and what the suite
//! does not check: durability across a reopen and flushes shared by appends.

use openraft::StorageError;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;

use super::log::FileLog;
use super::meta::MetaState;
use super::{MetaCommand, MetaGroup};

struct Builder;

/// A database that writes out only when asked (no background flush), so
/// what survives a crash is what the storage synced.
fn open(dir: &std::path::Path) -> std::io::Result<(sled::Db, FileLog<MetaGroup>, MetaState)> {
    let db = sled::Config::new()
        .path(dir.join("state"))
        .flush_every_ms(None)
        .open()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let log = FileLog::open(&dir.join("log"), "meta")?;
    let state = MetaState::open(&db, "meta")?;
    Ok((db, log, state))
}

impl StoreBuilder<MetaGroup, FileLog<MetaGroup>, MetaState, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, FileLog<MetaGroup>, MetaState), StorageError<MetaGroup>> {
        let err = |e: std::io::Error| StorageError::read(MetaGroup::err_from_error(&e));
        let dir = tempfile::tempdir().map_err(err)?;
        let (_db, log, state) = open(dir.path()).map_err(err)?;
        Ok((dir, log, state))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_passes_openrafts_suite() {
    Suite::test_all(Builder).await.unwrap();
}

fn entry(index: u64, cmd: MetaCommand) -> openraft::type_config::alias::EntryOf<MetaGroup> {
    use openraft::entry::RaftEntry;
    openraft::type_config::alias::EntryOf::<MetaGroup>::new_normal(
        openraft::testing::log_id::<MetaGroup>(1, 1, index),
        cmd,
    )
}

fn put(key: &str, value: &str) -> MetaCommand {
    MetaCommand::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

/// An append reported flushed, a vote saved and a batch applied are there
/// after the database is closed and opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_reported_durable_survives_a_reopen() {
    use openraft::RaftLogReader;
    let dir = tempfile::tempdir().unwrap();
    {
        let (_db, mut log, mut state) = open(dir.path()).unwrap();
        let (tx, rx) = MetaGroup::oneshot();
        log.append(
            (1..=3).map(|i| entry(i, put(&format!("k{i}"), "v"))),
            IOFlushed::signal(tx),
        )
        .await
        .unwrap();
        rx.await.unwrap().unwrap();
        let vote = openraft::impls::Vote::new(2, 1);
        log.save_vote(&vote).await.unwrap();
        let entries = log
            .get_log_reader()
            .await
            .try_get_log_entries(1..=2)
            .await
            .unwrap();
        state
            .apply(futures::stream::iter(
                entries.into_iter().map(|e| Ok((e, None))),
            ))
            .await
            .unwrap();
    }
    let (_db, mut log, mut state) = open(dir.path()).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id.map(|id| id.index), Some(3));
    assert_eq!(
        log.get_log_reader().await.read_vote().await.unwrap(),
        Some(openraft::impls::Vote::new(2, 1))
    );
    let (applied, _) = state.applied_state().await.unwrap();
    assert_eq!(applied.map(|id| id.index), Some(2));
    assert_eq!(state.get("k2").unwrap(), Some(b"v".to_vec()));
    assert_eq!(state.get("k3").unwrap(), None, "entry 3 was not applied");
}

/// Appends that arrive while the flusher syncs share its next sync, and
/// each is reported only after a sync that started after it was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_their_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, mut log, _state) = open(dir.path()).unwrap();
    let mut waits = Vec::new();
    for i in 1..=200u64 {
        let (tx, rx) = MetaGroup::oneshot();
        log.append([entry(i, put("k", "v"))], IOFlushed::signal(tx))
            .await
            .unwrap();
        waits.push(rx);
    }
    for rx in waits {
        rx.await.unwrap().unwrap();
    }
    let syncs = log.syncs();
    assert!((1..200).contains(&syncs), "{syncs} syncs for 200 appends");
}

const CRASH_DIR: &str = "SLUICE_RAFT_CRASH_DIR";

/// The child of `entries_reported_flushed_survive_kill_9` (ignored: only
/// that test runs it): appends one entry at a time and prints each index
/// once it is reported flushed, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of entries_reported_flushed_survive_kill_9"]
async fn crash_child() {
    use std::io::Write;
    let dir = std::env::var_os(CRASH_DIR).expect("started by its parent test");
    let (_db, mut log, _state) = open(std::path::Path::new(&dir)).unwrap();
    for i in 1.. {
        let (tx, rx) = MetaGroup::oneshot();
        log.append([entry(i, put("k", "v"))], IOFlushed::signal(tx))
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        let mut out = std::io::stdout().lock();
        writeln!(out, "flushed {i}").unwrap();
        out.flush().unwrap();
    }
}

/// Every entry the log reported flushed is there after the process is
/// killed with SIGKILL mid-stream: the callback comes after the sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reported_flushed_survive_kill_9() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "cluster::tests::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reported = 0u64;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(i) = line.unwrap().strip_prefix("flushed ") {
            reported = i.parse().unwrap();
            if reported >= 200 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(reported, 200, "the child stopped early");
    let (_db, mut log, _state) = open(dir.path()).unwrap();
    let last = log
        .get_log_state()
        .await
        .unwrap()
        .last_log_id
        .map(|id| id.index);
    assert!(
        last >= Some(reported),
        "reported {reported} flushed, found {last:?} after the crash"
    );
}

// ------------------------------------------------------------ three nodes

mod three_nodes {
    //! Three nodes, each on its own sled directory, running real openraft
    //! over an in-process transport that encodes every request and response
    //! as it would go on the wire: the storage under real elections,
    //! replication, a lost leader and a node that comes back.

    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
    use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::type_config::alias::{SnapshotOf, VoteOf};
    use openraft::{OptionalSend, Raft};
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::super::meta::MetaState;
    use super::super::{MetaCommand, MetaGroup};
    use super::open;

    type Node = Raft<MetaGroup, MetaState>;

    /// Which nodes are up, by id.
    #[derive(Clone, Default)]
    struct Router(Arc<Mutex<HashMap<u64, Node>>>);

    impl Router {
        fn node(&self, id: u64) -> Result<Node, Unreachable<MetaGroup>> {
            self.0.lock().unwrap().get(&id).cloned().ok_or_else(|| {
                Unreachable::new(&std::io::Error::other(format!("node {id} is down")))
            })
        }
    }

    /// Through the bytes a real transport would carry.
    fn wire<T: Serialize + DeserializeOwned>(value: T) -> T {
        let bytes = serde_json::to_vec(&value).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn down(e: impl std::fmt::Display) -> Unreachable<MetaGroup> {
        Unreachable::new(&std::io::Error::other(e.to_string()))
    }

    struct Link {
        target: u64,
        router: Router,
    }

    impl RaftNetworkFactory<MetaGroup> for Router {
        type Network = Link;

        async fn new_client(&mut self, target: u64, _node: &super::super::Peer) -> Link {
            Link {
                target,
                router: self.clone(),
            }
        }
    }

    impl RaftNetworkV2<MetaGroup> for Link {
        type SnapshotData = std::io::Cursor<Vec<u8>>;

        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<MetaGroup>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<MetaGroup>, RPCError<MetaGroup>> {
            let node = self.router.node(self.target)?;
            let r = node.append_entries(wire(rpc)).await.map_err(down)?;
            Ok(wire(r))
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<MetaGroup>,
            _option: RPCOption,
        ) -> Result<VoteResponse<MetaGroup>, RPCError<MetaGroup>> {
            let node = self.router.node(self.target)?;
            let r = node.vote(wire(rpc)).await.map_err(down)?;
            Ok(wire(r))
        }

        async fn full_snapshot(
            &mut self,
            vote: VoteOf<MetaGroup>,
            snapshot: SnapshotOf<MetaGroup, Self::SnapshotData>,
            _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
            _option: RPCOption,
        ) -> Result<SnapshotResponse<MetaGroup>, StreamingError<MetaGroup>> {
            let node = self.router.node(self.target)?;
            let (vote, meta, data) = wire((vote, snapshot.meta, snapshot.snapshot.into_inner()));
            let snapshot = SnapshotOf::<MetaGroup, Self::SnapshotData> {
                meta,
                snapshot: std::io::Cursor::new(data),
            };
            let r = node
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(down)?;
            Ok(wire(r))
        }
    }

    struct Cluster {
        router: Router,
        dirs: HashMap<u64, tempfile::TempDir>,
        states: HashMap<u64, MetaState>,
        config: Arc<openraft::Config>,
    }

    impl Cluster {
        fn new() -> Self {
            let config = openraft::Config {
                // Timers for a busy 2-core machine (API-NOTES): no
                // spurious elections while tests run beside.
                heartbeat_interval: 100,
                election_timeout_min: 1000,
                election_timeout_max: 2000,
                ..Default::default()
            };
            Self {
                router: Router::default(),
                dirs: HashMap::new(),
                states: HashMap::new(),
                config: Arc::new(config.validate().unwrap()),
            }
        }

        /// Start node `id` on its directory (a new one the first time).
        async fn start(&mut self, id: u64) {
            let dir = self
                .dirs
                .entry(id)
                .or_insert_with(|| tempfile::tempdir().unwrap());
            // A stopped node's database is closed once openraft's tasks
            // have dropped it.
            let mut tries = 0;
            let (_db, log, state) = loop {
                match open(dir.path()) {
                    Ok(x) => break x,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("reopen node {id}: {e}"),
                }
            };
            let raft = Raft::new(
                id,
                self.config.clone(),
                self.router.clone(),
                log,
                state.clone(),
            )
            .await
            .unwrap();
            self.states.insert(id, state);
            self.router.0.lock().unwrap().insert(id, raft);
        }

        async fn stop(&mut self, id: u64) {
            let raft = self.router.0.lock().unwrap().remove(&id).unwrap();
            raft.shutdown().await.unwrap();
            self.states.remove(&id);
        }

        fn node(&self, id: u64) -> Node {
            self.router.node(id).unwrap()
        }

        /// The leader all running nodes agree on.
        async fn leader(&self) -> u64 {
            let ids: Vec<u64> = self.router.0.lock().unwrap().keys().copied().collect();
            for _ in 0..300 {
                let mut seen = Vec::new();
                for id in &ids {
                    seen.push(self.node(*id).current_leader().await);
                }
                if let Some(Some(l)) = seen.first()
                    && seen.iter().all(|s| *s == Some(*l))
                    && ids.contains(l)
                {
                    return *l;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no leader agreed on within 30 s");
        }

        /// Wait until node `id` applied at least `index`.
        async fn applied(&self, id: u64, index: u64) {
            self.node(id)
                .wait(Some(Duration::from_secs(30)))
                .applied_index_at_least(Some(index), format!("node {id} applies {index}"))
                .await
                .unwrap();
        }
    }

    fn put(key: &str) -> MetaCommand {
        super::put(key, &format!("value of {key}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_replicate_lose_a_leader_and_catch_up() {
        let mut c = Cluster::new();
        for id in 1..=3 {
            c.start(id).await;
        }
        let members: BTreeMap<u64, super::super::Peer> = (1..=3)
            .map(|id| (id, super::peer(id, format!("n{id}"))))
            .collect();
        c.node(1).initialize(members).await.unwrap();

        // Writes are answered once a quorum has them and the leader applied
        // them; every node then applies them.
        let leader = c.leader().await;
        let mut last = 0;
        for i in 0..20 {
            let r = c
                .node(leader)
                .client_write(put(&format!("a{i}")))
                .await
                .unwrap();
            assert_eq!(r.data.previous, None);
            last = r.log_id.index;
        }
        let again = c.node(leader).client_write(put("a0")).await.unwrap();
        assert_eq!(again.data.previous, Some(b"value of a0".to_vec()));
        last = last.max(again.log_id.index);
        for id in 1..=3 {
            c.applied(id, last).await;
            assert_eq!(
                c.states[&id].get("a19").unwrap(),
                Some(b"value of a19".to_vec())
            );
        }

        // The leader is lost: the other two elect one and go on.
        c.stop(leader).await;
        let next = c.leader().await;
        assert_ne!(next, leader);
        for i in 0..5 {
            last = c
                .node(next)
                .client_write(put(&format!("b{i}")))
                .await
                .unwrap()
                .log_id
                .index;
        }

        // The old leader comes back from its directory and catches up,
        // with nothing it had lost.
        c.start(leader).await;
        c.applied(leader, last).await;
        let state = &c.states[&leader];
        assert_eq!(state.get("a19").unwrap(), Some(b"value of a19".to_vec()));
        assert_eq!(state.get("b4").unwrap(), Some(b"value of b4".to_vec()));
        for id in 1..=3 {
            c.stop(id).await;
        }
    }
}

/// Members 1, 2, 3… at the addresses of `endpoints`, in order.
/// Everything a store holds, as its export lists it.
fn content(store: &crate::store::Store) -> Vec<crate::store::Record> {
    let mut all = Vec::new();
    store
        .export(|t, k, v| -> Result<(), crate::store::StoreError> {
            all.push((t, k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    all
}

fn members<'a>(
    endpoints: impl Iterator<Item = &'a quinn::Endpoint>,
) -> std::collections::BTreeMap<u64, super::Peer> {
    endpoints
        .enumerate()
        .map(|(i, e)| {
            let id = i as u64 + 1;
            (id, peer(id, e.local_addr().unwrap().to_string()))
        })
        .collect()
}

/// Member `id` reached at `raft`, its clients at `client-{id}` (these
/// tests run no broker; the address is what `not_leader` names).
fn peer(id: u64, raft: String) -> super::Peer {
    super::Peer {
        raft,
        client: format!("client-{id}"),
    }
}

// ------------------------------------------------------------ over QUIC

mod over_quic {
    //! The same group over real QUIC on loopback, with the nodes'
    //! certificates from their own CA.

    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::Raft;

    use super::super::meta::MetaState;
    use super::super::net::{MetaRaft, QuicNetwork, serve};
    use super::open;
    use crate::tls::{NodeTls, init_dev_certs, init_node_certs, node_name};

    struct Node {
        id: u64,
        raft: MetaRaft,
        endpoint: quinn::Endpoint,
        state: MetaState,
    }

    async fn start(id: u64, dir: &Path, certs: &Path, config: Arc<openraft::Config>) -> Node {
        let tls = NodeTls::from_dir(&certs.join(node_name(id)));
        let endpoint =
            quinn::Endpoint::server(tls.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let net = QuicNetwork::new(endpoint.clone(), tls.client_config().unwrap());
        let (_db, log, state) = open(dir).unwrap();
        let raft = Raft::new(id, config, net, log, state.clone())
            .await
            .unwrap();
        tokio::spawn(serve(
            endpoint.clone(),
            raft.clone(),
            super::super::net::no_spool(),
        ));
        Node {
            id,
            raft,
            endpoint,
            state,
        }
    }

    /// The leader `nodes` agree on, one of them.
    async fn leader_of(nodes: &[&Node]) -> u64 {
        for _ in 0..300 {
            let mut seen = Vec::new();
            for n in nodes {
                seen.push(n.raft.current_leader().await);
            }
            if let Some(Some(l)) = seen.first()
                && seen.iter().all(|s| *s == Some(*l))
                && nodes.iter().any(|n| n.id == *l)
            {
                return *l;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader agreed on within 30 s");
    }

    /// One RPC-shaped exchange with `addr` as `identity`: open a stream,
    /// send an (undecodable) request, read the answer.
    async fn exchange(identity: NodeTls, addr: std::net::SocketAddr) -> Result<Vec<u8>, String> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = identity.client_config().map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect_with(config, addr, &node_name(1))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"{}").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_over_quic_replicate_and_survive_their_leader() {
        let certs = tempfile::tempdir().unwrap();
        init_node_certs(certs.path(), &[1, 2, 3]).unwrap();
        let config = Arc::new(
            openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 1000,
                election_timeout_max: 2000,
                ..Default::default()
            }
            .validate()
            .unwrap(),
        );
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            nodes.push(
                start(
                    id,
                    dirs[id as usize - 1].path(),
                    certs.path(),
                    config.clone(),
                )
                .await,
            );
        }
        let members = super::members(nodes.iter().map(|n| &n.endpoint));
        nodes[0].raft.initialize(members).await.unwrap();

        let all: Vec<&Node> = nodes.iter().collect();
        let leader = leader_of(&all).await;
        let mut last = 0;
        for i in 0..10 {
            last = nodes[leader as usize - 1]
                .raft
                .client_write(super::put(&format!("q{i}"), "v"))
                .await
                .unwrap()
                .log_id
                .index;
        }
        for n in &nodes {
            n.raft
                .wait(Some(Duration::from_secs(30)))
                .applied_index_at_least(Some(last), "replicated")
                .await
                .unwrap();
            assert_eq!(n.state.get("q9").unwrap(), Some(b"v".to_vec()));
        }

        // The leader goes away; the two others elect one and go on.
        let gone = &nodes[leader as usize - 1];
        gone.raft.shutdown().await.unwrap();
        gone.endpoint.close(0u32.into(), b"stopped");
        let rest: Vec<&Node> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 + 1 != leader)
            .map(|(_, n)| n)
            .collect();
        let next = leader_of(&rest).await;
        assert_ne!(next, leader);
        let r = nodes[next as usize - 1]
            .raft
            .client_write(super::put("after", "v"))
            .await
            .unwrap();
        for n in &rest {
            n.raft
                .wait(Some(Duration::from_secs(30)))
                .applied_index_at_least(Some(r.log_id.index), "after the leader left")
                .await
                .unwrap();
            assert_eq!(n.state.get("after").unwrap(), Some(b"v".to_vec()));
        }
        for (i, n) in nodes.iter().enumerate() {
            if i as u64 + 1 != leader {
                n.raft.shutdown().await.unwrap();
            }
        }
    }

    /// Only the cluster CA's node certificates get an answer: a tenant's
    /// certificate from the broker's CA is refused, even presented with the
    /// cluster's ALPN and trusting the cluster CA.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_certificate_cannot_talk_to_a_node() {
        let certs = tempfile::tempdir().unwrap();
        init_node_certs(&certs.path().join("cluster"), &[1, 2]).unwrap();
        init_dev_certs(&certs.path().join("broker"), &["acme".into()], "sluice").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(openraft::Config::default().validate().unwrap());
        let node = start(1, dir.path(), &certs.path().join("cluster"), config).await;
        let addr = node.endpoint.local_addr().unwrap();
        // Another node: answered (a refusal of the undecodable request).
        let peer = NodeTls::from_dir(&certs.path().join("cluster").join(node_name(2)));
        let answer = exchange(peer, addr).await.expect("a node is answered");
        assert!(String::from_utf8_lossy(&answer).contains("undecodable"));
        // A tenant (and the broker's administrator): refused.
        for who in ["acme", "admin"] {
            let identity = NodeTls {
                ca: certs.path().join("cluster/ca.pem"),
                ..NodeTls::from_dir(&certs.path().join("broker").join(who))
            };
            let refused = exchange(identity, addr).await;
            assert!(refused.is_err(), "{who} was answered: {refused:?}");
        }
        node.raft.shutdown().await.unwrap();
    }
}

// ------------------------------------------------------------ data group

mod data_group {
    //! The broker's store replicated: three nodes over QUIC, each applying
    //! to a real sled store; writes through the leader's
    //! [`ReplicatedStore`], reads on every node.

    use std::sync::Arc;
    use std::time::Duration;

    use openraft::Raft;
    use openraft::async_runtime::WatchReceiver;

    use super::super::data::{DataGroup, DataState};
    use super::super::log::FileLog;
    use super::super::net::{MAX_ENTRIES, QuicNetwork, serve};
    use super::super::store::{DataRaft, ReplicatedStore};
    use super::content;
    use crate::store::{Append, MessageStore, Store, StoreConfig, StoreError};
    use crate::tls::{NodeTls, init_node_certs, node_name};

    struct Node {
        raft: DataRaft,
        state: DataState,
        endpoint: quinn::Endpoint,
    }

    async fn start(id: u64, dir: &std::path::Path, certs: &std::path::Path) -> Node {
        let never = openraft::SnapshotPolicy::Never;
        start_with(
            id,
            dir,
            certs,
            "127.0.0.1:0".parse().unwrap(),
            never,
            1 << 30,
        )
        .await
    }

    /// A node listening on `addr`, snapshotting by `policy`, its log in
    /// segments of `segment` bytes.
    async fn start_with(
        id: u64,
        dir: &std::path::Path,
        certs: &std::path::Path,
        addr: std::net::SocketAddr,
        policy: openraft::SnapshotPolicy,
        segment: u64,
    ) -> Node {
        let config = Arc::new(
            openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 1000,
                election_timeout_max: 2000,
                max_payload_entries: MAX_ENTRIES,
                snapshot_policy: policy,
                max_in_snapshot_log_to_keep: 5,
                purge_batch_size: 16,
                ..Default::default()
            }
            .validate()
            .unwrap(),
        );
        let tls = NodeTls::from_dir(&certs.join(node_name(id)));
        // A node restarted on its port may wait for its last run's
        // socket to be released (tasks of the stopped Raft hold it).
        let mut tries = 0;
        let endpoint = loop {
            match quinn::Endpoint::server(tls.server_config().unwrap(), addr) {
                Ok(e) => break e,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 300 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{addr}: {e}"),
            }
        };
        let net = QuicNetwork::new(endpoint.clone(), tls.client_config().unwrap());
        let log = FileLog::<DataGroup>::open_segmented(&dir.join("raft"), "data", segment).unwrap();
        let store = Arc::new(
            Store::open(&StoreConfig {
                atomic_batches: false,
                ..StoreConfig::new(dir.join("store"))
            })
            .unwrap(),
        );
        let state = DataState::open(store, &dir.join("raft").join("snapshots")).unwrap();
        let raft = Raft::new(id, config, net, log, state.clone())
            .await
            .unwrap();
        tokio::spawn(serve(endpoint.clone(), raft.clone(), state.spool()));
        Node {
            raft,
            state,
            endpoint,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot() {
        let certs = tempfile::tempdir().unwrap();
        init_node_certs(certs.path(), &[1, 2, 3]).unwrap();
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let policy = openraft::SnapshotPolicy::LogsSinceLast(20);
        let local = "127.0.0.1:0".parse().unwrap();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let dir = dirs[id as usize - 1].path();
            nodes.push(start_with(id, dir, certs.path(), local, policy.clone(), 4096).await);
        }
        let members = super::members(nodes.iter().map(|n| &n.endpoint));
        nodes[0].raft.initialize(members.clone()).await.unwrap();
        let leader = nodes[0]
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .unwrap()
            .current_leader
            .unwrap();
        let l = &nodes[leader as usize - 1];
        l.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .unwrap();
        // A follower goes down before anything is written.
        let down = if leader == 3 { 2 } else { 3 };
        let gone = nodes.remove(down as usize - 1);
        gone.raft.shutdown().await.unwrap();
        gone.endpoint.close(0u32.into(), b"down");
        gone.endpoint.wait_idle().await;
        drop(gone);
        let l = nodes
            .iter()
            .find(|n| n.raft.metrics().borrow_watched().id == leader)
            .unwrap();
        let store = ReplicatedStore::new(l.raft.clone(), &l.state, Default::default()).unwrap();
        let q = store.allocate_queue_id().unwrap();
        // One entry per publish: 200 entries, ten snapshots, the log
        // before them purged.
        for i in 0..200u64 {
            store
                .append(vec![item(q, 2 * i), item(q, 2 * i + 1)], true)
                .await
                .unwrap();
        }
        let s = ack_and_declare(store, q, 150).await;
        for i in 200..260u64 {
            s.append(vec![item(q, 2 * i), item(q, 2 * i + 1)], true)
                .await
                .unwrap();
        }
        let m = l
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index > 100),
                "the log purged",
            )
            .await
            .unwrap();
        let last = m.last_applied.unwrap().index;
        let segments = |dir: &std::path::Path| {
            std::fs::read_dir(dir.join("raft"))
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("seg-")
                })
                .count()
        };
        let leader_dir = dirs[leader as usize - 1].path();
        assert!(leader_dir.join("raft/snapshots/current").exists());

        // Back, the follower needs entries the leader no longer has: it
        // is sent a snapshot, installs it, and follows from there.
        let addr = members[&down].raft.parse().unwrap();
        let back = start_with(
            down,
            dirs[down as usize - 1].path(),
            certs.path(),
            addr,
            policy,
            4096,
        )
        .await;
        let m = back
            .raft
            .wait(Some(Duration::from_secs(60)))
            .applied_index_at_least(Some(last), "caught up")
            .await
            .unwrap();
        assert!(
            m.snapshot.is_some_and(|s| s.index > 100),
            "installed a snapshot: {m:?}"
        );
        let want = content(l.state.store());
        assert_eq!(
            content(back.state.store()),
            want,
            "the follower's store is the leader's"
        );
        let ids: Vec<u64> = back
            .state
            .store()
            .scan_queue(q)
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(ids, (150..520).collect::<Vec<_>>());
        assert_eq!(
            back.state
                .store()
                .get_blob("plugin/acme/p")
                .unwrap()
                .unwrap()
                .len(),
            300_000
        );
        // It follows on from the snapshot: a write reaches it.
        s.append(vec![item(q, 520)], true).await.unwrap();
        // (The write is answered before the leader's metrics show it
        // applied: the index is its log's last once they do.)
        let last = l
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.last_applied.as_ref().map(|a| a.index) >= m.last_log_index,
                "the write applied on the leader",
            )
            .await
            .unwrap()
            .last_applied
            .unwrap()
            .index;
        back.raft
            .wait(Some(Duration::from_secs(30)))
            .applied_index_at_least(Some(last), "the next write")
            .await
            .unwrap();
        // (Reads find a queue's chunks once it is scanned, as a broker
        // does at start: the write may have come in a newer snapshot.)
        assert_eq!(back.state.store().scan_queue(q).count(), 371);
        assert_eq!(
            back.state.store().get(q, 520).unwrap(),
            l.state.store().get(q, 520).unwrap()
        );
        // The leader's log lost its purged segments: a few 4 KiB files
        // remain of the hundreds written.
        assert!(
            segments(leader_dir) < 40,
            "{} segments",
            segments(leader_dir)
        );
        // A restart of the follower finds the installed state as it was.
        back.raft.shutdown().await.unwrap();
        back.endpoint.close(0u32.into(), b"down");
        back.endpoint.wait_idle().await;
        drop(back);
        let again = start_with(
            down,
            dirs[down as usize - 1].path(),
            certs.path(),
            addr,
            openraft::SnapshotPolicy::Never,
            4096,
        )
        .await;
        let m = again
            .raft
            .wait(Some(Duration::from_secs(30)))
            .applied_index_at_least(Some(last), "reopened")
            .await
            .unwrap();
        assert!(m.snapshot.is_some(), "{m:?}");
        let ids: Vec<u64> = again
            .state
            .store()
            .scan_queue(q)
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(ids, (150..521).collect::<Vec<_>>());
        assert_eq!(
            again.state.store().get(q, 520).unwrap(),
            l.state.store().get(q, 520).unwrap()
        );
        again.raft.shutdown().await.unwrap();
        for n in &nodes {
            n.raft.shutdown().await.unwrap();
        }
    }

    /// Ack the first `acked` messages of `q`, write a metadata record and
    /// a blob, and wait until they are durable.
    async fn ack_and_declare(store: ReplicatedStore, q: u64, acked: u64) -> Arc<ReplicatedStore> {
        store.remove(q, &(0..acked).collect::<Vec<_>>()).unwrap();
        store.put_meta("queue/acme/orders", b"declared").unwrap();
        store.put_blob("plugin/acme/p", &[7u8; 300_000]).unwrap();
        let s = Arc::new(store);
        let s2 = s.clone();
        tokio::task::spawn_blocking(move || s2.sync_meta())
            .await
            .unwrap()
            .unwrap();
        s
    }

    fn item(queue: u64, id: u64) -> Append {
        Append {
            queue,
            id,
            value: format!("message {id} of queue {queue}").into_bytes(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leaders_writes_reach_every_nodes_store_and_followers_refuse() {
        let certs = tempfile::tempdir().unwrap();
        init_node_certs(certs.path(), &[1, 2, 3]).unwrap();
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            nodes.push(start(id, dirs[id as usize - 1].path(), certs.path()).await);
        }
        let members = super::members(nodes.iter().map(|n| &n.endpoint));
        nodes[0].raft.initialize(members).await.unwrap();
        let leader = nodes[0]
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .unwrap()
            .current_leader
            .unwrap();
        let l = &nodes[leader as usize - 1];
        l.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .unwrap();
        let store = ReplicatedStore::new(l.raft.clone(), &l.state, Default::default()).unwrap();

        // Publishes (confirmed once applied), acks, metadata, a queue id.
        let q = store.allocate_queue_id().unwrap();
        assert_eq!(store.allocate_queue_id().unwrap(), q + 1);
        let commits: Vec<_> = (0..50u64)
            .map(|i| store.append(vec![item(q, 2 * i), item(q, 2 * i + 1)], true))
            .collect();
        for c in commits {
            c.await.unwrap();
        }
        let s = ack_and_declare(store, q, 10).await;
        // An op too large to replicate is refused up front.
        let huge = vec![0u8; super::super::store::MAX_OP_BYTES + 1];
        assert!(matches!(
            s.put_blob("big", &huge),
            Err(StoreError::TooLarge { .. })
        ));

        let last = l
            .raft
            .wait(None)
            .metrics(|_| true, "now")
            .await
            .unwrap()
            .last_applied
            .unwrap()
            .index;
        for n in &nodes {
            n.raft
                .wait(Some(Duration::from_secs(30)))
                .applied_index_at_least(Some(last), "replicated")
                .await
                .unwrap();
            let local = n.state.store();
            let ids: Vec<u64> = local.scan_queue(q).map(|r| r.unwrap().0).collect();
            assert_eq!(ids, (10..100).collect::<Vec<_>>(), "node's queue");
            assert_eq!(
                local.get(q, 42).unwrap(),
                Some(format!("message 42 of queue {q}").into_bytes())
            );
            assert_eq!(
                local.scan_meta("queue/").unwrap(),
                vec![("queue/acme/orders".to_string(), b"declared".to_vec())]
            );
            assert_eq!(
                local.get_blob("plugin/acme/p").unwrap().unwrap().len(),
                300_000
            );
            assert_eq!(n.state.next_queue_id().unwrap(), q + 2);
        }

        // A follower gets no store: it names the leader's client address.
        let f = if leader == 1 { 1 } else { 0 };
        let e = ReplicatedStore::new(nodes[f].raft.clone(), &nodes[f].state, Default::default())
            .err()
            .expect("a follower's store is refused");
        assert!(
            e.to_string()
                .ends_with(&format!("the leader is at client-{leader}")),
            "{e}"
        );
        // A store whose term is over (the node runtime stops it) refuses
        // every write with not_leader.
        s.stop(StoreError::NotLeader {
            leader: Some(format!("client-{leader}")),
        });
        let refused = s.append(vec![item(q, 1000)], true).await.unwrap_err();
        match &refused {
            StoreError::NotLeader { leader: Some(addr) } => {
                assert_eq!(addr, &format!("client-{leader}"))
            }
            e => panic!("expected not_leader, got {e}"),
        }
        // Clients see it as `not_leader`, with the address in the message.
        let body = crate::session::error_body(&crate::broker::BrokerError::Store(refused.clone()));
        assert_eq!(body.code, sluice_proto::ErrorCode::NotLeader);
        assert!(
            body.message
                .ends_with(&format!("the leader is at client-{leader}")),
            "{}",
            body.message
        );
        // Failed once, it fails every later write at once.
        assert!(s.put_meta("k", b"v").is_err());
        for n in &nodes {
            n.raft.shutdown().await.unwrap();
        }
    }
}

/// The file log across segments: appends roll to new segment files,
/// truncation and purge remove whole files, a reopen finds the same log, a
/// torn or damaged record ends it there (and appends go on from it).
mod file_log {
    use openraft::RaftLogReader;
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;

    use super::{MetaGroup, entry, put};
    use crate::cluster::log::FileLog;

    fn open(dir: &std::path::Path) -> FileLog<MetaGroup> {
        FileLog::open_segmented(dir, "test", 4096).unwrap()
    }

    async fn append(log: &mut FileLog<MetaGroup>, indexes: std::ops::RangeInclusive<u64>) {
        let (tx, rx) = MetaGroup::oneshot();
        let value = "v".repeat(500);
        log.append(
            indexes.map(|i| entry(i, put(&format!("k{i}"), &value))),
            IOFlushed::signal(tx),
        )
        .await
        .unwrap();
        rx.await.unwrap().unwrap();
    }

    fn segments(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        names.sort();
        names
    }

    async fn indexes(log: &mut FileLog<MetaGroup>) -> Vec<u64> {
        log.get_log_reader()
            .await
            .try_get_log_entries(0..1000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    async fn last(log: &mut FileLog<MetaGroup>) -> Option<u64> {
        log.get_log_state()
            .await
            .unwrap()
            .last_log_id
            .map(|id| id.index)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_roll_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        append(&mut log, 1..=40).await;
        let rolled = segments(dir.path()).len();
        assert!(rolled >= 4, "{rolled} segments for 40 entries of 500 bytes");
        assert_eq!(indexes(&mut log).await, (1..=40).collect::<Vec<_>>());

        // Truncation removes the later segments and cuts the one it ends in.
        log.truncate_after(Some(openraft::testing::log_id::<MetaGroup>(1, 1, 17)))
            .await
            .unwrap();
        assert_eq!(last(&mut log).await, Some(17));
        assert!(segments(dir.path()).len() < rolled);
        append(&mut log, 18..=30).await;
        // Purge removes the segments holding only purged entries.
        let before = segments(dir.path()).len();
        log.purge(openraft::testing::log_id::<MetaGroup>(1, 1, 20))
            .await
            .unwrap();
        assert!(segments(dir.path()).len() < before);
        assert_eq!(indexes(&mut log).await, (21..=30).collect::<Vec<_>>());
        drop(log);

        let mut log = open(dir.path());
        assert_eq!(indexes(&mut log).await, (21..=30).collect::<Vec<_>>());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|id| id.index), Some(20));
        assert_eq!(state.last_log_id.map(|id| id.index), Some(30));

        // Everything purged: the log is empty but remembers where it was.
        log.purge(openraft::testing::log_id::<MetaGroup>(1, 1, 30))
            .await
            .unwrap();
        assert_eq!(segments(dir.path()), Vec::<String>::new());
        assert_eq!(last(&mut log).await, Some(30));
        append(&mut log, 31..=32).await;
        assert_eq!(indexes(&mut log).await, vec![31, 32]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_or_damaged_record_ends_the_log_there() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        append(&mut log, 1..=5).await;
        drop(log);
        let seg = dir.path().join(&segments(dir.path())[0]);
        // A torn append: half a header.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&[9, 0, 0])
            .unwrap();
        let mut log = open(dir.path());
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
        append(&mut log, 6..=6).await;
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5, 6]);
        drop(log);

        // A flipped byte in the third record: the log ends after the second.
        let mut bytes = std::fs::read(&seg).unwrap();
        let len = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let third = 8 + len(0);
        let third = third + 8 + len(third);
        bytes[third + 12] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let mut log = open(dir.path());
        assert_eq!(indexes(&mut log).await, vec![1, 2]);
        assert_eq!(last(&mut log).await, Some(2));
        append(&mut log, 3..=3).await;
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);

        // Damage in a segment before the last is not a crash: refused.
        append(&mut log, 4..=40).await;
        drop(log);
        let first = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&first, &bytes).unwrap();
        let e = FileLog::<MetaGroup>::open_segmented(dir.path(), "test", 4096)
            .err()
            .expect("a damaged log is refused");
        assert!(e.to_string().contains("before the log's end"), "{e}");
    }
}

/// Appends encode each value as one byte string: the same bytes as serde's
/// sequence of `u8` (so logs written before decode alike), and back.
#[test]
fn appends_encode_as_before_and_decode_back() {
    use super::data::{StoreBatch, StoreOp};
    #[derive(serde::Serialize)]
    enum Before {
        Append(Vec<(u64, u64, Vec<u8>)>),
    }
    #[derive(serde::Serialize)]
    struct BeforeBatch {
        ops: Vec<Before>,
    }
    let items = vec![(3, 7, b"hello".to_vec()), (3, 8, vec![0u8, 255, 1, 128])];
    let now = super::encode(
        "batch",
        &StoreBatch {
            ops: vec![StoreOp::Append(items.clone())],
        },
    )
    .unwrap();
    let before = super::encode(
        "batch",
        &BeforeBatch {
            ops: vec![Before::Append(items.clone())],
        },
    )
    .unwrap();
    assert_eq!(now, before);
    let back: StoreBatch = super::decode("batch", &now).unwrap();
    assert_eq!(back.ops, vec![StoreOp::Append(items)]);
}

/// Snapshot files: a damaged one is refused whole, and an install a crash
/// cut short is finished at the next open.
mod snapshot_files {
    use std::sync::Arc;

    use super::super::data::DataState;
    use super::super::snapshot::{SnapshotBody, Snapshots};
    use super::content;
    use crate::store::{Append, MessageStore, Store, StoreConfig};

    fn filled(dir: &std::path::Path, tag: &str) -> Store {
        let store = Store::open(&StoreConfig::new(dir)).unwrap();
        let items = (0..500u64)
            .map(|id| Append {
                queue: 3,
                id,
                value: format!("{tag} {id}").into_bytes(),
            })
            .collect();
        store.append(items, true).wait().unwrap();
        for _ in store.scan_queue(3) {}
        store.remove(3, &[1, 2, 3]).unwrap();
        store.put_meta(&format!("meta/{tag}"), b"v").unwrap();
        store
            .put_blob(&format!("blob/{tag}"), &[9; 100_000])
            .unwrap();
        store.sync().unwrap();
        store
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_a_cut_install_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = filled(&dir.path().join("a"), "a");
        let snaps = Snapshots::open(&dir.path().join("snaps")).unwrap();
        let meta = Default::default();
        let body = snaps.build(&meta, &a).unwrap();
        assert!(body.len() > 100_000);
        let current = dir.path().join("snaps/current");
        let whole = std::fs::read(&current).unwrap();

        // Whole: accepted; a flipped byte, a cut, another snapshot's
        // metadata: refused.
        let copy = dir.path().join("copy");
        std::fs::write(&copy, &whole).unwrap();
        SnapshotBody::received(copy.clone(), whole.len() as u64, &meta).unwrap();
        for damage in [whole.len() / 2, whole.len() - 3] {
            let mut bad = whole.clone();
            bad[damage] ^= 0x40;
            std::fs::write(&copy, &bad).unwrap();
            assert!(SnapshotBody::received(copy.clone(), bad.len() as u64, &meta).is_err());
        }
        std::fs::write(&copy, &whole[..whole.len() - 20]).unwrap();
        let e = SnapshotBody::received(copy.clone(), whole.len() as u64 - 20, &meta).unwrap_err();
        assert!(e.to_string().contains("snapshot"), "{e}");
        let other = openraft::type_config::alias::SnapshotMetaOf::<super::super::data::DataGroup> {
            last_log_id: Some(openraft::testing::log_id::<super::super::data::DataGroup>(
                1, 1, 7,
            )),
            ..Default::default()
        };
        std::fs::write(&copy, &whole).unwrap();
        assert!(SnapshotBody::received(copy, whole.len() as u64, &other).is_err());

        // Node b crashed installing the snapshot: `installing` is there,
        // its store holds its own content. Opening finishes the install.
        let b = Arc::new(filled(&dir.path().join("b"), "b"));
        let b_snaps = dir.path().join("b-snaps");
        std::fs::create_dir_all(&b_snaps).unwrap();
        std::fs::write(b_snaps.join("installing"), &whole).unwrap();
        assert_ne!(content(&b), content(&a));
        DataState::open(b.clone(), &b_snaps).unwrap();
        assert_eq!(content(&b), content(&a));
        assert!(!b_snaps.join("installing").exists());
        assert!(b_snaps.join("current").exists());
        let ids: Vec<u64> = b.scan_queue(3).map(|r| r.unwrap().0).collect();
        assert_eq!(ids.len(), 497);
        assert_eq!(b.get(3, 4).unwrap(), Some(b"a 4".to_vec()));
        assert_eq!(b.get(3, 2).unwrap(), None);
        // Its own commit number is kept: it reopens.
        drop(b);
        let b = Store::open(&StoreConfig::new(dir.path().join("b"))).unwrap();
        assert_eq!(content(&b), content(&a));
    }
}
