//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same entry points the `cargo fuzz` targets use, so CI runs every
//! decoder on it.

fn replay(target: &str, f: fn(&[u8])) {
    let dir = format!("{}/fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let p = e.unwrap().path();
        f(&std::fs::read(&p).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus for {target}");
}

#[test]
fn header_nid4() {
    replay("header_nid4", lnet::fuzzing::header_nid4);
}
#[test]
fn header_nid16() {
    replay("header_nid16", lnet::fuzzing::header_nid16);
}
#[test]
fn ping_info() {
    replay("ping_info", lnet::fuzzing::ping_info);
}
#[test]
fn nid_strings() {
    replay("nid_strings", lnet::fuzzing::nid_strings);
}
