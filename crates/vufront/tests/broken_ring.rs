//! An avail index published more than a ring ahead: the backend must give up on that queue
//! without spinning. Its own test binary, so the process's CPU time is this test's alone.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;
use vufront::*;

/// User + system CPU time of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Fails the test without unwinding: dropping the server joins the vring workers, which
/// never returns if one of them spins.
fn fail(msg: &str) -> ! {
    // Straight to fd 2: libtest's capture of eprintln! would be lost with the exit.
    let _ = writeln!(std::io::stderr(), "FAILED: {msg}");
    std::process::exit(101)
}

#[test]
fn avail_index_jump_stops_the_queue_without_spinning() {
    let s = serve_default();
    let mut dev = Frontend::connect(
        &s.socket,
        &Options {
            num_queues: 2,
            queue_size: 16,
            ..Options::default()
        },
    )
    .unwrap();
    let mut q0 = dev.take_queue(0).unwrap();
    let mut q1 = dev.take_queue(1).unwrap();
    q1.flush().unwrap().check().unwrap();
    let idx = q1.avail_idx();
    q1.set_avail_idx(idx.wrapping_add(q1.size() + 1)).unwrap();
    q1.kick().unwrap();
    if !eventually(Duration::from_secs(2), || s.disk.stats().broken_rings >= 1) {
        fail("the backend did not notice the broken avail ring");
    }

    // 500 ms of wall time: a worker spinning on "more work pending" would burn ~50 ticks.
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let burnt = cpu_ticks() - before;
    if burnt >= 15 {
        fail(&format!("{burnt} ticks of CPU while idle: a worker spins"));
    }

    // The other queue is unaffected.
    q0.write(0, &[5; 4096]).unwrap().check().unwrap();
    assert_eq!(q0.read(0, 4096).unwrap().data, vec![5; 4096]);
    assert!(q1.poll_used().unwrap().is_empty());
}
