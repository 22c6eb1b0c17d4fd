//! Managing plugins is authorized with their kind and attachment, end to end
//! in a running broker: a client the tenant's authorizer lets manage its own
//! filters cannot install, replace or remove the tenant's router or
//! authorizer, nor attach filters to other queues. The same with a
//! `sluice:plugin@0.1.0` authorizer, which keeps loading and fails closed.

use std::time::Duration;

use sluice_client::{Client, ClientError, ErrorCode, QueueSpec};
use sluice_tests::{Harness, wasm};

const WAIT: Duration = Duration::from_secs(20);

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[track_caller]
fn refused(r: Result<impl std::fmt::Debug, ClientError>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected unauthorized, got {v:?}"),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{what}: {e}"),
    }
}

/// A broker with tenant `acme`, its owner client (`app`, identity `acme`)
/// and a second client `ci` of the same tenant; queues `orders` and
/// `ci.jobs`.
async fn setup() -> (Harness, Client, Client) {
    let h = Harness::start().await;
    sluice::tls::issue_client_cert(&h.certs, Some("acme"), "ci", &h.certs.join("ci"), "sluice")
        .unwrap();
    let owner = h.client("acme").await;
    let ci = h.client("ci").await;
    for q in ["orders", "ci.jobs", "audit"] {
        owner.declare(QueueSpec::new(q)).await.unwrap();
    }
    (h, owner, ci)
}

async fn plugins(c: &Client) -> Vec<(String, String, Option<String>, String)> {
    let mut list: Vec<_> = c
        .list_plugins()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.kind, p.queue, p.abi))
        .collect();
    list.sort();
    list
}

fn entry(
    name: &str,
    kind: &str,
    queue: Option<&str>,
    abi: &str,
) -> (String, String, Option<String>, String) {
    (name.into(), kind.into(), queue.map(Into::into), abi.into())
}

/// What `ci` attempts under either authorizer, and what must hold after.
/// `acl_abi` is the contract version of the tenant's authorizer.
async fn ci_attempts(owner: &Client, ci: &Client, acl_abi: &str) {
    let load = |name: &'static str, kind: &'static str, queue: Option<&'static str>, plugin| {
        ci.load_plugin(name, kind, queue, wasm(plugin), kv(&[("default", "allow")]))
    };
    // An authorizer named like ci's plugins would become the tenant's.
    refused(
        tokio::time::timeout(WAIT, load("ci.x", "authorizer", None, "acl-authorizer"))
            .await
            .unwrap(),
        "ci loads an authorizer",
    );
    refused(
        ci.load_plugin("ci.r", "router", None, wasm("topic-router"), vec![])
            .await,
        "ci loads a router",
    );
    refused(
        ci.load_plugin(
            "ci.f",
            "filter",
            Some("orders"),
            wasm("header-filter"),
            vec![],
        )
        .await,
        "ci attaches a filter to orders",
    );
    ci.load_plugin(
        "ci.f",
        "filter",
        Some("ci.jobs"),
        wasm("header-filter"),
        vec![],
    )
    .await
    .expect("ci attaches its filter to ci.jobs");
    // Hot swap of the same filter in the same place is allowed.
    ci.load_plugin(
        "ci.f",
        "filter",
        Some("ci.jobs"),
        wasm("header-filter"),
        kv(&[("drop", "x")]),
    )
    .await
    .expect("ci replaces its filter on ci.jobs");
    refused(ci.unload_plugin("acl").await, "ci unloads the authorizer");
    // `admin` on a plugin by name is not `manage-policy`: ci may not remove
    // a router, even one named like its plugins.
    owner
        .load_plugin("ci.shared", "router", None, wasm("topic-router"), vec![])
        .await
        .unwrap();
    refused(ci.unload_plugin("ci.shared").await, "ci unloads a router");
    owner.unload_plugin("ci.shared").await.unwrap();
    refused(
        load("ci.f", "authorizer", None, "acl-authorizer").await,
        "ci replaces its filter by an authorizer",
    );
    // Moving the owner's filter `ci.g` from `orders` to ci's queue removes
    // it from `orders`: that needs the permission on `orders` too.
    owner
        .load_plugin(
            "ci.g",
            "filter",
            Some("orders"),
            wasm("header-filter"),
            vec![],
        )
        .await
        .unwrap();
    refused(
        ci.load_plugin(
            "ci.g",
            "filter",
            Some("ci.jobs"),
            wasm("header-filter"),
            vec![],
        )
        .await,
        "ci moves a filter off orders",
    );
    refused(
        ci.unload_plugin("ci.g").await,
        "ci unloads a filter of orders",
    );
    // An unknown name is asked about as a filter attached nowhere: a rule
    // for filters on some queues does not allow it (0.2.0); a 0.1.0 rule
    // `admin plugin:ci.*` does, and then the name is not found.
    let e = ci.unload_plugin("ci.nope").await.unwrap_err();
    let expected = match acl_abi {
        "0.2.0" => ErrorCode::Unauthorized,
        _ => ErrorCode::NotFound,
    };
    assert_eq!(e.code(), Some(expected), "ci unloads an unknown name: {e}");
    let e = owner.unload_plugin("ci.nope").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    // The authorizer is still the tenant's: what it denied stays denied.
    refused(ci.purge("orders").await, "ci purges orders");
    assert_eq!(
        plugins(owner).await,
        [
            entry("acl", "authorizer", None, acl_abi),
            entry("ci.f", "filter", Some("ci.jobs"), "0.2.0"),
            entry("ci.g", "filter", Some("orders"), "0.2.0"),
        ]
    );
    ci.unload_plugin("ci.f")
        .await
        .expect("ci unloads its own filter");
    // The owner still manages everything.
    owner
        .load_plugin("main", "router", None, wasm("topic-router"), vec![])
        .await
        .unwrap();
    owner.unload_plugin("main").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_management_is_authorized_by_kind_and_queue() {
    let (_h, owner, ci) = setup().await;
    owner
        .load_plugin(
            "acl",
            "authorizer",
            None,
            wasm("acl-authorizer"),
            kv(&[
                ("allow", "ci admin plugin:ci.*@ci.>"),
                ("allow", "ci admin plugin:ci.shared"),
                ("allow", "ci declare queue:>"),
                ("allow", "ci connect broker"),
                ("deny", "ci * *"),
                ("default", "allow"),
            ]),
        )
        .await
        .unwrap();
    ci_attempts(&owner, &ci, "0.2.0").await;

    // `manage-policy` is what replaces the authorizer; the owner holds it
    // (default allow) and can hand the tenant to another one.
    owner
        .load_plugin(
            "acl",
            "authorizer",
            None,
            wasm("acl-authorizer"),
            kv(&[
                ("allow", "ci manage-policy plugin:ci.*"),
                ("deny", "ci * *"),
                ("default", "allow"),
            ]),
        )
        .await
        .unwrap();
    ci.load_plugin("ci.r", "router", None, wasm("topic-router"), vec![])
        .await
        .expect("with manage-policy ci may install a router");
    refused(
        ci.load_plugin(
            "ci.f",
            "filter",
            Some("ci.jobs"),
            wasm("header-filter"),
            vec![],
        )
        .await,
        "manage-policy is not admin on filters",
    );
}

/// The same attempts with a `sluice:plugin@0.1.0` authorizer whose rules
/// were written for 0.1.0 (`admin plugin:ci.*`): it keeps loading, also
/// after a restart, and the compat mapping fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_0_authorizer_keeps_working_and_fails_closed() {
    let (mut h, owner, ci) = setup().await;
    let rules = kv(&[
        ("allow", "ci admin plugin:ci.*"),
        ("allow", "ci admin queue:ci.*"),
        ("allow", "ci declare queue:*"),
        ("allow", "ci connect broker"),
        ("deny", "ci * *"),
        ("default", "allow"),
    ]);
    owner
        .load_plugin("acl", "authorizer", None, wasm("v01-authorizer"), rules)
        .await
        .unwrap();
    ci_attempts(&owner, &ci, "0.1.0").await;

    // 0.1.0 routers and filters work in the broker too.
    owner
        .load_plugin(
            "main",
            "router",
            None,
            wasm("v01-router"),
            kv(&[("add", "audit")]),
        )
        .await
        .unwrap();
    ci.load_plugin(
        "ci.v",
        "filter",
        Some("ci.jobs"),
        wasm("v01-filter"),
        vec![],
    )
    .await
    .expect("ci attaches a 0.1.0 filter to ci.jobs");
    owner.bind("ci.jobs", "jobs.>").await.unwrap();
    let debug = vec![("level".to_string(), "debug".to_string())];
    owner
        .publish("jobs.a", vec![], b"kept".to_vec())
        .await
        .unwrap();
    owner
        .publish("jobs.b", debug, b"dropped".to_vec())
        .await
        .unwrap();
    let ready = |queues: Vec<sluice_client::QueueSummary>, name: &str| {
        queues.iter().find(|q| q.name == name).map(|q| q.ready)
    };
    let queues = owner.list_queues().await.unwrap();
    assert_eq!(ready(queues.clone(), "ci.jobs"), Some(1), "{queues:?}");
    assert_eq!(ready(queues.clone(), "audit"), Some(2), "{queues:?}");

    // After a restart the 0.1.0 authorizer is reloaded and still decides.
    drop((owner, ci));
    h.restart().await;
    let owner = h.client("acme").await;
    let ci = h.client("ci").await;
    let abis: Vec<_> = plugins(&owner)
        .await
        .into_iter()
        .map(|(name, _, _, abi)| (name, abi))
        .collect();
    assert_eq!(
        abis,
        [
            ("acl".to_string(), "0.1.0".to_string()),
            ("ci.g".into(), "0.2.0".into()),
            ("ci.v".into(), "0.1.0".into()),
            ("main".into(), "0.1.0".into()),
        ]
    );
    refused(
        ci.load_plugin(
            "ci.x",
            "authorizer",
            None,
            wasm("acl-authorizer"),
            kv(&[("default", "allow")]),
        )
        .await,
        "ci loads an authorizer after the restart",
    );
    refused(
        ci.purge("orders").await,
        "ci purges orders after the restart",
    );
}

/// A tenant holds at most `max_plugins_per_tenant` plugins: the next load
/// is `limit_exceeded`, replacing one of them by name is not a new one, and
/// an unload makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_per_tenant_are_bounded() {
    let h = Harness::start_with(|c| c.max_plugins_per_tenant = 3).await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    let load = |name: &'static str, config: Vec<(String, String)>| {
        a.load_plugin(name, "filter", Some("q"), wasm("header-filter"), config)
    };
    for name in ["f1", "f2", "f3"] {
        load(name, vec![]).await.unwrap();
    }
    let e = load("f4", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    assert!(e.to_string().contains("has 3 plugins (max 3)"), "{e}");
    // A router is a plugin like any other.
    let e = a
        .load_plugin("r", "router", None, wasm("topic-router"), vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    // Replacing f2 (a hot swap) is allowed at the limit.
    load("f2", kv(&[("drop", "x")])).await.unwrap();
    assert_eq!(a.list_plugins().await.unwrap().len(), 3);
    // Another tenant has its own three.
    let g = h.client("globex").await;
    g.declare(QueueSpec::new("q")).await.unwrap();
    g.load_plugin("f1", "filter", Some("q"), wasm("header-filter"), vec![])
        .await
        .unwrap();
    a.unload_plugin("f1").await.unwrap();
    load("f4", vec![]).await.unwrap();
    let names: Vec<_> = plugins(&a).await.into_iter().map(|p| p.0).collect();
    assert_eq!(names, ["f2", "f3", "f4"]);
}

/// Loads of one tenant running at the same time (in separate control and
/// plugin slots) cannot both pass the plugin count: exactly the bound wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_do_not_overshoot_the_plugin_bound() {
    let h = Harness::start_with(|c| {
        c.max_plugins_per_tenant = 3;
        c.plugin_concurrency_per_tenant = 8;
        c.control_concurrency_per_tenant = 8;
    })
    .await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    // Distinct components (distinct configs would share one compilation):
    // the count is checked before compiling, which takes a while.
    // One connection each: a connection's control requests run in order.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.client("acme").await);
    }
    let loads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let name = if i % 2 == 0 {
                "header-filter"
            } else {
                "redact-transform"
            };
            tokio::spawn(async move {
                a.load_plugin(&format!("f{i}"), "filter", Some("q"), wasm(name), vec![])
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for l in loads {
        match l.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}"),
        }
    }
    assert_eq!(ok, 3, "loads accepted");
    assert_eq!(a.list_plugins().await.unwrap().len(), 3);
}

/// Publishes `t` (bound to `q`): Ok(stored queues) or the refusal code.
async fn publish(c: &Client) -> Result<u32, Option<ErrorCode>> {
    c.publish("t", vec![], b"x".to_vec())
        .await
        .map_err(|e| e.code())
}

/// An authorizer that fails denies, whether it traps, panics or spins past
/// its deadline; one errored after repeated traps denies everything, also
/// what it allowed before (cached decisions are not used), and a new
/// connection. Nothing it failed on is ever allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_errored_authorizer_denies() {
    let h = Harness::start_with(|c| c.sandbox.trap_threshold = 3).await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "t").await.unwrap();
    let admin = h.client("admin").await.for_tenant(Some("acme".into()));
    let install = |mode: &str, on: Option<&str>| {
        let mut config = kv(&[("mode", mode)]);
        config.extend(on.map(|on| ("on".to_string(), on.to_string())));
        admin.load_plugin(
            "auth",
            "authorizer",
            None,
            wasm("hostile-authorizer"),
            config,
        )
    };

    // Each way of failing on `purge` denies it, with the kind of failure;
    // the other questions are allowed.
    for (mode, why) in [
        ("trap", "unreachable"),
        ("error", "hostile authorizer error"),
        ("spin", "deadline"),
    ] {
        install(mode, Some("purge")).await.unwrap();
        let e = a.purge("q").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{mode}: {e}");
        assert!(e.to_string().contains("authorizer failed"), "{mode}: {e}");
        assert!(e.to_string().contains(why), "{mode}: {e}");
        assert_eq!(publish(&a).await, Ok(1), "{mode}: publish is allowed");
    }
    install("deny-all", None).await.unwrap();
    let e = a.purge("q").await.unwrap_err();
    assert!(
        e.to_string().contains("denied by hostile-authorizer"),
        "{e}"
    );
    assert_eq!(publish(&a).await, Err(Some(ErrorCode::Unauthorized)));

    // Trapping on purge until errored (3 traps): the publish it allowed
    // (and the broker cached) is denied from then on, and so is connecting.
    install("trap", Some("purge")).await.unwrap();
    assert_eq!(publish(&a).await, Ok(1));
    for _ in 0..3 {
        let e = a.purge("q").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
    }
    let listed = a.list_plugins().await.unwrap();
    assert!(listed[0].state.starts_with("errored"), "{listed:?}");
    let e = a.purge("q").await.unwrap_err();
    assert!(e.to_string().contains("errored"), "{e}");
    assert_eq!(publish(&a).await, Err(Some(ErrorCode::Unauthorized)));
    let e = h
        .try_client("acme")
        .await
        .err()
        .expect("connecting is denied");
    assert!(e.to_string().contains("errored"), "{e}");
    // The repair path: an administrator reloads it.
    install("allow", None).await.unwrap();
    assert_eq!(publish(&a).await, Ok(1));
    a.purge("q").await.unwrap();
    h.client("acme").await;
}

/// A router that spins is stopped at its call deadline: the publish is
/// refused with `plugin_failed` naming the deadline, nothing is stored, and
/// the router answers the next publish. (Its own runtime, shut down without
/// waiting: were the deadline gone, the spinning call would keep a blocking
/// thread forever and the test would fail, not hang.)
#[test]
fn a_router_past_its_deadline_refuses_the_publish() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(router_past_its_deadline())
    }));
    rt.shutdown_background();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn router_past_its_deadline() {
    let h = Harness::start().await;
    let a = h.client("acme").await;
    a.declare(QueueSpec::new("q")).await.unwrap();
    a.bind("q", "t").await.unwrap();
    a.load_plugin("r", "router", None, wasm("hostile-router"), vec![])
        .await
        .unwrap();
    let spin = vec![("hostile".to_string(), "loop".to_string())];
    let e = tokio::time::timeout(WAIT, a.publish("t", spin, b"x".to_vec()))
        .await
        .expect("the deadline stops the router")
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{e}");
    assert!(e.to_string().contains("deadline"), "{e}");
    assert_eq!(a.list_queues().await.unwrap()[0].ready, 0);
    let r = &a.list_plugins().await.unwrap()[0];
    assert_eq!((r.traps, r.state.as_str()), (1, "ready"), "{r:?}");
    assert_eq!(publish(&a).await, Ok(1));
}
