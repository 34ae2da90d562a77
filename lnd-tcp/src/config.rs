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
    /// Read every connection on a thread of its own, in blocking reads,
    /// instead of on the runtime. A message then costs its reader one
    /// wake-up and one `recv` (the runtime adds a poll and its scheduling),
    /// which shortens a small message's round trip; but it is one thread
    /// per connection: for nodes with few peers (a client), not for a
    /// server with thousands of connections. Writes, timers and connection
    /// set-up stay on the runtime either way. Off by default.
    pub reader_threads: bool,
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
            reader_threads: false,
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

/// The speed of the interface carrying `addr`, in Mb/s, from sysfs (None
/// for loopback, or when the interface or its speed is unknown), as
/// socklnd asks the NI's device.
pub fn link_speed(addr: IpAddr) -> Option<u64> {
    if addr.is_loopback() {
        return None;
    }
    speed_of(std::path::Path::new("/sys/class/net"), &interface_of(addr)?)
}

/// The name of the interface that has `addr`.
pub fn interface_of(addr: IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .find(|ifa| {
            ifa.address.as_ref().and_then(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            }) == Some(addr)
        })
        .map(|ifa| ifa.interface_name)
}

/// `<sys_net>/<ifname>/speed` in Mb/s; None when absent or unknown (-1).
fn speed_of(sys_net: &std::path::Path, ifname: &str) -> Option<u64> {
    if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
        return None;
    }
    let s = std::fs::read_to_string(sys_net.join(ifname).join("speed")).ok()?;
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|&v| v > 0)
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_speed_reads_the_interface_of_the_address() {
        // Loopback has no speed: auto gives socklnd's 1 connection.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(interface_of(lo).as_deref(), Some("lo"));
        assert_eq!(link_speed(lo), None);
        assert_eq!(conns_for_speed(link_speed(lo)), 1);
        // An address no interface has.
        assert_eq!(interface_of("127.255.255.254".parse().unwrap()), None);
        // sysfs as a fake tree: a 25 Gb/s port, one with the speed
        // unknown (-1, as a down link reports), one without the file.
        let d = std::env::temp_dir().join(format!("lnd-tcp-sysnet-{}", std::process::id()));
        for (name, speed) in [
            ("eth25", Some("25000\n")),
            ("down0", Some("-1\n")),
            ("nofile", None),
        ] {
            std::fs::create_dir_all(d.join(name)).unwrap();
            if let Some(s) = speed {
                std::fs::write(d.join(name).join("speed"), s).unwrap();
            }
        }
        assert_eq!(speed_of(&d, "eth25"), Some(25_000));
        assert_eq!(conns_for_speed(speed_of(&d, "eth25")), 3);
        assert_eq!(speed_of(&d, "down0"), None);
        assert_eq!(speed_of(&d, "nofile"), None);
        assert_eq!(speed_of(&d, "missing"), None);
        assert_eq!(speed_of(&d, "../eth25"), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

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
