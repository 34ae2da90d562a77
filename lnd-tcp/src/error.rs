//! Why a connection was refused or closed, and the counters of each reason.

use std::sync::atomic::{AtomicU64, Ordering};

use lnet::Nid;

/// Why a connection was refused or closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The first word was neither the acceptor's nor the hello's magic.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The peer opened with a hello instead of an acceptor request.
    #[error("hello without an acceptor request")]
    NoAcceptorRequest,
    /// An acceptor request version we do not know.
    #[error("unknown acceptor request version {0}")]
    BadAcceptorVersion(u32),
    /// A hello version we do not speak.
    #[error("unknown hello version {0}")]
    BadVersion(u32),
    /// The acceptor request or hello names a NID that is not ours.
    #[error("the peer asked for {0}, which is not this NI")]
    WrongNid(Nid),
    /// The peer is not who we dialled.
    #[error("the peer claims to be {0}")]
    WrongPeer(Nid),
    /// A NID that cannot be decoded.
    #[error("undecodable NID")]
    BadNid,
    /// A malformed hello.
    #[error("bad hello: {0}")]
    BadHello(&'static str),
    /// The connection ended in the middle of a structure.
    #[error("truncated")]
    Truncated,
    /// Nothing (or not enough) arrived within the socket timeout.
    #[error("timed out")]
    Timeout,
    /// The source port is not privileged and the accept mode is secure.
    #[error("source port {0} is not privileged")]
    Unprivileged(u16),
    /// An unknown ksock message type.
    #[error("unknown ksock message type {0:#x}")]
    BadMsgType(u32),
    /// A ZC-ACK for a cookie we never issued.
    #[error("unknown zero-copy ACK cookie {0}")]
    BadZcAck(u64),
    /// An LNet header that does not decode.
    #[error("bad LNet header")]
    BadHeader,
    /// `payload_length` over the largest payload.
    #[error("payload of {0} bytes is over the limit")]
    TooLong(u32),
    /// Checksum mismatch.
    #[error("checksum mismatch")]
    Checksum,
    /// More NOOPs than any peer needs.
    #[error("NOOP flood")]
    NoopFlood,
    /// Both ends dialled; the higher NID's connection wins.
    #[error("connection race lost by the peer")]
    Race,
    /// The dial would duplicate a connection the peer already has
    /// (socklnd's EALREADY).
    #[error("duplicate connection")]
    Duplicate,
    /// The peer came back with a new incarnation.
    #[error("peer restarted")]
    Stale,
    /// 8-byte NIDs are needed for hello v2/v3.
    #[error("these NIDs need protocol v4")]
    NeedsLargeNids,
    /// Socket error.
    #[error("I/O error: {0:?}")]
    Io(std::io::ErrorKind),
    /// The peer closed the connection.
    #[error("closed by the peer")]
    Eof,
    /// Local shutdown.
    #[error("shutting down")]
    Shutdown,
    /// The core asked for inline payload bytes outside the message (a
    /// broken contract, not the peer's doing; the receive fails and the
    /// connection closes rather than read out of bounds).
    #[error("inline payload range outside the message")]
    InlineRange,
}

impl From<std::io::Error> for Reject {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Reject::Eof,
            std::io::ErrorKind::TimedOut => Reject::Timeout,
            k => Reject::Io(k),
        }
    }
}

lnet::lnd_stats! {
    /// Counters of the TCP LND (all monotonic).
    Stats, StatsSnapshot;
    /// Connections accepted by the listener (before any check).
    accepted,
    /// Connections established (either direction).
    conns_established,
    /// Connections closed after being established.
    conns_closed,
    /// Outbound connection attempts that failed.
    connect_failures,
    /// Refused: bad magic.
    bad_magic,
    /// Refused: unknown acceptor or hello version.
    bad_version,
    /// Refused: a NID that is not ours, or a peer that is not who we dialled.
    wrong_nid,
    /// Refused: a malformed hello or undecodable NID.
    bad_hello,
    /// Refused: unprivileged source port in secure mode.
    unprivileged,
    /// Handshakes or messages that stalled past the socket timeout.
    timeouts,
    /// Connections that ended inside a structure.
    truncated,
    /// Closed: unknown ksock message type, bad header, unknown ZC cookie.
    protocol_errors,
    /// Closed: payload over the limit.
    too_long,
    /// Closed: checksum mismatch.
    checksum_errors,
    /// Closed: NOOP flood.
    noop_floods,
    /// Connection races resolved (ours refused or theirs refused).
    races,
    /// Dials refused because they would duplicate the control connection
    /// the peer already has or is accepting (socklnd's EALREADY).
    duplicates,
    /// Peers seen coming back with a new incarnation.
    peer_restarts,
    /// Peers declared dead after keepalive silence.
    peer_timeouts,
    /// LNet messages sent.
    tx_msgs,
    /// LNet messages received.
    rx_msgs,
    /// Received PUTs copied from the read-ahead straight into their MD
    /// under the match (no sink).
    rx_inline,
    /// Payload bytes sent.
    tx_bytes,
    /// Payload bytes received.
    rx_bytes,
    /// NOOPs sent (keepalives, ZC-ACKs).
    tx_noops,
    /// NOOPs received.
    rx_noops,
    /// Reader threads started ([`crate::TcpConfig::reader_threads`]); minus
    /// `reader_threads_ended`, the ones running.
    reader_threads_started,
    /// Reader threads that have ended (their connection closed).
    reader_threads_ended,
    /// Sends that used MSG_ZEROCOPY.
    zc_sends,
    /// MSG_ZEROCOPY sends the kernel completed by copying anyway.
    zc_copied,
}

impl Stats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Count a refusal or close reason.
    pub(crate) fn count(&self, r: &Reject) {
        let c = match r {
            Reject::BadMagic(_) | Reject::NoAcceptorRequest => &self.bad_magic,
            Reject::BadAcceptorVersion(_) | Reject::BadVersion(_) => &self.bad_version,
            Reject::WrongNid(_) | Reject::WrongPeer(_) => &self.wrong_nid,
            Reject::BadNid | Reject::BadHello(_) | Reject::NeedsLargeNids => &self.bad_hello,
            Reject::Truncated | Reject::Eof => &self.truncated,
            Reject::Timeout => &self.timeouts,
            Reject::Unprivileged(_) => &self.unprivileged,
            Reject::BadMsgType(_)
            | Reject::BadZcAck(_)
            | Reject::BadHeader
            | Reject::InlineRange => &self.protocol_errors,
            Reject::TooLong(_) => &self.too_long,
            Reject::Checksum => &self.checksum_errors,
            Reject::NoopFlood => &self.noop_floods,
            Reject::Race => &self.races,
            Reject::Duplicate => &self.duplicates,
            Reject::Stale => &self.peer_restarts,
            Reject::Io(_) | Reject::Shutdown => return,
        };
        Stats::inc(c);
    }
}
