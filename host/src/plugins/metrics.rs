//! Per-plugin counters: calls, failures by class, time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::FailureKind;

/// Inclusive upper bounds (µs) of the call-latency histogram buckets; a last bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 5_000, 10_000];

/// Live counters of one plugin. Cheap to update from many threads.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    calls: AtomicU64,
    messages: AtomicU64,
    guest_errors: AtomicU64,
    output_rejected: AtomicU64,
    refused_errored: AtomicU64,
    instantiations: AtomicU64,
    instantiate_failures: AtomicU64,
    capacity_refusals: AtomicU64,
    traps: [AtomicU64; 5],
    time_ns: AtomicU64,
    max_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    logs_dropped: AtomicU64,
    peak_memory: AtomicU64,
    throttled_ns: AtomicU64,
}

/// A point-in-time copy of [`PluginMetrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Guest calls made (a batch call counts once).
    pub calls: u64,
    /// Messages handled (a batch counts each message).
    pub messages: u64,
    /// Calls where the plugin returned an error value.
    pub guest_errors: u64,
    /// Calls whose result exceeded the output bounds.
    pub output_rejected: u64,
    /// Calls refused because the plugin was errored.
    pub refused_errored: u64,
    /// Instances created (first use, and after every trap).
    pub instantiations: u64,
    /// Instances that could not be created or initialized.
    pub instantiate_failures: u64,
    /// Calls refused because no instance was free within the deadline or
    /// the broker's pool was full (the broker's bound, not a trap).
    pub capacity_refusals: u64,
    /// Traps: deadline.
    pub traps_deadline: u64,
    /// Traps: memory.
    pub traps_memory: u64,
    /// Traps: panic / unreachable.
    pub traps_panic: u64,
    /// Traps: stack overflow.
    pub traps_stack_overflow: u64,
    /// Traps: other.
    pub traps_other: u64,
    /// Total time spent in guest calls.
    pub time_ns: u64,
    /// Longest single call.
    pub max_ns: u64,
    /// Call latency histogram: counts per [`LATENCY_BUCKETS_US`] bucket (not cumulative), then +Inf.
    pub latency_buckets: Vec<u64>,
    /// Log lines dropped by the per-call budget or the per-second limit.
    pub logs_dropped: u64,
    /// Largest linear memory of any instance, bytes.
    pub peak_memory_bytes: u64,
    /// Time calls slept because they ran past the sandbox's
    /// `throttle_after` (a plugin that keeps a core busy, slowed down).
    pub throttled_ns: u64,
}

impl MetricsSnapshot {
    /// Sum of all traps.
    pub fn traps(&self) -> u64 {
        self.traps_deadline
            + self.traps_memory
            + self.traps_panic
            + self.traps_stack_overflow
            + self.traps_other
    }
}

impl PluginMetrics {
    pub(crate) fn call(&self, messages: u64, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Relaxed);
        self.messages.fetch_add(messages, Relaxed);
        self.time_ns.fetch_add(ns, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| ns <= b * 1_000)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub(crate) fn failure(&self, kind: FailureKind) {
        let counter = match kind {
            FailureKind::Guest => &self.guest_errors,
            FailureKind::Output => &self.output_rejected,
            FailureKind::Errored => &self.refused_errored,
            FailureKind::Instantiate => &self.instantiate_failures,
            FailureKind::Capacity => &self.capacity_refusals,
            trap => {
                let i = FailureKind::TRAPS
                    .iter()
                    .position(|k| *k == trap)
                    .unwrap_or(FailureKind::TRAPS.len() - 1);
                &self.traps[i]
            }
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn instantiated(&self) {
        self.instantiations.fetch_add(1, Relaxed);
    }

    pub(crate) fn memory(&self, bytes: usize) {
        self.peak_memory.fetch_max(bytes as u64, Relaxed);
    }

    pub(crate) fn throttled(&self, slept: Duration) {
        if !slept.is_zero() {
            let ns = u64::try_from(slept.as_nanos()).unwrap_or(u64::MAX);
            self.throttled_ns.fetch_add(ns, Relaxed);
        }
    }

    pub(crate) fn logs_dropped(&self, n: u64) {
        if n > 0 {
            self.logs_dropped.fetch_add(n, Relaxed);
        }
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let t = |i: usize| self.traps[i].load(Relaxed);
        MetricsSnapshot {
            calls: self.calls.load(Relaxed),
            messages: self.messages.load(Relaxed),
            guest_errors: self.guest_errors.load(Relaxed),
            output_rejected: self.output_rejected.load(Relaxed),
            refused_errored: self.refused_errored.load(Relaxed),
            instantiations: self.instantiations.load(Relaxed),
            instantiate_failures: self.instantiate_failures.load(Relaxed),
            capacity_refusals: self.capacity_refusals.load(Relaxed),
            traps_deadline: t(0),
            traps_memory: t(1),
            traps_panic: t(2),
            traps_stack_overflow: t(3),
            traps_other: t(4),
            time_ns: self.time_ns.load(Relaxed),
            max_ns: self.max_ns.load(Relaxed),
            latency_buckets: self.latency.iter().map(|c| c.load(Relaxed)).collect(),
            logs_dropped: self.logs_dropped.load(Relaxed),
            peak_memory_bytes: self.peak_memory.load(Relaxed),
            throttled_ns: self.throttled_ns.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_land_in_their_counters() {
        let m = PluginMetrics::default();
        m.failure(FailureKind::Deadline);
        m.failure(FailureKind::Memory);
        m.failure(FailureKind::Memory);
        m.failure(FailureKind::StackOverflow);
        m.failure(FailureKind::Guest);
        m.call(3, Duration::from_micros(7));
        let s = m.snapshot();
        assert_eq!(
            (s.traps_deadline, s.traps_memory, s.traps_stack_overflow),
            (1, 2, 1)
        );
        assert_eq!(s.traps(), 4);
        assert_eq!(s.guest_errors, 1);
        assert_eq!((s.calls, s.messages), (1, 3));
        assert_eq!(s.latency_buckets[3], 1, "7 µs falls in the (5, 10] bucket");
    }
}
