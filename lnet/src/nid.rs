//! Network identifiers: network types, networks, NIDs and process ids.
//!
//! A NID names one end-point: a network (an LND type and a network number)
//! and an address within it. Kernel LNet knows two encodings:
//!
//! * the 8-byte `lnet_nid_t`: `type << 48 | num << 32 | addr32`, and
//! * the 20-byte `struct lnet_nid`: size byte (address bytes - 4), type byte,
//!   big-endian 16-bit network number and four big-endian 32-bit address
//!   words (so IPv6 addresses fit).
//!
//! [`Nid`] holds the large form; [`Nid::to_nid4`] and [`Nid::from_nid4`]
//! convert when the address has 4 bytes.
//!
//! ```
//! use lnet::{Nid, NetType};
//! let nid: Nid = "192.168.1.2@tcp".parse().unwrap();
//! assert_eq!(nid.net().net_type(), NetType::SOCKLND);
//! assert_eq!(nid.to_string(), "192.168.1.2@tcp");
//! assert_eq!("10.0.0.1@tcp0".parse::<Nid>().unwrap().to_string(), "10.0.0.1@tcp");
//! assert_eq!(Nid::from_nid4(nid.to_nid4().unwrap()), nid);
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::error::NidParseError;

/// An LND type number (the `nid_type` byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct NetType(pub u8);

/// How the addresses of a network type are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AddrForm {
    /// IPv4 dotted quad or IPv6.
    Ip,
    /// A decimal (or `0x` hex) number.
    Num,
}

impl NetType {
    /// TCP (socklnd).
    pub const SOCKLND: NetType = NetType(2);
    /// InfiniBand / RoCE (o2iblnd).
    pub const O2IBLND: NetType = NetType(5);
    /// The loopback `lo` network.
    pub const LOLND: NetType = NetType(9);
    /// Cray/HPE Gemini.
    pub const GNILND: NetType = NetType(13);
    /// Cray/HPE Gemini over IP.
    pub const GNIIPLND: NetType = NetType(14);
    /// Portals 4 (BXI).
    pub const PTL4LND: NetType = NetType(15);
    /// HPE kfabric.
    pub const KFILND: NetType = NetType(16);
    /// Amazon EFA.
    pub const EFALND: NetType = NetType(18);
    /// Bull BXIv3.
    pub const BXI3LND: NetType = NetType(19);
    /// The shared-memory network `shm` of this library.
    ///
    /// Lustre's registry of LND numbers (`nidstr.h`) uses 1..=19 and
    /// reserves 0xff for "any"; 0xe0 is far from both, so a `shm` NID can
    /// never be confused with a kernel LND's. `shm` NIDs only make sense
    /// between processes of one host and never reach a kernel node.
    pub const SHMLND: NetType = NetType(0xe0);
    /// The wildcard type of [`Nid::ANY`].
    pub const ANY: NetType = NetType(0xff);

    const TABLE: &'static [(NetType, &'static str, AddrForm)] = &[
        (NetType::LOLND, "lo", AddrForm::Num),
        (NetType::SOCKLND, "tcp", AddrForm::Ip),
        (NetType::O2IBLND, "o2ib", AddrForm::Ip),
        (NetType::GNILND, "gni", AddrForm::Num),
        (NetType::GNIIPLND, "gip", AddrForm::Ip),
        (NetType::PTL4LND, "ptlf", AddrForm::Num),
        (NetType::KFILND, "kfi", AddrForm::Num),
        (NetType::EFALND, "efa", AddrForm::Ip),
        (NetType::BXI3LND, "bxi3f", AddrForm::Num),
        (NetType::SHMLND, "shm", AddrForm::Num),
    ];

    fn entry(self) -> Option<&'static (NetType, &'static str, AddrForm)> {
        Self::TABLE.iter().find(|e| e.0 == self)
    }

    /// The name users write (`tcp`, `o2ib`, `lo`, `shm`...), if known.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// True when addresses of this type are IP addresses (`tcp`, `o2ib`...).
    pub fn is_ip_addressed(self) -> bool {
        self.addr_form() == AddrForm::Ip
    }

    fn addr_form(self) -> AddrForm {
        self.entry().map_or(AddrForm::Num, |e| e.2)
    }
}

/// A network: an LND type and a network number (`tcp1` is type 2, number 1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Net {
    ty: NetType,
    num: u16,
}

impl Net {
    /// The `lo` network.
    pub const LO: Net = Net::new(NetType::LOLND, 0);
    /// The wildcard network (`LNET_NET_ANY`).
    pub const ANY: Net = Net::new(NetType::ANY, 0xffff);

    /// A network of `ty` numbered `num`.
    pub const fn new(ty: NetType, num: u16) -> Net {
        Net { ty, num }
    }
    /// The LND type.
    pub fn net_type(self) -> NetType {
        self.ty
    }
    /// The network number.
    pub fn num(self) -> u16 {
        self.num
    }
    /// The 32-bit form used by kernel LNet (`type << 16 | num`).
    pub fn to_u32(self) -> u32 {
        (u32::from(self.ty.0) << 16) | u32::from(self.num)
    }
    /// From the 32-bit form.
    pub fn from_u32(v: u32) -> Net {
        Net::new(NetType((v >> 16) as u8), v as u16)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ty.name() {
            Some(n) if self.num == 0 => f.write_str(n),
            Some(n) => write!(f, "{n}{}", self.num),
            None => write!(f, "<{}:{}>", self.ty.0, self.num),
        }
    }
}

impl FromStr for Net {
    type Err = NidParseError;
    fn from_str(s: &str) -> Result<Net, NidParseError> {
        if s.is_empty() {
            return Err(NidParseError::Empty);
        }
        // Longest name first so "o2ib" wins over a hypothetical "o".
        let mut best: Option<&(NetType, &str, AddrForm)> = None;
        for e in NetType::TABLE {
            if s.starts_with(e.1) && best.is_none_or(|b| b.1.len() < e.1.len()) {
                best = Some(e);
            }
        }
        let e = best.ok_or_else(|| NidParseError::UnknownNetType(s.to_owned()))?;
        let rest = &s[e.1.len()..];
        if rest.is_empty() {
            return Ok(Net::new(e.0, 0));
        }
        if e.0 == NetType::LOLND {
            return Err(NidParseError::NetNumberNotAllowed(s.to_owned()));
        }
        if !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NidParseError::BadNetNumber(s.to_owned()));
        }
        let num: u16 = rest
            .parse()
            .map_err(|_| NidParseError::BadNetNumber(s.to_owned()))?;
        Ok(Net::new(e.0, num))
    }
}

/// A NID in LNet's large form (addresses of 4 or 16 bytes).
///
/// Ordering compares network, then address, which gives the total order
/// socklnd uses to break ties between simultaneous connections.
#[derive(Clone, Copy, Eq)]
// The type, length and network number together in the first four bytes:
// comparing them is one 32-bit load and compare (see `PartialEq`).
#[repr(C)]
pub struct Nid {
    ty: NetType,
    /// Number of address bytes: 4 or 16.
    len: u8,
    num: u16,
    addr: [u8; 16],
}

impl Ord for Nid {
    fn cmp(&self, other: &Nid) -> std::cmp::Ordering {
        (self.ty, self.num, self.len, self.addr).cmp(&(other.ty, other.num, other.len, other.addr))
    }
}

impl PartialOrd for Nid {
    fn partial_cmp(&self, other: &Nid) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Nid {
    /// Type, length and network number as one word (laid out side by
    /// side: one load).
    #[inline(always)]
    fn tag(&self) -> u32 {
        u32::from(self.ty.0) | u32::from(self.len) << 8 | u32::from(self.num) << 16
    }

    /// The NID as three words (its [`Nid::tag`]; the two halves of the
    /// address): what hashing uses.
    #[inline]
    fn words(&self) -> (u32, u64, u64) {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            b0,
            b1,
            b2,
            b3,
            b4,
            b5,
            b6,
            b7,
        ] = self.addr;
        (
            self.tag(),
            u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
        )
    }
}

// Three words instead of a field at a time: NIDs are hashed and compared
// on every message (peer tables, matching, routing).
impl std::hash::Hash for Nid {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let (t, a, b) = self.words();
        h.write_u32(t);
        h.write_u64(a);
        h.write_u64(b);
    }
}

impl PartialEq for Nid {
    // The address (it tells most NIDs apart: one 16-byte compare), then
    // type, length and network number as one word: laid out side by side
    // (`repr(C)`), they load as one (NIDs are compared several times per
    // message: locality, route, connection cache). Equal fields make
    // equal words, so this agrees with `Hash`.
    #[inline]
    fn eq(&self, other: &Nid) -> bool {
        self.addr == other.addr && self.tag() == other.tag()
    }
}

/// Size of `struct lnet_nid` on the wire.
pub const NID16_WIRE_SIZE: usize = 20;

impl Nid {
    /// The wildcard NID (`LNET_ANY_NID`; `LNET_NID_ANY` in the 8-byte form).
    pub const ANY: Nid = Nid {
        ty: NetType::ANY,
        num: 0xffff,
        len: 16,
        addr: [0xff; 16],
    };
    /// `0@lo`.
    pub const LO: Nid = Nid {
        ty: NetType::LOLND,
        num: 0,
        len: 4,
        addr: [0; 16],
    };

    /// A NID with a 32-bit address (an IPv4 address or a number).
    pub const fn new4(net: Net, addr: u32) -> Nid {
        if net.ty.0 == NetType::ANY.0 {
            return Nid::ANY;
        }
        Nid {
            ty: net.ty,
            num: net.num,
            len: 4,
            // The address first, in network order, then zeros: one
            // 16-byte value (two stores), not sixteen bytes.
            addr: ((addr as u128) << 96).to_be_bytes(),
        }
    }

    /// A NID for an IP address on `net`.
    pub fn from_ip(net: Net, ip: IpAddr) -> Nid {
        match ip {
            IpAddr::V4(v4) => Nid::new4(net, u32::from(v4)),
            IpAddr::V6(v6) => Nid {
                ty: net.ty,
                num: net.num,
                len: 16,
                addr: v6.octets(),
            },
        }
    }

    /// The network.
    pub fn net(&self) -> Net {
        Net::new(self.ty, self.num)
    }
    /// True for the wildcard.
    pub fn is_any(&self) -> bool {
        self.ty == NetType::ANY
    }
    /// True when the address has 4 bytes, so the 8-byte form can carry it.
    pub fn is_nid4(&self) -> bool {
        self.len == 4
    }
    /// Address bytes (4 or 16), network byte order.
    pub fn addr_bytes(&self) -> &[u8] {
        &self.addr[..usize::from(self.len)]
    }
    /// The 32-bit address of a 4-byte NID.
    pub fn addr4(&self) -> Option<u32> {
        self.is_nid4()
            .then(|| u32::from_be_bytes([self.addr[0], self.addr[1], self.addr[2], self.addr[3]]))
    }
    /// The address as an IP address, for IP-addressed networks.
    pub fn ip(&self) -> Option<IpAddr> {
        if self.ty.addr_form() != AddrForm::Ip || self.is_any() {
            return None;
        }
        match self.len {
            4 => Some(IpAddr::V4(Ipv4Addr::from(self.addr4()?))),
            16 => Some(IpAddr::V6(Ipv6Addr::from(self.addr))),
            _ => None,
        }
    }

    /// The 8-byte `lnet_nid_t`, when the address fits in 32 bits.
    pub fn to_nid4(&self) -> Option<u64> {
        if self.is_any() {
            return Some(u64::MAX);
        }
        let a = self.addr4()?;
        Some((u64::from(self.net().to_u32()) << 32) | u64::from(a))
    }

    /// From an 8-byte `lnet_nid_t` read off the wire: its top byte must be
    /// zero (LNet reserves it), and type 0xff means "any".
    pub fn try_from_nid4(v: u64) -> Result<Nid, crate::WireError> {
        match (v >> 56) as u8 {
            0 => Ok(Nid::from_nid4(v)),
            _ if v == u64::MAX => Ok(Nid::ANY),
            top => Err(crate::WireError::BadNid(top)),
        }
    }

    /// From the 8-byte `lnet_nid_t` (the top byte is ignored).
    pub fn from_nid4(v: u64) -> Nid {
        if v == u64::MAX {
            return Nid::ANY;
        }
        Nid::new4(Net::from_u32((v >> 32) as u32), v as u32)
    }

    /// Encode as the 20-byte `struct lnet_nid`.
    pub fn to_wire16(&self) -> [u8; NID16_WIRE_SIZE] {
        if self.is_any() {
            return [0xff; NID16_WIRE_SIZE];
        }
        let mut b = [0u8; NID16_WIRE_SIZE];
        b[0] = self.len - 4;
        b[1] = self.ty.0;
        b[2..4].copy_from_slice(&self.num.to_be_bytes());
        b[4..20].copy_from_slice(&self.addr);
        b
    }

    /// Decode a 20-byte `struct lnet_nid` (its fields are big-endian whatever
    /// the sender's order).
    pub fn from_wire16(b: &[u8; NID16_WIRE_SIZE]) -> Result<Nid, crate::WireError> {
        if b[1] == NetType::ANY.0 {
            return Ok(Nid::ANY);
        }
        let len = match b[0] {
            0 => 4u8,
            12 => 16u8,
            other => return Err(crate::WireError::BadNid(other)),
        };
        let mut addr = [0u8; 16];
        addr[..usize::from(len)].copy_from_slice(&b[4..4 + usize::from(len)]);
        Ok(Nid {
            ty: NetType(b[1]),
            num: u16::from_be_bytes([b[2], b[3]]),
            len,
            addr,
        })
    }
}

impl Default for Nid {
    fn default() -> Self {
        Nid::ANY
    }
}

impl fmt::Display for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return f.write_str("<?>");
        }
        match (self.ty.name(), self.ty.addr_form()) {
            (Some(_), AddrForm::Ip) => write!(f, "{}@{}", self.ip().expect("ip form"), self.net()),
            (Some(_), AddrForm::Num) if self.is_nid4() => {
                write!(f, "{}@{}", self.addr4().unwrap_or(0), self.net())
            }
            _ => {
                for (i, w) in self.addr_bytes().chunks(4).enumerate() {
                    let v = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
                    if i > 0 {
                        f.write_str(":")?;
                    }
                    write!(f, "{v:x}")?;
                }
                write!(f, "@{}", self.net())
            }
        }
    }
}

impl fmt::Debug for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parse a decimal or `0x` hexadecimal 32-bit number.
pub(crate) fn parse_num(s: &str) -> Option<u32> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(h, 16).ok()
    } else {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

impl FromStr for Nid {
    type Err = NidParseError;

    /// Parse `ADDR@NET`; without `@NET` the network is `tcp`, as in LNet.
    fn from_str(s: &str) -> Result<Nid, NidParseError> {
        let (addr, net) = split_addr_net(s)?;
        let bad = || NidParseError::BadAddress {
            addr: addr.to_owned(),
            net: net.ty.name().unwrap_or("?"),
        };
        match net.ty.addr_form() {
            AddrForm::Ip => {
                let a = addr
                    .strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(addr);
                // A bare number is a 32-bit address, as inet_aton reads it
                // (`5@o2ib3` is 0.0.0.5@o2ib3).
                let ip: IpAddr = match a.parse() {
                    Ok(ip) => ip,
                    Err(_) => IpAddr::V4(Ipv4Addr::from(parse_num(a).ok_or_else(bad)?)),
                };
                Ok(Nid::from_ip(net, ip))
            }
            AddrForm::Num => {
                let v = parse_num(addr).ok_or_else(bad)?;
                if net.ty == NetType::LOLND && v != 0 {
                    return Err(bad());
                }
                Ok(Nid::new4(net, v))
            }
        }
    }
}

/// Split `ADDR@NET` (trimmed); without `@NET` the network is `tcp`, as in
/// LNet.
pub(crate) fn split_addr_net(s: &str) -> Result<(&str, Net), NidParseError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(NidParseError::Empty);
    }
    Ok(match s.rfind('@') {
        Some(i) => (&s[..i], s[i + 1..].parse::<Net>()?),
        None => (s, Net::new(NetType::SOCKLND, 0)),
    })
}

/// The process-id part of an LNet address (`lnet_pid_t`).
pub type Pid = u32;

/// Wildcard pid (`LNET_PID_ANY`).
pub const LNET_PID_ANY: Pid = u32::MAX;
/// The pid every Lustre kernel node uses (`LNET_PID_LUSTRE`).
pub const LNET_PID_LUSTRE: Pid = 12345;
/// Set in the pid of userspace peers (`LNET_PID_USERFLAG`).
pub const LNET_PID_USERFLAG: Pid = 0x8000_0000;
/// Reserved bits of a pid (`LNET_PID_RESERVED`).
pub const LNET_PID_RESERVED: Pid = 0xf000_0000;

/// A process in the LNet: a NID and a pid (`struct lnet_processid`).
///
/// ```
/// use lnet::{ProcessId, LNET_PID_LUSTRE};
/// let p = ProcessId::new("10.0.0.1@tcp".parse().unwrap(), LNET_PID_LUSTRE);
/// assert_eq!(p.to_string(), "12345-10.0.0.1@tcp");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct ProcessId {
    /// The NID.
    pub nid: Nid,
    /// The pid.
    pub pid: Pid,
}

impl ProcessId {
    /// Any process anywhere (both fields wildcards).
    pub const ANY: ProcessId = ProcessId {
        nid: Nid::ANY,
        pid: LNET_PID_ANY,
    };
    /// A process id.
    pub const fn new(nid: Nid, pid: Pid) -> Self {
        ProcessId { nid, pid }
    }
    /// True when `other` is matched by `self` used as a match id (wildcards
    /// in `self` match anything).
    pub fn matches(&self, other: &ProcessId) -> bool {
        (self.nid.is_any() || self.nid == other.nid)
            && (self.pid == LNET_PID_ANY || self.pid == other.pid)
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pid == LNET_PID_ANY {
            write!(f, "LNET_PID_ANY-{}", self.nid)
        } else if self.pid & LNET_PID_USERFLAG != 0 {
            write!(f, "U{}-{}", self.pid & !LNET_PID_USERFLAG, self.nid)
        } else {
            write!(f, "{}-{}", self.pid, self.nid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(s: &str, want: &str) {
        let n: Nid = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(n.to_string(), want, "{s}");
        assert_eq!(n.to_string().parse::<Nid>().unwrap(), n);
    }

    #[test]
    fn string_forms() {
        rt("192.168.1.2@tcp", "192.168.1.2@tcp");
        rt("10.0.0.1@tcp1", "10.0.0.1@tcp1");
        rt("10.0.0.1@tcp0", "10.0.0.1@tcp");
        rt("0@lo", "0@lo");
        rt("5@o2ib3", "0.0.0.5@o2ib3");
        rt("10.1.2.3@o2ib3", "10.1.2.3@o2ib3");
        rt("7@shm", "7@shm");
        rt("0x10@shm2", "16@shm2");
        rt("12@gni", "12@gni");
        rt("::1@tcp", "::1@tcp");
        rt("[2001:db8::5]@tcp7", "2001:db8::5@tcp7");
        rt("1.2.3.4", "1.2.3.4@tcp");
        assert_eq!(
            "tcp".parse::<Net>().unwrap(),
            "tcp0".parse::<Net>().unwrap()
        );
    }

    #[test]
    fn bad_strings() {
        use NidParseError::*;
        assert_eq!("".parse::<Nid>(), Err(Empty));
        assert!(matches!(
            "1.2.3.4@foo".parse::<Nid>(),
            Err(UnknownNetType(_))
        ));
        assert!(matches!(
            "1.2.3.4@tcpx".parse::<Nid>(),
            Err(BadNetNumber(_))
        ));
        assert!(matches!(
            "1.2.3.4@tcp70000".parse::<Nid>(),
            Err(BadNetNumber(_))
        ));
        assert!(matches!(
            "0@lo1".parse::<Nid>(),
            Err(NetNumberNotAllowed(_))
        ));
        assert!(matches!("1@lo".parse::<Nid>(), Err(BadAddress { .. })));
        assert!(matches!("1.2.3@tcp".parse::<Nid>(), Err(BadAddress { .. })));
        assert!(matches!(
            "300.2.3.4@tcp".parse::<Nid>(),
            Err(BadAddress { .. })
        ));
        assert!(matches!("abc@shm".parse::<Nid>(), Err(BadAddress { .. })));
        assert!(matches!(
            "99999999999@shm".parse::<Nid>(),
            Err(BadAddress { .. })
        ));
        assert!(matches!("-1@shm".parse::<Nid>(), Err(BadAddress { .. })));
    }

    #[test]
    fn nids_order_by_network_then_address_and_equal_ones_hash_alike() {
        use std::hash::BuildHasher;
        let nids: Vec<Nid> = [
            "0@lo",
            "10.0.0.2@tcp",
            "10.0.0.10@tcp",
            "[::1]@tcp",
            "10.0.0.1@tcp1",
            "10.0.0.1@tcp2",
            "10.0.0.1@o2ib",
            "7@shm",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let h = std::collections::hash_map::RandomState::new();
        for a in &nids {
            for b in &nids {
                let by_fields = (a.ty, a.num, a.len, a.addr).cmp(&(b.ty, b.num, b.len, b.addr));
                assert_eq!(a.cmp(b), by_fields, "{a} vs {b}");
                assert_eq!(a == b, by_fields.is_eq(), "{a} vs {b}");
                assert_eq!(a.partial_cmp(b), Some(by_fields));
                if a == b {
                    assert_eq!(h.hash_one(a), h.hash_one(b));
                }
            }
        }
        // Network first: the lower network sorts first whatever the address.
        let hi: Nid = "10.0.0.255@tcp".parse().unwrap();
        let lo: Nid = "10.0.0.1@tcp1".parse().unwrap();
        assert!(hi < lo);
        // Each field on its own tells NIDs apart.
        let base = Nid::new4(Net::new(NetType::SOCKLND, 1), 0x0a00_0001);
        for other in [
            Nid::new4(Net::new(NetType::SOCKLND, 2), 0x0a00_0001),
            Nid::new4(Net::new(NetType::O2IBLND, 1), 0x0a00_0001),
            Nid::new4(Net::new(NetType::SOCKLND, 1), 0x0a00_0002),
            Nid::from_ip(Net::new(NetType::SOCKLND, 1), "::a00:1".parse().unwrap()),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn nid4_encoding() {
        let n: Nid = "10.77.0.1@tcp".parse().unwrap();
        assert_eq!(n.to_nid4(), Some(0x0002_0000_0a4d_0001));
        let lo = Nid::LO.to_nid4().unwrap();
        assert_eq!(lo, 0x0009_0000_0000_0000);
        assert_eq!(Nid::from_nid4(u64::MAX), Nid::ANY);
        assert_eq!("::1@tcp".parse::<Nid>().unwrap().to_nid4(), None);
        let o: Nid = "10.1.1.1@o2ib2".parse().unwrap();
        assert_eq!(Nid::from_nid4(o.to_nid4().unwrap()), o);
    }

    #[test]
    fn nid16_wire() {
        let n: Nid = "10.77.0.1@tcp1".parse().unwrap();
        let w = n.to_wire16();
        assert_eq!(&w[..8], &[0, 2, 0, 1, 10, 77, 0, 1]);
        assert_eq!(Nid::from_wire16(&w).unwrap(), n);
        let v6: Nid = "2001:db8::1@tcp".parse().unwrap();
        let w = v6.to_wire16();
        assert_eq!(w[0], 12);
        assert_eq!(Nid::from_wire16(&w).unwrap(), v6);
        let mut bad = w;
        bad[0] = 5;
        assert!(Nid::from_wire16(&bad).is_err());
        assert_eq!(Nid::from_wire16(&Nid::ANY.to_wire16()).unwrap(), Nid::ANY);
    }

    #[test]
    fn process_id() {
        let n: Nid = "1.2.3.4@tcp".parse().unwrap();
        let p = ProcessId::new(n, LNET_PID_LUSTRE);
        assert!(ProcessId::ANY.matches(&p));
        assert!(ProcessId::new(n, LNET_PID_ANY).matches(&p));
        assert!(!ProcessId::new(Nid::LO, LNET_PID_ANY).matches(&p));
        assert_eq!(
            ProcessId::new(n, LNET_PID_USERFLAG | 7).to_string(),
            "U7-1.2.3.4@tcp"
        );
    }
}
