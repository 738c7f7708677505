//! Malformed chains built with the raw API, against the in-memory backend: the frontend can
//! express them, and the backend answers each the way its documentation says.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vufront::*;

/// Guest memory with a hole: region 0 at 1 MiB, region 1 at 1 GiB; [`GAP`] is unmapped.
const GAP: u64 = 0x2000_0000;

struct Setup {
    s: ServedRamdisk,
    _dev: Frontend,
    q: Queue,
    mem: Arc<GuestMem>,
}

fn setup() -> Setup {
    let s = serve_default();
    let mem = GuestMem::new(&[
        RegionSpec {
            gpa: 0x10_0000,
            size: 4 << 20,
        },
        RegionSpec {
            gpa: 0x4000_0000,
            size: 1 << 20,
        },
    ])
    .unwrap();
    assert!(!mem.is_mapped(GAP, 1));
    let opts = Options {
        num_queues: 2,
        queue_size: 16,
        ..Options::default()
    };
    let mut dev = Frontend::connect_with_memory(&s.socket, &opts, mem.clone()).unwrap();
    let q = dev.take_queue(0).unwrap();
    Setup {
        s,
        _dev: dev,
        q,
        mem,
    }
}

fn header(req_type: u32, sector: u64) -> Vec<u8> {
    let mut h = req_type.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A buffer holding `bytes`.
fn buf(mem: &Arc<GuestMem>, bytes: &[u8]) -> GuestBuf {
    let b = mem.alloc(bytes.len(), 16).unwrap();
    b.write_at(0, bytes).unwrap();
    b
}

fn one_used(q: &mut Queue) -> UsedElem {
    let u = q.wait_used(Duration::from_secs(5)).unwrap();
    assert_eq!(u.len(), 1, "{u:?}");
    u[0]
}

/// Publishes `descs` as descriptors 0.. and head 0, kicks, and returns the used element.
fn run_raw(q: &mut Queue, descs: &[Desc]) -> UsedElem {
    for (i, d) in descs.iter().enumerate() {
        q.write_desc(i as u16, *d).unwrap();
    }
    q.push_avail(&[0]).unwrap();
    q.kick().unwrap();
    one_used(q)
}

fn byte(b: &GuestBuf) -> u8 {
    b.to_vec().unwrap()[0]
}

fn disk_sector(s: &ServedRamdisk, sector: u64) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    s.disk.read(sector * 512, &mut v).unwrap();
    v
}

#[test]
fn loop_in_chain_is_malformed() {
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_IN, 0));
    let data = buf(&t.mem, &[0x33; 512]);
    let st = buf(&t.mem, &[0xff]);
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::writable(data.gpa(), 512).then(2),
            Desc::writable(st.gpa(), 1).then(1),
        ],
    );
    assert_eq!(u, UsedElem { id: 0, len: 0 });
    assert_eq!(byte(&st), 0xff, "no status for a malformed chain");
    assert_eq!(
        data.to_vec().unwrap(),
        vec![0x33; 512],
        "nothing read into it"
    );
    assert_eq!(t.s.disk.stats().malformed, 1);
}

#[test]
fn next_out_of_range_is_malformed() {
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_FLUSH, 0));
    let st = buf(&t.mem, &[0xff]);
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1000),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!(u.len, 0);
    assert_eq!(byte(&st), 0xff);
    assert_eq!(t.s.disk.stats().malformed, 1);
}

#[test]
fn zero_length_and_missing_status() {
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_FLUSH, 0));
    let st = buf(&t.mem, &[0xff]);
    // The only writable descriptor has length 0: nowhere to put a status.
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::writable(st.gpa(), 0),
        ],
    );
    assert_eq!(u.len, 0);
    assert_eq!(byte(&st), 0xff);
    // A zero-length descriptor in the middle is just skipped.
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::readable(GAP, 0).then(2),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!(u.len, 1);
    assert_eq!(byte(&st), VIRTIO_BLK_S_OK as u8);
    let stats = t.s.disk.stats();
    assert_eq!((stats.malformed, stats.ok), (1, 1));
}

#[test]
fn wrong_directions() {
    let mut t = setup();
    let s = &t.s;
    // Header writable: no readable header at all -> IOERR in the status byte.
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_IN, 0));
    let data = buf(&t.mem, &[0x33; 512]);
    let st = buf(&t.mem, &[0xff]);
    let u = run_raw(
        &mut t.q,
        &[
            Desc::writable(h.gpa(), 16).then(1),
            Desc::writable(data.gpa(), 512).then(2),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!((u.len, byte(&st)), (1, VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(data.to_vec().unwrap(), vec![0x33; 512]);

    // Status readable: no writable byte -> malformed, and the write did not happen.
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_OUT, 0));
    let data = buf(&t.mem, &[0x77; 512]);
    let st = buf(&t.mem, &[0xff]);
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::readable(data.gpa(), 512).then(2),
            Desc::readable(st.gpa(), 1),
        ],
    );
    assert_eq!((u.len, byte(&st)), (0, 0xff));
    assert_eq!(disk_sector(s, 0), vec![0; 512]);

    // Readable data after the writable status -> malformed, nothing written.
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::writable(st.gpa(), 1).then(2),
            Desc::readable(data.gpa(), 512),
        ],
    );
    assert_eq!((u.len, byte(&st)), (0, 0xff));
    assert_eq!(disk_sector(s, 0), vec![0; 512]);

    // A header cut short (8 bytes) -> IOERR.
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 8).then(1),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!((u.len, byte(&st)), (1, VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(t.s.disk.stats().malformed, 2);
    assert_eq!(t.s.disk.stats().ioerr, 2);
}

#[test]
fn bad_indirect_tables() {
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_FLUSH, 0));
    let st = buf(&t.mem, &[0xff]);
    let table = t.mem.alloc(64, 16).unwrap();
    t.mem
        .write_descs(
            table.gpa(),
            &[
                Desc::readable(h.gpa(), 16).then(1),
                Desc::writable(st.gpa(), 1),
            ],
        )
        .unwrap();
    // A correct indirect chain first.
    let u = run_raw(&mut t.q, &[Desc::indirect(table.gpa(), 2)]);
    assert_eq!((u.len, byte(&st)), (1, VIRTIO_BLK_S_OK as u8));
    // Table length not a multiple of 16.
    st.fill(0xff).unwrap();
    let mut d = Desc::indirect(table.gpa(), 2);
    d.len = 24;
    let u = run_raw(&mut t.q, &[d]);
    assert_eq!((u.len, byte(&st)), (0, 0xff));
    // An indirect descriptor inside the table.
    let inner = t.mem.alloc(32, 16).unwrap();
    t.mem
        .write_descs(inner.gpa(), &[Desc::indirect(table.gpa(), 2)])
        .unwrap();
    let u = run_raw(&mut t.q, &[Desc::indirect(inner.gpa(), 1)]);
    assert_eq!((u.len, byte(&st)), (0, 0xff));
    // A table in unmapped memory.
    let u = run_raw(&mut t.q, &[Desc::indirect(GAP, 2)]);
    assert_eq!(u.len, 0);
    assert_eq!(t.s.disk.stats().malformed, 3);
}

#[test]
fn buffers_in_unmapped_memory() {
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_OUT, 0));
    let data = buf(&t.mem, &[0x77; 512]);
    let st = buf(&t.mem, &[0xff]);
    // One data piece in the gap: IOERR, and the mapped piece was not written either.
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::readable(data.gpa(), 512).then(2),
            Desc::readable(GAP, 512).then(3),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!((u.len, byte(&st)), (1, VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(disk_sector(&t.s, 0), vec![0; 512]);
    // A piece that runs off the end of region 0 into the hole.
    let end0 = 0x10_0000 + (4 << 20);
    let u = run_raw(
        &mut t.q,
        &[
            Desc::readable(h.gpa(), 16).then(1),
            Desc::readable(end0 - 256, 512).then(2),
            Desc::writable(st.gpa(), 1),
        ],
    );
    assert_eq!((u.len, byte(&st)), (1, VIRTIO_BLK_S_IOERR as u8));
    // Status in the hole: malformed (nowhere to write it).
    let u = run_raw(
        &mut t.q,
        &[Desc::readable(h.gpa(), 16).then(1), Desc::writable(GAP, 1)],
    );
    assert_eq!(u.len, 0);
    assert_eq!(disk_sector(&t.s, 0), vec![0; 512]);
}

#[test]
fn head_out_of_range_is_not_completed() {
    let mut t = setup();
    let size = t.q.size();
    t.q.push_avail(&[size + 7]).unwrap();
    t.q.kick().unwrap();
    let err = t.q.wait_used(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(eventually(Duration::from_secs(2), || t
        .s
        .disk
        .stats()
        .bad_heads
        == 1));
    // The queue goes on.
    t.q.flush().unwrap().check().unwrap();
}

#[test]
fn stray_used_elements_are_reported() {
    // The high-level API refuses a used element it did not submit: here a raw chain shares
    // the queue with a high-level request.
    let mut t = setup();
    let h = buf(&t.mem, &header(VIRTIO_BLK_T_FLUSH, 0));
    let st = buf(&t.mem, &[0xff]);
    let ids = t.q.alloc_descs(2).unwrap();
    t.q.write_chain(
        &ids,
        &[
            ChainSeg {
                addr: h.gpa(),
                len: 16,
                write: false,
            },
            ChainSeg {
                addr: st.gpa(),
                len: 1,
                write: true,
            },
        ],
    )
    .unwrap();
    t.q.push_avail(&[ids[0]]).unwrap();
    t.q.kick().unwrap();
    assert!(eventually(Duration::from_secs(2), || t
        .q
        .used_idx()
        .unwrap()
        == 1));
    let tag = t.q.submit(&Request::flush()).unwrap();
    let err = t.q.complete(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
    // The good completion reaped with it is not lost.
    let mut got = t.q.poll_complete().unwrap();
    if got.is_empty() {
        got = t.q.complete(Duration::from_secs(5)).unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].tag, tag);
}
