//! The `vzram-bench` binary as a user runs it: argument errors, and a backend that dies.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vufront::ramdisk::{Ramdisk, RamdiskConfig};

const BIN: &str = env!("CARGO_BIN_EXE_vzram-bench");

#[test]
fn bad_arguments_are_one_line_and_status_2() {
    for (args, needle) in [
        ("--job rw=jump", "rw=jump"),
        ("--verify maybe", "maybe"),
        ("--socket /tmp/x.sock --store-only", "--store-only"),
        ("--size lots", "lots"),
        ("bench", "bench"),
        ("tiering --mem-limit 2.0", "(0, 1]"),
        ("tiering --policy maybe", "maybe"),
        ("tiering --job rw=write", "--job"),
    ] {
        let args: Vec<&str> = args.split_whitespace().collect();
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("vzram-bench: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        help.contains("--store-only") && help.contains("--socket") && help.contains("tiering"),
        "{help}"
    );
    let out = Command::new(BIN)
        .args(["tiering", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        help.contains("--mem-limit") && help.contains("--policy") && help.contains("--pages"),
        "{help}"
    );
}

#[test]
fn a_store_only_run_prints_the_table_and_mm_stat() {
    let out = Command::new(BIN)
        .args([
            "--store-only",
            "--size",
            "8M",
            "--job",
            "name=fill,rw=write,span=4m",
            "--job",
            "rw=randread,span=4m,ops=500",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "store (lz4)");
    assert!(lines[1].starts_with("JOB") && lines[1].ends_with("ERRORS"));
    assert!(lines[2].starts_with("fill") && lines[2].ends_with(" 0"));
    assert!(lines[3].starts_with("randread") && lines[3].ends_with(" 0"));
    assert!(lines[4].starts_with("mm_stat 4194304 "), "{text}");
}

#[test]
fn bench_ends_with_an_error_when_the_backend_dies() {
    let dir = std::env::temp_dir().join(format!("vzram-bench-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("disk.sock");
    let disk = Ramdisk::new(RamdiskConfig::default()).unwrap();
    let server = disk.serve(&socket).unwrap();
    let mut bench = Command::new(BIN)
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--verify",
            "off",
            "--job",
            "rw=randwrite,numjobs=2,iodepth=8,span=32m,runtime=60s",
            "--job",
            "rw=randread,numjobs=2,iodepth=8,span=32m,runtime=60s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(bench.try_wait().unwrap().is_none(), "bench ended early");
    assert_eq!(server.connections(), 1);
    server.kick_out(); // the backend hangs up mid-run, as a crashing daemon would
    let dropped = Instant::now();
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        if dropped.elapsed() > Duration::from_secs(10) {
            bench.kill().unwrap();
            let _ = bench.wait();
            panic!("bench still running 10 s after the backend hung up");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("vzram-bench: ") && err.to_lowercase().contains("disconnect"),
        "{err}"
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
