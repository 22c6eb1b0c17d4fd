//! The publish pipeline of one connection: publishes are routed and
//! committed in order, confirms go out in order.

use sluice_proto::Frame;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Outgoing, PIPELINE_DEPTH, error_body};
use crate::broker::{Broker, BrokerError, Publish};
use crate::plugins::Principal;

/// Publishes of one tenant scope, in arrival order.
pub(super) struct PublishBatch {
    pub tenant: Option<String>,
    pub seqs: Vec<u64>,
    pub msgs: Vec<Publish>,
    pub budget: OwnedSemaphorePermit,
}

/// Run a connection's publishes in order, as a two-stage pipeline:
/// everything queued for the same tenant is routed and handed to the group
/// commit as one broker call ([`Broker::prepare_publish`]), and while that
/// commit runs the next batch is already routed; a second stage finishes
/// the commits strictly in order (messages made ready, confirms sent).
/// Ids are reserved and messages enqueued in publish order, so each
/// publisher's messages stay in order in every queue and confirms go out in
/// order; plugin time overlaps the fsync instead of adding to it.
pub(super) async fn publisher(
    mut rx: mpsc::UnboundedReceiver<PublishBatch>,
    broker: Broker,
    who: Principal,
    out: mpsc::Sender<Outgoing>,
) {
    let (pending_tx, pending_rx) = mpsc::channel(PIPELINE_DEPTH);
    tokio::spawn(confirmer(pending_rx, out));
    let mut next = None;
    loop {
        let Some(mut batch) = next.take().or(rx.recv().await) else {
            break;
        };
        while let Ok(more) = rx.try_recv() {
            if more.tenant == batch.tenant && batch.msgs.len() < 4096 {
                batch.seqs.extend(more.seqs);
                batch.msgs.extend(more.msgs);
                batch.budget.merge(more.budget);
            } else {
                next = Some(more);
                break;
            }
        }
        let pending = match broker.scope(&who, batch.tenant.as_deref()) {
            Ok(t) => Ok(broker.prepare_publish(&who, &t, batch.msgs).await),
            Err(e) => Err(batch.seqs.iter().map(|_| Err(e.clone())).collect()),
        };
        if pending_tx
            .send((batch.seqs, batch.budget, pending))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Batches of one connection routed and submitted, waiting for their commit.
type Pending = (
    Vec<u64>,
    OwnedSemaphorePermit,
    Result<crate::broker::PendingPublish, Vec<Result<u32, BrokerError>>>,
);

/// The second stage of [`publisher`]: finish each batch in order and queue
/// its confirms and refusals for the control stream.
async fn confirmer(mut rx: mpsc::Receiver<Pending>, out: mpsc::Sender<Outgoing>) {
    while let Some((seqs, budget, pending)) = rx.recv().await {
        let results = match pending {
            Ok(p) => p.finish().await,
            Err(refused) => refused,
        };
        let frames = answers(seqs.into_iter().zip(results));
        let last = frames.len().saturating_sub(1);
        let mut budget = Some(budget);
        for (i, frame) in frames.into_iter().enumerate() {
            let hold = if i == last { budget.take() } else { None };
            let outgoing = Outgoing {
                frame,
                budget: hold,
            };
            if out.send(outgoing).await.is_err() {
                return;
            }
        }
    }
}

/// Bytes a publish counts against the connection's budget.
pub(super) fn publish_size(p: &Publish) -> usize {
    p.topic.len()
        + p.payload.len()
        + p.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Confirm ranges and refusals, in publish order, for `results`.
fn answers(results: impl Iterator<Item = (u64, Result<u32, BrokerError>)>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut run: Option<(u64, Vec<u32>)> = None;
    for (seq, r) in results {
        match r {
            Ok(q) => match &mut run {
                Some((first, qs)) if *first + qs.len() as u64 == seq && qs.len() < 1024 => {
                    qs.push(q)
                }
                _ => {
                    if let Some((first, queues)) = run.take() {
                        frames.push(Frame::Confirm { first, queues });
                    }
                    run = Some((seq, vec![q]));
                }
            },
            Err(e) => {
                if let Some((first, queues)) = run.take() {
                    frames.push(Frame::Confirm { first, queues });
                }
                frames.push(Frame::Refused {
                    seq,
                    error: error_body(&e),
                });
            }
        }
    }
    if let Some((first, queues)) = run {
        frames.push(Frame::Confirm { first, queues });
    }
    frames
}
