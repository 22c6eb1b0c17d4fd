//! A test filter built against `sluice:plugin@0.1.0` with wit-bindgen
//! directly (not through sluice-plugin, which builds 0.2.0 components): the
//! broker must keep loading it.
//!
//! Config:
//! - `drop=NAME=VALUE`: drop messages with that header (default `level=debug`);
//! - `tag=NAME=VALUE`: replace every other message by one with that header
//!   appended (and the payload unchanged);
//! - `fail=NAME`: return an error for messages with a header `NAME`.

// The generated bindings lower records into many flat arguments.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

wit_bindgen::generate!({
    world: "filter",
    path: "../../wit/0.1.0",
});

use sluice::plugin::host::log;
use sluice::plugin::types::{LogLevel, Replacement};

#[derive(Default)]
struct Settings {
    drop: (String, String),
    tag: Option<(String, String)>,
    fail: Option<String>,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

fn pair(key: &str, value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("config `{key}={value}`: expected NAME=VALUE"))
}

fn decide(s: &Settings, msg: Message) -> Result<FilterVerdict, String> {
    let has = |name: &str, value: Option<&str>| {
        msg.headers
            .iter()
            .any(|(k, v)| k == name && value.is_none_or(|want| v == want))
    };
    if let Some(name) = &s.fail
        && has(name, None)
    {
        return Err(format!("v01-filter refuses messages with header {name}"));
    }
    if has(&s.drop.0, Some(&s.drop.1)) {
        return Ok(FilterVerdict::Drop(format!(
            "v01-filter drops {}={}",
            s.drop.0, s.drop.1
        )));
    }
    Ok(match &s.tag {
        None => FilterVerdict::Accept,
        Some(tag) => {
            let mut headers = msg.headers;
            headers.push(tag.clone());
            FilterVerdict::Replace(Replacement {
                headers,
                payload: msg.payload,
            })
        }
    })
}

fn with_settings<R>(f: impl FnOnce(&Settings) -> R) -> Result<R, String> {
    SETTINGS.with(|s| s.borrow().as_ref().map(f).ok_or("not initialized".into()))
}

struct V01Filter;

impl Guest for V01Filter {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut s = Settings {
            drop: ("level".into(), "debug".into()),
            ..Settings::default()
        };
        for (key, value) in &config {
            match key.as_str() {
                "drop" => s.drop = pair(key, value)?,
                "tag" => s.tag = Some(pair(key, value)?),
                "fail" => s.fail = Some(value.clone()),
                other => return Err(format!("unknown config key `{other}`")),
            }
        }
        log(LogLevel::Debug, "v01-filter ready");
        SETTINGS.with(|slot| *slot.borrow_mut() = Some(s));
        Ok(())
    }

    fn filter(msg: Message) -> Result<FilterVerdict, String> {
        with_settings(|s| decide(s, msg)).and_then(|r| r)
    }

    fn filter_batch(msgs: Vec<Message>) -> Vec<Result<FilterVerdict, String>> {
        msgs.into_iter().map(Self::filter).collect()
    }
}

export!(V01Filter);
