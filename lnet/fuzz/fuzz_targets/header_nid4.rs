#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnet::fuzzing::header_nid4(data));
