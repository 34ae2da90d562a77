//! The shm transport's only unsafe code: shared mappings of memfd
//! segments, bounds-checked copies in and out of them, and taking
//! ownership of file descriptors received over a Unix socket.
//!
//! A peer maps our segments read-write and may write anything into them,
//! at any time. So nothing here hands out references that assume the
//! memory is stable, except [`Seg::ctl`] (atomics, which tolerate
//! concurrent writers) and [`Seg::slice`] (for loans, documented below);
//! everything else copies with explicit bounds checks. Segments are
//! sealed against shrinking, so a peer cannot truncate the file under our
//! mapping (which would turn our accesses into SIGBUS).

use std::ffi::CStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;

use memmap2::MmapRaw;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::ShmError;
use super::ring::{AtomicU32, RingCtl};

/// A shared segment mapped into this process.
pub(crate) struct Seg {
    map: MmapRaw,
    fd: OwnedFd,
}

impl std::fmt::Debug for Seg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Seg({} bytes)", self.len())
    }
}

impl Seg {
    /// A new zeroed segment of `size` bytes, sealed against shrinking.
    pub(crate) fn create(name: &CStr, size: usize) -> Result<Seg, ShmError> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| ShmError::Os("memfd_create", e.into()))?;
        nix::unistd::ftruncate(&fd, size as i64)
            .map_err(|e| ShmError::Os("ftruncate", e.into()))?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL),
        )
        .map_err(|e| ShmError::Os("seal", e.into()))?;
        Self::map(fd)
    }

    /// Map a segment received from a peer: it must be sealed against
    /// shrinking; its size is read from the file itself.
    pub(crate) fn map(fd: OwnedFd) -> Result<Seg, ShmError> {
        let seals =
            fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|_| ShmError::BadSegment("not a memfd"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ShmError::BadSegment("segment can shrink"));
        }
        let map = MmapRaw::map_raw(&fd).map_err(|e| ShmError::Os("mmap", e))?;
        if map.len() < super::wire::SEG_HDR_SIZE {
            return Err(ShmError::BadSegment("segment too small"));
        }
        Ok(Seg { map, fd })
    }

    /// The file descriptor (to pass to a peer).
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
    /// Start address.
    pub(crate) fn base(&self) -> usize {
        self.map.as_mut_ptr() as usize
    }

    fn check(&self, off: usize, len: usize) -> Result<(), ShmError> {
        match off.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ShmError::OutOfBounds),
        }
    }

    /// The ring control block at `off` (64-byte aligned, inside).
    pub(crate) fn ctl(&self, off: usize) -> Result<&RingCtl, ShmError> {
        self.check(off, std::mem::size_of::<RingCtl>())?;
        if off % 64 != 0 {
            return Err(ShmError::OutOfBounds);
        }
        // SAFETY: in bounds and aligned (mmap is page-aligned, off is a
        // multiple of 64, RingCtl's alignment); RingCtl is atomics and
        // padding, valid for any bit pattern, and atomics may be written
        // concurrently by the peer. The reference lives no longer than
        // `self`, which keeps the mapping.
        Ok(unsafe { &*(self.map.as_mut_ptr().add(off) as *const RingCtl) })
    }

    /// The 4-byte slot mark at `off` (4-byte aligned, inside).
    #[inline]
    pub(crate) fn mark(&self, off: usize) -> Result<&AtomicU32, ShmError> {
        self.check(off, 4)?;
        if off % 4 != 0 {
            return Err(ShmError::OutOfBounds);
        }
        // SAFETY: in bounds and aligned for an AtomicU32 (the mapping is
        // page-aligned, off a multiple of 4); any bit pattern is a valid
        // u32. We touch it only atomically; the peer, another process,
        // stores marks atomically too, and whatever it stores is a value
        // the ring validates. The reference lives no longer than `self`,
        // which keeps the mapping.
        Ok(unsafe { &*(self.map.as_mut_ptr().add(off) as *const AtomicU32) })
    }

    /// Copy `dst.len()` bytes out from `off`.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        self.check(off, dst.len())?;
        // SAFETY: the range is inside the mapping (checked) and `dst` is
        // our own memory, so they cannot overlap. The peer may be writing
        // the range meanwhile: we then copy torn bytes, which every caller
        // validates before use (never a reference into shared memory).
        unsafe { copy_bytes(self.map.as_mut_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Ask the CPU to bring the cache lines of `[off, off + len)` in
    /// (a hint: no fault, no wait, no effect on what a later read sees).
    /// Outside the mapping, nothing happens.
    #[inline]
    pub(crate) fn prefetch(&self, off: usize, len: usize) {
        if self.check(off, len).is_err() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        for line in (0..len).step_by(64) {
            // SAFETY: `off + line` is inside the mapping (checked above),
            // so `add` stays in the allocation; a prefetch reads nothing
            // the program sees and cannot fault.
            unsafe {
                let p = self.map.as_mut_ptr().add(off + line) as *const i8;
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p);
            }
        }
    }

    /// Copy `src` in at `off`.
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> Result<(), ShmError> {
        self.check(off, src.len())?;
        // SAFETY: the range is inside the mapping (checked); `src` is our
        // own memory. Writes to shared memory race only with a peer that
        // breaks the protocol, which harms its own view, not our memory.
        unsafe { copy_bytes(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) };
        Ok(())
    }

    /// Copy the gathered `src` slices in at `off` (at most `len` bytes).
    pub(crate) fn write_vectored(
        &self,
        off: usize,
        len: usize,
        src: &[IoSlice<'_>],
        skip: usize,
    ) -> Result<usize, ShmError> {
        self.check(off, len)?;
        let (mut at, mut skip) = (0, skip);
        for s in src {
            if at == len {
                break;
            }
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let s = &s[skip..];
            skip = 0;
            let n = s.len().min(len - at);
            self.write(off + at, &s[..n])?;
            at += n;
        }
        Ok(at)
    }

    /// A borrowed view of `[off, off+len)`, for a loan handed to the
    /// application as `Bytes`.
    pub(crate) fn slice(&self, off: usize, len: usize) -> Result<&[u8], ShmError> {
        self.check(off, len)?;
        // SAFETY: in bounds; the mapping lives as long as `self`. The
        // lending peer promised (RDV_LOANABLE) that the chunk is frozen
        // until we release it, and only such chunks are lent; a peer that
        // breaks that promise changes the bytes the application sees, but
        // cannot make us touch memory outside the mapping.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_mut_ptr().add(off), len) })
    }

    /// `[off, off+len)` as pool memory.
    pub(crate) fn region(self: &std::sync::Arc<Self>, off: usize) -> Result<SegRegion, ShmError> {
        self.check(off, 0)?;
        Ok(SegRegion {
            seg: self.clone(),
            off,
        })
    }
}

/// The part of a segment after its header, as pool memory.
pub(crate) struct SegRegion {
    seg: std::sync::Arc<Seg>,
    off: usize,
}

// SAFETY: the region lies inside the mapping (checked in `Seg::region`),
// which stays mapped while `seg` lives; only the pool that owns this value
// hands out pieces of it. Peers may write into it (the WriteReq path does,
// into chunks we reserved for exactly that).
unsafe impl lnet::PoolMemory for SegRegion {
    fn base(&self) -> NonNull<u8> {
        // SAFETY (not an unsafe block): a mapping's address is never null.
        NonNull::new((self.seg.base() + self.off) as *mut u8).expect("mapped")
    }
    fn len(&self) -> usize {
        self.seg.len() - self.off
    }
}

// SAFETY: MmapRaw is a raw address and length; all access goes through
// the checked methods above, whose own SAFETY notes cover concurrency.
unsafe impl Send for Seg {}
// SAFETY: as above.
unsafe impl Sync for Seg {}

/// Send `data` with `fds` attached.
pub(crate) fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cm: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None)?;
    if n != data.len() {
        return Err(std::io::Error::other("short send"));
    }
    Ok(())
}

/// Receive exactly `buf.len()` bytes and the descriptors sent with them
/// (at most `max_fds`; extra ones are closed).
pub(crate) fn recv_with_fds(
    s: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut got = 0;
    let mut cbuf = nix::cmsg_space!([RawFd; 8]);
    while got < buf.len() {
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cbuf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(v) = c {
                for fd in v {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        got += msg.bytes;
    }
    if fds.len() > max_fds {
        fds.truncate(max_fds);
    }
    Ok(fds)
}

/// Copy `n` bytes from `src` to `dst`: up to 64 as overlapping unaligned
/// 8- or 16-byte words, inline (a message's slot header, its compact LNet
/// header and a small payload: a `memcpy` call and its size dispatch cost
/// more than such a copy), longer runs by `copy_nonoverlapping`.
///
/// # Safety
/// `src` is valid for `n` reads and `dst` for `n` writes, and the two
/// ranges do not overlap (`copy_nonoverlapping`'s contract).
#[inline(always)]
unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    use std::ptr::{read_unaligned as rd, write_unaligned as wr};
    // SAFETY: each word read lies in `src[..n]` and each word written in
    // `dst[..n]` (the offsets are at most n - W for a W-byte word, and
    // n >= W on each branch); unaligned access is what `read_unaligned`
    // and `write_unaligned` are for; the rest is the caller's contract.
    unsafe {
        match n {
            33..=64 => {
                let (a, b) = (rd(src as *const u128), rd(src.add(16) as *const u128));
                let (c, d) = (
                    rd(src.add(n - 32) as *const u128),
                    rd(src.add(n - 16) as *const u128),
                );
                wr(dst as *mut u128, a);
                wr(dst.add(16) as *mut u128, b);
                wr(dst.add(n - 32) as *mut u128, c);
                wr(dst.add(n - 16) as *mut u128, d);
            }
            16..=32 => {
                let (a, b) = (rd(src as *const u128), rd(src.add(n - 16) as *const u128));
                wr(dst as *mut u128, a);
                wr(dst.add(n - 16) as *mut u128, b);
            }
            8..=15 => {
                let (a, b) = (rd(src as *const u64), rd(src.add(n - 8) as *const u64));
                wr(dst as *mut u64, a);
                wr(dst.add(n - 8) as *mut u64, b);
            }
            _ => std::ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_seals() {
        let s = Seg::create(c"t", 8192).unwrap();
        let mut b = [0u8; 16];
        assert!(s.read(8192 - 16, &mut b).is_ok());
        assert!(matches!(
            s.read(8192 - 15, &mut b),
            Err(ShmError::OutOfBounds)
        ));
        assert!(s.read(usize::MAX - 3, &mut b).is_err());
        assert!(s.write(8190, &[1, 2, 3]).is_err());
        assert!(s.ctl(100).is_err(), "misaligned");
        assert!(s.ctl(8192 - 64).is_err(), "runs past the end");
        assert!(s.slice(8000, 193).is_err());
        // the segment cannot shrink under our mapping
        let fd2 = s.fd.try_clone().unwrap();
        assert!(nix::unistd::ftruncate(&fd2, 100).is_err());
        let m = Seg::map(fd2).unwrap();
        m.write(10, b"xyz").unwrap();
        let mut o = [0u8; 3];
        s.read(10, &mut o).unwrap();
        assert_eq!(&o, b"xyz");
        // an unsealed file is refused
        let raw = memfd_create(c"u", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&raw, 8192).unwrap();
        assert!(matches!(Seg::map(raw), Err(ShmError::BadSegment(_))));
    }

    #[test]
    fn reads_and_writes_move_every_byte_at_every_length() {
        let s = Seg::create(c"c", 8192).unwrap();
        let src: Vec<u8> = (1..=100).collect();
        for n in 0..=100 {
            for off in [0, 3, 64, 8192 - n] {
                s.write(off, &src[..n]).unwrap();
                let mut back = vec![0u8; n];
                s.read(off, &mut back).unwrap();
                assert_eq!(back, src[..n], "{n} bytes at {off}");
            }
        }
        // Neighbours untouched: a 9-byte write between two marked bytes.
        s.write(100, &[0xAA]).unwrap();
        s.write(110, &[0xBB]).unwrap();
        s.write(101, &[7u8; 9]).unwrap();
        let mut b = [0u8; 11];
        s.read(100, &mut b).unwrap();
        assert_eq!(b, [0xAA, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0xBB]);
    }

    #[test]
    fn prefetch_is_only_a_hint() {
        let s = Seg::create(c"p", 8192).unwrap();
        s.write(8192 - 3, b"end").unwrap();
        // In bounds, at the very end, past it, and with overflowing
        // offsets: no fault, and the bytes read back are untouched.
        for (off, len) in [
            (0, 128),
            (8192 - 128, 128),
            (8192 - 64, 128),
            (8192, 1),
            (usize::MAX - 10, 128),
        ] {
            s.prefetch(off, len);
        }
        let mut o = [0u8; 3];
        s.read(8192 - 3, &mut o).unwrap();
        assert_eq!(&o, b"end");
        assert!(matches!(
            s.read(8192 - 2, &mut o),
            Err(ShmError::OutOfBounds)
        ));
    }

    #[test]
    fn vectored_copies() {
        let s = Seg::create(c"t", 8192).unwrap();
        let a = [1u8; 3];
        let b = [2u8; 5];
        let n = s
            .write_vectored(100, 6, &[IoSlice::new(&a), IoSlice::new(&b)], 1)
            .unwrap();
        assert_eq!(n, 6);
        let mut x = [0u8; 8];
        s.read(100, &mut x).unwrap();
        assert_eq!(x, [1, 1, 2, 2, 2, 2, 0, 0]);
    }
}
