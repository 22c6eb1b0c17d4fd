//! A router whose output is hostile, chosen by the `hostile` header:
//!
//! - none: the candidates unchanged;
//! - `dup`: the first candidate `count` times (header, default 1000);
//! - `many`: `count` distinct names (default 2000);
//! - `unknown`: a queue that does not exist;
//! - `empty`: no target;
//! - `long-name`: one target named with `count` (default 256) bytes of `q`;
//! - `empty-name`: one target with an empty name;
//! - `loop`: spins forever (the call deadline must stop it).
//!
//! In a batch call, a request whose message has header `hostile:
//! short-batch` makes the call return one result fewer than it got
//! requests, `long-batch` one more.

use std::hint::black_box;

use sluice_plugin::{Config, Message, RouteRequest, Router};

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
            Some("long-name") => vec!["q".repeat(count(256))],
            Some("empty-name") => vec![String::new()],
            Some("loop") => {
                let mut i = 0u64;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            // Only meaningful in a batch (see `route_batch`).
            Some("short-batch" | "long-batch") => candidates,
            Some(other) => return Err(format!("unknown hostile mode `{other}`")),
        })
    }

    fn route_batch(&mut self, requests: Vec<RouteRequest>) -> Vec<Result<Vec<String>, String>> {
        let mode = |m: &str| requests.iter().any(|r| r.msg.header("hostile") == Some(m));
        let (short, long) = (mode("short-batch"), mode("long-batch"));
        let mut out: Vec<_> = requests
            .into_iter()
            .map(|r| self.route(&r.msg, r.candidates))
            .collect();
        if short {
            out.pop();
        }
        if long {
            out.push(Ok(Vec::new()));
        }
        out
    }
}

sluice_plugin::export_router!(HostileRouter);
