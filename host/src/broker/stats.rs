//! Usage per tenant and the snapshot behind the metrics endpoint.

use std::sync::Arc;

use super::Broker;
use super::admin::QueueInfo;
use super::policies::PluginInfo;
use super::queue::Queue;
use crate::plugins::Principal;

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

impl Broker {
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
}
