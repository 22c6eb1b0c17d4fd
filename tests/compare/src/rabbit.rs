//! RabbitMQ: a node of its own (`rabbitmq-server -detached`, own node name,
//! ports and directories, loopback only), the workload through `lapin`:
//! durable classic queues, persistent messages (delivery mode 2), publisher
//! confirms, `basic.qos` prefetch and one `basic.ack` per delivery. Fan-out
//! is a durable fanout exchange bound to every queue.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::harness::{BoxFut, Deliveries, Driver, Producer, Spec};

/// Where the RabbitMQ programs are.
#[derive(Debug, Clone)]
pub struct Tools {
    pub server: PathBuf,
    pub ctl: PathBuf,
}

/// `rabbitmqctl version`.
pub fn version(tools: &Tools) -> String {
    Command::new(&tools.ctl)
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A RabbitMQ node started for the comparison (stopped on drop), or one
/// that was running already.
pub struct Server {
    pub url: String,
    node: Option<(Tools, String, PathBuf)>,
}

/// The environment of our node: everything under `dir`, listeners on
/// loopback, no plugins.
pub fn node_env(dir: &Path, node: &str, port: u16, dist_port: u16) -> Vec<(String, String)> {
    let d = |s: &str| dir.join(s).display().to_string();
    [
        ("HOME", dir.display().to_string()),
        ("RABBITMQ_NODENAME", node.to_string()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
        ("RABBITMQ_NODE_PORT", port.to_string()),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        ("RABBITMQ_MNESIA_BASE", d("mnesia")),
        ("RABBITMQ_LOG_BASE", d("log")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
        ("RABBITMQ_CONFIG_FILE", d("rabbitmq")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        (
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Server {
    /// Use a running broker.
    pub fn existing(url: &str) -> Server {
        Server {
            url: url.into(),
            node: None,
        }
    }

    pub async fn start(tools: &Tools, dir: &Path) -> anyhow::Result<Server> {
        let port = crate::free_tcp_port()?;
        let dist_port = crate::free_tcp_port()?;
        let node = format!("sluicecmp{}@localhost", std::process::id());
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let env = node_env(dir, &node, port, dist_port);
        let status = Command::new(&tools.server)
            .arg("-detached")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot start {}", tools.server.display()))?;
        if !status.success() {
            bail!("{} -detached: {status}", tools.server.display());
        }
        let server = Server {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            node: Some((tools.clone(), node.clone(), dir.to_path_buf())),
        };
        // `await_startup` fails at once while the node is not registered
        // yet: retry until it answers.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let ctl = tools.ctl.clone();
            let home = dir.to_path_buf();
            let node = node.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new(ctl)
                    .env("HOME", home)
                    .args(["-n", &node, "await_startup", "--timeout", "60"])
                    .stdin(Stdio::null())
                    .output()
            })
            .await??;
            if out.status.success() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "rabbitmqctl await_startup: {}; logs in {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .next()
                        .unwrap_or_default(),
                    dir.join("log").display()
                );
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(server)
    }

    pub fn stop(&mut self) {
        if let Some((tools, node, home)) = self.node.take() {
            let _ = Command::new(&tools.ctl)
                .env("HOME", home)
                .args(["-n", &node, "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The harness workload on RabbitMQ.
pub struct Rabbit {
    url: String,
    admin: Option<(Connection, Channel)>,
    queues: Vec<String>,
    exchange: Option<String>,
    /// (exchange, routing key) of each publish target.
    targets: Arc<Vec<(String, String)>>,
    prefetch: u32,
}

impl Rabbit {
    pub fn new(server: &Server) -> Rabbit {
        Rabbit {
            url: server.url.clone(),
            admin: None,
            queues: Vec::new(),
            exchange: None,
            targets: Arc::new(Vec::new()),
            prefetch: 256,
        }
    }

    async fn channel(&self) -> anyhow::Result<(Connection, Channel)> {
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }
}

struct RabbitProducer {
    _conn: Connection,
    ch: Channel,
    targets: Arc<Vec<(String, String)>>,
}

impl Producer for RabbitProducer {
    fn publish(
        &mut self,
        target: usize,
        payload: Vec<u8>,
    ) -> BoxFut<anyhow::Result<BoxFut<anyhow::Result<()>>>> {
        let ch = self.ch.clone();
        let (exchange, key) = self.targets[target].clone();
        Box::pin(async move {
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            Ok(Box::pin(async move {
                let c = confirm.await?;
                if c.is_ack() { Ok(()) } else { bail!("nacked") }
            }) as BoxFut<_>)
        })
    }
}

impl Driver for Rabbit {
    async fn prepare(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let (conn, ch) = self.channel().await?;
        let run = format!("cmp-{}-{}", std::process::id(), crate::unique());
        self.prefetch = spec.prefetch;
        self.queues = (0..spec.queues.max(1))
            .map(|i| format!("{run}-{i}"))
            .collect();
        for q in &self.queues {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        }
        let targets = if spec.fanout {
            let ex = format!("{run}-fan");
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            for q in &self.queues {
                ch.queue_bind(
                    q.as_str().into(),
                    ex.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            self.exchange = Some(ex.clone());
            vec![(ex, String::new())]
        } else {
            // The default exchange routes by queue name.
            self.queues
                .iter()
                .map(|q| (String::new(), q.clone()))
                .collect()
        };
        self.targets = Arc::new(targets);
        self.admin = Some((conn, ch));
        Ok(())
    }

    async fn producer(&self) -> anyhow::Result<Box<dyn Producer>> {
        let (conn, ch) = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Box::new(RabbitProducer {
            _conn: conn,
            ch,
            targets: self.targets.clone(),
        }))
    }

    async fn consumer(&self, queues: &[usize]) -> anyhow::Result<Deliveries> {
        let (conn, ch) = self.channel().await?;
        // Per-consumer prefetch (global = false), like a subscription's.
        ch.basic_qos(
            self.prefetch.min(u32::from(u16::MAX)) as u16,
            BasicQosOptions::default(),
        )
        .await?;
        let conn = Arc::new(conn);
        let mut streams = Vec::new();
        for &q in queues {
            let consumer = ch
                .basic_consume(
                    self.queues[q].as_str().into(),
                    format!("c{q}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let conn = conn.clone();
            streams.push(
                consumer
                    .then(move |d| {
                        let _keep = conn.clone();
                        async move {
                            let d = d?;
                            d.ack(BasicAckOptions::default()).await?;
                            Ok((q, d.data))
                        }
                    })
                    .boxed(),
            );
        }
        Ok(futures::stream::select_all(streams).boxed())
    }

    async fn cleanup(&mut self) -> anyhow::Result<()> {
        if let Some((conn, ch)) = self.admin.take() {
            for q in self.queues.drain(..) {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            if let Some(ex) = self.exchange.take() {
                let _ = ch
                    .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "done".into()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_stays_on_loopback_and_in_its_directory() {
        let env = node_env(Path::new("/tmp/r"), "n@localhost", 5999, 25999);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("RABBITMQ_NODE_IP_ADDRESS"), Some("127.0.0.1"));
        assert_eq!(get("ERL_EPMD_ADDRESS"), Some("127.0.0.1"));
        assert_eq!(get("RABBITMQ_NODE_PORT"), Some("5999"));
        assert_eq!(get("RABBITMQ_MNESIA_BASE"), Some("/tmp/r/mnesia"));
        assert_eq!(get("HOME"), Some("/tmp/r"));
        assert!(
            get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS")
                .unwrap()
                .contains("{127,0,0,1}")
        );
    }
}
