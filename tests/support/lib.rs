//! Shared helpers for the end-to-end tests in `tests/`.

pub mod program;
pub mod provision;
pub mod raw;

use std::time::Duration;

use sluice::plugins::{Message, Plugin, PluginKind, PluginRuntime, PluginSpec, SandboxConfig};

/// A sandbox config for functional tests: the default limits, but a generous
/// call deadline so a loaded CI machine never turns a correct call into a
/// deadline trap. Tests of the deadline itself set their own.
pub fn relaxed() -> SandboxConfig {
    SandboxConfig {
        call_deadline: Duration::from_secs(2),
        init_deadline: Duration::from_secs(2),
        pool_instances: 32,
        ..SandboxConfig::default()
    }
}

/// A runtime with `config`.
pub fn runtime(config: SandboxConfig) -> PluginRuntime {
    PluginRuntime::new(config).expect("plugin runtime")
}

/// The component bytes of a plugin from `plugins/`.
pub fn wasm(name: &str) -> Vec<u8> {
    sluice::bundled::wasm(name)
        .unwrap_or_else(|| panic!("no bundled plugin `{name}`"))
        .to_vec()
}

/// A load request for bundled plugin `name` in tenant `acme`.
pub fn spec(name: &str, kind: PluginKind, config: &[(&str, &str)]) -> PluginSpec {
    PluginSpec {
        tenant: "acme".into(),
        name: name.into(),
        kind,
        wasm: wasm(name),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Load bundled plugin `name`, panicking with the load error.
pub fn load(rt: &PluginRuntime, name: &str, kind: PluginKind, config: &[(&str, &str)]) -> Plugin {
    rt.load(spec(name, kind, config))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// A message on `topic` with `headers` and `payload`.
pub fn msg(topic: &str, headers: &[(&str, &str)], payload: &[u8]) -> Message {
    Message {
        topic: topic.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        payload: payload.to_vec(),
        tenant: "acme".into(),
        client: "client-1".into(),
        timestamp_ms: 1_700_000_000_000,
        redelivery_count: 0,
    }
}

/// The C example plugin (`plugins/c-header-filter`), built with its own
/// Makefile (clang + wasi-libc + wasm-component-ld) once per test binary.
///
/// The C toolchain is installed on first use when it is missing
/// ([`provision`]); where it cannot be, this panics with the one command to
/// run: the C plugin is part of the suite, never skipped.
pub fn c_header_filter() -> Vec<u8> {
    static BUILT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            provision::require(
                "the C example plugin (plugins/c-header-filter)",
                provision::C_PLUGIN,
            );
            let dir = workspace_root().join("plugins/c-header-filter");
            let out = tempfile::tempdir().unwrap();
            let wasm = out.path().join("header_filter.wasm");
            let result = std::process::Command::new("make")
                .arg("-C")
                .arg(&dir)
                .arg(format!("OUT={}", wasm.display()))
                .output();
            match result {
                Ok(o) if o.status.success() => std::fs::read(&wasm).unwrap(),
                Ok(o) => panic!(
                    "building the C plugin failed:\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => panic!("cannot run make: {e}"),
            }
        })
        .clone()
}

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// Strings from string slices.
pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A broker running in this process on an ephemeral loopback port, with
/// fresh development certificates for tenants `acme` and `globex`, data in a
/// temporary directory.
pub struct Harness {
    /// The running broker.
    pub running: Option<sluice::cli::Running>,
    /// Data directory.
    pub data: tempfile::TempDir,
    /// Certificate folder (`<data>/certs`).
    pub certs: std::path::PathBuf,
    /// Listening address.
    pub addr: std::net::SocketAddr,
    tune: Box<dyn Fn(&mut sluice::broker::BrokerConfig) + Send + Sync>,
}

impl Harness {
    /// Start a broker.
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    /// Start a broker with adjusted settings.
    pub async fn start_with(
        tune: impl Fn(&mut sluice::broker::BrokerConfig) + Send + Sync + 'static,
    ) -> Harness {
        let data = tempfile::tempdir().unwrap();
        let certs = data.path().join("certs");
        sluice::tls::init_dev_certs(&certs, &["acme".into(), "globex".into()], "sluice").unwrap();
        let mut h = Harness {
            running: None,
            data,
            certs,
            addr: "127.0.0.1:0".parse().unwrap(),
            tune: Box::new(tune),
        };
        h.restart().await;
        h
    }

    /// (Re)start the broker on the same data directory and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = sluice::broker::BrokerConfig::new(self.data.path());
        (self.tune)(&mut config);
        let running = sluice::cli::start(
            self.addr,
            self.data.path(),
            &sluice::tls::ServerTlsFiles::from_dir(&self.certs),
            config,
            Default::default(),
        )
        .await
        .expect("broker starts");
        self.addr = running.addr;
        self.running = Some(running);
    }

    /// Stop the broker (graceful: connections closed, store synced and released).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.server.close();
            r.broker.sync().unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(2), r.server.wait_idle()).await;
            drop(r);
            // The store is released when the last broker handle is gone;
            // sessions drop theirs as their connections close.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Try to connect with the identity folder `name`.
    pub async fn try_client(
        &self,
        name: &str,
    ) -> Result<sluice_client::Client, sluice_client::ClientError> {
        sluice_client::Client::connect(self.addr, &self.certs.join(name)).await
    }

    /// A client with the identity folder `name` (`acme`, `globex`, `admin`).
    pub async fn client(&self, name: &str) -> sluice_client::Client {
        sluice_client::Client::connect(self.addr, &self.certs.join(name))
            .await
            .expect("client connects")
    }
}
