//! `lst` scripts against three `lnet-selftest serve` processes on shm: one
//! holds the console, the console drives the others over LNet with the
//! kernel's framework RPCs (session, groups, tests, batches, stats).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A `lnet-selftest serve` process with `args`, optionally holding the
/// console; waits for its READY line, which must name `nid`.
fn serve_node(args: &[&str], console: Option<&std::path::Path>, nid: &str) -> Node {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lnet-selftest"));
    c.arg("serve")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(p) = console {
        c.arg("--console").arg(p);
    }
    let mut child = c.spawn().unwrap();
    let mut l = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut l)
        .unwrap();
    assert!(l.starts_with(&format!("READY {nid}")), "{l}");
    Node(child)
}

fn serve(dir: &std::path::Path, addr: u32, console: Option<&std::path::Path>) -> Node {
    let (a, d) = (addr.to_string(), dir.display().to_string());
    serve_node(
        &["--lnd", "shm", "--addr", &a, "--dir", &d],
        console,
        &format!("{addr}@shm"),
    )
}

fn lst(sock: &std::path::Path, cmd: &str) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lst"))
        .args(cmd.split_whitespace())
        .env("LST_CONSOLE", sock)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// `lst cmd`, which must succeed: its output.
fn lst_ok(sock: &std::path::Path, cmd: &str) -> String {
    let (rc, out) = lst(sock, cmd);
    assert_eq!(rc, 0, "lst {cmd}: {out}");
    out
}

/// Query `batch` every 100 ms, at most `tries` times, until it is idle;
/// then `show_error` must report no errors in either group.
fn wait_idle_without_errors(sock: &std::path::Path, batch: &str, tries: u32) {
    let idle = (0..tries).any(|i| {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        lst_ok(sock, &format!("query {batch}")).contains("idle")
    });
    assert!(idle, "the batch did not end");
    let out = lst_ok(sock, "show_error clients servers");
    assert!(out.contains("Total 0 error nodes in clients"), "{out}");
    assert!(out.contains("Total 0 error nodes in servers"), "{out}");
    assert!(
        out.contains("[Session 0 brw errors, 0 ping errors]"),
        "{out}"
    );
}

#[test]
fn an_lst_script_runs_a_brw_batch_and_reports() {
    let dir = std::env::temp_dir().join(format!("lst-script-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dir.join("console.sock");
    let _n1 = serve(&dir, 1, Some(&sock));
    let _n2 = serve(&dir, 2, None);
    let _n3 = serve(&dir, 3, None);
    let ok = |cmd: &str| lst_ok(&sock, cmd);
    // Commands before a session fail with a reason.
    let (rc, out) = lst(&sock, "add_group g 2@shm");
    assert_eq!(rc, 1);
    assert!(out.contains("new_session"), "{out}");
    assert!(ok("new_session --timeout 100 demo").contains("SESSION: demo"));
    assert!(ok("show_session").contains("demo"));
    ok("add_group servers 2@shm");
    ok("add_group clients 3@shm");
    let out = ok("list_group clients");
    assert!(out.contains("12345-3@shm: Active"), "{out}");
    assert!(ok("list_group").contains("Total 2 groups"));
    ok("add_batch bulk");
    assert!(ok("add_test --batch bulk --loop 50 --concurrency 2 --from clients --to servers brw write size=64k check=full").contains("successfully"));
    ok("add_test --batch bulk --loop 20 --from clients --to servers brw read size=4k check=simple");
    ok("add_test --batch bulk --loop 20 --from clients --to servers ping");
    let out = ok("list_batch bulk");
    assert!(
        out.contains("Tests: 3") && out.contains("brw write size=64K"),
        "{out}"
    );
    assert!(ok("run bulk").contains("running"));
    // The loops end by themselves; stat while (or after) they run.
    let out = ok("stat --delay 0.5 --count 1 servers clients");
    for want in [
        "[LNet Rates of servers]",
        "[LNet Bandwidth of clients]",
        "[R] Avg:",
        "[W] Avg:",
        "[Aggregate of clients",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    wait_idle_without_errors(&sock, "bulk", 100);
    let out = ok("ping servers clients");
    assert!(out.contains("12345-2@shm: Active [session: demo]"), "{out}");
    // Latency percentiles of the client's tests (an lnet-rs extension).
    let out = ok("stat --delay 0.2 --count 1 clients");
    assert!(
        out.contains("[Latency of 12345-3@shm] p50:") && out.contains("(140 RPCs)"),
        "{out}"
    );
    // --count N prints N rounds; without it stat repeats until stopped
    // (here: until its output is closed after three rounds).
    let out = ok("stat --delay 0.1 --count 3 clients");
    assert_eq!(out.matches("[LNet Rates of clients]").count(), 3, "{out}");
    let mut forever = Command::new(env!("CARGO_BIN_EXE_lst"))
        .args(["stat", "--delay", "0.1", "--rate", "clients"])
        .env("LST_CONSOLE", &sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(forever.stdout.take().unwrap());
    let mut rounds = 0;
    let mut l = String::new();
    while rounds < 3 && r.read_line(&mut l).unwrap() > 0 {
        rounds += usize::from(l.contains("[LNet Rates of clients]"));
        l.clear();
    }
    assert_eq!(rounds, 3);
    let _ = forever.kill();
    let _ = forever.wait();
    // Bad commands are refused with a reason, the console keeps serving.
    let (rc, out) = lst(
        &sock,
        "add_test --batch nope --from clients --to servers ping",
    );
    assert_eq!(rc, 1);
    assert!(out.contains("no batch nope"), "{out}");
    let (rc, out) = lst(&sock, "fly_to_the_moon");
    assert_eq!(rc, 1);
    assert!(out.contains("unknown command"), "{out}");
    ok("stop bulk");
    assert!(ok("end_session").contains("ended"));
    // The nodes left the session.
    let out = ok("ping --nodes 2@shm");
    assert!(out.contains("Unknown"), "{out}");
    drop((_n1, _n2, _n3));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `serve` node on tcp at `addr`, listening on `port` and dialling peers
/// there too (NIDs carry no port).
fn serve_tcp(addr: &str, port: u16, console: Option<&std::path::Path>) -> Node {
    let p = port.to_string();
    serve_node(
        &[
            "--lnd",
            "tcp",
            "--addr",
            addr,
            "--port",
            &p,
            "--peer-port",
            &p,
        ],
        console,
        &format!("{addr}@tcp"),
    )
}

#[test]
fn an_lst_script_over_tcp_with_a_console_two_servers_and_two_clients() {
    let dir = std::env::temp_dir().join(format!("lst-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dir.join("console.sock");
    const PORT: u16 = 23988;
    // Five processes: the console's node, two servers, two clients.
    let _console = serve_tcp("127.0.0.50", PORT, Some(&sock));
    let _s1 = serve_tcp("127.0.0.51", PORT, None);
    let _s2 = serve_tcp("127.0.0.52", PORT, None);
    let _c1 = serve_tcp("127.0.0.53", PORT, None);
    let _c2 = serve_tcp("127.0.0.54", PORT, None);
    let ok = |cmd: &str| lst_ok(&sock, cmd);
    ok("new_session --timeout 100 tcpdemo");
    ok("add_group servers 127.0.0.[51-52]@tcp");
    ok("add_group clients 127.0.0.[53-54]@tcp");
    let out = ok("list_group servers");
    assert!(
        out.contains("12345-127.0.0.51@tcp: Active")
            && out.contains("12345-127.0.0.52@tcp: Active"),
        "{out}"
    );
    ok("add_batch bulk");
    ok(
        "add_test --batch bulk --loop 40 --concurrency 8 --distribute 1:1 --from clients --to servers brw write size=64k check=simple",
    );
    ok(
        "add_test --batch bulk --loop 40 --concurrency 8 --distribute 1:1 --from clients --to servers brw read size=64k check=full",
    );
    assert!(ok("run bulk").contains("running"));
    let out = ok("stat --delay 0.5 --count 2 servers clients");
    assert_eq!(out.matches("[LNet Rates of servers]").count(), 2, "{out}");
    assert_eq!(out.matches("[LNet Rates of clients]").count(), 2, "{out}");
    wait_idle_without_errors(&sock, "bulk", 200);
    // Both clients ran every loop: 2 tests x 40 loops x concurrency 8
    // (each unit of concurrency runs the loop count, as in the kernel).
    let out = ok("stat --delay 0.1 --count 1 clients");
    for c in ["127.0.0.53", "127.0.0.54"] {
        assert!(
            out.contains(&format!("[Latency of 12345-{c}@tcp] p50:")) && out.contains("(640 RPCs)"),
            "{c}: {out}"
        );
    }
    assert!(ok("end_session").contains("ended"));
    let _ = std::fs::remove_dir_all(&dir);
}
