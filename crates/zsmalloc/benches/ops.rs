//! malloc + write + read + free per object, on 1 and 2 threads, with lz4-sized objects.

mod common;

use common::swap_object_sizes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};
use zsmalloc::{Config, PAGE_SIZE, Pool};

fn one_thread_ops(pool: &Pool, sizes: &[usize], start: usize, iters: u64) {
    let buf = [0x5Au8; PAGE_SIZE];
    let mut local = [0u8; PAGE_SIZE];
    for i in 0..iters as usize {
        let len = sizes[(start + i) % sizes.len()];
        let h = pool.malloc(len).unwrap();
        pool.write(h, &buf[..len]);
        let g = pool.read_begin(h, &mut local);
        black_box(g[len - 1]);
        drop(g);
        pool.free(h);
    }
}

/// Wall time for `threads` threads each running `work(thread index)`.
fn on_threads(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let work = &work;
            s.spawn(move || work(t));
        }
    });
    start.elapsed()
}

fn ops(c: &mut Criterion) {
    let pool = Pool::new(Config::default()).unwrap();
    let sizes = swap_object_sizes(16384, pool.huge_class_size());
    // A populated pool, as in a running daemon: allocation finds partly used zspages.
    let resident: Vec<_> = sizes
        .iter()
        .map(|&len| {
            let h = pool.malloc(len).unwrap();
            pool.write(h, &vec![1u8; len]);
            h
        })
        .collect();
    let mut g = c.benchmark_group("zsmalloc_object_cycle");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, |t| one_thread_ops(&pool, &sizes, t * 7919, iters))
            })
        });
    }
    g.finish();
    for h in resident {
        pool.free(h);
    }
}

/// What two threads gain on this machine for plain work (a 4 KiB copy): the ceiling for the
/// pool's own 2-thread scaling in the same run.
fn machine_baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("machine_copy_4k");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, |_| {
                    let src = [1u8; PAGE_SIZE];
                    let mut dst = [0u8; PAGE_SIZE];
                    for _ in 0..iters {
                        dst.copy_from_slice(black_box(&src));
                        black_box(&mut dst);
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ops, machine_baseline);
criterion_main!(benches);
