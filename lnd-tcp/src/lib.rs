//! `lnd-tcp`: the socklnd-equivalent TCP transport (not written yet).
//!
//! It will hold the acceptor (port 988, accept modes, acceptor requests v1
//! and v2), the socklnd hello (protocol v2, v3 and v4, version
//! negotiation, incarnations), typed connections (control, bulk in, bulk
//! out; `conns_per_peer`), ksock message framing with keepalive NOOPs, and
//! a data path that reads payloads from the socket straight into the MD
//! the core matched, on tokio and socket2.
//!
//! Until then this crate only names its network type.

/// The network type this LND will serve.
pub const NET_TYPE: lnet::NetType = lnet::NetType::SOCKLND;
