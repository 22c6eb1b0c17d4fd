//! Raft messages between nodes over QUIC with mutual TLS.
//!
//! Each RPC is one bidirectional stream: the request's length (u32 LE) and
//! the request, encoded, then for a snapshot its body (streamed, never
//! held whole), then the stream's end; the answer comes back encoded, then
//! the stream's end. Both sides read at most [`MAX_MESSAGE`] bytes of
//! request or answer, so no peer can make a node buffer more; a snapshot
//! body goes to a spool file and is checked before it is installed.
//!
//! Replication is pipelined: a leader's replication session to a follower
//! is one stream that opens with `AppendStream`, then carries
//! length-prefixed appends as the log grows, at most [`PIPELINE`] of them
//! unanswered; the follower hands them to `Raft::stream_append` and
//! answers each, in order, with a length-prefixed result once it has
//! flushed the entries. One append per round trip (openraft's default for
//! a network without streams) would leave a busy leader's proposals queued
//! behind round trips. The stream fails when its oldest unanswered append
//! has waited [`RPC_TIMEOUT_FLOOR`] (or the RPC time, if longer), and ends
//! cleanly when the leader's requests end and every one was answered. Nodes
//! present certificates of the cluster CA ([`crate::tls::NodeTls`]) and
//! speak ALPN [`crate::tls::CLUSTER_ALPN`]; a tenant's or administrator's
//! certificate chains to another CA and is refused at the handshake.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Cursor};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::data::DataGroup;
use super::meta::MetaState;
use super::snapshot::SnapshotBody;
use super::{MetaGroup, Peer};

/// Largest request or answer, bytes: an append carries at most
/// [`MAX_ENTRIES`] entries of at most [`super::store::MAX_OP_BYTES`] each
/// (and a snapshot of the metadata).
pub const MAX_MESSAGE: usize = MAX_ENTRIES as usize * (super::store::MAX_OP_BYTES + (1 << 20));

/// Most log entries one append carries (openraft's `max_payload_entries`).
pub const MAX_ENTRIES: u64 = 4;

/// Least time an RPC (but a snapshot) may take before it fails: openraft
/// asks for a heartbeat interval, which a large append on a busy node can
/// exceed; a peer that is gone (no answer at all, as UDP gives none) must
/// still fail in time for the leader to give its log entries up (a
/// replication in flight keeps them from being purged).
const RPC_TIMEOUT_FLOOR: Duration = Duration::from_secs(5);

/// Most appends a replication stream has sent and not had answered: enough
/// to keep a follower's disk busy through a round trip, few enough that a
/// lagging follower's unanswered appends stay a few megabytes.
pub const PIPELINE: usize = 16;

/// Bytes of a snapshot body read or written at a time.
const PIECE: usize = 1 << 20;

/// What a group's type configuration must be to travel here, and how its
/// snapshots travel.
pub trait Group: RaftTypeConfig<NodeId = u64, Node = Peer> {
    /// A snapshot's body.
    type Body: Body<Self>;
}

impl Group for MetaGroup {
    type Body = Cursor<Vec<u8>>;
}

impl Group for DataGroup {
    type Body = SnapshotBody;
}

/// A snapshot body as it is sent and received.
pub trait Body<C: RaftTypeConfig>: Send + Sized + 'static {
    /// Its length in bytes.
    fn size(&self) -> u64;
    /// Write it to `out`.
    fn send(self, out: &mut quinn::SendStream) -> impl Future<Output = io::Result<()>> + Send;
    /// Read a body of `len` bytes of a snapshot of `meta` from `input`
    /// (into a file in `spool`, for bodies kept on disk), checked.
    fn receive(
        input: &mut quinn::RecvStream,
        len: u64,
        meta: &SnapshotMetaOf<C>,
        spool: &Spool,
    ) -> impl Future<Output = io::Result<Self>> + Send;
}

/// Where received snapshot bodies are written: a new file's path each time.
pub type Spool = Arc<dyn Fn() -> PathBuf + Send + Sync>;

/// A spool for groups whose snapshots are received into memory.
pub fn no_spool() -> Spool {
    Arc::new(std::env::temp_dir)
}

impl<C: RaftTypeConfig> Body<C> for Cursor<Vec<u8>> {
    fn size(&self) -> u64 {
        self.get_ref().len() as u64
    }

    async fn send(self, out: &mut quinn::SendStream) -> io::Result<()> {
        out.write_all(self.get_ref())
            .await
            .map_err(io::Error::other)
    }

    async fn receive(
        input: &mut quinn::RecvStream,
        len: u64,
        _meta: &SnapshotMetaOf<C>,
        _spool: &Spool,
    ) -> io::Result<Self> {
        if len > MAX_MESSAGE as u64 {
            return Err(io::Error::other(format!("a snapshot of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        input
            .read_exact(&mut data)
            .await
            .map_err(io::Error::other)?;
        Ok(Cursor::new(data))
    }
}

impl Body<DataGroup> for SnapshotBody {
    fn size(&self) -> u64 {
        self.len()
    }

    async fn send(self, out: &mut quinn::SendStream) -> io::Result<()> {
        let len = self.len();
        let mut file = tokio::fs::File::from_std(self.into_file());
        let mut buf = vec![0u8; PIECE];
        let mut sent = 0u64;
        while sent < len {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::other("the snapshot file ended early"));
            }
            out.write_all(&buf[..n]).await.map_err(io::Error::other)?;
            sent += n as u64;
        }
        Ok(())
    }

    async fn receive(
        input: &mut quinn::RecvStream,
        len: u64,
        meta: &SnapshotMetaOf<DataGroup>,
        spool: &Spool,
    ) -> io::Result<Self> {
        let path = spool();
        let received = async {
            let mut file = tokio::fs::File::create(&path).await?;
            let mut buf = vec![0u8; PIECE];
            let mut left = len;
            while left > 0 {
                let want = left.min(PIECE as u64) as usize;
                input
                    .read_exact(&mut buf[..want])
                    .await
                    .map_err(io::Error::other)?;
                file.write_all(&buf[..want]).await?;
                left -= want as u64;
            }
            file.sync_data().await?;
            drop(file);
            let (path, meta) = (path.clone(), meta.clone());
            tokio::task::spawn_blocking(move || SnapshotBody::received(path, len, &meta))
                .await
                .map_err(io::Error::other)?
        }
        .await;
        if received.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        received
    }
}

/// A Raft message to a node.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
enum Request<C: Group> {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    /// A snapshot, whose body of `len` bytes follows the request.
    Snapshot {
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        len: u64,
    },
    /// Would you vote for this candidate (no vote is cast, no term moves)?
    PreVote(VoteRequest<C>),
    /// The leader hands its leadership to the receiver.
    TransferLeader(TransferLeaderRequest<C>),
    /// A replication stream: length-prefixed [`Request::Append`]s follow,
    /// each answered in order by a length-prefixed [`Response::Streamed`].
    AppendStream,
}

/// A node's answer.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
enum Response<C: Group> {
    Append(AppendEntriesResponse<C>),
    Vote(VoteResponse<C>),
    Snapshot(SnapshotResponse<C>),
    PreVote(VoteResponse<C>),
    TransferLeader(TransferLeaderResponse<C>),
    /// The node could not handle the request (shutting down, say).
    Failed(String),
    /// The answer to one append of a replication stream.
    Streamed(StreamAppendResult<C>),
}

/// The metadata group's Raft on one node.
pub type MetaRaft = Raft<MetaGroup, MetaState>;

/// Answer Raft messages arriving on `endpoint` with `raft`, until the
/// endpoint is closed; snapshot bodies received go to files `spool` names.
pub async fn serve<C, SM>(endpoint: quinn::Endpoint, raft: Raft<C, SM>, spool: Spool)
where
    C: Group,
    SM: RaftStateMachine<C, SnapshotData = C::Body>,
{
    while let Some(incoming) = endpoint.accept().await {
        let (raft, spool) = (raft.clone(), spool.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(answer(raft.clone(), spool.clone(), send, recv));
            }
        });
    }
}

/// Read one length-prefixed frame of at most [`MAX_MESSAGE`] bytes, or
/// `None` where the stream ends cleanly before one.
async fn read_frame(recv: &mut quinn::RecvStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(io::Error::other(e)),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes, more than {MAX_MESSAGE}"
        )));
    }
    let mut bytes = vec![0u8; len];
    recv.read_exact(&mut bytes)
        .await
        .map_err(io::Error::other)?;
    Ok(Some(bytes))
}

/// Write `value` (`what` names it in errors) as one length-prefixed frame.
async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    what: &str,
    value: &T,
) -> io::Result<()> {
    let bytes = super::encode(what, value)?;
    send.write_all(&(bytes.len() as u32).to_le_bytes())
        .await
        .map_err(io::Error::other)?;
    send.write_all(&bytes).await.map_err(io::Error::other)
}

/// Read one length-prefixed request, or `None` where the stream ends
/// cleanly before one (errors say why it is undecodable).
async fn read_request<C: Group>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<Request<C>>, String> {
    let undecodable = |e: &dyn std::fmt::Display| format!("undecodable request: {e}");
    match read_frame(recv).await.map_err(|e| undecodable(&e))? {
        None => Ok(None),
        Some(bytes) => super::decode::<Request<C>>("raft request", &bytes)
            .map(Some)
            .map_err(|e| undecodable(&e)),
    }
}

async fn answer<C, SM>(
    raft: Raft<C, SM>,
    spool: Spool,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) where
    C: Group,
    SM: RaftStateMachine<C, SnapshotData = C::Body>,
{
    let response = match read_request::<C>(&mut recv).await {
        Err(e) => Response::Failed(e),
        Ok(None) => Response::Failed("no request".into()),
        Ok(Some(Request::AppendStream)) => return answer_appends(raft, send, recv).await,
        Ok(Some(Request::Append(rpc))) => match raft.append_entries(rpc).await {
            Ok(r) => Response::Append(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Some(Request::Vote(rpc))) => match raft.vote(rpc).await {
            Ok(r) => Response::Vote(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Some(Request::PreVote(rpc))) => match raft.pre_vote(rpc).await {
            Ok(r) => Response::PreVote(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Some(Request::TransferLeader(req))) => match raft.handle_transfer_leader(req).await {
            Ok(r) => Response::TransferLeader(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Some(Request::Snapshot { vote, meta, len })) => {
            match C::Body::receive(&mut recv, len, &meta, &spool).await {
                Err(e) => Response::Failed(format!("receiving the snapshot: {e}")),
                Ok(body) => {
                    let snapshot = SnapshotOf::<C, C::Body> {
                        meta,
                        snapshot: body,
                    };
                    match raft.install_full_snapshot(vote, snapshot).await {
                        Ok(r) => Response::Snapshot(r),
                        Err(e) => Response::Failed(e.to_string()),
                    }
                }
            }
        }
    };
    if let Ok(bytes) = super::encode("raft answer", &response) {
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        // Wait for the peer to read the answer before the stream goes.
        let _ = send.stopped().await;
    }
}

/// Answer a replication stream: hand its appends to `raft` as they come
/// and write each one's result, in order, until the leader's appends end
/// (or one is refused, or cannot be read).
async fn answer_appends<C, SM>(
    raft: Raft<C, SM>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) where
    C: Group,
    SM: RaftStateMachine<C, SnapshotData = C::Body>,
{
    let appends = futures::stream::unfold(recv, |mut recv| async move {
        match read_request::<C>(&mut recv).await {
            Ok(Some(Request::Append(rpc))) => Some((rpc, recv)),
            Ok(None) => None,
            Ok(Some(_)) => {
                tracing::warn!("a replication stream carried another request; ending it");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "ending a replication stream");
                None
            }
        }
    });
    let answers = raft.stream_append(appends);
    futures::pin_mut!(answers);
    while let Some(answer) = answers.next().await {
        let (response, last) = match answer {
            Ok(result) => {
                let refused = result.is_err();
                (Response::<C>::Streamed(result), refused)
            }
            Err(fatal) => (Response::Failed(fatal.to_string()), true),
        };
        if write_frame(&mut send, "raft answer", &response)
            .await
            .is_err()
        {
            return;
        }
        if last {
            break;
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Dials other nodes from `endpoint` with `config` (this node's identity).
#[derive(Clone)]
pub struct QuicNetwork {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl QuicNetwork {
    /// A network dialling from `endpoint`.
    pub fn new(endpoint: quinn::Endpoint, config: quinn::ClientConfig) -> Self {
        Self { endpoint, config }
    }
}

/// One peer: its Raft address (from its [`Peer`]), the name its
/// certificate must carry, and the connection while it lasts.
pub struct QuicPeer<C> {
    net: QuicNetwork,
    target: u64,
    addr: String,
    conn: Option<quinn::Connection>,
    _c: std::marker::PhantomData<C>,
}

fn unreachable<C: Group>(e: impl std::fmt::Display) -> Unreachable<C> {
    Unreachable::new(&std::io::Error::other(e.to_string()))
}

impl<C: Group> QuicPeer<C> {
    async fn connection(&mut self) -> Result<quinn::Connection, Unreachable<C>> {
        if let Some(c) = &self.conn
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let addr: SocketAddr = self.addr.parse().map_err(|e| {
            unreachable(format!("node {} address `{}`: {e}", self.target, self.addr))
        })?;
        let conn = self
            .net
            .endpoint
            .connect_with(
                self.net.config.clone(),
                addr,
                &crate::tls::node_name(self.target),
            )
            .map_err(unreachable)?
            .await
            .map_err(unreachable)?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// [`QuicPeer::call`] without a body, bounded by `option`'s time (at
    /// least [`RPC_TIMEOUT_FLOOR`]).
    async fn rpc(
        &mut self,
        request: &Request<C>,
        option: &RPCOption,
    ) -> Result<Response<C>, Unreachable<C>> {
        let limit = option.hard_ttl().max(RPC_TIMEOUT_FLOOR);
        match tokio::time::timeout(limit, self.call(request, None)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.conn = None;
                Err(unreachable(format!(
                    "node {}: no answer in {limit:?}",
                    self.target
                )))
            }
        }
    }

    /// Open a stream to the peer and write `request` on it.
    async fn open(
        &mut self,
        request: &Request<C>,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), Unreachable<C>> {
        let conn = self.connection().await?;
        let (mut send, recv) = conn.open_bi().await.map_err(unreachable)?;
        write_frame(&mut send, "raft request", request)
            .await
            .map_err(unreachable)?;
        Ok((send, recv))
    }

    /// Send `request` (and `body` after it) and read the answer.
    async fn call(
        &mut self,
        request: &Request<C>,
        body: Option<C::Body>,
    ) -> Result<Response<C>, Unreachable<C>> {
        let result = async {
            let (mut send, mut recv) = self.open(request).await?;
            if let Some(body) = body {
                body.send(&mut send).await.map_err(unreachable)?;
            }
            send.finish().map_err(unreachable)?;
            let answer = recv.read_to_end(MAX_MESSAGE).await.map_err(unreachable)?;
            super::decode::<Response<C>>("raft answer", &answer).map_err(unreachable)
        }
        .await;
        if result.is_err() {
            self.conn = None;
        }
        match result? {
            Response::Failed(e) => Err(unreachable(format!("node {}: {e}", self.target))),
            r => Ok(r),
        }
    }
}

/// A replication stream's appends in flight: a slot for each one that may
/// still be sent, and when each unanswered one was sent, oldest first.
struct Pipe {
    slots: Semaphore,
    sent: Mutex<VecDeque<Instant>>,
}

impl Pipe {
    fn sent(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest unanswered append was answered: its slot is free again
    /// (false if none was owed).
    fn answered(&self) -> bool {
        let owed = self.sent().pop_front().is_some();
        if owed {
            self.slots.add_permits(1);
        }
        owed
    }
}

/// Write the leader's `appends` to a replication stream as they come,
/// each after a slot of `pipe` is free, then end the stream.
async fn send_appends<C: Group, S>(mut send: quinn::SendStream, mut appends: S, pipe: Arc<Pipe>)
where
    S: Stream<Item = AppendEntriesRequest<C>> + Unpin,
{
    loop {
        let Ok(slot) = pipe.slots.acquire().await else {
            return;
        };
        slot.forget();
        let Some(rpc) = appends.next().await else {
            break;
        };
        // Counted before it is written, so that an append the network
        // swallows is overdue like one the peer does not answer.
        pipe.sent().push_back(Instant::now());
        if write_frame(&mut send, "raft request", &Request::<C>::Append(rpc))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = send.finish();
}

/// The answers of a replication stream, read in order.
struct Answers<'s, C: Group> {
    recv: quinn::RecvStream,
    pipe: Arc<Pipe>,
    /// How long an append may go unanswered.
    limit: Duration,
    target: u64,
    /// The peer's connection, forgotten when the stream fails.
    conn: &'s mut Option<quinn::Connection>,
    sender: tokio::task::JoinHandle<()>,
    _c: std::marker::PhantomData<C>,
}

impl<C: Group> Drop for Answers<'_, C> {
    fn drop(&mut self) {
        // The sender holds openraft's request stream, which the next
        // replication session needs.
        self.sender.abort();
    }
}

impl<C: Group> Answers<'_, C> {
    /// The next answer; `None` where the stream ended with every append
    /// answered.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<C>, RPCError<C>>> {
        // `None` where the oldest unanswered append is overdue.
        let frame = {
            let read = read_frame(&mut self.recv);
            futures::pin_mut!(read);
            loop {
                let oldest = self.pipe.sent().front().copied();
                let deadline = oldest.unwrap_or_else(Instant::now) + self.limit;
                tokio::select! {
                    frame = &mut read => break Some(frame),
                    _ = tokio::time::sleep_until(deadline) => {
                        if oldest.is_some() && self.pipe.sent().front() == oldest.as_ref() {
                            break None;
                        }
                    }
                }
            }
        };
        let Some(frame) = frame else {
            let limit = self.limit;
            return self.failed(format!("an append unanswered for {limit:?}"), true);
        };
        match frame {
            Err(e) => self.failed(format!("replication stream: {e}"), true),
            Ok(None) => {
                let owed = self.pipe.sent().len();
                if owed == 0 {
                    None
                } else {
                    self.failed(format!("the stream ended {owed} answers short"), true)
                }
            }
            Ok(Some(bytes)) => match super::decode::<Response<C>>("raft answer", &bytes) {
                Ok(Response::Streamed(result)) if self.pipe.answered() => Some(Ok(result)),
                Ok(Response::Streamed(_)) => self.failed("an answer to no append".into(), true),
                // The peer is there and said why: its connection stays.
                Ok(Response::Failed(e)) => self.failed(e, false),
                Ok(_) => self.failed("the peer answered another request".into(), true),
                Err(e) => self.failed(e.to_string(), true),
            },
        }
    }

    /// The stream failed for `why`; `forget` drops the peer's connection
    /// too (it is broken or the peer is not speaking the protocol).
    fn failed(
        &mut self,
        why: String,
        forget: bool,
    ) -> Option<Result<StreamAppendResult<C>, RPCError<C>>> {
        if forget {
            *self.conn = None;
        }
        Some(Err(
            unreachable(format!("node {}: {why}", self.target)).into()
        ))
    }
}

fn unexpected<C: Group>() -> Unreachable<C> {
    unreachable("the peer answered another request")
}

impl<C: Group> RaftNetworkFactory<C> for QuicNetwork {
    type Network = QuicPeer<C>;

    async fn new_client(&mut self, target: u64, node: &Peer) -> QuicPeer<C> {
        QuicPeer {
            net: self.clone(),
            target,
            addr: node.raft.clone(),
            conn: None,
            _c: std::marker::PhantomData,
        }
    }
}

impl<C: Group> RaftNetworkV2<C> for QuicPeer<C> {
    type SnapshotData = C::Body;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        match self.rpc(&Request::Append(rpc), &option).await? {
            Response::Append(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        appends: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + openraft::OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let limit = option.soft_ttl().max(RPC_TIMEOUT_FLOOR);
            let target = self.target;
            let opened = tokio::time::timeout(limit, self.open(&Request::AppendStream))
                .await
                .unwrap_or_else(|_| {
                    Err(unreachable(format!(
                        "node {target}: no stream in {limit:?}"
                    )))
                });
            let (send, recv) = match opened {
                Ok(streams) => streams,
                Err(e) => {
                    self.conn = None;
                    return Err(e.into());
                }
            };
            let pipe = Arc::new(Pipe {
                slots: Semaphore::new(PIPELINE),
                sent: Mutex::new(VecDeque::with_capacity(PIPELINE)),
            });
            let sender = tokio::spawn(send_appends::<C, S>(send, appends, pipe.clone()));
            let answers = Answers {
                recv,
                pipe,
                limit,
                target,
                conn: &mut self.conn,
                sender,
                _c: std::marker::PhantomData,
            };
            let answers = futures::stream::unfold(Some(answers), |answers| async move {
                let mut answers = answers?;
                let answer = answers.next().await?;
                // After a refusal or a failure the stream is over.
                let go_on = matches!(answer, Ok(Ok(_)));
                Some((answer, go_on.then_some(answers)))
            });
            Ok(Box::pin(answers) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.rpc(&Request::Vote(rpc), &option).await? {
            Response::Vote(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.rpc(&Request::PreVote(rpc), &option).await? {
            Response::PreVote(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        match self.rpc(&Request::TransferLeader(req), &option).await? {
            Response::TransferLeader(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            len: snapshot.snapshot.size(),
        };
        // No time bound: a large snapshot takes what it takes; the
        // transfer ends when the leader's replication to this peer does.
        tokio::select! {
            closed = cancel => Err(closed.into()),
            answer = self.call(&request, Some(snapshot.snapshot)) => match answer {
                Ok(Response::Snapshot(r)) => Ok(r),
                Ok(_) => Err(unexpected().into()),
                Err(e) => {
                    tracing::warn!(node = self.target, error = %e, "sending a snapshot failed; retrying");
                    Err(e.into())
                }
            },
        }
    }
}
