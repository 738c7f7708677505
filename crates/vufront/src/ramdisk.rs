//! A small in-memory vhost-user-blk backend (feature `ramdisk`).
//!
//! It is the test fixture of this crate and, as the `ramdisk` example, an uncompressed
//! baseline for `vzram-bench`: one worker thread per queue like vzram, but a plain memcpy
//! where vzram compresses. It is built on rust-vmm's vhost-user-backend, which trusts the
//! frontend more than vzram's own message handler does; that is fine for a test fixture.
//!
//! Its chain rules are its own, not vzram's `request::Parser` (which also fails a malformed chain
//! with S_IOERR when it has a status byte): it is the independent backend vufront is tested on.
//!
//! It serves IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES and treats the guest as
//! untrusted: a chain that the descriptor iterator cut short (a `next` out of range, a loop, an
//! unreadable indirect table), with readable descriptors after writable ones, or without a
//! writable byte for the status is "malformed": it is completed with used length 0 and no
//! status written, since there is nowhere to report an error. Otherwise every header, length,
//! sector range and guest address is checked before any byte moves, and a bad request gets
//! IOERR (or UNSUPP for unknown types and flags).
//!
//! The store (an anonymous `MAP_NORESERVE` mapping, so untouched sectors cost nothing)
//! outlives connections: [`Ramdisk::serve`] accepts one frontend after another on the same
//! listening socket, with a new `VhostUserDaemon` and new worker exit events per connection.

use crate::virtio::*;
use crate::{Error, Result};
use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::Listener;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, MmapRegion, VolatileMemory, VolatileSlice,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use zram::SECTOR_SIZE;

/// What the ramdisk offers.
#[derive(Clone, Debug)]
pub struct RamdiskConfig {
    /// Size in bytes (a multiple of 512).
    pub capacity: u64,
    /// Queues offered (one worker thread each).
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub max_queue_size: u16,
    /// GET_ID answer (at most 20 bytes used).
    pub serial: String,
    /// Offer VIRTIO_BLK_F_RO and fail writes.
    pub readonly: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Offer VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect: bool,
}

impl Default for RamdiskConfig {
    fn default() -> Self {
        RamdiskConfig {
            capacity: 64 << 20,
            num_queues: 2,
            max_queue_size: 1024,
            serial: "vufront-ramdisk".into(),
            readonly: false,
            event_idx: true,
            indirect: true,
        }
    }
}

/// Maximum segments per discard / write-zeroes request.
pub const MAX_SEGMENTS: u32 = 32;

/// What the ramdisk has seen, over all connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RamdiskStats {
    /// Chains taken off avail rings.
    pub requests: u64,
    /// Completed with status OK.
    pub ok: u64,
    /// Completed with IOERR.
    pub ioerr: u64,
    /// Completed with UNSUPP.
    pub unsupp: u64,
    /// Completed with used length 0 and no status (malformed chain).
    pub malformed: u64,
    /// Heads out of range: not completed at all (there is no valid used entry for them).
    pub bad_heads: u64,
    /// Avail rings whose index ran more than a ring ahead: the queue stops being served.
    pub broken_rings: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    ioerr: AtomicU64,
    unsupp: AtomicU64,
    malformed: AtomicU64,
    bad_heads: AtomicU64,
    broken_rings: AtomicU64,
}

struct Disk {
    data: MmapRegion<()>,
    cfg: RamdiskConfig,
    counters: Counters,
}

/// The in-memory disk; serve it with [`Ramdisk::serve`].
#[derive(Clone)]
pub struct Ramdisk {
    disk: Arc<Disk>,
}

impl fmt::Debug for Ramdisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ramdisk")
            .field("cfg", &self.disk.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Ramdisk {
    /// A zero-filled disk.
    pub fn new(cfg: RamdiskConfig) -> Result<Ramdisk> {
        if cfg.capacity == 0 || cfg.capacity % SECTOR_SIZE != 0 {
            return Err(Error::Invalid(format!(
                "ramdisk capacity {} must be a non-zero multiple of 512",
                cfg.capacity
            )));
        }
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(Error::Invalid("ramdisk needs 1..=64 queues".into()));
        }
        let data = MmapRegion::new(cfg.capacity as usize)
            .map_err(|e| Error::Memory(format!("ramdisk of {} bytes: {e}", cfg.capacity)))?;
        Ok(Ramdisk {
            disk: Arc::new(Disk {
                data,
                cfg,
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RamdiskConfig {
        &self.disk.cfg
    }

    /// The virtio-blk config space the backend returns.
    pub fn blk_config(&self) -> BlkConfig {
        self.disk.blk_config()
    }

    /// Counters so far.
    pub fn stats(&self) -> RamdiskStats {
        let c = &self.disk.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RamdiskStats {
            requests: l(&c.requests),
            ok: l(&c.ok),
            ioerr: l(&c.ioerr),
            unsupp: l(&c.unsupp),
            malformed: l(&c.malformed),
            bad_heads: l(&c.bad_heads),
            broken_rings: l(&c.broken_rings),
        }
    }

    /// Reads the store directly (for tests).
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let s = self.disk.slice(offset, out.len())?;
        s.copy_to(out);
        Ok(())
    }

    /// Writes the store directly (for tests).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let s = self.disk.slice(offset, data.len())?;
        s.copy_from(data);
        Ok(())
    }

    /// Listens on `path` (replacing a stale socket file) and serves one frontend after another
    /// on a background thread until [`RamdiskServer::stop`]. The socket exists when this returns.
    pub fn serve(&self, path: impl AsRef<Path>) -> Result<RamdiskServer> {
        let path = path.as_ref().to_path_buf();
        let mut listener = Listener::new(&path, true).map_err(|e| {
            Error::Io(io::Error::other(format!(
                "listen on {}: {e}",
                path.display()
            )))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
        let connections = Arc::new(AtomicU64::new(0));
        let disk = Arc::clone(&self.disk);
        let (stop2, current2, connections2) = (stop.clone(), current.clone(), connections.clone());
        let thread = std::thread::Builder::new()
            .name("ramdisk-accept".into())
            .spawn(move || {
                serve_loop(disk, &mut listener, &stop2, &current2, &connections2);
            })?;
        Ok(RamdiskServer {
            path,
            stop,
            current,
            connections,
            thread: Some(thread),
        })
    }
}

fn serve_loop(
    disk: Arc<Disk>,
    listener: &mut Listener,
    stop: &AtomicBool,
    current: &Mutex<Option<ShutdownHandle>>,
    connections: &AtomicU64,
) {
    while !stop.load(Ordering::Acquire) {
        let conn = Arc::new(Conn {
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            exits: Mutex::default(),
        });
        let backend = Backend {
            disk: Arc::clone(&disk),
            conn: Arc::clone(&conn),
        };
        let mut daemon = match VhostUserDaemon::new("ramdisk".into(), backend, conn.mem.clone()) {
            Ok(d) => d,
            Err(e) => {
                log::error!("ramdisk: cannot create daemon: {e}");
                return;
            }
        };
        let started = daemon.start(listener);
        if let Err(e) = &started {
            log::error!("ramdisk: accept failed: {e}");
        }
        if started.is_ok() && !stop.load(Ordering::Acquire) {
            connections.fetch_add(1, Ordering::Relaxed);
            *current.lock().unwrap() = daemon.shutdown_handle();
            if let Err(e) = daemon.wait() {
                log::debug!("ramdisk: connection ended: {e}");
            }
            *current.lock().unwrap() = None;
        }
        // The workers of this connection exit; the next connection gets new ones.
        for n in conn.exits.lock().unwrap().drain(..) {
            let _ = n.notify();
        }
        if started.is_err() {
            return;
        }
    }
}

/// A running ramdisk server; stops when dropped.
pub struct RamdiskServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    connections: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for RamdiskServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamdiskServer")
            .field("path", &self.path)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl RamdiskServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Frontends accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Drops the current frontend's connection from the backend side (as a crashing daemon
    /// would); the server keeps accepting.
    pub fn kick_out(&self) {
        if let Some(h) = self.current.lock().unwrap().as_ref() {
            h.shutdown();
        }
    }

    /// Stops serving: closes the current connection and the listener.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        self.kick_out();
        // Wake a blocking accept(); the loop sees `stop` and leaves.
        let _ = UnixStream::connect(&self.path);
        let _ = thread.join();
    }
}

impl Drop for RamdiskServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Conn {
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    exits: Mutex<Vec<EventNotifier>>,
}

#[derive(Clone)]
struct Backend {
    disk: Arc<Disk>,
    conn: Arc<Conn>,
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.disk.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.disk.cfg.max_queue_size as usize
    }

    fn features(&self) -> u64 {
        let c = &self.disk.cfg;
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        if c.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if c.event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if c.indirect {
            f |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (set on SET_FEATURES).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let full = self.disk.blk_config().to_bytes();
        (offset..offset.saturating_add(size))
            .map(|i| full.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        // The handler replaced the memory inside the atomic this backend already holds.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.disk.cfg.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.conn
            .exits
            .lock()
            .unwrap()
            .push(notifier.try_clone().ok()?);
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here ends the worker thread for good, so only a missing vring is one.
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("no vring for event {device_event}")))?;
        self.process(vring)
    }
}

impl Backend {
    /// Serves everything on the avail ring, with the usual disable / drain / re-enable loop so
    /// that a request published while notifications were off is not left behind.
    fn process(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.conn.mem.memory();
        let m: &GuestMemoryMmap<()> = &mem;
        let c = &self.disk.counters;
        let mut state = vring.get_mut();
        let size = state.get_queue().size();
        loop {
            state.disable_notification().map_err(io::Error::other)?;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(m) {
                let head = chain.head_index();
                c.requests.fetch_add(1, Ordering::Relaxed);
                let used_len = self.disk.handle(m, chain);
                if head >= size {
                    // No used entry can name it; QEMU would mark the device broken.
                    log::warn!("ramdisk: avail ring names head {head} of a {size}-entry queue");
                    c.bad_heads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                state.add_used(head, used_len).map_err(io::Error::other)?;
            }
            // pop_descriptor_chain also says None when avail->idx ran more than a ring ahead;
            // enable_notification would then report pending work forever.
            let avail = state
                .get_queue()
                .avail_idx(m, Ordering::Acquire)
                .map_err(io::Error::other)?;
            let pending = avail.0.wrapping_sub(state.get_queue().next_avail());
            if pending > size {
                log::error!(
                    "ramdisk: avail idx {} is {pending} ahead; queue stopped",
                    avail.0
                );
                c.broken_rings.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if !state.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        if state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

/// A guest buffer list: (address, length), zero-length entries dropped.
type Sg = Vec<(GuestAddress, usize)>;

impl Disk {
    fn blk_config(&self) -> BlkConfig {
        let sectors = self.cfg.capacity / SECTOR_SIZE;
        let per_seg = sectors.min(u64::from(u32::MAX)) as u32;
        BlkConfig {
            capacity: sectors,
            seg_max: u32::from(self.cfg.max_queue_size).saturating_sub(2).max(1),
            blk_size: SECTOR_SIZE as u32,
            num_queues: self.cfg.num_queues,
            max_discard_sectors: per_seg,
            max_discard_seg: MAX_SEGMENTS,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: per_seg,
            max_write_zeroes_seg: MAX_SEGMENTS,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        }
    }

    fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_, ()>> {
        self.data
            .get_slice(offset as usize, len)
            .map_err(|e| Error::Invalid(format!("ramdisk range {offset}+{len}: {e}")))
    }

    /// Serves one chain; returns the used length.
    fn handle(
        &self,
        mem: &GuestMemoryMmap<()>,
        chain: DescriptorChain<&GuestMemoryMmap<()>>,
    ) -> u32 {
        let c = &self.counters;
        let (mut readable, mut writable): (Sg, Sg) = (Vec::new(), Vec::new());
        let (mut count, mut cut_short, mut misordered) = (0usize, false, false);
        for d in chain {
            count += 1;
            cut_short = d.has_next();
            let seg = (d.addr(), d.len() as usize);
            if d.is_write_only() {
                writable.push(seg);
            } else {
                misordered |= !writable.is_empty();
                readable.push(seg);
            }
        }
        readable.retain(|s| s.1 > 0);
        writable.retain(|s| s.1 > 0);
        // The status byte is the last writable byte.
        let status_at = match writable.last_mut() {
            Some(last) if count > 0 && !cut_short && !misordered => {
                last.1 -= 1;
                let at = last.0.unchecked_add(last.1 as u64);
                if last.1 == 0 {
                    writable.pop();
                }
                Some(at)
            }
            _ => None,
        };
        let Some(status_at) = status_at.filter(|&a| mem.check_range(a, 1)) else {
            log::warn!(
                "ramdisk: malformed chain ({count} descriptors, cut short {cut_short}, \
                 misordered {misordered}, {} writable)",
                writable.len()
            );
            c.malformed.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let (status, written) = self.execute(mem, &readable, &writable);
        let counter = match u32::from(status) {
            VIRTIO_BLK_S_OK => &c.ok,
            VIRTIO_BLK_S_UNSUPP => &c.unsupp,
            _ => &c.ioerr,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if mem.write_obj(status, status_at).is_err() {
            return 0;
        }
        written + 1
    }

    /// Returns (status, bytes written into the guest before the status).
    fn execute(&self, mem: &GuestMemoryMmap<()>, readable: &Sg, writable: &Sg) -> (u8, u32) {
        if !readable
            .iter()
            .chain(writable)
            .all(|&(a, l)| mem.check_range(a, l))
        {
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let mut hdr = [0u8; BLK_HEADER_LEN];
        if gather(mem, readable, &mut hdr).is_err() {
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let req_type = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let out = skip(readable, BLK_HEADER_LEN);
        let out_len: usize = out.iter().map(|s| s.1).sum();
        let in_len: usize = writable.iter().map(|s| s.1).sum();
        match req_type {
            VIRTIO_BLK_T_IN => match self.range(sector, in_len) {
                Some(off) => match self.copy(mem, writable, off, true) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, in_len as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                },
                None => (VIRTIO_BLK_S_IOERR as u8, 0),
            },
            VIRTIO_BLK_T_OUT => match self.range(sector, out_len) {
                Some(off) if !self.cfg.readonly => match self.copy(mem, &out, off, false) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                },
                _ => (VIRTIO_BLK_S_IOERR as u8, 0),
            },
            VIRTIO_BLK_T_FLUSH => (VIRTIO_BLK_S_OK as u8, 0),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(VIRTIO_BLK_ID_BYTES as usize);
                id[..n].copy_from_slice(&s[..n]);
                let n = in_len.min(VIRTIO_BLK_ID_BYTES as usize);
                match scatter(mem, writable, &id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                (self.zero_segments(mem, req_type, &out), 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    /// Byte offset of a sector range if it is sector-aligned and inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        (len as u64 % SECTOR_SIZE == 0 && end <= self.cfg.capacity).then_some(off)
    }

    fn zero_segments(&self, mem: &GuestMemoryMmap<()>, req_type: u32, segs: &Sg) -> u8 {
        if self.cfg.readonly {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let total: usize = segs.iter().map(|s| s.1).sum();
        if total == 0
            || total % BLK_SEGMENT_LEN != 0
            || total / BLK_SEGMENT_LEN > MAX_SEGMENTS as usize
        {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let mut bytes = vec![0u8; total];
        if gather(mem, segs, &mut bytes).is_err() {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let allowed = if req_type == VIRTIO_BLK_T_WRITE_ZEROES {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        // Check every segment before zeroing any.
        let mut ranges = Vec::new();
        for s in bytes.chunks_exact(BLK_SEGMENT_LEN) {
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
            let n = u32::from_le_bytes(s[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
            match self.range(sector, n as usize * SECTOR_SIZE as usize) {
                Some(off) => ranges.push((off, n as usize * SECTOR_SIZE as usize)),
                None => return VIRTIO_BLK_S_IOERR as u8,
            }
        }
        for (off, len) in ranges {
            static ZEROES: [u8; 65536] = [0; 65536];
            let mut done = 0;
            while done < len {
                let n = ZEROES.len().min(len - done);
                match self.slice(off + done as u64, n) {
                    Ok(s) => s.copy_from(&ZEROES[..n]),
                    Err(_) => return VIRTIO_BLK_S_IOERR as u8,
                }
                done += n;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }

    /// Copies between the disk at `off` and the guest buffers (`to_guest`: disk -> guest).
    fn copy(&self, mem: &GuestMemoryMmap<()>, sg: &Sg, mut off: u64, to_guest: bool) -> Result<()> {
        for &(addr, len) in sg {
            for gs in GuestMemoryBackend::get_slices(mem, addr, len) {
                let gs = gs.map_err(|e| Error::Memory(e.to_string()))?;
                let ds = self.slice(off, gs.len())?;
                if to_guest {
                    ds.copy_to_volatile_slice(gs);
                } else {
                    gs.copy_to_volatile_slice(ds);
                }
                off += gs.len() as u64;
            }
        }
        Ok(())
    }
}

/// The buffer list after its first `n` bytes.
fn skip(sg: &Sg, mut n: usize) -> Sg {
    let mut out = Vec::new();
    for &(a, l) in sg {
        if n >= l {
            n -= l;
        } else {
            out.push((a.unchecked_add(n as u64), l - n));
            n = 0;
        }
    }
    out
}

/// Fills `out` from the start of the buffer list (fails if the list is shorter).
fn gather(mem: &GuestMemoryMmap<()>, sg: &Sg, out: &mut [u8]) -> Result<()> {
    let mut done = 0;
    for &(a, l) in sg {
        if done == out.len() {
            break;
        }
        let n = l.min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], a)
            .map_err(|e| Error::Memory(e.to_string()))?;
        done += n;
    }
    if done < out.len() {
        return Err(Error::Invalid("buffer list too short".into()));
    }
    Ok(())
}

/// Writes `data` to the start of the buffer list (fails if the list is shorter).
fn scatter(mem: &GuestMemoryMmap<()>, sg: &Sg, data: &[u8]) -> Result<()> {
    let mut done = 0;
    for &(a, l) in sg {
        if done == data.len() {
            break;
        }
        let n = l.min(data.len() - done);
        mem.write_slice(&data[done..done + n], a)
            .map_err(|e| Error::Memory(e.to_string()))?;
        done += n;
    }
    if done < data.len() {
        return Err(Error::Invalid("buffer list too short".into()));
    }
    Ok(())
}
