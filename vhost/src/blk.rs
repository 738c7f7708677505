//! virtio-blk requests: run a chain that `request` parsed against a `zram::Device`, write
//! the status byte and say how many bytes went into guest memory.
//!
//! Every chain is completed: whatever is wrong with it, the used entry comes back, the status
//! byte is written when the chain has a writable byte in guest memory to hold it, and used.len
//! counts exactly the bytes written. The per-type counters (`reads`, `writes`, ...) count
//! requests that passed every check; `requests` counts every chain, `io_errors` and
//! `unsupported` every failure, checks and store alike.
//!
//! # Guest memory
//!
//! Guest memory is never a Rust reference. The guest (or a hostile frontend) may write any of
//! its memory at any time, also the buffers of a request in flight, so a `&[u8]` or
//! `&mut [u8]` over it would promise the compiler something nobody keeps. Every byte moves
//! between guest memory and our own memory through vm-memory's `Bytes::read_slice` /
//! `write_slice` (a bounded copy from a raw pointer, checked against the memory map) into or out
//! of the worker's bounce page, and the store only ever sees the bounce page: a page the guest
//! changes during a write is stored as some mix of its old and new bytes, consistently (the
//! same-filled check, the compressor and a raw copy all see one snapshot). The price is one
//! 4 KiB copy per page each way (docs/benchmarks.md); decompressing straight into guest memory
//! would need a decompressor that writes through a raw pointer, which lz4_flex does not offer.

use crate::counters::RequestCounters;
use crate::device::BlkDevice;
use crate::ratelimit::RateLimitedLog;
use crate::request::{
    Cursor, Disk, Error, Kind, ParsedChain, Parser, Request, Seg, gather, scatter,
};
use std::mem::offset_of;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, virtio_blk_config,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

/// The page size of the store (zram's, in the `u64` of request offsets); discard and
/// write-zeroes work in whole pages of it.
pub const PAGE_SIZE: u64 = zram::PAGE_SIZE as u64;
/// virtio-blk addresses the disk in 512-byte sectors whatever its block size: zram's sector.
pub use zram::SECTOR_SIZE;
pub(crate) const SECTORS_PER_PAGE: u64 = PAGE_SIZE / SECTOR_SIZE;
/// Largest data segment we advertise (`size_max`). Bigger descriptors still work; the limit
/// only tells the guest how to build requests.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard / write-zeroes segment: the largest whole number of pages in a u32.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX / SECTORS_PER_PAGE as u32) * SECTORS_PER_PAGE as u32;

/// The virtio-blk configuration the device offers the guest: what [`ConfigSpace::to_bytes`]
/// encodes as `virtio_blk_config` (capacity, block size, queues, segment limits), and the most
/// entries a virtqueue may have.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    /// Disk size in bytes (a multiple of the page size).
    pub size: u64,
    /// Logical block size the guest should use: 4096 (default) or 512.
    pub blk_size: u32,
    pub num_queues: u16,
    /// Most entries per virtqueue (a larger `SET_VRING_NUM` is refused); `seg_max` follows.
    pub queue_size: u16,
}

impl ConfigSpace {
    /// Longest data chain a request may carry (`seg_max`): QEMU's rule, queue size minus the
    /// header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio_blk_config bytes (little endian), up to and including the write-zeroes
    /// fields; the fields of features we do not offer stay zero.
    pub fn to_bytes(&self) -> Vec<u8> {
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

/// Serves the requests of one virtqueue: parses each chain, runs it against the zram device,
/// writes the status and counts it. Holds the queue's parser, compression stream and bounce
/// page; owned by the queue's worker thread (`vring`), nothing here is shared with other queues.
#[derive(Debug)]
pub struct RequestHandler {
    parser: Parser,
    exec: Exec,
    log: RateLimitedLog,
}

/// What executing a request needs; apart from the parser so that a parsed request (which
/// borrows the parser's segment lists) can run.
#[derive(Debug)]
struct Exec {
    served: Arc<BlkDevice>,
    queue: usize,
    disk: Disk,
    /// Made on first use: a frontend often enables fewer queues than the device offers.
    stream: Option<zcomp::Stream>,
    /// Every byte between guest memory and the store passes through here (see the module
    /// docs).
    bounce: Box<[u8; PAGE_SIZE as usize]>,
    /// Bytes written into the guest's writable buffers by the request being served.
    written: u64,
}

impl RequestHandler {
    pub fn new(served: Arc<BlkDevice>, queue: usize, blk: ConfigSpace) -> RequestHandler {
        let disk = Disk {
            size: blk.size,
            readonly: served.readonly,
        };
        RequestHandler {
            parser: Parser::new(),
            exec: Exec {
                served,
                queue,
                disk,
                stream: None,
                bounce: Box::new([0; PAGE_SIZE as usize]),
                written: 0,
            },
            log: RateLimitedLog::new(),
        }
    }

    /// Serves one chain. Returns the value for used.len: the bytes written into the chain's
    /// writable buffers, status byte included.
    pub fn process<M>(&mut self, chain: DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMemoryMmap<()>> + Clone,
    {
        let exec = &mut self.exec;
        let mem = chain.memory();
        RequestCounters::add(&exec.counters().requests, 1);
        exec.written = 0;
        let ParsedChain {
            status: status_at,
            request,
        } = self.parser.parse(chain.clone(), mem, &exec.disk);
        let result = request.and_then(|req| {
            // Counted once the request passed its checks: a malformed read is no read.
            let c = exec.counters();
            RequestCounters::add(
                match req.kind {
                    Kind::Read { .. } => &c.reads,
                    Kind::Write { .. } => &c.writes,
                    Kind::Flush => &c.flushes,
                    Kind::GetId => &c.get_ids,
                    Kind::Discard(_) => &c.discards,
                    Kind::WriteZeroes(_) => &c.write_zeroes,
                },
                1,
            );
            // A bug must cost one request, not the queue: without this, the worker thread
            // would die with the request never completed, and the guest would wait for ever.
            std::panic::catch_unwind(AssertUnwindSafe(|| exec.execute(mem, &req))).unwrap_or_else(
                |_| {
                    log::error!(
                        "{} queue {}: internal error serving a request; failed it with S_IOERR",
                        exec.served.name,
                        exec.queue
                    );
                    // The stream may be mid-operation; start the next request with a new one.
                    exec.stream = None;
                    Err(Error::Internal)
                },
            )
        });
        let c = exec.counters();
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                let status = e.status();
                if status == VIRTIO_BLK_S_UNSUPP as u8 {
                    RequestCounters::add(&c.unsupported, 1);
                } else {
                    RequestCounters::add(&c.io_errors, 1);
                }
                let (name, queue) = (&exec.served.name, exec.queue);
                self.log
                    .warn(format_args!("{name} queue {queue}: request failed: {e}"));
                status
            }
        };
        let mut used = exec.written;
        if let Some(addr) = status_at {
            if mem.write_obj(status, addr).is_ok() {
                used += 1;
            }
        }
        // Chains are shorter than 2^32 bytes (the descriptor iterator stops otherwise).
        u32::try_from(used).unwrap_or(u32::MAX)
    }
}

impl Exec {
    fn counters(&self) -> &RequestCounters {
        &self.served.queues[self.queue]
    }

    /// Runs a request that passed its checks. What can still fail: the store (the memory
    /// limit), and a bug.
    fn execute(&mut self, mem: &GuestMemoryMmap<()>, req: &Request<'_>) -> Result<(), Error> {
        match &req.kind {
            &Kind::Read { offset, len } => {
                self.read(mem, offset, len, req.data)?;
                RequestCounters::add(&self.counters().read_bytes, len);
            }
            &Kind::Write { offset, len } => {
                self.write(mem, offset, len, req.data)?;
                RequestCounters::add(&self.counters().write_bytes, len);
            }
            Kind::Flush => {}
            Kind::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = self.served.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                self.written += scatter(mem, req.data, &mut Cursor::default(), &id)?;
            }
            Kind::Discard(ranges) => {
                for &(offset, len) in ranges.as_slice() {
                    self.served
                        .zram
                        .discard(offset / PAGE_SIZE, len / PAGE_SIZE)?;
                }
            }
            Kind::WriteZeroes(ranges) => {
                for &(offset, len) in ranges.as_slice() {
                    self.write_zeroes(offset, len)?;
                }
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at disk `offset` into `data`, a page at a time through the bounce
    /// page.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        mut offset: u64,
        len: u64,
        data: &[Seg],
    ) -> Result<(), Error> {
        let dev = &self.served.zram;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
        let mut cur = Cursor::default();
        let end = offset + len;
        while offset < end {
            let n = (PAGE_SIZE - offset % PAGE_SIZE).min(end - offset);
            let buf = if n == PAGE_SIZE {
                dev.read_page(offset / PAGE_SIZE, &mut self.bounce, stream)?;
                &self.bounce[..]
            } else {
                let buf = &mut self.bounce[..n as usize];
                dev.read(offset, buf, stream)?;
                buf
            };
            self.written += scatter(mem, data, &mut cur, buf)?;
            offset += n;
        }
        Ok(())
    }

    /// Writes `data` (`len` bytes) to disk `offset`, a page at a time through the bounce page.
    fn write(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        mut offset: u64,
        len: u64,
        data: &[Seg],
    ) -> Result<(), Error> {
        let dev = &self.served.zram;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
        let mut cur = Cursor::default();
        let end = offset + len;
        while offset < end {
            let n = (PAGE_SIZE - offset % PAGE_SIZE).min(end - offset);
            if n == PAGE_SIZE {
                gather(mem, data, &mut cur, &mut self.bounce[..])?;
                dev.write_page(offset / PAGE_SIZE, &self.bounce, stream)?;
            } else {
                let buf = &mut self.bounce[..n as usize];
                gather(mem, data, &mut cur, buf)?;
                dev.write(offset, buf, stream)?;
            }
            offset += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` (sector-aligned): the parts of partial pages through
    /// the store's read-modify-write, runs of whole pages freed.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let dev = &self.served.zram;
        let stream = self.stream.get_or_insert_with(|| dev.new_stream());
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
        Ok(())
    }
}
