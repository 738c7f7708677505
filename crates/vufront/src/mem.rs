//! Guest memory: memfd-backed regions at chosen guest-physical addresses, and an allocator.

use crate::virtio::Desc;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Where [`GuestMem::with_size`] puts its single region. Not 0: the first megabyte stays
/// unmapped, so a descriptor with a null or small address points at nothing.
pub const DEFAULT_GUEST_BASE: u64 = 0x10_0000;

/// One region of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start address (page-aligned).
    pub gpa: u64,
    /// Size in bytes (page-aligned, non-zero).
    pub size: u64,
}

/// Guest memory shared with the backend.
///
/// All regions live in one memfd, region `i` at the file offset that is the sum of the sizes
/// before it: from the second region on, the backend must honour `mmap_offset`, as it must with
/// QEMU. Pages are allocated lazily by the kernel (a large, mostly idle memory costs nothing).
///
/// The allocator is first-fit over free extents per region and never returns a range that
/// crosses a region boundary, so every allocation is contiguous in host memory too.
#[derive(Debug)]
pub struct GuestMem {
    mem: GuestMemoryMmap<()>,
    regions: Vec<RegionSpec>,
    // Per region: free extents, start gpa -> length.
    free: Mutex<Vec<BTreeMap<u64, u64>>>,
    _memfd: File,
}

const PAGE: u64 = 4096;

impl GuestMem {
    /// Guest memory with the given regions (sorted, non-overlapping, page-aligned).
    pub fn new(regions: &[RegionSpec]) -> Result<Arc<GuestMem>> {
        if regions.is_empty() {
            return Err(Error::Invalid(
                "guest memory needs at least one region".into(),
            ));
        }
        let mut end = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0 || r.gpa % PAGE != 0 || r.size % PAGE != 0 {
                return Err(Error::Invalid(format!(
                    "region {i} ({:#x}+{:#x}) must be non-empty and page-aligned",
                    r.gpa, r.size
                )));
            }
            if i > 0 && r.gpa < end {
                return Err(Error::Invalid(format!(
                    "region {i} at {:#x} overlaps or precedes the one before",
                    r.gpa
                )));
            }
            end = r
                .gpa
                .checked_add(r.size)
                .ok_or_else(|| Error::Invalid(format!("region {i} wraps the address space")))?;
        }
        let total: u64 = regions.iter().map(|r| r.size).sum();
        let memfd = memfd("vufront-guest")?;
        memfd.set_len(total)?;

        let mut mapped = Vec::with_capacity(regions.len());
        let mut offset = 0u64;
        for r in regions {
            let fo = FileOffset::new(memfd.try_clone()?, offset);
            let region =
                GuestRegionMmap::from_range(GuestAddress(r.gpa), r.size as usize, Some(fo))
                    .map_err(|e| Error::Memory(format!("map {:#x}+{:#x}: {e}", r.gpa, r.size)))?;
            mapped.push(region);
            offset += r.size;
        }
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| Error::Memory(format!("build guest memory: {e}")))?;
        let free = regions
            .iter()
            .map(|r| BTreeMap::from([(r.gpa, r.size)]))
            .collect();
        Ok(Arc::new(GuestMem {
            mem,
            regions: regions.to_vec(),
            free: Mutex::new(free),
            _memfd: memfd,
        }))
    }

    /// One region of `size` bytes (rounded up to pages) at [`DEFAULT_GUEST_BASE`].
    pub fn with_size(size: u64) -> Result<Arc<GuestMem>> {
        GuestMem::new(&[RegionSpec {
            gpa: DEFAULT_GUEST_BASE,
            size: size.max(PAGE).div_ceil(PAGE) * PAGE,
        }])
    }

    /// The vm-memory view the frontend uses.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The regions as created.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }

    /// The regions as `SET_MEM_TABLE` / `ADD_MEM_REG` describe them (fds stay owned here).
    pub fn vhost_regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| Error::Memory(format!("region {:#x}: {e}", r.start_addr().0)))
            })
            .collect()
    }

    /// The frontend's (our process's) virtual address of `gpa`: what `SET_VRING_ADDR` carries.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| Error::Memory(format!("{gpa:#x}: {e}")))
    }

    /// Whether `[gpa, gpa + len)` is mapped (it may span adjacent regions).
    pub fn is_mapped(&self, gpa: u64, len: usize) -> bool {
        GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), len)
    }

    /// Allocates `len` bytes (at least 1) aligned to `align` (a power of two), zero-filled.
    pub fn alloc(self: &Arc<Self>, len: usize, align: usize) -> Result<GuestBuf> {
        let gpa = self.alloc_raw(len.max(1) as u64, align.max(1) as u64)?;
        let buf = GuestBuf {
            mem: Arc::clone(self),
            gpa,
            len,
        };
        buf.fill(0)?;
        Ok(buf)
    }

    fn alloc_raw(&self, len: u64, align: u64) -> Result<u64> {
        if !align.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "alignment {align} is not a power of two"
            )));
        }
        // Multiples of 8 keep the free lists short.
        let len = len.div_ceil(8) * 8;
        let mut free = self.free.lock().unwrap();
        for extents in free.iter_mut() {
            let found = extents.iter().find_map(|(&start, &size)| {
                let at = start.checked_add(align - 1)? & !(align - 1);
                (at + len <= start + size).then_some((start, size, at))
            });
            if let Some((start, size, at)) = found {
                extents.remove(&start);
                if at > start {
                    extents.insert(start, at - start);
                }
                let end = start + size;
                if at + len < end {
                    extents.insert(at + len, end - (at + len));
                }
                return Ok(at);
            }
        }
        Err(Error::OutOfMemory(len as usize))
    }

    fn free_raw(&self, gpa: u64, len: u64) {
        let len = len.max(1).div_ceil(8) * 8;
        let Some(ri) = self
            .regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
        else {
            return;
        };
        let mut free = self.free.lock().unwrap();
        let extents = &mut free[ri];
        let (mut start, mut size) = (gpa, len);
        if let Some((&pstart, &psize)) = extents.range(..gpa).next_back() {
            debug_assert!(pstart + psize <= gpa, "double free at {gpa:#x}");
            if pstart + psize == gpa {
                extents.remove(&pstart);
                start = pstart;
                size += psize;
            }
        }
        if let Some(&nsize) = extents.get(&(gpa + len)) {
            extents.remove(&(gpa + len));
            size += nsize;
        }
        extents.insert(start, size);
    }

    /// Bytes not allocated, over all regions.
    pub fn free_bytes(&self) -> u64 {
        let free = self.free.lock().unwrap();
        free.iter().flat_map(|e| e.values()).sum()
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("write {:#x}+{}: {e}", gpa, data.len())))
    }

    /// Reads `out.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(out, GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("read {:#x}+{}: {e}", gpa, out.len())))
    }

    /// Reads `len` bytes at `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        const CHUNK: usize = 4096;
        let block = [byte; CHUNK];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write(gpa + done as u64, &block[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes descriptors at `gpa` (an indirect table, or anything a test wants there).
    pub fn write_descs(&self, gpa: u64, descs: &[Desc]) -> Result<()> {
        let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
        self.write(gpa, &bytes)
    }

    pub(crate) fn load_u16(&self, gpa: u64, order: Ordering) -> Result<u16> {
        self.mem
            .load::<u16>(GuestAddress(gpa), order)
            .map(u16::from_le)
            .map_err(|e| Error::Memory(format!("load {gpa:#x}: {e}")))
    }

    pub(crate) fn store_u16(&self, gpa: u64, val: u16, order: Ordering) -> Result<()> {
        self.mem
            .store(val.to_le(), GuestAddress(gpa), order)
            .map_err(|e| Error::Memory(format!("store {gpa:#x}: {e}")))
    }
}

fn memfd(name: &str) -> Result<File> {
    let cname = std::ffi::CString::new(name).expect("no NUL in memfd name");
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create
    // reads it and returns a new fd or -1, touching no other memory.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert_eq!(owned.as_raw_fd(), fd);
    Ok(File::from(owned))
}

/// An allocation in guest memory, freed when dropped.
///
/// Dropping a buffer that a backend still uses (a request in flight) hands its range to the next
/// allocation; the request API keeps buffers alive until their request completes.
#[derive(Debug)]
pub struct GuestBuf {
    mem: Arc<GuestMem>,
    gpa: u64,
    len: usize,
}

impl GuestBuf {
    /// Guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes as requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `offset` within the buffer.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        self.mem.write(self.gpa + offset as u64, data)
    }

    /// Reads into `out` from `offset` within the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        self.mem.read(self.gpa + offset as u64, out)
    }

    /// The whole buffer as a vector.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        self.mem.read_vec(self.gpa, self.len)
    }

    /// Fills the whole buffer with `byte`.
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.mem.fill(self.gpa, self.len, byte)
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Invalid(format!(
                "{offset}+{len} is outside a {}-byte guest buffer",
                self.len
            )));
        }
        Ok(())
    }
}

impl Drop for GuestBuf {
    fn drop(&mut self) {
        self.mem.free_raw(self.gpa, self.len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_with_a_gap() {
        let mem = GuestMem::new(&[
            RegionSpec {
                gpa: 0x10_0000,
                size: 0x10_0000,
            },
            RegionSpec {
                gpa: 0x100_0000,
                size: 0x2000,
            },
        ])
        .unwrap();
        assert!(mem.is_mapped(0x10_0000, 0x10_0000));
        assert!(!mem.is_mapped(0x20_0000, 1), "the gap is unmapped");
        assert!(mem.is_mapped(0x100_1fff, 1));
        assert!(mem.write(0x30_0000, &[1]).is_err());
        let regions = mem.vhost_regions().unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(
            regions[1].mmap_offset, 0x10_0000,
            "second region follows in the memfd"
        );
        mem.write(0x100_0010, b"hello").unwrap();
        assert_eq!(mem.read_vec(0x100_0010, 5).unwrap(), b"hello");
    }

    #[test]
    fn allocator_aligns_frees_and_coalesces() {
        let mem = GuestMem::with_size(64 * 1024).unwrap();
        let total = mem.free_bytes();
        let a = mem.alloc(100, 16).unwrap();
        let b = mem.alloc(4096, 4096).unwrap();
        let c = mem.alloc(1, 1).unwrap();
        assert_eq!(b.gpa() % 4096, 0);
        assert!(a.gpa() + 100 <= b.gpa() || b.gpa() + 4096 <= a.gpa());
        a.write_at(0, &[7; 100]).unwrap();
        assert!(a.write_at(1, &[7; 100]).is_err(), "bounds are checked");
        drop(b);
        drop(a);
        drop(c);
        assert_eq!(mem.free_bytes(), total, "everything coalesced back");
        // The whole region is one extent again: a full-size allocation fits.
        let all = mem.alloc(total as usize, 4096).unwrap();
        assert!(mem.alloc(1, 1).is_err());
        drop(all);
        // Allocations are zeroed even when the range was used before.
        let d = mem.alloc(64, 8).unwrap();
        d.fill(0xff).unwrap();
        let gpa = d.gpa();
        drop(d);
        let e = mem.alloc(64, 8).unwrap();
        assert_eq!(e.gpa(), gpa);
        assert_eq!(e.to_vec().unwrap(), vec![0u8; 64]);
    }
}
