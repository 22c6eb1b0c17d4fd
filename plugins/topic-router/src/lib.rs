//! Content-based routing driven by its config.
//!
//! The targets start as the candidate queues the bindings matched (duplicates
//! removed, order kept). Then, for each config entry in order:
//! - `add.<queue>=<rule>`: add `<queue>` when the rule matches;
//! - `remove.<queue>=<rule>`: remove `<queue>` when the rule matches;
//! - `reject-if=<rule>`: reject the publish (`rejected by topic-router: <rule>`);
//! - `only-candidates=true|false` (default false): `add` may only re-add
//!   queues that were candidates;
//! - `fallback=<queue>`: the target when the result would otherwise be empty.
//!
//! Rules:
//! - `header:NAME=VALUE`: a header `NAME` equals `VALUE`;
//! - `header:NAME`: a header `NAME` is present;
//! - `prefix:TEXT`: the payload starts with the bytes of `TEXT`;
//! - `topic:PATTERN`: the topic matches a NATS pattern (`*` one token, `>` the rest);
//! - `always`.
//!
//! ```text
//! sluice plugin load topic_router.wasm --kind router \
//!     --config add.audit=header:x-audit=1 --config remove.bulk=prefix:DEBUG \
//!     --config fallback=unrouted
//! ```

use sluice_plugin::{Config, Message, Pattern, RouteRequest, Router};

/// A condition on a message.
#[derive(Debug, Clone)]
enum Rule {
    HeaderEquals(String, String),
    HeaderPresent(String),
    Prefix(Vec<u8>),
    Topic(Pattern),
    Always,
}

impl Rule {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "always" {
            return Ok(Rule::Always);
        }
        match text.split_once(':') {
            Some(("header", h)) => match h.split_once('=') {
                Some(("", _)) => Err("empty header name".into()),
                Some((n, v)) => Ok(Rule::HeaderEquals(n.into(), v.into())),
                None if h.is_empty() => Err("empty header name".into()),
                None => Ok(Rule::HeaderPresent(h.into())),
            },
            Some(("prefix", p)) => Ok(Rule::Prefix(p.as_bytes().to_vec())),
            Some(("topic", p)) => Pattern::parse(p)
                .map(Rule::Topic)
                .map_err(|e| format!("bad topic pattern `{p}`: {e}")),
            _ => Err(format!(
                "unknown rule `{text}` (expected header:NAME[=VALUE], prefix:TEXT, topic:PATTERN or always)"
            )),
        }
    }

    fn matches(&self, msg: &Message) -> bool {
        match self {
            Rule::HeaderEquals(n, v) => msg.header_values(n).any(|x| x == v),
            Rule::HeaderPresent(n) => msg.header(n).is_some(),
            Rule::Prefix(p) => msg.payload.starts_with(p),
            Rule::Topic(p) => p.matches(&msg.topic),
            Rule::Always => true,
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Add(String, Rule),
    Remove(String, Rule),
    Reject(String, Rule),
}

struct TopicRouter {
    steps: Vec<Step>,
    only_candidates: bool,
    fallback: Option<String>,
}

impl TopicRouter {
    fn from_config(config: &Config) -> Result<Self, String> {
        let mut steps = Vec::new();
        let mut only_candidates = false;
        let mut fallback = None;
        for (key, value) in config.entries() {
            let rule = || Rule::parse(value).map_err(|e| format!("config `{key}={value}`: {e}"));
            let queue = |q: &str| {
                if q.is_empty() {
                    Err(format!("config `{key}`: empty queue name"))
                } else {
                    Ok(q.to_string())
                }
            };
            if let Some(q) = key.strip_prefix("add.") {
                steps.push(Step::Add(queue(q)?, rule()?));
            } else if let Some(q) = key.strip_prefix("remove.") {
                steps.push(Step::Remove(queue(q)?, rule()?));
            } else {
                match key.as_str() {
                    "reject-if" => steps.push(Step::Reject(value.clone(), rule()?)),
                    "only-candidates" => {
                        only_candidates = value.parse().map_err(|_| {
                            format!("config `only-candidates={value}`: expected true or false")
                        })?;
                    }
                    "fallback" => fallback = Some(queue(value)?),
                    other => {
                        return Err(format!(
                            "unknown config key `{other}` (expected add.<queue>, remove.<queue>, reject-if, only-candidates, fallback)"
                        ));
                    }
                }
            }
        }
        Ok(Self {
            steps,
            only_candidates,
            fallback,
        })
    }

    fn decide(&self, msg: &Message, candidates: Vec<String>) -> Result<Vec<String>, String> {
        let mut targets: Vec<String> = Vec::with_capacity(candidates.len() + 1);
        for c in &candidates {
            if !targets.contains(c) {
                targets.push(c.clone());
            }
        }
        for step in &self.steps {
            match step {
                Step::Add(q, rule) if rule.matches(msg) => {
                    let allowed = !self.only_candidates || candidates.contains(q);
                    if allowed && !targets.contains(q) {
                        targets.push(q.clone());
                    }
                }
                Step::Remove(q, rule) if rule.matches(msg) => targets.retain(|t| t != q),
                Step::Reject(text, rule) if rule.matches(msg) => {
                    return Err(format!("rejected by topic-router: {text}"));
                }
                _ => {}
            }
        }
        if targets.is_empty()
            && let Some(f) = &self.fallback
        {
            targets.push(f.clone());
        }
        Ok(targets)
    }
}

impl Router for TopicRouter {
    fn init(config: Config) -> Result<Self, String> {
        Self::from_config(&config)
    }

    fn route(&mut self, msg: &Message, candidates: Vec<String>) -> Result<Vec<String>, String> {
        self.decide(msg, candidates)
    }

    fn route_batch(&mut self, requests: Vec<RouteRequest>) -> Vec<Result<Vec<String>, String>> {
        requests
            .into_iter()
            .map(|r| self.decide(&r.msg, r.candidates))
            .collect()
    }
}

sluice_plugin::export_router!(TopicRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(pairs: &[(&str, &str)]) -> Result<TopicRouter, String> {
        TopicRouter::from_config(&Config::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn msg(topic: &str, headers: &[(&str, &str)], payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: payload.to_vec(),
            tenant: "a".into(),
            client: "c".into(),
            timestamp_ms: 0,
            redelivery_count: 0,
        }
    }

    fn qs(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn steps_apply_in_order() {
        let r = router(&[
            ("add.audit", "header:x-audit=1"),
            ("remove.bulk", "prefix:DEBUG"),
            ("add.eu", "topic:orders.eu.>"),
            ("fallback", "none"),
        ])
        .unwrap();
        assert_eq!(
            r.decide(&msg("a", &[], b""), qs(&["bulk", "bulk", "m"])),
            Ok(qs(&["bulk", "m"]))
        );
        assert_eq!(
            r.decide(&msg("orders.eu.x", &[("x-audit", "1")], b""), qs(&["m"])),
            Ok(qs(&["m", "audit", "eu"]))
        );
        assert_eq!(
            r.decide(&msg("a", &[], b"DEBUG"), qs(&["bulk"])),
            Ok(qs(&["none"]))
        );
    }

    #[test]
    fn only_candidates_and_reject() {
        let r = router(&[
            ("only-candidates", "true"),
            ("add.x", "always"),
            ("reject-if", "header:block"),
        ])
        .unwrap();
        assert_eq!(r.decide(&msg("a", &[], b""), qs(&["m"])), Ok(qs(&["m"])));
        assert!(
            r.decide(&msg("a", &[("block", "")], b""), qs(&["m"]))
                .unwrap_err()
                .contains("rejected")
        );
    }

    #[test]
    fn bad_config_names_the_key() {
        let e = router(&[("add.q", "colour:blue")]).err().unwrap();
        assert!(e.contains("add.q"), "{e}");
        assert!(router(&[("add.", "always")]).is_err());
        assert!(router(&[("nonsense", "1")]).is_err());
        assert!(router(&[("add.q", "topic:a..b")]).is_err());
    }
}
