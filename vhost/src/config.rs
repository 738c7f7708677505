//! `vzram serve`: arguments, `--device` specs, the configuration resolved from them once
//! ([`Config`], every default written once, beside its flag), and building the store and
//! devices from it.

use crate::blk::{ConfigSpace, PAGE_SIZE};
use crate::control::ServerConfig;
use crate::device::BlkDevice;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most queues a device offers: QEMU's default `num-queues` is the VM's vCPU count, so offer
/// plenty. Worker threads idle on an eventfd until their queue is used; streams are made
/// lazily.
const DEFAULT_NUM_QUEUES: u16 = 16;
/// The vhost-user backend library maps queues to threads with a 64-bit mask.
const MAX_NUM_QUEUES: u16 = 64;

#[derive(Debug, Args)]
#[command(after_long_help = SERVE_EXAMPLES)]
pub struct ServeArgs {
    /// vhost-user socket to listen on (QEMU: -chardev socket,path=...). One device.
    #[arg(
        long,
        value_name = "PATH",
        requires = "size",
        conflicts_with = "device"
    )]
    pub socket: Option<PathBuf>,

    /// Disk size with K/M/G/T suffix, a multiple of 4 KiB (like zram's disksize).
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size)]
    pub size: Option<u64>,

    /// Several devices sharing one pool and memory limit, each
    /// `socket=PATH,size=SIZE[,name=NAME][,readonly][,serial=ID][,backing-file=PATH][,blk-size=512|4096][,num-queues=N][,socket-group=GROUP]`.
    /// Repeat for every device; options not given take the values of the flags below.
    #[arg(long, value_name = "SPEC", value_parser = parse_device_spec)]
    pub device: Vec<DeviceSpec>,

    /// Queues each device offers (the guest may use fewer; QEMU's default is one per vCPU).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NUM_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_NUM_QUEUES)))]
    pub num_queues: u16,

    /// Entries per virtqueue the device accepts (a power of two, up to 1024).
    #[arg(long, value_name = "Q", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Compression algorithm for every page, as zram's comp_algorithm: lz4, zstd, zstd:LEVEL,
    /// or `algo=zstd level=3 dict=PATH`.
    #[arg(long, value_name = "ALGO", default_value = "lz4", value_parser = parse_algorithm)]
    pub comp: zcomp::Params,

    /// Secondary algorithm for recompression (`vzram recompress`), as zram's
    /// recomp_algorithm; repeat for up to three, in priority order (1, 2, 3).
    #[arg(long, value_name = "ALGO", value_parser = parse_algorithm)]
    pub recomp: Vec<zcomp::Params>,

    /// Most host memory the pool may use for all devices together (K/M/G); writes beyond
    /// it fail with an I/O error in the guest. 0 = no limit.
    #[arg(long, value_name = "SIZE", value_parser = zram::parse_size, default_value = "0")]
    pub mem_limit: u64,

    /// File that `vzram writeback` moves idle or huge pages to (created sparse, 0600). One
    /// device only: with several --device, give each its own `backing-file=`. A file that
    /// already holds data is refused unless --backing-file-overwrite is given.
    #[arg(long, value_name = "PATH")]
    pub backing_file: Option<PathBuf>,

    /// Use backing files (--backing-file, `backing-file=`) that already hold data: their
    /// content is overwritten (what a previous daemon wrote back is lost anyway).
    #[arg(long)]
    pub backing_file_overwrite: bool,

    /// Keep the store (pool, slot tables, counters) in files in DIR (tmpfs: /dev/shm, /run),
    /// so that a restart, an upgrade or a crash of the daemon costs no guest a page: started
    /// again with the same options, vzram attaches to DIR and serves the same data. Created
    /// 0700 if missing; locked while in use. Devices are matched by name.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Offer the disk read-only (VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,

    /// Serial number the guest reads (GET_ID; /sys/block/vdX/serial), at most 20 bytes.
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Logical block size the guest uses: 4096 (pages, the default) or 512.
    #[arg(long, value_name = "BYTES", default_value_t = 4096, value_parser = parse_blk_size)]
    pub blk_size: u32,

    /// Mode of the vhost-user sockets, octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Group of the vhost-user sockets (name or id), with --socket-mode 0660 for a QEMU that
    /// runs in that group (libvirt: kvm or libvirt-qemu). Per device: `socket-group=`.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Mode of the control socket, octal. Whoever may connect can change the memory limit,
    /// start writeback and read every statistic.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub control_mode: u32,

    /// Group of the control socket (name or id), with --control-mode 0660.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Control socket for `vzram stat` and friends [default: vzram.ctl beside the first
    /// device socket].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Longest zspage chain of the allocator, in pages (4..=16; Linux uses 8).
    #[arg(long, value_name = "PAGES", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(4..=16))]
    pub max_chain: u16,

    /// Microseconds a queue worker keeps watching its ring for the guest's next request
    /// after a batch before it sleeps (saves a kick and a wake-up per batch; 0 = never).
    #[arg(long, value_name = "US", default_value_t = crate::daemon::DEFAULT_POLL.as_micros() as u64)]
    pub poll_us: u64,

    /// Run the tiering policy: compaction when the pool fragments, recompression of cold
    /// pages with the first --recomp algorithm, writeback of cold pages to the backing files
    /// when memory runs short (`vzram policy` shows and changes it at run time)
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set,
          value_parser = crate::control::parse_on_off)]
    pub policy: bool,

    #[command(flatten)]
    pub policy_knobs: crate::control::PolicyKnobs,

    /// Where the host's memory pressure is read (PSI); a missing or unreadable file leaves
    /// the policy to the watermarks
    #[arg(long, value_name = "PATH", default_value = zram::policy::DEFAULT_PSI_PATH)]
    pub psi_file: PathBuf,
}

const SERVE_EXAMPLES: &str = "\
Examples:
  vzram serve --socket /run/vzram/vz0.sock --size 8G --mem-limit 4G
  vzram serve --comp zstd:3 --recomp zstd:9 \\
      --device socket=/run/vzram/vm1.sock,size=4G --device socket=/run/vzram/vm2.sock,size=4G

Then in QEMU (guest memory must be shared):
  -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem
  -chardev socket,id=vz0,path=/run/vzram/vz0.sock,reconnect=1
  -device vhost-user-blk-pci,chardev=vz0,num-queues=4
and in the guest: echo 0 > /sys/block/vda/queue/rotational; mkswap /dev/vda; swapon --discard /dev/vda";

/// One device as given by `--device` or by `--socket` + `--size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub socket: PathBuf,
    pub size: u64,
    pub name: Option<String>,
    pub readonly: Option<bool>,
    pub serial: Option<String>,
    pub backing_file: Option<PathBuf>,
    pub blk_size: Option<u32>,
    pub num_queues: Option<u16>,
    pub socket_group: Option<String>,
    /// `mem-limit=`: the device's own memory limit in bytes, inside the store's.
    pub mem_limit: Option<u64>,
}

impl DeviceSpec {
    /// A device with every option left to the command line's flags.
    fn new(socket: PathBuf, size: u64) -> DeviceSpec {
        DeviceSpec {
            socket,
            size,
            name: None,
            readonly: None,
            serial: None,
            backing_file: None,
            blk_size: None,
            num_queues: None,
            socket_group: None,
            mem_limit: None,
        }
    }
}

fn parse_disk_size(s: &str) -> Result<u64, String> {
    let n = zram::parse_size(s).map_err(|e| e.to_string())?;
    if n == 0 || n % PAGE_SIZE != 0 {
        return Err(format!(
            "{s:?}: a disk size must be a non-zero multiple of 4 KiB"
        ));
    }
    Ok(n)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(q) if q.is_power_of_two() && (2..=1024).contains(&q) => Ok(q),
        _ => Err(format!(
            "{s:?}: the queue size must be a power of two from 2 to 1024"
        )),
    }
}

fn parse_blk_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("{s:?}: the block size must be 512 or 4096")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?}: expected an octal mode such as 0600"))
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("{s:?}: a serial has at most 20 bytes"));
    }
    Ok(s.to_string())
}

fn parse_algorithm(s: &str) -> Result<zcomp::Params, String> {
    // Name, level and options are checked here; the backend (and a dictionary file) is built
    // once, with the store.
    let params: zcomp::Params = s.parse().map_err(|e: zcomp::ConfigError| e.to_string())?;
    params.validate().map_err(|e| e.to_string())?;
    Ok(params)
}

fn parse_device_spec(s: &str) -> Result<DeviceSpec, String> {
    let (mut socket, mut size) = (None, None);
    let mut spec = DeviceSpec::new(PathBuf::new(), 0);
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let need = |v: &str| {
            if v.is_empty() {
                Err(format!("{key}= needs a value"))
            } else {
                Ok(v.to_string())
            }
        };
        match key {
            "socket" => socket = Some(PathBuf::from(need(value)?)),
            "size" => size = Some(parse_disk_size(value)?),
            "name" => spec.name = Some(need(value)?),
            "readonly" => {
                spec.readonly = Some(match value {
                    "" | "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("readonly={value}: expected on or off")),
                })
            }
            "serial" => spec.serial = Some(parse_serial(value)?),
            "backing-file" => spec.backing_file = Some(PathBuf::from(need(value)?)),
            "socket-group" => spec.socket_group = Some(need(value)?),
            "mem-limit" => {
                spec.mem_limit =
                    Some(zram::parse_size(value).map_err(|e| format!("mem-limit: {e}"))?)
            }
            "blk-size" => spec.blk_size = Some(parse_blk_size(value)?),
            "num-queues" => {
                spec.num_queues = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_NUM_QUEUES).contains(n))
                        .ok_or_else(|| {
                            format!("num-queues={value}: expected 1..={MAX_NUM_QUEUES}")
                        })?,
                )
            }
            _ => {
                return Err(format!(
                    "unknown key {key:?} (known: socket, size, name, readonly, serial, backing-file, blk-size, num-queues, socket-group, mem-limit)"
                ));
            }
        }
    }
    spec.socket = socket.ok_or("socket=PATH is required")?;
    spec.size = size.ok_or("size=SIZE is required")?;
    Ok(spec)
}

/// What `serve` builds: one store and the devices on it.
#[derive(Debug)]
pub struct StoreAndDevices {
    pub store: Arc<zram::Store>,
    pub devices: Vec<(Arc<BlkDevice>, ConfigSpace)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("give --socket and --size, or at least one --device")]
    NoDevice,
    #[error("{0}")]
    Policy(String),
    #[error("two devices use the socket {0}")]
    DuplicateSocket(PathBuf),
    #[error("two devices are named {0}")]
    DuplicateName(String),
    #[error(
        "--backing-file serves one device; with several --device give each its own backing-file=PATH"
    )]
    SharedBackingFile,
    #[error("two devices use the backing file {0}")]
    DuplicateBackingFile(PathBuf),
    #[error(
        "device {name}: backing file {}: holds data ({what}); give --backing-file-overwrite to reuse it", path.display()
    )]
    BackingFileHoldsData {
        name: String,
        path: PathBuf,
        what: String,
    },
    #[error("device {name}: backing file {source}")]
    BackingFile {
        name: String,
        source: std::io::Error,
    },
    #[error("compression: {0}")]
    Comp(#[from] zcomp::ConfigError),
    #[error("device {name}: {source}")]
    Device { name: String, source: zram::Error },
    #[error("store: {0}")]
    Store(zram::Error),
    #[error("{0}")]
    State(zram::Error),
    #[error("{}: the control socket cannot also be the socket of device {name}", path.display())]
    ControlIsDeviceSocket { path: PathBuf, name: String },
    #[error("{what}: {source}")]
    Group {
        what: String,
        source: crate::sockets::SocketError,
    },
}

/// Parses the command line of `program`. `--help` and `--version` print and exit 0; an
/// argument error is one line (clap's first, without its "error: "), exit status 2, as for
/// every other error of our programs.
pub fn parse_or_exit<P: clap::Parser>(program: &str) -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or_default();
            eprintln!(
                "{program}: {}",
                line.strip_prefix("error: ").unwrap_or(line)
            );
            std::process::exit(2)
        }
    }
}

/// One device with every setting resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub name: String,
    pub socket: PathBuf,
    pub size: u64,
    pub readonly: bool,
    /// What GET_ID returns (at most 20 bytes).
    pub serial: String,
    pub backing_file: Option<PathBuf>,
    pub blk_size: u32,
    pub num_queues: u16,
    /// The group the socket is given to (`socket-group=` or `--socket-group`), as an id.
    pub socket_group: Option<u32>,
    /// The device's own memory limit in bytes (`mem-limit=`); 0 = only the store's.
    pub mem_limit: u64,
}

/// `vzram serve`'s configuration, resolved and checked once from the arguments: every device
/// with every setting filled in, the algorithms parsed, the control socket's path decided.
#[derive(Debug)]
pub struct Config {
    pub devices: Vec<DeviceConfig>,
    pub comp: zcomp::Params,
    pub recomp: Vec<zcomp::Params>,
    pub store: zram::StoreConfig,
    pub queue_size: u16,
    pub backing_file_overwrite: bool,
    pub state_dir: Option<PathBuf>,
    pub socket_mode: u32,
    pub control: PathBuf,
    pub control_mode: u32,
    /// The group the control socket is given to (`--control-group`), as an id.
    pub control_group: Option<u32>,
    /// How long a queue worker watches its ring after a batch.
    pub poll: Duration,
    /// The tiering policy and where it reads memory pressure.
    pub policy: crate::control::PolicySetup,
}

impl TryFrom<&ServeArgs> for Config {
    type Error = BuildError;

    fn try_from(args: &ServeArgs) -> Result<Config, BuildError> {
        let mut specs = args.device.clone();
        if let (Some(socket), Some(size)) = (&args.socket, args.size) {
            specs.push(DeviceSpec::new(socket.clone(), size));
        }
        if specs.is_empty() {
            return Err(BuildError::NoDevice);
        }
        if args.backing_file.is_some() && specs.len() > 1 {
            return Err(BuildError::SharedBackingFile);
        }
        let socket_group = group_id("--socket-group", args.socket_group.as_deref())?;
        let devices: Vec<DeviceConfig> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let name = spec.name.unwrap_or_else(|| format!("vz{i}"));
                let what = format!("device {name}: socket-group");
                Ok(DeviceConfig {
                    socket_group: group_id(&what, spec.socket_group.as_deref())?.or(socket_group),
                    serial: spec
                        .serial
                        .or_else(|| args.serial.clone())
                        .unwrap_or_else(|| format!("vzram-{name}")),
                    name,
                    socket: spec.socket,
                    size: spec.size,
                    readonly: spec.readonly.unwrap_or(args.readonly),
                    // Only one device exists when --backing-file is given (checked above).
                    backing_file: spec.backing_file.or_else(|| args.backing_file.clone()),
                    blk_size: spec.blk_size.unwrap_or(args.blk_size),
                    num_queues: spec.num_queues.unwrap_or(args.num_queues),
                    mem_limit: spec.mem_limit.unwrap_or(0),
                })
            })
            .collect::<Result<_, BuildError>>()?;
        for (i, a) in devices.iter().enumerate() {
            for b in &devices[..i] {
                if a.socket == b.socket {
                    return Err(BuildError::DuplicateSocket(a.socket.clone()));
                }
                if a.name == b.name {
                    return Err(BuildError::DuplicateName(a.name.clone()));
                }
                if let Some(path) = &a.backing_file
                    && b.backing_file.as_ref() == Some(path)
                {
                    return Err(BuildError::DuplicateBackingFile(path.clone()));
                }
            }
        }
        let control = args
            .control
            .clone()
            .unwrap_or_else(|| default_control_path(&devices[0].socket));
        if let Some(d) = devices.iter().find(|d| d.socket == control) {
            return Err(BuildError::ControlIsDeviceSocket {
                path: control,
                name: d.name.clone(),
            });
        }
        Ok(Config {
            devices,
            comp: args.comp.clone(),
            recomp: args.recomp.clone(),
            store: zram::StoreConfig {
                max_chain: usize::from(args.max_chain),
                mem_limit: args.mem_limit,
                ..zram::StoreConfig::default()
            },
            queue_size: args.queue_size,
            backing_file_overwrite: args.backing_file_overwrite,
            state_dir: args.state_dir.clone(),
            socket_mode: args.socket_mode,
            control,
            control_mode: args.control_mode,
            control_group: group_id("--control-group", args.control_group.as_deref())?,
            poll: Duration::from_micros(args.poll_us),
            policy: {
                let mut config = args.policy_knobs.apply(Default::default());
                config.enabled = args.policy;
                config
                    .validate()
                    .map_err(|e| BuildError::Policy(e.to_string()))?;
                crate::control::PolicySetup {
                    config,
                    psi_file: args.psi_file.clone(),
                }
            },
        })
    }
}

/// The id of the group `name` given to `what` (a flag or a device's key), if any.
fn group_id(what: &str, name: Option<&str>) -> Result<Option<u32>, BuildError> {
    name.map(crate::sockets::group_id)
        .transpose()
        .map_err(|source| BuildError::Group {
            what: what.to_string(),
            source,
        })
}

/// The default control socket: `vzram.ctl` beside the first device socket.
fn default_control_path(first_socket: &Path) -> PathBuf {
    first_socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("vzram.ctl")
}

impl Config {
    /// The control plane's settings.
    pub fn control_config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(self.control.clone());
        config.mode = self.control_mode;
        config.policy = self.policy.clone();
        config
    }

    /// Builds the shared store and the devices (and opens their backing files).
    pub fn build(&self) -> Result<StoreAndDevices, BuildError> {
        // A state's backing files hold its written-back pages: they are its own to reuse.
        let attaching = self
            .state_dir
            .as_ref()
            .is_some_and(|d| d.join(zram::state::HEADER).exists());
        if !self.backing_file_overwrite && !attaching {
            for d in &self.devices {
                if let Some(path) = &d.backing_file
                    && let Some(what) =
                        zram::backing_file_data(path).map_err(|source| BuildError::BackingFile {
                            name: d.name.clone(),
                            source,
                        })?
                {
                    return Err(BuildError::BackingFileHoldsData {
                        name: d.name.clone(),
                        path: path.clone(),
                        what,
                    });
                }
            }
        }
        let comp = Arc::new(zcomp::Comp::with_secondaries(&self.comp, &self.recomp)?);
        let config = |d: &DeviceConfig| zram::Config {
            size: d.size,
            backing_file: d.backing_file.clone(),
        };
        let (store, zdevices) = if let Some(dir) = &self.state_dir {
            let specs: Vec<_> = self
                .devices
                .iter()
                .map(|d| zram::state::DeviceSpec {
                    name: d.name.clone(),
                    config: config(d),
                    comp: comp.clone(),
                })
                .collect();
            let o = zram::state::open(dir, &self.store, &specs).map_err(BuildError::State)?;
            for w in &o.warnings {
                log::warn!("{w}");
            }
            log::info!(
                "state {}: {:?}, {} pages stored, attached in {:.1} ms",
                dir.display(),
                o.attach,
                o.pages,
                o.took.as_secs_f64() * 1e3
            );
            (o.store, o.devices)
        } else {
            let store = Arc::new(zram::Store::new(self.store.clone()).map_err(BuildError::Store)?);
            let mut devices = Vec::new();
            for d in &self.devices {
                devices.push(
                    zram::Device::new(store.clone(), comp.clone(), config(d)).map_err(
                        |source| BuildError::Device {
                            name: d.name.clone(),
                            source,
                        },
                    )?,
                );
            }
            (store, devices)
        };
        let mut devices = Vec::new();
        for (d, device) in self.devices.iter().zip(zdevices) {
            device.set_mem_limit(d.mem_limit);
            let served = BlkDevice::new(
                d.name.clone(),
                d.socket.clone(),
                device,
                usize::from(d.num_queues),
                d.readonly,
                d.serial.clone(),
            );
            let blk = ConfigSpace {
                size: d.size,
                blk_size: d.blk_size,
                num_queues: d.num_queues,
                queue_size: self.queue_size,
            };
            devices.push((served, blk));
        }
        Ok(StoreAndDevices { store, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_every_key() {
        let d = parse_device_spec(
            "socket=/tmp/a.sock,size=1G,name=vm1,readonly,serial=abc,backing-file=/tmp/b,blk-size=512,num-queues=4,socket-group=kvm,mem-limit=1.5G",
        )
        .unwrap();
        assert_eq!(d.mem_limit, Some(3 << 29));
        assert_eq!(d.socket_group.as_deref(), Some("kvm"));
        assert_eq!(d.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(d.size, 1 << 30);
        assert_eq!(d.name.as_deref(), Some("vm1"));
        assert_eq!(d.readonly, Some(true));
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.blk_size, Some(512));
        assert_eq!(d.num_queues, Some(4));
    }

    #[test]
    fn device_spec_errors_are_clear() {
        for (spec, needle) in [
            ("size=1G", "socket=PATH is required"),
            ("socket=/a", "size=SIZE is required"),
            ("socket=/a,size=1000", "multiple of 4 KiB"),
            ("socket=/a,size=1G,colour=red", "unknown key \"colour\""),
            ("socket=/a,size=1G,num-queues=0", "num-queues=0"),
            (
                "socket=/a,size=1G,mem-limit=lots",
                "mem-limit: size \"lots\"",
            ),
            ("socket=,size=1G", "socket= needs a value"),
            (
                "socket=/a,size=1G,serial=123456789012345678901",
                "at most 20 bytes",
            ),
        ] {
            let e = parse_device_spec(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn value_parsers_reject_nonsense() {
        assert!(parse_queue_size("100").is_err());
        assert_eq!(parse_queue_size("128"), Ok(128));
        assert!(parse_mode("0999").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_algorithm("lz5").is_err());
        assert!(parse_algorithm("zstd:3").is_ok());
        assert!(parse_disk_size("0").is_err());
        assert_eq!(parse_disk_size("8G"), Ok(8 << 30));
    }

    fn config(a: &ServeArgs) -> Result<Config, BuildError> {
        Config::try_from(a)
    }

    #[test]
    fn every_device_setting_is_resolved_once() {
        let c = config(&serve_args(
            "--device socket=/r/a.sock,size=1G,name=vm1,num-queues=2 --device socket=/r/b.sock,size=2G,readonly,blk-size=512 --serial S --num-queues 4 --poll-us 0 --policy off --idle-age 30s --high-watermark 0.95 --psi-file /nonexistent",
        ))
        .unwrap();
        assert_eq!(c.devices[0].name, "vm1");
        assert_eq!(c.devices[1].name, "vz1");
        assert_eq!((c.devices[0].num_queues, c.devices[1].num_queues), (2, 4));
        assert_eq!(
            (c.devices[0].readonly, c.devices[1].readonly),
            (false, true)
        );
        assert_eq!((c.devices[0].blk_size, c.devices[1].blk_size), (4096, 512));
        assert_eq!(c.devices[1].serial, "S");
        assert_eq!(c.control, PathBuf::from("/r/vzram.ctl"));
        assert_eq!(c.poll, Duration::ZERO);
        let p = &c.policy.config;
        assert!(!p.enabled);
        assert_eq!(p.idle_age, Duration::from_secs(30));
        assert_eq!(p.high_watermark, 0.95);
        // What was not given keeps the policy's default.
        assert_eq!(
            p.low_watermark,
            zram::policy::PolicyConfig::default().low_watermark
        );
        assert_eq!(c.policy.psi_file, PathBuf::from("/nonexistent"));
        let c = config(&serve_args("--socket a.sock --size 1G")).unwrap();
        assert_eq!(c.devices[0].serial, "vzram-vz0");
        assert_eq!(c.control, PathBuf::from("./vzram.ctl"));
        assert_eq!(c.poll, crate::daemon::DEFAULT_POLL);
        assert_eq!(c.policy.config, zram::policy::PolicyConfig::default());
        let e = config(&serve_args(
            "--socket a.sock --size 1G --high-watermark 0.5 --low-watermark 0.7",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("low_watermark"), "{e}");
        let e = config(&serve_args(
            "--socket /r/a.sock --size 1G --control /r/a.sock",
        ));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("cannot also be the socket")
        );
    }

    fn serve_args(args: &str) -> ServeArgs {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Cli::try_parse_from(std::iter::once("serve").chain(args.split_whitespace()))
            .unwrap()
            .serve
    }

    #[test]
    fn control_mode_is_its_own_flag() {
        let a = serve_args("--socket /tmp/a --size 1G --socket-mode 0666");
        assert_eq!((a.socket_mode, a.control_mode), (0o666, 0o600));
        let a = serve_args("--socket /tmp/a --size 1G --control-mode 0660");
        assert_eq!((a.socket_mode, a.control_mode), (0o600, 0o660));
    }

    #[test]
    fn socket_groups_resolve_once_per_device_and_unknown_ones_are_named() {
        let c = config(&serve_args(
            "--device socket=/r/a,size=1G,socket-group=0 --device socket=/r/b,size=1G --socket-group root --control-group 0",
        ))
        .unwrap();
        assert_eq!(c.devices[0].socket_group, Some(0));
        assert_eq!(c.devices[1].socket_group, Some(0));
        assert_eq!(c.control_group, Some(0));
        let c = config(&serve_args("--socket /r/a --size 1G")).unwrap();
        assert_eq!((c.devices[0].socket_group, c.control_group), (None, None));
        for (args, want) in [
            (
                "--socket /r/a --size 1G --socket-group no-such-group-vzram",
                "--socket-group: unknown group \"no-such-group-vzram\"",
            ),
            (
                "--device socket=/r/a,size=1G,name=vm1,socket-group=nope-vzram",
                "device vm1: socket-group: unknown group \"nope-vzram\"",
            ),
            (
                "--socket /r/a --size 1G --control-group nope-vzram",
                "--control-group: unknown group \"nope-vzram\"",
            ),
        ] {
            assert_eq!(config(&serve_args(args)).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn backing_file_goes_with_one_device() {
        let a = serve_args("--socket /tmp/a --size 1G --backing-file /tmp/b");
        assert_eq!(
            config(&a).unwrap().devices[0].backing_file.as_deref(),
            Some(std::path::Path::new("/tmp/b"))
        );
        let a = serve_args(
            "--device socket=/tmp/a,size=1G --device socket=/tmp/c,size=1G --backing-file /tmp/b",
        );
        let e = config(&a).unwrap_err().to_string();
        assert!(e.contains("backing-file=PATH"), "{e}");
        let a = serve_args(
            "--device socket=/tmp/a,size=1G,backing-file=/tmp/b1 --device socket=/tmp/c,size=1G,backing-file=/tmp/b2",
        );
        let devices = config(&a).unwrap().devices;
        assert_eq!(devices[1].backing_file, Some(PathBuf::from("/tmp/b2")));
        let a = serve_args(
            "--device socket=/tmp/a,size=1G,backing-file=/tmp/b --device socket=/tmp/c,size=1G,backing-file=/tmp/b",
        );
        let e = config(&a).unwrap_err().to_string();
        assert_eq!(e, "two devices use the backing file /tmp/b");
    }

    #[test]
    fn a_backing_file_with_data_needs_the_overwrite_flag() {
        let dir = std::env::temp_dir().join(format!("vzram-cli-backing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let backing = dir.join("b");
        std::fs::write(&backing, [5u8; 8192]).unwrap();
        let args = format!(
            "--socket {} --size 1M --backing-file {}",
            dir.join("s").display(),
            backing.display()
        );
        let e = config(&serve_args(&args))
            .and_then(|c| c.build())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "device vz0: backing file {}: holds data (8192 bytes",
                backing.display()
            )) && e.ends_with("give --backing-file-overwrite to reuse it"),
            "{e}"
        );
        assert_eq!(std::fs::read(&backing).unwrap(), [5u8; 8192]);
        let built = config(&serve_args(&format!("{args} --backing-file-overwrite")))
            .and_then(|c| c.build())
            .unwrap();
        assert_eq!(built.devices.len(), 1);
        // Errors name the path.
        let missing = dir.join("no-such-dir/b");
        let e = config(&serve_args(&format!(
            "--socket {} --size 1M --backing-file {}",
            dir.join("s").display(),
            missing.display()
        )))
        .and_then(|c| c.build())
        .unwrap_err()
        .to_string();
        assert!(e.contains(&*missing.to_string_lossy()), "{e}");
        drop(built);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_printed_by_stat_parse_back() {
        // Whole numbers of their unit parse back exactly, up to the largest size ("16E").
        for shift in (0..=60).step_by(10) {
            for k in [1u64, 3, 512, 1000, 1023] {
                if let Some(n) = k.checked_mul(1 << shift) {
                    assert_eq!(zram::parse_size(&crate::table::human_size(n)).unwrap(), n);
                }
            }
        }
        assert_eq!(crate::table::human_size(u64::MAX), "16E");
        assert_eq!(zram::parse_size("16E").unwrap(), u64::MAX);
    }

    mod roundtrip {
        use proptest::prelude::*;

        proptest! {
            /// Any size: what is printed parses back to within the printer's rounding (a tenth of
            /// the unit, rounded to nearest: at most 0.05 of the unit, plus the printer's
            /// truncation to thousandths before rounding and a byte).
            #[test]
            fn printed_sizes_parse_back_within_the_rounding(
                n in prop_oneof![
                    any::<u64>(),
                    0u64..1 << 20,
                    (0u32..64).prop_flat_map(|b| 0u64..=(u64::MAX >> b)),
                ]
            ) {
                let printed = crate::table::human_size(n);
                let back = zram::parse_size(&printed).unwrap();
                let unit = (10..=60).step_by(10).find(|&s| n < 1u64 << s).map_or(1u64 << 60, |s| 1u64 << (s - 10));
                let tolerance = unit / 1000 * 51 + 1;
                prop_assert!(back.abs_diff(n) <= tolerance, "{n} printed {printed} parsed {back}");
            }
        }
    }
}
