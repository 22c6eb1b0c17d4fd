//! On-disk cache of compiled components.
//!
//! Compiling a component with Cranelift takes 30–190 ms; loading a cached
//! artifact takes well under a millisecond. An artifact is keyed by the
//! SHA-256 of the wasm bytes and of the engine's compatibility hash (wasmtime
//! version and every codegen setting), so a broker upgrade or a config change
//! never loads a stale artifact. Each artifact is written to a temporary file
//! and renamed into place, with a SHA-256 sidecar checked before use: a torn
//! or damaged file is recompiled, never deserialized.
//!
//! The cache holds only what loaded plugins use: an artifact is written
//! after the component passed the contract check and linked, and each
//! loaded plugin holds a [`CacheRef`] on it. [`CompileCache::collect`]
//! removes every file no live plugin holds; the broker runs it at start and
//! after every plugin load and unload, so artifacts of unloaded, replaced
//! or failed plugins do not stay (those still finishing a call go at the
//! next collection). A broker that stops keeps its files for a fast
//! restart. Its size is bounded by the plugins' reservations (see `budget`).

use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A directory of compiled components for one engine configuration.
#[derive(Debug)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    engine_hash: [u8; 32],
    /// Loaded plugins per artifact file.
    refs: Mutex<HashMap<PathBuf, usize>>,
}

/// A loaded plugin's hold on its artifact: [`CompileCache::collect`]
/// keeps the file while one exists.
#[derive(Debug)]
pub(crate) struct CacheRef {
    cache: Arc<CompileCache>,
    path: PathBuf,
}

impl Drop for CacheRef {
    fn drop(&mut self) {
        let mut refs = self.cache.refs();
        match refs.get_mut(&self.path) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                refs.remove(&self.path);
            }
        }
    }
}

/// Feeds `Hash` output into SHA-256 so the key is stable across processes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl CompileCache {
    pub(crate) fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut h = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_hash: h.0.finalize().into(),
            refs: Mutex::new(HashMap::new()),
        })
    }

    fn refs(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, usize>> {
        self.refs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_for(&self, wasm: &[u8]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.engine_hash);
        h.update(wasm);
        self.dir
            .join(format!("{}.cwasm", hex::encode(h.finalize())))
    }

    /// The cached component for `wasm` and its artifact's size, or `None`
    /// (missing or damaged).
    pub(crate) fn get(&self, engine: &Engine, wasm: &[u8]) -> Option<(Component, u64)> {
        let path = self.path_for(wasm);
        let bytes = fs::read(&path).ok()?;
        let sum = fs::read_to_string(path.with_extension("sha256")).ok()?;
        if hex::encode(Sha256::digest(&bytes)) != sum.trim() {
            tracing::warn!(path = %path.display(), "damaged compiled-plugin cache entry; recompiling");
            return None;
        }
        // SAFETY: the bytes were produced by `Engine::precompile_component`
        // of an engine with the same compatibility hash (it is part of the
        // file name), written by this module into a directory the broker
        // owns, and their SHA-256 matches the sidecar written with them, so
        // they are exactly what wasmtime serialized.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => Some((c, bytes.len() as u64)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable compiled-plugin cache entry; recompiling");
                None
            }
        }
    }

    /// Hold the artifact of `wasm` for a loaded plugin, writing `compiled`
    /// (its freshly compiled form, if it was not read from the cache)
    /// first. Write failures are logged, not fatal: the cache only saves
    /// time.
    pub(crate) fn hold(self: &Arc<Self>, wasm: &[u8], compiled: Option<&[u8]>) -> CacheRef {
        let path = self.path_for(wasm);
        let mut refs = self.refs();
        // Freshly compiled: missing or damaged on disk, (re)write it.
        if let Some(compiled) = compiled
            && let Err(e) = write_atomic(&path, compiled).and_then(|_| {
                write_atomic(
                    &path.with_extension("sha256"),
                    hex::encode(Sha256::digest(compiled)).as_bytes(),
                )
            })
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-plugin cache");
        }
        *refs.entry(path.clone()).or_default() += 1;
        CacheRef {
            cache: self.clone(),
            path,
        }
    }

    /// Remove every file no live plugin holds (artifacts of plugins
    /// unloaded, replaced or failed, leftovers of a crash). Returns how
    /// many files were removed.
    pub(crate) fn collect(&self) -> usize {
        let refs = self.refs();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let path = e.path();
            let artifact = path.with_extension("cwasm");
            if !refs.contains_key(&artifact) && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Compile `wasm` in memory: the component and its serialized artifact.
pub(crate) fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, Vec<u8>)> {
    let compiled = engine.precompile_component(wasm)?;
    // SAFETY: `compiled` was just produced by this engine.
    let component = unsafe { Component::deserialize(engine, &compiled) }?;
    Ok((component, compiled))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}
