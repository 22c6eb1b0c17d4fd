//! Per-Store state: the memory limiter and the `host` interface a guest may
//! call. One Store holds one instance of one plugin; it is dropped after any
//! trap because a trap poisons the whole Store.

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use super::bindings::{self, LogLevel};

/// Identifies a plugin in logs and failures.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginId {
    /// Owning tenant.
    pub tenant: Arc<str>,
    /// Plugin name, unique inside the tenant.
    pub name: Arc<str>,
}

/// What a wasmtime Store carries for one plugin instance.
pub(crate) struct StoreState {
    pub(crate) id: PluginId,
    pub(crate) limiter: Limiter,
    pub(crate) log: LogBudget,
    /// The plugin's log lines per second, shared by all its instances.
    pub(crate) lines: Arc<LineLimit>,
}

/// Log lines per second of one plugin (a token bucket holding one
/// second's worth): guest lines and the broker's warnings about the plugin
/// share it, so no plugin floods the broker's log, however often it is
/// called or traps.
#[derive(Debug)]
pub(crate) struct LineLimit {
    per_sec: u32,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl LineLimit {
    pub(crate) fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            state: std::sync::Mutex::new((f64::from(per_sec), std::time::Instant::now())),
        }
    }

    /// Whether one more line may be written now.
    pub(crate) fn take(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let rate = f64::from(self.per_sec);
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * rate).min(rate);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Enforces the memory and table caps and remembers whether it refused a
/// growth, so that the abort that follows in a Rust guest is classified as a
/// memory failure rather than a panic.
pub(crate) struct Limiter {
    memory_limit: usize,
    table_limit: usize,
    pub(crate) memory_denied: bool,
    /// Largest linear memory size granted so far.
    pub(crate) peak_memory: usize,
}

impl Limiter {
    pub(crate) fn new(memory_limit: usize, table_limit: usize) -> Self {
        Self {
            memory_limit,
            table_limit,
            memory_denied: false,
            peak_memory: 0,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_limit && maximum.is_none_or(|m| desired <= m);
        if allowed {
            self.peak_memory = self.peak_memory.max(desired);
        } else {
            self.memory_denied = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_limit && maximum.is_none_or(|m| desired <= m))
    }
}

/// Bounds guest logging per call.
pub(crate) struct LogBudget {
    pub(crate) max_lines: u32,
    pub(crate) max_bytes: usize,
    pub(crate) lines: u32,
    pub(crate) dropped: u64,
    /// The last panic message the guest reported (see the SDK's panic hook).
    pub(crate) last_panic: Option<String>,
}

impl LogBudget {
    pub(crate) fn new(max_lines: u32, max_bytes: usize) -> Self {
        Self {
            max_lines,
            max_bytes,
            lines: 0,
            dropped: 0,
            last_panic: None,
        }
    }

    /// Reset the per-call counters before a call.
    pub(crate) fn start_call(&mut self) {
        self.lines = 0;
        self.last_panic = None;
    }
}

/// Prefix the guest SDK puts before a panic message.
const PANIC_PREFIX: &str = "panic: ";

impl bindings::host::Host for StoreState {
    fn log(&mut self, level: LogLevel, text: String) {
        let budget = &mut self.log;
        if let Some(msg) = text.strip_prefix(PANIC_PREFIX) {
            budget.last_panic = Some(truncate(msg, budget.max_bytes).to_string());
        }
        if budget.lines >= budget.max_lines || !self.lines.take() {
            budget.dropped += 1;
            return;
        }
        budget.lines += 1;
        let text = truncate(&text, budget.max_bytes);
        let (tenant, plugin) = (&*self.id.tenant, &*self.id.name);
        match level {
            LogLevel::Trace => tracing::trace!(target: "sluice::plugin", tenant, plugin, "{text}"),
            LogLevel::Debug => tracing::debug!(target: "sluice::plugin", tenant, plugin, "{text}"),
            LogLevel::Info => tracing::info!(target: "sluice::plugin", tenant, plugin, "{text}"),
            LogLevel::Warn => tracing::warn!(target: "sluice::plugin", tenant, plugin, "{text}"),
            LogLevel::Error => tracing::error!(target: "sluice::plugin", tenant, plugin, "{text}"),
        }
    }
}

impl bindings::router::sluice::plugin::types::Host for StoreState {}

/// `sluice:plugin/host@0.1.0`: the same log, with the 0.1.0 level type.
impl bindings::v0_1::host::Host for StoreState {
    fn log(&mut self, level: bindings::v0_1::types::LogLevel, text: String) {
        bindings::host::Host::log(self, bindings::v0_1::log_level(level), text)
    }
}

impl bindings::v0_1::types::Host for StoreState {}

/// `s` cut to at most `max` bytes on a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
