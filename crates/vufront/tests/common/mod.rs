//! Shared test set-up: temporary socket directories and a ramdisk server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vufront::ramdisk::{Ramdisk, RamdiskConfig, RamdiskServer};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vufront-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A ramdisk served on a fresh socket.
pub struct ServedRamdisk {
    pub disk: Ramdisk,
    pub server: RamdiskServer,
    pub socket: PathBuf,
    _dir: TempDir,
}

pub fn serve(cfg: RamdiskConfig) -> ServedRamdisk {
    let dir = TempDir::new("rd");
    let socket = dir.join("blk.sock");
    let disk = Ramdisk::new(cfg).unwrap();
    let server = disk.serve(&socket).unwrap();
    ServedRamdisk {
        disk,
        server,
        socket,
        _dir: dir,
    }
}

pub fn serve_default() -> ServedRamdisk {
    serve(RamdiskConfig::default())
}

/// Polls `f` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
