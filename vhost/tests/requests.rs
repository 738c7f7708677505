//! Request handling against hand-built split rings (virtio-queue's MockSplitQueue): every
//! request type, every framing, and the malformed chains an untrusted guest can send.

mod common;

use proptest::prelude::*;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vzram::BlkDevice;
use vzram::{ConfigSpace, RequestHandler};

const QUEUE_SIZE: u16 = 16;
/// Guest memory: two regions with an unmapped hole between them.
const REGION0: (u64, usize) = (0, 0x10_0000);
const HOLE: u64 = 0x10_0000;
const REGION1: (u64, usize) = (0x20_0000, 0x10_0000);
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
const DISK: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

struct Rig {
    mem: GuestMemoryMmap<()>,
    served: Arc<BlkDevice>,
    worker: RequestHandler,
}

fn rig_with(readonly: bool, blk_size: u32) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ])
    .unwrap();
    let served = common::served(DISK, "/nonexistent".into(), 2, readonly, 0);
    let blk = ConfigSpace {
        size: DISK,
        blk_size,
        num_queues: 2,
        queue_size: QUEUE_SIZE,
    };
    let worker = RequestHandler::new(served.clone(), 0, blk);
    Rig {
        mem,
        served,
        worker,
    }
}

fn rig() -> Rig {
    rig_with(false, 4096)
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn header(typ: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn page(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 7) as u8)
        .collect()
}

impl Rig {
    /// Puts `table` in the descriptor table, makes `head` available and serves it. Returns
    /// used.len.
    fn run(&mut self, table: &[RawDescriptor], head: u16) -> u32 {
        let vq = MockSplitQueue::new(&self.mem, QUEUE_SIZE);
        for (i, desc) in table.iter().enumerate() {
            vq.desc_table().store(i as u16, *desc).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(head);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&self.mem).unwrap().next().unwrap();
        self.worker.process(chain)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A request with header, data split into `parts` (addr, len) and a status descriptor.
    fn request(
        &mut self,
        typ: u32,
        sector: u64,
        parts: &[(u64, u32)],
        data_writable: bool,
    ) -> (u8, u32) {
        self.put(HDR, &header(typ, sector));
        self.put(STATUS, &[0xff]);
        let mut table = vec![d(HDR, 16, N, 1)];
        for (i, &(addr, len)) in parts.iter().enumerate() {
            let flags = N | if data_writable { W } else { 0 };
            table.push(d(addr, len, flags, i as u16 + 2));
        }
        table.push(d(STATUS, 1, W, 0));
        let used = self.run(&table, 0);
        (self.status(), used)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.put(DATA, data);
        let (status, used) = self.request(
            VIRTIO_BLK_T_OUT,
            sector,
            &[(DATA, data.len() as u32)],
            false,
        );
        assert_eq!(used, 1, "a write puts only the status byte into the guest");
        status
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.put(DATA, &vec![0xAA; len]);
        let (status, used) = self.request(VIRTIO_BLK_T_IN, sector, &[(DATA, len as u32)], true);
        if status == OK {
            assert_eq!(used as usize, len + 1);
        }
        (status, self.get(DATA, len))
    }

    fn discard_like(&mut self, typ: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let mut payload = Vec::new();
        for &(sector, n, flags) in segs {
            payload.extend_from_slice(&sector.to_le_bytes());
            payload.extend_from_slice(&n.to_le_bytes());
            payload.extend_from_slice(&flags.to_le_bytes());
        }
        self.put(DATA, &payload);
        self.request(typ, 0, &[(DATA, payload.len() as u32)], false)
            .0
    }

    fn counters(&self) -> vzram::RequestStats {
        self.served.queues[0].snapshot()
    }
}

#[test]
fn page_write_then_read_round_trips() {
    let mut r = rig();
    let p = page(1);
    assert_eq!(r.write(8, &p), OK);
    assert_eq!(r.read(8, 4096), (OK, p.clone()));
    // Never written: zeroes.
    assert_eq!(r.read(16, 4096), (OK, vec![0; 4096]));
    let c = r.counters();
    assert_eq!((c.requests, c.reads, c.writes), (3, 2, 1));
    assert_eq!((c.read_bytes, c.write_bytes), (8192, 4096));
    assert_eq!(r.served.zram.stats().mm_stat.orig_data_size, 4096);
}

#[test]
fn split_and_unaligned_buffers_use_the_bounce_page() {
    let mut r = rig();
    let data: Vec<u8> = (0..3).flat_map(|i| page(i + 10)).collect();
    // Write 3 pages from buffers split at odd places, partly in the second memory region.
    r.put(DATA, &data[..1000]);
    r.put(REGION1.0 + 7, &data[1000..5000]);
    r.put(DATA + 0x8000, &data[5000..]);
    let parts = [
        (DATA, 1000),
        (REGION1.0 + 7, 4000),
        (DATA + 0x8000, (3 * 4096 - 5000) as u32),
    ];
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 24, &parts, false), (OK, 1));
    // Read them back through another split.
    r.put(DATA + 0x1_0000, &[0; 3 * 4096]);
    let parts = [
        (DATA + 0x1_0000, 4095),
        (DATA + 0x1_0000 + 4095, 3 * 4096 - 4095),
    ];
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 24, &parts, true),
        (OK, 3 * 4096 + 1)
    );
    assert_eq!(r.get(DATA + 0x1_0000, 3 * 4096), data);
}

#[test]
fn sector_granular_io_read_modify_writes() {
    let mut r = rig_with(false, 512);
    let p = page(3);
    assert_eq!(r.write(0, &p), OK);
    // Overwrite sectors 3 and 4 (crossing nothing) and sector 7..9 (crossing a page).
    assert_eq!(r.write(3, &[0x11; 1024]), OK);
    assert_eq!(r.write(7, &[0x22; 1024]), OK);
    let mut expect = p.clone();
    expect[1536..2560].fill(0x11);
    expect[3584..4096].fill(0x22);
    let (status, got) = r.read(0, 8192);
    assert_eq!(status, OK);
    assert_eq!(&got[..4096], &expect[..]);
    assert_eq!(&got[4096..4608], &[0x22; 512][..]);
    assert_eq!(&got[4608..], &[0; 3584][..]);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig();
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[], false), (OK, 1));
    r.put(DATA, &[0xEE; 32]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 32)], true),
        (OK, 21)
    );
    let id = r.get(DATA, 21);
    assert_eq!(&id[..10], b"vzram-test");
    assert_eq!(&id[10..20], &[0; 10], "the ID is zero-padded to 20 bytes");
    assert_eq!(id[20], 0xEE, "nothing past the 20 ID bytes is written");
    // A buffer that cannot hold the ID.
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 19)], true),
        (IOERR, 1)
    );
}

#[test]
fn discard_frees_pages_and_reads_zeroes() {
    let mut r = rig();
    for i in 0..8 {
        assert_eq!(r.write(i * 8, &page(i as u8)), OK);
    }
    assert_eq!(r.served.zram.stats().mm_stat.orig_data_size, 8 * 4096);
    assert_eq!(
        r.discard_like(VIRTIO_BLK_T_DISCARD, &[(8, 16, 0), (48, 8, 0)]),
        OK
    );
    assert_eq!(r.served.zram.stats().mm_stat.orig_data_size, 5 * 4096);
    assert_eq!(r.read(8, 8192), (OK, vec![0; 8192]));
    assert_eq!(r.read(0, 4096), (OK, page(0)));
    assert_eq!(r.counters().discards, 1);
}

#[test]
fn bad_discards_fail_without_side_effects() {
    let mut r = rig();
    assert_eq!(r.write(0, &page(5)), OK);
    let end = DISK / 512;
    for (segs, want) in [
        // Unknown flag (discard knows none; UNMAP belongs to write-zeroes).
        (vec![(0, 8, 1)], UNSUPP),
        (vec![(0, 8, 0x80)], UNSUPP),
        // Not 4 KiB aligned.
        (vec![(1, 8, 0)], IOERR),
        (vec![(0, 4, 0)], IOERR),
        // Past the end, and sector overflow.
        (vec![(end - 8, 16, 0)], IOERR),
        (vec![(u64::MAX - 7, 8, 0)], IOERR),
        // A good segment followed by a bad one: the good one must not run either.
        (vec![(0, 8, 0), (end, 8, 0)], IOERR),
    ] {
        assert_eq!(
            r.discard_like(VIRTIO_BLK_T_DISCARD, &segs),
            want,
            "{segs:?}"
        );
        assert_eq!(r.read(0, 4096), (OK, page(5)), "{segs:?} changed the disk");
    }
    // Payload not a whole number of segments; and too many segments.
    r.put(DATA, &[0; 24]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 24)], false).0,
        IOERR
    );
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, &[], false).0, IOERR);
    let many: Vec<(u64, u32, u32)> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    assert_eq!(r.discard_like(VIRTIO_BLK_T_DISCARD, &many), IOERR);
    assert_eq!(r.read(0, 4096), (OK, page(5)));
}

#[test]
fn write_zeroes_zeroes_exactly_its_range() {
    let mut r = rig_with(false, 512);
    for i in 0..3 {
        assert_eq!(r.write(i * 8, &page(7 + i as u8)), OK);
    }
    // Sectors 5..19: the tail of page 0, all of page 1, the head of page 2.
    assert_eq!(r.discard_like(VIRTIO_BLK_T_WRITE_ZEROES, &[(5, 14, 1)]), OK);
    let (status, got) = r.read(0, 3 * 4096);
    assert_eq!(status, OK);
    let mut expect: Vec<u8> = (0..3).flat_map(|i| page(7 + i)).collect();
    expect[5 * 512..19 * 512].fill(0);
    assert_eq!(got, expect);
    assert_eq!(
        r.discard_like(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)]),
        UNSUPP
    );
    let c = r.counters();
    // The request with the unknown flag failed its checks: no write-zeroes ran for it.
    assert_eq!((c.write_zeroes, c.unsupported), (1, 1));
}

#[test]
fn readonly_disk_rejects_every_write() {
    let mut r = rig_with(true, 4096);
    assert_eq!(r.write(0, &page(1)), IOERR);
    assert_eq!(r.discard_like(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]), IOERR);
    assert_eq!(
        r.discard_like(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]),
        IOERR
    );
    assert_eq!(r.read(0, 4096), (OK, vec![0; 4096]));
}

#[test]
fn out_of_range_and_odd_lengths_fail() {
    let mut r = rig();
    let end = DISK / 512;
    assert_eq!(r.read(end - 8, 8192).0, IOERR);
    assert_eq!(r.read(u64::MAX, 4096).0, IOERR);
    assert_eq!(r.read(u64::MAX / 512, 4096).0, IOERR);
    assert_eq!(r.write(end, &page(1)), IOERR);
    assert_eq!(r.read(end - 8, 4096).0, OK, "the last page is readable");
    assert_eq!(r.read(0, 1000).0, IOERR, "data not a multiple of 512 bytes");
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[], true),
        (OK, 1),
        "an empty read is fine"
    );
    assert_eq!(r.request(99, 0, &[], false), (UNSUPP, 1));
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512)], false).0,
        IOERR,
        "read with data going out"
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512)], true).0,
        IOERR,
        "write with data coming in"
    );
    let c = r.counters();
    assert_eq!(c.unsupported, 1);
    assert_eq!(c.io_errors, 7);
    // Every chain is a request; only those that passed their checks count as reads or writes
    // (the last-page read and the empty read).
    assert_eq!((c.requests, c.reads, c.writes), (10, 2, 0));
    assert_eq!(c.read_bytes, 4096);
}

/// The malformed chains qemu-storage-daemon left uncompleted: we complete every one, write
/// the status byte when the chain has a writable byte for it, and count used.len exactly.
#[test]
fn malformed_chains_complete() {
    let mut r = rig();
    r.put(HDR, &header(VIRTIO_BLK_T_IN, 0));
    // (name, descriptor table with its head at 0, status expected at STATUS, used.len)
    type Case = (&'static str, Vec<RawDescriptor>, Option<u8>, u32);
    let cases: Vec<Case> = vec![
        (
            "short header",
            vec![d(HDR, 8, N, 1), d(STATUS, 1, W, 0)],
            Some(IOERR),
            1,
        ),
        (
            "header split over two descriptors",
            vec![d(HDR, 8, N, 1), d(HDR + 8, 8, N, 2), d(STATUS, 1, W, 0)],
            Some(OK),
            1,
        ),
        ("no status descriptor", vec![d(HDR, 16, 0, 0)], None, 0),
        (
            "read-only status",
            vec![d(HDR, 16, N, 1), d(STATUS, 1, 0, 0)],
            None,
            0,
        ),
        (
            "zero-length status",
            vec![d(HDR, 16, N, 1), d(STATUS, 0, W, 0)],
            None,
            0,
        ),
        (
            "data outside guest memory",
            vec![
                d(HDR, 16, N, 1),
                d(HOLE, 4096, N | W, 2),
                d(STATUS, 1, W, 0),
            ],
            Some(IOERR),
            1,
        ),
        (
            "data past the end of memory",
            vec![
                d(HDR, 16, N, 1),
                d(REGION1.0 + 0xF_F000, 8192, N | W, 2),
                d(STATUS, 1, W, 0),
            ],
            Some(IOERR),
            1,
        ),
        (
            "length 0xFFFF0000",
            vec![
                d(HDR, 16, N, 1),
                d(DATA, 0xFFFF_0000, N | W, 2),
                d(STATUS, 1, W, 0),
            ],
            Some(IOERR),
            1,
        ),
        // A chain longer than 2^32 bytes is cut by the ring iterator before its status
        // descriptor: completed with nothing written.
        (
            "length 0xFFFFFFFF",
            vec![
                d(HDR, 16, N, 1),
                d(DATA, u32::MAX, N | W, 2),
                d(STATUS, 1, W, 0),
            ],
            None,
            0,
        ),
        (
            "address overflow",
            vec![
                d(HDR, 16, N, 1),
                d(u64::MAX - 100, 4096, N | W, 2),
                d(STATUS, 1, W, 0),
            ],
            Some(IOERR),
            1,
        ),
        (
            "status outside memory",
            vec![d(HDR, 16, N, 1), d(HOLE, 1, W, 0)],
            None,
            0,
        ),
        // The status is the last writable byte the iterator saw before its ttl ran out.
        (
            "descriptor loop",
            vec![
                d(HDR, 16, N, 1),
                d(DATA, 512, N | W, 2),
                d(STATUS, 1, N | W, 0),
            ],
            Some(IOERR),
            1,
        ),
        (
            "next out of range",
            vec![
                d(HDR, 16, N, 1),
                d(DATA, 512, N | W, 2),
                d(STATUS, 1, N | W, 200),
            ],
            Some(IOERR),
            1,
        ),
        (
            "readable after writable",
            vec![d(HDR, 16, N, 1), d(STATUS, 1, N | W, 2), d(DATA, 512, 0, 0)],
            Some(IOERR),
            1,
        ),
        (
            "header in writable memory only",
            vec![d(HDR, 16, N | W, 1), d(STATUS, 1, W, 0)],
            Some(IOERR),
            1,
        ),
    ];
    for (name, table, want_status, want_used) in cases {
        r.put(STATUS, &[0xff]);
        let used = r.run(&table, 0);
        let status = r.status();
        match want_status {
            Some(s) => assert_eq!(status, s, "{name}: status"),
            None => assert_eq!(status, 0xff, "{name}: nothing may be written"),
        }
        assert_eq!(used, want_used, "{name}: used.len");
    }
}

#[test]
fn indirect_tables_good_bad_and_nested() {
    let mut r = rig();
    let p = page(9);
    assert_eq!(r.write(0, &p), OK);
    let table = 0x3_0000u64;
    let put_table = |r: &Rig, descs: &[RawDescriptor]| {
        for (i, desc) in descs.iter().enumerate() {
            r.mem
                .write_obj(*desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
    };
    r.put(HDR, &header(VIRTIO_BLK_T_IN, 0));
    // A good indirect read.
    put_table(
        &r,
        &[
            d(HDR, 16, N, 1),
            d(DATA, 4096, N | W, 2),
            d(STATUS, 1, W, 0),
        ],
    );
    r.put(STATUS, &[0xff]);
    assert_eq!(
        r.run(&[d(table, 48, VRING_DESC_F_INDIRECT as u16, 0)], 0),
        4097
    );
    assert_eq!((r.status(), r.get(DATA, 4096)), (OK, p));
    // Nested indirect: nothing can be served or written.
    put_table(
        &r,
        &[
            d(HDR, 16, N, 1),
            d(table, 48, VRING_DESC_F_INDIRECT as u16 | N, 2),
            d(STATUS, 1, W, 0),
        ],
    );
    r.put(STATUS, &[0xff]);
    assert_eq!(
        r.run(&[d(table, 48, VRING_DESC_F_INDIRECT as u16, 0)], 0),
        0
    );
    assert_eq!(r.status(), 0xff);
    // A table length that is not a whole number of descriptors.
    r.put(STATUS, &[0xff]);
    assert_eq!(
        r.run(&[d(table, 47, VRING_DESC_F_INDIRECT as u16, 0)], 0),
        0
    );
    // A table outside guest memory.
    assert_eq!(r.run(&[d(HOLE, 48, VRING_DESC_F_INDIRECT as u16, 0)], 0), 0);
    assert_eq!(r.status(), 0xff);
}

#[test]
fn memory_limit_fails_only_the_write() {
    let mut r = rig();
    let store = r.served.zram.store().clone();
    assert_eq!(r.write(0, &page(1)), OK);
    store.set_mem_limit(store.mem_used_total().max(4096));
    // Incompressible pages until the pool is full.
    let mut failed = None;
    for i in 1..64u64 {
        let random: Vec<u8> = (0..4096u64)
            .map(|j| (j.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i * 7919) >> 29) as u8)
            .collect();
        if r.write(i * 8, &random) == IOERR {
            failed = Some(i);
            break;
        }
    }
    let failed = failed.expect("the memory limit never failed a write");
    assert!(store.mem_used_total() <= store.mem_limit());
    assert_eq!(r.read(0, 4096), (OK, page(1)), "old data survives");
    assert_eq!(
        r.read(failed * 8, 4096),
        (OK, vec![0; 4096]),
        "the failed write left nothing"
    );
    assert_eq!(r.served.zram.stats().io_stat.failed_writes, 1);
}

/// Bytes the device may write: the writable descriptors of the table (and the rings).
fn writable_ranges(table: &[RawDescriptor]) -> Vec<(u64, u64)> {
    table
        .iter()
        .map(|raw| Descriptor::from(*raw))
        .filter(|d| d.flags() & W != 0)
        .map(|d| (d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))))
        .collect()
}

fn arb_desc() -> impl Strategy<Value = RawDescriptor> {
    let addr = prop_oneof![
        4 => (0u64..8).prop_map(|i| HDR + i * 0x1000),
        2 => (0u64..0x2_0000).prop_map(|o| DATA + o),
        1 => Just(HOLE),
        1 => Just(REGION1.0 + 0xF_FFF0),
        1 => any::<u64>(),
    ];
    let len = prop_oneof![4 => 0u32..5000, 1 => Just(16u32), 1 => Just(u32::MAX), 1 => Just(0x10_0000u32)];
    let flags = prop_oneof![4 => Just(N), 3 => Just(N | W), 2 => Just(W), 1 => Just(0u16), 1 => Just(VRING_DESC_F_INDIRECT as u16)];
    (addr, len, flags, 0u16..20).prop_map(|(a, l, f, n)| d(a, l, f, n))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary chains and payloads: never a panic, used.len never more than the writable
    /// bytes, and nothing written outside writable descriptors.
    #[test]
    fn arbitrary_chains_are_contained(
        table in proptest::collection::vec(arb_desc(), 1..8),
        typ in prop_oneof![0u32..16, any::<u32>()],
        sector in prop_oneof![0u64..300, any::<u64>()],
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut r = rig_with(false, 512);
        // Canary everywhere outside the rings, then a header and payload where descriptors
        // are likely to point.
        r.put(HDR, &vec![0x5A; 0x10_0000 - HDR as usize]);
        r.put(REGION1.0, &vec![0x5A; REGION1.1]);
        r.put(HDR, &header(typ, sector));
        r.put(HDR + 16, &payload);
        let before0 = r.get(HDR, 0x10_0000 - HDR as usize);
        let before1 = r.get(REGION1.0, REGION1.1);
        let used = r.run(&table, 0);
        let ranges = writable_ranges(&table);
        let writable: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        prop_assert!(u64::from(used) <= writable);
        let after0 = r.get(HDR, 0x10_0000 - HDR as usize);
        let after1 = r.get(REGION1.0, REGION1.1);
        for (base, before, after) in [(HDR, &before0, &after0), (REGION1.0, &before1, &after1)] {
            for (i, (x, y)) in before.iter().zip(after.iter()).enumerate() {
                if x != y {
                    let a = base + i as u64;
                    prop_assert!(
                        ranges.iter().any(|&(s, e)| a >= s && a < e),
                        "byte {a:#x} changed outside every writable descriptor"
                    );
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Read { sector: u64, sectors: u64 },
    Zeroes { sector: u64, sectors: u64 },
    Discard { page: u64, pages: u64 },
}

/// Sectors of the model disk: small, so that operations overlap.
const MODEL_SECTORS: u64 = 96;

fn arb_op() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_SECTORS).prop_flat_map(|s| (Just(s), 1..=(MODEL_SECTORS - s).min(24)));
    prop_oneof![
        3 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        2 => range.prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        1 => (0..MODEL_SECTORS / 8).prop_flat_map(|p| (Just(p), 1..=(MODEL_SECTORS / 8 - p))).prop_map(|(page, pages)| Op::Discard { page, pages }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random sector-granular writes, reads, write-zeroes and discards through the request
    /// path agree with a plain byte array.
    #[test]
    fn requests_match_a_byte_array(ops in proptest::collection::vec(arb_op(), 1..40)) {
        let mut r = rig_with(false, 512);
        let mut model = vec![0u8; (MODEL_SECTORS * 512) as usize];
        for op in ops {
            match op {
                Op::Write { sector, sectors, seed } => {
                    let data: Vec<u8> = (0..sectors * 512).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
                    prop_assert_eq!(r.write(sector, &data), OK);
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].copy_from_slice(&data);
                }
                Op::Read { sector, sectors } => {
                    let (status, got) = r.read(sector, (sectors * 512) as usize);
                    prop_assert_eq!(status, OK);
                    prop_assert!(got[..] == model[(sector * 512) as usize..((sector + sectors) * 512) as usize]);
                }
                Op::Zeroes { sector, sectors } => {
                    prop_assert_eq!(r.discard_like(VIRTIO_BLK_T_WRITE_ZEROES, &[(sector, sectors as u32, 0)]), OK);
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
                }
                Op::Discard { page, pages } => {
                    prop_assert_eq!(r.discard_like(VIRTIO_BLK_T_DISCARD, &[(page * 8, (pages * 8) as u32, 0)]), OK);
                    model[(page * 4096) as usize..((page + pages) * 4096) as usize].fill(0);
                }
            }
        }
        let (status, all) = r.read(0, model.len());
        prop_assert_eq!(status, OK);
        prop_assert!(all == model);
    }
}
