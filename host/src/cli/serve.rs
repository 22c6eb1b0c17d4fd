//! `sluice serve` and `sluice certs`.

use super::say;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::broker::{Broker, BrokerConfig};
use crate::config::FileConfig;
use crate::server::Server;
use crate::tls::{self, IdentityMapping, ServerTlsFiles};

/// Flags of `sluice serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7600].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./sluice-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Certificate folder from `sluice certs init` [default: <data>/certs, created on first start].
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// This node's id in the config's `[cluster]` (overrides its `node`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    node: Option<u64>,
    /// Join a running cluster: never form a group, wait to be added with
    /// `sluice cluster add` (sets the config's `[cluster] join`).
    #[arg(long)]
    join: bool,
}

/// A running broker, for `serve`, the demo and tests.
pub struct Running {
    /// The broker.
    pub broker: Broker,
    /// The listener.
    pub server: std::sync::Arc<Server>,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Open the broker in `data` and listen on `listen` with the certificates in
/// `tls_files` (see [`ServerTlsFiles::from_dir`] for a `sluice certs init` folder).
pub async fn start(
    listen: SocketAddr,
    data: &Path,
    tls_files: &ServerTlsFiles,
    mut config: BrokerConfig,
    mapping: IdentityMapping,
) -> anyhow::Result<Running> {
    config.store.dir = data.join("store");
    config.sandbox.cache_dir = Some(data.join("plugin-cache"));
    let tls = tls::server_config(tls_files).context("TLS setup")?;
    let broker = Broker::open(config).context("opening the data directory")?;
    let server = std::sync::Arc::new(
        Server::bind(listen, tls, broker.clone(), mapping)
            .with_context(|| format!("cannot listen on {listen}"))?,
    );
    let addr = server.local_addr()?;
    let s = server.clone();
    tokio::spawn(async move { s.run().await });
    Ok(Running {
        broker,
        server,
        addr,
    })
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7600)));
    let data = args
        .data
        .or(file.data.clone())
        .unwrap_or_else(|| PathBuf::from("sluice-data"));
    let certs = args
        .certs
        .or(file.certs.clone())
        .unwrap_or_else(|| data.join("certs"));
    let mut config = BrokerConfig::new(&data);
    file.apply(&mut config).with_context(|| {
        args.config
            .as_deref()
            .unwrap_or(Path::new("config"))
            .display()
            .to_string()
    })?;
    for t in &file.tenants {
        crate::broker::check_tenant(&t.name).with_context(|| {
            format!(
                "{}: [[tenants]]",
                args.config
                    .as_deref()
                    .unwrap_or(Path::new("config"))
                    .display()
            )
        })?;
    }
    if let Some(cluster) = &file.cluster {
        let mut settings = cluster.settings(args.node, &data, &certs)?;
        settings.join |= args.join;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or(settings.members[&settings.id].client);
        return serve_node(
            settings,
            listen,
            &certs,
            &file,
            config,
            args.metrics,
            args.check_config,
        )
        .await;
    }
    if args.node.is_some() || args.join {
        anyhow::bail!(
            "--{} needs a [cluster] section in the configuration",
            if args.join { "join" } else { "node" }
        );
    }
    let dev_certs = !file.tls.is_set() && !certs.join("ca.pem").exists();
    if args.check_config {
        if dev_certs {
            say!(
                "TLS: development certificates will be created in {} on first start",
                certs.display()
            );
        } else {
            tls::server_config(&file.tls.resolve(&certs)).context("TLS setup")?;
        }
        say!(
            "configuration ok: listen {listen}, data {}, certs {}",
            data.display(),
            certs.display()
        );
        return Ok(());
    }
    if dev_certs {
        tls::init_dev_certs(
            &certs,
            &["default".to_string()],
            &file.identity.trust_domain,
        )?;
        say!("created development certificates in {}", certs.display());
        say!("  admin identity:  {}", certs.join("admin").display());
        say!(
            "  tenant identity: {} (tenant `default`)",
            certs.join("default").display()
        );
        say!(
            "  more: sluice certs issue --ca {} --tenant NAME --client NAME --out DIR",
            certs.display()
        );
    }
    let metrics = bind_metrics(args.metrics.or(file.metrics)).await?;
    let running = start(
        listen,
        &data,
        &file.tls.resolve(&certs),
        config,
        file.identity.clone(),
    )
    .await?;
    say!(
        "sluice listening on {} (data in {})",
        running.addr,
        data.display()
    );
    if let Some((addr, listener)) = metrics {
        let (_, serving) =
            tokio::sync::watch::channel(crate::server::Serving::Broker(running.broker.clone()));
        tokio::spawn(crate::metrics::serve(listener, serving, None));
        say!("metrics on http://{addr}/metrics");
    }
    register_tenants(&running.broker, &file.tenants)?;
    wait_for_shutdown(|| reload_tls(&running, &file.tls.resolve(&certs))).await;
    say!("shutting down");
    running.server.close();
    running.broker.sync()?;
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        running.server.wait_idle(),
    )
    .await;
    Ok(())
}

/// Register (or update) the configuration's tenants.
fn register_tenants(broker: &Broker, tenants: &[crate::config::TenantEntry]) -> anyhow::Result<()> {
    let operator = crate::plugins::Principal {
        tenant: String::new(),
        client: "config".into(),
        subject: String::new(),
        sans: vec![],
        admin: true,
    };
    for t in tenants {
        broker
            .create_tenant(&operator, &t.name, t.limits.clone())
            .with_context(|| format!("tenant `{}` in the config", t.name))?;
    }
    Ok(())
}

/// `sluice serve` with a `[cluster]` section: one node of the cluster,
/// serving clients while it leads, refusing them with the leader's
/// address otherwise.
async fn serve_node(
    settings: crate::cluster::node::NodeSettings,
    listen: SocketAddr,
    certs: &Path,
    file: &FileConfig,
    mut config: BrokerConfig,
    metrics: Option<SocketAddr>,
    check_only: bool,
) -> anyhow::Result<()> {
    use crate::cluster::node::{Node, OnLead};
    let files = file.tls.resolve(certs);
    if !file.tls.is_set() && !certs.join("ca.pem").exists() {
        anyhow::bail!(
            "{}: no certificates; a cluster's nodes share one CA: run `sluice certs init --out {} --node 1 --node 2 --node 3 --tenant NAME` once and give every node that folder (`certs` or --certs)",
            certs.display(),
            certs.display()
        );
    }
    let tls = tls::server_config(&files).context("TLS setup")?;
    crate::tls::NodeTls::from_dir(&settings.identity)
        .server_config()
        .with_context(|| format!("node identity {}", settings.identity.display()))?;
    let store = settings.dir.join("store");
    if store.exists() && !settings.dir.join("raft").exists() {
        anyhow::bail!(
            "{}: a store without a raft log; a cluster node starts from an empty directory",
            settings.dir.display()
        );
    }
    if check_only {
        say!(
            "configuration ok: node {} of {}, listen {listen}, cluster peers on {}, data {}",
            settings.id,
            settings.members.len(),
            settings.members[&settings.id].raft,
            settings.dir.display()
        );
        return Ok(());
    }
    let metrics = bind_metrics(metrics.or(file.metrics)).await?;
    config.store.dir = store;
    config.sandbox.cache_dir = Some(settings.dir.join("plugin-cache"));
    let max_connections = config.max_connections;
    let tenants = file.tenants.clone();
    let on_lead: OnLead = std::sync::Arc::new(move |broker| register_tenants(broker, &tenants));
    let node = Node::start(&settings, config, on_lead).await?;
    let server = std::sync::Arc::new(
        Server::bind_serving(
            listen,
            tls,
            node.serving(),
            max_connections,
            file.identity.clone(),
        )
        .with_context(|| format!("cannot listen on {listen}"))?,
    );
    let s = server.clone();
    tokio::spawn(async move { s.run().await });
    say!(
        "sluice node {} listening on {} (cluster peers on {}, data in {})",
        settings.id,
        server.local_addr()?,
        settings.members[&settings.id].raft,
        settings.dir.display()
    );
    if let Some((addr, listener)) = metrics {
        let extra: crate::metrics::Extra = std::sync::Arc::new(node.prometheus_source());
        tokio::spawn(crate::metrics::serve(listener, node.serving(), Some(extra)));
        say!("metrics on http://{addr}/metrics");
    }
    let serving = node.serving();
    wait_for_shutdown(|| {
        let broker = match &*serving.borrow() {
            crate::server::Serving::Broker(b) => Some(b.clone()),
            crate::server::Serving::NotLeader(_) => None,
        };
        // Resolved again: new *.crl.pem files in the folder count.
        report_reload(reload_tls_on(
            &server,
            broker.as_ref(),
            &file.tls.resolve(certs),
        ));
    })
    .await;
    say!("shutting down");
    server.close();
    node.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server.wait_idle()).await;
    Ok(())
}

/// Run until SIGINT/SIGTERM. SIGHUP calls `reload` (which loads the TLS
/// files again, CRLs included: new connections use them, and connected
/// clients whose certificate is now revoked are disconnected).
async fn wait_for_shutdown(reload: impl Fn()) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                _ = hup.recv() => reload(),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reload;
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn reload_tls(running: &Running, files: &ServerTlsFiles) {
    report_reload(running.reload_tls(files));
}

fn report_reload(result: Result<usize, tls::TlsError>) {
    match result {
        Ok(closed) => say!("reloaded TLS files; closed {closed} revoked connection(s)"),
        Err(e) => eprintln!("error: TLS reload failed, keeping the previous configuration: {e}"),
    }
}

/// Load the TLS files again for `server`'s new connections and disconnect
/// `broker`'s clients whose certificate is now revoked (none: a cluster
/// node that does not lead has no clients). Returns how many were
/// disconnected. On error the previous configuration stays.
fn reload_tls_on(
    server: &Server,
    broker: Option<&Broker>,
    files: &ServerTlsFiles,
) -> Result<usize, tls::TlsError> {
    let cfg = tls::server_config(files)?;
    let serials = tls::revoked_serials(files)?;
    server.set_tls(cfg);
    Ok(broker.map_or(0, |b| b.close_revoked(&serials)))
}

/// Listen for metrics on `addr`, if set.
async fn bind_metrics(
    addr: Option<SocketAddr>,
) -> anyhow::Result<Option<(SocketAddr, tokio::net::TcpListener)>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = crate::metrics::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    Ok(Some((addr, listener)))
}

impl Running {
    /// Load the TLS files again (new CRLs apply to new connections) and
    /// disconnect clients whose certificate is now revoked. Returns how many
    /// were disconnected. On error the previous configuration stays.
    pub fn reload_tls(&self, files: &ServerTlsFiles) -> Result<usize, tls::TlsError> {
        reload_tls_on(&self.server, Some(&self.broker), files)
    }
}

/// `sluice certs ...`
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertsCommand {
    /// Create a development CA, a server certificate, an admin identity and
    /// one identity folder per tenant.
    Init {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Tenant to create an identity for (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "sluice")]
        trust_domain: String,
        /// Cluster node id to create a node identity for (repeatable):
        /// writes `cluster/` with a cluster CA of its own (no tenant or
        /// administrator certificate can pass as a node) and
        /// `cluster/node-N/` per node.
        #[arg(long = "node", value_parser = clap::value_parser!(u64).range(1..))]
        nodes: Vec<u64>,
    },
    /// Issue a client identity with an existing CA folder (or, with
    /// --node, a node identity with the cluster CA, `<certs>/cluster`).
    Issue {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Tenant of the client.
        #[arg(long, required_unless_present_any = ["admin", "node"], conflicts_with_all = ["admin", "node"])]
        tenant: Option<String>,
        /// Issue an administrator identity instead of a tenant client.
        #[arg(long, conflicts_with = "node")]
        admin: bool,
        /// Issue the identity of cluster node N (with the cluster CA), for
        /// a node to add with `sluice cluster add N`.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        node: Option<u64>,
        /// Client name.
        #[arg(long, required_unless_present = "node", conflicts_with = "node")]
        client: Option<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "sluice")]
        trust_domain: String,
    },
    /// Revoke a client certificate: adds it to `<ca>/revoked.crl.pem`,
    /// which `sluice serve` loads at start.
    Revoke {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to revoke (cert.pem of an identity folder).
        #[arg(long)]
        cert: PathBuf,
    },
}

/// Folder of the cluster's PKI inside a `certs init` output.
const CLUSTER_DIR: &str = "cluster";

/// Refuse what `certs init --node` cannot write: a node id twice, a
/// tenant folder where the cluster's goes, or a cluster CA already there
/// (checked before anything is written).
fn check_nodes(out: &Path, tenants: &[String], nodes: &[u64]) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    if let Some(n) = nodes.iter().find(|n| !seen.insert(**n)) {
        anyhow::bail!("node {n} is given twice");
    }
    if tenants.iter().any(|t| t == CLUSTER_DIR) {
        anyhow::bail!("tenant `{CLUSTER_DIR}` would share its folder with the node identities");
    }
    let ca = out.join(CLUSTER_DIR).join("ca.pem");
    if ca.exists() {
        anyhow::bail!(
            "{}: a CA already exists here; refusing to overwrite it",
            ca.display()
        );
    }
    Ok(())
}

pub(crate) fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init {
            out,
            tenants,
            trust_domain,
            nodes,
        } => {
            if !nodes.is_empty() {
                check_nodes(&out, &tenants, &nodes)?;
            }
            tls::init_dev_certs(&out, &tenants, &trust_domain)?;
            if !nodes.is_empty() {
                tls::init_node_certs(&out.join(CLUSTER_DIR), &nodes)?;
            }
            say!(
                "wrote {}: ca.pem, ca.key, server/, admin/{}{}",
                out.display(),
                tenants
                    .iter()
                    .map(|t| format!(", {t}/"))
                    .collect::<String>(),
                nodes
                    .iter()
                    .map(|n| format!(", {CLUSTER_DIR}/{}/", tls::node_name(*n)))
                    .collect::<String>()
            );
        }
        CertsCommand::Issue {
            node: Some(node),
            ca,
            out,
            ..
        } => {
            tls::issue_node_cert(&ca, node, &out)?;
            say!("wrote {} (cluster node {node})", out.display());
        }
        CertsCommand::Issue {
            ca,
            tenant,
            admin: _,
            node: None,
            client,
            out,
            trust_domain,
        } => {
            // clap requires a client name without --node.
            let client = client.unwrap_or_default();
            tls::issue_client_cert(&ca, tenant.as_deref(), &client, &out, &trust_domain)?;
            match tenant {
                Some(tenant) => {
                    say!("wrote {} (tenant {tenant}, client {client})", out.display())
                }
                None => say!("wrote {} (administrator {client})", out.display()),
            }
        }
        CertsCommand::Revoke { ca, cert } => {
            tls::revoke_cert(&ca, &cert)?;
            say!(
                "revoked {}; restart the broker to apply {}",
                cert.display(),
                ca.join("revoked.crl.pem").display()
            );
        }
    }
    Ok(())
}
