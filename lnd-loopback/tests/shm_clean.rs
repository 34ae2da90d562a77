//! `lnet-shm-clean` removes the sockets of dead nodes and keeps live ones.

use std::os::unix::net::UnixListener;
use std::process::Command;

#[test]
fn clean_removes_only_stale_sockets() {
    let dir = std::env::temp_dir().join(format!("lnet-shm-clean-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    lnd_loopback::shm::prepare_dir(&dir).unwrap();
    // A crashed node: its socket file stays, nobody listens.
    drop(UnixListener::bind(dir.join("5@shm.sock")).unwrap());
    // A live node.
    let live = UnixListener::bind(dir.join("6@shm.sock")).unwrap();
    // Not ours to touch.
    std::fs::write(dir.join("notes.txt"), b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lnet-shm-clean"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("5@shm.sock") && text.contains("1 stale"),
        "{text}"
    );
    assert!(!dir.join("5@shm.sock").exists());
    assert!(dir.join("6@shm.sock").exists());
    assert!(dir.join("notes.txt").exists());
    drop(live);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rendezvous_directory_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("lnet-shm-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(lnd_loopback::shm::prepare_dir(&dir).is_err());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(lnd_loopback::shm::prepare_dir(&dir).is_ok());
    let fresh = dir.join("sub");
    lnd_loopback::shm::prepare_dir(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let _ = std::fs::remove_dir_all(&dir);
}
