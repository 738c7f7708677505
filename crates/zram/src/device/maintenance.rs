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
//!
//! There is one routine per page for each (`recompress_page`, `writeback_page`), and two
//! ways to drive it: the one-shot commands walk the whole device with a [`PageFilter`]
//! (zram's `recompress` and `writeback`), and the cold-page passes for a policy and for direct
//! reclaim (`recompress_cold`, `reclaim`) turn a clock hand kept per device, so that a pass
//! bounded by a page budget resumes where the last one stopped instead of starting over at
//! page 0. Scans read slots without locking (`Slot::peek`) to skip pages that are not
//! candidates, and only *try* the lock of a candidate: a page someone holds is in use, so not
//! cold, and no pass waits for it.

use super::{Device, PageFilter, Reclaimed, RecompressResult};
use crate::backing::Backing;
use crate::slot::{Entry, IDLE, INCOMPRESSIBLE, MAINT, SlotGuard, State};
use crate::{Error, PAGE_SIZE};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;
use zcomp::{Priority, Stream};

/// Slots a clock pass claims from its hand at a time.
const CHUNK: u64 = 64;

/// What a per-page writeback did.
enum Moved {
    /// Written back; the compressed bytes it held in memory.
    Page(u64),
    Skipped,
    /// The writeback limit is spent.
    NoBudget,
}

/// Writeback's buffers: the object's bytes, and room for an object that spans two pages.
struct Bufs {
    page: [u8; PAGE_SIZE],
    local: [u8; PAGE_SIZE],
}

impl Bufs {
    fn new() -> Bufs {
        Bufs {
            page: [0; PAGE_SIZE],
            local: [0; PAGE_SIZE],
        }
    }
}

fn in_memory(e: &Entry) -> bool {
    matches!(e.state(), State::Compressed | State::Huge)
}

fn secs(d: Duration) -> u32 {
    d.as_secs().min(u64::from(u32::MAX)) as u32
}

/// Not accessed for `age` seconds at `now`.
fn aged(e: &Entry, now: u32, age: u32) -> bool {
    now.saturating_sub(e.atime()) >= age
}

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
        // Idle pages are cold for direct reclaim.
        self.nothing_cold.store(0, Relaxed);
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
        self.check_secondary(prio)?;
        let mut result = RecompressResult::default();
        let mut page = [0u8; PAGE_SIZE];
        let wanted = |e: &Entry| filter.matches(e) && threshold.is_none_or(|t| e.len() >= t);
        for i in 0..self.pages as usize {
            if max_pages.is_some_and(|m| result.tried >= m) || stop.load(Relaxed) {
                break;
            }
            if let Some(kept) = self.recompress_page(i, prio, stream, &mut page, wanted)? {
                result.tried += 1;
                result.recompressed += u64::from(kept);
            }
        }
        Ok(result)
    }

    /// Recompresses up to `max_pages` cold pages with the secondary algorithm `prio`: pages
    /// idle, not accessed for `min_age`, or huge; never pages already at `prio` or found
    /// incompressible. Resumes where the last call stopped (its own clock hand, wrapping
    /// around) and looks at each slot at most once per call. Ends early once `stop` is set.
    pub fn recompress_cold(
        &self,
        min_age: Duration,
        max_pages: u64,
        prio: Priority,
        stream: &mut Stream,
        stop: &AtomicBool,
    ) -> Result<RecompressResult, Error> {
        self.check_secondary(prio)?;
        let (now, age) = (self.now(), secs(min_age));
        let mut result = RecompressResult::default();
        let mut failed = None;
        let mut page = [0u8; PAGE_SIZE];
        let cold = |e: &Entry| e.has(IDLE) || e.state() == State::Huge || aged(e, now, age);
        self.clock(&self.recompress_cursor, |i| {
            if result.tried >= max_pages || stop.load(Relaxed) {
                return ControlFlow::Break(());
            }
            match self.recompress_page(i, prio, stream, &mut page, cold) {
                Ok(None) => {}
                Ok(Some(kept)) => {
                    result.tried += 1;
                    result.recompressed += u64::from(kept);
                }
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        match failed {
            Some(e) if result.tried == 0 => Err(e),
            _ => Ok(result),
        }
    }

    fn check_secondary(&self, prio: Priority) -> Result<(), Error> {
        if prio.is_primary() || self.comp.backend(prio).is_none() {
            return Err(Error::InvalidArgument(format!(
                "no secondary algorithm with priority {}",
                prio.get()
            )));
        }
        Ok(())
    }

    /// Recompression of page `i`, if it is in memory, not yet at `prio`, not known
    /// incompressible, not under maintenance already, and `wanted`. `None`: not tried (or
    /// someone holds the page: it is in use); `Some(kept)`: tried, and whether the smaller form
    /// was installed (a page that does not shrink is marked incompressible).
    fn recompress_page(
        &self,
        i: usize,
        prio: Priority,
        stream: &mut Stream,
        page: &mut [u8; PAGE_SIZE],
        wanted: impl Fn(&Entry) -> bool,
    ) -> Result<Option<bool>, Error> {
        let candidate = |e: &Entry| {
            in_memory(e) && !e.has(INCOMPRESSIBLE | MAINT) && e.prio() < prio.get() && wanted(e)
        };
        let slot = self.slots.get(i);
        if !candidate(&slot.peek()) {
            return Ok(None);
        }
        let Some(g) = slot.try_lock().filter(|g| candidate(&g.entry)) else {
            return Ok(None);
        };
        let old = g.entry;
        self.decode(&old, page, stream)?;
        Self::unlock_for_maintenance(g);
        let new = match self.recompressed(&old, page, prio, stream) {
            Ok(new) => new,
            Err(e) => {
                self.abandon(i, &old);
                return Err(e);
            }
        };
        Ok(Some(match (self.relock_unchanged(i, &old), new) {
            (Some(g), Some(new)) => {
                self.replace(g, &old, new);
                self.counters().recompressed.fetch_add(1, Relaxed);
                true
            }
            (Some(mut g), None) => {
                g.set_flag(INCOMPRESSIBLE, true);
                g.set_flag(MAINT, false);
                false
            }
            (None, Some(new)) => {
                self.store.pool().free(Self::handle(&new));
                false
            }
            (None, None) => false,
        }))
    }

    /// `page` compressed with `prio` into a new object, if that lands in a smaller size class
    /// than `old`'s.
    fn recompressed(
        &self,
        old: &Entry,
        page: &[u8; PAGE_SIZE],
        prio: Priority,
        stream: &mut Stream,
    ) -> Result<Option<Entry>, Error> {
        let pool = self.store.pool();
        let compressed = stream.codec.compress_with(prio, page)?;
        let smaller = compressed.len() < pool.huge_class_size()
            && pool.slot_size(compressed.len()) < pool.slot_size(old.len());
        if !smaller {
            return Ok(None);
        }
        let h = self.store.malloc(compressed.len())?;
        pool.write(h, compressed);
        Ok(Some(Entry::new(
            State::Compressed,
            h.raw() as u64,
            compressed.len(),
            prio.get(),
        )))
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
        let mut bufs = Bufs::new();
        let mut written = 0;
        for i in 0..self.pages as usize {
            if limit.is_some_and(|l| written >= l) || stop.load(Relaxed) {
                break;
            }
            match self.writeback_page(backing, i, |e| filter.matches(e), &mut bufs)? {
                Moved::Page(_) => written += 1,
                Moved::Skipped => {}
                Moved::NoBudget => break,
            }
        }
        Ok(written)
    }

    /// Writes back up to `max_pages` cold pages: idle, not accessed for `min_age`,
    /// incompressible or huge. Resumes where the last pass stopped (the clock hand that direct
    /// reclaim moves too, wrapping around) and looks at each slot at most once per call; skips
    /// pages someone holds. Ends early once `stop` is set, or the writeback limit is spent.
    pub fn reclaim(
        &self,
        min_age: Duration,
        max_pages: u64,
        stop: &AtomicBool,
    ) -> Result<Reclaimed, Error> {
        let backing = self.backing.as_ref().ok_or(Error::NoBackingFile)?;
        self.reclaim_pass(backing, secs(min_age), max_pages, Some(stop))
    }

    /// Direct reclaim's share of this device: up to `max_pages` pages cold by `age` seconds
    /// written back. Returns the pages moved (0 without a backing file, or on a file error:
    /// the write that asked fails, not this device).
    pub(crate) fn reclaim_for_write(&self, age: u32, max_pages: u64) -> u64 {
        let Some(backing) = &self.backing else {
            return 0;
        };
        let now = u64::from(self.now());
        let memo = self.nothing_cold.load(Relaxed);
        if memo >> 32 == now + 1 && age >= memo as u32 {
            return 0;
        }
        let r = self.reclaim_pass(backing, age, max_pages, None);
        let written = r.as_ref().map_or(0, |r| r.written);
        if r.is_ok_and(|r| r.written == 0 && r.scanned >= self.pages) {
            self.nothing_cold
                .store((now + 1) << 32 | u64::from(age), Relaxed);
        }
        self.counters().direct_reclaimed.fetch_add(written, Relaxed);
        written
    }

    fn reclaim_pass(
        &self,
        backing: &Backing,
        age: u32,
        max_pages: u64,
        stop: Option<&AtomicBool>,
    ) -> Result<Reclaimed, Error> {
        let now = self.now();
        // Incompressible and huge pages gain nothing in memory and are cold at once, unless
        // the pass asks for more than the store's reclaim age (a device under back-off, whose
        // pages come back too often): then they too must be that old.
        let any_huge = u64::from(age) <= self.store.reclaim_age().as_secs();
        let cold = |e: &Entry| {
            e.has(IDLE)
                || aged(e, now, age)
                || any_huge && (e.has(INCOMPRESSIBLE) || e.state() == State::Huge)
        };
        let (mut written, mut freed_bytes, mut failed) = (0, 0, None);
        let mut bufs = Bufs::new();
        let scanned = self.clock(&self.writeback_cursor, |i| {
            if written >= max_pages || stop.is_some_and(|s| s.load(Relaxed)) {
                return ControlFlow::Break(());
            }
            match self.writeback_page(backing, i, cold, &mut bufs) {
                Ok(Moved::Page(bytes)) => {
                    written += 1;
                    freed_bytes += bytes;
                }
                Ok(Moved::Skipped) => {}
                Ok(Moved::NoBudget) => return ControlFlow::Break(()),
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        match failed {
            Some(e) if written == 0 => Err(e),
            _ => Ok(Reclaimed {
                scanned,
                written,
                freed_bytes,
            }),
        }
    }

    /// Writeback of page `i`, if it is in memory, not under maintenance already, and
    /// `wanted`; within the writeback limit. A page someone holds is skipped (it is in use).
    fn writeback_page(
        &self,
        backing: &Backing,
        i: usize,
        wanted: impl Fn(&Entry) -> bool,
        bufs: &mut Bufs,
    ) -> Result<Moved, Error> {
        let candidate = |e: &Entry| in_memory(e) && !e.has(MAINT) && wanted(e);
        let slot = self.slots.get(i);
        if !candidate(&slot.peek()) {
            return Ok(Moved::Skipped);
        }
        if !self.take_writeback_budget() {
            return Ok(Moved::NoBudget);
        }
        let Some(g) = slot.try_lock().filter(|g| candidate(&g.entry)) else {
            self.return_writeback_budget();
            return Ok(Moved::Skipped);
        };
        let old = g.entry;
        let len = old.len();
        bufs.page[..len].copy_from_slice(
            &self
                .store
                .pool()
                .read_begin(Self::handle(&old), &mut bufs.local),
        );
        Self::unlock_for_maintenance(g);
        let block = backing.alloc().ok_or(Error::BackingFull).and_then(|block| {
            backing.write(block, &bufs.page[..len]).map_err(|e| {
                backing.free(block);
                Error::from(e)
            })?;
            Ok(block)
        });
        let block = match block {
            Ok(block) => block,
            Err(e) => {
                self.abandon(i, &old);
                self.return_writeback_budget();
                return Err(e);
            }
        };
        let Some(g) = self.relock_unchanged(i, &old) else {
            backing.free(block);
            self.return_writeback_budget();
            return Ok(Moved::Skipped);
        };
        self.replace(
            g,
            &old,
            Entry::new(State::WrittenBack, block, len, old.prio()),
        );
        self.counters().bd_writes.fetch_add(1, Relaxed);
        Ok(Moved::Page(len as u64))
    }

    /// Pages stored (in memory or written back) and accessed within the last `window`: a scan
    /// of the slot table without locks.
    pub fn recently_used_pages(&self, window: Duration) -> u64 {
        let (now, window) = (self.now(), secs(window));
        (0..self.pages as usize)
            .map(|i| self.slots.get(i).peek())
            .filter(|e| e.state() != State::Empty && now.saturating_sub(e.atime()) <= window)
            .count() as u64
    }

    /// Turns a clock hand: visits slots from `cursor` on, wrapping around, at most one turn,
    /// until `visit` breaks (before doing anything to the slot it was given: the hand is left
    /// there if no other pass moved it meanwhile). Concurrent passes claim runs of
    /// [`CHUNK`] slots from the hand, so they look at different pages. Returns the slots
    /// visited.
    fn clock(&self, cursor: &AtomicU64, mut visit: impl FnMut(usize) -> ControlFlow<()>) -> u64 {
        let pages = self.pages;
        let mut scanned = 0;
        while scanned < pages {
            let n = CHUNK.min(pages - scanned);
            let hand = cursor.fetch_add(n, Relaxed);
            for k in 0..n {
                if visit(((hand + k) % pages) as usize).is_break() {
                    let _ = cursor.compare_exchange(hand + n, hand + k, Relaxed, Relaxed);
                    return scanned;
                }
                scanned += 1;
            }
        }
        scanned
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

    /// Gives up on a page copied out in step 1 (the slow work failed): clears the mark, if
    /// the slot still holds the copy, so later passes see the page again.
    fn abandon(&self, i: usize, old: &Entry) {
        if let Some(mut g) = self.relock_unchanged(i, old) {
            g.set_flag(MAINT, false);
        }
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
