//! The selftest RPC wire format (`struct srpc_msg`), as the kernel's
//! `lnet_selftest` lays it out.
//!
//! Every selftest message is one fixed-size, packed 160-byte `srpc_msg`: a
//! 24-byte header (magic `0xeeb0f00d`, version 1, message type, two
//! reserved words, the session's feature bits) and a union of bodies, the
//! largest of which (the stat reply) is 136 bytes. Senders write their
//! own byte order; receivers recognise a swabbed magic and flip every
//! field. Requests arrive on [`REQUEST_PORTAL`] (test services) or
//! [`FRAMEWORK_REQUEST_PORTAL`] (session, batch, test and stat services)
//! with the service id as match bits; replies and bulk go to
//! [`RDMA_PORTAL`] with the match bits the request names.
//!
//! ```
//! use lnet_selftest::wire::{Body, BrwReq, SrpcMsg, SRPC_MSG_SIZE};
//! let m = SrpcMsg::new(0, Body::BrwReq(BrwReq { rpyid: 7, bulkid: 8, rw: 2, len: 4096, flags: 2 }));
//! let bytes = m.encode(false);
//! assert_eq!(bytes.len(), SRPC_MSG_SIZE);
//! assert_eq!(SrpcMsg::decode(&bytes).unwrap(), m);
//! ```

use thiserror::Error;

/// `SRPC_MSG_MAGIC`.
pub const SRPC_MSG_MAGIC: u32 = 0xeeb0_f00d;
/// `SRPC_MSG_VERSION`.
pub const SRPC_MSG_VERSION: u32 = 1;
/// `sizeof(struct srpc_msg)`: what every selftest request and reply is.
pub const SRPC_MSG_SIZE: usize = 160;
/// Length of the `srpc_msg` header before the body union.
pub const SRPC_HDR_SIZE: usize = 24;
/// Portal of test-service requests (`SRPC_REQUEST_PORTAL`).
pub const REQUEST_PORTAL: u32 = 50;
/// Portal of framework requests (`SRPC_FRAMEWORK_REQUEST_PORTAL`).
pub const FRAMEWORK_REQUEST_PORTAL: u32 = 51;
/// Portal of replies and bulk (`SRPC_RDMA_PORTAL`).
pub const RDMA_PORTAL: u32 = 52;
/// `LST_NAME_SIZE`.
pub const LST_NAME_SIZE: usize = 32;
/// `LST_FEAT_BULK_LEN`: bulk requests carry a byte length and offset.
pub const LST_FEAT_BULK_LEN: u32 = 1;
/// Every feature we know (`LST_FEATS_MASK`).
pub const LST_FEATS_MASK: u32 = LST_FEAT_BULK_LEN;
/// `LST_BRW_READ`.
pub const LST_BRW_READ: u32 = 1;
/// `LST_BRW_WRITE`.
pub const LST_BRW_WRITE: u32 = 2;
/// `LST_MAX_CONCUR`.
pub const LST_MAX_CONCUR: u32 = 1024;
/// `SRPC_BATCH_OPC_RUN`.
pub const BATCH_OPC_RUN: u32 = 1;
/// `SRPC_BATCH_OPC_STOP`.
pub const BATCH_OPC_STOP: u32 = 2;
/// `SRPC_BATCH_OPC_QUERY`.
pub const BATCH_OPC_QUERY: u32 = 3;

/// Selftest services (`enum srpc_service_type`); the id is the match bits
/// of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Service {
    /// Session query (`SRPC_SERVICE_DEBUG`).
    Debug = 0,
    /// Create a session.
    MakeSession = 1,
    /// End a session.
    RemoveSession = 2,
    /// Run, stop or query a batch.
    Batch = 3,
    /// Add a test to a batch.
    Test = 4,
    /// Read counters.
    QueryStat = 5,
    /// Join a session.
    Join = 6,
    /// Bulk read/write test.
    Brw = 11,
    /// Ping test.
    Ping = 12,
}

impl Service {
    /// From the wire id.
    pub fn from_id(id: u32) -> Option<Service> {
        Some(match id {
            0 => Service::Debug,
            1 => Service::MakeSession,
            2 => Service::RemoveSession,
            3 => Service::Batch,
            4 => Service::Test,
            5 => Service::QueryStat,
            6 => Service::Join,
            11 => Service::Brw,
            12 => Service::Ping,
            _ => return None,
        })
    }
    /// The portal its requests go to.
    pub fn portal(self) -> u32 {
        if (self as u32) < 10 {
            FRAMEWORK_REQUEST_PORTAL
        } else {
            REQUEST_PORTAL
        }
    }
    /// The message type of its requests (`srpc_service2request`); the
    /// reply's is one more.
    pub fn request_type(self) -> u32 {
        match self {
            Service::Debug => 10,
            Service::MakeSession => 0,
            Service::RemoveSession => 2,
            Service::Batch => 4,
            Service::Test => 8,
            Service::QueryStat => 6,
            Service::Join => 16,
            Service::Brw => 12,
            Service::Ping => 14,
        }
    }
}

/// A session id (`struct lst_sid`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// NID of the console node (8-byte form).
    pub nid: u64,
    /// Time stamp in milliseconds.
    pub stamp: i64,
}

impl SessionId {
    /// `LST_INVALID_SID`: no session.
    pub const NONE: SessionId = SessionId {
        nid: u64::MAX,
        stamp: -1,
    };
}

/// Framework counters (`struct sfw_counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwCounters {
    /// Milliseconds since the session started.
    pub running_ms: u32,
    /// Batches running.
    pub active_batches: u32,
    /// Sessions ended but not yet freed.
    pub zombie_sessions: u32,
    /// Failed or corrupted brw RPCs.
    pub brw_errors: u32,
    /// Failed ping RPCs.
    pub ping_errors: u32,
}

/// RPC counters (`struct srpc_counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RpcCounters {
    /// Errors.
    pub errors: u32,
    /// RPCs sent.
    pub rpcs_sent: u32,
    /// RPCs received.
    pub rpcs_rcvd: u32,
    /// RPCs dropped.
    pub rpcs_dropped: u32,
    /// RPCs timed out.
    pub rpcs_expired: u32,
    /// Bulk bytes moved by GET.
    pub bulk_get: u64,
    /// Bulk bytes moved by PUT.
    pub bulk_put: u64,
}

/// LNet counters (`struct lnet_counters_common`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LnetCounters {
    /// Messages allocated now.
    pub msgs_alloc: u32,
    /// Most messages ever allocated at once.
    pub msgs_max: u32,
    /// Errors.
    pub errors: u32,
    /// Messages sent.
    pub send_count: u32,
    /// Messages received.
    pub recv_count: u32,
    /// Messages routed.
    pub route_count: u32,
    /// Messages dropped.
    pub drop_count: u32,
    /// Bytes sent.
    pub send_length: u64,
    /// Bytes received.
    pub recv_length: u64,
    /// Bytes routed.
    pub route_length: u64,
    /// Bytes dropped.
    pub drop_length: u64,
}

/// A name field (`char[LST_NAME_SIZE]`, NUL padded).
pub type Name = [u8; LST_NAME_SIZE];

/// Makes a [`Name`] from a string (cut at 31 bytes, NUL terminated).
pub fn name(s: &str) -> Name {
    let mut n = [0u8; LST_NAME_SIZE];
    let b = s.as_bytes();
    let l = b.len().min(LST_NAME_SIZE - 1);
    n[..l].copy_from_slice(&b[..l]);
    n
}

/// The string in a [`Name`] (up to its first NUL; lossy UTF-8).
pub fn name_str(n: &Name) -> String {
    let l = n.iter().position(|&c| c == 0).unwrap_or(n.len());
    String::from_utf8_lossy(&n[..l]).into_owned()
}

/// Parameters of a test in a [`TestReq`] (`tsr_u`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestParams {
    /// A ping test: `png_size`, `png_flags`.
    Ping {
        /// Size of the ping message.
        size: u32,
        /// Reserved.
        flags: u32,
    },
    /// A brw test of whole pages (sessions without `LST_FEAT_BULK_LEN`).
    BulkV0 {
        /// `LST_BRW_READ` or `LST_BRW_WRITE`.
        opc: u32,
        /// Number of pages.
        npg: u32,
        /// Data check (`LST_BRW_CHECK_*`).
        flags: u32,
    },
    /// A brw test with a byte length and offset.
    BulkV1 {
        /// `LST_BRW_READ` or `LST_BRW_WRITE`.
        opc: u16,
        /// Data check (`LST_BRW_CHECK_*`).
        flags: u16,
        /// Bytes per RPC.
        len: u32,
        /// Offset in the first page.
        offset: u32,
    },
}

/// Batch request (`struct srpc_batch_reqst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchReq {
    /// Reply match bits.
    pub rpyid: u64,
    /// Session.
    pub sid: SessionId,
    /// Batch id.
    pub bid: u64,
    /// `BATCH_OPC_*`.
    pub opc: u32,
    /// Index of a test (0: all).
    pub testidx: u32,
    /// Argument (for stop: force).
    pub arg: u32,
}

/// Test request (`struct srpc_test_reqst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestReq {
    /// Reply match bits.
    pub rpyid: u64,
    /// Match bits of the bulk holding the destination list.
    pub bulkid: u64,
    /// Session.
    pub sid: SessionId,
    /// Batch id.
    pub bid: u64,
    /// Test service (`Service::Brw` or `Service::Ping` as u32).
    pub service: u32,
    /// Client: loop count; server: buffers needed.
    pub loop_count: u32,
    /// Concurrency.
    pub concur: u32,
    /// 1 when this node is a test client.
    pub is_client: u8,
    /// Stop on error.
    pub stop_onerr: u8,
    /// Number of destinations in the bulk.
    pub ndest: u32,
    /// Test parameters.
    pub params: TestParams,
}

/// Stat reply (`struct srpc_stat_reply`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatReply {
    /// Status (errno).
    pub status: u32,
    /// Session.
    pub sid: SessionId,
    /// Framework counters.
    pub fw: FwCounters,
    /// RPC counters.
    pub rpc: RpcCounters,
    /// LNet counters.
    pub lnet: LnetCounters,
}

/// Brw request (`struct srpc_brw_reqst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrwReq {
    /// Reply match bits.
    pub rpyid: u64,
    /// Bulk match bits.
    pub bulkid: u64,
    /// `LST_BRW_READ` or `LST_BRW_WRITE`.
    pub rw: u32,
    /// Bulk length.
    pub len: u32,
    /// Data check (`LST_BRW_CHECK_*`).
    pub flags: u32,
}

/// Ping request (`struct srpc_ping_reqst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingReq {
    /// Reply match bits.
    pub rpyid: u64,
    /// Magic the server echoes.
    pub magic: u32,
    /// Sequence number.
    pub seq: u32,
    /// Send time, seconds.
    pub time_sec: u64,
    /// Send time, nanoseconds.
    pub time_nsec: u64,
}

/// The body of a message, by message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// 0: make session.
    MksnReq {
        /// Reply match bits.
        rpyid: u64,
        /// Session.
        sid: SessionId,
        /// Take the node from another session.
        force: u32,
        /// Session name.
        name: Name,
    },
    /// 1.
    MksnReply {
        /// Status.
        status: u32,
        /// Session the node is in.
        sid: SessionId,
        /// Session timeout, seconds.
        timeout: u32,
        /// Session name.
        name: Name,
    },
    /// 2: remove session.
    RmsnReq {
        /// Reply match bits.
        rpyid: u64,
        /// Session.
        sid: SessionId,
    },
    /// 3.
    RmsnReply {
        /// Status.
        status: u32,
        /// Session.
        sid: SessionId,
    },
    /// 4.
    BatchReq(BatchReq),
    /// 5.
    BatchReply {
        /// Status.
        status: u32,
        /// Session.
        sid: SessionId,
        /// Active tests.
        active: u32,
        /// Time left.
        time: u32,
    },
    /// 6: read counters.
    StatReq {
        /// Reply match bits.
        rpyid: u64,
        /// Session.
        sid: SessionId,
        /// Type of stat.
        stat_type: u32,
    },
    /// 7.
    StatReply(StatReply),
    /// 8: add a test.
    TestReq(TestReq),
    /// 9.
    TestReply {
        /// Status.
        status: u32,
        /// Session.
        sid: SessionId,
    },
    /// 10: session query.
    DebugReq {
        /// Reply match bits.
        rpyid: u64,
        /// Session.
        sid: SessionId,
        /// Debug flags.
        flags: u32,
    },
    /// 11.
    DebugReply {
        /// Status.
        status: u32,
        /// Session.
        sid: SessionId,
        /// Session timeout.
        timeout: u32,
        /// Batches on the node.
        nbatch: u32,
        /// Session name.
        name: Name,
    },
    /// 12.
    BrwReq(BrwReq),
    /// 13.
    BrwReply {
        /// Status (errno).
        status: u32,
    },
    /// 14.
    PingReq(PingReq),
    /// 15.
    PingReply {
        /// Status.
        status: u32,
        /// The request's magic.
        magic: u32,
        /// The request's sequence.
        seq: u32,
    },
    /// 16: join a session.
    JoinReq {
        /// Reply match bits.
        rpyid: u64,
        /// Session.
        sid: SessionId,
        /// Group name.
        group: Name,
    },
    /// 17.
    JoinReply {
        /// Status.
        status: u32,
        /// Session.
        sid: SessionId,
        /// Inactivity timeout.
        timeout: u32,
        /// Session name.
        session: Name,
    },
}

impl Body {
    /// The message type (`enum srpc_msg_type`).
    pub fn msg_type(&self) -> u32 {
        match self {
            Body::MksnReq { .. } => 0,
            Body::MksnReply { .. } => 1,
            Body::RmsnReq { .. } => 2,
            Body::RmsnReply { .. } => 3,
            Body::BatchReq(_) => 4,
            Body::BatchReply { .. } => 5,
            Body::StatReq { .. } => 6,
            Body::StatReply(_) => 7,
            Body::TestReq(_) => 8,
            Body::TestReply { .. } => 9,
            Body::DebugReq { .. } => 10,
            Body::DebugReply { .. } => 11,
            Body::BrwReq(_) => 12,
            Body::BrwReply { .. } => 13,
            Body::PingReq(_) => 14,
            Body::PingReply { .. } => 15,
            Body::JoinReq { .. } => 16,
            Body::JoinReply { .. } => 17,
        }
    }
    /// The reply match bits of a request (the first word of every
    /// request body), `None` for replies.
    pub fn rpyid(&self) -> Option<u64> {
        Some(match self {
            Body::MksnReq { rpyid, .. }
            | Body::RmsnReq { rpyid, .. }
            | Body::StatReq { rpyid, .. }
            | Body::DebugReq { rpyid, .. }
            | Body::JoinReq { rpyid, .. } => *rpyid,
            Body::BatchReq(b) => b.rpyid,
            Body::TestReq(t) => t.rpyid,
            Body::BrwReq(b) => b.rpyid,
            Body::PingReq(p) => p.rpyid,
            _ => return None,
        })
    }
}

/// One selftest message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrpcMsg {
    /// Session features (`msg_ses_feats`).
    pub ses_feats: u32,
    /// The body; its variant gives `msg_type`.
    pub body: Body,
}

/// Why a selftest message was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its header and body need.
    #[error("selftest message of {0} bytes is too short")]
    Short(usize),
    /// Neither magic nor swabbed magic.
    #[error("bad selftest magic {0:#x}")]
    Magic(u32),
    /// Not version 1.
    #[error("selftest message version {0}, 1 expected")]
    Version(u32),
    /// Unknown message type.
    #[error("unknown selftest message type {0}")]
    Type(u32),
    /// A test request whose parameters fit no known form.
    #[error("test request for unknown service {0}")]
    TestService(u32),
}

struct W {
    buf: [u8; SRPC_MSG_SIZE],
    pos: usize,
    be: bool,
}

impl W {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&if self.be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    fn u32(&mut self, v: u32) {
        self.put(&if self.be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    fn u64(&mut self, v: u64) {
        self.put(&if self.be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    fn sid(&mut self, s: SessionId) {
        self.u64(s.nid);
        self.u64(s.stamp as u64);
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
    be: bool,
}

impl R<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self
            .b
            .get(self.pos..self.pos + N)
            .ok_or(WireError::Short(self.b.len()))?;
        self.pos += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let a = self.take()?;
        Ok(if self.be {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        })
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let a = self.take()?;
        Ok(if self.be {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let a = self.take()?;
        Ok(if self.be {
            u64::from_be_bytes(a)
        } else {
            u64::from_le_bytes(a)
        })
    }
    fn sid(&mut self) -> Result<SessionId, WireError> {
        Ok(SessionId {
            nid: self.u64()?,
            stamp: self.u64()? as i64,
        })
    }
    fn name(&mut self) -> Result<Name, WireError> {
        self.take()
    }
}

impl SrpcMsg {
    /// A message with no session features set.
    pub fn new(ses_feats: u32, body: Body) -> SrpcMsg {
        SrpcMsg { ses_feats, body }
    }

    /// The 160 wire bytes, little-endian (`big_endian` false) or
    /// big-endian; the unused tail of the union is zero.
    pub fn encode(&self, big_endian: bool) -> [u8; SRPC_MSG_SIZE] {
        let mut w = W {
            buf: [0; SRPC_MSG_SIZE],
            pos: 0,
            be: big_endian,
        };
        w.u32(SRPC_MSG_MAGIC);
        w.u32(SRPC_MSG_VERSION);
        w.u32(self.body.msg_type());
        w.u32(0);
        w.u32(0);
        w.u32(self.ses_feats);
        match self.body {
            Body::MksnReq {
                rpyid,
                sid,
                force,
                name,
            } => {
                w.u64(rpyid);
                w.sid(sid);
                w.u32(force);
                w.put(&name);
            }
            Body::MksnReply {
                status,
                sid,
                timeout,
                name,
            } => {
                w.u32(status);
                w.sid(sid);
                w.u32(timeout);
                w.put(&name);
            }
            Body::RmsnReq { rpyid, sid } => {
                w.u64(rpyid);
                w.sid(sid);
            }
            Body::RmsnReply { status, sid } | Body::TestReply { status, sid } => {
                w.u32(status);
                w.sid(sid);
            }
            Body::BatchReq(b) => {
                w.u64(b.rpyid);
                w.sid(b.sid);
                w.u64(b.bid);
                w.u32(b.opc);
                w.u32(b.testidx);
                w.u32(b.arg);
            }
            Body::BatchReply {
                status,
                sid,
                active,
                time,
            } => {
                w.u32(status);
                w.sid(sid);
                w.u32(active);
                w.u32(time);
            }
            Body::StatReq {
                rpyid,
                sid,
                stat_type,
            } => {
                w.u64(rpyid);
                w.sid(sid);
                w.u32(stat_type);
            }
            Body::StatReply(s) => {
                w.u32(s.status);
                w.sid(s.sid);
                let f = s.fw;
                for v in [
                    f.running_ms,
                    f.active_batches,
                    f.zombie_sessions,
                    f.brw_errors,
                    f.ping_errors,
                ] {
                    w.u32(v);
                }
                let r = s.rpc;
                for v in [
                    r.errors,
                    r.rpcs_sent,
                    r.rpcs_rcvd,
                    r.rpcs_dropped,
                    r.rpcs_expired,
                ] {
                    w.u32(v);
                }
                w.u64(r.bulk_get);
                w.u64(r.bulk_put);
                let l = s.lnet;
                for v in [
                    l.msgs_alloc,
                    l.msgs_max,
                    l.errors,
                    l.send_count,
                    l.recv_count,
                    l.route_count,
                    l.drop_count,
                ] {
                    w.u32(v);
                }
                for v in [l.send_length, l.recv_length, l.route_length, l.drop_length] {
                    w.u64(v);
                }
            }
            Body::TestReq(t) => {
                w.u64(t.rpyid);
                w.u64(t.bulkid);
                w.sid(t.sid);
                w.u64(t.bid);
                w.u32(t.service);
                w.u32(t.loop_count);
                w.u32(t.concur);
                w.u8(t.is_client);
                w.u8(t.stop_onerr);
                w.u32(t.ndest);
                match t.params {
                    TestParams::Ping { size, flags } => {
                        w.u32(size);
                        w.u32(flags);
                    }
                    TestParams::BulkV0 { opc, npg, flags } => {
                        w.u32(opc);
                        w.u32(npg);
                        w.u32(flags);
                    }
                    TestParams::BulkV1 {
                        opc,
                        flags,
                        len,
                        offset,
                    } => {
                        w.u16(opc);
                        w.u16(flags);
                        w.u32(len);
                        w.u32(offset);
                    }
                }
            }
            Body::DebugReq { rpyid, sid, flags } => {
                w.u64(rpyid);
                w.sid(sid);
                w.u32(flags);
            }
            Body::DebugReply {
                status,
                sid,
                timeout,
                nbatch,
                name,
            } => {
                w.u32(status);
                w.sid(sid);
                w.u32(timeout);
                w.u32(nbatch);
                w.put(&name);
            }
            Body::BrwReq(b) => {
                w.u64(b.rpyid);
                w.u64(b.bulkid);
                w.u32(b.rw);
                w.u32(b.len);
                w.u32(b.flags);
            }
            Body::BrwReply { status } => w.u32(status),
            Body::PingReq(p) => {
                w.u64(p.rpyid);
                w.u32(p.magic);
                w.u32(p.seq);
                w.u64(p.time_sec);
                w.u64(p.time_nsec);
            }
            Body::PingReply { status, magic, seq } => {
                w.u32(status);
                w.u32(magic);
                w.u32(seq);
            }
            Body::JoinReq { rpyid, sid, group } => {
                w.u64(rpyid);
                w.sid(sid);
                w.put(&group);
            }
            Body::JoinReply {
                status,
                sid,
                timeout,
                session,
            } => {
                w.u32(status);
                w.sid(sid);
                w.u32(timeout);
                w.put(&session);
            }
        }
        w.buf
    }

    /// True when `b` starts with the magic in the other byte order.
    pub fn is_swabbed(b: &[u8]) -> bool {
        b.len() >= 4 && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == SRPC_MSG_MAGIC.swap_bytes()
    }

    /// Decodes a message in either byte order. Bytes after the body are
    /// ignored (kernel peers always send all 160).
    pub fn decode(b: &[u8]) -> Result<SrpcMsg, WireError> {
        if b.len() < SRPC_HDR_SIZE {
            return Err(WireError::Short(b.len()));
        }
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let be = if magic == SRPC_MSG_MAGIC {
            false
        } else if magic == SRPC_MSG_MAGIC.swap_bytes() {
            true
        } else {
            return Err(WireError::Magic(magic));
        };
        let mut r = R { b, pos: 4, be };
        let version = r.u32()?;
        if version != SRPC_MSG_VERSION {
            return Err(WireError::Version(version));
        }
        let ty = r.u32()?;
        r.u32()?;
        r.u32()?;
        let ses_feats = r.u32()?;
        let body = match ty {
            0 => Body::MksnReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
                force: r.u32()?,
                name: r.name()?,
            },
            1 => Body::MksnReply {
                status: r.u32()?,
                sid: r.sid()?,
                timeout: r.u32()?,
                name: r.name()?,
            },
            2 => Body::RmsnReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
            },
            3 => Body::RmsnReply {
                status: r.u32()?,
                sid: r.sid()?,
            },
            4 => Body::BatchReq(BatchReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
                bid: r.u64()?,
                opc: r.u32()?,
                testidx: r.u32()?,
                arg: r.u32()?,
            }),
            5 => Body::BatchReply {
                status: r.u32()?,
                sid: r.sid()?,
                active: r.u32()?,
                time: r.u32()?,
            },
            6 => Body::StatReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
                stat_type: r.u32()?,
            },
            7 => Body::StatReply(StatReply {
                status: r.u32()?,
                sid: r.sid()?,
                fw: FwCounters {
                    running_ms: r.u32()?,
                    active_batches: r.u32()?,
                    zombie_sessions: r.u32()?,
                    brw_errors: r.u32()?,
                    ping_errors: r.u32()?,
                },
                rpc: RpcCounters {
                    errors: r.u32()?,
                    rpcs_sent: r.u32()?,
                    rpcs_rcvd: r.u32()?,
                    rpcs_dropped: r.u32()?,
                    rpcs_expired: r.u32()?,
                    bulk_get: r.u64()?,
                    bulk_put: r.u64()?,
                },
                lnet: LnetCounters {
                    msgs_alloc: r.u32()?,
                    msgs_max: r.u32()?,
                    errors: r.u32()?,
                    send_count: r.u32()?,
                    recv_count: r.u32()?,
                    route_count: r.u32()?,
                    drop_count: r.u32()?,
                    send_length: r.u64()?,
                    recv_length: r.u64()?,
                    route_length: r.u64()?,
                    drop_length: r.u64()?,
                },
            }),
            8 => {
                let rpyid = r.u64()?;
                let bulkid = r.u64()?;
                let sid = r.sid()?;
                let bid = r.u64()?;
                let service = r.u32()?;
                let loop_count = r.u32()?;
                let concur = r.u32()?;
                let is_client = r.u8()?;
                let stop_onerr = r.u8()?;
                let ndest = r.u32()?;
                let params = match Service::from_id(service) {
                    Some(Service::Ping) => TestParams::Ping {
                        size: r.u32()?,
                        flags: r.u32()?,
                    },
                    Some(Service::Brw) if ses_feats & LST_FEAT_BULK_LEN != 0 => {
                        TestParams::BulkV1 {
                            opc: r.u16()?,
                            flags: r.u16()?,
                            len: r.u32()?,
                            offset: r.u32()?,
                        }
                    }
                    Some(Service::Brw) => TestParams::BulkV0 {
                        opc: r.u32()?,
                        npg: r.u32()?,
                        flags: r.u32()?,
                    },
                    _ => return Err(WireError::TestService(service)),
                };
                Body::TestReq(TestReq {
                    rpyid,
                    bulkid,
                    sid,
                    bid,
                    service,
                    loop_count,
                    concur,
                    is_client,
                    stop_onerr,
                    ndest,
                    params,
                })
            }
            9 => Body::TestReply {
                status: r.u32()?,
                sid: r.sid()?,
            },
            10 => Body::DebugReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
                flags: r.u32()?,
            },
            11 => Body::DebugReply {
                status: r.u32()?,
                sid: r.sid()?,
                timeout: r.u32()?,
                nbatch: r.u32()?,
                name: r.name()?,
            },
            12 => Body::BrwReq(BrwReq {
                rpyid: r.u64()?,
                bulkid: r.u64()?,
                rw: r.u32()?,
                len: r.u32()?,
                flags: r.u32()?,
            }),
            13 => Body::BrwReply { status: r.u32()? },
            14 => Body::PingReq(PingReq {
                rpyid: r.u64()?,
                magic: r.u32()?,
                seq: r.u32()?,
                time_sec: r.u64()?,
                time_nsec: r.u64()?,
            }),
            15 => Body::PingReply {
                status: r.u32()?,
                magic: r.u32()?,
                seq: r.u32()?,
            },
            16 => Body::JoinReq {
                rpyid: r.u64()?,
                sid: r.sid()?,
                group: r.name()?,
            },
            17 => Body::JoinReply {
                status: r.u32()?,
                sid: r.sid()?,
                timeout: r.u32()?,
                session: r.name()?,
            },
            t => return Err(WireError::Type(t)),
        };
        Ok(SrpcMsg { ses_feats, body })
    }
}

/// A process id as the framework packs it in destination lists
/// (`struct lnet_process_id_packed`: 8-byte NID, 4-byte pid, packed).
pub const PACKED_ID_SIZE: usize = 12;
/// Ids per 4 KiB page of a destination list (`SFW_ID_PER_PAGE`): ids never
/// straddle a page, the last 4 bytes of each page are unused.
pub const IDS_PER_PAGE: usize = 4096 / PACKED_ID_SIZE;

/// Encodes a destination list in pages as the console sends it (our byte
/// order).
pub fn encode_ids(ids: &[(u64, u32)]) -> Vec<u8> {
    let pages = ids.len().div_ceil(IDS_PER_PAGE).max(1);
    let mut v = vec![0u8; pages * 4096];
    for (i, &(nid, pid)) in ids.iter().enumerate() {
        let at = (i / IDS_PER_PAGE) * 4096 + (i % IDS_PER_PAGE) * PACKED_ID_SIZE;
        v[at..at + 8].copy_from_slice(&nid.to_ne_bytes());
        v[at + 8..at + 12].copy_from_slice(&pid.to_ne_bytes());
    }
    v
}

/// Bytes a list of `n` ids takes in pages.
pub fn ids_len(n: usize) -> usize {
    n.div_ceil(IDS_PER_PAGE).max(1) * 4096
}

/// Decodes `n` ids laid out in pages (swabbed when `swab`); `None` when
/// `b` is short.
pub fn decode_ids(b: &[u8], n: usize, swab: bool) -> Option<Vec<(u64, u32)>> {
    let mut out = Vec::with_capacity(n.min(b.len() / PACKED_ID_SIZE));
    for i in 0..n {
        let at = (i / IDS_PER_PAGE).checked_mul(4096)? + (i % IDS_PER_PAGE) * PACKED_ID_SIZE;
        let c = b.get(at..at + PACKED_ID_SIZE)?;
        let mut nid = u64::from_ne_bytes(c[..8].try_into().ok()?);
        let mut pid = u32::from_ne_bytes(c[8..].try_into().ok()?);
        if swab {
            nid = nid.swap_bytes();
            pid = pid.swap_bytes();
        }
        out.push((nid, pid));
    }
    Some(out)
}

/// The fuzz target's check: decoding any bytes never panics, and what
/// decodes re-encodes (in both byte orders) to a message that decodes the
/// same.
pub fn fuzz_check(data: &[u8]) {
    if let Ok(m) = SrpcMsg::decode(data) {
        for be in [false, true] {
            let again = SrpcMsg::decode(&m.encode(be));
            assert_eq!(again.as_ref(), Ok(&m), "round trip of {m:?}");
        }
    }
    let n = usize::from(data.first().copied().unwrap_or(0));
    if let Some(ids) = decode_ids(data, n, n % 2 == 1) {
        assert_eq!(ids.len(), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_valid_header_round_trips(ty in 0u32..20, be: bool, feats in 0u32..4,
                                        body in proptest::collection::vec(any::<u8>(), 136)) {
            let mut b = Vec::with_capacity(SRPC_MSG_SIZE);
            for w in [SRPC_MSG_MAGIC, SRPC_MSG_VERSION, ty, 0, 0, feats] {
                b.extend_from_slice(&if be { w.to_be_bytes() } else { w.to_le_bytes() });
            }
            b.extend_from_slice(&body);
            match SrpcMsg::decode(&b) {
                Ok(m) => {
                    prop_assert_eq!(m.body.msg_type(), ty);
                    prop_assert_eq!(SrpcMsg::decode(&m.encode(be)), Ok(m));
                    // Re-encoding in the sender's order gives its bytes back
                    // except for the reserved words and the union's tail.
                    let e = m.encode(be);
                    prop_assert_eq!(&e[..12], &b[..12]);
                }
                Err(WireError::Type(t)) => prop_assert!(t >= 18),
                Err(WireError::TestService(_)) => prop_assert_eq!(ty, 8),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_check(&b);
        }
    }

    #[test]
    fn sizes_match_the_kernel_layout() {
        // The largest body, the stat reply: 4 + 16 + 20 + 36 + 60.
        let m = SrpcMsg::new(
            0,
            Body::StatReply(StatReply {
                status: 0,
                sid: SessionId::NONE,
                fw: FwCounters::default(),
                rpc: RpcCounters::default(),
                lnet: LnetCounters {
                    drop_length: u64::MAX,
                    ..Default::default()
                },
            }),
        );
        let b = m.encode(false);
        // drop_length is the last field: it ends at byte 160 exactly.
        assert_eq!(&b[152..160], &[0xff; 8]);
        assert_eq!(SRPC_HDR_SIZE + 136, SRPC_MSG_SIZE);
    }

    #[test]
    fn brw_request_bytes() {
        let m = SrpcMsg::new(
            1,
            Body::BrwReq(BrwReq {
                rpyid: 0x0102_0304_0506_0708,
                bulkid: 0x1112_1314_1516_1718,
                rw: LST_BRW_WRITE,
                len: 4096,
                flags: 3,
            }),
        );
        let b = m.encode(false);
        assert_eq!(&b[0..4], &[0x0d, 0xf0, 0xb0, 0xee]);
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..12], &12u32.to_le_bytes());
        assert_eq!(&b[12..20], &[0; 8]);
        assert_eq!(&b[20..24], &1u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&b[40..44], &2u32.to_le_bytes());
        assert_eq!(&b[44..48], &4096u32.to_le_bytes());
        assert_eq!(&b[48..52], &3u32.to_le_bytes());
        assert!(b[52..].iter().all(|&x| x == 0));
        let be = m.encode(true);
        assert_eq!(&be[0..4], &[0xee, 0xb0, 0xf0, 0x0d]);
        assert!(SrpcMsg::is_swabbed(&be));
        assert_eq!(SrpcMsg::decode(&be).unwrap(), m);
    }

    #[test]
    fn test_request_layout() {
        // tsr_u starts at 24 + 8 + 8 + 16 + 8 + 4 + 4 + 4 + 1 + 1 + 4 = 82.
        let t = TestReq {
            rpyid: 1,
            bulkid: 2,
            sid: SessionId { nid: 3, stamp: 4 },
            bid: 5,
            service: Service::Brw as u32,
            loop_count: 6,
            concur: 7,
            is_client: 1,
            stop_onerr: 0,
            ndest: 9,
            params: TestParams::BulkV1 {
                opc: 2,
                flags: 3,
                len: 65536,
                offset: 8,
            },
        };
        let b = SrpcMsg::new(LST_FEAT_BULK_LEN, Body::TestReq(t)).encode(false);
        assert_eq!(b[76], 1);
        assert_eq!(&b[78..82], &9u32.to_le_bytes());
        assert_eq!(&b[82..84], &2u16.to_le_bytes());
        assert_eq!(&b[84..86], &3u16.to_le_bytes());
        assert_eq!(&b[86..90], &65536u32.to_le_bytes());
        assert_eq!(&b[90..94], &8u32.to_le_bytes());
        // Without the feature bit the same bytes read as a v0 request.
        let mut v0 = b;
        v0[20] = 0;
        match SrpcMsg::decode(&v0).unwrap().body {
            Body::TestReq(t) => assert!(matches!(t.params, TestParams::BulkV0 { .. })),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn bad_input_is_typed() {
        assert_eq!(SrpcMsg::decode(&[0; 10]), Err(WireError::Short(10)));
        assert_eq!(SrpcMsg::decode(&[0; 160]), Err(WireError::Magic(0)));
        let mut b = SrpcMsg::new(0, Body::BrwReply { status: 0 }).encode(false);
        b[4] = 2;
        assert_eq!(SrpcMsg::decode(&b), Err(WireError::Version(2)));
        b[4] = 1;
        b[8] = 99;
        assert_eq!(SrpcMsg::decode(&b), Err(WireError::Type(99)));
        let b = SrpcMsg::new(
            0,
            Body::BrwReq(BrwReq {
                rpyid: 1,
                bulkid: 2,
                rw: 1,
                len: 1,
                flags: 1,
            }),
        )
        .encode(false);
        assert_eq!(SrpcMsg::decode(&b[..40]), Err(WireError::Short(40)));
    }

    #[test]
    fn ids_round_trip() {
        let ids = vec![(0x0002_0000_7f00_0001, 12345), (1, 2)];
        let b = encode_ids(&ids);
        assert_eq!(b.len(), 4096);
        assert_eq!(decode_ids(&b, 2, false).unwrap(), ids);
        // 341 ids per page: the 342nd starts the second page.
        let many: Vec<_> = (0..342u64).map(|i| (i, 12345)).collect();
        let b = encode_ids(&many);
        assert_eq!(b.len(), 8192);
        assert_eq!(&b[4096..4104], &341u64.to_ne_bytes());
        assert_eq!(decode_ids(&b, 342, false).unwrap(), many);
        assert!(decode_ids(&b, 683, false).is_none());
    }
}
