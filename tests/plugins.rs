//! The plugin runtime with the real components built from `plugins/`: each
//! example plugin's behaviour, each hostile behaviour contained and
//! classified, refused components, the compile cache, hot swap and batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice::plugins::{
    Abi, Action, Binding, Decision, FailureKind, FilterVerdict, LoadError, PluginKind, PluginRef,
    PluginRegistry, PluginSpec, PluginState, Principal, Replacement, Resource, RouteRequest,
    SandboxConfig, WitPluginKind,
};
use sluice_tests::{c_header_filter, load, msg, relaxed, runtime, spec, strings, workspace_root};

fn principal(client: &str) -> Principal {
    Principal {
        tenant: "acme".into(),
        client: client.into(),
        subject: format!("CN={client},O=acme"),
        sans: vec![format!("spiffe://sluice/tenant/acme/{client}")],
        admin: false,
    }
}

// ---------------------------------------------------------------- examples

#[test]
fn topic_router_routes_by_content() {
    let rt = runtime(relaxed());
    let router = load(
        &rt,
        "topic-router",
        PluginKind::Router,
        &[
            ("add.audit", "header:x-audit=1"),
            ("add.eu-orders", "topic:orders.eu.>"),
            ("remove.bulk", "prefix:DEBUG"),
            ("reject-if", "header:x-block"),
            ("fallback", "unrouted"),
        ],
    );
    let candidates = strings(&["bulk", "main"]);

    let plain = router
        .route(&msg("orders.us.new", &[], b"hello"), &candidates)
        .unwrap();
    assert_eq!(plain, strings(&["bulk", "main"]));

    let audited = router
        .route(
            &msg("orders.eu.new", &[("x-audit", "1")], b"hello"),
            &candidates,
        )
        .unwrap();
    assert_eq!(audited, strings(&["bulk", "main", "audit", "eu-orders"]));

    let debug = router
        .route(&msg("orders.us.new", &[], b"DEBUG x"), &candidates)
        .unwrap();
    assert_eq!(debug, strings(&["main"]));

    let nothing = router
        .route(&msg("x", &[], b"DEBUG"), &strings(&["bulk"]))
        .unwrap();
    assert_eq!(
        nothing,
        strings(&["unrouted"]),
        "fallback when the result is empty"
    );

    let refused = router
        .route(&msg("orders.us.new", &[("x-block", "y")], b""), &candidates)
        .unwrap_err();
    assert_eq!(refused.kind, FailureKind::Guest);
    assert!(
        refused.message.contains("rejected by topic-router"),
        "{refused}"
    );

    // The same decisions through the batch entry point.
    let batch = router
        .route_batch(&[
            RouteRequest {
                msg: msg("orders.us.new", &[], b"hello"),
                candidates: candidates.clone(),
            },
            RouteRequest {
                msg: msg("orders.us.new", &[("x-block", "y")], b""),
                candidates: candidates.clone(),
            },
            RouteRequest {
                msg: msg("orders.eu.a", &[], b"DEBUG"),
                candidates: candidates.clone(),
            },
        ])
        .unwrap();
    assert_eq!(batch[0], Ok(strings(&["bulk", "main"])));
    assert!(
        batch[1]
            .as_ref()
            .unwrap_err()
            .contains("rejected by topic-router")
    );
    assert_eq!(batch[2], Ok(strings(&["main", "eu-orders"])));
    let m = router.metrics();
    assert_eq!(m.traps(), 0);
    assert_eq!(m.guest_errors, 2);
}

#[test]
fn topic_router_refuses_a_bad_rule_at_load() {
    let rt = runtime(relaxed());
    let err = rt
        .load(spec(
            "topic-router",
            PluginKind::Router,
            &[("add.q", "colour:blue")],
        ))
        .unwrap_err();
    assert!(
        matches!(err, LoadError::Init(ref f) if f.kind == FailureKind::Instantiate),
        "{err}"
    );
    assert!(
        err.to_string().contains("add.q"),
        "error names the key: {err}"
    );
}

#[test]
fn header_filter_drops_by_header() {
    let rt = runtime(relaxed());
    let filter = load(
        &rt,
        "header-filter",
        PluginKind::Filter,
        &[
            ("drop", "level=debug"),
            ("require", "trace-id"),
            ("max-payload", "8"),
        ],
    );
    let ok = filter
        .filter(&msg("t", &[("trace-id", "1"), ("level", "info")], b"small"))
        .unwrap();
    assert_eq!(ok, FilterVerdict::Accept);
    let debug = filter
        .filter(&msg("t", &[("trace-id", "1"), ("level", "debug")], b"x"))
        .unwrap();
    assert!(
        matches!(debug, FilterVerdict::Drop(ref r) if r.contains("level=debug")),
        "{debug:?}"
    );
    let untraced = filter.filter(&msg("t", &[], b"x")).unwrap();
    assert!(
        matches!(untraced, FilterVerdict::Drop(ref r) if r.contains("trace-id")),
        "{untraced:?}"
    );
    let big = filter
        .filter(&msg("t", &[("trace-id", "1")], b"123456789"))
        .unwrap();
    assert!(matches!(big, FilterVerdict::Drop(_)), "{big:?}");

    let batch = filter
        .filter_batch(&[msg("t", &[("trace-id", "1")], b"a"), msg("t", &[], b"b")])
        .unwrap();
    assert_eq!(batch[0], Ok(FilterVerdict::Accept));
    assert!(matches!(batch[1], Ok(FilterVerdict::Drop(_))));
}

#[test]
fn redact_transform_rewrites_json() {
    let rt = runtime(relaxed());
    let filter = load(
        &rt,
        "redact-transform",
        PluginKind::Filter,
        &[
            ("redact", "card.number"),
            ("remove", "password"),
            ("remove-header", "authorization"),
            ("set-header", "redacted:yes"),
        ],
    );
    let input = br#"{"user":"ann","password":"hunter2","card":{"number":"4111111111111111","exp":"12/29"}}"#;
    let out = filter
        .filter(&msg(
            "pay",
            &[("authorization", "Bearer x"), ("k", "v")],
            input,
        ))
        .unwrap();
    let FilterVerdict::Replace(r) = out else {
        panic!("expected a replacement, got {out:?}")
    };
    let json: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(json["card"]["number"], "***");
    assert_eq!(json["card"]["exp"], "12/29");
    assert_eq!(json["user"], "ann");
    assert!(json.get("password").is_none());
    assert!(!r.headers.iter().any(|(k, _)| k == "authorization"));
    assert!(r.headers.contains(&("redacted".into(), "yes".into())));
    assert!(r.headers.contains(&("k".into(), "v".into())));

    let not_json = filter.filter(&msg("pay", &[], b"plain text")).unwrap_err();
    assert_eq!(not_json.kind, FailureKind::Guest);
    assert!(not_json.message.contains("not JSON"), "{not_json}");
}

#[test]
fn acl_authorizer_applies_rules_in_order() {
    let rt = runtime(relaxed());
    let acl = load(
        &rt,
        "acl-authorizer",
        PluginKind::Authorizer,
        &[
            ("deny", "* delete queue:>"),
            ("allow", "ingest publish topic:orders.>"),
            ("allow", "* subscribe queue:orders.*"),
            ("allow", "* connect broker"),
        ],
    );
    let ingest = principal("ingest");
    let allow = |who: &Principal, action, on: Resource| acl.authorize(who, action, &on).unwrap();
    assert_eq!(
        allow(
            &ingest,
            Action::Publish,
            Resource::Topic("orders.eu.new".into())
        ),
        Decision::Allow
    );
    assert_eq!(
        allow(&ingest, Action::Connect, Resource::Broker),
        Decision::Allow
    );
    assert_eq!(
        allow(
            &ingest,
            Action::Subscribe,
            Resource::Queue("orders.eu".into())
        ),
        Decision::Allow
    );
    let other = principal("reporting");
    let d = allow(
        &other,
        Action::Publish,
        Resource::Topic("orders.eu.new".into()),
    );
    assert!(
        matches!(d, Decision::Deny(ref r) if r.contains("default")),
        "{d:?}"
    );
    let d = allow(&ingest, Action::Delete, Resource::Queue("orders.eu".into()));
    assert!(
        matches!(d, Decision::Deny(ref r) if r.contains("rule 1")),
        "{d:?}"
    );
    let d = allow(
        &ingest,
        Action::Bind,
        Resource::Binding(Binding {
            queue: "orders.eu".into(),
            pattern: "orders.>".into(),
        }),
    );
    assert!(matches!(d, Decision::Deny(_)), "{d:?}");
}

/// The 0.2.0 authorizer sees kind and attachment of a plugin across the
/// component boundary (`plugin:NAME@QUEUE` rules) and `manage-policy`.
#[test]
fn acl_authorizer_sees_plugin_kind_and_queue() {
    let rt = runtime(relaxed());
    let acl = load(
        &rt,
        "acl-authorizer",
        PluginKind::Authorizer,
        &[
            ("allow", "ci admin plugin:ci.*@ci.>"),
            ("allow", "lead manage-policy plugin:>"),
            ("deny", "* * *"),
        ],
    );
    assert_eq!(acl.abi(), Abi::V0_2);
    let ci = principal("ci");
    let ask = |who: &Principal, action, kind, queue: Option<&str>| {
        let on = Resource::Plugin(PluginRef {
            name: "ci.x".into(),
            kind,
            queue: queue.map(Into::into),
        });
        acl.authorize(who, action, &on).unwrap()
    };
    let filter = WitPluginKind::Filter;
    assert_eq!(
        ask(&ci, Action::Admin, filter, Some("ci.jobs")),
        Decision::Allow
    );
    assert!(matches!(
        ask(&ci, Action::Admin, filter, Some("orders")),
        Decision::Deny(_)
    ));
    assert!(matches!(
        ask(&ci, Action::ManagePolicy, WitPluginKind::Authorizer, None),
        Decision::Deny(_)
    ));
    assert_eq!(
        ask(
            &principal("lead"),
            Action::ManagePolicy,
            WitPluginKind::Router,
            None
        ),
        Decision::Allow
    );
}

// ---------------------------------------------------------------- sluice:plugin@0.1.0

/// `wit/` holds only the 0.2.0 package (`wit/0.1.0/` is a subdirectory
/// wit-parser does not read), `wit/0.1.0/` only the 0.1.0 one.
#[test]
fn wit_directories_hold_one_version_each() {
    use wit_bindgen_core::wit_parser::Resolve;
    let root = workspace_root();
    for (dir, version) in [("wit", "0.2.0"), ("wit/0.1.0", "0.1.0")] {
        let mut resolve = Resolve::default();
        resolve.push_path(root.join(dir)).unwrap();
        let names: Vec<String> = resolve
            .packages
            .iter()
            .map(|(_, p)| p.name.to_string())
            .collect();
        assert_eq!(names, [format!("sluice:plugin@{version}")], "{dir}");
    }
}

#[test]
fn v01_filter_loads_and_filters() {
    let rt = runtime(relaxed());
    let filter = load(
        &rt,
        "v01-filter",
        PluginKind::Filter,
        &[("tag", "seen=v01"), ("fail", "boom")],
    );
    assert_eq!(filter.abi(), Abi::V0_1);
    assert_eq!(filter.abi().version(), "0.1.0");
    let debug = filter
        .filter(&msg("t", &[("level", "debug")], b"x"))
        .unwrap();
    assert_eq!(
        debug,
        FilterVerdict::Drop("v01-filter drops level=debug".into())
    );
    let tagged = filter.filter(&msg("t", &[("k", "v")], b"body")).unwrap();
    assert_eq!(
        tagged,
        FilterVerdict::Replace(Replacement {
            headers: vec![("k".into(), "v".into()), ("seen".into(), "v01".into())],
            payload: b"body".to_vec(),
        })
    );
    let failed = filter.filter(&msg("t", &[("boom", "")], b"")).unwrap_err();
    assert_eq!(failed.kind, FailureKind::Guest);
    assert!(failed.message.contains("header boom"), "{failed}");

    let batch = filter
        .filter_batch(&[
            msg("t", &[("level", "debug")], b""),
            msg("t", &[("boom", "1")], b""),
            msg("t", &[], b"p"),
        ])
        .unwrap();
    assert!(matches!(batch[0], Ok(FilterVerdict::Drop(_))), "{batch:?}");
    assert!(batch[1].as_ref().unwrap_err().contains("header boom"));
    assert!(
        matches!(batch[2], Ok(FilterVerdict::Replace(_))),
        "{batch:?}"
    );

    let plain = load(&rt, "v01-filter", PluginKind::Filter, &[]);
    assert_eq!(
        plain.filter(&msg("t", &[], b"")).unwrap(),
        FilterVerdict::Accept
    );
    let m = plain.metrics();
    assert_eq!((m.traps(), m.instantiations), (0, 1));
}

#[test]
fn v01_router_loads_and_routes() {
    let rt = runtime(relaxed());
    let router = load(
        &rt,
        "v01-router",
        PluginKind::Router,
        &[
            ("add", "audit"),
            ("reject-if", "x-block"),
            ("topic-queue", "yes"),
        ],
    );
    assert_eq!(router.abi(), Abi::V0_1);
    let targets = router
        .route(&msg("orders.eu", &[], b""), &strings(&["main"]))
        .unwrap();
    assert_eq!(targets, strings(&["main", "audit", "orders"]));
    let refused = router
        .route(&msg("orders.eu", &[("x-block", "1")], b""), &[])
        .unwrap_err();
    assert!(
        refused.message.contains("rejected by v01-router"),
        "{refused}"
    );
    let batch = router
        .route_batch(&[
            RouteRequest {
                msg: msg("a.b", &[], b""),
                candidates: strings(&["audit"]),
            },
            RouteRequest {
                msg: msg("a.b", &[("x-block", "")], b""),
                candidates: vec![],
            },
        ])
        .unwrap();
    assert_eq!(batch[0], Ok(strings(&["audit", "a"])));
    assert!(batch[1].as_ref().unwrap_err().contains("v01-router"));
}

/// A 0.1.0 authorizer answers 0.2.0 questions through the compat mapping:
/// `manage-policy` on a plugin also needs `admin` on the tenant, `admin` on a
/// filter also needs `admin` on its queue; the rest maps one to one.
#[test]
fn v01_authorizer_is_asked_through_the_compat_mapping() {
    let rt = runtime(relaxed());
    let acl = load(
        &rt,
        "v01-authorizer",
        PluginKind::Authorizer,
        &[
            ("allow", "* admin plugin:ci.*"),
            ("allow", "* admin queue:ci.*"),
            ("deny", "* admin tenant:*"),
            ("deny", "* purge queue:orders"),
            ("deny", "* admin *"),
            ("default", "allow"),
        ],
    );
    assert_eq!(acl.abi(), Abi::V0_1);
    let ci = principal("ci");
    let plugin = |name: &str, kind, queue: Option<&str>| {
        Resource::Plugin(PluginRef {
            name: name.into(),
            kind,
            queue: queue.map(Into::into),
        })
    };
    let decide = |action, on: Resource| acl.authorize(&ci, action, &on).unwrap();
    let denied_by = |d: Decision, rule: &str| match d {
        Decision::Deny(reason) => assert!(reason.contains(rule), "{reason} (want {rule})"),
        Decision::Allow => panic!("allowed, want a deny by {rule}"),
    };

    // A filter on an allowed queue: both questions allow.
    assert_eq!(
        decide(
            Action::Admin,
            plugin("ci.f", WitPluginKind::Filter, Some("ci.jobs"))
        ),
        Decision::Allow
    );
    // The same filter on another queue: `admin queue:orders` denies.
    denied_by(
        decide(
            Action::Admin,
            plugin("ci.f", WitPluginKind::Filter, Some("orders")),
        ),
        "rule 5",
    );
    // The tenant's authorizer or router: `admin plugin:ci.x` alone would
    // allow, `admin tenant:acme` denies.
    for kind in [WitPluginKind::Authorizer, WitPluginKind::Router] {
        denied_by(
            decide(Action::ManagePolicy, plugin("ci.x", kind, None)),
            "rule 3: deny * admin tenant:*",
        );
    }
    // A name the old rules do not allow is denied on the first question.
    denied_by(
        decide(
            Action::Admin,
            plugin("other", WitPluginKind::Filter, Some("ci.jobs")),
        ),
        "rule 5",
    );
    // One to one for everything else.
    denied_by(
        decide(Action::Purge, Resource::Queue("orders".into())),
        "rule 4",
    );
    assert_eq!(
        decide(Action::Purge, Resource::Queue("ci.jobs".into())),
        Decision::Allow
    );
    assert_eq!(
        decide(Action::Publish, Resource::Topic("orders.eu".into())),
        Decision::Allow
    );
    denied_by(decide(Action::ManagePolicy, Resource::Broker), "rule 5");

    // The tenant asked about is the principal's own.
    let other_tenant = load(
        &rt,
        "v01-authorizer",
        PluginKind::Authorizer,
        &[("deny", "* admin tenant:globex"), ("default", "allow")],
    );
    let on = plugin("ci.x", WitPluginKind::Authorizer, None);
    assert_eq!(
        other_tenant
            .authorize(&ci, Action::ManagePolicy, &on)
            .unwrap(),
        Decision::Allow
    );
    let only_acme = load(
        &rt,
        "v01-authorizer",
        PluginKind::Authorizer,
        &[("deny", "* admin tenant:acme"), ("default", "allow")],
    );
    assert!(matches!(
        only_acme.authorize(&ci, Action::ManagePolicy, &on).unwrap(),
        Decision::Deny(_)
    ));
    assert_eq!(acl.metrics().traps(), 0);
}

/// Components built with the SDK and the C bindings are 0.2.0 ones.
#[test]
fn sdk_components_are_0_2_0() {
    let rt = runtime(relaxed());
    for (name, kind) in [
        ("topic-router", PluginKind::Router),
        ("header-filter", PluginKind::Filter),
        ("acl-authorizer", PluginKind::Authorizer),
    ] {
        assert_eq!(load(&rt, name, kind, &[]).abi(), Abi::V0_2, "{name}");
    }
    let c = rt
        .load(PluginSpec {
            wasm: c_header_filter(),
            ..spec("header-filter", PluginKind::Filter, &[])
        })
        .unwrap();
    assert_eq!(c.abi(), Abi::V0_2);
}

// ---------------------------------------------------------------- hostile

/// Deadlines far above the CPU time of legitimate work (copying a 12 MiB
/// result in an unoptimized test build takes ~70 ms; deadlines are CPU time,
/// so a loaded machine does not change that). The spinning cases, which can
/// never finish, pay the whole deadline.
fn hostile_config() -> SandboxConfig {
    SandboxConfig {
        call_deadline: Duration::from_millis(1000),
        init_deadline: Duration::from_millis(500),
        trap_threshold: 100,
        pool_instances: 32,
        // What these tests check does not depend on the throttle of long
        // calls (it would make each spinning call ten times as long);
        // `spinning_calls_are_throttled_after_a_millisecond` tests it.
        throttle_percent: 100,
        ..SandboxConfig::default()
    }
}

/// Every hostile behaviour is contained, classified, and the plugin answers
/// correctly on its next call.
#[test]
fn hostile_behaviours_are_contained_and_classified() {
    let rt = runtime(hostile_config());
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let cases = [
        ("loop", FailureKind::Deadline),
        ("alloc", FailureKind::Memory),
        ("panic", FailureKind::Panic),
        ("recurse", FailureKind::StackOverflow),
        ("big-output", FailureKind::Output),
        ("error", FailureKind::Guest),
    ];
    for (mode, expected) in cases {
        let failure = hostile
            .filter(&msg("t", &[("hostile", mode)], b""))
            .expect_err(mode);
        assert_eq!(failure.kind, expected, "{mode}: {failure}");
        assert_eq!(failure.plugin, "hostile");
        let next = hostile
            .filter(&msg("t", &[], b""))
            .unwrap_or_else(|e| panic!("after {mode}: {e}"));
        assert_eq!(next, FilterVerdict::Accept, "after {mode}");
    }
    let panic = hostile
        .filter(&msg("t", &[("hostile", "panic")], b""))
        .unwrap_err();
    assert!(
        panic.message.contains("hostile panic"),
        "panic message reported: {panic}"
    );

    let m = hostile.metrics();
    assert_eq!(m.traps_deadline, 1);
    assert_eq!(m.traps_memory, 1);
    assert_eq!(m.traps_panic, 2);
    assert_eq!(m.traps_stack_overflow, 1);
    assert_eq!(m.output_rejected, 1);
    assert_eq!(m.guest_errors, 1);
    assert_eq!(
        m.instantiations,
        1 + 4,
        "the load, then a fresh instance for the call after each of the 4 traps in the loop"
    );
    assert_eq!(hostile.state(), PluginState::Ready);
}

#[test]
fn log_flood_is_bounded() {
    let rt = runtime(relaxed());
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let out = hostile
        .filter(&msg("t", &[("hostile", "log-flood")], b""))
        .unwrap();
    assert_eq!(out, FilterVerdict::Accept);
    let kept = rt.config().max_log_lines_per_call as u64;
    assert_eq!(hostile.metrics().logs_dropped, 10_000 - kept);
}

#[test]
fn too_many_headers_are_refused() {
    let rt = runtime(relaxed());
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let f = hostile
        .filter(&msg("t", &[("hostile", "many-headers")], b""))
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert!(f.message.contains("20000 headers"), "{f}");
    assert_eq!(
        hostile.filter(&msg("t", &[], b"")).unwrap(),
        FilterVerdict::Accept
    );
}

#[test]
fn init_failures_are_reported_at_load() {
    let rt = runtime(hostile_config());
    let looping = rt
        .load(spec("hostile", PluginKind::Filter, &[("init", "loop")]))
        .unwrap_err();
    assert!(
        matches!(looping, LoadError::Init(ref f) if f.kind == FailureKind::Deadline),
        "{looping}"
    );
    assert!(looping.to_string().contains("init"), "{looping}");

    let refusing = rt
        .load(spec("hostile", PluginKind::Filter, &[("init", "error")]))
        .unwrap_err();
    assert!(
        refusing.to_string().contains("init refused by config"),
        "{refusing}"
    );

    let panicking = rt
        .load(spec("hostile", PluginKind::Filter, &[("init", "panic")]))
        .unwrap_err();
    assert!(
        matches!(panicking, LoadError::Init(ref f) if f.kind == FailureKind::Panic),
        "{panicking}"
    );
}

#[test]
fn repeated_traps_mark_the_plugin_errored() {
    let rt = runtime(SandboxConfig {
        trap_threshold: 3,
        ..hostile_config()
    });
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    for _ in 0..3 {
        let f = hostile
            .filter(&msg("t", &[("hostile", "panic")], b""))
            .unwrap_err();
        assert_eq!(f.kind, FailureKind::Panic);
    }
    let PluginState::Errored { reason } = hostile.state() else {
        panic!("should be errored")
    };
    assert!(reason.contains("panic"), "{reason}");
    let refused = hostile.filter(&msg("t", &[], b"")).unwrap_err();
    assert_eq!(refused.kind, FailureKind::Errored);
    assert_eq!(hostile.metrics().refused_errored, 1);

    // Success in between resets the count.
    let other = load(&rt, "hostile", PluginKind::Filter, &[]);
    for _ in 0..5 {
        other
            .filter(&msg("t", &[("hostile", "panic")], b""))
            .unwrap_err();
        other.filter(&msg("t", &[], b"")).unwrap();
    }
    assert_eq!(other.state(), PluginState::Ready);
}

/// While one plugin spins and bombs memory, another keeps answering.
#[test]
fn other_plugins_keep_serving_during_abuse() {
    let rt = runtime(hostile_config());
    let hostile = Arc::new(load(&rt, "hostile", PluginKind::Filter, &[]));
    let good = Arc::new(load(
        &rt,
        "header-filter",
        PluginKind::Filter,
        &[("drop", "x")],
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let abuser = {
        let (hostile, stop) = (hostile.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let mode = if n % 2 == 0 { "loop" } else { "alloc" };
                hostile
                    .filter(&msg("t", &[("hostile", mode)], b""))
                    .unwrap_err();
                n += 1;
            }
            n
        })
    };
    let mut served = 0;
    for i in 0..2_000 {
        let headers: &[(&str, &str)] = if i % 2 == 0 { &[("x", "1")] } else { &[] };
        let v = good
            .filter(&msg("t", headers, b""))
            .expect("good plugin keeps serving");
        assert_eq!(matches!(v, FilterVerdict::Drop(_)), i % 2 == 0);
        served += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let abuses = abuser.join().unwrap();
    assert_eq!(served, 2_000);
    assert!(abuses >= 1);
    assert_eq!(good.metrics().traps(), 0);
    let h = hostile.metrics();
    assert_eq!(h.traps_deadline + h.traps_memory, abuses as u64);
}

// ---------------------------------------------------------------- refusals

#[test]
fn wasi_importing_component_is_refused() {
    let rt = runtime(relaxed());
    let err = rt
        .load(spec("wasi-importer", PluginKind::Filter, &[]))
        .unwrap_err();
    assert!(matches!(err, LoadError::ForbiddenImport { .. }), "{err}");
    assert!(
        err.to_string().contains("`wasi:cli/environment@"),
        "names the import: {err}"
    );
}

#[test]
fn component_for_another_contract_version_is_refused() {
    let rt = runtime(relaxed());
    let err = rt
        .load(spec("future-abi", PluginKind::Filter, &[]))
        .unwrap_err();
    assert!(
        matches!(err, LoadError::WrongVersion { ref found, .. } if found == "0.3.0"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("sluice:plugin@0.3.0")
            && text.contains("sluice:plugin@0.2.0")
            && text.contains("sluice:plugin@0.1.0"),
        "names the version found and both supported ones: {text}"
    );
}

/// A component importing `host@0.1.0` and `…@0.2.0` is neither.
#[test]
fn component_mixing_contract_versions_is_refused() {
    let rt = runtime(relaxed());
    let err = rt
        .load(spec("mixed-abi", PluginKind::Filter, &[]))
        .unwrap_err();
    let LoadError::MixedVersions { first, second } = &err else {
        panic!("expected MixedVersions, got {err}")
    };
    let mut versions = [first, second].map(|i| i.rsplit('@').next().unwrap().to_string());
    versions.sort();
    assert_eq!(versions, ["0.1.0", "0.2.0"], "{err}");
    let text = err.to_string();
    assert!(
        text.contains("mixes contract versions") && text.contains("0.2.0 or 0.1.0"),
        "{text}"
    );
}

#[test]
fn wrong_kind_and_non_components_are_refused() {
    let rt = runtime(relaxed());
    let err = rt
        .load(spec("topic-router", PluginKind::Filter, &[]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::WrongKind {
                looks_like: Some(PluginKind::Router),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--kind router"), "{err}");

    let mut core = spec("topic-router", PluginKind::Router, &[]);
    core.wasm = b"\0asm\x01\0\0\0".to_vec();
    let err = rt.load(core).unwrap_err();
    assert!(err.to_string().contains("core wasm module"), "{err}");

    let mut junk = spec("topic-router", PluginKind::Router, &[]);
    junk.wasm = b"#!/bin/sh\necho hi\n".to_vec();
    assert!(matches!(rt.load(junk), Err(LoadError::NotAComponent(_))));
}

// ---------------------------------------------------------------- cache, swap, threads

#[test]
fn compiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..relaxed()
    };
    let cached = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    {
        let rt = runtime(config.clone());
        load(&rt, "header-filter", PluginKind::Filter, &[]);
    }
    let files = cached(dir.path());
    assert_eq!(files.len(), 1, "one artifact per component: {files:?}");

    // A new runtime (same engine settings) uses it.
    let rt = runtime(config.clone());
    let f = load(&rt, "header-filter", PluginKind::Filter, &[("drop", "x")]);
    assert!(matches!(
        f.filter(&msg("t", &[("x", "1")], b"")).unwrap(),
        FilterVerdict::Drop(_)
    ));

    // A damaged artifact is detected and recompiled, never loaded.
    std::fs::write(&files[0], b"garbage").unwrap();
    let rt = runtime(config);
    let f = load(&rt, "header-filter", PluginKind::Filter, &[("drop", "x")]);
    assert!(matches!(
        f.filter(&msg("t", &[("x", "1")], b"")).unwrap(),
        FilterVerdict::Drop(_)
    ));
    assert!(
        std::fs::metadata(&files[0]).unwrap().len() > 1000,
        "artifact rewritten"
    );
}

#[test]
fn hot_swap_keeps_in_flight_callers_on_the_old_version() {
    let rt = runtime(relaxed());
    let registry = PluginRegistry::new();
    assert!(
        registry
            .install(load(
                &rt,
                "header-filter",
                PluginKind::Filter,
                &[("drop", "a")]
            ))
            .is_none()
    );
    let old = registry.get("acme", "header-filter").unwrap();
    let replaced = registry
        .install(load(
            &rt,
            "header-filter",
            PluginKind::Filter,
            &[("drop", "b")],
        ))
        .expect("replaced the old version");
    assert!(Arc::ptr_eq(&old, &replaced));
    let new = registry.get("acme", "header-filter").unwrap();
    let a = msg("t", &[("a", "1")], b"");
    let b = msg("t", &[("b", "1")], b"");
    assert!(matches!(old.filter(&a).unwrap(), FilterVerdict::Drop(_)));
    assert_eq!(old.filter(&b).unwrap(), FilterVerdict::Accept);
    assert_eq!(new.filter(&a).unwrap(), FilterVerdict::Accept);
    assert!(matches!(new.filter(&b).unwrap(), FilterVerdict::Drop(_)));
    assert_eq!(registry.list(Some("acme")).len(), 1);
    assert!(registry.list(Some("other")).is_empty());
    assert!(registry.remove("acme", "header-filter").is_some());
    assert!(registry.get("acme", "header-filter").is_none());
}

#[test]
fn concurrent_calls_use_separate_instances() {
    let rt = runtime(SandboxConfig {
        warm_instances_per_plugin: 8,
        ..relaxed()
    });
    let filter = Arc::new(load(
        &rt,
        "header-filter",
        PluginKind::Filter,
        &[("drop", "x")],
    ));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let filter = filter.clone();
            std::thread::spawn(move || {
                for i in 0..300 {
                    let drop = (i + t) % 3 == 0;
                    let headers: &[(&str, &str)] = if drop { &[("x", "1")] } else { &[] };
                    let v = filter.filter(&msg("t", headers, b"payload")).unwrap();
                    assert_eq!(matches!(v, FilterVerdict::Drop(_)), drop);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let m = filter.metrics();
    assert_eq!(m.calls, 1_800);
    assert!(
        m.instantiations <= 7,
        "instances are reused: {}",
        m.instantiations
    );
}

/// The configured deadline is the one applied: a spinning call is stopped
/// no earlier than it.
#[test]
fn call_deadline_is_configurable() {
    for ms in [30u64, 120] {
        let rt = runtime(SandboxConfig {
            call_deadline: Duration::from_millis(ms),
            ..hostile_config()
        });
        let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
        let start = std::time::Instant::now();
        let f = hostile
            .filter(&msg("t", &[("hostile", "loop")], b""))
            .unwrap_err();
        assert_eq!(f.kind, FailureKind::Deadline);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(ms - 1),
            "stopped after {took:?}, deadline {ms} ms"
        );
    }
}

/// A call that spins gets all of a core for its first millisecond of CPU,
/// then a tenth of one: it sleeps nine times the CPU it uses, so it holds a
/// core for at most one epoch tick at a time. Legitimate calls (µs) are
/// never throttled, and `throttle_percent = 100` turns it off.
#[test]
fn spinning_calls_are_throttled_after_a_millisecond() {
    let throttled = |percent: u32, headers: &[(&str, &str)]| {
        let rt = runtime(SandboxConfig {
            call_deadline: Duration::from_millis(30),
            throttle_percent: percent,
            ..hostile_config()
        });
        assert_eq!(rt.config().throttle_after, Duration::from_millis(1));
        let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
        let start = std::time::Instant::now();
        let verdict = hostile.filter(&msg("t", headers, b""));
        (verdict, start.elapsed(), hostile.metrics().throttled_ns)
    };
    let spin = [("hostile", "loop")];
    let (verdict, took, slept) = throttled(10, &spin);
    assert_eq!(verdict.unwrap_err().kind, FailureKind::Deadline);
    // 9 × (the CPU it used past 1 ms up to its last check): that check came
    // within a tick or two of the 30 ms deadline.
    let slept = Duration::from_nanos(slept);
    assert!(slept >= Duration::from_millis(9 * 20), "slept {slept:?}");
    assert!(took >= slept + Duration::from_millis(29), "took {took:?}");
    // A call of microseconds: never throttled.
    let (verdict, _, slept) = throttled(10, &[]);
    assert!(verdict.is_ok());
    assert_eq!(slept, 0);
    // Off.
    let (verdict, _, slept) = throttled(100, &spin);
    assert_eq!(verdict.unwrap_err().kind, FailureKind::Deadline);
    assert_eq!(slept, 0);
}

// ---------------------------------------------------------------- a second language

/// The committed C bindings of `plugins/c-header-filter/gen` are exactly what
/// wit-bindgen 0.63 generates from `wit/` today, so the C plugin cannot drift
/// from the contract unnoticed.
#[test]
fn c_plugin_bindings_match_the_wit() {
    use wit_bindgen_core::wit_parser::Resolve;
    let root = workspace_root();
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_path(root.join("wit")).unwrap();
    let world = resolve.select_world(&[pkg], Some("filter")).unwrap();
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)
        .unwrap();
    let mut names = Vec::new();
    for (name, bytes) in files.iter() {
        let committed = root.join("plugins/c-header-filter/gen").join(name);
        let on_disk = std::fs::read(&committed)
            .unwrap_or_else(|e| panic!("{}: {e} (run `make bindings`)", committed.display()));
        assert!(
            on_disk == bytes,
            "{} is stale: run `make -C plugins/c-header-filter bindings`",
            committed.display()
        );
        names.push(name.to_string());
    }
    names.sort();
    assert_eq!(
        names,
        ["filter.c", "filter.h", "filter_component_type.o"],
        "every generated file is committed"
    );
}

/// The C port of `header-filter`, built with clang and loaded as a component,
/// gives the same verdicts and the same configuration errors as the Rust
/// original, one message at a time and in batches.
#[test]
fn c_plugin_filters_exactly_like_the_rust_one() {
    let rt = runtime(relaxed());
    let c_spec = |config: &[(&str, &str)]| PluginSpec {
        name: "c-header-filter".into(),
        wasm: c_header_filter(),
        ..spec("header-filter", PluginKind::Filter, config)
    };
    let configs: &[&[(&str, &str)]] = &[
        &[],
        &[
            ("drop", "level=debug"),
            ("require", "trace-id"),
            ("max-payload", "8"),
        ],
        &[("drop", "x"), ("drop", "level=")],
        &[("max-payload", "0")],
        &[("max-payload", "+5")],
    ];
    let messages = [
        msg("t", &[], b""),
        msg("t", &[("trace-id", "1"), ("level", "info")], b"small"),
        msg("t", &[("trace-id", "1"), ("level", "debug")], b"x"),
        msg("t", &[("level", "debug"), ("level", "")], b"x"),
        msg("t", &[("x", "")], b"123456789"),
        msg("t", &[("trace-id", "2")], &[0xff; 4096]),
    ];
    for config in configs {
        let rust = load(&rt, "header-filter", PluginKind::Filter, config);
        let c = rt.load(c_spec(config)).unwrap();
        for m in &messages {
            assert_eq!(
                c.filter(m).unwrap(),
                rust.filter(m).unwrap(),
                "config {config:?}, headers {:?}",
                m.headers
            );
        }
        assert_eq!(
            c.filter_batch(&messages).unwrap(),
            rust.filter_batch(&messages).unwrap()
        );
        assert_eq!(c.metrics().traps(), 0);
    }
    let some_drop = rt
        .load(c_spec(&[("require", "trace-id")]))
        .unwrap()
        .filter(&messages[0])
        .unwrap();
    assert_eq!(
        some_drop,
        FilterVerdict::Drop("missing header trace-id".into())
    );

    for bad in [
        &[("bogus", "1")][..],
        &[("max-payload", "x")],
        &[("max-payload", "")],
        &[("max-payload", "+")],
        &[("max-payload", "99999999999")],
        &[("drop", "=x")],
        &[("drop", "")],
        &[("require", "")],
    ] {
        let rust = rt
            .load(spec("header-filter", PluginKind::Filter, bad))
            .unwrap_err();
        let c = rt.load(c_spec(bad)).unwrap_err();
        assert!(matches!(c, LoadError::Init(_)), "{c}");
        assert_eq!(
            c.to_string().replace("c-header-filter", "header-filter"),
            rust.to_string(),
            "config {bad:?}"
        );
    }
}

/// The disk cache holds only what live plugins use: an artifact is written
/// only for a component that passed the contract check, and collecting
/// removes those of plugins that are gone (unloaded, failed in `init`).
#[test]
fn the_compile_cache_keeps_only_what_live_plugins_use() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..relaxed()
    });
    let files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .count()
    };
    // Refused by the contract check: nothing written.
    assert!(
        rt.load(spec("wasi-importer", PluginKind::Filter, &[]))
            .is_err()
    );
    assert!(
        rt.load(spec("header-filter", PluginKind::Router, &[]))
            .is_err()
    );
    assert_eq!(files(), 0, "a refused component was cached");
    // Loaded: kept while it lives, collected after.
    let f = load(&rt, "header-filter", PluginKind::Filter, &[]);
    let r = load(&rt, "topic-router", PluginKind::Router, &[]);
    assert_eq!(rt.collect_cache(), 0);
    assert_eq!(files(), 2);
    drop(f);
    assert_eq!(rt.collect_cache(), 2, "artifact and its checksum");
    assert_eq!(files(), 1);
    // A failing init leaves nothing once collected.
    assert!(
        rt.load(spec("hostile", PluginKind::Filter, &[("init", "error")]))
            .is_err()
    );
    rt.collect_cache();
    assert_eq!(files(), 1);
    drop(r);
}

/// Each plugin reserves its instances at load: a tenant cannot hold more
/// than its share, another tenant still loads when one tenant is at its
/// limit, and the broker's pool refuses new plugins (not calls of loaded
/// ones) when every instance is reserved.
#[test]
fn plugin_instances_are_reserved_per_tenant_and_in_all() {
    let rt = runtime(SandboxConfig {
        instances_per_plugin: 2,
        instances_per_tenant: 6,
        pool_instances: 10,
        ..relaxed()
    });
    let as_tenant = |tenant: &str, name: &str| {
        let mut s = spec("header-filter", PluginKind::Filter, &[]);
        s.tenant = tenant.into();
        s.name = name.into();
        s
    };
    let mut a: Vec<_> = (0..3)
        .map(|i| rt.load(as_tenant("acme", &format!("f{i}"))).unwrap())
        .collect();
    let e = rt.load(as_tenant("acme", "f3")).unwrap_err();
    assert!(matches!(e, LoadError::Capacity(_)), "{e}");
    assert!(e.to_string().contains("plugin_instances_per_tenant"), "{e}");
    // A replacement of one of acme's plugins is allowed at its limit.
    let swapped = rt
        .load_replacing(as_tenant("acme", "f0"), Some(&a[0]))
        .unwrap();
    a[0] = swapped;
    // globex gets what the pool has left (10 - 6), then the pool is full.
    let g1 = rt.load(as_tenant("globex", "g1")).unwrap();
    let _g2 = rt.load(as_tenant("globex", "g2")).unwrap();
    let e = rt.load(as_tenant("globex", "g3")).unwrap_err();
    assert!(e.to_string().contains("pool is full"), "{e}");
    // acme's plugins all still answer, concurrently, within their reservations.
    std::thread::scope(|s| {
        for p in a.iter().chain([&g1]) {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        assert_eq!(
                            p.filter(&msg("t", &[], b"")).unwrap(),
                            FilterVerdict::Accept
                        );
                    }
                });
            }
        }
    });
    assert_eq!(rt.tenant_usage("acme").0, 6);
    drop(a);
    assert_eq!(rt.tenant_usage("acme").0, 0);
    rt.load(as_tenant("globex", "g3")).unwrap();
}

/// Guest log lines are limited per second too, not only per call: a plugin
/// flooding on every call writes at most `max_log_lines_per_sec` a second.
#[test]
fn log_lines_are_limited_per_second() {
    let rt = runtime(SandboxConfig {
        max_log_lines_per_sec: 100,
        ..relaxed()
    });
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let start = std::time::Instant::now();
    for _ in 0..5 {
        hostile
            .filter(&msg("t", &[("hostile", "log-flood")], b""))
            .unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let written = 5 * 10_000 - hostile.metrics().logs_dropped;
    let allowed = 100 + (100.0 * elapsed).ceil() as u64;
    assert!(
        written <= allowed,
        "{written} lines written in {elapsed:.2} s (at most {allowed})"
    );
}

// ---------------------------------------------------------------- output bounds

/// Replacement headers are bounded by their bytes, not only their count:
/// 8 headers totalling exactly 16 KiB pass, 8 bytes more are refused.
#[test]
fn replacement_header_bytes_are_bounded() {
    let rt = runtime(relaxed());
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let max = rt.config().output.max_header_bytes;
    assert_eq!(max, 16 << 10);
    let replace = |bytes: usize| {
        let bytes = bytes.to_string();
        hostile.filter(&msg(
            "t",
            &[("hostile", "header-bytes"), ("bytes", &bytes)],
            b"",
        ))
    };
    let FilterVerdict::Replace(r) = replace(max).unwrap() else {
        panic!("expected a replacement at the bound")
    };
    assert_eq!(r.headers.len(), 8);
    let bytes: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(bytes, max);
    let f = replace(max + 8).unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert!(f.message.contains("16392 header bytes"), "{f}");
    assert_eq!(hostile.metrics().output_rejected, 1);
    assert_eq!(hostile.metrics().traps(), 0);
}

/// Reasons (a filter's drop, a guest error, per message in a batch) are cut
/// to 1 KiB on a char boundary.
#[test]
fn reasons_are_cut_to_1_kib() {
    let rt = runtime(relaxed());
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let max = rt.config().output.max_reason_bytes;
    assert_eq!(max, 1024);
    let long = "€".repeat(5000 / 3);
    let cut = |reason: &str| {
        // 1024 is not a multiple of 3: the cut keeps whole chars only.
        assert_eq!(reason.len(), 1023, "{} bytes", reason.len());
        assert!(long.starts_with(reason));
    };
    let drop = hostile
        .filter(&msg("t", &[("hostile", "long-reason")], b""))
        .unwrap();
    let FilterVerdict::Drop(reason) = drop else {
        panic!("expected a drop, got {drop:?}")
    };
    cut(&reason);
    let f = hostile
        .filter(&msg("t", &[("hostile", "long-error")], b""))
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Guest);
    cut(&f.message);
    let batch = hostile
        .filter_batch(&[
            msg("t", &[("hostile", "long-reason")], b""),
            msg("t", &[("hostile", "long-error")], b""),
        ])
        .unwrap();
    let Ok(FilterVerdict::Drop(reason)) = &batch[0] else {
        panic!("{:?}", batch[0])
    };
    cut(reason);
    cut(batch[1].as_ref().unwrap_err());
    // Short ones are kept whole.
    let short = hostile
        .filter(&msg(
            "t",
            &[("hostile", "long-reason"), ("bytes", "30")],
            b"",
        ))
        .unwrap();
    assert_eq!(short, FilterVerdict::Drop("€".repeat(10)));
}

/// A batch call must return one result per input, for filters and routers:
/// one fewer or one more is an `output` failure of the whole call.
#[test]
fn batch_results_must_match_inputs() {
    let rt = runtime(relaxed());
    let filter = load(&rt, "hostile", PluginKind::Filter, &[]);
    let router = load(&rt, "hostile-router", PluginKind::Router, &[]);
    for mode in ["short-batch", "long-batch"] {
        let msgs = [
            msg("t", &[], b""),
            msg("t", &[("hostile", mode)], b""),
            msg("t", &[], b""),
        ];
        let want = if mode == "short-batch" { 2 } else { 4 };
        let f = filter.filter_batch(&msgs).unwrap_err();
        assert_eq!(f.kind, FailureKind::Output, "{mode}: {f}");
        assert!(
            f.message
                .contains(&format!("returned {want} results for 3 inputs")),
            "{mode}: {f}"
        );
        let requests: Vec<_> = msgs
            .iter()
            .map(|m| RouteRequest {
                msg: m.clone(),
                candidates: strings(&["q"]),
            })
            .collect();
        let f = router.route_batch(&requests).unwrap_err();
        assert_eq!(f.kind, FailureKind::Output, "{mode}: {f}");
        assert!(
            f.message
                .contains(&format!("returned {want} results for 3 inputs")),
            "{mode}: {f}"
        );
    }
    // A well-formed batch of the same plugins passes.
    let ok = [msg("t", &[], b""), msg("t", &[], b"")];
    assert_eq!(filter.filter_batch(&ok).unwrap().len(), 2);
    assert_eq!(filter.metrics().output_rejected, 2);
    assert_eq!(router.metrics().output_rejected, 2);
}

/// A router's queue names are 1..=255 bytes, one call at a time and in a
/// batch.
#[test]
fn router_queue_names_are_bounded() {
    let rt = runtime(relaxed());
    let router = load(&rt, "hostile-router", PluginKind::Router, &[]);
    let max = rt.config().output.max_name_bytes;
    assert_eq!(max, 255);
    let named = |len: usize| {
        msg(
            "t",
            &[("hostile", "long-name"), ("count", &len.to_string())],
            b"",
        )
    };
    assert_eq!(
        router.route(&named(max), &[]).unwrap(),
        ["q".repeat(max)],
        "a name at the bound"
    );
    let f = router.route(&named(max + 1), &[]).unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert!(f.message.contains("256 bytes (allowed 1..=255)"), "{f}");
    let f = router
        .route(&msg("t", &[("hostile", "empty-name")], b""), &[])
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert!(f.message.contains("0 bytes"), "{f}");
    let f = router
        .route_batch(&[
            RouteRequest {
                msg: msg("t", &[], b""),
                candidates: strings(&["q"]),
            },
            RouteRequest {
                msg: named(max + 1),
                candidates: vec![],
            },
        ])
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert_eq!(router.metrics().output_rejected, 3);
}

/// A router returns at most 1024 targets (before any de-duplication by
/// the broker).
#[test]
fn router_target_count_is_bounded() {
    let rt = runtime(relaxed());
    let router = load(&rt, "hostile-router", PluginKind::Router, &[]);
    let max = rt.config().output.max_targets;
    assert_eq!(max, 1024);
    let many = |n: usize| msg("t", &[("hostile", "many"), ("count", &n.to_string())], b"");
    assert_eq!(router.route(&many(max), &[]).unwrap().len(), max);
    let f = router.route(&many(max + 1), &[]).unwrap_err();
    assert_eq!(f.kind, FailureKind::Output, "{f}");
    assert!(f.message.contains("1025 targets (max 1024)"), "{f}");
}

/// A plugin trapping on every call is re-instantiated only after a pause
/// that doubles up to 250 ms: calls made back to back for a second
/// instantiate it about ten times, not once per call. (An upper bound on a
/// count within a time: a slower machine only makes fewer calls.)
#[test]
fn repeated_traps_back_off_before_reinstantiating() {
    let rt = runtime(SandboxConfig {
        trap_threshold: u32::MAX,
        ..hostile_config()
    });
    let hostile = load(&rt, "hostile", PluginKind::Filter, &[]);
    let start = std::time::Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        let f = hostile
            .filter(&msg("t", &[("hostile", "panic")], b""))
            .unwrap_err();
        assert_eq!(f.kind, FailureKind::Panic);
        calls += 1;
    }
    let m = hostile.metrics();
    assert_eq!(m.traps_panic, calls);
    // Pauses before instantiations 3, 4, ...: 5, 10, 20, 40, 80, 160 ms,
    // then 250 ms each: within a second at most 1 (load) + 2 + 6 + 3.
    assert!(
        m.instantiations <= 12,
        "{} instantiations for {calls} trapping calls in a second",
        m.instantiations
    );
    assert!(m.instantiations >= 2, "{}", m.instantiations);
    assert_eq!(hostile.state(), PluginState::Ready);
}
