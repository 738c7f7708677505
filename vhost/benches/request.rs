//! The request path without vhost-user: one chain through `RequestHandler::process` (descriptor walk,
//! checks, header, data, status), next to the store call it wraps, in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vzram::BlkDevice;
use vzram::{ConfigSpace, RequestHandler};

const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
const SIZE: u64 = 64 << 20;

fn bench(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let store = Arc::new(zram::Store::new(zram::StoreConfig::default()).unwrap());
    let comp = Arc::new(zcomp::Comp::parse("lz4", &[]).unwrap());
    let cfg = zram::Config {
        size: SIZE,
        backing_file: None,
    };
    let device = zram::Device::new(store, comp, cfg).unwrap();
    let served = BlkDevice::new(
        "b".into(),
        "/b".into(),
        device.clone(),
        1,
        false,
        "b".into(),
    );
    let blk = ConfigSpace {
        size: SIZE,
        blk_size: 4096,
        num_queues: 1,
        queue_size: 256,
    };
    let mut worker = RequestHandler::new(served, 0, blk);
    let mut page = [0u8; 4096];
    pagemix::fill_kind(pagemix::PageKind::Heap, 1, 1, &mut page);
    let mut stream = device.new_stream();
    device.write_page(0, &page, &mut stream).unwrap();

    let vq = MockSplitQueue::new(&mem, 256);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut g = c.benchmark_group("request");
    let mut src = [0u8; 4096];
    pagemix::fill_kind(pagemix::PageKind::Heap, 1, 1, &mut src);
    for (typ, name) in [(VIRTIO_BLK_T_IN, "read"), (VIRTIO_BLK_T_OUT, "write")] {
        chain(&mem, &vq, typ);
        g.bench_function(format!("{name} 4 KiB via RequestHandler::process"), |b| {
            b.iter(|| serve_again(&mem, &vq, &mut q, &mut worker))
        });
        if typ == VIRTIO_BLK_T_IN {
            g.bench_function("read 4 KiB via Device::read_page", |b| {
                b.iter(|| {
                    device
                        .read_page(0, black_box(&mut page), &mut stream)
                        .unwrap()
                })
            });
        } else {
            g.bench_function("write 4 KiB via Device::write_page", |b| {
                b.iter(|| device.write_page(0, black_box(&src), &mut stream).unwrap())
            });
        }
    }
    g.finish();
}

/// Header, one 4 KiB data descriptor, status: chain 0 of the table.
fn chain(mem: &GuestMemoryMmap<()>, vq: &MockSplitQueue<GuestMemoryMmap<()>>, typ: u32) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let data = if typ == VIRTIO_BLK_T_IN { n | w } else { n };
    let descs = [(HDR, 16, n, 1), (DATA, 4096, data, 2), (STATUS, 1, w, 0)];
    for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        vq.desc_table().store(i as u16, raw).unwrap();
    }
}

/// Makes chain 0 available once more and serves it.
fn serve_again(
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<GuestMemoryMmap<()>>,
    q: &mut Queue,
    worker: &mut RequestHandler,
) -> u32 {
    let idx = q.next_avail();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % 256))
        .unwrap()
        .store(0);
    vq.avail().idx().store(idx.wrapping_add(1));
    let chain = q.iter(mem).unwrap().next().unwrap();
    black_box(worker.process(chain))
}

criterion_group!(benches, bench);
criterion_main!(benches);
