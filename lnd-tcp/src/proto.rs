//! socklnd's wire formats and its connection rules, with no I/O.
//!
//! Layouts are those of Lustre's `lnet-idl.h` (acceptor request) and
//! `socklnd-idl.h` (hello, ksock message header); every multi-byte field
//! travels in the sender's byte order, which the receiver learns from the
//! magic. NIDs in their 20-byte form (`struct lnet_nid`) keep their own
//! fixed layout and are never swabbed.
//!
//! The negotiation rules ([`passive_check`], [`active_check`]) are plain
//! functions of what was received, so they are tested without sockets.

use lnet::wire::{ByteOrder, Reader, Writer};
use lnet::{Nid, Pid};

use crate::error::Reject;

/// Magic of the acceptor connection request (`LNET_PROTO_ACCEPTOR_MAGIC`).
pub const ACCEPTOR_MAGIC: u32 = 0xacce_7100;
/// Acceptor request version with an 8-byte NID.
pub const ACCEPTOR_VERSION_1: u32 = 1;
/// Acceptor request version with a 20-byte NID (`LNET_PROTO_ACCEPTOR_VERSION_16`).
pub const ACCEPTOR_VERSION_2: u32 = 2;
/// Bytes of an acceptor request v1.
pub const ACCEPTOR_V1_SIZE: usize = 16;
/// Bytes of an acceptor request v2.
pub const ACCEPTOR_V2_SIZE: usize = 28;
/// Magic of the socklnd hello (`LNET_PROTO_MAGIC`).
pub const LNET_PROTO_MAGIC: u32 = 0x4572_6963;
/// Magic of the long-gone protocol v1 (`LNET_PROTO_TCP_MAGIC`).
pub const LNET_PROTO_TCP_MAGIC: u32 = 0xeebc_0ded;
/// Highest source port the kernel regards as privileged
/// (`LNET_ACCEPTOR_MAX_RESERVED_PORT`).
pub const MAX_RESERVED_PORT: u16 = 1023;
/// Lowest source port tried when binding a privileged port
/// (`LNET_ACCEPTOR_MIN_RESERVED_PORT`).
pub const MIN_RESERVED_PORT: u16 = 512;
/// LNet's acceptor port.
pub const DEFAULT_PORT: u16 = 988;

/// ksock protocol version 2 (8-byte NIDs, optional checksum of header and payload).
pub const PROTO_V2: u32 = 2;
/// ksock protocol version 3 (8-byte NIDs; the default over IPv4).
pub const PROTO_V3: u32 = 3;
/// ksock protocol version 4 (20-byte NIDs; needed for IPv6).
pub const PROTO_V4: u32 = 4;

/// Most IP addresses a hello may list (`LNET_INTERFACES_NUM`).
pub const MAX_HELLO_IPS: u32 = 16;
/// Bytes of a hello with 8-byte NIDs (v2, v3), without the IP list.
pub const HELLO_NID4_SIZE: usize = 56;
/// Bytes of a hello with 20-byte NIDs (v4), without the IP list.
pub const HELLO_NID16_SIZE: usize = 80;

/// ksock message type: no LNet message (keepalive or ZC-ACK).
pub const KSOCK_MSG_NOOP: u32 = 0xc0;
/// ksock message type: an LNet message follows.
pub const KSOCK_MSG_LNET: u32 = 0xc1;
/// Bytes of the ksock message header.
pub const KSOCK_HDR_SIZE: usize = 24;
/// The ZC-ACK cookie that marks a keepalive NOOP (`SOCKNAL_KEEPALIVE_PING`).
pub const KEEPALIVE_PING: u64 = 1;

/// A connection's type (`SOCKLND_CONN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnType {
    /// Untyped (only when typed connections are off).
    Any,
    /// Small messages both ways.
    Control,
    /// Bulk towards the connection's opener.
    BulkIn,
    /// Bulk from the connection's opener.
    BulkOut,
}

/// `SOCKLND_CONN_NONE` as it travels (-1): "no connection" (a refusal
/// asking the active side to retry, or to wait for the peer).
pub const CONN_NONE: u32 = u32::MAX;

impl ConnType {
    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            ConnType::Any => 0,
            ConnType::Control => 1,
            ConnType::BulkIn => 2,
            ConnType::BulkOut => 3,
        }
    }
    /// From the wire; `None` for NONE and anything unknown.
    pub fn from_wire(v: u32) -> Option<ConnType> {
        Some(match v {
            0 => ConnType::Any,
            1 => ConnType::Control,
            2 => ConnType::BulkIn,
            3 => ConnType::BulkOut,
            _ => return None,
        })
    }
    /// The type as the other end sees it (bulk in and out swap).
    pub fn invert(self) -> ConnType {
        match self {
            ConnType::BulkIn => ConnType::BulkOut,
            ConnType::BulkOut => ConnType::BulkIn,
            t => t,
        }
    }
}

/// How well a message of `nob` bytes (ksock + LNet header + payload) fits
/// a connection type (`pro_match_tx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Never.
    No,
    /// Acceptable when nothing better is up.
    May,
    /// The right connection.
    Yes,
}

/// socklnd's choice of connection for a message of `nob` bytes.
pub fn fit(ctype: ConnType, nob: usize, min_bulk: usize) -> Fit {
    match ctype {
        ConnType::Any => Fit::Yes,
        ConnType::BulkIn => Fit::May,
        ConnType::BulkOut if nob >= min_bulk => Fit::Yes,
        ConnType::BulkOut => Fit::May,
        ConnType::Control if nob < min_bulk => Fit::Yes,
        ConnType::Control => Fit::May,
    }
}

/// The acceptor's connection request: the NID the connector wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptorRequest {
    /// Version 1, 8-byte NID.
    V1(Nid),
    /// Version 2, 20-byte NID.
    V2(Nid),
}

impl AcceptorRequest {
    /// The request for `nid`: v1 when it has an 8-byte form, else v2.
    pub fn for_nid(nid: Nid) -> AcceptorRequest {
        if nid.is_nid4() {
            AcceptorRequest::V1(nid)
        } else {
            AcceptorRequest::V2(nid)
        }
    }
    /// The target NID.
    pub fn nid(&self) -> Nid {
        match *self {
            AcceptorRequest::V1(n) | AcceptorRequest::V2(n) => n,
        }
    }
    /// Encode in `order`.
    pub fn encode(&self, order: ByteOrder) -> Vec<u8> {
        match self {
            AcceptorRequest::V1(n) => {
                let mut b = vec![0u8; ACCEPTOR_V1_SIZE];
                let mut w = Writer::new(&mut b, order);
                w.u32(ACCEPTOR_MAGIC);
                w.u32(ACCEPTOR_VERSION_1);
                w.u64(n.to_nid4().unwrap_or(u64::MAX));
                b
            }
            AcceptorRequest::V2(n) => {
                let mut b = vec![0u8; ACCEPTOR_V2_SIZE];
                let mut w = Writer::new(&mut b, order);
                w.u32(ACCEPTOR_MAGIC);
                w.u32(ACCEPTOR_VERSION_2);
                w.bytes(&n.to_wire16());
                b
            }
        }
    }
    /// What a kernel acceptor answers a request it cannot serve (an
    /// unknown version, or a peer that skipped the acceptor and opened
    /// with a hello): its magic and current version, NID zero.
    pub fn version_answer(order: ByteOrder) -> [u8; ACCEPTOR_V1_SIZE] {
        let mut b = [0u8; ACCEPTOR_V1_SIZE];
        let mut w = Writer::new(&mut b, order);
        w.u32(ACCEPTOR_MAGIC);
        w.u32(ACCEPTOR_VERSION_1);
        w.u64(0);
        b
    }
}

/// What the first four bytes on an accepted socket say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstWord {
    /// An acceptor request, in this order.
    Acceptor(ByteOrder),
    /// A hello without an acceptor request (answered with the acceptor's
    /// version, then closed, as the kernel does).
    Hello,
    /// Protocol v1's magic: refused.
    OldTcp,
    /// Anything else: refused.
    Unknown(u32),
}

/// Classify the first word read on an accepted socket.
pub fn first_word(b: [u8; 4]) -> FirstWord {
    if let Some(o) = ByteOrder::detect(b, ACCEPTOR_MAGIC) {
        FirstWord::Acceptor(o)
    } else if ByteOrder::detect(b, LNET_PROTO_MAGIC).is_some() {
        FirstWord::Hello
    } else if ByteOrder::detect(b, LNET_PROTO_TCP_MAGIC).is_some() {
        FirstWord::OldTcp
    } else {
        FirstWord::Unknown(u32::from_le_bytes(b))
    }
}

/// Bytes that follow the version in an acceptor request of `version`, or
/// `None` for a version we do not know.
pub fn acceptor_rest_len(version: u32) -> Option<usize> {
    match version {
        ACCEPTOR_VERSION_1 => Some(8),
        ACCEPTOR_VERSION_2 => Some(20),
        _ => None,
    }
}

/// Decode the NID that follows the version of an acceptor request.
pub fn acceptor_nid(version: u32, rest: &[u8], order: ByteOrder) -> Result<Nid, Reject> {
    match version {
        ACCEPTOR_VERSION_1 => {
            let v = Reader::new(rest, order)
                .u64()
                .map_err(|_| Reject::Truncated)?;
            Nid::try_from_nid4(v).map_err(|_| Reject::BadNid)
        }
        ACCEPTOR_VERSION_2 => {
            let a: [u8; 20] = rest.try_into().map_err(|_| Reject::Truncated)?;
            Nid::from_wire16(&a).map_err(|_| Reject::BadNid)
        }
        v => Err(Reject::BadAcceptorVersion(v)),
    }
}

/// A socklnd hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version ([`PROTO_V2`], [`PROTO_V3`], [`PROTO_V4`]).
    pub version: u32,
    /// The sender's NID.
    pub src_nid: Nid,
    /// The NID the sender wants.
    pub dst_nid: Nid,
    /// The sender's pid.
    pub src_pid: Pid,
    /// The pid the sender expects (informative).
    pub dst_pid: Pid,
    /// The sender's incarnation (changes when it restarts).
    pub src_incarnation: u64,
    /// The incarnation the sender knows of us (informative).
    pub dst_incarnation: u64,
    /// Connection type as the sender sees it, or [`CONN_NONE`].
    pub ctype: u32,
}

impl Hello {
    /// Bytes of this version's hello (without IPs).
    pub fn size(version: u32) -> usize {
        if version >= PROTO_V4 {
            HELLO_NID16_SIZE
        } else {
            HELLO_NID4_SIZE
        }
    }
    /// True for versions we speak.
    pub fn known_version(v: u32) -> bool {
        matches!(v, PROTO_V2 | PROTO_V3 | PROTO_V4)
    }
    /// Encode in `order`. v2 and v3 need NIDs with an 8-byte form.
    pub fn encode(&self, order: ByteOrder) -> Result<Vec<u8>, Reject> {
        let mut b = vec![0u8; Hello::size(self.version)];
        let mut w = Writer::new(&mut b, order);
        w.u32(LNET_PROTO_MAGIC);
        w.u32(self.version);
        if self.version >= PROTO_V4 {
            w.bytes(&self.src_nid.to_wire16());
            w.bytes(&self.dst_nid.to_wire16());
        } else {
            let s = self.src_nid.to_nid4().ok_or(Reject::NeedsLargeNids)?;
            let d = self.dst_nid.to_nid4().ok_or(Reject::NeedsLargeNids)?;
            w.u64(s);
            w.u64(d);
        }
        w.u32(self.src_pid);
        w.u32(self.dst_pid);
        w.u64(self.src_incarnation);
        w.u64(self.dst_incarnation);
        w.u32(self.ctype);
        w.u32(0); // nips: always sent as zero
        Ok(b)
    }

    /// Read the first 8 bytes: the byte order and the version.
    pub fn decode_prefix(b: [u8; 8]) -> Result<(ByteOrder, u32), Reject> {
        let m: [u8; 4] = [b[0], b[1], b[2], b[3]];
        let order = ByteOrder::detect(m, LNET_PROTO_MAGIC)
            .ok_or(Reject::BadMagic(u32::from_le_bytes(m)))?;
        let v = Reader::new(&b[4..], order)
            .u32()
            .map_err(|_| Reject::Truncated)?;
        Ok((order, v))
    }

    /// Decode the rest of a hello (everything after magic and version;
    /// [`Hello::size`]` - 8` bytes). Returns it and the number of IP
    /// addresses that follow (at most [`MAX_HELLO_IPS`]; read and ignore
    /// `4 *` that many bytes).
    pub fn decode_rest(version: u32, order: ByteOrder, b: &[u8]) -> Result<(Hello, u32), Reject> {
        if !Hello::known_version(version) {
            return Err(Reject::BadVersion(version));
        }
        if b.len() != Hello::size(version) - 8 {
            return Err(Reject::Truncated);
        }
        let mut r = Reader::new(b, order);
        let t = |_| Reject::Truncated;
        let (src_nid, dst_nid) = if version >= PROTO_V4 {
            let s: [u8; 20] = r.array().map_err(t)?;
            let d: [u8; 20] = r.array().map_err(t)?;
            (
                Nid::from_wire16(&s).map_err(|_| Reject::BadNid)?,
                Nid::from_wire16(&d).map_err(|_| Reject::BadNid)?,
            )
        } else {
            let s = r.u64().map_err(t)?;
            let d = r.u64().map_err(t)?;
            (
                Nid::try_from_nid4(s).map_err(|_| Reject::BadNid)?,
                Nid::try_from_nid4(d).map_err(|_| Reject::BadNid)?,
            )
        };
        let h = Hello {
            version,
            src_nid,
            dst_nid,
            src_pid: r.u32().map_err(t)?,
            dst_pid: r.u32().map_err(t)?,
            src_incarnation: r.u64().map_err(t)?,
            dst_incarnation: r.u64().map_err(t)?,
            ctype: r.u32().map_err(t)?,
        };
        let nips = r.u32().map_err(t)?;
        if nips > MAX_HELLO_IPS || (version >= PROTO_V4 && nips != 0) {
            return Err(Reject::BadHello("too many IP addresses"));
        }
        Ok((h, nips))
    }

    /// Decode a whole hello (no IP list) in one go.
    pub fn decode(b: &[u8]) -> Result<Hello, Reject> {
        let p: [u8; 8] = b
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or(Reject::Truncated)?;
        let (order, v) = Hello::decode_prefix(p)?;
        if !Hello::known_version(v) {
            return Err(Reject::BadVersion(v));
        }
        let rest = b.get(8..Hello::size(v)).ok_or(Reject::Truncated)?;
        Ok(Hello::decode_rest(v, order, rest)?.0)
    }
}

/// The protocol version we offer first to a peer at `ip_v6` (or one whose
/// NIDs have no 8-byte form): v4 where large NIDs are needed, else
/// `preferred` (v3 by default), as the kernel picks by address family.
pub fn initial_version(preferred: u32, needs_large: bool) -> u32 {
    if needs_large { PROTO_V4 } else { preferred }
}

/// What the passive side decides about a received hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassiveVerdict {
    /// Accept; the connection has this type on our side.
    Accept(ConnType),
    /// Answer with a hello of type NONE (the active side retries later or
    /// waits for our own connection) and close: we lost nothing, but the
    /// peer must not have this connection now.
    Refuse(Reject),
}

/// The passive side's checks on a hello (the kernel's
/// `ksocknal_recv_hello` and the start of `ksocknal_create_conn`):
/// `me` is our NID, `connecting` says we are dialling that peer ourselves,
/// `enough(type)` says the dial would duplicate a connection of that type
/// (our side's view) that we already have or are accepting for this peer
/// incarnation (socklnd answers EALREADY).
///
/// ```
/// use lnd_tcp::proto::{passive_check, ConnType, Hello, PassiveVerdict, PROTO_V3};
/// use lnd_tcp::Reject;
/// let (me, peer) = ("10.0.0.2@tcp".parse().unwrap(), "10.0.0.1@tcp".parse().unwrap());
/// let h = Hello { version: PROTO_V3, src_nid: peer, dst_nid: me, src_pid: 12345,
///     dst_pid: 12345, src_incarnation: 7, dst_incarnation: 0, ctype: 1 };
/// assert_eq!(passive_check(&h, me, false, |_| false).unwrap(),
///            PassiveVerdict::Accept(ConnType::Control));
/// assert_eq!(passive_check(&h, me, false, |t| t == ConnType::Control).unwrap(),
///            PassiveVerdict::Refuse(Reject::Duplicate));
/// ```
pub fn passive_check(
    h: &Hello,
    me: Nid,
    connecting: bool,
    enough: impl FnOnce(ConnType) -> bool,
) -> Result<PassiveVerdict, Reject> {
    if h.src_nid.is_any() {
        return Err(Reject::BadHello("source NID is LNET_NID_ANY"));
    }
    if h.dst_nid != me {
        return Err(Reject::WrongNid(h.dst_nid));
    }
    let Some(ct) = ConnType::from_wire(h.ctype) else {
        return Err(Reject::BadHello("bad connection type"));
    };
    // Both ends dialling each other: the higher NID's connection wins.
    // (NIDs compare as the kernel's memcmp of `struct lnet_nid`.)
    if connecting && h.src_nid.to_wire16() < me.to_wire16() {
        return Ok(PassiveVerdict::Refuse(Reject::Race));
    }
    let ours = ct.invert();
    if enough(ours) {
        return Ok(PassiveVerdict::Refuse(Reject::Duplicate));
    }
    Ok(PassiveVerdict::Accept(ours))
}

/// What the active side makes of the peer's answering hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActiveVerdict {
    /// Connected.
    Connected,
    /// The peer speaks another version: reconnect offering it.
    RetryWith(u32),
    /// The peer refused this connection (it won a connection race or has
    /// enough of this type): wait for it, retry later.
    Refused,
}

/// The active side's checks (`ksocknal_recv_hello`, active half): we sent
/// `sent_version` and `ctype` to `peer`.
pub fn active_check(
    h: &Hello,
    sent_version: u32,
    ctype: ConnType,
    peer: Nid,
    me: Nid,
) -> Result<ActiveVerdict, Reject> {
    if h.src_nid != peer {
        return Err(Reject::WrongPeer(h.src_nid));
    }
    if h.dst_nid != me && !h.dst_nid.is_any() {
        return Err(Reject::WrongNid(h.dst_nid));
    }
    if h.ctype == CONN_NONE {
        return Ok(if h.version != sent_version {
            ActiveVerdict::RetryWith(h.version)
        } else {
            ActiveVerdict::Refused
        });
    }
    if h.version != sent_version {
        return Err(Reject::BadVersion(h.version));
    }
    match ConnType::from_wire(h.ctype) {
        Some(t) if t.invert() == ctype => Ok(ActiveVerdict::Connected),
        _ => Err(Reject::BadHello("mismatched connection type")),
    }
}

/// The ksock message header (`struct ksock_msg_hdr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KsockHdr {
    /// [`KSOCK_MSG_NOOP`] or [`KSOCK_MSG_LNET`].
    pub msg_type: u32,
    /// Checksum, or 0 for none.
    pub csum: u32,
    /// Zero-copy cookies: `[0]` asks for a ZC-ACK, `[1]` acknowledges one
    /// (or is [`KEEPALIVE_PING`]).
    pub zc_cookies: [u64; 2],
}

impl KsockHdr {
    /// Encode in `order`.
    pub fn encode(&self, order: ByteOrder) -> [u8; KSOCK_HDR_SIZE] {
        let mut b = [0u8; KSOCK_HDR_SIZE];
        let mut w = Writer::new(&mut b, order);
        w.u32(self.msg_type);
        w.u32(self.csum);
        w.u64(self.zc_cookies[0]);
        w.u64(self.zc_cookies[1]);
        b
    }
    /// Decode (any type; the caller rejects unknown ones).
    pub fn decode(b: &[u8; KSOCK_HDR_SIZE], order: ByteOrder) -> KsockHdr {
        let mut r = Reader::new(b, order);
        // The buffer has exactly the size read below.
        let mut n32 = || r.u32().unwrap_or(0);
        let msg_type = n32();
        let csum = n32();
        KsockHdr {
            msg_type,
            csum,
            zc_cookies: [r.u64().unwrap_or(0), r.u64().unwrap_or(0)],
        }
    }
    /// A keepalive NOOP.
    pub fn keepalive() -> KsockHdr {
        KsockHdr {
            msg_type: KSOCK_MSG_NOOP,
            csum: 0,
            zc_cookies: [0, KEEPALIVE_PING],
        }
    }
    /// A NOOP acknowledging zero-copy cookie `c`.
    pub fn zc_ack(c: u64) -> KsockHdr {
        KsockHdr {
            msg_type: KSOCK_MSG_NOOP,
            csum: 0,
            zc_cookies: [0, c],
        }
    }
}

/// socklnd's checksum: CRC-32 (the Ethernet polynomial, reflected) seeded
/// with `!0` and not inverted at the end (the kernel's `crc32_le(~0, ..)`).
#[derive(Clone, Debug)]
pub struct Csum(crc32fast::Hasher);

impl Default for Csum {
    fn default() -> Self {
        Csum(crc32fast::Hasher::new())
    }
}

impl Csum {
    /// Feed bytes.
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b)
    }
    /// The value as it goes on the wire (never 0: 0 means "no checksum",
    /// and a sum that happens to be 0 is simply not checked).
    pub fn finish(self) -> u32 {
        !self.0.finalize()
    }
}

/// A connection's protocol, as far as framing is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// Negotiated version.
    pub version: u32,
    /// The peer's byte order (what we decode with).
    pub peer_order: ByteOrder,
}

impl Framing {
    /// Bytes of the LNet header on this connection.
    pub fn lnet_hdr_size(&self) -> usize {
        if self.version >= PROTO_V4 {
            lnet::wire::HDR_NID16_SIZE
        } else {
            lnet::wire::HDR_NID4_SIZE
        }
    }
    /// Whether a checksum covers the headers (v2) or only the payload.
    pub fn csum_covers_header(&self) -> bool {
        self.version == PROTO_V2
    }
}

/// The fuzz check of every decoder here (used by the fuzz target and by
/// the test that replays its corpus): nothing panics, and whatever decodes
/// re-encodes to the same value.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) {
    if let Ok(h) = Hello::decode(data) {
        for order in [ByteOrder::Little, ByteOrder::Big] {
            let e = h.encode(order).expect("a decoded hello encodes");
            assert_eq!(Hello::decode(&e), Ok(h));
        }
    }
    if let Some(w) = data.get(..4) {
        let _ = first_word(w.try_into().unwrap_or_default());
    }
    for v in [ACCEPTOR_VERSION_1, ACCEPTOR_VERSION_2, 3] {
        for order in [ByteOrder::Little, ByteOrder::Big] {
            let n = acceptor_rest_len(v).unwrap_or(8);
            if let Some(rest) = data.get(..n) {
                let _ = acceptor_nid(v, rest, order);
            }
        }
    }
    if let Some(b) = data.get(..KSOCK_HDR_SIZE) {
        let b: &[u8; KSOCK_HDR_SIZE] = b.try_into().unwrap_or(&[0; KSOCK_HDR_SIZE]);
        let k = KsockHdr::decode(b, ByteOrder::Big);
        assert_eq!(
            KsockHdr::decode(&k.encode(ByteOrder::Big), ByteOrder::Big),
            k
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_type_inversion_and_fit() {
        assert_eq!(ConnType::BulkIn.invert(), ConnType::BulkOut);
        assert_eq!(ConnType::Control.invert(), ConnType::Control);
        assert_eq!(fit(ConnType::Control, 100, 1024), Fit::Yes);
        assert_eq!(fit(ConnType::Control, 2000, 1024), Fit::May);
        assert_eq!(fit(ConnType::BulkOut, 2000, 1024), Fit::Yes);
        assert_eq!(fit(ConnType::BulkIn, 2000, 1024), Fit::May);
        assert_eq!(ConnType::from_wire(CONN_NONE), None);
    }

    #[test]
    fn checksum_matches_the_kernels_crc32_le() {
        // crc32_le(~0, "123456789") without final inversion is the
        // complement of the standard CRC-32 check value 0xCBF43926.
        let mut c = Csum::default();
        c.update(b"123456789");
        assert_eq!(c.finish(), !0xCBF4_3926u32);
    }

    #[test]
    fn race_resolution_favours_the_higher_nid() {
        let lo: Nid = "10.0.0.1@tcp".parse().unwrap();
        let hi: Nid = "10.0.0.2@tcp".parse().unwrap();
        let h = |src, dst| Hello {
            version: PROTO_V3,
            src_nid: src,
            dst_nid: dst,
            src_pid: 12345,
            dst_pid: 12345,
            src_incarnation: 1,
            dst_incarnation: 0,
            ctype: 1,
        };
        // hi receives lo's dial while dialling lo: refuse.
        assert_eq!(
            passive_check(&h(lo, hi), hi, true, |_| false).unwrap(),
            PassiveVerdict::Refuse(Reject::Race)
        );
        // lo receives hi's dial while dialling hi: accept.
        assert_eq!(
            passive_check(&h(hi, lo), lo, true, |_| false).unwrap(),
            PassiveVerdict::Accept(ConnType::Control)
        );
        // A second control connection of the same incarnation: refuse,
        // whoever dials (and the race rule still comes first).
        assert_eq!(
            passive_check(&h(hi, lo), lo, false, |t| t == ConnType::Control).unwrap(),
            PassiveVerdict::Refuse(Reject::Duplicate)
        );
        assert_eq!(
            passive_check(&h(lo, hi), hi, true, |_| true).unwrap(),
            PassiveVerdict::Refuse(Reject::Race)
        );
        // Bulk types are counted from our side: their BULK_IN is our BULK_OUT.
        let mut bulk = h(hi, lo);
        bulk.ctype = ConnType::BulkIn.to_wire();
        assert_eq!(
            passive_check(&bulk, lo, false, |t| t == ConnType::BulkIn).unwrap(),
            PassiveVerdict::Accept(ConnType::BulkOut)
        );
        assert!(matches!(
            passive_check(&h(hi, hi), lo, false, |_| false),
            Err(Reject::WrongNid(_))
        ));
    }
}
