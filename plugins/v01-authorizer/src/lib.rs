//! A test authorizer built against `sluice:plugin@0.1.0` with wit-bindgen
//! directly (not through sluice-plugin, which builds 0.2.0 components): the
//! broker must keep loading it and translate its questions.
//!
//! Config (first matching rule decides):
//! - `allow=RULE`, `deny=RULE` (repeatable, in order);
//! - `default=allow|deny` (default `deny`).
//!
//! `RULE` is `CLIENT ACTION RESOURCE`: `CLIENT` a client name or `*`;
//! `ACTION` a 0.1.0 action (connect, publish, subscribe, declare, bind,
//! delete, purge, admin) or `*`; `RESOURCE` `*`, `broker` or `KIND:NAME` with
//! `KIND` one of queue, topic, binding (its queue), plugin, tenant and `NAME`
//! exact or ending in `*` (a prefix).

// The generated bindings lower records into many flat arguments.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

wit_bindgen::generate!({
    world: "authorizer",
    path: "../../wit/0.1.0",
});

use sluice::plugin::host::log;
use sluice::plugin::types::LogLevel;

struct Rule {
    allow: bool,
    text: String,
    client: Option<String>,
    action: Option<Action>,
    resource: Option<(String, String)>,
}

struct Acl {
    rules: Vec<Rule>,
    default_allow: bool,
}

thread_local! {
    static ACL: RefCell<Option<Acl>> = const { RefCell::new(None) };
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
        other => return Err(format!("unknown 0.1.0 action `{other}`")),
    }))
}

fn parse_rule(allow: bool, text: &str) -> Result<Rule, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [client, action, resource] = parts[..] else {
        return Err(format!("rule `{text}`: expected `CLIENT ACTION RESOURCE`"));
    };
    let resource = match resource {
        "*" => None,
        "broker" => Some(("broker".to_string(), String::new())),
        r => match r.split_once(':') {
            Some((kind @ ("queue" | "topic" | "binding" | "plugin" | "tenant"), name)) => {
                Some((kind.to_string(), name.to_string()))
            }
            _ => return Err(format!("rule `{text}`: unknown resource `{r}`")),
        },
    };
    Ok(Rule {
        allow,
        text: format!("{} {text}", if allow { "allow" } else { "deny" }),
        client: (client != "*").then(|| client.to_string()),
        action: parse_action(action).map_err(|e| format!("rule `{text}`: {e}"))?,
        resource,
    })
}

fn name_matches(glob: &str, name: &str) -> bool {
    match glob.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => glob == name,
    }
}

impl Rule {
    fn matches(&self, who: &Principal, action: Action, on: &Resource) -> bool {
        if self.client.as_ref().is_some_and(|c| *c != who.client) {
            return false;
        }
        if self.action.is_some_and(|a| a != action) {
            return false;
        }
        let Some((kind, glob)) = &self.resource else {
            return true;
        };
        match (kind.as_str(), on) {
            ("broker", Resource::Broker) => true,
            ("queue", Resource::Queue(n))
            | ("topic", Resource::Topic(n))
            | ("plugin", Resource::Plugin(n))
            | ("tenant", Resource::Tenant(n)) => name_matches(glob, n),
            ("binding", Resource::Binding(b)) => name_matches(glob, &b.queue),
            _ => false,
        }
    }
}

struct V01Authorizer;

impl Guest for V01Authorizer {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut rules = Vec::new();
        let mut default_allow = false;
        for (key, value) in &config {
            match key.as_str() {
                "allow" => rules.push(parse_rule(true, value)?),
                "deny" => rules.push(parse_rule(false, value)?),
                "default" => default_allow = value == "allow",
                other => return Err(format!("unknown config key `{other}`")),
            }
        }
        log(
            LogLevel::Info,
            &format!("v01-authorizer: {} rules", rules.len()),
        );
        ACL.with(|a| {
            *a.borrow_mut() = Some(Acl {
                rules,
                default_allow,
            })
        });
        Ok(())
    }

    fn authorize(who: Principal, what: Action, on: Resource) -> Decision {
        ACL.with(|a| match &*a.borrow() {
            None => Decision::Deny("not initialized".into()),
            Some(acl) => match acl
                .rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.matches(&who, what, &on))
            {
                Some((_, r)) if r.allow => Decision::Allow,
                Some((i, r)) => Decision::Deny(format!("denied by rule {}: {}", i + 1, r.text)),
                None if acl.default_allow => Decision::Allow,
                None => Decision::Deny("denied by default policy".into()),
            },
        })
    }
}

export!(V01Authorizer);
