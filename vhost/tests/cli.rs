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
        (
            "serve --socket /tmp/x.sock --size 1G --socket-group no-such-group-vzram",
            "--socket-group: unknown group \"no-such-group-vzram\"",
        ),
        (
            "serve --device socket=/tmp/x.sock,size=1G,socket-group=no-such-group-vzram",
            "device vz0: socket-group: unknown group",
        ),
        (
            "serve --socket /tmp/x.sock --size 1G --control-group no-such-group-vzram",
            "--control-group: unknown group",
        ),
        ("mem-limit lots", "lots"),
        ("frobnicate", "frobnicate"),
        // The load generator is a program of its own (vzram-bench).
        ("bench --store-only", "bench"),
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
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A client with no daemon: one line, status 1.
    let (code, _, err) = run(&["stat", "--control", control.to_str().unwrap()]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory for one test.
fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vzram-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary to completion within `limit`; on a hang, kills it (by its pid) and fails.
fn run_within(args: &[&str], limit: Duration) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            kill(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!("{args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

fn kill(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// A `vzram serve` child, SIGKILLed (by pid) and reaped when dropped.
struct Daemon(std::process::Child);

impl Daemon {
    /// Starts `vzram serve ARGS` and waits until every path in `ready` exists.
    fn start(args: &[&str], ready: &[&std::path::Path]) -> Daemon {
        let child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.iter().all(|p| p.exists()) {
            assert!(Instant::now() < deadline, "the sockets never appeared");
            assert!(d.0.try_wait().unwrap().is_none(), "vzram exited early");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill(self.0.id(), libc::SIGKILL);
        let _ = self.0.wait();
    }
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Writes `byte` over the device's first page.
fn write_page(socket: &std::path::Path, byte: u8) {
    let mut dev = vufront::Frontend::connect(socket, &vufront::Options::default()).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.write(0, &[byte; 4096]).unwrap().check().unwrap();
}

/// The first byte of the device's first page.
fn read_page(socket: &std::path::Path) -> u8 {
    let mut dev = vufront::Frontend::connect(socket, &vufront::Options::default()).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    let c = q.read(0, 4096).unwrap().check().unwrap();
    assert!(c.data.iter().all(|b| *b == c.data[0]));
    c.data[0]
}

#[test]
fn a_second_serve_on_the_same_socket_is_refused_and_the_first_keeps_its_disk() {
    let dir = tempdir("second");
    let socket = dir.join("vz0.sock");
    let control = dir.join("vzram.ctl");
    let _first = Daemon::start(
        &["--socket", s(&socket), "--size", "16M"],
        &[&socket, &control],
    );
    write_page(&socket, 0x5a);
    let other_control = dir.join("other.ctl");
    for extra in [&[][..], &["--control", s(&other_control)][..]] {
        let mut args = vec!["serve", "--socket", s(&socket), "--size", "16M"];
        args.extend_from_slice(extra);
        let (code, err) = run_within(&args, Duration::from_secs(10));
        assert_eq!((code, err.lines().count()), (2, 1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "vzram: {}: in use by another vzram (lock {}.lock held)",
                socket.display(),
                socket.display()
            )
        );
        // The first daemon still serves the same disk on the same socket, and its control
        // socket answers; the second left nothing of its own.
        assert_eq!(read_page(&socket), 0x5a, "{args:?}");
        let (code, _, err) = run(&["stat", "--control", s(&control)]);
        assert_eq!(code, 0, "{err}");
        assert!(!other_control.exists() && !dir.join("other.ctl.lock").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_at_the_socket_path_is_refused_and_kept() {
    let dir = tempdir("regular");
    let socket = dir.join("vz0.sock");
    std::fs::write(&socket, b"not a socket").unwrap();
    let (code, err) = run_within(
        &["serve", "--socket", s(&socket), "--size", "16M"],
        Duration::from_secs(10),
    );
    assert_eq!((code, err.lines().count()), (2, 1), "{err}");
    assert!(err.contains("is not a socket; not replacing it"), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
    // Nothing else was left behind: no lock file, no control socket.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["vz0.sock"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_at_the_control_path_fails_at_once_every_time() {
    let dir = tempdir("control-file");
    let socket = dir.join("vz0.sock");
    let control = dir.join("vzram.ctl");
    std::fs::write(&control, b"keep me").unwrap();
    for run in 0..10 {
        let (code, err) = run_within(
            &["serve", "--socket", s(&socket), "--size", "16M"],
            Duration::from_secs(10),
        );
        assert_eq!((code, err.lines().count()), (2, 1), "run {run}: {err}");
        assert!(
            err.contains("vzram.ctl") && err.contains("not a socket"),
            "{err}"
        );
        assert_eq!(std::fs::read(&control).unwrap(), b"keep me");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["vzram.ctl"], "run {run}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_control_socket_has_its_own_mode_and_takes_the_largest_size() {
    let dir = tempdir("modes");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let control = dir.join("vzram.ctl");
    let daemon = Daemon::start(
        &[
            "--device",
            &format!("socket={},size=16M", a.display()),
            "--device",
            &format!("socket={},size=16M", b.display()),
            "--socket-mode",
            "0666",
        ],
        &[&a, &b, &control],
    );
    assert_eq!((mode(&a), mode(&b), mode(&control)), (0o666, 0o666, 0o600));
    // What `vzram mem-limit` prints for the largest limit is accepted back as input.
    let (code, out, err) = run(&[
        "mem-limit",
        "--control",
        s(&control),
        "18446744073709551615",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("mem_limit: 16E "), "{out}");
    let (code, out, err) = run(&["mem-limit", "--control", s(&control), "16E"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(18446744073709551615 bytes)"), "{out}");
    let (code, _, err) = run(&["mem-limit", "--control", s(&control), "17E"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("too large"), "{err}");
    drop(daemon);
    let control = dir.join("c.ctl");
    let _daemon = Daemon::start(
        &[
            "--socket",
            s(&a),
            "--size",
            "16M",
            "--control",
            s(&control),
            "--control-mode",
            "0660",
        ],
        &[&control],
    );
    assert_eq!((mode(&a), mode(&control)), (0o600, 0o660));
    let _ = std::fs::remove_dir_all(&dir);
}

fn gid(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).unwrap().gid()
}

/// A group other than ours that this process may give files to (as root, any; else none).
fn other_group() -> Option<(String, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let (name, id) = (f.next()?, f.nth(1)?.parse::<u32>().ok()?);
        (id != 0).then(|| (name.to_string(), id))
    })
}

#[test]
fn sockets_given_to_a_group_have_its_gid_and_their_mode() {
    let dir = tempdir("group");
    // SAFETY: getegid has no preconditions.
    let own = unsafe { libc::getegid() };
    let (name, id) = other_group().unwrap_or_else(|| (own.to_string(), own));
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let control = dir.join("vzram.ctl");
    let _daemon = Daemon::start(
        &[
            "--device",
            &format!("socket={},size=16M", a.display()),
            "--device",
            &format!("socket={},size=16M,socket-group={own}", b.display()),
            "--socket-group",
            &name,
            "--socket-mode",
            "0660",
            "--control-group",
            &name,
            "--control-mode",
            "0660",
        ],
        &[&a, &b, &control],
    );
    assert_eq!((gid(&a), mode(&a)), (id, 0o660));
    // The device's own socket-group= wins over --socket-group.
    assert_eq!((gid(&b), mode(&b)), (own, 0o660));
    assert_eq!((gid(&control), mode(&control)), (id, 0o660));
    // The lock files stay the daemon's alone.
    assert_eq!(mode(&dir.join("a.sock.lock")), 0o600);
    write_page(&a, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backing_file_that_holds_data_needs_the_overwrite_flag() {
    let dir = tempdir("backing");
    let socket = dir.join("vz0.sock");
    let backing = dir.join("backing");
    std::fs::write(&backing, [7u8; 4096]).unwrap();
    let args = [
        "serve",
        "--socket",
        s(&socket),
        "--size",
        "16M",
        "--backing-file",
        s(&backing),
    ];
    let (code, err) = run_within(&args, Duration::from_secs(10));
    assert_eq!((code, err.lines().count()), (2, 1), "{err}");
    assert!(
        err.contains(&format!("backing file {}: holds data", backing.display()))
            && err.contains("--backing-file-overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&backing).unwrap(), [7u8; 4096]);
    assert!(!socket.exists());
    let _daemon = Daemon::start(
        &[
            "--socket",
            s(&socket),
            "--size",
            "16M",
            "--backing-file",
            s(&backing),
            "--backing-file-overwrite",
        ],
        &[&socket],
    );
    let (code, err) = run_within(
        &[
            "serve",
            "--device",
            &format!("socket={},size=16M", dir.join("x.sock").display()),
            "--device",
            &format!("socket={},size=16M", dir.join("y.sock").display()),
            "--backing-file",
            s(&dir.join("other")),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give each its own backing-file=PATH"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
