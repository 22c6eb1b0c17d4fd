//! Usage per tenant and the snapshot behind the metrics endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

/// High-water marks of the bounded buffers of client sessions, over every
/// connection of one broker since it started (each mark is the most one
/// connection, or one subscription, held at once). They show that a
/// session's bounds hold (docs/security.md); tests assert them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionPeaks {
    /// Frames queued for one connection's control stream (`OUT_FRAMES`).
    pub out_frames: u64,
    /// `SyncAcks` of one connection waiting for their answer (`PENDING_SYNCS`).
    pub pending_syncs: u64,
    /// Settle frames queued for one subscription (`SUB_COMMANDS`).
    pub sub_commands: u64,
    /// Bytes of deliveries (topic, headers, payload) one subscription
    /// loaded from the store in one batch (`LOAD_BYTES`).
    pub delivery_batch_bytes: u64,
    /// Bytes of deliveries one connection held loaded at once, across its
    /// subscriptions, until written to their streams (`DELIVERY_BUDGET`).
    pub delivery_loaded_bytes: u64,
}

/// The counters behind [`SessionPeaks`], updated by the sessions.
#[derive(Debug, Default)]
pub(crate) struct SessionPeakCounters {
    pub out_frames: AtomicU64,
    pub pending_syncs: AtomicU64,
    pub sub_commands: AtomicU64,
    pub delivery_batch_bytes: AtomicU64,
    pub delivery_loaded_bytes: AtomicU64,
}

impl SessionPeakCounters {
    /// Raise `mark` to `value` if it is higher.
    pub(crate) fn note(mark: &AtomicU64, value: u64) {
        mark.fetch_max(value, Relaxed);
    }
}

impl Broker {
    /// The high-water marks of the sessions' buffers.
    pub fn session_peaks(&self) -> SessionPeaks {
        let c = &self.inner.session_peaks;
        SessionPeaks {
            out_frames: c.out_frames.load(Relaxed),
            pending_syncs: c.pending_syncs.load(Relaxed),
            sub_commands: c.sub_commands.load(Relaxed),
            delivery_batch_bytes: c.delivery_batch_bytes.load(Relaxed),
            delivery_loaded_bytes: c.delivery_loaded_bytes.load(Relaxed),
        }
    }

    /// The counters sessions update.
    pub(crate) fn session_peak_counters(&self) -> &Arc<SessionPeakCounters> {
        &self.inner.session_peaks
    }
}
