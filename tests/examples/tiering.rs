//! Issue #14's guest scenario: two guests on one vzram, one swapping actively and one idle;
//! the idle one's pages should move to zstd and then to the backing file, and the active one
//! should not be slowed.
//!
//! ```text
//! tiering [--active-mem MIB] [--idle-mem MIB] [--active-factor F] [--idle-factor F]
//!         [--hold SECS] [--alone-rounds N] [--disk SIZE] [--every SECS] [--timeout SECS]
//!         [--vzram-args "ARGS"] [--expect-policy]
//! ```
//!
//! One `vzram serve` with two devices, `active` and `idle`, each with a backing file in the
//! run folder, `--comp lz4 --recomp zstd` and the policy's arguments ([`POLICY_ARGS`], or
//! `--vzram-args`). Two runs, each on a fresh daemon:
//!
//! 1. alone: only the active guest (default 96 MiB, 1 vCPU) boots, on `active`, and runs
//!    swaptest over `--active-factor` x its RAM (default 2) `--alone-rounds` times (default 3).
//! 2. together: the active guest again, swapping round after round for `--hold` + 40 seconds,
//!    and at the same time the idle guest (default 96 MiB, 1 vCPU) on `idle`, which writes
//!    `--idle-factor` x its RAM (default 1.5) with swaptest, holds it untouched for `--hold`
//!    seconds (default 120; `vzram.idle=` of /init) and then verifies it.
//!
//! Every `--every` seconds (default 5) the example reads `vzram stat` from the control socket
//! and prints a line per sample: for each device orig_data_size, compr_data_size, the pages
//! on the backing file (bd_stat.bd_count), the policy's counters when the daemon has them
//! (`tiering.recompressed`, `tiering.written_back`), and the pool. At the end, markdown
//! tables: the active guest's swaptest round time alone and together (median, and the
//! rounds that ran entirely inside the idle guest's hold, when only the policy works on the
//! idle device), their ratio, bad pages; the idle device at the start and at the end of the
//! hold (compr_data_size falling while orig_data_size stays is recompression; bd_count rising
//! is writeback) and what verifying it read back from the backing file.
//!
//! Exit status 0 when every guest passed with 0 bad pages; with `--expect-policy` also only
//! if the idle device's compressed size fell and pages reached its backing file during the
//! hold. `--vzram-args` replaces [`POLICY_ARGS`] as given (`--vzram-args "--policy off"`
//! for a run without the policy). `ci/bench-tiering-guests` builds what this needs and runs
//! it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest_tests::{
    Backend, BackendSpec, Guest, GuestEvent, GuestResult, GuestSpec, MIB, Outcome, RunDir, Stat,
    Together, VzramDevice, median, parse_info, parse_mib, wait_together,
};

/// Always given to `vzram serve`: lz4 for every page, zstd to recompress idle ones.
const BASE_ARGS: &[&str] = &["--comp", "lz4", "--recomp", "zstd"];

/// The policy's arguments (issue #14), replaced as a whole by `--vzram-args`.
///
/// Idle pages are those untouched for 20 s (the default is 120 s), so that the idle guest's
/// hold shows both steps in a couple of minutes. The limit is a ceiling well above the run's
/// peak (the pool peaked at 95 MiB with the default sizes without a policy, 54 MiB for the
/// active guest alone), so no guest write can fail; the watermarks (64 MiB high, 51 MiB low)
/// sit between the active guest alone and both guests together, so the pool is above the
/// high watermark once both workloads are swapped out and writeback has to run, while the
/// active guest alone stays below it.
const POLICY_ARGS: &[&str] = &[
    "--policy",
    "on",
    "--idle-age",
    "20s",
    "--mem-limit",
    "128M",
    "--high-watermark",
    "0.5",
    "--low-watermark",
    "0.4",
];

const ACTIVE: &str = "active";
const IDLE: &str = "idle";

const USAGE: &str = "usage: tiering [--active-mem MIB] [--idle-mem MIB] [--active-factor F] \
                     [--idle-factor F] [--hold SECS] [--alone-rounds N] [--disk SIZE] \
                     [--every SECS] [--timeout SECS] [--vzram-args \"ARGS\"] [--expect-policy]";

struct Opts {
    active_mem: u32,
    idle_mem: u32,
    active_factor: String,
    idle_factor: String,
    hold: u64,
    alone_rounds: u32,
    disk: u64,
    every: u64,
    timeout: u64,
    vzram_args: Option<Vec<String>>,
    expect_policy: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        active_mem: 96,
        idle_mem: 96,
        active_factor: "2".into(),
        idle_factor: "1.5".into(),
        hold: 120,
        alone_rounds: 3,
        disk: 512 * MIB,
        every: 5,
        timeout: 600,
        vzram_args: None,
        expect_policy: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(USAGE.into()),
            "--expect-policy" => {
                o.expect_policy = true;
                continue;
            }
            _ => {}
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        let factor = |v: String| {
            v.parse::<f64>()
                .map(|_| v.clone())
                .map_err(|e| format!("{a} {v}: {e}"))
        };
        match a.as_str() {
            "--active-mem" => o.active_mem = num(&v)? as u32,
            "--idle-mem" => o.idle_mem = num(&v)? as u32,
            "--active-factor" => o.active_factor = factor(v)?,
            "--idle-factor" => o.idle_factor = factor(v)?,
            "--hold" => o.hold = num(&v)?,
            "--alone-rounds" => o.alone_rounds = num(&v)?.max(1) as u32,
            "--disk" => o.disk = parse_mib(&v)?,
            "--every" => o.every = num(&v)?.max(1),
            "--timeout" => o.timeout = num(&v)?,
            "--vzram-args" => o.vzram_args = Some(v.split_whitespace().map(String::from).collect()),
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// One device's figures in one `vzram stat`.
#[derive(Clone, Copy, Default, Debug)]
struct Dev {
    orig: u64,
    compr: u64,
    huge: u64,
    /// Pages on the backing file.
    bd_count: u64,
    /// Pages read back from it (promotions).
    bd_reads: u64,
    /// The policy's counters, when the daemon reports them.
    recompressed: Option<u64>,
    written_back: Option<u64>,
    /// Bytes the backing file holds on the host.
    backing: Option<u64>,
}

impl Dev {
    fn read(stat: &Stat, backend: &Backend, name: &str) -> Dev {
        Dev {
            orig: stat.dev_of(name, "/mm_stat/orig_data_size"),
            compr: stat.dev_of(name, "/mm_stat/compr_data_size"),
            huge: stat.dev_of(name, "/mm_stat/huge_pages"),
            bd_count: stat.dev_of(name, "/bd_stat/bd_count"),
            bd_reads: stat.dev_of(name, "/bd_stat/bd_reads"),
            recompressed: stat.dev_opt(name, "/tiering/recompressed"),
            written_back: stat.dev_opt(name, "/tiering/written_back"),
            backing: backend.backing_file_allocated(name),
        }
    }
}

/// One sample of the daemon during the together run.
#[derive(Clone, Debug)]
struct Sample {
    /// Since the guests started.
    t: Duration,
    active: Dev,
    idle: Dev,
    pool: u64,
    pool_max: u64,
    limit: u64,
}

fn sample(backend: &Backend, t: Duration) -> Result<Sample, String> {
    let stat = backend.stat()?;
    Ok(Sample {
        t,
        active: Dev::read(&stat, backend, ACTIVE),
        idle: Dev::read(&stat, backend, IDLE),
        pool: stat.u64("/store/mem_used_total"),
        pool_max: stat.u64("/store/mem_used_max"),
        limit: stat.u64("/store/mem_limit"),
    })
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB as f64)
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// One swaptest round of the active guest: when it ended (host clock) and how long it took
/// (guest clock).
#[derive(Clone, Copy, Debug)]
struct Round {
    end: Instant,
    ms: u64,
}

impl Round {
    fn start(&self) -> Instant {
        self.end - Duration::from_millis(self.ms)
    }
}

/// Rounds and bad pages of a guest, from its serial lines.
#[derive(Default)]
struct Watch {
    rounds: Vec<Round>,
    bad: u64,
}

impl Watch {
    fn line(&mut self, at: Instant, line: &str) {
        let mut kv = BTreeMap::new();
        parse_info(line, &mut kv);
        if let Some(ms) = kv.get("swap.round_ms").and_then(|v| v.parse().ok()) {
            self.rounds.push(Round { end: at, ms });
        }
        if let Some(b) = kv.get("swaptest.bad").and_then(|v| v.parse::<u64>().ok()) {
            self.bad += b;
        }
    }
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or("-".to_string(), |ms| format!("{:.1}", ms / 1e3))
}

/// PASS with 0 bad pages, or why not.
fn verdict(out: &Result<Outcome, String>, watch: &Watch) -> Result<(), String> {
    let out = out.as_ref().map_err(Clone::clone)?;
    match &out.result {
        GuestResult::Pass if watch.bad == 0 => Ok(()),
        GuestResult::Pass => Err(format!("{} bad pages", watch.bad)),
        GuestResult::Fail(why) => Err(format!("FAIL {why}; last lines: {}", out.last_lines(8))),
    }
}

fn start_backend(dir: &RunDir, o: &Opts, args: &[String]) -> Result<Backend, String> {
    let devices = [
        VzramDevice::new(ACTIVE, o.disk).with_backing_file(),
        VzramDevice::new(IDLE, o.disk).with_backing_file(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    Backend::start(dir, BackendSpec::vzram_devices(&devices, &argv).queues(1))
        .map_err(|e| e.to_string())
}

fn active_spec(o: &Opts) -> GuestSpec {
    GuestSpec::new("swap")
        .mem_mib(o.active_mem)
        .cpus(1)
        .param("rot", 0)
        .param("factor", &o.active_factor)
        .timeout(Duration::from_secs(o.timeout))
}

struct Alone {
    outcome: Result<Outcome, String>,
    watch: Watch,
    pool_max: Option<u64>,
}

fn run_alone(o: &Opts, args: &[String]) -> Result<Alone, String> {
    let dir = RunDir::new("tiering-alone").map_err(|e| e.to_string())?;
    let backend = start_backend(&dir, o, args)?;
    println!(
        "vzram (pid {}): {}",
        backend.pid().unwrap_or(0),
        backend.command_line()
    );
    let spec = active_spec(o).param("rounds", o.alone_rounds);
    let guest = Guest::start_on(&dir, &spec, &backend, ACTIVE).map_err(|e| e.to_string())?;
    println!(
        "active guest (pid {}): {}",
        guest.pid(),
        guest.command_line()
    );
    let t0 = Instant::now();
    let mut watch = Watch::default();
    let outcome = guest
        .wait_with(|line, _| {
            let at = Instant::now();
            watch.line(at, line);
            if line.contains("swap.round_ms=") {
                println!("  {:6.1} s active| {line}", (at - t0).as_secs_f64());
            }
        })
        .map_err(|e| e.to_string());
    let pool_max = backend.stat().ok().map(|s| s.u64("/store/mem_used_max"));
    Ok(Alone {
        outcome,
        watch,
        pool_max,
    })
}

struct Both {
    active: Result<Outcome, String>,
    idle: Result<Outcome, String>,
    active_watch: Watch,
    idle_watch: Watch,
    samples: Vec<Sample>,
    /// The idle guest's phase=written (its hold began), since the start.
    hold_start: Option<Duration>,
    /// When the idle guest had verified its workload (read everything back), since the start.
    verified: Option<Duration>,
    started: Instant,
}

fn run_together(o: &Opts, args: &[String]) -> Result<Both, String> {
    let dir = RunDir::new("tiering-both").map_err(|e| e.to_string())?;
    let backend = start_backend(&dir, o, args)?;
    println!(
        "vzram (pid {}): {}",
        backend.pid().unwrap_or(0),
        backend.command_line()
    );
    let both = Together::new();
    // The active guest keeps swapping past the idle guest's hold (boot and writing the idle
    // workload take 20-40 s under TCG).
    let active_secs = o.hold + 40;
    let active = active_spec(o).param("duration", active_secs);
    let idle = GuestSpec::new("swap")
        .mem_mib(o.idle_mem)
        .cpus(1)
        .param("rot", 0)
        .param("factor", &o.idle_factor)
        .param("idle", o.hold)
        .timeout(Duration::from_secs(o.timeout));
    let ga = both
        .start_on(&dir, &active, &backend, ACTIVE)
        .map_err(|e| e.to_string())?;
    println!("active guest (pid {}): {}", ga.pid(), ga.command_line());
    let gi = both
        .start_on(&dir, &idle, &backend, IDLE)
        .map_err(|e| e.to_string())?;
    println!("idle guest (pid {}): {}", gi.pid(), gi.command_line());
    let started = Instant::now();
    println!(
        "\n{:>6} | {:>24} | {:>9} {:>7} {:>8} {:>8} {:>9} | {:>18} {:>8} | {:>13}",
        "t (s)",
        "idle guest",
        "idle orig",
        "compr",
        "bd_count",
        "recomp",
        "wr. back",
        "active orig/compr",
        "bd_count",
        "pool (max)"
    );
    let mut samples = Vec::new();
    let mut hold_start = None;
    let mut verified = None;
    let mut idle_phase = "booting";
    let mut active_watch = Watch::default();
    let mut idle_watch = Watch::default();
    let mut errors = Vec::new();
    let mut take = |t: Duration, phase: &str, samples: &mut Vec<Sample>| match sample(&backend, t) {
        Ok(s) => {
            println!(
                "{:6.1} | {:>24} | {:>9} {:>7} {:>8} {:>8} {:>9} | {:>18} {:>8} | {:>13}",
                t.as_secs_f64(),
                phase,
                mib(s.idle.orig),
                mib(s.idle.compr),
                s.idle.bd_count,
                opt(s.idle.recompressed),
                opt(s.idle.written_back),
                format!("{}/{}", mib(s.active.orig), mib(s.active.compr)),
                s.active.bd_count,
                format!("{} ({})", mib(s.pool), mib(s.pool_max))
            );
            samples.push(s);
        }
        Err(e) => errors.push(e),
    };
    let outs = wait_together(vec![ga, gi], Duration::from_secs(o.every), |ev| match ev {
        GuestEvent::Tick { elapsed } => {
            let phase = match hold_start {
                Some(h) if elapsed < h + Duration::from_secs(o.hold) => {
                    format!("holding {:.0}/{} s", (elapsed - h).as_secs_f64(), o.hold)
                }
                _ => idle_phase.to_string(),
            };
            take(elapsed, &phase, &mut samples);
        }
        GuestEvent::Line {
            guest, at, line, ..
        } => {
            let t = at - started;
            if guest == 0 {
                active_watch.line(at, line);
                if line.contains("swap.round_ms=") {
                    println!("{:6.1} | active| {line}", t.as_secs_f64());
                }
            } else {
                idle_watch.line(at, line);
                if line.contains("VZRAM-INFO phase=written") {
                    hold_start = Some(t);
                    idle_phase = "verifying";
                    take(t, "written: hold starts", &mut samples);
                } else if line.contains("swaptest: verified") {
                    idle_phase = "done";
                    verified = Some(t);
                    println!("{:6.1} | idle| {line}", t.as_secs_f64());
                    take(t, "verified", &mut samples);
                } else if line.starts_with("swaptest: wrote") {
                    idle_phase = "written";
                    println!("{:6.1} | idle| {line}", t.as_secs_f64());
                } else if line.contains("VZRAM-INFO init_ms=") {
                    idle_phase = "writing";
                }
            }
        }
    });
    take(started.elapsed(), "both guests ended", &mut samples);
    if !errors.is_empty() {
        println!("statistics failed {} times: {}", errors.len(), errors[0]);
    }
    let mut outs = outs.into_iter().map(|r| r.map_err(|e| e.to_string()));
    Ok(Both {
        active: outs.next().expect("two outcomes"),
        idle: outs.next().expect("two outcomes"),
        active_watch,
        idle_watch,
        samples,
        hold_start,
        verified,
        started,
    })
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tiering: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(o: &Opts) -> Result<bool, String> {
    let begun = Instant::now();
    let command = std::env::var("BENCH_TIERING_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let bin = guest_tests::fresh_vzram()?;
    let mut args: Vec<String> = BASE_ARGS.iter().map(|s| s.to_string()).collect();
    let policy = match &o.vzram_args {
        Some(a) => {
            args.extend(a.iter().cloned());
            format!("--vzram-args as given: {a:?}")
        }
        None => {
            args.extend(POLICY_ARGS.iter().map(|s| s.to_string()));
            format!("the policy's arguments {POLICY_ARGS:?}")
        }
    };
    println!(
        "tiering: one vzram ({}), devices `{ACTIVE}` and `{IDLE}` ({} MiB each, backing files); \
         extra arguments: {policy}",
        bin.display(),
        o.disk / MIB
    );
    println!(
        "active guest: {} MiB, 1 vCPU, swaptest over {}x RAM ({} rounds alone; round after \
         round for {} s together); idle guest: {} MiB, 1 vCPU, swaptest over {}x RAM held {} s\n",
        o.active_mem,
        o.active_factor,
        o.alone_rounds,
        o.hold + 40,
        o.idle_mem,
        o.idle_factor,
        o.hold
    );

    println!("== 1. the active guest alone ==");
    let alone = run_alone(o, &args)?;
    let alone_ok = verdict(&alone.outcome, &alone.watch);
    println!(
        "alone: {}",
        match &alone_ok {
            Ok(()) => "PASS, 0 bad pages".to_string(),
            Err(e) => e.clone(),
        }
    );

    println!("\n== 2. the active and the idle guest together ==");
    let both = run_together(o, &args)?;
    let active_ok = verdict(&both.active, &both.active_watch);
    let idle_ok = verdict(&both.idle, &both.idle_watch);

    // The active guest's rounds: alone, together (all), together inside the idle hold.
    let ms = |r: &[Round]| median(r.iter().map(|r| r.ms as f64).collect());
    let alone_med = ms(&alone.watch.rounds);
    let hold = both.hold_start.map(|h| {
        let s = both.started + h;
        (s, s + Duration::from_secs(o.hold))
    });
    let inside: Vec<Round> = both
        .active_watch
        .rounds
        .iter()
        .filter(|r| hold.is_some_and(|(s, e)| r.start() >= s && r.end <= e))
        .copied()
        .collect();
    let together_med = ms(&both.active_watch.rounds);
    let inside_med = ms(&inside);
    let ratio = |x: Option<f64>| match (x, alone_med) {
        (Some(x), Some(a)) if a > 0.0 => format!("{:.2}", x / a),
        _ => "-".to_string(),
    };
    let status = |r: &Result<(), String>, w: &Watch| match r {
        Ok(()) => format!("PASS, {} bad pages", w.bad),
        Err(e) => e.chars().take(80).collect(),
    };

    // The idle device at the start and the end of its hold.
    let at_start = both
        .hold_start
        .and_then(|h| both.samples.iter().find(|s| s.t >= h));
    let at_end = both.hold_start.and_then(|h| {
        both.samples
            .iter()
            .rfind(|s| s.t <= h + Duration::from_secs(o.hold))
    });
    let at_verified = both
        .verified
        .and_then(|v| both.samples.iter().find(|s| s.t >= v));
    // The first sample of the hold where `f(start of the hold, sample)`: only the hold counts,
    // since verifying swaps pages in and out again.
    let first_after = |f: &dyn Fn(&Sample, &Sample) -> bool| -> String {
        match (at_start, both.hold_start) {
            (Some(s0), Some(h)) => both
                .samples
                .iter()
                .find(|s| s.t >= h && s.t <= h + Duration::from_secs(o.hold) && f(s0, s))
                .map_or("never".to_string(), |s| {
                    format!("{:.0} s after the hold began", (s.t - h).as_secs_f64())
                }),
            _ => "-".to_string(),
        }
    };
    // Recompression: compr_data_size 2% below its value at the start of the hold while
    // orig_data_size stays within 2% (pages written back leave both).
    let recompressed_seen = first_after(&|a, b| {
        b.idle.compr * 100 < a.idle.compr * 98 && b.idle.orig * 100 >= a.idle.orig * 98
    });
    let writeback_seen = first_after(&|a, b| b.idle.bd_count > a.idle.bd_count);

    println!("\n== results ==\n");
    println!("Policy: {policy}.\n");
    println!(
        "| active guest (swaptest over {}x of {} MiB) | rounds | result | median round (s) | vs alone |",
        o.active_factor, o.active_mem
    );
    println!("|---|---|---|---|---|");
    println!(
        "| alone | {} | {} | {} | 1.00 |",
        alone.watch.rounds.len(),
        status(&alone_ok, &alone.watch),
        secs(alone_med)
    );
    println!(
        "| with the idle guest, all rounds | {} | {} | {} | {} |",
        both.active_watch.rounds.len(),
        status(&active_ok, &both.active_watch),
        secs(together_med),
        ratio(together_med)
    );
    println!(
        "| with the idle guest, rounds inside its {} s hold | {} | | {} | {} |",
        o.hold,
        inside.len(),
        secs(inside_med),
        ratio(inside_med)
    );
    println!();
    let cell = |s: Option<&Sample>, f: &dyn Fn(&Sample) -> String| s.map_or("-".to_string(), f);
    println!(
        "| idle device (guest: {} MiB, swaptest over {}x, held {} s; {}) | hold starts | hold ends | verified |",
        o.idle_mem,
        o.idle_factor,
        o.hold,
        status(&idle_ok, &both.idle_watch)
    );
    println!("|---|---|---|---|");
    let row = |what: &str, f: &dyn Fn(&Sample) -> String| {
        println!(
            "| {what} | {} | {} | {} |",
            cell(at_start, f),
            cell(at_end, f),
            cell(at_verified, f)
        );
    };
    row("orig_data_size (MiB)", &|s| mib(s.idle.orig));
    row("compr_data_size (MiB)", &|s| mib(s.idle.compr));
    row("ratio orig/compr", &|s| {
        if s.idle.compr == 0 {
            "-".into()
        } else {
            format!("{:.2}", s.idle.orig as f64 / s.idle.compr as f64)
        }
    });
    row("huge pages", &|s| s.idle.huge.to_string());
    row("recompressed pages (tiering.recompressed)", &|s| {
        opt(s.idle.recompressed)
    });
    row("written back (tiering.written_back)", &|s| {
        opt(s.idle.written_back)
    });
    row("pages on the backing file (bd_stat.bd_count)", &|s| {
        s.idle.bd_count.to_string()
    });
    row("backing file on the host (MiB)", &|s| {
        s.idle.backing.map_or("-".into(), mib)
    });
    row("read back from it (bd_stat.bd_reads)", &|s| {
        s.idle.bd_reads.to_string()
    });
    row("active device: pages on its backing file", &|s| {
        s.active.bd_count.to_string()
    });
    row("pool: mem_used_total (max), MiB", &|s| {
        format!("{} ({})", mib(s.pool), mib(s.pool_max))
    });
    row("pool: mem_limit (MiB)", &|s| mib(s.limit));
    println!();
    println!(
        "Idle device during the hold: compr_data_size first 2% lower with orig_data_size within \
         2%: {recompressed_seen}; first page on the backing file: {writeback_seen}. Pool peak: \
         alone {} MiB, together {} MiB.",
        alone.pool_max.map_or("-".into(), mib),
        both.samples.last().map_or("-".into(), |s| mib(s.pool_max))
    );
    if let Ok(out) = &both.idle {
        let t = |k: &str| {
            out.info
                .get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .map_or("-".to_string(), |ms| format!("{:.1}", ms / 1e3))
        };
        println!(
            "Idle guest: wrote its workload in {} s, verified it after the hold in {} s.",
            t("swaptest.write_ms"),
            t("swaptest.verify_ms")
        );
    }
    println!(
        "Active guest round times are timed inside the guest (TCG, both guests share the \
         host's cores): read the ratios, not the seconds."
    );
    println!("\n`{command}` ({:.0} s)", begun.elapsed().as_secs_f64());

    let mut ok = alone_ok.is_ok() && active_ok.is_ok() && idle_ok.is_ok();
    if !ok {
        println!("tiering: a guest failed (see above)");
    }
    if o.expect_policy {
        let moved = match (at_start, at_end) {
            (Some(a), Some(b)) => {
                b.idle.compr * 100 < a.idle.compr * 98 && b.idle.bd_count > a.idle.bd_count
            }
            _ => false,
        };
        if !moved {
            println!(
                "tiering: --expect-policy: the idle device's pages were not both recompressed \
                 (compr_data_size falling) and written back (bd_count rising) during the hold"
            );
            ok = false;
        }
    }
    Ok(ok)
}
