//! The plugins from `plugins/`, compiled to components at build time and
//! embedded in the binary (the demo, the tests and the benchmarks use them).

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The component bytes of the bundled plugin `name` (its crate name, e.g.
/// `topic-router`).
pub fn wasm(name: &str) -> Option<&'static [u8]> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, w)| *w)
}
