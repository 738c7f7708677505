//! The handle table: what a [`Handle`] is, where its object is, and who hands out ids.
//!
//! A handle is an index into the table, a `Region` of one `u64` entry per handle: the object's
//! location (zspage and slot), its length, and the handle's pin (reader count, writer bit).
//! Ids are handed out by [`HandleIds`], sharded per thread; [`IdAlloc`] also numbers zspages.

use super::Pool;
use crate::Error;
use parking_lot::Mutex;
use preempt::NonSleepGuard;
use region::Region;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// An allocated object. Stable for the object's life, whatever compaction does; small enough
/// (4 bytes, `Option<Handle>` too) to keep in a slot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(NonZeroU32);

impl Handle {
    /// The handle as a number, to store elsewhere.
    pub fn raw(self) -> u32 {
        self.0.get()
    }

    /// A handle from [`Handle::raw`]'s number (0 is never a handle).
    pub fn from_raw(raw: u32) -> Option<Handle> {
        NonZeroU32::new(raw).map(Handle)
    }
}

/// The handle table entry: where the object is, how long it is, and who is using it.
///
/// `| alloc:1 | writer:1 | readers:6 | len:13 | obj idx:11 | zspage:32 |`. The location bits
/// change only under the class lock (malloc, compaction); the reader count and writer bit are
/// the handle's own pin: `free` and `write` refuse a handle that is being read, so a caller's
/// mistake cannot tear an object under a reader's view.
pub(super) mod entry {
    pub const IDX_SHIFT: u32 = 32;
    pub const LEN_SHIFT: u32 = 43;
    pub const LOC_MASK: u64 = (1 << LEN_SHIFT) - 1;
    pub const READER: u64 = 1 << 56;
    pub const READERS: u64 = 0x3F << 56;
    pub const WRITER: u64 = 1 << 62;
    pub const ALLOC: u64 = 1 << 63;

    pub fn new(zspage: u32, idx: usize, len: usize) -> u64 {
        ALLOC | (len as u64) << LEN_SHIFT | loc(zspage, idx)
    }
    pub fn loc(zspage: u32, idx: usize) -> u64 {
        (idx as u64) << IDX_SHIFT | zspage as u64
    }
    pub fn zspage(e: u64) -> u32 {
        e as u32
    }
    pub fn idx(e: u64) -> usize {
        ((e >> IDX_SHIFT) & 0x7FF) as usize
    }
    pub fn len(e: u64) -> usize {
        ((e >> LEN_SHIFT) & 0x1FFF) as usize
    }
}

#[derive(Debug)]
pub(super) struct IdAlloc {
    pub(super) free: Vec<u32>,
    pub(super) next: u32,
    pub(super) cap: u32,
}

impl IdAlloc {
    pub(super) fn alloc(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.cap).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }
}

/// Handle ids, in shards so that threads allocating and freeing at once do not meet on one
/// lock, nor on the cache lines of their handle table entries: shard `s` owns the id range
/// `s * per_shard ..`, a thread allocates from its own shard (threads are spread over the
/// shards round-robin), and a freed id goes back to the shard that owns it.
#[derive(Debug)]
pub(super) struct HandleIds {
    shards: Box<[CachePadded<Mutex<IdAlloc>>]>,
    per_shard: u32,
}

const HANDLE_SHARDS: u32 = 16;

/// Keeps hot per-shard or per-class state on cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl HandleIds {
    pub(super) fn new(max: u32) -> Self {
        let per_shard = max / HANDLE_SHARDS;
        HandleIds {
            shards: (0..HANDLE_SHARDS)
                .map(|s| {
                    CachePadded(Mutex::new(IdAlloc {
                        free: Vec::new(),
                        // Id 0 is never a handle: shard 0 starts at its second id.
                        next: (s == 0) as u32,
                        cap: per_shard,
                    }))
                })
                .collect(),
            per_shard,
        }
    }

    fn my_shard() -> u32 {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        thread_local!(static SHARD: u32 = NEXT.fetch_add(1, Relaxed) % HANDLE_SHARDS);
        SHARD.with(|s| *s)
    }

    pub(super) fn alloc(&self) -> Result<u32, Error> {
        let first = Self::my_shard();
        let _ns = NonSleepGuard::new();
        // Another shard only when this one is exhausted.
        for s in (0..HANDLE_SHARDS).map(|i| (first + i) % HANDLE_SHARDS) {
            if let Some(k) = self.shards[s as usize].lock().alloc() {
                return Ok(s * self.per_shard + k);
            }
        }
        Err(Error::TooManyObjects(
            (self.per_shard * HANDLE_SHARDS) as usize,
        ))
    }

    pub(super) fn free(&self, id: u32) {
        let _ns = NonSleepGuard::new();
        self.shards[(id / self.per_shard) as usize]
            .lock()
            .free
            .push(id % self.per_shard);
    }

    /// Recovery: `live` (sorted) are the handles in use. In each shard, ids up to its highest
    /// live one that are not live become free, with their entries cleared; entries above it
    /// are discarded (zeroed). Called before the pool is shared.
    pub(super) fn restore(&mut self, live: &[u32], table: &Region<AtomicU64>) {
        let per = self.per_shard;
        let mut live = live.iter().copied().peekable();
        let last = self.shards.len() - 1;
        for (s, shard) in self.shards.iter_mut().enumerate() {
            let base = s as u32 * per;
            let ids = shard.0.get_mut();
            ids.free.clear();
            ids.next = (s == 0) as u32;
            let mut k = ids.next;
            while let Some(id) = live.next_if(|&id| id < base + per) {
                for free in k..id - base {
                    table.get((base + free) as usize).store(0, Relaxed);
                    ids.free.push(free);
                }
                k = id - base + 1;
            }
            ids.next = k;
            let end = if s == last {
                table.capacity()
            } else {
                (base + per) as usize
            };
            let from = (base + k) as usize;
            if from < end {
                // SAFETY: no handle above the shard's highest live id is in use, and the pool
                // is not shared yet.
                unsafe { table.discard(from, end - from) };
            }
        }
    }

    /// Ids handed out at least once: the touched part of the handle table.
    pub(super) fn high_water(&self) -> usize {
        let _ns = NonSleepGuard::new();
        self.shards.iter().map(|s| s.lock().next as usize).sum()
    }
}

impl Pool {
    #[inline]
    pub(super) fn entry(&self, h: Handle) -> &AtomicU64 {
        self.handles.get(h.raw() as usize)
    }

    pub(super) fn alloc_handle(&self) -> Result<Handle, Error> {
        let id = self.handle_ids.alloc()?;
        Ok(Handle(NonZeroU32::new(id).expect("handle ids start at 1")))
    }

    pub(super) fn free_handle(&self, h: Handle) {
        self.handle_ids.free(h.raw());
    }
}
