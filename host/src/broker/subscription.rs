//! A consumer attached to a queue.

use std::collections::VecDeque;
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
    /// Handed to this consumer, not yet loaded from the store.
    pending: VecDeque<MsgRef>,
}

/// Stored bytes [`Subscription::next`] loads at once (at least one message).
pub const LOAD_BYTES: u64 = 2 << 20;

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
            pending: VecDeque::new(),
        }
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue.name
    }

    /// The next batch of deliveries (at most [`LOAD_BYTES`] stored bytes,
    /// at least one message); `None` when the queue was deleted.
    pub async fn next(&mut self) -> Option<Vec<Delivery>> {
        loop {
            if !self.wait().await {
                return None;
            }
            let out = self.load(LOAD_BYTES);
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    /// Wait until deliveries are handed to this consumer; `false` when the
    /// queue was deleted. Cancel-safe.
    pub async fn wait(&mut self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        match self.rx.recv().await {
            Some(refs) => {
                self.pending.extend(refs);
                true
            }
            None => false,
        }
    }

    /// Load pending deliveries from the store: at most `max_bytes` stored
    /// bytes (at least one message), so a large prefetch never loads a
    /// large backlog at once. Unreadable messages are dropped and logged.
    pub fn load(&mut self, max_bytes: u64) -> Vec<Delivery> {
        while let Ok(refs) = self.rx.try_recv() {
            self.pending.extend(refs);
        }
        let mut refs = Vec::new();
        let mut bytes = 0u64;
        while let Some(r) = self.pending.front() {
            if !refs.is_empty() && bytes + u64::from(r.size) > max_bytes {
                break;
            }
            bytes += u64::from(r.size);
            refs.extend(self.pending.pop_front());
        }
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
        out
    }

    /// Acknowledge deliveries: they are removed.
    pub fn ack(&self, tags: &[u64]) {
        self.ack_ranges(&sluice_proto::to_ranges(tags));
    }

    /// Acknowledge the deliveries in inclusive tag ranges (tags this
    /// subscription does not hold are ignored).
    pub fn ack_ranges(&self, ranges: &[(u64, u64)]) {
        let ids = self.queue.ack(self.id, ranges);
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
        self.nack_ranges(&sluice_proto::to_ranges(tags));
    }

    /// [`Subscription::nack`] for inclusive tag ranges.
    pub fn nack_ranges(&self, ranges: &[(u64, u64)]) {
        let dead = self.queue.nack(self.id, ranges);
        self.broker.dead_letter(&self.queue, dead);
        self.broker.dispatch(&self.queue);
    }

    /// Reject: dead-letter (or drop without a dead-letter queue).
    pub fn reject(&self, tags: &[u64]) {
        self.reject_ranges(&sluice_proto::to_ranges(tags));
    }

    /// [`Subscription::reject`] for inclusive tag ranges.
    pub fn reject_ranges(&self, ranges: &[(u64, u64)]) {
        let dead = self.queue.reject(self.id, ranges);
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
