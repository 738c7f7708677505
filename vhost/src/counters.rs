//! Per-queue request counters, so a user can see that every queue carries I/O.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one virtqueue. Each queue is served by one worker thread, which is the only
/// writer; the padding keeps two workers' counters off one cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct RequestCounters {
    pub requests: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub io_errors: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
}

/// A snapshot of [`RequestCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RequestStats {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub io_errors: u64,
    pub unsupported: u64,
}

impl RequestCounters {
    /// Adds `n` to one counter (one writer per queue: a plain load + store would do, but
    /// `fetch_add` keeps the counters exact if two threads ever share a queue).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> RequestStats {
        RequestStats {
            requests: self.requests.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            get_ids: self.get_ids.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            io_errors: self.io_errors.load(Relaxed),
            unsupported: self.unsupported.load(Relaxed),
        }
    }
}
