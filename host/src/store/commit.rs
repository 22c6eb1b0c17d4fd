//! Group commit: one thread applies every waiting append as one batch, then
//! flushes sled and fdatasyncs its data file, then answers every waiter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::chunk::{self, ChunkState, NewChunk};
use super::handles::{Handles, Sled};
use super::{StoreError, Writes, key, manifest};

struct Request {
    items: Vec<NewChunk>,
    durable: bool,
    /// Also record the commit in the manifest now (explicit syncs).
    manifest: bool,
    reply: Reply,
}

/// How a waiter is answered.
enum Reply {
    Async(oneshot::Sender<Result<(), StoreError>>),
    Blocking(std::sync::mpsc::SyncSender<Result<(), StoreError>>),
}

impl Reply {
    fn send(self, result: Result<(), StoreError>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Resolves when an append is committed (durable appends: fsynced).
pub struct Commit(CommitInner);

enum CommitInner {
    Waiting(oneshot::Receiver<Result<(), StoreError>>),
    Failed(Option<StoreError>),
}

impl Future for Commit {
    type Output = Result<(), StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            CommitInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
            CommitInner::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(StoreError::Closed))),
        }
    }
}

impl Commit {
    /// A commit that already failed (for stores that refuse up front).
    pub fn failed(err: StoreError) -> Self {
        Commit(CommitInner::Failed(Some(err)))
    }

    /// A commit answered on `rx` (for stores that commit elsewhere).
    pub(crate) fn pending(rx: oneshot::Receiver<Result<(), StoreError>>) -> Self {
        Commit(CommitInner::Waiting(rx))
    }

    /// Block the current (non-async) thread until committed.
    pub fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            CommitInner::Waiting(rx) => rx.blocking_recv().unwrap_or(Err(StoreError::Closed)),
            CommitInner::Failed(e) => Err(e.unwrap_or(StoreError::Closed)),
        }
    }
}

pub(crate) struct Committer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Finish what is queued, then stop: the thread's handle on sled must be
    /// gone before the store can be reopened.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    pub(crate) fn start(log: CommitLog, max_batch: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("sluice-commit".into())
            .spawn(move || run(rx, log, max_batch))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn submit(&self, items: Vec<NewChunk>, durable: bool) -> Commit {
        let (reply, rx) = oneshot::channel();
        if self.send(items, durable, false, Reply::Async(reply)) {
            Commit(CommitInner::Waiting(rx))
        } else {
            Commit(CommitInner::Failed(Some(StoreError::Closed)))
        }
    }

    /// A durable commit of nothing, waited for on this thread (any thread,
    /// async or not): everything written before it becomes durable with the
    /// next group commit, sharing its fsync with whatever else commits.
    /// With `manifest`, the commit is also recorded in the manifest.
    pub(crate) fn sync_blocking(&self, manifest: bool) -> Result<(), StoreError> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        if !self.send(Vec::new(), true, manifest, Reply::Blocking(reply)) {
            return Err(StoreError::Closed);
        }
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    fn send(&self, items: Vec<NewChunk>, durable: bool, manifest: bool, reply: Reply) -> bool {
        match &self.tx {
            Some(tx) => tx
                .send(Request {
                    items,
                    durable,
                    manifest,
                    reply,
                })
                .is_ok(),
            None => false,
        }
    }
}

/// What the committer thread owns.
pub(crate) struct CommitLog {
    pub sled: Arc<Handles>,
    /// Chunks become visible here once written.
    pub index: Arc<chunk::Index>,
    pub dir: std::path::PathBuf,
    /// Last durable commit number.
    pub commit: u64,
    /// The last commit failed: re-read the stored number before the next.
    pub failed: bool,
    pub manifest_at: std::time::Instant,
    /// sled blob files already fsynced.
    pub synced_blobs: std::collections::HashMap<std::ffi::OsString, u64>,
    /// fdatasyncs of the data file so far (one per durable group commit).
    pub syncs: Arc<std::sync::atomic::AtomicU64>,
    /// See [`super::StoreConfig::atomic_batches`].
    pub atomic: bool,
}

fn run(rx: mpsc::Receiver<Request>, mut log: CommitLog, max_batch: usize) {
    let mut waiting: Vec<Request> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut count = messages(&first);
        waiting.push(first);
        while count < max_batch {
            match rx.try_recv() {
                Ok(r) => {
                    count += messages(&r);
                    waiting.push(r);
                }
                Err(_) => break,
            }
        }
        let result = commit(&mut log, &waiting);
        for r in waiting.drain(..) {
            r.reply.send(result.clone());
        }
    }
}

fn messages(r: &Request) -> usize {
    r.items.iter().map(|c| c.len as usize).sum()
}

fn commit(log: &mut CommitLog, requests: &[Request]) -> Result<(), StoreError> {
    let durable = requests.iter().any(|r| r.durable);
    let manifest = requests.iter().any(|r| r.manifest);
    let sled = log.sled.clone();
    sled.with(|s| {
        // After a failure (and a reopen) the stored number may be ahead.
        if log.failed {
            log.commit = log.commit.max(manifest::stored(&s.messages)?);
            log.failed = false;
        }
        let mut batch = Writes::new(log.atomic);
        stage(&mut batch, requests.iter().flat_map(|r| &r.items));
        if durable {
            batch.insert(&manifest::COMMIT_KEY, &(log.commit + 1).to_be_bytes());
        }
        batch.apply(&s.messages)?;
        if let Err(e) = sync(log, s, durable, manifest) {
            // Not confirmed: take the chunks back out (best effort) so a
            // refused publish does not come back after a restart.
            let mut undo = sled::Batch::default();
            for c in requests.iter().flat_map(|r| &r.items) {
                undo.remove(&key(c.queue, c.first));
                undo.remove(&chunk::index_key(c.queue, c.first));
            }
            let _ = s.messages.apply_batch(undo);
            return Err(e);
        }
        Ok(())
    })
    .inspect_err(|_| log.failed = true)?;
    // Outside the handles' lock: readers take a chunk lock first.
    index(&log.index, requests.iter().flat_map(|r| &r.items));
    Ok(())
}

/// Add `chunks`' values and index entries to `writes`.
pub(crate) fn stage<'a>(writes: &mut Writes, chunks: impl Iterator<Item = &'a NewChunk>) {
    for c in chunks {
        writes.insert(&key(c.queue, c.first), c.value.as_slice());
        writes.insert(&chunk::index_key(c.queue, c.first), c.index.as_slice());
    }
}

/// Make written `chunks` readable: their state in the live index.
pub(crate) fn index<'a>(index: &chunk::Index, chunks: impl Iterator<Item = &'a NewChunk>) {
    for c in chunks {
        chunk::lock(&index.queue(c.queue)).insert(c.first, ChunkState::new(c.len, Vec::new()));
    }
}

/// Make a durable commit stick: sled flush, fdatasync of its data file,
/// and now and then the manifest.
fn sync(log: &mut CommitLog, s: &Sled, durable: bool, manifest: bool) -> Result<(), StoreError> {
    if !durable {
        return Ok(());
    }
    s.db.flush().map_err(StoreError::sled)?;
    sync_blob_files(&log.dir, &mut log.synced_blobs)?;
    s.data_file.sync_data().map_err(|e| StoreError::Io {
        path: "db".into(),
        message: e.to_string(),
    })?;
    log.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log.commit += 1;
    if manifest || log.manifest_at.elapsed() >= std::time::Duration::from_millis(100) {
        manifest::write(&log.dir, log.commit)?;
        log.manifest_at = std::time::Instant::now();
    }
    Ok(())
}

/// fsync every sled blob file not fsynced yet (or grown since), and the
/// blobs directory.
///
/// sled 0.34 writes a page larger than a quarter of a segment (a large
/// value, or a leaf node holding several: leaves split by entry count, not
/// size) to its own file under `<dir>/blobs` and never fsyncs it, while the
/// log record pointing at it is made durable by our fdatasync. A blob a
/// commit needs is complete once `flush()` returned; syncing it (and the
/// directory entry) before the log makes the commit durable. A file seen
/// while another thread still writes it is synced again when its length
/// changed.
pub(crate) fn sync_blob_files(
    dir: &std::path::Path,
    synced: &mut std::collections::HashMap<std::ffi::OsString, u64>,
) -> Result<(), StoreError> {
    let blobs = dir.join("blobs");
    let entries = match std::fs::read_dir(&blobs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(&blobs, e)),
    };
    let mut present = std::collections::HashMap::new();
    let mut new = false;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&blobs, e))?;
        let name = entry.file_name();
        let path = entry.path();
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        // Removed by sled's blob GC meanwhile: nothing to sync.
        let len = match entry.metadata() {
            Ok(m) => m.len(),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        if synced.get(&name) != Some(&len) {
            match std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => new = true,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        present.insert(name, len);
    }
    if new {
        std::fs::File::open(&blobs)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(&blobs, e))?;
    }
    // Forget files sled has removed.
    *synced = present;
    Ok(())
}
