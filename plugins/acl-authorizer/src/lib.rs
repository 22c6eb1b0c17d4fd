//! An authorizer with ordered allow/deny rules from its config. The first
//! matching rule decides; without a match, `default` decides.
//!
//! Config keys:
//! - `allow=RULE`, `deny=RULE` (repeatable, in order);
//! - `default=allow|deny` (default `deny`).
//!
//! `RULE` is `CLIENT ACTION RESOURCE`, separated by spaces:
//! - `CLIENT`: a client name, or `*`;
//! - `ACTION`: connect, publish, subscribe, declare, bind, delete, purge, admin, or `*`;
//! - `RESOURCE`: `*`, `broker`, `queue:PATTERN`, `topic:PATTERN`,
//!   `binding:QUEUEPATTERN`, `plugin:PATTERN` or `tenant:PATTERN`, where
//!   `PATTERN` is a NATS pattern (`*` one token, `>` the rest).
//!
//! A deny names its rule: `denied by rule 2: deny * delete queue:>`, or
//! `denied by default policy`.
//!
//! ```text
//! sluice plugin load acl_authorizer.wasm --kind authorizer \
//!     --config 'allow=ingest publish topic:orders.>' --config 'allow=* connect broker'
//! ```

use sluice_plugin::{Action, Authorizer, Config, Decision, Pattern, Principal, Resource};

#[derive(Debug, Clone)]
enum ResourceMatch {
    Any,
    Broker,
    Queue(Pattern),
    Topic(Pattern),
    Binding(Pattern),
    Plugin(Pattern),
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
            Some(("plugin", p)) => ResourceMatch::Plugin(pattern(p)?),
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
            (ResourceMatch::Plugin(p), Resource::Plugin(n)) => p.matches(n),
            (ResourceMatch::Tenant(p), Resource::Tenant(n)) => p.matches(n),
            _ => false,
        }
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

    #[test]
    fn bad_rules_are_refused() {
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
