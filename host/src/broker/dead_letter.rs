//! Dead-lettering: messages leaving a queue (rejected, expired, dropped by
//! overflow, over the delivery limit) go to the queue's dead-letter queue
//! with `x-death-reason` and `x-death-queue`, or are dropped without one.
//!
//! Nothing is orphaned: a message is removed from its source queue's store
//! only once the dead-letter queue stored it, or once it is dropped (and
//! counted) because the dead-letter queue is full. If storing fails, the
//! message returns to its source queue.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::limits::with_death_headers;
use super::queue::{DeadLetters, MsgRef, Queue};
use super::{Broker, expiry, now_ms};
use crate::store::{Append, MsgId, StoredMessage};

impl Broker {
    /// Move messages to the queue's dead-letter queue (or drop them).
    pub(crate) fn dead_letter(&self, q: &Arc<Queue>, dead: DeadLetters) {
        if dead.is_empty() {
            return;
        }
        let target = q
            .options
            .dead_letter
            .as_deref()
            .and_then(|dl| self.queue(&q.tenant, dl).ok());
        let Some(dlq) = target else {
            let ids: Vec<MsgId> = dead.iter().map(|(r, _)| r.id).collect();
            self.drop_dead(q, &ids);
            return;
        };
        let mut items: Vec<(MsgRef, StoredMessage)> = Vec::with_capacity(dead.len());
        let mut unreadable = Vec::new();
        let now = now_ms();
        for (r, reason) in &dead {
            match self
                .inner
                .store
                .get(q.id, r.id)
                .map(|v| v.map(|v| StoredMessage::decode(&v)))
            {
                Ok(Some(Ok(mut m))) => {
                    with_death_headers(&mut m.headers, reason, &q.name);
                    m.expires_at_ms = expiry(now, dlq.options.ttl_ms);
                    items.push((*r, m));
                }
                other => {
                    tracing::error!(queue = %q.name, id = r.id, ?other, "cannot read a dead-lettered message; dropping it");
                    unreadable.push(r.id);
                }
            }
        }
        self.drop_dead(q, &unreadable);
        if items.is_empty() {
            return;
        }
        let broker = self.clone();
        let (q, dlq) = (q.clone(), dlq.clone());
        let task = async move {
            let (refs, msgs): (Vec<MsgRef>, Vec<StoredMessage>) = items.into_iter().unzip();
            match broker.store_messages(&dlq, msgs).await {
                Ok(stored) => {
                    let ids: Vec<MsgId> = refs.iter().map(|r| r.id).collect();
                    q.counters.dead_lettered.fetch_add(stored as u64, Relaxed);
                    if let Err(e) = broker.inner.store.remove(q.id, &ids[..stored]) {
                        tracing::error!(queue = %q.name, error = %e, "cannot remove dead-lettered messages");
                    }
                    if stored < ids.len() {
                        // The dead-letter queue is full (reject-publish):
                        // like RabbitMQ, the rest is dropped, and counted.
                        broker.tenant(&q.tenant).log_limited(|| {
                            tracing::warn!(queue = %q.name, dead_letter = %dlq.name, dropped = ids.len() - stored, "dead-letter queue is full: messages dropped")
                        });
                        broker.drop_dead(&q, &ids[stored..]);
                    }
                }
                Err(e) => {
                    tracing::error!(queue = %dlq.name, error = %e, "dead-lettering failed; the messages return to their queue");
                    q.restore(refs);
                    broker.dispatch(&q);
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(task);
            }
            Err(_) => tracing::error!("dead-lettering needs a tokio runtime"),
        }
    }

    /// Remove dead messages that go nowhere from the store, counted as dropped.
    fn drop_dead(&self, q: &Queue, ids: &[MsgId]) {
        if ids.is_empty() {
            return;
        }
        q.counters.dropped.fetch_add(ids.len() as u64, Relaxed);
        if let Err(e) = self.inner.store.remove(q.id, ids) {
            tracing::error!(queue = %q.name, error = %e, "cannot drop dead messages");
        }
    }

    /// Append messages to a queue (durably if it is durable) and make them
    /// ready: as many as it has room for, in order. Returns how many were
    /// stored. Used for dead letters; publishes go through `routing`.
    async fn store_messages(
        &self,
        q: &Arc<Queue>,
        msgs: Vec<StoredMessage>,
    ) -> Result<usize, super::BrokerError> {
        let mut n = 0u64;
        while n < msgs.len() as u64 && q.reserve_room(1).is_ok() {
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        let first = q.allocate_ids(n);
        let mut refs = Vec::with_capacity(n as usize);
        let items: Vec<Append> = msgs
            .iter()
            .take(n as usize)
            .zip(first..)
            .map(|(m, id)| {
                let value = m.encode();
                refs.push(MsgRef {
                    id,
                    size: value.len() as u32,
                    expires_at: m.expires_at_ms,
                    deliveries: 0,
                });
                Append {
                    queue: q.id,
                    id,
                    value,
                }
            })
            .collect();
        if let Err(e) = self.inner.store.append(items, q.options.durable).await {
            q.unreserve(n);
            return Err(e.into());
        }
        let dead = q.enqueue(&refs, n);
        self.dead_letter(q, dead);
        self.dispatch(q);
        Ok(n as usize)
    }
}
