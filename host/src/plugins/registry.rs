//! The current version of every loaded plugin, by tenant and name.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::Plugin;

/// Maps `(tenant, name)` to the current [`Plugin`]. Installing under an
/// existing name is an atomic hot swap: callers that already hold the old
/// `Arc<Plugin>` finish their calls on it; every later lookup gets the new one.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    plugins: RwLock<BTreeMap<(String, String), Arc<Plugin>>>,
}

impl PluginRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Install `plugin`, returning the version it replaced.
    pub fn install(&self, plugin: Plugin) -> Option<Arc<Plugin>> {
        let key = (plugin.id().tenant.to_string(), plugin.id().name.to_string());
        let mut map = self.plugins.write().unwrap_or_else(|p| p.into_inner());
        map.insert(key, Arc::new(plugin))
    }

    /// The current version of `tenant`/`name`.
    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<Plugin>> {
        let map = self.plugins.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(tenant.to_string(), name.to_string())).cloned()
    }

    /// Remove `tenant`/`name`, returning it.
    pub fn remove(&self, tenant: &str, name: &str) -> Option<Arc<Plugin>> {
        let mut map = self.plugins.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&(tenant.to_string(), name.to_string()))
    }

    /// Plugins of `tenant` (all tenants when `None`), ordered by tenant then name.
    pub fn list(&self, tenant: Option<&str>) -> Vec<Arc<Plugin>> {
        let map = self.plugins.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|((t, _), _)| tenant.is_none_or(|want| want == t))
            .map(|(_, p)| p.clone())
            .collect()
    }
}
