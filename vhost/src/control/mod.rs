//! The control plane: one thread, one event loop (event-manager) over
//!
//! - the control socket (a Unix stream socket speaking JSON lines, see [`proto`]) and every
//!   client connection on it,
//! - a timer that compacts the pool when enough pages would be freed,
//! - a signalfd for SIGTERM and SIGINT, which calls the daemon's shutdown callback,
//! - an eventfd that [`ControlHandle::stop`] uses to end the loop.
//!
//! Commands run on this thread, one at a time. Recompression and writeback of a large device
//! can take a while; other clients and signals wait meanwhile (the client's timeout is
//! generous). The store's operations are safe beside the vhost-user workers, so nothing here
//! stops guest I/O.
//!
//! Signals: a process-directed signal goes to any thread that does not block it. The daemon
//! calls [`block_shutdown_signals`] in `main` before it starts any thread, so that every
//! thread inherits the mask and SIGTERM/SIGINT reach only the signalfd.

mod commands;
mod conn;
pub mod proto;

pub use commands::CommandError;
pub use conn::MAX_LINE;
pub use proto::*;

use commands::Context;
use conn::{Conn, Next};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::served::Served;

/// The control socket's default mode: only the daemon's user may control it.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// How often the pool is checked for pages compaction could free.
pub const DEFAULT_COMPACT_INTERVAL: Duration = Duration::from_secs(5);
/// Compact when at least this many pages (4 MiB) would be freed.
pub const DEFAULT_COMPACT_THRESHOLD_PAGES: usize = 1024;
/// The signals that ask the daemon to shut down.
pub const SHUTDOWN_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];
/// Connections beyond this many are answered with an error and closed.
const MAX_CONNECTIONS: usize = 128;

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
    #[error("control plane event loop: {0}")]
    EventLoop(#[from] event_manager::Error),
    #[error("the control thread panicked")]
    Panicked,
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
    /// The socket file's mode ([`DEFAULT_SOCKET_MODE`]).
    pub mode: u32,
    /// How often to check whether background compaction is due; `None`: never.
    pub compact_interval: Option<Duration>,
    /// Compact when the pool's freeable pages reach this (at least 1).
    pub compact_threshold_pages: usize,
    /// Take SIGTERM and SIGINT through a signalfd and call the shutdown callback.
    pub handle_signals: bool,
}

impl ServerConfig {
    /// The defaults: mode 0600, compaction checked every 5 s at a threshold of 1024 pages,
    /// signals handled.
    pub fn new(socket: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            socket: socket.into(),
            mode: DEFAULT_SOCKET_MODE,
            compact_interval: Some(DEFAULT_COMPACT_INTERVAL),
            compact_threshold_pages: DEFAULT_COMPACT_THRESHOLD_PAGES,
            handle_signals: true,
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

/// The control plane's event subscriber: owns every fd the loop watches.
pub struct Server {
    listener: UnixListener,
    conns: HashMap<RawFd, Conn>,
    ctx: Context,
    timer: Option<TimerFd>,
    compact_threshold: usize,
    signals: Option<File>,
    stop: EventFd,
    on_shutdown: Box<dyn FnMut() + Send>,
    stopped: bool,
    init_error: Option<event_manager::Error>,
    // Last: the socket file goes after the listener is closed.
    socket_file: SocketFile,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("socket", &self.socket_file.path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// The running control plane. Dropping it stops the thread too.
#[derive(Debug)]
pub struct ControlHandle {
    thread: Option<JoinHandle<Result<(), ControlError>>>,
    stop: EventFd,
    tid: libc::pid_t,
    socket: PathBuf,
}

impl Server {
    /// Binds the control socket and starts the control thread. When this returns, clients can
    /// connect. `on_shutdown` is called on the control thread for each SIGTERM or SIGINT (so a
    /// second signal may, for instance, force the exit); the control plane keeps serving until
    /// [`ControlHandle::stop`].
    pub fn start(
        config: ServerConfig,
        devices: Vec<Arc<Served>>,
        store: Arc<zram::Store>,
        on_shutdown: impl FnMut() + Send + 'static,
    ) -> Result<ControlHandle, ControlError> {
        let (listener, socket_file) = bind(&config.socket, config.mode)?;
        let timer = match config.compact_interval {
            None => None,
            Some(interval) => {
                // A zero interval would disarm the timer.
                let interval = interval.max(Duration::from_millis(1));
                let mut timer = TimerFd::new().map_err(errno).map_err(setup("timerfd"))?;
                timer
                    .reset(interval, Some(interval))
                    .map_err(errno)
                    .map_err(setup("timerfd"))?;
                Some(timer)
            }
        };
        let signals = if config.handle_signals {
            Some(signalfd().map_err(setup("signalfd"))?)
        } else {
            None
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        let server = Server {
            listener,
            conns: HashMap::new(),
            ctx: Context { devices, store },
            timer,
            compact_threshold: config.compact_threshold_pages.max(1),
            signals,
            stop: stop.try_clone().map_err(setup("eventfd"))?,
            on_shutdown: Box::new(on_shutdown),
            stopped: false,
            init_error: None,
            socket_file,
        };
        let mut em = EventManager::new()?;
        let id = em.add_subscriber(server);
        if let Some(e) = em.subscriber_mut(id)?.init_error.take() {
            return Err(e.into());
        }

        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle_signals = config.handle_signals;
        let thread = std::thread::Builder::new()
            .name("vzram-control".into())
            .spawn(move || {
                // In case `main` did not block them: then at least signals directed at this
                // thread reach the signalfd.
                if handle_signals && let Err(e) = block_shutdown_signals() {
                    log::warn!("blocking SIGTERM/SIGINT on the control thread: {e}");
                }
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                run(em, id)
            })
            .map_err(setup("spawning the control thread"))?;
        let tid = tid_rx.recv().map_err(|_| ControlError::Panicked)?;
        log::info!("control socket listening on {}", config.socket.display());
        Ok(ControlHandle {
            thread: Some(thread),
            stop,
            tid,
            socket: config.socket,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of fds, most likely. The listener stays readable, so pause rather
                    // than spin.
                    log::warn!("control socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("control socket: more than {MAX_CONNECTIONS} clients; refusing one");
                // Best effort: a fresh socket's buffer takes this short line at once.
                let _ = conn::send(
                    &stream,
                    b"{\"ok\":false,\"error\":\"too many control connections\"}\n",
                );
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("control connection: {e}");
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                log::warn!("control connection: {e}");
                continue;
            }
            self.conns.insert(fd, Conn::new(stream));
        }
    }

    fn on_conn(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let ctx = &self.ctx;
        let next = drive(conn, set, &mut |line| ctx.handle_line(line)).unwrap_or_else(|e| {
            log::debug!("control connection: {e}");
            Next::Close
        });
        if next == conn.interest {
            return;
        }
        let events = match next {
            Next::Read => EventSet::IN,
            Next::Write => EventSet::OUT,
            Next::Close => {
                // Out of the epoll set before the fd is closed (dropped).
                let _ = ops.remove(Events::empty_raw(fd));
                self.conns.remove(&fd);
                return;
            }
        };
        if let Err(e) = ops.modify(Events::new_raw(fd, events)) {
            log::warn!("control connection: {e}");
            let _ = ops.remove(Events::empty_raw(fd));
            self.conns.remove(&fd);
            return;
        }
        conn.interest = next;
    }

    fn on_timer(&mut self) {
        if let Some(timer) = &mut self.timer {
            // Readable means expired: this read does not block.
            let _ = timer.wait();
        }
        let pool = self.ctx.store.pool();
        let freeable = pool.freeable_pages();
        if freeable >= self.compact_threshold {
            let freed = self.ctx.store.compact();
            log::info!("background compaction: {freed} pages freed ({freeable} were freeable)");
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

/// Reads (if the connection waits to read and the event says so), answers, sends.
fn drive(
    conn: &mut Conn,
    set: EventSet,
    handle: &mut dyn FnMut(&[u8]) -> Vec<u8>,
) -> io::Result<Next> {
    if conn.interest == Next::Read
        && set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
    {
        conn.read_once()?;
    }
    conn.pump(handle)
}

impl MutEventSubscriber for Server {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.listener.as_raw_fd(), self.stop.as_raw_fd()];
        fds.extend(self.timer.as_ref().map(|t| t.as_raw_fd()));
        fds.extend(self.signals.as_ref().map(|s| s.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                self.init_error.get_or_insert(e);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.stopped = true;
        } else if self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == fd) {
            self.on_timer();
        } else if self.signals.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            self.on_signal();
        } else {
            self.on_conn(fd, events.event_set(), ops);
        }
    }
}

fn run(mut em: EventManager<Server>, id: event_manager::SubscriberId) -> Result<(), ControlError> {
    loop {
        if let Err(e) = em.run() {
            log::error!("control plane event loop: {e}");
            return Err(e.into());
        }
        if em.subscriber_mut(id)?.stopped {
            return Ok(());
        }
    }
}

impl ControlHandle {
    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The control thread's kernel thread id (to direct a signal at it, as tests do).
    pub fn thread_id(&self) -> libc::pid_t {
        self.tid
    }

    /// Stops the control thread, closes every connection and removes the socket file. A
    /// command in progress finishes first.
    pub fn stop(mut self) -> Result<(), ControlError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ControlError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.write(1).map_err(setup("eventfd"))?;
        thread.join().map_err(|_| ControlError::Panicked)?
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::warn!("stopping the control plane: {e}");
        }
    }
}
