//! Replication on openraft.
//!
//! A Sluice cluster replicates its state through Raft groups run by
//! [openraft](https://docs.rs/openraft) (`0.10.0-alpha.37`, pinned): a
//! metadata group on every node (tenants, queues, bindings, plugins) and
//! data groups holding queues. This module is the one home of everything
//! that knows openraft's types; the rest of the broker talks to it in its
//! own terms.
//!
//! Today a node runs one group, the data group, and it carries everything
//! the broker stores (its metadata too); the metadata group's state
//! machine exists and is tested but no node runs it yet. What is here:
//!
//! - [`log::FileLog`]: the Raft log and vote in files of its own (segments
//!   of checksummed records, entries never held in memory). `append` returns once
//!   the entries are readable and reports them flushed only after
//!   `fdatasync` (one flusher thread, which group-commits the flushes of
//!   appends that arrive while it syncs); the vote is durable before
//!   `save_vote` returns.
//! - [`meta::MetaState`]: the metadata group's state machine, a keyed map of
//!   records ([`MetaCommand`]) with its applied log id and membership,
//!   applied atomically and durably, and snapshots built from a consistent
//!   view while entries keep being applied.
//!
//! - [`data`]: the data group, the broker's store as Raft state (one log
//!   entry per group commit of store writes, applied on every node to a
//!   local [`crate::store::Store`]); [`store::ReplicatedStore`], the
//!   leader's `MessageStore`, proposes the writes and reads locally.
//! - [`net`]: Raft messages between nodes over QUIC with mutual TLS, nodes
//!   holding certificates of a cluster CA of their own
//!   ([`crate::tls::init_node_certs`], `sluice certs init --node N`), so no tenant or administrator
//!   certificate of the broker's CA is ever answered; every message is
//!   read with a bound.
//!
//! Tested here: openraft's storage suite; kill -9 of a process appending
//! (nothing reported flushed is lost); three nodes replicating, losing
//! their leader and the old leader catching up from its directory (in
//! process and over QUIC on loopback).
//!
//! - [`node`]: one node as `sluice serve` runs it with `[cluster]`: the
//!   data group's Raft, and the broker it opens on a
//!   [`store::ReplicatedStore`] while it leads (clients of the other nodes
//!   are refused with `not_leader`, naming the leader).
//!
//! - [`snapshot`]: the data group's snapshots (the store exported to a
//!   checked file while nothing is applied), streamed to followers behind
//!   the purged log and installed by replacing their store.
//!
//! Members are [`Peer`]s in the membership the log holds: nodes are
//! added (as learners that catch up, then voters) and removed on the
//! leader ([`node`]), and known to every node from the log alone.
//!
//! Single-node brokers do not use this module. Still to come: a metadata
//! group apart from the data.

pub mod data;
pub mod log;
pub mod meta;
pub mod net;
pub mod node;
pub mod snapshot;
pub mod store;

use std::fmt;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The metadata group: every node holds it.
    pub MetaGroup:
        D = MetaCommand,
        R = MetaResponse,
        Node = Peer,
);

/// A member of a group as its membership (in the log) records it: where
/// its peers and its clients reach it. Nodes added with `sluice cluster
/// add` are known from here alone, not from anyone's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its Raft address (`host:port`), dialled by the other nodes.
    pub raft: String,
    /// Its client address (told to clients in `not_leader`).
    pub client: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft {}, clients {}", self.raft, self.client)
    }
}

/// A change to the metadata group's records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Set `key` to `value`.
    Put {
        /// Record key (e.g. `queue/acme/orders`).
        key: String,
        /// Record value, encoded by its owner.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Record key.
        key: String,
    },
}

impl fmt::Display for MetaCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaCommand::Put { key, value } => write!(f, "put {key} ({} bytes)", value.len()),
            MetaCommand::Delete { key } => write!(f, "delete {key}"),
        }
    }
}

/// What applying a [`MetaCommand`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaResponse {
    /// The record's value before the command (`None`: there was none).
    pub previous: Option<Vec<u8>>,
}

/// An I/O error for a storage failure of `what`.
fn io_error(what: &str, e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Encoding of everything the cluster stores and sends: bincode, read
/// with a bound so a damaged length cannot make a node allocate more than
/// one message may hold.
const CODEC: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ net::MAX_MESSAGE }>,
> = bincode::config::standard().with_limit::<{ net::MAX_MESSAGE }>();

fn encode<T: Serialize>(what: &str, value: &T) -> std::io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, CODEC).map_err(|e| io_error(what, e))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> std::io::Result<T> {
    bincode::serde::decode_from_slice(bytes, CODEC)
        .map(|(v, _)| v)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

/// The value stored under `key` in `tree`, decoded (`what` names the
/// store in errors).
fn read<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &str,
    what: &str,
) -> std::io::Result<Option<T>> {
    match tree.get(key).map_err(|e| io_error(what, e))? {
        Some(bytes) => decode(key, &bytes).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;
