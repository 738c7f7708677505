//! Big mappings that hold plain-data records at fixed indices, and the page size the store is
//! built on.
//!
//! A [`Region<T>`] is one `mmap` reserved up front for the largest number of records a table
//! may ever need (`MAP_NORESERVE`: address space only, no memory is committed), touched, and so
//! backed by memory, only as far as it is used. Records are found by index, never through heap
//! pointers, so the same records work in private anonymous memory ([`Region::reserve`]) and in
//! a shared mapping of a file that outlives the process ([`Region::map_file`], a sparse file on
//! tmpfs or hugetlbfs: vzram's `--state-dir`). Reserving once also means no `mmap` per object:
//! the kernel caps a process at about 65k mappings.
//!
//! Users: zsmalloc keeps its handle table, its zspage records and its page arena in regions;
//! zram keeps each device's slot table in one. The helper has its own crate, rather than living
//! in zsmalloc, so that zram uses it without reaching into its allocator's internals, and so
//! that the one piece of raw memory management below the store is small enough to audit alone.
//!
//! # Safety story
//!
//! - A region hands out only shared references (`&T`): records change through interior
//!   mutability (atomics, or raw pointers into `UnsafeCell` pages whose users coordinate with
//!   their own locks). `T: Sync` is required, so sharing those references between threads is
//!   sound.
//! - Fresh anonymous memory and the holes of a sparse file read as zeroes, so every record
//!   starts as the all-zero value. [`Zeroable`] (an `unsafe` trait) is the promise that this
//!   value is a valid `T`: integers, atomics, and structs of them. For a file that already holds
//!   records, the promise covers more: *every* bit pattern of `T` must be valid, since the file
//!   may hold anything (a crashed writer, another program). Integers and atomics, and structs of
//!   them without padding, meet it; every `Zeroable` type in the store is such a struct.
//! - A mapped file could be changed by another process. The state directory is 0700 and locked
//!   by the one daemon using it (see zram's `state` module), and records are read only through
//!   atomics or raw pointers, so even a foreign writer can produce wrong values, never undefined
//!   behaviour in Rust terms; a file shrunk under the mapping would raise SIGBUS, which the
//!   locked, private directory rules out.
//! - [`Region::get`] and [`Region::ptr`] bounds-check the index; the mapping lives as long as
//!   the region, and references borrow the region.
//! - [`Region::discard`] gives memory back (`MADV_DONTNEED` on anonymous memory; on a file,
//!   `fallocate(PUNCH_HOLE)`, since `MADV_DONTNEED` does not free shared file pages): the records
//!   read as zeroes again. It is `unsafe` because the kernel rewrites the bytes outside Rust's
//!   memory model: nobody may be using those records while it runs.
//!
//! [`PAGE_SIZE`] lives here because this is the lowest crate that needs it (regions count
//! resident memory in pages): zcomp's streams, zsmalloc's pool and zram's devices all use this
//! one definition.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A page: of the machine (the unit `mincore` reports in), of a zsmalloc zspage chain, of a zram
/// device, and the input of one compression.
pub const PAGE_SIZE: usize = 4096;

/// Types for which all-zero bytes are a valid value (fresh anonymous memory is zeroed).
///
/// # Safety
///
/// The all-zero bit pattern must be a valid, initialised value of the type.
pub unsafe trait Zeroable: Sync {}

// SAFETY: zero is a valid integer; atomics have the layout of their integer.
unsafe impl Zeroable for std::sync::atomic::AtomicU64 {}
// SAFETY: as above.
unsafe impl Zeroable for std::sync::atomic::AtomicU32 {}

/// A reserved array of `cap` `T`s in its own mapping: anonymous and zero-initialised, or a
/// shared mapping of part of a file.
pub struct Region<T: Zeroable> {
    base: NonNull<T>,
    cap: usize,
    /// The mapped file and the offset of entry 0 in it, for a file-backed region.
    file: Option<(File, u64)>,
    _owns: PhantomData<T>,
}

// SAFETY: a Region owns its mapping; T is Sync (Zeroable: Sync), so handing out &T to several
// threads is sound, and moving the Region moves only the pointer to the mapping.
unsafe impl<T: Zeroable> Send for Region<T> {}
// SAFETY: only &T are handed out, and T: Sync.
unsafe impl<T: Zeroable> Sync for Region<T> {}

impl<T: Zeroable> std::fmt::Debug for Region<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("cap", &self.cap).finish()
    }
}

impl<T: Zeroable> Region<T> {
    /// Reserves room for `cap` entries.
    pub fn reserve(cap: usize) -> io::Result<Self> {
        let bytes = Self::bytes(cap)?;
        // SAFETY: a fresh private anonymous mapping: no existing memory is affected, and the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::mapped(p, cap, None)
    }

    /// Maps `cap` entries of `file`, starting at byte `offset` (a multiple of [`PAGE_SIZE`]),
    /// shared: stores reach the file, and outlive the process. The file must already be at
    /// least `offset + cap * size_of::<T>()` bytes long (a sparse file costs nothing until
    /// written); a shorter one is refused, since touching a page past its end would raise
    /// SIGBUS. Entries hold whatever the file holds (valid `T`s: see [`Zeroable`]).
    pub fn map_file(file: File, offset: u64, cap: usize) -> io::Result<Self> {
        let bytes = Self::bytes(cap)?;
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(io::Error::other("file mapping offset not page aligned"));
        }
        let need = offset
            .checked_add(bytes as u64)
            .ok_or_else(|| io::Error::other("file mapping out of range"))?;
        let len = file.metadata()?.len();
        if len < need {
            return Err(io::Error::other(format!(
                "file is {len} bytes, {need} are needed (truncated?)"
            )));
        }
        // SAFETY: a new shared mapping of a file we hold, checked above to cover the whole
        // range; no existing memory is affected, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Self::mapped(p, cap, Some((file, offset)))
    }

    fn bytes(cap: usize) -> io::Result<usize> {
        cap.checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0 && b < isize::MAX as usize)
            .ok_or_else(|| io::Error::other("mapping size out of range"))
    }

    fn mapped(p: *mut libc::c_void, cap: usize, file: Option<(File, u64)>) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            base: NonNull::new(p.cast()).expect("mmap returned null"),
            cap,
            file,
            _owns: PhantomData,
        })
    }

    /// Whether the entries live in a file (and outlive the process).
    pub fn is_file_backed(&self) -> bool {
        self.file.is_some()
    }

    /// Number of entries reserved.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The entry at `i`.
    ///
    /// # Panics
    ///
    /// When `i` is out of the reserved range.
    #[inline]
    pub fn get(&self, i: usize) -> &T {
        assert!(i < self.cap, "region index {i} out of {}", self.cap);
        // SAFETY: i is in bounds of the mapping, which lives as long as self; the memory is
        // zero-initialised or was written only through &T (T: Zeroable, interior mutability),
        // so it holds a valid T.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    /// Raw pointer to entry `i`'s first byte, for byte-level access to page memory.
    #[inline]
    pub fn ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.cap, "region index {i} out of {}", self.cap);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.as_ptr().add(i).cast() }
    }

    /// Gives the memory of entries `first..first + n` back to the OS; they read as zero after.
    ///
    /// # Safety
    ///
    /// No thread may read or write these entries while the call runs (the kernel replaces
    /// their bytes, which no Rust synchronisation covers).
    pub unsafe fn discard(&self, first: usize, n: usize) {
        assert!(first + n <= self.cap);
        let size = std::mem::size_of::<T>();
        let rc = match &self.file {
            // SAFETY: the range is inside our own mapping (asserted above); MADV_DONTNEED on
            // private anonymous memory only replaces its contents with zeroes, which is a valid
            // T (Zeroable), and the caller guarantees that no one accesses these entries
            // meanwhile.
            None => unsafe {
                libc::madvise(
                    self.base.as_ptr().add(first).cast(),
                    n * size,
                    libc::MADV_DONTNEED,
                )
            },
            // SAFETY: punching a hole in the part of our own file that backs these entries
            // frees its pages (in the page cache and in our mapping: they read as zeroes
            // after, a valid T); the size is kept, so the mapping stays fully backed, and the
            // caller guarantees that no one accesses these entries meanwhile.
            Some((file, offset)) => unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (offset + (first * size) as u64) as libc::off_t,
                    (n * size) as libc::off_t,
                )
            },
        };
        debug_assert_eq!(rc, 0, "discard: {}", io::Error::last_os_error());
    }

    /// Faults entries `first..first + n` in now, as a write would, in one call
    /// (`MADV_POPULATE_WRITE`), so that their first use does not pay a page fault each. Their
    /// contents do not change. Best effort: returns false where the kernel has no
    /// `MADV_POPULATE_WRITE` (before 5.14), which changes nothing but speed.
    pub fn populate(&self, first: usize, n: usize) -> bool {
        assert!(first + n <= self.cap);
        let size = std::mem::size_of::<T>();
        // SAFETY: the range is inside our own mapping (asserted above); populating allocates
        // the backing pages (zeroed, or those already there) without changing any byte.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(first).cast(),
                n * size,
                libc::MADV_POPULATE_WRITE,
            )
        };
        rc == 0
    }

    /// How many of the first `n` entries' bytes are resident, in 4 KiB pages (mincore).
    pub fn resident_pages(&self, n: usize) -> usize {
        let bytes = (n * std::mem::size_of::<T>()).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        if bytes == 0 {
            return 0;
        }
        let mut vec = vec![0u8; bytes / PAGE_SIZE];
        // SAFETY: the range starts at our page-aligned mapping and stays inside it (its length
        // is a multiple of the page size: mmap rounds up), and vec has one byte per page.
        let rc = unsafe { libc::mincore(self.base.as_ptr().cast(), bytes, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }
}

impl<T: Zeroable> Drop for Region<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in reserve(); no &T can outlive self.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.cap * std::mem::size_of::<T>(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn entries_start_zeroed_and_memory_follows_use() {
        let r: Region<AtomicU64> = Region::reserve(1 << 20).unwrap();
        assert_eq!(r.resident_pages(1 << 20), 0);
        for i in (0..(1 << 20)).step_by(512) {
            assert_eq!(r.get(i).load(Ordering::Relaxed), 0);
            r.get(i).store(i as u64 + 1, Ordering::Relaxed);
        }
        assert_eq!(r.resident_pages(1 << 20), 2048);
        // SAFETY: no other thread has the region.
        unsafe { r.discard(0, 1 << 20) };
        assert_eq!(r.resident_pages(1 << 20), 0);
        assert_eq!(r.get(512).load(Ordering::Relaxed), 0);
    }

    fn temp_file(len: u64) -> File {
        let f = unlinked_temp_file();
        f.set_len(len).unwrap();
        f
    }

    fn unlinked_temp_file() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "region-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn blocks(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks()
    }

    #[test]
    fn a_file_backed_region_outlives_its_mapping_and_gives_memory_back() {
        let entries = 1 << 16;
        let f = temp_file(PAGE_SIZE as u64 + entries as u64 * 8);
        let r: Region<AtomicU64> =
            Region::map_file(f.try_clone().unwrap(), PAGE_SIZE as u64, entries).unwrap();
        assert!(r.is_file_backed());
        for i in 0..entries {
            r.get(i).store(i as u64 * 3 + 1, Ordering::Relaxed);
        }
        drop(r);
        let written = blocks(&f);
        assert!(written >= (entries as u64 * 8) / 512, "{written} blocks");
        // Mapped again, at another address: the same records.
        let r: Region<AtomicU64> =
            Region::map_file(f.try_clone().unwrap(), PAGE_SIZE as u64, entries).unwrap();
        assert!((0..entries).all(|i| r.get(i).load(Ordering::Relaxed) == i as u64 * 3 + 1));
        // Discarding punches the file: its blocks go, the entries read as zero.
        // SAFETY: no other thread has the region.
        unsafe { r.discard(0, entries) };
        assert_eq!(r.get(77).load(Ordering::Relaxed), 0);
        assert_eq!(blocks(&f), 0);
        assert_eq!(
            f.metadata().unwrap().len(),
            PAGE_SIZE as u64 + entries as u64 * 8
        );
    }

    #[test]
    fn a_file_too_short_for_the_mapping_is_refused() {
        let f = temp_file(PAGE_SIZE as u64 * 2);
        let e = Region::<AtomicU64>::map_file(f.try_clone().unwrap(), PAGE_SIZE as u64, 513)
            .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(Region::<AtomicU64>::map_file(f.try_clone().unwrap(), 100, 8).is_err());
        assert!(Region::<AtomicU64>::map_file(f, PAGE_SIZE as u64, 512).is_ok());
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_index_panics() {
        let r: Region<AtomicU64> = Region::reserve(8).unwrap();
        r.get(8);
    }
}
