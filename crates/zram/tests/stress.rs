//! Multi-threaded stress: workers writing, reading and verifying pages while maintenance
//! (compaction, idle marking, recompression, writeback) runs alongside.

mod common;

use common::{TempFile, comp, store, versioned, whole_version};
use pagemix::{PageKind, SplitMix64, fill_kind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use zcomp::{Comp, Priority, Stream};
use zram::{Config, Device, Error, PAGE_SIZE, PageFilter, Store};

/// How long each test lets its workers run.
const RUN_FOR: Duration = Duration::from_secs(4);
/// Ops per worker at most (whichever of this and `RUN_FOR` ends first).
const MAX_OPS: u64 = 20_000;

/// Aborts the process if the test it guards runs longer than 120 s (a deadlock guard).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(name: &'static str) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        thread::spawn(move || {
            let start = Instant::now();
            while !d.load(Ordering::Relaxed) {
                if start.elapsed() > Duration::from_secs(120) {
                    eprintln!("watchdog: {name} ran longer than 120 s; deadlock? aborting");
                    std::process::abort();
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Tally {
    writes: u64,
    reads: u64,
}

/// One worker: owns pages `own` (exact model of their bytes, with partial writes and
/// discards) and shares pages `shared` (whole-page versions only; a read must be one whole
/// version of that page).
fn worker(
    dev: &Device,
    t: u64,
    own: std::ops::Range<u64>,
    shared: std::ops::Range<u64>,
    stop: &AtomicBool,
) -> Tally {
    let mut st: Stream = dev.new_stream();
    let mut rng = SplitMix64::new(0xC0FFEE ^ t);
    let mut model: Vec<[u8; PAGE_SIZE]> = vec![[0u8; PAGE_SIZE]; (own.end - own.start) as usize];
    let mut counter = 0u64;
    let mut next_version = || {
        counter += 1;
        (t + 1) << 32 | counter
    };
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut page = [0u8; PAGE_SIZE];
    for n in 0..MAX_OPS {
        if n % 64 == 0 && (start.elapsed() > RUN_FOR || stop.load(Ordering::Relaxed)) {
            break;
        }
        let own_page = own.start + rng.below(own.end - own.start);
        let m = &mut model[(own_page - own.start) as usize];
        match rng.below(100) {
            0..25 => {
                let p = versioned(own_page, next_version());
                dev.write_page(own_page, &p, &mut st).expect("write_page");
                *m = p;
                tally.writes += 1;
            }
            25..40 => {
                // A partial write inside one page.
                let sector = rng.below(8) as usize;
                let sectors = 1 + rng.below(8 - sector as u64) as usize;
                let src = versioned(own_page, next_version());
                let bytes = &src[sector * 512..(sector + sectors) * 512];
                dev.write(
                    own_page * PAGE_SIZE as u64 + sector as u64 * 512,
                    bytes,
                    &mut st,
                )
                .expect("partial write");
                m[sector * 512..(sector + sectors) * 512].copy_from_slice(bytes);
                tally.writes += 1;
            }
            40..65 => {
                dev.read_page(own_page, &mut page, &mut st)
                    .expect("read_page");
                assert!(
                    page == *m,
                    "thread {t}: own page {own_page} differs from model"
                );
                tally.reads += 1;
            }
            65..68 => {
                dev.discard(own_page, 1).expect("discard");
                *m = [0u8; PAGE_SIZE];
            }
            68..85 => {
                let i = shared.start + rng.below(shared.end - shared.start);
                let p = versioned(i, next_version());
                dev.write_page(i, &p, &mut st).expect("shared write_page");
                tally.writes += 1;
            }
            _ => {
                let i = shared.start + rng.below(shared.end - shared.start);
                dev.read_page(i, &mut page, &mut st)
                    .expect("shared read_page");
                if let Err(e) = whole_version(i, &page) {
                    panic!("thread {t}: {e}");
                }
                tally.reads += 1;
            }
        }
    }
    // Final check of every owned page.
    for (k, m) in model.iter().enumerate() {
        let i = own.start + k as u64;
        dev.read_page(i, &mut page, &mut st)
            .expect("final read_page");
        assert!(
            page == *m,
            "thread {t}: final own page {i} differs from model"
        );
        tally.reads += 1;
    }
    tally
}

/// Maintenance on a device until `stop`: compaction, idle marking, recompression, writeback.
fn maintain(dev: &Device, stop: &AtomicBool) -> u64 {
    let mut st = dev.new_stream();
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        dev.compact();
        dev.mark_idle(None);
        dev.recompress(
            PageFilter::Idle,
            None,
            Some(64),
            Priority::new(1).unwrap(),
            &mut st,
            &AtomicBool::new(false),
        )
        .expect("recompress");
        match dev.writeback(PageFilter::Idle, Some(50), &AtomicBool::new(false)) {
            // Blocks freed by concurrent overwrites are released just after the slot
            // changes, so a nearly full backing file may briefly look full.
            Ok(_) | Err(Error::BackingFull) => {}
            Err(e) => panic!("writeback: {e}"),
        }
        dev.recompress(
            PageFilter::Huge,
            None,
            Some(16),
            Priority::new(1).unwrap(),
            &mut st,
            &AtomicBool::new(false),
        )
        .expect("recompress huge");
        rounds += 1;
        thread::sleep(Duration::from_millis(1));
    }
    rounds
}

fn device(store: Arc<Store>, pages: u64, file: &TempFile) -> Arc<Device> {
    Device::new(
        store,
        comp(3),
        Config {
            size: pages * PAGE_SIZE as u64,
            backing_file: Some(file.0.clone()),
        },
    )
    .expect("device")
}

fn verify_shared(dev: &Device, shared: std::ops::Range<u64>) {
    let mut st = dev.new_stream();
    let mut page = [0u8; PAGE_SIZE];
    for i in shared {
        dev.read_page(i, &mut page, &mut st).expect("read shared");
        if let Err(e) = whole_version(i, &page) {
            panic!("final: {e}");
        }
    }
}

#[test]
fn one_device_three_workers_and_maintenance() {
    let _wd = Watchdog::new("one_device_three_workers_and_maintenance");
    let file = TempFile::new("one");
    // 3 x 64 own pages + 16 shared.
    let dev = device(store(8192), 208, &file);
    let stop = AtomicBool::new(false);
    let shared = 192..208;
    let (tallies, rounds) = thread::scope(|s| {
        let m = s.spawn(|| maintain(&dev, &stop));
        let workers: Vec<_> = (0..3u64)
            .map(|t| {
                let (dev, stop, shared) = (&dev, &stop, shared.clone());
                s.spawn(move || worker(dev, t, t * 64..(t + 1) * 64, shared, stop))
            })
            .collect();
        let tallies: Vec<Tally> = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect();
        stop.store(true, Ordering::Relaxed);
        (tallies, m.join().expect("maintenance panicked"))
    });
    verify_shared(&dev, shared);
    let s = dev.stats();
    let writes: u64 = tallies.iter().map(|t| t.writes).sum();
    let reads: u64 = tallies.iter().map(|t| t.reads).sum();
    assert_eq!(s.io_stat.failed_writes, 0);
    assert_eq!(s.io_stat.failed_reads, 0);
    assert!(rounds > 0, "maintenance ran");
    eprintln!(
        "one device: {writes} writes, {reads} reads, {rounds} maintenance rounds, \
         bd_writes {}, huge {}, same {}",
        s.bd_stat.bd_writes, s.mm_stat.huge_pages, s.mm_stat.same_pages
    );
    dev.discard(0, dev.pages()).expect("discard all");
    let s = dev.stats();
    assert_eq!(s.mm_stat.orig_data_size, 0);
    assert_eq!(s.mm_stat.compr_data_size, 0);
    assert_eq!(s.mm_stat.same_pages, 0);
    assert_eq!(s.mm_stat.huge_pages, 0);
    assert_eq!(s.bd_stat.bd_count, 0);
    assert_eq!(dev.store().pool_stats().pages_used, 0);
}

#[test]
fn two_devices_share_one_store() {
    let _wd = Watchdog::new("two_devices_share_one_store");
    let store = store(8192);
    let (fa, fb) = (TempFile::new("a"), TempFile::new("b"));
    // 2 x 48 own pages + 8 shared, per device.
    let a = device(store.clone(), 104, &fa);
    let b = device(store.clone(), 104, &fb);
    let stop = AtomicBool::new(false);
    let shared = 96..104;
    thread::scope(|s| {
        let ma = s.spawn(|| maintain(&a, &stop));
        let mb = s.spawn(|| maintain(&b, &stop));
        let wa: Vec<_> = (0..2u64)
            .map(|t| {
                let (dev, stop, shared) = (&a, &stop, shared.clone());
                s.spawn(move || worker(dev, t, t * 48..(t + 1) * 48, shared, stop))
            })
            .collect();
        let wb: Vec<_> = (0..2u64)
            .map(|t| {
                let (dev, stop, shared) = (&b, &stop, shared.clone());
                s.spawn(move || worker(dev, 2 + t, t * 48..(t + 1) * 48, shared, stop))
            })
            .collect();
        for w in wa.into_iter().chain(wb) {
            w.join().expect("worker");
        }
        stop.store(true, Ordering::Relaxed);
        ma.join().expect("maintenance a");
        mb.join().expect("maintenance b");
    });
    verify_shared(&a, shared.clone());
    verify_shared(&b, shared);
    let (sa, sb) = (a.stats(), b.stats());
    // The pool is shared: both see the same memory figures.
    // (The pool may be empty by now: maintenance may have written every stored page back.)
    assert_eq!(sa.mm_stat.mem_used_total, sb.mm_stat.mem_used_total);
    assert_eq!(
        sa.mm_stat.mem_used_total,
        store.pool_stats().pages_used as u64 * PAGE_SIZE as u64
    );

    // Dropping one device gives its memory back; discarding the other empties the pool.
    drop(a);
    b.discard(0, b.pages()).expect("discard b");
    let s = b.stats();
    assert_eq!(s.mm_stat.orig_data_size, 0);
    assert_eq!(s.mm_stat.compr_data_size, 0);
    assert_eq!(s.bd_stat.bd_count, 0);
    assert_eq!(
        store.pool_stats().pages_used,
        0,
        "pool empty after drop + discard"
    );
    assert_eq!(b.stats().mm_stat.mem_used_total, 0);
}

/// Single writer rewriting one page with incompressible (huge) pages while another thread
/// keeps writing it back: every read must return exactly what the writer last wrote.
#[test]
fn writeback_racing_rewrites_of_one_page() {
    let _wd = Watchdog::new("writeback_racing_rewrites_of_one_page");
    let file = TempFile::new("aba");
    let dev = device(store(8192), 4, &file);
    let stop = AtomicBool::new(false);
    let failures = thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                dev.mark_idle(None);
                match dev.writeback(PageFilter::Idle, None, &AtomicBool::new(false)) {
                    Ok(_) | Err(Error::BackingFull) => {}
                    Err(e) => panic!("writeback: {e}"),
                }
            }
        });
        let w = s.spawn(|| {
            let mut st = dev.new_stream();
            let mut page = [0u8; PAGE_SIZE];
            let start = Instant::now();
            let mut v = 0u64;
            let mut failures = Vec::new();
            while start.elapsed() < RUN_FOR && failures.len() < 5 {
                v += 1;
                // version % 4 == 3: a random (huge) page.
                // Two rewrites back to back: the second can get the first one's freed handle
                // id back, the one a racing writeback copied from.
                let q = versioned(0, v * 8 + 3);
                dev.write_page(0, &q, &mut st).expect("write");
                let p = versioned(0, v * 4 + 3);
                dev.write_page(0, &p, &mut st).expect("write");
                dev.read_page(0, &mut page, &mut st).expect("read");
                if page != p {
                    failures.push(format!(
                        "wrote version {} read {:?}",
                        v * 4 + 3,
                        whole_version(0, &page)
                    ));
                }
            }
            stop.store(true, Ordering::Relaxed);
            failures
        });
        w.join().expect("writer")
    });
    assert!(failures.is_empty(), "stale reads: {failures:?}");
}

/// A text page whose first 8 bytes carry `v` as non-ASCII bytes: every version compresses to
/// the same lz4 length (the header is an unmatched literal run), so versions are
/// indistinguishable by (state, length, priority).
fn same_len_version(v: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    fill_kind(PageKind::Text, 77, 0, &mut p);
    for (k, b) in p[..8].iter_mut().enumerate() {
        *b = 0x80 | ((v >> (7 * k)) & 0x7F) as u8;
    }
    p
}

/// Single writer rewriting one page twice in a row while another thread recompresses it: a
/// read must return exactly what the writer last wrote.
#[test]
fn recompress_racing_rewrites_of_one_page() {
    let _wd = Watchdog::new("recompress_racing_rewrites_of_one_page");
    let dev = Device::new(
        store(8192),
        Arc::new(Comp::parse("lz4", &["algo=zstd level=19 priority=1"]).expect("comp")),
        Config {
            size: 4 * PAGE_SIZE as u64,
            backing_file: None,
        },
    )
    .expect("device");
    let stop = AtomicBool::new(false);
    let passes = std::sync::atomic::AtomicU64::new(0);
    let (failures, recompressed) = thread::scope(|s| {
        let r = s.spawn(|| {
            let mut st = dev.new_stream();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                dev.mark_idle(None);
                n += dev
                    .recompress(
                        PageFilter::Idle,
                        None,
                        None,
                        Priority::new(1).unwrap(),
                        &mut st,
                        &AtomicBool::new(false),
                    )
                    .expect("recompress")
                    .recompressed;
                passes.fetch_add(1, Ordering::Relaxed);
            }
            n
        });
        let w = s.spawn(|| {
            let mut st = dev.new_stream();
            let mut page = [0u8; PAGE_SIZE];
            let start = Instant::now();
            let mut failures = Vec::new();
            let mut v = 0u64;
            while start.elapsed() < RUN_FOR && failures.len() < 5 {
                let (b, c) = (same_len_version(v + 1), same_len_version(v + 2));
                v += 2;
                // Now and then leave the page alone until a whole recompression pass (zstd 19)
                // has run: on an idle machine the writer otherwise changes the page under
                // every one of them and none ever lands.
                if v.is_multiple_of(64) {
                    let seen = passes.load(Ordering::Relaxed);
                    let quiet = Instant::now();
                    while passes.load(Ordering::Relaxed) < seen + 2
                        && quiet.elapsed() < Duration::from_millis(200)
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                dev.write_page(0, &b, &mut st).expect("write");
                dev.write_page(0, &c, &mut st).expect("write");
                dev.read_page(0, &mut page, &mut st).expect("read");
                if page != c {
                    let got = (0..v + 1).find(|&u| same_len_version(u) == page);
                    failures.push(format!("wrote version {v}, read version {got:?}"));
                }
            }
            stop.store(true, Ordering::Relaxed);
            failures
        });
        let f = w.join().expect("writer");
        (f, r.join().expect("recompressor"))
    });
    assert!(recompressed > 0, "the race was never set up");
    assert!(failures.is_empty(), "stale reads: {failures:?}");
}
