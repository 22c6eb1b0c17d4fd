//! Stateful fuzzing of a session: arbitrary bytes are read as a little
//! program of client frames (hello, requests, publishes, settles, plugin
//! loads, raw garbage, cross-tenant names), fed to a real session of tenant
//! `acme` over memory ([`sluice::session::loopback`]), and the outcome is
//! checked against invariants that must hold whatever a client sends:
//!
//! - nothing panics (the caller's panic hook catches tasks' panics too);
//! - every byte the broker writes decodes with the client's limits;
//! - tenant `globex`'s fixture (a queue holding [`FIXTURE`] messages and
//!   its binding) is untouched: no cross-tenant effect;
//! - when the session ended, `acme` holds no connection and no unacked
//!   delivery (everything was requeued);
//! - a session that ended cleanly answered every request it read.
//!
//! Used by `tests/fuzz_session.rs` (proptest, in CI) and the cargo-fuzz
//! target `host/fuzz/fuzz_targets/session.rs` (long runs).

use std::time::Duration;

use sluice::broker::{Broker, BrokerConfig, QueueOptions};
use sluice::plugins::Principal;
use sluice_proto::{self as proto, Frame, QueueDecl, Request};

/// Messages in `globex`'s fixture queue.
pub const FIXTURE: u64 = 5;

/// A broker with tenants `acme` (the fuzzed client) and `globex` (the
/// bystander with a fixture queue), on a temporary directory.
pub struct World {
    /// The broker.
    pub broker: Broker,
    _dir: tempfile::TempDir,
}

/// An administrator principal.
pub fn admin() -> Principal {
    Principal {
        tenant: String::new(),
        client: "fuzz-admin".into(),
        subject: String::new(),
        sans: vec![],
        admin: true,
    }
}

/// A tenant client principal.
pub fn client(tenant: &str) -> Principal {
    Principal {
        tenant: tenant.into(),
        client: "fuzz".into(),
        subject: format!("CN=fuzz,O={tenant}"),
        sans: vec![format!("spiffe://sluice/tenant/{tenant}/fuzz")],
        admin: false,
    }
}

impl World {
    /// Open a broker (needs a tokio runtime) with the fixture in place.
    pub async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut config = BrokerConfig::new(dir.path());
        config.sandbox.pool_instances = 64;
        config.max_bindings_per_tenant = 64;
        config.max_queues_per_tenant = 16;
        config.max_fanout = 8;
        config.max_prefetch_bytes = 256 << 10;
        let broker = Broker::open(config).unwrap();
        let b = client("globex");
        broker
            .declare_queue(&b, "globex", "fixed", QueueOptions::default())
            .unwrap();
        broker.bind(&b, "globex", "fixed", "a.>").unwrap();
        let msgs = (0..FIXTURE)
            .map(|i| sluice::broker::Publish {
                topic: "a.x".into(),
                headers: vec![],
                payload: vec![i as u8; 10],
            })
            .collect();
        for r in broker.publish(&b, "globex", msgs).await {
            r.unwrap();
        }
        World { broker, _dir: dir }
    }

    /// Run one program; panics if an invariant does not hold.
    pub async fn check(&self, data: &[u8]) {
        let (chunks, requests) = frames(data);
        let t = sluice::session::loopback::run(
            &self.broker,
            client("acme"),
            chunks,
            Duration::from_secs(20),
        )
        .await
        .expect("admitted");
        assert!(
            t.undecodable.is_empty(),
            "the broker wrote bytes a client cannot decode: {:?}",
            t.undecodable
        );
        if t.ended.is_ok() {
            let answered = t
                .control
                .iter()
                .filter(|f| matches!(f, Frame::Response { .. }))
                .count();
            assert_eq!(
                answered, requests,
                "a cleanly ended session answered {answered} of {requests} requests"
            );
        }
        // The fixture of the other tenant is untouched.
        let queues = self.broker.list_queues(&admin(), "globex").unwrap();
        assert_eq!(queues.len(), 1, "{queues:?}");
        assert_eq!(queues[0].ready, FIXTURE, "{:?}", queues[0]);
        assert_eq!(queues[0].unacked, 0);
        let stats = self.broker.stats(&admin());
        let globex = stats.iter().find(|s| s.tenant == "globex").unwrap();
        assert_eq!(globex.bindings, 1);
        assert_eq!(globex.plugins, 0);
        // Everything acme's session held is given back.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let held: u64 = self
                .broker
                .list_queues(&admin(), "acme")
                .unwrap()
                .iter()
                .map(|q| q.unacked + q.consumers)
                .sum();
            let usage = self.broker.tenant_usage();
            let conns = usage
                .iter()
                .find(|u| u.name == "acme")
                .map_or(0, |u| u.connections);
            if held == 0 && conns == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "acme still holds {held} deliveries/consumers and {conns} connections"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.reset().await;
    }

    /// Remove what acme's program created, so the next program starts
    /// from the same state.
    async fn reset(&self) {
        let who = admin();
        for p in self.broker.list_plugins(&who, "acme").unwrap() {
            let _ = self.broker.unload_plugin(&who, "acme", &p.name);
        }
        for q in self.broker.list_queues(&who, "acme").unwrap() {
            let _ = self.broker.delete_queue(&who, "acme", &q.name);
        }
    }
}

/// Reads a program's operands.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn pick<'s>(&mut self, items: &[&'s str]) -> &'s str {
        items[self.u8() as usize % items.len()]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u8() as usize).min(max).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

const QUEUES: &[&str] = &["q0", "q1", "q2", "dlq", "fixed", "bad name", ""];
const PATTERNS: &[&str] = &["a.*", "a.>", ">", "b.x", "*", "a..b", "a.>.b"];
const TOPICS: &[&str] = &["a.x", "a.y", "b.x", "zz", "a.*", ""];
const TENANTS: &[&str] = &["acme", "globex", "", "nope"];
const PLUGINS: &[&str] = &["header-filter", "topic-router", "acl-authorizer", "hostile"];

/// The frames of a program, encoded and cut into chunks (the cut points
/// come from the program too), and how many requests they hold.
pub fn frames(data: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut c = Cursor(data);
    let mut out = Vec::new();
    let mut requests = 0usize;
    let mut id = 0u64;
    // Most programs start with hello; some do not.
    if data.first().is_none_or(|b| b % 8 != 0) {
        proto::encode(
            &Frame::Hello {
                min_version: 1,
                max_version: 1,
                agent: "fuzz".into(),
            },
            &mut out,
        );
    }
    let mut steps = 0;
    while !c.done() && steps < 64 {
        steps += 1;
        let tenant = |c: &mut Cursor| match c.u8() % 4 {
            0 => Some(c.pick(TENANTS).to_string()),
            _ => None,
        };
        let mut request = |body: Request, tenant: Option<String>, out: &mut Vec<u8>| {
            id += 1;
            requests += 1;
            proto::encode(&Frame::Request { id, tenant, body }, out);
        };
        // Operations that end a session (bad versions, garbage, server-only
        // frames, reversed ranges, too many headers) are rare, so that most
        // programs get deep.
        match c.u8() % 40 {
            0 => {
                let bad = c.u8() % 8 == 0;
                proto::encode(
                    &Frame::Hello {
                        min_version: if bad { 2 } else { 1 },
                        max_version: 1,
                        agent: "again".into(),
                    },
                    &mut out,
                )
            }
            1 | 20..=23 => {
                let flags = c.u8();
                let decl = QueueDecl {
                    name: c.pick(QUEUES).into(),
                    durable: flags & 1 == 0,
                    max_length: (flags & 2 != 0).then(|| u64::from(c.u8() % 8)),
                    overflow: if flags & 4 != 0 {
                        proto::Overflow::DropHead
                    } else {
                        proto::Overflow::RejectPublish
                    },
                    ttl_ms: (flags & 8 != 0).then(|| c.u64() % 4 * (u64::MAX / 3)),
                    dead_letter: (flags & 16 != 0).then(|| c.pick(QUEUES).into()),
                    delivery_limit: (flags & 32 != 0).then(|| u32::from(c.u8() % 4)),
                };
                let t = tenant(&mut c);
                request(Request::Declare(decl), t, &mut out);
            }
            2 | 3 | 24 | 25 => {
                let (queue, pattern) = (c.pick(QUEUES).into(), c.pick(PATTERNS).into());
                let body = if c.u8() % 2 == 0 {
                    Request::Bind { queue, pattern }
                } else {
                    Request::Unbind { queue, pattern }
                };
                let t = tenant(&mut c);
                request(body, t, &mut out);
            }
            4 => {
                let queue = c.pick(QUEUES).into();
                let body = if c.u8() % 2 == 0 {
                    Request::Delete { queue }
                } else {
                    Request::Purge { queue }
                };
                let t = tenant(&mut c);
                request(body, t, &mut out);
            }
            5..=8 | 26..=31 => {
                let n = c.u8() % 4 + 1;
                let topic = c.pick(TOPICS).to_string();
                let h = c.u8();
                let count = if h >= 250 { 60 + h % 8 } else { h % 8 };
                let headers: Vec<(String, String)> = (0..usize::from(count))
                    .map(|i| (format!("h{i}"), "v".into()))
                    .collect();
                let payload = vec![c.u8(); usize::from(c.u8()) * 64];
                let t = tenant(&mut c);
                for i in 0..n {
                    proto::encode(
                        &Frame::Publish {
                            seq: u64::from(i),
                            tenant: t.clone(),
                            topic: topic.clone(),
                            headers: headers.clone(),
                            payload: payload.clone(),
                        },
                        &mut out,
                    );
                }
            }
            9 | 32 | 33 => {
                let queue = c.pick(QUEUES).into();
                let prefetch = match c.u8() % 4 {
                    0 => c.u32(),
                    _ => u32::from(c.u8()),
                };
                let t = tenant(&mut c);
                request(Request::Subscribe { queue, prefetch }, t, &mut out);
            }
            10..=12 | 34..=37 => {
                let sub = u64::from(c.u8() % 4);
                let ranges: Vec<(u64, u64)> = (0..c.u8() % 8)
                    .map(|_| match c.u8() % 16 {
                        0 => (c.u64(), c.u64()),
                        1..=4 => (0, u64::MAX),
                        5 => {
                            let a = c.u64();
                            (a, a.saturating_add(u64::from(c.u8())))
                        }
                        _ => {
                            let a = u64::from(c.u8());
                            (a, a + u64::from(c.u8()))
                        }
                    })
                    .collect();
                let frame = match c.u8() % 3 {
                    0 => Frame::Ack { sub, ranges },
                    1 => Frame::Nack { sub, ranges },
                    _ => Frame::Reject { sub, ranges },
                };
                proto::encode(&frame, &mut out);
            }
            13 => proto::encode(
                &Frame::Cancel {
                    sub: u64::from(c.u8() % 4),
                },
                &mut out,
            ),
            14 | 38 => {
                let sub = u64::from(c.u8() % 4);
                request(Request::SyncAcks { sub }, None, &mut out);
            }
            15 => {
                let body = match c.u8() % 5 {
                    0 => Request::ListQueues,
                    1 => Request::ListPlugins,
                    2 => Request::Stats,
                    3 => Request::TenantList,
                    _ => Request::TenantDelete {
                        name: c.pick(TENANTS).into(),
                    },
                };
                let t = tenant(&mut c);
                request(body, t, &mut out);
            }
            16 => {
                let kind = c.pick(&["router", "filter", "authorizer", "bogus"]);
                let plugin = c.pick(PLUGINS);
                let wasm = match c.u8() % 4 {
                    0 => c.bytes(64),
                    _ => sluice::bundled::wasm(plugin).unwrap_or_default().to_vec(),
                };
                let config = match plugin {
                    "acl-authorizer" => vec![("default".into(), c.pick(&["allow", "deny"]).into())],
                    _ => vec![],
                };
                let body = Request::LoadPlugin {
                    name: format!("p{}", c.u8() % 3),
                    kind: kind.into(),
                    queue: (c.u8() % 2 == 0).then(|| c.pick(QUEUES).into()),
                    wasm,
                    config,
                };
                let t = tenant(&mut c);
                request(body, t, &mut out);
            }
            17 => {
                let name = format!("p{}", c.u8() % 3);
                request(Request::UnloadPlugin { name }, None, &mut out);
            }
            18 if c.u8() % 4 == 0 => {
                // Raw garbage: the session may close with an error code.
                let bytes = c.bytes(32);
                out.extend_from_slice(&bytes);
            }
            18 => {}
            19 if c.u8() % 4 == 0 => {
                // A frame the broker only sends.
                proto::encode(
                    &Frame::Confirm {
                        first: 0,
                        queues: vec![1],
                    },
                    &mut out,
                );
            }
            _ => {}
        }
    }
    // Cut the bytes at points the program chooses.
    let mut chunks = Vec::new();
    let mut rest = &out[..];
    let mut cut = Cursor(data);
    while !rest.is_empty() {
        let n = (usize::from(cut.u8()) * 16 + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        chunks.push(a.to_vec());
        rest = b;
    }
    (chunks, requests)
}

/// A panic hook that records every panic (in any task) for [`take_panics`].
pub fn record_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(info.to_string());
            previous(info);
        }));
    });
}

static PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Panics recorded since the last call.
pub fn take_panics() -> Vec<String> {
    std::mem::take(&mut *PANICS.lock().unwrap_or_else(|p| p.into_inner()))
}
