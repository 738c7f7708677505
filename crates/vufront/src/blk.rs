//! virtio-blk requests on a [`Queue`]: building chains with a chosen layout, submitting many,
//! and matching used elements back to requests.

use crate::mem::GuestBuf;
use crate::queue::{ChainSeg, Queue, chain_desc};
use crate::virtio::*;
use crate::{Error, Result};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// How a request's data is cut into descriptors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Split {
    /// One descriptor for the data.
    #[default]
    One,
    /// `n` descriptors of (nearly) equal length.
    Even(usize),
    /// Exactly these lengths, which must add up to the data length.
    Sizes(Vec<u32>),
}

/// The descriptor layout of a request.
///
/// Data pieces are placed in guest memory in *descending* address order with poisoned gaps
/// between them, so a backend that assumes a multi-descriptor buffer is contiguous reads or
/// writes the wrong bytes instead of passing by luck.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// How the data (out or in, each on its own) is split.
    pub split: Split,
    /// Put the chain in an indirect table (one ring descriptor).
    pub indirect: bool,
    /// Header and the first out-data piece share one descriptor (legal under VERSION_1, which
    /// implies ANY_LAYOUT).
    pub merge_header: bool,
    /// The last in-data piece and the status byte share one descriptor.
    pub merge_status: bool,
}

impl Layout {
    /// Data split into `n` descriptors.
    pub fn split(n: usize) -> Layout {
        Layout {
            split: Split::Even(n),
            ..Layout::default()
        }
    }

    /// This layout, through an indirect table.
    pub fn indirect(mut self) -> Layout {
        self.indirect = true;
        self
    }
}

/// One discard / write-zeroes / secure-erase range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`BLK_WRITE_ZEROES_FLAG_UNMAP` for write-zeroes; 0 otherwise).
    pub flags: u32,
}

impl Segment {
    /// The 16 bytes of `struct virtio_blk_discard_write_zeroes`.
    pub fn to_bytes(&self) -> [u8; BLK_SEGMENT_LEN] {
        let mut b = [0u8; BLK_SEGMENT_LEN];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A virtio-blk request to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `BLK_T_*` (any value may be sent).
    pub req_type: u32,
    /// I/O priority field of the header.
    pub ioprio: u32,
    /// Sector field of the header.
    pub sector: u64,
    /// Device-readable payload after the header (write data, discard segments).
    pub out: Vec<u8>,
    /// Length of the device-writable payload before the status byte (read data, GET_ID).
    pub in_len: u32,
    /// Descriptor layout.
    pub layout: Layout,
}

impl Request {
    /// A request with only a header (and status).
    pub fn new(req_type: u32, sector: u64) -> Request {
        Request {
            req_type,
            ioprio: 0,
            sector,
            out: Vec::new(),
            in_len: 0,
            layout: Layout::default(),
        }
    }

    /// Read `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Request {
        Request {
            in_len: len,
            ..Request::new(VIRTIO_BLK_T_IN, sector)
        }
    }

    /// Write `data` at `sector`.
    pub fn write(sector: u64, data: &[u8]) -> Request {
        Request {
            out: data.to_vec(),
            ..Request::new(VIRTIO_BLK_T_OUT, sector)
        }
    }

    /// Flush.
    pub fn flush() -> Request {
        Request::new(VIRTIO_BLK_T_FLUSH, 0)
    }

    /// GET_ID (20 bytes of serial).
    pub fn get_id() -> Request {
        Request {
            in_len: VIRTIO_BLK_ID_BYTES as usize as u32,
            ..Request::new(VIRTIO_BLK_T_GET_ID, 0)
        }
    }

    /// Discard `segs`.
    pub fn discard(segs: &[Segment]) -> Request {
        Request::segments(VIRTIO_BLK_T_DISCARD, segs)
    }

    /// Write zeroes to `segs`.
    pub fn write_zeroes(segs: &[Segment]) -> Request {
        Request::segments(VIRTIO_BLK_T_WRITE_ZEROES, segs)
    }

    /// A segment-carrying request of any type.
    pub fn segments(req_type: u32, segs: &[Segment]) -> Request {
        Request {
            out: segs.iter().flat_map(|s| s.to_bytes()).collect(),
            ..Request::new(req_type, 0)
        }
    }

    /// This request with another layout.
    pub fn with_layout(mut self, layout: Layout) -> Request {
        self.layout = layout;
        self
    }

    fn header(&self) -> [u8; BLK_HEADER_LEN] {
        let mut h = [0u8; BLK_HEADER_LEN];
        h[0..4].copy_from_slice(&self.req_type.to_le_bytes());
        h[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        h[8..16].copy_from_slice(&self.sector.to_le_bytes());
        h
    }
}

/// A completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag [`Queue::enqueue`] returned.
    pub tag: u64,
    /// Head descriptor index the chain had.
    pub head: u16,
    /// The status byte (0xff if the device never wrote it: the frontend pre-fills 0xff).
    pub status: u8,
    /// `len` of the used element.
    pub used_len: u32,
    /// The device-writable payload (read data, serial), `in_len` bytes. Bytes the device did
    /// not write keep the frontend's 0xa5 fill.
    pub data: Vec<u8>,
    /// From enqueue to reap.
    pub latency: Duration,
}

impl Completion {
    /// Status OK?
    pub fn ok(&self) -> bool {
        self.status == VIRTIO_BLK_S_OK as u8
    }

    /// `Ok(self)` if the status is OK, else [`Error::Status`].
    pub fn check(self) -> Result<Completion> {
        if self.ok() {
            Ok(self)
        } else {
            Err(Error::Status {
                status: self.status,
                used_len: self.used_len,
            })
        }
    }
}

/// Filler of device-writable data before submission, and of the gaps between pieces.
const IN_FILL: u8 = 0xa5;
const GAP_FILL: u8 = 0x5a;
const STATUS_FILL: u8 = 0xff;
const GAP: usize = 64;

#[derive(Debug)]
pub(crate) struct Inflight {
    tag: u64,
    descs: Vec<u16>,
    _bufs: Vec<GuestBuf>,
    status_gpa: u64,
    in_segs: Vec<(u64, usize)>,
    in_len: usize,
    submitted: Instant,
}

struct Piece {
    len: usize,
    write: bool,
    // (offset in piece, bytes) to copy in before submission
    init: Vec<(usize, Vec<u8>)>,
    // in-data parts: (offset in piece, len)
    in_parts: Vec<(usize, usize)>,
    status_at: Option<usize>,
}

fn split_lengths(split: &Split, len: usize) -> Result<Vec<usize>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    match split {
        Split::One => Ok(vec![len]),
        Split::Even(n) => {
            let n = (*n).clamp(1, len);
            Ok((0..n).map(|i| len / n + usize::from(i < len % n)).collect())
        }
        Split::Sizes(sizes) => {
            let sum: usize = sizes.iter().map(|&s| s as usize).sum();
            if sum != len {
                return Err(Error::Invalid(format!(
                    "split sizes add up to {sum}, data is {len} bytes"
                )));
            }
            Ok(sizes.iter().map(|&s| s as usize).collect())
        }
    }
}

impl Queue {
    /// Builds the request's chain, publishes it, and returns its tag. Does not kick: call
    /// [`Queue::notify`] after a batch, or use [`Queue::submit`].
    pub fn enqueue(&mut self, req: &Request) -> Result<u64> {
        let header = req.header();
        let out_lens = split_lengths(&req.layout.split, req.out.len())?;
        let in_lens = split_lengths(&req.layout.split, req.in_len as usize)?;

        // Pieces in chain order: readable ones, then writable ones.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut out_off = 0;
        let mut out_chunks = out_lens.iter().map(|&l| {
            let c = req.out[out_off..out_off + l].to_vec();
            out_off += l;
            c
        });
        let mut head_piece = Piece {
            len: BLK_HEADER_LEN,
            write: false,
            init: vec![(0, header.to_vec())],
            in_parts: Vec::new(),
            status_at: None,
        };
        if req.layout.merge_header {
            if let Some(first) = out_chunks.next() {
                head_piece.len += first.len();
                head_piece.init.push((BLK_HEADER_LEN, first));
            }
        }
        pieces.push(head_piece);
        for chunk in out_chunks {
            pieces.push(Piece {
                len: chunk.len(),
                write: false,
                init: vec![(0, chunk)],
                in_parts: Vec::new(),
                status_at: None,
            });
        }
        let n_in = in_lens.len();
        for (i, &l) in in_lens.iter().enumerate() {
            let merged = req.layout.merge_status && i + 1 == n_in;
            pieces.push(Piece {
                len: l + usize::from(merged),
                write: true,
                init: Vec::new(),
                in_parts: vec![(0, l)],
                status_at: merged.then_some(l),
            });
        }
        if !(req.layout.merge_status && n_in > 0) {
            pieces.push(Piece {
                len: 1,
                write: true,
                init: Vec::new(),
                in_parts: Vec::new(),
                status_at: Some(0),
            });
        }

        let n = pieces.len();
        let use_indirect = req.layout.indirect;
        if use_indirect && !self.indirect {
            return Err(Error::Invalid(
                "indirect layout, but RING_INDIRECT_DESC was not negotiated (use the raw API \
                 to send one anyway)"
                    .into(),
            ));
        }
        let need = if use_indirect { 1 } else { n };
        if self.free_desc_count() < need {
            return Err(Error::NoDescriptors {
                queue: self.index,
                need,
                free: self.free_desc_count(),
            });
        }

        // Allocate the last piece first: first-fit then hands out rising addresses, so the
        // chain runs downwards in memory and no two pieces touch.
        let mut bufs: Vec<Option<GuestBuf>> = (0..n).map(|_| None).collect();
        for i in (0..n).rev() {
            let p = &pieces[i];
            let align = if p.len >= 4096 { 4096 } else { 16 };
            let buf = self.mem.alloc(p.len + GAP, align)?;
            bufs[i] = Some(buf);
        }
        let bufs: Vec<GuestBuf> = bufs.into_iter().map(Option::unwrap).collect();

        let mut segs = Vec::with_capacity(n);
        let mut in_segs = Vec::new();
        let mut status_gpa = 0;
        for (p, buf) in pieces.iter().zip(&bufs) {
            buf.write_at(p.len, &[GAP_FILL; GAP])?;
            for (off, bytes) in &p.init {
                buf.write_at(*off, bytes)?;
            }
            for &(off, len) in &p.in_parts {
                self.mem.fill(buf.gpa() + off as u64, len, IN_FILL)?;
                in_segs.push((buf.gpa() + off as u64, len));
            }
            if let Some(off) = p.status_at {
                buf.write_at(off, &[STATUS_FILL])?;
                status_gpa = buf.gpa() + off as u64;
            }
            segs.push(ChainSeg {
                addr: buf.gpa(),
                len: p.len as u32,
                write: p.write,
            });
        }

        let mut bufs = bufs;
        let descs = if use_indirect {
            let table = self.mem.alloc(16 * n, 16)?;
            let descs: Vec<Desc> = segs
                .iter()
                .enumerate()
                .map(|(i, s)| chain_desc(s, (i + 1 < n).then_some(i as u16 + 1)))
                .collect();
            self.mem.write_descs(table.gpa(), &descs)?;
            let ids = self.alloc_descs(1)?;
            self.write_desc(ids[0], Desc::indirect(table.gpa(), n as u32))?;
            bufs.push(table);
            ids
        } else {
            let ids = self.alloc_descs(n)?;
            if let Err(e) = self.write_chain(&ids, &segs) {
                self.free_descs(&ids);
                return Err(e);
            }
            ids
        };

        let head = descs[0];
        let tag = self.next_tag;
        self.next_tag += 1;
        self.inflight[head as usize] = Some(Inflight {
            tag,
            descs,
            _bufs: bufs,
            status_gpa,
            in_segs,
            in_len: req.in_len as usize,
            submitted: Instant::now(),
        });
        self.push_avail(&[head])?;
        Ok(tag)
    }

    /// [`Queue::enqueue`] then [`Queue::notify`].
    pub fn submit(&mut self, req: &Request) -> Result<u64> {
        let tag = self.enqueue(req)?;
        self.notify()?;
        Ok(tag)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.iter().filter(|s| s.is_some()).count()
    }

    /// Waits until at least one request completes and returns all completed ones.
    ///
    /// A used element that matches no request in flight (unknown head, or a head completed
    /// twice) is an [`Error::Protocol`]; the completions reaped with it are kept for the next
    /// call.
    pub fn complete(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        if self.ready.is_empty() {
            let used = self.wait_used(timeout)?;
            self.match_used(used)?;
        }
        Ok(self.ready.drain(..).collect())
    }

    /// Returns the requests completed so far, without waiting.
    pub fn poll_complete(&mut self) -> Result<Vec<Completion>> {
        let used = self.poll_used()?;
        self.match_used(used)?;
        Ok(self.ready.drain(..).collect())
    }

    fn match_used(&mut self, used: Vec<crate::UsedElem>) -> Result<()> {
        let now = Instant::now();
        let mut stray = None;
        for u in used {
            let slot = self.inflight.get_mut(u.id as usize).and_then(Option::take);
            let Some(inf) = slot else {
                stray.get_or_insert(u);
                continue;
            };
            let mut status = [0u8];
            self.mem.read(inf.status_gpa, &mut status)?;
            let mut data = Vec::with_capacity(inf.in_len);
            for &(gpa, len) in &inf.in_segs {
                let at = data.len();
                data.resize(at + len, 0);
                self.mem.read(gpa, &mut data[at..])?;
            }
            self.free_descs(&inf.descs);
            self.ready.push_back(Completion {
                tag: inf.tag,
                head: u.id as u16,
                status: status[0],
                used_len: u.len,
                data,
                latency: now - inf.submitted,
            });
        }
        match stray {
            Some(u) => Err(Error::Protocol(format!(
                "queue {}: used element id {} len {} matches no request in flight",
                self.index, u.id, u.len
            ))),
            None => Ok(()),
        }
    }

    /// Submits `req` and waits for it (other completions that arrive meanwhile stay queued for
    /// [`Queue::complete`]).
    pub fn execute(&mut self, req: &Request, timeout: Duration) -> Result<Completion> {
        let tag = self.submit(req)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.ready.iter().position(|c| c.tag == tag) {
                return Ok(self.ready.remove(pos).unwrap());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let used = self.wait_used(left)?;
            self.match_used(used)?;
        }
    }

    /// Reads `len` bytes at `sector` (status not checked: see [`Completion::check`]).
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Completion> {
        self.execute(&Request::read(sector, len), SYNC_TIMEOUT)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<Completion> {
        self.execute(&Request::write(sector, data), SYNC_TIMEOUT)
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<Completion> {
        self.execute(&Request::flush(), SYNC_TIMEOUT)
    }

    /// Asks for the serial (20 bytes in [`Completion::data`]).
    pub fn get_id(&mut self) -> Result<Completion> {
        self.execute(&Request::get_id(), SYNC_TIMEOUT)
    }

    /// Discards `segs`.
    pub fn discard(&mut self, segs: &[Segment]) -> Result<Completion> {
        self.execute(&Request::discard(segs), SYNC_TIMEOUT)
    }

    /// Writes zeroes to `segs`.
    pub fn write_zeroes(&mut self, segs: &[Segment]) -> Result<Completion> {
        self.execute(&Request::write_zeroes(segs), SYNC_TIMEOUT)
    }
}

/// How long the synchronous helpers wait for their request.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    #[test]
    fn even_split_covers_the_data() {
        assert_eq!(split_lengths(&Split::Even(3), 10).unwrap(), vec![4, 3, 3]);
        assert_eq!(split_lengths(&Split::Even(8), 3).unwrap(), vec![1, 1, 1]);
        assert_eq!(split_lengths(&Split::One, 0).unwrap(), Vec::<usize>::new());
        assert!(split_lengths(&Split::Sizes(vec![1, 2]), 4).is_err());
    }

    #[test]
    fn chain_layout_is_discontiguous_and_ordered() {
        let mem = crate::GuestMem::with_size(1 << 20).unwrap();
        let mut q = Queue::new(&mem, 0, 16).unwrap();
        let req = Request::write(8, &[1u8; 1000]).with_layout(Layout::split(3));
        q.enqueue(&req).unwrap();
        // header + 3 data + status, linked 0 -> 1 -> 2 -> 3 -> 4
        let d: Vec<Desc> = (0..5).map(|i| q.read_desc(i).unwrap()).collect();
        assert_eq!(d[0].len, 16);
        assert_eq!(d[0].flags, VRING_DESC_F_NEXT as u16);
        assert_eq!(
            d[1..4].iter().map(|d| d.len).collect::<Vec<_>>(),
            vec![334, 333, 333]
        );
        assert_eq!(d[4].flags, VRING_DESC_F_WRITE as u16);
        for w in d.windows(2) {
            assert!(
                w[0].addr > w[1].addr + w[1].len as u64,
                "pieces descend with gaps"
            );
        }
        assert_eq!(
            mem.read_vec(d[0].addr, 16).unwrap()[0..4],
            VIRTIO_BLK_T_OUT.to_le_bytes()
        );
        assert_eq!(mem.read_vec(d[4].addr, 1).unwrap(), vec![0xff]);
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.free_desc_count(), 11);
    }

    #[test]
    fn merged_and_indirect_layouts() {
        let mem = crate::GuestMem::with_size(1 << 20).unwrap();
        let mut q = Queue::new(&mem, 0, 16).unwrap();
        let layout = Layout {
            merge_status: true,
            ..Layout::split(2)
        };
        assert!(
            q.enqueue(&Request::read(0, 1024).with_layout(layout.clone().indirect()))
                .is_err()
        );
        q.set_indirect(true);
        q.enqueue(&Request::read(0, 1024).with_layout(layout.indirect()))
            .unwrap();
        let head = q.read_desc(0).unwrap();
        assert_eq!(head.flags, VRING_DESC_F_INDIRECT as u16);
        assert_eq!(
            head.len, 48,
            "header + 2 data pieces, the last one holding the status"
        );
        let mut t = [0u8; 48];
        mem.read(head.addr, &mut t).unwrap();
        let t: Vec<Desc> = t
            .chunks(16)
            .map(|c| Desc::from_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(t[0].next, 1);
        assert_eq!(t[1].len, 512);
        assert_eq!(t[2].len, 513);
        assert_eq!(t[2].flags, VRING_DESC_F_WRITE as u16);
        assert_eq!(q.free_desc_count(), 15);
    }
}
