//! On-disk cache of compiled components.
//!
//! Compiling a component with Cranelift takes 30–190 ms; loading a cached
//! artifact takes well under a millisecond. An artifact is keyed by the
//! SHA-256 of the wasm bytes and of the engine's compatibility hash (wasmtime
//! version and every codegen setting), so a broker upgrade or a config change
//! never loads a stale artifact. Each artifact is written to a temporary file
//! and renamed into place, with a SHA-256 sidecar checked before use: a torn
//! or damaged file is recompiled, never deserialized.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A directory of compiled components for one engine configuration.
#[derive(Debug, Clone)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    engine_hash: [u8; 32],
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
        })
    }

    fn path_for(&self, wasm: &[u8]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.engine_hash);
        h.update(wasm);
        self.dir
            .join(format!("{}.cwasm", hex::encode(h.finalize())))
    }

    /// The cached component for `wasm`, or `None` (missing or damaged).
    pub(crate) fn get(&self, engine: &Engine, wasm: &[u8]) -> Option<Component> {
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
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable compiled-plugin cache entry; recompiling");
                None
            }
        }
    }

    /// Store the compiled form of `wasm`. Failures are logged, not fatal: the
    /// cache only saves time.
    pub(crate) fn put(&self, engine: &Engine, wasm: &[u8]) -> Option<Component> {
        let compiled = match engine.precompile_component(wasm) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "precompile failed");
                return None;
            }
        };
        let path = self.path_for(wasm);
        if let Err(e) = write_atomic(&path, &compiled).and_then(|_| {
            write_atomic(
                &path.with_extension("sha256"),
                hex::encode(Sha256::digest(&compiled)).as_bytes(),
            )
        }) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-plugin cache");
        }
        // SAFETY: `compiled` was just produced by this engine.
        unsafe { Component::deserialize(engine, &compiled) }.ok()
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}
