//! virtio-blk requests: parse one descriptor chain from an untrusted guest, run it against a
//! `zram::Device`, write the status byte and say how many bytes went into guest memory.
//!
//! Framing follows the byte-stream view of the virtio spec (VIRTIO_F_ANY_LAYOUT is implied
//! by VERSION_1): the device-readable descriptors form one stream (16-byte header, then data
//! going out), the device-writable ones another (data coming in, then one status byte at the
//! very end). Every chain is completed: whatever is wrong with it, the used entry comes back,
//! the status byte is written when the chain has a writable byte in guest memory to hold it,
//! and used.len counts exactly the bytes written.

use crate::counters::QueueCounters;
use crate::ratelimit::RateLimitedLog;
use crate::served::Served;
use std::mem::offset_of;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    virtio_blk_config,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The page size of the store (zram's, in the `u64` of request offsets); discard and
/// write-zeroes work in whole pages of it.
pub const PAGE_SIZE: u64 = zram::PAGE_SIZE as u64;
/// virtio-blk addresses the disk in 512-byte sectors whatever its block size: zram's sector.
pub use zram::SECTOR_SIZE;
const SECTORS_PER_PAGE: u64 = PAGE_SIZE / SECTOR_SIZE;
const HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;
/// Largest data segment we advertise (`size_max`). Bigger descriptors still work; the limit
/// only tells the guest how to build requests.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard / write-zeroes segment: the largest whole number of pages in a u32.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX / SECTORS_PER_PAGE as u32) * SECTORS_PER_PAGE as u32;

/// What the device tells the guest in its config space.
#[derive(Debug, Clone)]
pub struct BlkGeometry {
    /// Disk size in bytes (a multiple of the page size).
    pub size: u64,
    /// Logical block size the guest should use: 4096 (default) or 512.
    pub blk_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl BlkGeometry {
    /// Longest data chain a request may carry (`seg_max`): QEMU's rule, queue size minus the
    /// header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio_blk_config bytes (little endian), up to and including the write-zeroes
    /// fields; the fields of features we do not offer stay zero.
    pub fn config_space(&self) -> Vec<u8> {
        let mut b = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &(self.size / SECTOR_SIZE).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &SIZE_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &self.seg_max().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &self.blk_size.to_le_bytes(),
        );
        // Physical block = one store page: a guest using 512-byte blocks still aligns to 4 KiB.
        let exp = (PAGE_SIZE as u32 / self.blk_size).trailing_zeros() as u8;
        put(offset_of!(virtio_blk_config, physical_block_exp), &[exp]);
        let page_blocks = (PAGE_SIZE as u32 / self.blk_size) as u16;
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &page_blocks.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, opt_io_size),
            &u32::from(page_blocks).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        for (field, value) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                MAX_DISCARD_SEG,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                SECTORS_PER_PAGE as u32,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_DISCARD_SEG,
            ),
        ] {
            put(field, &value.to_le_bytes());
        }
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        b
    }
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// A position in a list of segments read front to back.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    seg: usize,
    off: u64,
}

impl Cursor {
    fn advance(&mut self, segs: &[Seg], mut n: u64) {
        while n > 0 && self.seg < segs.len() {
            let step = (segs[self.seg].len - self.off).min(n);
            self.off += step;
            n -= step;
            if self.off == segs[self.seg].len {
                self.seg += 1;
                self.off = 0;
            }
        }
    }

    /// The guest address under the cursor and how many bytes follow it in this segment.
    fn here(&self, segs: &[Seg]) -> Option<(GuestAddress, u64)> {
        let s = segs.get(self.seg)?;
        Some((GuestAddress(s.addr.0 + self.off), s.len - self.off))
    }
}

/// Why a request failed; becomes S_IOERR or S_UNSUPP and one rate-limited log line.
#[derive(Debug, thiserror::Error)]
enum ReqError {
    #[error("malformed chain: {0}")]
    Malformed(&'static str),
    #[error("buffer outside guest memory")]
    BadAddress,
    #[error("sector range {sector}+{sectors} past the end of the disk")]
    OutOfRange { sector: u64, sectors: u64 },
    #[error("{0}")]
    Invalid(&'static str),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("store: {0}")]
    Store(#[from] zram::Error),
    #[error("internal error (see the log above)")]
    Internal,
}

impl ReqError {
    fn status(&self) -> u8 {
        match self {
            ReqError::UnsupportedType(_) | ReqError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The request state of one virtqueue: its compression stream, a bounce page and scratch
/// lists. Owned by the queue's worker thread; nothing here is shared with other queues.
#[derive(Debug)]
pub struct Worker {
    served: Arc<Served>,
    queue: usize,
    blk: BlkGeometry,
    /// Made on first use: a frontend often enables fewer queues than the device offers.
    stream: Option<zcomp::Stream>,
    bounce: Box<[u8; PAGE_SIZE as usize]>,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    /// Bytes written into the guest's writable buffers by the request being served.
    written: u64,
    log: RateLimitedLog,
}

/// A request's parsed shape.
struct Parsed {
    /// Where the status byte goes, if the chain has a writable byte in guest memory.
    status: Option<GuestAddress>,
    problem: Option<ReqError>,
}

impl Worker {
    pub fn new(served: Arc<Served>, queue: usize, blk: BlkGeometry) -> Worker {
        Worker {
            served,
            queue,
            blk,
            stream: None,
            bounce: Box::new([0; PAGE_SIZE as usize]),
            readable: Vec::with_capacity(8),
            writable: Vec::with_capacity(8),
            written: 0,
            log: RateLimitedLog::new(),
        }
    }

    fn counters(&self) -> &QueueCounters {
        &self.served.queues[self.queue]
    }

    /// Serves one chain. Returns the value for used.len: the bytes written into the chain's
    /// writable buffers, status byte included.
    pub fn process<M>(&mut self, mut chain: DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMemoryMmap<()>>,
    {
        let parsed = self.collect(&mut chain);
        let mem = chain.memory();
        self.written = 0;
        QueueCounters::add(&self.counters().requests, 1);
        let result = match parsed.problem {
            Some(e) => Err(e),
            // A bug must cost one request, not the queue: without this, the worker thread
            // would die with the request never completed, and the guest would wait for ever.
            None => std::panic::catch_unwind(AssertUnwindSafe(|| self.execute(mem)))
                .unwrap_or_else(|_| {
                    log::error!(
                        "{} queue {}: internal error serving a request; failed it with S_IOERR",
                        self.served.name,
                        self.queue
                    );
                    // The stream may be mid-operation; start the next request with a new one.
                    self.stream = None;
                    Err(ReqError::Internal)
                }),
        };
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                let c = self.counters();
                if e.status() == VIRTIO_BLK_S_UNSUPP as u8 {
                    QueueCounters::add(&c.unsupported, 1);
                } else {
                    QueueCounters::add(&c.io_errors, 1);
                }
                let (name, queue) = (&self.served.name, self.queue);
                self.log
                    .warn(format_args!("{name} queue {queue}: request failed: {e}"));
                e.status()
            }
        };
        let mut used = self.written;
        if let Some(addr) = parsed.status {
            if mem.write_obj(status, addr).is_ok() {
                used += 1;
            }
        }
        // Chains are shorter than 2^32 bytes (the descriptor iterator stops otherwise).
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    /// Walks the chain into the readable and writable lists and finds the status byte.
    fn collect<M>(&mut self, chain: &mut DescriptorChain<M>) -> Parsed
    where
        M: Deref<Target = GuestMemoryMmap<()>>,
    {
        self.readable.clear();
        self.writable.clear();
        let mut problem = None;
        let mut last_has_next = false;
        let mut any = false;
        for desc in chain.by_ref() {
            any = true;
            last_has_next = desc.has_next();
            let seg = Seg {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                self.writable.push(seg);
            } else {
                if !self.writable.is_empty() && problem.is_none() {
                    problem = Some(ReqError::Malformed("readable buffer after a writable one"));
                }
                self.readable.push(seg);
            }
        }
        // The iterator ends silently on a loop, a next index out of range, a bad or nested
        // indirect table or a descriptor table outside memory; the last descriptor it gave
        // still says NEXT then.
        if !any {
            problem = Some(ReqError::Malformed("empty or unreadable descriptor chain"));
        } else if last_has_next {
            problem = Some(ReqError::Malformed(
                "chain ends at a bad next index, loop or table",
            ));
        }
        let mem = chain.memory();
        if problem.is_none()
            && self
                .readable
                .iter()
                .chain(self.writable.iter())
                .any(|s| !in_memory(mem, s.addr, s.len))
        {
            problem = Some(ReqError::BadAddress);
        }
        // The status byte is the last byte of the writable stream; take it off the data.
        let mut status = None;
        while let Some(last) = self.writable.last_mut() {
            if last.len == 0 {
                self.writable.pop();
                continue;
            }
            last.len -= 1;
            status = last
                .addr
                .0
                .checked_add(last.len)
                .map(GuestAddress)
                .filter(|&a| in_memory(mem, a, 1));
            if last.len == 0 {
                self.writable.pop();
            }
            break;
        }
        if status.is_none() && problem.is_none() {
            problem = Some(ReqError::Malformed("no writable status byte"));
        }
        Parsed { status, problem }
    }

    fn execute(&mut self, mem: &GuestMemoryMmap<()>) -> Result<(), ReqError> {
        let mut header = [0u8; HEADER_LEN as usize];
        let mut cur = Cursor::default();
        if total(&self.readable) < HEADER_LEN {
            return Err(ReqError::Malformed("request header shorter than 16 bytes"));
        }
        gather(mem, &self.readable, &mut cur, &mut header)?;
        let typ = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let out_len = total(&self.readable) - HEADER_LEN;
        let in_len = total(&self.writable);
        let c = &self.served.queues[self.queue];
        match typ {
            VIRTIO_BLK_T_IN => {
                QueueCounters::add(&c.reads, 1);
                if out_len != 0 {
                    return Err(ReqError::Malformed("read request with data to the device"));
                }
                let offset = self.check_range(sector, in_len)?;
                self.read(mem, offset, in_len)?;
                QueueCounters::add(&self.counters().read_bytes, in_len);
                Ok(())
            }
            VIRTIO_BLK_T_OUT => {
                QueueCounters::add(&c.writes, 1);
                if in_len != 0 {
                    return Err(ReqError::Malformed(
                        "write request with data from the device",
                    ));
                }
                if self.served.readonly {
                    return Err(ReqError::ReadOnly);
                }
                let offset = self.check_range(sector, out_len)?;
                self.write(mem, offset, out_len, cur)?;
                QueueCounters::add(&self.counters().write_bytes, out_len);
                Ok(())
            }
            VIRTIO_BLK_T_FLUSH => {
                // Every completed write is already in the store; nothing is cached.
                QueueCounters::add(&c.flushes, 1);
                Ok(())
            }
            VIRTIO_BLK_T_GET_ID => {
                QueueCounters::add(&c.get_ids, 1);
                if in_len < u64::from(VIRTIO_BLK_ID_BYTES) {
                    return Err(ReqError::Invalid("GET_ID buffer shorter than 20 bytes"));
                }
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = self.served.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let mut wcur = Cursor::default();
                self.written += scatter(mem, &self.writable, &mut wcur, &id)?;
                Ok(())
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = typ == VIRTIO_BLK_T_DISCARD;
                QueueCounters::add(
                    if discard {
                        &c.discards
                    } else {
                        &c.write_zeroes
                    },
                    1,
                );
                if self.served.readonly {
                    return Err(ReqError::ReadOnly);
                }
                if in_len != 0 {
                    return Err(ReqError::Malformed("discard with data from the device"));
                }
                self.discard(mem, discard, out_len, cur)
            }
            other => Err(ReqError::UnsupportedType(other)),
        }
    }

    /// Checks that `len` bytes from `sector` lie on the disk; returns the byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        if len % SECTOR_SIZE != 0 {
            return Err(ReqError::Invalid("data length not a multiple of 512 bytes"));
        }
        let sectors = len / SECTOR_SIZE;
        match sector
            .checked_add(sectors)
            .and_then(|end| end.checked_mul(SECTOR_SIZE))
        {
            Some(end) if end <= self.blk.size => Ok(sector * SECTOR_SIZE),
            _ => Err(ReqError::OutOfRange { sector, sectors }),
        }
    }

    /// Reads `len` bytes at disk `offset` into the writable stream, page by page. Whole
    /// pages whose guest buffer is one contiguous host range are decompressed straight into
    /// guest memory; the rest goes through the bounce page.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        mut offset: u64,
        len: u64,
    ) -> Result<(), ReqError> {
        let dev = &self.served.device;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
        let mut cur = Cursor::default();
        let end = offset + len;
        while offset < end {
            let in_page = offset % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(end - offset);
            if n == PAGE_SIZE {
                if let Some(ptr) = contiguous_page(mem, &self.writable, &cur) {
                    // SAFETY: `contiguous_page` checked that these 4096 bytes lie inside one
                    // mapped region of guest memory, which stays mapped while `mem` (a
                    // snapshot of the guest memory map) is borrowed. The guest gave the buffer
                    // to the device for this request; if it touches it meanwhile, only its own
                    // request data is affected (the virtio spec forbids it).
                    let page = unsafe { &mut *ptr.cast::<[u8; PAGE_SIZE as usize]>() };
                    dev.read_page(offset / PAGE_SIZE, page, stream)?;
                    cur.advance(&self.writable, PAGE_SIZE);
                    self.written += PAGE_SIZE;
                    offset += PAGE_SIZE;
                    continue;
                }
            }
            let buf = &mut self.bounce[..n as usize];
            dev.read(offset, buf, stream)?;
            self.written += scatter(mem, &self.writable, &mut cur, buf)?;
            offset += n;
        }
        Ok(())
    }

    /// Writes `len` bytes from the readable stream (at `cur`) to disk `offset`.
    fn write(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        mut offset: u64,
        len: u64,
        mut cur: Cursor,
    ) -> Result<(), ReqError> {
        let dev = &self.served.device;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
        let end = offset + len;
        while offset < end {
            let in_page = offset % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(end - offset);
            if n == PAGE_SIZE {
                if let Some(ptr) = contiguous_page(mem, &self.readable, &cur) {
                    // SAFETY: as in `read`: one mapped region, kept mapped by `mem`; the store
                    // only reads the page (compression and the same-filled check).
                    let page = unsafe { &*ptr.cast_const().cast::<[u8; PAGE_SIZE as usize]>() };
                    dev.write_page(offset / PAGE_SIZE, page, stream)?;
                    cur.advance(&self.readable, PAGE_SIZE);
                    offset += PAGE_SIZE;
                    continue;
                }
            }
            let buf = &mut self.bounce[..n as usize];
            gather(mem, &self.readable, &mut cur, buf)?;
            dev.write(offset, buf, stream)?;
            offset += n;
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is carried out, so a
    /// bad segment fails the request without side effects.
    fn discard(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        discard: bool,
        out_len: u64,
        mut cur: Cursor,
    ) -> Result<(), ReqError> {
        if out_len == 0 || out_len % DISCARD_SEGMENT_LEN != 0 {
            return Err(ReqError::Invalid(
                "discard payload not a whole number of 16-byte segments",
            ));
        }
        let count = out_len / DISCARD_SEGMENT_LEN;
        if count > u64::from(MAX_DISCARD_SEG) {
            return Err(ReqError::Invalid(
                "more discard segments than max_discard_seg",
            ));
        }
        let mut ranges = [(0u64, 0u64); MAX_DISCARD_SEG as usize];
        for range in ranges.iter_mut().take(count as usize) {
            let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
            gather(mem, &self.readable, &mut cur, &mut raw)?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let sectors = u64::from(u32::from_le_bytes(raw[8..12].try_into().unwrap()));
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
            // Discard knows no flags; write-zeroes knows UNMAP, which we always do anyway.
            let known = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !known != 0 {
                return Err(ReqError::UnsupportedFlags(flags));
            }
            if sectors > u64::from(MAX_DISCARD_SECTORS) {
                return Err(ReqError::Invalid(
                    "discard segment longer than max_discard_sectors",
                ));
            }
            let offset = self.check_range(sector, sectors * SECTOR_SIZE)?;
            if discard && (sector % SECTORS_PER_PAGE != 0 || sectors % SECTORS_PER_PAGE != 0) {
                return Err(ReqError::Invalid("discard not aligned to 4 KiB"));
            }
            *range = (offset, sectors * SECTOR_SIZE);
        }
        let dev = &self.served.device;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
        for &(offset, len) in &ranges[..count as usize] {
            if len == 0 {
                continue;
            }
            if discard {
                dev.discard(offset / PAGE_SIZE, len / PAGE_SIZE)?;
                continue;
            }
            // Write-zeroes may be unaligned: zero the parts of partial pages through the
            // store's read-modify-write, free runs of whole pages.
            self.bounce.fill(0);
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let n = (PAGE_SIZE - pos % PAGE_SIZE).min(end - pos);
                if n == PAGE_SIZE {
                    let run_end = end / PAGE_SIZE * PAGE_SIZE;
                    dev.write_zeroes(pos / PAGE_SIZE, (run_end - pos) / PAGE_SIZE)?;
                    pos = run_end;
                } else {
                    dev.write(pos, &self.bounce[..n as usize], stream)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// True if `len` bytes at `addr` are guest memory (possibly spanning regions).
fn in_memory(mem: &GuestMemoryMmap<()>, addr: GuestAddress, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    if addr.0.checked_add(len as u64).is_none() {
        return false;
    }
    mem.get_slices(addr, len).all(|s| s.is_ok())
}

/// A host pointer to the next 4096 bytes of `segs` at `cur` if they are one contiguous range
/// inside one memory region.
fn contiguous_page(mem: &GuestMemoryMmap<()>, segs: &[Seg], cur: &Cursor) -> Option<*mut u8> {
    let (addr, left) = cur.here(segs)?;
    if left < PAGE_SIZE {
        return None;
    }
    let slice = mem.get_slice(addr, PAGE_SIZE as usize).ok()?;
    Some(slice.ptr_guard_mut().as_ptr())
}

/// Copies guest bytes at `cur` into `dst`, advancing the cursor.
fn gather(
    mem: &GuestMemoryMmap<()>,
    segs: &[Seg],
    cur: &mut Cursor,
    dst: &mut [u8],
) -> Result<(), ReqError> {
    let mut done = 0;
    while done < dst.len() {
        let (addr, left) = cur
            .here(segs)
            .ok_or(ReqError::Malformed("request data too short"))?;
        let n = (left as usize).min(dst.len() - done);
        mem.read_slice(&mut dst[done..done + n], addr)
            .map_err(|_| ReqError::BadAddress)?;
        cur.advance(segs, n as u64);
        done += n;
    }
    Ok(())
}

/// Copies `src` into the guest buffers at `cur`; returns the bytes written.
fn scatter(
    mem: &GuestMemoryMmap<()>,
    segs: &[Seg],
    cur: &mut Cursor,
    src: &[u8],
) -> Result<u64, ReqError> {
    let mut done = 0;
    while done < src.len() {
        let (addr, left) = cur
            .here(segs)
            .ok_or(ReqError::Malformed("request buffer too short"))?;
        let n = (left as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], addr)
            .map_err(|_| ReqError::BadAddress)?;
        cur.advance(segs, n as u64);
        done += n;
    }
    Ok(done as u64)
}
