//! Replays the committed fuzz corpus (`fuzz/corpus/socklnd_handshake`)
//! through the same checks as the fuzz target, so `cargo test` guards
//! every input the fuzzer found interesting.

use lnd_tcp::proto::{Hello, KsockHdr, acceptor_nid, first_word};
use lnet::wire::ByteOrder;

fn check(data: &[u8]) {
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
        let n = if v == 2 { 20 } else { 8 };
        if let Some(rest) = data.get(..n) {
            let _ = acceptor_nid(v, rest, ByteOrder::Little);
        }
    }
    if let Some(b) = data.get(..24) {
        let k = KsockHdr::decode(b.try_into().unwrap(), ByteOrder::Big);
        assert_eq!(
            KsockHdr::decode(&k.encode(ByteOrder::Big), ByteOrder::Big),
            k
        );
    }
}

#[test]
fn replay_socklnd_handshake_corpus() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/socklnd_handshake");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus directory") {
        check(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 10, "corpus has {n} inputs");
}
