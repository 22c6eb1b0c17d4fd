//! The open sled database, and reopening it after an I/O failure.
//!
//! sled 0.34 remembers the first I/O error of a write or flush (a full
//! disk, say) and returns it from every later write until the database is
//! reopened. So the store keeps all of sled's handles in one place, every
//! operation borrows them for its duration, and after a failure the next
//! operation (at most every [`RETRY`]) closes and reopens sled: once space
//! returns, the store serves again without a restart. What sled had made
//! durable is what it reopens with; writes that were only in memory (acks
//! since the last flush) may come back at the next start, never confirmed
//! messages go missing.

use std::fs::File;
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use super::{StoreConfig, StoreError};

/// Least time between two reopen attempts.
const RETRY: Duration = Duration::from_millis(500);

/// sled's handles, replaced together.
pub(crate) struct Sled {
    pub db: sled::Db,
    pub messages: sled::Tree,
    pub meta: sled::Tree,
    pub blobs: sled::Tree,
    /// sled's data file `<dir>/db`, for `fdatasync`.
    pub data_file: File,
}

impl Sled {
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
        let data_file = File::open(&data_path).map_err(|e| StoreError::io(&data_path, e))?;
        Ok(Sled {
            db,
            messages,
            meta,
            blobs,
            data_file,
        })
    }
}

/// The open sled, or why it is not open, and how to reopen it.
pub(crate) struct Handles {
    current: RwLock<Option<Sled>>,
    config: StoreConfig,
    /// The failure that requires a reopen, and when it was last tried.
    failed: Mutex<Option<(StoreError, Instant)>>,
}

impl Handles {
    pub fn new(sled: Sled, config: StoreConfig) -> Self {
        Self {
            current: RwLock::new(Some(sled)),
            config,
            failed: Mutex::new(None),
        }
    }

    /// Run `f` on the open sled. An I/O or sled error marks the handles
    /// failed; the next call reopens them first.
    pub fn with<R>(&self, f: impl FnOnce(&Sled) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let guard = self.read()?;
        let Some(sled) = guard.as_ref() else {
            return Err(self.unavailable());
        };
        let result = f(sled);
        drop(guard);
        if let Err(e) = &result
            && matches!(e, StoreError::Sled(_) | StoreError::Io { .. })
        {
            self.fail(e.clone());
        }
        result
    }

    /// The handles, reopened first if a failure is pending and due.
    fn read(&self) -> Result<RwLockReadGuard<'_, Option<Sled>>, StoreError> {
        let due = {
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            match &*failed {
                None => false,
                Some((e, at)) if at.elapsed() < RETRY => return Err(e.clone()),
                Some(_) => true,
            }
        };
        if due {
            self.reopen();
        }
        Ok(self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn fail(&self, e: StoreError) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            tracing::error!(error = %e, "store: write failed; reopening the database before the next write");
            let now = Instant::now();
            *failed = Some((e, now.checked_sub(RETRY).unwrap_or(now)));
        }
    }

    fn unavailable(&self) -> StoreError {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed
            .as_ref()
            .map(|(e, _)| e.clone())
            .unwrap_or(StoreError::Closed)
    }

    /// Close sled (waiting for every operation using it) and open it again.
    fn reopen(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, at)) = failed.as_mut() else {
            return; // another thread reopened meanwhile
        };
        if at.elapsed() < RETRY {
            return;
        }
        *at = Instant::now();
        // sled holds a lock on its files: the old instance must be gone.
        drop(current.take());
        match Sled::open(&self.config) {
            Ok(sled) => {
                tracing::info!(dir = %self.config.dir.display(), "store: database reopened");
                *current = Some(sled);
                *failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "store: reopening the database failed; retrying");
                if let Some((last, _)) = failed.as_mut() {
                    *last = e;
                }
            }
        }
    }
}
