//! The page arena: where zspages get their 4 KiB pages.
//!
//! One reserved mapping of `capacity` pages; a page is named by its index (`Pfn`). Pages never
//! used are untouched address space. Freed pages are kept on a short "hot" list for quick reuse;
//! past [`HOT_PAGES`] the oldest are handed back to the OS (`MADV_DONTNEED`, in batches, runs of
//! adjacent pages in one call) and moved to the "cold" list, so the daemon's resident memory
//! follows the pool's size while a burst of free/alloc does not pay a syscall per page.
//! `pages_used` counts pages held by zspages and is checked against a limit that may change at
//! run time.

use crate::{Error, PAGE_SIZE};
use parking_lot::Mutex;
use region::{Region, Zeroable};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Freed pages kept resident for reuse before they are given back to the OS.
pub const HOT_PAGES: usize = 256;

/// One page of pool memory. Only reached through raw pointers ([`Arena::page_ptr`]): objects
/// in the same page are read and written by different threads at once, at disjoint offsets.
#[derive(Debug)]
#[repr(C, align(4096))]
pub struct PageFrame(UnsafeCell<[u8; PAGE_SIZE]>);

// SAFETY: the pool never forms references to a whole PageFrame's bytes; all access is through
// raw pointers to disjoint byte ranges, coordinated by the pool's locks.
unsafe impl Sync for PageFrame {}
// SAFETY: zeroed bytes are a valid [u8; N].
unsafe impl Zeroable for PageFrame {}

#[derive(Debug, Default)]
struct FreeLists {
    hot: Vec<u32>,
    cold: Vec<u32>,
    /// Pages below this index have been handed out at least once.
    next_fresh: u32,
    /// Pages below this index have been populated ahead of their first use.
    populated: u32,
}

/// Fresh pages are faulted in this many at a time, ahead of use: one call instead of a page
/// fault per page (a fresh page of a tmpfs state file costs more to fault in than anonymous
/// memory). 64 pages: 256 KiB.
pub(crate) const POPULATE_AHEAD: u32 = 64;

/// The arena names pages with 32 bits.
pub(crate) fn check_capacity(capacity: usize) -> Result<(), Error> {
    if capacity == 0 || capacity > u32::MAX as usize {
        return Err(Error::InvalidConfig("arena capacity must be 1..2^32 pages"));
    }
    Ok(())
}

#[derive(Debug)]
pub struct Arena {
    pages: Region<PageFrame>,
    free: Mutex<FreeLists>,
    used: AtomicUsize,
    limit: AtomicUsize,
}

impl Arena {
    pub fn new(capacity: usize, limit: usize) -> Result<Arena, Error> {
        check_capacity(capacity)?;
        Ok(Self::with_pages(
            Region::reserve(capacity).map_err(Error::Reserve)?,
            limit,
        ))
    }

    /// An arena over pages mapped by the caller (a file: see [`crate::PoolFiles`]), all free.
    pub(crate) fn with_pages(pages: Region<PageFrame>, limit: usize) -> Arena {
        let capacity = pages.capacity();
        Arena {
            pages,
            free: Mutex::new(FreeLists::default()),
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit.min(capacity)),
        }
    }

    /// Recovery: `in_use` (sorted, no duplicates) are the pages that live zspages hold; every
    /// other page is free, and whatever a dead process left in it is handed back to the OS.
    /// Called before the arena is shared.
    pub(crate) fn restore(&mut self, in_use: &[u32]) {
        let fresh = in_use.last().map_or(0, |&p| p + 1);
        let f = self.free.get_mut();
        f.next_fresh = fresh;
        f.populated = fresh;
        let mut expected = 0;
        for &p in in_use.iter().chain([fresh].iter()) {
            f.cold.extend(expected..p);
            if p > expected {
                // SAFETY: no zspage holds these pages, and the arena is not shared yet.
                unsafe {
                    self.pages
                        .discard(expected as usize, (p - expected) as usize)
                };
            }
            expected = p + 1;
        }
        let cap = self.pages.capacity();
        if (fresh as usize) < cap {
            // SAFETY: never handed out in this life; not shared yet.
            unsafe { self.pages.discard(fresh as usize, cap - fresh as usize) };
        }
        *self.used.get_mut() = in_use.len();
    }

    pub fn capacity(&self) -> usize {
        self.pages.capacity()
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the page limit (clamped to the capacity). Pages in use above a lowered limit stay;
    /// only new allocations fail.
    pub fn set_limit(&self, limit: usize) {
        self.limit
            .store(limit.min(self.capacity()), Ordering::Relaxed);
    }

    /// Takes `out.len()` pages, all or none.
    pub fn alloc(&self, out: &mut [u32]) -> Result<(), Error> {
        let n = out.len();
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + n <= limit).then_some(u + n)
            })
            .map_err(|_| Error::LimitReached { limit })?;
        let ahead = {
            let _ns = preempt::NonSleepGuard::new();
            let mut f = self.free.lock();
            self.take(&mut f, out, n)?
        };
        // Outside the lock: a thread that uses one of these pages first just faults it in.
        if let Some((first, count)) = ahead {
            self.pages.populate(first as usize, count as usize);
        }
        Ok(())
    }

    /// Takes the pages under the free-list lock; returns a range of fresh pages to populate.
    fn take(
        &self,
        f: &mut FreeLists,
        out: &mut [u32],
        n: usize,
    ) -> Result<Option<(u32, u32)>, Error> {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = if let Some(p) = f.hot.pop().or_else(|| f.cold.pop()) {
                p
            } else if (f.next_fresh as usize) < self.capacity() {
                f.next_fresh += 1;
                f.next_fresh - 1
            } else {
                // Only when the limit exceeds what was reserved: give back what we took.
                f.hot.extend_from_slice(&out[..i]);
                self.used.fetch_sub(n, Ordering::Relaxed);
                return Err(Error::LimitReached {
                    limit: self.capacity(),
                });
            };
        }
        if f.next_fresh <= f.populated {
            return Ok(None);
        }
        let first = f.populated;
        let end = (f.next_fresh + POPULATE_AHEAD).min(self.capacity() as u32);
        f.populated = end;
        Ok(Some((first, end - first)))
    }

    /// Returns pages; the caller guarantees nothing refers to them any more.
    pub fn free(&self, pages: &[u32]) {
        self.used.fetch_sub(pages.len(), Ordering::Relaxed);
        let mut batch = {
            let _ns = preempt::NonSleepGuard::new();
            let mut f = self.free.lock();
            f.hot.extend_from_slice(pages);
            if f.hot.len() <= HOT_PAGES {
                return;
            }
            // Oldest first: the bottom of the stack has been idle longest.
            let excess = f.hot.len() - HOT_PAGES / 2;
            f.hot.drain(..excess).collect::<Vec<_>>()
        };
        self.release(&mut batch);
    }

    /// Hands all hot pages back to the OS (used when the pool shrinks a lot, and by tests).
    pub fn trim(&self) {
        let mut batch = {
            let _ns = preempt::NonSleepGuard::new();
            std::mem::take(&mut self.free.lock().hot)
        };
        self.release(&mut batch);
    }

    /// MADV_DONTNEED on the batch (outside the lock: it is a syscall), then files it as cold.
    fn release(&self, batch: &mut [u32]) {
        batch.sort_unstable();
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len() && batch[j] == batch[j - 1] + 1 {
                j += 1;
            }
            // SAFETY: these pages were freed by their zspages: no object lives in them, and
            // the pool reaches a page's bytes only through a zspage that holds it.
            unsafe { self.pages.discard(batch[i] as usize, j - i) };
            i = j;
        }
        let _ns = preempt::NonSleepGuard::new();
        self.free.lock().cold.extend_from_slice(batch);
    }

    /// Address of page `pfn`'s first byte.
    #[inline]
    pub fn page_ptr(&self, pfn: u32) -> *mut u8 {
        self.pages.ptr(pfn as usize)
    }

    /// Pages of the arena that are resident in memory (mincore), for tests and statistics.
    pub fn resident_pages(&self) -> usize {
        // Pages populated ahead count too: they hold memory.
        let f = self.free.lock();
        let touched = f.next_fresh.max(f.populated) as usize;
        drop(f);
        self.pages.resident_pages(touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(a: &Arena, pages: &[u32]) {
        for &p in pages {
            // SAFETY: p was allocated from this arena and is used by this test only.
            unsafe { a.page_ptr(p).write_bytes(0xAB, PAGE_SIZE) };
        }
    }

    #[test]
    fn limit_is_enforced_all_or_nothing() {
        let a = Arena::new(64, 10).unwrap();
        let mut six = [0u32; 6];
        a.alloc(&mut six).unwrap();
        let mut five = [0u32; 5];
        assert!(matches!(
            a.alloc(&mut five),
            Err(Error::LimitReached { limit: 10 })
        ));
        assert_eq!(a.used(), 6);
        a.set_limit(11);
        a.alloc(&mut five).unwrap();
        assert_eq!(a.used(), 11);
        a.free(&six);
        a.free(&five);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn capacity_bounds_allocation_even_with_a_higher_limit() {
        let a = Arena::new(4, usize::MAX).unwrap();
        let mut p = [0u32; 5];
        assert!(a.alloc(&mut p).is_err());
        assert_eq!(a.used(), 0);
        let mut p = [0u32; 4];
        a.alloc(&mut p).unwrap();
        let mut sorted = p;
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3]);
    }

    #[test]
    fn freed_memory_goes_back_to_the_os() {
        let a = Arena::new(4096, 4096).unwrap();
        let mut pages = vec![0u32; 2048];
        a.alloc(&mut pages).unwrap();
        touch(&a, &pages);
        // The pages in use, and at most one batch of fresh pages populated ahead.
        let ahead = POPULATE_AHEAD as usize;
        assert!((2048..=2048 + ahead).contains(&a.resident_pages()));
        a.free(&pages);
        // All but the hot reserve were released at once.
        let r = a.resident_pages();
        assert!(r <= HOT_PAGES + ahead, "{r}");
        a.trim();
        assert!(a.resident_pages() <= ahead, "{}", a.resident_pages());
        // Reuse prefers hot, then cold pages, before fresh ones.
        let mut again = vec![0u32; 2048];
        a.alloc(&mut again).unwrap();
        assert!(again.iter().all(|&p| p < 2048));
    }

    #[test]
    fn fresh_pages_are_populated_a_batch_ahead() {
        let a = Arena::new(1024, 1024).unwrap();
        let mut one = [0u32; 1];
        a.alloc(&mut one).unwrap();
        if !a.pages.populate(0, 1) {
            return; // no MADV_POPULATE_WRITE here: nothing to check
        }
        // Nothing was written, yet the page and the next batch are resident: one call faulted
        // them in.
        assert_eq!(a.resident_pages(), 1 + POPULATE_AHEAD as usize);
        // Pages inside the batch need no new call; the batch after it is populated when the
        // first page past it is handed out.
        let mut batch = vec![0u32; POPULATE_AHEAD as usize];
        a.alloc(&mut batch).unwrap();
        assert_eq!(a.resident_pages(), 1 + POPULATE_AHEAD as usize);
        let mut next = [0u32; 1];
        a.alloc(&mut next).unwrap();
        assert_eq!(a.resident_pages(), 2 + 2 * POPULATE_AHEAD as usize);
        a.free(&next);
        // Recycled pages are not populated again, and the total never passes the capacity.
        a.free(&batch);
        a.trim();
        let mut all = vec![0u32; 1023];
        a.alloc(&mut all).unwrap();
        assert!(a.resident_pages() <= 1024);
    }
}
