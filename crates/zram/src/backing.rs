//! The backing file that written-back pages live in: one 4 KiB block per page.

use crate::PAGE_SIZE;
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

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

/// What an existing file at `path` holds, as a reason not to use it as a backing file
/// without being told to: `None` if there is no file or it is an empty regular file (size 0,
/// no block allocated); otherwise a description such as `"8192 bytes, 4096 allocated"` or
/// `"not a regular file"`. Errors name the path.
pub fn existing_data(path: &Path) -> io::Result<Option<String>> {
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_file() => Ok(Some("not a regular file".into())),
        Ok(m) if m.len() == 0 && m.blocks() == 0 => Ok(None),
        Ok(m) => Ok(Some(format!(
            "{} bytes, {} allocated",
            m.len(),
            m.blocks() * 512
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(with_path(path, e)),
    }
}

/// `e` with `path` in front of its message (io::Error's own never names the file).
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Backing {
    /// Opens (creating if needed) `path` with room for `pages` blocks; the file is sparse.
    /// A new file is created 0600: it holds guests' memory. The file is locked (`flock`,
    /// exclusive) while open: a file another device or process writes back to is refused.
    /// It is extended if shorter, never shortened; callers decide beforehand whether its
    /// content may be overwritten ([`existing_data`]). Errors name the path.
    pub fn open(path: &Path, pages: u64) -> io::Result<Backing> {
        Self::open_file(path, pages).map_err(|e| with_path(path, e))
    }

    fn open_file(path: &Path, pages: u64) -> io::Result<Backing> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if !file.metadata()?.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        // SAFETY: flock on the fd we just opened and keep; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "in use as the backing file of another device or process",
                ));
            }
            return Err(e);
        }
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

    /// Whether `block` is inside the file.
    pub fn holds(&self, block: u64) -> bool {
        block < self.cap
    }

    /// Recovery: `used` are the blocks that slots hold; the others are free. Blocks a dead
    /// process wrote but never installed are punched out.
    pub fn restore(&self, used: &mut [u64]) {
        used.sort_unstable();
        let next = used.last().map_or(0, |&b| b + 1);
        let mut free = Vec::new();
        let mut expected = 0;
        for &b in used.iter().chain([next].iter()) {
            free.extend(expected..b);
            expected = b + 1;
        }
        for &b in &free {
            self.punch(b);
        }
        let _ns = preempt::NonSleepGuard::new();
        *self.blocks.lock() = Blocks { free, next };
    }

    fn punch(&self, block: u64) {
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
    }

    /// Frees a block and punches it out of the file so the disk space is given back.
    pub fn free(&self, block: u64) {
        self.punch(block);
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

    #[test]
    fn existing_data_tells_an_empty_file_from_one_with_data() {
        let dir = std::env::temp_dir().join(format!("zram-existing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b");
        assert_eq!(existing_data(&path).unwrap(), None);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(existing_data(&path).unwrap(), None);
        // Sparse but long: it was used (a backing file is extended when opened).
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let d = existing_data(&path).unwrap().unwrap();
        assert!(d.starts_with("1048576 bytes"), "{d}");
        std::fs::write(&path, [1; 4096]).unwrap();
        let d = existing_data(&path).unwrap().unwrap();
        assert!(
            d.starts_with("4096 bytes, ") && !d.contains(" 0 allocated"),
            "{d}"
        );
        assert_eq!(
            existing_data(&dir).unwrap().as_deref(),
            Some("not a regular file")
        );
        // A path through a regular file: ENOTDIR, not "missing".
        let e = existing_data(&path.join("y")).unwrap_err();
        assert!(e.to_string().contains("/b/y"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_errors_name_the_path_and_a_file_in_use_is_refused() {
        let dir = std::env::temp_dir().join(format!("zram-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no/such/dir/b");
        let e = Backing::open(&missing, 16).unwrap_err();
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        let e = Backing::open(&dir, 16).unwrap_err();
        assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
        let path = dir.join("b");
        let first = Backing::open(&path, 16).unwrap();
        let e = Backing::open(&path, 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(
            e.to_string().contains(&*path.to_string_lossy()) && e.to_string().contains("in use"),
            "{e}"
        );
        drop(first);
        Backing::open(&path, 16).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
