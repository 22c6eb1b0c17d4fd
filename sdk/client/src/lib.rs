//! Async Rust client for Sluice (work in progress: see the broker-core issue).
