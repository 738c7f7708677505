//! An uncompressed in-memory vhost-user-blk backend: the baseline for `vzram-bench`.
//!
//! ```text
//! cargo run --release -p vufront --example ramdisk -- --socket /tmp/rd.sock \
//!     [--size 1G] [--queues 2] [--queue-size 1024] [--serial NAME] [--readonly] \
//!     [--no-event-idx] [--no-indirect]
//! ```
//!
//! Serves one frontend after another until killed (SIGINT/SIGTERM end the process).

use std::process::ExitCode;
use vufront::ramdisk::{Ramdisk, RamdiskConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ramdisk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut cfg = RamdiskConfig {
        capacity: 1 << 30,
        ..RamdiskConfig::default()
    };
    let mut socket = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(value()?),
            "--size" => cfg.capacity = zram::parse_size(&value()?).map_err(|e| e.to_string())?,
            "--queues" => {
                cfg.num_queues = value()?.parse().map_err(|e| format!("--queues: {e}"))?
            }
            "--queue-size" => {
                cfg.max_queue_size = value()?.parse().map_err(|e| format!("--queue-size: {e}"))?
            }
            "--serial" => cfg.serial = value()?,
            "--readonly" => cfg.readonly = true,
            "--no-event-idx" => cfg.event_idx = false,
            "--no-indirect" => cfg.indirect = false,
            "-h" | "--help" => {
                println!(
                    "usage: ramdisk --socket PATH [--size 1G] [--queues 2] [--queue-size 1024] \
                     [--serial NAME] [--readonly] [--no-event-idx] [--no-indirect]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    let socket = socket.ok_or("--socket PATH is required")?;
    let disk = Ramdisk::new(cfg.clone()).map_err(|e| e.to_string())?;
    let _server = disk.serve(&socket).map_err(|e| e.to_string())?;
    eprintln!(
        "ramdisk: serving {} bytes, {} queues on {socket}",
        cfg.capacity, cfg.num_queues
    );
    loop {
        std::thread::park();
    }
}
