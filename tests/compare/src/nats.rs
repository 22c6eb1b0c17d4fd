//! NATS JetStream: `nats-server` as a child process (file storage), the
//! workload through `async-nats`. A queue is a stream with work-queue
//! retention and one durable pull consumer (explicit acks, at most K
//! unacked); fan-out is one stream with interest retention and one durable
//! consumer per "queue" (JetStream stores the message once; every consumer
//! keeps its own ack state).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, PullConsumer, pull},
    stream::{Config as StreamConfig, RetentionPolicy, StorageType},
};
use futures::StreamExt;

use crate::harness::{BoxFut, Deliveries, Driver, Producer, Spec};

/// Which `nats-server` and how.
#[derive(Debug, Clone)]
pub struct Flavor {
    pub bin: PathBuf,
    /// `jetstream { sync_interval: always }`: fsync every write before the
    /// ack (nats-server ≥ 2.10). Otherwise the server's default.
    pub sync_always: bool,
    /// At most this many messages per run against this server (a slow
    /// configuration would otherwise take minutes per workload).
    pub max_count: Option<u64>,
    /// Servers in the cluster and replicas of every stream (1: a single
    /// server, streams R1).
    pub replicas: usize,
}

impl Flavor {
    /// `PATH[,sync=always][,count=N][,replicas=N]`.
    pub fn parse(s: &str) -> Result<Flavor, String> {
        let mut parts = s.split(',');
        let bin = parts.next().unwrap_or_default();
        if bin.is_empty() {
            return Err("empty nats-server path".into());
        }
        let mut flavor = Flavor {
            bin: bin.into(),
            sync_always: false,
            max_count: None,
            replicas: 1,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("sync", "always")) => flavor.sync_always = true,
                Some(("sync", "default")) => flavor.sync_always = false,
                Some(("count", n)) => {
                    flavor.max_count = Some(n.parse().map_err(|e| format!("count={n}: {e}"))?)
                }
                Some(("replicas", n)) => {
                    flavor.replicas = match n.parse() {
                        Ok(r @ (1 | 3 | 5)) => r,
                        _ => return Err(format!("replicas={n}: 1, 3 or 5")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown option `{opt}` (sync=always, sync=default, count=N, replicas=N)"
                    ));
                }
            }
        }
        Ok(flavor)
    }

    /// `nats-server --version`, e.g. "v2.9.10".
    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .and_then(|s| s.rsplit(' ').next().map(str::to_string))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }

    pub fn label(&self) -> String {
        format!(
            "NATS JetStream {}{}{}",
            self.version().trim_start_matches('v'),
            if self.replicas > 1 {
                format!(" R{} ({} servers)", self.replicas, self.replicas)
            } else {
                String::new()
            },
            if self.sync_always {
                " (sync always)"
            } else {
                ""
            }
        )
    }
}

/// The config file of a server.
pub fn config(port: u16, store: &Path, sync_always: bool) -> String {
    format!(
        "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n{}}}\n",
        store.display().to_string(),
        if sync_always {
            "  sync_interval: always\n"
        } else {
            ""
        }
    )
}

/// The cluster part of server `i`'s config: its name, its route port and
/// routes to every server (loopback).
pub fn cluster_config(i: usize, routes: &[u16]) -> String {
    let all: Vec<String> = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    format!(
        "server_name: n{i}\ncluster {{\n  name: cmp\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
        routes[i],
        all.join(", ")
    )
}

/// `nats-server` children on loopback (one, or a cluster of
/// `replicas`), killed on drop.
pub struct Server {
    children: Vec<Child>,
    pub url: String,
    /// Replicas of every stream.
    pub replicas: usize,
}

impl Server {
    pub async fn start(flavor: &Flavor, dir: &Path) -> anyhow::Result<Server> {
        let n = flavor.replicas.max(1);
        let ports: Vec<u16> = (0..n)
            .map(|_| crate::free_tcp_port())
            .collect::<Result<_, _>>()?;
        let routes: Vec<u16> = (0..n)
            .map(|_| crate::free_tcp_port())
            .collect::<Result<_, _>>()?;
        let mut server = Server {
            children: Vec::new(),
            url: format!("nats://127.0.0.1:{}", ports[0]),
            replicas: n,
        };
        for (i, port) in ports.iter().enumerate() {
            let conf = dir.join(format!("nats-{i}.conf"));
            let mut text = config(*port, &dir.join(format!("js-{i}")), flavor.sync_always);
            if n > 1 {
                text += &cluster_config(i, &routes);
            }
            std::fs::write(&conf, text)?;
            let log = std::fs::File::create(dir.join(format!("nats-{i}.log")))?;
            let child = Command::new(&flavor.bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", flavor.bin.display()))?;
            server.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, child) in server.children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "nats-server exited with {status}; see {}",
                        dir.join(format!("nats-{i}.log")).display()
                    );
                }
            }
            // Ready once a stream with this many replicas can be made (a
            // cluster: once its meta group has a leader and every server
            // has joined).
            if let Ok(client) = async_nats::connect(&server.url).await
                && client.flush().await.is_ok()
            {
                let js = jetstream::new(client);
                let probe = stream_config("CMP_PROBE", "cmp.probe", RetentionPolicy::Limits, n);
                let made =
                    tokio::time::timeout(Duration::from_secs(5), js.create_stream(probe)).await;
                if let Ok(Ok(_)) = made {
                    let _ = js.delete_stream("CMP_PROBE").await;
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                server.stop();
                bail!("nats-server did not answer on {} within 30 s", server.url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

/// The harness workload on JetStream.
pub struct Nats {
    url: String,
    admin: Option<jetstream::Context>,
    /// Stream of each queue.
    streams: Vec<String>,
    /// Durable consumer of each queue.
    consumers: Vec<String>,
    /// Publish subjects.
    subjects: Arc<Vec<String>>,
    prefetch: u32,
    replicas: usize,
}

impl Nats {
    pub fn new(server: &Server) -> Nats {
        Nats {
            replicas: server.replicas,
            url: server.url.clone(),
            admin: None,
            streams: Vec::new(),
            consumers: Vec::new(),
            subjects: Arc::new(Vec::new()),
            prefetch: 256,
        }
    }

    async fn context(&self) -> anyhow::Result<jetstream::Context> {
        Ok(jetstream::new(async_nats::connect(&self.url).await?))
    }
}

fn stream_config(
    name: &str,
    subject: &str,
    retention: RetentionPolicy,
    replicas: usize,
) -> StreamConfig {
    StreamConfig {
        name: name.into(),
        subjects: vec![subject.into()],
        retention,
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

fn consumer_config(name: &str, prefetch: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(name.into()),
        ack_policy: AckPolicy::Explicit,
        max_ack_pending: i64::from(prefetch),
        ..Default::default()
    }
}

struct NatsProducer {
    js: jetstream::Context,
    subjects: Arc<Vec<String>>,
}

impl Producer for NatsProducer {
    fn publish(
        &mut self,
        target: usize,
        payload: Vec<u8>,
    ) -> BoxFut<anyhow::Result<BoxFut<anyhow::Result<()>>>> {
        let js = self.js.clone();
        let subject = self.subjects[target].clone();
        Box::pin(async move {
            let ack = js.publish(subject, payload.into()).await?;
            Ok(Box::pin(async move {
                ack.await?;
                Ok(())
            }) as BoxFut<_>)
        })
    }
}

impl Driver for Nats {
    async fn prepare(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let js = self.context().await?;
        let run = format!("CMP_{}_{}", std::process::id(), crate::unique());
        let queues = spec.queues.max(1) as usize;
        self.prefetch = spec.prefetch;
        self.streams.clear();
        self.consumers.clear();
        let mut subjects = Vec::new();
        if spec.fanout {
            let (name, subject) = (format!("{run}_FAN"), format!("cmp.{run}.fan"));
            let stream = js
                .create_stream(stream_config(
                    &name,
                    &subject,
                    RetentionPolicy::Interest,
                    self.replicas,
                ))
                .await?;
            for i in 0..queues {
                let c = format!("c{i}");
                stream
                    .create_consumer(consumer_config(&c, spec.prefetch))
                    .await?;
                self.streams.push(name.clone());
                self.consumers.push(c);
            }
            subjects.push(subject);
        } else {
            for i in 0..queues {
                let (name, subject) = (format!("{run}_{i}"), format!("cmp.{run}.{i}"));
                let stream = js
                    .create_stream(stream_config(
                        &name,
                        &subject,
                        RetentionPolicy::WorkQueue,
                        self.replicas,
                    ))
                    .await?;
                stream
                    .create_consumer(consumer_config("c", spec.prefetch))
                    .await?;
                self.streams.push(name);
                self.consumers.push("c".into());
                subjects.push(subject);
            }
        }
        self.subjects = Arc::new(subjects);
        self.admin = Some(js);
        Ok(())
    }

    async fn producer(&self) -> anyhow::Result<Box<dyn Producer>> {
        Ok(Box::new(NatsProducer {
            js: self.context().await?,
            subjects: self.subjects.clone(),
        }))
    }

    async fn consumer(&self, queues: &[usize]) -> anyhow::Result<Deliveries> {
        let js = self.context().await?;
        let mut streams = Vec::new();
        for &q in queues {
            let stream = js.get_stream(&self.streams[q]).await?;
            let consumer: PullConsumer = stream
                .get_consumer(&self.consumers[q])
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.prefetch as usize)
                .messages()
                .await?;
            streams.push(
                messages
                    .then(move |m| async move {
                        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                        Ok((q, m.payload.to_vec()))
                    })
                    .boxed(),
            );
        }
        Ok(futures::stream::select_all(streams).boxed())
    }

    async fn cleanup(&mut self) -> anyhow::Result<()> {
        if let Some(js) = self.admin.take() {
            let mut names = self.streams.clone();
            names.dedup();
            for s in names {
                let _ = js.delete_stream(&s).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_parse() {
        let f = Flavor::parse("/opt/nats/bin/nats-server,sync=always").unwrap();
        assert_eq!(f.bin, PathBuf::from("/opt/nats/bin/nats-server"));
        assert!(f.sync_always);
        assert_eq!(f.max_count, None);
        let plain = Flavor::parse("nats-server").unwrap();
        assert!(!plain.sync_always);
        let capped = Flavor::parse("nats-server,count=5000,sync=always").unwrap();
        assert_eq!(capped.max_count, Some(5000));
        assert!(capped.sync_always);
        assert!(Flavor::parse("nats-server,count=many").is_err());
        assert_eq!(Flavor::parse("nats-server,replicas=3").unwrap().replicas, 3);
        assert!(Flavor::parse("nats-server,replicas=2").is_err());
        assert!(Flavor::parse("nats-server,fsync").is_err());
        assert!(Flavor::parse("").is_err());
    }

    #[test]
    fn config_file_listens_on_loopback_with_file_storage() {
        let c = config(4333, Path::new("/tmp/x/js"), true);
        assert!(c.contains("listen: 127.0.0.1:4333\n"));
        assert!(c.contains("store_dir: \"/tmp/x/js\"\n"));
        assert!(c.contains("sync_interval: always"));
        assert!(!config(4333, Path::new("/tmp/x/js"), false).contains("sync_interval"));
        let c = cluster_config(1, &[6001, 6002, 6003]);
        assert!(c.contains("server_name: n1\n"), "{c}");
        assert!(c.contains("listen: 127.0.0.1:6002\n"), "{c}");
        assert!(c.contains("nats-route://127.0.0.1:6003"), "{c}");
    }
}
