//! The policy's work never holds a lock guest I/O waits on across slow work: a recompression
//! pass is stopped inside its compressor (a backend that blocks until the test lets it go),
//! and meanwhile every page is read, rewritten and discarded, another pass writes pages back
//! to the backing file, and the pool is compacted. All of it must finish while the pass is
//! still blocked; if the pass held a slot or class lock across compression, the guest I/O
//! would wait for it and the test would fail on its deadline instead of hanging.

mod common;

use common::TempFile;
use pagemix::{Mix, fill_page};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use zcomp::{Backend, Comp, ConfigError, Context, Lz4, PAGE_SIZE, Priority};
use zram::{Config, Device, Store, StoreConfig};

const PAGES: u64 = 256;
const DEADLINE: Duration = Duration::from_secs(30);

/// Lets compressions through only once opened; tells the test when one is waiting.
#[derive(Debug)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl Gate {
    fn pass(&self) {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Another backend whose compressions wait at the gate.
#[derive(Debug)]
struct Gated {
    inner: Arc<dyn Backend>,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct GatedContext {
    inner: Box<dyn Context>,
    gate: Arc<Gate>,
}

impl Backend for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn new_context(&self) -> Result<Box<dyn Context>, ConfigError> {
        Ok(Box::new(GatedContext {
            inner: self.inner.new_context()?,
            gate: self.gate.clone(),
        }))
    }
}

impl Context for GatedContext {
    fn compress(
        &mut self,
        src: &[u8; PAGE_SIZE],
        dst: &mut [u8; zcomp::BUFFER_SIZE],
    ) -> Result<usize, zcomp::Error> {
        self.gate.pass();
        self.inner.compress(src, dst)
    }

    fn decompress(&mut self, src: &[u8], dst: &mut [u8; PAGE_SIZE]) -> Result<(), zcomp::Error> {
        self.inner.decompress(src, dst)
    }
}

fn page(version: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    fill_page(&Mix::default(), version, index, &mut p);
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..16].copy_from_slice(&version.to_le_bytes());
    p
}

#[test]
fn guest_io_goes_on_while_a_policy_pass_is_blocked_in_compression() {
    let secondary = Priority::new(1).unwrap();
    let zstd = Comp::parse("lz4", &["zstd"]).unwrap();
    let (tx, entered) = mpsc::channel();
    let gate = Arc::new(Gate {
        open: Mutex::new(false),
        opened: Condvar::new(),
        entered: Mutex::new(Some(tx)),
    });
    let comp = Comp::from_backends(
        Arc::new(Lz4::new()),
        vec![(
            secondary,
            Arc::new(Gated {
                inner: zstd.backend(secondary).unwrap().clone(),
                gate: gate.clone(),
            }) as Arc<dyn Backend>,
        )],
    )
    .unwrap();
    let store = Arc::new(
        Store::new(StoreConfig {
            capacity_pages: 4096,
            ..Default::default()
        })
        .unwrap(),
    );
    let backing = TempFile::new("policy-locks");
    let device = Device::new(
        store.clone(),
        Arc::new(comp),
        Config {
            size: PAGES * PAGE_SIZE as u64,
            backing_file: Some(backing.0.clone()),
        },
    )
    .unwrap();
    let dev: &Device = &device;
    let store: &Store = &store;
    let mut s = dev.new_stream();
    for i in 0..PAGES {
        dev.write_page(i, &page(1, i), &mut s).unwrap();
    }
    dev.mark_idle(None);

    let stop = &AtomicBool::new(false);
    std::thread::scope(|scope| {
        let pass = scope.spawn(move || {
            let mut s = dev.new_stream();
            dev.recompress_cold(Duration::ZERO, PAGES, secondary, &mut s, stop)
        });
        entered
            .recv_timeout(DEADLINE)
            .expect("the pass reaches the compressor");
        // The pass now waits inside compression of one of the pages.
        let (done_tx, done) = mpsc::channel();
        let io = scope.spawn(move || {
            let mut s = dev.new_stream();
            let mut got = [0u8; PAGE_SIZE];
            for i in 0..PAGES {
                dev.read_page(i, &mut got, &mut s).unwrap();
                assert!(got == page(1, i), "page {i} before the rewrite");
            }
            for i in 0..PAGES {
                dev.write_page(i, &page(2, i), &mut s).unwrap();
            }
            // Sub-page writes take the slot lock across their read-modify-write.
            dev.write(3 * PAGE_SIZE as u64 + 512, &page(2, 3)[512..1024], &mut s)
                .unwrap();
            dev.discard(PAGES - 8, 8).unwrap();
            // Another pass (writeback to the file) and compaction (class locks).
            dev.mark_idle(None);
            let other_stop = AtomicBool::new(false);
            let moved = dev.reclaim(Duration::ZERO, 64, &other_stop).unwrap();
            assert!(moved.written > 0, "{moved:?}");
            store.compact();
            done_tx.send(()).unwrap();
        });
        let finished = done.recv_timeout(DEADLINE).is_ok();
        // Let the pass go whatever happened, so that a failure does not hang the test.
        gate.release();
        io.join().unwrap();
        assert!(
            finished,
            "guest I/O waited for a policy pass that was blocked in compression"
        );
        let r = pass.join().unwrap().unwrap();
        assert!(r.tried > 0, "{r:?}");
    });
    // Nothing the blocked pass had copied was installed over the newer content.
    let mut got = [0u8; PAGE_SIZE];
    for i in 0..PAGES {
        dev.read_page(i, &mut got, &mut s).unwrap();
        let want = if i >= PAGES - 8 {
            [0u8; PAGE_SIZE]
        } else {
            page(2, i)
        };
        assert!(got == want, "page {i} after the pass");
    }
}
