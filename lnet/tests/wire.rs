//! Wire formats against bytes captured from a kernel LNet node
//! (`tests/vectors`, see its README) and layouts written from
//! `lnet-idl.h`, plus round trips in both byte orders.

use lnet::wire::{
    ByteOrder, HDR_NID4_SIZE, HDR_NID16_SIZE, Header, LNET_NI_STATUS_UP, MsgBody, NiStatus,
    PingInfo, WireHandle,
};
use lnet::{LNET_PID_LUSTRE, Nid, WireError};
use proptest::prelude::*;

fn hex(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The ksock message header before the LNet header (type, csum, 2 zc
/// cookies) in these captures.
const KSOCK_HDR: usize = 24;

#[test]
fn kernel_get_on_ping_portal() {
    let b = hex("get-ping-portal.hex");
    assert_eq!(b.len(), KSOCK_HDR + HDR_NID4_SIZE);
    let h = Header::decode_nid4(&b[KSOCK_HDR..], ByteOrder::Little).unwrap();
    assert_eq!(h.dest_nid, "10.77.0.1@tcp".parse().unwrap());
    assert_eq!(h.src_nid, "10.77.0.2@tcp".parse().unwrap());
    assert_eq!((h.dest_pid, h.src_pid), (LNET_PID_LUSTRE, LNET_PID_LUSTRE));
    assert_eq!(h.payload_length, 0);
    assert_eq!(
        h.body,
        MsgBody::Get {
            return_wmd: WireHandle {
                interface_cookie: 0xaaaa_0000_aaaa_0001,
                object_cookie: 0xbbbb_0000_bbbb_0002
            },
            match_bits: lnet::LNET_PROTO_PING_MATCHBITS,
            ptl_index: lnet::LNET_RESERVED_PORTAL,
            src_offset: 0,
            sink_length: 4096,
        }
    );
    // Our encoder produces the kernel's bytes exactly.
    assert_eq!(
        &h.encode_nid4(ByteOrder::Little).unwrap()[..],
        &b[KSOCK_HDR..]
    );
}

#[test]
fn kernel_reply_with_ping_info() {
    let b = hex("reply-ping-info.hex");
    let h = Header::decode_nid4(&b[KSOCK_HDR..], ByteOrder::Little).unwrap();
    assert_eq!(h.payload_length, 64);
    assert!(
        matches!(h.body, MsgBody::Reply { dst_wmd } if dst_wmd.object_cookie == 0xbbbb_0000_bbbb_0002)
    );
    assert_eq!(
        &h.encode_nid4(ByteOrder::Little).unwrap()[..],
        &b[KSOCK_HDR..KSOCK_HDR + HDR_NID4_SIZE]
    );
    let payload = &b[KSOCK_HDR + HDR_NID4_SIZE..];
    assert_eq!(payload.len(), 64);
    let p = PingInfo::decode(payload).unwrap();
    assert_eq!(p.features, 0x1e);
    assert_eq!(p.pid, LNET_PID_LUSTRE);
    let nids: Vec<String> = p.nis.iter().map(|n| n.nid.to_string()).collect();
    assert_eq!(nids, ["0@lo", "10.77.0.1@tcp", "10.77.0.1@o2ib"]);
    assert_eq!(
        p.nis[0].status, 2,
        "entry 0's status is the sequence number"
    );
    assert_eq!(p.nis[1].status, LNET_NI_STATUS_UP);
    assert_eq!(p.encode(ByteOrder::Little), payload);
}

#[test]
fn acceptor_and_hello_nids_match_the_nid4_form() {
    // The acceptor request and hello carry NIDs in the 8-byte form our
    // Nid encodes.
    let a = hex("acceptor-connreq-v1.hex");
    let nid = u64::from_le_bytes(a[8..16].try_into().unwrap());
    assert_eq!(Nid::from_nid4(nid).to_string(), "10.77.0.1@tcp");
    let h = hex("hello-v3-client.hex");
    let src = u64::from_le_bytes(h[8..16].try_into().unwrap());
    assert_eq!(Nid::from_nid4(src).to_string(), "10.77.0.2@tcp");
}

fn sample() -> Header {
    Header {
        dest_nid: "10.0.0.1@tcp".parse().unwrap(),
        src_nid: "10.0.0.2@tcp".parse().unwrap(),
        dest_pid: 12345,
        src_pid: 0x8000_0001,
        payload_length: 0x1234,
        body: MsgBody::Put {
            ack_wmd: WireHandle {
                interface_cookie: 0x0102_0304_0506_0708,
                object_cookie: 0x1112_1314_1516_1718,
            },
            match_bits: 0x2122_2324_2526_2728,
            hdr_data: 0x3132_3334_3536_3738,
            ptl_index: 0x41,
            offset: 0x5152_5354,
        },
    }
}

#[test]
fn put_layout_byte_exact_little_and_big() {
    let le = sample().encode_nid4(ByteOrder::Little).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(&0x0002_0000_0a00_0001u64.to_le_bytes());
    want.extend_from_slice(&0x0002_0000_0a00_0002u64.to_le_bytes());
    want.extend_from_slice(&12345u32.to_le_bytes());
    want.extend_from_slice(&0x8000_0001u32.to_le_bytes());
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&0x1234u32.to_le_bytes());
    want.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    want.extend_from_slice(&0x1112_1314_1516_1718u64.to_le_bytes());
    want.extend_from_slice(&0x2122_2324_2526_2728u64.to_le_bytes());
    want.extend_from_slice(&0x3132_3334_3536_3738u64.to_le_bytes());
    want.extend_from_slice(&0x41u32.to_le_bytes());
    want.extend_from_slice(&0x5152_5354u32.to_le_bytes());
    assert_eq!(&le[..], &want[..]);
    let be = sample().encode_nid4(ByteOrder::Big).unwrap();
    assert_eq!(&be[..8], &0x0002_0000_0a00_0001u64.to_be_bytes());
    assert_eq!(&be[64..68], &0x41u32.to_be_bytes());
    assert_eq!(Header::decode_nid4(&be, ByteOrder::Big).unwrap(), sample());
    // Read in the wrong order, it is garbage (the type is unknown).
    assert!(Header::decode_nid4(&be, ByteOrder::Little).is_err());
}

#[test]
fn nid16_layout_byte_exact() {
    let mut h = sample();
    h.dest_nid = "2001:db8::7@tcp3".parse().unwrap();
    let b = h.encode_nid16(ByteOrder::Little);
    assert_eq!(b.len(), HDR_NID16_SIZE);
    // struct lnet_nid: size 12, type 2, num 3 (big-endian), address.
    assert_eq!(&b[..4], &[12, 2, 0, 3]);
    assert_eq!(
        &b[4..20],
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    // A 4-byte NID in the large form: size 0, address in the first word.
    assert_eq!(&b[20..28], &[0, 2, 0, 0, 10, 0, 0, 2]);
    assert_eq!(&b[40..44], &12345u32.to_le_bytes());
    assert_eq!(&b[48..52], &1u32.to_le_bytes());
    assert_eq!(Header::decode_nid16(&b, ByteOrder::Little).unwrap(), h);
    assert!(
        h.encode_nid4(ByteOrder::Little).is_err(),
        "IPv6 needs the large form"
    );
}

#[test]
fn decoder_errors_are_typed() {
    let good = sample().encode_nid4(ByteOrder::Little).unwrap();
    assert!(matches!(
        Header::decode_nid4(&good[..71], ByteOrder::Little),
        Err(WireError::Short { .. })
    ));
    let mut bad = good;
    bad[24..28].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(
        Header::decode_nid4(&bad, ByteOrder::Little),
        Err(WireError::UnknownType(9))
    );
    let mut big = good;
    big[28..32].copy_from_slice(&(lnet::LNET_MTU + 1).to_le_bytes());
    assert!(matches!(
        Header::decode_nid4(&big, ByteOrder::Little),
        Err(WireError::TooLong { .. })
    ));
    let mut get = Header {
        body: MsgBody::Get {
            return_wmd: WireHandle::NONE,
            match_bits: 0,
            ptl_index: 0,
            src_offset: 0,
            sink_length: 2 << 20,
        },
        ..sample()
    };
    get.payload_length = 0;
    let b = get.encode_nid4(ByteOrder::Little).unwrap();
    assert!(matches!(
        Header::decode_nid4(&b, ByteOrder::Little),
        Err(WireError::TooLong { .. })
    ));
    let mut n16 = sample().encode_nid16(ByteOrder::Little);
    n16[0] = 3;
    assert_eq!(
        Header::decode_nid16(&n16, ByteOrder::Little),
        Err(WireError::BadNid(3))
    );
    assert!(matches!(
        PingInfo::decode(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        Err(WireError::BadMagic(_))
    ));
    // A count far larger than the buffer: an error, not an allocation.
    let mut p = PingInfo {
        features: 0,
        pid: 1,
        nis: vec![],
        large_nis: vec![],
    }
    .encode(ByteOrder::Little);
    p[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(PingInfo::decode(&p), Err(WireError::Short { .. })));
}

fn arb_nid(large: bool) -> impl Strategy<Value = Nid> {
    let v4 = (
        any::<u32>(),
        prop_oneof![Just("tcp"), Just("o2ib"), Just("shm"), Just("gni")],
        0u16..5,
    )
        .prop_map(|(a, n, num)| {
            let net: lnet::Net = format!("{n}{num}").parse().unwrap();
            Nid::new4(net, a)
        });
    if large {
        prop_oneof![
            v4,
            any::<[u8; 16]>()
                .prop_map(|a| Nid::from_ip("tcp".parse().unwrap(), std::net::IpAddr::V6(a.into())))
        ]
        .boxed()
    } else {
        v4.boxed()
    }
}

fn arb_wmd() -> impl Strategy<Value = WireHandle> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| WireHandle {
        interface_cookie: a,
        object_cookie: b,
    })
}

fn arb_body() -> impl Strategy<Value = (MsgBody, bool)> {
    prop_oneof![
        (arb_wmd(), any::<u64>(), 0..=lnet::LNET_MTU).prop_map(|(w, m, l)| (
            MsgBody::Ack {
                dst_wmd: w,
                match_bits: m,
                mlength: l
            },
            false
        )),
        (
            arb_wmd(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(w, m, d, p, o)| (
                MsgBody::Put {
                    ack_wmd: w,
                    match_bits: m,
                    hdr_data: d,
                    ptl_index: p,
                    offset: o
                },
                true
            )),
        (
            arb_wmd(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            0..=lnet::LNET_MTU
        )
            .prop_map(|(w, m, p, o, s)| (
                MsgBody::Get {
                    return_wmd: w,
                    match_bits: m,
                    ptl_index: p,
                    src_offset: o,
                    sink_length: s
                },
                false
            )),
        arb_wmd().prop_map(|w| (MsgBody::Reply { dst_wmd: w }, true)),
        (any::<u64>(), any::<u32>()).prop_map(|(i, t)| (
            MsgBody::Hello {
                incarnation: i,
                hello_type: t
            },
            true
        )),
    ]
}

fn arb_header(large: bool) -> impl Strategy<Value = Header> {
    (
        arb_nid(large),
        arb_nid(large),
        any::<u32>(),
        any::<u32>(),
        0..=lnet::LNET_MTU,
        arb_body(),
    )
        .prop_map(|(d, s, dp, sp, len, (body, has_payload))| Header {
            dest_nid: d,
            src_nid: s,
            dest_pid: dp,
            src_pid: sp,
            payload_length: if has_payload { len } else { 0 },
            body,
        })
}

fn arb_order() -> impl Strategy<Value = ByteOrder> {
    prop_oneof![Just(ByteOrder::Little), Just(ByteOrder::Big)]
}

proptest! {
    #[test]
    fn header_nid4_round_trip(h in arb_header(false), o in arb_order()) {
        let b = h.encode_nid4(o).unwrap();
        prop_assert_eq!(Header::decode_nid4(&b, o).unwrap(), h);
    }

    #[test]
    fn header_nid16_round_trip(h in arb_header(true), o in arb_order()) {
        let b = h.encode_nid16(o);
        prop_assert_eq!(Header::decode_nid16(&b, o).unwrap(), h);
    }

    #[test]
    fn ping_round_trip(
        pid in any::<u32>(),
        features in any::<u32>(),
        nis in proptest::collection::vec((arb_nid(false), any::<u32>(), any::<u32>()), 1..20),
        large in proptest::collection::vec((arb_nid(true), any::<u32>()), 0..8),
        o in arb_order(),
    ) {
        let p = PingInfo {
            features,
            pid,
            nis: nis.iter().map(|(n, s, m)| NiStatus { nid: *n, status: *s, msg_size: *m }).collect(),
            large_nis: large.iter().map(|(n, s)| NiStatus { nid: *n, status: *s, msg_size: 0 }).collect(),
        };
        let b = p.encode(o);
        prop_assert_eq!(b.len(), p.encoded_len());
        let q = PingInfo::decode(&b).unwrap();
        prop_assert_eq!(q.pid, p.pid);
        prop_assert_eq!(&q.large_nis, &p.large_nis);
        prop_assert_eq!(q.nis.len(), p.nis.len());
        for (a, b) in q.nis.iter().zip(p.nis.iter()).skip(if large.is_empty() { 0 } else { 1 }) {
            prop_assert_eq!(a, b);
        }
        // Decoding the encoding again is stable.
        prop_assert_eq!(PingInfo::decode(&q.encode(o)).unwrap(), q);
    }

    #[test]
    fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), o in arb_order()) {
        let _ = Header::decode_nid4(&b, o);
        let _ = Header::decode_nid16(&b, o);
        let _ = PingInfo::decode(&b);
        let s = String::from_utf8_lossy(&b);
        let _ = s.parse::<Nid>();
        let _ = s.parse::<lnet::NidRange>();
    }
}

#[test]
fn nid4_with_reserved_top_byte_or_any_type() {
    let mut b = sample().encode_nid4(ByteOrder::Little).unwrap();
    b[7] = 1; // top byte of dest_nid
    assert_eq!(
        Header::decode_nid4(&b, ByteOrder::Little),
        Err(WireError::BadNid(1))
    );
    let mut b = sample().encode_nid4(ByteOrder::Little).unwrap();
    b[14] = 0xff; // type byte of src_nid: "any"
    let h = Header::decode_nid4(&b, ByteOrder::Little).unwrap();
    assert_eq!(h.src_nid, Nid::ANY);
    assert_eq!(
        Header::decode_nid4(
            &h.encode_nid4(ByteOrder::Little).unwrap(),
            ByteOrder::Little
        )
        .unwrap(),
        h
    );
}
