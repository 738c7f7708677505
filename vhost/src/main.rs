//! `vzram`: serve compressed-RAM swap disks to VMs over vhost-user-blk, and talk to a running
//! daemon.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;
use vzram::DeviceServer;
use vzram::client::ClientCommand;
use vzram::config::{Config, ServeArgs};
use vzram::control::{self, Server};
use vzram::sockets::{self, ClaimedSocket, PathLock};

#[derive(Debug, Parser)]
#[command(
    name = "vzram",
    version,
    about = "Compressed-RAM swap disks for virtual machines (vhost-user-blk)",
    long_about = "vzram serves virtio-blk disks to QEMU or cloud-hypervisor over vhost-user. \
                  Every 4 KiB page the guest swaps out is compressed (lz4 or zstd) into host \
                  memory, like Linux's zram, but on the host: visible, limited and shared \
                  between VMs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one or more devices until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() -> ExitCode {
    // `vzram generate-docs DIR`, for building the package (ci/package): kept out of the clap
    // definitions so that neither `--help`, the man pages nor the completions offer it.
    let argv: Vec<_> = std::env::args_os().skip(1).collect();
    if let [cmd, dir] = &argv[..]
        && cmd == "generate-docs"
    {
        let dir = std::path::Path::new(dir);
        return match generate_docs(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vzram: generate-docs {}: {e}", dir.display());
                ExitCode::from(2)
            }
        };
    }
    let cli: Cli = vzram::config::parse_or_exit("vzram");
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Client(cmd) => match vzram::client::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vzram: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Before any thread starts, so that every thread inherits the mask and only the control
    // thread's signalfd sees SIGTERM/SIGINT.
    if let Err(e) = control::block_shutdown_signals() {
        eprintln!("vzram: cannot block signals: {e}");
        return ExitCode::from(2);
    }
    // Start-up runs in this order so that a failure leaves nothing behind that this process
    // did not create and never touches what another process serves: build the store and
    // devices; claim every device socket; take the control socket's lock; bind the control
    // socket; only then start serving. A failure releases what was claimed and exits with
    // status 2 at once (no server is dropped, so nothing waits on an accept loop).
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => fail(&e, Vec::new(), None),
    };
    // systemd socket activation: the device sockets systemd already listens on.
    let mut inherited = match inherited_sockets(&config) {
        Ok(i) => i,
        Err(e) => fail(&e, Vec::new(), None),
    };
    let built = match config.build() {
        Ok(b) => b,
        Err(e) => fail(&e, Vec::new(), None),
    };
    let mut claimed = Vec::new();
    for (d, inherited) in config.devices.iter().zip(&mut inherited) {
        if let Some(l) = inherited.take() {
            // Its mode and group are the socket unit's (SocketMode=, SocketGroup=).
            log::info!(
                "{}: socket {} inherited from systemd",
                d.name,
                d.socket.display()
            );
            claimed.push(ClaimedSocket::inherited(l.listener, d.socket.clone()));
            continue;
        }
        match sockets::claim_owned(&d.socket, config.socket_mode, d.socket_group) {
            Ok(c) => claimed.push(c),
            Err(e) => fail(&e, claimed, None),
        }
    }
    let control_lock = match sockets::lock(&config.control) {
        Ok(l) => l,
        Err(e) => fail(&format!("control socket {e}"), claimed, None),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let devices = built.devices.iter().map(|(s, _)| s.clone()).collect();
    let control = match Server::start(
        config.control_config(),
        devices,
        built.store.clone(),
        move || {
            let _ = tx.send(());
        },
    ) {
        Ok(c) => c,
        Err(e) => fail(&e, claimed, Some(control_lock)),
    };
    // --control-group: the control thread bound its socket 0600-or-given mode and root's
    // group; hand it to the group before anything announces that vzram is up.
    if let Some(gid) = config.control_group
        && let Err(e) = std::os::unix::fs::lchown(&config.control, None, Some(gid))
    {
        drop(control);
        fail(
            &format!("control socket {}: {e}", config.control.display()),
            claimed,
            Some(control_lock),
        );
    }
    let mut servers = Vec::new();
    for ((served, blk), socket) in built.devices.iter().zip(&claimed) {
        let started = socket
            .listener()
            .try_clone()
            .map_err(|e| format!("{}: {e}", served.socket.display()))
            .and_then(|listener| {
                DeviceServer::start(served.clone(), listener, blk.clone(), config.poll)
                    .map_err(|e| e.to_string())
            });
        match started {
            Ok(s) => {
                log::info!(
                    "{}: {} bytes, {} queues of {}, {} on {}",
                    served.name,
                    blk.size,
                    blk.num_queues,
                    blk.queue_size,
                    config.comp,
                    served.socket.display()
                );
                servers.push(s);
            }
            Err(e) => {
                // Stopping the control thread removes its socket; the device servers already
                // started are left to the exit (stopping them would wait for frontends).
                drop(control);
                fail(&e, claimed, Some(control_lock));
            }
        }
    }
    notify("READY=1");
    let _ = rx.recv();
    log::info!("shutting down");
    notify("STOPPING=1");
    // Remove the sockets so that nobody connects to a daemon that is gone, then their lock
    // files. Inherited sockets stay: systemd keeps them listening for the next start.
    for socket in claimed {
        socket.release();
    }
    let _ = std::fs::remove_file(&config.control);
    control_lock.release();
    if built.store.is_persistent() {
        // The guests' data stays in the state directory for the next daemon. Cut the
        // frontends off and let in-flight requests finish, then drop the last user of the
        // store, which marks the state clean (attaching recovers either way).
        for s in servers {
            s.stop();
        }
        drop(control);
        let store = built.store.clone();
        drop(built);
        if Arc::strong_count(&store) > 1 {
            log::warn!("the store is still in use: the state is left marked in use");
        }
        drop(store);
        std::process::exit(0)
    }
    // Guest data lives only in this process; there is nothing to flush. Exit without waiting
    // for connected frontends to hang up (dropping the servers would).
    std::process::exit(0)
}

/// `vzram generate-docs DIR`: the man pages (DIR/man/*.1) and shell completions
/// (DIR/completions: bash, zsh, fish), made from the clap definitions.
fn generate_docs(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "vzram", &completions)?;
    }
    Ok(())
}

/// The listening sockets systemd passed (socket activation), one entry per device.
fn inherited_sockets(
    config: &Config,
) -> Result<Vec<Option<vzram::systemd::ListenFd>>, vzram::systemd::SystemdError> {
    let devices: Vec<_> = config
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.socket.as_path()))
        .collect();
    vzram::systemd::assign(&devices, vzram::systemd::listen_fds()?)
}

/// Tells systemd (`Type=notify`) about a change of state; a failure is only logged.
fn notify(state: &str) {
    if let Err(e) = vzram::systemd::notify(state) {
        log::warn!("NOTIFY_SOCKET: sending {state}: {e}");
    }
}

/// Start-up failed: one line, release what this process claimed, exit with status 2.
fn fail(
    e: &dyn std::fmt::Display,
    claimed: Vec<ClaimedSocket>,
    control_lock: Option<PathLock>,
) -> ! {
    eprintln!("vzram: {e}");
    for socket in claimed {
        socket.release();
    }
    if let Some(lock) = control_lock {
        lock.release();
    }
    std::process::exit(2)
}
