//! Queue and binding administration: declare, delete, purge, bind,
//! unbind, list.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::queue::{Queue, QueueOptions};
use super::tenant::Tenant;
use super::{Broker, BrokerError, QueueRecord, check_name, encode, names};
use crate::plugins::{Action, Principal, Resource};

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

impl Broker {
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
            t.refused(super::Quota::Queues, 1);
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

    pub(super) fn queue(&self, tenant: &str, name: &str) -> Result<Arc<Queue>, BrokerError> {
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
    pub(super) fn authorize_binding(
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

    pub(super) fn info(&self, q: &Queue, t: &Tenant) -> QueueInfo {
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
}
