//! Runs real Linux guests under QEMU for vzram's integration tests.
//!
//! A run is three things, each cleaned up when dropped, whatever happens (a failed assertion,
//! a timeout, a panic): a [`RunDir`] on /dev/shm for sockets, disk files and logs (kept until
//! the last backend or guest using it is gone); a
//! [`Backend`] that serves the guest's disk over vhost-user-blk (qemu-storage-daemon, vzram, or
//! none); and a [`Guest`]: `qemu-system-x86_64` booting the image of `ci/guest-image` with
//! shared memfd memory, a `vhost-user-blk-pci` disk and `vzram.test=<name>` on the kernel
//! command line. The guest's /init (tests/guest/init) runs the test and prints one
//! `VZRAM-RESULT: PASS|FAIL` line and `VZRAM-INFO key=value` facts on the serial console,
//! which [`Guest::wait`] turns into an [`Outcome`].
//!
//! ```no_run
//! use guest_tests::{Backend, BackendSpec, Guest, GuestSpec, RunDir};
//!
//! let dir = RunDir::new("swap")?;
//! let disk = Backend::start(&dir, BackendSpec::qsd(512 << 20))?;
//! let out = Guest::start(&dir, &GuestSpec::new("swap").param("rot", 0), &disk)?.wait()?;
//! out.assert_pass();
//! assert_eq!(out.u64("swaptest.bad"), 0);
//! println!("{}", out.summary());
//! # Ok::<(), guest_tests::RunError>(())
//! ```
//!
//! [`run`] does the same in one call. Processes are stopped by PID (SIGTERM, then SIGKILL) and
//! also die with the test process (`PR_SET_PDEATHSIG`). One guest runs at a time per process,
//! unless a [`Together`] starts several on purpose (one vzram daemon serving several devices,
//! [`BackendSpec::vzram_devices`], a guest per device: [`Together::start_on`],
//! [`wait_together`]).
//!
//! Environment: `VZRAM_GUEST_ACCEL=kvm|tcg` (default: KVM only when kvm_intel or kvm_amd is
//! loaded), `VZRAM_GUEST_ECHO=1` (print the serial console live), `VZRAM_GUEST_KEEP=1` (keep
//! run folders), `VZRAM_GUEST_DIR` (image folder), `VZRAM_GUEST_NO_BUILD=1` (use the image as it
//! is), `VZRAM_BIN` (the vzram binary).

mod backend;
mod guest;
mod image;
mod proc;
mod vzram;

pub use backend::{
    Backend, BackendKind, BackendSpec, DEFAULT_DEVICE, VzramDevice, size_arg, vzram_bin,
};
pub use guest::{
    Accel, Guest, GuestEvent, GuestResult, GuestSpec, INFO_MARK, Outcome, RESULT_MARK, RunError,
    RunErrorKind, Together, parse_info, parse_result, wait_together,
};
pub use image::{Image, image_dir, workspace_root};
pub use proc::{Proc, RunDir};
pub use vzram::{Stat, fresh_vzram, request, stat, stat_table};

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A disk size for the examples' `--disk`: `512M`, `1G` (whole MiB: /init gives zram's
/// disksize in MiB).
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let (n, mult) = match s.as_bytes().last() {
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1024),
        _ => return Err(format!("--disk {s}: give M or G")),
    };
    n.parse::<u64>()
        .map(|n| n * mult * MIB)
        .map_err(|e| format!("--disk {s}: {e}"))
}

/// A finished run whose backend is still up, for checks after the guest is gone.
#[derive(Debug)]
pub struct Run {
    /// What the guest said.
    pub outcome: Outcome,
    /// The backend, still running.
    pub backend: Backend,
    /// The run folder.
    pub dir: RunDir,
}

/// Starts `backend`, boots a guest with `guest` on it and waits for the outcome.
pub fn run(name: &str, backend: BackendSpec, guest: &GuestSpec) -> Result<Run, RunError> {
    let dir = RunDir::new(name).map_err(|e| RunError::setup(e.to_string()))?;
    let backend = Backend::start(&dir, backend)?;
    let outcome = Guest::start(&dir, guest, &backend)?.wait()?;
    Ok(Run {
        outcome,
        backend,
        dir,
    })
}

impl From<std::io::Error> for RunError {
    fn from(e: std::io::Error) -> RunError {
        RunError::setup(e.to_string())
    }
}
