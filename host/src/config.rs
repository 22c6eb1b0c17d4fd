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
    /// Certificate → identity mapping.
    #[serde(default)]
    pub identity: IdentityMapping,
    /// Largest message in bytes (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// Plugin call deadline in milliseconds (default 10).
    pub plugin_deadline_ms: Option<u64>,
    /// Plugin memory cap in MiB (default 16).
    pub plugin_memory_mib: Option<usize>,
}

impl FileConfig {
    /// Read and parse a config file; errors name the file, key and problem.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " "))
        })
    }
}
