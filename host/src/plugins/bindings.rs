//! Host-side bindings generated from `wit/` (package `sluice:plugin@0.2.0`)
//! and, in [`v0_1`], from `wit/0.1.0/` (package `sluice:plugin@0.1.0`).
//!
//! The shared `types` and `host` interfaces are generated once per version
//! (with the router world) and reused by the filter and authorizer worlds, so
//! a [`Message`] built by the broker can be handed to any policy kind. The
//! broker only ever sees the 0.2.0 types; [`v0_1`] converts them for
//! components built against 0.1.0.

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
    Action, Binding, Decision, FilterVerdict, LogLevel, Message, PluginKind as WitPluginKind,
    PluginRef, Principal, Replacement, Resource, RouteRequest,
};

/// The WIT package this broker implements, as it appears in component
/// import names (`sluice:plugin/host@0.2.0`).
pub const WIT_PACKAGE: &str = "sluice:plugin";
/// The current WIT package version: the one the guest SDK builds against.
pub const WIT_VERSION: &str = "0.2.0";
/// Every WIT package version this broker loads, newest first.
pub const WIT_VERSIONS: [&str; 2] = [WIT_VERSION, v0_1::WIT_VERSION];

/// The contract version a loaded component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// `sluice:plugin@0.1.0`.
    V0_1,
    /// `sluice:plugin@0.2.0`.
    V0_2,
}

impl Abi {
    /// Every ABI, newest first (the order a component without any sluice
    /// import is tried in).
    pub(crate) const ALL: [Abi; 2] = [Abi::V0_2, Abi::V0_1];

    /// The package version, e.g. `0.2.0`.
    pub fn version(self) -> &'static str {
        match self {
            Abi::V0_1 => v0_1::WIT_VERSION,
            Abi::V0_2 => WIT_VERSION,
        }
    }

    /// The ABI whose package version is `version`.
    pub(crate) fn from_version(version: &str) -> Option<Abi> {
        Abi::ALL.into_iter().find(|a| a.version() == version)
    }
}

/// Bindings for `sluice:plugin@0.1.0` (from `wit/0.1.0/`) and conversions
/// between its types and the 0.2.0 ones.
///
/// Messages, routing requests, verdicts, principals, decisions and log levels
/// are the same in both versions, so they convert field by field. An
/// authorization question does not always have a 0.1.0 equivalent: see
/// [`v0_1::questions`].
pub mod v0_1 {
    use super::{Action, Decision, FilterVerdict, LogLevel, Message, Principal, Resource};
    use super::{PluginRef, Replacement, RouteRequest};

    /// The package version of these bindings.
    pub const WIT_VERSION: &str = "0.1.0";

    /// 0.1.0 `router` world; owner of the 0.1.0 shared interfaces.
    pub mod router {
        wasmtime::component::bindgen!({
            world: "router",
            path: "../wit/0.1.0",
            additional_derives: [PartialEq, Eq],
        });
    }

    /// 0.1.0 `filter` world.
    pub mod filter {
        wasmtime::component::bindgen!({
            world: "filter",
            path: "../wit/0.1.0",
            with: {
                "sluice:plugin/types": crate::plugins::bindings::v0_1::router::sluice::plugin::types,
                "sluice:plugin/host": crate::plugins::bindings::v0_1::router::sluice::plugin::host,
            },
        });
    }

    /// 0.1.0 `authorizer` world.
    pub mod authorizer {
        wasmtime::component::bindgen!({
            world: "authorizer",
            path: "../wit/0.1.0",
            with: {
                "sluice:plugin/types": crate::plugins::bindings::v0_1::router::sluice::plugin::types,
                "sluice:plugin/host": crate::plugins::bindings::v0_1::router::sluice::plugin::host,
            },
        });
    }

    pub use router::sluice::plugin::host;
    /// The 0.1.0 data types.
    pub use router::sluice::plugin::types;

    /// A 0.2.0 message as a 0.1.0 one.
    pub fn message(m: &Message) -> types::Message {
        types::Message {
            topic: m.topic.clone(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
            tenant: m.tenant.clone(),
            client: m.client.clone(),
            timestamp_ms: m.timestamp_ms,
            redelivery_count: m.redelivery_count,
        }
    }

    /// A 0.2.0 routing request as a 0.1.0 one.
    pub fn route_request(r: &RouteRequest) -> types::RouteRequest {
        types::RouteRequest {
            msg: message(&r.msg),
            candidates: r.candidates.clone(),
        }
    }

    /// A 0.1.0 verdict as a 0.2.0 one.
    pub fn filter_verdict(v: types::FilterVerdict) -> FilterVerdict {
        match v {
            types::FilterVerdict::Accept => FilterVerdict::Accept,
            types::FilterVerdict::Drop(reason) => FilterVerdict::Drop(reason),
            types::FilterVerdict::Replace(r) => FilterVerdict::Replace(replacement(r)),
        }
    }

    /// A 0.1.0 replacement as a 0.2.0 one.
    pub fn replacement(r: types::Replacement) -> Replacement {
        Replacement {
            headers: r.headers,
            payload: r.payload,
        }
    }

    /// A 0.2.0 principal as a 0.1.0 one.
    pub fn principal(p: &Principal) -> types::Principal {
        types::Principal {
            tenant: p.tenant.clone(),
            client: p.client.clone(),
            subject: p.subject.clone(),
            sans: p.sans.clone(),
            admin: p.admin,
        }
    }

    /// A 0.1.0 decision as a 0.2.0 one.
    pub fn decision(d: types::Decision) -> Decision {
        match d {
            types::Decision::Allow => Decision::Allow,
            types::Decision::Deny(reason) => Decision::Deny(reason),
        }
    }

    /// A 0.1.0 log level as a 0.2.0 one.
    pub fn log_level(l: types::LogLevel) -> LogLevel {
        match l {
            types::LogLevel::Trace => LogLevel::Trace,
            types::LogLevel::Debug => LogLevel::Debug,
            types::LogLevel::Info => LogLevel::Info,
            types::LogLevel::Warn => LogLevel::Warn,
            types::LogLevel::Error => LogLevel::Error,
        }
    }

    /// The 0.1.0 questions a 0.1.0 authorizer is asked for the 0.2.0
    /// question `action` on `on` by `who`. Every one must allow; the first
    /// deny decides.
    ///
    /// - `admin` on `plugin(ref)` → `admin plugin(ref.name)` and, for a
    ///   filter attached to queue `q`, `admin queue(q)`;
    /// - `manage-policy` on `plugin(ref)` → `admin plugin(ref.name)` and
    ///   `admin tenant(<who's tenant>)`;
    /// - `manage-policy` on anything else → `admin` on it;
    /// - every other action and resource maps one to one.
    ///
    /// This fails closed: an old rule that allows `admin` on plugins named
    /// `ci.*` does not let a client replace the tenant's authorizer unless
    /// the authorizer also allows `admin` on the tenant.
    pub fn questions(who: &Principal, action: Action, on: &Resource) -> Vec<Question> {
        match (action, on) {
            (Action::Admin, Resource::Plugin(PluginRef { name, queue, .. })) => {
                let mut asked = vec![(types::Action::Admin, types::Resource::Plugin(name.clone()))];
                if let Some(q) = queue {
                    asked.push((types::Action::Admin, types::Resource::Queue(q.clone())));
                }
                asked
            }
            (Action::ManagePolicy, Resource::Plugin(PluginRef { name, .. })) => vec![
                (types::Action::Admin, types::Resource::Plugin(name.clone())),
                (
                    types::Action::Admin,
                    types::Resource::Tenant(who.tenant.clone()),
                ),
            ],
            (action, on) => vec![(self::action(action), resource(on))],
        }
    }

    /// One 0.1.0 authorization question.
    pub type Question = (types::Action, types::Resource);

    /// A 0.2.0 action as the 0.1.0 one it implies (`manage-policy` is `admin`).
    fn action(a: Action) -> types::Action {
        match a {
            Action::Connect => types::Action::Connect,
            Action::Publish => types::Action::Publish,
            Action::Subscribe => types::Action::Subscribe,
            Action::Declare => types::Action::Declare,
            Action::Bind => types::Action::Bind,
            Action::Delete => types::Action::Delete,
            Action::Purge => types::Action::Purge,
            Action::Admin | Action::ManagePolicy => types::Action::Admin,
        }
    }

    /// A 0.2.0 resource as a 0.1.0 one (a plugin by its name only).
    fn resource(r: &Resource) -> types::Resource {
        match r {
            Resource::Broker => types::Resource::Broker,
            Resource::Queue(q) => types::Resource::Queue(q.clone()),
            Resource::Topic(t) => types::Resource::Topic(t.clone()),
            Resource::Binding(b) => types::Resource::Binding(types::Binding {
                queue: b.queue.clone(),
                pattern: b.pattern.clone(),
            }),
            Resource::Plugin(p) => types::Resource::Plugin(p.name.clone()),
            Resource::Tenant(t) => types::Resource::Tenant(t.clone()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{Binding, WitPluginKind};
        use super::*;

        fn who() -> Principal {
            Principal {
                tenant: "acme".into(),
                client: "ci".into(),
                subject: String::new(),
                sans: vec![],
                admin: false,
            }
        }

        fn plugin(kind: WitPluginKind, queue: Option<&str>) -> Resource {
            Resource::Plugin(PluginRef {
                name: "ci.x".into(),
                kind,
                queue: queue.map(Into::into),
            })
        }

        #[test]
        fn plugin_questions_gain_the_attachment() {
            let admin = types::Action::Admin;
            assert_eq!(
                questions(
                    &who(),
                    Action::Admin,
                    &plugin(WitPluginKind::Filter, Some("ci.jobs"))
                ),
                vec![
                    (admin, types::Resource::Plugin("ci.x".into())),
                    (admin, types::Resource::Queue("ci.jobs".into())),
                ]
            );
            assert_eq!(
                questions(&who(), Action::Admin, &plugin(WitPluginKind::Filter, None)),
                vec![(admin, types::Resource::Plugin("ci.x".into()))]
            );
            for kind in [WitPluginKind::Router, WitPluginKind::Authorizer] {
                assert_eq!(
                    questions(&who(), Action::ManagePolicy, &plugin(kind, None)),
                    vec![
                        (admin, types::Resource::Plugin("ci.x".into())),
                        (admin, types::Resource::Tenant("acme".into())),
                    ]
                );
            }
        }

        #[test]
        fn other_questions_map_one_to_one() {
            let binding = Resource::Binding(Binding {
                queue: "q".into(),
                pattern: "a.>".into(),
            });
            assert_eq!(
                questions(&who(), Action::Bind, &binding),
                vec![(
                    types::Action::Bind,
                    types::Resource::Binding(types::Binding {
                        queue: "q".into(),
                        pattern: "a.>".into()
                    })
                )]
            );
            assert_eq!(
                questions(&who(), Action::Purge, &Resource::Queue("q".into())),
                vec![(types::Action::Purge, types::Resource::Queue("q".into()))]
            );
            assert_eq!(
                questions(&who(), Action::ManagePolicy, &Resource::Broker),
                vec![(types::Action::Admin, types::Resource::Broker)]
            );
        }
    }
}
