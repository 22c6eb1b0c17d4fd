//! Raft messages between nodes over QUIC with mutual TLS.
//!
//! Each RPC is one bidirectional stream: the request, encoded, then the
//! stream's end; the answer the same way back. Both sides read at most
//! [`MAX_MESSAGE`] bytes, so no peer can make a node buffer more. Nodes
//! present certificates of the cluster CA ([`crate::tls::NodeTls`]) and
//! speak ALPN [`crate::tls::CLUSTER_ALPN`]; a tenant's or administrator's
//! certificate chains to another CA and is refused at the handshake.

use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};

use super::MetaGroup;
use super::meta::MetaState;

/// Largest request or answer, bytes: an append carries at most
/// [`MAX_ENTRIES`] entries of at most [`super::store::MAX_OP_BYTES`] each
/// (and a snapshot of the metadata).
pub const MAX_MESSAGE: usize = MAX_ENTRIES as usize * (super::store::MAX_OP_BYTES + (1 << 20));

/// Most log entries one append carries (openraft's `max_payload_entries`).
pub const MAX_ENTRIES: u64 = 4;

/// What a group's type configuration must be to travel here.
pub trait Group: RaftTypeConfig<NodeId = u64, Node = BasicNode> {}
impl<C: RaftTypeConfig<NodeId = u64, Node = BasicNode>> Group for C {}

/// A Raft message to a node.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
enum Request<C: Group> {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    Snapshot {
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: Vec<u8>,
    },
    /// Would you vote for this candidate (no vote is cast, no term moves)?
    PreVote(VoteRequest<C>),
    /// The leader hands its leadership to the receiver.
    TransferLeader(TransferLeaderRequest<C>),
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
}

/// The metadata group's Raft on one node.
pub type MetaRaft = Raft<MetaGroup, MetaState>;

/// Answer Raft messages arriving on `endpoint` with `raft`, until the
/// endpoint is closed.
pub async fn serve<C, SM>(endpoint: quinn::Endpoint, raft: Raft<C, SM>)
where
    C: Group,
    SM: RaftStateMachine<C, SnapshotData = Cursor<Vec<u8>>>,
{
    while let Some(incoming) = endpoint.accept().await {
        let raft = raft.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(answer(raft.clone(), send, recv));
            }
        });
    }
}

async fn answer<C, SM>(raft: Raft<C, SM>, mut send: quinn::SendStream, mut recv: quinn::RecvStream)
where
    C: Group,
    SM: RaftStateMachine<C, SnapshotData = Cursor<Vec<u8>>>,
{
    let Ok(bytes) = recv.read_to_end(MAX_MESSAGE).await else {
        return;
    };
    let response = match super::decode::<Request<C>>("raft request", &bytes) {
        Err(e) => Response::Failed(format!("undecodable request: {e}")),
        Ok(Request::Append(rpc)) => match raft.append_entries(rpc).await {
            Ok(r) => Response::Append(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::Vote(rpc)) => match raft.vote(rpc).await {
            Ok(r) => Response::Vote(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::PreVote(rpc)) => match raft.pre_vote(rpc).await {
            Ok(r) => Response::PreVote(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::TransferLeader(req)) => match raft.handle_transfer_leader(req).await {
            Ok(r) => Response::TransferLeader(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::Snapshot { vote, meta, data }) => {
            let snapshot = SnapshotOf::<C, Cursor<Vec<u8>>> {
                meta,
                snapshot: Cursor::new(data),
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(r) => Response::Snapshot(r),
                Err(e) => Response::Failed(e.to_string()),
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

/// One peer: its address (a [`BasicNode`]'s `addr`), the name its
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

    async fn call(&mut self, request: &Request<C>) -> Result<Response<C>, Unreachable<C>> {
        let result = async {
            let conn = self.connection().await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(unreachable)?;
            let bytes = super::encode("raft request", request).map_err(unreachable)?;
            send.write_all(&bytes).await.map_err(unreachable)?;
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

fn unexpected<C: Group>() -> Unreachable<C> {
    unreachable("the peer answered another request")
}

impl<C: Group> RaftNetworkFactory<C> for QuicNetwork {
    type Network = QuicPeer<C>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> QuicPeer<C> {
        QuicPeer {
            net: self.clone(),
            target,
            addr: node.addr.clone(),
            conn: None,
            _c: std::marker::PhantomData,
        }
    }
}

impl<C: Group> RaftNetworkV2<C> for QuicPeer<C> {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        match self.call(&Request::Append(rpc)).await? {
            Response::Append(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(&Request::Vote(rpc)).await? {
            Response::Vote(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(&Request::PreVote(rpc)).await? {
            Response::PreVote(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        match self.call(&Request::TransferLeader(req)).await? {
            Response::TransferLeader(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Self::SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        match self.call(&request).await? {
            Response::Snapshot(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }
}
