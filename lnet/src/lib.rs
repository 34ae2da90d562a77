//! # lnet: the core of a userspace LNet
//!
//! LNet is the Lustre networking layer: a portals-style message layer
//! (PUT/GET/ACK/REPLY onto match entries and memory descriptors) over
//! pluggable transports (LNDs). This crate is the core: NIDs, the wire
//! formats of kernel LNet, the portals layer, the message lifecycle,
//! credits, counters and the [`Lnd`] boundary. It names no transport;
//! `lnd-loopback`, `lnd-tcp` and `lnd-rdma` implement [`Lnd`].
//!
//! ```
//! use lnet::{Nid, NidRange};
//! let nid: Nid = "10.0.0.1@o2ib1".parse().unwrap();
//! assert_eq!(nid.to_string(), "10.0.0.1@o2ib1");
//! let r: NidRange = "10.0.0.[1-4]@tcp".parse().unwrap();
//! assert_eq!(r.iter().count(), 4);
//! ```

pub mod counters;
pub mod credits;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod lnd;
mod mdtable;
pub mod nid;
pub mod nidrange;
pub mod node;
pub mod pool;
pub mod portals;
pub mod shard;
pub mod spin;
mod sync;
pub mod wire;

pub use counters::{CachePadded, CounterSnapshot, DropReason, MsgCounters, NodeCounterSnapshot};
pub use credits::{CreditSnapshot, Credits};
pub use error::{Error, NidParseError, Result, WireError};
pub use lnd::{
    Deferred, Delivery, Lnd, LndInfo, LndLimits, MemKey, NiContext, NiPin, PeerEvent, SEND_NOW_CAP,
    SendNow, Sink, TxMsg, copy_payload,
};
pub use nid::{
    LNET_PID_ANY, LNET_PID_LUSTRE, LNET_PID_RESERVED, LNET_PID_USERFLAG, Net, NetType, Nid, Pid,
    ProcessId,
};
pub use nidrange::NidRange;
pub use node::{Config, Lnet, LnetBuilder};
pub use pool::{MemPool, PoolBuf, PoolMemory};
pub use portals::event::{Event, EventHandler, EventKind, EventQueue};
pub use portals::matching::{InsPos, MatchCriteria};
pub use portals::md::{Iov, MdBuffer, MdOptions, Segment, Threshold};
pub use portals::{AckReq, Md, MdHandle, MeHandle, Unlink};

/// Largest payload of one message (`LNET_MTU`, 1 MiB).
pub const LNET_MTU: u32 = 1 << 20;
/// Most fragments in one MD (`LNET_MAX_IOV`).
pub const LNET_MAX_IOV: usize = 256;
/// Portals in the table (`MAX_PORTALS`).
pub const MAX_PORTALS: usize = 64;
/// The portal LNet reserves for itself (ping).
pub const LNET_RESERVED_PORTAL: u32 = 0;
/// Match bits of the ping service on the reserved portal.
pub const LNET_PROTO_PING_MATCHBITS: u64 = 0x8000_0000_0000_0000;
