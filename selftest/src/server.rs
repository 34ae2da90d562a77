//! The server side of the test services (brw and ping), as the kernel's
//! `lnet_selftest` serves them.
//!
//! Request buffers of one `srpc_msg` each are posted on
//! [`REQUEST_PORTAL`] with the service id as match bits, used once and
//! posted again as each request arrives. A brw **write** request makes the
//! server GET the data from the client's bulk MD (match bits `bulkid` on
//! [`RDMA_PORTAL`]) and check it; a **read** makes it fill its buffer and
//! PUT it there (no ACK). Then the reply is PUT to `rpyid`. Everything
//! runs from event callbacks: no thread of its own.
//!
//! ```
//! use std::sync::Arc;
//! use lnet_selftest::server::Server;
//! let node = Arc::new(lnd_loopback::builder().build().unwrap());
//! let srv = Server::start(&node, Default::default()).unwrap();
//! assert_eq!(srv.stats().rpcs_rcvd, 0);
//! node.shutdown();
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use lnet::pool::MemPool;
use lnet::{AckReq, Event, EventHandler, Lnet, Md, ProcessId, Threshold};
use tracing::{debug, warn};

use crate::bulk::{self, BRW_MAGIC, BRW_POISON, Buf, Check, MAX_BULK};
use crate::rpc;
use crate::wire::{
    Body, LST_BRW_READ, LST_BRW_WRITE, LST_FEAT_BULK_LEN, LST_FEATS_MASK, RDMA_PORTAL, Service,
    SrpcMsg,
};

/// `EINVAL`.
pub const EINVAL: u32 = 22;
/// `EPROTO`.
pub const EPROTO: u32 = 71;
/// `EBADMSG`.
pub const EBADMSG: u32 = 74;
/// `EIO`.
pub const EIO: u32 = 5;

/// Server settings.
#[derive(Clone, Default)]
pub struct ServerConfig {
    /// Request buffers posted per service (0: 256). This bounds the RPCs
    /// served at once; more wait on the lazy portal.
    pub buffers: usize,
    /// Take bulk buffers from this pool (an LND's shared or registered
    /// memory) when it has room.
    pub pool: Option<MemPool>,
}

/// Server counters (`struct srpc_counters` and more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Requests received.
    pub rpcs_rcvd: u64,
    /// Replies sent.
    pub rpcs_sent: u64,
    /// Requests that could not be read (dropped, no reply).
    pub rpcs_dropped: u64,
    /// Requests refused with an error status (bad parameters).
    pub rpcs_refused: u64,
    /// Bulk transfers that failed.
    pub bulk_errors: u64,
    /// Bulk data that failed its check.
    pub brw_errors: u64,
    /// Bytes moved by GET (writes).
    pub bulk_get: u64,
    /// Bytes moved by PUT (reads).
    pub bulk_put: u64,
    /// Pings answered.
    pub pings: u64,
}

#[derive(Default)]
struct Counters {
    rpcs_rcvd: AtomicU64,
    rpcs_sent: AtomicU64,
    rpcs_dropped: AtomicU64,
    rpcs_refused: AtomicU64,
    bulk_errors: AtomicU64,
    brw_errors: AtomicU64,
    bulk_get: AtomicU64,
    bulk_put: AtomicU64,
    pings: AtomicU64,
}

struct Inner {
    node: Weak<Lnet>,
    pool: Option<MemPool>,
    free: Mutex<Vec<Buf>>,
    c: Counters,
    inject: AtomicU64,
}

/// A running test service. Dropping it stops serving requests (bulk
/// already started still gets its reply).
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Posts the request buffers of the brw and ping services on `node`.
    pub fn start(node: &Arc<Lnet>, cfg: ServerConfig) -> lnet::Result<Server> {
        let inner = Arc::new(Inner {
            node: Arc::downgrade(node),
            pool: cfg.pool,
            free: Mutex::new(Vec::new()),
            c: Counters::default(),
            inject: AtomicU64::new(0),
        });
        // Requests beyond the posted buffers wait instead of being dropped.
        node.set_lazy(crate::wire::REQUEST_PORTAL, true)?;
        let n = if cfg.buffers == 0 { 256 } else { cfg.buffers };
        for svc in [Service::Brw, Service::Ping] {
            for _ in 0..n {
                rpc::post_request_buffer(node, &inner, svc.portal(), svc as u64, on_request)?;
            }
        }
        Ok(Server { inner })
    }

    /// The counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.inner.c;
        ServerStats {
            rpcs_rcvd: c.rpcs_rcvd.load(Relaxed),
            rpcs_sent: c.rpcs_sent.load(Relaxed),
            rpcs_dropped: c.rpcs_dropped.load(Relaxed),
            rpcs_refused: c.rpcs_refused.load(Relaxed),
            bulk_errors: c.bulk_errors.load(Relaxed),
            brw_errors: c.brw_errors.load(Relaxed),
            bulk_get: c.bulk_get.load(Relaxed),
            bulk_put: c.bulk_put.load(Relaxed),
            pings: c.pings.load(Relaxed),
        }
    }

    /// Corrupt the data of the next `n` reads this server sends (the
    /// first page gets a wrong magic, as the kernel's `brw_inject_errors`
    /// does): for testing that clients' checks catch it.
    pub fn inject_errors(&self, n: u64) {
        self.inner.inject.store(n, Relaxed);
    }
}

fn on_request(inner: &Arc<Inner>, node: &Arc<Lnet>, bits: u64, buf: Vec<u8>, peer: ProcessId) {
    let Some(svc) = Service::from_id(bits as u32) else {
        return;
    };
    inner.c.rpcs_rcvd.fetch_add(1, Relaxed);
    let decoded = SrpcMsg::decode(&buf);
    let swabbed = SrpcMsg::is_swabbed(&buf);
    let msg = match decoded {
        Ok(m) => m,
        Err(crate::wire::WireError::Version(v)) => {
            // The kernel answers a version mismatch with EPROTO.
            warn!(%peer, v, "selftest request of another version");
            inner.c.rpcs_refused.fetch_add(1, Relaxed);
            let rpyid = u64::from_le_bytes(buf_word(&buf, 24, swabbed));
            let body = match svc {
                Service::Ping => Body::PingReply {
                    status: EPROTO,
                    magic: 0,
                    seq: 0,
                },
                _ => Body::BrwReply { status: EPROTO },
            };
            reply(inner, node, peer, rpyid, SrpcMsg::new(0, body));
            return;
        }
        Err(err) => {
            warn!(%peer, %err, "selftest request dropped");
            inner.c.rpcs_dropped.fetch_add(1, Relaxed);
            return;
        }
    };
    match (svc, msg.body) {
        (Service::Ping, Body::PingReq(p)) => {
            inner.c.pings.fetch_add(1, Relaxed);
            let status = if msg.ses_feats & !LST_FEATS_MASK != 0 {
                EPROTO
            } else {
                0
            };
            let r = SrpcMsg::new(
                msg.ses_feats & LST_FEATS_MASK,
                Body::PingReply {
                    status,
                    magic: p.magic,
                    seq: p.seq,
                },
            );
            reply(inner, node, peer, p.rpyid, r);
        }
        (Service::Brw, Body::BrwReq(b)) => serve_brw(inner, node, peer, msg.ses_feats, b, swabbed),
        (_, body) => {
            warn!(%peer, ty = body.msg_type(), "selftest request of the wrong type");
            inner.c.rpcs_dropped.fetch_add(1, Relaxed);
        }
    }
}

fn buf_word(b: &[u8], at: usize, swabbed: bool) -> [u8; 8] {
    let mut w: [u8; 8] = b
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .unwrap_or_default();
    if swabbed {
        w.reverse();
    }
    w
}

fn refuse(inner: &Arc<Inner>, node: &Lnet, peer: ProcessId, rpyid: u64, feats: u32, st: u32) {
    inner.c.rpcs_refused.fetch_add(1, Relaxed);
    reply(
        inner,
        node,
        peer,
        rpyid,
        SrpcMsg::new(feats, Body::BrwReply { status: st }),
    );
}

fn serve_brw(
    inner: &Arc<Inner>,
    node: &Lnet,
    peer: ProcessId,
    feats: u32,
    req: crate::wire::BrwReq,
    swabbed: bool,
) {
    let check = Check::from_wire(req.flags);
    if (req.rw != LST_BRW_READ && req.rw != LST_BRW_WRITE) || check.is_none() {
        return refuse(inner, node, peer, req.rpyid, feats, EINVAL);
    }
    if feats & !LST_FEATS_MASK != 0 {
        return refuse(inner, node, peer, req.rpyid, LST_FEATS_MASK, EPROTO);
    }
    if feats & LST_FEAT_BULK_LEN == 0 && req.len as usize % bulk::PAGE != 0 {
        return refuse(inner, node, peer, req.rpyid, feats, EINVAL);
    }
    if req.len == 0 || req.len > MAX_BULK {
        return refuse(inner, node, peer, req.rpyid, feats, EINVAL);
    }
    let check = check.unwrap_or(Check::None);
    let len = req.len as usize;
    let mut buf = take_buf(inner, len);
    let write = req.rw == LST_BRW_WRITE;
    if write {
        bulk::fill(buf.as_mut_slice(), 0, check, BRW_POISON);
    } else {
        let magic = rpc::send_magic(&inner.inject);
        let first = bulk::PAGE.min(len);
        bulk::fill(&mut buf.as_mut_slice()[..first], 0, check, magic);
        if len > first {
            bulk::fill(&mut buf.as_mut_slice()[first..], 0, check, BRW_MAGIC);
        }
    }
    let weak = Arc::downgrade(inner);
    let handler = EventHandler::callback(move |mut e: Event| {
        if !e.unlinked {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        let Some(node) = inner.node.upgrade() else {
            return;
        };
        let mut status = 0;
        if let Err(err) = &e.status {
            warn!(%peer, %err, write, "selftest bulk failed");
            inner.c.bulk_errors.fetch_add(1, Relaxed);
            status = EIO;
        } else if write {
            inner.c.bulk_get.fetch_add(u64::from(e.mlength), Relaxed);
        } else {
            inner.c.bulk_put.fetch_add(u64::from(e.mlength), Relaxed);
        }
        let b = e.buffer.take().and_then(Buf::from_md);
        if let Some(b) = &b {
            if status == 0 && write {
                let magic = if swabbed {
                    BRW_MAGIC.swap_bytes()
                } else {
                    BRW_MAGIC
                };
                let short = (e.mlength as usize) < len;
                if short || bulk::check(b.as_slice(), 0, check, magic).is_err() {
                    warn!(%peer, "selftest bulk data from the client is corrupted");
                    inner.c.brw_errors.fetch_add(1, Relaxed);
                    status = EBADMSG;
                }
            }
        }
        if let Some(b) = b {
            give_buf(&inner, b);
        }
        reply(
            &inner,
            &node,
            peer,
            req.rpyid,
            SrpcMsg::new(feats, Body::BrwReply { status }),
        );
    });
    let md = Md::new(buf.into_md())
        .threshold(Threshold::Finite(if write { 2 } else { 1 }))
        .handler(handler);
    match node.md_bind(md) {
        Ok(h) => {
            let r = if write {
                node.get(h, peer, RDMA_PORTAL, req.bulkid, 0)
            } else {
                node.put(h, AckReq::NoAck, peer, RDMA_PORTAL, req.bulkid, 0, 0)
            };
            if let Err(err) = r {
                // The MD's final event replies with EIO.
                debug!(%err, "selftest bulk not started");
                let _ = node.md_unlink(h);
            }
        }
        Err(err) => {
            warn!(%err, "selftest bulk MD not bound");
            inner.c.bulk_errors.fetch_add(1, Relaxed);
            reply(
                inner,
                node,
                peer,
                req.rpyid,
                SrpcMsg::new(feats, Body::BrwReply { status: EIO }),
            );
        }
    }
}

fn take_buf(inner: &Inner, len: usize) -> Buf {
    let mut free = rpc::lock(&inner.free);
    while let Some(mut b) = free.pop() {
        if b.resize(len) {
            return b;
        }
    }
    drop(free);
    Buf::alloc(inner.pool.as_ref(), len)
}

fn give_buf(inner: &Inner, b: Buf) {
    let mut free = rpc::lock(&inner.free);
    // Bounded by the RPCs served at once; keep at most that many.
    if free.len() < 1024 {
        free.push(b);
    }
}

fn reply(inner: &Inner, node: &Lnet, peer: ProcessId, rpyid: u64, msg: SrpcMsg) {
    match rpc::send_reply(node, peer, rpyid, msg) {
        Ok(()) => {
            inner.c.rpcs_sent.fetch_add(1, Relaxed);
        }
        Err(err) => warn!(%peer, %err, "selftest reply not sent"),
    }
}
