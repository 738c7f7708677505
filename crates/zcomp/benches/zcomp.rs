//! Per-page compress and decompress on the pagemix swap mix, each backend through zcomp and,
//! in the same run, through lz4_flex / zstd's bulk API directly, to measure zcomp's overhead.
//!
//! `cargo bench -p zcomp` (results: docs/benchmarks.md, section zcomp). One iteration is one
//! page; iterations walk a fixed set of pages round-robin, so each sample averages over the mix.
//!
//! Criterion runs the zcomp and direct variants one after the other, so background load that
//! comes and goes between them (two shared cores) skews their ratio by several percent. The
//! `overhead` target therefore also measures the ratio interleaved: many short rounds, each
//! timing all pages through zcomp and directly back to back (alternating which goes first),
//! and prints the median of the per-round ratios.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pagemix::{Mix, fill_page};
use zcomp::{BUFFER_SIZE, Comp, PAGE_SIZE};

const PAGES: usize = 256;
const SEED: u64 = 1;

/// Backends as zcomp parameters, with the zstd level for the direct baseline (None = lz4).
const BACKENDS: &[(&str, &str, Option<i32>)] = &[
    ("lz4", "lz4", None),
    ("zstd-1", "zstd:-1", Some(-1)),
    ("zstd1", "zstd:1", Some(1)),
    ("zstd3", "zstd:3", Some(3)),
];

fn pages() -> Vec<[u8; PAGE_SIZE]> {
    let mix = Mix::default();
    (0..PAGES as u64)
        .map(|i| {
            let mut p = [0u8; PAGE_SIZE];
            fill_page(&mix, SEED, i, &mut p);
            p
        })
        .collect()
}

/// Each page as the stream's primary algorithm compresses it.
fn compress_all(stream: &mut zcomp::Stream, pages: &[[u8; PAGE_SIZE]]) -> Vec<Vec<u8>> {
    pages
        .iter()
        .map(|p| stream.compress(p).unwrap().to_vec())
        .collect()
}

fn compress(c: &mut Criterion) {
    let pages = pages();
    for &(name, params, level) in BACKENDS {
        let comp = Comp::parse(params, &[]).unwrap();
        let mut stream = comp.new_stream().unwrap();
        let total: usize = pages
            .iter()
            .map(|p| stream.compress(p).unwrap().len())
            .sum();
        eprintln!(
            "ratio {name}: {:.3}x over {PAGES} pages of the default mix",
            (PAGES * PAGE_SIZE) as f64 / total as f64
        );

        let mut group = c.benchmark_group(format!("compress/{name}"));
        let mut i = 0;
        group.bench_function("zcomp", |b| {
            b.iter(|| {
                i = (i + 1) % PAGES;
                black_box(stream.compress(black_box(&pages[i])).unwrap().len())
            })
        });
        let mut buf = vec![0u8; BUFFER_SIZE];
        match level {
            None => group.bench_function("direct", |b| {
                b.iter(|| {
                    i = (i + 1) % PAGES;
                    black_box(
                        lz4_flex::block::compress_into(black_box(&pages[i]), &mut buf).unwrap(),
                    )
                })
            }),
            Some(level) => {
                let mut z = zstd::bulk::Compressor::new(level).unwrap();
                group.bench_function("direct", |b| {
                    b.iter(|| {
                        i = (i + 1) % PAGES;
                        black_box(
                            z.compress_to_buffer(black_box(&pages[i]), &mut buf[..])
                                .unwrap(),
                        )
                    })
                })
            }
        };
        group.finish();
    }
}

fn decompress(c: &mut Criterion) {
    let pages = pages();
    for &(name, params, level) in BACKENDS {
        let comp = Comp::parse(params, &[]).unwrap();
        let mut stream = comp.new_stream().unwrap();
        let compressed = compress_all(&mut stream, &pages);

        let mut group = c.benchmark_group(format!("decompress/{name}"));
        let mut dst = [0u8; PAGE_SIZE];
        let mut i = 0;
        group.bench_function("zcomp", |b| {
            b.iter(|| {
                i = (i + 1) % PAGES;
                stream
                    .decompress(black_box(&compressed[i]), &mut dst)
                    .unwrap();
                black_box(&dst);
            })
        });
        match level {
            None => group.bench_function("direct", |b| {
                b.iter(|| {
                    i = (i + 1) % PAGES;
                    let n = lz4_flex::block::decompress_into(black_box(&compressed[i]), &mut dst);
                    assert_eq!(n.unwrap(), PAGE_SIZE);
                    black_box(&dst);
                })
            }),
            Some(_) => {
                let mut z = zstd::bulk::Decompressor::new().unwrap();
                group.bench_function("direct", |b| {
                    b.iter(|| {
                        i = (i + 1) % PAGES;
                        let n = z.decompress_to_buffer(black_box(&compressed[i]), &mut dst[..]);
                        assert_eq!(n.unwrap(), PAGE_SIZE);
                        black_box(&dst);
                    })
                })
            }
        };
        group.finish();
    }
}

/// Median over `ROUNDS` of time(zcomp) / time(direct), each round running both over all pages.
fn interleaved(mut zcomp: impl FnMut(usize), mut direct: impl FnMut(usize)) -> f64 {
    const ROUNDS: usize = 61;
    let time = |f: &mut dyn FnMut(usize)| {
        let start = Instant::now();
        for i in 0..PAGES {
            f(i);
        }
        start.elapsed().as_secs_f64()
    };
    // Warm caches and branch predictors for both.
    time(&mut zcomp);
    time(&mut direct);
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            if round % 2 == 0 {
                let z = time(&mut zcomp);
                z / time(&mut direct)
            } else {
                let d = time(&mut direct);
                time(&mut zcomp) / d
            }
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ROUNDS / 2]
}

fn overhead(_: &mut Criterion) {
    let pages = pages();
    for &(name, params, level) in BACKENDS {
        let comp = Comp::parse(params, &[]).unwrap();
        let mut stream = comp.new_stream().unwrap();
        let compressed = compress_all(&mut stream, &pages);
        let mut buf = vec![0u8; BUFFER_SIZE];
        let mut dst = [0u8; PAGE_SIZE];
        let (c, d) = match level {
            None => {
                let c = interleaved(
                    |i| {
                        black_box(stream.compress(black_box(&pages[i])).unwrap().len());
                    },
                    |i| {
                        black_box(
                            lz4_flex::block::compress_into(black_box(&pages[i]), &mut buf).unwrap(),
                        );
                    },
                );
                let mut dst2 = [0u8; PAGE_SIZE];
                let d = interleaved(
                    |i| {
                        stream
                            .decompress(black_box(&compressed[i]), &mut dst)
                            .unwrap();
                        black_box(&dst);
                    },
                    |i| {
                        let n =
                            lz4_flex::block::decompress_into(black_box(&compressed[i]), &mut dst2);
                        assert_eq!(n.unwrap(), PAGE_SIZE);
                        black_box(&dst2);
                    },
                );
                (c, d)
            }
            Some(level) => {
                let mut zc = zstd::bulk::Compressor::new(level).unwrap();
                let mut zd = zstd::bulk::Decompressor::new().unwrap();
                let c = interleaved(
                    |i| {
                        black_box(stream.compress(black_box(&pages[i])).unwrap().len());
                    },
                    |i| {
                        black_box(
                            zc.compress_to_buffer(black_box(&pages[i]), &mut buf[..])
                                .unwrap(),
                        );
                    },
                );
                let mut dst2 = [0u8; PAGE_SIZE];
                let d = interleaved(
                    |i| {
                        stream
                            .decompress(black_box(&compressed[i]), &mut dst)
                            .unwrap();
                        black_box(&dst);
                    },
                    |i| {
                        let n = zd.decompress_to_buffer(black_box(&compressed[i]), &mut dst2[..]);
                        assert_eq!(n.unwrap(), PAGE_SIZE);
                        black_box(&dst2);
                    },
                );
                (c, d)
            }
        };
        eprintln!("overhead {name}: compress zcomp/direct {c:.4}, decompress zcomp/direct {d:.4}");
    }
}

criterion_group! {
    name = benches;
    // Short runs: the machine has two noisy cores and other builds share them.
    config = Criterion::default()
        .sample_size(25)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = compress, decompress, overhead
}
criterion_main!(benches);
