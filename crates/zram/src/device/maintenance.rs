//! Maintenance: idle marking, recompression, writeback and compaction.
//!
//! Recompression and writeback do their slow work (compressing again, writing the backing
//! file) with the slot unlocked, on a copy of the page, so that the guest's reads and writes
//! of that page do not wait for it. They share one protocol to install the result:
//!
//! 1. With the slot locked, check the page qualifies, copy out what is needed, and mark it
//!    (`Device::unlock_for_maintenance` sets `MAINT`, unlocks).
//! 2. Unlocked: make the new form (a new pool object, or a block of the backing file).
//! 3. `Device::relock_unchanged`: lock again, and go on only if the slot still holds the
//!    object that was copied *and* `MAINT` is still set. Every install clears `MAINT`, so a
//!    rewrite (even one that got the same handle id back), a discard or another maintenance
//!    pass that finished first all make the copy stale: the page's current content wins, and
//!    the caller gives back what it made.
//! 4. `Device::replace`: install the new form, keeping the page's flags and access time
//!    (moving a page is not an access), and free the old object after unlocking.
//!
//! A stop flag (the `stop` argument) is checked before each page, so a pass can be cancelled
//! between pages; every page is left either as it was or replaced whole.

use super::{Device, PageFilter, RecompressResult};
use crate::slot::{Entry, IDLE, INCOMPRESSIBLE, MAINT, SlotGuard, State};
use crate::{Error, PAGE_SIZE};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use zcomp::{Priority, Stream};

impl Device {
    /// Marks stored pages idle: all of them, or those not accessed for `older_than`.
    /// Returns how many were marked.
    pub fn mark_idle(&self, older_than: Option<Duration>) -> u64 {
        let now = self.now();
        let age = older_than.map_or(0, |d| d.as_secs().min(u32::MAX as u64) as u32);
        let mut marked = 0;
        for i in 0..self.pages as usize {
            let mut g = self.slots.get(i).lock();
            if g.entry.state() != State::Empty && now.saturating_sub(g.entry.atime()) >= age {
                g.set_flag(IDLE, true);
                marked += 1;
            }
        }
        marked
    }

    /// Recompresses matching pages with the algorithm of priority `prio` (1..=3), keeping the
    /// new form only if it lands in a smaller size class. `threshold`: only pages whose
    /// compressed size is at least this. `max_pages`: stop after trying this many. Ends early
    /// once `stop` is set (checked before each page), returning what it did so far. Every page
    /// stays readable with its content: a page is either left as it was or replaced whole.
    pub fn recompress(
        &self,
        filter: PageFilter,
        threshold: Option<usize>,
        max_pages: Option<u64>,
        prio: Priority,
        stream: &mut Stream,
        stop: &AtomicBool,
    ) -> Result<RecompressResult, Error> {
        if prio.is_primary() || self.comp.backend(prio).is_none() {
            return Err(Error::InvalidArgument(format!(
                "no secondary algorithm with priority {}",
                prio.get()
            )));
        }
        let pool = self.store.pool();
        let mut result = RecompressResult::default();
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..self.pages as usize {
            if max_pages.is_some_and(|m| result.tried >= m) || stop.load(Relaxed) {
                break;
            }
            let g = self.slots.get(i).lock();
            let old = g.entry;
            let eligible = matches!(old.state(), State::Compressed | State::Huge)
                && !old.has(INCOMPRESSIBLE)
                && old.prio() < prio.get()
                && filter.matches(&old)
                && threshold.is_none_or(|t| old.len() >= t);
            if !eligible {
                continue;
            }
            self.decode(&old, &mut page, stream)?;
            Self::unlock_for_maintenance(g);
            result.tried += 1;
            let compressed = stream.codec.compress_with(prio, &page)?;
            let smaller = compressed.len() < pool.huge_class_size()
                && pool.slot_size(compressed.len()) < pool.slot_size(old.len());
            let new = if smaller {
                let h = self.store.malloc(compressed.len())?;
                pool.write(h, compressed);
                Some(Entry::new(
                    State::Compressed,
                    h.raw() as u64,
                    compressed.len(),
                    prio.get(),
                ))
            } else {
                None
            };
            match (self.relock_unchanged(i, &old), new) {
                (Some(g), Some(new)) => {
                    self.replace(g, &old, new);
                    result.recompressed += 1;
                }
                (Some(mut g), None) => {
                    g.set_flag(INCOMPRESSIBLE, true);
                    g.set_flag(MAINT, false);
                }
                (None, Some(new)) => self.store.pool().free(Self::handle(&new)),
                (None, None) => {}
            }
        }
        Ok(result)
    }

    /// Moves matching pages, compressed as they are, to the backing file, up to `limit` pages
    /// and within the writeback limit (if enabled). Ends early once `stop` is set (checked
    /// before each page). Returns the pages written.
    pub fn writeback(
        &self,
        filter: PageFilter,
        limit: Option<u64>,
        stop: &AtomicBool,
    ) -> Result<u64, Error> {
        let backing = self.backing.as_ref().ok_or(Error::NoBackingFile)?;
        let mut buf = [0u8; PAGE_SIZE];
        let mut local = [0u8; PAGE_SIZE];
        let mut written = 0;
        for i in 0..self.pages as usize {
            if limit.is_some_and(|l| written >= l) || stop.load(Relaxed) {
                break;
            }
            if !self.take_writeback_budget() {
                break;
            }
            let g = self.slots.get(i).lock();
            let old = g.entry;
            if !matches!(old.state(), State::Compressed | State::Huge) || !filter.matches(&old) {
                drop(g);
                self.return_writeback_budget();
                continue;
            }
            let len = old.len();
            buf[..len]
                .copy_from_slice(&self.store.pool().read_begin(Self::handle(&old), &mut local));
            Self::unlock_for_maintenance(g);
            let Some(block) = backing.alloc() else {
                self.return_writeback_budget();
                return Err(Error::BackingFull);
            };
            if let Err(e) = backing.write(block, &buf[..len]) {
                backing.free(block);
                self.return_writeback_budget();
                return Err(e.into());
            }
            let Some(g) = self.relock_unchanged(i, &old) else {
                backing.free(block);
                self.return_writeback_budget();
                continue;
            };
            self.replace(
                g,
                &old,
                Entry::new(State::WrittenBack, block, len, old.prio()),
            );
            self.counters().bd_writes.fetch_add(1, Relaxed);
            written += 1;
        }
        Ok(written)
    }

    fn take_writeback_budget(&self) -> bool {
        let c = self.counters();
        c.writeback_limit_enable.load(Relaxed) == 0
            || c.writeback_limit
                .fetch_update(Relaxed, Relaxed, |l| l.checked_sub(1))
                .is_ok()
    }

    fn return_writeback_budget(&self) {
        if self.counters().writeback_limit_enable.load(Relaxed) != 0 {
            self.counters().writeback_limit.fetch_add(1, Relaxed);
        }
    }

    /// zram's `writeback_limit_enable` and `writeback_limit` (in pages).
    pub fn set_writeback_limit(&self, limit: Option<u64>) {
        let c = self.counters();
        c.writeback_limit.store(limit.unwrap_or(0), Relaxed);
        c.writeback_limit_enable
            .store(limit.is_some() as u64, Relaxed);
    }

    /// Compacts the pool this device's data lives in. Returns pages freed.
    pub fn compact(&self) -> usize {
        self.store.compact()
    }

    // ---- the install-if-unchanged protocol -----------------------------------------------

    /// Step 1's end: marks the locked page as copied out for maintenance, and unlocks it.
    fn unlock_for_maintenance(mut g: SlotGuard<'_>) {
        g.set_flag(MAINT, true);
    }

    /// Step 3: locks slot `i` again after working on a copy of `old` unlocked. The guard if the
    /// slot still holds `old` as step 1 left it; `None` if the copy went stale meanwhile.
    fn relock_unchanged(&self, i: usize, old: &Entry) -> Option<SlotGuard<'_>> {
        let g = self.slots.get(i).lock();
        (g.entry.has(MAINT) && g.entry.same_object(old)).then_some(g)
    }

    /// Step 4: puts `new`, maintenance's form of `old`, into the relocked slot. The page keeps
    /// its idle and incompressible flags and its access time; `old`'s object is freed after
    /// the slot is unlocked.
    fn replace(&self, mut g: SlotGuard<'_>, old: &Entry, new: Entry) {
        let keep = g.entry.meta & (IDLE | INCOMPRESSIBLE);
        let atime = g.entry.atime();
        self.account(&new);
        g.set(new, atime);
        g.entry.meta |= keep;
        drop(g);
        self.release(old);
    }
}
