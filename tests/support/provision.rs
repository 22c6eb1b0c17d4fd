//! System tools the suites need, installed on first use.
//!
//! `cargo test --workspace` is the whole promise of the README, so the tests
//! provide what they run the way `host/build.rs` provides the wasm target:
//! a missing tool is installed with the system's package manager (apt-get,
//! as root or through password-less sudo), and where that is impossible the
//! test fails with one line naming the one command to run. Set
//! `SLUICE_TEST_NO_INSTALL=1` to get that line instead of an install.
//!
//! This file is shared: `sluice_tests::provision` for the suites in `tests/`,
//! and included by path (`#[path]`) where a crate's own tests need a tool
//! (the strace checks of `host/tests/durability.rs`, the openssl
//! certificates of the TLS unit tests).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// How to tell that a tool is there.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// A program on `PATH`.
    Program(&'static str),
    /// A file at a fixed path.
    File(&'static str),
    /// A file under some `/usr/lib/llvm-<N>/lib/clang/<M>/`, at this path
    /// below it (the clang runtime's location has the versions in it).
    ClangResource(&'static str),
}

/// One thing a test needs and the Debian package that has it.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// How to tell it is installed.
    pub probe: Probe,
    /// The Debian package that installs it.
    pub package: &'static str,
}

/// strace (the fsync checks).
pub const STRACE: &[Need] = &[Need {
    probe: Probe::Program("strace"),
    package: "strace",
}];

/// openssl (certificates made by a tool other than ours).
pub const OPENSSL: &[Need] = &[Need {
    probe: Probe::Program("openssl"),
    package: "openssl",
}];

/// What `plugins/c-header-filter/Makefile` needs: make, clang, wasm-ld,
/// wasi-libc and clang's wasm32 builtins.
pub const C_PLUGIN: &[Need] = &[
    Need {
        probe: Probe::Program("make"),
        package: "make",
    },
    Need {
        probe: Probe::Program("clang"),
        package: "clang",
    },
    Need {
        probe: Probe::Program("wasm-ld"),
        package: "lld",
    },
    Need {
        probe: Probe::File("/usr/lib/wasm32-wasi/libc.a"),
        package: "wasi-libc",
    },
    Need {
        probe: Probe::ClangResource("lib/wasi/libclang_rt.builtins-wasm32.a"),
        package: "libclang-rt-dev-wasm32",
    },
];

/// Makes sure everything in `needs` is installed, installing what is
/// missing; panics with one line naming the command if that fails. `what`
/// says what needs it, for that line.
pub fn require(what: &str, needs: &[Need]) {
    // One install at a time in this process; apt-get itself waits for
    // another process's lock (DPkg::Lock::Timeout).
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let missing = missing(needs);
    if missing.is_empty() {
        return;
    }
    let command = format!("apt-get install -y {}", missing.join(" "));
    if std::env::var_os("SLUICE_TEST_NO_INSTALL").is_some() {
        panic!("{what} needs {}: run `{command}`", missing.join(", "));
    }
    let outcome = install(&missing);
    let still = self::missing(needs);
    if !still.is_empty() {
        panic!(
            "{what} needs {}, which could not be installed ({outcome}): run `sudo {command}`",
            still.join(", ")
        );
    }
}

/// The packages of the needs that are not met.
fn missing(needs: &[Need]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = needs
        .iter()
        .filter(|n| !present(n.probe))
        .map(|n| n.package)
        .collect();
    packages.dedup();
    packages
}

fn present(probe: Probe) -> bool {
    match probe {
        Probe::Program(name) => std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file())),
        Probe::File(path) => Path::new(path).is_file(),
        Probe::ClangResource(below) => subdirs("/usr/lib", "llvm-")
            .into_iter()
            .flat_map(|llvm| subdirs(llvm.join("lib/clang"), ""))
            .any(|clang| clang.join(below).is_file()),
    }
}

fn subdirs(dir: impl AsRef<Path>, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Installs `packages` with apt-get (refreshing the package lists if the
/// first try fails, as on a machine that never ran `apt-get update`).
/// Returns what happened, for the error line.
fn install(packages: &[&str]) -> String {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let sudo = !root
        && Command::new("sudo")
            .args(["-n", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !root && !sudo {
        return "not root, and sudo asks for a password".into();
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(if sudo { "sudo" } else { "apt-get" });
        if sudo {
            cmd.args(["-n", "apt-get"]);
        }
        cmd.args(["-o", "DPkg::Lock::Timeout=600", "-q", "-y"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    eprintln!(
        "installing {} with apt-get (needed by the tests)",
        packages.join(" ")
    );
    let mut install = vec!["install", "--no-install-recommends"];
    install.extend_from_slice(packages);
    match apt(&install) {
        Ok(o) if o.status.success() => return "installed".into(),
        Err(e) => return format!("apt-get: {e}"),
        Ok(_) => {}
    }
    let _ = apt(&["update"]);
    match apt(&install) {
        Ok(o) if o.status.success() => "installed".into(),
        Ok(o) => String::from_utf8_lossy(&o.stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("apt-get failed")
            .trim()
            .to_string(),
        Err(e) => format!("apt-get: {e}"),
    }
}
