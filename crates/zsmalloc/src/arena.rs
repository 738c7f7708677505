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
}

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
        let _ns = preempt::NonSleepGuard::new();
        let mut f = self.free.lock();
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = if let Some(p) = f.hot.pop().or_else(|| f.cold.pop()) {
                p
            } else if (f.next_fresh as usize) < self.capacity() {
                f.next_fresh += 1;
                f.next_fresh - 1
            } else {
                // Only when the limit exceeds what was reserved: give back what we took.
                f.hot.extend_from_slice(&out[..i]);
                drop(f);
                self.used.fetch_sub(n, Ordering::Relaxed);
                return Err(Error::LimitReached {
                    limit: self.capacity(),
                });
            };
        }
        Ok(())
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
        let fresh = self.free.lock().next_fresh as usize;
        self.pages.resident_pages(fresh)
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
        assert_eq!(a.resident_pages(), 2048);
        a.free(&pages);
        // All but the hot reserve were released at once.
        assert!(a.resident_pages() <= HOT_PAGES, "{}", a.resident_pages());
        a.trim();
        assert_eq!(a.resident_pages(), 0);
        // Reuse prefers hot, then cold pages, before fresh ones.
        let mut again = vec![0u32; 2048];
        a.alloc(&mut again).unwrap();
        assert!(again.iter().all(|&p| p < 2048));
    }
}
