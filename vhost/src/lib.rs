//! vzram: a vhost-user-blk daemon that serves compressed-RAM swap disks to virtual machines.
//!
//! The store (the `zram` crate: a [`zram::Store`] and one [`zram::Device`] per disk) is the
//! daemon's only interface to storage and outlives vhost-user connections. This crate adds the
//! vhost-user side, virtio-blk requests, the daemon's lifecycle and its control plane.
//!
//! # The way a request travels
//!
//! ```text
//! main.rs ─ vzram serve: config::Config ─build─▶ zram::Store + one BlkDevice per disk
//!    │                   sockets (claim), control::Server (start)
//!    └─▶ daemon::DeviceServer      one per device: accepts a frontend, one at a time
//!          └─▶ connection          one vhost-user connection: messages checked, then applied
//!                │                 to its guest memory and virtqueues (fault: SIGBUS guard)
//!                └─▶ vring         one worker thread per queue: kick ─▶ pop chain ─▶ used ring
//!                      └─▶ blk::RequestHandler::process(chain)
//!                            ├─▶ request::Parser   chain ─▶ typed Request, every check made
//!                            └─▶ blk (execute)     ─▶ zram::Device::{read_page, write_page,
//!                                                     discard, write_zeroes} ─▶ status byte
//! ```
//!
//! Where to change what:
//!
//! | to change | read |
//! |---|---|
//! | a `vzram serve` flag or `--device` key, a default, start-up checks | [`config`], then `main.rs` |
//! | what the device offers the guest (features, config space) | `connection` (`virtio_features`), [`ConfigSpace`] |
//! | a vhost-user message | `connection` |
//! | queue workers, polling, notification | `vring` |
//! | what makes a chain valid, a new request type | `request` (parse), `blk` (execute) |
//! | per-queue request counters | `counters` ([`RequestCounters`]), shown by `stat` |
//! | the served device (name, socket, serial) | `device` ([`BlkDevice`]) |
//! | a control command | [`control::proto`] (one type per command) and [`client`] |
//! | the `vzram stat` table, its Prometheus form | `table`, `prometheus` |
//! | the tiering policy's thread, its settings over the socket | `control/policy.rs`, [`control::PolicyKnobs`]; its decisions: `zram::policy` |
//! | systemd socket activation and readiness | [`systemd`] |
//! | storage: pages, compression, limits and budgets, direct reclaim, idle, recompression, writeback | the `zram` crate |
//!
//! Public are what `main.rs`, `vzram-bench` and the integration tests drive: the serve
//! configuration, the client, the control plane, the socket claims, and the device server with
//! what it needs. Everything else is this crate's own. What a frontend can and cannot do to the
//! daemon is in docs/daemon.md.

pub mod client;
pub mod config;
pub mod control;
pub mod sockets;
pub mod systemd;

mod blk;
mod connection;
mod counters;
mod daemon;
mod device;
mod fault;
mod prometheus;
mod ratelimit;
mod request;
mod table;
mod vring;

pub use blk::{ConfigSpace, PAGE_SIZE, RequestHandler};
pub use counters::{RequestCounters, RequestStats};
pub use daemon::{DEFAULT_POLL, DaemonError, DeviceServer};
pub use device::BlkDevice;
