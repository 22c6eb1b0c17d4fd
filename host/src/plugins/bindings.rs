//! Host-side bindings generated from `wit/` (package `sluice:plugin@0.1.0`).
//!
//! The shared `types` and `host` interfaces are generated once (with the
//! router world) and reused by the filter and authorizer worlds, so a
//! [`Message`] built by the broker can be handed to any policy kind.

/// Bindings for the `router` world; owner of the shared interfaces.
pub mod router {
    wasmtime::component::bindgen!({
        world: "router",
        path: "../wit",
        additional_derives: [PartialEq, Eq],
    });
}

/// Bindings for the `filter` world.
pub mod filter {
    wasmtime::component::bindgen!({
        world: "filter",
        path: "../wit",
        with: {
            "sluice:plugin/types": crate::plugins::bindings::router::sluice::plugin::types,
            "sluice:plugin/host": crate::plugins::bindings::router::sluice::plugin::host,
        },
    });
}

/// Bindings for the `authorizer` world.
pub mod authorizer {
    wasmtime::component::bindgen!({
        world: "authorizer",
        path: "../wit",
        with: {
            "sluice:plugin/types": crate::plugins::bindings::router::sluice::plugin::types,
            "sluice:plugin/host": crate::plugins::bindings::router::sluice::plugin::host,
        },
    });
}

pub use router::sluice::plugin::host;
pub use router::sluice::plugin::types::{
    Action, Binding, Decision, FilterVerdict, LogLevel, Message, Principal, Replacement, Resource,
    RouteRequest,
};

/// The WIT package this broker implements, as it appears in component
/// import names (`sluice:plugin/host@0.1.0`).
pub const WIT_PACKAGE: &str = "sluice:plugin";
/// The WIT package version this broker implements.
pub const WIT_VERSION: &str = "0.1.0";
