//! The same guest swapping three ways: onto vzram, onto in-guest zram, onto a
//! qemu-storage-daemon disk. Issue #5's guest comparison.
//!
//! ```text
//! compare [--rounds N] [--mem MIB] [--cpus N] [--factor F] [--disk SIZE] [--timeout SECS]
//!         [--systems vzram,zram,qsd]
//! ```
//!
//! Every round boots one guest per system (default 192 MiB, 2 vCPUs), the order rotating from
//! round to round so that a slow spell of the (shared, noisy) machine does not land on one
//! system only. Each guest runs swaptest over F x its MemTotal (default 1.2) with one thread per
//! vCPU:
//!
//! - `vzram`: `vzram serve --comp lz4`, vhost-user-blk with 2 queues; the guest clears
//!   `rotational`, `mkswap`, `swapon -d` (the `swap` test of /init).
//! - `zram`: in-guest zram0 with lz4 and the same `swapon -d` (/init's `zram` test); no disk.
//! - `qsd`: qemu-storage-daemon exporting a raw file on /dev/shm (`discard=unmap`, 2 queues),
//!   the same guest side as vzram.
//!
//! Every disk (and zram's disksize) is `--disk` (default 512M). With the workload written and
//! most of it swapped out, swaptest prints `phase=written` and waits 2 s; then the example reads
//! what the host holds: vzram's `mem_used_total` (control socket), the blocks of QSD's file.
//! From the guest it takes the workload's times (`swaptest.write_ms` + `swaptest.verify_ms`,
//! timed inside the guest, the pause excluded), MemFree / MemAvailable and the swap in use at
//! `phase=written`, and for zram its `mm_stat` at the same moment: zram's pool is guest RAM.
//!
//! Prints one line per run, then a markdown table of the medians (and the ratio of the
//! workload time to QSD's, the median of the per-round ratios) and the command line. Exit
//! status 0 only if every run passed with 0 bad pages. `ci/bench-guests` builds what this
//! needs and runs it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest_tests::{
    Backend, BackendSpec, Guest, GuestResult, GuestSpec, MIB, RunDir, median, parse_mib,
};

const USAGE: &str = "usage: compare [--rounds N] [--mem MIB] [--cpus N] [--factor F] \
                     [--disk SIZE] [--timeout SECS] [--systems vzram,zram,qsd]";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Vzram,
    Zram,
    Qsd,
}

impl System {
    fn parse(s: &str) -> Result<System, String> {
        match s {
            "vzram" => Ok(System::Vzram),
            "zram" => Ok(System::Zram),
            "qsd" => Ok(System::Qsd),
            _ => Err(format!("unknown system {s} (vzram, zram, qsd)")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Vzram => "vzram (lz4)",
            System::Zram => "in-guest zram (lz4)",
            System::Qsd => "QSD, raw file on /dev/shm",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Vzram => "vzram",
            System::Zram => "zram",
            System::Qsd => "qsd",
        }
    }
}

struct Opts {
    rounds: usize,
    mem_mib: u32,
    cpus: u32,
    factor: String,
    disk: u64,
    timeout: u64,
    systems: Vec<System>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        rounds: 3,
        mem_mib: 192,
        cpus: 2,
        factor: "1.2".into(),
        disk: 512 * MIB,
        timeout: 180,
        systems: vec![System::Vzram, System::Zram, System::Qsd],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            return Err(USAGE.into());
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--rounds" => o.rounds = num(&v)?.max(1) as usize,
            "--mem" => o.mem_mib = num(&v)? as u32,
            "--cpus" => o.cpus = num(&v)? as u32,
            "--factor" => {
                v.parse::<f64>().map_err(|e| format!("--factor {v}: {e}"))?;
                o.factor = v;
            }
            "--disk" => {
                o.disk = parse_mib(&v)?;
            }
            "--timeout" => o.timeout = num(&v)?,
            "--systems" => {
                o.systems = v.split(',').map(System::parse).collect::<Result<_, _>>()?;
                if o.systems.is_empty() {
                    return Err("--systems: none given".into());
                }
            }
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// What one run measured. Memory in bytes.
#[derive(Default, Clone)]
struct Sample {
    write_ms: u64,
    verify_ms: u64,
    mem_total: u64,
    workload_mib: u64,
    mem_free: u64,
    mem_available: u64,
    swap_used: u64,
    /// Host memory holding the swapped data at phase=written (vzram, QSD).
    host: Option<u64>,
    /// Guest memory holding it (in-guest zram's mem_used_total).
    from_guest: Option<u64>,
    /// orig_data_size and compr_data_size where there is compression.
    orig: Option<u64>,
    compr: Option<u64>,
    /// QEMU start to exit.
    wall: Duration,
}

impl Sample {
    fn workload_ms(&self) -> u64 {
        self.write_ms + self.verify_ms
    }
}

/// What the host holds at phase=written: memory, and (vzram) orig and compressed sizes.
struct HostSide {
    mem: u64,
    orig_compr: Option<(u64, u64)>,
}

fn info_u64(info: &BTreeMap<String, String>, key: &str) -> Result<u64, String> {
    info.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no numeric VZRAM-INFO {key}"))
}

fn one_run(o: &Opts, sys: System) -> Result<Sample, String> {
    let dir = RunDir::new(&format!("cmp-{}", sys.short())).map_err(|e| e.to_string())?;
    let (bspec, test) = match sys {
        System::Vzram => (
            BackendSpec::vzram(o.disk, &["--comp", "lz4"]).queues(2),
            "swap",
        ),
        System::Qsd => (BackendSpec::qsd(o.disk).queues(2), "swap"),
        System::Zram => (BackendSpec::none(), "zram"),
    };
    let disk = Backend::start(&dir, bspec).map_err(|e| e.to_string())?;
    let mut gspec = GuestSpec::new(test)
        .mem_mib(o.mem_mib)
        .cpus(o.cpus)
        .param("factor", &o.factor)
        .param("pause", 2)
        .timeout(Duration::from_secs(o.timeout));
    gspec = match sys {
        System::Zram => gspec.param("zram_mib", o.disk / MIB),
        _ => gspec.param("rot", 0),
    };
    let guest = Guest::start(&dir, &gspec, &disk).map_err(|e| e.to_string())?;
    let mut host: Option<Result<HostSide, String>> = None;
    let out = guest
        .wait_with(|line, _| {
            if !line.contains("VZRAM-INFO phase=written") || host.is_some() {
                return;
            }
            host = Some(match sys {
                System::Vzram => disk.stat().and_then(|s| {
                    let get = |f: &str| {
                        s.0.pointer(&format!("/devices/0/mm_stat/{f}"))
                            .and_then(serde_json::Value::as_u64)
                            .ok_or_else(|| format!("vzram stat has no mm_stat/{f}: {}", s.0))
                    };
                    Ok(HostSide {
                        mem: get("mem_used_total")?,
                        orig_compr: Some((get("orig_data_size")?, get("compr_data_size")?)),
                    })
                }),
                System::Qsd => disk
                    .disk_file_allocated()
                    .map(|mem| HostSide {
                        mem,
                        orig_compr: None,
                    })
                    .ok_or_else(|| "cannot stat QSD's disk file".to_string()),
                System::Zram => Ok(HostSide {
                    mem: 0,
                    orig_compr: None,
                }),
            });
        })
        .map_err(|e| format!("{:?}: {}", e.kind, e.message))?;
    if out.result != GuestResult::Pass {
        return Err(format!(
            "{:?}; last lines: {}",
            out.result,
            out.last_lines(8)
        ));
    }
    let i = &out.info;
    if info_u64(i, "swaptest.bad")? != 0 {
        return Err(format!("{} bad pages", info_u64(i, "swaptest.bad")?));
    }
    let host = host.ok_or("the guest never reached phase=written")??;
    let mut s = Sample {
        write_ms: info_u64(i, "swaptest.write_ms")?,
        verify_ms: info_u64(i, "swaptest.verify_ms")?,
        mem_total: info_u64(i, "swaptest.mem_total_kib")? * 1024,
        workload_mib: info_u64(i, "swaptest.mib")?,
        mem_free: info_u64(i, "swaptest.written_mem_free_kib")? * 1024,
        mem_available: info_u64(i, "swaptest.written_mem_available_kib")? * 1024,
        swap_used: info_u64(i, "swaptest.swap_used_kib")? * 1024,
        wall: out.wall,
        ..Sample::default()
    };
    match sys {
        System::Vzram => {
            s.host = Some(host.mem);
            s.orig = host.orig_compr.map(|h| h.0);
            s.compr = host.orig_compr.map(|h| h.1);
        }
        System::Qsd => s.host = Some(host.mem),
        System::Zram => {
            s.from_guest = Some(info_u64(i, "zram.mem_used_total")?);
            s.orig = Some(info_u64(i, "zram.orig_data_size")?);
            s.compr = Some(info_u64(i, "zram.compr_data_size")?);
        }
    }
    Ok(s)
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / MIB as f64)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let command = std::env::var("BENCH_GUESTS_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "guests: {} MiB, {} vCPUs, swaptest over {}x MemTotal, disks {} MiB; {} rounds of {:?}",
        o.mem_mib,
        o.cpus,
        o.factor,
        o.disk / MIB,
        o.rounds,
        o.systems.iter().map(|s| s.short()).collect::<Vec<_>>()
    );
    // results[round][system]
    let mut results: Vec<BTreeMap<System, Result<Sample, String>>> = Vec::new();
    let mut all_ok = true;
    for round in 0..o.rounds {
        let n = o.systems.len();
        let mut got = BTreeMap::new();
        for k in 0..n {
            let sys = o.systems[(round + k) % n];
            let t = Instant::now();
            let r = one_run(&o, sys);
            match &r {
                Ok(s) => println!(
                    "round {} {:5}: write {} ms + verify {} ms = {} ms; workload {} MiB = {:.2}x \
                     MemTotal {} MiB; at written: MemFree {} MiB, MemAvailable {} MiB, swap used \
                     {} MiB, host {} MiB, from guest {} MiB, orig {} MiB, compr {} MiB; QEMU {:.1} s",
                    round + 1,
                    sys.short(),
                    s.write_ms,
                    s.verify_ms,
                    s.workload_ms(),
                    s.workload_mib,
                    (s.workload_mib * MIB) as f64 / s.mem_total as f64,
                    mib(s.mem_total as f64),
                    mib(s.mem_free as f64),
                    mib(s.mem_available as f64),
                    mib(s.swap_used as f64),
                    s.host.map_or("-".into(), |b| mib(b as f64)),
                    s.from_guest.map_or("-".into(), |b| mib(b as f64)),
                    s.orig.map_or("-".into(), |b| mib(b as f64)),
                    s.compr.map_or("-".into(), |b| mib(b as f64)),
                    s.wall.as_secs_f64(),
                ),
                Err(e) => {
                    all_ok = false;
                    println!(
                        "round {} {:5}: FAILED after {:.1} s: {e}",
                        round + 1,
                        sys.short(),
                        t.elapsed().as_secs_f64()
                    );
                }
            }
            got.insert(sys, r);
        }
        results.push(got);
    }

    // The table: medians over the rounds a system passed.
    let ok = |sys: System| -> Vec<&Sample> {
        results
            .iter()
            .filter_map(|r| r.get(&sys).and_then(|x| x.as_ref().ok()))
            .collect()
    };
    let med = |sys: System, f: &dyn Fn(&Sample) -> Option<f64>| -> Option<f64> {
        median(ok(sys).into_iter().filter_map(f).collect())
    };
    // Workload time / QSD's in the same round, median over the rounds.
    let vs_qsd = |sys: System| -> Option<f64> {
        median(
            results
                .iter()
                .filter_map(|r| {
                    let a = r.get(&sys)?.as_ref().ok()?;
                    let q = r.get(&System::Qsd)?.as_ref().ok()?;
                    Some(a.workload_ms() as f64 / q.workload_ms() as f64)
                })
                .collect(),
        )
    };
    let fmt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let mut table = String::new();
    table.push_str(
        "| system | rounds passed | workload s (write + verify) | vs QSD | guest MemFree / \
         MemAvailable at written (MiB) | swapped out (MiB) | host memory for it (MiB) | guest \
         memory for it (MiB) | orig/compr (orig/total) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for &sys in &o.systems {
        let n_ok = ok(sys).len();
        let w = med(sys, &|s| Some(s.workload_ms() as f64));
        let wr = med(sys, &|s| Some(s.write_ms as f64));
        let vr = med(sys, &|s| Some(s.verify_ms as f64));
        let range = {
            let v: Vec<u64> = ok(sys).iter().map(|s| s.workload_ms()).collect();
            match (v.iter().min(), v.iter().max()) {
                (Some(a), Some(b)) => format!(
                    " ({:.1}-{:.1}; {:.1} + {:.1})",
                    *a as f64 / 1e3,
                    *b as f64 / 1e3,
                    wr.unwrap_or(0.0) / 1e3,
                    vr.unwrap_or(0.0) / 1e3
                ),
                _ => String::new(),
            }
        };
        let free = med(sys, &|s| Some(s.mem_free as f64));
        let avail = med(sys, &|s| Some(s.mem_available as f64));
        let swapped = med(sys, &|s| Some(s.swap_used as f64));
        let host = match sys {
            System::Zram => "0 (inside the guest's RAM)".to_string(),
            _ => fmt(med(sys, &|s| s.host.map(|b| b as f64)), &mib),
        };
        let from_guest = match sys {
            System::Zram => fmt(med(sys, &|s| s.from_guest.map(|b| b as f64)), &mib),
            _ => "0".to_string(),
        };
        let ratio = match sys {
            System::Qsd => "1 (uncompressed)".to_string(),
            _ => {
                let oc = med(sys, &|s| Some(s.orig? as f64 / s.compr? as f64));
                let ot = med(sys, &|s| {
                    Some(s.orig? as f64 / s.host.or(s.from_guest)? as f64)
                });
                format!(
                    "{} ({})",
                    fmt(oc, &|x| format!("{x:.2}")),
                    fmt(ot, &|x| format!("{x:.2}"))
                )
            }
        };
        table.push_str(&format!(
            "| {} | {n_ok}/{} | {}{range} | {} | {} / {} | {} | {host} | {from_guest} | {ratio} |\n",
            sys.name(),
            results.len(),
            fmt(w, &|x| format!("{:.1}", x / 1e3)),
            if sys == System::Qsd {
                "1.00".to_string()
            } else {
                fmt(vs_qsd(sys), &|x| format!("{x:.2}"))
            },
            fmt(free, &mib),
            fmt(avail, &mib),
            fmt(swapped, &mib),
        ));
    }
    let first = o
        .systems
        .iter()
        .find_map(|&s| ok(s).first().map(|x| (x.mem_total, x.workload_mib)));
    println!();
    if let Some((total, w)) = first {
        println!(
            "Guest: {} MiB ({} MiB MemTotal), {} vCPUs, TCG; swaptest {w} MiB ({}x MemTotal), one \
             thread per vCPU; medians of {} rounds, systems alternating.\n",
            o.mem_mib,
            total / MIB,
            o.cpus,
            o.factor,
            results.len()
        );
    }
    print!("{table}");
    println!("\n`{command}` ({:.0} s)", started.elapsed().as_secs_f64());
    if all_ok {
        ExitCode::SUCCESS
    } else {
        println!("compare: some runs failed (see above)");
        ExitCode::FAILURE
    }
}
