//! A loaded plugin: warm instances, typed calls, failure handling, health.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest pause before re-instantiating a plugin that keeps trapping.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

use wasmtime::Store;

use super::bindings::{Abi, authorizer, filter, router, v0_1};
use super::budget::Reservation;
use super::cache::CacheRef;
use super::engine::RuntimeInner;
use super::failure::classify;
use super::metrics::{MetricsSnapshot, PluginMetrics};
use super::store::{
    Deadline, Limiter, LineLimit, LogBudget, PluginId, StoreState, Throttle, truncate,
};
use super::{
    Action, Decision, FailureKind, FilterVerdict, LoadError, Message, PluginFailure, PluginKind,
    Principal, Resource, RouteRequest, SandboxConfig,
};

/// Pre-linked component, typed by kind and contract version.
pub(crate) enum KindPre {
    Router(router::RouterPre<StoreState>),
    Filter(filter::FilterPre<StoreState>),
    Authorizer(authorizer::AuthorizerPre<StoreState>),
    RouterV01(v0_1::router::RouterPre<StoreState>),
    FilterV01(v0_1::filter::FilterPre<StoreState>),
    AuthorizerV01(v0_1::authorizer::AuthorizerPre<StoreState>),
}

impl KindPre {
    /// The contract version the component was linked against.
    fn abi(&self) -> Abi {
        match self {
            KindPre::Router(_) | KindPre::Filter(_) | KindPre::Authorizer(_) => Abi::V0_2,
            KindPre::RouterV01(_) | KindPre::FilterV01(_) | KindPre::AuthorizerV01(_) => Abi::V0_1,
        }
    }
}

/// Typed exports of one instance.
enum Exports {
    Router(router::Router),
    Filter(filter::Filter),
    Authorizer(authorizer::Authorizer),
    RouterV01(v0_1::router::Router),
    FilterV01(v0_1::filter::Filter),
    AuthorizerV01(v0_1::authorizer::Authorizer),
}

/// One instance in its own Store, initialized and ready for calls.
struct Warm {
    store: Store<StoreState>,
    exports: Exports,
}

/// Whether a plugin takes calls.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum PluginState {
    /// Serving calls.
    Ready,
    /// Refusing calls after repeated traps; reload it to recover.
    Errored {
        /// The last failure.
        reason: String,
    },
    /// Configured but not running: it could not be loaded at start. It
    /// keeps its role and fails closed until it is reloaded or unloaded.
    NotRunning {
        /// Why it could not be loaded.
        reason: String,
    },
}

/// A loaded plugin. Calls are synchronous and may run on many threads at
/// once; each concurrent call uses its own instance, at most the plugin's
/// reservation of them (a call beyond waits for one, up to its deadline).
pub struct Plugin {
    runtime: Arc<RuntimeInner>,
    id: PluginId,
    kind: PluginKind,
    digest: String,
    config: Vec<(String, String)>,
    pre: KindPre,
    slots: Mutex<Slots>,
    freed: Condvar,
    metrics: PluginMetrics,
    consecutive_traps: AtomicU32,
    errored: AtomicBool,
    last_failure: Mutex<Option<PluginFailure>>,
    lines: Arc<LineLimit>,
    /// Instances, memory and compiled code held for this plugin (given
    /// back when it is dropped, i.e. when its last call finished).
    reservation: Reservation,
    /// Keeps its compiled code in the disk cache while it is loaded.
    _cached: Option<CacheRef>,
}

/// The plugin's instances: parked ones, and how many exist in all.
#[derive(Default)]
struct Slots {
    warm: Vec<Warm>,
    live: u32,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("abi", &self.pre.abi())
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        runtime: Arc<RuntimeInner>,
        id: PluginId,
        kind: PluginKind,
        digest: String,
        config: Vec<(String, String)>,
        pre: KindPre,
        reservation: Reservation,
        cached: Option<CacheRef>,
    ) -> Result<Self, LoadError> {
        let lines = Arc::new(LineLimit::new(runtime.config.max_log_lines_per_sec));
        let plugin = Self {
            runtime,
            id,
            kind,
            digest,
            config,
            pre,
            slots: Mutex::new(Slots::default()),
            freed: Condvar::new(),
            metrics: PluginMetrics::default(),
            consecutive_traps: AtomicU32::new(0),
            errored: AtomicBool::new(false),
            last_failure: Mutex::new(None),
            lines,
            reservation,
            _cached: cached,
        };
        // Instantiate once now so a broken `init` is reported at load time.
        let warm = plugin.acquire().map_err(|f| match f.kind {
            FailureKind::Capacity => LoadError::Capacity(f.message),
            _ => LoadError::Init(f),
        })?;
        plugin.park(warm);
        Ok(plugin)
    }

    /// What the plugin holds of its tenant's plugin limits.
    pub(crate) fn reserved(&self) -> super::budget::Amount {
        self.reservation.amount()
    }

    /// Tenant and name.
    pub fn id(&self) -> &PluginId {
        &self.id
    }

    /// The policy kind.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    /// The contract version the component was built against.
    pub fn abi(&self) -> Abi {
        self.pre.abi()
    }

    /// SHA-256 (hex) of the component bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The configuration given to `init`.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Ready or errored.
    pub fn state(&self) -> PluginState {
        if self.errored.load(Ordering::Acquire) {
            let reason = self
                .last_failure
                .lock()
                .ok()
                .and_then(|f| f.as_ref().map(|f| format!("{}: {}", f.kind, f.message)))
                .unwrap_or_else(|| "repeated traps".to_string());
            PluginState::Errored { reason }
        } else {
            PluginState::Ready
        }
    }

    /// Whether the plugin is errored (refusing calls until reloaded).
    pub fn is_errored(&self) -> bool {
        self.errored.load(Ordering::Acquire)
    }

    /// The most recent failure, if any.
    pub fn last_failure(&self) -> Option<PluginFailure> {
        self.last_failure.lock().ok().and_then(|f| f.clone())
    }

    /// Route one message. `Ok(targets)` may be empty (no route).
    pub fn route(
        &self,
        msg: &Message,
        candidates: &[String],
    ) -> Result<Vec<String>, PluginFailure> {
        self.expect_kind(PluginKind::Router)?;
        let out = self.call(1, |store, exports| match exports {
            Exports::Router(r) => r.call_route(store, msg, candidates),
            Exports::RouterV01(r) => r.call_route(store, &v0_1::message(msg), candidates),
            _ => unreachable_kind(),
        })?;
        let targets = out.map_err(|reason| self.guest_error(reason))?;
        self.check_targets(&targets)?;
        Ok(targets)
    }

    /// Route many messages in one guest call. The outer error is a failure
    /// of the whole call (a trap poisons every message of the batch); the
    /// inner results are per message.
    pub fn route_batch(
        &self,
        requests: &[RouteRequest],
    ) -> Result<Vec<Result<Vec<String>, String>>, PluginFailure> {
        self.expect_kind(PluginKind::Router)?;
        let out = self.call(requests.len() as u64, |store, exports| match exports {
            Exports::Router(r) => r.call_route_batch(store, requests),
            Exports::RouterV01(r) => {
                let requests: Vec<_> = requests.iter().map(v0_1::route_request).collect();
                r.call_route_batch(store, &requests)
            }
            _ => unreachable_kind(),
        })?;
        self.check_batch_len(out.len(), requests.len())?;
        out.into_iter()
            .map(|r| match r {
                Ok(targets) => self.check_targets(&targets).map(|()| Ok(targets)),
                Err(reason) => {
                    self.metrics.failure(FailureKind::Guest);
                    Ok(Err(self.reason(reason)))
                }
            })
            .collect()
    }

    /// Filter one message.
    pub fn filter(&self, msg: &Message) -> Result<FilterVerdict, PluginFailure> {
        self.expect_kind(PluginKind::Filter)?;
        let out = self.call(1, |store, exports| match exports {
            Exports::Filter(f) => f.call_filter(store, msg),
            Exports::FilterV01(f) => f
                .call_filter(store, &v0_1::message(msg))
                .map(|r| r.map(v0_1::filter_verdict)),
            _ => unreachable_kind(),
        })?;
        let verdict = out.map_err(|reason| self.guest_error(reason))?;
        self.check_verdict(verdict)
    }

    /// Filter many messages in one guest call (see [`Plugin::route_batch`]).
    pub fn filter_batch(
        &self,
        msgs: &[Message],
    ) -> Result<Vec<Result<FilterVerdict, String>>, PluginFailure> {
        self.expect_kind(PluginKind::Filter)?;
        let out = self.call(msgs.len() as u64, |store, exports| match exports {
            Exports::Filter(f) => f.call_filter_batch(store, msgs),
            Exports::FilterV01(f) => {
                let msgs: Vec<_> = msgs.iter().map(v0_1::message).collect();
                f.call_filter_batch(store, &msgs).map(|out| {
                    out.into_iter()
                        .map(|r| r.map(v0_1::filter_verdict))
                        .collect()
                })
            }
            _ => unreachable_kind(),
        })?;
        self.check_batch_len(out.len(), msgs.len())?;
        out.into_iter()
            .map(|r| match r {
                Ok(v) => self.check_verdict(v).map(Ok),
                Err(reason) => {
                    self.metrics.failure(FailureKind::Guest);
                    Ok(Err(self.reason(reason)))
                }
            })
            .collect()
    }

    /// Ask the authorizer. A failure must be treated as a deny by the caller.
    ///
    /// A 0.1.0 authorizer cannot see plugin kinds, attachments or
    /// `manage-policy`: it is asked the 0.1.0 questions the compat mapping
    /// gives (`bindings::v0_1::questions`, documented in `docs/wit.md`) in
    /// turn, each under its own call deadline, on the same instance, and
    /// allows only if every one allows; the first deny is returned.
    pub fn authorize(
        &self,
        who: &Principal,
        action: Action,
        on: &Resource,
    ) -> Result<Decision, PluginFailure> {
        self.expect_kind(PluginKind::Authorizer)?;
        let cfg = &self.runtime.config;
        let decision = self.call(1, |store, exports| match exports {
            Exports::Authorizer(a) => a.call_authorize(store, who, action, on),
            Exports::AuthorizerV01(a) => {
                let old_who = v0_1::principal(who);
                for (i, (action, on)) in v0_1::questions(who, action, on).iter().enumerate() {
                    if i > 0 {
                        arm(store, cfg, cfg.call_deadline);
                    }
                    match a.call_authorize(&mut *store, &old_who, *action, on)? {
                        v0_1::types::Decision::Allow => {}
                        deny => return Ok(v0_1::decision(deny)),
                    }
                }
                Ok(Decision::Allow)
            }
            _ => unreachable_kind(),
        })?;
        Ok(match decision {
            Decision::Deny(reason) => Decision::Deny(self.reason(reason)),
            allow => allow,
        })
    }

    /// Run `f` on a warm instance under the call deadline, classifying any
    /// failure. The instance goes back to the pool unless it trapped.
    fn call<R>(
        &self,
        messages: u64,
        f: impl FnOnce(&mut Store<StoreState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, PluginFailure> {
        if self.errored.load(Ordering::Acquire) {
            self.metrics.failure(FailureKind::Errored);
            return Err(self.failure(
                FailureKind::Errored,
                "plugin is errored after repeated traps; reload it".into(),
            ));
        }
        let mut warm = self.acquire().inspect_err(|f| {
            if f.kind != FailureKind::Capacity {
                self.record_trap(f);
            }
        })?;
        let cfg = &self.runtime.config;
        warm.store.data_mut().limiter.memory_denied = false;
        warm.store.data_mut().log.start_call();
        arm(&mut warm.store, cfg, cfg.call_deadline);
        let start = Instant::now();
        let result = f(&mut warm.store, &warm.exports);
        self.metrics.call(messages, start.elapsed());
        let state = warm.store.data_mut();
        self.metrics.throttled(state.deadline.slept);
        self.metrics
            .logs_dropped(std::mem::take(&mut state.log.dropped));
        self.metrics.memory(state.limiter.peak_memory);
        match result {
            Ok(r) => {
                self.consecutive_traps.store(0, Ordering::Relaxed);
                self.park(warm);
                Ok(r)
            }
            Err(e) => {
                let (kind, mut message) = classify(&e, state.limiter.memory_denied);
                if let Some(panic) = state.log.last_panic.take() {
                    message = format!("{message}: {panic}");
                }
                self.metrics.failure(kind);
                let failure = self.failure(kind, message);
                self.record_trap(&failure);
                // The trap poisoned the Store: drop the instance.
                drop(warm);
                self.release();
                Err(failure)
            }
        }
    }

    /// A new instance in a new Store, with `init` run under the init deadline.
    fn instantiate(&self) -> Result<Warm, PluginFailure> {
        let cfg = &self.runtime.config;
        let state = StoreState {
            id: self.id.clone(),
            limiter: Limiter::new(cfg.memory_limit, cfg.table_elements_limit),
            log: LogBudget::new(cfg.max_log_lines_per_call, cfg.max_log_line_bytes),
            lines: self.lines.clone(),
            deadline: Deadline::start(cfg.init_deadline, cfg.epoch_tick),
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().deadline.check()));
        arm(&mut store, cfg, cfg.init_deadline);
        let fail = |store: &mut Store<StoreState>, e: wasmtime::Error| {
            let (kind, mut message) = classify(&e, store.data().limiter.memory_denied);
            // As for policy calls: a panicking `init` is reported with its message.
            if let Some(panic) = store.data_mut().log.last_panic.take() {
                message = format!("{message}: {panic}");
            }
            self.metrics.failure(kind);
            self.failure(kind, format!("during init: {message}"))
        };
        let exports = match &self.pre {
            KindPre::Router(p) => p.instantiate(&mut store).map(Exports::Router),
            KindPre::Filter(p) => p.instantiate(&mut store).map(Exports::Filter),
            KindPre::Authorizer(p) => p.instantiate(&mut store).map(Exports::Authorizer),
            KindPre::RouterV01(p) => p.instantiate(&mut store).map(Exports::RouterV01),
            KindPre::FilterV01(p) => p.instantiate(&mut store).map(Exports::FilterV01),
            KindPre::AuthorizerV01(p) => p.instantiate(&mut store).map(Exports::AuthorizerV01),
        };
        let exports = match exports {
            Ok(x) => x,
            // The broker's pool is full: its bound, not the plugin's fault.
            Err(e)
                if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                    .is_some() =>
            {
                self.metrics.failure(FailureKind::Capacity);
                return Err(self.failure(
                    FailureKind::Capacity,
                    format!("the broker's plugin instance pool is full: {e:#}"),
                ));
            }
            Err(e) => {
                self.metrics.failure(FailureKind::Instantiate);
                return Err(self.failure(FailureKind::Instantiate, format!("{e:#}")));
            }
        };
        let init = match &exports {
            Exports::Router(r) => r.call_init(&mut store, &self.config),
            Exports::Filter(f) => f.call_init(&mut store, &self.config),
            Exports::Authorizer(a) => a.call_init(&mut store, &self.config),
            Exports::RouterV01(r) => r.call_init(&mut store, &self.config),
            Exports::FilterV01(f) => f.call_init(&mut store, &self.config),
            Exports::AuthorizerV01(a) => a.call_init(&mut store, &self.config),
        };
        self.metrics.throttled(store.data().deadline.slept);
        match init {
            Ok(Ok(())) => {
                self.metrics.instantiated();
                self.metrics.memory(store.data().limiter.peak_memory);
                Ok(Warm { store, exports })
            }
            Ok(Err(reason)) => {
                self.metrics.failure(FailureKind::Instantiate);
                Err(self.failure(FailureKind::Instantiate, self.reason(reason)))
            }
            Err(e) => Err(fail(&mut store, e)),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An instance for one call: a parked one, a new one within the
    /// plugin's reservation, or the next one freed before the call
    /// deadline passes (else a [`FailureKind::Capacity`] failure).
    fn acquire(&self) -> Result<Warm, PluginFailure> {
        let cfg = &self.runtime.config;
        let deadline = Instant::now() + cfg.call_deadline;
        let mut slots = self.slots();
        loop {
            if let Some(w) = slots.warm.pop() {
                return Ok(w);
            }
            if slots.live < self.reservation.instances() {
                slots.live += 1;
                drop(slots);
                self.back_off();
                return self.instantiate().inspect_err(|_| self.release());
            }
            let now = Instant::now();
            if now >= deadline {
                self.metrics.failure(FailureKind::Capacity);
                return Err(self.failure(
                    FailureKind::Capacity,
                    format!(
                        "all {} instances of the plugin stayed busy for the call deadline",
                        self.reservation.instances()
                    ),
                ));
            }
            slots = self
                .freed
                .wait_timeout(slots, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A plugin that trapped twice in a row or more is instantiated again
    /// only after a pause that doubles with every trap (5 ms, 10 ms, ... at
    /// most [`MAX_BACKOFF`]), so a plugin that traps on every call costs
    /// little CPU until it is marked errored (or forever, with a high
    /// `trap_threshold`). A single trap, as a legitimate plugin may hit
    /// under load, costs no pause. The pause is spent on the tenant's own
    /// plugin thread.
    fn back_off(&self) {
        let pause = back_off_pause(self.consecutive_traps.load(Ordering::Relaxed));
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }

    /// Put an instance back for the next call (or drop it beyond the warm
    /// count).
    fn park(&self, warm: Warm) {
        let mut slots = self.slots();
        let keep = self
            .runtime
            .config
            .warm_instances_per_plugin
            .min(self.reservation.instances() as usize);
        if slots.warm.len() < keep {
            slots.warm.push(warm);
        } else {
            slots.live = slots.live.saturating_sub(1);
        }
        drop(slots);
        self.freed.notify_one();
    }

    /// An instance is gone (trapped or failed to start).
    fn release(&self) {
        let mut slots = self.slots();
        slots.live = slots.live.saturating_sub(1);
        drop(slots);
        self.freed.notify_one();
    }

    fn record_trap(&self, failure: &PluginFailure) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(failure.clone());
        }
        let n = self.consecutive_traps.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.runtime.config.trap_threshold && !self.errored.swap(true, Ordering::AcqRel) {
            tracing::error!(
                tenant = &*self.id.tenant,
                plugin = &*self.id.name,
                traps = n,
                last = %failure,
                "plugin marked errored after repeated traps"
            );
        } else if self.lines.take() {
            tracing::warn!(tenant = &*self.id.tenant, plugin = &*self.id.name, %failure, "plugin trapped");
        } else {
            self.metrics.logs_dropped(1);
        }
    }

    fn failure(&self, kind: FailureKind, message: String) -> PluginFailure {
        PluginFailure {
            plugin: self.id.name.to_string(),
            kind,
            message,
        }
    }

    fn reason(&self, reason: String) -> String {
        let max = self.runtime.config.output.max_reason_bytes;
        if reason.len() <= max {
            reason
        } else {
            truncate(&reason, max).to_string()
        }
    }

    fn guest_error(&self, reason: String) -> PluginFailure {
        self.metrics.failure(FailureKind::Guest);
        let reason = self.reason(reason);
        self.failure(FailureKind::Guest, reason)
    }

    fn output_error(&self, message: String) -> PluginFailure {
        self.metrics.failure(FailureKind::Output);
        self.failure(FailureKind::Output, message)
    }

    fn expect_kind(&self, kind: PluginKind) -> Result<(), PluginFailure> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(self.failure(
                FailureKind::Guest,
                format!("plugin is a {}, not a {kind}", self.kind),
            ))
        }
    }

    fn check_batch_len(&self, got: usize, want: usize) -> Result<(), PluginFailure> {
        if got == want {
            Ok(())
        } else {
            Err(self.output_error(format!(
                "batch call returned {got} results for {want} inputs"
            )))
        }
    }

    fn check_targets(&self, targets: &[String]) -> Result<(), PluginFailure> {
        let limits = &self.runtime.config.output;
        if targets.len() > limits.max_targets {
            return Err(self.output_error(format!(
                "router returned {} targets (max {})",
                targets.len(),
                limits.max_targets
            )));
        }
        if let Some(t) = targets
            .iter()
            .find(|t| t.is_empty() || t.len() > limits.max_name_bytes)
        {
            return Err(self.output_error(format!(
                "router returned a queue name of {} bytes (allowed 1..={})",
                t.len(),
                limits.max_name_bytes
            )));
        }
        Ok(())
    }

    fn check_verdict(&self, verdict: FilterVerdict) -> Result<FilterVerdict, PluginFailure> {
        let limits = &self.runtime.config.output;
        match verdict {
            FilterVerdict::Replace(r) => {
                if r.payload.len() > limits.max_payload_bytes {
                    return Err(self.output_error(format!(
                        "filter replaced the payload with {} bytes (max {})",
                        r.payload.len(),
                        limits.max_payload_bytes
                    )));
                }
                if r.headers.len() > limits.max_headers {
                    return Err(self.output_error(format!(
                        "filter returned {} headers (max {})",
                        r.headers.len(),
                        limits.max_headers
                    )));
                }
                let bytes: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
                if bytes > limits.max_header_bytes {
                    return Err(self.output_error(format!(
                        "filter returned {bytes} header bytes (max {})",
                        limits.max_header_bytes
                    )));
                }
                Ok(FilterVerdict::Replace(r))
            }
            FilterVerdict::Drop(reason) => Ok(FilterVerdict::Drop(self.reason(reason))),
            accept => Ok(accept),
        }
    }
}

/// The pause before re-instantiating a plugin after `traps` consecutive
/// traps: none after one, then 5 ms doubling with every trap, at most
/// [`MAX_BACKOFF`].
fn back_off_pause(traps: u32) -> Duration {
    if traps < 2 {
        return Duration::ZERO;
    }
    Duration::from_millis(5)
        .saturating_mul(1 << (traps - 2).min(16))
        .min(MAX_BACKOFF)
}

/// Give the next call (or `init`) on `store` a budget of `cpu` of its
/// thread's CPU time, throttled beyond the sandbox's `throttle_after` (see
/// [`Deadline`]).
fn arm(store: &mut Store<StoreState>, cfg: &SandboxConfig, cpu: Duration) {
    let throttle = Throttle {
        after: cfg.throttle_after,
        share: f64::from(cfg.throttle_percent.clamp(1, 100)) / 100.0,
    };
    store.data_mut().deadline = Deadline::throttled(cpu, cfg.epoch_tick, throttle);
    store.set_epoch_deadline(cfg.ticks(cpu.min(throttle.after)));
}

/// The typed entry points check the kind first, and a plugin's exports
/// always match its kind, so a mismatch here is a broken local invariant.
fn unreachable_kind<R>() -> wasmtime::Result<R> {
    Err(wasmtime::Error::msg(
        "internal error: plugin exports do not match its kind",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::{PluginRuntime, PluginSpec};

    fn message() -> Message {
        Message {
            topic: "t".into(),
            headers: Vec::new(),
            payload: Vec::new(),
            tenant: "acme".into(),
            client: "c".into(),
            timestamp_ms: 0,
            redelivery_count: 0,
        }
    }

    /// A `header-filter` reserving two instances, with calls of `deadline`.
    fn filter(deadline: Duration) -> (PluginRuntime, Plugin) {
        let rt = PluginRuntime::new(SandboxConfig {
            call_deadline: deadline,
            init_deadline: Duration::from_secs(5),
            instances_per_plugin: 2,
            pool_instances: 8,
            ..SandboxConfig::default()
        })
        .unwrap();
        let wasm = crate::bundled::wasm("header-filter").unwrap().to_vec();
        let plugin = rt
            .load(PluginSpec {
                tenant: "acme".into(),
                name: "f".into(),
                kind: PluginKind::Filter,
                wasm,
                config: Vec::new(),
            })
            .unwrap();
        (rt, plugin)
    }

    /// With both reserved instances busy (held here), a third call neither
    /// instantiates a third one nor traps: it waits, and gets an instance
    /// freed before its deadline, or fails with `capacity` when none is.
    #[test]
    fn calls_beyond_the_reserved_instances_wait_then_fail_with_capacity() {
        let (_rt, plugin) = filter(Duration::from_millis(300));
        let held = [plugin.acquire().unwrap(), plugin.acquire().unwrap()];
        let f = plugin.filter(&message()).unwrap_err();
        assert_eq!(f.kind, FailureKind::Capacity, "{f}");
        assert!(f.message.contains("all 2 instances"), "{f}");
        let m = plugin.metrics();
        assert_eq!(m.instantiations, 2, "no third instance");
        assert_eq!(m.traps(), 0, "a capacity failure is not a trap");
        assert_eq!(plugin.consecutive_traps.load(Ordering::Relaxed), 0);
        assert_eq!(plugin.state(), PluginState::Ready);
        drop(held);

        // The wait: an instance freed while the call waits (well within its
        // deadline) serves it.
        let (_rt, plugin) = filter(Duration::from_secs(30));
        let mut held = vec![plugin.acquire().unwrap(), plugin.acquire().unwrap()];
        let served = std::thread::scope(|s| {
            let call = s.spawn(|| plugin.filter(&message()));
            std::thread::sleep(Duration::from_millis(100));
            plugin.park(held.pop().unwrap());
            call.join().unwrap()
        });
        assert_eq!(served.unwrap(), FilterVerdict::Accept);
        assert_eq!(plugin.metrics().instantiations, 2, "no third instance");
        drop(held);
    }

    #[test]
    fn trap_back_off_doubles_up_to_its_cap() {
        let ms = |n| back_off_pause(n).as_millis();
        let pauses: Vec<u128> = (0..=9).map(ms).collect();
        assert_eq!(pauses, [0, 0, 5, 10, 20, 40, 80, 160, 250, 250]);
        assert_eq!(back_off_pause(u32::MAX), MAX_BACKOFF);
        assert_eq!(MAX_BACKOFF, Duration::from_millis(250));
    }
}
