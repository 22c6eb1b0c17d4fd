//! Work that may block or burn CPU (plugin calls, store syncs) runs off the
//! async workers, charged to its tenant.
//!
//! Every piece of offloaded work is measured in CPU time of the thread
//! that ran it and charged to its tenant as a decaying average
//! ([`CpuUse`]). A tenant within [`BrokerConfig::plugin_cpu_share`] of one
//! core runs on tokio's blocking threads at normal priority. A tenant over
//! it (a spinning plugin, a flood of expensive calls) runs on a few
//! dedicated threads at the lowest priority of the normal scheduling class
//! (nice 19): the scheduler gives every other tenant's work, and the
//! broker's own, twenty times its CPU, yet it never stops entirely.
//! Deadlines (in CPU time) still bound each call; the priority bounds what
//! a tenant's calls cost the others meanwhile.
//!
//! [`BrokerConfig::plugin_cpu_share`]: super::BrokerConfig::plugin_cpu_share

use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::BrokerError;
use super::tenant::Tenant;
use crate::sys::thread_cpu_time;

/// A tenant's recent CPU use of offloaded work: an exponentially decaying
/// sum with a time constant of [`WINDOW`], in CPU-seconds. Work that used
/// `x` of a core for a long time converges to `x × WINDOW`.
#[derive(Debug)]
pub(crate) struct CpuUse {
    seconds: f64,
    at: Instant,
    /// Since when the tenant is over its share (demotion is sticky: it
    /// ends only once use fell to a quarter of the share and a [`STICKY`]
    /// time passed, so a tenant whose work waits at low priority does not
    /// flap back to normal priority meanwhile).
    over_since: Option<Instant>,
}

/// CPU per message (or request) beyond which work counts as a hog: plugin
/// calls cost microseconds; a call that spins to its deadline costs ms.
pub(crate) const HOG_PER_UNIT: Duration = Duration::from_millis(2);

/// How long a demotion lasts at least.
pub(crate) const STICKY: Duration = Duration::from_secs(1);

/// The time constant of [`CpuUse`].
pub(crate) const WINDOW: Duration = Duration::from_millis(250);

impl Default for CpuUse {
    fn default() -> Self {
        Self {
            seconds: 0.0,
            at: Instant::now(),
            over_since: None,
        }
    }
}

impl CpuUse {
    fn decay(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.seconds *= (-dt / WINDOW.as_secs_f64()).exp();
        self.at = now;
    }

    /// Charge `cpu` seconds, for work of `units` messages if it routed
    /// messages. Routing that took more than [`HOG_PER_UNIT`] per message is
    /// a hog (a spinning plugin, not a busy one): the tenant is over its
    /// share at once, without waiting for the average to catch up. An
    /// infinite share turns demotion off, the hog rule included.
    pub(crate) fn charge(&mut self, cpu: f64, units: Option<usize>, share: f64) {
        self.decay();
        self.seconds += cpu;
        if share.is_finite()
            && let Some(units) = units
            && cpu / units.max(1) as f64 > HOG_PER_UNIT.as_secs_f64()
        {
            self.seconds = self.seconds.max(share * WINDOW.as_secs_f64() * 2.0);
            self.over_since = Some(Instant::now());
        }
    }

    /// The share of one core used recently (1.0 = a whole core).
    pub(crate) fn share(&mut self) -> f64 {
        self.decay();
        self.seconds / WINDOW.as_secs_f64()
    }

    /// Whether the tenant is over `share` (with the hysteresis above).
    pub(crate) fn over(&mut self, share: f64) -> bool {
        let now_share = self.share();
        match self.over_since {
            None if now_share > share => {
                self.over_since = Some(Instant::now());
                true
            }
            None => false,
            Some(since) if now_share < share / 4.0 && since.elapsed() >= STICKY => {
                self.over_since = None;
                false
            }
            Some(_) => true,
        }
    }
}

/// What offloaded work is, for its charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Routing and filtering this many messages: charged, and a hog (over
    /// [`HOG_PER_UNIT`] a message) is demoted at once.
    Messages(usize),
    /// A control request (an authorizer call, a store sync): charged.
    Request,
    /// Compiling and starting a plugin: not charged (legitimately heavy,
    /// bounded by the tenant's control slots and the component size).
    Load,
}

type BoxedJob = Box<dyn FnOnce() + Send>;

/// Threads at the lowest CPU priority for tenants over their share.
pub(crate) struct LowPriority {
    tx: Mutex<mpsc::Sender<BoxedJob>>,
}

impl LowPriority {
    /// Start `threads` workers.
    pub(crate) fn start(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<BoxedJob>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("sluice-lowprio-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self { tx: Mutex::new(tx) })
    }

    fn run(&self, job: BoxedJob) -> bool {
        self.tx
            .lock()
            .map(|tx| tx.send(job).is_ok())
            .unwrap_or(false)
    }
}

/// Give the calling thread the lowest priority of the normal scheduling
/// class (nice 19: a twentieth of the CPU of a nice-0 thread it competes
/// with). Not `SCHED_IDLE`: that class runs only when no normal thread
/// wants the CPU, so while other work saturates the machine a demoted
/// tenant would stop entirely (and its calls would run into the wall-clock
/// backstop of their deadlines). Any user may lower its own priority.
fn lower_priority() {
    // SAFETY: `gettid` and `setpriority` take plain integers and touch no
    // memory of ours. On Linux the nice value is per thread.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if r != 0 {
        tracing::warn!("cannot lower the priority of a low-priority plugin thread");
    }
}

/// What the offloaded job running on this thread is: whose, and whether it
/// holds one of that tenant's plugin slots.
struct Job {
    tenant: String,
    plugin_slot: bool,
}

thread_local! {
    /// Set while an offloaded job runs on this thread.
    static JOB: RefCell<Option<Job>> = const { RefCell::new(None) };
}

/// Clears [`JOB`] when the job ends, even by a panic.
struct JobScope;

impl JobScope {
    fn enter(tenant: String, plugin_slot: bool) -> Self {
        JOB.with(|j| {
            *j.borrow_mut() = Some(Job {
                tenant,
                plugin_slot,
            })
        });
        JobScope
    }
}

impl Drop for JobScope {
    fn drop(&mut self) {
        JOB.with(|j| j.borrow_mut().take());
    }
}

/// Counters of the work running for one tenant: plugin calls and control
/// requests, now and at their peak (see [`super::TenantCalls`]).
#[derive(Debug, Default)]
pub(crate) struct Running {
    pub plugin_calls: AtomicU64,
    pub plugin_peak: AtomicU64,
    pub plugin_outside_offload: AtomicU64,
    pub control: AtomicU64,
    pub control_peak: AtomicU64,
}

/// What runs for one tenant now and at most at once since the broker
/// started, for tests and operators ([`super::Broker::tenant_calls`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantCalls {
    /// Plugin calls (router, filter, authorizer, load with compile and
    /// `init`) running now.
    pub plugin_calls_running: u64,
    /// Most plugin calls that ran at once: at most
    /// [`super::BrokerConfig::plugin_concurrency_per_tenant`].
    pub plugin_calls_peak: u64,
    /// Plugin calls made outside the offload pools (on an async worker, or
    /// by a caller of the broker's synchronous API on its own thread).
    pub plugin_calls_outside_offload: u64,
    /// Control requests running now.
    pub control_running: u64,
    /// Most control requests that ran at once: at most
    /// [`super::BrokerConfig::control_concurrency_per_tenant`].
    pub control_peak: u64,
}

impl Running {
    pub(crate) fn snapshot(&self) -> TenantCalls {
        TenantCalls {
            plugin_calls_running: self.plugin_calls.load(Relaxed),
            plugin_calls_peak: self.plugin_peak.load(Relaxed),
            plugin_calls_outside_offload: self.plugin_outside_offload.load(Relaxed),
            control_running: self.control.load(Relaxed),
            control_peak: self.control_peak.load(Relaxed),
        }
    }
}

/// Counts one running unit of work in `now`/`peak` while alive.
pub(crate) struct Count<'a> {
    now: &'a AtomicU64,
}

impl<'a> Count<'a> {
    pub(crate) fn start(now: &'a AtomicU64, peak: &AtomicU64) -> Self {
        let n = now.fetch_add(1, Relaxed) + 1;
        peak.fetch_max(n, Relaxed);
        Count { now }
    }
}

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.now.fetch_sub(1, Relaxed);
    }
}

/// One plugin call of a tenant, while it runs (see [`Tenant::plugin_call`]).
pub(crate) struct PluginCall<'a> {
    _count: Count<'a>,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
    /// Whether the call runs inside [`offload`] (off the async workers).
    pub offloaded: bool,
}

impl Tenant {
    /// Enter a call into one of this tenant's plugins. The call runs in one
    /// of the tenant's plugin slots: the one the offloaded job holds, or one
    /// taken now if it is free (a plugin attached while a request that did
    /// not expect one ran). With every slot taken the call is refused:
    /// waiting here would hold a thread that the slot's holder may need.
    /// Calls made outside [`offload`] are counted.
    pub(crate) fn plugin_call(&self) -> Result<PluginCall<'_>, String> {
        let (offloaded, holds) = JOB.with(|j| match &*j.borrow() {
            Some(job) => (true, job.plugin_slot && job.tenant == self.name),
            None => (false, false),
        });
        if !offloaded {
            self.running.plugin_outside_offload.fetch_add(1, Relaxed);
        }
        let permit = if holds {
            None
        } else {
            match self.plugin_slots.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => {
                    return Err(format!(
                        "every plugin slot of tenant `{}` is busy (its plugins changed while this \
                         request ran); try again",
                        self.name
                    ));
                }
            }
        };
        Ok(PluginCall {
            _count: Count::start(&self.running.plugin_calls, &self.running.plugin_peak),
            _permit: permit,
            offloaded,
        })
    }
}

/// Run `f` for `tenant` off the async workers: at normal priority while the
/// tenant is within `share` of a core, at the lowest priority beyond.
/// Its CPU time is charged to the tenant. `slot`, one of the tenant's
/// plugin slots, is held until `f` returns; plugin calls in `f` run in it.
pub(crate) async fn offload<T: Send + 'static>(
    tenant: &Tenant,
    share: f64,
    low: &LowPriority,
    work: Work,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BrokerError> {
    let over = tenant.cpu().over(share);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = tenant.name.clone();
    let job = move || {
        let scope = JobScope::enter(name, slot.is_some());
        let start = thread_cpu_time();
        let out = f();
        let used = thread_cpu_time().saturating_sub(start);
        drop(scope);
        drop(slot);
        let _ = tx.send((out, used));
    };
    if tenant.set_demoted(over) {
        tenant.log_limited(|| {
            if over {
                tracing::info!(tenant = %tenant.name, share, "tenant over its plugin CPU share: its work runs at the lowest priority")
            } else {
                tracing::info!(tenant = %tenant.name, "tenant back within its plugin CPU share")
            }
        });
    }
    if over {
        if !low.run(Box::new(job)) {
            return Err(BrokerError::ShuttingDown);
        }
        tenant
            .demoted_jobs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    } else {
        tokio::task::spawn_blocking(job);
    }
    let (out, used) = rx
        .await
        .map_err(|_| BrokerError::Conflict("offloaded work failed".into()))?;
    match work {
        Work::Messages(n) => tenant.cpu().charge(used.as_secs_f64(), Some(n), share),
        Work::Request => tenant.cpu().charge(used.as_secs_f64(), None, share),
        Work::Load => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_decays_and_demotion_is_sticky() {
        let mut c = CpuUse::default();
        c.charge(WINDOW.as_secs_f64() * 0.5, None, 0.5);
        assert!((c.share() - 0.5).abs() < 0.05, "{}", c.share());
        assert!(!c.over(0.6));
        assert!(c.over(0.4));
        // Use falls, but the demotion holds for STICKY.
        c.at -= WINDOW * 8;
        assert!(c.share() < 0.01);
        assert!(c.over(0.4));
        c.over_since = c.over_since.map(|t| t - STICKY);
        assert!(!c.over(0.4));
        // One spinning call is enough.
        c.charge(0.010, Some(1), 0.4);
        assert!(c.over(0.4));
    }

    /// The nice value of the calling thread.
    fn nice() -> i32 {
        // SAFETY: plain integers in and out. -1 is a valid nice value, so
        // errno tells an error apart (reset first).
        unsafe {
            *libc::__errno_location() = 0;
            let n = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
            assert_eq!(*libc::__errno_location(), 0, "getpriority failed");
            n
        }
    }

    /// Jobs of a demoted tenant run at nice 19 (the real value of the
    /// thread that runs them), and the threads that start them are not
    /// lowered.
    #[test]
    fn low_priority_threads_run_at_nice_19() {
        let before = nice();
        let low = LowPriority::start(2).unwrap();
        let (tx, rx) = mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            assert!(low.run(Box::new(move || {
                let _ = tx.send(nice());
            })));
        }
        for _ in 0..4 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 19);
        }
        assert_eq!(nice(), before, "only the pool's own threads are lowered");
    }

    #[test]
    fn an_infinite_share_never_demotes() {
        let mut c = CpuUse::default();
        for _ in 0..100 {
            c.charge(0.5, Some(1), f64::INFINITY);
        }
        assert!(!c.over(f64::INFINITY));
        assert!(c.share().is_finite());
    }
}
