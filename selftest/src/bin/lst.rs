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
//! lst stat --delay 2 --count 1 servers clients
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
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
    }
    std::process::exit(rc);
}
