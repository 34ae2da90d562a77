//! Byte-exact layouts of the acceptor request, every hello version and the
//! ksock message frame, checked against bytes written by hand from
//! Lustre's `lnet-idl.h` / `socklnd-idl.h` and against the kernel capture.

use lnd_tcp::Reject;
use lnd_tcp::proto::*;
use lnet::Nid;
use lnet::wire::ByteOrder;

fn hex(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../lnet/tests/vectors/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn nid(s: &str) -> Nid {
    s.parse().unwrap()
}

#[test]
fn acceptor_request_v1_is_the_kernel_capture() {
    let b = AcceptorRequest::V1(nid("10.77.0.1@tcp")).encode(ByteOrder::Little);
    assert_eq!(b, hex("acceptor-connreq-v1.hex"));
    // Hand layout, big-endian: magic, version, nid4 (net<<32 | addr).
    let be = AcceptorRequest::V1(nid("10.77.0.1@tcp")).encode(ByteOrder::Big);
    let mut want = Vec::new();
    want.extend_from_slice(&0xacce_7100u32.to_be_bytes());
    want.extend_from_slice(&1u32.to_be_bytes());
    want.extend_from_slice(&((2u64 << 48) | 0x0a4d_0001).to_be_bytes());
    assert_eq!(be, want);
    assert_eq!(
        first_word([0x00, 0x71, 0xce, 0xac]),
        FirstWord::Acceptor(ByteOrder::Little)
    );
    assert_eq!(
        first_word([0xac, 0xce, 0x71, 0x00]),
        FirstWord::Acceptor(ByteOrder::Big)
    );
    assert_eq!(
        first_word(*b"GET "),
        FirstWord::Unknown(u32::from_le_bytes(*b"GET "))
    );
}

#[test]
fn acceptor_request_v2_carries_a_large_nid() {
    let n = nid("fd00::1@tcp");
    let b = AcceptorRequest::V2(n).encode(ByteOrder::Little);
    assert_eq!(b.len(), ACCEPTOR_V2_SIZE);
    assert_eq!(&b[..4], &0xacce_7100u32.to_le_bytes());
    assert_eq!(&b[4..8], &2u32.to_le_bytes());
    // struct lnet_nid: size (16 - 4 = 12), type, num (BE), address (BE).
    assert_eq!(b[8], 12);
    assert_eq!(b[9], 2);
    assert_eq!(&b[10..12], &[0, 0]);
    assert_eq!(&b[12..14], &[0xfd, 0x00]);
    assert_eq!(b[27], 1);
    assert_eq!(acceptor_nid(2, &b[8..], ByteOrder::Little).unwrap(), n);
    assert_eq!(AcceptorRequest::for_nid(n), AcceptorRequest::V2(n));
    assert_eq!(
        AcceptorRequest::for_nid(nid("1.2.3.4@tcp")),
        AcceptorRequest::V1(nid("1.2.3.4@tcp"))
    );
    // The answer to what an acceptor cannot serve: magic, version 1, NID 0.
    let a = AcceptorRequest::version_answer(ByteOrder::Little);
    assert_eq!(
        a,
        [0x00, 0x71, 0xce, 0xac, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn hello_v3_matches_both_kernel_captures() {
    let client = hex("hello-v3-client.hex");
    let h = Hello::decode(&client).unwrap();
    assert_eq!(
        h,
        Hello {
            version: 3,
            src_nid: nid("10.77.0.2@tcp"),
            dst_nid: nid("10.77.0.1@tcp"),
            src_pid: 12345,
            dst_pid: u32::MAX,
            src_incarnation: 0x1122_3344_5566_7788,
            dst_incarnation: 0,
            ctype: ConnType::Control.to_wire(),
        }
    );
    assert_eq!(h.encode(ByteOrder::Little).unwrap(), client);
    let reply = hex("hello-v3-kernel-reply.hex");
    let k = Hello::decode(&reply).unwrap();
    assert_eq!(k.src_nid, nid("10.77.0.1@tcp"));
    assert_eq!(k.src_incarnation, 0x18ea_26aa_8807_1d02);
    assert_eq!(k.encode(ByteOrder::Little).unwrap(), reply);
    // The kernel's answer is what our active side accepts.
    assert_eq!(
        active_check(&k, 3, ConnType::Control, h.dst_nid, h.src_nid).unwrap(),
        ActiveVerdict::Connected
    );
    // And the client's hello is what our passive side accepts.
    assert_eq!(
        passive_check(&h, nid("10.77.0.1@tcp"), false, |_| false).unwrap(),
        PassiveVerdict::Accept(ConnType::Control)
    );
}

fn sample(version: u32, src: &str, dst: &str, ctype: u32) -> Hello {
    Hello {
        version,
        src_nid: nid(src),
        dst_nid: nid(dst),
        src_pid: 0x0102_0304,
        dst_pid: 0x0506_0708,
        src_incarnation: 0x1112_1314_1516_1718,
        dst_incarnation: 0x2122_2324_2526_2728,
        ctype,
    }
}

#[test]
fn hello_v2_layout_by_hand_in_both_orders() {
    let h = sample(2, "192.168.1.2@tcp3", "192.168.1.9@tcp3", 2);
    for order in [ByteOrder::Little, ByteOrder::Big] {
        let b = h.encode(order).unwrap();
        let w32 = |v: u32| match order {
            ByteOrder::Little => v.to_le_bytes().to_vec(),
            ByteOrder::Big => v.to_be_bytes().to_vec(),
        };
        let w64 = |v: u64| match order {
            ByteOrder::Little => v.to_le_bytes().to_vec(),
            ByteOrder::Big => v.to_be_bytes().to_vec(),
        };
        let mut want = Vec::new();
        want.extend(w32(0x4572_6963));
        want.extend(w32(2));
        want.extend(w64((2u64 << 48) | (3u64 << 32) | 0xc0a8_0102));
        want.extend(w64((2u64 << 48) | (3u64 << 32) | 0xc0a8_0109));
        want.extend(w32(0x0102_0304));
        want.extend(w32(0x0506_0708));
        want.extend(w64(0x1112_1314_1516_1718));
        want.extend(w64(0x2122_2324_2526_2728));
        want.extend(w32(2));
        want.extend(w32(0));
        assert_eq!(b, want, "{order:?}");
        assert_eq!(Hello::decode(&b).unwrap(), h);
    }
}

#[test]
fn hello_v4_layout_by_hand() {
    let h = sample(4, "fd00::2@tcp", "fd00::1@tcp", CONN_NONE);
    let b = h.encode(ByteOrder::Big).unwrap();
    assert_eq!(b.len(), 80);
    assert_eq!(&b[..8], &[0x45, 0x72, 0x69, 0x63, 0, 0, 0, 4]);
    // Large NIDs keep their own (network) layout in either order.
    assert_eq!(&b[8..28], &nid("fd00::2@tcp").to_wire16());
    assert_eq!(&b[28..48], &nid("fd00::1@tcp").to_wire16());
    assert_eq!(&b[48..52], &0x0102_0304u32.to_be_bytes());
    assert_eq!(&b[72..76], &[0xff; 4]);
    assert_eq!(&b[76..80], &[0; 4]);
    assert_eq!(Hello::decode(&b).unwrap(), h);
    let le = h.encode(ByteOrder::Little).unwrap();
    assert_eq!(&le[8..48], &b[8..48]);
    assert_eq!(Hello::decode(&le).unwrap(), h);
    // v2/v3 cannot carry these NIDs.
    let mut v3 = h;
    v3.version = 3;
    assert_eq!(v3.encode(ByteOrder::Little), Err(Reject::NeedsLargeNids));
}

#[test]
fn hello_decoding_rejects_what_the_kernel_rejects() {
    let mut b = sample(3, "1.1.1.1@tcp", "1.1.1.2@tcp", 1)
        .encode(ByteOrder::Little)
        .unwrap();
    b[4] = 9;
    assert_eq!(Hello::decode(&b), Err(Reject::BadVersion(9)));
    b[4] = 3;
    b[0] = 0;
    assert!(matches!(Hello::decode(&b), Err(Reject::BadMagic(_))));
    b[0] = 0x63;
    b[52] = 17; // nips over LNET_INTERFACES_NUM
    assert!(matches!(Hello::decode(&b), Err(Reject::BadHello(_))));
    assert_eq!(Hello::decode(&b[..30]), Err(Reject::Truncated));
    // Passive side: a hello for another NID, ANY as source, bad type.
    let me = nid("1.1.1.2@tcp");
    let h = sample(3, "1.1.1.1@tcp", "1.1.1.3@tcp", 1);
    assert!(matches!(
        passive_check(&h, me, false, |_| false),
        Err(Reject::WrongNid(_))
    ));
    let h = sample(3, "1.1.1.1@tcp", "1.1.1.2@tcp", 7);
    assert!(matches!(
        passive_check(&h, me, false, |_| false),
        Err(Reject::BadHello(_))
    ));
    // Active side: a NONE answer in another version asks for a retry; in
    // ours it is a refusal.
    let mut a = sample(2, "1.1.1.2@tcp", "1.1.1.1@tcp", CONN_NONE);
    let us = nid("1.1.1.1@tcp");
    assert_eq!(
        active_check(&a, 3, ConnType::Control, me, us).unwrap(),
        ActiveVerdict::RetryWith(2)
    );
    a.version = 3;
    assert_eq!(
        active_check(&a, 3, ConnType::Control, me, us).unwrap(),
        ActiveVerdict::Refused
    );
    a.ctype = ConnType::BulkOut.to_wire();
    assert_eq!(
        active_check(&a, 3, ConnType::BulkIn, me, us).unwrap(),
        ActiveVerdict::Connected
    );
    assert!(active_check(&a, 3, ConnType::BulkOut, me, us).is_err());
}

#[test]
fn ksock_frame_is_the_kernel_capture() {
    // The captured GET: 24-byte ksock header, then the 72-byte LNet header.
    let get = hex("get-ping-portal.hex");
    let kh = KsockHdr::decode(get[..24].try_into().unwrap(), ByteOrder::Little);
    assert_eq!(
        kh,
        KsockHdr {
            msg_type: KSOCK_MSG_LNET,
            csum: 0,
            zc_cookies: [0, 0]
        }
    );
    assert_eq!(kh.encode(ByteOrder::Little), get[..24]);
    let hdr = lnet::wire::Header::decode_nid4(&get[24..], ByteOrder::Little).unwrap();
    assert_eq!(hdr.encode_nid4(ByteOrder::Little).unwrap(), get[24..]);
    // Keepalive: NOOP with cookie[1] = 1; ZC-ACK: NOOP with cookie[1].
    let ka = KsockHdr::keepalive().encode(ByteOrder::Big);
    let mut want = vec![0, 0, 0, 0xc0, 0, 0, 0, 0];
    want.extend_from_slice(&0u64.to_be_bytes());
    want.extend_from_slice(&1u64.to_be_bytes());
    assert_eq!(ka.to_vec(), want);
    assert_eq!(KsockHdr::zc_ack(77).zc_cookies, [0, 77]);
}

proptest::proptest! {
    #[test]
    fn hello_round_trips(version in 2u32..=4, a in proptest::prelude::any::<u32>(),
                         b in proptest::prelude::any::<u32>(), inc in proptest::prelude::any::<u64>(),
                         ct in 0u32..4, big in proptest::prelude::any::<bool>()) {
        let net = lnet::Net::new(lnet::NetType::SOCKLND, 7);
        let h = Hello {
            version,
            src_nid: Nid::new4(net, a | 1),
            dst_nid: Nid::new4(net, b | 1),
            src_pid: a,
            dst_pid: b,
            src_incarnation: inc,
            dst_incarnation: !inc,
            ctype: ct,
        };
        let order = if big { ByteOrder::Big } else { ByteOrder::Little };
        let e = h.encode(order).unwrap();
        proptest::prop_assert_eq!(e.len(), Hello::size(version));
        proptest::prop_assert_eq!(Hello::decode(&e).unwrap(), h);
    }

    #[test]
    fn hello_decoder_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
        let _ = Hello::decode(&b);
        if b.len() >= 24 {
            let _ = KsockHdr::decode(b[..24].try_into().unwrap(), ByteOrder::Little);
        }
        if b.len() >= 8 {
            for v in [1, 2, 3] {
                let _ = acceptor_nid(v, &b[..8.min(b.len())], ByteOrder::Big);
            }
        }
    }
}
