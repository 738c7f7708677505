//! Guest memory that vanishes under us: a SIGBUS guard.
//!
//! Guest memory is a file (memfd, hugetlbfs, /dev/shm) that the frontend shares with us and
//! still controls. If it shrinks the file after we mapped it, the next access to a page past
//! the new end raises SIGBUS, whose default action would end the whole daemon, and with it
//! every other VM's disk. So:
//!
//! - every guest memory mapping is registered here while it is mapped (a fixed table of
//!   address ranges, readable from a signal handler without locks or allocation);
//! - the SIGBUS handler looks the faulting address up; inside a registered range it maps an
//!   anonymous page over the faulting page (so the interrupted access completes, reading
//!   zeros or writing into a page nobody sees), marks the range's owner as faulted and
//!   returns; outside every range it restores the default action and returns, so the fault
//!   repeats and ends the process as it would have without us;
//! - the owner (a vhost-user connection) checks [`Registration::faulted`] after each request
//!   and drops the connection: that frontend's disk stops, nothing else notices.
//!
//! A range is unregistered only after the mapping can no longer be touched (the owner keeps
//! the mapping alive while it is registered), so the handler never patches memory that has
//! been reused for something else.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Registered guest mappings across all connections (509 regions per connection are allowed,
/// but QEMU uses a handful).
const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    /// Exclusive end; 0 for a free slot.
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Taken to pick free slots; the signal handler never takes it.
static ALLOC: Mutex<()> = Mutex::new(());
/// Faults repaired so far; a cheap "did anything happen" check for the request path.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
static INSTALL_ERROR: AtomicU64 = AtomicU64::new(0);

/// Number of guest memory faults repaired since the process started.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Installs the SIGBUS handler (once per process).
pub fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        // SAFETY: `action` is initialised; a null old-action pointer is allowed.
        let rc = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL);
            INSTALL_ERROR.store(errno as u64, Ordering::Relaxed);
        }
    });
    match INSTALL_ERROR.load(Ordering::Relaxed) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        let end = slot.end.load(Ordering::Acquire);
        if end == 0 || addr < slot.start.load(Ordering::Acquire) || addr >= end {
            continue;
        }
        if replace_page(addr) {
            slot.faulted.store(true, Ordering::Release);
            FAULTS.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not guest memory (or not repairable): let the fault happen again with the default
    // action, which ends the process as it would have without this handler.
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Maps anonymous memory over the page holding `addr` (a 4 KiB page, or a 2 MiB one where the
/// mapping is made of huge pages and cannot be split). Async-signal-safe: one syscall.
fn replace_page(addr: usize) -> bool {
    for size in [4096usize, 2 << 20] {
        let page = addr & !(size - 1);
        // SAFETY: the page lies in a guest mapping that its owner keeps mapped while it is
        // registered, and that only guest data lives in; replacing it changes what the
        // interrupted access sees, never memory of ours.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

#[derive(Debug, thiserror::Error)]
#[error("too many guest memory mappings in the daemon ({SLOTS})")]
pub struct TableFull;

/// Guest memory ranges registered by one owner; unregistered when dropped. Drop it only once
/// nothing can touch those mappings any more, and before they are unmapped.
#[derive(Debug, Default)]
pub struct Registration {
    slots: Vec<usize>,
}

impl Registration {
    /// Registers `ranges` (host address, length) as guest memory.
    pub fn new(
        ranges: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Registration, TableFull> {
        let _alloc = ALLOC.lock().unwrap_or_else(|e| e.into_inner());
        let mut reg = Registration::default();
        for (start, len) in ranges {
            if len == 0 {
                continue;
            }
            let Some(i) = TABLE
                .iter()
                .position(|s| s.end.load(Ordering::Acquire) == 0)
            else {
                // `reg` drops here and frees what it took.
                return Err(TableFull);
            };
            let slot = &TABLE[i];
            slot.faulted.store(false, Ordering::Relaxed);
            slot.start.store(start, Ordering::Release);
            slot.end.store(start.saturating_add(len), Ordering::Release);
            reg.slots.push(i);
        }
        Ok(reg)
    }

    /// True once an access to one of these ranges faulted (and was repaired).
    pub fn faulted(&self) -> bool {
        self.slots
            .iter()
            .any(|&i| TABLE[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _alloc = ALLOC.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.slots {
            TABLE[i].end.store(0, Ordering::Release);
            TABLE[i].start.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_shared_mapping_is_repaired_and_reported() {
        install().unwrap();
        let mut file = tempfile_in_shm();
        file.write_all(&[0xabu8; 8192]).unwrap();
        // SAFETY: a fresh shared mapping of a file we own; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let reg = Registration::new([(p as usize, 8192)]).unwrap();
        assert!(!reg.faulted());
        file.set_len(4096).unwrap();
        let before = faults();
        // SAFETY: the first page is still backed; the second faults and is replaced by an
        // anonymous page by the handler, so both reads complete.
        let (a, b) = unsafe {
            (
                std::ptr::read_volatile(p as *const u8),
                std::ptr::read_volatile((p as *const u8).add(4096)),
            )
        };
        assert_eq!((a, b), (0xab, 0));
        assert!(reg.faulted());
        assert_eq!(faults(), before + 1);
        drop(reg);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 8192) };
    }

    #[test]
    fn registrations_free_their_slots() {
        let used = || {
            TABLE
                .iter()
                .filter(|s| s.end.load(Ordering::Acquire) != 0)
                .count()
        };
        let regs: Vec<_> = (0..100)
            .map(|i| Registration::new([(0x1000_0000 + i * 0x1000, 0x1000)]).unwrap())
            .collect();
        assert!(used() >= 100);
        drop(regs);
        // Other tests may hold a few slots at the same time.
        assert!(used() < 100);
    }

    fn tempfile_in_shm() -> std::fs::File {
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(c"vzram-fault-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }
}
