//! Non-blocking `sendmsg`, plain or `MSG_ZEROCOPY`, zero-copy completions
//! (Linux), and registering a socket with the runtime for writability
//! only: the only unsafe code of this crate.
//!
//! A zero-copy `sendmsg` pins the caller's pages instead of copying them;
//! the kernel reports on the socket's error queue, as ranges of per-call
//! sequence numbers, when it no longer needs them. The caller keeps each
//! payload alive until its sequence number is reported.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Turn on `SO_ZEROCOPY` for a socket.
pub(crate) fn enable(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket owned by the caller; the option value
    // points at a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One non-blocking `sendmsg` of `iov` (with `MSG_ZEROCOPY` when
/// `zerocopy`); returns bytes sent. `MSG_DONTWAIT` makes it non-blocking
/// whatever the socket's mode (a socket read by a thread of its own is
/// in blocking mode). With `zerocopy`, every call that sends bytes
/// consumes one sequence number.
pub(crate) fn send(fd: RawFd, iov: &[IoSlice<'_>], zerocopy: bool) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix (documented guarantee);
    // the kernel only reads through these pointers.
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len().min(libc::UIO_MAXIOV as usize) as _;
    let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if zerocopy {
        flags |= libc::MSG_ZEROCOPY;
    }
    // SAFETY: `msg` describes `iov`, whose buffers stay borrowed for the
    // call; with `zerocopy`, pinning beyond it is the caller's job (it
    // keeps the payload until `completions` reports the sequence number).
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `s` registered with the current runtime for writability only (its
/// reads are a thread's own, in blocking mode).
pub(crate) fn register_writable(
    s: std::net::TcpStream,
) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpStream>> {
    // SAFETY: a std TcpStream owns its descriptor: it stays open, refers to
    // the same socket and is what `as_raw_fd` returns until the stream is
    // dropped, which only the AsyncFd that owns it can do.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(s, tokio::io::Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A completion: sequence numbers `lo..=hi` are released; `copied` when
/// the kernel fell back to copying (loopback always does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub lo: u32,
    pub hi: u32,
    pub copied: bool,
}

const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Drain the socket's error queue (non-blocking). Returns the zero-copy
/// completions found; `WouldBlock` when there was nothing.
pub(crate) fn completions(fd: RawFd) -> io::Result<Vec<Completion>> {
    let mut out = Vec::new();
    loop {
        // Room for one cmsg carrying a sock_extended_err (and slack).
        let mut cbuf = [0u64; 16];
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: `msg` points at `cbuf`, live and writable for the call,
        // with its true size; no data iovecs.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && !out.is_empty() {
                return Ok(out);
            }
            return Err(e);
        }
        // SAFETY: the kernel filled `msg.msg_control` with
        // `msg.msg_controllen` bytes of well-formed cmsgs inside `cbuf`;
        // CMSG_FIRSTHDR/NXTHDR stay within that length, and each
        // sock_extended_err is read unaligned from inside its cmsg after
        // checking the cmsg is long enough to hold it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let h = &*c;
                let want = libc::CMSG_LEN(std::mem::size_of::<libc::sock_extended_err>() as u32);
                let is_recverr = (h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_RECVERR)
                    || (h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_RECVERR);
                if is_recverr && h.cmsg_len as usize >= want as usize {
                    let e: libc::sock_extended_err =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if e.ee_errno == 0 && e.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                        out.push(Completion {
                            lo: e.ee_info,
                            hi: e.ee_data,
                            copied: e.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
                        });
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
}
