//! The whole store as records, and replacing it: what a cluster's
//! snapshots are made of.
//!
//! A record is one sled entry of one tree, copied as stored (chunks, their
//! index entries and ack bitmaps, metadata, blobs), so a store replaced by
//! another's records holds exactly what the other held. The commit number
//! is the one entry never copied: it counts this store's own durable
//! commits (see [`super::manifest`]).

use super::{Store, StoreError, manifest};

/// A tree of the store, as records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Chunks, index entries and ack bitmaps.
    Messages,
    /// Broker metadata.
    Meta,
    /// Large values.
    Blobs,
}

impl Tree {
    /// Every tree, in the order records are exported.
    pub const ALL: [Tree; 3] = [Tree::Messages, Tree::Meta, Tree::Blobs];

    /// The tree's tag in a record.
    pub fn tag(self) -> u8 {
        match self {
            Tree::Messages => 0,
            Tree::Meta => 1,
            Tree::Blobs => 2,
        }
    }

    /// The tree a tag names.
    pub fn from_tag(tag: u8) -> Option<Tree> {
        Tree::ALL.into_iter().find(|t| t.tag() == tag)
    }

    fn of(self, s: &super::handles::Sled) -> &sled::Tree {
        match self {
            Tree::Messages => &s.messages,
            Tree::Meta => &s.meta,
            Tree::Blobs => &s.blobs,
        }
    }
}

/// One store entry: its tree, key and value.
pub type Record = (Tree, Vec<u8>, Vec<u8>);

/// Entries removed or inserted per sled batch while replacing.
const BATCH_BYTES: usize = 4 << 20;
/// Bytes written while replacing between two flushes of sled.
const FLUSH_BYTES: usize = 32 << 20;

impl Store {
    /// Hand every entry of the store (tree by tree, in key order; not the
    /// commit number) to `each`. A consistent copy only while nobody
    /// writes: the caller holds writers off.
    pub fn export<E: From<StoreError>>(
        &self,
        mut each: impl FnMut(Tree, &[u8], &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut n = 0;
        for tree in Tree::ALL {
            let t = self.sled.with(|s| Ok(tree.of(s).clone()))?;
            for entry in t.iter() {
                let (k, v) = entry.map_err(StoreError::sled)?;
                if tree == Tree::Messages && k.as_ref() == manifest::COMMIT_KEY {
                    continue;
                }
                each(tree, &k, &v)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Replace the whole content of the store with `records` (from
    /// [`Store::export`] of another store), durably: everything is
    /// removed, the records are written, and the store syncs. Not atomic:
    /// a crash in between leaves part of both, so the caller keeps the
    /// records and replaces again at its next start. Nobody may read or
    /// write the store meanwhile.
    pub fn replace<E: From<StoreError>>(
        &self,
        records: impl Iterator<Item = Result<Record, E>>,
    ) -> Result<u64, E> {
        for tree in Tree::ALL {
            let t = self.sled.with(|s| Ok(tree.of(s).clone()))?;
            let mut batch = sled::Batch::default();
            let mut bytes = 0;
            for k in t.iter().keys() {
                let k = k.map_err(StoreError::sled)?;
                if tree == Tree::Messages && k.as_ref() == manifest::COMMIT_KEY {
                    continue;
                }
                bytes += k.len() + 16;
                batch.remove(k);
                if bytes >= BATCH_BYTES {
                    t.apply_batch(std::mem::take(&mut batch))
                        .map_err(StoreError::sled)?;
                    bytes = 0;
                }
            }
            t.apply_batch(batch).map_err(StoreError::sled)?;
        }
        self.index.clear();
        let mut n = 0;
        let mut batch: Option<(Tree, sled::Batch, usize)> = None;
        let mut unflushed = 0;
        let mut write = |b: Option<(Tree, sled::Batch, usize)>| -> Result<(), StoreError> {
            let Some((tree, batch, bytes)) = b else {
                return Ok(());
            };
            self.sled.with(|s| {
                tree.of(s).apply_batch(batch).map_err(StoreError::sled)?;
                // sled keeps written pages in memory until they are
                // flushed: flush as we go, so a large snapshot is not
                // held whole.
                unflushed += bytes;
                if unflushed >= FLUSH_BYTES {
                    unflushed = 0;
                    s.db.flush().map_err(StoreError::sled)?;
                }
                Ok(())
            })
        };
        for record in records {
            let (tree, k, v) = record?;
            if tree == Tree::Messages && k.as_slice() == manifest::COMMIT_KEY {
                continue;
            }
            if batch
                .as_ref()
                .is_some_and(|(t, _, bytes)| *t != tree || *bytes >= BATCH_BYTES)
            {
                write(batch.take())?;
            }
            let (_, b, bytes) = batch.get_or_insert_with(|| (tree, sled::Batch::default(), 0));
            *bytes += k.len() + v.len();
            b.insert(k, v);
            n += 1;
        }
        write(batch)?;
        self.index.clear();
        super::MessageStore::sync(self)?;
        Ok(n)
    }
}
