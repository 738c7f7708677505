//! `vzram`: serve compressed-RAM swap disks to VMs over vhost-user-blk, and talk to a running
//! daemon.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use vzram::cli::ServeArgs;
use vzram::daemon::{DeviceServer, default_control_path};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Block the shutdown signals before any thread starts, so every thread inherits the mask
    // and this thread alone receives them in sigwait below.
    let signals = shutdown_signals();
    // SAFETY: `signals` is an initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        eprintln!(
            "vzram: cannot block signals: {}",
            std::io::Error::from_raw_os_error(rc)
        );
        return ExitCode::FAILURE;
    }
    let built = match args.build() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vzram: {e}");
            return ExitCode::from(2);
        }
    };
    let mut servers = Vec::new();
    for (served, blk) in &built.devices {
        match DeviceServer::start(served.clone(), blk.clone(), args.socket_mode) {
            Ok(s) => {
                log::info!(
                    "{}: {} bytes, {} queues of {}, {} on {}",
                    served.name,
                    blk.size,
                    blk.num_queues,
                    blk.queue_size,
                    args.comp,
                    served.socket.display()
                );
                servers.push(s);
            }
            Err(e) => {
                eprintln!("vzram: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(&built.devices[0].0.socket));
    log::debug!("control socket {}", control.display());
    let mut sig = 0;
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::sigwait(&signals, &mut sig) };
    log::info!("signal {sig}: shutting down");
    // Guest data lives only in this process; there is nothing to flush. Remove the sockets so
    // that nobody connects to a daemon that is gone.
    for s in &servers {
        let _ = std::fs::remove_file(&s.served().socket);
    }
    let _ = std::fs::remove_file(&control);
    // Exit without waiting for connected frontends to hang up (dropping the servers would).
    std::process::exit(0)
}

fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds valid signals.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}
