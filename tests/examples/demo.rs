//! The main job, end to end: a guest swapping onto vzram, with vzram's statistics.
//!
//! ```text
//! demo [--comp ALGO] [--mem MIB] [--cpus N] [--factor F] [--size SIZE] [--mem-limit SIZE]
//!      [--timeout SECS]
//! ```
//!
//! Starts `vzram serve` (the binary of `$VZRAM_BIN`, else the one next to this example's
//! profile folder, rebuilt by the runner) on a socket in a temporary folder, boots the test
//! guest (default 128 MiB, 2 vCPUs, `num-queues=2`), which clears `rotational` on its disk,
//! swaps onto it with `swapon -d` and runs swaptest over F x its RAM (default 3) of mixed
//! pages, and prints `vzram stat` while the workload is swapped out and again after it has
//! exited. Everything it started is stopped when it ends (or dies). Exit status 0 only if the
//! guest passed. `ci/demo` builds what this needs and runs it.
//!
//! `--mem-limit` below what the workload needs makes swap-out writes fail; a Linux guest then
//! stalls rather than OOM-kills (tests/README.md), and the run ends at `--timeout`.

use std::process::ExitCode;
use std::time::Duration;

use guest_tests::{Backend, BackendSpec, Guest, GuestResult, GuestSpec, MIB, RESULT_MARK, RunDir};

struct Opts {
    comp: String,
    mem_mib: u32,
    cpus: u32,
    factor: String,
    size: u64,
    mem_limit: Option<String>,
    timeout: u64,
}

const USAGE: &str = "usage: demo [--comp lz4|zstd[:L]] [--mem MIB] [--cpus N] [--factor F] \
                     [--size SIZE] [--mem-limit SIZE] [--timeout SECS]";

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        comp: "lz4".into(),
        mem_mib: 128,
        cpus: 2,
        factor: "3".into(),
        size: 0,
        mem_limit: None,
        timeout: 240,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            return Err(USAGE.into());
        }
        const OPTS: [&str; 7] = [
            "--comp",
            "--mem",
            "--cpus",
            "--factor",
            "--size",
            "--mem-limit",
            "--timeout",
        ];
        if !OPTS.contains(&a.as_str()) {
            return Err(format!("unknown option {a}\n{USAGE}"));
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--comp" => o.comp = v,
            "--mem" => o.mem_mib = num(&v)? as u32,
            "--cpus" => o.cpus = num(&v)? as u32,
            "--factor" => {
                v.parse::<f64>().map_err(|e| format!("--factor {v}: {e}"))?;
                o.factor = v;
            }
            "--size" => o.size = parse_size(&v)?,
            "--mem-limit" => o.mem_limit = Some(v),
            "--timeout" => o.timeout = num(&v)?,
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    if o.size == 0 {
        // Room for the workload even if nothing compressed, rounded up to 64 MiB.
        let f: f64 = o.factor.parse().unwrap_or(3.0);
        let need = (f * f64::from(o.mem_mib) * 1.5) as u64 * MIB;
        o.size = need.div_ceil(64 * MIB).max(1) * 64 * MIB;
    }
    Ok(o)
}

/// `512M`, `2G`, or bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (n, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("size {s}: {e}"))
}

fn table(disk: &Backend, when: &str) {
    println!("\n== vzram stat: {when} ==");
    match disk.stat_table() {
        Ok(t) => print!("{t}"),
        Err(e) => println!("(vzram stat failed: {e})"),
    }
    println!();
}

fn run(o: &Opts) -> Result<bool, String> {
    let dir = RunDir::new("demo").map_err(|e| e.to_string())?;
    let mut args = vec!["--comp".to_string(), o.comp.clone()];
    if let Some(l) = &o.mem_limit {
        args.extend(["--mem-limit".to_string(), l.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = BackendSpec::vzram(o.size, &argv).queues(2);
    let disk = Backend::start(&dir, spec).map_err(|e| e.to_string())?;
    println!(
        "vzram (pid {}): {}",
        disk.pid().unwrap_or(0),
        disk.command_line()
    );
    let gspec = GuestSpec::new("swap")
        .mem_mib(o.mem_mib)
        .cpus(o.cpus)
        .param("rot", 0)
        .param("factor", &o.factor)
        .param("pause", 2)
        .timeout(Duration::from_secs(o.timeout));
    println!(
        "guest: {} MiB, {} vCPUs, vhost-user-blk num-queues=2; rotational=0, mkswap, swapon -d, \
         swaptest over {}x RAM",
        o.mem_mib, o.cpus, o.factor
    );
    let guest = Guest::start(&dir, &gspec, &disk).map_err(|e| e.to_string())?;
    println!("qemu (pid {}): {}\n", guest.pid(), guest.command_line());
    let out = guest
        .wait_with(|line, _| {
            if line.contains(RESULT_MARK) {
                println!("{line}");
            } else if line.starts_with("swaptest:") || line.starts_with("VZRAM-INFO swap.") {
                println!("  guest| {line}");
            }
            if line.contains("VZRAM-INFO phase=written") {
                table(
                    &disk,
                    "the workload is written, most of it swapped out to vzram",
                );
            } else if line.contains("VZRAM-INFO phase=workload-exited") {
                table(
                    &disk,
                    "the workload has exited; the guest discarded its freed swap",
                );
            }
        })
        .map_err(|e| e.to_string())?;
    println!("\n{}", out.summary());
    if let Some(bad) = out.info.get("swaptest.bad") {
        println!(
            "swaptest: {} MiB, {bad} bad pages; {} KiB were on swap with the workload in",
            out.info.get("swaptest.mib").map_or("?", String::as_str),
            out.info
                .get("swaptest.swap_used_kib")
                .map_or("?", String::as_str),
        );
    }
    if let Ok(s) = disk.stat() {
        println!("vzram: {}", s.summary());
    }
    Ok(out.result == GuestResult::Pass
        && out.info.get("swaptest.bad").map(String::as_str) == Some("0"))
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(true) => {
            println!("demo: PASS");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("demo: FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
