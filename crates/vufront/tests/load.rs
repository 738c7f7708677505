//! The load generator against the in-memory backend: counts, verification (that can fail),
//! layouts, partitions and the JSON report.

mod common;

use common::*;
use std::time::Duration;
use vufront::load::{self, Job, LoadOptions, Partition, Rw, Verify};
use vufront::ramdisk::RamdiskConfig;

fn small() -> ServedRamdisk {
    serve(RamdiskConfig {
        capacity: 8 << 20,
        num_queues: 2,
        ..RamdiskConfig::default()
    })
}

fn job(spec: &str) -> Job {
    spec.parse().unwrap()
}

#[test]
fn write_pass_then_verified_random_reads() {
    let s = small();
    let opts = LoadOptions {
        socket: s.socket.clone(),
        jobs: vec![
            job("rw=write,iodepth=8,numjobs=2"),
            job("rw=randread,iodepth=16,numjobs=2,ops=3000,bs=8k"),
            job("rw=randwrite,iodepth=4,numjobs=1,ops=500,partition=interleave"),
        ],
        seed: 7,
        ..LoadOptions::default()
    };
    let r = load::run(&opts).unwrap();
    assert_eq!(r.problems(), 0, "{r}");
    assert_eq!(r.capacity_bytes, 8 << 20);
    let pages = (8 << 20) / 4096;
    let w = &r.jobs[0];
    assert_eq!(w.ops, pages, "one pass writes every page once");
    assert_eq!(w.per_queue_ops, vec![pages / 2, pages / 2]);
    let rd = &r.jobs[1];
    assert_eq!(rd.ops, 3000);
    assert_eq!(
        rd.verified_pages, 6000,
        "every page was written by the pass"
    );
    assert_eq!(rd.unverified_pages, 0);
    assert!(rd.per_queue_ops.iter().all(|&n| n == 1500));
    assert!(rd.lat_us.p50 > 0.0 && rd.lat_us.p50 <= rd.lat_us.p99);
    assert!(rd.lat_us.p99 <= rd.lat_us.p999 && rd.lat_us.p999 <= rd.lat_us.max);
    assert_eq!(r.jobs[2].ops, 500);
    assert_eq!(s.disk.stats().ok, pages + 3000 + 500);

    // The store holds exactly the generator's pages.
    let mut page = [0u8; 4096];
    let mut want = [0u8; 4096];
    for p in [0u64, 1, 1000, pages - 1] {
        s.disk.read(p * 4096, &mut page).unwrap();
        pagemix::fill_page(&opts.mix, 7, p, &mut want);
        assert!(page == want, "page {p}");
    }

    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["jobs"][1]["rw"], "randread");
    assert_eq!(json["jobs"][1]["verified_pages"], 6000);
    assert!(r.to_string().contains("randread"));
}

#[test]
fn verification_catches_corruption_and_unwritten_pages() {
    let s = small();
    let base = LoadOptions {
        socket: s.socket.clone(),
        seed: 3,
        ..LoadOptions::default()
    };
    let fill = LoadOptions {
        jobs: vec![job("rw=write,iodepth=32,numjobs=2")],
        ..base.clone()
    };
    assert_eq!(load::run(&fill).unwrap().problems(), 0);

    // One byte of one page changed behind the frontend's back.
    let mut b = [0u8; 1];
    s.disk.read(77 * 4096 + 100, &mut b).unwrap();
    s.disk.write(77 * 4096 + 100, &[b[0] ^ 1]).unwrap();
    let check = LoadOptions {
        jobs: vec![job("rw=read,iodepth=8,numjobs=2")],
        verify: Verify::All,
        ..base.clone()
    };
    let r = load::run(&check).unwrap();
    assert!(r.content_cached);
    assert_eq!(r.jobs[0].verify_failures, 1, "{r}");
    assert_eq!(r.jobs[0].verified_pages, 2047);
    // The same without the content cache: pages generated while the job runs.
    let r = load::run(&LoadOptions {
        content_cache: 0,
        ..check.clone()
    })
    .unwrap();
    assert!(!r.content_cached);
    assert_eq!(r.jobs[0].verify_failures, 1, "{r}");
    assert_eq!(r.jobs[0].verified_pages, 2047);

    // A different seed: every page is wrong.
    let r = load::run(&LoadOptions {
        seed: 4,
        ..check.clone()
    })
    .unwrap();
    assert_eq!(r.jobs[0].verify_failures, 2048);

    // Under Verify::Written a fresh run has written nothing, so nothing is checked.
    let r = load::run(&LoadOptions {
        verify: Verify::Written,
        ..check
    })
    .unwrap();
    assert_eq!(r.jobs[0].verify_failures, 0);
    assert_eq!(r.jobs[0].unverified_pages, 2048);
}

#[test]
fn split_and_indirect_layouts_without_event_idx() {
    let s = small();
    let opts = LoadOptions {
        socket: s.socket.clone(),
        jobs: vec![
            job("rw=randwrite,bs=16k,iodepth=8,numjobs=2,ops=400,segments=5"),
            job("rw=randread,bs=16k,iodepth=8,numjobs=2,ops=400,segments=3,indirect=1"),
        ],
        event_idx: false,
        ..LoadOptions::default()
    };
    let r = load::run(&opts).unwrap();
    assert_eq!(r.problems(), 0, "{r}");
    assert!(!r.features.contains(&"RING_EVENT_IDX"));
    assert!(r.jobs[1].verified_pages > 0);
}

#[test]
fn runtime_bounded_job_and_bad_options() {
    let s = small();
    let opts = LoadOptions {
        socket: s.socket.clone(),
        jobs: vec![Job {
            rw: Rw::RandWrite,
            iodepth: 4,
            numjobs: 2,
            runtime: Some(Duration::from_millis(300)),
            partition: Partition::Interleave,
            ..Job::default()
        }],
        ..LoadOptions::default()
    };
    let r = load::run(&opts).unwrap();
    let j = &r.jobs[0];
    assert!(j.ops > 0 && j.errors == 0);
    assert!(j.seconds >= 0.3 && j.seconds < 5.0, "{}", j.seconds);
    assert!((j.iops - j.ops as f64 / j.seconds).abs() < 1.0);

    for bad in ["bs=1000", "numjobs=3", "offset=4097", "iodepth=0"] {
        let o = LoadOptions {
            jobs: vec![job(bad)],
            ..opts.clone()
        };
        assert!(load::run(&o).is_err(), "{bad} accepted");
    }
}
