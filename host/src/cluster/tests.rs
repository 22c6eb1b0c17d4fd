//! The storage against openraft's conformance suite, and what the suite
//! does not check: durability across a reopen and flushes shared by appends.

use openraft::StorageError;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;

use super::log::SledLog;
use super::meta::MetaState;
use super::{MetaCommand, MetaGroup};

struct Builder;

/// A database that writes out only when asked (no background flush), so
/// what survives a crash is what the storage synced.
fn open(dir: &std::path::Path) -> std::io::Result<(sled::Db, SledLog<MetaGroup>, MetaState)> {
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let log = SledLog::open(&db, "meta")?;
    let state = MetaState::open(&db, "meta")?;
    Ok((db, log, state))
}

impl StoreBuilder<MetaGroup, SledLog<MetaGroup>, MetaState, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLog<MetaGroup>, MetaState), StorageError<MetaGroup>> {
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

/// The child of `entries_reported_flushed_survive_kill_9`: appends one
/// entry at a time and prints each index once it is reported flushed,
/// until it is killed. Does nothing unless started by that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    use std::io::Write;
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
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
        .args(["cluster::tests::crash_child", "--exact", "--nocapture"])
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
