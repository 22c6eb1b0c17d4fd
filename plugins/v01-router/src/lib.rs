//! A test router built against `sluice:plugin@0.1.0` with wit-bindgen
//! directly (not through sluice-plugin, which builds 0.2.0 components): the
//! broker must keep loading it.
//!
//! Config:
//! - `add=QUEUE` (repeatable): append `QUEUE` to the candidates;
//! - `reject-if=NAME`: refuse messages with a header `NAME`;
//! - `topic-queue=yes`: also route to the queue named like the topic's
//!   first token.

// The generated bindings lower records into many flat arguments.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

wit_bindgen::generate!({
    world: "router",
    path: "../../wit/0.1.0",
});

use sluice::plugin::host::log;
use sluice::plugin::types::LogLevel;

#[derive(Default)]
struct Settings {
    add: Vec<String>,
    reject_if: Option<String>,
    topic_queue: bool,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

fn decide(s: &Settings, msg: &Message, mut targets: Vec<String>) -> Result<Vec<String>, String> {
    if let Some(name) = &s.reject_if
        && msg.headers.iter().any(|(k, _)| k == name)
    {
        return Err(format!("rejected by v01-router: header {name}"));
    }
    let mut extra = s.add.clone();
    if s.topic_queue
        && let Some(first) = msg.topic.split('.').next()
    {
        extra.push(first.to_string());
    }
    for q in extra {
        if !targets.contains(&q) {
            targets.push(q);
        }
    }
    Ok(targets)
}

fn with_settings<R>(f: impl FnOnce(&Settings) -> R) -> Result<R, String> {
    SETTINGS.with(|s| s.borrow().as_ref().map(f).ok_or("not initialized".into()))
}

struct V01Router;

impl Guest for V01Router {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut s = Settings::default();
        for (key, value) in config {
            match key.as_str() {
                "add" => s.add.push(value),
                "reject-if" => s.reject_if = Some(value),
                "topic-queue" => s.topic_queue = value == "yes",
                other => return Err(format!("unknown config key `{other}`")),
            }
        }
        log(LogLevel::Debug, "v01-router ready");
        SETTINGS.with(|slot| *slot.borrow_mut() = Some(s));
        Ok(())
    }

    fn route(msg: Message, candidates: Vec<String>) -> Result<Vec<String>, String> {
        with_settings(|s| decide(s, &msg, candidates)).and_then(|r| r)
    }

    fn route_batch(requests: Vec<RouteRequest>) -> Vec<Result<Vec<String>, String>> {
        requests
            .into_iter()
            .map(|r| Self::route(r.msg, r.candidates))
            .collect()
    }
}

export!(V01Router);
