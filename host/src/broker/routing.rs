//! The publish path: bindings, then the tenant's router plugin, then each
//! target queue's filter plugins, then one group commit, then delivery.
//! This is the only place router and filter plugins are called.

use std::sync::Arc;

use super::limits::{check_storable, with_death_headers};
use super::queue::{MsgRef, Queue};
use super::tenant::Tenant;
use super::{Broker, BrokerError, expiry, now_ms};
use crate::plugins::{Action, FailureKind, FilterVerdict, Message, Principal, Resource};
use crate::store::{Append, Commit, StoredMessage};

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic (dot-separated tokens).
    pub topic: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A message in its stored form, encoded once (on the routing thread).
struct Encoded {
    value: Vec<u8>,
    expires_at: u64,
}

impl From<StoredMessage> for Encoded {
    fn from(m: StoredMessage) -> Self {
        Self {
            value: m.encode(),
            expires_at: m.expires_at_ms,
        }
    }
}

/// A target queue, its filters in order, and its dead-letter queue.
type Target = (Arc<Queue>, Vec<String>, Option<Arc<Queue>>);

/// Where one message goes after routing and filtering.
#[derive(Default)]
struct Routed {
    /// Queues that store it, with the (possibly transformed) message.
    stores: Vec<(Arc<Queue>, Encoded)>,
    /// Dead-letter queues receiving it because a filter failed.
    dead: Vec<(Arc<Queue>, Encoded)>,
}

/// Enter a router or filter call of `t` (see [`Tenant::plugin_call`]). A
/// message routed on an async worker (no plugin was attached when the
/// publish began) is refused rather than run a plugin there; the client
/// publishes it again.
fn plugin_call(t: &Tenant) -> Result<super::offload::PluginCall<'_>, BrokerError> {
    let call = t.plugin_call().map_err(BrokerError::Conflict)?;
    if !call.offloaded {
        return Err(BrokerError::Conflict(format!(
            "the plugins of tenant `{}` changed while this message was routed; publish it again",
            t.name
        )));
    }
    Ok(call)
}

impl Broker {
    /// Publish messages for `who` into `tenant`. Returns, per message in
    /// order, the number of queues it was stored in (after fsync for
    /// durable queues) or why it was refused.
    pub async fn publish(
        &self,
        who: &Principal,
        tenant: &str,
        msgs: Vec<Publish>,
    ) -> Vec<Result<u32, BrokerError>> {
        self.prepare_publish(who, tenant, msgs).await.finish().await
    }

    /// The first half of [`Broker::publish`]: route and filter, reserve
    /// room and ids, and hand the messages to the group commit. The commit
    /// runs while the caller prepares its next batch; [`PendingPublish::finish`]
    /// waits for it and makes the messages ready. Finishing pending
    /// publishes in the order they were prepared keeps every queue in
    /// publish order.
    pub async fn prepare_publish(
        &self,
        who: &Principal,
        tenant: &str,
        msgs: Vec<Publish>,
    ) -> PendingPublish {
        let refused = |results| PendingPublish::settled(self, results);
        let t = self.tenant(tenant);
        let has_plugins = {
            let ts = t.read();
            ts.router.is_some() || !ts.filters.is_empty() || ts.authorizer.is_some()
        };
        let n = msgs.len();
        let mut routed: Vec<Result<Routed, BrokerError>> = if has_plugins {
            // Plugin calls are synchronous and may run up to their deadline:
            // keep them off the async workers, and run at most the tenant's
            // share of them at once so one tenant cannot occupy every worker.
            let Ok(permit) = t.plugin_slots.clone().acquire_owned().await else {
                return refused((0..n).map(|_| Err(BrokerError::ShuttingDown)).collect());
            };
            let (broker, who, tenant_name) = (self.clone(), who.clone(), tenant.to_string());
            match self
                .offload_with_slot(tenant, super::Work::Messages(n), Some(permit), move || {
                    let t = broker.tenant(&tenant_name);
                    msgs.iter().map(|m| broker.route(&t, &who, m)).collect()
                })
                .await
            {
                Ok(r) => r,
                Err(e) => return refused((0..n).map(|_| Err(e.clone())).collect()),
            }
        } else {
            msgs.iter().map(|m| self.route(&t, who, m)).collect()
        };
        if let Some(max) = t.limits().max_stored_bytes {
            // Refuse, in order, the messages that would take the tenant over
            // its stored-bytes quota.
            let mut total = t.stored_bytes();
            for r in routed.iter_mut() {
                let Ok(ok) = r else { continue };
                let size: u64 = ok
                    .stores
                    .iter()
                    .chain(ok.dead.iter())
                    .map(|(_, m)| m.value.len() as u64)
                    .sum();
                if total + size > max {
                    t.refused(super::Quota::StoredBytes, 1);
                    *r = Err(BrokerError::Quota(format!(
                        "tenant `{tenant}` would store more than {max} bytes"
                    )));
                } else {
                    total += size;
                }
            }
        }
        self.commit_routed(routed)
    }

    /// Validate, authorize, route and filter one message.
    fn route(&self, t: &Tenant, who: &Principal, msg: &Publish) -> Result<Routed, BrokerError> {
        super::names::check_topic(&msg.topic)?;
        let limits = t.limits();
        let global = self.inner.config.max_message_bytes;
        let tenant_max = limits.max_message_bytes.map(|m| m as usize);
        let max = tenant_max.map_or(global, |m| m.min(global));
        if let Err(e) = check_storable(&msg.headers, &msg.payload, max) {
            let size = msg.payload.len()
                + msg
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            // Over the tenant's own quota (and within the broker's limit):
            // a quota refusal; anything else is the broker's limit.
            return Err(match tenant_max {
                Some(m) if size > m && size <= global => {
                    t.refused(super::Quota::MessageBytes, 1);
                    BrokerError::Quota(e)
                }
                _ => BrokerError::Limit(e),
            });
        }
        self.check_rate(t, 1)?;
        self.authorize(
            who,
            &t.name,
            Action::Publish,
            &Resource::Topic(msg.topic.clone()),
        )?;
        let now = now_ms();
        let (candidates, router) = {
            let ts = t.read();
            (ts.bindings.matches(&msg.topic), ts.router.clone())
        };
        // The plugins' view of the message, built only if a plugin runs.
        let wit_message = || Message {
            topic: msg.topic.clone(),
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
            tenant: t.name.clone(),
            client: who.client.clone(),
            timestamp_ms: now,
            redelivery_count: 0,
        };
        let mut wit: Option<Message> = None;
        let mut targets = match router.as_deref() {
            None => candidates,
            Some(name) => {
                // A configured router that is not running refuses: the
                // bindings alone are not the tenant's routing policy.
                let plugin = self.running(t, name).map_err(BrokerError::Router)?;
                let _call = plugin_call(t)?;
                plugin
                    .route(wit.get_or_insert_with(wit_message), &candidates)
                    .map_err(|f| BrokerError::router(&f))?
            }
        };
        // A queue named twice is stored in once.
        let mut seen = std::collections::HashSet::with_capacity(targets.len());
        targets.retain(|q| seen.insert(q.clone()));
        drop(seen);
        if targets.is_empty() {
            return Err(BrokerError::NoRoute(msg.topic.clone()));
        }
        let max_fanout = self.inner.config.max_fanout;
        if targets.len() > max_fanout {
            return Err(BrokerError::Limit(format!(
                "a message on `{}` would be stored in {} queues (at most {max_fanout})",
                msg.topic,
                targets.len()
            )));
        }
        // Resolve the targets under one read lock: queue, its filters and
        // its dead-letter queue (no copy of the tenant's queue map).
        let resolved: Vec<Target> = {
            let ts = t.read();
            let mut out = Vec::with_capacity(targets.len());
            for name in &targets {
                let Some(q) = ts.queues.get(name) else {
                    if router.is_some() {
                        return Err(BrokerError::Router(format!(
                            "router chose unknown queue `{name}`"
                        )));
                    }
                    continue;
                };
                let filters = ts.filters.get(name).cloned().unwrap_or_default();
                let dlq = q
                    .options
                    .dead_letter
                    .as_ref()
                    .and_then(|d| ts.queues.get(d))
                    .cloned();
                out.push((q.clone(), filters, dlq));
            }
            out
        };
        let mut routed = Routed::default();
        for (q, filters, dlq) in &resolved {
            let name = &q.name;
            let (mut headers, mut payload) = (msg.headers.clone(), msg.payload.clone());
            let mut outcome = Ok(true);
            for fname in filters {
                // A configured filter that is not running fails closed: the
                // message is dead-lettered, never stored unfiltered.
                let f = match self.running(t, fname) {
                    Ok(f) => f,
                    Err(e) => {
                        outcome = Err(format!("filter {fname} is not running: {e}"));
                        break;
                    }
                };
                let wit = wit.get_or_insert_with(wit_message);
                wit.headers = headers.clone();
                wit.payload = payload.clone();
                let call = plugin_call(t)?;
                let verdict = f.filter(wit);
                drop(call);
                match verdict {
                    Ok(FilterVerdict::Accept) => {}
                    Ok(FilterVerdict::Drop(reason)) => {
                        tracing::debug!(tenant = %t.name, queue = %name, filter = %fname, %reason, "filter dropped a message");
                        q.counters
                            .dropped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        outcome = Ok(false);
                        break;
                    }
                    Ok(FilterVerdict::Replace(r)) => {
                        // What a filter returns is stored and delivered:
                        // it meets the same limits as a publish.
                        if let Err(e) = check_storable(&r.headers, &r.payload, max) {
                            outcome =
                                Err(format!("filter {fname} failed (output): it returned {e}"));
                            break;
                        }
                        headers = r.headers;
                        payload = r.payload;
                    }
                    Err(failure) => {
                        let kind = if failure.kind == FailureKind::Guest {
                            "error"
                        } else {
                            failure.kind.as_str()
                        };
                        outcome = Err(format!(
                            "filter {fname} failed ({kind}): {}",
                            failure.message
                        ));
                        break;
                    }
                }
            }
            let stored = |headers, payload, q: &Queue| {
                Encoded::from(StoredMessage {
                    topic: msg.topic.clone(),
                    headers,
                    payload,
                    publisher: who.client.clone(),
                    timestamp_ms: now,
                    expires_at_ms: expiry(now, q.options.ttl_ms),
                })
            };
            match outcome {
                Ok(true) => routed.stores.push((q.clone(), stored(headers, payload, q))),
                Ok(false) => {}
                Err(reason) => match dlq {
                    Some(dlq) => {
                        let mut headers = msg.headers.clone();
                        with_death_headers(&mut headers, &reason, &q.name);
                        q.counters
                            .dead_lettered
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        routed
                            .dead
                            .push((dlq.clone(), stored(headers, msg.payload.clone(), dlq)));
                    }
                    None => {
                        t.log_limited(|| tracing::warn!(tenant = %t.name, queue = %name, %reason, "filter failed and the queue has no dead-letter queue: message dropped"));
                        q.counters
                            .dropped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                },
            }
        }
        Ok(routed)
    }

    /// Reserve room and ids, and submit everything as one append.
    fn commit_routed(&self, routed: Vec<Result<Routed, BrokerError>>) -> PendingPublish {
        let mut results: Vec<Result<u32, BrokerError>> = Vec::with_capacity(routed.len());
        // Accepted copies, in publish order, grouped by queue afterwards.
        let mut accepted: Vec<(Arc<Queue>, Encoded)> = Vec::new();
        let mut durable = false;
        for r in routed {
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let stored_in = r.stores.len() as u32;
            let all: Vec<(Arc<Queue>, Encoded)> = r.stores.into_iter().chain(r.dead).collect();
            let mut reserved = 0;
            let mut full = None;
            for (q, _) in &all {
                if q.reserve_room(1).is_err() {
                    full = Some(q.name.clone());
                    break;
                }
                reserved += 1;
            }
            if let Some(name) = full {
                for (q, _) in all.iter().take(reserved) {
                    q.unreserve(1);
                }
                results.push(Err(BrokerError::QueueFull(name)));
                continue;
            }
            durable |= all.iter().any(|(q, _)| q.options.durable);
            accepted.extend(all);
            results.push(Ok(stored_in));
        }
        if accepted.is_empty() {
            return PendingPublish::settled(self, results);
        }
        // Per queue, consecutive ids in publish order (one store chunk each).
        let mut groups: Vec<(Arc<Queue>, Vec<Encoded>)> = Vec::new();
        // Keyed by the queue's address (the Arc keeps it alive meanwhile).
        let mut group_of: std::collections::HashMap<usize, usize> = Default::default();
        for (q, m) in accepted {
            let i = *group_of.entry(Arc::as_ptr(&q) as usize).or_insert_with(|| {
                groups.push((q.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(m);
        }
        drop(group_of);
        let mut appends = Vec::new();
        let mut placed: Vec<(Arc<Queue>, Vec<MsgRef>)> = Vec::with_capacity(groups.len());
        for (q, ms) in groups {
            let first = q.allocate_ids(ms.len() as u64);
            let mut refs = Vec::with_capacity(ms.len());
            for (id, m) in (first..).zip(ms) {
                refs.push(MsgRef {
                    id,
                    size: m.value.len() as u32,
                    expires_at: m.expires_at,
                    deliveries: 0,
                });
                appends.push(Append {
                    queue: q.id,
                    id,
                    value: m.value,
                });
            }
            placed.push((q, refs));
        }
        PendingPublish {
            broker: self.clone(),
            results,
            commit: Some(self.inner.store.append(appends, durable)),
            placed,
        }
    }
}

/// Publishes routed and submitted to the group commit, not yet confirmed
/// (see [`Broker::prepare_publish`]). Dropping it unfinished gives the
/// reserved room back; the messages may still be stored, and are then
/// found again at the next start (at-least-once).
pub struct PendingPublish {
    broker: Broker,
    results: Vec<Result<u32, BrokerError>>,
    commit: Option<Commit>,
    placed: Vec<(Arc<Queue>, Vec<MsgRef>)>,
}

impl PendingPublish {
    /// Nothing to commit: every result is already known.
    fn settled(broker: &Broker, results: Vec<Result<u32, BrokerError>>) -> Self {
        PendingPublish {
            broker: broker.clone(),
            results,
            commit: None,
            placed: Vec::new(),
        }
    }

    /// Wait for the commit, make the messages ready and return, per
    /// message, the number of queues it was stored in or why it was refused.
    pub async fn finish(mut self) -> Vec<Result<u32, BrokerError>> {
        let Some(commit) = self.commit.take() else {
            return std::mem::take(&mut self.results);
        };
        let placed = std::mem::take(&mut self.placed);
        let results = std::mem::take(&mut self.results);
        if let Err(e) = commit.await {
            for (q, refs) in &placed {
                q.unreserve(refs.len() as u64);
            }
            let e = BrokerError::from(e);
            return results.into_iter().map(|r| r.and(Err(e.clone()))).collect();
        }
        for (q, refs) in placed {
            let dead = q.enqueue(&refs, refs.len() as u64);
            self.broker.dead_letter(&q, dead);
            self.broker.dispatch(&q);
        }
        results
    }
}

impl Drop for PendingPublish {
    fn drop(&mut self) {
        for (q, refs) in &self.placed {
            q.unreserve(refs.len() as u64);
        }
    }
}
