//! The Vzram backend variant's plumbing, independent of the daemon: what it runs, with which
//! arguments, and that a guest gets its disk through it. A stand-in script with vzram's
//! command line serves the disk with qemu-storage-daemon. (The real daemon: vzram.rs.)

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use guest_tests::{
    Backend, BackendSpec, Guest, GuestSpec, MIB, RunDir, RunError, RunErrorKind, vzram_bin,
};

/// `vzram serve --socket SOCK --size SIZE --num-queues N [args]`, as the Vzram variant calls it; records its
/// arguments next to the socket and execs qemu-storage-daemon (same PID, so the runner's
/// SIGTERM reaches it).
const STAND_IN: &str = r#"#!/bin/sh
[ "$1" = serve ] && [ "$2" = --socket ] && [ "$4" = --size ] || { echo "bad args: $*"; exit 2; }
dir=$(dirname "$3")
echo "$*" >"$dir/args"
truncate -s "$5" "$dir/stand-in.raw"
exec qemu-storage-daemon \
    --blockdev "driver=file,filename=$dir/stand-in.raw,node-name=disk,discard=unmap" \
    --export "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=$3,writable=on,num-queues=2"
"#;

#[test]
fn the_vzram_variant_runs_its_binary_and_serves_a_guest() -> Result<(), RunError> {
    let dir = RunDir::new("vzram-variant")?;
    let script = dir.join("vzram");
    std::fs::write(&script, STAND_IN)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;

    let spec = BackendSpec::vzram(64 * MIB, &["--comp", "lz4"]).with_bin(&script);
    let disk = Backend::start(&dir, spec)?;
    let args = std::fs::read_to_string(dir.join("args"))?;
    assert_eq!(
        args.trim(),
        format!(
            "serve --socket {} --size 64M --num-queues 2 --comp lz4",
            dir.join("disk.sock").display()
        )
    );
    let out = Guest::start(
        &dir,
        &GuestSpec::new("blk")
            .param("blk_mode", "write")
            .timeout(Duration::from_secs(120)),
        &disk,
    )?
    .wait()?;
    println!("{}", out.summary());
    out.assert_pass();
    assert_eq!(out.u64("blktest.size"), 64 * MIB);
    Ok(())
}

#[test]
fn a_missing_vzram_binary_is_a_setup_error_that_says_what_to_do() {
    let dir = RunDir::new("vzram-missing").unwrap();
    let spec = BackendSpec::vzram(64 * MIB, &[]).with_bin(dir.join("no-such-vzram"));
    let err = Backend::start(&dir, spec).unwrap_err();
    assert_eq!(err.kind, RunErrorKind::Setup);
    assert!(err.message.contains("cargo build -p vzram"), "{err}");
    // Without VZRAM_BIN the default is next to the test binaries: <target>/<profile>/vzram.
    if std::env::var_os("VZRAM_BIN").is_none() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            vzram_bin(),
            exe.parent().unwrap().parent().unwrap().join("vzram")
        );
    }
}

/// A backend that panics while the guest waits (the log says so, the process lives on, the
/// guest's request never completes) ends the run at once as `BackendPanicked`, not at the
/// time limit.
#[test]
fn a_backend_panic_ends_the_run_at_once() -> Result<(), RunError> {
    let dir = RunDir::new("vzram-variant-panic")?;
    let script = dir.join("vzram");
    // The stand-in, with a "panic" on its output 3 s after the start.
    let panicking = STAND_IN.replace(
        "exec qemu-storage-daemon",
        "(sleep 3; printf \"thread 'vring_worker' (1) panicked at vhost/src/blk.rs:1:1:\\nboom\\n\") &\n\
         exec qemu-storage-daemon",
    );
    std::fs::write(&script, panicking)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let disk = Backend::start(&dir, BackendSpec::vzram(64 * MIB, &[]).with_bin(&script))?;
    let t = std::time::Instant::now();
    let err = Guest::start(
        &dir,
        &GuestSpec::new("boot")
            .param("hold", 60)
            .timeout(Duration::from_secs(60)),
        &disk,
    )?
    .wait()
    .unwrap_err();
    assert_eq!(err.kind, RunErrorKind::BackendPanicked, "{err}");
    assert!(err.message.contains("blk.rs:1:1: boom"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    Ok(())
}
