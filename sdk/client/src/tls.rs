//! Client identity: a folder with `cert.pem`, `key.pem` and `ca.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ClientError;

/// A client certificate, its key, and the CA that signs the server.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    dir: PathBuf,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let bad = |e: String| ClientError::Identity(format!("{}: {e}", path.display()));
    if !path.exists() {
        return Err(bad(
            "missing (an identity folder holds cert.pem, key.pem and ca.pem)".into(),
        ));
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

impl Identity {
    /// Load `dir/cert.pem`, `dir/key.pem` and `dir/ca.pem`.
    pub fn load(dir: &Path) -> Result<Self, ClientError> {
        let key_path = dir.join("key.pem");
        if !key_path.exists() {
            return Err(ClientError::Identity(format!(
                "{}: missing (an identity folder holds cert.pem, key.pem and ca.pem)",
                key_path.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| ClientError::Identity(format!("{}: {e}", key_path.display())))?;
        Ok(Self {
            chain: certs(&dir.join("cert.pem"))?,
            key,
            roots: certs(&dir.join("ca.pem"))?,
            dir: dir.to_path_buf(),
        })
    }

    /// The folder it came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A QUIC client configuration: TLS 1.3, ALPN `sluice/1`, this client
    /// certificate; a server silent for 10 s is taken for dead.
    pub fn quinn_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        self.quinn_config_with(crate::DEAD_AFTER)
    }

    /// [`Identity::quinn_config`], a server silent for `dead_after` taken
    /// for dead (keep-alives every third of it).
    pub fn quinn_config_with(
        &self,
        dead_after: std::time::Duration,
    ) -> Result<quinn::ClientConfig, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.roots {
            roots
                .add(c.clone())
                .map_err(|e| ClientError::Identity(format!("ca.pem: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Identity(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| ClientError::Identity(format!("cert.pem/key.pem: {e}")))?;
        tls.alpn_protocols = vec![sluice_proto::ALPN.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| ClientError::Identity(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // Notice a dead server in time (a killed process sends no close).
        transport.keep_alive_interval(Some(dead_after / 3));
        // The broker opens one stream per subscription.
        transport.max_concurrent_uni_streams(sluice_proto::MAX_SUBSCRIPTIONS.into());
        transport.max_idle_timeout(Some(
            dead_after
                .try_into()
                .map_err(|e| ClientError::Identity(format!("{e}")))?,
        ));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}
