//! A tenant's namespace: queues, bindings and which plugins are attached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::bindings::BindingTrie;
use super::queue::Queue;
use crate::plugins::PluginKind;

/// Per-tenant quotas. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Concurrent connections.
    pub max_connections: Option<u32>,
    /// Queues.
    pub max_queues: Option<u32>,
    /// Bytes stored across the tenant's queues.
    pub max_stored_bytes: Option<u64>,
    /// Published messages per second (token bucket, burst of one second).
    pub max_publish_rate: Option<u32>,
    /// Largest message (payload + headers), bytes; at most the broker's limit.
    pub max_message_bytes: Option<u32>,
}

/// One of the five per-tenant quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `max_connections`.
    Connections,
    /// `max_queues`.
    Queues,
    /// `max_stored_bytes`.
    StoredBytes,
    /// `max_publish_rate`.
    PublishRate,
    /// `max_message_bytes`.
    MessageBytes,
}

impl Quota {
    /// Every quota, in a stable order.
    pub const ALL: [Quota; 5] = [
        Quota::Connections,
        Quota::Queues,
        Quota::StoredBytes,
        Quota::PublishRate,
        Quota::MessageBytes,
    ];

    /// The config key of the quota (`max_connections`, ...).
    pub fn key(self) -> &'static str {
        match self {
            Quota::Connections => "max_connections",
            Quota::Queues => "max_queues",
            Quota::StoredBytes => "max_stored_bytes",
            Quota::PublishRate => "max_publish_rate",
            Quota::MessageBytes => "max_message_bytes",
        }
    }

    /// The configured limit in `limits`, if any.
    pub fn limit(self, limits: &TenantLimits) -> Option<u64> {
        match self {
            Quota::Connections => limits.max_connections.map(u64::from),
            Quota::Queues => limits.max_queues.map(u64::from),
            Quota::StoredBytes => limits.max_stored_bytes,
            Quota::PublishRate => limits.max_publish_rate.map(u64::from),
            Quota::MessageBytes => limits.max_message_bytes.map(u64::from),
        }
    }
}

/// A token bucket for the publish rate.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            tokens: 0.0,
            last: Instant::now(),
        }
    }
}

impl Bucket {
    /// A bucket holding a full second of `rate`.
    pub fn full(rate: u32) -> Self {
        Self {
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    /// Take `n` tokens at `rate` per second (capacity one second of rate).
    pub fn take(&mut self, rate: u32, n: u32) -> bool {
        let now = Instant::now();
        let rate = f64::from(rate);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= f64::from(n) {
            self.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

/// One tenant.
pub(crate) struct Tenant {
    pub name: String,
    state: RwLock<TenantState>,
    /// In the registry (created, or auto-registered at first connection).
    pub registered: AtomicBool,
    /// Quotas.
    pub limits: RwLock<TenantLimits>,
    /// Open connections.
    pub connections: AtomicU64,
    /// Publish-rate bucket.
    pub bucket: Mutex<Bucket>,
    /// Requests refused per quota since start (indexed by [`Quota`]).
    pub refusals: [AtomicU64; 5],
    /// Plugin work of this tenant runs with at most this many permits, so
    /// one tenant's slow plugins cannot occupy every worker.
    pub plugin_slots: Arc<tokio::sync::Semaphore>,
    /// Control requests (declare, bind, plugin load, ...) of this tenant
    /// running at once on blocking threads.
    pub control_slots: Arc<tokio::sync::Semaphore>,
    /// Authorizer decisions: (principal, action, resource) → allowed or the
    /// deny reason, for the authorizer of one generation.
    pub auth_cache: Mutex<AuthCache>,
    /// Log lines this tenant's actions may cause per second (the rest are
    /// counted in `logs_suppressed`), so no tenant floods the broker's log.
    logs: Mutex<Bucket>,
    /// Log lines suppressed by the limit.
    pub logs_suppressed: AtomicU64,
    /// Recent CPU use of the tenant's offloaded work (plugins, syncs).
    cpu: Mutex<super::offload::CpuUse>,
    /// Whether its work currently runs at the lowest priority.
    demoted: AtomicBool,
    /// Jobs run at the lowest priority since start.
    pub demoted_jobs: AtomicU64,
    /// Plugin calls and control requests running now and at their peak.
    pub running: super::offload::Running,
    /// Held by a plugin load or unload from its checks to its install, so
    /// concurrent loads cannot both pass `max_plugins_per_tenant`.
    pub plugin_admin: Mutex<()>,
}

/// Log lines per second (and burst) one tenant's actions may cause.
pub(crate) const LOG_LINES_PER_SEC: u32 = 50;

/// Cached authorizer decisions. The generation changes whenever the
/// tenant's authorizer does; a decision computed under an older generation
/// is never stored, so a hot swap cannot leave a stale decision behind.
#[derive(Default)]
pub(crate) struct AuthCache {
    pub generation: u64,
    pub decisions: HashMap<String, Result<(), String>>,
}

/// A plugin that is configured (stored) but not running: it failed to
/// load at start. It keeps its role, failing closed, until an
/// administrator reloads or unloads it.
#[derive(Debug, Clone)]
pub(crate) struct NotRunning {
    pub kind: PluginKind,
    pub queue: Option<String>,
    /// SHA-256 (hex) of the stored component.
    pub digest: String,
    pub reason: String,
}

/// Everything a tenant owns, behind one lock.
#[derive(Default)]
pub(crate) struct TenantState {
    pub queues: HashMap<String, Arc<Queue>>,
    pub bindings: BindingTrie,
    /// The tenant's router plugin.
    pub router: Option<String>,
    /// The tenant's authorizer plugin.
    pub authorizer: Option<String>,
    /// Filter plugins per queue, in load order.
    pub filters: HashMap<String, Vec<String>>,
    /// Plugins configured but not running, by name.
    pub not_running: HashMap<String, NotRunning>,
}

impl Tenant {
    pub fn new(name: &str, plugin_slots: usize, control_slots: usize) -> Self {
        Self {
            name: name.to_string(),
            state: RwLock::new(TenantState::default()),
            registered: AtomicBool::new(false),
            limits: RwLock::new(TenantLimits::default()),
            connections: AtomicU64::new(0),
            bucket: Mutex::new(Bucket::default()),
            refusals: Default::default(),
            plugin_slots: Arc::new(tokio::sync::Semaphore::new(plugin_slots.max(1))),
            control_slots: Arc::new(tokio::sync::Semaphore::new(control_slots.max(1))),
            auth_cache: Mutex::new(AuthCache::default()),
            logs: Mutex::new(Bucket::full(LOG_LINES_PER_SEC)),
            logs_suppressed: AtomicU64::new(0),
            cpu: Mutex::new(super::offload::CpuUse::default()),
            demoted: AtomicBool::new(false),
            demoted_jobs: AtomicU64::new(0),
            running: Default::default(),
            plugin_admin: Mutex::new(()),
        }
    }

    /// The tenant's recent CPU use.
    pub fn cpu(&self) -> std::sync::MutexGuard<'_, super::offload::CpuUse> {
        self.cpu.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record whether the tenant's work is demoted; true when that changed.
    pub fn set_demoted(&self, demoted: bool) -> bool {
        self.demoted
            .swap(demoted, std::sync::atomic::Ordering::Relaxed)
            != demoted
    }

    /// Run `log` (a tracing call) unless this tenant already caused
    /// [`LOG_LINES_PER_SEC`] log lines in the last second.
    pub fn log_limited(&self, log: impl FnOnce()) {
        let ok = self
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(LOG_LINES_PER_SEC, 1);
        if ok {
            log();
        } else {
            self.logs_suppressed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Count `n` requests refused by `quota`.
    pub fn refused(&self, quota: Quota, n: u64) {
        self.refusals[quota as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Current quotas.
    pub fn limits(&self) -> TenantLimits {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes stored across the tenant's queues.
    pub fn stored_bytes(&self) -> u64 {
        let queues: Vec<Arc<Queue>> = self.read().queues.values().cloned().collect();
        queues.iter().map(|q| q.lock().bytes).sum()
    }

    /// Forget cached authorizer decisions and start a new generation
    /// (after the authorizer changed).
    pub fn clear_auth_cache(&self) {
        let mut cache = self.auth_cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        cache.decisions.clear();
    }

    pub fn read(&self) -> RwLockReadGuard<'_, TenantState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, TenantState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl TenantState {
    /// Attach plugin `name` in its role.
    pub fn attach(&mut self, name: &str, kind: PluginKind, queue: Option<String>) {
        match kind {
            PluginKind::Router => self.router = Some(name.to_string()),
            PluginKind::Authorizer => self.authorizer = Some(name.to_string()),
            PluginKind::Filter => {
                if let Some(q) = queue {
                    let list = self.filters.entry(q).or_default();
                    if !list.iter().any(|n| n == name) {
                        list.push(name.to_string());
                    }
                }
            }
        }
    }

    /// Detach plugin `name` from whatever role it had.
    pub fn detach(&mut self, name: &str, kind: PluginKind) {
        self.not_running.remove(name);
        match kind {
            PluginKind::Router if self.router.as_deref() == Some(name) => self.router = None,
            PluginKind::Authorizer if self.authorizer.as_deref() == Some(name) => {
                self.authorizer = None
            }
            PluginKind::Filter => {
                for list in self.filters.values_mut() {
                    list.retain(|n| n != name);
                }
                self.filters.retain(|_, l| !l.is_empty());
            }
            _ => {}
        }
    }

    /// The queue a filter is attached to.
    pub fn filter_queue(&self, name: &str) -> Option<String> {
        self.filters
            .iter()
            .find(|(_, l)| l.iter().any(|n| n == name))
            .map(|(q, _)| q.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log lines one tenant's actions cause are limited per second;
    /// the rest are counted.
    #[test]
    fn log_lines_are_limited_per_tenant() {
        let t = Tenant::new("t", 1, 1);
        let mut written = 0;
        for _ in 0..1000 {
            t.log_limited(|| written += 1);
        }
        assert!(written <= LOG_LINES_PER_SEC as usize + 1, "{written}");
        assert!(written >= 1);
        let suppressed = t.logs_suppressed.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(suppressed as usize + written, 1000);
    }
}
