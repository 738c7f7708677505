//! The guest image: kernel and initramfs made by `ci/guest-image`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A built guest: what QEMU boots.
#[derive(Clone, Debug)]
pub struct Image {
    /// `vmlinuz` of the Debian cloud kernel.
    pub kernel: PathBuf,
    /// The gzip'd cpio initramfs (busybox, modules, /init, swaptest, blktest).
    pub initrd: PathBuf,
    /// Kernel release, `6.1.0-NN-cloud-amd64`.
    pub kver: String,
    /// How long `ci/guest-image` took in this process (near zero when it was up to date).
    pub build_time: Duration,
}

/// The workspace root (this package lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where the image is built: `$VZRAM_GUEST_DIR`, else `<root>/build/guest` (as the script).
pub fn image_dir() -> PathBuf {
    std::env::var_os("VZRAM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/guest"))
}

impl Image {
    /// The image, built or brought up to date by `ci/guest-image` once per test process.
    ///
    /// The script is cheap when nothing changed (it compares a hash of its inputs) and takes a
    /// lock, so concurrent test processes do not build twice. With `VZRAM_GUEST_NO_BUILD=1`
    /// the script is not run and an existing image is used as it is.
    pub fn get() -> Result<&'static Image, String> {
        static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
        IMAGE
            .get_or_init(Image::build)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build() -> Result<Image, String> {
        let t = Instant::now();
        if std::env::var_os("VZRAM_GUEST_NO_BUILD").is_none() {
            let script = workspace_root().join("ci/guest-image");
            let out = Command::new(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let dir = image_dir();
        let env = std::fs::read_to_string(dir.join("image.env")).map_err(|e| {
            format!(
                "no guest image in {} ({e}); build it with ci/guest-image",
                dir.display()
            )
        })?;
        let vars: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
        let image = Image {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
            kver: vars.get("KVER").unwrap_or(&"?").to_string(),
            build_time: t.elapsed(),
        };
        for f in [&image.kernel, &image.initrd] {
            if !f.is_file() {
                return Err(format!("{} is missing; run ci/guest-image", f.display()));
            }
        }
        Ok(image)
    }
}
