//! Metadata writes through a three-node Raft group (openraft: log in files, state in sled) over
//! loopback QUIC with the nodes' own certificates: commit latency of one
//! write at a time, and throughput with writes in flight. Every write is
//! answered after a quorum fsynced it and the leader applied (and synced) it.
//!
//! Run: `cargo run --release -p sluice --example cluster_writes`
//! (`SLUICE_CLUSTER_WRITES=N` writes per phase, default 2000).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::Raft;
use sluice::cluster::log::FileLog;
use sluice::cluster::meta::MetaState;
use sluice::cluster::net::{MetaRaft, QuicNetwork, no_spool, serve};
use sluice::cluster::{MetaCommand, Peer};
use sluice::tls::{NodeTls, init_node_certs, node_name};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("SLUICE_CLUSTER_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    init_node_certs(&dir.path().join("certs"), &[1, 2, 3])?;
    let config = Arc::new(
        openraft::Config {
            heartbeat_interval: 100,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            ..Default::default()
        }
        .validate()?,
    );
    let mut nodes: Vec<MetaRaft> = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let tls = NodeTls::from_dir(&dir.path().join("certs").join(node_name(id)));
        let endpoint = quinn::Endpoint::server(tls.server_config()?, "127.0.0.1:0".parse()?)?;
        let node = dir.path().join(format!("node-{id}"));
        let db = sled::Config::new().path(node.join("state")).open()?;
        let log = FileLog::open(&node.join("log"), "meta")?;
        let state = MetaState::open(&db, "meta")?;
        let net = QuicNetwork::new(endpoint.clone(), tls.client_config()?);
        let raft = Raft::new(id, config.clone(), net, log, state).await?;
        tokio::spawn(serve(endpoint.clone(), raft.clone(), no_spool()));
        let raft_addr = endpoint.local_addr()?.to_string();
        members.insert(
            id,
            Peer {
                raft: raft_addr,
                client: String::new(),
            },
        );
        nodes.push(raft);
    }
    nodes[0].initialize(members).await?;
    let leader = loop {
        if let Some(l) = nodes[0].current_leader().await {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let raft = nodes[leader as usize - 1].clone();
    let put = |i: usize| MetaCommand::Put {
        key: format!("queue/bench/q{i}"),
        value: vec![7; 100],
    };

    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        raft.client_write(put(i)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let one = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "one at a time: {one:.0} writes/s, commit p50 {:.2} ms, p99 {:.2} ms",
        q(0.5),
        q(0.99)
    );

    for inflight in [16usize, 64] {
        let start = Instant::now();
        let tasks: Vec<_> = (0..inflight)
            .map(|t| {
                let raft = raft.clone();
                tokio::spawn(async move {
                    for i in 0..n / inflight {
                        raft.client_write(put(n + t * n + i)).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let rate = (n / inflight * inflight) as f64 / start.elapsed().as_secs_f64();
        println!("{inflight} in flight: {rate:.0} writes/s");
    }
    for r in nodes {
        r.shutdown().await?;
    }
    Ok(())
}
