//! `vzram bench`: fio-like load with no VM. Against any vhost-user-blk socket (vzram,
//! qemu-storage-daemon, ...), against a vzram device started in this process, or against the
//! store alone (the same jobs without vhost-user: what the protocol and rings cost).

use crate::blk::{BlkGeometry, PAGE_SIZE};
use crate::daemon::DeviceServer;
use crate::served::Served;
use clap::Args;
use pagemix::{Mix, SplitMix64};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vufront::load::{self, Content, Histogram, Job, JobReport, LoadOptions, Rw, Verify};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// vhost-user-blk socket to load. Without it, a vzram device is started in this process
    /// (see --size, --comp) and loaded over a socket of its own.
    #[arg(long, value_name = "PATH", conflicts_with = "store_only")]
    pub socket: Option<PathBuf>,

    /// Run the jobs on the store directly, without vhost-user (one thread per job thread,
    /// iodepth ignored): the baseline for the protocol's cost.
    #[arg(long)]
    pub store_only: bool,

    /// A job: `rw=randwrite|randread|write|read,bs=4k,iodepth=32,numjobs=2,span=256m,runtime=10s`
    /// (also offset, ops, partition=range|interleave, segments, indirect, name). Jobs run in
    /// order; reads verify what earlier jobs wrote. Default: fill 256 MiB sequentially, then
    /// 10 s of random writes and 10 s of random reads at depth 32 on one queue.
    #[arg(long = "job", value_name = "SPEC")]
    pub jobs: Vec<Job>,

    /// Page content, e.g. `zero=0.1,same=0.05,random=0.03,text=0.25` (the rest pointer-rich
    /// heap pages); default: a swap-like mix.
    #[arg(long, value_name = "MIX")]
    pub mix: Option<Mix>,

    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// off, written (pages written in this run) or all.
    #[arg(long, default_value = "written")]
    pub verify: Verify,

    /// Size of the in-process device.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub size: u64,

    /// Compression of the in-process device (as `vzram serve --comp`).
    #[arg(long, value_name = "ALGO", default_value = "lz4")]
    pub comp: String,

    /// Queues the in-process device offers.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub num_queues: u16,

    /// Ring polling of the in-process device, as `vzram serve --poll-us`.
    #[arg(long, value_name = "US", default_value_t = 32)]
    pub poll_us: u64,

    /// Do not negotiate EVENT_IDX.
    #[arg(long)]
    pub no_event_idx: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    zram::parse_size(s).map_err(|e| e.to_string())
}

fn default_jobs() -> Vec<Job> {
    [
        "name=fill,rw=write,iodepth=32,span=256m",
        "name=randwrite-qd32,rw=randwrite,iodepth=32,span=256m,runtime=10s",
        "name=randread-qd32,rw=randread,iodepth=32,span=256m,runtime=10s",
    ]
    .iter()
    .map(|s| s.parse().expect("built-in job"))
    .collect()
}

/// What a run measured, plus the store's statistics when the store is ours.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub target: String,
    pub jobs: Vec<JobReport>,
    /// zram's mm_stat after the last job (in-process device and store-only runs).
    pub mm_stat: Option<zram::MmStat>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Load(#[from] vufront::Error),
    #[error("{0}")]
    Setup(String),
}

pub fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let jobs = if args.jobs.is_empty() {
        default_jobs()
    } else {
        args.jobs.clone()
    };
    let mix = args.mix.unwrap_or_default();
    if let Some(socket) = &args.socket {
        let report = load::run(&load_options(socket.clone(), jobs, mix, args))?;
        return Ok(BenchReport {
            target: socket.display().to_string(),
            jobs: report.jobs,
            mm_stat: None,
        });
    }
    let device = in_process_device(args)?;
    if args.store_only {
        let content = Content::build(&mix, args.seed, 0, content_pages(&jobs, device.pages()));
        let jobs = jobs
            .iter()
            .map(|j| store_job(&device, j, &content))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(BenchReport {
            target: format!("store ({})", args.comp),
            jobs,
            mm_stat: Some(device.stats().mm_stat),
        });
    }
    let dir = std::env::temp_dir().join(format!("vzram-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let socket = dir.join("bench.sock");
    let served = Served::new(
        "bench".into(),
        socket.clone(),
        device.clone(),
        usize::from(args.num_queues),
        false,
        "vzram-bench".into(),
    );
    let blk = BlkGeometry {
        size: args.size,
        blk_size: PAGE_SIZE as u32,
        num_queues: args.num_queues,
        queue_size: 1024,
    };
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", socket.display())))?;
    let server = DeviceServer::start(served, listener, blk, Duration::from_micros(args.poll_us))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let result = load::run(&load_options(socket, jobs, mix, args));
    // Hang up first: stopping waits for the connection to end.
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchReport {
        target: format!("vzram in-process ({})", args.comp),
        jobs: result?.jobs,
        mm_stat: Some(device.stats().mm_stat),
    })
}

fn load_options(socket: PathBuf, jobs: Vec<Job>, mix: Mix, args: &BenchArgs) -> LoadOptions {
    LoadOptions {
        socket,
        jobs,
        mix,
        seed: args.seed,
        verify: args.verify,
        event_idx: !args.no_event_idx,
        ..LoadOptions::default()
    }
}

fn in_process_device(args: &BenchArgs) -> Result<Arc<zram::Device>, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let comp = Arc::new(zcomp::Comp::parse(&args.comp, &[]).map_err(|e| setup(&e))?);
    let store = Arc::new(zram::Store::new(zram::StoreConfig::default()).map_err(|e| setup(&e))?);
    let cfg = zram::Config {
        size: args.size,
        backing_file: None,
    };
    Ok(Arc::new(
        zram::Device::new(store, comp, cfg).map_err(|e| setup(&e))?,
    ))
}

/// Pages `0..n` cover every job's span.
fn content_pages(jobs: &[Job], pages: u64) -> u64 {
    jobs.iter()
        .map(|j| {
            let end = j.span.map_or(u64::MAX, |s| j.offset.saturating_add(s));
            (end / PAGE_SIZE).min(pages)
        })
        .max()
        .unwrap_or(0)
}

/// One job straight on the store: each thread serves its slice of the span one page at a
/// time, as a worker thread does, with the same page content and verification.
fn store_job(
    device: &Arc<zram::Device>,
    job: &Job,
    content: &Content,
) -> Result<JobReport, BenchError> {
    if job.bs as u64 != PAGE_SIZE {
        return Err(BenchError::Setup(
            "--store-only runs bs=4k jobs only".into(),
        ));
    }
    let pages = device.pages().saturating_sub(job.offset / PAGE_SIZE);
    let span = job.span.map_or(pages, |s| (s / PAGE_SIZE).min(pages));
    let threads = u64::from(job.numjobs.max(1));
    if span < threads {
        return Err(BenchError::Setup(
            "the span is smaller than the number of threads".into(),
        ));
    }
    let first = job.offset / PAGE_SIZE;
    let barrier = Barrier::new(threads as usize);
    let results: Vec<(Histogram, u64, u64, Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, device) = (&barrier, device.clone());
                let content = &content;
                s.spawn(move || {
                    let lo = first + span * t / threads;
                    let hi = first + span * (t + 1) / threads;
                    let mut stream = device.new_stream();
                    let mut rng = SplitMix64::new((t + 1).wrapping_mul(0x9E37_79B9));
                    let mut page = [0u8; PAGE_SIZE as usize];
                    let mut hist = Histogram::new();
                    let (mut ops, mut bad) = (0u64, 0u64);
                    let per_thread_ops = job.ops.map(|o| o.div_ceil(threads));
                    let one_pass = job.runtime.is_none() && job.ops.is_none();
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = job.runtime.map(|r| start + r);
                    let random = matches!(job.rw, Rw::RandRead | Rw::RandWrite);
                    let write = matches!(job.rw, Rw::RandWrite | Rw::Write);
                    loop {
                        if one_pass && ops == hi - lo
                            || per_thread_ops.is_some_and(|n| ops >= n)
                            || deadline.is_some_and(|d| ops % 64 == 0 && Instant::now() >= d)
                        {
                            break;
                        }
                        let index = if random {
                            lo + rng.next_u64() % (hi - lo)
                        } else {
                            lo + ops % (hi - lo)
                        };
                        let want: &[u8; PAGE_SIZE as usize] = content
                            .page(index)
                            .expect("content covers the span")
                            .try_into()
                            .expect("a page");
                        let t0 = Instant::now();
                        if write {
                            let ok = device.write_page(index, want, &mut stream).is_ok();
                            bad += u64::from(!ok);
                        } else {
                            let ok = device.read_page(index, &mut page, &mut stream).is_ok();
                            bad += u64::from(!ok || page != *want);
                        }
                        hist.record(t0.elapsed());
                        ops += 1;
                    }
                    (hist, ops, bad, start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let mut hist = Histogram::new();
    let (mut ops, mut bad) = (0, 0);
    let start = results.iter().map(|r| r.3).min().unwrap();
    let end = results.iter().map(|r| r.4).max().unwrap();
    let mut per_queue_ops = Vec::new();
    for (h, o, b, _, _) in &results {
        hist.merge(h);
        ops += o;
        bad += b;
        per_queue_ops.push(*o);
    }
    let seconds = end.duration_since(start).as_secs_f64().max(1e-9);
    let read = matches!(job.rw, Rw::RandRead | Rw::Read);
    Ok(JobReport {
        name: job.name.clone().unwrap_or_else(|| job.rw.to_string()),
        rw: job.rw,
        bs: job.bs,
        iodepth: 1,
        numjobs: job.numjobs,
        span_bytes: span * PAGE_SIZE,
        ops,
        bytes: ops * PAGE_SIZE,
        seconds,
        iops: ops as f64 / seconds,
        mib_per_s: (ops * PAGE_SIZE) as f64 / seconds / f64::from(1 << 20),
        lat_us: hist.summary(),
        errors: if read { 0 } else { bad },
        bad_used_len: 0,
        verify_failures: if read { bad } else { 0 },
        verified_pages: if read { ops - bad } else { 0 },
        unverified_pages: 0,
        per_queue_ops,
        kicks: 0,
        suppressed_kicks: 0,
        sleeps: 0,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.target)?;
        writeln!(
            f,
            "{:<18} {:>9} {:>4} {:>3} {:>10} {:>8} {:>9} {:>9} {:>9} {:>6}",
            "JOB", "RW", "QD", "Q", "IOPS", "MiB/s", "p50(us)", "p99(us)", "p99.9", "ERRORS"
        )?;
        for j in &self.jobs {
            writeln!(
                f,
                "{:<18} {:>9} {:>4} {:>3} {:>10.0} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>6}",
                j.name,
                j.rw.to_string(),
                j.iodepth,
                j.numjobs,
                j.iops,
                j.mib_per_s,
                j.lat_us.p50,
                j.lat_us.p99,
                j.lat_us.p999,
                j.errors + j.verify_failures + j.bad_used_len
            )?;
        }
        if let Some(mm) = &self.mm_stat {
            writeln!(f, "mm_stat {}", mm.line())?;
        }
        Ok(())
    }
}

impl BenchReport {
    /// Failed requests, wrong used lengths and pages read back wrong, over all jobs.
    pub fn problems(&self) -> u64 {
        self.jobs
            .iter()
            .map(|j| j.errors + j.verify_failures + j.bad_used_len)
            .sum()
    }
}
