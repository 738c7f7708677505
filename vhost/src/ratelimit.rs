//! Warnings about guest misbehaviour, rate limited: a guest that sends a million bad requests
//! must not fill the host's log.

use std::fmt::Arguments;
use std::time::{Duration, Instant};

/// Lines allowed per window; the rest are counted and reported when the next window opens.
const BURST: u32 = 5;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RateLimitedLog {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    pub fn new() -> RateLimitedLog {
        RateLimitedLog {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs at warn level unless this window's budget is spent. Returns whether it logged.
    pub fn warn(&mut self, msg: Arguments<'_>) -> bool {
        let now = Instant::now();
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if fresh {
            if self.suppressed > 0 {
                log::warn!("{} similar warnings suppressed", self.suppressed);
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < BURST {
            self.in_window += 1;
            log::warn!("{msg}");
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed() {
        let mut log = RateLimitedLog::new();
        let logged = (0..100)
            .filter(|i| log.warn(format_args!("bad {i}")))
            .count();
        assert_eq!(logged, BURST as usize);
        assert_eq!(log.suppressed, 100 - u64::from(BURST));
        // A new window logs again and reports how many were dropped.
        log.window_start = Some(Instant::now() - WINDOW);
        assert!(log.warn(format_args!("again")));
        assert_eq!(log.suppressed, 0);
    }
}
