//! Async Rust client for the Sluice broker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! use sluice_client::{Client, QueueSpec};
//! let client = Client::connect("127.0.0.1:7600".parse().unwrap(), "ids/acme".as_ref()).await?;
//! client.declare(QueueSpec::new("orders")).await?;
//! client.bind("orders", "orders.>").await?;
//! let queues = client.publish("orders.eu.created", vec![], b"hello".to_vec()).await?;
//! let mut sub = client.subscribe("orders", 64).await?;
//! if let Some(d) = sub.next().await {
//!     sub.ack(d.tag);
//! }
//! # Ok(()) }
//! ```
//!
//! # Model
//!
//! One QUIC connection with a client certificate; requests, publishes and
//! acks share one control stream (frames are coalesced per write); each
//! subscription gets its own server-opened delivery stream. Publishes are
//! pipelined: [`Client::publish`] sends at once and returns a future that
//! resolves with the confirm (the message is durable in that many queues) or
//! the refusal.
//!
//! # Reconnecting
//!
//! The client does not reconnect by itself. When the connection is lost,
//! every pending request and publish fails with
//! [`ClientError::ConnectionLost`]; build a new [`Client`] and publish again
//! whatever was not confirmed (delivery is at-least-once, so consumers must
//! tolerate duplicates). Deliveries that were not acked are redelivered by
//! the broker, marked `redelivered`.
//!
//! # Clusters
//!
//! Only a cluster's leader serves clients; the other nodes refuse with
//! [`ErrorCode::NotLeader`], naming the leader ([`ErrorBody::leader`]).
//! [`Client::connect_any`] takes several nodes' addresses and finds the
//! leader, through an election if one is under way. When the leader
//! fails, its connections are lost and publishes waiting for a confirm
//! fail (with `not_leader` or [`ClientError::ConnectionLost`]): call
//! `connect_any` again and publish again what was not confirmed; every
//! confirmed message is on a majority of the nodes' disks.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod tls;

pub use sluice_proto::{
    ClusterSummary, Delivery, ErrorBody, ErrorCode, FollowerSummary, PluginSummary, QueueSummary,
    TenantQuota, TenantSummary, TenantUsage,
};
pub use tls::Identity;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::{self as proto, Decoder, Frame, Limits, Request, Response};
use tokio::sync::{mpsc, oneshot};

/// What can go wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The identity folder is unusable.
    #[error("identity: {0}")]
    Identity(String),
    /// The server could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake or the first exchange failed: almost always a
    /// client certificate the server does not accept.
    #[error("certificate refused by server (or server unreachable): {0}")]
    CertificateRefused(String),
    /// The server refused the request.
    #[error("{0}")]
    Server(ErrorBody),
    /// The connection ended.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out waiting for the server")]
    Timeout,
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether a refused or lost publish or request may succeed on another
    /// node: the server is not (or no longer) a cluster's leader, is
    /// shutting down, or the connection was lost. Connect again
    /// ([`Client::connect_any`]) and send it again.
    pub fn failed_over(&self) -> bool {
        match self {
            ClientError::Server(body) => {
                matches!(body.code, ErrorCode::NotLeader | ErrorCode::ShuttingDown)
            }
            ClientError::ConnectionLost(_) => true,
            _ => false,
        }
    }
}

/// A failed first exchange: the server's close reason when it closed the
/// connection on purpose (e.g. an identity it does not accept), else `e`.
fn refused(conn: &quinn::Connection, e: impl std::fmt::Display) -> ClientError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) if !close.reason.is_empty() => {
            ClientError::CertificateRefused(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => ClientError::CertificateRefused(e.to_string()),
    }
}

/// Queue settings for [`Client::declare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec(pub proto::QueueDecl);

impl QueueSpec {
    /// A durable queue with no limits.
    pub fn new(name: &str) -> Self {
        Self(proto::QueueDecl {
            name: name.into(),
            durable: true,
            max_length: None,
            overflow: proto::Overflow::RejectPublish,
            ttl_ms: None,
            dead_letter: None,
            delivery_limit: None,
        })
    }
    /// Skip fsync; deleted at broker restart.
    pub fn transient(mut self) -> Self {
        self.0.durable = false;
        self
    }
    /// Hold at most `n` messages; refuse publishes beyond.
    pub fn max_length(mut self, n: u64) -> Self {
        self.0.max_length = Some(n);
        self
    }
    /// At max-length drop the oldest message instead of refusing.
    pub fn drop_head(mut self) -> Self {
        self.0.overflow = proto::Overflow::DropHead;
        self
    }
    /// Message time-to-live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.0.ttl_ms = Some(ttl.as_millis() as u64);
        self
    }
    /// Dead-letter queue.
    pub fn dead_letter(mut self, queue: &str) -> Self {
        self.0.dead_letter = Some(queue.into());
        self
    }
    /// Deliveries before a message is dead-lettered.
    pub fn delivery_limit(mut self, n: u32) -> Self {
        self.0.delivery_limit = Some(n);
        self
    }
}

/// Who the server says we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Tenant ("" for administrators).
    pub tenant: String,
    /// Client name.
    pub client: String,
    /// Administrator.
    pub admin: bool,
    /// Largest message the server accepts.
    pub max_message: u32,
}

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// Delivery channel of a subscription; the receiver waits here until
/// [`Client::subscribe`] takes it (the stream may arrive before the response).
type SubChannel = (
    mpsc::UnboundedSender<Vec<Delivery>>,
    Option<mpsc::UnboundedReceiver<Vec<Delivery>>>,
);

#[derive(Default)]
struct State {
    requests: HashMap<u64, Reply<Response>>,
    publishes: HashMap<u64, Reply<u32>>,
    subs: HashMap<u64, SubChannel>,
    closed: Option<ClientError>,
}

impl State {
    fn fail_all(&mut self, e: ClientError) {
        for (_, r) in self.requests.drain() {
            let _ = r.send(Err(e.clone()));
        }
        for (_, r) in self.publishes.drain() {
            let _ = r.send(Err(e.clone()));
        }
        self.subs.clear();
        self.closed.get_or_insert(e);
    }

    fn sub_channel(&mut self, sub: u64) -> &mut SubChannel {
        self.subs.entry(sub).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, Some(rx))
        })
    }
}

struct Inner {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    out: mpsc::UnboundedSender<Frame>,
    state: Mutex<State>,
    next_id: AtomicU64,
    next_seq: AtomicU64,
    session: Session,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection to a broker. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    tenant: Option<String>,
}

/// Options for [`Client::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Name the server certificate must carry. Default `localhost`.
    pub server_name: String,
    /// Tenant to act on (administrators only). Default none.
    pub tenant: Option<String>,
    /// How long to wait for the handshake and hello. Default 10 s.
    pub timeout: Duration,
    /// How long [`Client::connect_any`] keeps trying the servers (through
    /// an election, say) before it gives up. Default 30 s.
    pub failover: Duration,
    /// A server silent this long (no answer to keep-alives sent every
    /// third of it) is taken for dead: the connection is lost and calls
    /// fail with [`ClientError::ConnectionLost`]. Default (`None`): 10 s,
    /// and 3 s for [`Client::connect_any`] with several servers, where a
    /// new leader is elected within about 2 s of a crash.
    pub dead_after: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            tenant: None,
            timeout: Duration::from_secs(10),
            failover: Duration::from_secs(30),
            dead_after: None,
        }
    }
}

/// How long a silent server is taken for alive, by default.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// As [`DEAD_AFTER`], for a connection to one of a cluster's nodes.
const CLUSTER_DEAD_AFTER: Duration = Duration::from_secs(3);
/// Least [`ConnectOptions::dead_after`] (keep-alives a third of it apart).
const MIN_DEAD_AFTER: Duration = Duration::from_millis(300);

/// One attempt of [`Client::connect_any`] waits at most this long (a
/// node that is down does not answer at all).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Leader hints one attempt of [`Client::connect_any`] follows in a row.
const MAX_HINTS: usize = 4;

/// Whether another server (or the same one later) may succeed where this
/// attempt failed.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server(_) => e.failed_over(),
        ClientError::Identity(_) | ClientError::Protocol(_) => false,
        _ => true,
    }
}

fn lost(e: impl std::fmt::Display) -> ClientError {
    ClientError::ConnectionLost(e.to_string())
}

impl Client {
    /// Connect to `addr` with the identity folder `identity`.
    pub async fn connect(addr: SocketAddr, identity: &Path) -> Result<Client, ClientError> {
        Self::connect_with(addr, identity, ConnectOptions::default()).await
    }

    /// Connect to the node of a cluster that leads, given some of its
    /// nodes' client addresses: a node that does not lead refuses with
    /// `not_leader` naming the leader, which is tried next; a node that is
    /// down or electing is skipped, and the round repeated (with backoff)
    /// until [`ConnectOptions::failover`] has passed. With one server this
    /// is [`Client::connect_with`] retried through restarts.
    ///
    /// After a connection is lost, calling this again finds the new
    /// leader; publish again whatever was not confirmed (at-least-once).
    pub async fn connect_any(
        servers: &[SocketAddr],
        identity: &Path,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::Connect("no server address given".into()));
        }
        let deadline = tokio::time::Instant::now() + opts.failover;
        let mut backoff = Duration::from_millis(50);
        let opts = ConnectOptions {
            dead_after: opts
                .dead_after
                .or((servers.len() > 1).then_some(CLUSTER_DEAD_AFTER)),
            ..opts
        };
        loop {
            // Every server at once: a node that is down costs one attempt's
            // timeout in parallel with the others, not in a row.
            let mut attempts: futures::stream::FuturesUnordered<_> = servers
                .iter()
                .map(|&addr| Self::follow_hints(addr, identity, &opts, deadline))
                .collect();
            let mut last = None;
            while let Some(result) = futures::StreamExt::next(&mut attempts).await {
                match result {
                    Ok(client) => return Ok(client),
                    Err(e) if !retryable(&e) => return Err(e),
                    Err(e) => last = Some(e),
                }
            }
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(last.unwrap_or(ClientError::Timeout));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Connect to `addr`, then to the leader each `not_leader` refusal
    /// names (at most [`MAX_HINTS`] in a row).
    async fn follow_hints(
        first: SocketAddr,
        identity: &Path,
        opts: &ConnectOptions,
        deadline: tokio::time::Instant,
    ) -> Result<Client, ClientError> {
        let mut addr = first;
        let mut hints = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = ConnectOptions {
                timeout: opts.timeout.min(ATTEMPT_TIMEOUT).min(left),
                ..opts.clone()
            };
            let e = match Self::connect_with(addr, identity, attempt).await {
                Ok(client) => return Ok(client),
                Err(e) => e,
            };
            let hint = match &e {
                ClientError::Server(body) => {
                    body.leader().and_then(|a| a.parse::<SocketAddr>().ok())
                }
                _ => None,
            };
            match hint {
                Some(leader) if leader != addr && hints < MAX_HINTS => {
                    addr = leader;
                    hints += 1;
                }
                _ => return Err(e),
            }
        }
    }

    /// Connect with options.
    pub async fn connect_with(
        addr: SocketAddr,
        identity: &Path,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let dead_after = opts.dead_after.unwrap_or(DEAD_AFTER).max(MIN_DEAD_AFTER);
        let config = Identity::load(identity)?.quinn_config_with(dead_after)?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e| ClientError::Connect(format!("{e}")))?;
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let handshake = async {
            let conn = endpoint
                .connect(addr, &opts.server_name)
                .map_err(|e| ClientError::Connect(e.to_string()))?
                .await
                .map_err(|e| ClientError::CertificateRefused(e.to_string()))?;
            // A refused client certificate does not fail connect(): it shows
            // on the first stream operation, so do a hello round trip.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| refused(&conn, e))?;
            let hello = Frame::Hello {
                min_version: proto::MIN_VERSION,
                max_version: proto::MAX_VERSION,
                agent: format!("sluice-client/{}", env!("CARGO_PKG_VERSION")),
            };
            send.write_all(&proto::encode_frame(&hello))
                .await
                .map_err(|e| refused(&conn, e))?;
            let mut decoder = Decoder::new(Limits::default());
            let mut buf = vec![0u8; 64 << 10];
            let welcome = loop {
                if let Some(f) = decoder
                    .next_frame()
                    .map_err(|e| ClientError::Protocol(e.to_string()))?
                {
                    break f;
                }
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => decoder.push(&buf[..n]),
                    Ok(None) => {
                        return Err(ClientError::CertificateRefused(
                            "server closed the stream".into(),
                        ));
                    }
                    Err(e) => return Err(refused(&conn, e)),
                }
            };
            let session = match welcome {
                Frame::Welcome {
                    tenant,
                    client,
                    admin,
                    max_message,
                    ..
                } => Session {
                    tenant,
                    client,
                    admin,
                    max_message,
                },
                Frame::Error(e) => return Err(ClientError::Server(e)),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected welcome, got {other:?}"
                    )));
                }
            };
            Ok::<_, ClientError>((conn, send, recv, decoder, session))
        };
        let (conn, send, recv, decoder, session) = tokio::time::timeout(opts.timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout)??;
        let (out, out_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            conn: conn.clone(),
            endpoint,
            out,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            session,
        });
        tokio::spawn(frame_writer(send, out_rx));
        tokio::spawn(reader(Arc::downgrade(&inner), recv, decoder));
        tokio::spawn(accept_streams(Arc::downgrade(&inner), conn));
        Ok(Client {
            inner,
            tenant: opts.tenant,
        })
    }

    /// The address of the server this client is connected to (the leader
    /// [`Client::connect_any`] found, say).
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.conn.remote_address()
    }

    /// Who the server says we are.
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// A handle on the same connection acting on `tenant` (administrators
    /// only; a tenant client may name its own tenant).
    pub fn for_tenant(&self, tenant: Option<String>) -> Client {
        Client {
            inner: self.inner.clone(),
            tenant,
        }
    }

    fn send(&self, f: Frame) -> Result<(), ClientError> {
        if let Some(e) = &self.inner.state().closed {
            return Err(e.clone());
        }
        self.inner.out.send(f).map_err(|_| lost("writer stopped"))
    }

    async fn request(&self, body: Request) -> Result<Response, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.state().requests.insert(id, tx);
        self.send(Frame::Request {
            id,
            tenant: self.tenant.clone(),
            body,
        })?;
        rx.await.map_err(|_| lost("no response"))?
    }

    async fn ok(&self, body: Request) -> Result<(), ClientError> {
        match self.request(body).await? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Declare a queue.
    pub async fn declare(&self, spec: QueueSpec) -> Result<(), ClientError> {
        self.ok(Request::Declare(spec.0)).await
    }

    /// Bind a queue to a topic pattern (`*` one token, `>` the rest).
    pub async fn bind(&self, queue: &str, pattern: &str) -> Result<(), ClientError> {
        self.ok(Request::Bind {
            queue: queue.into(),
            pattern: pattern.into(),
        })
        .await
    }

    /// Remove a binding.
    pub async fn unbind(&self, queue: &str, pattern: &str) -> Result<(), ClientError> {
        self.ok(Request::Unbind {
            queue: queue.into(),
            pattern: pattern.into(),
        })
        .await
    }

    /// Delete a queue and its messages.
    pub async fn delete(&self, queue: &str) -> Result<(), ClientError> {
        self.ok(Request::Delete {
            queue: queue.into(),
        })
        .await
    }

    /// Drop a queue's ready messages; returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u64, ClientError> {
        match self
            .request(Request::Purge {
                queue: queue.into(),
            })
            .await?
        {
            Response::Count(n) => Ok(n),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// List queues.
    pub async fn list_queues(&self) -> Result<Vec<QueueSummary>, ClientError> {
        match self.request(Request::ListQueues).await? {
            Response::Queues(q) => Ok(q),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Load or replace a plugin.
    pub async fn load_plugin(
        &self,
        name: &str,
        kind: &str,
        queue: Option<&str>,
        wasm: Vec<u8>,
        config: Vec<(String, String)>,
    ) -> Result<(), ClientError> {
        self.ok(Request::LoadPlugin {
            name: name.into(),
            kind: kind.into(),
            queue: queue.map(Into::into),
            wasm,
            config,
        })
        .await
    }

    /// List plugins.
    pub async fn list_plugins(&self) -> Result<Vec<PluginSummary>, ClientError> {
        match self.request(Request::ListPlugins).await? {
            Response::Plugins(p) => Ok(p),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Unload a plugin.
    pub async fn unload_plugin(&self, name: &str) -> Result<(), ClientError> {
        self.ok(Request::UnloadPlugin { name: name.into() }).await
    }

    /// Usage per tenant (all tenants for administrators).
    pub async fn stats(&self) -> Result<Vec<TenantUsage>, ClientError> {
        match self.request(Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Register a tenant, or replace its limits (administrators).
    pub async fn create_tenant(&self, name: &str, limits: TenantQuota) -> Result<(), ClientError> {
        self.ok(Request::TenantCreate {
            name: name.into(),
            limits,
        })
        .await
    }

    /// Replace a registered tenant's limits (administrators).
    pub async fn set_tenant_limits(
        &self,
        name: &str,
        limits: TenantQuota,
    ) -> Result<(), ClientError> {
        self.ok(Request::TenantLimits {
            name: name.into(),
            limits,
        })
        .await
    }

    /// Registered tenants with usage (administrators).
    pub async fn list_tenants(&self) -> Result<Vec<TenantSummary>, ClientError> {
        match self.request(Request::TenantList).await? {
            Response::Tenants(t) => Ok(t),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// A cluster's replicated group as its leader sees it: members, term,
    /// commit and applied index, each follower's lag (administrators).
    pub async fn cluster_status(&self) -> Result<ClusterSummary, ClientError> {
        match self.request(Request::ClusterStatus).await? {
            Response::Cluster(c) => Ok(c),
            other => Err(ClientError::Protocol(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Hand a cluster's leadership to node `to` (administrators; on the
    /// leader). This connection closes soon after, with the old leader's
    /// term: reconnect with [`Client::connect_any`].
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), ClientError> {
        self.ok(Request::ClusterTransfer { to }).await
    }

    /// Add node `node` to a cluster (administrators; on the leader): it
    /// must run already (`sluice serve --join`), reachable at `raft` by
    /// the other nodes. Answered once it has caught up and votes (or, with
    /// `learner`, once it is replicated to).
    pub async fn add_node(
        &self,
        node: u64,
        raft: &str,
        client: &str,
        learner: bool,
    ) -> Result<(), ClientError> {
        self.ok(Request::ClusterAdd {
            node,
            raft: raft.into(),
            client: client.into(),
            learner,
        })
        .await
    }

    /// Remove node `node` from a cluster (administrators; on the leader).
    /// Removing the leader hands its leadership over: this connection then
    /// closes; reconnect with [`Client::connect_any`].
    pub async fn remove_node(&self, node: u64) -> Result<(), ClientError> {
        self.ok(Request::ClusterRemove { node }).await
    }

    /// Delete a tenant, its data and its connections (administrators).
    pub async fn delete_tenant(&self, name: &str) -> Result<(), ClientError> {
        self.ok(Request::TenantDelete { name: name.into() }).await
    }

    /// Publish. The message is sent at once; the returned future resolves
    /// with the number of queues it is durably stored in, or the refusal.
    pub fn publish(
        &self,
        topic: &str,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<u32, ClientError>> + Send + 'static {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.state().publishes.insert(seq, tx);
        let sent = self.send(Frame::Publish {
            seq,
            tenant: self.tenant.clone(),
            topic: topic.into(),
            headers,
            payload,
        });
        async move {
            sent?;
            rx.await.map_err(|_| lost("no confirm"))?
        }
    }

    /// Consume `queue` with at most `prefetch` unacked deliveries.
    pub async fn subscribe(&self, queue: &str, prefetch: u32) -> Result<Subscription, ClientError> {
        let sub = match self
            .request(Request::Subscribe {
                queue: queue.into(),
                prefetch,
            })
            .await?
        {
            Response::Subscribed { sub } => sub,
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected response {other:?}"
                )));
            }
        };
        let rx = self
            .inner
            .state()
            .sub_channel(sub)
            .1
            .take()
            .ok_or_else(|| ClientError::Protocol("subscription taken twice".into()))?;
        Ok(Subscription {
            client: self.clone(),
            sub,
            rx,
            buf: VecDeque::new(),
        })
    }

    /// Close the connection.
    pub fn close(&self) {
        self.inner.conn.close(0u32.into(), b"client closing");
    }

    /// Close the connection after the broker handled everything sent
    /// before, and wait (at most a second or two) until the close is sent,
    /// so the broker learns at once (e.g. requeues what a consumer held)
    /// even when the process exits right after.
    pub async fn shutdown(&self) {
        // One round trip first: everything sent before it (acks above all)
        // has then been handled by the broker.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.list_plugins()).await;
        self.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}

/// A consumer. Dropping it cancels the subscription; unacked deliveries are
/// requeued by the broker.
pub struct Subscription {
    client: Client,
    sub: u64,
    rx: mpsc::UnboundedReceiver<Vec<Delivery>>,
    buf: VecDeque<Delivery>,
}

impl Subscription {
    /// The next delivery; `None` when the subscription or connection ended.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.buf.pop_front() {
                return Some(d);
            }
            self.buf.extend(self.rx.recv().await?);
        }
    }

    /// Acknowledge (remove) a delivery.
    pub fn ack(&self, tag: u64) {
        self.ack_many(&[tag]);
    }

    /// Acknowledge several deliveries in one frame.
    pub fn ack_many(&self, tags: &[u64]) {
        let _ = self.client.send(Frame::Ack {
            sub: self.sub,
            ranges: proto::to_ranges(tags),
        });
    }

    /// Wait until every ack, nack and reject sent so far on this
    /// subscription is applied and fsynced by the broker (like JetStream's
    /// `AckSync`): an acked message is then never delivered again, even
    /// after the broker crashes. Plain acks are applied without a sync, so a
    /// crash may redeliver a recently acked message (at-least-once).
    pub async fn sync_acks(&self) -> Result<(), ClientError> {
        self.client.ok(Request::SyncAcks { sub: self.sub }).await
    }

    /// Requeue a delivery (it comes back marked redelivered).
    pub fn nack(&self, tag: u64) {
        let _ = self.client.send(Frame::Nack {
            sub: self.sub,
            ranges: vec![(tag, tag)],
        });
    }

    /// Dead-letter a delivery.
    pub fn reject(&self, tag: u64) {
        let _ = self.client.send(Frame::Reject {
            sub: self.sub,
            ranges: vec![(tag, tag)],
        });
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.client.send(Frame::Cancel { sub: self.sub });
        self.client.inner.state().subs.remove(&self.sub);
    }
}

/// A queue of frames that [`frame_writer`] drains.
#[doc(hidden)]
pub trait FrameSource: Send + 'static {
    /// The next frame, waiting for one; `None` once the queue is closed.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Frame>> + Send;
    /// The next frame if one is queued right now.
    fn ready(&mut self) -> Option<Frame>;
    /// Everything taken so far is written to the stream (accepted by QUIC,
    /// so within the peer's flow-control window).
    fn written(&mut self) {}
}

impl FrameSource for mpsc::UnboundedReceiver<Frame> {
    async fn next(&mut self) -> Option<Frame> {
        self.recv().await
    }
    fn ready(&mut self) -> Option<Frame> {
        self.try_recv().ok()
    }
}

/// Write frames from `rx` to `send`, coalescing whatever is queued into
/// one stream write (up to 256 KiB), until `rx` closes; then finish the
/// stream. Shared by the client and the broker's sessions. Frames are taken
/// from `rx` only as fast as the peer reads them (`write_all` waits on QUIC
/// flow control), which is what gives a bounded `rx` its backpressure.
#[doc(hidden)]
pub async fn frame_writer(mut send: impl FrameSink, mut rx: impl FrameSource) {
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(f) = rx.next().await {
        proto::encode(&f, &mut buf);
        while buf.len() < (256 << 10) {
            match rx.ready() {
                Some(f) => proto::encode(&f, &mut buf),
                None => break,
            }
        }
        if !send.write_all(&buf).await {
            return;
        }
        rx.written();
        buf.clear();
    }
    send.finish();
}

/// Where [`frame_writer`] writes: a QUIC send stream, or (in the broker's
/// in-process sessions) memory.
#[doc(hidden)]
pub trait FrameSink: Send + 'static {
    /// Write all of `buf`, waiting on flow control; `false` once the peer
    /// is gone.
    fn write_all(&mut self, buf: &[u8]) -> impl std::future::Future<Output = bool> + Send;
    /// No more bytes.
    fn finish(&mut self);
}

impl FrameSink for quinn::SendStream {
    async fn write_all(&mut self, buf: &[u8]) -> bool {
        quinn::SendStream::write_all(self, buf).await.is_ok()
    }
    fn finish(&mut self) {
        let _ = quinn::SendStream::finish(self);
    }
}

async fn reader(inner: std::sync::Weak<Inner>, mut recv: quinn::RecvStream, mut decoder: Decoder) {
    let mut buf = vec![0u8; 64 << 10];
    let end = loop {
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let Some(i) = inner.upgrade() else { return };
                    i.state().fail_all(ClientError::Protocol(e.to_string()));
                    return;
                }
            };
            let Some(i) = inner.upgrade() else { return };
            let mut st = i.state();
            match frame {
                Frame::Response { id, body } => {
                    if let Some(r) = st.requests.remove(&id) {
                        let _ = r.send(body.map_err(ClientError::Server));
                    }
                }
                Frame::Confirm { first, queues } => {
                    for (seq, q) in (first..).zip(queues) {
                        if let Some(r) = st.publishes.remove(&seq) {
                            let _ = r.send(Ok(q));
                        }
                    }
                }
                Frame::Refused { seq, error } => {
                    if let Some(r) = st.publishes.remove(&seq) {
                        let _ = r.send(Err(ClientError::Server(error)));
                    }
                }
                Frame::Error(e) => {
                    st.fail_all(ClientError::Server(e));
                }
                other => {
                    st.fail_all(ClientError::Protocol(format!("unexpected frame {other:?}")));
                }
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            Ok(None) => break lost("server closed the control stream"),
            Err(e) => break lost(e),
        }
    };
    if let Some(i) = inner.upgrade() {
        i.state().fail_all(end);
    }
}

async fn accept_streams(inner: std::sync::Weak<Inner>, conn: quinn::Connection) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut decoder = Decoder::new(Limits::default());
            let mut buf = vec![0u8; 64 << 10];
            let mut tx = None;
            loop {
                loop {
                    match decoder.next_frame() {
                        Ok(Some(Frame::StreamStart { sub })) => {
                            let Some(i) = inner.upgrade() else { return };
                            tx = Some(i.state().sub_channel(sub).0.clone());
                        }
                        Ok(Some(Frame::Deliver { deliveries, .. })) => {
                            if let Some(tx) = &tx
                                && tx.send(deliveries).is_err()
                            {
                                return;
                            }
                        }
                        Ok(Some(_)) | Err(_) => return,
                        Ok(None) => break,
                    }
                }
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => decoder.push(&buf[..n]),
                    _ => return,
                }
            }
        });
    }
}
