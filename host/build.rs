//! Builds every guest crate under `plugins/` into a wasm component and
//! generates `bundled.rs`, which embeds them, so tests, the demo and the
//! benchmarks find the plugins without a manual step.
//!
//! The guests are built by a nested `cargo build --target
//! wasm32-unknown-unknown --profile plugin` into `<target>/wasm-plugins`
//! (a separate target directory, so the outer cargo's lock is not contended).
//! A missing wasm target is installed with rustup, or reported with the one
//! command that fixes it.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    for dir in ["plugins", "sdk/plugin", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let crates = guest_crates(&root.join("plugins"));
    ensure_wasm_target();
    let target_dir = wasm_target_dir(&out_dir);
    build_guests(&root, &target_dir, &crates);

    let artifacts = target_dir.join(TARGET).join("plugin");
    let mut src = String::from(
        "/// Guest plugins built from `plugins/` by `host/build.rs`: (crate name, component bytes).\n\
         pub static ALL: &[(&str, &[u8])] = &[\n",
    );
    for name in &crates {
        let wasm = artifacts.join(format!("{}.wasm", name.replace('-', "_")));
        if !wasm.exists() {
            panic!(
                "expected component {} after building plugin `{name}`",
                wasm.display()
            );
        }
        src.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            wasm.display().to_string()
        ));
    }
    src.push_str("];\n");
    fs::write(out_dir.join("bundled.rs"), src).expect("write bundled.rs");
}

/// Names of the crates under `plugins/` (directory name = package name).
fn guest_crates(plugins: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(plugins)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", plugins.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `<target>/wasm-plugins`, derived from OUT_DIR (`<target>/<profile>/build/<pkg>/out`).
fn wasm_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent())
        .and_then(|profile| profile.parent())
        .map(|target| target.join("wasm-plugins"))
        .unwrap_or_else(|| out_dir.join("wasm-plugins"))
}

fn rustc_sysroot() -> Option<PathBuf> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ensure_wasm_target() {
    let installed =
        || rustc_sysroot().is_some_and(|s| s.join("lib/rustlib").join(TARGET).join("lib").is_dir());
    if installed() {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    if installed() {
        // Cargo shows this again on later builds until the script reruns.
        println!("cargo:warning=the {TARGET} target was missing: installed it with rustup");
    } else {
        panic!(
            "the {TARGET} Rust target is missing and could not be installed ({status:?}); \
             run: rustup target add {TARGET}"
        );
    }
}

fn build_guests(root: &Path, target_dir: &Path, crates: &[String]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--profile",
            "plugin",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(target_dir);
    for name in crates {
        cmd.args(["-p", name]);
    }
    // The outer build's flags and wrappers (clippy, coverage, sanitizers)
    // are for host code; they must not leak into the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build plugins: {e}"));
    if !out.status.success() {
        panic!(
            "building the wasm plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
