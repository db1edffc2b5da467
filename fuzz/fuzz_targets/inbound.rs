//! The inbound decoder, client frames to client messages, on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_ws::fuzzing::inbound(data);
});
