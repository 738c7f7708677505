//! vzram under systemd, without a running systemd: the units in packaging/systemd pass
//! `systemd-analyze verify`; socket activation through `systemd-socket-activate` (and through
//! this test acting as systemd) serves a real frontend on the inherited socket, sends
//! READY=1 and STOPPING=1 to NOTIFY_SOCKET, keeps the socket across a restart with a client
//! waiting in its backlog, and refuses an inherited fd it cannot use.
//!
//! The tools come from Debian's `systemd` package, which ci/guest-image installs; a missing
//! tool fails the test and says so.

#[path = "common/proc.rs"]
mod proc;

use proc::TempDir;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vufront::{Frontend, Options, Request};

const BIN: &str = env!("CARGO_BIN_EXE_vzram");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd");

/// The path of a host tool, or a failure that names the package to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: apt-get install systemd (ci/guest-image installs it)")
        })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_are_hardened() {
    let analyze = tool("systemd-analyze");
    let dir = TempDir::new("units");
    for unit in ["vzram.socket", "vzram.service"] {
        let text = std::fs::read_to_string(Path::new(UNITS).join(unit)).unwrap();
        // The binary where the package puts it is not installed here: point at ours.
        std::fs::write(dir.0.join(unit), text.replace("/usr/bin/vzram", BIN)).unwrap();
    }
    // verify exits 0 on unknown keys and only warns: any output is a failure.
    let out = Command::new("timeout")
        .args(["60", s(&analyze), "verify", "--man=no"])
        .args([dir.0.join("vzram.socket"), dir.0.join("vzram.service")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "{}: {text}",
        out.status
    );
    // And the hardening is what systemd itself rates as such.
    let out = Command::new("timeout")
        .args(["60", s(&analyze), "security", "--offline=yes", "--no-pager"])
        .arg(dir.0.join("vzram.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for vzram.service: ").nth(1))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {text}"));
    assert!(level <= 4.0, "exposure {level}:\n{text}");
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
fn notify_socket(path: &Path) -> UnixDatagram {
    let n = UnixDatagram::bind(path).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    n
}

/// The next notification, within 20 s.
fn next_state(n: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = n
        .recv(&mut buf)
        .expect("no notification from vzram within 20 s");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// A frontend that waits (up to 20 s) for a daemon that is still starting.
fn connect(sock: &Path) -> Frontend {
    let opts = Options {
        mem_size: 1 << 20,
        connect_timeout: Duration::from_secs(20),
        reply_timeout: Some(Duration::from_secs(20)),
        ..Options::default()
    };
    Frontend::connect(sock, &opts).expect("connect")
}

fn write(dev: &mut Frontend, byte: u8) {
    let mut q = dev.take_queue(0).unwrap();
    q.execute(&Request::write(0, &[byte; 4096]), Duration::from_secs(10))
        .and_then(|c| c.check())
        .expect("write");
}

fn read(dev: &mut Frontend) -> u8 {
    let mut q = dev.take_queue(0).unwrap();
    let c = q
        .execute(&Request::read(0, 4096), Duration::from_secs(10))
        .and_then(|c| c.check())
        .expect("read");
    assert!(c.data.iter().all(|b| *b == c.data[0]));
    c.data[0]
}

fn sigterm_and_wait(pid: u32, child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "vzram ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills (SIGKILL by pid) and reaps a child when dropped, also on panic.
struct Reap(Option<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn systemd_socket_activate_serves_a_frontend_and_notifies() {
    let activate = tool("systemd-socket-activate");
    let dir = TempDir::new("activate");
    let sock = dir.0.join("vz0.sock");
    let ctl = dir.0.join("vzram.ctl");
    let notify = notify_socket(&dir.0.join("notify"));
    let log = std::fs::File::create(dir.0.join("log")).unwrap();
    // systemd-socket-activate binds the socket, waits for the first connection, then execs
    // vzram (same pid, so Reap and SIGTERM reach vzram) with the socket as fd 3.
    let child = Command::new(&activate)
        .args(["-l", s(&sock)])
        .arg(format!(
            "--setenv=NOTIFY_SOCKET={}",
            dir.0.join("notify").display()
        ))
        .args([BIN, "serve", "--socket", s(&sock), "--size", "16M"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = Reap(Some(child));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    write(&mut connect(&sock), 0x3c);
    assert_eq!(read(&mut connect(&sock)), 0x3c);
    assert_eq!(next_state(&notify), "READY=1");
    // The socket is systemd's: vzram took no lock on it; its control socket is its own.
    assert!(!dir.0.join("vz0.sock.lock").exists());
    assert!(ctl.exists());
    let mut c = child.0.take().unwrap();
    let st = sigterm_and_wait(c.id(), &mut c);
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(
        st.success(),
        "{st}: {}",
        std::fs::read_to_string(dir.0.join("log")).unwrap()
    );
    // The inherited socket is left where systemd made it; the control socket is removed.
    assert!(sock.exists() && !ctl.exists());
}

/// Starts `vzram serve ARGS` as systemd would: `fd` as fd 3, LISTEN_PID (the shell's pid,
/// which `exec` keeps), LISTEN_FDS=1 and `env`.
fn activated(
    fd: &impl AsRawFd,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> std::process::Child {
    let raw = fd.as_raw_fd();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"")
        .arg("sh")
        .arg(BIN)
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on fds the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

#[test]
fn the_inherited_socket_outlives_a_restart_with_a_frontend_waiting_in_its_backlog() {
    let dir = TempDir::new("backlog");
    let sock = dir.0.join("vz0.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // An abstract NOTIFY_SOCKET this time (systemd's own is a path; both are allowed).
    let name = format!("vzram-test-notify-{}", std::process::id());
    let notify = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let n = UnixDatagram::bind_addr(&addr).unwrap();
        n.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        n
    };
    let at = format!("@{name}");
    let state = dir.0.join("state");
    let args = [
        "--socket",
        s(&sock),
        "--size",
        "16M",
        "--state-dir",
        s(&state),
    ];
    let env = [("NOTIFY_SOCKET", at.as_str()), ("RUST_LOG", "info")];
    let log = dir.0.join("log");
    let first = Reap(Some(activated(&listener, &args, &env, &log)));
    assert_eq!(next_state(&notify), "READY=1");
    let mut dev = connect(&sock);
    write(&mut dev, 0x77);
    drop(dev);
    drop(first);
    // No daemon now; the socket still listens (we hold it, as systemd would). A frontend
    // connects and waits in the backlog while vzram starts again.
    let waiting = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut dev = connect(&sock);
            read(&mut dev)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut second = Reap(Some(activated(&listener, &args, &env, &log)));
    assert_eq!(next_state(&notify), "READY=1");
    assert_eq!(
        waiting.join().unwrap(),
        0x77,
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let mut c = second.0.take().unwrap();
    let st = sigterm_and_wait(c.id(), &mut c);
    assert!(st.success(), "{st}");
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(sock.exists(), "vzram removed the inherited socket");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("inherited from systemd")
    );
}

#[test]
fn an_inherited_fd_vzram_cannot_use_is_refused_in_one_line() {
    let dir = TempDir::new("refuse");
    let sock = dir.0.join("vz0.sock");
    let args = ["--socket", s(&sock), "--size", "16M"];
    let file = std::fs::File::create(dir.0.join("file")).unwrap();
    let unlistened = std::os::unix::net::UnixStream::pair().unwrap().0;
    let other = UnixListener::bind(dir.0.join("other.sock")).unwrap();
    let datagram = UnixDatagram::bind(dir.0.join("dgram.sock")).unwrap();
    let cases: [(&dyn AsRawFd, String); 4] = [
        (&file, "inherited fd 3: not a socket".into()),
        (
            &unlistened,
            "inherited fd 3: a unix socket that is not listening".into(),
        ),
        (&datagram, "inherited fd 3: not a stream socket".into()),
        (
            &other,
            format!(
                "inherited socket {} (fd 3) matches no device",
                dir.0.join("other.sock").display()
            ),
        ),
    ];
    for (fd, want) in cases {
        let log = dir.0.join("log");
        let _ = std::fs::remove_file(&log);
        let mut c = Reap(Some(activated(&RawFdRef(fd.as_raw_fd()), &args, &[], &log)));
        let child = c.0.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{want}: vzram did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            (st.code(), err.lines().count()),
            (Some(2), 1),
            "{want}: {err}"
        );
        assert!(
            err.starts_with("vzram: socket activation: ") && err.contains(&want),
            "{want}: {err}"
        );
        // Nothing was bound or left behind.
        assert!(
            !sock.exists() && !dir.0.join("vzram.ctl").exists(),
            "{want}"
        );
    }
}

/// A borrowed raw fd.
struct RawFdRef(std::os::fd::RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}
