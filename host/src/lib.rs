//! Sluice: a message broker whose routing, filtering and authorization are
//! sandboxed WebAssembly components.
//!
//! This crate is the broker library behind the `sluice` binary. Data flows
//! one way: connection ([`server`]) → session → [`broker`] → [`store`].
//! Modules, one home per concept:
//!
//! - [`plugins`]: the wasm plugin runtime (sandbox, compile cache, typed calls,
//!   failure classification, metrics, hot swap);
//! - [`broker`]: tenants, queues, bindings, routing through plugins, consumers;
//! - [`store`]: durable queues and metadata on sled, with group commit;
//! - [`cluster`]: replication on openraft (today: the Raft log and the
//!   metadata state machine on sled);
//! - [`tls`]: QUIC/TLS setup, identities from certificates, dev certificates;
//! - [`server`] (with the private `session`): the QUIC listener and one
//!   session per connection;
//! - [`metrics`]: the Prometheus endpoint;
//! - [`config`]: the `sluice.toml` file;
//! - [`cli`]: the `sluice` command line;
//! - [`bundled`]: the example and test plugins from `plugins/`, built at
//!   compile time.

#![warn(missing_docs)]

pub mod broker;
pub mod bundled;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod plugins;
pub mod server;
pub mod session;
pub mod store;
mod sys;
pub mod tls;
