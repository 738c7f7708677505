//! A fio-like load generator for vhost-user-blk backends.
//!
//! A run connects once, sets up as many queues as its largest job needs, and runs its jobs one
//! after another (like fio's `stonewall`). The same job loop drives any other [`Target`] (for
//! instance a store called without vhost-user, see [`run_on`]), so that figures from different
//! targets are measured the same way. A job drives `numjobs` queues, one thread each,
//! keeping `iodepth` requests in flight per queue. Every page written holds
//! [`pagemix::fill_page`]`(mix, seed, page index)` — swap-like content that depends only on the
//! seed and the page's absolute index on the device — so every read can be checked against
//! regenerated content without remembering what was written. A bitmap of written pages (shared
//! by the jobs of a run) tells which pages a read may verify under [`Verify::Written`]; it is
//! sampled when a read is submitted, so a write that completes during the read does not make
//! the old content count as a failure.
//!
//! Latency is measured per request from enqueue to reap, so it includes the kick, the
//! backend's work, the call and the wake-up. Percentiles come from a log-linear histogram
//! (64 sub-buckets per power of two: within 1.6%).

use crate::{
    Completion, Error, Frontend, Layout, Options, Queue, Request, Result, RingCounters, Split,
    feature_names,
};
use pagemix::{Mix, SplitMix64, fill_page};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
// zram's page. pagemix (no dependencies) has its own equal constant; `fill_page` takes a
// `[u8; pagemix::PAGE_SIZE]`, so were they ever to differ, the calls here would not compile.
use zram::PAGE_SIZE;

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Random writes.
    RandWrite,
    /// Random reads.
    RandRead,
    /// Sequential writes.
    Write,
    /// Sequential reads.
    Read,
}

impl Rw {
    fn is_write(self) -> bool {
        matches!(self, Rw::RandWrite | Rw::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Rw::RandWrite | Rw::RandRead)
    }
}

impl fmt::Display for Rw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rw::RandWrite => "randwrite",
            Rw::RandRead => "randread",
            Rw::Write => "write",
            Rw::Read => "read",
        })
    }
}

impl FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "randwrite" => Ok(Rw::RandWrite),
            "randread" => Ok(Rw::RandRead),
            "write" => Ok(Rw::Write),
            "read" => Ok(Rw::Read),
            _ => Err(format!(
                "rw={s}: expected randwrite, randread, write or read"
            )),
        }
    }
}

/// How the threads of a job share the span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Thread `i` gets the `i`-th contiguous slice of the span.
    Range,
    /// Thread `i` gets blocks `i`, `i + numjobs`, `i + 2 numjobs`, ...
    Interleave,
}

impl FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "range" => Ok(Partition::Range),
            "interleave" => Ok(Partition::Interleave),
            _ => Err(format!("partition={s}: expected range or interleave")),
        }
    }
}

/// Which reads are checked against the generator's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// None.
    Off,
    /// Pages written earlier in this run (others count as unverified).
    Written,
    /// Every page: the device must already hold the generator's content for this seed (e.g.
    /// filled by an earlier run with the same mix and seed).
    All,
}

impl FromStr for Verify {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "0" => Ok(Verify::Off),
            "written" | "1" => Ok(Verify::Written),
            "all" => Ok(Verify::All),
            _ => Err(format!("verify={s}: expected off, written or all")),
        }
    }
}

/// One job.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Name in the report (default: the rw pattern).
    pub name: Option<String>,
    /// Access pattern.
    pub rw: Rw,
    /// Block size in bytes, a multiple of 4096.
    pub bs: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues (= threads) used, queue 0 upwards.
    pub numjobs: u16,
    /// Start of the span in bytes (a multiple of `bs`).
    pub offset: u64,
    /// Bytes covered, from `offset` (default: to the end of the device).
    pub span: Option<u64>,
    /// Stop after this long.
    pub runtime: Option<Duration>,
    /// Stop after this many requests in total (over all threads). With neither `runtime` nor
    /// `ops`, the job does one pass: as many requests as the span has blocks.
    pub ops: Option<u64>,
    /// How threads share the span.
    pub partition: Partition,
    /// Descriptor layout of each request (data split, indirect table). With [`Split::One`] and
    /// a device `size_max` below `bs`, data is split into `size_max` pieces.
    pub layout: Layout,
}

impl Default for Job {
    fn default() -> Self {
        Job {
            name: None,
            rw: Rw::RandWrite,
            bs: PAGE_SIZE as u32,
            iodepth: 1,
            numjobs: 1,
            offset: 0,
            span: None,
            runtime: None,
            ops: None,
            partition: Partition::Range,
            layout: Layout::default(),
        }
    }
}

impl FromStr for Job {
    type Err = String;

    /// `key=value` pairs separated by commas: `rw`, `bs`, `iodepth`, `numjobs`, `offset`,
    /// `span`, `runtime`, `ops`, `partition`, `segments` (data descriptors per request),
    /// `indirect` (0/1), `name`. Sizes are read like `vzram serve --size` (K, M, G, T, P, E:
    /// powers of 1024), durations s/ms/m (default seconds).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut job = Job::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("job: `{part}` is not key=value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k}={v}: {e}"));
            let size = |v: &str| zram::parse_size(v).map_err(|e| e.to_string());
            match k {
                "rw" => job.rw = v.parse()?,
                "bs" => job.bs = u32::try_from(size(v)?).map_err(|e| format!("bs: {e}"))?,
                "iodepth" => {
                    job.iodepth = u16::try_from(num(v)?).map_err(|e| format!("iodepth: {e}"))?
                }
                "numjobs" => {
                    job.numjobs = u16::try_from(num(v)?).map_err(|e| format!("numjobs: {e}"))?
                }
                "offset" => job.offset = size(v)?,
                "span" | "size" => job.span = Some(size(v)?),
                "runtime" => job.runtime = Some(parse_duration(v)?),
                "ops" => job.ops = Some(num(v)?),
                "partition" => job.partition = v.parse()?,
                "segments" => job.layout.split = Split::Even(num(v)? as usize),
                "indirect" => job.layout.indirect = num(v)? != 0,
                "name" => job.name = Some(v.to_string()),
                _ => return Err(format!("job: unknown key `{k}`")),
            }
        }
        Ok(job)
    }
}

/// Parses `20`, `20s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("duration `{s}`: expected N, Ns, Nms or Nm");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    if let Some(m) = s.strip_suffix('m') {
        return m
            .parse::<u64>()
            .map(|m| Duration::from_secs(60 * m))
            .map_err(|_| bad());
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(bad)
}

/// What to run, and against which socket.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The vhost-user-blk socket.
    pub socket: PathBuf,
    /// Jobs, run one after another.
    pub jobs: Vec<Job>,
    /// Page content mix (ignored when `pages` is given).
    pub mix: Mix,
    /// Real pages to write instead of generated ones: page `p` of the disk gets one of them,
    /// chosen by `(seed, p)` (see [`RealPages`]).
    pub pages: Option<Arc<RealPages>>,
    /// Content seed.
    pub seed: u64,
    /// Read verification.
    pub verify: Verify,
    /// Ring size (0: the smallest power of two >= 256 that holds every job's requests).
    pub queue_size: u16,
    /// Negotiate EVENT_IDX if offered.
    pub event_idx: bool,
    /// How long to keep trying to connect.
    pub connect_timeout: Duration,
    /// A request not completed within this is a fatal error of the run.
    pub request_timeout: Duration,
    /// Generate the content of every page the jobs touch before the first job starts, if it
    /// fits in this many bytes; otherwise pages are generated while the clock runs. Generating
    /// a swap-like page costs several microseconds, more than many backends take to store it,
    /// so without the cache a benchmark partly measures the generator.
    pub content_cache: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            socket: PathBuf::new(),
            jobs: vec![Job::default()],
            mix: Mix::default(),
            pages: None,
            seed: 1,
            verify: Verify::Written,
            queue_size: 0,
            event_idx: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            content_cache: 2 << 30,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// The result of one job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobReport {
    /// Job name.
    pub name: String,
    /// Access pattern.
    pub rw: Rw,
    /// Block size.
    pub bs: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues used.
    pub numjobs: u16,
    /// Bytes covered.
    pub span_bytes: u64,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved by completed requests.
    pub bytes: u64,
    /// Wall time from the first thread's start to the last one's end.
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Latency, enqueue to reap.
    pub lat_us: Latency,
    /// Requests completed with a status other than OK.
    pub errors: u64,
    /// OK requests whose used length was not what virtio-blk prescribes (data + 1 for reads,
    /// 1 for writes).
    pub bad_used_len: u64,
    /// Pages read whose content differed from what the generator wrote.
    pub verify_failures: u64,
    /// Pages read and found correct.
    pub verified_pages: u64,
    /// Pages read that could not be checked (not written in this run under
    /// [`Verify::Written`], or verification off).
    pub unverified_pages: u64,
    /// Completed requests per queue.
    pub per_queue_ops: Vec<u64>,
    /// Kicks sent.
    pub kicks: u64,
    /// Kicks left out because the backend asked for none.
    pub suppressed_kicks: u64,
    /// Times a thread blocked on the call eventfd.
    pub sleeps: u64,
}

/// The result of a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The socket.
    pub socket: String,
    /// Device capacity in bytes.
    pub capacity_bytes: u64,
    /// Queues the backend offers.
    pub queues_offered: u64,
    /// Features acknowledged.
    pub features: Vec<&'static str>,
    /// Page mix, in [`Mix`]'s string form.
    pub mix: String,
    /// Content seed.
    pub seed: u64,
    /// Verification mode.
    pub verify: Verify,
    /// Whether page content was generated before the jobs (see
    /// [`LoadOptions::content_cache`]); if not, generation ran inside the timed jobs.
    pub content_cached: bool,
    /// Seconds spent generating the cached content (not part of any job).
    pub prepare_seconds: f64,
    /// One entry per job, in order.
    pub jobs: Vec<JobReport>,
}

impl Report {
    /// Total of verify failures, errors and bad used lengths over all jobs.
    pub fn problems(&self) -> u64 {
        self.jobs
            .iter()
            .map(|j| j.verify_failures + j.errors + j.bad_used_len)
            .sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {:.1} MiB, {} queues offered, features {}",
            self.socket,
            self.capacity_bytes as f64 / (1 << 20) as f64,
            self.queues_offered,
            self.features.join(" ")
        )?;
        writeln!(
            f,
            "mix {} seed {} verify {:?}",
            self.mix, self.seed, self.verify
        )?;
        for j in &self.jobs {
            writeln!(
                f,
                "{}: rw={} bs={} iodepth={} numjobs={} span={:.1}MiB: {} ops in {:.2} s, \
                 {:.0} IOPS, {:.1} MiB/s",
                j.name,
                j.rw,
                j.bs,
                j.iodepth,
                j.numjobs,
                j.span_bytes as f64 / (1 << 20) as f64,
                j.ops,
                j.seconds,
                j.iops,
                j.mib_per_s
            )?;
            let l = &j.lat_us;
            writeln!(
                f,
                "  lat (us): min {:.1} mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                l.min, l.mean, l.p50, l.p99, l.p999, l.max
            )?;
            writeln!(
                f,
                "  errors {}, bad used len {}, verify: {} failed, {} pages ok, {} unverified; \
                 ops per queue {:?}; kicks {} (suppressed {}), sleeps {}",
                j.errors,
                j.bad_used_len,
                j.verify_failures,
                j.verified_pages,
                j.unverified_pages,
                j.per_queue_ops,
                j.kicks,
                j.suppressed_kicks,
                j.sleeps
            )?;
        }
        Ok(())
    }
}

/// Where a run's requests go: a vhost-user-blk device ([`run`]), or anything else that serves
/// virtio-blk reads and writes, such as a store called directly ([`run_on`]). Every target is
/// driven by the same job loop, so their figures are measured the same way.
pub trait Target {
    /// One queue, driven by one thread of a job.
    type Queue: TargetQueue + Send;
    /// What the report calls the target (a socket path, ...).
    fn name(&self) -> String;
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// The largest data piece the device takes in one descriptor (0: no limit).
    fn size_max(&self) -> u32 {
        0
    }
    /// Queues the device offers.
    fn queues_offered(&self) -> u64;
    /// Features negotiated, by name.
    fn features(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Requests a queue can have in flight: each job's `iodepth` is capped to it (the report
    /// gives the depth used).
    fn max_iodepth(&self) -> u16 {
        u16::MAX
    }
    /// The queues; a job with `numjobs = n` uses the first `n`.
    fn queues(&mut self) -> &mut [Self::Queue];
}

/// One queue of a [`Target`]: submit requests, learn when they complete.
pub trait TargetQueue {
    /// Submits `req` (it may be served at once) and returns its tag.
    fn enqueue(&mut self, req: &Request) -> Result<u64>;
    /// Tells the device about what was enqueued since the last call.
    fn notify(&mut self) -> Result<()>;
    /// Waits up to `timeout` for completions; returns at least one, or fails. Each one's
    /// latency runs from its enqueue to this reap.
    fn complete(&mut self, timeout: Duration) -> Result<Vec<Completion>>;
    /// Notification counters (zero for targets without notifications).
    fn counters(&self) -> RingCounters {
        RingCounters::default()
    }
    /// The queue's index, for log messages.
    fn index(&self) -> u16;
}

impl TargetQueue for Queue {
    fn enqueue(&mut self, req: &Request) -> Result<u64> {
        Queue::enqueue(self, req)
    }

    fn notify(&mut self) -> Result<()> {
        Queue::notify(self).map(drop)
    }

    fn complete(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        Queue::complete(self, timeout)
    }

    fn counters(&self) -> RingCounters {
        Queue::counters(self)
    }

    fn index(&self) -> u16 {
        Queue::index(self)
    }
}

/// A connected vhost-user-blk device and its queues (dropped before the device).
struct VhostUser {
    socket: PathBuf,
    queues: Vec<Queue>,
    dev: Frontend,
}

impl Target for VhostUser {
    type Queue = Queue;

    fn name(&self) -> String {
        self.socket.display().to_string()
    }

    fn capacity(&self) -> u64 {
        self.dev.capacity()
    }

    fn size_max(&self) -> u32 {
        self.dev.config().size_max
    }

    fn queues_offered(&self) -> u64 {
        self.dev.max_queues()
    }

    fn features(&self) -> Vec<&'static str> {
        feature_names(self.dev.features())
    }

    fn queues(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
}

fn validate(opts: &LoadOptions) -> Result<()> {
    if opts.jobs.is_empty() {
        return Err(Error::Invalid("no jobs".into()));
    }
    opts.mix
        .validate()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let page = PAGE_SIZE as u32;
    for j in &opts.jobs {
        if j.bs == 0 || j.bs % page != 0 {
            return Err(Error::Invalid(format!(
                "bs={} is not a multiple of 4096",
                j.bs
            )));
        }
        if j.iodepth == 0 || j.numjobs == 0 {
            return Err(Error::Invalid(
                "iodepth and numjobs must be at least 1".into(),
            ));
        }
        if j.offset % u64::from(j.bs) != 0 {
            return Err(Error::Invalid(format!(
                "offset={} is not a multiple of bs",
                j.offset
            )));
        }
    }
    Ok(())
}

/// Descriptors per request: header, status, data pieces (indirect: one).
fn descs(j: &Job) -> usize {
    match (&j.layout.split, j.layout.indirect) {
        (_, true) => 1,
        (Split::One, false) => 3,
        (Split::Even(n), false) => 2 + n.max(&1),
        (Split::Sizes(s), false) => 2 + s.len().max(1),
    }
}

/// Runs the jobs of `opts` against its socket.
pub fn run(opts: &LoadOptions) -> Result<Report> {
    validate(opts)?;
    let queues = max_numjobs(opts);
    let queue_size = if opts.queue_size != 0 {
        opts.queue_size
    } else {
        let need = opts
            .jobs
            .iter()
            .map(|j| usize::from(j.iodepth) * descs(j))
            .max()
            .unwrap_or(1);
        need.max(256).next_power_of_two().min(32768) as u16
    };
    // Per request: data (page-aligned, plus its gap) and two small pieces, with slack for
    // alignment; twice over so fragmentation never starves a queue.
    let per_queue: u64 = opts
        .jobs
        .iter()
        .map(|j| u64::from(j.iodepth) * (u64::from(j.bs) + 3 * 4096 + 16 * descs(j) as u64))
        .max()
        .unwrap_or(0);
    let mem_size = (2 * per_queue * u64::from(queues) + (4 << 20)).max(16 << 20);

    let dev_opts = Options {
        num_queues: queues,
        queue_size,
        mem_size,
        event_idx: opts.event_idx,
        connect_timeout: opts.connect_timeout,
        ..Options::default()
    };
    let mut dev = Frontend::connect(&opts.socket, &dev_opts)?;
    let queues = dev.take_queues();
    run_on(
        &mut VhostUser {
            socket: opts.socket.clone(),
            dev,
            queues,
        },
        opts,
    )
}

/// The queues a run needs: as many as its largest job's `numjobs`.
pub fn max_numjobs(opts: &LoadOptions) -> u16 {
    opts.jobs.iter().map(|j| j.numjobs).max().unwrap_or(1)
}

/// Runs the jobs of `opts` against `target` (`opts.socket`, the ring and connection settings
/// are not used). The target needs [`max_numjobs`] queues.
pub fn run_on<T: Target>(target: &mut T, opts: &LoadOptions) -> Result<Report> {
    validate(opts)?;
    let capacity = target.capacity();
    let size_max = target.size_max();
    let max_iodepth = target.max_iodepth().max(1);
    if target.queues().len() < usize::from(max_numjobs(opts)) {
        return Err(Error::Invalid(format!(
            "{} queues for jobs with numjobs={}",
            target.queues().len(),
            max_numjobs(opts)
        )));
    }
    let written = Arc::new(Written::new(capacity / PAGE_SIZE as u64));

    // Every page any job may touch: [lo, hi) in pages.
    let (lo, hi) = opts.jobs.iter().fold((u64::MAX, 0), |(lo, hi), j| {
        let end = j
            .span
            .map_or(capacity, |s| j.offset.saturating_add(s))
            .min(capacity);
        (
            lo.min(j.offset / PAGE_SIZE as u64),
            hi.max(end / PAGE_SIZE as u64),
        )
    });
    let prepare = Instant::now();
    let cache = (hi > lo && (hi - lo) * PAGE_SIZE as u64 <= opts.content_cache)
        .then(|| Content::build(opts, lo, hi));
    let prepare_seconds = prepare.elapsed().as_secs_f64();

    let mut reports = Vec::new();
    for (job_index, job) in opts.jobs.iter().enumerate() {
        let span = job
            .span
            .unwrap_or(capacity.saturating_sub(job.offset))
            .min(capacity.saturating_sub(job.offset));
        let blocks = span / u64::from(job.bs);
        if blocks < u64::from(job.numjobs) {
            return Err(Error::Invalid(format!(
                "job {}: span of {span} bytes holds {blocks} blocks of {} for {} threads",
                job.rw, job.bs, job.numjobs
            )));
        }
        let mut job = job.clone();
        job.iodepth = job.iodepth.min(max_iodepth);
        if job.layout.split == Split::One && size_max > 0 && job.bs > size_max {
            let pieces = job.bs.div_ceil(size_max);
            job.layout.split = Split::Sizes(
                (0..pieces)
                    .map(|i| size_max.min(job.bs - i * size_max))
                    .collect(),
            );
        }
        let qs = target.queues();
        let before: Vec<_> = qs.iter().map(TargetQueue::counters).collect();
        let ctx = Ctx {
            job: &job,
            job_index: job_index as u64,
            cache: cache.as_ref(),
            opts,
            blocks,
            written: &written,
        };
        let barrier = Barrier::new(usize::from(job.numjobs));
        let results: Vec<Result<Worker>> = std::thread::scope(|s| {
            let handles: Vec<_> = qs
                .iter_mut()
                .take(usize::from(job.numjobs))
                .enumerate()
                .map(|(t, q)| {
                    let (ctx, barrier) = (&ctx, &barrier);
                    s.spawn(move || run_thread(ctx, q, t as u64, barrier))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("load thread panicked"))
                .collect()
        });
        let workers = results.into_iter().collect::<Result<Vec<_>>>()?;
        let after: Vec<_> = qs.iter().map(TargetQueue::counters).collect();
        reports.push(job_report(&job, span, &workers, &before, &after));
    }
    Ok(Report {
        socket: target.name(),
        capacity_bytes: capacity,
        queues_offered: target.queues_offered(),
        features: target.features(),
        mix: match &opts.pages {
            Some(real) => real.to_string(),
            None => opts.mix.to_string(),
        },
        seed: opts.seed,
        verify: opts.verify,
        content_cached: cache.is_some(),
        prepare_seconds,
        jobs: reports,
    })
}

/// Pregenerated page content for pages `first..first + n` (generating a page costs more than
/// storing it, so a benchmark must not do it in its timed loop).
#[derive(Debug)]
pub struct Content {
    first: u64,
    bytes: Vec<u8>,
}

impl Content {
    /// The content of pages `lo..hi`, generated on every core.
    pub fn build(opts: &LoadOptions, lo: u64, hi: u64) -> Content {
        let mut bytes = vec![0u8; ((hi - lo) as usize) * PAGE_SIZE];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = (hi - lo).div_ceil(threads as u64) as usize * PAGE_SIZE;
        std::thread::scope(|s| {
            for (t, part) in bytes.chunks_mut(per.max(PAGE_SIZE)).enumerate() {
                s.spawn(move || {
                    let first = lo + (t * per / PAGE_SIZE) as u64;
                    for (i, page) in part.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        let page: &mut [u8; PAGE_SIZE] = page.try_into().unwrap();
                        fill(opts, first + i as u64, page);
                    }
                });
            }
        });
        Content { first: lo, bytes }
    }

    /// One page's content, if it is in the cache.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        let i = usize::try_from(page.checked_sub(self.first)?).ok()?;
        self.bytes.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE)
    }
}

/// The generator's content of `page`, from the cache or generated into `scratch`.
fn content<'a>(ctx: &'a Ctx, page: u64, scratch: &'a mut [u8; PAGE_SIZE]) -> &'a [u8] {
    if let Some(p) = ctx.cache.and_then(|c| c.page(page)) {
        return p;
    }
    fill(ctx.opts, page, scratch);
    &scratch[..]
}

/// The content the run writes to `page`: a real page if the options have them, else the
/// generator's.
fn fill(opts: &LoadOptions, page: u64, out: &mut [u8; PAGE_SIZE]) {
    match &opts.pages {
        Some(real) => out.copy_from_slice(real.pick(opts.seed, page)),
        None => {
            fill_page(&opts.mix, opts.seed, page, out);
        }
    }
}

/// A set of real 4 KiB pages (for example a dump of processes' anonymous memory) that a run
/// writes instead of generated ones. Which page lands where depends only on the seed and the
/// disk page, so reads are verified without remembering what was written.
#[derive(Debug)]
pub struct RealPages {
    name: String,
    bytes: Vec<u8>,
}

impl RealPages {
    /// `bytes` holds whole pages; `name` says where they came from (for reports).
    pub fn new(name: String, bytes: Vec<u8>) -> std::result::Result<RealPages, String> {
        if bytes.is_empty() || bytes.len() % PAGE_SIZE != 0 {
            return Err(format!(
                "{name}: {} bytes is not a whole, non-zero number of 4 KiB pages",
                bytes.len()
            ));
        }
        Ok(RealPages { name, bytes })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.bytes.len() / PAGE_SIZE
    }

    /// Always false: a set holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page that disk page `page` gets under `seed`.
    pub fn pick(&self, seed: u64, page: u64) -> &[u8] {
        let i = SplitMix64::new(seed ^ page.rotate_left(17)).next_u64() % self.len() as u64;
        let i = i as usize * PAGE_SIZE;
        &self.bytes[i..i + PAGE_SIZE]
    }
}

impl fmt::Display for RealPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pages={} ({} real pages)", self.name, self.len())
    }
}

/// Bitmap of pages written during a run.
struct Written(Vec<AtomicU64>);

impl Written {
    fn new(pages: u64) -> Written {
        Written((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn set(&self, page: u64) {
        if let Some(w) = self.0.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    fn get(&self, page: u64) -> bool {
        self.0
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }
}

struct Ctx<'a> {
    job: &'a Job,
    job_index: u64,
    cache: Option<&'a Content>,
    opts: &'a LoadOptions,
    blocks: u64,
    written: &'a Written,
}

struct Worker {
    hist: Histogram,
    ops: u64,
    errors: u64,
    bad_used_len: u64,
    verify_failures: u64,
    verified: u64,
    unverified: u64,
    start: Instant,
    end: Instant,
}

struct Pending {
    first_page: u64,
    // For reads: which pages may be verified (sampled at submission).
    check: Vec<bool>,
}

fn run_thread<Q: TargetQueue>(ctx: &Ctx, q: &mut Q, t: u64, barrier: &Barrier) -> Result<Worker> {
    let job = ctx.job;
    let n = u64::from(job.numjobs);
    let bs = u64::from(job.bs);
    let pages_per_block = bs / PAGE_SIZE as u64;
    // This thread's blocks: local index k -> absolute block number.
    let (mine, to_block): (u64, Box<dyn Fn(u64) -> u64 + Sync>) = match job.partition {
        Partition::Range => {
            let per = ctx.blocks / n;
            let first = t * per;
            let count = if t + 1 == n { ctx.blocks - first } else { per };
            (count, Box::new(move |k| first + k))
        }
        Partition::Interleave => {
            let count = (ctx.blocks - t).div_ceil(n);
            (count, Box::new(move |k| t + k * n))
        }
    };
    let target = match (job.ops, job.runtime) {
        (Some(ops), _) => ops / n + u64::from(t < ops % n),
        (None, Some(_)) => u64::MAX,
        (None, None) => mine,
    };
    let first_block = job.offset / bs;
    // Offsets differ per thread and per job: a randread after a randwrite must not replay the
    // writer's sequence (it would only ever read pages just written).
    let mut rng = SplitMix64::new(
        SplitMix64::new(ctx.opts.seed ^ (ctx.job_index << 32) ^ t).next_u64() ^ 0x5eed,
    );
    let mut seq = 0u64;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let mut data = vec![0u8; job.bs as usize];
    let mut w = Worker {
        hist: Histogram::new(),
        ops: 0,
        errors: 0,
        bad_used_len: 0,
        verify_failures: 0,
        verified: 0,
        unverified: 0,
        start: Instant::now(),
        end: Instant::now(),
    };
    let verify = ctx.opts.verify;
    barrier.wait();
    w.start = Instant::now();
    let deadline = job.runtime.map(|r| w.start + r);
    let mut submitted = 0u64;
    loop {
        while pending.len() < usize::from(job.iodepth)
            && submitted < target
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            let k = if job.rw.is_random() {
                rng.below(mine)
            } else {
                let k = seq % mine;
                seq += 1;
                k
            };
            let byte = (first_block + to_block(k)) * bs;
            let first_page = byte / PAGE_SIZE as u64;
            let sector = byte / zram::SECTOR_SIZE;
            let (req, check) = if job.rw.is_write() {
                for (i, chunk) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    chunk.copy_from_slice(content(ctx, first_page + i as u64, &mut page));
                }
                (Request::write(sector, &data), Vec::new())
            } else {
                let check = (0..pages_per_block)
                    .map(|i| match verify {
                        Verify::Off => false,
                        Verify::All => true,
                        Verify::Written => ctx.written.get(first_page + i),
                    })
                    .collect();
                (Request::read(sector, job.bs), check)
            };
            let tag = q.enqueue(&req.with_layout(job.layout.clone()))?;
            pending.insert(tag, Pending { first_page, check });
            submitted += 1;
        }
        if pending.is_empty() {
            break;
        }
        q.notify()?;
        for c in q.complete(ctx.opts.request_timeout)? {
            let p = pending.remove(&c.tag).ok_or_else(|| {
                Error::Protocol(format!("completion of unknown request {}", c.tag))
            })?;
            w.hist.record(c.latency);
            w.ops += 1;
            if !c.ok() {
                w.errors += 1;
                continue;
            }
            if job.rw.is_write() {
                w.bad_used_len += u64::from(c.used_len != 1);
                for i in 0..pages_per_block {
                    ctx.written.set(p.first_page + i);
                }
            } else {
                w.bad_used_len += u64::from(c.used_len != job.bs + 1);
                for (i, chunk) in c.data.chunks_exact(PAGE_SIZE).enumerate() {
                    if !p.check[i] {
                        w.unverified += 1;
                        continue;
                    }
                    if chunk == content(ctx, p.first_page + i as u64, &mut page) {
                        w.verified += 1;
                    } else {
                        w.verify_failures += 1;
                        if w.verify_failures <= 3 {
                            log::warn!(
                                "verify failure: page {} (queue {})",
                                p.first_page + i as u64,
                                q.index()
                            );
                        }
                    }
                }
            }
        }
    }
    w.end = Instant::now();
    Ok(w)
}

fn job_report(
    job: &Job,
    span: u64,
    workers: &[Worker],
    before: &[crate::RingCounters],
    after: &[crate::RingCounters],
) -> JobReport {
    let mut hist = Histogram::new();
    workers.iter().for_each(|w| hist.merge(&w.hist));
    let start = workers.iter().map(|w| w.start).min().unwrap();
    let end = workers.iter().map(|w| w.end).max().unwrap();
    let seconds = (end - start).as_secs_f64().max(1e-9);
    let ops: u64 = workers.iter().map(|w| w.ops).sum();
    let bytes = ops * u64::from(job.bs);
    let sum = |f: fn(&Worker) -> u64| workers.iter().map(f).sum::<u64>();
    let used = usize::from(job.numjobs);
    let delta = |f: fn(&crate::RingCounters) -> u64| {
        (0..used).map(|i| f(&after[i]) - f(&before[i])).sum::<u64>()
    };
    JobReport {
        name: job.name.clone().unwrap_or_else(|| job.rw.to_string()),
        rw: job.rw,
        bs: job.bs,
        iodepth: job.iodepth,
        numjobs: job.numjobs,
        span_bytes: span,
        ops,
        bytes,
        seconds,
        iops: ops as f64 / seconds,
        mib_per_s: bytes as f64 / seconds / (1 << 20) as f64,
        lat_us: hist.summary(),
        errors: sum(|w| w.errors),
        bad_used_len: sum(|w| w.bad_used_len),
        verify_failures: sum(|w| w.verify_failures),
        verified_pages: sum(|w| w.verified),
        unverified_pages: sum(|w| w.unverified),
        per_queue_ops: workers.iter().map(|w| w.ops).collect(),
        kicks: delta(|c| c.kicks),
        suppressed_kicks: delta(|c| c.suppressed_kicks),
        sleeps: delta(|c| c.sleeps),
    }
}

/// Log-linear latency histogram over nanoseconds: values below 64 exact, above that 64
/// sub-buckets per power of two.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// Empty.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; (64 - SUB_BITS as usize + 1) * SUB as usize],
            total: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
        ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    // The middle of bucket `i`'s value range.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = i / SUB - 1 + u64::from(SUB_BITS);
        let sub = i % SUB;
        let low = (SUB + sub) << (e - u64::from(SUB_BITS));
        low + (1 << (e - u64::from(SUB_BITS))) / 2
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.sum_ns += o.sum_ns;
        self.min_ns = self.min_ns.min(o.min_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value below which a fraction `q` of the samples lie, in nanoseconds (clamped to
    /// the observed min and max).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// min / mean / p50 / p99 / p99.9 / max in microseconds.
    pub fn summary(&self) -> Latency {
        if self.total == 0 {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            min: us(self.min_ns),
            mean: self.sum_ns as f64 / self.total as f64 / 1000.0,
            p50: us(self.quantile_ns(0.50)),
            p99: us(self.quantile_ns(0.99)),
            p999: us(self.quantile_ns(0.999)),
            max: us(self.max_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_bucket_precision() {
        let mut h = Histogram::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 10_000.0);
        assert!((s.mean - 5000.5).abs() < 0.01);
        for (got, want) in [(s.p50, 5000.0), (s.p99, 9900.0), (s.p999, 9990.0)] {
            assert!((got - want).abs() / want < 0.02, "{got} vs {want}");
        }
        let mut small = Histogram::new();
        small.record(Duration::from_nanos(5));
        assert_eq!(small.quantile_ns(0.5), 5);
        for v in [0u64, 63, 64, 65, 1000, 1 << 40, u64::MAX] {
            let i = Histogram::index(v);
            let mid = Histogram::value(i);
            assert!(
                mid.abs_diff(v) as f64 <= v as f64 / 60.0 + 1.0,
                "{v} -> {i} -> {mid}"
            );
        }
    }

    #[test]
    fn job_specs_parse() {
        let j: Job = "rw=randread,bs=64k,iodepth=32,numjobs=2,runtime=1.5s,span=1g,\
                      partition=interleave,segments=4,indirect=1,name=x"
            .parse()
            .unwrap();
        assert_eq!(j.rw, Rw::RandRead);
        assert_eq!(j.bs, 65536);
        assert_eq!(j.iodepth, 32);
        assert_eq!(j.numjobs, 2);
        assert_eq!(j.runtime, Some(Duration::from_millis(1500)));
        assert_eq!(j.span, Some(1 << 30));
        assert_eq!(j.partition, Partition::Interleave);
        assert_eq!(j.layout.split, Split::Even(4));
        assert!(j.layout.indirect);
        assert!("rw=randjump".parse::<Job>().is_err());
        assert!("iodepth".parse::<Job>().is_err());
        assert!("bs=4q".parse::<Job>().is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!("span=1.5M".parse::<Job>().unwrap().span, Some(3 << 19));
    }
}
