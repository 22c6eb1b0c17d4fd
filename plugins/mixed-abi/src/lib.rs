//! A test component the broker must refuse: a valid `sluice:plugin@0.2.0`
//! filter that also imports `sluice:plugin/host@0.1.0`. A component's sluice
//! imports must all be of one contract version.

#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "test:mixed-abi/mixed-filter",
    path: ["../../wit/0.1.0", "../../wit", "wit"],
    generate_all,
});

struct MixedAbi;

impl Guest for MixedAbi {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn filter(msg: Message) -> Result<FilterVerdict, String> {
        // Use both imports so they stay in the component.
        sluice::plugin0_1_0::host::log(sluice::plugin0_1_0::types::LogLevel::Info, &msg.topic);
        sluice::plugin0_2_0::host::log(sluice::plugin0_2_0::types::LogLevel::Info, &msg.topic);
        Ok(FilterVerdict::Accept)
    }

    fn filter_batch(msgs: Vec<Message>) -> Vec<Result<FilterVerdict, String>> {
        msgs.into_iter().map(Self::filter).collect()
    }
}

export!(MixedAbi);
