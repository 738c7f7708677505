//! The backing file that written-back pages live in: one 4 KiB block per page.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use zsmalloc::PAGE_SIZE;

#[derive(Debug)]
struct Blocks {
    free: Vec<u64>,
    next: u64,
}

#[derive(Debug)]
pub struct Backing {
    file: File,
    blocks: Mutex<Blocks>,
    cap: u64,
}

impl Backing {
    /// Opens (creating if needed) `path` with room for `pages` blocks; the file is sparse.
    /// A new file is created 0600: it holds guests' memory.
    pub fn open(path: &Path, pages: u64) -> io::Result<Backing> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let want = pages * PAGE_SIZE as u64;
        if file.metadata()?.len() < want {
            file.set_len(want)?;
        }
        Ok(Backing {
            file,
            blocks: Mutex::new(Blocks {
                free: Vec::new(),
                next: 0,
            }),
            cap: pages,
        })
    }

    pub fn alloc(&self) -> Option<u64> {
        let _ns = preempt::NonSleepGuard::new();
        let mut b = self.blocks.lock();
        b.free.pop().or_else(|| {
            (b.next < self.cap).then(|| {
                b.next += 1;
                b.next - 1
            })
        })
    }

    /// Frees a block and punches it out of the file so the disk space is given back.
    pub fn free(&self, block: u64) {
        // SAFETY: fallocate on our own open fd with a range inside the file; failure (a file
        // system without hole punching) only leaves the bytes allocated.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (block * PAGE_SIZE as u64) as libc::off_t,
                PAGE_SIZE as libc::off_t,
            );
        }
        let _ns = preempt::NonSleepGuard::new();
        self.blocks.lock().free.push(block);
    }

    pub fn write(&self, block: u64, data: &[u8]) -> io::Result<()> {
        preempt::might_sleep();
        self.file.write_all_at(data, block * PAGE_SIZE as u64)
    }

    pub fn read(&self, block: u64, data: &mut [u8]) -> io::Result<()> {
        preempt::might_sleep();
        self.file.read_exact_at(data, block * PAGE_SIZE as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_backing_file_is_private_and_sparse() {
        let path = std::env::temp_dir().join(format!("zram-backing-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let b = Backing::open(&path, 1024).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 1024 * PAGE_SIZE as u64);
        let block = b.alloc().unwrap();
        b.write(block, &[7; PAGE_SIZE]).unwrap();
        let mut back = [0; PAGE_SIZE];
        b.read(block, &mut back).unwrap();
        assert_eq!(back, [7; PAGE_SIZE]);
        drop(b);
        std::fs::remove_file(&path).unwrap();
    }
}
