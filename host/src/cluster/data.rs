//! The data group: the broker's store, replicated.
//!
//! Every write the broker makes to its [`MessageStore`] (publishes, acks,
//! purges, metadata, plugin components) becomes a [`StoreOp`]; the
//! leader's proposer ([`super::store::ReplicatedStore`]) packs the ops
//! waiting into one [`StoreBatch`] per log entry (group commit), and every
//! node applies committed entries, in log order, to a local [`Store`].
//! Routing, filters and the authorizer ran on the leader before the ops
//! were made, so applying them is deterministic: it only writes.
//!
//! Applying is idempotent per entry (an entry's appends become the same
//! chunks each time, removes of removed messages do nothing), so entries
//! applied again after a crash leave the state as it was. The applied log
//! id and membership are written with the entry's ops and made durable by
//! the store's next group commit; the log, fsynced before an entry is
//! committed, is what a publish's confirm stands on.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use super::snapshot::{SnapshotBody, Snapshots};
use super::{decode, encode, io_error};
use crate::store::{Append, MessageStore, MsgId, QueueId, Store, StoreError};

openraft::declare_raft_types!(
    /// The data group: queues and the broker's metadata.
    pub DataGroup:
        D = StoreBatch,
        R = Applied,
        Node = super::Peer,
);

/// Metadata key of the applied log id.
const APPLIED: &str = "cluster/applied";
/// Metadata key of the applied membership.
const MEMBERSHIP: &str = "cluster/membership";
/// Payload bytes of committed entries applied in one piece, at most (one
/// larger entry goes alone).
const APPLY_BYTES: usize = 8 << 20;
/// Payload bytes applied on the state machine's task rather than a
/// blocking thread, at most: a few sled writes cost less than the hand-off.
const INLINE_APPLY_BYTES: usize = 256 << 10;
/// Metadata key of the next queue id to hand out.
pub(crate) const NEXT_QUEUE_ID: &str = "cluster/next-queue-id";

/// One log entry: the store writes of one group commit, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreBatch {
    /// The writes, applied in this order.
    pub ops: Vec<StoreOp>,
}

/// One message of an append: (queue, id, encoded value).
pub type AppendItem = (QueueId, MsgId, Vec<u8>);

/// One write to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Store messages: (queue, id, encoded value).
    Append(#[serde(with = "appends")] Vec<AppendItem>),
    /// Remove messages of a queue (acks, expiries, drops).
    Remove {
        /// The queue.
        queue: QueueId,
        /// The messages.
        ids: Vec<MsgId>,
    },
    /// Delete every message of a queue.
    ClearQueue {
        /// The queue.
        queue: QueueId,
    },
    /// Set a metadata value.
    PutMeta {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete a metadata value.
    DeleteMeta {
        /// Key.
        key: String,
    },
    /// Store a large value.
    PutBlob {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete a large value.
    DeleteBlob {
        /// Key.
        key: String,
    },
    /// Queue ids below `next` are taken.
    QueueIds {
        /// The next id to hand out.
        next: QueueId,
    },
}

impl StoreOp {
    /// Bytes this op carries (its share of a log entry's size).
    pub fn size(&self) -> usize {
        match self {
            StoreOp::Append(items) => items.iter().map(|(_, _, v)| v.len() + 24).sum(),
            StoreOp::Remove { ids, .. } => ids.len() * 8 + 16,
            StoreOp::ClearQueue { .. } | StoreOp::QueueIds { .. } => 16,
            StoreOp::PutMeta { key, value } | StoreOp::PutBlob { key, value } => {
                key.len() + value.len() + 16
            }
            StoreOp::DeleteMeta { key } | StoreOp::DeleteBlob { key } => key.len() + 16,
        }
    }
}

impl fmt::Display for StoreBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store batch of {} op(s)", self.ops.len())
    }
}

/// What applying an entry answers: it was applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied;

/// Appends with each value as one byte string (serde's default, a sequence
/// of `u8`, encodes the same bytes in bincode but one element call per
/// byte: most of a follower's decoding time).
mod appends {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};

    use super::AppendItem;

    struct Bytes<'a>(&'a [u8]);

    impl Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct ByteBuf(Vec<u8>);

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                    while let Some(b) = seq.next_element()? {
                        out.push(b);
                    }
                    Ok(ByteBuf(out))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    pub fn serialize<S: Serializer>(items: &[AppendItem], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|(q, id, v)| (q, id, Bytes(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AppendItem>, D::Error> {
        use crate::store::{MsgId, QueueId};
        let items = Vec::<(QueueId, MsgId, ByteBuf)>::deserialize(d)?;
        Ok(items.into_iter().map(|(q, id, v)| (q, id, v.0)).collect())
    }
}

/// The data group's state machine: a local [`Store`] that committed
/// entries are applied to, and its snapshots ([`super::snapshot`]).
#[derive(Clone)]
pub struct DataState {
    store: Arc<Store>,
    snapshots: Arc<Snapshots>,
    /// Queues whose chunk index this process has read from disk (removes
    /// need it; appends add to it).
    loaded: Arc<std::sync::Mutex<HashSet<QueueId>>>,
}

impl DataState {
    /// The state machine over `store`, its snapshots in `snapshots` (a
    /// snapshot install a crash cut short is finished first).
    pub fn open(store: Arc<Store>, snapshots: &Path) -> io::Result<Self> {
        let snapshots = Snapshots::open(snapshots)?;
        snapshots.resume_install(&store)?;
        Ok(Self {
            store,
            snapshots: Arc::new(snapshots),
            loaded: Arc::default(),
        })
    }

    /// Where snapshots received from the leader are written.
    pub fn spool(&self) -> super::net::Spool {
        let snapshots = self.snapshots.clone();
        Arc::new(move || snapshots.spool())
    }

    /// The local store (reads on the leader, status).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> io::Result<Option<T>> {
        match self
            .store
            .scan_meta(key)
            .map_err(|e| io_error("read the data state", e))?
            .into_iter()
            .find(|(k, _)| k == key)
        {
            Some((_, v)) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn applied(&self) -> io::Result<(Option<LogIdOf<DataGroup>>, StoredMembershipOf<DataGroup>)> {
        Ok((
            self.get_meta(APPLIED)?,
            self.get_meta(MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    /// Read `queue`'s chunk index from disk the first time this process
    /// touches it, so removes find messages stored before a restart.
    fn touch(&self, queue: QueueId) -> Result<(), StoreError> {
        let first = match self.loaded.lock() {
            Ok(mut l) => l.insert(queue),
            Err(p) => p.into_inner().insert(queue),
        };
        if first {
            for item in self.store.scan_queue(queue) {
                item?;
            }
        }
        Ok(())
    }

    /// Apply the ops of `entries` to the store, in order.
    ///
    /// Runs of appends (to any queues) within one entry and runs of
    /// removes from one queue, across entries, go to the store as one
    /// write each: a store write per op made applying, not the Raft log,
    /// the replicated path's latency. Merging only neighbours keeps the
    /// order of every write the log gave. Appends are not merged across
    /// entries: an entry's appends must become the same chunks on every
    /// node and every time it is applied again, however entries were
    /// batched for applying (acks leave the same bitmaps whatever their
    /// grouping).
    async fn apply_ops(&self, entries: Vec<Vec<StoreOp>>) -> Result<(), StoreError> {
        let mut appends: Vec<Append> = Vec::new();
        let mut removes: Option<(QueueId, Vec<MsgId>)> = None;
        for ops in entries {
            self.apply_entry(ops, &mut appends, &mut removes).await?;
            if !appends.is_empty() {
                self.flush(&mut appends, &mut removes).await?;
            }
        }
        self.flush(&mut appends, &mut removes).await
    }

    /// Apply one entry's ops, holding back runs of appends and removes for
    /// [`Self::flush`].
    async fn apply_entry(
        &self,
        ops: Vec<StoreOp>,
        appends: &mut Vec<Append>,
        removes: &mut Option<(QueueId, Vec<MsgId>)>,
    ) -> Result<(), StoreError> {
        for op in ops {
            let merges = match (&op, &*removes) {
                (StoreOp::Append(_), None) => true,
                (StoreOp::Remove { queue, .. }, Some((pending, _))) => queue == pending,
                (StoreOp::Remove { .. }, None) => appends.is_empty(),
                _ => false,
            };
            if !merges {
                self.flush(appends, removes).await?;
            }
            match op {
                StoreOp::Append(items) => {
                    for (queue, id, value) in items {
                        self.touch(queue)?;
                        appends.push(Append { queue, id, value });
                    }
                }
                StoreOp::Remove { queue, ids } => {
                    self.touch(queue)?;
                    match removes {
                        Some((_, pending)) => pending.extend(ids),
                        None => *removes = Some((queue, ids)),
                    }
                }
                StoreOp::ClearQueue { queue } => {
                    self.touch(queue)?;
                    self.store.clear_queue(queue)?;
                }
                StoreOp::PutMeta { key, value } => self.store.put_meta(&key, &value)?,
                StoreOp::DeleteMeta { key } => self.store.delete_meta(&key)?,
                StoreOp::PutBlob { key, value } => self.store.put_blob(&key, &value)?,
                StoreOp::DeleteBlob { key } => self.store.delete_blob(&key)?,
                StoreOp::QueueIds { next } => {
                    let now: QueueId = self
                        .get_meta(NEXT_QUEUE_ID)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                        .unwrap_or(0);
                    if next > now {
                        let bytes = encode(NEXT_QUEUE_ID, &next)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        self.store.put_meta(NEXT_QUEUE_ID, &bytes)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Write the appends and removes `apply_entry` holds back.
    async fn flush(
        &self,
        appends: &mut Vec<Append>,
        removes: &mut Option<(QueueId, Vec<MsgId>)>,
    ) -> Result<(), StoreError> {
        if !appends.is_empty() {
            self.store.append_unsynced(std::mem::take(appends))?;
        }
        if let Some((queue, ids)) = removes.take() {
            self.store.remove(queue, &ids)?;
        }
        Ok(())
    }

    /// Apply `batch` (of `bytes` payload) and answer its responders: a
    /// small batch here, a larger one on a blocking thread.
    async fn apply_batch(
        &self,
        batch: Vec<EntryResponder<DataGroup>>,
        bytes: usize,
    ) -> io::Result<()> {
        let responders = if bytes <= INLINE_APPLY_BYTES {
            self.apply_now(batch).await?
        } else {
            let state = self.clone();
            tokio::task::spawn_blocking(move || futures::executor::block_on(state.apply_now(batch)))
                .await
                .map_err(|e| io_error("apply to the data state", e))??
        };
        for r in responders {
            r.send(Applied);
        }
        Ok(())
    }

    /// Apply `batch`, returning its responders to answer.
    async fn apply_now(
        &self,
        batch: Vec<EntryResponder<DataGroup>>,
    ) -> io::Result<Vec<openraft::storage::ApplyResponder<DataGroup>>> {
        let mut applied = None;
        let mut membership = None;
        let mut responders = Vec::new();
        let mut ops = Vec::new();
        for (entry, responder) in batch {
            let log_id = entry.log_id();
            applied = Some(log_id);
            // Taken by value: payloads go to the store without a copy.
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(b) => ops.push(b.ops),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembershipOf::<DataGroup>::new(Some(log_id), m));
                }
            }
            if let Some(r) = responder {
                responders.push(r);
            }
        }
        // Nothing is answered before all of it is applied, so the
        // entries are applied together (see `apply_ops`).
        self.apply_ops(ops)
            .await
            .map_err(|e| io_error("apply to the data state", e))?;
        let put = |key: &str, bytes: Vec<u8>| {
            self.store
                .put_meta(key, &bytes)
                .map_err(|e| io_error("apply to the data state", e))
        };
        if let Some(m) = &membership {
            put(MEMBERSHIP, encode(MEMBERSHIP, m)?)?;
        }
        if let Some(a) = &applied {
            put(APPLIED, encode(APPLIED, a)?)?;
        }
        Ok(responders)
    }

    /// The next queue id, as applied here.
    pub fn next_queue_id(&self) -> io::Result<QueueId> {
        Ok(self.get_meta(NEXT_QUEUE_ID)?.unwrap_or(0))
    }
}

/// A snapshot built while the state machine waited (see
/// [`DataState::get_snapshot_builder`]), or why it could not be.
pub struct Built(Option<io::Result<SnapshotOf<DataGroup, SnapshotBody>>>);

impl RaftSnapshotBuilder<DataGroup> for Built {
    type SnapshotData = SnapshotBody;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<DataGroup, SnapshotBody>, io::Error> {
        self.0
            .take()
            .unwrap_or_else(|| Err(io_error("build a snapshot", "built once already")))
    }
}

impl DataState {
    /// Write a snapshot of the store as applied now. Runs on a blocking
    /// thread while nothing is applied.
    fn build(&self) -> io::Result<SnapshotOf<DataGroup, SnapshotBody>> {
        // What is exported is durable first: after a crash the store
        // holds at least what the snapshot (and the log purged behind it)
        // says was applied.
        self.store.sync()?;
        let (last_log_id, last_membership) = self.applied()?;
        let meta = SnapshotMetaOf::<DataGroup> {
            last_log_id,
            last_membership,
        };
        let started = std::time::Instant::now();
        let body = self.snapshots.build(&meta, &self.store)?;
        tracing::info!(
            snapshot = %meta,
            bytes = body.len(),
            ms = started.elapsed().as_millis() as u64,
            "built a snapshot of the data group"
        );
        Ok(SnapshotOf::<DataGroup, SnapshotBody> {
            meta,
            snapshot: body,
        })
    }
}

impl RaftStateMachine<DataGroup> for DataState {
    type SnapshotData = SnapshotBody;
    type SnapshotBuilder = Built;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<DataGroup>>, StoredMembershipOf<DataGroup>), io::Error> {
        self.applied()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<DataGroup>, io::Error>> + Unpin + OptionalSend,
    {
        // Applied in pieces of at most APPLY_BYTES: a node catching up is
        // handed its whole backlog of committed entries at once, which
        // must not be read into memory together.
        let mut done = false;
        while !done {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while bytes < APPLY_BYTES {
                match entries.try_next().await? {
                    Some(item) => {
                        if let EntryPayload::Normal(b) = &item.0.payload {
                            bytes += b.ops.iter().map(StoreOp::size).sum::<usize>();
                        }
                        batch.push(item);
                    }
                    None => {
                        done = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            self.apply_batch(batch, bytes).await?;
        }
        Ok(())
    }

    /// The snapshot is written here, on the state machine's task, so no
    /// entry is applied while the store is read: sled has no point-in-time
    /// view. Openraft's builder then only hands it over.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let state = self.clone();
        Built(Some(
            tokio::task::spawn_blocking(move || state.build())
                .await
                .unwrap_or_else(|e| Err(io_error("build a snapshot", e))),
        ))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<DataGroup>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let state = self.clone();
        let started = std::time::Instant::now();
        let entries = tokio::task::spawn_blocking(move || {
            let n = state.snapshots.install(snapshot, &state.store);
            // Chunk indexes are read from the new content when next used.
            match state.loaded.lock() {
                Ok(mut l) => l.clear(),
                Err(p) => p.into_inner().clear(),
            }
            n
        })
        .await
        .map_err(|e| io_error("install a snapshot", e))??;
        tracing::info!(
            snapshot = %meta,
            entries,
            ms = started.elapsed().as_millis() as u64,
            "installed a snapshot of the data group"
        );
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<DataGroup, Self::SnapshotData>>, io::Error> {
        let snapshots = self.snapshots.clone();
        let current = tokio::task::spawn_blocking(move || snapshots.current())
            .await
            .map_err(|e| io_error("read the snapshot", e))??;
        Ok(
            current
                .map(|(meta, snapshot)| SnapshotOf::<DataGroup, SnapshotBody> { meta, snapshot }),
        )
    }
}
