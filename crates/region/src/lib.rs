//! Big anonymous mappings that hold plain-data records at fixed indices, and the page size the
//! store is built on.
//!
//! A [`Region<T>`] is one `mmap` reserved up front for the largest number of records a table
//! may ever need (`MAP_NORESERVE`: address space only, no memory is committed), touched, and so
//! backed by memory, only as far as it is used. Records are found by index, never through heap
//! pointers, so that the same state could later live on a memfd that outlives the process.
//! Reserving once also means no `mmap` per object: the kernel caps a process at about 65k
//! mappings.
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
//! - Fresh anonymous memory reads as zeroes, so every record starts as the all-zero value.
//!   [`Zeroable`] (an `unsafe` trait) is the promise that this value is a valid `T`: integers,
//!   atomics, and structs of them.
//! - [`Region::get`] and [`Region::ptr`] bounds-check the index; the mapping lives as long as
//!   the region, and references borrow the region.
//! - [`Region::discard`] gives memory back (`MADV_DONTNEED`): the records read as zeroes again.
//!   It is `unsafe` because the kernel rewrites the bytes outside Rust's memory model: nobody
//!   may be using those records while it runs.
//!
//! [`PAGE_SIZE`] lives here because this is the lowest crate that needs it (regions count
//! resident memory in pages): zcomp's streams, zsmalloc's pool and zram's devices all use this
//! one definition.

use std::io;
use std::marker::PhantomData;
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

/// A reserved array of `cap` zero-initialised `T`s in its own anonymous mapping.
pub struct Region<T: Zeroable> {
    base: NonNull<T>,
    cap: usize,
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
        let bytes = cap
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0 && b < isize::MAX as usize)
            .ok_or_else(|| io::Error::other("mapping size out of range"))?;
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
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            base: NonNull::new(p.cast()).expect("mmap returned null"),
            cap,
            _owns: PhantomData,
        })
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
        // SAFETY: the range is inside our own mapping (asserted above); MADV_DONTNEED on
        // private anonymous memory only replaces its contents with zeroes, which is a valid T
        // (Zeroable), and the caller guarantees that no one accesses these entries meanwhile.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(first).cast(),
                n * size,
                libc::MADV_DONTNEED,
            )
        };
        debug_assert_eq!(rc, 0, "madvise: {}", io::Error::last_os_error());
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

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_index_panics() {
        let r: Region<AtomicU64> = Region::reserve(8).unwrap();
        r.get(8);
    }
}
