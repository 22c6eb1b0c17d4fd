//! Rewrites JSON payloads: redacts or removes fields and edits headers.
//!
//! Config keys (repeatable):
//! - `redact=FIELD`: the value at `FIELD` (a dotted path into JSON objects,
//!   e.g. `card.number`) becomes the string `"***"`;
//! - `remove=FIELD`: the field is deleted;
//! - `remove-header=NAME`: every header `NAME` is removed;
//! - `set-header=NAME:VALUE`: header `NAME` is set to `VALUE` (replacing any);
//! - `non-json=accept|drop|error` (default `error`): what happens to a payload
//!   that is not JSON (`error` dead-letters it with `payload is not JSON: ...`).
//!
//! A message that nothing changed is accepted as is; otherwise the filter
//! returns a replacement with the new headers and payload.

use serde_json::Value;
use sluice_plugin::{Config, Filter, FilterVerdict, Message, Replacement};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonJson {
    Accept,
    Drop,
    Error,
}

#[derive(Debug)]
struct Redact {
    redact: Vec<Vec<String>>,
    remove: Vec<Vec<String>>,
    remove_headers: Vec<String>,
    set_headers: Vec<(String, String)>,
    non_json: NonJson,
}

fn path(key: &str, value: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = value.split('.').map(str::to_string).collect();
    if parts.iter().any(String::is_empty) {
        return Err(format!("config `{key}={value}`: empty path segment"));
    }
    Ok(parts)
}

impl Redact {
    fn from_config(config: &Config) -> Result<Self, String> {
        let mut r = Redact {
            redact: vec![],
            remove: vec![],
            remove_headers: vec![],
            set_headers: vec![],
            non_json: NonJson::Error,
        };
        for (key, value) in config.entries() {
            match key.as_str() {
                "redact" => r.redact.push(path(key, value)?),
                "remove" => r.remove.push(path(key, value)?),
                "remove-header" => r.remove_headers.push(value.clone()),
                "set-header" => match value.split_once(':') {
                    Some((n, v)) if !n.is_empty() => r.set_headers.push((n.into(), v.into())),
                    _ => return Err(format!("config `set-header={value}`: expected NAME:VALUE")),
                },
                "non-json" => {
                    r.non_json = match value.as_str() {
                        "accept" => NonJson::Accept,
                        "drop" => NonJson::Drop,
                        "error" => NonJson::Error,
                        other => {
                            return Err(format!(
                                "config `non-json={other}`: expected accept, drop or error"
                            ));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown config key `{other}` (expected redact, remove, remove-header, set-header, non-json)"
                    ));
                }
            }
        }
        Ok(r)
    }

    fn transform(&self, msg: &Message) -> Result<FilterVerdict, String> {
        let mut changed = false;
        let mut payload = None;
        if !self.redact.is_empty() || !self.remove.is_empty() {
            let mut json: Value = match serde_json::from_slice(&msg.payload) {
                Ok(v) => v,
                Err(e) => {
                    return match self.non_json {
                        NonJson::Accept => Ok(FilterVerdict::Accept),
                        NonJson::Drop => Ok(FilterVerdict::Drop("payload is not JSON".into())),
                        NonJson::Error => Err(format!("payload is not JSON: {e}")),
                    };
                }
            };
            let mut edited = false;
            for p in &self.redact {
                if let Some(v) = lookup(&mut json, p) {
                    *v = Value::String("***".into());
                    edited = true;
                }
            }
            for p in &self.remove {
                let (last, parent) = p.split_last().expect("paths are non-empty");
                if let Some(Value::Object(map)) = lookup(&mut json, parent) {
                    edited |= map.remove(last).is_some();
                }
            }
            if edited {
                payload = Some(serde_json::to_vec(&json).map_err(|e| e.to_string())?);
                changed = true;
            }
        }
        let mut headers = msg.headers.clone();
        let before = headers.len();
        headers.retain(|(k, _)| !self.remove_headers.contains(k));
        changed |= headers.len() != before;
        for (n, v) in &self.set_headers {
            let already = headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, x)| x)
                .eq(std::iter::once(v));
            if !already {
                headers.retain(|(k, _)| k != n);
                headers.push((n.clone(), v.clone()));
                changed = true;
            }
        }
        if !changed {
            return Ok(FilterVerdict::Accept);
        }
        Ok(FilterVerdict::Replace(Replacement {
            headers,
            payload: payload.unwrap_or_else(|| msg.payload.clone()),
        }))
    }
}

/// The value at `path` inside nested objects.
fn lookup<'a>(json: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(json, |v, key| v.as_object_mut()?.get_mut(key))
}

impl Filter for Redact {
    fn init(config: Config) -> Result<Self, String> {
        Self::from_config(&config)
    }

    fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String> {
        self.transform(msg)
    }
}

sluice_plugin::export_filter!(Redact);

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(pairs: &[(&str, &str)]) -> Result<Redact, String> {
        Redact::from_config(&Config::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
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
    fn redacts_nested_fields() {
        let r = redact(&[("redact", "a.b"), ("remove", "c")]).unwrap();
        let FilterVerdict::Replace(out) = r
            .transform(&msg(&[], br#"{"a":{"b":1,"x":2},"c":3}"#))
            .unwrap()
        else {
            panic!("expected a replacement")
        };
        let v: Value = serde_json::from_slice(&out.payload).unwrap();
        assert_eq!(v, serde_json::json!({"a":{"b":"***","x":2}}));
    }

    #[test]
    fn unchanged_messages_are_accepted() {
        let r = redact(&[("redact", "missing"), ("set-header", "k:v")]).unwrap();
        assert_eq!(
            r.transform(&msg(&[("k", "v")], b"{}")).unwrap(),
            FilterVerdict::Accept
        );
    }

    #[test]
    fn non_json_policies() {
        assert!(
            redact(&[("redact", "a")])
                .unwrap()
                .transform(&msg(&[], b"x"))
                .unwrap_err()
                .contains("not JSON")
        );
        let drop = redact(&[("redact", "a"), ("non-json", "drop")]).unwrap();
        assert!(matches!(
            drop.transform(&msg(&[], b"x")).unwrap(),
            FilterVerdict::Drop(_)
        ));
        assert!(redact(&[("non-json", "maybe")]).is_err());
        assert!(redact(&[("redact", "a..b")]).is_err());
    }
}
