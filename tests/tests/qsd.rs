//! Guests on a qemu-storage-daemon vhost-user-blk disk (a raw file on /dev/shm): the reference
//! backend, until vzram serves the same tests.

use std::time::Duration;

use guest_tests::{Backend, BackendSpec, Guest, GuestSpec, MIB, RunDir, RunError, run};

/// Guest RAM; swaptest uses 3x the guest's MemTotal (about 274 MiB of 93 MiB).
const GUEST_MIB: u32 = 128;
/// Room for 3x MemTotal of swap and then some.
const DISK: u64 = 512 * MIB;

fn swap(rot: u32) -> Result<guest_tests::Run, RunError> {
    let spec = GuestSpec::new("swap")
        .mem_mib(GUEST_MIB)
        .param("rot", rot)
        .timeout(Duration::from_secs(240));
    let run = run(&format!("swap-rot{rot}"), BackendSpec::qsd(DISK), &spec)?;
    println!("{}", run.outcome.summary());
    run.outcome.assert_pass();
    let out = &run.outcome;
    // The workload is 3x RAM: most of it must have been on the disk.
    let used = out.assert_swapped(u64::from(rot));
    println!(
        "swap used {} MiB; write {} ms, verify {} ms; disk file holds {} MiB after swapoff",
        used / MIB,
        out.u64("swaptest.write_ms"),
        out.u64("swaptest.verify_ms"),
        run.backend.disk_file_allocated().unwrap() / MIB
    );
    Ok(run)
}

/// Swap with rotational=0 and discard: every page comes back, and the freed swap is discarded,
/// so the host gets the memory back (a file on tmpfs loses the discarded blocks).
#[test]
fn swap_on_a_vhost_user_disk_with_discard_returns_memory() -> Result<(), RunError> {
    let run = swap(0)?;
    let used = run.outcome.u64("swaptest.swap_used_kib") * 1024;
    let held = run.backend.disk_file_allocated().unwrap();
    assert!(
        held * 4 < used,
        "after swapoff the disk still holds {held} bytes of {used} swapped: discard did not reach \
         the backend"
    );
    Ok(())
}

/// The same with the rotational flag left at 1 (what virtio-blk gets by default): the data
/// is fine, but swap never discards freed clusters and the host keeps the memory. This is
/// why a guest must clear the flag for vzram (README, "Guest side").
#[test]
fn swap_without_clearing_rotational_keeps_host_memory() -> Result<(), RunError> {
    let run = swap(1)?;
    let used = run.outcome.u64("swaptest.swap_used_kib") * 1024;
    let held = run.backend.disk_file_allocated().unwrap();
    assert!(
        held * 2 > used,
        "rotational=1 but the disk holds only {held} of {used} bytes swapped: did the guest \
         discard after all?"
    );
    Ok(())
}

/// O_DIRECT writes of 512 B .. 1 MiB on and off 4 KiB boundaries, discard and write-zeroes.
#[test]
fn raw_block_io_discard_and_write_zeroes() -> Result<(), RunError> {
    let spec = GuestSpec::new("blk")
        .mem_mib(GUEST_MIB)
        .param("ops", 2000)
        .timeout(Duration::from_secs(180));
    let run = run("blk", BackendSpec::qsd(128 * MIB), &spec)?;
    println!("{}", run.outcome.summary());
    run.outcome.assert_pass();
    let out = &run.outcome;
    assert_eq!(out.u64("blktest.bad"), 0);
    assert_eq!(out.u64("blktest.size"), 128 * MIB);
    let (writes, aligned) = (out.u64("blktest.writes"), out.u64("blktest.aligned_writes"));
    assert!(
        aligned > 0 && aligned < writes,
        "{aligned} of {writes} writes aligned"
    );
    assert!(out.u64("blktest.discards") > 0 && out.u64("blktest.zeroouts") > 0);
    Ok(())
}

/// Without a guest: the backend process, its socket and its disk file are gone after drop.
#[test]
fn a_backend_is_cleaned_up_when_dropped() -> Result<(), RunError> {
    let dir = RunDir::new("cleanup")?;
    let disk = Backend::start(&dir, BackendSpec::qsd(16 * MIB))?;
    let pid = disk.pid().expect("qsd runs a process");
    let socket = disk.socket().unwrap().to_path_buf();
    assert!(socket.exists());
    assert_eq!(
        disk.disk_file_allocated(),
        Some(0),
        "a fresh disk holds nothing"
    );
    drop(disk);
    // SAFETY: signal 0 sends nothing; it only asks whether the PID exists.
    assert_ne!(unsafe { libc::kill(pid as libc::pid_t, 0) }, 0, "pid {pid}");
    assert!(!socket.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the log is left"
    );
    Ok(())
}

/// A new QEMU on the same backend socket sees what the previous guest wrote (the backend keeps
/// the disk across vhost-user connections). A fresh disk fails the same check, so the check
/// does look at the data.
#[test]
fn a_new_guest_on_the_same_socket_sees_the_data() -> Result<(), RunError> {
    let blk = |mode: &str| {
        GuestSpec::new("blk")
            .mem_mib(GUEST_MIB)
            .param("blk_mode", mode)
            .param("seed", 7)
            .timeout(Duration::from_secs(120))
    };
    let dir = RunDir::new("reconnect")?;
    let disk = Backend::start(&dir, BackendSpec::qsd(64 * MIB))?;
    let wrote = Guest::start(&dir, &blk("write"), &disk)?.wait()?;
    println!("{}", wrote.summary());
    wrote.assert_pass();
    assert!(wrote.u64("blktest.writes") > 0);
    let read = Guest::start(&dir, &blk("verify"), &disk)?.wait()?;
    println!("{}", read.summary());
    read.assert_pass();
    assert_eq!(read.u64("blktest.writes"), 0, "verify must not write");
    assert!(read.u64("blktest.reads") > 0);

    let fresh = Backend::start(&RunDir::new("reconnect-fresh")?, BackendSpec::qsd(64 * MIB))?;
    let blank = Guest::start(&dir, &blk("verify"), &fresh)?.wait()?;
    println!("{}", blank.summary());
    assert!(!blank.passed(), "verify passed on a disk nobody wrote");
    assert!(blank.u64("blktest.bad") > 0);
    Ok(())
}
