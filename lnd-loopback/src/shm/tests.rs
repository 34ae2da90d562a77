//! A hostile peer, built from the transport's own parts: it connects,
//! then writes garbage into its ring. The victim must disconnect it with a
//! counted error and go on serving everyone else.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnet::wire::{ByteOrder, MsgBody, WireHandle};
use lnet::{AckReq, EventQueue, InsPos, LnetBuilder, Md, MdOptions, ProcessId, Threshold, Unlink};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::ring::Producer;
use super::wire::{self, Hello, Kind, SLOT_HDR, SLOT_MARK};
use super::*;

struct Rogue {
    s: UnixStream,
    ring: Arc<Seg>,
    h: SegHeader,
    p: Producer,
    victim_bell: OwnedFd,
    _bell: EventFd,
}

impl Rogue {
    fn connect(dir: &Path, victim: Nid, me: u32, corrupt_segment: bool) -> Result<Rogue, ShmError> {
        let s =
            UnixStream::connect(sock_path(dir, victim)).map_err(|e| ShmError::Os("connect", e))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (ring, h) = make_ring(&ShmConfig::new(me))?;
        if corrupt_segment {
            ring.write(0, &[0u8; 8])?;
        }
        let bell = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .unwrap();
        let hello = Hello {
            src_nid: u64::from(me),
            dst_nid: u64::from(victim.addr4().unwrap()),
            incarnation: 77,
            pid: std::process::id(),
            ..Default::default()
        };
        sys::send_with_fds(&s, &hello.encode(), &[ring.fd(), bell.as_raw_fd()]).unwrap();
        let mut b = [0u8; Hello::LEN];
        let mut fds = sys::recv_with_fds(&s, &mut b, 3).map_err(|e| ShmError::Os("reply", e))?;
        let r = Hello::decode(&b)?;
        if r.reject != 0 {
            return Err(ShmError::Rejected(r.reject));
        }
        // The reply carries the victim's ring, doorbell, pool.
        let victim_bell = fds.swap_remove(1);
        Ok(Rogue {
            s,
            p: Producer::new(u64::from(h.nslots)),
            ring,
            h,
            victim_bell,
            _bell: bell,
        })
    }

    /// Offset of slot `idx` in our ring.
    fn slot_off(&self, idx: u64) -> usize {
        self.h.data_off as usize + idx as usize * self.h.slot_size as usize
    }

    /// Put `slot` in the next ring slot and publish it.
    fn send_raw(&mut self, slot: &[u8]) {
        let ctl = self.ring.ctl(self.h.ctl_off as usize).unwrap();
        let idx = self.p.reserve(ctl).unwrap();
        let off = self.slot_off(idx);
        self.ring
            .write(off + SLOT_MARK, &slot[SLOT_MARK..])
            .unwrap();
        self.p.publish(ctl, self.ring.mark(off).unwrap());
        let _ = nix::unistd::write(&self.victim_bell, &1u64.to_ne_bytes());
    }

    /// Put a mark no producer writes there in the next slot.
    fn corrupt_mark(&mut self) {
        let off = self.slot_off(self.p.slot);
        self.ring
            .mark(off)
            .unwrap()
            .store(12_345, std::sync::atomic::Ordering::Release);
        let _ = nix::unistd::write(&self.victim_bell, &1u64.to_ne_bytes());
    }

    /// True once the victim has closed the socket.
    fn wait_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
    }
}

/// A named way to break the protocol.
type Garbage = (&'static str, Box<dyn Fn(&mut Rogue)>);

fn put_header(src: u32, dst: u32, len: u32) -> [u8; 72] {
    lnet::wire::Header {
        dest_nid: Nid::new4(Net::new(NetType::SHMLND, 0), dst),
        src_nid: Nid::new4(Net::new(NetType::SHMLND, 0), src),
        dest_pid: lnet::LNET_PID_LUSTRE,
        src_pid: lnet::LNET_PID_LUSTRE,
        payload_length: len,
        body: MsgBody::Put {
            ack_wmd: WireHandle::NONE,
            match_bits: 1,
            hdr_data: 0,
            ptl_index: 5,
            offset: 0,
        },
    }
    .encode_nid4(ByteOrder::NATIVE)
    .unwrap()
}

#[test]
fn garbage_in_ring_slots_disconnects_with_a_counted_error() {
    let dir = std::env::temp_dir().join(format!("lnet-shm-rogue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mk = |addr| {
        let mut c = ShmConfig::new(addr).dir(&dir);
        c.pool_size = 1 << 20;
        let lnd = Arc::new(ShmLnd::new(c).unwrap());
        let l = LnetBuilder::new(Arc::new(crate::LoLnd::new()))
            .ni(lnd.clone())
            .build()
            .unwrap();
        (l, lnd)
    };
    let (victim, vlnd) = mk(2);
    let (good, _glnd) = mk(3);
    let q = EventQueue::new();
    victim
        .attach(
            5,
            ProcessId::ANY,
            1,
            0,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 1 << 20])
                .options(MdOptions::OP_PUT)
                .threshold(Threshold::Infinite)
                .handler(q.handler()),
        )
        .unwrap();
    let vid = ProcessId::new(vlnd.nid(), lnet::LNET_PID_LUSTRE);
    let good_put = |n: u8| {
        let gq = EventQueue::new();
        let md = good
            .md_bind(Md::new(vec![n; 100]).handler(gq.handler()))
            .unwrap();
        good.put(md, AckReq::NoAck, vid, 5, 1, 0, 0).unwrap();
        let e = q
            .recv_timeout(Duration::from_secs(10))
            .expect("victim still serves");
        assert_eq!(e.mlength, 100);
    };
    good_put(1);

    let mut garbage: Vec<Garbage> = Vec::new();
    garbage.push((
        "unknown kind",
        Box::new(|r: &mut Rogue| r.send_raw(&[0xffu8; 64])),
    ));
    garbage.push((
        "body longer than the slot",
        Box::new(|r: &mut Rogue| {
            let mut s = vec![0u8; SLOT_HDR];
            wire::encode(&mut s, Kind::Done, 0, 1, &[]);
            s[6..8].copy_from_slice(&u16::MAX.to_ne_bytes());
            r.send_raw(&s)
        }),
    ));
    garbage.push((
        "inline length lie",
        Box::new(|r: &mut Rogue| {
            let h = put_header(1, 2, 5000);
            let mut s = vec![0u8; 200];
            let n = wire::encode(&mut s, Kind::Inline, 0, 0, &[&h, b"short"]);
            r.send_raw(&s[..n])
        }),
    ));
    garbage.push((
        "bounce index out of range",
        Box::new(|r: &mut Rogue| {
            let mut body = [0u8; 16];
            body[0..4].copy_from_slice(&999u32.to_ne_bytes());
            body[4..8].copy_from_slice(&10u32.to_ne_bytes());
            let mut s = vec![0u8; 64];
            let n = wire::encode(&mut s, Kind::BounceData, 0, 1, &[&body]);
            r.send_raw(&s[..n])
        }),
    ));
    garbage.push((
        "descriptor not covering the payload",
        Box::new(|r: &mut Rogue| {
            let h = put_header(1, 2, 100_000);
            let mut fb = vec![0u8; wire::frags_len(1)];
            wire::encode_frags(&mut fb, &[(0, 10)]);
            let mut s = vec![0u8; 200];
            let n = wire::encode(&mut s, Kind::Rdv, wire::RDV_POOL, 1, &[&h, &fb]);
            r.send_raw(&s[..n])
        }),
    ));
    garbage.push((
        "a mark no producer writes there",
        Box::new(|r: &mut Rogue| r.corrupt_mark()),
    ));

    for (i, (what, f)) in garbage.iter().enumerate() {
        let before = vlnd.stats().bad_slots;
        let mut r = Rogue::connect(&dir, vlnd.nid(), 100 + i as u32, false).unwrap();
        f(&mut r);
        let t0 = Instant::now();
        while vlnd.stats().bad_slots == before && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(vlnd.stats().bad_slots, before + 1, "{what}");
        assert!(r.wait_closed(), "{what}: connection closed");
        good_put(i as u8);
    }
    // A segment without the magic is refused at the hello.
    let bad = vlnd.stats().bad_hellos;
    assert!(matches!(
        Rogue::connect(&dir, vlnd.nid(), 99, true),
        Err(ShmError::Rejected(_))
    ));
    assert_eq!(vlnd.stats().bad_hellos, bad + 1);
    // A hello for someone else is refused and counted.
    let wrong = vlnd.stats().wrong_nid;
    let s = UnixStream::connect(sock_path(&dir, vlnd.nid())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (ring, _) = make_ring(&ShmConfig::new(98)).unwrap();
    let bell = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();
    let h = Hello {
        src_nid: 98,
        dst_nid: 12345,
        ..Default::default()
    };
    sys::send_with_fds(&s, &h.encode(), &[ring.fd(), bell.as_raw_fd()]).unwrap();
    let mut b = [0u8; Hello::LEN];
    sys::recv_with_fds(&s, &mut b, 3).unwrap();
    assert_eq!(
        Hello::decode(&b).unwrap().reject,
        RejectReason::WrongNid as u32
    );
    assert_eq!(vlnd.stats().wrong_nid, wrong + 1);
    // A client that connects and says nothing is dropped after the
    // handshake timeout; the connected peers are served meanwhile.
    let silent = UnixStream::connect(sock_path(&dir, vlnd.nid())).unwrap();
    good_put(9);
    drop(silent);
    good_put(10);
    victim.shutdown();
    good.shutdown();
    // Both nodes removed their sockets: nothing is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn socket_file_probe_tells_gone_dying_and_live_listeners() {
    let d = TestDir::new("probe");
    std::fs::create_dir_all(&*d).unwrap();
    // Gone: the file stays after its listener closed; a connect is refused.
    let gone = d.join("gone.sock");
    drop(UnixListener::bind(&gone).unwrap());
    assert_eq!(probe_listener(&gone), Listener::Gone);
    // Dying: accepted, then closed at once.
    let dying = d.join("dying.sock");
    let l = UnixListener::bind(&dying).unwrap();
    let t = std::thread::spawn(move || drop(l.accept()));
    assert_eq!(probe_listener(&dying), Listener::Dying);
    t.join().unwrap();
    // Live: a listener that keeps what it accepts (or has not accepted yet).
    let live = d.join("live.sock");
    let _l = UnixListener::bind(&live).unwrap();
    assert_eq!(probe_listener(&live), Listener::Live);
    // The reaper removes only the gone one, and only once it is gone.
    reap_socket_file(gone.clone());
    reap_socket_file(live.clone());
    let t0 = Instant::now();
    while gone.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!gone.exists());
    std::thread::sleep(Duration::from_millis(100));
    assert!(live.exists());
    for p in [&dying, &live] {
        let _ = std::fs::remove_file(p);
    }
}

/// The CPUs the thread named `name` in this process may run on, from
/// `/proc/self/task/*/status` (`Cpus_allowed_list`).
fn thread_cpus(name: &str) -> Option<String> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string());
    }
    None
}

#[test]
fn progress_thread_runs_on_the_cpu_it_is_pinned_to() {
    let d = TestDir::new("pin");
    let pinned = |addr: u32, cpu: usize| {
        let mut cfg = ShmConfig::new(addr).dir(&*d);
        cfg.cpu = Some(cpu);
        cfg.pool_size = 0;
        LnetBuilder::new(Arc::new(crate::LoLnd::new()))
            .ni(Arc::new(ShmLnd::new(cfg).unwrap()))
            .build()
            .unwrap()
    };
    let l = pinned(41, 0);
    // The thread pins itself as it starts: bounded wait for it.
    let t0 = Instant::now();
    let mut cpus = None;
    while t0.elapsed() < Duration::from_secs(10) {
        cpus = thread_cpus("shm-progress-41");
        if cpus.as_deref() == Some("0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(cpus.as_deref(), Some("0"));
    l.shutdown();

    // A CPU that does not exist: logged, the NI still comes up and runs.
    let l = pinned(42, 100_000);
    assert!(l.nids().iter().any(|n| n.to_string() == "42@shm"));
    l.shutdown();
}

/// Each node's connection, as it is now (weakly: the test must not keep
/// it alive).
fn conns_of(lnd: &ShmLnd) -> Vec<std::sync::Weak<Conn>> {
    let sh = lnd.shared.get().expect("started");
    lock(&sh.conns).iter().map(Arc::downgrade).collect()
}

#[test]
fn a_dead_peers_connection_is_freed_though_threads_sent_on_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = TestDir::new("freed");
    let node = |addr: u32| {
        let mut cfg = ShmConfig::new(addr).dir(&*d);
        cfg.pool_size = 0;
        let lnd = Arc::new(ShmLnd::new(cfg).unwrap());
        let l = Arc::new(
            LnetBuilder::new(Arc::new(crate::LoLnd::new()))
                .ni(lnd.clone())
                .build()
                .unwrap(),
        );
        (l, lnd)
    };
    let (a, a_lnd) = node(61);
    let (b, _b_lnd) = node(62);
    // A ping-pong answered from each node's event callback: both progress
    // threads send (and cache their connection), and so does this thread.
    const PORTAL: u32 = 9;
    let rounds = Arc::new(AtomicUsize::new(0));
    for (me, peer) in [(&a, b.id()), (&b, a.id())] {
        let weak = Arc::downgrade(me);
        let rounds = rounds.clone();
        let src = me
            .md_bind(Md::new(vec![1u8; 8]).threshold(Threshold::Infinite))
            .unwrap();
        me.attach(
            PORTAL,
            ProcessId::ANY,
            0,
            u64::MAX,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 8])
                .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
                .threshold(Threshold::Infinite)
                .handler(lnet::EventHandler::callback(move |_| {
                    if rounds.fetch_add(1, Ordering::AcqRel) < 20
                        && let Some(l) = weak.upgrade()
                    {
                        let _ = l.put(src, AckReq::NoAck, peer, PORTAL, 0, 0, 0);
                    }
                })),
        )
        .unwrap();
    }
    let first = a.md_bind(Md::new(vec![1u8; 8])).unwrap();
    a.put(first, AckReq::NoAck, b.id(), PORTAL, 0, 0, 0)
        .unwrap();
    let t0 = Instant::now();
    while rounds.load(Ordering::Acquire) <= 20 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(rounds.load(Ordering::Acquire) > 20, "the ping-pong ran");
    let held = conns_of(&a_lnd);
    assert_eq!(held.len(), 1);
    assert!(held[0].upgrade().is_some());

    // B goes away: A retires its connection, and nothing keeps it, neither
    // A's progress thread (which answered on it) nor this thread.
    b.shutdown();
    let t0 = Instant::now();
    while held[0].upgrade().is_some() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        held[0].upgrade().is_none(),
        "the dead peer's connection was freed"
    );
    a.shutdown();
}
