//! Recovery: attaching to the files of a pool whose process is gone (a clean shutdown, a crash,
//! an upgrade).
//!
//! The caller says which handles are live (zram: the handles its slot tables hold); that and
//! each live handle's entry (zspage, slot, length) are the truth. Everything else is derived
//! and rebuilt here: which zspages and pages are in use, every zspage's free-slot list, object
//! headers and in-use count, the fullness lists, class and pool counters, the id allocators,
//! and the arena's free lists. An object that no live handle names (a write that was in flight,
//! an old copy being replaced, the source of an interrupted compaction move) is simply not
//! carried over, and its memory is handed back. Locks and pins that the dead process held are
//! cleared.
//!
//! This is sound after a crash at any instruction because the pool publishes in order: an
//! object's bytes, header and zspage record are written before its handle entry names them
//! (Release), and compaction copies an object whole before it switches the entry to the copy.
//! The caller, in turn, must publish a handle (Release) only after `write` has returned.
//!
//! Anything that cannot be, a live handle that is not allocated, points outside the tables,
//! into a class its length does not belong to, or at a slot another live handle has, or a page
//! that two zspages claim, is an error: the state is not this pool's, and no object is served.

use super::handles::entry;
use super::{OBJ_ALLOCATED, Pool, PoolFiles};
use crate::zspage::{NONE16, group_of};
use crate::{Config, Error, Handle};
use preempt::NonSleepGuard;
use std::sync::atomic::Ordering::*;

fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

impl Pool {
    /// Attaches to a pool that [`Pool::create`] made in `files`, with the same `cfg`. `live`
    /// are the handles the caller holds; every other object is dropped. Errors when the files
    /// do not fit `cfg` or the handles do not fit the files.
    pub fn recover(
        cfg: Config,
        files: &PoolFiles,
        live: impl IntoIterator<Item = Handle>,
    ) -> Result<Pool, Error> {
        let (pages, zspages, handles) = Self::map_files(&cfg, files, false)?;
        let mut pool = Self::with_regions(&cfg, pages, zspages, handles)?;
        pool.rebuild(live)?;
        Ok(pool)
    }

    fn rebuild(&mut self, live: impl IntoIterator<Item = Handle>) -> Result<(), Error> {
        let n_handles = self.handles.capacity();
        let n_zspages = self.zspages.capacity();
        // (zspage, slot, handle) of every live object.
        let mut objs = Vec::new();
        for h in live {
            let raw = h.raw() as usize;
            let bad = |why: String| Error::BadHandle {
                handle: h.raw(),
                why,
            };
            if raw >= n_handles {
                return Err(bad(format!(
                    "is beyond the handle table ({n_handles} entries)"
                )));
            }
            let e = self.handles.get(raw).load(Relaxed);
            if e & entry::ALLOC == 0 {
                return Err(bad("is held but not allocated".into()));
            }
            let z = entry::zspage(e);
            if z as usize >= n_zspages {
                return Err(bad(format!("points at zspage {z}, beyond {n_zspages}")));
            }
            // Pins of the dead process's readers and writers go.
            self.handles
                .get(raw)
                .store(e & !(entry::READERS | entry::WRITER), Relaxed);
            objs.push((z, entry::idx(e), h.raw()));
        }
        objs.sort_unstable();
        if let Some(w) = objs
            .windows(2)
            .find(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1)
        {
            return Err(Error::BadHandle {
                handle: w[1].2,
                why: format!(
                    "and handle {} are held and both name slot {} of zspage {}",
                    w[0].2, w[0].1, w[0].0
                ),
            });
        }

        let mut pages = Vec::new();
        let mut zspage_ids = Vec::new();
        let mut used = Vec::new();
        for run in objs.chunk_by(|a, b| a.0 == b.0) {
            let id = run[0].0;
            let z = self.zspage(id);
            let c = z.class.load(Relaxed) as usize;
            let Some(class) = self.classes.get(c) else {
                return Err(corrupt(format!("zspage {id} has no class {c}")));
            };
            let spec = class.spec;
            for k in 0..spec.pages_per_zspage {
                let p = z.page(k);
                if p as usize >= self.arena.capacity() {
                    return Err(corrupt(format!(
                        "zspage {id} holds page {p}, beyond the arena"
                    )));
                }
                pages.push(p);
            }
            used.clear();
            used.resize(spec.objs_per_zspage, false);
            for &(_, idx, h) in run {
                let len = entry::len(self.handles.get(h as usize).load(Relaxed));
                if idx >= spec.objs_per_zspage
                    || !(1..=crate::PAGE_SIZE).contains(&len)
                    || self.layout.class_for(len).id != c
                {
                    return Err(Error::BadHandle {
                        handle: h,
                        why: format!(
                            "(slot {idx}, {len} bytes) does not fit zspage {id} of class {}",
                            spec.size
                        ),
                    });
                }
                used[idx] = true;
                if spec.is_huge() {
                    z.huge_handle.store(h, Relaxed);
                } else {
                    self.write_header(class, z, idx, OBJ_ALLOCATED | h);
                }
            }
            // Free slots, linked lowest first.
            let mut head = NONE16;
            for idx in (0..spec.objs_per_zspage).rev().filter(|&i| !used[i]) {
                if !spec.is_huge() {
                    self.write_header(class, z, idx, head as u32);
                }
                head = idx as u16;
            }
            z.lock.store(0, Relaxed);
            z.free_head.store(head, Relaxed);
            z.bump.store(spec.objs_per_zspage as u16, Relaxed);
            z.inuse.store(run.len() as u16, Relaxed);
            {
                let _ns = NonSleepGuard::new();
                let mut lists = class.lists.lock();
                self.link(&mut lists, id, group_of(run.len(), spec.objs_per_zspage));
            }
            class
                .objs_allocated
                .fetch_add(spec.objs_per_zspage, Relaxed);
            class.objs_used.fetch_add(run.len(), Relaxed);
            zspage_ids.push(id);
        }

        pages.sort_unstable();
        if let Some(w) = pages.windows(2).find(|w| w[0] == w[1]) {
            return Err(corrupt(format!("page {} belongs to two zspages", w[0])));
        }
        self.arena.restore(&pages);

        // Zspage ids: the live ones (sorted, as `objs` was) stay taken, the others below the
        // highest are free, with their locks cleared; records above it are zeroed.
        let next = zspage_ids.last().map_or(0, |&z| z + 1);
        let ids = self.zspage_ids.get_mut();
        ids.next = next;
        ids.free.clear();
        let mut live = zspage_ids.iter().peekable();
        for id in 0..next {
            if live.next_if_eq(&&id).is_none() {
                self.zspages.get(id as usize).lock.store(0, Relaxed);
                ids.free.push(id);
            }
        }
        // SAFETY: records above the highest live zspage belong to no zspage, and the pool is
        // not shared yet.
        unsafe {
            self.zspages
                .discard(next as usize, n_zspages - next as usize)
        };

        let mut handles: Vec<u32> = objs.iter().map(|o| o.2).collect();
        handles.sort_unstable();
        self.handle_ids.restore(&handles, &self.handles);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{pattern, read};
    use super::*;
    use crate::PAGE_SIZE;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    const CFG: Config = Config {
        max_chain: 8,
        capacity_pages: 1 << 14,
        page_limit: 1 << 14,
    };

    fn files() -> PoolFiles {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let f = || {
            let dir = std::env::temp_dir();
            let path = dir.join(format!(
                "zsmalloc-recover-{}-{}",
                std::process::id(),
                N.fetch_add(1, Relaxed)
            ));
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            f
        };
        PoolFiles {
            pages: f(),
            zspages: f(),
            handles: f(),
            offset: PAGE_SIZE as u64,
        }
    }

    fn check(pool: &Pool, model: &BTreeMap<Handle, (u32, usize)>) {
        for (&h, &(seed, len)) in model {
            assert_eq!(read(pool, h), pattern(seed, len), "handle {h:?}");
        }
        let stats = pool.stats();
        assert_eq!(stats.objects, model.len());
        let from_classes: usize = pool.class_stats().iter().map(|c| c.pages_used).sum();
        assert_eq!(stats.pages_used, from_classes);
    }

    #[test]
    fn a_recovered_pool_serves_the_live_objects_and_frees_the_rest() {
        let files = files();
        let mut model = BTreeMap::new();
        let mut dropped = Vec::new();
        {
            let pool = Pool::create(CFG, &files).unwrap();
            for i in 0..3000u32 {
                let len = 1 + (i as usize * 997) % PAGE_SIZE;
                let h = pool.malloc(len).unwrap();
                pool.write(h, &pattern(i, len));
                if i % 3 == 0 {
                    // Allocated and written, but never published: a write in flight.
                    dropped.push(h);
                } else {
                    model.insert(h, (i, len));
                }
            }
            // Freed ones leave holes for compaction to close.
            let freed: Vec<_> = model.keys().copied().step_by(4).collect();
            for h in freed {
                pool.free(h);
                model.remove(&h);
            }
            pool.compact();
            // A reader that never finished: its locks and pins must not survive it.
            let mut local = [0u8; PAGE_SIZE];
            std::mem::forget(pool.read_begin(*model.keys().next().unwrap(), &mut local));
        }
        let before = files.pages.metadata().unwrap().blocks();
        let pool = Pool::recover(CFG, &files, model.keys().copied()).unwrap();
        check(&pool, &model);
        assert!(files.pages.metadata().unwrap().blocks() < before);
        // The objects that nobody held are gone; their handles are free again.
        let h = pool.malloc(10).unwrap();
        assert!(!model.contains_key(&h));
        pool.free(h);
        // Fully usable: every object can be freed (none is pinned) and compaction runs.
        pool.compact();
        for &h in model.keys() {
            pool.free(h);
        }
        assert_eq!(pool.pages_used(), 0);
        assert_eq!(pool.stats().objects, 0);
    }

    #[test]
    fn states_that_cannot_be_are_refused() {
        let files = files();
        let (a, b) = {
            let pool = Pool::create(CFG, &files).unwrap();
            let a = pool.malloc(100).unwrap();
            let b = pool.malloc(200).unwrap();
            pool.free(b);
            (a, b)
        };
        let err = |live: Vec<Handle>| Pool::recover(CFG, &files, live).unwrap_err().to_string();
        assert!(
            err(vec![a, b]).contains("not allocated"),
            "{}",
            err(vec![a, b])
        );
        assert!(err(vec![a, a]).contains("both name slot"));
        let far = Handle::from_raw(u32::MAX >> 1).unwrap();
        assert!(err(vec![far]).contains("beyond the handle table"));
        let other = Config {
            capacity_pages: CFG.capacity_pages * 2,
            ..CFG
        };
        let e = Pool::recover(other, &files, [a]).unwrap_err().to_string();
        assert!(e.contains("pages file") && e.contains("geometry"), "{e}");
        // The refusals changed nothing.
        assert_eq!(Pool::recover(CFG, &files, [a]).unwrap().stats().objects, 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(usize),
        Free(usize),
        Rewrite(usize),
        Compact,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1..=PAGE_SIZE).prop_map(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            2 => any::<usize>().prop_map(Op::Rewrite),
            1 => Just(Op::Compact),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any sequence of operations with restarts in between reads back like a map.
        #[test]
        fn restarts_keep_exactly_the_live_objects(ops in prop::collection::vec(op(), 1..400)) {
            let files = files();
            let mut pool = Some(Pool::create(CFG, &files).unwrap());
            let mut model: BTreeMap<Handle, (u32, usize)> = BTreeMap::new();
            for (seed, op) in ops.into_iter().enumerate() {
                let p = pool.as_ref().unwrap();
                let seed = seed as u32;
                match op {
                    Op::Alloc(len) => {
                        let h = p.malloc(len).unwrap();
                        p.write(h, &pattern(seed, len));
                        model.insert(h, (seed, len));
                    }
                    Op::Free(k) | Op::Rewrite(k) if !model.is_empty() => {
                        let h = *model.keys().nth(k % model.len()).unwrap();
                        let (_, len) = model[&h];
                        if matches!(op, Op::Free(_)) {
                            p.free(h);
                            model.remove(&h);
                        } else {
                            p.write(h, &pattern(seed, len));
                            model.insert(h, (seed, len));
                        }
                    }
                    Op::Compact => {
                        p.compact();
                    }
                    Op::Restart => {
                        drop(pool.take());
                        pool = Some(Pool::recover(CFG, &files, model.keys().copied()).unwrap());
                    }
                    _ => {}
                }
            }
            check(pool.as_ref().unwrap(), &model);
        }
    }
}
