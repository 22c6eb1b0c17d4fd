//! Helpers for the tests that run the real `sluice` binary as a child
//! process: free loopback ports, development certificates, starting a
//! broker, connecting, and reading its memory use.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_client::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A loopback UDP port nobody uses right now.
pub fn free_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

/// Development certificates in `dir/certs` with tenant `acme`.
pub fn certs(dir: &Path) {
    let st = Command::new(BIN)
        .args(["certs", "init", "--out"])
        .arg(dir.join("certs"))
        .args(["--tenant", "acme"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

/// A broker child process, killed when dropped (also when a test panics,
/// so no broker outlives its test).
pub struct Served(pub Child);

impl std::ops::Deref for Served {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sluice serve` on `addr` with data in `dir/data` and `extra` flags.
pub fn spawn(dir: &Path, addr: SocketAddr, extra: &[&str]) -> Served {
    let child = Command::new(BIN)
        .args(["serve", "--listen", &addr.to_string(), "--data"])
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Served(child)
}

/// Connect as `acme`, retrying while the broker starts (at most 20 s).
pub async fn connect(dir: &Path, addr: SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr, &dir.join("certs/acme")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("broker did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// An environment variable as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
