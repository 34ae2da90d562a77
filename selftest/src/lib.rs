//! `lnet-selftest`: LNet's throughput and latency benchmark (the
//! lst-equivalent).
//!
//! * [`wire`]: the selftest RPC messages, byte-compatible with the
//!   kernel's `lnet_selftest`;
//! * [`bulk`]: bulk buffers and lst's data checks;
//! * [`server`]: the brw and ping services any node can embed;
//! * [`client`]: a test's RPC engine (concurrency, loops, latency);
//! * [`run`]: the `lnet-selftest run` command's nodes and report.
//!
//! The `lnet-selftest` binary (`run`, `serve`, `sweep`, `compare`) is
//! built on these.

pub mod bulk;
pub mod client;
pub mod compare;
pub mod console;
pub mod framework;
pub mod plot;
mod rpc;
pub mod run;
pub mod server;
pub mod wire;
