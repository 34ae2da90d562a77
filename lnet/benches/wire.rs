#![allow(missing_docs)]
//! Header and ping encode/decode, ns per operation.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use lnet::wire::{ByteOrder, Header, MsgBody, NiStatus, PingInfo, WireHandle};

fn header() -> Header {
    Header {
        dest_nid: "10.0.0.1@tcp".parse().unwrap(),
        src_nid: "10.0.0.2@tcp".parse().unwrap(),
        dest_pid: 12345,
        src_pid: 12345,
        payload_length: 1 << 20,
        body: MsgBody::Put {
            ack_wmd: WireHandle::NONE,
            match_bits: 0x1234,
            hdr_data: 7,
            ptl_index: 4,
            offset: 0,
        },
    }
}

fn bench(c: &mut Criterion) {
    let h = header();
    let le = h.encode_nid4(ByteOrder::Little).unwrap();
    let be = h.encode_nid4(ByteOrder::Big).unwrap();
    let n16 = h.encode_nid16(ByteOrder::Little);
    let mut g = c.benchmark_group("header");
    g.bench_function("encode_nid4", |b| {
        b.iter(|| black_box(black_box(&h).encode_nid4(ByteOrder::Little)))
    });
    g.bench_function("decode_nid4_native", |b| {
        b.iter(|| black_box(Header::decode_nid4(black_box(&le), ByteOrder::Little)))
    });
    g.bench_function("decode_nid4_swabbed", |b| {
        b.iter(|| black_box(Header::decode_nid4(black_box(&be), ByteOrder::Big)))
    });
    g.bench_function("encode_nid16", |b| {
        b.iter(|| black_box(black_box(&h).encode_nid16(ByteOrder::Little)))
    });
    g.bench_function("decode_nid16", |b| {
        b.iter(|| black_box(Header::decode_nid16(black_box(&n16), ByteOrder::Little)))
    });
    g.finish();
    let p = PingInfo {
        features: 0x1e,
        pid: 12345,
        nis: (0..16)
            .map(|i| NiStatus {
                nid: lnet::Nid::new4("tcp".parse().unwrap(), i),
                status: 1,
                msg_size: 0,
            })
            .collect(),
        large_nis: vec![],
    };
    let pb = p.encode(ByteOrder::Little);
    c.bench_function("ping/decode_16_nis", |b| {
        b.iter(|| black_box(PingInfo::decode(black_box(&pb))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
