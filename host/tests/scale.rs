//! Memory under load, measured on the real `sluice` binary as a child
//! process: a backlog that a consumer never acks, many idle mTLS
//! connections, many queues. Each test has a small default size for CI and
//! a larger one through environment variables; each prints what it measured
//! (`--nocapture`) and asserts bounds that a per-message copy of the payload,
//! or a per-connection or per-queue leak, would break.

use std::time::{Duration, Instant};

use sluice_client::{Client, QueueSpec};

mod common;
use common::{certs, connect, env_or, free_port, rss_kib, spawn};

/// A consumer that never acks and a backlog of `SLUICE_BACKLOG` (default
/// 100,000) messages of `SLUICE_BACKLOG_SIZE` (default 1 KiB): the broker
/// holds ids and sizes in memory, never the payloads, so its RSS grows by
/// far less than the backlog's bytes; producers are flow-controlled by
/// confirms (at most 256 unconfirmed here). Then the broker is killed and
/// restarted on the backlog: the time until it serves again is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_is_never_acked_keeps_rss_bounded() {
    use futures::StreamExt;
    let count = env_or("SLUICE_BACKLOG", 100_000);
    let size = env_or("SLUICE_BACKLOG_SIZE", 1024) as usize;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let mut child = spawn(dir.path(), addr, &[]);
    let c = connect(dir.path(), addr).await;
    c.declare(QueueSpec::new("backlog")).await.unwrap();
    c.bind("backlog", "b").await.unwrap();
    let consumer = connect(dir.path(), addr).await;
    let mut sub = consumer.subscribe("backlog", 256).await.unwrap();
    let base = rss_kib(child.id());

    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    let mut confirmed = 0u64;
    while confirmed < count {
        while sent < count && inflight.len() < 256 {
            let mut payload = vec![b'x'; size];
            payload[..8].copy_from_slice(&sent.to_be_bytes());
            inflight.push(c.publish("b", vec![], payload));
            sent += 1;
        }
        inflight.next().await.unwrap().expect("publish confirmed");
        confirmed += 1;
    }
    let publish_s = started.elapsed().as_secs_f64();
    // The consumer got its prefetch and nothing more.
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        got += 1;
    }
    assert_eq!(
        got, 256,
        "a consumer that never acks holds exactly its prefetch"
    );
    let q = c.list_queues().await.unwrap();
    let q = q.iter().find(|q| q.name == "backlog").unwrap();
    assert_eq!((q.ready, q.unacked), (count - 256, 256));
    tokio::time::sleep(Duration::from_millis(300)).await;
    sampler.abort();
    let end = rss_kib(pid);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed).max(end);
    let backlog_kib = count * size as u64 / 1024;
    println!(
        "backlog: messages={count} size={size} backlog={} MiB publish={:.0} msg/s \
         rss base={} MiB peak={} MiB end={} MiB growth={:.0} B/message",
        backlog_kib / 1024,
        count as f64 / publish_s,
        base / 1024,
        peak / 1024,
        end / 1024,
        (peak - base) as f64 * 1024.0 / count as f64
    );
    // Bound: sled's 64 MiB page cache, 128 bytes of bookkeeping per message
    // and 48 MiB of slack; a payload copy per message breaks it as soon as
    // the backlog outgrows the cache.
    let bound = 64 * 1024 + count * 128 / 1024 + 48 * 1024;
    assert!(
        peak - base < bound,
        "RSS grew by {} KiB for a {backlog_kib} KiB backlog (bound {bound} KiB)",
        peak - base
    );

    // Restart on the backlog: time until the broker serves it again.
    drop(sub);
    consumer.close();
    c.close();
    child.kill().unwrap();
    child.wait().unwrap();
    let restarted = Instant::now();
    let mut child = spawn(dir.path(), addr, &[]);
    let c = connect(dir.path(), addr).await;
    let mut sub = c.subscribe("backlog", 16).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .unwrap()
        .unwrap();
    let serve_s = restarted.elapsed().as_secs_f64();
    assert!(first.redelivered);
    let q = c.list_queues().await.unwrap();
    let q = q.iter().find(|q| q.name == "backlog").unwrap();
    assert_eq!(q.ready + q.unacked, count, "every message is back");
    println!(
        "backlog: restart with {count} queued messages served the first delivery after {serve_s:.2} s, rss {} MiB",
        rss_kib(child.id()) / 1024
    );
    c.close();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `SLUICE_SCALE_CONNECTIONS` (default 200) concurrent mTLS connections and
/// `SLUICE_SCALE_QUEUES` (default 2,000) queues, each with a binding: every
/// connection keeps being served, every queue routes, and the broker's
/// memory per idle connection and per queue is printed and bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_and_queues() {
    let connections = env_or("SLUICE_SCALE_CONNECTIONS", 200);
    let queues = env_or("SLUICE_SCALE_QUEUES", 2_000);
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let mut child = spawn(dir.path(), addr, &[]);
    let first = connect(dir.path(), addr).await;
    first.list_queues().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib(child.id());

    // Connections, a few at a time (each is a full mTLS handshake).
    let identity = dir.path().join("certs/acme");
    let mut clients: Vec<Client> = Vec::new();
    let started = Instant::now();
    while (clients.len() as u64) < connections {
        let batch = (connections - clients.len() as u64).min(16);
        let opened =
            futures::future::join_all((0..batch).map(|_| Client::connect(addr, &identity))).await;
        for c in opened {
            clients.push(c.expect("connection accepted"));
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_connections = rss_kib(child.id());
    // Every connection is still served.
    let answered = futures::future::join_all(clients.iter().map(|c| c.list_queues())).await;
    assert!(
        answered.iter().all(|r| r.is_ok()),
        "every connection is served"
    );
    let per_connection = (with_connections.saturating_sub(base)) as f64 / connections as f64;

    // Queues, declared and bound from several connections at once.
    let started = Instant::now();
    let workers = 8u64;
    futures::future::join_all((0..workers).map(|w| {
        let c = clients[w as usize % clients.len()].clone();
        async move {
            let mut i = w;
            while i < queues {
                c.declare(QueueSpec::new(&format!("q{i}"))).await.unwrap();
                c.bind(&format!("q{i}"), &format!("s.{i}.>")).await.unwrap();
                i += workers;
            }
        }
    }))
    .await;
    let declare_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_queues = rss_kib(child.id());
    let per_queue = (with_queues.saturating_sub(with_connections)) as f64 / queues as f64;
    assert_eq!(first.list_queues().await.unwrap().len() as u64, queues);
    // Routing works across all those bindings: each probe reaches its queue.
    for i in [0, queues / 2, queues - 1] {
        let reached = first
            .publish(&format!("s.{i}.x"), vec![], b"probe".to_vec())
            .await
            .unwrap();
        assert_eq!(reached, 1, "s.{i}.x reaches q{i}");
    }
    println!(
        "scale: connections={connections} in {connect_s:.1} s, {per_connection:.1} KiB each; \
         queues={queues} (+binding) in {declare_s:.1} s, {per_queue:.2} KiB each; \
         rss base={} MiB with connections={} MiB with queues={} MiB",
        base / 1024,
        with_connections / 1024,
        with_queues / 1024
    );
    // Bounds well above what is measured, far below a leak of one buffer
    // per connection or of a message cache per queue.
    assert!(
        per_connection < 512.0,
        "{per_connection:.1} KiB per idle connection"
    );
    assert!(per_queue < 64.0, "{per_queue:.2} KiB per queue");
    for c in &clients {
        c.close();
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
