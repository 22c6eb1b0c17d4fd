//! Hostile clients over real QUIC: a raw quinn client that sends frames out
//! of order or of unknown kinds, floods publishes or requests without
//! reading the answers, opens streams it may not, subscribes without ever
//! reading its deliveries. The broker answers with error codes, holds a
//! bounded amount for each, and a well-behaved client is served throughout.

use std::time::Duration;

use sluice_client::{ErrorCode, QueueSpec};
use sluice_proto::{self as proto, Frame, Request};
use sluice_tests::Harness;
use sluice_tests::raw::{connect, flood, hello, raw, read_frames, stalls};

const WAIT: Duration = Duration::from_secs(10);

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
    served(&h, "meanwhile", 50).await;
    drop(r.recv);
}

/// A client may open exactly one stream; asking for thousands gets it
/// nowhere (QUIC stream limits), and its connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_are_not_granted() {
    let h = Harness::start().await;
    let mut r = raw(&h, 1 << 20).await;
    let opened = tokio::time::timeout(Duration::from_millis(500), async {
        let mut n = 0;
        for _ in 0..2000 {
            let (mut s, _) = r.conn.open_bi().await.unwrap();
            s.write_all(&[0u8; 1024]).await.unwrap();
            n += 1;
        }
        n
    })
    .await;
    assert!(
        opened.is_err(),
        "opened {opened:?} extra bidirectional streams"
    );
    let uni = tokio::time::timeout(Duration::from_millis(500), r.conn.open_uni()).await;
    assert!(uni.is_err(), "a unidirectional stream was granted");

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
