//! Every socklnd decoder on arbitrary bytes: the hello (all versions),
//! the acceptor request's NID and the ksock message header. Whatever
//! decodes must re-encode to the same value.
#![no_main]
use lnd_tcp::proto::{Hello, KsockHdr, acceptor_nid, first_word};
use lnet::wire::ByteOrder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        for order in [ByteOrder::Little, ByteOrder::Big] {
            let e = h.encode(order).expect("a decoded hello encodes");
            assert_eq!(Hello::decode(&e), Ok(h));
        }
    }
    if data.len() >= 4 {
        let _ = first_word(data[..4].try_into().unwrap());
    }
    for v in [1u32, 2, 3] {
        for order in [ByteOrder::Little, ByteOrder::Big] {
            let n = if v == 2 { 20 } else { 8 };
            if let Some(rest) = data.get(..n) {
                let _ = acceptor_nid(v, rest, order);
            }
        }
    }
    if let Some(b) = data.get(..24) {
        let k = KsockHdr::decode(b.try_into().unwrap(), ByteOrder::Big);
        assert_eq!(KsockHdr::decode(&k.encode(ByteOrder::Big), ByteOrder::Big), k);
    }
});
