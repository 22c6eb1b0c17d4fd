//! A filter that misbehaves on demand, to prove the sandbox contains it.
//!
//! Without a `hostile` header every message is accepted, so after a trap the
//! re-instantiated plugin visibly answers correctly again.
//!
//! Config (for `init`):
//! - `init=ok|loop|error|panic` (default `ok`): `loop` spins forever inside
//!   `init`, `error` returns `Err("init refused by config")`, `panic` panics.
//!
//! Per message, header `hostile`:
//! - `loop`: an infinite loop (the deadline must stop it);
//! - `alloc`: allocates 1 MiB chunks without bound, touching every wasm page (the memory cap must stop it);
//! - `panic`: `panic!("hostile panic")`;
//! - `recurse`: unbounded non-tail recursion (the stack limit must stop it);
//! - `big-output`: replaces the payload with 12 MiB (over the output bound, under the memory cap);
//! - `many-headers`: replaces the headers with 20 000 small headers;
//! - `log-flood`: logs 10 000 lines of 1 KiB, then accepts;
//! - `error`: returns `Err("hostile error")`;
//! - `n-headers`: replaces the headers with `count` (header) of them;
//! - `slow`: busy-loops `ms` (header) × 200 000 iterations, then accepts;
//! - `header-bytes`: replaces the headers with 8 headers `h0`..`h7` whose
//!   names and values total `bytes` (header, default 17 000; a multiple of
//!   8 is exact): over the 16 KiB header-byte bound in far fewer than 64
//!   headers;
//! - `long-reason`: drops the message with a reason of `bytes` (header,
//!   default 5 000) bytes of `€` (3 bytes each, so a cut at 1 KiB must
//!   respect char boundaries);
//! - `long-error`: returns an error of that length.
//!
//! In a batch call, a message with header `hostile: short-batch` makes the
//! call return one result fewer than it got messages, `long-batch` one more.

use std::hint::black_box;

use sluice_plugin::{Config, Filter, FilterVerdict, Message, Replacement};

struct Hostile;

impl Filter for Hostile {
    fn init(config: Config) -> Result<Self, String> {
        match config.get("init").unwrap_or("ok") {
            "ok" => Ok(Hostile),
            "loop" => spin(),
            "error" => Err("init refused by config".into()),
            "panic" => panic!("hostile init panic"),
            other => Err(format!("config key `init`: unknown value `{other}`")),
        }
    }

    fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String> {
        match msg.header("hostile") {
            None => Ok(FilterVerdict::Accept),
            Some("loop") => spin(),
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touch every wasm page (64 KiB) so the memory is really used.
                    let mut chunk = vec![0u8; 1 << 20];
                    for page in chunk.chunks_mut(64 << 10) {
                        page[0] = 0xA5;
                    }
                    hoard.push(black_box(chunk));
                }
            }
            Some("panic") => panic!("hostile panic"),
            Some("recurse") => Ok(FilterVerdict::Drop(format!("depth {}", recurse(0)))),
            Some("big-output") => Ok(FilterVerdict::Replace(Replacement {
                headers: Vec::new(),
                payload: vec![b'x'; 12 << 20],
            })),
            Some("many-headers") => Ok(FilterVerdict::Replace(Replacement {
                headers: (0..20_000)
                    .map(|i| (format!("h{i}"), "v".to_string()))
                    .collect(),
                payload: msg.payload.clone(),
            })),
            Some("n-headers") => {
                let n: usize = msg
                    .header("count")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Ok(FilterVerdict::Replace(Replacement {
                    headers: (0..n).map(|i| (format!("h{i}"), "v".to_string())).collect(),
                    payload: msg.payload.clone(),
                }))
            }
            Some("log-flood") => {
                let line = "x".repeat(1024);
                for _ in 0..10_000 {
                    sluice_plugin::info(&line);
                }
                Ok(FilterVerdict::Accept)
            }
            Some("error") => Err("hostile error".into()),
            Some("slow") => {
                let ms: u64 = msg.header("ms").and_then(|v| v.parse().ok()).unwrap_or(1);
                let mut x = 0u64;
                for i in 0..ms * 200_000 {
                    x = black_box(x.wrapping_add(i));
                }
                black_box(x);
                Ok(FilterVerdict::Accept)
            }
            Some("header-bytes") => {
                let bytes: usize = msg
                    .header("bytes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(17_000);
                let value = "v".repeat((bytes / 8).saturating_sub(2));
                Ok(FilterVerdict::Replace(Replacement {
                    headers: (0..8).map(|i| (format!("h{i}"), value.clone())).collect(),
                    payload: msg.payload.clone(),
                }))
            }
            Some("long-reason") => Ok(FilterVerdict::Drop(long_text(msg))),
            Some("long-error") => Err(long_text(msg)),
            // Only meaningful in a batch (see `filter_batch`).
            Some("short-batch" | "long-batch") => Ok(FilterVerdict::Accept),
            Some(other) => Err(format!("unknown hostile mode `{other}`")),
        }
    }

    fn filter_batch(&mut self, msgs: Vec<Message>) -> Vec<Result<FilterVerdict, String>> {
        let mode = |m: &str| msgs.iter().any(|msg| msg.header("hostile") == Some(m));
        let (short, long) = (mode("short-batch"), mode("long-batch"));
        let mut out: Vec<_> = msgs.iter().map(|m| self.filter(m)).collect();
        if short {
            out.pop();
        }
        if long {
            out.push(Ok(FilterVerdict::Accept));
        }
        out
    }
}

/// `bytes` (header, default 5 000) bytes of `€`, rounded down to whole chars.
fn long_text(msg: &Message) -> String {
    let bytes: usize = msg
        .header("bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    "€".repeat(bytes / '€'.len_utf8())
}

/// Spin forever; the optimizer cannot remove the loop.
fn spin<T>() -> T {
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Recurse without bound. `black_box` keeps each frame and prevents the
/// compiler from turning the recursion into a loop.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let next = black_box(depth + 1);
    black_box(recurse(next)).wrapping_add(depth)
}

sluice_plugin::export_filter!(Hostile);
