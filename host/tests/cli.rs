//! The `sluice` binary as a user runs it: demo, serve, queue, publish,
//! consume, plugin and stats commands, and one-line errors.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn sluice(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SLUICE_SERVER")
        .env_remove("SLUICE_IDENTITY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn demo_shows_every_policy_and_exits_zero() {
    let out = sluice(&["demo"], &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for row in [
        "routing",
        "transform",
        "filter",
        "authorizer",
        "isolation",
        "hostile",
        "restart",
    ] {
        assert!(text.contains(row), "demo shows {row}:\n{text}");
    }
    assert!(text.contains("11 of 11 checks passed"), "{text}");
}

#[test]
fn serve_and_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let mut server = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let identity = data.join("certs/default");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !identity.join("cert.pem").exists() || !data.join("certs/ca.pem").exists() {
        assert!(
            Instant::now() < deadline,
            "serve did not create certificates"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = identity.to_str().unwrap();
    let env = [("SLUICE_SERVER", addr.as_str()), ("SLUICE_IDENTITY", id)];
    let run = |args: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = sluice(args, &env);
            if o.status.success()
                || Instant::now() > deadline
                || !stderr(&o).contains("certificate refused")
            {
                return o;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let o = run(&["queue", "declare", "jobs", "--max-length", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run(&["queue", "bind", "jobs", "jobs.>"]).status.success());

    let o = run(&[
        "publish", "jobs.new", "--count", "10", "--json", "--header", "k=v",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[3], serde_json::json!({"n": 3, "queues": 1}));

    let o = run(&["queue", "list", "--json"]);
    let q: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(
        (q["name"].as_str(), q["ready"].as_u64()),
        (Some("jobs"), Some(10))
    );

    let o = run(&[
        "consume",
        "jobs",
        "--count",
        "10",
        "--json",
        "--timeout",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let msgs: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 10);
    assert!(msgs[0]["payload"].as_str().unwrap().starts_with('0'));
    assert_eq!(msgs[0]["headers"]["k"], "v");
    assert_eq!(msgs[0]["redelivered"], false);

    // Fewer messages than asked before the idle timeout: exit 1.
    let o = run(&["consume", "jobs", "--count", "1", "--timeout", "0.3"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim().lines().count(),
        1,
        "one line: {}",
        stderr(&o)
    );

    // No route: exit 1 with one readable line.
    let o = run(&["publish", "nowhere", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no route"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1);

    // A plugin loaded over the wire.
    let wasm = dir.path().join("header_filter.wasm");
    std::fs::write(&wasm, sluice::bundled::wasm("header-filter").unwrap()).unwrap();
    let o = run(&[
        "plugin",
        "load",
        wasm.to_str().unwrap(),
        "--kind",
        "filter",
        "--queue",
        "jobs",
        "--config",
        "drop=level=debug",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "publish",
        "jobs.x",
        "noise",
        "--header",
        "level=debug",
        "--json",
    ]);
    assert_eq!(stdout(&o).trim(), r#"{"n":0,"queues":0}"#);
    let o = run(&["plugin", "list", "--json"]);
    let p: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(
        (p["name"].as_str(), p["calls"].as_u64()),
        (Some("header-filter"), Some(1))
    );

    let o = run(&["stats", "--json"]);
    let s: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(s["tenant"], "default");

    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn errors_are_one_line() {
    let o = sluice(&["queue", "list"], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("--identity"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let o = sluice(
        &["queue", "list", "--identity", dir.path().to_str().unwrap()],
        &[],
    );
    assert!(
        stderr(&o).contains("cert.pem") || stderr(&o).contains("key.pem"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1);

    let o = sluice(
        &["plugin", "test", "/nonexistent.wasm", "--kind", "filter"],
        &[],
    );
    assert!(!o.status.success());
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn plugin_test_runs_offline() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("topic_router.wasm");
    std::fs::write(&wasm, sluice::bundled::wasm("topic-router").unwrap()).unwrap();
    let o = sluice(
        &[
            "plugin",
            "test",
            wasm.to_str().unwrap(),
            "--kind",
            "router",
            "--topic",
            "orders.eu",
            "--candidate",
            "main",
            "--header",
            "x-audit=1",
            "--config",
            "add.audit=header:x-audit=1",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["verdict"], "route");
    assert_eq!(v["detail"]["targets"], serde_json::json!(["main", "audit"]));
    let _ = Path::new(BIN);
}
