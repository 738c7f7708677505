//! Claiming a socket path so that no two daemons ever serve, replace or remove the same one.
//!
//! A path is owned by whoever holds an exclusive `flock` on `<path>.lock`, a file beside it.
//! The owner keeps that lock for its whole life; only the owner removes the socket (and then
//! the lock file). Under the lock, an existing path is replaced only if it is a stale socket:
//! a socket that refuses connections. A live socket (some other program listening on it) or
//! any other kind of file (a regular file, a directory, ...) is an error and left alone.
//!
//! Nothing here removes files behind the caller's back: [`ClaimedSocket`] has no `Drop` that
//! deletes anything. Dropping it closes the listener and the lock file, which leaves a stale
//! socket file and an unlocked lock file behind; the next [`claim`] replaces the first and
//! reuses the second. To remove both, call [`ClaimedSocket::release`].
//!
//! A socket may also be given to a group ([`claim_owned`], `--socket-group`): it appears at
//! its path already owned by that group, with its mode, so that a 0660 socket is usable by
//! the group (libvirt's QEMU runs as `libvirt-qemu`, group `kvm`) and nobody else. The lock
//! file stays 0600 and the daemon's own: only vzram takes it.
//!
//! A socket inherited from systemd (socket activation, `crate::systemd`) is wrapped with
//! [`ClaimedSocket::inherited`]: no lock, and releasing it removes nothing (systemd owns the
//! file and keeps listening on it across the daemon's restarts).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{}: in use by another vzram (lock {} held)", path.display(), lock.display())]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("{}: a program is listening on this socket; not replacing it", .0.display())]
    Live(PathBuf),
    #[error("{}: the path exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The lock file that guards `path`: `<path>.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".lock");
    PathBuf::from(s)
}

/// An exclusive `flock` on the lock file of a path, held until this is dropped or released.
#[derive(Debug)]
pub struct PathLock {
    /// The path it guards.
    path: PathBuf,
    /// `<path>.lock`.
    lock_path: PathBuf,
    file: File,
}

impl PathLock {
    /// The path this lock guards (not the lock file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// Removes the lock file, then unlocks it (by closing it). A claimer that opened the file
    /// before it was removed notices that it locked a removed file and tries again.
    pub fn release(self) {
        if let Err(e) = std::fs::remove_file(&self.lock_path) {
            log::warn!("removing {}: {e}", self.lock_path.display());
        }
        drop(self.file);
    }
}

/// Takes the lock of `path` (see the module documentation) without looking at `path` itself:
/// for a socket that something else binds, such as the control socket.
pub fn lock(path: &Path) -> Result<PathLock, SocketError> {
    let lock_path = lock_path(path);
    loop {
        // O_NOFOLLOW: a symbolic link planted at the lock path must not make us create or lock
        // some other file.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(SocketError::Locked {
                    path: path.to_path_buf(),
                    lock: lock_path,
                });
            }
            return Err(io_err(&lock_path)(e));
        }
        // The owner removes the lock file before it unlocks. If that happened between our open
        // and our flock, we hold a lock on a removed file, which guards nothing: start over.
        let held = file.metadata().map_err(io_err(&lock_path))?;
        match std::fs::symlink_metadata(&lock_path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => {
                return Ok(PathLock {
                    path: path.to_path_buf(),
                    lock_path,
                    file,
                });
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&lock_path)(e)),
        }
    }
}

/// Removes `path` if it is a stale socket (one that refuses connections); refuses a live
/// socket or anything that is not a socket. Call it with the path's lock held.
pub fn remove_stale(path: &Path) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(SocketError::Live(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err(path))
            }
            Err(e) => Err(io_err(path)(e)),
        },
        Ok(_) => Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The id of a group given by name (or as a number), for `--socket-group` and friends.
pub fn group_id(name: &str) -> Result<u32, SocketError> {
    let unknown = || SocketError::UnknownGroup(name.to_string());
    let cname = std::ffi::CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value of this plain C struct; getgrnam_r
        // fills it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: a NUL-terminated name, a struct and a
        // buffer of `buf.len()` bytes we own, and the out pointer; the strings it points into
        // live in `buf`, which we do not read.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc == 0 && !found.is_null() {
            return Ok(grp.gr_gid);
        }
        // Not a group name: a numeric id is taken as it is (as chgrp does).
        return name.parse::<u32>().map_err(|_| unknown());
    }
}

/// A socket path this process owns: the listening socket bound to it and the lock on it; or
/// a socket inherited from systemd, which this process only listens on.
#[derive(Debug)]
pub struct ClaimedSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file we bound (device and inode), to remove only that one; `None` for an
    /// inherited socket, which is never removed.
    bound: Option<(u64, u64)>,
    lock: Option<PathLock>,
}

impl ClaimedSocket {
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A listening socket inherited from systemd for `path`: served like a claimed one,
    /// but without a lock, and [`release`](Self::release) leaves its file alone.
    pub fn inherited(listener: UnixListener, path: PathBuf) -> ClaimedSocket {
        ClaimedSocket {
            listener,
            path,
            bound: None,
            lock: None,
        }
    }

    /// Whether the socket was inherited (see [`inherited`](Self::inherited)).
    pub fn is_inherited(&self) -> bool {
        self.bound.is_none()
    }

    /// Removes the socket file (if it is still the one we bound), then the lock file, and
    /// closes both. The only way this module removes anything. An inherited socket is only
    /// closed.
    pub fn release(self) {
        if let Some((dev, ino)) = self.bound
            && let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == dev
            && m.ino() == ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            log::warn!("removing {}: {e}", self.path.display());
        }
        drop(self.listener);
        if let Some(lock) = self.lock {
            lock.release();
        }
    }
}

/// Claims `path` for a listening socket: takes the lock `<path>.lock` (refusing if another
/// process holds it), replaces a stale socket at `path` (refusing a live socket or any other
/// file), and binds a listener there with mode `mode`.
///
/// The socket appears at `path` with its final mode: it is bound under a temporary name in
/// the same directory, chmod-ed, then hard-linked to `path` (which fails rather than replace
/// anything that appeared meanwhile).
pub fn claim(path: &Path, mode: u32) -> Result<ClaimedSocket, SocketError> {
    claim_owned(path, mode, None)
}

/// [`claim`], with the socket given to the group `gid` (when `Some`) before it appears at
/// `path`.
pub fn claim_owned(path: &Path, mode: u32, gid: Option<u32>) -> Result<ClaimedSocket, SocketError> {
    let lock = lock(path)?;
    match bind(path, mode, gid) {
        Ok((listener, dev, ino)) => Ok(ClaimedSocket {
            listener,
            path: path.to_path_buf(),
            bound: Some((dev, ino)),
            lock: Some(lock),
        }),
        Err(e) => {
            // Nothing was bound at `path`: the lock file is ours to remove.
            lock.release();
            Err(e)
        }
    }
}

fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<(UnixListener, u64, u64), SocketError> {
    remove_stale(path)?;
    let name = path.file_name().ok_or_else(|| {
        io_err(path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover of an earlier process with our pid; under our lock nobody else uses it.
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io_err(path))?;
    // The group first, then the mode: chown may clear set-id bits, and the mode is final.
    let placed = std::os::unix::fs::lchown(&tmp, None, gid)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::hard_link(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    let _ = std::fs::remove_file(&tmp);
    let m = placed.map_err(io_err(path))?;
    Ok((listener, m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vzram-sockets-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn claims_a_free_path_with_its_mode_and_release_removes_both_files() {
        let d = dir("free");
        let path = d.join("a.sock");
        let c = claim(&path, 0o660).unwrap();
        assert_eq!(c.path(), path);
        assert_eq!(mode(&path), 0o660);
        assert_eq!(mode(&lock_path(&path)), 0o600);
        // It listens, and no temporary name is left over.
        let _client = UnixStream::connect(&path).unwrap();
        c.listener().accept().unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2);
        c.release();
        assert!(!path.exists() && !lock_path(&path).exists());
        let c = claim(&path, 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        c.release();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_socket_given_to_a_group_has_it_before_it_appears() {
        let d = dir("group");
        let path = d.join("a.sock");
        // A group this process may give files to: any as root, else its own.
        // SAFETY: getegid has no preconditions.
        let own = unsafe { libc::getegid() };
        let gid = if own == 0 {
            group_id("nogroup").or_else(|_| group_id("daemon")).unwrap()
        } else {
            own
        };
        let c = claim_owned(&path, 0o660, Some(gid)).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((m.gid(), mode(&path)), (gid, 0o660));
        // The lock file stays the daemon's.
        assert_eq!(mode(&lock_path(&path)), 0o600);
        c.release();
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("no-such-group-vzram").unwrap_err();
        assert_eq!(e.to_string(), "unknown group \"no-such-group-vzram\"");
        assert!(group_id("a\0b").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let d = dir("stale");
        let path = d.join("a.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err());
        let c = claim(&path, 0o600).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        c.release();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_left_serving() {
        let d = dir("live");
        let path = d.join("a.sock");
        let other = UnixListener::bind(&path).unwrap();
        let e = claim(&path, 0o600).unwrap_err();
        assert!(matches!(e, SocketError::Live(_)), "{e}");
        assert!(e.to_string().contains("listening"), "{e}");
        let _client = UnixStream::connect(&path).unwrap();
        other.accept().unwrap();
        // The failed claim leaves no lock file behind.
        assert!(!lock_path(&path).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_regular_file_is_refused_and_left_in_place() {
        let d = dir("file");
        let path = d.join("a.sock");
        std::fs::write(&path, b"precious").unwrap();
        let e = claim(&path, 0o600).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::create_dir(d.join("dir")).unwrap();
        let e = claim(&d.join("dir"), 0o600).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket(_)), "{e}");
        assert!(d.join("dir").is_dir());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_held_lock_is_refused_and_nothing_is_touched() {
        let d = dir("locked");
        let path = d.join("a.sock");
        let first = claim(&path, 0o600).unwrap();
        let e = claim(&path, 0o600).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: in use by another vzram (lock {}.lock held)",
                path.display(),
                path.display()
            )
        );
        // The first owner still serves on its socket, and its lock file is still there.
        let _client = UnixStream::connect(&path).unwrap();
        first.listener().accept().unwrap();
        assert!(lock_path(&path).exists());
        // A lock alone (as for the control socket) is exclusive too.
        assert!(matches!(lock(&path), Err(SocketError::Locked { .. })));
        first.release();
        let l = lock(&path).unwrap();
        assert_eq!(l.path(), path);
        assert!(matches!(
            claim(&path, 0o600),
            Err(SocketError::Locked { .. })
        ));
        l.release();
        assert!(!lock_path(&path).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropping_a_claim_removes_nothing_and_the_next_claim_takes_over() {
        let d = dir("dropped");
        let path = d.join("a.sock");
        drop(claim(&path, 0o600).unwrap());
        assert!(path.exists() && lock_path(&path).exists());
        let c = claim(&path, 0o600).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        c.release();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_at_the_lock_path_is_not_followed() {
        let d = dir("symlink");
        let path = d.join("a.sock");
        let target = d.join("target");
        std::os::unix::fs::symlink(&target, lock_path(&path)).unwrap();
        assert!(matches!(claim(&path, 0o600), Err(SocketError::Io { .. })));
        assert!(!target.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
