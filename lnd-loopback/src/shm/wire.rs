//! The shm transport's own formats: the segment header every shared
//! segment starts with, the hello exchanged over the Unix socket, and the
//! messages carried in ring slots. Pure functions; every length and index
//! read from the peer is checked here before anything uses it.
//!
//! Everything is in the host's byte order: both ends run on one host.

use lnet::wire::{ByteOrder, HDR_NID4_SIZE, Header, MsgBody, WireHandle};
use lnet::{LNET_MAX_IOV, LNET_MTU, Nid};

use super::ShmError;

/// "LNETSHM1": first word of every shared segment.
pub const SEG_MAGIC: u64 = 0x4c4e_4554_5348_4d31;
/// "LNETSHMH": first word of a hello.
pub const HELLO_MAGIC: u64 = 0x4c4e_4554_5348_4d48;
/// Version of the segment layout, the hello and the slot messages.
pub const SHM_VERSION: u32 = 3;
/// Bytes of the segment header (one page, so slots start aligned).
pub const SEG_HDR_SIZE: usize = 4096;
/// Bytes of a slot's own header (mark, kind, flags, length, cookie).
pub const SLOT_HDR: usize = 16;
/// Bytes at the start of every slot that hold its publication mark: the
/// ring protocol's (see `ring.rs`), stored atomically once the rest of the
/// slot is written. Whoever fills a slot writes from this offset on.
pub const SLOT_MARK: usize = 4;

/// Segment kinds.
pub const SEG_RING: u32 = 1;
/// A node's shared pool.
pub const SEG_POOL: u32 = 2;

/// Smallest and largest slot sizes accepted from a peer.
pub const MIN_SLOT: u32 = 256;
/// Largest slot size.
pub const MAX_SLOT: u32 = 64 * 1024;
/// Most slots in a ring.
pub const MAX_SLOTS: u32 = 4096;
/// Most bounce buffers and their largest size.
pub const MAX_BOUNCE: u32 = 64;
/// Largest bounce buffer.
pub const MAX_BOUNCE_SIZE: u32 = 4 << 20;

/// The header at offset 0 of a shared segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegHeader {
    /// [`SEG_RING`] or [`SEG_POOL`].
    pub kind: u32,
    /// Total bytes of the segment.
    pub size: u64,
    /// Ring: slots and their size.
    pub nslots: u32,
    /// Ring: bytes per slot.
    pub slot_size: u32,
    /// Ring: where slots start; pool: where the pool region starts.
    pub data_off: u64,
    /// Ring: bounce buffers and their size.
    pub nbounce: u32,
    /// Bytes per bounce buffer.
    pub bounce_size: u32,
    /// Ring: where the bounce buffers start.
    pub bounce_off: u64,
    /// Offset of the ring's control block.
    pub ctl_off: u64,
}

impl SegHeader {
    /// Bytes of the encoded header.
    pub const LEN: usize = 64;

    /// Encode.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&SEG_MAGIC.to_ne_bytes());
        b[8..12].copy_from_slice(&SHM_VERSION.to_ne_bytes());
        b[12..16].copy_from_slice(&self.kind.to_ne_bytes());
        b[16..24].copy_from_slice(&self.size.to_ne_bytes());
        b[24..28].copy_from_slice(&self.nslots.to_ne_bytes());
        b[28..32].copy_from_slice(&self.slot_size.to_ne_bytes());
        b[32..40].copy_from_slice(&self.data_off.to_ne_bytes());
        b[40..44].copy_from_slice(&self.nbounce.to_ne_bytes());
        b[44..48].copy_from_slice(&self.bounce_size.to_ne_bytes());
        b[48..56].copy_from_slice(&self.bounce_off.to_ne_bytes());
        b[56..64].copy_from_slice(&self.ctl_off.to_ne_bytes());
        b
    }

    /// Decode and check against the segment's real size (from `fstat`):
    /// every region must lie inside it.
    pub fn decode(b: &[u8], real_size: u64, want_kind: u32) -> Result<SegHeader, ShmError> {
        if b.len() < Self::LEN {
            return Err(ShmError::BadSegment("short header"));
        }
        if u64_at(b, 0) != SEG_MAGIC {
            return Err(ShmError::BadSegment("bad magic"));
        }
        if u32_at(b, 8) != SHM_VERSION {
            return Err(ShmError::BadSegment("unknown version"));
        }
        let h = SegHeader {
            kind: u32_at(b, 12),
            size: u64_at(b, 16),
            nslots: u32_at(b, 24),
            slot_size: u32_at(b, 28),
            data_off: u64_at(b, 32),
            nbounce: u32_at(b, 40),
            bounce_size: u32_at(b, 44),
            bounce_off: u64_at(b, 48),
            ctl_off: u64_at(b, 56),
        };
        if h.kind != want_kind {
            return Err(ShmError::BadSegment("wrong segment kind"));
        }
        if h.size != real_size || h.size < SEG_HDR_SIZE as u64 {
            return Err(ShmError::BadSegment("size disagrees with the file"));
        }
        let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= h.size);
        if h.data_off < SEG_HDR_SIZE as u64 || h.data_off % 64 != 0 {
            return Err(ShmError::BadSegment("data offset"));
        }
        if h.kind == SEG_RING {
            if !(1..=MAX_SLOTS).contains(&h.nslots)
                || !(MIN_SLOT..=MAX_SLOT).contains(&h.slot_size)
                || h.slot_size % 64 != 0
            {
                return Err(ShmError::BadSegment("slot geometry"));
            }
            if !within(h.data_off, h.nslots as u64 * h.slot_size as u64) {
                return Err(ShmError::BadSegment("slots outside the segment"));
            }
            if h.nbounce > MAX_BOUNCE || h.bounce_size > MAX_BOUNCE_SIZE {
                return Err(ShmError::BadSegment("bounce geometry"));
            }
            if !within(h.bounce_off, h.nbounce as u64 * h.bounce_size as u64) {
                return Err(ShmError::BadSegment("bounce buffers outside the segment"));
            }
            if h.ctl_off % 64 != 0 || !within(h.ctl_off, 256) || h.ctl_off + 256 > h.data_off {
                return Err(ShmError::BadSegment("control block"));
            }
        } else if !within(h.data_off, 0) {
            return Err(ShmError::BadSegment("pool outside the segment"));
        }
        Ok(h)
    }
}

/// Hello flags.
pub const HELLO_HAS_POOL: u32 = 1;
/// The sender is the connecting side.
pub const HELLO_ACTIVE: u32 = 2;

/// What each side says when a connection starts; the segments, pool and
/// doorbell travel beside it as file descriptors (SCM_RIGHTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Hello {
    /// 0 for a hello; a non-zero [`RejectReason`] for a refusal.
    pub reject: u32,
    /// [`HELLO_HAS_POOL`], [`HELLO_ACTIVE`].
    pub flags: u32,
    /// Sender's NID (shm address number).
    pub src_nid: u64,
    /// Whom it wants to reach.
    pub dst_nid: u64,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's process id (for `process_vm_*`).
    pub pid: u32,
    /// Where, in the sender, an 8-byte probe word lives (CMA check).
    pub probe_addr: u64,
    /// What the probe word holds.
    pub probe_value: u64,
}

/// Why a hello was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RejectReason {
    /// The hello named a NID that is not ours.
    WrongNid = 1,
    /// We are connecting to you and win the race: use our connection.
    Race = 2,
    /// Bad segments or descriptors.
    Invalid = 3,
    /// Shutting down.
    Shutdown = 4,
}

impl Hello {
    /// Bytes of an encoded hello.
    pub const LEN: usize = 64;

    /// Encode.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC.to_ne_bytes());
        b[8..12].copy_from_slice(&SHM_VERSION.to_ne_bytes());
        b[12..16].copy_from_slice(&self.reject.to_ne_bytes());
        b[16..20].copy_from_slice(&self.flags.to_ne_bytes());
        b[20..24].copy_from_slice(&self.pid.to_ne_bytes());
        b[24..32].copy_from_slice(&self.src_nid.to_ne_bytes());
        b[32..40].copy_from_slice(&self.dst_nid.to_ne_bytes());
        b[40..48].copy_from_slice(&self.incarnation.to_ne_bytes());
        b[48..56].copy_from_slice(&self.probe_addr.to_ne_bytes());
        b[56..64].copy_from_slice(&self.probe_value.to_ne_bytes());
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Hello, ShmError> {
        if b.len() != Self::LEN {
            return Err(ShmError::BadHello("length"));
        }
        if u64_at(b, 0) != HELLO_MAGIC {
            return Err(ShmError::BadHello("magic"));
        }
        if u32_at(b, 8) != SHM_VERSION {
            return Err(ShmError::BadHello("version"));
        }
        Ok(Hello {
            reject: u32_at(b, 12),
            flags: u32_at(b, 16),
            pid: u32_at(b, 20),
            src_nid: u64_at(b, 24),
            dst_nid: u64_at(b, 32),
            incarnation: u64_at(b, 40),
            probe_addr: u64_at(b, 48),
            probe_value: u64_at(b, 56),
        })
    }
}

/// Slot message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// LNet header and the whole payload in the slot.
    Inline = 1,
    /// LNet header and a bulk descriptor; the receiver moves the payload
    /// and answers [`Kind::Done`] (or asks for [`Kind::WriteReq`] /
    /// [`Kind::BounceReq`]).
    Rdv = 2,
    /// Receiver to sender: the payload is moved (status in `aux`; bit 0 of
    /// `flags` = it was lent, keep the chunk until [`Kind::Release`]).
    Done = 3,
    /// Receiver to sender: copy the payload into these extents of my pool.
    WriteReq = 4,
    /// Sender to receiver: the copy into your pool is done (status in `aux`).
    WriteDone = 5,
    /// Receiver to sender: stream the first `aux` bytes of the payload
    /// through bounce buffers.
    BounceReq = 6,
    /// Sender to receiver: bounce buffer `aux` holds `len2` bytes for offset `off`.
    BounceData = 7,
    /// Receiver to sender: bounce buffer `aux` is free again.
    BounceFree = 8,
    /// Receiver to sender: the loan made with this cookie is dropped.
    Release = 9,
    /// A PUT from the sender's NID to the receiver's, its payload inline,
    /// under a [`CompactPut`] header instead of LNet's 72 bytes: the NIDs
    /// are the connection's, the match bits ride in the slot header's
    /// cookie. An 8-byte PUT then fits one cache line (48 bytes).
    Put = 10,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Inline,
            2 => Kind::Rdv,
            3 => Kind::Done,
            4 => Kind::WriteReq,
            5 => Kind::WriteDone,
            6 => Kind::BounceReq,
            7 => Kind::BounceData,
            8 => Kind::BounceFree,
            9 => Kind::Release,
            10 => Kind::Put,
            _ => return None,
        })
    }
}

/// Rdv flags: the extents are offsets in the sender's shared pool.
pub const RDV_POOL: u8 = 1;
/// Rdv flags: the source is immutable; the receiver may lend it.
pub const RDV_LOANABLE: u8 = 2;
/// Rdv flags: the sender has the receiver's pool mapped (it can copy
/// into it on a [`Kind::WriteReq`]).
pub const RDV_CAN_WRITE: u8 = 4;
/// Done flags: the payload was lent.
pub const DONE_LOANED: u8 = 1;
/// Put flags: the body carries the MD handle to ACK (16 bytes more).
pub const PUT_ACK: u8 = 1;
/// Bytes of a [`CompactPut`] body before its payload, without an ACK
/// handle.
pub const PUT_HDR: usize = 24;
/// ... and with one.
pub const PUT_HDR_ACK: usize = PUT_HDR + 16;

/// The header of a [`Kind::Put`] slot: what of a PUT's LNet header the
/// connection does not already say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactPut {
    /// The initiator's pid.
    pub src_pid: u32,
    /// The target's pid.
    pub dest_pid: u32,
    /// Portal.
    pub ptl_index: u32,
    /// Offset the initiator asked for.
    pub offset: u32,
    /// Out-of-band data.
    pub hdr_data: u64,
    /// Match bits (in the slot header's cookie).
    pub match_bits: u64,
    /// The MD to ACK, or [`WireHandle::NONE`].
    pub ack_wmd: WireHandle,
}

impl CompactPut {
    /// The compact form of `hdr` on a connection from `local` to `peer`:
    /// `None` unless it is a PUT from `local` to `peer` (a routed
    /// message, say, keeps the full header).
    #[inline]
    pub fn of(hdr: &Header, local: Nid, peer: Nid) -> Option<CompactPut> {
        let MsgBody::Put {
            ack_wmd,
            match_bits,
            hdr_data,
            ptl_index,
            offset,
        } = hdr.body
        else {
            return None;
        };
        (hdr.src_nid == local && hdr.dest_nid == peer).then_some(CompactPut {
            src_pid: hdr.src_pid,
            dest_pid: hdr.dest_pid,
            ptl_index,
            offset,
            hdr_data,
            match_bits,
            ack_wmd,
        })
    }

    /// Write the slot header and this header for `plen` payload bytes into
    /// `out`; returns the bytes written (the payload goes right after).
    #[inline]
    pub fn encode(&self, plen: usize, out: &mut [u8; SLOT_HDR + PUT_HDR_ACK]) -> usize {
        let ack = !self.ack_wmd.is_none();
        let hl = if ack { PUT_HDR_ACK } else { PUT_HDR };
        SlotHdr {
            kind: Kind::Put,
            flags: if ack { PUT_ACK } else { 0 },
            len: (hl + plen) as u32,
            cookie: self.match_bits,
        }
        .encode(out);
        let b = &mut out[SLOT_HDR..];
        b[0..4].copy_from_slice(&self.src_pid.to_ne_bytes());
        b[4..8].copy_from_slice(&self.dest_pid.to_ne_bytes());
        b[8..12].copy_from_slice(&self.ptl_index.to_ne_bytes());
        b[12..16].copy_from_slice(&self.offset.to_ne_bytes());
        b[16..24].copy_from_slice(&self.hdr_data.to_ne_bytes());
        if ack {
            b[24..32].copy_from_slice(&self.ack_wmd.interface_cookie.to_ne_bytes());
            b[32..40].copy_from_slice(&self.ack_wmd.object_cookie.to_ne_bytes());
        }
        SLOT_HDR + hl
    }

    /// Bytes of header a [`Kind::Put`] slot with header `h` carries before
    /// its payload; an error when its body is shorter than that.
    #[inline]
    pub fn header_len(h: &SlotHdr) -> Result<usize, ShmError> {
        let hl = if h.flags & PUT_ACK != 0 {
            PUT_HDR_ACK
        } else {
            PUT_HDR
        };
        if (h.len as usize) < hl {
            return Err(ShmError::BadSlot("short PUT header"));
        }
        Ok(hl)
    }

    /// Decode from a [`Kind::Put`] slot's header `h` and the first
    /// [`CompactPut::header_len`] bytes of its body, `b`.
    #[inline]
    pub fn decode(h: &SlotHdr, b: &[u8]) -> Result<CompactPut, ShmError> {
        let hl = Self::header_len(h)?;
        if b.len() < hl {
            return Err(ShmError::BadSlot("short PUT header"));
        }
        Ok(CompactPut {
            src_pid: u32_at(b, 0),
            dest_pid: u32_at(b, 4),
            ptl_index: u32_at(b, 8),
            offset: u32_at(b, 12),
            hdr_data: u64_at(b, 16),
            match_bits: h.cookie,
            ack_wmd: if hl == PUT_HDR_ACK {
                WireHandle {
                    interface_cookie: u64_at(b, 24),
                    object_cookie: u64_at(b, 32),
                }
            } else {
                WireHandle::NONE
            },
        })
    }

    /// The LNet header it stands for, from `src` to `dst`, with `plen`
    /// payload bytes.
    #[inline]
    pub fn header(&self, src: Nid, dst: Nid, plen: u32) -> Header {
        Header {
            dest_nid: dst,
            src_nid: src,
            dest_pid: self.dest_pid,
            src_pid: self.src_pid,
            payload_length: plen,
            body: MsgBody::Put {
                ack_wmd: self.ack_wmd,
                match_bits: self.match_bits,
                hdr_data: self.hdr_data,
                ptl_index: self.ptl_index,
                offset: self.offset,
            },
        }
    }
}

/// The fixed part of a slot: after the 4-byte mark ([`SLOT_MARK`]), the
/// kind (1 byte), flags (1 byte), body length (2 bytes: a slot is at most
/// [`MAX_SLOT`]) and the cookie (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHdr {
    /// Message kind.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Bytes of body after the slot header (below [`MAX_SLOT`]).
    pub len: u32,
    /// The sender's operation cookie.
    pub cookie: u64,
}

impl SlotHdr {
    /// Encode into the first [`SLOT_HDR`] bytes of `b`, all but the mark
    /// (bytes `0..SLOT_MARK`, left as they are).
    pub fn encode(&self, b: &mut [u8]) {
        debug_assert!(self.len < MAX_SLOT, "slot bodies fit 16 bits");
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&(self.len as u16).to_ne_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_ne_bytes());
    }
    /// Decode; `slot_size` bounds the body.
    pub fn decode(b: &[u8], slot_size: usize) -> Result<SlotHdr, ShmError> {
        if b.len() < SLOT_HDR {
            return Err(ShmError::BadSlot("short slot"));
        }
        // (Not `ok_or`: that builds, and drops, the error on every slot.)
        let Some(kind) = Kind::from_u8(b[4]) else {
            return Err(ShmError::BadSlot("unknown kind"));
        };
        let len = u32::from(u16::from_ne_bytes([b[6], b[7]]));
        if len as usize > slot_size.saturating_sub(SLOT_HDR) {
            return Err(ShmError::BadSlot("body longer than the slot"));
        }
        Ok(SlotHdr {
            kind,
            flags: b[5],
            len,
            cookie: u64_at(b, 8),
        })
    }
}

/// A decoded slot message (borrowing the copied-out body).
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// LNet header and payload.
    Inline {
        /// The LNet header.
        hdr: Header,
        /// Its payload (`hdr.payload_length` bytes).
        payload: &'a [u8],
    },
    /// A compact PUT and its payload.
    Put {
        /// Its header.
        put: CompactPut,
        /// Its payload.
        payload: &'a [u8],
    },
    /// LNet header and where the payload is.
    Rdv {
        /// The LNet header.
        hdr: Header,
        /// `RDV_*` flags.
        flags: u8,
        /// (address or pool offset, length) of each fragment.
        frags: Vec<(u64, u64)>,
    },
    /// The payload moved (status 0) or failed.
    Done {
        /// 0 = success.
        status: u32,
        /// The receiver kept a loan.
        loaned: bool,
    },
    /// Copy into these extents of the receiver's pool.
    WriteReq {
        /// (pool offset, length).
        frags: Vec<(u64, u64)>,
    },
    /// The copy into the pool is done.
    WriteDone {
        /// 0 = success.
        status: u32,
    },
    /// Stream the first `want` bytes through bounce buffers.
    BounceReq {
        /// Bytes the receiver takes (its `mlength`).
        want: u32,
    },
    /// One bounce chunk.
    BounceData {
        /// Bounce buffer index.
        idx: u32,
        /// Payload offset of the chunk.
        off: u64,
        /// Bytes in the buffer.
        len: u32,
    },
    /// A bounce buffer is free.
    BounceFree {
        /// Its index.
        idx: u32,
    },
    /// A loan is dropped.
    Release,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_ne_bytes(a)
}

fn decode_frags(b: &[u8], max_total: u64) -> Result<Vec<(u64, u64)>, ShmError> {
    if b.len() < 4 {
        return Err(ShmError::BadSlot("short descriptor"));
    }
    let n = u32_at(b, 0) as usize;
    if n > LNET_MAX_IOV || b.len() < 4 + n * 16 {
        return Err(ShmError::BadSlot("fragment count"));
    }
    let mut v = Vec::with_capacity(n);
    let mut total = 0u64;
    for i in 0..n {
        let a = u64_at(b, 4 + i * 16);
        let l = u64_at(b, 12 + i * 16);
        total = total
            .checked_add(l)
            .ok_or(ShmError::BadSlot("fragment length"))?;
        v.push((a, l));
    }
    if total > max_total {
        return Err(ShmError::BadSlot("fragments exceed the payload"));
    }
    Ok(v)
}

/// Encode a fragment list after `at`; returns bytes written.
pub fn encode_frags(b: &mut [u8], frags: &[(u64, u64)]) -> usize {
    b[0..4].copy_from_slice(&(frags.len() as u32).to_ne_bytes());
    for (i, (a, l)) in frags.iter().enumerate() {
        b[4 + i * 16..12 + i * 16].copy_from_slice(&a.to_ne_bytes());
        b[12 + i * 16..20 + i * 16].copy_from_slice(&l.to_ne_bytes());
    }
    4 + frags.len() * 16
}

/// Bytes a fragment list takes.
pub fn frags_len(n: usize) -> usize {
    4 + n * 16
}

/// Decode a slot (its header and body, already copied out of shared
/// memory). `slot` is the whole slot.
pub fn decode(slot: &[u8]) -> Result<(SlotHdr, Msg<'_>), ShmError> {
    let h = SlotHdr::decode(slot, slot.len())?;
    let body = &slot[SLOT_HDR..SLOT_HDR + h.len as usize];
    let aux = |b: &[u8]| -> Result<u32, ShmError> {
        if b.len() < 4 {
            Err(ShmError::BadSlot("short body"))
        } else {
            Ok(u32_at(b, 0))
        }
    };
    let lnet_hdr = |b: &[u8]| -> Result<Header, ShmError> {
        if b.len() < HDR_NID4_SIZE {
            return Err(ShmError::BadSlot("short LNet header"));
        }
        let hdr = Header::decode_nid4(&b[..HDR_NID4_SIZE], ByteOrder::NATIVE)
            .map_err(|_| ShmError::BadSlot("bad LNet header"))?;
        if hdr.payload_length > LNET_MTU {
            return Err(ShmError::BadSlot("payload over LNET_MTU"));
        }
        Ok(hdr)
    };
    let msg = match h.kind {
        Kind::Inline => {
            let hdr = lnet_hdr(body)?;
            let payload = &body[HDR_NID4_SIZE..];
            if payload.len() != hdr.payload_length as usize {
                return Err(ShmError::BadSlot("inline payload length"));
            }
            Msg::Inline { hdr, payload }
        }
        Kind::Put => {
            let put = CompactPut::decode(&h, body)?;
            let payload = &body[CompactPut::header_len(&h)?..];
            if payload.len() > LNET_MTU as usize {
                return Err(ShmError::BadSlot("payload over LNET_MTU"));
            }
            Msg::Put { put, payload }
        }
        Kind::Rdv => {
            let hdr = lnet_hdr(body)?;
            let frags = decode_frags(&body[HDR_NID4_SIZE..], hdr.payload_length as u64)?;
            Msg::Rdv {
                hdr,
                flags: h.flags,
                frags,
            }
        }
        Kind::Done => Msg::Done {
            status: aux(body)?,
            loaned: h.flags & DONE_LOANED != 0,
        },
        Kind::WriteReq => Msg::WriteReq {
            frags: decode_frags(body, LNET_MTU as u64)?,
        },
        Kind::WriteDone => Msg::WriteDone { status: aux(body)? },
        Kind::BounceReq => Msg::BounceReq { want: aux(body)? },
        Kind::BounceData => {
            if body.len() < 16 {
                return Err(ShmError::BadSlot("short bounce descriptor"));
            }
            Msg::BounceData {
                idx: u32_at(body, 0),
                len: u32_at(body, 4),
                off: u64_at(body, 8),
            }
        }
        Kind::BounceFree => Msg::BounceFree { idx: aux(body)? },
        Kind::Release => Msg::Release,
    };
    Ok((h, msg))
}

/// Encode a slot: its header then `body` parts; returns total bytes.
pub fn encode(out: &mut [u8], kind: Kind, flags: u8, cookie: u64, parts: &[&[u8]]) -> usize {
    let mut at = SLOT_HDR;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    SlotHdr {
        kind,
        flags,
        len: (at - SLOT_HDR) as u32,
        cookie,
    }
    .encode(out);
    at
}

/// Check a bounded fuzz input against every decoder (used by the fuzz
/// target and the corpus replay): none may panic.
pub fn fuzz_check(data: &[u8]) {
    if let Ok((h, m)) = decode(data) {
        // What decodes is within the slot and consistent.
        assert!(SLOT_HDR + h.len as usize <= data.len());
        match m {
            Msg::Inline { hdr, payload } => assert_eq!(payload.len(), hdr.payload_length as usize),
            Msg::Put { put, payload } => {
                let hl = CompactPut::header_len(&h).unwrap();
                assert_eq!(hl + payload.len(), h.len as usize);
                let mut b = [0u8; SLOT_HDR + PUT_HDR_ACK];
                let n = put.encode(payload.len(), &mut b);
                // (A Put flagged PUT_ACK whose handle is NONE re-encodes
                // without it.)
                if !put.ack_wmd.is_none() || hl == PUT_HDR {
                    assert_eq!(n, SLOT_HDR + hl);
                    assert_eq!(&b[SLOT_HDR..n], &data[SLOT_HDR..n]);
                }
            }
            Msg::Rdv { hdr, frags, .. } => {
                assert!(frags.len() <= LNET_MAX_IOV);
                assert!(frags.iter().map(|f| f.1).sum::<u64>() <= u64::from(hdr.payload_length));
            }
            _ => {}
        }
    }
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    for (size, kind) in [(data.len() as u64, SEG_RING), (1 << 30, SEG_POOL)] {
        if let Ok(h) = SegHeader::decode(data, size, kind) {
            assert_eq!(&h.encode()[..], &data[..SegHeader::LEN]);
            assert!(h.data_off <= h.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lnet::Nid;
    use lnet::wire::{MsgBody, WireHandle};

    fn hdr(len: u32) -> Header {
        Header {
            dest_nid: "2@shm".parse::<Nid>().unwrap(),
            src_nid: "1@shm".parse::<Nid>().unwrap(),
            dest_pid: 12345,
            src_pid: 12345,
            payload_length: len,
            body: MsgBody::Put {
                ack_wmd: WireHandle::NONE,
                match_bits: 7,
                hdr_data: 0,
                ptl_index: 4,
                offset: 0,
            },
        }
    }

    #[test]
    fn slot_header_leaves_the_mark_alone_and_holds_the_largest_body() {
        let mut b = [0xa5u8; SLOT_HDR];
        let h = SlotHdr {
            kind: Kind::BounceData,
            flags: RDV_POOL | RDV_CAN_WRITE,
            len: MAX_SLOT - SLOT_HDR as u32,
            cookie: u64::MAX - 1,
        };
        h.encode(&mut b);
        assert_eq!(b[..SLOT_MARK], [0xa5; SLOT_MARK], "the mark is the ring's");
        assert_eq!(SlotHdr::decode(&b, MAX_SLOT as usize).unwrap(), h);
        // One byte more than the slot holds is refused.
        let big = SlotHdr { len: 1025, ..h };
        big.encode(&mut b);
        assert!(SlotHdr::decode(&b, 1024 + SLOT_HDR).is_err());
        assert!(SlotHdr::decode(&b, 1025 + SLOT_HDR).is_ok());
    }

    #[test]
    fn compact_put_stands_for_the_lnet_header_on_its_connection() {
        let (local, peer) = (
            "1@shm".parse::<Nid>().unwrap(),
            "2@shm".parse::<Nid>().unwrap(),
        );
        for ack in [
            WireHandle::NONE,
            WireHandle {
                interface_cookie: 3,
                object_cookie: 4,
            },
        ] {
            let mut h = hdr(8);
            if let MsgBody::Put {
                ack_wmd,
                hdr_data,
                offset,
                ..
            } = &mut h.body
            {
                *ack_wmd = ack;
                *hdr_data = 0xfeed;
                *offset = 16;
            }
            let put = CompactPut::of(&h, local, peer).unwrap();
            let mut slot = vec![0u8; 256];
            let mut hb = [0u8; SLOT_HDR + PUT_HDR_ACK];
            let n = put.encode(8, &mut hb);
            // An 8-byte PUT without ACK fits one cache line.
            assert_eq!(n + 8, if ack.is_none() { 48 } else { 64 });
            slot[..n].copy_from_slice(&hb[..n]);
            slot[n..n + 8].copy_from_slice(b"12345678");
            let (sh, m) = decode(&slot).unwrap();
            assert_eq!(sh.kind, Kind::Put);
            let Msg::Put { put: got, payload } = m else {
                panic!("not a compact PUT: {m:?}")
            };
            assert_eq!(payload, b"12345678");
            // The receiver's view: from the peer (`local` here) to itself.
            assert_eq!(got.header(local, peer, 8), h);
            // Cut short: the header no longer fits the body.
            let mut short = slot.clone();
            SlotHdr {
                len: (n - SLOT_HDR - 1) as u32,
                ..sh
            }
            .encode(&mut short);
            assert!(matches!(decode(&short), Err(ShmError::BadSlot(_))));
        }
        // Not compact: someone else's PUT (routed), or not a PUT.
        let h = hdr(8);
        assert!(CompactPut::of(&h, peer, local).is_none());
        let mut g = hdr(0);
        g.body = MsgBody::Ack {
            dst_wmd: WireHandle::NONE,
            match_bits: 1,
            mlength: 0,
        };
        assert!(CompactPut::of(&g, local, peer).is_none());
    }

    #[test]
    fn inline_round_trip_and_checks() {
        let h = hdr(5);
        let hb = h.encode_nid4(ByteOrder::NATIVE).unwrap();
        let mut slot = vec![0u8; 512];
        encode(&mut slot, Kind::Inline, 0, 9, &[&hb, b"hello"]);
        let (sh, m) = decode(&slot).unwrap();
        assert_eq!(sh.cookie, 9);
        assert_eq!(
            m,
            Msg::Inline {
                hdr: h,
                payload: b"hello"
            }
        );
        // lie about the payload length
        let h2 = hdr(6);
        let hb2 = h2.encode_nid4(ByteOrder::NATIVE).unwrap();
        encode(&mut slot, Kind::Inline, 0, 9, &[&hb2, b"hello"]);
        assert!(decode(&slot).is_err());
        // body longer than the slot
        slot[4..8].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(matches!(decode(&slot), Err(ShmError::BadSlot(_))));
        slot[0] = 99;
        assert!(decode(&slot).is_err());
    }

    #[test]
    fn rdv_frags_bounded() {
        let h = hdr(100);
        let hb = h.encode_nid4(ByteOrder::NATIVE).unwrap();
        let mut fb = vec![0u8; frags_len(2)];
        encode_frags(&mut fb, &[(4096, 60), (8192, 40)]);
        let mut slot = vec![0u8; 1024];
        encode(&mut slot, Kind::Rdv, RDV_POOL, 1, &[&hb, &fb]);
        let (_, m) = decode(&slot).unwrap();
        assert!(matches!(m, Msg::Rdv { ref frags, .. } if frags == &[(4096, 60), (8192, 40)]));
        encode_frags(&mut fb, &[(4096, 60), (8192, 41)]);
        encode(&mut slot, Kind::Rdv, RDV_POOL, 1, &[&hb, &fb]);
        assert!(decode(&slot).is_err(), "more than the payload");
        encode_frags(&mut fb, &[(4096, u64::MAX), (8192, 2)]);
        encode(&mut slot, Kind::Rdv, RDV_POOL, 1, &[&hb, &fb]);
        assert!(decode(&slot).is_err(), "overflow");
        fb[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        encode(&mut slot, Kind::Rdv, RDV_POOL, 1, &[&hb, &fb]);
        assert!(decode(&slot).is_err(), "count");
    }

    #[test]
    fn segment_header_checks() {
        let h = SegHeader {
            kind: SEG_RING,
            size: 1 << 20,
            nslots: 64,
            slot_size: 8192,
            data_off: 4096,
            nbounce: 4,
            bounce_size: 65536,
            bounce_off: 4096 + 64 * 8192,
            ctl_off: 1024,
        };
        let b = h.encode();
        assert_eq!(SegHeader::decode(&b, 1 << 20, SEG_RING).unwrap(), h);
        assert!(SegHeader::decode(&b, 1 << 19, SEG_RING).is_err(), "size");
        assert!(SegHeader::decode(&b, 1 << 20, SEG_POOL).is_err(), "kind");
        let mut bad = h;
        bad.nslots = 200;
        assert!(SegHeader::decode(&bad.encode(), 1 << 20, SEG_RING).is_err());
        let mut bad = h;
        bad.bounce_off = u64::MAX - 10;
        assert!(SegHeader::decode(&bad.encode(), 1 << 20, SEG_RING).is_err());
        let mut bad = h;
        bad.ctl_off = 8192;
        assert!(SegHeader::decode(&bad.encode(), 1 << 20, SEG_RING).is_err());
        let mut bb = b;
        bb[0] ^= 1;
        assert!(SegHeader::decode(&bb, 1 << 20, SEG_RING).is_err());
    }

    #[test]
    fn hello_round_trip() {
        let h = Hello {
            reject: 0,
            flags: HELLO_HAS_POOL,
            src_nid: 1,
            dst_nid: 2,
            incarnation: 3,
            pid: 4,
            probe_addr: 5,
            probe_value: 6,
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        assert!(Hello::decode(&h.encode()[..63]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            fuzz_check(&data);
        }
    }
}
