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
    /// CPU a plugin call may use at full speed before it is throttled, in
    /// µs (default 1000).
    pub plugin_throttle_after_us: Option<u64>,
    /// Percent of one core a call gets beyond `plugin_throttle_after_us`,
    /// 5 to 100 (default 10; 100 turns throttling off).
    pub plugin_throttle_percent: Option<u32>,
    /// Plugin memory cap in MiB (default 16).
    pub plugin_memory_mib: Option<usize>,
    /// Refuse clients of tenants not registered here or with `sluice tenant
    /// create` (default false: a tenant is registered at its first connection).
    pub strict_tenants: Option<bool>,
    /// Concurrent plugin tasks per tenant (default 1).
    pub plugin_concurrency_per_tenant: Option<usize>,
    /// Largest prefetch of one subscription (default 10 000).
    pub max_prefetch: Option<u32>,
    /// Most stored bytes one subscription holds unacked (default 16 MiB).
    pub max_prefetch_bytes: Option<u64>,
    /// Sum of the prefetch of one connection's subscriptions (default 65 536).
    pub max_unacked_per_connection: Option<u64>,
    /// Most queues per tenant, whatever its quota (default 10 000).
    pub max_queues_per_tenant: Option<usize>,
    /// Most bindings per tenant (default 100 000).
    pub max_bindings_per_tenant: Option<usize>,
    /// Most queues one message is stored in (default 1024).
    pub max_fanout: Option<usize>,
    /// Most plugins per tenant (default 16).
    pub max_plugins_per_tenant: Option<usize>,
    /// Most client connections to the broker (default 16 384).
    pub max_connections: Option<u64>,
    /// Control requests of one tenant running at once (default 2).
    pub control_concurrency_per_tenant: Option<usize>,
    /// Plugin instances all tenants may reserve (default 256).
    pub plugin_pool_instances: Option<u32>,
    /// Instances each plugin reserves and never exceeds (default 2).
    pub plugin_instances_per_plugin: Option<u32>,
    /// Plugin instances one tenant may reserve (default 32).
    pub plugin_instances_per_tenant: Option<u32>,
    /// Plugin linear memory one tenant may reserve, MiB (default 512).
    pub plugin_memory_per_tenant_mib: Option<u64>,
    /// Compiled plugin code one tenant may hold in the cache, MiB (default 256).
    pub plugin_cache_mib_per_tenant: Option<u64>,
    /// Compiled plugin code of all tenants, MiB (default 2048).
    pub plugin_cache_mib: Option<u64>,
    /// Log lines one plugin may cause per second (default 100).
    pub plugin_log_lines_per_sec: Option<u32>,
    /// Consecutive traps after which a plugin is errored (default 5).
    pub plugin_trap_threshold: Option<u32>,
    /// Share of one core a tenant's plugins may use before its work runs
    /// at the lowest priority (default 0.5; `inf` turns demotion off).
    pub plugin_cpu_share: Option<f64>,
    /// Threads for the work of tenants over their CPU share (default 2).
    pub low_priority_threads: Option<usize>,
    /// sled page cache of the message store, MiB (default 64; a cluster
    /// node's Raft log gets one as large).
    pub store_cache_mib: Option<u64>,
    /// Tenants registered (or updated) at start, with their quotas.
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
    /// Run as one node of a replicated cluster (default: a single node).
    pub cluster: Option<ClusterFile>,
}

impl FileConfig {
    /// Apply the file's broker settings to `config`; an out-of-range value
    /// is an error naming its key.
    pub fn apply(&self, config: &mut crate::broker::BrokerConfig) -> anyhow::Result<()> {
        let wire = sluice_proto::Limits::default();
        if let Some(m) = self.max_message_bytes {
            anyhow::ensure!(
                (1..=wire.max_payload).contains(&m),
                "max_message_bytes = {m}: must be 1 to {} (the wire's payload limit)",
                wire.max_payload
            );
            config.max_message_bytes = m;
        }
        if let Some(ms) = self.plugin_deadline_ms {
            anyhow::ensure!(ms >= 1, "plugin_deadline_ms must be at least 1");
            config.sandbox.call_deadline = std::time::Duration::from_millis(ms);
        }
        if let Some(us) = self.plugin_throttle_after_us {
            anyhow::ensure!(us >= 1, "plugin_throttle_after_us must be at least 1");
            config.sandbox.throttle_after = std::time::Duration::from_micros(us);
        }
        if let Some(pct) = self.plugin_throttle_percent {
            anyhow::ensure!(
                (5..=100).contains(&pct),
                "plugin_throttle_percent = {pct}: must be 5 to 100"
            );
            config.sandbox.throttle_percent = pct;
        }
        if let Some(mib) = self.plugin_memory_mib {
            anyhow::ensure!(
                (1..=4096).contains(&mib),
                "plugin_memory_mib = {mib}: must be 1 to 4096"
            );
            config.sandbox.memory_limit = mib << 20;
        }
        if let Some(strict) = self.strict_tenants {
            config.strict_tenants = strict;
        }
        fn at_least_one<T: PartialOrd + From<u8> + std::fmt::Display>(
            key: &str,
            v: T,
        ) -> anyhow::Result<T> {
            anyhow::ensure!(v >= T::from(1), "{key} = {v}: must be at least 1");
            Ok(v)
        }
        if let Some(n) = self.plugin_concurrency_per_tenant {
            config.plugin_concurrency_per_tenant =
                at_least_one("plugin_concurrency_per_tenant", n)?;
        }
        if let Some(n) = self.max_prefetch {
            config.max_prefetch = at_least_one("max_prefetch", n)?;
        }
        if let Some(n) = self.max_prefetch_bytes {
            config.max_prefetch_bytes = at_least_one("max_prefetch_bytes", n)?;
        }
        if let Some(n) = self.max_unacked_per_connection {
            config.max_unacked_per_connection = at_least_one("max_unacked_per_connection", n)?;
        }
        if let Some(n) = self.max_queues_per_tenant {
            config.max_queues_per_tenant = at_least_one("max_queues_per_tenant", n)?;
        }
        if let Some(n) = self.max_bindings_per_tenant {
            config.max_bindings_per_tenant = at_least_one("max_bindings_per_tenant", n)?;
        }
        if let Some(n) = self.max_fanout {
            config.max_fanout = at_least_one("max_fanout", n)?;
        }
        if let Some(n) = self.max_plugins_per_tenant {
            config.max_plugins_per_tenant = at_least_one("max_plugins_per_tenant", n)?;
        }
        if let Some(n) = self.max_connections {
            config.max_connections = at_least_one("max_connections", n)?;
        }
        if let Some(n) = self.control_concurrency_per_tenant {
            config.control_concurrency_per_tenant =
                at_least_one("control_concurrency_per_tenant", n)?;
        }
        if let Some(x) = self.plugin_cpu_share {
            anyhow::ensure!(
                x > 0.0,
                "plugin_cpu_share = {x}: must be above 0 (a share of one core, e.g. 0.5, or inf)"
            );
            config.plugin_cpu_share = x;
        }
        if let Some(n) = self.low_priority_threads {
            config.low_priority_threads = at_least_one("low_priority_threads", n)?;
        }
        if let Some(n) = self.store_cache_mib {
            config.store.cache_capacity = at_least_one("store_cache_mib", n)? << 20;
        }
        let sb = &mut config.sandbox;
        if let Some(n) = self.plugin_pool_instances {
            sb.pool_instances = at_least_one("plugin_pool_instances", n)?;
        }
        if let Some(n) = self.plugin_instances_per_plugin {
            sb.instances_per_plugin = at_least_one("plugin_instances_per_plugin", n)?;
            sb.warm_instances_per_plugin = n as usize;
        }
        if let Some(n) = self.plugin_instances_per_tenant {
            sb.instances_per_tenant = at_least_one("plugin_instances_per_tenant", n)?;
        }
        if let Some(n) = self.plugin_memory_per_tenant_mib {
            sb.memory_per_tenant = at_least_one("plugin_memory_per_tenant_mib", n)? << 20;
        }
        if let Some(n) = self.plugin_cache_mib_per_tenant {
            sb.cache_bytes_per_tenant = at_least_one("plugin_cache_mib_per_tenant", n)? << 20;
        }
        if let Some(n) = self.plugin_cache_mib {
            sb.cache_bytes_total = at_least_one("plugin_cache_mib", n)? << 20;
        }
        if let Some(n) = self.plugin_log_lines_per_sec {
            sb.max_log_lines_per_sec = at_least_one("plugin_log_lines_per_sec", n)?;
        }
        if let Some(n) = self.plugin_trap_threshold {
            sb.trap_threshold = at_least_one("plugin_trap_threshold", n)?;
        }
        Ok(())
    }
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

/// `[cluster]`: this broker is one node of a replicated cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// This node's id (`--node` overrides it, so nodes can share a file).
    pub node: Option<u64>,
    /// Node identity folder (default `<certs>/cluster/node-N`, as
    /// `sluice certs init --node N` writes it).
    pub identity: Option<PathBuf>,
    /// Raft heartbeat interval, ms (default 100).
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout, ms: a leader silent this long (to twice
    /// this) is replaced (default 1000).
    pub election_timeout_ms: Option<u64>,
    /// Log entries between two snapshots of the node's store (default
    /// 20000); the log a snapshot covers is purged.
    pub snapshot_every: Option<u64>,
    /// Entries a snapshot covers that stay in the log, so a follower a
    /// little behind catches up from the log (default 5000).
    pub log_kept: Option<u64>,
    /// This node joins a running cluster (`--join`): it never forms a
    /// group of its own and waits to be added with `sluice cluster add`.
    #[serde(default)]
    pub join: bool,
    /// Every member, this node included (a joining node needs its own
    /// entry only).
    pub members: Vec<MemberEntry>,
}

/// `[[cluster.members]]`: one node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    /// Node id, at least 1.
    pub id: u64,
    /// Its address for other nodes (QUIC, node certificates only).
    pub raft: SocketAddr,
    /// Where it listens for other nodes, when that is not `raft` (peers
    /// reach it through a proxy or a NAT).
    pub raft_listen: Option<SocketAddr>,
    /// Its address for clients (told to clients it refuses as a follower).
    pub client: SocketAddr,
}

impl ClusterFile {
    /// The settings of node `node` (else this file's `node`), with its
    /// files in `<data>/node-N` and its identity under `certs`; every
    /// error names the key.
    pub fn settings(
        &self,
        node: Option<u64>,
        data: &Path,
        certs: &Path,
    ) -> anyhow::Result<crate::cluster::node::NodeSettings> {
        use crate::cluster::node::{MAX_MEMBERS, Member, NodeSettings};
        let id = node
            .or(self.node)
            .ok_or_else(|| anyhow::anyhow!("[cluster]: no node id: set `node` or pass --node N"))?;
        anyhow::ensure!(
            (1..=MAX_MEMBERS).contains(&self.members.len()),
            "[cluster] members: {} given; a cluster has 1 to {MAX_MEMBERS} (3 or 5 survive one or two failures)",
            self.members.len()
        );
        let mut members = std::collections::BTreeMap::new();
        let mut addrs = std::collections::BTreeSet::new();
        for m in &self.members {
            anyhow::ensure!(m.id >= 1, "[cluster] members: node ids start at 1");
            let raft_listen = m.raft_listen.unwrap_or(m.raft);
            let listen = m.raft_listen.filter(|a| *a != m.raft);
            for a in [Some(m.raft), Some(m.client), listen].into_iter().flatten() {
                anyhow::ensure!(
                    addrs.insert(a),
                    "[cluster] members: address {a} is given twice"
                );
            }
            let dup = members.insert(
                m.id,
                Member {
                    raft: m.raft,
                    raft_listen,
                    client: m.client,
                },
            );
            anyhow::ensure!(
                dup.is_none(),
                "[cluster] members: node {} is given twice",
                m.id
            );
        }
        anyhow::ensure!(
            members.contains_key(&id),
            "[cluster]: node {id} is not among the members ({})",
            members
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let ms = |key: &str, v: Option<u64>, default: u64| -> anyhow::Result<std::time::Duration> {
            let v = v.unwrap_or(default);
            anyhow::ensure!(
                (10..=60_000).contains(&v),
                "[cluster] {key} = {v}: must be 10 to 60000"
            );
            Ok(std::time::Duration::from_millis(v))
        };
        let heartbeat = ms("heartbeat_ms", self.heartbeat_ms, 100)?;
        let election_timeout = ms("election_timeout_ms", self.election_timeout_ms, 1000)?;
        anyhow::ensure!(
            election_timeout > heartbeat * 2,
            "[cluster] election_timeout_ms must be more than twice heartbeat_ms"
        );
        let count = |key: &str, v: Option<u64>, default: u64| -> anyhow::Result<u64> {
            let v = v.unwrap_or(default);
            anyhow::ensure!(
                (10..=100_000_000).contains(&v),
                "[cluster] {key} = {v}: must be 10 to 100000000"
            );
            Ok(v)
        };
        let snapshot_every = count("snapshot_every", self.snapshot_every, 20_000)?;
        let log_kept = count("log_kept", self.log_kept, 5_000)?;
        Ok(NodeSettings {
            id,
            members,
            join: self.join,
            snapshot_every,
            log_kept,
            identity: self
                .identity
                .clone()
                .unwrap_or_else(|| certs.join("cluster").join(crate::tls::node_name(id))),
            dir: data.join(crate::tls::node_name(id)),
            heartbeat,
            election_timeout,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(text: &str) -> anyhow::Result<crate::broker::BrokerConfig> {
        let file: FileConfig = toml::from_str(text)?;
        let mut config = crate::broker::BrokerConfig::new("/nonexistent");
        file.apply(&mut config)?;
        Ok(config)
    }

    #[test]
    fn plugin_throttle_keys_are_bounded() {
        let c = applied("plugin_throttle_after_us = 250\nplugin_throttle_percent = 50").unwrap();
        assert_eq!(
            c.sandbox.throttle_after,
            std::time::Duration::from_micros(250)
        );
        assert_eq!(c.sandbox.throttle_percent, 50);
        for bad in [
            "plugin_throttle_percent = 4",
            "plugin_throttle_percent = 101",
        ] {
            let e = applied(bad).unwrap_err().to_string();
            assert!(e.contains("must be 5 to 100"), "{bad}: {e}");
        }
        let e = applied("plugin_throttle_after_us = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    fn node(text: &str, id: Option<u64>) -> anyhow::Result<crate::cluster::node::NodeSettings> {
        let file: FileConfig = toml::from_str(text)?;
        file.cluster.expect("a [cluster] section").settings(
            id,
            Path::new("data"),
            Path::new("certs"),
        )
    }

    const THREE: &str = r#"
        [cluster]
        members = [
            { id = 1, raft = "127.0.0.1:7701", client = "127.0.0.1:7601" },
            { id = 2, raft = "127.0.0.1:7702", client = "127.0.0.1:7602" },
            { id = 3, raft = "127.0.0.1:7703", client = "127.0.0.1:7603" },
        ]
    "#;

    #[test]
    fn a_cluster_section_names_this_node_and_its_files() {
        let s = node(THREE, Some(2)).unwrap();
        assert_eq!(s.id, 2);
        assert_eq!(s.members.len(), 3);
        assert_eq!(s.dir, Path::new("data/node-2"));
        assert_eq!(s.identity, Path::new("certs/cluster/node-2"));
        assert_eq!(s.election_timeout, std::time::Duration::from_millis(1000));
        assert_eq!((s.snapshot_every, s.log_kept), (20_000, 5_000));
        let tuned = THREE.replace(
            "[cluster]",
            "[cluster]\nsnapshot_every = 500\nlog_kept = 50",
        );
        let s = node(&tuned, Some(2)).unwrap();
        assert_eq!((s.snapshot_every, s.log_kept), (500, 50));
        assert!(!s.join);
        // A node joining a running cluster names itself alone.
        let joining = r#"
            [cluster]
            join = true
            members = [{ id = 4, raft = "127.0.0.1:7704", client = "127.0.0.1:7604" }]
        "#;
        let j = node(joining, Some(4)).unwrap();
        assert!(j.join);
        assert_eq!(j.members.keys().copied().collect::<Vec<_>>(), [4]);
        let bad = THREE.replace("[cluster]", "[cluster]\nsnapshot_every = 0");
        let e = node(&bad, Some(2)).unwrap_err().to_string();
        assert!(
            e.contains("snapshot_every = 0: must be 10 to 100000000"),
            "{e}"
        );
        for (id, want) in [
            (None, "no node id"),
            (Some(4), "node 4 is not among the members (1, 2, 3)"),
        ] {
            let e = node(THREE, id).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let twice = THREE.replace("id = 3", "id = 2");
        let e = node(&twice, Some(1)).unwrap_err().to_string();
        assert!(e.contains("node 2 is given twice"), "{e}");
        let same = THREE.replace("7703", "7702");
        let e = node(&same, Some(1)).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:7702 is given twice"), "{e}");
        assert_eq!(s.members[&2].raft_listen, s.members[&2].raft);
        let proxied = THREE.replace(
            r#"id = 2, raft = "127.0.0.1:7702","#,
            r#"id = 2, raft = "127.0.0.1:7702", raft_listen = "127.0.0.1:7802","#,
        );
        let p = node(&proxied, Some(2)).unwrap();
        assert_eq!(p.members[&2].raft_listen.port(), 7802);
        assert_eq!(p.members[&2].raft.port(), 7702);
        let clash = proxied.replace("7802", "7601");
        let e = node(&clash, Some(1)).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:7601 is given twice"), "{e}");
        let e = node(&format!("{THREE}\nheartbeat_ms = 600"), Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than twice heartbeat_ms"), "{e}");
        let e = node("[cluster]\nmembers = []", Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 given"), "{e}");
    }

    #[test]
    fn plugin_cpu_share_takes_a_share_or_inf() {
        assert_eq!(
            applied("plugin_cpu_share = 1.5").unwrap().plugin_cpu_share,
            1.5
        );
        assert!(
            applied("plugin_cpu_share = inf")
                .unwrap()
                .plugin_cpu_share
                .is_infinite()
        );
        for bad in ["0.0", "-1.0", "nan"] {
            let e = applied(&format!("plugin_cpu_share = {bad}")).unwrap_err();
            assert!(e.to_string().contains("must be above 0"), "{bad}: {e}");
        }
    }
}
