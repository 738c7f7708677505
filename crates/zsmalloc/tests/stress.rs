//! Many threads allocate, write, read, verify and free while another compacts in a loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use zsmalloc::{Config, Handle, PAGE_SIZE, Pool};

/// Content derived from the handle and a generation, so any reader can check any object.
fn fill(buf: &mut [u8], h: Handle, generation: u32) {
    let mut x = (h.raw() as u64) << 32 | generation as u64 | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Lengths shaped like lz4-compressed swap pages: mostly 600..2600 bytes, some small, some huge.
fn length(r: u64) -> usize {
    match r % 100 {
        0..=4 => 1 + (r >> 8) as usize % 512,
        5..=89 => 600 + (r >> 8) as usize % 2000,
        90..=96 => 2600 + (r >> 8) as usize % 1000,
        _ => 3600 + (r >> 8) as usize % 497,
    }
}

/// Fails the test instead of hanging CI if something deadlocks.
fn watchdog(limit: Duration) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !d.load(Ordering::Relaxed) {
            if start.elapsed() > limit {
                eprintln!("stress test did not finish in {limit:?}: deadlock?");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    done
}

#[test]
fn concurrent_use_with_compaction_loses_nothing() {
    let done = watchdog(Duration::from_secs(300));
    let pool = Pool::new(Config {
        max_chain: 8,
        capacity_pages: 1 << 16,
        page_limit: 1 << 16,
    })
    .unwrap();
    let stop = AtomicBool::new(false);
    let compacted = AtomicUsize::new(0);
    let verified = AtomicUsize::new(0);
    let workers = 3;
    let rounds = if cfg!(debug_assertions) { 100 } else { 400 };
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                compacted.fetch_add(pool.compact(), Ordering::Relaxed);
                std::thread::yield_now();
            }
        });
        let handles: Vec<_> = (0..workers)
            .map(|t| {
                let (pool, verified) = (&pool, &verified);
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    let mut next = move || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut live: Vec<(Handle, u32)> = Vec::new();
                    let mut buf = vec![0u8; PAGE_SIZE];
                    let mut local = [0u8; PAGE_SIZE];
                    for round in 0..rounds {
                        for _ in 0..200 {
                            let len = length(next());
                            let h = pool.malloc(len).unwrap();
                            fill(&mut buf[..len], h, round);
                            pool.write(h, &buf[..len]);
                            live.push((h, round));
                        }
                        // Read and verify everything, now and then holding a guard while
                        // "sleeping", as a decompressor that blocks would.
                        for (i, &(h, generation)) in live.iter().enumerate() {
                            let g = pool.read_begin(h, &mut local);
                            fill(&mut buf[..g.len()], h, generation);
                            assert_eq!(&*g, &buf[..g.len()], "thread {t} handle {h:?}");
                            if i % 97 == 0 {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                            drop(g);
                            verified.fetch_add(1, Ordering::Relaxed);
                        }
                        // Rewrite some in place, free a random 60% (leaving holes to compact).
                        let mut kept = Vec::with_capacity(live.len());
                        for (h, generation) in live.drain(..) {
                            match next() % 10 {
                                0..=5 => pool.free(h),
                                6 => {
                                    let len = pool.len(h);
                                    fill(&mut buf[..len], h, round + 1000);
                                    pool.write(h, &buf[..len]);
                                    kept.push((h, round + 1000));
                                }
                                _ => kept.push((h, generation)),
                            }
                        }
                        live = kept;
                    }
                    for (h, _) in live {
                        pool.free(h);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    done.store(true, Ordering::Relaxed);
    let stats = pool.stats();
    assert_eq!(stats.objects, 0);
    assert_eq!(stats.pages_used, 0, "{:?}", pool.class_stats());
    assert!(verified.load(Ordering::Relaxed) > 10_000);
    let compacted = compacted.load(Ordering::Relaxed);
    assert!(compacted > 0, "compaction freed nothing");
    assert_eq!(stats.pages_compacted, compacted as u64);
}
