//! The selftest RPC decoder on arbitrary bytes, as any node may PUT them
//! to our request portals: nothing may panic; what decodes round-trips.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnet_selftest::wire::fuzz_check(data));
