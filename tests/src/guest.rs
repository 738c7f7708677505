//! One QEMU guest run: start, read the serial console, collect the result, clean up.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::image::Image;
use crate::proc::{Proc, RunDir};

/// The line /init prints once, at the end: `VZRAM-RESULT: PASS <test>` or `... FAIL <test> <why>`.
pub const RESULT_MARK: &str = "VZRAM-RESULT: ";
/// Lines of `key=value` facts from the guest: `VZRAM-INFO k=v k=v`.
pub const INFO_MARK: &str = "VZRAM-INFO ";

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation with `-cpu host`.
    Kvm,
    /// QEMU's emulator, one host thread per vCPU (`-accel tcg,thread=multi -cpu max`).
    Tcg,
}

impl Accel {
    /// KVM only when it really works: a /dev/kvm that opens is not enough, because some hosts
    /// back it with kvm-pvm (software nested virtualisation), under which a stock kernel hangs
    /// at boot and `-cpu host` aborts. Real KVM has kvm_intel or kvm_amd loaded. Override with
    /// `VZRAM_GUEST_ACCEL=kvm|tcg`.
    pub fn detect() -> Accel {
        match std::env::var("VZRAM_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        let vendor_module = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|p| Path::new(p).exists());
        let opens = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if vendor_module && opens {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// What to boot: the test name for /init, the machine size, parameters and a time limit.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// `vzram.test=`: boot, swap, zram, blk (see tests/guest/init).
    pub test: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// More `vzram.<key>=<value>` parameters for /init (keys `[a-z0-9_]`, values without
    /// spaces).
    pub params: Vec<(String, String)>,
    /// Limit for the whole run, from QEMU's start to its exit.
    pub timeout: Duration,
}

impl GuestSpec {
    /// 128 MiB, 2 vCPUs, 300 s.
    pub fn new(test: &str) -> GuestSpec {
        GuestSpec {
            test: test.to_string(),
            mem_mib: 128,
            cpus: 2,
            params: Vec::new(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Adds `vzram.<key>=<value>`.
    pub fn param(mut self, key: &str, value: impl ToString) -> GuestSpec {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets guest RAM.
    pub fn mem_mib(mut self, mib: u32) -> GuestSpec {
        self.mem_mib = mib;
        self
    }

    /// Sets the number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> GuestSpec {
        self.cpus = cpus;
        self
    }

    /// Sets the time limit.
    pub fn timeout(mut self, timeout: Duration) -> GuestSpec {
        self.timeout = timeout;
        self
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> Result<String, String> {
        let mut s = format!(
            "console=ttyS0 quiet panic=-1 vzram.test={} vzram.cpus={}",
            self.test, self.cpus
        );
        let ok_key = |k: &str| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for (k, v) in &self.params {
            if !ok_key(k) || v.is_empty() || v.contains(char::is_whitespace) {
                return Err(format!("bad guest parameter vzram.{k}={v:?}"));
            }
            s.push_str(&format!(" vzram.{k}={v}"));
        }
        if !ok_key(&self.test) {
            return Err(format!("bad test name {:?}", self.test));
        }
        Ok(s)
    }
}

/// What /init said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestResult {
    /// `VZRAM-RESULT: PASS <test>`.
    Pass,
    /// `VZRAM-RESULT: FAIL <test> <reason>`.
    Fail(String),
}

/// A finished run: the result line, the facts, the log and the timings.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The test that ran.
    pub test: String,
    /// PASS or FAIL with the reason.
    pub result: GuestResult,
    /// Every `key=value` of the `VZRAM-INFO` lines (a later line overrides an earlier one).
    pub info: BTreeMap<String, String>,
    /// The serial console, line by line.
    pub serial: Vec<String>,
    /// From QEMU's start to /init's first line.
    pub boot: Option<Duration>,
    /// From QEMU's start to its exit.
    pub wall: Duration,
    /// How the guest ran.
    pub accel: Accel,
    /// QEMU's exit status.
    pub exit: Option<ExitStatus>,
}

impl Outcome {
    /// True on PASS.
    pub fn passed(&self) -> bool {
        self.result == GuestResult::Pass
    }

    /// Panics with the serial log unless the guest said PASS.
    #[track_caller]
    pub fn assert_pass(&self) {
        if let GuestResult::Fail(why) = &self.result {
            panic!(
                "guest test {} failed: {why}\n--- serial ---\n{}",
                self.test,
                self.serial.join("\n")
            );
        }
    }

    /// An INFO value as a number; panics (with the log) when it is missing or not a number.
    #[track_caller]
    pub fn u64(&self, key: &str) -> u64 {
        match self.info.get(key).map(|v| v.parse::<u64>()) {
            Some(Ok(v)) => v,
            _ => panic!(
                "guest test {}: no numeric VZRAM-INFO {key} (have {:?})\n--- serial ---\n{}",
                self.test,
                self.info,
                self.serial.join("\n")
            ),
        }
    }

    /// The checks every swap run shares: 0 bad pages, the disk's rotational flag as asked,
    /// discard offered, and most of the workload really on swap (else the run tested
    /// nothing). Returns the bytes the guest had on swap.
    #[track_caller]
    pub fn assert_swapped(&self, rot: u64) -> u64 {
        assert_eq!(self.u64("swaptest.bad"), 0);
        assert_eq!(self.u64("swap.rotational"), rot);
        assert!(
            self.u64("swap.discard_max_bytes") > 0,
            "disk without discard"
        );
        let used = self.u64("swaptest.swap_used_kib") * 1024;
        let workload = self.u64("swaptest.mib") * crate::MIB;
        assert!(
            used * 2 > workload,
            "only {used} bytes of a {workload}-byte workload were swapped out"
        );
        used
    }

    /// The last `n` serial lines, joined with ` | `: what a failure message shows.
    pub fn last_lines(&self, n: usize) -> String {
        let from = self.serial.len().saturating_sub(n);
        self.serial[from..].join(" | ")
    }

    /// One line for the test log: result and times.
    pub fn summary(&self) -> String {
        let result = match &self.result {
            GuestResult::Pass => "PASS".to_string(),
            GuestResult::Fail(why) => format!("FAIL ({why})"),
        };
        format!(
            "guest {}: {result} in {:.1} s ({:?}; boot to /init {:.1} s)",
            self.test,
            self.wall.as_secs_f64(),
            self.accel,
            self.boot.map_or(f64::NAN, |b| b.as_secs_f64())
        )
    }
}

/// Adds the `key=value` pairs of a serial line that carries [`INFO_MARK`] (anywhere: kernel
/// messages may share the line) to `info`.
pub fn parse_info(line: &str, info: &mut BTreeMap<String, String>) {
    if let Some(at) = line.find(INFO_MARK) {
        for kv in line[at + INFO_MARK.len()..].split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                info.insert(k.to_string(), v.to_string());
            }
        }
    }
}

/// Parses a result line: `(test, result)`.
pub fn parse_result(line: &str) -> Option<(String, GuestResult)> {
    let rest = &line[line.find(RESULT_MARK)? + RESULT_MARK.len()..];
    let mut words = rest.splitn(3, ' ');
    let verdict = words.next()?;
    let test = words.next()?.trim().to_string();
    match verdict {
        "PASS" => Some((test, GuestResult::Pass)),
        "FAIL" => Some((
            test,
            GuestResult::Fail(words.next().unwrap_or("").trim().to_string()),
        )),
        _ => None,
    }
}

/// Why a run did not produce a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunErrorKind {
    /// Something the run needs is missing or would not start (image, QEMU, backend).
    Setup,
    /// /init never printed: the kernel did not boot, or QEMU waits on something (unshared
    /// guest memory makes QEMU and the guest print nothing and hang).
    NoInit,
    /// /init started but the test did not finish in time.
    Timeout,
    /// QEMU exited without a result line.
    NoResult,
    /// The guest printed more than one result, or one for another test.
    BadResult,
    /// The guest printed its result but QEMU did not exit (poweroff failed).
    NoPoweroff,
    /// The backend panicked (its log says `panicked at`) while the guest waited: a request it
    /// was serving will never complete, so the run stops at once instead of at its time limit.
    BackendPanicked,
}

/// A run that failed before the guest could say PASS or FAIL, with everything there is to
/// read about it.
#[derive(Clone)]
pub struct RunError {
    /// What went wrong, broadly.
    pub kind: RunErrorKind,
    /// What went wrong, in words.
    pub message: String,
    /// The serial console so far.
    pub serial: Vec<String>,
    /// QEMU's stderr.
    pub qemu_log: String,
    /// The backend's output.
    pub backend_log: String,
}

impl RunError {
    pub(crate) fn setup(message: String) -> RunError {
        RunError {
            kind: RunErrorKind::Setup,
            message,
            serial: Vec::new(),
            qemu_log: String::new(),
            backend_log: String::new(),
        }
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?}: {}", self.kind, self.message)?;
        let tail = self.serial.len().saturating_sub(100);
        if !self.serial.is_empty() {
            writeln!(f, "--- serial (from line {tail}) ---")?;
            for l in &self.serial[tail..] {
                writeln!(f, "{l}")?;
            }
        }
        for (what, log) in [("qemu", &self.qemu_log), ("backend", &self.backend_log)] {
            if !log.trim().is_empty() {
                writeln!(f, "--- {what} output ---\n{}", log.trim_end())?;
            }
        }
        Ok(())
    }
}

// Debug is what `fn test() -> Result<(), RunError>` prints on failure: make it readable.
impl fmt::Debug for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for RunError {}

/// One guest at a time per test process: TCG guests on a 2-core machine would only slow each
/// other down past their timeouts, and timings would mean nothing. The slot is held by a
/// [`Guest`] (or a [`Together`] and the guests it starts) until it is dropped; a scenario that
/// needs several guests at once takes it for all of them with [`Together`].
static SLOT_BUSY: Mutex<bool> = Mutex::new(false);
static SLOT_FREED: Condvar = Condvar::new();

/// The process's guest slot, held; freed when the last clone is dropped.
#[derive(Debug)]
struct Slot;

impl Slot {
    /// Waits until no guest (and no [`Together`]) of this process holds the slot.
    fn take() -> Arc<Slot> {
        let mut busy = SLOT_BUSY.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = SLOT_FREED.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
        Arc::new(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOT_BUSY.lock().unwrap_or_else(|e| e.into_inner()) = false;
        SLOT_FREED.notify_one();
    }
}

/// Several guests running at the same time, on purpose: the one exception to one guest at a
/// time per process. It takes the process's guest slot (waiting for running guests to end)
/// and shares it with every guest it starts; the slot is free again once it and they are all
/// dropped. Wait for them together with [`wait_together`].
///
/// ```no_run
/// use guest_tests::{Backend, BackendSpec, GuestSpec, RunDir, Together, VzramDevice, MIB};
///
/// let dir = RunDir::new("two")?;
/// let devices = [VzramDevice::new("a", 512 * MIB), VzramDevice::new("b", 512 * MIB)];
/// let vzram = Backend::start(&dir, BackendSpec::vzram_devices(&devices, &["--comp", "lz4"]))?;
/// let both = Together::new();
/// let a = both.start_on(&dir, &GuestSpec::new("swap").cpus(1), &vzram, "a")?;
/// let b = both.start_on(&dir, &GuestSpec::new("swap").cpus(1), &vzram, "b")?;
/// let outcomes = guest_tests::wait_together(vec![a, b], std::time::Duration::from_secs(5), |_| {});
/// # Ok::<(), guest_tests::RunError>(())
/// ```
#[derive(Debug)]
pub struct Together {
    slot: Arc<Slot>,
}

impl Together {
    /// Takes the guest slot for a group of guests (waits while another guest runs).
    #[allow(clippy::new_without_default)] // taking the slot may block: not a default value
    pub fn new() -> Together {
        Together { slot: Slot::take() }
    }

    /// Boots a guest of the group on `backend`'s first (or only) device.
    pub fn start(
        &self,
        dir: &RunDir,
        spec: &GuestSpec,
        backend: &Backend,
    ) -> Result<Guest, RunError> {
        Guest::launch(dir, spec, backend, None, self.slot.clone())
    }

    /// Boots a guest of the group on `backend`'s device `device`.
    pub fn start_on(
        &self,
        dir: &RunDir,
        spec: &GuestSpec,
        backend: &Backend,
        device: &str,
    ) -> Result<Guest, RunError> {
        Guest::launch(dir, spec, backend, Some(device), self.slot.clone())
    }
}

/// A running QEMU; killed (by PID) when dropped.
#[derive(Debug)]
pub struct Guest {
    spec: GuestSpec,
    accel: Accel,
    qemu: Proc,
    lines: Receiver<(Instant, String)>,
    started: Instant,
    qemu_log: PathBuf,
    backend_log: Option<PathBuf>,
    command: String,
    _slot: Arc<Slot>,
    // Declared after qemu: fields drop in order, so the folder outlives QEMU.
    _dir: RunDir,
}

impl Guest {
    /// Boots the image with `spec`; the disk comes from `backend` (its first device; none for
    /// [`crate::BackendKind::None`]). Files go to `dir`. Waits while another guest of this
    /// process runs.
    pub fn start(dir: &RunDir, spec: &GuestSpec, backend: &Backend) -> Result<Guest, RunError> {
        Guest::launch(dir, spec, backend, None, Slot::take())
    }

    /// Like [`Guest::start`], on `backend`'s device named `device` (a
    /// [`crate::BackendSpec::vzram_devices`] name, or [`crate::DEFAULT_DEVICE`]). Its QEMU log
    /// is `qemu-<device>.log`.
    pub fn start_on(
        dir: &RunDir,
        spec: &GuestSpec,
        backend: &Backend,
        device: &str,
    ) -> Result<Guest, RunError> {
        Guest::launch(dir, spec, backend, Some(device), Slot::take())
    }

    fn launch(
        dir: &RunDir,
        spec: &GuestSpec,
        backend: &Backend,
        device: Option<&str>,
        slot: Arc<Slot>,
    ) -> Result<Guest, RunError> {
        let socket = match device {
            None => backend.socket(),
            Some(d) => Some(backend.socket_of(d).ok_or_else(|| {
                RunError::setup(format!(
                    "the backend has no device {d:?} (it has {:?})",
                    backend.device_names()
                ))
            })?),
        };
        let cmdline = spec.cmdline().map_err(RunError::setup)?;
        let image = Image::get().map_err(RunError::setup)?;
        let accel = Accel::detect();
        let mem = format!("{}M", spec.mem_mib);

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"]);
        // The guest powers off at the end; a panic (init died) reboots, which -no-reboot turns
        // into an exit too.
        cmd.args(["-no-reboot", "-machine", "pc"]);
        cmd.args(accel.qemu_args());
        cmd.args(["-smp", &spec.cpus.to_string(), "-m", &mem]);
        // vhost-user backends map guest memory, so it must be a shared memfd.
        cmd.arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"));
        cmd.args(["-numa", "node,memdev=mem"]);
        if let Some(sock) = socket {
            // reconnect=1: QEMU survives a backend restart and reconnects every second.
            cmd.arg("-chardev").arg(format!(
                "socket,id=disk0,path={},reconnect=1",
                sock.display()
            ));
            cmd.arg("-device").arg(format!(
                "vhost-user-blk-pci,chardev=disk0,num-queues={}",
                backend.spec().queues
            ));
        }
        cmd.arg("-kernel").arg(&image.kernel);
        cmd.arg("-initrd").arg(&image.initrd);
        cmd.arg("-append").arg(&cmdline);
        cmd.args(["-serial", "stdio", "-monitor", "none"]);

        let command = crate::proc::command_line(&cmd);
        let qemu_log = dir.join(&match device {
            None => "qemu.log".to_string(),
            Some(d) => format!("qemu-{d}.log"),
        });
        let log = File::create(&qemu_log).map_err(|e| RunError::setup(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let started = Instant::now();
        let mut qemu = Proc::spawn(cmd, "qemu-system-x86_64", Duration::ZERO)
            .map_err(|e| RunError::setup(e.to_string()))?;
        let stdout = qemu.child_mut().stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        let echo = std::env::var_os("VZRAM_GUEST_ECHO").is_some();
        let name = match device {
            None => spec.test.clone(),
            Some(d) => format!("{} {d}", spec.test),
        };
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if echo {
                    eprintln!("[{name} {:6.1}] {line}", started.elapsed().as_secs_f64());
                }
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Guest {
            spec: spec.clone(),
            accel,
            qemu,
            lines,
            started,
            qemu_log,
            backend_log: backend.log_path().map(Path::to_path_buf),
            command,
            _slot: slot,
            _dir: dir.clone(),
        })
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// QEMU's command line.
    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// Waits for the result and QEMU's exit.
    pub fn wait(self) -> Result<Outcome, RunError> {
        self.wait_with(|_, _| {})
    }

    /// Like [`Guest::wait`], calling `on_line(line, info so far)` for every serial line as it
    /// arrives: a test can look at the backend when the guest reaches a phase (for example
    /// `VZRAM-INFO phase=written`, printed by swaptest with `vzram.pause=S`, which then waits
    /// S seconds).
    pub fn wait_with(
        mut self,
        mut on_line: impl FnMut(&str, &BTreeMap<String, String>),
    ) -> Result<Outcome, RunError> {
        let deadline = self.started + self.spec.timeout;
        let mut serial = Vec::new();
        let mut info = BTreeMap::new();
        let mut boot = None;
        let mut result: Option<GuestResult> = None;
        loop {
            let now = Instant::now();
            let until = if result.is_some() {
                // After the result only the power-off is left.
                deadline.min(now + Duration::from_secs(30))
            } else {
                deadline
            };
            // Wake up every second to look at the backend.
            let slice = until
                .saturating_duration_since(now)
                .min(Duration::from_secs(1));
            match self.lines.recv_timeout(slice) {
                Ok((at, line)) => {
                    parse_info(&line, &mut info);
                    if boot.is_none() && line.contains("VZRAM-INFO init_ms=") {
                        boot = Some(at - self.started);
                    }
                    if let Some((test, r)) = parse_result(&line) {
                        let problem = if result.is_some() {
                            Some("a second result line")
                        } else if test != self.spec.test {
                            Some("a result for another test")
                        } else {
                            None
                        };
                        if let Some(p) = problem {
                            serial.push(line);
                            return Err(self.error(RunErrorKind::BadResult, p.into(), serial));
                        }
                        result = Some(r);
                    }
                    on_line(&line, &info);
                    serial.push(line);
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < until => {
                    if let Some(panic) = self.backend_panic() {
                        let msg = format!("the backend panicked: {panic}");
                        return Err(self.error(RunErrorKind::BackendPanicked, msg, serial));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let (kind, msg) = match (&result, boot) {
                        (Some(_), _) => (
                            RunErrorKind::NoPoweroff,
                            "the guest printed its result but QEMU did not exit".to_string(),
                        ),
                        (None, None) => (
                            RunErrorKind::NoInit,
                            format!(
                                "no output from /init in {:?}: the kernel did not boot or \
                                 QEMU is stuck (unshared guest memory, backend not answering)",
                                self.spec.timeout
                            ),
                        ),
                        (None, Some(_)) => (
                            RunErrorKind::Timeout,
                            format!(
                                "test {} did not finish in {:?}",
                                self.spec.test, self.spec.timeout
                            ),
                        ),
                    };
                    return Err(self.error(kind, msg, serial));
                }
                // QEMU closed its stdout: it has exited or is exiting.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let exit = self.qemu.wait_timeout(Duration::from_secs(10));
        let wall = self.started.elapsed();
        let Some(result) = result else {
            let msg = format!(
                "QEMU exited ({}) without a result line",
                exit.map_or("still running".to_string(), |s| s.to_string())
            );
            return Err(self.error(RunErrorKind::NoResult, msg, serial));
        };
        if exit.is_none() {
            let msg = "QEMU closed the console but did not exit".to_string();
            return Err(self.error(RunErrorKind::NoPoweroff, msg, serial));
        }
        Ok(Outcome {
            test: self.spec.test.clone(),
            result,
            info,
            serial,
            boot,
            wall,
            accel: self.accel,
            exit,
        })
    }

    /// The first `panicked at` line of the backend's log and the message after it, if any.
    fn backend_panic(&self) -> Option<String> {
        let log = fs::read_to_string(self.backend_log.as_ref()?).ok()?;
        let mut lines = log.lines().skip_while(|l| !l.contains("panicked at"));
        let at = lines.next()?.trim();
        Some(format!("{at} {}", lines.next().unwrap_or("").trim()))
    }

    fn error(&mut self, kind: RunErrorKind, message: String, serial: Vec<String>) -> RunError {
        // Stop QEMU first, so that its log is complete.
        self.qemu.stop();
        RunError {
            kind,
            message,
            serial,
            qemu_log: fs::read_to_string(&self.qemu_log).unwrap_or_default(),
            backend_log: self
                .backend_log
                .as_ref()
                .and_then(|p| fs::read_to_string(p).ok())
                .unwrap_or_default(),
        }
    }
}

/// What [`wait_together`] reports while its guests run.
#[derive(Debug)]
pub enum GuestEvent<'a> {
    /// A serial line of guest number `guest` (its index in the list), as it arrived, with
    /// that guest's `VZRAM-INFO` facts so far.
    Line {
        /// Index of the guest in the list given to [`wait_together`].
        guest: usize,
        /// When the line arrived.
        at: Instant,
        /// The line.
        line: &'a str,
        /// The guest's facts so far, this line's included.
        info: &'a BTreeMap<String, String>,
    },
    /// The period has passed (also when nothing was printed): time to sample the backend.
    Tick {
        /// Since [`wait_together`] was called.
        elapsed: Duration,
    },
}

/// Waits for several running guests at once (started by a [`Together`]) and returns their
/// outcomes in the same order. Each guest is waited for on a thread of its own, exactly as
/// [`Guest::wait`] (its own time limit, backend panic detection); this thread calls
/// `on_event` for every serial line of every guest and every `every` with a
/// [`GuestEvent::Tick`]. Returns when all guests have finished or failed.
///
/// The guests' QEMU processes stay children of the thread that started them, which is
/// blocked here until they end.
pub fn wait_together(
    guests: Vec<Guest>,
    every: Duration,
    mut on_event: impl FnMut(GuestEvent<'_>),
) -> Vec<Result<Outcome, RunError>> {
    let started = Instant::now();
    let n = guests.len();
    let (tx, rx) = mpsc::channel::<(usize, Instant, String)>();
    std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let tx = tx.clone();
                s.spawn(move || {
                    g.wait_with(|line, _| {
                        let _ = tx.send((i, Instant::now(), line.to_string()));
                    })
                })
            })
            .collect();
        drop(tx);
        let mut infos = vec![BTreeMap::new(); n];
        let mut next_tick = started + every;
        loop {
            let now = Instant::now();
            if now >= next_tick {
                on_event(GuestEvent::Tick {
                    elapsed: now - started,
                });
                next_tick = (next_tick + every).max(now);
                continue;
            }
            match rx.recv_timeout(next_tick - now) {
                Ok((guest, at, line)) => {
                    parse_info(&line, &mut infos[guest]);
                    on_event(GuestEvent::Line {
                        guest,
                        at,
                        line: &line,
                        info: &infos[guest],
                    });
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every guest's wait has returned.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_parse_anywhere_in_a_line() {
        let mut info = BTreeMap::new();
        parse_info("VZRAM-INFO a=1 b=x=y", &mut info);
        parse_info("[  3.1] random: crng initVZRAM-INFO c=3 junk", &mut info);
        parse_info("swaptest: bad=0", &mut info);
        parse_info("VZRAM-INFO a=2", &mut info);
        assert_eq!(info.len(), 3);
        assert_eq!(info["a"], "2");
        assert_eq!(info["b"], "x=y");
        assert_eq!(info["c"], "3");
    }

    #[test]
    fn result_lines_parse() {
        assert_eq!(
            parse_result("VZRAM-RESULT: PASS swap"),
            Some(("swap".into(), GuestResult::Pass))
        );
        assert_eq!(
            parse_result("xx VZRAM-RESULT: FAIL blk blktest found bad data"),
            Some((
                "blk".into(),
                GuestResult::Fail("blktest found bad data".into())
            ))
        );
        assert_eq!(parse_result("VZRAM-RESULT: MAYBE x"), None);
        assert_eq!(parse_result("VZRAM-RESULT: PASS"), None);
        assert_eq!(parse_result("PASS swap"), None);
    }

    #[test]
    fn together_holds_the_guest_slot_until_it_and_its_guests_are_gone() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let group = Together::new();
        let shared = group.slot.clone(); // what a guest of the group keeps
        let taken = Arc::new(AtomicBool::new(false));
        let t = {
            let taken = taken.clone();
            std::thread::spawn(move || {
                let _slot = Slot::take();
                taken.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(group);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !taken.load(Ordering::SeqCst),
            "a guest of the group still runs"
        );
        drop(shared);
        t.join().unwrap();
        assert!(taken.load(Ordering::SeqCst));
    }

    #[test]
    fn cmdline_carries_params_and_rejects_bad_ones() {
        let s = GuestSpec::new("swap").param("rot", 1).param("mib", 300);
        assert_eq!(
            s.cmdline().unwrap(),
            "console=ttyS0 quiet panic=-1 vzram.test=swap vzram.cpus=2 vzram.rot=1 vzram.mib=300"
        );
        assert!(GuestSpec::new("swap").param("Bad", 1).cmdline().is_err());
        assert!(GuestSpec::new("swap").param("a", "x y").cmdline().is_err());
        assert!(GuestSpec::new("swap; reboot").cmdline().is_err());
    }
}
