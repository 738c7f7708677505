//! Child processes that cannot outlive the test, and a temporary folder per run.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A child process that is stopped (by its PID) when dropped.
///
/// Stopping sends SIGTERM, waits up to `grace`, then SIGKILL, and always reaps the child. The
/// child also gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the test even when the test
/// process itself is killed (a CI timeout), where no destructor runs. Linux delivers that
/// signal when the *thread* that spawned the child exits: create and drop a `Proc` on the same
/// thread (each libtest case runs on a thread of its own, which is what we want).
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd`; `name` is for messages; `grace` is how long SIGTERM gets before SIGKILL
    /// (zero: SIGKILL at once). The child is killed when the *thread* that spawned it ends
    /// (PR_SET_PDEATHSIG), so that no child outlives a test: spawn from a thread that lives as
    /// long as the child should.
    pub fn spawn(mut cmd: Command, name: &str, grace: Duration) -> io::Result<Proc> {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only prctl and
        // getppid, which are async-signal-safe; it touches no memory shared with other threads.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            grace,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for taking its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Stops the child (SIGTERM, `grace`, SIGKILL) and reaps it; returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        if !self.grace.is_zero() {
            // The child is not reaped yet (try_wait said so), so the PID is still ours.
            // SAFETY: kill(2) on our own unreaped child's PID; no memory is involved.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            if let Some(s) = self.wait_timeout(self.grace) {
                return Some(s);
            }
            eprintln!(
                "{} (pid {}) ignored SIGTERM for {:?}; killing it",
                self.name,
                self.pid(),
                self.grace
            );
        }
        // Child::kill sends SIGKILL to the PID; std refuses if the child was already reaped.
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cmd` as one line for people to read (and paste into a shell: arguments with spaces or
/// quotes are single-quoted).
pub fn command_line(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:@%+".contains(&b))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A folder for one run's sockets, disk files and logs, removed when the last clone is dropped.
///
/// Backends and guests keep a clone, so the folder (and the sockets in it) cannot vanish under
/// a process that still uses it, whatever order things are dropped in.
///
/// It lives on /dev/shm: a backend's disk file there is in RAM, like vzram's store, and
/// nothing of a run touches the real disk. Set `VZRAM_GUEST_KEEP=1` to keep it for a post
/// mortem (its path is printed).
#[derive(Clone, Debug)]
pub struct RunDir {
    inner: Arc<DirGuard>,
}

#[derive(Debug)]
struct DirGuard {
    path: PathBuf,
}

impl RunDir {
    /// Creates `/dev/shm/vzram-guest-<pid>-<n>-<name>` (`$VZRAM_GUEST_TMP` instead of /dev/shm).
    pub fn new(name: &str) -> io::Result<RunDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("VZRAM_GUEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm"));
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let path = base.join(format!(
            "vzram-guest-{}-{}-{clean}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(RunDir {
            inner: Arc::new(DirGuard { path }),
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A path inside the folder.
    pub fn join(&self, name: &str) -> PathBuf {
        self.inner.path.join(name)
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if std::env::var_os("VZRAM_GUEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-m", "128M", "-append", "console=ttyS0 quiet", "it's"]);
        assert_eq!(
            command_line(&cmd),
            r"qemu-system-x86_64 -m 128M -append 'console=ttyS0 quiet' 'it'\''s'"
        );
    }

    #[test]
    fn drop_kills_a_process_that_ignores_sigterm() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 60"]);
        let p = Proc::spawn(cmd, "stubborn sh", Duration::from_millis(200)).unwrap();
        let pid = p.pid();
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() < Duration::from_secs(10));
        // Reaped and gone: signal 0 finds no such process.
        // SAFETY: kill with signal 0 only checks for existence.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        assert_eq!(r, -1, "pid {pid} still exists");
    }

    #[test]
    fn stop_reports_a_clean_exit_on_sigterm() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let mut p = Proc::spawn(cmd, "sleep", Duration::from_secs(5)).unwrap();
        let s = p.stop().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(s.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn run_dir_is_removed() {
        let d = RunDir::new("unit test/with odd name").unwrap();
        let p = d.path().to_path_buf();
        fs::write(d.join("f"), b"x").unwrap();
        assert!(
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("unit-test-with-odd-name")
        );
        let clone = d.clone();
        drop(d);
        assert!(p.exists(), "removed while a clone lives");
        drop(clone);
        assert!(!p.exists());
    }
}
