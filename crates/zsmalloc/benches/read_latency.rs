//! Read latency (read_begin + touch + read_end) while another thread churns the pool, with and
//! without compaction running in that thread. Prints p50/p99/p99.9 in nanoseconds.

mod common;

use common::swap_object_sizes;
use pagemix::SplitMix64;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use zsmalloc::{Config, Handle, PAGE_SIZE, Pool};

fn percentiles(mut v: Vec<u64>) -> [u64; 3] {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    [at(0.50), at(0.99), at(0.999)]
}

fn run(compact: bool) -> ([u64; 3], usize) {
    let pool = Pool::new(Config::default()).unwrap();
    let sizes = swap_object_sizes(65536, pool.huge_class_size());
    let buf = vec![3u8; PAGE_SIZE];
    let alloc = |len: usize| {
        let h = pool.malloc(len).unwrap();
        pool.write(h, &buf[..len]);
        h
    };
    // Readers read the first half; the churn thread frees and refills the second half.
    let half = sizes.len() / 2;
    let stable: Vec<Handle> = sizes[..half].iter().map(|&l| alloc(l)).collect();
    let churn: Vec<Handle> = sizes[half..].iter().map(|&l| alloc(l)).collect();
    let stop = AtomicBool::new(false);
    let mut compacted = 0;
    let lat = std::thread::scope(|s| {
        let churner = s.spawn(|| {
            let mut churn = churn;
            let mut rng = SplitMix64::new(99);
            let mut freed = 0;
            while !stop.load(Ordering::Relaxed) {
                // Free a random tenth (holes all over the zspages), compact or not, refill.
                let picked: Vec<usize> = (0..churn.len() / 10)
                    .map(|_| rng.next_u64() as usize % churn.len())
                    .collect();
                let mut lens = Vec::with_capacity(picked.len());
                for &i in &picked {
                    lens.push(pool.len(churn[i]));
                    pool.free(churn[i]);
                    churn[i] = alloc(1);
                }
                if compact {
                    freed += pool.compact();
                }
                for (&i, len) in picked.iter().zip(lens) {
                    pool.free(churn[i]);
                    churn[i] = alloc(len);
                }
            }
            freed
        });
        let mut rng = SplitMix64::new(7);
        let mut local = [0u8; PAGE_SIZE];
        let mut lat = Vec::with_capacity(2_000_000);
        for _ in 0..2_000_000 {
            let h = stable[rng.next_u64() as usize % stable.len()];
            let t = Instant::now();
            let g = pool.read_begin(h, &mut local);
            black_box(g[0]);
            drop(g);
            lat.push(t.elapsed().as_nanos() as u64);
        }
        stop.store(true, Ordering::Relaxed);
        compacted = churner.join().unwrap();
        lat
    });
    (percentiles(lat), compacted)
}

fn main() {
    let timer: Vec<u64> = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    println!(
        "timer overhead p50 {} ns (included in every figure below)",
        percentiles(timer)[0]
    );
    println!("| churn thread | p50 ns | p99 ns | p99.9 ns | pages compacted |");
    println!("|---|---|---|---|---|");
    for round in 0..3 {
        for compact in [false, true] {
            let ([p50, p99, p999], freed) = run(compact);
            let what = if compact {
                "free/alloc + compact"
            } else {
                "free/alloc only"
            };
            println!("| {what} (run {round}) | {p50} | {p99} | {p999} | {freed} |");
        }
    }
}
