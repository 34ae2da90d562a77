#![allow(missing_docs)]
//! The LNet core's own cost per hop of a small-message ping-pong, with no
//! transport work and no cross-core traffic: an NI whose LND takes every
//! immediate send at once (and drops it) and hands the core inline
//! payloads, as shm and o2iblnd do.
//!
//! * `recv`: an 8-byte PUT handed to the core inline (`parse_inline`),
//!   matched onto a persistent MD whose callback (lent the event:
//!   `EventHandler::callback_mut`, as a latency-bound server's would be)
//!   counts it;
//! * `send`: an 8-byte PUT, no ACK, from one reused bound MD without a
//!   handler, leaving through the LND's `send_now`;
//! * `hop`: both in one, as a ping-pong's hop: the PUT event's callback
//!   answers with the PUT above (what the shm latency benchmark's two
//!   processes do on each message);
//! * `hop_md`: the same hop answered from an MD bound for the answer (and
//!   unlinked once it has left), as Lustre binds one per RPC: the shm
//!   benchmark's "an MD bound per PUT".
//!
//! The three figures (median ns per operation, interleaved rounds) are
//! the budget of the core on the busy-poll latency path; the shm bench
//! gives the whole path, transport and cache-line transfers included.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use lnet::wire::{Header, MsgBody, WireHandle};
use lnet::{
    AckReq, Error, EventHandler, EventKind, InsPos, Lnd, LndInfo, LndLimits, Lnet, Md, MdHandle,
    MdOptions, NetType, NiContext, Nid, ProcessId, SendNow, Threshold, TxMsg, Unlink,
};

/// An LND that takes every immediate send (and drops it) and keeps the
/// core's context so the bench can hand it messages.
struct Instant0 {
    nid: Nid,
    ni: OnceLock<NiContext>,
    sent: AtomicU64,
}

impl Lnd for Instant0 {
    fn net_type(&self) -> NetType {
        NetType::SOCKLND
    }
    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let _ = self.ni.set(ni);
        Ok(LndInfo {
            nid: self.nid,
            limits: LndLimits {
                send_now_max: 64,
                ..LndLimits::default()
            },
        })
    }
    fn send(&self, tx: TxMsg) {
        tx.complete(Ok(()));
    }
    fn send_now(&self, _peer: Nid, _hdr: &Header, payload: &[u8]) -> SendNow {
        black_box(payload);
        self.sent.fetch_add(1, Ordering::Relaxed);
        SendNow::Sent
    }
    fn shutdown(&self) {}
}

const PORTAL: u32 = 13;

struct Setup {
    lnet: Arc<Lnet>,
    lnd: Arc<Instant0>,
    peer: ProcessId,
    src: MdHandle,
    hdr: Header,
    events: Arc<AtomicU64>,
}

/// How the receive's callback answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    No,
    /// From the one bound MD.
    Reused,
    /// From an MD bound for it.
    MdPerPut,
}

fn setup(answer: Answer) -> Setup {
    let lnd = Arc::new(Instant0 {
        nid: "10.0.0.1@tcp".parse().unwrap(),
        ni: OnceLock::new(),
        sent: AtomicU64::new(0),
    });
    let lnet = Arc::new(lnd_loopback::builder().ni(lnd.clone()).build().unwrap());
    let peer = ProcessId::new("10.0.0.2@tcp".parse().unwrap(), lnet::LNET_PID_LUSTRE);
    let src = lnet
        .md_bind(Md::new(vec![7u8; 8]).threshold(Threshold::Infinite))
        .unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let (e, node) = (events.clone(), Arc::downgrade(&lnet));
    lnet.attach(
        PORTAL,
        ProcessId::ANY,
        0,
        u64::MAX,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .threshold(Threshold::Infinite)
            .handler(EventHandler::callback_mut(move |ev| {
                if ev.kind != EventKind::Put {
                    return;
                }
                e.fetch_add(1, Ordering::Relaxed);
                if answer == Answer::No {
                    return;
                }
                let Some(l) = node.upgrade() else { return };
                let md = match answer {
                    Answer::MdPerPut => l.md_bind(Md::new(vec![7u8; 8])).unwrap(),
                    _ => src,
                };
                let _ = l.put(md, AckReq::NoAck, ev.initiator, PORTAL, 1, 0, 0);
            })),
    )
    .unwrap();
    let hdr = Header {
        dest_nid: lnd.nid,
        src_nid: peer.nid,
        dest_pid: lnet.pid(),
        src_pid: peer.pid,
        payload_length: 8,
        body: MsgBody::Put {
            ack_wmd: WireHandle::NONE,
            match_bits: 1,
            hdr_data: 0,
            ptl_index: PORTAL,
            offset: 0,
        },
    };
    Setup {
        lnet,
        lnd,
        peer,
        src,
        hdr,
        events,
    }
}

impl Setup {
    fn recv(&self) {
        let payload = [7u8; 8];
        let ni = self.lnd.ni.get().expect("started");
        let d = ni
            .parse_inline(&self.hdr, self.peer.nid, |off, dst: &mut [u8]| {
                dst.copy_from_slice(&payload[off..off + dst.len()]);
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
        debug_assert!(matches!(d, lnet::Delivery::Done));
    }
    fn send(&self) {
        self.lnet
            .put(self.src, AckReq::NoAck, self.peer, PORTAL, 1, 0, 0)
            .unwrap();
    }
}

fn main() {
    let recv = setup(Answer::No);
    let hop = setup(Answer::Reused);
    let hop_md = setup(Answer::MdPerPut);
    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("core_8B");
        g.throughput(Throughput::Elements(1));
        g.bench_function("recv", |b| b.iter(|| recv.recv()));
        g.bench_function("send", |b| b.iter(|| recv.send()));
        g.bench_function("hop", |b| b.iter(|| hop.recv()));
        g.bench_function("hop_md", |b| b.iter(|| hop_md.recv()));
        g.finish();
    }
    c.final_summary();
    // Profiling one bench (`--profile-time`, as under callgrind): that
    // bench alone, nothing more.
    if std::env::args().any(|a| a == "--profile-time") {
        return;
    }

    // Interleaved rounds: the four side by side on the same machine.
    let (rounds, per) = (200, 2_000);
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, f) in [
            &(|| recv.recv()) as &dyn Fn(),
            &|| recv.send(),
            &|| hop.recv(),
            &|| hop_md.recv(),
        ]
        .into_iter()
        .enumerate()
        {
            let t0 = Instant::now();
            for _ in 0..per {
                f();
            }
            t[i].push(t0.elapsed() / per);
        }
    }
    // Every operation did what it should: an event per receive, an
    // immediate send per send and one per hop.
    let n = rounds as u64 * per as u64;
    assert!(recv.events.load(Ordering::Relaxed) >= n);
    assert!(recv.lnd.sent.load(Ordering::Relaxed) >= n);
    for h in [&hop, &hop_md] {
        assert_eq!(
            h.events.load(Ordering::Relaxed),
            h.lnd.sent.load(Ordering::Relaxed)
        );
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_nanos()
    };
    let [mut r, mut s, mut h, mut hm] = t;
    println!(
        "core per 8-byte message (median of {rounds} interleaved rounds): receive inline {} ns, immediate send {} ns, hop (receive whose callback answers) {} ns, hop answered from an MD bound for it {} ns",
        med(&mut r),
        med(&mut s),
        med(&mut h),
        med(&mut hm)
    );
}
