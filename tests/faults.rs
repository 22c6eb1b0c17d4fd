//! Storage faults: a store that runs out of space refuses publishes with a
//! clear error and serves again when space returns; a damaged data
//! directory is reported at start, never silently dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice::broker::{Broker, BrokerConfig, BrokerError, Publish, QueueOptions};
use sluice::plugins::Principal;
use sluice::store::{Append, Commit, MessageStore, MsgId, QueueId, Store, StoreConfig, StoreError};

/// The real sled store, with an injectable "disk full" on appends.
struct FullDisk {
    inner: Store,
    full: AtomicBool,
}

impl MessageStore for FullDisk {
    fn append(&self, items: Vec<Append>, durable: bool) -> Commit {
        if self.full.load(Ordering::SeqCst) {
            return Commit::failed(StoreError::Io {
                path: "store/db".into(),
                message: "No space left on device (os error 28)".into(),
            });
        }
        self.inner.append(items, durable)
    }
    fn remove(&self, q: QueueId, ids: &[MsgId]) -> Result<(), StoreError> {
        self.inner.remove(q, ids)
    }
    fn get(&self, q: QueueId, id: MsgId) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(q, id)
    }
    fn scan_queue(
        &self,
        q: QueueId,
    ) -> Box<dyn Iterator<Item = Result<(MsgId, u32, u64), StoreError>> + '_> {
        self.inner.scan_queue(q)
    }
    fn clear_queue(&self, q: QueueId) -> Result<u64, StoreError> {
        self.inner.clear_queue(q)
    }
    fn allocate_queue_id(&self) -> Result<QueueId, StoreError> {
        self.inner.allocate_queue_id()
    }
    fn put_meta(&self, k: &str, v: &[u8]) -> Result<(), StoreError> {
        self.inner.put_meta(k, v)
    }
    fn delete_meta(&self, k: &str) -> Result<(), StoreError> {
        self.inner.delete_meta(k)
    }
    fn scan_meta(&self, p: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_meta(p)
    }
    fn put_blob(&self, k: &str, v: &[u8]) -> Result<(), StoreError> {
        self.inner.put_blob(k, v)
    }
    fn get_blob(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_blob(k)
    }
    fn delete_blob(&self, k: &str) -> Result<(), StoreError> {
        self.inner.delete_blob(k)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync()
    }
}

fn acme() -> Principal {
    Principal {
        tenant: "acme".into(),
        client: "app".into(),
        subject: String::new(),
        sans: vec![],
        admin: false,
    }
}

fn publish(n: u8) -> Vec<Publish> {
    vec![Publish {
        topic: "t".into(),
        headers: vec![],
        payload: vec![n],
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_publishes_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig::new(dir.path());
    let store = Arc::new(FullDisk {
        inner: Store::open(&StoreConfig::new(dir.path().join("store"))).unwrap(),
        full: AtomicBool::new(false),
    });
    let broker = Broker::open_with_store(config, store.clone()).unwrap();
    let who = acme();
    broker
        .declare_queue(&who, "acme", "q", QueueOptions::default())
        .unwrap();
    broker.bind(&who, "acme", "q", "t").unwrap();
    assert_eq!(
        broker.publish(&who, "acme", publish(1)).await[0]
            .as_ref()
            .unwrap(),
        &1
    );

    store.full.store(true, Ordering::SeqCst);
    let refused = broker
        .publish(&who, "acme", publish(2))
        .await
        .remove(0)
        .unwrap_err();
    // The storage error itself (wire code `storage`), with its cause; not
    // just some refusal.
    assert!(
        matches!(&refused, BrokerError::Store(StoreError::Io { message, .. }) if message.contains("No space left")),
        "a full disk is a storage error: {refused:?}"
    );
    let info = broker.list_queues(&who, "acme").unwrap();
    assert_eq!(info[0].ready, 1, "a refused publish leaves nothing behind");

    store.full.store(false, Ordering::SeqCst);
    assert_eq!(
        broker.publish(&who, "acme", publish(3)).await[0]
            .as_ref()
            .unwrap(),
        &1
    );
    let mut sub = broker.subscribe(&who, "acme", "q", 10).unwrap();
    let got = sub.next().await.unwrap();
    let payloads: Vec<u8> = got.iter().map(|d| d.payload[0]).collect();
    assert_eq!(payloads, [1, 3], "the stored messages are intact, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_directory_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let who = acme();
        broker
            .declare_queue(&who, "acme", "q", QueueOptions::default())
            .unwrap();
        broker.bind(&who, "acme", "q", "t").unwrap();
        for i in 0..100 {
            broker.publish(&who, "acme", publish(i)).await[0]
                .as_ref()
                .unwrap();
        }
        broker.sync().unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Overwrite sled's data file with garbage past its header.
    let db = dir.path().join("store/db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(64) {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let opened = std::panic::catch_unwind(|| Broker::open(BrokerConfig::new(dir.path())));
    match opened {
        Ok(Err(e)) => {
            let text = e.to_string();
            assert!(
                text.contains("damaged") && text.contains("refusing to start"),
                "a clear error: {text}"
            );
        }
        Ok(Ok(_)) => panic!("a store that lost confirmed messages must not open"),
        Err(_) => panic!("opening a damaged data directory must not panic"),
    }
}
