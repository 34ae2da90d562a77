//! `lnet-shm-clean [DIR]`: remove the socket files that crashed shm nodes
//! left in the rendezvous directory (default: this user's, see
//! `lnd_loopback::shm::default_dir`). Sockets a live node listens on are
//! kept. Shared memory itself needs no cleaning: it is memfds, which the
//! kernel frees with the last process that maps them.

fn main() -> std::process::ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(lnd_loopback::shm::default_dir);
    match lnd_loopback::shm::cleanup(&dir) {
        Ok(gone) => {
            for p in &gone {
                println!("removed {}", p.display());
            }
            println!(
                "{} stale socket(s) removed from {}",
                gone.len(),
                dir.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("nothing to clean: {} does not exist", dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lnet-shm-clean: {}: {e}", dir.display());
            std::process::ExitCode::FAILURE
        }
    }
}
