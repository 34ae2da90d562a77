//! The o2iblnd wire protocol, as pure functions: the 48-byte message header
//! (`struct kib_msg`), its bodies (connection parameters, IMMEDIATE,
//! PUT_REQ/ACK/NAK/DONE, GET_REQ/DONE, NOOP), RDMA descriptors and the
//! connection-reject record carried in RDMA CM private data.
//!
//! Layouts follow Lustre's `o2iblnd-idl.h` (all structures packed). Fields
//! go out in the sender's byte order; the receiver detects the order from
//! the magic and swabs, as the kernel does. Every length and count read from
//! the wire is checked against the buffer before use.
//!
//! ```
//! use lnd_rdma::wire::{Body, ConnParams, Msg, MSG_SIZE};
//! use lnet::{Net, NetType, Nid};
//!
//! let net = Net::new(NetType::O2IBLND, 0);
//! let req = Msg {
//!     version: lnd_rdma::wire::VERSION_2,
//!     credits: 0,
//!     srcnid: Nid::new4(net, 0x0a4d0001),
//!     srcstamp: 7,
//!     dstnid: Nid::new4(net, 0x0a4d0002),
//!     dststamp: 0,
//!     body: Body::ConnReq(ConnParams { queue_depth: 8, max_frags: 257, max_msg_size: 4096 }),
//! };
//! let mut buf = [0u8; MSG_SIZE];
//! let n = req.encode(&mut buf, 0, false).unwrap();
//! assert_eq!(n, 56); // fits RDMA CM's 56 bytes of REQ private data
//! let (back, _) = Msg::decode(&buf[..n]).unwrap();
//! assert_eq!(back, req);
//! ```

use lnet::Nid;
use lnet::wire::{ByteOrder, HDR_NID4_SIZE, Header, Reader, Writer};

/// `IBLND_MSG_MAGIC` (`LNET_PROTO_IB_MAGIC`).
pub const MAGIC: u32 = 0x0be9_1b91;
/// Protocol version 1 (no out-of-band messages; we do not speak it).
pub const VERSION_1: u16 = 0x11;
/// Protocol version 2, the kernel's current one.
pub const VERSION_2: u16 = 0x12;
/// Largest message (`IBLND_MSG_SIZE`), receive buffers are this big.
pub const MSG_SIZE: usize = 4096;
/// Size of the message header (`offsetof(struct kib_msg, ibm_u)`).
pub const HDR_SIZE: usize = 48;
/// Most fragments in an RDMA descriptor (`IBLND_MAX_RDMA_FRAGS`).
pub const MAX_FRAGS: u16 = 257;
/// Largest payload an IMMEDIATE message carries: the header, the LNet
/// header and the payload fit in [`MSG_SIZE`].
pub const IMMEDIATE_MAX: usize = MSG_SIZE - HDR_SIZE - HDR_NID4_SIZE;
/// Offset of an IMMEDIATE message's payload.
pub const IMMEDIATE_PAYLOAD: usize = HDR_SIZE + HDR_NID4_SIZE;
/// The RDMA CM port (service id) o2iblnd listens on.
pub const DEFAULT_PORT: u16 = 987;
/// Size of [`Rej`] on the wire.
pub const REJ_SIZE: usize = 24;
/// Default queue depth (peer credits).
pub const DEFAULT_QUEUE_DEPTH: u16 = 8;

/// Message type codes.
pub mod msg_type {
    /// Connection request (RDMA CM private data).
    pub const CONNREQ: u8 = 0xc0;
    /// Connection acknowledgement (RDMA CM private data).
    pub const CONNACK: u8 = 0xc1;
    /// Nothing but returned credits.
    pub const NOOP: u8 = 0xd0;
    /// LNet header and payload inline.
    pub const IMMEDIATE: u8 = 0xd1;
    /// PUT of a large payload: source asks the sink for a descriptor.
    pub const PUT_REQ: u8 = 0xd2;
    /// Sink refuses (or needs nothing).
    pub const PUT_NAK: u8 = 0xd3;
    /// Sink's RDMA descriptor.
    pub const PUT_ACK: u8 = 0xd4;
    /// Source wrote the data.
    pub const PUT_DONE: u8 = 0xd5;
    /// GET carrying the sink's descriptor for the REPLY.
    pub const GET_REQ: u8 = 0xd6;
    /// Source wrote the REPLY data (status: bytes, or negative errno).
    pub const GET_DONE: u8 = 0xd7;
}

/// Connection-reject reasons (`IBLND_REJECT_*`).
pub mod reject {
    /// You lost the connection race.
    pub const CONN_RACE: u8 = 1;
    /// Out of resources.
    pub const NO_RESOURCES: u8 = 2;
    /// Anything else.
    pub const FATAL: u8 = 3;
    /// Incompatible protocol version.
    pub const CONN_UNCOMPAT: u8 = 4;
    /// Stale incarnation.
    pub const CONN_STALE: u8 = 5;
    /// Max fragments do not match (carries ours).
    pub const RDMA_FRAGS: u8 = 6;
    /// Queue depth too large (carries ours).
    pub const MSG_QUEUE_SIZE: u8 = 7;
    /// Wrong service id.
    pub const INVALID_SRV_ID: u8 = 8;
    /// NI not ready yet.
    pub const EARLY: u8 = 9;

    /// A reason's name.
    pub fn name(why: u8) -> &'static str {
        match why {
            CONN_RACE => "connection race",
            NO_RESOURCES => "no resources",
            FATAL => "fatal",
            CONN_UNCOMPAT => "incompatible version",
            CONN_STALE => "stale incarnation",
            RDMA_FRAGS => "max fragments",
            MSG_QUEUE_SIZE => "queue depth",
            INVALID_SRV_ID => "invalid service id",
            EARLY => "too early",
            _ => "unknown",
        }
    }
}

/// Why a message or reject record was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer bytes than the structure needs.
    #[error("short message: {have} bytes, need {need}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Neither byte order gives the magic.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Not version 1 or 2.
    #[error("bad version {0:#x}")]
    BadVersion(u16),
    /// `ibm_nob` larger than what arrived, or than a message may be.
    #[error("bad length {nob} (received {have})")]
    BadLength {
        /// The length field.
        nob: u32,
        /// Bytes that arrived.
        have: usize,
    },
    /// Checksum mismatch.
    #[error("bad checksum")]
    BadChecksum,
    /// Unknown message type.
    #[error("unknown message type {0:#x}")]
    BadType(u8),
    /// Source NID is `LNET_NID_ANY`.
    #[error("bad source NID")]
    BadSrcNid,
    /// RDMA descriptor fragment count out of range.
    #[error("bad fragment count {0}")]
    BadFrags(u32),
    /// The embedded LNet header does not decode.
    #[error("bad LNet header: {0}")]
    Header(#[from] lnet::WireError),
    /// A message does not fit the buffer given to encode it.
    #[error("message of {0} bytes does not fit")]
    TooBig(usize),
}

/// Connection parameters (`struct kib_connparams`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnParams {
    /// Messages in flight each way (peer credits).
    pub queue_depth: u16,
    /// Most RDMA fragments per descriptor.
    pub max_frags: u16,
    /// Largest message.
    pub max_msg_size: u32,
}

impl Default for ConnParams {
    fn default() -> Self {
        ConnParams {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_frags: MAX_FRAGS,
            max_msg_size: MSG_SIZE as u32,
        }
    }
}

/// One fragment of an RDMA descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaFrag {
    /// Bytes.
    pub nob: u32,
    /// Remote virtual address.
    pub addr: u64,
}

/// An RDMA descriptor (`struct kib_rdma_desc`): one key, the fragments.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RdmaDesc {
    /// The remote key of the memory region.
    pub key: u32,
    /// The fragments, in order.
    pub frags: Vec<RdmaFrag>,
}

impl RdmaDesc {
    /// Total bytes described.
    pub fn len(&self) -> u64 {
        self.frags.iter().map(|f| u64::from(f.nob)).sum()
    }
    /// True when it describes no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn wire_size(&self) -> usize {
        8 + 12 * self.frags.len()
    }
}

/// A message body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// CONNREQ.
    ConnReq(ConnParams),
    /// CONNACK.
    ConnAck(ConnParams),
    /// NOOP.
    Noop,
    /// IMMEDIATE: the payload follows the header at [`IMMEDIATE_PAYLOAD`].
    Immediate {
        /// The LNet header.
        hdr: Header,
    },
    /// PUT_REQ.
    PutReq {
        /// The LNet header.
        hdr: Header,
        /// The source's completion cookie.
        cookie: u64,
    },
    /// PUT_ACK.
    PutAck {
        /// The PUT_REQ's cookie, reflected.
        src_cookie: u64,
        /// The sink's cookie for PUT_DONE.
        dst_cookie: u64,
        /// Where to write.
        rd: RdmaDesc,
    },
    /// PUT_NAK.
    PutNak {
        /// The PUT_REQ's cookie.
        cookie: u64,
        /// 0 or a negative errno.
        status: i32,
    },
    /// PUT_DONE.
    PutDone {
        /// The PUT_ACK's dst cookie.
        cookie: u64,
        /// Bytes written, or a negative errno.
        status: i32,
    },
    /// GET_REQ.
    GetReq {
        /// The LNet header (a GET).
        hdr: Header,
        /// The sink's cookie for GET_DONE.
        cookie: u64,
        /// Where the REPLY's data goes.
        rd: RdmaDesc,
    },
    /// GET_DONE.
    GetDone {
        /// The GET_REQ's cookie.
        cookie: u64,
        /// Bytes written, or a negative errno.
        status: i32,
    },
}

impl Body {
    /// The type code.
    pub fn type_code(&self) -> u8 {
        use msg_type::*;
        match self {
            Body::ConnReq(_) => CONNREQ,
            Body::ConnAck(_) => CONNACK,
            Body::Noop => NOOP,
            Body::Immediate { .. } => IMMEDIATE,
            Body::PutReq { .. } => PUT_REQ,
            Body::PutAck { .. } => PUT_ACK,
            Body::PutNak { .. } => PUT_NAK,
            Body::PutDone { .. } => PUT_DONE,
            Body::GetReq { .. } => GET_REQ,
            Body::GetDone { .. } => GET_DONE,
        }
    }
    /// True for messages that spend a peer credit (IMMEDIATE, PUT_REQ,
    /// GET_REQ); the out-of-band ones of version 2 do not.
    pub fn needs_credit(&self) -> bool {
        matches!(
            self,
            Body::Immediate { .. } | Body::PutReq { .. } | Body::GetReq { .. }
        )
    }
}

/// Smallest valid size of each message type (header included).
fn min_size(ty: u8) -> Option<usize> {
    use msg_type::*;
    Some(
        HDR_SIZE
            + match ty {
                CONNREQ | CONNACK => 8,
                NOOP => 0,
                IMMEDIATE => HDR_NID4_SIZE,
                PUT_REQ => HDR_NID4_SIZE + 8,
                PUT_ACK => 16 + 8,
                GET_REQ => HDR_NID4_SIZE + 8 + 8,
                PUT_NAK | PUT_DONE | GET_DONE => 12,
                _ => return None,
            },
    )
}

/// A decoded o2iblnd message (`struct kib_msg`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// Protocol version.
    pub version: u16,
    /// Credits returned to the receiver.
    pub credits: u8,
    /// Sender's NID.
    pub srcnid: Nid,
    /// Sender's incarnation.
    pub srcstamp: u64,
    /// Destination NID.
    pub dstnid: Nid,
    /// Destination's incarnation as the sender knows it (0: unknown).
    pub dststamp: u64,
    /// The body.
    pub body: Body,
}

/// The kernel's message checksum (a rotate-and-add over the bytes, never 0).
pub fn cksum(buf: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    for &c in buf {
        // The kernel adds `char`, signed on x86.
        sum = sum.rotate_left(1).wrapping_add(c as i8 as i32 as u32);
    }
    if sum == 0 { 1 } else { sum }
}

fn nid4(n: &Nid) -> u64 {
    n.to_nid4().unwrap_or(u64::MAX)
}

impl Msg {
    /// Encoded size (for IMMEDIATE: with `payload_len` bytes of payload).
    pub fn encoded_len(&self, payload_len: usize) -> usize {
        HDR_SIZE
            + match &self.body {
                Body::ConnReq(_) | Body::ConnAck(_) => 8,
                Body::Noop => 0,
                Body::Immediate { .. } => HDR_NID4_SIZE + payload_len,
                Body::PutReq { .. } => HDR_NID4_SIZE + 8,
                Body::PutAck { rd, .. } => 16 + rd.wire_size(),
                Body::GetReq { rd, .. } => HDR_NID4_SIZE + 8 + rd.wire_size(),
                Body::PutNak { .. } | Body::PutDone { .. } | Body::GetDone { .. } => 12,
            }
    }

    /// Encode into `buf` in our byte order and return the message size.
    /// For IMMEDIATE, `payload_len` bytes of payload must already be (or
    /// be put, before [`seal`]) at [`IMMEDIATE_PAYLOAD`]. With `checksum`
    /// the checksum is computed over the whole message, so the payload must
    /// be in place already.
    pub fn encode(
        &self,
        buf: &mut [u8],
        payload_len: usize,
        checksum: bool,
    ) -> Result<usize, ProtoError> {
        let nob = self.encoded_len(payload_len);
        if nob > buf.len() || nob > MSG_SIZE {
            return Err(ProtoError::TooBig(nob));
        }
        let order = ByteOrder::NATIVE;
        let mut w = Writer::new(&mut buf[..nob], order);
        w.u32(MAGIC);
        w.u16(self.version);
        w.bytes(&[self.body.type_code(), self.credits]);
        w.u32(nob as u32);
        w.u32(0);
        w.u64(nid4(&self.srcnid));
        w.u64(self.srcstamp);
        w.u64(nid4(&self.dstnid));
        w.u64(self.dststamp);
        let hdr4 = |h: &Header| h.encode_nid4(order);
        match &self.body {
            Body::ConnReq(p) | Body::ConnAck(p) => {
                w.u16(p.queue_depth);
                w.u16(p.max_frags);
                w.u32(p.max_msg_size);
            }
            Body::Noop => {}
            Body::Immediate { hdr } => w.bytes(&hdr4(hdr)?),
            Body::PutReq { hdr, cookie } => {
                w.bytes(&hdr4(hdr)?);
                w.u64(*cookie);
            }
            Body::PutAck {
                src_cookie,
                dst_cookie,
                rd,
            } => {
                w.u64(*src_cookie);
                w.u64(*dst_cookie);
                put_rd(&mut w, rd);
            }
            Body::GetReq { hdr, cookie, rd } => {
                w.bytes(&hdr4(hdr)?);
                w.u64(*cookie);
                put_rd(&mut w, rd);
            }
            Body::PutNak { cookie, status }
            | Body::PutDone { cookie, status }
            | Body::GetDone { cookie, status } => {
                w.u64(*cookie);
                w.u32(*status as u32);
            }
        }
        if checksum {
            seal(&mut buf[..nob]);
        }
        Ok(nob)
    }

    /// Decode a received message. Returns it and, for IMMEDIATE, the
    /// payload's range in `buf`.
    pub fn decode(buf: &[u8]) -> Result<(Msg, std::ops::Range<usize>), ProtoError> {
        if buf.len() < 6 {
            return Err(ProtoError::Short {
                need: 6,
                have: buf.len(),
            });
        }
        let m = [buf[0], buf[1], buf[2], buf[3]];
        let order =
            ByteOrder::detect(m, MAGIC).ok_or(ProtoError::BadMagic(u32::from_le_bytes(m)))?;
        let mut r = Reader::new(buf, order);
        r.u32()?;
        let version = r.u16()?;
        if version != VERSION_2 && version != VERSION_1 {
            return Err(ProtoError::BadVersion(version));
        }
        if buf.len() < HDR_SIZE {
            return Err(ProtoError::Short {
                need: HDR_SIZE,
                have: buf.len(),
            });
        }
        let ty = r.u8()?;
        let credits = r.u8()?;
        let nob = r.u32()?;
        let sum = r.u32()?;
        if nob as usize > buf.len() || (nob as usize) < HDR_SIZE {
            return Err(ProtoError::BadLength {
                nob,
                have: buf.len(),
            });
        }
        let msg = &buf[..nob as usize];
        if sum != 0 {
            let mut copy = msg.to_vec();
            copy[12..16].fill(0);
            if cksum(&copy) != sum {
                return Err(ProtoError::BadChecksum);
            }
        }
        let srcnid = r.u64()?;
        if srcnid == u64::MAX {
            return Err(ProtoError::BadSrcNid);
        }
        let srcnid = Nid::try_from_nid4(srcnid)?;
        let srcstamp = r.u64()?;
        let dstnid = Nid::try_from_nid4(r.u64()?)?;
        let dststamp = r.u64()?;
        let need = min_size(ty).ok_or(ProtoError::BadType(ty))?;
        if msg.len() < need {
            return Err(ProtoError::Short {
                need,
                have: msg.len(),
            });
        }
        let mut r = Reader::new(msg, order);
        r.bytes(HDR_SIZE)?;
        let mut payload = 0..0;
        use msg_type::*;
        let body = match ty {
            CONNREQ | CONNACK => {
                let p = ConnParams {
                    queue_depth: r.u16()?,
                    max_frags: r.u16()?,
                    max_msg_size: r.u32()?,
                };
                if ty == CONNREQ {
                    Body::ConnReq(p)
                } else {
                    Body::ConnAck(p)
                }
            }
            NOOP => Body::Noop,
            IMMEDIATE => {
                let hdr = Header::decode_nid4(r.bytes(HDR_NID4_SIZE)?, order)?;
                payload = IMMEDIATE_PAYLOAD..msg.len();
                Body::Immediate { hdr }
            }
            PUT_REQ => Body::PutReq {
                hdr: Header::decode_nid4(r.bytes(HDR_NID4_SIZE)?, order)?,
                cookie: r.u64()?,
            },
            PUT_ACK => Body::PutAck {
                src_cookie: r.u64()?,
                dst_cookie: r.u64()?,
                rd: get_rd(&mut r)?,
            },
            GET_REQ => Body::GetReq {
                hdr: Header::decode_nid4(r.bytes(HDR_NID4_SIZE)?, order)?,
                cookie: r.u64()?,
                rd: get_rd(&mut r)?,
            },
            _ => {
                let cookie = r.u64()?;
                let status = r.u32()? as i32;
                match ty {
                    PUT_NAK => Body::PutNak { cookie, status },
                    PUT_DONE => Body::PutDone { cookie, status },
                    _ => Body::GetDone { cookie, status },
                }
            }
        };
        Ok((
            Msg {
                version,
                credits,
                srcnid,
                srcstamp,
                dstnid,
                dststamp,
                body,
            },
            payload,
        ))
    }
}

/// Fill in the checksum of an encoded message (`buf` is exactly the
/// message, `ibm_cksum` zero).
pub fn seal(buf: &mut [u8]) {
    if buf.len() >= HDR_SIZE {
        let s = cksum(buf);
        buf[12..16].copy_from_slice(&s.to_ne_bytes());
    }
}

fn put_rd(w: &mut Writer<'_>, rd: &RdmaDesc) {
    w.u32(rd.key);
    w.u32(rd.frags.len() as u32);
    for f in &rd.frags {
        w.u32(f.nob);
        w.u64(f.addr);
    }
}

fn get_rd(r: &mut Reader<'_>) -> Result<RdmaDesc, ProtoError> {
    let key = r.u32()?;
    let n = r.u32()?;
    if n == 0 || n > u32::from(MAX_FRAGS) {
        return Err(ProtoError::BadFrags(n));
    }
    let need = n as usize * 12;
    if r.remaining() < need {
        return Err(ProtoError::Short {
            need: r.pos() + need,
            have: r.pos() + r.remaining(),
        });
    }
    let mut frags = Vec::with_capacity(n as usize);
    for _ in 0..n {
        frags.push(RdmaFrag {
            nob: r.u32()?,
            addr: r.u64()?,
        });
    }
    Ok(RdmaDesc { key, frags })
}

/// The reject record (`struct kib_rej`) sent as a CM reject's private data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rej {
    /// Sender's protocol version.
    pub version: u16,
    /// Reason ([`reject`]).
    pub why: u8,
    /// Sender's incarnation.
    pub incarnation: u64,
    /// Sender's connection parameters (what to retry with).
    pub cp: ConnParams,
}

impl Rej {
    /// Encode in our byte order.
    pub fn encode(&self) -> [u8; REJ_SIZE] {
        let mut b = [0u8; REJ_SIZE];
        let mut w = Writer::new(&mut b, ByteOrder::NATIVE);
        w.u32(MAGIC);
        w.u16(self.version);
        w.bytes(&[self.why, 0]);
        w.u64(self.incarnation);
        w.u16(self.cp.queue_depth);
        w.u16(self.cp.max_frags);
        w.u32(self.cp.max_msg_size);
        b
    }
    /// Decode a reject's private data. `None` when it is not an o2iblnd
    /// reject (too short or no magic): the reject came from the CM itself.
    /// Records too short for the parameters yield them as `None`.
    pub fn decode(b: &[u8]) -> Option<(Rej, bool)> {
        if b.len() < 8 {
            return None;
        }
        let order = ByteOrder::detect([b[0], b[1], b[2], b[3]], MAGIC)?;
        let mut r = Reader::new(b, order);
        r.u32().ok()?;
        let version = r.u16().ok()?;
        let why = r.u8().ok()?;
        r.u8().ok()?;
        let full = b.len() >= REJ_SIZE;
        let (incarnation, cp) = if full {
            (
                r.u64().ok()?,
                ConnParams {
                    queue_depth: r.u16().ok()?,
                    max_frags: r.u16().ok()?,
                    max_msg_size: r.u32().ok()?,
                },
            )
        } else {
            (0, ConnParams::default())
        };
        Some((
            Rej {
                version,
                why,
                incarnation,
                cp,
            },
            full,
        ))
    }
}

/// Decode arbitrary bytes as a message and as a reject record; never
/// panics. The fuzz target and its corpus replay call this.
pub fn fuzz_check(data: &[u8]) {
    if let Ok((m, payload)) = Msg::decode(data) {
        assert!(payload.end <= data.len());
        // A decoded message re-encodes to a decodable one of the same size
        // class (headers re-encode; NIDs are nid4 by construction).
        let mut buf = vec![0u8; MSG_SIZE];
        if let Ok(n) = m.encode(&mut buf, payload.len(), false) {
            if let Ok((m2, _)) = Msg::decode(&buf[..n]) {
                assert_eq!(m2.body.type_code(), m.body.type_code());
            }
        }
    }
    let _ = Rej::decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lnet::wire::{MsgBody, WireHandle};
    use lnet::{Net, NetType};
    use proptest::prelude::*;

    fn net() -> Net {
        Net::new(NetType::O2IBLND, 0)
    }

    fn put_hdr(len: u32) -> Header {
        Header {
            dest_nid: Nid::new4(net(), 0x0a4d_0002),
            src_nid: Nid::new4(net(), 0x0a4d_0001),
            dest_pid: 12345,
            src_pid: 12345,
            payload_length: len,
            body: MsgBody::Put {
                ack_wmd: WireHandle::NONE,
                match_bits: 0x1122_3344_5566_7788,
                hdr_data: 9,
                ptl_index: 4,
                offset: 0,
            },
        }
    }

    fn msg(body: Body) -> Msg {
        Msg {
            version: VERSION_2,
            credits: 3,
            srcnid: Nid::new4(net(), 0x0a4d_0001),
            srcstamp: 0x0102_0304_0506_0708,
            dstnid: Nid::new4(net(), 0x0a4d_0002),
            dststamp: 0x1112_1314_1516_1718,
            body,
        }
    }

    /// Byte offsets written from `struct kib_msg` in o2iblnd-idl.h.
    #[test]
    fn header_layout() {
        let m = msg(Body::ConnReq(ConnParams {
            queue_depth: 16,
            max_frags: 257,
            max_msg_size: 4096,
        }));
        let mut b = [0u8; 64];
        let n = m.encode(&mut b, 0, false).unwrap();
        assert_eq!(n, 56);
        assert_eq!(&b[0..4], &0x0be9_1b91u32.to_le_bytes());
        assert_eq!(&b[4..6], &0x12u16.to_le_bytes());
        assert_eq!(b[6], 0xc0);
        assert_eq!(b[7], 3);
        assert_eq!(&b[8..12], &56u32.to_le_bytes());
        assert_eq!(&b[12..16], &[0; 4]);
        // srcnid: addr 10.77.0.1 in the low 32 bits, net (o2ib = 5, num 0)
        // in the high 32.
        assert_eq!(&b[16..24], &(0x0005_0000_0a4d_0001u64).to_le_bytes());
        assert_eq!(&b[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[32..40], &(0x0005_0000_0a4d_0002u64).to_le_bytes());
        assert_eq!(&b[40..48], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&b[48..50], &16u16.to_le_bytes());
        assert_eq!(&b[50..52], &257u16.to_le_bytes());
        assert_eq!(&b[52..56], &4096u32.to_le_bytes());
    }

    #[test]
    fn body_layouts() {
        let rd = RdmaDesc {
            key: 0xabcd,
            frags: vec![
                RdmaFrag {
                    nob: 4096,
                    addr: 0x7000_0000_1000,
                },
                RdmaFrag {
                    nob: 100,
                    addr: 0x7000_0000_3000,
                },
            ],
        };
        let mut b = [0u8; MSG_SIZE];
        let n = msg(Body::PutAck {
            src_cookie: 0x55,
            dst_cookie: 0x66,
            rd: rd.clone(),
        })
        .encode(&mut b, 0, false)
        .unwrap();
        assert_eq!(n, 48 + 16 + 8 + 24);
        assert_eq!(&b[48..56], &0x55u64.to_le_bytes());
        assert_eq!(&b[56..64], &0x66u64.to_le_bytes());
        assert_eq!(&b[64..68], &0xabcdu32.to_le_bytes());
        assert_eq!(&b[68..72], &2u32.to_le_bytes());
        assert_eq!(&b[72..76], &4096u32.to_le_bytes());
        assert_eq!(&b[76..84], &0x7000_0000_1000u64.to_le_bytes());
        assert_eq!(&b[84..88], &100u32.to_le_bytes());

        let n = msg(Body::GetReq {
            hdr: put_hdr(0),
            cookie: 0x77,
            rd,
        })
        .encode(&mut b, 0, false)
        .unwrap();
        assert_eq!(n, 48 + 72 + 8 + 8 + 24);
        assert_eq!(&b[120..128], &0x77u64.to_le_bytes());
        assert_eq!(&b[128..132], &0xabcdu32.to_le_bytes());

        let n = msg(Body::PutDone {
            cookie: 0x88,
            status: -61,
        })
        .encode(&mut b, 0, false)
        .unwrap();
        assert_eq!(n, 60);
        assert_eq!(b[6], 0xd5);
        assert_eq!(&b[56..60], &(-61i32).to_le_bytes());

        let n = msg(Body::PutReq {
            hdr: put_hdr(1 << 20),
            cookie: 0x99,
        })
        .encode(&mut b, 0, false)
        .unwrap();
        assert_eq!(n, 128);
        // The LNet header is the 72-byte nid4 header, as socklnd carries it.
        assert_eq!(
            &b[48..120],
            &put_hdr(1 << 20).encode_nid4(ByteOrder::Little).unwrap()
        );
        assert_eq!(&b[120..128], &0x99u64.to_le_bytes());

        let n = msg(Body::Immediate { hdr: put_hdr(8) })
            .encode(&mut b, 8, false)
            .unwrap();
        assert_eq!(n, 128);
        assert_eq!(IMMEDIATE_MAX, 3976);
    }

    #[test]
    fn rej_layout() {
        let r = Rej {
            version: VERSION_2,
            why: reject::MSG_QUEUE_SIZE,
            incarnation: 0xfeed,
            cp: ConnParams {
                queue_depth: 4,
                max_frags: 257,
                max_msg_size: 4096,
            },
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &MAGIC.to_le_bytes());
        assert_eq!(&b[4..6], &0x12u16.to_le_bytes());
        assert_eq!(b[6], 7);
        assert_eq!(&b[8..16], &0xfeedu64.to_le_bytes());
        assert_eq!(&b[16..18], &4u16.to_le_bytes());
        assert_eq!(Rej::decode(&b), Some((r, true)));
        assert!(!Rej::decode(&b[..8]).unwrap().1);
        assert_eq!(Rej::decode(&[0u8; 24]), None);
        // A big-endian peer's reject.
        let mut be = b;
        be[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        be[4..6].copy_from_slice(&0x12u16.to_be_bytes());
        be[16..18].copy_from_slice(&4u16.to_be_bytes());
        be[18..20].copy_from_slice(&257u16.to_be_bytes());
        be[20..24].copy_from_slice(&4096u32.to_be_bytes());
        be[8..16].copy_from_slice(&0xfeedu64.to_be_bytes());
        assert_eq!(Rej::decode(&be), Some((r, true)));
    }

    #[test]
    fn swabbed_peer() {
        // A CONNREQ from a big-endian node, built by hand.
        let mut b = vec![];
        b.extend(MAGIC.to_be_bytes());
        b.extend(0x12u16.to_be_bytes());
        b.extend([0xc0, 0]);
        b.extend(56u32.to_be_bytes());
        b.extend(0u32.to_be_bytes());
        b.extend(0x0005_0000_0a4d_0001u64.to_be_bytes());
        b.extend(5u64.to_be_bytes());
        b.extend(0x0005_0000_0a4d_0002u64.to_be_bytes());
        b.extend(0u64.to_be_bytes());
        b.extend(8u16.to_be_bytes());
        b.extend(257u16.to_be_bytes());
        b.extend(4096u32.to_be_bytes());
        let (m, _) = Msg::decode(&b).unwrap();
        assert_eq!(m.srcnid, Nid::new4(net(), 0x0a4d_0001));
        assert_eq!(m.srcstamp, 5);
        assert_eq!(m.body, Body::ConnReq(ConnParams::default()));
    }

    #[test]
    fn checksum_verified() {
        let mut b = [0u8; MSG_SIZE];
        let n = msg(Body::Immediate { hdr: put_hdr(5) })
            .encode(&mut b, 5, false)
            .unwrap();
        b[IMMEDIATE_PAYLOAD..n].copy_from_slice(b"hello");
        seal(&mut b[..n]);
        let (m, p) = Msg::decode(&b[..n]).unwrap();
        assert!(matches!(m.body, Body::Immediate { .. }));
        assert_eq!(&b[p], b"hello");
        b[n - 1] ^= 1;
        assert_eq!(Msg::decode(&b[..n]), Err(ProtoError::BadChecksum));
    }

    #[test]
    fn refusals() {
        let mut b = [0u8; MSG_SIZE];
        let n = msg(Body::Noop).encode(&mut b, 0, false).unwrap();
        assert!(matches!(
            Msg::decode(&b[..5]),
            Err(ProtoError::Short { .. })
        ));
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            Msg::decode(&bad[..n]),
            Err(ProtoError::BadMagic(_))
        ));
        let mut bad = b;
        bad[4] = 0x13;
        assert_eq!(Msg::decode(&bad[..n]), Err(ProtoError::BadVersion(0x13)));
        let mut bad = b;
        bad[8..12].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            Msg::decode(&bad[..n]),
            Err(ProtoError::BadLength { .. })
        ));
        let mut bad = b;
        bad[6] = 0xd9;
        assert_eq!(Msg::decode(&bad[..n]), Err(ProtoError::BadType(0xd9)));
        let mut bad = b;
        bad[16..24].fill(0xff);
        assert_eq!(Msg::decode(&bad[..n]), Err(ProtoError::BadSrcNid));
        // A PUT_ACK announcing more fragments than it carries.
        let n = msg(Body::PutAck {
            src_cookie: 1,
            dst_cookie: 2,
            rd: RdmaDesc {
                key: 1,
                frags: vec![RdmaFrag { nob: 1, addr: 2 }],
            },
        })
        .encode(&mut b, 0, false)
        .unwrap();
        b[68..72].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            Msg::decode(&b[..n]),
            Err(ProtoError::Short { .. })
        ));
        b[68..72].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Msg::decode(&b[..n]), Err(ProtoError::BadFrags(0)));
        b[68..72].copy_from_slice(&300u32.to_le_bytes());
        assert_eq!(Msg::decode(&b[..n]), Err(ProtoError::BadFrags(300)));
    }

    fn arb_body() -> impl Strategy<Value = Body> {
        let cp = (any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(a, b, c)| ConnParams {
            queue_depth: a,
            max_frags: b,
            max_msg_size: c,
        });
        let rd = (
            any::<u32>(),
            proptest::collection::vec((any::<u32>(), any::<u64>()), 1..40),
        )
            .prop_map(|(key, f)| RdmaDesc {
                key,
                frags: f
                    .into_iter()
                    .map(|(nob, addr)| RdmaFrag { nob, addr })
                    .collect(),
            });
        prop_oneof![
            cp.clone().prop_map(Body::ConnReq),
            cp.prop_map(Body::ConnAck),
            Just(Body::Noop),
            (0u32..=1 << 20).prop_map(|l| Body::Immediate { hdr: put_hdr(l) }),
            any::<u64>().prop_map(|c| Body::PutReq {
                hdr: put_hdr(9),
                cookie: c
            }),
            (any::<u64>(), any::<u64>(), rd.clone()).prop_map(|(a, b, rd)| Body::PutAck {
                src_cookie: a,
                dst_cookie: b,
                rd
            }),
            (any::<u64>(), rd).prop_map(|(c, rd)| Body::GetReq {
                hdr: put_hdr(0),
                cookie: c,
                rd
            }),
            (any::<u64>(), any::<i32>()).prop_map(|(c, s)| Body::PutNak {
                cookie: c,
                status: s
            }),
            (any::<u64>(), any::<i32>()).prop_map(|(c, s)| Body::PutDone {
                cookie: c,
                status: s
            }),
            (any::<u64>(), any::<i32>()).prop_map(|(c, s)| Body::GetDone {
                cookie: c,
                status: s
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(body in arb_body(), credits in any::<u8>(), sum in any::<bool>()) {
            let mut m = msg(body);
            m.credits = credits;
            let mut b = vec![0u8; MSG_SIZE];
            let n = m.encode(&mut b, 0, sum).unwrap();
            let (back, _) = Msg::decode(&b[..n]).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_check(&b);
        }

        #[test]
        fn mutated_never_panic(body in arb_body(), i in 0usize..200, v in any::<u8>()) {
            let mut b = vec![0u8; MSG_SIZE];
            let n = msg(body).encode(&mut b, 0, false).unwrap();
            b[i % n] = v;
            fuzz_check(&b[..n]);
        }
    }
}
