//! Well-formed virtio-blk traffic against the in-memory backend: every layout, every request
//! type, many requests in flight, negotiation, and reconnects.

mod common;

use common::*;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vufront::ramdisk::RamdiskConfig;
use vufront::*;

fn opts(queues: u16) -> Options {
    Options {
        num_queues: queues,
        connect_timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

#[test]
fn config_and_features_are_negotiated() {
    let s = serve_default();
    let dev = Frontend::connect(&s.socket, &opts(2)).unwrap();
    let c = dev.config();
    assert_eq!(c, &s.disk.blk_config());
    assert_eq!(dev.capacity(), 64 << 20);
    assert_eq!(c.num_queues, 2);
    assert_eq!(dev.max_queues(), 2);
    let f = dev.features();
    for bit in [
        (1 << VIRTIO_F_VERSION_1),
        (1 << VIRTIO_RING_F_EVENT_IDX),
        (1 << VIRTIO_RING_F_INDIRECT_DESC),
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        (1 << VIRTIO_BLK_F_FLUSH),
        (1 << VIRTIO_BLK_F_MQ),
    ] {
        assert_ne!(
            f & bit,
            0,
            "{:?} lacks {:?}",
            feature_names(f),
            feature_names(bit)
        );
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & !dev.offered_features(),
        0,
        "acked only what was offered"
    );
}

#[test]
fn refused_and_unoffered_features() {
    let s = serve(RamdiskConfig {
        event_idx: false,
        indirect: false,
        ..RamdiskConfig::default()
    });
    let mut dev = Frontend::connect(&s.socket, &opts(1)).unwrap();
    assert_eq!(
        dev.features() & ((1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)),
        0
    );
    let mut q = dev.take_queue(0).unwrap();
    assert!(!q.event_idx());
    let err = q
        .submit(&Request::read(0, 512).with_layout(Layout::default().indirect()))
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    q.write(0, &[1; 512]).unwrap().check().unwrap();
    drop(dev);

    // A frontend that acks a feature nobody offered is refused at SET_FEATURES.
    let s = serve_default();
    let err = Frontend::connect(
        &s.socket,
        &Options {
            features_override: Some(
                (1 << VIRTIO_F_VERSION_1)
                    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                    | (1 << 50),
            ),
            ..opts(1)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Vhost {
                op: "SET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
    // More queues than offered.
    let err = Frontend::connect(&s.socket, &opts(3)).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[test]
fn connect_retries_until_the_backend_listens() {
    let dir = TempDir::new("late");
    let socket = dir.join("late.sock");
    let t = Instant::now();
    let err = Frontend::connect(
        &socket,
        &Options {
            connect_timeout: Duration::from_millis(200),
            ..opts(1)
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(200));

    let disk = vufront::ramdisk::Ramdisk::new(RamdiskConfig::default()).unwrap();
    let sock2 = socket.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        disk.serve(&sock2).unwrap()
    });
    let mut dev = Frontend::connect(&socket, &opts(1)).unwrap();
    dev.queue_mut(0).unwrap().flush().unwrap().check().unwrap();
    drop(dev);
    late.join().unwrap().stop();
}

#[test]
fn a_silent_backend_fails_the_call_instead_of_hanging() {
    let dir = TempDir::new("silent");
    let socket = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let t = Instant::now();
    let err = Frontend::connect(
        &socket,
        &Options {
            reply_timeout: Some(Duration::from_millis(300)),
            ..opts(1)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoReply {
                op: "GET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(listener);
}

#[test]
fn data_survives_every_layout() {
    let s = serve_default();
    let mut dev = Frontend::connect(&s.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    let layouts = [
        Layout::default(),
        Layout::split(3),
        Layout::split(8).indirect(),
        Layout {
            split: Split::Sizes(vec![1, 511, 3000, 584, 4096]),
            ..Layout::default()
        },
        Layout {
            merge_header: true,
            merge_status: true,
            ..Layout::split(2)
        },
        Layout {
            merge_header: true,
            merge_status: true,
            ..Layout::default().indirect()
        },
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let sector = 64 * i as u64 + 3;
        let data = pattern(8192, i as u8);
        let w = q
            .execute(
                &Request::write(sector, &data).with_layout(layout.clone()),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(
            (w.status, w.used_len),
            (VIRTIO_BLK_S_OK as u8, 1),
            "write with {layout:?}"
        );
        let mut stored = vec![0u8; 8192];
        s.disk.read(sector * 512, &mut stored).unwrap();
        assert!(
            stored == data,
            "backend store differs after a write with {layout:?}"
        );
        let r = q
            .execute(
                &Request::read(sector, 8192).with_layout(layout.clone()),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(
            (r.status, r.used_len),
            (VIRTIO_BLK_S_OK as u8, 8193),
            "read with {layout:?}"
        );
        assert!(r.data == data, "read-back differs with {layout:?}");
    }
    // Nothing leaked: descriptors and buffers all came back.
    assert_eq!(q.free_desc_count(), q.size() as usize);
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn flush_get_id_discard_write_zeroes() {
    let s = serve(RamdiskConfig {
        serial: "a-serial-longer-than-twenty-bytes".into(),
        ..RamdiskConfig::default()
    });
    let mut dev = Frontend::connect(&s.socket, &opts(1)).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.flush().unwrap().used_len, 1);
    let id = q.get_id().unwrap().check().unwrap();
    assert_eq!(id.data, b"a-serial-longer-than");
    assert_eq!(id.used_len, 21);

    q.write(0, &[0xee; 16384]).unwrap().check().unwrap();
    let seg = |sector, num_sectors, flags| Segment {
        sector,
        num_sectors,
        flags,
    };
    q.discard(&[seg(0, 8, 0), seg(16, 8, 0)])
        .unwrap()
        .check()
        .unwrap();
    q.write_zeroes(&[seg(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)])
        .unwrap()
        .check()
        .unwrap();
    let data = q.read(0, 16384).unwrap().check().unwrap().data;
    let expect: Vec<u8> = (0..32u64)
        .flat_map(|s| {
            let zero = s < 9 || (16..24).contains(&s);
            [if zero { 0 } else { 0xee }; 512]
        })
        .collect();
    assert!(data == expect, "discarded / zeroed sectors");

    // Discard takes no flags; unknown write-zeroes flags are unsupported.
    assert_eq!(
        q.discard(&[seg(0, 8, 1)]).unwrap().status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        q.write_zeroes(&[seg(0, 8, 2)]).unwrap().status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    // Past the end, and too many segments.
    let end = dev.capacity() / 512;
    assert_eq!(
        q.discard(&[seg(end - 1, 2, 0)]).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
    let many: Vec<Segment> = (0..33).map(|i| seg(i * 8, 8, 0)).collect();
    assert_eq!(q.discard(&many).unwrap().status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn bad_requests_get_error_statuses() {
    let s = serve_default();
    let mut dev = Frontend::connect(&s.socket, &opts(1)).unwrap();
    let cap = dev.capacity() / 512;
    let mut q = dev.take_queue(0).unwrap();
    let before = s.disk.stats();
    assert_eq!(
        q.read(cap, 512).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8,
        "past the end"
    );
    assert_eq!(
        q.read(cap - 1, 1024).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8,
        "crosses the end"
    );
    assert_eq!(
        q.read(u64::MAX / 256, 512).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8,
        "overflow"
    );
    assert_eq!(
        q.read(0, 100).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8,
        "not whole sectors"
    );
    assert_eq!(
        q.write(0, &[1; 100]).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
    let r = q
        .execute(&Request::new(77, 0), Duration::from_secs(5))
        .unwrap();
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    let after = s.disk.stats();
    assert_eq!(after.ioerr - before.ioerr, 5);
    assert_eq!(after.unsupp - before.unsupp, 1);
    assert_eq!(after.ok, before.ok);
    let mut zero = [0xffu8; 512];
    s.disk.read(0, &mut zero).unwrap();
    assert_eq!(zero, [0u8; 512], "failed writes changed nothing");

    let ro = serve(RamdiskConfig {
        readonly: true,
        ..RamdiskConfig::default()
    });
    let mut dev = Frontend::connect(&ro.socket, &opts(1)).unwrap();
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let q = dev.queue_mut(0).unwrap();
    assert_eq!(
        q.write(0, &[1; 512]).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(q.read(0, 512).unwrap().status, VIRTIO_BLK_S_OK as u8);
}

/// Many requests in flight on one queue, completed out of a single kick, in both
/// notification modes; then a long run of synchronous requests with a short timeout, which
/// fails if any wake-up is lost.
#[test]
fn queue_depth_and_no_lost_wakeups() {
    for event_idx in [true, false] {
        let s = serve_default();
        let mut dev = Frontend::connect(
            &s.socket,
            &Options {
                event_idx,
                queue_size: 256,
                ..opts(1)
            },
        )
        .unwrap();
        let mut q = dev.take_queue(0).unwrap();
        assert_eq!(q.event_idx(), event_idx);
        let mut tags = std::collections::HashMap::new();
        for i in 0..64u64 {
            let data = pattern(4096, i as u8);
            tags.insert(q.enqueue(&Request::write(i * 8, &data)).unwrap(), i);
        }
        assert_eq!(q.in_flight(), 64);
        assert!(q.notify().unwrap(), "the first batch must be kicked");
        let mut done = 0;
        while done < 64 {
            for c in q.complete(Duration::from_secs(5)).unwrap() {
                assert!(tags.remove(&c.tag).is_some(), "unknown tag {}", c.tag);
                assert_eq!(c.check().unwrap().used_len, 1);
                done += 1;
            }
        }
        assert!(tags.is_empty());
        for i in 0..64u64 {
            let c = q.read(i * 8, 4096).unwrap().check().unwrap();
            assert!(c.data == pattern(4096, i as u8), "page {i}");
        }
        for i in 0..2000u64 {
            let c = q
                .execute(&Request::read((i % 64) * 8, 512), Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("request {i} (event_idx {event_idx}): {e}"));
            assert!(c.ok());
        }
        let k = q.counters();
        assert_eq!(k.used, 2000 + 64 + 64);
        assert!(k.kicks > 0 && k.sleeps > 0, "{k:?}");
    }
}

#[test]
fn queues_run_in_parallel() {
    let s = serve(RamdiskConfig {
        num_queues: 4,
        ..RamdiskConfig::default()
    });
    let mut dev = Frontend::connect(&s.socket, &opts(4)).unwrap();
    let queues = dev.take_queues();
    assert_eq!(queues.len(), 4);
    std::thread::scope(|sc| {
        for mut q in queues {
            sc.spawn(move || {
                let base = u64::from(q.index()) * 4096;
                for i in 0..200u64 {
                    let sector = base + (i % 32) * 8;
                    let data = pattern(4096, (i + base) as u8);
                    q.write(sector, &data).unwrap().check().unwrap();
                    assert!(q.read(sector, 4096).unwrap().data == data);
                }
            });
        }
    });
    assert_eq!(s.disk.stats().ok, 4 * 400);
}

#[test]
fn reconnect_with_fresh_rings_and_with_resumed_rings() {
    let s = serve_default();
    let data = pattern(4096 * 3, 9);

    let mut dev = Frontend::connect(&s.socket, &opts(2)).unwrap();
    let q = dev.queue_mut(0).unwrap();
    q.write(100, &data).unwrap().check().unwrap();
    q.flush().unwrap().check().unwrap();
    assert_eq!(dev.stop_queue(0).unwrap(), 2, "next avail = requests taken");
    assert_eq!(dev.stop_queue(1).unwrap(), 0);
    dev.disconnect();

    // A new frontend, fresh rings: the store outlived the connection.
    let mut dev = Frontend::connect(&s.socket, &opts(2)).unwrap();
    let c = dev.queue_mut(1).unwrap().read(100, 4096 * 3).unwrap();
    assert!(c.check().unwrap().data == data);
    assert!(eventually(Duration::from_secs(2), || s
        .server
        .connections()
        == 2));

    // Resume: same memory and rings on a third connection, base from GET_VRING_BASE.
    let mem = GuestMem::with_size(8 << 20).unwrap();
    drop(dev);
    let mut dev = Frontend::connect_with_memory(&s.socket, &opts(1), mem.clone()).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    for i in 0..5 {
        q.write(i * 8, &[i as u8; 4096]).unwrap().check().unwrap();
    }
    let base = dev.stop_queue(0).unwrap();
    assert_eq!(base, 5);
    drop(dev);
    let mut dev = Frontend::connect_with_memory(
        &s.socket,
        &Options {
            num_queues: 0,
            ..opts(1)
        },
        mem,
    )
    .unwrap();
    dev.attach_queue(&mut q, base).unwrap();
    let c = q.read(4 * 8, 4096).unwrap().check().unwrap();
    assert_eq!(c.data, vec![4u8; 4096]);
    assert_eq!(q.last_used(), 6, "the used ring continued where it was");

    // A frontend the backend throws out notices on its next message, and can come back.
    s.server.kick_out();
    let err = dev.refresh_config().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Vhost {
                op: "GET_CONFIG",
                ..
            }
        ),
        "{err}"
    );
    drop(dev);
    let mut dev = Frontend::connect(&s.socket, &opts(1)).unwrap();
    dev.queue_mut(0).unwrap().flush().unwrap().check().unwrap();
}

#[test]
fn memory_with_a_gap_handed_over_per_region() {
    let s = serve_default();
    // Region 0 holds exactly the rings of one 256-entry queue; request data (page-aligned)
    // lands in region 1, which starts past a gap and at a non-zero offset in the memfd.
    let mem = GuestMem::new(&[
        RegionSpec {
            gpa: 0x10_0000,
            size: 3 * 4096,
        },
        RegionSpec {
            gpa: 0x4000_0000,
            size: 4 << 20,
        },
    ])
    .unwrap();
    for add_mem_reg in [false, true] {
        let o = Options {
            add_mem_reg,
            queue_size: 256,
            ..opts(1)
        };
        let mem2 = GuestMem::new(mem.regions()).unwrap();
        let mut dev = Frontend::connect_with_memory(&s.socket, &o, mem2).unwrap();
        let q = dev.queue_mut(0).unwrap();
        assert!(q.used_gpa() < 0x10_3000);
        let data = pattern(8192, 77);
        let tag = q.enqueue(&Request::write(0, &data)).unwrap();
        let d = q.read_desc(1).unwrap();
        assert!(
            d.addr >= 0x4000_0000 && d.len == 8192,
            "data in region 1: {d:?}"
        );
        q.notify().unwrap();
        let c = q.complete(Duration::from_secs(5)).unwrap().remove(0);
        assert_eq!((c.tag, c.status), (tag, VIRTIO_BLK_S_OK as u8));
        assert!(
            q.read(0, 8192).unwrap().data == data,
            "add_mem_reg {add_mem_reg}"
        );
    }
}
