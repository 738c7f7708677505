//! The frontend against a backend it was not written with: qemu-storage-daemon's
//! vhost-user-blk export (libvhost-user) over a file.
//!
//! Needs `qemu-storage-daemon` on PATH (Debian 12: package qemu-system-common, pulled in by
//! qemu-system-x86; also in qemu-utils from bookworm-backports). Missing, these tests FAIL:
//! they do not skip.

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vufront::load::{self, LoadOptions, Verify};
use vufront::*;

struct Qsd {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    dir: TempDir,
}

impl Qsd {
    fn start(size: u64, queues: u16) -> Qsd {
        let dir = TempDir::new("qsd");
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let socket = dir.join("qsd.sock");
        let log = std::fs::File::create(dir.join("qsd.log")).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f,cache.direct=off",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run qemu-storage-daemon ({e}): install it (Debian 12: \
                     apt-get install qemu-system-common)"
                )
            });
        Qsd {
            child,
            socket,
            image,
            dir,
        }
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.image).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut v = vec![0u8; len];
        f.read_exact(&mut v).unwrap();
        v
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qsd.log")).unwrap_or_default()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn opts(queues: u16) -> Options {
    Options {
        num_queues: queues,
        connect_timeout: Duration::from_secs(10),
        ..Options::default()
    }
}

#[test]
fn qsd_requests_in_every_layout() {
    let qsd = Qsd::start(32 << 20, 2);
    let mut dev = Frontend::connect(&qsd.socket, &opts(2))
        .unwrap_or_else(|e| panic!("{e}; qsd log: {}", qsd.log()));
    assert_eq!(dev.capacity(), 32 << 20);
    assert_eq!(dev.max_queues(), 2);
    let f = dev.features();
    for bit in [
        (1 << VIRTIO_F_VERSION_1),
        (1 << VIRTIO_RING_F_EVENT_IDX),
        (1 << VIRTIO_RING_F_INDIRECT_DESC),
        (1 << VIRTIO_BLK_F_FLUSH),
        (1 << VIRTIO_BLK_F_MQ),
    ] {
        assert_ne!(f & bit, 0, "QSD offers {:?}", feature_names(f));
    }
    let cfg = dev.config().clone();
    let q = dev.queue_mut(1).unwrap();
    let layouts = [
        Layout::default(),
        Layout::split(4),
        Layout::split(3).indirect(),
        Layout {
            merge_header: true,
            merge_status: true,
            ..Layout::split(2)
        },
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let sector = 128 * i as u64 + 1;
        let data = pattern(12288, i as u8);
        let w = q
            .execute(
                &Request::write(sector, &data).with_layout(layout.clone()),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(w.status, VIRTIO_BLK_S_OK as u8, "{layout:?}");
        let r = q
            .execute(
                &Request::read(sector, 12288).with_layout(layout.clone()),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{layout:?}");
        assert!(r.data == data, "read-back with {layout:?}");
        assert_eq!(r.used_len, 12289, "{layout:?}");
        q.flush().unwrap().check().unwrap();
        assert!(
            qsd.image_bytes(sector * 512, 12288) == data,
            "image file, {layout:?}"
        );
    }
    let id = q.get_id().unwrap().check().unwrap();
    assert_eq!(id.data.len(), VIRTIO_BLK_ID_BYTES as usize);

    // Discard and write-zeroes within QSD's advertised limits.
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert!(cfg.max_write_zeroes_seg >= 1 && cfg.max_write_zeroes_sectors >= 8);
    q.write(4096, &[0xcc; 8192]).unwrap().check().unwrap();
    let seg = Segment {
        sector: 4096,
        num_sectors: 8,
        flags: 0,
    };
    q.write_zeroes(&[seg]).unwrap().check().unwrap();
    let r = q.read(4096, 8192).unwrap().check().unwrap();
    assert_eq!(r.data[..4096], [0u8; 4096]);
    assert_eq!(r.data[4096..], [0xccu8; 4096]);
    if f & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
        q.discard(&[Segment {
            sector: 4104,
            ..seg
        }])
        .unwrap()
        .check()
        .unwrap();
    }
    // Past the end.
    assert_eq!(
        q.read(cfg.capacity, 512).unwrap().status,
        VIRTIO_BLK_S_IOERR as u8
    );
}

#[test]
fn qsd_load_verify_and_reconnect() {
    let qsd = Qsd::start(64 << 20, 2);
    let opts_load = LoadOptions {
        socket: qsd.socket.clone(),
        jobs: vec![
            "rw=write,iodepth=16,numjobs=2,bs=64k".parse().unwrap(),
            "rw=randread,iodepth=32,numjobs=2,ops=4000".parse().unwrap(),
            "rw=randwrite,iodepth=8,numjobs=2,ops=2000,segments=2"
                .parse()
                .unwrap(),
        ],
        verify: Verify::Written,
        ..LoadOptions::default()
    };
    let r = load::run(&opts_load).unwrap_or_else(|e| panic!("{e}; qsd log: {}", qsd.log()));
    assert_eq!(r.problems(), 0, "{r}");
    assert_eq!(r.jobs[1].verified_pages, 4000, "{r}");

    // QSD serves the next frontend after one leaves; the data is in the file.
    let mut dev = Frontend::connect(&qsd.socket, &opts(2)).unwrap();
    let q = dev.queue_mut(0).unwrap();
    q.write(8, &[0x42; 4096]).unwrap().check().unwrap();
    q.read(8, 4096).unwrap().check().unwrap();
    assert_eq!(dev.stop_queue(0).unwrap(), 2);
    dev.disconnect();
    let mut dev = Frontend::connect(&qsd.socket, &opts(1)).unwrap();
    let c = dev
        .queue_mut(0)
        .unwrap()
        .read(8, 4096)
        .unwrap()
        .check()
        .unwrap();
    assert_eq!(c.data, vec![0x42; 4096]);

    // QSD serves one frontend at a time: a second one is accepted by the kernel but gets no
    // answer, which the reply timeout turns into an error instead of a hang. (SET_OWNER needs
    // no reply before REPLY_ACK is negotiated, so GET_FEATURES is the first to wait.)
    let err = Frontend::connect(
        &qsd.socket,
        &Options {
            reply_timeout: Some(Duration::from_millis(500)),
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
    drop(dev);

    // The first 1 MiB holds the generator's pages except page 1 (overwritten with 0x42).
    let r = load::run(&LoadOptions {
        jobs: vec!["rw=read,iodepth=4,numjobs=1,span=1m".parse().unwrap()],
        verify: Verify::All,
        ..opts_load.clone()
    })
    .unwrap();
    assert_eq!(r.jobs[0].verify_failures, 1, "{r}");
    assert_eq!(r.jobs[0].verified_pages, 255, "{r}");
}
