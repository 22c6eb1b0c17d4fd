//! A replicated cluster as users run it: three `sluice serve` processes on
//! loopback ports, one `[cluster]` configuration, node certificates from
//! `sluice certs init --node N`, clients that know every node.
//!
//! The checker follows Jepsen's queue test: every confirmed message is
//! delivered at least once, nothing is delivered that was not published,
//! the first deliveries of one producer's messages come in the order it
//! published them, and a message is delivered again only marked
//! `redelivered` or because its publisher sent it again (after losing the
//! confirm). More rounds: `SLUICE_CLUSTER_ROUNDS` (default 3) and
//! `SLUICE_CLUSTER_MESSAGES` per round (default 300).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, Served, env_or, free_port};
use sluice_client::{Client, ClientError, ConnectOptions, ErrorCode, QueueSpec};

/// Three (or `n`) nodes of one cluster, each a child process.
struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Configuration files of nodes added later ([`Cluster::joiner`]).
    joiners: BTreeMap<u64, PathBuf>,
    /// Raft address of each node.
    rafts: Vec<SocketAddr>,
    clients: Vec<SocketAddr>,
    metrics: Vec<SocketAddr>,
    nodes: Vec<Option<Served>>,
    relays: Option<Relays>,
}

/// A loopback TCP port nobody uses right now.
fn free_tcp_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Cluster {
    /// Certificates and a configuration for `n` nodes; none started.
    fn new(n: u64) -> Cluster {
        Cluster::build(n, false, "")
    }

    /// A cluster with more `[cluster]` keys (TOML lines).
    fn configured(n: u64, keys: &str) -> Cluster {
        Cluster::build(n, false, keys)
    }

    /// As `new`, with every node's peers reaching it through a relay the
    /// test can cut ([`Relays`]).
    fn relayed(n: u64) -> Cluster {
        Cluster::build(n, true, "")
    }

    fn build(n: u64, relayed: bool, keys: &str) -> Cluster {
        let mut dir = tempfile::tempdir().unwrap();
        if std::env::var_os("SLUICE_CLUSTER_KEEP").is_some() {
            // Keep the nodes' logs and data to look at after the run.
            dir.disable_cleanup(true);
            eprintln!("cluster files in {}", dir.path().display());
        }
        let mut args = vec!["certs".to_string(), "init".into(), "--out".into()];
        args.push(dir.path().join("certs").display().to_string());
        args.extend(["--tenant".into(), "acme".into()]);
        for id in 1..=n {
            args.extend(["--node".into(), id.to_string()]);
        }
        let st = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut used = BTreeSet::new();
        let mut port = || loop {
            let p = free_port();
            if used.insert(p) {
                return p;
            }
        };
        let mut members = String::new();
        let mut clients = Vec::new();
        let mut rafts = Vec::new();
        let mut relays = Vec::new();
        for id in 1..=n {
            let (raft, client) = (port(), port());
            let listen = if relayed {
                let listen = port();
                relays.push((id, raft, listen));
                format!(", raft_listen = \"{listen}\"")
            } else {
                String::new()
            };
            members +=
                &format!("  {{ id = {id}, raft = \"{raft}\"{listen}, client = \"{client}\" }},\n");
            clients.push(client);
            rafts.push(raft);
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "certs = {:?}\ndata = {:?}\n# Small caches: the catch-up test measures a node's memory.\nstore_cache_mib = 8\n\n[cluster]\n{keys}members = [\n{members}]\n",
                dir.path().join("certs"),
                dir.path().join("data"),
            ),
        )
        .unwrap();
        Cluster {
            dir,
            config,
            joiners: BTreeMap::new(),
            rafts,
            clients,
            metrics: (0..n).map(|_| free_tcp_port()).collect(),
            nodes: (0..n).map(|_| None).collect(),
            relays: relayed.then(|| Relays::start(&relays)),
        }
    }

    fn start(&mut self, id: u64) {
        self.start_with(id, &[]);
    }

    /// Start node `id` with more `sluice serve` arguments.
    fn start_with(&mut self, id: u64, more: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(id))
            .unwrap();
        let config = self.joiners.get(&id).unwrap_or(&self.config);
        let child = Command::new(BIN)
            .args(["serve", "--node", &id.to_string(), "--config"])
            .arg(config)
            .arg("--metrics")
            .arg(self.metrics[id as usize - 1].to_string())
            .args(more)
            .env("SLUICE_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes[id as usize - 1] = Some(Served(child));
    }

    fn start_all(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.start(id);
        }
    }

    /// One more node, not in the cluster's configuration: its identity
    /// from `sluice certs issue --node N` and a configuration of its own
    /// naming itself alone, with `join = true`. Not started.
    fn joiner(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let certs = self.dir.path().join("certs");
        let out = Command::new(BIN)
            .args(["certs", "issue", "--node", &id.to_string(), "--ca"])
            .arg(certs.join("cluster"))
            .arg("--out")
            .arg(certs.join(format!("cluster/node-{id}")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let taken: BTreeSet<SocketAddr> = self.rafts.iter().chain(&self.clients).copied().collect();
        let port = || loop {
            let p = free_port();
            if !taken.contains(&p) {
                return p;
            }
        };
        let (raft, client) = (port(), port());
        let config = self.dir.path().join(format!("node-{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "certs = {:?}\ndata = {:?}\n\n[cluster]\njoin = true\nmembers = [{{ id = {id}, raft = \"{raft}\", client = \"{client}\" }}]\n",
                certs,
                self.dir.path().join("data"),
            ),
        )
        .unwrap();
        self.joiners.insert(id, config);
        self.rafts.push(raft);
        self.clients.push(client);
        self.metrics.push(free_tcp_port());
        self.nodes.push(None);
        id
    }

    /// `sluice cluster ARGS` as an administrator, asked of every node.
    fn admin(&self, args: &[&str]) -> std::process::Output {
        let servers: Vec<String> = self.clients.iter().map(|a| a.to_string()).collect();
        Command::new(BIN)
            .arg("cluster")
            .args(args)
            .arg("--server")
            .arg(servers.join(","))
            .arg("--identity")
            .arg(self.dir.path().join("certs/admin"))
            .output()
            .unwrap()
    }

    /// `kill -9` node `id`.
    fn kill(&mut self, id: u64) {
        if let Some(mut node) = self.nodes[id as usize - 1].take() {
            node.0.kill().unwrap();
            node.0.wait().unwrap();
        }
    }

    fn log(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    fn identity(&self) -> PathBuf {
        self.dir.path().join("certs/acme")
    }

    /// One gauge of node `id`'s Prometheus metrics (`None`: not reachable
    /// or not there).
    fn gauge(&self, id: u64, name: &str) -> Option<u64> {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(self.metrics[id as usize - 1]).ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        sock.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        sock.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Wait until node `id` has applied `target`, calling `each` at every
    /// look; bounded by progress, not by speed.
    async fn caught_up(&self, id: u64, target: u64, mut each: impl FnMut()) {
        let mut progress = Progress::new();
        loop {
            each();
            let applied = self.gauge(id, "sluice_raft_applied_index").unwrap_or(0);
            if applied >= target {
                return;
            }
            assert!(
                !progress.stalled(applied),
                "node {id} is stuck at {applied} of {target}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn pid(&self, id: u64) -> u32 {
        self.nodes[id as usize - 1]
            .as_ref()
            .expect("node running")
            .id()
    }

    /// The node a client is connected to.
    fn node_of(&self, client: &Client) -> u64 {
        let at = client.server_addr();
        self.clients
            .iter()
            .position(|a| *a == at)
            .unwrap_or_else(|| panic!("connected to {at}, not a node")) as u64
            + 1
    }

    /// Connect to the leader, through elections and restarts.
    async fn connect(&self) -> Client {
        let opts = ConnectOptions {
            failover: Duration::from_secs(90),
            ..ConnectOptions::default()
        };
        match Client::connect_any(&self.clients, &self.identity(), opts).await {
            Ok(c) => c,
            Err(e) => panic!("no leader: {e}\n{}", self.logs()),
        }
    }

    /// The nodes' logs, for a failure message.
    fn logs(&self) -> String {
        (1..=self.nodes.len() as u64)
            .map(|id| {
                let text = std::fs::read_to_string(self.log(id)).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(15).collect();
                format!(
                    "--- node {id}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A UDP relay in front of every node's Raft port (loopback only): peers
/// dial the relay, the relay forwards to the node's real listener, and a
/// test cuts nodes off by naming them. A node dials its peers from its own
/// listener, so the relay knows which node every packet comes from.
struct Relays {
    cut: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
}

/// How long a relay thread waits for a packet before looking at `stop`.
const RELAY_POLL: Duration = Duration::from_millis(50);

impl Relays {
    /// Relays for `nodes`: (id, address its peers dial, address it listens on).
    fn start(nodes: &[(u64, SocketAddr, SocketAddr)]) -> Relays {
        let relays = Relays {
            cut: Arc::default(),
            stop: Arc::default(),
        };
        let senders: Arc<BTreeMap<SocketAddr, u64>> =
            Arc::new(nodes.iter().map(|(id, _, listen)| (*listen, *id)).collect());
        for (id, front, back) in nodes {
            let front = UdpSocket::bind(front).unwrap();
            front.set_read_timeout(Some(RELAY_POLL)).unwrap();
            let (id, back, senders) = (*id, *back, senders.clone());
            let (cut, stop) = (relays.cut.clone(), relays.stop.clone());
            std::thread::spawn(move || relay(id, front, back, senders, cut, stop));
        }
        relays
    }

    /// Cut node `id` off from every other node (until `heal`).
    fn isolate(&self, id: u64) {
        self.cut.lock().unwrap().insert(id);
    }

    fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Forward what reaches `front` to node `to` at `back`, and its answers
/// back, dropping every packet between a cut node and another.
fn relay(
    to: u64,
    front: UdpSocket,
    back: SocketAddr,
    senders: Arc<BTreeMap<SocketAddr, u64>>,
    cut: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
) {
    let blocked = {
        let cut = cut.clone();
        move |from: u64| {
            let cut = cut.lock().unwrap();
            cut.contains(&from) || cut.contains(&to)
        }
    };
    // One socket toward the node per sender, so its answers find the way
    // back.
    let mut upstream: std::collections::HashMap<SocketAddr, UdpSocket> = Default::default();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, sender)) = front.recv_from(&mut buf) else {
            continue;
        };
        // Clients never come here: an unknown sender is not a node.
        let Some(&from) = senders.get(&sender) else {
            continue;
        };
        if blocked(from) {
            continue;
        }
        let up = upstream.entry(sender).or_insert_with(|| {
            let up = UdpSocket::bind("127.0.0.1:0").unwrap();
            up.connect(back).unwrap();
            up.set_read_timeout(Some(RELAY_POLL)).unwrap();
            let (answers, front) = (up.try_clone().unwrap(), front.try_clone().unwrap());
            let (blocked, stop) = (blocked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = answers.recv(&mut buf)
                        && !blocked(from)
                    {
                        let _ = front.send_to(&buf[..n], sender);
                    }
                }
            });
            up
        });
        let _ = up.send(&buf[..n]);
    }
}

/// Publishes in flight at once.
const WINDOW: usize = 16;

/// A wait bounded by progress, not by speed: it fails only when the value
/// it watches has not moved for a minute.
struct Progress {
    last: u64,
    at: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last: 0,
            at: Instant::now(),
        }
    }

    /// Whether `value` has stood still for a minute.
    fn stalled(&mut self, value: u64) -> bool {
        if value != self.last {
            (self.last, self.at) = (value, Instant::now());
        }
        self.at.elapsed() >= Duration::from_secs(60)
    }
}

/// Whether a failed publish or request is worth retrying on the new leader.
fn failover(e: &ClientError) -> bool {
    e.failed_over() || matches!(e, ClientError::Timeout)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A small deterministic generator (the seed is printed, so a failing run
/// can be repeated with `SLUICE_CLUSTER_SEED`).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// What the consumer saw: (producer sequence number, redelivered) in
/// delivery order.
type Seen = Arc<Mutex<Vec<(u64, bool)>>>;

/// Consume `queue` and ack everything, reconnecting to each new leader,
/// until `stop` is set.
async fn consume(cluster: Arc<Mutex<Option<Vec<SocketAddr>>>>, identity: PathBuf, seen: Seen) {
    loop {
        let Some(servers) = cluster.lock().unwrap().clone() else {
            return;
        };
        let opts = ConnectOptions {
            failover: Duration::from_secs(5),
            ..ConnectOptions::default()
        };
        let Ok(client) = Client::connect_any(&servers, &identity, opts).await else {
            continue;
        };
        let Ok(mut sub) = client.subscribe("jepsen", 64).await else {
            continue;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
            match next {
                Ok(Some(d)) => {
                    let seq = std::str::from_utf8(&d.payload)
                        .ok()
                        .and_then(|s| s.strip_prefix("p0-"))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(u64::MAX);
                    seen.lock().unwrap().push((seq, d.redelivered));
                    sub.ack(d.tag);
                }
                Ok(None) => break,
                Err(_) if cluster.lock().unwrap().is_none() => return,
                Err(_) => {}
            }
        }
    }
}

/// Publish `seqs` in order, pipelined; after `kill_after` confirms, kill
/// the leader the publisher is connected to. What was not confirmed is
/// published again on the new leader until everything is. Returns the
/// node killed.
async fn publish_round(
    cluster: &mut Cluster,
    client: &mut Client,
    seqs: std::ops::Range<u64>,
    kill_after: u64,
    attempts: &mut BTreeMap<u64, u32>,
    confirmed: &mut BTreeSet<u64>,
) -> Option<u64> {
    let mut todo: Vec<u64> = seqs.collect();
    let mut killed = None;
    let mut tries = 0;
    while !todo.is_empty() {
        tries += 1;
        assert!(tries < 50, "publishes never confirmed\n{}", cluster.logs());
        // A window of publishes in flight, so the kill lands among them.
        let mut next = todo.into_iter();
        let mut pending = std::collections::VecDeque::new();
        let mut failed = Vec::new();
        loop {
            while pending.len() < WINDOW {
                let Some(seq) = next.next() else { break };
                *attempts.entry(seq).or_default() += 1;
                let payload = format!("p0-{seq}").into_bytes();
                pending.push_back((seq, client.publish("jepsen.orders", vec![], payload)));
            }
            let Some((seq, confirm)) = pending.pop_front() else {
                break;
            };
            match confirm.await {
                Ok(1) => {
                    confirmed.insert(seq);
                }
                Ok(n) => panic!("message {seq} stored in {n} queues"),
                Err(e) if failover(&e) => failed.push(seq),
                Err(e) => panic!("publish {seq}: {e}"),
            }
            if killed.is_none() && confirmed.len() as u64 >= kill_after {
                let leader = cluster.node_of(client);
                cluster.kill(leader);
                killed = Some(leader);
            }
        }
        if !failed.is_empty() {
            *client = cluster.connect().await;
        }
        todo = failed;
    }
    killed
}

#[test]
fn killing_the_leader_loses_no_confirmed_message() {
    let rounds = env_or("SLUICE_CLUSTER_ROUNDS", 3);
    let per_round = env_or("SLUICE_CLUSTER_MESSAGES", 300);
    let seed = env_or(
        "SLUICE_CLUSTER_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut rng = Lcg(seed);
    let mut cluster = Cluster::new(3);
    cluster.start_all();
    runtime().block_on(async {
        let mut client = cluster.connect().await;
        client.declare(QueueSpec::new("jepsen")).await.unwrap();
        client.bind("jepsen", "jepsen.>").await.unwrap();

        let servers = Arc::new(Mutex::new(Some(cluster.clients.clone())));
        let seen: Seen = Arc::default();
        let consumer = tokio::spawn(consume(servers.clone(), cluster.identity(), seen.clone()));

        let (mut attempts, mut confirmed) = (BTreeMap::new(), BTreeSet::new());
        for round in 0..rounds {
            let seqs = round * per_round..(round + 1) * per_round;
            let kill_after = confirmed.len() as u64 + rng.below(per_round);
            let killed = publish_round(
                &mut cluster,
                &mut client,
                seqs,
                kill_after,
                &mut attempts,
                &mut confirmed,
            )
            .await;
            if let Some(id) = killed {
                cluster.start(id);
            }
        }

        // Every confirmed message reaches the consumer (bounded by progress,
        // not by a wall-clock verdict on speed).
        let mut progress = Progress::new();
        loop {
            let got: BTreeSet<u64> = seen.lock().unwrap().iter().map(|(s, _)| *s).collect();
            if confirmed.is_subset(&got) {
                break;
            }
            assert!(
                !progress.stalled(got.len() as u64),
                "consumer stuck: {} of {} confirmed messages delivered (seed {seed})\n{}",
                confirmed.intersection(&got).count(),
                confirmed.len(),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *servers.lock().unwrap() = None;
        consumer.await.unwrap();

        // The checker.
        let seen = seen.lock().unwrap().clone();
        let mut firsts = Vec::new();
        let mut plain: BTreeMap<u64, u32> = BTreeMap::new();
        for (seq, redelivered) in &seen {
            assert!(
                attempts.contains_key(seq),
                "message {seq} delivered but never published (seed {seed})"
            );
            if !redelivered {
                *plain.entry(*seq).or_default() += 1;
            }
            if !firsts.contains(seq) {
                firsts.push(*seq);
            }
        }
        let mut order = firsts.clone();
        order.sort_unstable();
        assert_eq!(
            firsts, order,
            "first deliveries out of publish order (seed {seed})"
        );
        for (seq, n) in &plain {
            assert!(
                *n <= attempts[seq],
                "message {seq} delivered {n} times unmarked but published {} times (seed {seed})",
                attempts[seq]
            );
        }
        let resent = attempts.values().filter(|n| **n > 1).count();
        let redelivered = seen.iter().filter(|(_, r)| *r).count();
        println!(
            "cluster: {rounds} rounds, {} confirmed of {} published ({resent} sent again after failover), {} deliveries ({redelivered} redelivered), 0 lost, 0 invented, order kept (seed {seed})",
            confirmed.len(),
            attempts.len(),
            seen.len(),
        );
    });
}

#[test]
fn with_two_of_three_down_nothing_is_confirmed_and_nothing_confirmed_is_lost() {
    let mut cluster = Cluster::new(3);
    cluster.start_all();
    runtime().block_on(async {
        let client = cluster.connect().await;
        client.declare(QueueSpec::new("jepsen")).await.unwrap();
        client.bind("jepsen", "jepsen.>").await.unwrap();
        for i in 0..100u64 {
            let n = client
                .publish("jepsen.a", vec![], format!("p0-{i}").into_bytes())
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        let leader = cluster.node_of(&client);
        let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
        for f in &followers {
            cluster.kill(*f);
        }
        // Without a quorum the leader cannot commit: no confirm comes
        // (however long we wait; 3 s here), and whatever it says, it is
        // not a confirm.
        let pending = client.publish("jepsen.a", vec![], b"p0-100".to_vec());
        let early = tokio::time::timeout(Duration::from_secs(3), pending).await;
        assert!(
            !matches!(early, Ok(Ok(_))),
            "a publish was confirmed without a quorum"
        );
        // One follower back: a quorum again; every confirmed message is there.
        cluster.start(followers[0]);
        let client = cluster.connect().await;
        let mut sub = client.subscribe("jepsen", 256).await.unwrap();
        let want: BTreeSet<String> = (0..100).map(|i| format!("p0-{i}")).collect();
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .unwrap_or_else(|_| {
                    let n = want.intersection(&got).count();
                    panic!(
                        "only {n} of 100 confirmed messages delivered\n{}",
                        cluster.logs()
                    )
                })
                .expect("subscription open");
            got.insert(String::from_utf8(d.payload).unwrap());
            sub.ack(d.tag);
        }
    });
}

#[test]
fn a_partitioned_leader_confirms_nothing_and_healing_loses_nothing() {
    let mut cluster = Cluster::relayed(3);
    cluster.start_all();
    runtime().block_on(async {
        let client = cluster.connect().await;
        client.declare(QueueSpec::new("jepsen")).await.unwrap();
        client.bind("jepsen", "jepsen.>").await.unwrap();
        let mut confirmed = BTreeSet::new();
        for i in 0..100u64 {
            assert_eq!(
                client
                    .publish("jepsen.a", vec![], format!("p0-{i}").into_bytes())
                    .await
                    .unwrap(),
                1
            );
            confirmed.insert(format!("p0-{i}"));
        }
        let old = cluster.node_of(&client);
        let relays = cluster.relays.as_ref().expect("relayed");
        relays.isolate(old);
        // The minority side: the old leader still takes the publish (its
        // clients reach it) but cannot commit it; once its lease is over it
        // closes its clients' connections and refuses new ones, so nothing
        // made there is ever confirmed.
        let stranded = client.publish("jepsen.a", vec![], b"p0-stranded".to_vec());
        let answer = tokio::time::timeout(Duration::from_secs(60), stranded)
            .await
            .unwrap_or_else(|_| panic!("the isolated leader neither confirms nor refuses\n{}", cluster.logs()));
        match answer {
            Ok(n) => panic!("the isolated leader confirmed a publish ({n})"),
            Err(e) => assert!(e.failed_over(), "{e}"),
        }
        let refusal = Client::connect(cluster.clients[old as usize - 1], &cluster.identity())
            .await
            .err()
            .expect("the isolated leader refuses clients");
        let ClientError::Server(body) = &refusal else {
            panic!("expected a refusal, got {refusal}")
        };
        assert_eq!(body.code, ErrorCode::NotLeader, "{body}");

        // The majority side elects a leader of its own and serves.
        let majority: Vec<SocketAddr> = (1..=3u64)
            .filter(|n| *n != old)
            .map(|n| cluster.clients[n as usize - 1])
            .collect();
        let opts = ConnectOptions {
            failover: Duration::from_secs(90),
            ..ConnectOptions::default()
        };
        let other = Client::connect_any(&majority, &cluster.identity(), opts)
            .await
            .unwrap_or_else(|e| panic!("the majority elects no leader: {e}\n{}", cluster.logs()));
        let new = cluster.node_of(&other);
        assert_ne!(new, old);
        for i in 100..200u64 {
            let n = other
                .publish("jepsen.a", vec![], format!("p0-{i}").into_bytes())
                .await
                .unwrap_or_else(|e| panic!("majority publish {i}: {e}\n{}", cluster.logs()));
            assert_eq!(n, 1);
            confirmed.insert(format!("p0-{i}"));
        }

        // Healing: the old leader learns the newer term and follows.
        relays.heal();
        // It catches up: both followers match the leader's log.
        let admin = Client::connect(
            cluster.clients[new as usize - 1],
            &cluster.dir.path().join("certs/admin"),
        )
        .await
        .unwrap();
        let mut progress = Progress::new();
        loop {
            let status = admin.cluster_status().await.unwrap();
            let lag: u64 = status.followers.iter().map(|f| f.lag).sum();
            if status.followers.len() == 2 && lag == 0 {
                assert_eq!(status.leader, Some(new), "{status:?}");
                break;
            }
            let matched = status.followers.iter().map(|f| f.matched.unwrap_or(0)).sum();
            assert!(
                !progress.stalled(matched),
                "the old leader does not catch up: {status:?}\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop((other, admin));

        // With the new leader gone, the old leader and the third node hold
        // every confirmed message, and nothing from the minority side.
        cluster.kill(new);
        let client = cluster.connect().await;
        assert_ne!(cluster.node_of(&client), new);
        let mut sub = client.subscribe("jepsen", 256).await.unwrap();
        let mut got = BTreeSet::new();
        while !confirmed.is_subset(&got) {
            let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .unwrap_or_else(|_| {
                    let n = confirmed.intersection(&got).count();
                    panic!("only {n} of 200 confirmed messages delivered\n{}", cluster.logs())
                })
                .expect("subscription open");
            let payload = String::from_utf8(d.payload).unwrap();
            assert!(
                confirmed.contains(&payload),
                "delivered {payload}, which no majority ever stored"
            );
            got.insert(payload);
            sub.ack(d.tag);
        }
        println!(
            "partition: node {old} isolated as leader refused its clients, node {new} elected; 200 confirmed, 0 lost, nothing from the minority side"
        );
    });
}

#[test]
fn a_follower_refuses_clients_naming_the_leader_and_the_cli_follows_it() {
    let mut cluster = Cluster::new(3);
    cluster.start_all();
    runtime().block_on(async {
        let client = cluster.connect().await;
        let leader = cluster.node_of(&client);
        let follower = (1..=3u64).find(|n| *n != leader).unwrap();
        let e = Client::connect(cluster.clients[follower as usize - 1], &cluster.identity())
            .await
            .err()
            .expect("a follower refuses");
        let ClientError::Server(body) = &e else {
            panic!("expected a refusal, got {e}")
        };
        assert_eq!(body.code, ErrorCode::NotLeader);
        assert_eq!(
            body.leader(),
            Some(cluster.clients[leader as usize - 1].to_string().as_str()),
            "{body}"
        );
    });
    // `sluice cluster status` (administrators) from whichever node leads.
    let servers_all: Vec<String> = cluster.clients.iter().map(|a| a.to_string()).collect();
    let out = Command::new(BIN)
        .args([
            "cluster",
            "status",
            "--json",
            "--server",
            &servers_all.join(","),
        ])
        .arg("--identity")
        .arg(cluster.dir.path().join("certs/admin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["role"], "leader", "{status}");
    assert_eq!(status["members"], serde_json::json!([1, 2, 3]), "{status}");
    assert_eq!(status["followers"].as_array().unwrap().len(), 2, "{status}");
    let out = Command::new(BIN)
        .args(["cluster", "status", "--server", &servers_all.join(",")])
        .arg("--identity")
        .arg(cluster.identity())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("for administrators"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Leadership handed to a follower by name (a rolling restart's step),
    // asked of the leader alone; refused for a non-member or a tenant.
    let admin = cluster.dir.path().join("certs/admin");
    let leader = status["leader"].as_u64().unwrap();
    let next = (1..=3u64).find(|n| *n != leader).unwrap();
    let transfer = |to: u64, identity: &std::path::Path| {
        Command::new(BIN)
            .args(["cluster", "transfer", &to.to_string(), "--server"])
            .arg(cluster.clients[leader as usize - 1].to_string())
            .arg("--identity")
            .arg(identity)
            .output()
            .unwrap()
    };
    for (to, identity, want) in [
        (9, &admin, "node 9 is not a member"),
        (leader, &admin, "leads already"),
        (next, &cluster.identity(), "for administrators"),
    ] {
        let out = transfer(to, identity);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{to}: {err}");
    }
    let out = transfer(next, &admin);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let term: u64 = said
        .trim()
        .strip_prefix(&format!("node {next} leads (term "))
        .and_then(|t| t.strip_suffix(')'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("unexpected: {said}"));
    assert!(term > status["term"].as_u64().unwrap(), "{said}");
    runtime().block_on(async {
        let client = cluster.connect().await;
        assert_eq!(cluster.node_of(&client), next);
    });
    // The metrics count it: the new leader saw two leaders and leads a
    // term; the old one timed the proposals it made (the tenant's
    // admission, at least) and led one term.
    let metric = |id: u64, name: &str| {
        cluster
            .gauge(id, name)
            .unwrap_or_else(|| panic!("node {id} has no {name}"))
    };
    assert!(metric(next, "sluice_raft_leader_changes_total") >= 2);
    assert!(metric(next, "sluice_raft_terms_led_total") >= 1);
    assert!(metric(leader, "sluice_raft_terms_led_total") >= 1);
    assert!(metric(leader, "sluice_raft_proposal_seconds_count") >= 1);
    // The CLI with every node, in any order, finds the leader.
    let servers: Vec<String> = cluster
        .clients
        .iter()
        .rev()
        .map(|a| a.to_string())
        .collect();
    let out = Command::new(BIN)
        .args(["queue", "declare", "orders", "--server", &servers.join(",")])
        .arg("--identity")
        .arg(cluster.identity())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Payload bytes of each backlog message.
const PAYLOAD: usize = 4096;

/// Most a follower's RSS may reach while catching up, whatever the backlog.
const RSS_BOUND_KIB: u64 = 200 << 10;

#[test]
fn a_follower_down_during_a_backlog_catches_up_from_the_log() {
    let n = env_or("SLUICE_CLUSTER_BACKLOG", 20_000);
    let mut cluster = Cluster::new(3);
    cluster.start_all();
    runtime().block_on(async {
        let client = cluster.connect().await;
        client.declare(QueueSpec::new("backlog")).await.unwrap();
        client.bind("backlog", "backlog.>").await.unwrap();
        let leader = cluster.node_of(&client);
        let down = (1..=3u64).find(|id| *id != leader).unwrap();
        cluster.kill(down);
        // The backlog builds up while the follower is down (a majority of
        // two confirms it).
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let mut payload = format!("m{i:08}").into_bytes();
            payload.resize(PAYLOAD, b'.');
            pending.push_back(client.publish("backlog.x", vec![], payload));
            if pending.len() >= 256 {
                assert_eq!(pending.pop_front().unwrap().await.unwrap(), 1);
            }
        }
        for p in pending {
            assert_eq!(p.await.unwrap(), 1);
        }
        let target = cluster
            .gauge(leader, "sluice_raft_last_log_index")
            .expect("the leader's metrics");
        cluster.start(down);
        let pid = cluster.pid(down);
        // Caught up once its store has applied the leader's whole log.
        let mut peak = 0u64;
        cluster
            .caught_up(down, target, || peak = peak.max(common::rss_kib(pid)))
            .await;
        // Memory does not grow with the backlog: the log is read and
        // applied in pieces and kept in files, not in sled (which held what
        // it wrote: 280-300 MiB here for the default 78 MiB backlog, 370
        // MiB for 156). Measured ~130 MiB for 78 and for 156 MiB (8 MiB
        // caches, debug build).
        let backlog_kib = n * PAYLOAD as u64 / 1024;
        assert!(
            peak < RSS_BOUND_KIB,
            "the follower peaked at {} MiB catching up {} MiB (bound {} MiB)",
            peak / 1024,
            backlog_kib / 1024,
            RSS_BOUND_KIB / 1024
        );
        // The leader sees it caught up too.
        let admin = cluster.dir.path().join("certs/admin");
        let opts = ConnectOptions::default();
        let admin = Client::connect_any(&cluster.clients, &admin, opts).await.unwrap();
        let status = admin.cluster_status().await.unwrap();
        assert_eq!(status.role, "leader");
        let f = status.followers.iter().find(|f| f.node == down).unwrap();
        assert!(f.matched.unwrap_or(0) >= target, "{status:?}");
        println!(
            "cluster catch-up: {n} messages ({} MiB), {target} log entries replayed, follower RSS peak {} MiB (the leader's now: {} MiB)",
            backlog_kib / 1024,
            peak / 1024,
            common::rss_kib(cluster.pid(leader)) / 1024,
        );
    });
}

#[test]
fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot() {
    // Snapshots every 100 entries, 20 kept: the leader soon purges what
    // the follower that is down has not got.
    let mut cluster = Cluster::configured(3, "snapshot_every = 100\nlog_kept = 20\n");
    cluster.start_all();
    runtime().block_on(async {
        let client = cluster.connect().await;
        client.declare(QueueSpec::new("snap")).await.unwrap();
        client.bind("snap", "snap.>").await.unwrap();
        let leader = cluster.node_of(&client);
        let down = (1..=3u64).find(|id| *id != leader).unwrap();
        cluster.kill(down);
        // Publish (a few in flight, so entries stay small and many) until
        // the leader has purged its log.
        let publish = |from: u64, to: u64| {
            let client = &client;
            async move {
                let mut pending = std::collections::VecDeque::new();
                for i in from..to {
                    let payload = format!("m{i:08}").into_bytes();
                    pending.push_back(client.publish("snap.x", vec![], payload));
                    if pending.len() >= 8 {
                        assert_eq!(pending.pop_front().unwrap().await.unwrap(), 1);
                    }
                }
                for p in pending {
                    assert_eq!(p.await.unwrap(), 1);
                }
            }
        };
        let mut sent = 0u64;
        while cluster.gauge(leader, "sluice_raft_purged_index").unwrap_or(0) == 0 {
            assert!(sent < 200_000, "no purge after {sent} messages\n{}", cluster.logs());
            publish(sent, sent + 500).await;
            sent += 500;
        }
        // Some acked (ack bitmaps in the snapshot), then more published.
        let mut sub = client.subscribe("snap", 100).await.unwrap();
        for i in 0..300u64 {
            let d = sub.next().await.unwrap();
            assert_eq!(d.payload, format!("m{i:08}").into_bytes());
            sub.ack(d.tag);
        }
        drop(sub);
        publish(sent, sent + 200).await;
        sent += 200;
        let target = cluster.gauge(leader, "sluice_raft_last_log_index").unwrap();
        let purged = cluster.gauge(leader, "sluice_raft_purged_index").unwrap();
        cluster.start(down);
        cluster.caught_up(down, target, || {}).await;
        let snapshot = cluster.gauge(down, "sluice_raft_snapshot_index").unwrap();
        assert!(
            snapshot > purged,
            "the follower caught up from a snapshot (it has {snapshot}, the leader purged to {purged})"
        );
        // It leads now, and serves exactly what was confirmed and not acked.
        let admin = cluster.dir.path().join("certs/admin");
        let opts = ConnectOptions::default();
        let admin = Client::connect_any(&cluster.clients, &admin, opts).await.unwrap();
        let status = admin.cluster_status().await.unwrap();
        assert!(status.purged > 0 && status.snapshot >= status.purged, "{status:?}");
        // The old leader may close the connection before it answers.
        match admin.transfer_leadership(down).await {
            Ok(()) | Err(ClientError::ConnectionLost(_)) => {}
            Err(e) => panic!("transfer to node {down}: {e}"),
        }
        drop(client);
        let mut client = cluster.connect().await;
        while cluster.node_of(&client) != down {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client = cluster.connect().await;
        }
        let mut sub = client.subscribe("snap", 256).await.unwrap();
        for i in 300..sent {
            let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .expect("every message is delivered")
                .unwrap();
            assert_eq!(d.payload, format!("m{i:08}").into_bytes());
            sub.ack(d.tag);
        }
        let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
        assert!(extra.is_err(), "nothing more: {extra:?}");
        println!(
            "cluster snapshot catch-up: {sent} messages, leader's log purged to {purged} of {target}, follower installed a snapshot at {snapshot}"
        );
    });
}

/// Membership changes while the cluster serves: a fourth node, started
/// with `--join` from an identity issued later, is added (it catches up,
/// then votes); the leader is removed (it hands its leadership over),
/// loses its directory and is added again from nothing; with one of the
/// original nodes killed, three of the four voters are left, so every
/// write after that commits only with both added nodes. Nothing confirmed
/// is lost on the way.
#[test]
fn a_node_is_added_and_the_leader_removed_while_the_cluster_serves() {
    let mut cluster = Cluster::new(3);
    cluster.start_all();
    let new = cluster.joiner();
    // A node identity comes from the cluster CA only.
    let out = Command::new(BIN)
        .args(["certs", "issue", "--node", "9", "--ca"])
        .arg(cluster.dir.path().join("certs"))
        .arg("--out")
        .arg(cluster.dir.path().join("node-9"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a cluster CA"),
        "{err}"
    );
    let publish = |client: &Client, from: u64, to: u64| {
        let client = client.clone();
        async move {
            for i in from..to {
                let payload = format!("m{i:05}").into_bytes();
                assert_eq!(
                    client.publish("orders.x", vec![], payload).await.unwrap(),
                    1
                );
            }
        }
    };
    let leader = runtime().block_on(async {
        let client = cluster.connect().await;
        client.declare(QueueSpec::new("orders")).await.unwrap();
        client.bind("orders", "orders.>").await.unwrap();
        publish(&client, 0, 200).await;
        cluster.node_of(&client)
    });
    cluster.start(new);
    let new_raft = cluster.rafts[new as usize - 1].to_string();
    let new_client = cluster.clients[new as usize - 1].to_string();
    runtime().block_on(async {
        // Not added yet: it refuses clients and knows no leader.
        let mut refused = None;
        for _ in 0..100 {
            match Client::connect(cluster.clients[new as usize - 1], &cluster.identity()).await {
                Err(ClientError::Server(body)) => {
                    refused = Some(body);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let body = refused.expect("the joining node answers");
        assert_eq!(body.code, ErrorCode::NotLeader, "{body}");
        assert_eq!(body.leader(), None, "{body}");
    });
    // Refused: a tenant; an id in use with other addresses; an address in
    // use; a node that is not a member.
    let tenant = Command::new(BIN)
        .args([
            "cluster",
            "add",
            &new.to_string(),
            "--raft",
            &new_raft,
            "--client",
            &new_client,
        ])
        .arg("--server")
        .arg(cluster.clients[leader as usize - 1].to_string())
        .arg("--identity")
        .arg(cluster.identity())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&tenant.stderr).contains("for administrators"));
    let taken = cluster.rafts[0].to_string();
    for (args, want) in [
        (
            vec!["add", "2", "--raft", &new_raft, "--client", &new_client],
            "member already",
        ),
        (
            vec!["add", "7", "--raft", &taken, "--client", &new_client],
            "has one of the addresses",
        ),
        (vec!["remove", "7"], "node 7 is not a member"),
    ] {
        let out = cluster.admin(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    // First a learner (replicated to, not voting), then promoted.
    let add = |more: &[&str]| {
        let id = new.to_string();
        let mut args = vec!["add", &id, "--raft", &new_raft, "--client", &new_client];
        args.extend(more);
        let out = cluster.admin(&args);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        add(&["--learner"]),
        format!("node {new} added as a learner; members 1, 2, 3, learners {new}")
    );
    let out = cluster.admin(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["learners"], serde_json::json!([new]), "{status}");
    assert_eq!(
        add(&[]),
        format!("node {new} added as a voter; members 1, 2, 3, {new}")
    );
    let out = cluster.admin(&[
        "add",
        &new.to_string(),
        "--raft",
        &new_raft,
        "--client",
        &new_client,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a voter already"));
    let out = cluster.admin(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["members"],
        serde_json::json!([1, 2, 3, new]),
        "{status}"
    );
    assert_eq!(status["learners"], serde_json::json!([]), "{status}");
    // The added node holds what was published before it came.
    let target = cluster
        .gauge(leader, "sluice_raft_committed_index")
        .unwrap();
    runtime().block_on(cluster.caught_up(new, target, || {}));
    assert_eq!(cluster.gauge(new, "sluice_raft_voters"), Some(4));
    assert_eq!(cluster.gauge(new, "sluice_raft_learners"), Some(0));

    // The leader removed: it hands its leadership over.
    let out = cluster.admin(&["remove", &leader.to_string()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let left: Vec<u64> = (1..=new).filter(|n| *n != leader).collect();
    let names = left
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        said.trim(),
        format!("node {leader} removed; members {names}")
    );
    // Removed, it serves no one (it stepped down to a learner that still
    // names itself the leader of its term).
    runtime().block_on(async {
        let at = cluster.clients[leader as usize - 1];
        // (openraft steps it down 150 ms after the change commits.)
        for tries in 0.. {
            match Client::connect(at, &cluster.identity()).await {
                Err(ClientError::Server(body)) if body.code == ErrorCode::NotLeader => break,
                Ok(c) => drop(c),
                Err(e) => panic!("node {leader}: {e}"),
            }
            assert!(
                tries < 300,
                "node {leader} still serves\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    cluster.kill(leader);
    // Its directory lost, it comes back as a new node would: started with
    // --join, added again under its id.
    std::fs::remove_dir_all(cluster.dir.path().join(format!("data/node-{leader}"))).unwrap();
    cluster.start_with(leader, &["--join"]);
    let (raft, client) = (
        cluster.rafts[leader as usize - 1].to_string(),
        cluster.clients[leader as usize - 1].to_string(),
    );
    let out = cluster.admin(&[
        "add",
        &leader.to_string(),
        "--raft",
        &raft,
        "--client",
        &client,
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    // One of the original nodes down: three of four voters left, so a
    // write commits only with both added nodes.
    let gone = left.iter().copied().find(|n| *n != new).unwrap();
    cluster.kill(gone);
    runtime().block_on(async {
        let client = cluster.connect().await;
        let serving = cluster.node_of(&client);
        assert!(
            serving != leader && serving != gone,
            "node {serving} serves"
        );
        publish(&client, 200, 300).await;
        let mut sub = client.subscribe("orders", 64).await.unwrap();
        for i in 0..300u64 {
            let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .expect("every confirmed message is delivered")
                .unwrap();
            assert_eq!(d.payload, format!("m{i:05}").into_bytes());
            sub.ack(d.tag);
        }
        let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
        assert!(extra.is_err(), "nothing more: {extra:?}");
    });
}
