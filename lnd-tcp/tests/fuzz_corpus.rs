//! Replays the committed fuzz corpus (`fuzz/corpus/socklnd_handshake`)
//! through the fuzz target's own check, so `cargo test` guards every input
//! the fuzzer found interesting.

#[test]
fn replay_socklnd_handshake_corpus() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/socklnd_handshake");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus directory") {
        lnd_tcp::proto::fuzz_check(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 10, "corpus has {n} inputs");
}
