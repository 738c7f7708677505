//! The vhost-user-blk backend of one connection: feature negotiation, config space and one
//! worker thread per virtqueue. A new backend is made for every connection; the device
//! (`Served`) it serves outlives them all.

use crate::blk::{BlkGeometry, Worker};
use crate::served::Served;
use parking_lot::{Mutex, RwLock};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, Ordering::Relaxed};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
pub type Vring = VringRwLock<GuestMemory>;

#[derive(Debug)]
pub struct BlkBackend {
    served: Arc<Served>,
    blk: BlkGeometry,
    /// One per queue; only that queue's worker thread locks it, so it is never contended.
    workers: Vec<Mutex<Worker>>,
    mem: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    /// A queue whose ring is corrupt (avail index far ahead, head out of range, ring memory
    /// unreadable) is not served again until the frontend stops it (GET_VRING_BASE) or resets
    /// the device.
    broken: Vec<AtomicBool>,
    /// How long a worker watches its ring for more requests before it sleeps.
    poll: Duration,
}

impl BlkBackend {
    pub fn new(served: Arc<Served>, blk: BlkGeometry, poll: Duration) -> BlkBackend {
        let workers = (0..usize::from(blk.num_queues))
            .map(|q| Mutex::new(Worker::new(served.clone(), q, blk.clone())))
            .collect();
        BlkBackend {
            broken: (0..blk.num_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            served,
            blk,
            workers,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            poll,
        }
    }

    fn mark_broken(&self, q: usize, why: &dyn std::fmt::Display) {
        if !self.broken[q].swap(true, Relaxed) {
            log::error!(
                "{} queue {q}: broken ring ({why}); queue stopped until the guest resets it",
                self.served.name
            );
        }
    }

    /// Serves every available chain of queue `q`, then re-arms notifications. Problems with
    /// the ring mark the queue broken rather than return an error: an error would end the
    /// queue's worker thread for good, with no way back short of a reconnect.
    fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        if self.broken[q].load(Relaxed) {
            return Ok(());
        }
        let Some(mem) = self.mem.read().clone() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Relaxed);
        let mut worker = self.workers[q].lock();
        // The vring stays locked while requests run: GET_VRING_BASE (which needs the lock)
        // therefore answers only after the requests in flight have completed.
        let mut state = vring.get_mut();
        loop {
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    self.mark_broken(q, &e);
                    return Ok(());
                }
            }
            let mut completed = 0;
            loop {
                let queue = state.get_queue_mut();
                if !queue.ready() {
                    return Ok(());
                }
                let size = queue.size();
                let chain = match queue.iter(mem.memory()) {
                    Ok(mut avail) => avail.next(),
                    Err(virtio_queue::Error::QueueNotReady) => return Ok(()),
                    Err(e) => {
                        self.mark_broken(q, &e);
                        return Ok(());
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if head >= size {
                    self.mark_broken(q, &format_args!("head index {head} >= queue size {size}"));
                    return Ok(());
                }
                let len = worker.process(chain);
                if let Err(e) = state.add_used(head, len) {
                    self.mark_broken(q, &e);
                    return Ok(());
                }
                completed += 1;
            }
            let notify = match completed {
                0 => Ok(false),
                _ => state.needs_notification(),
            };
            let notify = match notify {
                Ok(n) => n,
                Err(e) => {
                    self.mark_broken(q, &e);
                    return Ok(());
                }
            };
            if notify {
                // The call eventfd's counter cannot overflow in practice; if writing it fails
                // anyway, the guest still finds the completions on its next interrupt.
                if let Err(e) = state.signal_used_queue() {
                    log::warn!(
                        "{} queue {q}: cannot signal the guest: {e}",
                        self.served.name
                    );
                }
            }
            // A guest with requests in flight usually sends the next one within microseconds;
            // watching the ring a little saves the kick and the wake-up on both sides (what
            // QEMU's adaptive polling does). Only after a batch that had work.
            if completed > 0 && self.poll.as_nanos() > 0 && self.poll_ring(&state, &mem) {
                continue;
            }
            // With EVENT_IDX, a chain made available after the drain but before notifications
            // were re-enabled would get no kick: enable_notification reports it, go again.
            match state.enable_notification() {
                _ if !event_idx => return Ok(()),
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => {
                    self.mark_broken(q, &e);
                    return Ok(());
                }
            }
        }
    }
}

impl BlkBackend {
    /// Spins up to `self.poll` for the driver to make a chain available; true if it did.
    fn poll_ring(&self, state: &VringState<GuestMemory>, mem: &GuestMemory) -> bool {
        let queue = state.get_queue();
        let guest = mem.memory();
        let until = Instant::now() + self.poll;
        loop {
            match queue.avail_idx(&*guest, Ordering::Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.blk.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.blk.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            // Without it QEMU never negotiates protocol features, and so never asks for the
            // config space.
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.served.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        for b in &self.broken {
            b.store(false, Relaxed);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past the fields we fill read as zero, as for any virtio-blk config field of a
        // feature not offered; a request beyond the config page gets nothing.
        let config = self.blk.config_space();
        let (offset, size) = (offset as usize, size as usize);
        if offset.saturating_add(size) > 4096 {
            return Vec::new();
        }
        let mut out = vec![0u8; size];
        if offset < config.len() {
            let n = (config.len() - offset).min(size);
            out[..n].copy_from_slice(&config[offset..offset + n]);
        }
        out
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        *self.mem.write() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.blk.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The library keeps the notifier and fires it when the connection's handler is
        // dropped, which ends the worker threads of this connection.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Requests in flight already finished: the worker holds the vring lock while serving,
        // and the library took that lock to mark the queue not ready before calling us.
        if let Some(b) = self.broken.get(queue_index as usize) {
            b.store(false, Relaxed);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread: the thread index is the queue index, and the thread's only
        // vring is event 0.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("unknown event {device_event}")))?;
        if thread_id >= self.workers.len() {
            return Err(io::Error::other(format!(
                "unknown worker thread {thread_id}"
            )));
        }
        self.process_queue(thread_id, vring)
    }
}
