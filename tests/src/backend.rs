//! vhost-user-blk backends the guest's disk is served by.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::RunError;
use crate::proc::{Proc, RunDir};
use crate::vzram::Stat;

/// Which backend serves the guest's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// No disk: tests that need none (boot, in-guest zram).
    None,
    /// `qemu-storage-daemon` exporting a raw file on the run folder (/dev/shm) as
    /// vhost-user-blk, with `discard=unmap` so that discards punch holes in the file (the
    /// reference for what vzram must do).
    Qsd,
    /// The `vzram` daemon: `vzram serve --socket SOCK --size SIZE --num-queues N [args]`, with
    /// its control socket `vzram.ctl` beside SOCK (the daemon's default); or, with `devices`,
    /// one daemon serving several disks: `vzram serve --num-queues N --device
    /// socket=<name>.sock,size=SIZE,name=NAME[,backing-file=<name>.backing] ... [args]`, the
    /// control socket beside the first.
    Vzram {
        /// The binary: [`vzram_bin`] unless set with [`BackendSpec::with_bin`].
        bin: PathBuf,
        /// Extra arguments after `--size` (or after the last `--device`).
        args: Vec<String>,
        /// The devices of a several-device daemon ([`BackendSpec::vzram_devices`]); empty for
        /// the one-device `--socket`/`--size` form.
        devices: Vec<VzramDevice>,
    },
}

/// One disk of a vzram daemon that serves several ([`BackendSpec::vzram_devices`]): its name
/// (in `vzram stat` and for [`crate::Guest::start_on`]), size, and whether it has a backing
/// file. Its socket is `<name>.sock` in the run folder, its backing file `<name>.backing`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VzramDevice {
    /// `name=`: letters, digits, `-` and `_`.
    pub name: String,
    /// Disk size in bytes (a multiple of 1 MiB).
    pub size: u64,
    /// Give the device a (sparse) backing file for writeback.
    pub backing_file: bool,
}

impl VzramDevice {
    /// A device without a backing file.
    pub fn new(name: &str, size: u64) -> VzramDevice {
        VzramDevice {
            name: name.to_string(),
            size,
            backing_file: false,
        }
    }

    /// Gives it a backing file, `<name>.backing` in the run folder.
    pub fn with_backing_file(mut self) -> VzramDevice {
        self.backing_file = true;
        self
    }
}

/// The name of the only device of the one-device `vzram serve --socket` form (the daemon's
/// default name), and of qemu-storage-daemon's disk.
pub const DEFAULT_DEVICE: &str = "vz0";

/// What to start: a backend kind, the disk size and the number of virtqueues it offers.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// The backend.
    pub kind: BackendKind,
    /// Disk size in bytes (a multiple of 1 MiB); with several devices, the first one's.
    pub size: u64,
    /// Virtqueues the backend offers (every device); QEMU's `num-queues` is set to the same.
    pub queues: u16,
}

impl BackendSpec {
    /// No disk.
    pub fn none() -> BackendSpec {
        BackendSpec {
            kind: BackendKind::None,
            size: 0,
            queues: 0,
        }
    }

    /// qemu-storage-daemon with a `size`-byte raw file, 2 queues.
    pub fn qsd(size: u64) -> BackendSpec {
        BackendSpec {
            kind: BackendKind::Qsd,
            size,
            queues: 2,
        }
    }

    /// vzram ([`vzram_bin`]) with a `size`-byte disk, 2 queues, and extra `serve` arguments.
    pub fn vzram(size: u64, args: &[&str]) -> BackendSpec {
        BackendSpec {
            kind: BackendKind::Vzram {
                bin: vzram_bin(),
                args: args.iter().map(|s| s.to_string()).collect(),
                devices: Vec::new(),
            },
            size,
            queues: 2,
        }
    }

    /// One vzram daemon ([`vzram_bin`]) serving every device of `devices` (each `--device`
    /// with its own socket and, if asked, backing file), 2 queues each, and extra `serve`
    /// arguments (`--comp`, `--recomp`, `--mem-limit` ...). Guests pick their device with
    /// [`crate::Guest::start_on`]; [`crate::Guest::start`] takes the first.
    pub fn vzram_devices(devices: &[VzramDevice], args: &[&str]) -> BackendSpec {
        BackendSpec {
            kind: BackendKind::Vzram {
                bin: vzram_bin(),
                args: args.iter().map(|s| s.to_string()).collect(),
                devices: devices.to_vec(),
            },
            size: devices.first().map_or(0, |d| d.size),
            queues: 2,
        }
    }

    /// Runs `bin` instead of [`vzram_bin`] (Vzram only): another build, or a stand-in.
    pub fn with_bin(mut self, bin: impl Into<PathBuf>) -> BackendSpec {
        if let BackendKind::Vzram { bin: b, .. } = &mut self.kind {
            *b = bin.into();
        }
        self
    }

    /// Sets the number of queues.
    pub fn queues(mut self, queues: u16) -> BackendSpec {
        self.queues = queues;
        self
    }
}

/// The `vzram` binary the Vzram backend runs: `$VZRAM_BIN`, else `vzram` next to the test
/// executable's profile folder (`<target dir>/debug/vzram` for `cargo test`).
pub fn vzram_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VZRAM_BIN") {
        return PathBuf::from(p);
    }
    // The test binary is <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("vzram"))
        .unwrap_or_else(|| PathBuf::from("target/debug/vzram"))
}

/// `size` as a QEMU/zram-style size string (`512M` when it is whole MiB, else bytes).
pub fn size_arg(size: u64) -> String {
    const MIB: u64 = 1 << 20;
    if size > 0 && size % MIB == 0 {
        format!("{}M", size / MIB)
    } else {
        size.to_string()
    }
}

/// A running backend; stopped (by PID) and its sockets and disk files removed when dropped.
#[derive(Debug)]
pub struct Backend {
    spec: BackendSpec,
    /// Every device's (name, vhost-user socket); the first is the default. Empty for None.
    sockets: Vec<(String, PathBuf)>,
    /// QSD's raw disk file.
    disk_file: Option<PathBuf>,
    /// vzram's backing files: (device name, path).
    backing_files: Vec<(String, PathBuf)>,
    log: PathBuf,
    proc: Option<Proc>,
    command: String,
    // Declared last: fields drop in order, so the folder outlives the process using it.
    _dir: RunDir,
}

impl Backend {
    /// Starts the backend in `dir` and waits until its sockets exist.
    pub fn start(dir: &RunDir, spec: BackendSpec) -> Result<Backend, RunError> {
        let log = dir.join("backend.log");
        let socket = dir.join("disk.sock");
        let mut sockets = vec![(DEFAULT_DEVICE.to_string(), socket.clone())];
        let mut backing_files = Vec::new();
        let (cmd, disk_file, name) = match &spec.kind {
            BackendKind::None => {
                return Ok(Backend {
                    spec,
                    sockets: Vec::new(),
                    disk_file: None,
                    backing_files,
                    log,
                    proc: None,
                    command: String::new(),
                    _dir: dir.clone(),
                });
            }
            BackendKind::Qsd => {
                let file = dir.join("disk.raw");
                File::create(&file)
                    .and_then(|f| f.set_len(spec.size))
                    .map_err(|e| RunError::setup(format!("{}: {e}", file.display())))?;
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,filename={},node-name=disk,discard=unmap",
                    file.display()
                ));
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},\
                     writable=on,num-queues={}",
                    socket.display(),
                    spec.queues
                ));
                (cmd, Some(file), "qemu-storage-daemon")
            }
            BackendKind::Vzram { bin, args, devices } => {
                // The default binary is built from the current sources first (once per
                // process): a stale daemon must not be tested by accident.
                if *bin == vzram_bin() {
                    crate::vzram::fresh_vzram().map_err(RunError::setup)?;
                }
                if !bin.is_file() {
                    return Err(RunError::setup(format!(
                        "no vzram binary at {} (build it with `cargo build -p vzram` or set \
                         VZRAM_BIN)",
                        bin.display()
                    )));
                }
                let mut cmd = Command::new(bin);
                cmd.arg("serve");
                if devices.is_empty() {
                    cmd.arg("--socket")
                        .arg(&socket)
                        .arg("--size")
                        .arg(size_arg(spec.size));
                } else {
                    sockets.clear();
                    for d in devices {
                        let ok = !d.name.is_empty()
                            && d.name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                        if !ok || sockets.iter().any(|(n, _)| *n == d.name) {
                            return Err(RunError::setup(format!(
                                "bad or repeated vzram device name {:?}",
                                d.name
                            )));
                        }
                        let sock = dir.join(&format!("{}.sock", d.name));
                        let mut dev = format!(
                            "socket={},size={},name={}",
                            sock.display(),
                            size_arg(d.size),
                            d.name
                        );
                        if d.backing_file {
                            let f = dir.join(&format!("{}.backing", d.name));
                            dev.push_str(&format!(",backing-file={}", f.display()));
                            backing_files.push((d.name.clone(), f));
                        }
                        cmd.arg("--device").arg(dev);
                        sockets.push((d.name.clone(), sock));
                    }
                }
                cmd.arg("--num-queues")
                    .arg(spec.queues.to_string())
                    .args(args);
                (cmd, None, "vzram")
            }
        };
        let mut cmd = cmd;
        let command = crate::proc::command_line(&cmd);
        let out = File::create(&log).map_err(|e| RunError::setup(format!("{e}")))?;
        let err = out
            .try_clone()
            .map_err(|e| RunError::setup(format!("{e}")))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Both daemons finish in-flight requests and remove their socket on SIGTERM.
        let mut proc = Proc::spawn(cmd, name, Duration::from_secs(5))
            .map_err(|e| RunError::setup(e.to_string()))?;

        let deadline = Instant::now() + Duration::from_secs(20);
        while !sockets.iter().all(|(_, s)| s.exists()) {
            if let Some(status) = proc.try_wait() {
                return Err(RunError::setup(format!(
                    "{name} exited ({status}) before creating its socket:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            if Instant::now() >= deadline {
                return Err(RunError::setup(format!(
                    "{name} made no socket in 20 s:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            sleep(Duration::from_millis(20));
        }
        Ok(Backend {
            spec,
            sockets,
            disk_file,
            backing_files,
            log,
            proc: Some(proc),
            command,
            _dir: dir.clone(),
        })
    }

    /// What was started.
    pub fn spec(&self) -> &BackendSpec {
        &self.spec
    }

    /// The command line the backend was started with (empty for [`BackendKind::None`]).
    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// The vhost-user socket, the first device's with several (None for
    /// [`BackendKind::None`]).
    pub fn socket(&self) -> Option<&Path> {
        self.sockets.first().map(|(_, s)| s.as_path())
    }

    /// The vhost-user socket of the device named `device` ([`DEFAULT_DEVICE`] for a
    /// one-device backend).
    pub fn socket_of(&self, device: &str) -> Option<&Path> {
        self.sockets
            .iter()
            .find(|(n, _)| n == device)
            .map(|(_, s)| s.as_path())
    }

    /// The names of the devices, in the order given (`[DEFAULT_DEVICE]` for one device).
    pub fn device_names(&self) -> Vec<&str> {
        self.sockets.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Bytes of memory (tmpfs) or disk the backing file of `device` holds (vzram with
    /// [`VzramDevice::with_backing_file`]): what writeback moved there.
    pub fn backing_file_allocated(&self, device: &str) -> Option<u64> {
        let (_, f) = self.backing_files.iter().find(|(n, _)| n == device)?;
        fs::metadata(f).ok().map(|m| m.blocks() * 512)
    }

    /// The vzram daemon's control socket (Vzram only): `vzram.ctl` beside the (first)
    /// vhost-user socket.
    pub fn control(&self) -> Option<PathBuf> {
        match (&self.spec.kind, self.socket()) {
            (BackendKind::Vzram { .. }, Some(s)) => Some(s.with_file_name("vzram.ctl")),
            _ => None,
        }
    }

    /// The vzram daemon's statistics from its control socket (Vzram only).
    pub fn stat(&self) -> Result<Stat, String> {
        let control = self
            .control()
            .ok_or_else(|| format!("a {:?} backend has no vzram statistics", self.spec.kind))?;
        crate::vzram::stat(&control)
    }

    /// Sends one JSON command to the vzram daemon's control socket (Vzram only); returns its
    /// `result`.
    pub fn control_request(&self, command: &str) -> Result<serde_json::Value, String> {
        let control = self
            .control()
            .ok_or_else(|| format!("a {:?} backend has no control socket", self.spec.kind))?;
        crate::vzram::request(&control, command)
    }

    /// `vzram stat`: the daemon's zramctl-like table (Vzram only).
    pub fn stat_table(&self) -> Result<String, String> {
        match (&self.spec.kind, self.control()) {
            (BackendKind::Vzram { bin, .. }, Some(control)) => {
                crate::vzram::stat_table(bin, &control)
            }
            _ => Err(format!(
                "a {:?} backend has no vzram statistics",
                self.spec.kind
            )),
        }
    }

    /// The backend's PID, if it runs a process.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// True while the backend process runs (always true for None).
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_none_or(|p| p.try_wait().is_none())
    }

    /// The file that collects the backend's stdout and stderr (None without a process).
    pub fn log_path(&self) -> Option<&Path> {
        self.proc.as_ref().map(|_| self.log.as_path())
    }

    /// The backend's stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bytes of memory the disk file holds (Qsd only): what the guest's writes cost and its
    /// discards gave back. `st_blocks` counts 512-byte units, also on tmpfs.
    pub fn disk_file_allocated(&self) -> Option<u64> {
        let f = self.disk_file.as_ref()?;
        fs::metadata(f).ok().map(|m| m.blocks() * 512)
    }

    /// Kills the backend with SIGKILL, as a crash would, and reaps it; its socket file and
    /// disk file stay (a new backend in the same directory takes them over). Returns its log.
    pub fn kill(&mut self) -> String {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child_mut().kill();
            let _ = p.child_mut().wait();
        }
        self.sockets.clear();
        self.disk_file = None;
        self.backing_files.clear();
        self.log()
    }

    /// Stops the backend (SIGTERM, then SIGKILL after 5 s); returns its log. Drop does the same.
    pub fn stop(&mut self) -> String {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        for (_, s) in &self.sockets {
            let _ = fs::remove_file(s);
        }
        for f in self
            .disk_file
            .iter()
            .chain(self.backing_files.iter().map(|(_, f)| f))
        {
            let _ = fs::remove_file(f);
        }
        self.log()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Stands in for `vzram serve --device ...`: records its arguments, creates every
    /// `socket=` as a plain file (all the runner waits for) and sleeps until stopped.
    const STAND_IN: &str = r#"#!/bin/sh
echo "$*" >"$(dirname "$0")/args"
for a in "$@"; do
    case $a in socket=*) s=${a#socket=}; : >"${s%%,*}" ;; esac
done
exec sleep 60
"#;

    #[test]
    fn one_vzram_serves_several_devices_each_on_its_socket() {
        let dir = RunDir::new("vzram-devices").unwrap();
        let script = dir.join("vzram");
        fs::write(&script, STAND_IN).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let devices = [
            VzramDevice::new("active", 512 << 20).with_backing_file(),
            VzramDevice::new("idle", 256 << 20),
        ];
        let spec = BackendSpec::vzram_devices(&devices, &["--comp", "lz4"]).with_bin(&script);
        let mut b = Backend::start(&dir, spec).unwrap();
        let p = |name: &str| dir.join(name).display().to_string();
        assert_eq!(
            fs::read_to_string(dir.join("args")).unwrap().trim(),
            format!(
                "serve --device socket={},size=512M,name=active,backing-file={} \
                 --device socket={},size=256M,name=idle --num-queues 2 --comp lz4",
                p("active.sock"),
                p("active.backing"),
                p("idle.sock")
            )
        );
        assert_eq!(b.device_names(), ["active", "idle"]);
        assert_eq!(b.socket(), Some(dir.join("active.sock").as_path()));
        assert_eq!(b.socket_of("idle"), Some(dir.join("idle.sock").as_path()));
        assert_eq!(b.socket_of("vz0"), None);
        assert_eq!(b.control(), Some(dir.join("vzram.ctl")));
        assert_eq!(b.spec().size, 512 << 20);
        // No file yet: the stand-in writes no data.
        assert_eq!(b.backing_file_allocated("active"), None);
        assert_eq!(b.backing_file_allocated("idle"), None);
        b.stop();
        assert!(!dir.join("active.sock").exists() && !dir.join("idle.sock").exists());
    }

    #[test]
    fn device_names_must_be_plain_and_distinct() {
        let dir = RunDir::new("vzram-bad-devices").unwrap();
        for names in [["a", "a"], ["a", "b,c"], ["", "b"]] {
            let devices = names.map(|n| VzramDevice::new(n, 1 << 20));
            let spec = BackendSpec::vzram_devices(&devices, &[]).with_bin("/bin/true");
            let e = Backend::start(&dir, spec).unwrap_err();
            assert!(e.message.contains("device name"), "{names:?}: {e}");
        }
    }

    #[test]
    fn a_backend_without_a_disk_has_no_devices() {
        let dir = RunDir::new("qsd-name").unwrap();
        let b = Backend::start(&dir, BackendSpec::none()).unwrap();
        assert!(b.device_names().is_empty());
        assert_eq!(b.socket(), None);
    }
}
