//! `lnd-rdma`: the o2iblnd-equivalent RDMA transport (not written yet).
//!
//! It will speak o2iblnd's protocol (48-byte message header, CONNREQ /
//! CONNACK parameters in RDMA CM private data, IMMEDIATE, PUT_REQ /
//! PUT_ACK / PUT_DONE, GET_REQ / GET_DONE, NOOP credit returns) over verbs
//! and RDMA CM, behind a cargo feature so that the workspace builds without
//! rdma-core installed. It will be tested on soft-RoCE (rdma_rxe) in a VM.
//!
//! Until then this crate only names its network type.

/// The network type this LND will serve.
pub const NET_TYPE: lnet::NetType = lnet::NetType::O2IBLND;
