//! Per-Store state: the memory limiter and the `host` interface a guest may
//! call. One Store holds one instance of one plugin; it is dropped after any
//! trap because a trap poisons the whole Store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, UpdateDeadline};

use crate::sys::thread_cpu_time;

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
    /// The budget of the call (or `init`) running now.
    pub(crate) deadline: Deadline,
}

/// A call's wall-clock backstop, as a multiple of its CPU deadline: a call
/// starved of CPU (its thread at the lowest priority on a busy machine)
/// holds its instance no longer than this.
pub(crate) const WALL_BACKSTOP: u32 = 100;

/// The budget of one call: CPU time of the thread running it, so that a
/// call is stopped for what it spends and never for waiting while other
/// threads run (the verdict does not depend on how busy the machine is),
/// with a wall-clock backstop of [`WALL_BACKSTOP`] times that.
///
/// Epoch interruption checks it: the epoch deadline is first set to the
/// budget in wall-clock ticks; when it is reached, [`Deadline::check`] either
/// stops the call or extends the deadline by the CPU time still left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    cpu_start: Duration,
    wall_start: Instant,
    cpu: Duration,
    tick: Duration,
    throttle: Throttle,
    /// CPU used by the call when it was last throttled.
    throttled_at: Duration,
    /// Time the call slept to stay within its throttle.
    pub(crate) slept: Duration,
}

/// How a long call is slowed down: once it has used `after` of CPU, it
/// may use at most `share` of a core for the rest of its budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Throttle {
    /// CPU a call may use at full speed.
    pub after: Duration,
    /// Share of one core a call gets beyond `after` (1.0: no throttle).
    pub share: f64,
}

impl Throttle {
    /// No throttling.
    pub(crate) const NONE: Throttle = Throttle {
        after: Duration::MAX,
        share: 1.0,
    };
}

impl Deadline {
    /// A budget of `cpu` starting now on this thread, checked every `tick`.
    pub(crate) fn start(cpu: Duration, tick: Duration) -> Self {
        Self::throttled(cpu, tick, Throttle::NONE)
    }

    /// A budget of `cpu` whose use beyond `throttle.after` is slowed to
    /// `throttle.share` of a core.
    pub(crate) fn throttled(cpu: Duration, tick: Duration, throttle: Throttle) -> Self {
        Self {
            cpu_start: thread_cpu_time(),
            wall_start: Instant::now(),
            cpu,
            tick: tick.max(Duration::from_nanos(1)),
            throttle,
            throttled_at: throttle.after,
            slept: Duration::ZERO,
        }
    }

    /// The epoch ticks that make up `d`, at least 1.
    fn ticks(&self, d: Duration) -> u64 {
        let ticks = d.as_nanos().div_ceil(self.tick.as_nanos()).max(1);
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// The epoch deadline was reached: stop the call if it used its CPU
    /// budget (or the wall-clock backstop), else extend by what is left.
    /// A call past its throttle point first sleeps for as long as keeps its
    /// use since the last check within the throttle's share, then is
    /// checked again after one tick.
    pub(crate) fn check(&mut self) -> UpdateDeadline {
        let used = thread_cpu_time().saturating_sub(self.cpu_start);
        if used >= self.cpu || self.wall_start.elapsed() >= self.cpu.saturating_mul(WALL_BACKSTOP) {
            return UpdateDeadline::Interrupt;
        }
        let left = self.cpu - used;
        if used < self.throttle.after {
            return UpdateDeadline::Continue(self.ticks(left.min(self.throttle.after - used)));
        }
        let burst = used.saturating_sub(self.throttled_at);
        self.throttled_at = used;
        let share = self.throttle.share.clamp(0.01, 1.0);
        if share < 1.0 && !burst.is_zero() {
            let pause = burst.mul_f64((1.0 - share) / share);
            std::thread::sleep(pause);
            self.slept += pause;
        }
        UpdateDeadline::Continue(1)
    }
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
        Self::new_at(per_sec, Instant::now())
    }

    /// A full bucket at `now` (tests pass their own clock).
    fn new_at(per_sec: u32, now: Instant) -> Self {
        Self {
            per_sec,
            state: std::sync::Mutex::new((f64::from(per_sec), now)),
        }
    }

    /// Whether one more line may be written now.
    pub(crate) fn take(&self) -> bool {
        self.take_at(Instant::now())
    }

    /// Whether one more line may be written at `now`.
    fn take_at(&self, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rate = f64::from(self.per_sec);
        // A clock that went backwards (another thread's earlier `now`) adds nothing.
        st.0 = (st.0 + now.saturating_duration_since(st.1).as_secs_f64() * rate).min(rate);
        st.1 = st.1.max(now);
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

    /// The part of `text` to write as one more line of this call, cut to
    /// the line bound; `None` (counted as dropped) past the call's lines or
    /// the plugin's lines per second.
    fn admit<'t>(&mut self, lines: &LineLimit, text: &'t str) -> Option<&'t str> {
        if self.lines >= self.max_lines || !lines.take() {
            self.dropped += 1;
            return None;
        }
        self.lines += 1;
        Some(truncate(text, self.max_bytes))
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
        let Some(text) = budget.admit(&self.lines, &text) else {
            return;
        };
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
    use super::*;

    fn spin(d: Duration) {
        let start = thread_cpu_time();
        while thread_cpu_time() - start < d {
            std::hint::black_box(0u64);
        }
    }

    /// Waiting (here: sleeping, as a thread waiting for a core does) does
    /// not use the budget; using the CPU does.
    #[test]
    fn a_deadline_counts_cpu_time_not_waiting() {
        let mut d = Deadline::start(Duration::from_millis(40), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(100));
        let UpdateDeadline::Continue(ticks) = d.check() else {
            panic!("stopped after sleeping past the deadline without using the CPU");
        };
        assert!((30..=40).contains(&ticks), "extended by {ticks} ticks");
        spin(Duration::from_millis(45));
        assert!(matches!(d.check(), UpdateDeadline::Interrupt));
    }

    /// A call that cannot get a core still ends after the backstop.
    #[test]
    fn a_deadline_has_a_wall_clock_backstop() {
        let mut d = Deadline::start(Duration::from_micros(500), Duration::from_millis(1));
        assert!(matches!(d.check(), UpdateDeadline::Continue(_)));
        std::thread::sleep(Duration::from_micros(500) * WALL_BACKSTOP + Duration::from_millis(5));
        assert!(matches!(d.check(), UpdateDeadline::Interrupt));
    }

    /// Up to its throttle point a call runs at full speed and its next
    /// check comes at that point; past it, every check (one per tick)
    /// sleeps (1 − share) / share times the CPU used since the last one.
    #[test]
    fn a_call_past_its_throttle_point_sleeps_for_its_share() {
        let throttle = Throttle {
            after: Duration::from_millis(2),
            share: 0.25,
        };
        let tick = Duration::from_millis(1);
        let mut d = Deadline::throttled(Duration::from_secs(10), tick, throttle);
        let UpdateDeadline::Continue(ticks) = d.check() else {
            panic!("stopped early");
        };
        assert!((1..=2).contains(&ticks), "next check at the point: {ticks}");
        assert_eq!(d.slept, Duration::ZERO);
        spin(Duration::from_millis(2));
        for _ in 0..4 {
            assert!(matches!(d.check(), UpdateDeadline::Continue(1)));
            spin(Duration::from_millis(1));
        }
        assert!(matches!(d.check(), UpdateDeadline::Continue(1)));
        let beyond = d.throttled_at - throttle.after;
        assert!(beyond >= Duration::from_millis(4), "{beyond:?}");
        let expected = beyond * 3;
        let diff = d.slept.abs_diff(expected);
        assert!(
            diff < Duration::from_micros(10),
            "slept {:?}, expected {expected:?}",
            d.slept
        );
        // Unthrottled: the next check is when the budget is used up.
        let mut d = Deadline::start(Duration::from_millis(40), tick);
        spin(Duration::from_millis(5));
        let UpdateDeadline::Continue(ticks) = d.check() else {
            panic!("stopped early");
        };
        assert!(ticks >= 30, "{ticks}");
        assert_eq!(d.slept, Duration::ZERO);
    }

    /// A bucket of one second's worth: a burst of `per_sec`, then one line
    /// per `1/per_sec` of (injected) time, never more than `per_sec` saved.
    #[test]
    fn log_lines_per_second_are_a_token_bucket() {
        let t0 = Instant::now();
        let limit = LineLimit::new_at(100, t0);
        let taken = |at: Instant, n: usize| (0..n).filter(|_| limit.take_at(at)).count();
        assert_eq!(taken(t0, 150), 100, "the burst is one second's worth");
        assert_eq!(taken(t0 + Duration::from_millis(50), 10), 5, "100/s refill");
        // Ten idle seconds still save only one second's worth.
        assert_eq!(taken(t0 + Duration::from_secs(10), 1000), 100);
        // An earlier instant (another thread's clock) gives nothing back.
        assert_eq!(taken(t0 + Duration::from_secs(5), 10), 0);
        assert_eq!(taken(t0 + Duration::from_millis(10_010), 10), 1);
    }

    /// Per call at most `max_lines` lines, each cut to `max_bytes` on a char
    /// boundary; the rest are counted as dropped, and the per-second bucket
    /// shared by the plugin's instances bounds calls together.
    #[test]
    fn log_lines_are_cut_and_counted() {
        let lines = LineLimit::new_at(100, Instant::now() + Duration::from_secs(3600));
        let mut budget = LogBudget::new(64, 4096);
        let long = "€".repeat(2000);
        let cut = budget.admit(&lines, &long).unwrap();
        assert_eq!(cut.len(), 4095, "4 KiB, cut on a char boundary");
        assert!(long.starts_with(cut));
        assert_eq!(budget.admit(&lines, "short"), Some("short"));
        let admitted = (0..100)
            .filter(|_| budget.admit(&lines, "x").is_some())
            .count();
        assert_eq!(admitted, 62, "64 lines per call");
        assert_eq!(budget.dropped, 38);
        // The next call starts a new count, but the plugin's second is used up
        // after 100 lines (the bucket's clock is an hour ahead: no refill).
        budget.start_call();
        let admitted = (0..64)
            .filter(|_| budget.admit(&lines, "x").is_some())
            .count();
        assert_eq!(admitted, 100 - 64);
        assert_eq!(budget.dropped, 38 + 28);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
