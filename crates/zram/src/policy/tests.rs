//! The policy against a simulated store: devices of pages with access times, compressed sizes
//! and a place (memory or backing file), a pool with scripted fragmentation, and a log of
//! every call the policy makes. Time is the fake's: tests move it, so every run is the same.

use super::*;
use std::cell::RefCell;

const PAGE: u64 = crate::PAGE_SIZE as u64;
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Page {
    last_access: Instant,
    size: u64,
    huge: bool,
    /// Kept hot: its access time follows the clock.
    hot: bool,
    recompressed: bool,
    in_memory: bool,
}

#[derive(Debug)]
struct Dev {
    name: String,
    pages: Vec<Page>,
    mem_limit: u64,
    has_backing: bool,
    has_secondary: bool,
    promoted: u64,
    reclaim_cursor: usize,
    recompress_cursor: usize,
    fail: bool,
    /// What the policy last told the device its cold age is.
    cold_age: Duration,
}

impl Dev {
    fn mem_used(&self) -> u64 {
        self.pages
            .iter()
            .filter(|p| p.in_memory)
            .map(|p| p.size)
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Devices,
    View(usize),
    Recent(usize),
    Reclaim {
        dev: usize,
        min_age: Duration,
        max: u64,
    },
    Recompress {
        dev: usize,
        min_age: Duration,
        max: u64,
    },
    PoolUsed,
    Limit,
    Freeable,
    Compact,
}

#[derive(Debug)]
struct Sim {
    now: Instant,
    devs: Vec<Dev>,
    limit: u64,
    /// Pool pages compaction would free.
    fragmented: u64,
    /// Pool pages of other overhead, never freed.
    overhead: u64,
    calls: Vec<Call>,
    /// Sets the stop flag once this many pages were handled (recompressed or written).
    stop_after: Option<u64>,
    /// Every this many pages written back leave one sparse (freeable) pool page behind.
    fragment_every: Option<u64>,
    written: u64,
    /// Recompression leaves what it saves in sparse pool pages (until compacted), as zsmalloc
    /// does, instead of the pool shrinking at once.
    recompress_fragments: bool,
    /// Bytes recompression saved that do not fill a sparse page yet.
    saved: u64,
}

#[derive(Debug)]
struct Fake(RefCell<Sim>);

impl Fake {
    fn new() -> Fake {
        // An hour ahead of the real clock, so "an hour ago" is a valid Instant.
        Fake(RefCell::new(Sim {
            now: Instant::now() + 2 * HOUR,
            devs: Vec::new(),
            limit: 0,
            fragmented: 0,
            overhead: 0,
            calls: Vec::new(),
            stop_after: None,
            fragment_every: None,
            written: 0,
            recompress_fragments: false,
            saved: 0,
        }))
    }

    fn now(&self) -> Instant {
        self.0.borrow().now
    }

    /// A device with `cold` pages last used an hour ago and `hot` pages kept in use, each
    /// compressed to `size` bytes. Returns its index.
    fn add(&self, name: &str, cold: usize, hot: usize, size: u64) -> usize {
        let mut s = self.0.borrow_mut();
        let now = s.now;
        let page = |hot| Page {
            last_access: if hot { now } else { now - HOUR },
            size,
            huge: false,
            hot,
            recompressed: false,
            in_memory: true,
        };
        let mut pages = vec![page(false); cold];
        pages.extend(vec![page(true); hot]);
        s.devs.push(Dev {
            name: name.to_string(),
            pages,
            mem_limit: 0,
            has_backing: true,
            has_secondary: true,
            promoted: 0,
            reclaim_cursor: 0,
            recompress_cursor: 0,
            cold_age: Duration::ZERO,
            fail: false,
        });
        s.devs.len() - 1
    }

    fn set(&self, f: impl FnOnce(&mut Sim)) {
        f(&mut self.0.borrow_mut())
    }

    fn dev<R>(&self, i: usize, f: impl FnOnce(&mut Dev) -> R) -> R {
        f(&mut self.0.borrow_mut().devs[i])
    }

    fn mem_used(&self, i: usize) -> u64 {
        self.dev(i, |d| d.mem_used())
    }

    fn used(&self) -> u64 {
        let s = self.0.borrow();
        s.devs.iter().map(Dev::mem_used).sum::<u64>() + (s.fragmented + s.overhead) * PAGE
    }

    fn advance(&self, d: Duration) {
        let mut s = self.0.borrow_mut();
        s.now += d;
        let now = s.now;
        for p in s.devs.iter_mut().flat_map(|d| d.pages.iter_mut()) {
            if p.hot {
                p.last_access = now;
            }
        }
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.0.borrow_mut().calls)
    }

    fn log(&self, c: Call) {
        self.0.borrow_mut().calls.push(c);
    }

    /// Counts one page handled against `stop_after`.
    fn handled(&self, stop: &AtomicBool) {
        let mut s = self.0.borrow_mut();
        if let Some(n) = s.stop_after.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                stop.store(true, Relaxed);
            }
        }
    }
}

impl Target for Fake {
    type Device = usize;
    type Error = String;

    fn devices(&self) -> Vec<usize> {
        self.log(Call::Devices);
        (0..self.0.borrow().devs.len()).collect()
    }

    fn view(&self, &i: &usize) -> DeviceView {
        self.log(Call::View(i));
        let s = self.0.borrow();
        let d = &s.devs[i];
        let share = if d.mem_limit > 0 {
            d.mem_limit
        } else {
            s.limit / s.devs.len() as u64
        };
        DeviceView {
            name: d.name.clone(),
            mem_used: d.mem_used(),
            mem_limit: d.mem_limit,
            share,
            stored_pages: d.pages.iter().filter(|p| p.in_memory).count() as u64,
            promoted: d.promoted,
            has_backing: d.has_backing,
            has_secondary: d.has_secondary,
        }
    }

    fn set_cold_age(&self, &i: &usize, age: Duration) {
        self.0.borrow_mut().devs[i].cold_age = age;
    }

    fn recently_used_pages(&self, &i: &usize, window: Duration) -> u64 {
        self.log(Call::Recent(i));
        let s = self.0.borrow();
        let now = s.now;
        s.devs[i]
            .pages
            .iter()
            .filter(|p| now.saturating_duration_since(p.last_access) < window)
            .count() as u64
    }

    fn reclaim(
        &self,
        &i: &usize,
        min_age: Duration,
        max: u64,
        stop: &AtomicBool,
    ) -> Result<Reclaimed, String> {
        self.log(Call::Reclaim {
            dev: i,
            min_age,
            max,
        });
        let mut r = Reclaimed::default();
        if self.dev(i, |d| d.fail) {
            return Err("disk on fire".into());
        }
        assert!(self.dev(i, |d| d.has_backing), "writeback without a file");
        let (n, now) = (self.dev(i, |d| d.pages.len()), self.now());
        while r.scanned < n as u64 && r.written < max && !stop.load(Relaxed) {
            r.scanned += 1;
            let freed = self.dev(i, |d| {
                let at = d.reclaim_cursor;
                d.reclaim_cursor = (at + 1) % n;
                let p = &mut d.pages[at];
                let cold = now.saturating_duration_since(p.last_access) >= min_age;
                (p.in_memory && (cold || p.huge)).then(|| {
                    p.in_memory = false;
                    p.size
                })
            });
            if let Some(bytes) = freed {
                r.written += 1;
                r.freed_bytes += bytes;
                self.set(|s| {
                    s.written += 1;
                    if s.fragment_every.is_some_and(|k| s.written % k == 0) {
                        s.fragmented += 1;
                    }
                });
                self.handled(stop);
            }
        }
        Ok(r)
    }

    fn recompress_cold(
        &self,
        &i: &usize,
        min_age: Duration,
        max: u64,
        stop: &AtomicBool,
    ) -> Result<RecompressResult, String> {
        self.log(Call::Recompress {
            dev: i,
            min_age,
            max,
        });
        if self.dev(i, |d| d.fail) {
            return Err("codec on fire".into());
        }
        let mut r = RecompressResult::default();
        let (n, now) = (self.dev(i, |d| d.pages.len()), self.now());
        let mut scanned = 0;
        while scanned < n && r.tried < max && !stop.load(Relaxed) {
            scanned += 1;
            let tried = self.dev(i, |d| {
                let at = d.recompress_cursor;
                d.recompress_cursor = (at + 1) % n;
                let p = &mut d.pages[at];
                let cold = now.saturating_duration_since(p.last_access) >= min_age;
                let ok = p.in_memory && !p.recompressed && (cold || p.huge);
                if ok {
                    p.recompressed = true;
                    let new = p.size * 6 / 10;
                    let saved = p.size - new;
                    p.size = new;
                    return Some(saved);
                }
                None
            });
            let tried = match tried {
                Some(saved) => {
                    self.set(|s| {
                        if s.recompress_fragments {
                            s.saved += saved;
                            s.fragmented += s.saved / PAGE;
                            s.saved %= PAGE;
                        }
                    });
                    true
                }
                None => false,
            };
            if tried {
                r.tried += 1;
                r.recompressed += 1;
                self.handled(stop);
            }
        }
        Ok(r)
    }

    fn pool_bytes_used(&self) -> u64 {
        self.log(Call::PoolUsed);
        self.used()
    }

    fn mem_limit(&self) -> u64 {
        self.log(Call::Limit);
        self.0.borrow().limit
    }

    fn freeable_pages(&self) -> u64 {
        self.log(Call::Freeable);
        self.0.borrow().fragmented
    }

    fn compact(&self) -> u64 {
        self.log(Call::Compact);
        std::mem::take(&mut self.0.borrow_mut().fragmented)
    }
}

fn cfg() -> PolicyConfig {
    PolicyConfig {
        recompress: false,
        ..PolicyConfig::default()
    }
}

fn policy(cfg: PolicyConfig) -> Policy {
    Policy::new(cfg).unwrap()
}

/// Ticks once a second for `secs` seconds.
fn run(p: &mut Policy, f: &Fake, secs: u64, psi: Option<f64>) -> Vec<TickReport> {
    (0..secs)
        .map(|_| {
            f.advance(Duration::from_secs(1));
            p.tick(f, f.now(), psi)
        })
        .collect()
}

fn reclaims(calls: &[Call]) -> Vec<usize> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Reclaim { dev, .. } => Some(*dev),
            _ => None,
        })
        .collect()
}

fn recompressions(calls: &[Call]) -> Vec<usize> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Recompress { dev, .. } => Some(*dev),
            _ => None,
        })
        .collect()
}

fn device_stats(p: &Policy, name: &str) -> DevicePolicyStats {
    p.stats()
        .devices
        .into_iter()
        .find(|d| d.name == name)
        .unwrap()
}

// ---- watermarks ----

#[test]
fn writeback_starts_above_the_high_watermark_and_stops_at_the_low_one() {
    let f = Fake::new();
    let a = f.add("a", 4000, 500, 1024);
    // 4.5 MB used: 96% of the limit.
    let limit = 4_800_000;
    f.set(|s| s.limit = limit);
    let low = part(limit, 0.80);
    let mut p = policy(PolicyConfig {
        max_pages_per_tick: 512,
        ..cfg()
    });

    let r = run(&mut p, &f, 1, None);
    assert!(r[0].triggers.store_watermark);
    assert_eq!(r[0].written_back, 512, "a full tick's work");
    // Now between the marks: still draining toward the low one.
    assert!(f.used() < part(limit, 0.90) && f.used() > low);
    assert!(p.stats().reclaiming);

    let r = run(&mut p, &f, 1, None);
    assert!(r[0].written_back > 0 && r[0].written_back < 512);
    assert!(f.used() <= low, "{} > {low}", f.used());
    assert!(f.used() + WRITEBACK_BATCH * 1024 > low, "overshot");

    f.calls();
    let r = run(&mut p, &f, 10, None);
    assert!(r.iter().all(|r| r.written_back == 0));
    assert!(reclaims(&f.calls()).is_empty());
    assert!(!p.stats().reclaiming);
    assert_eq!(
        device_stats(&p, "a").written_back,
        4500 - f.mem_used(a) / 1024
    );
}

#[test]
fn nothing_is_written_back_between_the_marks_or_below_them_without_pressure() {
    let f = Fake::new();
    f.add("a", 4000, 500, 1024);
    // 85% of the limit: above the low mark, below the high one, and no reclaim under way.
    f.set(|s| s.limit = 4_608_000 * 100 / 85);
    let mut p = policy(cfg());
    let r = run(&mut p, &f, 5, None);
    assert!(r.iter().all(|r| r.ran && r.written_back == 0));
    // Pressure below the threshold changes nothing.
    let r = run(&mut p, &f, 5, Some(9.9));
    assert!(
        r.iter()
            .all(|r| r.written_back == 0 && !r.triggers.pressure)
    );
    assert!(reclaims(&f.calls()).is_empty());
}

#[test]
fn no_store_limit_and_no_pressure_means_no_writeback() {
    let f = Fake::new();
    f.add("a", 4000, 0, 4096);
    let mut p = policy(cfg());
    run(&mut p, &f, 5, None);
    assert!(reclaims(&f.calls()).is_empty());
}

#[test]
fn a_device_above_its_own_limit_is_drained_to_its_low_mark_alone() {
    let f = Fake::new();
    let a = f.add("a", 1000, 100, 1024);
    let b = f.add("b", 1000, 100, 1024);
    // a: 1.1 MB against a 1.2 MB limit (92%). No store limit.
    f.dev(a, |d| d.mem_limit = 1_200_000);
    let mut p = policy(cfg());
    let r = run(&mut p, &f, 3, None);
    assert!(r[0].triggers.device_watermark && !r[0].triggers.store_watermark);
    assert!(f.mem_used(a) <= part(1_200_000, 0.80));
    assert!(f.mem_used(a) + WRITEBACK_BATCH * 1024 > part(1_200_000, 0.80));
    assert_eq!(f.mem_used(b), 1_100 * 1024);
    assert!(reclaims(&f.calls()).iter().all(|&d| d == a));
}

#[test]
fn what_a_device_frees_under_its_own_limit_counts_toward_the_store() {
    let f = Fake::new();
    let a = f.add("a", 1000, 100, 1024);
    let b = f.add("b", 900, 100, 1024);
    // a: 1.13 MB of a 1.2 MB limit (94%): one batch brings it under its low mark. The store:
    // 2.15 MB of 2.3 MB (93.5%): 310 kB to its low mark, of which a's batch already freed 262.
    f.dev(a, |d| d.mem_limit = 1_200_000);
    f.set(|s| s.limit = 2_300_000);
    let mut p = policy(cfg());
    let r = run(&mut p, &f, 1, None).pop().unwrap();
    assert!(r.triggers.device_watermark && r.triggers.store_watermark);
    assert_eq!(reclaims(&f.calls()), vec![a, b]);
    assert_eq!(
        r.written_back,
        2 * WRITEBACK_BATCH,
        "not three: no double count"
    );
    assert!(f.used() <= part(2_300_000, 0.80));
}

// ---- pressure ----

#[test]
fn pressure_triggers_a_bounded_batch_below_the_high_watermark() {
    let f = Fake::new();
    f.add("a", 20_000, 100, 1024);
    let mut p = policy(PolicyConfig {
        max_pages_per_tick: 1000,
        ..cfg()
    });
    // No limit at all: only pressure can start writeback.
    let r = run(&mut p, &f, 3, Some(25.0));
    for r in &r {
        assert!(r.triggers.pressure && !r.triggers.store_watermark);
        assert_eq!(r.written_back, 1000);
    }
    // A limit far away does not stop it either.
    f.set(|s| s.limit = 100 << 20);
    let r = run(&mut p, &f, 1, Some(25.0));
    assert_eq!(r[0].written_back, 1000);
    // Pressure gone: writeback stops.
    let r = run(&mut p, &f, 3, Some(0.5));
    assert!(r.iter().all(|r| r.written_back == 0));
    assert_eq!(p.stats().last_psi, Some(0.5));
}

#[test]
fn missing_or_garbled_psi_falls_back_to_the_watermarks() {
    let dir = std::env::temp_dir();
    let garbled = dir.join(format!("vzram-policy-psi-{}", std::process::id()));
    std::fs::write(&garbled, "some avg10=lots avg60=0.00\n").unwrap();
    let missing = dir.join("vzram-policy-psi-missing");

    let f = Fake::new();
    f.add("a", 4000, 500, 1024);
    let mut p = policy(cfg());
    for path in [&garbled, &missing] {
        let psi = read_psi(path);
        assert_eq!(psi, None);
        let r = run(&mut p, &f, 2, psi);
        assert!(r.iter().all(|r| r.ran && r.written_back == 0));
    }
    assert_eq!(p.stats().last_psi, None);
    // The watermarks still work without PSI.
    f.set(|s| s.limit = 4_000_000);
    let r = run(&mut p, &f, 1, read_psi(&garbled));
    assert!(r[0].triggers.store_watermark && r[0].written_back > 0);
    std::fs::remove_file(garbled).unwrap();
}

// ---- compaction ----

#[test]
fn compaction_is_relative_to_the_pool() {
    let mut p = policy(cfg());
    // (pages in use besides the freeable ones, freeable pages, compacted?)
    for (overhead, freeable, compacted) in [
        (60, 40, true),                  // small pool, 40% fragmented
        (100_000 - 1000, 1000, false),   // big pool, 1% fragmented
        (1_000_000 - 2048, 2048, false), // what the old absolute threshold compacted
        (950_000, 50_001, true),         // just over 5%
        (10, 15, false),                 // under MIN_COMPACT_PAGES whatever the fraction
    ] {
        let f = Fake::new();
        f.set(|s| {
            s.overhead = overhead;
            s.fragmented = freeable;
        });
        let r = p.tick(&f, f.now(), None);
        let calls = f.calls();
        assert_eq!(
            calls.contains(&Call::Compact),
            compacted,
            "{overhead} + {freeable}"
        );
        assert_eq!(r.compacted_pages, if compacted { freeable } else { 0 });
    }
    assert_eq!(p.stats().compacted_pages, 40 + 50_001);
}

#[test]
fn compaction_follows_writeback_that_left_fragments() {
    let f = Fake::new();
    f.add("a", 4000, 0, 1024);
    f.set(|s| {
        s.limit = 4_000_000;
        s.fragment_every = Some(4);
    });
    let mut p = policy(cfg());
    // Writeback frees objects, and leaves sparse pool pages: compacted in the same tick.
    let r = p.tick(&f, f.now(), None);
    // About 875 pages to the low mark: four batches.
    assert_eq!(r.written_back, 4 * WRITEBACK_BATCH);
    assert_eq!(r.compacted_pages, r.written_back / 4);
    assert_eq!(f.calls().iter().filter(|c| **c == Call::Compact).count(), 1);
    // Without fragments left, no compaction.
    f.set(|s| s.fragment_every = None);
    f.set(|s| s.limit = 2_000_000);
    let r = p.tick(&f, f.now(), None);
    assert!(r.written_back > 0 && r.compacted_pages == 0);
    assert!(!f.calls().contains(&Call::Compact));
}

/// Cheapest first: what recompression saves is compacted and measured before writeback is
/// decided, so cold pages shrunk in memory spare pages going to the backing file.
#[test]
fn recompression_and_its_compaction_come_before_writeback() {
    let f = Fake::new();
    f.add("a", 4000, 0, 1024);
    let used = f.used();
    f.set(|s| {
        s.recompress_fragments = true;
        // Just above the high watermark.
        s.limit = used * 100 / 95;
    });
    f.advance(Duration::from_secs(3600));
    let mut p = policy(PolicyConfig {
        recompress: true,
        ..cfg()
    });
    let r = p.tick(&f, f.now(), None);
    assert!(r.recompressed > 0 && r.compacted_pages > 0, "{r:?}");
    assert_eq!(r.written_back, 0, "{r:?}");
    assert!(!r.triggers.store_watermark);
}

// ---- recompression ----

#[test]
fn recompression_takes_cold_and_huge_pages_only_where_a_secondary_algorithm_exists() {
    let f = Fake::new();
    let a = f.add("a", 100, 50, 2000);
    f.dev(a, |d| {
        for p in &mut d.pages[140..] {
            p.huge = true;
            p.size = 4096;
        }
    });
    let b = f.add("b", 100, 0, 2000);
    f.dev(b, |d| d.has_secondary = false);
    let mut p = policy(PolicyConfig {
        recompress: true,
        ..cfg()
    });
    let r = run(&mut p, &f, 1, None);
    // 100 cold + 10 hot but huge.
    assert_eq!(r[0].recompressed, 110);
    assert_eq!(r[0].devices[a].recompressed, 110);
    let calls = f.calls();
    assert!(recompressions(&calls).iter().all(|&d| d == a));
    assert!(calls.contains(&Call::Recompress {
        dev: a,
        min_age: Duration::from_secs(120),
        max: 4096
    }));
    f.dev(a, |d| {
        assert!(d.pages[100..140].iter().all(|p| !p.recompressed))
    });
    assert_eq!(device_stats(&p, "a").recompressed, 110);

    // Nothing left: the device rests, then is looked at again.
    run(&mut p, &f, 1, None);
    f.calls();
    run(&mut p, &f, REST.as_secs() - 2, None);
    assert!(recompressions(&f.calls()).is_empty());
    run(&mut p, &f, 2, None);
    assert_eq!(recompressions(&f.calls()), vec![a]);

    // Off: never.
    let f = Fake::new();
    f.add("a", 100, 0, 2000);
    let mut p = policy(cfg());
    run(&mut p, &f, 3, None);
    assert!(recompressions(&f.calls()).is_empty());
}

#[test]
fn recompression_shares_its_budget_between_devices_in_turn() {
    let f = Fake::new();
    for name in ["a", "b", "c"] {
        f.add(name, 10_000, 0, 2000);
    }
    let mut p = policy(PolicyConfig {
        recompress: true,
        max_pages_per_tick: 300,
        ..cfg()
    });
    let r = run(&mut p, &f, 6, None);
    for r in &r {
        assert_eq!(r.recompress_tried, 300);
        assert!(r.devices.iter().all(|d| d.recompress_tried == 100));
    }
    // A budget smaller than the devices: each tick starts at the next one.
    p.set_config(PolicyConfig {
        max_pages_per_tick: 1,
        ..p.config().clone()
    })
    .unwrap();
    f.calls();
    run(&mut p, &f, 3, None);
    let mut order = recompressions(&f.calls());
    order.sort();
    assert_eq!(order, vec![0, 1, 2]);
}

// ---- back-off ----

#[test]
fn promotions_above_target_double_the_cold_age_throttle_and_recover() {
    let f = Fake::new();
    // 1000 recently used pages each: a target of 2 promotions a minute.
    let a = f.add("a", 20_000, 1000, 1024);
    let b = f.add("b", 20_000, 1000, 1024);
    let mut p = policy(PolicyConfig {
        max_pages_per_tick: 64,
        ..cfg()
    });
    let idle = 120.0;

    let tick = |p: &mut Policy, promote: u64| {
        f.dev(a, |d| d.promoted += promote);
        run(p, &f, 1, Some(50.0)).pop().unwrap()
    };
    // The first tick is the baseline of the promotion counter.
    tick(&mut p, 0);
    let a_written = device_stats(&p, "a").written_back;
    f.calls();
    // A burst, then one promotion a second: 60 a minute, far above target.
    let r = tick(&mut p, 100);
    let sa = device_stats(&p, "a");
    assert!(sa.throttled && r.devices[a].throttled);
    assert_eq!(sa.cold_age_secs, 2.0 * idle);
    // The device hears it too, for the writes that reclaim by themselves.
    f.dev(a, |d| assert_eq!(d.cold_age.as_secs_f64(), 2.0 * idle));
    f.dev(b, |d| assert_eq!(d.cold_age.as_secs_f64(), idle));
    assert_eq!(sa.promotion_target_per_min, 2.0);
    assert!(!device_stats(&p, "b").throttled);
    assert_eq!(device_stats(&p, "b").cold_age_secs, idle);
    // Under pressure the throttled device is left alone, the other pays.
    assert_eq!(r.devices[a].written_back, 0);
    assert_eq!(r.devices[b].written_back, 64);

    // The age doubles at most once per step, up to the cap.
    let mut ages = vec![];
    for _ in 0..150 {
        tick(&mut p, 1);
        ages.push(device_stats(&p, "a").cold_age_secs);
    }
    assert_eq!(ages[(BACKOFF_STEP.as_secs() - 2) as usize], 2.0 * idle);
    assert_eq!(ages[BACKOFF_STEP.as_secs() as usize], 4.0 * idle);
    assert_eq!(*ages.last().unwrap(), 8.0 * idle);
    assert!(ages.iter().all(|&a| a <= 8.0 * idle));
    assert!(device_stats(&p, "a").promotions_per_min >= 59.0);
    assert_eq!(device_stats(&p, "a").written_back, a_written);
    // The ages it asked the target for follow.
    assert!(f.calls().iter().all(|c| match c {
        Call::Reclaim { dev, min_age, .. } => *dev == b && min_age.as_secs_f64() == idle,
        _ => true,
    }));

    // Promotions stop: once the minute has passed, the age halves back to idle_age.
    let mut ages = vec![];
    for _ in 0..200 {
        tick(&mut p, 0);
        ages.push(device_stats(&p, "a").cold_age_secs);
    }
    assert_eq!(
        ages[50],
        8.0 * idle,
        "the window still holds the promotions"
    );
    assert!(ages.windows(2).all(|w| w[1] <= w[0]));
    assert!(ages.contains(&(4.0 * idle)) && ages.contains(&(2.0 * idle)));
    assert_eq!(*ages.last().unwrap(), idle);
    let sa = device_stats(&p, "a");
    assert!(!sa.throttled);
    assert_eq!(sa.promotions_per_min, 0.0);
    let r = tick(&mut p, 0);
    assert!(r.devices[a].written_back > 0, "writes back again");
}

#[test]
fn a_rate_between_half_and_all_of_the_target_holds_the_cold_age() {
    let f = Fake::new();
    // 2000 recently used pages: a target of 4 promotions a minute.
    let a = f.add("a", 100, 2000, 1024);
    let mut p = policy(PolicyConfig {
        max_cold_age: Duration::from_secs(240),
        ..cfg()
    });
    run(&mut p, &f, 1, None);
    f.dev(a, |d| d.promoted += 10);
    run(&mut p, &f, 1, None);
    assert!(device_stats(&p, "a").throttled);
    assert_eq!(device_stats(&p, "a").cold_age_secs, 240.0);
    // Then one every 20 s: 3 a minute, between half the target and the target.
    for s in 0..300 {
        if s % 20 == 0 {
            f.dev(a, |d| d.promoted += 1);
        }
        run(&mut p, &f, 1, None);
        let sa = device_stats(&p, "a");
        if s >= 60 {
            assert_eq!(sa.promotions_per_min, 3.0);
            assert!(!sa.throttled);
        }
        assert_eq!(sa.cold_age_secs, 240.0, "held, not halved, at {s}");
    }
}

#[test]
fn a_throttled_device_is_written_back_last_at_the_watermark() {
    let f = Fake::new();
    let a = f.add("a", 3000, 1000, 1024);
    let b = f.add("b", 200, 1000, 1024);
    let mut p = policy(cfg());
    run(&mut p, &f, 1, Some(0.0)); // a baseline sample
    f.set(|s| s.limit = 5_000_000); // 5.3 MB used: above high
    f.calls();
    f.dev(a, |d| d.promoted = 100);
    let r = run(&mut p, &f, 1, None).pop().unwrap();
    assert!(r.devices[a].throttled && r.triggers.store_watermark);
    // b (far less over its share) is drained of everything cold first.
    let order = reclaims(&f.calls());
    let first_a = order.iter().position(|&d| d == a).unwrap();
    assert!(order[..first_a].iter().all(|&d| d == b) && first_a > 0);
    assert_eq!(r.devices[b].written_back, 200);
    assert!(
        r.devices[a].written_back > 0,
        "the limit still wins over the throttle"
    );
}

#[test]
fn under_pressure_alone_a_throttled_device_is_not_written_back_at_all() {
    let f = Fake::new();
    let a = f.add("a", 5000, 1000, 1024);
    let b = f.add("b", 0, 1000, 1024); // nothing cold: a is the only source
    let mut p = policy(cfg());
    run(&mut p, &f, 1, None);
    f.dev(a, |d| d.promoted += 100);
    let r = run(&mut p, &f, 5, Some(80.0));
    assert!(
        r.iter()
            .all(|r| r.triggers.pressure && r.devices[a].throttled)
    );
    assert!(r.iter().all(|r| r.written_back == 0));
    assert_eq!(reclaims(&f.calls()), vec![b]);
}

#[test]
fn the_promotion_rate_is_counted_over_the_last_minute() {
    let f = Fake::new();
    let a = f.add("a", 0, 100_000, 1024);
    let mut p = policy(cfg());
    run(&mut p, &f, 1, None);
    f.dev(a, |d| d.promoted += 120);
    run(&mut p, &f, 30, None);
    assert_eq!(device_stats(&p, "a").promotions_per_min, 120.0);
    run(&mut p, &f, 29, None);
    assert_eq!(device_stats(&p, "a").promotions_per_min, 120.0);
    run(&mut p, &f, 2, None);
    assert_eq!(device_stats(&p, "a").promotions_per_min, 0.0);
    // A counter that restarts (the device was replaced) restarts the window, no panic.
    f.dev(a, |d| d.promoted = 5);
    run(&mut p, &f, 1, None);
    f.dev(a, |d| d.promoted = 2);
    run(&mut p, &f, 1, None);
    assert_eq!(device_stats(&p, "a").promotions_per_min, 0.0);
    // The scan for recently used pages runs only with promotions, at most once per step.
    f.calls();
    f.dev(a, |d| d.promoted += 10);
    run(&mut p, &f, BACKOFF_STEP.as_secs() + 1, None);
    let scans = f
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Recent(_)))
        .count();
    assert_eq!(scans, 2);
}

// ---- fairness and backing ----

#[test]
fn the_device_most_over_its_share_pays_first() {
    let f = Fake::new();
    let limit: u64 = 3_000 * 1024;
    // 3200 pages used, 110% of the limit. Shares are about 970 pages each: a is about 830
    // over, b 130 over, c 670 under. Reaching the low mark takes about 870 pages.
    let a = f.add("a", 1800, 0, 1024);
    let b = f.add("b", 1100, 0, 1024);
    let c = f.add("c", 300, 0, 1024);
    f.set(|s| s.limit = limit * 100 / 103);
    let mut p = policy(PolicyConfig {
        max_pages_per_tick: 100_000,
        ..cfg()
    });
    run(&mut p, &f, 1, None);
    let order = reclaims(&f.calls());
    // a pays alone until it is level with b, then both; c, under its share, never.
    assert_eq!(order[0], a);
    assert!(!order.contains(&c), "{order:?}");
    let (ua, ub) = (f.mem_used(a) / 1024, f.mem_used(b) / 1024);
    assert!(ua.abs_diff(ub) <= WRITEBACK_BATCH, "{ua} vs {ub}");
    assert_eq!(f.mem_used(c), 300 * 1024);
    assert!(f.used() <= part(f.0.borrow().limit, 0.80));
}

#[test]
fn devices_without_a_backing_file_are_never_asked_to_write_back() {
    let f = Fake::new();
    let a = f.add("a", 5000, 0, 4096);
    let b = f.add("b", 1000, 0, 4096);
    f.dev(a, |d| {
        d.has_backing = false;
        d.mem_limit = 1 << 20; // far over its own limit too
    });
    f.set(|s| s.limit = 10 << 20);
    let mut p = policy(cfg());
    let r = run(&mut p, &f, 5, Some(90.0));
    assert!(r[0].triggers.store_watermark && r[0].triggers.pressure);
    let order = reclaims(&f.calls());
    assert!(!order.is_empty() && order.iter().all(|&d| d == b));
    assert!(r.iter().all(|r| r.devices[a].written_back == 0));
}

// ---- switches, configuration, stop ----

#[test]
fn the_policy_off_does_nothing_at_all() {
    let f = Fake::new();
    f.add("a", 5000, 0, 4096);
    f.set(|s| {
        s.limit = 1 << 20;
        s.fragmented = 10_000;
    });
    let mut p = policy(PolicyConfig {
        enabled: false,
        recompress: true,
        ..cfg()
    });
    let r = run(&mut p, &f, 5, Some(99.0));
    assert!(r.iter().all(|r| *r == TickReport::default()));
    assert!(f.calls().is_empty());
    assert_eq!(p.stats().ticks, 0);
    // Turned on at run time, it acts; off again, it stops.
    p.set_config(PolicyConfig {
        enabled: true,
        ..p.config().clone()
    })
    .unwrap();
    let r = run(&mut p, &f, 1, None);
    assert!(r[0].ran && r[0].compacted_pages > 0 && r[0].written_back > 0);
    p.set_config(PolicyConfig {
        enabled: false,
        ..p.config().clone()
    })
    .unwrap();
    f.calls();
    run(&mut p, &f, 3, Some(99.0));
    assert!(f.calls().is_empty());
    assert!(!p.stats().reclaiming);
}

#[test]
fn the_defaults_are_valid_and_nonsense_is_refused_by_name() {
    let d = PolicyConfig::default();
    assert_eq!(d.validate(), Ok(()));
    assert!(d.enabled && d.recompress);
    assert_eq!(d.interval, Duration::from_secs(1));
    assert_eq!(d.idle_age, Duration::from_secs(120));
    assert_eq!(d.max_cold_age, 8 * d.idle_age);
    assert_eq!((d.high_watermark, d.low_watermark), (0.90, 0.80));
    assert_eq!(
        (d.compact_fraction, d.psi_threshold, d.promotion_target),
        (0.05, 10.0, 0.002)
    );
    let bad: Vec<(&str, PolicyConfig)> = vec![
        (
            "interval",
            PolicyConfig {
                interval: Duration::ZERO,
                ..d.clone()
            },
        ),
        (
            "compact_fraction",
            PolicyConfig {
                compact_fraction: 1.5,
                ..d.clone()
            },
        ),
        (
            "compact_fraction",
            PolicyConfig {
                compact_fraction: -0.1,
                ..d.clone()
            },
        ),
        (
            "compact_fraction",
            PolicyConfig {
                compact_fraction: f64::NAN,
                ..d.clone()
            },
        ),
        (
            "idle_age",
            PolicyConfig {
                idle_age: Duration::ZERO,
                ..d.clone()
            },
        ),
        (
            "max_cold_age",
            PolicyConfig {
                max_cold_age: Duration::from_secs(60),
                ..d.clone()
            },
        ),
        (
            "high_watermark",
            PolicyConfig {
                high_watermark: 1.2,
                ..d.clone()
            },
        ),
        (
            "high_watermark",
            PolicyConfig {
                high_watermark: 0.0,
                low_watermark: 0.0,
                ..d.clone()
            },
        ),
        (
            "low_watermark",
            PolicyConfig {
                low_watermark: 0.95,
                ..d.clone()
            },
        ),
        (
            "low_watermark",
            PolicyConfig {
                low_watermark: 0.90,
                ..d.clone()
            },
        ),
        (
            "low_watermark",
            PolicyConfig {
                low_watermark: -0.5,
                ..d.clone()
            },
        ),
        (
            "psi_threshold",
            PolicyConfig {
                psi_threshold: 101.0,
                ..d.clone()
            },
        ),
        (
            "psi_threshold",
            PolicyConfig {
                psi_threshold: f64::INFINITY,
                ..d.clone()
            },
        ),
        (
            "promotion_target",
            PolicyConfig {
                promotion_target: 2.0,
                ..d.clone()
            },
        ),
        (
            "max_pages_per_tick",
            PolicyConfig {
                max_pages_per_tick: 0,
                ..d.clone()
            },
        ),
    ];
    for (name, c) in bad {
        match c.validate() {
            Err(Error::Invalid { name: n, why }) => {
                assert_eq!(n, name, "{why}");
                assert!(Error::Invalid { name: n, why }.to_string().contains(name));
            }
            Ok(()) => panic!("{name} accepted: {c:?}"),
        }
        assert!(Policy::new(c).is_err());
    }
}

#[test]
fn the_configuration_round_trips_through_json_and_missing_fields_take_defaults() {
    let c = PolicyConfig {
        idle_age: Duration::from_millis(90_500),
        high_watermark: 0.95,
        ..PolicyConfig::default()
    };
    let back: PolicyConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let partial: PolicyConfig = serde_json::from_str(r#"{"enabled": false}"#).unwrap();
    assert_eq!(
        partial,
        PolicyConfig {
            enabled: false,
            ..PolicyConfig::default()
        }
    );
    assert!(serde_json::from_str::<PolicyConfig>(r#"{"enabeld": false}"#).is_err());
}

#[test]
fn a_run_time_change_keeps_counters_and_moves_cold_ages_into_the_new_range() {
    let f = Fake::new();
    let a = f.add("a", 20_000, 1000, 1024);
    f.add("b", 20_000, 1000, 1024);
    let mut p = policy(PolicyConfig {
        max_pages_per_tick: 100,
        ..cfg()
    });
    f.dev(a, |d| d.promoted = 0);
    run(&mut p, &f, 1, Some(50.0));
    f.dev(a, |d| d.promoted = 1000);
    run(&mut p, &f, 1, Some(50.0));
    assert_eq!(device_stats(&p, "a").cold_age_secs, 240.0);
    // The baseline tick took a (first of two equals), this one b (a is throttled).
    let written = device_stats(&p, "b").written_back;
    assert_eq!(written, 100);

    // A bad change is refused and changes nothing.
    let bad = PolicyConfig {
        low_watermark: 0.99,
        ..p.config().clone()
    };
    assert!(p.set_config(bad).is_err());
    assert_eq!(p.config().low_watermark, 0.80);

    p.set_config(PolicyConfig {
        idle_age: Duration::from_secs(60),
        max_cold_age: Duration::from_secs(180),
        max_pages_per_tick: 10,
        ..p.config().clone()
    })
    .unwrap();
    let st = p.stats();
    assert_eq!(st.config.idle_age, Duration::from_secs(60));
    assert_eq!(
        device_stats(&p, "a").cold_age_secs,
        180.0,
        "clamped to the new cap"
    );
    assert_eq!(
        device_stats(&p, "b").cold_age_secs,
        60.0,
        "follows idle_age"
    );
    assert_eq!(device_stats(&p, "b").written_back, written);
    assert!(
        device_stats(&p, "a").promotions_per_min > 0.0,
        "window kept"
    );
    f.calls();
    let r = run(&mut p, &f, 1, Some(50.0));
    assert_eq!(r[0].written_back, 10, "the new bound");
    assert!(f.calls().contains(&Call::Reclaim {
        dev: 1,
        min_age: Duration::from_secs(60),
        max: 10
    }));
}

#[test]
fn the_stop_flag_ends_a_tick_early_and_holds_until_resumed() {
    let f = Fake::new();
    f.add("a", 10_000, 0, 2000);
    f.set(|s| {
        s.limit = 1 << 20;
        s.stop_after = Some(10);
    });
    let mut p = policy(PolicyConfig {
        recompress: true,
        ..cfg()
    });
    // The flag is set by the target during recompression (as another thread would).
    let r = run(&mut p, &f, 1, Some(99.0)).pop().unwrap();
    assert!(r.ran && r.stopped);
    assert_eq!(r.recompress_tried, 10);
    assert_eq!(r.written_back, 0);
    assert!(reclaims(&f.calls()).is_empty(), "writeback never started");
    assert!(p.stop_flag().load(Relaxed));
    // Held: later ticks do nothing.
    let r = run(&mut p, &f, 3, Some(99.0));
    assert!(r.iter().all(|r| !r.ran && r.stopped));
    assert!(f.calls().is_empty());
    // Resumed: work goes on; stopping mid-writeback cuts it too.
    f.set(|s| s.stop_after = Some(5000 + 7));
    p.resume();
    let r = run(&mut p, &f, 1, Some(99.0)).pop().unwrap();
    assert!(r.stopped);
    assert_eq!(r.recompress_tried, 4096);
    assert_eq!(r.written_back, 5000 + 7 - 4096);
    // A configuration change clears it.
    p.set_config(p.config().clone()).unwrap();
    f.set(|s| s.stop_after = None);
    let r = run(&mut p, &f, 1, Some(99.0)).pop().unwrap();
    assert!(r.ran && !r.stopped && r.written_back > 0);
    // Set from outside, before the tick.
    p.stop_flag().store(true, Relaxed);
    let r = run(&mut p, &f, 1, Some(99.0)).pop().unwrap();
    assert!(!r.ran && r.stopped);
}

#[test]
fn each_action_does_at_most_its_bound_per_tick() {
    let f = Fake::new();
    for name in ["a", "b", "c", "d"] {
        f.add(name, 50_000, 0, 3000);
    }
    f.set(|s| s.limit = 1 << 20); // hugely over
    let mut p = policy(PolicyConfig {
        recompress: true,
        max_pages_per_tick: 777,
        ..cfg()
    });
    let r = run(&mut p, &f, 5, Some(99.0));
    for r in &r {
        assert_eq!(r.recompress_tried, 777);
        assert_eq!(r.written_back, 777);
    }
    for c in f.calls() {
        match c {
            Call::Reclaim { max, .. } => assert!(max <= WRITEBACK_BATCH),
            Call::Recompress { max, .. } => assert!(max <= 777),
            _ => {}
        }
    }
}

// ---- errors, bookkeeping ----

#[test]
fn a_failing_device_is_reported_and_the_others_still_served() {
    let f = Fake::new();
    let a = f.add("a", 5000, 0, 1024);
    let b = f.add("b", 5000, 0, 1024);
    f.dev(a, |d| d.fail = true);
    let mut p = policy(PolicyConfig {
        recompress: true,
        ..cfg()
    });
    let r = run(&mut p, &f, 1, Some(99.0)).pop().unwrap();
    assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
    assert!(r.errors[0].starts_with("a: "));
    assert!(r.devices[b].written_back > 0 && r.devices[b].recompressed > 0);
    let st = p.stats();
    assert_eq!(st.errors, 2);
    assert!(st.last_error.unwrap().contains("disk on fire"));
    assert_eq!(device_stats(&p, "a").errors, 2);
}

#[test]
fn devices_come_and_go_and_the_stats_follow() {
    let f = Fake::new();
    f.add("a", 10, 0, 1024);
    f.add("b", 10, 0, 1024);
    let mut p = policy(cfg());
    run(&mut p, &f, 2, None);
    let names: Vec<_> = p.stats().devices.into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["a", "b"]);
    f.set(|s| {
        s.devs.remove(0);
    });
    run(&mut p, &f, 1, None);
    let st = p.stats();
    assert_eq!(st.devices.len(), 1);
    assert_eq!(st.devices[0].name, "b");
    assert_eq!(st.ticks, 3);
    assert!(st.wall_secs > 0.0 && st.cpu_secs >= 0.0);
    let json = serde_json::to_string(&st).unwrap();
    let back: PolicyStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
}

#[test]
fn an_exhausted_device_rests_before_it_is_scanned_again() {
    let f = Fake::new();
    let a = f.add("a", 0, 1000, 1024); // nothing cold
    let mut p = policy(cfg());
    run(&mut p, &f, 1, Some(99.0));
    assert_eq!(reclaims(&f.calls()), vec![a]);
    run(&mut p, &f, REST.as_secs() - 1, Some(99.0));
    assert!(reclaims(&f.calls()).is_empty());
    run(&mut p, &f, 1, Some(99.0));
    assert_eq!(reclaims(&f.calls()), vec![a]);
}
