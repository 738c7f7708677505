//! The control protocol and its commands.
//!
//! JSON lines over a Unix stream socket: a client writes one request object per line and
//! reads one response object per line, in order. A request names its command in `"cmd"`; the
//! other keys are the command's arguments; an optional `"id"` (any JSON value) is echoed in
//! the response so that a client may pipeline. A response is `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":"..."}`.
//!
//! Each command is defined once, here, so that the server, the client and the `vzram`
//! subcommands cannot drift apart: a type whose fields are its arguments (serde reads them
//! off the wire, refusing unknown ones; clap reads the same fields off the command line), its
//! reply type, and [`Command::run`]. `COMMANDS` lists them; the server finds a request's
//! command there. Adding a command: its type and [`Command`] impl here, an entry in
//! `COMMANDS`, and in `client.rs` a subcommand and a `Render` impl.

use super::dispatch::{CommandError, Context, Entry, Outcome, Pass};
use crate::counters::RequestStats;
use crate::device::BlkDevice;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use zcomp::Priority;
use zram::policy::{PolicyConfig, PolicyStats};

/// A control command: its fields are its arguments.
pub trait Command: Serialize + DeserializeOwned + std::fmt::Debug {
    /// The value of `"cmd"`.
    const NAME: &'static str;
    /// What `result` holds when the command succeeds.
    type Reply: Serialize + DeserializeOwned;
    /// Carries the command out in the daemon.
    fn run(self, ctx: &Context) -> Result<Self::Reply, CommandError>;
}

/// Every command, in the order the daemon's errors list them.
pub(super) const COMMANDS: &[Entry] = &[
    Entry::of::<Stat>(),
    Entry::of::<Compact>(),
    Entry::of::<Idle>(),
    Entry::of::<Recompress>(),
    Entry::of::<Writeback>(),
    Entry::of::<WritebackLimit>(),
    Entry::of::<MemLimit>(),
    Entry::of::<ResetMemUsedMax>(),
    Entry::of::<Policy>(),
];

/// A request line for `cmd`, newline excluded: `{"cmd":NAME, ...arguments}`.
pub fn request_line<C: Command>(cmd: &C) -> String {
    #[derive(Serialize)]
    struct Request<'a, C> {
        cmd: &'static str,
        #[serde(flatten)]
        args: &'a C,
    }
    let request = Request {
        cmd: C::NAME,
        args: cmd,
    };
    serde_json::to_string(&request).expect("requests serialise")
}

/// A response line. `result` is present when `ok`, `error` when not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response<T> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
}

/// Which pages a maintenance command takes: zram's `type=` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PageType {
    /// Pages marked idle (see `vzram idle`).
    Idle,
    /// Pages stored uncompressed because compression did not pay.
    Huge,
    /// Huge pages that are also idle.
    #[value(name = "huge_idle", alias = "huge-idle")]
    HugeIdle,
    /// Pages a recompression pass could not shrink.
    Incompressible,
}

impl From<PageType> for zram::PageFilter {
    fn from(t: PageType) -> zram::PageFilter {
        match t {
            PageType::Idle => zram::PageFilter::Idle,
            PageType::Huge => zram::PageFilter::Huge,
            PageType::HugeIdle => zram::PageFilter::HugeIdle,
            PageType::Incompressible => zram::PageFilter::Incompressible,
        }
    }
}

/// The reply of a command that acts on each device in turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices<T> {
    pub devices: Vec<T>,
    /// Devices a command for every device left out, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// Statistics of every device and of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stat {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatReply {
    pub devices: Vec<DeviceStat>,
    pub store: StoreStat,
    /// The tiering policy: its knobs and what it has done.
    pub policy: PolicyStats,
}

/// One device in `stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStat {
    pub name: String,
    /// The vhost-user socket.
    pub socket: String,
    pub connected: bool,
    /// vhost-user connections accepted so far.
    pub connections: u64,
    pub readonly: bool,
    /// Number of virtqueues, each served by its own worker and compression stream.
    pub streams: usize,
    pub recomp_algorithms: Vec<RecompAlgorithm>,
    /// zram's statistics, under zram's names.
    pub disksize: u64,
    pub comp_algorithm: String,
    pub mm_stat: zram::MmStat,
    pub io_stat: zram::IoStat,
    pub bd_stat: zram::BdStat,
    /// The device's memory, own limit and fair share of the store's limit.
    pub memory: zram::DeviceMemory,
    /// Pages moved between tiers (recompressed, written back, read back).
    pub tiering: zram::TieringStats,
    /// Read and write requests and their bytes: `queues` summed. I/O is counted once, by the
    /// block layer (here, per virtio request), as the kernel's block layer does for zram.
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Request counters, one entry per virtqueue.
    pub queues: Vec<RequestStats>,
}

/// A secondary (recompression) algorithm of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecompAlgorithm {
    pub priority: u8,
    /// `zstd`, or `zstd:9` with a level.
    pub algorithm: String,
}

/// The store the devices share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStat {
    /// Bytes; 0 = none.
    pub mem_limit: u64,
    pub mem_used_total: u64,
    pub mem_used_max: u64,
    /// Pages freed by compaction since start.
    pub pages_compacted: u64,
    /// Pages compaction could free now.
    pub freeable_pages: u64,
    /// The store's allocator.
    pub pool: zram::PoolStats,
}

impl Command for Stat {
    const NAME: &'static str = "stat";
    type Reply = StatReply;
    fn run(self, ctx: &Context) -> Result<StatReply, CommandError> {
        let store = &ctx.store;
        Ok(StatReply {
            devices: ctx.devices.iter().map(|s| DeviceStat::of(s)).collect(),
            store: StoreStat {
                mem_limit: store.mem_limit(),
                mem_used_total: store.mem_used_total(),
                mem_used_max: store.mem_used_max(),
                pages_compacted: store.pages_compacted(),
                freeable_pages: store.freeable_pages() as u64,
                pool: store.pool_stats(),
            },
            policy: ctx.policy.stats(),
        })
    }
}

impl DeviceStat {
    fn of(s: &BlkDevice) -> DeviceStat {
        let comp = s.zram.comp();
        let algorithm = |p| match comp.params(p) {
            Some(params) => match params.level {
                Some(level) => format!("{}:{level}", params.algorithm),
                None => params.algorithm.to_string(),
            },
            None => comp
                .backend(p)
                .map(|b| b.name().to_string())
                .unwrap_or_default(),
        };
        let zram = s.zram.stats();
        let queues: Vec<RequestStats> = s.queues.iter().map(|q| q.snapshot()).collect();
        DeviceStat {
            name: s.name.clone(),
            socket: s.socket.display().to_string(),
            connected: s.connected.load(Relaxed),
            connections: s.connections.load(Relaxed),
            readonly: s.readonly,
            streams: s.queues.len(),
            recomp_algorithms: (comp.priorities().filter(|p| !p.is_primary()))
                .map(|p| RecompAlgorithm {
                    priority: p.get(),
                    algorithm: algorithm(p),
                })
                .collect(),
            disksize: zram.disksize,
            comp_algorithm: zram.comp_algorithm,
            mm_stat: zram.mm_stat,
            io_stat: zram.io_stat,
            bd_stat: zram.bd_stat,
            memory: zram.memory,
            tiering: zram.tiering,
            reads: queues.iter().map(|q| q.reads).sum(),
            writes: queues.iter().map(|q| q.writes).sum(),
            read_bytes: queues.iter().map(|q| q.read_bytes).sum(),
            write_bytes: queues.iter().map(|q| q.write_bytes).sum(),
            queues,
        }
    }
}

/// Compact the pool now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Compact {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReply {
    /// Pages this compaction freed.
    pub pages_freed: u64,
    /// Pages freed by compaction since start (zram's `pages_compacted`).
    pub pages_compacted: u64,
}

impl Command for Compact {
    const NAME: &'static str = "compact";
    type Reply = CompactReply;
    fn run(self, ctx: &Context) -> Result<CompactReply, CommandError> {
        let _one_at_a_time = ctx.maintenance.lock();
        Ok(CompactReply {
            pages_freed: ctx.store.compact() as u64,
            pages_compacted: ctx.store.pages_compacted(),
        })
    }
}

/// Mark stored pages idle: all, or those not accessed for `age_secs` seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Idle {
    /// Only this device [default: every device]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `all`, or an age: 30s, 5m, 1h, 2d (a bare number is seconds)
    // The full path keeps clap from taking the argument as optional: `all` is `None`.
    #[arg(value_name = "AGE", value_parser = parse_age)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_secs: ::std::option::Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleDevice {
    pub name: String,
    /// Pages marked idle.
    pub marked: u64,
}

impl Command for Idle {
    const NAME: &'static str = "idle";
    type Reply = Devices<IdleDevice>;
    fn run(self, ctx: &Context) -> Result<Devices<IdleDevice>, CommandError> {
        let age = self.age_secs.map(Duration::from_secs);
        let _one_at_a_time = ctx.maintenance.lock();
        let devices = (ctx.targets(self.device.as_deref())?.into_iter())
            .map(|s| IdleDevice {
                name: s.name.clone(),
                marked: s.zram.mark_idle(age),
            })
            .collect();
        Ok(Devices {
            devices,
            skipped: Vec::new(),
        })
    }
}

/// `all` (`None`) or an age in seconds: a number with an optional s, m, h or d suffix.
fn parse_age(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    let bad = || format!("{s:?}: expected `all` or an age like 30s, 5m, 1h or 2d");
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(bad()),
    };
    let secs = num.parse::<u64>().ok().and_then(|n| n.checked_mul(scale));
    secs.map(Some).ok_or_else(bad)
}

/// Recompress pages of `type` with the secondary algorithm of `priority` (default 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Recompress {
    /// Only this device [default: every device with such an algorithm]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Which pages
    #[arg(long = "type", value_name = "TYPE", value_enum, default_value_t = PageType::Idle)]
    #[serde(rename = "type")]
    pub page_type: PageType,
    /// Only pages whose compressed size is at least this many bytes (K suffix allowed)
    #[arg(long, value_name = "BYTES", value_parser = zram::parse_size)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u64>,
    /// Try at most this many pages
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pages: Option<u64>,
    /// Which recompression algorithm, by priority (1..=3)
    #[arg(long, value_name = "P", default_value = "1",
          value_parser = clap::value_parser!(u8).range(1..=3))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecompressDevice {
    pub name: String,
    /// Pages that matched and were tried.
    pub tried: u64,
    /// Pages kept in their new, smaller form.
    pub recompressed: u64,
}

impl Command for Recompress {
    const NAME: &'static str = "recompress";
    type Reply = Devices<RecompressDevice>;
    fn run(self, ctx: &Context) -> Result<Devices<RecompressDevice>, CommandError> {
        let prio = self.priority.unwrap_or(1);
        let prio = (Priority::new(prio).filter(|p| !p.is_primary())).ok_or_else(|| {
            CommandError::InvalidArgument(format!(
                "priority {prio}: recompression uses a secondary algorithm, 1..={}",
                Priority::MAX
            ))
        })?;
        let threshold = (self.threshold)
            .map(|t| match usize::try_from(t) {
                Ok(t @ 1..=zram::PAGE_SIZE) => Ok(t),
                _ => Err(CommandError::InvalidArgument(format!(
                    "threshold {t}: a compressed size in bytes, 1..={}",
                    zram::PAGE_SIZE
                ))),
            })
            .transpose()?;
        let every = self.device.is_none();
        let pass = Pass {
            device: self.device.as_deref(),
            budget: self.max_pages,
            stopped: |n| format!("recompression stopped after {n} pages tried"),
            none_eligible: format!(
                "no device has a recompression algorithm with priority {prio} \
                 (start the daemon with --recomp)"
            ),
        };
        ctx.each_device(pass, |s, left| {
            // Every device when none was named: those without this algorithm are left out;
            // a named one without it is an error (from zram).
            if every && s.zram.comp().backend(prio).is_none() {
                return Ok(Outcome::Skipped(format!(
                    "no recompression algorithm with priority {prio}"
                )));
            }
            let mut stream = s.zram.new_stream();
            let (filter, cancel) = (self.page_type.into(), &ctx.cancel);
            let r = (s.zram).recompress(filter, threshold, left, prio, &mut stream, cancel)?;
            let entry = RecompressDevice {
                name: s.name.clone(),
                tried: r.tried,
                recompressed: r.recompressed,
            };
            Ok(Outcome::Done(entry, r.tried))
        })
    }
}

/// Move pages of `type` to the device's backing file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Writeback {
    /// Only this device [default: every device with a backing file]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Which pages
    #[arg(long = "type", value_name = "TYPE", value_enum, default_value_t = PageType::Idle)]
    #[serde(rename = "type")]
    pub page_type: PageType,
    /// Write at most this many pages
    #[arg(long = "limit", value_name = "PAGES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_pages: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackDevice {
    pub name: String,
    /// Pages written to the backing file.
    pub written: u64,
}

impl Command for Writeback {
    const NAME: &'static str = "writeback";
    type Reply = Devices<WritebackDevice>;
    fn run(self, ctx: &Context) -> Result<Devices<WritebackDevice>, CommandError> {
        let every = self.device.is_none();
        let pass = Pass {
            device: self.device.as_deref(),
            budget: self.limit_pages,
            stopped: |n| format!("writeback stopped after {n} pages written"),
            none_eligible: "no device has a backing file (start the daemon with --backing-file)"
                .into(),
        };
        ctx.each_device(pass, |s, left| {
            match s.zram.writeback(self.page_type.into(), left, &ctx.cancel) {
                Ok(n) => {
                    let name = s.name.clone();
                    Ok(Outcome::Done(WritebackDevice { name, written: n }, n))
                }
                // Every device when none was named: those without a backing file are left
                // out, not an error.
                Err(zram::Error::NoBackingFile) if every => {
                    Ok(Outcome::Skipped("no backing file".into()))
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// zram's `writeback_limit`: a budget of pages writeback may still write; `null` or omitted
/// removes the budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct WritebackLimit {
    /// Only this device [default: every device]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// A number of 4 KiB pages, or `none`
    // The full path: `none` is `None`, and the argument is required.
    #[arg(value_name = "PAGES|none", value_parser = parse_budget)]
    #[serde(default)]
    pub pages: ::std::option::Option<u64>,
}

fn parse_budget(s: &str) -> Result<Option<u64>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    (s.parse().map(Some)).map_err(|_| format!("{s:?}: expected a number of pages or `none`"))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackLimitReply {
    /// The devices whose limit was set.
    pub devices: Vec<String>,
    /// The budget in pages; `None`: no limit.
    pub pages: Option<u64>,
}

impl Command for WritebackLimit {
    const NAME: &'static str = "writeback_limit";
    type Reply = WritebackLimitReply;
    fn run(self, ctx: &Context) -> Result<WritebackLimitReply, CommandError> {
        let targets = ctx.targets(self.device.as_deref())?;
        for s in &targets {
            s.zram.set_writeback_limit(self.pages);
        }
        Ok(WritebackLimitReply {
            devices: targets.iter().map(|s| s.name.clone()).collect(),
            pages: self.pages,
        })
    }
}

/// The store's memory limit, or one device's, in bytes; 0 removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MemLimit {
    /// The limit of this device (inside the store's) [default: the store's limit]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Bytes, with an optional K, M, G or T suffix (e.g. 2G); 0 removes the limit
    #[arg(value_name = "SIZE", value_parser = zram::parse_size)]
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemLimitReply {
    /// The device whose limit was set; absent: the store's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The limit now, in bytes; 0 = none.
    pub mem_limit: u64,
    /// What it holds now, in bytes.
    pub mem_used: u64,
}

impl Command for MemLimit {
    const NAME: &'static str = "mem_limit";
    type Reply = MemLimitReply;
    fn run(self, ctx: &Context) -> Result<MemLimitReply, CommandError> {
        let Some(name) = self.device else {
            ctx.store.set_mem_limit(self.bytes);
            return Ok(MemLimitReply {
                device: None,
                mem_limit: ctx.store.mem_limit(),
                mem_used: ctx.store.mem_used_total(),
            });
        };
        let d = ctx.targets(Some(&name))?[0];
        d.zram.set_mem_limit(self.bytes);
        Ok(MemLimitReply {
            device: Some(name),
            mem_limit: d.zram.mem_limit(),
            mem_used: d.zram.mem_used(),
        })
    }
}

/// Reset `mem_used_max` to the current use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ResetMemUsedMax {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetMemUsedMaxReply {
    pub mem_used_max: u64,
}

impl Command for ResetMemUsedMax {
    const NAME: &'static str = "reset_mem_used_max";
    type Reply = ResetMemUsedMaxReply;
    fn run(self, ctx: &Context) -> Result<ResetMemUsedMaxReply, CommandError> {
        ctx.store.reset_mem_used_max();
        Ok(ResetMemUsedMaxReply {
            mem_used_max: ctx.store.mem_used_max(),
        })
    }
}

/// The tiering policy's settings, each optional: `vzram serve` takes them as its defaults'
/// overrides, the `policy` command as changes. One field per [`PolicyConfig`] knob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct PolicyKnobs {
    /// Time between the policy's passes [default: 1s]
    #[arg(long = "policy-interval", value_name = "AGE", value_parser = parse_secs)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// Pages not accessed for this long are cold: recompressed, and written back when memory
    /// runs short [default: 2m]
    #[arg(long = "idle-age", value_name = "AGE", value_parser = parse_secs)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_age_secs: Option<u64>,
    /// Longest a device's cold age grows while pages come back from its backing file too
    /// often [default: 16m]
    #[arg(long = "max-cold-age", value_name = "AGE", value_parser = parse_secs)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cold_age_secs: Option<u64>,
    /// Compact when more than this fraction of the pool's pages could be freed [default: 0.05]
    #[arg(long, value_name = "FRACTION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compact_fraction: Option<f64>,
    /// Recompress cold and huge pages with the first --recomp algorithm [default: on]
    #[arg(long = "recompress-cold", value_name = "on|off", value_parser = parse_on_off)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompress: Option<bool>,
    /// Write cold pages back to the backing file above this fraction of a memory limit (the
    /// store's, or a device's) [default: 0.9]
    #[arg(long, value_name = "FRACTION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<f64>,
    /// ... down to this fraction [default: 0.8]
    #[arg(long, value_name = "FRACTION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_watermark: Option<f64>,
    /// Also write cold pages back while the host's memory pressure (PSI `some avg10`, in %)
    /// is above this [default: 10]
    #[arg(long, value_name = "PERCENT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi_threshold: Option<f64>,
    /// Most pages a device may read back from its backing file per minute, as a fraction of
    /// its recently used pages, before its writeback backs off [default: 0.002]
    #[arg(long, value_name = "FRACTION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_target: Option<f64>,
    /// Most pages each action (recompression, writeback) handles per pass [default: 4096]
    #[arg(long = "policy-max-pages", value_name = "PAGES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pages_per_tick: Option<u64>,
}

impl PolicyKnobs {
    /// `cfg` with the settings given here.
    pub fn apply(&self, mut cfg: PolicyConfig) -> PolicyConfig {
        let secs = Duration::from_secs;
        if let Some(v) = self.interval_secs {
            cfg.interval = secs(v);
        }
        if let Some(v) = self.idle_age_secs {
            cfg.idle_age = secs(v);
            // The cap follows the age unless it was given too.
            if self.max_cold_age_secs.is_none() {
                cfg.max_cold_age = cfg.max_cold_age.max(secs(v));
            }
        }
        if let Some(v) = self.max_cold_age_secs {
            cfg.max_cold_age = secs(v);
        }
        if let Some(v) = self.compact_fraction {
            cfg.compact_fraction = v;
        }
        if let Some(v) = self.recompress {
            cfg.recompress = v;
        }
        if let Some(v) = self.high_watermark {
            cfg.high_watermark = v;
        }
        if let Some(v) = self.low_watermark {
            cfg.low_watermark = v;
        }
        if let Some(v) = self.psi_threshold {
            cfg.psi_threshold = v;
        }
        if let Some(v) = self.promotion_target {
            cfg.promotion_target = v;
        }
        if let Some(v) = self.max_pages_per_tick {
            cfg.max_pages_per_tick = v;
        }
        cfg
    }
}

/// Show the tiering policy, or change its settings; settings not given stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct Policy {
    /// Turn the policy on or off
    #[arg(value_name = "on|off", value_parser = parse_on_off)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[command(flatten)]
    #[serde(flatten)]
    pub knobs: PolicyKnobs,
    /// Keys that are no setting (serde cannot refuse them for a flattened struct): refused in
    /// `run`.
    #[arg(skip)]
    #[serde(flatten, skip_serializing)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

impl Command for Policy {
    const NAME: &'static str = "policy";
    type Reply = PolicyStats;
    fn run(self, ctx: &Context) -> Result<PolicyStats, CommandError> {
        if let Some(key) = self.unknown.keys().next() {
            return Err(CommandError::InvalidArgument(format!(
                "unknown policy setting {key:?}"
            )));
        }
        if self.enabled.is_some() || self.knobs != PolicyKnobs::default() {
            let mut cfg = self.knobs.apply(ctx.policy.config());
            if let Some(on) = self.enabled {
                cfg.enabled = on;
            }
            ctx.policy
                .set(cfg)
                .map_err(|e| CommandError::InvalidArgument(e.to_string()))?;
        }
        let mut stats = ctx.policy.stats();
        // The thread publishes once it has taken a change; answer with what is in force now.
        stats.config = ctx.policy.config();
        Ok(stats)
    }
}

/// `on` or `off` (also true/false, 1/0).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// An age in seconds: a number with an optional s, m, h or d suffix.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    match parse_age(s)? {
        Some(secs) => Ok(secs),
        None => Err(format!("{s:?}: expected an age like 30s, 5m, 1h or 2d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vzram stat --json` prints a [`StatReply`]: its field names and order are what clients
    /// parse, so they are pinned here, whatever types the statistics come from.
    #[test]
    fn the_stat_reply_wire_format_is_stable() {
        let reply = StatReply {
            devices: vec![DeviceStat {
                name: "vz0".into(),
                socket: "/run/vz0.sock".into(),
                connected: true,
                connections: 1,
                readonly: false,
                streams: 1,
                recomp_algorithms: vec![RecompAlgorithm {
                    priority: 1,
                    algorithm: "zstd".into(),
                }],
                queues: vec![RequestStats::default()],
                ..Default::default()
            }],
            store: StoreStat {
                mem_limit: 0,
                mem_used_total: 0,
                mem_used_max: 0,
                pages_compacted: 0,
                freeable_pages: 0,
                pool: Default::default(),
            },
            policy: Default::default(),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"devices":[{"name":"vz0","socket":"/run/vz0.sock","connected":true,"#,
                r#""connections":1,"readonly":false,"streams":1,"#,
                r#""recomp_algorithms":[{"priority":1,"algorithm":"zstd"}],"#,
                r#""disksize":0,"comp_algorithm":"","#,
                r#""mm_stat":{"orig_data_size":0,"compr_data_size":0,"mem_used_total":0,"#,
                r#""mem_limit":0,"mem_used_max":0,"same_pages":0,"pages_compacted":0,"#,
                r#""huge_pages":0,"huge_pages_since":0},"#,
                r#""io_stat":{"failed_reads":0,"failed_writes":0,"invalid_io":0,"notify_free":0},"#,
                r#""bd_stat":{"bd_count":0,"bd_reads":0,"bd_writes":0},"#,
                r#""memory":{"used":0,"limit":0,"share":0},"#,
                r#""tiering":{"recompressed":0,"written_back":0,"direct_reclaimed":0,"#,
                r#""direct_reclaim_failed":0,"promoted":0},"#,
                r#""reads":0,"writes":0,"read_bytes":0,"write_bytes":0,"#,
                r#""queues":[{"requests":0,"reads":0,"writes":0,"flushes":0,"discards":0,"#,
                r#""write_zeroes":0,"get_ids":0,"read_bytes":0,"write_bytes":0,"io_errors":0,"#,
                r#""unsupported":0}]}],"#,
                r#""store":{"mem_limit":0,"mem_used_total":0,"mem_used_max":0,"#,
                r#""pages_compacted":0,"freeable_pages":0,"#,
                r#""pool":{"pages_used":0,"pages_compacted":0,"page_limit":0,"capacity_pages":0,"#,
                r#""objects":0,"metadata_bytes":0}},"#,
                r#""policy":{"ticks":0,"cpu_secs":0.0,"wall_secs":0.0,"#,
                r#""last_psi":null,"compacted_pages":0,"reclaiming":false,"errors":0,"#,
                r#""last_error":null,"devices":[],"config":{"enabled":true,"interval_secs":1.0,"#,
                r#""compact_fraction":0.05,"idle_age_secs":120.0,"recompress":true,"#,
                r#""high_watermark":0.9,"low_watermark":0.8,"psi_threshold":10.0,"#,
                r#""promotion_target":0.002,"max_pages_per_tick":4096,"#,
                r#""max_cold_age_secs":960.0}}}"#
            )
        );
        let back: StatReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
    }
}
