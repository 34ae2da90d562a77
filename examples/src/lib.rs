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

/// Portal of the example nodes' echo MD (PUTs land, GETs read back).
pub const ECHO_PORTAL: u32 = 10;
/// Portal of the example nodes' pattern MD (GETs only).
pub const PATTERN_PORTAL: u32 = 11;

/// Attach the example nodes' two serving MDs: `echo` on [`ECHO_PORTAL`]
/// (PUT and GET at the initiator's offset, any match bits) and `pattern`
/// on [`PATTERN_PORTAL`] (GET only). Both stay attached.
pub fn attach_echo_and_pattern(
    node: &lnet::Lnet,
    echo: MdBuffer,
    pattern: MdBuffer,
) -> lnet::Result<()> {
    use lnet::{InsPos, Md, MdOptions, ProcessId, Threshold, Unlink};
    for (portal, buf, opts) in [
        (
            ECHO_PORTAL,
            echo,
            MdOptions::OP_PUT | MdOptions::OP_GET | MdOptions::MANAGE_REMOTE,
        ),
        (
            PATTERN_PORTAL,
            pattern,
            MdOptions::OP_GET | MdOptions::MANAGE_REMOTE,
        ),
    ] {
        node.attach(
            portal,
            ProcessId::ANY,
            0,
            u64::MAX,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(buf).options(opts).threshold(Threshold::Infinite),
        )?;
    }
    Ok(())
}

/// `len` zeroed bytes starting on a page boundary, as the page-cache and
/// bulk buffers a Lustre server hands LNet are (a plain `vec!` of a few
/// MiB starts 16 bytes past a page, which costs copies into it their
/// alignment with page-aligned sources).
///
/// ```
/// let b = lnet_examples::page_aligned_zeroed(10_000);
/// assert_eq!((b.len(), b.as_ptr() as usize % 4096), (10_000, 0));
/// ```
pub fn page_aligned_zeroed(len: usize) -> bytes::BytesMut {
    const PAGE: usize = 4096;
    let mut b = bytes::BytesMut::zeroed(len + PAGE);
    let skip = b.as_ptr().align_offset(PAGE);
    let mut aligned = b.split_off(skip);
    aligned.truncate(len);
    aligned
}

/// Run this process's calling thread, and every thread it starts
/// afterwards, on CPU `cpu` only (benchmarks place the two ends of a
/// ping-pong on different CPUs, as two hosts are).
///
/// ```
/// // CPU 0 exists on every machine.
/// lnet_examples::pin_to_cpu(0).unwrap();
/// ```
pub fn pin_to_cpu(cpu: usize) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("pin to CPU {cpu}: {e}"))
}

/// The value after option `key` in `args` (`--port 5` → `Some("5")`).
pub fn opt(args: &[String], key: &str) -> Option<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// PUT `src` to `to`'s [`ECHO_PORTAL`] at `off` with an ACK; checks that
/// both the SEND and the ACK event came (in either order: the ACK may
/// overtake the send completion).
pub fn put_echo(l: &lnet::Lnet, to: lnet::ProcessId, src: MdBuffer, off: u32) -> lnet::Result<()> {
    use lnet::{AckReq, EventKind, Md, Threshold};
    let q = EventQueue::new();
    let md = l.md_bind(
        Md::new(src)
            .threshold(Threshold::Finite(2))
            .handler(q.handler()),
    )?;
    l.put(md, AckReq::Ack, to, ECHO_PORTAL, 1, off, 0)?;
    let ev = finals(&q);
    for e in &ev {
        e.status.clone()?;
    }
    let mut kinds: Vec<_> = ev.iter().map(|e| e.kind as u8).collect();
    kinds.sort();
    assert_eq!(kinds, [EventKind::Ack as u8, EventKind::Send as u8]);
    Ok(())
}

/// GET from `to`'s `portal` at `off` into `sink`; checks that the REPLY
/// filled the whole sink and returns its bytes.
pub fn get_from(
    l: &lnet::Lnet,
    to: lnet::ProcessId,
    portal: u32,
    sink: MdBuffer,
    off: u32,
) -> lnet::Result<Vec<u8>> {
    use lnet::{EventKind, Md, Threshold};
    let len = sink.len();
    let q = EventQueue::new();
    let md = l.md_bind(
        Md::new(sink)
            .threshold(Threshold::Finite(2))
            .handler(q.handler()),
    )?;
    l.get(md, to, portal, 2, off)?;
    let mut ev = finals(&q);
    for e in &ev {
        e.status.clone()?;
    }
    let reply = ev
        .iter()
        .find(|e| e.kind == EventKind::Reply)
        .expect("a REPLY event");
    assert_eq!(reply.mlength as usize, len, "REPLY length");
    let buf = ev
        .iter_mut()
        .find_map(|e| e.buffer.take())
        .expect("the MD's buffer with its final event");
    Ok(buf.into_vec())
}

/// A node running as a child process (the example binaries): spawned
/// with piped stdin/stdout, its first line must be `READY ...`; the
/// remaining lines arrive on [`ChildNode::lines`]. Closing stdin asks it
/// to stop; dropping it does that and kills it if it has not exited
/// within 5 s.
pub struct ChildNode {
    /// The process.
    pub child: std::process::Child,
    /// The words of its READY line (after `READY`).
    pub ready: Vec<String>,
    /// Its later stdout lines.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ChildNode {
    /// Spawn `cmd` and wait up to `timeout` for its READY line.
    pub fn spawn(cmd: &mut std::process::Command, timeout: Duration) -> ChildNode {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the node");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(timeout).expect("the node's READY line");
        let mut f = line.split_whitespace().map(str::to_string);
        assert_eq!(f.next().as_deref(), Some("READY"), "{line}");
        ChildNode {
            child,
            ready: f.collect(),
            lines: rx,
        }
    }
    /// Send `cmd` as a line on its stdin and return its one-line answer
    /// (waiting up to `timeout`).
    pub fn ask(&mut self, cmd: &str, timeout: Duration) -> String {
        use std::io::Write;
        let i = self.child.stdin.as_mut().expect("stdin open");
        writeln!(i, "{cmd}").expect("write to the node");
        i.flush().expect("write to the node");
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no answer to {cmd}: {e}"))
    }
    /// Its process id (for [`sigstop`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGKILL it and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Close its stdin and return its next line (the example nodes print
    /// their counters on the way out), then reap it.
    pub fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_default();
        let _ = self.child.wait();
        l
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// SIGSTOP child process `pid` (a [`ChildNode`]'s) and wait until all its
/// threads have stopped (the group stop the kernel reports to the parent:
/// a signal alone lands asynchronously, and a thread may still answer a
/// few messages meanwhile). It keeps its connections but answers nothing
/// until killed.
pub fn sigstop(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP the node");
    match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        other => panic!("node {pid} did not stop: {other:?}"),
    }
}

/// The peer-killed-mid-transfer check shared by the transports' tests:
/// two ACKed PUTs of `payload` to `to`'s echo portal complete (the
/// connection works); then `pause` stops the peer (SIGSTOP: it can no
/// longer answer), the other `n - 2` are issued and `kill` runs (SIGKILL)
/// while they are in flight. Asserts that every operation ends exactly
/// once within `limit`, that all `n - 2` failed and that nothing comes
/// after the final events. Stopping the peer first makes "in flight"
/// certain: killed only once two had succeeded, a test thread starved for
/// the ~0.2 s the rest take could find them all done. `pending` describes
/// the LND's state for the timeout message.
#[allow(clippy::too_many_arguments)]
pub fn puts_across_a_peer_kill(
    l: &lnet::Lnet,
    to: lnet::ProcessId,
    payload: &bytes::Bytes,
    n: usize,
    limit: Duration,
    pause: impl FnOnce(),
    kill: impl FnOnce(),
    pending: impl Fn() -> String,
) {
    use lnet::{AckReq, Md, Threshold};
    assert!(n > 2, "two complete before the kill, the rest across it");
    let t = Duration::from_secs(60);
    let q = EventQueue::new();
    let issue = |i: usize| {
        let md = l
            .md_bind(
                Md::new(payload.clone())
                    .threshold(Threshold::Finite(2))
                    .user_ptr(i as u64)
                    .handler(q.handler()),
            )
            .expect("bind");
        l.put(md, AckReq::Ack, to, ECHO_PORTAL, 0, 0, 0)
            .expect("put");
    };
    let mut ended = vec![0u32; n];
    issue(0);
    issue(1);
    let mut ok = 0;
    while ok < 2 {
        let e = q.recv_timeout(t).expect("event");
        if e.unlinked {
            ended[e.user_ptr as usize] += 1;
            assert!(e.status.is_ok(), "before the kill: {:?}", e.status);
            ok += 1;
        }
    }
    pause();
    for i in 2..n {
        issue(i);
    }
    kill();
    let deadline = std::time::Instant::now() + limit;
    let mut failed = 0;
    while ended.iter().sum::<u32>() < n as u32 {
        assert!(
            std::time::Instant::now() < deadline,
            "operations still pending: {}",
            pending()
        );
        let e = q.recv_timeout(t).expect("every operation ends");
        if e.unlinked {
            ended[e.user_ptr as usize] += 1;
            failed += usize::from(e.status.is_err());
        }
    }
    assert!(ended.iter().all(|&k| k == 1), "each ends exactly once");
    assert_eq!(failed, n - 2, "every operation in flight at the kill fails");
    assert!(
        q.recv_timeout(Duration::from_millis(300)).is_none(),
        "nothing after the final events"
    );
}
