//! The tiering policy: what to compact, recompress and write back, and when. It makes
//! decisions only; it has no thread, no clock and no lock of its own.
//!
//! # Shape
//!
//! A caller (the daemon's policy thread) calls [`Policy::tick`] every
//! [`PolicyConfig::interval`] with the current time and the host's memory pressure
//! ([`read_psi`]). The tick looks at a [`Target`] (a store and its devices, behind a small
//! trait so tests drive it with a simulated store) and asks it to act, cheapest first:
//!
//! 1. **compact** when the pages compaction could free exceed [`PolicyConfig::compact_fraction`]
//!    of the pool's pages (and at least [`MIN_COMPACT_PAGES`]): relative, so a small pool with
//!    a third of it fragmented is compacted and a big pool with a few sparse pages is not;
//! 2. **recompress** with the secondary algorithm the pages older than the device's cold age,
//!    and huge pages, when the device has a secondary algorithm and
//!    [`PolicyConfig::recompress`] is on;
//! 3. **write back** cold pages to the backing file when pool use is above
//!    [`PolicyConfig::high_watermark`] of the store's limit, down to
//!    [`PolicyConfig::low_watermark`] (hysteresis: a reclaim that started above the high mark
//!    goes on in later ticks until the low mark is reached); likewise per device against the
//!    device's own limit; or, with no limit reached, when PSI `some avg10` is above
//!    [`PolicyConfig::psi_threshold`] (then a bounded batch per tick). Devices most over their
//!    share go first, one batch at a time, so the most over is brought level with the next
//!    before both are drained together. Devices without a backing file are never asked.
//! 4. **back off**: per device, pages read back from the backing file (promotions) are counted
//!    over the last minute. Above [`PolicyConfig::promotion_target`] of the device's recently
//!    used pages per minute, the device's cold age doubles (up to
//!    [`PolicyConfig::max_cold_age`]) and the device is *throttled*: pressure-driven writeback
//!    skips it, watermark-driven writeback takes it only after every unthrottled device. Below
//!    half the target, the cold age halves back toward [`PolicyConfig::idle_age`]. The rates
//!    are read at the start of the tick (a few counters), so this tick's actions already use
//!    the adjusted ages; the cold age moves at most once per [`BACKOFF_STEP`].
//!
//! Each action does at most [`PolicyConfig::max_pages_per_tick`] pages per tick (the target
//! is trusted to honour the `max_pages` it is given). Long target operations receive the
//! policy's stop flag ([`Policy::stop_flag`]): setting it (shutdown, a configuration change)
//! ends the running tick at the next page, and every later tick returns at once until
//! [`Policy::set_config`] or [`Policy::resume`] clears it.
//!
//! A device that came up short of the work it was asked for (no cold page left) is not asked
//! again for that action for [`REST`], so a policy with nothing to do does not scan every slot
//! of every device every second.
//!
//! Direct reclaim (a write that hits a limit moves cold pages out itself) lives in the write
//! path, not here; the policy keeps headroom below the limits so that it is rare.

mod cputime;
mod psi;

use cputime::thread_cpu_time;
pub use psi::{DEFAULT_PSI_PATH, read_psi};

use crate::{Reclaimed, RecompressResult};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Compaction needs at least this many freeable pages, whatever the fraction: below it the
/// pass costs more than the memory it returns.
pub const MIN_COMPACT_PAGES: u64 = 16;
/// Promotions are counted over this sliding window.
pub const PROMOTION_WINDOW: Duration = Duration::from_secs(60);
/// A device's cold age changes at most once per this, or per half its cold age if that is
/// shorter (a change shows in the rate only as pages are written back at the new age, which
/// takes about a cold age; short ages, as in benchmarks that compress time, step faster), and
/// its count of recently used pages (a scan of its slots) is refreshed as often.
pub const BACKOFF_STEP: Duration = Duration::from_secs(30);
/// A device that had no more work for an action is left alone by that action this long, or
/// for a quarter of its cold age if that is shorter (pages turn cold that much sooner).
pub const REST: Duration = Duration::from_secs(15);

/// How long a device with nothing left to do for an action rests, at cold age `cold_age`.
fn rest(cold_age: Duration) -> Duration {
    (cold_age / 4).clamp(Duration::from_secs(1), REST)
}
/// Writeback asks a device for at most this many pages at a time (1 MiB of pages), then
/// re-ranks the devices by how far over their share they are.
pub const WRITEBACK_BATCH: u64 = 256;

/// A setting the policy refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("policy setting {name}: {why}")]
    Invalid { name: &'static str, why: String },
}

fn invalid(name: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid {
        name,
        why: why.into(),
    }
}

/// The policy's knobs. [`Default`] gives the safe defaults; [`PolicyConfig::validate`] says
/// what makes no sense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Off: [`Policy::tick`] does nothing at all. Default on.
    pub enabled: bool,
    /// Time between ticks (for the caller's loop). Default 1 s.
    #[serde(rename = "interval_secs", with = "secs")]
    pub interval: Duration,
    /// Compact when freeable pages exceed this fraction of the pool's pages (and at least
    /// [`MIN_COMPACT_PAGES`]). Default 0.05.
    pub compact_fraction: f64,
    /// Pages not accessed for this long are cold: recompressed and written back. A device's
    /// cold age starts here and backs off from here. Default 120 s.
    #[serde(rename = "idle_age_secs", with = "secs")]
    pub idle_age: Duration,
    /// Recompress cold and huge pages with the secondary algorithm (only on devices that have
    /// one). Default on.
    pub recompress: bool,
    /// Start writeback above this fraction of the store's (or a device's) memory limit.
    /// Default 0.90.
    pub high_watermark: f64,
    /// Stop watermark writeback at this fraction of the limit. Default 0.80.
    pub low_watermark: f64,
    /// PSI `some avg10` (percent) above which cold pages are written back even below the high
    /// watermark. Default 10.0.
    pub psi_threshold: f64,
    /// The most promotions a device may see per minute, as a fraction of its recently used
    /// pages, before its writeback backs off. Default 0.002 (0.2%).
    pub promotion_target: f64,
    /// Most pages each action (recompression, writeback) handles in one tick. Default 4096.
    pub max_pages_per_tick: u64,
    /// Cap on a device's cold age under back-off. Default 960 s (8 x idle_age).
    #[serde(rename = "max_cold_age_secs", with = "secs")]
    pub max_cold_age: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            compact_fraction: 0.05,
            idle_age: Duration::from_secs(120),
            recompress: true,
            high_watermark: 0.90,
            low_watermark: 0.80,
            psi_threshold: 10.0,
            promotion_target: 0.002,
            max_pages_per_tick: 4096,
            max_cold_age: Duration::from_secs(8 * 120),
        }
    }
}

/// Durations on the wire as seconds (a number), under `_secs` names.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}

impl PolicyConfig {
    /// Checks the knobs against each other; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let fraction = |name, v: f64| {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(invalid(name, format!("{v} is not a fraction in 0..=1")))
            }
        };
        if self.interval.is_zero() {
            return Err(invalid("interval", "must be longer than zero"));
        }
        fraction("compact_fraction", self.compact_fraction)?;
        if self.idle_age.is_zero() {
            return Err(invalid("idle_age", "must be longer than zero"));
        }
        if self.max_cold_age < self.idle_age {
            return Err(invalid(
                "max_cold_age",
                format!(
                    "{:?} is shorter than idle_age {:?}",
                    self.max_cold_age, self.idle_age
                ),
            ));
        }
        fraction("high_watermark", self.high_watermark)?;
        fraction("low_watermark", self.low_watermark)?;
        if self.high_watermark == 0.0 {
            return Err(invalid("high_watermark", "must be above zero"));
        }
        if self.low_watermark >= self.high_watermark {
            return Err(invalid(
                "low_watermark",
                format!(
                    "{} is not below high_watermark {}",
                    self.low_watermark, self.high_watermark
                ),
            ));
        }
        if !(self.psi_threshold.is_finite() && (0.0..=100.0).contains(&self.psi_threshold)) {
            return Err(invalid(
                "psi_threshold",
                format!("{} is not a percentage in 0..=100", self.psi_threshold),
            ));
        }
        fraction("promotion_target", self.promotion_target)?;
        if self.max_pages_per_tick == 0 {
            return Err(invalid("max_pages_per_tick", "must be at least 1"));
        }
        Ok(())
    }
}

/// One device as the policy sees it at the start of a tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceView {
    /// Stable, unique name: the policy keeps its per-device state under it (a second device
    /// with a name already seen in the same tick is left alone).
    pub name: String,
    /// The device's memory in bytes: compressed bytes plus its part of the allocator overhead.
    pub mem_used: u64,
    /// The device's own limit in bytes, 0 = none.
    pub mem_limit: u64,
    /// What the device may fairly use of the store in bytes (its own limit if set, else the
    /// store's limit over the number of devices), 0 = no limit anywhere.
    pub share: u64,
    /// Pages held in memory (compressed, huge or same-filled).
    pub stored_pages: u64,
    /// Cumulative pages read back from the backing file (zram's `bd_reads`). May restart
    /// from zero if the device is replaced; the policy then restarts its rate window.
    pub promoted: u64,
    /// A backing file is configured: writeback can move pages there.
    pub has_backing: bool,
    /// A secondary compression algorithm is configured: recompression can run.
    pub has_secondary: bool,
}

/// What the policy needs from a store. Implemented for `zram::Store` over its devices, and
/// by a simulated store in the tests.
///
/// Every method may be called from the policy thread while guest I/O goes on; none may hold
/// a slot or class lock across slow work (compression, file I/O), and the long ones
/// ([`Target::reclaim`], [`Target::recompress_cold`]) check `stop` before each page and
/// return what they did so far once it is set.
pub trait Target {
    /// A handle on one device (for `zram::Store`, `Arc<Device>`): the policy gets them from
    /// [`Target::devices`] at the start of a tick and hands them back to the other calls, so
    /// a device removed meanwhile is still the one addressed.
    type Device;
    /// Why an operation failed (shown to the operator, counted, never fatal to the policy).
    type Error: fmt::Display;

    /// The live devices.
    fn devices(&self) -> Vec<Self::Device>;
    /// A snapshot of one device's counters (cheap: no scan).
    fn view(&self, dev: &Self::Device) -> DeviceView;
    /// Tells the device its cold age under back-off, for the writes that reclaim by themselves
    /// at a limit (called every tick).
    fn set_cold_age(&self, dev: &Self::Device, age: Duration);
    /// Pages of the device accessed within `window` (a scan of its slots: called at most once
    /// per [`BACKOFF_STEP`] per device, and only for devices with promotions).
    fn recently_used_pages(&self, dev: &Self::Device, window: Duration) -> u64;
    /// Writes back up to `max_pages` in-memory pages that are idle, older than `min_age`, or
    /// incompressible/huge, resuming where the previous call stopped. Fewer than `max_pages`
    /// written without `stop` set means no such page is left.
    fn reclaim(
        &self,
        dev: &Self::Device,
        min_age: Duration,
        max_pages: u64,
        stop: &AtomicBool,
    ) -> Result<Reclaimed, Self::Error>;
    /// Recompresses with the secondary algorithm up to `max_pages` pages older than `min_age`
    /// or huge, skipping pages already recompressed, resuming where the previous call stopped.
    /// Fewer than `max_pages` tried without `stop` set means no such page is left.
    fn recompress_cold(
        &self,
        dev: &Self::Device,
        min_age: Duration,
        max_pages: u64,
        stop: &AtomicBool,
    ) -> Result<RecompressResult, Self::Error>;

    /// Bytes the pool holds (its pages in use, overhead included).
    fn pool_bytes_used(&self) -> u64;
    /// The store's memory limit in bytes, 0 = none.
    fn mem_limit(&self) -> u64;
    /// Pages compaction could free now (an estimate from counters).
    fn freeable_pages(&self) -> u64;
    /// Compacts the pool; returns the pages freed.
    fn compact(&self) -> u64;
}

/// Why watermark or pressure writeback ran this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Triggers {
    /// The store's pool was above its high watermark (or between the marks, still draining).
    pub store_watermark: bool,
    /// At least one device was above its own limit's high watermark (or still draining).
    pub device_watermark: bool,
    /// PSI `some avg10` was above the threshold.
    pub pressure: bool,
}

/// One device in one tick.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceTick {
    pub name: String,
    pub recompress_tried: u64,
    pub recompressed: u64,
    pub written_back: u64,
    pub freed_bytes: u64,
    pub throttled: bool,
    pub cold_age_secs: f64,
}

/// What one tick did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TickReport {
    /// The tick looked at the target (false: the policy is off, or stopped).
    pub ran: bool,
    /// The stop flag cut the tick short (or was set before it).
    pub stopped: bool,
    pub compacted_pages: u64,
    pub recompress_tried: u64,
    pub recompressed: u64,
    pub written_back: u64,
    pub freed_bytes: u64,
    pub triggers: Triggers,
    /// Per device, in the target's order.
    pub devices: Vec<DeviceTick>,
    /// Target operations that failed, as "device: error".
    pub errors: Vec<String>,
}

/// One device's policy statistics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DevicePolicyStats {
    pub name: String,
    /// Pages the policy recompressed into a smaller form (since the device appeared).
    pub recompressed: u64,
    /// Pages the policy wrote back.
    pub written_back: u64,
    /// Pool bytes its writeback freed.
    pub freed_bytes: u64,
    /// Promotions in the last minute.
    pub promotions_per_min: f64,
    /// The promotion target per minute (promotion_target x recently used pages), as last
    /// computed (0 until the device first sees promotions).
    pub promotion_target_per_min: f64,
    /// The current cold age: idle_age, or more under back-off.
    pub cold_age_secs: f64,
    /// Promotions are above target: the device's writeback is held back.
    pub throttled: bool,
    /// Failed target operations on this device.
    pub errors: u64,
}

/// What the policy has done since it was made.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PolicyStats {
    /// Ticks that ran.
    pub ticks: u64,
    /// CPU time the ticks took (the calling thread's CPU clock).
    pub cpu_secs: f64,
    /// Wall time the ticks took.
    pub wall_secs: f64,
    /// PSI `some avg10` given to the last tick (None: PSI missing or unreadable).
    pub last_psi: Option<f64>,
    /// Pool pages freed by the policy's compactions (store-wide).
    pub compacted_pages: u64,
    /// Watermark writeback is under way (between the marks, draining to the low one).
    pub reclaiming: bool,
    /// Failed target operations, all devices.
    pub errors: u64,
    pub last_error: Option<String>,
    /// By device name.
    pub devices: Vec<DevicePolicyStats>,
    pub config: PolicyConfig,
}

/// The policy's memory of one device.
#[derive(Debug)]
struct DeviceState {
    cold_age: Duration,
    throttled: bool,
    /// (time, cumulative promoted) samples; the front one is at or before the window's start.
    promotions: VecDeque<(Instant, u64)>,
    promotions_per_min: f64,
    /// (when counted, recently used pages).
    recent: Option<(Instant, u64)>,
    last_backoff_step: Option<Instant>,
    /// The device's own watermark writeback is under way.
    reclaiming: bool,
    recompress_rest_until: Option<Instant>,
    reclaim_rest_until: Option<Instant>,
    recompressed: u64,
    written_back: u64,
    freed_bytes: u64,
    errors: u64,
}

impl DeviceState {
    fn new(idle_age: Duration) -> Self {
        DeviceState {
            cold_age: idle_age,
            throttled: false,
            promotions: VecDeque::new(),
            promotions_per_min: 0.0,
            recent: None,
            last_backoff_step: None,
            reclaiming: false,
            recompress_rest_until: None,
            reclaim_rest_until: None,
            recompressed: 0,
            written_back: 0,
            freed_bytes: 0,
            errors: 0,
        }
    }

    fn promotion_target(&self, cfg: &PolicyConfig) -> f64 {
        self.recent
            .map_or(0.0, |(_, pages)| cfg.promotion_target * pages as f64)
    }
}

fn resting(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|u| now < u)
}

/// `fraction` of `bytes`, rounded down.
fn part(bytes: u64, fraction: f64) -> u64 {
    (bytes as f64 * fraction) as u64
}

/// The tiering policy's state across ticks. See the module documentation.
#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    stop: Arc<AtomicBool>,
    devices: BTreeMap<String, DeviceState>,
    /// The store's watermark writeback is under way.
    reclaiming: bool,
    /// Where the next tick's recompression starts among the devices, so that a budget too
    /// small for all of them is shared in turn.
    recompress_turn: usize,
    ticks: u64,
    cpu: Duration,
    wall: Duration,
    last_psi: Option<f64>,
    compacted_pages: u64,
    errors: u64,
    last_error: Option<String>,
}

/// One device during one tick.
struct Live<'a, D> {
    dev: D,
    view: DeviceView,
    state: &'a mut DeviceState,
    tick: DeviceTick,
}

impl Policy {
    /// A policy with the given knobs, or the reason they make no sense.
    pub fn new(cfg: PolicyConfig) -> Result<Policy, Error> {
        cfg.validate()?;
        Ok(Policy {
            cfg,
            stop: Arc::new(AtomicBool::new(false)),
            devices: BTreeMap::new(),
            reclaiming: false,
            recompress_turn: 0,
            ticks: 0,
            cpu: Duration::ZERO,
            wall: Duration::ZERO,
            last_psi: None,
            compacted_pages: 0,
            errors: 0,
            last_error: None,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Changes the knobs at run time. Counters, promotion windows and back-off survive; cold
    /// ages move into the new `idle_age..=max_cold_age` (a device not backed off follows
    /// `idle_age`); devices left alone for having no work are asked again; the stop flag is
    /// cleared. An invalid configuration changes nothing.
    pub fn set_config(&mut self, cfg: PolicyConfig) -> Result<(), Error> {
        cfg.validate()?;
        let old_idle = self.cfg.idle_age;
        for st in self.devices.values_mut() {
            st.cold_age = if st.cold_age <= old_idle {
                cfg.idle_age
            } else {
                st.cold_age.clamp(cfg.idle_age, cfg.max_cold_age)
            };
            if cfg.idle_age != old_idle {
                // Counted over the old idle age.
                st.recent = None;
            }
            st.recompress_rest_until = None;
            st.reclaim_rest_until = None;
            if !cfg.enabled {
                st.reclaiming = false;
            }
        }
        if !cfg.enabled {
            self.reclaiming = false;
        }
        self.cfg = cfg;
        self.resume();
        Ok(())
    }

    /// The flag that cuts a tick short: set it from any thread (shutdown, before a
    /// configuration change); ticks return at once until [`Policy::resume`] or
    /// [`Policy::set_config`] clears it.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Clears the stop flag.
    pub fn resume(&self) {
        self.stop.store(false, Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// What the policy has done so far.
    pub fn stats(&self) -> PolicyStats {
        PolicyStats {
            ticks: self.ticks,
            cpu_secs: self.cpu.as_secs_f64(),
            wall_secs: self.wall.as_secs_f64(),
            last_psi: self.last_psi,
            compacted_pages: self.compacted_pages,
            reclaiming: self.reclaiming,
            errors: self.errors,
            last_error: self.last_error.clone(),
            devices: self
                .devices
                .iter()
                .map(|(name, st)| DevicePolicyStats {
                    name: name.clone(),
                    recompressed: st.recompressed,
                    written_back: st.written_back,
                    freed_bytes: st.freed_bytes,
                    promotions_per_min: st.promotions_per_min,
                    promotion_target_per_min: st.promotion_target(&self.cfg),
                    cold_age_secs: st.cold_age.as_secs_f64(),
                    throttled: st.throttled,
                    errors: st.errors,
                })
                .collect(),
            config: self.cfg.clone(),
        }
    }

    /// One round of the policy at time `now` (monotonic; the caller's clock, so tests can
    /// script it), with PSI `some avg10` if known. See the module documentation for what it
    /// does, in order.
    pub fn tick<T: Target>(&mut self, target: &T, now: Instant, psi: Option<f64>) -> TickReport {
        let mut report = TickReport::default();
        if !self.cfg.enabled {
            return report;
        }
        if self.stopped() {
            report.stopped = true;
            return report;
        }
        let wall_start = Instant::now();
        let cpu_start = thread_cpu_time();
        report.ran = true;
        self.last_psi = psi;

        let cfg = self.cfg.clone();
        let stop = self.stop.clone();
        let mut errors = Vec::new();
        let mut live = gather(&mut self.devices, cfg.idle_age, target, now);

        for d in live.iter_mut() {
            Self::back_off(&cfg, target, d, now);
        }

        if !stop.load(Relaxed) {
            report.compacted_pages += Self::compact_if_worth(&cfg, target);
        }

        if cfg.recompress && !stop.load(Relaxed) {
            let turn = self.recompress_turn;
            Self::recompress(&cfg, target, &mut live, turn, now, &stop, &mut errors);
            // Recompression freed objects, not pages: give the pages back before writeback
            // measures the pool, so that pages shrunk in memory spare pages going to disk.
            if live.iter().any(|d| d.tick.recompressed > 0) && !stop.load(Relaxed) {
                report.compacted_pages += Self::compact_if_worth(&cfg, target);
            }
        }
        self.recompress_turn = self.recompress_turn.wrapping_add(1);

        if !stop.load(Relaxed) {
            let store_reclaiming = &mut self.reclaiming;
            report.triggers = Self::writeback(
                &cfg,
                target,
                &mut live,
                store_reclaiming,
                psi,
                now,
                &stop,
                &mut errors,
            );
        }

        let wrote = live.iter().any(|d| d.tick.written_back > 0);
        if wrote && !stop.load(Relaxed) {
            // Writeback freed objects, not pages: give the pages back before the next tick
            // measures the pool against the watermarks.
            report.compacted_pages += Self::compact_if_worth(&cfg, target);
        }

        for d in &live {
            report.recompress_tried += d.tick.recompress_tried;
            report.recompressed += d.tick.recompressed;
            report.written_back += d.tick.written_back;
            report.freed_bytes += d.tick.freed_bytes;
        }
        report.devices = live.into_iter().map(|d| d.tick).collect();
        report.stopped = stop.load(Relaxed);

        self.compacted_pages += report.compacted_pages;
        self.errors += errors.len() as u64;
        if let Some(e) = errors.last() {
            self.last_error = Some(e.clone());
        }
        report.errors = errors;
        self.ticks += 1;
        self.wall += wall_start.elapsed();
        if let (Some(a), Some(b)) = (cpu_start, thread_cpu_time()) {
            self.cpu += b.saturating_sub(a);
        }
        report
    }

    /// Step 4, decided first: the device's cold age and throttle from its promotion rate.
    fn back_off<T: Target>(
        cfg: &PolicyConfig,
        target: &T,
        d: &mut Live<'_, T::Device>,
        now: Instant,
    ) {
        let st = &mut *d.state;
        let rate = st.promotions_per_min;
        let step = (st.cold_age / 2).clamp(Duration::from_secs(1), BACKOFF_STEP);
        if rate > 0.0
            && st
                .recent
                .is_none_or(|(at, _)| now.saturating_duration_since(at) >= step)
        {
            let pages = target.recently_used_pages(&d.dev, cfg.idle_age);
            st.recent = Some((now, pages));
        }
        let target_rate = st.promotion_target(cfg);
        st.throttled = rate > target_rate;
        let may_step = st
            .last_backoff_step
            .is_none_or(|at| now.saturating_duration_since(at) >= step);
        if st.throttled {
            if may_step && st.cold_age < cfg.max_cold_age {
                st.cold_age = (st.cold_age * 2).min(cfg.max_cold_age);
                st.last_backoff_step = Some(now);
            }
        } else if (rate == 0.0 || rate < target_rate / 2.0)
            && may_step
            && st.cold_age > cfg.idle_age
        {
            st.cold_age = (st.cold_age / 2).max(cfg.idle_age);
            st.last_backoff_step = Some(now);
        }
        // Keep the age inside the knobs even if they changed under a running back-off.
        st.cold_age = st.cold_age.clamp(cfg.idle_age, cfg.max_cold_age);
        // Direct reclaim (in the write path) honours it too, before it falls back to idle_age.
        target.set_cold_age(&d.dev, st.cold_age);
        d.tick.throttled = st.throttled;
        d.tick.cold_age_secs = st.cold_age.as_secs_f64();
    }

    /// Step 1 (and again after writeback): compaction when worth it. Returns pages freed.
    fn compact_if_worth<T: Target>(cfg: &PolicyConfig, target: &T) -> u64 {
        let freeable = target.freeable_pages();
        let pages_used = target.pool_bytes_used() / crate::PAGE_SIZE as u64;
        if freeable >= MIN_COMPACT_PAGES
            && freeable as f64 > cfg.compact_fraction * pages_used as f64
        {
            target.compact()
        } else {
            0
        }
    }

    /// Step 2: recompression of cold and huge pages, at most `max_pages_per_tick` pages tried
    /// in all, shared between the devices starting at a turn that moves every tick.
    fn recompress<T: Target>(
        cfg: &PolicyConfig,
        target: &T,
        live: &mut [Live<'_, T::Device>],
        turn: usize,
        now: Instant,
        stop: &AtomicBool,
        errors: &mut Vec<String>,
    ) {
        let eligible: Vec<usize> = (0..live.len())
            .filter(|&i| {
                let d = &live[i];
                d.view.has_secondary
                    && d.view.stored_pages > 0
                    && !resting(d.state.recompress_rest_until, now)
            })
            .collect();
        if eligible.is_empty() {
            return;
        }
        let n = eligible.len();
        let mut budget = cfg.max_pages_per_tick;
        for k in 0..n {
            if budget == 0 || stop.load(Relaxed) {
                break;
            }
            let d = &mut live[eligible[(turn + k) % n]];
            let quota = budget.div_ceil((n - k) as u64);
            match target.recompress_cold(&d.dev, d.state.cold_age, quota, stop) {
                Ok(r) => {
                    budget = budget.saturating_sub(r.tried);
                    d.tick.recompress_tried += r.tried;
                    d.tick.recompressed += r.recompressed;
                    d.state.recompressed += r.recompressed;
                    if r.tried < quota && !stop.load(Relaxed) {
                        d.state.recompress_rest_until = Some(now + rest(d.state.cold_age));
                    }
                }
                Err(e) => {
                    d.state.errors += 1;
                    d.state.recompress_rest_until = Some(now + rest(d.state.cold_age));
                    errors.push(format!("{}: recompression: {e}", d.view.name));
                }
            }
        }
    }

    /// Step 3: writeback. First devices above their own limit's watermark (only they can help
    /// themselves), then the store's watermark or host pressure, most over their share first.
    #[allow(clippy::too_many_arguments)]
    fn writeback<T: Target>(
        cfg: &PolicyConfig,
        target: &T,
        live: &mut [Live<'_, T::Device>],
        store_reclaiming: &mut bool,
        psi: Option<f64>,
        now: Instant,
        stop: &AtomicBool,
        errors: &mut Vec<String>,
    ) -> Triggers {
        let mut triggers = Triggers::default();
        let mut budget = cfg.max_pages_per_tick;
        let limit = target.mem_limit();
        let store_used = if limit > 0 {
            target.pool_bytes_used()
        } else {
            0
        };
        let can_write = |d: &Live<'_, T::Device>| {
            d.view.has_backing
                && d.view.stored_pages > 0
                && !resting(d.state.reclaim_rest_until, now)
        };

        // Devices against their own limits.
        for i in 0..live.len() {
            let d = &mut live[i];
            let limit = d.view.mem_limit;
            if limit == 0 || !d.view.has_backing {
                d.state.reclaiming = false;
                continue;
            }
            let used = d.view.mem_used;
            let low = part(limit, cfg.low_watermark);
            d.state.reclaiming =
                used > part(limit, cfg.high_watermark) || (d.state.reclaiming && used > low);
            if !d.state.reclaiming {
                continue;
            }
            triggers.device_watermark = true;
            if !can_write(d) {
                continue;
            }
            let need = used - low;
            Self::drain(
                target,
                live,
                &[i],
                Some(need),
                &mut budget,
                now,
                stop,
                errors,
            );
        }

        // The store against its limit, and the host's pressure.
        if limit > 0 {
            let used = store_used;
            let low = part(limit, cfg.low_watermark);
            *store_reclaiming =
                used > part(limit, cfg.high_watermark) || (*store_reclaiming && used > low);
            triggers.store_watermark = *store_reclaiming;
        } else {
            *store_reclaiming = false;
        }
        triggers.pressure = psi.is_some_and(|p| p > cfg.psi_threshold);
        if !triggers.store_watermark && !triggers.pressure {
            return triggers;
        }
        // Under pressure alone there is no level to reach: a batch per tick, and throttled
        // devices are left alone. At the watermark they come after all the others.
        let need = if triggers.pressure {
            None
        } else {
            // Less what the devices over their own limits freed just now.
            let freed: u64 = live.iter().map(|d| d.tick.freed_bytes).sum();
            Some(
                store_used
                    .saturating_sub(part(limit, cfg.low_watermark))
                    .saturating_sub(freed),
            )
        };
        let candidates: Vec<usize> = (0..live.len())
            .filter(|&i| {
                can_write(&live[i]) && (triggers.store_watermark || !live[i].state.throttled)
            })
            .collect();
        Self::drain(
            target,
            live,
            &candidates,
            need,
            &mut budget,
            now,
            stop,
            errors,
        );
        triggers
    }

    /// Writes back from `candidates` until `need` bytes are freed (None: until the budget is
    /// spent), a batch at a time from the unthrottled device most over its share (then the
    /// throttled ones, likewise); a device that runs out of cold pages rests.
    #[allow(clippy::too_many_arguments)]
    fn drain<T: Target>(
        target: &T,
        live: &mut [Live<'_, T::Device>],
        candidates: &[usize],
        need: Option<u64>,
        budget: &mut u64,
        now: Instant,
        stop: &AtomicBool,
        errors: &mut Vec<String>,
    ) {
        let mut left: Vec<usize> = candidates.to_vec();
        let mut need = need;
        while *budget > 0 && need != Some(0) && !stop.load(Relaxed) {
            // Most over its share now, counting what this tick already freed.
            let over = |d: &Live<'_, T::Device>| {
                i128::from(d.view.mem_used)
                    - i128::from(d.tick.freed_bytes)
                    - i128::from(d.view.share)
            };
            let Some(pos) = (0..left.len()).max_by_key(|&p| {
                let d = &live[left[p]];
                (!d.state.throttled, over(d), std::cmp::Reverse(left[p]))
            }) else {
                break;
            };
            let d = &mut live[left[pos]];
            let batch = WRITEBACK_BATCH.min(*budget);
            match target.reclaim(&d.dev, d.state.cold_age, batch, stop) {
                Ok(r) => {
                    *budget = budget.saturating_sub(r.written);
                    d.tick.written_back += r.written;
                    d.tick.freed_bytes += r.freed_bytes;
                    d.state.written_back += r.written;
                    d.state.freed_bytes += r.freed_bytes;
                    need = need.map(|n| n.saturating_sub(r.freed_bytes));
                    if r.written < batch {
                        if !stop.load(Relaxed) {
                            d.state.reclaim_rest_until = Some(now + rest(d.state.cold_age));
                        }
                        left.swap_remove(pos);
                    }
                }
                Err(e) => {
                    d.state.errors += 1;
                    d.state.reclaim_rest_until = Some(now + rest(d.state.cold_age));
                    errors.push(format!("{}: writeback: {e}", d.view.name));
                    left.swap_remove(pos);
                }
            }
        }
    }
}

/// The target's devices with their state; state of devices gone is dropped.
fn gather<'a, T: Target>(
    states: &'a mut BTreeMap<String, DeviceState>,
    idle: Duration,
    target: &T,
    now: Instant,
) -> Vec<Live<'a, T::Device>> {
    let devs: Vec<(T::Device, DeviceView)> = target
        .devices()
        .into_iter()
        .map(|d| {
            let v = target.view(&d);
            (d, v)
        })
        .collect();
    states.retain(|name, _| devs.iter().any(|(_, v)| &v.name == name));
    for (_, v) in &devs {
        states
            .entry(v.name.clone())
            .or_insert_with(|| DeviceState::new(idle));
    }
    // Hand out one &mut per device, in the target's order (names are unique; a duplicate
    // name is skipped rather than aliased).
    let mut by_name: BTreeMap<&String, &mut DeviceState> = states.iter_mut().collect();
    let mut live = Vec::with_capacity(devs.len());
    for (dev, view) in devs {
        let Some(state) = by_name.remove(&view.name) else {
            continue;
        };
        // Promotion window: the newest sample, and the oldest at or before the window.
        if state
            .promotions
            .back()
            .is_some_and(|&(_, c)| view.promoted < c)
        {
            state.promotions.clear();
        }
        state.promotions.push_back((now, view.promoted));
        while state.promotions.len() >= 2
            && now.saturating_duration_since(state.promotions[1].0) >= PROMOTION_WINDOW
        {
            state.promotions.pop_front();
        }
        let (t0, c0) = state.promotions[0];
        let elapsed = now.saturating_duration_since(t0).max(PROMOTION_WINDOW);
        state.promotions_per_min = (view.promoted - c0) as f64 * 60.0 / elapsed.as_secs_f64();
        let tick = DeviceTick {
            name: view.name.clone(),
            ..DeviceTick::default()
        };
        live.push(Live {
            dev,
            view,
            state,
            tick,
        });
    }
    live
}

#[cfg(test)]
mod tests;
