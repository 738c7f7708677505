//! systemd without libsystemd: socket activation and readiness, two small protocols.
//!
//! **Socket activation** (sd_listen_fds(3)). systemd (or `systemd-socket-activate`) binds the
//! sockets of a `.socket` unit itself, keeps them listening while the service is stopped or
//! restarting (a connecting QEMU waits in the backlog), and starts the service with them open
//! as file descriptors 3, 4, ... and three variables:
//! - `LISTEN_PID`: the pid the fds are meant for; anything else (a child that inherited the
//!   environment) ignores them;
//! - `LISTEN_FDS`: how many fds, starting at 3 (`SD_LISTEN_FDS_START`);
//! - `LISTEN_FDNAMES` (optional): their names, `:`-separated (`FileDescriptorName=`, or the
//!   socket unit's name).
//!
//! vzram takes each fd once ([`listen_fds`]), marks it close-on-exec, and checks that it is a
//! listening unix stream socket. [`assign`] then gives each one to the device whose socket
//! path it is bound to (getsockname), or else whose name it carries; an fd that is not such a
//! socket or matches no device is a start-up error. A device with no inherited socket binds
//! its own as usual. An inherited socket is never removed by vzram: systemd owns it.
//!
//! **Readiness** (sd_notify(3), `Type=notify`): a datagram such as `READY=1` sent to the unix
//! socket named by `NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract name. vzram
//! sends `READY=1` once every device socket listens and the control socket is up, and
//! `STOPPING=1` when it starts shutting down ([`notify`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first inherited fd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("socket activation: {var}={value:?}: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("socket activation: inherited fd {fd}{}: {why}", name_suffix(.name))]
    NotAListener {
        fd: RawFd,
        name: Option<String>,
        why: String,
    },
    #[error(
        "socket activation: inherited socket {what} matches no device (give a device that socket \
         path, or name= the socket's FileDescriptorName=; vzram binds its control socket itself)"
    )]
    NoDevice { what: String },
    #[error("socket activation: inherited sockets {first} and {second} both match device {device}")]
    TwoForOneDevice {
        device: String,
        first: String,
        second: String,
    },
}

fn name_suffix(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
}

/// A listening socket handed over by systemd.
#[derive(Debug)]
pub struct ListenFd {
    /// The fd number it came as (for messages).
    pub fd: RawFd,
    /// Its `LISTEN_FDNAMES` entry, if given.
    pub name: Option<String>,
    /// The path it is bound to (None: unnamed or abstract).
    pub path: Option<PathBuf>,
    pub listener: UnixListener,
}

impl ListenFd {
    /// How messages name it: its path, else its fd (and name).
    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("{} (fd {})", p.display(), self.fd),
            None => format!("fd {}{}", self.fd, name_suffix(&self.name)),
        }
    }
}

/// Reads the protocol's variables (given as they are in the environment) for the process
/// `own_pid`: the fds and their names, or nothing when the fds are not meant for it.
pub fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, SystemdError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let bad = |var, value: &str, why| SystemdError::Env {
        var,
        value: value.to_string(),
        why,
    };
    let pid: u32 = pid
        .parse()
        .map_err(|_| bad("LISTEN_PID", pid, "not a pid"))?;
    if pid != own_pid {
        // Meant for another process (we inherited the environment): not ours to take.
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| bad("LISTEN_FDS", fds, "not a number of fds (0..=1024)"))?;
    let names: Vec<Option<String>> = match names {
        None => vec![None; n as usize],
        Some(s) => {
            let v: Vec<_> = s
                .split(':')
                .map(|x| (!x.is_empty()).then(|| x.to_string()))
                .collect();
            if v.len() != n as usize {
                return Err(bad(
                    "LISTEN_FDNAMES",
                    s,
                    "not one name for each of LISTEN_FDS",
                ));
            }
            v
        }
    };
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + n)
        .zip(names)
        .collect())
}

/// Takes the listening sockets systemd passed to this process (see the module
/// documentation); empty when it was not socket-activated. The fds are taken once: a second
/// call returns nothing.
pub fn listen_fds() -> Result<Vec<ListenFd>, SystemdError> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let var = |name| std::env::var(name).ok();
    let fds = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    if fds.is_empty() || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut err = None;
    for (fd, name) in fds {
        // Every fd is taken (and so closed if refused), also after an error.
        match take(fd) {
            Ok(owned) => match listener(&owned) {
                Ok(()) => {
                    let listener = UnixListener::from(owned);
                    let path = listener
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                    out.push(ListenFd {
                        fd,
                        name,
                        path,
                        listener,
                    });
                }
                Err(why) => {
                    err.get_or_insert(SystemdError::NotAListener { fd, name, why });
                }
            },
            Err(why) => {
                err.get_or_insert(SystemdError::NotAListener { fd, name, why });
            }
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Owns inherited fd `fd`, close-on-exec.
fn take(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: fcntl on an fd number; no memory is involved. It fails with EBADF if the fd is
    // not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(format!(
            "LISTEN_FDS names it but it is not open ({})",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: the fd is open (above) and the socket-activation protocol hands fds
    // 3..3+LISTEN_FDS to this process; `listen_fds` takes them once (TAKEN), so nothing else
    // in this process owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that `fd` is a listening unix stream socket.
fn listener(fd: &OwnedFd) -> Result<(), String> {
    let opt = |level, name| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, an int we own.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw mut v).cast::<libc::c_void>(),
                &mut len,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOTSOCK) {
                "not a socket".to_string()
            } else {
                format!("getsockopt: {e}")
            });
        }
        Ok(v)
    };
    if opt(libc::SOL_SOCKET, libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err("not a unix socket".into());
    }
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket (ListenStream=)".into());
    }
    if opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 0 {
        return Err("a unix socket that is not listening".into());
    }
    Ok(())
}

/// Gives each inherited socket to its device: `devices` are (name, socket path); the result
/// has one entry per device, `Some` where a socket was inherited for it. A socket bound to a
/// device's path goes to that device; else one whose `LISTEN_FDNAMES` name is a device's
/// name. A socket matching no device, or two matching one, is an error.
pub fn assign(
    devices: &[(&str, &Path)],
    inherited: Vec<ListenFd>,
) -> Result<Vec<Option<ListenFd>>, SystemdError> {
    let mut out: Vec<Option<ListenFd>> = devices.iter().map(|_| None).collect();
    for l in inherited {
        let by_path = l
            .path
            .as_deref()
            .and_then(|p| devices.iter().position(|(_, d)| same_path(p, d)));
        let by_name = || {
            l.name
                .as_deref()
                .and_then(|n| devices.iter().position(|(name, _)| *name == n))
        };
        let Some(i) = by_path.or_else(by_name) else {
            return Err(SystemdError::NoDevice { what: l.describe() });
        };
        if let Some(first) = &out[i] {
            return Err(SystemdError::TwoForOneDevice {
                device: devices[i].0.to_string(),
                first: first.describe(),
                second: l.describe(),
            });
        }
        out[i] = Some(l);
    }
    Ok(out)
}

/// Whether two socket paths name the same file: equal, or the same once made absolute.
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

/// Sends `state` (such as `READY=1`) to systemd's notification socket. Returns whether there
/// was one (`NOTIFY_SOCKET` set); without it there is nothing to tell.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &target)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_read_for_this_process_only() {
        assert!(parse_listen_env(None, None, None, 7).unwrap().is_empty());
        assert!(
            parse_listen_env(Some("8"), Some("2"), None, 7)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("vz0:"), 7).unwrap(),
            [(3, Some("vz0".to_string())), (4, None)]
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("1"), None, 7).unwrap(),
            [(3, None)]
        );
        for (pid, fds, names, needle) in [
            ("x", "1", None, "LISTEN_PID=\"x\": not a pid"),
            ("7", "-1", None, "LISTEN_FDS=\"-1\""),
            ("7", "2", Some("a"), "LISTEN_FDNAMES=\"a\": not one name"),
        ] {
            let e = parse_listen_env(Some(pid), Some(fds), names, 7).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    fn listen(path: &Path, name: Option<&str>) -> ListenFd {
        let listener = UnixListener::bind(path).unwrap();
        ListenFd {
            fd: listener.as_raw_fd(),
            name: name.map(str::to_string),
            path: Some(path.to_path_buf()),
            listener,
        }
    }

    #[test]
    fn sockets_go_to_devices_by_path_then_by_name() {
        let d = std::env::temp_dir().join(format!("vzram-systemd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b, c) = (d.join("a.sock"), d.join("b.sock"), d.join("c.sock"));
        let devices = [("vz0", a.as_path()), ("vm1", b.as_path()), ("vz2", &*c)];
        let got = assign(
            &devices,
            vec![
                listen(&a, Some("vzram.socket")),
                listen(&d.join("x"), Some("vm1")),
            ],
        )
        .unwrap();
        assert_eq!(got[0].as_ref().unwrap().path.as_deref(), Some(a.as_path()));
        assert_eq!(got[1].as_ref().unwrap().name.as_deref(), Some("vm1"));
        assert!(got[2].is_none());
        let e = assign(&devices, vec![listen(&d.join("y"), None)]).unwrap_err();
        assert!(e.to_string().contains("y (fd "), "{e}");
        assert!(e.to_string().contains("matches no device"), "{e}");
        let e = assign(
            &devices,
            vec![listen(&c, None), listen(&d.join("z"), Some("vz2"))],
        )
        .unwrap_err();
        assert!(e.to_string().contains("both match device vz2"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
