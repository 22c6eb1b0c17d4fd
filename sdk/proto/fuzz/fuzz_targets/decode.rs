//! Any bytes, fed in chunks of any size, never panic the decoder or make it
//! allocate past its limits; every frame it accepts re-encodes to bytes that
//! decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proto::{Decoder, Limits, encode_frame};

fuzz_target!(|data: &[u8]| {
    let (split, bytes) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let mut d = Decoder::new(Limits::default());
    for chunk in bytes.chunks(split) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let mut again = Decoder::new(Limits::default());
                    again.push(&encode_frame(&frame));
                    assert_eq!(again.next_frame().ok().flatten().as_ref(), Some(&frame));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
