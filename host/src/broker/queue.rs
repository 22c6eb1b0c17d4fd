//! One queue: ready messages, unacked deliveries, consumers with credit.
//!
//! Only ids, sizes and expiries live here; payloads stay in the store and
//! are read when delivered. All state sits behind one mutex held for
//! bookkeeping only (never across I/O or a plugin call).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::mpsc;

use crate::store::{MsgId, QueueId};

/// What happens when a queue at max-length receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Refuse the publish.
    #[default]
    RejectPublish,
    /// Drop (dead-letter) the oldest ready message.
    DropHead,
}

/// Queue settings, fixed at declare time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueOptions {
    /// Fsynced before confirms and kept across restarts (default). A
    /// transient queue skips fsync and is deleted at restart.
    pub durable: bool,
    /// Most messages held (ready + unacked).
    pub max_length: Option<u64>,
    /// Behaviour at max-length.
    pub overflow: Overflow,
    /// Message time-to-live in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Queue (same tenant) receiving rejected, expired, dropped-by-overflow,
    /// over-delivered and filter-failed messages.
    pub dead_letter: Option<String>,
    /// Deliveries after which a message is dead-lettered instead of requeued.
    pub delivery_limit: Option<u32>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            durable: true,
            max_length: None,
            overflow: Overflow::RejectPublish,
            ttl_ms: None,
            dead_letter: None,
            delivery_limit: None,
        }
    }
}

/// A message reference held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsgRef {
    pub id: MsgId,
    pub size: u32,
    pub expires_at: u64,
    pub deliveries: u32,
}

/// One delivery handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Tag to ack/nack/reject with (unique among this queue's unacked messages).
    pub tag: u64,
    /// Topic the message was published to.
    pub topic: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Whether it was delivered before (or recovered after a restart).
    pub redelivered: bool,
    /// Previous deliveries.
    pub delivery_count: u32,
}

pub(crate) struct Consumer {
    pub id: u64,
    /// Deliveries it may still receive (prefetch minus what it holds).
    pub credit: u32,
    /// Tags it holds unacked, so a settle range is resolved against what
    /// the consumer holds, never expanded tag by tag.
    pub held: BTreeSet<MsgId>,
    /// Stored bytes it holds unacked.
    pub held_bytes: u64,
    /// Most stored bytes it may hold unacked (always at least one message).
    pub max_bytes: u64,
    pub tx: mpsc::UnboundedSender<Vec<MsgRef>>,
}

impl Consumer {
    /// Whether a message of `size` bytes may be handed to it now.
    fn takes(&self, size: u32) -> bool {
        self.credit > 0
            && (self.held.is_empty() || self.held_bytes + u64::from(size) <= self.max_bytes)
    }
}

#[derive(Default)]
pub(crate) struct QueueState {
    pub next_id: MsgId,
    pub ready: VecDeque<MsgRef>,
    pub unacked: HashMap<MsgId, (u64, MsgRef)>,
    pub reserved: u64,
    pub bytes: u64,
    pub consumers: Vec<Consumer>,
    pub rr: usize,
    pub deleted: bool,
}

impl QueueState {
    pub fn len(&self) -> u64 {
        self.ready.len() as u64 + self.unacked.len() as u64
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub dropped: AtomicU64,
}

/// A queue of one tenant.
pub(crate) struct Queue {
    pub tenant: String,
    pub name: String,
    pub id: QueueId,
    pub options: QueueOptions,
    pub state: Mutex<QueueState>,
    pub counters: QueueCounters,
}

/// Messages leaving a queue for the dead-letter path, with the reason.
pub(crate) type DeadLetters = Vec<(MsgRef, &'static str)>;

/// Deliveries handed out by a dispatch: per consumer channel, its new refs.
pub(crate) type Batches = Vec<(mpsc::UnboundedSender<Vec<MsgRef>>, Vec<MsgRef>)>;

impl Queue {
    pub fn new(tenant: &str, name: &str, id: QueueId, options: QueueOptions) -> Self {
        Self {
            tenant: tenant.to_string(),
            name: name.to_string(),
            id,
            options,
            state: Mutex::new(QueueState {
                next_id: 1,
                ..QueueState::default()
            }),
            counters: QueueCounters::default(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve room for `n` messages (refused when max-length would be
    /// exceeded with reject-publish), without ids yet.
    pub fn reserve_room(&self, n: u64) -> Result<(), ()> {
        let mut st = self.lock();
        if let (Some(max), Overflow::RejectPublish) =
            (self.options.max_length, self.options.overflow)
            && st.len() + st.reserved + n > max
        {
            return Err(());
        }
        st.reserved += n;
        Ok(())
    }

    /// `n` consecutive new ids (the first is returned) for room reserved
    /// before: one publish batch's messages of this queue get consecutive
    /// ids, so the store keeps them as one chunk.
    pub fn allocate_ids(&self, n: u64) -> MsgId {
        let mut st = self.lock();
        let first = st.next_id;
        st.next_id += n;
        first
    }

    /// Give back a reservation that will not be used.
    pub fn unreserve(&self, n: u64) {
        let mut st = self.lock();
        st.reserved = st.reserved.saturating_sub(n);
    }

    /// Make committed messages ready. Returns heads dropped by overflow.
    pub fn enqueue(&self, refs: &[MsgRef], reserved: u64) -> DeadLetters {
        let mut st = self.lock();
        st.reserved = st.reserved.saturating_sub(reserved);
        if st.deleted {
            return Vec::new();
        }
        for r in refs {
            st.bytes += u64::from(r.size);
            st.ready.push_back(*r);
        }
        self.counters
            .published
            .fetch_add(refs.len() as u64, Relaxed);
        let mut dead = Vec::new();
        if let (Some(max), Overflow::DropHead) = (self.options.max_length, self.options.overflow) {
            while st.len() > max {
                let Some(head) = st.ready.pop_front() else {
                    break;
                };
                st.bytes -= u64::from(head.size);
                dead.push((head, "maxlen"));
            }
        }
        dead
    }

    /// Hand ready messages to consumers with credit, round robin. Expired
    /// heads are returned as dead letters. Returns, per consumer channel,
    /// the references it now holds unacked.
    pub fn dispatch(&self, now_ms: u64) -> (Batches, DeadLetters) {
        let mut st = self.lock();
        let mut dead = Vec::new();
        let n = st.consumers.len();
        let mut out: Vec<Vec<MsgRef>> = vec![Vec::new(); n];
        if n > 0 {
            let mut idle = 0;
            while idle < n {
                let Some(&head) = st.ready.front() else {
                    break;
                };
                if head.expires_at != 0 && head.expires_at <= now_ms {
                    st.ready.pop_front();
                    st.bytes -= u64::from(head.size);
                    dead.push((head, "expired"));
                    continue;
                }
                let i = st.rr % n;
                st.rr = st.rr.wrapping_add(1);
                if !st.consumers[i].takes(head.size) {
                    idle += 1;
                    continue;
                }
                idle = 0;
                st.ready.pop_front();
                let mut r = head;
                let c = &mut st.consumers[i];
                c.credit -= 1;
                c.held.insert(r.id);
                c.held_bytes += u64::from(r.size);
                let cid = c.id;
                r.deliveries += 1;
                out[i].push(r);
                st.unacked.insert(r.id, (cid, r));
            }
        }
        let batches = st
            .consumers
            .iter()
            .zip(out)
            .filter(|(_, refs)| !refs.is_empty())
            .map(|(c, refs)| (c.tx.clone(), refs))
            .collect::<Vec<_>>();
        self.counters
            .delivered
            .fetch_add(batches.iter().map(|(_, r)| r.len() as u64).sum(), Relaxed);
        (batches, dead)
    }

    /// Expire ready messages at the head whose TTL passed. Messages enter a
    /// queue in expiry order (one TTL per queue; requeued ones go back to
    /// the front with an earlier expiry), so the expired ones are at the
    /// head: the sweep costs what it expires, never a scan of the backlog
    /// (one out of order is expired when it reaches the head, as in
    /// RabbitMQ).
    pub fn expire(&self, now_ms: u64) -> DeadLetters {
        if self.options.ttl_ms.is_none() {
            return Vec::new();
        }
        let mut st = self.lock();
        let mut dead = Vec::new();
        while let Some(&r) = st.ready.front() {
            if r.expires_at == 0 || r.expires_at > now_ms {
                break;
            }
            st.ready.pop_front();
            st.bytes -= u64::from(r.size);
            dead.push((r, "expired"));
        }
        dead
    }

    /// Settle deliveries of `consumer` in the inclusive tag `ranges`:
    /// remove them from unacked and return their references. A range is
    /// resolved against the tags the consumer holds (at most its prefetch),
    /// so a huge range costs no more than a small one; tags it does not
    /// hold are ignored.
    fn settle(&self, st: &mut QueueState, consumer: u64, ranges: &[(u64, u64)]) -> Vec<MsgRef> {
        let Some(c) = st.consumers.iter_mut().find(|c| c.id == consumer) else {
            return Vec::new();
        };
        let mut tags = Vec::new();
        for &(a, b) in ranges {
            if a <= b {
                tags.extend(c.held.range(a..=b).copied());
            }
        }
        for t in &tags {
            c.held.remove(t);
        }
        let mut refs = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some((_, r)) = st.unacked.remove(&tag) {
                refs.push(r);
            }
        }
        let bytes: u64 = refs.iter().map(|r| u64::from(r.size)).sum();
        if let Some(c) = st.consumers.iter_mut().find(|c| c.id == consumer) {
            c.credit += refs.len() as u32;
            c.held_bytes = c.held_bytes.saturating_sub(bytes);
        }
        refs
    }

    /// Ack: returns the ids to delete from the store.
    pub fn ack(&self, consumer: u64, ranges: &[(u64, u64)]) -> Vec<MsgId> {
        let mut st = self.lock();
        let refs = self.settle(&mut st, consumer, ranges);
        st.bytes -= refs.iter().map(|r| u64::from(r.size)).sum::<u64>();
        self.counters.acked.fetch_add(refs.len() as u64, Relaxed);
        refs.into_iter().map(|r| r.id).collect()
    }

    /// Nack: requeue at the front (or dead-letter past the delivery limit).
    pub fn nack(&self, consumer: u64, ranges: &[(u64, u64)]) -> DeadLetters {
        let mut st = self.lock();
        let refs = self.settle(&mut st, consumer, ranges);
        self.requeue(&mut st, refs)
    }

    /// Reject: dead-letter.
    pub fn reject(&self, consumer: u64, ranges: &[(u64, u64)]) -> DeadLetters {
        let mut st = self.lock();
        let refs = self.settle(&mut st, consumer, ranges);
        st.bytes -= refs.iter().map(|r| u64::from(r.size)).sum::<u64>();
        refs.into_iter().map(|r| (r, "rejected")).collect()
    }

    fn requeue(&self, st: &mut QueueState, mut refs: Vec<MsgRef>) -> DeadLetters {
        let mut dead = Vec::new();
        refs.sort_by_key(|r| r.id);
        for r in refs.into_iter().rev() {
            if self
                .options
                .delivery_limit
                .is_some_and(|l| r.deliveries >= l)
            {
                st.bytes -= u64::from(r.size);
                dead.push((r, "delivery-limit"));
            } else {
                st.ready.push_front(r);
            }
        }
        dead
    }

    /// Add a consumer with `prefetch` credit that holds at most `max_bytes`
    /// stored bytes unacked (always at least one message).
    pub fn add_consumer(
        &self,
        id: u64,
        prefetch: u32,
        max_bytes: u64,
        tx: mpsc::UnboundedSender<Vec<MsgRef>>,
    ) {
        self.lock().consumers.push(Consumer {
            id,
            credit: prefetch.max(1),
            held: BTreeSet::new(),
            held_bytes: 0,
            max_bytes,
            tx,
        });
    }

    /// Remove a consumer; its unacked messages are requeued as redelivered.
    pub fn remove_consumer(&self, id: u64) -> DeadLetters {
        let mut st = self.lock();
        let Some(i) = st.consumers.iter().position(|c| c.id == id) else {
            return Vec::new();
        };
        let c = st.consumers.remove(i);
        let refs: Vec<MsgRef> = c
            .held
            .iter()
            .filter_map(|t| st.unacked.remove(t))
            .map(|(_, r)| r)
            .collect();
        self.requeue(&mut st, refs)
    }

    /// Put messages that could not leave the queue back at its front (a
    /// dead-lettering that failed to store), so none is orphaned.
    pub fn restore(&self, mut refs: Vec<MsgRef>) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        refs.sort_by_key(|r| r.id);
        for r in refs.into_iter().rev() {
            st.bytes += u64::from(r.size);
            st.ready.push_front(r);
        }
    }

    /// Drop every ready message; returns their ids.
    pub fn purge(&self) -> Vec<MsgId> {
        let mut st = self.lock();
        let ids: Vec<MsgId> = st.ready.drain(..).map(|r| r.id).collect();
        st.bytes = st.unacked.values().map(|(_, r)| u64::from(r.size)).sum();
        ids
    }
}
