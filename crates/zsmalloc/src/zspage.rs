//! Zspage metadata: one fixed-size record per zspage, in a [`Region`](region::Region)
//! indexed by zspage id.
//!
//! Fields other than `lock` are plain data guarded by the owning class's lock; they are atomics
//! only so that the record can live in shared memory without `unsafe` (relaxed loads and stores
//! compile to plain moves). `lock` is the zspage's reader/writer lock: readers and writers of
//! objects hold it shared, possibly for long (they may sleep); compaction is the only exclusive
//! user and only ever tries it.

use crate::class::MAX_CHAIN;
use region::Zeroable;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering::*};

/// "No zspage" in list links, "no slot" in free lists.
pub const NONE: u32 = u32::MAX;
pub const NONE16: u16 = u16::MAX;

/// Fullness groups as in the kernel: 0 = empty, 1..=10 = 0-9% .. 90-99% used, 11 = full.
pub const NR_GROUPS: usize = 12;
pub const GROUP_FULL: u8 = 11;

const WRITER: u32 = 1 << 31;

#[derive(Debug)]
#[repr(C)]
pub struct ZsPage {
    pub lock: AtomicU32,
    /// Reverse map of a huge zspage's single object (normal classes keep it in the object's
    /// header).
    pub huge_handle: AtomicU32,
    /// Fullness-list links.
    pub prev: AtomicU32,
    pub next: AtomicU32,
    pub inuse: AtomicU16,
    /// Head of the list of freed slots, linked through the slots' headers.
    pub free_head: AtomicU16,
    /// Slots at or above this index were never used: a new zspage needs no initialisation.
    pub bump: AtomicU16,
    pub class: AtomicU8,
    pub group: AtomicU8,
    /// The zspage's pages, in order; an object may span two consecutive ones.
    pub pages: [AtomicU32; MAX_CHAIN],
}

// SAFETY: all fields are atomics, for which zero bytes are valid values.
unsafe impl Zeroable for ZsPage {}

/// Fullness group of a zspage with `inuse` of `objs` slots in use.
pub fn group_of(inuse: usize, objs: usize) -> u8 {
    match inuse {
        0 => 0,
        n if n == objs => GROUP_FULL,
        n => (n * 100 / objs / 10 + 1) as u8,
    }
}

impl ZsPage {
    /// Takes the lock shared. Waits only while compaction holds it, which is brief and bounded.
    #[inline]
    pub fn read_lock(&self) {
        let mut backoff = preempt::Backoff::new();
        loop {
            let v = self.lock.load(Relaxed);
            if v & WRITER == 0 {
                if self
                    .lock
                    .compare_exchange_weak(v, v + 1, Acquire, Relaxed)
                    .is_ok()
                {
                    return;
                }
            } else {
                backoff.snooze();
            }
        }
    }

    #[inline]
    pub fn read_unlock(&self) {
        let prev = self.lock.fetch_sub(1, Release);
        debug_assert!(prev & !WRITER > 0, "zspage read_unlock without lock");
    }

    /// Compaction's exclusive lock: succeeds only if nobody reads or writes the zspage.
    #[inline]
    pub fn try_write_lock(&self) -> bool {
        self.lock
            .compare_exchange(0, WRITER, Acquire, Relaxed)
            .is_ok()
    }

    #[inline]
    pub fn write_unlock(&self) {
        // Not a store of 0: a reader with a stale location may be mid-way through its CAS loop,
        // but it only ever adds to the count after seeing WRITER clear, so the count is 0 here.
        self.lock.fetch_sub(WRITER, Release);
    }

    #[inline]
    pub fn page(&self, i: usize) -> u32 {
        self.pages[i].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fullness_groups_follow_the_kernel() {
        assert_eq!(group_of(0, 10), 0);
        assert_eq!(group_of(1, 127), 1); // 0% by integer division, still group "10%"
        assert_eq!(group_of(5, 10), 6);
        assert_eq!(group_of(99, 100), 10);
        assert_eq!(group_of(10, 10), GROUP_FULL);
    }

    #[test]
    fn compaction_lock_is_only_tried_and_excludes_readers() {
        let z: ZsPage = fresh();
        z.read_lock();
        assert!(!z.try_write_lock());
        z.read_unlock();
        assert!(z.try_write_lock());
        assert!(!z.try_write_lock());
        z.write_unlock();
        z.read_lock();
        z.read_lock();
        z.read_unlock();
        z.read_unlock();
        assert_eq!(z.lock.load(Relaxed), 0);
    }

    fn fresh() -> ZsPage {
        ZsPage {
            lock: AtomicU32::new(0),
            huge_handle: AtomicU32::new(0),
            prev: AtomicU32::new(0),
            next: AtomicU32::new(0),
            inuse: AtomicU16::new(0),
            free_head: AtomicU16::new(0),
            bump: AtomicU16::new(0),
            class: AtomicU8::new(0),
            group: AtomicU8::new(0),
            pages: Default::default(),
        }
    }
}
