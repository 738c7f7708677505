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
