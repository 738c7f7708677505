//! Per-device memory: the store's device registry, what each device is charged, the limits,
//! and direct reclaim when a write hits one.
//!
//! # Charging
//!
//! The pool's pages hold every device's objects mixed together, so a device's memory is
//! defined, not measured: its compressed bytes (`compr_data_size`, a huge page 4096) times
//! the pool's bytes per compressed byte. The shares of all devices add up to the pool.
//!
//! A device limit is checked on every write that allocates, so the write path must not sum
//! over devices: it reads the ratio cached in the store (`Store::charge`), refreshed when the
//! pool has moved by about 1% since the last refresh (by whichever writer sees it first and
//! gets the registry lock without waiting), after reclaim, and whenever memory is shown.
//! Without a device limit, the check is one relaxed load of that limit.
//!
//! # Direct reclaim
//!
//! A write that would cross its device's limit, or whose allocation hits the store's limit,
//! makes room before it gives up, as the kernel reclaims before failing an allocation:
//!
//! 1. at the store's limit, compact if the pool has freeable pages, and retry;
//! 2. write back a batch of cold pages ([`BATCH`]), oldest first as far as a clock can tell
//!    (a device the policy backed off gives pages older than its cold age, then half that,
//!    and so on, before any page older than the store's reclaim age): at the store's limit
//!    from the devices furthest above their fair share first, then the writer's own device,
//!    then the others; at the device's own limit from that device (nothing else lowers its
//!    charge); compact, and retry;
//! 3. fail with [`Error::NoSpace`](crate::Error::NoSpace) only when a round moved nothing
//!    (no cold page left, no backing file, or it is full, or its writeback limit is spent)
//!    and one more try, for what concurrent reclaimers freed meanwhile, failed too.
//!
//! Cold, for direct reclaim: idle, or not accessed for the store's reclaim age, or
//! incompressible, or huge. The writer holds no slot lock while it reclaims (a partial write
//! drops its page's lock and starts over), and reclaim itself only tries slot locks and never
//! holds one across file I/O (the install-if-unchanged protocol in `device/maintenance.rs`):
//! concurrent writers at a limit cannot deadlock, and they take pages from different parts of
//! the device's clock (each claims its own run of slots from the cursor).

use crate::device::Device;
use crate::{Error, PAGE_SIZE, Store};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// 1.0 in the 16.16 fixed point of the cached charge.
pub(crate) const ONE: u64 = 1 << 16;
/// Direct reclaim's default idea of cold: untouched for two minutes, as production far-memory
/// systems use.
pub(crate) const DEFAULT_RECLAIM_AGE: Duration = Duration::from_secs(120);
/// Pages direct reclaim writes back before it compacts and retries the allocation.
pub(crate) const BATCH: u64 = 32;
/// Rounds of direct reclaim at a device's backed-off cold age, halved each round, before the
/// store's reclaim age.
const BACKOFF_ROUNDS: u32 = 4;

/// What the store holds, for splitting it between devices.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Charge {
    pub pool_bytes: u64,
    pub compr_bytes: u64,
}

impl Charge {
    /// The pool bytes charged for `compr` compressed bytes.
    pub fn of(self, compr: u64) -> u64 {
        if self.compr_bytes == 0 {
            return 0;
        }
        (u128::from(self.pool_bytes) * u128::from(compr) / u128::from(self.compr_bytes)) as u64
    }

    fn ratio(self) -> u64 {
        if self.compr_bytes == 0 {
            return ONE;
        }
        (u128::from(self.pool_bytes) * u128::from(ONE) / u128::from(self.compr_bytes))
            .clamp(1, u128::from(u64::MAX >> 20)) as u64
    }
}

/// One write's way through direct reclaim.
#[derive(Debug, Default)]
pub(crate) struct Attempt {
    compacted: bool,
    retried: bool,
}

/// Why an allocation could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The device's own limit.
    Device,
    /// The store's limit (or its capacity).
    Store,
}

impl Store {
    /// Adds a new device to the registry.
    pub(crate) fn register(&self, dev: &Arc<Device>) {
        let mut devs = self.devices.lock();
        devs.retain(|d| d.strong_count() > 0);
        devs.push(Arc::downgrade(dev));
    }

    /// The live devices on this store, in the order they were made.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        let mut devs = self.devices.lock();
        devs.retain(|d| d.strong_count() > 0);
        devs.iter().filter_map(Weak::upgrade).collect()
    }

    /// Direct reclaim's age: a page not accessed for this long is cold for a write that hits
    /// a limit (default 120 s; whole seconds).
    pub fn set_reclaim_age(&self, age: Duration) {
        self.reclaim_age.store(age.as_secs(), Relaxed);
    }

    pub fn reclaim_age(&self) -> Duration {
        Duration::from_secs(self.reclaim_age.load(Relaxed))
    }

    /// The limit fair shares split: the memory limit, or the capacity without one.
    fn effective_limit(&self) -> u64 {
        match self.mem_limit() {
            0 => self.pool_stats().page_limit as u64 * PAGE_SIZE as u64,
            l => l,
        }
    }

    /// Sums the devices' compressed bytes and caches the ratio for the write path.
    pub(crate) fn refresh_charge(&self) -> Charge {
        let devs = self.devices.lock();
        self.refresh_locked(&devs)
    }

    fn refresh_locked(&self, devs: &[Weak<Device>]) -> Charge {
        let pages = self.pool().pages_used() as u64;
        let c = Charge {
            pool_bytes: pages * PAGE_SIZE as u64,
            compr_bytes: devs
                .iter()
                .filter_map(Weak::upgrade)
                .map(|d| d.compr_bytes())
                .sum(),
        };
        self.charge.store(c.ratio(), Relaxed);
        self.charged_at.store(pages, Relaxed);
        c
    }

    /// The cached pool bytes per compressed byte (16.16), refreshed first if the pool moved by
    /// more than about 1% since, unless another thread holds the registry (then it is left to
    /// the next writer).
    pub(crate) fn charge(&self) -> u64 {
        let pages = self.pool().pages_used() as u64;
        let at = self.charged_at.load(Relaxed);
        if pages.abs_diff(at) >= (at / 128).max(8)
            && let Some(devs) = self.devices.try_lock()
        {
            self.refresh_locked(&devs);
        }
        self.charge.load(Relaxed)
    }

    /// A device's fair share: its own limit, or the store's split evenly; 0 when neither is
    /// set.
    pub(crate) fn fair_share(&self, dev: &Device, devices: usize) -> u64 {
        match (dev.mem_limit(), self.mem_limit()) {
            (0, 0) => 0,
            (0, l) => l / devices.max(1) as u64,
            (own, _) => own,
        }
    }

    /// Who gives pages when `writer`'s allocation hits the store's limit: devices above their
    /// share (the capacity's, without a limit), most over first; then the writer; then the
    /// others, most memory first. Devices without a backing file are left out.
    fn reclaim_order(&self, writer: &Device) -> Vec<Arc<Device>> {
        let devs = self.devices();
        let charge = self.refresh_charge();
        let n = devs.len().max(1) as u64;
        let limit = self.effective_limit();
        let mut ranked: Vec<(u8, u64, Arc<Device>)> = devs
            .into_iter()
            .filter(|d| d.has_backing())
            .map(|d| {
                let used = charge.of(d.compr_bytes());
                let share = match d.mem_limit() {
                    0 => limit / n,
                    own => own,
                };
                let me = std::ptr::eq(Arc::as_ptr(&d), writer);
                let (group, key) = if used > share {
                    (0, used - share)
                } else if me {
                    (1, 0)
                } else {
                    (2, used)
                };
                (group, key, d)
            })
            .collect();
        ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        ranked.into_iter().map(|(_, _, d)| d).collect()
    }
}

impl Device {
    /// The policy's cold age for this device (longer than the store's reclaim age while its
    /// promotions are above target); zero: none.
    pub fn set_cold_age(&self, age: Duration) {
        self.cold_age.store(age.as_secs(), Relaxed);
    }

    fn cold_age_secs(&self) -> u32 {
        self.cold_age.load(Relaxed).min(u32::MAX as u64) as u32
    }

    /// One round of direct reclaim: up to [`BATCH`] pages cold by `age_of(device)` written
    /// back, from this device (its own limit) or in the store's reclaim order.
    fn reclaim_round(&self, full: Full, age_of: impl Fn(&Device) -> u32) -> u64 {
        match full {
            Full::Device => self.reclaim_for_write(age_of(self), BATCH),
            Full::Store => {
                let mut moved = 0;
                for dev in self.store().reclaim_order(self) {
                    moved += dev.reclaim_for_write(age_of(&dev), BATCH - moved);
                    if moved >= BATCH {
                        break;
                    }
                }
                moved
            }
        }
    }

    /// Whether `add` more compressed bytes, replacing `sub`, keep this device within its own
    /// `limit` (the write path reads the limit first, and comes here only if there is one).
    #[cold]
    pub(crate) fn within(&self, limit: u64, add: u64, sub: u64) -> bool {
        let compr = (self.compr_bytes() + add).saturating_sub(sub);
        let ratio = self.store().charge();
        ((u128::from(compr) * u128::from(ratio)) >> 16) as u64 <= limit
    }

    /// Makes room for a write that found `full`; see the module doc. No slot lock may be held
    /// by the caller. `Ok` when something was freed (the caller retries), else
    /// [`Error::NoSpace`](crate::Error::NoSpace), counted in `direct_reclaim_failed`.
    #[cold]
    pub(crate) fn direct_reclaim(&self, full: Full, attempt: &mut Attempt) -> Result<(), Error> {
        preempt::might_sleep();
        let store = self.store();
        if full == Full::Store && !attempt.compacted {
            // Once per write: what compaction frees, another writer may take first.
            attempt.compacted = true;
            if store.freeable_pages() > 0 && store.compact() > 0 {
                return Ok(());
            }
        }
        let age = store.reclaim_age.load(Relaxed).min(u32::MAX as u64) as u32;
        // Oldest first, roughly: pages cold by each device's own (backed-off) age, so that a
        // device whose pages come back too often keeps its recent ones; then by half that age,
        // and so on; only then pages cold by the store's age. A round that finds nothing costs
        // a scan once per second and age (`nothing_cold`).
        let mut moved = 0;
        for halvings in 0..=BACKOFF_ROUNDS {
            moved = self.reclaim_round(full, |d| {
                if halvings < BACKOFF_ROUNDS {
                    (d.cold_age_secs() >> halvings).max(age)
                } else {
                    age
                }
            });
            if moved > 0 {
                break;
            }
        }
        if moved == 0 {
            // The cold pages left may be in another writer's hands, being written back to
            // make room: retry the allocation once before giving up.
            if std::mem::replace(&mut attempt.retried, true) {
                self.counters().direct_reclaim_failed.fetch_add(1, Relaxed);
                return Err(Error::NoSpace);
            }
            return Ok(());
        }
        store.compact();
        store.refresh_charge();
        Ok(())
    }
}
