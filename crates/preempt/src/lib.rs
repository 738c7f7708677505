//! The user-space stand-in for the kernel's preempt count.
//!
//! In the kernel, code that holds a spinlock must not sleep, and `might_sleep()` catches code
//! that tries. vzram has the same rule: a short lock that other workers spin or wait on (a size
//! class lock in zsmalloc, a slot lock in zram) must never be held across work that may block or
//! take long (compression, guest memory access, file I/O).
//!
//! Every such section holds a [`NonSleepGuard`], which raises a thread-local depth; every entry
//! point that may sleep (zcomp's compress and decompress, zram's writeback I/O) calls
//! [`might_sleep`], which panics when the depth is not zero. The check exists in debug builds
//! only: in release builds the guard is a zero-sized no-op and `might_sleep` compiles away, so
//! tests (debug) prove the rule and the daemon (release) pays nothing for it.

#[cfg(debug_assertions)]
use std::cell::Cell;
use std::marker::PhantomData;

#[cfg(debug_assertions)]
thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as inside a non-sleepable section until dropped.
///
/// Not `Send`: the depth belongs to the thread that raised it.
#[must_use = "the section ends when the guard is dropped"]
#[derive(Debug)]
pub struct NonSleepGuard {
    _not_send: PhantomData<*const ()>,
}

impl NonSleepGuard {
    /// Enters a non-sleepable section (nests).
    #[inline]
    pub fn new() -> Self {
        #[cfg(debug_assertions)]
        DEPTH.with(|d| d.set(d.get() + 1));
        NonSleepGuard {
            _not_send: PhantomData,
        }
    }
}

impl Default for NonSleepGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NonSleepGuard {
    #[inline]
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Depth of non-sleepable sections on this thread (always 0 in release builds).
#[inline]
pub fn depth() -> u32 {
    #[cfg(debug_assertions)]
    {
        DEPTH.with(|d| d.get())
    }
    #[cfg(not(debug_assertions))]
    {
        0
    }
}

/// Asserts (debug builds) that the caller may sleep: no non-sleepable section is open on this
/// thread.
///
/// # Panics
///
/// In debug builds, when called inside a [`NonSleepGuard`]'s section.
#[inline]
#[track_caller]
pub fn might_sleep() {
    #[cfg(debug_assertions)]
    {
        let d = depth();
        assert!(
            d == 0,
            "might_sleep() called inside a non-sleepable section (depth {d}): \
             a lock that others wait on is held across work that may block"
        );
    }
}

/// How a thread waits for a lock word that another thread holds for a short while (a zspage
/// being compacted, a slot being decoded): a few spins, then it yields the CPU on every retry,
/// so that on a machine with fewer cores than threads the holder gets to run.
#[derive(Debug, Default)]
pub struct Backoff {
    spins: u32,
}

impl Backoff {
    const SPINS: u32 = 64;

    pub fn new() -> Self {
        Self::default()
    }

    /// Waits a little before the next try.
    #[inline]
    pub fn snooze(&mut self) {
        if self.spins < Self::SPINS {
            self.spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_any_section_sleeping_is_allowed() {
        assert_eq!(depth(), 0);
        might_sleep();
    }

    #[test]
    fn guards_nest_and_unwind() {
        {
            let _a = NonSleepGuard::new();
            let _b = NonSleepGuard::new();
            if cfg!(debug_assertions) {
                assert_eq!(depth(), 2);
            }
        }
        assert_eq!(depth(), 0);
        might_sleep();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "non-sleepable section")]
    fn sleeping_inside_a_section_panics() {
        let _g = NonSleepGuard::new();
        might_sleep();
    }

    #[test]
    fn depth_is_per_thread() {
        let _g = NonSleepGuard::new();
        std::thread::spawn(|| {
            assert_eq!(depth(), 0);
            might_sleep();
        })
        .join()
        .unwrap();
    }
}
