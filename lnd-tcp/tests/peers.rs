//! Our TCP NI against test doubles written by hand from the layouts (a
//! v2-only peer, a v4 peer, misbehaving clients, a thousand connections).
//! The doubles encode every byte themselves: two independent
//! implementations of the same wire format must agree.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use lnd_tcp::{AcceptMode, ConnsPerPeer, TcpConfig, TcpLnd};
use lnet::{
    AckReq, EventKind, EventQueue, InsPos, Lnet, Md, MdOptions, Nid, ProcessId, Threshold, Unlink,
};

const T: Duration = Duration::from_secs(10);

fn node(addr: &str, tune: impl FnOnce(&mut TcpConfig)) -> (Lnet, Arc<TcpLnd>, SocketAddr) {
    let mut cfg = TcpConfig::new(addr.parse().unwrap()).port(0);
    cfg.accept = AcceptMode::All;
    cfg.sock_timeout = Duration::from_secs(1);
    cfg.accept_timeout = Duration::from_secs(1);
    cfg.conns_per_peer = ConnsPerPeer::Fixed(1);
    tune(&mut cfg);
    let tcp = TcpLnd::new(cfg);
    let l = lnd_loopback::builder()
        .ni(tcp.clone())
        .response_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let a = tcp
        .listen_addr()
        .unwrap_or_else(|| "0.0.0.0:0".parse().unwrap());
    (l, tcp, a)
}

// ---- the double's own encoding, little-endian, from the C layouts ----

fn nid4(ip: Ipv4Addr) -> u64 {
    (2u64 << 48) | u64::from(u32::from(ip))
}

fn acceptor_v1(target: Ipv4Addr) -> Vec<u8> {
    let mut b = 0xacce_7100u32.to_le_bytes().to_vec();
    b.extend(1u32.to_le_bytes());
    b.extend(nid4(target).to_le_bytes());
    b
}

fn hello_nid4(version: u32, src: Ipv4Addr, dst: Ipv4Addr, ctype: u32, inc: u64) -> Vec<u8> {
    let mut b = 0x4572_6963u32.to_le_bytes().to_vec();
    b.extend(version.to_le_bytes());
    b.extend(nid4(src).to_le_bytes());
    b.extend(nid4(dst).to_le_bytes());
    b.extend(12345u32.to_le_bytes());
    b.extend(u32::MAX.to_le_bytes());
    b.extend(inc.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(ctype.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b
}

/// `struct lnet_nid` for an IPv4 tcp0 NID: size 0, type 2, num 0 (BE),
/// address (BE) in the first word.
fn nid16(ip: Ipv4Addr) -> [u8; 20] {
    let mut n = [0u8; 20];
    n[1] = 2;
    n[4..8].copy_from_slice(&ip.octets());
    n
}

fn hello_v4(src: Ipv4Addr, dst: Ipv4Addr, ctype: u32, inc: u64) -> Vec<u8> {
    let mut b = 0x4572_6963u32.to_le_bytes().to_vec();
    b.extend(4u32.to_le_bytes());
    b.extend(nid16(src));
    b.extend(nid16(dst));
    b.extend(12345u32.to_le_bytes());
    b.extend(u32::MAX.to_le_bytes());
    b.extend(inc.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(ctype.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b
}

fn ksock(ty: u32, cookies: [u64; 2]) -> Vec<u8> {
    let mut b = ty.to_le_bytes().to_vec();
    b.extend(0u32.to_le_bytes());
    b.extend(cookies[0].to_le_bytes());
    b.extend(cookies[1].to_le_bytes());
    b
}

/// A ksock LNET frame carrying a PUT without ACK (72-byte header).
fn put_frame(src: Ipv4Addr, dst: Ipv4Addr, portal: u32, bits: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = ksock(0xc1, [0, 0]);
    b.extend(nid4(dst).to_le_bytes());
    b.extend(nid4(src).to_le_bytes());
    b.extend(12345u32.to_le_bytes());
    b.extend(12345u32.to_le_bytes());
    b.extend(1u32.to_le_bytes()); // LNET_MSG_PUT
    b.extend((payload.len() as u32).to_le_bytes());
    b.extend([0xff; 16]); // ack_wmd: none
    b.extend(bits.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // hdr_data
    b.extend(portal.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // offset
    assert_eq!(b.len(), 24 + 72);
    b.extend_from_slice(payload);
    b
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// A double dialling our NI: acceptor request v1 and a hello of `version`.
fn dial(to: SocketAddr, me: Ipv4Addr, version: u32, ctype: u32) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let target = match to.ip() {
        std::net::IpAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut out = acceptor_v1(target);
    out.extend(hello_nid4(version, me, target, ctype, 0x5eed));
    s.write_all(&out).unwrap();
    let h = read_n(&mut s, 56);
    (s, h)
}

/// Attach a use-once ME for a PUT of up to `n` bytes on `portal`.
fn expect_put(l: &Lnet, portal: u32, n: usize, q: &EventQueue) {
    expect_put_bits(l, portal, (0, u64::MAX), n, q);
}

/// [`expect_put`] for match bits `(bits, ignore)`.
fn expect_put_bits(l: &Lnet, portal: u32, (bits, ignore): (u64, u64), n: usize, q: &EventQueue) {
    l.attach(
        portal,
        ProcessId::ANY,
        bits,
        ignore,
        Unlink::Unlink,
        InsPos::Tail,
        Md::new(vec![0u8; n])
            .options(MdOptions::OP_PUT)
            .handler(q.handler()),
    )
    .unwrap();
}

#[test]
fn a_v2_only_peer_dials_us() {
    let (l, tcp, at) = node("127.0.0.51", |_| {});
    let me: Ipv4Addr = "127.0.0.52".parse().unwrap();
    let (mut s, h) = dial(at, me, 2, 1);
    assert_eq!(u32le(&h[0..]), 0x4572_6963);
    assert_eq!(u32le(&h[4..]), 2, "answered in the peer's version");
    assert_eq!(
        &h[8..16],
        &nid4("127.0.0.51".parse().unwrap()).to_le_bytes()
    );
    assert_eq!(&h[16..24], &nid4(me).to_le_bytes());
    assert_eq!(u32le(&h[48..]), 1, "control answers control");
    let q = EventQueue::new();
    expect_put(&l, 30, 2000, &q);
    let data: Vec<u8> = (0..1500u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&put_frame(me, "127.0.0.51".parse().unwrap(), 30, 5, &data))
        .unwrap();
    let e = q.recv_timeout(T).expect("PUT event");
    assert_eq!((e.kind, e.mlength, e.match_bits), (EventKind::Put, 1500, 5));
    assert_eq!(&e.buffer.unwrap().into_vec()[..1500], &data[..]);
    assert_eq!(
        tcp.conns(Nid::from_ip(
            lnet::Net::new(lnet::NetType::SOCKLND, 0),
            me.into()
        ))[0]
            .version,
        2
    );
    l.shutdown();
}

/// A listening double that speaks only `version`: it answers any other
/// hello with its own in `version` and type NONE (as the kernel does), and
/// reports each frame it receives on an accepted connection.
type Double = (
    SocketAddr,
    mpsc::Receiver<(u32, Vec<u8>)>,
    mpsc::Receiver<Vec<u8>>,
);

fn version_double(me: Ipv4Addr, version: u32) -> Double {
    let l = TcpListener::bind((me, 0)).unwrap();
    let at = l.local_addr().unwrap();
    let (vtx, vrx) = mpsc::channel();
    let (ftx, frx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().take(16) {
            let Ok(mut s) = s else { return };
            let vtx = vtx.clone();
            let ftx = ftx.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(T)).unwrap();
                let acc = read_n(&mut s, 16);
                assert_eq!(u32le(&acc), 0xacce_7100);
                let pre = read_n(&mut s, 8);
                let v = u32le(&pre[4..]);
                let _ = vtx.send((v, acc.clone()));
                let rest = if v >= 4 { 72 } else { 48 };
                let h = read_n(&mut s, rest);
                let (src_off, ctype_off) = if v >= 4 { (0, 64) } else { (0, 40) };
                let ctype = u32le(&h[ctype_off..]);
                let peer: Ipv4Addr = if v >= 4 {
                    Ipv4Addr::new(
                        h[src_off + 4],
                        h[src_off + 5],
                        h[src_off + 6],
                        h[src_off + 7],
                    )
                } else {
                    Ipv4Addr::from(u64::from_le_bytes(h[..8].try_into().unwrap()) as u32)
                };
                if v != version {
                    let reply = if version >= 4 {
                        hello_v4(me, peer, u32::MAX, 0xd0b1e)
                    } else {
                        hello_nid4(version, me, peer, u32::MAX, 0xd0b1e)
                    };
                    let _ = s.write_all(&reply);
                    return;
                }
                let inv = match ctype {
                    2 => 3,
                    3 => 2,
                    t => t,
                };
                let reply = if version >= 4 {
                    hello_v4(me, peer, inv, 0xd0b1e)
                } else {
                    hello_nid4(version, me, peer, inv, 0xd0b1e)
                };
                s.write_all(&reply).unwrap();
                let hl = if version >= 4 { 96 } else { 72 };
                loop {
                    let mut kh = [0u8; 24];
                    if s.read_exact(&mut kh).is_err() {
                        return;
                    }
                    if u32le(&kh) != 0xc1 {
                        continue;
                    }
                    let mut hdr = vec![0u8; hl];
                    s.read_exact(&mut hdr).unwrap();
                    let plen_off = if version >= 4 { 40 + 12 } else { 28 };
                    let plen = u32le(&hdr[plen_off..]) as usize;
                    let mut frame = kh.to_vec();
                    frame.extend(hdr);
                    frame.extend(read_n(&mut s, plen));
                    let _ = ftx.send(frame);
                }
            });
        }
    });
    (at, vrx, frx)
}

fn put_to(l: &Lnet, to: Nid, data: Vec<u8>) {
    let md = l.md_bind(Md::new(data)).unwrap();
    l.put(
        md,
        AckReq::NoAck,
        ProcessId::new(to, 12345),
        31,
        0x77,
        0,
        0xda7a,
    )
    .unwrap();
}

#[test]
fn we_negotiate_down_to_a_v2_only_peer() {
    let peer: Ipv4Addr = "127.0.0.54".parse().unwrap();
    let (at, versions, frames) = version_double(peer, 2);
    let (l, tcp, _) = node("127.0.0.53", |c| {
        c.peer_port = at.port();
        c.accept = AcceptMode::None;
    });
    let pnid: Nid = "127.0.0.54@tcp".parse().unwrap();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    put_to(&l, pnid, data.clone());
    // First offer v3, refused with a v2 hello; then v2.
    assert_eq!(versions.recv_timeout(T).unwrap().0, 3);
    assert_eq!(versions.recv_timeout(T).unwrap().0, 2);
    let f = frames.recv_timeout(T).expect("frame");
    assert_eq!(u32le(&f), 0xc1);
    let h = &f[24..96];
    assert_eq!(&h[0..8], &nid4(peer).to_le_bytes(), "dest nid");
    assert_eq!(
        &h[8..16],
        &nid4("127.0.0.53".parse().unwrap()).to_le_bytes()
    );
    assert_eq!(u32le(&h[24..]), 1, "PUT");
    assert_eq!(u32le(&h[28..]), 3000);
    assert_eq!(u64::from_le_bytes(h[48..56].try_into().unwrap()), 0x77);
    assert_eq!(u64::from_le_bytes(h[56..64].try_into().unwrap()), 0xda7a);
    assert_eq!(u32le(&h[64..]), 31);
    assert_eq!(&f[96..], &data[..]);
    assert!(tcp.conns(pnid).iter().all(|c| c.version == 2));
    l.shutdown();
}

#[test]
fn we_negotiate_up_to_a_v4_peer() {
    let peer: Ipv4Addr = "127.0.0.56".parse().unwrap();
    let (at, versions, frames) = version_double(peer, 4);
    let (l, tcp, _) = node("127.0.0.55", |c| {
        c.peer_port = at.port();
        c.accept = AcceptMode::None;
    });
    let pnid: Nid = "127.0.0.56@tcp".parse().unwrap();
    put_to(&l, pnid, vec![9u8; 100]);
    assert_eq!(versions.recv_timeout(T).unwrap().0, 3);
    assert_eq!(versions.recv_timeout(T).unwrap().0, 4);
    let f = frames.recv_timeout(T).expect("frame");
    // 96-byte header: dest and src as struct lnet_nid.
    assert_eq!(f.len(), 24 + 96 + 100);
    assert_eq!(&f[24..44], &nid16(peer));
    assert_eq!(&f[44..64], &nid16("127.0.0.55".parse().unwrap()));
    assert!(tcp.conns(pnid).iter().all(|c| c.version == 4));
    l.shutdown();
}

/// Wait until the node closes `s` (EOF or reset) and return what it sent.
fn closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("connection still open after 5 s")
            }
            Err(_) => return got,
        }
    }
}

#[track_caller]
fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("condition not reached in 5 s");
}

#[test]
fn bad_input_closes_only_that_connection_with_a_counted_reason() {
    bad_input(false, "127.0.0.57");
}

#[test]
fn with_reader_threads_bad_input_closes_only_that_connection() {
    bad_input(true, "127.0.0.76");
}

fn bad_input(reader_threads: bool, addr: &str) {
    let (l, tcp, at) = node(addr, |c| {
        c.noop_burst = 50;
        c.noop_rate = 10;
        c.reader_threads = reader_threads;
    });
    let us: Ipv4Addr = addr.parse().unwrap();
    let me: Ipv4Addr = "127.0.0.58".parse().unwrap();
    // A good peer that stays connected throughout.
    let (mut good, _) = dial(at, "127.0.0.59".parse().unwrap(), 3, 1);

    // Bad magic.
    let mut s = TcpStream::connect(at).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    closed(s);
    wait_for(|| tcp.stats().bad_magic == 1);

    // Unknown acceptor version: the kernel's answer (magic, version 1).
    let mut s = TcpStream::connect(at).unwrap();
    let mut b = 0xacce_7100u32.to_le_bytes().to_vec();
    b.extend(7u32.to_le_bytes());
    s.write_all(&b).unwrap();
    let got = closed(s);
    assert_eq!(got.len(), 16);
    assert_eq!((u32le(&got), u32le(&got[4..])), (0xacce_7100, 1));
    wait_for(|| tcp.stats().bad_version == 1);

    // Unknown hello version: our hello (v3, type NONE), then close.
    let mut s = TcpStream::connect(at).unwrap();
    let mut b = acceptor_v1(us);
    b.extend(hello_nid4(9, me, us, 1, 1));
    s.write_all(&b).unwrap();
    let got = closed(s);
    assert_eq!(got.len(), 56);
    assert_eq!((u32le(&got[4..]), u32le(&got[48..])), (3, u32::MAX));
    wait_for(|| tcp.stats().bad_version == 2);

    // Acceptor request or hello naming a NID that is not ours.
    let mut s = TcpStream::connect(at).unwrap();
    s.write_all(&acceptor_v1("127.0.0.99".parse().unwrap()))
        .unwrap();
    closed(s);
    let mut s = TcpStream::connect(at).unwrap();
    let mut b = acceptor_v1(us);
    b.extend(hello_nid4(3, me, "127.0.0.99".parse().unwrap(), 1, 1));
    s.write_all(&b).unwrap();
    closed(s);
    wait_for(|| tcp.stats().wrong_nid == 2);

    // A client that connects and sends nothing: closed by the accept timeout.
    let s = TcpStream::connect(at).unwrap();
    closed(s);
    // A truncated ksock header after a good hello: the socket timeout.
    let (mut s, _) = dial(at, "127.0.0.60".parse().unwrap(), 3, 1);
    s.write_all(&[0xc1, 0, 0]).unwrap();
    closed(s);
    wait_for(|| tcp.stats().timeouts == 2);

    // payload_length over 1 MiB.
    let (mut s, _) = dial(at, "127.0.0.61".parse().unwrap(), 3, 1);
    let mut f = put_frame(me, us, 30, 1, &[]);
    f[24 + 28..24 + 32].copy_from_slice(&((1u32 << 20) + 1).to_le_bytes());
    s.write_all(&f).unwrap();
    closed(s);
    wait_for(|| tcp.stats().too_long == 1);

    // A payload longer than announced: the surplus is read as the next
    // header and rejected.
    let (mut s, _) = dial(at, "127.0.0.62".parse().unwrap(), 3, 1);
    let mut f = put_frame(me, us, 30, 1, &[1u8; 100]);
    f.extend([0x5a; 100]);
    s.write_all(&f).unwrap();
    closed(s);
    // Garbage after a good hello.
    let (mut s, _) = dial(at, "127.0.0.63".parse().unwrap(), 3, 1);
    s.write_all(&[0xa5; 200]).unwrap();
    closed(s);
    wait_for(|| tcp.stats().protocol_errors == 2);

    // A NOOP flood.
    let (mut s, _) = dial(at, "127.0.0.64".parse().unwrap(), 3, 1);
    let noop = ksock(0xc0, [0, 1]);
    let flood: Vec<u8> = noop.iter().copied().cycle().take(24 * 500).collect();
    let _ = s.write_all(&flood);
    closed(s);
    wait_for(|| tcp.stats().noop_floods == 1);

    // The good peer is still served.
    let q = EventQueue::new();
    expect_put(&l, 30, 64, &q);
    good.write_all(&put_frame(
        "127.0.0.59".parse().unwrap(),
        us,
        30,
        1,
        &[7u8; 64],
    ))
    .unwrap();
    let e = q.recv_timeout(T).expect("the good peer's PUT");
    assert_eq!(e.mlength, 64);
    let s = tcp.stats();
    assert_eq!(s.checksum_errors, 0);
    l.shutdown();
}

#[test]
fn secure_mode_takes_only_privileged_ports() {
    let (l, tcp, at) = node("127.0.0.65", |c| c.accept = AcceptMode::Secure);
    let s = TcpStream::connect(at).unwrap();
    closed(s);
    wait_for(|| tcp.stats().unprivileged == 1);
    // From a privileged port (needs root, which CI has).
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    let bound = (600..1000u16).any(|p| {
        sock.bind(&SocketAddr::from(([127, 0, 0, 66], p)).into())
            .is_ok()
    });
    if !bound {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("not root: privileged half of the test not run");
        return;
    }
    sock.connect(&at.into()).unwrap();
    let mut s: TcpStream = sock.into();
    let us: Ipv4Addr = "127.0.0.65".parse().unwrap();
    let mut b = acceptor_v1(us);
    b.extend(hello_nid4(3, "127.0.0.66".parse().unwrap(), us, 1, 3));
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let h = read_n(&mut s, 56);
    assert_eq!(u32le(&h[48..]), 1);
    assert_eq!(tcp.stats().unprivileged, 1);
    l.shutdown();
}

#[test]
fn a_thousand_concurrent_connections() {
    thousand_connections(false, "127.0.0.67");
}

#[test]
fn with_reader_threads_a_thousand_concurrent_connections_and_every_thread_ends() {
    let tcp = thousand_connections(true, "127.0.0.68");
    // Shutdown closed every connection, which ends its thread's read.
    wait_for(|| {
        let s = tcp.stats();
        s.reader_threads_ended == s.reader_threads_started
    });
}

/// Accept a thousand peers' connections and take a PUT from each; returns
/// the (shut down) LND.
fn thousand_connections(reader_threads: bool, addr: &str) -> Arc<TcpLnd> {
    let (l, tcp, at) = node(addr, |c| {
        c.accept_timeout = Duration::from_secs(20);
        c.reader_threads = reader_threads;
    });
    let us: Ipv4Addr = addr.parse().unwrap();
    let q = EventQueue::new();
    l.attach(
        32,
        ProcessId::ANY,
        0,
        u64::MAX,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite)
            .handler(q.handler()),
    )
    .unwrap();
    const N: u32 = 1000;
    let mut socks = Vec::new();
    for i in 0..N {
        // Distinct peer NIDs (never dialled, so any address will do).
        let me = Ipv4Addr::from(0x0a00_0000 + i + 1);
        let (s, h) = dial(at, me, 3, 1);
        assert_eq!(u32le(&h[48..]), 1);
        socks.push((me, s));
    }
    wait_for(|| tcp.stats().conns_established >= u64::from(N));
    for (me, s) in socks.iter_mut() {
        s.write_all(&put_frame(*me, us, 32, 1, &[1u8; 8])).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let Some(e) = q.recv_timeout(T) else {
            panic!("PUT missing: {:?} {:?}", tcp.stats(), l.counters());
        };
        assert!(e.status.is_ok());
        seen.insert(e.initiator.nid);
    }
    assert_eq!(seen.len(), N as usize, "one PUT from each peer");
    assert_eq!(tcp.stats().conns_closed, 0);
    if reader_threads {
        let s = tcp.stats();
        let running = s.reader_threads_started - s.reader_threads_ended;
        assert_eq!(running, u64::from(N), "one reader per connection: {s:?}");
    }
    l.shutdown();
    tcp
}

#[test]
fn keepalive_pings_then_peer_timeout_closes_a_silent_peer() {
    let (l, tcp, at) = node("127.0.0.70", |c| {
        c.keepalive = Some(Duration::from_millis(300));
        c.peer_timeout = Duration::from_millis(1500);
    });
    // A peer that completes its hello (v3, control) and then says nothing
    // (it does not even answer our keepalives).
    let t0 = std::time::Instant::now();
    let (s, _) = dial(at, "127.0.0.71".parse().unwrap(), 3, 1);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = s;
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    let waited = t0.elapsed();
    // What we sent meanwhile: keepalive NOOPs (ksock header, NOOP type,
    // the keepalive cookie), nothing else. (Layout from socklnd-idl.h.)
    const KSOCK_HDR_SIZE: usize = 24;
    const KSOCK_MSG_NOOP: u32 = 0xc0;
    const KEEPALIVE_PING: u64 = 1;
    assert!(
        got.len() >= KSOCK_HDR_SIZE && got.len() % KSOCK_HDR_SIZE == 0,
        "{} bytes",
        got.len()
    );
    for f in got.chunks(KSOCK_HDR_SIZE) {
        assert_eq!(u32le(&f[0..4]), KSOCK_MSG_NOOP);
        assert_eq!(
            u64::from_le_bytes(f[16..24].try_into().unwrap()),
            KEEPALIVE_PING
        );
    }
    // Closed after the peer timeout (the reaper runs every second), and
    // counted as such.
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "closed after {waited:?}");
    wait_for(|| tcp.stats().peer_timeouts == 1);
    l.shutdown();
}

#[test]
fn simultaneous_connects_between_two_nodes_settle() {
    // Both nodes listen on the same port at different addresses, so each
    // can dial the other; each round, both send first, at the same moment.
    let port = 7989;
    let mut races = 0;
    for round in 0..5u8 {
        let (ip_a, ip_b) = (
            format!("127.0.0.{}", 90 + 2 * round),
            format!("127.0.0.{}", 91 + 2 * round),
        );
        let tune = |c: &mut TcpConfig| {
            c.port = port;
            c.peer_port = port;
            c.conns_per_peer = ConnsPerPeer::Fixed(1);
            c.min_reconnect = Duration::from_millis(10);
            c.max_reconnect = Duration::from_millis(200);
        };
        let (la, ta, _) = node(&ip_a, tune);
        let (lb, tb, _) = node(&ip_b, tune);
        let (na, nb): (Nid, Nid) = (
            format!("{ip_a}@tcp").parse().unwrap(),
            format!("{ip_b}@tcp").parse().unwrap(),
        );
        let (qa, qb) = (EventQueue::new(), EventQueue::new());
        for (l, q) in [(&la, &qa), (&lb, &qb)] {
            for _ in 0..3 {
                expect_put(l, 31, 70_000, q);
            }
        }
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                put_to(&la, nb, vec![1u8; 100]);
                put_to(&la, nb, vec![2u8; 65_536]);
            });
            s.spawn(|| {
                barrier.wait();
                put_to(&lb, na, vec![3u8; 100]);
                put_to(&lb, na, vec![4u8; 65_536]);
            });
        });
        for q in [&qa, &qb] {
            for _ in 0..2 {
                let e = q.recv_timeout(T).expect("PUT delivered");
                assert_eq!(e.kind, EventKind::Put);
            }
        }
        // Exactly one full set of typed connections per side: a control
        // and one bulk each way, whichever side dialled them. A dial that
        // would duplicate a connection the other side has (or is
        // accepting) is refused, so none is ever doubled.
        let full = |t: &Arc<TcpLnd>, n: Nid| {
            let c = t.conns(n);
            let count = |ct: u32| c.iter().filter(|x| x.ctype.to_wire() == ct).count();
            count(1) == 1 && count(2) == 1 && count(3) == 1
        };
        let t0 = std::time::Instant::now();
        while !(full(&ta, nb) && full(&tb, na)) && t0.elapsed() < T {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            full(&ta, nb) && full(&tb, na),
            "round {round}: a {:?} b {:?} races {} {}",
            ta.conns(nb),
            tb.conns(na),
            ta.stats().races,
            tb.stats().races
        );
        // ... and it stays so (no late duplicate registers after).
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            full(&ta, nb) && full(&tb, na),
            "round {round}, later: a {:?} b {:?}",
            ta.conns(nb),
            tb.conns(na)
        );
        races += ta.stats().races + tb.stats().races;
        la.shutdown();
        lb.shutdown();
    }
    // The dials did cross (each side refused one), and it settled anyway.
    assert!(races > 0, "no race happened in 5 rounds");
}

/// A double that completes the hello on every connection (v3) and then
/// neither reads nor writes until `done` says so (or 30 s pass).
fn stalling_double(me: Ipv4Addr) -> (SocketAddr, mpsc::Sender<()>) {
    let l = TcpListener::bind((me, 0)).unwrap();
    let at = l.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = Arc::new(std::sync::Mutex::new(done_rx));
    std::thread::spawn(move || {
        for s in l.incoming().take(8) {
            let Ok(mut s) = s else { return };
            let done_rx = done_rx.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(T)).unwrap();
                read_n(&mut s, 16);
                let h = read_n(&mut s, 8 + 48);
                let peer = Ipv4Addr::from(u64::from_le_bytes(h[8..16].try_into().unwrap()) as u32);
                let inv = match u32le(&h[8 + 40..]) {
                    2 => 3,
                    3 => 2,
                    t => t,
                };
                s.write_all(&hello_nid4(3, me, peer, inv, 0x57a11)).unwrap();
                // Hold the socket, reading nothing.
                let _ = done_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
                drop(s);
            });
        }
    });
    (at, done_tx)
}

#[test]
fn a_connection_whose_writer_fails_first_is_dropped_and_its_messages_fail() {
    writer_fails_first(false, "127.0.0.72", "127.0.0.73");
}

#[test]
fn with_reader_threads_a_connection_whose_writer_fails_first_is_dropped() {
    writer_fails_first(true, "127.0.0.74", "127.0.0.75");
}

fn writer_fails_first(reader_threads: bool, double: &str, us: &str) {
    // The peer stops reading: our bulk connection's writer times out while
    // its reader still waits quietly for the next message. The connection
    // must still be closed and forgotten (it once stayed listed, closing,
    // so later messages were held for it instead of failing or redialling).
    let peer: Ipv4Addr = double.parse().unwrap();
    let (at, done) = stalling_double(peer);
    let (l, tcp, _) = node(us, |c| {
        c.peer_port = at.port();
        c.accept = AcceptMode::None;
        c.tx_buffer_size = Some(64 << 10);
        c.reader_threads = reader_threads;
    });
    let pnid: Nid = format!("{double}@tcp").parse().unwrap();
    let q = EventQueue::new();
    let payload = bytes::Bytes::from(vec![9u8; 1 << 20]);
    for _ in 0..4 {
        let md = l
            .md_bind(Md::new(payload.clone()).handler(q.handler()))
            .unwrap();
        l.put(md, AckReq::NoAck, ProcessId::new(pnid, 12345), 31, 0, 0, 0)
            .unwrap();
    }
    // Each PUT ends once, with an error (nothing was read).
    let mut ended = 0;
    while ended < 4 {
        let e = q.recv_timeout(T).expect("every PUT ends");
        assert_eq!(e.kind, EventKind::Send);
        assert!(e.status.is_err(), "{:?}", e.status);
        ended += usize::from(e.unlinked);
    }
    // The stalled connection was closed for its timeout, counted, and is
    // no longer listed: every connection ever set up is either listed or
    // counted closed.
    wait_for(|| {
        let s = tcp.stats();
        s.conns_closed >= 1 && s.timeouts >= 1
    });
    let s = tcp.stats();
    assert_eq!(
        tcp.conns(pnid).len() as u64 + s.conns_closed,
        s.conns_established,
        "{s:?} {:?}",
        tcp.conns(pnid)
    );
    let _ = done.send(());
    l.shutdown();
}

/// PUTs from `la` to `lb` (at `nb`) of each size, back to back, each onto
/// an ME of its own (match bits: its index): every payload verified from
/// its MD's final event.
fn puts_verified(la: &Lnet, lb: &Lnet, nb: Nid, sizes: &[usize]) {
    let q = EventQueue::new();
    let data = |i: usize, n: usize| -> Vec<u8> { (0..n).map(|k| (k * 7 + i) as u8).collect() };
    for (i, &n) in sizes.iter().enumerate() {
        expect_put_bits(lb, 31, (i as u64, 0), n, &q);
    }
    for (i, &n) in sizes.iter().enumerate() {
        let md = la.md_bind(Md::new(data(i, n))).unwrap();
        la.put(
            md,
            AckReq::NoAck,
            ProcessId::new(nb, lb.pid()),
            31,
            i as u64,
            0,
            0,
        )
        .unwrap();
    }
    for _ in sizes {
        let e = q.recv_timeout(T).expect("PUT delivered");
        assert_eq!(e.kind, EventKind::Put);
        assert!(e.status.is_ok(), "{:?}", e.status);
        let i = e.match_bits as usize;
        assert_eq!(e.mlength as usize, sizes[i]);
        let got = e.buffer.expect("last event carries the buffer").into_vec();
        assert_eq!(got, data(i, sizes[i]), "PUT {i} of {} B", sizes[i]);
    }
}

#[test]
fn small_puts_land_from_the_read_ahead_and_checksummed_ones_through_a_sink() {
    const SIZES: [usize; 7] = [0, 1, 100, 4000, 12_000, 65_536, 8];
    for (round, checksum) in [false, true].into_iter().enumerate() {
        let (ip_a, ip_b) = (
            format!("127.0.0.{}", 120 + 2 * round),
            format!("127.0.0.{}", 121 + 2 * round),
        );
        // Checksums are protocol v2's (as in socklnd).
        let proto = if checksum { 2 } else { 3 };
        let (lb, tb, at) = node(&ip_b, |c| {
            c.checksum = checksum;
            c.protocol = proto;
        });
        let (la, _ta, _) = node(&ip_a, |c| {
            c.accept = AcceptMode::None;
            c.peer_port = at.port();
            c.checksum = checksum;
            c.protocol = proto;
        });
        let nb: Nid = format!("{ip_b}@tcp").parse().unwrap();
        puts_verified(&la, &lb, nb, &SIZES);
        let s = tb.stats();
        if checksum {
            // A checksummed payload is checked as it lands: never inline.
            let na: Nid = format!("{ip_a}@tcp").parse().unwrap();
            assert!(tb.conns(na).iter().all(|c| c.version == 2));
            assert_eq!(s.rx_inline, 0, "{s:?}");
        } else {
            // The payloads that can sit whole in the 16 KiB read-ahead
            // (not 0 B, not 64 KiB) may be copied from it; at least one is.
            assert!(s.rx_inline >= 1 && s.rx_inline <= 5, "{s:?}");
        }
        assert_eq!(
            s.protocol_errors + s.checksum_errors + s.truncated,
            0,
            "{s:?}"
        );
        la.shutdown();
        lb.shutdown();
    }
}
