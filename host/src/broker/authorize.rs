//! Who may do what: the tenant boundary, then the tenant's authorizer
//! plugin (the only place authorizers are called), failing closed.

use std::sync::Arc;

use super::tenant::{AuthCache, Tenant};
use super::{Broker, BrokerError, check_tenant};
use crate::plugins::{Action, Decision, Principal, Resource};

/// Cached authorizer decisions per tenant before the cache is reset.
const AUTH_CACHE_ENTRIES: usize = 10_000;

/// The cache key of an authorizer question: everything the plugin sees of
/// the principal (two certificates with one client name but different
/// subjects or SANs may get different answers), the action and the resource.
/// Debug text of each is unambiguous (strings are quoted and escaped, lists
/// bracketed), so two different questions never share a key, and a field
/// added to the principal is part of the key without a change here.
fn auth_key(who: &Principal, action: Action, resource: &Resource) -> String {
    format!("{who:?}\u{1}{action:?}\u{1}{resource:?}")
}

/// Store `decision` under `key` if the authorizer is still the one of
/// `generation` (the one that decided), clearing the cache when it holds
/// [`AUTH_CACHE_ENTRIES`] already.
fn remember(cache: &mut AuthCache, generation: u64, key: String, decision: Result<(), String>) {
    if cache.generation != generation {
        return;
    }
    if cache.decisions.len() >= AUTH_CACHE_ENTRIES {
        cache.decisions.clear();
    }
    cache.decisions.insert(key, decision);
}

impl Broker {
    /// The tenant a request acts on: the principal's own, or (admins only)
    /// the one named with `--tenant`.
    pub fn scope(&self, who: &Principal, requested: Option<&str>) -> Result<String, BrokerError> {
        match requested {
            None if who.admin => Err(BrokerError::invalid(
                "tenant",
                "admin requests must name a tenant (--tenant)",
            )),
            None => Ok(who.tenant.clone()),
            Some(t) if who.admin => {
                check_tenant(t)?;
                Ok(t.to_string())
            }
            Some(t) if t == who.tenant => Ok(t.to_string()),
            Some(_) => Err(BrokerError::Unauthorized(
                "a tenant client cannot act on another tenant".into(),
            )),
        }
    }

    /// A tenant principal may only act on its own tenant.
    pub(super) fn check_boundary(&self, who: &Principal, tenant: &str) -> Result<(), BrokerError> {
        if who.admin || who.tenant == tenant {
            Ok(())
        } else {
            Err(BrokerError::Unauthorized(format!(
                "client of tenant `{}` cannot act on tenant `{tenant}`",
                who.tenant
            )))
        }
    }

    /// The running plugin `name` of tenant `t`, or why it is not running.
    pub(super) fn running(
        &self,
        t: &Tenant,
        name: &str,
    ) -> Result<Arc<crate::plugins::Plugin>, String> {
        if let Some(p) = self.inner.plugins.get(&t.name, name) {
            return Ok(p);
        }
        Err(match t.read().not_running.get(name) {
            Some(n) => format!(
                "plugin `{name}` is configured but not running: {}",
                n.reason
            ),
            None => format!("plugin `{name}` is not loaded"),
        })
    }

    /// Check `action` on `resource` in `tenant`: first the tenant boundary,
    /// then the tenant's authorizer plugin if one is configured. A failing
    /// authorizer denies, and so does one that is configured but not
    /// running: the check fails closed. Administrators are not asked (they
    /// are the repair path).
    pub fn authorize(
        &self,
        who: &Principal,
        tenant: &str,
        action: Action,
        resource: &Resource,
    ) -> Result<(), BrokerError> {
        self.check_boundary(who, tenant)?;
        if who.admin {
            return Ok(());
        }
        let t = self.tenant(tenant);
        // The generation is read before the authorizer is looked up: a
        // decision of an authorizer swapped out meanwhile is not cached.
        let generation = t
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let Some(name) = t.read().authorizer.clone() else {
            return Ok(());
        };
        let plugin = self.running(&t, &name).map_err(|why| {
            BrokerError::Unauthorized(format!(
                "{why}; every request of tenant `{tenant}` is denied until an administrator \
                 reloads or unloads it"
            ))
        })?;
        // An errored authorizer denies everything, also what it allowed
        // before (a cached decision is not asked for).
        if plugin.is_errored() {
            return Err(BrokerError::Unauthorized(format!(
                "authorizer `{name}` is errored after repeated traps, denying; an \
                 administrator reloads or unloads it"
            )));
        }
        // Decisions are cached per principal (everything the plugin sees)
        // until the authorizer changes; a failing call is not cached.
        let key = auth_key(who, action, resource);
        if let Some(cached) = t
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decisions
            .get(&key)
        {
            return cached.clone().map_err(BrokerError::Unauthorized);
        }
        let call = t.plugin_call().map_err(|why| {
            BrokerError::Unauthorized(format!("authorizer not asked, denying: {why}"))
        })?;
        let answer = plugin.authorize(who, action, resource);
        drop(call);
        let decision = match answer {
            Ok(Decision::Allow) => Ok(()),
            Ok(Decision::Deny(reason)) => Err(reason),
            Err(f) => {
                return Err(BrokerError::Unauthorized(format!(
                    "authorizer failed, denying: {f}"
                )));
            }
        };
        remember(
            &mut t.auth_cache.lock().unwrap_or_else(|p| p.into_inner()),
            generation,
            key,
            decision.clone(),
        );
        decision.map_err(BrokerError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn principal(subject: &str, sans: &[&str]) -> Principal {
        Principal {
            tenant: "acme".into(),
            client: "ci".into(),
            subject: subject.into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            admin: false,
        }
    }

    /// The authorizer sees the whole principal, so its cached decisions are
    /// keyed by all of it: two certificates of one client name with other
    /// subjects or SANs never share a decision.
    #[test]
    pub(super) fn auth_cache_keys_cover_everything_the_authorizer_sees() {
        let q = Resource::Queue("q".into());
        let base = auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Purge, &q);
        for other in [
            principal("CN=ci,O=acme,OU=red", &["a"]),
            principal("CN=ci,O=acme", &["a", "b"]),
            principal("CN=ci,O=acme", &[]),
            principal("CN=ci,O=acme", &["a\u{0}"]),
            Principal {
                client: "ci2".into(),
                ..principal("CN=ci,O=acme", &["a"])
            },
            Principal {
                tenant: "acme2".into(),
                ..principal("CN=ci,O=acme", &["a"])
            },
            Principal {
                admin: true,
                ..principal("CN=ci,O=acme", &["a"])
            },
        ] {
            assert_ne!(auth_key(&other, Action::Purge, &q), base, "{other:?}");
        }
        // No separator inside a field can make two principals look alike.
        assert_ne!(
            auth_key(&principal("s", &["a", "b"]), Action::Purge, &q),
            auth_key(&principal("s", &["a\u{0}b"]), Action::Purge, &q)
        );
        let shifted = |client: &str, subject: &str| Principal {
            client: client.into(),
            ..principal(subject, &[])
        };
        assert_ne!(
            auth_key(&shifted("ci\u{0}x", "y"), Action::Purge, &q),
            auth_key(&shifted("ci", "x\u{0}y"), Action::Purge, &q)
        );
        assert_ne!(
            auth_key(&principal("s", &[]), Action::Purge, &q),
            auth_key(
                &principal("s", &[]),
                Action::Purge,
                &Resource::Topic("q".into())
            )
        );
        assert_ne!(
            auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Delete, &q),
            base
        );
        assert_eq!(
            auth_key(&principal("CN=ci,O=acme", &["a"]), Action::Purge, &q),
            base
        );
    }

    /// At most `AUTH_CACHE_ENTRIES` decisions are kept (the cache is
    /// cleared when full), and a decision of an authorizer swapped out
    /// meanwhile (an older generation) is never stored.
    #[test]
    fn auth_cache_is_bounded() {
        let mut cache = AuthCache::default();
        for i in 0..AUTH_CACHE_ENTRIES {
            remember(&mut cache, 0, format!("k{i}"), Ok(()));
        }
        assert_eq!(cache.decisions.len(), AUTH_CACHE_ENTRIES);
        remember(&mut cache, 0, "one more".into(), Err("no".into()));
        assert_eq!(cache.decisions.len(), 1, "cleared when full");
        assert_eq!(cache.decisions.get("one more"), Some(&Err("no".into())));
        for i in 0..3 * AUTH_CACHE_ENTRIES {
            remember(&mut cache, 0, format!("k{i}"), Ok(()));
            assert!(cache.decisions.len() <= AUTH_CACHE_ENTRIES);
        }

        cache.generation = 1;
        cache.decisions.clear();
        remember(&mut cache, 0, "stale".into(), Ok(()));
        assert!(
            cache.decisions.is_empty(),
            "a swapped-out authorizer's decision"
        );
        remember(&mut cache, 1, "fresh".into(), Ok(()));
        assert_eq!(cache.decisions.len(), 1);
    }
}
