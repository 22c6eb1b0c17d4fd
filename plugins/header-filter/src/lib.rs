//! Drops messages by header rules.
//!
//! Config keys (repeatable, any order):
//! - `drop=NAME=VALUE`: drop when a header `NAME` equals `VALUE`;
//! - `drop=NAME`: drop when a header `NAME` is present;
//! - `require=NAME`: drop when no header `NAME` is present;
//! - `max-payload=N`: drop when the payload is longer than `N` bytes.
//!
//! Every other message is accepted. The drop reason names the rule, e.g.
//! `header level=debug`, `missing header trace-id`, `payload 2048 > 1024 bytes`.
//!
//! ```text
//! sluice plugin load header_filter.wasm --kind filter --queue logs \
//!     --config drop=level=debug --config require=trace-id
//! ```

use sluice_plugin::{Config, Filter, FilterVerdict, Message};

/// One drop rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Equals(String, String),
    Present(String),
    Missing(String),
    MaxPayload(usize),
}

struct HeaderFilter {
    rules: Vec<Rule>,
}

fn parse(config: &Config) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (key, value) in config.entries() {
        let rule = match key.as_str() {
            "drop" => match value.split_once('=') {
                Some(("", _)) => return Err(format!("config `drop={value}`: empty header name")),
                Some((name, v)) => Rule::Equals(name.into(), v.into()),
                None if value.is_empty() => return Err("config `drop`: empty header name".into()),
                None => Rule::Present(value.clone()),
            },
            "require" if !value.is_empty() => Rule::Missing(value.clone()),
            "require" => return Err("config `require`: empty header name".into()),
            "max-payload" => Rule::MaxPayload(
                value
                    .parse()
                    .map_err(|e| format!("config `max-payload={value}`: {e}"))?,
            ),
            other => {
                return Err(format!(
                    "unknown config key `{other}` (expected drop, require, max-payload)"
                ));
            }
        };
        rules.push(rule);
    }
    Ok(rules)
}

/// The reason to drop `msg`, if a rule says so.
fn decide(rules: &[Rule], msg: &Message) -> Option<String> {
    rules.iter().find_map(|rule| match rule {
        Rule::Equals(n, v) => msg
            .header_values(n)
            .any(|x| x == v)
            .then(|| format!("header {n}={v}")),
        Rule::Present(n) => msg.header(n).map(|_| format!("header {n} present")),
        Rule::Missing(n) => msg
            .header(n)
            .is_none()
            .then(|| format!("missing header {n}")),
        Rule::MaxPayload(max) => (msg.payload.len() > *max)
            .then(|| format!("payload {} > {max} bytes", msg.payload.len())),
    })
}

impl Filter for HeaderFilter {
    fn init(config: Config) -> Result<Self, String> {
        Ok(Self {
            rules: parse(&config)?,
        })
    }

    fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String> {
        Ok(match decide(&self.rules, msg) {
            Some(reason) => FilterVerdict::Drop(reason),
            None => FilterVerdict::Accept,
        })
    }
}

sluice_plugin::export_filter!(HeaderFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        Config::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn msg(headers: &[(&str, &str)], payload: &[u8]) -> Message {
        Message {
            topic: "t".into(),
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

    #[test]
    fn rules_parse_and_decide() {
        let rules = parse(&cfg(&[
            ("drop", "level=debug"),
            ("drop", "x"),
            ("require", "id"),
            ("max-payload", "3"),
        ]))
        .unwrap();
        assert_eq!(decide(&rules, &msg(&[("id", "1")], b"abc")), None);
        assert_eq!(
            decide(&rules, &msg(&[("id", "1"), ("level", "debug")], b"")).as_deref(),
            Some("header level=debug")
        );
        assert_eq!(
            decide(&rules, &msg(&[("id", "1"), ("x", "")], b"")).as_deref(),
            Some("header x present")
        );
        assert_eq!(
            decide(&rules, &msg(&[], b"")).as_deref(),
            Some("missing header id")
        );
        assert_eq!(
            decide(&rules, &msg(&[("id", "1")], b"abcd")).as_deref(),
            Some("payload 4 > 3 bytes")
        );
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(parse(&cfg(&[("drop", "")])).is_err());
        assert!(parse(&cfg(&[("drop", "=x")])).is_err());
        assert!(
            parse(&cfg(&[("max-payload", "big")]))
                .unwrap_err()
                .contains("max-payload")
        );
        assert!(
            parse(&cfg(&[("colour", "red")]))
                .unwrap_err()
                .contains("colour")
        );
    }
}
