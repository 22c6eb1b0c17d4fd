//! Hostile clients over real QUIC: a raw quinn client that sends frames out
//! of order or of unknown kinds, floods publishes or requests without
//! reading the answers, opens streams it may not, subscribes without ever
//! reading its deliveries. The broker answers with error codes, holds a
//! bounded amount for each, and a well-behaved client is served throughout.

use std::future::Future;
use std::time::{Duration, Instant};

use sluice_client::{ErrorCode, QueueSpec};
use sluice_proto::{self as proto, Frame, Request, Response};
use sluice_tests::Harness;
use sluice_tests::raw::{Raw, connect, connect_windows, flood, hello, raw, read_frames, stalls};

const WAIT: Duration = Duration::from_secs(10);

/// The bounds of `host/src/session` and `host/src/broker/subscription.rs`
/// as documented (docs/security.md); written out so that raising one in
/// the code fails its test.
const OUT_FRAMES: u64 = 64;
const SUB_COMMANDS: u64 = 256;
const LOAD_BYTES: u64 = 2 << 20;
const DELIVERY_BUDGET: u64 = 8 << 20;

/// The broker of `h`.
fn broker(h: &Harness) -> &sluice::broker::Broker {
    &h.running.as_ref().unwrap().broker
}

/// A raw connection as `acme` (after hello) whose client gives each stream
/// `stream_window` bytes of credit and the connection `conn_window` in all:
/// delivery streams it never reads stall at a few KiB while the control
/// stream keeps the rest of the connection's credit.
async fn raw_windows(h: &Harness, stream_window: u32, conn_window: u32) -> Raw {
    let mut r = connect_windows(
        h,
        "acme",
        stream_window,
        conn_window,
        proto::MAX_SUBSCRIPTIONS,
    )
    .await;
    r.send.write_all(&hello()).await.unwrap();
    let welcome = read_frames(&mut r.recv, 1).await;
    assert!(matches!(welcome[0], Frame::Welcome { .. }), "{welcome:?}");
    r
}

/// Subscribe to `queue` on a raw connection; the subscription id.
async fn raw_subscribe(r: &mut Raw, id: u64, queue: &str, prefetch: u32) -> u64 {
    r.send
        .write_all(&proto::encode_frame(&Frame::Request {
            id,
            tenant: None,
            body: Request::Subscribe {
                queue: queue.into(),
                prefetch,
            },
        }))
        .await
        .unwrap();
    let answer = read_frames(&mut r.recv, 1).await;
    match answer.first() {
        Some(Frame::Response {
            id: got,
            body: Ok(Response::Subscribed { sub }),
        }) if *got == id => *sub,
        other => panic!("subscribe {queue}: {other:?}"),
    }
}

/// Whether `f` completes when polled once, right now.
fn ready_now<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx).is_ready()
}

/// A well-behaved client publishes and consumes `n` messages on its own queue.
async fn served(h: &Harness, queue: &str, n: usize) {
    let c = h.client("globex").await;
    c.declare(QueueSpec::new(queue)).await.unwrap();
    c.bind(queue, queue).await.unwrap();
    let confirms: Vec<_> = (0..n)
        .map(|i| c.publish(queue, vec![], format!("m{i}").into_bytes()))
        .collect();
    for f in confirms {
        assert_eq!(tokio::time::timeout(WAIT, f).await.unwrap().unwrap(), 1);
    }
    let mut sub = c.subscribe(queue, 64).await.unwrap();
    for _ in 0..n {
        let d = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("served in time")
            .unwrap();
        sub.ack(d.tag);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_unknown_frames_get_error_codes() {
    let h = Harness::start().await;
    let unknown_kind = {
        // A well-formed length prefix around a frame tag no version defines.
        let body = [0xfdu8, 0x01, 0x02];
        let mut b = (body.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&body);
        b
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, ErrorCode)> = vec![
        (
            "publish before hello",
            vec![proto::encode_frame(&Frame::Publish {
                seq: 1,
                tenant: None,
                topic: "t".into(),
                headers: vec![],
                payload: b"x".to_vec(),
            })],
            ErrorCode::Protocol,
        ),
        (
            "a server frame from a client",
            vec![
                hello(),
                proto::encode_frame(&Frame::Confirm {
                    first: 1,
                    queues: vec![1],
                }),
            ],
            ErrorCode::Protocol,
        ),
        (
            "an unknown frame kind",
            vec![hello(), unknown_kind],
            ErrorCode::BadFrame,
        ),
        (
            "hello for a future version only",
            vec![proto::encode_frame(&Frame::Hello {
                min_version: 9,
                max_version: 9,
                agent: "future".into(),
            })],
            ErrorCode::UnsupportedVersion,
        ),
    ];
    for (what, writes, code) in cases {
        let mut r = connect(&h, 1 << 20).await;
        for w in writes {
            r.send.write_all(&w).await.unwrap();
        }
        let frames = read_frames(&mut r.recv, 8).await;
        let error = frames.iter().find_map(|f| match f {
            Frame::Error(e) => Some(e.clone()),
            _ => None,
        });
        let error = error.unwrap_or_else(|| panic!("{what}: an error frame, got {frames:?}"));
        assert_eq!(error.code, code, "{what}: {error:?}");
        assert!(!error.message.is_empty(), "{what}");
    }
    served(&h, "fine", 10).await;
}

/// A producer that publishes as fast as it can and never reads a confirm:
/// the broker reads its publishes only while their answers fit in the
/// client's window plus the connection's publish budget, so the producer's
/// writes stall; another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_never_reads_confirms_is_flow_controlled() {
    let h = Harness::start().await;
    let admin = h.client("acme").await;
    admin
        .declare(QueueSpec::new("sink").max_length(1000).drop_head())
        .await
        .unwrap();
    admin.bind("sink", "flood").await.unwrap();

    let r = raw(&h, 8 << 10).await;
    let written = flood(r.send, |seq| Frame::Publish {
        seq: seq + 1,
        tenant: None,
        topic: "flood".into(),
        headers: vec![],
        payload: vec![7; 1024],
    });
    served(&h, "meanwhile", 200).await;
    let total = stalls(&written).await;
    // 8 MiB publish budget + 1.25 MB stream window + the confirms that fit
    // in the client's 8 KiB window (~1 byte each, 1 KiB messages).
    assert!(
        total < 40 << 20,
        "the producer wrote {total} bytes without reading a confirm"
    );
    served(&h, "after", 50).await;
    drop(r.recv);
    r.conn.close(0u32.into(), b"done");
}

/// Requests flooded without reading a response: the session stops reading
/// once its answers fill the client's window and the outgoing queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_responses_is_flow_controlled() {
    let h = Harness::start().await;
    let r = raw(&h, 4 << 10).await;
    let written = flood(r.send, |id| Frame::Request {
        id,
        tenant: None,
        body: Request::ListQueues,
    });
    let total = stalls(&written).await;
    assert!(
        total < 8 << 20,
        "the client wrote {total} bytes of requests without reading"
    );
    // Stalled: the session waits to queue one more response, with exactly
    // OUT_FRAMES queued (never more).
    let peak = broker(&h).session_peaks().out_frames;
    assert_eq!(
        peak, OUT_FRAMES,
        "frames queued for a client that does not read"
    );
    served(&h, "meanwhile", 50).await;
    assert_eq!(broker(&h).session_peaks().out_frames, OUT_FRAMES);
    drop(r.recv);
}

/// A client may open exactly one stream, the control stream: the broker
/// grants no second bidirectional stream and no unidirectional one (QUIC
/// stream limits, sent in the handshake, so a stream the client may open
/// opens at once), and the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_are_not_granted() {
    let h = Harness::start().await;
    let mut r = raw(&h, 1 << 20).await;
    // The first extra stream of each kind, asked before and still waiting
    // after a round trip on the control stream (the broker had every chance
    // to grant more credit).
    let mut bi = std::pin::pin!(r.conn.open_bi());
    let mut uni = std::pin::pin!(r.conn.open_uni());
    assert!(
        !ready_now(bi.as_mut()),
        "a second bidirectional stream opened"
    );
    assert!(!ready_now(uni.as_mut()), "a unidirectional stream opened");

    // The control stream still answers.
    r.send
        .write_all(&proto::encode_frame(&Frame::Request {
            id: 1,
            tenant: None,
            body: Request::ListQueues,
        }))
        .await
        .unwrap();
    let answer = read_frames(&mut r.recv, 1).await;
    assert!(
        matches!(answer.first(), Some(Frame::Response { id: 1, body: Ok(_) })),
        "{answer:?}"
    );
    served(&h, "meanwhile", 20).await;
    assert!(
        !ready_now(bi.as_mut()),
        "a second bidirectional stream was granted later"
    );
    assert!(
        !ready_now(uni.as_mut()),
        "a unidirectional stream was granted later"
    );
    // Asking for thousands more gets none of them either.
    for _ in 0..2000 {
        assert!(!ready_now(std::pin::pin!(r.conn.open_bi())));
        assert!(!ready_now(std::pin::pin!(r.conn.open_uni())));
    }
    assert!(
        r.conn.close_reason().is_none(),
        "the connection is still open"
    );
}

/// A consumer that subscribes and never reads its delivery stream holds
/// `prefetch` messages at most; the rest stay ready on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_holds_only_its_prefetch() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("backlog")).await.unwrap();
    c.bind("backlog", "b").await.unwrap();
    let confirms: Vec<_> = (0..2000)
        .map(|_| c.publish("b", vec![], vec![1; 2048]))
        .collect();
    for f in confirms {
        f.await.unwrap();
    }

    let mut r = raw(&h, 1 << 20).await;
    let subscribe = |id: u64| {
        proto::encode_frame(&Frame::Request {
            id,
            tenant: None,
            body: Request::Subscribe {
                queue: "backlog".into(),
                prefetch: 100,
            },
        })
    };
    r.send.write_all(&subscribe(1)).await.unwrap();
    let answer = read_frames(&mut r.recv, 1).await;
    assert!(
        matches!(answer.first(), Some(Frame::Response { id: 1, body: Ok(_) })),
        "{answer:?}"
    );
    // Never accept or read the delivery stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let q = c
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.name == "backlog")
        .unwrap();
    assert_eq!(q.unacked, 100, "{q:?}");
    assert_eq!(q.ready, 1900, "{q:?}");

    served(&h, "meanwhile", 50).await;

    // Closing the connection requeues what it held.
    r.conn.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = c
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.name == "backlog")
        .unwrap();
    assert_eq!((q.unacked, q.ready), (0, 2000), "{q:?}");
}

/// A consumer that never reads its deliveries, with a prefetch far above
/// what it is sent and a backlog on several subscriptions: each batch
/// loaded from the store is at most LOAD_BYTES, and the connection holds at
/// most DELIVERY_BUDGET loaded across its subscriptions (the next batch
/// waits for budget instead of being loaded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_loads_a_bounded_amount() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    // Five queues of twelve messages just under 256 KiB: a batch holds
    // eight (2 MiB), a queue three megabytes, all five 15 MiB.
    let payload = (256 << 10) - 256;
    let (queues, per_queue) = (5, 12);
    let mut confirms = Vec::new();
    for i in 0..queues {
        let q = format!("big{i}");
        c.declare(QueueSpec::new(&q).transient()).await.unwrap();
        c.bind(&q, &q).await.unwrap();
        for _ in 0..per_queue {
            confirms.push(c.publish(&q, vec![], vec![i as u8; payload]));
        }
    }
    for f in confirms {
        assert_eq!(tokio::time::timeout(WAIT, f).await.unwrap().unwrap(), 1);
    }

    let mut r = raw_windows(&h, 16 << 10, 1 << 20).await;
    for i in 0..queues {
        raw_subscribe(&mut r, i + 1, &format!("big{i}"), 10_000).await;
    }
    // Never read the delivery streams. Four full batches fit the budget:
    // wait for them, then give the fifth every chance to be loaded too.
    let full_batch = 8 * payload as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker(&h).session_peaks().delivery_loaded_bytes < 4 * full_batch {
        assert!(
            Instant::now() < deadline,
            "four batches never loaded: {:?}",
            broker(&h).session_peaks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peaks = broker(&h).session_peaks();
    assert!(
        (full_batch..=LOAD_BYTES).contains(&peaks.delivery_batch_bytes),
        "one batch loaded {} bytes (bound {LOAD_BYTES})",
        peaks.delivery_batch_bytes
    );
    assert!(
        peaks.delivery_loaded_bytes <= DELIVERY_BUDGET,
        "the connection held {} bytes loaded (bound {DELIVERY_BUDGET})",
        peaks.delivery_loaded_bytes
    );
    served(&h, "meanwhile", 20).await;
    r.conn.close(0u32.into(), b"bye");
}

/// Settle frames for a subscription whose task is stuck writing to a
/// client that never reads its deliveries: at most SUB_COMMANDS are
/// queued, then the broker stops reading the control stream (the client's
/// writes stall); another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_frames_queue_at_most_256_per_subscription() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("held").transient()).await.unwrap();
    c.bind("held", "held").await.unwrap();
    let confirms: Vec<_> = (0..20)
        .map(|_| c.publish("held", vec![], vec![3; 64 << 10]))
        .collect();
    for f in confirms {
        f.await.unwrap();
    }
    let mut r = raw_windows(&h, 4 << 10, 1 << 20).await;
    let sub = raw_subscribe(&mut r, 1, "held", 20).await;
    // The subscription's task writes 1.3 MB into a 4 KiB window and waits
    // there. Acks of a tag it does not hold change nothing when applied.
    let written = flood(r.send, move |_| Frame::Ack {
        sub,
        ranges: vec![(u64::MAX, u64::MAX)],
    });
    served(&h, "meanwhile", 50).await;
    let total = stalls(&written).await;
    let peak = broker(&h).session_peaks().sub_commands;
    assert_eq!(
        peak, SUB_COMMANDS,
        "settle frames queued for one subscription ({total} bytes written)"
    );
    assert!(total < 4 << 20, "{total} bytes of acks read");
    served(&h, "after", 20).await;
    drop(r.recv);
    r.conn.close(0u32.into(), b"bye");
}
