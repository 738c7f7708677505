//! Serving one device on its vhost-user socket, one connection after another: each
//! connection gets a fresh backend and `VhostUserDaemon` (new worker threads, new exit events),
//! while the device and its data stay. QEMU's `reconnect=` finds the same disk again.

use crate::backend::BlkBackend;
use crate::blk::BlkGeometry;
use crate::served::Served;
use crate::sockets::{self, ClaimedSocket, SocketError};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("{0}")]
    Claim(#[from] SocketError),
    #[error("cannot start the thread serving {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

/// How long a queue worker polls its ring after a batch by default (QEMU's iothreads poll
/// up to 32 µs too).
pub const DEFAULT_POLL: Duration = Duration::from_micros(32);

/// A device being served: the thread that accepts connections one at a time.
#[derive(Debug)]
pub struct DeviceServer {
    served: Arc<Served>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The socket this server claimed itself ([`DeviceServer::start`]).
    socket: Option<ClaimedSocket>,
}

impl DeviceServer {
    /// Claims the device's socket ([`sockets::claim`]: replacing only a stale socket, under a
    /// lock beside it), sets its mode and starts serving. [`DeviceServer::stop`] releases the
    /// claim (removes the socket and its lock file); dropping the server only closes them.
    /// `poll`: how long a queue worker watches its ring for more requests before it sleeps.
    pub fn start(
        served: Arc<Served>,
        blk: BlkGeometry,
        mode: u32,
        poll: Duration,
    ) -> Result<DeviceServer, DaemonError> {
        let socket = sockets::claim(&served.socket, mode)?;
        match Self::start_claimed(served, blk, &socket, poll) {
            Ok(mut s) => {
                s.socket = Some(socket);
                Ok(s)
            }
            Err(e) => {
                socket.release();
                Err(e)
            }
        }
    }

    /// Starts serving on a socket the caller has claimed, and keeps holding (and releases
    /// when it is done with it): the server accepts on a duplicate of its listener.
    pub fn start_claimed(
        served: Arc<Served>,
        blk: BlkGeometry,
        socket: &ClaimedSocket,
        poll: Duration,
    ) -> Result<DeviceServer, DaemonError> {
        let path = served.socket.clone();
        let listener = socket
            .listener()
            .try_clone()
            .map(Listener::from)
            .map_err(|source| DaemonError::Listen {
                path: path.clone(),
                source: vhost::vhost_user::Error::SocketError(source),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("{}-accept", served.name))
                .spawn(move || accept_loop(listener, served, blk, poll, stop))
                .map_err(|source| DaemonError::Thread { path, source })?
        };
        Ok(DeviceServer {
            served,
            stop,
            thread: Some(thread),
            socket: None,
        })
    }

    pub fn served(&self) -> &Arc<Served> {
        &self.served
    }

    /// Stops accepting, waits for the current connection to end and removes the socket (and
    /// its lock file) if this server claimed it. A connected frontend is not cut off: call
    /// this when its VM is gone or on shutdown.
    pub fn stop(mut self) {
        self.stop_and_join();
        if let Some(socket) = self.socket.take() {
            socket.release();
        }
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // The accept loop blocks in accept(); a connection of our own wakes it.
            let _ = UnixStream::connect(&self.served.socket);
            let _ = thread.join();
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn accept_loop(
    mut listener: Listener,
    served: Arc<Served>,
    blk: BlkGeometry,
    poll: Duration,
    stop: Arc<AtomicBool>,
) {
    let name = served.name.clone();
    while !stop.load(Ordering::SeqCst) {
        let backend = Arc::new(BlkBackend::new(served.clone(), blk.clone(), poll));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("{name}: cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            log::error!("{name}: accepting a connection failed: {e}");
            // Accept errors such as EMFILE are usually transient; do not spin on them.
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            // The connection was our own wake-up call. End its handler thread, so that
            // dropping the daemon (below) ends this connection's workers before stop returns.
            daemon.request_shutdown();
            let _ = daemon.wait();
            break;
        }
        let n = served.connections.fetch_add(1, Ordering::Relaxed) + 1;
        served.connected.store(true, Ordering::Relaxed);
        log::info!(
            "{name}: frontend connected on {} (connection {n})",
            served.socket.display()
        );
        match daemon.wait() {
            // A VM that exits or is killed just hangs up.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("{name}: frontend disconnected"),
            Err(e) => log::warn!("{name}: connection ended: {e}"),
        }
        served.connected.store(false, Ordering::Relaxed);
        // Dropping the daemon ends this connection's worker threads before the next accept.
        drop(daemon);
    }
}

/// The default control socket: `vzram.ctl` beside the first device socket.
pub fn default_control_path(first_socket: &Path) -> PathBuf {
    first_socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("vzram.ctl")
}
