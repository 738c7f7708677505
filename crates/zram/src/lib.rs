//! The swap-device store: zram rebuilt over zsmalloc and zcomp, with no virtio in it.
//!
//! A [`Device`] is a fixed number of 4 KiB pages. Each page has a 16-byte slot (`slot.rs`):
//! empty, same-filled (the repeated word kept in the slot, no allocation), compressed (a
//! zsmalloc handle, the length and the priority of the algorithm that made it), huge (the raw
//! page in the pool, when compression would not land below the pool's huge size), or written
//! back (a block of the backing file). Flags: idle, incompressible; and the last access time.
//!
//! # Paths and locks
//!
//! - write: same-filled check; compress with the caller's [`zcomp::Stream`] holding no lock;
//!   `malloc` + `write` the new object; lock the slot only to swap the new entry in; free the
//!   old object after unlocking.
//! - read: lock the slot; fill a same-filled page, or `read_begin` the object and decompress
//!   straight into the destination; unlock.
//! - The slot lock is a bit in the slot, held per page, and *sleepable*: readers decompress
//!   under it, so a write to the same page waits, and the object a reader is decompressing
//!   cannot be freed under it. Different pages never wait on each other (beyond zsmalloc's short
//!   class locks). Concurrent operations on one page are serialised and leave it old or new.
//! - Partial (512-byte granular) writes read, patch and rewrite the page with its slot locked
//!   throughout; maintenance (recompression, writeback) decodes under the slot lock, does its
//!   slow work unlocked, and installs its result only if the slot still holds what it read.
//!
//! # Memory
//!
//! Devices share a [`Store`]: one zsmalloc pool and one memory limit. A write that would take
//! the pool past the limit fails with [`Error::NoSpace`]; the page keeps its old content.

mod backing;
mod device;
mod slot;
mod stats;

pub use device::{Config, Device, PageFilter, RecompressResult};
pub use stats::{BdStat, IoStat, MmStat, Stats};
pub use zsmalloc::PAGE_SIZE;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use zsmalloc::{Handle, Pool};

/// Requests are counted in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request out of range: {len} bytes at offset {offset} on a {size}-byte device")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request not aligned to 512 bytes: {len} bytes at offset {offset}")]
    Unaligned { offset: u64, len: u64 },
    #[error("no space: the memory limit is reached")]
    NoSpace,
    #[error("compression: {0}")]
    Comp(#[from] zcomp::Error),
    #[error("backing file: {0}")]
    Io(#[from] std::io::Error),
    #[error("no backing file configured")]
    NoBackingFile,
    #[error("the backing file is full")]
    BackingFull,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("allocator: {0}")]
    Alloc(zsmalloc::Error),
}

/// Memory that devices share: the pool, its limit and its high-water mark.
#[derive(Debug)]
pub struct Store {
    pool: Pool,
    limit: AtomicU64,
    max_used_pages: AtomicU64,
}

impl Store {
    pub fn new(cfg: zsmalloc::Config) -> Result<Store, Error> {
        Ok(Store {
            pool: Pool::new(cfg).map_err(Error::Alloc)?,
            limit: AtomicU64::new(0),
            max_used_pages: AtomicU64::new(0),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Allocates an object, mapping a full pool to [`Error::NoSpace`], and tracks the
    /// high-water mark.
    fn malloc(&self, len: usize) -> Result<Handle, Error> {
        let h = self.pool.malloc(len).map_err(|e| match e {
            zsmalloc::Error::LimitReached { .. } | zsmalloc::Error::TooManyObjects(_) => {
                Error::NoSpace
            }
            e => Error::Alloc(e),
        })?;
        // Read first: a read-modify-write on every page written would bounce this cache line
        // between the workers even when the mark does not move.
        let used = self.pool.pages_used() as u64;
        if used > self.max_used_pages.load(Relaxed) {
            self.max_used_pages.fetch_max(used, Relaxed);
        }
        Ok(h)
    }

    /// Sets the memory limit in bytes (rounded down to pages); 0 removes it. Lowering it below
    /// what is in use frees nothing: new writes fail until usage falls.
    pub fn set_mem_limit(&self, bytes: u64) {
        self.limit.store(bytes, Relaxed);
        let pages = if bytes == 0 {
            usize::MAX
        } else {
            (bytes / PAGE_SIZE as u64) as usize
        };
        self.pool.set_page_limit(pages);
    }

    pub fn mem_limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    pub fn mem_used_total(&self) -> u64 {
        self.pool.pages_used() as u64 * PAGE_SIZE as u64
    }

    pub fn mem_used_max(&self) -> u64 {
        self.max_used_pages.load(Relaxed) * PAGE_SIZE as u64
    }

    /// zram's `mem_used_max` reset: to the current usage.
    pub fn reset_mem_used_max(&self) {
        self.max_used_pages
            .store(self.pool.pages_used() as u64, Relaxed);
    }

    pub fn pages_compacted(&self) -> u64 {
        self.pool.stats().pages_compacted
    }

    pub fn compact(&self) -> usize {
        self.pool.compact()
    }
}

/// Parses a size like zram's `disksize` or `mem_limit`: bytes, or a number with a K, M, G or T
/// suffix (powers of 1024; a trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "size {s:?}: unknown suffix {c:?}"
                    )));
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "size {s:?}: expected a number with an optional K/M/G/T suffix"
        ))
    })?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| Error::InvalidArgument(format!("size {s:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_zram_disksize() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("16k").unwrap(), 16 << 10);
        for bad in ["", "G", "12X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
