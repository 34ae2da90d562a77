//! Memory descriptors: their memory, options, and the rules that decide how
//! much of an incoming message an MD accepts.

use std::io::{IoSlice, IoSliceMut};
use std::ops::{BitOr, BitOrAssign, Deref, DerefMut};

use bytes::{Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::pool::PoolBuf;
use crate::{LNET_MAX_IOV, LNET_MTU};

/// MD options (`enum lnet_md_options`; values as in LNet, plus
/// [`MdOptions::LOAN`] of this library).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MdOptions(pub u32);

impl MdOptions {
    /// No option.
    pub const NONE: MdOptions = MdOptions(0);
    /// Remote PUTs may land here.
    pub const OP_PUT: MdOptions = MdOptions(0x0001);
    /// Remote GETs may read from here.
    pub const OP_GET: MdOptions = MdOptions(0x0002);
    /// The initiator chooses the offset (else the MD's local offset, which
    /// advances with each operation, is used).
    pub const MANAGE_REMOTE: MdOptions = MdOptions(0x0004);
    /// Accept the part that fits of an oversize message (else drop it).
    pub const TRUNCATE: MdOptions = MdOptions(0x0010);
    /// Never send an ACK for a PUT into this MD.
    pub const ACK_DISABLE: MdOptions = MdOptions(0x0020);
    /// Each operation may use at most `max_size` bytes; the MD is exhausted
    /// once less than that remains.
    pub const MAX_SIZE: MdOptions = MdOptions(0x0080);
    /// (Extension.) Take the payload as a loaned [`Bytes`] in the event
    /// rather than copying it into this MD's memory, when the LND can.
    pub const LOAN: MdOptions = MdOptions(0x0001_0000);

    /// True when every bit of `o` is set.
    pub fn contains(self, o: MdOptions) -> bool {
        self.0 & o.0 == o.0
    }
}

impl BitOr for MdOptions {
    type Output = MdOptions;
    fn bitor(self, o: MdOptions) -> MdOptions {
        MdOptions(self.0 | o.0)
    }
}
impl BitOrAssign for MdOptions {
    fn bitor_assign(&mut self, o: MdOptions) {
        self.0 |= o.0;
    }
}

/// How many operations an MD serves before it unlinks itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    /// This many more.
    Finite(u32),
    /// Without limit (`LNET_MD_THRESH_INF`).
    Infinite,
}

impl Threshold {
    pub(crate) fn is_zero(self) -> bool {
        self == Threshold::Finite(0)
    }
    pub(crate) fn dec(&mut self) {
        if let Threshold::Finite(n) = self {
            *n = n.saturating_sub(1);
        }
    }
}

/// One piece of MD memory.
#[derive(Debug)]
pub enum Segment {
    /// An owned vector.
    Vec(Vec<u8>),
    /// A mutable `bytes` buffer.
    BytesMut(BytesMut),
    /// Shared, read-only bytes (a source only; also what loans are made of).
    Bytes(Bytes),
    /// A chunk of a [`MemPool`](crate::pool::MemPool): memory an LND may
    /// have shared or registered in advance.
    Pool(PoolBuf),
}

impl Segment {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Segment::Vec(v) => v,
            Segment::BytesMut(b) => b,
            Segment::Bytes(b) => b,
            Segment::Pool(b) => b,
        }
    }
    /// The bytes, mutably (`None` for read-only [`Segment::Bytes`]).
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        match self {
            Segment::Vec(v) => Some(v),
            Segment::BytesMut(b) => Some(b),
            Segment::Pool(b) => Some(b),
            Segment::Bytes(_) => None,
        }
    }
}

/// `dst.copy_from_slice(src)`, with the few bytes of a small message (up
/// to 32) moved inline as two overlapping fixed-size words: a `memcpy`
/// call, its size dispatch included, costs more than such a copy, and the
/// core makes one or two on the way of every small message.
///
/// Panics, as `copy_from_slice` does, when the lengths differ.
#[inline]
pub(crate) fn copy_small(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    if n > 32 || n != dst.len() {
        dst.copy_from_slice(src);
    } else if n >= 16 {
        copy_words::<16>(dst, src);
    } else if n >= 8 {
        copy_words::<8>(dst, src);
    } else if n >= 4 {
        copy_words::<4>(dst, src);
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    }
}

/// The first and the last `W` bytes of `src` (`W <= len <= 2W`, same
/// length as `dst`) into `dst`: together, all of it.
#[inline(always)]
fn copy_words<const W: usize>(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    let head: [u8; W] = src[..W].try_into().expect("len >= W");
    let tail: [u8; W] = src[n - W..].try_into().expect("len >= W");
    dst[..W].copy_from_slice(&head);
    dst[n - W..].copy_from_slice(&tail);
}

/// The memory an MD owns: one segment or a vector of up to
/// [`LNET_MAX_IOV`] fragments. Given back in the MD's final event.
///
/// ```
/// use lnet::MdBuffer;
/// let b = MdBuffer::from_frags(vec![vec![0u8; 4096].into(), vec![1u8; 100].into()]).unwrap();
/// assert_eq!(b.len(), 4196);
/// let mut out = vec![0u8; 8];
/// b.copy_out(4094, &mut out);
/// assert_eq!(out, [0, 0, 1, 1, 1, 1, 1, 1]);
/// ```
#[derive(Debug, Default)]
pub struct MdBuffer {
    segs: Segs,
    len: usize,
    /// For loan-only MDs: how much they accept (they own no memory).
    loan_capacity: usize,
}

/// The segments of an MD: most MDs have one, kept inline (no allocation
/// beyond the memory itself).
#[derive(Debug, Default)]
enum Segs {
    #[default]
    None,
    One(Segment),
    Many(Vec<Segment>),
}

impl std::ops::Deref for Segs {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        match self {
            Segs::None => &[],
            Segs::One(s) => std::slice::from_ref(s),
            Segs::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Segs {
    fn deref_mut(&mut self) -> &mut [Segment] {
        match self {
            Segs::None => &mut [],
            Segs::One(s) => std::slice::from_mut(s),
            Segs::Many(v) => v,
        }
    }
}

impl Segs {
    fn into_vec(self) -> Vec<Segment> {
        match self {
            Segs::None => Vec::new(),
            Segs::One(s) => vec![s],
            Segs::Many(v) => v,
        }
    }
}

impl From<Vec<u8>> for Segment {
    fn from(v: Vec<u8>) -> Self {
        Segment::Vec(v)
    }
}
impl From<Bytes> for Segment {
    fn from(v: Bytes) -> Self {
        Segment::Bytes(v)
    }
}
impl From<BytesMut> for Segment {
    fn from(v: BytesMut) -> Self {
        Segment::BytesMut(v)
    }
}
impl From<PoolBuf> for Segment {
    fn from(v: PoolBuf) -> Self {
        Segment::Pool(v)
    }
}
impl From<PoolBuf> for MdBuffer {
    fn from(v: PoolBuf) -> Self {
        MdBuffer::single(Segment::Pool(v))
    }
}
impl From<Vec<u8>> for MdBuffer {
    fn from(v: Vec<u8>) -> Self {
        MdBuffer::single(Segment::Vec(v))
    }
}
impl From<Bytes> for MdBuffer {
    fn from(v: Bytes) -> Self {
        MdBuffer::single(Segment::Bytes(v))
    }
}
impl From<BytesMut> for MdBuffer {
    fn from(v: BytesMut) -> Self {
        MdBuffer::single(Segment::BytesMut(v))
    }
}

impl MdBuffer {
    fn single(s: Segment) -> Self {
        let len = s.len();
        MdBuffer {
            segs: Segs::One(s),
            len,
            loan_capacity: 0,
        }
    }

    /// A fragment vector (at most [`LNET_MAX_IOV`] fragments).
    pub fn from_frags(frags: Vec<Segment>) -> Result<Self> {
        if frags.len() > LNET_MAX_IOV {
            return Err(Error::Invalid("more than LNET_MAX_IOV fragments"));
        }
        let len = frags.iter().map(Segment::len).sum();
        Ok(MdBuffer {
            segs: Segs::Many(frags),
            len,
            loan_capacity: 0,
        })
    }

    /// No memory: an MD that only takes loans of up to `capacity` bytes
    /// (use with [`MdOptions::LOAN`]). Where the LND cannot lend, the core
    /// allocates the buffer it receives into and hands that over instead.
    pub fn loan_only(capacity: usize) -> Self {
        MdBuffer {
            segs: Segs::None,
            len: 0,
            loan_capacity: capacity.min(LNET_MTU as usize),
        }
    }

    /// Bytes of memory (or loan capacity).
    pub fn len(&self) -> usize {
        self.len.max(self.loan_capacity)
    }
    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when this MD owns no memory and only takes loans.
    pub fn is_loan_only(&self) -> bool {
        self.segs.is_empty() && self.loan_capacity > 0
    }
    /// True when every segment can be written.
    pub fn is_writable(&self) -> bool {
        self.segs.iter().all(|s| !matches!(s, Segment::Bytes(_)))
    }
    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }
    /// Take the segments back.
    pub fn into_segments(self) -> Vec<Segment> {
        self.segs.into_vec()
    }
    /// The memory as one `Vec` (copies when it is not a single `Vec`).
    pub fn into_vec(self) -> Vec<u8> {
        if let Segs::One(Segment::Vec(v)) = self.segs {
            return v;
        }
        let mut out = Vec::with_capacity(self.len);
        for s in self.segs.iter() {
            out.extend_from_slice(s.as_slice());
        }
        out
    }

    /// When `[off, off+len)` lies in one shared `Bytes` segment, a
    /// zero-copy view of it.
    pub fn bytes_view(&self, off: usize, len: usize) -> Option<Bytes> {
        let mut base = 0;
        for s in self.segs.iter() {
            let l = s.len();
            if off >= base && off + len <= base + l {
                return match s {
                    Segment::Bytes(b) => Some(b.slice(off - base..off - base + len)),
                    _ => None,
                };
            }
            base += l;
            if base > off {
                return None;
            }
        }
        None
    }

    /// The slices covering `[off, off+len)` (clamped to the memory).
    pub fn slices(&self, off: usize, len: usize) -> Iov<IoSlice<'_>> {
        let mut out = Iov::new();
        let (mut off, mut left) = (off, len);
        for s in self.segs.iter() {
            if left == 0 {
                break;
            }
            let b = s.as_slice();
            if off >= b.len() {
                off -= b.len();
                continue;
            }
            let n = (b.len() - off).min(left);
            out.push(IoSlice::new(&b[off..off + n]));
            left -= n;
            off = 0;
        }
        out
    }

    /// The writable slices covering `[off, off+len)` (clamped; read-only
    /// segments are skipped, which the core prevents by refusing to attach
    /// them as sinks).
    pub fn slices_mut(&mut self, off: usize, len: usize) -> Iov<IoSliceMut<'_>> {
        let mut out = Iov::new();
        let (mut off, mut left) = (off, len);
        for s in self.segs.iter_mut() {
            if left == 0 {
                break;
            }
            let l = s.len();
            if off >= l {
                off -= l;
                continue;
            }
            let n = (l - off).min(left);
            if let Some(b) = s.as_mut_slice() {
                out.push(IoSliceMut::new(&mut b[off..off + n]));
            }
            left -= n;
            off = 0;
        }
        out
    }

    /// Copy `[off, off+dst.len())` out into `dst`; returns bytes copied.
    #[inline]
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) -> usize {
        // The usual MD, one segment, inline (the core copies small
        // payloads this way on every message); a fragment vector out of
        // line.
        if let Segs::One(seg) = &self.segs {
            let b = seg.as_slice();
            let n = b.len().saturating_sub(off).min(dst.len());
            if n > 0 {
                copy_small(&mut dst[..n], &b[off..off + n]);
            }
            return n;
        }
        self.copy_out_frags(off, dst)
    }

    /// [`MdBuffer::copy_out`] over a fragment vector: straight over the
    /// segments (no slice list to build).
    #[inline(never)]
    fn copy_out_frags(&self, off: usize, dst: &mut [u8]) -> usize {
        let (mut off, mut done) = (off, 0);
        for s in self.segs.iter() {
            if done == dst.len() {
                break;
            }
            let b = s.as_slice();
            if off >= b.len() {
                off -= b.len();
                continue;
            }
            let n = (b.len() - off).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&b[off..off + n]);
            done += n;
            off = 0;
        }
        done
    }

    /// Copy `src` in at `off`; returns bytes copied.
    pub fn copy_in(&mut self, off: usize, src: &[u8]) -> usize {
        let mut written = 0;
        let r = self.try_for_each_mut(off, src.len(), |rel, d| {
            d.copy_from_slice(&src[rel..rel + d.len()]);
            written += d.len();
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(_) = r;
        written
    }

    /// Run `f` on each writable slice of `[off, off+len)` (clamped to the
    /// memory), in order, with its offset in the range; the first error
    /// stops the walk. Returns the length of the range covered.
    pub(crate) fn try_for_each_mut<E>(
        &mut self,
        off: usize,
        len: usize,
        mut f: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<usize, E> {
        if let Segs::One(seg) = &mut self.segs {
            // The usual MD: one segment, no walk.
            let l = seg.len();
            let n = l.saturating_sub(off).min(len);
            if n > 0
                && let Some(b) = seg.as_mut_slice()
            {
                f(0, &mut b[off..off + n])?;
            }
            return Ok(n);
        }
        let (mut off, mut rel) = (off, 0);
        for s in self.segs.iter_mut() {
            if rel == len {
                break;
            }
            let l = s.len();
            if off >= l {
                off -= l;
                continue;
            }
            let n = (l - off).min(len - rel);
            if let Some(b) = s.as_mut_slice() {
                f(rel, &mut b[off..off + n])?;
            }
            rel += n;
            off = 0;
        }
        Ok(rel)
    }
}

/// The slices of an MD's memory that a range covers, as [`MdBuffer::slices`]
/// and [`MdBuffer::slices_mut`] return them: a slice of `T` (for a vectored
/// read or write), kept inline when there is one slice, the usual case, so
/// that building it costs no allocation per message.
///
/// ```
/// let b = lnet::MdBuffer::from(vec![1u8; 100]);
/// let s = b.slices(10, 20);
/// assert_eq!(s.len(), 1);
/// assert_eq!(s[0].len(), 20);
/// ```
#[derive(Debug)]
pub struct Iov<T>(IovInner<T>);

#[derive(Debug)]
enum IovInner<T> {
    Empty,
    One([T; 1]),
    Many(Vec<T>),
}

impl<T> Iov<T> {
    fn new() -> Self {
        Iov(IovInner::Empty)
    }

    fn push(&mut self, t: T) {
        self.0 = match std::mem::replace(&mut self.0, IovInner::Empty) {
            IovInner::Empty => IovInner::One([t]),
            IovInner::One([a]) => IovInner::Many(vec![a, t]),
            IovInner::Many(mut v) => {
                v.push(t);
                IovInner::Many(v)
            }
        };
    }
}

impl<T> Deref for Iov<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            IovInner::Empty => &[],
            IovInner::One(a) => a,
            IovInner::Many(v) => v,
        }
    }
}

impl<T> DerefMut for Iov<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            IovInner::Empty => &mut [],
            IovInner::One(a) => a,
            IovInner::Many(v) => v,
        }
    }
}

/// The operation a message asks of an MD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A PUT writes into it.
    Put,
    /// A GET reads from it.
    Get,
}

/// The part of an MD's state the match rules look at.
#[derive(Clone, Copy, Debug)]
pub struct MdView {
    /// Options.
    pub options: MdOptions,
    /// Total length.
    pub length: u32,
    /// Local offset (advances when the MD does not manage remote offsets).
    pub offset: u32,
    /// Operations left.
    pub threshold: Threshold,
    /// Per-operation maximum with [`MdOptions::MAX_SIZE`].
    pub max_size: u32,
}

/// Outcome of offering a message to an MD (`LNET_MATCHMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MdMatch {
    /// The MD does not take this message: try the next ME.
    None,
    /// The MD takes it, so matching stops, but it is too large: drop it.
    Drop,
    /// Accepted: `mlength` bytes at `offset`.
    Ok {
        /// Where in the MD.
        offset: u32,
        /// How many bytes.
        mlength: u32,
    },
}

impl MdView {
    /// True when the MD can take no more operations
    /// (`lnet_md_exhausted`).
    pub fn exhausted(&self) -> bool {
        self.threshold.is_zero()
            || (self.options.contains(MdOptions::MAX_SIZE)
                && u64::from(self.offset) + u64::from(self.max_size) > u64::from(self.length))
    }

    /// Offer a message of `rlength` bytes at remote offset `roffset`.
    pub fn try_match(&self, op: Op, rlength: u32, roffset: u32) -> MdMatch {
        let needed = match op {
            Op::Put => MdOptions::OP_PUT,
            Op::Get => MdOptions::OP_GET,
        };
        if !self.options.contains(needed) || self.exhausted() {
            return MdMatch::None;
        }
        let offset = if self.options.contains(MdOptions::MANAGE_REMOTE) {
            roffset
        } else {
            self.offset
        };
        let room = if self.options.contains(MdOptions::MAX_SIZE) {
            self.max_size.min(self.length.saturating_sub(offset))
        } else {
            self.length.saturating_sub(offset)
        };
        if rlength <= room {
            MdMatch::Ok {
                offset,
                mlength: rlength,
            }
        } else if self.options.contains(MdOptions::TRUNCATE) {
            MdMatch::Ok {
                offset,
                mlength: room,
            }
        } else {
            MdMatch::Drop
        }
    }

    /// Commit an accepted match: consume one operation and advance the
    /// local offset.
    pub fn commit(&mut self, offset: u32, mlength: u32) {
        self.threshold.dec();
        if !self.options.contains(MdOptions::MANAGE_REMOTE) {
            self.offset = offset + mlength;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_copies_move_every_byte_at_every_length() {
        let src: Vec<u8> = (1..=40).collect();
        for n in 0..=40 {
            let mut dst = vec![0u8; n];
            copy_small(&mut dst, &src[..n]);
            assert_eq!(dst, src[..n], "length {n}");
            // From an unaligned start too.
            let mut dst = vec![0u8; n.min(39)];
            let l = dst.len();
            copy_small(&mut dst, &src[1..1 + l]);
            assert_eq!(dst, src[1..1 + l], "length {l} from offset 1");
        }
    }

    #[test]
    #[should_panic]
    fn a_small_copy_between_different_lengths_panics() {
        copy_small(&mut [0u8; 4], &[1u8; 5]);
    }

    fn md(options: MdOptions, length: u32) -> MdView {
        MdView {
            options,
            length,
            offset: 0,
            threshold: Threshold::Infinite,
            max_size: 0,
        }
    }

    #[test]
    fn truncate_vs_drop() {
        let m = md(MdOptions::OP_PUT, 100);
        assert_eq!(m.try_match(Op::Put, 101, 0), MdMatch::Drop);
        assert_eq!(
            m.try_match(Op::Put, 100, 0),
            MdMatch::Ok {
                offset: 0,
                mlength: 100
            }
        );
        let t = md(MdOptions::OP_PUT | MdOptions::TRUNCATE, 100);
        assert_eq!(
            t.try_match(Op::Put, 101, 0),
            MdMatch::Ok {
                offset: 0,
                mlength: 100
            }
        );
        assert_eq!(m.try_match(Op::Get, 1, 0), MdMatch::None);
    }

    #[test]
    fn local_offset_advances_and_max_size_exhausts() {
        let mut m = md(MdOptions::OP_PUT | MdOptions::MAX_SIZE, 100);
        m.max_size = 40;
        let MdMatch::Ok { offset, mlength } = m.try_match(Op::Put, 30, 77) else {
            panic!()
        };
        assert_eq!((offset, mlength), (0, 30));
        m.commit(offset, mlength);
        assert_eq!(m.offset, 30);
        assert_eq!(m.try_match(Op::Put, 41, 0), MdMatch::Drop);
        m.commit(30, 40);
        // 70 + 40 > 100: exhausted.
        assert!(m.exhausted());
        assert_eq!(m.try_match(Op::Put, 1, 0), MdMatch::None);
    }

    #[test]
    fn manage_remote_offsets() {
        let m = md(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE, 100);
        assert_eq!(
            m.try_match(Op::Put, 10, 90),
            MdMatch::Ok {
                offset: 90,
                mlength: 10
            }
        );
        assert_eq!(m.try_match(Op::Put, 11, 90), MdMatch::Drop);
        assert_eq!(
            m.try_match(Op::Put, 0, 200),
            MdMatch::Ok {
                offset: 200,
                mlength: 0
            }
        );
        let t = md(
            MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE | MdOptions::TRUNCATE,
            100,
        );
        assert_eq!(
            t.try_match(Op::Put, 10, 200),
            MdMatch::Ok {
                offset: 200,
                mlength: 0
            }
        );
    }

    #[test]
    fn threshold() {
        let mut m = md(MdOptions::OP_GET, 10);
        m.threshold = Threshold::Finite(1);
        assert!(matches!(m.try_match(Op::Get, 5, 0), MdMatch::Ok { .. }));
        m.commit(0, 5);
        assert!(m.exhausted());
        assert_eq!(m.try_match(Op::Get, 5, 0), MdMatch::None);
    }

    #[test]
    fn buffers() {
        let mut b = MdBuffer::from_frags(vec![vec![0u8; 3].into(), vec![0u8; 5].into()]).unwrap();
        assert_eq!(b.copy_in(2, b"abcd"), 4);
        let mut out = [0u8; 8];
        b.copy_out(0, &mut out);
        assert_eq!(&out, b"\0\0abcd\0\0");
        assert_eq!(b.slices(1, 100).len(), 2);
        assert!(MdBuffer::from_frags((0..257).map(|_| vec![0u8].into()).collect()).is_err());
        let s = MdBuffer::from(Bytes::from_static(b"hello world"));
        assert_eq!(&s.bytes_view(6, 5).unwrap()[..], b"world");
        assert!(!s.is_writable());
        assert_eq!(b.into_vec(), b"\0\0abcd\0\0");
    }

    #[test]
    fn copies_match_a_flat_model_at_every_offset_and_length() {
        // Fragments of 3, 1, 5 and 7 bytes (16 in all); every range,
        // including ones running past the end (clamped).
        let sizes = [3usize, 1, 5, 7];
        let total: usize = sizes.iter().sum();
        for off in 0..=total + 1 {
            for len in 0..=total + 2 - off.min(total) {
                let mut b =
                    MdBuffer::from_frags(sizes.iter().map(|&n| vec![0u8; n].into()).collect())
                        .unwrap();
                let src: Vec<u8> = (1..=len as u8).collect();
                let mut model = vec![0u8; total];
                let n = len.min(total.saturating_sub(off));
                model[off.min(total)..off.min(total) + n].copy_from_slice(&src[..n]);
                assert_eq!(b.copy_in(off, &src), n, "copy_in {off}+{len}");
                let mut out = vec![0xeeu8; len];
                assert_eq!(b.copy_out(off, &mut out), n, "copy_out {off}+{len}");
                assert_eq!(out[..n], model[off.min(total)..off.min(total) + n]);
                assert!(out[n..].iter().all(|&x| x == 0xee), "nothing past the end");
                let mut all = vec![0u8; total];
                b.copy_out(0, &mut all);
                assert_eq!(all, model, "{off}+{len}");
            }
        }
    }
}
