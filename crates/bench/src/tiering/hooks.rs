//! Where the scenario meets issue #14's API (per-device memory, the policy thread, the tiering
//! counters). Each function below is the one place to change when that API lands; today they
//! use what exists and say "not available" where nothing does. Nothing else in the scenario
//! touches the new API.

use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// A device of the scenario on the shared store.
///
/// #14: `zram::Device::new` returns `Arc<Device>` (and registers it in the store): drop the
/// `Arc::new`.
pub(super) fn new_device(
    store: Arc<zram::Store>,
    comp: Arc<zcomp::Comp>,
    cfg: zram::Config,
) -> Result<Arc<zram::Device>, zram::Error> {
    Ok(Arc::new(zram::Device::new(store, comp, cfg)?))
}

/// One device's memory: its compressed bytes plus its share of the allocator's overhead.
///
/// #14: `Some(device.mem_used())`.
pub(super) fn device_mem_used(_device: &zram::Device) -> Option<u64> {
    None
}

/// What zram's tiering counters say about one device (`Stats.tiering`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tiering {
    pub recompressed: u64,
    pub written_back: u64,
    pub direct_reclaimed: u64,
    pub direct_reclaim_failed: u64,
}

/// #14: from `stats.tiering` (`Some(Tiering { recompressed: t.recompressed, ... })`).
pub(super) fn tiering(_stats: &zram::Stats) -> Option<Tiering> {
    None
}

/// The policy settings the scenario chooses (the rest keep the daemon's defaults).
#[derive(Clone, Debug)]
#[allow(dead_code, reason = "read by the policy once #14's is plugged in")]
pub(super) struct PolicyKnobs {
    /// Pages not accessed for this long are cold (recompression, writeback, direct reclaim).
    pub idle_age: Duration,
    /// The back-off target: promotions per minute as a fraction of recently used pages.
    pub promotion_target: f64,
}

/// A running policy thread.
#[derive(Debug)]
pub(super) struct Policy {
    // #14: the daemon's policy thread handle.
}

/// What the policy did over a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyOutcome {
    /// CPU time of the policy thread.
    pub cpu_seconds: Option<f64>,
    /// The policy's own statistics (`PolicyStats`), as it serialises them.
    pub stats: Option<serde_json::Value>,
}

/// Starts the policy thread over `store` and its `devices` with `knobs`, as
/// `vzram serve --policy on --idle-age ...` does; `None` when this build has no policy (the
/// run then goes on without one, and the report says so).
///
/// #14: start the daemon's policy thread here (and `store.set_reclaim_age(knobs.idle_age)`
/// if the policy does not set it itself).
pub(super) fn start_policy(
    store: &Arc<zram::Store>,
    devices: &[Arc<zram::Device>],
    knobs: &PolicyKnobs,
) -> Option<Policy> {
    let _ = (store, devices, knobs);
    None
}

impl Policy {
    /// Stops the thread and says what it did.
    ///
    /// #14: stop and join the thread; CPU time and `PolicyStats` from it.
    pub(super) fn stop(self) -> PolicyOutcome {
        PolicyOutcome::default()
    }
}
