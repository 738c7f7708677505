//! Compaction: moving objects out of the emptiest zspages of a class into the fullest, and
//! freeing the zspages that empties. It holds one class lock at a time, only *tries* zspage
//! locks (a zspage being read is skipped, never waited for), and only changes a moved object's
//! location bits in its handle entry, so readers and writers carry on beside it.

use super::handles::{Handle, entry};
use super::{Class, Lists, OBJ_ALLOCATED, Pool};
use crate::PAGE_SIZE;
use crate::zspage::{GROUP_FULL, NONE};
use preempt::NonSleepGuard;
use std::sync::atomic::Ordering::*;

impl Pool {
    /// Pages that compaction could free now: the kernel's `zs_can_compact` summed over classes.
    /// Reads counters only; takes no lock.
    pub fn freeable_pages(&self) -> usize {
        self.classes.iter().map(Class::freeable_pages).sum()
    }

    /// Moves objects from the emptiest zspages of each class into the fullest and frees the
    /// zspages it empties. Runs beside readers, writers, malloc and free: it holds a class lock
    /// for one source zspage at a time, and skips zspages being read or written rather than
    /// waiting for them. Returns the pages freed.
    pub fn compact(&self) -> usize {
        (0..self.classes.len()).map(|c| self.compact_class(c)).sum()
    }

    fn compact_class(&self, c: usize) -> usize {
        let class = &self.classes[c];
        if class.spec.is_huge() {
            return 0;
        }
        let mut freed = 0;
        // Each round empties a zspage or fills a destination; bound the rounds anyway.
        let mut rounds = class.objs_allocated.load(Relaxed) / class.spec.objs_per_zspage * 2 + 2;
        while rounds > 0 && class.freeable_pages() > 0 {
            rounds -= 1;
            let emptied = {
                let _ns = NonSleepGuard::new();
                let mut lists = class.lists.lock();
                let Some(src) = self.lock_emptiest(&lists) else {
                    break;
                };
                let moved = self.migrate(class, &mut lists, src);
                let z = self.zspage(src);
                let empty = z.inuse.load(Relaxed) == 0;
                if empty {
                    self.unlink(&mut lists, src);
                    class
                        .objs_allocated
                        .fetch_sub(class.spec.objs_per_zspage, Relaxed);
                } else {
                    self.regroup(class, &mut lists, src);
                }
                z.write_unlock();
                if !empty && moved == 0 {
                    break; // no destination with room: nothing more to gain
                }
                empty.then_some(src)
            };
            if let Some(src) = emptied {
                self.release_zspage(src, class.spec.pages_per_zspage);
                freed += class.spec.pages_per_zspage;
            }
        }
        self.pages_compacted.fetch_add(freed as u64, Relaxed);
        freed
    }

    /// The emptiest partly used zspage that nobody is reading, write-locked. Class lock held.
    fn lock_emptiest(&self, lists: &Lists) -> Option<u32> {
        for g in 1..GROUP_FULL as usize {
            let mut id = lists.heads[g];
            while id != NONE {
                let z = self.zspage(id);
                if z.try_write_lock() {
                    return Some(id);
                }
                id = z.next.load(Relaxed);
            }
        }
        None
    }

    /// Moves objects out of write-locked `src` into the fullest other zspages while they are
    /// at least as full as `src`. Class lock held. Returns the objects moved.
    fn migrate(&self, class: &Class, lists: &mut Lists, src: u32) -> usize {
        let zs = self.zspage(src);
        let mut buf = [0u8; PAGE_SIZE];
        let mut moved = 0;
        let bump = zs.bump.load(Relaxed) as usize;
        for idx in 0..bump {
            if zs.inuse.load(Relaxed) == 0 {
                break;
            }
            let header = self.read_header(class, zs, idx);
            if header & OBJ_ALLOCATED == 0 {
                continue;
            }
            let Some(dst) = self.fullest_with_room(lists, Some(src)) else {
                break;
            };
            let zd = self.zspage(dst);
            if zd.group.load(Relaxed) < zs.group.load(Relaxed) {
                break; // moving into an emptier zspage gains nothing
            }
            let h = Handle::from_raw(header & !OBJ_ALLOCATED).expect("object header");
            let len = entry::len(self.entry(h).load(Acquire));
            let didx = self.take_slot(class, dst);
            self.regroup(class, lists, dst);
            let slot = class.spec.header() + len;
            self.copy_out(zs, idx * class.spec.size, &mut buf[..slot]);
            self.copy_in(zd, didx * class.spec.size, &buf[..slot]);
            // Only the location changes: reader and writer pins may come and go meanwhile.
            self.entry(h)
                .fetch_update(Release, Relaxed, |e| {
                    Some(e & !entry::LOC_MASK | entry::loc(dst, didx))
                })
                .expect("update always succeeds");
            // The source slot goes back to src's free list; src is freed whole by the caller.
            self.write_header(class, zs, idx, zs.free_head.load(Relaxed) as u32);
            zs.free_head.store(idx as u16, Relaxed);
            zs.inuse.fetch_sub(1, Relaxed);
            class.objs_used.fetch_sub(1, Relaxed);
            moved += 1;
        }
        moved
    }
}
