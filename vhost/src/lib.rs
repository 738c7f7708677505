//! vzram: a vhost-user-blk daemon that serves compressed-RAM swap disks to virtual machines.
//!
//! The store (`zram`) outlives vhost-user connections; this crate adds the vhost-user side,
//! virtio-blk requests, the daemon's lifecycle and its control plane. Read it in this order:
//!
//! 1. `main.rs`: `vzram serve` builds the store and devices from the arguments ([`config`]),
//!    claims every socket ([`sockets`]), starts the control plane ([`control`]) and one
//!    [`daemon::DeviceServer`] per device; the other subcommands are the client ([`client`]).
//! 2. [`daemon`]: a device's accept loop, one connection at a time.
//! 3. `connection`: one vhost-user connection. The vhost crate frames the frontend's
//!    messages; each is checked here and applied to the connection's guest memory and
//!    virtqueues. `fault` keeps a frontend that truncates guest memory from crashing us.
//! 4. `vring`: a virtqueue's worker thread pops chains and completes them in order.
//! 5. `request`: a chain becomes a typed request, every check made; [`blk`] runs it against
//!    the `zram::Device` ([`device::BlkDevice`] is the device as the daemon serves it) and
//!    writes the status.
//!
//! A request thus travels socket → kick eventfd → `vring` worker → `request::Parser` →
//! `blk::RequestHandler` → `zram::Device::{read_page, write_page, ...}` → used ring → call eventfd.
//! What a frontend can and cannot do to the daemon is in docs/daemon.md.

pub mod blk;
pub mod client;
pub mod config;
mod connection;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod device;
mod fault;
mod ratelimit;
mod request;
pub mod sockets;
mod table;
mod vring;
