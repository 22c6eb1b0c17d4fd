//! What plugins may hold, per tenant and in all: instances, their linear
//! memory, and compiled code in the on-disk cache.
//!
//! Every plugin reserves, when it is loaded, the instances it may ever run
//! at once ([`SandboxConfig::instances_per_plugin`]), the memory those may
//! grow to, and the bytes of its compiled code. A load that would take its
//! tenant over [`SandboxConfig::instances_per_tenant`],
//! [`SandboxConfig::memory_per_tenant`] or
//! [`SandboxConfig::cache_bytes_per_tenant`], or the broker over
//! [`SandboxConfig::pool_instances`], is refused with
//! [`LoadError::Capacity`]. Calls never instantiate beyond the plugin's
//! reservation, so one tenant can never take the instances another tenant's
//! plugins need: the wasmtime pool is sized for every reservation plus room
//! for hot swaps ([`SWAP_HEADROOM`]).
//!
//! [`SandboxConfig::instances_per_plugin`]: super::SandboxConfig::instances_per_plugin
//! [`SandboxConfig::instances_per_tenant`]: super::SandboxConfig::instances_per_tenant
//! [`SandboxConfig::memory_per_tenant`]: super::SandboxConfig::memory_per_tenant
//! [`SandboxConfig::cache_bytes_per_tenant`]: super::SandboxConfig::cache_bytes_per_tenant
//! [`SandboxConfig::pool_instances`]: super::SandboxConfig::pool_instances

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::LoadError;
use super::sandbox::SandboxConfig;

/// Instances the wasmtime pool holds beyond the reservations: a plugin
/// being replaced keeps its instances until its calls in flight finish,
/// while the new version already holds its own.
pub(crate) const SWAP_HEADROOM: u32 = 64;

/// One reservation's worth of resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amount {
    pub instances: u32,
    pub memory: u64,
    pub cache_bytes: u64,
}

impl Amount {
    fn add(&mut self, o: Amount) {
        self.instances += o.instances;
        self.memory += o.memory;
        self.cache_bytes += o.cache_bytes;
    }
    fn sub(&mut self, o: Amount) {
        self.instances = self.instances.saturating_sub(o.instances);
        self.memory = self.memory.saturating_sub(o.memory);
        self.cache_bytes = self.cache_bytes.saturating_sub(o.cache_bytes);
    }
}

/// Reservations of every tenant.
#[derive(Debug)]
pub(crate) struct Budgets {
    limits: SandboxConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    total: Amount,
    tenants: HashMap<Arc<str>, Amount>,
}

/// Resources held by one plugin; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budgets: Arc<Budgets>,
    tenant: Arc<str>,
    amount: Amount,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.budgets.lock();
        st.total.sub(self.amount);
        if let Some(t) = st.tenants.get_mut(&self.tenant) {
            t.sub(self.amount);
            if *t == Amount::default() {
                st.tenants.remove(&self.tenant);
            }
        }
    }
}

impl Reservation {
    /// The instances this reservation allows at once.
    pub(crate) fn instances(&self) -> u32 {
        self.amount.instances
    }

    /// What it holds.
    pub(crate) fn amount(&self) -> Amount {
        self.amount
    }
}

impl Budgets {
    pub(crate) fn new(limits: SandboxConfig) -> Self {
        Self {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What one plugin with `cache_bytes` of compiled code reserves.
    pub(crate) fn amount(&self, cache_bytes: u64) -> Amount {
        let instances = self.limits.instances_per_plugin.max(1);
        Amount {
            instances,
            memory: u64::from(instances) * self.limits.memory_limit as u64,
            cache_bytes,
        }
    }

    /// Reserve `amount` for a plugin of `tenant`. With `replacing`, the
    /// plugin replaces one of the same name whose reservation is given back
    /// when its calls in flight finish: the tenant's limits are checked as
    /// if that one were gone already (the pool's headroom covers the
    /// overlap).
    pub(crate) fn reserve(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        amount: Amount,
        replacing: Option<Amount>,
    ) -> Result<Reservation, LoadError> {
        let l = &self.limits;
        let mut st = self.lock();
        let mut tenant_after = st.tenants.get(tenant).copied().unwrap_or_default();
        tenant_after.add(amount);
        let mut total_after = st.total;
        total_after.add(amount);
        if let Some(old) = replacing {
            tenant_after.sub(old);
            total_after.sub(old);
        }
        let refuse = |what: String| Err(LoadError::Capacity(what));
        if tenant_after.instances > l.instances_per_tenant {
            return refuse(format!(
                "tenant `{tenant}` would hold {} plugin instances (max {}: \
                 plugin_instances_per_tenant; each plugin reserves {})",
                tenant_after.instances, l.instances_per_tenant, amount.instances
            ));
        }
        if tenant_after.memory > l.memory_per_tenant {
            return refuse(format!(
                "tenant `{tenant}` would reserve {} MiB of plugin memory (max {} MiB: \
                 plugin_memory_per_tenant_mib)",
                tenant_after.memory >> 20,
                l.memory_per_tenant >> 20
            ));
        }
        if tenant_after.cache_bytes > l.cache_bytes_per_tenant {
            return refuse(format!(
                "tenant `{tenant}` would hold {} MiB of compiled plugin code (max {} MiB: \
                 plugin_cache_mib_per_tenant)",
                tenant_after.cache_bytes >> 20,
                l.cache_bytes_per_tenant >> 20
            ));
        }
        if total_after.cache_bytes > l.cache_bytes_total {
            return refuse(format!(
                "the broker holds {} MiB of compiled plugin code (max {} MiB: plugin_cache_mib)",
                st.total.cache_bytes >> 20,
                l.cache_bytes_total >> 20
            ));
        }
        // A replacement may use the headroom; a new plugin may not.
        let pool = l.pool_instances
            + if replacing.is_some() {
                SWAP_HEADROOM
            } else {
                0
            };
        let mut total_now = st.total;
        total_now.add(amount);
        if total_now.instances > pool || total_after.instances > l.pool_instances {
            return refuse(format!(
                "the broker's plugin pool is full ({} of {} instances reserved: \
                 plugin_pool_instances)",
                st.total.instances, l.pool_instances
            ));
        }
        st.total.add(amount);
        st.tenants.entry(tenant.clone()).or_default().add(amount);
        Ok(Reservation {
            budgets: self.clone(),
            tenant: tenant.clone(),
            amount,
        })
    }

    /// What `tenant` holds now.
    pub(crate) fn held(&self, tenant: &str) -> Amount {
        self.lock().tenants.get(tenant).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Arc<Budgets> {
        Arc::new(Budgets::new(SandboxConfig {
            instances_per_plugin: 2,
            instances_per_tenant: 6,
            memory_per_tenant: 6 * (16 << 20),
            cache_bytes_per_tenant: 100,
            pool_instances: 10,
            ..SandboxConfig::default()
        }))
    }

    #[test]
    fn tenants_and_the_pool_are_bounded_and_released() {
        let b = budgets();
        let (a, c): (Arc<str>, Arc<str>) = ("a".into(), "c".into());
        let amount = b.amount(10);
        let a1 = b.reserve(&a, amount, None).unwrap();
        let _a2 = b.reserve(&a, amount, None).unwrap();
        let _a3 = b.reserve(&a, amount, None).unwrap();
        let e = b.reserve(&a, amount, None).unwrap_err().to_string();
        assert!(e.contains("plugin_instances_per_tenant"), "{e}");
        // A replacement counts the replaced plugin as gone.
        let swapped = b.reserve(&a, amount, Some(amount)).unwrap();
        drop(a1);
        assert_eq!(b.held("a").instances, 6);
        // Another tenant still gets what the pool has left: 10 - 6 = 4.
        let _c1 = b.reserve(&c, amount, None).unwrap();
        let _c2 = b.reserve(&c, amount, None).unwrap();
        let e = b.reserve(&c, amount, None).unwrap_err().to_string();
        assert!(e.contains("pool is full"), "{e}");
        drop(swapped);
        let c3 = b.reserve(&c, amount, None).unwrap();
        drop(c3);
        let d: Arc<str> = "d".into();
        let e = b.reserve(&d, b.amount(1000), None).unwrap_err().to_string();
        assert!(e.contains("compiled plugin code"), "{e}");
        assert_eq!(b.held("d"), Amount::default());
    }

    /// Memory is a bound of its own: with instances to spare (the tenant may
    /// hold 100), the tenant's fourth plugin would reserve 4 × 2 × 16 MiB
    /// over its 96 MiB, and is refused naming the key.
    #[test]
    fn tenant_memory_is_bounded_with_instances_to_spare() {
        let b = Arc::new(Budgets::new(SandboxConfig {
            instances_per_plugin: 2,
            instances_per_tenant: 100,
            memory_per_tenant: 96 << 20,
            pool_instances: 100,
            ..SandboxConfig::default()
        }));
        let a: Arc<str> = "a".into();
        let amount = b.amount(0);
        assert_eq!(amount.memory, 32 << 20);
        let held: Vec<_> = (0..3)
            .map(|_| b.reserve(&a, amount, None).unwrap())
            .collect();
        let e = b.reserve(&a, amount, None).unwrap_err();
        assert!(matches!(e, LoadError::Capacity(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("plugin_memory_per_tenant_mib"), "{e}");
        assert!(e.contains("128 MiB") && e.contains("max 96 MiB"), "{e}");
        assert_eq!(b.held("a").memory, 96 << 20);
        // Another tenant has its own 96 MiB.
        let c: Arc<str> = "c".into();
        let _c = b.reserve(&c, amount, None).unwrap();
        drop(held);
        assert_eq!(b.held("a"), Amount::default());
    }

    /// Compiled code is bounded per tenant and in all: one tenant past its
    /// own 100 bytes is refused naming `plugin_cache_mib_per_tenant` (the
    /// broker has room); tenants each within their share together reach
    /// the broker's 250, and the next plugin is refused naming
    /// `plugin_cache_mib`.
    #[test]
    fn compiled_code_is_bounded_in_all() {
        let b = Arc::new(Budgets::new(SandboxConfig {
            instances_per_plugin: 1,
            instances_per_tenant: 100,
            memory_per_tenant: u64::MAX,
            cache_bytes_per_tenant: 100,
            cache_bytes_total: 250,
            pool_instances: 100,
            ..SandboxConfig::default()
        }));
        let tenant = |n: &str| -> Arc<str> { n.into() };
        let _d = b.reserve(&tenant("d"), b.amount(40), None).unwrap();
        let e = b
            .reserve(&tenant("d"), b.amount(61), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugin_cache_mib_per_tenant"), "{e}");
        let _d2 = b.reserve(&tenant("d"), b.amount(60), None).unwrap();
        assert_eq!(b.held("d").cache_bytes, 100);

        let _a = b.reserve(&tenant("a"), b.amount(100), None).unwrap();
        let e = b.reserve(&tenant("c"), b.amount(51), None).unwrap_err();
        assert!(matches!(e, LoadError::Capacity(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("plugin_cache_mib)"), "{e}");
        assert_eq!(b.held("c"), Amount::default());
        let _c = b.reserve(&tenant("c"), b.amount(50), None).unwrap();
    }
}
