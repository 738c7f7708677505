//! A vhost-user-blk frontend without a VM.
//!
//! vzram's daemon is a vhost-user-blk backend; testing and benchmarking it should not need QEMU
//! and a guest kernel. This crate plays the part of QEMU + the guest's virtio-blk driver in one
//! process:
//!
//! - [`GuestMem`]: "guest RAM" as memfd-backed regions at chosen guest-physical addresses (gaps
//!   between regions are unmapped on purpose, so descriptors can point at nothing), with a small
//!   allocator for rings and request buffers. The frontend reads and writes it through vm-memory;
//!   the backend maps the same memfd after `SET_MEM_TABLE`.
//! - [`Frontend`]: the vhost-user session (`vhost::vhost_user::Frontend`): connect with a retry
//!   deadline, feature and protocol negotiation, the virtio-blk config, the memory table, and the
//!   vring set-up. Queues can be stopped (`GET_VRING_BASE`) and re-attached to a new connection.
//! - [`Queue`]: a split virtqueue driver. The low-level half writes arbitrary raw descriptors
//!   (loops, out-of-range `next`, zero lengths, wrong directions, indirect tables) and publishes
//!   any head index; the high-level half ([`Request`], [`Completion`]) issues real virtio-blk
//!   requests with a chosen descriptor layout, synchronously or with many in flight.
//! - [`load`]: a fio-like load generator with verification of every read, used by
//!   `vzram-bench` (which runs it against any vhost-user-blk socket).
//! - `ramdisk` (feature `ramdisk`, on by default): a small in-memory vhost-user-blk backend, the
//!   test fixture of this crate and an uncompressed baseline for benchmarks.
//!
//! Notification protocol (both directions): with `VIRTIO_RING_F_EVENT_IDX` the driver writes
//! `used_event` before it sleeps and re-checks the used index after a full fence, and kicks only
//! when the device's `avail_event` asks for it; without it the driver honours
//! `VRING_USED_F_NO_NOTIFY`. So a backend that gets event-idx wrong shows up as a timeout here,
//! not as a test that happens to pass because the frontend kicks and polls regardless.
//!
//! Everything multi-byte in rings and requests is little-endian, as virtio 1.x requires; the
//! crate writes explicit `to_le_bytes` encodings and needs no `unsafe` for ring access.
//!
//! # Example: a request, then a malformed chain
//!
//! ```no_run
//! use std::time::Duration;
//! use vufront::*;
//!
//! # fn main() -> vufront::Result<()> {
//! let mut dev = Frontend::connect("/run/vzram/vz0.sock", &Options::default())?;
//! let mut q = dev.take_queue(0).unwrap();
//! q.write(8, &[0xab; 4096])?.check()?;
//! let split = Request::read(8, 4096).with_layout(Layout::split(3).indirect());
//! assert_eq!(q.execute(&split, Duration::from_secs(5))?.data, vec![0xab; 4096]);
//!
//! // Raw: a header whose chain loops back on itself, published by hand.
//! let mem = q.mem().clone();
//! let hdr = mem.alloc(16, 16)?;
//! hdr.write_at(0, &virtio_blk::VIRTIO_BLK_T_IN.to_le_bytes())?;
//! let data = mem.alloc(512, 16)?;
//! let ids = q.alloc_descs(2)?; // keep the high-level API off these indices
//! q.write_desc(ids[0], Desc::readable(hdr.gpa(), 16).then(ids[1]))?;
//! q.write_desc(ids[1], Desc::writable(data.gpa(), 512).then(ids[0]))?;
//! q.push_avail(&[ids[0]])?;
//! q.kick()?;
//! let used = q.wait_used(Duration::from_secs(1))?; // or Error::Timeout if it never answers
//! assert_eq!(used[0].len, 0);
//! # Ok(())
//! # }
//! ```

mod blk;
mod frontend;
mod mem;
mod queue;
mod virtio;

pub mod load;
#[cfg(feature = "ramdisk")]
pub mod ramdisk;

pub use blk::{Completion, Layout, Request, Segment, Split};
pub use frontend::{Frontend, Options};
pub use mem::{DEFAULT_GUEST_BASE, GuestBuf, GuestMem, RegionSpec};
pub use queue::{ChainSeg, Queue, RingCounters};
pub use virtio::*;
/// virtio_bindings' names of request types, statuses, feature and descriptor flags.
pub use virtio_bindings::{virtio_blk, virtio_config, virtio_ring};

use std::time::Duration;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected before the deadline.
    #[error("connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The last connect error.
        source: std::io::Error,
    },
    /// A vhost-user message failed (sent, answered with an error, or malformed reply).
    #[error("vhost-user {op}: {source}")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// The vhost crate's error.
        source: vhost::Error,
    },
    /// A vhost-user request got no reply within [`Options::reply_timeout`]; the connection
    /// was shut down.
    #[error("vhost-user {op}: no reply after {waited:?}")]
    NoReply {
        /// The request.
        op: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The backend does not offer something this frontend needs.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest-memory allocator has no free range of this size.
    #[error("guest memory exhausted: no free {0} bytes")]
    OutOfMemory(usize),
    /// Not enough free descriptors in the queue.
    #[error("queue {queue}: need {need} free descriptors, {free} free")]
    NoDescriptors {
        /// Queue index.
        queue: u16,
        /// Descriptors needed.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// Nothing arrived in the used ring in time.
    #[error("queue {queue}: nothing used after {waited:?}")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// How long the wait lasted.
        waited: Duration,
    },
    /// The backend broke the virtio protocol (used index jumped, unknown used id, ...).
    #[error("protocol violation by the backend: {0}")]
    Protocol(String),
    /// A request completed with a status other than OK (see [`Completion::check`]).
    #[error("request completed with status {status} (used len {used_len})")]
    Status {
        /// The status byte.
        status: u8,
        /// The used element's length.
        used_len: u32,
    },
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn vhost_err(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Vhost { op, source }
}
