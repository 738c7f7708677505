//! One device as the daemon serves it: the store-side device plus what the vhost side adds.
//! Shared (by `Arc`) between the vhost-user workers and the control plane.

use crate::counters::QueueCounters;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

#[derive(Debug)]
pub struct Served {
    /// The device's name in statistics and control commands ("vz0", or `name=` of --device).
    pub name: String,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    pub device: Arc<zram::Device>,
    /// One entry per virtqueue the device offers.
    pub queues: Box<[QueueCounters]>,
    pub readonly: bool,
    /// The serial number GET_ID returns (at most 20 bytes).
    pub serial: String,
    /// True while a frontend is connected.
    pub connected: AtomicBool,
    /// Number of vhost-user connections accepted so far.
    pub connections: AtomicU64,
}

impl Served {
    pub fn new(
        name: String,
        socket: PathBuf,
        device: Arc<zram::Device>,
        num_queues: usize,
        readonly: bool,
        serial: String,
    ) -> Arc<Served> {
        Arc::new(Served {
            name,
            socket,
            device,
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
            readonly,
            serial,
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        })
    }
}
