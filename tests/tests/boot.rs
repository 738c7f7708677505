//! The harness itself: a guest boots and passes a trivial test, a failing guest test is
//! reported as FAIL, and a guest that runs past its time limit is stopped and reported.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Duration;

use guest_tests::{
    Backend, BackendSpec, Guest, GuestResult, GuestSpec, RunDir, RunError, RunErrorKind, run,
};

fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 sends nothing; it only asks whether the PID exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Kernel, initramfs, modules and /init work: the guest sees the CPUs the host gave it.
#[test]
fn guest_boots_and_passes_a_trivial_test() -> Result<(), RunError> {
    let spec = GuestSpec::new("boot").timeout(Duration::from_secs(120));
    let run = run("boot", BackendSpec::none(), &spec)?;
    let out = &run.outcome;
    println!("{}", out.summary());
    out.assert_pass();
    assert_eq!(out.u64("cpus"), 2, "guest CPUs");
    // 128 MiB of RAM minus what the kernel reserves.
    let mem = out.u64("mem_total_kib");
    assert!((64 * 1024..128 * 1024).contains(&mem), "MemTotal {mem} KiB");
    assert!(out.info["kernel"].ends_with("-cloud-amd64"));
    Ok(())
}

/// A test /init does not know is a FAIL with a reason, not a hang or a pass.
#[test]
fn a_failing_guest_test_is_reported_with_its_reason() -> Result<(), RunError> {
    let spec = GuestSpec::new("no_such_test").timeout(Duration::from_secs(120));
    let run = run("fail", BackendSpec::none(), &spec)?;
    println!("{}", run.outcome.summary());
    assert_eq!(
        run.outcome.result,
        GuestResult::Fail("unknown test".to_string())
    );
    Ok(())
}

/// A guest that does not finish in time is an error, and QEMU is gone afterwards.
#[test]
fn a_guest_past_its_time_limit_is_stopped() -> Result<(), RunError> {
    let dir = RunDir::new("timeout")?;
    let none = Backend::start(&dir, BackendSpec::none())?;
    // vzram.hold makes /init wait before the test: the run cannot finish inside the limit,
    // under TCG or KVM.
    let spec = GuestSpec::new("boot")
        .param("hold", 600)
        .timeout(Duration::from_secs(5));
    let guest = Guest::start(&dir, &spec, &none)?;
    let pid = guest.pid();
    assert!(pid_exists(pid));
    let err = guest.wait().expect_err("the guest holds for 600 s");
    println!("{}", err.message);
    // Timeout once /init has printed; NoInit if a loaded host took more than 5 s to boot.
    let init_ran = err.serial.iter().any(|l| l.contains("VZRAM-INFO init_ms="));
    let want = if init_ran {
        RunErrorKind::Timeout
    } else {
        RunErrorKind::NoInit
    };
    assert_eq!(err.kind, want, "{err}");
    assert!(!pid_exists(pid), "QEMU (pid {pid}) survived the timeout");
    Ok(())
}

/// A test that panics while its guest runs (a failed assertion in `wait_with`) leaves no QEMU,
/// no backend and no run folder behind.
#[test]
fn a_panic_mid_run_cleans_up_everything() {
    let mut seen: Option<(u32, u32, PathBuf)> = None;
    let r = catch_unwind(AssertUnwindSafe(|| {
        let dir = RunDir::new("panic").unwrap();
        let disk = Backend::start(&dir, BackendSpec::qsd(16 << 20)).unwrap();
        let guest = Guest::start(&dir, &GuestSpec::new("boot"), &disk).unwrap();
        seen = Some((guest.pid(), disk.pid().unwrap(), dir.path().to_path_buf()));
        let _ = guest.wait_with(|line, _| {
            if line.contains("VZRAM-INFO init_ms=") {
                panic!("a test assertion fails while the guest runs");
            }
        });
    }));
    assert!(r.is_err(), "the closure should have panicked");
    let (qemu, qsd, dir) = seen.unwrap();
    assert!(!pid_exists(qemu), "QEMU (pid {qemu}) survived the panic");
    assert!(
        !pid_exists(qsd),
        "qemu-storage-daemon (pid {qsd}) survived the panic"
    );
    assert!(!dir.exists(), "{} survived the panic", dir.display());
}
