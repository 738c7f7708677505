//! Fills a zram device with swap-like pages on several threads, verifies every page, and
//! prints the statistics as zram shows them.
//!
//! `cargo run --release -p zram --example fill -- [SIZE] [ALGORITHM] [THREADS]`
//! (defaults: 512M lz4 2).

use pagemix::{Mix, PAGE_SIZE, fill_page};
use std::sync::Arc;
use std::time::Instant;
use zram::{Config, Device, Store, parse_size};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = parse_size(args.first().map_or("512M", |s| s)).unwrap_or_else(|e| {
        eprintln!("fill: {e}");
        std::process::exit(2)
    });
    let algo = args.get(1).map_or("lz4", |s| s);
    let threads: u64 = args.get(2).map_or(Ok(2), |s| s.parse()).unwrap_or(2).max(1);
    let comp = zcomp::Comp::parse(algo, &[]).unwrap_or_else(|e| {
        eprintln!("fill: {e}");
        std::process::exit(2)
    });
    let store = Arc::new(Store::new(zram::StoreConfig::default()).expect("pool"));
    let cfg = Config {
        size,
        backing_file: None,
    };
    let dev = Device::new(store, Arc::new(comp), cfg).unwrap_or_else(|e| {
        eprintln!("fill: {e}");
        std::process::exit(2)
    });
    let mix = Mix::default();
    let pages = dev.pages();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let dev = &dev;
            s.spawn(move || {
                let mut stream = dev.new_stream();
                let (mut page, mut back) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
                for i in (t..pages).step_by(threads as usize) {
                    fill_page(&mix, 1, i, &mut page);
                    dev.write_page(i, &page, &mut stream).expect("write");
                }
                for i in (t..pages).step_by(threads as usize) {
                    fill_page(&mix, 1, i, &mut page);
                    dev.read_page(i, &mut back, &mut stream).expect("read");
                    assert_eq!(page, back, "page {i} differs");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let st = dev.stats();
    let mm = &st.mm_stat;
    let mib = |b: u64| format!("{:.1}M", b as f64 / 1048576.0);
    println!(
        "wrote and verified {pages} pages on {threads} threads in {secs:.2} s ({:.0} page writes+reads/s)",
        pages as f64 * 2.0 / secs
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9}",
        "ALGORITHM", "DISKSIZE", "DATA", "COMPR", "TOTAL"
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9}",
        st.comp_algorithm,
        mib(st.disksize),
        mib(mm.orig_data_size),
        mib(mm.compr_data_size),
        mib(mm.mem_used_total)
    );
    println!(
        "ratio {:.2} (data/total), allocator efficiency {:.1}% (compr/total)",
        mm.orig_data_size as f64 / mm.mem_used_total.max(1) as f64,
        100.0 * mm.compr_data_size as f64 / mm.mem_used_total.max(1) as f64
    );
    println!("mm_stat {}", mm.line());
    println!(
        "io_stat {} {} {} {}",
        st.io_stat.failed_reads,
        st.io_stat.failed_writes,
        st.io_stat.invalid_io,
        st.io_stat.notify_free
    );
}
