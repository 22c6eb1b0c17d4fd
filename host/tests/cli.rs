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

/// A `sluice serve` child on a free loopback port with its own data folder;
/// killed when dropped.
struct Served {
    child: std::process::Child,
    addr: String,
    data: std::path::PathBuf,
}

impl Served {
    /// Start `sluice serve` with `extra` flags and wait for its development
    /// certificates.
    fn start(data: &Path, extra: &[&str]) -> Served {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Served::start_on(data, &format!("127.0.0.1:{port}"), extra)
    }

    fn start_on(data: &Path, addr: &str, extra: &[&str]) -> Served {
        let child = Command::new(BIN)
            .args(["serve", "--listen", addr, "--data"])
            .arg(data)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let served = Served {
            child,
            addr: addr.to_string(),
            data: data.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !served.identity().join("key.pem").exists() || !data.join("certs/ca.pem").exists() {
            assert!(
                Instant::now() < deadline,
                "serve did not create certificates"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    fn identity(&self) -> std::path::PathBuf {
        self.data.join("certs/default")
    }

    /// Run a client command against this broker, retrying while it starts.
    fn run(&self, args: &[&str]) -> Output {
        let identity = self.identity();
        let env = [
            ("SLUICE_SERVER", self.addr.as_str()),
            ("SLUICE_IDENTITY", identity.to_str().unwrap()),
        ];
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
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let served = Served::start(&dir.path().join("data"), &[]);
    let run = |args: &[&str]| served.run(args);
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
        (p["name"].as_str(), p["calls"].as_u64(), p["abi"].as_str()),
        (Some("header-filter"), Some(1), Some("0.2.0"))
    );

    let o = run(&["stats", "--json"]);
    let s: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(s["tenant"], "default");
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

#[test]
fn metrics_config_check_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml");
    let o = sluice(
        &[
            "serve",
            "--config",
            example.to_str().unwrap(),
            "--check-config",
        ],
        &[],
    );
    assert!(
        o.status.success(),
        "the example config is valid: {}",
        stderr(&o)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 7\n").unwrap();
    let o = sluice(
        &["serve", "--config", bad.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("listen"),
        "names the key: {}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1);

    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let data = dir.path().join("data");
    let mut served = Served::start(&data, &["--metrics", &metrics.to_string()]);
    for args in [
        &["queue", "declare", "m"][..],
        &["queue", "bind", "m", "m"],
        &["publish", "m", "--count", "5"],
    ] {
        let o = served.run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }

    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let text = scrape();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("sluice_queue_ready{tenant=\"default\",queue=\"m\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sluice_plugin_call_seconds histogram"),
        "{text}"
    );

    // SIGTERM: stop accepting, sync, exit 0; the next start is clean.
    let st = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let addr = served.addr.clone();
    drop(served);
    let restarted = Served::start_on(&data, &addr, &[]);
    let o = restarted.run(&["consume", "m", "--count", "5", "--timeout", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// From nothing to a custom plugin answering: `plugin new`, the documented
/// one-line build, `plugin test`.
#[test]
fn plugin_new_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my-filter");
    let o = sluice(
        &[
            "plugin",
            "new",
            crate_dir.to_str().unwrap(),
            "--kind",
            "filter",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("cargo build --release"),
        "{}",
        stdout(&o)
    );
    let again = sluice(
        &[
            "plugin",
            "new",
            crate_dir.to_str().unwrap(),
            "--kind",
            "filter",
        ],
        &[],
    );
    assert!(stderr(&again).contains("already exists"));

    // Share one target folder between runs so only the first build pays.
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-new-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let start = Instant::now();
    let build = Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    println!("plugin new → built in {:?}", start.elapsed());
    let wasm = target.join("wasm32-unknown-unknown/release/my_filter.wasm");
    for (header, verdict) in [("drop=1", "drop"), ("keep=1", "accept")] {
        let o = sluice(
            &[
                "plugin",
                "test",
                wasm.to_str().unwrap(),
                "--kind",
                "filter",
                "--header",
                header,
                "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["verdict"], verdict);
        assert!(v["memory_kib"].as_u64().unwrap() > 0);
    }
}

#[test]
fn bench_reports_json_against_a_running_broker() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"), &[]);
    let o = served.run(&[
        "bench",
        "--count",
        "2000",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--queues",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (
            v["sent"].as_u64(),
            v["confirmed"].as_u64(),
            v["received"].as_u64()
        ),
        (Some(2000), Some(2000), Some(2000))
    );
    assert_eq!(v["duplicates"], 0);
    for key in [
        "msgs_per_s",
        "publish_msgs_per_s",
        "mb_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
    ] {
        assert!(v[key].as_f64().is_some(), "{key} in {v}");
    }
    // Fan-out: every message reaches 3 queues, and is delivered 3 times.
    let o = served.run(&[
        "bench",
        "--count",
        "500",
        "--fanout",
        "3",
        "--consumers",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (
            v["confirmed"].as_u64(),
            v["received"].as_u64(),
            v["duplicates"].as_u64()
        ),
        (Some(500), Some(1500), Some(0))
    );
    // For a duration instead of a count: as many as fit in 0.5 s.
    let o = served.run(&["bench", "--duration", "0.5", "--json"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let sent = v["sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 200_000, "{v}");
    assert_eq!(v["received"].as_u64(), Some(sent));
    // The bench cleans up its queues.
    let o = served.run(&["queue", "list", "--json"]);
    assert_eq!(stdout(&o).trim(), "", "no bench queue left");
}

#[test]
fn admins_listed_in_the_config_are_the_only_administrators() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "[identity]\nadmins = [\"ops\"]\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[identity]\nadmins = [\"Ops Team\"]\n").unwrap();
    let o = sluice(
        &["serve", "--config", bad.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("bad.toml, line 2") && err.contains("invalid administrator name `Ops Team`"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let data = dir.path().join("data");
    let served = Served::start(&data, &["--config", config.to_str().unwrap()]);
    let ops = dir.path().join("ops");
    let o = sluice(
        &[
            "certs",
            "issue",
            "--ca",
            data.join("certs").to_str().unwrap(),
            "--admin",
            "--client",
            "ops",
            "--out",
            ops.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("administrator ops"), "{}", stdout(&o));

    let as_identity = |identity: &Path| {
        let env = [
            ("SLUICE_SERVER", served.addr.as_str()),
            ("SLUICE_IDENTITY", identity.to_str().unwrap()),
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = sluice(&["tenant", "list"], &env);
            if o.status.success() || Instant::now() > deadline || !stderr(&o).contains("connect") {
                return o;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Wait until the broker serves, as the listed administrator.
    let listed = as_identity(&ops);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).starts_with("tenant"), "{}", stdout(&listed));

    // The development `admin` identity is signed by the same CA but not listed.
    let unlisted = sluice(
        &["tenant", "list"],
        &[
            ("SLUICE_SERVER", served.addr.as_str()),
            (
                "SLUICE_IDENTITY",
                data.join("certs/admin").to_str().unwrap(),
            ),
        ],
    );
    assert!(!unlisted.status.success());
    let err = stderr(&unlisted);
    assert!(
        err.contains("administrator `admin` is not listed in [identity] admins"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Cluster commands on a single node: one line saying it is not one.
    let env = [
        ("SLUICE_SERVER", served.addr.as_str()),
        ("SLUICE_IDENTITY", ops.to_str().unwrap()),
    ];
    for args in [&["cluster", "status"][..], &["cluster", "transfer", "2"]] {
        let o = sluice(args, &env);
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains("not a cluster"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// `sluice consume ... | head -2`: the consumer stops quietly when stdout
/// closes (no panic, no message; exit 141 as if killed by SIGPIPE), and
/// closes its connection at once, so what it held is requeued without
/// waiting for an idle timeout; the two messages it printed were acked.
#[test]
fn a_closed_stdout_ends_a_command_quietly_and_closes_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"), &[]);
    let run = |args: &[&str]| served.run(args);
    assert!(run(&["queue", "declare", "piped"]).status.success());
    assert!(run(&["queue", "bind", "piped", "piped"]).status.success());
    assert!(run(&["publish", "piped", "--count", "10"]).status.success());
    let identity = served.identity();
    let mut consumer = Command::new(BIN)
        .args([
            "consume",
            "piped",
            "--timeout",
            "20",
            "--json",
            "--prefetch",
            "10",
        ])
        .env("SLUICE_SERVER", &served.addr)
        .env("SLUICE_IDENTITY", &identity)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read two lines, then close the pipe (as `head -2` does).
    let mut out = std::io::BufReader::new(consumer.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.contains("\"topic\":\"piped\""), "{line}");
    }
    drop(out);
    // More messages: printing the next one finds stdout closed.
    assert!(run(&["publish", "piped", "--count", "10"]).status.success());
    let started = Instant::now();
    let o = consumer.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "quiet");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Its connection is gone at once: nothing stays unacked.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = run(&["queue", "list", "--json"]);
        let q: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
        let (ready, unacked) = (q["ready"].as_u64().unwrap(), q["unacked"].as_u64().unwrap());
        if unacked == 0 && q["consumers"].as_u64() == Some(0) {
            // What it printed was acked; what it could not print is ready again.
            assert!((1..=18).contains(&ready), "{q}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer's connection lingers: {q}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first CPU this process may run on (containers may not offer CPU 0).
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status")
        .trim();
    list.split([',', '-']).next().unwrap().to_string()
}

/// `sluice plugin test` of the hostile filter's `slow` mode (`ms` units of
/// work) with a CPU deadline, on `cpu` if given; its JSON, or its stderr.
fn slow_call(cpu: Option<&str>, ms: u64, deadline_ms: u64, wasm: &Path) -> Result<u64, String> {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    let o = cmd
        .args(["plugin", "test"])
        .arg(wasm)
        .args(["--kind", "filter", "--header", "hostile=slow"])
        .args(["--header", &format!("ms={ms}")])
        .args(["--deadline-ms", &deadline_ms.to_string(), "--json"])
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(stderr(&o));
    }
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["verdict"], "accept", "{v}");
    Ok(v["micros"].as_f64().unwrap() as u64)
}

/// A plugin call is stopped for the CPU time it uses, never for waiting for
/// a core: pinned to one CPU beside eleven busy loops (a twelfth of it
/// for it), a call takes several times its deadline in wall-clock time and
/// is still accepted; a call that can never finish is still stopped.
/// Deadline and work are sized from the call's own time on this machine,
/// so the verdict does not depend on the machine's speed.
#[test]
fn a_plugin_call_is_stopped_for_the_cpu_it_uses_not_for_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hostile.wasm");
    std::fs::write(&wasm, sluice::bundled::wasm("hostile").unwrap()).unwrap();
    // The work's own time, at best of three (wall ≥ CPU, so this is an
    // upper bound of its CPU time).
    let ms = 400; // ~20 ms of CPU here
    let alone = (0..3)
        .map(|_| slow_call(None, ms, 60_000, &wasm).unwrap())
        .min()
        .unwrap();
    let deadline_ms = (alone * 3 / 1000).max(20);

    struct Busy(Vec<std::process::Child>);
    impl Drop for Busy {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let cpu = first_allowed_cpu();
    let busy = Busy(
        (0..11)
            .map(|_| {
                Command::new("taskset")
                    .args(["-c", &cpu, "yes"])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("taskset and yes (util-linux, coreutils)")
            })
            .collect(),
    );
    let crowded = slow_call(Some(&cpu), ms, deadline_ms, &wasm)
        .unwrap_or_else(|e| panic!("stopped while waiting for a core ({deadline_ms} ms CPU): {e}"));
    let looping = Command::new("taskset")
        .args(["-c", &cpu, BIN, "plugin", "test"])
        .arg(&wasm)
        .args(["--kind", "filter", "--header", "hostile=loop"])
        .args(["--deadline-ms", &deadline_ms.to_string()])
        .output()
        .unwrap();
    drop(busy);
    assert!(
        crowded > deadline_ms * 1000,
        "the crowded call took {crowded} µs, not over its {deadline_ms} ms deadline: \
         it did not wait (alone: {alone} µs)"
    );
    assert!(!looping.status.success());
    assert!(
        stderr(&looping).contains("deadline"),
        "{}",
        stderr(&looping)
    );
}

/// `certs init --node` writes node identities under a cluster CA of their
/// own; three nodes using them replicate a write over QUIC, and the
/// command refuses what it cannot write, in one line.
#[test]
fn certs_init_with_nodes_makes_identities_a_cluster_runs_on() {
    use openraft::Raft;
    use sluice::cluster::MetaCommand;
    use sluice::cluster::log::FileLog;
    use sluice::cluster::meta::MetaState;
    use sluice::cluster::net::{QuicNetwork, no_spool, serve};
    use sluice::tls::{NodeTls, node_name};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let out_s = out.to_str().unwrap();
    let o = sluice(
        &[
            "certs", "init", "--out", out_s, "--tenant", "acme", "--node", "1", "--node", "2",
            "--node", "3",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("cluster/node-3/"), "{}", stdout(&o));
    let cluster_ca = std::fs::read(out.join("cluster/ca.pem")).unwrap();
    assert_ne!(cluster_ca, std::fs::read(out.join("ca.pem")).unwrap());
    assert!(out.join("acme/cert.pem").exists());

    for (args, says) in [
        (vec!["--node", "1", "--node", "1"], "node 1 is given twice"),
        (vec!["--node", "0"], "0 is not in 1.."),
        (
            vec!["--node", "1", "--tenant", "cluster"],
            "tenant `cluster` would share its folder",
        ),
    ] {
        let fresh = dir.path().join("fresh");
        let mut all = vec!["certs", "init", "--out", fresh.to_str().unwrap()];
        all.extend(args);
        let o = sluice(&all, &[]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(!fresh.join("ca.pem").exists(), "nothing written on refusal");
    }
    let o = sluice(&["certs", "init", "--out", out_s, "--node", "4"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("refusing to overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = std::sync::Arc::new(openraft::Config::default().validate().unwrap());
        let mut nodes = Vec::new();
        let mut members = std::collections::BTreeMap::new();
        for id in 1..=3u64 {
            let tls = NodeTls::from_dir(&out.join("cluster").join(node_name(id)));
            let endpoint = quinn::Endpoint::server(
                tls.server_config().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
            )
            .unwrap();
            let path = dir.path().join(node_name(id));
            let db = sled::Config::new().path(&path).open().unwrap();
            let log = FileLog::open(&path.join("log"), "meta").unwrap();
            let state = MetaState::open(&db, "meta").unwrap();
            let net = QuicNetwork::new(endpoint.clone(), tls.client_config().unwrap());
            let raft = Raft::new(id, config.clone(), net, log, state.clone())
                .await
                .unwrap();
            tokio::spawn(serve(endpoint.clone(), raft.clone(), no_spool()));
            members.insert(
                id,
                sluice::cluster::Peer {
                    raft: endpoint.local_addr().unwrap().to_string(),
                    client: String::new(),
                },
            );
            nodes.push((raft, state));
        }
        nodes[0].0.initialize(members).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            if let Some(l) = nodes[0].0.current_leader().await {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let put = MetaCommand::Put {
            key: "queue/acme/orders".into(),
            value: b"declared".to_vec(),
        };
        nodes[leader as usize - 1]
            .0
            .client_write(put)
            .await
            .unwrap();
        // Every node applies it before any stops: a follower learns the
        // commit from the leader's next message, so stopping the leader
        // first could leave it never applying.
        for (_, state) in &nodes {
            loop {
                if state.get("queue/acme/orders").unwrap().as_deref() == Some(&b"declared"[..]) {
                    break;
                }
                assert!(Instant::now() < deadline, "a node never applied the write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (raft, _) in &nodes {
            raft.shutdown().await.unwrap();
        }
    });
}
