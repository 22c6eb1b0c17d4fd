//! The wasmtime engine every plugin of a runtime shares: its configuration
//! (pooling allocator, epoch interruption, memory reservations), the linker
//! offering only the `host` interface, and the epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{host, router, v0_1};
use super::budget::{Budgets, SWAP_HEADROOM};
use super::cache::CompileCache;
use super::sandbox::SandboxConfig;
use super::store::StoreState;

/// What every plugin of a runtime shares.
pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<StoreState>,
    pub(crate) config: SandboxConfig,
    pub(crate) cache: Option<Arc<CompileCache>>,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) _ticker: Ticker,
}

/// A linker offering the `host` and `types` interfaces of every supported
/// contract version (`sluice:plugin/host@0.2.0`, `…/host@0.1.0`, …) and
/// nothing else.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    host::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)?;
    router::sluice::plugin::types::add_to_linker::<StoreState, HasSelf<StoreState>>(
        &mut linker,
        |s| s,
    )?;
    v0_1::host::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)?;
    v0_1::types::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)?;
    Ok(linker)
}

pub(crate) fn engine_config(sandbox: &SandboxConfig) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    // Every reservation (see `budget`) plus room for plugins being replaced.
    let n = sandbox.pool_instances.max(1).saturating_add(SWAP_HEADROOM);
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(8))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .max_memory_size(sandbox.memory_limit)
        // Rust guests need 1–3 core instances; components from other
        // toolchains (componentize-py, jco) carry more.
        .max_memories_per_component(4)
        .max_tables_per_component(16)
        .max_core_instances_per_component(32);
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        // Reserve only the cap (plus a guard) per memory so a large pool does
        // not reserve terabytes of address space.
        .memory_reservation(sandbox.memory_limit as u64)
        .memory_guard_size(64 << 10)
        .memory_may_move(false)
        .max_wasm_stack(512 << 10);
    config
}

/// Advances the engine's epoch at a fixed interval until dropped.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine, tick: std::time::Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
