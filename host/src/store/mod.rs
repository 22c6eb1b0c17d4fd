//! Durable storage: queue messages and broker metadata on sled.
//!
//! # Layout
//!
//! One sled database in the data directory with three trees:
//! - `messages`: key = queue id (u64 BE) ‖ first message id (u64 BE);
//!   value = a chunk of consecutive messages of that queue ([`chunk`]),
//!   each an 8-byte expiry (ms since the epoch, 0 = none, so recovery can
//!   apply TTLs without decoding) followed by the bincode-encoded
//!   [`StoredMessage`]; next to each partly acked chunk, its ack bitmap;
//! - `meta`: broker metadata (tenants, queues, bindings, plugins) under
//!   string keys, values encoded by the broker;
//! - `blobs`: large metadata values (plugin components).
//!
//! The backlog lives here, not in RAM: the broker keeps only ids, sizes and
//! expiries per message and reads payloads when it delivers them. sled's
//! page cache is bounded by [`StoreConfig::cache_capacity`] (sled's default
//! of 1 GB let RSS reach 315 MB with 1M entries).
//!
//! # Durability
//!
//! Appends go through one committer thread ([`commit`]) that applies
//! everything waiting as one batch, then calls `Db::flush()` **and**
//! `fdatasync` on sled's data file `<dir>/db`: sled 0.34's `flush()` issues
//! only `sync_file_range` on Linux (seen with strace), which does not make the
//! data durable. Only after both does it answer the waiting publishers, so a
//! confirm means "fsynced" (group commit). Removals (acks) are applied
//! without waiting for a sync: a crash may redeliver an acked message, never
//! lose an unacked one (at-least-once); a durable commit after them (an
//! empty one is enough) makes them stick.

mod chunk;
mod commit;
mod error;
mod export;
mod handles;
mod manifest;
mod message;
mod writes;

use writes::Writes;

pub use commit::Commit;
pub use error::StoreError;
pub use export::{Record, Tree};
pub use message::{StoredMessage, decode_expiry};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use commit::Committer;

/// A queue's storage id (allocated by [`Store::allocate_queue_id`]).
pub type QueueId = u64;
/// A message id, increasing within a queue.
pub type MsgId = u64;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    /// sled page cache size in bytes. Default 64 MiB.
    pub cache_capacity: u64,
    /// Most messages applied per group commit. Default 4096.
    pub max_batch: usize,
    /// sled segment size. Values larger than a quarter of it are written by
    /// sled to separate blob files that its flush does not fsync, so the
    /// store refuses them instead (see [`Store::max_value`]). Default 8 MiB,
    /// which keeps values up to ~2 MiB inline (messages are at most 1 MiB).
    pub segment_size: usize,
    /// Write each group of changes to sled as one atomic batch (the
    /// default), or key by key. A batch makes its writes survive a crash
    /// together, and costs each write of sled's I/O buffer (waited for) and
    /// its global write lock; a store applied from a Raft log, which
    /// re-applies everything after the last applied index it finds, needs
    /// only the order sled recovers writes in (a prefix of them) and turns
    /// this off.
    pub atomic_batches: bool,
}

impl StoreConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache_capacity: 64 << 20,
            max_batch: 4096,
            segment_size: 8 << 20,
            atomic_batches: true,
        }
    }
}

/// One message to append.
#[derive(Debug, Clone)]
pub struct Append {
    /// Target queue.
    pub queue: QueueId,
    /// Message id inside the queue.
    pub id: MsgId,
    /// Encoded value ([`StoredMessage::encode`]).
    pub value: Vec<u8>,
}

/// The sled-backed store. Cheap to share behind an `Arc`.
pub struct Store {
    sled: Arc<handles::Handles>,
    committer: Committer,
    /// fdatasyncs of the data file by the group committer.
    syncs: Arc<std::sync::atomic::AtomicU64>,
    dir: PathBuf,
    max_value: usize,
    /// Live chunks per queue.
    index: Arc<chunk::Index>,
    /// See [`StoreConfig::atomic_batches`].
    atomic: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A chunk as its index entry describes it: first id, (size, expiry) per
/// message, and its state with the ack bitmap.
type IndexedChunk = (MsgId, Vec<(u32, u64)>, chunk::ChunkState);

/// A queue's chunks from their index entries in `messages`.
fn live_chunks(
    messages: &sled::Tree,
    queue: QueueId,
) -> impl Iterator<Item = Result<IndexedChunk, StoreError>> + '_ {
    let mut entries = messages.scan_prefix(chunk::index_prefix(queue)).peekable();
    std::iter::from_fn(move || {
        loop {
            let (k, v) = match entries.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(StoreError::sled(e))),
            };
            // An ack bitmap whose entry is gone cannot happen (they are
            // removed in one batch); skip one anyway.
            let Some(first) = k
                .get(9..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            let acked = match entries.peek() {
                Some(Ok((next, bits))) if next.as_ref() == chunk::ack_key(queue, first) => {
                    let bits = bits.to_vec();
                    entries.next();
                    bits
                }
                _ => Vec::new(),
            };
            return Some(chunk::decode_index(&v).map(|messages| {
                let state = chunk::ChunkState::new(messages.len() as u32, acked);
                (first, messages, state)
            }));
        }
    })
}

/// The first id of a chunk key (`None` for an ack bitmap's key).
fn chunk_first(k: &[u8]) -> Option<MsgId> {
    let k: &[u8; 16] = k.try_into().ok()?;
    Some(u64::from_be_bytes(k[8..].try_into().ok()?))
}

fn key(queue: QueueId, id: MsgId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Store {
    /// How many times the group committer has fdatasynced sled's data file
    /// since the store was opened: once per durable group commit, shared
    /// by every append and sync committed with it.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open (or create) the store in `config.dir`.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let sled = handles::Sled::open(config)?;
        let commit = manifest::check(&config.dir, &sled.messages)?;
        Self::migrate(&sled.messages, &sled.meta)?;
        let sled = Arc::new(handles::Handles::new(sled, config.clone()));
        let index = Arc::new(chunk::Index::default());
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let committer = Committer::start(
            commit::CommitLog {
                sled: sled.clone(),
                index: index.clone(),
                dir: config.dir.clone(),
                commit,
                failed: false,
                manifest_at: std::time::Instant::now(),
                synced_blobs: Default::default(),
                syncs: syncs.clone(),
                atomic: config.atomic_batches,
            },
            config.max_batch.max(1),
        )
        .map_err(|e| StoreError::io(&config.dir, e))?;
        Ok(Self {
            sled,
            committer,
            syncs,
            dir: config.dir.clone(),
            // sled inlines page updates up to segment_size / 4 (minus a
            // header); keep a margin for the key and node framing.
            max_value: (config.segment_size / 4).saturating_sub(4096),
            index,
            atomic: config.atomic_batches,
        })
    }

    /// A queue's chunks from their index entries: (first id, (size, expiry)
    /// per message, state with the ack bitmap).
    fn live_chunks(&self, queue: QueueId) -> Result<Vec<IndexedChunk>, StoreError> {
        self.sled
            .with(|s| live_chunks(&s.messages, queue).collect())
    }

    /// Give every message stored by a version without chunks (one value per
    /// message, no index entry) an index entry of its own, once, so that
    /// start finds it: an upgrade must never hide stored messages.
    fn migrate(messages: &sled::Tree, meta: &sled::Tree) -> Result<(), StoreError> {
        const FORMAT: &str = "store/format";
        if meta.get(FORMAT).map_err(StoreError::sled)?.is_some() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut n = 0u64;
        for entry in messages.iter() {
            let (k, v) = entry.map_err(StoreError::sled)?;
            let Some(first) = chunk_first(&k) else {
                continue;
            };
            if k.as_ref() == manifest::COMMIT_KEY {
                continue;
            }
            let queue = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
            let view = chunk::View::parse(&v)?;
            let index = chunk::encode_index((0..view.len()).map(|i| {
                let value = view.get(i).unwrap_or_default();
                (value.len() as u32, decode_expiry(value).unwrap_or(0))
            }));
            batch.insert(&chunk::index_key(queue, first), index);
            n += 1;
        }
        messages.apply_batch(batch).map_err(StoreError::sled)?;
        meta.insert(FORMAT, "2").map_err(StoreError::sled)?;
        if n > 0 {
            tracing::info!(
                messages = n,
                "store: indexed messages stored by an earlier version"
            );
        }
        Ok(())
    }

    /// The largest value the store keeps durably (larger ones are refused).
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// Refuse `items` if one is larger than [`Self::max_value`].
    fn fits(&self, items: &[Append]) -> Result<(), StoreError> {
        match items.iter().find(|i| i.value.len() > self.max_value) {
            Some(big) => Err(StoreError::TooLarge {
                len: big.value.len(),
                max: self.max_value,
            }),
            None => Ok(()),
        }
    }

    /// Append `items` on the caller's thread, not synced and not through
    /// the group commit: for a store applied from a Raft log, whose
    /// appends are durable in the log already (a hand-off to the commit
    /// thread per applied entry cost a follower more than the write). A
    /// later [`MessageStore::sync`] makes them durable here too.
    pub fn append_unsynced(&self, items: Vec<Append>) -> Result<(), StoreError> {
        self.fits(&items)?;
        let chunks = chunk::build(items);
        let mut writes = Writes::new(self.atomic);
        commit::stage(&mut writes, chunks.iter());
        self.sled.with(|s| writes.apply(&s.messages))?;
        // Outside the handles' lock: readers take a chunk lock first.
        commit::index(&self.index, chunks.iter());
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.sled
            .with(|s| s.db.size_on_disk().map_err(StoreError::sled))
            .unwrap_or(0)
    }
}

/// What the broker needs from storage. [`Store`] implements it on sled;
/// a wrapper can inject faults (disk full, I/O errors) for tests.
pub trait MessageStore: Send + Sync {
    /// Append messages. With `durable`, the returned [`Commit`] resolves
    /// after the batch (and everything committed with it) is fsynced;
    /// without, as soon as it is written.
    fn append(&self, items: Vec<Append>, durable: bool) -> Commit;
    /// Remove messages (acks, expiries, drops). Not synced before returning.
    fn remove(&self, queue: QueueId, ids: &[MsgId]) -> Result<(), StoreError>;
    /// Read one message's stored value.
    fn get(&self, queue: QueueId, id: MsgId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Read several messages of one queue (`None` for ids not stored).
    fn get_many(&self, queue: QueueId, ids: &[MsgId]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        ids.iter().map(|id| self.get(queue, *id)).collect()
    }
    /// Every message of `queue` in id order: (id, stored size, expiry ms or 0).
    fn scan_queue(
        &self,
        queue: QueueId,
    ) -> Box<dyn Iterator<Item = Result<(MsgId, u32, u64), StoreError>> + '_>;
    /// Delete every message of `queue`; returns how many.
    fn clear_queue(&self, queue: QueueId) -> Result<u64, StoreError>;
    /// A new unique queue id, never reused.
    fn allocate_queue_id(&self) -> Result<QueueId, StoreError>;
    /// Set a metadata value (durable after [`MessageStore::sync`]).
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Delete a metadata value.
    fn delete_meta(&self, key: &str) -> Result<(), StoreError>;
    /// Every metadata entry whose key starts with `prefix`.
    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Store a large value (a plugin component).
    fn put_blob(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Read a large value.
    fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Delete a large value.
    fn delete_blob(&self, key: &str) -> Result<(), StoreError>;
    /// Make everything written so far durable, and record it in the
    /// manifest (shutdown, start).
    fn sync(&self) -> Result<(), StoreError>;
    /// Make metadata written so far durable (a declare, a bind, a plugin
    /// load), sharing the fsync of the next group commit: a flood of
    /// metadata changes costs one fsync per commit, not one each.
    fn sync_meta(&self) -> Result<(), StoreError> {
        self.sync()
    }
}

impl MessageStore for Store {
    /// Append messages. With `durable`, the returned [`Commit`] resolves
    /// after the batch (and everything committed with it) is fsynced;
    /// without, as soon as it is written to sled.
    fn append(&self, items: Vec<Append>, durable: bool) -> Commit {
        if let Err(e) = self.fits(&items) {
            return Commit::failed(e);
        }
        self.committer.submit(chunk::build(items), durable)
    }

    /// Remove messages (acks, expiries, drops). Not synced before returning.
    fn remove(&self, queue: QueueId, ids: &[MsgId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let chunks = self.index.queue(queue);
        let mut chunks = chunk::lock(&chunks);
        let mut batch = Writes::new(self.atomic);
        chunks.ack(ids, &mut batch);
        // Written while the queue's chunks are locked, so bitmaps of one
        // chunk reach sled in the order they were computed.
        self.sled.with(|s| batch.apply(&s.messages))
    }

    /// Read one message's stored value.
    fn get(&self, queue: QueueId, id: MsgId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_many(queue, &[id])?.pop().flatten())
    }

    /// Read several messages of one queue, one sled read per chunk.
    fn get_many(&self, queue: QueueId, ids: &[MsgId]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // Where each id lives: (chunk's first id, index in it), if live.
        let places: Vec<Option<(MsgId, usize)>> = {
            let chunks = self.index.queue(queue);
            let chunks = chunk::lock(&chunks);
            ids.iter()
                .map(|&id| {
                    let (first, c) = chunks.find(id)?;
                    let i = (id - first) as usize;
                    (!c.is_acked(i)).then_some((first, i))
                })
                .collect()
        };
        self.sled.with(|s| {
            let mut out = Vec::with_capacity(ids.len());
            let mut current: Option<(MsgId, sled::IVec)> = None;
            for place in places {
                let Some((first, i)) = place else {
                    out.push(None);
                    continue;
                };
                if current.as_ref().is_none_or(|(f, _)| *f != first) {
                    current = s
                        .messages
                        .get(key(queue, first))
                        .map_err(StoreError::sled)?
                        .map(|v| (first, v));
                }
                match &current {
                    Some((_, value)) => {
                        out.push(chunk::View::parse(value)?.get(i).map(<[u8]>::to_vec))
                    }
                    None => out.push(None),
                }
            }
            Ok(out)
        })
    }

    /// Every live message of `queue` in id order: (id, stored value size,
    /// expiry ms or 0). Reads only the chunks' index entries, not the
    /// messages, and rebuilds the queue's chunk index.
    fn scan_queue(
        &self,
        queue: QueueId,
    ) -> Box<dyn Iterator<Item = Result<(MsgId, u32, u64), StoreError>> + '_> {
        self.index.forget(queue);
        let chunks = self.index.queue(queue);
        let mut entries = match self.live_chunks(queue) {
            Ok(all) => all.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
            Err(e) => vec![Err(e)].into_iter(),
        };
        let mut ready: std::collections::VecDeque<(MsgId, u32, u64)> = Default::default();
        Box::new(std::iter::from_fn(move || {
            loop {
                if let Some(e) = ready.pop_front() {
                    return Some(Ok(e));
                }
                let (first, messages, state) = match entries.next()? {
                    Ok(chunk) => chunk,
                    Err(e) => return Some(Err(e)),
                };
                for (i, (size, expiry)) in messages.into_iter().enumerate() {
                    if !state.is_acked(i) {
                        ready.push_back((first + i as u64, size, expiry));
                    }
                }
                if state.live > 0 {
                    chunk::lock(&chunks).insert(first, state);
                }
            }
        }))
    }

    /// Delete every message of `queue` (queue delete or purge). Returns how
    /// many live messages were removed.
    fn clear_queue(&self, queue: QueueId) -> Result<u64, StoreError> {
        let chunks = self.index.queue(queue);
        let _writes = chunk::lock(&chunks);
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for (first, _, state) in self.live_chunks(queue)? {
            n += u64::from(state.live);
            batch.remove(&key(queue, first));
            batch.remove(&chunk::index_key(queue, first));
            batch.remove(&chunk::ack_key(queue, first));
        }
        self.sled.with(|s| {
            // Leftovers without an index entry (none are written, but a
            // chunk must never outlive its queue).
            for k in s.messages.scan_prefix(queue.to_be_bytes()).keys() {
                batch.remove(k.map_err(StoreError::sled)?);
            }
            s.messages.apply_batch(batch).map_err(StoreError::sled)
        })?;
        self.index.forget(queue);
        Ok(n)
    }

    /// A new unique queue id (persisted by sled; never reused).
    fn allocate_queue_id(&self) -> Result<QueueId, StoreError> {
        self.sled
            .with(|s| s.db.generate_id().map_err(StoreError::sled))
    }

    /// Set a metadata value. Call [`Store::sync`] to make it durable.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.sled.with(|s| {
            s.meta
                .insert(key, value)
                .map(|_| ())
                .map_err(StoreError::sled)
        })
    }

    /// Delete a metadata value.
    fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.sled
            .with(|s| s.meta.remove(key).map(|_| ()).map_err(StoreError::sled))
    }

    /// Every metadata entry whose key starts with `prefix`.
    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.sled.with(|s| {
            s.meta
                .scan_prefix(prefix)
                .map(|r| {
                    let (k, v) = r.map_err(StoreError::sled)?;
                    let k = String::from_utf8(k.to_vec())
                        .map_err(|_| StoreError::Corrupt("metadata key is not UTF-8".into()))?;
                    Ok((k, v.to_vec()))
                })
                .collect()
        })
    }

    /// Store a large value (a plugin component). Durable after a sync
    /// (values too large for sled's log go to its blob files, which the
    /// committer fsyncs, see [`commit`]).
    fn put_blob(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.sled.with(|s| {
            s.blobs
                .insert(key, value)
                .map(|_| ())
                .map_err(StoreError::sled)
        })
    }

    /// Read a large value.
    fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.sled.with(|s| {
            s.blobs
                .get(key)
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(StoreError::sled)
        })
    }

    /// Delete a large value.
    fn delete_blob(&self, key: &str) -> Result<(), StoreError> {
        self.sled
            .with(|s| s.blobs.remove(key).map(|_| ()).map_err(StoreError::sled))
    }

    /// Make everything written so far durable (a group commit: flush +
    /// fdatasync) and record it in the manifest.
    fn sync(&self) -> Result<(), StoreError> {
        self.committer.sync_blocking(true)
    }

    /// Make metadata durable with the next group commit.
    fn sync_meta(&self) -> Result<(), StoreError> {
        self.committer.sync_blocking(false)
    }
}

#[cfg(test)]
mod tests;
