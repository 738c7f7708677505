//! Host memory pressure from Linux PSI (`/proc/pressure/memory`).
//!
//! The file reads (Documentation/accounting/psi.rst):
//!
//! ```text
//! some avg10=0.12 avg60=0.05 avg300=0.01 total=123456
//! full avg10=0.00 avg60=0.00 avg300=0.00 total=2345
//! ```
//!
//! `some avg10` is the share of the last 10 seconds (in percent) in which at least one task
//! stalled waiting for memory. Kernels without PSI (`CONFIG_PSI=n`, `psi=0`, or a container
//! that hides `/proc/pressure`) have no such file: the policy then runs on its watermarks alone.

use std::io::Read;
use std::path::Path;

/// The file the daemon reads by default.
pub const DEFAULT_PSI_PATH: &str = "/proc/pressure/memory";

/// The real file is under 200 bytes; anything much longer is not PSI.
const MAX_LEN: u64 = 4096;

/// `some avg10` (percent, 0..=100) of the PSI file at `path`; `None` when the file is missing,
/// unreadable or does not parse. Never panics.
pub fn read_psi(path: &Path) -> Option<f64> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_LEN)
        .read_to_string(&mut text)
        .ok()?;
    parse_some_avg10(&text)
}

/// `some avg10` of a PSI text, `None` if it has no well-formed `some` line.
pub fn parse_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let value = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?;
    let v: f64 = value.parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_file(name: &str, content: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vzram-psi-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn reads_some_avg10_of_a_real_looking_file() {
        let p = temp_file(
            "ok",
            b"some avg10=12.34 avg60=5.00 avg300=1.00 total=123456\n\
              full avg10=99.00 avg60=0.00 avg300=0.00 total=2345\n",
        );
        assert_eq!(read_psi(&p), Some(12.34));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_full_line_is_not_taken_for_the_some_line() {
        assert_eq!(
            parse_some_avg10("full avg10=50.00 avg60=0 avg300=0 total=1\n"),
            None
        );
        assert_eq!(
            parse_some_avg10("full avg10=50.00 total=1\nsome avg10=0.50 total=2\n"),
            Some(0.5)
        );
    }

    #[test]
    fn missing_unreadable_or_garbled_files_give_none() {
        let dir = std::env::temp_dir();
        assert_eq!(read_psi(&dir.join("vzram-psi-does-not-exist")), None);
        // A directory cannot be read as a file.
        assert_eq!(read_psi(&dir), None);
        for (name, content) in [
            ("empty", &b""[..]),
            ("words", b"hello world\n"),
            ("no-avg10", b"some avg60=1.00 total=3\n"),
            ("not-a-number", b"some avg10=abc avg60=1.00\n"),
            ("nan", b"some avg10=NaN avg60=1.00\n"),
            ("negative", b"some avg10=-3 avg60=1.00\n"),
            ("too-big", b"some avg10=250.0\n"),
            ("binary", b"\xff\xfe\x00some avg10=\xff\n"),
        ] {
            let p = temp_file(name, content);
            assert_eq!(read_psi(&p), None, "{name}");
            std::fs::remove_file(p).unwrap();
        }
    }
}
