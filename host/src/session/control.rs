//! Requests on the control stream: queue and binding management, plugins,
//! tenants, stats; settles (ack, nack, reject) and `SyncAcks`. Broker calls
//! that may block (an authorizer plugin, a store sync) run on blocking
//! threads within the tenant's share.

use sluice_proto::{self as proto, ErrorBody, ErrorCode, Frame};
use tokio::sync::{mpsc, oneshot};

use super::deliver::deliver;
use super::{
    Held, Link, OPEN_STREAM_TIMEOUT, Ranges, SUB_COMMANDS, Session, SubCmd, SubHandle, error_body,
    queued,
};
use crate::broker::SessionPeakCounters;
use crate::broker::{Broker, BrokerError, Overflow, QueueOptions, Work};
use crate::plugins::{PluginKind, PluginState, Principal};

impl<L: Link> Session<L> {
    /// Queue a sync behind the subscription's pending settles; the response
    /// is sent when the store has fsynced them, without holding up the
    /// control stream meanwhile.
    pub(super) async fn sync_acks(&mut self, id: u64, sub: u64) {
        // At most PENDING_SYNCS wait at once; beyond, the control stream is
        // not read until one is answered.
        let Ok(permit) = self.syncs.clone().acquire_owned().await else {
            return;
        };
        let waiting = Held::new(&self.syncs_waiting, 1, &self.peaks.pending_syncs);
        let (tx, rx) = oneshot::channel();
        let queued = match self.subs.get(&sub) {
            Some(s) => {
                let sent = s.cmds.send(SubCmd::Sync(tx)).await.is_ok();
                SessionPeakCounters::note(&self.peaks.sub_commands, queued(&s.cmds));
                sent
            }
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
            let _waiting = waiting;
            let body = match rx.await {
                Ok(Ok(())) => Ok(proto::Response::Ok),
                Ok(Err(e)) => Err(error_body(&e)),
                Err(_) => Err(gone()),
            };
            let _ = out.send(Frame::Response { id, body }.into()).await;
        });
    }

    pub(super) async fn settle(
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
            SessionPeakCounters::note(&self.peaks.sub_commands, queued(&s.cmds));
        }
        Ok(())
    }

    /// Run a broker call that may block (authorizer plugin, store sync) on
    /// a blocking thread, at most the tenant's share of them at once, so no
    /// tenant stalls the async workers or another tenant's requests (see
    /// [`Broker::offload_request`]: in a plugin slot too if it may call one).
    async fn blocking<T: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(&Broker, &Principal) -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, BrokerError> {
        self.blocking_as(tenant, Work::Request, f).await
    }

    /// [`Session::blocking`] for work of kind `work`.
    async fn blocking_as<T: Send + 'static>(
        &self,
        tenant: &str,
        work: Work,
        f: impl FnOnce(&Broker, &Principal) -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, BrokerError> {
        let (b, who) = (self.broker.clone(), self.who.clone());
        self.broker
            .offload_request(&self.who, tenant, work, move || f(&b, &who))
            .await?
    }

    pub(super) async fn request(
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
            R::ClusterStatus => {
                let cluster = cluster_control(&b, &who, "the cluster's status")?;
                return Ok(S::Cluster((cluster.status)()));
            }
            R::ClusterTransfer { to } => {
                let cluster = cluster_control(&b, &who, "leadership transfer")?;
                (cluster.transfer)(to)
                    .await
                    .map_err(BrokerError::Conflict)?;
                return Ok(S::Ok);
            }
            R::ClusterAdd {
                node,
                raft,
                client,
                learner,
            } => {
                let cluster = cluster_control(&b, &who, "adding a node")?;
                let new = crate::broker::NewMember {
                    node,
                    raft,
                    client,
                    learner,
                };
                (cluster.add)(new).await.map_err(BrokerError::Conflict)?;
                return Ok(S::Ok);
            }
            R::ClusterRemove { node } => {
                let cluster = cluster_control(&b, &who, "removing a node")?;
                (cluster.remove)(node)
                    .await
                    .map_err(BrokerError::Conflict)?;
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
                let stream = match tokio::time::timeout(
                    OPEN_STREAM_TIMEOUT,
                    self.link.open_stream(),
                )
                .await
                {
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
                self.blocking_as(&scope, Work::Load, move |b, who| {
                    b.load_plugin(who, &t, load)
                })
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
            | R::ClusterStatus
            | R::ClusterTransfer { .. }
            | R::ClusterAdd { .. }
            | R::ClusterRemove { .. }
            | R::SyncAcks { .. } => {
                unreachable!("answered above")
            }
        })
    }
}

/// The cluster's controls for an administrator's request about `what`.
fn cluster_control<'b>(
    b: &'b Broker,
    who: &Principal,
    what: &str,
) -> Result<&'b crate::broker::ClusterControl, BrokerError> {
    if !who.admin {
        return Err(BrokerError::Unauthorized(format!(
            "{what} is for administrators"
        )));
    }
    b.config().cluster.as_ref().ok_or_else(|| {
        BrokerError::Conflict("not a cluster: this broker runs as a single node".into())
    })
}
