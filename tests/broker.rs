//! The broker end to end: real QUIC with real certificates, real sled on a
//! temporary directory, real wasm plugins from `plugins/`.

use std::time::Duration;

use sluice_client::{ClientError, ErrorCode, QueueSpec};
use sluice_tests::{Harness, wasm};

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut sluice_client::Subscription) -> sluice_client::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

async fn nothing(sub: &mut sluice_client::Subscription) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "no further delivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_and_confirms() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    assert_eq!(c.session().tenant, "acme");
    c.declare(QueueSpec::new("orders")).await.unwrap();
    c.declare(QueueSpec::new("audit")).await.unwrap();
    c.bind("orders", "orders.*").await.unwrap();
    c.bind("audit", "orders.>").await.unwrap();

    let confirms: Vec<_> = (0..100)
        .map(|i| {
            c.publish(
                "orders.eu",
                vec![("i".into(), i.to_string())],
                format!("m{i}").into_bytes(),
            )
        })
        .collect();
    for f in confirms {
        assert_eq!(f.await.unwrap(), 2, "stored in both queues");
    }
    assert_eq!(
        c.publish("orders.eu.x", vec![], b"deep".to_vec())
            .await
            .unwrap(),
        1
    );
    let refused = c
        .publish("billing.x", vec![], b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NoRoute), "{refused}");
    let bad = c.publish("a..b", vec![], vec![]).await.unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::Invalid));

    let mut sub = c.subscribe("orders", 16).await.unwrap();
    for i in 0..100 {
        let d = next(&mut sub).await;
        assert_eq!(d.payload, format!("m{i}").into_bytes(), "in order");
        assert!(!d.redelivered);
        sub.ack(d.tag);
    }
    nothing(&mut sub).await;
    let queues = c.list_queues().await.unwrap();
    let orders = queues.iter().find(|q| q.name == "orders").unwrap();
    assert_eq!((orders.ready, orders.unacked), (0, 0));
    let audit = queues.iter().find(|q| q.name == "audit").unwrap();
    assert_eq!(audit.ready, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_requeued_when_a_consumer_goes_away() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("jobs")).await.unwrap();
    c.bind("jobs", "jobs").await.unwrap();
    for i in 0..20 {
        c.publish("jobs", vec![], vec![i]).await.unwrap();
    }
    {
        let other = h.client("acme").await;
        let mut sub = other.subscribe("jobs", 5).await.unwrap();
        let mut tags = Vec::new();
        for _ in 0..5 {
            tags.push(next(&mut sub).await);
        }
        nothing(&mut sub).await; // prefetch 5 holds the rest back
        sub.ack(tags[0].tag);
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.close();
    }
    let mut sub = c.subscribe("jobs", 100).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..19 {
        let d = next(&mut sub).await;
        seen.push((d.payload[0], d.redelivered));
        sub.ack(d.tag);
    }
    seen.sort();
    let expected: Vec<(u8, bool)> = (1..20).map(|i| (i, i < 6)).collect();
    assert_eq!(
        seen, expected,
        "the 4 unacked come back redelivered; the acked one is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_reject_ttl_and_max_length() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("dead")).await.unwrap();
    c.declare(QueueSpec::new("work").dead_letter("dead").delivery_limit(3))
        .await
        .unwrap();
    c.bind("work", "work").await.unwrap();
    c.publish("work", vec![], b"a".to_vec()).await.unwrap();
    c.publish("work", vec![], b"b".to_vec()).await.unwrap();
    let mut sub = c.subscribe("work", 1).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.payload, b"a");
    sub.nack(d.tag);
    let again = next(&mut sub).await;
    assert_eq!(
        (again.payload.as_slice(), again.redelivered),
        (b"a".as_slice(), true)
    );
    sub.reject(again.tag);
    let b = next(&mut sub).await;
    assert_eq!(b.payload, b"b");
    for _ in 0..2 {
        sub.nack(b.tag);
        let b2 = next(&mut sub).await;
        assert_eq!(b2.payload, b"b");
        if b2.tag != b.tag {
            panic!("same message, same tag");
        }
    }
    sub.nack(b.tag); // third delivery nacked: over the limit
    nothing(&mut sub).await;

    let mut dead = c.subscribe("dead", 10).await.unwrap();
    let first = next(&mut dead).await;
    assert_eq!(first.payload, b"a");
    assert!(
        first
            .headers
            .contains(&("x-death-reason".into(), "rejected".into())),
        "{:?}",
        first.headers
    );
    assert!(
        first
            .headers
            .contains(&("x-death-queue".into(), "work".into()))
    );
    let second = next(&mut dead).await;
    assert!(
        second
            .headers
            .contains(&("x-death-reason".into(), "delivery-limit".into())),
        "{:?}",
        second.headers
    );
    dead.ack_many(&[first.tag, second.tag]);

    // TTL: expires into the dead-letter queue.
    c.declare(
        QueueSpec::new("short")
            .ttl(Duration::from_millis(100))
            .dead_letter("dead"),
    )
    .await
    .unwrap();
    c.bind("short", "short").await.unwrap();
    c.publish("short", vec![], b"stale".to_vec()).await.unwrap();
    let expired = next(&mut dead).await;
    assert_eq!(expired.payload, b"stale");
    assert!(
        expired
            .headers
            .contains(&("x-death-reason".into(), "expired".into()))
    );

    // max-length: reject-publish refuses, drop-head drops the oldest.
    c.declare(QueueSpec::new("small").max_length(2))
        .await
        .unwrap();
    c.bind("small", "small").await.unwrap();
    c.publish("small", vec![], b"1".to_vec()).await.unwrap();
    c.publish("small", vec![], b"2".to_vec()).await.unwrap();
    let full = c.publish("small", vec![], b"3".to_vec()).await.unwrap_err();
    assert_eq!(full.code(), Some(ErrorCode::QueueFull), "{full}");
    c.declare(
        QueueSpec::new("ring")
            .max_length(2)
            .drop_head()
            .dead_letter("dead"),
    )
    .await
    .unwrap();
    c.bind("ring", "ring").await.unwrap();
    for p in [b"x", b"y", b"z"] {
        c.publish("ring", vec![], p.to_vec()).await.unwrap();
    }
    let dropped = next(&mut dead).await;
    assert_eq!(dropped.payload, b"x");
    assert!(
        dropped
            .headers
            .contains(&("x-death-reason".into(), "maxlen".into()))
    );
    let mut ring = c.subscribe("ring", 10).await.unwrap();
    assert_eq!(next(&mut ring).await.payload, b"y");
    assert_eq!(next(&mut ring).await.payload, b"z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_restart_and_transient_queues_do_not() {
    let mut h = Harness::start().await;
    {
        let c = h.client("acme").await;
        c.declare(QueueSpec::new("keep")).await.unwrap();
        c.declare(QueueSpec::new("temp").transient()).await.unwrap();
        c.bind("keep", "k").await.unwrap();
        c.bind("temp", "k").await.unwrap();
        for i in 0..50u8 {
            c.publish("k", vec![], vec![i]).await.unwrap();
        }
        let mut sub = c.subscribe("keep", 10).await.unwrap();
        for _ in 0..10 {
            let d = next(&mut sub).await;
            sub.ack(d.tag);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.close();
    }
    h.restart().await;
    let c = h.client("acme").await;
    let queues = c.list_queues().await.unwrap();
    assert_eq!(
        queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        ["keep"],
        "transient queue gone"
    );
    assert_eq!(queues[0].ready, 40);
    let mut sub = c.subscribe("keep", 100).await.unwrap();
    for i in 10..50u8 {
        let d = next(&mut sub).await;
        assert_eq!(d.payload, vec![i]);
        assert!(d.redelivered, "recovered messages are marked redelivered");
        sub.ack(d.tag);
    }
    // Bindings survived too.
    assert_eq!(c.publish("k", vec![], b"after".to_vec()).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let h = Harness::start().await;
    let acme = h.client("acme").await;
    let globex = h.client("globex").await;
    for c in [&acme, &globex] {
        c.declare(QueueSpec::new("inbox")).await.unwrap();
        c.bind("inbox", "mail").await.unwrap();
    }
    acme.publish("mail", vec![], b"for acme".to_vec())
        .await
        .unwrap();
    let mut g = globex.subscribe("inbox", 10).await.unwrap();
    nothing(&mut g).await;
    let mut a = acme.subscribe("inbox", 10).await.unwrap();
    assert_eq!(next(&mut a).await.payload, b"for acme");

    let cross = acme.for_tenant(Some("globex".into()));
    let err = cross.list_queues().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert_eq!(
        cross
            .publish("mail", vec![], vec![])
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::Unauthorized)
    );

    let admin = h.client("admin").await;
    let as_globex = admin.for_tenant(Some("globex".into()));
    assert_eq!(as_globex.list_queues().await.unwrap()[0].name, "inbox");
    let stats = admin.stats().await.unwrap();
    assert_eq!(
        stats.iter().map(|s| s.tenant.as_str()).collect::<Vec<_>>(),
        ["acme", "globex"]
    );
    let own = acme.stats().await.unwrap();
    assert_eq!(own.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificates_are_refused() {
    let h = Harness::start().await;
    let other = tempfile::tempdir().unwrap();
    sluice::tls::init_dev_certs(other.path(), &["acme".into()], "sluice").unwrap();
    let err = match sluice_client::Client::connect(h.addr, &other.path().join("acme")).await {
        Ok(_) => panic!("a certificate from another CA must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, ClientError::CertificateRefused(_)), "{err}");
    assert!(err.to_string().contains("certificate refused"), "{err}");
    // The broker keeps serving good clients.
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("ok")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_route_filter_and_authorize_inside_the_broker() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    for q in ["main", "audit", "dead", "bulk"] {
        c.declare(QueueSpec::new(q)).await.unwrap();
    }
    c.declare(QueueSpec::new("logs").dead_letter("dead"))
        .await
        .unwrap();
    c.bind("main", "app.>").await.unwrap();
    c.bind("logs", "app.>").await.unwrap();
    c.load_plugin(
        "router",
        "router",
        None,
        wasm("topic-router"),
        vec![("add.audit".into(), "header:x-audit=1".into())],
    )
    .await
    .unwrap();
    c.load_plugin(
        "quiet",
        "filter",
        Some("logs"),
        wasm("header-filter"),
        vec![("drop".into(), "level=debug".into())],
    )
    .await
    .unwrap();
    c.load_plugin("bomb", "filter", Some("logs"), wasm("hostile"), vec![])
        .await
        .unwrap();

    assert_eq!(
        c.publish("app.x", vec![("x-audit".into(), "1".into())], b"a".to_vec())
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        c.publish(
            "app.x",
            vec![("level".into(), "debug".into())],
            b"b".to_vec()
        )
        .await
        .unwrap(),
        1,
        "filtered out of logs"
    );
    // The hostile filter spins: contained, and the message is dead-lettered with the reason.
    assert_eq!(
        c.publish(
            "app.x",
            vec![("hostile".into(), "loop".into())],
            b"c".to_vec()
        )
        .await
        .unwrap(),
        1
    );
    let mut dead = c.subscribe("dead", 10).await.unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.payload, b"c");
    let reason = d
        .headers
        .iter()
        .find(|(k, _)| k == "x-death-reason")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        reason.contains("bomb") && reason.contains("deadline"),
        "{reason}"
    );

    let plugins = c.list_plugins().await.unwrap();
    let bomb = plugins.iter().find(|p| p.name == "bomb").unwrap();
    assert_eq!(bomb.traps, 1);
    assert_eq!(bomb.queue.as_deref(), Some("logs"));

    // A router rejection refuses the publish with the plugin's reason.
    c.load_plugin(
        "router",
        "router",
        None,
        wasm("topic-router"),
        vec![("reject-if".into(), "header:block".into())],
    )
    .await
    .unwrap();
    let e = c
        .publish("app.x", vec![("block".into(), "1".into())], vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginFailed));
    assert!(e.to_string().contains("rejected by topic-router"), "{e}");

    // An authorizer narrows what the tenant's clients may do.
    c.load_plugin(
        "acl",
        "authorizer",
        None,
        wasm("acl-authorizer"),
        vec![
            ("deny".into(), "* delete queue:>".into()),
            ("default".into(), "allow".into()),
        ],
    )
    .await
    .unwrap();
    let e = c.delete("bulk").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    assert!(e.to_string().contains("rule 1"), "{e}");
    // A WASI component is refused with a clear message.
    let e = c
        .load_plugin("w", "filter", Some("main"), wasm("wasi-importer"), vec![])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("wasi:cli/environment"), "{e}");
}

/// Raw QUIC client sending garbage: it gets an error frame and is closed;
/// the broker keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_frames_get_errors() {
    let h = Harness::start().await;
    for payload in [vec![0xffu8; 64], (64u32 << 20).to_le_bytes().to_vec()] {
        let identity = sluice_client::Identity::load(&h.certs.join("acme")).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(identity.quinn_config().unwrap());
        let conn = endpoint
            .connect(h.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&sluice_proto::encode_frame(&sluice_proto::Frame::Hello {
            min_version: 1,
            max_version: 1,
            agent: "raw".into(),
        }))
        .await
        .unwrap();
        send.write_all(&payload).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 4096];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let mut d = sluice_proto::Decoder::new(sluice_proto::Limits::default());
        d.push(&got);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = d.next_frame() {
            frames.push(f);
        }
        let error = frames.iter().find_map(|f| match f {
            sluice_proto::Frame::Error(e) => Some(e.clone()),
            _ => None,
        });
        let error = error.unwrap_or_else(|| panic!("an error frame, got {frames:?}"));
        assert!(
            matches!(error.code, ErrorCode::BadFrame | ErrorCode::FrameTooLarge),
            "{error:?}"
        );
    }
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("still-fine")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_missing_certificates_are_refused() {
    let mut h = Harness::start().await;
    sluice::tls::issue_client_cert(
        &h.certs,
        Some("acme"),
        "laptop",
        &h.certs.join("laptop"),
        "sluice",
    )
    .unwrap();
    h.client("laptop")
        .await
        .declare(QueueSpec::new("q"))
        .await
        .unwrap();
    sluice::tls::revoke_cert(&h.certs, &h.certs.join("laptop/cert.pem")).unwrap();
    h.restart().await;
    let err = match sluice_client::Client::connect(h.addr, &h.certs.join("laptop")).await {
        Ok(_) => panic!("a revoked certificate must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, ClientError::CertificateRefused(_)), "{err}");
    // Other clients of the same tenant are unaffected.
    h.client("acme")
        .await
        .declare(QueueSpec::new("q"))
        .await
        .unwrap();

    // A client without any certificate is refused too.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in sluice::tls::load_certs(&h.certs.join("ca.pem")).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"sluice/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let outcome = async {
        let conn = endpoint.connect(h.addr, "localhost").unwrap().await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&sluice_proto::encode_frame(&sluice_proto::Frame::Hello {
            min_version: 1,
            max_version: 1,
            agent: "anon".into(),
        }))
        .await?;
        let mut buf = [0u8; 64];
        recv.read(&mut buf).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(
        tokio::time::timeout(WAIT, outcome).await.unwrap().is_err(),
        "no certificate, no session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_a_queue() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("work")).await.unwrap();
    c.bind("work", "work").await.unwrap();
    let (a, b) = (h.client("acme").await, h.client("acme").await);
    let mut sa = a.subscribe("work", 4).await.unwrap();
    let mut sb = b.subscribe("work", 4).await.unwrap();
    for i in 0..200u32 {
        c.publish("work", vec![], i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let (mut na, mut nb) = (0, 0);
    while seen.len() < 200 {
        tokio::select! {
            Some(d) = sa.next() => { assert!(seen.insert(d.payload.clone())); na += 1; sa.ack(d.tag); }
            Some(d) = sb.next() => { assert!(seen.insert(d.payload.clone())); nb += 1; sb.ack(d.tag); }
            _ = tokio::time::sleep(WAIT) => panic!("stalled after {} messages", seen.len()),
        }
    }
    assert!(na > 0 && nb > 0, "both consumers got work: {na} / {nb}");
    nothing(&mut sa).await;
}

/// Large messages in one delivery batch are split into frames the client
/// accepts (each under the frame limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_delivered_with_a_large_prefetch() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("big")).await.unwrap();
    c.bind("big", "big").await.unwrap();
    for i in 0..8u8 {
        c.publish("big", vec![], vec![i; 1000 * 1000])
            .await
            .unwrap();
    }
    let mut sub = c.subscribe("big", 64).await.unwrap();
    for i in 0..8u8 {
        let d = next(&mut sub).await;
        assert_eq!((d.payload.len(), d.payload[0]), (1000 * 1000, i));
        sub.ack(d.tag);
    }
}

/// A plugin written in C (plugins/c-header-filter, built with clang) loaded
/// into a running broker over the wire: it filters a queue like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_plugin_filters_inside_the_broker() {
    let h = Harness::start().await;
    let c = h.client("acme").await;
    c.declare(QueueSpec::new("logs")).await.unwrap();
    c.bind("logs", "app.>").await.unwrap();
    c.load_plugin(
        "c-quiet",
        "filter",
        Some("logs"),
        sluice_tests::c_header_filter(),
        vec![
            ("drop".into(), "level=debug".into()),
            ("require".into(), "trace-id".into()),
        ],
    )
    .await
    .unwrap();
    let headers = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let kept = c
        .publish("app.x", headers(&[("trace-id", "1")]), b"kept".to_vec())
        .await
        .unwrap();
    let debug = c
        .publish(
            "app.x",
            headers(&[("trace-id", "2"), ("level", "debug")]),
            b"debug".to_vec(),
        )
        .await
        .unwrap();
    let untraced = c
        .publish("app.x", vec![], b"untraced".to_vec())
        .await
        .unwrap();
    assert_eq!((kept, debug, untraced), (1, 0, 0));

    let mut sub = c.subscribe("logs", 10).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.payload, b"kept");
    nothing(&mut sub).await;

    let plugins = c.list_plugins().await.unwrap();
    let p = plugins.iter().find(|p| p.name == "c-quiet").unwrap();
    assert_eq!(p.queue.as_deref(), Some("logs"));
    assert_eq!(p.traps, 0);
    assert!(p.calls >= 1, "{p:?}");
}
