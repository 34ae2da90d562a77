//! The portals layer end to end over `lo`, and the core's fault paths over
//! a test LND that holds messages until told what to do with them.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use lnet::{
    AckReq, DropReason, Error, Event, EventKind, EventQueue, InsPos, Lnd, LndInfo, LndLimits, Lnet,
    Md, MdBuffer, MdOptions, NetType, NiContext, Nid, PeerEvent, ProcessId, Segment, Threshold,
    TxMsg, Unlink,
};

const T: Duration = Duration::from_secs(10);

fn node() -> Lnet {
    lnd_loopback::builder()
        .response_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

fn next(q: &EventQueue) -> Event {
    q.recv_timeout(T).expect("event")
}

/// Events until (and including) the MD's final one; checks nothing follows.
fn until_final(q: &EventQueue) -> Vec<Event> {
    let mut v = Vec::new();
    loop {
        let e = next(q);
        let done = e.unlinked;
        v.push(e);
        if done {
            assert!(
                q.recv_timeout(Duration::from_millis(50)).is_none(),
                "event after the final one"
            );
            return v;
        }
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Attach a use-once ME on `portal` for `bits` (any initiator, tail) with `md`.
fn target(l: &Lnet, portal: u32, bits: u64, md: Md) -> lnet::MeHandle {
    l.attach(
        portal,
        ProcessId::ANY,
        bits,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        md,
    )
    .unwrap()
    .0
}

fn put(l: &Lnet, data: Vec<u8>, ack: bool, portal: u32, bits: u64, off: u32, q: &EventQueue) {
    let th = if ack {
        Threshold::Finite(2)
    } else {
        Threshold::Finite(1)
    };
    let md = l
        .md_bind(Md::new(data).threshold(th).handler(q.handler()))
        .unwrap();
    let a = if ack { AckReq::Ack } else { AckReq::NoAck };
    l.put(md, a, l.id(), portal, bits, off, 0).unwrap();
}

#[test]
fn put_ack_get_reply_with_data_and_event_fields() {
    let l = node();
    let tq = EventQueue::new();
    let iq = EventQueue::new();
    let data = pattern(70_000, 3);
    target(
        &l,
        7,
        9,
        Md::new(vec![0u8; 70_000])
            .options(MdOptions::OP_PUT)
            .user_ptr(11)
            .handler(tq.handler()),
    );
    let md = l
        .md_bind(
            Md::new(data.clone())
                .threshold(Threshold::Finite(2))
                .user_ptr(22)
                .handler(iq.handler()),
        )
        .unwrap();
    l.put(md, AckReq::Ack, l.id(), 7, 9, 0, 0xabcd).unwrap();
    let t = until_final(&tq);
    assert_eq!(t.len(), 1);
    let e = &t[0];
    assert_eq!(
        (e.kind, e.pt_index, e.match_bits, e.hdr_data, e.user_ptr),
        (EventKind::Put, 7, 9, 0xabcd, 11)
    );
    assert_eq!((e.rlength, e.mlength, e.offset), (70_000, 70_000, 0));
    assert_eq!(e.initiator, l.id());
    assert_eq!(
        t.into_iter().next().unwrap().buffer.unwrap().into_vec(),
        data
    );
    let i = until_final(&iq);
    let kinds: Vec<_> = i.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Send, EventKind::Ack]);
    assert_eq!(i[1].mlength, 70_000);
    assert!(i.iter().all(|e| e.status.is_ok() && e.user_ptr == 22));

    // GET with fragment vectors on both sides, at a remote offset.
    let served = pattern(300_000, 9);
    let frags: Vec<Segment> = served
        .chunks(4096 * 7 + 1)
        .map(|c| c.to_vec().into())
        .collect();
    l.attach(
        8,
        ProcessId::ANY,
        1,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        Md {
            buffer: MdBuffer::from_frags(frags).unwrap(),
            ..Md::new(vec![])
        }
        .options(MdOptions::OP_GET | MdOptions::MANAGE_REMOTE)
        .handler(tq.handler()),
    )
    .unwrap();
    let sink: Vec<Segment> = (0..10).map(|_| vec![0u8; 10_000].into()).collect();
    let gmd = l
        .md_bind(
            Md {
                buffer: MdBuffer::from_frags(sink).unwrap(),
                ..Md::new(vec![])
            }
            .threshold(Threshold::Finite(2))
            .handler(iq.handler()),
        )
        .unwrap();
    l.get(gmd, l.id(), 8, 1, 1000).unwrap();
    let i = until_final(&iq);
    assert_eq!(
        i.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Send, EventKind::Reply]
    );
    assert_eq!(i[1].mlength, 100_000);
    let got = i.into_iter().last().unwrap().buffer.unwrap().into_vec();
    assert_eq!(got, &served[1000..101_000]);
    let g = until_final(&tq);
    assert_eq!(
        (g[0].kind, g[0].offset, g[0].mlength),
        (EventKind::Get, 1000, 100_000)
    );
}

#[test]
fn truncate_versus_drop() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    target(
        &l,
        3,
        1,
        Md::new(vec![0u8; 100])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    );
    put(&l, pattern(200, 1), false, 3, 1, 0, &iq);
    assert!(
        until_final(&iq)[0].status.is_ok(),
        "the sender's SEND succeeds"
    );
    assert!(
        q.recv_timeout(Duration::from_millis(100)).is_none(),
        "no PUT event: dropped"
    );
    assert_eq!(l.counters().drops_for(DropReason::TooLarge), 1);

    target(
        &l,
        4,
        1,
        Md::new(vec![0u8; 100])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .handler(q.handler()),
    );
    put(&l, pattern(200, 1), false, 4, 1, 0, &iq);
    let e = until_final(&q).pop().unwrap();
    assert_eq!((e.rlength, e.mlength), (200, 100));
    assert_eq!(e.buffer.unwrap().into_vec(), &pattern(200, 1)[..100]);
}

#[test]
fn max_size_and_local_offsets() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    target(
        &l,
        5,
        1,
        Md::new(vec![0u8; 100])
            .options(MdOptions::OP_PUT)
            .max_size(40)
            .threshold(Threshold::Infinite)
            .handler(q.handler()),
    );
    for (i, n) in [30usize, 30].iter().enumerate() {
        put(&l, vec![i as u8 + 1; *n], false, 5, 1, 0, &iq);
        let e = next(&q);
        assert_eq!(
            (e.offset, e.mlength, e.unlinked),
            (30 * i as u32, 30, false)
        );
    }
    put(&l, vec![9; 41], false, 5, 1, 0, &iq); // over max_size: dropped
    assert!(q.recv_timeout(Duration::from_millis(100)).is_none());
    put(&l, vec![3; 40], false, 5, 1, 0, &iq); // 60 + 40 = 100: fits, then exhausted
    let e = next(&q);
    assert_eq!((e.offset, e.mlength, e.unlinked), (60, 40, true));
    let v = e.buffer.unwrap().into_vec();
    assert_eq!(&v[..30], &[1; 30]);
    assert_eq!(&v[30..60], &[2; 30]);
    assert_eq!(&v[60..], &[3; 40]);
}

#[test]
fn manage_remote_offsets() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    target(
        &l,
        6,
        1,
        Md::new(vec![0u8; 100])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Finite(2))
            .handler(q.handler()),
    );
    put(&l, vec![7; 10], false, 6, 1, 50, &iq);
    assert_eq!(next(&q).offset, 50);
    put(&l, vec![8; 10], false, 6, 1, 5, &iq);
    let e = next(&q);
    assert!(e.unlinked);
    let v = e.buffer.unwrap().into_vec();
    assert_eq!(&v[50..60], &[7; 10]);
    assert_eq!(&v[5..15], &[8; 10]);
}

#[test]
fn threshold_exhaustion_unlinks_and_use_once_me_goes_with_it() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    let (me, _) = l
        .attach(
            9,
            ProcessId::ANY,
            1,
            0,
            Unlink::Unlink,
            InsPos::Tail,
            Md::new(vec![0u8; 10])
                .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )
        .unwrap();
    put(&l, vec![1; 5], false, 9, 1, 0, &iq);
    assert!(!next(&q).unlinked);
    put(&l, vec![2; 5], false, 9, 1, 5, &iq);
    assert!(next(&q).unlinked);
    put(&l, vec![3; 5], false, 9, 1, 0, &iq);
    assert!(q.recv_timeout(Duration::from_millis(100)).is_none());
    assert_eq!(l.counters().drops_for(DropReason::NoMatch), 1);
    assert_eq!(
        l.md_attach(me, Md::new(vec![0u8; 1])).err(),
        Some(Error::NoEntry),
        "use-once ME is gone"
    );

    // A retained ME stays and takes a new MD.
    let (me, _) = l
        .attach(
            10,
            ProcessId::ANY,
            1,
            0,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 4])
                .options(MdOptions::OP_PUT)
                .handler(q.handler()),
        )
        .unwrap();
    put(&l, vec![1; 4], false, 10, 1, 0, &iq);
    assert!(next(&q).unlinked);
    l.md_attach(
        me,
        Md::new(vec![0u8; 4])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    )
    .unwrap();
    put(&l, vec![5; 4], false, 10, 1, 0, &iq);
    assert_eq!(next(&q).buffer.unwrap().into_vec(), [5; 4]);
}

#[test]
fn ignore_bits_wildcards_match_ids_and_order() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    let mk = |v: u64| {
        Md::new(vec![0u8; 1])
            .options(MdOptions::OP_PUT)
            .user_ptr(v)
            .handler(q.handler())
    };
    let other = ProcessId::new("1.2.3.4@tcp".parse().unwrap(), lnet::LNET_PID_ANY);
    let other_pid = ProcessId::new(Nid::ANY, 999);
    l.attach(11, other, 0x1200, 0xff, Unlink::Unlink, InsPos::Tail, mk(1))
        .unwrap();
    l.attach(
        11,
        other_pid,
        0x1200,
        0xff,
        Unlink::Unlink,
        InsPos::Tail,
        mk(2),
    )
    .unwrap();
    l.attach(
        11,
        ProcessId::ANY,
        0x1200,
        0xff,
        Unlink::Unlink,
        InsPos::Tail,
        mk(3),
    )
    .unwrap();
    l.attach(
        11,
        ProcessId::new(Nid::LO, l.pid()),
        0x1234,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        mk(4),
    )
    .unwrap();
    l.attach(
        11,
        ProcessId::ANY,
        0x1234,
        0,
        Unlink::Unlink,
        InsPos::Head,
        mk(5),
    )
    .unwrap();
    // Head insertion wins; then the wildcard (earlier in the list) beats
    // the exact entry; entries for other initiators never match.
    let mut order = Vec::new();
    for _ in 0..3 {
        put(&l, vec![1], false, 11, 0x1234, 0, &iq);
        order.push(next(&q).user_ptr);
    }
    assert_eq!(order, [5, 3, 4]);
    put(&l, vec![1], false, 11, 0x1334, 0, &iq);
    assert!(
        q.recv_timeout(Duration::from_millis(100)).is_none(),
        "0x13.. differs outside the ignore bits"
    );
}

#[test]
fn lazy_portal_holds_then_delivers_and_bounds() {
    let l = lnd_loopback::builder().lazy_max(2).build().unwrap();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    l.set_lazy(12, true).unwrap();
    put(&l, pattern(5000, 1), false, 12, 1, 0, &iq);
    put(&l, pattern(6000, 2), false, 12, 2, 0, &iq);
    put(&l, pattern(10, 3), false, 12, 3, 0, &iq); // over lazy_max: dropped
    assert_eq!(l.counters().lazy_delayed, 2);
    assert_eq!(l.counters().drops_for(DropReason::LazyOverflow), 1);
    assert!(
        iq.recv_timeout(Duration::from_millis(50))
            .map(|e| e.status)
            .unwrap()
            .is_ok(),
        "the dropped one's SEND"
    );
    target(
        &l,
        12,
        2,
        Md::new(vec![0u8; 6000])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    );
    assert_eq!(next(&q).buffer.unwrap().into_vec(), pattern(6000, 2));
    target(
        &l,
        12,
        1,
        Md::new(vec![0u8; 5000])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    );
    assert_eq!(next(&q).buffer.unwrap().into_vec(), pattern(5000, 1));
    // Every SEND completed exactly once.
    for _ in 0..2 {
        let e = next(&iq);
        assert!(e.unlinked && e.status.is_ok());
    }
    // Turning laziness off drops what waits.
    put(&l, vec![1], false, 12, 7, 0, &iq);
    l.set_lazy(12, false).unwrap();
    assert!(next(&iq).unlinked);
    assert_eq!(l.counters().drops_for(DropReason::LazyFlushed), 1);
}

#[test]
fn ack_disabled_means_timeout_for_the_initiator() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    target(
        &l,
        13,
        1,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::ACK_DISABLE)
            .handler(q.handler()),
    );
    put(&l, vec![1; 8], true, 13, 1, 0, &iq);
    assert_eq!(next(&q).kind, EventKind::Put);
    let ev = until_final(&iq);
    assert_eq!(
        ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Send, EventKind::Unlink]
    );
    assert_eq!(ev[1].status, Err(Error::Timeout));
    assert_eq!(
        ev[1].buffer.as_ref().unwrap().len(),
        8,
        "buffer handed back"
    );
    assert_eq!(l.counters().response_timeouts, 1);
}

#[test]
fn answered_operations_never_time_out_and_unanswered_ones_do() {
    let l = node();
    let q = EventQueue::new();
    l.attach(
        16,
        ProcessId::ANY,
        1,
        0,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite),
    )
    .unwrap();
    // 2,000 PUTs answered by ACKs (each leaves its deadline behind), then
    // one whose ACK the target refuses.
    for _ in 0..2_000 {
        put(&l, vec![1; 8], true, 16, 1, 0, &q);
        assert_eq!(next(&q).kind, EventKind::Send);
        let e = next(&q);
        assert_eq!((e.kind, e.unlinked), (EventKind::Ack, true));
    }
    target(
        &l,
        17,
        1,
        Md::new(vec![0u8; 8]).options(MdOptions::OP_PUT | MdOptions::ACK_DISABLE),
    );
    put(&l, vec![1; 8], true, 17, 1, 0, &q);
    let e = until_final(&q);
    assert_eq!(e.last().unwrap().status, Err(Error::Timeout));
    // Well past every answered operation's deadline: still one timeout.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(l.counters().response_timeouts, 1);
}

#[test]
fn early_unlink_and_response_timeout() {
    let l = node();
    let iq = EventQueue::new();
    // A GET that nothing answers, unlinked early: aborted.
    let md = l
        .md_bind(
            Md::new(vec![0u8; 8])
                .threshold(Threshold::Finite(2))
                .handler(iq.handler()),
        )
        .unwrap();
    l.get(md, l.id(), 14, 1, 0).unwrap();
    assert_eq!(next(&iq).kind, EventKind::Send);
    l.md_unlink(md).unwrap();
    let e = until_final(&iq);
    assert_eq!(
        (e[0].kind, e[0].status.clone()),
        (EventKind::Unlink, Err(Error::Aborted))
    );
    assert_eq!(l.md_unlink(md), Err(Error::NoEntry));
    // Left alone, it times out.
    let md = l
        .md_bind(
            Md::new(vec![0u8; 8])
                .threshold(Threshold::Finite(2))
                .handler(iq.handler()),
        )
        .unwrap();
    l.get(md, l.id(), 14, 1, 0).unwrap();
    let e = until_final(&iq);
    assert_eq!(e.last().unwrap().status, Err(Error::Timeout));
    // An idle attached MD unlinked: one UNLINK with its buffer.
    let q = EventQueue::new();
    let (me, _) = l
        .attach(
            14,
            ProcessId::ANY,
            1,
            0,
            Unlink::Unlink,
            InsPos::Tail,
            Md::new(vec![5u8; 3])
                .options(MdOptions::OP_PUT)
                .handler(q.handler()),
        )
        .unwrap();
    l.me_unlink(me).unwrap();
    let e = until_final(&q);
    assert_eq!(e[0].kind, EventKind::Unlink);
    assert_eq!(
        e[0].buffer.as_ref().unwrap().segments()[0].as_slice(),
        &[5, 5, 5]
    );
}

#[test]
fn loans_are_zero_copy_and_no_route_fails_the_send() {
    let l = node();
    let q = EventQueue::new();
    let iq = EventQueue::new();
    target(
        &l,
        15,
        1,
        Md::new(MdBuffer::loan_only(1 << 20))
            .options(MdOptions::OP_PUT | MdOptions::LOAN)
            .handler(q.handler()),
    );
    let src = Bytes::from(pattern(1 << 20, 5));
    let md = l
        .md_bind(Md::new(src.clone()).handler(iq.handler()))
        .unwrap();
    l.put(md, AckReq::NoAck, l.id(), 15, 1, 0, 0).unwrap();
    let e = next(&q);
    let loan = e.loan.unwrap();
    assert_eq!(
        loan.as_ptr(),
        src.as_ptr(),
        "the payload was lent, not copied"
    );
    assert_eq!(loan, src);

    let md = l
        .md_bind(Md::new(vec![1u8; 4]).handler(iq.handler()))
        .unwrap();
    until_final(&iq);
    l.put(
        md,
        AckReq::NoAck,
        ProcessId::new("10.9.9.9@o2ib7".parse().unwrap(), 12345),
        1,
        1,
        0,
        0,
    )
    .unwrap();
    let e = until_final(&iq);
    assert!(matches!(e[0].status, Err(Error::NoRoute(_))));
}

#[test]
fn event_queue_is_a_stream() {
    use futures_core::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    let l = node();
    let mut q = EventQueue::new();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(Pin::new(&mut q).poll_next(&mut cx), Poll::Pending));
    target(
        &l,
        16,
        1,
        Md::new(vec![0u8; 1])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    );
    put(&l, vec![1], false, 16, 1, 0, &EventQueue::new());
    assert!(
        matches!(Pin::new(&mut q).poll_next(&mut cx), Poll::Ready(Some(e)) if e.kind == EventKind::Put)
    );
}

// ------------------------------------------------------------ a test LND

/// A `tcp` LND that holds every message until the test completes it.
struct Hold {
    nid: Nid,
    credits: i32,
    peer_credits: i32,
    ni: OnceLock<NiContext>,
    held: Mutex<Vec<TxMsg>>,
}

impl Hold {
    fn new(credits: i32, peer_credits: i32) -> Arc<Self> {
        Arc::new(Hold {
            nid: "10.0.0.1@tcp".parse().unwrap(),
            credits,
            peer_credits,
            ni: OnceLock::new(),
            held: Mutex::new(Vec::new()),
        })
    }
    fn take(&self) -> Vec<TxMsg> {
        std::mem::take(&mut *self.held.lock().unwrap())
    }
    fn count(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Lnd for Hold {
    fn net_type(&self) -> NetType {
        NetType::SOCKLND
    }
    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let _ = self.ni.set(ni);
        Ok(LndInfo {
            nid: self.nid,
            limits: LndLimits {
                credits: self.credits,
                peer_credits: self.peer_credits,
                ..LndLimits::default()
            },
        })
    }
    fn send(&self, tx: TxMsg) {
        self.held.lock().unwrap().push(tx);
    }
    fn shutdown(&self) {
        // Dropping uncompleted messages completes them with errors.
        self.take();
    }
}

fn held_node(credits: i32, peer_credits: i32) -> (Lnet, Arc<Hold>) {
    let h = Hold::new(credits, peer_credits);
    let l = lnd_loopback::builder()
        .ni(h.clone())
        .response_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    (l, h)
}

fn peer(n: u8) -> ProcessId {
    ProcessId::new(format!("10.0.0.{n}@tcp").parse().unwrap(), 12345)
}

#[test]
fn each_put_takes_the_ni_of_its_network_and_ours_go_through_lo() {
    let (l, h) = held_node(8, 8);
    let q = EventQueue::new();
    // An MD that is never used up: its ME stays for every PUT below.
    target(
        &l,
        9,
        5,
        Md::new(vec![0u8; 64])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .threshold(Threshold::Infinite)
            .handler(q.handler()),
    );
    let sq = EventQueue::new();
    let put_to = |nid: Nid| {
        let md = l
            .md_bind(Md::new(vec![3u8; 8]).handler(sq.handler()))
            .unwrap();
        l.put(md, AckReq::NoAck, ProcessId::new(nid, l.pid()), 9, 5, 0, 0)
            .unwrap();
        until_final(&sq)[0].status.clone()
    };
    // A peer on the NI's network: handed to that NI's LND, from its NID.
    let first = l.put(
        l.md_bind(Md::new(vec![3u8; 8])).unwrap(),
        AckReq::NoAck,
        peer(2),
        9,
        5,
        0,
        0,
    );
    assert!(first.is_ok());
    let held = h.take();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].peer(), peer(2).nid);
    assert_eq!(held[0].header().src_nid, h.nid);
    drop(held);
    // Our own NID on that network, and lo's: delivered here, through lo.
    for nid in [h.nid, Nid::LO] {
        assert!(put_to(nid).is_ok(), "{nid}");
        let e = next(&q);
        assert_eq!((e.kind, e.mlength), (EventKind::Put, 8), "{nid}");
        assert_eq!(h.count(), 0, "{nid} left through the LND");
    }
    // A network we have no NI on: no route.
    let status = put_to("10.0.0.2@tcp3".parse().unwrap());
    assert!(matches!(status, Err(Error::NoRoute(_))), "{status:?}");
    assert!(q.try_recv().is_none());
}

#[test]
fn credits_queue_and_record_their_minimum() {
    let (l, h) = held_node(2, 1);
    let q = EventQueue::new();
    for i in 0..4u8 {
        let md = l
            .md_bind(Md::new(vec![i; 10]).handler(q.handler()))
            .unwrap();
        l.put(md, AckReq::NoAck, peer(2 + i % 2), 1, 1, 0, 0)
            .unwrap();
    }
    // One credit per peer: two messages out, one queued behind each peer.
    assert_eq!(h.count(), 2);
    let pc = l.peer_credits(peer(2).nid).unwrap();
    assert_eq!((pc.available, pc.min, pc.queued), (-1, -1, 1));
    let nc = l.ni_credits("10.0.0.1@tcp".parse().unwrap()).unwrap();
    assert_eq!((nc.available, nc.min), (0, 0));
    for round in 0..2 {
        let out = h.take();
        assert_eq!(out.len(), 2, "round {round}");
        for t in out {
            t.complete(Ok(()));
        }
    }
    for _ in 0..4 {
        assert!(next(&q).status.is_ok());
    }
    let pc = l.peer_credits(peer(2).nid).unwrap();
    assert_eq!((pc.available, pc.min, pc.queued), (1, -1, 0));
    assert_eq!(l.peer_counters(peer(2).nid).unwrap().send_count[1], 2);
}

#[test]
fn many_operations_in_flight_all_end_once() {
    let (l, h) = held_node(64, 8);
    let q = EventQueue::new();
    let n = 2000;
    for i in 0..n {
        let md = l
            .md_bind(Md::new(vec![0u8; 16]).user_ptr(i).handler(q.handler()))
            .unwrap();
        l.put(md, AckReq::NoAck, peer(2 + (i % 16) as u8), 1, 1, 0, 0)
            .unwrap();
    }
    let mut done = vec![0u32; n as usize];
    let mut rounds = 0;
    while h.count() > 0 {
        rounds += 1;
        assert!(rounds < 10_000);
        for (k, t) in h.take().into_iter().enumerate() {
            t.complete(if k % 5 == 0 {
                Err(Error::Network("injected".into()))
            } else {
                Ok(())
            });
        }
    }
    while let Some(e) = q.recv_timeout(Duration::from_millis(200)) {
        assert!(e.unlinked);
        done[e.user_ptr as usize] += 1;
    }
    assert!(
        done.iter().all(|&c| c == 1),
        "each operation ended exactly once"
    );
}

#[test]
fn restarted_peer_fails_waiting_operations() {
    let (l, h) = held_node(8, 8);
    let q = EventQueue::new();
    let md = l
        .md_bind(
            Md::new(vec![0u8; 8])
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )
        .unwrap();
    l.get(md, peer(5), 1, 1, 0).unwrap();
    h.take().into_iter().for_each(|t| t.complete(Ok(())));
    assert_eq!(next(&q).kind, EventKind::Send);
    h.ni.get()
        .unwrap()
        .peer_event(peer(5).nid, PeerEvent::Restarted);
    let e = until_final(&q);
    assert!(matches!(e[0].status, Err(Error::PeerDown(_))));
}

#[test]
fn shutdown_ends_every_pending_operation_once() {
    let (l, h) = held_node(1, 1);
    let q = EventQueue::new();
    let n = 6;
    for i in 0..n {
        // In the LND, queued on credits, and waiting for an ACK.
        let md = l
            .md_bind(
                Md::new(vec![0u8; 8])
                    .threshold(Threshold::Finite(2))
                    .user_ptr(i)
                    .handler(q.handler()),
            )
            .unwrap();
        l.put(md, AckReq::Ack, peer(2), 1, 1, 0, 0).unwrap();
    }
    h.take().into_iter().for_each(|t| t.complete(Ok(()))); // first one now waits for its ACK
    assert_eq!(h.count(), 1);
    target(
        &l,
        20,
        1,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT)
            .user_ptr(100)
            .handler(q.handler()),
    );
    l.shutdown();
    let mut finals = std::collections::HashMap::new();
    while let Some(e) = q.recv_timeout(Duration::from_millis(200)) {
        if e.unlinked {
            *finals.entry(e.user_ptr).or_insert(0) += 1;
            assert!(e.buffer.is_some());
            if e.user_ptr != 100 {
                assert!(e.status.is_err(), "{e:?}");
            }
        }
    }
    assert_eq!(finals.len(), n as usize + 1, "{finals:?}");
    assert!(finals.values().all(|&c| c == 1));
    assert!(l.md_bind(Md::new(vec![])).is_err());
}

/// Message counters agree at every level: a peer NI counts what it sent
/// and received, its NI is the sum of its peers plus its own drops, and the
/// node is the sum of its NIs.
#[test]
fn message_counters_per_peer_ni_and_node_agree() {
    use lnet::wire::MsgType;
    let l = node();
    let tq = EventQueue::new();
    let iq = EventQueue::new();
    l.attach(
        5,
        ProcessId::ANY,
        1,
        0,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 100])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite)
            .handler(tq.handler()),
    )
    .unwrap();
    for i in 0..3 {
        put(&l, pattern(10 + i, 1), true, 5, 1, 0, &iq);
        let ev = until_final(&iq);
        assert!(ev.iter().any(|e| e.kind == EventKind::Ack), "{ev:?}");
    }
    // One PUT that matches nothing: sent, received, then dropped.
    put(&l, pattern(7, 1), false, 5, 99, 0, &iq);
    until_final(&iq);

    let c = l.counters().msgs;
    let (put, ack) = (MsgType::Put.index(), MsgType::Ack.index());
    assert_eq!(c.send_count[put], 4);
    assert_eq!(c.recv_count[put], 4);
    assert_eq!(c.send_count[ack], 3);
    assert_eq!(c.recv_count[ack], 3);
    assert_eq!(c.drop_count[put], 1);
    assert_eq!(c.send_length, 10 + 11 + 12 + 7);
    assert_eq!(c.recv_length, 10 + 11 + 12 + 7);
    assert_eq!(c.drop_length, 7);
    assert_eq!(c.errors, 0);
    assert_eq!(
        l.ni_counters(Nid::LO),
        Some(c),
        "one NI: the node's figures"
    );
    let p = l.peer_counters(Nid::LO).expect("peer 0@lo");
    assert_eq!(p.send_count, c.send_count);
    assert_eq!(p.recv_count, c.recv_count);
    assert_eq!(p.dropped(), 0, "drops are the NI's, not the peer's");
    assert_eq!(l.counters().drops_for(DropReason::NoMatch), 1);
}

#[test]
fn md_handles_are_unique_across_threads_and_nodes() {
    // Threads take cookie sequence numbers in blocks of their own, per
    // node: handles must still never repeat on a node, whichever threads
    // bind and however they alternate between nodes.
    let nodes = [node(), node()];
    let all: Vec<Vec<lnet::MdHandle>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let nodes = &nodes;
                s.spawn(move || {
                    let mut mine = vec![Vec::new(), Vec::new()];
                    for i in 0..1500usize {
                        // Alternate nodes in runs of different lengths.
                        let k = (i / (t + 1)) % 2;
                        mine[k].push(nodes[k].md_bind(Md::new(vec![0u8; 8])).unwrap());
                    }
                    mine
                })
            })
            .collect();
        let mut per_node = vec![Vec::new(), Vec::new()];
        for h in hs {
            for (k, v) in h.join().unwrap().into_iter().enumerate() {
                per_node[k].extend(v);
            }
        }
        per_node
    });
    for (k, hs) in all.iter().enumerate() {
        let set: std::collections::HashSet<_> = hs.iter().copied().collect();
        assert_eq!(set.len(), hs.len(), "node {k}: a handle repeated");
        // Every one names its own MD.
        for h in hs {
            nodes[k].md_unlink(*h).unwrap();
        }
        assert_eq!(nodes[k].md_unlink(hs[0]), Err(Error::NoEntry));
    }
    assert_eq!(all[0].len() + all[1].len(), 6000);
}

// ------------------------------------- inline payloads copied in place

/// A PUT of `len` payload bytes from 10.0.0.2@tcp to `l` (ACK to `ack`).
fn put_hdr(
    l: &Lnet,
    portal: u32,
    bits: u64,
    len: u32,
    ack: lnet::wire::WireHandle,
) -> lnet::wire::Header {
    lnet::wire::Header {
        dest_nid: "10.0.0.1@tcp".parse().unwrap(),
        src_nid: peer(2).nid,
        dest_pid: l.pid(),
        src_pid: peer(2).pid,
        payload_length: len,
        body: lnet::wire::MsgBody::Put {
            ack_wmd: ack,
            match_bits: bits,
            hdr_data: 99,
            ptl_index: portal,
            offset: 0,
        },
    }
}

/// A held node with an ME on portal 9, match bits 5, for `md` (its events
/// to the returned queue): the target of the inline-payload tests.
fn inline_target(md: Md) -> (Lnet, Arc<Hold>, EventQueue) {
    let (l, h) = held_node(8, 8);
    let q = EventQueue::new();
    target(&l, 9, 5, md.handler(q.handler()));
    (l, h, q)
}

#[test]
fn inline_put_is_copied_in_place_into_each_fragment_and_acked() {
    let frags = MdBuffer::from_frags(vec![vec![0u8; 3].into(), vec![0u8; 100].into()]).unwrap();
    let (l, h, q) = inline_target(Md::new(frags).options(MdOptions::OP_PUT | MdOptions::TRUNCATE));
    let ni = h.ni.get().unwrap();
    let payload = pattern(10, 4);
    let wmd = lnet::wire::WireHandle {
        interface_cookie: 1,
        object_cookie: 2,
    };
    let mut calls = Vec::new();
    let d = ni
        .parse_inline(&put_hdr(&l, 9, 5, 10, wmd), peer(2).nid, |off, dst| {
            calls.push((off, dst.len()));
            dst.copy_from_slice(&payload[off..off + dst.len()]);
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
    assert_eq!(calls, [(0, 3), (3, 7)], "one call per destination slice");
    let e = next(&q);
    assert_eq!(
        (e.kind, e.mlength, e.rlength, e.hdr_data),
        (EventKind::Put, 10, 10, 99)
    );
    assert!(e.status.is_ok() && e.unlinked);
    let mut got = vec![0u8; 10];
    e.buffer.unwrap().copy_out(0, &mut got);
    assert_eq!(got, payload);
    // The ACK went out to the initiator, for the handle it gave.
    let acks = h.take();
    assert_eq!(acks.len(), 1);
    match acks[0].header().body {
        lnet::wire::MsgBody::Ack {
            dst_wmd, mlength, ..
        } => assert_eq!((dst_wmd, mlength), (wmd, 10)),
        ref b => panic!("not an ACK: {b:?}"),
    }
    assert_eq!(acks[0].peer(), peer(2).nid);
}

#[test]
fn inline_put_whose_copy_fails_ends_with_an_error_event() {
    let (l, h, q) = inline_target(Md::new(vec![0u8; 16]).options(MdOptions::OP_PUT));
    let ni = h.ni.get().unwrap();
    let wmd = lnet::wire::WireHandle {
        interface_cookie: 1,
        object_cookie: 2,
    };
    let r = ni.parse_inline(&put_hdr(&l, 9, 5, 16, wmd), peer(2).nid, |_, _| {
        Err("torn slot")
    });
    assert_eq!(
        r.err(),
        Some("torn slot"),
        "the LND gets its own error back"
    );
    let e = next(&q);
    assert_eq!(e.kind, EventKind::Put);
    assert!(
        matches!(e.status, Err(Error::Network(ref m)) if m.contains("torn slot")),
        "{:?}",
        e.status
    );
    assert!(e.unlinked);
    assert_eq!(h.count(), 0, "no ACK for a failed receive");
}

#[test]
fn inline_put_without_md_memory_or_match_is_left_to_the_lnd() {
    let (l, h, q) = inline_target(
        Md::new(MdBuffer::loan_only(64)).options(MdOptions::OP_PUT | MdOptions::LOAN),
    );
    let ni = h.ni.get().unwrap();
    let none = lnet::wire::WireHandle::NONE;
    let mut called = false;
    // Loan-only MD: a sink, for the LND to hand the payload over.
    let d = ni
        .parse_inline(&put_hdr(&l, 9, 5, 8, none), peer(2).nid, |_, _| {
            called = true;
            Ok::<(), String>(())
        })
        .unwrap();
    let lnet::Delivery::Receive(mut sink) = d else {
        panic!("expected a sink: {d:?}")
    };
    assert!(!called);
    assert!(sink.set_loan(Bytes::from_static(b"12345678")));
    sink.complete(Ok(()));
    let e = next(&q);
    assert_eq!(e.loan.as_deref(), Some(&b"12345678"[..]));
    // No match: dropped, counted, nothing copied.
    let d = ni
        .parse_inline(&put_hdr(&l, 9, 6, 8, none), peer(2).nid, |_, _| {
            called = true;
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(matches!(d, lnet::Delivery::Discard(8)), "{d:?}");
    assert!(!called);
    assert_eq!(l.counters().drops_for(DropReason::NoMatch), 1);
}

#[test]
fn an_inline_put_is_counted_once_handled_after_its_event() {
    // As LNet counts a message when it finalizes it: the PUT's event (and
    // whatever its handler sends in answer) comes first.
    let (l, h) = held_node(8, 8);
    let l = Arc::new(l);
    let ni = h.ni.get().unwrap();
    let me: Arc<OnceLock<std::sync::Weak<Lnet>>> = Arc::new(OnceLock::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (me2, seen2) = (me.clone(), seen.clone());
    let put = lnet::wire::MsgType::Put.index();
    target(
        &l,
        9,
        5,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite)
            .handler(lnet::EventHandler::callback(move |e| {
                if e.kind != EventKind::Put {
                    return;
                }
                let l = me2.get().and_then(|w| w.upgrade()).expect("node");
                let n = l
                    .peer_counters(peer(2).nid)
                    .map_or(0, |c| c.recv_count[put]);
                seen2.lock().unwrap().push(n);
            })),
    );
    me.set(Arc::downgrade(&l)).unwrap();
    for _ in 0..3 {
        let d = ni
            .parse_inline(
                &put_hdr(&l, 9, 5, 8, lnet::wire::WireHandle::NONE),
                peer(2).nid,
                |_, dst| {
                    dst.fill(1);
                    Ok::<(), String>(())
                },
            )
            .unwrap();
        assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
    }
    // Each event saw the PUTs before it counted, not itself.
    assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
    let c = l.peer_counters(peer(2).nid).unwrap();
    assert_eq!((c.recv_count[put], c.recv_length), (3, 24));
}

#[test]
fn one_thread_counting_for_many_peers_and_nodes_keeps_each_count_exact() {
    // A thread keeps a handle on the counters of the peer it counted last:
    // switching peers, NIs' nodes and back must land every message on its
    // own peer of its own node.
    let nodes = [held_node(8, 8), held_node(8, 8)];
    for (l, _) in &nodes {
        l.attach(
            9,
            ProcessId::ANY,
            5,
            0,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 64])
                .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
                .threshold(Threshold::Infinite),
        )
        .unwrap();
    }
    let put = lnet::wire::MsgType::Put.index();
    // (node, peer) for each PUT, and its length.
    let plan = [
        (0, 2),
        (0, 3),
        (1, 2),
        (0, 2),
        (1, 3),
        (1, 3),
        (0, 3),
        (1, 2),
    ];
    let mut want = std::collections::HashMap::<(usize, u8), (u64, u64)>::new();
    for (i, &(n, p)) in plan.iter().enumerate() {
        let (l, h) = &nodes[n];
        let len = i as u32 + 1;
        let mut hdr = put_hdr(l, 9, 5, len, lnet::wire::WireHandle::NONE);
        hdr.src_nid = peer(p).nid;
        let d =
            h.ni.get()
                .unwrap()
                .parse_inline(&hdr, peer(p).nid, |_, dst| {
                    dst.fill(1);
                    Ok::<(), String>(())
                })
                .unwrap();
        assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
        let w = want.entry((n, p)).or_default();
        w.0 += 1;
        w.1 += u64::from(len);
    }
    for ((n, p), (count, bytes)) in want {
        let c = nodes[n].0.peer_counters(peer(p).nid).unwrap();
        assert_eq!(
            (c.recv_count[put], c.recv_length),
            (count, bytes),
            "node {n} peer {p}"
        );
    }
}

#[test]
fn an_md_filled_inline_then_through_a_sink_keeps_both_and_gives_them_back() {
    // The first PUT lands under the match (the MD's memory still its own),
    // the second through a sink (the memory then shared with the LND): the
    // final event hands back one buffer holding both.
    let (l, h, q) = inline_target(
        Md::new(vec![0u8; 16])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Finite(2)),
    );
    let ni = h.ni.get().unwrap();
    let none = lnet::wire::WireHandle::NONE;
    let first = pattern(8, 1);
    let d = ni
        .parse_inline(&put_hdr(&l, 9, 5, 8, none), peer(2).nid, |off, dst| {
            dst.copy_from_slice(&first[off..off + dst.len()]);
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
    let e = next(&q);
    assert!(e.status.is_ok() && !e.unlinked && e.buffer.is_none());
    let mut hdr = put_hdr(&l, 9, 5, 8, none);
    if let lnet::wire::MsgBody::Put { offset, .. } = &mut hdr.body {
        *offset = 8;
    }
    let second = pattern(8, 2);
    let lnet::Delivery::Receive(mut sink) = ni.parse(&hdr, peer(2).nid) else {
        panic!("expected a sink")
    };
    sink.write_at(0, &second);
    sink.complete(Ok(()));
    let e = next(&q);
    assert!(e.status.is_ok() && e.unlinked, "{e:?}");
    let got = e.buffer.expect("the buffer comes back").into_vec();
    assert_eq!(got, [first, second].concat());
}

#[test]
fn a_lent_callback_sees_every_event_and_keeps_what_it_takes() {
    // `callback_mut`: each event lent, not given. The first PUT lands
    // inline (delivered straight to the handler), the second through a
    // sink; the handler takes the buffer out of the final event.
    type Seen = Vec<(EventKind, u32, u32, u64, bool)>;
    let (l, h) = held_node(8, 8);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let back: Arc<Mutex<Option<MdBuffer>>> = Arc::default();
    let (s2, b2) = (seen.clone(), back.clone());
    target(
        &l,
        9,
        5,
        Md::new(vec![0u8; 16])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Finite(2))
            .handler(lnet::EventHandler::callback_mut(move |e| {
                let r = (e.kind, e.offset, e.mlength, e.hdr_data, e.unlinked);
                assert!(e.status.is_ok(), "{e:?}");
                s2.lock().unwrap().push(r);
                if e.unlinked {
                    *b2.lock().unwrap() = e.buffer.take();
                }
            })),
    );
    let ni = h.ni.get().unwrap();
    let none = lnet::wire::WireHandle::NONE;
    let first = pattern(8, 3);
    let d = ni
        .parse_inline(&put_hdr(&l, 9, 5, 8, none), peer(2).nid, |off, dst| {
            dst.copy_from_slice(&first[off..off + dst.len()]);
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
    let mut hdr = put_hdr(&l, 9, 5, 8, none);
    if let lnet::wire::MsgBody::Put { offset, .. } = &mut hdr.body {
        *offset = 8;
    }
    let second = pattern(8, 4);
    let lnet::Delivery::Receive(mut sink) = ni.parse(&hdr, peer(2).nid) else {
        panic!("expected a sink")
    };
    sink.write_at(0, &second);
    sink.complete(Ok(()));
    // Both delivered on this thread, in order, before the calls returned.
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (EventKind::Put, 0, 8, 99, false),
            (EventKind::Put, 8, 8, 99, true)
        ]
    );
    let got = back
        .lock()
        .unwrap()
        .take()
        .expect("the handler kept the buffer");
    assert_eq!(got.into_vec(), [first, second].concat());
}

/// What an MD's callback saw, called from many threads: each event's
/// record, and whether two calls ever overlapped.
struct Calls<T> {
    inside: std::sync::atomic::AtomicBool,
    overlaps: std::sync::atomic::AtomicUsize,
    seen: Mutex<Vec<T>>,
}

impl<T: Clone> Calls<T> {
    fn new() -> Arc<Self> {
        Arc::new(Calls {
            inside: Default::default(),
            overlaps: Default::default(),
            seen: Mutex::new(Vec::new()),
        })
    }

    /// One call's record; now and then it lingers, so that events queue
    /// behind it.
    fn record(&self, r: T) {
        use std::sync::atomic::Ordering;
        if self.inside.swap(true, Ordering::AcqRel) {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        let mut v = self.seen.lock().unwrap();
        if v.len() % 16 == 0 {
            std::thread::yield_now();
        }
        v.push(r);
        drop(v);
        self.inside.store(false, Ordering::Release);
    }

    /// The records once `n` are in (or after [`T`]), with none after them
    /// for a while; checks the callback never ran twice at once.
    fn wait(&self, n: usize) -> Vec<T> {
        let t0 = std::time::Instant::now();
        while self.seen.lock().unwrap().len() < n && t0.elapsed() < T {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            self.overlaps.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the callback ran twice at once"
        );
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn one_mds_events_from_many_threads_come_one_at_a_time_and_in_order() {
    // Four threads PUT into one MD at once over `lo` (each PUT is received
    // and completed on its sender's thread): the MD's events are made on
    // four threads, under its portal's lock, and handed to its callback
    // after it. The callback must never run twice at once; it must see
    // every event once, each thread's in the order that thread made them
    // (its PUTs land at growing offsets), and the final event last.
    const THREADS: usize = 4;
    const PUTS: usize = 400;
    const N: usize = THREADS * PUTS;
    let l = node();
    let calls = Calls::<(u64, u32, bool)>::new();
    let c2 = calls.clone();
    let _me = target(
        &l,
        21,
        7,
        Md::new(vec![0u8; N * 8])
            .options(MdOptions::OP_PUT)
            .threshold(Threshold::Finite(N as u32))
            .handler(lnet::EventHandler::callback(move |e| {
                c2.record((e.hdr_data, e.offset, e.unlinked))
            })),
    );
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let l = &l;
            s.spawn(move || {
                for _ in 0..PUTS {
                    let md = l.md_bind(Md::new(vec![t as u8; 8])).unwrap();
                    l.put(md, AckReq::NoAck, l.id(), 21, 7, 0, t as u64)
                        .unwrap();
                }
            });
        }
    });
    let v = calls.wait(N);
    assert_eq!(v.len(), N, "every event, once");
    let mut offsets: Vec<u32> = v.iter().map(|(_, o, _)| *o).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..N as u32).map(|i| i * 8).collect::<Vec<_>>());
    for t in 0..THREADS as u64 {
        let mine: Vec<u32> = v.iter().filter(|e| e.0 == t).map(|e| e.1).collect();
        assert_eq!(mine.len(), PUTS);
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "thread {t}'s events in its order"
        );
    }
    assert!(
        v[..N - 1].iter().all(|e| !e.2) && v[N - 1].2,
        "the final event last"
    );
}

#[test]
fn one_mds_send_events_from_many_threads_come_one_at_a_time() {
    // Four threads PUT from one bound MD at once: its SEND events are made
    // on four threads, each handed straight to the callback when the MD's
    // pipe is free and queued behind the running one when not. The
    // callback must never run twice at once and must see every SEND once,
    // the final one (the MD used up, its buffer back) last.
    const THREADS: usize = 4;
    const PUTS: usize = 400;
    const N: usize = THREADS * PUTS;
    let l = node();
    let _me = l
        .attach(
            22,
            ProcessId::ANY,
            7,
            0,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 8])
                .options(MdOptions::OP_PUT)
                .threshold(Threshold::Infinite),
        )
        .unwrap();
    let calls = Calls::<(EventKind, u64, bool, bool)>::new();
    let c2 = calls.clone();
    let src = l
        .md_bind(
            Md::new(vec![5u8; 8])
                .threshold(Threshold::Finite(N as u32))
                .handler(lnet::EventHandler::callback_mut(move |e| {
                    assert!(e.status.is_ok(), "{e:?}");
                    c2.record((e.kind, e.hdr_data, e.unlinked, e.buffer.is_some()))
                })),
        )
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let l = &l;
            s.spawn(move || {
                for _ in 0..PUTS {
                    l.put(src, AckReq::NoAck, l.id(), 22, 7, 0, t as u64)
                        .unwrap();
                }
            });
        }
    });
    let v = calls.wait(N);
    assert_eq!(v.len(), N, "every SEND, once");
    assert!(v.iter().all(|e| e.0 == EventKind::Send));
    for t in 0..THREADS as u64 {
        assert_eq!(v.iter().filter(|e| e.1 == t).count(), PUTS, "thread {t}");
    }
    assert!(
        v[..N - 1].iter().all(|e| !e.2 && !e.3) && v[N - 1].2 && v[N - 1].3,
        "the final event last, with the buffer"
    );
}

#[test]
fn messages_for_another_nid_or_pid_are_dropped_and_ours_by_any_local_nid_land() {
    let (l, h, q) = inline_target(
        Md::new(vec![0u8; 64])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .threshold(Threshold::Infinite),
    );
    let ni = h.ni.get().unwrap();
    let none = lnet::wire::WireHandle::NONE;
    let land = |hdr: &lnet::wire::Header| {
        ni.parse_inline(hdr, peer(2).nid, |_, dst| {
            dst.fill(1);
            Ok::<(), String>(())
        })
        .unwrap()
    };
    // Another node's NID, and ours with another pid: not for us.
    let mut other = put_hdr(&l, 9, 5, 8, none);
    other.dest_nid = "10.0.0.9@tcp".parse().unwrap();
    let mut wrong_pid = put_hdr(&l, 9, 5, 8, none);
    wrong_pid.dest_pid = l.pid() + 1;
    for hdr in [&other, &wrong_pid] {
        let d = land(hdr);
        assert!(matches!(d, lnet::Delivery::Discard(8)), "{d:?}");
    }
    assert_eq!(l.counters().drops_for(DropReason::NotForUs), 2);
    assert!(q.try_recv().is_none(), "nothing landed");
    // Our NID on this NI, and a local NID of another NI (lo's), land.
    let mut via_lo = put_hdr(&l, 9, 5, 8, none);
    via_lo.dest_nid = Nid::LO;
    for hdr in [&put_hdr(&l, 9, 5, 8, none), &via_lo] {
        let d = land(hdr);
        assert!(matches!(d, lnet::Delivery::Done), "{d:?}");
        let e = next(&q);
        assert_eq!((e.kind, e.mlength), (EventKind::Put, 8));
    }
    assert_eq!(l.counters().drops_for(DropReason::NotForUs), 2);
}

// ------------- inline delivery and sink delivery are one and the same

/// An MD for the equivalence check below, built the same way for each
/// node: `len` bytes in fragments cut at `cuts`, its options, threshold,
/// and whether its ME goes with it.
#[derive(Clone, Debug)]
struct MdCase {
    len: usize,
    cuts: Vec<usize>,
    truncate: bool,
    manage_remote: bool,
    ack_disable: bool,
    max_size: Option<u32>,
    threshold: Option<u32>,
    unlink_me: bool,
}

/// One incoming PUT: payload length, remote offset, ACK asked for,
/// whether its match bits are the ME's (5) or not (6), and whether the
/// LND fails to deliver its payload (a torn slot, a broken connection).
#[derive(Clone, Debug)]
struct PutCase {
    len: u32,
    offset: u32,
    ack: bool,
    matching: bool,
    fails: bool,
}

fn md_case() -> impl proptest::strategy::Strategy<Value = MdCase> {
    use proptest::prelude::*;
    (
        0usize..48,
        proptest::collection::vec(0usize..48, 0..3),
        any::<(bool, bool, bool)>(),
        proptest::option::of(0u32..48),
        proptest::option::of(1u32..5),
        any::<bool>(),
    )
        .prop_map(
            |(
                len,
                cuts,
                (truncate, manage_remote, ack_disable),
                max_size,
                threshold,
                unlink_me,
            )| {
                MdCase {
                    len,
                    cuts,
                    truncate,
                    manage_remote,
                    ack_disable,
                    max_size: max_size.map(|m| m.min(len as u32)),
                    threshold,
                    unlink_me,
                }
            },
        )
}

fn put_case() -> impl proptest::strategy::Strategy<Value = PutCase> {
    use proptest::prelude::*;
    (
        0u32..64,
        0u32..56,
        any::<bool>(),
        proptest::bool::weighted(0.85),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(len, offset, ack, matching, fails)| PutCase {
            len,
            offset,
            ack,
            matching,
            fails,
        })
}

impl MdCase {
    fn md(&self) -> Md {
        let mut cuts: Vec<usize> = self.cuts.iter().map(|c| c % (self.len + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut frags = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([self.len]) {
            if c > at {
                frags.push(Segment::from(vec![0u8; c - at]));
                at = c;
            }
        }
        let buf = if frags.len() > 1 {
            MdBuffer::from_frags(frags).unwrap()
        } else {
            MdBuffer::from(vec![0u8; self.len])
        };
        let mut o = MdOptions::OP_PUT;
        for (on, opt) in [
            (self.truncate, MdOptions::TRUNCATE),
            (self.manage_remote, MdOptions::MANAGE_REMOTE),
            (self.ack_disable, MdOptions::ACK_DISABLE),
            (self.max_size.is_some(), MdOptions::MAX_SIZE),
        ] {
            if on {
                o |= opt;
            }
        }
        let mut md = Md::new(buf).options(o).threshold(
            self.threshold
                .map_or(Threshold::Infinite, Threshold::Finite),
        );
        if let Some(m) = self.max_size {
            md = md.max_size(m);
        }
        md
    }
}

/// What a node showed for a run of PUTs: per PUT, whether it was taken
/// (or discarded, how many bytes), then the events (with the memory an
/// event handed back) and ACKs it caused; at the end its counters.
#[derive(Debug, PartialEq)]
struct Seen {
    steps: Vec<(Option<u32>, Vec<String>, Vec<String>)>,
    counters: lnet::NodeCounterSnapshot,
}

fn event_line(e: &Event) -> String {
    let mem = e.buffer.as_ref().map(|b| {
        let mut v = vec![0u8; b.len()];
        b.copy_out(0, &mut v);
        v
    });
    format!(
        "{:?} rlen {} mlen {} off {} bits {} hdr {} status {:?} unlinked {} mem {:?}",
        e.kind, e.rlength, e.mlength, e.offset, e.match_bits, e.hdr_data, e.status, e.unlinked, mem
    )
}

/// The events waiting on `q`, as [`event_line`]s.
fn event_lines(q: &EventQueue) -> Vec<String> {
    std::iter::from_fn(|| q.try_recv())
        .map(|e| event_line(&e))
        .collect()
}

/// Deliver `puts` to a fresh node holding `md` on portal 9 (match bits
/// 5): each PUT's payload inline (`inline`: copied in under the match,
/// as shm and o2iblnd do) or through a sink (as socklnd does).
fn deliver_all(md: &MdCase, puts: &[PutCase], inline: bool) -> Seen {
    let (l, h) = held_node(8, 8);
    let q = EventQueue::new();
    let unlink = if md.unlink_me {
        Unlink::Unlink
    } else {
        Unlink::Retain
    };
    let (me, _) = l
        .attach(
            9,
            ProcessId::ANY,
            5,
            0,
            unlink,
            InsPos::Tail,
            md.md().handler(q.handler()),
        )
        .unwrap();
    let ni = h.ni.get().unwrap();
    let mut steps = Vec::new();
    for (i, p) in puts.iter().enumerate() {
        let payload = pattern(p.len as usize, i as u8 + 1);
        let wmd = if p.ack {
            lnet::wire::WireHandle {
                interface_cookie: 1,
                object_cookie: 100 + i as u64,
            }
        } else {
            lnet::wire::WireHandle::NONE
        };
        let mut hdr = put_hdr(&l, 9, if p.matching { 5 } else { 6 }, p.len, wmd);
        if let lnet::wire::MsgBody::Put { offset, .. } = &mut hdr.body {
            *offset = p.offset;
        }
        let d = if inline {
            let r = ni.parse_inline(&hdr, peer(2).nid, |off, dst| {
                if p.fails {
                    return Err("torn slot".to_string());
                }
                dst.copy_from_slice(&payload[off..off + dst.len()]);
                Ok(())
            });
            match r {
                Ok(d) => d,
                // The LND's own error back: the core has ended the receive.
                Err(e) => {
                    assert!(p.fails, "{e}");
                    lnet::Delivery::Done
                }
            }
        } else {
            ni.parse(&hdr, peer(2).nid)
        };
        let taken = match d {
            lnet::Delivery::Done => None,
            lnet::Delivery::Receive(mut sink) => {
                // As an LND's copy fails: only when there is a byte to copy.
                if p.fails && sink.mlength() > 0 {
                    sink.complete(Err(Error::Network("inline payload: torn slot".into())));
                } else {
                    let n = sink.mlength();
                    assert_eq!(sink.write_at(0, &payload[..n]), n);
                    sink.complete(Ok(()));
                }
                None
            }
            lnet::Delivery::Discard(n) => Some(n),
            other => panic!("unexpected delivery {other:?}"),
        };
        let evs = event_lines(&q);
        let mut acks = Vec::new();
        for tx in h.take() {
            acks.push(format!("{:?} to {}", tx.header(), tx.peer()));
            tx.complete(Ok(()));
        }
        steps.push((taken, evs, acks));
    }
    // What is left of the MD comes back with its unlink.
    let _ = l.me_unlink(me);
    steps.push((None, event_lines(&q), Vec::new()));
    let counters = l.counters();
    l.shutdown();
    Seen { steps, counters }
}

proptest::proptest! {
    // (No failure file: a failing case is printed, and an integration
    // test has no source root for proptest to keep one in.)
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..Default::default()
    })]
    /// The two receive paths of the core (a PUT's payload copied in under
    /// the match, and a sink the LND fills) give the same events, the
    /// same MD memory, the same ACKs and the same counters, whatever the
    /// MD's options, threshold and fragments and whatever the PUTs.
    #[test]
    fn inline_and_sink_delivery_agree(
        md in md_case(),
        puts in proptest::collection::vec(put_case(), 1..6),
    ) {
        let a = deliver_all(&md, &puts, true);
        let b = deliver_all(&md, &puts, false);
        proptest::prop_assert_eq!(a, b);
    }
}
