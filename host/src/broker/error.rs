//! Broker errors, each with a stable code for the wire.

use crate::plugins::{LoadError, PluginFailure};
use crate::store::StoreError;

/// Why the broker refused or failed a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The principal may not do this.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A name is malformed.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid (queue name, pattern, ...).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The named object does not exist.
    #[error("{what} `{name}` not found")]
    NotFound {
        /// Kind of object.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The object exists with other settings.
    #[error("{0}")]
    Conflict(String),
    /// No queue matched the topic (or the router chose none).
    #[error("no route for topic `{0}`")]
    NoRoute(String),
    /// A queue is full and refuses publishes.
    #[error("queue `{0}` is full (max-length reached, overflow=reject-publish)")]
    QueueFull(String),
    /// A limit was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A tenant quota was exceeded.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// A router plugin rejected the publish or failed.
    #[error("router refused the message: {0}")]
    Router(String),
    /// A plugin could not be loaded.
    #[error("plugin load failed: {0}")]
    PluginLoad(#[from] LoadError),
    /// Storage failed; nothing was confirmed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl BrokerError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        BrokerError::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        BrokerError::NotFound {
            what,
            name: name.into(),
        }
    }

    pub(crate) fn router(f: &PluginFailure) -> Self {
        BrokerError::Router(format!("{} ({}): {}", f.plugin, f.kind, f.message))
    }
}
