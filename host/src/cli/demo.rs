//! `sluice demo`: an in-process broker with two tenants, the example
//! plugins loaded, and a table showing each policy at work.

use super::say;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sluice_client::{Client, QueueSpec};

use crate::broker::BrokerConfig;
use crate::bundled;
use crate::tls::ServerTlsFiles;

struct Table {
    rows: Vec<(String, String, bool)>,
}

impl Table {
    fn row(&mut self, what: &str, observed: String, ok: bool) {
        say!("  {} {what:<44} {observed}", if ok { "✔" } else { "✘" });
        self.rows.push((what.into(), observed, ok));
    }
}

fn wasm(name: &str) -> anyhow::Result<Vec<u8>> {
    bundled::wasm(name)
        .map(<[u8]>::to_vec)
        .with_context(|| format!("plugin `{name}` is not bundled"))
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn next(sub: &mut sluice_client::Subscription) -> Option<sluice_client::Delivery> {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .ok()
        .flatten()
}

pub(crate) async fn run() -> anyhow::Result<ExitCode> {
    let dir = tempfile_dir()?;
    let data = dir.join("data");
    let certs = dir.join("certs");
    crate::tls::init_dev_certs(&certs, &["acme".into(), "globex".into()], "sluice")?;
    let listen = "127.0.0.1:0".parse()?;
    let running = super::start(
        listen,
        &data,
        &ServerTlsFiles::from_dir(&certs),
        demo_config(&data),
        Default::default(),
    )
    .await?;
    let addr = running.addr;
    say!(
        "sluice demo: broker on {addr} (QUIC + mTLS), data in {}",
        data.display()
    );
    say!(
        "tenants `acme` and `globex`, each with its own certificate; plugin deadline 50 ms, memory cap 16 MiB\n"
    );
    let acme = Client::connect(addr, &certs.join("acme")).await?;
    let globex = Client::connect(addr, &certs.join("globex")).await?;

    for q in ["orders", "audit", "logs", "dead"] {
        acme.declare(QueueSpec::new(q)).await?;
    }
    acme.declare(QueueSpec::new("sandbox").dead_letter("dead"))
        .await?;
    acme.bind("orders", "orders.>").await?;
    acme.bind("logs", "app.>").await?;
    acme.bind("sandbox", "sandbox.>").await?;
    acme.load_plugin(
        "router",
        "router",
        None,
        wasm("topic-router")?,
        kv(&[("add.audit", "header:x-audit=1")]),
    )
    .await?;
    acme.load_plugin(
        "redact",
        "filter",
        Some("orders"),
        wasm("redact-transform")?,
        kv(&[("redact", "card.number"), ("non-json", "accept")]),
    )
    .await?;
    acme.load_plugin(
        "quiet",
        "filter",
        Some("logs"),
        wasm("header-filter")?,
        kv(&[("drop", "level=debug")]),
    )
    .await?;
    acme.load_plugin(
        "acl",
        "authorizer",
        None,
        wasm("acl-authorizer")?,
        kv(&[("deny", "* delete queue:>"), ("default", "allow")]),
    )
    .await?;
    acme.load_plugin("bomb", "filter", Some("sandbox"), wasm("hostile")?, vec![])
        .await?;
    say!(
        "acme loaded: topic-router (router), redact-transform + header-filter (filters), acl-authorizer, hostile (filter on `sandbox`)\n"
    );

    let mut t = Table { rows: Vec::new() };

    // Content routing.
    let n = acme
        .publish(
            "orders.eu.created",
            kv(&[("x-audit", "1")]),
            br#"{"id":7,"card":{"number":"4111111111111111"}}"#.to_vec(),
        )
        .await?;
    t.row(
        "routing: x-audit=1 also lands in `audit`",
        format!("stored in {n} queues (orders, audit)"),
        n == 2,
    );

    // Transform.
    let mut orders = acme.subscribe("orders", 10).await?;
    let d = next(&mut orders)
        .await
        .context("no delivery from `orders`")?;
    orders.ack(d.tag);
    let body = String::from_utf8_lossy(&d.payload).to_string();
    t.row(
        "transform: card number redacted in `orders`",
        body.clone(),
        body.contains("\"***\"") && !body.contains("4111"),
    );

    // Filtering.
    let kept = acme
        .publish("app.log", kv(&[("level", "info")]), b"started".to_vec())
        .await?;
    let dropped = acme
        .publish("app.log", kv(&[("level", "debug")]), b"noise".to_vec())
        .await?;
    t.row(
        "filter: level=debug dropped from `logs`",
        format!("info → {kept} queue, debug → {dropped} queues"),
        kept == 1 && dropped == 0,
    );

    // No route.
    let no_route = acme.publish("billing.x", vec![], b"?".to_vec()).await;
    t.row(
        "no route is reported, not dropped",
        no_route
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        no_route.is_err(),
    );

    // Authorization.
    let denied = acme.delete("audit").await;
    t.row(
        "authorizer: acme may not delete queues",
        denied
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        denied.is_err(),
    );
    let cross = acme.for_tenant(Some("globex".into())).list_queues().await;
    t.row(
        "isolation: acme cannot touch globex",
        cross
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        cross.is_err(),
    );
    globex.declare(QueueSpec::new("orders")).await?;
    let globex_orders = globex.list_queues().await?;
    t.row(
        "isolation: globex sees only its own `orders`",
        format!(
            "{} queue(s), ready={}",
            globex_orders.len(),
            globex_orders[0].ready
        ),
        globex_orders.len() == 1 && globex_orders[0].ready == 0,
    );

    // Hostile plugin.
    let start = std::time::Instant::now();
    acme.publish("sandbox.x", kv(&[("hostile", "loop")]), b"spin".to_vec())
        .await?;
    let mut dead = acme.subscribe("dead", 10).await?;
    let d = next(&mut dead).await.context("no dead letter")?;
    dead.ack(d.tag);
    let reason = d
        .headers
        .iter()
        .find(|(k, _)| k == "x-death-reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    t.row(
        "hostile: infinite loop stopped at its deadline",
        format!("{reason} ({} ms)", start.elapsed().as_millis()),
        reason.contains("deadline"),
    );
    acme.publish("sandbox.x", kv(&[("hostile", "alloc")]), b"bomb".to_vec())
        .await?;
    let d = next(&mut dead).await.context("no dead letter")?;
    dead.ack(d.tag);
    let reason = d
        .headers
        .iter()
        .find(|(k, _)| k == "x-death-reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    t.row(
        "hostile: memory bomb stopped at 16 MiB",
        reason.clone(),
        reason.contains("memory"),
    );
    let ok = acme.publish("sandbox.x", vec![], b"fine".to_vec()).await?;
    let plugins = acme.list_plugins().await?;
    let bomb = plugins.iter().find(|p| p.name == "bomb");
    t.row(
        "hostile: plugin recovers, broker keeps serving",
        format!(
            "next publish stored in {ok} queue; traps={}",
            bomb.map(|b| b.traps).unwrap_or(0)
        ),
        ok == 1 && bomb.is_some_and(|b| b.traps == 2),
    );
    drop(orders);
    drop(dead);

    // Restart.
    for i in 0..100u32 {
        acme.publish(
            "orders.eu.created",
            vec![],
            format!("{{\"id\":{i}}}").into_bytes(),
        )
        .await?;
    }
    acme.close();
    globex.close();
    running.server.close();
    running.broker.sync()?;
    let _ = tokio::time::timeout(Duration::from_secs(2), running.server.wait_idle()).await;
    let broker = running.broker;
    drop(running.server);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = super::start(
        addr,
        &data,
        &ServerTlsFiles::from_dir(&certs),
        demo_config(&data),
        Default::default(),
    )
    .await?;
    let acme = Client::connect(running.addr, &certs.join("acme")).await?;
    let mut orders = acme.subscribe("orders", 256).await?;
    let mut recovered = 0;
    while let Some(d) = next(&mut orders).await {
        orders.ack(d.tag);
        recovered += 1;
        if recovered == 100 {
            break;
        }
    }
    t.row(
        "restart: queued messages recovered",
        format!("{recovered} of 100 redelivered after restart"),
        recovered == 100,
    );
    acme.close();
    running.server.close();

    let failed = t.rows.iter().filter(|r| !r.2).count();
    say!(
        "\n{} of {} checks passed",
        t.rows.len() - failed,
        t.rows.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Default settings, but a 50 ms plugin deadline (instead of 10 ms) so the
/// memory bomb reliably hits its 16 MiB cap first even on a loaded machine.
fn demo_config(data: &std::path::Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(data);
    config.sandbox.call_deadline = Duration::from_millis(50);
    config
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
