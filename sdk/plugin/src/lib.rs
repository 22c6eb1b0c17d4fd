//! Guest SDK for Sluice policy plugins.
//!
//! A Sluice plugin is a WebAssembly component implementing one of three
//! policies defined by the WIT package `sluice:plugin@0.2.0` (see `wit/` in
//! the Sluice repository); this crate builds components against that version:
//!
//! - a [`Router`] picks the queues a published message goes to;
//! - a [`Filter`] accepts, drops or rewrites a message before it enters a queue;
//! - an [`Authorizer`] allows or denies what a client attempts.
//!
//! You implement one plain Rust trait and write one macro line; the WIT
//! bindings stay hidden:
//!
//! ```ignore
//! use sluice_plugin::{Config, Filter, FilterVerdict, Message};
//!
//! struct DropDebug;
//!
//! impl Filter for DropDebug {
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(DropDebug)
//!     }
//!     fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String> {
//!         Ok(match msg.header("level") {
//!             Some("debug") => FilterVerdict::Drop("debug messages are not kept".into()),
//!             _ => FilterVerdict::Accept,
//!         })
//!     }
//! }
//!
//! sluice_plugin::export_filter!(DropDebug);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown` (the Sluice workspace's
//! `.cargo/config.toml` links that target with `wasm-component-ld`, so the
//! output is a component that imports nothing but the Sluice host interface):
//!
//! ```text
//! cargo build --release --target wasm32-unknown-unknown -p my-plugin
//! ```
//!
//! # The sandbox
//!
//! The broker gives a plugin no WASI: no files, clock, network or environment
//! (`std` calls that need them return "unsupported" or panic). Each call runs
//! under a deadline (default 10 ms) and each instance under a memory cap
//! (default 16 MiB). A plugin that traps, panics, loops or runs out of memory
//! is discarded and re-instantiated, which runs [`Router::init`] (or the
//! corresponding `init`) again: keep plugin state derivable from the config.
//!
//! # Authorizers and plugin management
//!
//! When a client loads, replaces or unloads a plugin, an [`Authorizer`] is
//! asked about a [`Resource::Plugin`] carrying a [`PluginRef`]: the plugin's
//! name, its [`PluginKind`] and, for a filter, the queue it is attached to.
//! A filter is managed with [`Action::Admin`]; the tenant-wide router and
//! authorizer with [`Action::ManagePolicy`], a separate (stronger)
//! permission:
//!
//! ```ignore
//! use sluice_plugin::{Action, PluginKind, PluginRef, Resource};
//!
//! fn ci_may(action: Action, on: &Resource) -> bool {
//!     match (action, on) {
//!         // CI may manage its own filters on its own queues ...
//!         (Action::Admin, Resource::Plugin(PluginRef { name, kind: PluginKind::Filter, queue })) => {
//!             name.starts_with("ci.") && queue.as_deref().is_some_and(|q| q.starts_with("ci."))
//!         }
//!         // ... but never the tenant's router or authorizer.
//!         (Action::ManagePolicy, _) => false,
//!         _ => true,
//!     }
//! }
//! ```
//!
//! Components built against `sluice:plugin@0.1.0` (sluice-plugin 0.1) still
//! load; the broker translates questions for 0.1.0 authorizers (see
//! `docs/wit.md` in the Sluice repository).
//!
//! # State
//!
//! `init` builds your value once per instance; every later call gets `&mut`
//! access to it. An instance handles one call at a time.

#![warn(missing_docs)]

mod config;
mod log;
mod pattern;
mod policy;

#[doc(hidden)]
pub mod __private;

pub use config::Config;
pub use log::{debug, error, info, trace, warn};
pub use pattern::{Pattern, PatternError, matches};
pub use policy::{Authorizer, Filter, Router};

pub use __private::types::{
    Action, Binding, Decision, FilterVerdict, Header, Message, PluginKind, PluginRef, Principal,
    Replacement, Resource, RouteRequest,
};

impl Message {
    /// The value of the first header named `name` (case-sensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of headers named `name`, in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The payload as UTF-8 text, if it is valid UTF-8.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}
