//! Typed errors of the core.

use thiserror::Error;

/// Why a NID, network or NID range string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NidParseError {
    /// The string is empty.
    #[error("empty NID string")]
    Empty,
    /// The network part (after `@`) names no known LND.
    #[error("unknown network type in {0:?}")]
    UnknownNetType(String),
    /// The network number is not a number or is larger than 65535.
    #[error("bad network number in {0:?}")]
    BadNetNumber(String),
    /// `lo` never carries a network number.
    #[error("network {0:?} does not take a number")]
    NetNumberNotAllowed(String),
    /// The address part is not valid for the network type.
    #[error("bad address {addr:?} for network type {net}")]
    BadAddress {
        /// The address text.
        addr: String,
        /// The network type's name.
        net: &'static str,
    },
    /// A range expression (`[1-10/2]`) is malformed.
    #[error("bad range expression {0:?}")]
    BadRange(String),
}

/// Why a wire structure could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("short buffer: need {need} bytes, have {have}")]
    Short {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number matches neither byte order.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// An unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u32),
    /// A length field is larger than allowed.
    #[error("length {len} exceeds limit {limit}")]
    TooLong {
        /// The length found on the wire.
        len: u64,
        /// The largest acceptable value.
        limit: u64,
    },
    /// A NID on the wire is malformed (bad size byte).
    #[error("malformed NID on the wire (size byte {0})")]
    BadNid(u8),
    /// A field holds a value that makes the structure inconsistent.
    #[error("inconsistent field: {0}")]
    Inconsistent(&'static str),
}

/// Status of a completed LNet operation: why it failed.
///
/// Every PUT and GET ends with exactly one final event; when it fails, the
/// event's status carries one of these.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// No ACK or REPLY arrived before the response deadline.
    #[error("response timed out")]
    Timeout,
    /// The message was dropped (no match, no buffer, or the peer refused it).
    #[error("message dropped")]
    Dropped,
    /// No local network reaches the target.
    #[error("no route to {0}")]
    NoRoute(String),
    /// The peer is down or restarted and its state was lost.
    #[error("peer {0} is down")]
    PeerDown(String),
    /// The incoming data was larger than the MD and it does not truncate.
    #[error("message too large for the memory descriptor")]
    TooLarge,
    /// The LND failed to move the message.
    #[error("network error: {0}")]
    Network(String),
    /// The MD was unlinked while the operation waited for its response.
    #[error("aborted: memory descriptor unlinked")]
    Aborted,
    /// The node is shutting down.
    #[error("LNet is shutting down")]
    Shutdown,
    /// An argument of an API call was invalid.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A handle names no live object.
    #[error("no such handle")]
    NoEntry,
}

/// Result type of the core's API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
