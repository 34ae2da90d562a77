#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnet::fuzzing::ping_info(data));
