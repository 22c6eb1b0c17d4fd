//! Durability of the real `sluice` binary: confirmed messages survive
//! `kill -9`, and confirms are preceded by fdatasync (checked with strace).

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_client::{Client, QueueSpec};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn free_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

fn certs(dir: &Path) {
    let st = Command::new(BIN)
        .args(["certs", "init", "--out"])
        .arg(dir.join("certs"))
        .args(["--tenant", "acme"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

fn spawn(prefix: &[&str], dir: &Path, addr: SocketAddr) -> Child {
    let (program, args) = match prefix.split_first() {
        Some((p, rest)) => (
            p.to_string(),
            rest.iter()
                .map(|s| s.to_string())
                .chain([BIN.to_string()])
                .collect::<Vec<_>>(),
        ),
        None => (BIN.to_string(), vec![]),
    };
    Command::new(program)
        .args(args)
        .args(["serve", "--listen", &addr.to_string(), "--data"])
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect(dir: &Path, addr: SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr, &dir.join("certs/acme")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("broker did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Kill -9 the broker while clients publish with confirms; after each
/// restart every confirmed message is still there (or was consumed and
/// acked before). Rounds: `SLUICE_CRASH_ROUNDS` (default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let rounds: u64 = std::env::var("SLUICE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let mut sent: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    for round in 0..rounds {
        let mut child = spawn(&[], dir.path(), addr);
        let c = connect(dir.path(), addr).await;
        c.declare(QueueSpec::new("q")).await.unwrap();
        c.bind("q", "t").await.unwrap();
        // Publish continuously with up to 256 unconfirmed, and kill the
        // broker while publishes are in flight.
        let first = next;
        let publisher = {
            let c = c.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut inflight = futures::stream::FuturesUnordered::new();
                let mut confirmed = Vec::new();
                let mut n = first;
                loop {
                    while inflight.len() < 256 {
                        let f = c.publish("t", vec![], n.to_be_bytes().to_vec());
                        inflight.push(async move { (n, f.await) });
                        n += 1;
                    }
                    match inflight.next().await {
                        Some((k, Ok(_))) => confirmed.push(k),
                        _ => break,
                    }
                }
                while let Some((k, r)) = inflight.next().await {
                    if r.is_ok() {
                        confirmed.push(k);
                    }
                }
                (n, confirmed)
            })
        };
        tokio::time::sleep(Duration::from_millis(300 + 150 * round)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A killed server sends no CONNECTION_CLOSE; stop waiting for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.close();
        let (end, ok) = tokio::time::timeout(Duration::from_secs(30), publisher)
            .await
            .unwrap()
            .unwrap();
        sent.extend(first..end);
        next = end;
        confirmed.extend(ok);
    }
    // Final restart: drain and compare.
    let mut child = spawn(&[], dir.path(), addr);
    let c = connect(dir.path(), addr).await;
    let mut sub = c.subscribe("q", 512).await.unwrap();
    let mut delivered = BTreeSet::new();
    let mut duplicates = 0u64;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let n = u64::from_be_bytes(d.payload.as_slice().try_into().unwrap());
        assert!(sent.contains(&n), "message {n} was never published");
        if !delivered.insert(n) {
            duplicates += 1;
        }
        sub.ack(d.tag);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let lost: Vec<u64> = confirmed.difference(&delivered).copied().collect();
    println!(
        "crash suite: rounds={rounds} sent={} confirmed={} delivered={} duplicates={duplicates} lost={}",
        sent.len(),
        confirmed.len(),
        delivered.len(),
        lost.len()
    );
    assert!(
        confirmed.len() > 100,
        "the test must confirm something before each kill"
    );
    assert!(
        confirmed.len() < sent.len(),
        "kills must land while publishes are in flight"
    );
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    assert_eq!(
        duplicates, 0,
        "nothing was consumed before the drain, so nothing repeats"
    );
}

/// A confirm is only sent after sled's data file was fdatasync'ed: run the
/// broker under strace and look for the sync on `<data>/store/db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_follow_fdatasync_of_the_data_file() {
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install strace (see .ci/run)"
        );
        eprintln!("strace not installed: skipping (install it with apt-get install strace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let addr = free_port();
    let trace = dir.path().join("trace");
    let mut broker = spawn(&[], dir.path(), addr);
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
    let mut child = spawn(&[], dir.path(), addr);
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
