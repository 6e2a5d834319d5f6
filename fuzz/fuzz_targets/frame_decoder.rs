//! Arbitrary bytes through the A1 frame decoder, with re-encoding round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vicus::fuzzing::frame_decoder(data));
