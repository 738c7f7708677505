//! The calling thread's CPU time, for "CPU seconds the policy spent".

use std::time::Duration;

/// CPU time the calling thread has used (user + system), from
/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`; `None` if the clock is unavailable.
pub fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable `timespec` for the whole call, which is all
    // clock_gettime writes to; the clock id is a constant the kernel knows (or rejects with
    // an error return, which is handled below).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 || ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows_with_work_and_not_with_sleep() {
        let t0 = thread_cpu_time().expect("Linux has a thread CPU clock");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let t1 = thread_cpu_time().unwrap();
        assert!(t1 > t0, "{t0:?} -> {t1:?}");
        std::thread::sleep(Duration::from_millis(50));
        let t2 = thread_cpu_time().unwrap();
        // Sleeping costs (almost) no CPU.
        assert!(t2 - t1 < Duration::from_millis(20), "{t1:?} -> {t2:?}");
    }
}
