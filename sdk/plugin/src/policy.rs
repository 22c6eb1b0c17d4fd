//! The three policy traits a plugin author implements.

use crate::{Action, Config, Decision, FilterVerdict, Message, Principal, Resource, RouteRequest};

/// A routing policy. Export it with [`export_router!`](crate::export_router).
pub trait Router: Sized + 'static {
    /// Build the router from its configuration. An error refuses the load
    /// with that message.
    fn init(config: Config) -> Result<Self, String>;

    /// Return the final target queues for `msg`. `candidates` are the queues
    /// whose bindings matched the topic. An empty list means "no route"; an
    /// error rejects the publish with that reason.
    fn route(&mut self, msg: &Message, candidates: Vec<String>) -> Result<Vec<String>, String>;

    /// Route many messages in one call. The default calls [`Router::route`]
    /// for each request.
    fn route_batch(&mut self, requests: Vec<RouteRequest>) -> Vec<Result<Vec<String>, String>> {
        requests
            .into_iter()
            .map(|r| self.route(&r.msg, r.candidates))
            .collect()
    }
}

/// A filter attached to a queue. Export it with [`export_filter!`](crate::export_filter).
pub trait Filter: Sized + 'static {
    /// Build the filter from its configuration. An error refuses the load
    /// with that message.
    fn init(config: Config) -> Result<Self, String>;

    /// Accept, drop or replace `msg`. An error dead-letters the message with
    /// that reason.
    fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String>;

    /// Filter many messages in one call. The default calls
    /// [`Filter::filter`] for each message.
    fn filter_batch(&mut self, msgs: Vec<Message>) -> Vec<Result<FilterVerdict, String>> {
        msgs.iter().map(|m| self.filter(m)).collect()
    }
}

/// An authorization policy for a tenant. Export it with
/// [`export_authorizer!`](crate::export_authorizer).
///
/// The broker enforces the tenant boundary before calling the plugin: an
/// authorizer only ever sees actions inside its own tenant.
pub trait Authorizer: Sized + 'static {
    /// Build the authorizer from its configuration. An error refuses the load
    /// with that message.
    fn init(config: Config) -> Result<Self, String>;

    /// Allow or deny `action` by `who` on `resource`.
    fn authorize(&mut self, who: &Principal, action: Action, resource: &Resource) -> Decision;
}
