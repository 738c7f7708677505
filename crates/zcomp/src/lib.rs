//! Compression of 4 KiB pages for vzram: Linux's zcomp in user space.
//!
//! zcomp turns a page into compressed bytes and back. It knows nothing of the allocator that
//! stores those bytes (zsmalloc), of slots, of virtio or of guests.
//!
//! # Pieces
//!
//! - A [`Backend`] is one configured algorithm (`lz4`, or `zstd` at some level with an optional
//!   dictionary). It is immutable and shared by every worker. It makes [`Context`]s: the mutable
//!   per-worker state of the algorithm (zstd's compression and decompression contexts, lz4's
//!   hash table), created once and reused for every page.
//! - A [`Comp`] is the device's set of algorithms, as in zram: the primary one (priority 0,
//!   zram's `comp_algorithm`) and up to three secondary ones (priorities 1..=3, zram's
//!   `recomp_algorithm`) used to recompress pages later. Data compressed with priority `p` must
//!   be decompressed with priority `p`, so whoever stores the data also stores the
//!   [`Priority`] (zram keeps it in the slot: two bits). `Comp` is `Send + Sync`; share it in an
//!   `Arc`.
//! - A [`Stream`] is what one worker owns: one context per algorithm of the set, an output
//!   buffer of two pages ([`BUFFER_SIZE`]: lz4 and zstd may grow an incompressible page past
//!   4096 bytes), and a one-page [`Stream::local_copy`] that zsmalloc's `read_begin` copies an
//!   object into when the object spans two pages. [`Comp::new_stream`] makes one per worker.
//!
//! # Ownership and locking
//!
//! A stream belongs to one worker thread (it is `Send`, so it can be moved there, and every
//! method takes `&mut self`), so using it takes no lock at all: there is nothing to contend on,
//! unlike the kernel's per-CPU streams, which need a local lock because a task can migrate.
//! [`Stream`] is two public fields, [`Stream::local_copy`] and [`Stream::codec`], so that a
//! reader can hold zsmalloc's read guard, which borrows `local_copy`, while it decompresses
//! with `codec`:
//!
//! ```
//! # use zcomp::{Comp, PAGE_SIZE, Priority};
//! # let comp = Comp::parse("lz4", &[]).unwrap();
//! # let mut stream = comp.new_stream().unwrap();
//! # let stored = stream.compress(&[7u8; PAGE_SIZE]).unwrap().to_vec();
//! # fn read_begin<'a>(stored: &'a [u8], _local_copy: &'a mut [u8; PAGE_SIZE]) -> &'a [u8] {
//! #     stored
//! # }
//! let mut page = [0u8; PAGE_SIZE];
//! // Stands in for `pool.read_begin(handle, &mut stream.local_copy)`.
//! let object = read_begin(&stored, &mut stream.local_copy);
//! stream.codec.decompress_with(Priority::PRIMARY, object, &mut page).unwrap();
//! assert_eq!(page, [7u8; PAGE_SIZE]);
//! ```
//!
//! # Backends may sleep
//!
//! Compressing a page takes microseconds to tens of microseconds, and a backend may block
//! (allocate, fault in guest memory). Like the kernel's zcomp, every compress and decompress
//! entry point first calls [`preempt::might_sleep`]: a caller that holds a short lock other
//! workers wait on (a zsmalloc class lock, a zram slot lock, each marked with a
//! `preempt::NonSleepGuard`) panics in debug builds instead of silently stalling them. The rule
//! for callers: compress before taking the slot, decompress under a zsmalloc read guard (which
//! is allowed to sleep) but never under a slot or class lock. Release builds skip the check.
//!
//! # Results are exact pages
//!
//! Decompression writes into a caller's one-page destination, a Rust array. Pages that live in
//! memory another party may write meanwhile (guest memory) are copied into or out of such an
//! array by the caller: a `&[u8]` or `&mut [u8]` over memory that changes under it would be
//! unsound, and neither lz4_flex nor the zstd crate's bulk API takes a raw pointer. Anything that does not decompress to exactly 4096 bytes,
//! less or more, is an [`Error`], as is corrupt input; no input makes it panic or touch memory
//! outside the destination (lz4_flex's block decoder checks every literal, match offset and
//! length against both buffers, also in its fast non-`safe` build; zstd checks its input).
//!
//! # Parameters
//!
//! [`Params`] follow zram's sysfs syntax. Either a name with an optional level:
//!
//! - `lz4`, `zstd`, `zstd:3`, `zstd:-5`
//!
//! or space- (or comma-) separated `key=value` pairs, as zram's `algorithm_params` and
//! `recomp_algorithm` take them:
//!
//! - `algo=zstd level=3 dict=/etc/vzram/swap.dict`
//! - `algo=zstd level=-5` (negative levels are zstd's fast modes)
//! - `algo=zstd level=9 priority=1` (a secondary algorithm)
//!
//! Keys: `algo` (`lz4` or `zstd`), `level` (zstd only, zstd's own range, currently
//! -131072..=22; 0 means zstd's default, 3), `dict` (zstd only: a file holding a zstd or raw
//! dictionary, read once when the [`Comp`] is made and loaded once per stream), `priority`
//! (0..=3). lz4_flex has no levels and no prepared dictionaries, so `lz4` takes neither; a
//! secondary without `priority=` takes the lowest free one. Paths cannot contain spaces or
//! commas.

mod backend;
mod comp;
mod error;
mod params;
mod stream;

pub use backend::{Backend, Context, Lz4, Zstd};
pub use comp::Comp;
pub use error::{ConfigError, Error};
pub use params::{Algorithm, Params, Priority};
pub use stream::{Codec, Stream};

/// Size of the pages zcomp compresses and decompresses (defined in `region`, the crate below
/// both zcomp and the allocator).
pub use region::PAGE_SIZE;

/// Size of a stream's output buffer: two pages, room for any compressor's worst case on one
/// incompressible page (lz4 4525 bytes, zstd 4174).
pub const BUFFER_SIZE: usize = 2 * PAGE_SIZE;
