//! Setup shared by the integration tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use zcomp::Comp;
use zram::Store;

/// A backing file path in the temp directory, removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(tag: &str) -> TempFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TempFile(
            std::env::temp_dir().join(format!("vzram-{tag}-{}-{n}.backing", std::process::id())),
        )
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// lz4, with zstd at `zstd_level` as the priority-1 recompression algorithm.
pub fn comp(zstd_level: i32) -> Arc<Comp> {
    let secondary = format!("algo=zstd level={zstd_level} priority=1");
    Arc::new(Comp::parse("lz4", &[&secondary]).expect("lz4 + zstd"))
}

/// A store whose pool may hold `pages` pages.
pub fn store(pages: usize) -> Arc<Store> {
    Arc::new(
        Store::new(zram::StoreConfig {
            capacity_pages: pages,
            ..Default::default()
        })
        .expect("store"),
    )
}
