//! The broker's store on a cluster's leader: reads are local, writes go
//! through the data group.
//!
//! [`ReplicatedStore`] is a [`MessageStore`], so the broker runs on it
//! unchanged. Every write becomes a [`StoreOp`] queued to one proposer
//! task, which packs whatever is waiting (up to [`BATCH_BYTES`]) into one
//! log entry and proposes it, keeping submission order; the entry's
//! waiters are answered once a quorum has it in its log (fsynced) and the
//! leader applied it to its local store, so a message is readable here
//! before its publisher is confirmed. A write that fails (leadership lost,
//! the group stopped) fails every later one too: the node drops the broker
//! and clients reconnect to the new leader.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::data::{DataGroup, DataState, StoreBatch, StoreOp};
use crate::store::{Append, Commit, MessageStore, MsgId, QueueId, Store, StoreError};

/// The data group's Raft on one node.
pub type DataRaft = Raft<DataGroup, DataState>;

/// Ops packed into one log entry until it holds this many bytes (one op
/// larger than that goes alone).
pub const BATCH_BYTES: usize = 1 << 20;
/// Largest op (a plugin component, a fan-out publish): larger ones are
/// refused before anything is proposed, so that no log entry is too large
/// to replicate (see [`super::net::MAX_MESSAGE`]).
pub const MAX_OP_BYTES: usize = 72 << 20;
/// Log entries proposed and not yet applied, at most.
const IN_FLIGHT: usize = 64;

/// Upper bounds of the proposal-latency histogram's buckets, in
/// microseconds (the last bucket, +Inf, is implied).
pub const PROPOSAL_BUCKETS_US: [u64; 12] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

/// How long this node's proposals took, from proposing an entry to its
/// commit and apply here (a Prometheus histogram: counts per bucket,
/// cumulative when shown).
#[derive(Debug, Default)]
pub struct ProposalTimes {
    buckets: [AtomicU64; PROPOSAL_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl ProposalTimes {
    fn record(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let at = PROPOSAL_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(PROPOSAL_BUCKETS_US.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total) and the sum of
    /// every proposal's time, in microseconds.
    pub fn read(&self) -> (Vec<u64>, u64) {
        let mut total = 0;
        let counts = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        (counts, self.sum_us.load(Ordering::Relaxed))
    }
}

/// How a write's caller is answered.
enum Done {
    Nothing,
    Async(oneshot::Sender<Result<(), StoreError>>),
    Blocking(std::sync::mpsc::SyncSender<Result<(), StoreError>>),
}

impl Done {
    fn send(self, r: Result<(), StoreError>) {
        match self {
            Done::Nothing => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "a replicated write failed");
                }
            }
            Done::Async(tx) => {
                let _ = tx.send(r);
            }
            Done::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// A write waiting for the proposer (no op: a barrier).
struct Waiting {
    op: Option<StoreOp>,
    done: Done,
}

/// The broker's store on the leader of the data group.
pub struct ReplicatedStore {
    local: Arc<Store>,
    tx: mpsc::UnboundedSender<Waiting>,
    next_queue_id: AtomicU64,
    failed: Arc<Mutex<Option<StoreError>>>,
}

impl ReplicatedStore {
    /// The store of the leader `raft`, whose state is `state`.
    /// The store is bound to the term `raft` leads now: once the node is
    /// not the leader of that term, no write is proposed (were it elected
    /// again, a broker of the new term owns its writes). Needs a tokio
    /// runtime.
    pub fn new(
        raft: DataRaft,
        state: &DataState,
        times: Arc<ProposalTimes>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(None));
        let term = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            Term {
                node: m.id,
                term: m.current_term,
            }
        };
        if let Some(e) = term.lost(&raft) {
            return Err(std::io::Error::other(e.to_string()));
        }
        tokio::spawn(propose(raft, term, rx, failed.clone(), times));
        Ok(Self {
            local: state.store().clone(),
            tx,
            next_queue_id: AtomicU64::new(state.next_queue_id()?),
            failed,
        })
    }

    /// Refuse every later write with `e` (the node stopped leading).
    pub fn stop(&self, e: StoreError) {
        fail(&self.failed, e);
    }

    fn failure(&self) -> Option<StoreError> {
        match self.failed.lock() {
            Ok(f) => f.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Queue `op` (or a barrier) for the proposer.
    fn submit(&self, op: Option<StoreOp>, done: Done) {
        if let Some(e) = self.failure() {
            return done.send(Err(e));
        }
        if let Some(op) = &op
            && op.size() > MAX_OP_BYTES
        {
            return done.send(Err(StoreError::TooLarge {
                len: op.size(),
                max: MAX_OP_BYTES,
            }));
        }
        if let Err(mpsc::error::SendError(w)) = self.tx.send(Waiting { op, done }) {
            w.done.send(Err(StoreError::Closed));
        }
    }

    /// Queue `op` and return at once (its failure fails later writes).
    fn write(&self, op: StoreOp) -> Result<(), StoreError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let size = op.size();
        if size > MAX_OP_BYTES {
            return Err(StoreError::TooLarge {
                len: size,
                max: MAX_OP_BYTES,
            });
        }
        self.submit(Some(op), Done::Nothing);
        Ok(())
    }

    /// Wait until every write queued so far is applied. The proposer runs
    /// on the async workers, so a caller on one of them (the broker admits
    /// a connection there, and saves a new tenant) hands its worker over
    /// while it waits instead of blocking it: with every worker waiting,
    /// nothing would ever be proposed.
    fn barrier(&self) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(None, Done::Blocking(tx));
        let wait = move || rx.recv().unwrap_or(Err(StoreError::Closed));
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }
}

/// The term a store was opened in, and its node.
#[derive(Clone, Copy)]
struct Term {
    node: u64,
    term: u64,
}

/// Whether `node`'s `raft` leads `term` now.
pub(super) fn leads(raft: &DataRaft, node: u64, term: u64) -> bool {
    let m = raft.metrics();
    let m = m.borrow_watched();
    m.current_term == term && leader_of(&m) == Some(node)
}

/// The leader `m`'s node knows: not itself once it stepped down (a leader
/// removed from the membership becomes a learner still naming itself the
/// leader of its term).
pub(super) fn leader_of(m: &openraft::RaftMetrics<DataGroup>) -> Option<u64> {
    m.current_leader
        .filter(|n| *n != m.id || m.state == openraft::ServerState::Leader)
}

/// The client address of member `node` as the membership `raft` knows
/// records it (`None`: not a member).
pub(super) fn client_of(raft: &DataRaft, node: u64) -> Option<String> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    m.membership_config
        .membership()
        .get_node(&node)
        .map(|p| p.client.clone())
}

impl Term {
    /// Why `raft` no longer leads this term, if it does not.
    fn lost(&self, raft: &DataRaft) -> Option<StoreError> {
        if leads(raft, self.node, self.term) {
            return None;
        }
        let leader = leader_of(&raft.metrics().borrow_watched());
        Some(StoreError::NotLeader {
            leader: leader
                .filter(|l| *l != self.node)
                .and_then(|l| client_of(raft, l)),
        })
    }
}

/// Record the first failure; every later write gets it.
fn fail(failed: &Mutex<Option<StoreError>>, e: StoreError) {
    let mut f = match failed.lock() {
        Ok(f) => f,
        Err(p) => p.into_inner(),
    };
    if f.is_none() {
        tracing::warn!(error = %e, "replicated writes stop on this node");
        *f = Some(e);
    }
}

/// Pack waiting writes into log entries and propose them, in order.
async fn propose(
    raft: DataRaft,
    term: Term,
    mut rx: mpsc::UnboundedReceiver<Waiting>,
    failed: Arc<Mutex<Option<StoreError>>>,
    times: Arc<ProposalTimes>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut next: Option<Waiting> = None;
    loop {
        let first = match next.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut bytes = first.op.as_ref().map_or(0, StoreOp::size);
        let mut waiting = vec![first];
        while bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(w) => {
                    let size = w.op.as_ref().map_or(0, StoreOp::size);
                    if bytes + size > BATCH_BYTES && size > 0 {
                        next = Some(w);
                        break;
                    }
                    bytes += size;
                    waiting.push(w);
                }
                Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = StoreBatch::default();
        let mut dones = Vec::with_capacity(waiting.len());
        for w in waiting {
            if let Some(op) = w.op {
                batch.ops.push(op);
            }
            dones.push(w.done);
        }
        // Checked before each proposal: once this term is over, nothing
        // more is proposed (an entry already proposed commits or not).
        let stopped = match failed.lock() {
            Ok(f) => f.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if let Some(e) = stopped.or_else(|| term.lost(&raft)) {
            drop(slot);
            fail(&failed, e.clone());
            for d in dones {
                d.send(Err(e.clone()));
            }
            continue;
        }
        let (responder, answer) = openraft::impls::ProgressResponder::complete_only();
        let started = std::time::Instant::now();
        let proposed = raft.client_write_ff(batch, Some(responder)).await;
        let failed = failed.clone();
        let raft = raft.clone();
        let times = times.clone();
        tokio::spawn(async move {
            let result = match proposed {
                Err(fatal) => Err(StoreError::Replication(fatal.to_string())),
                Ok(()) => match answer.await {
                    Err(_) => Err(StoreError::Replication("the data group stopped".into())),
                    Ok(Ok(_)) => {
                        times.record(started.elapsed());
                        Ok(())
                    }
                    Ok(Err(e)) => Err(refusal(&RaftError::APIError(e), &raft)),
                },
            };
            drop(slot);
            if let Err(e) = &result {
                fail(&failed, e.clone());
            }
            for d in dones {
                d.send(result.clone());
            }
        });
    }
}

/// The store error for a refused write.
fn refusal(e: &RaftError<DataGroup, ClientWriteError<DataGroup>>, raft: &DataRaft) -> StoreError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => StoreError::NotLeader {
            leader: f.leader_id.and_then(|id| client_of(raft, id)),
        },
        e => StoreError::Replication(e.to_string()),
    }
}

impl MessageStore for ReplicatedStore {
    fn append(&self, items: Vec<Append>, durable: bool) -> Commit {
        let (tx, rx) = oneshot::channel();
        if items.is_empty() {
            // A barrier: acks before it are committed once it is.
            self.submit(None, Done::Async(tx));
            return Commit::pending(rx);
        }
        let max = self.local.max_value();
        if let Some(big) = items.iter().find(|i| i.value.len() > max) {
            return Commit::failed(StoreError::TooLarge {
                len: big.value.len(),
                max,
            });
        }
        let op = StoreOp::Append(
            items
                .into_iter()
                .map(|a| (a.queue, a.id, a.value))
                .collect(),
        );
        // Every publish is confirmed on quorum commit: `durable` or not, the
        // log holds it fsynced on a majority first.
        let _ = durable;
        self.submit(Some(op), Done::Async(tx));
        Commit::pending(rx)
    }

    fn remove(&self, queue: QueueId, ids: &[MsgId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(StoreOp::Remove {
            queue,
            ids: ids.to_vec(),
        })
    }

    fn get(&self, queue: QueueId, id: MsgId) -> Result<Option<Vec<u8>>, StoreError> {
        self.local.get(queue, id)
    }

    fn get_many(&self, queue: QueueId, ids: &[MsgId]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.local.get_many(queue, ids)
    }

    fn scan_queue(
        &self,
        queue: QueueId,
    ) -> Box<dyn Iterator<Item = Result<(MsgId, u32, u64), StoreError>> + '_> {
        self.local.scan_queue(queue)
    }

    fn clear_queue(&self, queue: QueueId) -> Result<u64, StoreError> {
        let live = self.local.scan_queue(queue).filter(Result::is_ok).count() as u64;
        self.write(StoreOp::ClearQueue { queue })?;
        self.barrier()?;
        Ok(live)
    }

    fn allocate_queue_id(&self) -> Result<QueueId, StoreError> {
        let id = self.next_queue_id.fetch_add(1, Ordering::SeqCst);
        self.write(StoreOp::QueueIds { next: id + 1 })?;
        Ok(id)
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(StoreOp::PutMeta {
            key: key.into(),
            value: value.to_vec(),
        })
    }

    fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.write(StoreOp::DeleteMeta { key: key.into() })
    }

    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.local.scan_meta(prefix)
    }

    fn put_blob(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(StoreOp::PutBlob {
            key: key.into(),
            value: value.to_vec(),
        })
    }

    fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.local.get_blob(key)
    }

    fn delete_blob(&self, key: &str) -> Result<(), StoreError> {
        self.write(StoreOp::DeleteBlob { key: key.into() })
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.barrier()
    }

    fn sync_meta(&self) -> Result<(), StoreError> {
        self.barrier()
    }
}
