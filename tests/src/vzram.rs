//! The vzram daemon as a backend: a fresh binary, and its statistics.
//!
//! `cargo test` builds only the package under test (and its dependencies), not another
//! package's binary, so `target/<profile>/vzram` may be missing or older than the sources.
//! [`fresh_vzram`] therefore runs `cargo build -p vzram --bin vzram` once per test process, with
//! the test binary's own target folder and profile, before the first vzram backend starts.
//! This runs after cargo has finished building the tests, so the build lock is free, and when
//! nothing changed it costs about a second. `$VZRAM_BIN` skips the build: that binary is used
//! as it is.
//!
//! Statistics come from the daemon's control socket (`vzram.ctl` beside the vhost-user socket):
//! one JSON line `{"cmd":"stat"}` in, one line `{"ok":true,"result":{...}}` out ([`Stat`]), or
//! the zramctl-like table of `vzram stat` ([`stat_table`]).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::image::workspace_root;
use crate::proc::Proc;

/// Longest a `cargo build -p vzram` may take (a build from nothing takes about 30 s here).
const BUILD_LIMIT: Duration = Duration::from_secs(900);

/// Where the test binary lives: `(<target dir>, <profile folder name>)`. A test is
/// `<target>/<profile>/deps/<name>-<hash>`, an example `<target>/<profile>/examples/<name>`.
fn target_and_profile() -> Result<(PathBuf, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in <target>/<profile>/<kind>/", exe.display()))?;
    let target = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("odd profile folder {}", profile_dir.display()))?;
    Ok((target.to_path_buf(), profile.to_string()))
}

/// The vzram binary to test, built from the current sources.
///
/// With `$VZRAM_BIN` set: that path, not rebuilt. Otherwise `cargo build -p vzram --bin vzram`
/// runs once per process in the target folder and profile of the running test binary (`debug`
/// is cargo's `dev` profile, `release` is `--release`, anything else `--profile NAME`), with
/// `$CARGO` (set by `cargo test`) or `cargo` from PATH, and this returns
/// `<target>/<profile>/vzram`. A failed build is an error (with cargo's output), never a reason
/// to fall back to an older binary.
pub fn fresh_vzram() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build_vzram).clone()
}

fn build_vzram() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("VZRAM_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            eprintln!(
                "guest-tests: vzram is VZRAM_BIN={} (used as it is, not rebuilt)",
                bin.display()
            );
            Ok(bin)
        } else {
            Err(format!("VZRAM_BIN={} is not a file", bin.display()))
        };
    }
    let (target, profile) = target_and_profile()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "-p", "vzram", "--bin", "vzram"])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"));
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.env("CARGO_TARGET_DIR", &target);
    let log_path = target.join("guest-tests-vzram-build.log");
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    let t = Instant::now();
    let mut proc = Proc::spawn(cmd, "cargo build -p vzram", Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let status = proc.wait_timeout(BUILD_LIMIT);
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            return Err(format!(
                "`cargo build -p vzram` ({profile}, target {}) failed ({s}):\n{output}",
                target.display()
            ));
        }
        None => {
            proc.stop();
            return Err(format!(
                "`cargo build -p vzram` did not finish in {BUILD_LIMIT:?}:\n{output}"
            ));
        }
    }
    let bin = target.join(&profile).join("vzram");
    if !bin.is_file() {
        return Err(format!(
            "`cargo build -p vzram` succeeded but made no {}",
            bin.display()
        ));
    }
    eprintln!(
        "guest-tests: {} is up to date (cargo build -p vzram, {profile}: {:.1} s)",
        bin.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// One answer of the daemon's `stat` command: the `result` object of
/// `{"ok":true,"result":{"devices":[...],"store":{...}}}`.
///
/// Field access goes by JSON pointer and panics, with the whole answer, when a field is
/// missing or not a number: a test that reads a statistic must not pass because it is absent.
#[derive(Clone, Debug)]
pub struct Stat(pub Value);

impl Stat {
    /// A number by JSON pointer from the top (`/store/mem_used_total`).
    #[track_caller]
    pub fn u64(&self, pointer: &str) -> u64 {
        match self.0.pointer(pointer).and_then(Value::as_u64) {
            Some(v) => v,
            None => panic!("vzram stat has no number at {pointer}:\n{:#}", self.0),
        }
    }

    /// A number of the first device by JSON pointer (`/mm_stat/orig_data_size`).
    #[track_caller]
    pub fn dev(&self, pointer: &str) -> u64 {
        self.u64(&format!("/devices/0{pointer}"))
    }

    /// The index in `devices` of the device named `name` (`name=` of `--device`; `vz0` for
    /// the one-device form).
    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.0
            .pointer("/devices")
            .and_then(Value::as_array)?
            .iter()
            .position(|d| d.get("name").and_then(Value::as_str) == Some(name))
    }

    /// A number of the device named `name` by JSON pointer (`/bd_stat/bd_count`); panics,
    /// with the whole answer, when the device or the field is missing.
    #[track_caller]
    pub fn dev_of(&self, name: &str, pointer: &str) -> u64 {
        match self.device_index(name) {
            Some(i) => self.u64(&format!("/devices/{i}{pointer}")),
            None => panic!("vzram stat has no device {name:?}:\n{:#}", self.0),
        }
    }

    /// A number of the device named `name`, or None when the device or the field is absent:
    /// for statistics that only some versions of the daemon report (`/tiering/recompressed`).
    pub fn dev_opt(&self, name: &str, pointer: &str) -> Option<u64> {
        let i = self.device_index(name)?;
        self.0
            .pointer(&format!("/devices/{i}{pointer}"))
            .and_then(Value::as_u64)
    }

    /// A boolean of the first device (`/connected`).
    #[track_caller]
    pub fn dev_bool(&self, pointer: &str) -> bool {
        let p = format!("/devices/0{pointer}");
        match self.0.pointer(&p).and_then(Value::as_bool) {
            Some(v) => v,
            None => panic!("vzram stat has no boolean at {p}:\n{:#}", self.0),
        }
    }

    /// The first device's per-queue request counts (`queues[i].requests`).
    #[track_caller]
    pub fn queue_requests(&self) -> Vec<u64> {
        let n = match self
            .0
            .pointer("/devices/0/queues")
            .and_then(Value::as_array)
        {
            Some(q) => q.len(),
            None => panic!("vzram stat has no /devices/0/queues:\n{:#}", self.0),
        };
        (0..n)
            .map(|i| self.dev(&format!("/queues/{i}/requests")))
            .collect()
    }

    /// `orig_data_size / compr_data_size` of the first device (0 when nothing is stored).
    pub fn ratio(&self) -> f64 {
        let compr = self.dev("/mm_stat/compr_data_size");
        if compr == 0 {
            0.0
        } else {
            self.dev("/mm_stat/orig_data_size") as f64 / compr as f64
        }
    }

    /// One line of the figures the tests look at most.
    pub fn summary(&self) -> String {
        const MIB: f64 = (1 << 20) as f64;
        let mm = |f: &str| self.dev(&format!("/mm_stat/{f}"));
        format!(
            "orig {:.1} MiB, compr {:.1} MiB (ratio {:.2}), mem_used_total {:.1} MiB \
             (max {:.1}), same_pages {}, huge_pages {}, failed_writes {}, notify_free {}, \
             queues {:?}",
            mm("orig_data_size") as f64 / MIB,
            mm("compr_data_size") as f64 / MIB,
            self.ratio(),
            mm("mem_used_total") as f64 / MIB,
            mm("mem_used_max") as f64 / MIB,
            mm("same_pages"),
            mm("huge_pages"),
            self.dev("/io_stat/failed_writes"),
            self.dev("/io_stat/notify_free"),
            self.queue_requests()
        )
    }
}

/// Sends one command to the daemon behind `control` (JSON-lines protocol, 10 s limit) and
/// returns its `result`: `request(ctl, r#"{"cmd":"mem_limit","bytes":0}"#)`.
pub fn request(control: &Path, command: &str) -> Result<Value, String> {
    let what = |e: std::io::Error| format!("vzram control socket {}: {e}", control.display());
    let mut sock = UnixStream::connect(control).map_err(what)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(what)?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(what)?;
    sock.write_all(format!("{}\n", command.trim_end()).as_bytes())
        .map_err(what)?;
    let mut line = String::new();
    BufReader::new(&sock).read_line(&mut line).map_err(what)?;
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| format!("vzram answered {command} with {line:?}: not JSON ({e})"))?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        return Err(format!("vzram answered {command} with {line:?}"));
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| format!("vzram answered {command} with {line:?}: no result"))
}

/// The statistics of the daemon behind `control` (`{"cmd":"stat"}`).
pub fn stat(control: &Path) -> Result<Stat, String> {
    request(control, r#"{"cmd":"stat"}"#).map(Stat)
}

/// `vzram stat --control CONTROL`: the zramctl-like table, as the daemon's own client prints it.
pub fn stat_table(bin: &Path, control: &Path) -> Result<String, String> {
    let dir = std::env::temp_dir();
    let out_path = dir.join(format!("vzram-stat-{}.out", std::process::id()));
    let out = File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("stat")
        .arg("--control")
        .arg(control)
        .args(["--timeout", "10"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut p = Proc::spawn(cmd, "vzram stat", Duration::ZERO).map_err(|e| e.to_string())?;
    let status = p.wait_timeout(Duration::from_secs(20));
    if status.is_none() {
        p.stop();
    }
    let text = fs::read_to_string(&out_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("vzram stat failed ({s}):\n{text}")),
        None => Err(format!("vzram stat did not answer in 20 s:\n{text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_found_by_name() {
        let s = Stat(serde_json::json!({
            "devices": [
                {"name": "active", "bd_stat": {"bd_count": 1}},
                {"name": "idle", "bd_stat": {"bd_count": 7}, "tiering": {"recompressed": 3}},
            ],
            "store": {},
        }));
        assert_eq!(s.device_index("idle"), Some(1));
        assert_eq!(s.device_index("nope"), None);
        assert_eq!(s.dev_of("idle", "/bd_stat/bd_count"), 7);
        assert_eq!(s.dev_of("active", "/bd_stat/bd_count"), 1);
        assert_eq!(s.dev_opt("idle", "/tiering/recompressed"), Some(3));
        assert_eq!(s.dev_opt("active", "/tiering/recompressed"), None);
        assert_eq!(s.dev_opt("nope", "/bd_stat/bd_count"), None);
        let missing = std::panic::catch_unwind(|| s.dev_of("nope", "/bd_stat/bd_count"));
        assert!(missing.is_err());
    }
}
