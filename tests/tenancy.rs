//! Multi-tenant hosting end to end: the tenant registry, quotas, isolation
//! of every client command, per-tenant plugins, noisy neighbours, live
//! revocation and tenant deletion.

use std::time::{Duration, Instant};

use sluice_client::{Client, ClientError, ErrorCode, QueueSpec, TenantQuota};
use sluice_tests::{Harness, wasm};

const WAIT: Duration = Duration::from_secs(10);

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_quotas() {
    let h = Harness::start().await;
    let admin = h.client("admin").await;
    admin
        .create_tenant(
            "acme",
            TenantQuota {
                max_connections: Some(2),
                max_queues: Some(2),
                max_stored_bytes: Some(4000),
                max_publish_rate: None,
                max_message_bytes: Some(500),
            },
        )
        .await
        .unwrap();
    let acme = h.client("acme").await;
    assert_eq!(
        code(acme.list_tenants().await),
        Some(ErrorCode::Unauthorized),
        "tenants cannot administer tenants"
    );
    assert_eq!(
        code(acme.create_tenant("acme", TenantQuota::default()).await),
        Some(ErrorCode::Unauthorized)
    );

    // Connections: acme holds one; a second is fine, a third is refused.
    let second = h.client("acme").await;
    let third = h.try_client("acme").await;
    assert!(
        matches!(&third, Err(ClientError::Server(e)) if e.code == ErrorCode::QuotaExceeded),
        "{:?}",
        third.err()
    );
    drop(second);

    // Queues.
    acme.declare(QueueSpec::new("a")).await.unwrap();
    acme.declare(QueueSpec::new("b")).await.unwrap();
    assert_eq!(
        code(acme.declare(QueueSpec::new("c")).await),
        Some(ErrorCode::QuotaExceeded)
    );

    // Message size and stored bytes.
    acme.bind("a", "t").await.unwrap();
    assert_eq!(
        code(acme.publish("t", vec![], vec![0; 600]).await),
        Some(ErrorCode::QuotaExceeded)
    );
    let mut stored = 0;
    loop {
        match acme.publish("t", vec![], vec![1; 400]).await {
            Ok(_) => stored += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
                break;
            }
        }
        assert!(stored < 20, "the byte quota must stop publishes");
    }
    assert!(stored >= 8, "about 4000 bytes fit: {stored}");

    // Other tenants are unaffected by acme's quotas.
    let globex = h.client("globex").await;
    for q in ["a", "b", "c"] {
        globex.declare(QueueSpec::new(q)).await.unwrap();
    }
    globex.bind("a", "t").await.unwrap();
    for _ in 0..20 {
        globex.publish("t", vec![], vec![1; 600]).await.unwrap();
    }

    // Rate: 20 msg/s, 200 published at once: most refused, the rest stored.
    admin
        .set_tenant_limits(
            "globex",
            TenantQuota {
                max_publish_rate: Some(20),
                ..TenantQuota::default()
            },
        )
        .await
        .unwrap();
    let results: Vec<_> = (0..200)
        .map(|_| globex.publish("t", vec![], vec![2]))
        .collect();
    let mut refused = 0;
    for r in results {
        if let Err(e) = r.await {
            assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded));
            refused += 1;
        }
    }
    assert!(refused >= 150, "rate limit refused {refused} of 200");

    let tenants = admin.list_tenants().await.unwrap();
    let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["acme", "globex"]);
    assert_eq!(tenants[0].limits.max_queues, Some(2));
    assert_eq!(tenants[0].queues, 2);
    assert!(tenants[0].bytes > 3000);

    // The metrics endpoint shows each tenant's usage, limits and refusals.
    let metrics = sluice::metrics::render(&h.running.as_ref().unwrap().broker);
    let value = |series: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        line[series.len()..].trim().parse().unwrap()
    };
    assert_eq!(value("sluice_tenant_queues{tenant=\"acme\"}"), 2);
    assert_eq!(value("sluice_tenant_connections{tenant=\"acme\"}"), 1);
    assert!(value("sluice_tenant_stored_bytes{tenant=\"acme\"}") > 3000);
    assert_eq!(
        value("sluice_tenant_limit{tenant=\"acme\",quota=\"max_stored_bytes\"}"),
        4000
    );
    assert!(!metrics.contains("sluice_tenant_limit{tenant=\"acme\",quota=\"max_publish_rate\"}"));
    let refusals = |tenant: &str, quota: &str| {
        value(&format!(
            "sluice_tenant_quota_refusals_total{{tenant=\"{tenant}\",quota=\"{quota}\"}}"
        ))
    };
    assert_eq!(refusals("acme", "max_connections"), 1);
    assert_eq!(refusals("acme", "max_queues"), 1);
    assert_eq!(refusals("acme", "max_message_bytes"), 1);
    assert_eq!(refusals("acme", "max_stored_bytes"), 1);
    assert_eq!(refusals("acme", "max_publish_rate"), 0);
    assert_eq!(refusals("globex", "max_publish_rate"), refused as u64);
    assert_eq!(refusals("globex", "max_queues"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_tenants_must_be_registered() {
    let h = Harness::start_with(|c| c.strict_tenants = true).await;
    let refused = h.try_client("acme").await;
    assert!(
        matches!(&refused, Err(ClientError::Server(e)) if e.code == ErrorCode::Unauthorized && e.message.contains("not registered")),
        "{:?}",
        refused.err()
    );
    h.client("admin")
        .await
        .create_tenant("acme", TenantQuota::default())
        .await
        .unwrap();
    h.client("acme")
        .await
        .declare(QueueSpec::new("q"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tenant_closes_its_connections_and_removes_its_data() {
    let mut h = Harness::start().await;
    let acme = h.client("acme").await;
    acme.declare(QueueSpec::new("q")).await.unwrap();
    acme.bind("q", "t").await.unwrap();
    acme.publish("t", vec![], b"x".to_vec()).await.unwrap();
    acme.load_plugin("f", "filter", Some("q"), wasm("header-filter"), vec![])
        .await
        .unwrap();
    let globex = h.client("globex").await;
    globex.declare(QueueSpec::new("q")).await.unwrap();

    h.client("admin").await.delete_tenant("acme").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while acme.list_queues().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "acme's connection must be closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Gone after a restart too; globex untouched.
    h.restart().await;
    let acme = h.client("acme").await;
    assert!(acme.list_queues().await.unwrap().is_empty());
    assert!(acme.list_plugins().await.unwrap().is_empty());
    assert_eq!(
        h.client("globex").await.list_queues().await.unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_disconnected_on_reload() {
    let h = Harness::start().await;
    sluice::tls::issue_client_cert(
        &h.certs,
        Some("acme"),
        "laptop",
        &h.certs.join("laptop"),
        "sluice",
    )
    .unwrap();
    let laptop = h.client("laptop").await;
    let other = h.client("acme").await;
    laptop.declare(QueueSpec::new("q")).await.unwrap();
    sluice::tls::revoke_cert(&h.certs, &h.certs.join("laptop/cert.pem")).unwrap();
    let running = h.running.as_ref().unwrap();
    let closed = running
        .reload_tls(&sluice::tls::ServerTlsFiles::from_dir(&h.certs))
        .unwrap();
    assert_eq!(closed, 1);
    let deadline = Instant::now() + WAIT;
    while laptop.list_queues().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the revoked client must be disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        h.try_client("laptop").await,
        Err(ClientError::CertificateRefused(_))
    ));
    other
        .list_queues()
        .await
        .expect("other clients stay connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizer_decisions_are_cached_and_invalidated_on_reload() {
    let h = Harness::start().await;
    let acme = h.client("acme").await;
    acme.declare(QueueSpec::new("q")).await.unwrap();
    let deny = vec![
        ("deny".to_string(), "* purge queue:q".to_string()),
        ("default".to_string(), "allow".to_string()),
    ];
    acme.load_plugin("acl", "authorizer", None, wasm("acl-authorizer"), deny)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(code(acme.purge("q").await), Some(ErrorCode::Unauthorized));
    }
    let plugins = acme.list_plugins().await.unwrap();
    let calls = plugins.iter().find(|p| p.name == "acl").unwrap().calls;
    assert!(
        calls < 3 + 2,
        "repeated decisions come from the cache: {calls} calls"
    );
    acme.load_plugin(
        "acl",
        "authorizer",
        None,
        wasm("acl-authorizer"),
        vec![("default".into(), "allow".into())],
    )
    .await
    .unwrap();
    acme.purge("q")
        .await
        .expect("the new authorizer allows purge");
    // The authorizer never crosses tenants: globex is not affected by acme's.
    let globex = h.client("globex").await;
    globex.declare(QueueSpec::new("q")).await.unwrap();
    globex.purge("q").await.unwrap();
}

/// Every client command × {own tenant, other tenant, admin with --tenant}.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix() {
    let h = Harness::start().await;
    let acme = h.client("acme").await;
    let globex = h.client("globex").await;
    let admin = h.client("admin").await;
    globex.declare(QueueSpec::new("inbox")).await.unwrap();
    globex.bind("inbox", "mail").await.unwrap();
    globex
        .publish("mail", vec![], b"secret".to_vec())
        .await
        .unwrap();

    async fn run_all(c: &Client) -> Vec<(&'static str, Result<(), ClientError>)> {
        fn ok<T>(r: Result<T, ClientError>) -> Result<(), ClientError> {
            r.map(|_| ())
        }
        vec![
            ("declare", ok(c.declare(QueueSpec::new("probe")).await)),
            ("bind", ok(c.bind("inbox", "x.>").await)),
            ("unbind", ok(c.unbind("inbox", "x.>").await)),
            ("list", ok(c.list_queues().await)),
            (
                "publish",
                ok(c.publish("mail", vec![], b"hi".to_vec()).await),
            ),
            ("purge", ok(c.purge("probe").await)),
            ("subscribe", ok(c.subscribe("inbox", 1).await.map(|_| ()))),
            (
                "plugin load",
                ok(
                    c.load_plugin("p", "filter", Some("inbox"), wasm("header-filter"), vec![])
                        .await,
                ),
            ),
            ("plugin list", ok(c.list_plugins().await)),
            ("plugin unload", ok(c.unload_plugin("p").await)),
            ("delete", ok(c.delete("probe").await)),
        ]
    }
    // acme acting on globex: every command denied, nothing leaks.
    for (what, r) in run_all(&acme.for_tenant(Some("globex".into()))).await {
        assert_eq!(
            r.err().and_then(|e| e.code()),
            Some(ErrorCode::Unauthorized),
            "acme → globex {what}"
        );
    }
    // globex on itself and the admin on globex: every command allowed.
    for c in [globex.clone(), admin.for_tenant(Some("globex".into()))] {
        for (what, r) in run_all(&c).await {
            assert!(r.is_ok(), "{what}: {:?}", r.err());
        }
    }
    // acme's own namespace: same name, no leak of globex's messages.
    acme.declare(QueueSpec::new("inbox")).await.unwrap();
    let mut sub = acme.subscribe("inbox", 10).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "0 leaks"
    );
    // An admin must name a tenant.
    assert_eq!(code(admin.list_queues().await), Some(ErrorCode::Invalid));
}

/// Tenant A's plugin spins on every message; tenant B's traffic goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_neighbour_does_not_stall_others() {
    // Keep A's plugin trapping for the whole test instead of being marked
    // errored after 5 traps.
    let h = Harness::start_with(|c| c.sandbox.trap_threshold = u32::MAX).await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q").dead_letter("dlq"))
        .await
        .unwrap();
    a.declare(QueueSpec::new("dlq")).await.unwrap();
    a.bind("q", "t").await.unwrap();
    a.load_plugin("spin", "filter", Some("q"), wasm("hostile"), vec![])
        .await
        .unwrap();
    let abuse = {
        let a = a.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(2) {
                let batch: Vec<_> = (0..8)
                    .map(|i| {
                        a.publish(
                            "t",
                            vec![(
                                "hostile".into(),
                                if i % 2 == 0 { "loop" } else { "alloc" }.into(),
                            )],
                            vec![],
                        )
                    })
                    .collect();
                for f in batch {
                    f.await.unwrap();
                    n += 1;
                }
            }
            n
        })
    };
    let b = h.client("globex").await;
    b.declare(QueueSpec::new("q")).await.unwrap();
    b.bind("q", "t").await.unwrap();
    b.load_plugin(
        "pass",
        "filter",
        Some("q"),
        wasm("header-filter"),
        vec![("drop".into(), "never".into())],
    )
    .await
    .unwrap();
    let mut sub = b.subscribe("q", 64).await.unwrap();
    let start = Instant::now();
    for i in 0..300u32 {
        b.publish("t", vec![], i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for _ in 0..300 {
        let d = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("B is served")
            .unwrap();
        sub.ack(d.tag);
    }
    let took = start.elapsed();
    let abused = abuse.await.unwrap();
    assert!(abused > 0);
    let spin = a
        .list_plugins()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == "spin")
        .unwrap();
    assert_eq!(
        spin.traps, abused as u64,
        "each of A's messages trapped and was counted: {spin:?}"
    );
    let dead = a
        .list_queues()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.name == "dlq")
        .unwrap();
    assert_eq!(
        dead.ready, abused as u64,
        "each of A's messages was dead-lettered with its reason"
    );
    // A's calls that spun were throttled once past their first millisecond
    // of CPU (operators see it per plugin); B's calls never were.
    let metrics = sluice::metrics::render(&h.running.as_ref().unwrap().broker);
    let throttled = |tenant: &str, plugin: &str| -> f64 {
        let series = format!(
            "sluice_plugin_throttled_seconds_total{{tenant=\"{tenant}\",plugin=\"{plugin}\"}} "
        );
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        line[series.len()..].trim().parse().unwrap()
    };
    assert!(throttled("acme", "spin") > 0.0, "{metrics}");
    assert_eq!(throttled("globex", "pass"), 0.0);
    println!(
        "noisy neighbour: B moved 300 messages in {took:?} while A's plugin trapped {} times",
        spin.traps
    );
}

/// `wasm` with a custom section appended: the same plugin, another digest,
/// so the broker compiles it again instead of taking it from its cache (a
/// load that takes a while).
/// Client `i` declares queues `{prefix}{i}-0` and `-1` and loads a filter
/// on each from a component of its own, so every load really compiles.
async fn load_two_filters(c: &Client, prefix: &str, i: usize) {
    for n in 0..2u32 {
        let queue = format!("{prefix}{i}-{n}");
        c.declare(QueueSpec::new(&queue)).await.unwrap();
        c.load_plugin(
            &format!("f{i}-{n}"),
            "filter",
            Some(&queue),
            distinct(&wasm("header-filter"), i as u32 * 10 + n),
            vec![],
        )
        .await
        .unwrap();
    }
}

fn distinct(wasm: &[u8], i: u32) -> Vec<u8> {
    fn leb(out: &mut Vec<u8>, mut n: usize) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"sluice-test";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&i.to_le_bytes());
    let mut out = wasm.to_vec();
    out.push(0);
    leb(&mut out, body.len());
    out.extend(body);
    out
}

/// One tenant calling its plugins every way at once, from 8 connections:
/// publishes through a router and a filter that spins ~10 ms a message
/// (within its deadline), control requests asked of its authorizer (each
/// queue name a new question), plugin loads that compile, and new
/// connections (the authorizer's `connect` question). Everything succeeds.
/// Returns what ran for the tenant.
async fn every_kind_of_plugin_call(h: &Harness) -> sluice::broker::TenantCalls {
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "t").await.unwrap();
    a.load_plugin(
        "route",
        "router",
        None,
        wasm("topic-router"),
        vec![("fallback".into(), "q".into())],
    )
    .await
    .unwrap();
    a.load_plugin("slow", "filter", Some("q"), wasm("hostile"), vec![])
        .await
        .unwrap();
    a.load_plugin(
        "acl",
        "authorizer",
        None,
        wasm("acl-authorizer"),
        vec![("default".into(), "allow".into())],
    )
    .await
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.client("acme").await);
    }
    let slow = || {
        vec![
            ("hostile".to_string(), "slow".to_string()),
            ("ms".to_string(), "10".to_string()),
        ]
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let identity = h.certs.join("acme");
        let addr = h.addr;
        tasks.spawn(async move {
            match i % 4 {
                // Publishers, 4 messages in flight each.
                0 | 1 => {
                    for _ in 0..3 {
                        let batch: Vec<_> =
                            (0..4).map(|_| c.publish("t", slow(), vec![1])).collect();
                        for f in batch {
                            assert_eq!(f.await.unwrap(), 1);
                        }
                    }
                }
                // Control requests: new names, new authorizer questions.
                2 => {
                    for n in 0..8 {
                        let name = format!("c{i}-{n}");
                        c.declare(QueueSpec::new(&name)).await.unwrap();
                        c.bind(&name, &format!("x.{i}.{n}")).await.unwrap();
                    }
                    for _ in 0..4 {
                        let again = Client::connect(addr, &identity).await.unwrap();
                        again.list_queues().await.unwrap();
                        again.close();
                    }
                }
                // Plugin loads (compile and `init`).
                _ => load_two_filters(&c, "l", i).await,
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    h.running.as_ref().unwrap().broker.tenant_calls("acme")
}

/// `plugin_concurrency_per_tenant`: every plugin call of a tenant (router,
/// filter, authorizer from a request or a connection, load with compile
/// and `init`) runs in one of its plugin slots, so however many run
/// concurrently the peak is the bound, for bounds 1 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_plugin_calls_run_at_most_n_at_once() {
    for bound in [1, 2] {
        let h = Harness::start_with(move |c| {
            c.plugin_concurrency_per_tenant = bound;
            // Control slots are not what limits here.
            c.control_concurrency_per_tenant = 8;
            // Demotion would put the calls on the few low-priority threads.
            c.plugin_cpu_share = f64::INFINITY;
            c.sandbox.call_deadline = Duration::from_secs(5);
            c.max_plugins_per_tenant = 32;
        })
        .await;
        let calls = every_kind_of_plugin_call(&h).await;
        println!("bound {bound}: {calls:?}");
        assert_eq!(
            calls.plugin_calls_peak, bound as u64,
            "at most {bound} plugin calls at once, and that many ran: {calls:?}"
        );
        assert_eq!(calls.plugin_calls_running, 0, "{calls:?}");
    }
}

/// "No plugin call runs on the async workers": every plugin call of the
/// workload above (with a tiny CPU share, so the tenant is demoted to the
/// low-priority threads on the way) runs inside the broker's offload pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_calls_do_not_run_on_the_async_workers() {
    let h = Harness::start_with(|c| {
        c.sandbox.call_deadline = Duration::from_secs(5);
        c.max_plugins_per_tenant = 32;
        // Any real plugin work is over this share: the tenant's calls move
        // to the low-priority threads, which must count as offloaded too.
        c.plugin_cpu_share = 0.01;
    })
    .await;
    let calls = every_kind_of_plugin_call(&h).await;
    println!("{calls:?}");
    assert!(calls.plugin_calls_peak >= 1, "plugins ran: {calls:?}");
    assert_eq!(
        calls.plugin_calls_outside_offload, 0,
        "plugin calls made on an async worker: {calls:?}"
    );
    let usage = h.running.as_ref().unwrap().broker.tenant_usage();
    let acme = usage.iter().find(|u| u.name == "acme").unwrap();
    assert!(
        acme.demoted_jobs > 0,
        "the spinning filter demoted the tenant, so the low-priority threads ran calls too"
    );
}

/// `control_concurrency_per_tenant` (2): control requests of one tenant
/// from 8 connections at once (plugin loads that compile, declares) run at
/// most two at a time, and two did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_control_requests_run_at_most_n_at_once() {
    let h = Harness::start_with(|c| {
        // Plugin slots are not what limits here.
        c.plugin_concurrency_per_tenant = 16;
        c.max_plugins_per_tenant = 32;
    })
    .await;
    assert_eq!(
        h.running
            .as_ref()
            .unwrap()
            .broker
            .config()
            .control_concurrency_per_tenant,
        2
    );
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.client("acme").await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.spawn(async move { load_two_filters(&c, "q", i).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let calls = h.running.as_ref().unwrap().broker.tenant_calls("acme");
    println!("{calls:?}");
    assert_eq!(calls.control_peak, 2, "{calls:?}");
    assert_eq!(calls.control_running, 0, "{calls:?}");
}
