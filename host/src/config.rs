//! Server configuration: `sluice.toml`, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::IdentityMapping;

/// The `sluice.toml` file. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on (default 127.0.0.1:7600).
    pub listen: Option<SocketAddr>,
    /// Data directory (default ./sluice-data).
    pub data: Option<PathBuf>,
    /// Certificate folder as written by `sluice certs init` (default <data>/certs).
    pub certs: Option<PathBuf>,
    /// Prometheus metrics address (default: none).
    pub metrics: Option<SocketAddr>,
    /// TLS files, overriding the ones in `certs`.
    #[serde(default)]
    pub tls: TlsFiles,
    /// Certificate → identity mapping.
    #[serde(default)]
    pub identity: IdentityMapping,
    /// Largest message in bytes (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// Plugin call deadline in milliseconds (default 10).
    pub plugin_deadline_ms: Option<u64>,
    /// Plugin memory cap in MiB (default 16).
    pub plugin_memory_mib: Option<usize>,
    /// Refuse clients of tenants not registered here or with `sluice tenant
    /// create` (default false: a tenant is registered at its first connection).
    pub strict_tenants: Option<bool>,
    /// Concurrent plugin tasks per tenant (default 1).
    pub plugin_concurrency_per_tenant: Option<usize>,
    /// Tenants registered (or updated) at start, with their quotas.
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
}

impl FileConfig {
    /// Read and parse a config file; errors name the file, key and problem.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|span| {
                let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                format!(", line {line_no} (`{line}`)")
            });
            anyhow::anyhow!(
                "{}{}: {}",
                path.display(),
                at.unwrap_or_default(),
                e.message()
            )
        })
    }
}

/// `[tls]`: explicit certificate files. Unset keys come from the `certs`
/// folder layout (`ca.pem`, `*.crl.pem`, `server/cert.pem`, `server/key.pem`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificates (PEM) that client certificates must chain to.
    pub ca: Option<Vec<PathBuf>>,
    /// Certificate revocation lists (PEM).
    pub crls: Option<Vec<PathBuf>>,
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any file is set explicitly.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.crls.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The server's files: these keys over the `certs` folder layout.
    pub fn resolve(&self, certs: &Path) -> crate::tls::ServerTlsFiles {
        let mut files = crate::tls::ServerTlsFiles::from_dir(certs);
        if let Some(ca) = &self.ca {
            files.ca = ca.clone();
        }
        if let Some(crls) = &self.crls {
            files.crls = crls.clone();
        }
        if let Some(cert) = &self.cert {
            files.cert = cert.clone();
        }
        if let Some(key) = &self.key {
            files.key = key.clone();
        }
        files
    }
}

/// `[[tenants]]`: a tenant and its quotas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    /// Tenant name.
    pub name: String,
    /// Quotas: `max_connections`, `max_queues`, `max_stored_bytes`,
    /// `max_publish_rate`, `max_message_bytes` (unset: unlimited).
    #[serde(default)]
    pub limits: crate::broker::TenantLimits,
}
