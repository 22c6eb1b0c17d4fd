//! The Raft log and vote of one group, in sled.

use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader, RaftTypeConfig};

use super::{decode, encode, index_key, io_error};

const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged";
const COMMITTED: &str = "committed";

/// The log and vote of one Raft group: entries in one sled tree keyed by
/// index, the vote, the last purged and the committed log id in another.
///
/// Writes are made in the order openraft issues them (it holds `&mut`);
/// durability comes from its flusher thread, whose `fdatasync` covers every
/// write made before it started.
pub struct SledLog<C: RaftTypeConfig> {
    logs: sled::Tree,
    meta: sled::Tree,
    flusher: Arc<Flusher>,
    _c: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for SledLog<C> {
    fn clone(&self) -> Self {
        Self {
            logs: self.logs.clone(),
            meta: self.meta.clone(),
            flusher: self.flusher.clone(),
            _c: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> SledLog<C> {
    /// Open the log of group `group` in `db`, the database at `dir` (trees
    /// `raft/{group}/log` and `raft/{group}/meta`), with its own flusher
    /// thread.
    pub fn open(db: &sled::Db, dir: &Path, group: &str) -> io::Result<Self> {
        let logs = db
            .open_tree(format!("raft/{group}/log"))
            .map_err(|e| io_error("open the raft log", e))?;
        let meta = db
            .open_tree(format!("raft/{group}/meta"))
            .map_err(|e| io_error("open the raft log", e))?;
        Ok(Self {
            logs,
            meta,
            flusher: Arc::new(Flusher::start(db.clone(), dir.to_path_buf(), group)?),
            _c: PhantomData,
        })
    }

    /// How many `fdatasync`s the log made (each covers every append that
    /// was waiting for it).
    pub fn syncs(&self) -> u64 {
        self.flusher.syncs()
    }

    fn get_meta<T: for<'de> serde::Deserialize<'de>>(&self, key: &str) -> io::Result<Option<T>> {
        super::read(&self.meta, key, "read the raft log")
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> io::Result<()> {
        self.meta
            .insert(key, encode(key, value)?)
            .map_err(|e| io_error("write the raft log", e))?;
        Ok(())
    }

    /// Remove the entries from `from` on, last first, so that no hole is
    /// ever left.
    fn remove_from(&self, from: u64) -> io::Result<()> {
        for item in self.logs.range(index_key(from)..).rev() {
            let (key, _) = item.map_err(|e| io_error("truncate the raft log", e))?;
            self.logs
                .remove(key)
                .map_err(|e| io_error("truncate the raft log", e))?;
        }
        Ok(())
    }
}

impl<C: RaftTypeConfig> RaftLogReader<C> for SledLog<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.logs.range(index_key(start)..) {
            let (key, bytes) = item.map_err(|e| io_error("read the raft log", e))?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| io_error("read the raft log", "a key is not an index"))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(decode::<C::Entry>("raft log entry", &bytes)?);
        }
        Ok(out)
    }

    /// Entries read [`STREAM_PIECE`] at a time (openraft's default reads
    /// the whole range first: a node applying a backlog of committed
    /// entries would hold all of it in memory).
    async fn entries_stream<RB>(
        &mut self,
        range: RB,
    ) -> impl futures::Stream<Item = Result<C::Entry, io::Error>> + OptionalSend
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        use futures::StreamExt;
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        futures::stream::unfold((self.clone(), start), move |(mut log, next)| async move {
            if next >= end {
                return None;
            }
            let upto = next.saturating_add(STREAM_PIECE).min(end);
            let piece: Vec<Result<C::Entry, io::Error>> =
                match log.try_get_log_entries(next..upto).await {
                    // Unbounded: an empty piece is the end of the log.
                    Ok(v) if v.is_empty() && end == u64::MAX => return None,
                    Ok(v) => v.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                };
            let next = if piece.iter().any(Result::is_err) {
                end
            } else {
                upto
            };
            Some((futures::stream::iter(piece), (log, next)))
        })
        .flatten()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.get_meta(VOTE)
    }
}

/// Log entries read at once by [`SledLog`]'s entry stream.
const STREAM_PIECE: u64 = 16;

impl<C: RaftTypeConfig> RaftLogStorage<C> for SledLog<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<C>> = self.get_meta(LAST_PURGED)?;
        let last = match self
            .logs
            .last()
            .map_err(|e| io_error("read the raft log", e))?
        {
            Some((_, bytes)) => Some(decode::<C::Entry>("raft log entry", &bytes)?.log_id()),
            None => None,
        };
        Ok(LogState {
            last_log_id: last.or_else(|| last_purged_log_id.clone()),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.put_meta(VOTE, vote)?;
        self.flusher.flush().await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Not flushed: a later append's or vote's sync makes it durable,
        // and a committed id that is lost only means re-applying less.
        match committed {
            Some(id) => self.put_meta(COMMITTED, &id),
            None => {
                self.meta
                    .remove(COMMITTED)
                    .map_err(|e| io_error("write the raft log", e))?;
                Ok(())
            }
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        self.get_meta(COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.index()), encode("raft log entry", &entry)?);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| io_error("append to the raft log", e))?;
        // Readable now; flushed (and reported) by the flusher thread.
        self.flusher
            .submit(Box::new(move |r| callback.io_completed(r)));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.remove_from(from)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // The purge point first: entries at or below it are ignored from
        // then on, so removing them needs no transaction.
        self.put_meta(LAST_PURGED, &log_id)?;
        for item in self.logs.range(..=index_key(log_id.index())) {
            let (key, _) = item.map_err(|e| io_error("purge the raft log", e))?;
            self.logs
                .remove(key)
                .map_err(|e| io_error("purge the raft log", e))?;
        }
        Ok(())
    }
}

/// What to do once a flush is done.
type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One thread that makes the database durable for whoever asks: it takes
/// every request waiting, runs one `flush` (sled's write-out and
/// `fdatasync`), syncs the blob files sled wrote for large entries (sled
/// never does) and answers them all, in order.
///
/// Dropped with the last handle of its log: it answers what is waiting,
/// then its thread ends and releases the database.
struct Flusher {
    tx: Mutex<Option<mpsc::Sender<Done>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        match self.tx.lock() {
            Ok(mut tx) => drop(tx.take()),
            Err(p) => drop(p.into_inner().take()),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Flusher {
    fn start(db: sled::Db, dir: PathBuf, group: &str) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Done>();
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = syncs.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sluice-raft-{group}"))
            .spawn(move || {
                let mut synced = std::collections::HashMap::new();
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let result = db.flush().map_err(|e| e.to_string()).and_then(|_| {
                        crate::store::sync_blob_files(&dir, &mut synced).map_err(|e| e.to_string())
                    });
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for done in waiting {
                        done(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io_error("sync the raft log", e)),
                        });
                    }
                }
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
            syncs,
        })
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flush later and call `done` with the outcome.
    fn submit(&self, done: Done) {
        let tx = match self.tx.lock() {
            Ok(tx) => tx.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let unsent = match tx {
            Some(tx) => tx.send(done).err().map(|mpsc::SendError(done)| done),
            None => Some(done),
        };
        if let Some(done) = unsent {
            done(Err(io_error("sync the raft log", "the flusher stopped")));
        }
    }

    /// Flush now and wait for it.
    async fn flush(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await
            .map_err(|_| io_error("sync the raft log", "the flusher stopped"))?
    }
}
