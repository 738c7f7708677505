//! vzram: a vhost-user-blk daemon that serves compressed-RAM swap disks to virtual machines.
//!
//! The store (`zram`) outlives vhost-user connections; this crate adds virtio-blk request
//! handling, the vhost-user backend, the daemon lifecycle, and the control plane.

pub mod blk;
pub mod cli;
pub mod client;
pub mod connection;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod fault;
pub mod ratelimit;
pub mod request;
pub mod served;
pub mod sockets;
pub mod table;
pub mod vring;
