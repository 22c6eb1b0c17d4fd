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

/// Entries in the messages tree.
fn entries(store: &Store) -> usize {
    store.sled.with(|s| Ok(s.messages.len())).unwrap()
}

#[test]
fn messages_survive_reopen_and_removals_stick() {
    messages_survive_reopen_and_removals_stick_with(true);
}

/// The same store written key by key, as a cluster node's is: the same
/// content after a reopen.
#[test]
fn messages_written_key_by_key_survive_reopen_and_removals_stick() {
    messages_survive_reopen_and_removals_stick_with(false);
}

fn messages_survive_reopen_and_removals_stick_with(atomic_batches: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        atomic_batches,
        ..StoreConfig::new(dir.path())
    };
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

/// "One fsync per group commit, shared by everything committing": 64
/// threads appending durably at once (8 appends each, each waiting for its
/// confirm) take far fewer fdatasyncs than appends, and at least one.
#[test]
fn concurrent_appends_share_their_fsyncs() {
    const THREADS: u64 = 64;
    const EACH: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&StoreConfig::new(dir.path())).unwrap());
    let q = store.allocate_queue_id().unwrap();
    let before = store.syncs();
    let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..EACH {
                    store
                        .append(
                            vec![Append {
                                queue: q,
                                id: t * EACH + i,
                                value: msg("t", b"p", 0).encode(),
                            }],
                            true,
                        )
                        .wait()
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let appends = THREADS * EACH;
    let syncs = store.syncs() - before;
    println!("{appends} durable appends from {THREADS} threads: {syncs} fdatasyncs");
    assert_eq!(store.scan_queue(q).count() as u64, appends);
    assert!(syncs >= 1, "durable appends are fsynced");
    assert!(
        syncs <= appends / 2,
        "{syncs} fdatasyncs for {appends} concurrent appends: not group committed"
    );
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

#[test]
fn partly_acked_chunks_survive_reopen_with_their_acks() {
    partly_acked_chunks_survive_reopen_with_their_acks_with(true);
}

#[test]
fn partly_acked_chunks_written_key_by_key_survive_reopen_with_their_acks() {
    partly_acked_chunks_survive_reopen_with_their_acks_with(false);
}

fn partly_acked_chunks_survive_reopen_with_their_acks_with(atomic_batches: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        atomic_batches,
        ..StoreConfig::new(dir.path())
    };
    let q;
    {
        let store = Store::open(&config).unwrap();
        q = store.allocate_queue_id().unwrap();
        // Two appends: ids 0..100 and 100..150, two chunks.
        for range in [0..100u64, 100..150] {
            let items = range
                .map(|i| Append {
                    queue: q,
                    id: i,
                    value: msg("t", &i.to_be_bytes(), 0).encode(),
                })
                .collect();
            store.append(items, true).wait().unwrap();
        }
        let odd: Vec<u64> = (0..150).filter(|i| i % 2 == 1).collect();
        store.remove(q, &odd).unwrap();
        assert_eq!(store.get(q, 3).unwrap(), None, "acked ids read as gone");
        let got = store.get_many(q, &[98, 99, 100, 102, 500]).unwrap();
        let present: Vec<bool> = got.iter().map(Option::is_some).collect();
        assert_eq!(present, [true, false, true, true, false]);
        let m = StoredMessage::decode(got[2].as_ref().unwrap()).unwrap();
        assert_eq!(m.payload, 100u64.to_be_bytes());
        // Fully ack the second chunk: its value and bitmap go away.
        store
            .remove(q, &(100..150).filter(|i| i % 2 == 0).collect::<Vec<_>>())
            .unwrap();
        store.append(Vec::new(), true).wait().unwrap();
    }
    let store = Store::open(&config).unwrap();
    let ids: Vec<u64> = store
        .scan_queue(q)
        .map(|r| r.map(|(id, _, _)| id).unwrap())
        .collect();
    assert_eq!(ids, (0..100).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(
        entries(&store),
        4,
        "one chunk, its index entry and bitmap, the commit number"
    );
    // The recovered index serves reads and further acks.
    assert!(store.get(q, 4).unwrap().is_some());
    store.remove(q, &ids).unwrap();
    assert_eq!(store.scan_queue(q).count(), 0);
    assert_eq!(store.clear_queue(q).unwrap(), 0);
}

#[test]
fn purge_counts_live_messages_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::new(dir.path())).unwrap();
    let q = store.allocate_queue_id().unwrap();
    let items = (0..10)
        .map(|i| Append {
            queue: q,
            id: i,
            value: msg("t", b"x", 0).encode(),
        })
        .collect();
    store.append(items, false).wait().unwrap();
    store.remove(q, &[0, 1, 2]).unwrap();
    assert_eq!(store.clear_queue(q).unwrap(), 7);
    assert_eq!(store.get(q, 5).unwrap(), None);
}

#[test]
fn messages_stored_one_per_value_by_earlier_versions_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::new(dir.path());
    {
        // The earlier layout: one value per message, no index entries.
        let store = Store::open(&config).unwrap();
        store
            .sled
            .with(|s| {
                s.meta.remove("store/format").unwrap();
                for id in [3u64, 4] {
                    s.messages
                        .insert(key(9, id), msg("t", &[id as u8], 0).encode())
                        .unwrap();
                }
                Ok(())
            })
            .unwrap();
        store.sync().unwrap();
    }
    let store = Store::open(&config).unwrap();
    let ids: Vec<u64> = store.scan_queue(9).map(|r| r.unwrap().0).collect();
    assert_eq!(ids, [3, 4]);
    let m = StoredMessage::decode(&store.get(9, 4).unwrap().unwrap()).unwrap();
    assert_eq!(m.payload, [4]);
    store.remove(9, &[3, 4]).unwrap();
    // Only the commit number is left.
    assert_eq!(entries(&store), 1, "nothing left behind");
}

/// Every file in sled's blob directory, with its length.
fn blob_files(dir: &std::path::Path) -> std::collections::HashMap<std::ffi::OsString, u64> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|d| {
            d.map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect()
        })
        .unwrap_or_default()
}

#[test]
fn large_values_in_sled_blob_files_survive_reopen() {
    // sled 0.34 writes a leaf holding several large values (leaves split at
    // 16 entries, whatever their size) to a blob file it never fsyncs.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::new(dir.path())).unwrap();
    let q = store.allocate_queue_id().unwrap();
    for id in 1..=40u64 {
        let m = msg("t", &vec![id as u8; 1 << 20], 0);
        let commit = store.append(
            vec![Append {
                queue: q,
                id,
                value: m.encode(),
            }],
            true,
        );
        commit.wait().unwrap();
    }
    // A large metadata value too (a plugin component).
    let big: Vec<u8> = (0..5 << 20).map(|i| (i % 251) as u8).collect();
    store.put_blob("plugin/acme/big", &big).unwrap();
    store.sync().unwrap();
    let on_disk = blob_files(dir.path());
    assert!(
        !on_disk.is_empty(),
        "the workload should make sled write blob files"
    );
    // That every one of them is fsynced before a confirm is checked with
    // strace on the real binary (host/tests/durability.rs).
    assert_eq!(store.get_blob("plugin/acme/big").unwrap().unwrap(), big);
    drop(store);
    let store = Store::open(&StoreConfig::new(dir.path())).unwrap();
    assert_eq!(store.scan_queue(q).count(), 40);
    let m = StoredMessage::decode(&store.get(q, 40).unwrap().unwrap()).unwrap();
    assert_eq!(m.payload, vec![40u8; 1 << 20]);
}

/// Appends written on the caller's thread (a cluster node applying its
/// log) are readable at once, refused when too large, and durable after
/// a sync.
#[test]
fn unsynced_appends_are_readable_at_once_and_durable_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        atomic_batches: false,
        ..StoreConfig::new(dir.path())
    };
    let q;
    {
        let store = Store::open(&config).unwrap();
        q = store.allocate_queue_id().unwrap();
        let items = (0..10)
            .map(|i| Append {
                queue: q,
                id: i,
                value: msg("t", &[i as u8], 0).encode(),
            })
            .collect();
        store.append_unsynced(items).unwrap();
        assert!(store.get(q, 9).unwrap().is_some(), "readable at once");
        let big = vec![Append {
            queue: q,
            id: 10,
            value: vec![0; store.max_value() + 1],
        }];
        assert!(matches!(
            store.append_unsynced(big),
            Err(StoreError::TooLarge { .. })
        ));
        store.remove(q, &[0]).unwrap();
        store.sync().unwrap();
    }
    let store = Store::open(&config).unwrap();
    let ids: Vec<u64> = store
        .scan_queue(q)
        .map(|r| r.map(|(id, _, _)| id).unwrap())
        .collect();
    assert_eq!(ids, (1..10).collect::<Vec<_>>());
}
