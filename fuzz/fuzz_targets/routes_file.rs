//! Arbitrary text through the routes-file parser (FileResolver's format).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vicus::fuzzing::routes_file(data));
