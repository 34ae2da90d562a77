//! `lnd-rdma`: the o2iblnd-equivalent RDMA transport (InfiniBand and RoCE)
//! over verbs and RDMA CM.
//!
//! * [`wire`]: o2iblnd's protocol as pure functions (always built).
//! * [`plan`]: how a source's fragments are RDMA-written into a sink's
//!   descriptor (always built).
//! * With the `verbs` feature: [`RdmaLnd`], the LND itself, on the
//!   system's libibverbs and librdmacm.
//!
//! # Bindings, and why these
//! Verbs come from `ibverbs-sys` (it links the system's libibverbs). RDMA
//! CM has no maintained Rust binding that shares `ibverbs-sys`'s types, so
//! `build.rs` generates a minimal one from the system's
//! `<rdma/rdma_cma.h>` with bindgen (functions `rdma_*` for ids, events,
//! connect/accept/reject and QP creation), reusing `ibverbs-sys`'s
//! `ibv_context`, `ibv_pd`, `ibv_qp` and friends; it lives in `cma_sys`.
//! The safe `ibverbs` crate is not used: its `Context` only wraps devices
//! it opened itself, while a CM connection's QP must be created on the
//! context librdmacm opened (see `verbs`, the crate's one unsafe module).
//! `rdma-core-sys` is not used: it binds rdma-core r14 and needs a musl
//! cross compiler.
//!
//! # Protocol
//! Kernel o2iblnd's, version 2: CONNREQ/CONNACK with queue depth, max
//! fragments and max message size in the CM private data on port 987; the
//! passive side rejects parameters larger than its own with its values
//! (`MSG_QUEUE_SIZE`, `RDMA_FRAGS`) and the active side retries with them.
//! Messages up to 4 KiB (header, LNet header and payload, so payloads of
//! at most [`wire::IMMEDIATE_MAX`] bytes) go IMMEDIATE; larger PUTs use
//! PUT_REQ → PUT_ACK (sink descriptor) → RDMA WRITE + PUT_DONE; GETs carry
//! the REPLY sink's descriptor in GET_REQ and the target writes the data
//! before GET_DONE. Credits: IMMEDIATE, PUT_REQ and GET_REQ spend a peer
//! credit (requests also a reserved one), the out-of-band replies do not;
//! credits come back in every message's header and in NOOPs once half the
//! queue depth is owed.
//!
//! # Memory
//! Receive buffers (2 × queue depth + 2 per connection) and message slots
//! are registered once per connection; user memory is registered through a
//! bounded cache keyed by the MD's memory identity ([`lnet::MemKey`]), so a
//! registration never outlives the memory it pins; pools registered with
//! `RdmaLnd::register_pool` need nothing per operation. A sink of several
//! fragments (one key per descriptor) lands in a pre-registered bounce
//! buffer and is copied out. No buffer is released before the completion
//! of the work request that uses it.
#![cfg_attr(
    feature = "verbs",
    doc = "\n\nThe LND itself: [`RdmaLnd`], [`RdmaConfig`]."
)]

pub mod plan;
pub mod wire;

#[cfg(feature = "verbs")]
mod cma_sys;
#[cfg(feature = "verbs")]
mod lnd;
#[cfg(feature = "verbs")]
mod verbs;

#[cfg(feature = "verbs")]
pub use lnd::{RdmaConfig, RdmaError, RdmaLnd, RdmaStats, RdmaStatsSnapshot};
#[cfg(feature = "verbs")]
pub use verbs::device_names;

/// The network type this LND serves.
pub const NET_TYPE: lnet::NetType = lnet::NetType::O2IBLND;

/// The RDMA devices of this host that have an IPv4 address in their GID
/// table (RoCE), as (device, address), sorted by device name. Read from
/// sysfs; empty when there is none. `lnet-selftest run --lnd rdma` uses the
/// first two.
///
/// ```
/// for (dev, ip) in lnd_rdma::roce_ipv4_addrs() {
///     println!("{dev}: {ip}");
/// }
/// ```
pub fn roce_ipv4_addrs() -> Vec<(String, std::net::IpAddr)> {
    let mut out = Vec::new();
    let Ok(devs) = std::fs::read_dir("/sys/class/infiniband") else {
        return out;
    };
    let mut names: Vec<String> = devs
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for d in names {
        let Ok(ports) = std::fs::read_dir(format!("/sys/class/infiniband/{d}/ports")) else {
            continue;
        };
        let mut found = None;
        for p in ports.flatten() {
            let Ok(gids) = std::fs::read_dir(p.path().join("gids")) else {
                continue;
            };
            let mut gids: Vec<_> = gids.flatten().map(|g| g.path()).collect();
            gids.sort();
            for g in gids {
                if let Some(ip) = std::fs::read_to_string(&g)
                    .ok()
                    .and_then(|s| mapped_ipv4(s.trim()))
                {
                    found = Some(ip);
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        if let Some(ip) = found {
            out.push((d, std::net::IpAddr::V4(ip)));
        }
    }
    out
}

/// `0000:0000:0000:0000:0000:ffff:0a4d:0001` → 10.77.0.1.
fn mapped_ipv4(gid: &str) -> Option<std::net::Ipv4Addr> {
    let v6: std::net::Ipv6Addr = gid.parse().ok()?;
    v6.to_ipv4_mapped().filter(|ip| !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    #[test]
    fn gid_to_ipv4() {
        assert_eq!(
            super::mapped_ipv4("0000:0000:0000:0000:0000:ffff:0a4d:0001"),
            Some(std::net::Ipv4Addr::new(10, 77, 0, 1))
        );
        assert_eq!(
            super::mapped_ipv4("fe80:0000:0000:0000:1234:56ff:fe78:9abc"),
            None
        );
        assert_eq!(
            super::mapped_ipv4("0000:0000:0000:0000:0000:0000:0000:0000"),
            None
        );
        assert_eq!(super::mapped_ipv4("garbage"), None);
    }
}
