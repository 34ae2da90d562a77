//! The crate's only unsafe module: small owning wrappers over librdmacm
//! (connection management) and libibverbs (protection domain, completion
//! queue and channel, memory regions, queue-pair posts).
//!
//! Why raw `ibverbs-sys` rather than the safe `ibverbs` crate: RDMA CM
//! opens the device itself and hands out its `ibv_context` in each
//! `rdma_cm_id`; the queue pair of a CM connection must be created on that
//! context (`rdma_create_qp`) so that the CM can drive its state. The safe
//! crate's `Context` only wraps contexts it opened, so its PD, CQ and QP
//! types cannot be used with a CM-created connection. We therefore call the
//! verbs through `ibverbs-sys` (same types as librdmacm's binding) and keep
//! every call behind the safe wrappers below.
//!
//! Lifetimes: a [`CmId`] owns its id and its QP; a [`Device`] owns the PD,
//! completion channel and CQ it created; an [`Mr`] owns its registration.
//! The LND ties each buffer's lifetime to the completions of the work
//! requests that use it; these wrappers only guarantee that a handle is
//! released once.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::raw::c_int;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ibverbs_sys as ibv;

use crate::cma_sys as cma;

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(rc: c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else if rc > 0 {
        // Verbs post/notify calls return a positive errno.
        let e = io::Error::from_raw_os_error(rc);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Err(last_err(what))
    }
}

/// A C string from librdmacm/libibverbs as an owned string (`None` for
/// null).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for the
/// call.
unsafe fn owned(p: *const std::os::raw::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated by the caller's guarantee.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Wait until `fd` is readable or `timeout` passes. True when readable.
pub(crate) fn wait_readable(fd: c_int, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && (p.revents & libc::POLLIN) != 0
}

fn set_nonblocking(fd: c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take ints.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(last_err("fcntl O_NONBLOCK"));
        }
    }
    Ok(())
}

/// A `sockaddr_storage` for an IP address and port.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is
            // suitably aligned for it.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Read an IP address back from a `sockaddr` pointer.
///
/// # Safety
/// `sa` is null or points to a valid `sockaddr_in`/`sockaddr_in6`.
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `sa` points to a sockaddr of the family
    // its first field names.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let s = &*(sa as *const libc::sockaddr_in);
                Some(SocketAddr::new(
                    IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()),
                    u16::from_be(s.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let s = &*(sa as *const libc::sockaddr_in6);
                Some(SocketAddr::new(
                    IpAddr::from(s.sin6_addr.s6_addr),
                    u16::from_be(s.sin6_port),
                ))
            }
            _ => None,
        }
    }
}

/// An RDMA CM event channel (non-blocking; poll its fd).
pub(crate) struct EventChannel(*mut cma::rdma_event_channel);

// SAFETY: librdmacm event channels may be used from any thread; we only
// read events from one thread at a time (the NI's CM thread).
unsafe impl Send for EventChannel {}
// SAFETY: as above; the fd is only polled concurrently.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub(crate) fn new() -> io::Result<EventChannel> {
        // SAFETY: plain constructor; null means failure.
        let ch = unsafe { cma::rdma_create_event_channel() };
        if ch.is_null() {
            return Err(last_err("rdma_create_event_channel"));
        }
        // SAFETY: `ch` is a valid channel.
        let fd = unsafe { (*ch).fd };
        set_nonblocking(fd)?;
        Ok(EventChannel(ch))
    }

    /// The next event, waiting up to `timeout`.
    pub(crate) fn next(&self, timeout: Duration) -> Option<CmEvent> {
        // SAFETY: the channel is valid while self lives.
        let fd = unsafe { (*self.0).fd };
        for round in 0..2 {
            let mut ev: *mut cma::rdma_cm_event = ptr::null_mut();
            // SAFETY: non-blocking channel; `ev` receives an event we must
            // ack (CmEvent's Drop does).
            let rc = unsafe { cma::rdma_get_cm_event(self.0, &mut ev) };
            if rc == 0 && !ev.is_null() {
                return Some(CmEvent(ev));
            }
            if round == 0 && !wait_readable(fd, timeout) {
                return None;
            }
        }
        None
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel is destroyed before the channel
        // (the LND drops ids first).
        unsafe { cma::rdma_destroy_event_channel(self.0) };
    }
}

/// What a CM event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmEventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    ConnectRequest,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    TimewaitExit,
    Other(u32),
}

/// One CM event; acknowledged when dropped.
pub(crate) struct CmEvent(*mut cma::rdma_cm_event);

impl CmEvent {
    pub(crate) fn kind(&self) -> CmEventKind {
        use cma::rdma_cm_event_type::*;
        // SAFETY: the event is valid until acked (our Drop).
        let t = unsafe { (*self.0).event };
        match t {
            RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
            RDMA_CM_EVENT_ADDR_ERROR => CmEventKind::AddrError,
            RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            RDMA_CM_EVENT_ROUTE_ERROR => CmEventKind::RouteError,
            RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest,
            RDMA_CM_EVENT_CONNECT_ERROR => CmEventKind::ConnectError,
            RDMA_CM_EVENT_UNREACHABLE => CmEventKind::Unreachable,
            RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
            RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
            RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            RDMA_CM_EVENT_DEVICE_REMOVAL => CmEventKind::DeviceRemoval,
            RDMA_CM_EVENT_TIMEWAIT_EXIT => CmEventKind::TimewaitExit,
            o => CmEventKind::Other(o),
        }
    }
    pub(crate) fn name(&self) -> String {
        // SAFETY: rdma_event_str returns a static string for any value.
        unsafe {
            let s = cma::rdma_event_str((*self.0).event);
            owned(s).unwrap_or_else(|| "?".into())
        }
    }
    pub(crate) fn status(&self) -> i32 {
        // SAFETY: valid until acked.
        unsafe { (*self.0).status }
    }
    /// The id the event is about (for CONNECT_REQUEST: a new id, owned by
    /// whoever calls [`CmEvent::take_new_id`]).
    pub(crate) fn id_ptr(&self) -> usize {
        // SAFETY: valid until acked.
        unsafe { (*self.0).id as usize }
    }
    /// The context value of the event's id.
    pub(crate) fn id_context(&self) -> u64 {
        // SAFETY: `id` is valid while the event is.
        unsafe { (*(*self.0).id).context as u64 }
    }
    /// The connection's private data (requests, accepts, rejects).
    pub(crate) fn private_data(&self) -> Vec<u8> {
        // SAFETY: for connection events `param.conn` is the active member;
        // librdmacm sets private_data/private_data_len for them. For other
        // events the pointer is null or the length 0.
        unsafe {
            let c = (*self.0).param.conn.as_ref();
            if c.private_data.is_null() || c.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(c.private_data as *const u8, c.private_data_len.into())
                    .to_vec()
            }
        }
    }
    /// The peer's address on a connection request.
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id's route address is valid while the event is.
        unsafe {
            let id = (*self.0).id;
            ip_of(&(*id).route.addr.__bindgen_anon_2.dst_addr as *const _ as *const libc::sockaddr)
        }
    }
    /// Take ownership of a CONNECT_REQUEST's new id.
    pub(crate) fn take_new_id(&self, context: u64) -> CmId {
        // SAFETY: for CONNECT_REQUEST the id is new and ours to own.
        unsafe {
            let id = (*self.0).id;
            (*id).context = context as *mut _;
            CmId {
                id,
                has_qp: AtomicBool::new(false),
            }
        }
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: each event is acked exactly once.
        unsafe { cma::rdma_ack_cm_event(self.0) };
    }
}

/// Queue-pair sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
    pub send_sge: u32,
}

/// Connection parameters for rdma_connect/rdma_accept.
fn conn_param(private: &[u8], retry_count: u8) -> cma::rdma_conn_param {
    cma::rdma_conn_param {
        private_data: private.as_ptr() as *const _,
        private_data_len: private.len().min(255) as u8,
        responder_resources: 0,
        initiator_depth: 0,
        flow_control: 1,
        retry_count: retry_count.min(7),
        rnr_retry_count: 6,
        srq: 0,
        qp_num: 0,
    }
}

/// An RDMA CM id, with the QP created on it (if any).
pub(crate) struct CmId {
    id: *mut cma::rdma_cm_id,
    has_qp: AtomicBool,
}

// SAFETY: librdmacm ids may be used from any thread; the LND serialises
// CM calls on one id (they are made from the CM thread or under the
// connection's lock).
unsafe impl Send for CmId {}
// SAFETY: shared use is limited to reading `qp` for posts, which libibverbs
// makes thread-safe.
unsafe impl Sync for CmId {}

impl CmId {
    pub(crate) fn new(ch: &EventChannel, context: u64) -> io::Result<CmId> {
        let mut id = ptr::null_mut();
        // SAFETY: valid channel, out-pointer to a local.
        let rc = unsafe {
            cma::rdma_create_id(
                ch.0,
                &mut id,
                context as *mut _,
                cma::rdma_port_space::RDMA_PS_TCP,
            )
        };
        check(rc, "rdma_create_id")?;
        Ok(CmId {
            id,
            has_qp: AtomicBool::new(false),
        })
    }
    pub(crate) fn raw(&self) -> usize {
        self.id as usize
    }
    /// Set an `RDMA_OPTION_ID` option of this id to `v`.
    fn set_id_option<T: Copy>(&self, name: u32, v: T) {
        // SAFETY: the option value points to a live `T`, and `T` is the
        // type (and size) the named option takes (callers below).
        unsafe {
            cma::rdma_set_option(
                self.id,
                cma::RDMA_OPTION_ID as c_int,
                name as c_int,
                &v as *const T as *mut _,
                std::mem::size_of::<T>(),
            );
        }
    }
    pub(crate) fn set_reuseaddr(&self) {
        self.set_id_option::<c_int>(cma::RDMA_OPTION_ID_REUSEADDR, 1);
    }
    /// The local ACK timeout of the QP (4.096 µs × 2^`exp`): how long an
    /// unacknowledged packet waits before it is sent again. Set before
    /// connect/accept.
    pub(crate) fn set_ack_timeout(&self, exp: u8) {
        self.set_id_option::<u8>(cma::RDMA_OPTION_ID_ACK_TIMEOUT, exp.min(31));
    }
    pub(crate) fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        let (mut ss, _) = sockaddr(addr);
        // SAFETY: `ss` is a valid sockaddr for the call.
        check(
            unsafe { cma::rdma_bind_addr(self.id, &mut ss as *mut _ as *mut _) },
            "rdma_bind_addr",
        )
    }
    pub(crate) fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: bound id.
        check(unsafe { cma::rdma_listen(self.id, backlog) }, "rdma_listen")
    }
    pub(crate) fn resolve_addr(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<()> {
        let (mut s, _) = sockaddr(src);
        let (mut d, _) = sockaddr(dst);
        // SAFETY: both sockaddrs are valid for the call (copied by it).
        check(
            unsafe {
                cma::rdma_resolve_addr(
                    self.id,
                    &mut s as *mut _ as *mut _,
                    &mut d as *mut _ as *mut _,
                    timeout.as_millis().min(i32::MAX as u128) as c_int,
                )
            },
            "rdma_resolve_addr",
        )
    }
    pub(crate) fn resolve_route(&self, timeout: Duration) -> io::Result<()> {
        // SAFETY: id with a resolved address.
        check(
            unsafe {
                cma::rdma_resolve_route(self.id, timeout.as_millis().min(i32::MAX as u128) as c_int)
            },
            "rdma_resolve_route",
        )
    }
    /// The verbs context the CM bound this id to (null before binding).
    pub(crate) fn context_ptr(&self) -> usize {
        // SAFETY: valid id.
        unsafe { (*self.id).verbs as usize }
    }
    /// Create an RC QP on this id, on `dev`'s PD and CQ.
    pub(crate) fn create_qp(&self, dev: &Device, caps: QpCaps) -> io::Result<u32> {
        let mut attr = ibv::ibv_qp_init_attr {
            send_cq: dev.cq,
            recv_cq: dev.cq,
            qp_type: ibv::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        attr.cap.max_send_wr = caps.send_wr;
        attr.cap.max_recv_wr = caps.recv_wr;
        attr.cap.max_send_sge = caps.send_sge;
        attr.cap.max_recv_sge = 1;
        // SAFETY: the id is bound to dev's context (checked by the caller);
        // attr is valid for the call.
        let rc = unsafe { cma::rdma_create_qp(self.id, dev.pd, &mut attr) };
        check(rc, "rdma_create_qp")?;
        self.has_qp.store(true, Ordering::Release);
        // SAFETY: rdma_create_qp succeeded, so `qp` is set.
        Ok(unsafe { (*(*self.id).qp).qp_num })
    }
    /// Connect with `private` data; the QPs retry an unacknowledged
    /// packet `retry_count` times (0..=7) before failing.
    pub(crate) fn connect(&self, private: &[u8], retry_count: u8) -> io::Result<()> {
        let mut p = conn_param(private, retry_count);
        // SAFETY: `p` and the private data outlive the call (copied by it).
        check(
            unsafe { cma::rdma_connect(self.id, &mut p) },
            "rdma_connect",
        )
    }
    pub(crate) fn accept(&self, private: &[u8], retry_count: u8) -> io::Result<()> {
        let mut p = conn_param(private, retry_count);
        // SAFETY: as for connect.
        check(unsafe { cma::rdma_accept(self.id, &mut p) }, "rdma_accept")
    }
    pub(crate) fn reject(&self, private: &[u8]) {
        // SAFETY: the private data outlives the call.
        unsafe {
            cma::rdma_reject(
                self.id,
                private.as_ptr() as *const _,
                private.len().min(255) as u8,
            )
        };
    }
    pub(crate) fn disconnect(&self) {
        // SAFETY: valid id; harmless if not connected.
        unsafe { cma::rdma_disconnect(self.id) };
    }
    fn qp(&self) -> *mut ibv::ibv_qp {
        // SAFETY: valid id.
        unsafe { (*self.id).qp }
    }
    /// Post one receive of `len` bytes at `addr` (in `mr`).
    pub(crate) fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> io::Result<()> {
        let qp = self.qp();
        if qp.is_null() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no QP"));
        }
        let mut sge = ibv::ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut wr = ibv::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live (owned by self); the WR and SGE are valid
        // for the call; the buffer stays registered until the receive
        // completes (the LND's rule).
        let rc = unsafe {
            let ctx = (*qp).context;
            let f = (*ctx).ops.post_recv.expect("post_recv op");
            f(qp, &mut wr, &mut bad)
        };
        check(rc, "ibv_post_recv")
    }
    /// Post a chain of send work requests.
    /// The QP's local ACK timeout exponent and retry count as the device
    /// holds them (what the CM negotiated), when the QP exists.
    pub(crate) fn qp_timeout_retry(&self) -> Option<(u8, u8)> {
        if !self.has_qp.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: ibv_qp_attr and ibv_qp_init_attr are plain C structs for
        // which all-zero is a valid value.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ibv::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask =
            (ibv::ibv_qp_attr_mask::IBV_QP_TIMEOUT | ibv::ibv_qp_attr_mask::IBV_QP_RETRY_CNT).0;
        // SAFETY: the QP is live (has_qp) and both out-structs are ours.
        let rc = unsafe { ibv::ibv_query_qp(self.qp(), &mut attr, mask as i32, &mut init) };
        (rc == 0).then_some((attr.timeout, attr.retry_cnt))
    }

    pub(crate) fn post_send(&self, wrs: &[SendWr<'_>]) -> io::Result<()> {
        let qp = self.qp();
        if qp.is_null() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no QP"));
        }
        if wrs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<Vec<ibv::ibv_sge>> = wrs
            .iter()
            .map(|w| {
                w.sges
                    .iter()
                    .map(|s| ibv::ibv_sge {
                        addr: s.0,
                        length: s.1,
                        lkey: s.2,
                    })
                    .collect()
            })
            .collect();
        let mut raw: Vec<ibv::ibv_send_wr> = Vec::with_capacity(wrs.len());
        for (w, s) in wrs.iter().zip(sges.iter_mut()) {
            // SAFETY: ibv_send_wr is plain old data; zero is a valid start.
            let mut r: ibv::ibv_send_wr = unsafe { std::mem::zeroed() };
            r.wr_id = w.wr_id;
            r.sg_list = s.as_mut_ptr();
            r.num_sge = s.len() as c_int;
            r.send_flags = if w.signaled {
                ibv::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            match w.remote {
                Some((addr, rkey)) => {
                    r.opcode = ibv::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                    r.wr.rdma.remote_addr = addr;
                    r.wr.rdma.rkey = rkey;
                }
                None => r.opcode = ibv::ibv_wr_opcode::IBV_WR_SEND,
            }
            raw.push(r);
        }
        for i in 1..raw.len() {
            let next: *mut ibv::ibv_send_wr = &mut raw[i];
            raw[i - 1].next = next;
        }
        let mut bad = ptr::null_mut();
        // SAFETY: the chain and its SGE arrays live until the call returns
        // (the provider copies them); the buffers stay registered until
        // their completions (the LND's rule).
        let rc = unsafe {
            let ctx = (*qp).context;
            let f = (*ctx).ops.post_send.expect("post_send op");
            f(qp, raw.as_mut_ptr(), &mut bad)
        };
        check(rc, "ibv_post_send")
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: each id (and its QP) is destroyed once; the LND waits for
        // the QP's outstanding work requests to flush before dropping it.
        unsafe {
            if *self.has_qp.get_mut() {
                cma::rdma_destroy_qp(self.id);
            }
            cma::rdma_destroy_id(self.id);
        }
    }
}

/// One send work request: a SEND of `sges` or, with `remote`, an RDMA
/// WRITE of them to (address, rkey).
pub(crate) struct SendWr<'a> {
    pub wr_id: u64,
    pub sges: &'a [(u64, u32, u32)],
    pub remote: Option<(u64, u32)>,
    pub signaled: bool,
}

/// A completion.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    pub status: u32,
    pub len: u32,
}

/// Per-device resources: PD, completion channel, one CQ.
pub(crate) struct Device {
    ctx: *mut ibv::ibv_context,
    pd: *mut ibv::ibv_pd,
    chan: *mut ibv::ibv_comp_channel,
    cq: *mut ibv::ibv_cq,
    /// Largest SGE count per send WR.
    pub max_sge: u32,
    /// Entries of the CQ (every QP's work requests must fit).
    pub cqe: u32,
    /// Device name.
    pub name: String,
}

// SAFETY: PD, CQ and channel are thread-safe libibverbs objects; polling
// happens on one thread, registration and posts on any.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    /// Open PD, channel and a CQ of `cqe` entries on the CM's context.
    pub(crate) fn open(ctx_ptr: usize, cqe: i32) -> io::Result<Device> {
        let ctx = ctx_ptr as *mut ibv::ibv_context;
        if ctx.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no RDMA device bound to this address",
            ));
        }
        // SAFETY: `ctx` is the live context librdmacm opened; every object
        // created here is released in Drop in reverse order.
        unsafe {
            let mut attr: ibv::ibv_device_attr = std::mem::zeroed();
            check(ibv::ibv_query_device(ctx, &mut attr), "ibv_query_device")?;
            let name = owned(ibv::ibv_get_device_name((*ctx).device)).unwrap_or_default();
            let pd = ibv::ibv_alloc_pd(ctx);
            if pd.is_null() {
                return Err(last_err("ibv_alloc_pd"));
            }
            let chan = ibv::ibv_create_comp_channel(ctx);
            if chan.is_null() {
                ibv::ibv_dealloc_pd(pd);
                return Err(last_err("ibv_create_comp_channel"));
            }
            let cqe = cqe.min(attr.max_cqe);
            let cq = ibv::ibv_create_cq(ctx, cqe, ptr::null_mut(), chan, 0);
            if cq.is_null() {
                ibv::ibv_destroy_comp_channel(chan);
                ibv::ibv_dealloc_pd(pd);
                return Err(last_err("ibv_create_cq"));
            }
            set_nonblocking((*chan).fd)?;
            set_nonblocking((*ctx).async_fd)?;
            Ok(Device {
                ctx,
                pd,
                chan,
                cq,
                max_sge: (attr.max_sge.max(1) as u32).min(30),
                cqe: (*cq).cqe.max(0) as u32,
                name,
            })
        }
    }

    pub(crate) fn context_ptr(&self) -> usize {
        self.ctx as usize
    }

    /// Register `len` bytes at `addr` for local use and remote writes.
    pub(crate) fn reg(&self, addr: usize, len: usize) -> io::Result<Mr> {
        let access = ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the caller keeps [addr, addr+len) mapped while the Mr
        // lives (registration pins it; deregistration in Drop).
        let mr = unsafe { ibv::ibv_reg_mr(self.pd, addr as *mut _, len.max(1), access.0 as c_int) };
        if mr.is_null() {
            return Err(last_err("ibv_reg_mr"));
        }
        // SAFETY: a successful registration.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Mr {
            mr,
            addr,
            len,
            lkey,
            rkey,
        })
    }

    /// Poll up to `out.len()` (at most 32) completions into `out`; no
    /// allocation, so the completion thread can spin on it.
    pub(crate) fn poll(&self, out: &mut [Completion]) -> io::Result<usize> {
        let mut wcs = [ibv::ibv_wc::default(); 32];
        let max = out.len().min(wcs.len());
        // SAFETY: `wcs` has room for `max` entries; the CQ is live.
        let n = unsafe {
            let f = (*self.ctx).ops.poll_cq.expect("poll_cq op");
            f(self.cq, max as c_int, wcs.as_mut_ptr())
        };
        if n < 0 {
            return Err(io::Error::other("ibv_poll_cq failed"));
        }
        for (wc, o) in wcs[..n as usize].iter().zip(out.iter_mut()) {
            let (ok, status) = match wc.error() {
                None => (true, 0),
                Some((s, _)) => (false, s),
            };
            *o = Completion {
                wr_id: wc.wr_id(),
                ok,
                status,
                len: wc.len() as u32,
            };
        }
        Ok(n as usize)
    }

    /// Arm the CQ: the next completion signals the channel.
    pub(crate) fn arm(&self) -> io::Result<()> {
        // SAFETY: live CQ.
        let rc = unsafe {
            let f = (*self.ctx).ops.req_notify_cq.expect("req_notify_cq op");
            f(self.cq, 0)
        };
        check(rc, "ibv_req_notify_cq")
    }

    /// Sleep on the completion channel up to `timeout`; consume and ack
    /// the event if one came.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        // SAFETY: live channel.
        let fd = unsafe { (*self.chan).fd };
        if !wait_readable(fd, timeout) {
            return false;
        }
        let mut cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: non-blocking channel; an event returned is acked at once.
        unsafe {
            if ibv::ibv_get_cq_event(self.chan, &mut cq, &mut ctx) == 0 {
                ibv::ibv_ack_cq_events(cq, 1);
                return true;
            }
        }
        false
    }

    /// Drain asynchronous device events; returns their names.
    pub(crate) fn async_events(&self) -> Vec<String> {
        let mut v = Vec::new();
        for _ in 0..64 {
            // SAFETY: non-blocking async fd; each event is acked.
            unsafe {
                let mut ev: ibv::ibv_async_event = std::mem::zeroed();
                if ibv::ibv_get_async_event(self.ctx, &mut ev) != 0 {
                    break;
                }
                let s = ibv::ibv_event_type_str(ev.event_type);
                v.push(owned(s).unwrap_or_else(|| format!("event {}", ev.event_type)));
                ibv::ibv_ack_async_event(&mut ev);
            }
        }
        v
    }

    pub(crate) fn async_fd(&self) -> c_int {
        // SAFETY: live context.
        unsafe { (*self.ctx).async_fd }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: all QPs on this CQ and all MRs on this PD are gone (the
        // LND drops connections and registrations first).
        unsafe {
            ibv::ibv_destroy_cq(self.cq);
            ibv::ibv_destroy_comp_channel(self.chan);
            ibv::ibv_dealloc_pd(self.pd);
        }
    }
}

/// A memory registration.
pub(crate) struct Mr {
    mr: *mut ibv::ibv_mr,
    pub addr: usize,
    pub len: usize,
    pub lkey: u32,
    pub rkey: u32,
}

// SAFETY: an MR handle is immutable after registration; deregistration
// happens once, in Drop.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// True when [addr, addr+len) lies inside this registration.
    pub(crate) fn covers(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr && addr.saturating_add(len) <= self.addr + self.len
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once; no work request uses
        // it any more (buffers are released only on completion).
        unsafe { ibv::ibv_dereg_mr(self.mr) };
    }
}

/// Names of the RDMA devices present (empty when there is none or
/// libibverbs finds no provider).
pub fn device_names() -> Vec<String> {
    let mut n: c_int = 0;
    // SAFETY: returns an array of `n` device pointers that we free.
    unsafe {
        let list = ibv::ibv_get_device_list(&mut n);
        if list.is_null() {
            return Vec::new();
        }
        let v = (0..n as usize)
            .map(|i| owned(ibv::ibv_get_device_name(*list.add(i))).unwrap_or_default())
            .collect();
        ibv::ibv_free_device_list(list);
        v
    }
}
