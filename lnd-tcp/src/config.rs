//! The TCP LND's settings (socklnd's module parameters, with its defaults).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::proto::{DEFAULT_PORT, PROTO_V3};

/// Which source ports the acceptor accepts (`accept=` in LNet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptMode {
    /// Only connections from privileged ports (LNet's default).
    Secure,
    /// Any source port.
    All,
    /// No acceptor: this NI only dials out.
    None,
}

/// How outbound connections pick their source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePort {
    /// Bind a privileged port from 1023 down to 512 as kernel LNet does
    /// (so a peer in secure mode accepts us), falling back to an
    /// ephemeral port when none can be bound (not root, or all taken).
    Privileged,
    /// Let the kernel choose an ephemeral port.
    Ephemeral,
}

/// Connections per peer for each bulk direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnsPerPeer {
    /// From the interface's link speed, as socklnd does: one, plus one per
    /// factor of four over 1 Gb/s (`ilog2(speed / 1000) / 2 + 1`).
    Auto,
    /// Exactly this many (at least 1).
    Fixed(u16),
}

/// Settings of one TCP NI.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// The NI's address: its NID is `address@tcpN`.
    pub address: IpAddr,
    /// Network number (`tcpN`).
    pub net_num: u16,
    /// The acceptor's port (988).
    pub port: u16,
    /// Which connections the acceptor takes.
    pub accept: AcceptMode,
    /// Source ports of outbound connections.
    pub source_port: SourcePort,
    /// The port peers listen on when we dial them.
    pub peer_port: u16,
    /// Protocol version offered to IPv4 peers (3; 2 also works). IPv6
    /// peers and NIDs without an 8-byte form always use 4.
    pub protocol: u32,
    /// Connections per peer per bulk direction.
    pub conns_per_peer: ConnsPerPeer,
    /// Messages of at least this many bytes go on bulk connections (1 KiB).
    pub min_bulk: usize,
    /// Dead-socket timeout: a handshake, or a message once begun, that does
    /// not finish within it closes the connection (50 s).
    pub sock_timeout: Duration,
    /// Time to wait for an acceptor request and hello on an accepted socket
    /// (LNet's `accept_timeout`, 5 s).
    pub accept_timeout: Duration,
    /// Send a keepalive NOOP after this much silence from a peer; a peer
    /// silent for [`TcpConfig::peer_timeout`] is dead. `None` disables both.
    pub keepalive: Option<Duration>,
    /// Silence after which a peer with connections is declared dead (180 s,
    /// LNet's `peer_timeout`).
    pub peer_timeout: Duration,
    /// TCP keepalive: idle time, probe interval, probe count (30 s, 5 s, 5).
    pub tcp_keepalive: Option<(Duration, Duration, u32)>,
    /// Disable Nagle (`TCP_NODELAY`); on by default.
    pub nodelay: bool,
    /// Socket send buffer size (None: system default).
    pub tx_buffer_size: Option<usize>,
    /// Socket receive buffer size (None: system default).
    pub rx_buffer_size: Option<usize>,
    /// First reconnect delay after a failure (1 s).
    pub min_reconnect: Duration,
    /// Longest reconnect delay (60 s).
    pub max_reconnect: Duration,
    /// Send payloads of at least this many bytes with `MSG_ZEROCOPY`; the
    /// payload is released only when the kernel reports completion.
    /// `None` (the default) always copies into the socket.
    pub zerocopy_min: Option<usize>,
    /// Checksum every message (protocol v2 only, as socklnd does).
    pub checksum: bool,
    /// NI credits.
    pub credits: i32,
    /// Per-peer credits.
    pub peer_credits: i32,
    /// Worker threads of the LND's runtime.
    pub threads: usize,
    /// Most NOOPs a peer may send in a burst before the rate limit (below)
    /// applies; beyond it the connection closes as a NOOP flood.
    pub noop_burst: u32,
    /// Sustained NOOPs per second allowed after the burst.
    pub noop_rate: u32,
}

impl TcpConfig {
    /// Defaults for an NI at `address` on `tcp0`.
    pub fn new(address: IpAddr) -> TcpConfig {
        TcpConfig {
            address,
            net_num: 0,
            port: DEFAULT_PORT,
            accept: AcceptMode::Secure,
            source_port: SourcePort::Privileged,
            peer_port: DEFAULT_PORT,
            protocol: PROTO_V3,
            conns_per_peer: ConnsPerPeer::Auto,
            min_bulk: 1024,
            sock_timeout: Duration::from_secs(50),
            accept_timeout: Duration::from_secs(5),
            keepalive: Some(Duration::from_secs(30)),
            peer_timeout: Duration::from_secs(180),
            tcp_keepalive: Some((Duration::from_secs(30), Duration::from_secs(5), 5)),
            nodelay: true,
            tx_buffer_size: None,
            rx_buffer_size: None,
            min_reconnect: Duration::from_secs(1),
            max_reconnect: Duration::from_secs(60),
            zerocopy_min: None,
            checksum: false,
            credits: 256,
            peer_credits: 8,
            threads: 2,
            noop_burst: 1000,
            noop_rate: 100,
        }
    }
    /// Set the acceptor port and the port dialled on peers together.
    pub fn port(mut self, p: u16) -> Self {
        self.port = p;
        self.peer_port = p;
        self
    }
    /// The listening socket address.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// Connections per bulk direction for a link of `speed_mbps` (socklnd's
/// rule; unknown speed counts as 1 Gb/s).
pub fn conns_for_speed(speed_mbps: Option<u64>) -> u16 {
    let s = speed_mbps.unwrap_or(1000).max(1000);
    ((s / 1000).ilog2() / 2 + 1) as u16
}

/// The speed of the interface carrying `addr`, from sysfs (None for
/// loopback or when unknown).
pub fn link_speed(addr: IpAddr) -> Option<u64> {
    if addr.is_loopback() {
        return None;
    }
    // Find the interface with this address through /proc/net tables is
    // brittle; sysfs lists interfaces and their speed, and a host's data
    // interfaces usually share one speed: take the fastest known one.
    let dir = std::fs::read_dir("/sys/class/net").ok()?;
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("speed")).ok())
        .filter_map(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s > 0)
        .map(|s| s as u64)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_conns_follow_socklnd() {
        assert_eq!(conns_for_speed(None), 1);
        assert_eq!(conns_for_speed(Some(100)), 1);
        assert_eq!(conns_for_speed(Some(1000)), 1);
        assert_eq!(conns_for_speed(Some(10_000)), 2);
        assert_eq!(conns_for_speed(Some(25_000)), 3);
        assert_eq!(conns_for_speed(Some(100_000)), 4);
        assert_eq!(conns_for_speed(Some(400_000)), 5);
    }
}
