//! The ping buffer (`struct lnet_ping_info`): what a node answers to a GET on
//! the reserved portal with the ping match bits.
//!
//! Layout: magic `'ping'`, features, pid, `nnis`, then `nnis` entries of
//! `{ nid: u64, status: u32, msg_size: u32 }`. With
//! [`PING_FEAT_LARGE_ADDR`], entry 0's `msg_size` is the total size and
//! `{ status: u32, struct lnet_nid }` entries for large NIDs follow, each
//! rounded up to 4 bytes. Entry 0 is always `0@lo`, its status the ping
//! buffer's sequence number.
//!
//! ```
//! use lnet::wire::{ByteOrder, NiStatus, PingInfo, LNET_NI_STATUS_UP, PING_FEAT_NI_STATUS};
//! use lnet::{Nid, LNET_PID_LUSTRE};
//! let p = PingInfo {
//!     features: PING_FEAT_NI_STATUS,
//!     pid: LNET_PID_LUSTRE,
//!     nis: vec![
//!         NiStatus { nid: Nid::LO, status: 1, msg_size: 0 },
//!         NiStatus { nid: "10.0.0.1@tcp".parse().unwrap(), status: LNET_NI_STATUS_UP, msg_size: 0 },
//!     ],
//!     large_nis: vec![
//!         NiStatus { nid: "fe80::1@tcp".parse().unwrap(), status: LNET_NI_STATUS_UP, msg_size: 0 },
//!     ],
//! };
//! let b = p.encode(ByteOrder::NATIVE);
//! let q = PingInfo::decode(&b).unwrap();
//! assert_eq!(q.large_nis, p.large_nis);
//! ```

use crate::LNET_MTU;
use crate::error::WireError;
use crate::nid::{Nid, Pid};
use crate::wire::{ByteOrder, Reader, Writer};

/// `'ping'`.
pub const LNET_PROTO_PING_MAGIC: u32 = 0x7069_6e67;
/// NI is up.
pub const LNET_NI_STATUS_UP: u32 = 0x15aa_c0de;
/// NI is down.
pub const LNET_NI_STATUS_DOWN: u32 = 0xdead_face;
/// Status unknown.
pub const LNET_NI_STATUS_INVALID: u32 = 0;

/// Just a ping.
pub const PING_FEAT_BASE: u32 = 1 << 0;
/// NI status is reported.
pub const PING_FEAT_NI_STATUS: u32 = 1 << 1;
/// Routing is disabled on this node.
pub const PING_FEAT_RTE_DISABLED: u32 = 1 << 2;
/// Multi-rail aware.
pub const PING_FEAT_MULTI_RAIL: u32 = 1 << 3;
/// Supports discovery.
pub const PING_FEAT_DISCOVERY: u32 = 1 << 4;
/// Large-address NIDs follow the 8-byte ones.
pub const PING_FEAT_LARGE_ADDR: u32 = 1 << 5;
/// The first large address is the primary NID.
pub const PING_FEAT_PRIMARY_LARGE: u32 = 1 << 6;

const HDR_SIZE: usize = 16;
const NI4_SIZE: usize = 16;

/// One interface in a ping buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NiStatus {
    /// The interface's NID.
    pub nid: Nid,
    /// `LNET_NI_STATUS_*` (for entry 0: the sequence number).
    pub status: u32,
    /// `ns_msg_size` of 8-byte entries (entry 0 with large addresses: the
    /// total size, filled in by [`PingInfo::encode`]); unused for large ones.
    pub msg_size: u32,
}

/// A decoded ping buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingInfo {
    /// `PING_FEAT_*` bits.
    pub features: u32,
    /// The node's pid.
    pub pid: Pid,
    /// Interfaces with 4-byte addresses (entry 0 is `0@lo`).
    pub nis: Vec<NiStatus>,
    /// Interfaces with large addresses.
    pub large_nis: Vec<NiStatus>,
}

fn large_entry_size(nid: &Nid) -> usize {
    // status + struct lnet_nid (8 + address bytes - 4), rounded up to 4.
    (4 + 4 + nid.addr_bytes().len()).next_multiple_of(4)
}

impl PingInfo {
    /// The large entries that go on the wire (not the wildcard).
    fn wire_large(&self) -> impl Iterator<Item = &NiStatus> {
        self.large_nis.iter().filter(|n| !n.nid.is_any())
    }

    /// Bytes [`PingInfo::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        let large: usize = self.wire_large().map(|n| large_entry_size(&n.nid)).sum();
        let nis = if large > 0 {
            self.nis.len().max(1)
        } else {
            self.nis.len()
        };
        HDR_SIZE + NI4_SIZE * nis + large
    }

    /// Encode in `order` (large entries naming the wildcard NID are left
    /// out: they name no interface). With large NIDs, sets
    /// [`PING_FEAT_LARGE_ADDR`] and entry 0's size field (adding a `0@lo`
    /// entry first if `nis` is empty).
    pub fn encode(&self, order: ByteOrder) -> Vec<u8> {
        let mut nis = self.nis.clone();
        let has_large = self.wire_large().next().is_some();
        let mut features = self.features & !PING_FEAT_LARGE_ADDR;
        let total = self.encoded_len();
        if has_large {
            features |= PING_FEAT_LARGE_ADDR;
            if nis.is_empty() {
                nis.push(NiStatus {
                    nid: Nid::LO,
                    status: 0,
                    msg_size: 0,
                });
            }
            nis[0].msg_size = total as u32;
        }
        let mut b = vec![0u8; total];
        let mut w = Writer::new(&mut b, order);
        w.u32(LNET_PROTO_PING_MAGIC);
        w.u32(features);
        w.u32(self.pid);
        w.u32(nis.len() as u32);
        for ni in &nis {
            w.u64(ni.nid.to_nid4().unwrap_or(u64::MAX));
            w.u32(ni.status);
            w.u32(ni.msg_size);
        }
        for ni in self.wire_large() {
            w.u32(ni.status);
            let n = ni.nid.to_wire16();
            let len = 8 + ni.nid.addr_bytes().len() - 4;
            w.bytes(&n[..len]);
            w.zeros(large_entry_size(&ni.nid) - 4 - len);
        }
        debug_assert_eq!(w.pos(), total);
        b
    }

    /// Decode a ping buffer in either byte order (found from the magic).
    /// Every count and size is checked against `buf` before it is used.
    pub fn decode(buf: &[u8]) -> Result<PingInfo, WireError> {
        if buf.len() < HDR_SIZE {
            return Err(WireError::Short {
                need: HDR_SIZE,
                have: buf.len(),
            });
        }
        let magic = [buf[0], buf[1], buf[2], buf[3]];
        let order = ByteOrder::detect(magic, LNET_PROTO_PING_MAGIC)
            .ok_or(WireError::BadMagic(u32::from_le_bytes(magic)))?;
        if buf.len() > LNET_MTU as usize {
            return Err(WireError::TooLong {
                len: buf.len() as u64,
                limit: LNET_MTU.into(),
            });
        }
        let mut r = Reader::new(buf, order);
        r.u32()?;
        let features = r.u32()?;
        let pid = r.u32()?;
        let nnis = r.u32()? as usize;
        let room = r.remaining() / NI4_SIZE;
        if nnis > room {
            return Err(WireError::Short {
                need: HDR_SIZE.saturating_add(nnis.saturating_mul(NI4_SIZE)),
                have: buf.len(),
            });
        }
        let mut nis = Vec::with_capacity(nnis);
        for _ in 0..nnis {
            nis.push(NiStatus {
                nid: Nid::try_from_nid4(r.u64()?)?,
                status: r.u32()?,
                msg_size: r.u32()?,
            });
        }
        let mut large_nis = Vec::new();
        if features & PING_FEAT_LARGE_ADDR != 0 {
            let first = nis
                .first()
                .ok_or(WireError::Inconsistent("large addresses without entry 0"))?;
            let total = (first.msg_size & !3) as usize;
            if total > buf.len() {
                return Err(WireError::Short {
                    need: total,
                    have: buf.len(),
                });
            }
            if total < r.pos() {
                return Err(WireError::Inconsistent(
                    "ping size smaller than its entries",
                ));
            }
            let mut lr = Reader::new(&buf[..total], order);
            lr.bytes(r.pos())?;
            while lr.remaining() > 0 {
                let status = lr.u32()?;
                let head: [u8; 4] = lr.array()?;
                if head[1] == crate::NetType::ANY.0 {
                    // The wildcard names no interface.
                    return Err(WireError::BadNid(head[1]));
                }
                let addr_len = match head[0] {
                    0 => 4,
                    12 => 16,
                    other => return Err(WireError::BadNid(other)),
                };
                let mut w16 = [0u8; 20];
                w16[..4].copy_from_slice(&head);
                w16[4..4 + addr_len].copy_from_slice(lr.bytes(addr_len)?);
                let nid = Nid::from_wire16(&w16)?;
                let pad = large_entry_size(&nid) - 8 - addr_len;
                lr.bytes(pad)?;
                large_nis.push(NiStatus {
                    nid,
                    status,
                    msg_size: 0,
                });
            }
        }
        Ok(PingInfo {
            features,
            pid,
            nis,
            large_nis,
        })
    }
}
