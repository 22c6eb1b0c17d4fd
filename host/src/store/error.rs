//! Store errors.

use std::path::Path;

/// What went wrong in the store. Every variant says where.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be opened.
    #[error("cannot open the data directory {path}: {message}")]
    Open {
        /// The directory.
        path: String,
        /// sled's explanation.
        message: String,
    },
    /// An I/O error on a file.
    #[error("I/O error on {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// sled reported an error (disk full, I/O, corruption).
    #[error("storage error: {0}")]
    Sled(String),
    /// Stored bytes could not be decoded.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// A value larger than the store keeps durably.
    #[error("a stored message of {len} bytes exceeds the store's durable limit of {max} bytes")]
    TooLarge {
        /// Size of the value.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// This node of a cluster is not (or no longer) the leader of the
    /// group: nothing was written.
    #[error("{}", sluice_proto::ErrorBody::not_leader(leader.as_deref()).message)]
    NotLeader {
        /// The leader's client address, if known.
        leader: Option<String>,
    },
    /// Replication failed (the group stopped, say); nothing was confirmed.
    #[error("replication failed: {0}")]
    Replication(String),
    /// The committer thread is gone (the store is shutting down).
    #[error("the store is shut down")]
    Closed,
}

impl StoreError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        StoreError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    pub(crate) fn open(path: &Path, e: sled::Error) -> Self {
        StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    pub(crate) fn sled(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e.to_string())
    }
}
