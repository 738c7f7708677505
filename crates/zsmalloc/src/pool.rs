//! The pool: placement, object access, limits and statistics. The handle table is in
//! `handles`, compaction in `compact`.

mod compact;
mod handles;
mod recover;

pub use handles::Handle;

use crate::arena::{Arena, PageFrame};
use crate::class::{Layout, MAX_CHAIN, MIN_CHAIN, MIN_CLASS_SIZE, SizeClass};
use crate::zspage::{GROUP_FULL, NONE, NONE16, NR_GROUPS, ZsPage, group_of};
use crate::{Error, PAGE_SIZE};
use handles::{HandleIds, IdAlloc, entry};
use parking_lot::Mutex;
use preempt::NonSleepGuard;
use region::{Region, Zeroable};
use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

/// Tag in a normal object's header: the slot holds an object of the handle in the low bits.
/// A free slot's header holds the index of the next free slot instead.
const OBJ_ALLOCATED: u32 = 1 << 31;

/// Pool configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Longest zspage chain in pages (4..=16; the kernel's default is 8).
    pub max_chain: usize,
    /// Address space reserved for pool pages: the most pages the pool can ever hold.
    pub capacity_pages: usize,
    /// Pages the pool may use (changeable with [`Pool::set_page_limit`]).
    pub page_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let phys = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
        let capacity = if phys > 0 { phys as usize } else { 1 << 20 };
        Config {
            max_chain: crate::class::DEFAULT_CHAIN,
            capacity_pages: capacity,
            page_limit: capacity,
        }
    }
}

/// The files of a pool that outlives its process: pages, zspage records and the handle table,
/// each mapped shared from byte `offset` on (the bytes before it are the caller's, for a
/// header). [`Pool::create`] sizes them; [`Pool::recover`] checks their sizes.
#[derive(Debug)]
pub struct PoolFiles {
    pub pages: File,
    pub zspages: File,
    pub handles: File,
    /// Where the pool's data starts in each file (a multiple of 4096).
    pub offset: u64,
}

impl Config {
    /// Handles a pool of this configuration can hand out: enough for a pool full of the
    /// smallest objects, within the object header's 31 bits.
    fn max_handles(&self) -> usize {
        (self.capacity_pages * (PAGE_SIZE / MIN_CLASS_SIZE) + 1).min(OBJ_ALLOCATED as usize - 1)
    }
}

/// Maps `cap` records of `file` after `offset`, first making the file that long if `create`.
fn map<T: Zeroable>(
    file: &File,
    offset: u64,
    cap: usize,
    create: bool,
    what: &'static str,
) -> Result<Region<T>, Error> {
    let err = |source| Error::File { what, source };
    let want = offset + (cap * std::mem::size_of::<T>()) as u64;
    if create {
        file.set_len(want).map_err(err)?;
    } else {
        let len = file.metadata().map_err(err)?.len();
        if len != want {
            return Err(err(std::io::Error::other(format!(
                "{len} bytes; this pool's geometry needs {want} (truncated, or made with \
                 another geometry)"
            ))));
        }
    }
    Region::map_file(file.try_clone().map_err(err)?, offset, cap).map_err(err)
}

/// A class's allocation lists, under its lock.
#[derive(Debug)]
struct Lists {
    heads: [u32; NR_GROUPS],
    counts: [usize; NR_GROUPS],
}

#[derive(Debug)]
#[repr(align(128))]
struct Class {
    spec: SizeClass,
    lists: Mutex<Lists>,
    /// Slots in this class's zspages and objects in them; written under the lock, read without
    /// it for the cheap freeable estimate.
    objs_allocated: AtomicUsize,
    objs_used: AtomicUsize,
}

impl Class {
    fn freeable_pages(&self) -> usize {
        let wasted = self
            .objs_allocated
            .load(Relaxed)
            .saturating_sub(self.objs_used.load(Relaxed));
        wasted / self.spec.objs_per_zspage * self.spec.pages_per_zspage
    }
}

/// Statistics of one size class (the kernel's `classes` debugfs file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    pub size: usize,
    pub pages_per_zspage: usize,
    pub objs_per_zspage: usize,
    pub zspages: usize,
    pub objs_allocated: usize,
    pub objs_used: usize,
    pub pages_used: usize,
    /// Pages compaction could free in this class.
    pub freeable: usize,
    /// Zspages per fullness group: empty, 0-9% .. 90-99%, full.
    pub fullness: [usize; NR_GROUPS],
}

/// Pool-wide statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages held by zspages (the kernel's `zs_get_total_pages`).
    pub pages_used: usize,
    /// Pages freed by compaction since the pool was made.
    pub pages_compacted: u64,
    pub page_limit: usize,
    pub capacity_pages: usize,
    /// Objects allocated now.
    pub objects: usize,
    /// Bytes of handle table and zspage records touched so far (the pool's own metadata).
    pub metadata_bytes: usize,
}

/// A pool of objects of 1..=4096 bytes. `Send + Sync`: share it between threads by reference
/// or `Arc`.
#[derive(Debug)]
pub struct Pool {
    layout: Layout,
    classes: Box<[Class]>,
    arena: Arena,
    zspages: Region<ZsPage>,
    zspage_ids: Mutex<IdAlloc>,
    handles: Region<AtomicU64>,
    handle_ids: HandleIds,
    pages_compacted: AtomicU64,
}

/// An object being read: derefs to its bytes. While it lives the object cannot move, be
/// written or freed. Dropping it is `read_end`.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    pool: &'a Pool,
    handle: Handle,
    zspage: u32,
    data: &'a [u8],
}

impl std::ops::Deref for ReadGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.pool.zspage(self.zspage).read_unlock();
        self.pool
            .entry(self.handle)
            .fetch_sub(entry::READER, Release);
    }
}

impl Pool {
    /// Makes a pool in anonymous memory; reserves (but does not commit) its address space.
    pub fn new(cfg: Config) -> Result<Pool, Error> {
        Self::check(&cfg)?;
        let max_handles = cfg.max_handles();
        Self::with_regions(
            &cfg,
            Region::reserve(cfg.capacity_pages).map_err(Error::Reserve)?,
            Region::reserve(cfg.capacity_pages).map_err(Error::Reserve)?,
            Region::reserve(max_handles).map_err(Error::Reserve)?,
        )
    }

    /// Makes an empty pool in `files` (fresh, empty files: they are sized here, sparse). Its
    /// objects outlive the process; [`Pool::recover`] attaches to them again.
    pub fn create(cfg: Config, files: &PoolFiles) -> Result<Pool, Error> {
        let (pages, zspages, handles) = Self::map_files(&cfg, files, true)?;
        Self::with_regions(&cfg, pages, zspages, handles)
    }

    fn check(cfg: &Config) -> Result<(), Error> {
        if !(MIN_CHAIN..=MAX_CHAIN).contains(&cfg.max_chain) {
            return Err(Error::InvalidConfig("max_chain must be 4..=16"));
        }
        crate::arena::check_capacity(cfg.capacity_pages)
    }

    #[allow(clippy::type_complexity)]
    fn map_files(
        cfg: &Config,
        f: &PoolFiles,
        create: bool,
    ) -> Result<(Region<PageFrame>, Region<ZsPage>, Region<AtomicU64>), Error> {
        Self::check(cfg)?;
        let cap = cfg.capacity_pages;
        Ok((
            map(&f.pages, f.offset, cap, create, "pages")?,
            map(&f.zspages, f.offset, cap, create, "zspages")?,
            map(&f.handles, f.offset, cfg.max_handles(), create, "handles")?,
        ))
    }

    fn with_regions(
        cfg: &Config,
        pages: Region<PageFrame>,
        zspages: Region<ZsPage>,
        handles: Region<AtomicU64>,
    ) -> Result<Pool, Error> {
        let layout = Layout::new(cfg.max_chain);
        let arena = Arena::with_pages(pages, cfg.page_limit);
        let max_handles = handles.capacity();
        let classes = layout
            .classes
            .iter()
            .map(|&spec| Class {
                spec,
                lists: Mutex::new(Lists {
                    heads: [NONE; NR_GROUPS],
                    counts: [0; NR_GROUPS],
                }),
                objs_allocated: AtomicUsize::new(0),
                objs_used: AtomicUsize::new(0),
            })
            .collect();
        Ok(Pool {
            layout,
            classes,
            zspages,
            zspage_ids: Mutex::new(IdAlloc {
                free: Vec::new(),
                next: 0,
                cap: cfg.capacity_pages as u32,
            }),
            handles,
            handle_ids: HandleIds::new(max_handles as u32),
            arena,
            pages_compacted: AtomicU64::new(0),
        })
    }

    /// The class table.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Objects this long or longer take a whole page (see [`Layout::huge_class_size`]).
    pub fn huge_class_size(&self) -> usize {
        self.layout.huge_class_size()
    }

    /// Slot size that an object of `len` bytes occupies (header included).
    pub fn slot_size(&self, len: usize) -> usize {
        self.layout.class_for(len.clamp(1, PAGE_SIZE)).size
    }

    #[inline]
    fn zspage(&self, id: u32) -> &ZsPage {
        self.zspages.get(id as usize)
    }

    fn class_of(&self, z: &ZsPage) -> &Class {
        &self.classes[z.class.load(Relaxed) as usize]
    }

    // ---- allocation -------------------------------------------------------------------

    /// Allocates an object of `len` bytes (1..=4096). Its contents are undefined until written.
    pub fn malloc(&self, len: usize) -> Result<Handle, Error> {
        if !(1..=PAGE_SIZE).contains(&len) {
            return Err(Error::InvalidLength(len));
        }
        let class = &self.classes[self.layout.class_for(len).id];
        let h = self.alloc_handle()?;
        {
            let _ns = NonSleepGuard::new();
            let mut lists = class.lists.lock();
            if let Some(z) = self.fullest_with_room(&lists, None) {
                self.place(class, &mut lists, z, h, len);
                return Ok(h);
            }
        }
        // No room: get a new zspage without holding the class lock (the arena has its own).
        let z = match self.new_zspage(class) {
            Ok(z) => z,
            Err(e) => {
                self.free_handle(h);
                return Err(e);
            }
        };
        let _ns = NonSleepGuard::new();
        let mut lists = class.lists.lock();
        self.link(&mut lists, z, 0);
        class
            .objs_allocated
            .fetch_add(class.spec.objs_per_zspage, Relaxed);
        self.place(class, &mut lists, z, h, len);
        Ok(h)
    }

    fn new_zspage(&self, class: &Class) -> Result<u32, Error> {
        let n = class.spec.pages_per_zspage;
        let mut pages = [0u32; MAX_CHAIN];
        let id = {
            let _ns = NonSleepGuard::new();
            self.zspage_ids.lock().alloc()
        }
        .ok_or(Error::LimitReached {
            limit: self.arena.limit(),
        })?;
        if let Err(e) = self.arena.alloc(&mut pages[..n]) {
            let _ns = NonSleepGuard::new();
            self.zspage_ids.lock().free.push(id);
            return Err(e);
        }
        let z = self.zspage(id);
        // `lock` is left alone: a reader with a stale location may hold it for a moment, and
        // it is balanced by that reader.
        z.huge_handle.store(0, Relaxed);
        z.prev.store(NONE, Relaxed);
        z.next.store(NONE, Relaxed);
        z.inuse.store(0, Relaxed);
        z.free_head.store(NONE16, Relaxed);
        z.bump.store(0, Relaxed);
        z.class.store(class.spec.id as u8, Relaxed);
        z.group.store(0, Relaxed);
        for (slot, &p) in z.pages.iter().zip(&pages[..n]) {
            slot.store(p, Relaxed);
        }
        Ok(id)
    }

    /// Gives an emptied zspage's pages and id back. It is already unlinked from its class.
    fn release_zspage(&self, id: u32, pages_per_zspage: usize) {
        let z = self.zspage(id);
        let mut pages = [0u32; MAX_CHAIN];
        for (i, p) in pages[..pages_per_zspage].iter_mut().enumerate() {
            *p = z.page(i);
        }
        self.arena.free(&pages[..pages_per_zspage]);
        let _ns = NonSleepGuard::new();
        self.zspage_ids.lock().free.push(id);
    }

    /// The fullest zspage that has a free slot, other than `except`. Class lock held.
    fn fullest_with_room(&self, lists: &Lists, except: Option<u32>) -> Option<u32> {
        (1..GROUP_FULL as usize).rev().find_map(|g| {
            let head = lists.heads[g];
            match head {
                NONE => None,
                h if Some(h) == except => {
                    Some(self.zspage(h).next.load(Relaxed)).filter(|&n| n != NONE)
                }
                h => Some(h),
            }
        })
    }

    fn link(&self, lists: &mut Lists, id: u32, group: u8) {
        let z = self.zspage(id);
        let head = lists.heads[group as usize];
        z.group.store(group, Relaxed);
        z.prev.store(NONE, Relaxed);
        z.next.store(head, Relaxed);
        if head != NONE {
            self.zspage(head).prev.store(id, Relaxed);
        }
        lists.heads[group as usize] = id;
        lists.counts[group as usize] += 1;
    }

    fn unlink(&self, lists: &mut Lists, id: u32) {
        let z = self.zspage(id);
        let (prev, next) = (z.prev.load(Relaxed), z.next.load(Relaxed));
        let g = z.group.load(Relaxed) as usize;
        if prev == NONE {
            lists.heads[g] = next;
        } else {
            self.zspage(prev).next.store(next, Relaxed);
        }
        if next != NONE {
            self.zspage(next).prev.store(prev, Relaxed);
        }
        lists.counts[g] -= 1;
    }

    /// Moves a zspage to the list its fullness now calls for. Class lock held.
    fn regroup(&self, class: &Class, lists: &mut Lists, id: u32) {
        let z = self.zspage(id);
        let g = group_of(z.inuse.load(Relaxed) as usize, class.spec.objs_per_zspage);
        if g != z.group.load(Relaxed) {
            self.unlink(lists, id);
            self.link(lists, id, g);
        }
    }

    /// Takes a free slot of zspage `id` (which has one). Class lock held.
    fn take_slot(&self, class: &Class, id: u32) -> usize {
        let z = self.zspage(id);
        let head = z.free_head.load(Relaxed);
        let idx = if head != NONE16 {
            let next = self.read_header(class, z, head as usize);
            z.free_head.store(next as u16, Relaxed);
            head as usize
        } else {
            let b = z.bump.load(Relaxed);
            z.bump.store(b + 1, Relaxed);
            b as usize
        };
        debug_assert!(idx < class.spec.objs_per_zspage);
        z.inuse.fetch_add(1, Relaxed);
        class.objs_used.fetch_add(1, Relaxed);
        idx
    }

    /// Returns slot `idx` of zspage `id` to its free list. Class lock held. Returns whether the
    /// zspage is now empty (and unlinked: the caller releases it after dropping the lock).
    fn put_slot(&self, class: &Class, lists: &mut Lists, id: u32, idx: usize) -> bool {
        let z = self.zspage(id);
        if !class.spec.is_huge() {
            self.write_header(class, z, idx, z.free_head.load(Relaxed) as u32);
        }
        z.free_head.store(idx as u16, Relaxed);
        let inuse = z.inuse.fetch_sub(1, Relaxed) - 1;
        class.objs_used.fetch_sub(1, Relaxed);
        if inuse == 0 {
            self.unlink(lists, id);
            class
                .objs_allocated
                .fetch_sub(class.spec.objs_per_zspage, Relaxed);
            true
        } else {
            self.regroup(class, lists, id);
            false
        }
    }

    /// Puts handle `h`'s new object of `len` bytes into zspage `id`. Class lock held.
    fn place(&self, class: &Class, lists: &mut Lists, id: u32, h: Handle, len: usize) {
        let idx = self.take_slot(class, id);
        let z = self.zspage(id);
        if class.spec.is_huge() {
            z.huge_handle.store(h.raw(), Relaxed);
        } else {
            self.write_header(class, z, idx, OBJ_ALLOCATED | h.raw());
        }
        self.regroup(class, lists, id);
        // Published under the class lock: compaction (which holds it) sees the entry as soon as
        // it can see the object.
        self.entry(h).store(entry::new(id, idx, len), Release);
    }

    /// Frees `h`'s object.
    ///
    /// # Panics
    ///
    /// If `h` is not allocated, or is being read or written at this moment (a caller's bug:
    /// the object would vanish under a reader).
    pub fn free(&self, h: Handle) {
        let e = self.entry(h).load(Acquire);
        assert!(e & entry::ALLOC != 0, "free of unallocated handle {h:?}");
        let class = &self.classes[self.layout.class_for(entry::len(e)).id];
        let emptied = {
            let _ns = NonSleepGuard::new();
            let mut lists = class.lists.lock();
            // Under the class lock the location is stable (compaction holds it to move).
            let e = self
                .entry(h)
                .fetch_update(AcqRel, Acquire, |e| {
                    (e & (entry::ALLOC | entry::WRITER | entry::READERS) == entry::ALLOC)
                        .then_some(0)
                })
                .unwrap_or_else(|e| panic!("free of handle {h:?} in use or freed ({e:#x})"));
            let id = entry::zspage(e);
            self.put_slot(class, &mut lists, id, entry::idx(e))
                .then_some(id)
        };
        if let Some(id) = emptied {
            self.release_zspage(id, class.spec.pages_per_zspage);
        }
        self.free_handle(h);
    }

    // ---- object access -----------------------------------------------------------------

    /// Pins `h` as a reader or as its writer, then read-locks the zspage that holds
    /// its object, retrying if compaction moved it meanwhile. Returns the entry and the zspage.
    fn pin_and_lock(&self, h: Handle, writer: bool) -> (u64, &ZsPage) {
        let ent = self.entry(h);
        let mut backoff = preempt::Backoff::new();
        loop {
            let e = ent.load(Acquire);
            assert!(e & entry::ALLOC != 0, "access to unallocated handle {h:?}");
            assert!(e & entry::WRITER == 0, "handle {h:?} is being written");
            let next = if writer {
                assert!(
                    e & entry::READERS == 0,
                    "write to handle {h:?} while it is read"
                );
                e | entry::WRITER
            } else if e & entry::READERS == entry::READERS {
                // 63 concurrent readers of one object: wait for one to finish.
                backoff.snooze();
                continue;
            } else {
                e + entry::READER
            };
            if ent.compare_exchange_weak(e, next, Acquire, Relaxed).is_ok() {
                break;
            }
        }
        loop {
            let e = ent.load(Acquire);
            let z = self.zspage(entry::zspage(e));
            z.read_lock();
            let now = ent.load(Acquire);
            if now & entry::LOC_MASK == e & entry::LOC_MASK {
                return (now, z);
            }
            z.read_unlock();
        }
    }

    /// Byte offset of slot `idx`'s object data in its zspage.
    fn data_offset(class: &SizeClass, idx: usize) -> usize {
        idx * class.size + class.header()
    }

    /// `read_begin`: the bytes of `h`'s object. When the object lies in one page they are a
    /// direct view into the pool; when it spans two pages they are copied into `local_copy`.
    /// The holder may take as long as it likes (sleep, decompress, copy to a guest); only
    /// compaction of this zspage is held off.
    ///
    /// # Panics
    ///
    /// If `h` is not allocated or is being written.
    pub fn read_begin<'a>(
        &'a self,
        h: Handle,
        local_copy: &'a mut [u8; PAGE_SIZE],
    ) -> ReadGuard<'a> {
        let (e, z) = self.pin_and_lock(h, false);
        let spec = &self.class_of(z).spec;
        let off = Self::data_offset(spec, entry::idx(e));
        let len = entry::len(e);
        let in_page = off % PAGE_SIZE;
        let data: &'a [u8] = if in_page + len <= PAGE_SIZE {
            let p = self.arena.page_ptr(z.page(off / PAGE_SIZE));
            // SAFETY: the range lies inside one pool page, which stays mapped while the pool
            // lives ('a borrows the pool). Nobody writes it while the guard lives: the handle
            // pin keeps `write` and `free` off this object, the zspage read lock keeps
            // compaction from moving it, and other objects' writes touch disjoint bytes.
            unsafe { std::slice::from_raw_parts(p.add(in_page), len) }
        } else {
            self.copy_out(z, off, &mut local_copy[..len]);
            &local_copy[..len]
        };
        ReadGuard {
            pool: self,
            handle: h,
            zspage: entry::zspage(e),
            data,
        }
    }

    /// Writes `h`'s object: `bytes` must be exactly the length it was allocated with. Copies
    /// straight into the pool (two copies when the object spans pages).
    ///
    /// # Panics
    ///
    /// If the length differs, or `h` is not allocated or is being read or written.
    pub fn write(&self, h: Handle, bytes: &[u8]) {
        let (e, z) = self.pin_and_lock(h, true);
        let len = entry::len(e);
        let result = (bytes.len() == len).then(|| {
            let spec = &self.class_of(z).spec;
            self.copy_in(z, Self::data_offset(spec, entry::idx(e)), bytes);
        });
        z.read_unlock();
        self.entry(h).fetch_and(!entry::WRITER, Release);
        assert!(
            result.is_some(),
            "write of {} bytes to a {len}-byte object",
            bytes.len()
        );
    }

    /// Length of `h`'s object.
    pub fn len(&self, h: Handle) -> usize {
        entry::len(self.entry(h).load(Acquire))
    }

    /// Copies zspage bytes `off..off + dst.len()` out (the range may span two pages).
    fn copy_out(&self, z: &ZsPage, off: usize, dst: &mut [u8]) {
        let mut done = 0;
        while done < dst.len() {
            let pos = off + done;
            let n = (PAGE_SIZE - pos % PAGE_SIZE).min(dst.len() - done);
            let src = self.arena.page_ptr(z.page(pos / PAGE_SIZE));
            // SAFETY: the source range is inside one pool page; the caller holds the right to
            // read these bytes (zspage read lock + handle pin, or the class lock for headers),
            // so no one writes them meanwhile; dst is a distinct Rust buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(pos % PAGE_SIZE), dst[done..].as_mut_ptr(), n)
            };
            done += n;
        }
    }

    /// Copies `src` into zspage bytes `off..off + src.len()`.
    fn copy_in(&self, z: &ZsPage, off: usize, src: &[u8]) {
        let mut done = 0;
        while done < src.len() {
            let pos = off + done;
            let n = (PAGE_SIZE - pos % PAGE_SIZE).min(src.len() - done);
            let dst = self.arena.page_ptr(z.page(pos / PAGE_SIZE));
            // SAFETY: the destination is inside one pool page, within a slot the caller owns
            // exclusively (the handle's writer pin, or a free slot under the class lock), so
            // no other thread reads or writes these bytes; src is a distinct Rust buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(src[done..].as_ptr(), dst.add(pos % PAGE_SIZE), n)
            };
            done += n;
        }
    }

    fn read_header(&self, class: &Class, z: &ZsPage, idx: usize) -> u32 {
        let mut b = [0u8; 4];
        self.copy_out(z, idx * class.spec.size, &mut b);
        u32::from_ne_bytes(b)
    }

    fn write_header(&self, class: &Class, z: &ZsPage, idx: usize, v: u32) {
        self.copy_in(z, idx * class.spec.size, &v.to_ne_bytes());
    }

    // ---- limits and statistics ---------------------------------------------------------

    /// Changes the page limit (clamped to the reserved capacity). Lowering it below the pages in
    /// use frees nothing; it makes new zspage allocations fail until usage falls.
    pub fn set_page_limit(&self, pages: usize) {
        self.arena.set_limit(pages);
    }

    /// Pages held by zspages.
    pub fn pages_used(&self) -> usize {
        self.arena.used()
    }

    /// Gives cached free pages back to the OS at once.
    pub fn trim(&self) {
        self.arena.trim();
    }

    /// Pool pages resident in memory (mincore): follows [`Pool::pages_used`] up to a small
    /// cache of freed pages.
    pub fn resident_pages(&self) -> usize {
        self.arena.resident_pages()
    }

    pub fn stats(&self) -> PoolStats {
        let handles = self.handle_ids.high_water();
        let zspages = self.zspage_ids.lock().next as usize;
        let meta = handles * 8 + zspages * std::mem::size_of::<ZsPage>();
        PoolStats {
            pages_used: self.arena.used(),
            pages_compacted: self.pages_compacted.load(Relaxed),
            page_limit: self.arena.limit(),
            capacity_pages: self.arena.capacity(),
            objects: self.classes.iter().map(|c| c.objs_used.load(Relaxed)).sum(),
            metadata_bytes: meta.div_ceil(PAGE_SIZE) * PAGE_SIZE,
        }
    }

    /// Per-class statistics, one entry per merged class, ascending by size.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        self.classes
            .iter()
            .map(|class| {
                let s = &class.spec;
                let fullness = {
                    let _ns = NonSleepGuard::new();
                    class.lists.lock().counts
                };
                let zspages = fullness.iter().sum::<usize>();
                ClassStats {
                    size: s.size,
                    pages_per_zspage: s.pages_per_zspage,
                    objs_per_zspage: s.objs_per_zspage,
                    zspages,
                    objs_allocated: class.objs_allocated.load(Relaxed),
                    objs_used: class.objs_used.load(Relaxed),
                    pages_used: zspages * s.pages_per_zspage,
                    freeable: class.freeable_pages(),
                    fullness,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_pool(pages: usize) -> Pool {
        Pool::new(Config {
            max_chain: 8,
            capacity_pages: 4096,
            page_limit: pages,
        })
        .unwrap()
    }

    pub(super) fn pattern(seed: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u32 * 7) >> 1) as u8)
            .collect()
    }

    pub(super) fn read(pool: &Pool, h: Handle) -> Vec<u8> {
        let mut local = [0u8; PAGE_SIZE];
        pool.read_begin(h, &mut local).to_vec()
    }

    #[test]
    fn objects_read_back_what_was_written_for_every_length() {
        let pool = small_pool(4096);
        let hs: Vec<_> = (1..=PAGE_SIZE)
            .step_by(7)
            .chain([PAGE_SIZE])
            .map(|len| {
                let h = pool.malloc(len).unwrap();
                pool.write(h, &pattern(len as u32, len));
                (h, len)
            })
            .collect();
        for &(h, len) in &hs {
            assert_eq!(pool.len(h), len);
            assert_eq!(read(&pool, h), pattern(len as u32, len));
        }
        for (h, _) in hs {
            pool.free(h);
        }
        assert_eq!(pool.pages_used(), 0);
        assert_eq!(pool.stats().objects, 0);
    }

    #[test]
    fn spanning_objects_are_copied_into_local_copy_others_are_direct_views() {
        let pool = small_pool(64);
        // Class 1712 (3 objects over 8 pages... whatever the layout says): find an object whose
        // data crosses a page boundary, and one that does not.
        let len = 1700;
        let class = *pool.layout().class_for(len);
        assert!(class.pages_per_zspage > 1);
        let hs: Vec<_> = (0..class.objs_per_zspage)
            .map(|i| {
                let h = pool.malloc(len).unwrap();
                pool.write(h, &pattern(i as u32, len));
                h
            })
            .collect();
        let mut spanning = 0;
        for (i, &h) in hs.iter().enumerate() {
            let off = Pool::data_offset(&class, i);
            let spans = off % PAGE_SIZE + len > PAGE_SIZE;
            let mut local = [0u8; PAGE_SIZE];
            let local_addr = local.as_ptr() as usize;
            let g = pool.read_begin(h, &mut local);
            assert_eq!(&*g, &pattern(i as u32, len)[..]);
            assert_eq!(g.as_ptr() as usize == local_addr, spans, "object {i}");
            spanning += spans as usize;
        }
        assert!(spanning > 0);
    }

    #[test]
    fn huge_objects_take_a_page_each() {
        let pool = small_pool(64);
        let huge = pool.huge_class_size();
        assert_eq!(huge, 3632 - 4 + 1);
        assert!(!pool.layout().class_for(huge - 1).is_huge());
        let a = pool.malloc(huge).unwrap();
        let b = pool.malloc(PAGE_SIZE).unwrap();
        pool.write(a, &pattern(1, huge));
        pool.write(b, &pattern(2, PAGE_SIZE));
        assert_eq!(pool.pages_used(), 2);
        assert_eq!(read(&pool, a), pattern(1, huge));
        assert_eq!(read(&pool, b), pattern(2, PAGE_SIZE));
        pool.free(a);
        assert_eq!(pool.pages_used(), 1);
        pool.free(b);
        assert_eq!(pool.pages_used(), 0);
    }

    #[test]
    fn handles_are_reused_after_free() {
        let pool = small_pool(64);
        let a = pool.malloc(100).unwrap();
        let b = pool.malloc(100).unwrap();
        assert_ne!(a, b);
        pool.free(a);
        let c = pool.malloc(3000).unwrap();
        assert_eq!(c, a);
        assert_eq!(pool.len(c), 3000);
        assert_eq!(Handle::from_raw(c.raw()), Some(c));
        assert_eq!(Handle::from_raw(0), None);
    }

    #[test]
    fn bad_lengths_and_a_full_pool_are_errors() {
        let pool = small_pool(3);
        assert!(matches!(pool.malloc(0), Err(Error::InvalidLength(0))));
        assert!(matches!(
            pool.malloc(PAGE_SIZE + 1),
            Err(Error::InvalidLength(4097))
        ));
        let mut hs = Vec::new();
        let err = loop {
            match pool.malloc(PAGE_SIZE) {
                Ok(h) => hs.push(h),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::LimitReached { limit: 3 }), "{err}");
        assert_eq!(hs.len(), 3);
        // A class that needs a new multi-page zspage fails too, and nothing leaked.
        assert!(pool.malloc(1000).is_err());
        assert_eq!(pool.stats().objects, 3);
        pool.set_page_limit(100);
        let h = pool.malloc(1000).unwrap();
        pool.write(h, &pattern(9, 1000));
        assert_eq!(read(&pool, h), pattern(9, 1000));
        assert!(
            Pool::new(Config {
                max_chain: 3,
                ..Config::default()
            })
            .is_err()
        );
    }

    #[test]
    fn compaction_moves_objects_and_frees_zspages() {
        let pool = small_pool(4096);
        let len = 700;
        let hs: Vec<_> = (0..600)
            .map(|i| {
                let h = pool.malloc(len).unwrap();
                pool.write(h, &pattern(i, len));
                h
            })
            .collect();
        let full = pool.pages_used();
        // Free every other object: half the memory is wasted.
        for h in hs.iter().step_by(2) {
            pool.free(*h);
        }
        assert_eq!(pool.pages_used(), full);
        let freeable = pool.freeable_pages();
        assert!(freeable >= full / 2 - 8, "{freeable} of {full}");
        let freed = pool.compact();
        assert_eq!(freed, freeable);
        assert_eq!(pool.pages_used(), full - freed);
        assert_eq!(pool.stats().pages_compacted, freed as u64);
        assert_eq!(pool.freeable_pages(), 0);
        for (i, h) in hs.iter().enumerate().skip(1).step_by(2) {
            assert_eq!(read(&pool, *h), pattern(i as u32, len));
        }
        let cs = pool
            .class_stats()
            .into_iter()
            .find(|c| c.objs_used > 0)
            .unwrap();
        assert_eq!(cs.objs_used, 300);
        assert_eq!(cs.pages_used, pool.pages_used());
        // Less than one zspage's worth of free slots is left over.
        assert!(cs.objs_allocated - cs.objs_used < cs.objs_per_zspage);
        assert_eq!(cs.fullness.iter().sum::<usize>(), cs.zspages);
    }

    #[test]
    fn compaction_skips_a_zspage_being_read() {
        let pool = small_pool(4096);
        let hs: Vec<_> = (0..200)
            .map(|i| {
                let h = pool.malloc(500).unwrap();
                pool.write(h, &pattern(i, 500));
                h
            })
            .collect();
        for h in &hs[..199] {
            pool.free(*h);
        }
        // One object left in a sparse zspage, and a second sparse zspage to merge with.
        let other = pool.malloc(500).unwrap();
        pool.write(other, &pattern(7, 500));
        let last = hs[199];
        let mut local = [0u8; PAGE_SIZE];
        let g = pool.read_begin(last, &mut local);
        let before = pool.pages_used();
        pool.compact();
        // The reader's view is untouched, whatever compaction did with the other zspage.
        assert_eq!(&*g, &pattern(199, 500)[..]);
        drop(g);
        assert!(pool.pages_used() <= before);
        pool.compact();
        assert_eq!(read(&pool, last), pattern(199, 500));
        assert_eq!(read(&pool, other), pattern(7, 500));
    }

    #[test]
    #[should_panic(expected = "in use")]
    fn freeing_a_handle_under_a_reader_panics() {
        let pool = small_pool(64);
        let h = pool.malloc(10).unwrap();
        let mut local = [0u8; PAGE_SIZE];
        let _g = pool.read_begin(h, &mut local);
        pool.free(h);
    }

    #[test]
    #[should_panic(expected = "write of 5 bytes")]
    fn writes_must_match_the_object_length() {
        let pool = small_pool(64);
        let h = pool.malloc(10).unwrap();
        pool.write(h, &[0; 5]);
    }

    #[test]
    fn memory_follows_the_pool() {
        let pool = small_pool(4096);
        let hs: Vec<_> = (0..4000)
            .map(|i| {
                let h = pool.malloc(2000).unwrap();
                pool.write(h, &pattern(i, 2000));
                h
            })
            .collect();
        let used = pool.pages_used();
        assert!(pool.resident_pages() >= used);
        for h in hs {
            pool.free(h);
        }
        assert_eq!(pool.pages_used(), 0);
        // The hot reserve stays until trimmed; the batch populated ahead of use stays.
        let ahead = crate::arena::POPULATE_AHEAD as usize;
        assert!(pool.resident_pages() <= crate::arena::HOT_PAGES + ahead);
        pool.trim();
        assert!(pool.resident_pages() <= ahead);
    }
}
