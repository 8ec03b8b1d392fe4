//! The command line: `-t` validates like `nginx -t`.

use std::process::Command;

fn edgeslice(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeslice"))
        .args(args)
        .output()
        .expect("run edgeslice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_passes_test_mode() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edgeslice.yaml");
    let (code, out, err) = edgeslice(&["-t", "-c", conf]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("test is successful"), "{out}");
}

#[test]
fn bad_config_fails_test_mode_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let cases = [
        ("cache:\n  chunk_sise: 1MiB\nupstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: o\n", "cache.chunk_sise", "line 2"),
        ("upstreams:\n  o:\n    servers: [\"127.0.0.1:1\", \"nope\"]\nroutes:\n  - upstream: o\n", "upstreams.o.servers[1]", "line 3"),
        ("upstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: p\n", "routes[0].upstream", "line 5"),
        ("upstreams: {o: {servers: [\n", "", "line"),
    ];
    for (yaml, key, line) in cases {
        std::fs::write(&path, yaml).unwrap();
        let (code, _out, err) = edgeslice(&["-t", "-c", path.to_str().unwrap()]);
        assert_ne!(code, 0, "accepted:\n{yaml}");
        assert!(
            err.contains(key) && err.contains(line),
            "error for\n{yaml}\nwas: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = edgeslice(&["-t", "-c", "/nonexistent/edgeslice.yaml"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn a_foreign_disk_path_fails_test_mode_and_start_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(shared.join("ab")).unwrap();
    std::fs::write(shared.join("ab").join("notes"), b"keep me").unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let path = dir.path().join("conf.yaml");
    for (disk, needle) in [(&shared, "not empty"), (&file, "not a directory")] {
        let yaml = format!(
            "listen: [\"127.0.0.1:0\"]\ncache:\n  disk:\n    path: {}\n    capacity: 1MiB\nupstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: o\n",
            disk.display()
        );
        std::fs::write(&path, yaml).unwrap();
        for mode in [&["-t"][..], &[][..]] {
            let mut args = mode.to_vec();
            args.extend(["-c", path.to_str().unwrap()]);
            let (code, _out, err) = edgeslice(&args);
            assert_ne!(code, 0, "{mode:?} accepted {}", disk.display());
            assert!(
                err.contains("cache.disk.path") && err.contains(needle),
                "{mode:?}: {err}"
            );
        }
    }
    assert_eq!(
        std::fs::read(shared.join("ab").join("notes")).unwrap(),
        b"keep me"
    );
    assert!(!shared.join("EDGESLICE-CACHE").exists());
}

/// A second instance on an address in use (the proxy's `listen` or `admin.listen`) exits at
/// once with status 1 and an error naming the key and the address; it leaves no process behind
/// (before the check, Pingora's listener threads panicked and the process lived on, socketless).
#[test]
fn an_address_in_use_is_a_clear_error_and_a_nonzero_exit() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conf.yaml");
    for taken_key in ["listen", "admin.listen"] {
        // The "first instance": a socket listening on the address to be taken.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (taken_addr, free_addr) = (taken.local_addr().unwrap(), free.local_addr().unwrap());
        drop(free);
        let (listen, admin) = if taken_key == "listen" {
            (taken_addr, free_addr)
        } else {
            (free_addr, taken_addr)
        };
        let yaml = format!(
            "server:\n  pid_file: {d}/edgeslice.pid\n  upgrade_sock: {d}/upgrade.sock\nlisten:\n  - {listen}\nadmin:\n  listen: {admin}\nupstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: o\n",
            d = dir.path().display()
        );
        std::fs::write(&path, yaml).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgeslice"))
            .args(["-c", path.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run edgeslice");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{taken_key} in use: edgeslice still running after 10 s");
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(1), "{taken_key}: {err}");
        assert!(
            err.contains(&format!("{taken_key}: cannot listen on {taken_addr}")),
            "{taken_key}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // The other address was never taken, and nothing holds it now.
        let other = if taken_key == "listen" { admin } else { listen };
        assert!(std::net::TcpListener::bind(other).is_ok(), "{other} held");
        drop(taken);
    }
}
