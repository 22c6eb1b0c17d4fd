//! Tenant registry, quotas and live connections.
//!
//! A tenant is registered explicitly (`sluice tenant create`, or `[[tenants]]`
//! in the config) or, unless the broker runs with strict tenants, on the
//! first connection of one of its clients. Each tenant has [`TenantLimits`];
//! exceeding one is refused with `quota_exceeded` and affects no other tenant.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::tenant::{Quota, Tenant, TenantLimits};
use super::{Broker, BrokerError, check_tenant};
use crate::plugins::Principal;

/// Usage and quota refusals of one tenant, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantUsage {
    /// Name.
    pub name: String,
    /// Quotas.
    pub limits: TenantLimits,
    /// Open connections.
    pub connections: u64,
    /// Queues.
    pub queues: u64,
    /// Stored bytes.
    pub bytes: u64,
    /// Requests refused per quota since start, in [`Quota::ALL`] order.
    pub refused: [u64; 5],
    /// Plugins configured but not running.
    pub plugins_not_running: u64,
    /// Log lines this tenant's actions caused that the log limit suppressed.
    pub log_lines_suppressed: u64,
    /// Share of one core its offloaded work (plugins) used recently.
    pub cpu_share: f64,
    /// Jobs run at the lowest priority because it was over its CPU share.
    pub demoted_jobs: u64,
}

/// A tenant as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantInfo {
    /// Name.
    pub name: String,
    /// Quotas.
    pub limits: TenantLimits,
    /// Open connections.
    pub connections: u64,
    /// Queues.
    pub queues: u64,
    /// Stored bytes.
    pub bytes: u64,
}

/// Persisted per tenant (`tenant/<name>`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TenantRecord {
    pub limits: TenantLimits,
}

/// How to close a live connection, given by the session that owns it.
pub type Closer = Arc<dyn Fn(&str) + Send + Sync>;

/// A live connection known to the broker.
pub(crate) struct LiveConnection {
    tenant: String,
    serial: Vec<u8>,
    close: Closer,
}

/// All live connections, for tenant deletion and certificate revocation.
#[derive(Default)]
pub(crate) struct Connections {
    next: u64,
    live: HashMap<u64, LiveConnection>,
}

/// Keeps a connection admitted; dropping it releases the tenant's slot.
pub struct Admission {
    broker: Broker,
    tenant: Arc<Tenant>,
    id: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.tenant.connections.fetch_sub(1, Relaxed);
        self.broker.inner.connections.fetch_sub(1, Relaxed);
        self.broker.live().live.remove(&self.id);
    }
}

impl Broker {
    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a new connection of `who` (certificate serial `serial`): the
    /// tenant must be registered (or is registered now, unless tenants are
    /// strict) and under its connection quota.
    pub fn admit(
        &self,
        who: &Principal,
        serial: Vec<u8>,
        close: Closer,
    ) -> Result<Admission, BrokerError> {
        let tenant_name = if who.admin {
            String::new()
        } else {
            who.tenant.clone()
        };
        let tenant = if who.admin {
            self.tenant("")
        } else {
            self.registered(&tenant_name)?
        };
        let max = self.inner.config.max_connections;
        if self.inner.connections.load(Relaxed) >= max {
            return Err(BrokerError::Limit(format!(
                "the broker has {max} connections (max_connections)"
            )));
        }
        let limits = tenant.limits();
        let n = tenant.connections.fetch_add(1, Relaxed) + 1;
        if !who.admin && limits.max_connections.is_some_and(|max| n > u64::from(max)) {
            tenant.connections.fetch_sub(1, Relaxed);
            tenant.refused(Quota::Connections, 1);
            return Err(BrokerError::Quota(format!(
                "tenant `{tenant_name}` already has {} connections (max {})",
                n - 1,
                limits.max_connections.unwrap_or(0)
            )));
        }
        self.inner.connections.fetch_add(1, Relaxed);
        let id = {
            let mut live = self.live();
            live.next += 1;
            let id = live.next;
            live.live.insert(
                id,
                LiveConnection {
                    tenant: tenant_name,
                    serial,
                    close,
                },
            );
            id
        };
        Ok(Admission {
            broker: self.clone(),
            tenant,
            id,
        })
    }

    /// The registered tenant `name`, registering it now unless strict.
    fn registered(&self, name: &str) -> Result<Arc<Tenant>, BrokerError> {
        let t = self.tenant(name);
        if t.registered.load(Relaxed) {
            return Ok(t);
        }
        if self.inner.config.strict_tenants {
            return Err(BrokerError::Unauthorized(format!(
                "tenant `{name}` is not registered on this broker"
            )));
        }
        self.save_tenant(&t, TenantLimits::default())?;
        Ok(t)
    }

    fn save_tenant(&self, t: &Tenant, limits: TenantLimits) -> Result<(), BrokerError> {
        let key = format!("tenant/{}", t.name);
        self.inner.store.put_meta(
            &key,
            &super::encode(&TenantRecord {
                limits: limits.clone(),
            }),
        )?;
        self.inner.store.sync_meta()?;
        *t.limits.write().unwrap_or_else(|p| p.into_inner()) = limits;
        t.registered.store(true, Relaxed);
        Ok(())
    }

    fn require_admin(who: &Principal) -> Result<(), BrokerError> {
        if who.admin {
            Ok(())
        } else {
            Err(BrokerError::Unauthorized(
                "tenant administration needs an admin identity".into(),
            ))
        }
    }

    /// Register a tenant (or update its limits).
    pub fn create_tenant(
        &self,
        who: &Principal,
        name: &str,
        limits: TenantLimits,
    ) -> Result<(), BrokerError> {
        Self::require_admin(who)?;
        check_tenant(name)?;
        self.save_tenant(&self.tenant(name), limits)
    }

    /// Replace a registered tenant's limits.
    pub fn set_tenant_limits(
        &self,
        who: &Principal,
        name: &str,
        limits: TenantLimits,
    ) -> Result<(), BrokerError> {
        Self::require_admin(who)?;
        let t = self.tenant(name);
        if !t.registered.load(Relaxed) {
            return Err(BrokerError::not_found("tenant", name));
        }
        self.save_tenant(&t, limits)
    }

    /// Usage of every registered tenant, without an identity check (for
    /// the metrics endpoint, which only operators reach).
    pub fn tenant_usage(&self) -> Vec<TenantUsage> {
        let mut out: Vec<TenantUsage> = self
            .all_tenants()
            .iter()
            .filter(|t| t.registered.load(Relaxed))
            .map(|t| TenantUsage {
                name: t.name.clone(),
                limits: t.limits(),
                connections: t.connections.load(Relaxed),
                queues: t.read().queues.len() as u64,
                bytes: t.stored_bytes(),
                refused: Quota::ALL.map(|q| t.refusals[q as usize].load(Relaxed)),
                plugins_not_running: t.read().not_running.len() as u64,
                log_lines_suppressed: t.logs_suppressed.load(Relaxed),
                cpu_share: t.cpu().share(),
                demoted_jobs: t.demoted_jobs.load(Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Registered tenants with their usage.
    pub fn list_tenants(&self, who: &Principal) -> Result<Vec<TenantInfo>, BrokerError> {
        Self::require_admin(who)?;
        let tenants = self.all_tenants();
        let mut out: Vec<TenantInfo> = tenants
            .iter()
            .filter(|t| t.registered.load(Relaxed))
            .map(|t| {
                let queues = t.read().queues.len() as u64;
                TenantInfo {
                    name: t.name.clone(),
                    limits: t.limits(),
                    connections: t.connections.load(Relaxed),
                    queues,
                    bytes: t.stored_bytes(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Delete a tenant: close its connections, delete its queues, messages,
    /// bindings and plugins, and forget it.
    pub fn delete_tenant(&self, who: &Principal, name: &str) -> Result<(), BrokerError> {
        Self::require_admin(who)?;
        let t = self.tenant(name);
        if !t.registered.load(Relaxed) {
            return Err(BrokerError::not_found("tenant", name));
        }
        self.close_where(|c| c.tenant == name, "tenant deleted");
        let queues: Vec<String> = t.read().queues.keys().cloned().collect();
        for q in queues {
            self.delete_queue(who, name, &q)?;
        }
        for p in self.inner.plugins.list(Some(name)) {
            self.unload_plugin(who, name, &p.id().name)?;
        }
        self.inner.store.delete_meta(&format!("tenant/{name}"))?;
        self.inner.store.sync_meta()?;
        t.registered.store(false, Relaxed);
        self.inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// Close every live connection whose certificate serial is in `serials`.
    /// Returns how many were closed.
    pub fn close_revoked(&self, serials: &[Vec<u8>]) -> usize {
        self.close_where(|c| serials.contains(&c.serial), "certificate revoked")
    }

    /// Close every live connection (a cluster node that stops leading:
    /// its clients reconnect to the new leader). Returns how many.
    pub fn close_all(&self, reason: &str) -> usize {
        self.close_where(|_| true, reason)
    }

    fn close_where(&self, pred: impl Fn(&LiveConnection) -> bool, reason: &str) -> usize {
        let closers: Vec<Closer> = self
            .live()
            .live
            .values()
            .filter(|c| pred(c))
            .map(|c| c.close.clone())
            .collect();
        for c in &closers {
            c(reason);
        }
        closers.len()
    }

    /// Check the publish-rate quota for `n` messages of `tenant`.
    pub(crate) fn check_rate(&self, t: &Tenant, n: u32) -> Result<(), BrokerError> {
        let Some(rate) = t.limits().max_publish_rate else {
            return Ok(());
        };
        let mut bucket = t.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if bucket.take(rate, n) {
            Ok(())
        } else {
            t.refused(Quota::PublishRate, u64::from(n));
            Err(BrokerError::Quota(format!(
                "tenant `{}` publish rate above {rate} msg/s",
                t.name
            )))
        }
    }

    /// Load registered tenants at start.
    pub(crate) fn recover_tenants(&self) -> Result<(), BrokerError> {
        for (key, value) in self.inner.store.scan_meta("tenant/")? {
            let name = &key["tenant/".len()..];
            let rec: TenantRecord = super::decode(&key, &value)?;
            let t = self.tenant(name);
            *t.limits.write().unwrap_or_else(|p| p.into_inner()) = rec.limits;
            t.registered.store(true, Relaxed);
        }
        Ok(())
    }
}
