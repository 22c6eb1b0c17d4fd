//! The frames.

use bincode::{Decode, Encode};

use crate::error::{DecodeError, ErrorCode};
use crate::limits::Limits;

/// An error with a stable code and a readable message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Readable explanation.
    pub message: String,
}

impl ErrorBody {
    /// Build an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A `not_leader` refusal naming the leader's client address, when
    /// the node knows it (the one place this message is written).
    pub fn not_leader(leader: Option<&str>) -> Self {
        let message = match leader {
            Some(addr) => format!("not the leader; {LEADER_AT}{addr}"),
            None => "not the leader; no leader is known yet (an election is under way)".into(),
        };
        Self::new(ErrorCode::NotLeader, message)
    }

    /// For a `not_leader` refusal, the leader's address it names, if any.
    pub fn leader(&self) -> Option<&str> {
        if self.code != ErrorCode::NotLeader {
            return None;
        }
        let (_, rest) = self.message.rsplit_once(LEADER_AT)?;
        rest.split_whitespace().next().filter(|a| !a.is_empty())
    }
}

/// What precedes the leader's address in a `not_leader` message.
const LEADER_AT: &str = "the leader is at ";

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ErrorBody {}

/// Behaviour of a full queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Overflow {
    /// Refuse publishes.
    RejectPublish,
    /// Drop the oldest message.
    DropHead,
}

/// Queue settings in a declare request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct QueueDecl {
    /// Queue name.
    pub name: String,
    /// Fsync before confirming (default true).
    pub durable: bool,
    /// Most messages held.
    pub max_length: Option<u64>,
    /// Behaviour at max-length.
    pub overflow: Overflow,
    /// Message TTL, milliseconds.
    pub ttl_ms: Option<u64>,
    /// Dead-letter queue.
    pub dead_letter: Option<String>,
    /// Deliveries before dead-lettering.
    pub delivery_limit: Option<u32>,
}

/// A request on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// Declare a queue.
    Declare(QueueDecl),
    /// Bind a queue to a pattern.
    Bind {
        /// Queue.
        queue: String,
        /// NATS-style pattern.
        pattern: String,
    },
    /// Remove a binding.
    Unbind {
        /// Queue.
        queue: String,
        /// Pattern.
        pattern: String,
    },
    /// Delete a queue.
    Delete {
        /// Queue.
        queue: String,
    },
    /// Drop a queue's ready messages.
    Purge {
        /// Queue.
        queue: String,
    },
    /// List queues.
    ListQueues,
    /// Start consuming; the server opens a delivery stream.
    Subscribe {
        /// Queue.
        queue: String,
        /// Most unacked deliveries.
        prefetch: u32,
    },
    /// Load or replace a plugin.
    LoadPlugin {
        /// Name inside the tenant.
        name: String,
        /// router, filter or authorizer.
        kind: String,
        /// Queue for a filter.
        queue: Option<String>,
        /// Component bytes.
        wasm: Vec<u8>,
        /// Configuration for init.
        config: Vec<(String, String)>,
    },
    /// List plugins.
    ListPlugins,
    /// Unload a plugin.
    UnloadPlugin {
        /// Name.
        name: String,
    },
    /// Usage per tenant.
    Stats,
    /// Register a tenant or replace its limits (admins).
    TenantCreate {
        /// Tenant name.
        name: String,
        /// Quotas.
        limits: TenantQuota,
    },
    /// Replace a registered tenant's limits (admins).
    TenantLimits {
        /// Tenant name.
        name: String,
        /// Quotas.
        limits: TenantQuota,
    },
    /// List registered tenants (admins).
    TenantList,
    /// Delete a tenant with its queues, messages, plugins and connections (admins).
    TenantDelete {
        /// Tenant name.
        name: String,
    },
    /// Answer once every ack, nack and reject sent on this connection for
    /// subscription `sub` before this request is applied and fsynced: an
    /// acked message is then never delivered again, even after a crash.
    SyncAcks {
        /// Subscription id.
        sub: u64,
    },
    /// The replicated group as the leader sees it (admins; a cluster's
    /// leader only).
    ClusterStatus,
    /// Hand the leadership to node `to` (admins; the leader only), e.g.
    /// before restarting the leader. Answered once handed over or refused;
    /// the connection then closes with the old leader's term.
    ClusterTransfer {
        /// The member to lead next.
        to: u64,
    },
    /// Add node `node` to the cluster (admins; the leader only): as a
    /// learner, then, once it has caught up, as a voter (unless `learner`).
    /// Answered once done or refused.
    ClusterAdd {
        /// Its id.
        node: u64,
        /// Its Raft address (`ip:port`).
        raft: String,
        /// Its client address (`ip:port`).
        client: String,
        /// Keep it a learner (replicated to, not voting).
        learner: bool,
    },
    /// Remove node `node` from the cluster (admins; the leader only; a
    /// removed leader hands its leadership over).
    ClusterRemove {
        /// Its id.
        node: u64,
    },
}

/// Per-tenant quotas; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct TenantQuota {
    /// Concurrent connections.
    pub max_connections: Option<u32>,
    /// Queues.
    pub max_queues: Option<u32>,
    /// Stored bytes.
    pub max_stored_bytes: Option<u64>,
    /// Messages per second.
    pub max_publish_rate: Option<u32>,
    /// Largest message, bytes.
    pub max_message_bytes: Option<u32>,
}

/// A registered tenant as listed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TenantSummary {
    /// Name.
    pub name: String,
    /// Quotas.
    pub limits: TenantQuota,
    /// Open connections.
    pub connections: u64,
    /// Queues.
    pub queues: u64,
    /// Stored bytes.
    pub bytes: u64,
}

/// A successful response.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    /// Done, nothing to report.
    Ok,
    /// A count (purged messages).
    Count(u64),
    /// Queues.
    Queues(Vec<QueueSummary>),
    /// A subscription started.
    Subscribed {
        /// Its id, also sent first on its delivery stream.
        sub: u64,
    },
    /// Plugins.
    Plugins(Vec<PluginSummary>),
    /// Usage.
    Stats(Vec<TenantUsage>),
    /// Registered tenants.
    Tenants(Vec<TenantSummary>),
    /// The replicated group.
    Cluster(ClusterSummary),
}

/// A cluster's data group as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ClusterSummary {
    /// The node answering.
    pub node: u64,
    /// Its role: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows.
    pub leader: Option<u64>,
    /// Index of the last entry in its log.
    pub last_log: u64,
    /// Index of the last entry it knows committed.
    pub committed: u64,
    /// Index of the last entry applied to its store.
    pub applied: u64,
    /// Last index its newest snapshot of the store covers (0: none yet).
    pub snapshot: u64,
    /// Its log holds no entry up to this index (0: none purged).
    pub purged: u64,
    /// Voting members.
    pub members: Vec<u64>,
    /// Members replicated to that do not vote (nodes being added).
    pub learners: Vec<u64>,
    /// Each other member: the last index it is known to hold.
    pub followers: Vec<FollowerSummary>,
}

/// A follower as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FollowerSummary {
    /// Node id.
    pub node: u64,
    /// Last index it acknowledged (`None`: none yet).
    pub matched: Option<u64>,
    /// Entries of the leader's log it is not known to hold.
    pub lag: u64,
}

/// A queue as listed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct QueueSummary {
    /// Name.
    pub name: String,
    /// Durable.
    pub durable: bool,
    /// Ready messages.
    pub ready: u64,
    /// Unacked deliveries.
    pub unacked: u64,
    /// Stored bytes.
    pub bytes: u64,
    /// Consumers.
    pub consumers: u64,
    /// Messages stored since start.
    pub published: u64,
    /// Dead-lettered since start.
    pub dead_lettered: u64,
    /// Filters, in order.
    pub filters: Vec<String>,
}

/// A plugin as listed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PluginSummary {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Queue of a filter.
    pub queue: Option<String>,
    /// Contract version the component was built against, e.g. `0.2.0`.
    pub abi: String,
    /// `ready` or `errored: <reason>`.
    pub state: String,
    /// Calls.
    pub calls: u64,
    /// Guest errors.
    pub errors: u64,
    /// Traps.
    pub traps: u64,
    /// Mean call time in nanoseconds.
    pub mean_ns: u64,
}

/// Usage of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TenantUsage {
    /// Tenant.
    pub tenant: String,
    /// Queues.
    pub queues: u64,
    /// Ready messages.
    pub ready: u64,
    /// Unacked deliveries.
    pub unacked: u64,
    /// Stored bytes.
    pub bytes: u64,
    /// Published since start.
    pub published: u64,
    /// Delivered since start.
    pub delivered: u64,
    /// Plugins.
    pub plugins: u64,
    /// Plugins configured but not running (they fail closed: an authorizer
    /// denies, a router refuses, a filter dead-letters).
    pub plugins_not_running: u64,
}

/// One delivered message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Delivery {
    /// Tag for ack/nack/reject.
    pub tag: u64,
    /// Topic.
    pub topic: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Delivered before.
    pub redelivered: bool,
}

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Frame {
    /// Client → server, first frame: supported versions.
    Hello {
        /// Oldest version.
        min_version: u16,
        /// Newest version.
        max_version: u16,
        /// Client software, for logs.
        agent: String,
    },
    /// Server → client: the session is open.
    Welcome {
        /// Chosen version.
        version: u16,
        /// Tenant from the certificate ("" for admins).
        tenant: String,
        /// Client name from the certificate.
        client: String,
        /// Whether the client is an administrator.
        admin: bool,
        /// Largest message the server accepts.
        max_message: u32,
    },
    /// Client → server request.
    Request {
        /// Correlates the response.
        id: u64,
        /// Tenant to act on (admins only; tenants may name their own).
        tenant: Option<String>,
        /// The request.
        body: Request,
    },
    /// Server → client response.
    Response {
        /// The request's id.
        id: u64,
        /// Result.
        body: Result<Response, ErrorBody>,
    },
    /// Client → server: publish one message.
    Publish {
        /// Client sequence number (increasing).
        seq: u64,
        /// Tenant (admins only).
        tenant: Option<String>,
        /// Topic.
        topic: String,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Server → client: publishes `first..first+queues.len()` are durable;
    /// `queues[i]` is how many queues message `first+i` reached.
    Confirm {
        /// First sequence number.
        first: u64,
        /// Per message, the number of queues it was stored in.
        queues: Vec<u32>,
    },
    /// Server → client: a publish was refused.
    Refused {
        /// Its sequence number.
        seq: u64,
        /// Why.
        error: ErrorBody,
    },
    /// Server → client, first frame of a delivery stream.
    StreamStart {
        /// Subscription id.
        sub: u64,
    },
    /// Server → client: deliveries of a subscription.
    Deliver {
        /// Subscription id.
        sub: u64,
        /// The messages.
        deliveries: Vec<Delivery>,
    },
    /// Client → server: acknowledge (remove).
    Ack {
        /// Subscription id.
        sub: u64,
        /// Inclusive tag ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Client → server: requeue.
    Nack {
        /// Subscription id.
        sub: u64,
        /// Inclusive tag ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Client → server: dead-letter.
    Reject {
        /// Subscription id.
        sub: u64,
        /// Inclusive tag ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Client → server: stop a subscription (unacked messages are requeued).
    Cancel {
        /// Subscription id.
        sub: u64,
    },
    /// Either way: a connection-level error.
    Error(ErrorBody),
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::Limit { what, max })
    } else {
        Ok(())
    }
}

fn check_headers(h: &[(String, String)], limits: &Limits) -> Result<(), DecodeError> {
    check_len("headers", h.len(), limits.max_headers)?;
    let bytes: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
    check_len("header bytes", bytes, limits.max_header_bytes)
}

fn check_name(what: &'static str, s: &str, limits: &Limits) -> Result<(), DecodeError> {
    check_len(what, s.len(), limits.max_name)
}

impl Frame {
    /// Check every collection and name against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), DecodeError> {
        match self {
            Frame::Hello { agent, .. } => check_name("agent", agent, limits),
            Frame::Welcome { tenant, client, .. } => {
                check_name("tenant", tenant, limits)?;
                check_name("client", client, limits)
            }
            Frame::Request { tenant, body, .. } => {
                if let Some(t) = tenant {
                    check_name("tenant", t, limits)?;
                }
                match body {
                    Request::Declare(d) => {
                        check_name("queue", &d.name, limits)?;
                        d.dead_letter
                            .as_deref()
                            .map_or(Ok(()), |q| check_name("queue", q, limits))
                    }
                    Request::Bind { queue, pattern } | Request::Unbind { queue, pattern } => {
                        check_name("queue", queue, limits)?;
                        check_name("pattern", pattern, limits)
                    }
                    Request::Delete { queue }
                    | Request::Purge { queue }
                    | Request::Subscribe { queue, .. } => check_name("queue", queue, limits),
                    Request::LoadPlugin {
                        name,
                        kind,
                        queue,
                        config,
                        ..
                    } => {
                        check_name("plugin", name, limits)?;
                        check_name("kind", kind, limits)?;
                        if let Some(q) = queue {
                            check_name("queue", q, limits)?;
                        }
                        check_len("config entries", config.len(), limits.max_headers)?;
                        check_headers(config, limits)
                    }
                    Request::UnloadPlugin { name }
                    | Request::TenantDelete { name }
                    | Request::TenantCreate { name, .. }
                    | Request::TenantLimits { name, .. } => check_name("name", name, limits),
                    Request::TenantList
                    | Request::SyncAcks { .. }
                    | Request::ClusterStatus
                    | Request::ClusterTransfer { .. }
                    | Request::ClusterRemove { .. } => Ok(()),
                    Request::ClusterAdd { raft, client, .. } => {
                        check_name("raft address", raft, limits)?;
                        check_name("client address", client, limits)
                    }
                    Request::ListQueues | Request::ListPlugins | Request::Stats => Ok(()),
                }
            }
            Frame::Response { body, .. } => match body {
                Ok(Response::Queues(q)) => check_len("queues", q.len(), limits.max_list),
                Ok(Response::Plugins(p)) => check_len("plugins", p.len(), limits.max_list),
                Ok(Response::Stats(s)) => check_len("tenants", s.len(), limits.max_list),
                Ok(Response::Tenants(t)) => check_len("tenants", t.len(), limits.max_list),
                Ok(Response::Cluster(c)) => {
                    check_name("role", &c.role, limits)?;
                    check_len("members", c.members.len(), limits.max_list)?;
                    check_len("learners", c.learners.len(), limits.max_list)?;
                    check_len("followers", c.followers.len(), limits.max_list)
                }
                _ => Ok(()),
            },
            Frame::Publish {
                tenant,
                topic,
                headers,
                payload,
                ..
            } => {
                if let Some(t) = tenant {
                    check_name("tenant", t, limits)?;
                }
                check_name("topic", topic, limits)?;
                check_headers(headers, limits)?;
                check_len("payload", payload.len(), limits.max_payload)
            }
            Frame::Confirm { queues, .. } => {
                check_len("confirm batch", queues.len(), limits.max_batch)
            }
            Frame::Deliver { deliveries, .. } => {
                check_len("delivery batch", deliveries.len(), limits.max_batch)?;
                for d in deliveries {
                    check_name("topic", &d.topic, limits)?;
                    check_headers(&d.headers, limits)?;
                    check_len("payload", d.payload.len(), limits.max_payload)?;
                }
                Ok(())
            }
            Frame::Ack { ranges, .. }
            | Frame::Nack { ranges, .. }
            | Frame::Reject { ranges, .. } => {
                check_len("ack ranges", ranges.len(), limits.max_ranges)
            }
            Frame::Refused { .. }
            | Frame::StreamStart { .. }
            | Frame::Cancel { .. }
            | Frame::Error(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_leader_refusal_names_the_leader_it_knows() {
        let e = ErrorBody::not_leader(Some("127.0.0.1:7602"));
        assert_eq!(e.code, ErrorCode::NotLeader);
        assert_eq!(e.leader(), Some("127.0.0.1:7602"));
        assert_eq!(ErrorBody::not_leader(None).leader(), None);
        // Only a not_leader code carries a leader.
        let other = ErrorBody::new(ErrorCode::Invalid, "the leader is at 10.0.0.1:1");
        assert_eq!(other.leader(), None);
    }
}
