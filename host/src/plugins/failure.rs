//! What went wrong in a plugin call, classified.

use std::fmt;

/// The class of a plugin failure. Traps poison the instance's Store, which is
/// then discarded; the other kinds leave the instance usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The call ran past its deadline (epoch interruption).
    Deadline,
    /// The instance hit its memory cap (or an allocation failed because of it).
    Memory,
    /// The guest panicked or executed `unreachable`.
    Panic,
    /// The guest exhausted its stack.
    StackOverflow,
    /// Any other trap (out-of-bounds access, division by zero, ...).
    Trap,
    /// The plugin returned more than the output bounds allow.
    Output,
    /// The plugin returned an error value (not a trap).
    Guest,
    /// The plugin is marked errored after repeated traps and was not called.
    Errored,
    /// The instance could not be created or initialized.
    Instantiate,
    /// No instance was free within the call deadline, or the broker's
    /// instance pool was full: the broker's bound, not the plugin's fault
    /// (never counted as a trap).
    Capacity,
}

impl FailureKind {
    /// Stable lowercase name, used in metrics labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Panic => "panic",
            FailureKind::StackOverflow => "stack_overflow",
            FailureKind::Trap => "trap",
            FailureKind::Output => "output",
            FailureKind::Guest => "guest_error",
            FailureKind::Errored => "errored",
            FailureKind::Instantiate => "instantiate",
            FailureKind::Capacity => "capacity",
        }
    }

    /// Whether this failure poisoned (and so discarded) the instance.
    pub fn is_trap(self) -> bool {
        matches!(
            self,
            FailureKind::Deadline
                | FailureKind::Memory
                | FailureKind::Panic
                | FailureKind::StackOverflow
                | FailureKind::Trap
        )
    }

    /// Every trap kind, in a fixed order (for metrics).
    pub const TRAPS: [FailureKind; 5] = [
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Panic,
        FailureKind::StackOverflow,
        FailureKind::Trap,
    ];
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed plugin call: its class and a readable message naming the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{plugin}` failed ({kind}): {message}")]
pub struct PluginFailure {
    /// Name of the plugin.
    pub plugin: String,
    /// Class of the failure.
    pub kind: FailureKind,
    /// What happened.
    pub message: String,
}

/// Classify an error returned by wasmtime from a call into a guest.
/// `memory_denied` is whether the Store's limiter refused a memory growth
/// during the call (a Rust guest then aborts via `unreachable`).
pub(crate) fn classify(err: &wasmtime::Error, memory_denied: bool) -> (FailureKind, String) {
    use wasmtime::Trap;
    let kind = match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => FailureKind::Deadline,
        Some(Trap::StackOverflow) => FailureKind::StackOverflow,
        Some(_) if memory_denied => FailureKind::Memory,
        Some(Trap::UnreachableCodeReached) => FailureKind::Panic,
        Some(Trap::AllocationTooLarge) => FailureKind::Memory,
        Some(_) => FailureKind::Trap,
        None if memory_denied => FailureKind::Memory,
        None => FailureKind::Trap,
    };
    let message = match kind {
        FailureKind::Deadline => "call exceeded its deadline".to_string(),
        FailureKind::Memory => "instance exceeded its memory limit".to_string(),
        FailureKind::StackOverflow => "guest stack overflow".to_string(),
        FailureKind::Panic => "guest panicked (wasm `unreachable`)".to_string(),
        _ => format!("{err:#}"),
    };
    (kind, message)
}
