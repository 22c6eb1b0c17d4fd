//! The data group's snapshots: the store as of one applied log id, in a
//! file of its own, so the log before it can be purged.
//!
//! A node builds a snapshot while its state machine applies nothing (the
//! store is exported record by record, [`Store::export`]), writes it
//! aside, fsyncs it and renames it to `current`. The leader sends
//! `current` to a follower whose next entry it has purged, streamed from
//! the file; the follower writes it to a spool file, checks every record,
//! and installs it: renamed to `installing`, the store's content replaced
//! with its records ([`Store::replace`]), renamed to `current`. A crash
//! mid-install leaves `installing`, which the next start installs again
//! before anything reads the store. Neither side holds a snapshot in
//! memory.
//!
//! # File format
//!
//! [`MAGIC`], then records framed like the log's (`[len u32][crc32 u32]
//! [bytes]`): the snapshot's metadata (bincode), one record per store
//! entry (`[tree u8][key length u32][key][value]`), and an end record
//! (`[0xFF][entry count u64]`), so a cut or damaged file is never taken
//! for a whole one.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::type_config::alias::SnapshotMetaOf;

use super::data::DataGroup;
use super::log::{HEADER, frame, sync_dir};
use super::{decode, encode, io_error};
use crate::store::{Record, Store, Tree};

/// First bytes of a snapshot file.
const MAGIC: &[u8; 8] = b"SLSNAP01";
/// The snapshot this node holds.
const CURRENT: &str = "current";
/// A snapshot being installed into the store.
const INSTALLING: &str = "installing";
/// Tag of the end record.
const END: u8 = 0xFF;
/// Largest record: a store entry holds at most one op's bytes.
const MAX_RECORD: usize = super::store::MAX_OP_BYTES + (1 << 20);

/// The metadata of a data group snapshot.
pub type Meta = SnapshotMetaOf<DataGroup>;

/// A snapshot's file, open, as openraft hands it around (sent to a
/// follower, installed).
#[derive(Debug)]
pub struct SnapshotBody {
    file: File,
    path: PathBuf,
    len: u64,
}

impl SnapshotBody {
    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (never, for a snapshot that was checked).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file, for reading it from the start.
    pub fn into_file(self) -> File {
        self.file
    }

    /// A body received into `path` (`len` bytes), checked record by
    /// record: it must hold a snapshot of `meta`.
    pub fn received(path: PathBuf, len: u64, meta: &Meta) -> io::Result<SnapshotBody> {
        let found = check(&path)?;
        if &found != meta {
            return Err(io_error(
                "receive a snapshot",
                format!("the file holds {found}, the request names {meta}"),
            ));
        }
        let file = File::open(&path)?;
        Ok(SnapshotBody { file, path, len })
    }
}

/// A node's snapshot directory.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    spooled: AtomicU64,
}

impl Snapshots {
    /// The snapshots in `dir` (created if missing; spool files of
    /// transfers cut short are removed).
    pub fn open(dir: &Path) -> io::Result<Snapshots> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Snapshots {
            dir: dir.to_owned(),
            spooled: AtomicU64::new(0),
        })
    }

    /// A new spool file's path, for a snapshot being received.
    pub fn spool(&self) -> PathBuf {
        let n = self.spooled.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("receive-{n}.tmp"))
    }

    /// The snapshot this node holds, if any.
    pub fn current(&self) -> io::Result<Option<(Meta, SnapshotBody)>> {
        let path = self.dir.join(CURRENT);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        // Its own handle: a clone would share the offset the body is sent from.
        let mut reader = Reader::new(BufReader::new(File::open(&path)?), &path)?;
        let meta = reader.meta()?;
        Ok(Some((meta, SnapshotBody { file, path, len })))
    }

    /// Write a snapshot of `store` as of `meta`, and make it `current`.
    /// Nobody may write the store meanwhile.
    pub fn build(&self, meta: &Meta, store: &Store) -> io::Result<SnapshotBody> {
        let tmp = self.dir.join("build.tmp");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&frame(&encode("snapshot metadata", meta)?)?)?;
        let mut record = Vec::new();
        let count = store.export(|tree, k, v| -> io::Result<()> {
            record.clear();
            record.push(tree.tag());
            record.extend_from_slice(&(k.len() as u32).to_le_bytes());
            record.extend_from_slice(k);
            record.extend_from_slice(v);
            out.write_all(&frame(&record)?)
        })?;
        let mut end = vec![END];
        end.extend_from_slice(&count.to_le_bytes());
        out.write_all(&frame(&end)?)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        let path = self.dir.join(CURRENT);
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        let len = file.metadata()?.len();
        Ok(SnapshotBody {
            file: File::open(&path)?,
            path,
            len,
        })
    }

    /// Replace `store`'s content with `body` (checked when received) and
    /// keep it as `current`. Nobody may use the store meanwhile.
    pub fn install(&self, body: SnapshotBody, store: &Store) -> io::Result<u64> {
        let installing = self.dir.join(INSTALLING);
        std::fs::rename(&body.path, &installing)?;
        sync_dir(&self.dir)?;
        self.finish_install(store)
    }

    /// Install a snapshot whose install a crash cut short, if there is
    /// one (at start, before the store is used).
    pub fn resume_install(&self, store: &Store) -> io::Result<Option<u64>> {
        if !self.dir.join(INSTALLING).exists() {
            return Ok(None);
        }
        tracing::warn!(dir = %self.dir.display(), "installing the snapshot a restart interrupted");
        self.finish_install(store).map(Some)
    }

    fn finish_install(&self, store: &Store) -> io::Result<u64> {
        let installing = self.dir.join(INSTALLING);
        let mut reader = Reader::new(BufReader::new(File::open(&installing)?), &installing)?;
        reader.meta()?;
        let n = store.replace(reader.entries())?;
        std::fs::rename(&installing, self.dir.join(CURRENT))?;
        sync_dir(&self.dir)?;
        Ok(n)
    }
}

/// Check every record of the snapshot file at `path`; its metadata.
fn check(path: &Path) -> io::Result<Meta> {
    let mut reader = Reader::new(BufReader::new(File::open(path)?), path)?;
    let meta = reader.meta()?;
    for entry in reader.entries() {
        entry?;
    }
    Ok(meta)
}

/// Reads a snapshot file's records in order, each checked.
struct Reader<R> {
    input: R,
    path: PathBuf,
    count: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    fn new(mut input: R, path: &Path) -> io::Result<Self> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|e| bad(path, e))?;
        if &magic != MAGIC {
            return Err(bad(path, "not a snapshot file"));
        }
        Ok(Reader {
            input,
            path: path.to_owned(),
            count: 0,
            ended: false,
        })
    }

    /// The next record's bytes.
    fn record(&mut self) -> io::Result<Vec<u8>> {
        let mut header = [0u8; HEADER];
        self.input
            .read_exact(&mut header)
            .map_err(|e| bad(&self.path, e))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            return Err(bad(&self.path, format!("a record of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.input
            .read_exact(&mut body)
            .map_err(|e| bad(&self.path, e))?;
        if crc32fast::hash(&body) != crc {
            return Err(bad(&self.path, "a record's checksum does not match"));
        }
        Ok(body)
    }

    fn meta(&mut self) -> io::Result<Meta> {
        let bytes = self.record()?;
        decode("snapshot metadata", &bytes)
    }

    /// The store entries, then the end record checked.
    fn entries(mut self) -> impl Iterator<Item = io::Result<Record>> {
        std::iter::from_fn(move || {
            if self.ended {
                return None;
            }
            let entry = self.entry();
            if entry.is_err() {
                self.ended = true;
            }
            entry.transpose()
        })
    }

    fn entry(&mut self) -> io::Result<Option<Record>> {
        let mut record = self.record()?;
        let tag = record.first().copied();
        if tag == Some(END) {
            self.ended = true;
            let count = record
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes);
            return match count {
                Some(n) if n == self.count => Ok(None),
                _ => Err(bad(&self.path, "the entry count does not match")),
            };
        }
        let tree = tag
            .and_then(Tree::from_tag)
            .ok_or_else(|| bad(&self.path, "a record of no tree"))?;
        let klen = record
            .get(1..5)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| bad(&self.path, "a short record"))? as usize;
        if record.len() < 5 + klen {
            return Err(bad(&self.path, "a short record"));
        }
        let value = record.split_off(5 + klen);
        let key = record.split_off(5);
        self.count += 1;
        Ok(Some((tree, key, value)))
    }
}

fn bad(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot {}: {e}", path.display()),
    )
}
