//! A group of changes to one sled tree, written atomically or key by key
//! ([`super::StoreConfig::atomic_batches`]).

use super::StoreError;

/// Changes to one tree, in order.
pub(crate) enum Writes {
    /// One sled batch: all of it survives a crash, or none.
    Atomic(sled::Batch),
    /// Key by key, in order: a crash keeps a prefix.
    Each(Vec<(sled::IVec, Option<sled::IVec>)>),
}

impl Writes {
    pub(crate) fn new(atomic: bool) -> Self {
        if atomic {
            Writes::Atomic(sled::Batch::default())
        } else {
            Writes::Each(Vec::new())
        }
    }

    pub(crate) fn insert(&mut self, key: &[u8], value: &[u8]) {
        match self {
            Writes::Atomic(b) => b.insert(key, value),
            Writes::Each(w) => w.push((key.into(), Some(value.into()))),
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) {
        match self {
            Writes::Atomic(b) => b.remove(key),
            Writes::Each(w) => w.push((key.into(), None)),
        }
    }

    pub(crate) fn apply(self, tree: &sled::Tree) -> Result<(), StoreError> {
        match self {
            Writes::Atomic(b) => tree.apply_batch(b).map_err(StoreError::sled),
            Writes::Each(w) => {
                for (k, v) in w {
                    match v {
                        Some(v) => tree.insert(k, v),
                        None => tree.remove(k),
                    }
                    .map_err(StoreError::sled)?;
                }
                Ok(())
            }
        }
    }
}
