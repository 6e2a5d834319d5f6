//! Arbitrary peer bytes and driver calls through one sans-IO A1 session.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vicus::fuzzing::session_input(data));
