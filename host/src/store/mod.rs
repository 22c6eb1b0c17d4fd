//! Durable storage: queue messages and broker metadata on sled.
//!
//! # Layout
//!
//! One sled database in the data directory with three trees:
//! - `messages`: key = queue id (u64 BE) ‖ message id (u64 BE); value =
//!   an 8-byte expiry (ms since the epoch, 0 = none, so recovery can apply
//!   TTLs without decoding) followed by the bincode-encoded [`StoredMessage`];
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
//! lose an unacked one (at-least-once).

mod commit;
mod error;
mod manifest;
mod message;

pub use commit::Commit;
pub use error::StoreError;
pub use message::{StoredMessage, decode_expiry};

use std::fs::File;
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
}

impl StoreConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache_capacity: 64 << 20,
            max_batch: 4096,
            segment_size: 8 << 20,
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
    db: sled::Db,
    messages: sled::Tree,
    meta: sled::Tree,
    blobs: sled::Tree,
    data_file: Arc<File>,
    committer: Committer,
    dir: PathBuf,
    max_value: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn key(queue: QueueId, id: MsgId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Store {
    /// Open (or create) the store in `config.dir`.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| StoreError::io(&config.dir, e))?;
        let db = sled::Config::new()
            .path(&config.dir)
            .cache_capacity(config.cache_capacity)
            .segment_size(config.segment_size)
            // Durability comes from the committer's explicit syncs; sled's
            // background flusher only bounds how stale acks can be.
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| StoreError::open(&config.dir, e))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError::open(&config.dir, e))
        };
        let (messages, meta, blobs) = (tree("messages")?, tree("meta")?, tree("blobs")?);
        let data_path = config.dir.join("db");
        let data_file =
            Arc::new(File::open(&data_path).map_err(|e| StoreError::io(&data_path, e))?);
        let commit = manifest::check(&config.dir, &messages)?;
        let committer = Committer::start(
            commit::CommitLog {
                db: db.clone(),
                messages: messages.clone(),
                data_file: data_file.clone(),
                dir: config.dir.clone(),
                commit,
                manifest_at: std::time::Instant::now(),
            },
            config.max_batch.max(1),
        )
        .map_err(|e| StoreError::io(&config.dir, e))?;
        Ok(Self {
            db,
            messages,
            meta,
            blobs,
            data_file,
            committer,
            dir: config.dir.clone(),
            // sled inlines page updates up to segment_size / 4 (minus a
            // header); keep a margin for the key and node framing.
            max_value: (config.segment_size / 4).saturating_sub(4096),
        })
    }

    /// The largest value the store keeps durably (larger ones are refused).
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
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
    /// Make everything written so far durable.
    fn sync(&self) -> Result<(), StoreError>;
}

impl MessageStore for Store {
    /// Append messages. With `durable`, the returned [`Commit`] resolves
    /// after the batch (and everything committed with it) is fsynced;
    /// without, as soon as it is written to sled.
    fn append(&self, items: Vec<Append>, durable: bool) -> Commit {
        if let Some(big) = items.iter().find(|i| i.value.len() > self.max_value) {
            return Commit::failed(StoreError::TooLarge {
                len: big.value.len(),
                max: self.max_value,
            });
        }
        self.committer.submit(items, durable)
    }

    /// Remove messages (acks, expiries, drops). Not synced before returning.
    fn remove(&self, queue: QueueId, ids: &[MsgId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&key(queue, *id));
        }
        self.messages.apply_batch(batch).map_err(StoreError::sled)
    }

    /// Read one message's stored value.
    fn get(&self, queue: QueueId, id: MsgId) -> Result<Option<Vec<u8>>, StoreError> {
        self.messages
            .get(key(queue, id))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(StoreError::sled)
    }

    /// Every message of `queue` in id order: (id, stored value size, expiry ms or 0).
    fn scan_queue(
        &self,
        queue: QueueId,
    ) -> Box<dyn Iterator<Item = Result<(MsgId, u32, u64), StoreError>> + '_> {
        Box::new(self.messages.scan_prefix(queue.to_be_bytes()).map(|r| {
            let (k, v) = r.map_err(StoreError::sled)?;
            let id = k
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt(format!("message key of {} bytes", k.len())))?;
            let expiry = decode_expiry(&v)?;
            Ok((id, u32::try_from(v.len()).unwrap_or(u32::MAX), expiry))
        }))
    }

    /// Delete every message of `queue` (queue delete or purge). Returns how
    /// many were removed.
    fn clear_queue(&self, queue: QueueId) -> Result<u64, StoreError> {
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for k in self.messages.scan_prefix(queue.to_be_bytes()).keys() {
            batch.remove(k.map_err(StoreError::sled)?);
            n += 1;
        }
        self.messages.apply_batch(batch).map_err(StoreError::sled)?;
        Ok(n)
    }

    /// A new unique queue id (persisted by sled; never reused).
    fn allocate_queue_id(&self) -> Result<QueueId, StoreError> {
        self.db.generate_id().map_err(StoreError::sled)
    }

    /// Set a metadata value. Call [`Store::sync`] to make it durable.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta
            .insert(key, value)
            .map(|_| ())
            .map_err(StoreError::sled)
    }

    /// Delete a metadata value.
    fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.meta.remove(key).map(|_| ()).map_err(StoreError::sled)
    }

    /// Every metadata entry whose key starts with `prefix`.
    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.meta
            .scan_prefix(prefix)
            .map(|r| {
                let (k, v) = r.map_err(StoreError::sled)?;
                let k = String::from_utf8(k.to_vec())
                    .map_err(|_| StoreError::Corrupt("metadata key is not UTF-8".into()))?;
                Ok((k, v.to_vec()))
            })
            .collect()
    }

    /// Store a large value (a plugin component).
    fn put_blob(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.blobs
            .insert(key, value)
            .map(|_| ())
            .map_err(StoreError::sled)
    }

    /// Read a large value.
    fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.blobs
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(StoreError::sled)
    }

    /// Delete a large value.
    fn delete_blob(&self, key: &str) -> Result<(), StoreError> {
        self.blobs.remove(key).map(|_| ()).map_err(StoreError::sled)
    }

    /// Make everything written so far durable (flush + fdatasync).
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(StoreError::sled)?;
        self.data_file
            .sync_data()
            .map_err(|e| StoreError::io(&self.dir.join("db"), e))?;
        manifest::write(&self.dir, manifest::stored(&self.messages)?)
    }
}

#[cfg(test)]
mod tests;
