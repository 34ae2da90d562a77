//! The o2iblnd decoders on arbitrary bytes: the message (every type, both
//! byte orders, RDMA descriptors, embedded LNet headers) and the reject
//! record. Whatever decodes must re-encode.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnd_rdma::wire::fuzz_check(data));
