//! A test component the broker must refuse: it is a valid `filter` but also
//! imports `wasi:cli/environment@0.2.0`, and Sluice plugins get no WASI.

#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "test:wasi-importer/filter-with-wasi",
    path: ["../../wit", "wit"],
    generate_all,
});

struct WasiImporter;

impl Guest for WasiImporter {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn filter(_msg: Message) -> Result<FilterVerdict, String> {
        // Really use the import so it stays in the component.
        let env = wasi::cli::environment::get_environment();
        Ok(if env.is_empty() {
            FilterVerdict::Accept
        } else {
            FilterVerdict::Drop(format!("{} variables", env.len()))
        })
    }

    fn filter_batch(msgs: Vec<Message>) -> Vec<Result<FilterVerdict, String>> {
        msgs.into_iter().map(Self::filter).collect()
    }
}

export!(WasiImporter);
