//! An authorizer with ordered allow/deny rules from its config. The first
//! matching rule decides; without a match, `default` decides.
//!
//! Config keys:
//! - `allow=RULE`, `deny=RULE` (repeatable, in order);
//! - `default=allow|deny` (default `deny`).
//!
//! `RULE` is `CLIENT ACTION RESOURCE`, separated by spaces:
//! - `CLIENT`: a client name, or `*`;
//! - `ACTION`: connect, publish, subscribe, declare, bind, delete, purge, admin,
//!   manage-policy, or `*`;
//! - `RESOURCE`: `*`, `broker`, `queue:PATTERN`, `topic:PATTERN`,
//!   `binding:QUEUEPATTERN`, `plugin:PATTERN`, `plugin:PATTERN@QUEUEPATTERN`
//!   or `tenant:PATTERN`, where `PATTERN` is a NATS pattern (`*` one token,
//!   `>` the rest).
//!
//! Plugins: the broker asks `admin` on a plugin to load, replace or unload a
//! filter, and `manage-policy` to install, replace or remove the tenant's
//! router or authorizer. `plugin:PATTERN` matches a plugin by name, whatever
//! its kind and queue; `plugin:PATTERN@QUEUEPATTERN` matches only a filter
//! attached to a queue matching `QUEUEPATTERN`. So
//! `allow=ci admin plugin:ci.*@ci.>` lets client `ci` manage filters named
//! `ci.*` on queues under `ci.`, and nothing else about plugins.
//!
//! A deny names its rule: `denied by rule 2: deny * delete queue:>`, or
//! `denied by default policy`.
//!
//! ```text
//! sluice plugin load acl_authorizer.wasm --kind authorizer \
//!     --config 'allow=ingest publish topic:orders.>' --config 'allow=* connect broker' \
//!     --config 'allow=ci admin plugin:ci.*@ci.>'
//! ```

use sluice_plugin::{
    Action, Authorizer, Config, Decision, Pattern, PluginKind, PluginRef, Principal, Resource,
};

#[derive(Debug, Clone)]
enum ResourceMatch {
    Any,
    Broker,
    Queue(Pattern),
    Topic(Pattern),
    Binding(Pattern),
    /// A plugin by name, and for `NAME@QUEUE` a filter on a matching queue.
    Plugin {
        name: Pattern,
        queue: Option<Pattern>,
    },
    Tenant(Pattern),
}

#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    text: String,
    client: Option<String>,
    action: Option<Action>,
    resource: ResourceMatch,
}

fn parse_action(s: &str) -> Result<Option<Action>, String> {
    Ok(Some(match s {
        "*" => return Ok(None),
        "connect" => Action::Connect,
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "declare" => Action::Declare,
        "bind" => Action::Bind,
        "delete" => Action::Delete,
        "purge" => Action::Purge,
        "admin" => Action::Admin,
        "manage-policy" => Action::ManagePolicy,
        other => return Err(format!("unknown action `{other}`")),
    }))
}

fn parse_resource(s: &str) -> Result<ResourceMatch, String> {
    let pattern = |p: &str| Pattern::parse(p).map_err(|e| format!("bad pattern `{p}`: {e}"));
    Ok(match s {
        "*" => ResourceMatch::Any,
        "broker" => ResourceMatch::Broker,
        _ => match s.split_once(':') {
            Some(("queue", p)) => ResourceMatch::Queue(pattern(p)?),
            Some(("topic", p)) => ResourceMatch::Topic(pattern(p)?),
            Some(("binding", p)) => ResourceMatch::Binding(pattern(p)?),
            Some(("plugin", p)) => match p.split_once('@') {
                Some((_, queue)) if queue.contains('@') => {
                    return Err(format!("resource `{s}`: more than one `@`"));
                }
                Some((name, queue)) => ResourceMatch::Plugin {
                    name: pattern(name)?,
                    queue: Some(pattern(queue)?),
                },
                None => ResourceMatch::Plugin {
                    name: pattern(p)?,
                    queue: None,
                },
            },
            Some(("tenant", p)) => ResourceMatch::Tenant(pattern(p)?),
            _ => return Err(format!("unknown resource `{s}`")),
        },
    })
}

fn parse_rule(allow: bool, text: &str) -> Result<Rule, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [client, action, resource] = parts[..] else {
        return Err(format!("rule `{text}`: expected `CLIENT ACTION RESOURCE`"));
    };
    Ok(Rule {
        allow,
        text: format!("{} {text}", if allow { "allow" } else { "deny" }),
        client: (client != "*").then(|| client.to_string()),
        action: parse_action(action).map_err(|e| format!("rule `{text}`: {e}"))?,
        resource: parse_resource(resource).map_err(|e| format!("rule `{text}`: {e}"))?,
    })
}

impl Rule {
    fn matches(&self, who: &Principal, action: Action, on: &Resource) -> bool {
        if self.client.as_ref().is_some_and(|c| *c != who.client) {
            return false;
        }
        if self.action.is_some_and(|a| a != action) {
            return false;
        }
        match (&self.resource, on) {
            (ResourceMatch::Any, _) => true,
            (ResourceMatch::Broker, Resource::Broker) => true,
            (ResourceMatch::Queue(p), Resource::Queue(q)) => p.matches(q),
            (ResourceMatch::Topic(p), Resource::Topic(t)) => p.matches(t),
            (ResourceMatch::Binding(p), Resource::Binding(b)) => p.matches(&b.queue),
            (ResourceMatch::Plugin { name, queue }, Resource::Plugin(plugin)) => {
                name.matches(&plugin.name) && queue_matches(queue.as_ref(), plugin)
            }
            (ResourceMatch::Tenant(p), Resource::Tenant(n)) => p.matches(n),
            _ => false,
        }
    }
}

/// Whether `plugin` is attached where a `plugin:NAME@QUEUE` rule says (any
/// plugin for a rule without `@QUEUE`).
fn queue_matches(queue: Option<&Pattern>, plugin: &PluginRef) -> bool {
    match (queue, plugin) {
        (None, _) => true,
        (
            Some(p),
            PluginRef {
                kind: PluginKind::Filter,
                queue: Some(q),
                ..
            },
        ) => p.matches(q),
        (Some(_), _) => false,
    }
}

#[derive(Debug)]
struct Acl {
    rules: Vec<Rule>,
    default_allow: bool,
}

impl Acl {
    fn from_config(config: &Config) -> Result<Self, String> {
        let mut rules = Vec::new();
        let mut default_allow = false;
        for (key, value) in config.entries() {
            match key.as_str() {
                "allow" => rules.push(parse_rule(true, value)?),
                "deny" => rules.push(parse_rule(false, value)?),
                "default" => {
                    default_allow = match value.as_str() {
                        "allow" => true,
                        "deny" => false,
                        other => {
                            return Err(format!(
                                "config `default={other}`: expected allow or deny"
                            ));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown config key `{other}` (expected allow, deny, default)"
                    ));
                }
            }
        }
        Ok(Self {
            rules,
            default_allow,
        })
    }

    fn decide(&self, who: &Principal, action: Action, on: &Resource) -> Decision {
        match self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(who, action, on))
        {
            Some((_, r)) if r.allow => Decision::Allow,
            Some((i, r)) => Decision::Deny(format!("denied by rule {}: {}", i + 1, r.text)),
            None if self.default_allow => Decision::Allow,
            None => Decision::Deny("denied by default policy".into()),
        }
    }
}

impl Authorizer for Acl {
    fn init(config: Config) -> Result<Self, String> {
        Self::from_config(&config)
    }

    fn authorize(&mut self, who: &Principal, action: Action, resource: &Resource) -> Decision {
        self.decide(who, action, resource)
    }
}

sluice_plugin::export_authorizer!(Acl);

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(pairs: &[(&str, &str)]) -> Result<Acl, String> {
        Acl::from_config(&Config::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn who(client: &str) -> Principal {
        Principal {
            tenant: "t".into(),
            client: client.into(),
            subject: String::new(),
            sans: vec![],
            admin: false,
        }
    }

    #[test]
    fn first_match_wins() {
        let a = acl(&[("deny", "* delete queue:>"), ("allow", "* * queue:>")]).unwrap();
        assert!(
            matches!(a.decide(&who("x"), Action::Delete, &Resource::Queue("q".into())), Decision::Deny(r) if r.contains("rule 1"))
        );
        assert_eq!(
            a.decide(&who("x"), Action::Purge, &Resource::Queue("q".into())),
            Decision::Allow
        );
        assert!(
            matches!(a.decide(&who("x"), Action::Connect, &Resource::Broker), Decision::Deny(r) if r.contains("default"))
        );
    }

    fn plugin(name: &str, kind: PluginKind, queue: Option<&str>) -> Resource {
        Resource::Plugin(PluginRef {
            name: name.into(),
            kind,
            queue: queue.map(Into::into),
        })
    }

    #[test]
    fn plugin_rules_see_kind_and_queue() {
        let a = acl(&[
            ("allow", "ci admin plugin:ci.*@ci.>"),
            ("allow", "ops * plugin:>"),
            ("allow", "lead manage-policy plugin:main"),
        ])
        .unwrap();
        let filter = |queue| plugin("ci.f", PluginKind::Filter, Some(queue));
        assert_eq!(
            a.decide(&who("ci"), Action::Admin, &filter("ci.jobs")),
            Decision::Allow
        );
        assert_eq!(
            a.decide(&who("ci"), Action::Admin, &filter("ci.jobs.nightly")),
            Decision::Allow
        );
        for denied in [
            (Action::Admin, filter("orders")),
            (Action::Admin, plugin("ci.f", PluginKind::Filter, None)),
            (
                Action::Admin,
                plugin("other", PluginKind::Filter, Some("ci.jobs")),
            ),
            (Action::Admin, plugin("ci.r", PluginKind::Router, None)),
            (
                Action::ManagePolicy,
                plugin("ci.x", PluginKind::Authorizer, None),
            ),
            (Action::ManagePolicy, filter("ci.jobs")),
        ] {
            assert!(
                matches!(a.decide(&who("ci"), denied.0, &denied.1), Decision::Deny(_)),
                "{denied:?}"
            );
        }
        // Without `@QUEUE` any kind and attachment of a matching name.
        for on in [
            plugin("acl", PluginKind::Authorizer, None),
            plugin("r", PluginKind::Router, None),
            filter("orders"),
        ] {
            assert_eq!(
                a.decide(&who("ops"), Action::ManagePolicy, &on),
                Decision::Allow
            );
            assert_eq!(a.decide(&who("ops"), Action::Admin, &on), Decision::Allow);
        }
        assert_eq!(
            a.decide(
                &who("lead"),
                Action::ManagePolicy,
                &plugin("main", PluginKind::Router, None)
            ),
            Decision::Allow
        );
        assert!(matches!(
            a.decide(
                &who("lead"),
                Action::Admin,
                &plugin("main", PluginKind::Router, None)
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(acl(&[("allow", "* admin plugin:a@")]).is_err());
        assert!(acl(&[("allow", "* admin plugin:@q")]).is_err());
        assert!(acl(&[("allow", "* admin plugin:a@q@r")]).is_err());
        assert!(acl(&[("allow", "a b")]).is_err());
        assert!(
            acl(&[("allow", "* fly broker")])
                .unwrap_err()
                .contains("fly")
        );
        assert!(acl(&[("allow", "* * shelf:x")]).is_err());
        assert!(acl(&[("default", "maybe")]).is_err());
    }
}
