//! Replays the committed fuzz corpus (`fuzz/corpus/srpc_msg`) through the
//! fuzz target's own check.

#[test]
fn replay_srpc_msg_corpus() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/srpc_msg");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus directory") {
        lnet_selftest::wire::fuzz_check(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 10, "corpus has {n} inputs");
}
