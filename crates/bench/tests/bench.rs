//! `vzram-bench` end to end, small: the numbers are for benchmarks, but the runs must verify.

use clap::Parser;
use vzram_bench::{BenchArgs, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(extra: &[&str]) -> BenchArgs {
    let mut argv = vec!["vzram-bench", "--size", "16M"];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).bench
}

const JOBS: [&str; 6] = [
    "--job",
    "name=fill,rw=write,iodepth=8,span=4m",
    "--job",
    "rw=randwrite,iodepth=8,numjobs=2,span=4m,ops=2000",
    "--job",
    "rw=randread,iodepth=8,numjobs=2,span=4m,ops=2000",
];

#[test]
fn in_process_run_verifies_every_read() {
    let report = run(&args(&JOBS)).unwrap();
    assert_eq!(report.problems(), 0);
    let read = &report.jobs[2];
    assert_eq!(read.ops, 2000);
    assert_eq!(
        read.verified_pages, 2000,
        "every read hits a page written by the fill"
    );
    assert_eq!(read.per_queue_ops.len(), 2);
    assert!(read.per_queue_ops.iter().all(|&n| n > 0));
    let mm = report.mm_stat.unwrap();
    assert_eq!(
        mm.orig_data_size,
        1024 * 4096,
        "zram counts same-filled pages as stored"
    );
    assert!(mm.same_pages > 0);
    assert!(mm.compr_data_size < mm.orig_data_size / 2);
}

#[test]
fn store_only_run_verifies_every_read() {
    let mut a = vec!["--store-only"];
    a.extend_from_slice(&JOBS);
    let report = run(&args(&a)).unwrap();
    assert_eq!(report.problems(), 0);
    assert_eq!(report.jobs[0].ops, 1024, "one pass over 4 MiB");
    assert_eq!(report.jobs[2].verified_pages, 2000);
}

#[test]
fn store_only_reads_are_checked_against_the_generated_content() {
    // Nothing was written: under --verify all, reads of pages whose content is not all zeros
    // fail; under the default (written) none is checked.
    let job = ["--job", "rw=randread,iodepth=32,span=4m,ops=200"];
    let mut a = vec!["--store-only", "--verify", "all"];
    a.extend_from_slice(&job);
    let report = run(&args(&a)).unwrap();
    let read = &report.jobs[0];
    assert_eq!(read.iodepth, 1, "the store serves one page at a time");
    assert_eq!(read.verified_pages + read.verify_failures, 200);
    assert!(read.verify_failures > 100, "{read:?}");
    let mut a = vec!["--store-only"];
    a.extend_from_slice(&job);
    let report = run(&args(&a)).unwrap();
    assert_eq!(report.problems(), 0);
    assert_eq!(report.jobs[0].unverified_pages, 200);
}

#[test]
fn store_only_refuses_blocks_other_than_4k() {
    let err = run(&args(&["--store-only", "--job", "rw=write,bs=8k,span=4m"])).unwrap_err();
    assert_eq!(err.to_string(), "--store-only runs bs=4k jobs only");
}

/// A page file of `n` distinct pages, none of them same-filled, raw and zstd-compressed.
fn page_files(tag: &str, n: usize) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("vzram-bench-pages-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes: Vec<u8> = (0..n * 4096)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i % 251) as u8)
        .collect();
    let raw = dir.join("pages.bin");
    std::fs::write(&raw, &bytes).unwrap();
    let zst = dir.join("pages.bin.zst");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    (raw, zst, bytes)
}

#[test]
fn real_pages_from_a_file_are_written_and_verified() {
    let (raw, zst, bytes) = page_files("ok", 64);
    for (file, store_only) in [(&raw, true), (&zst, false)] {
        let mut a = vec!["--pages", file.to_str().unwrap()];
        if store_only {
            a.push("--store-only");
        }
        a.extend_from_slice(&JOBS);
        let report = run(&args(&a)).unwrap();
        assert_eq!(report.problems(), 0, "{}", file.display());
        assert_eq!(report.jobs[2].verified_pages, 2000, "{}", file.display());
        let mm = report.mm_stat.unwrap();
        // Every disk page holds one of the file's pages: none is same-filled, and they
        // compress like the file's content, not like the generator's.
        assert_eq!(mm.same_pages, 0, "{}", file.display());
        assert_eq!(mm.orig_data_size, 1024 * 4096, "{}", file.display());
    }
    assert_eq!(bytes.len(), 64 * 4096);
    std::fs::remove_dir_all(raw.parent().unwrap()).unwrap();
}

#[test]
fn a_page_file_that_is_not_whole_pages_is_refused() {
    let (raw, _, mut bytes) = page_files("bad", 2);
    bytes.truncate(5000);
    std::fs::write(&raw, &bytes).unwrap();
    let Err(e) = run(&args(&["--pages", raw.to_str().unwrap(), "--store-only"])) else {
        panic!("a file of 5000 bytes was accepted");
    };
    let e = e.to_string();
    assert!(
        e.contains("not a whole, non-zero number of 4 KiB pages"),
        "{e}"
    );
    std::fs::remove_dir_all(raw.parent().unwrap()).unwrap();
}
