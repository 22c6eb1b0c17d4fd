//! The Raft log and vote of one group, in files of its own.
//!
//! A log directory holds `meta` (the vote, the committed and the last
//! purged log id, replaced whole: written aside, fsynced, renamed) and
//! segments `seg-<first index>`, each a run of records
//! `[length u32][crc32 u32][entry]` for consecutive indexes; a new segment
//! starts once the last one passes [`SEGMENT_BYTES`]. Memory holds each
//! entry's offset (8 bytes an entry), never the entries: a node catching
//! up, or a leader sending a backlog, reads them from the files. (sled,
//! which held the log before, keeps what is written in memory whatever its
//! cache size: a node catching up held its whole backlog twice.)
//!
//! Appends are written at once (readable from then on) and reported
//! flushed by one flusher thread only after `fdatasync` of every segment
//! written to (and of the directory when a segment was created): appends
//! that arrive while it syncs share its next sync. A segment is synced
//! before the next one starts, so a crash can tear only the last one: at
//! open a torn or damaged record there ends the log (nothing from it on
//! was ever reported flushed), while one in an earlier segment is damage
//! and the log refuses to open.

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Read};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader, RaftTypeConfig};
use serde::{Deserialize, Serialize};

use super::{decode, encode, io_error};

/// A segment is closed (the next append starts a new one) past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Bytes before each record's entry: its length and CRC-32.
pub(super) const HEADER: usize = 8;

/// Log entries read at once by the entry stream.
const STREAM_PIECE: u64 = 16;

/// The log and vote of one Raft group in a directory (see the module
/// docs). Clones share the files; openraft holds `&mut` for writes, so
/// they come in its order.
pub struct FileLog<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
    flusher: Arc<Flusher>,
}

impl<C: RaftTypeConfig> Clone for FileLog<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            flusher: self.flusher.clone(),
        }
    }
}

struct Shared<C: RaftTypeConfig> {
    dir: PathBuf,
    /// A segment is closed past this size.
    segment_bytes: u64,
    inner: Mutex<Inner<C>>,
    /// Held while `meta` is rewritten (by a vote, or by the flusher for
    /// the committed id).
    meta_write: Mutex<()>,
}

struct Inner<C: RaftTypeConfig> {
    segments: Vec<Segment>,
    meta: Meta<C>,
    /// The last entry's id (`None`: no entry).
    last: Option<LogIdOf<C>>,
    /// Segments written since the flusher last took this list.
    dirty: Vec<Arc<File>>,
    /// A segment was created or removed since then.
    dir_dirty: bool,
    /// The committed id changed since `meta` was last written.
    meta_dirty: bool,
    /// When `meta` was last written.
    meta_written: std::time::Instant,
}

/// A changed committed id is written (by the flusher) at most this often:
/// rewriting `meta` costs two fsyncs, and the committed id changes with
/// nearly every append.
const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What `meta` holds.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct Meta<C: RaftTypeConfig> {
    vote: Option<VoteOf<C>>,
    committed: Option<LogIdOf<C>>,
    purged: Option<LogIdOf<C>>,
}

impl<C: RaftTypeConfig> Default for Meta<C> {
    fn default() -> Self {
        Self {
            vote: None,
            committed: None,
            purged: None,
        }
    }
}

/// One segment file: the records of indexes `first..first + offsets.len()`.
struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where each record starts.
    offsets: Vec<u64>,
    /// Where the next record goes (the end of the last whole record).
    end: u64,
}

impl Segment {
    fn next(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    /// Offset and length (header included) of the record of `index`.
    fn record(&self, index: u64) -> Option<(u64, u64)> {
        let i = usize::try_from(index.checked_sub(self.first)?).ok()?;
        let start = *self.offsets.get(i)?;
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.end);
        Some((start, end - start))
    }
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}")
}

/// A record: header and entry bytes.
pub(super) fn frame(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io_error("append to the raft log", "an entry over 4 GiB"))?;
    let mut out = Vec::with_capacity(HEADER + bytes.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(out)
}

/// The entry bytes of a record read whole, if it is intact.
fn unframe(record: &[u8]) -> Option<&[u8]> {
    let (header, body) = record.split_at_checked(HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    (body.len() == len && crc32fast::hash(body) == crc).then_some(body)
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl<C: RaftTypeConfig> FileLog<C> {
    /// Open (or create) the log in `dir`, with its own flusher thread
    /// (`group` names it).
    pub fn open(dir: &Path, group: &str) -> io::Result<Self> {
        Self::open_segmented(dir, group, SEGMENT_BYTES)
    }

    /// As `open`, with segments closed past `segment_bytes`.
    pub(crate) fn open_segmented(dir: &Path, group: &str, segment_bytes: u64) -> io::Result<Self> {
        let err = |e: io::Error| io_error(&format!("open the raft log in {}", dir.display()), e);
        std::fs::create_dir_all(dir).map_err(err)?;
        let meta = match std::fs::read(dir.join("meta")) {
            Ok(bytes) => {
                let body = unframe(&bytes).ok_or_else(|| {
                    io_error(
                        "open the raft log",
                        format!("{} is damaged", dir.join("meta").display()),
                    )
                })?;
                decode::<Meta<C>>("raft log meta", body)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(err(e)),
        };
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(dir).map_err(err)? {
            let name = item.map_err(err)?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_prefix("seg-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments: Vec<Segment> = Vec::new();
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            if let Some(s) = segments.last()
                && s.next() != first
            {
                return Err(io_error(
                    "open the raft log",
                    format!(
                        "{} does not follow entry {}: the log is damaged",
                        path.display(),
                        s.next().saturating_sub(1)
                    ),
                ));
            }
            let (segment, whole) = Self::scan(first, path, i + 1 == count)?;
            if !whole {
                sync_dir(dir).map_err(err)?;
            }
            segments.push(segment);
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Mutex::new(Inner {
                segments,
                meta,
                last: None,
                dirty: Vec::new(),
                dir_dirty: false,
                meta_dirty: false,
                meta_written: std::time::Instant::now(),
            }),
            meta_write: Mutex::new(()),
        });
        let last = shared.last_entry()?;
        shared.lock().last = last;
        let flusher = Arc::new(Flusher::start(shared.clone(), group)?);
        Ok(Self { shared, flusher })
    }

    /// Read segment `first` at `path`: its records' offsets, and whether
    /// it ended with a whole record. The last segment is cut after its
    /// last whole record; an earlier one must be whole.
    fn scan(first: u64, path: PathBuf, last: bool) -> io::Result<(Segment, bool)> {
        let err = |e: io::Error| io_error(&format!("read {}", path.display()), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut reader = io::BufReader::with_capacity(1 << 20, &file);
        let (mut offsets, mut at, mut body) = (Vec::new(), 0u64, Vec::new());
        let whole = loop {
            if at == len {
                break true;
            }
            let mut header = [0u8; HEADER];
            if reader.read_exact(&mut header).is_err() {
                break false;
            }
            let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
            if at + HEADER as u64 + n > len {
                break false;
            }
            body.resize(n as usize, 0);
            if reader.read_exact(&mut body).is_err() {
                break false;
            }
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if crc32fast::hash(&body) != crc {
                break false;
            }
            offsets.push(at);
            at += HEADER as u64 + n;
        };
        drop(reader);
        if !whole && !last {
            return Err(io_error(
                "open the raft log",
                format!(
                    "{} is damaged at byte {at} (entry {}), before the log's end",
                    path.display(),
                    first + offsets.len() as u64
                ),
            ));
        }
        if !whole {
            file.set_len(at).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        let segment = Segment {
            first,
            path,
            file: Arc::new(file),
            offsets,
            end: at,
        };
        Ok((segment, whole))
    }

    /// How many `fdatasync` rounds the flusher made (each covers every
    /// append that was waiting for it).
    pub fn syncs(&self) -> u64 {
        self.flusher.syncs()
    }
}

impl<C: RaftTypeConfig> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the last entry in the files.
    fn last_entry(&self) -> io::Result<Option<LogIdOf<C>>> {
        let at = {
            let inner = self.lock();
            let Some(s) = inner.segments.iter().rev().find(|s| !s.offsets.is_empty()) else {
                return Ok(None);
            };
            s.next() - 1
        };
        Ok(self.read(at, at + 1)?.pop().map(|e| e.log_id()))
    }

    /// The entries of `start..end` that the log holds (none purged).
    fn read(&self, start: u64, end: u64) -> io::Result<Vec<C::Entry>> {
        let mut wanted = Vec::new();
        {
            let inner = self.lock();
            let start = match &inner.meta.purged {
                Some(p) => start.max(p.index() + 1),
                None => start,
            };
            for s in &inner.segments {
                for index in start.max(s.first)..end.min(s.next()) {
                    if let Some((offset, len)) = s.record(index) {
                        wanted.push((s.file.clone(), offset, len));
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        for (file, offset, len) in wanted {
            let mut record = vec![0u8; len as usize];
            file.read_exact_at(&mut record, offset)
                .map_err(|e| io_error("read the raft log", e))?;
            let body = unframe(&record)
                .ok_or_else(|| io_error("read the raft log", "a damaged record"))?;
            out.push(decode::<C::Entry>("raft log entry", body)?);
        }
        Ok(out)
    }

    /// Write `meta` as it is now: aside, fsynced, renamed over, and the
    /// directory fsynced.
    fn write_meta(&self) -> io::Result<()> {
        let _writing = self.meta_write.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = {
            let mut inner = self.lock();
            inner.meta_dirty = false;
            inner.meta_written = std::time::Instant::now();
            frame(&encode("raft log meta", &inner.meta)?)?
        };
        let err = |e: io::Error| io_error("write the raft log's meta", e);
        let tmp = self.dir.join("meta.tmp");
        let file = File::create(&tmp).map_err(err)?;
        file.write_all_at(&bytes, 0).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, self.dir.join("meta")).map_err(err)?;
        sync_dir(&self.dir).map_err(err)
    }

    /// Remove every entry from `from` on.
    fn truncate(&self, from: u64) -> io::Result<()> {
        let err = |e: io::Error| io_error("truncate the raft log", e);
        let mut inner = self.lock();
        while inner.segments.last().is_some_and(|s| s.first >= from) {
            let s = inner.segments.pop().expect("a last segment");
            std::fs::remove_file(&s.path).map_err(err)?;
            inner.dir_dirty = true;
        }
        if let Some(s) = inner.segments.last_mut()
            && from < s.next()
        {
            let keep = (from.max(s.first) - s.first) as usize;
            let end = s.offsets.get(keep).copied().unwrap_or(s.end);
            s.offsets.truncate(keep);
            s.end = end;
            s.file.set_len(end).map_err(err)?;
            s.file.sync_data().map_err(err)?;
        }
        if inner.dir_dirty {
            sync_dir(&self.dir).map_err(err)?;
            inner.dir_dirty = false;
        }
        Ok(())
    }
}

impl<C: RaftTypeConfig> RaftLogReader<C> for FileLog<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.shared.read(start, end)
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
        let (start, end) = bounds(&range);
        futures::stream::unfold((self.clone(), start), move |(log, next)| async move {
            if next >= end {
                return None;
            }
            let upto = next.saturating_add(STREAM_PIECE).min(end);
            let piece: Vec<Result<C::Entry, io::Error>> = match log.shared.read(next, upto) {
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
        Ok(self.shared.lock().meta.vote.clone())
    }
}

/// `range` as `start..end`.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
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
    (start, end)
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for FileLog<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let inner = self.shared.lock();
        let purged = inner.meta.purged.clone();
        Ok(LogState {
            last_log_id: inner.last.clone().or_else(|| purged.clone()),
            last_purged_log_id: purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.shared.lock().meta.vote = Some(vote.clone());
        self.shared.write_meta()
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Written by a later flusher round (at most once a second): a
        // committed id that is lost only means applying again
        // (idempotently) what was applied.
        let mut inner = self.shared.lock();
        inner.meta.committed = committed;
        inner.meta_dirty = true;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.shared.lock().meta.committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let err = |e: io::Error| io_error("append to the raft log", e);
        let mut inner = self.shared.lock();
        let mut last = None;
        for entry in entries {
            let index = entry.index();
            let record = frame(&encode("raft log entry", &entry)?)?;
            if let Some(s) = inner.segments.last()
                && !s.offsets.is_empty()
                && s.next() != index
            {
                return Err(io_error(
                    "append to the raft log",
                    format!("entry {index} does not follow entry {}", s.next() - 1),
                ));
            }
            let roll = match inner.segments.last() {
                None => true,
                Some(s) => {
                    s.end >= self.shared.segment_bytes || (s.offsets.is_empty() && s.first != index)
                }
            };
            if roll {
                if let Some(s) = inner.segments.last()
                    && s.offsets.is_empty()
                {
                    // An empty segment for another index: replaced.
                    let s = inner.segments.pop().expect("a last segment");
                    std::fs::remove_file(&s.path).map_err(err)?;
                } else if let Some(s) = inner.segments.last() {
                    // Whole on disk before the next begins: only the last
                    // segment can be torn by a crash.
                    s.file.sync_data().map_err(err)?;
                }
                let path = self.shared.dir.join(segment_name(index));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(err)?;
                inner.segments.push(Segment {
                    first: index,
                    path,
                    file: Arc::new(file),
                    offsets: Vec::new(),
                    end: 0,
                });
                inner.dir_dirty = true;
            }
            let s = inner.segments.last_mut().expect("a segment to append to");
            s.file.write_all_at(&record, s.end).map_err(err)?;
            s.offsets.push(s.end);
            s.end += record.len() as u64;
            let file = s.file.clone();
            if !inner.dirty.iter().any(|f| Arc::ptr_eq(f, &file)) {
                inner.dirty.push(file);
            }
            last = Some(entry.log_id());
        }
        if last.is_some() {
            inner.last = last;
        }
        drop(inner);
        // Readable now; flushed (and reported) by the flusher thread.
        self.flusher
            .submit(Box::new(move |r| callback.io_completed(r)));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.shared.truncate(from)?;
        let last = self.shared.last_entry()?;
        self.shared.lock().last = last;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // The purge point first: entries at or below it are ignored from
        // then on, so the segments holding only those can go.
        let upto = log_id.index();
        self.shared.lock().meta.purged = Some(log_id);
        self.shared.write_meta()?;
        let err = |e: io::Error| io_error("purge the raft log", e);
        let mut inner = self.shared.lock();
        let mut removed = false;
        while inner.segments.first().is_some_and(|s| s.next() <= upto + 1) {
            let s = inner.segments.remove(0);
            std::fs::remove_file(&s.path).map_err(err)?;
            removed = true;
        }
        if inner.segments.is_empty() {
            inner.last = None;
        }
        if removed {
            sync_dir(&self.shared.dir).map_err(err)?;
        }
        Ok(())
    }
}

/// What to do once a flush is done.
type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Where the flusher finds what to sync.
trait Syncable: Send + Sync {
    /// Make every write made before this call durable.
    fn sync(&self) -> io::Result<()>;
}

impl<C: RaftTypeConfig> Syncable for Shared<C> {
    fn sync(&self) -> io::Result<()> {
        let (files, dir, meta) = {
            let mut inner = self.lock();
            let dir = std::mem::take(&mut inner.dir_dirty);
            let meta = inner.meta_dirty && inner.meta_written.elapsed() >= COMMITTED_EVERY;
            (std::mem::take(&mut inner.dirty), dir, meta)
        };
        for f in &files {
            f.sync_data()?;
        }
        if dir {
            sync_dir(&self.dir)?;
        }
        if meta {
            self.write_meta()?;
        }
        Ok(())
    }
}

/// One thread that makes the log durable for whoever asks: it takes every
/// request waiting, syncs what was written before (one round) and answers
/// them all, in order.
///
/// Dropped with the last handle of its log: it answers what is waiting,
/// then its thread ends.
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
    fn start(target: Arc<dyn Syncable>, group: &str) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Done>();
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = syncs.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sluice-raft-{group}"))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let result = target.sync();
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
}
