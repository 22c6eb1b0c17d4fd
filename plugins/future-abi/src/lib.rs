//! A test component built against `sluice:plugin@0.3.0`, which this broker
//! does not implement: loading it must fail with a message naming both
//! versions.

wit_bindgen::generate!({
    world: "filter",
    path: "wit",
});

struct FutureAbi;

impl Guest for FutureAbi {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        sluice::plugin::host::log("future-abi init");
        Ok(())
    }

    fn filter(topic: String, payload: Vec<u8>) -> bool {
        sluice::plugin::host::log(&topic);
        !payload.is_empty()
    }
}

export!(FutureAbi);
