//! The engine, its epoch ticker, and loading components into plugins.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::bindings::{Abi, authorizer, filter, router, v0_1};
use super::budget::Budgets;
use super::cache::{self, CompileCache};
use super::engine::{RuntimeInner, Ticker, engine_config, linker};
use super::inspect;
use super::plugin::{KindPre, Plugin};
use super::sandbox::SandboxConfig;
use super::store::PluginId;
use super::{LoadError, PluginKind};

/// Everything needed to load a plugin.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Owning tenant.
    pub tenant: String,
    /// Name, unique inside the tenant.
    pub name: String,
    /// Which world the component must implement.
    pub kind: PluginKind,
    /// The component bytes.
    pub wasm: Vec<u8>,
    /// Configuration passed to `init`.
    pub config: Vec<(String, String)>,
}

/// The runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine configuration.
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    /// The compile cache directory is unusable.
    #[error("cannot use plugin cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Compiles, checks and instantiates plugins. Cheap to clone.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<RuntimeInner>,
}

impl PluginRuntime {
    /// Build an engine for `config` and start its epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Self, RuntimeError> {
        let engine = Engine::new(&engine_config(&config))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let linker = linker(&engine).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(Arc::new(CompileCache::open(dir, &engine).map_err(
                |source| RuntimeError::Cache {
                    path: dir.display().to_string(),
                    source,
                },
            )?)),
            None => None,
        };
        // Without the ticker no deadline would ever fire: refuse to run.
        let ticker = Ticker::start(engine.clone(), config.epoch_tick)
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                budgets: Arc::new(Budgets::new(config.clone())),
                config,
                cache,
                _ticker: ticker,
            }),
        })
    }

    /// The sandbox settings.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// Check, compile (or fetch from the cache) and initialize a plugin.
    pub fn load(&self, spec: PluginSpec) -> Result<Plugin, LoadError> {
        self.load_replacing(spec, None)
    }

    /// [`PluginRuntime::load`] for a plugin that replaces `old` (same
    /// tenant and name): the tenant's limits are checked as if `old` were
    /// gone already, since it goes when the new one is installed.
    pub fn load_replacing(
        &self,
        spec: PluginSpec,
        old: Option<&Plugin>,
    ) -> Result<Plugin, LoadError> {
        inspect::check_header(&spec.wasm)?;
        let engine = &self.inner.engine;
        // Compiled in memory; written to the disk cache only once the
        // component passed the contract check and linked.
        let (component, compiled, size) = match self
            .inner
            .cache
            .as_ref()
            .and_then(|c| c.get(engine, &spec.wasm))
        {
            Some((component, size)) => (component, None, size),
            None => {
                let (component, bytes) = cache::compile(engine, &spec.wasm)
                    .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
                let size = bytes.len() as u64;
                (component, Some(bytes), size)
            }
        };
        let abi = inspect::check_contract(engine, &component, spec.kind)?;
        let pre = match abi {
            Some(abi) => self.link(&component, spec.kind, abi)?,
            // Nothing imported from sluice:plugin: the export types decide.
            // Routers and filters have the same types in both versions, so
            // the newest matching one is taken.
            None => {
                let [newest, older] = Abi::ALL;
                self.link(&component, spec.kind, newest)
                    .or_else(|e| self.link(&component, spec.kind, older).map_err(|_| e))?
            }
        };
        let id = PluginId {
            tenant: spec.tenant.into(),
            name: spec.name.into(),
        };
        let budgets = &self.inner.budgets;
        let reservation =
            budgets.reserve(&id.tenant, budgets.amount(size), old.map(Plugin::reserved))?;
        let cached = self
            .inner
            .cache
            .as_ref()
            .map(|c| c.hold(&spec.wasm, compiled.as_deref()));
        let digest = hex::encode(Sha256::digest(&spec.wasm));
        Plugin::new(
            self.inner.clone(),
            id,
            spec.kind,
            digest,
            spec.config,
            pre,
            reservation,
            cached,
        )
    }

    /// Remove compiled artifacts no loaded plugin uses from the disk cache
    /// (call after the broker loaded its plugins at start). Returns how
    /// many files were removed.
    pub fn collect_cache(&self) -> usize {
        self.inner.cache.as_ref().map_or(0, |c| c.collect())
    }

    /// Instances, memory and compiled-code bytes `tenant`'s plugins hold.
    pub fn tenant_usage(&self, tenant: &str) -> (u32, u64, u64) {
        let a = self.inner.budgets.held(tenant);
        (a.instances, a.memory, a.cache_bytes)
    }

    /// Pre-link `component` as a `kind` plugin of contract version `abi`.
    fn link(
        &self,
        component: &Component,
        kind: PluginKind,
        abi: Abi,
    ) -> Result<KindPre, LoadError> {
        let link = |e: wasmtime::Error| LoadError::Link {
            kind,
            version: abi.version(),
            message: format!("{e:#}"),
        };
        let pre = self.inner.linker.instantiate_pre(component).map_err(link)?;
        Ok(match (abi, kind) {
            (Abi::V0_2, PluginKind::Router) => {
                KindPre::Router(router::RouterPre::new(pre).map_err(link)?)
            }
            (Abi::V0_2, PluginKind::Filter) => {
                KindPre::Filter(filter::FilterPre::new(pre).map_err(link)?)
            }
            (Abi::V0_2, PluginKind::Authorizer) => {
                KindPre::Authorizer(authorizer::AuthorizerPre::new(pre).map_err(link)?)
            }
            (Abi::V0_1, PluginKind::Router) => {
                KindPre::RouterV01(v0_1::router::RouterPre::new(pre).map_err(link)?)
            }
            (Abi::V0_1, PluginKind::Filter) => {
                KindPre::FilterV01(v0_1::filter::FilterPre::new(pre).map_err(link)?)
            }
            (Abi::V0_1, PluginKind::Authorizer) => {
                KindPre::AuthorizerV01(v0_1::authorizer::AuthorizerPre::new(pre).map_err(link)?)
            }
        })
    }
}
