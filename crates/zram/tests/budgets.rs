//! Per-device budgets and direct reclaim: a device limit enforced and changed at run time,
//! fairness at the store's limit, a swap-out burst into a store full of cold pages, writes
//! failing cleanly without a backing file, concurrent writers at the limit, and a model of a
//! device under random writes, reads, discards, reclaims and limit changes.

mod common;

use common::{TempFile, comp, store};
use pagemix::{Mix, PageKind, fill_kind, fill_page};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use zcomp::Stream;
use zram::{Config, Device, Error, PAGE_SIZE, Store};

const MIB: u64 = 1 << 20;

/// A realistic page (pagemix's calibrated mix), stamped with its index and seed so that every
/// page is different and none is same-filled.
fn page(seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    fill_page(&Mix::default(), seed, index, &mut p);
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&seed.to_le_bytes());
    p
}

fn device(store: &Arc<Store>, pages: u64, backing: Option<&TempFile>) -> Arc<Device> {
    Device::new(
        store.clone(),
        comp(3),
        Config {
            size: pages * PAGE_SIZE as u64,
            backing_file: backing.map(|f| f.0.clone()),
        },
    )
    .expect("device")
}

fn read(dev: &Device, index: u64, s: &mut Stream) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    dev.read_page(index, &mut p, s).expect("read");
    p
}

/// Writes pages `seed`/`from..` into `dev` until the pool holds `bytes`; returns the end.
fn fill_pool(dev: &Device, seed: u64, from: u64, bytes: u64, s: &mut Stream) -> u64 {
    let mut i = from;
    while dev.store().mem_used_total() < bytes {
        dev.write_page(i, &page(seed, i), s).expect("fill");
        i += 1;
    }
    i
}

/// Aborts the process if not dropped within `limit` (a deadlock guard).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(name: &'static str, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        thread::spawn(move || {
            let start = Instant::now();
            while !d.load(Ordering::Relaxed) {
                if start.elapsed() > limit {
                    eprintln!("watchdog: {name} ran longer than {limit:?}; deadlock? aborting");
                    std::process::abort();
                }
                thread::sleep(Duration::from_millis(50));
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

#[test]
fn a_device_limit_is_enforced_and_changes_at_run_time() {
    let st = store(16384);
    let (a, b) = (device(&st, 2048, None), device(&st, 1024, None));
    let mut s = a.new_stream();
    a.set_mem_limit(MIB);
    assert_eq!(a.mem_limit(), MIB);
    let mut stored = vec![false; 2048];
    for i in 0..2048 {
        match a.write_page(i, &page(1, i), &mut s) {
            Ok(()) => stored[i as usize] = true,
            Err(Error::NoSpace) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let failed = stored.iter().filter(|&&ok| !ok).count() as u64;
    let used = a.mem_used();
    assert!(failed > 0, "2048 pages do not fit in 1 MiB");
    assert!(
        used <= MIB + MIB / 50 && used > MIB * 3 / 4,
        "used {used} against a limit of {MIB}"
    );
    let stats = a.stats();
    assert_eq!(stats.io_stat.failed_writes, failed);
    assert_eq!(stats.tiering.direct_reclaim_failed, failed);
    assert_eq!((stats.memory.limit, stats.memory.share), (MIB, MIB));
    // The other device has no limit of its own, and the store none either.
    for i in 0..1024 {
        b.write_page(i, &page(2, i), &mut s).unwrap();
    }
    assert_eq!(b.stats().memory.share, 0);
    assert!(b.mem_used() > a.mem_used());
    // The devices' memory adds up to the pool.
    let sum = a.mem_used() + b.mem_used();
    assert!(sum.abs_diff(st.mem_used_total()) <= 2, "{sum}");

    // Raised at run time: more fits; removed: everything does.
    a.set_mem_limit(2 * MIB);
    let late: Vec<u64> = (0..2048).filter(|&i| !stored[i as usize]).collect();
    let fit = late
        .iter()
        .filter(|&&i| a.write_page(i, &page(1, i), &mut s).is_ok())
        .count();
    assert!(fit > 0);
    a.set_mem_limit(0);
    for &i in &late {
        a.write_page(i, &page(1, i), &mut s).unwrap();
    }
    for i in 0..2048 {
        assert_eq!(read(&a, i, &mut s), page(1, i), "page {i}");
    }
    // Lowered below use: the next write that allocates fails, a whole page or sectors of
    // one (a read-modify-write), and the page keeps its old content.
    a.set_mem_limit(MIB);
    let mut random = [0u8; PAGE_SIZE];
    fill_kind(PageKind::Random, 3, 0, &mut random);
    assert!(matches!(
        a.write_page(0, &random, &mut s),
        Err(Error::NoSpace)
    ));
    assert!(matches!(
        a.write(512, &random[..1024], &mut s),
        Err(Error::NoSpace)
    ));
    assert_eq!(read(&a, 0, &mut s), page(1, 0));
}

#[test]
fn a_device_at_its_limit_writes_back_its_own_cold_pages_first() {
    let st = store(16384);
    let (fa, fb) = (TempFile::new("own-a"), TempFile::new("own-b"));
    let (a, b) = (device(&st, 2048, Some(&fa)), device(&st, 2048, Some(&fb)));
    let mut s = a.new_stream();
    for i in 0..300 {
        a.write_page(i, &page(1, i), &mut s).unwrap();
        b.write_page(i, &page(2, i), &mut s).unwrap();
    }
    a.mark_idle(None);
    b.mark_idle(None);
    let limit = a.mem_used() / 2;
    a.set_mem_limit(limit);
    // A third as much again fits: the idle pages make room.
    for i in 300..400 {
        a.write_page(i, &page(1, i), &mut s).unwrap();
    }
    assert!(a.mem_used() <= limit + limit / 50, "{}", a.mem_used());
    let t = a.stats().tiering;
    assert!(t.direct_reclaimed > 0 && t.direct_reclaimed == t.written_back);
    assert_eq!(
        b.stats().bd_stat.bd_count,
        0,
        "the other device keeps its pages"
    );
    // Go on until a write fails: by then every idle page has been written back.
    let mut end = 400;
    while a.write_page(end, &page(1, end), &mut s).is_ok() {
        end += 1;
        assert!(end < 2048, "a limit of {limit} bytes never reached");
    }
    assert!(a.stats().bd_stat.bd_count >= 300);
    assert_eq!(a.stats().tiering.direct_reclaim_failed, 1);
    for i in 0..end {
        assert_eq!(read(&a, i, &mut s), page(1, i), "page {i}");
    }
    for i in 0..300 {
        assert_eq!(read(&b, i, &mut s), page(2, i), "page {i}");
    }
    assert!(a.stats().tiering.promoted >= 300);
}

#[test]
fn at_the_store_limit_a_device_above_its_share_pays_first() {
    let st = store(16384);
    st.set_reclaim_age(Duration::ZERO); // every page is cold
    let (fa, fb) = (TempFile::new("fair-a"), TempFile::new("fair-b"));
    let (a, b) = (device(&st, 8192, Some(&fa)), device(&st, 8192, Some(&fb)));
    let mut s = a.new_stream();
    let limit = 8 * MIB;
    let a_end = fill_pool(&a, 1, 0, limit * 9 / 10, &mut s);
    st.set_mem_limit(limit);
    // B, under its half, writes 30% of the limit: the store crosses it and A pays.
    let mut b_end = 0;
    while b.mem_used() < limit * 3 / 10 {
        b.write_page(b_end, &page(2, b_end), &mut s).unwrap();
        b_end += 1;
    }
    assert!(st.mem_used_total() <= limit);
    assert!(a.stats().tiering.direct_reclaimed > 0);
    assert_eq!(b.stats().bd_stat.bd_count, 0, "B is under its share");
    assert_eq!(
        (a.stats().memory.share, b.stats().memory.share),
        (limit / 2, limit / 2)
    );
    // A writing more pays with its own pages too: it is still above its share.
    let before = b.stats().bd_stat.bd_count;
    for i in a_end..a_end + 500 {
        a.write_page(i, &page(1, i), &mut s).unwrap();
    }
    assert_eq!(b.stats().bd_stat.bd_count, before);
    for i in 0..a_end + 500 {
        assert_eq!(read(&a, i, &mut s), page(1, i), "A's page {i}");
    }
    for i in 0..b_end {
        assert_eq!(read(&b, i, &mut s), page(2, i), "B's page {i}");
    }
    assert_eq!(
        a.stats().io_stat.failed_writes + b.stats().io_stat.failed_writes,
        0
    );
}

/// A device whose cold age the policy raised (its pages come back too often) keeps its pages
/// while another device has cold ones, even when it is the one above its share; once nothing
/// is cold by the devices' own ages, pages cold by the store's age go rather than a write
/// failing.
#[test]
fn direct_reclaim_honours_a_backed_off_cold_age_before_it_falls_back() {
    let st = store(16384);
    st.set_reclaim_age(Duration::from_secs(1));
    let (fa, fb) = (TempFile::new("aged-a"), TempFile::new("aged-b"));
    let (a, b) = (device(&st, 8192, Some(&fa)), device(&st, 8192, Some(&fb)));
    let mut s = a.new_stream();
    let limit = 8 * MIB;
    // A holds most of the pool (above its half), B a little; both go cold by the store's age.
    let a_end = fill_pool(&a, 1, 0, limit * 7 / 10, &mut s);
    let b_old = fill_pool(&b, 2, 0, limit * 9 / 10, &mut s);
    thread::sleep(Duration::from_millis(2100));
    a.set_cold_age(Duration::from_secs(3600));
    st.set_mem_limit(limit);
    // B writes new pages at the limit: B's old pages pay, not A's.
    let mut b_end = b_old;
    while b.stats().bd_stat.bd_count < b_old / 2 {
        b.write_page(b_end, &page(2, b_end), &mut s).unwrap();
        b_end += 1;
    }
    assert_eq!(a.stats().bd_stat.bd_count, 0, "A's back-off is honoured");
    // B backs off too: now nothing is cold by either device's own age, and the fallback to
    // the store's age takes from the device above its share first, A, rather than a write
    // failing.
    b.set_cold_age(Duration::from_secs(3600));
    for _ in 0..b_old {
        b.write_page(b_end, &page(2, b_end), &mut s).unwrap();
        b_end += 1;
    }
    assert!(
        a.stats().bd_stat.bd_count > 0,
        "the fallback takes A's pages"
    );
    assert_eq!(b.stats().io_stat.failed_writes, 0);
    for i in 0..a_end {
        assert_eq!(read(&a, i, &mut s), page(1, i), "A's page {i}");
    }
    for i in 0..b_end {
        assert_eq!(read(&b, i, &mut s), page(2, i), "B's page {i}");
    }
}

#[test]
fn a_swap_out_burst_into_a_store_full_of_cold_pages_never_fails() {
    const BURST: u64 = 40 * MIB / PAGE_SIZE as u64;
    const COLD_MAX: u64 = 32768;
    let st = store(65536);
    let file = TempFile::new("burst");
    let dev = device(&st, COLD_MAX + BURST, Some(&file));
    let mut s = dev.new_stream();
    let limit = 20 * MIB;
    let cold = fill_pool(&dev, 1, 0, limit, &mut s);
    assert!(cold < COLD_MAX);
    dev.mark_idle(None);
    st.set_mem_limit(limit);
    let start = Instant::now();
    for i in 0..BURST {
        dev.write_page(COLD_MAX + i, &page(2, i), &mut s)
            .unwrap_or_else(|e| panic!("burst write {i}: {e}"));
    }
    let took = start.elapsed();
    let stats = dev.stats();
    eprintln!(
        "40 MiB burst over {cold} cold pages in {took:?}: {} written back, pool {} MiB",
        stats.tiering.direct_reclaimed,
        st.mem_used_total() / MIB
    );
    assert_eq!(stats.io_stat.failed_writes, 0);
    assert!(stats.tiering.direct_reclaimed > 0);
    assert!(st.mem_used_total() <= limit);
    for i in 0..cold {
        assert_eq!(read(&dev, i, &mut s), page(1, i), "cold page {i}");
    }
    for i in 0..BURST {
        assert_eq!(
            read(&dev, COLD_MAX + i, &mut s),
            page(2, i),
            "burst page {i}"
        );
    }
}

#[test]
fn without_a_backing_file_writes_at_the_limit_fail_cleanly() {
    let st = store(16384);
    let dev = device(&st, 4096, None);
    let mut s = dev.new_stream();
    let limit = 2 * MIB;
    let end = fill_pool(&dev, 1, 0, limit - 64 * 1024, &mut s);
    dev.mark_idle(None); // cold, but there is nowhere to move them
    st.set_mem_limit(limit);
    let mut failed = 0;
    for i in 0..end {
        match dev.write_page(i, &page(2, i), &mut s) {
            Ok(()) | Err(Error::NoSpace) => {}
            Err(e) => panic!("{e}"),
        }
        let now = read(&dev, i, &mut s);
        if now != page(2, i) {
            assert_eq!(now, page(1, i), "page {i}: neither old nor new");
            failed += 1;
        }
    }
    assert!(failed > 0);
    let stats = dev.stats();
    assert_eq!(stats.io_stat.failed_writes, failed);
    assert_eq!(stats.tiering.direct_reclaim_failed, failed);
    assert_eq!(stats.bd_stat.bd_count, 0);
    assert!(st.mem_used_total() <= limit);
}

#[test]
fn concurrent_writers_at_the_limit_neither_deadlock_nor_lose_pages() {
    const THREADS: u64 = 4;
    const PER: u64 = 1024;
    const COLD_MAX: u64 = 16384;
    let _watchdog = Watchdog::new("concurrent writers", Duration::from_secs(60));
    let st = store(65536);
    let file = TempFile::new("concurrent");
    let dev = device(&st, COLD_MAX + THREADS * PER, Some(&file));
    let mut s = dev.new_stream();
    let limit = 8 * MIB;
    let cold = fill_pool(&dev, 1, 0, limit, &mut s);
    dev.mark_idle(None);
    st.set_mem_limit(limit);
    let models: Vec<Vec<[u8; PAGE_SIZE]>> = thread::scope(|sc| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = &dev;
                sc.spawn(move || {
                    let mut s = dev.new_stream();
                    let first = COLD_MAX + t * PER;
                    let mut model = Vec::new();
                    for k in 0..PER {
                        let i = first + k;
                        let mut p = page(10 + t, k);
                        dev.write_page(i, &p, &mut s).unwrap();
                        if k % 4 == 0 {
                            // Sectors 2..5 again, from another page: a read-modify-write.
                            let patch = page(20 + t, k);
                            let at = i * PAGE_SIZE as u64 + 1024;
                            dev.write(at, &patch[..1536], &mut s).unwrap();
                            p[1024..2560].copy_from_slice(&patch[..1536]);
                        }
                        model.push(p);
                    }
                    model
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let stats = dev.stats();
    assert_eq!(stats.io_stat.failed_writes, 0);
    assert!(stats.tiering.direct_reclaimed > 0);
    for (t, model) in models.iter().enumerate() {
        for (k, p) in model.iter().enumerate() {
            let i = COLD_MAX + t as u64 * PER + k as u64;
            assert_eq!(&read(&dev, i, &mut s), p, "thread {t} page {k}");
        }
    }
    for i in 0..cold {
        assert_eq!(read(&dev, i, &mut s), page(1, i), "cold page {i}");
    }
}

// ---- a model: random operations against a map of page -> content -------------------------

const PAGES: u64 = 48;

#[derive(Clone, Debug)]
enum Op {
    Write {
        index: u64,
        seed: u64,
    },
    Sectors {
        index: u64,
        sector: usize,
        seed: u64,
    },
    Read {
        index: u64,
    },
    Discard {
        index: u64,
    },
    MarkIdle,
    Reclaim {
        max: u64,
    },
    DeviceLimit {
        kib: u64,
    },
    StoreLimit {
        kib: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..PAGES, any::<u64>()).prop_map(|(index, seed)| Op::Write { index, seed }),
        2 => (0..PAGES, 0..7usize, any::<u64>())
            .prop_map(|(index, sector, seed)| Op::Sectors { index, sector, seed }),
        4 => (0..PAGES).prop_map(|index| Op::Read { index }),
        1 => (0..PAGES).prop_map(|index| Op::Discard { index }),
        1 => Just(Op::MarkIdle),
        1 => (1..16u64).prop_map(|max| Op::Reclaim { max }),
        2 => prop_oneof![Just(0u64), 16..128u64].prop_map(|kib| Op::DeviceLimit { kib }),
        1 => prop_oneof![Just(0u64), 32..256u64].prop_map(|kib| Op::StoreLimit { kib }),
    ]
}

fn run(ops: &[Op], backing: bool) -> Result<(), TestCaseError> {
    let st = store(4096);
    let file = TempFile::new("model");
    let dev = device(&st, PAGES, backing.then_some(&file));
    let mut s = dev.new_stream();
    let mut model = vec![[0u8; PAGE_SIZE]; PAGES as usize];
    let mut failed = 0;
    for op in ops {
        match *op {
            Op::Write { index, seed } => {
                let p = page(seed, index);
                match dev.write_page(index, &p, &mut s) {
                    Ok(()) => model[index as usize] = p,
                    Err(Error::NoSpace) => failed += 1,
                    Err(e) => return Err(TestCaseError::fail(format!("{op:?}: {e}"))),
                }
            }
            Op::Sectors {
                index,
                sector,
                seed,
            } => {
                let src = page(seed, index);
                let at = index * PAGE_SIZE as u64 + sector as u64 * 512;
                match dev.write(at, &src[..1024], &mut s) {
                    Ok(()) => model[index as usize][sector * 512..sector * 512 + 1024]
                        .copy_from_slice(&src[..1024]),
                    Err(Error::NoSpace) => failed += 1,
                    Err(e) => return Err(TestCaseError::fail(format!("{op:?}: {e}"))),
                }
            }
            Op::Read { index } => {
                prop_assert_eq!(&read(&dev, index, &mut s)[..], &model[index as usize][..]);
            }
            Op::Discard { index } => {
                dev.discard(index, 1).unwrap();
                model[index as usize] = [0; PAGE_SIZE];
            }
            Op::MarkIdle => {
                dev.mark_idle(None);
            }
            Op::Reclaim { max } => {
                let r = dev.reclaim(Duration::from_secs(3600), max, &AtomicBool::new(false));
                match (backing, r) {
                    (true, Ok(r)) => prop_assert!(r.written <= max),
                    (false, Err(Error::NoBackingFile)) => {}
                    (_, r) => return Err(TestCaseError::fail(format!("{op:?}: {r:?}"))),
                }
            }
            Op::DeviceLimit { kib } => dev.set_mem_limit(kib * 1024),
            Op::StoreLimit { kib } => st.set_mem_limit(kib * 1024),
        }
    }
    prop_assert_eq!(dev.stats().io_stat.failed_writes, failed);
    prop_assert_eq!(dev.stats().tiering.direct_reclaim_failed, failed);
    for i in 0..PAGES {
        prop_assert_eq!(
            &read(&dev, i, &mut s)[..],
            &model[i as usize][..],
            "page {}",
            i
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn a_device_with_changing_limits_keeps_every_acknowledged_page(
        ops in prop::collection::vec(op(), 1..120),
        backing in any::<bool>(),
    ) {
        run(&ops, backing)?;
    }
}
