//! blktest: raw block-device test with O_DIRECT, discard and write-zeroes.
//!
//! ```text
//! blktest DEVICE [--seed S] [--ops N] [--mode full|write|verify]
//! ```
//!
//! Every 512-byte sector carries a pattern of (seed, sector, generation) (see
//! `guest_progs::fill_sector`); the program keeps the generation each sector must have and checks
//! every read against it. O_DIRECT bypasses the guest's page cache, so every read reaches the
//! device. Every I/O is a multiple of the device's logical block size (the unit) and starts on
//! one: with 512-byte logical blocks that is every size below, with 4 KiB blocks (vzram's
//! default) each size is rounded up to 4 KiB and the 4 KiB-unaligned cases cannot exist (the
//! guest kernel refuses O_DIRECT, discard and write-zeroes off the logical block). Phases:
//!
//! 1. fill: the whole device, sequentially, with a cycle of write sizes from 512 B to 1 MiB, so
//!    that writes start and end both on and off 4 KiB boundaries; every other write comes from a
//!    buffer that is 512 bytes off a page boundary (guest buffers split across pages);
//! 2. verify the whole device with a different cycle of read sizes (reads cross write edges);
//! 3. N overwrites of random ranges (half of them 4 KiB-aligned), each read back with 8 sectors
//!    of its neighbours, which a read-modify-write of a partial page must leave intact;
//! 4. BLKDISCARD of 4 KiB-aligned ranges: they must read back as zeroes (true for vzram and for
//!    a file backend with discard=unmap on tmpfs; virtio does not promise it in general);
//! 5. BLKZEROOUT of aligned and (with 512-byte blocks) unaligned ranges: zeroes, neighbours
//!    intact;
//! 6. N more overwrites (landing on discarded and zeroed ranges), then verify the whole device.
//!
//! `--mode write` runs phases 1 and 2 and flushes; `--mode verify` writes nothing and checks
//! that the device holds what `--mode write` (same seed, same size) left: a later guest, or the
//! same guest after its backend reconnected, sees the data of an earlier one.
//!
//! Prints a line per phase, the first bad sectors with what they hold instead, `VZRAM-INFO
//! blktest.*` lines and `bad=N`. Exit status 0 when all is well, 1 on bad data or an I/O error,
//! 2 on a usage or setup error.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

use guest_progs::{AnonMap, Args, Expect, SECTOR, ZEROED, describe_sector, fill_sector};
use pagemix::SplitMix64;

// Block-device ioctls of linux/fs.h (x86_64 values); the libc crate does not export these.
/// `_IOR(0x12, 114, size_t)`: device size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard the byte range `[u64 start, u64 len]`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero the byte range `[u64 start, u64 len]`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Largest single I/O.
const MAX_IO: u64 = MIB;
/// Sizes of the fill pass, cycled: 512 B .. 1 MiB, multiples of 4 KiB and not.
const FILL_SIZES: &[u64] = &[
    4 * KIB,
    512,
    MIB,
    1536,
    64 * KIB,
    8 * KIB,
    3584,
    128 * KIB,
    1024,
    12 * KIB,
    4608,
    256 * KIB,
    2048,
    16 * KIB + 512,
];
/// Sizes of the verify pass, cycled: different from the fill's so reads straddle write edges.
const READ_SIZES: &[u64] = &[
    MIB,
    4 * KIB,
    512,
    64 * KIB + 512,
    3072,
    256 * KIB,
    7680,
    8 * KIB,
    1024,
    512 * KIB,
];
/// Sizes of the random overwrites.
const OVERWRITE_SIZES: &[u64] = &[512, 1024, 2048, 3584, 4 * KIB, 4608, 8 * KIB, 64 * KIB, MIB];

struct Dev {
    file: File,
    /// The logical block size: every offset and length is a multiple of it.
    unit: u64,
    name: String,
    seed: u64,
    sectors: u64,
    /// The generation every sector must have; ZEROED for zeroes.
    generation: Vec<u32>,
    next_generation: u32,
    /// Only track what writes would have done (--mode verify).
    dry: bool,
    /// 2 MiB of page-aligned memory: I/O buffers at offset 0 or 512 (page-crossing).
    buf: AnonMap,
    scratch: Vec<u8>,
    bad: u64,
    reported: u32,
    writes: u64,
    aligned_writes: u64,
    reads: u64,
    read_bytes: u64,
    written_bytes: u64,
}

fn aligned(offset: u64, len: u64) -> bool {
    offset % (4 * KIB) == 0 && len % (4 * KIB) == 0
}

/// `n` rounded up to a multiple of `unit`.
fn round_up(n: u64, unit: u64) -> u64 {
    n.div_ceil(unit) * unit
}

impl Dev {
    /// Writes `len` bytes at `offset` with a new generation, from the buffer at `mem_off`.
    fn write(&mut self, offset: u64, len: u64, mem_off: usize) -> io::Result<()> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let first = offset / SECTOR as u64;
        if self.dry {
            for s in first..first + len / SECTOR as u64 {
                self.generation[s as usize] = generation;
            }
            return Ok(());
        }
        let seed = self.seed;
        let buf = &mut self.buf.as_mut_slice()[mem_off..mem_off + len as usize];
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let e = Expect {
                sector: first + i as u64,
                generation,
            };
            fill_sector(seed, e, sector);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io::Error::new(e.kind(), format!("write {len} bytes at {offset}: {e}")))?;
        for s in first..first + len / SECTOR as u64 {
            self.generation[s as usize] = generation;
        }
        self.writes += 1;
        self.written_bytes += len;
        if aligned(offset, len) {
            self.aligned_writes += 1;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` into the buffer at `mem_off` and checks every sector.
    fn check(&mut self, offset: u64, len: u64, mem_off: usize) -> io::Result<()> {
        let buf = &mut self.buf.as_mut_slice()[mem_off..mem_off + len as usize];
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io::Error::new(e.kind(), format!("read {len} bytes at {offset}: {e}")))?;
        self.reads += 1;
        self.read_bytes += len;
        let first = offset / SECTOR as u64;
        for (i, got) in buf.chunks_exact(SECTOR).enumerate() {
            let sector = first + i as u64;
            let generation = self.generation[sector as usize];
            fill_sector(self.seed, Expect { sector, generation }, &mut self.scratch);
            if got != &self.scratch[..] {
                self.bad += 1;
                if self.reported < 10 {
                    self.reported += 1;
                    let want = if generation == ZEROED {
                        "zeroes".to_string()
                    } else {
                        format!("generation {generation}")
                    };
                    println!(
                        "blktest: BAD sector {sector} (byte {}): want {want}, holds {}",
                        sector * SECTOR as u64,
                        describe_sector(self.seed, got)
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks `[offset, offset + len)` widened by 8 sectors (at least one logical block) each
    /// side, clipped to the device.
    fn check_around(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let margin = (8 * SECTOR as u64).max(self.unit);
        let start = offset.saturating_sub(margin) / self.unit * self.unit;
        let end = round_up(offset + len + margin, self.unit).min(self.sectors * SECTOR as u64);
        let mut at = start;
        while at < end {
            let n = (end - at).min(MAX_IO);
            self.check(at, n, 0)?;
            at += n;
        }
        Ok(())
    }

    fn check_all(&mut self, sizes: &[u64]) -> io::Result<u64> {
        let size = self.sectors * SECTOR as u64;
        let (mut at, mut ops) = (0, 0u64);
        while at < size {
            let n = round_up(sizes[ops as usize % sizes.len()], self.unit).min(size - at);
            self.check(at, n, if ops % 2 == 1 { 512 } else { 0 })?;
            at += n;
            ops += 1;
        }
        Ok(ops)
    }

    /// BLKDISCARD or BLKZEROOUT of a byte range; the range must then read as zeroes.
    fn zero_range(&mut self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: both ioctls read a [u64; 2] (start, length) from the pointer, which points to
        // a live array of that type; the fd is our open block device.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if r != 0 {
            let e = io::Error::last_os_error();
            let what = if request == BLKDISCARD {
                "BLKDISCARD"
            } else {
                "BLKZEROOUT"
            };
            return Err(io::Error::new(
                e.kind(),
                format!("{what} {len} bytes at {offset}: {e}"),
            ));
        }
        for s in offset / SECTOR as u64..(offset + len) / SECTOR as u64 {
            self.generation[s as usize] = ZEROED;
        }
        Ok(())
    }

    fn overwrites(&mut self, rng: &mut SplitMix64, ops: u64) -> io::Result<()> {
        for i in 0..ops {
            let len = OVERWRITE_SIZES[rng.below(OVERWRITE_SIZES.len() as u64) as usize];
            let len = round_up(len, self.unit).min(self.sectors * SECTOR as u64);
            let last = self.sectors - len / SECTOR as u64;
            let per_unit = self.unit / SECTOR as u64;
            let mut sector = rng.below(last + 1) / per_unit * per_unit;
            if rng.chance(0.5) {
                sector = sector / 8 * 8;
            }
            let offset = sector * SECTOR as u64;
            self.write(offset, len, if i % 2 == 1 { 512 } else { 0 })?;
            self.check_around(offset, len)?;
        }
        Ok(())
    }
}

fn sysfs_queue(name: &str, attr: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{name}/queue/{attr}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn phase(name: &str, t: Instant, dev: &Dev, what: String) {
    println!(
        "blktest: {name}: {what} in {} ms, bad so far {}",
        t.elapsed().as_millis(),
        dev.bad
    );
    let _ = io::stdout().flush();
}

fn run() -> Result<bool, String> {
    let mut args = Args::parse(std::env::args().skip(1))?;
    let seed: u64 = args.take("seed")?.unwrap_or(1);
    let ops: u64 = args.take("ops")?.unwrap_or(1000);
    let mode: String = args.take("mode")?.unwrap_or_else(|| "full".into());
    if !["full", "write", "verify"].contains(&mode.as_str()) {
        return Err(format!("--mode {mode}: expected full, write or verify"));
    }
    let rest = args.finish()?;
    let [path] = rest.as_slice() else {
        return Err("usage: blktest DEVICE [--seed S] [--ops N]".into());
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {path} O_DIRECT: {e}"))?;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(format!(
            "BLKGETSIZE64 {path}: {}",
            io::Error::last_os_error()
        ));
    }
    let name = path.rsplit('/').next().unwrap_or(path).to_string();
    let lbs = sysfs_queue(&name, "logical_block_size");
    let discard_max = sysfs_queue(&name, "discard_max_bytes");
    let discard_gran = sysfs_queue(&name, "discard_granularity");
    let zeroes_max = sysfs_queue(&name, "write_zeroes_max_bytes");
    println!(
        "blktest: {path}: {size} bytes, logical block {lbs}, discard_max_bytes {discard_max}, \
         discard_granularity {discard_gran}, write_zeroes_max_bytes {zeroes_max}"
    );
    println!(
        "VZRAM-INFO blktest.size={size} blktest.logical_block_size={lbs} \
         blktest.discard_max_bytes={discard_max} blktest.discard_granularity={discard_gran} \
         blktest.write_zeroes_max_bytes={zeroes_max}"
    );
    if lbs != SECTOR as u64 && lbs != 4 * KIB {
        return Err(format!(
            "logical block size {lbs}: this test knows 512 and 4096"
        ));
    }
    if lbs > SECTOR as u64 {
        // O_DIRECT below the logical block size: the guest kernel must refuse it (EINVAL)
        // before it reaches the device.
        let mut probe = AnonMap::new(4 * KIB as usize).map_err(|e| format!("mmap: {e}"))?;
        let r = file.read_at(&mut probe.as_mut_slice()[..SECTOR], 0);
        let verdict = match &r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => "rejected",
            Err(_) => "error",
            Ok(_) => "accepted",
        };
        println!("blktest: a {SECTOR}-byte O_DIRECT read on {lbs}-byte blocks: {r:?}");
        println!("VZRAM-INFO blktest.sub_block_io={verdict}");
    }
    if size < 8 * MIB || size % (4 * KIB) != 0 {
        return Err(format!(
            "device size {size}: need a multiple of 4 KiB, at least 8 MiB"
        ));
    }
    if discard_max == 0 {
        return Err(format!(
            "{path} does not support discard (discard_max_bytes 0)"
        ));
    }

    let sectors = size / SECTOR as u64;
    let mut dev = Dev {
        file,
        unit: lbs,
        name,
        seed,
        sectors,
        generation: vec![0; sectors as usize],
        next_generation: 1,
        dry: mode == "verify",
        buf: AnonMap::new((2 * MIB) as usize).map_err(|e| format!("mmap: {e}"))?,
        scratch: vec![0; SECTOR],
        bad: 0,
        reported: 0,
        writes: 0,
        aligned_writes: 0,
        reads: 0,
        read_bytes: 0,
        written_bytes: 0,
    };
    let mut rng = SplitMix64::new(seed ^ 0xb1c7);
    let all = Instant::now();
    let io = |e: io::Error| format!("I/O error: {e}");

    // 1. Fill (with --mode verify: only work out what the fill wrote).
    let t = Instant::now();
    let (mut at, mut n) = (0u64, 0u64);
    while at < size {
        let len = round_up(FILL_SIZES[n as usize % FILL_SIZES.len()], lbs).min(size - at);
        dev.write(at, len, if n % 2 == 1 { 512 } else { 0 })
            .map_err(io)?;
        at += len;
        n += 1;
    }
    let fill_ms = t.elapsed().as_millis();
    let what = if dev.dry {
        format!("{n} writes replayed, nothing written (--mode verify)")
    } else {
        format!(
            "{n} writes ({} 4K-aligned, {} not)",
            dev.aligned_writes,
            dev.writes - dev.aligned_writes
        )
    };
    phase("fill", t, &dev, what);

    // 2. Verify the whole device.
    let t = Instant::now();
    let reads = dev.check_all(READ_SIZES).map_err(io)?;
    let verify_ms = t.elapsed().as_millis();
    phase("verify", t, &dev, format!("{reads} reads"));
    if mode != "full" {
        dev.file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        println!(
            "blktest: --mode {mode} on {path}: {} writes, {} reads, {} ms, bad={}",
            dev.writes,
            dev.reads,
            all.elapsed().as_millis(),
            dev.bad
        );
        println!(
            "VZRAM-INFO blktest.mode={mode} blktest.bad={} blktest.writes={} blktest.reads={} \
             blktest.fill_ms={fill_ms} blktest.verify_ms={verify_ms}",
            dev.bad, dev.writes, dev.reads
        );
        return Ok(dev.bad == 0);
    }

    // 3. Random overwrites, each checked with its neighbours.
    let t = Instant::now();
    dev.overwrites(&mut rng, ops).map_err(io)?;
    phase("overwrite", t, &dev, format!("{ops} writes"));

    // 4. Discard 4 KiB-aligned ranges of several sizes.
    let t = Instant::now();
    let mut discards = 0;
    for len in [
        4 * KIB,
        8 * KIB,
        12 * KIB,
        64 * KIB,
        512 * KIB,
        MIB,
        4 * MIB,
    ] {
        for _ in 0..3 {
            let len = len.min(size / 4);
            let offset = rng.below((size - len) / (4 * KIB) + 1) * 4 * KIB;
            dev.zero_range(BLKDISCARD, offset, len).map_err(io)?;
            dev.check_around(offset, len).map_err(io)?;
            discards += 1;
        }
    }
    phase("discard", t, &dev, format!("{discards} ranges"));

    // 5. Write-zeroes, aligned and not.
    let t = Instant::now();
    let mut zeroouts = 0;
    for len in [512, 1536, 4 * KIB, 4 * KIB + 512, 12 * KIB, 64 * KIB, MIB] {
        // With 4 KiB logical blocks a range must be whole blocks: round it up, and there is
        // no unaligned variant.
        let len = round_up(len, lbs);
        for unaligned in [false, true] {
            if unaligned && lbs != SECTOR as u64 {
                continue;
            }
            let mut offset = rng.below((size - len) / SECTOR as u64 + 1) * SECTOR as u64;
            if !unaligned {
                offset = offset / (4 * KIB) * 4 * KIB;
            } else if offset % (4 * KIB) == 0 {
                offset += SECTOR as u64;
                if offset + len > size {
                    offset -= 2 * SECTOR as u64;
                }
            }
            dev.zero_range(BLKZEROOUT, offset, len).map_err(io)?;
            dev.check_around(offset, len).map_err(io)?;
            zeroouts += 1;
        }
    }
    phase("zeroout", t, &dev, format!("{zeroouts} ranges"));

    // 6. Overwrite again (over discarded and zeroed ranges too), then verify everything.
    let t = Instant::now();
    dev.overwrites(&mut rng, ops).map_err(io)?;
    dev.file.sync_all().map_err(|e| format!("fsync: {e}"))?;
    let reads = dev.check_all(&READ_SIZES[3..]).map_err(io)?;
    phase(
        "final",
        t,
        &dev,
        format!("{ops} writes, flush, {reads} reads"),
    );

    let zeroed = dev.generation.iter().filter(|g| **g == ZEROED).count();
    println!(
        "blktest: {} on {}: {} writes ({} MiB, {} 4K-aligned), {} reads ({} MiB), {discards} \
         discards, {zeroouts} write-zeroes, {zeroed} sectors zero at the end, {} ms, bad={}",
        path,
        dev.name,
        dev.writes,
        dev.written_bytes / MIB,
        dev.aligned_writes,
        dev.reads,
        dev.read_bytes / MIB,
        all.elapsed().as_millis(),
        dev.bad
    );
    println!(
        "VZRAM-INFO blktest.bad={} blktest.writes={} blktest.aligned_writes={} blktest.reads={} \
         blktest.discards={discards} blktest.zeroouts={zeroouts} blktest.fill_ms={fill_ms} \
         blktest.verify_ms={verify_ms} blktest.elapsed_ms={}",
        dev.bad,
        dev.writes,
        dev.aligned_writes,
        dev.reads,
        all.elapsed().as_millis()
    );
    Ok(dev.bad == 0)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            // An I/O error is a failed test, not a usage error.
            println!("blktest: {e}");
            if e.starts_with("I/O error") {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
