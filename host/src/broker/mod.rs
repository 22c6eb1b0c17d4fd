//! The broker: tenants, queues, bindings, routing through plugins, consumers.
//!
//! Data flows one way: a session calls the broker, the broker calls the
//! store. Plugins are called from exactly one place per kind: the router and
//! filters from [`routing`], the authorizer from [`Broker::authorize`].
//!
//! Every name is scoped by tenant. A tenant principal can only name its own
//! tenant; an admin can name any. An authorizer plugin is consulted only
//! after that boundary check, so it can never widen access across tenants.

mod bindings;
mod dead_letter;
mod error;
mod limits;
mod names;
mod offload;
mod queue;
mod routing;
mod subscription;
mod tenancy;
mod tenant;

pub use bindings::BindingTrie;
pub use error::BrokerError;
pub use names::{Token, check_name, check_tenant, check_topic, parse_pattern};
pub use offload::Work;
pub use queue::{Delivery, Overflow, QueueOptions};
pub use routing::{PendingPublish, Publish};

pub use subscription::{LOAD_BYTES, Subscription};
pub use tenancy::{Admission, Closer, Quota, TenantInfo, TenantLimits, TenantUsage};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::plugins::{
    Action, Decision, MetricsSnapshot, PluginKind, PluginRegistry, PluginRuntime, PluginSpec,
    PluginState, Principal, Resource, SandboxConfig,
};
use crate::store::{MessageStore, MsgId, Store, StoreConfig, StoredMessage};
use queue::{MsgRef, Queue};
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
    /// priority. Default 0.5.
    pub plugin_cpu_share: f64,
    /// Threads running the work of tenants over their CPU share. Default 2.
    pub low_priority_threads: usize,
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
        }
    }
}

/// A queue as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueInfo {
    /// Owning tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Settings.
    pub options: QueueOptions,
    /// Ready messages.
    pub ready: u64,
    /// Delivered, not yet acked.
    pub unacked: u64,
    /// Bytes held (stored values).
    pub bytes: u64,
    /// Attached consumers.
    pub consumers: u64,
    /// Messages stored since start.
    pub published: u64,
    /// Deliveries since start.
    pub delivered: u64,
    /// Acks since start.
    pub acked: u64,
    /// Messages dead-lettered from this queue since start.
    pub dead_lettered: u64,
    /// Messages dropped (no dead-letter queue) since start.
    pub dropped: u64,
    /// Filter plugins, in order.
    pub filters: Vec<String>,
}

/// A request to load a plugin.
#[derive(Debug, Clone)]
pub struct PluginLoad {
    /// Name inside the tenant.
    pub name: String,
    /// Policy kind.
    pub kind: PluginKind,
    /// Queue a filter is attached to.
    pub queue: Option<String>,
    /// Component bytes.
    pub wasm: Vec<u8>,
    /// Configuration for `init`.
    pub config: Vec<(String, String)>,
}

/// A plugin as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    /// Owning tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: PluginKind,
    /// Queue a filter is attached to.
    pub queue: Option<String>,
    /// The contract version the component was built against (`0.2.0`, `0.1.0`).
    pub abi: String,
    /// SHA-256 of the component.
    pub digest: String,
    /// Ready or errored.
    pub state: PluginState,
    /// Counters.
    pub metrics: MetricsSnapshot,
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
}

/// Cached authorizer decisions per tenant before the cache is reset.
const AUTH_CACHE_ENTRIES: usize = 10_000;

/// The cache key of an authorizer question: everything the plugin sees of
/// the principal (two certificates with one client name but different
/// subjects or SANs may get different answers), the action and the resource.
fn auth_key(who: &Principal, action: Action, resource: &Resource) -> String {
    let mut key = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        who.tenant, who.client, who.subject, who.admin
    );
    for san in &who.sans {
        key.push('\u{0}');
        key.push_str(san);
    }
    key.push_str(&format!("\u{1}{action:?}\u{0}{resource:?}"));
    key
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
            }),
        };
        broker.recover()?;
        broker.start_sweeper();
        Ok(broker)
    }

    fn recover(&self) -> Result<(), BrokerError> {
        self.recover_tenants()?;
        let store = &self.inner.store;
        let mut transient = Vec::new();
        for (key, value) in store.scan_meta("queue/")? {
            let Some((tenant, name)) = key["queue/".len()..].split_once('/') else {
                continue;
            };
            let rec: QueueRecord = decode(&key, &value)?;
            if !rec.options.durable {
                transient.push((key.clone(), rec.id));
                continue;
            }
            let q = Arc::new(Queue::new(tenant, name, rec.id, rec.options));
            {
                let mut st = q.lock();
                for item in store.scan_queue(rec.id) {
                    let (id, size, expires_at) = item?;
                    // Recovered messages may have been delivered before the
                    // restart: mark them redelivered.
                    st.ready.push_back(MsgRef {
                        id,
                        size,
                        expires_at,
                        deliveries: 1,
                    });
                    st.bytes += u64::from(size);
                    st.next_id = st.next_id.max(id + 1);
                }
            }
            self.tenant(tenant)
                .write()
                .queues
                .insert(name.to_string(), q);
        }
        for (key, id) in transient {
            store.clear_queue(id)?;
            store.delete_meta(&key)?;
        }
        for (key, _) in store.scan_meta("binding/")? {
            let mut parts = key["binding/".len()..].splitn(3, '/');
            let (Some(tenant), Some(queue), Some(pattern)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let t = self.tenant(tenant);
            let mut t = t.write();
            if t.queues.contains_key(queue)
                && let Ok(tokens) = names::parse_pattern(pattern)
            {
                t.bindings.insert(&tokens, queue);
            }
        }
        for (key, value) in store.scan_meta("plugin/")? {
            let Some((tenant, name)) = key["plugin/".len()..].split_once('/') else {
                continue;
            };
            let rec: PluginRecord = decode(&key, &value)?;
            let Some(wasm) = store.get_blob(&key)? else {
                continue;
            };
            let spec = PluginSpec {
                tenant: tenant.to_string(),
                name: name.to_string(),
                kind: rec.kind,
                wasm: wasm.clone(),
                config: rec.config.clone(),
            };
            match self.inner.runtime.load(spec) {
                Ok(p) => {
                    self.inner.plugins.install(p);
                    self.tenant(tenant)
                        .write()
                        .attach(name, rec.kind, rec.queue);
                }
                Err(e) => {
                    // It keeps its role and fails closed (an authorizer
                    // denies, a router refuses, a filter dead-letters)
                    // until an administrator reloads or unloads it.
                    tracing::error!(tenant, plugin = name, error = %e, "cannot reload plugin at start; it stays configured and fails closed");
                    let t = self.tenant(tenant);
                    let mut tw = t.write();
                    tw.attach(name, rec.kind, rec.queue.clone());
                    tw.not_running.insert(
                        name.to_string(),
                        tenant::NotRunning {
                            kind: rec.kind,
                            queue: rec.queue,
                            digest: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm)),
                            reason: e.to_string(),
                        },
                    );
                }
            }
        }
        store.sync()?;
        let removed = self.inner.runtime.collect_cache();
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed compiled plugins no loaded plugin uses"
            );
        }
        Ok(())
    }

    fn start_sweeper(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let broker = Broker { inner };
                for q in broker.all_queues() {
                    let dead = q.expire(now_ms());
                    broker.dead_letter(&q, dead);
                }
            }
        });
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
    /// may block.
    pub async fn offload<T: Send + 'static>(
        &self,
        tenant: &str,
        work: Work,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        let t = self.tenant(tenant);
        offload::offload(
            &t,
            self.inner.config.plugin_cpu_share,
            &self.inner.low_priority,
            work,
            f,
        )
        .await
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

    /// The tenant a request acts on: the principal's own, or (admins only)
    /// the one named with `--tenant`.
    pub fn scope(&self, who: &Principal, requested: Option<&str>) -> Result<String, BrokerError> {
        match requested {
            None if who.admin => Err(BrokerError::invalid(
                "tenant",
                "admin requests must name a tenant (--tenant)",
            )),
            None => Ok(who.tenant.clone()),
            Some(t) if who.admin => {
                check_tenant(t)?;
                Ok(t.to_string())
            }
            Some(t) if t == who.tenant => Ok(t.to_string()),
            Some(_) => Err(BrokerError::Unauthorized(
                "a tenant client cannot act on another tenant".into(),
            )),
        }
    }

    /// A tenant principal may only act on its own tenant.
    fn check_boundary(&self, who: &Principal, tenant: &str) -> Result<(), BrokerError> {
        if who.admin || who.tenant == tenant {
            Ok(())
        } else {
            Err(BrokerError::Unauthorized(format!(
                "client of tenant `{}` cannot act on tenant `{tenant}`",
                who.tenant
            )))
        }
    }

    /// The running plugin `name` of tenant `t`, or why it is not running.
    fn running(&self, t: &Tenant, name: &str) -> Result<Arc<crate::plugins::Plugin>, String> {
        if let Some(p) = self.inner.plugins.get(&t.name, name) {
            return Ok(p);
        }
        Err(match t.read().not_running.get(name) {
            Some(n) => format!(
                "plugin `{name}` is configured but not running: {}",
                n.reason
            ),
            None => format!("plugin `{name}` is not loaded"),
        })
    }

    /// Check `action` on `resource` in `tenant`: first the tenant boundary,
    /// then the tenant's authorizer plugin if one is configured. A failing
    /// authorizer denies, and so does one that is configured but not
    /// running: the check fails closed. Administrators are not asked (they
    /// are the repair path).
    pub fn authorize(
        &self,
        who: &Principal,
        tenant: &str,
        action: Action,
        resource: &Resource,
    ) -> Result<(), BrokerError> {
        self.check_boundary(who, tenant)?;
        if who.admin {
            return Ok(());
        }
        let t = self.tenant(tenant);
        // The generation is read before the authorizer is looked up: a
        // decision of an authorizer swapped out meanwhile is not cached.
        let generation = t
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let Some(name) = t.read().authorizer.clone() else {
            return Ok(());
        };
        let plugin = self.running(&t, &name).map_err(|why| {
            BrokerError::Unauthorized(format!(
                "{why}; every request of tenant `{tenant}` is denied until an administrator \
                 reloads or unloads it"
            ))
        })?;
        // Decisions are cached per principal (everything the plugin sees)
        // until the authorizer changes; a failing call is not cached.
        let key = auth_key(who, action, resource);
        if let Some(cached) = t
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decisions
            .get(&key)
        {
            return cached.clone().map_err(BrokerError::Unauthorized);
        }
        let decision = match plugin.authorize(who, action, resource) {
            Ok(Decision::Allow) => Ok(()),
            Ok(Decision::Deny(reason)) => Err(reason),
            Err(f) => {
                return Err(BrokerError::Unauthorized(format!(
                    "authorizer failed, denying: {f}"
                )));
            }
        };
        let mut cache = t.auth_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.generation == generation {
            if cache.decisions.len() >= AUTH_CACHE_ENTRIES {
                cache.decisions.clear();
            }
            cache.decisions.insert(key, decision.clone());
        }
        decision.map_err(BrokerError::Unauthorized)
    }

    /// Declare a queue (idempotent when the options are equal).
    pub fn declare_queue(
        &self,
        who: &Principal,
        tenant: &str,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueInfo, BrokerError> {
        check_name("queue name", name)?;
        self.authorize(who, tenant, Action::Declare, &Resource::Queue(name.into()))?;
        if let Some(dl) = &options.dead_letter {
            check_name("dead-letter queue name", dl)?;
            if dl == name {
                return Err(BrokerError::invalid(
                    "dead-letter queue",
                    format!("queue `{name}` cannot be its own dead-letter queue"),
                ));
            }
            // Dead letters enter that queue without a topic or binding:
            // the declaring client must be allowed to put messages there.
            self.authorize(who, tenant, Action::Publish, &Resource::Queue(dl.clone()))?;
        }
        let t = self.tenant(tenant);
        let mut tw = t.write();
        if let Some(q) = tw.queues.get(name) {
            if q.options != options {
                return Err(BrokerError::Conflict(format!(
                    "queue `{name}` exists with other options"
                )));
            }
            let q = q.clone();
            drop(tw);
            return Ok(self.info(&q, &t));
        }
        if let Some(max) = t.limits().max_queues
            && tw.queues.len() >= max as usize
        {
            t.refused(tenancy::Quota::Queues, 1);
            return Err(BrokerError::Quota(format!(
                "tenant `{tenant}` has {} queues (max {max})",
                tw.queues.len()
            )));
        }
        if tw.queues.len() >= self.inner.config.max_queues_per_tenant {
            return Err(BrokerError::Limit(format!(
                "tenant `{tenant}` has {} queues (max)",
                tw.queues.len()
            )));
        }
        let id = self.inner.store.allocate_queue_id()?;
        let key = format!("queue/{tenant}/{name}");
        self.inner.store.put_meta(
            &key,
            &encode(&QueueRecord {
                id,
                options: options.clone(),
            }),
        )?;
        self.inner.store.sync_meta()?;
        let q = Arc::new(Queue::new(tenant, name, id, options));
        tw.queues.insert(name.to_string(), q.clone());
        drop(tw);
        Ok(self.info(&q, &t))
    }

    fn queue(&self, tenant: &str, name: &str) -> Result<Arc<Queue>, BrokerError> {
        self.tenant(tenant)
            .read()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::not_found("queue", name))
    }

    /// Delete a queue, its bindings, filters and messages.
    pub fn delete_queue(
        &self,
        who: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        self.authorize(who, tenant, Action::Delete, &Resource::Queue(name.into()))?;
        let t = self.tenant(tenant);
        let q = {
            let mut tw = t.write();
            let q = tw
                .queues
                .remove(name)
                .ok_or_else(|| BrokerError::not_found("queue", name))?;
            tw.bindings.remove_queue(name);
            tw.filters.remove(name);
            q
        };
        {
            let mut st = q.lock();
            st.deleted = true;
            st.consumers.clear();
            st.ready.clear();
            st.unacked.clear();
        }
        let store = &self.inner.store;
        for (key, _) in store.scan_meta(&format!("binding/{tenant}/{name}/"))? {
            store.delete_meta(&key)?;
        }
        store.delete_meta(&format!("queue/{tenant}/{name}"))?;
        store.clear_queue(q.id)?;
        store.sync_meta()?;
        Ok(())
    }

    /// Drop every ready message of a queue; returns how many.
    pub fn purge_queue(
        &self,
        who: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<u64, BrokerError> {
        self.authorize(who, tenant, Action::Purge, &Resource::Queue(name.into()))?;
        let q = self.queue(tenant, name)?;
        let ids = q.purge();
        self.inner.store.remove(q.id, &ids)?;
        Ok(ids.len() as u64)
    }

    /// Parse `pattern` and check that `who` may (un)bind it to `queue`.
    fn authorize_binding(
        &self,
        who: &Principal,
        tenant: &str,
        queue: &str,
        pattern: &str,
    ) -> Result<Vec<names::Token>, BrokerError> {
        let tokens = names::parse_pattern(pattern)?;
        let binding = crate::plugins::Binding {
            queue: queue.into(),
            pattern: pattern.into(),
        };
        self.authorize(who, tenant, Action::Bind, &Resource::Binding(binding))?;
        Ok(tokens)
    }

    /// Bind a queue to a topic pattern.
    pub fn bind(
        &self,
        who: &Principal,
        tenant: &str,
        queue: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        let tokens = self.authorize_binding(who, tenant, queue, pattern)?;
        let t = self.tenant(tenant);
        let mut tw = t.write();
        if !tw.queues.contains_key(queue) {
            return Err(BrokerError::not_found("queue", queue));
        }
        let max = self.inner.config.max_bindings_per_tenant;
        if tw.bindings.len() >= max && !tw.bindings.contains(&tokens, queue) {
            return Err(BrokerError::Limit(format!(
                "tenant `{tenant}` has {} bindings (max {max})",
                tw.bindings.len()
            )));
        }
        if tw.bindings.insert(&tokens, queue) {
            self.inner
                .store
                .put_meta(&format!("binding/{tenant}/{queue}/{pattern}"), b"")?;
            self.inner.store.sync_meta()?;
        }
        Ok(())
    }

    /// Remove a binding.
    pub fn unbind(
        &self,
        who: &Principal,
        tenant: &str,
        queue: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        let tokens = self.authorize_binding(who, tenant, queue, pattern)?;
        let t = self.tenant(tenant);
        if !t.write().bindings.remove(&tokens, queue) {
            return Err(BrokerError::not_found(
                "binding",
                format!("{queue} {pattern}"),
            ));
        }
        self.inner
            .store
            .delete_meta(&format!("binding/{tenant}/{queue}/{pattern}"))?;
        self.inner.store.sync_meta()?;
        Ok(())
    }

    fn info(&self, q: &Queue, t: &Tenant) -> QueueInfo {
        let (ready, unacked, bytes, consumers) = {
            let st = q.lock();
            (
                st.ready.len() as u64,
                st.unacked.len() as u64,
                st.bytes,
                st.consumers.len() as u64,
            )
        };
        let c = &q.counters;
        QueueInfo {
            tenant: q.tenant.clone(),
            name: q.name.clone(),
            options: q.options.clone(),
            ready,
            unacked,
            bytes,
            consumers,
            published: c.published.load(Relaxed),
            delivered: c.delivered.load(Relaxed),
            acked: c.acked.load(Relaxed),
            dead_lettered: c.dead_lettered.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            filters: t.read().filters.get(&q.name).cloned().unwrap_or_default(),
        }
    }

    /// Queues of a tenant, by name.
    pub fn list_queues(
        &self,
        who: &Principal,
        tenant: &str,
    ) -> Result<Vec<QueueInfo>, BrokerError> {
        self.check_boundary(who, tenant)?;
        let t = self.tenant(tenant);
        let mut queues: Vec<Arc<Queue>> = t.read().queues.values().cloned().collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(queues.iter().map(|q| self.info(q, &t)).collect())
    }

    /// Load (or hot-swap) a plugin for a tenant. A router or authorizer
    /// becomes the tenant's; a filter is attached to `queue`.
    pub fn load_plugin(
        &self,
        who: &Principal,
        tenant: &str,
        load: PluginLoad,
    ) -> Result<PluginInfo, BrokerError> {
        let PluginLoad {
            name,
            kind,
            queue,
            wasm,
            config,
        } = load;
        let name = name.as_str();
        check_name("plugin name", name)?;
        match (kind, &queue) {
            (PluginKind::Filter, None) => {
                return Err(BrokerError::invalid(
                    "plugin",
                    "a filter must be attached to a queue (--queue)",
                ));
            }
            (PluginKind::Router | PluginKind::Authorizer, Some(_)) => {
                return Err(BrokerError::invalid(
                    "plugin",
                    format!("a {kind} is tenant-wide; --queue applies to filters only"),
                ));
            }
            _ => {}
        }
        // The authorizer sees what is loaded and where: `admin` for a filter
        // on its queue, `manage-policy` for the tenant's router or authorizer.
        let (action, resource) = kind.management_question(name, queue.clone());
        self.authorize(who, tenant, action, &resource)?;
        if let Some(q) = &queue {
            self.queue(tenant, q)?;
        }
        // Loading over a plugin of the same name (running or not) with
        // another kind or queue removes that one: it needs the permission to
        // remove it, too.
        if let Some((old_kind, old_queue)) = self.plugin_role(tenant, name)
            && (old_kind, &old_queue) != (kind, &queue)
        {
            let (action, resource) = old_kind.management_question(name, old_queue);
            self.authorize(who, tenant, action, &resource)?;
        }
        let replaces = self.plugin_role(tenant, name).is_some();
        let max = self.inner.config.max_plugins_per_tenant;
        let count = self.plugin_count(tenant);
        if !replaces && count >= max {
            return Err(BrokerError::Limit(format!(
                "tenant `{tenant}` has {count} plugins (max {max})"
            )));
        }
        let key = format!("plugin/{tenant}/{name}");
        let record = PluginRecord {
            kind,
            queue: queue.clone(),
            config: config.clone(),
        };
        let old = self.inner.plugins.get(tenant, name);
        let plugin = self.inner.runtime.load_replacing(
            PluginSpec {
                tenant: tenant.into(),
                name: name.into(),
                kind,
                wasm: wasm.clone(),
                config,
            },
            old.as_deref(),
        );
        drop(old);
        let plugin = match plugin {
            Ok(p) => p,
            Err(e) => {
                // A component that failed (e.g. in `init`) leaves no
                // compiled code behind.
                self.inner.runtime.collect_cache();
                return Err(e.into());
            }
        };
        self.inner.store.put_blob(&key, &wasm)?;
        self.inner.store.put_meta(&key, &encode(&record))?;
        self.inner.store.sync_meta()?;
        let t = self.tenant(tenant);
        {
            let mut tw = t.write();
            if let Some(old) = tw.not_running.get(name).map(|n| n.kind) {
                tw.detach(name, old);
            }
            if let Some(old) = self.inner.plugins.install(plugin) {
                tw.detach(name, old.kind());
            }
            tw.attach(name, kind, queue);
        }
        t.clear_auth_cache();
        // The replaced version's compiled code goes (once its last call ends).
        self.inner.runtime.collect_cache();
        self.plugin_info(tenant, name)
    }

    /// The kind and filter queue of plugin `name` of `tenant`, running or
    /// configured but not running.
    fn plugin_role(&self, tenant: &str, name: &str) -> Option<(PluginKind, Option<String>)> {
        let t = self.tenant(tenant);
        if let Some(p) = self.inner.plugins.get(tenant, name) {
            return Some((p.kind(), t.read().filter_queue(name)));
        }
        let ts = t.read();
        ts.not_running.get(name).map(|n| (n.kind, n.queue.clone()))
    }

    /// Plugins of `tenant`, running or not.
    fn plugin_count(&self, tenant: &str) -> usize {
        self.inner.plugins.list(Some(tenant)).len() + self.tenant(tenant).read().not_running.len()
    }

    /// Unload a plugin.
    pub fn unload_plugin(
        &self,
        who: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        // The boundary first: a tenant must not learn another's plugin names.
        self.check_boundary(who, tenant)?;
        // The question names what is removed. For an unknown name it is a
        // filter attached nowhere, which a rule about queues cannot allow by
        // accident; the answer is `not_found` only if that is allowed.
        let (kind, queue) = self
            .plugin_role(tenant, name)
            .unwrap_or((PluginKind::Filter, None));
        let (action, resource) = kind.management_question(name, queue);
        self.authorize(who, tenant, action, &resource)?;
        let t = self.tenant(tenant);
        let kind = match self.inner.plugins.remove(tenant, name) {
            Some(p) => p.kind(),
            None => t
                .read()
                .not_running
                .get(name)
                .map(|n| n.kind)
                .ok_or_else(|| BrokerError::not_found("plugin", name))?,
        };
        t.write().detach(name, kind);
        t.clear_auth_cache();
        let key = format!("plugin/{tenant}/{name}");
        self.inner.store.delete_meta(&key)?;
        self.inner.store.delete_blob(&key)?;
        self.inner.store.sync_meta()?;
        self.inner.runtime.collect_cache();
        Ok(())
    }

    fn plugin_info(&self, tenant: &str, name: &str) -> Result<PluginInfo, BrokerError> {
        let Some(p) = self.inner.plugins.get(tenant, name) else {
            let n = self
                .tenant(tenant)
                .read()
                .not_running
                .get(name)
                .cloned()
                .ok_or_else(|| BrokerError::not_found("plugin", name))?;
            return Ok(PluginInfo {
                tenant: tenant.into(),
                name: name.into(),
                kind: n.kind,
                queue: n.queue,
                digest: n.digest,
                state: PluginState::NotRunning { reason: n.reason },
                // Not known without loading it.
                abi: "-".into(),
                metrics: MetricsSnapshot::default(),
            });
        };
        let queue = self.tenant(tenant).read().filter_queue(name);
        Ok(PluginInfo {
            tenant: tenant.into(),
            name: name.into(),
            kind: p.kind(),
            queue,
            abi: p.abi().version().into(),
            digest: p.digest().into(),
            state: p.state(),
            metrics: p.metrics(),
        })
    }

    /// Plugins of a tenant.
    pub fn list_plugins(
        &self,
        who: &Principal,
        tenant: &str,
    ) -> Result<Vec<PluginInfo>, BrokerError> {
        self.check_boundary(who, tenant)?;
        Ok(self.tenant_plugins(tenant))
    }

    /// Every plugin of `tenant`, running or not, by name.
    fn tenant_plugins(&self, tenant: &str) -> Vec<PluginInfo> {
        let mut names: Vec<String> = self
            .inner
            .plugins
            .list(Some(tenant))
            .iter()
            .map(|p| p.id().name.to_string())
            .collect();
        names.extend(self.tenant(tenant).read().not_running.keys().cloned());
        names.sort();
        names.dedup();
        names
            .iter()
            .filter_map(|n| self.plugin_info(tenant, n).ok())
            .collect()
    }

    /// Attach a consumer to a queue with `prefetch` unacked deliveries at most.
    pub fn subscribe(
        &self,
        who: &Principal,
        tenant: &str,
        queue: &str,
        prefetch: u32,
    ) -> Result<Subscription, BrokerError> {
        self.authorize(
            who,
            tenant,
            Action::Subscribe,
            &Resource::Queue(queue.into()),
        )?;
        let max = self.inner.config.max_prefetch;
        if prefetch > max {
            return Err(BrokerError::Limit(format!(
                "prefetch {prefetch} is above the broker's maximum of {max}"
            )));
        }
        let q = self.queue(tenant, queue)?;
        let id = self.inner.next_consumer.fetch_add(1, Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(id, prefetch, self.inner.config.max_prefetch_bytes, tx);
        let sub = Subscription::new(self.clone(), q.clone(), id, rx);
        self.dispatch(&q);
        Ok(sub)
    }

    /// Give ready messages of `q` to its consumers.
    pub(crate) fn dispatch(&self, q: &Arc<Queue>) {
        let (batches, dead) = q.dispatch(now_ms());
        for (tx, refs) in batches {
            // A closed channel means the subscription is being dropped; its
            // drop requeues whatever it holds.
            let _ = tx.send(refs);
        }
        self.dead_letter(q, dead);
    }

    /// Read delivered messages from the store (one read per stored chunk).
    pub(crate) fn load_deliveries(
        &self,
        q: &Queue,
        refs: &[MsgRef],
    ) -> Vec<Result<Delivery, BrokerError>> {
        let ids: Vec<MsgId> = refs.iter().map(|r| r.id).collect();
        let values = match self.inner.store.get_many(q.id, &ids) {
            Ok(v) => v,
            Err(e) => return refs.iter().map(|_| Err(e.clone().into())).collect(),
        };
        refs.iter()
            .zip(values)
            .map(|(r, value)| {
                let bytes = value.ok_or_else(|| {
                    crate::store::StoreError::Corrupt(format!(
                        "message {} of queue `{}` is missing",
                        r.id, q.name
                    ))
                })?;
                let m = StoredMessage::decode(&bytes)?;
                Ok(Delivery {
                    tag: r.id,
                    topic: m.topic,
                    headers: m.headers,
                    payload: m.payload,
                    redelivered: r.deliveries > 1,
                    delivery_count: r.deliveries - 1,
                })
            })
            .collect()
    }

    /// Per-tenant totals (admins see every tenant, tenants only their own).
    pub fn stats(&self, who: &Principal) -> Vec<TenantStats> {
        let tenants = self.all_tenants();
        let mut out: Vec<TenantStats> = tenants
            .iter()
            .filter(|t| !t.name.is_empty() && (who.admin || t.name == who.tenant))
            .map(|t| {
                let queues: Vec<Arc<Queue>> = t.read().queues.values().cloned().collect();
                let infos: Vec<QueueInfo> = queues.iter().map(|q| self.info(q, t)).collect();
                TenantStats {
                    tenant: t.name.clone(),
                    queues: infos.len() as u64,
                    ready: infos.iter().map(|i| i.ready).sum(),
                    unacked: infos.iter().map(|i| i.unacked).sum(),
                    bytes: infos.iter().map(|i| i.bytes).sum(),
                    published: infos.iter().map(|i| i.published).sum(),
                    delivered: infos.iter().map(|i| i.delivered).sum(),
                    plugins: self.plugin_count(&t.name) as u64,
                    plugins_not_running: t.read().not_running.len() as u64,
                    bindings: t.read().bindings.len() as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Every queue and plugin of every tenant (for metrics).
    pub fn snapshot(&self) -> (Vec<QueueInfo>, Vec<PluginInfo>) {
        let tenants = self.all_tenants();
        let mut queues = Vec::new();
        for t in &tenants {
            let qs: Vec<Arc<Queue>> = t.read().queues.values().cloned().collect();
            queues.extend(qs.iter().map(|q| self.info(q, t)));
        }
        queues.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        let mut plugins: Vec<PluginInfo> = tenants
            .iter()
            .flat_map(|t| self.tenant_plugins(&t.name))
            .collect();
        plugins.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        (queues, plugins)
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

/// Usage of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantStats {
    /// Tenant name.
    pub tenant: String,
    /// Queues.
    pub queues: u64,
    /// Ready messages across queues.
    pub ready: u64,
    /// Unacked deliveries across queues.
    pub unacked: u64,
    /// Stored bytes across queues.
    pub bytes: u64,
    /// Messages stored since start.
    pub published: u64,
    /// Deliveries since start.
    pub delivered: u64,
    /// Plugins (running or not).
    pub plugins: u64,
    /// Plugins configured but not running (they fail closed).
    pub plugins_not_running: u64,
    /// Bindings.
    pub bindings: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(subject: &str, sans: &[&str]) -> Principal {
        Principal {
            tenant: "acme".into(),
            client: "ci".into(),
            subject: subject.into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            admin: false,
        }
    }

    /// The authorizer sees the whole principal, so its cached decisions are
    /// keyed by all of it: two certificates of one client name with other
    /// subjects or SANs never share a decision.
    #[test]
    fn auth_cache_keys_cover_everything_the_authorizer_sees() {
        let q = Resource::Queue("q".into());
        let base = auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Purge, &q);
        for other in [
            principal("CN=ci,O=acme,OU=red", &["a"]),
            principal("CN=ci,O=acme", &["a", "b"]),
            principal("CN=ci,O=acme", &[]),
            principal("CN=ci,O=acme", &["a\u{0}"]),
        ] {
            assert_ne!(auth_key(&other, Action::Purge, &q), base, "{other:?}");
        }
        assert_ne!(
            auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Delete, &q),
            base
        );
        assert_eq!(
            auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Purge, &q),
            base
        );
    }
}
