use super::*;

fn msg(topic: &str, payload: &[u8], expires: u64) -> StoredMessage {
    StoredMessage {
        topic: topic.into(),
        headers: vec![("k".into(), "v".into())],
        payload: payload.to_vec(),
        publisher: "c1".into(),
        timestamp_ms: 1,
        expires_at_ms: expires,
    }
}

#[test]
fn messages_survive_reopen_and_removals_stick() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::new(dir.path());
    let q;
    {
        let store = Store::open(&config).unwrap();
        q = store.allocate_queue_id().unwrap();
        let items = (0..10)
            .map(|i| Append {
                queue: q,
                id: i,
                value: msg("t", &[i as u8], if i == 3 { 99 } else { 0 }).encode(),
            })
            .collect();
        store.append(items, true).wait().unwrap();
        store.remove(q, &[0, 1]).unwrap();
        store.put_meta("queue/acme/q", b"meta").unwrap();
        store.sync().unwrap();
    }
    let store = Store::open(&config).unwrap();
    let ids: Vec<(u64, u64)> = store
        .scan_queue(q)
        .map(|r| r.map(|(id, _, exp)| (id, exp)).unwrap())
        .collect();
    assert_eq!(ids.len(), 8);
    assert_eq!(ids[0], (2, 0));
    assert_eq!(ids[1], (3, 99), "expiry readable without decoding");
    let got = StoredMessage::decode(&store.get(q, 5).unwrap().unwrap()).unwrap();
    assert_eq!(got, msg("t", &[5], 0));
    assert_eq!(
        store.scan_meta("queue/").unwrap(),
        vec![("queue/acme/q".to_string(), b"meta".to_vec())]
    );
    assert!(
        store.allocate_queue_id().unwrap() > q,
        "ids are never reused"
    );
    assert_eq!(store.clear_queue(q).unwrap(), 8);
    assert_eq!(store.scan_queue(q).count(), 0);
}

#[test]
fn queues_do_not_share_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::new(dir.path())).unwrap();
    let (a, b) = (
        store.allocate_queue_id().unwrap(),
        store.allocate_queue_id().unwrap(),
    );
    let one = |q| {
        vec![Append {
            queue: q,
            id: 1,
            value: msg("t", b"x", 0).encode(),
        }]
    };
    store.append(one(a), false).wait().unwrap();
    store.append(one(b), true).wait().unwrap();
    store.clear_queue(a).unwrap();
    assert_eq!(store.scan_queue(a).count(), 0);
    assert_eq!(store.scan_queue(b).count(), 1);
}

#[test]
fn damaged_values_are_reported() {
    assert!(matches!(
        StoredMessage::decode(b"123"),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        StoredMessage::decode(b"12345678\xff\xff\xff"),
        Err(StoreError::Corrupt(_))
    ));
    assert!(decode_expiry(b"1").is_err());
}

#[tokio::test]
async fn many_concurrent_appends_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&StoreConfig::new(dir.path())).unwrap());
    let q = store.allocate_queue_id().unwrap();
    let commits: Vec<_> = (0..200u64)
        .map(|i| {
            store.append(
                vec![Append {
                    queue: q,
                    id: i,
                    value: msg("t", b"p", 0).encode(),
                }],
                true,
            )
        })
        .collect();
    for c in commits {
        c.await.unwrap();
    }
    assert_eq!(store.scan_queue(q).count(), 200);
}

#[test]
fn large_messages_stay_inline_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::new(dir.path())).unwrap();
    let q = store.allocate_queue_id().unwrap();
    // The broker's largest message (1 MiB payload + 16 KiB of headers).
    let mut m = msg("t", &vec![7u8; 1 << 20], 0);
    m.headers = vec![("h".into(), "x".repeat(16 << 10))];
    store
        .append(
            vec![Append {
                queue: q,
                id: 1,
                value: m.encode(),
            }],
            true,
        )
        .wait()
        .unwrap();
    let blobs = std::fs::read_dir(dir.path().join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        blobs, 0,
        "sled wrote a blob file, which its flush does not fsync"
    );
    assert_eq!(
        StoredMessage::decode(&store.get(q, 1).unwrap().unwrap()).unwrap(),
        m
    );

    let too_big = vec![0u8; store.max_value() + 1];
    let err = store
        .append(
            vec![Append {
                queue: q,
                id: 2,
                value: too_big,
            }],
            true,
        )
        .wait()
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
}
