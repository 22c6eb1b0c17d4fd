//! A consumer attached to a queue.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::queue::{Delivery, MsgRef, Queue};
use super::{Broker, BrokerError};

/// A consumer of one queue. Deliveries arrive through [`Subscription::next`];
/// at most `prefetch` are unacked at a time. Dropping the subscription
/// requeues its unacked messages as redelivered.
pub struct Subscription {
    broker: Broker,
    queue: Arc<Queue>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Vec<MsgRef>>,
}

impl Subscription {
    pub(crate) fn new(
        broker: Broker,
        queue: Arc<Queue>,
        id: u64,
        rx: mpsc::UnboundedReceiver<Vec<MsgRef>>,
    ) -> Self {
        Self {
            broker,
            queue,
            id,
            rx,
        }
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue.name
    }

    /// The next batch of deliveries; `None` when the queue was deleted.
    pub async fn next(&mut self) -> Option<Vec<Delivery>> {
        loop {
            let refs = self.rx.recv().await?;
            let mut out = Vec::with_capacity(refs.len());
            let mut missing = Vec::new();
            for (r, d) in refs
                .iter()
                .zip(self.broker.load_deliveries(&self.queue, &refs))
            {
                match d {
                    Ok(d) => out.push(d),
                    Err(e) => {
                        tracing::error!(queue = %self.queue.name, error = %e, "dropping an unreadable message");
                        missing.push(r.id);
                    }
                }
            }
            if !missing.is_empty() {
                self.ack(&missing);
            }
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    /// Acknowledge deliveries: they are removed.
    pub fn ack(&self, tags: &[u64]) {
        let ids = self.queue.ack(self.id, tags);
        if let Err(e) = self.broker.inner.store.remove(self.queue.id, &ids) {
            tracing::error!(queue = %self.queue.name, error = %e, "cannot remove acked messages");
        }
        self.broker.dispatch(&self.queue);
    }

    /// Make every ack applied so far durable: resolves after the next group
    /// commit (sled flush + fdatasync) that follows them.
    pub fn sync(&self) -> crate::store::Commit {
        self.broker.inner.store.append(Vec::new(), true)
    }

    /// Negatively acknowledge: requeue (redelivered), or dead-letter past
    /// the delivery limit.
    pub fn nack(&self, tags: &[u64]) {
        let dead = self.queue.nack(self.id, tags);
        self.broker.dead_letter(&self.queue, dead);
        self.broker.dispatch(&self.queue);
    }

    /// Reject: dead-letter (or drop without a dead-letter queue).
    pub fn reject(&self, tags: &[u64]) {
        let dead = self.queue.reject(self.id, tags);
        self.broker.dead_letter(&self.queue, dead);
        self.broker.dispatch(&self.queue);
    }

    /// Whether the queue still exists.
    pub fn check(&self) -> Result<(), BrokerError> {
        if self.queue.lock().deleted {
            Err(BrokerError::not_found("queue", &self.queue.name))
        } else {
            Ok(())
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let dead = self.queue.remove_consumer(self.id);
        // Deliveries already handed over but not yet read are requeued too.
        self.rx.close();
        self.broker.dead_letter(&self.queue, dead);
        self.broker.dispatch(&self.queue);
    }
}
