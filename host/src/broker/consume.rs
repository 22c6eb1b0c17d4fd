//! Consumers: subscribing, handing ready messages to consumers with
//! credit, and reading what is delivered from the store.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::queue::{Delivery, MsgRef, Queue};
use super::subscription::Subscription;
use super::{Broker, BrokerError, now_ms};
use crate::plugins::{Action, Principal, Resource};
use crate::store::{MsgId, StoredMessage};

impl Broker {
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
}
