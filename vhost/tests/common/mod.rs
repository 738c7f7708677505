//! What the daemon's integration tests share: a device on a fresh store.

use std::path::PathBuf;
use std::sync::Arc;
use vzram::BlkDevice;

/// A served lz4 device of `size` bytes on its own store (memory limit `mem_limit`, 0 = none).
pub fn served(
    size: u64,
    socket: PathBuf,
    num_queues: u16,
    readonly: bool,
    mem_limit: u64,
) -> Arc<BlkDevice> {
    let store = Arc::new(zram::Store::new(zram::StoreConfig::default()).unwrap());
    store.set_mem_limit(mem_limit);
    let comp = Arc::new(zcomp::Comp::parse("lz4", &[]).unwrap());
    let cfg = zram::Config {
        size,
        backing_file: None,
    };
    let device = zram::Device::new(store, comp, cfg).unwrap();
    BlkDevice::new(
        "vz0".into(),
        socket,
        device,
        usize::from(num_queues),
        readonly,
        "vzram-test".into(),
    )
}
