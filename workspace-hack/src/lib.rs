//! Feature unification for single-crate builds; see Cargo.toml. No code.
#![forbid(unsafe_code)]
