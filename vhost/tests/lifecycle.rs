//! Connection lifecycle, alone in its test binary so that thread counts mean something: each
//! connection's worker threads end when it does, and the daemon serves the next one.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vufront::{Frontend, Options};
use vzram::ConfigSpace;
use vzram::{DEFAULT_POLL, DeviceServer};

/// Queue worker threads of device `vz0` ("vz0-q0", "vz0-q1", ...).
fn workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("vz0-q"))
        .count()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn connections_come_and_go_without_leaking_threads() {
    let dir = std::env::temp_dir().join(format!("vzram-life-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vz0.sock");
    let size = 16 << 20;
    let served = common::served(size, socket.clone(), 4, false, 0);
    let blk = ConfigSpace {
        size,
        blk_size: 4096,
        num_queues: 4,
        queue_size: 128,
    };
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = DeviceServer::start(served.clone(), listener, blk, DEFAULT_POLL).unwrap();
    // Workers are started with their queue: an idle device has none.
    assert_eq!(workers(), 0);
    for round in 0..5u64 {
        let mut dev = Frontend::connect(
            &socket,
            &Options {
                num_queues: 2,
                queue_size: 128,
                ..Options::default()
            },
        )
        .unwrap();
        // One worker per queue the frontend started.
        wait_until("the queues' workers", || workers() == 2);
        let mut q = dev.take_queue(1).unwrap();
        let page = vec![round as u8 + 1; 4096];
        q.write(round * 8, &page).unwrap().check().unwrap();
        if round > 0 {
            let prev = q.read((round - 1) * 8, 4096).unwrap().check().unwrap();
            assert!(
                prev.data == vec![round as u8; 4096],
                "round {round}: the previous connection's page"
            );
        }
        drop(q);
        dev.disconnect();
        wait_until("the hang-up", || {
            served.connections.load(Ordering::Relaxed) == round + 1
                && !served.connected.load(Ordering::Relaxed)
        });
        wait_until("the old workers to end", || workers() == 0);
    }
    // A connected frontend is cut off by stop, and its workers end with it.
    let dev = Frontend::connect(
        &socket,
        &Options {
            queue_size: 128,
            ..Options::default()
        },
    )
    .unwrap();
    wait_until("the last connection's workers", || workers() > 0);
    server.stop();
    assert_eq!(workers(), 0, "stopping the server ends every worker");
    drop(dev);
    // The socket file belongs to whoever bound it.
    assert!(socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
