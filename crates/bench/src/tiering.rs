//! The many-VM tiering scenario of issue #14, without VMs: several devices on one in-process
//! daemon (one store, one memory limit, a socket and a backing file each), loaded like the
//! swap disks of VMs that take turns being busy and idle.
//!
//! Per device the span holds a *hot set* (every `1/hot`-th page) and a *cold set* (the rest).
//! Time is cut into phases; in each one `busy` of the devices work and the others do nothing,
//! rotating, so every device goes through busy and idle stretches. A busy device:
//!
//! - in its first busy phase writes its hot set (a swap-out burst at `iodepth`), and in its
//!   first `fill_bursts` busy phases a share of its cold set each (more bursts): the cold set
//!   is written once;
//! - then, at `rate` requests per second until the phase ends, swaps hot pages in and out:
//!   a random hot page is read if it is "in swap" (then it is "in the guest") or written with
//!   new content if it is "in the guest" (then it is in swap again), as a guest's swap cycle
//!   does; and, `cold_reads` times a minute, reads a random cold page.
//!
//! Every page holds a versioned content (real pages from `--pages` or pagemix pages,
//! regenerated from seed, device, page and version), every read is verified against the last
//! write that succeeded: a failed write must leave the old content (a page whose write failed
//! is read back at once to check it; that read is not in the latency figures).
//!
//! One invocation runs the schedule several times on fresh devices: first with no memory
//! limit and lz4 alone (the reference: its peak is the "lz4 footprint", its hot-read latency
//! the yardstick), then with the limit, once per `--policy` mode. A run samples the pool's
//! memory every `sample` and counts promotions (pages read from the backing file, zram's
//! `bd_reads`) against the target of `promotion_target` of the recently used pages a minute
//! (pages accessed within `idle_age`, sampled). With `--policy on` the daemon's policy thread
//! (`vzram::control::PolicyThread`) runs over the devices, as `vzram serve` runs it.

use crate::{BenchError, load_pages};
use clap::{Args, ValueEnum};
use pagemix::{Mix, SplitMix64, fill_page};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};
use vufront::load::{self, Histogram, Latency, RealPages};
use vufront::{Completion, Frontend, Options, Queue, Request};
use vzram::control::{PolicySetup, PolicyThread};
use vzram::{BlkDevice, ConfigSpace, DeviceServer};
use zram::policy::{PolicyConfig, PolicyStats};

const PAGE: usize = zram::PAGE_SIZE;
const SECTORS_PER_PAGE: u64 = (PAGE as u64) / zram::SECTOR_SIZE;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Args)]
pub struct TieringArgs {
    /// Devices (VMs) on the one store.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub devices: usize,

    /// Size of each device.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = zram::parse_size)]
    pub size: u64,

    /// Share of each device's pages in its hot set.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1)]
    pub hot: f64,

    /// Length of each run (the invocation makes 1 + the number of --policy modes runs).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = load::parse_duration)]
    pub duration: Duration,

    /// Phases a run is cut into; devices take turns being busy from one phase to the next.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub phases: u32,

    /// Devices busy in each phase.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub busy: usize,

    /// Hot-set requests per second of a busy device (after its bursts).
    #[arg(long, value_name = "OPS", default_value_t = 1000.0)]
    pub rate: f64,

    /// Reads of random cold pages per minute of a busy device.
    #[arg(long, value_name = "N", default_value_t = 3.0)]
    pub cold_reads: f64,

    /// A device writes its cold set in this many bursts, one at the start of each of its
    /// first busy phases.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub fill_bursts: u32,

    /// Requests in flight during a burst.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub iodepth: u16,

    /// The store's memory limit for the limited runs: a fraction of the no-limit lz4 run's
    /// peak (`0.6`, `60%`) or a size (`48M`).
    #[arg(long, value_name = "LIMIT", default_value = "0.6")]
    pub mem_limit: MemLimit,

    /// Runs with the limit: with the policy off, on, or both (`off,on`).
    #[arg(
        long,
        value_name = "MODES",
        value_delimiter = ',',
        default_value = "off,on"
    )]
    pub policy: Vec<PolicyMode>,

    /// The policy's idle age (`vzram serve --idle-age`), and the window of "recently used"
    /// pages for the promotion target. Short by default: a run plays minutes in seconds.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = load::parse_duration)]
    pub idle_age: Duration,

    /// Promotion target: a fraction of recently used pages per minute.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.002)]
    pub promotion_target: f64,

    /// Primary compression (the reference run uses it alone).
    #[arg(long, value_name = "ALGO", default_value = "lz4")]
    pub comp: String,

    /// Secondary algorithm of the limited runs, for recompression ("none": none).
    #[arg(long, value_name = "ALGO", default_value = "zstd")]
    pub recomp: String,

    /// Real pages (raw or `.zst`) instead of generated ones.
    #[arg(long, value_name = "FILE")]
    pub pages: Option<PathBuf>,

    /// Generated page content (default: pagemix's swap-like mix).
    #[arg(long, value_name = "MIX", conflicts_with = "pages")]
    pub mix: Option<Mix>,

    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// How often the pool's memory is sampled.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = load::parse_duration)]
    pub sample: Duration,

    /// Ring polling of the devices, as `vzram serve --poll-us`.
    #[arg(long, value_name = "US", default_value_t = 32)]
    pub poll_us: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--mem-limit`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemLimit {
    /// Of the reference run's peak.
    Fraction(f64),
    Bytes(u64),
}

impl FromStr for MemLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fraction = |f: f64| {
            if f > 0.0 && f <= 1.0 {
                Ok(MemLimit::Fraction(f))
            } else {
                Err(format!("mem-limit {s}: a fraction must lie in (0, 1]"))
            }
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .parse()
                .map_err(|_| format!("mem-limit {s}: bad percentage"))?;
            return fraction(p / 100.0);
        }
        if s.contains('.') && !s.ends_with(|c: char| c.is_ascii_alphabetic()) {
            let f: f64 = s
                .parse()
                .map_err(|_| format!("mem-limit {s}: bad fraction"))?;
            return fraction(f);
        }
        match zram::parse_size(s) {
            Ok(b) if b >= 16 * PAGE as u64 => Ok(MemLimit::Bytes(b)),
            Ok(_) => Err(format!("mem-limit {s}: less than 16 pages")),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    Off,
    On,
}

/// The whole invocation.
#[derive(Debug, Serialize)]
pub struct TieringReport {
    /// Where the pages came from.
    pub pages: String,
    pub devices: usize,
    pub device_bytes: u64,
    pub hot_pages: u64,
    pub cold_pages: u64,
    pub run_seconds: f64,
    pub phases: u32,
    pub busy: usize,
    pub rate: f64,
    pub cold_reads_per_min: f64,
    pub idle_age_seconds: f64,
    pub promotion_target: f64,
    /// Peak pool memory of the reference run (no limit, lz4 alone).
    pub lz4_footprint: u64,
    /// The limit of the limited runs.
    pub mem_limit: u64,
    /// The reference run first, then one per policy mode.
    pub runs: Vec<RunReport>,
}

/// One run of the schedule on fresh devices.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub name: String,
    pub policy: PolicyMode,
    /// 0: none.
    pub mem_limit: u64,
    pub comp: String,
    pub seconds: f64,
    pub writes: u64,
    /// Writes completed with an error status (the page keeps its old content).
    pub failed_writes: u64,
    /// zram's io_stat, summed over the devices.
    pub zram_failed_writes: u64,
    pub read_errors: u64,
    pub verify_failures: u64,
    pub verified_pages: u64,
    /// Of those: pages read right after a write of theirs failed, holding their old content.
    pub kept_after_failed_write: u64,
    pub pool: PoolMemory,
    pub hot_reads: u64,
    pub hot_read_us: Latency,
    /// Hot-read p99 over the reference run's (1.0 for the reference).
    pub hot_p99_vs_reference: f64,
    pub cold_reads: u64,
    pub cold_read_us: Latency,
    /// zram's bd_reads, summed.
    pub promotions: u64,
    pub promotions_per_min: f64,
    pub promotion_target_per_min: f64,
    /// Pages in the backing files at the end.
    pub backing_pages: u64,
    /// 1 - this run's pool memory / the reference run's, at the peak and on average.
    pub saved_peak: f64,
    pub saved_mean: f64,
    /// getrusage of the process over the run (daemon, load generator, policy).
    pub cpu_seconds: f64,
    /// The load generator's own threads (drivers and sampler) within `cpu_seconds`.
    pub load_cpu_seconds: f64,
    /// What the policy did (`--policy on`): its statistics, CPU time included.
    pub policy_stats: Option<PolicyStats>,
    pub per_device: Vec<DeviceReport>,
}

/// The pool's memory over a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PoolMemory {
    pub samples: u64,
    /// Largest sample.
    pub peak: u64,
    /// Mean of the samples.
    pub mean: u64,
    /// The store's own high-water mark (`mem_used_max`).
    pub mem_used_max: u64,
}

#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub busy_phases: u32,
    pub writes: u64,
    pub failed_writes: u64,
    pub hot_reads: u64,
    pub hot_read_us: Latency,
    pub cold_reads: u64,
    pub promotions: u64,
    pub promotions_per_min: f64,
    /// Pages accessed within the idle age, mean of the samples.
    pub recently_used_mean: f64,
    pub promotion_target_per_min: f64,
    pub backing_pages: u64,
    pub mm_stat: zram::MmStat,
    /// Peak of the device's own memory (its compressed bytes and part of the overhead).
    pub mem_peak: u64,
    /// zram's tiering counters.
    pub tiering: zram::TieringStats,
}

impl TieringReport {
    /// What makes a run wrong rather than slow: reads that failed or read back wrong, and
    /// writes that failed without a limit.
    pub fn problems(&self) -> u64 {
        let reference = self.runs.first().map_or(0, |r| r.failed_writes);
        reference
            + self
                .runs
                .iter()
                .map(|r| r.read_errors + r.verify_failures)
                .sum::<u64>()
    }
}

/// Page content: real pages or generated ones, one version per write.
#[derive(Clone, Debug)]
enum Source {
    Real(Arc<RealPages>),
    Mix(Mix),
}

impl Source {
    /// The content of `page` at `version` (0: never written, zeroes).
    fn fill(&self, seed: u64, page: u64, version: u32, out: &mut [u8; PAGE]) {
        if version == 0 {
            out.fill(0);
            return;
        }
        let seed = seed ^ u64::from(version).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match self {
            Source::Real(r) => out.copy_from_slice(r.pick(seed, page)),
            Source::Mix(m) => {
                fill_page(m, seed, page, out);
            }
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Real(r) => write!(f, "{r}"),
            Source::Mix(m) => write!(f, "mix={m}"),
        }
    }
}

/// How one run is set up.
struct RunSpec {
    name: String,
    policy: PolicyMode,
    mem_limit: u64,
    secondary: Option<String>,
}

/// What all runs share.
struct Plan<'a> {
    args: &'a TieringArgs,
    source: Source,
    pages: u64,
    hot: Vec<u64>,
    cold: Vec<u64>,
}

impl Plan<'_> {
    fn phase_len(&self) -> Duration {
        self.args.duration / self.args.phases
    }

    /// Whether device `dev` works in phase `p`.
    fn busy(&self, dev: usize, p: u32) -> bool {
        let n = self.args.devices;
        (dev + n - p as usize % n) % n < self.args.busy
    }

    fn seed(&self, dev: usize) -> u64 {
        self.args.seed.wrapping_add((dev as u64) << 40)
    }
}

fn validate(args: &TieringArgs) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Setup(m));
    if args.devices == 0 || args.busy == 0 || args.busy > args.devices {
        return bad(format!(
            "--busy {} of --devices {}: need 1 <= busy <= devices",
            args.busy, args.devices
        ));
    }
    if (args.phases as usize) < args.devices {
        return bad(format!(
            "--phases {} < --devices {}: every device must get a busy phase",
            args.phases, args.devices
        ));
    }
    if !(args.hot > 0.0 && args.hot < 1.0) {
        return bad(format!("--hot {}: need 0 < hot < 1", args.hot));
    }
    if args.size == 0 || args.size % PAGE as u64 != 0 || args.size / (PAGE as u64) < 64 {
        return bad(format!(
            "--size {}: need a multiple of 4096, >= 64 pages",
            args.size
        ));
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.cold_reads < 0.0 {
        return bad("--rate must be > 0 and --cold-reads >= 0".into());
    }
    if args.iodepth == 0 || args.fill_bursts == 0 || args.policy.is_empty() {
        return bad("--iodepth, --fill-bursts and --policy must not be 0 / empty".into());
    }
    if args.duration.is_zero() || args.sample.is_zero() {
        return bad("--duration and --sample must not be 0".into());
    }
    Ok(())
}

/// Runs the scenario: the reference run, then one limited run per policy mode.
pub fn run(args: &TieringArgs) -> Result<TieringReport, BenchError> {
    validate(args)?;
    let source = match &args.pages {
        Some(path) => Source::Real(load_pages(path)?),
        None => Source::Mix(args.mix.unwrap_or_default()),
    };
    let pages = args.size / PAGE as u64;
    let stride = (1.0 / args.hot).round().max(2.0) as u64;
    let (hot, cold): (Vec<u64>, Vec<u64>) = (0..pages).partition(|p| p % stride == 0);
    let plan = Plan {
        args,
        source,
        pages,
        hot,
        cold,
    };

    let reference = run_once(
        &plan,
        &RunSpec {
            name: format!("no limit, {}", args.comp),
            policy: PolicyMode::Off,
            mem_limit: 0,
            secondary: None,
        },
        None,
    )?;
    let footprint = reference.pool.mem_used_max;
    let limit = match args.mem_limit {
        MemLimit::Fraction(f) => (footprint as f64 * f) as u64 / PAGE as u64 * PAGE as u64,
        MemLimit::Bytes(b) => b,
    };
    let secondary = (!args.recomp.is_empty() && args.recomp != "none").then(|| args.recomp.clone());
    let mut runs = vec![];
    for &mode in &args.policy {
        let name = match mode {
            PolicyMode::Off => "limit, policy off",
            PolicyMode::On => "limit, policy on",
        };
        let spec = RunSpec {
            name: name.into(),
            policy: mode,
            mem_limit: limit,
            secondary: secondary.clone(),
        };
        runs.push(run_once(&plan, &spec, Some(&reference))?);
    }
    runs.insert(0, reference);
    Ok(TieringReport {
        pages: plan.source.to_string(),
        devices: args.devices,
        device_bytes: args.size,
        hot_pages: plan.hot.len() as u64,
        cold_pages: plan.cold.len() as u64,
        run_seconds: args.duration.as_secs_f64(),
        phases: args.phases,
        busy: args.busy,
        rate: args.rate,
        cold_reads_per_min: args.cold_reads,
        idle_age_seconds: args.idle_age.as_secs_f64(),
        promotion_target: args.promotion_target,
        lz4_footprint: footprint,
        mem_limit: limit,
        runs,
    })
}

/// The devices of one run, served in this process. Dropping it stops the servers and removes
/// the directory (sockets, backing files).
struct Rig {
    dir: PathBuf,
    store: Arc<zram::Store>,
    devices: Vec<Arc<zram::Device>>,
    served: Vec<Arc<BlkDevice>>,
    servers: Vec<DeviceServer>,
}

impl Rig {
    fn new(plan: &Plan, spec: &RunSpec) -> Result<Rig, BenchError> {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let setup = |e: &dyn fmt::Display| BenchError::Setup(e.to_string());
        let run = RUNS.fetch_add(1, Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vzram-bench-tiering-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| setup(&format!("{}: {e}", dir.display())))?;
        let mut rig = Rig {
            dir,
            store: Arc::new(
                zram::Store::new(zram::StoreConfig {
                    mem_limit: spec.mem_limit,
                    ..zram::StoreConfig::default()
                })
                .map_err(|e| setup(&e))?,
            ),
            devices: Vec::new(),
            served: Vec::new(),
            servers: Vec::new(),
        };
        let secondary: Vec<&str> = spec.secondary.as_deref().into_iter().collect();
        let comp =
            Arc::new(zcomp::Comp::parse(&plan.args.comp, &secondary).map_err(|e| setup(&e))?);
        for d in 0..plan.args.devices {
            let name = format!("vz{d}");
            let cfg = zram::Config {
                size: plan.args.size,
                backing_file: Some(rig.dir.join(format!("{name}.backing"))),
            };
            let device =
                zram::Device::new(rig.store.clone(), comp.clone(), cfg).map_err(|e| setup(&e))?;
            let socket = rig.dir.join(format!("{name}.sock"));
            let served = BlkDevice::new(
                name.clone(),
                socket.clone(),
                device.clone(),
                1,
                false,
                format!("bench-{name}"),
            );
            rig.served.push(served.clone());
            let blk = ConfigSpace {
                size: plan.args.size,
                blk_size: PAGE as u32,
                num_queues: 1,
                queue_size: 256,
            };
            let listener = UnixListener::bind(&socket)
                .map_err(|e| setup(&format!("{}: {e}", socket.display())))?;
            let server = DeviceServer::start(
                served,
                listener,
                blk,
                Duration::from_micros(plan.args.poll_us),
            )
            .map_err(|e| setup(&e))?;
            rig.devices.push(device);
            rig.servers.push(server);
        }
        Ok(rig)
    }

    fn socket(&self, dev: usize) -> PathBuf {
        self.dir.join(format!("vz{dev}.sock"))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in self.servers.drain(..) {
            s.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU seconds (user + system) of the process or of the calling thread.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we pass; no other effect.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Pages of one device accessed (read, or written successfully) and when: milliseconds since
/// the run's start, plus one (0: never).
struct Access(Vec<AtomicU32>);

impl Access {
    fn new(pages: u64) -> Access {
        Access((0..pages).map(|_| AtomicU32::new(0)).collect())
    }

    fn touch(&self, page: u64, start: Instant) {
        let ms = start.elapsed().as_millis().min(u128::from(u32::MAX - 1)) as u32 + 1;
        self.0[page as usize].store(ms, Relaxed);
    }

    /// Pages accessed within `window` before `now`.
    fn recent(&self, start: Instant, now: Instant, window: Duration) -> u64 {
        let now_ms = (now - start).as_millis() as u64 + 1;
        let from = now_ms.saturating_sub(window.as_millis() as u64);
        self.0
            .iter()
            .filter(|a| {
                let t = u64::from(a.load(Relaxed));
                t != 0 && t >= from
            })
            .count() as u64
    }
}

/// What a driver thread counted.
#[derive(Default)]
struct DriverResult {
    busy_phases: u32,
    writes: u64,
    failed_writes: u64,
    read_errors: u64,
    verify_failures: u64,
    verified: u64,
    kept_after_failed_write: u64,
    hot: Histogram,
    cold: Histogram,
    cpu_seconds: f64,
}

/// One device's load: a queue, and what each of its pages holds.
struct Driver<'a> {
    plan: &'a Plan<'a>,
    dev: usize,
    q: Queue,
    start: Instant,
    access: &'a Access,
    /// Version of each page's content (0: never written).
    version: Vec<u32>,
    /// Per hot page: in the guest (so the next access writes it) or in swap (reads it).
    in_guest: Vec<bool>,
    rng: SplitMix64,
    page: Box<[u8; PAGE]>,
    res: DriverResult,
}

impl Driver<'_> {
    fn run(mut self) -> vufront::Result<DriverResult> {
        let cpu = cpu_seconds(libc::RUSAGE_THREAD);
        let args = self.plan.args;
        let phase_len = self.plan.phase_len();
        let cold: Vec<Vec<u64>> = {
            let bursts = (0..args.phases)
                .filter(|&p| self.plan.busy(self.dev, p))
                .count()
                .min(args.fill_bursts as usize)
                .max(1);
            let per = self.plan.cold.len().div_ceil(bursts).max(1);
            self.plan.cold.chunks(per).map(<[u64]>::to_vec).collect()
        };
        for p in 0..args.phases {
            let end = self.start + phase_len * (p + 1);
            if !self.plan.busy(self.dev, p) {
                sleep_until(end);
                continue;
            }
            let k = self.res.busy_phases as usize;
            self.res.busy_phases += 1;
            if k == 0 {
                let hot = self.plan.hot.clone();
                self.burst(&hot)?;
            }
            if let Some(chunk) = cold.get(k) {
                self.burst(chunk)?;
            }
            self.steady(end)?;
        }
        self.res.cpu_seconds = cpu_seconds(libc::RUSAGE_THREAD) - cpu;
        Ok(self.res)
    }

    /// Writes `pages` with new content, `iodepth` requests in flight.
    fn burst(&mut self, pages: &[u64]) -> vufront::Result<()> {
        let depth = usize::from(self.plan.args.iodepth);
        let mut pending: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut next = pages.iter();
        loop {
            while pending.len() < depth {
                let Some(&p) = next.next() else { break };
                let v = self.version[p as usize] + 1;
                self.plan
                    .source
                    .fill(self.plan.seed(self.dev), p, v, &mut self.page);
                let tag = self
                    .q
                    .enqueue(&Request::write(p * SECTORS_PER_PAGE, &self.page[..]))?;
                pending.insert(tag, (p, v));
            }
            if pending.is_empty() {
                return Ok(());
            }
            self.q.notify()?;
            for c in self.q.complete(REQUEST_TIMEOUT)? {
                let (p, v) = pending.remove(&c.tag).ok_or_else(|| {
                    vufront::Error::Protocol(format!("completion of unknown request {}", c.tag))
                })?;
                self.written(p, v, &c);
            }
        }
    }

    fn written(&mut self, p: u64, v: u32, c: &Completion) {
        self.res.writes += 1;
        if c.ok() {
            self.version[p as usize] = v;
            self.access.touch(p, self.start);
        } else {
            self.res.failed_writes += 1;
        }
    }

    fn write(&mut self, p: u64) -> vufront::Result<bool> {
        let v = self.version[p as usize] + 1;
        self.plan
            .source
            .fill(self.plan.seed(self.dev), p, v, &mut self.page);
        let c = self.q.execute(
            &Request::write(p * SECTORS_PER_PAGE, &self.page[..]),
            REQUEST_TIMEOUT,
        )?;
        self.written(p, v, &c);
        if !c.ok() {
            // The page must still hold what the last successful write put there.
            self.read(p, Read::AfterFailedWrite)?;
        }
        Ok(c.ok())
    }

    /// Reads `p` and checks it against its last successful write.
    fn read(&mut self, p: u64, kind: Read) -> vufront::Result<()> {
        let c = self.q.execute(
            &Request::read(p * SECTORS_PER_PAGE, PAGE as u32),
            REQUEST_TIMEOUT,
        )?;
        if !c.ok() {
            self.res.read_errors += 1;
            return Ok(());
        }
        match kind {
            Read::Hot => self.res.hot.record(c.latency),
            Read::Cold => self.res.cold.record(c.latency),
            Read::AfterFailedWrite => {}
        }
        self.access.touch(p, self.start);
        self.plan.source.fill(
            self.plan.seed(self.dev),
            p,
            self.version[p as usize],
            &mut self.page,
        );
        if c.data[..] == self.page[..] {
            self.res.verified += 1;
            self.res.kept_after_failed_write += u64::from(kind == Read::AfterFailedWrite);
        } else {
            self.res.verify_failures += 1;
            if self.res.verify_failures <= 3 {
                log::warn!(
                    "vz{}: page {p} does not hold version {} of its content ({kind:?} read)",
                    self.dev,
                    self.version[p as usize]
                );
            }
        }
        Ok(())
    }

    /// Swaps hot pages in and out at `rate`, with a rare cold read, until `end`.
    fn steady(&mut self, end: Instant) -> vufront::Result<()> {
        let args = self.plan.args;
        let period = Duration::from_secs_f64(1.0 / args.rate);
        let cold_chance = args.cold_reads / 60.0 / args.rate;
        let mut next = Instant::now();
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            if next > now {
                std::thread::sleep(next.min(end) - now);
                continue;
            }
            // Late (a slow request): go on from now rather than catch up in a burst.
            next = if now - next > 20 * period {
                now + period
            } else {
                next + period
            };
            let uniform = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if !self.plan.cold.is_empty() && uniform < cold_chance {
                let p = self.plan.cold[self.rng.below(self.plan.cold.len() as u64) as usize];
                self.read(p, Read::Cold)?;
                continue;
            }
            let i = self.rng.below(self.plan.hot.len() as u64) as usize;
            let p = self.plan.hot[i];
            if self.in_guest[i] {
                // Swapped out again; a failed write leaves it in the guest.
                self.in_guest[i] = !self.write(p)?;
            } else {
                self.read(p, Read::Hot)?;
                self.in_guest[i] = true;
            }
        }
    }
}

/// Why a page is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// A hot page swapped in (latency recorded).
    Hot,
    /// A rare cold page swapped in (latency recorded apart).
    Cold,
    /// Right after a write of the page failed: it must hold its old content.
    AfterFailedWrite,
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Samples of the pool's memory and of recently used pages.
#[derive(Default)]
struct Sampler {
    samples: u64,
    peak: u64,
    sum: u128,
    device_peaks: Vec<u64>,
    recent_sum: Vec<u64>,
    recent_samples: u64,
}

impl Sampler {
    fn sample(&mut self, rig: &Rig) {
        let used = rig.store.mem_used_total();
        self.samples += 1;
        self.peak = self.peak.max(used);
        self.sum += u128::from(used);
        for (peak, d) in self.device_peaks.iter_mut().zip(&rig.devices) {
            *peak = (*peak).max(d.mem_used());
        }
    }

    fn sample_recent(&mut self, access: &[Access], start: Instant, window: Duration) {
        let now = Instant::now();
        for (sum, a) in self.recent_sum.iter_mut().zip(access) {
            *sum += a.recent(start, now, window);
        }
        self.recent_samples += 1;
    }
}

fn run_once(
    plan: &Plan,
    spec: &RunSpec,
    reference: Option<&RunReport>,
) -> Result<RunReport, BenchError> {
    let args = plan.args;
    let n = args.devices;
    let rig = Rig::new(plan, spec)?;
    // As `vzram serve` does with the policy on or off: a write at the limit takes pages idle
    // for the idle age (direct reclaim).
    rig.store.set_reclaim_age(args.idle_age);
    let policy = match spec.policy {
        PolicyMode::On => {
            let defaults = PolicyConfig::default();
            let config = PolicyConfig {
                idle_age: args.idle_age,
                max_cold_age: defaults.max_cold_age.max(args.idle_age * 8),
                promotion_target: args.promotion_target,
                ..defaults
            };
            let setup = PolicySetup {
                config,
                ..PolicySetup::default()
            };
            Some(
                PolicyThread::start(setup, rig.store.clone(), rig.served.clone())
                    .map_err(BenchError::Setup)?,
            )
        }
        PolicyMode::Off => None,
    };
    let mut fronts = Vec::new();
    let mut queues = Vec::new();
    for d in 0..n {
        let opts = Options {
            num_queues: 1,
            queue_size: 256,
            mem_size: 8 << 20,
            ..Options::default()
        };
        let mut f = Frontend::connect(rig.socket(d), &opts)?;
        queues.push(f.take_queue(0).expect("queue 0 set up"));
        fronts.push(f);
    }
    let access: Vec<Access> = (0..n).map(|_| Access::new(plan.pages)).collect();
    let mut sampler = Sampler {
        device_peaks: vec![0; n],
        recent_sum: vec![0; n],
        ..Sampler::default()
    };
    let done = AtomicBool::new(false);
    let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
    let start = Instant::now();
    let (results, sampler_cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(dev, q)| {
                let driver = Driver {
                    plan,
                    dev,
                    q,
                    start,
                    access: &access[dev],
                    version: vec![0; plan.pages as usize],
                    in_guest: vec![false; plan.hot.len()],
                    rng: SplitMix64::new(plan.seed(dev) ^ 0x7e1e_0001),
                    page: Box::new([0; PAGE]),
                    res: DriverResult::default(),
                };
                s.spawn(move || driver.run())
            })
            .collect();
        let cpu = cpu_seconds(libc::RUSAGE_THREAD);
        let recent_every = Duration::from_millis(500).max(args.sample);
        let mut last_recent = start;
        sampler.sample_recent(&access, start, args.idle_age);
        while !done.load(Relaxed) {
            sampler.sample(&rig);
            if last_recent.elapsed() >= recent_every {
                sampler.sample_recent(&access, start, args.idle_age);
                last_recent = Instant::now();
            }
            std::thread::sleep(args.sample);
            done.store(handles.iter().all(|h| h.is_finished()), Relaxed);
        }
        sampler.sample(&rig);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("driver thread panicked"))
            .collect();
        (results, cpu_seconds(libc::RUSAGE_THREAD) - cpu)
    });
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu_before;
    let policy_stats = policy.map(|p| {
        p.shutdown();
        p.stats()
    });
    drop(fronts);
    let results = results.into_iter().collect::<vufront::Result<Vec<_>>>()?;

    let minutes = seconds / 60.0;
    let mut per_device = Vec::new();
    let mut hot = Histogram::new();
    let mut cold = Histogram::new();
    for (d, (r, device)) in results.iter().zip(&rig.devices).enumerate() {
        hot.merge(&r.hot);
        cold.merge(&r.cold);
        let stats = device.stats();
        let recent = sampler.recent_sum[d] as f64 / sampler.recent_samples.max(1) as f64;
        per_device.push(DeviceReport {
            name: format!("vz{d}"),
            busy_phases: r.busy_phases,
            writes: r.writes,
            failed_writes: r.failed_writes,
            hot_reads: r.hot.count(),
            hot_read_us: r.hot.summary(),
            cold_reads: r.cold.count(),
            promotions: stats.bd_stat.bd_reads,
            promotions_per_min: stats.bd_stat.bd_reads as f64 / minutes,
            recently_used_mean: recent,
            promotion_target_per_min: args.promotion_target * recent,
            backing_pages: stats.bd_stat.bd_count,
            mem_peak: sampler.device_peaks[d],
            tiering: stats.tiering.clone(),
            mm_stat: stats.mm_stat.clone(),
        });
    }
    let zram_failed_writes = rig
        .devices
        .iter()
        .map(|d| d.stats().io_stat.failed_writes)
        .sum();
    let sum = |f: fn(&DriverResult) -> u64| results.iter().map(f).sum::<u64>();
    let pool = PoolMemory {
        samples: sampler.samples,
        peak: sampler.peak,
        mean: (sampler.sum / u128::from(sampler.samples.max(1))) as u64,
        mem_used_max: rig.store.mem_used_max(),
    };
    let hot_read_us = hot.summary();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let saved = |a: u64, b: u64| {
        if b > 0 {
            1.0 - a as f64 / b as f64
        } else {
            0.0
        }
    };
    let promotions: u64 = per_device.iter().map(|d| d.promotions).sum();
    let report = RunReport {
        name: spec.name.clone(),
        policy: spec.policy,
        mem_limit: spec.mem_limit,
        comp: match &spec.secondary {
            Some(s) => format!("{} (+{s})", args.comp),
            None => args.comp.clone(),
        },
        seconds,
        writes: sum(|r| r.writes),
        failed_writes: sum(|r| r.failed_writes),
        zram_failed_writes,
        read_errors: sum(|r| r.read_errors),
        verify_failures: sum(|r| r.verify_failures),
        verified_pages: sum(|r| r.verified),
        kept_after_failed_write: sum(|r| r.kept_after_failed_write),
        pool,
        hot_reads: hot.count(),
        hot_read_us,
        hot_p99_vs_reference: reference.map_or(1.0, |r| ratio(hot_read_us.p99, r.hot_read_us.p99)),
        cold_reads: cold.count(),
        cold_read_us: cold.summary(),
        promotions,
        promotions_per_min: promotions as f64 / minutes,
        promotion_target_per_min: per_device.iter().map(|d| d.promotion_target_per_min).sum(),
        backing_pages: per_device.iter().map(|d| d.backing_pages).sum(),
        saved_peak: reference.map_or(0.0, |r| saved(pool.peak, r.pool.peak)),
        saved_mean: reference.map_or(0.0, |r| saved(pool.mean, r.pool.mean)),
        cpu_seconds: cpu,
        load_cpu_seconds: results.iter().map(|r| r.cpu_seconds).sum::<f64>() + sampler_cpu,
        policy_stats,
        per_device,
    };
    drop(rig);
    Ok(report)
}

fn mib(b: u64) -> String {
    format!("{:.1}M", b as f64 / (1 << 20) as f64)
}

impl fmt::Display for TieringReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tiering: {} devices x {} ({} hot + {} cold pages), {}; {} phases of {:.2} s, {} busy \
             at {:.0} req/s, {} cold reads/min; idle age {:.1} s",
            self.devices,
            mib(self.device_bytes),
            self.hot_pages,
            self.cold_pages,
            self.pages,
            self.phases,
            self.run_seconds / f64::from(self.phases),
            self.busy,
            self.rate,
            self.cold_reads_per_min,
            self.idle_age_seconds,
        )?;
        writeln!(
            f,
            "lz4 footprint (peak of the no-limit run) {}, limit {} ({:.0}%)",
            mib(self.lz4_footprint),
            mib(self.mem_limit),
            100.0 * self.mem_limit as f64 / self.lz4_footprint.max(1) as f64
        )?;
        writeln!(
            f,
            "{:<22} {:>6} {:>7} {:>6} {:>7} {:>7} {:>5} {:>7} {:>7} {:>5} {:>11} {:>6} {:>6} \
             {:>6} {:>6} {:>6}",
            "RUN",
            "LIMIT",
            "WRITES",
            "FAILED",
            "PEAK",
            "MEAN",
            "PK/L",
            "HOTp50",
            "HOTp99",
            "xREF",
            "PROMO/MIN",
            "DISK",
            "SAVEDp",
            "SAVEDm",
            "CPU-s",
            "POL-s"
        )?;
        for r in &self.runs {
            let name = r.name.clone();
            let policy_cpu = r
                .policy_stats
                .as_ref()
                .map_or("-".into(), |p| format!("{:.2}", p.cpu_secs));
            writeln!(
                f,
                "{:<22} {:>6} {:>7} {:>6} {:>7} {:>7} {:>5} {:>7.1} {:>7.1} {:>5.2} {:>5.1}/{:<5.1} \
                 {:>6} {:>5.0}% {:>5.0}% {:>6.1} {:>6}",
                name,
                if r.mem_limit == 0 {
                    "-".into()
                } else {
                    mib(r.mem_limit)
                },
                r.writes,
                r.failed_writes,
                mib(r.pool.peak),
                mib(r.pool.mean),
                if r.mem_limit == 0 {
                    "-".into()
                } else {
                    format!("{:.2}", r.pool.peak as f64 / r.mem_limit as f64)
                },
                r.hot_read_us.p50,
                r.hot_read_us.p99,
                r.hot_p99_vs_reference,
                r.promotions_per_min,
                r.promotion_target_per_min,
                mib(r.backing_pages * PAGE as u64),
                100.0 * r.saved_peak,
                100.0 * r.saved_mean,
                r.cpu_seconds,
                policy_cpu,
            )?;
        }
        writeln!(
            f,
            "{:<22} {:>4} {:>7} {:>6} {:>7} {:>7} {:>7} {:>11} {:>7} {:>7}",
            "PER DEVICE",
            "DEV",
            "WRITES",
            "FAILED",
            "HOT",
            "HOTp99",
            "COLD",
            "PROMO/MIN",
            "DISK",
            "MEMpk"
        )?;
        for r in &self.runs {
            for d in &r.per_device {
                writeln!(
                    f,
                    "{:<22} {:>4} {:>7} {:>6} {:>7} {:>7.1} {:>7} {:>5.1}/{:<5.1} {:>7} {:>7}",
                    r.name,
                    d.name,
                    d.writes,
                    d.failed_writes,
                    d.hot_reads,
                    d.hot_read_us.p99,
                    d.cold_reads,
                    d.promotions_per_min,
                    d.promotion_target_per_min,
                    mib(d.backing_pages * PAGE as u64),
                    mib(d.mem_peak),
                )?;
            }
        }
        let total = |f: fn(&RunReport) -> u64| self.runs.iter().map(f).sum::<u64>();
        writeln!(
            f,
            "reads verified {} ({} right after a failed write), verify failures {}, read \
             errors {}",
            total(|r| r.verified_pages),
            total(|r| r.kept_after_failed_write),
            total(|r| r.verify_failures),
            total(|r| r.read_errors),
        )?;
        writeln!(
            f,
            "PEAK/MEAN: pool memory, sampled; PK/L: peak over the limit; HOTp50/p99: hot-page \
             reads (us); xREF: p99 over the no-limit run's"
        )?;
        writeln!(
            f,
            "PROMO/MIN: promotions (reads from the backing files) per minute / the target ({}% \
             of the pages used within the idle age); DISK: in the backing files at the end",
            100.0 * self.promotion_target
        )?;
        writeln!(
            f,
            "SAVEDp/m: pool memory saved over the no-limit lz4 run, peak / mean (a failed \
             write saves nothing real); CPU-s: the process (of which the load generator {}); \
             POL-s: the policy thread",
            self.runs
                .iter()
                .map(|r| format!("{:.1}", r.load_cpu_seconds))
                .collect::<Vec<_>>()
                .join("/"),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_limits_parse() {
        assert_eq!("0.6".parse::<MemLimit>(), Ok(MemLimit::Fraction(0.6)));
        assert_eq!("60%".parse::<MemLimit>(), Ok(MemLimit::Fraction(0.6)));
        assert_eq!("48M".parse::<MemLimit>(), Ok(MemLimit::Bytes(48 << 20)));
        assert_eq!("1.5M".parse::<MemLimit>(), Ok(MemLimit::Bytes(3 << 19)));
        for bad in ["0", "1.5", "0%", "lots", "4K"] {
            assert!(bad.parse::<MemLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_take_turns() {
        let args = TieringArgs {
            devices: 4,
            busy: 2,
            phases: 8,
            ..crate::tiering::tests::args()
        };
        let plan = Plan {
            args: &args,
            source: Source::Mix(Mix::default()),
            pages: 64,
            hot: vec![],
            cold: vec![],
        };
        for p in 0..8 {
            let busy = (0..4).filter(|&d| plan.busy(d, p)).count();
            assert_eq!(busy, 2, "phase {p}");
        }
        for d in 0..4 {
            let phases = (0..8).filter(|&p| plan.busy(d, p)).count();
            assert_eq!(phases, 4, "device {d}");
            assert!((0..8).any(|p| !plan.busy(d, p)));
        }
    }

    fn args() -> TieringArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: TieringArgs,
        }
        Cli::parse_from(["t"]).a
    }
}
