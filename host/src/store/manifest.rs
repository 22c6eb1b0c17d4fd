//! Detecting a damaged store at start.
//!
//! sled recovers from a damaged log by truncating it at the first bad
//! segment, so a damaged data file can open "fine" with committed messages
//! missing. To turn that into an error, every durable group commit stores an
//! increasing commit number inside sled (in the same batch as the messages),
//! and a `MANIFEST` file next to the database records, at most every 100 ms
//! and at every explicit sync, the last commit number known to be durable.
//! At open, a database whose commit number is below the manifest's has lost
//! confirmed data: the store refuses to start and says so.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The reserved key (outside every queue's key range) holding the commit number.
pub(crate) const COMMIT_KEY: [u8; 16] = [0xff; 16];

/// The manifest file of a store directory.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join("MANIFEST")
}

/// The commit number recorded in the manifest (0 if there is none).
pub(crate) fn read(dir: &Path) -> Result<u64, StoreError> {
    let p = path(dir);
    match fs::read_to_string(&p) {
        Ok(text) => text
            .trim()
            .strip_prefix("commit ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{} is unreadable: {text:?}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io(&p, e)),
    }
}

/// Serializes manifest writers (the committer and explicit syncs).
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Record `commit` as durable (write a temporary file, fsync, rename).
pub(crate) fn write(dir: &Path, commit: u64) -> Result<(), StoreError> {
    let _one_at_a_time = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let p = path(dir);
    let tmp = dir.join("MANIFEST.tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    f.write_all(format!("commit {commit}\n").as_bytes())
        .map_err(|e| StoreError::io(&tmp, e))?;
    f.sync_data().map_err(|e| StoreError::io(&tmp, e))?;
    fs::rename(&tmp, &p).map_err(|e| StoreError::io(&p, e))
}

/// The commit number stored in sled.
pub(crate) fn stored(messages: &sled::Tree) -> Result<u64, StoreError> {
    Ok(messages
        .get(COMMIT_KEY)
        .map_err(StoreError::sled)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// Refuse a database that lost commits the manifest says were durable.
pub(crate) fn check(dir: &Path, messages: &sled::Tree) -> Result<u64, StoreError> {
    let (expected, found) = (read(dir)?, stored(messages)?);
    if found < expected {
        return Err(StoreError::Corrupt(format!(
            "the data in {} is damaged: it holds commit {found}, but commit {expected} was confirmed to clients; \
             refusing to start (restore the directory from a backup, or move it away to start empty)",
            dir.display()
        )));
    }
    Ok(found)
}
