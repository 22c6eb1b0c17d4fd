//! The QUIC listener: accepts connections and runs a session for each.
//!
//! What a connection is served by is a [`Serving`]: one broker for a
//! single node; on a cluster node it follows the node's role (its broker
//! while it leads, a `not_leader` refusal naming the leader otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::watch;

use crate::broker::Broker;
use crate::session;
use crate::tls::IdentityMapping;

/// What serves new connections.
#[derive(Clone)]
pub enum Serving {
    /// This broker.
    Broker(Broker),
    /// Nothing here: refuse with `not_leader`, naming the leader's client
    /// address when it is known.
    NotLeader(Option<String>),
}

/// A listening broker endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
    serving: watch::Receiver<Serving>,
    max_connections: u64,
    mapping: Arc<IdentityMapping>,
}

impl Server {
    /// Bind `addr` with `tls` (from [`crate::tls::server_config`]) for
    /// one broker.
    pub fn bind(
        addr: SocketAddr,
        tls: quinn::ServerConfig,
        broker: Broker,
        mapping: IdentityMapping,
    ) -> std::io::Result<Self> {
        let max_connections = broker.config().max_connections;
        // The receiver keeps the value after the sender is gone.
        let (_, serving) = watch::channel(Serving::Broker(broker));
        Self::bind_serving(addr, tls, serving, max_connections, mapping)
    }

    /// Bind `addr` for whatever `serving` holds when a connection arrives
    /// (a cluster node's role), with at most `max_connections` at once.
    pub fn bind_serving(
        addr: SocketAddr,
        tls: quinn::ServerConfig,
        serving: watch::Receiver<Serving>,
        max_connections: u64,
        mapping: IdentityMapping,
    ) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::server(tls, addr)?;
        Ok(Self {
            endpoint,
            serving,
            max_connections,
            mapping: Arc::new(mapping),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accept connections until [`Server::close`] (or the endpoint closes).
    /// Beyond the broker's `max_connections` QUIC connections (handshaking,
    /// refused but not yet closed, or in a session), new ones are refused
    /// before any TLS work is done for them.
    pub async fn run(&self) {
        let open = Arc::new(AtomicU64::new(0));
        while let Some(incoming) = self.endpoint.accept().await {
            let max = self.max_connections;
            if open.load(Relaxed) >= max {
                tracing::debug!(
                    max,
                    "refusing a connection: the broker is at max_connections"
                );
                incoming.refuse();
                continue;
            }
            let serving = self.serving.borrow().clone();
            let mapping = self.mapping.clone();
            open.fetch_add(1, Relaxed);
            let open = open.clone();
            tokio::spawn(async move {
                match (incoming.await, serving) {
                    (Ok(conn), Serving::Broker(broker)) => {
                        session::run(conn, broker, &mapping).await
                    }
                    (Ok(conn), Serving::NotLeader(leader)) => {
                        session::refuse_not_leader(conn, leader).await
                    }
                    // A refused certificate ends here (alert 116 / 48).
                    (Err(e), _) => tracing::debug!(error = %e, "handshake failed"),
                }
                open.fetch_sub(1, Relaxed);
            });
        }
    }

    /// Replace the TLS configuration for new connections (e.g. new CRLs).
    pub fn set_tls(&self, tls: quinn::ServerConfig) {
        self.endpoint.set_server_config(Some(tls));
    }

    /// Stop accepting and close every connection with code 0 ("shutdown").
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server shutting down");
    }

    /// Wait until every connection is closed.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}
