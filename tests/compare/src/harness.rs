//! The workload of `sluice bench` (host/src/cli/bench.rs), written once for
//! every system: P producer connections, each with at most W unconfirmed
//! publishes; C consumer connections, prefetch K, one ack per delivery;
//! payloads carry their send time (ns since the start) and a sequence.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::{BoxStream, FuturesUnordered};

use crate::stats::Report;

/// A boxed, sendable future.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One workload, as `sluice bench` flags.
#[derive(Debug, Clone)]
pub struct Spec {
    pub producers: u32,
    pub consumers: u32,
    /// Messages published in total.
    pub count: u64,
    pub size: usize,
    pub window: usize,
    pub prefetch: u32,
    /// Total publish rate (msg/s); none: as fast as confirms allow.
    pub rate: Option<u64>,
    /// Queues (streams for JetStream).
    pub queues: u32,
    /// Every message goes to every queue (else: spread round-robin, like
    /// `sluice bench --queues`).
    pub fanout: bool,
    /// Sluice only: router and filter plugins on the path.
    pub plugins: bool,
}

impl Spec {
    /// Deliveries expected for `confirmed` publishes.
    pub fn expected(&self, confirmed: u64) -> u64 {
        if self.fanout {
            confirmed * u64::from(self.queues.max(1))
        } else {
            confirmed
        }
    }

    /// The queues consumer `c` reads: like `sluice bench`, queue `i` goes to
    /// consumer `i % C`, and every consumer reads every queue when there
    /// are more consumers than queues.
    pub fn queues_of(&self, c: u32) -> Vec<usize> {
        let (q, n) = (self.queues.max(1), self.consumers.max(1));
        (0..q)
            .filter(|i| i % n == c || n > q)
            .map(|i| i as usize)
            .collect()
    }

    /// The publish target of message `i`: round-robin over the queues, or
    /// the one fan-out target.
    pub fn target_of(&self, i: u64) -> usize {
        if self.fanout {
            0
        } else {
            (i % u64::from(self.queues.max(1))) as usize
        }
    }
}

/// One producer connection.
pub trait Producer: Send + 'static {
    /// Hand one message to the client for publish target `target`. The
    /// outer future resolves once the client took it (it may apply
    /// backpressure); the inner one with the broker's confirm.
    fn publish(
        &mut self,
        target: usize,
        payload: Vec<u8>,
    ) -> BoxFut<anyhow::Result<BoxFut<anyhow::Result<()>>>>;
}

/// Deliveries of one consumer connection: (queue index, payload), each
/// already acked.
pub type Deliveries = BoxStream<'static, anyhow::Result<(usize, Vec<u8>)>>;

/// A system under test, with its queues declared for one run.
#[allow(async_fn_in_trait)]
pub trait Driver {
    /// Declare the queues (and bindings) of `spec`.
    async fn prepare(&mut self, spec: &Spec) -> anyhow::Result<()>;
    /// A new producer connection.
    async fn producer(&self) -> anyhow::Result<Box<dyn Producer>>;
    /// A new consumer connection reading `queues`.
    async fn consumer(&self, queues: &[usize]) -> anyhow::Result<Deliveries>;
    /// Delete what `prepare` declared and close the connections.
    async fn cleanup(&mut self) -> anyhow::Result<()>;
}

/// The payload of message `seq`: send time (ns since `epoch`), sequence,
/// then filler up to `size` (at least 16 bytes).
pub fn payload(epoch: Instant, seq: u64, size: usize) -> Vec<u8> {
    let mut p = vec![b'.'; size.max(16)];
    p[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p
}

/// (send time ns, sequence) from a payload made by [`payload`].
pub fn parse_payload(p: &[u8]) -> (u64, u64) {
    let word = |r: std::ops::Range<usize>| {
        p.get(r)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    };
    (word(0..8), word(8..16))
}

/// Messages of producer `p` out of `count` over `producers`.
pub fn share(count: u64, producers: u64, p: u64) -> u64 {
    count / producers + u64::from(p < count % producers)
}

struct Counters {
    confirmed: AtomicU64,
    refused: AtomicU64,
    received: AtomicU64,
    target: AtomicU64,
}

/// Run `spec` against `driver`: declare, consume, publish, wait for every
/// confirmed message (or 10 s without a delivery), clean up.
pub async fn run<D: Driver>(driver: &mut D, spec: &Spec) -> anyhow::Result<Report> {
    driver.prepare(spec).await?;
    let result = measure(driver, spec).await;
    let cleaned = driver.cleanup().await;
    let report = result?;
    cleaned?;
    Ok(report)
}

async fn measure<D: Driver>(driver: &D, spec: &Spec) -> anyhow::Result<Report> {
    let size = spec.size.max(16);
    let counters = Arc::new(Counters {
        confirmed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        received: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
    });
    let epoch = Instant::now();
    let producers = u64::from(spec.producers.max(1));

    // Consumers first, as in `sluice bench`.
    let mut consumers = Vec::new();
    for c in 0..spec.consumers.max(1) {
        let mut stream = driver.consumer(&spec.queues_of(c)).await?;
        let counters = counters.clone();
        consumers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seen = HashSet::new();
            let mut dups = 0u64;
            let mut error = None;
            let mut idle = Instant::now();
            while counters.received.load(Relaxed) < counters.target.load(Relaxed)
                && idle.elapsed() < Duration::from_secs(10)
            {
                let (q, p) =
                    match tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
                        Ok(Some(Ok(d))) => d,
                        Ok(Some(Err(e))) => {
                            error = Some(e);
                            break;
                        }
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                idle = Instant::now();
                let now = epoch.elapsed().as_nanos() as u64;
                let (sent, seq) = parse_payload(&p);
                lat.push(now.saturating_sub(sent));
                if !seen.insert((q, seq)) {
                    dups += 1;
                }
                counters.received.fetch_add(1, Relaxed);
            }
            drop(stream);
            (lat, dups, error)
        }));
    }

    let mut tasks = Vec::new();
    for p in 0..producers {
        let mut producer = driver.producer().await?;
        let counters = counters.clone();
        let per = share(spec.count, producers, p);
        let window = spec.window.max(1);
        let rate = spec.rate.map(|r| (r as f64 / producers as f64).max(1e-3));
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut inflight = FuturesUnordered::new();
            let mut error = None;
            let start = Instant::now();
            let settle = |r: Option<anyhow::Result<()>>, error: &mut Option<anyhow::Error>| {
                match r {
                    Some(Ok(())) => counters.confirmed.fetch_add(1, Relaxed),
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                        counters.refused.fetch_add(1, Relaxed)
                    }
                    None => 0,
                };
            };
            for i in 0..per {
                if let Some(r) = rate {
                    tokio::time::sleep_until(
                        (start + Duration::from_secs_f64(i as f64 / r)).into(),
                    )
                    .await;
                }
                let body = payload(epoch, (p << 40) | i, size);
                match producer.publish(spec.target_of(i), body).await {
                    Ok(confirm) => inflight.push(confirm),
                    Err(e) => settle(Some(Err(e)), &mut error),
                }
                while inflight.len() >= window {
                    settle(inflight.next().await, &mut error);
                }
            }
            while !inflight.is_empty() {
                settle(inflight.next().await, &mut error);
            }
            (producer, error)
        }));
    }
    let mut producer_conns = Vec::new();
    let mut first_error = None;
    for t in tasks {
        let (conn, err) = t.await?;
        producer_conns.push(conn);
        if first_error.is_none() {
            first_error = err;
        }
    }
    let publish_secs = epoch.elapsed().as_secs_f64();
    let confirmed = counters.confirmed.load(Relaxed);
    counters.target.store(spec.expected(confirmed), Relaxed);
    let mut lat = Vec::new();
    let mut dups = 0;
    for c in consumers {
        let (l, d, err) = c.await?;
        lat.extend(l);
        dups += d;
        if first_error.is_none() {
            first_error = err;
        }
    }
    let total_secs = epoch.elapsed().as_secs_f64();
    drop(producer_conns);
    let received = counters.received.load(Relaxed);
    if let Some(e) = first_error
        && (confirmed == 0 || received == 0)
    {
        return Err(e);
    }
    Ok(Report::from_run(
        lat,
        size,
        spec.count,
        confirmed,
        received,
        dups,
        publish_secs,
        total_secs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(queues: u32, consumers: u32, fanout: bool) -> Spec {
        Spec {
            producers: 1,
            consumers,
            count: 10,
            size: 100,
            window: 256,
            prefetch: 256,
            rate: None,
            queues,
            fanout,
            plugins: false,
        }
    }

    #[test]
    fn consumers_get_queues_like_sluice_bench() {
        let s = spec(4, 4, false);
        assert_eq!(s.queues_of(0), vec![0]);
        assert_eq!(s.queues_of(3), vec![3]);
        let s = spec(10, 2, true);
        assert_eq!(s.queues_of(1), vec![1, 3, 5, 7, 9]);
        // More consumers than queues: every consumer reads every queue.
        let s = spec(1, 4, false);
        assert_eq!(s.queues_of(2), vec![0]);
        let s = spec(2, 3, false);
        assert_eq!(s.queues_of(2), vec![0, 1]);
    }

    #[test]
    fn targets_and_expected_deliveries() {
        let s = spec(4, 4, false);
        assert_eq!(
            (0..6).map(|i| s.target_of(i)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 0, 1]
        );
        assert_eq!(s.expected(100), 100);
        let f = spec(10, 10, true);
        assert_eq!(f.target_of(7), 0);
        assert_eq!(f.expected(100), 1000);
    }

    #[test]
    fn payload_round_trip_and_shares() {
        let epoch = Instant::now();
        let p = payload(epoch, (3 << 40) | 17, 100);
        assert_eq!(p.len(), 100);
        let (sent, seq) = parse_payload(&p);
        assert!(sent < 10_000_000_000);
        assert_eq!(seq, (3 << 40) | 17);
        assert_eq!(payload(epoch, 1, 4).len(), 16);
        assert_eq!(parse_payload(b"short"), (0, 0));
        let shares: Vec<u64> = (0..4).map(|p| share(10, 4, p)).collect();
        assert_eq!(shares, vec![3, 3, 2, 2]);
        assert_eq!(shares.iter().sum::<u64>(), 10);
    }
}
