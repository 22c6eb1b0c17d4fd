//! Sandbox settings: deadlines, memory caps, pool sizes, output bounds.

use std::path::PathBuf;
use std::time::Duration;

/// How plugins are confined. One value is shared by every plugin of a
/// [`PluginRuntime`](super::PluginRuntime); each plugin still gets its own
/// Stores and instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Budget of one policy call in CPU time of the thread running it
    /// (checked by epoch interruption), so that a call is never stopped for
    /// waiting while other threads run; a call also ends after 100 times
    /// this in wall-clock time. Default 10 ms.
    pub call_deadline: Duration,
    /// Budget of `init` (which runs on every (re-)instantiation), in CPU
    /// time like `call_deadline`. Default 100 ms.
    pub init_deadline: Duration,
    /// Epoch tick: the deadline resolution. Default 1 ms.
    pub epoch_tick: Duration,
    /// CPU time a call (or `init`) may use at full speed. A call that runs
    /// on is throttled to `throttle_percent` of a core for the rest of its
    /// budget: it sleeps at every epoch tick for as long as keeps it there,
    /// so a plugin spinning to its deadline holds a core for at most this
    /// long at a time. Policy calls take microseconds. Default 1 ms.
    pub throttle_after: Duration,
    /// Percent of one core a call gets beyond `throttle_after`, 5 to 100
    /// (100: never throttled). Default 10.
    pub throttle_percent: u32,
    /// Linear memory cap per instance. Default 16 MiB.
    pub memory_limit: usize,
    /// Table elements cap per instance. Default 20 000.
    pub table_elements_limit: usize,
    /// Instances all plugins of the runtime may reserve in all (the
    /// wasmtime pool holds these plus a headroom for hot swaps). Default 256.
    pub pool_instances: u32,
    /// Instances one plugin reserves at load and never exceeds: calls
    /// beyond wait for one of them. Default 2.
    pub instances_per_plugin: u32,
    /// Instances one tenant's plugins may reserve. Default 32.
    pub instances_per_tenant: u32,
    /// Linear memory one tenant's plugins may reserve (instances × the
    /// memory cap). Default 512 MiB.
    pub memory_per_tenant: u64,
    /// Compiled code of one tenant's plugins, bytes (what they hold in the
    /// on-disk cache). Default 256 MiB.
    pub cache_bytes_per_tenant: u64,
    /// Compiled code of all plugins, bytes. Default 2 GiB.
    pub cache_bytes_total: u64,
    /// Warm (instantiated and initialized) instances kept per plugin for
    /// reuse, at most `instances_per_plugin`. Default 2.
    pub warm_instances_per_plugin: usize,
    /// Log lines (guest `log` calls and the broker's trap warnings) one
    /// plugin may produce per second; the rest are counted as dropped.
    /// Default 100.
    pub max_log_lines_per_sec: u32,
    /// Consecutive traps after which a plugin is marked errored and refuses
    /// further calls until reloaded. Default 5.
    pub trap_threshold: u32,
    /// Where compiled components are cached (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Bounds on what a plugin may return.
    pub output: OutputLimits,
    /// Log lines kept per call (the rest are counted as dropped). Default 64.
    pub max_log_lines_per_call: u32,
    /// Bytes kept per log line (longer lines are truncated). Default 4 KiB.
    pub max_log_line_bytes: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_millis(10),
            init_deadline: Duration::from_millis(100),
            epoch_tick: Duration::from_millis(1),
            throttle_after: Duration::from_millis(1),
            throttle_percent: 10,
            memory_limit: 16 << 20,
            table_elements_limit: 20_000,
            pool_instances: 256,
            instances_per_plugin: 2,
            instances_per_tenant: 32,
            memory_per_tenant: 512 << 20,
            cache_bytes_per_tenant: 256 << 20,
            cache_bytes_total: 2 << 30,
            warm_instances_per_plugin: 2,
            max_log_lines_per_sec: 100,
            trap_threshold: 5,
            cache_dir: None,
            output: OutputLimits::default(),
            max_log_lines_per_call: 64,
            max_log_line_bytes: 4096,
        }
    }
}

/// Bounds on plugin results. A result over a bound is refused with
/// [`FailureKind::Output`](super::FailureKind::Output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLimits {
    /// Target queues a router may return. Default 1024.
    pub max_targets: usize,
    /// Bytes of a queue name a router may return. Default 255.
    pub max_name_bytes: usize,
    /// Payload bytes of a filter replacement. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Headers of a filter replacement. Default 64.
    pub max_headers: usize,
    /// Total header bytes (names + values) of a replacement. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Bytes of a reason string (drop, deny, error); longer ones are truncated. Default 1 KiB.
    pub max_reason_bytes: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_targets: 1024,
            max_name_bytes: 255,
            max_payload_bytes: 1 << 20,
            max_headers: 64,
            max_header_bytes: 16 << 10,
            max_reason_bytes: 1024,
        }
    }
}

impl SandboxConfig {
    /// Epoch ticks that make up `d`, at least 1.
    pub(crate) fn ticks(&self, d: Duration) -> u64 {
        let tick = self.epoch_tick.as_nanos().max(1);
        (d.as_nanos().div_ceil(tick)).max(1) as u64
    }
}
