//! Statistics under zram's names (Documentation/admin-guide/blockdev/zram.rst), and the
//! store's allocator statistics. All are `Serialize + Deserialize`: they are the wire format of
//! the daemon's `stat` command as they are.

use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicU64;

/// The device's running counters. With a state directory they live in the device's file
/// (see `state`), so that they carry on across restarts; the ones that describe what is stored
/// (pages, sizes, same, huge, written back) are recounted from the slots at every attach.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct Counters {
    pub pages_stored: AtomicU64,
    pub compr_data_size: AtomicU64,
    pub same_pages: AtomicU64,
    pub huge_pages: AtomicU64,
    pub huge_pages_since: AtomicU64,
    pub failed_reads: AtomicU64,
    pub failed_writes: AtomicU64,
    pub invalid_io: AtomicU64,
    pub notify_free: AtomicU64,
    pub bd_count: AtomicU64,
    pub bd_reads: AtomicU64,
    pub bd_writes: AtomicU64,
    pub writeback_limit: AtomicU64,
    /// 0 or 1 (an integer: the counters may live in a file, where a bool could be anything).
    pub writeback_limit_enable: AtomicU64,
    // Appended by the budgets and tiering work: a state file from before reads them as 0.
    /// Pages kept in a smaller form by recompression (any pass).
    pub recompressed: AtomicU64,
    /// Pages of this device moved to the backing file by direct reclaim (any writer's).
    pub direct_reclaimed: AtomicU64,
    /// Writes to this device that failed at a limit after reclaim found nothing to move.
    pub direct_reclaim_failed: AtomicU64,
}

// SAFETY: a struct of AtomicU64 only: every bit pattern, zero included, is valid.
unsafe impl region::Zeroable for Counters {}

/// zram's `mm_stat`, in bytes unless named in pages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmStat {
    /// Uncompressed size of the data stored (every stored page, same-filled and written-back
    /// ones included).
    pub orig_data_size: u64,
    /// Compressed size of the data in memory (a huge page counts 4096).
    pub compr_data_size: u64,
    /// Memory the pool holds, allocator overhead included (shared by devices on one store).
    pub mem_used_total: u64,
    /// The store's memory limit; 0 = none.
    pub mem_limit: u64,
    /// Most memory the pool has held since the last reset.
    pub mem_used_max: u64,
    /// Pages stored as one repeated word, without an allocation.
    pub same_pages: u64,
    /// Pages freed by compaction.
    pub pages_compacted: u64,
    /// Pages stored uncompressed now.
    pub huge_pages: u64,
    /// Pages stored uncompressed since the device was made.
    pub huge_pages_since: u64,
}

impl MmStat {
    /// The single line of zram's `mm_stat` file, in its field order.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {} {}",
            self.orig_data_size,
            self.compr_data_size,
            self.mem_used_total,
            self.mem_limit,
            self.mem_used_max,
            self.same_pages,
            self.pages_compacted,
            self.huge_pages,
            self.huge_pages_since
        )
    }
}

/// zram's `io_stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStat {
    pub failed_reads: u64,
    pub failed_writes: u64,
    /// Requests refused as out of range or misaligned.
    pub invalid_io: u64,
    /// Pages freed by discard.
    pub notify_free: u64,
}

/// zram's `bd_stat`, in pages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BdStat {
    /// Pages in the backing file now.
    pub bd_count: u64,
    pub bd_reads: u64,
    pub bd_writes: u64,
}

/// A device's memory, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Its compressed bytes plus its share of the allocator's overhead (the pool split in
    /// proportion to compressed bytes: the devices' `used` add up to the pool's).
    pub used: u64,
    /// Its own limit; 0 = none (the store's limit still applies).
    pub limit: u64,
    /// Its fair share at the store's limit: its own limit if set, else the store's limit split
    /// evenly between the devices; 0 when neither is set. Direct reclaim takes pages from the
    /// devices furthest above their share first.
    pub share: u64,
}

/// What moved a device's pages between tiers, in pages since the device was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TieringStats {
    /// Kept in a smaller form by recompression with a secondary algorithm.
    pub recompressed: u64,
    /// Moved to the backing file, by any path (`bd_writes`).
    pub written_back: u64,
    /// Of those, moved by direct reclaim (a write at a limit).
    pub direct_reclaimed: u64,
    /// Writes that failed at a limit with nothing left to reclaim.
    pub direct_reclaim_failed: u64,
    /// Read back from the backing file (`bd_reads`).
    pub promoted: u64,
}

/// A snapshot of a device's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub disksize: u64,
    pub comp_algorithm: String,
    pub mm_stat: MmStat,
    pub io_stat: IoStat,
    pub bd_stat: BdStat,
    /// Absent in the statistics of an older daemon: read as zeros.
    #[serde(default)]
    pub memory: DeviceMemory,
    #[serde(default)]
    pub tiering: TieringStats,
}

/// The store's allocator: how much it holds and how full its tables are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Pages the allocator holds (the kernel's `zs_get_total_pages`).
    pub pages_used: usize,
    /// Pages freed by compaction since the store was made.
    pub pages_compacted: u64,
    /// Pages the allocator may use: the memory limit in pages, or the capacity.
    pub page_limit: usize,
    /// The most pages the store can ever hold (address space reserved).
    pub capacity_pages: usize,
    /// Objects allocated now.
    pub objects: usize,
    /// Bytes of the allocator's own tables touched so far.
    pub metadata_bytes: usize,
}
