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
//!   throughout (at a memory limit they unlock, reclaim, and start over: no writer holds a
//!   slot lock while it reclaims); maintenance (recompression, writeback) decodes under the slot lock, does its
//!   slow work unlocked, and installs its result only if the slot still holds what it read.
//!
//! # Memory
//!
//! Devices share a [`Store`]: one zsmalloc pool and one memory limit, and the store keeps a
//! registry of its live devices ([`Store::devices`]) so that memory can be charged to them.
//! A device's memory ([`Device::mem_used`]) is its compressed bytes plus its share of the
//! allocator's overhead, the pool split in proportion to compressed bytes: the devices' shares
//! add up to the pool. A device may have its own limit ([`Device::set_mem_limit`]) under the
//! store's.
//!
//! A write that would cross a limit reclaims first, as the kernel does before it fails an
//! allocation (`budget.rs`): it compacts the pool, then moves cold pages (idle, older than
//! [`Store::set_reclaim_age`], incompressible or huge) to the backing files in batches:
//! at the store's limit from the devices furthest above their fair share first, then the
//! writer's own, then the rest; at a device's own limit from that device. Only when no cold
//! page is left to move (or there is no backing file) does the write fail with
//! [`Error::NoSpace`], the page keeping its old content. The write path pays nothing for
//! this until a limit is hit: one relaxed load when its device has no limit of its own.
//!
//! # The daemon's interface to storage
//!
//! zram is all a user (the `vzram` daemon) sees of storage: it is configured with zram's own
//! types ([`StoreConfig`], [`Config`]) and reports zram's statistics ([`Stats`], and the
//! store's [`PoolStats`]), all `Serialize + Deserialize`, so a control protocol can carry them
//! as they are. No zsmalloc type appears in this crate's public API: the allocator can change
//! without its users noticing. The slot table lives in a `region::Region`, the same kind of
//! mapping zsmalloc keeps its tables in; [`PAGE_SIZE`] comes from `region` and
//! [`SECTOR_SIZE`] is defined here, the lowest crate that needs it.

mod backing;
mod budget;
mod device;
pub mod policy;
mod slot;
pub mod state;
mod stats;

pub use backing::existing_data as backing_file_data;
pub use device::{Config, Device, PageFilter, Reclaimed, RecompressResult};
pub use region::PAGE_SIZE;
pub use stats::{BdStat, DeviceMemory, IoStat, MmStat, PoolStats, Stats, TieringStats};

use parking_lot::Mutex;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use zsmalloc::{Handle, Pool};

/// Requests are counted in 512-byte sectors: virtio-blk's sector too, so vzram and the vufront
/// frontend use this one.
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
    Alloc(#[source] AllocError),
    #[error("state: {0}")]
    State(String),
}

/// A failure of the allocator under the store other than running out of memory: a
/// configuration it refuses, or address space it cannot reserve. Opaque: which allocator that
/// is stays zram's business.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct AllocError(zsmalloc::Error);

/// How a [`Store`] is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Longest chain of pages the allocator groups objects of one size class in (4..=16; the
    /// kernel's zsmalloc default is 8). Longer chains waste less on awkward sizes.
    pub max_chain: usize,
    /// The most pages the store can ever hold: address space reserved up front, no memory.
    /// The default is the machine's physical memory.
    pub capacity_pages: usize,
    /// zram's `mem_limit` in bytes (0: none; it can change later with
    /// [`Store::set_mem_limit`]).
    pub mem_limit: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let pool = zsmalloc::Config::default();
        StoreConfig {
            max_chain: pool.max_chain,
            capacity_pages: pool.capacity_pages,
            mem_limit: 0,
        }
    }
}

/// Memory that devices share: the pool, its limit and its high-water mark, the registry of
/// the devices on it; and, for a store kept in a state directory ([`state::open`]), that
/// directory's lock.
#[derive(Debug)]
pub struct Store {
    pool: Pool,
    limit: AtomicU64,
    max_used_pages: AtomicU64,
    /// The devices made on this store (dead entries are pruned when the list is walked).
    devices: Mutex<Vec<Weak<Device>>>,
    /// Seconds since its last access after which a page is cold for direct reclaim.
    reclaim_age: AtomicU64,
    /// Pool bytes per compressed byte (16.16 fixed point), cached for the write path's
    /// per-device limit check, and the pool's pages when it was computed (`budget.rs`).
    charge: AtomicU64,
    charged_at: AtomicU64,
    state: Option<state::Held>,
}

impl Drop for Store {
    /// The last user is gone (every device and worker): a state directory is consistent and
    /// can be marked clean.
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.mark_clean();
        }
    }
}

impl Store {
    pub fn new(cfg: StoreConfig) -> Result<Store, Error> {
        let pool = Pool::new(zsmalloc::Config {
            max_chain: cfg.max_chain,
            capacity_pages: cfg.capacity_pages,
            page_limit: cfg.capacity_pages,
        })
        .map_err(|e| Error::Alloc(AllocError(e)))?;
        Ok(Self::with_pool(pool, cfg.mem_limit, None))
    }

    fn with_pool(pool: Pool, mem_limit: u64, state: Option<state::Held>) -> Store {
        let store = Store {
            max_used_pages: AtomicU64::new(pool.pages_used() as u64),
            pool,
            limit: AtomicU64::new(0),
            devices: Mutex::new(Vec::new()),
            reclaim_age: AtomicU64::new(budget::DEFAULT_RECLAIM_AGE.as_secs()),
            charge: AtomicU64::new(budget::ONE),
            charged_at: AtomicU64::new(0),
            state,
        };
        store.set_mem_limit(mem_limit);
        store
    }

    /// Whether the store lives in a state directory (and outlives the process).
    pub fn is_persistent(&self) -> bool {
        self.state.is_some()
    }

    /// The allocator, for zram's own modules only.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Allocates an object, mapping a full pool to [`Error::NoSpace`], and tracks the
    /// high-water mark.
    fn malloc(&self, len: usize) -> Result<Handle, Error> {
        let h = self.pool.malloc(len).map_err(|e| match e {
            zsmalloc::Error::LimitReached { .. } | zsmalloc::Error::TooManyObjects(_) => {
                Error::NoSpace
            }
            e => Error::Alloc(AllocError(e)),
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

    /// Pages compaction could free now (a cheap estimate from counters; takes no lock).
    pub fn freeable_pages(&self) -> usize {
        self.pool.freeable_pages()
    }

    /// Moves objects out of sparse allocator pages into fuller ones and frees the pages it
    /// empties; runs beside reads and writes. Returns the pages freed.
    pub fn compact(&self) -> usize {
        self.pool.compact()
    }

    /// The allocator's own statistics.
    pub fn pool_stats(&self) -> PoolStats {
        let s = self.pool.stats();
        PoolStats {
            pages_used: s.pages_used,
            pages_compacted: s.pages_compacted,
            page_limit: s.page_limit,
            capacity_pages: s.capacity_pages,
            objects: s.objects,
            metadata_bytes: s.metadata_bytes,
        }
    }
}

/// Parses a size like zram's `disksize` or `mem_limit`: bytes, or a number with a K, M, G, T,
/// P or E suffix (powers of 1024; either case; a trailing `B`/`iB` is accepted, `16KiB`).
///
/// Everything the size printer (`vzram stat`, zramctl) emits parses back: a suffixed number
/// may have a decimal fraction (`1.5K` = 1536), which is rounded to the nearest byte, and
/// `16E` (or `16384P`, ...), which is how the largest size (2^64 - 1 bytes) is printed, means
/// that largest size. Anything larger, and a fraction of a byte, is an error.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let invalid = |why: &str| Error::InvalidArgument(format!("size {s:?}: {why}"));
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let t = if lower.ends_with("ib") && lower.len() > 2 {
        &t[..t.len() - 2]
    } else if lower.ends_with('b') {
        &t[..t.len() - 1]
    } else {
        t
    };
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => {
                    return Err(invalid(&format!(
                        "unknown suffix {c:?} (known: K M G T P E)"
                    )));
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let num = num.trim();
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(frac.is_empty() && !num.ends_with('.') || digits(frac)) {
        return Err(invalid(
            "expected a number with an optional K/M/G/T/P/E suffix",
        ));
    }
    if !frac.is_empty() && shift == 0 {
        return Err(invalid("a size in bytes has no fraction"));
    }
    let too_large = || invalid("too large (the largest size is 16E, 2^64 - 1 bytes)");
    // Exact arithmetic: value = (whole + frac / 10^len) * 2^shift, rounded to nearest.
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    // Digits past the 19th cannot change the result by a byte (2^60 < 10^19).
    let frac = &frac[..frac.len().min(19)];
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().expect("digits")
    };
    let bytes = whole
        .checked_mul(1 << shift)
        .ok_or_else(too_large)?
        .checked_add((frac * (1u128 << shift) + scale / 2) / scale)
        .ok_or_else(too_large)?;
    match bytes {
        b if b <= u128::from(u64::MAX) => Ok(b as u64),
        // The printer rounds 2^64 - 1 to "16E".
        b if b == 1u128 << 64 && shift > 0 => Ok(u64::MAX),
        _ => Err(too_large()),
    }
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
        for bad in [
            "", "G", "12X", "-1", "1.5", "1.", ".5K", "1..5K", "1.5.2K", "+1K", "1 5K", "iB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_suffix_in_either_case() {
        for (i, (up, low)) in [
            ('K', 'k'),
            ('M', 'm'),
            ('G', 'g'),
            ('T', 't'),
            ('P', 'p'),
            ('E', 'e'),
        ]
        .into_iter()
        .enumerate()
        {
            let want = 3u64 << (10 * (i + 1));
            for s in [
                format!("3{up}"),
                format!("3{low}"),
                format!("3{up}B"),
                format!("3{low}b"),
                format!("3{up}iB"),
                format!("3{low}ib"),
            ] {
                assert_eq!(parse_size(&s).unwrap(), want, "{s}");
            }
        }
        assert_eq!(parse_size("7B").unwrap(), 7);
        assert_eq!(parse_size("7b").unwrap(), 7);
    }

    #[test]
    fn fractions_round_to_the_nearest_byte() {
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("1.2G").unwrap(), 1288490189); // 1288490188.8
        assert_eq!(parse_size("0.001K").unwrap(), 1); // 1.024
        assert_eq!(
            parse_size("15.9E").unwrap(),
            (((159u128 << 60) + 5) / 10) as u64
        );
        assert_eq!(parse_size("1.0000000000000000000000000001K").unwrap(), 1024);
    }

    #[test]
    fn the_largest_size_and_overflow() {
        assert_eq!(parse_size("16E").unwrap(), u64::MAX);
        assert_eq!(parse_size("16384P").unwrap(), u64::MAX);
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(parse_size("15E").unwrap(), 15 << 60);
        for big in [
            "17E",
            "16.1E",
            "18446744073709551616",
            "99999999999999999999999999T",
            "999999999999999999999999999999999999999999999",
        ] {
            let e = parse_size(big).unwrap_err().to_string();
            assert!(e.contains("too large") && e.contains(big), "{big}: {e}");
        }
    }
}
