//! Replays the committed fuzz corpus (`fuzz/corpus/o2iblnd_msg`) through
//! the fuzz target's own check, so `cargo test` guards every input the
//! fuzzer found interesting.

#[test]
fn replay_o2iblnd_msg_corpus() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/o2iblnd_msg");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus directory") {
        lnd_rdma::wire::fuzz_check(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 10, "corpus has {n} inputs");
}
