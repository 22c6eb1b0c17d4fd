//! Prometheus text exposition (`sluice serve --metrics ADDR`, path `/metrics`).

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::{Broker, Quota, TenantUsage};
use crate::plugins::{LATENCY_BUCKETS_US, PluginState};

/// Escape a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The current metrics in Prometheus text format 0.0.4.
pub fn render(broker: &Broker) -> String {
    let (queues, plugins) = broker.snapshot();
    let mut out = String::with_capacity(4096);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "sluice_connections",
        "gauge",
        "Open client connections.",
    );
    let _ = writeln!(out, "sluice_connections {}", broker.connections());

    let tenants = broker.tenant_usage();
    type TenantField = fn(&TenantUsage) -> u64;
    let tenant_metrics: [(&str, &str, TenantField); 3] = [
        (
            "sluice_tenant_connections",
            "Open connections of the tenant.",
            |t| t.connections,
        ),
        ("sluice_tenant_queues", "Queues of the tenant.", |t| {
            t.queues
        }),
        (
            "sluice_tenant_stored_bytes",
            "Bytes stored across the tenant's queues.",
            |t| t.bytes,
        ),
    ];
    for (name, help, get) in tenant_metrics {
        family(&mut out, name, "gauge", help);
        for t in &tenants {
            let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", label(&t.name), get(t));
        }
    }
    family(
        &mut out,
        "sluice_tenant_limit",
        "gauge",
        "Configured quotas of the tenant (unset quotas are absent).",
    );
    for t in &tenants {
        for q in Quota::ALL {
            if let Some(limit) = q.limit(&t.limits) {
                let _ = writeln!(
                    out,
                    "sluice_tenant_limit{{tenant=\"{}\",quota=\"{}\"}} {limit}",
                    label(&t.name),
                    q.key()
                );
            }
        }
    }
    family(
        &mut out,
        "sluice_tenant_quota_refusals_total",
        "counter",
        "Requests (connections, declares, messages) refused by a quota of the tenant.",
    );
    for t in &tenants {
        for (q, n) in Quota::ALL.iter().zip(t.refused) {
            let _ = writeln!(
                out,
                "sluice_tenant_quota_refusals_total{{tenant=\"{}\",quota=\"{}\"}} {n}",
                label(&t.name),
                q.key()
            );
        }
    }

    family(
        &mut out,
        "sluice_tenant_plugins_not_running",
        "gauge",
        "Plugins of the tenant configured but not running (they fail closed).",
    );
    for t in &tenants {
        let _ = writeln!(
            out,
            "sluice_tenant_plugins_not_running{{tenant=\"{}\"}} {}",
            label(&t.name),
            t.plugins_not_running
        );
    }
    family(
        &mut out,
        "sluice_tenant_log_lines_suppressed_total",
        "counter",
        "Log lines caused by the tenant that the per-tenant log limit suppressed.",
    );
    for t in &tenants {
        let _ = writeln!(
            out,
            "sluice_tenant_log_lines_suppressed_total{{tenant=\"{}\"}} {}",
            label(&t.name),
            t.log_lines_suppressed
        );
    }

    family(
        &mut out,
        "sluice_tenant_plugin_cpu_share",
        "gauge",
        "Share of one core the tenant's plugins and other offloaded work used recently.",
    );
    for t in &tenants {
        let _ = writeln!(
            out,
            "sluice_tenant_plugin_cpu_share{{tenant=\"{}\"}} {:.3}",
            label(&t.name),
            t.cpu_share
        );
    }
    family(
        &mut out,
        "sluice_tenant_demoted_jobs_total",
        "counter",
        "Jobs of the tenant run at the lowest CPU priority (over plugin_cpu_share).",
    );
    for t in &tenants {
        let _ = writeln!(
            out,
            "sluice_tenant_demoted_jobs_total{{tenant=\"{}\"}} {}",
            label(&t.name),
            t.demoted_jobs
        );
    }

    type QueueField = fn(&crate::broker::QueueInfo) -> u64;
    let queue_metrics: [(&str, &str, &str, QueueField); 9] = [
        (
            "sluice_queue_ready",
            "gauge",
            "Messages ready for delivery.",
            |q| q.ready,
        ),
        (
            "sluice_queue_unacked",
            "gauge",
            "Messages delivered and not yet acked.",
            |q| q.unacked,
        ),
        (
            "sluice_queue_bytes",
            "gauge",
            "Stored bytes of the queue's messages.",
            |q| q.bytes,
        ),
        (
            "sluice_queue_consumers",
            "gauge",
            "Attached consumers.",
            |q| q.consumers,
        ),
        (
            "sluice_queue_published_total",
            "counter",
            "Messages stored in the queue.",
            |q| q.published,
        ),
        (
            "sluice_queue_delivered_total",
            "counter",
            "Deliveries.",
            |q| q.delivered,
        ),
        ("sluice_queue_acked_total", "counter", "Acks.", |q| q.acked),
        (
            "sluice_queue_dead_lettered_total",
            "counter",
            "Messages dead-lettered from the queue.",
            |q| q.dead_lettered,
        ),
        (
            "sluice_queue_dropped_total",
            "counter",
            "Messages dropped (filtered out, or dead without a dead-letter queue).",
            |q| q.dropped,
        ),
    ];
    for (name, kind, help, get) in queue_metrics {
        family(&mut out, name, kind, help);
        for q in &queues {
            let _ = writeln!(
                out,
                "{name}{{tenant=\"{}\",queue=\"{}\"}} {}",
                label(&q.tenant),
                label(&q.name),
                get(q)
            );
        }
    }

    family(
        &mut out,
        "sluice_plugin_calls_total",
        "counter",
        "Guest calls (a batch counts once).",
    );
    for p in &plugins {
        let _ = writeln!(
            out,
            "sluice_plugin_calls_total{{tenant=\"{}\",plugin=\"{}\",kind=\"{}\"}} {}",
            label(&p.tenant),
            label(&p.name),
            p.kind,
            p.metrics.calls
        );
    }
    family(
        &mut out,
        "sluice_plugin_errors_total",
        "counter",
        "Calls that returned an error or an oversized result.",
    );
    for p in &plugins {
        let _ = writeln!(
            out,
            "sluice_plugin_errors_total{{tenant=\"{}\",plugin=\"{}\"}} {}",
            label(&p.tenant),
            label(&p.name),
            p.metrics.guest_errors + p.metrics.output_rejected
        );
    }
    family(
        &mut out,
        "sluice_plugin_traps_total",
        "counter",
        "Traps by class; each discards the instance.",
    );
    for p in &plugins {
        let m = &p.metrics;
        for (class, n) in [
            ("deadline", m.traps_deadline),
            ("memory", m.traps_memory),
            ("panic", m.traps_panic),
            ("stack_overflow", m.traps_stack_overflow),
            ("other", m.traps_other),
        ] {
            let _ = writeln!(
                out,
                "sluice_plugin_traps_total{{tenant=\"{}\",plugin=\"{}\",class=\"{class}\"}} {n}",
                label(&p.tenant),
                label(&p.name)
            );
        }
    }
    family(
        &mut out,
        "sluice_plugin_errored",
        "gauge",
        "1 when the plugin refuses calls after repeated traps.",
    );
    for p in &plugins {
        let errored = matches!(p.state, PluginState::Errored { .. });
        let _ = writeln!(
            out,
            "sluice_plugin_errored{{tenant=\"{}\",plugin=\"{}\"}} {}",
            label(&p.tenant),
            label(&p.name),
            u8::from(errored)
        );
    }
    family(
        &mut out,
        "sluice_plugin_not_running",
        "gauge",
        "1 when the plugin is configured but could not be loaded; it fails closed.",
    );
    for p in &plugins {
        let down = matches!(p.state, PluginState::NotRunning { .. });
        let _ = writeln!(
            out,
            "sluice_plugin_not_running{{tenant=\"{}\",plugin=\"{}\",kind=\"{}\"}} {}",
            label(&p.tenant),
            label(&p.name),
            p.kind,
            u8::from(down)
        );
    }
    family(
        &mut out,
        "sluice_plugin_throttled_seconds_total",
        "counter",
        "Time calls slept after using plugin_throttle_after_us of CPU (a plugin keeping a core busy).",
    );
    for p in &plugins {
        let _ = writeln!(
            out,
            "sluice_plugin_throttled_seconds_total{{tenant=\"{}\",plugin=\"{}\"}} {}",
            label(&p.tenant),
            label(&p.name),
            p.metrics.throttled_ns as f64 / 1e9
        );
    }
    family(
        &mut out,
        "sluice_plugin_call_seconds",
        "histogram",
        "Guest call latency.",
    );
    for p in &plugins {
        let (t, n) = (label(&p.tenant), label(&p.name));
        let mut cumulative = 0;
        for (i, count) in p.metrics.latency_buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map(|us| format!("{}", *us as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(
                out,
                "sluice_plugin_call_seconds_bucket{{tenant=\"{t}\",plugin=\"{n}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "sluice_plugin_call_seconds_sum{{tenant=\"{t}\",plugin=\"{n}\"}} {}",
            p.metrics.time_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "sluice_plugin_call_seconds_count{{tenant=\"{t}\",plugin=\"{n}\"}} {}",
            p.metrics.calls
        );
    }
    out
}

fn leading(v: u8) -> String {
    format!(
        "# HELP sluice_leading Whether this process runs the broker (1 on a single node and on a cluster's leader).\n\
         # TYPE sluice_leading gauge\nsluice_leading {v}\n"
    )
}

/// The metrics of what serves clients: the broker's, or (a cluster node
/// that does not lead) only that it does not.
fn render_serving(serving: &crate::server::Serving) -> String {
    match serving {
        crate::server::Serving::Broker(broker) => render(broker) + &leading(1),
        crate::server::Serving::NotLeader(_) => leading(0),
    }
}

/// More metrics text appended to every response (a cluster node's Raft
/// gauges).
pub type Extra = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Serve `GET /metrics` on `addr` (plain HTTP/1.1, one response per
/// connection) for whatever `serving` holds at each request, and `extra`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    serving: tokio::sync::watch::Receiver<crate::server::Serving>,
    extra: Option<Extra>,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let now = serving.borrow().clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = match request.split_whitespace().nth(1) {
                Some("/metrics") => (
                    "200 OK",
                    render_serving(&now) + &extra.map(|f| f()).unwrap_or_default(),
                ),
                _ => ("404 Not Found", "try /metrics\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
