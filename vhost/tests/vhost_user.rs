//! The daemon against a real vhost-user frontend (vufront: vhost's `Frontend` over a unix
//! socket, memfd guest memory, split rings built here): what QEMU and a guest would do.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT,
};
use vufront::{Desc, Frontend, GuestMem, Options, Queue, RegionSpec, Request, Segment};
use vzram::BlkDevice;
use vzram::ConfigSpace;
use vzram::DeviceServer;

const DISK: u64 = 64 << 20;
const T: Duration = Duration::from_secs(10);

struct Daemon {
    server: Option<DeviceServer>,
    served: Arc<BlkDevice>,
    socket: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vzram-vu-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn daemon_with(num_queues: u16, readonly: bool, mem_limit: u64) -> Daemon {
    let dir = temp_dir();
    let socket = dir.0.join("vz0.sock");
    let served = common::served(DISK, socket.clone(), num_queues, readonly, mem_limit);
    let blk = ConfigSpace {
        size: DISK,
        blk_size: 4096,
        num_queues,
        queue_size: 256,
    };
    let listener = std::os::unix::net::UnixListener::bind(&served.socket).unwrap();
    let server = DeviceServer::start(served.clone(), listener, blk, vzram::DEFAULT_POLL).unwrap();
    Daemon {
        server: Some(server),
        served,
        socket,
        _dir: dir,
    }
}

fn daemon() -> Daemon {
    daemon_with(4, false, 0)
}

fn opts(num_queues: u16) -> Options {
    Options {
        num_queues,
        ..Options::default()
    }
}

/// Deterministic page content that compresses like swap (text-ish with some noise).
fn page(seed: u64) -> Vec<u8> {
    let mut p = [0u8; 4096];
    pagemix::fill_page(&pagemix::Mix::default(), 7, seed, &mut p);
    p.to_vec()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn features_protocol_and_config() {
    let d = daemon_with(4, false, 0);
    let dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let offered = dev.offered_features();
    for (bit, name) in [
        ((1 << VIRTIO_F_VERSION_1), "VERSION_1"),
        ((1 << VIRTIO_RING_F_EVENT_IDX), "EVENT_IDX"),
        ((1 << VIRTIO_RING_F_INDIRECT_DESC), "INDIRECT_DESC"),
        ((1 << VIRTIO_BLK_F_SEG_MAX), "SEG_MAX"),
        ((1 << VIRTIO_BLK_F_SIZE_MAX), "SIZE_MAX"),
        ((1 << VIRTIO_BLK_F_BLK_SIZE), "BLK_SIZE"),
        ((1 << VIRTIO_BLK_F_TOPOLOGY), "TOPOLOGY"),
        ((1 << VIRTIO_BLK_F_FLUSH), "FLUSH"),
        ((1 << VIRTIO_BLK_F_MQ), "MQ"),
        ((1 << VIRTIO_BLK_F_DISCARD), "DISCARD"),
        ((1 << VIRTIO_BLK_F_WRITE_ZEROES), "WRITE_ZEROES"),
        (
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            "PROTOCOL_FEATURES",
        ),
    ] {
        assert!(offered & bit != 0, "{name} not offered");
    }
    assert_eq!(offered & (1 << VIRTIO_BLK_F_RO), 0);
    // MQ, REPLY_ACK, CONFIG, RESET_DEVICE, CONFIGURE_MEM_SLOTS; never INFLIGHT_SHMFD or STATUS.
    assert_eq!(
        dev.offered_protocol_features(),
        0x1 | 0x8 | 0x200 | 0x2000 | 0x8000
    );
    assert_eq!(dev.max_queues(), 4);
    let c = dev.config();
    assert_eq!(c.capacity, DISK / 512);
    assert_eq!(c.blk_size, 4096);
    assert_eq!(c.seg_max, 254);
    assert_eq!(c.size_max, 1 << 20);
    assert_eq!(c.num_queues, 4);
    assert_eq!(c.physical_block_exp, 0);
    assert_eq!(c.discard_sector_alignment, 8);
    assert_eq!(c.max_discard_seg, 32);
    assert_eq!(c.max_write_zeroes_seg, 32);
    assert_eq!(c.write_zeroes_may_unmap, 1);
    assert!(c.max_discard_sectors >= 1 << 20 && c.max_discard_sectors % 8 == 0);
    // A read-only device says so.
    let ro = daemon_with(1, true, 0);
    let dev = Frontend::connect(&ro.socket, &opts(1)).unwrap();
    assert!(dev.offered_features() & (1 << VIRTIO_BLK_F_RO) != 0);
}

#[test]
fn write_on_one_queue_read_on_another() {
    for event_idx in [true, false] {
        let d = daemon();
        let mut dev = Frontend::connect(
            &d.socket,
            &Options {
                event_idx,
                ..opts(2)
            },
        )
        .unwrap();
        let mut q0 = dev.take_queue(0).unwrap();
        let mut q1 = dev.take_queue(1).unwrap();
        for i in 0..64 {
            q0.write(i * 8, &page(i)).unwrap().check().unwrap();
        }
        for i in 0..64 {
            let c = q1.read(i * 8, 4096).unwrap().check().unwrap();
            assert_eq!(c.used_len, 4097);
            assert!(c.data == page(i), "page {i} (event_idx {event_idx})");
        }
        // A 1 MiB request spanning 256 pages, split over 7 descriptors via an indirect table.
        let big: Vec<u8> = (0..256).flat_map(|i| page(1000 + i)).collect();
        let req = Request::write(4096, &big).with_layout(vufront::Layout::split(7).indirect());
        q0.execute(&req, T).unwrap().check().unwrap();
        let c = q1.read(4096, big.len() as u32).unwrap().check().unwrap();
        assert!(c.data == big);
        let stats = d.served.zram.stats();
        assert_eq!(stats.mm_stat.orig_data_size, (64 + 256) * 4096);
        let q = [d.served.queues[0].snapshot(), d.served.queues[1].snapshot()];
        assert_eq!((q[0].writes, q[1].reads), (65, 65));
    }
}

#[test]
fn all_queues_in_parallel_with_deep_queues() {
    let d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(4)).unwrap();
    let queues = dev.take_queues();
    std::thread::scope(|s| {
        for mut q in queues {
            s.spawn(move || {
                let base = u64::from(q.index()) * 1000;
                // 32 writes in flight, then 32 reads in flight, three times over.
                for round in 0..3u64 {
                    for i in 0..32 {
                        q.enqueue(&Request::write((base + i) * 8, &page(base + i + round)))
                            .unwrap();
                    }
                    q.notify().unwrap();
                    let mut done = 0;
                    while done < 32 {
                        for c in q.complete(T).unwrap() {
                            assert!(c.ok());
                            done += 1;
                        }
                    }
                    let mut tags = std::collections::HashMap::new();
                    for i in 0..32 {
                        tags.insert(q.enqueue(&Request::read((base + i) * 8, 4096)).unwrap(), i);
                    }
                    q.notify().unwrap();
                    while !tags.is_empty() {
                        for c in q.complete(T).unwrap() {
                            let i = tags.remove(&c.tag).unwrap();
                            assert!(
                                c.data == page(base + i + round),
                                "queue {} page {i}",
                                q.index()
                            );
                        }
                    }
                }
            });
        }
    });
    for (i, q) in d.served.queues.iter().enumerate() {
        let q = q.snapshot();
        assert_eq!((q.writes, q.reads, q.io_errors), (96, 96, 0), "queue {i}");
    }
}

#[test]
fn discard_gives_memory_back() {
    let d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    for i in 0..512 {
        q.write(i * 8, &page(i)).unwrap().check().unwrap();
    }
    let store = d.served.zram.store().clone();
    let full = d.served.zram.stats().mm_stat;
    assert_eq!(full.orig_data_size, 512 * 4096);
    assert!(full.mem_used_total > 0);
    let segs = [
        Segment {
            sector: 0,
            num_sectors: 256 * 8,
            flags: 0,
        },
        Segment {
            sector: 256 * 8,
            num_sectors: 256 * 8,
            flags: 0,
        },
    ];
    q.discard(&segs).unwrap().check().unwrap();
    let after = d.served.zram.stats().mm_stat;
    assert_eq!(after.orig_data_size, 0);
    assert_eq!(after.compr_data_size, 0);
    store.compact();
    assert!(
        store.mem_used_total() < full.mem_used_total / 8,
        "{} of {}",
        store.mem_used_total(),
        full.mem_used_total
    );
    assert!(q.read(0, 4096).unwrap().check().unwrap().data == vec![0; 4096]);
    // Unknown flags: S_UNSUPP.
    let c = q
        .discard(&[Segment {
            sector: 0,
            num_sectors: 8,
            flags: 4,
        }])
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn memory_limit_fails_writes_not_the_daemon() {
    let d = daemon_with(1, false, 1 << 20);
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut failed = 0;
    for i in 0..1024u64 {
        // Random bytes do not compress: 1 MiB is used up after about 256 pages.
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let c = q.write(i * 8, &data).unwrap();
        if c.status == VIRTIO_BLK_S_IOERR as u8 {
            failed += 1;
        } else {
            assert_eq!(c.status, VIRTIO_BLK_S_OK as u8);
        }
    }
    assert!(failed > 500, "only {failed} writes failed");
    let store = d.served.zram.store();
    assert!(store.mem_used_total() <= 1 << 20);
    assert_eq!(d.served.zram.stats().io_stat.failed_writes, failed);
    // Still serving: reads work, and writes work again once memory is freed.
    q.read(0, 4096).unwrap().check().unwrap();
    q.discard(&[Segment {
        sector: 0,
        num_sectors: 1024 * 8,
        flags: 0,
    }])
    .unwrap()
    .check()
    .unwrap();
    q.write(0, &page(1)).unwrap().check().unwrap();
}

/// Raw chains through the real socket: each comes back, and the queue keeps working.
#[test]
fn malformed_chains_over_the_socket() {
    let d = daemon();
    // Guest memory with a hole between two regions.
    let mem = GuestMem::new(&[
        RegionSpec {
            gpa: 0x10_0000,
            size: 8 << 20,
        },
        RegionSpec {
            gpa: 0x4000_0000,
            size: 1 << 20,
        },
    ])
    .unwrap();
    let mut dev = Frontend::connect_with_memory(&d.socket, &opts(1), mem.clone()).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.write(0, &page(5)).unwrap().check().unwrap();
    let hdr = |typ: u32, sector: u64| {
        let b = mem.alloc(16, 16).unwrap();
        let mut h = typ.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        b.write_at(0, &h).unwrap();
        b
    };
    let status = mem.alloc(1, 1).unwrap();
    let data = mem.alloc(4096, 4096).unwrap();
    let hole = 0x2000_0000u64;
    let read_hdr = hdr(VIRTIO_BLK_T_IN, 0);
    let short_hdr = mem.alloc(8, 8).unwrap();
    let overflow_hdr = hdr(VIRTIO_BLK_T_IN, u64::MAX - 3);
    let past_end_hdr = hdr(VIRTIO_BLK_T_OUT, DISK / 512);
    type Case = (&'static str, Vec<Desc>, Option<u8>);
    let cases: Vec<Case> = vec![
        (
            "bad header length",
            vec![
                Desc::readable(short_hdr.gpa(), 8).then(1),
                Desc::writable(status.gpa(), 1),
            ],
            Some(VIRTIO_BLK_S_IOERR as u8),
        ),
        (
            "status not writable",
            vec![
                Desc::readable(read_hdr.gpa(), 16).then(1),
                Desc::readable(status.gpa(), 1),
            ],
            None,
        ),
        (
            "address outside guest memory",
            vec![
                Desc::readable(read_hdr.gpa(), 16).then(1),
                Desc::writable(hole, 4096).then(2),
                Desc::writable(status.gpa(), 1),
            ],
            Some(VIRTIO_BLK_S_IOERR as u8),
        ),
        (
            "sector overflow",
            vec![
                Desc::readable(overflow_hdr.gpa(), 16).then(1),
                Desc::writable(data.gpa(), 4096).then(2),
                Desc::writable(status.gpa(), 1),
            ],
            Some(VIRTIO_BLK_S_IOERR as u8),
        ),
        (
            "write past the end",
            vec![
                Desc::readable(past_end_hdr.gpa(), 16).then(1),
                Desc::readable(data.gpa(), 4096).then(2),
                Desc::writable(status.gpa(), 1),
            ],
            Some(VIRTIO_BLK_S_IOERR as u8),
        ),
        (
            "descriptor loop",
            vec![
                Desc::readable(read_hdr.gpa(), 16).then(1),
                Desc::writable(data.gpa(), 512).then(2),
                Desc::writable(status.gpa(), 1).then(0),
            ],
            Some(VIRTIO_BLK_S_IOERR as u8),
        ),
    ];
    for (name, descs, want) in cases {
        status.write_at(0, &[0xff]).unwrap();
        let ids = q.alloc_descs(descs.len()).unwrap();
        for (i, desc) in descs.iter().enumerate() {
            let mut desc = *desc;
            if desc.flags & VRING_DESC_F_NEXT as u16 != 0 {
                desc.next = ids[usize::from(desc.next)];
            }
            q.write_desc(ids[i], desc).unwrap();
        }
        q.push_avail(&[ids[0]]).unwrap();
        q.kick().unwrap();
        let used = q.wait_used(T).unwrap();
        assert_eq!(used.len(), 1, "{name}: one used element");
        assert_eq!(used[0].id, u32::from(ids[0]), "{name}: head");
        let mut s = [0u8];
        status.read_at(0, &mut s).unwrap();
        match want {
            Some(w) => assert_eq!((s[0], used[0].len), (w, 1), "{name}"),
            None => assert_eq!((s[0], used[0].len), (0xff, 0), "{name}"),
        }
        q.free_descs(&ids);
        // The queue still serves.
        assert!(
            q.read(0, 4096).unwrap().check().unwrap().data == page(5),
            "{name}"
        );
    }
}

#[test]
fn corrupt_avail_ring_stops_only_that_queue_until_reconnect() {
    let d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(2)).unwrap();
    let mut q0 = dev.take_queue(0).unwrap();
    let mut q1 = dev.take_queue(1).unwrap();
    q0.write(0, &page(1)).unwrap().check().unwrap();
    // avail->idx a whole ring ahead plus one: a broken driver.
    let idx = q0.avail_idx().wrapping_add(q0.size() + 1);
    q0.set_avail_idx(idx).unwrap();
    q0.kick().unwrap();
    // The other queue keeps serving.
    for i in 0..16 {
        q1.write(8 + i * 8, &page(i)).unwrap().check().unwrap();
    }
    match q0.wait_used(Duration::from_millis(300)) {
        Err(vufront::Error::Timeout { .. }) => {}
        other => panic!("a broken ring completed something: {other:?}"),
    }
    drop((q0, q1, dev));
    // A new connection serves queue 0 again, with the data.
    let mut dev = Frontend::connect(&d.socket, &opts(2)).unwrap();
    let mut q0 = dev.take_queue(0).unwrap();
    assert!(q0.read(0, 4096).unwrap().check().unwrap().data == page(1));
}

#[test]
fn reconnect_keeps_the_data() {
    let d = daemon();
    {
        let mut dev = Frontend::connect(&d.socket, &opts(2)).unwrap();
        let mut q = dev.take_queue(1).unwrap();
        for i in 0..100 {
            q.write(i * 8, &page(i)).unwrap().check().unwrap();
        }
        dev.disconnect();
    }
    wait_until("the daemon to see the hang-up", || {
        !d.served.connected.load(Ordering::Relaxed)
    });
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    for i in 0..100 {
        assert!(
            q.read(i * 8, 4096).unwrap().check().unwrap().data == page(i),
            "page {i}"
        );
    }
    assert_eq!(d.served.connections.load(Ordering::Relaxed), 2);
    assert!(d.served.connected.load(Ordering::Relaxed));
}

/// A backend that died may have added used entries it never signalled; with EVENT_IDX the
/// guest's `used_event` then stays behind, and no later completion would interrupt it. So a
/// started ring signals its call fd once, even before any request (what made a guest hang
/// after a `kill -9` of the daemon and a reconnect).
#[test]
fn a_started_ring_signals_the_guest_once() {
    let d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let q = dev.take_queue(0).unwrap();
    let call = q.call_fd();
    let mut signalled = 0;
    wait_until("the start signal", || {
        signalled += call.read().unwrap_or(0);
        signalled > 0
    });
    assert_eq!(signalled, 1);
    std::thread::sleep(Duration::from_millis(100));
    assert!(call.read().is_err(), "signalled again without a request");
}

#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q: Queue = dev.take_queue(0).unwrap();
    for i in 0..32 {
        q.enqueue(&Request::write(i * 8, &page(i))).unwrap();
    }
    q.notify().unwrap();
    // Stop the queue at once. Whatever the worker had popped must be complete when the answer
    // comes: the base counts exactly the used elements, and none arrive afterwards.
    let base = dev.stop_queue(0).unwrap();
    let done = q.poll_complete().unwrap();
    assert_eq!(done.len(), usize::from(base));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        q.poll_complete().unwrap().is_empty(),
        "a request completed after GET_VRING_BASE"
    );
    // Restarted at that base, the queue serves the rest.
    dev.attach_queue(&mut q, base).unwrap();
    q.kick().unwrap();
    let mut total = done.len();
    while total < 32 {
        let more = q.complete(T).unwrap();
        assert!(more.iter().all(|c| c.ok()));
        total += more.len();
    }
    assert_eq!(d.served.zram.stats().mm_stat.orig_data_size, 32 * 4096);
}

#[test]
fn readonly_device_refuses_writes() {
    let d = daemon_with(1, true, 0);
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(
        q.write(0, &page(1)).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert!(q.read(0, 4096).unwrap().check().unwrap().data == vec![0; 4096]);
    let id = q.get_id().unwrap().check().unwrap();
    assert_eq!(&id.data[..10], b"vzram-test");
}

#[test]
fn stop_cuts_off_the_frontend_and_leaves_the_socket() {
    let mut d = daemon();
    let mut dev = Frontend::connect(&d.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.write(0, &page(7)).unwrap().check().unwrap();
    d.server.take().unwrap().stop();
    // The frontend was hung up on: its next request fails instead of waiting for ever.
    assert!(dev.refresh_config().is_err());
    drop(q);
    // The socket file belongs to whoever bound it (the daemon's main removes it).
    assert!(d.socket.exists());
}
