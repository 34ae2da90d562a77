//! The LNet message header (`struct lnet_hdr`).
//!
//! Two encodings exist on the wire:
//!
//! * 72 bytes with 8-byte NIDs (`lnet_hdr_nid4`): dest nid, src nid (u64),
//!   dest pid, src pid, type, payload length (u32), then a 40-byte union;
//! * 96 bytes with 20-byte NIDs (`lnet_hdr_nid16`): the same with each NID
//!   as a `struct lnet_nid` (whose fields are big-endian in either case).
//!
//! ```
//! use lnet::wire::{ByteOrder, Header, MsgBody, WireHandle};
//! use lnet::Nid;
//! let h = Header {
//!     dest_nid: "10.0.0.1@tcp".parse().unwrap(),
//!     src_nid: "10.0.0.2@tcp".parse().unwrap(),
//!     dest_pid: 12345,
//!     src_pid: 12345,
//!     payload_length: 4096,
//!     body: MsgBody::Put {
//!         ack_wmd: WireHandle::NONE,
//!         match_bits: 7,
//!         hdr_data: 0,
//!         ptl_index: 4,
//!         offset: 0,
//!     },
//! };
//! let bytes = h.encode_nid4(ByteOrder::NATIVE).unwrap();
//! assert_eq!(Header::decode_nid4(&bytes, ByteOrder::NATIVE).unwrap(), h);
//! ```

use crate::LNET_MTU;
use crate::error::WireError;
use crate::nid::{NID16_WIRE_SIZE, Nid, Pid};
use crate::wire::ByteOrder;

/// Size of the header with 8-byte NIDs.
pub const HDR_NID4_SIZE: usize = 72;
/// Size of the header with 20-byte NIDs.
pub const HDR_NID16_SIZE: usize = 96;
/// Size of the type-specific union.
const UNION_SIZE: usize = 40;

/// Bytes after the two NIDs: pids, type, payload length and the union.
const TAIL_SIZE: usize = 16 + UNION_SIZE;

// Fixed-offset field access. Every offset is a constant and every buffer a
// fixed-size array, so the bounds are checked at compile time.
#[inline(always)]
fn get32<const N: usize>(b: &[u8; N], at: usize, o: ByteOrder) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    match o {
        ByteOrder::Little => u32::from_le_bytes(a),
        ByteOrder::Big => u32::from_be_bytes(a),
    }
}

#[inline(always)]
fn get64<const N: usize>(b: &[u8; N], at: usize, o: ByteOrder) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    match o {
        ByteOrder::Little => u64::from_le_bytes(a),
        ByteOrder::Big => u64::from_be_bytes(a),
    }
}

#[inline(always)]
fn put32<const N: usize>(b: &mut [u8; N], at: usize, v: u32, o: ByteOrder) {
    b[at..at + 4].copy_from_slice(&match o {
        ByteOrder::Little => v.to_le_bytes(),
        ByteOrder::Big => v.to_be_bytes(),
    });
}

#[inline(always)]
fn put64<const N: usize>(b: &mut [u8; N], at: usize, v: u64, o: ByteOrder) {
    b[at..at + 8].copy_from_slice(&match o {
        ByteOrder::Little => v.to_le_bytes(),
        ByteOrder::Big => v.to_be_bytes(),
    });
}

/// The wire handle that opens every union but HELLO's.
#[inline(always)]
fn get_wmd(t: &[u8; TAIL_SIZE], o: ByteOrder) -> WireHandle {
    WireHandle {
        interface_cookie: get64(t, 16, o),
        object_cookie: get64(t, 24, o),
    }
}

#[inline(always)]
fn put_wmd(t: &mut [u8; TAIL_SIZE], h: WireHandle, o: ByteOrder) {
    put64(t, 16, h.interface_cookie, o);
    put64(t, 24, h.object_cookie, o);
}

/// Connection type "any" in a HELLO header's union (`type` field).
pub const HELLO_TYPE_ANY: u32 = 0;

/// A wire handle (`struct lnet_handle_wire`): names an MD on the node that
/// issued it. ACK and REPLY find their MD through it, never by matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WireHandle {
    /// Changes whenever the interface restarts (a new epoch).
    pub interface_cookie: u64,
    /// Names one MD in that epoch; never reused.
    pub object_cookie: u64,
}

impl WireHandle {
    /// "No handle" (`LNET_WIRE_HANDLE_COOKIE_NONE` in both words): a PUT
    /// carrying it wants no ACK.
    pub const NONE: WireHandle = WireHandle {
        interface_cookie: u64::MAX,
        object_cookie: u64::MAX,
    };
    /// True for [`WireHandle::NONE`].
    pub fn is_none(&self) -> bool {
        self.object_cookie == u64::MAX
    }
}

/// LNet message types (`enum lnet_msg_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// Acknowledges a PUT.
    Ack = 0,
    /// Writes into a remote MD.
    Put = 1,
    /// Reads from a remote MD.
    Get = 2,
    /// Carries a GET's data back.
    Reply = 3,
    /// Byte-stream LNDs' hello.
    Hello = 4,
}

impl MsgType {
    /// All types, in wire order.
    pub const ALL: [MsgType; 5] = [
        MsgType::Ack,
        MsgType::Put,
        MsgType::Get,
        MsgType::Reply,
        MsgType::Hello,
    ];
    /// From the wire value.
    pub fn from_u32(v: u32) -> Option<MsgType> {
        MsgType::ALL.get(v as usize).copied()
    }
    /// Index for per-type counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The type-specific part of a header (`union lnet_cmd_hdr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgBody {
    /// ACK of a PUT.
    Ack {
        /// The initiator's MD that asked for the ACK.
        dst_wmd: WireHandle,
        /// Match bits of the PUT.
        match_bits: u64,
        /// Bytes the target accepted.
        mlength: u32,
    },
    /// PUT.
    Put {
        /// Where to send the ACK ([`WireHandle::NONE`]: no ACK).
        ack_wmd: WireHandle,
        /// Match bits.
        match_bits: u64,
        /// 64 bits of out-of-band data for the target's event.
        hdr_data: u64,
        /// Portal index.
        ptl_index: u32,
        /// Offset in the target MD (used when it manages remote offsets).
        offset: u32,
    },
    /// GET.
    Get {
        /// The initiator's MD that receives the REPLY.
        return_wmd: WireHandle,
        /// Match bits.
        match_bits: u64,
        /// Portal index.
        ptl_index: u32,
        /// Offset in the source MD.
        src_offset: u32,
        /// Bytes the initiator can take.
        sink_length: u32,
    },
    /// REPLY to a GET.
    Reply {
        /// The initiator's MD.
        dst_wmd: WireHandle,
    },
    /// HELLO (byte-stream LNDs).
    Hello {
        /// The sender's incarnation.
        incarnation: u64,
        /// Connection type.
        hello_type: u32,
    },
}

impl MsgBody {
    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            MsgBody::Ack { .. } => MsgType::Ack,
            MsgBody::Put { .. } => MsgType::Put,
            MsgBody::Get { .. } => MsgType::Get,
            MsgBody::Reply { .. } => MsgType::Reply,
            MsgBody::Hello { .. } => MsgType::Hello,
        }
    }
}

/// An LNet message header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Final destination NID.
    pub dest_nid: Nid,
    /// Originating NID.
    pub src_nid: Nid,
    /// Destination pid.
    pub dest_pid: Pid,
    /// Source pid.
    pub src_pid: Pid,
    /// Bytes of payload that follow.
    pub payload_length: u32,
    /// Type-specific fields.
    pub body: MsgBody,
}

impl Header {
    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        self.body.msg_type()
    }

    /// True when both NIDs fit the 72-byte form.
    pub fn fits_nid4(&self) -> bool {
        self.dest_nid.is_nid4() && self.src_nid.is_nid4()
    }

    /// The 56 bytes after the NIDs: pids, type, length and the union, at
    /// fixed offsets (one pass, no cursor: this runs per message).
    #[inline(always)]
    fn write_tail(&self, t: &mut [u8; TAIL_SIZE], o: ByteOrder) {
        put32(t, 0, self.dest_pid, o);
        put32(t, 4, self.src_pid, o);
        put32(t, 8, self.msg_type() as u32, o);
        put32(t, 12, self.payload_length, o);
        // The union starts at 16; what a type does not use stays zero.
        match self.body {
            MsgBody::Ack {
                dst_wmd,
                match_bits,
                mlength,
            } => {
                put_wmd(t, dst_wmd, o);
                put64(t, 32, match_bits, o);
                put32(t, 40, mlength, o);
            }
            MsgBody::Put {
                ack_wmd,
                match_bits,
                hdr_data,
                ptl_index,
                offset,
            } => {
                put_wmd(t, ack_wmd, o);
                put64(t, 32, match_bits, o);
                put64(t, 40, hdr_data, o);
                put32(t, 48, ptl_index, o);
                put32(t, 52, offset, o);
            }
            MsgBody::Get {
                return_wmd,
                match_bits,
                ptl_index,
                src_offset,
                sink_length,
            } => {
                put_wmd(t, return_wmd, o);
                put64(t, 32, match_bits, o);
                put32(t, 40, ptl_index, o);
                put32(t, 44, src_offset, o);
                put32(t, 48, sink_length, o);
            }
            MsgBody::Reply { dst_wmd } => put_wmd(t, dst_wmd, o),
            MsgBody::Hello {
                incarnation,
                hello_type,
            } => {
                put64(t, 16, incarnation, o);
                put32(t, 24, hello_type, o);
            }
        }
    }

    /// Encode in the 72-byte form. Fails if a NID needs the large form.
    pub fn encode_nid4(&self, order: ByteOrder) -> Result<[u8; HDR_NID4_SIZE], WireError> {
        // One copy per order, each with its order a constant: every field
        // is then a plain store (or a store and a byte swap).
        match order {
            ByteOrder::Little => self.encode_nid4_in(ByteOrder::Little),
            ByteOrder::Big => self.encode_nid4_in(ByteOrder::Big),
        }
    }

    #[inline(always)]
    fn encode_nid4_in(&self, order: ByteOrder) -> Result<[u8; HDR_NID4_SIZE], WireError> {
        let d = self.dest_nid.to_nid4().ok_or(WireError::Inconsistent(
            "destination NID needs the large header",
        ))?;
        let s = self
            .src_nid
            .to_nid4()
            .ok_or(WireError::Inconsistent("source NID needs the large header"))?;
        let mut b = [0u8; HDR_NID4_SIZE];
        let (nids, tail) = b.split_at_mut(16);
        let nids: &mut [u8; 16] = nids.try_into().expect("16 bytes");
        put64(nids, 0, d, order);
        put64(nids, 8, s, order);
        self.write_tail(tail.try_into().expect("tail size"), order);
        Ok(b)
    }

    /// Encode in the 96-byte form (any NID).
    pub fn encode_nid16(&self, order: ByteOrder) -> [u8; HDR_NID16_SIZE] {
        let mut b = [0u8; HDR_NID16_SIZE];
        b[..NID16_WIRE_SIZE].copy_from_slice(&self.dest_nid.to_wire16());
        b[NID16_WIRE_SIZE..2 * NID16_WIRE_SIZE].copy_from_slice(&self.src_nid.to_wire16());
        let tail = &mut b[2 * NID16_WIRE_SIZE..];
        self.write_tail(tail.try_into().expect("tail size"), order);
        b
    }

    #[inline(always)]
    fn read_tail(
        t: &[u8; TAIL_SIZE],
        o: ByteOrder,
        dest_nid: Nid,
        src_nid: Nid,
    ) -> Result<Header, WireError> {
        let dest_pid = get32(t, 0, o);
        let src_pid = get32(t, 4, o);
        let ty = get32(t, 8, o);
        let payload_length = get32(t, 12, o);
        let mtype = MsgType::from_u32(ty).ok_or(WireError::UnknownType(ty))?;
        if payload_length > LNET_MTU {
            return Err(WireError::TooLong {
                len: payload_length.into(),
                limit: LNET_MTU.into(),
            });
        }
        let body = match mtype {
            MsgType::Ack => MsgBody::Ack {
                dst_wmd: get_wmd(t, o),
                match_bits: get64(t, 32, o),
                mlength: get32(t, 40, o),
            },
            MsgType::Put => MsgBody::Put {
                ack_wmd: get_wmd(t, o),
                match_bits: get64(t, 32, o),
                hdr_data: get64(t, 40, o),
                ptl_index: get32(t, 48, o),
                offset: get32(t, 52, o),
            },
            MsgType::Get => MsgBody::Get {
                return_wmd: get_wmd(t, o),
                match_bits: get64(t, 32, o),
                ptl_index: get32(t, 40, o),
                src_offset: get32(t, 44, o),
                sink_length: get32(t, 48, o),
            },
            MsgType::Reply => MsgBody::Reply {
                dst_wmd: get_wmd(t, o),
            },
            MsgType::Hello => MsgBody::Hello {
                incarnation: get64(t, 16, o),
                hello_type: get32(t, 24, o),
            },
        };
        match body {
            MsgBody::Ack { mlength, .. } if mlength > LNET_MTU => {
                return Err(WireError::TooLong {
                    len: mlength.into(),
                    limit: LNET_MTU.into(),
                });
            }
            MsgBody::Get { sink_length, .. } if sink_length > LNET_MTU => {
                return Err(WireError::TooLong {
                    len: sink_length.into(),
                    limit: LNET_MTU.into(),
                });
            }
            MsgBody::Ack { .. } | MsgBody::Get { .. } if payload_length != 0 => {
                return Err(WireError::Inconsistent("ACK/GET with a payload"));
            }
            _ => {}
        }
        Ok(Header {
            dest_nid,
            src_nid,
            dest_pid,
            src_pid,
            payload_length,
            body,
        })
    }

    /// Decode the 72-byte form written in `order`. Extra bytes after the
    /// header are ignored (they are the payload).
    pub fn decode_nid4(buf: &[u8], order: ByteOrder) -> Result<Header, WireError> {
        // As for encoding: one copy per order, its order a constant.
        match order {
            ByteOrder::Little => Self::decode_nid4_in(buf, ByteOrder::Little),
            ByteOrder::Big => Self::decode_nid4_in(buf, ByteOrder::Big),
        }
    }

    #[inline(always)]
    fn decode_nid4_in(buf: &[u8], order: ByteOrder) -> Result<Header, WireError> {
        if buf.len() < HDR_NID4_SIZE {
            return Err(WireError::Short {
                need: HDR_NID4_SIZE,
                have: buf.len(),
            });
        }
        let b: &[u8; HDR_NID4_SIZE] = buf[..HDR_NID4_SIZE].try_into().expect("length checked");
        let (nids, tail) = b.split_at(16);
        let nids: &[u8; 16] = nids.try_into().expect("16 bytes");
        let d = Nid::try_from_nid4(get64(nids, 0, order))?;
        let s = Nid::try_from_nid4(get64(nids, 8, order))?;
        Self::read_tail(tail.try_into().expect("tail size"), order, d, s)
    }

    /// Decode the 96-byte form written in `order`.
    pub fn decode_nid16(buf: &[u8], order: ByteOrder) -> Result<Header, WireError> {
        if buf.len() < HDR_NID16_SIZE {
            return Err(WireError::Short {
                need: HDR_NID16_SIZE,
                have: buf.len(),
            });
        }
        let b: &[u8; HDR_NID16_SIZE] = buf[..HDR_NID16_SIZE].try_into().expect("length checked");
        let (d, rest) = b.split_at(NID16_WIRE_SIZE);
        let (s, tail) = rest.split_at(NID16_WIRE_SIZE);
        let d = Nid::from_wire16(d.try_into().expect("NID size"))?;
        let s = Nid::from_wire16(s.try_into().expect("NID size"))?;
        Self::read_tail(tail.try_into().expect("tail size"), order, d, s)
    }
}
