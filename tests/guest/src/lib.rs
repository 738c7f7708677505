//! Shared pieces of the programs that run inside the test guest (`swaptest`, `blktest`).
//!
//! These programs are built statically (`+crt-static`) and run from a busybox initramfs, so they
//! use nothing but `std`, `libc` and `pagemix`. What they report for the host goes to stdout as
//! `VZRAM-INFO key=value ...` lines, which the host-side runner (`guest-tests`) collects; every
//! key is prefixed with the program's name (`swaptest.bad=0`).
//!
//! The logic that decides pass or fail (the sector pattern, `/proc/meminfo` parsing, argument
//! parsing) lives here so that it is unit-tested on the host by `cargo test`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

/// Sector size of the block layer's addressing (BLKDISCARD, BLKZEROOUT and the pattern below).
pub const SECTOR: usize = 512;

/// `--key value` / `--key=value` options and positional arguments, without a dependency.
#[derive(Debug, Default)]
pub struct Args {
    opts: BTreeMap<String, String>,
    /// Arguments that are not options, in order.
    pub positional: Vec<String>,
}

impl Args {
    /// Parses `args` (without the program name). Every option takes a value.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Args, String> {
        let mut out = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            if let Some(opt) = arg.strip_prefix("--") {
                let (key, value) = match opt.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => {
                        let v = it.next().ok_or_else(|| format!("--{opt} needs a value"))?;
                        (opt.to_string(), v)
                    }
                };
                if out.opts.insert(key.clone(), value).is_some() {
                    return Err(format!("--{key} given twice"));
                }
            } else {
                out.positional.push(arg);
            }
        }
        Ok(out)
    }

    /// Takes option `key`, parsed; `None` if absent.
    pub fn take<T: FromStr>(&mut self, key: &str) -> Result<Option<T>, String>
    where
        T::Err: Display,
    {
        match self.opts.remove(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| format!("--{key}={v}: {e}")),
        }
    }

    /// Fails on options nobody took (typos must not silently change a test).
    pub fn finish(self) -> Result<Vec<String>, String> {
        match self.opts.keys().next() {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(self.positional),
        }
    }
}

/// An anonymous private mapping, unmapped on drop: page-aligned memory for O_DIRECT buffers and
/// for swaptest's workload (which must be anonymous memory, the kind that goes to swap).
#[derive(Debug)]
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// Maps `len` bytes of zero-filled, page-aligned anonymous memory.
    pub fn new(len: usize) -> std::io::Result<AnonMap> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; it aliases
        // nothing. MAP_NORESERVE: swaptest's point is to use more memory than the guest has,
        // backed by swap; the overcommit heuristic must not refuse it up front.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonMap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The whole mapping.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our own readable and writable mapping, alive as long as self,
        // and the &mut self borrow makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); no slice into it outlives self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// `/proc/meminfo` as kB values by name (`MemTotal`, `SwapFree`, ...).
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.trim().to_string(), value))
        })
        .collect()
}

/// The guest's `/proc/meminfo`.
pub fn meminfo() -> std::io::Result<BTreeMap<String, u64>> {
    Ok(parse_meminfo(&std::fs::read_to_string("/proc/meminfo")?))
}

/// Swap in use, in KiB, from a meminfo map.
pub fn swap_used_kib(mi: &BTreeMap<String, u64>) -> u64 {
    mi.get("SwapTotal")
        .unwrap_or(&0)
        .saturating_sub(*mi.get("SwapFree").unwrap_or(&0))
}

/// The content blktest expects in a sector.
///
/// A sector is identified by its number and a generation: each write of a range gives it a new
/// generation, so a stale sector (a write that got lost, or a read that returned an older
/// version) is told apart from a current one. Generation [`ZEROED`] means "discarded or
/// zeroed: all zero bytes".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Sector number on the device.
    pub sector: u64,
    /// Generation; [`ZEROED`] for zeroes.
    pub generation: u32,
}

/// The generation of a sector that must read as zeroes.
pub const ZEROED: u32 = u32::MAX;

const MAGIC: u64 = 0x767a_626c_6b00_0000; // "vzblk\0\0\0"

/// Fills `out` (one sector) with the pattern of `e` under `seed`.
///
/// Word 0 is `MAGIC ^ sector`, word 1 `generation << 32 | seed as u32`: enough to say whose data
/// a wrong sector holds. The other 62 words are pseudo-random from (seed, sector, generation),
/// so a sector shifted by a few bytes, or mixed with its neighbour, never matches.
pub fn fill_sector(seed: u64, e: Expect, out: &mut [u8]) {
    assert_eq!(out.len(), SECTOR);
    if e.generation == ZEROED {
        out.fill(0);
        return;
    }
    let mut rng = pagemix::SplitMix64::new(
        seed ^ e.sector.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (e.generation as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    );
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => MAGIC ^ e.sector,
            1 => (e.generation as u64) << 32 | (seed & 0xffff_ffff),
            _ => rng.next_u64(),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// What a sector that did not match holds, for the error report.
pub fn describe_sector(seed: u64, data: &[u8]) -> String {
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
    if data.iter().all(|&b| b == 0) {
        return "zeroes".to_string();
    }
    let (w0, w1) = (word(0), word(1));
    // Sector numbers stay below 2^40, so blktest's own data keeps MAGIC's top three bytes.
    if (w0 ^ MAGIC) < (1 << 40) {
        let sector = w0 ^ MAGIC;
        let generation = (w1 >> 32) as u32;
        let mut expect = vec![0u8; SECTOR];
        fill_sector(seed, Expect { sector, generation }, &mut expect);
        let intact = if expect == data { "intact" } else { "damaged" };
        return format!("sector {sector} generation {generation} ({intact})");
    }
    format!("unknown data starting {w0:#018x} {w1:#018x}")
}

/// Offsets and lengths kept 512-byte aligned while walking the device (O_DIRECT needs that).
pub fn round_down(v: u64, to: u64) -> u64 {
    v / to * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_both_forms_and_reject_leftovers() {
        let mut a = Args::parse(
            ["--mib", "64", "/dev/vda", "--seed=7"]
                .iter()
                .map(|s| s.to_string()),
        )
        .unwrap();
        assert_eq!(a.take::<u64>("mib").unwrap(), Some(64));
        assert_eq!(a.take::<u64>("seed").unwrap(), Some(7));
        assert_eq!(a.take::<u64>("threads").unwrap(), None);
        assert_eq!(a.finish().unwrap(), vec!["/dev/vda".to_string()]);

        let mut a = Args::parse(["--mib=x".to_string()]).unwrap();
        assert!(a.take::<u64>("mib").unwrap_err().contains("--mib=x"));
        let a = Args::parse(["--typo=1".to_string()]).unwrap();
        assert_eq!(a.finish().unwrap_err(), "unknown option --typo");
        assert!(Args::parse(["--mib".to_string()]).is_err());
        assert!(Args::parse(["--a=1".to_string(), "--a=2".to_string()]).is_err());
    }

    #[test]
    fn meminfo_parses_kib_values() {
        let mi = parse_meminfo(
            "MemTotal:         123456 kB\nSwapTotal:  1000 kB\nSwapFree:  400 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(mi["MemTotal"], 123456);
        assert_eq!(mi["HugePages_Total"], 0);
        assert_eq!(swap_used_kib(&mi), 600);
        assert_eq!(swap_used_kib(&BTreeMap::new()), 0);
    }

    #[test]
    fn sectors_differ_by_number_generation_and_seed() {
        let page = |seed, sector, generation| {
            let mut b = vec![0u8; SECTOR];
            fill_sector(seed, Expect { sector, generation }, &mut b);
            b
        };
        let a = page(1, 10, 1);
        assert_eq!(a, page(1, 10, 1));
        assert_ne!(a, page(1, 11, 1));
        assert_ne!(a, page(1, 10, 2));
        assert_ne!(a, page(2, 10, 1));
        assert!(page(1, 10, ZEROED).iter().all(|&b| b == 0));
        // A non-zero pattern is never mistaken for a zeroed sector, even in its first bytes.
        assert!(a[..8].iter().any(|&b| b != 0));
    }

    #[test]
    fn describe_names_the_sector_a_block_came_from() {
        let mut b = vec![0u8; SECTOR];
        assert_eq!(describe_sector(5, &b), "zeroes");
        fill_sector(
            5,
            Expect {
                sector: 4242,
                generation: 3,
            },
            &mut b,
        );
        assert_eq!(describe_sector(5, &b), "sector 4242 generation 3 (intact)");
        b[100] ^= 1;
        assert_eq!(describe_sector(5, &b), "sector 4242 generation 3 (damaged)");
        b[0] = 0xaa;
        b[7] = 0x11;
        assert!(describe_sector(5, &b).starts_with("unknown data"));
    }
}
