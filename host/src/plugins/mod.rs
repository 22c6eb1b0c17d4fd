//! The plugin runtime: sandboxed WebAssembly components that route, filter
//! and authorize messages.
//!
//! # Model
//!
//! A plugin is a component targeting one world of `wit/` (package
//! `sluice:plugin@0.2.0`, or the older `sluice:plugin@0.1.0` kept in
//! `wit/0.1.0/`): [`PluginKind::Router`], [`PluginKind::Filter`] or
//! [`PluginKind::Authorizer`]. A [`PluginRuntime`] owns one wasmtime
//! [`Engine`](wasmtime::Engine) configured for confinement:
//!
//! - **No WASI, nothing ambient.** The linker offers only the `host` and
//!   `types` interfaces of both versions; a component importing anything else
//!   is refused at load with an error naming the import
//!   ([`LoadError::ForbiddenImport`]).
//! - **Deadlines** in CPU time, by epoch interruption: a ticker thread
//!   advances the epoch every [`SandboxConfig::epoch_tick`]; every call gets
//!   [`SandboxConfig::call_deadline`] of its thread's CPU time (a call waiting
//!   for a core is not stopped for it), with a wall-clock backstop of 100×.
//! - **Memory caps** per instance, enforced by a Store limiter, on top of a
//!   pooling allocator sized by [`SandboxConfig::pool_instances`].
//! - **Bounded output**: results larger than [`OutputLimits`] are refused.
//!
//! [`PluginRuntime::load`] checks and compiles a component (compiled
//! artifacts are cached on disk), instantiates it once to run `init`, and
//! returns a [`Plugin`]. A plugin keeps a few warm instances, each in its own
//! Store, and reuses them call after call. Any trap poisons a Store, so the
//! instance is discarded and the next call builds a fresh one (running `init`
//! again). After [`SandboxConfig::trap_threshold`] consecutive traps the
//! plugin is marked errored and refuses calls until it is reloaded.
//!
//! **Versions.** A component's sluice imports must all name 0.2.0 or all
//! name 0.1.0 ([`Abi`]); [`Plugin::abi`] tells which. A 0.1.0 component is
//! instantiated with its own typed bindings and its values are converted, so
//! the [`Plugin`] API speaks 0.2.0 types only. A 0.1.0 authorizer gets 0.2.0
//! questions translated to 0.1.0 ones, failing closed (see
//! [`Plugin::authorize`]).
//!
//! Failures are classified ([`FailureKind`]) and counted per plugin
//! ([`PluginMetrics`]); guest log lines reach `tracing` under the target
//! `sluice::plugin` with `tenant` and `plugin` fields.
//!
//! A [`PluginRegistry`] maps `(tenant, name)` to the current version of a
//! plugin; installing a new version swaps it atomically while calls in flight
//! finish on the old one.

mod bindings;
mod budget;
mod cache;
mod engine;
mod failure;
mod inspect;
mod metrics;
mod plugin;
mod registry;
mod runtime;
mod sandbox;
mod store;

pub use bindings::{
    Abi, Action, Binding, Decision, FilterVerdict, LogLevel, Message, PluginRef, Principal,
    Replacement, Resource, RouteRequest, WIT_PACKAGE, WIT_VERSION, WIT_VERSIONS, WitPluginKind,
};
pub use failure::{FailureKind, PluginFailure};
pub use metrics::{LATENCY_BUCKETS_US, MetricsSnapshot, PluginMetrics};
pub use plugin::{Plugin, PluginState};
pub use registry::PluginRegistry;
pub use runtime::{PluginRuntime, PluginSpec, RuntimeError};
pub use sandbox::{OutputLimits, SandboxConfig};
pub use store::PluginId;
pub(crate) use store::truncate;

use std::fmt;
use std::str::FromStr;

/// The policy a plugin implements (its WIT world).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Chooses target queues (`world router`).
    Router,
    /// Accepts, drops or rewrites messages for a queue (`world filter`).
    Filter,
    /// Allows or denies actions (`world authorizer`).
    Authorizer,
}

impl PluginKind {
    /// All kinds.
    pub const ALL: [PluginKind; 3] = [
        PluginKind::Router,
        PluginKind::Filter,
        PluginKind::Authorizer,
    ];

    /// Lowercase name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Router => "router",
            PluginKind::Filter => "filter",
            PluginKind::Authorizer => "authorizer",
        }
    }

    /// The authorization question for loading, replacing or unloading the
    /// plugin `name` of this kind (attached to `queue` if a filter):
    /// [`Action::Admin`] on a filter, [`Action::ManagePolicy`] on the
    /// tenant-wide router or authorizer, on [`Resource::Plugin`] with the
    /// kind and queue.
    pub fn management_question(self, name: &str, queue: Option<String>) -> (Action, Resource) {
        let action = match self {
            PluginKind::Filter => Action::Admin,
            PluginKind::Router | PluginKind::Authorizer => Action::ManagePolicy,
        };
        let resource = Resource::Plugin(PluginRef {
            name: name.into(),
            kind: self.into(),
            queue,
        });
        (action, resource)
    }

    /// Functions a component of this kind must export.
    pub(crate) fn exports(self) -> &'static [&'static str] {
        match self {
            PluginKind::Router => &["init", "route", "route-batch"],
            PluginKind::Filter => &["init", "filter", "filter-batch"],
            PluginKind::Authorizer => &["init", "authorize"],
        }
    }
}

impl From<PluginKind> for WitPluginKind {
    fn from(kind: PluginKind) -> Self {
        match kind {
            PluginKind::Router => WitPluginKind::Router,
            PluginKind::Filter => WitPluginKind::Filter,
            PluginKind::Authorizer => WitPluginKind::Authorizer,
        }
    }
}

impl From<WitPluginKind> for PluginKind {
    fn from(kind: WitPluginKind) -> Self {
        match kind {
            WitPluginKind::Router => PluginKind::Router,
            WitPluginKind::Filter => PluginKind::Filter,
            WitPluginKind::Authorizer => PluginKind::Authorizer,
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PluginKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PluginKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown plugin kind `{s}` (expected router, filter or authorizer)")
            })
    }
}

/// Why a component could not be loaded as a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a wasm component.
    #[error("{0}")]
    NotAComponent(String),
    /// Cranelift refused the component.
    #[error("cannot compile the component: {0}")]
    Compile(String),
    /// The component imports something other than the sluice host interface.
    #[error(
        "plugin imports `{import}`, but a Sluice plugin may import only \
         `sluice:plugin/host` (versions 0.2.0 and 0.1.0; no WASI, no other interfaces)"
    )]
    ForbiddenImport {
        /// The offending import name.
        import: String,
    },
    /// The component was built against a version of the contract this
    /// broker does not implement.
    #[error(
        "plugin was built for sluice:plugin@{found} (it imports `{import}`), but this broker \
         implements sluice:plugin@0.2.0 and sluice:plugin@0.1.0: rebuild it against \
         sluice-plugin 0.2 (sluice:plugin@0.2.0)"
    )]
    WrongVersion {
        /// Version the component names.
        found: String,
        /// The import that names it.
        import: String,
    },
    /// The component imports sluice interfaces of more than one version.
    #[error(
        "plugin mixes contract versions: it imports `{first}` and `{second}`; all sluice:plugin \
         imports must be of one version (0.2.0 or 0.1.0)"
    )]
    MixedVersions {
        /// An import of one version.
        first: String,
        /// An import of another version.
        second: String,
    },
    /// The component does not export the functions of the requested kind.
    #[error(
        "not a {expected} plugin: it does not export {missing}{}; its exports are: {exports}",
        looks_like.map(|k| format!(" (it looks like a {k} plugin: use --kind {k})")).unwrap_or_default()
    )]
    WrongKind {
        /// The kind asked for.
        expected: PluginKind,
        /// Missing export names, comma separated.
        missing: String,
        /// The kind whose exports the component does have, if any.
        looks_like: Option<PluginKind>,
        /// What the component exports.
        exports: String,
    },
    /// The component's functions have other types than the contract.
    #[error(
        "plugin does not match the sluice:plugin@{version} {kind} world (built against another \
         version of the contract?): {message}"
    )]
    Link {
        /// The kind asked for.
        kind: PluginKind,
        /// The contract version it was checked against.
        version: &'static str,
        /// wasmtime's explanation.
        message: String,
    },
    /// `init` returned an error or trapped.
    #[error("plugin init failed ({}): {}", .0.kind, .0.message)]
    Init(PluginFailure),
    /// Loading it would take its tenant or the broker over a plugin limit
    /// (instances, memory, compiled code): the broker's bound, not the
    /// plugin's fault.
    #[error("plugin limit reached: {0}")]
    Capacity(String),
}
