//! A store in a state directory: a restart serves every page, a state that is not ours is
//! refused, and a process killed (SIGKILL) at random moments under load never loses a write it
//! acknowledged.

mod common;

use common::{TempFile, comp, versioned};
use pagemix::SplitMix64;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use zcomp::{Comp, Priority};
use zram::state::{self, Attach, DeviceSpec, Opened};
use zram::{Config, PAGE_SIZE, PageFilter, StoreConfig};

const PAGES: u64 = 2048;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let t = TempFile::new(tag);
        TempDir(t.0.with_extension("state"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg() -> StoreConfig {
    StoreConfig {
        max_chain: 8,
        capacity_pages: 1 << 14,
        mem_limit: 0,
    }
}

fn specs(comp: &Arc<Comp>, backing: Option<&Path>) -> Vec<DeviceSpec> {
    vec![
        DeviceSpec {
            name: "vm1".into(),
            config: Config {
                size: PAGES * PAGE_SIZE as u64,
                backing_file: backing.map(Path::to_path_buf),
            },
            comp: comp.clone(),
        },
        DeviceSpec {
            name: "vm2".into(),
            config: Config {
                size: 64 * PAGE_SIZE as u64,
                backing_file: None,
            },
            comp: comp.clone(),
        },
    ]
}

fn open(dir: &Path, backing: Option<&Path>) -> Result<Opened, zram::Error> {
    state::open(dir, &cfg(), &specs(&comp(3), backing))
}

fn read(o: &Opened, dev: usize, i: u64) -> [u8; PAGE_SIZE] {
    let d = &o.devices[dev];
    let mut s = d.new_stream();
    let mut p = [0u8; PAGE_SIZE];
    d.read_page(i, &mut p, &mut s).unwrap();
    p
}

#[test]
fn a_restart_serves_every_page_and_the_same_statistics() {
    let dir = TempDir::new("state-restart");
    let backing = TempFile::new("state-restart");
    let never = AtomicBool::new(false);
    let (pages, before) = {
        let o = open(&dir.0, Some(&backing.0)).unwrap();
        assert_eq!(o.attach, Attach::Created);
        let d = &o.devices[0];
        let mut s = d.new_stream();
        for i in 0..PAGES {
            d.write_page(i, &versioned(i, i + 1), &mut s).unwrap();
        }
        // Sector writes, discards, recompression and writeback: every kind of slot.
        d.write(5 * PAGE_SIZE as u64 + 512, &[0xEE; 1024], &mut s)
            .unwrap();
        d.discard(100, 50).unwrap();
        d.mark_idle(None);
        d.recompress(
            PageFilter::Idle,
            None,
            Some(300),
            Priority::new(1).unwrap(),
            &mut s,
            &never,
        )
        .unwrap();
        d.writeback(PageFilter::Huge, Some(100), &never).unwrap();
        o.devices[1]
            .write_page(7, &versioned(7, 9), &mut o.devices[1].new_stream())
            .unwrap();
        assert!(d.stats().bd_stat.bd_count > 0, "nothing written back");
        let pages: Vec<_> = (0..PAGES).map(|i| read(&o, 0, i)).collect();
        (pages, d.stats())
    };
    // The lock went with the store, and the state says it was shut down cleanly.
    let o = open(&dir.0, Some(&backing.0)).unwrap();
    assert_eq!(o.attach, Attach::Clean);
    assert_eq!(
        o.pages,
        before.mm_stat.orig_data_size / PAGE_SIZE as u64 + 1
    );
    for (i, p) in pages.iter().enumerate() {
        assert!(read(&o, 0, i as u64) == *p, "page {i}");
    }
    assert_eq!(read(&o, 1, 7), versioned(7, 9));
    let after = o.devices[0].stats();
    assert_eq!(after.mm_stat.orig_data_size, before.mm_stat.orig_data_size);
    assert_eq!(
        after.mm_stat.compr_data_size,
        before.mm_stat.compr_data_size
    );
    assert_eq!(after.mm_stat.same_pages, before.mm_stat.same_pages);
    assert_eq!(after.mm_stat.huge_pages, before.mm_stat.huge_pages);
    assert_eq!(after.bd_stat.bd_count, before.bd_stat.bd_count);
    // Running counters carry on (the 50 discards).
    assert_eq!(before.io_stat.notify_free, 50);
    assert_eq!(after.io_stat.notify_free, before.io_stat.notify_free);
    // Only one daemon at a time.
    let e = open(&dir.0, Some(&backing.0)).unwrap_err().to_string();
    assert!(e.contains("in use by another vzram"), "{e}");
    // Private: the directory 0700, the files 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.0), 0o700);
    for f in std::fs::read_dir(&dir.0).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
}

#[test]
fn a_state_that_is_not_this_one_is_refused_naming_the_file() {
    let dir = TempDir::new("state-refuse");
    {
        let o = open(&dir.0, None).unwrap();
        let d = &o.devices[0];
        let mut s = d.new_stream();
        for i in 0..64 {
            d.write_page(i, &versioned(i, i + 1), &mut s).unwrap();
        }
    }
    let refused = |specs: Vec<DeviceSpec>, cfg: StoreConfig, what: &str| {
        let e = state::open(&dir.0, &cfg, &specs).unwrap_err().to_string();
        assert!(e.contains(what), "expected {what:?} in: {e}");
        assert!(e.contains(&*dir.0.to_string_lossy()), "no path in: {e}");
    };
    let c = comp(3);
    let mut bigger = specs(&c, None);
    bigger[0].config.size *= 2;
    refused(
        bigger,
        cfg(),
        "holds devices vm1 (2048 pages), vm2 (64 pages)",
    );
    let mut renamed = specs(&c, None);
    renamed[1].name = "vm3".into();
    refused(
        renamed,
        cfg(),
        "this start configures vm1 (2048 pages), vm3",
    );
    refused(specs(&comp(3), None)[..1].to_vec(), cfg(), "holds devices");
    let zstd = Arc::new(Comp::parse("zstd", &[]).unwrap());
    refused(
        specs(&zstd, None),
        cfg(),
        "pages were compressed with lz4,zstd",
    );
    let wider = StoreConfig {
        capacity_pages: 1 << 15,
        ..cfg()
    };
    refused(specs(&c, None), wider, "capacity");
    let with_backing = TempFile::new("state-refuse");
    refused(
        specs(&c, Some(&with_backing.0)),
        cfg(),
        "wrote back to no backing file",
    );

    // Damaged files: each is refused, and once repaired the state opens with its data.
    let damage = |file: &str, at: u64, bytes: &[u8], what: &str| {
        let path = dir.0.join(file);
        let f = std::fs::File::options()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let mut old = vec![0u8; bytes.len()];
        f.read_exact_at(&mut old, at).unwrap();
        f.write_all_at(bytes, at).unwrap();
        let e = open(&dir.0, None).unwrap_err().to_string();
        assert!(
            e.contains(what) && e.contains(file),
            "expected {what:?}, {file}: {e}"
        );
        f.write_all_at(&old, at).unwrap();
    };
    damage("pool.pages", 0, b"XXXX", "wrong magic");
    damage("device-1.slots", 16, &[0xAB; 8], "another state");
    // A slot naming a handle nothing allocated.
    let slot = 2 * PAGE_SIZE as u64 + 10 * 16;
    damage(
        "device-0.slots",
        slot,
        &0x7FFF_FFF0u64.to_le_bytes(),
        "handle",
    );
    // A slot in no known state.
    damage(
        "device-0.slots",
        slot + 8 + 1,
        &[0xE0],
        "unknown slot state",
    );
    damage("state.json", 4, b"XXXX", "state.json");

    let pool = dir.0.join("pool.handles");
    let len = std::fs::metadata(&pool).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&pool)
        .unwrap()
        .set_len(len - 8)
        .unwrap();
    let e = open(&dir.0, None).unwrap_err().to_string();
    assert!(e.contains("pool.handles") && e.contains("bytes"), "{e}");
    std::fs::File::options()
        .write(true)
        .open(&pool)
        .unwrap()
        .set_len(len)
        .unwrap();

    let o = open(&dir.0, None).unwrap();
    for i in 0..64 {
        assert!(read(&o, 0, i) == versioned(i, i + 1), "page {i}");
    }
    drop(o);

    // Not a state at all.
    let junk = TempDir::new("state-junk");
    std::fs::create_dir_all(&junk.0).unwrap();
    std::fs::write(junk.0.join("notes.txt"), b"hello").unwrap();
    let e = open(&junk.0, None).unwrap_err().to_string();
    assert!(
        e.contains("notes.txt") && e.contains("not a vzram state"),
        "{e}"
    );
}

/// Child mode of the crash test: attach, say "ready", then write, discard and maintain until
/// killed, printing `S dev page version` before each change and `A dev page version` once it
/// is acknowledged (version 0: a discard).
fn crash_child(dir: &Path, backing: &Path, iteration: u64) -> ! {
    let o = open(dir, Some(backing)).unwrap();
    let out = std::sync::Mutex::new(std::io::stdout());
    let say = |line: String| {
        let mut o = out.lock().unwrap();
        o.write_all(line.as_bytes()).unwrap();
        o.flush().unwrap();
    };
    say(format!("ready {:?}\n", o.attach));
    let never = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (o, say) = (&o, &say);
            sc.spawn(move || {
                let mut rng = SplitMix64::new(iteration << 8 | t);
                let mut counter = 0u64;
                loop {
                    let dev = rng.next_u64().is_multiple_of(8) as usize;
                    let d = &o.devices[dev];
                    let mut s = d.new_stream();
                    // Thread t owns the pages congruent to t mod 2.
                    let page = (rng.next_u64() % (d.pages() / 2)) * 2 + t;
                    counter += 1;
                    if rng.next_u64().is_multiple_of(16) {
                        say(format!("S {dev} {page} 0\n"));
                        d.discard(page, 1).unwrap();
                        say(format!("A {dev} {page} 0\n"));
                    } else {
                        let v = (t + 1) << 32 | iteration << 20 | counter;
                        say(format!("S {dev} {page} {v}\n"));
                        d.write_page(page, &versioned(page, v), &mut s).unwrap();
                        say(format!("A {dev} {page} {v}\n"));
                    }
                }
            });
        }
        sc.spawn(|| {
            let d = &o.devices[0];
            let mut s = d.new_stream();
            let prio = Priority::new(1).unwrap();
            loop {
                d.compact();
                d.mark_idle(None);
                let _ = d.recompress(PageFilter::Idle, None, Some(64), prio, &mut s, &never);
                let _ = d.writeback(PageFilter::Idle, Some(64), &never);
            }
        });
    });
    unreachable!("the workers never end")
}

/// A child process that does not outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_acknowledged_write_survives_sigkill() {
    if let Ok(spec) = std::env::var("VZRAM_STATE_CRASH_CHILD") {
        let mut parts = spec.splitn(3, '\n');
        let (dir, backing, it) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        crash_child(Path::new(dir), Path::new(backing), it.parse().unwrap());
    }
    let dir = TempDir::new("state-crash");
    let backing = TempFile::new("state-crash");
    // Per (device, page): the last acknowledged version, and one started after it.
    let mut acked: HashMap<(usize, u64), u64> = HashMap::new();
    let mut rng = SplitMix64::new(0x5EED);
    let iterations = 60;
    let mut kills_mid_write = 0;
    let start = Instant::now();
    for it in 1..=iterations {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "every_acknowledged_write_survives_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "VZRAM_STATE_CRASH_CHILD",
                format!("{}\n{}\n{it}", dir.0.display(), backing.0.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut child = KillOnDrop(child);
        let mut lines = BufReader::new(stdout).lines();
        // (The harness's "test ... " may share the child's first line.)
        let ready = loop {
            let l = lines
                .next()
                .expect("child died before it was ready")
                .unwrap();
            if let Some(at) = l.find("ready ") {
                break l[at..].to_string();
            }
        };
        assert!(it == 1 || ready.contains("Clean"), "{ready}");
        // Let it work for 0..120 ms, then SIGKILL.
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 120));
        child.0.kill().unwrap();
        let mut started: HashMap<(usize, u64), u64> = HashMap::new();
        for l in lines {
            let l = l.unwrap();
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 4 {
                continue;
            }
            let key = (f[1].parse().unwrap(), f[2].parse().unwrap());
            let v: u64 = f[3].parse().unwrap();
            match f[0] {
                "S" => {
                    started.insert(key, v);
                }
                "A" => {
                    started.remove(&key);
                    acked.insert(key, v);
                }
                _ => {}
            }
        }
        child.0.wait().unwrap();
        kills_mid_write += !started.is_empty() as usize;

        let o = open(&dir.0, Some(&backing.0)).unwrap();
        assert_eq!(o.attach, Attach::Recovered, "iteration {it}");
        for dev in 0..2 {
            for page in 0..o.devices[dev].pages() {
                let got = read(&o, dev, page);
                let content = |v: u64| {
                    if v == 0 {
                        [0u8; PAGE_SIZE]
                    } else {
                        versioned(page, v)
                    }
                };
                let old = acked.get(&(dev, page)).copied().unwrap_or(0);
                let ok = got == content(old)
                    || started
                        .get(&(dev, page))
                        .is_some_and(|&v| got == content(v));
                assert!(
                    ok,
                    "iteration {it}: device {dev} page {page} is neither acknowledged version \
                     {old} nor the one in flight {:?}",
                    started.get(&(dev, page))
                );
                // What the recovered store shows is now the truth.
                if let Some(&v) = started.get(&(dev, page))
                    && got == content(v)
                {
                    acked.insert((dev, page), v);
                }
            }
        }
    }
    assert!(acked.len() > 500, "only {} pages written", acked.len());
    assert!(
        kills_mid_write > iterations / 2,
        "{kills_mid_write} kills mid-write"
    );
    eprintln!(
        "{iterations} SIGKILLs, {} pages checked each time, {:.1} s",
        PAGES + 64,
        start.elapsed().as_secs_f64()
    );
}
