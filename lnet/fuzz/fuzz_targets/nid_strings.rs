#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnet::fuzzing::nid_strings(data));
