//! swaptest: make the guest swap, then check that every page came back intact.
//!
//! ```text
//! swaptest [--mib N | --factor F] [--threads T] [--seed S] [--mix MIX]
//!          [--mm-stat PATH] [--pause SECS]
//! ```
//!
//! Maps N MiB of anonymous memory (default: F x MemTotal, F = 3), writes every 4 KiB page with
//! pagemix's swap-like content (zero, same-filled, heap, text, random; `--mix` as in
//! `pagemix::Mix`), then reads every page back and compares it with a freshly generated copy.
//! With more memory than the guest has, most pages go to swap and come back from it, so a
//! wrong, stale or lost page on the swap device shows up as a bad page here.
//!
//! The pages are split into T contiguous ranges (default: one per CPU), one thread each, so
//! that reclaim and swap-in run on every vCPU (and every virtqueue of a multi-queue disk).
//!
//! Between writing and verifying, with every page in place: `--mm-stat` prints a zram `mm_stat`
//! file as `VZRAM-INFO zram.<field>=` (the in-guest zram comparison), and `--pause` prints
//! `VZRAM-INFO phase=written` and waits, so that the host can read the backend's statistics
//! while the workload is swapped out.
//!
//! Prints counts per kind and `bad=N`, and `VZRAM-INFO swaptest.*` lines for the host (after
//! writing: `swaptest.written_mem_free_kib` and `swaptest.written_mem_available_kib`). Exit
//! status 0 when every page verified, 1 on a bad page, 2 on a usage or setup error.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use guest_progs::{AnonMap, Args, meminfo, swap_used_kib};
use pagemix::{Mix, PAGE_SIZE, PageKind, fill_page};

const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Tally {
    kinds: [u64; 5],
    bad: u64,
    /// The first few bad pages: (index, kind, first differing byte offset).
    first_bad: Vec<(u64, PageKind, usize)>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        for (a, b) in self.kinds.iter_mut().zip(other.kinds) {
            *a += b;
        }
        self.bad += other.bad;
        self.first_bad.extend(other.first_bad);
        self.first_bad.sort();
        self.first_bad.truncate(10);
    }
}

fn kind_slot(kind: PageKind) -> usize {
    PageKind::ALL.iter().position(|k| *k == kind).unwrap()
}

/// Writes pages `first..` of the stream into `mem`.
fn write_range(mix: &Mix, seed: u64, first: u64, mem: &mut [u8]) -> Tally {
    let mut t = Tally::default();
    for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let page: &mut [u8; PAGE_SIZE] = page.try_into().unwrap();
        let kind = fill_page(mix, seed, first + i as u64, page);
        t.kinds[kind_slot(kind)] += 1;
    }
    t
}

/// Compares pages `first..` in `mem` with freshly generated copies.
fn verify_range(mix: &Mix, seed: u64, first: u64, mem: &[u8]) -> Tally {
    let mut t = Tally::default();
    let mut want = Box::new([0u8; PAGE_SIZE]);
    for (i, page) in mem.chunks_exact(PAGE_SIZE).enumerate() {
        let index = first + i as u64;
        let kind = fill_page(mix, seed, index, &mut want);
        t.kinds[kind_slot(kind)] += 1;
        if page != &want[..] {
            t.bad += 1;
            if t.first_bad.len() < 10 {
                let at = page.iter().zip(want.iter()).position(|(a, b)| a != b);
                t.first_bad.push((index, kind, at.unwrap_or(0)));
            }
        }
    }
    t
}

/// Runs `f` on `threads` contiguous page ranges of `mem` in parallel and sums the tallies.
fn parallel(mem: &mut [u8], threads: usize, f: impl Fn(u64, &mut [u8]) -> Tally + Sync) -> Tally {
    let pages = mem.len() / PAGE_SIZE;
    let per = pages.div_ceil(threads);
    let mut total = Tally::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = mem
            .chunks_mut(per * PAGE_SIZE)
            .enumerate()
            .map(|(n, chunk)| {
                let f = &f;
                s.spawn(move || f((n * per) as u64, chunk))
            })
            .collect();
        for h in handles {
            total.add(h.join().expect("worker panicked"));
        }
    });
    total
}

fn run() -> Result<bool, String> {
    let mut args = Args::parse(std::env::args().skip(1))?;
    let mib: Option<u64> = args.take("mib")?;
    let factor: Option<f64> = args.take("factor")?;
    let seed: u64 = args.take("seed")?.unwrap_or(1);
    let mix: Mix = args
        .take::<String>("mix")?
        .map(|s| s.parse::<Mix>().map_err(|e| e.to_string()))
        .transpose()?
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = args.take("threads")?.unwrap_or(cpus).max(1);
    let mm_stat: Option<String> = args.take("mm-stat")?;
    let pause: Option<u64> = args.take("pause")?;
    let rest = args.finish()?;
    if !rest.is_empty() {
        return Err(format!("unexpected arguments {rest:?}"));
    }
    if mib.is_some() && factor.is_some() {
        return Err("give --mib or --factor, not both".into());
    }

    let mi = meminfo().map_err(|e| format!("/proc/meminfo: {e}"))?;
    let mem_total_kib = mi.get("MemTotal").copied().unwrap_or(0);
    let bytes = match mib {
        Some(m) => m * MIB,
        None => (mem_total_kib as f64 * 1024.0 * factor.unwrap_or(3.0)) as u64,
    };
    let bytes = bytes / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    if bytes == 0 {
        return Err("nothing to do: size is 0".into());
    }
    let pages = bytes / PAGE_SIZE as u64;
    println!(
        "swaptest: {pages} pages ({} MiB) = {:.2}x MemTotal {} KiB, {threads} threads, seed {seed}, mix {mix}",
        bytes / MIB,
        bytes as f64 / (mem_total_kib.max(1) * 1024) as f64,
        mem_total_kib
    );
    let _ = std::io::stdout().flush();

    let mut map = AnonMap::new(bytes as usize).map_err(|e| format!("mmap {bytes} bytes: {e}"))?;
    let mem = map.as_mut_slice();

    let t0 = Instant::now();
    let written = parallel(mem, threads, |first, chunk| {
        write_range(&mix, seed, first, chunk)
    });
    let write_ms = t0.elapsed().as_millis();
    // Swap in use with every page written: how much of the workload the device holds.
    let after_write = meminfo().map_err(|e| format!("/proc/meminfo: {e}"))?;
    let swap_kib = swap_used_kib(&after_write);
    println!(
        "swaptest: wrote {pages} pages in {write_ms} ms; swap used {} MiB, MemFree {} MiB",
        swap_kib / 1024,
        after_write.get("MemFree").unwrap_or(&0) / 1024
    );
    // The guest's free memory with the workload in place (the peer comparison reports it).
    println!(
        "VZRAM-INFO swaptest.written_mem_free_kib={} swaptest.written_mem_available_kib={}",
        after_write.get("MemFree").unwrap_or(&0),
        after_write.get("MemAvailable").unwrap_or(&0)
    );
    if let Some(path) = &mm_stat {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        println!("VZRAM-INFO {}", mm_stat_info(&text));
    }
    if let Some(secs) = pause {
        println!("VZRAM-INFO phase=written");
        let _ = std::io::stdout().flush();
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }
    let _ = std::io::stdout().flush();

    let t1 = Instant::now();
    let checked = parallel(mem, threads, |first, chunk| {
        verify_range(&mix, seed, first, chunk)
    });
    let verify_ms = t1.elapsed().as_millis();
    assert_eq!(
        written.kinds, checked.kinds,
        "page kinds differ between passes"
    );

    let k = checked.kinds;
    let slot = |kind| k[kind_slot(kind)];
    println!(
        "swaptest: verified in {verify_ms} ms: zero={} same={} heap={} text={} random={} bad={}",
        slot(PageKind::Zero),
        slot(PageKind::Same),
        slot(PageKind::Heap),
        slot(PageKind::Text),
        slot(PageKind::Random),
        checked.bad
    );
    for (index, kind, at) in &checked.first_bad {
        println!("swaptest: bad page {index} ({kind}): first difference at byte {at}");
    }
    println!(
        "VZRAM-INFO swaptest.pages={pages} swaptest.mib={} swaptest.threads={threads} \
         swaptest.bad={} swaptest.write_ms={write_ms} swaptest.verify_ms={verify_ms} \
         swaptest.swap_used_kib={swap_kib} swaptest.mem_total_kib={mem_total_kib} \
         swaptest.zero={} swaptest.same={} swaptest.heap={} swaptest.text={} swaptest.random={}",
        bytes / MIB,
        checked.bad,
        slot(PageKind::Zero),
        slot(PageKind::Same),
        slot(PageKind::Heap),
        slot(PageKind::Text),
        slot(PageKind::Random),
    );
    Ok(checked.bad == 0)
}

/// zram's `mm_stat` (Documentation/admin-guide/blockdev/zram.rst) as `zram.<field>=<value>`.
fn mm_stat_info(text: &str) -> String {
    const FIELDS: [&str; 9] = [
        "orig_data_size",
        "compr_data_size",
        "mem_used_total",
        "mem_limit",
        "mem_used_max",
        "same_pages",
        "pages_compacted",
        "huge_pages",
        "huge_pages_since",
    ];
    FIELDS
        .iter()
        .zip(text.split_whitespace())
        .map(|(k, v)| format!("zram.{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("swaptest: {e}");
            ExitCode::from(2)
        }
    }
}
