//! The adversarial-tenant suite: tenant A (`acme`) tries the abuses of the
//! security table (docs/security.md) against a real broker over real QUIC,
//! while tenant B (`globex`) publishes and consumes at a fixed rate the
//! whole time. Every abuse is refused with its error code or bounded; B
//! loses nothing; the process stays under a stated memory bound. B's
//! latency per phase is printed (the figures in BENCHMARKS.md), never
//! asserted: a timed assertion would depend on the machine.
//!
//! Focused tests below the suite cover what needs a restart or a special
//! broker configuration.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_client::{ErrorCode, QueueSpec};
use sluice_proto::{self as proto, Frame, Request, Response};
use sluice_tests::Harness;
use sluice_tests::raw::{Raw, flood, raw, read_frames, stalls};

const WAIT: Duration = Duration::from_secs(20);
/// B's steady rate, messages per second.
const B_RATE: u64 = 200;
/// Bound on the test process's resident memory growth over the suite
/// (broker and clients run in this process, so it bounds the broker too).
const RSS_GROWTH_MIB: u64 = 512;

/// Resident memory of this process, MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// The code of a refused request.
fn code<T>(r: Result<T, sluice_client::ClientError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a refusal with a code, got {e}")),
        Ok(_) => panic!("expected a refusal, the request succeeded"),
    }
}

/// Tenant B's steady traffic: a publisher at [`B_RATE`] and a consumer
/// that acks everything, with the publish→deliver latency of each message.
struct Steady {
    stop: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<(BTreeSet<u64>, u64)>,
    received: Arc<Mutex<Vec<(u64, Instant, f64)>>>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Steady {
    async fn start(h: &Harness) -> Steady {
        let b = h.client("globex").await;
        b.declare(QueueSpec::new("steady")).await.unwrap();
        b.bind("steady", "steady").await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let mut sub = b.subscribe("steady", 64).await.unwrap();
        let consumer = {
            let received = received.clone();
            tokio::spawn(async move {
                while let Some(d) = sub.next().await {
                    let seq = u64::from_be_bytes(d.payload[..8].try_into().unwrap());
                    let sent = u64::from_be_bytes(d.payload[8..16].try_into().unwrap());
                    let now = epoch.elapsed().as_nanos() as u64;
                    let ms = now.saturating_sub(sent) as f64 / 1e6;
                    received.lock().unwrap().push((seq, Instant::now(), ms));
                    sub.ack(d.tag);
                }
            })
        };
        let publisher = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut confirmed = BTreeSet::new();
                let mut refused = 0;
                let mut pending = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(
                        (epoch + Duration::from_micros(seq * 1_000_000 / B_RATE)).into(),
                    )
                    .await;
                    let sent = epoch.elapsed().as_nanos() as u64;
                    let mut payload = seq.to_be_bytes().to_vec();
                    payload.extend_from_slice(&sent.to_be_bytes());
                    payload.resize(100, 0);
                    pending.push((seq, b.publish("steady", vec![], payload)));
                    seq += 1;
                    if pending.len() >= 32 {
                        for (s, f) in pending.drain(..) {
                            match f.await {
                                Ok(1) => {
                                    confirmed.insert(s);
                                }
                                _ => refused += 1,
                            }
                        }
                    }
                }
                for (s, f) in pending {
                    match f.await {
                        Ok(1) => {
                            confirmed.insert(s);
                        }
                        _ => refused += 1,
                    }
                }
                (confirmed, refused)
            })
        };
        Steady {
            stop,
            publisher,
            received,
            consumer,
        }
    }

    /// Stop publishing, wait for every confirmed message, and check that
    /// B lost nothing and was refused nothing.
    async fn finish(self) -> Vec<(u64, Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        let (confirmed, refused) = self.publisher.await.unwrap();
        assert_eq!(refused, 0, "tenant B had publishes refused");
        let deadline = Instant::now() + WAIT;
        loop {
            let got: BTreeSet<u64> = self.received.lock().unwrap().iter().map(|r| r.0).collect();
            let missing: Vec<&u64> = confirmed.difference(&got).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tenant B lost {} confirmed messages, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.consumer.abort();
        let out = self.received.lock().unwrap().clone();
        assert!(out.len() >= confirmed.len());
        out
    }
}

/// Phases of the suite: a name and when it started.
#[derive(Default)]
struct Phases(Vec<(String, Instant)>);

impl Phases {
    fn start(&mut self, name: &str) {
        eprintln!("phase: {name}");
        self.0.push((name.to_string(), Instant::now()));
    }

    /// B's latency percentiles per phase.
    fn report(&self, samples: &[(u64, Instant, f64)]) {
        println!(
            "tenant B at {B_RATE} msg/s, publish->deliver latency per phase of tenant A's abuse:"
        );
        println!(
            "{:<28} {:>6} {:>9} {:>9}",
            "phase", "msgs", "p50 ms", "p99 ms"
        );
        for (i, (name, from)) in self.0.iter().enumerate() {
            let to = self.0.get(i + 1).map(|p| p.1);
            let mut lat: Vec<f64> = samples
                .iter()
                .filter(|s| s.1 >= *from && to.is_none_or(|t| s.1 < t))
                .map(|s| s.2)
                .collect();
            if lat.is_empty() {
                continue;
            }
            lat.sort_by(|a, b| a.total_cmp(b));
            let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            println!(
                "{name:<28} {:>6} {:>9.2} {:>9.2}",
                lat.len(),
                q(0.5),
                q(0.99)
            );
        }
    }
}

/// The broker settings of the suite: the defaults, with bounds small
/// enough to reach quickly.
fn suite_config(c: &mut sluice::broker::BrokerConfig) {
    c.max_bindings_per_tenant = 300;
    c.max_fanout = 16;
    c.max_prefetch_bytes = 1 << 20;
    c.max_plugins_per_tenant = 8;
}

/// A raw request on a raw connection; its response.
async fn raw_request(r: &mut Raw, id: u64, body: Request) -> Frame {
    r.send
        .write_all(&proto::encode_frame(&Frame::Request {
            id,
            tenant: None,
            body,
        }))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let frames = read_frames(&mut r.recv, 1).await;
        match frames.into_iter().next() {
            Some(f @ Frame::Response { .. }) => return f,
            Some(_) => continue,
            None if Instant::now() < deadline => continue,
            None => panic!("no response"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_is_bounded_while_another_is_served() {
    let h = Harness::start_with(suite_config).await;
    let rss_start = rss_mib();
    let steady = Steady::start(&h).await;
    let mut phases = Phases::default();
    let a = h.client("acme").await;

    phases.start("alone");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Settle ranges are resolved against what the subscription holds: a
    // range spanning every tag settles the held ones and costs nothing more.
    phases.start("huge ack ranges");
    a.declare(QueueSpec::new("acks")).await.unwrap();
    a.bind("acks", "acks").await.unwrap();
    for i in 0..100u32 {
        a.publish("acks", vec![], i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    let mut r = raw(&h, 1 << 20).await;
    let sub = match raw_request(
        &mut r,
        1,
        Request::Subscribe {
            queue: "acks".into(),
            prefetch: 10,
        },
    )
    .await
    {
        Frame::Response {
            body: Ok(Response::Subscribed { sub }),
            ..
        } => sub,
        other => panic!("{other:?}"),
    };
    let mut deliveries = r.conn.accept_uni().await.unwrap();
    let got = read_frames(&mut deliveries, 2).await;
    assert!(matches!(got[1], Frame::Deliver { .. }), "{got:?}");
    let every = Frame::Ack {
        sub,
        ranges: vec![(0, u64::MAX); 4096],
    };
    let mut buf = Vec::new();
    for _ in 0..64 {
        proto::encode(&every, &mut buf);
    }
    for _ in 0..20 {
        r.send.write_all(&buf).await.unwrap();
    }
    // The connection still answers, and every delivery it held was acked
    // by the ranges (each ack frees credit for the next ten, which the
    // following frames ack in turn).
    assert!(matches!(
        raw_request(&mut r, 2, Request::ListQueues).await,
        Frame::Response { body: Ok(_), .. }
    ));
    let deadline = Instant::now() + WAIT;
    loop {
        let q = a.list_queues().await.unwrap();
        let acks = q.iter().find(|q| q.name == "acks").unwrap();
        if acks.published == 100 && acks.ready + acks.unacked == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "held deliveries not acked: {acks:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(r);

    // SyncAcks requests without reading the answers: a bounded number
    // wait for their fsync, then the broker stops reading.
    phases.start("sync_acks flood");
    let mut r = raw(&h, 64 << 10).await;
    let sub = match raw_request(
        &mut r,
        1,
        Request::Subscribe {
            queue: "acks".into(),
            prefetch: 1,
        },
    )
    .await
    {
        Frame::Response {
            body: Ok(Response::Subscribed { sub }),
            ..
        } => sub,
        other => panic!("{other:?}"),
    };
    let written = flood(r.send, move |i| Frame::Request {
        id: 10 + i,
        tenant: None,
        body: Request::SyncAcks { sub },
    });
    let stalled = stalls(&written).await;
    assert!(
        stalled < 16 << 20,
        "SyncAcks flood not bounded: {stalled} bytes"
    );
    // Stalled with exactly PENDING_SYNCS (64) waiting, never more.
    let peaks = h.running.as_ref().unwrap().broker.session_peaks();
    assert_eq!(
        peaks.pending_syncs, 64,
        "SyncAcks waiting at once ({stalled} bytes written)"
    );
    drop(r.recv);

    // Empty publishes without reading confirms: each counts a fixed
    // overhead against the connection's publish budget.
    phases.start("empty publish flood");
    a.declare(QueueSpec::new("empty").transient())
        .await
        .unwrap();
    a.bind("empty", "empty").await.unwrap();
    let r = raw(&h, 64 << 10).await;
    let written = flood(r.send, |i| Frame::Publish {
        seq: i,
        tenant: None,
        topic: "empty".into(),
        headers: vec![],
        payload: vec![],
    });
    let stalled = stalls(&written).await;
    // 8 MiB budget / 256 B per publish = 32 768 publishes of ~10 bytes,
    // plus the client's windows: far below what 8 MiB of 1-byte budget
    // entries (millions of publishes) would take.
    assert!(
        stalled < 8 << 20,
        "empty publishes not bounded: {stalled} bytes"
    );
    drop(r.recv);

    // Prefetch: by count per subscription, by sum per connection, and by
    // bytes (a subscription holds at most max_prefetch_bytes unacked).
    phases.start("prefetch bounds");
    assert_eq!(
        code(a.subscribe("acks", u32::MAX).await),
        ErrorCode::LimitExceeded
    );
    // max_prefetch alone: `a` holds no subscription, so 10 001 is far
    // within the 65 536 a connection may hold; only max_prefetch refuses it.
    let e = a.subscribe("acks", 10_001).await.err().expect("refused");
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    assert!(
        e.to_string()
            .contains("above the broker's maximum of 10000"),
        "refused by max_prefetch, not another bound: {e}"
    );
    // 10 000 (at max_prefetch) is accepted, six times: 60 000 held.
    let mut subs = Vec::new();
    for _ in 0..6 {
        subs.push(a.subscribe("acks", 10_000).await.unwrap());
    }
    // max_unacked_per_connection alone, each prefetch within max_prefetch:
    // 5 536 more makes exactly 65 536 (accepted), one more is refused.
    subs.push(a.subscribe("acks", 5_536).await.unwrap());
    for prefetch in [1, 10_000] {
        let e = a.subscribe("acks", prefetch).await.err().expect("refused");
        assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
        assert!(
            e.to_string().contains("at most 65536 unacked"),
            "65 536 + {prefetch} refused by max_unacked_per_connection: {e}"
        );
    }
    drop(subs);
    a.declare(QueueSpec::new("big")).await.unwrap();
    a.bind("big", "big").await.unwrap();
    for i in 0..16u8 {
        a.publish("big", vec![], vec![i; 256 << 10]).await.unwrap();
    }
    let held = a.subscribe("big", 10_000).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = a.list_queues().await.unwrap();
    let big = q.iter().find(|q| q.name == "big").unwrap();
    // 1 MiB of prefetch bytes: four 256 KiB messages (plus framing).
    assert!(
        (1..=4).contains(&big.unacked),
        "a subscription held {} unacked 256 KiB messages with 1 MiB of prefetch bytes",
        big.unacked
    );
    drop(held);

    // Bindings and fan-out.
    phases.start("bindings and fan-out");
    a.declare(QueueSpec::new("fan")).await.unwrap();
    let mut bound = 0;
    let refusal = loop {
        match a.bind("fan", &format!("fan.{bound}")).await {
            Ok(()) => bound += 1,
            Err(e) => break e,
        }
        assert!(
            bound <= 300,
            "more than max_bindings_per_tenant = 300 bindings"
        );
    };
    assert_eq!(refusal.code(), Some(ErrorCode::LimitExceeded), "{refusal}");
    assert!(bound >= 290, "only {bound} bindings before the limit");
    for i in 0..17 {
        a.declare(QueueSpec::new(&format!("f{i}"))).await.unwrap();
    }
    for i in 0..17 {
        a.unbind("fan", &format!("fan.{i}")).await.unwrap();
        a.bind(&format!("f{i}"), "wide.>").await.unwrap();
    }
    assert_eq!(
        code(a.publish("wide.x", vec![], b"x".to_vec()).await),
        ErrorCode::LimitExceeded,
        "17 target queues exceed max_fanout = 16"
    );
    for i in 17..bound {
        a.unbind("fan", &format!("fan.{i}")).await.unwrap();
    }

    // Messages are checked as they will be stored and delivered: room for
    // the dead-letter headers is kept, so a rejected message at the limit
    // is still delivered from its dead-letter queue.
    phases.start("dead-letter headers");
    a.declare(QueueSpec::new("dead")).await.unwrap();
    a.declare(QueueSpec::new("work").dead_letter("dead"))
        .await
        .unwrap();
    a.bind("work", "work").await.unwrap();
    let headers = |n: usize| -> Vec<(String, String)> {
        (0..n).map(|i| (format!("h{i}"), "v".into())).collect()
    };
    let wire = proto::Limits::default();
    assert_eq!(
        code(
            a.publish("work", headers(wire.max_headers), b"x".to_vec())
                .await
        ),
        ErrorCode::LimitExceeded
    );
    a.publish("work", headers(wire.max_headers - 2), b"x".to_vec())
        .await
        .unwrap();
    let mut work = a.subscribe("work", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, work.next())
        .await
        .unwrap()
        .unwrap();
    work.reject(d.tag);
    let mut dead = a.subscribe("dead", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, dead.next())
        .await
        .expect("the dead-lettered copy is delivered")
        .unwrap();
    assert_eq!(d.headers.len(), wire.max_headers);
    assert!(
        d.headers
            .iter()
            .any(|(k, v)| k == "x-death-reason" && v == "rejected")
    );
    dead.ack(d.tag);
    drop((work, dead));

    // A TTL near u64::MAX milliseconds saturates instead of wrapping into
    // the past (which expired every message at once).
    phases.start("ttl overflow");
    a.declare(QueueSpec::new("forever").ttl(Duration::from_millis(u64::MAX)))
        .await
        .unwrap();
    a.bind("forever", "forever").await.unwrap();
    a.publish("forever", vec![], b"kept".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut sub = a.subscribe("forever", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("not expired")
        .unwrap();
    assert_eq!(d.payload, b"kept");
    drop(sub);

    // Control requests that fsync (bind/unbind) in a loop on several
    // connections run on blocking threads within A's share.
    phases.start("bind/unbind loop x4");
    let stop = Instant::now() + Duration::from_secs(3);
    let mut loops = Vec::new();
    for c in 0..4 {
        let a = h.client("acme").await;
        loops.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < stop {
                a.bind("acks", &format!("loop.{c}")).await.unwrap();
                a.unbind("acks", &format!("loop.{c}")).await.unwrap();
                n += 2;
            }
            n
        }));
    }
    let mut binds = 0;
    for l in loops {
        binds += l.await.unwrap();
    }
    eprintln!("A made {binds} bind/unbind requests");

    phases.start("after");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = steady.finish().await;
    phases.report(&samples);
    let growth = rss_mib().saturating_sub(rss_start);
    println!("process RSS grew by {growth} MiB over the suite (bound {RSS_GROWTH_MIB} MiB)");
    assert!(growth < RSS_GROWTH_MIB, "RSS grew by {growth} MiB");
}

/// A tenant at its connection quota is refused with `quota_exceeded`, and
/// the broker refuses connections beyond `max_connections` altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_tenant_and_per_broker() {
    let h = Harness::start_with(|c| c.max_connections = 6).await;
    let admin = h.client("admin").await;
    admin
        .create_tenant(
            "acme",
            proto::TenantQuota {
                max_connections: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let _a1 = h.client("acme").await;
    let _a2 = h.client("acme").await;
    match h.try_client("acme").await {
        Err(e) => assert!(e.to_string().contains("quota"), "{e}"),
        Ok(_) => panic!("a third acme connection was admitted"),
    }
    // The refused connection counts until the broker closed it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(h.client("globex").await);
    }
    // admin + 2 acme + 3 globex = 6: the broker is full.
    assert!(
        h.try_client("globex").await.is_err(),
        "a connection beyond max_connections was admitted"
    );
    drop(others);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = h.client("globex").await;
    c.declare(QueueSpec::new("ok")).await.unwrap();
}

/// Dead letters never leave orphans: into a full dead-letter queue they
/// are dropped and counted, and after a restart nothing reappears in the
/// source queue (they used to stay in its store, outside every count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dead_letter_queue_orphans_nothing() {
    let mut h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("dlq").max_length(2))
        .await
        .unwrap();
    a.declare(QueueSpec::new("src").dead_letter("dlq"))
        .await
        .unwrap();
    a.bind("src", "src").await.unwrap();
    for i in 0..5u8 {
        a.publish("src", vec![], vec![i; 100]).await.unwrap();
    }
    let mut sub = a.subscribe("src", 5).await.unwrap();
    for _ in 0..5 {
        let d = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        sub.reject(d.tag);
    }
    drop(sub);
    let deadline = Instant::now() + WAIT;
    let (src, dlq) = loop {
        let qs = a.list_queues().await.unwrap();
        let get = |n: &str| qs.iter().find(|q| q.name == n).unwrap().clone();
        let (src, dlq) = (get("src"), get("dlq"));
        if dlq.ready == 2 && src.ready + src.unacked == 0 {
            break (src, dlq);
        }
        assert!(Instant::now() < deadline, "{src:?} {dlq:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(src.bytes, 0);
    assert_eq!(src.dead_lettered, 2, "{src:?}");
    let stats = a.stats().await.unwrap();
    assert_eq!(
        stats[0].bytes, dlq.bytes,
        "stored bytes = what the queues hold"
    );
    drop(a);
    h.restart().await;
    let a = h.client("acme").await;
    let qs = a.list_queues().await.unwrap();
    let src = qs.iter().find(|q| q.name == "src").unwrap();
    assert_eq!(
        src.ready, 0,
        "rejected messages came back after a restart: {src:?}"
    );
    assert_eq!(qs.iter().find(|q| q.name == "dlq").unwrap().ready, 2);
}

/// A dead-letter queue receives messages without a topic: declaring a
/// queue that dead-letters into it needs `publish` on that queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_target_is_authorized() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("secret")).await.unwrap();
    a.declare(QueueSpec::new("open")).await.unwrap();
    a.load_plugin(
        "acl",
        "authorizer",
        None,
        sluice::bundled::wasm("acl-authorizer").unwrap().to_vec(),
        vec![
            ("deny".into(), "* publish queue:secret".into()),
            ("default".into(), "allow".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            a.declare(QueueSpec::new("sneaky").dead_letter("secret"))
                .await
        ),
        ErrorCode::Unauthorized
    );
    a.declare(QueueSpec::new("fine").dead_letter("open"))
        .await
        .unwrap();
    assert_eq!(
        code(a.declare(QueueSpec::new("self").dead_letter("self")).await),
        ErrorCode::Invalid
    );
}

/// A tenant whose authorizer is configured but cannot be loaded at start
/// is denied (it was allowed everything before), says why, and shows it in
/// `plugin list` and `stats`; an administrator repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorizer_that_is_not_running_fails_closed() {
    let small = Arc::new(AtomicU64::new(16 << 20));
    let memory = small.clone();
    let mut h = Harness::start_with(move |c| {
        c.sandbox.memory_limit = memory.load(Ordering::Relaxed) as usize;
    })
    .await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.load_plugin(
        "acl",
        "authorizer",
        None,
        sluice::bundled::wasm("acl-authorizer").unwrap().to_vec(),
        vec![
            ("deny".into(), "* purge queue:q".into()),
            ("default".into(), "allow".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(code(a.purge("q").await), ErrorCode::Unauthorized);
    drop(a);
    // globex: a router and a filter (with a dead-letter queue).
    let g = h.client("globex").await;
    g.declare(QueueSpec::new("dead")).await.unwrap();
    g.declare(QueueSpec::new("f").dead_letter("dead"))
        .await
        .unwrap();
    g.bind("f", "f").await.unwrap();
    g.load_plugin(
        "route",
        "router",
        None,
        sluice::bundled::wasm("topic-router").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    g.load_plugin(
        "filter",
        "filter",
        Some("f"),
        sluice::bundled::wasm("header-filter").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(g.publish("f", vec![], b"ok".to_vec()).await.unwrap(), 1);
    drop(g);
    // Restart with a memory cap the authorizer cannot start under: the
    // tenant used to run with the default allow-all.
    small.store(64 << 10, Ordering::Relaxed);
    h.restart().await;
    // Even connecting is denied, with the reason.
    let e = h.try_client("acme").await.err().expect("refused");
    assert!(e.to_string().contains("not running"), "{e}");
    let admin = h.client("admin").await.for_tenant(Some("acme".into()));
    let plugins = admin.list_plugins().await.unwrap();
    assert!(plugins[0].state.starts_with("not running"), "{plugins:?}");
    let stats = admin.stats().await.unwrap();
    assert_eq!(stats[0].plugins_not_running, 1, "{stats:?}");
    // The repair path: an administrator unloads (or reloads) it.
    admin.unload_plugin("acl").await.unwrap();
    let a = h.client("acme").await;
    a.purge("q").await.unwrap();
    // A router that is not running refuses publishes (the bindings alone
    // are not the tenant's routing policy) ...
    let g = h.client("globex").await;
    let e = g.publish("f", vec![], b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{e}");
    assert!(e.to_string().contains("not running"), "{e}");
    // ... and a filter that is not running dead-letters: never stored unfiltered.
    let admin_g = h.client("admin").await.for_tenant(Some("globex".into()));
    admin_g.unload_plugin("route").await.unwrap();
    assert_eq!(g.publish("f", vec![], b"x".to_vec()).await.unwrap(), 0);
    let mut dead = g.subscribe("dead", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, dead.next())
        .await
        .unwrap()
        .unwrap();
    let reason = d
        .headers
        .iter()
        .find(|(k, _)| k == "x-death-reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(reason.contains("not running"), "{reason}");
    let queues = g.list_queues().await.unwrap();
    let f = queues.iter().find(|q| q.name == "f").unwrap();
    assert_eq!(
        f.ready, 1,
        "only the message stored before the restart: {f:?}"
    );
}

/// A client that never accepts the delivery streams the broker opens
/// (no stream credit) gets `limit_exceeded` after 10 s instead of holding a
/// subscription request forever; the connection keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_accepts_no_delivery_stream_is_refused() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    let mut r = sluice_tests::raw::raw_with(&h, "acme", 1 << 20, 0).await;
    let started = Instant::now();
    match raw_request(
        &mut r,
        1,
        Request::Subscribe {
            queue: "q".into(),
            prefetch: 1,
        },
    )
    .await
    {
        Frame::Response { body: Err(e), .. } => {
            assert_eq!(e.code, ErrorCode::LimitExceeded, "{e:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(9));
    assert!(matches!(
        raw_request(&mut r, 2, Request::ListQueues).await,
        Frame::Response { body: Ok(_), .. }
    ));
}

/// A router's output is bounded and de-duplicated: a queue it names 1000
/// times stores the message once (and the publish is confirmed for one
/// queue); too many targets, unknown queues or none are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_output_is_bounded_and_deduplicated() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("in")).await.unwrap();
    a.bind("in", "r.>").await.unwrap();
    a.load_plugin(
        "r",
        "router",
        None,
        sluice::bundled::wasm("hostile-router").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    let hostile = |mode: &str| vec![("hostile".to_string(), mode.to_string())];
    assert_eq!(
        a.publish("r.x", hostile("dup"), b"once".to_vec())
            .await
            .unwrap(),
        1
    );
    let qs = a.list_queues().await.unwrap();
    assert_eq!(qs[0].ready, 1, "stored once: {qs:?}");
    for mode in ["many", "unknown"] {
        assert_eq!(
            code(a.publish("r.x", hostile(mode), b"x".to_vec()).await),
            ErrorCode::PluginFailed,
            "{mode}"
        );
    }
    assert_eq!(
        code(a.publish("r.x", hostile("empty"), b"x".to_vec()).await),
        ErrorCode::NoRoute
    );
    assert_eq!(a.list_queues().await.unwrap()[0].ready, 1);
}

/// A filter's replacement is checked like a publish: one with more headers
/// than a stored message may carry (room for the dead-letter headers) is a
/// filter failure, and the original is dead-lettered, still deliverable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_output_is_checked_as_stored() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("dead")).await.unwrap();
    a.declare(QueueSpec::new("in").dead_letter("dead"))
        .await
        .unwrap();
    a.bind("in", "f").await.unwrap();
    a.load_plugin(
        "f",
        "filter",
        Some("in"),
        sluice::bundled::wasm("hostile").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    let wire = proto::Limits::default();
    let headers = |n: usize| {
        vec![
            ("hostile".to_string(), "n-headers".to_string()),
            ("count".to_string(), n.to_string()),
        ]
    };
    // At the stored limit: kept.
    a.publish("f", headers(wire.max_headers - 2), b"ok".to_vec())
        .await
        .unwrap();
    // One over (but within the plugin output bound): dead-lettered.
    a.publish("f", headers(wire.max_headers - 1), b"over".to_vec())
        .await
        .unwrap();
    let mut dead = a.subscribe("dead", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, dead.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, b"over");
    let reason = d
        .headers
        .iter()
        .find(|(k, _)| k == "x-death-reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(reason.contains("output"), "{reason}");
    let mut kept = a.subscribe("in", 1).await.unwrap();
    let d = tokio::time::timeout(WAIT, kept.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, b"ok");
    assert_eq!(d.headers.len(), wire.max_headers - 2);
}

/// One tenant cannot take the plugin pool: it is refused at its own limit
/// (plugins, instances) with `limit_exceeded`, its plugins keep working and
/// are not counted as trapping, and another tenant still loads and runs
/// plugins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_exhaust_the_plugin_pool() {
    let h = Harness::start_with(|c| {
        c.sandbox.pool_instances = 24;
        c.sandbox.instances_per_tenant = 16;
    })
    .await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "q").await.unwrap();
    let filter = sluice::bundled::wasm("header-filter").unwrap().to_vec();
    let mut loaded = 0;
    let refusal = loop {
        match a
            .load_plugin(
                &format!("f{loaded}"),
                "filter",
                Some("q"),
                filter.clone(),
                vec![],
            )
            .await
        {
            Ok(()) => loaded += 1,
            Err(e) => break e,
        }
        assert!(loaded <= 16, "acme loaded more than its share");
    };
    assert_eq!(refusal.code(), Some(ErrorCode::LimitExceeded), "{refusal}");
    assert_eq!(loaded, 8, "16 instances / 2 per plugin");
    // acme's plugins all run (the message passes its 8 filters).
    assert_eq!(a.publish("q", vec![], b"x".to_vec()).await.unwrap(), 1);
    let b = h.client("globex").await;
    b.declare(QueueSpec::new("q")).await.unwrap();
    b.bind("q", "q").await.unwrap();
    b.load_plugin(
        "f",
        "filter",
        Some("q"),
        filter,
        vec![("drop".into(), "level=debug".into())],
    )
    .await
    .unwrap();
    assert_eq!(b.publish("q", vec![], b"x".to_vec()).await.unwrap(), 1);
    let dropped = b
        .publish("q", vec![("level".into(), "debug".into())], b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(dropped, 0, "globex's filter runs");
    for p in a.list_plugins().await.unwrap() {
        assert_eq!(p.state, "ready", "{p:?}");
        assert_eq!(p.traps, 0, "{p:?}");
    }
}

/// A tenant whose plugin hogs the CPU is demoted: its work runs at the
/// lowest priority (counted in its usage), while another tenant's is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_hogging_tenant_is_demoted() {
    let h = Harness::start_with(|c| {
        c.sandbox.call_deadline = Duration::from_secs(5);
    })
    .await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "q").await.unwrap();
    a.load_plugin(
        "slow",
        "filter",
        Some("q"),
        sluice::bundled::wasm("hostile").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    let b = h.client("globex").await;
    b.declare(QueueSpec::new("q")).await.unwrap();
    b.bind("q", "q").await.unwrap();
    b.load_plugin(
        "pass",
        "filter",
        Some("q"),
        sluice::bundled::wasm("header-filter").unwrap().to_vec(),
        vec![],
    )
    .await
    .unwrap();
    // ~50 ms of CPU per message (far over 2 ms per message).
    let slow = vec![
        ("hostile".to_string(), "slow".to_string()),
        ("ms".to_string(), "1000".to_string()),
    ];
    for _ in 0..3 {
        a.publish("q", slow.clone(), b"x".to_vec()).await.unwrap();
        b.publish("q", vec![], b"x".to_vec()).await.unwrap();
    }
    let usage = h.running.as_ref().unwrap().broker.tenant_usage();
    let get = |t: &str| usage.iter().find(|u| u.name == t).unwrap();
    assert!(get("acme").demoted_jobs >= 1, "{:?}", get("acme"));
    assert_eq!(get("globex").demoted_jobs, 0, "{:?}", get("globex"));
}

/// A connection holds at most `MAX_SUBSCRIPTIONS` subscriptions (each is a
/// task and a stream): the next is refused with `limit_exceeded`. Run over
/// the in-memory session (the production session code), which accepts every
/// stream the broker opens at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_bounded() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    let mut bytes = proto::encode_frame(&Frame::Hello {
        min_version: 1,
        max_version: 1,
        agent: "many-subs".into(),
    });
    let n = proto::MAX_SUBSCRIPTIONS as u64 + 1;
    for id in 1..=n {
        proto::encode(
            &Frame::Request {
                id,
                tenant: None,
                body: Request::Subscribe {
                    queue: "q".into(),
                    prefetch: 1,
                },
            },
            &mut bytes,
        );
    }
    let broker = &h.running.as_ref().unwrap().broker;
    let t = sluice::session::loopback::run(
        broker,
        sluice_tests::program::client("acme"),
        vec![bytes],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let responses: Vec<_> = t
        .control
        .iter()
        .filter_map(|f| match f {
            Frame::Response { id, body } => Some((*id, body.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(responses.len() as u64, n);
    assert!(responses[..n as usize - 1].iter().all(|(_, b)| b.is_ok()));
    let (id, last) = responses.last().unwrap();
    assert_eq!(*id, n);
    assert_eq!(
        last.as_ref().unwrap_err().code,
        ErrorCode::LimitExceeded,
        "{last:?}"
    );
}

/// `max_queues_per_tenant` bounds every tenant whatever its quota: with the
/// key at 3, a tenant without a quota (or with a higher one) declares three
/// queues and the fourth is refused with `limit_exceeded`; a tenant quota
/// below it is refused with `quota_exceeded` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_queues_per_tenant_is_a_broker_limit_distinct_from_the_quota() {
    let h = Harness::start_with(|c| c.max_queues_per_tenant = 3).await;
    let admin = h.client("admin").await;
    admin
        .create_tenant(
            "globex",
            proto::TenantQuota {
                max_queues: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    admin
        .create_tenant(
            "acme",
            proto::TenantQuota {
                max_queues: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // globex's quota (10) is above the broker's limit (3): the limit refuses.
    let g = h.client("globex").await;
    for i in 0..3 {
        g.declare(QueueSpec::new(&format!("q{i}"))).await.unwrap();
    }
    let e = g.declare(QueueSpec::new("q3")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    // Declaring an existing queue again is not a new queue.
    g.declare(QueueSpec::new("q0")).await.unwrap();
    assert_eq!(g.list_queues().await.unwrap().len(), 3);
    // acme's quota (2) is below it: the quota refuses, first.
    let a = h.client("acme").await;
    for i in 0..2 {
        a.declare(QueueSpec::new(&format!("q{i}"))).await.unwrap();
    }
    assert_eq!(
        code(a.declare(QueueSpec::new("q2")).await),
        ErrorCode::QuotaExceeded
    );
    // Deleting one makes room again under the limit.
    g.delete("q0").await.unwrap();
    g.declare(QueueSpec::new("q3")).await.unwrap();
    assert_eq!(
        code(g.declare(QueueSpec::new("q4")).await),
        ErrorCode::LimitExceeded
    );
}

/// `max_message_bytes` bounds payload + headers for every tenant: with the
/// key at 1000, a publish of exactly 1000 bytes is stored and 1001 is
/// refused with `limit_exceeded`; a tenant's own quota below it refuses
/// with `quota_exceeded`, and above its quota but over the broker's limit
/// is still `limit_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_bytes_is_a_broker_limit_distinct_from_the_quota() {
    let h = Harness::start_with(|c| c.max_message_bytes = 1000).await;
    let admin = h.client("admin").await;
    admin
        .create_tenant(
            "globex",
            proto::TenantQuota {
                max_message_bytes: Some(500),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Headers count: 10 bytes of header names and values, the rest payload.
    let message = |total: usize| {
        (
            vec![("hkey".to_string(), "value!".to_string())],
            vec![1u8; total - 10],
        )
    };
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "q").await.unwrap();
    let (headers, payload) = message(1000);
    assert_eq!(a.publish("q", headers, payload).await.unwrap(), 1);
    let (headers, payload) = message(1001);
    let e = a.publish("q", headers, payload).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    assert!(e.to_string().contains("1001 bytes"), "{e}");
    // A payload alone over the limit, no headers.
    assert_eq!(
        code(a.publish("q", vec![], vec![0; 1001]).await),
        ErrorCode::LimitExceeded
    );

    let g = h.client("globex").await;
    g.declare(QueueSpec::new("q")).await.unwrap();
    g.bind("q", "q").await.unwrap();
    let (headers, payload) = message(500);
    assert_eq!(g.publish("q", headers, payload).await.unwrap(), 1);
    let (headers, payload) = message(501);
    assert_eq!(
        code(g.publish("q", headers, payload).await),
        ErrorCode::QuotaExceeded
    );
    let (headers, payload) = message(1001);
    assert_eq!(
        code(g.publish("q", headers, payload).await),
        ErrorCode::LimitExceeded
    );
    let stored: u64 =
        a.list_queues().await.unwrap()[0].ready + g.list_queues().await.unwrap()[0].ready;
    assert_eq!(
        stored, 2,
        "only the publishes within the bounds were stored"
    );
}
