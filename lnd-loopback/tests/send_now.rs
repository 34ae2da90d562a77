//! The core's immediate path for small PUTs and GETs ([`Lnd::send_now`]),
//! against a test LND that records what it is offered: what goes that way,
//! what falls back to [`Lnd::send`], what it may never overtake, and that
//! event handlers sending again from its completions do not recurse.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lnet::wire::{Header, MsgBody, MsgType};
use lnet::{
    AckReq, Error, EventHandler, EventKind, EventQueue, Lnd, LndInfo, LndLimits, Lnet, Md, NetType,
    NiContext, Nid, ProcessId, SendNow, TxMsg,
};

const T: Duration = Duration::from_secs(10);
/// The LND takes payloads up to this size at once.
const MAX: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Take,
    Decline,
    Fail,
}

/// A `tcp` LND: `send_now` answers by `mode` and records what it took;
/// `send` holds messages for the test (or completes them at once).
struct Now {
    mode: Mutex<Mode>,
    peer_credits: i32,
    complete_sends: bool,
    offered: AtomicUsize,
    taken: Mutex<Vec<(Nid, Header, Vec<u8>)>>,
    held: Mutex<Vec<TxMsg>>,
    ni: OnceLock<NiContext>,
}

impl Now {
    fn node(mode: Mode, peer_credits: i32, complete_sends: bool) -> (Arc<Lnet>, Arc<Now>) {
        let lnd = Arc::new(Now {
            mode: Mutex::new(mode),
            peer_credits,
            complete_sends,
            offered: AtomicUsize::new(0),
            taken: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            ni: OnceLock::new(),
        });
        let l = lnd_loopback::builder()
            .ni(lnd.clone())
            .response_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        (Arc::new(l), lnd)
    }
    fn offered(&self) -> usize {
        self.offered.load(Ordering::SeqCst)
    }
    fn held(&self) -> Vec<TxMsg> {
        std::mem::take(&mut *self.held.lock().unwrap())
    }
}

impl Lnd for Now {
    fn net_type(&self) -> NetType {
        NetType::SOCKLND
    }
    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let _ = self.ni.set(ni);
        Ok(LndInfo {
            nid: "10.0.0.1@tcp".parse().unwrap(),
            limits: LndLimits {
                peer_credits: self.peer_credits,
                send_now_max: MAX as u32,
                ..LndLimits::default()
            },
        })
    }
    fn send(&self, tx: TxMsg) {
        if self.complete_sends {
            tx.complete(Ok(()));
        } else {
            self.held.lock().unwrap().push(tx);
        }
    }
    fn send_now(&self, peer: Nid, hdr: &Header, payload: &[u8]) -> SendNow {
        self.offered.fetch_add(1, Ordering::SeqCst);
        match *self.mode.lock().unwrap() {
            Mode::Take => {
                self.taken
                    .lock()
                    .unwrap()
                    .push((peer, *hdr, payload.to_vec()));
                SendNow::Sent
            }
            Mode::Decline => SendNow::Declined,
            Mode::Fail => SendNow::Failed(Error::Network("wire unplugged".into())),
        }
    }
    fn shutdown(&self) {
        self.held();
    }
}

fn peer() -> ProcessId {
    ProcessId::new("10.0.0.2@tcp".parse().unwrap(), 12345)
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + 1) as u8).collect()
}

/// PUT `n` bytes to the peer (portal 4, match bits `bits`), its events to `q`.
fn put(l: &Lnet, n: usize, bits: u64, q: &EventQueue) {
    let md = l.md_bind(Md::new(data(n)).handler(q.handler())).unwrap();
    l.put(md, AckReq::NoAck, peer(), 4, bits, 0, 0).unwrap();
}

/// The whole payload of a message held by the LND.
fn payload(t: &TxMsg) -> Vec<u8> {
    let mut v = vec![0u8; t.payload_len()];
    assert_eq!(t.copy_payload_to(0, &mut v), v.len());
    v
}

fn sent(l: &Lnet) -> u64 {
    l.peer_counters(peer().nid)
        .map_or(0, |c| c.send_count[MsgType::Put.index()])
}

#[test]
fn a_small_put_leaves_through_send_now_and_takes_no_credit() {
    let (l, lnd) = Now::node(Mode::Take, 4, false);
    let q = EventQueue::new();
    put(&l, 8, 0x55, &q);
    let e = q.recv_timeout(T).expect("SEND");
    assert_eq!(e.kind, EventKind::Send);
    assert!(e.status.is_ok() && e.unlinked, "{e:?}");
    let taken = lnd.taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 1);
    let (to, hdr, payload) = &taken[0];
    assert_eq!(*to, peer().nid);
    assert_eq!((hdr.dest_nid, hdr.dest_pid), (peer().nid, peer().pid));
    assert_eq!(hdr.payload_length, 8);
    assert!(
        matches!(
            hdr.body,
            MsgBody::Put {
                match_bits: 0x55,
                ptl_index: 4,
                ..
            }
        ),
        "{:?}",
        hdr.body
    );
    assert_eq!(*payload, data(8));
    assert!(lnd.held().is_empty(), "nothing went through send()");
    // Counted on the peer; no credit was taken, even for a moment.
    assert_eq!(sent(&l), 1);
    let c = l.peer_credits(peer().nid).unwrap();
    assert_eq!((c.available, c.min, c.queued), (4, 4, 0));
    // Up to the LND's limit, inclusive; 0 B too.
    put(&l, MAX, 1, &q);
    put(&l, 0, 2, &q);
    for _ in 0..2 {
        assert!(q.recv_timeout(T).expect("SEND").status.is_ok());
    }
    assert_eq!(lnd.offered(), 3);
    assert_eq!(sent(&l), 3);
}

#[test]
fn declined_or_larger_puts_go_the_usual_way_with_the_same_bytes() {
    let (l, lnd) = Now::node(Mode::Decline, 4, false);
    let q = EventQueue::new();
    put(&l, 8, 7, &q);
    assert_eq!(lnd.offered(), 1);
    let held = lnd.held();
    assert_eq!(held.len(), 1, "declined: sent through send()");
    assert_eq!(payload(&held[0]), data(8));
    assert!(matches!(
        held[0].header().body,
        MsgBody::Put { match_bits: 7, .. }
    ));
    assert!(
        q.recv_timeout(Duration::from_millis(50)).is_none(),
        "not sent yet"
    );
    held.into_iter().for_each(|t| t.complete(Ok(())));
    assert!(q.recv_timeout(T).expect("SEND").status.is_ok());
    // Over the limit: never offered.
    *lnd.mode.lock().unwrap() = Mode::Take;
    put(&l, MAX + 1, 8, &q);
    assert_eq!(lnd.offered(), 1);
    let held = lnd.held();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].payload_len(), MAX + 1);
    held.into_iter().for_each(|t| t.complete(Ok(())));
    assert!(q.recv_timeout(T).expect("SEND").status.is_ok());
    assert_eq!(sent(&l), 2);
}

#[test]
fn a_send_now_that_fails_ends_the_put_with_its_error() {
    let (l, lnd) = Now::node(Mode::Fail, 4, false);
    let q = EventQueue::new();
    put(&l, 8, 0, &q);
    let e = q.recv_timeout(T).expect("SEND");
    assert_eq!(e.kind, EventKind::Send);
    assert!(
        matches!(e.status, Err(Error::Network(ref m)) if m.contains("unplugged")),
        "{:?}",
        e.status
    );
    assert!(e.unlinked);
    assert!(lnd.held().is_empty());
    let c = l.peer_counters(peer().nid).unwrap();
    assert_eq!((c.errors, c.send_count[MsgType::Put.index()]), (1, 0));
}

#[test]
fn a_small_put_never_overtakes_one_waiting_for_a_credit() {
    // One peer credit: a large PUT takes it, a second waits for it; a
    // small PUT then must queue behind them, not leave at once.
    let (l, lnd) = Now::node(Mode::Take, 1, false);
    let q = EventQueue::new();
    put(&l, 1000, 1, &q);
    put(&l, 1000, 2, &q);
    put(&l, 8, 3, &q);
    assert_eq!(lnd.offered(), 0, "offered while others waited");
    let mut order = Vec::new();
    for _ in 0..3 {
        let held = lnd.held();
        assert_eq!(held.len(), 1, "one credit: one message at a time");
        for t in held {
            if let MsgBody::Put { match_bits, .. } = t.header().body {
                order.push(match_bits);
            }
            t.complete(Ok(()));
        }
    }
    assert_eq!(order, [1, 2, 3], "sent in the order they were put");
    for _ in 0..3 {
        assert!(q.recv_timeout(T).expect("SEND").status.is_ok());
    }
    // The queue drained: small PUTs leave at once again.
    put(&l, 8, 4, &q);
    assert_eq!(lnd.offered(), 1);
    assert!(q.recv_timeout(T).expect("SEND").status.is_ok());
    assert!(lnd.held().is_empty());
}

#[test]
fn handlers_that_put_again_from_each_send_event_do_not_recurse() {
    // Each SEND event's handler binds a new MD (with the same handler)
    // and PUTs it: 100,000 in a chain, all from the first call's stack.
    // They must take turns (the thread's launch queue), not nest a set of
    // frames per PUT.
    const N: usize = 100_000;
    let (l, lnd) = Now::node(Mode::Take, 8, true);
    let left = Arc::new(AtomicUsize::new(N));
    let done = Arc::new(AtomicUsize::new(0));
    let slot: Arc<OnceLock<(std::sync::Weak<Lnet>, EventHandler)>> = Arc::new(OnceLock::new());
    let (left2, done2, slot2) = (left.clone(), done.clone(), slot.clone());
    let handler = EventHandler::callback(move |e| {
        if e.kind != EventKind::Send {
            return;
        }
        assert!(e.status.is_ok(), "{:?}", e.status);
        done2.fetch_add(1, Ordering::SeqCst);
        if left2.fetch_sub(1, Ordering::SeqCst) > 1 {
            let (w, h) = slot2.get().expect("set");
            let l = w.upgrade().expect("node");
            let md = l.md_bind(Md::new(data(8)).handler(h.clone())).unwrap();
            l.put(md, AckReq::NoAck, peer(), 4, 0, 0, 0).unwrap();
        }
    });
    slot.set((Arc::downgrade(&l), handler.clone()))
        .ok()
        .unwrap();
    let md = l.md_bind(Md::new(data(8)).handler(handler)).unwrap();
    // On a small stack: nesting would overflow it long before N.
    let l2 = l.clone();
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || l2.put(md, AckReq::NoAck, peer(), 4, 0, 0, 0).unwrap())
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert_eq!(done.load(Ordering::SeqCst), N);
    // The first went at once; the ones its handlers sent took their turn
    // through send().
    assert_eq!(lnd.offered(), 1);
    assert_eq!(sent(&l), N as u64);
}

#[test]
fn a_get_leaves_at_once_and_its_reply_lands() {
    let (l, lnd) = Now::node(Mode::Take, 4, false);
    let q = EventQueue::new();
    let md = l
        .md_bind(
            Md::new(vec![0u8; 16])
                .threshold(lnet::Threshold::Finite(2))
                .handler(q.handler()),
        )
        .unwrap();
    l.get(md, peer(), 4, 9, 0).unwrap();
    let e = q.recv_timeout(T).expect("SEND");
    assert_eq!(e.kind, EventKind::Send);
    assert!(e.status.is_ok() && !e.unlinked, "{e:?}");
    assert!(lnd.held().is_empty());
    let (to, get, payload) = lnd.taken.lock().unwrap()[0].clone();
    assert_eq!((to, payload.len()), (peer().nid, 0));
    let MsgBody::Get {
        return_wmd,
        match_bits: 9,
        sink_length: 16,
        ..
    } = get.body
    else {
        panic!("not our GET: {:?}", get.body)
    };
    // The peer's REPLY, 10 bytes, into the GET's MD.
    let reply = Header {
        dest_nid: get.src_nid,
        src_nid: get.dest_nid,
        dest_pid: get.src_pid,
        src_pid: get.dest_pid,
        payload_length: 10,
        body: MsgBody::Reply {
            dst_wmd: return_wmd,
        },
    };
    let ni = lnd.ni.get().unwrap();
    let lnet::Delivery::Receive(mut sink) = ni.parse(&reply, peer().nid) else {
        panic!("expected a sink for the REPLY")
    };
    sink.write_at(0, &data(10));
    sink.complete(Ok(()));
    let e = q.recv_timeout(T).expect("REPLY");
    assert_eq!((e.kind, e.mlength), (EventKind::Reply, 10));
    assert!(e.status.is_ok() && e.unlinked, "{e:?}");
    let got = e.buffer.expect("buffer").into_vec();
    assert_eq!(got[..10], data(10)[..]);
    let c = l.peer_counters(peer().nid).unwrap();
    assert_eq!(c.send_count[MsgType::Get.index()], 1);
}

/// A PUT (asking for an ACK) or a GET from the peer to `l`'s portal 5.
fn incoming(l: &Lnet, body: MsgBody, plen: u32) -> Header {
    Header {
        dest_nid: "10.0.0.1@tcp".parse().unwrap(),
        src_nid: peer().nid,
        dest_pid: l.pid(),
        src_pid: peer().pid,
        payload_length: plen,
        body,
    }
}

/// Deliver `hdr` with its whole payload `pay` at hand, as shm does.
fn inline(ni: &NiContext, hdr: &Header, pay: &[u8]) -> lnet::Delivery {
    ni.parse_inline(hdr, peer().nid, |off, dst: &mut [u8]| {
        dst.copy_from_slice(&pay[off..off + dst.len()]);
        Ok::<(), Error>(())
    })
    .unwrap()
}

#[test]
fn acks_and_replies_leave_through_send_now_or_the_usual_way_when_declined() {
    use lnet::wire::WireHandle;
    let (l, lnd) = Now::node(Mode::Take, 4, false);
    let q = EventQueue::new();
    l.attach(
        5,
        ProcessId::ANY,
        0,
        u64::MAX,
        lnet::Unlink::Retain,
        lnet::InsPos::Tail,
        Md::new(data(32))
            .options(
                lnet::MdOptions::OP_PUT | lnet::MdOptions::OP_GET | lnet::MdOptions::MANAGE_REMOTE,
            )
            .threshold(lnet::Threshold::Infinite)
            .handler(q.handler()),
    )
    .unwrap();
    let ni = lnd.ni.get().unwrap();
    let wmd = WireHandle {
        interface_cookie: 7,
        object_cookie: 77,
    };
    let put_hdr = incoming(
        &l,
        MsgBody::Put {
            ack_wmd: wmd,
            match_bits: 1,
            hdr_data: 0,
            ptl_index: 5,
            offset: 0,
        },
        6,
    );
    let get_hdr = incoming(
        &l,
        MsgBody::Get {
            return_wmd: wmd,
            match_bits: 2,
            ptl_index: 5,
            src_offset: 0,
            sink_length: 10,
        },
        0,
    );
    // PUT 6 bytes (inline, as shm delivers it): its ACK is taken at once.
    let pay = vec![0xabu8; 6];
    assert!(matches!(inline(ni, &put_hdr, &pay), lnet::Delivery::Done));
    assert_eq!(q.recv_timeout(T).expect("PUT").kind, EventKind::Put);
    // GET 10 bytes: its REPLY carries the MD's first 10 bytes (6 of them
    // the PUT's), taken at once too.
    assert!(matches!(
        ni.parse(&get_hdr, peer().nid),
        lnet::Delivery::Done
    ));
    let e = q.recv_timeout(T).expect("GET");
    assert_eq!((e.kind, e.mlength), (EventKind::Get, 10));
    assert!(e.status.is_ok(), "{e:?}");
    assert!(lnd.held().is_empty(), "nothing went the usual way");
    let taken = lnd.taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 2);
    let (to, ack, p) = &taken[0];
    assert_eq!((*to, p.len()), (peer().nid, 0));
    assert_eq!((ack.dest_nid, ack.dest_pid), (peer().nid, peer().pid));
    assert!(
        matches!(ack.body, MsgBody::Ack { dst_wmd, match_bits: 1, mlength: 6 } if dst_wmd == wmd),
        "{:?}",
        ack.body
    );
    let (_, reply, p) = &taken[1];
    assert!(
        matches!(reply.body, MsgBody::Reply { dst_wmd } if dst_wmd == wmd),
        "{:?}",
        reply.body
    );
    let mut want = data(32)[..10].to_vec();
    want[..6].copy_from_slice(&pay);
    assert_eq!((reply.payload_length, &p[..]), (10, &want[..]));
    let c = l.peer_counters(peer().nid).unwrap();
    assert_eq!(c.send_count[MsgType::Ack.index()], 1);
    assert_eq!(c.send_count[MsgType::Reply.index()], 1);

    // Declined: the next ACK and REPLY go through `send`, the same bytes.
    *lnd.mode.lock().unwrap() = Mode::Decline;
    assert!(matches!(inline(ni, &put_hdr, &pay), lnet::Delivery::Done));
    assert!(matches!(
        ni.parse(&get_hdr, peer().nid),
        lnet::Delivery::Done
    ));
    let held = lnd.held();
    assert_eq!(held.len(), 2, "both went the usual way");
    assert_eq!(held[0].header().msg_type(), MsgType::Ack);
    assert_eq!(held[1].header().msg_type(), MsgType::Reply);
    assert_eq!(payload(&held[1]), want);
    for t in held {
        t.complete(Ok(()));
    }
    assert_eq!(q.recv_timeout(T).expect("PUT").kind, EventKind::Put);
    let e = q.recv_timeout(T).expect("GET");
    assert_eq!(e.kind, EventKind::Get);
    assert!(e.status.is_ok(), "{e:?}");
    assert_eq!(lnd.offered(), 4);
    let c = l.peer_counters(peer().nid).unwrap();
    assert_eq!(c.send_count[MsgType::Ack.index()], 2);
    assert_eq!(c.send_count[MsgType::Reply.index()], 2);
}

#[test]
fn a_put_from_an_md_without_a_handler_leaves_nothing_behind() {
    let (l, lnd) = Now::node(Mode::Take, 4, false);
    // An MD reused (no threshold): every PUT is taken at once, counted on
    // the peer, and the MD stays until unlinked.
    let md = l
        .md_bind(Md::new(data(8)).threshold(lnet::Threshold::Infinite))
        .unwrap();
    for bits in 0..3 {
        l.put(md, AckReq::NoAck, peer(), 4, bits, 0, 0).unwrap();
    }
    assert_eq!(sent(&l), 3);
    {
        let taken = lnd.taken.lock().unwrap();
        assert_eq!(taken.len(), 3);
        assert!(
            taken
                .iter()
                .all(|(_, h, p)| h.payload_length == 8 && *p == data(8))
        );
    }
    l.md_unlink(md).unwrap();
    assert_eq!(l.md_unlink(md), Err(Error::NoEntry), "unlinked once");

    // An MD used up by its one PUT is gone as soon as the PUT left.
    let once = l.md_bind(Md::new(data(5))).unwrap();
    l.put(once, AckReq::NoAck, peer(), 4, 9, 0, 0).unwrap();
    assert_eq!(l.md_unlink(once), Err(Error::NoEntry), "gone after its PUT");
    assert_eq!(lnd.taken.lock().unwrap()[3].2, data(5));

    // Declined: the PUT goes the usual way with the same bytes, the MD is
    // gone all the same, and completing the message touches nothing.
    *lnd.mode.lock().unwrap() = Mode::Decline;
    let once = l.md_bind(Md::new(data(6))).unwrap();
    l.put(once, AckReq::NoAck, peer(), 4, 10, 0, 0).unwrap();
    assert_eq!(l.md_unlink(once), Err(Error::NoEntry));
    let held = lnd.held();
    assert_eq!(held.len(), 1);
    assert_eq!(payload(&held[0]), data(6));
    for t in held {
        t.complete(Ok(()));
    }
    assert_eq!(sent(&l), 5);

    // Failed: counted as an error on the peer; nothing else to hear.
    *lnd.mode.lock().unwrap() = Mode::Fail;
    let once = l.md_bind(Md::new(data(4))).unwrap();
    l.put(once, AckReq::NoAck, peer(), 4, 11, 0, 0).unwrap();
    assert_eq!(l.md_unlink(once), Err(Error::NoEntry));
    let c = l.peer_counters(peer().nid).unwrap();
    assert_eq!((c.send_count[MsgType::Put.index()], c.errors), (5, 1));
}
