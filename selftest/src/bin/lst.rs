//! `lst`: Lustre's selftest command language, talking to the console of a
//! local `lnet-selftest serve --console PATH` (the socket in
//! `$LST_CONSOLE`, or the default path), which drives the nodes over LNet.
//!
//! ```text
//! lst new_session demo
//! lst add_group servers 1@shm
//! lst add_group clients 2@shm
//! lst add_batch bulk
//! lst add_test --batch bulk --from clients --to servers brw write size=1M check=simple
//! lst run bulk
//! lst stat --delay 2 --count 1 servers clients   # without --count: until Ctrl-C
//! lst stop bulk
//! lst end_session
//! ```

use std::io::{BufRead, BufReader, Write};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args[0] == "--help" || args[0] == "help" {
        println!(
            "usage: lst COMMAND [ARGS]\ncommands: new_session end_session show_session add_group update_group list_group del_group\n          add_batch add_test run stop query list_batch stat show_error ping\nconsole socket: $LST_CONSOLE or {}",
            lnet_selftest::console::default_socket().display()
        );
        return;
    }
    if args[0] == "stat" {
        // As lst does, `stat` repeats until interrupted unless `--count N`
        // says how many times. Each round is one console command, so the
        // console stays free for other lst commands meanwhile.
        let mut rest = args.clone();
        let mut count: Option<u64> = None;
        if let Some(i) = rest.iter().position(|a| a == "--count") {
            match rest.get(i + 1).and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => count = Some(n),
                _ => {
                    eprintln!("lst: --count N (N > 0)");
                    std::process::exit(1);
                }
            }
            rest.drain(i..i + 2);
        }
        rest.extend(["--count".to_string(), "1".to_string()]);
        let mut done = 0u64;
        while count.is_none_or(|n| done < n) {
            let rc = call(&rest);
            if rc != 0 {
                std::process::exit(rc);
            }
            done += 1;
        }
        return;
    }
    std::process::exit(call(&args));
}

/// Send one command to the console and print its output; returns its
/// status.
fn call(args: &[String]) -> i32 {
    let path = lnet_selftest::console::default_socket();
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "lst: no console at {} ({e}); start one with `lnet-selftest serve --console {}`",
                path.display(),
                path.display()
            );
            std::process::exit(1);
        }
    };
    let mut line = args.join("\0");
    line.push('\n');
    if let Err(e) = s.write_all(line.as_bytes()) {
        eprintln!("lst: {e}");
        std::process::exit(1);
    }
    let mut rc = 1;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for l in BufReader::new(s).lines() {
        let Ok(l) = l else { break };
        if let Some(v) = l.strip_prefix(lnet_selftest::console::END_MARK) {
            rc = v.trim().parse().unwrap_or(1);
            break;
        }
        if writeln!(out, "{l}").and_then(|()| out.flush()).is_err() {
            // Our reader went away (`lst stat | head`): stop quietly.
            std::process::exit(0);
        }
    }
    rc
}
