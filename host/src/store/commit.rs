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
use super::{StoreError, key, manifest};

struct Request {
    items: Vec<NewChunk>,
    durable: bool,
    reply: oneshot::Sender<Result<(), StoreError>>,
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
        let sent = match &self.tx {
            Some(tx) => tx
                .send(Request {
                    items,
                    durable,
                    reply,
                })
                .is_ok(),
            None => false,
        };
        if sent {
            Commit(CommitInner::Waiting(rx))
        } else {
            Commit(CommitInner::Failed(Some(StoreError::Closed)))
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
            let _ = r.reply.send(result.clone());
        }
    }
}

fn messages(r: &Request) -> usize {
    r.items.iter().map(|c| c.len as usize).sum()
}

fn commit(log: &mut CommitLog, requests: &[Request]) -> Result<(), StoreError> {
    let durable = requests.iter().any(|r| r.durable);
    let sled = log.sled.clone();
    sled.with(|s| {
        // After a failure (and a reopen) the stored number may be ahead.
        if log.failed {
            log.commit = log.commit.max(manifest::stored(&s.messages)?);
            log.failed = false;
        }
        let mut batch = sled::Batch::default();
        for r in requests {
            for c in &r.items {
                batch.insert(&key(c.queue, c.first), c.value.as_slice());
                batch.insert(&chunk::index_key(c.queue, c.first), c.index.as_slice());
            }
        }
        if durable {
            batch.insert(&manifest::COMMIT_KEY, &(log.commit + 1).to_be_bytes());
        }
        s.messages.apply_batch(batch).map_err(StoreError::sled)?;
        if let Err(e) = sync(log, s, durable) {
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
    for c in requests.iter().flat_map(|r| &r.items) {
        chunk::lock(&log.index.queue(c.queue)).insert(c.first, ChunkState::new(c.len, Vec::new()));
    }
    Ok(())
}

/// Make a durable commit stick: sled flush, fdatasync of its data file,
/// and now and then the manifest.
fn sync(log: &mut CommitLog, s: &Sled, durable: bool) -> Result<(), StoreError> {
    if !durable {
        return Ok(());
    }
    s.db.flush().map_err(StoreError::sled)?;
    s.data_file.sync_data().map_err(|e| StoreError::Io {
        path: "db".into(),
        message: e.to_string(),
    })?;
    log.commit += 1;
    if log.manifest_at.elapsed() >= std::time::Duration::from_millis(100) {
        manifest::write(&log.dir, log.commit)?;
        log.manifest_at = std::time::Instant::now();
    }
    Ok(())
}
