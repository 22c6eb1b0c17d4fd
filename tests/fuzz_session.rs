//! Stateful fuzzing of a session in CI: random programs of client frames
//! (see `sluice_tests::program`) against a real broker over memory, each
//! checked for panics, undecodable output, cross-tenant effects and
//! resources left behind. Longer runs: the cargo-fuzz target `session`
//! (docs/fuzzing.md). `SLUICE_FUZZ_CASES` sets the number of programs.

use proptest::prelude::*;
use sluice_tests::program::{World, record_panics, take_panics};

fn cases() -> u32 {
    std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn arbitrary_frame_sequences_keep_the_invariants() {
    record_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let world = rt.block_on(World::new());
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(data in proptest::collection::vec(any::<u8>(), 0..600))| {
        rt.block_on(world.check(&data));
        let panics = take_panics();
        prop_assert!(panics.is_empty(), "panics: {panics:?}");
    });
}

/// Hand-written programs for paths random bytes reach rarely.
#[test]
fn known_programs_keep_the_invariants() {
    record_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let world = rt.block_on(World::new());
    let programs: &[&[u8]] = &[
        // declare q0, bind a.>, publish, subscribe, ack everything
        &[
            1, 1, 0, 0, 0, 2, 0, 1, 0, 0, 5, 1, 0, 0, 0, 9, 0, 10, 0, 10, 0, 1, 0,
        ],
        // cross-tenant names everywhere
        &[1, 1, 0, 4, 0, 1, 2, 4, 0, 1, 0, 0, 4, 1, 0, 1, 15, 4, 0, 1],
        // a plugin load of each kind
        &[
            16, 0, 0, 1, 0, 1, 1, 16, 1, 1, 1, 0, 1, 1, 16, 2, 2, 1, 0, 0, 1, 1,
        ],
        // garbage
        &[
            18, 16, 255, 255, 255, 255, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ],
        // empty
        &[],
    ];
    for p in programs {
        rt.block_on(world.check(p));
        assert!(take_panics().is_empty());
    }
}
