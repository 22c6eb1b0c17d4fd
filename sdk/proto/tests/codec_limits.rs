//! Every bound of [`Limits`] at its documented value (docs/security.md,
//! "frame size, names, collections"): a frame exactly at the bound decodes,
//! one unit over is refused with the right error and code. The bounds are
//! written out here, not read from `Limits::default()`, so raising (or
//! removing) one in the code makes its test fail.

use sluice_proto::*;

const MAX_FRAME: usize = 4 << 20;
const MAX_PAYLOAD: usize = 1 << 20;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 16 << 10;
const MAX_NAME: usize = 255;
const MAX_RANGES: usize = 4096;
const MAX_BATCH: usize = 1024;
const MAX_LIST: usize = 100_000;

/// Decode `wire` (one or more frames) with the default limits.
fn decode_wire(wire: &[u8]) -> Result<Option<Frame>, DecodeError> {
    let mut d = Decoder::new(Limits::default());
    d.push(wire);
    d.next_frame()
}

/// `f` at its bound: decoded back unchanged.
fn accepted(what: &str, f: Frame) {
    match decode_wire(&encode_frame(&f)) {
        Ok(Some(got)) => assert!(got == f, "{what}: decoded to another frame"),
        other => panic!("{what}: at the limit, refused: {other:?}"),
    }
}

/// `f` one over its bound: refused as `what` over `max`, `limit_exceeded`.
fn refused(case: &str, f: Frame, what: &'static str, max: usize) {
    let e = decode_wire(&encode_frame(&f)).expect_err(case);
    assert_eq!(e, DecodeError::Limit { what, max }, "{case}");
    assert_eq!(e.code(), ErrorCode::LimitExceeded, "{case}");
}

fn publish(topic: String, headers: Vec<(String, String)>, payload: Vec<u8>) -> Frame {
    Frame::Publish {
        seq: 1,
        tenant: None,
        topic,
        headers,
        payload,
    }
}

fn deliver(deliveries: Vec<Delivery>) -> Frame {
    Frame::Deliver { sub: 1, deliveries }
}

fn delivery(topic: String, headers: Vec<(String, String)>, payload: Vec<u8>) -> Delivery {
    Delivery {
        tag: 1,
        topic,
        headers,
        payload,
        redelivered: false,
    }
}

/// `n` headers with empty values.
fn headers(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (format!("h{i}"), String::new())).collect()
}

/// Headers whose names and values add up to exactly `bytes`.
fn header_bytes(bytes: usize) -> Vec<(String, String)> {
    let half = bytes / 2;
    vec![("k".repeat(half), "v".repeat(bytes - half))]
}

fn load_plugin(wasm: Vec<u8>, config: Vec<(String, String)>) -> Frame {
    Frame::Request {
        id: 1,
        tenant: None,
        body: Request::LoadPlugin {
            name: "p".into(),
            kind: "filter".into(),
            queue: None,
            wasm,
            config,
        },
    }
}

/// A valid frame whose body is exactly `body` bytes (a plugin load with a
/// component of the right size: nothing but the frame limit bounds it).
fn frame_of_body(body: usize) -> Vec<u8> {
    let probe = encode_frame(&load_plugin(vec![0; body - 64], vec![]));
    let overhead = probe.len() - 4 - (body - 64);
    let wire = encode_frame(&load_plugin(vec![0; body - overhead], vec![]));
    assert_eq!(wire.len(), 4 + body, "the frame body is {body} bytes");
    wire
}

#[test]
fn the_documented_bounds_are_the_defaults() {
    let l = Limits::default();
    assert_eq!(
        (
            l.max_frame,
            l.max_payload,
            l.max_headers,
            l.max_header_bytes,
            l.max_name,
            l.max_ranges,
            l.max_batch,
            l.max_list
        ),
        (
            MAX_FRAME,
            MAX_PAYLOAD,
            MAX_HEADERS,
            MAX_HEADER_BYTES,
            MAX_NAME,
            MAX_RANGES,
            MAX_BATCH,
            MAX_LIST
        )
    );
}

#[test]
fn frames_of_4_mib_are_accepted_and_one_byte_more_is_too_large() {
    let at = frame_of_body(MAX_FRAME);
    assert!(matches!(decode_wire(&at), Ok(Some(Frame::Request { .. }))));

    let over = frame_of_body(MAX_FRAME + 1);
    let too_large = DecodeError::TooLarge {
        len: MAX_FRAME + 1,
        max: MAX_FRAME,
    };
    assert_eq!(decode_wire(&over), Err(too_large.clone()));
    assert_eq!(too_large.code(), ErrorCode::FrameTooLarge);
    // Refused from the length prefix alone, before the body arrives.
    assert_eq!(decode_wire(&over[..4]), Err(too_large));
    // At the limit, the prefix alone just waits for the body.
    assert_eq!(decode_wire(&at[..4]), Ok(None));
}

#[test]
fn payloads_of_1_mib_are_accepted_and_one_byte_more_is_refused() {
    let t = || "t".to_string();
    accepted("publish", publish(t(), vec![], vec![7; MAX_PAYLOAD]));
    refused(
        "publish",
        publish(t(), vec![], vec![7; MAX_PAYLOAD + 1]),
        "payload",
        MAX_PAYLOAD,
    );
    accepted(
        "deliver",
        deliver(vec![delivery(t(), vec![], vec![7; MAX_PAYLOAD])]),
    );
    refused(
        "deliver",
        deliver(vec![delivery(t(), vec![], vec![7; MAX_PAYLOAD + 1])]),
        "payload",
        MAX_PAYLOAD,
    );
}

#[test]
fn sixty_four_headers_are_accepted_and_sixty_five_refused() {
    let t = || "t".to_string();
    accepted("publish", publish(t(), headers(MAX_HEADERS), vec![]));
    refused(
        "publish",
        publish(t(), headers(MAX_HEADERS + 1), vec![]),
        "headers",
        MAX_HEADERS,
    );
    accepted(
        "deliver",
        deliver(vec![delivery(t(), headers(MAX_HEADERS), vec![])]),
    );
    refused(
        "deliver",
        deliver(vec![delivery(t(), headers(MAX_HEADERS + 1), vec![])]),
        "headers",
        MAX_HEADERS,
    );
    // A plugin's config entries have the same bound.
    accepted("plugin config", load_plugin(vec![], headers(MAX_HEADERS)));
    refused(
        "plugin config",
        load_plugin(vec![], headers(MAX_HEADERS + 1)),
        "config entries",
        MAX_HEADERS,
    );
}

#[test]
fn sixteen_kib_of_header_bytes_are_accepted_and_one_more_refused() {
    let t = || "t".to_string();
    accepted(
        "publish",
        publish(t(), header_bytes(MAX_HEADER_BYTES), vec![]),
    );
    refused(
        "publish",
        publish(t(), header_bytes(MAX_HEADER_BYTES + 1), vec![]),
        "header bytes",
        MAX_HEADER_BYTES,
    );
    accepted(
        "deliver",
        deliver(vec![delivery(t(), header_bytes(MAX_HEADER_BYTES), vec![])]),
    );
    refused(
        "deliver",
        deliver(vec![delivery(
            t(),
            header_bytes(MAX_HEADER_BYTES + 1),
            vec![],
        )]),
        "header bytes",
        MAX_HEADER_BYTES,
    );
    accepted(
        "plugin config",
        load_plugin(vec![], header_bytes(MAX_HEADER_BYTES)),
    );
    refused(
        "plugin config",
        load_plugin(vec![], header_bytes(MAX_HEADER_BYTES + 1)),
        "header bytes",
        MAX_HEADER_BYTES,
    );
}

/// Every name a frame carries, as a function of that name.
type NameSite = (&'static str, &'static str, fn(String) -> Frame);

fn name_sites() -> Vec<NameSite> {
    fn req(body: Request) -> Frame {
        Frame::Request {
            id: 1,
            tenant: None,
            body,
        }
    }
    fn decl(name: String, dead_letter: Option<String>) -> Request {
        Request::Declare(QueueDecl {
            name,
            durable: true,
            max_length: None,
            overflow: Overflow::RejectPublish,
            ttl_ms: None,
            dead_letter,
            delivery_limit: None,
        })
    }
    fn plugin(name: String, kind: String, queue: Option<String>) -> Frame {
        req(Request::LoadPlugin {
            name,
            kind,
            queue,
            wasm: vec![],
            config: vec![],
        })
    }
    vec![
        ("hello agent", "agent", |n| Frame::Hello {
            min_version: 1,
            max_version: 1,
            agent: n,
        }),
        ("welcome tenant", "tenant", |n| Frame::Welcome {
            version: 1,
            tenant: n,
            client: "c".into(),
            admin: false,
            max_message: 1,
        }),
        ("welcome client", "client", |n| Frame::Welcome {
            version: 1,
            tenant: "t".into(),
            client: n,
            admin: false,
            max_message: 1,
        }),
        ("request tenant", "tenant", |n| Frame::Request {
            id: 1,
            tenant: Some(n),
            body: Request::ListQueues,
        }),
        ("declare", "queue", |n| req(decl(n, None))),
        ("declare dead letter", "queue", |n| {
            req(decl("q".into(), Some(n)))
        }),
        ("bind queue", "queue", |n| {
            req(Request::Bind {
                queue: n,
                pattern: "p".into(),
            })
        }),
        ("bind pattern", "pattern", |n| {
            req(Request::Bind {
                queue: "q".into(),
                pattern: n,
            })
        }),
        ("unbind queue", "queue", |n| {
            req(Request::Unbind {
                queue: n,
                pattern: "p".into(),
            })
        }),
        ("unbind pattern", "pattern", |n| {
            req(Request::Unbind {
                queue: "q".into(),
                pattern: n,
            })
        }),
        ("delete", "queue", |n| req(Request::Delete { queue: n })),
        ("purge", "queue", |n| req(Request::Purge { queue: n })),
        ("subscribe", "queue", |n| {
            req(Request::Subscribe {
                queue: n,
                prefetch: 1,
            })
        }),
        ("plugin name", "plugin", |n| {
            plugin(n, "filter".into(), None)
        }),
        ("plugin kind", "kind", |n| plugin("p".into(), n, None)),
        ("plugin queue", "queue", |n| {
            plugin("p".into(), "filter".into(), Some(n))
        }),
        ("unload plugin", "name", |n| {
            req(Request::UnloadPlugin { name: n })
        }),
        ("tenant create", "name", |n| {
            req(Request::TenantCreate {
                name: n,
                limits: TenantQuota::default(),
            })
        }),
        ("tenant limits", "name", |n| {
            req(Request::TenantLimits {
                name: n,
                limits: TenantQuota::default(),
            })
        }),
        ("tenant delete", "name", |n| {
            req(Request::TenantDelete { name: n })
        }),
        ("publish tenant", "tenant", |n| Frame::Publish {
            seq: 1,
            tenant: Some(n),
            topic: "t".into(),
            headers: vec![],
            payload: vec![],
        }),
        ("publish topic", "topic", |n| publish(n, vec![], vec![])),
        ("delivery topic", "topic", |n| {
            deliver(vec![delivery(n, vec![], vec![])])
        }),
    ]
}

#[test]
fn names_of_255_bytes_are_accepted_and_256_refused_everywhere() {
    for (site, what, frame) in name_sites() {
        accepted(site, frame("a".repeat(MAX_NAME)));
        refused(site, frame("a".repeat(MAX_NAME + 1)), what, MAX_NAME);
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        refused(site, frame("é".repeat(128)), what, MAX_NAME);
    }
}

#[test]
fn ack_frames_of_4096_ranges_are_accepted_and_4097_refused() {
    let ranges = |n: usize| (0..n as u64).map(|i| (i * 2, i * 2 + 1)).collect();
    type Settle = fn(Vec<(u64, u64)>) -> Frame;
    let kinds: [(&str, Settle); 3] = [
        ("ack", |ranges| Frame::Ack { sub: 1, ranges }),
        ("nack", |ranges| Frame::Nack { sub: 1, ranges }),
        ("reject", |ranges| Frame::Reject { sub: 1, ranges }),
    ];
    for (kind, frame) in kinds {
        accepted(kind, frame(ranges(MAX_RANGES)));
        refused(
            kind,
            frame(ranges(MAX_RANGES + 1)),
            "ack ranges",
            MAX_RANGES,
        );
    }
}

#[test]
fn batches_of_1024_are_accepted_and_1025_refused() {
    let deliveries = |n: usize| {
        (0..n)
            .map(|_| delivery("t".into(), vec![], vec![1]))
            .collect()
    };
    accepted("deliver", deliver(deliveries(MAX_BATCH)));
    refused(
        "deliver",
        deliver(deliveries(MAX_BATCH + 1)),
        "delivery batch",
        MAX_BATCH,
    );
    let confirm = |n: usize| Frame::Confirm {
        first: 1,
        queues: vec![1; n],
    };
    accepted("confirm", confirm(MAX_BATCH));
    refused(
        "confirm",
        confirm(MAX_BATCH + 1),
        "confirm batch",
        MAX_BATCH,
    );
}

#[test]
fn listings_of_100_000_are_accepted_and_100_001_refused() {
    fn queues(n: usize) -> Response {
        Response::Queues(vec![
            QueueSummary {
                name: "q".into(),
                durable: true,
                ready: 0,
                unacked: 0,
                bytes: 0,
                consumers: 0,
                published: 0,
                dead_lettered: 0,
                filters: vec![],
            };
            n
        ])
    }
    fn plugins(n: usize) -> Response {
        Response::Plugins(vec![
            PluginSummary {
                name: "p".into(),
                kind: "filter".into(),
                queue: None,
                abi: "0.2.0".into(),
                state: "ready".into(),
                calls: 0,
                errors: 0,
                traps: 0,
                mean_ns: 0,
            };
            n
        ])
    }
    fn stats(n: usize) -> Response {
        Response::Stats(vec![
            TenantUsage {
                tenant: "t".into(),
                queues: 0,
                ready: 0,
                unacked: 0,
                bytes: 0,
                published: 0,
                delivered: 0,
                plugins: 0,
                plugins_not_running: 0,
            };
            n
        ])
    }
    fn tenants(n: usize) -> Response {
        Response::Tenants(vec![
            TenantSummary {
                name: "t".into(),
                limits: TenantQuota::default(),
                connections: 0,
                queues: 0,
                bytes: 0,
            };
            n
        ])
    }
    type Listing = fn(usize) -> Response;
    let kinds: [(&str, &'static str, Listing); 4] = [
        ("queues", "queues", queues),
        ("plugins", "plugins", plugins),
        ("stats", "tenants", stats),
        ("tenants", "tenants", tenants),
    ];
    let response = |body| Frame::Response {
        id: 1,
        body: Ok(body),
    };
    for (kind, what, list) in kinds {
        accepted(kind, response(list(MAX_LIST)));
        refused(kind, response(list(MAX_LIST + 1)), what, MAX_LIST);
    }
}
