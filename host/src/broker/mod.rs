//! The broker: tenants, queues, bindings, routing through plugins, consumers.
//!
//! Data flows one way: a session calls the broker, the broker calls the
//! store. Plugins are called from exactly one place per kind: the router and
//! filters from [`routing`], the authorizer from [`Broker::authorize`].
//!
//! Where things are: queue and binding administration in `admin`, plugin
//! administration in `policies`, the boundary and the authorizer in
//! `authorize`, the publish path in `routing`, consumers in `consume` and
//! `subscription`, dead letters in `dead_letter`, start in `recovery`,
//! tenants and quotas in `tenant` and `tenancy`, work off the async workers
//! in `offload`, usage in `stats`.
//!
//! Every name is scoped by tenant. A tenant principal can only name its own
//! tenant; an admin can name any. An authorizer plugin is consulted only
//! after that boundary check, so it can never widen access across tenants.

mod admin;
mod authorize;
mod bindings;
mod consume;
mod dead_letter;
mod error;
mod limits;
mod names;
mod offload;
mod policies;
mod queue;
mod recovery;
mod routing;
mod stats;
mod subscription;
mod tenancy;
mod tenant;

pub use admin::QueueInfo;
pub use policies::{PluginInfo, PluginLoad};
pub(crate) use stats::SessionPeakCounters;
pub use stats::{SessionPeaks, TenantStats};

pub use bindings::BindingTrie;
pub use error::BrokerError;
pub use names::{Token, check_name, check_tenant, check_topic, parse_pattern};
pub use offload::{TenantCalls, Work};
pub use queue::{Delivery, Overflow, QueueOptions};
pub use routing::{PendingPublish, Publish};

pub use subscription::{LOAD_BYTES, Subscription};
pub use tenancy::{Admission, Closer, TenantInfo, TenantUsage};
pub use tenant::{Quota, TenantLimits};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use crate::plugins::{PluginKind, PluginRegistry, PluginRuntime, Principal, SandboxConfig};
use crate::store::{MessageStore, Store, StoreConfig};
use queue::Queue;
use tenant::Tenant;

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Storage.
    pub store: StoreConfig,
    /// Plugin sandbox.
    pub sandbox: SandboxConfig,
    /// Largest accepted message (payload + headers), bytes. Default 1 MiB.
    pub max_message_bytes: usize,
    /// Most queues per tenant. Default 10 000.
    pub max_queues_per_tenant: usize,
    /// Refuse clients of tenants that are not registered (default: register
    /// a tenant at its first connection).
    pub strict_tenants: bool,
    /// Concurrent plugin tasks per tenant. Default 1: a tenant's plugins use
    /// at most one core, whatever they do.
    pub plugin_concurrency_per_tenant: usize,
    /// Largest prefetch (unacked deliveries) of one subscription. Default 10 000.
    pub max_prefetch: u32,
    /// Most stored bytes one subscription holds unacked (at least one
    /// message is always delivered). Default 16 MiB.
    pub max_prefetch_bytes: u64,
    /// Sum of the prefetch of one connection's subscriptions. Default 65 536.
    pub max_unacked_per_connection: u64,
    /// Most bindings per tenant. Default 100 000.
    pub max_bindings_per_tenant: usize,
    /// Most queues one message is stored in (bindings and router). Default 1024.
    pub max_fanout: usize,
    /// Most plugins per tenant. Default 16.
    pub max_plugins_per_tenant: usize,
    /// Most client connections to the broker. Default 16 384.
    pub max_connections: u64,
    /// Control requests (declare, bind, plugin load, ...) of one tenant
    /// running at once on blocking threads. Default 2.
    pub control_concurrency_per_tenant: usize,
    /// Share of one core a tenant's plugins (and other offloaded work) may
    /// use, averaged over a second, before its work runs at the lowest CPU
    /// priority. Default 0.5; infinity turns demotion off.
    pub plugin_cpu_share: f64,
    /// Threads running the work of tenants over their CPU share. Default 2.
    pub low_priority_threads: usize,
    /// On a cluster node, the replicated group as administrators see it
    /// (`sluice cluster ...`); `None` on a single node.
    pub cluster: Option<ClusterControl>,
}

/// What administrators may ask of a cluster node's replicated group.
#[derive(Clone)]
pub struct ClusterControl {
    /// This node's view of the group.
    pub status: Arc<dyn Fn() -> sluice_proto::ClusterSummary + Send + Sync>,
    /// Hand the leadership to a member (on the leader): resolves once it
    /// is handed over, or with why not.
    pub transfer: Arc<dyn Fn(u64) -> ClusterFuture + Send + Sync>,
    /// Add a node (on the leader): a learner first, a voter once it has
    /// caught up (unless only a learner is asked).
    pub add: Arc<dyn Fn(NewMember) -> ClusterFuture + Send + Sync>,
    /// Remove a node, voter or learner, from the group (on the leader).
    pub remove: Arc<dyn Fn(u64) -> ClusterFuture + Send + Sync>,
}

/// A node to add to a cluster, as an administrator names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMember {
    /// Its id (at least 1; its certificate is `node-{id}`).
    pub node: u64,
    /// Its Raft address, `ip:port`.
    pub raft: String,
    /// Its client address, `ip:port`.
    pub client: String,
    /// Add it as a learner only (replicated to, never voting).
    pub learner: bool,
}

/// An answer of the cluster: done, or why not.
pub type ClusterFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

impl std::fmt::Debug for ClusterControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterControl")
    }
}

impl BrokerConfig {
    /// Defaults with data in `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            sandbox: SandboxConfig {
                cache_dir: Some(dir.join("plugin-cache")),
                ..SandboxConfig::default()
            },
            store: StoreConfig::new(dir.join("store")),
            max_message_bytes: 1 << 20,
            max_queues_per_tenant: 10_000,
            strict_tenants: false,
            plugin_concurrency_per_tenant: 1,
            max_prefetch: 10_000,
            max_prefetch_bytes: 16 << 20,
            max_unacked_per_connection: 65_536,
            max_bindings_per_tenant: 100_000,
            max_fanout: 1024,
            max_plugins_per_tenant: 16,
            max_connections: 16_384,
            control_concurrency_per_tenant: 2,
            plugin_cpu_share: 0.5,
            low_priority_threads: 2,
            cluster: None,
        }
    }
}

/// What is persisted for a queue (`queue/<tenant>/<name>`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct QueueRecord {
    id: u64,
    options: QueueOptions,
}

/// What is persisted for a plugin (`plugin/<tenant>/<name>`; component in the blob of the same key).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PluginRecord {
    kind: PluginKind,
    queue: Option<String>,
    config: Vec<(String, String)>,
}

/// The broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: BrokerConfig,
    store: Arc<dyn MessageStore>,
    runtime: PluginRuntime,
    plugins: PluginRegistry,
    tenants: RwLock<HashMap<String, Arc<Tenant>>>,
    next_consumer: AtomicU64,
    connections: AtomicU64,
    low_priority: offload::LowPriority,
    live: std::sync::Mutex<tenancy::Connections>,
    session_peaks: Arc<stats::SessionPeakCounters>,
}

/// When a message stored at `now` with `ttl_ms` expires (0: never). Any TTL
/// a client declares is fine: the sum saturates instead of wrapping.
fn expiry(now: u64, ttl_ms: Option<u64>) -> u64 {
    ttl_ms.map_or(0, |ttl| now.saturating_add(ttl))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, BrokerError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| crate::store::StoreError::Corrupt(format!("metadata `{key}`: {e}")).into())
}

impl Broker {
    /// Open the store, recover tenants, queues, bindings, plugins and every
    /// stored message, and start the expiry sweeper (needs a tokio runtime).
    pub fn open(config: BrokerConfig) -> Result<Self, BrokerError> {
        let store = Arc::new(Store::open(&config.store)?);
        Self::open_with_store(config, store)
    }

    /// Like [`Broker::open`], on any [`MessageStore`] (e.g. one that injects
    /// faults). `config.store` is not used.
    pub fn open_with_store(
        config: BrokerConfig,
        store: Arc<dyn MessageStore>,
    ) -> Result<Self, BrokerError> {
        let runtime = PluginRuntime::new(config.sandbox.clone())
            .map_err(|e| BrokerError::Conflict(format!("plugin runtime: {e}")))?;
        let low_priority = offload::LowPriority::start(config.low_priority_threads)
            .map_err(|e| BrokerError::Conflict(format!("low-priority threads: {e}")))?;
        let broker = Broker {
            inner: Arc::new(Inner {
                config,
                store,
                runtime,
                plugins: PluginRegistry::new(),
                tenants: RwLock::new(HashMap::new()),
                next_consumer: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                low_priority,
                live: std::sync::Mutex::new(tenancy::Connections::default()),
                session_peaks: Arc::default(),
            }),
        };
        broker.recover()?;
        broker.start_sweeper();
        Ok(broker)
    }

    fn tenant(&self, name: &str) -> Arc<Tenant> {
        if let Some(t) = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return t.clone();
        }
        let mut map = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Tenant::new(
                    name,
                    self.inner.config.plugin_concurrency_per_tenant,
                    self.inner.config.control_concurrency_per_tenant,
                ))
            })
            .clone()
    }

    /// Every tenant known in memory (registered or not).
    fn all_tenants(&self) -> Vec<Arc<Tenant>> {
        self.inner
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn all_queues(&self) -> Vec<Arc<Queue>> {
        let tenants = self.all_tenants();
        tenants
            .iter()
            .flat_map(|t| t.read().queues.values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// A slot for one control request of `tenant` (see
    /// [`BrokerConfig::control_concurrency_per_tenant`]); `""` is the
    /// administrators' scope.
    pub async fn control_permit(
        &self,
        tenant: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, BrokerError> {
        self.tenant(tenant)
            .control_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::ShuttingDown)
    }

    /// Run `f` off the async workers for `tenant`, charged to its CPU
    /// share (see [`offload`]): plugin calls, store syncs, anything that
    /// may block. A plugin call in `f` needs a free plugin slot of the
    /// tenant (else it is refused); [`Broker::offload_request`] takes one
    /// first when the request may call a plugin.
    pub async fn offload<T: Send + 'static>(
        &self,
        tenant: &str,
        work: Work,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        self.offload_with_slot(tenant, work, None, f).await
    }

    /// [`Broker::offload`] holding `slot` (one of the tenant's plugin
    /// slots) until `f` returns.
    pub(crate) async fn offload_with_slot<T: Send + 'static>(
        &self,
        tenant: &str,
        work: Work,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        let t = self.tenant(tenant);
        offload::offload(
            &t,
            self.inner.config.plugin_cpu_share,
            &self.inner.low_priority,
            work,
            slot,
            f,
        )
        .await
    }

    /// Run the control request `f` of `who` on `tenant` (a declare, a
    /// plugin load, the authorizer's question at connection, ...) off the
    /// async workers: in one of the tenant's control slots
    /// ([`BrokerConfig::control_concurrency_per_tenant`]), and in one of
    /// its plugin slots too when it may call a plugin (a plugin load, or
    /// any request of a tenant principal while the tenant has an
    /// authorizer), so that every plugin call of a tenant counts against
    /// [`BrokerConfig::plugin_concurrency_per_tenant`]. The control slot is
    /// taken first, the plugin slot second; the publish path takes only a
    /// plugin slot, so neither waits on the other in a cycle.
    pub async fn offload_request<T: Send + 'static>(
        &self,
        who: &Principal,
        tenant: &str,
        work: Work,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        let permit = self.control_permit(tenant).await?;
        let t = self.tenant(tenant);
        let calls_plugin = work == Work::Load || (!who.admin && t.read().authorizer.is_some());
        let slot = if calls_plugin {
            Some(
                t.plugin_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| BrokerError::ShuttingDown)?,
            )
        } else {
            None
        };
        self.offload_with_slot(tenant, work, slot, move || {
            let _permit = permit;
            let _running = offload::Count::start(&t.running.control, &t.running.control_peak);
            f()
        })
        .await
    }

    /// Run `log` (a tracing call caused by `tenant`'s clients) within the
    /// tenant's log limit; lines over it are counted, not written.
    pub(crate) fn log_limited(&self, tenant: &str, log: impl FnOnce()) {
        self.tenant(tenant).log_limited(log);
    }

    /// Plugin calls and control requests of `tenant` running now and at
    /// their peak since start.
    pub fn tenant_calls(&self, tenant: &str) -> TenantCalls {
        self.tenant(tenant).running.snapshot()
    }

    /// The plugin runtime.
    pub fn runtime(&self) -> &PluginRuntime {
        &self.inner.runtime
    }

    /// The store.
    pub fn store(&self) -> &dyn MessageStore {
        &*self.inner.store
    }

    /// Settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Open client connections.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Relaxed)
    }

    /// Flush everything to disk (graceful shutdown).
    pub fn sync(&self) -> Result<(), BrokerError> {
        Ok(self.inner.store.sync()?)
    }
}
