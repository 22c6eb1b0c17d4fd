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
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend, Raft};
use serde::{Deserialize, Serialize};

use super::MetaGroup;
use super::meta::MetaState;

/// Largest request or answer, bytes (a snapshot of the metadata included).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A Raft message to a node.
#[derive(Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<MetaGroup>),
    Vote(VoteRequest<MetaGroup>),
    Snapshot {
        vote: VoteOf<MetaGroup>,
        meta: SnapshotMetaOf<MetaGroup>,
        data: Vec<u8>,
    },
}

/// A node's answer.
#[derive(Serialize, Deserialize)]
enum Response {
    Append(AppendEntriesResponse<MetaGroup>),
    Vote(VoteResponse<MetaGroup>),
    Snapshot(SnapshotResponse<MetaGroup>),
    /// The node could not handle the request (shutting down, say).
    Failed(String),
}

/// The metadata group's Raft on one node.
pub type MetaRaft = Raft<MetaGroup, MetaState>;

/// Answer Raft messages arriving on `endpoint` with `raft`, until the
/// endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, raft: MetaRaft) {
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

async fn answer(raft: MetaRaft, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let Ok(bytes) = recv.read_to_end(MAX_MESSAGE).await else {
        return;
    };
    let response = match serde_json::from_slice::<Request>(&bytes) {
        Err(e) => Response::Failed(format!("undecodable request: {e}")),
        Ok(Request::Append(rpc)) => match raft.append_entries(rpc).await {
            Ok(r) => Response::Append(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::Vote(rpc)) => match raft.vote(rpc).await {
            Ok(r) => Response::Vote(r),
            Err(e) => Response::Failed(e.to_string()),
        },
        Ok(Request::Snapshot { vote, meta, data }) => {
            let snapshot = SnapshotOf::<MetaGroup, Cursor<Vec<u8>>> {
                meta,
                snapshot: Cursor::new(data),
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(r) => Response::Snapshot(r),
                Err(e) => Response::Failed(e.to_string()),
            }
        }
    };
    if let Ok(bytes) = serde_json::to_vec(&response) {
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
pub struct QuicPeer {
    net: QuicNetwork,
    target: u64,
    addr: String,
    conn: Option<quinn::Connection>,
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<MetaGroup> {
    Unreachable::new(&std::io::Error::other(e.to_string()))
}

impl QuicPeer {
    async fn connection(&mut self) -> Result<quinn::Connection, Unreachable<MetaGroup>> {
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

    async fn call(&mut self, request: &Request) -> Result<Response, Unreachable<MetaGroup>> {
        let result = async {
            let conn = self.connection().await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(unreachable)?;
            let bytes = serde_json::to_vec(request).map_err(unreachable)?;
            send.write_all(&bytes).await.map_err(unreachable)?;
            send.finish().map_err(unreachable)?;
            let answer = recv.read_to_end(MAX_MESSAGE).await.map_err(unreachable)?;
            serde_json::from_slice::<Response>(&answer).map_err(unreachable)
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

fn unexpected() -> Unreachable<MetaGroup> {
    unreachable("the peer answered another request")
}

impl RaftNetworkFactory<MetaGroup> for QuicNetwork {
    type Network = QuicPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> QuicPeer {
        QuicPeer {
            net: self.clone(),
            target,
            addr: node.addr.clone(),
            conn: None,
        }
    }
}

impl RaftNetworkV2<MetaGroup> for QuicPeer {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MetaGroup>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<MetaGroup>, RPCError<MetaGroup>> {
        match self.call(&Request::Append(rpc)).await? {
            Response::Append(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MetaGroup>,
        _option: RPCOption,
    ) -> Result<VoteResponse<MetaGroup>, RPCError<MetaGroup>> {
        match self.call(&Request::Vote(rpc)).await? {
            Response::Vote(r) => Ok(r),
            _ => Err(unexpected().into()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<MetaGroup>,
        snapshot: SnapshotOf<MetaGroup, Self::SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<MetaGroup>, StreamingError<MetaGroup>> {
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
