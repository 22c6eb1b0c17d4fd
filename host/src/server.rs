//! The QUIC listener: accepts connections and runs a session for each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::broker::Broker;
use crate::session;
use crate::tls::IdentityMapping;

/// A listening broker endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
    broker: Broker,
    mapping: Arc<IdentityMapping>,
}

impl Server {
    /// Bind `addr` with `tls` (from [`crate::tls::server_config`]).
    pub fn bind(
        addr: SocketAddr,
        tls: quinn::ServerConfig,
        broker: Broker,
        mapping: IdentityMapping,
    ) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::server(tls, addr)?;
        Ok(Self {
            endpoint,
            broker,
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
            let max = self.broker.config().max_connections;
            if open.load(Relaxed) >= max {
                tracing::debug!(
                    max,
                    "refusing a connection: the broker is at max_connections"
                );
                incoming.refuse();
                continue;
            }
            let (broker, mapping) = (self.broker.clone(), self.mapping.clone());
            open.fetch_add(1, Relaxed);
            let open = open.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => session::run(conn, broker, &mapping).await,
                    // A refused certificate ends here (alert 116 / 48).
                    Err(e) => tracing::debug!(error = %e, "handshake failed"),
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
