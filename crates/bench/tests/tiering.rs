//! The tiering scenario, small and short: the figures are for benchmarks, but every run must
//! verify, sample the pool, and hold the limit.

use clap::Parser;
use vzram_bench::tiering::{PolicyMode, TieringArgs, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TieringArgs,
}

#[test]
fn a_short_run_verifies_samples_and_holds_the_limit() {
    // Small and unhurried: the debug build on a loaded machine must still get past the
    // bursts into the hot phase of every device.
    let args = Cli::parse_from([
        "t",
        "--size",
        "512K",
        "--duration",
        "1.2s",
        "--phases",
        "4",
        "--fill-bursts",
        "1",
        "--rate",
        "500",
        "--cold-reads",
        "600",
        "--sample",
        "20ms",
        "--mem-limit",
        "0.5",
        // No page turns cold in the run: writes at the limit can move only huge pages out.
        "--idle-age",
        "60m",
    ])
    .args;
    let report = run(&args).unwrap();
    assert_eq!(report.problems(), 0, "{report}");
    assert_eq!(
        report.runs.len(),
        3,
        "the reference and one run per policy mode"
    );
    let pages_written = 4 * 128;
    for r in &report.runs {
        assert_eq!(r.verify_failures + r.read_errors, 0, "{}: {report}", r.name);
        assert!(
            r.hot_reads > 0 && r.verified_pages >= r.hot_reads,
            "{}: {report}",
            r.name
        );
        assert!(r.hot_read_us.p99 > 0.0 && r.hot_read_us.p50 <= r.hot_read_us.p99);
        assert!(
            r.writes >= pages_written,
            "{}: every page written once",
            r.name
        );
        assert_eq!(
            r.failed_writes, r.zram_failed_writes,
            "{}: the requests that failed are zram's failed writes",
            r.name
        );
        assert!(
            r.pool.samples >= 10,
            "{}: {} samples",
            r.name,
            r.pool.samples
        );
        assert!(r.pool.peak > 0 && r.pool.mean > 0 && r.pool.mean <= r.pool.peak);
        assert!(r.pool.peak <= r.pool.mem_used_max, "{}", r.name);
        assert_eq!(r.per_device.len(), 4);
        for d in &r.per_device {
            assert_eq!(
                d.busy_phases, 2,
                "{} {}: 4 phases, 2 of 4 busy",
                r.name, d.name
            );
        }
        assert!(r.cpu_seconds > 0.0 && r.load_cpu_seconds <= r.cpu_seconds + 0.05);
    }
    let reference = &report.runs[0];
    assert_eq!(reference.mem_limit, 0);
    assert_eq!(reference.failed_writes, 0, "no limit, no failed write");
    assert_eq!(reference.pool.mem_used_max, report.lz4_footprint);
    assert_eq!(
        report.mem_limit,
        report.lz4_footprint / 2 / 4096 * 4096,
        "--mem-limit 0.5 of the reference's peak"
    );
    for r in &report.runs[1..] {
        assert_eq!(r.mem_limit, report.mem_limit);
        assert!(
            r.pool.mem_used_max <= r.mem_limit,
            "{}: {} over the limit {}",
            r.name,
            r.pool.mem_used_max,
            r.mem_limit
        );
    }
    let off = report
        .runs
        .iter()
        .find(|r| r.policy == PolicyMode::Off && r.mem_limit > 0)
        .unwrap();
    // Half the lz4 footprint and next to nothing cold to move out (direct reclaim takes only
    // huge pages): writes fail, and the pages they were for are read back holding their old
    // content.
    assert!(off.failed_writes > 0, "{report}");
    assert!(off.kept_after_failed_write > 0, "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["runs"][1]["pool"]["peak"].as_u64().unwrap() > 0);
}
