//! `lnet-selftest` as a user runs it: every mode over `lo` and `shm` (two
//! processes) with checks on, `--json` parsed and checked for consistency,
//! `tcp` on loopback, the no-argument default, and `sweep`.

use std::process::Command;

use serde_json::Value;

fn lst(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lnet-selftest"))
        .args(args)
        .output()
        .expect("run lnet-selftest");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run_json(args: &[&str]) -> Value {
    let mut a = vec!["run", "--json"];
    a.extend_from_slice(args);
    let (rc, out, err) = lst(&a);
    assert_eq!(rc, 0, "{args:?}: {out} {err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    check_consistent(&v);
    v
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// The numbers must agree with each other.
fn check_consistent(v: &Value) {
    let secs = f(v, "seconds");
    assert!(secs > 0.0);
    let (rpcs, bytes) = (f(v, "rpcs"), f(v, "bytes"));
    assert!(rpcs > 0.0, "{v}");
    assert_eq!(bytes, rpcs * f(v, "size"), "{v}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1.0);
    assert!(close(f(v, "mib_per_s"), bytes / secs / 1048576.0), "{v}");
    assert!(close(f(v, "rpcs_per_s"), rpcs / secs), "{v}");
    assert!(
        close(f(v, "lnet_msgs_per_s"), f(v, "lnet_msgs") / secs),
        "{v}"
    );
    let l = &v["latency_us"];
    let g = |k: &str| l[k].as_f64().unwrap();
    assert!(g("min") <= g("p50") && g("p50") <= g("p99") && g("p99") <= g("p99_9"));
    assert!(
        g("p99_9") <= g("max") * 1.001 && g("mean") >= g("min"),
        "{v}"
    );
    assert_eq!(f(v, "errors"), 0.0, "{v}");
    assert_eq!(f(v, "errors"), f(v, "rpc_errors") + f(v, "data_errors"));
}

#[test]
fn every_mode_over_lo_and_shm_with_checks() {
    for lnd in ["lo", "shm"] {
        for (mode, size, check) in [
            ("write", "1M", "full"),
            ("read", "64k", "simple"),
            ("read", "1M", "full"),
            ("write", "4k", "simple"),
            ("ping", "1M", "none"),
        ] {
            let v = run_json(&[
                "--lnd",
                lnd,
                "--mode",
                mode,
                "--size",
                size,
                "--check",
                check,
                "--duration",
                "0.5",
                "--concurrency",
                "4",
            ]);
            assert_eq!(v["lnd"], lnd);
            assert_eq!(v["mode"], mode);
            assert_eq!(v["check"], check);
            if mode == "ping" {
                assert_eq!(f(&v, "size"), 0.0);
                // Two LNet messages per ping RPC (request, reply) on the
                // client node; RPCs in flight at the window's edges (at
                // most the concurrency, 4) may have only one inside it.
                assert!(f(&v, "lnet_msgs") >= 2.0 * (f(&v, "rpcs") - 4.0), "{v}");
            } else {
                let want = if size == "1M" {
                    1048576.0
                } else if size == "64k" {
                    65536.0
                } else {
                    4096.0
                };
                assert_eq!(f(&v, "size"), want);
            }
            if lnd == "shm" {
                assert_eq!(v["client"], "2@shm");
                assert_eq!(v["server"], "1@shm");
            }
        }
    }
}

#[test]
fn tcp_on_loopback() {
    let v = run_json(&[
        "--lnd",
        "tcp",
        "--size",
        "64k",
        "--check",
        "simple",
        "--duration",
        "0.5",
    ]);
    assert_eq!(v["server"], "127.0.0.2@tcp");
    assert_eq!(v["client"], "127.0.0.1@tcp");
}

#[test]
fn the_default_run_is_shm_1m_writes_with_a_table() {
    let (rc, out, err) = lst(&["run", "--duration", "1"]);
    assert_eq!(rc, 0, "{out} {err}");
    assert!(out.contains("write 1M over shm"), "{out}");
    assert!(
        out.contains("MiB/s") && out.contains("p99.9 us") && out.contains("LNet msg/s"),
        "{out}"
    );
    // No argument at all: the same run (5 s).
    let (rc, out, _) = lst(&[]);
    assert_eq!(rc, 0);
    assert!(out.contains("write 1M over shm"), "{out}");
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    for (args, why) in [
        (&["run", "--size", "2M"][..], "--size"),
        (&["run", "--mode", "fly"][..], "--mode"),
        (&["run", "--check", "maybe"][..], "--check"),
        (&["run", "--lnd", "carrier-pigeon"][..], "unknown --lnd"),
        (&["run", "--lnd", "rdma"][..], "rdma"),
    ] {
        let (rc, _, err) = lst(args);
        assert_eq!(rc, 1, "{args:?}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn sweep_writes_a_table_and_a_plot() {
    let dir = std::env::temp_dir().join(format!("lst-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("s.svg");
    let (rc, out, err) = lst(&[
        "sweep",
        "--lnds",
        "lo,shm",
        "--sizes",
        "8,4k,1M",
        "--duration",
        "0.2",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{out} {err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("MiB/s")).count(),
        6,
        "{out}"
    );
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    // Two charts, one line per transport in each.
    assert_eq!(s.matches("<polyline").count(), 4);
    assert!(s.contains(">lo<") && s.contains(">shm<"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compare_prints_ours_beside_each_peer_with_a_ratio_or_the_package_to_install() {
    for (lnd, pkgs) in [("shm", ["ucx-utils"]), ("tcp", ["iperf3"])] {
        let (rc, out, err) = lst(&["compare", "--lnd", lnd, "--duration", "0.5"]);
        assert_eq!(rc, 0, "{out}\n{err}");
        let rows: Vec<&str> = out.lines().filter(|l| l.contains(" ours ")).collect();
        assert_eq!(rows.len(), 2, "bandwidth and latency rows: {out}");
        for r in &rows {
            // Either the peer ran (a ratio) or it is missing and named with
            // its Debian package; never silently skipped.
            assert!(
                r.contains("ratio ")
                    || pkgs
                        .iter()
                        .any(|p| r.contains(&format!("apt-get install {p}"))),
                "{r}"
            );
        }
        // memcpy and the TCP ping-pong need no tool: always a ratio.
        assert!(rows.iter().any(|r| r.contains("ratio ")), "{out}");
    }
    let (rc, _, err) = lst(&["compare", "--lnd", "lo"]);
    assert_ne!(rc, 0);
    assert!(err.contains("tcp, shm and rdma"), "{err}");
}
