//! A user-space zsmalloc: the allocator that holds vzram's compressed pages.
//!
//! It follows Linux's mm/zsmalloc.c with the "preemptible object mapping" API, in user space.
//!
//! # Placement
//!
//! Objects of 1..=4096 bytes are sorted into size classes 32, 48, .. 4096 bytes (steps of 16,
//! [`class`]). A class stores its objects in *zspages*: chains of 1..=`max_chain` 4 KiB pages
//! (default 8, configurable 4..=16) that need not be adjacent, with the chain length chosen for
//! the least waste; an object may span the boundary between two pages of its chain. Classes
//! whose zspages would look the same are merged. Each normal object is preceded by a 4-byte
//! header naming its handle, so compaction can find the handle of any object it moves. Objects
//! too large to share a zspage usefully (at or above [`Pool::huge_class_size`]) are *huge*: one
//! per page, no header.
//!
//! Pages come from one reserved mapping, the page arena ([`arena`]); pages of freed zspages go
//! back to it, and past a small cache it gives their memory back to the OS, so the process's
//! resident memory follows the pool's size. Handles, zspage records and pages are all named by
//! 32-bit indices into big mappings (the `region` crate), never by heap pointers.
//!
//! A [`Handle`] is a stable id: the handle table maps it to the object's current zspage and
//! slot (and its length), so compaction may move the object.
//!
//! The code follows those pieces: `class` (the class table), `arena` (pages), `zspage` (zspage
//! records), `pool` (placement, object access, statistics) with its modules `pool/handles.rs`
//! (the handle table and id allocation) and `pool/compact.rs` (compaction); the mappings
//! themselves come from the `region` crate, shared with zram's slot table.
//!
//! Within a class, zspages sit on fullness lists (empty, 0-9% .. 90-99%, full). Allocation
//! takes a slot in the fullest zspage with room; compaction moves objects out of the emptiest
//! zspages into the fullest and frees those it empties.
//!
//! # Locks, and who may sleep where
//!
//! - **Class lock** (a short spinning mutex per class): guards the class's fullness lists, the
//!   zspage records' counters and free-slot lists, and the location bits of handle entries of
//!   the class. Held only for bounded work: taking or returning a slot, moving the objects of
//!   one zspage. Never held across anything that may sleep (a `preempt` guard enforces this in
//!   debug builds). Page and id allocation happen outside it.
//! - **Zspage lock** (reader/writer, per zspage): object readers and writers hold it *shared*,
//!   as long as they like, and may sleep while holding it (decompress, copy into a guest).
//!   Compaction is its only exclusive user and only ever *tries* it: a zspage being read is
//!   skipped, never waited for. There is no pool-wide lock on the read path: a reader looks
//!   its handle up, locks that zspage and checks the handle still points there (retrying if
//!   compaction moved the object in between).
//! - **Handle pin** (bits in the handle entry): readers count themselves in, a writer sets a
//!   bit; `free` and `write` of a handle being read are caller bugs and panic instead of
//!   tearing the bytes under a reader's view.
//! - **Arena and id locks**: leaves, held for a few instructions.
//!
//! Lock order: class lock -> zspage lock (try only) -> arena/id locks. Readers take only a
//! zspage lock. Compaction never waits while holding anything, so a reader waits at most for
//! one zspage's objects to be copied.
//!
//! # Promises to callers
//!
//! - `malloc`/`free`/`read_begin`/`write`/`compact` may be called from any threads at once.
//! - Errors, never panics or aborts, for bad lengths, a full page limit or exhausted tables.
//! - The bytes a `ReadGuard` shows are exactly those last written, wherever the object moved.

pub mod arena;
pub mod class;
mod pool;
mod zspage;

pub use class::{Layout, SizeClass};
pub use pool::{ClassStats, Config, Handle, Pool, PoolFiles, PoolStats, ReadGuard};
pub use zspage::NR_GROUPS;

/// Size of a page of the pool, and the largest object (defined in `region`).
pub use region::PAGE_SIZE;

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object length {0} is outside 1..=4096 bytes")]
    InvalidLength(usize),
    #[error("pool page limit reached ({limit} pages)")]
    LimitReached { limit: usize },
    #[error("too many objects: the handle table is full ({0} handles)")]
    TooManyObjects(usize),
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("cannot reserve the pool's address space: {0}")]
    Reserve(#[source] std::io::Error),
    #[error("the pool's {what} file: {source}")]
    File {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("inconsistent pool state: {0}")]
    Corrupt(String),
    #[error("inconsistent pool state: handle {handle} {why}")]
    BadHandle { handle: u32, why: String },
}
