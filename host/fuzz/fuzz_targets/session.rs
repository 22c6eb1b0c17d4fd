//! Stateful fuzzing of a session: the input is read as a program of client
//! frames (`sluice_tests::program`), run against a real broker over memory,
//! and checked for panics, undecodable output, cross-tenant effects and
//! resources left behind. One broker per process; each program's queues
//! and plugins are removed after it.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_tests::program::World;

fn world() -> &'static (tokio::runtime::Runtime, World) {
    static WORLD: OnceLock<(tokio::runtime::Runtime, World)> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let world = rt.block_on(World::new());
        (rt, world)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, world) = world();
    rt.block_on(world.check(data));
});
