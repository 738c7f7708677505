//! vzram under libvirt, as operators run VMs: a guest defined with `virsh` from
//! docs/libvirt-vzram.xml swaps 3x its RAM onto a vzram disk, and no page comes back wrong.
//!
//! What runs:
//! 1. vzram with `--socket-mode 0660 --socket-group kvm`, as README.md's libvirt section says.
//! 2. A private libvirtd 9.0 (Debian 12's packages libvirt-daemon, libvirt-daemon-driver-qemu,
//!    libvirt-clients; no libvirt-daemon-system, whose services need systemd), as root: the
//!    "system" QEMU driver, the one that runs QEMU as another user. It runs in mount and PID
//!    namespaces of its own (`unshare`): a tmpfs on /run (no systemd or D-Bus to find, no clash
//!    with a libvirtd of the host), and /etc/libvirt, /var/lib/libvirt, /var/log/libvirt and
//!    /var/cache/libvirt bound to folders of the run folder, so nothing it writes outlives the
//!    test; its unix socket is in the run folder too, for `virsh -c
//!    qemu:///system?socket=...`. The PID namespace makes QEMU (which libvirt daemonizes) die
//!    with libvirtd, whatever happens to the test. On the host it leaves the three empty mount
//!    points under /var, as libvirt-daemon-system would.
//! 3. `virsh define` of docs/libvirt-vzram.xml with this run's name, paths and kernel command
//!    line (each replaced value must occur exactly once in the file, so the documented domain
//!    is the tested one), then `virsh start`. The guest (`vzram.test=swap`, rotational 0,
//!    `swapon --discard`) writes its serial console to a file, read and parsed here with the
//!    runner's parsers; at `phase=written` vzram's statistics are read.
//!
//! QEMU runs unprivileged: libvirt's qemu.conf defaults on Debian (user and group
//! `libvirt-qemu`, spelled out in the generated qemu.conf), with the user as
//! libvirt-daemon-system's postinst makes it (primary group `kvm`; ci/guest-image creates it
//! the same way). The test checks QEMU's uid and that it reached vzram through the socket's
//! group: the socket stays root:kvm 0660, libvirt does not relabel it. Two settings differ
//! from a packaged libvirt: `stdio_handler = "file"` (QEMU's output to a file instead of
//! virtlogd, which systemd would socket-activate) and `cgroup_controllers = [ ]` (without
//! systemd, libvirt makes /sys/fs/cgroup/*/machine itself and leaves it on the host).
//!
//! Needs root (for the namespaces and for libvirtd's system mode). A missing libvirt or
//! libvirt-qemu user fails the test with what to run; it never skips.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use guest_tests::{
    Accel, Backend, BackendSpec, GuestResult, GuestSpec, Image, MIB, Outcome, Proc, RunDir, Stat,
    parse_info, parse_result, workspace_root,
};

/// Room for 3x MemTotal of swap and then some.
const DISK: u64 = 512 * MIB;
/// The documented domain, defined by the test with its own paths.
const TEMPLATE: &str = "docs/libvirt-vzram.xml";
/// From `virsh start` to the guest's power-off.
const GUEST_LIMIT: Duration = Duration::from_secs(300);
/// For each virsh command.
const VIRSH_LIMIT: u32 = 60;
/// The unprivileged QEMU user and the socket's group (Debian's names).
const QEMU_USER: &str = "libvirt-qemu";
const SOCKET_GROUP: &str = "kvm";

/// libvirtd's PID 1 in its namespaces: mounts the private folders, starts libvirtd, forwards
/// SIGTERM to it and reaps what it leaves (libvirt daemonizes QEMU: its parent becomes this
/// shell). `$1` is the run folder.
const NAMESPACE_INIT: &str = r#"set -eu
d=$1
mkdir -p /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount -t tmpfs -o mode=0755 libvirt-run /run
mount --bind "$d/etc" /etc/libvirt
mount --bind "$d/lib" /var/lib/libvirt
mount --bind "$d/log" /var/log/libvirt
mount --bind "$d/cache" /var/cache/libvirt
/usr/sbin/libvirtd --config "$d/etc/libvirtd.conf" &
pid=$!
trap 'kill -TERM $pid' TERM INT
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
"#;

/// Panics with what to do unless this machine can run the test.
fn require_libvirt() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (a private system libvirtd in its own namespaces)".to_string());
    }
    for (file, package) in [
        ("/usr/sbin/libvirtd", "libvirt-daemon"),
        (
            "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
            "libvirt-daemon-driver-qemu",
        ),
        ("/usr/bin/virsh", "libvirt-clients"),
        ("/usr/bin/unshare", "util-linux"),
    ] {
        if !Path::new(file).exists() {
            missing.push(format!("{file} (package {package})"));
        }
    }
    if id(&["-u", QEMU_USER]).is_none() {
        missing.push(format!("user {QEMU_USER}"));
    }
    if group_id(SOCKET_GROUP).is_none() {
        missing.push(format!("group {SOCKET_GROUP}"));
    }
    assert!(
        missing.is_empty(),
        "the libvirt test cannot run, missing: {}. As root, ci/guest-image installs libvirt \
         (apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu \
         libvirt-clients) and creates user {QEMU_USER} (group {SOCKET_GROUP}) as \
         libvirt-daemon-system's postinst does",
        missing.join(", ")
    );
}

/// `id ARGS` as a number.
fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A group's id from `getent group NAME`.
fn group_id(name: &str) -> Option<u32> {
    let out = Command::new("getent").args(["group", name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    line.split(':').nth(2)?.trim().parse().ok()
}

/// `template` with each `(from, to)` replaced; every `from` must occur exactly once, so that
/// the documented file and the test cannot drift apart silently.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut xml = template.to_string();
    for (from, to) in values {
        let n = xml.matches(from).count();
        assert_eq!(n, 1, "{TEMPLATE}: {from:?} occurs {n} times, expected once");
        // Markup replaces markup; a path or a command line must need no escaping.
        assert!(
            from.starts_with('<') || !to.contains(['<', '>', '&', '\'', '"']),
            "{to:?} needs XML escaping"
        );
        xml = xml.replacen(from, to, 1);
    }
    xml
}

/// Every process of the host: its pid and its /proc folder.
fn processes() -> Vec<(u32, PathBuf)> {
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    entries
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect()
}

/// The processes whose parent is `ppid`.
fn children(ppid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for (pid, proc_dir) in processes() {
        let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(ppid) {
            found.push(pid);
        }
    }
    found
}

/// The QEMU of domain `name` on this host: `(pid, uid)`.
fn find_qemu(name: &str) -> Option<(u32, u32)> {
    let guest = format!("guest={name},");
    for (pid, proc_dir) in processes() {
        let Ok(cmdline) = fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| a.ends_with("qemu-system-x86_64"));
        if is_qemu && args.iter().any(|a| a.starts_with(&guest)) {
            let status = fs::read_to_string(proc_dir.join("status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            return Some((pid, uid));
        }
    }
    None
}

/// A private libvirtd (see the module's comment); stopped by PID when dropped.
struct Libvirtd {
    proc: Option<Proc>,
    uri: String,
    log: PathBuf,
    out: PathBuf,
}

impl Libvirtd {
    fn start(dir: &RunDir) -> Result<Libvirtd, String> {
        for sub in ["etc", "etc/qemu", "lib", "log", "log/qemu", "cache", "sock"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{sub}: {e}"))?;
        }
        let sock = dir.join("sock");
        let log = dir.join("libvirtd.log");
        let conf = format!(
            "# A private libvirtd for tests/tests/libvirt.rs.\n\
             unix_sock_dir = \"{}\"\n\
             unix_sock_ro_perms = \"0700\"\n\
             unix_sock_rw_perms = \"0700\"\n\
             auth_unix_ro = \"none\"\n\
             auth_unix_rw = \"none\"\n\
             log_outputs = \"3:file:{}\"\n",
            sock.display(),
            log.display()
        );
        fs::write(dir.join("etc/libvirtd.conf"), conf).map_err(|e| e.to_string())?;
        let qemu_conf = format!(
            "# Debian's defaults (commented out in libvirt-daemon-system's qemu.conf), spelled out.\n\
             user = \"{QEMU_USER}\"\n\
             group = \"{QEMU_USER}\"\n\
             # QEMU's output to /var/log/libvirt/qemu/NAME.log, not through virtlogd (which\n\
             # systemd socket-activates on a real host).\n\
             stdio_handler = \"file\"\n\
             # No cgroups: libvirt would make /sys/fs/cgroup/*/machine on the host and leave\n\
             # them there.\n\
             cgroup_controllers = [ ]\n"
        );
        fs::write(dir.join("etc/qemu.conf"), qemu_conf).map_err(|e| e.to_string())?;

        let out = dir.join("libvirtd.out");
        let file = fs::File::create(&out).map_err(|e| e.to_string())?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("unshare");
        // --kill-child: unshare's death (the test killed: PR_SET_PDEATHSIG) SIGTERMs the
        // namespace's init, which stops libvirtd; when the init exits, the kernel kills every
        // process left in the PID namespace (QEMU).
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
            "sh",
            "-c",
            NAMESPACE_INIT,
            "libvirtd-namespace",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
        let proc = Proc::spawn(cmd, "libvirtd (unshare)", Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let mut lv = Libvirtd {
            proc: Some(proc),
            uri: format!(
                "qemu:///system?socket={}",
                sock.join("libvirt-sock").display()
            ),
            log,
            out,
        };
        // Up when virsh gets an answer (the socket appears before the drivers are loaded).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = lv.proc.as_mut().and_then(Proc::try_wait) {
                return Err(format!("libvirtd exited ({s}) at start:\n{}", lv.logs()));
            }
            if sock.join("libvirt-sock").exists() && lv.virsh(&["version"]).is_ok() {
                return Ok(lv);
            }
            if Instant::now() > deadline {
                return Err(format!("libvirtd did not answer in 60 s:\n{}", lv.logs()));
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// `virsh -c URI ARGS` under `timeout`; its stdout, or an error with both outputs.
    fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["-k", "5", &VIRSH_LIMIT.to_string(), "virsh", "-q", "-c"])
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "virsh {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// libvirtd's log and output.
    fn logs(&self) -> String {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- libvirtd log ---\n{}--- libvirtd output ---\n{}",
            read(&self.log),
            read(&self.out)
        )
    }

    /// SIGTERM to the namespace's init (unshare itself blocks SIGTERM while it waits), which
    /// passes it to libvirtd; SIGKILL to unshare after 15 s.
    fn stop(&mut self) {
        let Some(mut proc) = self.proc.take() else {
            return;
        };
        if proc.try_wait().is_none() {
            for pid in children(proc.pid()) {
                // SAFETY: kill(2) on the child of our own unreaped child; no memory involved.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            if proc.wait_timeout(Duration::from_secs(15)).is_none() {
                eprintln!("libvirtd did not stop in 15 s; killing it");
            }
        }
        proc.stop();
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A defined domain: destroyed and undefined when dropped.
struct Domain<'a> {
    lv: &'a Libvirtd,
    name: String,
    defined: bool,
}

impl Domain<'_> {
    fn undefine(&mut self) -> Result<(), String> {
        if self.defined {
            if self.lv.virsh(&["domstate", &self.name]).as_deref() != Ok("shut off") {
                self.lv.virsh(&["destroy", &self.name])?;
            }
            self.lv.virsh(&["undefine", &self.name])?;
            self.defined = false;
        }
        Ok(())
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.undefine() {
            eprintln!("cleaning up domain {}: {e}", self.name);
        }
    }
}

/// A guest of 128 MiB with 2 vCPUs, defined from docs/libvirt-vzram.xml by `virsh` on a
/// private libvirtd with QEMU as libvirt-qemu, swaps 3x its RAM (rotational 0, discard) onto
/// vzram with 2 queues and lz4: PASS, 0 bad pages, most of the workload on swap and in vzram.
#[test]
fn libvirt_guest_swaps_on_vzram_as_an_unprivileged_qemu() -> Result<(), String> {
    let t0 = Instant::now();
    // The image first: ci/guest-image also installs libvirt and creates the QEMU user.
    let image = Image::get()?;
    require_libvirt();
    let qemu_uid = id(&["-u", QEMU_USER]).expect("checked");
    let kvm_gid = group_id(SOCKET_GROUP).expect("checked");

    let dir = RunDir::new("libvirt").map_err(|e| e.to_string())?;
    let disk = Backend::start(
        &dir,
        BackendSpec::vzram(
            DISK,
            &[
                "--comp",
                "lz4",
                "--socket-mode",
                "0660",
                "--socket-group",
                SOCKET_GROUP,
            ],
        ),
    )
    .map_err(|e| e.to_string())?;
    let socket = disk.socket().expect("a vzram socket").to_path_buf();
    let socket_ok = |when: &str| {
        let m = fs::metadata(&socket).expect("socket metadata");
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (0, kvm_gid, 0o660),
            "{when}: the vzram socket is not root:{SOCKET_GROUP} 0660"
        );
    };
    socket_ok("before the guest");

    // The guest's files in the run folder: libvirt relabels the kernel and initrd for QEMU's
    // user while the domain runs; the image stays as it is.
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.gz");
    fs::copy(&image.kernel, &kernel).map_err(|e| e.to_string())?;
    fs::copy(&image.initrd, &initrd).map_err(|e| e.to_string())?;
    let serial_path = dir.join("serial.log");
    let name = format!("vzram-libvirt-{}", std::process::id());
    let spec = GuestSpec::new("swap").param("rot", 0).param("pause", 2);
    let cmdline = spec.cmdline()?;
    let accel = Accel::detect();
    let template = fs::read_to_string(workspace_root().join(TEMPLATE))
        .map_err(|e| format!("{TEMPLATE}: {e}"))?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (kernel, initrd, sock, serial) = (
        path(&kernel),
        path(&initrd),
        path(&socket),
        path(&serial_path),
    );
    let xml = fill(
        &template,
        &[
            (
                "<domain type='kvm'>",
                match accel {
                    Accel::Kvm => "<domain type='kvm'>",
                    Accel::Tcg => "<domain type='qemu'>",
                },
            ),
            ("<name>vzram-guest</name>", &format!("<name>{name}</name>")),
            ("/var/lib/libvirt/boot/vzram-guest/vmlinuz", &kernel),
            ("/var/lib/libvirt/boot/vzram-guest/initrd.gz", &initrd),
            (
                "console=ttyS0 quiet panic=-1 vzram.test=swap vzram.cpus=2",
                &cmdline,
            ),
            ("/run/vzram/vz0.sock", &sock),
            ("/var/log/libvirt/qemu/vzram-guest-serial.log", &serial),
        ],
    );
    let xml_path = dir.join("domain.xml");
    fs::write(&xml_path, &xml).map_err(|e| e.to_string())?;

    let t_lv = Instant::now();
    let lv = Libvirtd::start(&dir)?;
    println!(
        "libvirt: private libvirtd up in {:.1} s ({})",
        t_lv.elapsed().as_secs_f64(),
        lv.virsh(&["version"])?.replace('\n', "; ")
    );
    let qemu_log = dir.join(&format!("log/qemu/{name}.log"));
    let fail = |what: String| {
        format!(
            "{what}\n--- QEMU log ---\n{}\n{}\n--- vzram ---\n{}",
            fs::read_to_string(&qemu_log).unwrap_or_default(),
            lv.logs(),
            disk.log()
        )
    };
    lv.virsh(&["define", &path(&xml_path)]).map_err(&fail)?;
    let mut domain = Domain {
        lv: &lv,
        name: name.clone(),
        defined: true,
    };
    let started = Instant::now();
    lv.virsh(&["start", &name]).map_err(&fail)?;
    println!(
        "libvirt: `virsh start` took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Who runs QEMU.
    let (qemu_pid, uid) = find_qemu(&name).ok_or_else(|| {
        fail(format!(
            "no QEMU process of domain {name} after virsh start"
        ))
    })?;
    println!("libvirt: QEMU pid {qemu_pid} runs as uid {uid} ({QEMU_USER} is {qemu_uid})");
    assert_eq!(uid, qemu_uid, "QEMU does not run as {QEMU_USER}");

    // The serial console, line by line, as the guest writes it.
    let mut serial: Vec<String> = Vec::new();
    let mut info = BTreeMap::new();
    let mut result: Option<GuestResult> = None;
    let mut boot = None;
    let mut written: Option<Result<Stat, String>> = None;
    let mut last_state = Instant::now();
    let mut result_at: Option<Instant> = None;
    let deadline = started + GUEST_LIMIT;
    let shut_off = loop {
        let text = fs::read(&serial_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        // Complete lines only: the last one may still be being written.
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        for line in complete.split_terminator('\n').skip(serial.len()) {
            let line = line.trim_end_matches('\r').to_string();
            parse_info(&line, &mut info);
            if boot.is_none() && line.contains("VZRAM-INFO init_ms=") {
                boot = Some(started.elapsed());
            }
            if let Some((test, r)) = parse_result(&line) {
                assert!(result.is_none(), "a second result line: {line}");
                assert_eq!(test, spec.test, "a result for another test: {line}");
                result = Some(r);
                result_at = Some(Instant::now());
            }
            if line.contains("VZRAM-INFO phase=written") {
                written = Some(disk.stat());
                socket_ok("while the guest swaps");
            }
            serial.push(line);
        }
        if last_state.elapsed() >= Duration::from_secs(1) {
            last_state = Instant::now();
            let state = lv.virsh(&["domstate", &name]).map_err(&fail)?;
            if state == "shut off" {
                break started.elapsed();
            }
        }
        if result_at.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) {
            return Err(fail(format!(
                "the guest printed its result but the domain did not shut off in 30 s (no \
                 power-off: ACPI missing?); serial:\n{}",
                serial.join("\n")
            )));
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "the guest did not finish in {GUEST_LIMIT:?}; serial:\n{}",
                serial.join("\n")
            )));
        }
        sleep(Duration::from_millis(200));
    };
    socket_ok("after the guest");
    let outcome = Outcome {
        test: spec.test.clone(),
        result: result.ok_or_else(|| {
            fail(format!(
                "the domain shut off without a result line; serial:\n{}",
                serial.join("\n")
            ))
        })?,
        info,
        serial,
        boot,
        wall: shut_off,
        accel,
        exit: None,
    };
    println!("libvirt: {}", outcome.summary());
    outcome.assert_pass();
    // Both vCPUs and both queues reached the guest (without ACPI it would see one CPU).
    assert_eq!(outcome.u64("cpus"), 2);
    assert_eq!(outcome.u64("swap.hw_queues"), 2);
    let swapped = outcome.assert_swapped(0);
    assert_eq!(outcome.u64("swaptest.bad"), 0);
    let written = written
        .ok_or("the guest never reached phase=written")?
        .map_err(|e| format!("vzram statistics at phase=written: {e}"))?;
    println!("libvirt: vzram at phase=written: {}", written.summary());
    let orig = written.dev("/mm_stat/orig_data_size");
    assert!(
        orig * 2 > swapped,
        "vzram holds {orig} bytes, the guest had {swapped} on swap"
    );
    assert!(written.dev("/mm_stat/compr_data_size") < orig);
    assert!(written.dev_bool("/connected"));
    let queues = written.queue_requests();
    assert!(
        queues.iter().filter(|&&r| r > 0).count() == 2,
        "both queues carry I/O: {queues:?}"
    );
    let after = disk.stat()?;
    for f in ["failed_writes", "failed_reads", "invalid_io"] {
        assert_eq!(after.dev(&format!("/io_stat/{f}")), 0, "{f}: {}", after.0);
    }

    domain.undefine().map_err(&fail)?;
    drop(domain);
    let mut lv = lv;
    lv.stop();
    println!(
        "libvirt: whole test {:.1} s (guest {:.1} s, {:?})",
        t0.elapsed().as_secs_f64(),
        shut_off.as_secs_f64(),
        accel
    );
    Ok(())
}
