//! `--state-dir`: the daemon killed with SIGKILL under load, many times, comes back with every
//! write it acknowledged; a clean stop and start serves the same disk.

#[path = "common/proc.rs"]
mod proc;

use proc::{Daemon, KillOnDrop, TempDir};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vufront::{Frontend, Options, Request, Segment};

const PAGES: u64 = 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Version `v` of page `p`: a same-filled page for every third version, else a pattern that
/// names the page and the version. Version 0 is a page never written (zeroes).
fn content(p: u64, v: u64) -> Vec<u8> {
    if v == 0 {
        return vec![0; 4096];
    }
    if v % 3 == 0 {
        return (p << 32 | v).to_le_bytes().repeat(512);
    }
    let mut b: Vec<u8> = (0..4096u64)
        .map(|i| ((i * 7 + p * 31 + v * 131) % 251) as u8)
        .collect();
    b[..8].copy_from_slice(&p.to_le_bytes());
    b[8..16].copy_from_slice(&v.to_le_bytes());
    b
}

fn connect(sock: &Path) -> Frontend {
    let opts = Options {
        mem_size: 4 << 20,
        connect_timeout: Duration::from_secs(20),
        reply_timeout: Some(TIMEOUT),
        ..Options::default()
    };
    Frontend::connect(sock, &opts).expect("connect")
}

fn args(dir: &Path) -> Vec<String> {
    [
        "--socket",
        &dir.join("sock").to_string_lossy(),
        "--size",
        "4M",
        "--state-dir",
        &dir.join("state").to_string_lossy(),
        "--control",
        &dir.join("ctl").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Reads the whole disk (64 KiB at a time) and checks every page against `acked`, allowing
/// `started` for a page whose write was in flight; what it finds becomes the acknowledged
/// version.
fn verify(sock: &Path, acked: &mut HashMap<u64, u64>, started: &HashMap<u64, u64>, round: usize) {
    let mut dev = connect(sock);
    let mut q = dev.take_queue(0).unwrap();
    for chunk in 0..PAGES / 16 {
        let c = q
            .execute(&Request::read(chunk * 16 * 8, 16 * 4096), TIMEOUT)
            .and_then(|c| c.check())
            .unwrap_or_else(|e| panic!("round {round}: read: {e}"));
        for (k, got) in c.data.chunks_exact(4096).enumerate() {
            let p = chunk * 16 + k as u64;
            let old = acked.get(&p).copied().unwrap_or(0);
            if got == content(p, old) {
                continue;
            }
            match started.get(&p) {
                Some(&v) if got == content(p, v) => {
                    acked.insert(p, v);
                }
                s => panic!(
                    "round {round}: page {p} is neither acknowledged version {old} nor the \
                     write in flight {s:?}"
                ),
            }
        }
    }
}

#[test]
fn every_acknowledged_write_survives_sigkill_of_the_daemon() {
    let dir = TempDir::new("restart-kill");
    let sock = dir.0.join("sock");
    let log = dir.0.join("log");
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut version = 0u64;
    let rounds = 50;
    let mut mid_write = 0;
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    for round in 0..rounds {
        let daemon = KillOnDrop(Daemon::start(
            &args(&dir.0),
            &log,
            std::slice::from_ref(&sock),
        ));
        // Writes until the daemon dies under it: (page -> version) started, and acknowledged.
        let state = Arc::new(Mutex::new((
            HashMap::<u64, u64>::new(),
            Vec::<(u64, u64)>::new(),
        )));
        let writer = {
            let state = state.clone();
            let sock = sock.clone();
            let first = version;
            let connected = connected_tx.clone();
            std::thread::spawn(move || {
                let mut dev = connect(&sock);
                let mut q = dev.take_queue(0).unwrap();
                let _ = connected.send(());
                let mut v = first;
                loop {
                    v += 1;
                    let p = (v * 2_654_435_761) % PAGES;
                    state.lock().unwrap().0.insert(p, v);
                    match q
                        .execute(&Request::write(p * 8, &content(p, v)), TIMEOUT)
                        .and_then(|c| c.check())
                    {
                        Ok(_) => {
                            let mut s = state.lock().unwrap();
                            s.0.remove(&p);
                            s.1.push((p, v));
                        }
                        _ => return v,
                    }
                }
            })
        };
        // The kill lands while the writer is at work, however slow the machine.
        if connected_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!(
                "round {round}: the writer never connected; log:\n{}",
                daemon.0.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(30 + (round as u64 * 37) % 150));
        daemon.0.kill();
        version = writer.join().unwrap() + 1;
        let (started, done) = std::mem::take(&mut *state.lock().unwrap());
        acked.extend(done);
        mid_write += !started.is_empty() as usize;

        let daemon = KillOnDrop(Daemon::start(
            &args(&dir.0),
            &log,
            std::slice::from_ref(&sock),
        ));
        verify(&sock, &mut acked, &started, round);
        drop(daemon);
    }
    assert!(acked.len() > 300, "only {} pages written", acked.len());
    assert!(
        mid_write > rounds / 2,
        "only {mid_write} kills caught a write"
    );
}

#[test]
fn a_clean_stop_and_start_serves_the_same_disk() {
    let dir = TempDir::new("restart-clean");
    let sock = dir.0.join("sock");
    let log = dir.0.join("log");
    let mut acked = HashMap::new();
    let daemon = KillOnDrop(Daemon::start(
        &args(&dir.0),
        &log,
        std::slice::from_ref(&sock),
    ));
    {
        let mut dev = connect(&sock);
        let mut q = dev.take_queue(0).unwrap();
        for p in 0..PAGES {
            q.execute(&Request::write(p * 8, &content(p, p + 1)), TIMEOUT)
                .and_then(|c| c.check())
                .unwrap();
            acked.insert(p, p + 1);
        }
    }
    // SIGTERM: a clean shutdown marks the state clean.
    // SAFETY: kill(2) on our own child's PID; no memory is involved.
    unsafe { libc::kill(daemon.0.pid() as i32, libc::SIGTERM) };
    assert!(proc::poll_until(Duration::from_secs(10), || daemon
        .0
        .exited()
        .is_some()));
    let state = std::fs::read_to_string(dir.0.join("state/state.json")).unwrap();
    assert!(state.contains("\"clean\": true"), "{state}");
    let _daemon = KillOnDrop(Daemon::start(
        &args(&dir.0),
        &log,
        std::slice::from_ref(&sock),
    ));
    verify(&sock, &mut acked, &HashMap::new(), 0);
    // A second daemon on the same state is refused with one line, exit 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vzram"))
        .arg("serve")
        .args(args(&dir.0))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("in use by another vzram"), "{err}");
}

/// Memory goes back with a state directory too: freed pool pages are punched out of the pool's
/// file (MADV_DONTNEED would not free shared file pages), so the file's blocks and the daemon's
/// resident memory follow what is stored.
#[test]
fn discarded_pages_leave_the_state_files_and_the_daemon() {
    let dir = TempDir::new("restart-punch");
    let sock = dir.0.join("sock");
    let daemon = KillOnDrop(Daemon::start(
        &args(&dir.0),
        &dir.0.join("log"),
        std::slice::from_ref(&sock),
    ));
    let pool = dir.0.join("state/pool.pages");
    let blocks = || std::fs::metadata(&pool).unwrap().blocks() * 512;
    let (rss0, file0) = (daemon.0.rss_kib(), blocks());
    let mut dev = connect(&sock);
    let mut q = dev.take_queue(0).unwrap();
    // Pages that do not compress: the pool holds about as much as was written (4 MiB).
    for p in 0..PAGES {
        let noise: Vec<u8> = (0..4096u64)
            .map(|i| {
                (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p.wrapping_mul(0xBF58_476D))
                    .wrapping_mul(0x94D0_49BB_1331_11EB)
                    >> 56
            })
            .map(|b| b as u8)
            .collect();
        q.execute(&Request::write(p * 8, &noise), TIMEOUT)
            .and_then(|c| c.check())
            .unwrap();
    }
    let (rss1, file1) = (daemon.0.rss_kib(), blocks());
    assert!(
        file1 - file0 >= 4 << 20,
        "pool file grew by {} bytes",
        file1 - file0
    );
    assert!(rss1 - rss0 >= 4 << 10, "RSS grew by {} KiB", rss1 - rss0);
    q.execute(
        &Request::discard(&[Segment {
            sector: 0,
            num_sectors: (PAGES * 8) as u32,
            flags: 0,
        }]),
        TIMEOUT,
    )
    .and_then(|c| c.check())
    .unwrap();
    // A small cache of freed pages (256, 1 MiB) may stay, and the batch of fresh pages the
    // pool faults in ahead of use (at most 64, 256 KiB).
    let (rss2, file2) = (daemon.0.rss_kib(), blocks());
    assert!(
        file2 <= file0 + (3 << 20) / 2,
        "pool file: {file0} -> {file1} -> {file2} bytes"
    );
    assert!(
        rss2 + 2 * 1024 < rss1,
        "RSS: {rss0} -> {rss1} -> {rss2} KiB"
    );
}
