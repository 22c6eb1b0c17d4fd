//! A router whose output is hostile, chosen by the `hostile` header:
//!
//! - none: the candidates unchanged;
//! - `dup`: the first candidate `count` times (header, default 1000);
//! - `many`: `count` distinct names (default 2000);
//! - `unknown`: a queue that does not exist;
//! - `empty`: no target.

use sluice_plugin::{Config, Message, Router};

struct HostileRouter;

impl Router for HostileRouter {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(HostileRouter)
    }

    fn route(&mut self, msg: &Message, candidates: Vec<String>) -> Result<Vec<String>, String> {
        let count = |default: usize| {
            msg.header("count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Ok(match msg.header("hostile") {
            None => candidates,
            Some("dup") => {
                let first = candidates.first().cloned().unwrap_or_default();
                vec![first; count(1000)]
            }
            Some("many") => (0..count(2000)).map(|i| format!("q{i}")).collect(),
            Some("unknown") => vec!["no-such-queue".into()],
            Some("empty") => Vec::new(),
            Some(other) => return Err(format!("unknown hostile mode `{other}`")),
        })
    }
}

sluice_plugin::export_router!(HostileRouter);
