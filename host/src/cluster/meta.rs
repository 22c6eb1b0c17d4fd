//! The metadata group's state machine: keyed records in sled.

use std::collections::BTreeMap;
use std::io::{self, Cursor};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::{MetaCommand, MetaGroup, MetaResponse, decode, encode, io_error};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT: &str = "snapshot";

/// The records of the metadata group and where in the log they stand.
///
/// Each `apply` writes its records, the applied log id and the membership
/// in one sled batch and syncs it before answering, so what a client was
/// told is applied survives a crash. A lock held by `apply` while it writes
/// and by the snapshot builder while it reads gives snapshots a consistent
/// view without stopping apply for longer than one batch.
#[derive(Clone)]
pub struct MetaState {
    db: sled::Db,
    data: sled::Tree,
    meta: sled::Tree,
    view: Arc<tokio::sync::Mutex<()>>,
}

/// A snapshot as stored and sent: its metadata and every record.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMetaOf<MetaGroup>,
    records: Vec<(String, Vec<u8>)>,
}

impl MetaState {
    /// Open the state of group `group` in `db` (trees `raft/{group}/data`
    /// and `raft/{group}/state`).
    pub fn open(db: &sled::Db, group: &str) -> io::Result<Self> {
        let tree = |name: &str| {
            db.open_tree(format!("raft/{group}/{name}"))
                .map_err(|e| io_error("open the metadata state", e))
        };
        Ok(Self {
            db: db.clone(),
            data: tree("data")?,
            meta: tree("state")?,
            view: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The value of record `key`, as applied on this node.
    pub fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .data
            .get(key)
            .map_err(|e| io_error("read the metadata state", e))?
            .map(|v| v.to_vec()))
    }

    fn get_meta<T: for<'de> serde::Deserialize<'de>>(&self, key: &str) -> io::Result<Option<T>> {
        super::read(&self.meta, key, "read the metadata state")
    }

    fn applied(&self) -> io::Result<(Option<LogIdOf<MetaGroup>>, StoredMembershipOf<MetaGroup>)> {
        Ok((
            self.get_meta(APPLIED)?,
            self.get_meta(MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    fn records(&self) -> io::Result<Vec<(String, Vec<u8>)>> {
        self.data
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| io_error("read the metadata state", e))?;
                let key = String::from_utf8(k.to_vec())
                    .map_err(|e| io_error("read the metadata state", e))?;
                Ok((key, v.to_vec()))
            })
            .collect()
    }

    /// Sync the database (sled's write-out and `fdatasync`) off the async
    /// workers.
    async fn sync(&self) -> io::Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush().map(|_| ()))
            .await
            .map_err(|e| io_error("sync the metadata state", e))?
            .map_err(|e| io_error("sync the metadata state", e))
    }

    fn snapshot_of(file: &SnapshotFile) -> io::Result<SnapshotOf<MetaGroup, Cursor<Vec<u8>>>> {
        Ok(SnapshotOf::<MetaGroup, Cursor<Vec<u8>>> {
            meta: file.meta.clone(),
            snapshot: Cursor::new(encode("snapshot", &file.records)?),
        })
    }
}

impl RaftSnapshotBuilder<MetaGroup> for MetaState {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<MetaGroup, Self::SnapshotData>, io::Error> {
        let file = {
            let _view = self.view.lock().await;
            let (last_log_id, last_membership) = self.applied()?;
            SnapshotFile {
                meta: SnapshotMetaOf::<MetaGroup> {
                    last_log_id,
                    last_membership,
                },
                records: self.records()?,
            }
        };
        self.meta
            .insert(SNAPSHOT, encode("snapshot", &file)?)
            .map_err(|e| io_error("store the snapshot", e))?;
        self.sync().await?;
        Self::snapshot_of(&file)
    }
}

impl RaftStateMachine<MetaGroup> for MetaState {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<MetaGroup>>, StoredMembershipOf<MetaGroup>), io::Error> {
        self.applied()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<MetaGroup>, io::Error>> + Unpin + OptionalSend,
    {
        let mut data = sled::Batch::default();
        // Records as this batch leaves them, so a later command in the
        // batch sees an earlier one.
        let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut applied = None;
        let mut membership = None;
        let mut answers = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            applied = Some(entry.log_id());
            let response = match &entry.payload {
                EntryPayload::Blank => MetaResponse::default(),
                EntryPayload::Normal(cmd) => {
                    let key = match cmd {
                        MetaCommand::Put { key, .. } | MetaCommand::Delete { key } => key,
                    };
                    let previous = match pending.get(key) {
                        Some(v) => v.clone(),
                        None => self.get(key)?,
                    };
                    let next = match cmd {
                        MetaCommand::Put { value, .. } => {
                            data.insert(key.as_bytes(), value.as_slice());
                            Some(value.clone())
                        }
                        MetaCommand::Delete { .. } => {
                            data.remove(key.as_bytes());
                            None
                        }
                    };
                    pending.insert(key.clone(), next);
                    MetaResponse { previous }
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembershipOf::<MetaGroup>::new(
                        Some(entry.log_id()),
                        m.clone(),
                    ));
                    MetaResponse::default()
                }
            };
            if let Some(r) = responder {
                answers.push((r, response));
            }
        }
        let Some(applied) = applied else {
            return Ok(());
        };
        {
            let _view = self.view.lock().await;
            let mut meta = sled::Batch::default();
            meta.insert(APPLIED, encode(APPLIED, &applied)?);
            if let Some(m) = &membership {
                meta.insert(MEMBERSHIP, encode(MEMBERSHIP, m)?);
            }
            // One transaction over both trees: records and the position
            // they stand at never disagree.
            (&self.data, &self.meta)
                .transaction(|(d, m)| {
                    d.apply_batch(&data)?;
                    m.apply_batch(&meta)?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| io_error("apply to the metadata state", format!("{e:?}")))?;
        }
        self.sync().await?;
        for (r, response) in answers {
            r.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<MetaGroup>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let records: Vec<(String, Vec<u8>)> = decode("snapshot", snapshot.get_ref())?;
        let file = SnapshotFile {
            meta: meta.clone(),
            records,
        };
        {
            let _view = self.view.lock().await;
            let mut data = sled::Batch::default();
            for item in self.data.iter().keys() {
                data.remove(item.map_err(|e| io_error("install the snapshot", e))?);
            }
            for (k, v) in &file.records {
                data.insert(k.as_bytes(), v.as_slice());
            }
            let mut state = sled::Batch::default();
            match &meta.last_log_id {
                Some(id) => state.insert(APPLIED, encode(APPLIED, id)?),
                None => state.remove(APPLIED),
            }
            state.insert(MEMBERSHIP, encode(MEMBERSHIP, &meta.last_membership)?);
            state.insert(SNAPSHOT, encode("snapshot", &file)?);
            (&self.data, &self.meta)
                .transaction(|(d, m)| {
                    d.apply_batch(&data)?;
                    m.apply_batch(&state)?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| io_error("install the snapshot", format!("{e:?}")))?;
        }
        self.sync().await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<MetaGroup, Self::SnapshotData>>, io::Error> {
        match self.get_meta::<SnapshotFile>(SNAPSHOT)? {
            Some(file) => Self::snapshot_of(&file).map(Some),
            None => Ok(None),
        }
    }
}
