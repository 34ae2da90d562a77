//! Pieces every selftest role shares: match bits, request buffers,
//! replies, waiting for an MD's final event.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use lnet::{
    AckReq, Event, EventHandler, EventKind, EventQueue, InsPos, Lnet, Md, MdOptions, ProcessId,
    Threshold, Unlink,
};
use tracing::debug;

use crate::wire::{RDMA_PORTAL, SRPC_MSG_SIZE, SrpcMsg};

/// Locks, ignoring poisoning (the data stays consistent: counters and
/// queues only).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The next reply or bulk match bits, seeded as the kernel seeds them
/// (seconds since the epoch in the top 16 bits), so ids of a restarted
/// node do not collide with those of its previous life.
pub(crate) fn next_matchbits() -> u64 {
    static ID: OnceLock<AtomicU64> = OnceLock::new();
    ID.get_or_init(|| {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        AtomicU64::new(s << 48)
    })
    .fetch_add(1, Relaxed)
        + 1
}

/// Attach a use-once buffer of one `srpc_msg` on `portal` for a PUT from
/// `from` with match bits `bits` (requests and replies both land so).
pub(crate) fn attach_msg_buffer(
    node: &Lnet,
    portal: u32,
    from: ProcessId,
    bits: u64,
    handler: EventHandler,
) -> lnet::Result<(lnet::MeHandle, lnet::MdHandle)> {
    node.attach(
        portal,
        from,
        bits,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        Md::new(vec![0u8; SRPC_MSG_SIZE])
            .options(MdOptions::OP_PUT)
            .threshold(Threshold::Finite(1))
            .handler(handler),
    )
}

/// The magic the sending side of a bulk writes: `BRW_MAGIC`, or a wrong
/// one while injected errors (`inject`) remain, as the kernel's
/// `brw_inject_errors` does.
pub(crate) fn send_magic(inject: &AtomicU64) -> u64 {
    if inject
        .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        crate::bulk::BRW_MAGIC.wrapping_add(1)
    } else {
        crate::bulk::BRW_MAGIC
    }
}

/// What serves one request: its owner, the node, the service id (the
/// match bits), the request's bytes and who sent it.
pub(crate) type Serve<T> = fn(&Arc<T>, &Arc<Lnet>, u64, Vec<u8>, ProcessId);

/// Posts one use-once request buffer of one `srpc_msg` on `portal` for
/// service `bits`. When a request lands, a fresh buffer is posted first
/// (so the service never runs dry), then `serve` runs; once `owner` is
/// gone, requests are no longer served nor buffers posted.
pub(crate) fn post_request_buffer<T: Send + Sync + 'static>(
    node: &Arc<Lnet>,
    owner: &Arc<T>,
    portal: u32,
    bits: u64,
    serve: Serve<T>,
) -> lnet::Result<()> {
    let (wn, wo) = (Arc::downgrade(node), Arc::downgrade(owner));
    attach_msg_buffer(
        node,
        portal,
        ProcessId::ANY,
        bits,
        EventHandler::callback(move |mut e: Event| {
            if e.kind != EventKind::Put || e.status.is_err() {
                return;
            }
            let (Some(o), Some(n)) = (wo.upgrade(), wn.upgrade()) else {
                return;
            };
            let mut b = e.buffer.take().map(|b| b.into_vec()).unwrap_or_default();
            b.truncate(e.mlength as usize);
            if let Err(err) = post_request_buffer(&n, &o, portal, bits, serve) {
                debug!(%err, "selftest: request buffer not reposted");
            }
            serve(&o, &n, bits, b, e.initiator);
        }),
    )?;
    Ok(())
}

/// PUTs `msg` (no ACK) to `peer`'s reply buffer `rpyid`, in our own byte
/// order as the kernel does (receivers read both).
pub(crate) fn send_reply(
    node: &Lnet,
    peer: ProcessId,
    rpyid: u64,
    msg: SrpcMsg,
) -> lnet::Result<()> {
    let b = msg.encode(cfg!(target_endian = "big"));
    let h = node.md_bind(Md::new(b.to_vec()).threshold(Threshold::Finite(1)))?;
    node.put(h, AckReq::NoAck, peer, RDMA_PORTAL, rpyid, 0, 0)
}

/// The final event of an MD whose events go to `q`, or `None` at
/// `deadline`.
pub(crate) fn wait_final(q: &EventQueue, deadline: Instant) -> Option<Event> {
    loop {
        let e = q.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
        if e.unlinked {
            return Some(e);
        }
    }
}
