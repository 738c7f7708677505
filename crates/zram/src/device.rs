//! A zram device: the slot table, and the page operations on it (maintenance: `maintenance`).

mod maintenance;

use crate::PAGE_SIZE;
use crate::backing::Backing;
use crate::budget::{Attempt, Full};
use crate::slot::{Entry, IDLE, INCOMPRESSIBLE, Slot, SlotGuard, State};
use crate::stats::{BdStat, Counters, DeviceMemory, IoStat, MmStat, Stats, TieringStats};
use crate::{Error, SECTOR_SIZE, Store};
use region::Region;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use zcomp::{Comp, Priority, Stream};
use zsmalloc::Handle;

/// Which pages a maintenance operation takes (zram's `type=` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFilter {
    Idle,
    Huge,
    HugeIdle,
    Incompressible,
}

impl std::str::FromStr for PageFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "idle" => PageFilter::Idle,
            "huge" => PageFilter::Huge,
            "huge_idle" => PageFilter::HugeIdle,
            "incompressible" => PageFilter::Incompressible,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "page type {s:?}: expected idle, huge, huge_idle or incompressible"
                )));
            }
        })
    }
}

impl PageFilter {
    fn matches(self, e: &Entry) -> bool {
        let huge = e.state() == State::Huge;
        match self {
            PageFilter::Idle => e.has(IDLE),
            PageFilter::Huge => huge,
            PageFilter::HugeIdle => huge && e.has(IDLE),
            PageFilter::Incompressible => e.has(INCOMPRESSIBLE),
        }
    }
}

/// Device configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Size in bytes (a multiple of 4096), like zram's `disksize`.
    pub size: u64,
    /// File that `writeback` moves pages to.
    pub backing_file: Option<PathBuf>,
}

/// What a recompression pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecompressResult {
    /// Pages that matched and were tried.
    pub tried: u64,
    /// Pages kept in their new, smaller form.
    pub recompressed: u64,
}

/// What a cold-page writeback pass ([`Device::reclaim`]) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reclaimed {
    /// Slots looked at (at most one turn of the clock per call).
    pub scanned: u64,
    /// Pages moved to the backing file.
    pub written: u64,
    /// Compressed bytes those pages held in memory (a huge page 4096).
    pub freed_bytes: u64,
}

/// A fixed-size block device of 4 KiB pages whose data lives compressed in a [`Store`].
#[derive(Debug)]
pub struct Device {
    store: Arc<Store>,
    comp: Arc<Comp>,
    slots: Region<Slot>,
    pages: u64,
    backing: Option<Backing>,
    /// One record: the counters (in the device's file with a state directory).
    counters: Region<Counters>,
    /// Access times are seconds since then.
    born: Instant,
    /// This device's own memory limit in bytes, 0 = none (not kept in a state directory: it
    /// is configuration, given again at every start).
    mem_limit: AtomicU64,
    /// The clock hands of the cold-page passes: the next slot writeback (reclaim, direct
    /// reclaim) and cold recompression look at.
    writeback_cursor: AtomicU64,
    /// Direct reclaim found no cold page in a whole turn: `(second + 1) << 32 | age` (0:
    /// never). Until the clock moves past that second, or for a shorter age, the same scan
    /// would find nothing again, so a write at a full limit fails without repeating it.
    nothing_cold: AtomicU64,
    /// The policy's cold age for this device in seconds (0: none), longer than the store's
    /// reclaim age while the device's promotions are above target: direct reclaim honours it
    /// first.
    pub(crate) cold_age: AtomicU64,
    recompress_cursor: AtomicU64,
}

/// A page of one repeated 8-byte word: its value.
fn same_filled(page: &[u8; PAGE_SIZE]) -> Option<u64> {
    let mut words = page
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")));
    let first = words.next()?;
    words.all(|w| w == first).then_some(first)
}

fn fill_word(dst: &mut [u8; PAGE_SIZE], word: u64) {
    for w in dst.chunks_exact_mut(8) {
        w.copy_from_slice(&word.to_ne_bytes());
    }
}

impl Device {
    /// Makes a device on `store` and registers it there ([`Store::devices`]).
    pub fn new(store: Arc<Store>, comp: Arc<Comp>, cfg: Config) -> Result<Arc<Device>, Error> {
        if cfg.size == 0 || !cfg.size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::InvalidArgument(format!(
                "device size {} is not a positive multiple of 4096",
                cfg.size
            )));
        }
        let pages = cfg.size / PAGE_SIZE as u64;
        let backing = cfg
            .backing_file
            .as_deref()
            .map(|p| Backing::open(p, pages))
            .transpose()?;
        Ok(Device::attach(
            store,
            comp,
            Region::reserve(pages as usize).map_err(Error::Io)?,
            Region::reserve(1).map_err(Error::Io)?,
            backing,
            Instant::now(),
        ))
    }

    /// A device over a slot table and counters: fresh ones, or a state directory's files,
    /// which the caller recovers first ([`crate::state`]). Registered in its store.
    pub(crate) fn attach(
        store: Arc<Store>,
        comp: Arc<Comp>,
        slots: Region<Slot>,
        counters: Region<Counters>,
        backing: Option<Backing>,
        born: Instant,
    ) -> Arc<Device> {
        let dev = Arc::new(Device {
            pages: slots.capacity() as u64,
            slots,
            store,
            comp,
            backing,
            counters,
            born,
            mem_limit: AtomicU64::new(0),
            writeback_cursor: AtomicU64::new(0),
            nothing_cold: AtomicU64::new(0),
            cold_age: AtomicU64::new(0),
            recompress_cursor: AtomicU64::new(0),
        });
        dev.store.register(&dev);
        dev
    }

    pub(crate) fn counters(&self) -> &Counters {
        self.counters.get(0)
    }

    /// Compressed bytes in memory (zram's `compr_data_size`).
    pub(crate) fn compr_bytes(&self) -> u64 {
        self.counters().compr_data_size.load(Relaxed)
    }

    /// This device's memory: its compressed bytes plus its share of the allocator's overhead
    /// (the pool's bytes split in proportion to compressed bytes across the store's devices).
    pub fn mem_used(&self) -> u64 {
        self.store.refresh_charge().of(self.compr_bytes())
    }

    /// Sets this device's own memory limit in bytes, on top of the store's; 0 removes it.
    /// Lowering it below what the device uses frees nothing by itself: the device's next
    /// writes reclaim (or fail) until it is back under.
    pub fn set_mem_limit(&self, bytes: u64) {
        self.mem_limit.store(bytes, Relaxed);
    }

    pub fn mem_limit(&self) -> u64 {
        self.mem_limit.load(Relaxed)
    }

    /// Whether pages can be written back (a backing file is configured).
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn comp(&self) -> &Arc<Comp> {
        &self.comp
    }

    /// A stream for one worker of this device.
    pub fn new_stream(&self) -> Stream {
        self.comp
            .new_stream()
            .expect("a Comp that was built makes streams")
    }

    fn now(&self) -> u32 {
        self.born.elapsed().as_secs() as u32
    }

    fn slot(&self, index: u64) -> Result<&Slot, Error> {
        if index >= self.pages {
            self.counters().invalid_io.fetch_add(1, Relaxed);
            return Err(Error::OutOfRange {
                offset: index * PAGE_SIZE as u64,
                len: PAGE_SIZE as u64,
                size: self.size(),
            });
        }
        Ok(self.slots.get(index as usize))
    }

    // ---- encoding and decoding -----------------------------------------------------------

    /// Turns a page into what its slot will hold: a same-filled word, or the bytes of its
    /// object (compressed, or raw if compression does not pay). Takes no lock of ours:
    /// compression may sleep.
    fn encode<'a>(
        &self,
        src: &'a [u8; PAGE_SIZE],
        stream: &'a mut Stream,
    ) -> Result<Encoded<'a>, Error> {
        if let Some(word) = same_filled(src) {
            return Ok(Encoded::Same(word));
        }
        let compressed = stream.codec.compress_with(Priority::PRIMARY, src)?;
        Ok(if compressed.len() >= self.store.pool().huge_class_size() {
            Encoded::Object(State::Huge, src)
        } else {
            Encoded::Object(State::Compressed, compressed)
        })
    }

    /// The slot entry for an encoded page, allocating and filling its object; `Ok(Err(_))`
    /// when a limit is in the way (the caller reclaims, holding no slot lock, and retries).
    /// `replaces` gives the entry the page holds now, for the device limit (read only when
    /// the device has a limit: the write path without one pays a single relaxed load).
    fn place(
        &self,
        enc: &Encoded<'_>,
        replaces: impl FnOnce() -> Entry,
    ) -> Result<Result<Entry, Full>, Error> {
        let (state, bytes) = match *enc {
            Encoded::Same(word) => return Ok(Ok(Entry::new(State::Same, word, 0, 0))),
            Encoded::Object(state, bytes) => (state, bytes),
        };
        let limit = self.mem_limit();
        if limit != 0 && !self.within(limit, bytes.len() as u64, charged(&replaces())) {
            return Ok(Err(Full::Device));
        }
        let h = match self.store.malloc(bytes.len()) {
            Ok(h) => h,
            Err(Error::NoSpace) => return Ok(Err(Full::Store)),
            Err(e) => return Err(e),
        };
        self.store.pool().write(h, bytes);
        Ok(Ok(Entry::new(state, h.raw() as u64, bytes.len(), 0)))
    }

    fn handle(e: &Entry) -> Handle {
        Handle::from_raw(e.data as u32).expect("a stored object has a handle")
    }

    /// Decodes a slot's page into `dst`. The slot is locked by the caller (a sleepable lock:
    /// decompression and file reads are allowed under it).
    fn decode(
        &self,
        e: &Entry,
        dst: &mut [u8; PAGE_SIZE],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        match e.state() {
            State::Empty => dst.fill(0),
            State::Same => fill_word(dst, e.data),
            State::Compressed | State::Huge => {
                let (local, codec) = stream.parts();
                let obj = self.store.pool().read_begin(Self::handle(e), local);
                if e.state() == State::Huge {
                    dst.copy_from_slice(&obj);
                } else {
                    codec.decompress_with(prio(e), &obj, dst)?;
                }
            }
            State::WrittenBack => {
                let backing = self.backing.as_ref().ok_or(Error::NoBackingFile)?;
                self.counters().bd_reads.fetch_add(1, Relaxed);
                if e.len() == PAGE_SIZE {
                    backing.read(e.data, dst)?;
                } else {
                    let (local, codec) = stream.parts();
                    backing.read(e.data, &mut local[..e.len()])?;
                    codec.decompress_with(prio(e), &local[..e.len()], dst)?;
                }
            }
        }
        Ok(())
    }

    /// Counts a new entry in.
    fn account(&self, e: &Entry) {
        let c = self.counters();
        match e.state() {
            State::Empty => return,
            State::Same => {
                c.same_pages.fetch_add(1, Relaxed);
            }
            State::Compressed => {
                c.compr_data_size.fetch_add(e.len() as u64, Relaxed);
            }
            State::Huge => {
                // A huge page is cold for direct reclaim as soon as it is stored.
                if self.nothing_cold.load(Relaxed) != 0 {
                    self.nothing_cold.store(0, Relaxed);
                }
                c.compr_data_size.fetch_add(PAGE_SIZE as u64, Relaxed);
                c.huge_pages.fetch_add(1, Relaxed);
                c.huge_pages_since.fetch_add(1, Relaxed);
            }
            State::WrittenBack => {
                c.bd_count.fetch_add(1, Relaxed);
            }
        }
        c.pages_stored.fetch_add(1, Relaxed);
    }

    /// Frees what an entry that left its slot held, and counts it out.
    fn release(&self, e: &Entry) {
        let c = self.counters();
        match e.state() {
            State::Empty => return,
            State::Same => {
                c.same_pages.fetch_sub(1, Relaxed);
            }
            State::Compressed | State::Huge => {
                self.store.pool().free(Self::handle(e));
                let len = if e.state() == State::Huge {
                    c.huge_pages.fetch_sub(1, Relaxed);
                    PAGE_SIZE
                } else {
                    e.len()
                };
                c.compr_data_size.fetch_sub(len as u64, Relaxed);
            }
            State::WrittenBack => {
                if let Some(b) = &self.backing {
                    b.free(e.data);
                }
                c.bd_count.fetch_sub(1, Relaxed);
            }
        }
        c.pages_stored.fetch_sub(1, Relaxed);
    }

    /// Puts `new` in the locked slot and frees what it replaces.
    fn install(&self, mut g: SlotGuard<'_>, new: Entry) {
        let old = g.entry;
        self.account(&new);
        g.set(new, self.now());
        drop(g);
        self.release(&old);
    }

    // ---- page operations -----------------------------------------------------------------

    /// Reads page `index` into `dst`.
    pub fn read_page(
        &self,
        index: u64,
        dst: &mut [u8; PAGE_SIZE],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        let r = self.load(self.slot(index)?, dst, stream);
        self.count_io(&r, false);
        r
    }

    fn load(
        &self,
        slot: &Slot,
        dst: &mut [u8; PAGE_SIZE],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        let mut g = slot.lock();
        let r = self.decode(&g.entry, dst, stream);
        g.touch(self.now());
        r
    }

    /// Writes page `index` from `src`. On error (memory limit: [`Error::NoSpace`]) the page
    /// keeps its previous content.
    pub fn write_page(
        &self,
        index: u64,
        src: &[u8; PAGE_SIZE],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        let slot = self.slot(index)?;
        let r = self.store_page(slot, src, stream);
        self.count_io(&r, true);
        r
    }

    /// A whole-page write: compress unlocked, allocate (reclaiming at a limit, unlocked too),
    /// then lock the slot only to install.
    fn store_page(
        &self,
        slot: &Slot,
        src: &[u8; PAGE_SIZE],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        let enc = self.encode(src, stream)?;
        let mut attempt = Attempt::default();
        let new = loop {
            match self.place(&enc, || slot.peek())? {
                Ok(new) => break new,
                Err(full) => self.direct_reclaim(full, &mut attempt)?,
            }
        };
        self.install(slot.lock(), new);
        Ok(())
    }

    /// zram's io_stat failures. Successful I/O is counted by the block layer above (the
    /// daemon's per-queue counters), as the kernel's block layer counts it for zram.
    fn count_io<T>(&self, r: &Result<T, Error>, write: bool) {
        if r.is_err() {
            let c = self.counters();
            let failed = if write {
                &c.failed_writes
            } else {
                &c.failed_reads
            };
            failed.fetch_add(1, Relaxed);
        }
    }

    /// Frees pages `first..first + count` (they read as zeroes after): a discard.
    pub fn discard(&self, first: u64, count: u64) -> Result<(), Error> {
        self.free_range(first, count, true)
    }

    /// Writes zeroes over pages `first..first + count`; like discard, it frees them.
    pub fn write_zeroes(&self, first: u64, count: u64) -> Result<(), Error> {
        self.free_range(first, count, false)
    }

    fn free_range(&self, first: u64, count: u64, notify: bool) -> Result<(), Error> {
        if first.checked_add(count).is_none_or(|end| end > self.pages) {
            self.counters().invalid_io.fetch_add(1, Relaxed);
            return Err(Error::OutOfRange {
                offset: first.saturating_mul(PAGE_SIZE as u64),
                len: count.saturating_mul(PAGE_SIZE as u64),
                size: self.size(),
            });
        }
        for i in first..first + count {
            let mut g = self.slots.get(i as usize).lock();
            let old = g.entry;
            if old.state() == State::Empty {
                continue;
            }
            g.set(Entry::EMPTY, self.now());
            drop(g);
            self.release(&old);
            if notify {
                self.counters().notify_free.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    /// Checks a byte range for a request: 512-byte aligned and inside the device.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            self.counters().invalid_io.fetch_add(1, Relaxed);
            return Err(Error::Unaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            self.counters().invalid_io.fetch_add(1, Relaxed);
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8], stream: &mut Stream) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let mut page = [0u8; PAGE_SIZE];
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, in_page) = (pos / PAGE_SIZE as u64, (pos % PAGE_SIZE as u64) as usize);
            let n = (PAGE_SIZE - in_page).min(buf.len() - done);
            if n == PAGE_SIZE {
                let dst: &mut [u8; PAGE_SIZE] =
                    (&mut buf[done..done + n]).try_into().expect("one page");
                self.read_page(index, dst, stream)?;
            } else {
                let r = self.load(self.slots.get(index as usize), &mut page, stream);
                self.count_io(&r, false);
                r?;
                buf[done..done + n].copy_from_slice(&page[in_page..in_page + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (both multiples of 512). Partial pages are read, patched and
    /// written back with the slot locked throughout, so concurrent writes to different sectors
    /// of one page both land.
    pub fn write(&self, offset: u64, buf: &[u8], stream: &mut Stream) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, in_page) = (pos / PAGE_SIZE as u64, (pos % PAGE_SIZE as u64) as usize);
            let n = (PAGE_SIZE - in_page).min(buf.len() - done);
            if n == PAGE_SIZE {
                let src: &[u8; PAGE_SIZE] = buf[done..done + n].try_into().expect("one page");
                self.write_page(index, src, stream)?;
            } else {
                let r = self.write_partial(index, in_page, &buf[done..done + n], stream);
                self.count_io(&r, true);
                r?;
            }
            done += n;
        }
        Ok(())
    }

    fn write_partial(
        &self,
        index: u64,
        at: usize,
        bytes: &[u8],
        stream: &mut Stream,
    ) -> Result<(), Error> {
        let slot = self.slots.get(index as usize);
        let mut page = [0u8; PAGE_SIZE];
        let mut attempt = Attempt::default();
        loop {
            let g = slot.lock();
            self.decode(&g.entry, &mut page, stream)?;
            page[at..at + bytes.len()].copy_from_slice(bytes);
            // Compressing under the slot lock is allowed (it is sleepable) and keeps the
            // read-modify-write whole.
            let enc = self.encode(&page, stream)?;
            match self.place(&enc, || g.entry)? {
                Ok(new) => {
                    self.install(g, new);
                    return Ok(());
                }
                Err(full) => {
                    // Reclaim holds no slot lock of ours: unlock, and start the
                    // read-modify-write over (the page may have changed meanwhile).
                    drop(g);
                    self.direct_reclaim(full, &mut attempt)?;
                }
            }
        }
    }

    // ---- statistics ----------------------------------------------------------------------

    pub fn stats(&self) -> Stats {
        let c = self.counters();
        let store = &self.store;
        Stats {
            disksize: self.size(),
            comp_algorithm: self
                .comp
                .params(Priority::PRIMARY)
                .map(|p| p.algorithm.to_string())
                .unwrap_or_default(),
            mm_stat: MmStat {
                orig_data_size: c.pages_stored.load(Relaxed) * PAGE_SIZE as u64,
                compr_data_size: c.compr_data_size.load(Relaxed),
                mem_used_total: store.mem_used_total(),
                mem_limit: store.mem_limit(),
                mem_used_max: store.mem_used_max(),
                same_pages: c.same_pages.load(Relaxed),
                pages_compacted: store.pages_compacted(),
                huge_pages: c.huge_pages.load(Relaxed),
                huge_pages_since: c.huge_pages_since.load(Relaxed),
            },
            io_stat: IoStat {
                failed_reads: c.failed_reads.load(Relaxed),
                failed_writes: c.failed_writes.load(Relaxed),
                invalid_io: c.invalid_io.load(Relaxed),
                notify_free: c.notify_free.load(Relaxed),
            },
            bd_stat: BdStat {
                bd_count: c.bd_count.load(Relaxed),
                bd_reads: c.bd_reads.load(Relaxed),
                bd_writes: c.bd_writes.load(Relaxed),
            },
            memory: DeviceMemory {
                used: self.mem_used(),
                limit: self.mem_limit(),
                share: store.fair_share(self, store.devices().len()),
            },
            tiering: TieringStats {
                recompressed: c.recompressed.load(Relaxed),
                written_back: c.bd_writes.load(Relaxed),
                direct_reclaimed: c.direct_reclaimed.load(Relaxed),
                direct_reclaim_failed: c.direct_reclaim_failed.load(Relaxed),
                promoted: c.bd_reads.load(Relaxed),
            },
        }
    }
}

/// A page ready to store: what [`Device::encode`] makes, before it has memory.
enum Encoded<'a> {
    Same(u64),
    /// `Compressed` or `Huge`, and the object's bytes.
    Object(State, &'a [u8]),
}

/// Compressed bytes an entry holds in memory (a huge page 4096; 0 if none).
fn charged(e: &Entry) -> u64 {
    match e.state() {
        State::Compressed | State::Huge => e.len() as u64,
        _ => 0,
    }
}

fn prio(e: &Entry) -> Priority {
    Priority::new(e.prio()).expect("two bits hold 0..=3")
}

impl Drop for Device {
    /// The device's pages go back to the shared pool, unless they are kept in a state
    /// directory for the next daemon.
    fn drop(&mut self) {
        if self.slots.is_file_backed() {
            return;
        }
        for i in 0..self.pages as usize {
            let e = self.slots.get(i).lock().entry;
            if matches!(e.state(), State::Compressed | State::Huge) {
                self.store.pool().free(Self::handle(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagemix::{Mix, PageKind, fill_kind};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn store(pages: usize) -> Arc<Store> {
        Arc::new(
            Store::new(crate::StoreConfig {
                max_chain: 8,
                capacity_pages: pages,
                mem_limit: 0,
            })
            .unwrap(),
        )
    }

    fn device(store: &Arc<Store>, pages: u64, backing: Option<PathBuf>) -> Arc<Device> {
        let comp = Comp::parse("lz4", &["algo=zstd level=9 priority=1"]).unwrap();
        Device::new(
            store.clone(),
            Arc::new(comp),
            Config {
                size: pages * PAGE_SIZE as u64,
                backing_file: backing,
            },
        )
        .unwrap()
    }

    fn page(kind: PageKind, index: u64) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        fill_kind(kind, 5, index, &mut p);
        p
    }

    fn read(dev: &Device, index: u64, s: &mut Stream) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        dev.read_page(index, &mut p, s).unwrap();
        p
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vzram-{}-{name}", std::process::id()))
    }

    #[test]
    fn statistics_follow_a_scripted_sequence_exactly() {
        let st = store(1024);
        let dev = device(&st, 16, None);
        let mut s = dev.new_stream();
        let heap = page(PageKind::Heap, 1);
        let clen = s.compress(&heap).unwrap().len() as u64;
        dev.write_page(0, &heap, &mut s).unwrap(); // compressed
        dev.write_page(1, &page(PageKind::Zero, 0), &mut s).unwrap(); // same (zero)
        dev.write_page(2, &page(PageKind::Same, 3), &mut s).unwrap(); // same
        dev.write_page(3, &page(PageKind::Random, 4), &mut s)
            .unwrap(); // huge
        dev.write_page(2, &page(PageKind::Random, 5), &mut s)
            .unwrap(); // same -> huge
        assert_eq!(read(&dev, 0, &mut s), heap);
        assert!(dev.read_page(16, &mut [0; PAGE_SIZE], &mut s).is_err());
        assert!(dev.write(100, &[0; 512], &mut s).is_err());
        dev.discard(1, 2).unwrap(); // frees the zero page and a huge page
        dev.discard(5, 1).unwrap(); // empty: nothing freed, nothing counted
        let st_ = dev.stats();
        assert_eq!(
            st_.mm_stat,
            MmStat {
                orig_data_size: 2 * 4096,
                compr_data_size: clen + 4096,
                mem_used_total: st.pool_stats().pages_used as u64 * 4096,
                mem_limit: 0,
                mem_used_max: st_.mm_stat.mem_used_max,
                same_pages: 0,
                pages_compacted: 0,
                huge_pages: 1,
                huge_pages_since: 2,
            }
        );
        assert!(st_.mm_stat.mem_used_max >= st_.mm_stat.mem_used_total);
        assert_eq!(
            st_.io_stat,
            IoStat {
                failed_reads: 0,
                failed_writes: 0,
                invalid_io: 2,
                notify_free: 2,
            }
        );
        assert_eq!(st_.bd_stat, BdStat::default());
        assert_eq!(st_.mm_stat.line().split(' ').count(), 9);
        let json = serde_json::to_value(&st_).unwrap();
        assert_eq!(json["mm_stat"]["huge_pages_since"], 2);
        assert_eq!(json["comp_algorithm"], "lz4");
    }

    #[test]
    fn sector_writes_read_modify_write_partial_pages() {
        let st = store(1024);
        let dev = device(&st, 4, None);
        let mut s = dev.new_stream();
        let mut model = vec![0u8; 4 * PAGE_SIZE];
        let data: Vec<u8> = (0..3 * 512).map(|i| (i * 7 % 251) as u8).collect();
        // Spans the end of page 0 and the start of page 1.
        dev.write(7 * 512, &data, &mut s).unwrap();
        model[7 * 512..10 * 512].copy_from_slice(&data);
        let mut back = vec![0u8; 4 * PAGE_SIZE];
        dev.read(0, &mut back, &mut s).unwrap();
        assert_eq!(back, model);
        let mut one = [0u8; 512];
        dev.read(8 * 512, &mut one, &mut s).unwrap();
        assert_eq!(&one[..], &model[8 * 512..9 * 512]);
        assert!(matches!(
            dev.read(100, &mut one, &mut s),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            dev.write(4 * PAGE_SIZE as u64, &one, &mut s),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn memory_limit_fails_writes_cleanly_and_discard_gives_memory_back() {
        let st = store(4096);
        let dev = device(&st, 1024, None);
        let mut s = dev.new_stream();
        st.set_mem_limit(64 * 4096);
        let mut stored = Vec::new();
        let mut failed = 0;
        for i in 0..1024 {
            let p = page(PageKind::Random, i);
            match dev.write_page(i, &p, &mut s) {
                Ok(()) => stored.push((i, p)),
                Err(Error::NoSpace) => failed += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(stored.len(), 64);
        assert_eq!(dev.stats().io_stat.failed_writes, failed);
        assert!(dev.stats().mm_stat.mem_used_total <= 64 * 4096);
        // A failed overwrite leaves the old content.
        assert!(matches!(
            dev.write_page(0, &page(PageKind::Random, 999), &mut s),
            Err(Error::NoSpace)
        ));
        for (i, p) in &stored {
            assert_eq!(&read(&dev, *i, &mut s), p);
        }
        // Same-filled pages need no memory: they still go in.
        dev.write_page(1000, &page(PageKind::Zero, 0), &mut s)
            .unwrap();
        dev.discard(0, 1024).unwrap();
        let mm = dev.stats().mm_stat;
        assert_eq!(
            (mm.orig_data_size, mm.compr_data_size, mm.mem_used_total),
            (0, 0, 0)
        );
        assert_eq!(mm.mem_limit, 64 * 4096);
        assert_eq!(mm.mem_used_max, 64 * 4096);
        st.reset_mem_used_max();
        assert_eq!(dev.stats().mm_stat.mem_used_max, 0);
    }

    fn recompress_idle(dev: &Device, s: &mut Stream) -> RecompressResult {
        dev.recompress(
            PageFilter::Idle,
            None,
            None,
            Priority::new(1).unwrap(),
            s,
            &AtomicBool::new(false),
        )
        .unwrap()
    }

    #[test]
    fn recompression_keeps_only_smaller_classes_and_pages_stay_readable() {
        let st = store(4096);
        let dev = device(&st, 256, None);
        let mut s = dev.new_stream();
        let pages: Vec<_> = (0..256)
            .map(|i| {
                let mut p = [0u8; PAGE_SIZE];
                pagemix::fill_page(&Mix::default(), 9, i, &mut p);
                dev.write_page(i, &p, &mut s).unwrap();
                p
            })
            .collect();
        let before = dev.stats().mm_stat;
        assert!(dev.mark_idle(None) > 200);
        let r = recompress_idle(&dev, &mut s);
        assert!(r.tried > 0 && r.recompressed > r.tried / 2, "{r:?}");
        let after = dev.stats().mm_stat;
        assert!(after.compr_data_size < before.compr_data_size);
        assert_eq!(after.orig_data_size, before.orig_data_size);
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(&read(&dev, i as u64, &mut s), p);
        }
        // Pages already recompressed, or that did not shrink, are not tried again.
        dev.mark_idle(None);
        let again = recompress_idle(&dev, &mut s);
        assert_eq!(again.recompressed, 0);
        assert!(
            dev.recompress(
                PageFilter::Idle,
                None,
                None,
                Priority::PRIMARY,
                &mut s,
                &AtomicBool::new(false)
            )
            .is_err()
        );
    }

    #[test]
    fn writeback_moves_pages_to_the_file_and_reads_them_back() {
        let path = temp_path("wb");
        let st = store(4096);
        let dev = device(&st, 64, Some(path.clone()));
        let mut s = dev.new_stream();
        let pages: Vec<_> = (0..64)
            .map(|i| {
                let kind = if i % 4 == 0 {
                    PageKind::Random
                } else {
                    PageKind::Heap
                };
                let p = page(kind, i);
                dev.write_page(i, &p, &mut s).unwrap();
                p
            })
            .collect();
        dev.set_writeback_limit(Some(10));
        assert_eq!(
            dev.writeback(PageFilter::Huge, None, &AtomicBool::new(false))
                .unwrap(),
            10
        );
        dev.set_writeback_limit(None);
        assert_eq!(
            dev.writeback(PageFilter::Huge, None, &AtomicBool::new(false))
                .unwrap(),
            6
        );
        assert_eq!(
            dev.writeback(PageFilter::Idle, None, &AtomicBool::new(false))
                .unwrap(),
            0
        ); // nothing idle yet
        dev.mark_idle(None);
        assert_eq!(
            dev.writeback(PageFilter::Idle, Some(8), &AtomicBool::new(false))
                .unwrap(),
            8
        );
        let bd = dev.stats().bd_stat;
        assert_eq!((bd.bd_count, bd.bd_writes), (24, 24));
        assert_eq!(dev.stats().mm_stat.huge_pages, 0);
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(&read(&dev, i as u64, &mut s), p, "page {i}");
        }
        assert_eq!(dev.stats().bd_stat.bd_reads, 24);
        // Discard frees the file blocks for reuse; a rewrite replaces the written-back copy.
        // Pages 0..4 are all in the file (0 as huge, 1..4 as idle), and so is huge page 4.
        dev.discard(0, 4).unwrap();
        dev.write_page(4, &pages[5], &mut s).unwrap();
        assert_eq!(dev.stats().bd_stat.bd_count, 24 - 5);
        assert_eq!(dev.stats().mm_stat.orig_data_size, 60 * 4096);
        drop(dev);
        assert_eq!(st.mem_used_total(), 0);
        std::fs::remove_file(path).unwrap();
        let no_file = device(&st, 4, None);
        assert!(matches!(
            no_file.writeback(PageFilter::Huge, None, &AtomicBool::new(false)),
            Err(Error::NoBackingFile)
        ));
    }

    /// Runs `pass` on another thread, sets its stop flag once `started` sees it under way,
    /// and returns what the pass reports.
    fn stop_midway<T: Send>(
        pass: impl FnOnce(&AtomicBool) -> T + Send,
        started: impl Fn() -> bool,
    ) -> T {
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let t = sc.spawn(|| pass(&stop));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !started() {
                assert!(Instant::now() < deadline, "the pass never got going");
                std::thread::yield_now();
            }
            stop.store(true, Relaxed);
            t.join().unwrap()
        })
    }

    #[test]
    fn recompression_stops_early_when_asked_and_pages_stay_readable() {
        const N: u64 = 4096;
        let st = store(16384);
        let dev = device(&st, N, None);
        let mut s = dev.new_stream();
        for i in 0..N {
            dev.write_page(i, &page(PageKind::Text, i), &mut s).unwrap();
        }
        assert_eq!(dev.mark_idle(None), N);
        let prio = Priority::new(1).unwrap();
        // Set before the pass: nothing is tried.
        let stop = AtomicBool::new(true);
        let r = dev
            .recompress(PageFilter::Idle, None, None, prio, &mut s, &stop)
            .unwrap();
        assert_eq!(r, RecompressResult::default());

        let before = dev.stats().mm_stat.compr_data_size;
        let r = stop_midway(
            |stop| {
                let mut s = dev.new_stream();
                dev.recompress(PageFilter::Idle, None, None, prio, &mut s, stop)
                    .unwrap()
            },
            || dev.stats().mm_stat.compr_data_size < before,
        );
        assert!(r.tried > 0 && r.tried < N, "stopped part-way: {r:?}");
        for i in 0..N {
            assert_eq!(read(&dev, i, &mut s), page(PageKind::Text, i), "page {i}");
        }
        // The rest is still there to do, and a new pass does it (reading cleared the marks).
        dev.mark_idle(None);
        let rest = recompress_idle(&dev, &mut s);
        assert_eq!(r.tried + rest.tried, N);
    }

    #[test]
    fn writeback_stops_early_when_asked_and_pages_stay_readable() {
        const N: u64 = 4096;
        let path = temp_path("wb-stop");
        let st = store(16384);
        let dev = device(&st, N, Some(path.clone()));
        let mut s = dev.new_stream();
        for i in 0..N {
            dev.write_page(i, &page(PageKind::Heap, i), &mut s).unwrap();
        }
        dev.mark_idle(None);
        assert_eq!(
            dev.writeback(PageFilter::Idle, None, &AtomicBool::new(true))
                .unwrap(),
            0
        );
        let written = stop_midway(
            |stop| dev.writeback(PageFilter::Idle, None, stop).unwrap(),
            || dev.stats().bd_stat.bd_writes > 0,
        );
        assert!(written > 0 && written < N, "stopped part-way: {written}");
        assert_eq!(dev.stats().bd_stat.bd_count, written);
        for i in 0..N {
            assert_eq!(read(&dev, i, &mut s), page(PageKind::Heap, i), "page {i}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn devices_share_a_store_with_their_own_statistics() {
        let st = store(4096);
        let (a, b) = (device(&st, 16, None), device(&st, 16, None));
        let mut s = a.new_stream();
        a.write_page(0, &page(PageKind::Heap, 0), &mut s).unwrap();
        b.write_page(0, &page(PageKind::Text, 0), &mut s).unwrap();
        b.write_page(1, &page(PageKind::Text, 1), &mut s).unwrap();
        assert_eq!(a.stats().mm_stat.orig_data_size, 4096);
        assert_eq!(b.stats().mm_stat.orig_data_size, 2 * 4096);
        assert_eq!(
            a.stats().mm_stat.mem_used_total,
            b.stats().mm_stat.mem_used_total
        );
        assert_ne!(read(&a, 0, &mut s), read(&b, 0, &mut s));
    }

    /// Which pages of `dev` are written back.
    fn in_file(dev: &Device) -> Vec<u64> {
        (0..dev.pages)
            .filter(|&i| dev.slots.get(i as usize).peek().state() == State::WrittenBack)
            .collect()
    }

    #[test]
    fn reclaim_resumes_where_it_stopped_and_wraps_around() {
        let path = temp_path("clock");
        let st = store(4096);
        let dev = device(&st, 100, Some(path.clone()));
        assert!(dev.has_backing());
        let mut s = dev.new_stream();
        for i in 0..100 {
            dev.write_page(i, &page(PageKind::Heap, i), &mut s).unwrap();
        }
        let go = AtomicBool::new(false);
        let (now, hour) = (Duration::ZERO, Duration::from_secs(3600));
        let compr = dev.stats().mm_stat.compr_data_size;
        let r = dev.reclaim(now, 30, &go).unwrap();
        assert_eq!((r.scanned, r.written), (30, 30));
        assert_eq!(r.freed_bytes, compr - dev.stats().mm_stat.compr_data_size);
        assert_eq!(in_file(&dev), (0..30).collect::<Vec<_>>());
        let r = dev.reclaim(now, 30, &go).unwrap();
        assert_eq!((r.scanned, r.written), (30, 30));
        assert_eq!(in_file(&dev), (0..60).collect::<Vec<_>>());
        // One turn at most per call: the last 40, then round past the first 60.
        let r = dev.reclaim(now, 1000, &go).unwrap();
        assert_eq!((r.scanned, r.written), (100, 40));
        // Pages written again are found by a hand that wraps around.
        dev.write_page(5, &page(PageKind::Heap, 5), &mut s).unwrap();
        dev.write_page(7, &page(PageKind::Heap, 7), &mut s).unwrap();
        let r = dev.reclaim(now, 1, &go).unwrap();
        // The full turn began and ended at 60: from there round to 5.
        assert_eq!((r.scanned, r.written), (46, 1));
        let r = dev.reclaim(now, 1, &go).unwrap();
        assert_eq!((r.scanned, r.written), (2, 1), "6 and 7");
        // Recently used pages are not cold, unless idle or huge; but a pass for an age beyond
        // the store's reclaim age (a device under back-off) wants huge pages that old too.
        dev.write_page(5, &page(PageKind::Heap, 5), &mut s).unwrap();
        dev.write_page(9, &page(PageKind::Random, 9), &mut s)
            .unwrap();
        let r = dev.reclaim(hour, 10, &go).unwrap();
        assert_eq!(
            (r.scanned, r.written),
            (100, 0),
            "backed off: not even the huge page"
        );
        st.set_reclaim_age(hour);
        let r = dev.reclaim(hour, 10, &go).unwrap();
        assert_eq!((r.scanned, r.written), (100, 1), "the huge page");
        dev.mark_idle(None);
        assert_eq!(dev.reclaim(hour, 10, &go).unwrap().written, 1);
        assert_eq!(in_file(&dev).len(), 100);
        assert_eq!(
            dev.reclaim(now, 10, &AtomicBool::new(true))
                .unwrap()
                .written,
            0
        );
        for i in 0..100 {
            let kind = if i == 9 {
                PageKind::Random
            } else {
                PageKind::Heap
            };
            assert_eq!(read(&dev, i, &mut s), page(kind, i), "page {i}");
        }
        let t = dev.stats().tiering;
        assert_eq!(
            (t.written_back, t.promoted, t.direct_reclaimed),
            (104, 100, 0)
        );
        assert!(device(&st, 4, None).reclaim(now, 1, &go).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn recompress_cold_resumes_where_it_stopped_and_wraps_around() {
        let st = store(4096);
        let dev = device(&st, 100, None);
        let mut s = dev.new_stream();
        for i in 0..100 {
            dev.write_page(i, &page(PageKind::Text, i), &mut s).unwrap();
        }
        let (go, prio) = (AtomicBool::new(false), Priority::new(1).unwrap());
        let (now, hour) = (Duration::ZERO, Duration::from_secs(3600));
        let done = |dev: &Device| -> Vec<u64> {
            (0..100)
                .filter(|&i| {
                    let e = dev.slots.get(i as usize).peek();
                    e.prio() == 1 || e.has(INCOMPRESSIBLE)
                })
                .collect()
        };
        let r = dev.recompress_cold(now, 30, prio, &mut s, &go).unwrap();
        assert_eq!(r.tried, 30);
        assert_eq!(done(&dev), (0..30).collect::<Vec<_>>());
        let r = dev.recompress_cold(now, 1000, prio, &mut s, &go).unwrap();
        assert_eq!(r.tried, 70, "the rest, then round past the first 30");
        assert_eq!(
            dev.recompress_cold(now, 1000, prio, &mut s, &go)
                .unwrap()
                .tried,
            0
        );
        dev.write_page(3, &page(PageKind::Text, 3), &mut s).unwrap();
        assert_eq!(
            dev.recompress_cold(hour, 10, prio, &mut s, &go)
                .unwrap()
                .tried,
            0,
            "page 3 was just written"
        );
        dev.mark_idle(None);
        let r = dev.recompress_cold(hour, 10, prio, &mut s, &go).unwrap();
        assert_eq!(r.tried, 1);
        let t = dev.stats().tiering;
        assert!(t.recompressed > 50, "{t:?}");
        for i in 0..100 {
            assert_eq!(read(&dev, i, &mut s), page(PageKind::Text, i), "page {i}");
        }
        assert!(
            dev.recompress_cold(now, 1, Priority::PRIMARY, &mut s, &go)
                .is_err()
        );
    }

    #[test]
    fn the_store_knows_its_live_devices_and_their_recent_use() {
        let st = store(1024);
        let a = device(&st, 16, None);
        let b = device(&st, 16, None);
        assert_eq!(st.devices().len(), 2);
        assert!(Arc::ptr_eq(&st.devices()[0], &a));
        drop(b);
        assert_eq!(st.devices().len(), 1);
        let mut s = a.new_stream();
        for i in 0..10 {
            a.write_page(i, &page(PageKind::Heap, i), &mut s).unwrap();
        }
        assert_eq!(a.recently_used_pages(Duration::from_secs(60)), 10);
        assert!(!a.has_backing());
        assert_eq!(a.mem_used(), st.mem_used_total());
        assert_eq!(st.reclaim_age(), Duration::from_secs(120));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "non-sleepable section")]
    fn compressing_inside_a_non_sleepable_section_is_caught() {
        // Every write compresses through zcomp's might_sleep(); if zram ever compressed under
        // one of its non-sleepable locks, every test here would panic like this one does.
        let st = store(64);
        let dev = device(&st, 4, None);
        let mut s = dev.new_stream();
        let _atomic = preempt::NonSleepGuard::new();
        let _ = dev.write_page(0, &page(PageKind::Heap, 0), &mut s);
    }
}
