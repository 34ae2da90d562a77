//! Entry points shared by the `cargo fuzz` targets (`lnet/fuzz`) and the
//! test that replays their committed corpus, so CI exercises every decoder
//! on the same inputs. Each checks the decoder's contract: no panic, and a
//! successful decode re-encodes to bytes that decode to the same value.

use crate::wire::{ByteOrder, Header, PingInfo};
use crate::{Nid, NidRange};

fn order(data: &[u8]) -> (ByteOrder, &[u8]) {
    match data.split_first() {
        Some((b, rest)) if b & 1 == 1 => (ByteOrder::Big, rest),
        Some((_, rest)) => (ByteOrder::Little, rest),
        None => (ByteOrder::Little, data),
    }
}

/// The 72-byte header decoder (first byte picks the byte order).
pub fn header_nid4(data: &[u8]) {
    let (o, b) = order(data);
    if let Ok(h) = Header::decode_nid4(b, o) {
        let e = h.encode_nid4(o).expect("decoded nid4 header re-encodes");
        assert_eq!(Header::decode_nid4(&e, o), Ok(h));
    }
}

/// The 96-byte header decoder (first byte picks the byte order).
pub fn header_nid16(data: &[u8]) {
    let (o, b) = order(data);
    if let Ok(h) = Header::decode_nid16(b, o) {
        let e = h.encode_nid16(o);
        assert_eq!(Header::decode_nid16(&e, o), Ok(h));
    }
}

/// The ping buffer decoder.
pub fn ping_info(data: &[u8]) {
    if let Ok(p) = PingInfo::decode(data) {
        let e = p.encode(ByteOrder::NATIVE);
        let q = PingInfo::decode(&e).expect("re-encoded ping decodes");
        assert_eq!(q.pid, p.pid);
        assert_eq!(q.large_nis, p.large_nis);
    }
}

/// The NID and NID-range parsers.
pub fn nid_strings(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(n) = s.parse::<Nid>() {
        assert_eq!(n.to_string().parse::<Nid>(), Ok(n));
    }
    if let Ok(r) = s.parse::<NidRange>() {
        for n in r.iter().take(64) {
            assert!(r.contains(&n));
        }
    }
}
