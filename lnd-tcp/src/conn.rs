//! One established connection: its writer (headers and MD fragments in one
//! vectored write) and its reader (headers, then the payload straight into
//! the matched MD).

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lnet::wire::{ByteOrder, Header, MsgBody};
use lnet::{Delivery, Error, Sink, TxMsg};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

use crate::error::{Reject, Stats};
use crate::proto::{
    Csum, Framing, KEEPALIVE_PING, KSOCK_HDR_SIZE, KSOCK_MSG_LNET, KSOCK_MSG_NOOP, KsockHdr,
    PROTO_V2,
};
use crate::{ConnInfo, Peer, Shared, zc};

/// What the writer sends.
pub(crate) enum Out {
    /// An LNet message.
    Msg(TxMsg),
    /// A NOOP (keepalive or ZC-ACK).
    Noop(KsockHdr),
}

pub(crate) struct Conn {
    #[allow(dead_code)]
    pub(crate) id: u64,
    pub(crate) info: ConnInfo,
    framing: Framing,
    tx: mpsc::UnboundedSender<Out>,
    closing: AtomicBool,
    close_tx: watch::Sender<bool>,
}

type Parts = (
    Arc<Conn>,
    mpsc::UnboundedReceiver<Out>,
    Half<OwnedReadHalf>,
    Half<OwnedWriteHalf>,
);

/// A socket half with the signals that stop its task.
pub(crate) struct Half<T> {
    io: T,
    stop: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
}

impl Conn {
    pub(crate) fn new(
        id: u64,
        info: ConnInfo,
        framing: Framing,
        s: TcpStream,
        stop: watch::Receiver<bool>,
    ) -> Parts {
        let (tx, rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = watch::channel(false);
        let (r, w) = s.into_split();
        let c = Arc::new(Conn {
            id,
            info,
            framing,
            tx,
            closing: AtomicBool::new(false),
            close_tx,
        });
        (
            c,
            rx,
            Half {
                io: r,
                stop: stop.clone(),
                close: close_rx.clone(),
            },
            Half {
                io: w,
                stop,
                close: close_rx,
            },
        )
    }
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
    /// Mark closing and stop both tasks; true the first time.
    pub(crate) fn begin_close(&self) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let _ = self.close_tx.send(true);
        true
    }
    /// Queue for the writer; gives the item back if the writer is gone.
    pub(crate) fn send(&self, o: Out) -> Result<(), Out> {
        if self.is_closing() {
            return Err(o);
        }
        self.tx.send(o).map_err(|e| e.0)
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>, close: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow() || *close.borrow() {
            return;
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() { return },
            r = close.changed() => if r.is_err() { return },
        }
    }
}

fn build_iov<'a>(hdr: &'a [u8], p: &'a [IoSlice<'_>]) -> Vec<IoSlice<'a>> {
    let mut v = Vec::with_capacity(p.len() + 1);
    v.push(IoSlice::new(hdr));
    v.extend(p.iter().map(|s| IoSlice::new(s)));
    v
}

/// Advance `slices` (built fresh for each call) past `n` bytes.
fn skip_front<'a>(v: &mut Vec<IoSlice<'a>>, mut n: usize) {
    let mut i = 0;
    while i < v.len() && n >= v[i].len() {
        n -= v[i].len();
        i += 1;
    }
    v.drain(..i);
    if n > 0 {
        if let Some(first) = v.first_mut() {
            IoSlice::advance(first, n);
        }
    }
}

struct ZcPending {
    last_seq: u32,
    tx: TxMsg,
}

struct Writer<'a> {
    sh: &'a Shared,
    c: &'a Conn,
    half: Half<OwnedWriteHalf>,
    zc_on: bool,
    zc_next: u32,
    zc_pending: VecDeque<ZcPending>,
}

/// The writer task: until the connection closes, send what is queued.
pub(crate) async fn writer(
    sh: &Arc<Shared>,
    c: &Arc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    half: Half<OwnedWriteHalf>,
) -> Result<(), Reject> {
    let zc_on = sh.cfg.zerocopy_min.is_some()
        && zc::enable(half.io.as_ref().as_raw_fd())
            .inspect_err(|e| tracing::debug!(target: "net", error = %e, "SO_ZEROCOPY unavailable"))
            .is_ok();
    let mut w = Writer {
        sh,
        c,
        half,
        zc_on,
        zc_next: 0,
        zc_pending: VecDeque::new(),
    };
    let r = w.run(&mut rx).await;
    // Whatever is still queued fails (dropping a TxMsg completes it with an
    // error); messages awaiting zero-copy completion too.
    rx.close();
    while let Ok(o) = rx.try_recv() {
        if let Out::Msg(tx) = o {
            tx.complete(Err(Error::Network("connection closed".into())));
        }
    }
    for p in w.zc_pending.drain(..) {
        p.tx.complete(Err(Error::Network("connection closed".into())));
    }
    r
}

impl Writer<'_> {
    async fn run(&mut self, rx: &mut mpsc::UnboundedReceiver<Out>) -> Result<(), Reject> {
        let mut stop = self.half.stop.clone();
        let mut close = self.half.close.clone();
        loop {
            let o = tokio::select! {
                o = rx.recv() => o,
                _ = stopped(&mut stop, &mut close) => return Ok(()),
                r = self.half.io.as_ref().ready(Interest::ERROR), if !self.zc_pending.is_empty() => {
                    r?;
                    self.reap_zc()?;
                    continue;
                }
            };
            let Some(o) = o else { return Ok(()) };
            match o {
                Out::Noop(h) => {
                    let b = h.encode(ByteOrder::NATIVE);
                    self.write_iov(&b, None).await?;
                    Stats::inc(&self.sh.stats.tx_noops);
                }
                Out::Msg(tx) => self.send_msg(tx).await?,
            }
        }
    }

    fn reap_zc(&mut self) -> Result<(), Reject> {
        let fd = self.half.io.as_ref().as_raw_fd();
        let r = self
            .half
            .io
            .as_ref()
            .try_io(Interest::ERROR, || zc::completions(fd));
        let done = match r {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for d in done {
            if d.copied {
                Stats::inc(&self.sh.stats.zc_copied);
            }
            // TCP acknowledges in order, so completions arrive in order.
            while self
                .zc_pending
                .front()
                .is_some_and(|p| p.last_seq.wrapping_sub(d.lo) <= d.hi.wrapping_sub(d.lo))
            {
                if let Some(p) = self.zc_pending.pop_front() {
                    p.tx.complete(Ok(()));
                }
            }
        }
        Ok(())
    }

    async fn send_msg(&mut self, tx: TxMsg) -> Result<(), Reject> {
        let f = self.c.framing;
        let h = tx.header();
        let mut hdr = [0u8; KSOCK_HDR_SIZE + lnet::wire::HDR_NID16_SIZE];
        let lnet_len = f.lnet_hdr_size();
        let encoded = if f.version >= crate::proto::PROTO_V4 {
            hdr[KSOCK_HDR_SIZE..KSOCK_HDR_SIZE + lnet_len]
                .copy_from_slice(&h.encode_nid16(ByteOrder::NATIVE));
            Ok(())
        } else {
            h.encode_nid4(ByteOrder::NATIVE)
                .map(|b| hdr[KSOCK_HDR_SIZE..KSOCK_HDR_SIZE + lnet_len].copy_from_slice(&b))
        };
        if encoded.is_err() {
            // A large NID on a v2/v3 connection: this message cannot go here.
            tx.complete(Err(Error::Invalid("large NIDs need ksock protocol v4")));
            return Ok(());
        }
        let mut kh = KsockHdr {
            msg_type: KSOCK_MSG_LNET,
            csum: 0,
            zc_cookies: [0, 0],
        };
        hdr[..KSOCK_HDR_SIZE].copy_from_slice(&kh.encode(ByteOrder::NATIVE));
        let hlen = KSOCK_HDR_SIZE + lnet_len;
        if self.sh.cfg.checksum && f.version == PROTO_V2 {
            let mut c = Csum::default();
            c.update(&hdr[..hlen]);
            tx.with_payload(|p| p.iter().for_each(|s| c.update(s)));
            kh.csum = c.finish();
            hdr[..KSOCK_HDR_SIZE].copy_from_slice(&kh.encode(ByteOrder::NATIVE));
        }
        let len = tx.payload_len();
        let use_zc = self.zc_on && self.sh.cfg.zerocopy_min.is_some_and(|m| len >= m);
        let calls = self.write_iov(&hdr[..hlen], Some((&tx, use_zc))).await?;
        Stats::inc(&self.sh.stats.tx_msgs);
        Stats::add(&self.sh.stats.tx_bytes, len as u64);
        if use_zc && calls > 0 {
            Stats::inc(&self.sh.stats.zc_sends);
            self.zc_next = self.zc_next.wrapping_add(calls);
            self.zc_pending.push_back(ZcPending {
                last_seq: self.zc_next.wrapping_sub(1),
                tx,
            });
        } else {
            tx.complete(Ok(()));
        }
        Ok(())
    }

    /// Write `hdr` then the message's payload; returns the number of
    /// zero-copy `sendmsg` calls made.
    async fn write_iov(&mut self, hdr: &[u8], msg: Option<(&TxMsg, bool)>) -> Result<u32, Reject> {
        let total = hdr.len() + msg.map_or(0, |(t, _)| t.payload_len());
        let mut done = 0usize;
        let mut zc_calls = 0u32;
        let t = self.sh.cfg.sock_timeout;
        let fd = self.half.io.as_ref().as_raw_fd();
        let mut stop = self.half.stop.clone();
        let mut close = self.half.close.clone();
        while done < total {
            let attempt = |done: usize, zc_calls: &mut u32| match msg {
                Some((tx, zc_on)) => tx.with_payload(|p| {
                    let mut v = build_iov(hdr, p);
                    skip_front(&mut v, done);
                    if zc_on {
                        let r = self
                            .half
                            .io
                            .as_ref()
                            .try_io(Interest::WRITABLE, || zc::send(fd, &v));
                        if r.is_ok() {
                            *zc_calls += 1;
                        }
                        r
                    } else {
                        self.half.io.try_write_vectored(&v)
                    }
                }),
                None => {
                    let mut v = build_iov(hdr, &[]);
                    skip_front(&mut v, done);
                    self.half.io.try_write_vectored(&v)
                }
            };
            match attempt(done, &mut zc_calls) {
                Ok(0) => return Err(Reject::Eof),
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                r = tokio::time::timeout(t, self.half.io.as_ref().writable()) => match r {
                    Ok(r) => r?,
                    Err(_) => return Err(Reject::Timeout),
                },
                _ = stopped(&mut stop, &mut close) => return Err(Reject::Shutdown),
                r = self.half.io.as_ref().ready(Interest::ERROR), if !self.zc_pending.is_empty() => {
                    r?;
                    self.reap_zc()?;
                }
            }
        }
        Ok(zc_calls)
    }
}

/// A token bucket for NOOPs.
struct NoopLimit {
    tokens: f64,
    burst: f64,
    rate: f64,
    at: Instant,
}

impl NoopLimit {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }
}

struct Reader<'a> {
    sh: &'a Shared,
    peer: &'a Peer,
    c: &'a Conn,
    half: Half<OwnedReadHalf>,
    scratch: Vec<u8>,
}

/// The reader task: until error or close, receive messages.
pub(crate) async fn reader(
    sh: &Arc<Shared>,
    peer: &Arc<Peer>,
    c: &Arc<Conn>,
    half: Half<OwnedReadHalf>,
) -> Result<(), Reject> {
    let mut r = Reader {
        sh,
        peer,
        c,
        half,
        scratch: Vec::new(),
    };
    let mut limit = NoopLimit {
        tokens: f64::from(sh.cfg.noop_burst),
        burst: f64::from(sh.cfg.noop_burst),
        rate: f64::from(sh.cfg.noop_rate),
        at: Instant::now(),
    };
    loop {
        r.one(&mut limit).await?;
    }
}

impl Reader<'_> {
    fn alive(&self) {
        self.peer
            .last_alive
            .store(self.sh.now_ms(), Ordering::Relaxed);
    }

    /// Fill `b`; `idle` allows waiting forever for the first byte (a
    /// message boundary), after which the socket timeout applies.
    async fn fill(&mut self, b: &mut [u8], idle: bool) -> Result<(), Reject> {
        let mut done = 0;
        let t = self.sh.cfg.sock_timeout;
        while done < b.len() {
            match self.half.io.try_read(&mut b[done..]) {
                Ok(0) => {
                    return Err(if done == 0 && idle {
                        Reject::Eof
                    } else {
                        Reject::Truncated
                    });
                }
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            self.wait_readable(idle && done == 0, t).await?;
        }
        Ok(())
    }

    async fn wait_readable(&mut self, forever: bool, t: Duration) -> Result<(), Reject> {
        let mut stop = self.half.stop.clone();
        let mut close = self.half.close.clone();
        let deadline = if forever {
            None
        } else {
            Some(tokio::time::Instant::now() + t)
        };
        tokio::select! {
            r = self.half.io.readable() => r.map_err(Reject::from),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Err(Reject::Timeout),
            _ = stopped(&mut stop, &mut close) => Err(Reject::Shutdown),
        }
    }

    /// Read and drop `n` payload bytes.
    async fn skip(&mut self, mut n: usize) -> Result<(), Reject> {
        if n > 0 && self.scratch.is_empty() {
            self.scratch = vec![0u8; 64 * 1024];
        }
        while n > 0 {
            let k = n.min(self.scratch.len());
            let mut buf = std::mem::take(&mut self.scratch);
            let r = self.fill(&mut buf[..k], false).await;
            self.scratch = buf;
            r?;
            n -= k;
        }
        Ok(())
    }

    /// Read `sink.mlength()` bytes from the socket straight into the sink.
    async fn into_sink(&mut self, sink: &mut Sink) -> Result<(), Reject> {
        let want = sink.mlength();
        let mut done = 0;
        let t = self.sh.cfg.sock_timeout;
        while done < want {
            let io = &self.half.io;
            let r = sink.with_iov_mut(|iov| {
                let mut v: &mut [IoSliceMut<'_>] = iov;
                IoSliceMut::advance_slices(&mut v, done);
                io.try_read_vectored(v)
            });
            match r {
                Ok(0) => return Err(Reject::Truncated),
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            self.wait_readable(false, t).await?;
        }
        Ok(())
    }

    async fn one(&mut self, limit: &mut NoopLimit) -> Result<(), Reject> {
        let f = self.c.framing;
        let mut kb = [0u8; KSOCK_HDR_SIZE];
        self.fill(&mut kb, true).await?;
        self.alive();
        let kh = KsockHdr::decode(&kb, f.peer_order);
        if kh.zc_cookies[1] != 0 && kh.zc_cookies[1] != KEEPALIVE_PING {
            // We never ask for zero-copy ACKs.
            return Err(Reject::BadZcAck(kh.zc_cookies[1]));
        }
        match kh.msg_type {
            KSOCK_MSG_NOOP => {
                Stats::inc(&self.sh.stats.rx_noops);
                if kh.csum != 0 && f.csum_covers_header() {
                    let mut z = kb;
                    z[4..8].fill(0);
                    let mut c = Csum::default();
                    c.update(&z);
                    if c.finish() != kh.csum {
                        return Err(Reject::Checksum);
                    }
                }
                if !limit.take() {
                    return Err(Reject::NoopFlood);
                }
                return Ok(());
            }
            KSOCK_MSG_LNET => {}
            t => return Err(Reject::BadMsgType(t)),
        }
        let hl = f.lnet_hdr_size();
        let mut hb = [0u8; lnet::wire::HDR_NID16_SIZE];
        self.fill(&mut hb[..hl], false).await?;
        let hdr = if hl == lnet::wire::HDR_NID16_SIZE {
            Header::decode_nid16(&hb[..hl], f.peer_order)
        } else {
            Header::decode_nid4(&hb[..hl], f.peer_order)
        }
        .map_err(|e| match e {
            lnet::WireError::TooLong { len, .. } => {
                Reject::TooLong(len.min(u64::from(u32::MAX)) as u32)
            }
            _ => Reject::BadHeader,
        })?;
        if matches!(hdr.body, MsgBody::Hello { .. }) {
            return Err(Reject::BadHeader);
        }
        let plen = hdr.payload_length;
        if plen > lnet::LNET_MTU {
            return Err(Reject::TooLong(plen));
        }
        Stats::inc(&self.sh.stats.rx_msgs);
        Stats::add(&self.sh.stats.rx_bytes, u64::from(plen));
        let mut csum = (kh.csum != 0).then(|| {
            let mut c = Csum::default();
            if f.csum_covers_header() {
                let mut z = kb;
                z[4..8].fill(0);
                c.update(&z);
                c.update(&hb[..hl]);
            }
            c
        });
        let mut d = self.sh.ni.parse(&hdr, self.peer.nid);
        loop {
            match d {
                Delivery::Receive(mut sink) => {
                    let r = self.into_sink(&mut sink).await;
                    if let Err(e) = r {
                        sink.complete(Err(Error::Network(format!("receive failed: {e}"))));
                        return Err(e);
                    }
                    let m = sink.mlength();
                    if let Err(e) = self.skip(plen as usize - m.min(plen as usize)).await {
                        sink.complete(Err(Error::Network(format!("receive failed: {e}"))));
                        return Err(e);
                    }
                    if let Some(mut c) = csum.take() {
                        // socklnd checks only untruncated payloads.
                        if m == plen as usize {
                            sink.with_iov_mut(|iov| iov.iter().for_each(|s| c.update(s)));
                            if c.finish() != kh.csum {
                                sink.complete(Err(Error::Network("checksum mismatch".into())));
                                return Err(Reject::Checksum);
                            }
                        }
                    }
                    sink.complete(Ok(()));
                    break;
                }
                Delivery::Discard(n) => {
                    self.skip(n.min(plen) as usize).await?;
                    if n < plen {
                        self.skip((plen - n) as usize).await?;
                    }
                    break;
                }
                Delivery::Done => {
                    self.skip(plen as usize).await?;
                    break;
                }
                Delivery::Deferred(w) => {
                    // A lazy portal: the connection waits for the decision,
                    // as socklnd's does.
                    let mut stop = self.half.stop.clone();
                    let mut close = self.half.close.clone();
                    d = tokio::select! {
                        r = w.wait() => r.unwrap_or(Delivery::Discard(plen)),
                        _ = stopped(&mut stop, &mut close) => return Err(Reject::Shutdown),
                    };
                }
                Delivery::Reply(tx) => {
                    // Only LNDs that reply inline get these; we never ask.
                    tx.complete(Err(Error::Invalid("inline reply on tcp")));
                    self.skip(plen as usize).await?;
                    break;
                }
            }
        }
        self.alive();
        if kh.zc_cookies[0] != 0 {
            // The sender waits for our ZC-ACK before reusing its pages.
            let _ = self.c.send(Out::Noop(KsockHdr::zc_ack(kh.zc_cookies[0])));
        }
        Ok(())
    }
}
