//! `vzram-bench`: fio-like load with no VM. Against any vhost-user-blk socket (vzram,
//! qemu-storage-daemon, ...), against a vzram device started in this process, or against the
//! store alone (the same jobs without vhost-user: what the protocol and rings cost).
//!
//! It is a program of its own so that the daemon carries no frontend, load generator or test
//! backend. Every mode runs the jobs through the same loop ([`vufront::load::run_on`]); the
//! store-only mode plugs the store in as a [`vufront::load::Target`] ([`StoreTarget`]).
//!
//! Scenarios that the job language does not express have a subcommand and a module of their
//! own: [`tiering`] (many devices on one store, a memory limit, busy and idle phases).

pub mod tiering;

use clap::Args;
use pagemix::Mix;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vufront::load::{self, Job, JobReport, LoadOptions, Target, TargetQueue, Verify};
use vufront::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vufront::{Completion, Request};
use vzram::BlkDevice;
use vzram::DeviceServer;
use vzram::{ConfigSpace, PAGE_SIZE};

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
    #[arg(long, value_name = "MIX", conflicts_with = "pages")]
    pub mix: Option<Mix>,

    /// Write real pages from FILE instead of generated ones: whole 4 KiB pages, raw or
    /// zstd-compressed (`.zst`), e.g. a dump of processes' anonymous memory. Which page lands
    /// where depends on --seed, so reads are still verified.
    #[arg(long, value_name = "FILE")]
    pub pages: Option<PathBuf>,

    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// off, written (pages written in this run) or all.
    #[arg(long, default_value = "written")]
    pub verify: Verify,

    /// Size of the in-process device.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = zram::parse_size)]
    pub size: u64,

    /// Compression of the in-process device (as `vzram serve --comp`).
    #[arg(long, value_name = "ALGO", default_value = "lz4")]
    pub comp: String,

    /// Keep the in-process device's store in DIR, as `vzram serve --state-dir` does (an
    /// existing state there is attached to). After the jobs the state is attached again and
    /// the time it took is reported: what a restart costs.
    #[arg(long, value_name = "DIR", conflicts_with = "socket")]
    pub state_dir: Option<PathBuf>,

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
    /// With --state-dir: attaching to the state again after the jobs.
    pub reattach: Option<Reattach>,
}

/// What attaching to a state directory again cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reattach {
    pub pages: u64,
    pub pool_bytes: u64,
    pub millis: f64,
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
    let pages = args.pages.as_deref().map(load_pages).transpose()?;
    let load_options = |socket: PathBuf, jobs: Vec<Job>, mix: Mix, args: &BenchArgs| LoadOptions {
        pages: pages.clone(),
        ..load_options(socket, jobs, mix, args)
    };
    if let Some(socket) = &args.socket {
        let report = load::run(&load_options(socket.clone(), jobs, mix, args))?;
        return Ok(BenchReport {
            target: socket.display().to_string(),
            jobs: report.jobs,
            mm_stat: None,
            reattach: None,
        });
    }
    let device = in_process_device(args)?;
    if args.store_only {
        if jobs.iter().any(|j| u64::from(j.bs) != PAGE_SIZE) {
            return Err(BenchError::Setup(
                "--store-only runs bs=4k jobs only".into(),
            ));
        }
        // One thread per queue, iodepth 1 (a thread waits for each page it stores).
        let opts = load_options(PathBuf::new(), jobs, mix, args);
        let mut target = StoreTarget::new(device.clone(), load::max_numjobs(&opts));
        let report = load::run_on(&mut target, &opts)?;
        let mm_stat = device.stats().mm_stat;
        drop((target, device));
        return Ok(BenchReport {
            target: format!("store ({})", args.comp),
            jobs: report.jobs,
            mm_stat: Some(mm_stat),
            reattach: reattach(args)?,
        });
    }
    // Several runs may share a process (tests): each gets its own directory.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vzram-bench-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let socket = dir.join("bench.sock");
    let served = BlkDevice::new(
        "bench".into(),
        socket.clone(),
        device.clone(),
        usize::from(args.num_queues),
        false,
        "vzram-bench".into(),
    );
    let blk = ConfigSpace {
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
    let mm_stat = device.stats().mm_stat;
    drop(device);
    Ok(BenchReport {
        target: format!("vzram in-process ({})", args.comp),
        jobs: result?.jobs,
        mm_stat: Some(mm_stat),
        reattach: reattach(args)?,
    })
}

/// With --state-dir, once the run's device is gone: attaches to the state again, timed.
fn reattach(args: &BenchArgs) -> Result<Option<Reattach>, BenchError> {
    let Some(dir) = &args.state_dir else {
        return Ok(None);
    };
    let o = open_state(args, dir)?;
    Ok(Some(Reattach {
        pages: o.pages,
        pool_bytes: o.store.mem_used_total(),
        millis: o.took.as_secs_f64() * 1e3,
    }))
}

fn open_state(args: &BenchArgs, dir: &std::path::Path) -> Result<zram::state::Opened, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let comp = Arc::new(zcomp::Comp::parse(&args.comp, &[]).map_err(|e| setup(&e))?);
    let spec = zram::state::DeviceSpec {
        name: "bench".into(),
        config: zram::Config {
            size: args.size,
            backing_file: None,
        },
        comp,
    };
    zram::state::open(dir, &zram::StoreConfig::default(), &[spec]).map_err(|e| setup(&e))
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

/// Reads a page file (raw, or zstd-compressed when its name ends in `.zst`).
pub fn load_pages(path: &std::path::Path) -> Result<Arc<load::RealPages>, BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Setup(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let bytes = if path.extension().is_some_and(|e| e == "zst") {
        zstd::stream::decode_all(file).map_err(|e| fail(&e))?
    } else {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut v).map_err(|e| fail(&e))?;
        v
    };
    let name = path.display().to_string();
    load::RealPages::new(name, bytes)
        .map(Arc::new)
        .map_err(BenchError::Setup)
}

fn in_process_device(args: &BenchArgs) -> Result<Arc<zram::Device>, BenchError> {
    if let Some(dir) = &args.state_dir {
        return Ok(open_state(args, dir)?.devices.pop().expect("one device"));
    }
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let comp = Arc::new(zcomp::Comp::parse(&args.comp, &[]).map_err(|e| setup(&e))?);
    let store = Arc::new(zram::Store::new(zram::StoreConfig::default()).map_err(|e| setup(&e))?);
    let cfg = zram::Config {
        size: args.size,
        backing_file: None,
    };
    zram::Device::new(store, comp, cfg).map_err(|e| setup(&e))
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
        if let Some(r) = &self.reattach {
            writeln!(
                f,
                "state attached again in {:.1} ms: {} pages stored in {:.1} MiB",
                r.millis,
                r.pages,
                r.pool_bytes as f64 / (1 << 20) as f64
            )?;
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

/// The store as a [`Target`]: each queue serves a request on the calling thread when it is
/// enqueued, one page at a time with a compression stream of its own (as a worker thread of the
/// daemon does), so a queue has one request in flight.
#[derive(Debug)]
pub struct StoreTarget {
    device: Arc<zram::Device>,
    queues: Vec<StoreQueue>,
}

impl StoreTarget {
    /// `queues` queues over `device`.
    pub fn new(device: Arc<zram::Device>, queues: u16) -> StoreTarget {
        let queues = (0..queues)
            .map(|index| StoreQueue {
                index,
                stream: device.new_stream(),
                device: device.clone(),
                next_tag: 0,
                done: Vec::new(),
            })
            .collect();
        StoreTarget { device, queues }
    }
}

impl Target for StoreTarget {
    type Queue = StoreQueue;

    fn name(&self) -> String {
        "store".into()
    }

    fn capacity(&self) -> u64 {
        self.device.pages() * PAGE_SIZE
    }

    fn queues_offered(&self) -> u64 {
        self.queues.len() as u64
    }

    fn max_iodepth(&self) -> u16 {
        1
    }

    fn queues(&mut self) -> &mut [StoreQueue] {
        &mut self.queues
    }
}

/// One queue of a [`StoreTarget`].
pub struct StoreQueue {
    index: u16,
    device: Arc<zram::Device>,
    stream: zcomp::Stream,
    next_tag: u64,
    // BlkDevice, not yet reaped; (completion, its enqueue time).
    done: Vec<(Completion, Instant)>,
}

impl std::fmt::Debug for StoreQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreQueue")
            .field("index", &self.index)
            .field("next_tag", &self.next_tag)
            .field("done", &self.done.len())
            .finish_non_exhaustive()
    }
}

impl StoreQueue {
    /// Serves a read or write of whole pages: the status and the data read.
    fn serve(&mut self, req: &Request) -> vufront::Result<(u8, Vec<u8>)> {
        let sectors_per_page = PAGE_SIZE / zram::SECTOR_SIZE;
        let aligned = |len: u64| req.sector % sectors_per_page == 0 && len % PAGE_SIZE == 0;
        let first = req.sector / sectors_per_page;
        let mut ok = true;
        match req.req_type {
            VIRTIO_BLK_T_OUT if aligned(req.out.len() as u64) => {
                for (i, src) in req.out.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let src = src.try_into().expect("a page");
                    ok &= self
                        .device
                        .write_page(first + i as u64, src, &mut self.stream)
                        .is_ok();
                }
                Ok((
                    if ok {
                        VIRTIO_BLK_S_OK as u8
                    } else {
                        VIRTIO_BLK_S_IOERR as u8
                    },
                    Vec::new(),
                ))
            }
            VIRTIO_BLK_T_IN if aligned(u64::from(req.in_len)) => {
                let mut data = vec![0u8; req.in_len as usize];
                for (i, dst) in data.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
                    let dst = dst.try_into().expect("a page");
                    ok &= self
                        .device
                        .read_page(first + i as u64, dst, &mut self.stream)
                        .is_ok();
                }
                Ok((
                    if ok {
                        VIRTIO_BLK_S_OK as u8
                    } else {
                        VIRTIO_BLK_S_IOERR as u8
                    },
                    data,
                ))
            }
            t => Err(vufront::Error::Invalid(format!(
                "the store serves reads and writes of whole pages, not type {t} at sector {}",
                req.sector
            ))),
        }
    }
}

impl TargetQueue for StoreQueue {
    fn enqueue(&mut self, req: &Request) -> vufront::Result<u64> {
        let submitted = Instant::now();
        let (status, data) = self.serve(req)?;
        let tag = self.next_tag;
        self.next_tag += 1;
        // What a virtio-blk device reports: the data written to the driver plus the status.
        let used_len = data.len() as u32 + 1;
        let completion = Completion {
            tag,
            head: 0,
            status,
            used_len,
            data,
            latency: Duration::ZERO,
        };
        self.done.push((completion, submitted));
        Ok(tag)
    }

    fn notify(&mut self) -> vufront::Result<()> {
        Ok(())
    }

    fn complete(&mut self, _timeout: Duration) -> vufront::Result<Vec<Completion>> {
        if self.done.is_empty() {
            return Err(vufront::Error::Invalid(
                "waiting on a store queue with nothing in flight".into(),
            ));
        }
        let now = Instant::now();
        Ok(self
            .done
            .drain(..)
            .map(|(mut c, submitted)| {
                c.latency = now - submitted;
                c
            })
            .collect())
    }

    fn index(&self) -> u16 {
        self.index
    }
}
