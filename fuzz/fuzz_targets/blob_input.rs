//! A script of application calls, deliveries, cuts, timeouts and hostile frames through two
//! sans-IO blob stream state machines connected back to back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vicus::fuzzing::blob_input(data));
