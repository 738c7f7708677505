//! A store that outlives its process: the state directory (`vzram serve --state-dir DIR`).
//!
//! # Layout
//!
//! DIR (0700, files 0600) holds:
//!
//! - `state.json`: the header. `magic` (`"vzram-state"`), `version` ([`VERSION`]),
//!   `page_size`, a random `id` that every data file repeats, the pool's geometry
//!   (`max_chain`, `capacity_pages`), the algorithm of each priority (a page compressed by one
//!   must be decompressed by the same), the devices (`name`, `pages`, `backing_file`,
//!   `born_unix`: the origin of their access times) and `clean`: true only after a clean
//!   shutdown. It is replaced whole (written beside, renamed over), never edited in place.
//! - `pool.pages`, `pool.zspages`, `pool.handles`: the allocator's page arena, zspage records
//!   and handle table (zsmalloc's [`zsmalloc::PoolFiles`]).
//! - `device-N.slots`: device N's counters (page 1) and slot table (16 bytes per page, from
//!   page 2 on).
//! - `lock`: held (`flock`) by the daemon using the state, so two never share one.
//!
//! Each data file starts with a 64-byte head ([`FileHead`]: magic `VZRAMST\0`, version, kind,
//! state id) in a page of its own; data starts at 4096 (pool files) or 8192 (slot files).
//! Everything else is mapped shared and addressed by offsets (indices), never by pointers, so
//! a new process maps the same bytes at any address. The files are sparse: they cost only what
//! is stored, and freed pool pages are punched out of `pool.pages`.
//!
//! # Consistency
//!
//! The slot tables are the truth. A page's object is written whole, and its handle entry
//! names it, before the slot's 16-byte entry is stored in one instruction (see `slot.rs`) and
//! the guest is answered; the old object is freed only after. So a process killed at any
//! instruction leaves every slot holding either its old or its new page, and every page a
//! guest saw written is in place. Attaching always runs the same recovery, crash or not: the
//! slots name the live handles, zsmalloc rebuilds everything derived from them
//! ([`zsmalloc::Pool::recover`]: free lists, counters, dropped orphans, cleared locks),
//! the slots' own locks and maintenance marks are cleared, and the counters that describe
//! what is stored are recounted. `clean` only says which of the two it was.
//!
//! Files in tmpfs survive any death of the process (SIGKILL, abort, the OOM killer) but not a
//! reboot or power loss: that is out of scope. On a disk file system the state works, through
//! the page cache, and [`Opened::warnings`] says so; hugetlbfs is refused (its files map only
//! at huge-page offsets).
//!
//! One directory holds the whole pool: the devices of a daemon share one allocator, so their
//! slot tables and its files belong together.

use crate::backing::Backing;
use crate::device::Device;
use crate::slot::{self, Slot, State};
use crate::stats::Counters;
use crate::{AllocError, Config, Error, PAGE_SIZE, Store, StoreConfig};
use region::Region;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use zcomp::{Comp, Priority};
use zsmalloc::{Handle, Pool, PoolFiles};

/// The layout version this build reads and writes.
pub const VERSION: u32 = 1;
const MAGIC: &str = "vzram-state";
const FILE_MAGIC: u64 = u64::from_le_bytes(*b"VZRAMST\0");
/// The header's file name in the state directory.
pub const HEADER: &str = "state.json";
/// Pool files: data after one head page. Slot files: a head page, a counters page, slots.
const POOL_DATA: u64 = PAGE_SIZE as u64;
const COUNTERS_AT: u64 = PAGE_SIZE as u64;
const SLOTS_AT: u64 = 2 * PAGE_SIZE as u64;

/// The head of every data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileHead {
    magic: u64,
    version: u32,
    kind: u32,
    id: u64,
}

impl FileHead {
    fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.to_le_bytes());
        b[16..].copy_from_slice(&self.id.to_le_bytes());
        b
    }

    fn parse(b: &[u8; 24]) -> FileHead {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        FileHead {
            magic: u64_at(0),
            version: u32_at(8),
            kind: u32_at(12),
            id: u64_at(16),
        }
    }
}

/// File kinds: 1..=3 the pool's files, 16 + N device N's slots.
const KIND_PAGES: u32 = 1;
const KIND_ZSPAGES: u32 = 2;
const KIND_HANDLES: u32 = 3;
const KIND_DEVICE: u32 = 16;

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    magic: String,
    version: u32,
    page_size: usize,
    id: u64,
    clean: bool,
    max_chain: usize,
    capacity_pages: usize,
    /// Algorithm names by priority (index 0 is the primary).
    algorithms: Vec<Option<String>>,
    devices: Vec<DeviceHeader>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceHeader {
    name: String,
    pages: u64,
    backing_file: Option<PathBuf>,
    born_unix: u64,
}

/// A device to open in a state directory: its name (how a restarted daemon finds it again),
/// its configuration and its compressor.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub name: String,
    pub config: Config,
    pub comp: Arc<Comp>,
}

/// How the state was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A new, empty state.
    Created,
    /// The previous daemon shut down cleanly.
    Clean,
    /// The previous daemon died (or is an older build that crashed): recovered.
    Recovered,
}

/// A store and its devices opened in a state directory.
#[derive(Debug)]
pub struct Opened {
    pub store: Arc<Store>,
    /// In the order of the specs given, registered in the store.
    pub devices: Vec<Arc<Device>>,
    pub attach: Attach,
    /// Pages found stored (all devices), and how long attaching took.
    pub pages: u64,
    pub took: Duration,
    /// Things the operator should know (a state on a disk file system).
    pub warnings: Vec<String>,
}

/// The open state a store keeps: the lock, and what it needs to mark a clean shutdown.
#[derive(Debug)]
pub(crate) struct Held {
    dir: PathBuf,
    header: Header,
    _lock: File,
}

impl Held {
    /// Marks the state clean: called when the store goes away in an orderly way.
    pub(crate) fn mark_clean(&self) {
        let mut h = self.header.clone();
        h.clean = true;
        // Nothing to do about a failure here but leave the state marked in use, which only
        // means the next start calls it a recovery.
        let _ = write_header(&self.dir, &h);
    }
}

fn err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::State(format!("{}: {what}", path.display()))
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |e| err(path, e)
}

fn write_header(dir: &Path, h: &Header) -> Result<(), Error> {
    let path = dir.join(HEADER);
    let tmp = dir.join(format!("{HEADER}.new"));
    let mut text = serde_json::to_string_pretty(h).expect("a header serializes");
    text.push('\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn open_file(path: &Path, create: bool) -> Result<File, Error> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if create {
        o.create_new(true);
    }
    o.open(path).map_err(io_err(path))
}

fn write_head(f: &File, path: &Path, kind: u32, id: u64) -> Result<(), Error> {
    let head = FileHead {
        magic: FILE_MAGIC,
        version: VERSION,
        kind,
        id,
    };
    f.write_all_at(&head.bytes(), 0).map_err(io_err(path))
}

fn check_head(f: &File, path: &Path, kind: u32, id: u64) -> Result<(), Error> {
    let mut b = [0u8; 24];
    f.read_exact_at(&mut b, 0)
        .map_err(|e| err(path, format!("cannot read its head ({e}); truncated?")))?;
    let head = FileHead::parse(&b);
    if head.magic != FILE_MAGIC {
        return Err(err(path, "not a vzram state file (wrong magic)"));
    }
    if head.version != VERSION {
        return Err(err(
            path,
            format!(
                "layout version {}, this vzram reads {VERSION}",
                head.version
            ),
        ));
    }
    if head.kind != kind || head.id != id {
        return Err(err(path, "belongs to another state or is another file"));
    }
    Ok(())
}

fn algorithms(comp: &Comp) -> Vec<Option<String>> {
    (0..4)
        .map(|p| {
            Priority::new(p)
                .and_then(|p| comp.params(p))
                .map(|params| params.algorithm.to_string())
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a state directory is.
#[derive(Debug, PartialEq, Eq)]
enum Fs {
    /// tmpfs or ramfs: pages live in memory, the state costs what the heap would.
    Memory,
    /// hugetlbfs: its files map only at huge-page offsets, and the state's are 4 KiB aligned.
    Hugetlb,
    /// A disk file system: works, through the page cache.
    Disk,
}

fn file_system(dir: &Path) -> Result<Fs, Error> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| err(dir, "path contains a NUL byte"))?;
    // SAFETY: statfs is a plain C struct of integers, for which all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we pass, which is valid for writes; c is a valid
    // NUL-terminated path.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(err(dir, io::Error::last_os_error()));
    }
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    const HUGETLBFS: i64 = 0x9584_58f6;
    #[allow(clippy::unnecessary_cast, reason = "f_type is not i64 on every target")]
    let fs = st.f_type as i64;
    Ok(match fs {
        TMPFS | RAMFS => Fs::Memory,
        HUGETLBFS => Fs::Hugetlb,
        _ => Fs::Disk,
    })
}

/// Opens the store and devices kept in `dir`, creating the state if `dir` holds none.
///
/// Refused with one clear error naming the file: a state another process holds; a header or
/// file that is not vzram's, of another layout version, or truncated; a pool geometry,
/// algorithm, device list or device size other than `cfg` and `devices` give; a slot that
/// points nowhere. Nothing is changed by a refusal.
pub fn open(dir: &Path, cfg: &StoreConfig, devices: &[DeviceSpec]) -> Result<Opened, Error> {
    let start = Instant::now();
    if !slot::updates_are_atomic() {
        return Err(err(
            dir,
            "this CPU has no 16-byte atomic store (cmpxchg16b): a state directory would not \
             survive a crash",
        ));
    }
    let mut warnings = Vec::new();
    match std::fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(err(dir, "not a directory")),
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(dir))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?,
        Err(e) => return Err(err(dir, e)),
    }
    let fs = file_system(dir)?;
    if fs == Fs::Hugetlb {
        return Err(err(
            dir,
            "hugetlbfs cannot hold a state (its files map only at huge-page offsets); use \
             tmpfs (/dev/shm, /run)",
        ));
    }
    if fs == Fs::Disk {
        warnings.push(format!(
            "state directory {} is not on tmpfs: pages go through the disk's page cache",
            dir.display()
        ));
    }
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // SAFETY: flock on a file we hold; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(err(dir, "in use by another vzram (its lock is held)"));
    }

    let header_path = dir.join(HEADER);
    let algos = devices.first().map(|d| algorithms(&d.comp));
    if let Some(d) = devices.iter().find(|d| Some(algorithms(&d.comp)) != algos) {
        return Err(err(
            dir,
            format!("device {} uses other algorithms than the rest", d.name),
        ));
    }
    let (header, attach) = match std::fs::read(&header_path) {
        Ok(text) => {
            let h: Header = serde_json::from_slice(&text)
                .map_err(|e| err(&header_path, format!("not a vzram state header: {e}")))?;
            check_header(&h, &header_path, cfg, devices, algos.as_ref())?;
            let attach = if h.clean {
                Attach::Clean
            } else {
                Attach::Recovered
            };
            (h, attach)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(other) = std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .find(|n| n != "lock" && n != "state.json.new")
            {
                return Err(err(
                    dir,
                    format!(
                        "holds {} but no {HEADER}: not a vzram state (or a damaged one)",
                        other.to_string_lossy()
                    ),
                ));
            }
            let now = unix_now();
            let h = Header {
                magic: MAGIC.into(),
                version: VERSION,
                page_size: PAGE_SIZE,
                id: random_id(),
                clean: false,
                max_chain: cfg.max_chain,
                capacity_pages: cfg.capacity_pages,
                algorithms: algos.unwrap_or_default(),
                devices: devices
                    .iter()
                    .map(|d| DeviceHeader {
                        name: d.name.clone(),
                        pages: d.config.size / PAGE_SIZE as u64,
                        backing_file: d.config.backing_file.clone(),
                        born_unix: now,
                    })
                    .collect(),
            };
            (h, Attach::Created)
        }
        Err(e) => return Err(err(&header_path, e)),
    };
    let create = attach == Attach::Created;

    let pool_cfg = zsmalloc::Config {
        max_chain: cfg.max_chain,
        capacity_pages: cfg.capacity_pages,
        page_limit: cfg.capacity_pages,
    };
    let pool_file = |name: &str, kind: u32| -> Result<File, Error> {
        let path = dir.join(name);
        let f = open_file(&path, create)?;
        if create {
            write_head(&f, &path, kind, header.id)?;
        } else {
            check_head(&f, &path, kind, header.id)?;
        }
        Ok(f)
    };
    let files = PoolFiles {
        pages: pool_file("pool.pages", KIND_PAGES)?,
        zspages: pool_file("pool.zspages", KIND_ZSPAGES)?,
        handles: pool_file("pool.handles", KIND_HANDLES)?,
        offset: POOL_DATA,
    };

    // The slot tables first: they say which objects are live.
    let mut tables = Vec::new();
    for (i, d) in header.devices.iter().enumerate() {
        let path = dir.join(format!("device-{i}.slots"));
        let f = open_file(&path, create)?;
        let kind = KIND_DEVICE + i as u32;
        let want = SLOTS_AT + d.pages * 16;
        if create {
            write_head(&f, &path, kind, header.id)?;
            f.set_len(want).map_err(io_err(&path))?;
        } else {
            check_head(&f, &path, kind, header.id)?;
            let len = f.metadata().map_err(io_err(&path))?.len();
            if len != want {
                return Err(err(
                    &path,
                    format!("{len} bytes, a {}-page device needs {want}", d.pages),
                ));
            }
        }
        let (counters, slots) = {
            let map_err = io_err(&path);
            let counters: Region<Counters> =
                Region::map_file(f.try_clone().map_err(&map_err)?, COUNTERS_AT, 1)
                    .map_err(&map_err)?;
            let slots: Region<Slot> =
                Region::map_file(f, SLOTS_AT, d.pages as usize).map_err(&map_err)?;
            (counters, slots)
        };
        tables.push((path, slots, counters));
    }

    let pool = if create {
        Pool::create(pool_cfg, &files)
    } else {
        let mut live = Vec::new();
        for (path, slots, _) in &tables {
            collect_live(path, slots, &mut live)?;
        }
        Pool::recover(pool_cfg, &files, live)
    }
    .map_err(|e| match e {
        zsmalloc::Error::BadHandle { handle, why } => {
            let (path, page) = holder(&tables, handle);
            err(
                path,
                format!("page {page} holds handle {handle}, which {why}"),
            )
        }
        zsmalloc::Error::Corrupt(msg) => err(&dir.join("pool.zspages"), msg),
        zsmalloc::Error::File { what, source } => err(&dir.join(format!("pool.{what}")), source),
        e => Error::Alloc(AllocError(e)),
    })?;

    // From here on the state is ours: mark it in use before anything is served.
    let mut in_use = header.clone();
    in_use.clean = false;
    write_header(dir, &in_use)?;
    let store = Arc::new(Store::with_pool(
        pool,
        cfg.mem_limit,
        Some(Held {
            dir: dir.to_path_buf(),
            header: in_use,
            _lock: lock,
        }),
    ));

    let mut opened = Vec::new();
    let mut stored = 0;
    for ((spec, d), (path, slots, counters)) in devices.iter().zip(&header.devices).zip(tables) {
        let backing = spec
            .config
            .backing_file
            .as_deref()
            .map(|p| Backing::open(p, d.pages))
            .transpose()?;
        stored += recount(&path, &slots, counters.get(0), backing.as_ref())?;
        let age = Duration::from_secs(unix_now().saturating_sub(d.born_unix));
        let born = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        opened.push(Device::attach(
            store.clone(),
            spec.comp.clone(),
            slots,
            counters,
            backing,
            born,
        ));
    }
    Ok(Opened {
        store,
        devices: opened,
        attach,
        pages: stored,
        took: start.elapsed(),
        warnings,
    })
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        unix_now() ^ (std::process::id() as u64) << 32
    }
}

fn check_header(
    h: &Header,
    path: &Path,
    cfg: &StoreConfig,
    devices: &[DeviceSpec],
    algos: Option<&Vec<Option<String>>>,
) -> Result<(), Error> {
    if h.magic != MAGIC {
        return Err(err(path, "not a vzram state header (wrong magic)"));
    }
    if h.version != VERSION {
        return Err(err(
            path,
            format!("layout version {}, this vzram reads {VERSION}", h.version),
        ));
    }
    if h.page_size != PAGE_SIZE {
        return Err(err(path, format!("page size {}", h.page_size)));
    }
    if (h.max_chain, h.capacity_pages) != (cfg.max_chain, cfg.capacity_pages) {
        return Err(err(
            path,
            format!(
                "made with --max-chain {} and a capacity of {} pages; this start asks for {} \
                 and {}",
                h.max_chain, h.capacity_pages, cfg.max_chain, cfg.capacity_pages
            ),
        ));
    }
    if let Some(a) = algos
        && *a != h.algorithms
    {
        let show = |v: &Vec<Option<String>>| {
            v.iter()
                .map(|a| a.as_deref().unwrap_or("-"))
                .collect::<Vec<_>>()
                .join(",")
        };
        return Err(err(
            path,
            format!(
                "pages were compressed with {} (by priority); this start configures {}",
                show(&h.algorithms),
                show(a)
            ),
        ));
    }
    let names = |v: Vec<String>| v.join(", ");
    let theirs: Vec<String> = h
        .devices
        .iter()
        .map(|d| format!("{} ({} pages)", d.name, d.pages))
        .collect();
    let ours: Vec<String> = devices
        .iter()
        .map(|d| format!("{} ({} pages)", d.name, d.config.size / PAGE_SIZE as u64))
        .collect();
    if theirs != ours {
        return Err(err(
            path,
            format!(
                "holds devices {}; this start configures {}",
                names(theirs),
                names(ours)
            ),
        ));
    }
    for (d, spec) in h.devices.iter().zip(devices) {
        if d.backing_file != spec.config.backing_file {
            return Err(err(
                path,
                format!(
                    "device {} wrote back to {}; this start gives {}",
                    d.name,
                    d.backing_file
                        .as_deref()
                        .map_or("no backing file".into(), |p| p.display().to_string()),
                    spec.config
                        .backing_file
                        .as_deref()
                        .map_or("none".into(), |p| p.display().to_string())
                ),
            ));
        }
    }
    Ok(())
}

/// The handles a slot table holds; a slot that cannot be is an error naming the file.
fn collect_live(path: &Path, slots: &Region<Slot>, live: &mut Vec<Handle>) -> Result<(), Error> {
    for i in 0..slots.capacity() {
        let e = slots.get(i).peek();
        let bad = |why: &str| err(path, format!("page {i}: {why}"));
        match e.state_checked() {
            None => return Err(bad("unknown slot state")),
            Some(State::Compressed | State::Huge) => {
                let h = Handle::from_raw(u32::try_from(e.data).map_err(|_| bad("bad handle"))?)
                    .ok_or_else(|| bad("no handle"))?;
                live.push(h);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The slot file and page that hold `handle` (for an error message).
fn holder(tables: &[(PathBuf, Region<Slot>, Region<Counters>)], handle: u32) -> (&Path, usize) {
    for (path, slots, _) in tables {
        for i in 0..slots.capacity() {
            let e = slots.get(i).peek();
            if matches!(e.state_checked(), Some(State::Compressed | State::Huge))
                && e.data == handle as u64
            {
                return (path, i);
            }
        }
    }
    unreachable!("handle {handle} came from a slot")
}

/// Clears what the dead process held in the slots (locks, maintenance marks), checks what a
/// pool cannot, and recounts what is stored. Returns the pages stored.
fn recount(
    path: &Path,
    slots: &Region<Slot>,
    c: &Counters,
    backing: Option<&Backing>,
) -> Result<u64, Error> {
    let (mut stored, mut compr, mut same, mut huge, mut bd) = (0, 0, 0, 0, 0);
    let mut blocks = Vec::new();
    for i in 0..slots.capacity() {
        let e = slots.get(i).reset();
        match e.state() {
            State::Empty => continue,
            State::Same => same += 1,
            State::Compressed => compr += e.len() as u64,
            State::Huge => {
                compr += PAGE_SIZE as u64;
                huge += 1;
            }
            State::WrittenBack => {
                let Some(b) = backing else {
                    return Err(err(
                        path,
                        format!("page {i} was written back, and no backing file is configured"),
                    ));
                };
                if !b.holds(e.data) {
                    return Err(err(
                        path,
                        format!("page {i} is in backing block {}, beyond the file", e.data),
                    ));
                }
                blocks.push(e.data);
                bd += 1;
            }
        }
        stored += 1;
    }
    if let Some(b) = backing {
        b.restore(&mut blocks);
    }
    c.pages_stored.store(stored, Relaxed);
    c.compr_data_size.store(compr, Relaxed);
    c.same_pages.store(same, Relaxed);
    c.huge_pages.store(huge, Relaxed);
    c.bd_count.store(bd, Relaxed);
    Ok(stored)
}
