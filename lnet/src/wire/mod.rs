//! LNet's wire formats: the message header, wire handles and the ping
//! buffer. Layouts are those of Lustre's `lnet-idl.h`; fields go out in the
//! sender's byte order and the receiver swabs (the LND tells it the order,
//! from its own magic).

mod header;
mod ping;

pub use header::{
    HDR_NID4_SIZE, HDR_NID16_SIZE, HELLO_TYPE_ANY, Header, MsgBody, MsgType, WireHandle,
};
pub use ping::{
    LNET_NI_STATUS_DOWN, LNET_NI_STATUS_INVALID, LNET_NI_STATUS_UP, LNET_PROTO_PING_MAGIC,
    NiStatus, PING_FEAT_BASE, PING_FEAT_DISCOVERY, PING_FEAT_LARGE_ADDR, PING_FEAT_MULTI_RAIL,
    PING_FEAT_NI_STATUS, PING_FEAT_PRIMARY_LARGE, PING_FEAT_RTE_DISABLED, PingInfo,
};

use crate::error::WireError;

/// Byte order of a wire structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    /// Least significant byte first (x86-64, aarch64).
    Little,
    /// Most significant byte first.
    Big,
}

impl ByteOrder {
    /// This machine's order, the one we send in.
    pub const NATIVE: ByteOrder = if cfg!(target_endian = "little") {
        ByteOrder::Little
    } else {
        ByteOrder::Big
    };

    /// The other order.
    pub fn swapped(self) -> ByteOrder {
        match self {
            ByteOrder::Little => ByteOrder::Big,
            ByteOrder::Big => ByteOrder::Little,
        }
    }

    /// Which order makes the four bytes `b` read as `magic`, if either.
    pub fn detect(b: [u8; 4], magic: u32) -> Option<ByteOrder> {
        if u32::from_le_bytes(b) == magic {
            Some(ByteOrder::Little)
        } else if u32::from_be_bytes(b) == magic {
            Some(ByteOrder::Big)
        } else {
            None
        }
    }
}

/// Bounds-checked reader over a byte slice in a given order.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    order: ByteOrder,
}

impl<'a> Reader<'a> {
    /// Read `buf` in `order`.
    pub fn new(buf: &'a [u8], order: ByteOrder) -> Self {
        Reader { buf, pos: 0, order }
    }
    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(WireError::Short {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// Take `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// A byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    /// A 16-bit field.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        let a = self.array()?;
        Ok(match self.order {
            ByteOrder::Little => u16::from_le_bytes(a),
            ByteOrder::Big => u16::from_be_bytes(a),
        })
    }
    /// A 32-bit field.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let a = self.array()?;
        Ok(match self.order {
            ByteOrder::Little => u32::from_le_bytes(a),
            ByteOrder::Big => u32::from_be_bytes(a),
        })
    }
    /// A 64-bit field.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        let a = self.array()?;
        Ok(match self.order {
            ByteOrder::Little => u64::from_le_bytes(a),
            ByteOrder::Big => u64::from_be_bytes(a),
        })
    }
}

/// Writer into a fixed buffer in a given order. Callers size the buffer
/// from constants, so running out of room is a bug and panics.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    order: ByteOrder,
}

impl<'a> Writer<'a> {
    /// Write into `buf` in `order`.
    pub fn new(buf: &'a mut [u8], order: ByteOrder) -> Self {
        Writer { buf, pos: 0, order }
    }
    /// Bytes written so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    /// Zero bytes.
    pub fn zeros(&mut self, n: usize) {
        self.buf[self.pos..self.pos + n].fill(0);
        self.pos += n;
    }
    /// A 16-bit field.
    pub fn u16(&mut self, v: u16) {
        match self.order {
            ByteOrder::Little => self.bytes(&v.to_le_bytes()),
            ByteOrder::Big => self.bytes(&v.to_be_bytes()),
        }
    }
    /// A 32-bit field.
    pub fn u32(&mut self, v: u32) {
        match self.order {
            ByteOrder::Little => self.bytes(&v.to_le_bytes()),
            ByteOrder::Big => self.bytes(&v.to_be_bytes()),
        }
    }
    /// A 64-bit field.
    pub fn u64(&mut self, v: u64) {
        match self.order {
            ByteOrder::Little => self.bytes(&v.to_le_bytes()),
            ByteOrder::Big => self.bytes(&v.to_be_bytes()),
        }
    }
}
