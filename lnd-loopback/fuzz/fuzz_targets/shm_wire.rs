//! Every shm decoder on arbitrary bytes, as a peer could leave them in
//! shared memory or send them over the socket: ring slots, the hello, the
//! segment header. Nothing may panic; what decodes is in bounds.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnd_loopback::shm::wire::fuzz_check(data));
