//! The control plane: plain threads with timeouts.
//!
//! - `vzram-control` waits (poll) on the control socket, the SIGTERM/SIGINT signalfd and a stop
//!   eventfd. It accepts clients and calls the daemon's shutdown callback; nothing on it blocks.
//! - `vzram-ctl-conn`, one per client (at most [`ServerConfig::max_connections`]), reads request
//!   lines and answers each in turn (see [`proto`]). A client that sends no complete request
//!   for [`ServerConfig::idle_timeout`], or does not take an answer within
//!   [`ServerConfig::write_timeout`], is closed. When the table is full, a newcomer closes the
//!   connection that has waited longest for a request (one running a command is never
//!   closed), so an operator always gets in.
//! - `vzram-policy` runs the tiering policy (compaction, recompression, writeback; see
//!   [`policy`]) every `interval`, and takes run-time changes from the `policy` command.
//!
//! Commands of different clients run side by side (`stat` answers during a recompression);
//! the maintenance passes (idle, recompress, writeback, compact) take one lock so that they
//! run one at a time. A shutdown signal or [`ControlHandle::stop`] sets a flag that ends a
//! running recompression or writeback within a page. The store's operations are safe beside
//! the vhost-user workers, so nothing here stops guest I/O.
//!
//! Signals: a process-directed signal goes to any thread that does not block it. The daemon
//! calls [`block_shutdown_signals`] in `main` before it starts any thread, so that every
//! thread inherits the mask and SIGTERM/SIGINT reach only the signalfd.

mod conn;
mod dispatch;
mod policy;
pub mod proto;

pub use conn::MAX_LINE;
pub use dispatch::CommandError;
pub use policy::{PolicySetup, PolicyThread};
pub use proto::*;

use dispatch::Context;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

use crate::device::BlkDevice;

/// The control socket's default mode: only the daemon's user may control it.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// A client that sends no complete request for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not take an answer within this long is closed.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// The signals that ask the daemon to shut down.
pub const SHUTDOWN_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: a process is listening on it (is vzram already running?)", .0.display())]
    InUse(PathBuf),
    #[error("control socket {}: the path exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    #[error("control socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("control plane: {what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    #[error("the control thread panicked")]
    Panicked,
    #[error("{0}")]
    Policy(String),
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> ControlError {
    move |source| ControlError::Setup { what, source }
}

fn errno(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// How the control plane is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The control socket's path. An existing socket nobody listens on (left by a crash) is
    /// replaced; a live one or another kind of file is an error.
    pub socket: PathBuf,
    /// The socket file's mode ([`DEFAULT_SOCKET_MODE`], whatever the vhost-user sockets use).
    pub mode: u32,
    /// The tiering policy and where it reads host memory pressure.
    pub policy: PolicySetup,
    /// Take SIGTERM and SIGINT through a signalfd and call the shutdown callback.
    pub handle_signals: bool,
    /// Close a client that sends no complete request for this long ([`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Close a client that does not take an answer within this long
    /// ([`DEFAULT_WRITE_TIMEOUT`]).
    pub write_timeout: Duration,
    /// Clients served at once ([`DEFAULT_MAX_CONNECTIONS`], at least 1).
    pub max_connections: usize,
}

impl ServerConfig {
    /// The defaults: mode 0600, the policy's defaults, signals handled, 128 clients closed
    /// after 10 s without a request.
    pub fn new(socket: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            socket: socket.into(),
            mode: DEFAULT_SOCKET_MODE,
            policy: PolicySetup::default(),
            handle_signals: true,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread. Call it in `main` before any thread is
/// started: threads inherit the mask, so these signals then reach the control plane's signalfd
/// and nothing else.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = vmm_sys_util::signal::create_sigset(&SHUTDOWN_SIGNALS).map_err(errno)?;
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // pthread_sigmask returns the error number rather than setting errno.
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// A signalfd for [`SHUTDOWN_SIGNALS`] (vmm-sys-util 0.15 has none).
fn signalfd() -> io::Result<File> {
    let set = vmm_sys_util::signal::create_sigset(&SHUTDOWN_SIGNALS).map_err(errno)?;
    // SAFETY: `set` is an initialised sigset_t; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The socket file this server made; removed on drop unless someone replaced it since.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            log::warn!("removing control socket {}: {e}", self.path.display());
        }
    }
}

/// Binds the socket with its final mode before anyone can connect: bind a temporary name in
/// the same directory, chmod it, then rename it into place (atomic), so no client ever sees it
/// with the umask's mode.
fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), ControlError> {
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale control socket {}", path.display());
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let name = path.file_name().ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    let m = std::fs::symlink_metadata(path).map_err(err)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: m.dev(),
        ino: m.ino(),
    };
    listener.set_nonblocking(true).map_err(err)?;
    Ok((listener, file))
}

/// One client in the table.
#[derive(Debug)]
struct Client {
    /// A clone of the client's socket, to close it from outside its thread.
    stream: UnixStream,
    /// When it connected or last had a request answered.
    since: Instant,
    /// Running a command: never evicted.
    busy: bool,
    thread: Option<JoinHandle<()>>,
}

/// What the control threads share.
#[derive(Debug)]
struct Shared {
    ctx: Context,
    clients: Mutex<HashMap<u64, Client>>,
    limits: conn::Limits,
    max_connections: usize,
}

const TOO_MANY: &[u8] = b"{\"ok\":false,\"error\":\"too many control connections, all busy\"}\n";
const EVICTED: &[u8] =
    b"{\"ok\":false,\"error\":\"closed to make room for a new control connection\"}\n";

impl Shared {
    /// Closes the client that has waited longest for a request, unless every one is running
    /// a command. Its thread sees EOF and ends.
    fn evict_idlest(&self) -> bool {
        let mut clients = self.clients.lock();
        let Some(id) = clients
            .iter()
            .filter(|(_, c)| !c.busy)
            .min_by_key(|(_, c)| c.since)
            .map(|(&id, _)| id)
        else {
            return false;
        };
        let c = clients.remove(&id).expect("just found");
        drop(clients);
        // Best effort: a client that left its buffer full does not get the reason.
        let _ = conn::send(&c.stream, EVICTED, libc::MSG_DONTWAIT);
        let _ = c.stream.shutdown(Shutdown::Both);
        log::info!("control socket: closed the longest-idle connection for a new one");
        true
    }

    fn mark(&self, id: u64, busy: bool) {
        if let Some(c) = self.clients.lock().get_mut(&id) {
            c.busy = busy;
            c.since = Instant::now();
        }
    }

    /// Takes a new client: a table entry and its thread.
    fn admit(self: &Arc<Self>, stream: UnixStream, id: u64) {
        if self.clients.lock().len() >= self.max_connections && !self.evict_idlest() {
            log::warn!(
                "control socket: {} clients, all busy; refusing one",
                self.max_connections
            );
            let _ = conn::send(&stream, TOO_MANY, libc::MSG_DONTWAIT);
            return;
        }
        let entry = stream
            .set_nonblocking(false)
            .and_then(|()| stream.try_clone());
        let entry = match entry {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control connection: {e}");
                return;
            }
        };
        // In the table before the thread starts, so that its exit always finds its entry.
        self.clients.lock().insert(
            id,
            Client {
                stream: entry,
                since: Instant::now(),
                busy: false,
                thread: None,
            },
        );
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vzram-ctl-conn".into())
            .spawn(move || {
                let _leave = Leave(&shared, id);
                let handle = &mut |line: &[u8]| {
                    shared.mark(id, true);
                    let answer = shared.ctx.handle_line(line);
                    shared.mark(id, false);
                    answer
                };
                if let Err(e) = conn::serve(&stream, shared.limits, handle) {
                    log::debug!("control connection: {e}");
                }
            });
        match spawned {
            Ok(t) => {
                if let Some(c) = self.clients.lock().get_mut(&id) {
                    c.thread = Some(t);
                }
            }
            Err(e) => {
                log::warn!("control connection: no thread: {e}");
                self.clients.lock().remove(&id);
            }
        }
    }
}

/// Takes a client out of the table when its thread ends, even by a panic.
struct Leave<'a>(&'a Shared, u64);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.clients.lock().remove(&self.1);
    }
}

/// The running control plane. Dropping it stops it too.
#[derive(Debug)]
pub struct ControlHandle {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    wake: EventFd,
    tid: libc::pid_t,
    socket: PathBuf,
    // Last: the file goes once the listener (on the acceptor thread) is closed.
    socket_file: Option<SocketFile>,
}

/// The control plane's entry point.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds the control socket and starts the control threads. When this returns, clients
    /// can connect. `on_shutdown` is called for each SIGTERM or SIGINT (so a second signal may,
    /// for instance, force the exit), after a running recompression or writeback has been
    /// told to stop; the control plane keeps serving until [`ControlHandle::stop`].
    pub fn start(
        config: ServerConfig,
        devices: Vec<Arc<BlkDevice>>,
        store: Arc<zram::Store>,
        on_shutdown: impl FnMut() + Send + 'static,
    ) -> Result<ControlHandle, ControlError> {
        let (listener, socket_file) = bind(&config.socket, config.mode)?;
        let signals = if config.handle_signals {
            Some(signalfd().map_err(setup("signalfd"))?)
        } else {
            None
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("eventfd"))?;
        let policy = policy::PolicyThread::start(config.policy, store.clone(), devices.clone())
            .map_err(ControlError::Policy)?;
        let shared = Arc::new(Shared {
            ctx: Context::new(devices, store, policy),
            clients: Mutex::new(HashMap::new()),
            limits: conn::Limits {
                idle: config.idle_timeout,
                write: config.write_timeout,
            },
            max_connections: config.max_connections.max(1),
        });

        let (tid_tx, tid_rx) = mpsc::channel();
        let acceptor = Acceptor {
            listener,
            wake: wake.try_clone().map_err(setup("eventfd"))?,
            signals,
            shared: shared.clone(),
            on_shutdown: Box::new(on_shutdown),
        };
        let handle_signals = config.handle_signals;
        let acceptor = std::thread::Builder::new()
            .name("vzram-control".into())
            .spawn(move || {
                // In case `main` did not block them: then at least signals directed at this
                // thread reach the signalfd (and the client threads it starts inherit the mask).
                if handle_signals && let Err(e) = block_shutdown_signals() {
                    log::warn!("blocking SIGTERM/SIGINT on the control thread: {e}");
                }
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                acceptor.run()
            })
            .map_err(setup("spawning the control thread"))?;
        let tid = tid_rx.recv().map_err(|_| ControlError::Panicked)?;
        let handle = ControlHandle {
            shared,
            acceptor: Some(acceptor),
            wake,
            tid,
            socket: config.socket,
            socket_file: Some(socket_file),
        };
        log::info!("control socket listening on {}", handle.socket.display());
        Ok(handle)
    }
}

/// The `vzram-control` thread's state.
struct Acceptor {
    listener: UnixListener,
    wake: EventFd,
    signals: Option<File>,
    shared: Arc<Shared>,
    on_shutdown: Box<dyn FnMut() + Send>,
}

impl Acceptor {
    fn run(mut self) {
        let fd = |raw| libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        // poll ignores a negative fd.
        let mut fds = [
            fd(self.wake.as_raw_fd()),
            fd(self.signals.as_ref().map_or(-1, |s| s.as_raw_fd())),
            fd(self.listener.as_raw_fd()),
        ];
        let mut next_id = 0u64;
        loop {
            // SAFETY: `fds` is an array of initialised pollfd of the length given, valid for
            // the call; every fd in it is owned by `self` and open.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("control plane poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 {
                self.on_signal();
            }
            if fds[2].revents != 0 {
                self.accept(&mut next_id);
            }
        }
    }

    fn accept(&mut self, next_id: &mut u64) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    *next_id += 1;
                    self.shared.admit(stream, *next_id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of fds, most likely: an idle client gives one back (once its thread
                    // ends). The listener stays readable, so pause rather than spin.
                    log::warn!("control socket accept: {e}");
                    let freed = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                        && self.shared.evict_idlest();
                    let pause = if freed { 10 } else { 100 };
                    std::thread::sleep(Duration::from_millis(pause));
                    return;
                }
            }
        }
    }

    fn on_signal(&mut self) {
        let Some(signals) = &mut self.signals else {
            return;
        };
        // struct signalfd_siginfo: 128 bytes, ssi_signo first.
        let mut info = [0u8; 128];
        loop {
            match signals.read(&mut info) {
                Ok(n) if n == info.len() => {
                    let signo = u32::from_ne_bytes(info[..4].try_into().expect("4 bytes"));
                    let name = match signo as libc::c_int {
                        libc::SIGTERM => "SIGTERM",
                        libc::SIGINT => "SIGINT",
                        _ => "a signal",
                    };
                    log::info!("received {name}: shutting down");
                    self.shared.ctx.cancel.store(true, Relaxed);
                    (self.on_shutdown)();
                }
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("signalfd: {e}");
                    }
                    return;
                }
            }
        }
    }
}

impl ControlHandle {
    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The kernel thread id of the thread that reads the signalfd (to direct a signal at it,
    /// as tests do).
    pub fn thread_id(&self) -> libc::pid_t {
        self.tid
    }

    /// Stops every control thread, closes every connection and removes the socket file. A
    /// recompression or writeback in progress stops within a page (its client gets no answer).
    pub fn stop(mut self) -> Result<(), ControlError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ControlError> {
        let Some(acceptor) = self.acceptor.take() else {
            return Ok(());
        };
        self.shared.ctx.cancel.store(true, Relaxed);
        let woken = self.wake.write(1).map_err(setup("eventfd"));
        let joined = woken.and_then(|()| acceptor.join().map_err(|_| ControlError::Panicked));
        // No new client from here on.
        let clients: Vec<Client> = self.shared.clients.lock().drain().map(|(_, c)| c).collect();
        for c in &clients {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for t in clients.into_iter().filter_map(|c| c.thread) {
            if t.join().is_err() {
                log::warn!("a control connection thread panicked");
            }
        }
        self.shared.ctx.policy.shutdown();
        self.socket_file = None;
        joined
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::warn!("stopping the control plane: {e}");
        }
    }
}
