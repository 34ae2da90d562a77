//! NID range expressions, as `lst add_group` and LNet configuration write them.
//!
//! An IPv4 address has four octet expressions, a numeric address one. Each
//! expression is a number, `*` (every value), or a bracketed list of
//! `N`, `LO-HI` and `LO-HI/STRIDE` items: `192.168.0.[1-10/2]@tcp`,
//! `10.0.[0,2].[1-3]@o2ib1`, `[1-4]@shm`.
//!
//! ```
//! use lnet::NidRange;
//! let r: NidRange = "192.168.0.[1-10/2]@tcp".parse().unwrap();
//! let v: Vec<String> = r.iter().map(|n| n.to_string()).collect();
//! assert_eq!(v, ["192.168.0.1@tcp", "192.168.0.3@tcp", "192.168.0.5@tcp",
//!                "192.168.0.7@tcp", "192.168.0.9@tcp"]);
//! assert!(r.contains(&"192.168.0.7@tcp".parse().unwrap()));
//! ```

use std::str::FromStr;

use crate::error::NidParseError;
use crate::nid::{Net, NetType, Nid, parse_num, split_addr_net};

/// One `LO-HI/STRIDE` item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    lo: u32,
    hi: u32,
    stride: u32,
}

/// A list of spans for one address component.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expr(Vec<Span>);

/// Largest number of items one bracketed list may hold (bounds memory for
/// hostile input).
const MAX_SPANS: usize = 256;

impl Expr {
    fn parse(s: &str, max: u32) -> Result<Expr, NidParseError> {
        let bad = || NidParseError::BadRange(s.to_owned());
        if s == "*" {
            return Ok(Expr(vec![Span {
                lo: 0,
                hi: max,
                stride: 1,
            }]));
        }
        let inner = match s.strip_prefix('[') {
            Some(r) => r.strip_suffix(']').ok_or_else(bad)?,
            None => {
                let v = parse_num(s).filter(|v| *v <= max).ok_or_else(bad)?;
                return Ok(Expr(vec![Span {
                    lo: v,
                    hi: v,
                    stride: 1,
                }]));
            }
        };
        let mut spans = Vec::new();
        for item in inner.split(',') {
            if spans.len() == MAX_SPANS {
                return Err(bad());
            }
            let item = item.trim();
            let (range, stride) = match item.split_once('/') {
                Some((r, st)) => (r, parse_num(st).filter(|v| *v > 0).ok_or_else(bad)?),
                None => (item, 1),
            };
            let (lo, hi) = match range.split_once('-') {
                Some((l, h)) => (parse_num(l).ok_or_else(bad)?, parse_num(h).ok_or_else(bad)?),
                None if range == "*" => (0, max),
                None => {
                    let v = parse_num(range).ok_or_else(bad)?;
                    (v, v)
                }
            };
            if lo > hi || hi > max {
                return Err(bad());
            }
            spans.push(Span { lo, hi, stride });
        }
        if spans.is_empty() {
            return Err(bad());
        }
        Ok(Expr(spans))
    }

    fn contains(&self, v: u32) -> bool {
        self.0
            .iter()
            .any(|s| v >= s.lo && v <= s.hi && (v - s.lo) % s.stride == 0)
    }

    /// The values in list order (a value listed twice is produced twice,
    /// as lst does).
    fn values(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.0
            .iter()
            .flat_map(|s| (u64::from(s.lo)..=u64::from(s.hi)).step_by(s.stride as usize))
            .map(|v| v as u32)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Addr {
    Ip4([Expr; 4]),
    Num(Expr),
}

/// A parsed NID range expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NidRange {
    net: Net,
    addr: Addr,
}

impl NidRange {
    /// The network of every NID in the range.
    pub fn net(&self) -> Net {
        self.net
    }

    /// True when `nid` is in the range.
    pub fn contains(&self, nid: &Nid) -> bool {
        if nid.net() != self.net {
            return false;
        }
        let Some(a) = nid.addr4() else { return false };
        match &self.addr {
            Addr::Num(e) => e.contains(a),
            Addr::Ip4(o) => a
                .to_be_bytes()
                .iter()
                .zip(o.iter())
                .all(|(b, e)| e.contains(u32::from(*b))),
        }
    }

    /// Every NID in the range, in order. Lazy: a huge range costs nothing
    /// until it is walked.
    pub fn iter(&self) -> Box<dyn Iterator<Item = Nid> + '_> {
        let net = self.net;
        match &self.addr {
            Addr::Num(e) => Box::new(e.values().map(move |v| Nid::new4(net, v))),
            Addr::Ip4([a, b, c, d]) => Box::new(a.values().flat_map(move |x| {
                b.values().flat_map(move |y| {
                    c.values().flat_map(move |z| {
                        d.values()
                            .map(move |w| Nid::new4(net, (x << 24) | (y << 16) | (z << 8) | w))
                    })
                })
            })),
        }
    }
}

impl FromStr for NidRange {
    type Err = NidParseError;
    fn from_str(s: &str) -> Result<NidRange, NidParseError> {
        let (addr, net) = split_addr_net(s)?;
        let is_ip = net.net_type().is_ip_addressed();
        let addr = if is_ip {
            let parts: Vec<&str> = addr.split('.').collect();
            if parts.len() != 4 {
                return Err(NidParseError::BadRange(addr.to_owned()));
            }
            Addr::Ip4([
                Expr::parse(parts[0], 255)?,
                Expr::parse(parts[1], 255)?,
                Expr::parse(parts[2], 255)?,
                Expr::parse(parts[3], 255)?,
            ])
        } else {
            let max = if net.net_type() == NetType::LOLND {
                0
            } else {
                u32::MAX
            };
            Addr::Num(Expr::parse(addr, max)?)
        };
        Ok(NidRange { net, addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> Vec<String> {
        s.parse::<NidRange>()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn ranges() {
        assert_eq!(list("10.0.[0,2].[1-2]@o2ib1").len(), 4);
        assert_eq!(list("10.0.[0,2].[1-2]@o2ib1")[3], "10.0.2.2@o2ib1");
        assert_eq!(list("[1-4]@shm"), ["1@shm", "2@shm", "3@shm", "4@shm"]);
        assert_eq!(list("0@lo"), ["0@lo"]);
        assert_eq!(list("1.1.1.*@tcp").len(), 256);
        assert_eq!(list("1.1.1.[0-255/85]").len(), 4);
        let r: NidRange = "*.*.*.*@tcp".parse().unwrap();
        assert_eq!(r.iter().take(3).count(), 3);
        assert!(r.contains(&"9.9.9.9@tcp".parse().unwrap()));
        assert!(!r.contains(&"9.9.9.9@tcp1".parse().unwrap()));
    }

    #[test]
    fn bad_ranges() {
        for s in [
            "1.2.3.[1-300]@tcp",
            "1.2.3.[5-1]@tcp",
            "1.2.3.[1-4/0]@tcp",
            "1.2.3.[1-4@tcp",
            "1.2.[].4@tcp",
            "1.2.3@tcp",
            "[1-2]@nope",
            "[1-2]@lo",
            "",
        ] {
            assert!(s.parse::<NidRange>().is_err(), "{s}");
        }
    }
}
