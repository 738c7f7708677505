//! The real `vzram` binary as a child process: started with a deadline for its sockets,
//! killed by PID when the guard drops (also on panic), and measured through /proc.
//!
//! Included with `#[path]` by the test binaries that use it.
#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vufront::{Frontend, Options, Request};

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vzram-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // VZRAM_KEEP_TMP=1 keeps the directory (and the daemon's log in it) for a look.
        if std::env::var_os("VZRAM_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The daemon child. Shared (`Arc<Mutex<..>>` inside) so a watchdog thread can kill it.
#[derive(Debug, Clone)]
pub struct Daemon {
    child: Arc<Mutex<Option<Child>>>,
    pid: u32,
    pub args: Vec<String>,
    pub log: PathBuf,
}

/// How to start it.
pub type PreExec = fn() -> std::io::Result<()>;

impl Daemon {
    /// Starts `vzram serve ARGS`, stdout and stderr to `log`, and waits until every socket in
    /// `sockets` accepts a connection (at most 10 s).
    pub fn start(args: &[String], log: &Path, sockets: &[PathBuf]) -> Daemon {
        Daemon::start_with(args, log, sockets, None)
    }

    pub fn start_with(
        args: &[String],
        log: &Path,
        sockets: &[PathBuf],
        pre_exec: Option<PreExec>,
    ) -> Daemon {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vzram"));
        cmd.arg("serve")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(f) = pre_exec {
            use std::os::unix::process::CommandExt;
            // SAFETY: `f` only makes async-signal-safe system calls (setrlimit) between fork
            // and exec.
            unsafe { cmd.pre_exec(f) };
        }
        let child = cmd.spawn().expect("start vzram");
        let pid = child.id();
        let d = Daemon {
            child: Arc::new(Mutex::new(Some(child))),
            pid,
            args: args.to_vec(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in sockets {
            while std::os::unix::net::UnixStream::connect(s).is_err() {
                if let Some(st) = d.exited() {
                    panic!("vzram exited at start-up ({st}); log:\n{}", d.log_text());
                }
                assert!(Instant::now() < deadline, "{} never came up", s.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The probe connections above were each accepted and hung up; let them be handled.
        std::thread::sleep(Duration::from_millis(50));
        d
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if it has exited (reaped here), None while it runs.
    pub fn exited(&self) -> Option<ExitStatus> {
        let mut g = self.child.lock().unwrap();
        match g.as_mut() {
            Some(c) => c.try_wait().unwrap(),
            None => Some(ExitStatus::from_raw(0)),
        }
    }

    /// Kills it (SIGKILL to its PID) and reaps it.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Open fds (/proc/PID/fd entries).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What the open fds are (readlink of /proc/PID/fd/*), for failure messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid)) else {
            return Vec::new();
        };
        let mut v: Vec<String> = dir
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        v.sort();
        v
    }

    /// Threads (/proc/PID/task entries).
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Describes an exit status the way a shell would (`exit 1`, `signal 7 (SIGBUS)`).
pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGBUS => "SIGBUS",
                libc::SIGSEGV => "SIGSEGV",
                libc::SIGABRT => "SIGABRT",
                libc::SIGKILL => "SIGKILL",
                libc::SIGPIPE => "SIGPIPE",
                _ => "?",
            };
            format!("killed by signal {s} ({name}, shell status {})", 128 + s)
        }
        _ => format!("{st}"),
    }
}

/// Kills the daemon when dropped (end of test or panic).
#[derive(Debug)]
pub struct KillOnDrop(pub Daemon);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// Polls `f` until it returns true or `wait` passes; returns the last result.
pub fn poll_until(wait: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh well-behaved connection on `sock`: a verified 4 KiB write + read.
pub fn fresh_io(sock: &Path, seed: u64) -> Result<(), String> {
    let opts = Options {
        mem_size: 1 << 20,
        connect_timeout: Duration::from_secs(3),
        reply_timeout: Some(Duration::from_secs(3)),
        ..Options::default()
    };
    let mut dev = Frontend::connect(sock, &opts).map_err(|e| format!("connect: {e}"))?;
    let mut q = dev.take_queue(0).unwrap();
    let page: Vec<u8> = (0..4096u64).map(|i| (i * 13 + seed) as u8).collect();
    let sector = 1024 + (seed % 1024) * 8;
    q.execute(&Request::write(sector, &page), Duration::from_secs(3))
        .and_then(|c| c.check())
        .map_err(|e| format!("write: {e}"))?;
    let c = q
        .execute(&Request::read(sector, 4096), Duration::from_secs(3))
        .and_then(|c| c.check())
        .map_err(|e| format!("read: {e}"))?;
    if c.data != page {
        return Err("read back other data".into());
    }
    Ok(())
}
