//! fio-like load against any vhost-user-blk socket (vzram, QSD, the ramdisk example).
//!
//! ```text
//! blkbench --socket PATH [--job SPEC]... [job keys as flags] [--mix SPEC] [--seed N]
//!          [--verify off|written|all] [--queue-size N] [--no-event-idx] [--json]
//! ```
//!
//! A job SPEC is `rw=randwrite,bs=4k,iodepth=32,numjobs=2,runtime=20s` (keys: rw, bs,
//! iodepth, numjobs, offset, span, runtime, ops, partition, segments, indirect, name). Without
//! `--job`, the flags `--rw --bs --iodepth --numjobs --offset --span --runtime --ops
//! --partition --segments --indirect --name` make one job. Jobs run one after another, so
//! `--job rw=randwrite,... --job rw=randread,...` reads back (and verifies) what it wrote.
//! Exits with status 1 if any request failed or any page read back wrong.

use std::process::ExitCode;
use vufront::load::{self, LoadOptions};

const USAGE: &str = "usage: blkbench --socket PATH [--job SPEC]... [--rw X --bs N --iodepth N \
    --numjobs N --runtime T --ops N --span N --offset N --partition range|interleave --segments N \
    --indirect 0|1] [--mix SPEC] [--seed N] [--verify off|written|all] [--queue-size N] \
    [--no-event-idx] [--json]
SPEC: rw=randwrite,bs=4k,iodepth=32,numjobs=2,runtime=20s (jobs run in order)";

fn main() -> ExitCode {
    match run() {
        Ok(clean) if clean => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("blkbench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool, String> {
    let mut opts = LoadOptions {
        jobs: Vec::new(),
        ..LoadOptions::default()
    };
    let mut socket = None;
    let mut json = false;
    let mut flag_job = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(value()?),
            "--job" => opts.jobs.push(value()?.parse()?),
            "--mix" => opts.mix = value()?.parse().map_err(|e| format!("{e}"))?,
            "--seed" => opts.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--verify" => opts.verify = value()?.parse()?,
            "--queue-size" => {
                opts.queue_size = value()?.parse().map_err(|e| format!("--queue-size: {e}"))?
            }
            "--no-event-idx" => opts.event_idx = false,
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            flag if flag.starts_with("--") => {
                let key = &flag[2..];
                flag_job.push(format!("{key}={}", value()?));
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if !flag_job.is_empty() {
        if !opts.jobs.is_empty() {
            return Err("give either --job specs or job flags, not both".into());
        }
        opts.jobs.push(flag_job.join(",").parse()?);
    }
    if opts.jobs.is_empty() {
        opts.jobs.push(load::Job::default());
    }
    opts.socket = socket.ok_or("--socket PATH is required")?.into();
    let report = load::run(&opts).map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{report}");
    }
    Ok(report.problems() == 0)
}
