//! Setup shared by the integration tests (not every test uses every helper).
#![allow(dead_code)]

use pagemix::{PageKind, fill_kind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use zcomp::Comp;
use zram::{PAGE_SIZE, Store};

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

const SAME_MARK: u64 = 0x5A5A << 48;

/// The content of version `version` (never 0) of page `index`: whole and self-describing. A
/// same-filled version is one word holding a mark, the page and the version; any other holds
/// `(index, version)` in its first 16 bytes and pagemix content seeded by the version after.
pub fn versioned(index: u64, version: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    match version % 4 {
        0 => {
            let word = SAME_MARK | (index & 0xFFFF) << 32 | (version & 0xFFFF_FFFF);
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&word.to_ne_bytes());
            }
        }
        k => {
            let kind = [PageKind::Heap, PageKind::Text, PageKind::Random][k as usize - 1];
            fill_kind(kind, version, index, &mut p);
            p[..8].copy_from_slice(&index.to_le_bytes());
            p[8..16].copy_from_slice(&version.to_le_bytes());
        }
    }
    p
}

/// Checks that `p` is one whole version of page `index` (or all zeroes, for a page never
/// written or discarded) and returns that version (0 for zeroes).
pub fn whole_version(index: u64, p: &[u8; PAGE_SIZE]) -> Result<u64, String> {
    if p.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let word = u64::from_ne_bytes(p[..8].try_into().unwrap());
    if word & (0xFFFF << 48) == SAME_MARK && p.chunks_exact(8).all(|w| w == &p[..8]) {
        if (word >> 32) & 0xFFFF != index & 0xFFFF {
            return Err(format!("page {index}: same-filled page of another index"));
        }
        let low = word & 0xFFFF_FFFF;
        // Versions are (thread + 1) << 32 | counter; the low half and page pin it down to a
        // version whose full content we can rebuild for some thread.
        for t in 1..=8u64 {
            let v = t << 32 | low;
            if v % 4 == 0 && versioned(index, v) == *p {
                return Ok(v);
            }
        }
        return Err(format!(
            "page {index}: unknown same-filled content {word:#x}"
        ));
    }
    let at = u64::from_le_bytes(p[..8].try_into().unwrap());
    let version = u64::from_le_bytes(p[8..16].try_into().unwrap());
    if at != index || version == 0 {
        return Err(format!(
            "page {index}: header says page {at} version {version}"
        ));
    }
    if versioned(index, version) != *p {
        return Err(format!("page {index}: torn or corrupt version {version}"));
    }
    Ok(version)
}
