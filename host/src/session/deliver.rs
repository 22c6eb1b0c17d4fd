//! One task per subscription: load its deliveries within the connection's
//! budget, write them to its stream, and apply its settles.

use sluice_client::FrameSink;
use sluice_proto::{self as proto, Frame};
use tokio::sync::mpsc;

use super::{
    DeliveryBudget, Held, MAX_DELIVER_FRAME_BYTES, MAX_DELIVERIES_PER_FRAME, Ranges, SETTLE_RANGES,
    SubCmd,
};
use crate::broker::{BrokerError, LOAD_BYTES, SessionPeakCounters, Subscription};

/// Push a subscription's deliveries on its own stream and apply acks.
/// Deliveries are loaded from the store only with the connection's
/// delivery budget in hand (at most [`LOAD_BYTES`] per batch), so a
/// connection whose client reads nothing holds at most [`DELIVERY_BUDGET`]
/// bytes of loaded payloads, whatever its prefetch and subscriptions
/// (what it holds is counted in `budget.loaded`, with the broker's peaks).
pub(super) async fn deliver(
    id: u64,
    mut sub: Subscription,
    mut stream: impl FrameSink,
    mut cmds: mpsc::Receiver<SubCmd>,
    budget: DeliveryBudget,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    proto::encode(&Frame::StreamStart { sub: id }, &mut buf);
    if !stream.write_all(&buf).await {
        return;
    }
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(first) = cmd else { break };
                settle(&sub, first, &mut cmds);
            }
            ready = sub.wait() => {
                if !ready {
                    break;
                }
                let Ok(_permit) = budget.permits.clone().acquire_many_owned(LOAD_BYTES as u32).await else {
                    break;
                };
                let batch = sub.load(LOAD_BYTES);
                if batch.is_empty() {
                    continue;
                }
                // Held until the batch is written to the stream.
                let loaded: u64 = batch.iter().map(|d| loaded_size(d) as u64).sum();
                SessionPeakCounters::note(&budget.peaks.delivery_batch_bytes, loaded);
                let _loaded = Held::new(&budget.loaded, loaded, &budget.peaks.delivery_loaded_bytes);
                buf.clear();
                // Cut frames by count and by bytes so that no Deliver frame
                // exceeds the decoder's frame limit, whatever the sizes.
                let mut frame: Vec<proto::Delivery> = Vec::new();
                let mut bytes = 0usize;
                for d in batch {
                    let size = d.payload.len() + d.topic.len() + d.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>() + 64;
                    if !frame.is_empty() && (frame.len() >= MAX_DELIVERIES_PER_FRAME || bytes + size > MAX_DELIVER_FRAME_BYTES) {
                        proto::encode(&Frame::Deliver { sub: id, deliveries: std::mem::take(&mut frame) }, &mut buf);
                        bytes = 0;
                    }
                    bytes += size;
                    frame.push(proto::Delivery {
                        tag: d.tag,
                        topic: d.topic,
                        headers: d.headers,
                        payload: d.payload,
                        redelivered: d.redelivered,
                    });
                }
                if !frame.is_empty() {
                    proto::encode(&Frame::Deliver { sub: id, deliveries: frame }, &mut buf);
                }
                if !stream.write_all(&buf).await {
                    break;
                }
            }
        }
    }
    stream.finish();
    // Dropping `sub` requeues whatever it still holds.
}

/// Apply `first` and every settle command already queued behind it:
/// consecutive acks become one store removal and one dispatch.
fn settle(sub: &Subscription, first: SubCmd, cmds: &mut mpsc::Receiver<SubCmd>) {
    let mut acks: Ranges = Vec::new();
    let mut next = Some(first);
    while let Some(cmd) = next {
        match cmd {
            SubCmd::Ack(r) => {
                acks.extend(r);
                if acks.len() >= SETTLE_RANGES {
                    sub.ack_ranges(&std::mem::take(&mut acks));
                }
            }
            other => {
                if !acks.is_empty() {
                    sub.ack_ranges(&std::mem::take(&mut acks));
                }
                match other {
                    SubCmd::Nack(r) => sub.nack_ranges(&r),
                    SubCmd::Reject(r) => sub.reject_ranges(&r),
                    SubCmd::Sync(reply) => {
                        let commit = sub.sync();
                        tokio::spawn(async move {
                            let _ = reply.send(commit.await.map_err(BrokerError::from));
                        });
                    }
                    SubCmd::Ack(_) => {}
                }
            }
        }
        next = cmds.try_recv().ok();
    }
    if !acks.is_empty() {
        sub.ack_ranges(&acks);
    }
}

/// Bytes of a loaded delivery in memory: topic, header names and values,
/// payload.
fn loaded_size(d: &crate::broker::Delivery) -> usize {
    d.topic.len()
        + d.payload.len()
        + d.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}
