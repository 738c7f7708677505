//! One vhost-user connection: the frontend's messages, checked against the spec, applied to
//! this connection's guest memory and virtqueues.
//!
//! The vhost crate's `BackendReqHandler` reads and frames the messages; everything they ask
//! for is decided here. The frontend (QEMU, cloud-hypervisor) is trusted less than the
//! daemon: a guest that escapes into it owns the socket. So every message is validated
//! before it changes anything, and whatever it sends costs at most this connection:
//!
//! - features and protocol features must be ones we offered; a frontend that acks protocol
//!   features we never offered is answered with an error and disconnected (the framing layer
//!   would otherwise route messages of those features to us);
//! - memory regions must be backed by a regular file at least as large as the region
//!   (fstat), may not overlap or wrap, and number at most [`MAX_MEM_SLOTS`]; a file shrunk
//!   later is caught by the SIGBUS guard ([`crate::fault`]) and ends the connection;
//! - kick, call and err fds must be eventfds, and are made non-blocking, so a worker never
//!   blocks on a notifier;
//! - ring sizes are powers of two up to the device's queue size, ring bases fit 16 bits,
//!   rings are aligned and lie in guest memory, and a started ring is not reconfigured;
//! - anything we do not implement (dirty logging, inflight tracking, device state, GPU,
//!   shared objects) is refused.
//!
//! A refused message gets an error reply when the frontend asked for one (REPLY_ACK), is
//! logged, and changes nothing: the frontend may go on. A message the framing layer finds
//! malformed, or one that expects an answer we cannot give (GET_VRING_BASE of no ring), ends
//! the connection. Nothing here blocks on the frontend except the socket itself.

use crate::blk::ConfigSpace;
use crate::device::BlkDevice;
use crate::fault;
use crate::ratelimit::RateLimitedLog;
use crate::vring::{VringShared, WorkerThread};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

/// Memory slots a frontend may add with ADD_MEM_REG (what GET_MAX_MEM_SLOTS answers; the
/// kernel's vhost and QEMU's libvhost-user allow the same).
pub const MAX_MEM_SLOTS: usize = 509;
/// Regions SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS; more go through
/// ADD_MEM_REG).
const MAX_TABLE_REGIONS: usize = 8;
/// The largest config space read or write vhost-user carries.
const MAX_CONFIG_SIZE: u32 = 256;

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The protocol features we offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// The virtio features we offer.
pub fn virtio_features(readonly: bool) -> u64 {
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
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// What the connection's queue workers share with it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub served: Arc<BlkDevice>,
    pub blk: ConfigSpace,
    /// How long a worker watches its ring after a batch.
    pub poll: Duration,
    pub mem: GuestMemory,
    /// The connection's socket, to cut it off from a worker.
    socket: UnixStream,
    failed: AtomicBool,
    /// Guest memory registered with the SIGBUS guard.
    mappings: Mutex<Mappings>,
    /// `fault::faults()` when this connection last looked.
    faults_seen: AtomicU64,
}

impl Shared {
    /// Ends the connection: its socket is shut down, so the message loop returns and the
    /// connection is torn down.
    pub fn fail(&self, why: &str) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!("{}: {why}; dropping the connection", self.served.name);
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// True (and the connection failed) if an access to this connection's guest memory
    /// faulted since the last look. One atomic load when nothing faulted anywhere.
    pub fn memory_faulted(&self) -> bool {
        let now = fault::faults();
        if self.faults_seen.load(Ordering::Acquire) == now {
            return self.failed();
        }
        self.faults_seen.store(now, Ordering::Release);
        let faulted = self
            .mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .faulted();
        if faulted {
            self.fail("the frontend truncated guest memory under a request");
        }
        faulted || self.failed()
    }
}

/// Guest memory snapshots registered with the SIGBUS guard. The newest is in use; older
/// ones stay registered (and mapped, since we hold them) until no worker holds them.
#[derive(Debug, Default)]
struct Mappings {
    snapshots: Vec<Snapshot>,
}

#[derive(Debug)]
struct Snapshot {
    /// Declared first: unregistered before the mapping can go away.
    reg: fault::Registration,
    mem: Arc<GuestMemoryMmap<()>>,
}

impl Mappings {
    fn faulted(&self) -> bool {
        self.snapshots.iter().any(|s| s.reg.faulted())
    }

    /// Adds the newest snapshot and drops the registrations of older ones nobody else holds
    /// any more (a worker in the middle of a batch may still use the previous one).
    fn push(&mut self, mem: Arc<GuestMemoryMmap<()>>, reg: fault::Registration) {
        self.snapshots.push(Snapshot { reg, mem });
        let newest = self.snapshots.len() - 1;
        let mut i = 0;
        self.snapshots.retain(|s| {
            let keep = i == newest || Arc::strong_count(&s.mem) > 1;
            i += 1;
            keep
        });
    }
}

/// Where a region came from, to translate the frontend's addresses and find it again.
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    gpa: u64,
    size: u64,
    user_addr: u64,
}

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Connection {
    shared: Arc<Shared>,
    owned: bool,
    acked_features: u64,
    regions: Vec<RegionInfo>,
    vrings: Vec<Arc<VringShared>>,
    /// A worker per queue that was ever started on this connection.
    workers: Vec<Option<WorkerThread>>,
    /// Answer the current message, then end the connection.
    closing: bool,
    /// The current message was refused (its error reply, if any, is sent).
    refused: std::cell::Cell<bool>,
    log: Mutex<RateLimitedLog>,
}

/// Whether `file` is an eventfd (the only notifier vhost-user defines).
fn is_eventfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

/// Checks a notifier fd and makes it non-blocking.
fn notifier(file: File) -> VuResult<File> {
    if !is_eventfd(&file) {
        return Err(VuError::InvalidParam);
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    let ok = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(VuError::ReqHandlerError(io::Error::last_os_error()));
    }
    Ok(file)
}

impl Connection {
    pub fn new(
        served: Arc<BlkDevice>,
        blk: ConfigSpace,
        poll: Duration,
        socket: UnixStream,
    ) -> io::Result<Connection> {
        let vrings = (0..usize::from(blk.num_queues))
            .map(|q| VringShared::new(q, blk.queue_size).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let workers = vrings.iter().map(|_| None).collect();
        Ok(Connection {
            shared: Arc::new(Shared {
                served,
                blk,
                poll,
                mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                socket,
                failed: AtomicBool::new(false),
                mappings: Mutex::new(Mappings::default()),
                faults_seen: AtomicU64::new(fault::faults()),
            }),
            owned: false,
            acked_features: 0,
            regions: Vec::new(),
            vrings,
            workers,
            closing: false,
            refused: std::cell::Cell::new(false),
            log: Mutex::new(RateLimitedLog::new()),
        })
    }

    /// A refusal: logged (rate limited), answered with an error when the frontend asked for
    /// a reply.
    fn refuse(&self, why: &'static str) -> VuError {
        let name = &self.shared.served.name;
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warn(format_args!("{name}: refused a vhost-user message: {why}"));
        self.refused.set(true);
        VuError::InvalidOperation(why)
    }

    /// Whether the message just handled was refused by us (rather than found malformed by
    /// the framing layer); resets the mark.
    pub fn take_refused(&self) -> bool {
        self.refused.replace(false)
    }

    fn notifier(&self, file: File) -> VuResult<File> {
        notifier(file).map_err(|e| match e {
            VuError::InvalidParam => self.refuse("a kick, call or err fd must be an eventfd"),
            e => e,
        })
    }

    /// True once the connection must end (after the reply to the current message).
    pub fn closing(&self) -> bool {
        self.closing || self.shared.failed()
    }

    fn vring(&self, index: u32) -> VuResult<&Arc<VringShared>> {
        self.vrings
            .get(index as usize)
            .ok_or_else(|| self.refuse("vring index out of range"))
    }

    /// A vring that may be configured: it exists and is not running.
    fn stopped_vring(&self, index: u32) -> VuResult<&Arc<VringShared>> {
        let vring = self.vring(index)?;
        if vring.ring.lock().started {
            return Err(self.refuse("the ring is running; stop it first (GET_VRING_BASE)"));
        }
        Ok(vring)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| va - r.user_addr + r.gpa)
            .ok_or_else(|| self.refuse("ring address outside guest memory"))
    }

    /// Maps one region after checking it against its file.
    fn map_region(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> VuResult<Arc<GuestRegionMmap>> {
        let meta = file.metadata().map_err(VuError::ReqHandlerError)?;
        if !meta.file_type().is_file() {
            return Err(self.refuse("guest memory must be a regular file (memfd, shm, hugetlbfs)"));
        }
        let end = region
            .mmap_offset
            .checked_add(region.memory_size)
            .ok_or_else(|| self.refuse("memory region overflows"))?;
        if region.memory_size == 0
            || region
                .guest_phys_addr
                .checked_add(region.memory_size)
                .is_none()
            || region.user_addr.checked_add(region.memory_size).is_none()
        {
            return Err(self.refuse("memory region empty or overflowing"));
        }
        if end > meta.len() {
            // Touching the part past the end of the file would raise SIGBUS.
            return Err(self.refuse("memory region larger than its file"));
        }
        let mmap = region.mmap_region::<()>(file)?;
        GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
            .map(Arc::new)
            .ok_or_else(|| self.refuse("memory region overflows the guest address space"))
    }

    /// Publishes a new guest memory layout to the workers: registered with the SIGBUS guard
    /// before any worker can touch it.
    fn publish(&mut self, mem: GuestMemoryMmap<()>, info: Vec<RegionInfo>) -> VuResult<()> {
        for (i, a) in info.iter().enumerate() {
            for b in &info[..i] {
                if a.user_addr < b.user_addr + b.size && b.user_addr < a.user_addr + a.size {
                    return Err(
                        self.refuse("memory regions overlap in the frontend's address space")
                    );
                }
            }
        }
        let reg =
            fault::Registration::new(mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)))
                .map_err(|e| VuError::ReqHandlerError(io::Error::other(e)))?;
        self.shared
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        // Only this thread replaces the memory, so this is the snapshot just stored.
        let snapshot = self.shared.mem.memory().into_inner();
        self.shared
            .mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(snapshot, reg);
        self.regions = info;
        Ok(())
    }

    /// Stops a ring: waits for the request its worker is serving, then marks it stopped.
    /// Returns the next available index.
    fn stop_ring(&self, vring: &VringShared) -> u16 {
        let mut ring = vring.ring.lock();
        ring.started = false;
        ring.broken = false;
        ring.kick = None;
        ring.queue.set_ready(false);
        let next = ring.queue.next_avail();
        drop(ring);
        vring.wake();
        next
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(self.refuse("the connection already has an owner"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        // Deprecated by the spec; QEMU never sends it. Treat it as a device reset.
        self.reset_device()?;
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for vring in &self.vrings {
            self.stop_ring(vring);
            vring.ring.lock().enabled = false;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(virtio_features(self.shared.served.readonly))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !virtio_features(self.shared.served.readonly) != 0 {
            return Err(self.refuse("features acked that were not offered"));
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
        let enable = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for vring in &self.vrings {
            let mut ring = vring.ring.lock();
            ring.queue.set_event_idx(event_idx);
            if enable {
                ring.enabled = true;
            }
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            // The framing layer records the features whatever we answer, and would route
            // messages of the unoffered ones to us: end the connection after the reply.
            self.closing = true;
            return Err(self.refuse("protocol features acked that were not offered"));
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            return Err(self.refuse("postcopy is not supported"));
        }
        if ctx.len() > MAX_TABLE_REGIONS {
            return Err(self.refuse("more than 8 regions in SET_MEM_TABLE"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut info = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            regions.push(self.map_region(region, file)?);
            info.push(RegionInfo {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
                user_addr: region.user_addr,
            });
        }
        regions.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|_| self.refuse("memory regions overlap or none given"))?;
        self.publish(mem, info)?;
        Ok(None)
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening == Some(true) {
            return Err(self.refuse("postcopy is not supported"));
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(self.refuse("no free memory slot (GET_MAX_MEM_SLOTS)"));
        }
        let mapped = self.map_region(region, fd)?;
        let current = self.shared.mem.memory();
        let mem = if current.num_regions() == 0 {
            GuestMemoryMmap::from_arc_regions(vec![mapped])
        } else {
            current.insert_region(mapped)
        }
        .map_err(|_| self.refuse("memory region overlaps another"))?;
        drop(current);
        let mut info = self.regions.clone();
        info.push(RegionInfo {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            user_addr: region.user_addr,
        });
        self.publish(mem, info)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let Some(at) = self
            .regions
            .iter()
            .position(|r| r.gpa == region.guest_phys_addr && r.size == region.memory_size)
        else {
            return Err(self.refuse("no such memory region"));
        };
        let (mem, _) = self
            .shared
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|_| self.refuse("no such memory region"))?;
        let mut info = self.regions.clone();
        info.remove(at);
        self.publish(mem, info)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.shared.blk.queue_size);
        if !num.is_power_of_two() || num > max {
            return Err(self.refuse("ring size must be a power of two up to the queue size"));
        }
        let vring = self.stopped_vring(index)?;
        vring.ring.lock().queue.set_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(self.refuse("dirty logging is not supported"));
        }
        let vring = self.stopped_vring(index)?;
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(self.refuse("misaligned ring"));
        }
        let mut ring = vring.ring.lock();
        let size = u64::from(ring.queue.size());
        let mem = self.shared.mem.memory();
        let fits = |addr: u64, len: u64| {
            GuestMemoryBackend::check_range(&*mem, GuestAddress(addr), len as usize)
        };
        if !fits(desc, 16 * size) || !fits(avail, 6 + 2 * size) || !fits(used, 6 + 8 * size) {
            return Err(self.refuse("ring outside guest memory"));
        }
        let q = &mut ring.queue;
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        // Split rings: the next available index, a free-running 16-bit counter.
        let base = u16::try_from(base).map_err(|_| self.refuse("ring base beyond 16 bits"))?;
        let vring = self.stopped_vring(index)?;
        let mut ring = vring.ring.lock();
        ring.queue.set_next_avail(base);
        // Every request is completed in order before a ring stops, so used == avail here.
        ring.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        // The frontend waits for a ring state; an error cannot be answered, so the connection
        // ends.
        if index as usize >= self.vrings.len() {
            self.closing = true;
        }
        let vring = self.vring(index)?;
        let next = self.stop_ring(vring);
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        let fd =
            fd.ok_or_else(|| self.refuse("a ring without a kick fd (polling) is not supported"))?;
        let kick = Arc::new(self.notifier(fd)?);
        {
            let mut ring = vring.ring.lock();
            if ring.started {
                // A new kick fd for a running ring: just swap it.
                ring.kick = Some(kick);
            } else {
                ring.queue.set_ready(true);
                if !ring.queue.is_valid(&*self.shared.mem.memory()) {
                    ring.queue.set_ready(false);
                    return Err(self.refuse("ring addresses not set or outside guest memory"));
                }
                ring.kick = Some(kick);
                ring.started = true;
                ring.broken = false;
                ring.announce = true;
                if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                    ring.enabled = true;
                }
            }
        }
        let slot = &mut self.workers[usize::from(index)];
        if slot.is_none() {
            *slot = Some(
                WorkerThread::spawn(vring.clone(), self.shared.clone())
                    .map_err(VuError::ReqHandlerError)?,
            );
        }
        // Requests made available before the kick fd arrived get served now.
        vring.wake();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let vring = self.vring(u32::from(index))?;
        let call = fd.map(|f| self.notifier(f)).transpose()?;
        vring.ring.lock().call = call;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let vring = self.vring(u32::from(index))?;
        let err = fd.map(|f| self.notifier(f)).transpose()?;
        vring.ring.lock().err = err;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.shared.blk.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let vring = self.vring(index)?;
        vring.ring.lock().enabled = enable;
        vring.wake();
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Bytes past the fields we fill read as zero, as for any virtio-blk config field of a
        // feature not offered (QEMU versions differ in how much they read).
        let end = offset.checked_add(size).filter(|&e| e <= MAX_CONFIG_SIZE);
        let Some(end) = end else {
            return Err(self.refuse("config read beyond the config space"));
        };
        let config = self.shared.blk.to_bytes();
        let mut out = vec![0u8; size as usize];
        for (i, b) in (offset as usize..end as usize).zip(out.iter_mut()) {
            *b = config.get(i).copied().unwrap_or(0);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Nothing in virtio-blk's config space is writable without CONFIG_WCE (not offered).
        Err(self.refuse("the config space is read-only"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // Reachable only with BACKEND_REQ acked, which ends the connection (never offered).
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(self.refuse("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(self.refuse("shared objects are not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        Err(self.refuse("inflight tracking is not offered"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(self.refuse("inflight tracking is not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(self.refuse("device state transfer is not offered"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(self.refuse("device state transfer is not offered"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(self.refuse("shared memory regions are not offered"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        // Unreachable without LOG_SHMFD acked (which ends the connection); no reply exists.
        self.closing = true;
        Err(self.refuse("dirty logging is not offered"))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Workers first: they may be using guest memory, which goes after them.
        self.workers.clear();
    }
}
