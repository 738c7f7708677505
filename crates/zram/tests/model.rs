//! Model test: random operation sequences on a small device, checked against a plain
//! `Vec<u8>` disk and against the device's own statistics.

mod common;

use common::{TempFile, comp, store};
use pagemix::{PageKind, SplitMix64, fill_kind};
use proptest::prelude::*;
use std::sync::atomic::AtomicBool;
use zcomp::{Priority, Stream};
use zram::{Config, Device, Error, PAGE_SIZE, PageFilter};

const PAGES: u64 = 64;
const SECTOR: u64 = 512;
const SECTORS: u64 = PAGES * PAGE_SIZE as u64 / SECTOR;

#[derive(Clone, Debug)]
enum Op {
    WritePage {
        index: u64,
        kind: usize,
        seed: u64,
    },
    Write {
        sector: u64,
        sectors: u64,
        kind: usize,
        seed: u64,
    },
    ReadPage {
        index: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Discard {
        first: u64,
        count: u64,
    },
    WriteZeroes {
        first: u64,
        count: u64,
    },
    Compact,
    Recompress {
        huge: bool,
        max: Option<u64>,
    },
    Writeback {
        filter: usize,
        limit: u64,
    },
    Invalid {
        which: usize,
        a: u64,
        b: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PAGES, 0..5usize, any::<u64>())
            .prop_map(|(index, kind, seed)| Op::WritePage { index, kind, seed }),
        4 => (0..SECTORS, 1..=12u64, 0..5usize, any::<u64>()).prop_map(
            |(sector, sectors, kind, seed)| Op::Write {
                sector: sector.min(SECTORS - sectors),
                sectors,
                kind,
                seed
            }
        ),
        3 => (0..PAGES).prop_map(|index| Op::ReadPage { index }),
        3 => (0..SECTORS, 1..=20u64).prop_map(|(sector, sectors)| Op::Read {
            sector: sector.min(SECTORS - sectors),
            sectors
        }),
        1 => (0..PAGES, 0..8u64).prop_map(|(first, count)| Op::Discard {
            first,
            count: count.min(PAGES - first)
        }),
        1 => (0..PAGES, 0..8u64).prop_map(|(first, count)| Op::WriteZeroes {
            first,
            count: count.min(PAGES - first)
        }),
        1 => Just(Op::Compact),
        2 => (any::<bool>(), proptest::option::of(0..16u64))
            .prop_map(|(huge, max)| Op::Recompress { huge, max }),
        2 => (0..3usize, 0..24u64).prop_map(|(filter, limit)| Op::Writeback { filter, limit }),
        1 => (0..8usize, any::<u64>(), any::<u64>()).prop_map(|(which, a, b)| Op::Invalid {
            which,
            a,
            b
        }),
    ]
}

const KINDS: [PageKind; 5] = [
    PageKind::Zero,
    PageKind::Same,
    PageKind::Heap,
    PageKind::Text,
    PageKind::Random,
];

fn page_of(kind: usize, seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    fill_kind(KINDS[kind], seed, index, &mut p);
    p
}

/// Bytes for a sub-page write: compressible or not, sometimes a same-filled run.
fn bytes_of(kind: usize, seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while out.len() < len {
        let p = page_of(kind, seed, i);
        let n = (len - out.len()).min(PAGE_SIZE);
        out.extend_from_slice(&p[..n]);
        i += 1;
    }
    out
}

fn same_filled(page: &[u8]) -> bool {
    page.chunks_exact(8).all(|w| w == &page[..8])
}

struct Model {
    disk: Vec<u8>,
    /// Whether the device holds an entry for the page (written and not discarded).
    stored: Vec<bool>,
    invalid_io: u64,
    bd_writes: u64,
}

impl Model {
    fn page(&self, i: u64) -> &[u8] {
        let at = i as usize * PAGE_SIZE;
        &self.disk[at..at + PAGE_SIZE]
    }
}

fn check_stats(dev: &Device, m: &Model) -> Result<(), TestCaseError> {
    let s = dev.stats();
    let stored = m.stored.iter().filter(|&&b| b).count() as u64;
    let same = (0..PAGES)
        .filter(|&i| m.stored[i as usize] && same_filled(m.page(i)))
        .count() as u64;
    let mm = &s.mm_stat;
    prop_assert_eq!(
        mm.orig_data_size,
        stored * PAGE_SIZE as u64,
        "orig_data_size"
    );
    prop_assert_eq!(mm.same_pages, same, "same_pages");
    prop_assert!(mm.same_pages + mm.huge_pages + s.bd_stat.bd_count <= stored);
    prop_assert!(mm.compr_data_size >= mm.huge_pages * PAGE_SIZE as u64);
    prop_assert!(
        mm.compr_data_size <= (stored - mm.same_pages - s.bd_stat.bd_count) * PAGE_SIZE as u64
    );
    prop_assert_eq!(s.io_stat.invalid_io, m.invalid_io, "invalid_io");
    prop_assert_eq!(s.io_stat.failed_reads, 0);
    prop_assert_eq!(s.io_stat.failed_writes, 0);
    prop_assert_eq!(s.bd_stat.bd_writes, m.bd_writes, "bd_writes");
    Ok(())
}

fn run_op(dev: &Device, m: &mut Model, st: &mut Stream, op: &Op) -> Result<(), TestCaseError> {
    let ps = PAGE_SIZE as u64;
    match *op {
        Op::WritePage { index, kind, seed } => {
            let p = page_of(kind, seed, index);
            dev.write_page(index, &p, st).expect("write_page");
            let at = index as usize * PAGE_SIZE;
            m.disk[at..at + PAGE_SIZE].copy_from_slice(&p);
            m.stored[index as usize] = true;
        }
        Op::Write {
            sector,
            sectors,
            kind,
            seed,
        } => {
            let (offset, len) = (sector * SECTOR, sectors * SECTOR);
            let buf = bytes_of(kind, seed, len as usize);
            dev.write(offset, &buf, st).expect("write");
            m.disk[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
            for i in offset / ps..(offset + len).div_ceil(ps) {
                m.stored[i as usize] = true;
            }
        }
        Op::ReadPage { index } => {
            let mut p = [0u8; PAGE_SIZE];
            dev.read_page(index, &mut p, st).expect("read_page");
            prop_assert!(p[..] == *m.page(index), "page {} differs", index);
        }
        Op::Read { sector, sectors } => {
            let (offset, len) = (sector * SECTOR, sectors * SECTOR);
            let mut buf = vec![0xA5u8; len as usize];
            dev.read(offset, &mut buf, st).expect("read");
            prop_assert!(
                buf[..] == m.disk[offset as usize..(offset + len) as usize],
                "read of {} bytes at {} differs",
                len,
                offset
            );
        }
        Op::Discard { first, count } | Op::WriteZeroes { first, count } => {
            if matches!(op, Op::Discard { .. }) {
                dev.discard(first, count).expect("discard");
            } else {
                dev.write_zeroes(first, count).expect("write_zeroes");
            }
            m.disk[(first * ps) as usize..((first + count) * ps) as usize].fill(0);
            for i in first..first + count {
                m.stored[i as usize] = false;
            }
        }
        Op::Compact => {
            dev.compact();
        }
        Op::Recompress { huge, max } => {
            let filter = if huge {
                PageFilter::Huge
            } else {
                dev.mark_idle(None);
                PageFilter::Idle
            };
            let r = dev
                .recompress(
                    filter,
                    None,
                    max,
                    Priority::new(1).unwrap(),
                    st,
                    &AtomicBool::new(false),
                )
                .expect("recompress");
            prop_assert!(r.recompressed <= r.tried);
            prop_assert!(max.is_none_or(|m| r.tried <= m));
        }
        Op::Writeback { filter, limit } => {
            let filter = [PageFilter::Idle, PageFilter::Huge, PageFilter::HugeIdle][filter];
            if filter != PageFilter::Huge {
                dev.mark_idle(None);
            }
            let n = dev
                .writeback(filter, Some(limit), &AtomicBool::new(false))
                .expect("writeback");
            prop_assert!(n <= limit);
            m.bd_writes += n;
        }
        Op::Invalid { which, a, b } => {
            let mut page = [0u8; PAGE_SIZE];
            let mut buf = vec![0u8; 1024];
            // An offset inside the device that is not sector-aligned.
            let unaligned = (a % (dev.size() - 2048)) | 1;
            let beyond = PAGES + a % 1000;
            let r: Result<(), Error> = match which {
                0 => dev.write_page(beyond, &page, st),
                1 => dev.read_page(beyond, &mut page, st),
                2 => dev.write(unaligned, &buf, st),
                3 => dev.read(unaligned, &mut buf, st),
                // Aligned offset, length not a multiple of 512.
                4 => dev.write((a % SECTORS) * SECTOR, &buf[..1 + (b % 511) as usize], st),
                // Runs past the end.
                5 => dev.write(dev.size() - SECTOR * (b % 2), &buf, st),
                6 => dev.discard(a % (PAGES + 1), PAGES + 1 + b % 8),
                _ => dev.write_zeroes(beyond, 1 + b % 4),
            };
            prop_assert!(r.is_err(), "invalid request {} succeeded", which);
            m.invalid_io += 1;
        }
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let file = TempFile::new("model");
    let dev = Device::new(
        store(4096),
        comp(9),
        Config {
            size: PAGES * PAGE_SIZE as u64,
            backing_file: Some(file.0.clone()),
        },
    )
    .expect("device");
    let mut st = dev.new_stream();
    let mut m = Model {
        disk: vec![0; PAGES as usize * PAGE_SIZE],
        stored: vec![false; PAGES as usize],
        invalid_io: 0,
        bd_writes: 0,
    };
    for (n, op) in ops.iter().enumerate() {
        run_op(&dev, &mut m, &mut st, op)
            .map_err(|e| TestCaseError::fail(format!("op #{n} {op:?}: {e}")))?;
        check_stats(&dev, &m)
            .map_err(|e| TestCaseError::fail(format!("after op #{n} {op:?}: {e}")))?;
    }
    // Every page reads back as the model has it, by pages and in one long read.
    for i in 0..PAGES {
        let mut p = [0u8; PAGE_SIZE];
        dev.read_page(i, &mut p, &mut st).expect("final read_page");
        prop_assert!(p[..] == *m.page(i), "final page {} differs", i);
    }
    let mut all = vec![0u8; m.disk.len()];
    dev.read(0, &mut all, &mut st).expect("final read");
    prop_assert!(all == m.disk, "final whole-device read differs");

    dev.discard(0, PAGES).expect("discard all");
    let s = dev.stats();
    prop_assert_eq!(s.mm_stat.orig_data_size, 0);
    prop_assert_eq!(s.mm_stat.compr_data_size, 0);
    prop_assert_eq!(s.mm_stat.same_pages, 0);
    prop_assert_eq!(s.mm_stat.huge_pages, 0);
    prop_assert_eq!(s.bd_stat.bd_count, 0);
    prop_assert_eq!(dev.store().pool_stats().pages_used, 0);
    for i in 0..PAGES {
        let mut p = [1u8; PAGE_SIZE];
        dev.read_page(i, &mut p, &mut st)
            .expect("read after discard");
        prop_assert!(
            p.iter().all(|&b| b == 0),
            "page {} not zero after discard",
            i
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn device_matches_model(ops in proptest::collection::vec(op(), 1..150)) {
        run(&ops)?;
    }
}

/// A fixed sequence through every state: same, compressed, huge, recompressed, written back
/// (compressed and huge), partially rewritten, discarded.
#[test]
fn every_state_round_trips() {
    let mut ops = Vec::new();
    for i in 0..PAGES {
        ops.push(Op::WritePage {
            index: i,
            kind: (i % 5) as usize,
            seed: i * 7,
        });
    }
    ops.push(Op::Recompress {
        huge: false,
        max: None,
    });
    ops.push(Op::Writeback {
        filter: 0,
        limit: 20,
    });
    ops.push(Op::Writeback {
        filter: 1,
        limit: 5,
    });
    ops.push(Op::Write {
        sector: 7,
        sectors: 3,
        kind: 3,
        seed: 99,
    });
    ops.push(Op::Read {
        sector: 0,
        sectors: SECTORS,
    });
    ops.push(Op::Compact);
    ops.push(Op::Discard {
        first: 3,
        count: 10,
    });
    let mut rng = SplitMix64::new(5);
    for _ in 0..40 {
        ops.push(Op::Write {
            sector: rng.below(SECTORS - 12),
            sectors: 1 + rng.below(12),
            kind: rng.below(5) as usize,
            seed: rng.next_u64(),
        });
    }
    run(&ops).expect("fixed sequence");
}
