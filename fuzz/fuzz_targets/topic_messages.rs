//! Arbitrary bytes as the topic service's message bodies (SUBSCRIBE, UNSUBSCRIBE, grants,
//! PUBLISH).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vicus::fuzzing::topic_messages(data));
