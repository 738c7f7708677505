//! Connection churn against the real daemon: what one connection costs must be given back
//! when it ends (fds, threads, memory), and running out of fds must be a passing condition,
//! not the end of the device (issue #11: a frontend may connect and hang up at will).

#[path = "common/proc.rs"]
mod child;
#[path = "common/raw.rs"]
mod raw;

use child::{Daemon, KillOnDrop, TempDir, describe_status, fresh_io, poll_until};
use raw::Raw;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vufront::{GuestMem, Queue};

const T: Duration = Duration::from_secs(2);
const MIB: u64 = 1 << 20;

fn one_device(tag: &str, pre_exec: Option<child::PreExec>) -> (TempDir, PathBuf, KillOnDrop) {
    let dir = TempDir::new(tag);
    let sock = dir.0.join("a.sock");
    let args = vec![
        "--device".to_string(),
        format!("socket={},size=64M", sock.display()),
        "--control".to_string(),
        dir.0.join("vzram.ctl").display().to_string(),
        "--num-queues".to_string(),
        "4".to_string(),
        "--policy".to_string(),
        "off".to_string(),
    ];
    let d = Daemon::start_with(
        &args,
        &dir.0.join("vzram.log"),
        std::slice::from_ref(&sock),
        pre_exec,
    );
    (dir, sock, KillOnDrop(d))
}

/// Ring memory and notifiers reused by every cycle (the daemon maps the memfd each time).
struct Frontend {
    mem: std::sync::Arc<GuestMem>,
    q: Queue,
}

impl Frontend {
    fn new() -> Frontend {
        let mem = GuestMem::with_size(MIB).unwrap();
        let q = Queue::new(&mem, 0, 256).unwrap();
        Frontend { mem, q }
    }

    /// Connect, negotiate (features, protocol features, owner), hand over memory, set up
    /// and start queue 0, close.
    fn cycle(&self, sock: &Path) -> Result<(), String> {
        let r = Raw::connect(sock, T).map_err(|e| format!("connect: {e}"))?;
        r.negotiate((1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())?;
        let o = r.mem_table(&raw::regions_of(&self.mem));
        if !o.is_ack() {
            return Err(format!("SET_MEM_TABLE: {}", o.describe()));
        }
        r.start_queue(
            &self.mem,
            &self.q,
            self.q.call_fd().as_raw_fd(),
            self.q.kick_fd().as_raw_fd(),
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(d: &Daemon) -> Usage {
    Usage {
        fds: d.fds(),
        threads: d.threads(),
        rss_kib: d.rss_kib(),
    }
}

/// Waits (up to 30 s: connections still in the listen backlog are served one at a time, and
/// CI machines are slow) for fds and threads to come back to `base`; returns the usage then.
fn settle(d: &Daemon, base: Usage) -> Usage {
    // The client side is done long before the daemon: closed connections still wait in the
    // listen backlog, and between two of them the counts dip to the baseline. So the counts
    // must stay there for a while (three looks, 100 ms apart).
    let mut good = 0;
    poll_until(Duration::from_secs(30), || {
        let u = usage(d);
        good = if u.fds <= base.fds && u.threads <= base.threads {
            good + 1
        } else {
            0
        };
        std::thread::sleep(Duration::from_millis(100));
        good >= 3
    });
    usage(d)
}

/// The usage of an idle daemon: the same fd and thread counts twice, 200 ms apart, after the
/// warm-up's last connection was torn down.
fn baseline(d: &Daemon) -> Usage {
    let mut last = usage(d);
    poll_until(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = usage(d);
        let stable = now.fds == last.fds && now.threads == last.threads;
        last = now;
        stable
    });
    last
}

fn check_flat(what: &str, d: &Daemon, base: Usage, after: Usage) {
    eprintln!(
        "{what}: fds {} -> {} ({:+}), threads {} -> {} ({:+}), RSS {} -> {} KiB ({:+} KiB)",
        base.fds,
        after.fds,
        after.fds as i64 - base.fds as i64,
        base.threads,
        after.threads,
        after.threads as i64 - base.threads as i64,
        base.rss_kib,
        after.rss_kib,
        after.rss_kib as i64 - base.rss_kib as i64
    );
    if let Some(st) = d.exited() {
        panic!("{what}: the daemon {}", describe_status(st));
    }
    assert_eq!(
        after.fds,
        base.fds,
        "{what}: daemon fds: {:?}",
        d.fd_targets()
    );
    assert_eq!(after.threads, base.threads, "{what}: daemon threads");
    assert!(
        after.rss_kib <= base.rss_kib + 8 * 1024,
        "{what}: RSS grew by {} KiB",
        after.rss_kib - base.rss_kib
    );
}

#[test]
fn ten_thousand_negotiations_leave_nothing_behind() {
    let (_dir, sock, d) = one_device("churn", None);
    let fe = Frontend::new();
    for i in 0..100 {
        fe.cycle(&sock)
            .unwrap_or_else(|e| panic!("warm-up cycle {i}: {e}"));
    }
    let base = baseline(&d.0);
    let start = Instant::now();
    let (mut failed, mut done) = (None, 0u32);
    for i in 0..10_000 {
        if let Err(e) = fe.cycle(&sock) {
            failed = Some(format!(
                "cycle {i} failed after {:.1?}: {e} (daemon: {:?}, socket exists: {}, fds {})",
                start.elapsed(),
                d.0.exited().map(describe_status),
                sock.exists(),
                d.0.fds()
            ));
            break;
        }
        done += 1;
    }
    let took = start.elapsed();
    let after = settle(&d.0, base);
    eprintln!(
        "{done} of 10,000 full negotiations in {took:.1?}: {:.0} cycles/s",
        f64::from(done) / took.as_secs_f64()
    );
    if let Some(f) = failed {
        eprintln!("{f}");
        eprintln!(
            "usage at the failure: fds {} (baseline {}), threads {} (baseline {})",
            after.fds, base.fds, after.threads, base.threads
        );
        panic!("{f}");
    }
    check_flat("10,000 negotiations", &d.0, base, after);
    fresh_io(&sock, 0).expect("a connection after the churn");
}

#[test]
fn bare_connect_and_close_leaves_nothing_behind() {
    let (_dir, sock, d) = one_device("bare", None);
    for _ in 0..20 {
        drop(UnixStream::connect(&sock).unwrap());
    }
    std::thread::sleep(Duration::from_millis(200));
    let base = baseline(&d.0);
    let start = Instant::now();
    for i in 0..2000 {
        if let Err(e) = raw::connect(&sock, T) {
            panic!(
                "connect {i}: {e} (daemon: {:?}, socket exists: {}, fds {})",
                d.0.exited().map(describe_status),
                sock.exists(),
                d.0.fds()
            );
        }
    }
    eprintln!("2000 bare connections: {:.1?}", start.elapsed());
    let after = settle(&d.0, base);
    check_flat("2000 bare connections", &d.0, base, after);
}

fn low_fd_limit() -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: `lim` is a valid rlimit; setrlimit is async-signal-safe (run between fork and
    // exec).
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn running_out_of_fds_is_transient() {
    let (dir, sock, d) = one_device("emfile", Some(low_fd_limit));
    let start_fds = d.0.fds();
    eprintln!("daemon with RLIMIT_NOFILE 64: {start_fds} fds open at start");
    // Use up the daemon's fds with control clients (it keeps up to 128, more than 64 fds),
    // then try the device: its accept (or the connection's set-up) runs into EMFILE.
    let ctl = dir.0.join("vzram.ctl");
    let mut held = Vec::new();
    while d.0.fds() < 64 && held.len() < 200 {
        match UnixStream::connect(&ctl) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
        // Let the control plane accept it before counting again.
        poll_until(Duration::from_millis(200), || d.0.fds() >= 64);
    }
    eprintln!(
        "{} control clients held, daemon fds {}",
        held.len(),
        d.0.fds()
    );
    for _ in 0..3 {
        assert!(
            Frontend::new().cycle(&sock).is_err(),
            "a connection was served with no fd left"
        );
    }
    let log = d.0.log_text();
    assert!(
        log.contains("cannot accept a connection") || log.contains("cannot set up the connection"),
        "the daemon logged no fd exhaustion:\n{log}"
    );
    assert!(
        sock.exists(),
        "the daemon removed its socket while out of fds"
    );
    drop(held);
    // The control plane closes its ends a moment later; until then the daemon is still out
    // of fds.
    poll_until(Duration::from_secs(10), || d.0.fds() <= start_fds);
    // Then connections one after another: a daemon that leaks per connection runs out here.
    let fe = Frontend::new();
    let mut failed = None;
    for i in 0..200 {
        if let Err(e) = fe.cycle(&sock) {
            failed = Some(format!(
                "cycle {i}: {e} (daemon fds {}, socket exists: {})",
                d.0.fds(),
                sock.exists()
            ));
            break;
        }
    }
    if let Some(f) = &failed {
        eprintln!("{f}");
    }
    if let Some(st) = d.0.exited() {
        panic!("the daemon {}", describe_status(st));
    }
    assert!(sock.exists(), "the daemon removed its socket while running");
    fresh_io(&sock, 0).expect("a fresh connection after fd exhaustion");
    assert!(failed.is_none(), "{}", failed.unwrap());
}
