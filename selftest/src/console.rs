//! The selftest console: what `lst` commands do. It keeps the session,
//! groups and batches, and drives the nodes (ours or kernel ones) over
//! LNet with the framework RPCs. `lnet-selftest serve --console PATH`
//! runs it behind a Unix socket; the `lst` binary sends it one command
//! line at a time.
//!
//! ```
//! use std::sync::Arc;
//! use lnet_selftest::console::Console;
//! use lnet_selftest::framework::Framework;
//! let node = Arc::new(lnd_loopback::builder().build().unwrap());
//! let srv = lnet_selftest::server::Server::start(&node, Default::default()).unwrap();
//! let _fw = Framework::start(&node, srv, None).unwrap();
//! let mut c = Console::new(node.clone());
//! let mut out = Vec::new();
//! for cmd in ["new_session demo", "add_group g 0@lo", "list_group g"] {
//!     let args: Vec<String> = cmd.split(' ').map(String::from).collect();
//!     c.exec(&args, &mut out).unwrap();
//! }
//! assert!(String::from_utf8(out).unwrap().contains("0@lo: Active"));
//! node.shutdown();
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnet::{Lnet, Nid, NidRange, ProcessId};

use crate::bulk::Check;
use crate::client::TestKind;
use crate::framework::{EBUSY, LATENCY_SERVICE, call};
use crate::run::parse_size;
use crate::wire::{
    self, BATCH_OPC_QUERY, BATCH_OPC_RUN, BATCH_OPC_STOP, BatchReq, Body, LST_BRW_READ,
    LST_BRW_WRITE, LST_FEAT_BULK_LEN, Service, SessionId, StatReply, TestParams, TestReq,
};

const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's state as the console sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// In our session.
    Active,
    /// In another session.
    Busy,
    /// Not answering.
    Down,
    /// Not asked yet.
    Unknown,
}

impl NodeState {
    fn name(self) -> &'static str {
        match self {
            NodeState::Active => "Active",
            NodeState::Busy => "Busy",
            NodeState::Down => "Down",
            NodeState::Unknown => "Unknown",
        }
    }
}

struct Test {
    from: String,
    to: String,
    kind: TestKind,
    loop_count: i32,
    concur: u32,
    dist: (usize, usize),
}

struct Batch {
    bid: u64,
    tests: Vec<Test>,
}

struct Session {
    sid: SessionId,
    name: String,
    timeout: u32,
}

/// Console state.
pub struct Console {
    node: Arc<Lnet>,
    session: Option<Session>,
    groups: BTreeMap<String, Vec<(ProcessId, NodeState)>>,
    batches: BTreeMap<String, Batch>,
    next_bid: u64,
}

type Out<'a> = &'a mut dyn Write;

macro_rules! say {
    ($o:expr, $($t:tt)*) => {{ let _ = writeln!($o, $($t)*); }};
}

impl Console {
    /// A console on `node`.
    pub fn new(node: Arc<Lnet>) -> Console {
        Console {
            node,
            session: None,
            groups: BTreeMap::new(),
            batches: BTreeMap::new(),
            next_bid: 1,
        }
    }

    fn sid(&self) -> Result<SessionId, String> {
        self.session
            .as_ref()
            .map(|s| s.sid)
            .ok_or_else(|| "no session: run new_session first".to_string())
    }

    fn feats(&self) -> u32 {
        LST_FEAT_BULK_LEN
    }

    /// Runs one lst command (`args[0]` is the command), writing what lst
    /// prints to `out`. `Err` carries the message of a failed command.
    pub fn exec(&mut self, args: &[String], out: Out<'_>) -> Result<(), String> {
        let Some(cmd) = args.first() else {
            return Err("no command".into());
        };
        let rest = &args[1..];
        match cmd.as_str() {
            "new_session" => self.new_session(rest, out),
            "end_session" => self.end_session(out),
            "show_session" => {
                let s = self.session.as_ref().ok_or("no session")?;
                say!(
                    out,
                    "{} ID: {}@{} timeout: {} s",
                    s.name,
                    s.sid.stamp,
                    Nid::from_nid4(s.sid.nid),
                    s.timeout
                );
                Ok(())
            }
            "add_group" => self.add_group(rest, out),
            "update_group" => self.update_group(rest, out),
            "list_group" => self.list_group(rest, out),
            "del_group" => {
                let g = rest.first().ok_or("del_group NAME")?;
                if self
                    .batches
                    .values()
                    .flat_map(|b| &b.tests)
                    .any(|t| &t.from == g || &t.to == g)
                {
                    return Err(format!("group {g} is used by a test"));
                }
                self.groups.remove(g).ok_or(format!("no group {g}"))?;
                Ok(())
            }
            "add_batch" => {
                self.sid()?;
                let b = rest.first().ok_or("add_batch NAME")?;
                if self.batches.contains_key(b) {
                    return Err(format!("batch {b} exists"));
                }
                self.batches.insert(
                    b.clone(),
                    Batch {
                        bid: self.next_bid,
                        tests: Vec::new(),
                    },
                );
                self.next_bid += 1;
                Ok(())
            }
            "add_test" => self.add_test(rest, out),
            "run" | "stop" | "query" => self.batch_cmd(cmd, rest, out),
            "list_batch" => self.list_batch(rest, out),
            "stat" => self.stat(rest, out),
            "show_error" => self.show_error(rest, out),
            "ping" => self.ping(rest, out),
            c => Err(format!("unknown command {c}")),
        }
    }

    fn new_session(&mut self, a: &[String], out: Out<'_>) -> Result<(), String> {
        let mut timeout = 300u32;
        let mut force = false;
        let mut name = None;
        let mut i = 0;
        while i < a.len() {
            match a[i].as_str() {
                "--timeout" => {
                    i += 1;
                    timeout = a
                        .get(i)
                        .and_then(|t| t.parse().ok())
                        .ok_or("--timeout SECONDS")?;
                }
                "--force" => force = true,
                n => name = Some(n.to_string()),
            }
            i += 1;
        }
        if self.session.is_some() {
            return Err("a session is already open: end_session first".into());
        }
        let name = name.unwrap_or_else(|| "lst".into());
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let nid = self.node.primary_nid().to_nid4().unwrap_or(u64::MAX);
        self.session = Some(Session {
            sid: SessionId { nid, stamp },
            name: name.clone(),
            timeout,
        });
        let _ = force;
        say!(
            out,
            "SESSION: {name} FEATURES: {} TIMEOUT: {timeout} FORCE: {}",
            self.feats(),
            if force { "Yes" } else { "No" }
        );
        Ok(())
    }

    fn end_session(&mut self, out: Out<'_>) -> Result<(), String> {
        let sid = self.sid()?;
        let nodes: Vec<ProcessId> = self.all_nodes();
        for id in nodes {
            let _ = call(
                &self.node,
                id,
                Service::RemoveSession as u64,
                self.feats(),
                |rpyid, _| Body::RmsnReq { rpyid, sid },
                None,
                RPC_TIMEOUT,
            );
        }
        self.session = None;
        self.groups.clear();
        self.batches.clear();
        say!(out, "session ended");
        Ok(())
    }

    fn all_nodes(&self) -> Vec<ProcessId> {
        let mut v: Vec<ProcessId> = self.groups.values().flatten().map(|x| x.0).collect();
        v.sort_by_key(|p| (p.nid.to_string(), p.pid));
        v.dedup();
        v
    }

    fn make_session(&self, id: ProcessId, force: bool) -> NodeState {
        let Some(s) = &self.session else {
            return NodeState::Unknown;
        };
        let sid = s.sid;
        let name = wire::name(&s.name);
        match call(
            &self.node,
            id,
            Service::MakeSession as u64,
            self.feats(),
            |rpyid, _| Body::MksnReq {
                rpyid,
                sid,
                force: u32::from(force),
                name,
            },
            None,
            RPC_TIMEOUT,
        ) {
            Ok(m) => match m.body {
                Body::MksnReply { status: 0, .. } => NodeState::Active,
                Body::MksnReply { status: EBUSY, .. } => NodeState::Busy,
                _ => NodeState::Down,
            },
            Err(_) => NodeState::Down,
        }
    }

    fn parse_nodes(a: &[String]) -> Result<Vec<ProcessId>, String> {
        let mut v = Vec::new();
        for s in a {
            let (pid, nids) = match s.split_once('-') {
                Some((p, n)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
                    (p.parse::<u32>().map_err(|e| e.to_string())?, n)
                }
                _ => (lnet::LNET_PID_LUSTRE, s.as_str()),
            };
            let r: NidRange = nids.parse().map_err(|e| format!("{nids}: {e}"))?;
            for (i, n) in r.iter().enumerate() {
                if i >= 65536 {
                    return Err(format!("{nids}: more than 65536 NIDs"));
                }
                v.push(ProcessId::new(n, pid));
            }
        }
        Ok(v)
    }

    fn add_group(&mut self, a: &[String], out: Out<'_>) -> Result<(), String> {
        self.sid()?;
        let name = a.first().ok_or("add_group NAME NIDS...")?.clone();
        let ids = Self::parse_nodes(&a[1..])?;
        if ids.is_empty() {
            return Err("add_group NAME NIDS...".into());
        }
        let mut ents = self.groups.remove(&name).unwrap_or_default();
        let mut bad = 0;
        for id in ids {
            if ents.iter().any(|e| e.0 == id) {
                continue;
            }
            let st = self.make_session(id, false);
            if st != NodeState::Active {
                bad += 1;
                say!(out, "{id} is {}", st.name().to_lowercase());
            }
            ents.push((id, st));
        }
        self.groups.insert(name.clone(), ents);
        if bad > 0 {
            say!(
                out,
                "There are {bad} nodes in group {name} that are not active; use update_group --refresh"
            );
        }
        Ok(())
    }

    fn update_group(&mut self, a: &[String], out: Out<'_>) -> Result<(), String> {
        self.sid()?;
        let name = a
            .first()
            .ok_or("update_group NAME --refresh|--clean STATE|--remove NIDS")?
            .clone();
        let mut ents = self
            .groups
            .remove(&name)
            .ok_or(format!("no group {name}"))?;
        match a.get(1).map(String::as_str) {
            Some("--refresh") => {
                for e in &mut ents {
                    if e.1 != NodeState::Active {
                        e.1 = self.make_session(e.0, false);
                    }
                }
            }
            Some("--clean") => {
                let st = a.get(2).map(String::as_str).unwrap_or("all");
                ents.retain(|e| match st {
                    "busy" => e.1 != NodeState::Busy,
                    "down" => e.1 != NodeState::Down,
                    "unknown" => e.1 != NodeState::Unknown,
                    "invalid" => e.1 == NodeState::Active,
                    "active" => e.1 != NodeState::Active,
                    _ => false,
                });
            }
            Some("--remove") => {
                let rm = Self::parse_nodes(&a[2..])?;
                ents.retain(|e| !rm.contains(&e.0));
            }
            _ => {
                self.groups.insert(name, ents);
                return Err("update_group NAME --refresh|--clean STATE|--remove NIDS".into());
            }
        }
        let n = ents.len();
        self.groups.insert(name.clone(), ents);
        say!(out, "Group {name}: {n} nodes");
        Ok(())
    }

    fn list_group(&self, a: &[String], out: Out<'_>) -> Result<(), String> {
        let name = a.iter().find(|x| !x.starts_with("--"));
        let filt = a
            .iter()
            .find(|x| x.starts_with("--"))
            .map(String::as_str)
            .unwrap_or("--all");
        let Some(name) = name else {
            for (i, g) in self.groups.keys().enumerate() {
                say!(out, "{}) {g}", i + 1);
            }
            say!(out, "Total {} groups", self.groups.len());
            return Ok(());
        };
        let ents = self.groups.get(name).ok_or(format!("no group {name}"))?;
        let mut n = 0;
        for (id, st) in ents {
            let show = match filt {
                "--active" => *st == NodeState::Active,
                "--busy" => *st == NodeState::Busy,
                "--down" => *st == NodeState::Down,
                "--unknown" => *st == NodeState::Unknown,
                _ => true,
            };
            if show {
                say!(out, "\t{id}: {}", st.name());
                n += 1;
            }
        }
        let c = |s| ents.iter().filter(|e| e.1 == s).count();
        say!(out, "Total {n} nodes");
        say!(
            out,
            "{name}: Active {} Busy {} Down {} Unknown {} Total {}",
            c(NodeState::Active),
            c(NodeState::Busy),
            c(NodeState::Down),
            c(NodeState::Unknown),
            ents.len()
        );
        Ok(())
    }

    fn add_test(&mut self, a: &[String], out: Out<'_>) -> Result<(), String> {
        let sid = self.sid()?;
        let (mut batch, mut from, mut to) = (None, None, None);
        let (mut loop_count, mut concur, mut dist) = (-1i32, 1u32, (1usize, 1usize));
        let mut i = 0;
        let val = |i: usize| {
            a.get(i + 1)
                .cloned()
                .ok_or(format!("{} needs a value", a[i]))
        };
        while i < a.len() && a[i].starts_with("--") {
            match a[i].as_str() {
                "--batch" => batch = Some(val(i)?),
                "--from" => from = Some(val(i)?),
                "--to" => to = Some(val(i)?),
                "--loop" => loop_count = val(i)?.parse().map_err(|_| "bad --loop")?,
                "--concurrency" => concur = val(i)?.parse().map_err(|_| "bad --concurrency")?,
                "--distribute" => {
                    let v = val(i)?;
                    let (x, y) = v.split_once(':').ok_or("--distribute x:y")?;
                    dist = (
                        x.parse().map_err(|_| "bad --distribute")?,
                        y.parse().map_err(|_| "bad --distribute")?,
                    );
                    if dist.0 == 0 || dist.1 == 0 {
                        return Err("--distribute x:y needs x, y > 0".into());
                    }
                }
                o => return Err(format!("unknown option {o}")),
            }
            i += 2;
        }
        if concur == 0 || concur > wire::LST_MAX_CONCUR {
            return Err("--concurrency must be 1 ..= 1024".into());
        }
        let batch = batch.unwrap_or_else(|| "batch".into());
        let from = from.ok_or("--from GROUP is required")?;
        let to = to.ok_or("--to GROUP is required")?;
        let kind = match a.get(i).map(String::as_str) {
            Some("ping") => TestKind::Ping,
            Some("brw") => {
                let mut write = None;
                let (mut size, mut off, mut check) = (4096u32, 0u32, Check::None);
                for p in &a[i + 1..] {
                    match p.split_once('=') {
                        None if p == "read" => write = Some(false),
                        None if p == "write" => write = Some(true),
                        Some(("size", v)) => size = parse_size(v).ok_or(format!("bad size {v}"))?,
                        Some(("off", v)) => off = v.parse().map_err(|_| format!("bad off {v}"))?,
                        Some(("check", v)) => {
                            check = Check::parse(v).ok_or(format!("bad check {v}"))?
                        }
                        _ => return Err(format!("unknown brw parameter {p}")),
                    }
                }
                if size == 0 || size > 1 << 20 {
                    return Err("size must be 1 ..= 1M".into());
                }
                if off % 8 != 0 || off >= 4096 {
                    return Err("off must be a multiple of 8 under 4096".into());
                }
                TestKind::Brw {
                    write: write.ok_or("brw read|write")?,
                    size,
                    offset: off,
                    check,
                }
            }
            _ => return Err("add_test ... brw read|write [size=] [off=] [check=] | ping".into()),
        };
        let bid = self
            .batches
            .get(&batch)
            .ok_or(format!("no batch {batch}"))?
            .bid;
        let fg = self
            .groups
            .get(&from)
            .ok_or(format!("no group {from}"))?
            .clone();
        let tg = self
            .groups
            .get(&to)
            .ok_or(format!("no group {to}"))?
            .clone();
        let params = match kind {
            TestKind::Ping => TestParams::Ping { size: 0, flags: 0 },
            TestKind::Brw {
                write,
                size,
                offset,
                check,
            } => TestParams::BulkV1 {
                opc: if write { LST_BRW_WRITE } else { LST_BRW_READ } as u16,
                flags: check as u16,
                len: size,
                offset,
            },
        };
        let service = if matches!(kind, TestKind::Ping) {
            Service::Ping
        } else {
            Service::Brw
        } as u32;
        let tnodes: Vec<ProcessId> = tg.iter().map(|e| e.0).collect();
        let mut failed = 0;
        let mut send = |id: ProcessId, is_client: bool, dests: &[ProcessId]| {
            let ids: Vec<(u64, u32)> = dests
                .iter()
                .map(|d| (d.nid.to_nid4().unwrap_or(u64::MAX), d.pid))
                .collect();
            let bulk = is_client.then(|| wire::encode_ids(&ids));
            let r = call(
                &self.node,
                id,
                Service::Test as u64,
                LST_FEAT_BULK_LEN,
                |rpyid, bulkid| {
                    Body::TestReq(TestReq {
                        rpyid,
                        bulkid,
                        sid,
                        bid,
                        service,
                        loop_count: loop_count as u32,
                        concur,
                        is_client: u8::from(is_client),
                        stop_onerr: 0,
                        ndest: dests.len() as u32,
                        params,
                    })
                },
                bulk,
                RPC_TIMEOUT,
            );
            match r.map(|m| m.body) {
                Ok(Body::TestReply { status: 0, .. }) => {}
                Ok(b) => {
                    failed += 1;
                    say!(out, "{id}: add_test refused: {b:?}");
                }
                Err(e) => {
                    failed += 1;
                    say!(out, "{id}: add_test failed: {e}");
                }
            }
        };
        for id in &tnodes {
            send(*id, false, &[]);
        }
        for (idx, (id, _)) in fg.iter().enumerate() {
            // lst's distribution: every `dist.0` clients share the next
            // `dist.1` servers, round robin.
            let n = tnodes.len();
            let start = (idx / dist.0) * dist.1;
            let dests: Vec<ProcessId> = (0..dist.1.min(n))
                .map(|k| tnodes[(start + k) % n])
                .collect();
            send(*id, true, &dests);
        }
        if failed > 0 {
            return Err(format!("add_test failed on {failed} nodes"));
        }
        if let Some(b) = self.batches.get_mut(&batch) {
            b.tests.push(Test {
                from,
                to,
                kind,
                loop_count,
                concur,
                dist,
            });
            say!(out, "Test was added successfully");
        }
        Ok(())
    }

    fn batch_nodes(&self, b: &Batch) -> Vec<ProcessId> {
        let mut v: Vec<ProcessId> = b
            .tests
            .iter()
            .flat_map(|t| [&t.from, &t.to])
            .filter_map(|g| self.groups.get(g))
            .flatten()
            .map(|e| e.0)
            .collect();
        v.sort_by_key(|p| (p.nid.to_string(), p.pid));
        v.dedup();
        v
    }

    fn batch_rpc(&self, id: ProcessId, bid: u64, opc: u32) -> Result<(u32, u32), String> {
        let sid = self.sid()?;
        let m = call(
            &self.node,
            id,
            Service::Batch as u64,
            self.feats(),
            |rpyid, _| {
                Body::BatchReq(BatchReq {
                    rpyid,
                    sid,
                    bid,
                    opc,
                    testidx: 0,
                    arg: 0,
                })
            },
            None,
            RPC_TIMEOUT,
        )
        .map_err(|e| e.to_string())?;
        match m.body {
            Body::BatchReply { status, active, .. } => Ok((status, active)),
            b => Err(format!("unexpected reply {b:?}")),
        }
    }

    fn batch_cmd(&mut self, cmd: &str, a: &[String], out: Out<'_>) -> Result<(), String> {
        let name = a
            .iter()
            .find(|x| !x.starts_with("--"))
            .cloned()
            .unwrap_or_else(|| "batch".into());
        let b = self.batches.get(&name).ok_or(format!("no batch {name}"))?;
        let opc = match cmd {
            "run" => BATCH_OPC_RUN,
            "stop" => BATCH_OPC_STOP,
            _ => BATCH_OPC_QUERY,
        };
        let mut active = 0;
        let mut errs = 0;
        for id in self.batch_nodes(b) {
            match self.batch_rpc(id, b.bid, opc) {
                Ok((0, n)) => active += n,
                Ok((st, _)) => {
                    errs += 1;
                    say!(out, "{id}: {cmd} failed with status {st}");
                }
                Err(e) => {
                    errs += 1;
                    say!(out, "{id}: {cmd} failed: {e}");
                }
            }
        }
        match cmd {
            "run" => say!(out, "{name} is running now"),
            "stop" => say!(out, "{name} is stopped now"),
            _ => say!(
                out,
                "Batch {name} is {}",
                if active > 0 { "running" } else { "idle" }
            ),
        }
        if errs > 0 {
            return Err(format!("{cmd} failed on {errs} nodes"));
        }
        Ok(())
    }

    fn list_batch(&self, a: &[String], out: Out<'_>) -> Result<(), String> {
        let Some(name) = a.iter().find(|x| !x.starts_with("--")) else {
            for (i, b) in self.batches.keys().enumerate() {
                say!(out, "{}) {b}", i + 1);
            }
            say!(out, "Total {} batches", self.batches.len());
            return Ok(());
        };
        let b = self.batches.get(name).ok_or(format!("no batch {name}"))?;
        say!(out, "Batch: {name} Tests: {}", b.tests.len());
        for (i, t) in b.tests.iter().enumerate() {
            let what = match t.kind {
                TestKind::Ping => "ping".to_string(),
                TestKind::Brw {
                    write,
                    size,
                    offset,
                    check,
                } => format!(
                    "brw {} size={} off={offset} check={}",
                    if write { "write" } else { "read" },
                    crate::run::size_name(size),
                    crate::run::check_name(check)
                ),
            };
            say!(
                out,
                "\tTest {} ({what}) (loop: {}, concurrency: {}, distribute: {}:{}) from {} to {}",
                i + 1,
                t.loop_count,
                t.concur,
                t.dist.0,
                t.dist.1,
                t.from,
                t.to
            );
        }
        Ok(())
    }

    fn stat_rpc(&self, id: ProcessId, svc: u64) -> Result<StatReply, String> {
        let sid = self.sid()?;
        let t = if svc == LATENCY_SERVICE {
            Duration::from_secs(1)
        } else {
            RPC_TIMEOUT
        };
        let m = call(
            &self.node,
            id,
            svc,
            self.feats(),
            |rpyid, _| Body::StatReq {
                rpyid,
                sid,
                stat_type: 0,
            },
            None,
            t,
        )
        .map_err(|e| e.to_string())?;
        match m.body {
            Body::StatReply(s) if s.status == 0 => Ok(s),
            Body::StatReply(s) => Err(format!("status {}", s.status)),
            b => Err(format!("unexpected reply {b:?}")),
        }
    }

    /// Groups or NIDs named on a command line.
    fn targets(&self, a: &[String]) -> Result<Vec<(String, Vec<ProcessId>)>, String> {
        let mut v = Vec::new();
        let names: Vec<&String> = a.iter().filter(|x| !x.starts_with("--")).collect();
        if names.is_empty() {
            return Err("name a group or NIDs".into());
        }
        for n in names {
            match self.groups.get(n) {
                Some(g) => v.push((n.clone(), g.iter().map(|e| e.0).collect())),
                None => v.push((n.clone(), Self::parse_nodes(std::slice::from_ref(n))?)),
            }
        }
        Ok(v)
    }

    fn stat(&self, a: &[String], out: Out<'_>) -> Result<(), String> {
        self.sid()?;
        let mut delay = 5.0f64;
        let mut count = 1u32;
        let mut rest = Vec::new();
        let (mut bw, mut rate, mut rd, mut wr, mut mbs) = (false, false, false, false, false);
        let (mut avg, mut min, mut max) = (false, false, false);
        let mut i = 0;
        while i < a.len() {
            match a[i].as_str() {
                "--delay" => {
                    i += 1;
                    delay = a
                        .get(i)
                        .and_then(|v| v.parse().ok())
                        .filter(|d: &f64| *d > 0.0 && *d < 3600.0)
                        .ok_or("--delay SECONDS")?;
                }
                "--count" => {
                    i += 1;
                    count = a
                        .get(i)
                        .and_then(|v| v.parse().ok())
                        .filter(|c| *c > 0 && *c <= 100_000)
                        .ok_or("--count N")?;
                }
                "--bw" => bw = true,
                "--rate" => rate = true,
                "--read" => rd = true,
                "--write" => wr = true,
                "--avg" => avg = true,
                "--min" => min = true,
                "--max" => max = true,
                "--mbs" => mbs = true,
                "--timeout" => i += 1,
                x => rest.push(x.to_string()),
            }
            i += 1;
        }
        let bwrt = if bw && !rate {
            1
        } else if rate && !bw {
            2
        } else {
            0
        };
        let rdwr = if rd && !wr {
            1
        } else if wr && !rd {
            2
        } else {
            0
        };
        let ty = if avg || min || max {
            u8::from(avg) | (u8::from(min) << 1) | (u8::from(max) << 2)
        } else {
            7
        };
        let targets = self.targets(&rest)?;
        let sample = |c: &Console| -> Vec<Vec<Option<StatReply>>> {
            targets
                .iter()
                .map(|(_, ids)| ids.iter().map(|id| c.stat_rpc(*id, 5).ok()).collect())
                .collect()
        };
        let mut old = sample(self);
        for _ in 0..count {
            let t = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(delay));
            let new = sample(self);
            let wall = t.elapsed().as_secs_f64();
            for (gi, (name, ids)) in targets.iter().enumerate() {
                print_lnet_stat(out, name, &old[gi], &new[gi], wall, bwrt, rdwr, ty, mbs);
                // What lst lacks: latency percentiles of the tests the
                // nodes run as clients (lnet-rs nodes only).
                for id in ids {
                    if let Ok(l) = self.stat_rpc(*id, LATENCY_SERVICE) {
                        if l.lnet.recv_length > 0 {
                            say!(
                                out,
                                "[Latency of {id}] p50: {:.1} us p99: {:.1} us p99.9: {:.1} us ({} RPCs)",
                                l.rpc.bulk_get as f64 / 1e3,
                                l.rpc.bulk_put as f64 / 1e3,
                                l.lnet.send_length as f64 / 1e3,
                                l.lnet.recv_length
                            );
                        }
                    }
                }
            }
            old = new;
        }
        Ok(())
    }

    fn show_error(&self, a: &[String], out: Out<'_>) -> Result<(), String> {
        for (name, ids) in self.targets(a)? {
            let mut bad = 0;
            for id in ids {
                match self.stat_rpc(id, 5) {
                    Ok(s) => {
                        let e = s.fw.brw_errors
                            + s.fw.ping_errors
                            + s.rpc.errors
                            + s.rpc.rpcs_dropped
                            + s.rpc.rpcs_expired;
                        if e > 0 {
                            bad += 1;
                        }
                        say!(
                            out,
                            "{id}: [Session {} brw errors, {} ping errors] [RPC: {} errors, {} dropped, {} expired]",
                            s.fw.brw_errors,
                            s.fw.ping_errors,
                            s.rpc.errors,
                            s.rpc.rpcs_dropped,
                            s.rpc.rpcs_expired
                        );
                    }
                    Err(e) => {
                        bad += 1;
                        say!(out, "{id}: no stats: {e}");
                    }
                }
            }
            say!(out, "Total {bad} error nodes in {name}");
        }
        Ok(())
    }

    fn ping(&self, a: &[String], out: Out<'_>) -> Result<(), String> {
        let sid = self.session.as_ref().map_or(SessionId::NONE, |s| s.sid);
        let rest: Vec<String> = a
            .iter()
            .filter(|x| *x != "--nodes" && *x != "--group")
            .cloned()
            .collect();
        let mut down = 0;
        for (_, ids) in self.targets(&rest)? {
            for id in ids {
                match call(
                    &self.node,
                    id,
                    Service::Debug as u64,
                    self.feats(),
                    |rpyid, _| Body::DebugReq {
                        rpyid,
                        sid,
                        flags: 0,
                    },
                    None,
                    RPC_TIMEOUT,
                ) {
                    Ok(m) => match m.body {
                        Body::DebugReply { sid: s, name, .. } => {
                            let st = if s == sid && sid != SessionId::NONE {
                                "Active"
                            } else if s == SessionId::NONE {
                                "Unknown"
                            } else {
                                "Busy"
                            };
                            say!(out, "\t{id}: {st} [session: {}]", wire::name_str(&name));
                        }
                        b => say!(out, "\t{id}: unexpected reply {b:?}"),
                    },
                    Err(e) => {
                        down += 1;
                        say!(out, "\t{id}: Down ({e})");
                    }
                }
            }
        }
        say!(out, "Total {down} nodes down");
        Ok(())
    }
}

/// lst's `[LNet Rates of G]` / `[LNet Bandwidth of G]` blocks (average,
/// min and max over the nodes, per second of each node's own running
/// time, as lst computes them), then the group's aggregate.
#[allow(clippy::too_many_arguments)]
fn print_lnet_stat(
    out: Out<'_>,
    name: &str,
    old: &[Option<StatReply>],
    new: &[Option<StatReply>],
    wall: f64,
    bwrt: u8,
    rdwr: u8,
    ty: u8,
    mbs: bool,
) {
    let div = if mbs { 1e6 } else { 1048576.0 };
    let units = if mbs { "MB/s  " } else { "MiB/s " };
    // Per node: [send rate, recv rate, send perf, recv perf].
    let mut per = Vec::new();
    for (o, n) in old.iter().zip(new) {
        let (Some(o), Some(n)) = (o, n) else { continue };
        let mut delta = f64::from(n.fw.running_ms.wrapping_sub(o.fw.running_ms)) / 1000.0;
        if delta <= 0.0 {
            delta = wall;
        }
        let d32 = |a: u32, b: u32| f64::from(a.wrapping_sub(b));
        let d64 = |a: u64, b: u64| a.wrapping_sub(b) as f64;
        per.push([
            d32(n.lnet.send_count, o.lnet.send_count) / delta,
            d32(n.lnet.recv_count, o.lnet.recv_count) / delta,
            d64(n.lnet.send_length, o.lnet.send_length) / div / delta,
            d64(n.lnet.recv_length, o.lnet.recv_length) / div / delta,
        ]);
    }
    if per.is_empty() {
        say!(out, "[LNet of {name}] no node answered");
        return;
    }
    let agg = |k: usize| -> (f64, f64, f64, f64) {
        let v: Vec<f64> = per.iter().map(|p| p[k]).collect();
        let sum: f64 = v.iter().sum();
        let min = v.iter().copied().fold(f64::MAX, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        (sum / v.len() as f64, min, max, sum)
    };
    let (s1, e1) = match bwrt {
        1 => (1, 1),
        2 => (0, 0),
        _ => (0, 1),
    };
    let (s2, e2) = match rdwr {
        1 => (0, 0),
        2 => (1, 1),
        _ => (0, 1),
    };
    for i in s1..=e1 {
        say!(
            out,
            "[LNet {} of {name}]",
            if i == 0 { "Rates" } else { "Bandwidth" }
        );
        for j in s2..=e2 {
            // j == 0: receive ("R"), 1: send ("W").
            let k = if i == 0 {
                if j == 0 { 1 } else { 0 }
            } else if j == 0 {
                3
            } else {
                2
            };
            let (avg, min, max, _) = agg(k);
            let mut line = format!("[{}] ", if j == 0 { 'R' } else { 'W' });
            for (bit, label, v) in [(1, "Avg", avg), (2, "Min", min), (4, "Max", max)] {
                if ty & bit != 0 {
                    if i == 0 {
                        line.push_str(&format!("{label}: {v:<8.0} RPC/s "));
                    } else {
                        line.push_str(&format!("{label}: {v:<8.2} {units}"));
                    }
                }
            }
            say!(out, "{}", line.trim_end());
        }
    }
    let (_, _, _, rr) = agg(1);
    let (_, _, _, wr) = agg(0);
    let (_, _, _, rb) = agg(3);
    let (_, _, _, wb) = agg(2);
    say!(
        out,
        "[Aggregate of {name}, {} nodes] [R] {rr:.0} RPC/s {rb:.2} {units}[W] {wr:.0} RPC/s {wb:.2} {}",
        per.len(),
        units.trim_end()
    );
}

/// The default console socket: `$LST_CONSOLE`, else
/// `$XDG_RUNTIME_DIR/lnet-selftest-console.sock`, else
/// `/tmp/lnet-selftest-<uid>.sock`.
pub fn default_socket() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LST_CONSOLE") {
        return p.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return std::path::Path::new(&d).join("lnet-selftest-console.sock");
    }
    let uid = std::fs::metadata("/proc/self").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    std::env::temp_dir().join(format!("lnet-selftest-{uid}.sock"))
}

/// The line that ends a reply on the console socket: NUL, `RC`, the exit
/// status.
pub const END_MARK: &str = "\0RC ";

/// Serves the console on a Unix socket at `path` (one command per
/// connection: its arguments separated by NUL bytes on one line; the
/// reply is lst's output, then [`END_MARK`] and 0 or 1). The socket is
/// made private to this user. Returns the thread's handle.
pub fn serve_socket(
    node: Arc<Lnet>,
    path: &std::path::Path,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let console = std::sync::Mutex::new(Console::new(node));
    std::thread::Builder::new()
        .name("lst-console".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut line = Vec::new();
                let mut r = std::io::BufReader::new(&s).take(1 << 16);
                if r.read_until(b'\n', &mut line).is_err() {
                    continue;
                }
                let args: Vec<String> = line
                    .strip_suffix(b"\n")
                    .unwrap_or(&line)
                    .split(|&c| c == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let mut c = console.lock().unwrap_or_else(|p| p.into_inner());
                let rc = match c.exec(&args, &mut s) {
                    Ok(()) => 0,
                    Err(e) => {
                        let _ = writeln!(s, "{e}");
                        1
                    }
                };
                let _ = writeln!(s, "{END_MARK}{rc}");
            }
        })
}
