//! Durability of the real `sluice` binary: confirmed messages survive
//! `kill -9`, and confirms are preceded by fdatasync (checked with strace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_client::{Client, QueueSpec};

mod common;
#[allow(dead_code)]
#[path = "../../tests/support/provision.rs"]
mod provision;
use common::{BIN, certs, connect, free_port};

fn spawn(dir: &Path, addr: SocketAddr) -> common::Served {
    common::spawn(dir, addr, &[])
}

/// What the crash suite's clients saw, across every round.
#[derive(Default)]
struct Ledger {
    /// Ids handed to `publish` (recorded before the frame is sent).
    sent: BTreeSet<u64>,
    /// Ids whose publish was confirmed.
    confirmed: BTreeSet<u64>,
    /// Deliveries per id.
    delivered: BTreeMap<u64, u32>,
    /// Ids whose ack was followed by a successful `sync_acks`.
    settled: BTreeSet<u64>,
    /// Deliveries of ids nobody published.
    invented: Vec<u64>,
    /// Deliveries of ids that had been acked and synced.
    settled_redelivered: Vec<u64>,
    /// Repeated deliveries not flagged `redelivered`.
    unflagged: Vec<u64>,
}

impl Ledger {
    fn record(&mut self, id: u64, redelivered: bool) {
        if !self.sent.contains(&id) {
            self.invented.push(id);
        }
        let n = self.delivered.entry(id).or_default();
        *n += 1;
        if *n > 1 {
            if self.settled.contains(&id) {
                self.settled_redelivered.push(id);
            }
            if !redelivered {
                self.unflagged.push(id);
            }
        }
    }
}

type Shared = std::sync::Arc<std::sync::Mutex<Ledger>>;

/// Publish ids `first, first+1, ...` (tagged with publisher `p`) with at
/// most 64 unconfirmed until the connection dies; returns the next id.
async fn crash_publisher(c: Client, p: u64, first: u64, ledger: Shared) -> u64 {
    use futures::StreamExt;
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut n = first;
    loop {
        while inflight.len() < 64 {
            let id = (p << 48) | n;
            ledger.lock().unwrap().sent.insert(id);
            let f = c.publish("t", vec![], id.to_be_bytes().to_vec());
            inflight.push(async move { (id, f.await) });
            n += 1;
        }
        match inflight.next().await {
            Some((id, Ok(_))) => {
                ledger.lock().unwrap().confirmed.insert(id);
            }
            _ => break,
        }
    }
    while let Some((id, r)) = inflight.next().await {
        if r.is_ok() {
            ledger.lock().unwrap().confirmed.insert(id);
        }
    }
    n
}

/// Consume `q`, ack every delivery and `sync_acks` every 32 acks (then they
/// count as settled), until the connection dies or nothing arrives for
/// `idle`. Returns the deliveries seen.
async fn crash_consumer(c: Client, ledger: Shared, idle: Duration) -> u64 {
    let Ok(mut sub) = c.subscribe("q", 64).await else {
        return 0;
    };
    let mut pending = Vec::new();
    let mut seen = 0;
    while let Ok(Some(d)) = tokio::time::timeout(idle, sub.next()).await {
        let id = u64::from_be_bytes(d.payload.as_slice().try_into().unwrap());
        ledger.lock().unwrap().record(id, d.redelivered);
        seen += 1;
        sub.ack(d.tag);
        pending.push(id);
        if pending.len() >= 32 {
            if sub.sync_acks().await.is_err() {
                return seen;
            }
            ledger.lock().unwrap().settled.extend(pending.drain(..));
        }
    }
    if sub.sync_acks().await.is_ok() {
        ledger.lock().unwrap().settled.extend(pending.drain(..));
    }
    seen
}

/// A small deterministic generator for kill times (xorshift64*).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The crash suite: the broker runs as a child process; three clients
/// publish with confirms and two consume with acks (syncing them now and
/// then); the broker is killed with SIGKILL at a random moment in every
/// round and restarted. At the end a consumer drains the queue, and:
/// every confirmed message was delivered at least once, nothing was
/// invented, and only messages whose acks were not yet synced came again
/// (flagged redelivered). Rounds: `SLUICE_CRASH_ROUNDS` (default 3); kill
/// times: `SLUICE_CRASH_SEED` (default: from the clock, printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    const PUBLISHERS: u64 = 3;
    const CONSUMERS: usize = 2;
    let rounds = common::env_or("SLUICE_CRASH_ROUNDS", 3);
    let seed: u64 = std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    println!("crash suite: SLUICE_CRASH_SEED={seed}");
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let ledger = Shared::default();
    let mut next = [0u64; PUBLISHERS as usize];
    let mut consumed_in_rounds = 0;
    for _round in 0..rounds {
        let mut child = spawn(dir.path(), addr);
        let admin = connect(dir.path(), addr).await;
        admin.declare(QueueSpec::new("q")).await.unwrap();
        admin.bind("q", "t").await.unwrap();
        let mut clients = vec![admin];
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let c = connect(dir.path(), addr).await;
            clients.push(c.clone());
            let first = next[p as usize];
            publishers.push(tokio::spawn(crash_publisher(c, p, first, ledger.clone())));
        }
        let mut consumers = Vec::new();
        for _ in 0..CONSUMERS {
            let c = connect(dir.path(), addr).await;
            clients.push(c.clone());
            consumers.push(tokio::spawn(crash_consumer(
                c,
                ledger.clone(),
                Duration::from_secs(30),
            )));
        }
        let delay = 300 + next_random(&mut rng) % 1200;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A killed server sends no CONNECTION_CLOSE; stop waiting for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for c in &clients {
            c.close();
        }
        for (p, task) in publishers.into_iter().enumerate() {
            next[p] = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("publisher stops when the broker dies")
                .unwrap();
        }
        for task in consumers {
            consumed_in_rounds += tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("consumer stops when the broker dies")
                .unwrap();
        }
    }
    // Final restart: drain and compare.
    let mut child = spawn(dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    let drained = crash_consumer(c.clone(), ledger.clone(), Duration::from_secs(2)).await;
    c.close();
    child.kill().unwrap();
    child.wait().unwrap();

    let l = ledger.lock().unwrap();
    let lost: Vec<u64> = l
        .confirmed
        .iter()
        .filter(|id| !l.delivered.contains_key(id))
        .copied()
        .collect();
    let duplicates: u64 = l.delivered.values().map(|n| u64::from(n - 1)).sum();
    println!(
        "crash suite: rounds={rounds} sent={} confirmed={} delivered={} (during rounds {consumed_in_rounds}, drained {drained}) \
         settled={} duplicates={duplicates} lost={}",
        l.sent.len(),
        l.confirmed.len(),
        l.delivered.len(),
        l.settled.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    assert!(l.invented.is_empty(), "never published: {:?}", l.invented);
    assert!(
        l.settled_redelivered.is_empty(),
        "acked and synced, delivered again: {:?}",
        l.settled_redelivered
    );
    assert!(
        l.unflagged.is_empty(),
        "repeated deliveries not flagged redelivered: {:?}",
        l.unflagged
    );
    assert!(
        l.confirmed.len() as u64 > 100 * rounds,
        "the test must confirm something before each kill"
    );
    assert!(
        l.confirmed.len() < l.sent.len(),
        "kills must land while publishes are in flight"
    );
    assert!(
        consumed_in_rounds > 0 && !l.settled.is_empty(),
        "consumers must ack (and sync) while the broker runs"
    );
}

/// A confirm is only sent after sled's data file was fdatasync'ed: run the
/// broker under strace and look for the sync on `<data>/store/db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_follow_fdatasync_of_the_data_file() {
    provision::require("the fsync check", provision::STRACE);
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let trace = dir.path().join("trace");
    let mut broker = spawn(dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    c.declare(QueueSpec::new("q")).await.unwrap();
    c.bind("q", "t").await.unwrap();
    // Attach to the running broker (all threads) so that killing strace
    // later detaches it instead of leaving an orphan.
    let mut strace = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fdatasync,fsync", "-o"])
        .arg(&trace)
        .args(["-p", &broker.id().to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let attached = Instant::now() + Duration::from_secs(10);
    while !trace.exists() && Instant::now() < attached {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..20u8 {
        c.publish("t", vec![], vec![i]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = strace.kill();
    let _ = strace.wait();
    broker.kill().unwrap();
    broker.wait().unwrap();
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    let syncs = text.matches("store/db>").count();
    assert!(
        syncs >= 1,
        "no fdatasync of store/db around 20 confirmed publishes:\n{text}"
    );
}

/// Large messages make sled write blob files (a leaf of 16 one-MiB values
/// is larger than its inline limit) that sled itself never fsyncs: every
/// blob file must be fsynced by the broker before the publishes it holds
/// are confirmed; so must the blob file of a plugin component above the
/// inline limit before its load is confirmed. Checked with strace on the
/// real binary, stopped right after the last confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_blob_files_are_fsynced_before_confirms() {
    provision::require("the fsync check", provision::STRACE);
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let trace = dir.path().join("trace");
    let mut broker = spawn(dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    c.declare(QueueSpec::new("q")).await.unwrap();
    c.bind("q", "t").await.unwrap();
    let mut strace = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fdatasync,fsync", "-o"])
        .arg(&trace)
        .args(["-p", &broker.id().to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let attached = Instant::now() + Duration::from_secs(10);
    while !trace.exists() && Instant::now() < attached {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blob_files = || -> BTreeSet<String> {
        std::fs::read_dir(dir.path().join("data/store/blobs"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for i in 0..40u8 {
        c.publish("t", vec![], vec![i; 1 << 20]).await.unwrap();
    }
    let after_publishes = blob_files();
    // A plugin component above sled's inline size (a quarter of its 8 MiB
    // segments): the plugin load stores it in a blob file of its own, which
    // must be fsynced before the load is confirmed. A custom section makes
    // a small plugin 3 MiB.
    let mut component = sluice::bundled::wasm("header-filter").unwrap().to_vec();
    let payload = 3usize << 20;
    let name = b"padding";
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.resize(section.len() + payload, 0x5a);
    component.push(0);
    let mut n = section.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            component.push(byte);
            break;
        }
        component.push(byte | 0x80);
    }
    component.extend(section);
    c.load_plugin("big", "filter", Some("q"), component, vec![])
        .await
        .unwrap();
    // Stop the broker at once: nothing it does after the last confirm can
    // count. Everything on disk now was needed by a confirmed publish or
    // the load; nothing else commits, so a blob file not fsynced by now
    // (the commits those confirms waited for) never is.
    let stopped = Command::new("kill")
        .args(["-STOP", &broker.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let blobs = blob_files();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = strace.kill();
    let _ = strace.wait();
    broker.kill().unwrap();
    broker.wait().unwrap();
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    assert!(
        !after_publishes.is_empty(),
        "40 one-MiB messages should make sled write blob files"
    );
    assert!(
        blobs.difference(&after_publishes).next().is_some(),
        "a 3 MiB plugin component should make sled write a blob file: {blobs:?}"
    );
    for b in &blobs {
        assert!(
            text.lines()
                .any(|l| l.contains("fsync(") && l.contains(&format!("store/blobs/{b}>"))),
            "blob file {b} was never fsynced:\n{text}"
        );
    }
}

/// `sluice certs revoke` + SIGHUP: the connected revoked client is
/// disconnected and refused afterwards; other clients carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_crls_and_disconnects_revoked_clients() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let ca = dir.path().join("certs");
    let issued = Command::new(BIN)
        .args(["certs", "issue", "--ca"])
        .arg(&ca)
        .args(["--tenant", "acme", "--client", "laptop", "--out"])
        .arg(ca.join("laptop"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(issued.success());
    let addr = free_port();
    let mut child = spawn(dir.path(), addr);
    let other = connect(dir.path(), addr).await;
    let laptop = Client::connect(addr, &ca.join("laptop")).await.unwrap();
    laptop.declare(QueueSpec::new("q")).await.unwrap();

    let revoked = Command::new(BIN)
        .args(["certs", "revoke", "--ca"])
        .arg(&ca)
        .arg("--cert")
        .arg(ca.join("laptop/cert.pem"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(revoked.success());
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while laptop.list_queues().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the revoked client must be disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = Client::connect(addr, &ca.join("laptop")).await;
    assert!(
        matches!(
            again,
            Err(sluice_client::ClientError::CertificateRefused(_))
        ),
        "{:?}",
        again.err()
    );
    other
        .list_queues()
        .await
        .expect("other clients stay connected");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Disk full for real: the broker's data directory on a 12 MiB tmpfs.
/// Publishing 4 KiB messages until the filesystem is full gets refusals
/// with a storage error (never a crash, never a confirm for a message that
/// was not stored); the broker keeps serving; after the filesystem grows
/// (remount) publishes are confirmed again; after a restart every confirmed
/// message is there. Needs `mount` (root; CI runs as root): elsewhere it
/// fails, saying why (never a silent pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_and_recovers() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // No silent skip: a run that cannot mount the tmpfs fails, naming why.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "sluice-full"])
        .arg(&data)
        .output();
    match &mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the real disk-full test needs `mount -t tmpfs` (root or CAP_SYS_ADMIN): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("the real disk-full test needs `mount` (util-linux): {e}"),
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let addr = free_port();
    let mut child = spawn(dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    c.declare(QueueSpec::new("q")).await.unwrap();
    c.bind("q", "t").await.unwrap();

    // Fill the disk: 64 publishes in flight until refusals come back.
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let mut refusals = Vec::new();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut n = 0u64;
    while refusals.len() < 16 && n < 20_000 {
        while inflight.len() < 64 {
            let mut payload = vec![b'f'; 4096];
            payload[..8].copy_from_slice(&n.to_be_bytes());
            let f = c.publish("t", vec![], payload);
            inflight.push(async move { (n, f.await) });
            n += 1;
        }
        match inflight.next().await.unwrap() {
            (id, Ok(_)) => {
                confirmed.insert(id);
            }
            (_, Err(e)) => refusals.push(e),
        }
    }
    while let Some((id, r)) = inflight.next().await {
        match r {
            Ok(_) => {
                confirmed.insert(id);
            }
            Err(e) => refusals.push(e),
        }
    }
    assert!(
        !refusals.is_empty(),
        "a 12 MiB filesystem must fill up ({n} publishes of 4 KiB)"
    );
    let e = &refusals[0];
    assert_eq!(
        e.code(),
        Some(sluice_proto::ErrorCode::Storage),
        "a full disk is a storage error: {e}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the broker is still running"
    );
    c.list_queues()
        .await
        .expect("the broker keeps answering while the disk is full");

    // Space returns.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(grown.success());
    // The store reopens sled at most every 500 ms after a failure, so the
    // first publishes may still be refused; retry like a client would.
    let mut after = 0;
    let resumed = Instant::now() + Duration::from_secs(15);
    let mut i = 0u64;
    let mut last = None;
    while after < 50 && Instant::now() < resumed {
        let id = 1_000_000 + i;
        i += 1;
        let mut payload = vec![b'a'; 4096];
        payload[..8].copy_from_slice(&id.to_be_bytes());
        match c.publish("t", vec![], payload).await {
            Ok(_) => {
                confirmed.insert(id);
                after += 1;
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    }
    assert!(
        after == 50,
        "publishes are confirmed again once space returns ({after} of 50; last refusal: {last:?})"
    );

    // Restart: every confirmed message is there, nothing else.
    c.close();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn(dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    let mut sub = c.subscribe("q", 512).await.unwrap();
    let mut seen = BTreeSet::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        seen.insert(u64::from_be_bytes(d.payload[..8].try_into().unwrap()));
        sub.ack(d.tag);
    }
    let lost: Vec<_> = confirmed.difference(&seen).collect();
    println!(
        "disk full: {} confirmed before and after ({after} after space returned), {} refused, first refusal: {e}",
        confirmed.len(),
        refusals.len()
    );
    assert!(lost.is_empty(), "confirmed and lost: {lost:?}");
    c.close();
    child.kill().unwrap();
    child.wait().unwrap();
}
