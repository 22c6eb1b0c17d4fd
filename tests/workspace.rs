//! The workspace's build setup, checked with cargo itself.
//!
//! `cargo test -p <crate>` must reuse what `cargo test --workspace` built:
//! cargo resolves features per invocation, so a dependency that gets fewer
//! features when one crate is built alone is rebuilt, with everything above
//! it. `workspace-hack/` asks for each such dependency with the workspace's
//! features; this test fails, naming the package and its features, when a
//! dependency change makes a crate's own feature set differ again.

use std::collections::BTreeSet;
use std::process::Command;

/// The units (package, features, mode, target, profile) that
/// `cargo test <args>` would build for dependencies outside the workspace,
/// from cargo's own unit graph. (`--unit-graph` is unstable; RUSTC_BOOTSTRAP
/// lets the pinned stable cargo print it. It only plans, builds nothing.)
fn units(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(sluice_tests::workspace_root())
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "test",
            "--no-run",
            "--locked",
            "--unit-graph",
            "-Z",
            "unstable-options",
        ])
        .args(args)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo test --unit-graph {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    graph["units"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| {
            u["pkg_id"]
                .as_str()
                .is_some_and(|id| !id.starts_with("path+"))
        })
        .map(|u| {
            let id = u["pkg_id"].as_str().unwrap_or_default();
            let id = id.rsplit('#').next().unwrap_or(id);
            format!(
                "{id} [{}] {} {} {}",
                u["features"], u["mode"], u["target"]["name"], u["profile"]
            )
        })
        .collect()
}

fn members() -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(sluice_tests::workspace_root())
        .args(["metadata", "--locked", "--no-deps", "--format-version", "1"])
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .filter(|n| n != "sluice-workspace-hack")
        .collect()
}

/// Every crate tested alone builds each dependency exactly as the workspace
/// build does (so cargo finds every unit already built).
#[test]
fn every_crate_alone_reuses_the_workspace_build() {
    let workspace = units(&["--workspace"]);
    let members = members();
    assert!(members.len() >= 5, "members: {members:?}");
    let mut differ = Vec::new();
    for member in &members {
        for unit in units(&["-p", member]).difference(&workspace) {
            let package = unit.split(' ').next().unwrap_or_default();
            let built: Vec<_> = workspace
                .iter()
                .filter(|u| u.split(' ').next() == Some(package))
                .collect();
            differ.push(format!("{member} alone: {unit}\n  workspace: {built:#?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "these dependencies are built otherwise when one crate is built alone; add them to \
         workspace-hack/Cargo.toml with the features the workspace builds them with \
         ([dependencies] for units with debuginfo 2, [build-dependencies] for build-script \
         and proc-macro units, debuginfo 0):\n{}",
        differ.join("\n")
    );
}

/// The side-by-side benchmark with the peers' clients is a workspace of its
/// own: inside this one, async-nats would turn on tokio's `test-util` in the
/// broker every `cargo test --workspace` builds.
#[test]
fn the_broker_is_built_without_tokio_test_util() {
    let tokio: Vec<_> = units(&["--workspace"])
        .into_iter()
        .filter(|u| u.starts_with("tokio@"))
        .collect();
    assert!(!tokio.is_empty(), "tokio is in the tree");
    assert!(
        tokio.iter().all(|u| !u.contains("\"test-util\"")),
        "tokio units: {tokio:?}"
    );
}
