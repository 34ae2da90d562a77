//! Every socklnd decoder on arbitrary bytes: the hello (all versions),
//! the acceptor request's NID and the ksock message header. Whatever
//! decodes must re-encode to the same value.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lnd_tcp::proto::fuzz_check(data));
