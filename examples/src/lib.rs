//! Helpers shared by the example nodes (`tcp_node`, `shm_node`), their
//! tests and their benches.
//!
//! ```
//! let p = lnet_examples::pattern(10_000, 7);
//! let md = lnet_examples::frags(&p, 4096);
//! assert_eq!(md.segments().len(), 3);
//! assert_eq!(md.into_vec(), p);
//! ```

use std::time::Duration;

use lnet::{Event, EventQueue, MdBuffer, Segment};

/// `n` bytes of a pattern that differs with `seed` and from page to page
/// (so a misplaced page shows).
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// `data` as an MD fragment vector of `piece`-byte fragments (at most
/// 256 of them); empty data gives an empty MD.
pub fn frags(data: &[u8], piece: usize) -> MdBuffer {
    if data.is_empty() {
        return MdBuffer::from(Vec::new());
    }
    let segs: Vec<Segment> = data.chunks(piece).map(|c| c.to_vec().into()).collect();
    MdBuffer::from_frags(segs).expect("at most LNET_MAX_IOV fragments")
}

/// The events of one MD up to and including its final one, or `None` if
/// an event takes longer than `timeout`.
pub fn final_events(q: &EventQueue, timeout: Duration) -> Option<Vec<Event>> {
    let mut v = Vec::new();
    loop {
        let e = q.recv_timeout(timeout)?;
        let done = e.unlinked;
        v.push(e);
        if done {
            return Some(v);
        }
    }
}

/// [`final_events`] for tests: panics when none comes within 30 s.
pub fn finals(q: &EventQueue) -> Vec<Event> {
    final_events(q, Duration::from_secs(30)).expect("final event within 30 s")
}

/// The median of `v` (not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
