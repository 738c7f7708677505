//! Serving one device on its vhost-user socket, one connection after another. Each
//! connection gets its own protocol state, guest memory and queue workers
//! (`connection.rs`); the device and its data stay, so QEMU's `reconnect=` finds the
//! same disk again.
//!
//! The accept loop never gives up while the daemon runs: an accept error (out of fds, say) is
//! logged and retried after a pause, and the socket file is left alone. A connection ends when
//! its frontend hangs up, sends something that cannot be answered, or its guest memory
//! vanishes; its workers finish the request they serve and exit, and every fd and mapping of
//! the connection is released before the next connection is accepted.

use crate::blk::ConfigSpace;
use crate::connection::Connection;
use crate::device::BlkDevice;
use crate::ratelimit::RateLimitedLog;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot serve {path}: {source}")]
    Setup { path: PathBuf, source: io::Error },
}

/// How long a queue worker polls its ring after a batch by default (QEMU's iothreads poll
/// up to 32 µs too).
pub const DEFAULT_POLL: Duration = Duration::from_micros(32);

/// The longest pause after a failed accept (they double from 10 ms).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A device being served: the thread that accepts connections one at a time.
#[derive(Debug)]
pub struct DeviceServer {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

/// How the accept thread is told to stop, and how it cuts off the connection it serves.
#[derive(Debug)]
struct Stop {
    requested: AtomicBool,
    wake: EventFd,
    current: Mutex<Option<UnixStream>>,
}

impl DeviceServer {
    /// Serves the device on `listener` (bound by the caller, see [`crate::sockets`]).
    /// `poll`: how long a queue worker watches its ring for more requests before it sleeps.
    pub fn start(
        served: Arc<BlkDevice>,
        listener: UnixListener,
        blk: ConfigSpace,
        poll: Duration,
    ) -> Result<DeviceServer, DaemonError> {
        let path = served.socket.clone();
        let setup = |source| DaemonError::Setup {
            path: path.clone(),
            source,
        };
        crate::fault::install().map_err(setup)?;
        listener.set_nonblocking(true).map_err(setup)?;
        let stop = Arc::new(Stop {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(setup)?,
            current: Mutex::new(None),
        });
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("{}-accept", served.name))
                .spawn(move || accept_loop(&listener, &served, &blk, poll, &stop))
                .map_err(setup)?
        };
        Ok(DeviceServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, cuts off the connected frontend (its workers finish the requests they
    /// serve) and waits for the device's threads to end. The socket file stays: removing it
    /// is up to whoever bound it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.requested.store(true, Ordering::SeqCst);
            let _ = self.stop.wake.write(1);
            if let Some(conn) = &*self.stop.current.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
            let _ = thread.join();
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Waits until the listener (if given) is readable or a stop is requested; `timeout` in ms
/// (-1: none). True if a stop was requested.
fn wait(listener: Option<&UnixListener>, stop: &Stop, timeout: i32) -> bool {
    let mut fds = [
        libc::pollfd {
            // poll ignores a negative fd.
            fd: listener.map_or(-1, |l| l.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfd entries. Errors (EINTR) just mean "look again".
    unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
    stop.requested.load(Ordering::SeqCst)
}

fn accept_loop(
    listener: &UnixListener,
    served: &Arc<BlkDevice>,
    blk: &ConfigSpace,
    poll: Duration,
    stop: &Stop,
) {
    let name = &served.name;
    let mut backoff = Duration::ZERO;
    let mut errors = RateLimitedLog::new();
    loop {
        // While backing off, wake only for a stop.
        let (listen, timeout) = match backoff.as_millis() {
            0 => (Some(listener), -1),
            ms => (None, ms as i32),
        };
        if wait(listen, stop, timeout) {
            return;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                backoff = Duration::ZERO;
                continue;
            }
            Err(e) => {
                // Out of fds or memory: the pending connection stays in the backlog; try
                // again after a pause rather than spin or give up.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                errors.warn(format_args!(
                    "{name}: cannot accept a connection: {e}; retrying"
                ));
                continue;
            }
        };
        backoff = Duration::ZERO;
        let n = served.connections.fetch_add(1, Ordering::Relaxed) + 1;
        log::info!(
            "{name}: frontend connected on {} (connection {n})",
            served.socket.display()
        );
        match serve_connection(stream, served, blk, poll, stop) {
            Ok(()) => log::info!("{name}: frontend disconnected"),
            Err(e) => log::warn!("{name}: connection ended: {e}"),
        }
        if stop.requested.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Runs one connection until it ends; everything it holds is released when this returns.
fn serve_connection(
    stream: UnixStream,
    served: &Arc<BlkDevice>,
    blk: &ConfigSpace,
    poll: Duration,
    stop: &Stop,
) -> Result<(), String> {
    let setup = |e: io::Error| format!("cannot set up the connection: {e}");
    stream.set_nonblocking(false).map_err(setup)?;
    let conn = Arc::new(Mutex::new(
        Connection::new(
            served.clone(),
            blk.clone(),
            poll,
            stream.try_clone().map_err(setup)?,
        )
        .map_err(setup)?,
    ));
    *stop.current.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(stream.try_clone().map_err(setup)?);
    // A stop requested before `current` was set would not have cut this connection off.
    if stop.requested.load(Ordering::SeqCst) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    served.connected.store(true, Ordering::Relaxed);
    let mut handler = BackendReqHandler::from_stream(stream, conn.clone());
    let result = loop {
        match handler.handle_request() {
            Ok(()) => {
                if conn.lock().unwrap_or_else(|e| e.into_inner()).closing() {
                    break Err("closed by the daemon after a refused message".to_string());
                }
            }
            // A VM that exits or is killed just hangs up.
            Err(VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_)) => {
                break Ok(());
            }
            Err(e) => {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                // Our own refusals were answered (with REPLY_ACK) and changed nothing: go on.
                if !conn.take_refused() || conn.closing() {
                    break Err(e.to_string());
                }
            }
        }
    };
    served.connected.store(false, Ordering::Relaxed);
    *stop.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    // Closes the socket, then stops the workers and unmaps guest memory (Connection's drop).
    drop(handler);
    drop(conn);
    result
}
