//! Generated WIT bindings and the glue used by the export macros.
//!
//! Nothing here is a stable API: use the traits and macros at the crate root.

use std::any::Any;
use std::cell::RefCell;

/// Bindings for the `router` world. The shared `types` and `host` interfaces
/// are generated here once and reused by the other worlds.
#[allow(clippy::too_many_arguments)]
pub mod router {
    wit_bindgen::generate!({
        world: "router",
        path: "../../wit",
        default_bindings_module: "sluice_plugin::__private::router",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        additional_derives: [PartialEq, Eq],
    });
}

/// Bindings for the `filter` world.
#[allow(clippy::too_many_arguments)]
pub mod filter {
    wit_bindgen::generate!({
        world: "filter",
        path: "../../wit",
        default_bindings_module: "sluice_plugin::__private::filter",
        pub_export_macro: true,
        export_macro_name: "__export_filter_world",
        with: {
            "sluice:plugin/types@0.2.0": crate::__private::types,
            "sluice:plugin/host@0.2.0": crate::__private::host,
        },
    });
}

/// Bindings for the `authorizer` world.
#[allow(clippy::too_many_arguments)]
pub mod authorizer {
    wit_bindgen::generate!({
        world: "authorizer",
        path: "../../wit",
        default_bindings_module: "sluice_plugin::__private::authorizer",
        pub_export_macro: true,
        export_macro_name: "__export_authorizer_world",
        with: {
            "sluice:plugin/types@0.2.0": crate::__private::types,
            "sluice:plugin/host@0.2.0": crate::__private::host,
        },
    });
}

pub use router::sluice::plugin::{host, types};

thread_local! {
    /// The plugin's state, built by `init`. A component instance is single
    /// threaded and holds exactly one policy, so one slot suffices.
    static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Prefix of the log line a panicking plugin writes just before it traps.
pub const PANIC_PREFIX: &str = "panic: ";

/// Message returned when a policy function runs before a successful `init`.
pub const NOT_INITIALIZED: &str = "plugin not initialized: init was not called or failed";

/// Run the author's `init` and keep its value as the plugin state.
///
/// Also installs a panic hook that reports the panic message to the broker
/// (there is no stderr in the sandbox), so a panicking plugin is reported
/// with its message rather than as a bare trap.
pub fn init<T: 'static>(build: impl FnOnce() -> Result<T, String>) -> Result<(), String> {
    std::panic::set_hook(Box::new(|info| {
        host::log(types::LogLevel::Error, &format!("{PANIC_PREFIX}{info}"));
    }));
    STATE.with(|s| *s.borrow_mut() = None);
    let value = build()?;
    STATE.with(|s| *s.borrow_mut() = Some(Box::new(value)));
    Ok(())
}

/// Run `f` on the plugin state, or return [`NOT_INITIALIZED`].
pub fn with_state<T: 'static, R>(f: impl FnOnce(&mut T) -> R) -> Result<R, String> {
    STATE.with(|s| {
        let mut slot = s.borrow_mut();
        match slot.as_mut().and_then(|b| b.downcast_mut::<T>()) {
            Some(state) => Ok(f(state)),
            None => Err(NOT_INITIALIZED.to_string()),
        }
    })
}

/// Export a [`Router`](crate::Router) implementation as the component's
/// `router` world.
#[macro_export]
macro_rules! export_router {
    ($ty:ty) => {
        const _: () = {
            struct __SluiceRouter;
            impl $crate::__private::router::Guest for __SluiceRouter {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(|| {
                        <$ty as $crate::Router>::init($crate::Config::new(config))
                    })
                }
                fn route(
                    msg: $crate::Message,
                    candidates: ::std::vec::Vec<::std::string::String>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<::std::string::String>,
                    ::std::string::String,
                > {
                    $crate::__private::with_state(|s: &mut $ty| {
                        <$ty as $crate::Router>::route(s, &msg, candidates)
                    })
                    .and_then(|r| r)
                }
                fn route_batch(
                    requests: ::std::vec::Vec<$crate::RouteRequest>,
                ) -> ::std::vec::Vec<
                    ::std::result::Result<
                        ::std::vec::Vec<::std::string::String>,
                        ::std::string::String,
                    >,
                > {
                    let n = requests.len();
                    $crate::__private::with_state(|s: &mut $ty| {
                        <$ty as $crate::Router>::route_batch(s, requests)
                    })
                    .unwrap_or_else(|e| ::std::vec![::std::result::Result::Err(e); n])
                }
            }
            $crate::__private::router::__export_router_world!(
                __SluiceRouter with_types_in $crate::__private::router
            );
        };
    };
}

/// Export a [`Filter`](crate::Filter) implementation as the component's
/// `filter` world.
#[macro_export]
macro_rules! export_filter {
    ($ty:ty) => {
        const _: () = {
            struct __SluiceFilter;
            impl $crate::__private::filter::Guest for __SluiceFilter {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(|| {
                        <$ty as $crate::Filter>::init($crate::Config::new(config))
                    })
                }
                fn filter(
                    msg: $crate::Message,
                ) -> ::std::result::Result<$crate::FilterVerdict, ::std::string::String> {
                    $crate::__private::with_state(|s: &mut $ty| {
                        <$ty as $crate::Filter>::filter(s, &msg)
                    })
                    .and_then(|r| r)
                }
                fn filter_batch(
                    msgs: ::std::vec::Vec<$crate::Message>,
                ) -> ::std::vec::Vec<
                    ::std::result::Result<$crate::FilterVerdict, ::std::string::String>,
                > {
                    let n = msgs.len();
                    $crate::__private::with_state(|s: &mut $ty| {
                        <$ty as $crate::Filter>::filter_batch(s, msgs)
                    })
                    .unwrap_or_else(|e| ::std::vec![::std::result::Result::Err(e); n])
                }
            }
            $crate::__private::filter::__export_filter_world!(
                __SluiceFilter with_types_in $crate::__private::filter
            );
        };
    };
}

/// Export an [`Authorizer`](crate::Authorizer) implementation as the
/// component's `authorizer` world.
#[macro_export]
macro_rules! export_authorizer {
    ($ty:ty) => {
        const _: () = {
            struct __SluiceAuthorizer;
            impl $crate::__private::authorizer::Guest for __SluiceAuthorizer {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init(|| {
                        <$ty as $crate::Authorizer>::init($crate::Config::new(config))
                    })
                }
                fn authorize(
                    who: $crate::Principal,
                    what: $crate::Action,
                    on: $crate::Resource,
                ) -> $crate::Decision {
                    $crate::__private::with_state(|s: &mut $ty| {
                        <$ty as $crate::Authorizer>::authorize(s, &who, what, &on)
                    })
                    .unwrap_or_else($crate::Decision::Deny)
                }
            }
            $crate::__private::authorizer::__export_authorizer_world!(
                __SluiceAuthorizer with_types_in $crate::__private::authorizer
            );
        };
    };
}
