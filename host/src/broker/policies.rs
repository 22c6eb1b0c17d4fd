//! Plugin administration: load (or hot-swap), unload, list. Management is
//! authorized with the plugin's kind and attachment.

use super::{Broker, BrokerError, PluginRecord, check_name, encode};
use crate::plugins::{MetricsSnapshot, PluginKind, PluginSpec, PluginState, Principal};

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

impl Broker {
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
        // One load or unload of this tenant at a time from here to the
        // install: the role and count checked below stay true until then.
        let t = self.tenant(tenant);
        let _admin = t.plugin_admin.lock().unwrap_or_else(|p| p.into_inner());
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
        // Compiling and `init` are plugin work of the tenant: in its slot.
        let call = t.plugin_call().map_err(BrokerError::Conflict)?;
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
        drop(call);
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
    pub(super) fn plugin_role(
        &self,
        tenant: &str,
        name: &str,
    ) -> Option<(PluginKind, Option<String>)> {
        let t = self.tenant(tenant);
        if let Some(p) = self.inner.plugins.get(tenant, name) {
            return Some((p.kind(), t.read().filter_queue(name)));
        }
        let ts = t.read();
        ts.not_running.get(name).map(|n| (n.kind, n.queue.clone()))
    }

    /// Plugins of `tenant`, running or not.
    pub(super) fn plugin_count(&self, tenant: &str) -> usize {
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
        let _admin = t.plugin_admin.lock().unwrap_or_else(|p| p.into_inner());
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

    pub(super) fn plugin_info(&self, tenant: &str, name: &str) -> Result<PluginInfo, BrokerError> {
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
    pub(super) fn tenant_plugins(&self, tenant: &str) -> Vec<PluginInfo> {
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
}
