//! One client connection: the control stream, pipelined publishes with
//! ordered confirms, and one delivery stream per subscription.
//!
//! # What a connection can make the broker hold
//!
//! Every buffer between the client and the broker is bounded, so a client
//! that floods, or never reads, is slowed down by QUIC flow control instead
//! of growing the broker's memory:
//!
//! - publishes: at most [`PUBLISH_BUDGET`] bytes received and not yet
//!   answered (routed, committed, confirm handed to the writer); at the
//!   budget the session stops reading the control stream;
//! - frames to the client: [`OUT_FRAMES`] queued for the control stream; a
//!   client that does not read its confirms and responses stops being read;
//! - deliveries: `prefetch` per subscription, [`proto::MAX_SUBSCRIPTIONS`]
//!   subscriptions per connection, each stream written only as fast as the
//!   client reads it;
//! - settles: [`SUB_COMMANDS`] ack/nack/reject frames queued per subscription;
//! - streams: the client may open one bidirectional stream (the control
//!   stream) and no unidirectional ones (`tls::server_config`).
//!
//! # Where things are
//!
//! - this module: admission, the read loop and frame dispatch;
//! - [`control`]: requests (declare, bind, plugins, ...), settles, `SyncAcks`;
//! - [`publish`]: the publish pipeline and its confirms;
//! - [`deliver`]: one task per subscription writing its deliveries;
//! - [`loopback`]: the same session over memory instead of QUIC (fuzzing).
//!
//! Data flows one way: the session calls the broker; the broker never
//! calls back into a session (it hands deliveries over a channel).

mod control;
mod deliver;
pub mod loopback;
mod publish;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use sluice_proto::{self as proto, Decoder, ErrorBody, ErrorCode, Frame, Limits};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use sluice_client::FrameSink;

use crate::broker::{Broker, BrokerError, Publish, SessionPeakCounters};
use crate::plugins::{Action, Principal, Resource};
use crate::tls::{IdentityMapping, peer_identity};
use publish::{PublishBatch, publish_size, publisher};

/// Close codes.
const CLOSE_IDENTITY: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
const CLOSE_ADMIN: u32 = 3;

/// Publish bytes of one connection received and not yet answered.
const PUBLISH_BUDGET: usize = 8 << 20;
/// What a publish counts against the budget beyond its topic, headers and
/// payload: the broker's own bookkeeping per message (so a flood of empty
/// publishes is bounded too: at most 8 MiB / 256 B = 32 768 queued).
const PUBLISH_OVERHEAD: usize = 256;
/// Stored bytes of deliveries one connection loads and writes at once,
/// across its subscriptions (each batch at most [`LOAD_BYTES`]).
const DELIVERY_BUDGET: u64 = 8 << 20;
/// `SyncAcks` requests of one connection waiting for their fsync.
const PENDING_SYNCS: usize = 64;
/// Ranges merged into one settle of a subscription.
const SETTLE_RANGES: usize = 8192;
/// Frames queued for the control stream.
const OUT_FRAMES: usize = 64;
/// Publish batches of one connection routed and committing at once.
const PIPELINE_DEPTH: usize = 4;
/// Settle commands queued per subscription.
const SUB_COMMANDS: usize = 256;
/// How long a client may take to accept a new delivery stream.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Deliveries per `Deliver` frame at most.
const MAX_DELIVERIES_PER_FRAME: usize = 256;
/// Bytes per `Deliver` frame at most (well under the 4 MiB frame limit; a
/// single message of up to 1 MiB plus headers always fits on its own).
const MAX_DELIVER_FRAME_BYTES: usize = 2 << 20;

/// What a session needs of its connection: delivery streams it opens.
/// QUIC in production ([`quinn::Connection`]), memory in [`loopback`].
pub(crate) trait Link: Send + Sync + 'static {
    /// A server-opened stream carrying one subscription's deliveries.
    type Stream: FrameSink;
    /// Open a delivery stream.
    fn open_stream(&self) -> impl Future<Output = Result<Self::Stream, String>> + Send;
}

impl Link for quinn::Connection {
    type Stream = quinn::SendStream;
    async fn open_stream(&self) -> Result<quinn::SendStream, String> {
        self.open_uni().await.map_err(|e| e.to_string())
    }
}

/// The client's bytes on the control stream, as received chunks.
pub(crate) trait ChunkSource: Send {
    /// Fill `out` with received chunks; how many, or `None` at the end.
    fn chunks(
        &mut self,
        out: &mut [bytes::Bytes],
    ) -> impl Future<Output = Result<Option<usize>, ()>> + Send;
}

impl ChunkSource for quinn::RecvStream {
    async fn chunks(&mut self, out: &mut [bytes::Bytes]) -> Result<Option<usize>, ()> {
        self.read_chunks(out).await.map_err(|_| ())
    }
}

/// Refuse a client of a cluster node that does not lead: `not_leader`,
/// naming the leader's client address when it is known, so the client
/// reconnects there.
pub(crate) async fn refuse_not_leader(conn: quinn::Connection, leader: Option<String>) {
    refuse(
        &conn,
        BrokerError::Store(crate::store::StoreError::NotLeader { leader }),
    )
    .await;
}

/// Refuse a connection whose certificate was accepted: answer its first
/// stream with an error frame so the client reports the reason, then close.
async fn refuse(conn: &quinn::Connection, e: BrokerError) {
    let body = error_body(&e);
    if let Ok(Ok((mut send, _recv))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), conn.accept_bi()).await
    {
        let _ = send
            .write_all(&proto::encode_frame(&Frame::Error(body.clone())))
            .await;
        let _ = send.finish();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    conn.close(CLOSE_IDENTITY.into(), body.message.as_bytes());
}

/// Map a broker error to its wire form (the one place this happens).
pub(crate) fn error_body(e: &BrokerError) -> ErrorBody {
    let code = match e {
        BrokerError::Unauthorized(_) => ErrorCode::Unauthorized,
        BrokerError::Invalid { .. } => ErrorCode::Invalid,
        BrokerError::NotFound { .. } => ErrorCode::NotFound,
        BrokerError::Conflict(_) => ErrorCode::Conflict,
        BrokerError::NoRoute(_) => ErrorCode::NoRoute,
        BrokerError::QueueFull(_) => ErrorCode::QueueFull,
        BrokerError::Limit(_) => ErrorCode::LimitExceeded,
        BrokerError::Quota(_) => ErrorCode::QuotaExceeded,
        BrokerError::PluginLoad(crate::plugins::LoadError::Capacity(_)) => ErrorCode::LimitExceeded,
        BrokerError::Router(_) | BrokerError::PluginLoad(_) => ErrorCode::PluginFailed,
        BrokerError::Store(crate::store::StoreError::NotLeader { leader }) => {
            return ErrorBody::not_leader(leader.as_deref());
        }
        BrokerError::Store(_) => ErrorCode::Storage,
        BrokerError::ShuttingDown => ErrorCode::ShuttingDown,
    };
    ErrorBody::new(code, e.to_string())
}

/// A frame for the control stream. It holds the publish budget of the
/// publishes it answers until the writer has written it, so publishes count
/// against the budget until their confirms are in the client's window.
struct Outgoing {
    frame: Frame,
    budget: Option<OwnedSemaphorePermit>,
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Outgoing {
            frame,
            budget: None,
        }
    }
}

/// The control stream's queue, as the shared frame writer drains it; the
/// budget of frames taken is released once they are written.
struct Outbox {
    rx: mpsc::Receiver<Outgoing>,
    taken: Vec<OwnedSemaphorePermit>,
}

impl Outbox {
    fn take(&mut self, o: Outgoing) -> Frame {
        self.taken.extend(o.budget);
        o.frame
    }
}

impl sluice_client::FrameSource for Outbox {
    async fn next(&mut self) -> Option<Frame> {
        let o = self.rx.recv().await?;
        Some(self.take(o))
    }
    fn ready(&mut self) -> Option<Frame> {
        let o = self.rx.try_recv().ok()?;
        Some(self.take(o))
    }
    fn written(&mut self) {
        self.taken.clear();
    }
}

/// Inclusive delivery-tag ranges, as they came on the wire (never expanded).
type Ranges = Vec<(u64, u64)>;

enum SubCmd {
    Ack(Ranges),
    Nack(Ranges),
    Reject(Ranges),
    /// Answer once every settle queued before it is applied and fsynced.
    Sync(oneshot::Sender<Result<(), BrokerError>>),
}

/// A subscription as its session sees it.
struct SubHandle {
    cmds: mpsc::Sender<SubCmd>,
    prefetch: u32,
}

/// Frames (or commands) queued in `tx` right now.
fn queued<T>(tx: &mpsc::Sender<T>) -> u64 {
    (tx.max_capacity() - tx.capacity()) as u64
}

/// `n` of something a connection holds (counted in `now`) until dropped;
/// raises the broker's high-water `mark` on the way.
struct Held {
    now: Arc<AtomicU64>,
    n: u64,
}

impl Held {
    fn new(now: &Arc<AtomicU64>, n: u64, mark: &AtomicU64) -> Held {
        let total = now.fetch_add(n, Relaxed) + n;
        SessionPeakCounters::note(mark, total);
        Held {
            now: now.clone(),
            n,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.now.fetch_sub(self.n, Relaxed);
    }
}

/// What the delivery tasks of one connection share: the budget of bytes
/// they may load ([`DELIVERY_BUDGET`]) and what they hold loaded.
#[derive(Clone)]
struct DeliveryBudget {
    permits: Arc<Semaphore>,
    loaded: Arc<AtomicU64>,
    peaks: Arc<SessionPeakCounters>,
}

/// Run a session until the connection ends.
pub(crate) async fn run(conn: quinn::Connection, broker: Broker, mapping: &IdentityMapping) {
    let who = match peer_identity(&conn, mapping) {
        Ok(p) => p,
        Err(e) => {
            // Anyone reaching the port causes this: not above debug.
            tracing::debug!(error = %e, "refusing connection");
            conn.close(CLOSE_IDENTITY.into(), e.to_string().as_bytes());
            return;
        }
    };
    // The authorizer may run a plugin: off the async workers, within the
    // tenant's share of control requests and of plugin calls.
    let (b, w) = (broker.clone(), who.clone());
    let allowed = broker
        .offload_request(&who, &who.tenant, crate::broker::Work::Request, move || {
            b.authorize(&w, &w.tenant, Action::Connect, &Resource::Broker)
        })
        .await
        .and_then(|r| r);
    if let Err(e) = allowed {
        conn.close(CLOSE_IDENTITY.into(), e.to_string().as_bytes());
        return;
    }
    let closer: crate::broker::Closer = {
        let conn = conn.clone();
        std::sync::Arc::new(move |reason: &str| conn.close(CLOSE_ADMIN.into(), reason.as_bytes()))
    };
    let _admitted = match broker.admit(
        &who,
        crate::tls::peer_serial(&conn).unwrap_or_default(),
        closer,
    ) {
        Ok(a) => a,
        Err(e) => {
            refuse(&conn, e).await;
            return;
        }
    };
    let (send, recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(_) => return,
    };
    if let Err(e) = serve(conn.clone(), broker, who, send, recv).await {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        conn.close(CLOSE_PROTOCOL.into(), e.message.as_bytes());
    }
}

/// Serve an admitted client's control stream (`send`, `recv`) until it
/// ends; an error is reported to the client (best effort) and returned so
/// that the caller closes the connection.
pub(crate) async fn serve<L: Link>(
    link: L,
    broker: Broker,
    who: Principal,
    send: impl FrameSink,
    recv: impl ChunkSource,
) -> Result<(), ErrorBody> {
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUT_FRAMES);
    let outbox = Outbox {
        rx: out_rx,
        taken: Vec::new(),
    };
    tokio::spawn(sluice_client::frame_writer(send, outbox));
    let peaks = broker.session_peak_counters().clone();
    let mut session = Session {
        link,
        broker,
        who,
        out: out_tx,
        subs: HashMap::new(),
        next_sub: 1,
        publishes: None,
        budget: Arc::new(Semaphore::new(PUBLISH_BUDGET)),
        delivery_budget: DeliveryBudget {
            permits: Arc::new(Semaphore::new(DELIVERY_BUDGET as usize)),
            loaded: Arc::default(),
            peaks: peaks.clone(),
        },
        syncs: Arc::new(Semaphore::new(PENDING_SYNCS)),
        syncs_waiting: Arc::default(),
        peaks,
        welcomed: false,
    };
    let result = session.read_loop(recv).await;
    if let Err(e) = &result {
        // Best effort: a client that reads nothing does not get it.
        let _ = session.out.try_send(Frame::Error(e.clone()).into());
        // A tenant's clients cause this line: within its log limit.
        let who = &session.who;
        session.broker.log_limited(&who.tenant, || {
            tracing::info!(tenant = %who.tenant, client = %who.client, error = %e, "closing session")
        });
    }
    result
}

struct Session<L: Link> {
    link: L,
    broker: Broker,
    who: Principal,
    out: mpsc::Sender<Outgoing>,
    subs: HashMap<u64, SubHandle>,
    next_sub: u64,
    publishes: Option<mpsc::UnboundedSender<PublishBatch>>,
    /// Bytes of publishes this connection may have unanswered.
    budget: Arc<Semaphore>,
    /// Stored bytes of deliveries being loaded and written.
    delivery_budget: DeliveryBudget,
    /// `SyncAcks` waiting for their commit.
    syncs: Arc<Semaphore>,
    /// How many `SyncAcks` wait (what `syncs` bounds).
    syncs_waiting: Arc<AtomicU64>,
    /// The broker's high-water marks of session buffers.
    peaks: Arc<SessionPeakCounters>,
    welcomed: bool,
}

impl<L: Link> Session<L> {
    async fn read_loop(&mut self, mut recv: impl ChunkSource) -> Result<(), ErrorBody> {
        let mut decoder = Decoder::new(Limits::default());
        let (ptx, prx) = mpsc::unbounded_channel::<PublishBatch>();
        tokio::spawn(publisher(
            prx,
            self.broker.clone(),
            self.who.clone(),
            self.out.clone(),
        ));
        self.publishes = Some(ptx);
        // quinn's own received chunks, as many as are there at once: no read
        // buffer per connection (a 64 KiB one was most of an idle
        // connection's memory), and still large batches under load.
        let mut chunks: [bytes::Bytes; 64] = std::array::from_fn(|_| bytes::Bytes::new());
        loop {
            let n = match recv.chunks(&mut chunks).await {
                Ok(Some(n)) => n,
                Ok(None) => {
                    return decoder
                        .finish()
                        .map_err(|e| ErrorBody::new(e.code(), e.to_string()));
                }
                Err(_) => return Ok(()),
            };
            for chunk in &mut chunks[..n] {
                decoder.push(chunk);
                *chunk = bytes::Bytes::new();
            }
            let mut publishes: Vec<(u64, Option<String>, Publish)> = Vec::new();
            loop {
                let frame = match decoder.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        self.flush_publishes(std::mem::take(&mut publishes)).await;
                        return Err(ErrorBody::new(e.code(), e.to_string()));
                    }
                };
                if let Frame::Publish {
                    seq,
                    tenant,
                    topic,
                    headers,
                    payload,
                } = frame
                {
                    if !self.welcomed {
                        return Err(ErrorBody::new(ErrorCode::Protocol, "publish before hello"));
                    }
                    publishes.push((
                        seq,
                        tenant,
                        Publish {
                            topic,
                            headers,
                            payload,
                        },
                    ));
                    continue;
                }
                self.flush_publishes(std::mem::take(&mut publishes)).await;
                self.handle(frame).await?;
            }
            self.flush_publishes(publishes).await;
        }
    }

    /// Hand a batch of publishes to the broker; confirms go out in order.
    /// Waits (and so stops reading the stream) while the connection's
    /// publish budget is spent.
    async fn flush_publishes(&mut self, batch: Vec<(u64, Option<String>, Publish)>) {
        if batch.is_empty() {
            return;
        }
        // Group consecutive publishes for the same tenant into one broker call.
        let mut groups: Vec<(Option<String>, Vec<u64>, Vec<Publish>)> = Vec::new();
        for (seq, tenant, p) in batch {
            match groups.last_mut() {
                Some((t, seqs, ps)) if *t == tenant => {
                    seqs.push(seq);
                    ps.push(p);
                }
                _ => groups.push((tenant, vec![seq], vec![p])),
            }
        }
        for (tenant, seqs, msgs) in groups {
            let bytes: usize = msgs
                .iter()
                .map(|p| publish_size(p) + PUBLISH_OVERHEAD)
                .sum();
            let permits = bytes.clamp(1, PUBLISH_BUDGET) as u32;
            let Ok(budget) = self.budget.clone().acquire_many_owned(permits).await else {
                return;
            };
            if let Some(p) = &self.publishes {
                let _ = p.send(PublishBatch {
                    tenant,
                    seqs,
                    msgs,
                    budget,
                });
            }
        }
    }

    /// Queue a frame for the control stream (waits while the queue is full).
    async fn send(&self, frame: Frame) {
        let _ = self.out.send(frame.into()).await;
        SessionPeakCounters::note(&self.peaks.out_frames, queued(&self.out));
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), ErrorBody> {
        match frame {
            Frame::Hello {
                min_version,
                max_version,
                ..
            } => {
                let version = proto::negotiate(min_version, max_version)?;
                self.welcomed = true;
                self.send(Frame::Welcome {
                    version,
                    tenant: self.who.tenant.clone(),
                    client: self.who.client.clone(),
                    admin: self.who.admin,
                    max_message: self.broker.config().max_message_bytes as u32,
                })
                .await;
                Ok(())
            }
            _ if !self.welcomed => Err(ErrorBody::new(
                ErrorCode::Protocol,
                "the first frame must be hello",
            )),
            Frame::Request {
                id,
                body: proto::Request::SyncAcks { sub },
                ..
            } => {
                self.sync_acks(id, sub).await;
                Ok(())
            }
            Frame::Request { id, tenant, body } => {
                let result = self
                    .request(tenant.as_deref(), body)
                    .await
                    .map_err(|e| error_body(&e));
                self.send(Frame::Response { id, body: result }).await;
                Ok(())
            }
            Frame::Ack { sub, ranges } => self.settle(sub, ranges, SubCmd::Ack).await,
            Frame::Nack { sub, ranges } => self.settle(sub, ranges, SubCmd::Nack).await,
            Frame::Reject { sub, ranges } => self.settle(sub, ranges, SubCmd::Reject).await,
            Frame::Cancel { sub } => {
                self.subs.remove(&sub);
                Ok(())
            }
            other => Err(ErrorBody::new(
                ErrorCode::Protocol,
                format!("unexpected frame from a client: {}", frame_name(&other)),
            )),
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Welcome { .. } => "welcome",
        Frame::Response { .. } => "response",
        Frame::Confirm { .. } => "confirm",
        Frame::Refused { .. } => "refused",
        Frame::StreamStart { .. } => "stream-start",
        Frame::Deliver { .. } => "deliver",
        Frame::Error(_) => "error",
        _ => "frame",
    }
}
