//! Space efficiency: sum of object sizes / pool memory, for lz4-sized swap objects.
//!
//! Prints a table: steady state, then after freeing a random half and compacting; pool memory
//! with and without the pool's own metadata (handle table, zspage records).

mod common;

use common::swap_object_sizes;
use pagemix::SplitMix64;
use zsmalloc::{Config, PAGE_SIZE, Pool};

fn report(what: &str, pool: &Pool, data: usize) {
    let s = pool.stats();
    let pages = s.pages_used * PAGE_SIZE;
    println!(
        "| {what} | {:.1} MiB | {:.1} MiB | {:.2}% | {:.2}% |",
        data as f64 / 1048576.0,
        pages as f64 / 1048576.0,
        100.0 * data as f64 / pages as f64,
        100.0 * data as f64 / (pages + s.metadata_bytes) as f64,
    );
}

fn main() {
    let pages = 262_144; // 1 GiB of swapped-out memory
    println!("| chain, state | data | pool pages | data/pages | data/(pages+metadata) |");
    println!("|---|---|---|---|---|");
    for chain in [4, 8, 16] {
        let pool = Pool::new(Config {
            max_chain: chain,
            ..Config::default()
        })
        .unwrap();
        let sizes = swap_object_sizes(pages, pool.huge_class_size());
        let buf = vec![7u8; PAGE_SIZE];
        let mut live: Vec<_> = sizes
            .iter()
            .map(|&len| {
                let h = pool.malloc(len).unwrap();
                pool.write(h, &buf[..len]);
                (h, len)
            })
            .collect();
        let data: usize = live.iter().map(|&(_, l)| l).sum();
        report(&format!("{chain}, all stored"), &pool, data);
        let mut rng = SplitMix64::new(0x2545F4914F6CDD1D);
        for i in (1..live.len()).rev() {
            live.swap(i, rng.next_u64() as usize % (i + 1));
        }
        for (h, _) in live.drain(..live.len() / 2) {
            pool.free(h);
        }
        let data: usize = live.iter().map(|&(_, l)| l).sum();
        report(&format!("{chain}, half freed"), &pool, data);
        pool.compact();
        report(&format!("{chain}, half freed + compact"), &pool, data);
    }
}
