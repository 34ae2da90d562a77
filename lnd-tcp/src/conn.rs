//! One established connection: its writer (headers and MD fragments in one
//! vectored write) and its reader (headers, then the payload straight into
//! the matched MD).

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lnet::counters::Sharded;
use lnet::wire::{ByteOrder, Header, MsgBody};
use lnet::{Delivery, Error, Sink, TxMsg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use tokio::sync::watch;

use crate::error::{Reject, Stats};
use crate::proto::{
    Csum, Framing, KEEPALIVE_PING, KSOCK_HDR_SIZE, KSOCK_MSG_LNET, KSOCK_MSG_NOOP, KsockHdr,
    PROTO_V2,
};
use crate::{ConnInfo, Peer, Shared, zc};

/// What the writer sends. (Moved once per message; boxing the large
/// variant would cost an allocation on the hot path.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Out {
    /// An LNet message.
    Msg(TxMsg),
    /// A NOOP (keepalive or ZC-ACK).
    Noop(KsockHdr),
}

/// Who is writing to the socket right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// Nobody: the next sender may write inline.
    None,
    /// A sender, on its own thread, without waiting.
    Inline,
    /// The writer task.
    Task,
}

struct TxQ {
    queue: VecDeque<Out>,
    owner: Owner,
    /// A frame an inline sender could not finish (the task continues it).
    partial: Option<Frame>,
    /// An inline write failed: the task closes the connection.
    error: Option<Reject>,
}

/// A frame being written: headers, then the message's payload.
struct Frame {
    hdr: [u8; KSOCK_HDR_SIZE + lnet::wire::HDR_NID16_SIZE],
    hlen: usize,
    tx: Option<TxMsg>,
    done: usize,
    zc: bool,
    zc_calls: u32,
}

impl Frame {
    fn total(&self) -> usize {
        self.hlen + self.tx.as_ref().map_or(0, TxMsg::payload_len)
    }
}

pub(crate) struct Conn {
    pub(crate) info: ConnInfo,
    framing: Framing,
    checksum: bool,
    zerocopy_min: Option<usize>,
    zc_on: AtomicBool,
    q: std::sync::Mutex<TxQ>,
    wake: tokio::sync::Notify,
    w: WriteIo,
    stats: Arc<Sharded<Stats>>,
    /// No new sends: set when closing begins and when the writer exits.
    closing: AtomicBool,
    /// Closing has begun (the once-only guard of [`Conn::begin_close`]);
    /// separate from `closing`, which the writer sets on its own exit
    /// before its error is reported to `close_conn`.
    close_begun: AtomicBool,
    close_tx: watch::Sender<bool>,
}

/// Who reads a connection (see [`crate::TcpConfig::reader_threads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReaderMode {
    /// A task on the LND's runtime, woken by its poller.
    Runtime,
    /// A thread of its own, in blocking reads.
    Thread,
}

/// The socket as the writer sees it.
enum WriteIo {
    /// Registered with the runtime for reading and writing.
    Runtime(OwnedWriteHalf),
    /// Registered for writability only: a thread of its own reads it, and
    /// the runtime's poller must not wake up for every arriving segment.
    /// The socket is in blocking mode (for that thread); writes stay
    /// non-blocking with `MSG_DONTWAIT`.
    Thread(AsyncFd<std::net::TcpStream>),
}

impl WriteIo {
    fn fd(&self) -> RawFd {
        match self {
            WriteIo::Runtime(w) => w.as_ref().as_raw_fd(),
            WriteIo::Thread(a) => a.as_raw_fd(),
        }
    }

    /// Run the non-blocking operation `f` if the socket may be ready for
    /// `interest`; `WouldBlock` clears that readiness until the poller
    /// sees it again.
    fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        match self {
            WriteIo::Runtime(w) => w.as_ref().try_io(interest, f),
            WriteIo::Thread(a) => a.try_io(interest, |_| f()),
        }
    }

    /// Wait until the socket may be ready for `interest`.
    async fn ready(&self, interest: Interest) -> std::io::Result<()> {
        match self {
            WriteIo::Runtime(w) => w.as_ref().ready(interest).await.map(drop),
            WriteIo::Thread(a) => a.ready(interest).await.map(drop),
        }
    }

    fn shutdown(&self) {
        let s = match self {
            WriteIo::Runtime(w) => socket2::SockRef::from(w.as_ref()),
            WriteIo::Thread(a) => socket2::SockRef::from(a.get_ref()),
        };
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// The socket as the reader sees it.
pub(crate) enum ReadIo {
    /// Read on the runtime.
    Runtime(OwnedReadHalf),
    /// Read with blocking reads by a thread of its own; the socket's
    /// receive timeout is the socket timeout.
    Thread(std::net::TcpStream),
}

/// A socket half with the signals that stop its task.
pub(crate) struct Half<T> {
    io: T,
    stop: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
}

fn lockq(m: &std::sync::Mutex<TxQ>) -> std::sync::MutexGuard<'_, TxQ> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// The connection over `s`, read as `mode` says (`sock_timeout`: a
    /// thread's receive timeout), and its reader's and writer's halves.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        info: ConnInfo,
        framing: Framing,
        s: TcpStream,
        mode: ReaderMode,
        sock_timeout: Duration,
        stop: watch::Receiver<bool>,
        checksum: bool,
        zerocopy_min: Option<usize>,
        stats: Arc<Sharded<Stats>>,
    ) -> std::io::Result<(Arc<Conn>, Half<ReadIo>, Half<()>)> {
        let (close_tx, close_rx) = watch::channel(false);
        // Before the first send can happen.
        let zc_on = zerocopy_min.is_some()
            && zc::enable(s.as_raw_fd())
                .inspect_err(
                    |e| tracing::debug!(target: "net", error = %e, "SO_ZEROCOPY unavailable"),
                )
                .is_ok();
        let (r, w) = match mode {
            ReaderMode::Runtime => {
                let (r, w) = s.into_split();
                (ReadIo::Runtime(r), WriteIo::Runtime(w))
            }
            ReaderMode::Thread => {
                // Off the runtime's poller, then back on for writability only.
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(sock_timeout.max(Duration::from_millis(1))))?;
                let r = s.try_clone()?;
                let w = zc::register_writable(s)?;
                (ReadIo::Thread(r), WriteIo::Thread(w))
            }
        };
        let c = Arc::new(Conn {
            info,
            framing,
            checksum,
            zerocopy_min,
            zc_on: AtomicBool::new(zc_on),
            q: std::sync::Mutex::new(TxQ {
                queue: VecDeque::new(),
                owner: Owner::None,
                partial: None,
                error: None,
            }),
            wake: tokio::sync::Notify::new(),
            w,
            stats,
            closing: AtomicBool::new(false),
            close_begun: AtomicBool::new(false),
            close_tx,
        });
        Ok((
            c,
            Half {
                io: r,
                stop: stop.clone(),
                close: close_rx.clone(),
            },
            Half {
                io: (),
                stop,
                close: close_rx,
            },
        ))
    }
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
    /// Mark closing and stop both tasks; true the first time (whether or
    /// not the writer has already exited).
    pub(crate) fn begin_close(&self) -> bool {
        if self.close_begun.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.closing.store(true, Ordering::Release);
        let _ = self.close_tx.send(true);
        self.wake.notify_one();
        // Wakes a reader waiting for the next message with end-of-file: the
        // idle wait is a bare read, with no close signal to select on.
        self.w.shutdown();
        true
    }

    fn wants_zc(&self, o: &Out) -> bool {
        match (o, self.zerocopy_min) {
            (Out::Msg(tx), Some(m)) => tx.payload_len() >= m && self.zc_on.load(Ordering::Relaxed),
            _ => false,
        }
    }

    /// Send: written at once on the caller's thread when the socket is
    /// idle and takes it all (no task wake-up on the latency path), else
    /// queued for the writer task. Gives the item back if the connection
    /// is closing.
    #[allow(clippy::result_large_err)]
    pub(crate) fn send(&self, o: Out) -> Result<(), Out> {
        let mut g = lockq(&self.q);
        if self.is_closing() {
            return Err(o);
        }
        if g.owner != Owner::None || !g.queue.is_empty() || self.wants_zc(&o) {
            g.queue.push_back(o);
            if g.owner == Owner::None {
                g.owner = Owner::Task;
                self.wake.notify_one();
            }
            return Ok(());
        }
        g.owner = Owner::Inline;
        drop(g);
        let Some(mut f) = self.frame(o, false) else {
            self.release_inline();
            return Ok(());
        };
        match self.write_some(&mut f) {
            Ok(true) => {
                self.release_inline();
                self.finish(&mut f);
            }
            Ok(false) => {
                let mut g = lockq(&self.q);
                g.partial = Some(f);
                g.owner = Owner::Task;
                self.wake.notify_one();
            }
            Err(e) => {
                drop(f);
                let mut g = lockq(&self.q);
                g.error = Some(e.into());
                g.owner = Owner::Task;
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    fn release_inline(&self) {
        let mut g = lockq(&self.q);
        if g.queue.is_empty() {
            g.owner = Owner::None;
        } else {
            g.owner = Owner::Task;
            self.wake.notify_one();
        }
    }

    /// Build the headers of `o`; `None` when the message cannot go on
    /// this connection (it is completed with an error here).
    fn frame(&self, o: Out, zc: bool) -> Option<Frame> {
        let mut f = Frame {
            hdr: [0u8; KSOCK_HDR_SIZE + lnet::wire::HDR_NID16_SIZE],
            hlen: KSOCK_HDR_SIZE,
            tx: None,
            done: 0,
            zc,
            zc_calls: 0,
        };
        let tx = match o {
            Out::Noop(h) => {
                f.hdr[..KSOCK_HDR_SIZE].copy_from_slice(&h.encode(ByteOrder::NATIVE));
                return Some(f);
            }
            Out::Msg(tx) => tx,
        };
        let fr = self.framing;
        let lnet_len = fr.lnet_hdr_size();
        let body = &mut f.hdr[KSOCK_HDR_SIZE..KSOCK_HDR_SIZE + lnet_len];
        if fr.version >= crate::proto::PROTO_V4 {
            body.copy_from_slice(&tx.header().encode_nid16(ByteOrder::NATIVE));
        } else {
            match tx.header().encode_nid4(ByteOrder::NATIVE) {
                Ok(b) => body.copy_from_slice(&b),
                Err(_) => {
                    tx.complete(Err(Error::Invalid("large NIDs need ksock protocol v4")));
                    return None;
                }
            }
        }
        f.hlen = KSOCK_HDR_SIZE + lnet_len;
        let mut kh = KsockHdr {
            msg_type: KSOCK_MSG_LNET,
            csum: 0,
            zc_cookies: [0, 0],
        };
        if self.checksum && fr.version == PROTO_V2 {
            let mut c = Csum::default();
            c.update(&kh.encode(ByteOrder::NATIVE));
            c.update(&f.hdr[KSOCK_HDR_SIZE..f.hlen]);
            tx.with_payload(|p| p.iter().for_each(|s| c.update(s)));
            kh.csum = c.finish();
        }
        f.hdr[..KSOCK_HDR_SIZE].copy_from_slice(&kh.encode(ByteOrder::NATIVE));
        f.tx = Some(tx);
        Some(f)
    }

    /// Write as much of `f` as the socket takes now; true when complete.
    fn write_some(&self, f: &mut Frame) -> std::io::Result<bool> {
        let total = f.total();
        let fd = self.w.fd();
        while f.done < total {
            let hdr = &f.hdr[..f.hlen];
            let done = f.done;
            let zc = f.zc;
            let mut calls = 0;
            let r = match &f.tx {
                Some(tx) => tx.with_payload(|p| {
                    with_iov(hdr, p, done, |v| {
                        let r = self.w.try_io(Interest::WRITABLE, || zc::send(fd, v, zc));
                        if zc && r.is_ok() {
                            calls += 1;
                        }
                        r
                    })
                }),
                None => self.w.try_io(Interest::WRITABLE, || {
                    zc::send(fd, &[IoSlice::new(&hdr[done..])], false)
                }),
            };
            f.zc_calls += calls;
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => f.done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Count a fully written frame and complete its message.
    fn finish(&self, f: &mut Frame) {
        match f.tx.take() {
            Some(tx) => {
                let st = self.stats.local();
                Stats::inc(&st.tx_msgs);
                Stats::add(&st.tx_bytes, tx.payload_len() as u64);
                tx.complete(Ok(()));
            }
            None => Stats::inc(&self.stats.local().tx_noops),
        }
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

/// Slices a frame is written from without a heap allocation.
const IOV_STACK: usize = 8;

/// Call `f` with the frame's slices (header, then payload) from byte
/// `done` on; on the stack for frames of fewer than `IOV_STACK` slices (this
/// runs per message).
fn with_iov<R>(
    hdr: &[u8],
    p: &[IoSlice<'_>],
    done: usize,
    f: impl FnOnce(&[IoSlice<'_>]) -> R,
) -> R {
    if p.len() < IOV_STACK {
        let mut a = [IoSlice::new(&[]); IOV_STACK];
        a[0] = IoSlice::new(hdr);
        for (d, s) in a[1..].iter_mut().zip(p) {
            *d = IoSlice::new(s);
        }
        let mut v = &mut a[..p.len() + 1];
        IoSlice::advance_slices(&mut v, done);
        f(v)
    } else {
        let mut a: Vec<IoSlice<'_>> = std::iter::once(hdr)
            .chain(p.iter().map(|s| &**s))
            .map(IoSlice::new)
            .collect();
        let mut v = &mut a[..];
        IoSlice::advance_slices(&mut v, done);
        f(v)
    }
}

struct ZcPending {
    last_seq: u32,
    tx: TxMsg,
}

/// The writer task: whenever it owns the socket, write what is queued.
pub(crate) async fn writer(sh: &Arc<Shared>, c: &Arc<Conn>, half: Half<()>) -> Result<(), Reject> {
    let mut zc_next = 0u32;
    let mut pending: VecDeque<ZcPending> = VecDeque::new();
    let r = writer_loop(sh, c, half, &mut zc_next, &mut pending).await;
    // Whatever is still queued fails; so do messages awaiting zero-copy
    // completion (their pages are pinned by the kernel, not freed).
    c.closing.store(true, Ordering::Release);
    let (q, partial) = {
        let mut g = lockq(&c.q);
        (std::mem::take(&mut g.queue), g.partial.take())
    };
    let err = || Err(Error::Network("connection closed".into()));
    for o in q {
        if let Out::Msg(tx) = o {
            tx.complete(err());
        }
    }
    if let Some(tx) = partial.and_then(|f| f.tx) {
        tx.complete(err());
    }
    for p in pending {
        p.tx.complete(err());
    }
    r
}

fn reap_zc(c: &Conn, pending: &mut VecDeque<ZcPending>) -> Result<(), Reject> {
    let fd = c.w.fd();
    let done = match c.w.try_io(Interest::ERROR, || zc::completions(fd)) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for d in done {
        if d.copied {
            Stats::inc(&c.stats.local().zc_copied);
        }
        // TCP acknowledges in order, so completions arrive in order.
        while pending
            .front()
            .is_some_and(|p| p.last_seq.wrapping_sub(d.lo) <= d.hi.wrapping_sub(d.lo))
        {
            if let Some(p) = pending.pop_front() {
                p.tx.complete(Ok(()));
            }
        }
    }
    Ok(())
}

async fn writer_loop(
    sh: &Arc<Shared>,
    c: &Arc<Conn>,
    half: Half<()>,
    zc_next: &mut u32,
    pending: &mut VecDeque<ZcPending>,
) -> Result<(), Reject> {
    let mut stop = half.stop.clone();
    let mut close = half.close.clone();
    let t = sh.cfg.sock_timeout;
    loop {
        tokio::select! {
            _ = c.wake.notified() => {}
            _ = stopped(&mut stop, &mut close) => return Ok(()),
            r = c.w.ready(Interest::ERROR), if !pending.is_empty() => {
                r?;
                reap_zc(c, pending)?;
                continue;
            }
        }
        loop {
            let mut f = {
                let mut g = lockq(&c.q);
                if g.owner != Owner::Task {
                    break;
                }
                if let Some(e) = g.error.take() {
                    return Err(e);
                }
                if let Some(f) = g.partial.take() {
                    f
                } else if let Some(o) = g.queue.pop_front() {
                    let zc = c.wants_zc(&o);
                    drop(g);
                    match c.frame(o, zc) {
                        Some(f) => f,
                        None => continue,
                    }
                } else {
                    g.owner = Owner::None;
                    break;
                }
            };
            while !c.write_some(&mut f)? {
                tokio::select! {
                    r = tokio::time::timeout(t, c.w.ready(Interest::WRITABLE)) => match r {
                        Ok(r) => r?,
                        Err(_) => return Err(Reject::Timeout),
                    },
                    _ = stopped(&mut stop, &mut close) => return Err(Reject::Shutdown),
                    r = c.w.ready(Interest::ERROR), if !pending.is_empty() => {
                        r?;
                        reap_zc(c, pending)?;
                    }
                }
            }
            if f.zc && f.zc_calls > 0 {
                Stats::inc(&c.stats.local().zc_sends);
                Stats::inc(&c.stats.local().tx_msgs);
                *zc_next = zc_next.wrapping_add(f.zc_calls);
                if let Some(tx) = f.tx.take() {
                    Stats::add(&c.stats.local().tx_bytes, tx.payload_len() as u64);
                    pending.push_back(ZcPending {
                        last_seq: zc_next.wrapping_sub(1),
                        tx,
                    });
                }
            } else {
                c.finish(&mut f);
            }
        }
    }
}

/// One blocking read by a connection's own thread: at least one byte, or
/// 0 at end-of-file. The socket's receive timeout (the socket timeout)
/// ends a wait inside a message; between messages (`idle`) the thread
/// keeps waiting, as the runtime's reader does (keepalives and the peer
/// timeout judge an idle peer). Closing shuts the socket down, which ends
/// the read.
fn read_blocking(
    c: &Conn,
    idle: bool,
    mut f: impl FnMut() -> std::io::Result<usize>,
) -> Result<usize, Reject> {
    loop {
        match f() {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if c.is_closing() {
                    return Err(Reject::Shutdown);
                }
                if !idle {
                    return Err(Reject::Timeout);
                }
            }
            Err(e) => return Err(e.into()),
        }
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
    half: Half<ReadIo>,
    scratch: Vec<u8>,
    /// Read-ahead: one read takes the ksock header, the LNet header and a
    /// small payload (often the next message too) instead of one syscall
    /// each. Large payloads bypass it and land straight in the MD.
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
}

/// Read-ahead buffer size.
const RBUF: usize = 16 * 1024;
/// Payload remainders below this are read through the read-ahead buffer.
const RBUF_SMALL: usize = 4 * 1024;

/// The reader task: until error or close, receive messages.
pub(crate) async fn reader(
    sh: &Arc<Shared>,
    peer: &Arc<Peer>,
    c: &Arc<Conn>,
    half: Half<ReadIo>,
) -> Result<(), Reject> {
    let mut r = Reader {
        sh,
        peer,
        c,
        half,
        scratch: Vec::new(),
        rbuf: vec![0u8; RBUF].into_boxed_slice(),
        rpos: 0,
        rlen: 0,
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

    /// Refill the (empty) read-ahead buffer with what the socket has, at
    /// least one byte. `idle`: waiting forever for it is allowed.
    ///
    /// Through tokio's `AsyncRead`: a short read tells it the socket is
    /// drained, so the next refill waits for readiness at once instead of
    /// trying a read that would only say `EAGAIN` (one syscall less per
    /// message on a ping-pong).
    async fn refill(&mut self, idle: bool) -> Result<(), Reject> {
        self.rpos = 0;
        self.rlen = 0;
        let t = self.sh.cfg.sock_timeout;
        let Half { io, stop, close } = &mut self.half;
        let n = match io {
            ReadIo::Thread(s) => read_blocking(self.c, idle, || s.read(&mut self.rbuf[..]))?,
            // Between messages: a bare read (no close signal or timer to
            // set up per message); closing the connection shuts the socket
            // down, which ends this read with end-of-file.
            ReadIo::Runtime(io) if idle => io.read(&mut self.rbuf[..]).await?,
            ReadIo::Runtime(io) => tokio::select! {
                biased;
                r = io.read(&mut self.rbuf[..]) => r?,
                _ = tokio::time::sleep(t) => return Err(Reject::Timeout),
                _ = stopped(stop, close) => return Err(Reject::Shutdown),
            },
        };
        if n == 0 {
            if idle && self.c.is_closing() {
                return Err(Reject::Shutdown);
            }
            return Err(if idle { Reject::Eof } else { Reject::Truncated });
        }
        self.rlen = n;
        Ok(())
    }

    /// Fill `b` from the read-ahead if it holds that much (else take
    /// nothing and return false).
    fn take_exact(&mut self, b: &mut [u8]) -> bool {
        let end = self.rpos + b.len();
        if end > self.rlen {
            return false;
        }
        b.copy_from_slice(&self.rbuf[self.rpos..end]);
        self.rpos = end;
        true
    }

    /// Take up to `b.len()` buffered bytes; returns how many.
    fn take_buffered(&mut self, b: &mut [u8]) -> usize {
        let k = (self.rlen - self.rpos).min(b.len());
        b[..k].copy_from_slice(&self.rbuf[self.rpos..self.rpos + k]);
        self.rpos += k;
        k
    }

    /// Fill `b`; `idle` allows waiting forever for the first byte (a
    /// message boundary), after which the socket timeout applies.
    async fn fill(&mut self, b: &mut [u8], idle: bool) -> Result<(), Reject> {
        let mut done = self.take_buffered(b);
        let t = self.sh.cfg.sock_timeout;
        while done < b.len() {
            if b.len() - done < RBUF {
                self.refill(idle && done == 0).await?;
                done += self.take_buffered(&mut b[done..]);
                continue;
            }
            let r = match &mut self.half.io {
                ReadIo::Runtime(io) => io.try_read(&mut b[done..]),
                ReadIo::Thread(s) => Ok(read_blocking(self.c, idle && done == 0, || {
                    s.read(&mut b[done..])
                })?),
            };
            match r {
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
        // A thread's reads block instead of saying `WouldBlock`.
        let ReadIo::Runtime(io) = &self.half.io else {
            return Ok(());
        };
        let mut stop = self.half.stop.clone();
        let mut close = self.half.close.clone();
        let deadline = if forever {
            None
        } else {
            Some(tokio::time::Instant::now() + t)
        };
        tokio::select! {
            r = io.readable() => r.map_err(Reject::from),
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

    /// Read `sink.mlength()` bytes into the sink: what the read-ahead
    /// already holds, then straight from the socket into the MD's memory
    /// (small remainders through the read-ahead buffer).
    async fn recv_to_sink(&mut self, sink: &mut Sink) -> Result<(), Reject> {
        let want = sink.mlength();
        let mut done = 0;
        let t = self.sh.cfg.sock_timeout;
        while done < want {
            if self.rpos < self.rlen {
                let k = (self.rlen - self.rpos).min(want - done);
                sink.write_at(done, &self.rbuf[self.rpos..self.rpos + k]);
                self.rpos += k;
                done += k;
                continue;
            }
            if want - done < RBUF_SMALL {
                self.refill(false).await?;
                continue;
            }
            let r = match &mut self.half.io {
                ReadIo::Runtime(io) => sink.with_iov_mut(|iov| {
                    let mut v: &mut [IoSliceMut<'_>] = iov;
                    IoSliceMut::advance_slices(&mut v, done);
                    io.try_read_vectored(v)
                }),
                ReadIo::Thread(s) => Ok(read_blocking(self.c, false, || {
                    sink.with_iov_mut(|iov| {
                        let mut v: &mut [IoSliceMut<'_>] = iov;
                        IoSliceMut::advance_slices(&mut v, done);
                        s.read_vectored(v)
                    })
                })?),
            };
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
        // Small messages arrive whole in the read-ahead: take their headers
        // from it without going through the async fill (per message). At a
        // boundary the read-ahead is usually empty: refill it directly.
        if self.rpos == self.rlen {
            self.refill(true).await?;
        }
        if !self.take_exact(&mut kb) {
            self.fill(&mut kb, true).await?;
        }
        self.alive();
        let kh = KsockHdr::decode(&kb, f.peer_order);
        if kh.zc_cookies[1] != 0 && kh.zc_cookies[1] != KEEPALIVE_PING {
            // We never ask for zero-copy ACKs.
            return Err(Reject::BadZcAck(kh.zc_cookies[1]));
        }
        match kh.msg_type {
            KSOCK_MSG_NOOP => {
                Stats::inc(&self.sh.stats.local().rx_noops);
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
        if !self.take_exact(&mut hb[..hl]) {
            self.fill(&mut hb[..hl], false).await?;
        }
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
        let st = self.sh.stats.local();
        Stats::inc(&st.rx_msgs);
        Stats::add(&st.rx_bytes, u64::from(plen));
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
        // A PUT whose whole payload is already in the read-ahead (and
        // unchecksummed: socklnd checks only untruncated payloads, which
        // the match decides) is copied from there under the match, with no
        // sink: one lookup of its MD instead of two.
        let avail = self.rlen - self.rpos;
        let mut consumed = false;
        let mut d = if csum.is_none()
            && plen > 0
            && plen as usize <= avail
            && matches!(hdr.body, MsgBody::Put { .. })
        {
            let payload = &self.rbuf[self.rpos..self.rpos + plen as usize];
            let d = self.sh.ni.parse_inline(&hdr, self.peer.nid, |rel, dst| {
                let src = rel
                    .checked_add(dst.len())
                    .and_then(|end| payload.get(rel..end))
                    .ok_or(Reject::InlineRange)?;
                dst.copy_from_slice(src);
                Ok::<(), Reject>(())
            });
            match d {
                Ok(Delivery::Done) => {
                    self.rpos += plen as usize;
                    Stats::inc(&st.rx_inline);
                    consumed = true;
                    Delivery::Done
                }
                // Not consumed: the payload stays in the read-ahead for
                // the usual handling below.
                Ok(other) => other,
                Err(e) => return Err(e),
            }
        } else {
            self.sh.ni.parse(&hdr, self.peer.nid)
        };
        loop {
            match d {
                Delivery::Receive(mut sink) => {
                    let r = self.recv_to_sink(&mut sink).await;
                    if let Err(e) = r {
                        sink.complete(Err(Error::Network(format!("receive failed: {e}"))));
                        return Err(e);
                    }
                    let m = sink.mlength();
                    let rest = plen as usize - m.min(plen as usize);
                    if rest > 0
                        && let Err(e) = self.skip(rest).await
                    {
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
                    if plen > 0 && !consumed {
                        self.skip(plen as usize).await?;
                    }
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
        if kh.zc_cookies[0] != 0 {
            // The sender waits for our ZC-ACK before reusing its pages.
            let _ = self.c.send(Out::Noop(KsockHdr::zc_ack(kh.zc_cookies[0])));
        }
        Ok(())
    }
}
