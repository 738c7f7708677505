//! The `vzram-policy` thread: runs zram's tiering policy ([`zram::policy`]) over the daemon's
//! devices every `interval`, and takes its configuration from the control socket.
//!
//! The policy only decides; the work it asks for (compaction, recompression, writeback) runs
//! here, on this thread, through the store's own maintenance operations, which never hold a
//! slot lock across compression or file I/O: guest I/O goes on beside it. A configuration
//! change or a shutdown sets the policy's stop flag, which ends a running tick within a page.

use crate::device::BlkDevice;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use zcomp::{Priority, Stream};
use zram::policy::{self, DeviceView, Policy, PolicyConfig, PolicyStats, Target};

/// How the policy thread is set up.
#[derive(Clone, Debug)]
pub struct PolicySetup {
    /// The policy's knobs (`enabled: false`: the thread waits for `policy on`).
    pub config: PolicyConfig,
    /// Where host memory pressure is read (`some avg10`); missing or unreadable: watermarks
    /// only.
    pub psi_file: PathBuf,
}

impl Default for PolicySetup {
    fn default() -> Self {
        PolicySetup {
            config: PolicyConfig::default(),
            psi_file: PathBuf::from(policy::DEFAULT_PSI_PATH),
        }
    }
}

/// The policy thread, as the control plane (and `vzram-bench`, which runs devices of its own)
/// drives it. Dropping it stops the thread.
#[derive(Debug)]
pub struct PolicyThread {
    /// The configuration in force (what the thread was last given).
    config: Mutex<PolicyConfig>,
    /// Published by the thread after every tick.
    stats: Arc<Mutex<PolicyStats>>,
    /// The policy's stop flag: ends a running tick.
    stop: Arc<AtomicBool>,
    tx: Mutex<Option<mpsc::Sender<PolicyConfig>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl PolicyThread {
    /// Starts the thread over `store` and its devices.
    pub fn start(
        setup: PolicySetup,
        store: Arc<zram::Store>,
        devices: Vec<Arc<BlkDevice>>,
    ) -> Result<PolicyThread, String> {
        let mut policy = Policy::new(setup.config.clone()).map_err(|e| e.to_string())?;
        store.set_reclaim_age(setup.config.idle_age);
        let stats = Arc::new(Mutex::new(policy.stats()));
        let stop = policy.stop_flag();
        let (tx, rx) = mpsc::channel::<PolicyConfig>();
        let published = stats.clone();
        let psi_file = setup.psi_file;
        let thread = std::thread::Builder::new()
            .name("vzram-policy".into())
            .spawn(move || {
                let target = DaemonTarget {
                    store,
                    devices,
                    streams: RefCell::new(HashMap::new()),
                };
                loop {
                    match rx.recv_timeout(policy.config().interval) {
                        Ok(cfg) => {
                            target.store.set_reclaim_age(cfg.idle_age);
                            if let Err(e) = policy.set_config(cfg) {
                                // Checked before it was sent; keep the old one.
                                log::warn!("policy: {e}");
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if policy.config().enabled {
                                let psi = policy::read_psi(&psi_file);
                                let report = policy.tick(&target, Instant::now(), psi);
                                log_tick(&report);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    *published.lock() = policy.stats();
                }
            })
            .map_err(|e| format!("spawning the policy thread: {e}"))?;
        Ok(PolicyThread {
            config: Mutex::new(setup.config),
            stats,
            stop,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> PolicyConfig {
        self.config.lock().clone()
    }

    /// What the policy has done, as of its last pass.
    pub fn stats(&self) -> PolicyStats {
        self.stats.lock().clone()
    }

    /// Checks `cfg` and hands it to the thread, cutting a running tick short. The thread
    /// publishes its statistics with the new configuration right after.
    pub fn set(&self, cfg: PolicyConfig) -> Result<(), policy::Error> {
        cfg.validate()?;
        let mut current = self.config.lock();
        self.stop.store(true, Relaxed);
        if let Some(tx) = &*self.tx.lock() {
            // A closed channel means the daemon is stopping: nothing left to configure.
            let _ = tx.send(cfg.clone());
        }
        *current = cfg;
        Ok(())
    }

    /// Stops the thread (within a page of the running tick) and waits for it.
    pub fn shutdown(&self) {
        self.stop.store(true, Relaxed);
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take()
            && t.join().is_err()
        {
            log::warn!("the policy thread panicked");
        }
    }
}

impl Drop for PolicyThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn log_tick(r: &policy::TickReport) {
    if r.compacted_pages + r.recompressed + r.written_back > 0 {
        log::debug!(
            "policy: compacted {} pages, recompressed {} of {} tried, wrote back {} ({} bytes freed)",
            r.compacted_pages,
            r.recompressed,
            r.recompress_tried,
            r.written_back,
            r.freed_bytes
        );
    }
    for e in &r.errors {
        log::warn!("policy: {e}");
    }
}

/// The store and the daemon's devices, as the policy sees them. Lives on the policy thread.
struct DaemonTarget {
    store: Arc<zram::Store>,
    devices: Vec<Arc<BlkDevice>>,
    /// One compression stream per device for recompression, made on first use.
    streams: RefCell<HashMap<String, Stream>>,
}

/// The first secondary algorithm of a device: the one recompression uses.
fn secondary(d: &BlkDevice) -> Option<Priority> {
    d.zram.comp().priorities().find(|p| !p.is_primary())
}

impl Target for DaemonTarget {
    type Device = Arc<BlkDevice>;
    type Error = zram::Error;

    fn devices(&self) -> Vec<Arc<BlkDevice>> {
        self.devices.clone()
    }

    fn view(&self, d: &Arc<BlkDevice>) -> DeviceView {
        let s = d.zram.stats();
        DeviceView {
            name: d.name.clone(),
            mem_used: s.memory.used,
            mem_limit: s.memory.limit,
            share: s.memory.share,
            stored_pages: (s.mm_stat.orig_data_size / zram::PAGE_SIZE as u64)
                .saturating_sub(s.bd_stat.bd_count),
            promoted: s.tiering.promoted,
            has_backing: d.zram.has_backing(),
            has_secondary: secondary(d).is_some(),
        }
    }

    fn set_cold_age(&self, d: &Arc<BlkDevice>, age: Duration) {
        d.zram.set_cold_age(age);
    }

    fn recently_used_pages(&self, d: &Arc<BlkDevice>, window: Duration) -> u64 {
        d.zram.recently_used_pages(window)
    }

    fn reclaim(
        &self,
        d: &Arc<BlkDevice>,
        min_age: Duration,
        max_pages: u64,
        stop: &AtomicBool,
    ) -> Result<zram::Reclaimed, zram::Error> {
        d.zram.reclaim(min_age, max_pages, stop)
    }

    fn recompress_cold(
        &self,
        d: &Arc<BlkDevice>,
        min_age: Duration,
        max_pages: u64,
        stop: &AtomicBool,
    ) -> Result<zram::RecompressResult, zram::Error> {
        let Some(prio) = secondary(d) else {
            return Ok(Default::default());
        };
        let mut streams = self.streams.borrow_mut();
        let stream = streams
            .entry(d.name.clone())
            .or_insert_with(|| d.zram.new_stream());
        d.zram
            .recompress_cold(min_age, max_pages, prio, stream, stop)
    }

    fn pool_bytes_used(&self) -> u64 {
        self.store.mem_used_total()
    }

    fn mem_limit(&self) -> u64 {
        self.store.mem_limit()
    }

    fn freeable_pages(&self) -> u64 {
        self.store.freeable_pages() as u64
    }

    fn compact(&self) -> u64 {
        self.store.compact() as u64
    }
}
