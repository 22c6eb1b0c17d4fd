//! Sluice: the broker as a child process (`sluice serve`), the workloads
//! through `sluice bench --json`, and the same workload through the Rust
//! client for what `sluice bench` cannot do (fan-out).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sluice_client::{Client, QueueSpec};

use crate::harness::{BoxFut, Deliveries, Driver, Producer, Spec};
use crate::stats::Report;

/// `sluice serve` children on loopback (one, or the nodes of a cluster),
/// killed on drop.
pub struct Server {
    children: Vec<Child>,
    /// Where clients connect: the node (the leader of a cluster).
    pub addr: SocketAddr,
    /// Tenant identity created by the broker on first start.
    pub identity: PathBuf,
}

impl Server {
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Server> {
        let port = crate::free_udp_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let data = dir.join("data");
        let log = std::fs::File::create(dir.join("sluice.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = Server {
            children: vec![child],
            addr,
            identity: data.join("certs").join("default"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.children[0].try_wait()? {
                bail!(
                    "sluice serve exited with {status}; see {}",
                    dir.join("sluice.log").display()
                );
            }
            if server.identity.join("cert.pem").exists()
                && let Ok(c) = Client::connect(addr, &server.identity).await
            {
                c.close();
                return Ok(server);
            }
            if Instant::now() > deadline {
                server.stop();
                bail!("sluice serve did not answer on {addr} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A cluster of `n` nodes as the README starts one (`sluice certs init
    /// --node N`, one `[cluster]` file, `sluice serve --node N`); `addr` is
    /// the leader's client address once one is elected.
    pub async fn start_cluster(bin: &Path, dir: &Path, n: u64) -> anyhow::Result<Server> {
        let certs = dir.join("certs");
        let mut init = Command::new(bin);
        init.args(["certs", "init", "--tenant", "bench", "--out"])
            .arg(&certs);
        for id in 1..=n {
            init.args(["--node", &id.to_string()]);
        }
        let st = init.stdout(Stdio::null()).status()?;
        anyhow::ensure!(st.success(), "sluice certs init failed ({st})");
        let mut members = String::new();
        let mut clients = Vec::new();
        for id in 1..=n {
            let raft = crate::free_udp_port()?;
            let client = crate::free_udp_port()?;
            members += &format!(
                "  {{ id = {id}, raft = \"127.0.0.1:{raft}\", client = \"127.0.0.1:{client}\" }},\n"
            );
            clients.push(format!("127.0.0.1:{client}").parse::<SocketAddr>()?);
        }
        let config = dir.join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "certs = {:?}\ndata = {:?}\n\n[cluster]\nmembers = [\n{members}]\n",
                certs,
                dir.join("data")
            ),
        )?;
        let mut server = Server {
            children: Vec::new(),
            addr: clients[0],
            identity: certs.join("bench"),
        };
        for id in 1..=n {
            let log = std::fs::File::create(dir.join(format!("node-{id}.log")))?;
            let child = Command::new(bin)
                .args(["serve", "--node", &id.to_string(), "--config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            server.children.push(child);
        }
        let opts = sluice_client::ConnectOptions {
            failover: Duration::from_secs(60),
            ..Default::default()
        };
        let leader = Client::connect_any(&clients, &server.identity, opts)
            .await
            .with_context(|| format!("no leader elected; see {}", dir.display()))?;
        server.addr = leader.server_addr();
        leader.close();
        Ok(server)
    }

    pub fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `sluice --version`.
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Router and filter components for the "plugins on the path" workload.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub router: PathBuf,
    pub filter: PathBuf,
}

/// Run `spec` with `sluice bench --json` against `server`.
pub async fn bench(
    bin: &Path,
    server: &Server,
    spec: &Spec,
    plugins: &Plugins,
) -> anyhow::Result<Report> {
    if spec.fanout {
        bail!("sluice bench spreads messages over its queues; fan-out runs through the client");
    }
    let mut cmd = Command::new(bin);
    cmd.arg("bench")
        .arg("--json")
        .arg("--server")
        .arg(server.addr.to_string())
        .arg("--identity")
        .arg(&server.identity)
        .args(["--producers", &spec.producers.to_string()])
        .args(["--consumers", &spec.consumers.to_string()])
        .args(["--count", &spec.count.to_string()])
        .args(["--size", &spec.size.to_string()])
        .args(["--window", &spec.window.to_string()])
        .args(["--prefetch", &spec.prefetch.to_string()])
        .args(["--queues", &spec.queues.to_string()]);
    if let Some(rate) = spec.rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    if spec.plugins {
        cmd.arg("--router")
            .arg(&plugins.router)
            .arg("--filter")
            .arg(&plugins.filter);
    }
    let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await?
        .context("cannot run sluice bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match line {
        // A non-zero exit with a report means an incomplete run: the caller
        // checks the counts.
        Some(l) => Ok(serde_json::from_str(l)
            .with_context(|| format!("unexpected sluice bench output: {l}"))?),
        None => bail!(
            "sluice bench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// The harness workload through `sluice-client` (fan-out: every queue bound
/// to one topic; spread: queue `i` bound to its own topic).
pub struct Native {
    addr: SocketAddr,
    identity: PathBuf,
    plugins: Plugins,
    prefetch: u32,
    run: String,
    admin: Option<Client>,
    queues: Vec<String>,
    topics: Vec<String>,
    loaded: Vec<String>,
}

impl Native {
    pub fn new(server: &Server, plugins: &Plugins) -> Native {
        Native {
            addr: server.addr,
            identity: server.identity.clone(),
            plugins: plugins.clone(),
            prefetch: 256,
            run: String::new(),
            admin: None,
            queues: Vec::new(),
            topics: Vec::new(),
            loaded: Vec::new(),
        }
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.addr, &self.identity).await?)
    }
}

struct NativeProducer {
    client: Client,
    topics: std::sync::Arc<Vec<String>>,
}

impl Producer for NativeProducer {
    fn publish(
        &mut self,
        target: usize,
        payload: Vec<u8>,
    ) -> BoxFut<anyhow::Result<BoxFut<anyhow::Result<()>>>> {
        let confirm = self.client.publish(&self.topics[target], vec![], payload);
        Box::pin(async move {
            Ok(Box::pin(async move {
                confirm.await?;
                Ok(())
            }) as BoxFut<_>)
        })
    }
}

impl Drop for NativeProducer {
    fn drop(&mut self) {
        self.client.close();
    }
}

impl Driver for Native {
    async fn prepare(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let admin = self.connect().await?;
        self.prefetch = spec.prefetch;
        self.run = format!("cmp-{}-{}", std::process::id(), crate::unique());
        self.queues = (0..spec.queues.max(1))
            .map(|i| format!("{}-{i}", self.run))
            .collect();
        self.topics = if spec.fanout {
            vec![format!("{}.fan", self.run)]
        } else {
            self.queues.iter().map(|q| format!("{q}.t")).collect()
        };
        for (i, q) in self.queues.iter().enumerate() {
            admin.declare(QueueSpec::new(q)).await?;
            let topic = &self.topics[if spec.fanout { 0 } else { i }];
            admin.bind(q, topic).await?;
        }
        if spec.plugins {
            let router = std::fs::read(&self.plugins.router)
                .with_context(|| format!("cannot read {}", self.plugins.router.display()))?;
            let filter = std::fs::read(&self.plugins.filter)
                .with_context(|| format!("cannot read {}", self.plugins.filter.display()))?;
            let name = format!("{}-router", self.run);
            admin
                .load_plugin(&name, "router", None, router, vec![])
                .await?;
            self.loaded.push(name);
            for (i, q) in self.queues.iter().enumerate() {
                let name = format!("{}-filter-{i}", self.run);
                admin
                    .load_plugin(&name, "filter", Some(q), filter.clone(), vec![])
                    .await?;
                self.loaded.push(name);
            }
        }
        self.admin = Some(admin);
        Ok(())
    }

    async fn producer(&self) -> anyhow::Result<Box<dyn Producer>> {
        Ok(Box::new(NativeProducer {
            client: self.connect().await?,
            topics: std::sync::Arc::new(self.topics.clone()),
        }))
    }

    async fn consumer(&self, queues: &[usize]) -> anyhow::Result<Deliveries> {
        let client = self.connect().await?;
        let mut subs = Vec::new();
        for &q in queues {
            let sub = client.subscribe(&self.queues[q], self.prefetch).await?;
            subs.push(Box::pin(futures::stream::unfold(
                (sub, client.clone()),
                move |(mut sub, client)| async move {
                    let d = sub.next().await?;
                    sub.ack(d.tag);
                    Some((Ok((q, d.payload)), (sub, client)))
                },
            )));
        }
        Ok(futures::stream::select_all(subs).boxed())
    }

    async fn cleanup(&mut self) -> anyhow::Result<()> {
        if let Some(admin) = self.admin.take() {
            for q in self.queues.drain(..) {
                let _ = admin.delete(&q).await;
            }
            for name in self.loaded.drain(..) {
                let _ = admin.unload_plugin(&name).await;
            }
            admin.close();
        }
        Ok(())
    }
}
