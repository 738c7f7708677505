//! A virtio-blk device as the daemon serves it: the `zram::Device` that holds its data, plus
//! what the vhost side adds (name, socket, serial, per-queue request counters, connection
//! state). Shared (by `Arc`) between the vhost-user workers and the control plane; it outlives
//! connections.

use crate::counters::RequestCounters;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

#[derive(Debug)]
pub struct BlkDevice {
    /// The device's name in statistics and control commands ("vz0", or `name=` of --device).
    pub name: String,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The store's device: the data, and zram's statistics.
    pub zram: Arc<zram::Device>,
    /// One entry per virtqueue the device offers.
    pub queues: Box<[RequestCounters]>,
    pub readonly: bool,
    /// The serial number GET_ID returns (at most 20 bytes).
    pub serial: String,
    /// True while a frontend is connected.
    pub connected: AtomicBool,
    /// Number of vhost-user connections accepted so far.
    pub connections: AtomicU64,
}

impl BlkDevice {
    pub fn new(
        name: String,
        socket: PathBuf,
        zram: Arc<zram::Device>,
        num_queues: usize,
        readonly: bool,
        serial: String,
    ) -> Arc<BlkDevice> {
        Arc::new(BlkDevice {
            name,
            socket,
            zram,
            queues: (0..num_queues)
                .map(|_| RequestCounters::default())
                .collect(),
            readonly,
            serial,
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        })
    }
}
