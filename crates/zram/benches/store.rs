//! The store against the bare codec on the same swap-like pages, in the same run: write_page vs
//! compress, read_page vs decompress; writes on 1 vs 2 threads; and a store in memory against
//! one in a state directory on tmpfs (`--state-dir`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pagemix::{Mix, PAGE_SIZE, fill_page};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zram::{Config, Device, Store};

const PAGES: u64 = 4096;

fn pages() -> Vec<[u8; PAGE_SIZE]> {
    (0..PAGES)
        .map(|i| {
            let mut p = [0u8; PAGE_SIZE];
            fill_page(&Mix::default(), 1, i, &mut p);
            p
        })
        .collect()
}

fn device(algo: &str, pages: u64) -> Arc<Device> {
    let store = Arc::new(Store::new(zram::StoreConfig::default()).unwrap());
    let comp = zcomp::Comp::parse(algo, &[]).unwrap();
    Device::new(
        store,
        Arc::new(comp),
        Config {
            size: pages * PAGE_SIZE as u64,
            backing_file: None,
        },
    )
    .unwrap()
}

fn store_vs_codec(c: &mut Criterion) {
    let data = pages();
    for algo in ["lz4", "zstd"] {
        let dev = device(algo, PAGES);
        let mut s = dev.new_stream();
        for (i, p) in data.iter().enumerate() {
            dev.write_page(i as u64, p, &mut s).unwrap();
        }
        // What each page compresses to, for the bare decompression loop.
        let compressed: Vec<Vec<u8>> = data
            .iter()
            .map(|p| s.compress(p).unwrap().to_vec())
            .collect();
        let mut g = c.benchmark_group(format!("page_{algo}"));
        g.sample_size(20).measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements(1));
        let mut i = 0usize;
        g.bench_function("codec_compress", |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                black_box(s.compress(&data[i]).unwrap().len())
            })
        });
        g.bench_function("store_write_page", |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                dev.write_page(i as u64, &data[i], &mut s).unwrap()
            })
        });
        let mut out = [0u8; PAGE_SIZE];
        g.bench_function("codec_decompress", |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                // Zero and same-filled pages are never decompressed by the store either.
                if compressed[i].len() < 4096 {
                    s.decompress(&compressed[i], &mut out).unwrap();
                }
                black_box(out[0])
            })
        });
        g.bench_function("store_read_page", |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                dev.read_page(i as u64, &mut out, &mut s).unwrap();
                black_box(out[0])
            })
        });
        g.finish();
    }
}

fn scaling(c: &mut Criterion) {
    let data = pages();
    let dev = device("lz4", PAGES * 2);
    let mut g = c.benchmark_group("write_page_threads_lz4");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for threads in [1u64, 2] {
        g.throughput(Throughput::Elements(threads));
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|sc| {
                    for t in 0..threads {
                        let (dev, data) = (&dev, &data);
                        sc.spawn(move || {
                            let mut s = dev.new_stream();
                            for k in 0..iters {
                                let i = (k % PAGES) as usize;
                                dev.write_page(t * PAGES + i as u64, &data[i], &mut s)
                                    .unwrap();
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn state_vs_memory(c: &mut Criterion) {
    let data = pages();
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("vzram-bench-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let comp = Arc::new(zcomp::Comp::parse("lz4", &[]).unwrap());
    let spec = zram::state::DeviceSpec {
        name: "bench".into(),
        config: Config {
            size: PAGES * PAGE_SIZE as u64,
            backing_file: None,
        },
        comp,
    };
    let mut opened = zram::state::open(&dir, &zram::StoreConfig::default(), &[spec]).unwrap();
    let devices = [
        ("memory", device("lz4", PAGES)),
        ("state_dir", opened.devices.pop().unwrap()),
    ];
    let mut g = c.benchmark_group("state_lz4");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for (name, dev) in &devices {
        let mut s = dev.new_stream();
        for (i, p) in data.iter().enumerate() {
            dev.write_page(i as u64, p, &mut s).unwrap();
        }
        let mut i = 0usize;
        g.bench_function(format!("{name}_write_page"), |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                dev.write_page(i as u64, &data[i], &mut s).unwrap()
            })
        });
        let mut out = [0u8; PAGE_SIZE];
        g.bench_function(format!("{name}_read_page"), |b| {
            b.iter(|| {
                i = (i + 1) % data.len();
                dev.read_page(i as u64, &mut out, &mut s).unwrap();
                black_box(out[0])
            })
        });
    }
    g.finish();
    drop(devices);
    drop(opened);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, store_vs_codec, scaling, state_vs_memory);
criterion_main!(benches);
