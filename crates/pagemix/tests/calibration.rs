//! Measures the generated mix with the real codecs and checks it against the calibration
//! targets of the crate docs. `cargo test -p pagemix --test calibration -- --nocapture` prints
//! the figures.

use pagemix::{Mix, PAGE_SIZE, PageKind, fill_page};

const PAGES: u64 = 4096;

struct Sizes {
    kinds: Vec<PageKind>,
    lz4: Vec<usize>,
    zstd: Vec<(i32, Vec<usize>)>,
}

fn measure(mix: &Mix, seed: u64) -> Sizes {
    let levels = [-1, 1, 3];
    let mut s = Sizes {
        kinds: Vec::new(),
        lz4: Vec::new(),
        zstd: levels.iter().map(|&l| (l, Vec::new())).collect(),
    };
    let mut comps: Vec<zstd::bulk::Compressor> = levels
        .iter()
        .map(|&l| zstd::bulk::Compressor::new(l).unwrap())
        .collect();
    let mut page = [0u8; PAGE_SIZE];
    for index in 0..PAGES {
        s.kinds.push(fill_page(mix, seed, index, &mut page));
        s.lz4.push(lz4_flex::block::compress(&page).len());
        for (c, (_, sizes)) in comps.iter_mut().zip(&mut s.zstd) {
            sizes.push(c.compress(&page).unwrap().len());
        }
    }
    s
}

fn ratio(sizes: &[usize]) -> f64 {
    (sizes.len() * PAGE_SIZE) as f64 / sizes.iter().sum::<usize>() as f64
}

fn histogram(sizes: &[usize], kinds: &[PageKind]) -> String {
    let mut buckets = [0usize; 17];
    let mut n = 0;
    for (&len, &k) in sizes.iter().zip(kinds) {
        if matches!(k, PageKind::Zero | PageKind::Same) {
            continue;
        }
        n += 1;
        buckets[(len / 256).min(16)] += 1;
    }
    buckets
        .iter()
        .map(|&b| format!("{:.1}", 100.0 * b as f64 / n as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn default_mix_compresses_like_real_swap() {
    let s = measure(&Mix::default(), 1);
    let lz4 = ratio(&s.lz4);
    let incompressible = s.lz4.iter().filter(|&&l| l >= PAGE_SIZE).count() as f64 / PAGES as f64;
    println!(
        "lz4 ratio {lz4:.2}x, {:.1}% pages >= 4096 bytes",
        100.0 * incompressible
    );
    println!(
        "lz4 histogram (256-byte buckets, % of non-same pages): {}",
        histogram(&s.lz4, &s.kinds)
    );
    for (level, sizes) in &s.zstd {
        println!("zstd {level} ratio {:.2}x", ratio(sizes));
    }
    println!("zstd 1 histogram: {}", histogram(&s.zstd[1].1, &s.kinds));
    for kind in PageKind::ALL {
        let idx: Vec<usize> = (0..s.kinds.len()).filter(|&i| s.kinds[i] == kind).collect();
        if idx.is_empty() {
            continue;
        }
        let mean = |v: &[usize]| idx.iter().map(|&i| v[i]).sum::<usize>() as f64 / idx.len() as f64;
        println!(
            "{kind:>6}: {:5} pages, mean lz4 {:6.0}, zstd1 {:6.0}",
            idx.len(),
            mean(&s.lz4),
            mean(&s.zstd[1].1)
        );
    }
    assert!((2.4..=3.0).contains(&lz4), "lz4 ratio {lz4}");
    let zstd1 = ratio(&s.zstd[1].1);
    assert!((3.0..=3.8).contains(&zstd1), "zstd 1 ratio {zstd1}");
    let zstd_fast = ratio(&s.zstd[0].1);
    assert!(
        zstd_fast > lz4 && zstd_fast < zstd1,
        "zstd -1 ratio {zstd_fast}"
    );
    assert!(
        (0.02..=0.05).contains(&incompressible),
        "incompressible share {incompressible}"
    );
}

#[test]
fn more_zero_pages_compress_better() {
    let base = ratio(&measure(&Mix::default(), 2).lz4);
    let zeroes = ratio(
        &measure(
            &Mix {
                zero: 0.3,
                ..Mix::default()
            },
            2,
        )
        .lz4,
    );
    assert!(
        zeroes > base * 1.2,
        "zero=0.3 gives {zeroes}, default {base}"
    );
}
