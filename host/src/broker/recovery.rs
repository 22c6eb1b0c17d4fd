//! Start: tenants, queues, bindings and plugins from the store, and the
//! expiry sweeper.

use std::sync::Arc;
use std::time::Duration;

use super::queue::{MsgRef, Queue};
use super::{Broker, BrokerError, PluginRecord, QueueRecord, decode, names, now_ms, tenant};
use crate::plugins::PluginSpec;

impl Broker {
    pub(super) fn recover(&self) -> Result<(), BrokerError> {
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

    pub(super) fn start_sweeper(&self) {
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
}
