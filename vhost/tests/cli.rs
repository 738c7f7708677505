//! The `vzram` binary as a user runs it: argument errors, a served device, SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vzram");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_are_one_line_and_status_2() {
    for (args, needle) in [
        (
            "serve --socket /tmp/x.sock --size 12345",
            "multiple of 4 KiB",
        ),
        (
            "serve --size 1G",
            "--socket and --size, or at least one --device",
        ),
        ("serve --socket /tmp/x.sock --size 1G --comp lz5", "lz5"),
        (
            "serve --device socket=/tmp/a,size=1G,colour=red",
            "unknown key",
        ),
        (
            "serve --socket /tmp/x.sock --size 1G --num-queues 0",
            "num-queues",
        ),
        (
            "serve --socket /tmp/x.sock --size 1G --queue-size 100",
            "power of two",
        ),
        ("mem-limit lots", "lots"),
        ("frobnicate", "frobnicate"),
    ] {
        let args: Vec<&str> = args.split_whitespace().collect();
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("vzram: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    let (code, out, _) = run(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--mem-limit") && out.contains("memory-backend-memfd"));
}

#[test]
fn serve_answers_stat_and_sigterm_removes_the_sockets() {
    let dir = std::env::temp_dir().join(format!("vzram-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vz0.sock");
    let control = dir.join("vzram.ctl");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--socket",
            socket.to_str().unwrap(),
            "--size",
            "64M",
            "--comp",
            "zstd",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(socket.exists() && control.exists()) {
        assert!(Instant::now() < deadline, "the sockets never appeared");
        assert!(child.try_wait().unwrap().is_none(), "vzram exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = run(&["stat", "--control", control.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .eq(["vz0", "64M", "0B", "0B", "0B", "zstd", "16"]),
        "{out}"
    );
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vzram ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists() && !control.exists(), "sockets left behind");
    // A client with no daemon: one line, status 1.
    let (code, _, err) = run(&["stat", "--control", control.to_str().unwrap()]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
