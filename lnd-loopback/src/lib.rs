//! Loopback LNDs.
//!
//! * [`LoLnd`]: `lo`, the network of `0@lo`, which every node has. Messages
//!   to ourselves (to `0@lo` or to any of our own NIDs) are delivered in
//!   the sending thread: the core matches the header and the payload moves
//!   with a single copy from the source MD into the destination MD, or
//!   with no copy at all when the source is shared `Bytes` and the
//!   destination MD takes loans.
//! * [`shm::ShmLnd`]: `shm`, processes on one host exchanging messages
//!   through shared-memory rings, with single-copy and loaned zero-copy
//!   bulk.
//!
//! ```
//! use lnet::{AckReq, EventKind, EventQueue, InsPos, Md, MdOptions, ProcessId, Threshold, Unlink};
//! use std::time::Duration;
//!
//! let lnet = lnd_loopback::builder().build().unwrap();
//! let q = EventQueue::new();
//! lnet.attach(4, ProcessId::ANY, 0x42, 0, Unlink::Unlink, InsPos::Tail,
//!     Md::new(vec![0u8; 5]).options(MdOptions::OP_PUT).handler(q.handler())).unwrap();
//! let src = lnet.md_bind(Md::new(b"hello".to_vec())).unwrap();
//! lnet.put(src, AckReq::NoAck, lnet.id(), 4, 0x42, 0, 0).unwrap();
//! let ev = q.recv_timeout(Duration::from_secs(5)).unwrap();
//! assert_eq!(ev.kind, EventKind::Put);
//! assert_eq!(ev.buffer.unwrap().into_vec(), b"hello");
//! ```

pub mod shm;

use std::sync::{Arc, OnceLock};

use lnet::{Delivery, Error, Lnd, LndInfo, LndLimits, NetType, NiContext, Nid, TxMsg};

/// The `lo` LND.
#[derive(Debug, Default)]
pub struct LoLnd {
    ni: OnceLock<NiContext>,
}

impl LoLnd {
    /// A new `lo`.
    pub fn new() -> Self {
        Self::default()
    }
}

fn deliver(ni: &NiContext, tx: TxMsg, d: Delivery) {
    match d {
        Delivery::Receive(mut sink) => {
            lnet::copy_payload(&tx, &mut sink);
            sink.complete(Ok(()));
            tx.complete(Ok(()));
        }
        // A dropped message left us fine: as on a wire, the sender does not
        // learn the receiver dropped it.
        Delivery::Discard(_) | Delivery::Done => tx.complete(Ok(())),
        Delivery::Deferred(d) => {
            let ni = ni.clone();
            d.on_ready(move |d| deliver(&ni, tx, d));
        }
        // Only for LNDs with `reply_inline` (lo is not one): the REPLY is
        // ours to transmit, so deliver it like any message.
        Delivery::Reply(reply) => {
            tx.complete(Ok(()));
            let d = ni.parse(reply.header(), reply.header().src_nid);
            deliver(ni, reply, d);
        }
    }
}

impl Lnd for LoLnd {
    fn net_type(&self) -> NetType {
        NetType::LOLND
    }

    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        self.ni
            .set(ni)
            .map_err(|_| Error::Invalid("lo started twice"))?;
        Ok(LndInfo {
            nid: Nid::LO,
            limits: LndLimits {
                max_payload: lnet::LNET_MTU,
                eager_size: lnet::LNET_MTU,
                credits: 1 << 20,
                peer_credits: 1 << 20,
                reply_inline: false,
                send_now_max: 0,
            },
        })
    }

    fn send(&self, tx: TxMsg) {
        let Some(ni) = self.ni.get() else {
            tx.complete(Err(Error::Shutdown));
            return;
        };
        let d = ni.parse(tx.header(), tx.header().src_nid);
        deliver(ni, tx, d);
    }

    fn shutdown(&self) {}
}

/// An [`lnet::LnetBuilder`] with `lo` in place.
pub fn builder() -> lnet::LnetBuilder {
    lnet::LnetBuilder::new(Arc::new(LoLnd::new()))
}
