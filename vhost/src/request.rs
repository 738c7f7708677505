//! Parsing one virtio-blk descriptor chain from an untrusted guest into a typed [`Request`].
//!
//! Parsing runs every check a request needs before anything touches the store: the descriptor
//! walk, the direction of the buffers, that every buffer is guest memory, the header, the data
//! length and range, the disk's read-only flag, and each discard / write-zeroes segment. It
//! only reads guest memory (the header and the discard segments); `blk` executes what it
//! returns.
//!
//! Framing follows the byte-stream view of the virtio spec (VIRTIO_F_ANY_LAYOUT is implied
//! by VERSION_1): the device-readable descriptors form one stream (16-byte header, then data
//! going out), the device-writable ones another (data coming in, then one status byte at the
//! very end).

use crate::blk::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SECTORS_PER_PAGE};
use std::fmt;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;

/// One guest buffer (or the part of one that carries data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u64,
}

/// What a request asks of the disk. Offsets and lengths are in bytes and were checked to lie
/// on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into the data segments.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the data segments (`len` bytes) at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the serial into the data segments (at least 20 bytes of them).
    GetId,
    /// Free these page-aligned ranges.
    Discard(Ranges),
    /// Zero these ranges (any sector alignment).
    WriteZeroes(Ranges),
}

/// The byte ranges `(offset, len)` of a discard or write-zeroes request, in guest order.
#[derive(Clone, PartialEq, Eq)]
pub struct Ranges {
    list: [(u64, u64); MAX_DISCARD_SEG as usize],
    count: usize,
}

impl Ranges {
    pub fn as_slice(&self) -> &[(u64, u64)] {
        &self.list[..self.count]
    }
}

impl fmt::Debug for Ranges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A request that passed every check.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub kind: Kind,
    /// The data buffers, header and status byte taken off: the writable stream for reads and
    /// GET_ID, the readable stream for writes, empty otherwise. For reads and writes they hold
    /// exactly the request's length.
    pub data: &'a [Seg],
}

/// The outcome of parsing a chain.
#[derive(Debug)]
pub struct ParsedChain<'a> {
    /// Where the status byte goes, if the chain has a writable byte in guest memory for it
    /// (also for a request that failed its checks).
    pub status: Option<GuestAddress>,
    pub request: Result<Request<'a>, Error>,
}

/// What requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    /// Size in bytes.
    pub size: u64,
    pub readonly: bool,
}

/// Why a request failed: one log line and, through [`Error::status`], its status byte.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

impl Error {
    /// The status byte the guest gets: S_UNSUPP for what we do not implement, S_IOERR for
    /// everything else. The only place errors become statuses.
    pub fn status(&self) -> u8 {
        match self {
            Error::UnsupportedType(_) | Error::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A position in a list of segments read front to back.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cursor {
    seg: usize,
    off: u64,
}

impl Cursor {
    pub(crate) fn advance(&mut self, segs: &[Seg], mut n: u64) {
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

    /// The guest address under the cursor and how many bytes follow it in this segment (never
    /// 0: empty segments, which a guest may put in a chain, are stepped over, or a copy loop
    /// would make no progress and spin forever).
    fn here(&mut self, segs: &[Seg]) -> Option<(GuestAddress, u64)> {
        loop {
            let s = segs.get(self.seg)?;
            if self.off < s.len {
                return Some((GuestAddress(s.addr.0 + self.off), s.len - self.off));
            }
            self.seg += 1;
            self.off = 0;
        }
    }
}

/// Turns chains into requests; keeps its segment lists from one chain to the next so that
/// parsing allocates nothing once they have grown.
#[derive(Debug, Default)]
pub struct Parser {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser {
            readable: Vec::with_capacity(8),
            writable: Vec::with_capacity(8),
        }
    }

    /// Parses the descriptors of one chain, as the chain's iterator yields them. Reads guest
    /// memory, writes none.
    pub fn parse<I>(&mut self, descs: I, mem: &GuestMemoryMmap<()>, disk: &Disk) -> ParsedChain<'_>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let (status, framing) = self.frame(descs, mem);
        let request = match framing {
            Ok(()) => self.request(mem, disk),
            Err(e) => Err(e),
        };
        ParsedChain { status, request }
    }

    /// Splits the chain into the readable and writable streams and takes the status byte off
    /// the writable one. The status is found even when the chain is bad otherwise.
    fn frame<I>(
        &mut self,
        descs: I,
        mem: &GuestMemoryMmap<()>,
    ) -> (Option<GuestAddress>, Result<(), Error>)
    where
        I: IntoIterator<Item = Descriptor>,
    {
        self.readable.clear();
        self.writable.clear();
        let mut problem = None;
        let mut last_has_next = false;
        let mut any = false;
        for desc in descs {
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
                    problem = Some(Error::Malformed("readable buffer after a writable one"));
                }
                self.readable.push(seg);
            }
        }
        // The iterator ends silently on a loop, a next index out of range, a bad or nested
        // indirect table or a descriptor table outside memory; the last descriptor it gave
        // still says NEXT then.
        if !any {
            problem = Some(Error::Malformed("empty or unreadable descriptor chain"));
        } else if last_has_next {
            problem = Some(Error::Malformed(
                "chain ends at a bad next index, loop or table",
            ));
        }
        if problem.is_none()
            && self
                .readable
                .iter()
                .chain(self.writable.iter())
                .any(|s| !in_memory(mem, s.addr, s.len))
        {
            problem = Some(Error::BadAddress);
        }
        // The status byte is the last byte of the writable stream.
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
            problem = Some(Error::Malformed("no writable status byte"));
        }
        (status, problem.map_or(Ok(()), Err))
    }

    /// Reads the header and checks the request it describes; the chain is well framed.
    fn request(&mut self, mem: &GuestMemoryMmap<()>, disk: &Disk) -> Result<Request<'_>, Error> {
        if total(&self.readable) < HEADER_LEN {
            return Err(Error::Malformed("request header shorter than 16 bytes"));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        let mut cur = Cursor::default();
        gather(mem, &self.readable, &mut cur, &mut header)?;
        // The readable stream keeps only the data after the header.
        self.readable.drain(..cur.seg);
        if let Some(first) = self.readable.first_mut() {
            first.addr = GuestAddress(first.addr.0 + cur.off);
            first.len -= cur.off;
        }
        let typ = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let out_len = total(&self.readable);
        let in_len = total(&self.writable);
        let (kind, data): (Kind, &[Seg]) = match typ {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(Error::Malformed("read request with data to the device"));
                }
                let offset = check_range(disk, sector, in_len)?;
                let len = in_len;
                (Kind::Read { offset, len }, &self.writable[..])
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 {
                    return Err(Error::Malformed("write request with data from the device"));
                }
                if disk.readonly {
                    return Err(Error::ReadOnly);
                }
                let offset = check_range(disk, sector, out_len)?;
                let len = out_len;
                (Kind::Write { offset, len }, &self.readable[..])
            }
            // Every completed write is already in the store; FLUSH carries no data we look at.
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, &[]),
            VIRTIO_BLK_T_GET_ID => {
                if in_len < u64::from(VIRTIO_BLK_ID_BYTES) {
                    return Err(Error::Invalid("GET_ID buffer shorter than 20 bytes"));
                }
                (Kind::GetId, &self.writable[..])
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if disk.readonly {
                    return Err(Error::ReadOnly);
                }
                if in_len != 0 {
                    return Err(Error::Malformed("discard with data from the device"));
                }
                let discard = typ == VIRTIO_BLK_T_DISCARD;
                let ranges = ranges(mem, &self.readable, disk, discard)?;
                if discard {
                    (Kind::Discard(ranges), &[])
                } else {
                    (Kind::WriteZeroes(ranges), &[])
                }
            }
            other => return Err(Error::UnsupportedType(other)),
        };
        Ok(Request { kind, data })
    }
}

/// Reads and checks every segment of a DISCARD or WRITE_ZEROES payload: a bad one fails the
/// request before any runs.
fn ranges(
    mem: &GuestMemoryMmap<()>,
    payload: &[Seg],
    disk: &Disk,
    discard: bool,
) -> Result<Ranges, Error> {
    let out_len = total(payload);
    if out_len == 0 || out_len % DISCARD_SEGMENT_LEN != 0 {
        return Err(Error::Invalid(
            "discard payload not a whole number of 16-byte segments",
        ));
    }
    let count = out_len / DISCARD_SEGMENT_LEN;
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(Error::Invalid("more discard segments than max_discard_seg"));
    }
    let mut ranges = Ranges {
        list: [(0, 0); MAX_DISCARD_SEG as usize],
        count: count as usize,
    };
    // Discard knows no flags; write-zeroes knows UNMAP, which we always do anyway.
    let known = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    let mut cur = Cursor::default();
    for range in ranges.list.iter_mut().take(count as usize) {
        let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
        gather(mem, payload, &mut cur, &mut raw)?;
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let sectors = u64::from(u32::from_le_bytes(raw[8..12].try_into().unwrap()));
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
        if flags & !known != 0 {
            return Err(Error::UnsupportedFlags(flags));
        }
        if sectors > u64::from(MAX_DISCARD_SECTORS) {
            return Err(Error::Invalid(
                "discard segment longer than max_discard_sectors",
            ));
        }
        let offset = check_range(disk, sector, sectors * SECTOR_SIZE)?;
        if discard && (sector % SECTORS_PER_PAGE != 0 || sectors % SECTORS_PER_PAGE != 0) {
            return Err(Error::Invalid("discard not aligned to 4 KiB"));
        }
        *range = (offset, sectors * SECTOR_SIZE);
    }
    Ok(ranges)
}

/// Checks that `len` bytes from `sector` lie on the disk; returns the byte offset.
fn check_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, Error> {
    if len % SECTOR_SIZE != 0 {
        return Err(Error::Invalid("data length not a multiple of 512 bytes"));
    }
    let sectors = len / SECTOR_SIZE;
    match sector
        .checked_add(sectors)
        .and_then(|end| end.checked_mul(SECTOR_SIZE))
    {
        Some(end) if end <= disk.size => Ok(sector * SECTOR_SIZE),
        _ => Err(Error::OutOfRange { sector, sectors }),
    }
}

pub(crate) fn total(segs: &[Seg]) -> u64 {
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

/// Copies guest bytes at `cur` into `dst`, advancing the cursor.
pub(crate) fn gather(
    mem: &GuestMemoryMmap<()>,
    segs: &[Seg],
    cur: &mut Cursor,
    dst: &mut [u8],
) -> Result<(), Error> {
    let mut done = 0;
    while done < dst.len() {
        let (addr, left) = cur
            .here(segs)
            .ok_or(Error::Malformed("request data too short"))?;
        let n = (left as usize).min(dst.len() - done);
        mem.read_slice(&mut dst[done..done + n], addr)
            .map_err(|_| Error::BadAddress)?;
        cur.advance(segs, n as u64);
        done += n;
    }
    Ok(())
}

/// Copies `src` into the guest buffers at `cur`; returns the bytes written.
pub(crate) fn scatter(
    mem: &GuestMemoryMmap<()>,
    segs: &[Seg],
    cur: &mut Cursor,
    src: &[u8],
) -> Result<u64, Error> {
    let mut done = 0;
    while done < src.len() {
        let (addr, left) = cur
            .here(segs)
            .ok_or(Error::Malformed("request buffer too short"))?;
        let n = (left as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], addr)
            .map_err(|_| Error::BadAddress)?;
        cur.advance(segs, n as u64);
        done += n;
    }
    Ok(done as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x4000;
    const STATUS: u64 = 0x3000;
    /// Guest memory: 0..1 MiB, a hole, 2..3 MiB.
    const HOLE: u64 = 0x10_0000;
    const REGION1: u64 = 0x20_0000;
    const DISK: Disk = Disk {
        size: 1 << 20,
        readonly: false,
    };

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(REGION1), 0x10_0000),
        ])
        .unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn seg(addr: u64, len: u64) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn header(mem: &GuestMemoryMmap<()>, typ: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// A parsed request's kind and data, or its error's status byte and message.
    type Outcome = Result<(Kind, Vec<Seg>), (u8, String)>;

    /// Parses `descs` with a header of `typ` at `sector` at HDR; returns the status address
    /// and the kind and data, or the error's status byte and message.
    fn parse(descs: &[Descriptor], typ: u32, sector: u64, disk: &Disk) -> (Option<u64>, Outcome) {
        let mem = mem();
        header(&mem, typ, sector);
        let mut p = Parser::new();
        let parsed = p.parse(descs.iter().copied(), &mem, disk);
        let request = parsed
            .request
            .map(|r| (r.kind, r.data.to_vec()))
            .map_err(|e| (e.status(), e.to_string()));
        (parsed.status.map(|a| a.0), request)
    }

    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_takes_header_and_status_off_the_data() {
        let (status, req) = parse(
            &[d(HDR, 16, N), d(DATA, 4096, N | W), d(STATUS, 1, W)],
            VIRTIO_BLK_T_IN,
            8,
            &DISK,
        );
        assert_eq!(status, Some(STATUS));
        let (kind, data) = req.unwrap();
        assert_eq!(
            kind,
            Kind::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(data, [seg(DATA, 4096)]);
    }

    #[test]
    fn header_data_and_status_may_share_and_split_descriptors() {
        // Header split 10 + 6, the second part followed by data in the same descriptor; a
        // write's readable stream ends in the middle of nothing.
        let (status, req) = parse(
            &[
                d(HDR, 10, N),
                d(HDR + 10, 6 + 1024, N),
                d(DATA, 3072, N),
                d(STATUS, 1, W),
            ],
            VIRTIO_BLK_T_OUT,
            0,
            &DISK,
        );
        assert_eq!(status, Some(STATUS));
        let (kind, data) = req.unwrap();
        assert_eq!(
            kind,
            Kind::Write {
                offset: 0,
                len: 4096
            }
        );
        assert_eq!(data, [seg(HDR + 16, 1024), seg(DATA, 3072)]);
        // Data and status in one writable descriptor, after zero-length ones.
        let (status, req) = parse(
            &[d(HDR, 16, N), d(DATA, 513, N | W), d(STATUS, 0, W)],
            VIRTIO_BLK_T_IN,
            0,
            &DISK,
        );
        assert_eq!(status, Some(DATA + 512));
        assert_eq!(req.unwrap().1, [seg(DATA, 512)]);
    }

    #[test]
    fn discard_and_write_zeroes_segments_become_byte_ranges() {
        let mem = mem();
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut payload = Vec::new();
        for (sector, n, flags) in [(5u64, 14u32, 1u32), (16, 8, 0)] {
            payload.extend_from_slice(&sector.to_le_bytes());
            payload.extend_from_slice(&n.to_le_bytes());
            payload.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        let mut p = Parser::new();
        let descs = [d(HDR, 16, N), d(DATA, 32, N), d(STATUS, 1, W)];
        let parsed = p.parse(descs, &mem, &DISK);
        let req = parsed.request.unwrap();
        assert!(req.data.is_empty());
        match req.kind {
            Kind::WriteZeroes(r) => assert_eq!(r.as_slice(), [(2560, 7168), (8192, 4096)]),
            other => panic!("{other:?}"),
        }
    }

    /// Every check, and the status its failure gives; the status byte is found regardless.
    #[test]
    fn every_check_fails_with_its_status() {
        let ro = Disk {
            readonly: true,
            ..DISK
        };
        let good_tail = [d(DATA, 512, N | W), d(STATUS, 1, W)];
        let read = |first: Descriptor| [first, good_tail[0], good_tail[1]];
        type Case<'a> = (
            &'a str,
            Vec<Descriptor>,
            u32,
            u64,
            &'a Disk,
            Option<u64>,
            u8,
        );
        let cases: Vec<Case> = vec![
            (
                "empty chain",
                vec![],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                None,
                IOERR,
            ),
            (
                "walk ended early",
                vec![d(HDR, 16, N), d(STATUS, 1, W | N)],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "readable after writable",
                vec![d(HDR, 16, N), d(STATUS, 1, N | W), d(DATA, 512, 0)],
                VIRTIO_BLK_T_OUT,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "data in the hole",
                vec![d(HDR, 16, N), d(HOLE, 512, N | W), d(STATUS, 1, W)],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "data across the end of memory",
                vec![
                    d(HDR, 16, N),
                    d(REGION1 + 0xF_F000, 8192, N | W),
                    d(STATUS, 1, W),
                ],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "no status",
                vec![d(HDR, 16, 0)],
                VIRTIO_BLK_T_FLUSH,
                0,
                &DISK,
                None,
                IOERR,
            ),
            (
                "status in the hole",
                vec![d(HDR, 16, N), d(HOLE, 1, W)],
                VIRTIO_BLK_T_FLUSH,
                0,
                &DISK,
                None,
                IOERR,
            ),
            (
                "short header",
                read(d(HDR, 15, N)).to_vec(),
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "read with data going out",
                vec![d(HDR, 16 + 512, N), d(DATA, 512, N | W), d(STATUS, 1, W)],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "write with data coming in",
                read(d(HDR, 16, N)).to_vec(),
                VIRTIO_BLK_T_OUT,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "write to a read-only disk",
                vec![d(HDR, 16 + 512, N), d(STATUS, 1, W)],
                VIRTIO_BLK_T_OUT,
                0,
                &ro,
                Some(STATUS),
                IOERR,
            ),
            (
                "odd length",
                vec![d(HDR, 16, N), d(DATA, 1000, N | W), d(STATUS, 1, W)],
                VIRTIO_BLK_T_IN,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "past the end",
                read(d(HDR, 16, N)).to_vec(),
                VIRTIO_BLK_T_IN,
                DISK.size / 512,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "sector overflow",
                read(d(HDR, 16, N)).to_vec(),
                VIRTIO_BLK_T_IN,
                u64::MAX,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "short GET_ID buffer",
                vec![d(HDR, 16, N), d(DATA, 19, N | W), d(STATUS, 1, W)],
                VIRTIO_BLK_T_GET_ID,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "discard on a read-only disk",
                vec![d(HDR, 16 + 16, N), d(STATUS, 1, W)],
                VIRTIO_BLK_T_DISCARD,
                0,
                &ro,
                Some(STATUS),
                IOERR,
            ),
            (
                "discard with data coming in",
                vec![d(HDR, 16 + 16, N), d(DATA, 16, N | W), d(STATUS, 1, W)],
                VIRTIO_BLK_T_DISCARD,
                0,
                &DISK,
                Some(STATUS),
                IOERR,
            ),
            (
                "unknown type, whatever the data",
                vec![d(HDR, 16 + 7, N), d(DATA, 3, N | W), d(STATUS, 1, W)],
                99,
                0,
                &DISK,
                Some(STATUS),
                UNSUPP,
            ),
        ];
        for (name, descs, typ, sector, disk, want_status, want) in cases {
            let (status, req) = parse(&descs, typ, sector, disk);
            assert_eq!(status, want_status, "{name}: status address");
            match req {
                Err((s, _)) => assert_eq!(s, want, "{name}: status byte"),
                Ok(r) => panic!("{name}: parsed as {r:?}"),
            }
        }
    }

    #[test]
    fn discard_segments_are_checked_one_by_one() {
        let end = DISK.size / 512;
        // (segments, discard?, expected status or Ok)
        type Case<'a> = (&'a [(u64, u32, u32)], bool, Option<u8>);
        let cases: &[Case] = &[
            (&[(0, 8, 0)], true, None),
            (&[(0, 8, 1)], true, Some(UNSUPP)),
            (&[(0, 8, 1)], false, None),
            (&[(0, 8, 2)], false, Some(UNSUPP)),
            (&[(1, 8, 0)], true, Some(IOERR)),
            (&[(1, 7, 0)], false, None),
            (&[(0, 4, 0)], true, Some(IOERR)),
            (&[(end - 8, 16, 0)], true, Some(IOERR)),
            (&[(u64::MAX - 7, 8, 0)], false, Some(IOERR)),
            (&[(0, u32::MAX, 0)], false, Some(IOERR)),
            (&[(0, 8, 0), (end, 8, 0)], true, Some(IOERR)),
            // A bad flag behind a range error: the first bad segment decides.
            (&[(end, 8, 0), (0, 8, 4)], true, Some(IOERR)),
        ];
        for &(segs, discard, want) in cases {
            let mem = mem();
            let typ = if discard {
                VIRTIO_BLK_T_DISCARD
            } else {
                VIRTIO_BLK_T_WRITE_ZEROES
            };
            header(&mem, typ, 0);
            let mut payload = Vec::new();
            for &(sector, n, flags) in segs {
                payload.extend_from_slice(&sector.to_le_bytes());
                payload.extend_from_slice(&n.to_le_bytes());
                payload.extend_from_slice(&flags.to_le_bytes());
            }
            mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
            let descs = [
                d(HDR, 16, N),
                d(DATA, payload.len() as u32, N),
                d(STATUS, 1, W),
            ];
            let mut p = Parser::new();
            let got = p.parse(descs, &mem, &DISK).request.map_err(|e| e.status());
            match want {
                None => assert!(got.is_ok(), "{segs:?}: {got:?}"),
                Some(s) => assert_eq!(got.err(), Some(s), "{segs:?}"),
            }
        }
        // Payload sizes: none, not whole segments, too many segments.
        for len in [0u32, 24, 33 * 16] {
            let (_, req) = parse(
                &[d(HDR, 16 + len, N), d(STATUS, 1, W)],
                VIRTIO_BLK_T_DISCARD,
                0,
                &DISK,
            );
            assert_eq!(req.unwrap_err().0, IOERR, "payload of {len} bytes");
        }
    }

    /// A guest may put empty descriptors anywhere in a chain; copying across them must step
    /// over them. (Found by the property test below: a copy loop that made no progress on an
    /// empty segment spun forever, a queue worker burning a core.)
    #[test]
    fn empty_descriptors_are_stepped_over() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = mem();
            header(&mem, VIRTIO_BLK_T_IN, 0);
            let mut p = Parser::new();
            let split = [
                d(HDR, 0, N),
                d(HDR, 8, N),
                d(HDR + 8, 0, N),
                d(HDR + 8, 8, N),
                d(DATA, 0, N | W),
                d(DATA, 4096, N | W),
                d(STATUS, 1, W),
            ];
            let r = p.parse(split, &mem, &DISK).request.map(|r| r.kind);
            let _ = tx.send(format!("{r:?}"));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("parsing a chain with empty descriptors finishes");
        assert!(got.starts_with("Ok(Read"), "{got}");
    }

    #[test]
    fn a_parser_forgets_the_previous_chain() {
        let mem = mem();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut p = Parser::new();
        let long = [d(HDR, 16, N), d(DATA, 8192, N | W), d(STATUS, 1, W)];
        assert_eq!(p.parse(long, &mem, &DISK).request.unwrap().data.len(), 1);
        let flush = [d(HDR, 16, N), d(STATUS, 1, W)];
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let parsed = p.parse(flush, &mem, &DISK);
        assert_eq!(parsed.request.unwrap().kind, Kind::Flush);
        assert_eq!(total(&p.writable), 0);
    }

    fn arb_desc() -> impl proptest::strategy::Strategy<Value = Descriptor> {
        use proptest::prelude::*;
        let addr = prop_oneof![
            3 => (0u64..4).prop_map(|i| HDR + i * 8),
            3 => (0u64..0x1000).prop_map(|o| DATA + o),
            1 => Just(HOLE - 8),
            1 => Just(REGION1 + 0xF_FFF0),
            1 => any::<u64>(),
        ];
        let len = prop_oneof![4 => 0u32..5000, 2 => 0u32..20, 1 => Just(u32::MAX)];
        let flags = prop_oneof![Just(N), Just(N | W), Just(W), Just(0u16)];
        (addr, len, flags).prop_map(|(a, l, f)| d(a, l, f))
    }

    proptest::proptest! {
        /// Whatever the chain: the data segments of a parsed request lie in guest memory,
        /// inside the descriptors they came from, carry exactly the request's bytes, and the
        /// status byte is none of them.
        #[test]
        fn parsed_requests_stay_inside_their_descriptors(
            descs in proptest::collection::vec(arb_desc(), 0..6),
            typ in 0u32..12,
            sector in 0u64..300,
        ) {
            let mem = mem();
            header(&mem, typ, sector);
            let mut p = Parser::new();
            let parsed = p.parse(descs.iter().copied(), &mem, &DISK);
            let Ok(req) = parsed.request else { return Ok(()) };
            let status = parsed.status.expect("a parsed request has a status byte").0;
            for s in req.data {
                proptest::prop_assert!(in_memory(&mem, s.addr, s.len));
                let inside = descs.iter().any(|d| {
                    d.addr().0 <= s.addr.0
                        && s.addr.0 + s.len <= d.addr().0.saturating_add(u64::from(d.len()))
                });
                proptest::prop_assert!(inside, "{s:?} is in no descriptor");
                proptest::prop_assert!(status < s.addr.0 || status >= s.addr.0 + s.len);
            }
            match req.kind {
                Kind::Read { len, .. } | Kind::Write { len, .. } => {
                    proptest::prop_assert_eq!(total(req.data), len)
                }
                Kind::GetId => proptest::prop_assert!(total(req.data) >= 20),
                _ => proptest::prop_assert!(req.data.is_empty()),
            }
        }
    }
}
