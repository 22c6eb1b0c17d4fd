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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::{self as proto, Decoder, ErrorBody, ErrorCode, Frame, Limits};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::broker::{
    Broker, BrokerError, LOAD_BYTES, Overflow, Publish, QueueOptions, Subscription,
};
use crate::plugins::{Action, PluginKind, PluginState, Principal, Resource};
use crate::tls::{IdentityMapping, peer_identity};

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

/// Run a session until the connection ends.
pub(crate) async fn run(conn: quinn::Connection, broker: Broker, mapping: &IdentityMapping) {
    let who = match peer_identity(&conn, mapping) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "refusing connection");
            conn.close(CLOSE_IDENTITY.into(), e.to_string().as_bytes());
            return;
        }
    };
    // The authorizer may run a plugin: off the async workers, within the
    // tenant's share of control requests.
    let allowed = match broker.control_permit(&who.tenant).await {
        Ok(permit) => {
            let (b, w) = (broker.clone(), who.clone());
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                b.authorize(&w, &w.tenant, Action::Connect, &Resource::Broker)
            })
            .await
            .unwrap_or_else(|e| Err(BrokerError::Conflict(format!("connect check failed: {e}"))))
        }
        Err(e) => Err(e),
    };
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
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUT_FRAMES);
    let outbox = Outbox {
        rx: out_rx,
        taken: Vec::new(),
    };
    tokio::spawn(sluice_client::frame_writer(send, outbox));
    let mut session = Session {
        conn: conn.clone(),
        broker,
        who,
        out: out_tx,
        subs: HashMap::new(),
        next_sub: 1,
        publishes: None,
        budget: Arc::new(Semaphore::new(PUBLISH_BUDGET)),
        delivery_budget: Arc::new(Semaphore::new(DELIVERY_BUDGET as usize)),
        syncs: Arc::new(Semaphore::new(PENDING_SYNCS)),
        welcomed: false,
    };
    if let Err(e) = session.read_loop(recv).await {
        // Best effort: a client that reads nothing does not get it.
        let _ = session.out.try_send(Frame::Error(e.clone()).into());
        tracing::info!(client = %session.who.client, error = %e, "closing session");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        conn.close(CLOSE_PROTOCOL.into(), e.message.as_bytes());
    }
}

/// Publishes of one tenant scope, in arrival order.
struct PublishBatch {
    tenant: Option<String>,
    seqs: Vec<u64>,
    msgs: Vec<Publish>,
    budget: OwnedSemaphorePermit,
}

struct Session {
    conn: quinn::Connection,
    broker: Broker,
    who: Principal,
    out: mpsc::Sender<Outgoing>,
    subs: HashMap<u64, SubHandle>,
    next_sub: u64,
    publishes: Option<mpsc::UnboundedSender<PublishBatch>>,
    /// Bytes of publishes this connection may have unanswered.
    budget: Arc<Semaphore>,
    /// Stored bytes of deliveries being loaded and written.
    delivery_budget: Arc<Semaphore>,
    /// `SyncAcks` waiting for their commit.
    syncs: Arc<Semaphore>,
    welcomed: bool,
}

impl Session {
    async fn read_loop(&mut self, mut recv: quinn::RecvStream) -> Result<(), ErrorBody> {
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
            let n = match recv.read_chunks(&mut chunks).await {
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

    /// Queue a sync behind the subscription's pending settles; the response
    /// is sent when the store has fsynced them, without holding up the
    /// control stream meanwhile.
    async fn sync_acks(&mut self, id: u64, sub: u64) {
        // At most PENDING_SYNCS wait at once; beyond, the control stream is
        // not read until one is answered.
        let Ok(permit) = self.syncs.clone().acquire_owned().await else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        let queued = match self.subs.get(&sub) {
            Some(s) => s.cmds.send(SubCmd::Sync(tx)).await.is_ok(),
            None => false,
        };
        let gone = move || error_body(&BrokerError::not_found("subscription", sub.to_string()));
        if !queued {
            self.send(Frame::Response {
                id,
                body: Err(gone()),
            })
            .await;
            return;
        }
        let out = self.out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let body = match rx.await {
                Ok(Ok(())) => Ok(proto::Response::Ok),
                Ok(Err(e)) => Err(error_body(&e)),
                Err(_) => Err(gone()),
            };
            let _ = out.send(Frame::Response { id, body }.into()).await;
        });
    }

    async fn settle(
        &mut self,
        sub: u64,
        ranges: Ranges,
        cmd: fn(Ranges) -> SubCmd,
    ) -> Result<(), ErrorBody> {
        // Ranges are resolved against the tags the subscription holds, so
        // a frame's cost is bounded by its range count (decoder limit) and
        // the prefetch, whatever the ranges span.
        if let Some(&(a, b)) = ranges.iter().find(|(a, b)| b < a) {
            return Err(ErrorBody::new(
                ErrorCode::BadFrame,
                format!("tag range {a}..={b} is reversed"),
            ));
        }
        if let Some(s) = self.subs.get(&sub) {
            let _ = s.cmds.send(cmd(ranges)).await;
        }
        Ok(())
    }

    /// Run a broker call that may block (authorizer plugin, store sync) on
    /// a blocking thread, at most the tenant's share of them at once, so no
    /// tenant stalls the async workers or another tenant's requests.
    async fn blocking<T: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(&Broker, &Principal) -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, BrokerError> {
        let permit = self.broker.control_permit(tenant).await?;
        let (b, who) = (self.broker.clone(), self.who.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&b, &who)
        })
        .await
        .map_err(|e| BrokerError::Conflict(format!("request task failed: {e}")))?
    }

    async fn request(
        &mut self,
        tenant: Option<&str>,
        body: proto::Request,
    ) -> Result<proto::Response, BrokerError> {
        use proto::{Request as R, Response as S};
        let b = self.broker.clone();
        let who = self.who.clone();
        if let R::Stats = body {
            // Admins see every tenant unless they name one.
            let only = match (who.admin, tenant) {
                (true, None) => None,
                _ => Some(b.scope(&who, tenant)?),
            };
            return Ok(S::Stats(
                b.stats(&who)
                    .into_iter()
                    .filter(|s| only.as_ref().is_none_or(|t| *t == s.tenant))
                    .map(|s| proto::TenantUsage {
                        tenant: s.tenant,
                        queues: s.queues,
                        ready: s.ready,
                        unacked: s.unacked,
                        bytes: s.bytes,
                        published: s.published,
                        delivered: s.delivered,
                        plugins: s.plugins,
                        plugins_not_running: s.plugins_not_running,
                    })
                    .collect(),
            ));
        }
        let quota = |q: proto::TenantQuota| crate::broker::TenantLimits {
            max_connections: q.max_connections,
            max_queues: q.max_queues,
            max_stored_bytes: q.max_stored_bytes,
            max_publish_rate: q.max_publish_rate,
            max_message_bytes: q.max_message_bytes,
        };
        // Tenant administration is for admins only (checked by the broker);
        // it runs under the admin scope's slots.
        match body {
            R::TenantCreate { name, limits } => {
                let limits = quota(limits);
                self.blocking("", move |b, who| b.create_tenant(who, &name, limits))
                    .await?;
                return Ok(S::Ok);
            }
            R::TenantLimits { name, limits } => {
                let limits = quota(limits);
                self.blocking("", move |b, who| b.set_tenant_limits(who, &name, limits))
                    .await?;
                return Ok(S::Ok);
            }
            R::TenantDelete { name } => {
                self.blocking("", move |b, who| b.delete_tenant(who, &name))
                    .await?;
                return Ok(S::Ok);
            }
            R::TenantList => {
                return Ok(S::Tenants(
                    b.list_tenants(&who)?
                        .into_iter()
                        .map(|t| proto::TenantSummary {
                            name: t.name,
                            limits: proto::TenantQuota {
                                max_connections: t.limits.max_connections,
                                max_queues: t.limits.max_queues,
                                max_stored_bytes: t.limits.max_stored_bytes,
                                max_publish_rate: t.limits.max_publish_rate,
                                max_message_bytes: t.limits.max_message_bytes,
                            },
                            connections: t.connections,
                            queues: t.queues,
                            bytes: t.bytes,
                        })
                        .collect(),
                ));
            }
            _ => {}
        }
        let t = b.scope(&who, tenant)?;
        let scope = t.clone();
        Ok(match body {
            R::Declare(d) => {
                let options = QueueOptions {
                    durable: d.durable,
                    max_length: d.max_length,
                    overflow: match d.overflow {
                        proto::Overflow::RejectPublish => Overflow::RejectPublish,
                        proto::Overflow::DropHead => Overflow::DropHead,
                    },
                    ttl_ms: d.ttl_ms,
                    dead_letter: d.dead_letter,
                    delivery_limit: d.delivery_limit,
                };
                self.blocking(&scope, move |b, who| {
                    b.declare_queue(who, &t, &d.name, options)
                })
                .await?;
                S::Ok
            }
            R::Bind { queue, pattern } => {
                self.blocking(&scope, move |b, who| b.bind(who, &t, &queue, &pattern))
                    .await?;
                S::Ok
            }
            R::Unbind { queue, pattern } => {
                self.blocking(&scope, move |b, who| b.unbind(who, &t, &queue, &pattern))
                    .await?;
                S::Ok
            }
            R::Delete { queue } => {
                self.blocking(&scope, move |b, who| b.delete_queue(who, &t, &queue))
                    .await?;
                S::Ok
            }
            R::Purge { queue } => S::Count(
                self.blocking(&scope, move |b, who| b.purge_queue(who, &t, &queue))
                    .await?,
            ),
            R::ListQueues => S::Queues(
                b.list_queues(&who, &t)?
                    .into_iter()
                    .map(|q| proto::QueueSummary {
                        name: q.name,
                        durable: q.options.durable,
                        ready: q.ready,
                        unacked: q.unacked,
                        bytes: q.bytes,
                        consumers: q.consumers,
                        published: q.published,
                        dead_lettered: q.dead_lettered,
                        filters: q.filters,
                    })
                    .collect(),
            ),
            R::Subscribe { queue, prefetch } => {
                self.subs.retain(|_, s| !s.cmds.is_closed());
                if self.subs.len() >= proto::MAX_SUBSCRIPTIONS as usize {
                    return Err(BrokerError::Limit(format!(
                        "a connection may hold at most {} subscriptions",
                        proto::MAX_SUBSCRIPTIONS
                    )));
                }
                // Every subscription may hold its prefetch unacked: bound
                // what one connection holds in all.
                let held: u64 = self.subs.values().map(|s| u64::from(s.prefetch)).sum();
                let max = b.config().max_unacked_per_connection;
                let prefetch = prefetch.max(1);
                if held + u64::from(prefetch) > max {
                    return Err(BrokerError::Limit(format!(
                        "the subscriptions of one connection may hold at most {max} unacked \
                         messages ({held} taken, {prefetch} asked)"
                    )));
                }
                let sub = self
                    .blocking(&scope, move |b, who| b.subscribe(who, &t, &queue, prefetch))
                    .await?;
                let id = self.next_sub;
                self.next_sub += 1;
                let stream =
                    match tokio::time::timeout(OPEN_STREAM_TIMEOUT, self.conn.open_uni()).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            return Err(BrokerError::Conflict(format!(
                                "cannot open a delivery stream: {e}"
                            )));
                        }
                        Err(_) => {
                            return Err(BrokerError::Limit(
                                "the client accepts no more delivery streams".into(),
                            ));
                        }
                    };
                let (tx, rx) = mpsc::channel(SUB_COMMANDS);
                self.subs.insert(id, SubHandle { cmds: tx, prefetch });
                tokio::spawn(deliver(id, sub, stream, rx, self.delivery_budget.clone()));
                S::Subscribed { sub: id }
            }
            R::LoadPlugin {
                name,
                kind,
                queue,
                wasm,
                config,
            } => {
                let kind: PluginKind = kind.parse().map_err(|e: String| BrokerError::Invalid {
                    what: "plugin kind",
                    reason: e,
                })?;
                let load = crate::broker::PluginLoad {
                    name,
                    kind,
                    queue,
                    wasm,
                    config,
                };
                self.blocking(&scope, move |b, who| b.load_plugin(who, &t, load))
                    .await?;
                S::Ok
            }
            R::ListPlugins => S::Plugins(
                b.list_plugins(&who, &t)?
                    .into_iter()
                    .map(|p| proto::PluginSummary {
                        name: p.name,
                        kind: p.kind.to_string(),
                        queue: p.queue,
                        abi: p.abi,
                        state: match p.state {
                            PluginState::Ready => "ready".into(),
                            PluginState::Errored { reason } => format!("errored: {reason}"),
                            PluginState::NotRunning { reason } => {
                                format!("not running (fails closed): {reason}")
                            }
                        },
                        calls: p.metrics.calls,
                        errors: p.metrics.guest_errors + p.metrics.output_rejected,
                        traps: p.metrics.traps(),
                        mean_ns: p.metrics.time_ns.checked_div(p.metrics.calls).unwrap_or(0),
                    })
                    .collect(),
            ),
            R::UnloadPlugin { name } => {
                self.blocking(&scope, move |b, who| b.unload_plugin(who, &t, &name))
                    .await?;
                S::Ok
            }
            R::Stats
            | R::TenantCreate { .. }
            | R::TenantLimits { .. }
            | R::TenantDelete { .. }
            | R::TenantList
            | R::SyncAcks { .. } => {
                unreachable!("answered above")
            }
        })
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

/// Run a connection's publishes in order, as a two-stage pipeline:
/// everything queued for the same tenant is routed and handed to the group
/// commit as one broker call ([`Broker::prepare_publish`]), and while that
/// commit runs the next batch is already routed; a second stage finishes
/// the commits strictly in order (messages made ready, confirms sent).
/// Ids are reserved and messages enqueued in publish order, so each
/// publisher's messages stay in order in every queue and confirms go out in
/// order; plugin time overlaps the fsync instead of adding to it.
async fn publisher(
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
fn publish_size(p: &Publish) -> usize {
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

/// Push a subscription's deliveries on its own stream and apply acks.
/// Deliveries are loaded from the store only with the connection's
/// delivery budget in hand (at most [`LOAD_BYTES`] per batch), so a
/// connection whose client reads nothing holds at most [`DELIVERY_BUDGET`]
/// bytes of loaded payloads, whatever its prefetch and subscriptions.
async fn deliver(
    id: u64,
    mut sub: Subscription,
    mut stream: quinn::SendStream,
    mut cmds: mpsc::Receiver<SubCmd>,
    budget: Arc<Semaphore>,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    proto::encode(&Frame::StreamStart { sub: id }, &mut buf);
    if stream.write_all(&buf).await.is_err() {
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
                let Ok(_permit) = budget.clone().acquire_many_owned(LOAD_BYTES as u32).await else {
                    break;
                };
                let batch = sub.load(LOAD_BYTES);
                if batch.is_empty() {
                    continue;
                }
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
                if stream.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.finish();
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
