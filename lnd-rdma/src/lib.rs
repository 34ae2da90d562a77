//! `lnd-rdma`: the o2iblnd-equivalent RDMA transport.
#![allow(missing_docs)]
pub mod wire;
#[cfg(feature = "verbs")]
pub mod cma_sys;
/// The network type this LND serves.
pub const NET_TYPE: lnet::NetType = lnet::NetType::O2IBLND;
