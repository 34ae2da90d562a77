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
use crate::wire::{ByteOrder, Reader, Writer};

/// Size of the header with 8-byte NIDs.
pub const HDR_NID4_SIZE: usize = 72;
/// Size of the header with 20-byte NIDs.
pub const HDR_NID16_SIZE: usize = 96;
/// Size of the type-specific union.
const UNION_SIZE: usize = 40;

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
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(WireHandle {
            interface_cookie: r.u64()?,
            object_cookie: r.u64()?,
        })
    }
    fn write(&self, w: &mut Writer<'_>) {
        w.u64(self.interface_cookie);
        w.u64(self.object_cookie);
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

    fn write_tail(&self, w: &mut Writer<'_>) {
        w.u32(self.dest_pid);
        w.u32(self.src_pid);
        w.u32(self.msg_type() as u32);
        w.u32(self.payload_length);
        let start = w.pos();
        match self.body {
            MsgBody::Ack {
                dst_wmd,
                match_bits,
                mlength,
            } => {
                dst_wmd.write(w);
                w.u64(match_bits);
                w.u32(mlength);
            }
            MsgBody::Put {
                ack_wmd,
                match_bits,
                hdr_data,
                ptl_index,
                offset,
            } => {
                ack_wmd.write(w);
                w.u64(match_bits);
                w.u64(hdr_data);
                w.u32(ptl_index);
                w.u32(offset);
            }
            MsgBody::Get {
                return_wmd,
                match_bits,
                ptl_index,
                src_offset,
                sink_length,
            } => {
                return_wmd.write(w);
                w.u64(match_bits);
                w.u32(ptl_index);
                w.u32(src_offset);
                w.u32(sink_length);
            }
            MsgBody::Reply { dst_wmd } => dst_wmd.write(w),
            MsgBody::Hello {
                incarnation,
                hello_type,
            } => {
                w.u64(incarnation);
                w.u32(hello_type);
            }
        }
        let used = w.pos() - start;
        w.zeros(UNION_SIZE - used);
    }

    /// Encode in the 72-byte form. Fails if a NID needs the large form.
    pub fn encode_nid4(&self, order: ByteOrder) -> Result<[u8; HDR_NID4_SIZE], WireError> {
        let d = self.dest_nid.to_nid4().ok_or(WireError::Inconsistent(
            "destination NID needs the large header",
        ))?;
        let s = self
            .src_nid
            .to_nid4()
            .ok_or(WireError::Inconsistent("source NID needs the large header"))?;
        let mut b = [0u8; HDR_NID4_SIZE];
        let mut w = Writer::new(&mut b, order);
        w.u64(d);
        w.u64(s);
        self.write_tail(&mut w);
        debug_assert_eq!(w.pos(), HDR_NID4_SIZE);
        Ok(b)
    }

    /// Encode in the 96-byte form (any NID).
    pub fn encode_nid16(&self, order: ByteOrder) -> [u8; HDR_NID16_SIZE] {
        let mut b = [0u8; HDR_NID16_SIZE];
        let mut w = Writer::new(&mut b, order);
        w.bytes(&self.dest_nid.to_wire16());
        w.bytes(&self.src_nid.to_wire16());
        self.write_tail(&mut w);
        debug_assert_eq!(w.pos(), HDR_NID16_SIZE);
        b
    }

    fn read_tail(r: &mut Reader<'_>, dest_nid: Nid, src_nid: Nid) -> Result<Header, WireError> {
        let dest_pid = r.u32()?;
        let src_pid = r.u32()?;
        let ty = r.u32()?;
        let payload_length = r.u32()?;
        let union = r.bytes(UNION_SIZE)?;
        let mut u = Reader::new(union, r.order);
        let mtype = MsgType::from_u32(ty).ok_or(WireError::UnknownType(ty))?;
        if payload_length > LNET_MTU {
            return Err(WireError::TooLong {
                len: payload_length.into(),
                limit: LNET_MTU.into(),
            });
        }
        let body = match mtype {
            MsgType::Ack => MsgBody::Ack {
                dst_wmd: WireHandle::read(&mut u)?,
                match_bits: u.u64()?,
                mlength: u.u32()?,
            },
            MsgType::Put => MsgBody::Put {
                ack_wmd: WireHandle::read(&mut u)?,
                match_bits: u.u64()?,
                hdr_data: u.u64()?,
                ptl_index: u.u32()?,
                offset: u.u32()?,
            },
            MsgType::Get => MsgBody::Get {
                return_wmd: WireHandle::read(&mut u)?,
                match_bits: u.u64()?,
                ptl_index: u.u32()?,
                src_offset: u.u32()?,
                sink_length: u.u32()?,
            },
            MsgType::Reply => MsgBody::Reply {
                dst_wmd: WireHandle::read(&mut u)?,
            },
            MsgType::Hello => MsgBody::Hello {
                incarnation: u.u64()?,
                hello_type: u.u32()?,
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
        if buf.len() < HDR_NID4_SIZE {
            return Err(WireError::Short {
                need: HDR_NID4_SIZE,
                have: buf.len(),
            });
        }
        let mut r = Reader::new(&buf[..HDR_NID4_SIZE], order);
        let d = Nid::try_from_nid4(r.u64()?)?;
        let s = Nid::try_from_nid4(r.u64()?)?;
        Self::read_tail(&mut r, d, s)
    }

    /// Decode the 96-byte form written in `order`.
    pub fn decode_nid16(buf: &[u8], order: ByteOrder) -> Result<Header, WireError> {
        if buf.len() < HDR_NID16_SIZE {
            return Err(WireError::Short {
                need: HDR_NID16_SIZE,
                have: buf.len(),
            });
        }
        let mut r = Reader::new(&buf[..HDR_NID16_SIZE], order);
        let d = Nid::from_wire16(&r.array::<NID16_WIRE_SIZE>()?)?;
        let s = Nid::from_wire16(&r.array::<NID16_WIRE_SIZE>()?)?;
        Self::read_tail(&mut r, d, s)
    }
}
